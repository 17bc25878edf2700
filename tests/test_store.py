"""The encrypted device store: round-trips, encryption at rest, keys, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from restwise.client.errors import (
    KeySlotError,
    KeystoreNotFoundError,
    StoreExistsError,
    StoreFormatError,
    StoreNotFoundError,
    WrongPassphraseError,
)
from restwise.client.keys import FileKeystore, KeySlots
from restwise.client.store import (
    DB_NAME,
    KEYSLOTS_NAME,
    DeviceStore,
    Observation,
    Session,
    erase_store,
    record_key,
)

# Distinctive values that would be easy to find in the raw bytes if stored in the clear.
SECRET_DEVICE = "SecretWatch-Zq81"
SECRET_VALUE = 123.456789012345


def _obs(i: int, metric: str = "hrv_rmssd", value: float | None = None) -> Observation:
    return Observation(
        metric=metric, ts=1_700_000_000 + i * 60, value=value if value is not None else 40.0 + i % 30,
        unit="ms" if metric == "hrv_rmssd" else "bpm", source="test", device=SECRET_DEVICE,
        record_key=record_key("t", metric, i), tz_offset_min=60,
    )


def test_round_trip_observations_checkins_sessions(new_store):
    res = new_store.add_observations([_obs(i) for i in range(100)])
    assert (res.inserted, res.duplicates) == (100, 0)
    again = new_store.add_observations([_obs(i) for i in range(100)])
    assert (again.inserted, again.duplicates) == (0, 100)
    rows = new_store.observations("hrv_rmssd")
    assert len(rows) == 100
    assert rows[0] == (1_700_000_000, 40.0, None, 60)
    assert rows[31][1] == 41.0
    new_store.upsert_checkin("2024-03-01", {"readiness": 7, "fatigue": 4}, source="t")
    new_store.upsert_checkin("2024-03-01", {"soreness": 2}, source="t")
    (c,) = new_store.checkins()
    assert (c["readiness"], c["fatigue"], c["soreness"], c["mood"]) == (7, 4, 2, None)
    new_store.add_sessions([Session(day="2024-03-01", minutes=60, rpe=6, load=360, source="t",
                                    record_key=b"k1")])
    assert new_store.sessions()[0]["load"] == 360
    folder = new_store.folder
    new_store.close()
    with DeviceStore.open(folder, "correct horse") as s:
        assert len(s.observations("hrv_rmssd")) == 100
        assert s.summary()["observations"]["hrv_rmssd"]["count"] == 100
        # local day honours the person's UTC offset: 1_700_000_000 is 2023-11-14 22:13 UTC,
        # 23:13 in UTC+1, so still the 14th.
        assert s.summary()["observations"]["hrv_rmssd"]["first_day"] == "2023-11-14"


def test_checkin_rejects_out_of_scale(new_store):
    with pytest.raises(ValueError, match="readiness"):
        new_store.upsert_checkin("2024-03-01", {"readiness": 11}, source="t")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        new_store.upsert_checkin("01.03.2024", {"readiness": 5}, source="t")
    assert new_store.checkins() == []


def _raw_bytes(folder: Path) -> bytes:
    data = b""
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", KEYSLOTS_NAME):
        p = folder / name
        if p.exists():
            data += p.read_bytes()
    return data


def test_no_plaintext_in_database_or_wal(tmp_path, fast_argon2):
    import struct

    folder = tmp_path / "s"
    s = DeviceStore.create(folder, "pw", argon2=fast_argon2)
    s.add_observations([_obs(i, value=SECRET_VALUE) for i in range(500)])
    s.upsert_checkin("2024-02-29", {"readiness": 7.25}, source="SecretSourceName")
    # Inspect while the WAL still holds the writes (no checkpoint yet).
    assert (folder / (DB_NAME + "-wal")).exists()
    raw = _raw_bytes(folder)
    assert len(raw) > 10_000
    for needle in (SECRET_DEVICE.encode(), b"SecretSourceName", b"hrv_rmssd", b"2024-02-29",
                   b"CREATE TABLE", b"SQLite format 3", struct.pack(">d", SECRET_VALUE),
                   struct.pack("<d", SECRET_VALUE), b"123.456789"):
        assert needle not in raw, needle
    # The data key itself is not on disk in the clear either.
    assert s._key not in raw and s._key.hex().encode() not in raw
    s.close()
    raw = _raw_bytes(folder)
    assert SECRET_DEVICE.encode() not in raw and struct.pack("<d", SECRET_VALUE) not in raw


def test_wrong_passphrase_is_one_clear_error_and_store_untouched(tmp_path, fast_argon2):
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "right", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(10)])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(WrongPassphraseError, match="wrong passphrase or not a Restwise store"):
        DeviceStore.open(folder, "wrong")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_missing_and_existing_store(tmp_path, fast_argon2):
    with pytest.raises(StoreNotFoundError):
        DeviceStore.open(tmp_path / "nothing", "pw")
    DeviceStore.create(tmp_path / "s", "pw", argon2=fast_argon2).close()
    with pytest.raises(StoreExistsError):
        DeviceStore.create(tmp_path / "s", "pw", argon2=fast_argon2)


def test_passphrase_change_keeps_data_and_old_passphrase_fails(tmp_path, fast_argon2):
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "old", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(20)])
    db_before = (folder / DB_NAME).read_bytes()
    with DeviceStore.open(folder, "old") as s:
        s.change_passphrase("new", argon2=fast_argon2)
    # re-wrapping does not rewrite the data (the file may only differ by the checkpoint)
    assert (folder / DB_NAME).read_bytes()[:4096] == db_before[:4096]
    with pytest.raises(WrongPassphraseError):
        DeviceStore.open(folder, "old")
    with DeviceStore.open(folder, "new") as s:
        assert len(s.observations("hrv_rmssd")) == 20


def test_argon2_parameters_are_recorded_with_the_wrapped_key(tmp_path, fast_argon2):
    DeviceStore.create(tmp_path / "s", "pw", argon2=fast_argon2).close()
    slots = json.loads((tmp_path / "s" / KEYSLOTS_NAME).read_text())
    (slot,) = slots["slots"]
    assert slot["kdf"]["name"] == "argon2id"
    assert slot["kdf"]["memory_kib"] == fast_argon2.memory_kib
    assert slot["aead"] == "AES-256-GCM"
    assert len(bytes.fromhex(KeySlots.from_bytes((tmp_path / "s" / KEYSLOTS_NAME).read_bytes())
                             .slots[0]["nonce"].encode().hex())) > 0


def test_rekey_rotates_data_key_and_old_key_fails(tmp_path, fast_argon2):
    from restwise.client.store import connect_raw, probe_database
    import sqlcipher3.dbapi2 as sq

    folder = tmp_path / "s"
    with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(300)])
        old_key = s._key
        s.rekey("pw")
        new_key = s._key
        assert new_key != old_key and len(new_key) == 32
        assert len(s.observations("hrv_rmssd")) == 300
    with DeviceStore.open(folder, "pw") as s:
        assert s._key == new_key
        assert len(s.observations("hrv_rmssd")) == 300
        assert s.summary()["key_generation"] == 2
    conn = connect_raw(folder / DB_NAME, old_key)
    with pytest.raises(sq.DatabaseError, match="file is not a database"):
        probe_database(conn)
    conn.close()


def test_keystore_slot_opens_without_passphrase(tmp_path, fast_argon2):
    ks = FileKeystore(tmp_path / "keystore")
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "pw", keystore=ks, argon2=fast_argon2) as s:
        s.add_observations([_obs(1)])
    with DeviceStore.open(folder, keystore=ks) as s:
        assert len(s.observations("hrv_rmssd")) == 1
    with DeviceStore.open(folder, "pw") as s:
        s.rekey("pw", keystore=ks)
    with DeviceStore.open(folder, keystore=ks) as s:
        assert len(s.observations("hrv_rmssd")) == 1
    # another keystore (another device) cannot open it, and says the key is missing there:
    # never "wrong passphrase"
    with pytest.raises(KeystoreNotFoundError, match="holds no key for this store"):
        DeviceStore.open(folder, keystore=FileKeystore(tmp_path / "other"))
    # a keystore whose key for this store id is another key: it does not open it
    other = tmp_path / "other"
    other.mkdir(exist_ok=True)
    (other / f"{s.store_id}.key").write_bytes(b"\x01" * 32)
    with pytest.raises(KeySlotError, match="does not open this store") as info:
        DeviceStore.open(folder, keystore=FileKeystore(other))
    assert not isinstance(info.value, WrongPassphraseError)


def test_slot_copied_from_another_store_does_not_open(tmp_path, fast_argon2):
    DeviceStore.create(tmp_path / "a", "pw", argon2=fast_argon2).close()
    DeviceStore.create(tmp_path / "b", "pw", argon2=fast_argon2).close()
    a = json.loads((tmp_path / "a" / KEYSLOTS_NAME).read_text())
    b = json.loads((tmp_path / "b" / KEYSLOTS_NAME).read_text())
    b["slots"] = a["slots"]  # same passphrase, but bound to store a's id
    (tmp_path / "b" / KEYSLOTS_NAME).write_text(json.dumps(b))
    with pytest.raises(WrongPassphraseError):
        DeviceStore.open(tmp_path / "b", "pw")


def test_erase_leaves_nothing_readable(tmp_path, fast_argon2):
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(50)])
    erase_store(folder)
    assert not folder.exists()
    with pytest.raises(StoreNotFoundError):
        DeviceStore.open(folder, "pw")


def test_erase_destroys_key_before_data(tmp_path, fast_argon2, monkeypatch):
    """Even if deleting the database failed, the data is unreadable once the slots are gone."""
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(5)])
    db_copy = (folder / DB_NAME).read_bytes()
    erase_store(folder)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / DB_NAME).write_bytes(db_copy)
    assert not DeviceStore.exists(tmp_path / "copy")


@pytest.mark.parametrize("damage", ["flip", "truncate", "keyslots"])
def test_damaged_store_gives_clear_error_and_is_not_overwritten(tmp_path, fast_argon2, damage):
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(2000)])
    db = folder / DB_NAME
    if damage == "flip":
        data = bytearray(db.read_bytes())
        data[4096 + 100] ^= 0x01  # one bit in the second page: HMAC must catch it
        db.write_bytes(bytes(data))
    elif damage == "truncate":
        db.write_bytes(db.read_bytes()[: 4096 + 1000])
    else:
        (folder / KEYSLOTS_NAME).write_text("{ not json")
    before = db.read_bytes()
    with pytest.raises(StoreFormatError):
        with DeviceStore.open(folder, "pw") as s:
            s.observations("hrv_rmssd")
            s.conn.execute("SELECT sum(value) FROM observations").fetchone()
    assert db.read_bytes() == before


def test_no_sqlcipher_noise_on_stderr_for_wrong_key(tmp_path, fast_argon2):
    folder = tmp_path / "s"
    DeviceStore.create(folder, "pw", argon2=fast_argon2).close()
    code = textwrap.dedent(f"""
        from restwise.client.store import connect_raw, probe_database, DB_NAME
        import os
        from pathlib import Path
        c = connect_raw(Path({str(folder)!r}) / DB_NAME, os.urandom(32))
        try:
            probe_database(c)
        except Exception as e:
            print(type(e).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "DatabaseError"
    assert out.stderr == ""


IMPORT_WORKER = """
import sys, time
from restwise.client.store import DeviceStore, Observation, record_key
from restwise.client.keys import FAST_INSECURE_ARGON2
folder = sys.argv[1]
s = DeviceStore.open(folder, "pw")
def gen():
    for i in range(3_000_000):
        if i == 1000:
            print("started", flush=True)
        yield Observation(metric="heart_rate", ts=1_600_000_000 + i, value=60 + i % 50, unit="bpm",
                          source="big", record_key=record_key("big", i))
s.add_observations(gen())
print("finished", flush=True)
"""


def test_kill_9_during_large_import_leaves_consistent_store(tmp_path, fast_argon2):
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(10)])
    proc = subprocess.Popen([sys.executable, "-c", IMPORT_WORKER, str(folder)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    # Kill only once uncommitted pages have spilled into the WAL: a real mid-write crash.
    wal = folder / (DB_NAME + "-wal")
    deadline = time.monotonic() + 60
    while wal.stat().st_size < 4 * 1024**2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the import finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert wal.stat().st_size >= 4 * 1024**2
    with DeviceStore.open(folder, "pw") as s:
        assert s.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert s.conn.execute("SELECT count(*) FROM observations").fetchone()[0] == 10
        assert s.observations("heart_rate") == []


REKEY_WORKER = """
import sys
from restwise.client.store import DeviceStore
from restwise.client.keys import FAST_INSECURE_ARGON2
s = DeviceStore.open(sys.argv[1], "pw")
s.rekey("pw", argon2=FAST_INSECURE_ARGON2, _crash_after=sys.argv[2])
"""


@pytest.mark.parametrize("crash_after", ["pending", "export", "swap"])
def test_crash_during_rekey_leaves_old_or_new_state(tmp_path, fast_argon2, crash_after):
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(500)])
        old_key = s._key
    rc = subprocess.run([sys.executable, "-c", REKEY_WORKER, str(folder), crash_after], timeout=60).returncode
    assert rc == 137
    with DeviceStore.open(folder, "pw") as s:
        assert len(s.observations("hrv_rmssd")) == 500
        if crash_after == "swap":
            assert s._key != old_key and s.summary()["key_generation"] == 2
        else:
            assert s._key == old_key and s.summary()["key_generation"] == 1
    slots = KeySlots.from_bytes((folder / KEYSLOTS_NAME).read_bytes())
    assert slots.pending is None
    assert not (folder / "restwise.db.rekey-tmp").exists()


def test_kill_9_at_random_points_of_rekey(tmp_path, fast_argon2):
    """Real SIGKILL at arbitrary moments (not only the named steps)."""
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(20_000)])
    worker = REKEY_WORKER.replace('_crash_after=sys.argv[2]', '_crash_after=None')
    for delay in (0.05, 0.15, 0.3, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", worker, str(folder), "-"])
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=30)
        with DeviceStore.open(folder, "pw") as s:
            assert len(s.observations("hrv_rmssd")) == 20_000


def test_store_from_a_newer_version_is_refused(tmp_path, fast_argon2):
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
        s.conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreFormatError, match="newer Restwise"):
        DeviceStore.open(folder, "pw")


def test_verify_detects_a_flipped_bit_in_any_page(tmp_path, fast_argon2):
    folder = tmp_path / "s"
    with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(3000)])
        s.verify()  # intact
    db = folder / DB_NAME
    data = bytearray(db.read_bytes())
    data[len(data) - 2000] ^= 0x80  # a page near the end, not read by a plain open
    db.write_bytes(bytes(data))
    with DeviceStore.open(folder, "pw") as s:
        with pytest.raises(StoreFormatError):
            s.verify()
