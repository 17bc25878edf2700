"""The egress guard: only allow-listed records leave a device, and every reply is logged."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from restwise.privacy import egress as E
from restwise.privacy import wire
from restwise.privacy.secagg import records as SR
from restwise.privacy.secagg.harness import ensure_task_identity

ensure_task_identity()


def _ctx() -> Context:
    return Context(run_id=5, node_id=3, node_config={}, state=RecordDict(), run_config={})


def _stage_msg(stage: str, round_: int = 2) -> Message:
    content = RecordDict({SR.SERVER_RECORD: ConfigRecord({"stage": stage, "round": round_})})
    return Message(content, dst_node_id=3, message_type="train")


def _hello(run_id: str = "run-abc", round_: int = 2) -> Message:
    content = RecordDict({wire.RUN_RECORD: ConfigRecord({"run_id": run_id, "round": round_})})
    return Message(content, dst_node_id=3, message_type=wire.HELLO_MESSAGE_TYPE)


def _reply(msg: Message, content: RecordDict):
    return lambda m, c: Message(content, reply_to=m)


def _masked(n: int = 16) -> RecordDict:
    return RecordDict({
        SR.MASKED_INPUT: ArrayRecord({SR.MASKED_ARRAY: Array(np.arange(n, dtype=np.uint64))}),
        SR.MASKED_STATUS: ConfigRecord({"bad_share_senders": []}),
    })


def _guard(policy=None, log=None):
    log = log if log is not None else E.MemoryEgressLog()
    return E.make_egress_guard(policy or E.EgressPolicy(), lambda ctx: log), log


def test_allow_listed_masked_update_passes_and_is_logged_without_values():
    guard, log = _guard()
    ctx = _ctx()
    guard(_hello(), ctx, _reply(None, RecordDict({wire.CONSENT_RECORD: ConfigRecord({"participate": True})})))
    msg = _stage_msg(SR.STAGE_COLLECT)
    content = _masked()
    reply = guard(msg, ctx, _reply(msg, content))
    assert not reply.has_error()
    hello_entry, entry = log.entries
    assert hello_entry["run_id"] == "run-abc" and hello_entry["message_type"] == wire.HELLO_MESSAGE_TYPE
    # The secure-aggregation stage carries no run id; the guard remembers the hello's.
    assert entry["run_id"] == "run-abc" and entry["round"] == 2
    assert entry["message_type"] == f"train:{SR.STAGE_COLLECT}"
    names = {r["name"]: r for r in entry["records"]}
    assert set(names) == {SR.MASKED_INPUT, SR.MASKED_STATUS}
    assert names[SR.MASKED_INPUT]["kind"] == "array" and names[SR.MASKED_INPUT]["bytes"] > 16 * 8
    assert entry["n_bytes"] == sum(r["bytes"] for r in entry["records"])
    assert entry["n_bytes"] <= len(E.content_bytes(reply.content))  # that adds the envelope
    assert len(entry["sha256"]) == 64
    assert "[0, 1, 2" not in repr(entry)  # sizes and names only


@pytest.mark.parametrize(
    "name, record",
    [
        (SR.METRICS, MetricRecord({"train_loss": 0.42})),  # a coarse loss is still one person's number
        (SR.METRICS, MetricRecord({"train_loss": 1})),
        (SR.MASKED_STATUS, ConfigRecord({"bad_share_senders": [], "note": 6.0})),
        (SR.MASKED_STATUS, ConfigRecord({"bad_share_senders": [1.5]})),
        (SR.MASKED_INPUT, ArrayRecord({SR.MASKED_ARRAY: Array(np.array([6.0, 7.0, 5.0]))})),
    ],
)
def test_no_clear_float_leaves_a_device_by_default(name, record):
    """Issue 15: no per-device number in the clear - a float (or any metric) anywhere in a
    reply makes the default guard refuse the whole reply."""
    guard, _ = _guard()
    msg = _stage_msg(SR.STAGE_COLLECT)
    content = _masked()
    content[name] = record
    reply = guard(msg, _ctx(), _reply(msg, content))
    assert reply.has_error() and reply.error.code == wire.ERROR_CODE_REFUSED
    assert E.EgressPolicy().metric_keys == () and E.allow_list_summary()["coarse_metrics"] == []


@pytest.mark.parametrize("stage", SR.ALL_STAGES)
def test_no_metric_and_no_float_leaves_in_the_clear_at_any_secure_aggregation_stage(stage):
    """Per-device numbers (the training loss) travel inside the masked vector or not at all."""
    guard, _ = _guard()
    msg = _stage_msg(stage)
    for extra in (MetricRecord({"train_loss": 0.42}), ConfigRecord({"bad_share_senders": [0.5]})):
        content = _masked() if stage == SR.STAGE_COLLECT else RecordDict()
        content[SR.METRICS if isinstance(extra, MetricRecord) else SR.MASKED_STATUS] = extra
        reply = guard(msg, _ctx(), _reply(msg, content))
        assert reply.has_error() and reply.error.code == wire.ERROR_CODE_REFUSED


def test_the_reply_to_a_delivered_model_carries_nothing():
    guard, log = _guard()
    delivery = Message(RecordDict({wire.RUN_RECORD: ConfigRecord({"run_id": "run-abc", "round": 1})}), dst_node_id=3,
                       message_type=wire.MODEL_MESSAGE_TYPE)
    assert not guard(delivery, _ctx(), _reply(delivery, RecordDict())).has_error()
    assert log.entries[-1]["records"] == [] and log.entries[-1]["message_type"] == wire.MODEL_MESSAGE_TYPE
    anything = RecordDict({wire.CONSENT_RECORD: ConfigRecord({"participate": True})})
    assert guard(delivery, _ctx(), _reply(delivery, anything)).has_error()


@pytest.mark.parametrize(
    "extra_name, extra_record",
    [
        ("observations", ArrayRecord({"hrv": Array(np.array([61.2, 58.9]))})),
        ("secagg.masked-input-copy", ArrayRecord({"masked": Array(np.zeros(4, dtype=np.uint64))})),
        ("debug", ConfigRecord({"note": "hi"})),
    ],
)
def test_a_record_not_on_the_allow_list_is_refused(extra_name, extra_record):
    guard, log = _guard()
    msg = _stage_msg(SR.STAGE_COLLECT)
    content = _masked()
    content[extra_name] = extra_record
    reply = guard(msg, _ctx(), _reply(msg, content))
    assert reply.has_error() and reply.error.code == wire.ERROR_CODE_REFUSED
    assert extra_name in reply.error.reason
    assert "61.2" not in reply.error.reason
    # What was sent (the error) is logged, not what was refused.
    assert log.entries[-1]["records"][0]["kind"] == "error"


def _plain_train() -> Message:
    return Message(RecordDict({wire.RUN_RECORD: ConfigRecord({"run_id": "run-abc", "round": 1})}), dst_node_id=3,
                   message_type="train")


def _plain_update() -> RecordDict:
    return RecordDict({wire.UPDATE_RECORD: ArrayRecord({wire.UPDATE_VECTOR: Array(np.zeros(8))})})


@pytest.mark.parametrize("key", ["num_examples", "num-examples", "n_samples"])
def test_example_counts_are_never_sent_in_the_clear(key):
    # Even where a metrics record may be sent (a server-trusted plain reply whose policy
    # allows the loss); a secure-aggregation stage has no metrics record at all.
    guard, _ = _guard(E.EgressPolicy(metrics=(E.TRAIN_LOSS,), allow_unmasked_update=True))
    msg = _plain_train()
    content = _plain_update()
    content[SR.METRICS] = MetricRecord({key: 137})
    reply = guard(msg, _ctx(), _reply(msg, content))
    assert reply.has_error() and key in reply.error.reason
    with pytest.raises(ValueError):
        E.EgressPolicy(metrics=(E.MetricSpec(key, 0, 1e6, 0),))


@pytest.mark.parametrize("loss", [0.123456, 250.0, float("nan")])
def test_metrics_a_policy_allows_must_be_coarse_and_in_range(loss):
    guard, _ = _guard(E.EgressPolicy(metrics=(E.TRAIN_LOSS,)))
    msg = _stage_msg(SR.STAGE_COLLECT)
    content = _masked()
    content[SR.METRICS] = MetricRecord({"train_loss": loss})
    assert guard(msg, _ctx(), _reply(msg, content)).has_error()
    assert E.TRAIN_LOSS.allows(E.TRAIN_LOSS.coarsen(loss))


def test_wrong_kinds_and_dtypes_are_refused():
    guard, _ = _guard()
    msg = _stage_msg(SR.STAGE_COLLECT)
    float_masked = RecordDict({SR.MASKED_INPUT: ArrayRecord({SR.MASKED_ARRAY: Array(np.zeros(4))})})
    assert guard(msg, _ctx(), _reply(msg, float_masked)).has_error()
    as_config = RecordDict({SR.MASKED_INPUT: ConfigRecord({SR.MASKED_ARRAY: [1, 2]})})
    assert guard(msg, _ctx(), _reply(msg, as_config)).has_error()
    # A record allowed at one stage is refused at another (public keys only at setup).
    setup_reply = RecordDict({SR.PUBLIC_KEYS: ConfigRecord({"c_pk": b"x" * 32, "s_pk": b"y" * 32})})
    assert not guard(_stage_msg(SR.STAGE_SETUP), _ctx(), _reply(None, setup_reply)).has_error()
    assert guard(_stage_msg(SR.STAGE_UNMASK), _ctx(), _reply(None, setup_reply)).has_error()


def test_unmasked_update_only_with_an_explicit_server_trusted_policy():
    plain = Message(RecordDict({wire.RUN_RECORD: ConfigRecord({"run_id": "run-abc", "round": 1})}), dst_node_id=3, message_type="train")
    update = RecordDict({wire.UPDATE_RECORD: ArrayRecord({wire.UPDATE_VECTOR: Array(np.zeros(8))})})
    strict, _ = _guard()
    assert strict(plain, _ctx(), _reply(plain, update)).has_error()
    trusting, _ = _guard(E.EgressPolicy(allow_unmasked_update=True))
    assert not trusting(plain, _ctx(), _reply(plain, update)).has_error()


def test_an_exception_in_the_app_is_reported_by_type_only():
    guard, log = _guard()

    def boom(m, c):
        raise ValueError("readiness 7.25 on 2024-03-02 is odd")

    reply = guard(_stage_msg(SR.STAGE_COLLECT), _ctx(), boom)
    assert reply.has_error() and reply.error.code == wire.ERROR_CODE_APP_FAILED
    assert "ValueError" in reply.error.reason and "7.25" not in reply.error.reason
    assert len(log.entries) == 1


def test_nothing_is_sent_when_the_egress_log_cannot_be_written():
    @contextlib.contextmanager
    def broken(ctx):
        raise OSError("disk full")
        yield  # pragma: no cover

    guard = E.make_egress_guard(E.EgressPolicy(), broken)
    msg = _stage_msg(SR.STAGE_COLLECT)
    reply = guard(msg, _ctx(), _reply(msg, _masked()))
    assert reply.has_error() and reply.error.code == wire.ERROR_CODE_LOG_FAILED


def test_oversized_replies_are_refused():
    guard, _ = _guard(E.EgressPolicy(max_bytes=1000))
    msg = _stage_msg(SR.STAGE_COLLECT)
    assert guard(msg, _ctx(), _reply(msg, _masked(10_000))).has_error()


def test_guard_logs_into_a_real_encrypted_store(tmp_path, fast_argon2):
    from restwise.client.store import DeviceStore

    folder = tmp_path / "store"
    DeviceStore.create(folder, "pw", argon2=fast_argon2).close()

    @contextlib.contextmanager
    def open_log(ctx):
        with DeviceStore.open(folder, "pw") as s:
            yield s

    guard = E.make_egress_guard(E.EgressPolicy(), open_log)
    ctx = _ctx()
    guard(_hello("run-xyz", 4), ctx, _reply(None, RecordDict({wire.CONSENT_RECORD: ConfigRecord({"participate": True})})))
    msg = _stage_msg(SR.STAGE_COLLECT, 4)
    guard(msg, ctx, _reply(msg, _masked()))
    with DeviceStore.open(folder, "pw") as s:
        history = s.egress_history()
    assert [h["run_id"] for h in history] == ["run-xyz", "run-xyz"]
    assert [h["round"] for h in history] == [4, 4]
    assert [r["name"] for r in history[1]["records"]] == [SR.MASKED_INPUT, SR.MASKED_STATUS]


def test_allow_list_summary_names_what_leaves_and_what_never_does():
    summary = E.allow_list_summary()
    assert SR.MASKED_INPUT in summary["secure_aggregation"][SR.STAGE_COLLECT]
    assert "num_examples" in summary["never_sent"]
    assert summary["unmasked_update"] is None
