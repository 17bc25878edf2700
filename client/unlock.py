"""How a store is opened: one place for the device CLI, `device join` and the ClientApp.

A store has a passphrase slot (what `restwise device init` makes), a keystore slot
(`restwise device keystore add`: the OS keyring, or a 0600 key file), or both. The rules:

1. The ClientApp of a passphrase store joined with `restwise device join` gets the key from
   the join's key agent (:mod:`restwise.client.key_agent`), named in its node config.
2. A passphrase given explicitly (``--passphrase-file``, ``RESTWISE_PASSPHRASE_FILE``,
   ``RESTWISE_PASSPHRASE``) is used when the store has a passphrase slot.
3. Otherwise a keystore slot opens the store when its keystore is there (the file keystore in
   ``--keystore DIR``, default ``STORE/../keystore``; the OS keyring).
4. Otherwise the passphrase is asked for. When a keystore slot exists but its keystore is
   missing, the person is told so before being asked (never silently).

A missing keystore is :class:`~restwise.client.errors.KeystoreNotFoundError` naming what is
missing; it is never reported as a wrong passphrase.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from restwise.client.errors import KeystoreNotFoundError, StoreNotFoundError
from restwise.client.key_agent import request_key
from restwise.client.keys import FileKeystore, KeystoreProvider, read_keyslots
from restwise.client.store import DeviceStore

KEYSTORE_DIR_NAME = "keystore"
FILE_PROVIDER = "file"
KEYRING_PROVIDER = "keyring"


def default_keystore_dir(store: Path) -> Path:
    """The file keystore's default folder: beside the store folder, not inside it (a copy of
    the store folder must not carry its own key)."""
    return Path(store).expanduser().resolve().parent / KEYSTORE_DIR_NAME


def keystore_for(provider: str, keystore_dir: Path | None) -> KeystoreProvider:
    """The keystore object for a slot's provider name."""
    if provider == FILE_PROVIDER:
        if keystore_dir is None:
            raise KeystoreNotFoundError("this store's keystore is a key file: give its folder with --keystore")
        return FileKeystore(keystore_dir)
    if provider == KEYRING_PROVIDER:
        # Imported here, not at the top: `keyring` costs ~0.1 s to import and every ClientApp
        # process (one per Flower message) would pay it for stores that do not use it.
        from restwise.client.os_keyring import KeyringKeystore

        return KeyringKeystore()
    raise KeystoreNotFoundError(
        f"this store's keystore slot is of a kind this Restwise does not know ({provider[:40]!r})"
    )


def open_with_keystore(folder: Path, keystore_dir: Path | None) -> DeviceStore:
    """Open through the store's keystore slot (raises KeystoreNotFoundError without one)."""
    providers = read_keyslots(folder).keystore_providers()
    if not providers:
        raise KeystoreNotFoundError(
            "this store has no keystore slot (add one with `restwise device keystore add`, "
            "or unlock with the passphrase)"
        )
    return DeviceStore.open(folder, keystore=keystore_for(providers[0], keystore_dir))


def open_store(
    folder: Path | str,
    *,
    passphrase: Callable[[], str] | None = None,
    passphrase_given: bool = False,
    keystore_dir: Path | None = None,
    key_agent: Path | None = None,
    on_note: Callable[[str], None] | None = None,
) -> DeviceStore:
    """Open the store in ``folder`` by the rules in the module docstring.

    ``passphrase`` is called only when the passphrase is needed (it may prompt);
    ``passphrase_given`` says the person supplied it explicitly (then it wins over a
    keystore). ``on_note`` receives what the person should be told (a missing keystore)."""
    folder = Path(folder)
    if not DeviceStore.exists(folder):
        raise StoreNotFoundError(f"no Restwise store in {folder} (run `restwise device init`)")
    slots = read_keyslots(folder)
    if key_agent is not None:
        return DeviceStore.open(folder, data_key=request_key(key_agent, slots.store_id))
    has_passphrase = slots.has_kind("passphrase")
    providers = slots.keystore_providers()
    if providers and not (passphrase_given and has_passphrase):
        try:
            return DeviceStore.open(folder, keystore=keystore_for(providers[0], keystore_dir))
        except KeystoreNotFoundError as exc:
            if not has_passphrase or passphrase is None:
                raise
            if on_note is not None:
                on_note(f"{exc}; unlocking with the passphrase instead")
    if has_passphrase and passphrase is not None:
        return DeviceStore.open(folder, passphrase())
    if has_passphrase:
        raise KeystoreNotFoundError("this store is unlocked by its passphrase, and none was given")
    raise KeystoreNotFoundError("this store is unlocked by a keystore, and it was not found")


__all__ = [
    "open_store", "open_with_keystore", "keystore_for", "default_keystore_dir",
    "FILE_PROVIDER", "KEYRING_PROVIDER",
]
