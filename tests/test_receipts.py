"""Device receipts and the device's own budget (issue 15.1, 15.2), with real parts: one real
3-round private run on an in-process grid (the real ServerApp loop, the real ClientApp and its
mods, real encrypted stores, the real signed ledger and report), shared by the module; the
device checks on real ledger lines in a real store; the attack of issue 15 - the ledger
rewritten and re-signed with the real key, the report reissued - against `audit verify
--receipts` through the real CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from restwise.cli import app as cli_app
from restwise.client import receipts_store
from restwise.client.app import DeviceLocation, DeviceLocator, SIM_KEYSTORE_DIR, device_folder_name, make_client_app, open_device_store
from restwise.client.importers import run_import
from restwise.client.store import DeviceStore
from restwise.privacy.device_budget import Spend, device_epsilon, gaussian_delta, within_cap
from restwise.privacy.events import AuditEvent, GaussianRoundEvent, ReportIssuedEvent
from restwise.privacy.ledger import PrivacyLedger, generate_audit_key, load_audit_key, public_key_hex
from restwise.privacy.receipts import read_receipt_file, receipt_files, write_receipt_file
from restwise.privacy.report import write_run_report
from restwise.privacy.secagg.harness import InProcessGrid
from restwise.privacy.verify import verify_report
from restwise.server.app import FederatedServer
from restwise.server.rundir import open_ledger, write_report
from restwise.server.runconfig import RunConfig
from restwise.simulation.fleet import prepare_fleet

DEVICES = 8
NO_CONSENT, TINY_CAP, SECOND_ROUND_CAP = 5, 7, 6  # devices that refuse (consent / budget at once / at round 2)
runner = CliRunner()


def _config() -> RunConfig:
    return RunConfig(
        name="receipts", rounds=3, population=DEVICES, sampling="poisson", sampling_rate=1.0, noise_multiplier=1.0,
        delta=1e-3, clip_norm=1.0, secagg_num_neighbours=4, secagg_threshold=3, max_dropout_fraction=0.4,
        local_epochs=1, learning_rate=0.003, batch_size=32, round_timeout_s=30.0, dataset="demo", seed=5, force=True,
    )


def _location(fleet: Path, i: int) -> DeviceLocation:
    return DeviceLocation(fleet / device_folder_name(i), fleet / SIM_KEYSTORE_DIR)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished, reported 3-round run; each device's receipts exported into one folder."""
    root = tmp_path_factory.mktemp("receipts")
    run_dir = root / "runs" / "run-rcpt0001"
    run_dir.mkdir(parents=True)
    config = _config()
    fleet = run_dir / "fleet"
    prepare_fleet(fleet, config, demo_days=60)
    with open_device_store(_location(fleet, NO_CONSENT)) as store:
        store.set_consent(run_dir.name, False)
    with open_device_store(_location(fleet, TINY_CAP)) as store:
        receipts_store.set_max_epsilon(store, 0.5)
    with open_device_store(_location(fleet, SECOND_ROUND_CAP)) as store:
        receipts_store.set_max_epsilon(store, 4.0)  # one release at z=1 is 3.14, two are 4.85
    client = make_client_app(DeviceLocator(fleet))
    nodes = [2000 + i for i in range(DEVICES)]
    grid = InProcessGrid(client, nodes)
    for i, nid in enumerate(nodes):
        grid.contexts[nid] = Context(run_id=1, node_id=nid, node_config={"partition-id": i}, state=RecordDict(),
                                     run_config={})
    server = FederatedServer(config, run_dir, run_id=run_dir.name, ledger=open_ledger(run_dir, config), node_wait_s=0.5)
    summary = server.run(grid)
    assert summary.status == "completed", summary.reason
    write_report(run_dir)
    receipts = root / "receipts"
    for i in range(DEVICES):
        with open_device_store(_location(fleet, i)) as store:
            for anchor in receipts_store.runs(store):
                doc = receipts_store.export_document(store, anchor.run_id)
                if doc is not None:
                    write_receipt_file(receipts, doc)
    public = root / "published.pem"
    public.write_bytes((run_dir / "public_key.pem").read_bytes())
    return {"root": root, "run_dir": run_dir, "fleet": fleet, "receipts": receipts, "public": public, "grid": grid,
            "config": config, "server": server}


def _verify(report: Path, public: Path, receipts: Path | None):
    args = ["audit", "verify", str(report), "--public-key", str(public)]
    if receipts is not None:
        args += ["--receipts", str(receipts)]
    return runner.invoke(cli_app, args)


# -- end to end ----------------------------------------------------------------------------------
def test_every_device_that_took_part_holds_the_signed_ledger_and_its_receipts(run):
    ledger = PrivacyLedger(run["run_dir"] / "ledger.jsonl").entries()
    releases = [e for e in ledger if e.kind == GaussianRoundEvent.kind]
    assert [e.payload["round"] for e in releases] == [1, 2, 3]
    before_report = [e for e in ledger if e.kind != ReportIssuedEvent.kind]
    for i in range(DEVICES):
        with open_device_store(_location(run["fleet"], i)) as store:
            (anchor,) = receipts_store.runs(store)
            stored = receipts_store.stored_lines(store, anchor.run_id)
            mine = receipts_store.spends(store)
        assert anchor.alarms == []
        # Every device pinned the run's key and holds the ledger from its first entry up to
        # the report (the devices that declined hold what their first messages carried).
        assert anchor.key_fingerprint is not None and min(stored) == 1
        assert all(stored[s] == ledger[s - 1].line().decode().rstrip("\n") for s in stored)
        if i in (NO_CONSENT, TINY_CAP):
            assert mine == [] and anchor.releases == 0
        elif i == SECOND_ROUND_CAP:
            assert [(s.round, s.settled) for s in mine] == [(1, True)]  # refused rounds 2 and 3
            assert anchor.epsilon == pytest.approx(device_epsilon(mine)) and anchor.epsilon < 4.0
        else:
            assert len(stored) == len(before_report)  # the final receipts message carried round 3
            assert [(s.round, s.receipt_seq) for s in mine] == [(e.payload["round"], e.seq) for e in releases]
            # a receipt never lowers a spend below its round's worst case (z = 1 at t_min)
            assert all(s.noise_multiplier == pytest.approx(1.0) for s in mine)
            assert anchor.epsilon == pytest.approx(device_epsilon(mine))


def test_a_budget_refusal_is_the_same_reply_as_a_consent_refusal(run):
    def sent(i):
        with open_device_store(_location(run["fleet"], i)) as store:
            return [(h["message_type"], h["records"], h["n_bytes"]) for h in store.egress_history()]
    # Consent refused vs. over the cap: the same one message, the same records and sizes.
    assert sent(NO_CONSENT) == sent(TINY_CAP)
    assert [m for m, _, _ in sent(NO_CONSENT)] == ["train:setup"]
    assert [r["name"] for r in sent(NO_CONSENT)[0][1]] == ["secagg.not-taking-part"]
    # The device whose cap stopped it at round 2 said "not taking part" there and when asked to
    # join round 3, nothing else; it took part in round 1, so the run's last entries reach it.
    later = sent(SECOND_ROUND_CAP)[4:]
    assert [m for m, _, _ in later] == ["train:collect-masked-input", "train:join", "query.restwise_receipts"]
    assert all([r["name"] for r in recs] == ["secagg.not-taking-part"] for _, recs, _ in later[:2])
    assert later[2][1] == []


def test_receipts_add_bytes_only_to_messages_that_were_sent_anyway(run):
    # The first message of a round carries the entries the device lacks; the final receipts
    # message goes only to devices that took part, and its reply is empty.
    with open_device_store(_location(run["fleet"], 0)) as store:
        history = store.egress_history()
    assert [h["message_type"] for h in history].count("query.restwise_receipts") == 1
    assert history[-1]["records"] == []
    with open_device_store(_location(run["fleet"], NO_CONSENT)) as store:
        assert "query.restwise_receipts" not in [h["message_type"] for h in store.egress_history()]


def test_the_untouched_run_verifies_with_receipts_and_an_empty_folder_fails(run, tmp_path):
    files = receipt_files(run["receipts"])
    assert len(files) == DEVICES and len({f.name for f in files}) == DEVICES
    assert all(f.name.startswith(f"receipts-{run['run_dir'].name}-") for f in files)
    r = _verify(run["run_dir"], run["public"], run["receipts"])
    assert r.exit_code == 0, r.output
    assert f"receipts: {DEVICES} device receipt file(s)" in r.output
    empty = tmp_path / "none"
    empty.mkdir()
    r = _verify(run["run_dir"], run["public"], empty)
    assert r.exit_code == 8 and "no receipt file for run" in r.output


def _forge(run, name: str, change) -> Path:
    """The attack of issue 15 with the real key: keep the ledger's bytes up to the first entry
    the change touches, append the rest changed and re-signed (links and seqs consistent, the
    release.applied entries naming the new releases), and reissue the report."""
    src = run["run_dir"]
    forged_root = run["root"] / f"forged-{name}" / "runs"
    dst = forged_root / src.name
    dst.mkdir(parents=True)
    shutil.copy2(src.parent / "audit_key.pem", forged_root / "audit_key.pem")
    shutil.copy2(src / "public_key.pem", dst / "public_key.pem")
    key = load_audit_key(forged_root / "audit_key.pem")
    entries = [e for e in PrivacyLedger(src / "ledger.jsonl").entries() if e.kind != ReportIssuedEvent.kind]
    changed = [change(e.event) for e in entries]
    first = next(i for i, (e, c) in enumerate(zip(entries, changed)) if c is None or c.to_dict() != e.payload)
    (dst / "ledger.jsonl").write_bytes(b"".join(e.line() for e in entries[:first]))
    ledger = PrivacyLedger(dst / "ledger.jsonl", key)
    renumbered = {e.seq: e for e in entries[:first]}
    for old, event in zip(entries[first:], changed[first:]):
        if event is None:
            continue
        if isinstance(event, AuditEvent) and "release_seq" in event.details:
            new = renumbered.get(int(event.details["release_seq"]))
            if new is None:
                continue
            event = dataclasses.replace(event, details={**event.details, "release_seq": new.seq, "release_hash": new.hash})
        renumbered[old.seq] = ledger.append(event)
    write_run_report(dst, signing_key=key)
    return dst


def _raise_noise(event):
    if isinstance(event, GaussianRoundEvent):
        return dataclasses.replace(event, noise_multiplier=event.noise_multiplier * 4.3,
                                   noise_std_total=event.noise_std_total * 4.3)
    return event


def _delete_rounds_2_and_3(event):
    if isinstance(event, GaussianRoundEvent) and event.round in (2, 3):
        return None
    if isinstance(event, AuditEvent) and event.details.get("round") in (2, 3):
        return None
    return event


def _claim_sampling_rate(event):
    if isinstance(event, GaussianRoundEvent):
        return dataclasses.replace(event, sampling_rate=0.01)
    return event


@pytest.mark.parametrize("name, change, first_seq, field", [
    ("noise", _raise_noise, 2, "payload.noise_multiplier"),
    ("deleted-rounds", _delete_rounds_2_and_3, 4, "kind"),
    ("sampling", _claim_sampling_rate, 2, "payload.sampling_rate"),
])
def test_a_ledger_rewritten_and_resigned_with_the_real_key_fails_verify_with_receipts(run, name, change, first_seq,
                                                                                      field):
    forged = _forge(run, name, change)
    # Without receipts the forgery is perfect: signed by the real key, the report reissued.
    plain = verify_report(forged, public_key=run["public"])
    assert plain.ok, plain.problems
    honest = verify_report(run["run_dir"], public_key=run["public"])
    # a lower epsilon: against the server, or (the sampling claim) the amplified one beside it
    assert plain.epsilon_recomputed < honest.epsilon_recomputed or plain.epsilon_amplified < honest.epsilon_amplified
    r = _verify(forged, run["public"], run["receipts"])
    assert r.exit_code == 8, r.output
    lines = [line for line in r.output.splitlines() if "receipts:" in line]
    assert lines, r.output
    # Each problem names the file, the seq, the kind and what differs.
    hit = [line for line in lines if f"seq {first_seq} (gaussian_round)" in line]
    assert len(hit) == DEVICES - 2, r.output  # every device that took part holds the release
    assert all("receipts-run-rcpt0001-" in line and field in line for line in hit)


def test_device_receipts_export_through_the_cli_and_nothing_to_export_is_refused(run, tmp_path):
    location = _location(run["fleet"], 0)
    base = ["--store", str(location.store), "--keystore", str(location.keystore)]
    out = tmp_path / "mine"
    r = runner.invoke(cli_app, ["device", "receipts", "export", str(out), *base])
    assert r.exit_code == 0, r.output
    (path,) = receipt_files(out)
    rf = read_receipt_file(path)
    assert rf.run_id == run["run_dir"].name and len(rf.receipts) == 3
    r = _verify(run["run_dir"], run["public"], out)
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli_app, ["device", "receipts", "export", str(out), "--run", "run-other", *base])
    assert r.exit_code != 0 and "nothing to export" in r.output
    r = runner.invoke(cli_app, ["device", "history", *base])
    assert r.exit_code == 0, r.output
    assert "of your cap 10" in " ".join(r.output.split())
    r = runner.invoke(cli_app, ["device", "history", "--budget", "--json", *base])
    budget = json.loads(r.output)
    (row,) = budget["runs"]
    assert (row["run_id"], row["releases"], row["receipts"], row["pending"], row["alarms"]) == \
        (run["run_dir"].name, 3, 3, 0, [])
    assert budget["total_epsilon"] == pytest.approx(row["epsilon"]) and budget["max_epsilon"] == 10.0


# -- the device's checks, on real ledger lines in a real store ------------------------------------
@pytest.fixture
def lines(run):
    return [e.line().decode().rstrip("\n") for e in PrivacyLedger(run["run_dir"] / "ledger.jsonl").entries()]


@pytest.fixture
def key_hex(run):
    return public_key_hex(load_audit_key(run["run_dir"].parent / "audit_key.pem"))


def test_a_tampered_segment_is_refused_whole_and_the_run_refused_from_then_on(new_store, lines, key_hex):
    assert receipts_store.receive(new_store, "run-rcpt0001", key_hex, lines[:2]) is None
    tampered = list(lines[2:5])
    tampered[1] = tampered[1].replace('"survivors":', '"survivors": ', 1)  # one byte: not canonical any more
    assert receipts_store.receive(new_store, "run-rcpt0001", key_hex, tampered) is not None
    assert sorted(receipts_store.stored_lines(new_store, "run-rcpt0001")) == [1, 2]  # nothing of it kept
    (alarm,) = receipts_store.alarms(new_store, "run-rcpt0001")
    assert "seq 4" in alarm["reason"]
    # Even a good segment is refused now: the run has an alarm.
    assert receipts_store.receive(new_store, "run-rcpt0001", key_hex, lines[2:5]) is not None
    assert sorted(receipts_store.stored_lines(new_store, "run-rcpt0001")) == [1, 2]


def test_an_overlap_must_be_byte_identical_and_a_gap_is_not_kept(new_store, lines, key_hex, run):
    assert receipts_store.receive(new_store, "r1", key_hex, lines[:3]) is None
    assert receipts_store.receive(new_store, "r1", key_hex, lines[1:5]) is None  # overlap 2-3, new 4-5
    assert sorted(receipts_store.stored_lines(new_store, "r1")) == [1, 2, 3, 4, 5]
    assert receipts_store.receive(new_store, "r1", key_hex, lines[6:]) is None  # starts after a gap: not kept
    assert sorted(receipts_store.stored_lines(new_store, "r1")) == [1, 2, 3, 4, 5]
    assert receipts_store.alarms(new_store, "r1") == []
    # The same seq re-signed with the real key (another timestamp): an alarm naming seq and kind.
    key = load_audit_key(run["run_dir"].parent / "audit_key.pem")
    resigned = run["root"] / "resigned.jsonl"
    entries = PrivacyLedger(run["run_dir"] / "ledger.jsonl").entries()
    resigned.write_bytes(b"".join(e.line() for e in entries[:3]))
    ledger = PrivacyLedger(resigned, key)
    ledger.append(entries[3].event)
    forged = [e.line().decode().rstrip("\n") for e in ledger.entries()]
    assert receipts_store.receive(new_store, "r1", key_hex, forged[2:4]) is not None
    (alarm,) = receipts_store.alarms(new_store, "r1")
    assert "seq 4 (gaussian_round) differs" in alarm["reason"] and "timestamp" in alarm["reason"]


def test_a_changed_run_key_is_refused_and_raises_an_alarm(new_store, lines, key_hex, tmp_path):
    assert receipts_store.receive(new_store, "r2", key_hex, lines[:2]) is None
    other = public_key_hex(generate_audit_key(tmp_path / "other.pem"))
    assert receipts_store.receive(new_store, "r2", other, []) == "the run's ledger key changed"
    assert receipts_store.pinned_key(new_store, "r2") == key_hex
    assert [a["reason"] for a in receipts_store.alarms(new_store, "r2")] == [
        "the run's ledger key differs from the key pinned at its first message"]
    # A segment signed by another key under the right announced key fails its signatures.
    assert receipts_store.receive(new_store, "r3", other, lines[:2]) is not None
    assert "signature" in receipts_store.alarms(new_store, "r3")[0]["reason"]


def test_pending_spends_count_until_a_receipt_settles_them(new_store, lines, key_hex):
    run_id = "run-rcpt0001"
    spend = Spend(run_id, 1, 0, 1.0, 1.0, 1e-3, "add_remove")
    assert receipts_store.may_spend(new_store, spend)
    receipts_store.record_spend(new_store, spend)
    receipts_store.record_spend(new_store, spend)  # idempotent per release
    (pending,) = receipts_store.spends(new_store)
    assert not pending.settled
    one = receipts_store.total_epsilon(new_store)
    assert one == pytest.approx(device_epsilon([spend])) and one > 3  # a pending spend counts in full
    receipts_store.set_max_epsilon(new_store, 4.0)
    assert not receipts_store.may_spend(new_store, dataclasses.replace(spend, round=2))
    assert receipts_store.may_spend(new_store, spend)  # the same release is not counted twice
    assert receipts_store.receive(new_store, run_id, key_hex, lines) is None
    (settled,) = receipts_store.spends(new_store)
    release_seq = next(i + 1 for i, line in enumerate(lines) if '"kind":"gaussian_round"' in line)
    assert settled.receipt_seq == release_seq
    assert receipts_store.total_epsilon(new_store) == pytest.approx(one)  # never below the worst case


def test_the_cap_check_without_scipy_agrees_with_the_accountant_at_the_boundary():
    for adjacency in ("add_remove", "replace_one"):
        for z, n in ((0.8, 1), (1.0, 3), (2.5, 7)):
            spends = [Spend("r", i, 0, z, 1.0, 1e-5, adjacency) for i in range(n)]
            eps = device_epsilon(spends)
            assert within_cap(spends, eps * (1 + 1e-6)) and not within_cap(spends, eps * (1 - 1e-6))
    # mixed adjacencies: accounted under replace-one for all (it dominates)
    mixed = [Spend("a", 1, 0, 1.0, 1.0, 1e-5, "add_remove"), Spend("b", 1, 0, 1.0, 1.0, 1e-4, "replace_one")]
    assert device_epsilon(mixed) == pytest.approx(device_epsilon([dataclasses.replace(s, adjacency="replace_one",
                                                                                      delta=1e-5) for s in mixed]))
    assert gaussian_delta(1.0, 50.0) == 0.0


def test_an_older_store_gains_the_receipt_tables(tmp_path, fast_argon2):
    with DeviceStore.create(tmp_path / "s", "correct horse", argon2=fast_argon2) as s:
        for table in ("run_keys", "ledger_entries", "spends", "run_alarms"):
            s.conn.execute(f"DROP TABLE {table}")
        s.conn.execute("PRAGMA user_version = 2")
    with DeviceStore.open(tmp_path / "s", "correct horse") as s:
        assert s.schema_version == 3
        assert receipts_store.runs(s) == [] and receipts_store.max_epsilon(s) == 10.0
        assert json.loads(json.dumps(receipts_store.total_epsilon(s))) == 0.0


def test_a_restored_export_keeps_the_receipts_and_spends(run, tmp_path, fast_argon2):
    """`device export` then an import into a new store: the pinned key, the received ledger
    entries, the spends and their receipts come back, so the restored device's own epsilon
    is the same (a restore that forgot its spends would under-count its budget)."""
    with open_device_store(_location(run["fleet"], 0)) as store:
        export = tmp_path / "device.jsonl"
        export.write_text("\n".join(store.export_lines()) + "\n")
        (anchor,) = receipts_store.runs(store)
        lines, mine = receipts_store.stored_lines(store, anchor.run_id), receipts_store.spends(store)
    assert mine and lines
    with DeviceStore.create(tmp_path / "restored", "correct horse", argon2=fast_argon2) as restored:
        report = run_import(restored, export)
        assert report.inserted["spends"] == len(mine) and report.inserted["ledger_entries"] == len(lines)
        (again,) = receipts_store.runs(restored)
        assert receipts_store.stored_lines(restored, again.run_id) == lines
        assert receipts_store.spends(restored) == mine
        assert again.epsilon == pytest.approx(anchor.epsilon) and again.key_fingerprint == anchor.key_fingerprint
        second = run_import(restored, export)  # a second restore adds nothing
        assert second.inserted["spends"] == 0 and second.inserted["ledger_entries"] == 0


def test_a_restore_keeps_the_owners_cap_and_never_loosens_one(tmp_path, fast_argon2):
    """The owner's epsilon cap travels with the export; a store that has its own keeps the
    tighter of the two."""
    with DeviceStore.create(tmp_path / "a", "correct horse", argon2=fast_argon2) as a:
        receipts_store.set_max_epsilon(a, 3.0)
        export = tmp_path / "a.jsonl"
        export.write_text("\n".join(a.export_lines()) + "\n")
    with DeviceStore.create(tmp_path / "b", "correct horse", argon2=fast_argon2) as b:
        assert receipts_store.max_epsilon(b) == 10.0
        assert run_import(b, export).inserted["owner_settings"] == 1
        assert receipts_store.max_epsilon(b) == 3.0
    with DeviceStore.create(tmp_path / "c", "correct horse", argon2=fast_argon2) as c:
        receipts_store.set_max_epsilon(c, 2.0)
        run_import(c, export)
        assert receipts_store.max_epsilon(c) == 2.0  # the tighter cap stays
