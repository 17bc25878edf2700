"""Adversarial review of the encrypted device store: tampered key slots, empty or foreign
database files, permissions, erase completeness, rekey under concurrent readers."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from restwise.client.errors import (
    StoreFormatError,
    StoreLockedError,
    WrongPassphraseError,
)
from restwise.client.keys import Argon2Params
from restwise.client.store import DB_NAME, KEYSLOTS_NAME, DeviceStore, Observation, erase_store, record_key


def _obs(i: int) -> Observation:
    return Observation(
        metric="hrv_rmssd", ts=1_700_000_000 + i * 60, value=40.0 + i, unit="ms", source="t",
        record_key=record_key("r", i),
    )


@pytest.fixture
def store_folder(tmp_path, fast_argon2) -> Path:
    folder = tmp_path / "store"
    with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
        s.add_observations([_obs(i) for i in range(5)])
    return folder


def _rewrite_slots(folder: Path, edit) -> None:
    data = json.loads((folder / KEYSLOTS_NAME).read_text())
    edit(data)
    (folder / KEYSLOTS_NAME).write_text(json.dumps(data))


# -- attacker-controlled keyslots.json ------------------------------------------------------
@pytest.mark.parametrize(
    "kdf_change",
    [
        {"memory_kib": 2**40},  # OverflowError inside the KDF before the fix
        {"memory_kib": 2**31},  # 2 TiB: an allocation attempt (OOM) before the fix
        {"iterations": 2**40},
        {"iterations": 2**31 - 1},  # a CPU hang of days before the fix
        {"lanes": 0},
        {"lanes": 2**24, "memory_kib": 2**27},
        {"memory_kib": "lots"},
        {"salt": 12},
    ],
)
def test_tampered_argon2_parameters_fail_cleanly(store_folder, kdf_change):
    _rewrite_slots(store_folder, lambda d: d["slots"][0]["kdf"].update(kdf_change))
    with pytest.raises(StoreFormatError) as info:
        DeviceStore.open(store_folder, "pw")
    assert "pw" not in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["slots"][0].update(generation="x"),
        lambda d: d["slots"][0].update(kdf=[1, 2]),
        lambda d: d.update(slots=["not a slot"]),
        lambda d: d.update(slots={"a": 1}),
        lambda d: d.update(pending="x"),
    ],
)
def test_structurally_damaged_key_slots_are_a_format_error(store_folder, edit):
    _rewrite_slots(store_folder, edit)
    with pytest.raises(StoreFormatError):
        DeviceStore.open(store_folder, "pw")


def test_argon2_parameters_are_bounded_when_created_too():
    with pytest.raises(ValueError):
        Argon2Params(memory_kib=2**40)
    with pytest.raises(ValueError):
        Argon2Params(iterations=10**6)
    Argon2Params()  # the defaults stay valid


def test_slot_generation_is_bound_to_the_file_generation(store_folder):
    """The AAD must use the generation the file says is current, not the slot's own claim:
    a slot relabelled with another generation no longer unwraps."""
    _rewrite_slots(store_folder, lambda d: d.update(generation=2))
    with pytest.raises(WrongPassphraseError):
        DeviceStore.open(store_folder, "pw")


# -- the database file -----------------------------------------------------------------------
def test_empty_database_file_is_damage_not_a_new_store(store_folder):
    (store_folder / DB_NAME).write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        Path(str(store_folder / DB_NAME) + suffix).unlink(missing_ok=True)
    with pytest.raises(StoreFormatError):
        DeviceStore.open(store_folder, "pw")
    assert (store_folder / DB_NAME).stat().st_size == 0  # never silently re-initialised


def test_database_of_another_store_is_refused(tmp_path, fast_argon2):
    """Both stores' files are valid, but a database moved under another store's key slots
    (with the same data key, e.g. a restored backup mix-up) must not open as that store."""
    a = tmp_path / "a"
    DeviceStore.create(a, "pw", argon2=fast_argon2).close()
    # Make store b's database by hand under a's data key but a different store id.
    from restwise.client.keys import KeySlots

    slots = KeySlots.from_bytes((a / KEYSLOTS_NAME).read_bytes())
    key = slots.unwrap("pw")
    with DeviceStore.open(a, "pw") as s:
        s.conn.execute("UPDATE meta SET value = 'someone-else' WHERE key = 'store_id'")
    del key
    with pytest.raises(StoreFormatError):
        DeviceStore.open(a, "pw")


# -- permissions -------------------------------------------------------------------------------
def test_store_files_are_private(tmp_path, fast_argon2):
    folder = tmp_path / "pre-existing"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    old = os.umask(0o022)
    try:
        with DeviceStore.create(folder, "pw", argon2=fast_argon2) as s:
            s.add_observations([_obs(1)])
            for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", KEYSLOTS_NAME):
                assert stat.S_IMODE((folder / name).stat().st_mode) & 0o077 == 0, name
            s.rekey("pw")
            assert stat.S_IMODE((folder / DB_NAME).stat().st_mode) & 0o077 == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# -- erase -------------------------------------------------------------------------------------
def test_erase_removes_stale_key_slot_temp_files(store_folder):
    """A crash inside atomic_write_bytes leaves `.keyslots.json.*.tmp` holding a wrapped key."""
    stale = store_folder / f".{KEYSLOTS_NAME}.abc123.tmp"
    stale.write_bytes((store_folder / KEYSLOTS_NAME).read_bytes())
    erase_store(store_folder)
    assert not stale.exists()
    assert not store_folder.exists()


# -- rekey and other connections ------------------------------------------------------------------
def test_rekey_refuses_while_another_connection_pins_the_wal(store_folder):
    """wal_checkpoint(TRUNCATE) cannot finish while a reader holds a snapshot; rekey then
    deletes a WAL that still holds committed pages. It must refuse instead."""
    with DeviceStore.open(store_folder, "pw") as writer:
        writer.add_observations([_obs(i) for i in range(100, 110)])
        reader = DeviceStore.open(store_folder, "pw")
        try:
            reader.conn.execute("BEGIN")
            reader.conn.execute("SELECT count(*) FROM observations").fetchone()
            writer.add_observations([_obs(i) for i in range(200, 210)])
            with pytest.raises(StoreLockedError):
                writer.rekey("pw")
            reader.conn.execute("COMMIT")
        finally:
            reader.close()
    with DeviceStore.open(store_folder, "pw") as s:
        assert s.summary()["observations"]["hrv_rmssd"]["count"] == 25


# -- two handles / two processes ---------------------------------------------------------------
def test_rekey_and_erase_refuse_while_the_store_is_open_elsewhere(store_folder):
    """Rekey replaces and erase deletes the database files: another open handle's later
    writes would go to a deleted file and be lost. Both must refuse until it is closed."""
    first = DeviceStore.open(store_folder, "pw")
    other = DeviceStore.open(store_folder, "pw")
    try:
        with pytest.raises(StoreLockedError):
            first.rekey("pw")
        with pytest.raises(StoreLockedError):
            erase_store(store_folder)
        other.add_observations([_obs(i) for i in range(300, 303)])  # still fully usable
    finally:
        other.close()
    first.rekey("pw")  # alone now: allowed
    first.add_observations([_obs(400)])
    first.close()
    with DeviceStore.open(store_folder, "pw") as s:
        assert s.summary()["observations"]["hrv_rmssd"]["count"] == 9
        assert s.summary()["key_generation"] == 2
    erase_store(store_folder)
    assert not store_folder.exists()


def test_open_store_can_erase_itself_and_a_closed_one_reopens(store_folder):
    s = DeviceStore.open(store_folder, "pw")
    s.erase()
    assert not store_folder.exists()


# -- store id and symlinks ------------------------------------------------------------------------
def test_tampered_store_id_cannot_steer_keystore_paths(store_folder, tmp_path):
    victim = tmp_path / "victim.key"
    victim.write_bytes(b"k" * 32)
    _rewrite_slots(store_folder, lambda d: d.update(store_id="../victim"))
    from restwise.client.keys import FileKeystore

    ks = FileKeystore(tmp_path / "keystore")
    with pytest.raises(StoreFormatError):
        DeviceStore.open(store_folder, "pw", keystore=ks)
    erase_store(store_folder, keystore=ks)
    assert victim.read_bytes() == b"k" * 32  # another file's key was not destroyed


def test_erase_does_not_overwrite_the_target_of_a_symlinked_keyslots_file(store_folder, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"keep me")
    real = store_folder / KEYSLOTS_NAME
    real.rename(tmp_path / "moved-keyslots.json")
    real.symlink_to(precious)
    erase_store(store_folder)
    assert precious.read_bytes() == b"keep me"
    assert not store_folder.exists()


# -- the command line --------------------------------------------------------------------------------
def test_cli_file_errors_are_one_line_not_a_traceback(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTWISE_")}
    pw = tmp_path / "pw"
    pw.write_text("Zq-secret-pass\n")
    env.update(RESTWISE_PASSPHRASE_FILE=str(pw), RESTWISE_STORE=str(tmp_path / "s"))
    cli = [sys.executable, "-m", "restwise.cli", "device"]
    assert subprocess.run(cli + ["init"], env=env, capture_output=True, timeout=120).returncode == 0
    res = subprocess.run(cli + ["export", str(tmp_path / "missing-dir" / "out.jsonl")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "missing-dir" in res.stderr
    assert "Zq-secret-pass" not in res.stderr + res.stdout


def test_erase_removes_leftovers_of_an_interrupted_rekey(store_folder):
    for name in ("restwise.db.rekey-tmp", "restwise.db.rekey-tmp-journal", "restwise.db-journal"):
        (store_folder / name).write_bytes(os.urandom(64))
    erase_store(store_folder)
    assert not store_folder.exists()


def test_a_writer_blocked_by_another_process_gets_store_locked_error(store_folder):
    holder = DeviceStore.open(store_folder, "pw")
    waiter = DeviceStore.open(store_folder, "pw")
    try:
        waiter.conn.execute("PRAGMA busy_timeout = 50")
        holder.conn.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreLockedError):
            waiter.add_observations([_obs(900)])
        with pytest.raises(StoreLockedError):
            waiter.set_consent("*", False)
        holder.conn.execute("ROLLBACK")
        waiter.set_consent("*", False)  # free again
    finally:
        holder.close()
        waiter.close()
