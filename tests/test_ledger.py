"""The signed, hash-chained ledger: integrity, idempotency, crash safety, keys."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from restwise.privacy.errors import KeyFileError, LedgerConflictError, LedgerCorruptError
from restwise.privacy.events import AuditEvent, GaussianRoundEvent
from restwise.privacy.ledger import (
    GENESIS_HASH,
    PrivacyLedger,
    export_public_key,
    generate_audit_key,
    key_fingerprint,
    load_audit_key,
    load_public_key,
    parse_ledger_bytes,
    verify_ledger_file,
    verify_signatures,
)


def release(round, run_id="run-1", attempt=0, survivors=5):
    return GaussianRoundEvent.from_distributed_noise(
        run_id=run_id, round=round, clip_norm=1.0, planned_noise_multiplier=1.3, planned_clients=5,
        survivors=survivors, sampling="poisson", sampling_rate=0.1, cohort_size=5, population=50,
        adjacency="add_remove", model_hash="12" * 32, timestamp="2026-01-01T00:00:00.000000Z", attempt=attempt,
    )


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def ledger(tmp_path, key):
    led = PrivacyLedger(tmp_path / "ledger.jsonl", key)
    led.append(AuditEvent(actor="operator:ana", action="run.create", target="run-1", details={"rounds": 3}))
    for r in (1, 2):
        led.append(release(r))
    return led


def test_chain_and_signatures(ledger, key):
    entries = ledger.entries()
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
    v = ledger.verify(key.public_key())
    assert v.entries == 3 and v.head_hash == entries[-1].hash and v.signed
    assert [e.round for e in ledger.releases("run-1")] == [1, 2]
    assert ledger.releases("other") == []


def test_other_key_fails(ledger):
    with pytest.raises(LedgerCorruptError, match="signature"):
        ledger.verify(Ed25519PrivateKey.generate().public_key())


def test_unsigned_ledger_fails_signature_check(tmp_path, key):
    led = PrivacyLedger(tmp_path / "l.jsonl")
    led.append(release(1))
    verify_ledger_file(led.path)  # chain alone is fine
    with pytest.raises(LedgerCorruptError, match="not signed"):
        verify_ledger_file(led.path, key.public_key())


def test_flip_any_byte_fails(ledger, key):
    data = ledger.path.read_bytes()
    public = key.public_key()
    verify_ledger_file(ledger.path, public)

    def check(blob: bytes) -> None:  # exactly what verify_ledger_file does after reading the file
        verify_signatures(parse_ledger_bytes(blob), public)

    check(data)
    for pos in range(len(data)):
        for mask in (0x01, 0x20) if pos % 4 == 0 else (0x01,):  # every byte; case flips on a quarter
            bad = bytearray(data)
            bad[pos] ^= mask
            with pytest.raises(LedgerCorruptError):
                check(bytes(bad))
    flipped = ledger.path.with_name("flipped.jsonl")  # and through the file, at a few places
    for pos in (0, len(data) // 3, len(data) // 2, len(data) - 2):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        flipped.write_bytes(bytes(bad))
        with pytest.raises(LedgerCorruptError):
            verify_ledger_file(flipped, public)


@pytest.mark.parametrize("edit", ["drop_first", "drop_middle", "swap", "truncate", "duplicate_last", "append_garbage"])
def test_structural_tampering_fails(ledger, key, edit):
    lines = ledger.path.read_bytes().splitlines(keepends=True)
    if edit == "drop_first":
        lines = lines[1:]
    elif edit == "drop_middle":
        del lines[1]
    elif edit == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif edit == "truncate":
        lines[-1] = lines[-1][:-10]
    elif edit == "duplicate_last":
        lines.append(lines[-1])
    else:
        lines.append(b"{}\n")
    ledger.path.write_bytes(b"".join(lines))
    with pytest.raises(LedgerCorruptError):
        verify_ledger_file(ledger.path, key.public_key())


def test_idempotent_release_and_conflict(ledger):
    before = ledger.path.read_bytes()
    again = release(2)
    entry = ledger.append(again)
    assert entry.seq == 3 and ledger.path.read_bytes() == before  # a no-op returning the existing entry
    with pytest.raises(LedgerConflictError, match="survivors") as info:
        ledger.append(release(2, survivors=4))
    assert "noise_multiplier" in info.value.fields and info.value.key == ("run-1", 2, 0)
    rerun = ledger.append(release(2, attempt=1, survivors=4))  # a re-run round is a new release
    assert rerun.seq == 4


def test_torn_last_line_repaired_by_writer_reported_by_verifier(ledger, key):
    good = ledger.path.read_bytes()
    torn = release(3).to_json()[:40].encode()
    with open(ledger.path, "ab") as f:
        f.write(b'{"hash":"' + torn)
    with pytest.raises(LedgerCorruptError, match="incomplete"):
        verify_ledger_file(ledger.path, key.public_key())
    fresh = PrivacyLedger(ledger.path, key)
    assert len(fresh.entries()) == 3
    assert ledger.path.read_bytes() == good
    assert fresh.repairs and fresh.repairs[0].read_bytes().endswith(torn)
    fresh.append(release(3))
    assert fresh.verify(key.public_key()).entries == 4


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from restwise.privacy import ledger as L
    from restwise.privacy.events import GaussianRoundEvent

    path, keyfile, die_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_write = L._write_all

    def dying_write(fd, data):
        if os.environ.get("DIE_NOW") == "1":
            real_write(fd, data[: len(data) // 2])   # half a line reaches the file ...
            os.kill(os.getpid(), signal.SIGKILL)     # ... and the process dies mid-append
        real_write(fd, data)

    L._write_all = dying_write
    led = L.PrivacyLedger(path, L.load_audit_key(keyfile))
    for r in range(1, 10_000):
        if r == die_at:
            os.environ["DIE_NOW"] = "1"
        led.append(GaussianRoundEvent.from_distributed_noise(
            run_id="run-1", round=r, clip_norm=1.0, planned_noise_multiplier=1.3, planned_clients=5,
            survivors=5, sampling="full", cohort_size=5, population=5, adjacency="add_remove",
            model_hash="%064x" % r, timestamp="2026-01-01T00:00:00.000000Z"))
        print("acked", r, flush=True)
    """
)


def _child_release(r):
    return GaussianRoundEvent.from_distributed_noise(
        run_id="run-1", round=r, clip_norm=1.0, planned_noise_multiplier=1.3, planned_clients=5, survivors=5,
        sampling="full", cohort_size=5, population=5, adjacency="add_remove", model_hash="%064x" % r,
        timestamp="2026-01-01T00:00:00.000000Z",
    )


def test_crash_mid_append_loses_nothing_acknowledged_duplicates_nothing(tmp_path):
    keyfile = tmp_path / "audit.pem"
    key = generate_audit_key(keyfile)
    path = tmp_path / "ledger.jsonl"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), str(path), str(keyfile), "4"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    acked = [int(line.split()[1]) for line in proc.stdout.splitlines()]
    assert acked == [1, 2, 3]
    with pytest.raises(LedgerCorruptError, match="incomplete"):
        verify_ledger_file(path, key.public_key())
    led = PrivacyLedger(path, key)
    assert [e.round for e in led.releases()] == acked  # every acknowledged release, nothing torn
    # the server retries the unacknowledged round and re-sends an acknowledged one: no duplicates
    led.append(_child_release(4))
    led.append(_child_release(3))
    entries, v = verify_ledger_file(path, key.public_key())
    assert [e.event.round for e in entries] == [1, 2, 3, 4] and v.signed


def test_killed_at_random_time_keeps_every_acknowledged_entry(tmp_path):
    keyfile = tmp_path / "audit.pem"
    key = generate_audit_key(keyfile)
    path = tmp_path / "ledger.jsonl"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(keyfile), "0"], stdout=subprocess.PIPE, text=True)
    acked = []
    for line in proc.stdout:
        acked.append(int(line.split()[1]))
        if len(acked) == 25:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    acked += [int(line.split()[1]) for line in proc.stdout.read().splitlines()]
    led = PrivacyLedger(path, key)
    rounds = [e.round for e in led.releases()]
    assert rounds[: len(acked)] == acked and rounds == list(range(1, len(rounds) + 1))
    assert len(rounds) <= len(acked) + 1  # at most the one in flight when killed
    for r in range(1, len(rounds) + 3):  # the restarted server re-sends: idempotent
        led.append(_child_release(r))
    entries, _ = verify_ledger_file(path, key.public_key())
    assert [e.event.round for e in entries] == list(range(1, len(rounds) + 3))


def test_two_processes_append_concurrently(tmp_path):
    keyfile = tmp_path / "audit.pem"
    key = generate_audit_key(keyfile)
    path = tmp_path / "ledger.jsonl"
    code = textwrap.dedent(
        """
        import sys
        from restwise.privacy.ledger import PrivacyLedger, load_audit_key
        from restwise.privacy.events import AuditEvent
        led = PrivacyLedger(sys.argv[1], load_audit_key(sys.argv[2]))
        for i in range(30):
            led.append(AuditEvent(actor=sys.argv[3], action="tick", details={"i": i}))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(keyfile), who]) for who in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    entries, v = verify_ledger_file(path, key.public_key())
    assert v.entries == 60
    assert sorted((e.payload["actor"], e.payload["details"]["i"]) for e in entries) == sorted(
        (w, i) for w in "ab" for i in range(30)
    )


def test_audit_key_files(tmp_path):
    keyfile = tmp_path / "keys" / "audit.pem"
    key = generate_audit_key(keyfile)
    assert oct(keyfile.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(KeyFileError, match="already exists"):
        generate_audit_key(keyfile)
    loaded = load_audit_key(keyfile)
    assert key_fingerprint(loaded) == key_fingerprint(key)
    pub = export_public_key(key, tmp_path / "audit.pub.pem")
    assert key_fingerprint(load_public_key(pub)) == key_fingerprint(key.public_key())
    os.chmod(keyfile, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_audit_key(keyfile)
    with pytest.raises(KeyFileError, match="no audit key"):
        load_audit_key(tmp_path / "missing.pem")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(b"garbage")
