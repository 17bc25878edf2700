"""The device's errors: the ``RestwiseDeviceError`` branch of the one error tree.

They are defined in :mod:`restwise.common.errors` (whose docstring draws the whole tree with
each class's exit code), because the one mapping step there turns SQLCipher and OS errors
into them. Device code imports them from here; messages never contain personal values or key
material: they name the problem, the file and (where useful) a record position.
"""

from __future__ import annotations

from restwise.common.errors import (
    ArchiveRefusedError,
    ImportFailedError,
    KeyError_,
    KeySlotError,
    KeystoreNotFoundError,
    MalformedInputError,
    NothingImportedError,
    RestwiseDeviceError,
    StoreError,
    StoreExistsError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFoundError,
    UnknownFormatError,
    WeakPassphraseError,
    WrongPassphraseError,
)

__all__ = [
    "RestwiseDeviceError", "StoreError", "StoreNotFoundError", "StoreExistsError", "StoreFormatError",
    "StoreLockedError", "WeakPassphraseError", "KeyError_", "WrongPassphraseError", "KeySlotError",
    "KeystoreNotFoundError", "ImportFailedError", "UnknownFormatError", "MalformedInputError",
    "ArchiveRefusedError", "NothingImportedError",
]
