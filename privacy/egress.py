"""The device's egress guard: nothing leaves a device unless it is on an explicit allow-list.

A Flower ClientApp mod that sits *outermost* (``ClientApp(mods=[egress_guard, ...])``), so it
sees every reply exactly as Flower will serialise and send it, after every other mod (secure
aggregation, DP) has done its work. For each outgoing message it

1. checks every record against the allow-list for the message it answers (the contract
   below); anything else - an unknown record, an unknown key, an array of the wrong kind, a
   metric outside its coarse range - makes the guard refuse the whole reply: the device sends
   an error reply carrying only a fixed code, and logs the record *names* (never values);
2. records in the device's own store what it sent (record names, kinds, keys, sizes, the
   SHA-256 of the serialised objects), with the run id and round - ``restwise device history``
   shows it. If the log cannot be written, nothing is sent (fail closed).

Exceptions from the wrapped app never reach Flower (whose runtime would put ``str(exc)`` -
possibly quoting personal values - into the error reply): the guard replies with the
exception's *type name* only.

The allow-list contract (one place: the guard, the server workflow and the auditor's
information-leakage section read it from here)::

    query "restwise.hello" reply   ConfigRecord "restwise.consent"  participate (bool)
    query "restwise.model" reply   nothing (the device keeps a delivered model or not; its
                                   reply is the same empty message either way)
    secure-aggregation stages      the records of privacy/secagg/records.py CLIENT_REPLY_RECORDS
                                   (public keys, encrypted shares, the masked update as uint64
                                   ring elements, bad-share senders, refusals); MetricRecord
                                   "metrics" only with a policy's metrics - none by default
    plain train reply              ArrayRecord "update" -> "vector" (1-D float), ONLY when the
                                   run is server-trusted without secure aggregation
                                   (``EgressPolicy.allow_unmasked_update``)

**No per-device metric in the clear** (``DEFAULT_METRICS`` is empty): a device's training loss
is one number about one person, outside the DP accounting - even coarsened to two decimals it
can equal a stored answer. A metric may travel only inside the masked vector (summed securely
and noised with it) or not at all; until secure aggregation carries such a slot, none is sent
and a round's training loss is "not collected". No reply carries a float in the clear: config
values may not be floats, arrays must be the masked uint64 ring elements (except a
server-trusted plain update), and a metric record is refused unless a policy lists its key.
Counts such as the number of training examples are never sent in the clear either: they say
how much data a person has (and a weighted average would need them); Restwise averages updates
unweighted. ``FORBIDDEN_METRIC_KEYS`` are refused even if a policy lists them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from restwise.models.metrics import MetricSpec
from restwise.privacy.errors import EgressRefused
from restwise.privacy.secagg import records as SR
from restwise.privacy.wire import (
    CONSENT_RECORD,
    DEVICE_STATE,
    MODEL_MESSAGE_TYPE,
    ERROR_CODE_APP_FAILED,
    ERROR_CODE_LOG_FAILED,
    ERROR_CODE_REFUSED,
    HELLO_MESSAGE_TYPE,
    METRICS_RECORD,
    RUN_RECORD,
    UPDATE_RECORD,
    UPDATE_VECTOR,
)

_log = logging.getLogger(__name__)

FORBIDDEN_METRIC_KEYS = frozenset(
    {"num_examples", "num-examples", "n_examples", "num_samples", "n_samples", "num_days", "n_days", "count"}
)


# The coarse training loss a policy *may* allow (benchmarks); not sent by default (see above).
TRAIN_LOSS = MetricSpec("train_loss", "loss", 0.0, 100.0, decimals=2, description="mean training loss of the round")
DEFAULT_METRICS: tuple[MetricSpec, ...] = ()


@dataclass(frozen=True)
class EgressPolicy:
    """What a device may send. ``allow_unmasked_update`` only for server-trusted runs without
    secure aggregation (the server then sees each device's clipped update)."""

    metrics: tuple[MetricSpec, ...] = DEFAULT_METRICS
    allow_unmasked_update: bool = False
    max_bytes: int = 256 * 1024 * 1024
    max_text: int = 64

    def __post_init__(self) -> None:
        for spec in self.metrics:
            if spec.name in FORBIDDEN_METRIC_KEYS:
                raise ValueError(f"metric {spec.name!r} may never be sent in the clear")

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)

    def metric(self, name: str) -> MetricSpec | None:
        for spec in self.metrics:
            if spec.name == name:
                return spec
        return None

    def allowed_records(self, incoming: Message) -> dict[str, tuple[str, tuple[str, ...] | None]]:
        """record name -> (kind, allowed keys) for a reply to ``incoming``. Metric keys are
        checked against ``metrics`` (None here)."""
        mtype = incoming.metadata.message_type
        if mtype == HELLO_MESSAGE_TYPE:
            return {CONSENT_RECORD: ("config", ("participate",))}
        if mtype == MODEL_MESSAGE_TYPE:
            return {}  # the reply to a delivered model carries nothing
        if mtype != SR.MESSAGE_TYPE or incoming.has_error():
            return {}
        server = incoming.content.config_records.get(SR.SERVER_RECORD)
        if server is not None:
            stage = str(server.get("stage", ""))
            allowed = dict(SR.CLIENT_REPLY_RECORDS.get(stage, {}))
            return {k: (kind, None if kind == "metric" else keys) for k, (kind, keys) in allowed.items()}
        if self.allow_unmasked_update:
            return {UPDATE_RECORD: ("array", (UPDATE_VECTOR,)), METRICS_RECORD: ("metric", None)}
        return {}

    # -- the check ----------------------------------------------------------------------
    def check(self, incoming: Message | dict, reply: Message) -> None:
        """Raise EgressRefused unless every record of ``reply`` is allowed and the reply is
        within the size limit. ``incoming`` is the message being answered, or its
        :meth:`allowed_records` taken before the inner mods ran (the secure-aggregation mod
        rewrites the incoming message's content)."""
        self.check_records(incoming, reply)
        if not reply.has_error():
            self.check_size(describe(reply)[1])

    def check_records(self, incoming: Message | dict, reply: Message) -> None:
        if reply.has_error():
            return  # an Error carries a code and a reason we wrote ourselves (see guard)
        allowed = incoming if isinstance(incoming, dict) else self.allowed_records(incoming)
        for name, record in reply.content.items():
            if name not in allowed:
                raise EgressRefused(f"record {name!r} is not on the egress allow-list", record=name)
            kind, keys = allowed[name]
            actual = _kind(record)
            if actual != kind:
                raise EgressRefused(f"record {name!r} must be a {kind} record, not a {actual} record", record=name)
            if kind == "metric":
                for key, value in record.items():
                    spec = self.metric(key)
                    if key in FORBIDDEN_METRIC_KEYS or spec is None:
                        raise EgressRefused(f"metric {key!r} is not on the egress allow-list", record=name)
                    if not spec.allows(value):
                        raise EgressRefused(f"metric {key!r} is not a coarse value in its range", record=name)
                continue
            extra = set(record.keys()) - set(keys or ())
            if extra:
                raise EgressRefused(
                    f"record {name!r} has keys not on the egress allow-list: {', '.join(sorted(extra))}", record=name
                )
            if kind == "array":
                for key, array in record.items():
                    self._check_array(name, key, array)
            else:
                for key, value in record.items():
                    self._check_config_value(name, key, value)

    def check_size(self, n_bytes: int) -> None:
        if n_bytes > self.max_bytes:
            raise EgressRefused(f"the reply is {n_bytes} bytes, above the {self.max_bytes}-byte limit")

    def _check_array(self, name: str, key: str, array: Array) -> None:
        if len(array.shape) != 1:
            raise EgressRefused(f"array {name}/{key} must be one-dimensional", record=name)
        if key == SR.MASKED_ARRAY:
            if array.dtype != "uint64" and array.dtype != np.dtype("uint64").str:
                raise EgressRefused(f"array {name}/{key} must hold uint64 ring elements", record=name)
        elif array.dtype not in ("float32", "float64", "<f4", "<f8"):
            raise EgressRefused(f"array {name}/{key} must hold floats", record=name)

    def _check_config_value(self, name: str, key: str, value: Any) -> None:
        if isinstance(value, str):
            if len(value) > self.max_text:
                raise EgressRefused(f"text {name}/{key} is longer than {self.max_text} characters", record=name)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    raise EgressRefused(f"{name}/{key} may not carry text lists", record=name)
                if isinstance(item, float):
                    raise EgressRefused(f"{name}/{key} may not carry float lists", record=name)
        elif isinstance(value, float):
            raise EgressRefused(f"{name}/{key} may not carry a float", record=name)


def _kind(record: Any) -> str:
    if isinstance(record, ArrayRecord):
        return "array"
    if isinstance(record, MetricRecord):
        return "metric"
    if isinstance(record, ConfigRecord):
        return "config"
    return type(record).__name__


# -- what exactly crosses the wire ------------------------------------------------------
def wire_objects(message: Message) -> dict[str, bytes]:
    """object id -> serialised bytes of every object Flower transfers for ``message`` (the
    message, its RecordDict, each record, array and array chunk), as the SuperNode pushes
    them to the SuperLink."""
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}


def content_bytes(content: RecordDict) -> bytes:
    """The serialised objects of a RecordDict (records, arrays, chunks), concatenated in a
    fixed order. Used for sizes and hashes that do not depend on message metadata."""
    return b"".join(obj.deflate() for obj in get_all_nested_objects(content).values())


def message_size(message: Message) -> int:
    return 0 if message.has_error() else len(content_bytes(message.content))


def describe(message: Message) -> tuple[list[dict], int, str]:
    """(records, total bytes, sha256 hex) of a reply: names, kinds, keys, sizes - no values.
    Each record is serialised once (as Flower deflates it for the wire: the record, its arrays
    and array chunks); the digest covers those bytes, record after record."""
    if message.has_error():
        body = f"error:{message.error.code}".encode()
        return [{"name": "error", "kind": "error", "code": int(message.error.code)}], len(body), hashlib.sha256(body).hexdigest()
    records, digest, total = [], hashlib.sha256(), 0
    for name, record in message.content.items():
        size = 0
        for obj in get_all_nested_objects(record).values():
            blob = obj.deflate()
            digest.update(blob)
            size += len(blob)
        total += size
        records.append({"name": name, "kind": _kind(record), "keys": sorted(record.keys()), "bytes": size})
    return records, total, digest.hexdigest()


# -- the mod ----------------------------------------------------------------------------
class EgressLog(Protocol):
    """Where a device records what it sent (the device store implements it)."""

    def log_egress(
        self, run_id: str, round_: int | None, message_type: str, records: list[dict], n_bytes: int, sha256: str
    ) -> None: ...


def run_and_round(msg: Message, context: Context) -> tuple[str, int | None, str]:
    """(Restwise run id, round, a label of the message type) for an incoming message.

    The run id comes from the ``restwise.run`` record of the hello or a plain train message,
    remembered in ``context.state`` (memory only) for the secure-aggregation stages, whose
    messages carry only the round."""
    label = msg.metadata.message_type
    run_id = None
    round_: int | None = None
    if not msg.has_error():
        run_rec = msg.content.config_records.get(RUN_RECORD)
        if run_rec is not None:
            run_id = str(run_rec.get("run_id", "")) or None
            r = run_rec.get("round")
            round_ = int(r) if isinstance(r, int) and not isinstance(r, bool) else None
        server = msg.content.config_records.get(SR.SERVER_RECORD)
        if server is not None:
            label = f"{label}:{server.get('stage', '?')}"
            r = server.get("round")
            if isinstance(r, int) and not isinstance(r, bool):
                round_ = r
    state = context.state.config_records.get(DEVICE_STATE)
    flwr_run = str(msg.metadata.run_id)
    if run_id is not None:
        if state is None:
            state = ConfigRecord()
        state[f"run:{flwr_run}"] = run_id
        context.state[DEVICE_STATE] = state
    elif state is not None and f"run:{flwr_run}" in state:
        run_id = str(state[f"run:{flwr_run}"])
    return run_id or f"flwr-{flwr_run}", round_, label


def error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def make_egress_guard(
    policy: EgressPolicy,
    open_log: Callable[[Context], AbstractContextManager[EgressLog]],
) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """The guard as a Flower mod. ``open_log(context)`` opens the device's egress log (its
    store) for one message; it is called for every reply, refused or not."""

    def egress_guard(msg: Message, context: Context, call_next) -> Message:
        run_id, round_, label = run_and_round(msg, context)
        allowed = policy.allowed_records(msg)  # before inner mods rewrite msg.content
        try:
            reply = call_next(msg, context)
        except Exception as exc:  # noqa: BLE001 - the reason may quote personal values: send only the type
            _log.warning("device app failed on a %s message (%s)", label, type(exc).__name__)
            reply = error_reply(msg, ERROR_CODE_APP_FAILED, f"the device app failed ({type(exc).__name__})")
        try:
            policy.check_records(allowed, reply)
            records, n_bytes, digest = describe(reply)
            policy.check_size(n_bytes)
        except EgressRefused as exc:
            _log.warning("egress guard refused a %s reply: %s", label, exc)
            reply = error_reply(msg, ERROR_CODE_REFUSED, f"egress guard refused the reply: {exc}")
            records, n_bytes, digest = describe(reply)
        try:
            with open_log(context) as log:
                log.log_egress(run_id, round_, label, records, n_bytes, digest)
        except Exception as exc:  # noqa: BLE001 - fail closed: an unlogged message is not sent
            _log.warning("egress log could not be written (%s): nothing sent", type(exc).__name__)
            return error_reply(msg, ERROR_CODE_LOG_FAILED, "the device could not record this message; nothing sent")
        return reply

    return egress_guard


@dataclass
class MemoryEgressLog:
    """An in-memory EgressLog (tests, tools): a list of what was logged."""

    entries: list[dict] = field(default_factory=list)

    def log_egress(self, run_id, round_, message_type, records, n_bytes, sha256) -> None:
        self.entries.append(
            {"run_id": run_id, "round": round_, "message_type": message_type, "records": records,
             "n_bytes": n_bytes, "sha256": sha256}
        )

    def __enter__(self) -> "MemoryEgressLog":
        return self

    def __exit__(self, *exc) -> None:
        return None


def allow_list_summary(policy: EgressPolicy | None = None) -> dict[str, Any]:
    """The allow-list in words and names, for the auditor's information-leakage section."""
    policy = policy or EgressPolicy()
    stages = {
        stage: {name: {"kind": kind, "keys": list(keys) if kind != "metric" else list(policy.metric_keys)}
                for name, (kind, keys) in recs.items()}
        for stage, recs in SR.CLIENT_REPLY_RECORDS.items()
    }
    return {
        "hello_reply": {CONSENT_RECORD: {"kind": "config", "keys": ["participate"]}},
        "model_delivery_reply": {},
        "secure_aggregation": stages,
        "unmasked_update": {UPDATE_RECORD: {"kind": "array", "keys": [UPDATE_VECTOR]}} if policy.allow_unmasked_update else None,
        "coarse_metrics": [
            {"name": m.name, "range": [m.lo, m.hi], "decimals": m.decimals} for m in policy.metrics
        ],
        "never_sent": sorted(FORBIDDEN_METRIC_KEYS) + ["raw observations", "check-in answers", "personal model part",
                                                       "any per-device metric in the clear (e.g. training loss)"],
    }


__all__ = [
    "EgressPolicy", "EgressRefused", "EgressLog", "MetricSpec", "TRAIN_LOSS", "DEFAULT_METRICS",
    "FORBIDDEN_METRIC_KEYS", "make_egress_guard", "wire_objects", "content_bytes", "describe",
    "message_size", "run_and_round", "error_reply", "MemoryEgressLog", "allow_list_summary",
]
