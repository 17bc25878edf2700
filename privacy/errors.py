"""Errors raised by restwise.privacy (accounting, budget, ledger, report, verify).

The tree (every class carries the ``exit_code`` the CLI returns, see README "Exit codes")::

    PrivacyError                         exit 1   anything restwise.privacy refuses to do
    ├── EventError                       exit 1   a privacy event is not valid data
    │   ├── EventValidationError         exit 1   a field is missing, out of range or inconsistent
    │   └── UnknownSchemaVersionError    exit 1   written by a schema version this code does not know
    ├── AccountingError                  exit 1   no trustworthy epsilon can be given
    │   ├── UnsupportedEventError        exit 1   no tight accounting exists here for this configuration
    │   │   └── NoiseTooSmallError       exit 1   noise multiplier below the supported minimum (0.5)
    │   └── CalibrationError             exit 1   no noise multiplier reaches the target
    ├── BudgetExceededError              exit 7   the next release would exceed a (epsilon, delta) budget
    ├── LedgerError                      exit 1   the ledger cannot be used
    │   ├── LedgerCorruptError           exit 8   chain, hash, signature or format broken (tampering?)
    │   └── LedgerConflictError          exit 1   a different release for an already recorded round
    ├── KeyFileError                     exit 1   the audit key file is missing, unreadable or unsafe
    ├── ReportError                      exit 1   a report cannot be built (unknown run, bad input)
    └── VerificationError                exit 8   a report does not match its ledger or signatures

Errors carry their context as attributes (e.g. ``BudgetExceededError.spent``) and name the
problem precisely; they never contain key material.
"""

from __future__ import annotations


class PrivacyError(Exception):
    exit_code = 1
    default_message = "the privacy operation failed"

    def __init__(self, message: str | None = None):
        super().__init__(message or self.default_message)


class EventError(PrivacyError, ValueError):
    default_message = "the privacy event is not valid"


class EventValidationError(EventError):
    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        super().__init__(message)


class UnknownSchemaVersionError(EventError):
    def __init__(self, message: str, *, found: object = None, supported: tuple[int, ...] = ()):
        self.found = found
        self.supported = supported
        super().__init__(message)


class AccountingError(PrivacyError):
    default_message = "no trustworthy epsilon can be computed"


class UnsupportedEventError(AccountingError):
    """The accountant has no tight analysis for this configuration and refuses to guess."""

    def __init__(self, message: str, *, event: object = None):
        self.event = event
        super().__init__(message)


class NoiseTooSmallError(UnsupportedEventError):
    def __init__(self, message: str, *, noise_multiplier: float, minimum: float, event=None):
        self.noise_multiplier = noise_multiplier
        self.minimum = minimum
        super().__init__(message, event=event)


class CalibrationError(AccountingError):
    default_message = "no noise multiplier reaches the target"


class BudgetExceededError(PrivacyError):
    """Raised before a release that would exceed a budget. Carries the numbers."""

    exit_code = 7

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
        self.scope = scope
        self.spent = spent
        self.projected = projected
        self.budget_epsilon = budget_epsilon
        self.delta = delta
        self.run_id = run_id
        self.round = round
        where = f" for run {run_id!r} round {round}" if run_id is not None else ""
        super().__init__(
            f"{scope} privacy budget would be exceeded{where}: spent epsilon={spent:.6g}, "
            f"projected epsilon after this release={projected:.6g} > budget epsilon="
            f"{budget_epsilon:.6g} (delta={delta:.3g})"
        )


class LedgerError(PrivacyError):
    default_message = "the privacy ledger cannot be used"


class LedgerCorruptError(LedgerError):
    exit_code = 8

    def __init__(self, message: str, *, line: int | None = None):
        self.line = line
        super().__init__(message if line is None else f"ledger line {line}: {message}")


class LedgerConflictError(LedgerError):
    def __init__(self, message: str, *, key: tuple | None = None, fields: tuple[str, ...] = ()):
        self.key = key
        self.fields = fields
        super().__init__(message)


class KeyFileError(PrivacyError):
    default_message = "the audit key file cannot be used"


class ReportError(PrivacyError):
    default_message = "the privacy report cannot be built"


class VerificationError(PrivacyError):
    """Verification failed; ``problems`` lists every mismatch found."""

    exit_code = 8

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("verification failed: " + "; ".join(self.problems))
