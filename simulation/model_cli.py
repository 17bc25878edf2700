"""`restwise model ...`: the linear head's public prior (researchers and operators).

    restwise model prior --data ../shared/data --out models/priors/linear_head_prior.json
    restwise model prior --model early-warning --data ../shared/data --out models/priors/warning_prior.json
    restwise model show [--model early-warning] [--prior FILE]
    restwise model warning-record --results docs/results/early-warning/soccermon/results.json \
        --out models/priors/warning_record.json

``warning-record`` keeps, from a shipped early-warning evaluation, the measured record the
coach states next to its warning (how many of its warnings were followed by a low week) and
each literature rule's own record (stated when the rule is given as a reason).

``prior`` reads the public datasets found in ``--data`` (sub-folders ``soccermon/`` and
``lifesnaps/``, the shared-data layout), imports every person into their own encrypted store
exactly as ``restwise evaluate`` does, fits one prior per target series
(:mod:`restwise.models.prior`) and writes it with its provenance and sha256. ``show`` verifies
a prior (default: the shipped one) and prints its provenance; a prior whose hash or
feature-spec version does not match is refused (exit 1).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from restwise.common.cli_errors import cli_errors, fail
from restwise.common.fsutil import atomic_write_bytes
from restwise.models.prior import LINEAR_HEAD_PRIOR, PUBLIC_DATASETS, PriorError, fit_prior, load_prior
from restwise.models.warning import WARNING_PRIOR, WarningError, record_from_results
from restwise.simulation.evaluate_cli import load_public_cohorts

# --model: which architecture's prior (the same fit, file format and verification)
PRIOR_SPECS = {"linear-head": LINEAR_HEAD_PRIOR, "early-warning": WARNING_PRIOR}
ModelOpt = typer.Option("linear-head", "--model", help="Whose prior: linear-head (next-day readiness) or "
                        "early-warning (7-day risk of a low week).")


def prior_spec(model: str):
    if model not in PRIOR_SPECS:
        raise typer.BadParameter(f"--model must be one of {', '.join(PRIOR_SPECS)}")
    return PRIOR_SPECS[model]


model_app = typer.Typer(help="Researchers/operators: the public priors (linear head, early warning) and the warning's record.", no_args_is_help=True)


def public_cohorts(data: Path, log=None) -> list:
    """Every known public dataset under ``data`` (``data/<name>/``); none is an error."""
    cohorts = load_public_cohorts(data, list(PUBLIC_DATASETS), log)
    if not cohorts:
        raise PriorError(f"no public dataset under {data} (expected sub-folders: {', '.join(PUBLIC_DATASETS)})")
    return cohorts


def _describe(prior) -> str:
    lines = [f"sha256 {prior.sha256}" if prior.sha256 else "(not yet written)"]
    for name, t in sorted(prior.targets.items()):
        src = ", ".join(f"{k} {v} persons / {t.rows[k]} rows" for k, v in sorted(t.persons.items()))
        lines.append(f"  {name}: {src}; ridge {t.ridge_lambda:g} per person")
        if "operating_point" in t.extra:
            lines.append(f"    operating point {t.extra['operating_point']:.3f}, {t.extra.get('chosen_on', '')}")
    for d in prior.datasets:
        lines.append(f"  {d['name']}: {d['licence']}, {d['citation']}")
    return "\n".join(lines)


@model_app.command("prior")
def prior_command(
    data: Path = typer.Option(..., "--data", help="Folder with the public datasets (soccermon/, lifesnaps/)."),
    out: Path = typer.Option(..., "--out", help="Prior file to write (JSON)."),
    target: Optional[list[str]] = typer.Option(
        None, "--target", help="Target series to fit (repeatable; default: readiness and fatigue)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap over persons."),
    model: str = ModelOpt,
) -> None:
    """Fit a model's public prior on public data only and write it with provenance."""
    spec = prior_spec(model)
    command = "restwise model prior " + " ".join(shlex.quote(a) for a in sys.argv[3:]) \
        if sys.argv[1:3] == ["model", "prior"] else f"restwise model prior --data {data} --out {out}"
    with cli_errors(also=(PriorError,)):
        cohorts = public_cohorts(data, log=lambda m: typer.echo(m, err=True))
        prior = fit_prior(cohorts, tuple(target or ("readiness", "fatigue")), command=command, seed=seed,
                          spec=spec)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, prior.to_json().encode("utf-8"), mode=0o644)  # public data, to ship and read
        written = load_prior(out, spec=spec)
    typer.echo(f"Prior written to {out}\n{_describe(written)}")


@model_app.command("show")
def show_command(
    prior: Optional[Path] = typer.Option(None, "--prior", help="Prior file (default: the shipped one)."),
    model: str = ModelOpt,
) -> None:
    """Verify a prior (hash, feature-spec version) and print its provenance."""
    spec = prior_spec(model)
    with cli_errors(also=(PriorError,)):
        loaded = load_prior(prior, spec=spec)
    typer.echo(f"{prior or 'shipped prior'}: verified\n{_describe(loaded)}")


@model_app.command("warning-record")
def warning_record_command(
    results: Path = typer.Option(..., "--results", help="results.json of `restwise evaluate --task early-warning`."),
    out: Path = typer.Option(..., "--out", help="Record file to write (JSON)."),
    row: str = typer.Option("warning model, public prior", "--row",
                            help="The row whose record the coach states (the model the device runs)."),
) -> None:
    """Keep the coach's measured record of its 7-day warning from a shipped evaluation."""
    try:
        blob = results.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {results}: {exc.strerror or exc}") from None
    command = " ".join(["restwise model warning-record --results", shlex.quote(str(results)), "--out",
                        shlex.quote(str(out))] + (["--row", shlex.quote(row)] if row != "warning model, public prior" else []))
    try:
        record = record_from_results(json.loads(blob), row, results_sha256=hashlib.sha256(blob).hexdigest(),
                                     command=command)
    except (ValueError, KeyError, WarningError) as exc:
        raise fail(f"{results} is not a usable early-warning results.json ({exc})") from None
    with cli_errors():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, (json.dumps(record.to_dict(), indent=1, sort_keys=True, allow_nan=False) + "\n")
                           .encode("utf-8"), mode=0o644)  # public numbers, to ship and read
    typer.echo(f"Record written to {out}: \"{record.sentence()}\"")
