"""The server's side of Restwise secure aggregation, as transport-free state machines.

``ServerSession`` is the server's memory of one run: the current epoch (who is in it, their
indices, the neighbour graph, each device's share-encryption key), the shares each device
has dealt for its next round, and who was involved in accusations. ``ServerRound`` is one
round over a cohort; it builds each stage's RecordDicts and reads the replies. Neither
knows about Flower's Grid: ``workflow.py`` moves the RecordDicts (``SecAggSession``),
``device.py`` is the other side, ``harness.py`` runs both in-process.

A round is a **setup round** (a new epoch; four messages per device) or a **fast round**
(two messages per device), decided by :meth:`ServerSession.start_round`::

    setup round                              fast round
    1 setup      epoch parameters ->         (every device of the cohort must be ready:
                 c_pk, s_pk (or declined)     it dealt shares for this round last round)
    2 share-keys neighbours' c_pk ->
                 shares of b and s_sk
    3 collect    train content, neighbours' mask keys and their shares to this device,
                 keys to deal to -> masked input, bad-share reports, NEXT round's mask key
                 and shares (a device not ready gets ``join`` instead and deals for the next
                 round only)
    4 unmask     whose b / whose s_sk -> the shares; the server reconstructs, unmasks,
                 decodes, and checks the sum is within survivors x clip range

Every round uses a fresh mask key pair and self-mask seed per device, dealt one round ahead;
what persists across rounds is the epoch (graph, indices, share-encryption keys). Why, and
why no round's reveal exposes another round's input: docs/secure-aggregation.md.
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Error, RecordDict

from . import records as R
from . import shamir
from .config import SecAggConfig
from .crypto import agree, commitment, expand_mask, key_info, public_from_private, valid_public_key
from .encoding import decode_sum, ring_mask
from .errors import ProtocolViolationError, SecAggConfigError, SecAggError, ShareError
from .fields import (
    MAX_CT_BYTES,
    PAIR_MASK_PURPOSE,
    Extra,
    arrays,
    bytes_list,
    config,
    decode_extras,
    epoch_fields,
    int_list,
)
from .graph import harary_neighbours

Reply = RecordDict | Error
# What goes with the first message of a device's round: the same records for every device, or
# a function of the node id (e.g. the ledger entries that device has not received yet).
Announce = RecordDict | Callable[[int], RecordDict] | None


class RoundAborted(SecAggError):
    pass


# -- results -----------------------------------------------------------------------------------
@dataclass
class SecureSumResult:
    """What one secure round released, and everything that happened on the way.

    total          decoded sum of the survivors' update vectors (float64); None when aborted
    survivors      node ids whose input is in ``total``
    dropped        node id -> stage at which it stopped answering (a node listed with stage
                   ``unmask`` is *also* a survivor: its input had arrived)
    declined       node ids that answered "not taking part" (no reason is ever given)
    excluded       node id -> why its input was refused (malformed, refused, accused,
                   accuser, banned, ...)
    faults         node id -> a fault that did not remove its input (bad unmask shares)
    aborted        True when nothing was released; ``reason`` says why, ``failure`` is a
                   short code: too-few, unreachable, unmask-failed, sum-out-of-bounds
    metrics        mean over the survivors who had one, of each extra (config.metric_keys),
                   decoded from the masked sum (never sent in the clear)
    extras         name -> (sum, count) of each extra over the survivors
    total_ring     the ring value of the update part of the sum (uint64), for exact checks
    out_of_bounds  when the decoded sum failed the bound: coordinates over it, the largest
                   |value|, the bound (survivors x clip range)
    mode           "setup" (4 messages) or "fast" (2 messages)
    joined         node ids that were asked to join (they take part from the next round)
    accusations    (accuser, accused) node id pairs of bad-share reports in this round
    banned         node ids banned for the rest of the session after this round
    messages       node id -> messages the server sent it in this round
    """

    total: np.ndarray | None
    survivors: list[int]
    dropped: dict[int, str]
    excluded: dict[int, str]
    aborted: bool
    reason: str | None
    faults: dict[int, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    total_ring: np.ndarray | None = None
    round: int = 0
    num_sampled: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    declined: list[int] = field(default_factory=list)
    failure: str | None = None
    extras: dict[str, tuple[float, int]] = field(default_factory=dict)
    out_of_bounds: dict[str, float] = field(default_factory=dict)
    mode: str = "setup"
    joined: list[int] = field(default_factory=list)
    accusations: list[tuple[int, int]] = field(default_factory=list)
    banned: list[int] = field(default_factory=list)
    messages: dict[int, int] = field(default_factory=dict)
    participants: int = 0
    min_survivors: int = 0


@dataclass(frozen=True)
class RoundPlan:
    """What the orchestrator learns before it builds the round's train content: how many
    devices are asked for a masked input, and the fewest whose inputs a released sum can
    hold (size each device's DP noise share for this many)."""

    round: int
    participants: int
    min_survivors: int
    mode: str


@dataclass(frozen=True)
class PendingUnmask:
    """The round after every masked input is in and before any unmasking share is asked
    for: the survivors are final (a survivor lost at unmask stays in the sum).

    ``commitment``: SHA-256 (hex) of the session, epoch, round and the ring sum of the
    survivors' masked inputs - the one aggregate the unmasking can decode, fixed before any
    share is asked for. A write-ahead ledger entry names it (it reveals nothing: the masked
    sum is uniformly random to anyone without the masks)."""

    round: int
    survivors: list[int]
    participants: int
    min_survivors: int
    sampled: int
    commitment: str = ""


@dataclass
class Material:
    """One device's shares for one round, as it dealt them: the round's mask public key,
    the commitment to its self-mask seed, and one ciphertext per receiver index with the
    version of the receiver's share-encryption key it was encrypted to."""

    round: int
    s_pk: bytes
    b_commit: bytes
    cts: dict[int, tuple[bytes, int]]


# -- the session -------------------------------------------------------------------------------
class ServerSession:
    """The server's view of a run's secure aggregation (transport-free)."""

    def __init__(self, config: SecAggConfig, session_id: str | None = None):
        if not isinstance(config, SecAggConfig):
            raise SecAggConfigError("config must be a SecAggConfig")
        self.config = config
        self.session_id = session_id or secrets.token_hex(16)
        self.epoch = 0
        self.index_of: dict[int, int] = {}
        self.node_of: dict[int, int] = {}
        self.n_index = 0
        self.n = 0
        self.k = 0
        self.t = 0
        self.graph: dict[int, list[int]] = {}
        self.c_pk: dict[int, bytes] = {}
        self.c_version: dict[int, int] = {}
        self.material: dict[int, Material] = {}
        self.involved: dict[int, set[int]] = {}
        self.banned: set[int] = set()
        self.epoch_expired = False

    def start_round(self, node_ids: list[int], round_: int, vector_length: int, *,
                    fixed_cohort: bool = False) -> "ServerRound":
        """A round over ``node_ids`` (the sampled cohort). ``fixed_cohort``: the cohort's
        size is what the round's minimum of survivors is computed from, and a device lost
        at setup or share-keys counts as a dropout (for callers that built the train
        content for that size beforehand); otherwise the round's participants are the
        devices asked for a masked input."""
        nodes = [int(n) for n in node_ids]
        if len(set(nodes)) != len(nodes):
            raise SecAggConfigError("node ids must be distinct")
        if not isinstance(vector_length, int) or isinstance(vector_length, bool) or vector_length < 1:
            raise SecAggConfigError("vector_length must be a positive integer")
        self.config.round_parameters(len(nodes))  # at least 3, at most max_cohort
        return ServerRound(self, nodes, int(round_), vector_length, fixed_cohort)

    # -- readiness ----------------------------------------------------------------------------
    def dealt_to(self, owner: int, receiver: int, round_: int) -> bool:
        """``owner`` dealt shares for ``round_`` to ``receiver`` under its current key."""
        material = self.material.get(owner)
        if material is None or material.round != round_:
            return False
        got = material.cts.get(receiver)
        return got is not None and got[1] == self.c_version.get(receiver)

    def mask_neighbours(self, i: int, members: set[int], round_: int) -> list[int]:
        """The neighbours ``i`` masks with in ``round_``: graph neighbours among ``members``
        that dealt shares to it and to which it dealt (pairwise masks must be symmetric)."""
        return [j for j in self.graph.get(i, []) if j in members
                and self.dealt_to(j, i, round_) and self.dealt_to(i, j, round_)]

    def ready(self, indices: set[int], round_: int) -> set[int]:
        """The largest subset of ``indices`` in which every device dealt shares for
        ``round_`` and shares masks with at least t others of the subset."""
        ready = {i for i in indices if (m := self.material.get(i)) is not None and m.round == round_}
        while True:
            short = {i for i in ready if len(self.mask_neighbours(i, ready, round_)) < self.t}
            if not short:
                return ready
            ready -= short

    def record_accusation(self, node: int, round_: int) -> None:
        self.involved.setdefault(node, set()).add(round_)

    def apply_bans(self) -> list[int]:
        """Devices involved in accusations in two rounds: excluded for the rest of the run."""
        new = sorted(n for n, rounds in self.involved.items() if len(rounds) >= 2 and n not in self.banned)
        self.banned.update(new)
        return new


# -- one round -----------------------------------------------------------------------------------
class ServerRound:
    """The server's view of one round (setup or fast), over client indices."""

    def __init__(self, session: ServerSession, node_ids: list[int], round_: int, vector_length: int,
                 fixed_cohort: bool):
        self.s = session
        self.config = session.config
        self.round = round_
        self.vector_length = vector_length
        self.fixed_cohort = fixed_cohort
        self.num_sampled = len(node_ids)
        self.dropped: dict[int, str] = {}
        self.excluded: dict[int, str] = {}
        self.declined: list[int] = []
        self.faults: dict[int, str] = {}
        self.accusations: list[tuple[int, int]] = []
        self.joined: list[int] = []
        self.messages: dict[int, int] = {}
        self.next_material: dict[int, Material] = {}
        self.next_s_pk: dict[int, bytes] = {}
        self.dealt_version: dict[tuple[int, int], int] = {}
        self.deal_list: dict[int, list[int]] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.held: dict[int, set[int]] = {}
        self.u3: set[int] = set()
        self.clip_range = float(self.config.clip_range)
        self.extras: tuple[Extra, ...] = ()
        self.participants: set[int] = set()
        self.joiners: list[int] = []
        eligible = []
        for node in node_ids:
            if node in session.banned:
                self.excluded[node] = "banned: involved in bad-share accusations in two rounds"
            else:
                eligible.append(node)
        self.eligible = eligible
        self.n_planned = len(node_ids) if fixed_cohort else 0
        self.mode = self._choose_mode()

    # -- mode ---------------------------------------------------------------------------------
    def _choose_mode(self) -> str:
        """Fast when the epoch covers the cohort and enough of it is ready (dealt shares for
        this round, with at least t mutual neighbours); the rest of the cohort is asked to
        join. Otherwise a setup round (a new epoch over the cohort)."""
        s = self.s
        if len(self.eligible) < 3 or s.epoch == 0 or s.epoch_expired or any(n not in s.index_of for n in self.eligible):
            return "setup"
        outside = [n for n in self.eligible if s.index_of[n] not in s.graph]
        cohort = {s.index_of[n] for n in self.eligible if n not in outside}
        ready = s.ready(cohort, self.round)
        if len(ready) < max(3, self.config.min_survivors(len(self.eligible))):
            return "setup"
        if self.fixed_cohort and (ready != cohort or outside):
            return "setup"  # the cohort's size was promised to the caller: all of it, or a new epoch
        for node in outside:  # it did not take part in this epoch's setup; a new epoch includes it
            self.excluded[node] = "not in the current epoch (it did not complete the epoch's setup)"
        self.participants = ready
        self.joiners = sorted(cohort - ready)
        return "fast"

    # -- bookkeeping --------------------------------------------------------------------------
    def node(self, i: int) -> int:
        return self.s.node_of[i]

    def _drop(self, i: int, stage: str) -> None:
        self.participants.discard(i)
        self.dropped[self.node(i)] = stage

    def _exclude(self, i: int, reason: str) -> None:
        self.participants.discard(i)
        self.excluded.setdefault(self.node(i), reason)

    def _count(self, out: dict[int, RecordDict]) -> dict[int, RecordDict]:
        for node in out:
            self.messages[node] = self.messages.get(node, 0) + 1
        return out

    def _sort_replies(self, stage: str, indices, replies: dict[int, list[Reply]], *, may_decline: bool
                      ) -> dict[int, RecordDict]:
        """One valid content per index; drops, duplicates, errors, refusals and declines out."""
        good: dict[int, RecordDict] = {}
        for i in sorted(indices):
            got = replies.get(self.node(i), [])
            if not got:
                self._drop(i, stage)
            elif len(got) > 1:
                self._exclude(i, f"{stage}: duplicate replies")
            elif isinstance(got[0], Error):
                self._exclude(i, f"{stage}: the device reported an error")
            elif config(got[0], R.DECLINED) is not None and may_decline:
                self.participants.discard(i)
                self.declined.append(self.node(i))
            elif config(got[0], R.REFUSED) is not None:
                code = config(got[0], R.REFUSED).get("code", "unknown")
                self._exclude(i, f"{stage}: the device refused ({str(code)[:40]})")
            else:
                good[i] = got[0]
        return good

    @property
    def n(self) -> int:
        return self.n_planned or len(self.participants)

    @property
    def min_survivors(self) -> int:
        n = self.n
        return n - math.floor(self.config.max_dropout_fraction * n)

    def _require(self, count: int, stage: str) -> None:
        if count < 3:
            raise RoundAborted(
                f"round aborted at {stage}: {count} clients remain, fewer than the 3 secure "
                f"aggregation needs; nothing was released", failure="too-few")
        if self.n_planned and count < self.min_survivors:
            raise RoundAborted(
                f"round aborted at {stage}: {count} of {self.n_planned} clients remain, fewer than "
                f"the {self.min_survivors} needed (max_dropout_fraction "
                f"{self.config.max_dropout_fraction}); nothing was released", failure="too-few")

    def _deal_to(self, i: int, neighbours: list[int]) -> list[int]:
        """Whom ``i`` deals its next shares to (and which key version of each it was sent)."""
        self.deal_list[i] = list(neighbours)
        for j in neighbours:
            self.dealt_version[(i, j)] = self.s.c_version[j]
        return neighbours

    def _base(self, stage: str, epoch: int | None = None) -> dict:
        return {"stage": stage, "session": self.s.session_id,
                "epoch": self.s.epoch if epoch is None else epoch, "round": self.round}

    def plan(self) -> RoundPlan:
        return RoundPlan(self.round, self.n, self.min_survivors, self.mode)

    # -- setup round: stage 1 -----------------------------------------------------------------
    def setup_messages(self, announce: "Announce" = None) -> dict[int, RecordDict]:
        """A new epoch over the eligible cohort: fresh indices 1..n."""
        self.new_epoch = self.s.epoch + 1
        self.setup_index = {node: i + 1 for i, node in enumerate(self.eligible)}
        self.setup_node = {i: node for node, i in self.setup_index.items()}
        n = len(self.eligible)
        out = {}
        for node, i in self.setup_index.items():
            rec = ConfigRecord({**self._base(R.STAGE_SETUP, self.new_epoch), "index": i, "n": n,
                                **epoch_fields(self.config)})
            out[node] = _with(announced(announce, node), rec)
        return self._count(out)

    def receive_setup(self, replies: dict[int, list[Reply]]) -> None:
        s = self.s
        # The new epoch replaces the old one from here on (the old epoch's material is void).
        s.epoch, s.index_of, s.node_of = self.new_epoch, dict(self.setup_index), dict(self.setup_node)
        s.epoch_expired = False
        s.n_index, s.material, s.c_pk, s.c_version, s.graph = len(self.setup_index), {}, {}, {}, {}
        self.participants = set(s.node_of)
        s_pk: dict[int, bytes] = {}
        for i, content in self._sort_replies(R.STAGE_SETUP, set(s.node_of), replies, may_decline=True).items():
            rec = config(content, R.PUBLIC_KEYS)
            c_pk = rec.get("c_pk") if rec is not None else None
            pk = rec.get("s_pk") if rec is not None else None
            if not (valid_public_key(c_pk) and valid_public_key(pk)) or c_pk == pk:
                self._exclude(i, "setup: malformed public keys")
                continue
            s.c_pk[i], s.c_version[i], s_pk[i] = c_pk, 1, pk
        seen: dict[bytes, int] = {}
        for i in sorted(self.participants):  # a key advertised twice is a replay: refuse both
            for key in (s.c_pk[i], s_pk[i]):
                if key in seen and seen[key] != i:
                    self._exclude(i, "setup: public key reused by another client")
                    self._exclude(seen[key], "setup: public key reused by another client")
                seen[key] = i
        self.setup_s_pk = {i: s_pk[i] for i in self.participants}
        self._require(len(self.participants), R.STAGE_SETUP)
        s.n = len(self.participants)
        s.k, s.t, _ = self.config.round_parameters(s.n)
        s.graph = harary_neighbours(sorted(self.participants), s.k)

    # -- setup round: stage 2 -----------------------------------------------------------------
    def share_keys_messages(self) -> dict[int, RecordDict]:
        s = self.s
        out = {}
        for i in sorted(self.participants):
            nb = self._deal_to(i, [j for j in s.graph[i] if j in s.c_pk])
            rec = ConfigRecord({**self._base(R.STAGE_SHARE_KEYS), "n": s.n, "neighbours": nb,
                                "c_pk": [s.c_pk[j] for j in nb]})
            out[self.node(i)] = RecordDict({R.SERVER_RECORD: rec})
        return self._count(out)

    def receive_share_keys(self, replies: dict[int, list[Reply]]) -> None:
        s = self.s
        for i, content in self._sort_replies(R.STAGE_SHARE_KEYS, set(self.participants), replies,
                                             may_decline=False).items():
            try:
                material = self._material(i, config(content, R.SHARES), self.round, self.setup_s_pk[i])
            except ProtocolViolationError as exc:
                self._exclude(i, f"share-keys: {exc}")
                continue
            s.material[i] = material
        for i in set(self.participants) - set(s.material):
            self.participants.discard(i)
        self._prune_unready(R.STAGE_SHARE_KEYS)

    def _prune_unready(self, stage: str) -> None:
        ready = self.s.ready(set(self.participants), self.round)
        for i in sorted(set(self.participants) - ready):
            self._exclude(i, f"{stage}: fewer than {self.s.t} neighbours dealt it shares")
        self._require(len(self.participants), stage)

    def _material(self, i: int, rec: ConfigRecord | None, for_round: int, s_pk: bytes) -> Material:
        """The shares ``i`` dealt (a SHARES record), checked for form: for the neighbours it
        was told to deal to, ciphertexts of the right size, a 32-byte commitment."""
        if rec is None:
            raise ProtocolViolationError("no shares")
        dst = int_list(rec.get("dst"), "dst")
        cts = bytes_list(rec.get("ct"), "ct")
        commit = rec.get("b_commit")
        if dst != self.deal_list.get(i) or len(cts) != len(dst):
            raise ProtocolViolationError("shares for the wrong neighbours")
        if any(len(ct) > MAX_CT_BYTES for ct in cts) or not isinstance(commit, bytes) or len(commit) != 32:
            raise ProtocolViolationError("oversized shares or a malformed commitment")
        return Material(for_round, s_pk, commit, {j: (ct, self.dealt_version[(i, j)]) for j, ct in zip(dst, cts)})

    # -- collect (both modes) and join (fast mode) ----------------------------------------------
    def collect_messages(self, content: RecordDict, *, clip_range: float | None = None,
                         extras: tuple[Extra, ...] = (), announce: "Announce" = None,
                         last: bool = False) -> dict[int, RecordDict]:
        """``last``: the session's last round; devices deal nothing for a next round and
        forget the session once they answered the unmask."""
        s = self.s
        if clip_range is not None:
            self.config.check_encoding(clip_range)
            self.clip_range = float(clip_range)
        self.extras = tuple(extras)
        self.n_planned = self.n  # fixed from here on: the train content was built for it
        members = set(self.participants)
        self.mask_nb = {i: s.mask_neighbours(i, members, self.round) for i in members}
        self.current = {i: s.material[i] for i in members}
        out = {}
        for i in sorted(members):
            src = self.mask_nb[i]
            deal = [] if last else [j for j in s.graph[i] if j in s.c_pk and s.node_of[j] not in s.banned]
            self._deal_to(i, deal)
            rec = ConfigRecord({
                **self._base(R.STAGE_COLLECT), "n": self.n, "min_survivors": self.min_survivors,
                "clip_range": self.clip_range, "vector_length": self.vector_length,
                "extras": [x.name for x in self.extras], "extras_lo": [x.lo for x in self.extras],
                "extras_hi": [x.hi for x in self.extras],
                "src": src, "src_c_pk": [s.c_pk[j] for j in src], "s_pk": [self.current[j].s_pk for j in src],
                "ct": [self.current[j].cts[i][0] for j in src],
                "neighbours": deal, "c_pk": [s.c_pk[j] for j in deal], "last": bool(last),
            })
            message = RecordDict(dict(content.items()))
            first = announced(announce, self.node(i)) if self.mode == "fast" else None
            if first is not None:
                for name, record in first.items():
                    message[name] = record
            message[R.SERVER_RECORD] = rec
            out[self.node(i)] = message
        for i in members:  # forwarded: the server keeps no ciphertext it no longer needs
            self.current[i] = Material(self.current[i].round, self.current[i].s_pk, self.current[i].b_commit, {})
        return self._count(out)

    def join_messages(self, announce: "Announce" = None) -> dict[int, RecordDict]:
        s = self.s
        out = {}
        for i in self.joiners:
            deal = self._deal_to(i, [j for j in s.graph[i] if j in s.c_pk and s.node_of[j] not in s.banned])
            rec = ConfigRecord({**self._base(R.STAGE_JOIN), "index": i, "n_index": s.n_index, "n": s.n,
                                **epoch_fields(self.config), "neighbours": deal, "c_pk": [s.c_pk[j] for j in deal]})
            out[self.node(i)] = _with(announced(announce, self.node(i)), rec)
        self.joined = [self.node(i) for i in self.joiners]
        return self._count(out)

    def receive_join(self, replies: dict[int, list[Reply]]) -> None:
        s = self.s
        for i in self.joiners:
            got = replies.get(self.node(i), [])
            if not got:
                self.dropped[self.node(i)] = R.STAGE_JOIN
            if len(got) != 1 or isinstance(got[0], Error) or config(got[0], R.DECLINED) is not None \
                    or config(got[0], R.REFUSED) is not None:
                if len(got) == 1 and not isinstance(got[0], Error) and config(got[0], R.DECLINED) is not None:
                    self.declined.append(self.node(i))
                continue  # not ready next round: it is asked to join again
            content = got[0]
            keys = config(content, R.PUBLIC_KEYS)
            c_pk = keys.get("c_pk") if keys is not None else None
            pk = keys.get("s_pk") if keys is not None else None
            if not (valid_public_key(c_pk) and valid_public_key(pk)) or c_pk == pk:
                continue
            try:
                material = self._material(i, config(content, R.SHARES), self.round + 1, pk)
            except ProtocolViolationError:
                continue
            if s.c_pk.get(i) != c_pk:  # a new share-encryption key: older shares to it are void
                s.c_pk[i], s.c_version[i] = c_pk, s.c_version.get(i, 0) + 1
            self.next_material[i] = material

    def receive_collect(self, replies: dict[int, list[Reply]]) -> None:
        s = self.s
        mask = ring_mask(self.config.ring_bits)
        length = self.vector_length + 2 * len(self.extras)
        good = self._sort_replies(R.STAGE_COLLECT, set(self.participants), replies, may_decline=True)
        reported: list[tuple[int, int]] = []
        for i, content in good.items():
            try:
                masked = arrays(content, R.MASKED_INPUT)
                if masked is None or R.MASKED_ARRAY not in masked:
                    raise ProtocolViolationError("no masked input")
                y = masked[R.MASKED_ARRAY].numpy()
                if y.dtype != np.uint64 or y.ndim != 1:
                    raise ProtocolViolationError("the masked input is not a uint64 vector")
                if y.shape[0] != length:
                    raise ProtocolViolationError("the masked input has the wrong length")
                if self.config.ring_bits < 64 and np.any(y > mask):
                    raise ProtocolViolationError("the masked input has values outside the ring")
                status = config(content, R.MASKED_STATUS)
                bad = int_list(status.get("bad_share_senders") if status is not None else None, "bad_share_senders")
                if len(set(bad)) != len(bad) or not set(bad) <= set(self.mask_nb[i]):
                    raise ProtocolViolationError("a share report names a non-neighbour")
            except ProtocolViolationError as exc:
                self._exclude(i, f"collect-masked-input: {exc}")
                continue
            except Exception:  # undecodable array bytes etc.: never crash on a device's data
                self._exclude(i, "collect-masked-input: the masked input cannot be decoded")
                continue
            self.masked[i] = y
            self.held[i] = set(self.mask_nb[i]) - set(bad)
            reported += [(i, j) for j in bad]
            self._take_next_material(i, content)
        # An accusation of bad shares excludes both the accuser and the accused from the round
        # (a false accuser cannot get honest devices excluded for free), and counts as an
        # involvement of both: two rounds with one, and a device is out for the rest of the run.
        for accuser, accused in reported:
            self.accusations.append((self.node(accuser), self.node(accused)))
            s.record_accusation(self.node(accuser), self.round)
            s.record_accusation(self.node(accused), self.round)
            if self.node(accused) in self.dropped:
                continue  # it sent no masked input: it is simply dropped
            self._exclude(accuser, f"collect-masked-input: it reported client {self.node(accused)}'s shares as "
                                   f"malformed or failing authentication (an accusation excludes both)")
            self._exclude(accused, f"share-keys: its share to client {self.node(accuser)} was reported as "
                                   f"malformed or failing authentication (an accusation excludes both)")
        self.u3 = {i for i in self.masked if i in self.participants}
        for i in list(self.masked):
            if i not in self.u3:
                self.masked.pop(i)
        self._require(len(self.u3), R.STAGE_COLLECT)

    def _take_next_material(self, i: int, content: RecordDict) -> None:
        """The next round's shares a device dealt with its masked input (absent: it joins
        before it takes part again)."""
        keys = config(content, R.PUBLIC_KEYS)
        rec = config(content, R.SHARES)
        if keys is None or rec is None:
            return
        pk = keys.get("s_pk")
        if not valid_public_key(pk):
            return
        try:
            self.next_material[i] = self._material(i, rec, self.round + 1, pk)
        except ProtocolViolationError:
            return

    # -- unmask ---------------------------------------------------------------------------------
    def _needed_sk_owners(self) -> set[int]:
        """Participants whose input is not in the sum but whose pairwise masks are in a
        survivor's: their round key is reconstructed (it is used in no other round)."""
        return {j for i in self.u3 for j in self.mask_nb[i] if j not in self.u3}

    def pending(self) -> PendingUnmask:
        return PendingUnmask(self.round, sorted(self.node(i) for i in self.u3), self.n, self.min_survivors,
                             self.num_sampled, self.masked_commitment())

    def masked_commitment(self) -> str:
        """SHA-256 over (session, epoch, round, survivor indices, ring sum of their masked
        inputs): see :class:`PendingUnmask`."""
        total = np.zeros(self.vector_length + 2 * len(self.extras), dtype=np.uint64)
        for i in sorted(self.u3):
            total += self.masked[i]
        total &= ring_mask(self.config.ring_bits)
        h = hashlib.sha256()
        h.update(f"restwise-secagg-masked-sum|{self.s.session_id}|{self.s.epoch}|{self.round}|".encode())
        h.update(",".join(str(i) for i in sorted(self.u3)).encode() + b"|")
        h.update(total.astype("<u8").tobytes())
        return h.hexdigest()

    def unmask_messages(self) -> dict[int, RecordDict]:
        """Checks every needed secret is held by at least t survivors *before* any share is
        asked for (a round that cannot complete hands out no seeds), then asks."""
        needed = self._needed_sk_owners()
        holders: dict[int, int] = {}
        for w in self.u3:
            for j in self.held[w]:
                holders[j] = holders.get(j, 0) + 1
        for j in sorted(self.u3 | needed):
            if holders.get(j, 0) < self.s.t:
                what = "self-mask seed" if j in self.u3 else "mask key"
                raise RoundAborted(
                    f"round aborted before unmask: the {what} of client {self.node(j)} is held by "
                    f"{holders.get(j, 0)} surviving neighbours, fewer than the {self.s.t} needed (too many "
                    f"dropouts in one neighbourhood); no shares were requested and nothing was released",
                    failure="unreachable")
        out = {}
        for w in sorted(self.u3):
            rec = ConfigRecord({
                **self._base(R.STAGE_UNMASK), "b_owners": sorted(self.held[w] & self.u3),
                "sk_owners": sorted(self.held[w] & needed), "n_survivors": len(self.u3),
            })
            out[self.node(w)] = RecordDict({R.SERVER_RECORD: rec})
        return self._count(out)

    def unmask_enough(self, replies: dict[int, list[Reply]]) -> bool:
        """Whether the replies so far hold t shares of every needed secret (counted, not yet
        checked: a wrong share makes the caller wait for the rest)."""
        needed = self.u3 | self._needed_sk_owners()
        count = dict.fromkeys(needed, 0)
        for w in self.u3:
            got = replies.get(self.node(w), [])
            rec = config(got[0], R.UNMASK_SHARES) if len(got) == 1 and not isinstance(got[0], Error) else None
            if rec is None:
                continue
            for key in ("b_owner", "sk_owner"):
                owners = rec.get(key)
                for j in owners if isinstance(owners, list) else []:
                    if j in count:
                        count[j] += 1
        return all(c >= self.s.t for c in count.values())

    def receive_unmask(self, replies: dict[int, list[Reply]]) -> None:
        """Reconstruct the secrets; raises RoundAborted if any is out of reach. A survivor
        without a reply is recorded as dropped at unmask - lost, or only slower than the
        shares the server needed (it stops waiting once it has them); its input is in the
        sum either way."""
        needed = self._needed_sk_owners()
        b_parts: dict[int, list[tuple[int, bytes]]] = {j: [] for j in self.u3}
        sk_parts: dict[int, list[tuple[int, bytes]]] = {j: [] for j in needed}
        for w in sorted(self.u3):
            node = self.node(w)
            got = replies.get(node, [])
            if len(got) != 1 or isinstance(got[0], Error):
                if not got:
                    self.dropped[node] = R.STAGE_UNMASK
                else:
                    self.faults[node] = "unmask: duplicate or error reply; its shares were not used"
                continue
            rec = config(got[0], R.UNMASK_SHARES)
            try:
                if rec is None:
                    raise ProtocolViolationError("no shares")
                b_owner = int_list(rec.get("b_owner"), "b_owner")
                sk_owner = int_list(rec.get("sk_owner"), "sk_owner")
                b_share = bytes_list(rec.get("b_share"), "b_share")
                sk_share = bytes_list(rec.get("sk_share"), "sk_share")
                if len(b_owner) != len(b_share) or len(sk_owner) != len(sk_share):
                    raise ProtocolViolationError("owner and share lists differ in length")
                if not set(b_owner) <= self.held[w] & self.u3 or not set(sk_owner) <= self.held[w] & needed:
                    raise ProtocolViolationError("shares for owners that were not asked for")
                if len(set(b_owner)) != len(b_owner) or len(set(sk_owner)) != len(sk_owner):
                    raise ProtocolViolationError("duplicate shares")
                for share in b_share + sk_share:
                    shamir.parse_share(share)
            except (ProtocolViolationError, ShareError) as exc:
                self.faults[node] = f"unmask: {exc}; its shares were not used"
                continue
            for j, share in zip(b_owner, b_share):
                b_parts[j].append((w, share))
            for j, share in zip(sk_owner, sk_share):
                sk_parts[j].append((w, share))
        session, rnd = self.s.session_id, self.round
        self.b_seed = {
            j: self._reconstruct(j, parts, lambda sec, j=j: commitment(session, rnd, j, sec) == self.current[j].b_commit,
                                 "self-mask seed")
            for j, parts in b_parts.items()
        }
        self.sk = {
            j: self._reconstruct(j, parts, lambda sec, j=j: _pk_matches(sec, self.current[j].s_pk), "mask key")
            for j, parts in sk_parts.items()
        }

    def _reconstruct(self, owner: int, parts: list[tuple[int, bytes]], verify: Callable[[bytes], bool], what: str) -> bytes:
        t = self.s.t
        if len(parts) < t:
            raise RoundAborted(
                f"round aborted at unmask: the {what} of client {self.node(owner)} has "
                f"{len(parts)} of the {t} shares needed; nothing was released", failure="unmask-failed")
        rng = random.Random(owner)  # which subsets to try is not secret

        def candidates():
            yield parts[:t]
            for _ in range(48 if len(parts) > t else 0):
                yield rng.sample(parts, t)

        for attempt, subset in enumerate(candidates()):
            try:
                secret = shamir.reconstruct([x for x, _ in subset], [sh for _, sh in subset])
            except ShareError:
                continue
            if verify(secret):
                # the first t shares almost always verify; only after a failure is it worth
                # finding which holders returned wrong shares
                for holder in (_inconsistent_holders(subset, parts) if attempt else []):
                    self.faults.setdefault(self.node(holder), "unmask: returned a wrong share")
                return secret
        raise RoundAborted(
            f"round aborted at unmask: the shares of client {self.node(owner)}'s {what} "
            f"do not reconstruct it (tampered shares); nothing was released", failure="unmask-failed")

    def aggregate(self) -> np.ndarray:
        """The unmasked ring sum of the survivors' inputs (uint64, update then extras)."""
        d = self.vector_length + 2 * len(self.extras)
        session, epoch, rnd = self.s.session_id, self.s.epoch, self.round
        total = np.zeros(d, dtype=np.uint64)
        for i in sorted(self.u3):
            total += self.masked[i]
            total -= expand_mask(self.b_seed[i], d, 64)
        for j, sk in self.sk.items():  # pairwise masks of survivors with participants not in the sum
            for i in sorted(self.u3):
                if j in self.mask_nb[i]:
                    seed = agree(sk, self.current[i].s_pk, key_info(PAIR_MASK_PURPOSE, session, epoch, rnd, i, j))
                    if i < j:
                        total -= expand_mask(seed, d, 64)
                    else:
                        total += expand_mask(seed, d, 64)
        total &= ring_mask(self.config.ring_bits)
        return total

    # -- the end of the round -------------------------------------------------------------------
    def finish(self) -> list[int]:
        """Keep what the devices dealt for the next round (unless two of them announced the
        same key: a replay, both void) and apply bans. Call once, whatever the outcome."""
        seen: dict[bytes, int] = {}
        void: set[int] = set()
        for i, material in self.next_material.items():
            if material.s_pk in seen:
                void |= {i, seen[material.s_pk]}
            seen[material.s_pk] = i
        for i, material in self.next_material.items():
            if i not in void:
                self.s.material[i] = material
        return self.s.apply_bans()

    def result(self, aborted: RoundAborted | None = None) -> SecureSumResult:
        common = dict(faults=self.faults, round=self.round, num_sampled=self.num_sampled, declined=sorted(self.declined),
                      mode=self.mode, joined=self.joined, accusations=self.accusations, messages=self.messages,
                      participants=self.n, min_survivors=self.min_survivors if self.n else 0)
        if aborted is not None:
            return SecureSumResult(None, [], self.dropped, self.excluded, True, str(aborted),
                                   failure=aborted.context.get("failure"), **common)
        survivors = sorted(self.node(i) for i in self.u3)
        ring = self.aggregate()
        decoded = decode_sum(ring, frac_bits=self.config.frac_bits, ring_bits=self.config.ring_bits)
        # A device can lie about its own vector only within the encoding range on its own
        # side; one that adds to its masked vector directly can move the sum anywhere. No
        # honest sum of m survivors leaves [-m C, m C]: refuse one that does.
        # (in ring units: each honest coordinate encodes to at most ceil(C 2^f))
        scale = float(1 << self.config.frac_bits)
        bound = len(survivors) * math.ceil(self.clip_range * scale) / scale
        over = np.abs(decoded) > bound
        if np.any(over):
            reason = (f"round refused after unmask: {int(np.count_nonzero(over))} coordinates of the decoded "
                      f"sum exceed survivors x clip range = {len(survivors)} x {self.clip_range:g} (largest "
                      f"|value| {float(np.max(np.abs(decoded))):.6g}): some device added to its masked "
                      f"vector outside the protocol; nothing was released")
            out = SecureSumResult(None, [], self.dropped, self.excluded, True, reason, failure="sum-out-of-bounds",
                                  **common)
            out.out_of_bounds = {"coordinates": float(np.count_nonzero(over)),
                                 "max_abs": float(np.max(np.abs(decoded))), "bound": float(bound)}
            return out
        d = self.vector_length
        extras = decode_extras(self.extras, decoded[d:], self.clip_range)
        metrics = {name: total / count for name, (total, count) in extras.items() if count > 0}
        return SecureSumResult(decoded[:d], survivors, self.dropped, self.excluded, False, None, metrics=metrics,
                               total_ring=ring[:d], extras=extras, **common)


def announced(announce: "Announce", node: int) -> RecordDict | None:
    """The records announced to ``node``: the same for all, or per node (a callable)."""
    return announce(node) if callable(announce) else announce


def _with(announce: RecordDict | None, rec: ConfigRecord) -> RecordDict:
    out = RecordDict({} if announce is None else dict(announce.items()))
    out[R.SERVER_RECORD] = rec
    return out


def _pk_matches(secret: bytes, public: bytes) -> bool:
    try:
        return public_from_private(secret) == public
    except ValueError:
        return False


def _inconsistent_holders(subset: list[tuple[int, bytes]], parts: list[tuple[int, bytes]]) -> list[int]:
    """Holders whose share is off the polynomial through the verified ``subset``."""
    chosen = {x for x, _ in subset}
    rest = [(x, sh) for x, sh in parts if x not in chosen]
    if not rest:
        return []
    xs = [x for x, _ in subset]
    vals = [shamir.parse_share(sh) for _, sh in subset]
    bad = []
    for x, sh in rest:
        coeffs = _lagrange_at(xs, x)
        expected = [sum(c * v[ch] for c, v in zip(coeffs, vals)) % shamir.PRIME for ch in range(3)]
        if expected != shamir.parse_share(sh):
            bad.append(x)
    return bad


def _lagrange_at(xs: list[int], x: int) -> list[int]:
    p = shamir.PRIME
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (x - xm) % p
                den = den * (xj - xm) % p
        out.append(num * pow(den, -1, p) % p)
    return out
