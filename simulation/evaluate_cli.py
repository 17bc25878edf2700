"""`restwise evaluate`: the honest evaluation on real data, as a command and a Python API.

Each person of the cohort is first imported into their own encrypted store (a simulated
device, keys in a file keystore under the work folder), then read back through
``client.dataset.daily_data`` exactly as the device's coach reads it, and only then handed to
the pure protocol in :mod:`restwise.models.evaluation`.

    restwise evaluate --dataset soccermon --data ../shared/data/soccermon --out results/
    restwise evaluate --dataset lifesnaps --data ../shared/data/lifesnaps --out results/
    restwise evaluate --cohort my-cohort/ --out results/

Writes ``results.json`` (every number, per person too), ``results.md`` (the table and the
command) and ``results.png`` (MAE with bootstrap intervals) into ``--out``.

``--task early-warning`` evaluates the 7-day warning of a low week (and, on SoccerMon, of an
injury or illness report) instead: see :mod:`restwise.simulation.warning_evaluate`.

The linear head's rows come by default (``--no-linear`` leaves them out): ``public prior``
(epsilon 0; on SoccerMon and LifeSnaps cross-fitted: each half of the persons is scored with a
prior fitted on the other half, plus the other public datasets under ``--public-data`` with
that target; a cohort folder is scored with the shipped prior or ``--prior FILE``) and
``federated statistics + DP (ε=1|4|8)`` (one distributed-DP release of sufficient statistics
each, :mod:`restwise.simulation.federated_statistics`). ``results.md`` states the total epsilon.

``--federated`` appends the federated rows (FedAvg with and without distributed DP, each
personalised on the device; see :mod:`restwise.simulation.evaluate_federated`). More rows plug in
with ``--methods module:function``: ``function(protocol_config) -> {row name: Method}`` (see
``models.evaluation.Method``); their rows are appended after the built-in ones.
"""

from __future__ import annotations

import importlib
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer

from restwise.client.cohort import import_cohort
from restwise.client.dataset import NoDataError, daily_data
from restwise.client.keys import FileKeystore
from restwise.common.cli_errors import cli_errors
from restwise.models.evaluation import (
    EvaluationError,
    NeuralConfig,
    ProtocolConfig,
    default_methods,
    evaluate as evaluate_cohort,
    plot_results,
)
from restwise.models.features import FeatureError
from restwise.models.linear_head import LinearHeadError
from restwise.models.prior import (
    PUBLIC_DATASETS,
    PriorError,
    PublicCohort,
    PublicPriorMethod,
    cross_fitted_priors,
    load_prior,
    shipped_assignment,
)
from restwise.models.warning import WarningError
from restwise.models.warning_evaluation import WarningProtocol, evaluate_warning, plot_warning, split_cohort
from restwise.privacy.accountant import PrivacyAccountant

DEFAULT_TARGET = {"soccermon": "readiness", "lifesnaps": "fatigue", "folder": "readiness"}
TASKS = ("next-day", "early-warning")
DEFAULT_MIN_TEST = {"next-day": 7, "early-warning": 14}


def load_cohort_days(people, keystore) -> dict:
    """person -> DailyData, read from each person's encrypted store."""
    cohort = {}
    for p in people:
        with p.open(keystore) as store:
            try:
                cohort[p.person] = daily_data(store)
            except NoDataError:
                continue
    return cohort


def load_public_cohorts(data: Path | str, names, log: Callable[[str], None] | None = None) -> list:
    """``PublicCohort`` of each dataset in ``names`` found under ``data`` (``data/<name>/``),
    every person through their own encrypted store as in the evaluation."""
    out = []
    for name in names:
        folder = Path(data) / name
        if not folder.is_dir():
            continue
        with tempfile.TemporaryDirectory(prefix="restwise-public-") as tmp:
            keystore = FileKeystore(Path(tmp) / "keys")
            people = import_cohort(name, folder, Path(tmp) / "stores", keystore=keystore)
            out.append(PublicCohort(name, load_cohort_days(people, keystore)))
        if log:
            log(f"public data for the prior: {name}, {len(out[-1].days)} persons")
    return out


def linear_head_methods(kind: str, cohort: Mapping, target: str, *, prior_path: Path | str | None = None,
                        public_data: Path | str | None = None, epsilons=(1.0, 4.0, 8.0),
                        log: Callable[[str], None] | None = None) -> dict:
    """The linear head's rows: ``public prior`` and one ``federated statistics + DP`` row per
    epsilon. Public datasets are cross-fitted (no person in the prior that scores them); any
    other cohort is scored with the shipped prior (or ``prior_path``)."""
    # Deferred: the statistics rows load Flower (through the device's DP step), which
    # `restwise --help` and the other commands must not pay for.
    from restwise.simulation.federated_statistics import statistics_methods

    if kind in PUBLIC_DATASETS:
        others = [n for n in PUBLIC_DATASETS if n != kind]
        extra = load_public_cohorts(public_data, others, log) if public_data is not None else []
        try:
            assignment = cross_fitted_priors(kind, cohort, target, extra=extra)
        except PriorError as exc:
            raise PriorError(f"the cross-fitted prior of the linear rows cannot be fitted: {exc} "
                             "(evaluate more persons, or leave the rows out with --no-linear)") from None
    else:
        try:
            assignment = shipped_assignment(load_prior(prior_path), target, list(cohort))
        except PriorError as exc:
            raise PriorError(f"{exc} (give another --prior, or leave the linear rows out with --no-linear)") from None
    return {"public prior": PublicPriorMethod(assignment), **statistics_methods(assignment, epsilons)}


def import_cohort_days(kind: str, data_path: Path | str, work: Path, *, persons: int | None = None,
                       log: Callable[[str], None], tz: str | None = None) -> tuple[dict, float]:
    """Every person of the cohort into their own encrypted store under ``work`` (keys in a
    file keystore there), read back as the coach reads it: (person -> DailyData, seconds).
    ``tz``: the cohort folder's time zone (local-time files, ISO timestamps to local days)."""
    keystore = FileKeystore(work / "keys")
    t0 = time.perf_counter()
    people = import_cohort(
        kind, data_path, work / "stores", keystore=keystore, persons=persons, tz=tz,
        on_person=lambda i, n, _p: log(f"importing person {i + 1}/{n}") if (i + 1) % 10 == 0 or i + 1 == n else None,
    )
    for p in people:
        for failure in p.failures:
            log(f"{p.person}: {failure}")
    cohort = load_cohort_days(people, keystore)
    seconds = time.perf_counter() - t0
    log(f"{len(people)} stores imported and read back in {seconds:.1f} s")
    return cohort, seconds


def write_results(out_dir: Path | str, result, command: str | None, plot: Callable) -> None:
    """``results.json``, ``results.md`` (with the command) and ``results.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(result.to_json() + "\n", encoding="utf-8")
    md = result.to_markdown()
    if command:
        md += f"\nCommand: `{command}`\n"
    (out / "results.md").write_text(md, encoding="utf-8")
    plot(result, out / "results.png")


def privacy_statement(methods: Mapping, scored_rows, delta: float = 1e-5) -> dict:
    """Every row's epsilon, and all rows' releases composed as if made from the same persons.
    ``scored_rows``: the result's rows (each with ``name`` and ``epsilon``)."""
    rows = {m.name: m.epsilon for m in scored_rows if m.epsilon is not None}
    specs = [spec for method in methods.values() for spec in getattr(method, "privacy_releases", ())]
    composed = PrivacyAccountant().epsilon_value(specs, delta) if specs else 0.0
    private = {k: v for k, v in rows.items() if v > 0}
    text = (f"**Total ε (δ = {delta:g}).** Each private row is its own run; its ε counts every release it "
            "made, selection included: " + (", ".join(f"{k}: {v:.2f}" for k, v in private.items()) or "none")
            + ". Rows with ε = 0 use public data only. Composed over all "
            f"{len(specs)} releases of this table, as if all rows were released from the same persons: "
            f"ε = {composed:.2f}.")
    return {"delta": delta, "rows": rows, "releases": len(specs), "all_rows_composed_epsilon": composed,
            "statement": text}


def _extra_methods(spec: str, config) -> dict:
    module, _, func = spec.partition(":")
    if not module or not func:
        raise typer.BadParameter("--methods must be written module:function")
    try:
        factory = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError):
        raise typer.BadParameter(f"cannot load {spec}") from None
    methods = factory(config)
    if not isinstance(methods, Mapping):
        raise typer.BadParameter(f"{spec} must return a mapping of row name -> method")
    return dict(methods)


def run_evaluation(
    kind: str,
    data_path: Path | str,
    out_dir: Path | str | None = None,
    *,
    workdir: Path | str | None = None,
    persons: int | None = None,
    seed: int = 0,
    target: str | None = None,
    min_train: int = 28,
    min_test: int = 7,
    threads: int = 1,
    methods: Mapping | None = None,
    extra_methods: Mapping | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    linear: bool = True,
    prior_path: Path | str | None = None,
    public_data: Path | str | None = None,
    tz: str | None = None,
):
    """Import ``data_path`` (``kind``: soccermon, lifesnaps or folder) one store per person,
    evaluate, and write results into ``out_dir`` (when given). Returns the EvaluationResult.

    ``methods`` replaces the default rows; ``extra_methods`` are appended after them. With
    ``linear`` the linear head's rows (:func:`linear_head_methods`) follow the default rows."""
    log = log or (lambda _msg: None)
    config = ProtocolConfig(target=target or DEFAULT_TARGET[kind], seed=seed,
                            min_train=min_train, min_test=min_test)
    rows = dict(methods) if methods is not None else default_methods(config, NeuralConfig(threads=threads))
    with tempfile.TemporaryDirectory(prefix="restwise-eval-") as tmp:
        cohort, t_import = import_cohort_days(kind, data_path, Path(workdir) if workdir is not None else Path(tmp),
                                              persons=persons, log=log, tz=tz)
        if linear:
            rows.update(linear_head_methods(kind, cohort, config.target, prior_path=prior_path,
                                            public_data=public_data, log=log))
        rows.update(extra_methods or {})
        t1 = time.perf_counter()
        result = evaluate_cohort(
            cohort, rows, config=config, dataset=kind if kind != "folder" else Path(data_path).name,
            on_method=lambda name: log(f"evaluating: {name}"),
        )
        result.privacy = privacy_statement(rows, result.methods)
        result.protocol["import_seconds"] = round(t_import, 2)
        result.protocol["evaluate_seconds"] = round(time.perf_counter() - t1, 2)
    if out_dir is not None:
        write_results(out_dir, result, command, plot_results)
    return result


def run_warning_evaluation(
    kind: str, data_path: Path | str, out_dir: Path | str | None = None, *, workdir: Path | str | None = None,
    persons: int | None = None, seed: int = 0, target: str | None = None, min_train: int = 28, min_test: int = 14,
    bootstrap: int = 2000, prior_path: Path | str | None = None, public_data: Path | str | None = None,
    epsilons=(1.0, 4.0, 8.0), command: str | None = None, log: Callable[[str], None] | None = None,
    tz: str | None = None,
):
    """``--task early-warning``: import ``data_path`` one store per person, evaluate the 7-day
    warning (:mod:`restwise.models.warning_evaluation`, rows from
    :mod:`restwise.simulation.warning_evaluate`), write the files. Returns the WarningResult."""
    # Deferred: the private warning rows load Flower (through the device's DP step), which
    # `restwise --help` and the other commands must not pay for.
    from restwise.simulation.warning_evaluate import finish, read_soccermon_reports, warning_methods

    log = log or (lambda _msg: None)
    protocol = WarningProtocol(target=target or DEFAULT_TARGET[kind], seed=seed, min_train=min_train,
                               min_test=min_test, bootstrap=bootstrap)
    reports = read_soccermon_reports(data_path) if kind == "soccermon" else None
    if kind == "soccermon" and reports is None:
        log("this SoccerMon folder has no injury or illness files: the secondary event is not scored")
    report_days = None if reports is None else reports.days
    with tempfile.TemporaryDirectory(prefix="restwise-warning-") as tmp:
        cohort, t_import = import_cohort_days(kind, data_path, Path(workdir) if workdir is not None else Path(tmp),
                                              persons=persons, log=log, tz=tz)
    t1 = time.perf_counter()
    prepared = split_cohort(cohort, protocol, report_days)  # who can be evaluated, before any prior is fitted
    extra = []
    if kind in PUBLIC_DATASETS and public_data is not None:
        extra = load_public_cohorts(public_data, [n for n in PUBLIC_DATASETS if n != kind], log)
    rows = warning_methods(kind, cohort, protocol.target, prior_path=prior_path, extra=extra, epsilons=epsilons)
    result = evaluate_warning(cohort, rows, protocol=protocol, reports=report_days, prepared=prepared,
                              dataset=kind if kind != "folder" else Path(data_path).name,
                              on_method=lambda name: log(f"evaluating: {name}"))
    result.privacy = privacy_statement(rows, result.rows)
    finish(result, protocol.target)
    result.protocol.update({"import_seconds": round(t_import, 2),
                            "evaluate_seconds": round(time.perf_counter() - t1, 2),
                            "reports": None if reports is None else reports.to_dict()})
    if out_dir is not None:
        write_results(out_dir, result, command, plot_warning)
    return result


def evaluate(
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="Public dataset layout: soccermon or lifesnaps (with --data)."
    ),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of the dataset."),
    cohort: Optional[Path] = typer.Option(
        None, "--cohort", help="Cohort folder: one sub-folder per person with their exports."
    ),
    out: Path = typer.Option(Path("restwise-evaluation"), "--out", help="Folder for results.json/.md/.png."),
    workdir: Optional[Path] = typer.Option(
        None, "--workdir", help="Folder for the simulated devices' stores and keys (default: a "
        "temporary folder, erased afterwards)."
    ),
    persons: Optional[int] = typer.Option(None, "--persons", min=2, help="Use the first N persons only."),
    seed: int = typer.Option(0, "--seed", help="Seed for training and the bootstrap."),
    target: Optional[str] = typer.Option(
        None, "--target", help="Series to predict for day t+1 (default: readiness; LifeSnaps: "
        "fatigue, from its mood answers)."
    ),
    min_train: int = typer.Option(28, "--min-train", min=2, help="Persons with fewer training examples are left out."),
    min_test: Optional[int] = typer.Option(
        None, "--min-test", min=1, help="Persons with fewer test examples are left out (default 7; "
        "early-warning: 14 labelled days)."),
    threads: int = typer.Option(1, "--threads", min=1, max=64, help="Torch threads."),
    methods: Optional[str] = typer.Option(
        None, "--methods", help="Extra rows: module:function returning {name: Method}."
    ),
    federated: bool = typer.Option(
        False, "--federated", help="Append the federated rows: FedAvg without DP and with "
        "distributed DP (epsilon 8, delta 1e-5), each personalised on the device."
    ),
    linear: bool = typer.Option(
        True, "--linear/--no-linear", help="The linear head's rows: public prior (epsilon 0, "
        "cross-fitted on public datasets) and one DP statistics release at epsilon 1, 4, 8."
    ),
    prior: Optional[Path] = typer.Option(
        None, "--prior", help="Prior file for a cohort folder (default: the shipped prior)."
    ),
    public_data: Optional[Path] = typer.Option(
        None, "--public-data", help="Folder of the other public datasets (soccermon/, lifesnaps/) "
        "added to the cross-fitted prior where they have the target series."
    ),
    tz: Optional[str] = typer.Option(
        None, "--tz", help="Cohort folder: the persons' IANA time zone (e.g. Europe/Oslo). Local-time "
        "files are read in it and ISO timestamps with Z or an offset become its local days; "
        "without it UTC is assumed and said once."
    ),
    task: str = typer.Option(
        "next-day", "--task", help="next-day: tomorrow's readiness (the table above); early-warning: "
        "a 7-day warning of a low week (and of an injury or illness report on SoccerMon), the "
        "literature's rules against the warning model, private and not (--prior: the warning prior)."
    ),
) -> None:
    """Honest evaluation of next-day readiness models (or, with --task early-warning, of a 7-day
    warning of a low week) on real data: every person imported into their own encrypted store,
    chronological 75/25 split with a 7-day gap, baselines and our models in one table."""
    if (dataset is None) == (cohort is None):
        raise typer.BadParameter("give either --dataset NAME --data PATH or --cohort FOLDER")
    if dataset is not None:
        if dataset not in ("soccermon", "lifesnaps"):
            raise typer.BadParameter("--dataset must be soccermon or lifesnaps")
        if data is None:
            raise typer.BadParameter("--dataset needs --data PATH")
        kind, path = dataset, data
    else:
        kind, path = "folder", cohort
    if task not in TASKS:
        raise typer.BadParameter(f"--task must be one of {', '.join(TASKS)}")
    if tz is not None:
        if kind != "folder":
            raise typer.BadParameter("--tz belongs to --cohort (the public datasets carry their own days)")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise typer.BadParameter(f"unknown time zone {tz!r} (use an IANA name such as Europe/Oslo)") from None
    min_test = DEFAULT_MIN_TEST[task] if min_test is None else min_test
    command = "restwise evaluate " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "evaluate" else None
    if task == "early-warning" and (federated or methods or not linear):
        raise typer.BadParameter("--federated, --methods and --no-linear belong to --task next-day")
    protocol = ProtocolConfig(target=target or DEFAULT_TARGET[kind], seed=seed,
                              min_train=min_train, min_test=min_test)
    extra: dict | None = None
    if federated:
        # Deferred: the federated rows load torch and Flower, which `restwise --help` must not.
        from restwise.simulation.evaluate_federated import federated_methods

        extra = federated_methods(protocol, NeuralConfig(threads=threads))
    if methods:
        extra = {**(extra or {}), **_extra_methods(methods, protocol)}

    def log(msg: str) -> None:
        typer.echo(msg, err=True)

    with cli_errors(also=(EvaluationError, FeatureError, PriorError, LinearHeadError, WarningError)):
        if task == "early-warning":
            result = run_warning_evaluation(kind, path, out, workdir=workdir, persons=persons, seed=seed,
                                            target=target, min_train=min_train, min_test=min_test,
                                            prior_path=prior, public_data=public_data, command=command, log=log,
                                            tz=tz)
        else:
            result = run_evaluation(kind, path, out, workdir=workdir, persons=persons, seed=seed,
                                    target=target, min_train=min_train, min_test=min_test, threads=threads,
                                    extra_methods=extra, command=command, log=log, linear=linear,
                                    prior_path=prior, public_data=public_data, tz=tz)
    typer.echo(result.to_markdown())
    typer.echo(f"Results written to {out}/results.json, results.md, results.png")
