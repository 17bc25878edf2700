"""``secagg_mod``: the device side of Restwise SecAgg+ as a Flower ClientApp mod.

Wrap the app's train function (``@app.train(mods=[..., secagg_mod])`` or
``ClientApp(mods=[secagg_mod])``). Messages without the ``records.SERVER_RECORD`` config
record pass through untouched. For the collect stage the mod calls the wrapped app with a
``"train"`` message holding only the train content; the app must reply with ArrayRecord
``"update"`` -> 1-D float array ``"vector"`` (already clipped and noised by the privacy
mods inside) and optionally MetricRecord ``"metrics"``. The mod encodes, refuses
non-finite or out-of-range values, masks and replies; the plaintext vector never leaves.

State between stages lives in ``context.state`` (Flower keeps it in the SuperNode's
memory); secrets are removed from it as soon as they are no longer needed and are never
logged or written to disk.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from . import records as R
from .errors import InputRefusedError, ProtocolViolationError, SecAggConfigError, SecAggError, ShareError
from .protocol import ClientSession, refusal

_log = logging.getLogger(__name__)


def _code(exc: Exception) -> str:
    if isinstance(exc, InputRefusedError):
        return exc.code
    if isinstance(exc, SecAggConfigError):
        return "unsafe-parameters"
    if isinstance(exc, ShareError):
        return "bad-share"
    if isinstance(exc, ProtocolViolationError):
        return "protocol-violation"
    return "internal"


def _inner_update(reply: Message) -> tuple[np.ndarray, object]:
    if reply.has_error():
        raise InputRefusedError("the wrapped app failed", code="train-failed")
    arrays = reply.content.array_records.get(R.INNER_UPDATE)
    if arrays is None or R.INNER_VECTOR not in arrays:
        raise InputRefusedError("the wrapped app returned no update vector", code="no-update")
    vector = arrays[R.INNER_VECTOR].numpy()
    metrics = reply.content.metric_records.get(R.INNER_METRICS)
    return vector, metrics


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    if (
        msg.has_error()
        or msg.metadata.message_type != R.MESSAGE_TYPE
        or R.SERVER_RECORD not in msg.content.config_records
    ):
        return call_next(msg, context)
    server_record = msg.content.config_records[R.SERVER_RECORD]
    stage = str(server_record.get("stage", ""))
    state = context.state.config_records.get(R.CLIENT_STATE)
    if state is None:
        state = ConfigRecord()
    session = ClientSession(state)
    try:
        if stage == R.STAGE_SETUP:
            content = session.setup(server_record)
        elif stage == R.STAGE_SHARE_KEYS:
            content = session.share_keys(server_record)
        elif stage == R.STAGE_COLLECT:
            session.check_collect(server_record)
            msg.content = RecordDict(
                {name: record for name, record in msg.content.items() if name != R.SERVER_RECORD}
            )
            try:
                inner_reply = call_next(msg, context)
            except Exception as exc:  # the wrapped app failed: refuse, name no details
                raise InputRefusedError("the wrapped app failed", code="train-failed") from exc
            vector, metrics = _inner_update(inner_reply)
            content = session.collect(server_record, vector, metrics)
        elif stage == R.STAGE_UNMASK:
            content = session.unmask(server_record)
        else:
            raise ProtocolViolationError("unknown secure-aggregation stage")
    except Exception as exc:  # the device refuses and forgets the round; never crashes the node
        code = _code(exc)
        if code == "internal":
            _log.warning("secure aggregation: internal error at stage %s (%s)", stage, type(exc).__name__)
        state.clear()
        state["stage"] = "done"
        content = refusal(stage, code)
    context.state[R.CLIENT_STATE] = state
    return Message(content, reply_to=msg)


__all__ = ["secagg_mod", "SecAggError"]
