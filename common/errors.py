"""Every error Restwise raises, as one tree under :class:`RestwiseError` (in the manner of
httpx's ``_exceptions.py``). The exit code is what a command ends with (the registry is
``restwise.common.exit_codes``); where a class is defined is in brackets::

    RestwiseError                        1  anything Restwise refuses to do
    ├── UsageError                       2  a command, option or configuration is invalid
    │   └── RunConfigError               2  a run configuration field is invalid; ``field`` names it  [server.errors]
    ├── FileAccessError                  1  a file or folder cannot be read or written (from OSError)
    ├── RestwiseDeviceError              1  the device refuses to do something
    │   ├── StoreError                   4  the store cannot be used
    │   │   ├── StoreNotFoundError       4  no store at the given location
    │   │   ├── StoreExistsError         4  `init` on a folder that already holds one
    │   │   ├── StoreFormatError         5  damaged, truncated or tampered store files
    │   │   └── StoreLockedError         4  another process holds the store
    │   ├── WeakPassphraseError          2  a new passphrase is too easy to guess
    │   ├── KeyError_                    3  the store's key cannot be opened
    │   │   ├── WrongPassphraseError     3  wrong passphrase or not a Restwise store
    │   │   └── KeySlotError             3  a keystore slot cannot be opened
    │   │       └── KeystoreNotFoundError 3 the keystore (or its key for this store) is missing
    │   ├── ImportFailedError            6  an import was refused; the store is unchanged
    │   │   ├── UnknownFormatError       6  the file's format is not recognised
    │   │   ├── MalformedInputError      6  the file is not valid for its format
    │   │   │   └── ArchiveRefusedError  6  a zip that lies about its sizes (zip bomb?)
    │   │   └── NothingImportedError     9  the import stored nothing (reasons listed)
    │   ├── NoDataError                  1  the store holds no days to train on  [client.dataset]
    │   └── JoinConfigError              1  bad `device join` options or key file (also ValueError)  [client.join_cli]
    ├── ModelError                       1  a model configuration, array list or stored model is
    │                                       invalid, or no architecture has that name
    │   ├── FeatureError                 1  feature input has the wrong shape or content  [models.features]
    │   ├── EvaluationError              1  the evaluation cannot run as asked  [models.evaluation]
    │   ├── LinearHeadError              1  the linear head's input or model file is unusable  [models.linear_head]
    │   │   └── NotEnoughDataError       1  too few days to compute a device's statistics
    │   ├── PriorError                   1  a prior cannot be fitted or loaded (hash, spec)  [models.prior]
    │   ├── WarningError                 1  the early warning cannot be computed  [models.warning]
    │   └── CoachError                   1  the coach cannot advise on this input  [models.coach]
    ├── PrivacyError                     1  anything restwise.privacy refuses to do  [privacy.errors]
    │   ├── EventError                   1  a privacy event is not valid data
    │   │   ├── EventValidationError     1  a field is missing, out of range or inconsistent
    │   │   └── UnknownSchemaVersionError 1 written by a schema version this code does not know
    │   ├── AccountingError              1  no trustworthy epsilon can be given
    │   │   ├── UnsupportedEventError    1  no tight accounting exists for this configuration
    │   │   │   └── NoiseTooSmallError   1  noise multiplier below the supported minimum (0.5)
    │   │   └── CalibrationError         1  no noise multiplier reaches the target
    │   ├── BudgetExceededError          7  the next release would exceed an (epsilon, delta) budget
    │   ├── LedgerError                  1  the ledger cannot be used
    │   │   ├── LedgerCorruptError       8  chain, hash, signature or format broken (tampering?)
    │   │   └── LedgerConflictError      1  a different release for an already recorded round
    │   ├── KeyFileError                 1  the audit key file is missing, unreadable or unsafe
    │   ├── ReportError                  1  a report cannot be built (unknown run, bad input)
    │   ├── VerificationError            8  a report does not match its ledger or signatures
    │   ├── ReceiptError                 8  a ledger segment or receipt file fails its checks
    │   ├── DPError                      1  the device's DP step refuses (never quotes values)
    │   │   ├── NonFiniteUpdateError     1  the update holds NaN or inf
    │   │   └── UnsafeParametersError    1  the round's DP parameters are missing or unsafe
    │   ├── EgressRefused                1  a reply is not on the egress allow-list
    │   └── SecAggError                  1  secure aggregation refuses  [privacy.secagg.errors]
    │       ├── SecAggConfigError        1  a parameter set is invalid or unsafe (also ValueError)
    │       ├── InputRefusedError        1  the device refuses to mask its own update
    │       ├── ShareError               1  a Shamir or encrypted share is malformed
    │       │   └── ShareAuthenticationError 1  ...or fails authentication
    │       ├── ProtocolViolationError   1  a message is out of order, duplicated or inconsistent
    │       └── RoundAborted             1  a secure round cannot complete safely  [privacy.secagg.protocol]
    ├── FederationError                  1  the server-side federation cannot go on  [server.errors]
    │   ├── RunFilesError                1  a run directory's files are inconsistent or unreadable
    │   └── PlanError                    1  the run cannot be started as given
    │       └── EpsilonCapError          7  ...its projected epsilon exceeds the run's cap (max_epsilon)
    ├── ServiceError                     1  the operator/auditor service refuses  [server.errors]
    │   ├── RunError                     1  run management refuses
    │   │   ├── RunNotFoundError         1  no run with that id (HTTP 404)
    │   │   ├── RunStateError            1  not allowed in the run's current status (HTTP 409)
    │   │   ├── BudgetRefusedError       7  the planned rounds would exceed the budget (HTTP 409)
    │   │   └── AccountingRefusedError   1  the configuration cannot be accounted tightly (HTTP 409)
    │   ├── DatabaseError                1  the service's database cannot be used
    │   ├── TokenError                   1  a token operation was refused (unknown id, bad name)
    │   └── ProblemError                 1  an HTTP problem detail a route answers with
    └── DeploymentError                  1  a deployment step failed (also RuntimeError)  [server.errors]
        ├── DeploymentConfigError        2  bad or unsafe deployment options
        ├── CertificateError             1  a certificate or key file is missing, unreadable or wrong
        ├── FlowerCommandError           1  a `flwr` command failed
        ├── ProcessStartError            1  a SuperLink/SuperNode process died or never became ready
        └── RunFailedError               1  a Flower run ended other than completed

Errors carry their context as attributes and in ``context`` (a dict of non-secret details:
a path, a field name, numbers), and their messages name the problem precisely. They never
contain personal values or key material.

:func:`translate_error` is the one place where foreign errors become Restwise errors: an
``OSError`` becomes a :class:`FileAccessError` naming the file, a SQLCipher/SQLite error
becomes :class:`StoreLockedError` (busy) or :class:`StoreFormatError` (a page failed its
integrity check). The device store and every CLI call it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import sqlcipher3.dbapi2 as sqlcipher

from restwise.common.exit_codes import ExitCode


class RestwiseError(Exception):
    """The root. ``RestwiseError(message, **context)``: the context (non-secret details) is
    kept in ``context`` and as attributes of the same names."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILURE
    default_message: ClassVar[str] = "the operation failed"

    def __init__(self, message: str | None = None, /, **context: Any):
        super().__init__(message or self.default_message)
        self.context = dict(context)
        for name, value in context.items():
            setattr(self, name, value)


class UsageError(RestwiseError):
    exit_code = ExitCode.USAGE
    default_message = "invalid usage"


class FileAccessError(RestwiseError):
    """A file or folder cannot be read or written; ``path`` and ``reason`` say which and why."""

    default_message = "a file cannot be read or written"


# -- the device ----------------------------------------------------------------------------
class RestwiseDeviceError(RestwiseError):
    default_message = "the device operation failed"


class StoreError(RestwiseDeviceError):
    exit_code = ExitCode.STORE_UNAVAILABLE
    default_message = "the store cannot be used"


class StoreNotFoundError(StoreError):
    default_message = "no Restwise store at this location (run `restwise device init` first)"


class StoreExistsError(StoreError):
    default_message = "a Restwise store already exists at this location"


class StoreFormatError(StoreError):
    exit_code = ExitCode.STORE_DAMAGED
    default_message = "the store files are damaged, truncated or were tampered with"


class StoreLockedError(StoreError):
    default_message = "the store is in use by another process"


class KeyError_(RestwiseDeviceError):  # noqa: N801 - avoid shadowing builtins.KeyError
    exit_code = ExitCode.KEY_REFUSED
    default_message = "the store's key cannot be opened"


class WrongPassphraseError(KeyError_):
    default_message = "wrong passphrase or not a Restwise store"


class KeySlotError(KeyError_):
    default_message = "the keystore cannot open this store"


class KeystoreNotFoundError(KeySlotError):
    """The keystore is not there: no usable OS keyring, no key file for this store, or the
    store has no keystore slot. Said as such, never as a wrong passphrase."""

    default_message = "the keystore that opens this store was not found"


class WeakPassphraseError(RestwiseDeviceError):
    exit_code = ExitCode.USAGE
    default_message = "the passphrase is too easy to guess"


class ImportFailedError(RestwiseDeviceError):
    exit_code = ExitCode.IMPORT_REFUSED
    default_message = "the import failed; the store is unchanged"


class UnknownFormatError(ImportFailedError):
    default_message = "the file's format is not recognised"


class MalformedInputError(ImportFailedError):
    default_message = "the file is not valid for its format"


class ArchiveRefusedError(MalformedInputError):
    """A zip member expands beyond what it states: the whole archive is refused, never
    read around (even where damaged files are otherwise skipped)."""

    default_message = "the archive is refused (zip bomb?)"


class NothingImportedError(ImportFailedError):
    """The input was read but not one record was stored (every record skipped, every file
    unreadable): the store is unchanged. ``report`` holds what was seen and why it was
    skipped, so the caller can list the reasons."""

    exit_code = ExitCode.NOTHING_IMPORTED
    default_message = "nothing was imported; the store is unchanged"

    def __init__(self, message: str | None = None, report=None):
        super().__init__(message, report=report)


# -- models --------------------------------------------------------------------------------
class ModelError(RestwiseError, ValueError):
    """A model configuration, array list or serialized model is invalid, or no architecture
    of that name is registered (the message says how)."""

    default_message = "the model is invalid"


# -- the one mapping step --------------------------------------------------------------------
# SQLite reports a page that fails its HMAC, or decrypts to garbage, with one of these words.
_DAMAGE_MARKERS = ("malformed", "not a database", "hmac", "corrupt")


def translate_error(exc: BaseException) -> RestwiseError | None:
    """``exc`` as a Restwise error, or None when it is not ours to translate (a programming
    error: let it propagate with its traceback).

    * Restwise errors are returned as they are;
    * a SQLCipher "database is locked/busy" -> :class:`StoreLockedError`; a page that failed
      its integrity check ("malformed", "not a database", ...) -> :class:`StoreFormatError`
      (integrity-constraint and programming errors are bugs: None);
    * an ``OSError`` -> :class:`FileAccessError` with the file and the OS's reason.
    """
    if isinstance(exc, RestwiseError):
        return exc
    if isinstance(exc, sqlcipher.DatabaseError):
        text = str(exc).lower()
        if isinstance(exc, sqlcipher.OperationalError) and ("locked" in text or "busy" in text):
            return StoreLockedError("the store is busy: another process is writing to it; try again when it is done")
        if isinstance(exc, (sqlcipher.IntegrityError, sqlcipher.ProgrammingError)):
            return None
        if any(marker in text for marker in _DAMAGE_MARKERS):
            return StoreFormatError(
                "the store database is damaged, truncated or was tampered with (a page failed its integrity check)"
            )
        return None
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename else ""
        return FileAccessError(f"{reason}{where}", path=exc.filename, reason=reason)
    return None


__all__ = [
    "RestwiseError", "UsageError", "FileAccessError", "RestwiseDeviceError", "StoreError",
    "StoreNotFoundError", "StoreExistsError", "StoreFormatError", "StoreLockedError", "KeyError_",
    "WrongPassphraseError", "KeySlotError", "KeystoreNotFoundError", "WeakPassphraseError", "ImportFailedError",
    "UnknownFormatError", "MalformedInputError", "ArchiveRefusedError", "NothingImportedError", "ModelError",
    "translate_error",
]
