"""`restwise model ...`: the linear head's public prior (researchers and operators).

    restwise model prior --data ../shared/data --out models/priors/linear_head_prior.json
    restwise model show [--prior FILE]

``prior`` reads the public datasets found in ``--data`` (sub-folders ``soccermon/`` and
``lifesnaps/``, the shared-data layout), imports every person into their own encrypted store
exactly as ``restwise evaluate`` does, fits one prior per target series
(:mod:`restwise.models.prior`) and writes it with its provenance and sha256. ``show`` verifies
a prior (default: the shipped one) and prints its provenance; a prior whose hash or
feature-spec version does not match is refused (exit 1).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from restwise.common.cli_errors import cli_errors
from restwise.common.fsutil import atomic_write_bytes
from restwise.models.prior import PUBLIC_DATASETS, PriorError, fit_prior, load_prior
from restwise.simulation.evaluate_cli import load_public_cohorts

model_app = typer.Typer(help="Researchers/operators: the linear head's public prior.", no_args_is_help=True)


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
) -> None:
    """Fit the linear head's public prior on public data only and write it with provenance."""
    command = "restwise model prior " + " ".join(shlex.quote(a) for a in sys.argv[3:]) \
        if sys.argv[1:3] == ["model", "prior"] else f"restwise model prior --data {data} --out {out}"
    with cli_errors(also=(PriorError,)):
        cohorts = public_cohorts(data, log=lambda m: typer.echo(m, err=True))
        prior = fit_prior(cohorts, tuple(target or ("readiness", "fatigue")), command=command, seed=seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, prior.to_json().encode("utf-8"), mode=0o644)  # public data, to ship and read
        written = load_prior(out)
    typer.echo(f"Prior written to {out}\n{_describe(written)}")


@model_app.command("show")
def show_command(
    prior: Optional[Path] = typer.Option(None, "--prior", help="Prior file (default: the shipped one)."),
) -> None:
    """Verify a prior (hash, feature-spec version) and print its provenance."""
    with cli_errors(also=(PriorError,)):
        loaded = load_prior(prior)
    typer.echo(f"{prior or 'shipped prior'}: verified\n{_describe(loaded)}")
