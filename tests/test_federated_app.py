"""The federation end to end on an in-process Grid: the real ServerApp loop, the real ClientApp
with all its mods (egress guard, secure aggregation, DP), real encrypted stores, the real
signed ledger and accountant. Only Flower's transport is replaced (privacy/secagg/harness.py);
tests/test_federated_sim.py runs the same apps on Flower's simulation engine."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Context, RecordDict

import restwise.client.app as client_app_module
from restwise.client.app import DeviceLocation, DeviceLocator, SIM_KEYSTORE_DIR, device_folder_name, make_client_app, open_device_store
from restwise.client.dataset import daily_data
from restwise.models.recovery_mlp import LOSS_SLOT
from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.dp_mods import clip_update
from restwise.privacy.events import AuditEvent, BudgetRefusalEvent, GaussianRoundEvent
from restwise.privacy.ledger import load_public_key, verify_ledger_file
from restwise.privacy.secagg.harness import InProcessGrid
from restwise.server import app as server_app_module
from restwise.server.app import FederatedServer, initial_checkpoint
from restwise.privacy.secagg import records as SR
from restwise.privacy.verify import verify_report
from restwise.server.rundir import Checkpoint, RunFiles, open_ledger, read_progress, write_report
from restwise.server.runconfig import RunConfig
from restwise.simulation.fleet import prepare_fleet

FLEET_SIZE = 10
NODE_BASE = 1000


@pytest.fixture(scope="module")
def template_fleet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fleet-template")
    cfg = _config(population=FLEET_SIZE)
    prepare_fleet(root / "fleet", cfg, demo_days=90)
    return root / "fleet"


def _config(**changes) -> RunConfig:
    base = dict(
        name="test", rounds=2, population=8, sampling="poisson", sampling_rate=1.0, noise_multiplier=1.0,
        delta=1e-3, clip_norm=1.0, secagg_num_neighbours=4, secagg_threshold=3, max_dropout_fraction=0.3,
        local_epochs=1, learning_rate=0.003, batch_size=32, round_timeout_s=30.0, dataset="demo", seed=3,
        force=True,  # the network under DP on 8 devices: the planner refuses it (tested below)
    )
    base.update(changes)
    return RunConfig(**base)


class Federation:
    """A run directory, a copied fleet and an in-process grid of real ClientApps."""

    def __init__(self, tmp_path: Path, template: Path, config: RunConfig, *, drop_at=None, dp_rng_factory=None):
        self.config = config
        self.run_dir = tmp_path / "run-test0001"
        self.run_dir.mkdir()
        self.fleet = self.run_dir / "fleet"
        shutil.copytree(template, self.fleet, symlinks=True)
        self.app = make_client_app(DeviceLocator(self.fleet), dp_rng_factory=dp_rng_factory)
        self.node_ids = [NODE_BASE + i for i in range(config.population)]
        self.grid = InProcessGrid(self.app, self.node_ids, drop_at=drop_at or {})
        for i, nid in enumerate(self.node_ids):
            self.grid.contexts[nid] = Context(run_id=1, node_id=nid, node_config={"partition-id": i}, state=RecordDict(), run_config={})
        self.files = RunFiles(self.run_dir)

    def server(self, **kwargs) -> FederatedServer:
        return FederatedServer(
            self.config, self.run_dir, run_id=self.run_dir.name, ledger=open_ledger(self.run_dir, self.config),
            node_wait_s=0.5, **kwargs,
        )

    def run(self, **kwargs):
        return self.server(**kwargs).run(self.grid)

    def store(self, i: int):
        return open_device_store(DeviceLocation(self.fleet / device_folder_name(i), self.fleet / SIM_KEYSTORE_DIR))

    def ledger_events(self):
        return open_ledger(self.run_dir, self.config).events()

    def checkpoint(self) -> Checkpoint:
        return Checkpoint.from_bytes(self.files.checkpoint.read_bytes())


def _applied(fed: Federation) -> list[AuditEvent]:
    """The ledger's release.applied entries (written after the checkpoint, naming its hash)."""
    return [e for e in fed.ledger_events() if isinstance(e, AuditEvent) and e.action == "release.applied"]


def _flat(ckpt: Checkpoint) -> np.ndarray:
    return np.concatenate([a.astype(np.float64).reshape(-1) for a in ckpt.arrays])


def test_every_wire_name_is_defined_once_in_the_package():
    # Client and server share record names and error codes through privacy/wire.py only: the
    # literal of each appears in no other production module.
    from restwise.privacy import wire

    root = Path(wire.__file__).resolve().parents[1]
    sources = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("tests", "build", "docs") and not d.startswith((".", "__"))]
        sources += [Path(folder) / f for f in files if f.endswith(".py")]
    sources = [p for p in sources if p.resolve() != Path(wire.__file__).resolve()]
    literals = [v for k, v in vars(wire).items() if k.isupper() and isinstance(v, str) and v.startswith("restwise.")]
    literals += [v for k, v in vars(wire).items() if k.startswith("ERROR_CODE_")]
    assert len(literals) >= 15
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for literal in literals:
            token = f'= "{literal}"' if isinstance(literal, str) else f"= {literal}"
            assert token not in text, f"{path.relative_to(root)} defines {literal!r} again"


def test_rounds_train_the_global_model_and_every_release_is_in_the_signed_ledger(tmp_path, template_fleet):
    fed = Federation(tmp_path, template_fleet, _config())
    summary = fed.run()
    assert summary.status == "completed" and summary.rounds_completed == 2
    # The global model moved away from its initialisation.
    start, end = _flat(initial_checkpoint(fed.config)), _flat(fed.checkpoint())
    assert np.linalg.norm(end - start) > 1e-3
    releases = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    assert [e.round for e in releases] == [1, 2]
    t_min = 8 - math.floor(0.3 * 8)  # the secure round releases with >= 6 of 8
    for e in releases:
        assert e.survivors == 8 and e.planned_clients == 8 and e.clip_norm == 1.0
        # Distributed noise under add/remove: shares sized for t_min - 1 = 5 (a person's own share
        # never counts); with 8 survivors the 7 others protect them -> std z C sqrt(7/5).
        assert e.noise_std_total == pytest.approx(1.0 * math.sqrt(7 / (t_min - 1)))
        assert e.noise_multiplier == pytest.approx(e.noise_std_total)
        assert len(e.model_hash) == 64  # written ahead: the commitment to the masked sum
    # The model each release built is named after the checkpoint was stored.
    applied = _applied(fed)
    assert [(a.details["round"], a.details["attempt"]) for a in applied] == [(1, 0), (2, 0)]
    assert applied[1].details["model_hash"] == fed.checkpoint().model_hash()
    lines = fed.files.round_lines()
    assert [l["round"] for l in lines] == [1, 2] and all(l["status"] == "completed" for l in lines)
    acc = PrivacyAccountant()
    assert lines[0]["epsilon"] == pytest.approx(acc.epsilon(releases[:1], 1e-3).epsilon)
    assert lines[1]["epsilon"] == pytest.approx(acc.epsilon(releases, 1e-3).epsilon)
    assert lines[1]["epsilon"] > lines[0]["epsilon"] > 0
    assert summary.epsilon == pytest.approx(lines[1]["epsilon"])
    # No per-device metric leaves a device (issue 15): the round's training loss is the
    # survivors' mean from the loss slot of the released sum, with its noise std (z C sqrt(8/5)
    # of the whole sum, scaled by L / (2 beta C m)).
    slot = LOSS_SLOT
    for l in lines:
        assert math.isfinite(l["train_loss"])
        assert l["train_loss_std"] == pytest.approx(math.sqrt(8 / 5) * slot.max_loss / (2 * slot.beta * 8))
    # The ledger is hash-chained and signed by the server's audit key: the forced plan, then
    # per round the release (spent, before any unmasking share) and its model (applied).
    entries, verification = verify_ledger_file(fed.run_dir / "ledger.jsonl", load_public_key(fed.run_dir / "public_key.pem"))
    assert verification.signed and verification.entries == 5
    assert [getattr(e.event, "action", e.event.kind) for e in entries[1:]] == \
        ["gaussian_round", "release.applied", "gaussian_round", "release.applied"]
    assert [a.details["release_seq"] for a in applied] == [entries[1].seq, entries[3].seq]
    forced = entries[0].event
    assert isinstance(forced, AuditEvent) and forced.action == "plan.forced" and forced.target == fed.run_dir.name
    assert forced.details["noise_to_signal"] > 1 and "recovery-mlp" in forced.details["message"]
    state = json.loads((fed.run_dir / "state.json").read_text())
    # The rounds are over; "completed" is the status only once the report is anchored
    # (rundir.finish_run, which the runner calls after the ServerApp).
    assert state["status"] == "finishing" and state["outcome"] == "completed" and state["current_round"] == 2
    # Each device logged what it sent, under the run's id, and kept its personal model.
    with fed.store(0) as store:
        history = store.egress_history()
        model_row = store.load_model_state("recovery_model")
    kinds = [h["message_type"] for h in history]
    # One session: a setup round (4 messages), then a fast round (2); no separate hello; then
    # the run's last ledger entries (device receipts), answered with an empty message.
    assert kinds == ["train:setup", "train:share-keys", "train:collect-masked-input", "train:unmask",
                     "train:collect-masked-input", "train:unmask", "query.restwise_receipts"]
    assert history[-1]["records"] == [] and history[-1]["n_bytes"] < 100
    assert {h["run_id"] for h in history} == {fed.run_dir.name}
    sent = {r["name"] for h in history for r in h["records"]}
    assert "update" not in sent and "secagg.masked-input" in sent
    assert model_row is not None and model_row[1]["run_id"] == fed.run_dir.name


def test_thirty_percent_failing_clients_do_not_stop_training(tmp_path, template_fleet, monkeypatch):
    # A complete graph (k = n - 1): any 3 of 10 may fail; sparse graphs tolerate k - t per neighbourhood.
    cfg = _config(population=10, max_dropout_fraction=0.4, secagg_num_neighbours=9, secagg_threshold=5)
    fed = Federation(tmp_path, template_fleet, cfg)
    failing = {str(fed.fleet / device_folder_name(i)) for i in (1, 4, 7)}
    real_update = client_app_module.local_update

    def flaky_update(store, *args, **kwargs):
        if str(store.folder) in failing:
            raise RuntimeError("simulated device crash during training")
        return real_update(store, *args, **kwargs)

    monkeypatch.setattr(client_app_module, "local_update", flaky_update)
    summary = fed.run()
    assert summary.status == "completed"
    releases = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    assert [e.round for e in releases] == [1, 2]
    assert all(e.survivors == 7 and e.planned_clients == 10 for e in releases)
    lines = fed.files.round_lines()
    assert [(l["sampled"], l["survived"], l["dropped"]) for l in lines] == [(10, 7, 3)] * 2
    assert all(l["epsilon"] > 0 for l in lines)
    assert np.linalg.norm(_flat(fed.checkpoint()) - _flat(initial_checkpoint(cfg))) > 1e-3


def test_nan_and_huge_updates_cannot_move_the_aggregate_beyond_the_clip_bound(tmp_path, template_fleet, monkeypatch):
    # Noise-free devices (zero-noise generator) so the released sum can be checked exactly.
    class ZeroNoise:
        def normal(self, loc, scale, size):
            return np.zeros(size)

    cfg = _config(rounds=1, population=8)
    fed = Federation(tmp_path, template_fleet, cfg, dp_rng_factory=ZeroNoise)
    honest: dict[str, np.ndarray] = {}
    real_update = client_app_module.local_update
    nan_dev, huge_dev = str(fed.fleet / device_folder_name(0)), str(fed.fleet / device_folder_name(1))

    def adversarial_update(store, *args, **kwargs):
        update, loss = real_update(store, *args, **kwargs)
        key = str(store.folder)
        if key == nan_dev:
            update = update.copy()
            update[3] = np.nan
        elif key == huge_dev:
            update = np.full_like(update, 1e6)
        else:
            honest[key] = update
        return update, loss

    monkeypatch.setattr(client_app_module, "local_update", adversarial_update)
    before = _flat(initial_checkpoint(cfg))
    summary = fed.run()
    assert summary.status == "completed"
    (release,) = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    assert release.survivors == 7  # the NaN device refused on the device and was excluded
    total = (_flat(fed.checkpoint()) - before) * cfg.expected_cohort
    honest_sum = sum(clip_update(v, cfg.clip_norm)[0][:-1] for v in honest.values())  # [:-1]: not the loss slot
    intruder = total - honest_sum
    # The huge device moved the sum by exactly its clipped contribution: norm <= C.
    assert np.linalg.norm(intruder) <= cfg.clip_norm * (1 + 1e-3) + 1e-4
    assert np.linalg.norm(intruder) > 0.9 * cfg.clip_norm


def test_the_released_training_loss_is_the_survivors_mean_loss_and_no_vector_exceeds_c(tmp_path, template_fleet,
                                                                                       monkeypatch):
    # Real secure aggregation of 8 devices, noise-free devices (zero-noise generator): the loss
    # decoded from the released sum's slot equals the mean of the devices' own losses (to the
    # fixed-point encoding), although no device sent its loss; every shared vector has norm <= C.
    class ZeroNoise:
        def normal(self, loc, scale, size):
            return np.zeros(size)

    cfg = _config(rounds=1, population=8, clip_norm=0.5)
    fed = Federation(tmp_path, template_fleet, cfg, dp_rng_factory=ZeroNoise)
    losses, norms = [], []
    real_update = client_app_module.local_update

    def recording_update(store, *args, **kwargs):
        vector, loss = real_update(store, *args, **kwargs)
        losses.append(loss)
        norms.append(float(np.linalg.norm(vector)))
        return vector, loss

    monkeypatch.setattr(client_app_module, "local_update", recording_update)
    assert fed.run().status == "completed"
    (line,) = fed.files.round_lines()
    assert len(losses) == line["survived"] == 8
    assert max(norms) <= cfg.clip_norm and max(norms) > 0.9 * cfg.clip_norm  # updates are clipped: the slot fits
    expected = float(np.mean(np.clip(losses, 0.0, LOSS_SLOT.max_loss)))
    assert 0.05 < expected < LOSS_SLOT.max_loss
    assert line["train_loss"] == pytest.approx(expected, abs=1e-5)
    assert line["train_loss_std"] > 0  # the std of the noise the run accounts, whatever this test's devices drew
    assert fed.checkpoint().meta["train_loss"] == line["train_loss"]


def test_a_round_losing_more_than_the_threshold_fails_cleanly(tmp_path, template_fleet, monkeypatch):
    import restwise.privacy.secagg.harness as harness

    # The harness drops a node at every message without a secure-aggregation stage; our hello
    # comes before the protocol, so a node dropping at the collect stage still answers it.
    real_index = harness._stage_index
    monkeypatch.setattr(harness, "_stage_index", lambda stage: -1 if stage == "" else real_index(stage))
    drop = {NODE_BASE + i: "collect-masked-input" for i in range(4)}  # 4 of 8 > 30%
    fed = Federation(tmp_path, template_fleet, _config(rounds=1, round_timeout_s=1.0), drop_at=drop)
    summary = fed.run()
    assert summary.status == "failed"
    events = fed.ledger_events()
    assert not any(isinstance(e, GaussianRoundEvent) for e in events)
    (failed,) = [e for e in events if isinstance(e, AuditEvent) and e.action != "plan.forced"]
    assert failed.action == "round.failed" and failed.details["round"] == 1 and failed.details["released"] is False
    assert not fed.files.checkpoint.exists()  # nothing released, no model
    (line,) = fed.files.round_lines()
    assert line["status"] == "failed" and line["epsilon"] == 0.0 and "aborted" in line["reason"]


def _stop_after_first_round(server: FederatedServer) -> FederatedServer:
    rounds_done = []
    original = server.run_round

    def counting(grid, rnd, ckpt):
        out = original(grid, rnd, ckpt)
        rounds_done.append(rnd)
        return out

    server.run_round = counting
    server._should_stop = lambda: len(rounds_done) >= 1
    return server


def test_a_stopped_run_resumes_from_the_last_completed_round(tmp_path, template_fleet):
    fed = Federation(tmp_path, template_fleet, _config(rounds=2))
    summary = _stop_after_first_round(fed.server()).run(fed.grid)
    assert summary.status == "stopped" and fed.checkpoint().round == 1
    assert json.loads((fed.run_dir / "state.json").read_text())["outcome"] == "stopped"
    summary = fed.run()
    assert summary.status == "completed" and fed.checkpoint().round == 2
    releases = [(e.round, e.attempt) for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    assert releases == [(1, 0), (2, 0)]  # round 1 was not repeated
    assert [l["round"] for l in fed.files.round_lines()] == [1, 2]


def test_a_crash_after_a_release_reruns_the_round_as_a_new_accounted_attempt(tmp_path, template_fleet, monkeypatch):
    fed = Federation(tmp_path, template_fleet, _config(rounds=3))
    _stop_after_first_round(fed.server()).run(fed.grid)
    after_one = fed.checkpoint()
    # The next attempt crashes after round 2 was released (ledger) but before its checkpoint.
    real_write = server_app_module.atomic_write_bytes

    def crash_on_checkpoint(path, data, *args, **kwargs):
        if path.name == "checkpoint":
            raise OSError("power loss")
        return real_write(path, data, *args, **kwargs)

    monkeypatch.setattr(server_app_module, "atomic_write_bytes", crash_on_checkpoint)
    with pytest.raises(OSError):
        fed.run()
    monkeypatch.setattr(server_app_module, "atomic_write_bytes", real_write)
    assert fed.checkpoint().round == 1 and np.array_equal(_flat(fed.checkpoint()), _flat(after_one))

    summary = fed.run()
    releases = [(e.round, e.attempt) for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    # Round 2's first release was computed, so it stays accounted; its re-run is attempt 1.
    assert releases == [(1, 0), (2, 0), (2, 1)]
    assert fed.checkpoint().round == 2
    # The restart settled the interrupted release: spent, not applied; the re-run was applied.
    settled = [(e.action, e.details["round"], e.details["attempt"]) for e in fed.ledger_events()
               if isinstance(e, AuditEvent) and e.action.startswith("release.")]
    assert settled == [("release.applied", 1, 0), ("release.not-applied", 2, 0), ("release.applied", 2, 1)]
    # The crash cost a release: the planned budget of 3 releases leaves no room for round 3.
    assert summary.status == "refused"
    refusals = [e for e in fed.ledger_events() if isinstance(e, BudgetRefusalEvent)]
    assert [r.round for r in refusals] == [3]


def test_a_round_that_would_exceed_the_budget_is_refused_before_anything_is_sent(tmp_path, template_fleet):
    cfg = _config(rounds=1, noise_multiplier=None, target_epsilon=3.0)
    fed = Federation(tmp_path, template_fleet, cfg)
    assert fed.run().status == "completed"
    sent_before = [len(_history(fed, i)) for i in range(cfg.population)]
    # Lose the checkpoint: re-running the (only) round would be a second release: over budget.
    (fed.run_dir / "rounds.jsonl").unlink()
    (fed.run_dir / "checkpoint").unlink()
    summary = fed.run()
    assert summary.status == "refused" and "budget" in summary.reason
    refusals = [e for e in fed.ledger_events() if isinstance(e, BudgetRefusalEvent)]
    assert len(refusals) == 1 and refusals[0].budget_epsilon >= 3.0 and refusals[0].projected_epsilon > 3.0
    assert [len(_history(fed, i)) for i in range(cfg.population)] == sent_before
    assert json.loads((fed.run_dir / "state.json").read_text())["outcome"] == "refused"


def _history(fed: Federation, i: int) -> list[dict]:
    with fed.store(i) as store:
        return store.egress_history()


def test_a_person_who_opted_out_sends_only_a_no(tmp_path, template_fleet):
    fed = Federation(tmp_path, template_fleet, _config(rounds=1))
    with fed.store(2) as store:
        store.set_consent(fed.run_dir.name, False)
    summary = fed.run()
    assert summary.status == "completed"
    (release,) = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    assert release.survivors == 7
    history = _history(fed, 2)
    # Consent is asked at the round's first message; the "no" is the protocol's "not taking part".
    assert [h["message_type"] for h in history] == ["train:setup"]
    assert [r["name"] for r in history[0]["records"]] == ["secagg.not-taking-part"]
    with fed.store(2) as store:
        assert store.load_model_state("recovery_model") is None  # never trained


def test_central_noise_is_added_by_the_server_and_accounted_at_z(tmp_path, template_fleet):
    fed = Federation(tmp_path, template_fleet, _config(rounds=1, noise="central", noise_multiplier=1.3))
    assert fed.run().status == "completed"
    (release,) = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    assert release.noise_std_total == pytest.approx(1.3) and release.noise_multiplier == pytest.approx(1.3)


def test_fixed_size_sampling_is_accounted_as_such(tmp_path, template_fleet):
    cfg = _config(rounds=1, sampling="fixed", sampling_rate=None, cohort_size=5, secagg_num_neighbours=4, secagg_threshold=3)
    fed = Federation(tmp_path, template_fleet, cfg)
    summary = fed.run()
    assert summary.status == "completed"
    (release,) = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    assert release.sampling == "fixed" and release.cohort_size == 5 and release.population == 8
    assert release.sampling_rate == pytest.approx(5 / 8) and release.planned_clients == 5
    # Replace-one adjacency. The headline is against the server (which knows the cohort); the
    # amplified K-of-N value (5 of 8), for third parties, stands beside it, smaller.
    assert release.adjacency == "replace_one"
    result = PrivacyAccountant().epsilon([release], cfg.delta)
    amplified = PrivacyAccountant(claim_amplification=True).epsilon([release], cfg.delta)
    assert not result.amplification_claimed and amplified.epsilon < result.epsilon == amplified.epsilon_no_amplification
    (line,) = fed.files.round_lines()
    assert line["epsilon"] == pytest.approx(result.epsilon) and line["sampled"] == 5
    assert line["epsilon_amplified"] == pytest.approx(amplified.epsilon)
    # The run's report headlines that epsilon, with the K-of-N value beside it, and verifies.
    write_report(fed.run_dir)
    report = json.loads((fed.run_dir / "report.json").read_text())
    at_report_delta = PrivacyAccountant().epsilon([release], report["delta"])
    assert report["epsilon"] == pytest.approx(at_report_delta.epsilon) and not report["amplification_claimed"]
    assert report["epsilon_amplified"] == pytest.approx(
        PrivacyAccountant(claim_amplification=True).epsilon([release], report["delta"]).epsilon)
    assert report["epsilon_amplified"] < report["epsilon"]
    assert verify_report(fed.run_dir, public_key=fed.run_dir / "public_key.pem").ok


def test_k_of_n_draws_over_the_whole_population_when_devices_are_offline(tmp_path):
    """5 of 8 with only 4 of the 8 devices connected: each connected device is drawn with the
    accounted probability 5/8 (the offline ones drop out if drawn), never 5/4 of the 4."""
    cfg = _config(sampling="fixed", sampling_rate=None, cohort_size=5)
    run_dir = tmp_path / "run-sample"
    run_dir.mkdir()
    server = FederatedServer(cfg, run_dir, run_id=run_dir.name, ledger=open_ledger(run_dir, cfg),
                             sampling_rng=np.random.default_rng(11))
    online = [2**63 - 5, 2**63 + 7, 2**64 - 3, 12]  # real node ids are unsigned 64-bit
    draws = [server.sample(online) for _ in range(4000)]
    assert all(set(d) <= set(online) and len(d) <= 5 for d in draws)
    for node in online:
        assert sum(node in d for d in draws) / len(draws) == pytest.approx(5 / 8, abs=0.03)
    everyone = list(range(100, 108))
    assert all(len(server.sample(everyone)) == 5 for _ in range(50))


def test_a_stop_file_stops_the_run_before_the_next_round(tmp_path, template_fleet):
    fed = Federation(tmp_path, template_fleet, _config(rounds=1))
    (fed.run_dir / "STOP").touch()
    summary = fed.run()
    assert summary.status == "stopped" and summary.rounds_completed == 0
    assert json.loads((fed.run_dir / "state.json").read_text())["outcome"] == "stopped"
    assert _history(fed, 0) == []  # nothing was asked of any device
    (fed.run_dir / "STOP").unlink()
    assert fed.run().status == "completed"


def _load_linear_stats_module():
    import importlib.util

    path = Path(__file__).resolve().parent / "linear_stats_architecture.py"
    spec = importlib.util.spec_from_file_location("linear_stats_architecture", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_new_architecture_is_one_module_and_one_registry_line(tmp_path, template_fleet):
    """A one-release-of-statistics model (tests/linear_stats_architecture.py) runs through the
    whole federation - hello, egress guard, DP mod, secure aggregation, the release workflow,
    the signed ledger - with nothing else changed."""
    from restwise.models.registry import get_architecture, registered
    from restwise.server.runconfig import RunConfigError

    stats = _load_linear_stats_module()
    with pytest.raises(RunConfigError) as unknown:
        _config(model=stats.ARCHITECTURE.name)
    assert unknown.value.field == "model"
    with registered(stats.ARCHITECTURE):  # the one registry line
        with pytest.raises(RunConfigError) as rounds:
            _config(model=stats.ARCHITECTURE.name, rounds=2)
        assert rounds.value.field == "rounds"  # one release of statistics: exactly one round

        class ZeroNoise:  # noise-free devices, so the released sum can be checked exactly
            def normal(self, loc, scale, size):
                return np.zeros(size)

        cfg = _config(model=stats.ARCHITECTURE.name, rounds=1, noise_multiplier=1.0)
        fed = Federation(tmp_path, template_fleet, cfg, dp_rng_factory=ZeroNoise)
        summary = fed.run()
        assert summary.status == "completed", summary.reason
        (release,) = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
        # The release is calibrated to the architecture's documented bound, not the clip norm.
        assert release.clip_norm == pytest.approx(math.sqrt(5.0)) and release.survivors == cfg.population
        assert [a.details["model_hash"] for a in _applied(fed)] == [fed.checkpoint().model_hash()]
        # The model is the ridge solution of the devices' mean statistics.
        arch = get_architecture(stats.ARCHITECTURE.name)
        total = np.zeros(5)
        for i in range(cfg.population):
            with fed.store(i) as store:
                total += stats.statistics(arch.examples(daily_data(store)))
        (w,) = fed.checkpoint().arrays
        np.testing.assert_allclose(w, stats.solve(total / cfg.expected_cohort), atol=1e-4)
        assert 0.1 < w[1] < 1.0  # tomorrow's readiness follows today's
        with fed.store(0) as store:
            assert store.load_model_state(stats.ARCHITECTURE.state_name) is not None
    with pytest.raises(RunConfigError):
        _config(model=stats.ARCHITECTURE.name)  # unregistered again


# -- the linear head: one release of statistics, solved toward the prior, delivered (issue 12) --
def _few_days_device(fed: Federation, i: int, days: int = 12) -> None:
    """Replace device ``i`` of the copied fleet with a person who has only ``days`` days."""
    from restwise.client.importers import run_import
    from restwise.client.keys import FileKeystore
    from restwise.client.store import DeviceStore
    from restwise.simulation.fleet import write_demo_export

    folder = fed.fleet / device_folder_name(i)
    shutil.rmtree(folder)
    export = write_demo_export(9000 + i, fed.run_dir / "few-days.jsonl", days=days)
    with DeviceStore.create(folder, keystore=FileKeystore(fed.fleet / SIM_KEYSTORE_DIR)) as store:
        run_import(store, export)
    export.unlink()


def test_the_linear_head_is_one_release_solved_toward_the_prior_and_delivered(tmp_path, template_fleet, monkeypatch):
    from typer.testing import CliRunner

    from restwise.cli import app as restwise_app
    from restwise.client.coach_cli import advise
    from restwise.models.linear_head import SENSITIVITY, solve_with_prior, unpack_statistics
    from restwise.models.linear_head_architecture import ARCHITECTURE as head, HeadState, shipped_prior
    from restwise.privacy import wire
    from restwise.privacy.release import plan_release
    from restwise.server.rundir import write_report

    class ZeroNoise:  # noise-free devices: the released sum can be checked exactly
        def normal(self, loc, scale, size):
            return np.zeros(size)

    cfg = _config(model="linear-head", rounds=1, noise_multiplier=None, target_epsilon=4.0, force=False)
    fed = Federation(tmp_path, template_fleet, cfg, dp_rng_factory=ZeroNoise)
    _few_days_device(fed, 7)  # too few days: says no, sends nothing, not counted
    nan_dev = str(fed.fleet / device_folder_name(0))
    real_update = client_app_module.local_update

    def nan_statistics(store, *args, **kwargs):  # a device whose statistics hold NaN
        vector, loss = real_update(store, *args, **kwargs)
        if str(store.folder) == nan_dev:
            vector = vector.copy()
            vector[5] = np.nan
        return vector, loss

    monkeypatch.setattr(client_app_module, "local_update", nan_statistics)
    summary = fed.run()
    assert summary.status == "completed", summary.reason
    (line,) = fed.files.round_lines()
    assert (line["sampled"], line["participants"], line["survived"]) == (8, 7, 6)
    assert line["train_loss"] is None  # not collected

    # One Gaussian event with the architecture's sensitivity (sqrt 2), not the clip norm.
    (release,) = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    plan = plan_release(cfg.release_policy())
    z, t_min = plan.noise_multiplier, 7 - math.floor(0.3 * 7)
    assert release.clip_norm == pytest.approx(SENSITIVITY) and release.survivors == 6 and release.planned_clients == 8
    # Shares sized for t_min - 1 = 4 others; with 6 survivors the other 5 protect each person.
    assert release.noise_std_total == pytest.approx(z * SENSITIVITY * math.sqrt(5 / (t_min - 1)))
    assert line["epsilon"] == pytest.approx(PrivacyAccountant().epsilon([release], cfg.delta).epsilon)
    assert 0 < line["epsilon"] <= 4.0
    # Nothing forced, nothing failed: the one release, then its model.
    assert [e.action for e in fed.ledger_events() if isinstance(e, AuditEvent)] == ["release.applied"]

    # The server solved toward the shipped prior with the known noise of the sum (all 6 shares).
    total = np.zeros(head.statistics_length)
    for i in range(1, 7):
        with fed.store(i) as store:
            contribution = head.contribute(head.model_config(0), [], head.examples(daily_data(store)), None, None)
        total += contribution.vector
    A, b = unpack_statistics(total)
    share_std = z * SENSITIVITY / math.sqrt(t_min - 1)
    expected = solve_with_prior(A, b, shipped_prior().weights_for("readiness"), noise_std=share_std * math.sqrt(6),
                                devices=6)
    (weights,) = fed.checkpoint().arrays
    assert weights.dtype == np.float32 and weights.shape == (32,)
    np.testing.assert_allclose(weights, expected, atol=2e-3)
    assert np.linalg.norm(weights - shipped_prior().weights_for("readiness").weights) > 1e-3  # it moved
    model_hash = fed.checkpoint().model_hash()
    assert [a.details["model_hash"] for a in _applied(fed)] == [model_hash]

    # Delivered to every connected device; each keeps it with its own personal part.
    state = json.loads((fed.run_dir / "state.json").read_text())
    assert state["delivered"]["devices"] == 8 and state["delivered"]["model_hash"] == model_hash
    entry = [e for e in open_ledger(fed.run_dir, cfg).entries() if isinstance(e.event, GaussianRoundEvent)][0]
    for i in range(8):
        with fed.store(i) as store:
            blob, meta = store.load_model_state(head.state_name)
            kinds = [h["message_type"] for h in store.egress_history()]
        kept = HeadState.from_bytes(blob)
        np.testing.assert_array_equal(kept.weights, weights.astype(np.float64))
        assert meta["trained"] == "released" and meta["model_hash"] == model_hash
        assert (meta["ledger_seq"], meta["ledger_hash"]) == (entry.seq, entry.hash)
        assert kinds[-1] == wire.MODEL_MESSAGE_TYPE
        if i == 7:
            assert kinds == ["train:setup", wire.MODEL_MESSAGE_TYPE] and kept.personal is None  # said no at setup
        else:
            assert kept.personal is not None  # computed on the device, never sent
    with fed.store(0) as store:
        collect = [h for h in store.egress_history() if h["message_type"] == "train:collect-masked-input"]
        delivery = [h for h in store.egress_history() if h["message_type"] == wire.MODEL_MESSAGE_TYPE]
    # The NaN device's vector was refused on the device (its DP mod), before masking: its
    # secure-aggregation reply is "not taking part", no masked input.
    assert [r["name"] for r in collect[0]["records"]] == ["secagg.not-taking-part"]
    assert delivery[0]["records"] == []  # the reply to a delivery carries nothing
    with fed.store(1) as store:
        advice, _, status = advise(store)
    assert status == "stored (released): linear-head" and advice.model_note.startswith("model ")

    # Checkpointed, reported and verified: `restwise audit verify` recomputes epsilon.
    fed.files.write_config(cfg)  # what the runner writes before a run
    write_report(fed.run_dir)
    report = json.loads((fed.run_dir / "report.json").read_text())
    assert report["model"]["architecture"] == "linear-head"
    assert report["model"]["released_model_hash"] == model_hash and report["model"]["sensitivity"] == SENSITIVITY
    assert report["model"]["delivered"]["devices"] == 8
    r = CliRunner().invoke(restwise_app, ["audit", "verify", str(fed.run_dir / "report.json"),
                                          "--public-key", str(fed.run_dir / "public_key.pem")])
    assert r.exit_code == 0, r.output
    assert "1 release(s)" in r.output


def test_a_device_keeps_only_a_delivered_model_that_matches_its_hash_and_spec(tmp_path, template_fleet):
    from flwr.app import ConfigRecord

    from restwise.client.app import adopt_model
    from restwise.common.errors import ModelError
    from restwise.models.linear_head_architecture import ARCHITECTURE as head

    fed = Federation(tmp_path, template_fleet, _config(model="linear-head", rounds=1))
    arrays = [np.linspace(-0.1, 0.1, 32).astype(np.float32)]
    from restwise.common.arrays import arrays_sha256

    good = {"model": "linear-head", "model_config": head.model_config(0), "model_hash": arrays_sha256(arrays)}
    with fed.store(0) as store:
        assert adopt_model(store, head, arrays, ConfigRecord({**good, "model_hash": "0" * 64}), run_id="r", round_=1) \
            == "the arrays do not match the released model's hash"
        other_spec = good["model_config"].replace('"feature_spec_version": 1', '"feature_spec_version": 2')
        assert "feature spec" in adopt_model(store, head, arrays, ConfigRecord({**good, "model_config": other_spec}),
                                             run_id="r", round_=1)
        assert store.load_model_state(head.state_name) is None  # nothing kept
        store.set_consent("r", False)
        assert "consented" in adopt_model(store, head, arrays, ConfigRecord(good), run_id="r", round_=1)
        assert adopt_model(store, head, arrays, ConfigRecord(good), run_id="r2", round_=1) is None
        assert store.load_model_state(head.state_name)[1]["model_hash"] == good["model_hash"]
    with pytest.raises(ModelError, match="32 weights"):
        head.adopt(head.model_config(0), [np.zeros(5, dtype=np.float32)], None)


def test_the_planner_refuses_the_network_on_a_small_cohort_before_anything_is_sent(tmp_path, template_fleet):
    cfg = _config(rounds=1, force=False)
    verdict = cfg.plan()
    assert verdict.refused and not verdict.allowed and verdict.noise_to_signal > 1
    fed = Federation(tmp_path, template_fleet, cfg)
    summary = fed.run()
    assert summary.status == "refused" and "noise-to-signal" in summary.reason and "force" in summary.reason
    state = json.loads((fed.run_dir / "state.json").read_text())
    assert state["status"] == "refused" and f"{verdict.noise_to_signal:.2f}" in state["reason"]
    assert all(_history(fed, i) == [] for i in range(cfg.population))  # no device was asked anything
    assert not (fed.run_dir / "ledger.jsonl").exists() or fed.ledger_events() == []


def test_a_run_whose_prior_fails_its_checks_never_contacts_a_device(tmp_path, template_fleet, monkeypatch):
    import restwise.models.linear_head_architecture as lha
    from restwise.models.prior import SHIPPED_PRIOR_SHA256, load_prior
    from restwise.server.errors import PlanError

    tampered = tmp_path / "prior.json"
    data = json.loads(lha.shipped_prior().to_json())
    data["targets"]["readiness"]["weights"][0] += 0.5  # edited after it was hashed
    tampered.write_text(json.dumps(data))
    monkeypatch.setattr(lha, "shipped_prior", lambda: load_prior(tampered, expected_sha256=SHIPPED_PRIOR_SHA256))
    cfg = _config(model="linear-head", rounds=1)
    fed = Federation(tmp_path, template_fleet, cfg)
    with pytest.raises(PlanError, match="sha256 does not match its content"):
        fed.run()
    assert all(_history(fed, i) == [] for i in range(cfg.population))


def test_the_early_warning_is_learnt_from_one_release_and_used_by_the_coach(tmp_path, template_fleet):
    from restwise.client.coach_cli import advise
    from restwise.models.warning import SENSITIVITY
    from restwise.models.warning_architecture import ARCHITECTURE as warning_arch, WarningState

    cfg = _config(model="early-warning", rounds=1, noise_multiplier=None, target_epsilon=4.0, force=False)
    fed = Federation(tmp_path, template_fleet, cfg)
    summary = fed.run()
    assert summary.status == "completed", summary.reason
    (release,) = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    assert release.clip_norm == pytest.approx(SENSITIVITY) and release.survivors == 8
    (weights,) = fed.checkpoint().arrays
    assert weights.shape == (25,)
    with fed.store(2) as store:
        kept = WarningState.from_bytes(store.load_model_state(warning_arch.state_name)[0])
        advice, _, _ = advise(store)
    np.testing.assert_array_equal(kept.weights, weights.astype(np.float64))
    assert kept.personal is not None and set(kept.personal) == {"low_threshold", "scale", "base_rate"}
    assert advice.warning["model"].startswith("released model") and "the record below is the prior's" in advice.warning["model"]


# -- the run's secure-aggregation session in the real round (issues 14, 15, 17) ----------------
def test_each_release_is_accounted_before_any_unmasking_share_and_every_stage_is_in_the_progress(
        tmp_path, template_fleet):
    """Write-ahead accounting: the release's ledger entry exists before the server asks any
    device for an unmasking share, i.e. before it can compute the aggregate. Progress: every
    stage of a setup round and of a fast round, counts only."""
    fed = Federation(tmp_path, template_fleet, _config(rounds=2))
    fed.grid.record_transcript = True
    server = fed.server()
    ledger_append = server.release.ledger.append
    at_append: list[tuple[str, int, int]] = []

    def spy(event):
        rnd = fed.grid.current_round
        sent = [(stage, d) for d, _, stage, _, _ in fed.grid.transcript]
        at_append.append((event.kind if not isinstance(event, AuditEvent) else event.action,
                          sum(1 for stage, d in sent if d == "to-device" and stage == SR.STAGE_UNMASK),
                          rnd))
        return ledger_append(event)

    server.release.ledger.append = spy
    unmask_before: dict[int, int] = {}
    real_round = server.run_round

    def counting_round(grid, rnd, ckpt):
        unmask_before[rnd] = sum(1 for d, _, stage, _, _ in fed.grid.transcript if d == "to-device" and stage == SR.STAGE_UNMASK)
        return real_round(grid, rnd, ckpt)

    server.run_round = counting_round
    assert server.run(fed.grid).status == "completed"
    spent = [(unmasks, rnd) for kind, unmasks, rnd in at_append if kind == "gaussian_round"]
    assert [rnd for _, rnd in spent] == [1, 2]
    for unmasks, rnd in spent:  # no unmasking share of this round had been asked for
        assert unmasks == unmask_before[rnd]
    assert [k for k, _, _ in at_append if k != "plan.forced"] == ["gaussian_round", "release.applied"] * 2

    lines = read_progress(fed.run_dir)
    stages = [(l["round"], l["stage"]) for l in lines]
    first = [st for r, st in dict.fromkeys(stages) if r == 1]
    second = [st for r, st in dict.fromkeys(stages) if r == 2]
    assert first == ["waiting-for-nodes", "setup", "share-keys", "collect-masked-input", "unmask", "release"]
    assert second == ["waiting-for-nodes", "collect-masked-input", "unmask", "release"]
    ends = {(l["round"], l["stage"]): l for l in lines}
    assert (ends[(2, "collect-masked-input")]["expected"], ends[(2, "collect-masked-input")]["received"]) == (8, 8)
    assert (ends[(1, "release")]["received"], ends[(1, "release")]["dropped"]) == (8, 0)
    assert all(set(l) == {"at", "stage", "round", "attempt", "expected", "received", "dropped"} for l in lines)


def _shift_masked_input(node: int, rnd: int, delta: int):
    def tamper(n, stage, content):
        if n == node and stage == SR.STAGE_COLLECT and SR.MASKED_INPUT in content.array_records:
            grid_round = tamper.grid.current_round
            if grid_round == rnd:
                y = content.array_records[SR.MASKED_INPUT][SR.MASKED_ARRAY].numpy().copy()
                y += np.uint64(delta % 2**64)
                content.array_records[SR.MASKED_INPUT][SR.MASKED_ARRAY] = Array(y)
        return content
    return tamper


def test_a_device_adding_2_to_the_40_fails_its_round_closed_spent_not_applied(tmp_path, template_fleet):
    """Issue 15: the server refuses a decoded sum with a coordinate beyond survivors x clip
    range. The release was accounted ahead, so the round stays counted ("spent, not
    applied" in the ledger, the report and `audit verify`); the next round goes on."""
    from typer.testing import CliRunner

    from restwise.cli import app as restwise_app

    cfg = _config(rounds=2)
    fed = Federation(tmp_path, template_fleet, cfg)
    fed.grid.tamper = tamper = _shift_masked_input(NODE_BASE + 2, 1, 2**40)
    tamper.grid = fed.grid
    summary = fed.run()
    assert summary.status == "completed" and summary.rounds_completed == 2
    first, second = fed.files.round_lines()
    assert first["status"] == "failed" and first["spent"] is True and "exceed survivors x clip range" in first["reason"]
    assert first["epsilon"] > 0 and second["status"] == "completed"
    releases = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    assert [(e.round, e.attempt) for e in releases] == [(1, 0), (2, 0)]
    assert summary.epsilon == pytest.approx(PrivacyAccountant().epsilon(releases, cfg.delta).epsilon)
    (not_applied,) = [e for e in fed.ledger_events() if isinstance(e, AuditEvent) and e.action == "release.not-applied"]
    assert not_applied.details["failure"] == "sum-out-of-bounds" and not_applied.details["round"] == 1
    # The model moved once (round 2), from the initial model: round 1 changed nothing.
    assert [a.details["round"] for a in _applied(fed)] == [2]

    fed.files.write_config(cfg)
    write_report(fed.run_dir)
    report = json.loads((fed.run_dir / "report.json").read_text())
    assert [(r["round"], r["attempt"]) for r in report["spent_not_applied"]] == [(1, 0)]
    assert len(report["releases"]) == 2
    r = CliRunner().invoke(restwise_app, ["audit", "verify", str(fed.run_dir / "report.json"),
                                          "--public-key", str(fed.run_dir / "public_key.pem")])
    assert r.exit_code == 0, r.output
    assert "2 release(s)" in r.output and "spent, not applied: round 1 attempt 0" in r.output


@pytest.mark.parametrize("accused, released", [(1, True), (3, False), (4, False)])
def test_a_false_accuser_is_excluded_with_its_victims_and_the_round_stays_exact_or_spends_nothing(
        tmp_path, template_fleet, accused, released):
    """An accusation of bad shares excludes accuser and accused. Accusing 1 of 7 neighbours:
    6 of 8 remain, the minimum - released over them. Accusing 3: 4 remain, fewer than the
    minimum (and 4: 3) - the round aborts before the write-ahead entry: nothing spent."""
    cfg = _config(rounds=1, secagg_num_neighbours=7, secagg_threshold=5)  # complete graph of 8
    fed = Federation(tmp_path, template_fleet, cfg)
    liar = NODE_BASE + 5

    def tamper(node, stage, content):
        if node == liar and stage == SR.STAGE_COLLECT and SR.MASKED_STATUS in content.config_records:
            record = fed.grid.current_message.content.config_records[SR.SERVER_RECORD]
            content.config_records[SR.MASKED_STATUS]["bad_share_senders"] = list(record["src"])[:accused]
        return content

    fed.grid.tamper = tamper
    summary = fed.run()
    releases = [e for e in fed.ledger_events() if isinstance(e, GaussianRoundEvent)]
    (line,) = fed.files.round_lines()
    if released:
        assert summary.status == "completed"
        (release,) = releases
        assert release.survivors == 6 and line["survived"] == 6
    else:
        assert summary.status == "failed" and not releases and line["spent"] is False and line["epsilon"] == 0.0
        (failed,) = [e for e in fed.ledger_events() if isinstance(e, AuditEvent) and e.action == "round.failed"]
        assert failed.details["released"] is False
