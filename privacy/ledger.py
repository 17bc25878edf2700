"""The privacy ledger: append-only, hash-chained, Ed25519-signed JSON lines.

Each line is one entry, written as canonical JSON (sorted keys, no spaces, ASCII)::

    {"seq": 1, "prev_hash": "00..00", "timestamp": "...Z", "kind": "gaussian_round",
     "payload": {...event...}, "hash": "<sha256>", "signature": "<ed25519 hex or null>"}

* ``hash`` = SHA-256 of the canonical JSON of ``{seq, prev_hash, timestamp, kind, payload}``;
  ``prev_hash`` is the previous entry's hash (64 zeros for the first), so changing, removing or
  reordering any entry breaks every later link.
* ``signature`` = Ed25519 over ``b"restwise-ledger-v1\\n" + hash`` (the hex digest, ASCII) with
  the server's audit key. A verifier pins the server's public key.
* Verification also requires every line to be byte-for-byte the canonical serialisation of
  what it parses to, so no byte of the file can change without detection.

Durability: an append takes an exclusive ``flock``, re-reads the tail if another process
appended, writes the whole line with one ``write`` on an ``O_APPEND`` descriptor and
``fsync``s before returning. So an append that returned is on disk, and a crash can at worst
leave one incomplete last line, which the next writer detects, moves aside to
``<ledger>.torn-<n>`` and truncates (the append it belonged to never returned, so its caller
retries). Releases are idempotent on ``(run_id, round, attempt)``: appending the same release
again returns the existing entry, appending a *different* release under the same key raises
:class:`LedgerConflictError`. The verifier never repairs: a torn line fails verification.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from restwise.common.fsutil import fsync_dir
from restwise.privacy.errors import (
    EventError,
    KeyFileError,
    LedgerConflictError,
    LedgerCorruptError,
    LedgerError,
)
from restwise.privacy.events import GaussianRoundEvent, event_from_dict, utc_now

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
SIGNATURE_DOMAIN = b"restwise-ledger-v1\n"
_SIG_RE = re.compile(r"^[0-9a-f]{128}$")
ENTRY_FIELDS = ("seq", "prev_hash", "timestamp", "kind", "payload", "hash", "signature")


def canonical_json(value: Any) -> str:
    """The one serialisation hashed and written: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_hash(seq: int, prev_hash: str, timestamp: str, kind: str, payload: dict) -> str:
    body = {"seq": seq, "prev_hash": prev_hash, "timestamp": timestamp, "kind": kind, "payload": payload}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    prev_hash: str
    timestamp: str
    kind: str
    payload: dict
    hash: str
    signature: str | None

    @property
    def event(self):
        return event_from_dict(self.payload)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ENTRY_FIELDS}

    def line(self) -> bytes:
        return (canonical_json(self.to_dict()) + "\n").encode("ascii")


@dataclass(frozen=True)
class LedgerVerification:
    entries: int
    head_seq: int
    head_hash: str
    head_signature: str | None
    signed: bool  # every entry's signature checked against the given public key


# --- keys ------------------------------------------------------------------------------------
def generate_audit_key(path: str | os.PathLike):
    """Create the server's Ed25519 audit key as PKCS#8 PEM, mode 0600. Refuses to overwrite."""

    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite an audit key") from None
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return key


def load_audit_key(path: str | os.PathLike):
    """Load the server's Ed25519 audit key; refuses files readable by group or others."""

    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"no audit key at {path}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the audit key {path}: {exc.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise KeyFileError(f"the audit key {path} is readable by other users; run `chmod 600 {path}`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def load_or_create_audit_key(path: str | os.PathLike):
    path = Path(path)
    return load_audit_key(path) if path.exists() else generate_audit_key(path)


def public_key_pem(key) -> bytes:
    """PEM (SubjectPublicKeyInfo) of a private or public Ed25519 key."""

    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def export_public_key(key, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_bytes(public_key_pem(key))
    return path


def load_public_key(source: str | os.PathLike | bytes):
    """An Ed25519 public key from PEM bytes or a PEM file."""

    if isinstance(source, bytes):
        data, name = source, "the given key"
    else:
        try:
            data, name = Path(source).read_bytes(), str(source)
        except OSError as exc:
            raise KeyFileError(f"cannot read the public key {source}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError(f"{name} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{name} is not an Ed25519 public key")
    return key


def key_fingerprint(key) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key."""

    public = key.public_key() if hasattr(key, "public_key") else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def public_key_hex(key) -> str:
    """The raw 32-byte Ed25519 public key as 64 lowercase hex digits (what a run announces
    to its devices, who pin it)."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_key_from_hex(text: str):
    """An Ed25519 public key from :func:`public_key_hex`'s form (KeyFileError otherwise)."""
    if not (isinstance(text, str) and re.fullmatch(r"[0-9a-f]{64}", text)):
        raise KeyFileError("a public key must be 64 lowercase hex digits (32 raw bytes)")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` fully (one write in practice; loop on short writes)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --- parsing and verification -------------------------------------------------------------
def _parse_line(raw: bytes, lineno: int, prev: LedgerEntry | None,
                after: tuple[int, str] | None = None) -> LedgerEntry:
    """One line, checked against the entry before it (``prev``), or - for the first line of
    a segment - against ``after`` = (seq, hash) of the entry the segment continues."""
    try:
        text = raw.decode("ascii")
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise LedgerCorruptError("not valid JSON", line=lineno) from None
    if not isinstance(data, dict) or set(data) != set(ENTRY_FIELDS):
        raise LedgerCorruptError(f"an entry must have exactly the fields {', '.join(ENTRY_FIELDS)}", line=lineno)
    try:
        canonical = canonical_json(data)
    except ValueError:
        raise LedgerCorruptError("not canonical JSON", line=lineno) from None
    if canonical != text:
        raise LedgerCorruptError("not in canonical form (the bytes were altered)", line=lineno)
    seq, prev_hash, kind, payload = data["seq"], data["prev_hash"], data["kind"], data["payload"]
    before_seq, before_hash = (prev.seq, prev.hash) if prev is not None else (after or (0, GENESIS_HASH))
    expected_seq = before_seq + 1
    if seq != expected_seq or isinstance(seq, bool):
        raise LedgerCorruptError(f"seq is {seq!r}, expected {expected_seq}", line=lineno)
    expected_prev = before_hash
    if prev_hash != expected_prev:
        raise LedgerCorruptError("prev_hash does not match the previous entry's hash (chain broken)", line=lineno)
    if not isinstance(data["timestamp"], str) or not isinstance(kind, str) or not isinstance(payload, dict):
        raise LedgerCorruptError("timestamp, kind or payload has the wrong type", line=lineno)
    if data["hash"] != entry_hash(seq, prev_hash, data["timestamp"], kind, payload):
        raise LedgerCorruptError("hash does not match the entry's content", line=lineno)
    if payload.get("kind") != kind:
        raise LedgerCorruptError("kind does not match the payload's kind", line=lineno)
    try:
        event_from_dict(payload)
    except EventError as exc:
        raise LedgerCorruptError(f"payload is not a valid event: {exc}", line=lineno) from None
    sig = data["signature"]
    if sig is not None and not (isinstance(sig, str) and _SIG_RE.match(sig)):
        raise LedgerCorruptError("signature is not 64 bytes of lowercase hex", line=lineno)
    return LedgerEntry(seq, prev_hash, data["timestamp"], kind, payload, data["hash"], sig)


def _split(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (without newline) and the trailing incomplete segment."""
    complete, _, tail = data.rpartition(b"\n")
    lines = complete.split(b"\n") if complete else []
    if not complete and data.endswith(b"\n"):
        lines = [b""]
    return lines, tail


def parse_ledger_bytes(data: bytes) -> list[LedgerEntry]:
    """Parse and check the chain of a whole ledger (no signatures, no repair)."""
    lines, tail = _split(data)
    if tail:
        raise LedgerCorruptError("the last line is incomplete (torn write or truncated file)", line=len(lines) + 1)
    entries: list[LedgerEntry] = []
    seen: set[tuple] = set()
    for i, raw in enumerate(lines, start=1):
        entry = _parse_line(raw, i, entries[-1] if entries else None)
        if entry.kind == GaussianRoundEvent.kind:
            key = entry.event.idempotency_key
            if key in seen:
                raise LedgerCorruptError(f"duplicate release for run {key[0]!r} round {key[1]} attempt {key[2]}", line=i)
            seen.add(key)
        entries.append(entry)
    return entries


def parse_ledger_segment(data: bytes, *, after_seq: int = 0, after_hash: str = GENESIS_HASH) -> list[LedgerEntry]:
    """Parse and check the chain of consecutive entries that continue the entry
    (``after_seq``, ``after_hash``) (the whole ledger: 0 and the genesis hash). Each line must
    be canonical, hash-correct and linked; ``LedgerCorruptError.line`` is the entry's seq."""
    lines, tail = _split(data)
    if tail:
        raise LedgerCorruptError("the last line is incomplete", line=after_seq + len(lines) + 1)
    entries: list[LedgerEntry] = []
    for i, raw in enumerate(lines, start=after_seq + 1):
        entries.append(_parse_line(raw, i, entries[-1] if entries else None, (after_seq, after_hash)))
    return entries


def verify_signatures(entries: list[LedgerEntry], public_key) -> None:
    """Every entry signed, and its signature valid under ``public_key`` (LedgerCorruptError
    naming the first that is not)."""
    for entry in entries:
        if entry.signature is None:
            raise LedgerCorruptError("entry is not signed", line=entry.seq)
        try:
            public_key.verify(bytes.fromhex(entry.signature), SIGNATURE_DOMAIN + entry.hash.encode("ascii"))
        except (InvalidSignature, ValueError):
            raise LedgerCorruptError("signature does not verify with the given public key", line=entry.seq) from None


def verify_ledger_file(path: str | os.PathLike, public_key=None) -> tuple[list[LedgerEntry], LedgerVerification]:
    """Read-only verification of a ledger file: format, chain, hashes and (with a key) every
    signature. Never repairs anything. Raises LedgerCorruptError with the line at fault."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger {path}: {exc.strerror}") from None
    entries = parse_ledger_bytes(data)
    if public_key is not None:
        verify_signatures(entries, public_key)
    head = entries[-1] if entries else None
    return entries, LedgerVerification(
        entries=len(entries),
        head_seq=head.seq if head else 0,
        head_hash=head.hash if head else GENESIS_HASH,
        head_signature=head.signature if head else None,
        signed=public_key is not None,
    )


# --- the ledger ------------------------------------------------------------------------------
class PrivacyLedger:
    """Append-only signed ledger at ``path`` (created on first append).

    ``signing_key`` (an Ed25519PrivateKey) signs every new entry; without it entries are
    unsigned (tests, or a ledger kept only for local planning). Safe to share between
    processes: appends are serialised with ``flock``.
    """

    def __init__(self, path: str | os.PathLike, signing_key=None):
        self.path = Path(path)
        self.signing_key = signing_key
        self.repairs: list[Path] = []  # torn tails moved aside by this object
        self._cache_size = -1
        self._cache: list[LedgerEntry] = []

    # reading
    def _load_locked(self, fd: int, *, repair: bool) -> list[LedgerEntry]:
        size = os.fstat(fd).st_size
        if size == self._cache_size:
            return self._cache
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        lines, tail = _split(data)
        if lines and b"\x00" in lines[-1] and not tail:
            # Zero-filled last line after a power loss: as torn as a missing newline.
            tail = lines.pop() + b"\n"
        if tail:
            if not repair:
                raise LedgerCorruptError("the last line is incomplete (torn write)", line=len(lines) + 1)
            good = len(data) - len(tail)
            self._move_aside(tail)
            os.ftruncate(fd, good)
            os.fsync(fd)
            data = data[:good]
            log.warning("privacy ledger %s: removed an incomplete last line left by a crash", self.path)
        entries = parse_ledger_bytes(data)
        self._cache, self._cache_size = entries, len(data)
        return entries

    def _move_aside(self, tail: bytes) -> None:
        n = 1
        while (target := self.path.with_name(f"{self.path.name}.torn-{n}")).exists():
            n += 1
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, tail)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.repairs.append(target)

    def entries(self) -> list[LedgerEntry]:
        """All entries (checked: format, chain, hashes). Repairs a torn tail left by a crash."""
        if not self.path.exists():
            return []
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return list(self._load_locked(fd, repair=True))
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.entries())

    def events(self) -> list:
        return [e.event for e in self.entries()]

    def releases(self, run_id: str | None = None) -> list[GaussianRoundEvent]:
        """Release events in ledger order (of one run, or all)."""
        out = []
        for entry in self.entries():
            if entry.kind == GaussianRoundEvent.kind:
                ev = entry.event
                if run_id is None or ev.run_id == run_id:
                    out.append(ev)
        return out

    def head(self) -> LedgerEntry | None:
        entries = self.entries()
        return entries[-1] if entries else None

    def verify(self, public_key) -> LedgerVerification:
        """Check format, chain, hashes and every signature against ``public_key``."""
        if not self.path.exists():
            raise LedgerError(f"no ledger at {self.path}")
        self.entries()  # repair a torn tail first (a writer's job); then verify read-only
        return verify_ledger_file(self.path, public_key)[1]

    # writing
    def append(self, event) -> LedgerEntry:
        """Append ``event`` durably and return its entry (or the existing one for a repeated
        release, see module docstring)."""
        payload = event.to_dict()
        canonical_json(payload)  # refuse NaN/inf before taking the lock
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if created:
                fsync_dir(self.path.parent)
            entries = self._load_locked(fd, repair=True)
            if isinstance(event, GaussianRoundEvent):
                existing = self._find_release(entries, event)
                if existing is not None:
                    return existing
            prev = entries[-1] if entries else None
            seq = 1 if prev is None else prev.seq + 1
            prev_hash = GENESIS_HASH if prev is None else prev.hash
            timestamp = utc_now()
            digest = entry_hash(seq, prev_hash, timestamp, event.kind, payload)
            signature = None
            if self.signing_key is not None:
                signature = self.signing_key.sign(SIGNATURE_DOMAIN + digest.encode("ascii")).hex()
            entry = LedgerEntry(seq, prev_hash, timestamp, event.kind, payload, digest, signature)
            line = entry.line()
            _write_all(fd, line)
            os.fsync(fd)
            self._cache = entries + [entry]
            self._cache_size += len(line)
            return entry
        finally:
            os.close(fd)

    @staticmethod
    def _find_release(entries: list[LedgerEntry], event: GaussianRoundEvent) -> LedgerEntry | None:
        key = event.idempotency_key
        new = event.to_dict()
        for entry in entries:
            if entry.kind != GaussianRoundEvent.kind:
                continue
            old = entry.payload
            if (old["run_id"], old["round"], old.get("attempt", 0)) != key:
                continue
            differing = tuple(sorted(k for k in set(old) | set(new) if k != "timestamp" and old.get(k) != new.get(k)))
            if differing:
                raise LedgerConflictError(
                    f"run {key[0]!r} round {key[1]} attempt {key[2]} is already recorded with different "
                    f"{', '.join(differing)}; a re-run of a round is a new release: record it with attempt={key[2] + 1}",
                    key=key,
                    fields=differing,
                )
            return entry
        return None

    def copy_to(self, dest: str | os.PathLike, *, upto_seq: int | None = None) -> Path:
        """Copy the ledger's bytes up to and including entry ``upto_seq`` (default: all)."""
        dest = Path(dest)
        entries = self.entries()
        if upto_seq is not None:
            entries = [e for e in entries if e.seq <= upto_seq]
        dest.write_bytes(b"".join(e.line() for e in entries))
        return dest
