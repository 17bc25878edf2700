"""The encrypted device store: one folder holding a SQLCipher 4 database and its key slots.

Layout of a store folder::

    <store>/restwise.db      SQLCipher 4 database (AES-256, HMAC-SHA512 per page, WAL mode)
    <store>/keyslots.json    the data key, wrapped under the passphrase and/or a keystore

The database is opened with the raw 256-bit data key (no PBKDF2 on every open). See
:mod:`restwise.client.keys` for how that key is wrapped.

Crash safety:

* every write is a transaction (WAL), so ``kill -9`` mid-import leaves the pre-import state;
* ``keyslots.json`` is only ever replaced atomically;
* ``rekey`` copies the database under the new key into a temporary file
  (``sqlcipher_export``), records the new key as *pending* in the key slots, swaps the files
  atomically, then promotes the pending key. Opening a store finishes or rolls back an
  interrupted rekey, so the store is always readable with exactly one of the two keys. (This
  replaces ``PRAGMA rekey``, which rewrites pages in place and cannot be made atomic together
  with the key-slot file.)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import json
import os
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sqlcipher3 import dbapi2 as sqlcipher

from restwise.client.errors import (
    KeySlotError,
    StoreExistsError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFoundError,
    WrongPassphraseError,
)
from restwise.common.errors import translate_error
from restwise.common.fsutil import atomic_write_bytes, fsync_dir
from restwise.client.keys import (
    KEYSLOTS_NAME,
    Argon2Params,
    KeySlots,
    KeystoreProvider,
    overwrite_and_unlink,
    new_data_key,
    read_keyslots,
)
from restwise.models.metrics import CHECKIN_FIELDS, METRICS

DB_NAME = "restwise.db"
REKEY_TMP_NAME = "restwise.db.rekey-tmp"

SCHEMA_VERSION = 3

# Kinds of training load, never added together (different units and physiology):
# session-RPE load (Foster: CR-10 RPE x minutes, arbitrary units) and heart-rate load
# (TRIMP from heart-rate zones or a device's own heart-rate-based load).
SRPE_LOAD = "srpe"
HR_LOAD = "hr"
LOAD_KINDS = (SRPE_LOAD, HR_LOAD)
CACHE_KIB = -32768  # 32 MiB page cache: fewer evictions = fewer page re-encryptions

# Migrations: index i upgrades user_version i -> i+1. Append only; never edit a released one.
MIGRATIONS: list[str] = [
    # 0 -> 1: initial schema
    """
    CREATE TABLE observations (
        id            INTEGER PRIMARY KEY,
        metric        TEXT    NOT NULL,
        ts            INTEGER NOT NULL,          -- UTC epoch seconds
        end_ts        INTEGER,                   -- UTC epoch seconds, interval records only
        tz_offset_min INTEGER NOT NULL DEFAULT 0, -- the person's UTC offset at ts
        local_day     TEXT    NOT NULL,          -- YYYY-MM-DD in the person's local time
        value         REAL    NOT NULL,
        unit          TEXT    NOT NULL,
        source        TEXT    NOT NULL,          -- importer name, e.g. 'apple_health'
        device        TEXT,                      -- device or app that measured it
        record_key    BLOB    NOT NULL           -- identity of the source record (idempotency)
    );
    -- Idempotency index led by time: imports arrive roughly in time order, so inserts append
    -- near the right edge of the b-tree instead of touching random pages (random keys would
    -- re-encrypt a scattered page per insert once the store outgrows the page cache).
    CREATE UNIQUE INDEX observations_identity ON observations(ts, record_key);
    -- covering (value included): a range read of one metric touches index pages only
    CREATE INDEX observations_metric_ts ON observations(metric, ts, value);

    CREATE TABLE checkins (
        day           TEXT PRIMARY KEY,          -- local day the answers are about
        readiness     REAL, fatigue REAL, soreness REAL, stress REAL, mood REAL,
        sleep_quality REAL, sleep_hours REAL,
        source        TEXT    NOT NULL,
        is_override   INTEGER NOT NULL DEFAULT 0, -- 1: the person corrected the coach
        updated_at    INTEGER NOT NULL
    );

    CREATE TABLE sessions (
        id          INTEGER PRIMARY KEY,
        day         TEXT    NOT NULL,
        start_ts    INTEGER,
        minutes     REAL    NOT NULL,
        rpe         REAL,
        load        REAL    NOT NULL,            -- sRPE x minutes, or device load
        kind        TEXT,
        source      TEXT    NOT NULL,
        record_key  BLOB    NOT NULL UNIQUE
    );
    CREATE INDEX sessions_day ON sessions(day);

    CREATE TABLE model_state (
        name        TEXT PRIMARY KEY,
        version     INTEGER NOT NULL,
        blob        BLOB    NOT NULL,
        meta        TEXT    NOT NULL,
        updated_at  INTEGER NOT NULL
    );

    CREATE TABLE egress_log (                    -- what this device sent, and where
        id           INTEGER PRIMARY KEY,
        ts           INTEGER NOT NULL,
        run_id       TEXT    NOT NULL,
        round        INTEGER,
        message_type TEXT    NOT NULL,
        records      TEXT    NOT NULL,           -- JSON list of record names and sizes
        n_bytes      INTEGER NOT NULL,
        sha256       TEXT    NOT NULL
    );

    CREATE TABLE consent (
        scope       TEXT PRIMARY KEY,            -- '*' (all training) or a run id
        allowed     INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    );

    CREATE TABLE imports (
        id            INTEGER PRIMARY KEY,
        started_at    INTEGER NOT NULL,
        finished_at   INTEGER NOT NULL,
        format        TEXT    NOT NULL,
        source_name   TEXT    NOT NULL,
        inserted      INTEGER NOT NULL,
        duplicates    INTEGER NOT NULL,
        skipped       INTEGER NOT NULL,
        summary       TEXT    NOT NULL
    );

    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 1 -> 2: the kind of each session's load (session-RPE or heart-rate load), so the two are
    # kept as separate series. Sessions without an RPE from the wearable importers carried a
    # heart-rate TRIMP (Fitbit) or the device's heart-rate load (Garmin).
    """
    ALTER TABLE sessions ADD COLUMN load_kind TEXT NOT NULL DEFAULT 'srpe';
    UPDATE sessions SET load_kind = 'hr' WHERE rpe IS NULL AND source IN ('fitbit', 'garmin_fit');
    """,
    # 2 -> 3: device receipts and the device's own privacy budget (issue 15,
    # client/receipts_store.py): the ledger key pinned per run, the run's signed ledger entries
    # as received, what this device spent (pending until its receipt), and tamper alarms.
    """
    CREATE TABLE IF NOT EXISTS run_keys (
        run_id      TEXT PRIMARY KEY,
        public_key  TEXT    NOT NULL,            -- raw Ed25519 public key, hex
        pinned_at   INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS ledger_entries (
        run_id      TEXT    NOT NULL,
        seq         INTEGER NOT NULL,
        kind        TEXT    NOT NULL,
        line        TEXT    NOT NULL,            -- the canonical, signed ledger line
        received_at INTEGER NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE IF NOT EXISTS spends (
        run_id      TEXT    NOT NULL,
        round       INTEGER NOT NULL,
        attempt     INTEGER NOT NULL,
        noise_multiplier REAL NOT NULL,          -- z at the round's worst case
        sensitivity REAL    NOT NULL,
        delta       REAL    NOT NULL,
        adjacency   TEXT    NOT NULL,
        recorded_at INTEGER NOT NULL,
        receipt_seq INTEGER,                     -- NULL: pending (no receipt yet)
        PRIMARY KEY (run_id, round, attempt)
    );
    CREATE TABLE IF NOT EXISTS run_alarms (
        id          INTEGER PRIMARY KEY,
        run_id      TEXT    NOT NULL,
        ts          INTEGER NOT NULL,
        reason      TEXT    NOT NULL             -- what failed (seq, kind, field): never a value
    );
    """,
]


class Observation(NamedTuple):
    """One measurement. ``ts``/``end_ts`` are UTC epoch seconds; ``tz_offset_min`` is the
    person's UTC offset then, so ``local_day`` is their local calendar day.

    A NamedTuple rather than a frozen dataclass: imports build millions of these, and a
    tuple is immutable too but about 5x cheaper to construct.
    """

    metric: str
    ts: int
    value: float
    unit: str
    source: str
    record_key: bytes
    end_ts: int | None = None
    tz_offset_min: int = 0
    device: str | None = None

    @property
    def local_day(self) -> str:
        return local_day(self.ts, self.tz_offset_min)


@dataclass(frozen=True, slots=True)
class Session:
    """One training session and its load: minutes x RPE (CR-10) (Foster's session-RPE,
    ``load_kind`` ``srpe``), or a heart-rate load (TRIMP, ``load_kind`` ``hr``)."""

    day: str
    minutes: float
    load: float
    source: str
    record_key: bytes
    rpe: float | None = None
    start_ts: int | None = None
    kind: str | None = None
    load_kind: str = SRPE_LOAD


_EPOCH_DAY = dt.date(1970, 1, 1)


@functools.lru_cache(maxsize=8192)
def _iso_day(day_index: int) -> str:
    return (_EPOCH_DAY + dt.timedelta(days=day_index)).isoformat()


def local_day(ts: int, tz_offset_min: int = 0) -> str:
    """The person's local calendar day (YYYY-MM-DD) of a UTC timestamp. Hot path of every
    import, hence integer arithmetic and a cache instead of datetime formatting."""
    return _iso_day((int(ts) + tz_offset_min * 60) // 86400)


def record_key(*parts: object) -> bytes:
    """Stable 16-byte identity of a source record, for idempotent re-imports."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\x1f")
    return h.digest()


@dataclass(frozen=True)
class InsertResult:
    inserted: int
    duplicates: int


def connect_raw(path: Path, key: bytes) -> sqlcipher.Connection:
    conn = sqlcipher.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
    # Silence SQLCipher's own stderr logging (it would print on a wrong key).
    conn.execute("PRAGMA cipher_log_level = NONE")
    conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    return conn


def _create_private_file(path: Path) -> None:
    """Create an empty 0600 file for SQLite to fill. SQLite creates a missing database with
    0644 & ~umask and gives its -wal/-shm files the database's mode, so creating the file
    first keeps the whole store private to its owner, whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.close(fd)


def _lock_folder(folder: Path, *, exclusive: bool = False) -> int:
    """An advisory ``flock`` on the store folder, held while a DeviceStore is open.

    Every open store holds it shared; ``rekey`` and ``erase`` need it exclusive, because
    they replace or delete the database files under any other open connection (whose later
    writes would go to a deleted file and be silently lost). Never waits: a conflict is
    StoreLockedError at once."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(
            "the store is in use by another process (or another open handle): close it first"
        ) from None
    return fd


def _make_exclusive(fd: int) -> None:
    """Upgrade a held shared folder lock to exclusive, or raise StoreLockedError keeping it
    shared (flock drops the old lock before trying the new one, so take it back)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        raise StoreLockedError(
            "the store is in use by another process (or another open handle): close it first"
        ) from None


def tune_connection(conn) -> None:
    """Connection settings shared by the store and the plain-sqlite3 benchmark baseline."""
    conn.execute(f"PRAGMA cache_size = {CACHE_KIB}")
    # Sorts and temporary indices stay in memory: no temporary file can hold plaintext.
    conn.execute("PRAGMA temp_store = MEMORY")
    # WAL + NORMAL: a killed process loses nothing committed; a power cut may lose the last
    # transactions but never corrupts the file.
    conn.execute("PRAGMA synchronous = NORMAL")


@contextlib.contextmanager
def _damage_is_format_error() -> Iterator[None]:
    """A page that fails its HMAC or decrypts to garbage surfaces as SQLite's 'malformed' or
    'not a database'; a write lock held past the busy timeout as 'locked'. Name them as what
    they are for the person (restwise.common.errors.translate_error, the one mapping step)."""
    try:
        yield
    except sqlcipher.DatabaseError as exc:
        mapped = translate_error(exc)
        if mapped is None:
            raise  # a programming error: keep its traceback
        raise mapped from None


def _guarded(fn):
    """Method decorator: database damage found while running ``fn`` -> StoreFormatError."""

    def wrapper(*args, **kwargs):
        with _damage_is_format_error():
            return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


def probe_database(conn: sqlcipher.Connection) -> None:
    """First read: fails with 'file is not a database' under a wrong key or on tampering."""
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()


class DeviceStore:
    """An open, unlocked device store. Use :meth:`create` / :meth:`open`; close when done."""

    def __init__(
        self,
        folder: Path,
        conn: sqlcipher.Connection,
        slots: KeySlots,
        key: bytes,
        lock_fd: int | None = None,
    ):
        self.folder = folder
        self._conn = conn
        self._slots = slots
        self._key = key
        self._lock_fd = lock_fd  # shared flock on the folder (see _lock_folder)

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def exists(folder: Path | str) -> bool:
        folder = Path(folder)
        return (folder / KEYSLOTS_NAME).is_file() and (folder / DB_NAME).is_file()

    @classmethod
    def create(
        cls,
        folder: Path | str,
        passphrase: str | None = None,
        *,
        keystore: KeystoreProvider | None = None,
        argon2: Argon2Params | None = None,
    ) -> "DeviceStore":
        """Create a new store. At least one of ``passphrase`` / ``keystore`` is required."""
        folder = Path(folder)
        if passphrase is None and keystore is None:
            raise ValueError("a new store needs a passphrase or a keystore")
        if (folder / KEYSLOTS_NAME).exists() or (folder / DB_NAME).exists():
            raise StoreExistsError(f"a Restwise store already exists in {folder}")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not any(folder.iterdir()):
            # An existing empty folder keeps its (maybe group/world-readable) mode otherwise.
            os.chmod(folder, 0o700)
        lock_fd = _lock_folder(folder)
        try:
            return cls._create_locked(folder, passphrase, keystore, argon2, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _create_locked(cls, folder, passphrase, keystore, argon2, lock_fd) -> "DeviceStore":
        key = new_data_key()
        slots = KeySlots(store_id=str(uuid.uuid4()), generation=1)
        if passphrase is not None:
            slots.slots.append(
                slots.make_passphrase_slot(key, passphrase, argon2 or Argon2Params(), 1)
            )
        if keystore is not None:
            slots.slots.append(slots.make_keystore_slot(key, keystore, 1))
        # Database first, key slots last: a crash in between leaves no keyslots.json, so the
        # folder is not a store and `init` can simply run again.
        _create_private_file(folder / DB_NAME)
        conn = connect_raw(folder / DB_NAME, key)
        tune_connection(conn)
        conn.execute("PRAGMA journal_mode = WAL")
        store = cls(folder, conn, slots, key, lock_fd)
        store._migrate()
        with store.transaction() as c:
            c.execute("INSERT INTO meta(key, value) VALUES ('store_id', ?)", (slots.store_id,))
            c.execute(
                "INSERT INTO meta(key, value) VALUES ('created_at', ?)", (str(int(time.time())),)
            )
        atomic_write_bytes(folder / KEYSLOTS_NAME, slots.to_bytes())
        return store

    @classmethod
    def open(
        cls,
        folder: Path | str,
        passphrase: str | None = None,
        *,
        keystore: KeystoreProvider | None = None,
        data_key: bytes | None = None,
    ) -> "DeviceStore":
        """Open with the passphrase, a keystore, or (``data_key``) the raw data key handed
        over by the key agent of `restwise device join` (unwrapped there, once)."""
        folder = Path(folder)
        if not cls.exists(folder):
            raise StoreNotFoundError(f"no Restwise store in {folder}")
        # Shared lock before anything, including the recovery of an interrupted rekey below:
        # a rekey in progress elsewhere holds it exclusive, so its pending key and temporary
        # file are not mistaken for leftovers of a crash.
        lock_fd = _lock_folder(folder)
        try:
            store = cls._open_locked(folder, passphrase, keystore, lock_fd, data_key)
        except BaseException:
            os.close(lock_fd)
            raise
        return store

    @classmethod
    def _open_locked(cls, folder, passphrase, keystore, lock_fd, data_key=None) -> "DeviceStore":
        slots = read_keyslots(folder)
        if data_key is not None:
            conn = cls._open_db(folder, slots, bytes(data_key), None, None)
            if conn is None:
                raise KeySlotError(
                    "the key handed over at `restwise device join` no longer opens this store "
                    "(was it rekeyed since?): stop and start the join again"
                )
            return cls._checked(folder, conn, slots, bytes(data_key), lock_fd)
        key = slots.unwrap(passphrase, keystore)  # WrongPassphraseError on a wrong passphrase
        conn = cls._open_db(folder, slots, key, passphrase, keystore)
        if conn is None:
            # The current key does not open the database: either an interrupted rekey that
            # already swapped the files, or damage.
            if slots.pending:
                next_key = slots.unwrap(passphrase, keystore, pending=True)
                conn = cls._open_db(folder, slots, next_key, passphrase, keystore)
                if conn is not None:
                    slots = cls._promote_pending(folder, slots)
                    key = next_key
            if conn is None:
                raise StoreFormatError(
                    f"{folder / DB_NAME} cannot be read with this store's key: "
                    "the file is damaged, truncated or was tampered with"
                )
        elif slots.pending:
            # Interrupted before the swap: the old database is intact; drop the pending key.
            slots.pending = None
            atomic_write_bytes(folder / KEYSLOTS_NAME, slots.to_bytes())
        for suffix in ("", "-journal", "-wal", "-shm"):
            (folder / (REKEY_TMP_NAME + suffix)).unlink(missing_ok=True)
        return cls._checked(folder, conn, slots, key, lock_fd)

    @classmethod
    def _checked(cls, folder, conn, slots, key, lock_fd) -> "DeviceStore":
        """The open store, once its database is this store's and its schema is current."""
        store = cls(folder, conn, slots, key)
        try:
            store._check_identity()
            store._migrate()
        except BaseException:
            store.close()
            raise
        store._lock_fd = lock_fd
        return store

    @_guarded
    def _check_identity(self) -> None:
        """The database must be this store's: written by `create` (schema >= 1) and holding
        the store id of keyslots.json. An empty file opens under any key as a new, empty
        database; without this check it would be silently re-initialised (all data gone)."""
        if self.conn.execute("PRAGMA user_version").fetchone()[0] < 1:
            raise StoreFormatError(
                "the store database is empty or truncated (no schema): it was damaged"
            )
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        if row is None or row[0] != self._slots.store_id:
            raise StoreFormatError("the store database does not belong to this store's key slots")

    @staticmethod
    def _open_db(folder, slots, key, passphrase, keystore) -> sqlcipher.Connection | None:
        conn = connect_raw(folder / DB_NAME, key)
        try:
            probe_database(conn)
            if conn.execute("PRAGMA user_version").fetchone()[0] < 1:
                # An empty (0-byte) file: refuse before PRAGMA journal_mode writes a header.
                conn.close()
                raise StoreFormatError(
                    "the store database is empty or truncated (no schema): it was damaged"
                )
            tune_connection(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreFormatError("the store database could not be put in WAL mode")
            return conn
        except sqlcipher.OperationalError as exc:
            conn.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreLockedError() from None
            return None
        except sqlcipher.DatabaseError:
            conn.close()
            return None

    @staticmethod
    def _promote_pending(folder: Path, slots: KeySlots) -> KeySlots:
        promoted = KeySlots(
            store_id=slots.store_id,
            generation=slots.generation + 1,
            slots=list(slots.pending or []),
            pending=None,
        )
        atomic_write_bytes(folder / KEYSLOTS_NAME, promoted.to_bytes())
        return promoted

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlcipher.Error:
                pass
            self._conn.close()
            self._conn = None  # type: ignore[assignment]
        self._key = b""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "DeviceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def store_id(self) -> str:
        return self._slots.store_id

    @property
    def conn(self) -> sqlcipher.Connection:
        if self._conn is None:
            raise StoreFormatError("the store is closed")
        return self._conn

    # ------------------------------------------------------------------ schema
    @_guarded
    def _migrate(self) -> None:
        current = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreFormatError(
                f"the store was written by a newer Restwise (schema {current}, "
                f"this version reads up to {SCHEMA_VERSION})"
            )
        for version in range(current, SCHEMA_VERSION):
            with self.transaction() as c:
                for stmt in split_sql(MIGRATIONS[version]):
                    c.execute(stmt)
                c.execute(f"PRAGMA user_version = {version + 1}")

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlcipher.Connection]:
        """One atomic unit of work: everything inside commits together or not at all."""
        c = self.conn
        with _damage_is_format_error():
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            else:
                c.execute("COMMIT")

    @_guarded
    def verify(self) -> dict:
        """Check every page's HMAC and SQLite's own structure; raise StoreFormatError if bad.

        Returns what was checked: the number of database pages and their size, the WAL
        frames not yet checkpointed (checked too), and the schema version."""
        problems = self.conn.execute("PRAGMA cipher_integrity_check").fetchall()
        if problems:
            raise StoreFormatError(
                f"the store is damaged or was tampered with: {len(problems)} page(s) failed their "
                "integrity check"
            )
        if self.conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise StoreFormatError("the store database structure is damaged")
        wal = Path(str(self.folder / DB_NAME) + "-wal")
        page_size = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
        return {
            "pages": int(self.conn.execute("PRAGMA page_count").fetchone()[0]),
            "page_size": page_size,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
            "schema_version": self.schema_version,
        }

    def verify_key_slots(
        self, passphrase: str | None = None, keystore: KeystoreProvider | None = None
    ) -> list[dict]:
        """Check every current key slot: well formed, and (where the passphrase or keystore is
        at hand) that it unwraps exactly this store's data key. Raises StoreFormatError on a
        malformed slot; a slot that unwraps to another key is reported, not hidden."""
        out = []
        for slot, described in zip(self._slots.slots, self._slots.describe()):
            _check_slot_shape(slot)
            entry = dict(described)
            try:
                key = self._slots.unwrap_slot(slot, passphrase, keystore)
            except KeySlotError as exc:
                entry["status"] = f"not checked ({exc})"
                out.append(entry)
                continue
            if key is None:
                can_try = (slot.get("kind") == "passphrase" and passphrase is not None) or (
                    slot.get("kind") == "keystore" and keystore is not None
                    and slot.get("provider") == keystore.name
                )
                entry["status"] = (
                    "does NOT open this store" if can_try
                    else "well formed; not unwrapped (not the way this store was opened)"
                )
            elif secrets.compare_digest(key, self._key):
                entry["status"] = "opens this store"
            else:
                entry["status"] = "does NOT open this store (wraps another key)"
            out.append(entry)
        return out

    # ------------------------------------------------------------------ observations
    @_guarded
    def add_observations(
        self,
        observations: Iterable[Observation],
        *,
        conn: sqlcipher.Connection | None = None,
        inserted_by_metric: "Counter[str] | None" = None,
    ) -> InsertResult:
        """Insert observations, skipping ones already stored (same ``ts`` and ``record_key``).

        Pass ``conn`` from an enclosing :meth:`transaction` to batch several calls into one
        atomic import; otherwise the call is its own transaction. ``observations`` is
        consumed in chunks, so a generator of any length inserts in bounded memory. Pass a
        Counter as ``inserted_by_metric`` to have the rows actually inserted (duplicates
        excluded) added to it per metric.
        """
        if conn is None:
            with self.transaction() as c:
                return self.add_observations(
                    observations, conn=c, inserted_by_metric=inserted_by_metric
                )
        return insert_observations(conn, observations, inserted_by_metric)

    @_guarded
    def observations(
        self,
        metric: str,
        start_ts: int | None = None,
        end_ts: int | None = None,
    ) -> list[tuple[int, float, int | None, int]]:
        """(ts, value, end_ts, tz_offset_min) of one metric in [start_ts, end_ts), by time."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}")
        q = "SELECT ts, value, end_ts, tz_offset_min FROM observations WHERE metric = ?"
        args: list[object] = [metric]
        if start_ts is not None:
            q += " AND ts >= ?"
            args.append(start_ts)
        if end_ts is not None:
            q += " AND ts < ?"
            args.append(end_ts)
        return self.conn.execute(q + " ORDER BY ts", args).fetchall()

    @_guarded
    def daily_observations(self, metric: str) -> list[tuple[str, float, int, int | None]]:
        """(local_day, value, ts, end_ts) of one metric ordered by time."""
        return self.conn.execute(
            "SELECT local_day, value, ts, end_ts FROM observations WHERE metric = ? ORDER BY ts",
            (metric,),
        ).fetchall()

    # ------------------------------------------------------------------ check-ins, sessions
    @_guarded
    def upsert_checkin(
        self,
        day: str,
        values: dict[str, float | None],
        *,
        source: str,
        is_override: bool = False,
        conn: sqlcipher.Connection | None = None,
        updated_at: int | None = None,
    ) -> None:
        """Store one day's check-in answers (canonical scales, see ``models.metrics``).

        Fields not given keep their stored value; an override by the person is flagged so
        it can serve as a training label. ``updated_at`` (epoch seconds) defaults to now; a
        restored export passes the original.
        """
        _validate_day(day)
        for name, value in values.items():
            if name not in CHECKIN_FIELDS:
                raise ValueError(f"unknown check-in field {name!r}")
            if value is not None:
                lo, hi = CHECKIN_FIELDS[name]
                if not (lo <= float(value) <= hi):
                    raise ValueError(f"check-in field {name!r} outside its scale {lo}-{hi}")
        if conn is None:
            with self.transaction() as c:
                return self.upsert_checkin(
                    day, values, source=source, is_override=is_override, conn=c,
                    updated_at=updated_at,
                )
        cols = sorted(values)
        conn.execute(
            "INSERT INTO checkins(day, source, is_override, updated_at) VALUES (?,?,?,?) "
            "ON CONFLICT(day) DO UPDATE SET source=excluded.source, "
            "is_override=max(checkins.is_override, excluded.is_override), "
            "updated_at=excluded.updated_at",
            (day, source, int(is_override), int(time.time() if updated_at is None else updated_at)),
        )
        if cols:
            assignments = ", ".join(f"{c} = ?" for c in cols)
            conn.execute(
                f"UPDATE checkins SET {assignments} WHERE day = ?",
                [values[c] for c in cols] + [day],
            )

    @_guarded
    def checkins(self) -> list[dict]:
        cur = self.conn.execute(
            "SELECT day, readiness, fatigue, soreness, stress, mood, sleep_quality, sleep_hours, "
            "source, is_override FROM checkins ORDER BY day"
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    @_guarded
    def add_sessions(
        self, sessions: Iterable[Session], *, conn: sqlcipher.Connection | None = None
    ) -> InsertResult:
        if conn is None:
            with self.transaction() as c:
                return self.add_sessions(sessions, conn=c)
        before = conn.total_changes
        n = 0
        for s in sessions:
            _validate_day(s.day)
            if s.load_kind not in LOAD_KINDS:
                raise ValueError(f"a session's load kind must be one of {', '.join(LOAD_KINDS)}")
            n += 1
            conn.execute(
                "INSERT OR IGNORE INTO sessions(day, start_ts, minutes, rpe, load, load_kind, kind, "
                "source, record_key) VALUES (?,?,?,?,?,?,?,?,?)",
                (s.day, s.start_ts, s.minutes, s.rpe, s.load, s.load_kind, s.kind, s.source,
                 s.record_key),
            )
        inserted = conn.total_changes - before
        return InsertResult(inserted=inserted, duplicates=n - inserted)

    @_guarded
    def sessions(self) -> list[dict]:
        cur = self.conn.execute(
            "SELECT day, start_ts, minutes, rpe, load, load_kind, kind, source FROM sessions "
            "ORDER BY day, start_ts"
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    # ------------------------------------------------------------------ model state
    @_guarded
    def save_model_state(self, name: str, blob: bytes, meta: dict, version: int = 1) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO model_state(name, version, blob, meta, updated_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET version=excluded.version, blob=excluded.blob, "
                "meta=excluded.meta, updated_at=excluded.updated_at",
                (name, version, blob, json.dumps(meta, sort_keys=True), int(time.time())),
            )

    @_guarded
    def load_model_state(self, name: str) -> tuple[bytes, dict] | None:
        row = self.conn.execute(
            "SELECT blob, meta FROM model_state WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else (bytes(row[0]), json.loads(row[1]))

    # ------------------------------------------------------------------ egress log, consent
    @_guarded
    def log_egress(
        self,
        run_id: str,
        round_: int | None,
        message_type: str,
        records: list[dict],
        n_bytes: int,
        sha256: str,
    ) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO egress_log(ts, run_id, round, message_type, records, n_bytes, sha256) "
                "VALUES (?,?,?,?,?,?,?)",
                (int(time.time()), run_id, round_, message_type, json.dumps(records), n_bytes, sha256),
            )

    @_guarded
    def egress_history(self) -> list[dict]:
        cur = self.conn.execute(
            "SELECT ts, run_id, round, message_type, records, n_bytes, sha256 FROM egress_log ORDER BY id"
        )
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            d = dict(zip(names, row))
            d["records"] = json.loads(d["records"])
            out.append(d)
        return out

    @_guarded
    def set_consent(self, scope: str, allowed: bool) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO consent(scope, allowed, updated_at) VALUES (?,?,?) "
                "ON CONFLICT(scope) DO UPDATE SET allowed=excluded.allowed, updated_at=excluded.updated_at",
                (scope, int(allowed), int(time.time())),
            )

    @_guarded
    def consents(self, run_id: str) -> bool:
        """May this device train in ``run_id``? A run-specific answer beats the global one;
        with no answer at all, training is allowed (the person opted in by joining)."""
        rows = dict(
            self.conn.execute(
                "SELECT scope, allowed FROM consent WHERE scope IN ('*', ?)", (run_id,)
            ).fetchall()
        )
        if "*" in rows and not rows["*"]:
            return False
        if run_id in rows:
            return bool(rows[run_id])
        return bool(rows.get("*", 1))

    # ------------------------------------------------------------------ imports log
    def log_import(
        self, fmt: str, source_name: str, started_at: int, inserted: int, duplicates: int,
        skipped: int, summary: dict, *, conn: sqlcipher.Connection,
    ) -> None:
        conn.execute(
            "INSERT INTO imports(started_at, finished_at, format, source_name, inserted, "
            "duplicates, skipped, summary) VALUES (?,?,?,?,?,?,?,?)",
            (started_at, int(time.time()), fmt, source_name, inserted, duplicates, skipped,
             json.dumps(summary, sort_keys=True)),
        )

    # ------------------------------------------------------------------ summary
    @_guarded
    def summary(self) -> dict:
        c = self.conn
        per_metric = {
            m: {"count": n, "first_day": d0, "last_day": d1, "unit": u}
            for m, n, d0, d1, u in c.execute(
                "SELECT metric, count(*), min(local_day), max(local_day), min(unit) "
                "FROM observations GROUP BY metric ORDER BY metric"
            ).fetchall()
        }
        n_checkins, c0, c1 = c.execute(
            "SELECT count(*), min(day), max(day) FROM checkins"
        ).fetchone()
        n_sessions = c.execute("SELECT count(*) FROM sessions").fetchone()[0]
        return {
            "store_id": self.store_id,
            "schema_version": self.schema_version,
            "key_slots": sorted({
                s["kind"] if s.get("kind") != "keystore" else f"keystore ({s.get('provider')})"
                for s in self._slots.slots
            }),
            "key_generation": self._slots.generation,
            "observations": per_metric,
            "checkins": {"count": n_checkins, "first_day": c0, "last_day": c1},
            "sessions": n_sessions,
            "imports": c.execute("SELECT count(*) FROM imports").fetchone()[0],
            "sent_messages": c.execute("SELECT count(*) FROM egress_log").fetchone()[0],
        }

    def export_rows(self) -> Iterator[dict]:
        """Every stored row as plain dicts (``{"table": ..., column: value}``), in the
        canonical order of :data:`EXPORT_TABLES`: what `restwise device export` writes.
        Internal row ids are left out (they are not data); a record's identity
        (``record_key``, hex) is kept, so importing the export back adds nothing twice."""
        with _damage_is_format_error():
            for table, (columns, order) in EXPORT_TABLES.items():
                source = table
                if table == "owner_settings":  # not a table: the owner's rows of meta
                    source = f"meta WHERE key IN ({', '.join(repr(k) for k in OWNER_SETTING_KEYS)})"
                cur = self.conn.execute(f"SELECT {', '.join(columns)} FROM {source} ORDER BY {order}")
                for row in cur:
                    d: dict = {"table": table}
                    for k, v in sorted(zip(columns, row)):
                        d[k] = v.hex() if isinstance(v, bytes) else v
                    yield d

    def export_lines(self) -> Iterator[str]:
        """The export as JSON lines: a header line, then :meth:`export_rows`. Deterministic:
        the same content always gives the same bytes (the round-trip property)."""
        yield json.dumps(EXPORT_HEADER)
        for row in self.export_rows():
            yield json.dumps(row)

    # ------------------------------------------------------------------ restore (export -> store)
    def restore_egress(self, row: dict, *, conn: sqlcipher.Connection, occurrence: int = 1) -> bool:
        """Add one exported egress-log row unless it is already logged. ``occurrence``: this
        is the n-th identical row of the export (the same message may be logged twice in one
        second): it is added only while the store holds fewer than n of them."""
        key = (row["ts"], row["run_id"], row["round"], row["message_type"], row["sha256"])
        (have,) = conn.execute(
            "SELECT count(*) FROM egress_log WHERE ts = ? AND run_id = ? AND round IS ? AND "
            "message_type = ? AND sha256 = ?", key,
        ).fetchone()
        if have >= occurrence:
            return False
        conn.execute(
            "INSERT INTO egress_log(ts, run_id, round, message_type, records, n_bytes, sha256) "
            "VALUES (?,?,?,?,?,?,?)",
            (row["ts"], row["run_id"], row["round"], row["message_type"], row["records"],
             row["n_bytes"], row["sha256"]),
        )
        return True

    def restore_consent(self, row: dict, *, conn: sqlcipher.Connection, occurrence: int = 1) -> bool:
        """Restore one consent choice; a newer choice already in the store wins."""
        before = conn.total_changes
        conn.execute(
            "INSERT INTO consent(scope, allowed, updated_at) VALUES (?,?,?) "
            "ON CONFLICT(scope) DO UPDATE SET allowed=excluded.allowed, updated_at=excluded.updated_at "
            "WHERE excluded.updated_at > consent.updated_at",
            (row["scope"], int(bool(row["allowed"])), int(row["updated_at"])),
        )
        return conn.total_changes > before

    def restore_import_log(self, row: dict, *, conn: sqlcipher.Connection, occurrence: int = 1) -> bool:
        """Restore one row of the import history unless it is already there (``occurrence``
        as in :meth:`restore_egress`)."""
        values = tuple(row[c] for c in EXPORT_TABLES["imports"][0])
        cols = EXPORT_TABLES["imports"][0]
        (have,) = conn.execute(
            "SELECT count(*) FROM imports WHERE " + " AND ".join(f"{c} IS ?" for c in cols), values
        ).fetchone()
        if have >= occurrence:
            return False
        conn.execute(
            f"INSERT INTO imports({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values
        )
        return True

    def restore_receipt_row(self, table: str, row: dict, *, conn: sqlcipher.Connection, occurrence: int = 1) -> bool:
        """Restore one row of the device's receipts and spends (:data:`RECEIPT_TABLE_KEYS`)
        unless the store already holds its key (alarms: ``occurrence`` as in
        :meth:`restore_egress`)."""
        cols = EXPORT_TABLES[table][0]
        key = RECEIPT_TABLE_KEYS[table]
        (have,) = conn.execute(
            f"SELECT count(*) FROM {table} WHERE " + " AND ".join(f"{c} IS ?" for c in key),
            tuple(row[c] for c in key),
        ).fetchone()
        wanted = occurrence if table == "run_alarms" else 1
        if have >= wanted:
            return False
        conn.execute(
            f"INSERT INTO {table}({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            tuple(row[c] for c in cols),
        )
        return True

    def restore_owner_setting(self, row: dict, *, conn: sqlcipher.Connection, occurrence: int = 1) -> bool:
        """Restore the owner's epsilon cap; when the store has its own, the tighter one wins
        (a restore never loosens what the owner set)."""
        if row["key"] != MAX_EPSILON_KEY:
            raise ValueError("owner_settings: unknown setting")
        value = float(row["value"])
        have = conn.execute("SELECT value FROM meta WHERE key = ?", (MAX_EPSILON_KEY,)).fetchone()
        if have is not None and float(have[0]) <= value:
            return False
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (MAX_EPSILON_KEY, repr(value)),
        )
        return True

    def note_restore(self, source_name: str, rows: int, *, conn: sqlcipher.Connection) -> None:
        """A restore of an export is recorded here, not in the import history (which it
        restores as it was, so a second export is byte-identical to the first)."""
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('last_restore', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (json.dumps({"at": int(time.time()), "source": source_name, "rows": rows}),),
        )

    # ------------------------------------------------------------------ key operations
    def change_passphrase(
        self, new_passphrase: str, *, argon2: Argon2Params | None = None
    ) -> None:
        """Re-wrap the data key under a new passphrase. The database is not touched."""
        gen = self._slots.generation
        slots = [s for s in self._slots.slots if s.get("kind") != "passphrase"]
        slots.append(
            self._slots.make_passphrase_slot(self._key, new_passphrase, argon2 or Argon2Params(), gen)
        )
        new = KeySlots(store_id=self.store_id, generation=gen, slots=slots)
        atomic_write_bytes(self.folder / KEYSLOTS_NAME, new.to_bytes())
        self._slots = new

    def add_keystore_slot(self, keystore: KeystoreProvider) -> list[str]:
        """Wrap the data key under ``keystore`` in a keystore slot (one per store: it
        replaces an existing keystore slot). Returns the providers of replaced slots."""
        gen = self._slots.generation
        replaced = self._slots.keystore_providers()
        slots = [s for s in self._slots.slots if s.get("kind") != "keystore"]
        slots.append(self._slots.make_keystore_slot(self._key, keystore, gen))
        new = KeySlots(store_id=self.store_id, generation=gen, slots=slots)
        atomic_write_bytes(self.folder / KEYSLOTS_NAME, new.to_bytes())
        self._slots = new
        return replaced

    def remove_keystore_slot(self) -> list[str]:
        """Remove the keystore slot; the passphrase then is the only way in (refused when the
        store has no passphrase slot). Returns the providers of removed slots."""
        if not self._slots.has_kind("passphrase"):
            raise KeySlotError(
                "this store has no passphrase slot: removing its keystore would lock it for good "
                "(set a passphrase first with `restwise device passphrase change`)"
            )
        removed = self._slots.keystore_providers()
        slots = [s for s in self._slots.slots if s.get("kind") != "keystore"]
        new = KeySlots(store_id=self.store_id, generation=self._slots.generation, slots=slots)
        atomic_write_bytes(self.folder / KEYSLOTS_NAME, new.to_bytes())
        self._slots = new
        return removed

    @property
    def key_slots(self) -> KeySlots:
        """The store's key slots (wrapped keys only; nothing here opens the store)."""
        return self._slots

    def rekey(
        self,
        passphrase: str | None,
        *,
        keystore: KeystoreProvider | None = None,
        argon2: Argon2Params | None = None,
        _crash_after: str | None = None,
    ) -> None:
        """Rotate the data key: the database is re-encrypted under a fresh random key.

        ``passphrase`` (and ``keystore``) wrap the new key; every slot kind the store had must
        be given again, so no slot is silently dropped. ``_crash_after`` is a test hook that
        simulates a crash after the named step.
        """
        kinds = {s["kind"] for s in self._slots.slots}
        if "passphrase" in kinds and passphrase is None:
            raise ValueError("rekey needs the passphrase to wrap the new key")
        if "keystore" in kinds and keystore is None:
            raise ValueError("rekey needs the keystore to wrap the new key")
        if self._lock_fd is not None:
            _make_exclusive(self._lock_fd)
        try:
            self._rekey_exclusive(passphrase, keystore, argon2, _crash_after, kinds)
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def _rekey_exclusive(self, passphrase, keystore, argon2, _crash_after, kinds) -> None:
        next_gen = self._slots.generation + 1
        next_key = new_data_key()
        pending: list[dict] = []
        if "passphrase" in kinds:
            prev = next(s for s in self._slots.slots if s["kind"] == "passphrase")
            params = argon2 or Argon2Params(
                memory_kib=prev["kdf"]["memory_kib"],
                iterations=prev["kdf"]["iterations"],
                lanes=prev["kdf"]["lanes"],
            )
            pending.append(self._slots.make_passphrase_slot(next_key, passphrase, params, next_gen))
        if "keystore" in kinds:
            pending.append(self._slots.make_keystore_slot(next_key, keystore, next_gen))
        # Step 1: record the pending key (atomic). Until step 3 the old database stays live.
        staged = KeySlots(
            store_id=self.store_id, generation=self._slots.generation,
            slots=self._slots.slots, pending=pending,
        )
        atomic_write_bytes(self.folder / KEYSLOTS_NAME, staged.to_bytes())
        if _crash_after == "pending":
            os._exit(137)
        # Step 2: copy everything into a new file under the new key.
        tmp = self.folder / REKEY_TMP_NAME
        tmp.unlink(missing_ok=True)
        c = self.conn
        busy, wal_frames, checkpointed = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy or wal_frames not in (0, checkpointed):
            # Another connection pins part of the WAL. Step 3 deletes the WAL: a crash
            # between that and the swap would lose those committed transactions.
            self._drop_pending(staged)
            raise StoreLockedError(
                "the store is in use by another process or connection; close it and retry the rekey"
            )
        _create_private_file(tmp)
        c.execute(f"ATTACH DATABASE ? AS rekeyed KEY \"x'{next_key.hex()}'\"", (str(tmp),))
        try:
            c.execute("SELECT sqlcipher_export('rekeyed')")
            version = c.execute("PRAGMA main.user_version").fetchone()[0]
            c.execute(f"PRAGMA rekeyed.user_version = {int(version)}")
        finally:
            c.execute("DETACH DATABASE rekeyed")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if _crash_after == "export":
            os._exit(137)
        # Step 3: swap the files atomically.
        c.close()
        self._conn = None  # type: ignore[assignment]
        for suffix in ("-wal", "-shm"):
            Path(str(self.folder / DB_NAME) + suffix).unlink(missing_ok=True)
        os.replace(tmp, self.folder / DB_NAME)
        fsync_dir(self.folder)
        if _crash_after == "swap":
            os._exit(137)
        # Step 4: promote the pending key.
        self._slots = self._promote_pending(self.folder, staged)
        self._key = next_key
        conn = connect_raw(self.folder / DB_NAME, next_key)
        probe_database(conn)
        tune_connection(conn)
        conn.execute("PRAGMA journal_mode = WAL")
        self._conn = conn

    def _drop_pending(self, staged: KeySlots) -> None:
        """Undo step 1 of rekey (the old key stays current)."""
        restored = KeySlots(
            store_id=staged.store_id, generation=staged.generation, slots=staged.slots, pending=None
        )
        atomic_write_bytes(self.folder / KEYSLOTS_NAME, restored.to_bytes())
        self._slots = restored

    def erase(self, keystore: KeystoreProvider | None = None) -> None:
        """Destroy the key material and the database files; the folder is removed."""
        erase_store(self.folder, keystore=keystore, _open=self)


# ---------------------------------------------------------------------- export layout
#: First line of `restwise device export`: tells the importer the file is a whole store's
#: export (restored as it was, history included), not demo or hand-written data.
EXPORT_HEADER = {"table": "restwise_export", "version": 2}
#: table -> (exported columns, canonical order). Internal ids are not exported; the order is
#: by content (observations, check-ins, sessions) or by the order things happened (logs).
EXPORT_TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "observations": (
        ("metric", "ts", "end_ts", "tz_offset_min", "local_day", "value", "unit", "source",
         "device", "record_key"),
        "ts, metric, record_key",
    ),
    "checkins": (
        ("day", "readiness", "fatigue", "soreness", "stress", "mood", "sleep_quality",
         "sleep_hours", "source", "is_override", "updated_at"),
        "day",
    ),
    "sessions": (
        ("day", "start_ts", "minutes", "rpe", "load", "load_kind", "kind", "source", "record_key"),
        "day, start_ts, record_key",
    ),
    "egress_log": (("ts", "run_id", "round", "message_type", "records", "n_bytes", "sha256"), "id"),
    "consent": (("scope", "allowed", "updated_at"), "scope"),
    "imports": (
        ("started_at", "finished_at", "format", "source_name", "inserted", "duplicates",
         "skipped", "summary"),
        "id",
    ),
    # The device's receipts and its own privacy budget (client/receipts_store.py): a restored
    # store must never forget what it spent, or its budget would under-count.
    "run_keys": (("run_id", "public_key", "pinned_at"), "run_id"),
    "ledger_entries": (("run_id", "seq", "kind", "line", "received_at"), "run_id, seq"),
    "spends": (
        ("run_id", "round", "attempt", "noise_multiplier", "sensitivity", "delta", "adjacency",
         "recorded_at", "receipt_seq"),
        "run_id, round, attempt",
    ),
    "run_alarms": (("run_id", "ts", "reason"), "id"),
    # The owner's own settings (rows of ``meta`` named in OWNER_SETTING_KEYS): a restored
    # device keeps the cap its owner chose, never the looser default.
    "owner_settings": (("key", "value"), "key"),
}
#: ``meta`` keys the owner sets and an export carries: the device's own epsilon cap.
MAX_EPSILON_KEY = "device.max_epsilon"
OWNER_SETTING_KEYS = (MAX_EPSILON_KEY,)
#: Restored rows of these tables are added unless their key is already in the store (the
#: store's own row wins: a pinned key, a received entry, a spend are never rewritten).
RECEIPT_TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "run_keys": ("run_id",),
    "ledger_entries": ("run_id", "seq"),
    "spends": ("run_id", "round", "attempt"),
    "run_alarms": ("run_id", "ts", "reason"),
}


def _check_slot_shape(slot: dict) -> None:
    """A key slot's fields decode to what they must be (StoreFormatError otherwise)."""
    try:
        nonce = base64.b64decode(str(slot["nonce"]), validate=True)
        wrapped = base64.b64decode(str(slot["wrapped_key"]), validate=True)
        if len(nonce) != 12 or len(wrapped) != 32 + 16:
            raise ValueError("wrong lengths")
        if slot.get("kind") == "passphrase":
            kdf = slot["kdf"]
            Argon2Params(memory_kib=kdf["memory_kib"], iterations=kdf["iterations"], lanes=kdf["lanes"])
            if len(base64.b64decode(str(kdf["salt"]), validate=True)) < 16:
                raise ValueError("short salt")
        elif slot.get("kind") != "keystore":
            raise ValueError("unknown slot kind")
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise StoreFormatError("a key slot in keyslots.json is damaged") from None


# ---------------------------------------------------------------------- observation inserts
# Rows per INSERT statement. Many rows per statement, not executemany: one sqlite3_step
# then inserts thousands of rows with the GIL released (executemany takes the GIL back for
# every row), so an importer parsing in another thread is not stalled. 9 bound values per
# row: 2,500 rows = 22,500 values, under SQLite's limit of 32,766; divides run_import's
# batch of 20,000 so full batches need no odd-sized statement.
ROWS_PER_STATEMENT = 2500
_MAX_ROWID = 2**63 - 1


@functools.lru_cache(maxsize=16)
def _observation_insert_sql(rows: int) -> str:
    """INSERT of ``rows`` observations, bound straight from the Observation tuples.

    The parameters are the flat concatenation of the tuples, in the NamedTuple's field
    order (metric, ts, value, unit, source, record_key, end_ts, tz_offset_min, device), so
    no per-row Python tuple is built; a VALUES subquery names them column1..column9 and
    SQLite computes ``local_day`` with the arithmetic of :func:`local_day`. (Anonymous
    ``?`` only: numbered ``?NNN`` parameters make preparing a long statement quadratic.)
    ``ON CONFLICT ... DO NOTHING`` skips only a repeated identity (idempotency); any other
    violation (a NULL where a value is required) is an error, never a silent skip.
    """
    return (
        "INSERT INTO observations(metric, ts, value, unit, source, record_key, end_ts, "
        "tz_offset_min, device, local_day) "
        "SELECT column1, column2, column3, column4, column5, column6, column7, column8, "
        "column9, date(column2 + column8 * 60, 'unixepoch') FROM (VALUES "
        + ",".join(["(?,?,?,?,?,?,?,?,?)"] * rows)
        # "WHERE true": without it SQLite would read ON CONFLICT as part of the join.
        + ") WHERE true ON CONFLICT(ts, record_key) DO NOTHING"
    )


def _insert_chunk(conn, chunk: list) -> None:
    from itertools import chain

    n = len(chunk)
    if n == ROWS_PER_STATEMENT:
        conn.execute(_observation_insert_sql(n), list(chain.from_iterable(chunk)))
        return
    # A short chunk (the tail of an import, a small call): split it into power-of-two
    # statements so only a dozen distinct statements are ever prepared and cached.
    start = 0
    size = 1 << (ROWS_PER_STATEMENT.bit_length() - 1)
    while start < n:
        while size > n - start:
            size >>= 1
        conn.execute(
            _observation_insert_sql(size), list(chain.from_iterable(chunk[start:start + size]))
        )
        start += size


def insert_observations(conn, observations: Iterable[Observation],
                         inserted_by_metric: "Counter[str] | None") -> InsertResult:
    from collections import Counter
    from itertools import islice
    from operator import itemgetter

    before = conn.total_changes
    last_id = 0
    if inserted_by_metric is not None:
        last_id = conn.execute("SELECT max(id) FROM observations").fetchone()[0] or 0
        if last_id >= _MAX_ROWID // 2:
            # New rows might not get ids above last_id (SQLite picks random free ids once
            # the largest is used): count per metric by inserting each metric on its own.
            return _insert_grouped(conn, observations, inserted_by_metric)
    offered: Counter[str] = Counter()
    metric_of = itemgetter(0)
    rows = iter(observations)
    n = 0
    while True:
        chunk = list(islice(rows, ROWS_PER_STATEMENT))
        if not chunk:
            break
        n += len(chunk)
        if inserted_by_metric is not None:
            offered.update(map(metric_of, chunk))
        _insert_chunk(conn, chunk)
    inserted = conn.total_changes - before
    if inserted_by_metric is not None:
        if inserted == n:
            inserted_by_metric.update(offered)
        else:
            # Some were already stored: the rows this call added are exactly those with an
            # id above the largest id before it (ids grow by one per inserted row).
            inserted_by_metric.update(dict(conn.execute(
                "SELECT metric, count(*) FROM observations WHERE id > ? GROUP BY metric",
                (last_id,),
            ).fetchall()))
    return InsertResult(inserted=inserted, duplicates=n - inserted)


def _insert_grouped(conn, observations: Iterable[Observation],
                    inserted_by_metric: "Counter[str]") -> InsertResult:
    groups: dict[str, list[Observation]] = {}
    for o in observations:
        groups.setdefault(o.metric, []).append(o)
    inserted = duplicates = 0
    for metric, group in groups.items():
        res = insert_observations(conn, group, None)
        inserted_by_metric[metric] += res.inserted
        inserted += res.inserted
        duplicates += res.duplicates
    return InsertResult(inserted=inserted, duplicates=duplicates)


# Every file SQLite may leave for the database and for rekey's temporary copy (a crash
# during the export leaves the copy's rollback journal): all hold encrypted pages.
_DATA_FILE_NAMES = tuple(
    base + suffix for base in (DB_NAME, REKEY_TMP_NAME) for suffix in ("", "-wal", "-shm", "-journal")
)


def erase_store(
    folder: Path | str,
    *,
    keystore: KeystoreProvider | None = None,
    _open: DeviceStore | None = None,
) -> None:
    """Erase a store without needing its passphrase (the person may have forgotten it).

    Key slots go first: once no wrapped copy of the data key exists, the database is
    unreadable even if a block of it survives on flash.
    """
    folder = Path(folder)
    if not (folder / KEYSLOTS_NAME).exists() and not (folder / DB_NAME).exists():
        raise StoreNotFoundError(f"no Restwise store in {folder}")
    if _open is not None and _open._lock_fd is not None:
        _make_exclusive(_open._lock_fd)
        lock_fd, _open._lock_fd = _open._lock_fd, None
    else:
        lock_fd = _lock_folder(folder, exclusive=True)
    try:
        _erase_locked(folder, keystore, _open)
    finally:
        os.close(lock_fd)


def _erase_locked(folder: Path, keystore: KeystoreProvider | None, _open: DeviceStore | None) -> None:
    store_id = None
    try:
        store_id = read_keyslots(folder).store_id
    except Exception:  # damaged or missing key slots: erase what is there all the same
        pass
    if _open is not None:
        _open._conn.close() if _open._conn is not None else None
        _open._conn = None  # type: ignore[assignment]
        _open._key = b""
    overwrite_and_unlink(folder / KEYSLOTS_NAME)
    if keystore is not None and store_id is not None and hasattr(keystore, "destroy"):
        keystore.destroy(store_id)
    # Temporary files of an interrupted atomic write of keyslots.json hold wrapped keys too.
    for stale in folder.glob(f".{KEYSLOTS_NAME}.*.tmp"):
        overwrite_and_unlink(stale)
    for name in _DATA_FILE_NAMES:
        p = folder / name
        if p.is_file() and not p.is_symlink():
            _overwrite_file(p)
        p.unlink(missing_ok=True)
    fsync_dir(folder)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _overwrite_file(path: Path, chunk: int = 1 << 20) -> None:
    size = path.stat().st_size
    with open(path, "r+b", buffering=0) as fh:
        remaining = size
        while remaining > 0:
            n = min(chunk, remaining)
            fh.write(secrets.token_bytes(n))
            remaining -= n
        os.fsync(fh.fileno())


def _validate_day(day: str) -> None:
    try:
        dt.date.fromisoformat(day)
    except (TypeError, ValueError):
        raise ValueError("a day must be written YYYY-MM-DD") from None


def split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


# Plain sqlite3 with the same schema, for benchmarks that compare against an unencrypted DB.
def create_plain_sqlite(path: Path | str) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    tune_connection(conn)
    for migration in MIGRATIONS:
        for stmt in split_sql(migration):
            conn.execute(stmt)
    return conn
