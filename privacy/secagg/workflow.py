"""The server side of Restwise secure aggregation over Flower's Message API (a ``Grid``).

Flower moves the messages (transport, node identity, TLS, scheduling); this module only
builds each stage's RecordDicts (``protocol.ServerRound``) and collects the replies with
``grid.push_messages`` / ``grid.pull_messages`` under a per-stage deadline.

A run keeps one :class:`SecAggSession`; each round is one call::

    session = SecAggSession(config)
    for r in rounds:
        result = session.round(grid, cohort, content_for, round=r, vector_length=d,
                               announce=run_and_receipt_records, before_unmask=write_ahead)
        if result.aborted: ...        # nothing released; result.reason / result.failure
        else: mean = result.total / len(result.survivors)
    session.finish(grid, last_participants, announce=last_receipt)

The first round of an epoch is a setup round (four messages per device); every later round
over a cohort that took part in the previous one is a fast round (two messages per device).
``content_for(plan)`` builds the train content once the round's participants are known
(``plan.participants``, ``plan.min_survivors``: size DP noise shares for this many).
``before_unmask(pending)`` runs after every masked input is in and before any unmasking
share is requested: the place to write a release to the ledger as spent. ``announce``
records go to every device in the first message of its round (the run record, the ledger
entries it has not received yet) and in ``finish``; a callable gives each node its own.

``secure_sum`` is one round of a one-off session (a setup round): what the server's release
path calls until it keeps a session per run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from . import records as R
from .config import SecAggConfig
from .errors import SecAggConfigError
from .fields import Extra, config, extras_of
from .protocol import Announce, PendingUnmask, Reply, RoundAborted, RoundPlan, SecureSumResult, ServerSession


# How often, at most, a stage reports replies coming in (``on_stage``).
PROGRESS_EVERY_S = 1.0

# on_stage(stage, expected, received, dropped): a stage began (received 0), replies came in,
# or it ended (dropped: expected - received). Counts only: no node id, no content.
OnStage = Callable[[str, int, int, "int | None"], None]


def vector_length_of(content: RecordDict) -> int:
    """Number of parameters in all ArrayRecords of ``content`` (the default update length:
    the update is the flattened model, in record and array order)."""
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            total += math.prod(array.shape)
    return total


class Exchange:
    """One RecordDict per node pushed; replies pulled until all arrived, the deadline, or
    (``wait(enough=...)``) the caller has what it needs - the rest may still be waited for.

    Replies are keyed by the sending node; more than one reply from a node is kept (the
    protocol treats it as a duplicate)."""

    def __init__(self, grid: Grid, contents: Mapping[int, RecordDict], group_ids: Mapping[int, str] | str,
                 timeout_s: float):
        self.grid = grid
        self.nodes = set(contents)
        messages = [
            Message(content, dst_node_id=node, message_type=R.MESSAGE_TYPE,
                    group_id=group_ids if isinstance(group_ids, str) else group_ids[node], ttl=timeout_s + 30.0)
            for node, content in contents.items()
        ]
        # a grid returns None for a message it could not push (e.g. too large): never answered
        self.pending = {msg_id for msg_id in grid.push_messages(messages) if msg_id}
        self.replies: dict[int, list[Reply]] = {}
        self.deadline = time.monotonic() + timeout_s

    @property
    def finished(self) -> bool:
        """Every reply is in, or the deadline passed."""
        return not self.pending or time.monotonic() >= self.deadline

    def wait(self, enough: Callable[[dict[int, list[Reply]]], bool] | None = None,
             on_progress: Callable[[int], None] | None = None) -> dict[int, list[Reply]]:
        """``on_progress(replied)``: the number of nodes that replied so far, when it changed
        (at most every PROGRESS_EVERY_S seconds while replies come in)."""
        # Poll gently: a pull walks the SuperLink's state under its lock (in simulation, in
        # this process, competing with the threads that deliver the messages).
        wait = 0.01
        told, told_at = len(self.replies), time.monotonic()
        while True:
            got = list(self.grid.pull_messages(self.pending)) if self.pending else []
            for reply in got:
                node = int(reply.metadata.src_node_id)
                if node not in self.nodes:
                    continue
                self.replies.setdefault(node, []).append(reply.error if reply.has_error() else reply.content)
                self.pending.discard(reply.metadata.reply_to_message_id)
            done = self.finished or (enough is not None and enough(self.replies))
            if on_progress is not None and len(self.replies) != told \
                    and (done or time.monotonic() - told_at >= PROGRESS_EVERY_S):
                told, told_at = len(self.replies), time.monotonic()
                on_progress(told)
            if done:
                return self.replies
            time.sleep(wait)
            wait = min(wait * 1.5, 0.1)


def exchange(
    grid: Grid, contents: Mapping[int, RecordDict], group_ids: Mapping[int, str] | str, timeout_s: float,
    on_progress: Callable[[int], None] | None = None,
) -> dict[int, list[Reply]]:
    """Send one RecordDict per node and collect replies until all arrived or the deadline."""
    return Exchange(grid, contents, group_ids, timeout_s).wait(on_progress=on_progress)


@dataclass(frozen=True)
class RoundInput:
    """The train content of a round and, optionally, its own clip range (the largest |value|
    per coordinate; e.g. sized from the round's DP noise shares)."""

    content: RecordDict
    clip_range: float | None = None


ContentFor = Callable[[RoundPlan], "RoundInput | RecordDict"]


class SecAggSession:
    """A run's secure aggregation over a Grid: an epoch of key agreement, then rounds."""

    def __init__(self, config: SecAggConfig, *, session_id: str | None = None, group_prefix: str = "secagg"):
        self.server = ServerSession(config, session_id)
        self.group_prefix = group_prefix

    @property
    def config(self) -> SecAggConfig:
        return self.server.config

    @property
    def banned(self) -> set[int]:
        return set(self.server.banned)

    def restart_epoch(self) -> None:
        """Make the next round a setup round (a new epoch over its cohort): e.g. to let in
        devices that did not complete the current epoch's setup. Bans stay."""
        self.server.epoch_expired = True

    def round(
        self,
        grid: Grid,
        node_ids: list[int],
        content: RecordDict | ContentFor,
        *,
        round: int,  # noqa: A002 - the name callers use
        vector_length: int | None = None,
        announce: Announce = None,
        before_unmask: Callable[[PendingUnmask], None] | None = None,
        extras: tuple[Extra, ...] | None = None,
        fixed_cohort: bool = False,
        last: bool = False,
        on_stage: OnStage | None = None,
    ) -> SecureSumResult:
        """One secure round over the sampled ``node_ids``; returns the decoded sum of the
        survivors' update vectors (``vector_length`` long; the extras are decoded apart).

        ``content`` is the train content each device's wrapped app receives, or a function
        of the round's :class:`RoundPlan` returning it (a RecordDict or a RoundInput).
        ``extras`` (default: the config's ``metric_keys`` over ``metric_range``) are per-
        device numbers summed in slots after the update. ``fixed_cohort``: the round's
        minimum of survivors is computed from ``len(node_ids)`` and any device lost before
        its masked input counts against it (for callers that sized the content for the
        whole cohort beforehand). ``last``: the session's last round (devices deal nothing
        for a next one and forget the session after the unmask). Never raises for client faults: drops, refusals,
        exclusions and aborts are in the result. Raises SecAggConfigError for an invalid
        call (fewer than 3 nodes, more than ``max_cohort``, no vector length), and whatever
        ``before_unmask`` raises (no share has been requested then)."""
        if vector_length is None:
            if callable(content):
                raise SecAggConfigError("give vector_length when the content is built per round")
            vector_length = vector_length_of(content)
        rnd = self.server.start_round(node_ids, round, vector_length, fixed_cohort=fixed_cohort)
        extras = extras_of(self.config) if extras is None else tuple(extras)
        timings: dict[str, float] = {}

        def tell(stage: str, expected: int) -> Callable[[int], None] | None:
            if on_stage is None:
                return None
            on_stage(stage, expected, 0, None)
            told_count[stage] = 0

            def progress(received: int) -> None:
                told_count[stage] = received
                on_stage(stage, expected, received, None)
            return progress

        told_count: dict[str, int] = {}

        def told(stage: str, expected: int, replies: dict[int, list[Reply]]) -> None:
            if on_stage is not None:
                received = sum(1 for node in replies if node in outgoing_of[stage])
                on_stage(stage, expected, received, expected - received)

        outgoing_of: dict[str, set[int]] = {}

        def run(stage: str, outgoing: dict[int, RecordDict], groups: dict[int, str] | None = None):
            start = time.perf_counter()
            outgoing_of[stage] = set(outgoing)
            replies = exchange(grid, outgoing, groups or f"{self.group_prefix}-{round}-{stage}", self.config.timeout_s,
                               on_progress=tell(stage, len(outgoing)))
            told(stage, len(outgoing), replies)
            timings[stage] = time.perf_counter() - start
            return replies

        try:
            try:
                if rnd.mode == "setup":
                    rnd.receive_setup(run(R.STAGE_SETUP, rnd.setup_messages(announce)))
                    rnd.receive_share_keys(run(R.STAGE_SHARE_KEYS, rnd.share_keys_messages()))
                built = content(rnd.plan()) if callable(content) else content
                inp = built if isinstance(built, RoundInput) else RoundInput(built)
                outgoing = rnd.collect_messages(inp.content, clip_range=inp.clip_range, extras=extras, announce=announce,
                                                last=last)
                groups = {node: f"{self.group_prefix}-{round}-{R.STAGE_COLLECT}" for node in outgoing}
                joins = rnd.join_messages(announce) if rnd.mode == "fast" else {}
                groups.update({node: f"{self.group_prefix}-{round}-{R.STAGE_JOIN}" for node in joins})
                replies = run(R.STAGE_COLLECT, {**outgoing, **joins}, groups)
                rnd.receive_join(replies)
                rnd.receive_collect(replies)
                unmask = rnd.unmask_messages()  # aborts here if some secret is out of reach
                if before_unmask is not None:
                    before_unmask(rnd.pending())
                # The unmask stage ends as soon as every needed secret has t shares: the
                # slowest device (often the last one to send its masked input, which then
                # waits out a whole idle poll of its SuperNode) is not waited for.
                start = time.perf_counter()
                outgoing_of[R.STAGE_UNMASK] = set(unmask)
                progress = tell(R.STAGE_UNMASK, len(unmask))
                pending = Exchange(grid, unmask, f"{self.group_prefix}-{round}-{R.STAGE_UNMASK}", self.config.timeout_s)
                try:
                    rnd.receive_unmask(pending.wait(enough=rnd.unmask_enough, on_progress=progress))
                except RoundAborted as exc:
                    if pending.finished or exc.context.get("failure") != "unmask-failed":
                        raise
                    rnd.dropped = {n: st for n, st in rnd.dropped.items() if st != R.STAGE_UNMASK}
                    # wrong shares among the first: wait for all
                    rnd.receive_unmask(pending.wait(on_progress=progress))
                if on_stage is not None and told_count.get(R.STAGE_UNMASK) != len(pending.replies):
                    # the stage ends once the shares suffice: nobody counted as dropped
                    on_stage(R.STAGE_UNMASK, len(unmask), len(pending.replies), None)
                timings[R.STAGE_UNMASK] = time.perf_counter() - start
                start = time.perf_counter()
                result = rnd.result()
                timings["aggregate"] = time.perf_counter() - start
            except RoundAborted as exc:
                result = rnd.result(aborted=exc)
        finally:
            banned = rnd.finish()
        result.banned = banned
        result.stage_seconds = timings
        return result

    def finish(self, grid: Grid, node_ids: list[int], *, announce: RecordDict | None = None,
               round: int = 0) -> dict[int, bool]:  # noqa: A002
        """The run's last message to ``node_ids`` (members of the current epoch): the
        ``announce`` records (the receipt of the last release); each device acknowledges and
        forgets the session's secrets. Returns node id -> acknowledged."""
        s = self.server
        nodes = [int(n) for n in node_ids if int(n) in s.index_of]
        base = {"stage": R.STAGE_FINISH, "session": s.session_id, "epoch": s.epoch, "round": int(round)}
        outgoing = {}
        for node in nodes:
            message = RecordDict({} if announce is None else dict(announce.items()))
            message[R.SERVER_RECORD] = ConfigRecord(dict(base))
            outgoing[node] = message
        replies = exchange(grid, outgoing, f"{self.group_prefix}-{round}-{R.STAGE_FINISH}", self.config.timeout_s)
        return {
            node: len(replies.get(node, [])) == 1 and isinstance(replies[node][0], RecordDict)
            and config(replies[node][0], R.ACK) is not None
            for node in nodes
        }


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
    """One secure round over ``node_ids`` in a one-off session (a setup round, four messages
    per device; the cohort's size fixes the round's minimum of survivors; the setup message
    announces ``content``'s config records). What the server's
    release path calls until it keeps a :class:`SecAggSession` per run. Message group ids are
    ``f"{run_config_key_prefix}-{round}-{stage}"``. Never raises for client faults; raises
    SecAggConfigError for an invalid call (too few or too many nodes, bad length)."""
    if not isinstance(config, SecAggConfig):
        raise SecAggConfigError("config must be a SecAggConfig")
    session = SecAggSession(config, group_prefix=run_config_key_prefix)
    # The setup message announces the round's configuration (the content's config records,
    # not its arrays): a device decides there whether it takes part, e.g. from the run record.
    announce = RecordDict(dict(content.config_records.items()))
    return session.round(grid, node_ids, content, round=round, vector_length=vector_length, fixed_cohort=True,
                         last=True, announce=announce)


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


__all__ = ["SecAggSession", "RoundInput", "OnStage", "PROGRESS_EVERY_S", "RoundPlan", "PendingUnmask", "SecureSumResult", "secure_sum",
           "config_from_run_config", "exchange", "vector_length_of"]
