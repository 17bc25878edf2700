"""A keystore in the operating system's keyring, through the ``keyring`` package.

The key-encryption key of a store's ``keystore`` slot (see :mod:`restwise.client.keys`) is a
random 256-bit key kept by the OS keyring (freedesktop Secret Service / GNOME Keyring,
KWallet, macOS Keychain, Windows Credential Locker) under the service ``restwise-store`` and
the store's id. The keyring protects it with the person's login; nothing is written to the
store folder or elsewhere on disk by Restwise.

Fails closed: where ``keyring`` finds no usable backend (a server or container without a
desktop session: its ``fail.Keyring``, or a chain of no backends), every operation raises
:class:`~restwise.client.errors.KeystoreNotFoundError` saying so. Nothing falls back to a
file without the caller choosing it (``restwise device keystore add --backend file``).

Kept apart from :mod:`restwise.client.keys` because importing ``keyring`` costs about 0.1 s,
which every ClientApp process (one per Flower message) would pay even for stores that do
not use it.
"""

from __future__ import annotations

import base64
import binascii
import secrets

import keyring
import keyring.errors
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from keyring.backends import fail as keyring_fail

from restwise.client.errors import KeySlotError, KeystoreNotFoundError

SERVICE = "restwise-store"
NAME = "keyring"


def keyring_problem() -> str | None:
    """None when the OS keyring is usable here; otherwise why not (one sentence)."""
    try:
        backend = keyring.get_keyring()
    except Exception as exc:  # a broken keyring configuration must not crash, but refuse
        return f"the keyring package could not load a backend ({type(exc).__name__})"
    if isinstance(backend, keyring_fail.Keyring):
        return (
            "no OS keyring is available on this system (the keyring package found no Secret "
            "Service, KWallet, macOS Keychain or Windows Credential Locker)"
        )
    if getattr(backend, "backends", None) == [] or getattr(backend, "priority", 1) <= 0:
        return "the OS keyring backend available here is not usable (priority 0)"
    return None


def backend_name() -> str:
    backend = keyring.get_keyring()
    return f"{type(backend).__module__}.{type(backend).__name__}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class KeyringKeystore:
    """:class:`~restwise.client.keys.KeystoreProvider` backed by the OS keyring."""

    name = NAME

    def __init__(self, service: str = SERVICE):
        self.service = service

    def _require_backend(self) -> None:
        problem = keyring_problem()
        if problem is not None:
            raise KeystoreNotFoundError(problem)

    def _kek(self, store_id: str, create: bool) -> bytes:
        self._require_backend()
        try:
            stored = keyring.get_password(self.service, store_id)
        except keyring.errors.KeyringError as exc:
            raise KeySlotError(f"the OS keyring refused to read ({type(exc).__name__}; is it locked?)") from None
        if stored is not None:
            try:
                kek = _unb64(stored)
            except (binascii.Error, ValueError):
                kek = b""
            if len(kek) != 32:
                raise KeySlotError("the OS keyring's entry for this store is damaged")
            return kek
        if not create:
            raise KeystoreNotFoundError(
                "the OS keyring holds no key for this store (was it added on another account "
                "or machine?); unlock with the passphrase"
            )
        kek = secrets.token_bytes(32)
        try:
            keyring.set_password(self.service, store_id, _b64(kek))
        except keyring.errors.KeyringError as exc:
            raise KeySlotError(f"the OS keyring refused to store the key ({type(exc).__name__})") from None
        return kek

    def wrap(self, store_id: str, data_key: bytes, aad: bytes) -> dict:
        nonce = secrets.token_bytes(12)
        ct = AESGCM(self._kek(store_id, create=True)).encrypt(nonce, data_key, aad)
        return {"provider": self.name, "nonce": _b64(nonce), "wrapped_key": _b64(ct)}

    def unwrap(self, store_id: str, blob: dict, aad: bytes) -> bytes:
        kek = self._kek(store_id, create=False)
        try:
            return AESGCM(kek).decrypt(_unb64(blob["nonce"]), _unb64(blob["wrapped_key"]), aad)
        except (InvalidTag, KeyError, ValueError, TypeError) as exc:
            raise KeySlotError("the OS keyring's key does not open this store") from exc

    def destroy(self, store_id: str) -> None:
        self._require_backend()
        try:
            keyring.delete_password(self.service, store_id)
        except keyring.errors.PasswordDeleteError:
            pass  # nothing stored: nothing to destroy
        except keyring.errors.KeyringError as exc:
            raise KeySlotError(f"the OS keyring refused to delete the key ({type(exc).__name__})") from None


__all__ = ["KeyringKeystore", "keyring_problem", "backend_name", "SERVICE", "NAME"]
