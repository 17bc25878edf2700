"""``secagg_mod``: the device side of Restwise secure aggregation as a Flower ClientApp mod.

Wrap the app's train function (``@app.train(mods=[..., secagg_mod])`` or
``ClientApp(mods=[secagg_mod])``). Messages without the ``records.SERVER_RECORD`` config
record pass through untouched. For the collect stage the mod calls the wrapped app with a
``"train"`` message holding the train content; the app must reply with ArrayRecord
``"update"`` -> 1-D float array ``"vector"`` (already clipped and noised by the privacy
mods inside) and optionally MetricRecord ``"metrics"`` (the values of the round's extras,
e.g. the training loss: they are summed inside the masked vector, never sent in the clear).
The mod encodes, refuses non-finite or out-of-range values, masks and replies; the plaintext
vector never leaves.

``make_secagg_mod(take_part=..., on_finish=...)`` adds the device's own decisions:

* ``take_part(msg, context) -> bool`` is asked once per round, at the device's first message
  of it (setup, join, or the collect of a fast round: the message carries the server's
  announced records, e.g. the run record and the signed receipt of the previous release). False - or any error - and the device
  replies "not taking part" (``records.DECLINED``), the same reply whatever the reason.
* ``on_finish(msg, context)`` receives the run's final message (the receipt of the last
  release).

State between messages lives in ``context.state`` (Flower keeps it in the SuperNode's
memory; in deployment it crosses the local socket between the SuperNode and each ClientApp
process); secrets are removed from it as soon as they are no longer needed and are never
logged or written to disk (see ``device.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from . import records as R
from .device import DeviceSession, declined, refusal
from .errors import InputRefusedError, ProtocolViolationError, SecAggConfigError, SecAggError, ShareError
from .fields import config

_log = logging.getLogger(__name__)

TakePart = Callable[[Message, Context], bool]
OnFinish = Callable[[Message, Context], None]


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


def _inner_update(reply: Message) -> tuple[np.ndarray, dict[str, float]] | None:
    """(vector, metrics) of the wrapped app's reply; None when it replied with an error (a
    device that will not or cannot contribute: not enough data, no consent, ...)."""
    if reply.has_error():
        return None
    arrays = reply.content.array_records.get(R.INNER_UPDATE)
    if arrays is None or R.INNER_VECTOR not in arrays:
        raise InputRefusedError("the wrapped app returned no update vector", code="no-update")
    vector = arrays[R.INNER_VECTOR].numpy()
    record = reply.content.metric_records.get(R.INNER_METRICS)
    metrics = {}
    for key, value in (record.items() if record is not None else ()):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics[key] = float(value)
    return vector, metrics


def _wants_to_take_part(take_part: TakePart | None, msg: Message, context: Context) -> bool:
    if take_part is None:
        return True
    try:
        return bool(take_part(msg, context))
    except Exception as exc:  # noqa: BLE001 - fail closed: a device that cannot decide does not take part
        _log.warning("secure aggregation: the participation check failed (%s); not taking part", type(exc).__name__)
        return False


def make_secagg_mod(*, take_part: TakePart | None = None, on_finish: OnFinish | None = None):
    """The device-side mod with the device's participation decision and receipt handler."""

    def secagg_mod(msg: Message, context: Context, call_next) -> Message:
        server_record = None if msg.has_error() or msg.metadata.message_type != R.MESSAGE_TYPE \
            else config(msg.content, R.SERVER_RECORD)
        if server_record is None:
            return call_next(msg, context)
        stage = str(server_record.get("stage", ""))
        state = config(context.state, R.CLIENT_STATE)
        if state is None:
            state = ConfigRecord()
            context.state[R.CLIENT_STATE] = state
        session = DeviceSession(state)
        collecting = False
        asks = stage in R.FIRST_STAGES and not session.decided(server_record)
        try:
            if asks and not _wants_to_take_part(take_part, msg, context):
                if stage != R.STAGE_SETUP:
                    session.decline_round()
                content = declined()
            elif stage == R.STAGE_SETUP:
                content = session.setup(server_record)
            elif stage == R.STAGE_SHARE_KEYS:
                content = session.share_keys(server_record)
            elif stage == R.STAGE_JOIN:
                content = session.join(server_record)
            elif stage == R.STAGE_COLLECT:
                request = session.check_collect(server_record)
                collecting = True
                session.start_collect(request)
                msg.content = RecordDict(
                    {name: record for name, record in msg.content.items() if name != R.SERVER_RECORD}
                )
                try:
                    inner = _inner_update(call_next(msg, context))
                except Exception as exc:  # the wrapped app failed: refuse, name no details
                    raise InputRefusedError("the wrapped app failed", code="train-failed") from exc
                if inner is None:
                    session.decline_round()
                    content = declined()
                else:
                    content = session.collect(request, inner[0], inner[1])
            elif stage == R.STAGE_UNMASK:
                content = session.unmask(server_record)
            elif stage == R.STAGE_FINISH:
                if on_finish is not None:
                    on_finish(msg, context)
                content = session.finish(server_record)
            else:
                raise ProtocolViolationError("unknown secure-aggregation stage")
        except Exception as exc:  # the device refuses; never crashes the node
            code = _code(exc)
            if code == "internal":
                _log.warning("secure aggregation: internal error at stage %s (%s)", stage, type(exc).__name__)
            if collecting:  # it cannot contribute to this round: its material for it is void
                session.decline_round()
            content = refusal(stage, code)
        else:
            if asks:
                session.mark_decided(server_record)
        return Message(content, reply_to=msg)

    return secagg_mod


secagg_mod = make_secagg_mod()

__all__ = ["secagg_mod", "make_secagg_mod", "SecAggError", "TakePart", "OnFinish"]
