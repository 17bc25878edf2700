"""Key management for the encrypted device store.

The store's data is encrypted by SQLCipher under a random 256-bit *data key*. That key is
never written anywhere in the clear: it is stored only *wrapped* (AES-256-GCM) under one or
more key-encryption keys, each held in a *slot* of the store's ``keyslots.json``:

* ``passphrase`` slot: the key-encryption key is derived from the person's passphrase with
  Argon2id (memory-hard). Its parameters and salt are recorded in the slot so a future
  release can raise them without breaking old stores.
* ``keystore`` slot: the key-encryption key lives in a platform keystore (Android Keystore,
  iOS Keychain, a TPM, the desktop's keyring, ...). :class:`KeystoreProvider` is the plug;
  :class:`KeyringKeystore` keeps the key-encryption key in the OS keyring through the
  ``keyring`` package (Secret Service, KWallet, macOS Keychain, Windows Credential Locker);
  :class:`FileKeystore` keeps it in a 0600 file outside the store folder (simulations, and
  devices without a keyring: whoever can read that file and the store folder opens the store).

Opening the database with the unwrapped raw key avoids SQLCipher's PBKDF2 on every open
(~0.5 ms instead of ~150 ms), while brute-forcing the passphrase costs an Argon2id evaluation
per guess.

The AES-GCM associated data binds every wrapped key to its store id, slot kind and
generation, so a slot copied from another store, or an old slot replayed after ``rekey``,
fails to unwrap instead of silently opening the wrong key.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from restwise.client.errors import (
    KeySlotError,
    KeystoreNotFoundError,
    StoreFormatError,
    WrongPassphraseError,
)
from restwise.common.fsutil import atomic_write_bytes

KEYSLOTS_NAME = "keyslots.json"
KEYSLOTS_VERSION = 1
DATA_KEY_BYTES = 32
# keyslots.json holds a few wrapped keys (well under 4 KiB); anything far larger is not ours.
KEYSLOTS_MAX_BYTES = 1 << 20

# Upper bounds on Argon2id costs. keyslots.json is not authenticated before the KDF runs, so
# whoever can write it chooses the cost of every open: without bounds, a tampered file asks
# for terabytes of memory (OOM) or years of passes (a hang), or overflows the KDF's C types.
# 1 GiB, 64 passes and 64 lanes are far above any sensible phone or laptop setting.
ARGON2_MAX_MEMORY_KIB = 1 << 20
ARGON2_MAX_ITERATIONS = 64
ARGON2_MAX_LANES = 64


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost parameters (RFC 9106). Defaults follow its second recommendation,
    scaled to a phone: 64 MiB, 3 passes, 4 lanes (~0.15 s on one laptop core)."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        for name in ("memory_kib", "iterations", "lanes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Argon2id {name} must be an integer")
        if not (1 <= self.lanes <= ARGON2_MAX_LANES):
            raise ValueError(f"Argon2id lanes must be in 1..{ARGON2_MAX_LANES}")
        if not (1 <= self.iterations <= ARGON2_MAX_ITERATIONS):
            raise ValueError(f"Argon2id iterations must be in 1..{ARGON2_MAX_ITERATIONS}")
        if self.memory_kib > ARGON2_MAX_MEMORY_KIB:
            raise ValueError(f"Argon2id memory_kib must be at most {ARGON2_MAX_MEMORY_KIB}")
        if self.memory_kib < 8 * self.lanes:
            raise ValueError("Argon2id memory_kib must be at least 8 * lanes")

    def derive(self, passphrase: str, salt: bytes) -> bytes:
        kdf = Argon2id(
            salt=salt,
            length=32,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        )
        return kdf.derive(passphrase.encode("utf-8"))


#: Cheap parameters for tests and large simulated federations only. Never the default.
FAST_INSECURE_ARGON2 = Argon2Params(memory_kib=256, iterations=1, lanes=1)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class KeystoreProvider(Protocol):
    """A platform keystore that wraps and unwraps a data key for one store."""

    name: str

    def wrap(self, store_id: str, data_key: bytes, aad: bytes) -> dict: ...

    def unwrap(self, store_id: str, blob: dict, aad: bytes) -> bytes: ...


class FileKeystore:
    """Development/simulation keystore: one random 256-bit key per store in a 0600 file.

    Stands in for a hardware-backed keystore in simulations, where thousands of simulated
    devices must open their stores without typing passphrases. Keep the folder outside the
    store folder, or a copy of the store folder carries its own key.
    """

    name = "file"

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    def _key_path(self, store_id: str) -> Path:
        return self.directory / f"{store_id}.key"

    def _kek(self, store_id: str, create: bool) -> bytes:
        path = self._key_path(store_id)
        if path.exists():
            data = path.read_bytes()
            if len(data) != 32:
                raise KeySlotError(f"keystore key file {path.name} is damaged")
            return data
        if not create:
            raise KeystoreNotFoundError(
                f"the file keystore {self.directory} holds no key for this store "
                "(give the right folder with --keystore, or unlock with the passphrase)"
            )
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(32)
        atomic_write_bytes(path, key, mode=0o600)
        return key

    def wrap(self, store_id: str, data_key: bytes, aad: bytes) -> dict:
        nonce = secrets.token_bytes(12)
        ct = AESGCM(self._kek(store_id, create=True)).encrypt(nonce, data_key, aad)
        return {"provider": self.name, "nonce": _b64(nonce), "wrapped_key": _b64(ct)}

    def unwrap(self, store_id: str, blob: dict, aad: bytes) -> bytes:
        try:
            return AESGCM(self._kek(store_id, create=False)).decrypt(
                _unb64(blob["nonce"]), _unb64(blob["wrapped_key"]), aad
            )
        except (InvalidTag, KeyError, ValueError, TypeError) as exc:
            raise KeySlotError("the keystore key does not open this store") from exc

    def destroy(self, store_id: str) -> None:
        path = self._key_path(store_id)
        if path.exists():
            overwrite_and_unlink(path)


@dataclass
class KeySlots:
    """The content of ``keyslots.json``: wrapped copies of the current data key.

    ``pending`` holds wrapped copies of the *next* data key while a rekey is in flight, so a
    crash between re-encrypting the database and rewriting this file never strands data.
    """

    store_id: str
    generation: int = 1
    slots: list[dict] = field(default_factory=list)
    pending: list[dict] | None = None
    version: int = KEYSLOTS_VERSION

    # -- serialisation ----------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "KeySlots":
        if len(data) > KEYSLOTS_MAX_BYTES:
            raise StoreFormatError("keyslots.json is far larger than any key slot file (damaged store?)")
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreFormatError("keyslots.json is not valid JSON (damaged store?)") from exc
        except RecursionError:
            # Deeply nested arrays/objects: no key slot file looks like that.
            raise StoreFormatError("keyslots.json is nested too deeply to be a key slot file (damaged store?)") from None
        if not isinstance(raw, dict) or raw.get("version") != KEYSLOTS_VERSION:
            raise StoreFormatError(
                f"keyslots.json has unsupported version {raw.get('version') if isinstance(raw, dict) else '?'}"
            )
        try:
            if not isinstance(raw["slots"], list):
                raise TypeError("slots must be a list")
            ks = cls(
                store_id=str(raw["store_id"]),
                generation=int(raw["generation"]),
                slots=list(raw["slots"]),
                pending=raw.get("pending"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreFormatError("keyslots.json is missing required fields") from exc
        try:
            # Always a UUID (see DeviceStore.create). Checked because keystores build file
            # paths from it: a tampered id like "../../x" must not pick which file is read,
            # created or (on erase) overwritten.
            if str(uuid.UUID(ks.store_id)) != ks.store_id:
                raise ValueError
        except ValueError:
            raise StoreFormatError("keyslots.json has a malformed store id") from None
        if not ks.slots:
            raise StoreFormatError("keyslots.json holds no key slots")
        pending_ok = ks.pending is None or (
            isinstance(ks.pending, list) and all(isinstance(s, dict) for s in ks.pending)
        )
        if not all(isinstance(s, dict) for s in ks.slots) or not pending_ok:
            raise StoreFormatError("keyslots.json has a damaged key slot")
        return ks

    # -- slot operations --------------------------------------------------------------
    def _aad(self, kind: str, generation: int) -> bytes:
        return f"restwise-store:{self.store_id}:{kind}:gen{generation}".encode()

    def make_passphrase_slot(
        self, data_key: bytes, passphrase: str, params: Argon2Params, generation: int
    ) -> dict:
        if not passphrase:
            raise ValueError("the passphrase must not be empty")
        salt = secrets.token_bytes(16)
        kek = params.derive(passphrase, salt)
        nonce = secrets.token_bytes(12)
        ct = AESGCM(kek).encrypt(nonce, data_key, self._aad("passphrase", generation))
        return {
            "kind": "passphrase",
            "generation": generation,
            "kdf": {"name": "argon2id", **asdict(params), "salt": _b64(salt)},
            "aead": "AES-256-GCM",
            "nonce": _b64(nonce),
            "wrapped_key": _b64(ct),
        }

    def make_keystore_slot(
        self, data_key: bytes, provider: KeystoreProvider, generation: int
    ) -> dict:
        blob = provider.wrap(self.store_id, data_key, self._aad("keystore", generation))
        return {"kind": "keystore", "generation": generation, "aead": "AES-256-GCM", **blob}

    def _unwrap_slot(
        self,
        slot: dict,
        passphrase: str | None,
        keystore: KeystoreProvider | None,
        generation: int,
    ) -> bytes | None:
        """Unwrap one slot. ``generation`` is the one keyslots.json says the slot must belong
        to (the AAD is bound to it, not to the slot's own, unauthenticated claim)."""
        kind = slot.get("kind")
        try:
            slot_gen = slot.get("generation", generation)
            if isinstance(slot_gen, bool) or not isinstance(slot_gen, int):
                raise TypeError("generation must be an integer")
            if slot_gen != generation:
                return None  # a slot of another key generation (replayed or stale)
            gen = generation
            if kind == "passphrase" and passphrase is not None:
                kdf = slot["kdf"]
                if not isinstance(kdf, dict):
                    raise TypeError("kdf must be an object")
                if kdf.get("name") != "argon2id":
                    raise StoreFormatError("a key slot names an unsupported key derivation")
                params = Argon2Params(
                    memory_kib=int(kdf["memory_kib"]),
                    iterations=int(kdf["iterations"]),
                    lanes=int(kdf["lanes"]),
                )
                kek = params.derive(passphrase, _unb64(kdf["salt"]))
                return AESGCM(kek).decrypt(
                    _unb64(slot["nonce"]), _unb64(slot["wrapped_key"]), self._aad(kind, gen)
                )
            if kind == "keystore" and keystore is not None and slot.get("provider") == keystore.name:
                return keystore.unwrap(self.store_id, slot, self._aad(kind, gen))
        except InvalidTag:
            return None
        except MemoryError:
            raise StoreFormatError(
                "a key slot in keyslots.json asks for more memory than this device has"
            ) from None
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise StoreFormatError("a key slot in keyslots.json is damaged") from exc
        return None

    def unwrap_slot(
        self, slot: dict, passphrase: str | None = None, keystore: KeystoreProvider | None = None
    ) -> bytes | None:
        """Unwrap one current slot with what is given: the key, or None when the given
        passphrase/keystore does not apply to or does not open it (keystore errors raise)."""
        return self._unwrap_slot(slot, passphrase, keystore, self.generation)

    def unwrap(
        self,
        passphrase: str | None = None,
        keystore: KeystoreProvider | None = None,
        *,
        pending: bool = False,
    ) -> bytes:
        """Return the data key (or the pending next key).

        Raises :class:`WrongPassphraseError` when a passphrase was given and opens no slot;
        with a keystore only, :class:`KeystoreNotFoundError` when the store has no slot of
        that keystore or the keystore holds no key for it, :class:`KeySlotError` when its key
        does not open the slot. A keystore problem is never reported as a wrong passphrase.
        """
        slots = (self.pending or []) if pending else self.slots
        generation = self.generation + 1 if pending else self.generation
        keystore_errors: list[KeySlotError] = []
        for slot in slots:
            try:
                key = self._unwrap_slot(slot, passphrase, keystore, generation)
            except KeySlotError as exc:
                keystore_errors.append(exc)
                continue
            if key is not None:
                if len(key) != DATA_KEY_BYTES:
                    raise StoreFormatError("unwrapped data key has the wrong length")
                return key
        if passphrase is not None and not any(s.get("kind") == "passphrase" for s in slots):
            raise KeySlotError(
                "this store has no passphrase: it is opened by its keystore (see `restwise device "
                "status`); give the keystore with --keystore"
            )
        if passphrase is None and keystore is not None:
            if keystore_errors:
                raise keystore_errors[0]
            raise KeystoreNotFoundError(
                f"this store has no {keystore.name} keystore slot "
                "(add one with `restwise device keystore add`, or unlock with the passphrase)"
            )
        raise WrongPassphraseError()

    def has_kind(self, kind: str) -> bool:
        return any(s.get("kind") == kind for s in self.slots)

    def keystore_providers(self) -> list[str]:
        """Names of the keystores holding a slot of the current key (``file``, ``keyring``)."""
        return [str(s.get("provider")) for s in self.slots if s.get("kind") == "keystore"]

    def describe(self) -> list[dict]:
        """What each current slot is, without any key material: kind, keystore provider or
        key-derivation parameters (for `status --verify`)."""
        out = []
        for s in self.slots:
            d = {"kind": s.get("kind"), "generation": s.get("generation", self.generation)}
            if s.get("kind") == "keystore":
                d["provider"] = s.get("provider")
            kdf = s.get("kdf")
            if isinstance(kdf, dict):
                d["kdf"] = {k: kdf.get(k) for k in ("name", "memory_kib", "iterations", "lanes")}
            out.append(d)
        return out


def read_keyslots(folder: Path | str) -> KeySlots:
    """The key slots of the store in ``folder``, without unlocking anything."""
    path = Path(folder) / KEYSLOTS_NAME
    try:
        with open(path, "rb") as fh:
            data = fh.read(KEYSLOTS_MAX_BYTES + 1)
    except FileNotFoundError:
        raise StoreFormatError(f"{path.name} is missing: this is not a complete Restwise store") from None
    return KeySlots.from_bytes(data)


def new_data_key() -> bytes:
    return secrets.token_bytes(DATA_KEY_BYTES)


def overwrite_and_unlink(path: Path) -> None:
    """Overwrite a small file with random bytes, fsync, then unlink it.

    On flash storage an overwrite is not a guarantee (wear levelling may keep old blocks);
    the real guarantee of ``erase`` is cryptographic: the data key exists only wrapped in
    this file, so once every wrapped copy is gone the database is noise.
    """
    try:
        # O_NOFOLLOW: a symlink planted in place of the file is removed, its target untouched.
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            data = secrets.token_bytes(max(os.fstat(fd).st_size, 1))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    path.unlink(missing_ok=True)
