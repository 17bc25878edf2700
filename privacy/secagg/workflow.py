"""``secure_sum``: the server side of Restwise SecAgg+ over Flower's Message API (Grid).

Flower moves the messages (transport, node identity, TLS, scheduling); this module only
builds each stage's RecordDicts (protocol.ServerRound) and collects the replies with
``grid.push_messages`` / ``grid.pull_messages`` under a per-stage deadline.

    result = secure_sum(grid, node_ids, content, config, round=r)
    if result.aborted: ...            # nothing released; result.reason says why
    mean = result.total / len(result.survivors)
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from . import records as R
from .config import SecAggConfig
from .errors import SecAggConfigError
from .protocol import Reply, RoundAborted, SecureSumResult, ServerRound


def vector_length_of(content: RecordDict) -> int:
    """Number of parameters in all ArrayRecords of ``content`` (the default update length:
    the update is the flattened model, in record and array order)."""
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            total += math.prod(array.shape)
    return total


def exchange(
    grid: Grid, contents: dict[int, RecordDict], group_id: str, timeout_s: float
) -> dict[int, list[Reply]]:
    """Send one RecordDict per node and collect replies until all arrived or the deadline.

    Replies are keyed by the sending node; more than one reply from a node is kept (the
    protocol treats it as a duplicate)."""
    messages = [
        Message(content, dst_node_id=node, message_type=R.MESSAGE_TYPE, group_id=group_id, ttl=timeout_s + 30.0)
        for node, content in contents.items()
    ]
    # a grid returns None for a message it could not push (e.g. too large): never answered
    pending = {msg_id for msg_id in grid.push_messages(messages) if msg_id}
    del messages
    replies: dict[int, list[Reply]] = {}
    deadline = time.monotonic() + timeout_s
    wait = 0.005
    while pending:
        got = list(grid.pull_messages(pending))
        for reply in got:
            node = int(reply.metadata.src_node_id)
            if node not in contents:
                continue
            replies.setdefault(node, []).append(reply.error if reply.has_error() else reply.content)
            pending.discard(reply.metadata.reply_to_message_id)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(wait if not got else 0.005)
        wait = min(wait * 1.5, 0.1)
    return replies


def secure_sum(
    grid: Grid,
    node_ids: list[int],
    content: RecordDict,
    config: SecAggConfig,
    *,
    round: int,  # noqa: A002 - the name callers use
    run_config_key_prefix: str = "secagg",
    vector_length: int | None = None,
) -> SecureSumResult:
    """One secure round over ``node_ids``; returns the decoded sum of survivors' updates.

    ``content`` is the train content each device's wrapped app receives (global model and
    config). ``vector_length`` defaults to the number of parameters in ``content``'s
    ArrayRecords. Message group ids are ``f"{run_config_key_prefix}-{round}-{stage}"``.
    Never raises for client faults: drops, exclusions and aborts are in the result.
    Raises SecAggConfigError for an invalid call (too few or too many nodes, bad length).
    """
    if not isinstance(config, SecAggConfig):
        raise SecAggConfigError("config must be a SecAggConfig")
    d = vector_length if vector_length is not None else vector_length_of(content)
    server = ServerRound(config, [int(n) for n in node_ids], round, d)
    timings: dict[str, float] = {}

    def run(stage: str, outgoing: dict[int, RecordDict]) -> dict[int, list[Reply]]:
        start = time.perf_counter()
        replies = exchange(grid, outgoing, f"{run_config_key_prefix}-{round}-{stage}", config.timeout_s)
        timings[stage] = time.perf_counter() - start
        return replies

    try:
        server.receive_setup(run(R.STAGE_SETUP, server.setup_messages()))
        server.receive_share_keys(run(R.STAGE_SHARE_KEYS, server.share_keys_messages()))
        server.receive_collect(run(R.STAGE_COLLECT, server.collect_messages(content)))
        server.receive_unmask(run(R.STAGE_UNMASK, server.unmask_messages()))
        start = time.perf_counter()
        result = server.result()
        timings["aggregate"] = time.perf_counter() - start
    except RoundAborted as exc:
        result = server.result(aborted_reason=str(exc))
    result.stage_seconds = timings
    return result


def config_from_run_config(run_config: Mapping[str, object], prefix: str = "secagg") -> SecAggConfig:
    """A SecAggConfig from Flower run-config keys ``<prefix>-num-neighbours``,
    ``-threshold``, ``-max-dropout-fraction``, ``-clip-range``, ``-frac-bits``,
    ``-ring-bits``, ``-max-cohort``, ``-timeout-s``, ``-out-of-range``; absent keys keep
    their defaults; values are validated like any SecAggConfig."""
    fields = {
        "num-neighbours": ("num_neighbours", int), "threshold": ("threshold", None),
        "max-dropout-fraction": ("max_dropout_fraction", float), "clip-range": ("clip_range", float),
        "frac-bits": ("frac_bits", int), "ring-bits": ("ring_bits", int),
        "max-cohort": ("max_cohort", int), "timeout-s": ("timeout_s", float),
        "out-of-range": ("out_of_range", str),
    }
    kwargs = {}
    for key, (name, cast) in fields.items():
        full = f"{prefix}-{key}"
        if full in run_config:
            value = run_config[full]
            try:
                kwargs[name] = cast(value) if cast else value
            except (TypeError, ValueError) as exc:
                raise SecAggConfigError(f"run config {full} is malformed") from exc
    return SecAggConfig(**kwargs)
