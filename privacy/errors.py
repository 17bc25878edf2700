"""Errors raised by restwise.privacy: the ``PrivacyError`` branch of the one error tree
(drawn whole, with exit codes, in :mod:`restwise.common.errors`)::

    PrivacyError                         anything restwise.privacy refuses to do
    ├── EventError                       a privacy event is not valid data
    │   ├── EventValidationError         a field is missing, out of range or inconsistent
    │   └── UnknownSchemaVersionError    written by a schema version this code does not know
    ├── AccountingError                  no trustworthy epsilon can be given
    │   ├── UnsupportedEventError        no tight accounting exists here for this configuration
    │   │   └── NoiseTooSmallError       noise multiplier below the supported minimum (0.5)
    │   └── CalibrationError             no noise multiplier reaches the target
    ├── BudgetExceededError              the next release would exceed a (epsilon, delta) budget
    ├── LedgerError                      the ledger cannot be used
    │   ├── LedgerCorruptError           chain, hash, signature or format broken (tampering?)
    │   └── LedgerConflictError          a different release for an already recorded round
    ├── KeyFileError                     the audit key file is missing, unreadable or unsafe
    ├── ReportError                      a report cannot be built (unknown run, bad input)
    ├── VerificationError                a report does not match its ledger or signatures
    ├── ReceiptError                     a ledger segment or receipt file fails its checks
    ├── DPError                          the device's DP step refuses (privacy.dp_mods)
    │   ├── NonFiniteUpdateError         the update holds NaN or inf
    │   └── UnsafeParametersError        the round's DP parameters are missing or unsafe
    ├── EgressRefused                    a reply is not on the egress allow-list (privacy.egress)
    └── SecAggError                      secure aggregation (privacy.secagg.errors)

Errors carry their context as attributes (e.g. ``BudgetExceededError.spent``) and name the
problem precisely; they never contain key material or update values.
"""

from __future__ import annotations

from restwise.common.errors import RestwiseError
from restwise.common.exit_codes import ExitCode


class PrivacyError(RestwiseError):
    default_message = "the privacy operation failed"


class EventError(PrivacyError, ValueError):
    default_message = "the privacy event is not valid"


class EventValidationError(EventError):
    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message, field=field)


class UnknownSchemaVersionError(EventError):
    def __init__(self, message: str, *, found: object = None, supported: tuple[int, ...] = ()):
        super().__init__(message, found=found, supported=supported)


class AccountingError(PrivacyError):
    default_message = "no trustworthy epsilon can be computed"


class UnsupportedEventError(AccountingError):
    """The accountant has no tight analysis for this configuration and refuses to guess."""

    def __init__(self, message: str, *, event: object = None, **context: object):
        super().__init__(message, event=event, **context)


class NoiseTooSmallError(UnsupportedEventError):
    def __init__(self, message: str, *, noise_multiplier: float, minimum: float, event=None):
        super().__init__(message, event=event, noise_multiplier=noise_multiplier, minimum=minimum)


class CalibrationError(AccountingError):
    default_message = "no noise multiplier reaches the target"


class BudgetExceededError(PrivacyError):
    """Raised before a release that would exceed a budget. Carries the numbers."""

    exit_code = ExitCode.BUDGET_EXCEEDED

    def __init__(
        self,
        *,
        scope: str,
        spent: float,
        projected: float,
        budget_epsilon: float,
        delta: float,
        run_id: str | None = None,
        round: int | None = None,
    ):
        where = f" for run {run_id!r} round {round}" if run_id is not None else ""
        super().__init__(
            f"{scope} privacy budget would be exceeded{where}: spent epsilon={spent:.6g}, "
            f"projected epsilon after this release={projected:.6g} > budget epsilon="
            f"{budget_epsilon:.6g} (delta={delta:.3g})",
            scope=scope, spent=spent, projected=projected, budget_epsilon=budget_epsilon, delta=delta,
            run_id=run_id, round=round,
        )


class LedgerError(PrivacyError):
    default_message = "the privacy ledger cannot be used"


class LedgerCorruptError(LedgerError):
    exit_code = ExitCode.VERIFICATION_FAILED

    def __init__(self, message: str, *, line: int | None = None):
        super().__init__(message if line is None else f"ledger line {line}: {message}", line=line)


class LedgerConflictError(LedgerError):
    def __init__(self, message: str, *, key: tuple | None = None, fields: tuple[str, ...] = ()):
        super().__init__(message, key=key, fields=fields)


class KeyFileError(PrivacyError):
    default_message = "the audit key file cannot be used"


class ReportError(PrivacyError):
    default_message = "the privacy report cannot be built"


class VerificationError(PrivacyError):
    """Verification failed; ``problems`` lists every mismatch found."""

    exit_code = ExitCode.VERIFICATION_FAILED

    def __init__(self, problems: list[str]):
        super().__init__("verification failed: " + "; ".join(problems), problems=list(problems))


class ReceiptError(PrivacyError):
    """A ledger segment a device received, or a receipt file an auditor checks, fails its
    checks (signature, chain, overlap, format). ``seq``/``kind``/``field``: where."""

    exit_code = ExitCode.VERIFICATION_FAILED

    def __init__(self, message: str, *, seq: int | None = None, kind: str | None = None, field: str | None = None):
        super().__init__(message, seq=seq, kind=kind, field=field)


class DPError(PrivacyError):
    """The device's DP step refuses (messages never quote update values)."""

    default_message = "the DP step refused"


class NonFiniteUpdateError(DPError):
    default_message = "the update contains NaN or inf"


class UnsafeParametersError(DPError):
    default_message = "the round's DP parameters are missing or unsafe"


class EgressRefused(PrivacyError):
    """An outgoing message is not on the allow-list. The message names the record, never a value."""

    def __init__(self, message: str, *, record: str | None = None):
        super().__init__(message, record=record)
