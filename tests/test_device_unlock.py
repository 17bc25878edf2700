"""Both kinds of store through every device command: the passphrase store `device init` makes,
a keystore slot added to it (`device keystore add`: OS keyring, else a 0600 key file), a
keystore-only store; a missing keystore is said as such; the key agent of `device join`;
passphrase strength; clear errors for damaged stores and key slots."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import keyring
import keyring.backend
import pytest
from keyring.backends import fail as keyring_fail
from typer.testing import CliRunner

from restwise.client.errors import KeySlotError, KeystoreNotFoundError
from restwise.client.importers import run_import
from restwise.client.key_agent import KeyAgent, request_key
from restwise.client.keys import FileKeystore, KeySlots
from restwise.client.os_keyring import KeyringKeystore
from restwise.client.store import DeviceStore
from restwise.simulation.fleet import write_demo_export

STRONG = "velvet harbour quietly juggles ninety lanterns"


@pytest.fixture
def cli():
    from restwise.cli import app

    runner = CliRunner()

    def invoke(*args, env=None):
        clean = {k: None for k in os.environ if k.startswith("RESTWISE_")}
        clean["COLUMNS"] = "400"  # rich wraps at the terminal width: no line breaks in messages
        clean.update(env or {})
        return runner.invoke(app, ["device", *map(str, args)], env=clean)

    return invoke


@pytest.fixture
def passfile(tmp_path) -> Path:
    p = tmp_path / "pass"
    p.write_text(STRONG + "\n")
    return p


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A real keyring backend kept in memory (this machine has no desktop keyring)."""

    priority = 1

    def __init__(self):
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service, username):
        return self.entries.get((service, username))

    def set_password(self, service, username, password):
        self.entries[(service, username)] = password

    def delete_password(self, service, username):
        if self.entries.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("no such entry")


@pytest.fixture
def no_keyring():
    before = keyring.get_keyring()
    keyring.set_keyring(keyring_fail.Keyring())
    yield
    keyring.set_keyring(before)


@pytest.fixture
def memory_keyring():
    before = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(before)


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> Path:
    return write_demo_export(11, tmp_path_factory.mktemp("demo") / "person.jsonl", days=40)


def init_store(cli, tmp_path, passfile, demo_export) -> Path:
    store = tmp_path / "store"
    r = cli("init", "--store", store, "--passphrase-file", passfile)
    assert r.exit_code == 0, r.output
    r = cli("import", demo_export, "--store", store, "--passphrase-file", passfile, "-q")
    assert r.exit_code == 0, r.output
    return store


def every_command_opens(cli, store: Path, extra: list, tmp_path: Path) -> None:
    """status, today, history, consent, export, trend: all open the store with ``extra``."""
    for args in (["status", "--json"], ["today", "--json"], ["history"], ["consent"],
                 ["export", tmp_path / f"export-{len(os.listdir(tmp_path))}.jsonl"],
                 ["trend", "--json"]):
        r = cli(*args, "--store", store, *extra)
        assert r.exit_code == 0, (args, r.output)


# ------------------------------------------------------------------ keystore add: file
def test_init_store_gets_a_file_keystore_and_every_command_opens_it(cli, tmp_path, passfile, demo_export, no_keyring):
    store = init_store(cli, tmp_path, passfile, demo_export)
    every_command_opens(cli, store, ["--passphrase-file", passfile], tmp_path)
    # no OS keyring here: --backend keyring fails closed, saying why, and adds nothing
    before = (store / "keyslots.json").read_bytes()
    r = cli("keystore", "add", "--store", store, "--passphrase-file", passfile, "--backend", "keyring")
    assert r.exit_code == 3 and "no OS keyring is available" in r.output
    assert (store / "keyslots.json").read_bytes() == before
    # auto: falls back to the key file, and says so (with the risk)
    r = cli("keystore", "add", "--store", store, "--passphrase-file", passfile)
    assert r.exit_code == 0, r.output
    assert "no OS keyring" in r.output and "key file" in r.output and "Added a keystore slot" in r.output
    key_file = tmp_path / "keystore" / f"{json.loads((store / 'keyslots.json').read_text())['store_id']}.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    # now every command opens it without the passphrase
    every_command_opens(cli, store, [], tmp_path)
    r = cli("status", "--store", store, "--json")
    assert json.loads(r.stdout)["key_slots"] == ["keystore (file)", "passphrase"]
    # a keystore elsewhere (or a missing one) is said as such, never as a wrong passphrase;
    # the passphrase slot then takes over when the passphrase is at hand
    r = cli("status", "--store", store, "--keystore", tmp_path / "elsewhere")
    assert r.exit_code == 2 and "holds no key for this store" in r.output and "no passphrase given" in r.output
    assert "wrong passphrase" not in r.output
    r = cli("status", "--store", store, "--keystore", tmp_path / "elsewhere", env={"RESTWISE_PASSPHRASE": STRONG})
    assert r.exit_code == 0, r.output
    # remove it again: the key file is destroyed, the passphrase is the only way in
    r = cli("keystore", "remove", "--store", store, "--passphrase-file", passfile)
    assert r.exit_code == 0, r.output
    assert not key_file.exists()
    r = cli("status", "--store", store)
    assert r.exit_code == 2 and "no passphrase given" in r.output


def test_keystore_only_store_every_command_and_erase(cli, tmp_path, demo_export):
    store, ks = tmp_path / "store", tmp_path / "keystore"
    with DeviceStore.create(store, keystore=FileKeystore(ks)) as s:
        run_import(s, demo_export)
        store_id = s.store_id
    every_command_opens(cli, store, [], tmp_path)
    every_command_opens(cli, store, ["--keystore", ks], tmp_path)
    r = cli("status", "--store", store, "--keystore", tmp_path / "nowhere")
    assert r.exit_code == 3 and "holds no key for this store" in r.output
    assert "wrong passphrase" not in r.output
    r = cli("status", "--store", store, env={"RESTWISE_PASSPHRASE": STRONG})
    assert r.exit_code == 0  # the keystore opens it; a passphrase it does not have is not asked
    r = cli("erase", "--store", store, "--yes")
    assert r.exit_code == 0, r.output
    assert not store.exists() and not (ks / f"{store_id}.key").exists()


# ------------------------------------------------------------------ keystore add: OS keyring
def test_keyring_keystore_wraps_the_same_key(cli, tmp_path, passfile, demo_export, memory_keyring):
    store = init_store(cli, tmp_path, passfile, demo_export)
    r = cli("keystore", "add", "--store", store, "--passphrase-file", passfile)
    assert r.exit_code == 0 and "the OS keyring" in r.output, r.output
    store_id = json.loads((store / "keyslots.json").read_text())["store_id"]
    assert list(memory_keyring.entries) == [("restwise-store", store_id)]
    assert not (tmp_path / "keystore").exists()  # nothing written to disk by Restwise
    every_command_opens(cli, store, [], tmp_path)
    r = cli("status", "--store", store, "--verify")
    assert r.exit_code == 0 and "keystore (keyring): opens this store" in r.output
    # the entry gone (another account): said so, and the passphrase still opens the store
    memory_keyring.entries.clear()
    with pytest.raises(KeystoreNotFoundError, match="OS keyring holds no key for this store"):
        DeviceStore.open(store, keystore=KeyringKeystore())
    r = cli("status", "--store", store, "--passphrase-file", passfile)
    assert r.exit_code == 0


def test_keyring_without_backend_fails_closed(tmp_path, no_keyring):
    with pytest.raises(KeystoreNotFoundError, match="no OS keyring is available"):
        DeviceStore.create(tmp_path / "s", keystore=KeyringKeystore())
    assert not (tmp_path / "s" / "keyslots.json").exists()


# ------------------------------------------------------------------ the key agent of `join`
AGENT_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from restwise.client import unlock
    store = unlock.open_store(Path(sys.argv[1]), key_agent=Path(sys.argv[2]))
    print(store.summary()["checkins"]["count"])
    store.close()
""")


def test_key_agent_serves_only_the_descendants_it_was_started_for(tmp_path, demo_export, fast_argon2):
    store = tmp_path / "store"
    with DeviceStore.create(store, STRONG, argon2=fast_argon2) as s:
        run_import(s, demo_export)
        n = s.summary()["checkins"]["count"]
    slots = KeySlots.from_bytes((store / "keyslots.json").read_bytes())
    agent = KeyAgent(slots.unwrap(STRONG), slots.store_id)
    try:
        assert stat.S_IMODE(agent.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(agent.path.parent.stat().st_mode) == 0o700
        agent.serve_descendants_of(os.getpid())
        # a ClientApp-like child process opens the store through the agent
        r = subprocess.run([sys.executable, "-c", AGENT_CHILD, str(store), str(agent.path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout.strip()) == n
        assert agent.served == 1
        # this process is not its own descendant: refused, nothing handed over
        with pytest.raises(KeySlotError, match="refused this process"):
            request_key(agent.path, slots.store_id)
        assert agent.refused == 1
    finally:
        agent.close()
    assert not agent.path.exists()
    with pytest.raises(KeystoreNotFoundError, match="is not running"):
        request_key(agent.path, slots.store_id)
    r = subprocess.run([sys.executable, "-c", AGENT_CHILD, str(store), str(agent.path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "KeystoreNotFoundError" in r.stderr


# ------------------------------------------------------------------ passphrase strength
def test_weak_passphrases_are_refused_unless_allowed(cli, tmp_path, passfile):
    weak = tmp_path / "weak"
    weak.write_text("password1\n")
    r = cli("init", "--store", tmp_path / "s", "--passphrase-file", weak)
    assert r.exit_code == 2 and "too easy to guess" in r.output and "password1" not in r.output
    assert not (tmp_path / "s").exists()
    r = cli("init", "--store", tmp_path / "s", "--passphrase-file", weak, "--allow-weak")
    assert r.exit_code == 0 and "--allow-weak" in r.output
    r = cli("passphrase", "change", "--store", tmp_path / "s", "--passphrase-file", weak,
            "--new-passphrase-file", weak)
    assert r.exit_code == 2 and "too easy to guess" in r.output
    r = cli("passphrase", "change", "--store", tmp_path / "s", "--passphrase-file", weak,
            "--new-passphrase-file", passfile)
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ clear errors
def test_status_verify_says_what_it_checked(cli, tmp_path, passfile, demo_export, no_keyring):
    store = init_store(cli, tmp_path, passfile, demo_export)
    cli("keystore", "add", "--store", store, "--passphrase-file", passfile, "--backend", "file")
    r = cli("status", "--store", store, "--passphrase-file", passfile, "--verify")
    assert r.exit_code == 0, r.output
    pages = (store / "restwise.db").stat().st_size // 4096
    assert f"Verified: {pages} database pages of 4096 bytes" in r.output
    assert "Key slots (2):" in r.output
    assert "passphrase (argon2id, 65536 KiB, 3 passes, 4 lanes): opens this store" in r.output
    assert "keystore (file): opens this store" in r.output
    r = cli("status", "--store", store, "--passphrase-file", passfile, "--verify", "--json")
    data = json.loads(r.stdout)
    assert data["verified"]["pages"] == pages
    assert [s["status"] for s in data["key_slot_checks"]] == ["opens this store"] * 2


@pytest.mark.parametrize("content", [
    "[" * 200_000 + "]" * 200_000,
    '{"version": 1, "store_id": "x", "slots": ' + "[" * 50_000 + "]" * 50_000 + "}",
    "x" * (2 << 20),
])
def test_damaged_key_slots_exit_5_never_a_traceback(cli, tmp_path, passfile, content):
    store = tmp_path / "s"
    assert cli("init", "--store", store, "--passphrase-file", passfile).exit_code == 0
    (store / "keyslots.json").write_text(content)
    for args in (["status"], ["export", tmp_path / "e.jsonl"], ["keystore", "add"]):
        r = cli(*args, "--store", store, "--passphrase-file", passfile)
        assert r.exit_code == 5, (args, r.output, r.exception)
        assert "keyslots.json" in r.output


def test_export_of_a_damaged_store_exits_5(cli, tmp_path, demo_export):
    store = tmp_path / "store"  # a keystore store: raw-key opens, so every page can be tried
    with DeviceStore.create(store, keystore=FileKeystore(tmp_path / "keystore")) as s:
        run_import(s, demo_export)
    clean = (store / "restwise.db").read_bytes()
    outcomes = set()
    for offset in range(100, len(clean), 4096):  # every page
        damaged = bytearray(clean)
        for k in range(4):
            damaged[offset + k] ^= 0xA5
        (store / "restwise.db").write_bytes(bytes(damaged))
        r = cli("export", tmp_path / "e.jsonl", "--store", store, "--force")
        # 0: the page is not one the export reads (an index); `status --verify` finds those
        assert r.exit_code in (0, 5), (offset, r.output, r.exception)
        assert r.exception is None or isinstance(r.exception, SystemExit), (offset, r.exception)
        if r.exit_code == 5:
            assert "damaged" in r.output and "Traceback" not in r.output
        else:
            verify = cli("status", "--verify", "--store", store)
            assert verify.exit_code == 5 and "damaged" in verify.output, offset
        outcomes.add(r.exit_code)
    assert 5 in outcomes
