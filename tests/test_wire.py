"""Wire-level check: what one device actually sends during a round.

Every reply leaving the ClientApp (after all mods: DP, secure aggregation, egress guard) is
captured and serialised exactly as a SuperNode pushes it to the SuperLink (Flower 1.42 sends a
message as its tree of inflatable objects: ``get_all_nested_objects(msg)``, each ``deflate()``d).
In those bytes we search for every value the device's store holds - observations, check-in
answers, session loads - as float64 and float32 bytes and as decimal strings, and check that only
allow-listed records are present. (The deployment tests capture the same at the gRPC layer.)
"""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from restwise.client.app import DeviceLocation, DeviceLocator, SIM_KEYSTORE_DIR, device_folder_name, make_client_app, open_device_store
from restwise.privacy import egress as E
from restwise.privacy import wire
from restwise.privacy.secagg import records as SR
from restwise.privacy.secagg.harness import InProcessGrid
from restwise.server.app import FederatedServer
from restwise.server.rundir import open_ledger
from restwise.server.runconfig import RunConfig
from restwise.simulation.fleet import prepare_fleet

WATCHED = 0  # the device whose traffic is captured


def _stored_values(store) -> set[float]:
    values: set[float] = set()
    for (value,) in store.conn.execute("SELECT value FROM observations"):
        values.add(float(value))
    for row in store.checkins():
        for key in ("readiness", "fatigue", "soreness", "stress", "mood", "sleep_quality", "sleep_hours"):
            if row.get(key) is not None:
                values.add(float(row[key]))
    for row in store.sessions():
        for key in ("minutes", "rpe", "load"):
            if row.get(key) is not None:
                values.add(float(row[key]))
    return values


def _needles(values: set[float]) -> tuple[list[bytes], list[bytes], list[bytes]]:
    f64 = [struct.pack("<d", v) for v in values] + [struct.pack(">d", v) for v in values]
    f32 = [struct.pack("<f", v) for v in values if v != 0.0] + [struct.pack(">f", v) for v in values if v != 0.0]
    # Decimal strings long enough not to occur by chance ("7" would match anything).
    text = set()
    for v in values:
        for s in (repr(v), f"{v:g}", f"{v:.2f}", f"{v:.1f}"):
            if len(s) >= 4:
                text.add(s.encode())
    return f64, f32, sorted(text)


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("wire")
    config = RunConfig(
        name="wire", rounds=1, population=6, sampling="poisson", sampling_rate=1.0, noise_multiplier=1.0,
        delta=1e-3, secagg_num_neighbours=5, secagg_threshold=4, max_dropout_fraction=0.3, round_timeout_s=10.0, seed=5,
        force=True,  # the network under DP on 6 devices: the planner refuses it unless forced
    )
    run_dir = tmp_path / "run-wire00000001"
    run_dir.mkdir()
    fleet = run_dir / "fleet"
    prepare_fleet(fleet, config, demo_days=60)
    app = make_client_app(DeviceLocator(fleet))
    outgoing: list[tuple[Message, Message]] = []  # (incoming, reply) of the watched device

    def device(msg: Message, context: Context) -> Message:
        # Snapshot the stage before the mods run (the secure-aggregation mod rewrites content).
        stage = msg.content.config_records.get(SR.SERVER_RECORD)
        stage = str(stage["stage"]) if stage is not None else msg.metadata.message_type
        reply = app(msg, context)
        if context.node_config["partition-id"] == WATCHED:
            outgoing.append((stage, reply))
        return reply

    node_ids = [500 + i for i in range(config.population)]
    grid = InProcessGrid(device, node_ids)
    for i, nid in enumerate(node_ids):
        grid.contexts[nid] = Context(run_id=1, node_id=nid, node_config={"partition-id": i}, state=RecordDict(), run_config={})
    summary = FederatedServer(config, run_dir, run_id=run_dir.name, ledger=open_ledger(run_dir, config), node_wait_s=0.5).run(grid)
    assert summary.status == "completed"
    with open_device_store(DeviceLocation(fleet / device_folder_name(WATCHED), fleet / SIM_KEYSTORE_DIR)) as store:
        values = _stored_values(store)
        history = store.egress_history()
    return outgoing, values, history


def _leaks(reply: Message, f64, f32, text) -> list[str]:
    """Which kinds of needles occur in the serialised objects of ``reply``."""
    found = []
    # float32 (4-byte windows) is not searched in two objects where it matches by chance:
    # the masked vector (uniformly random ring elements, masked by construction) and the
    # message envelope, whose float64 ttl (time left, so it varies with elapsed time) and
    # created_at contain every 4-byte pattern of a value in [2, 4) at some point in time.
    masked = None if reply.has_error() else reply.content.array_records.get(SR.MASKED_INPUT)
    skip = set(get_all_nested_objects(masked)) if masked is not None else set()
    skip.add(reply.object_id)
    for oid, blob in E.wire_objects(reply).items():
        if any(n in blob for n in f64):
            found.append("float64")
        if any(n in blob for n in text):
            found.append("text")
        if oid not in skip and any(n in blob for n in f32):
            found.append("float32")
    return found


def test_no_stored_value_crosses_the_wire(captured):
    outgoing, values, _ = captured
    assert len(values) > 100  # the device really holds data
    needles = _needles(values)
    # consent is asked at setup: no hello; the run's last ledger entries (receipts) come last
    assert [stage for stage, _ in outgoing] == [*SR.STAGES, wire.RECEIPTS_MESSAGE_TYPE]
    total_bytes = 0
    for stage, reply in outgoing:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        total_bytes += sum(len(b) for b in E.wire_objects(reply).values())
        assert _leaks(reply, *needles) == [], f"a stored value appears in the {stage} reply"
    assert total_bytes > 8 * 1000  # the masked update did cross


def test_the_search_finds_values_when_they_are_there(captured):
    # Control: the same search flags a reply that carries stored values in any of the forms.
    _, values, _ = captured
    sample = sorted(values)[:: max(1, len(values) // 20)]
    needles = _needles(values)
    from flwr.app import Array, ArrayRecord, ConfigRecord

    for record, kind in (
        (ArrayRecord({"x": Array(np.array(sample, dtype=np.float64))}), "float64"),
        (ArrayRecord({"x": Array(np.array(sample, dtype=np.float32))}), "float32"),
        (ConfigRecord({"note": f"{sample[-1]:.2f}"}), "text"),
    ):
        probe = Message(RecordDict({"probe": record}), dst_node_id=1, message_type="train")
        assert kind in _leaks(probe, *needles)


def test_only_allow_listed_records_leave_and_the_update_is_masked(captured):
    outgoing, _, history = captured
    for stage, reply in outgoing:
        names = set(reply.content.keys())
        allowed = set(SR.CLIENT_REPLY_RECORDS.get(stage, {}))  # the receipts reply: nothing
        assert names <= allowed, f"{stage}: {names - allowed}"
        assert wire.UPDATE_RECORD not in names
        # No per-device metric in the clear (issue 15): no metric record at all.
        assert SR.METRICS not in names
    (collect,) = [r for s, r in outgoing if s == SR.STAGE_COLLECT]
    masked = collect.content.array_records[SR.MASKED_INPUT][SR.MASKED_ARRAY].numpy()
    assert masked.dtype == np.uint64 and masked.ndim == 1
    # Uniform ring elements: about half of the top bits set (a float update would not be).
    assert 0.4 < np.mean(masked >> np.uint64(63)) < 0.6
    # The device's own log lists exactly what was captured, message for message.
    assert [h["message_type"] for h in history] == [f"train:{s}" for s in SR.STAGES] + [wire.RECEIPTS_MESSAGE_TYPE]
    for (stage, reply), entry in zip(outgoing, history):
        records, n_bytes, digest = E.describe(reply)
        assert entry["records"] == records and entry["n_bytes"] == n_bytes and entry["sha256"] == digest
