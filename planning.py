"""Will a DP run of model M on N devices at epsilon help? ``restwise privacy plan`` and the
check run creation calls (``plan_run``).

The glue between the model side (what an architecture shares, from the registry:
``Architecture.release_shape`` - numbers estimated on public data and stored with the prior,
or the network's size and round plan) and the privacy side (:mod:`restwise.privacy.utility`:
calibration with the project's accountant and the verdict). It sits at the top of the package
because it needs both; run creation asks the same two functions through ``RunConfig.plan``.

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
from restwise.common.errors import ModelError
from restwise.common.exit_codes import ExitCode
from restwise.models.linear_head import LinearHeadError
from restwise.models.prior import PriorError
from restwise.models.registry import FEDAVG, get_architecture, known_models
from restwise.privacy.budget import DEFAULT_MAX_EPSILON
from restwise.privacy.errors import PrivacyError
from restwise.privacy.utility import UtilityVerdict, assess_release

LINEAR_HEAD_MODEL = "linear-head"


def default_rounds(model: str) -> int:
    """Rounds assumed when none are given: 1 for a one-release model, the evaluation's round
    plan for a FedAvg network."""
    if get_architecture(model).protocol != FEDAVG:
        return 1
    # Deferred: the network's training recipe lives with torch, which only this model needs.
    from restwise.models.training import FEDERATED_ROUNDS

    return int(FEDERATED_ROUNDS)


def plan_run(model: str, cohort: int, epsilon: float, delta: float = 1e-5, *, rounds: int | None = None,
             sampling_rate: float = 1.0, clip_norm: float = 1.0, prior_path: Path | str | None = None,
             target: str = "readiness", force: bool = False) -> UtilityVerdict:
    """The verdict run creation uses (``RunConfig.plan`` asks the same two functions with the
    run's own numbers): the architecture's release shape (``Architecture.release_shape``,
    registry-driven: no model is named here) assessed by ``privacy.utility.assess_release``.
    Refused (unless ``force``) when the DP noise is expected to make the model worse than the
    prior; ``message`` carries the numbers. ModelError for an unknown model."""
    architecture = get_architecture(model)
    shape = architecture.release_shape(rounds=int(rounds or default_rounds(model)), clip_norm=clip_norm,
                                       sampling_rate=sampling_rate,
                                       prior_path=None if prior_path is None else str(prior_path), target=target)
    return assess_release(shape, cohort, epsilon, delta, force=force)


def plan_command(
    cohort: int = typer.Option(..., "--cohort", min=2, help="Devices taking part (N)."),
    epsilon: float = typer.Option(..., "--epsilon", help="Target epsilon of the run, against the server (no "
                                  "amplification by sampling claimed: the noise is calibrated for it)."),
    model: str = typer.Option(LINEAR_HEAD_MODEL, "--model", help=f"Model: {', '.join(known_models())}."),
    delta: float = typer.Option(1e-5, "--delta", help="Target delta."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Network: federated rounds (default 10; "
                                         "one-release models: 1)."),
    rate: float = typer.Option(1.0, "--rate", help="Network: Poisson sampling rate per round (1 = everyone)."),
    clip: float = typer.Option(1.0, "--clip", help="Network: clip norm of an update."),
    prior: Optional[Path] = typer.Option(None, "--prior", help="One-release models (linear head, early warning): "
                                         "prior file (default: the model's shipped prior)."),
    force: bool = typer.Option(False, "--force", help="Accept a plan that would be refused (exit 0)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line on stdout."),
) -> None:
    """Expected noise-to-signal of a DP run and whether it is expected to beat the public prior."""
    if model not in known_models():
        raise typer.BadParameter(f"--model must be one of {', '.join(known_models())}")
    try:
        verdict = plan_run(model, cohort, epsilon, delta, rounds=rounds, sampling_rate=rate, clip_norm=clip,
                           prior_path=prior, force=force)
    except (ValueError, PriorError, LinearHeadError, PrivacyError, ModelError) as exc:
        raise exit_with(exc, code=ExitCode.FAILURE, as_json=as_json) from None
    if as_json:
        typer.echo(json.dumps({"ok": verdict.allowed, **verdict.to_dict()}, sort_keys=True, default=float))
    else:
        typer.echo(verdict.message)
        typer.echo(f"expected to beat the prior: {'yes' if verdict.expected_to_beat_prior else 'no'}; "
                   f"run creation: {'allowed' if not verdict.refused else ('forced' if verdict.forced else 'refused')}")
        if epsilon > DEFAULT_MAX_EPSILON:
            typer.echo(f"note: epsilon {epsilon:g} is above the default run cap {DEFAULT_MAX_EPSILON:g}: such a run is "
                       "refused at creation unless its cap is raised explicitly (max_epsilon, --max-epsilon)")
    if not verdict.allowed:
        raise typer.Exit(code=ExitCode.FAILURE)


__all__ = ["plan_run", "plan_command", "default_rounds", "LINEAR_HEAD_MODEL"]
