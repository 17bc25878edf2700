"""The server's errors: the ``FederationError``, ``ServiceError`` and ``DeploymentError``
branches of the one error tree (drawn whole, with exit codes, in :mod:`restwise.common.errors`),
and ``RunConfigError`` under ``UsageError``.

    FederationError                 the server-side federation cannot go on
    ├── RunFilesError               a run directory's files are inconsistent or unreadable
    └── PlanError                   the run cannot be started as given
        └── EpsilonCapError         its projected epsilon exceeds the run's cap (max_epsilon)
    ServiceError                    the operator/auditor service refuses
    ├── RunError                    run management refuses
    │   ├── RunNotFoundError        no run with that id                         -> HTTP 404
    │   ├── RunStateError           not allowed in the run's current status     -> HTTP 409
    │   ├── BudgetRefusedError      the planned rounds would exceed the budget  -> HTTP 409
    │   └── AccountingRefusedError  the configuration cannot be accounted tightly -> HTTP 409
    ├── DatabaseError               the database cannot be used
    ├── TokenError                  a token operation was refused (unknown id, bad name or role)
    └── ProblemError                a route answers with this problem detail (RFC 9457)
    DeploymentError                 a deployment step failed (also a RuntimeError)
    ├── DeploymentConfigError       bad or unsafe deployment options
    ├── CertificateError            a certificate/key file is missing, unreadable or wrong
    ├── FlowerCommandError          a `flwr` command failed (carries the command and exit code)
    ├── ProcessStartError           a SuperLink/SuperNode process died or never became ready
    └── RunFailedError              a run ended in a state other than completed:successful
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from restwise.common.errors import RestwiseError, UsageError
from restwise.common.exit_codes import ExitCode

if TYPE_CHECKING:  # annotation only: the errors module stays free of the privacy workflow
    from restwise.privacy.release import BudgetDecision


class RunConfigError(UsageError, ValueError):
    """A run configuration is invalid; ``field`` names the field the problem is about, so an
    API can answer 422 naming it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field=field, message=message)


# -- the federation ---------------------------------------------------------------------------
class FederationError(RestwiseError):
    default_message = "the federation cannot go on"


class RunFilesError(FederationError):
    default_message = "the run directory's files are inconsistent or unreadable"


class PlanError(FederationError):
    default_message = "the run cannot be started as given"


class EpsilonCapError(PlanError):
    """The run's projected epsilon (against the server: no amplification by sampling claimed)
    exceeds its cap ``max_epsilon``; only raising the cap explicitly lifts it, not ``force``."""

    exit_code = ExitCode.BUDGET_EXCEEDED


# -- the service ------------------------------------------------------------------------------
class ServiceError(RestwiseError):
    default_message = "the service refused"


class RunError(ServiceError):
    default_message = "run management refused"


class RunNotFoundError(RunError):
    def __init__(self, run_id: str):
        super().__init__(f"no run with id {run_id!r}", run_id=run_id)


class RunStateError(RunError):
    def __init__(self, run_id: str, status: str, action: str):
        super().__init__(f"cannot {action} run {run_id!r}: its status is {status!r}",
                         run_id=run_id, status=status, action=action)


class BudgetRefusedError(RunError):
    exit_code = ExitCode.BUDGET_EXCEEDED

    def __init__(self, run_id: str, decision: "BudgetDecision"):
        if not decision.run_allowed:
            message = (
                f"run {run_id!r} would spend ε = {decision.projected_epsilon:.4g} over "
                f"{decision.rounds} rounds at δ = {decision.delta:g} against the server (no amplification "
                f"by sampling claimed), above its budget ε = {decision.budget_epsilon:.4g}"
            )
        else:
            message = (
                f"run {run_id!r} would bring each person's ε across runs on this dataset from "
                f"{decision.person_spent_epsilon:.4g} to {decision.person_projected_epsilon:.4g} "
                f"at δ = {decision.delta:g}, above the person budget ε = {decision.person_budget_epsilon:.4g}"
            )
        super().__init__(message, run_id=run_id, decision=decision)


class AccountingRefusedError(RunError):
    def __init__(self, run_id: str, reason: str):
        super().__init__(f"run {run_id!r} cannot be accounted: {reason}", run_id=run_id, reason=reason)


class DatabaseError(ServiceError):
    """The database cannot be used (unreachable, or written by a newer schema)."""

    default_message = "the database cannot be used"


class TokenError(ServiceError):
    """A token operation was refused (unknown id, bad name or role)."""


class ProblemError(ServiceError):
    """Raised inside handlers to answer with a problem detail."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        type_: str = "about:blank",
        errors: list[dict[str, str]] | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail or title, status=status, title=title, detail=detail, type_=type_,
                         errors=errors, extra=extra or {}, headers=headers)


# -- deployment -----------------------------------------------------------------------------------
class DeploymentError(RestwiseError, RuntimeError):
    """Something about a Restwise deployment failed; see the subclasses."""

    default_message = "the deployment step failed"


class DeploymentConfigError(DeploymentError):
    """Bad or unsafe deployment options."""

    exit_code = ExitCode.USAGE


class CertificateError(DeploymentError):
    """A certificate or key file is missing, unreadable or of the wrong kind."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}", path=Path(path), problem=problem)


class FlowerCommandError(DeploymentError):
    """A ``flwr`` command failed."""

    def __init__(self, command: str, returncode: int, detail: str = ""):
        msg = f"`flwr {command}` failed with exit code {returncode}"
        super().__init__(f"{msg}: {detail}" if detail else msg, command=command, returncode=returncode, detail=detail)


class ProcessStartError(DeploymentError):
    """A SuperLink or SuperNode process exited early or never became ready."""

    def __init__(self, name: str, detail: str, log_path: Path | None = None):
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"{name}: {detail}{where}", name=name, log_path=log_path)


class RunFailedError(DeploymentError):
    """A Flower run ended in a state other than ``completed:successful``."""

    def __init__(self, run_id: int, status: str, detail: str = ""):
        msg = f"run {run_id} ended with status {status}"
        super().__init__(f"{msg}: {detail}" if detail else msg, run_id=run_id, status=status)


__all__ = [
    "RunConfigError", "FederationError", "RunFilesError", "PlanError", "EpsilonCapError", "ServiceError", "RunError",
    "RunNotFoundError", "RunStateError", "BudgetRefusedError", "AccountingRefusedError", "DatabaseError",
    "TokenError", "ProblemError", "DeploymentError", "DeploymentConfigError", "CertificateError",
    "FlowerCommandError", "ProcessStartError", "RunFailedError",
]
