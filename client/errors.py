"""Errors raised on the device side.

The tree (every class carries an ``exit_code`` the CLI returns, see README "Exit codes")::

    RestwiseDeviceError                 exit 1   anything the device refuses to do
    ├── StoreError                      exit 4   the store cannot be used
    │   ├── StoreNotFoundError          exit 4   no store at the given location
    │   ├── StoreExistsError            exit 4   `init` on a folder that already holds one
    │   ├── StoreFormatError            exit 5   damaged, truncated or tampered store files
    │   └── StoreLockedError            exit 4   another process holds the store
    ├── WeakPassphraseError             exit 2   a new passphrase is too easy to guess
    ├── KeyError_                       exit 3   (see below)
    │   ├── WrongPassphraseError        exit 3   wrong passphrase or not a Restwise store
    │   └── KeySlotError                exit 3   a keystore slot cannot be opened
    │       └── KeystoreNotFoundError   exit 3   the keystore (or its key for this store) is missing
    └── ImportFailedError               exit 6   an import was refused; the store is unchanged
        ├── UnknownFormatError          exit 6   the file's format is not recognised
        ├── MalformedInputError         exit 6   the file is not valid for its format
        │   └── ArchiveRefusedError     exit 6   a zip that lies about its sizes (zip bomb?)
        └── NothingImportedError        exit 9   the import stored nothing (reasons listed)

Messages never contain personal values or key material: they name the problem, the file and
(where useful) a record position, nothing read from inside a record.
"""

from __future__ import annotations


class RestwiseDeviceError(Exception):
    exit_code = 1

    def __init__(self, message: str | None = None):
        super().__init__(message or self.default_message)

    default_message = "the device operation failed"


class StoreError(RestwiseDeviceError):
    exit_code = 4
    default_message = "the store cannot be used"


class StoreNotFoundError(StoreError):
    default_message = "no Restwise store at this location (run `restwise device init` first)"


class StoreExistsError(StoreError):
    default_message = "a Restwise store already exists at this location"


class StoreFormatError(StoreError):
    exit_code = 5
    default_message = "the store files are damaged, truncated or were tampered with"


class StoreLockedError(StoreError):
    default_message = "the store is in use by another process"


class KeyError_(RestwiseDeviceError):  # noqa: N801 - avoid shadowing builtins.KeyError
    exit_code = 3
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
    exit_code = 2
    default_message = "the passphrase is too easy to guess"


class ImportFailedError(RestwiseDeviceError):
    exit_code = 6
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

    exit_code = 9
    default_message = "nothing was imported; the store is unchanged"

    def __init__(self, message: str | None = None, report=None):
        super().__init__(message)
        self.report = report
