"""Will a DP run of model M on N devices at epsilon help? ``restwise privacy plan`` and the
check run creation calls (``plan_run``).

The glue between the model side (what an architecture shares: numbers estimated on public
data and stored with the prior, or the network's size and training plan) and the privacy side
(:mod:`restwise.privacy.utility`: calibration with the project's accountant and the verdict).
It sits at the top of the package because it needs both (privacy/ never imports models/).

    restwise privacy plan --cohort 47 --epsilon 4 --model linear-head
    restwise privacy plan --cohort 42 --epsilon 4 --model early-warning
    restwise privacy plan --cohort 47 --epsilon 8 --model recovery-mlp [--rounds 10 --rate 1]

Exit codes: 0 when the plan is expected to help (or to do no harm: the linear head falls back
to its prior), 1 when run creation would refuse it (``--force`` overrides, as it will at run
creation), 2 bad usage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from restwise.common.cli_errors import exit_with
from restwise.common.exit_codes import ExitCode
from restwise.models import linear_head as lh
from restwise.models.linear_head import LinearHeadError
from restwise.models.prior import PriorError, load_prior
from restwise.models.recovery_mlp import NAME as RECOVERY_MLP
from restwise.models import warning as wn
from restwise.models.registry import get_architecture
from restwise.privacy.errors import PrivacyError
from restwise.privacy.utility import (
    FedAvgShape,
    StatisticsReleaseShape,
    UtilityVerdict,
    assess_fedavg,
    assess_statistics_release,
)

LINEAR_HEAD_MODEL = lh.ARCHITECTURE_NAME
NETWORK_MODEL = RECOVERY_MLP
WARNING_MODEL = wn.ARCHITECTURE_NAME
MODELS = (LINEAR_HEAD_MODEL, NETWORK_MODEL, WARNING_MODEL)


def statistics_shape(name: str, statistics_length: int, sensitivity: float, target_bound: float,
                     target_prior) -> StatisticsReleaseShape:
    """A one-release architecture's shape, its signal and prior taken from a fitted
    ``models.prior.TargetPrior`` (public data)."""
    tp = target_prior
    return StatisticsReleaseShape(
        name=name, statistics_length=statistics_length, sensitivity=sensitivity, target_bound=target_bound,
        mean_second_moment=tp.mean_A, prior_tau2=tp.tau2, prior_weights_norm2=float(tp.weights @ tp.weights),
        person_variance=tp.person_variance, mean_statistics_norm=tp.mean_statistics_norm)


def linear_head_shape(prior_path: Path | str | None = None, target: str = "readiness") -> StatisticsReleaseShape:
    """The linear head's release, its signal and prior taken from the (shipped) prior."""
    return statistics_shape(lh.ARCHITECTURE_NAME, lh.STATISTICS_LENGTH, lh.SENSITIVITY, lh.TARGET_BOUND,
                            load_prior(prior_path).target(target))


def warning_shape(prior_path: Path | str | None = None, target: str = "readiness") -> StatisticsReleaseShape:
    """The early-warning model's release (350 numbers, sensitivity sqrt 2, bound 1), its signal
    and prior taken from the (shipped) warning prior."""
    return statistics_shape(wn.ARCHITECTURE_NAME, wn.STATISTICS_LENGTH, wn.SENSITIVITY, wn.TARGET_BOUND,
                            load_prior(prior_path, spec=wn.WARNING_PRIOR).target(target))


def network_shape(*, rounds: int | None = None, clip_norm: float = 1.0, sampling_rate: float = 1.0) -> FedAvgShape:
    """The recovery network under DP-FedAvg: its shared size, the evaluation's round plan."""
    # Deferred: the network's training recipe lives with torch, which only this model needs.
    from restwise.models.training import FEDERATED_ROUNDS

    network = get_architecture(NETWORK_MODEL)
    d = network.contribution_size(network.initial_shared(network.model_config(seed=0)))
    return FedAvgShape(NETWORK_MODEL, d, clip_norm, int(rounds or FEDERATED_ROUNDS), sampling_rate)


def plan_run(model: str, cohort: int, epsilon: float, delta: float = 1e-5, *, rounds: int | None = None,
             sampling_rate: float = 1.0, clip_norm: float = 1.0, prior_path: Path | str | None = None,
             target: str = "readiness", force: bool = False) -> UtilityVerdict:
    """The verdict run creation uses: refuse (unless ``force``) a DP plan whose noise is
    expected to make the model worse than the prior; ``message`` carries the numbers."""
    if model == LINEAR_HEAD_MODEL:
        return assess_statistics_release(linear_head_shape(prior_path, target), cohort, epsilon, delta, force=force)
    if model == WARNING_MODEL:
        return assess_statistics_release(warning_shape(prior_path, target), cohort, epsilon, delta, force=force)
    if model == NETWORK_MODEL:
        shape = network_shape(rounds=rounds, clip_norm=clip_norm, sampling_rate=sampling_rate)
        return assess_fedavg(shape, cohort, epsilon, delta, force=force)
    raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")


def plan_command(
    cohort: int = typer.Option(..., "--cohort", min=2, help="Devices taking part (N)."),
    epsilon: float = typer.Option(..., "--epsilon", help="Target epsilon of the run."),
    model: str = typer.Option(LINEAR_HEAD_MODEL, "--model", help=f"Model: {', '.join(MODELS)}."),
    delta: float = typer.Option(1e-5, "--delta", help="Target delta."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Network: federated rounds (default 10)."),
    rate: float = typer.Option(1.0, "--rate", help="Network: Poisson sampling rate per round (1 = everyone)."),
    clip: float = typer.Option(1.0, "--clip", help="Network: clip norm of an update."),
    prior: Optional[Path] = typer.Option(None, "--prior", help="Linear head / early warning: prior file "
                                         "(default: the model's shipped prior)."),
    force: bool = typer.Option(False, "--force", help="Accept a plan that would be refused (exit 0)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line on stdout."),
) -> None:
    """Expected noise-to-signal of a DP run and whether it is expected to beat the public prior."""
    if model not in MODELS:
        raise typer.BadParameter(f"--model must be one of {', '.join(MODELS)}")
    try:
        verdict = plan_run(model, cohort, epsilon, delta, rounds=rounds, sampling_rate=rate, clip_norm=clip,
                           prior_path=prior, force=force)
    except (ValueError, PriorError, LinearHeadError, PrivacyError) as exc:
        raise exit_with(exc, code=ExitCode.FAILURE, as_json=as_json) from None
    if as_json:
        typer.echo(json.dumps({"ok": verdict.allowed, **verdict.to_dict()}, sort_keys=True, default=float))
    else:
        typer.echo(verdict.message)
        typer.echo(f"expected to beat the prior: {'yes' if verdict.expected_to_beat_prior else 'no'}; "
                   f"run creation: {'allowed' if not verdict.refused else ('forced' if verdict.forced else 'refused')}")
    if not verdict.allowed:
        raise typer.Exit(code=ExitCode.FAILURE)


__all__ = ["plan_run", "plan_command", "linear_head_shape", "warning_shape", "statistics_shape", "network_shape",
           "MODELS", "WARNING_MODEL"]
