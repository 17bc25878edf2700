"""Errors raised on the device side.

The tree (every class carries an ``exit_code`` the CLI returns, see README "Exit codes")::

    RestwiseDeviceError                 exit 1   anything the device refuses to do
    ├── StoreError                      exit 4   the store cannot be used
    │   ├── StoreNotFoundError          exit 4   no store at the given location
    │   ├── StoreExistsError            exit 4   `init` on a folder that already holds one
    │   ├── StoreFormatError            exit 5   damaged, truncated or tampered store files
    │   └── StoreLockedError            exit 4   another process holds the store
    ├── KeyError_                       exit 3   (see below)
    │   ├── WrongPassphraseError        exit 3   wrong passphrase or not a Restwise store
    │   └── KeySlotError                exit 3   a keystore slot cannot be opened
    └── ImportFailedError               exit 6   an import was refused; the store is unchanged
        ├── UnknownFormatError          exit 6   the file's format is not recognised
        └── MalformedInputError         exit 6   the file is not valid for its format

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


class ImportFailedError(RestwiseDeviceError):
    exit_code = 6
    default_message = "the import failed; the store is unchanged"


class UnknownFormatError(ImportFailedError):
    default_message = "the file's format is not recognised"


class MalformedInputError(ImportFailedError):
    default_message = "the file is not valid for its format"
