"""Transport-free state machines of Restwise SecAgg+ (Bell et al., CCS 2020).

``ClientSession`` functions act on one device's state (a ConfigRecord kept in memory in
``context.state``) and on the server's stage record; ``ServerRound`` holds the server's
view of one round. Neither knows about Flower's Grid: ``workflow.py`` and ``mod.py`` move
their RecordDicts, ``harness.py`` runs them in-process.

Round structure (U1 >= U2 >= U3 >= U4 are the clients still live after each stage):

1. setup: the server sends the parameters and each client's index; the client checks them
   (it refuses unsafe ones) and advertises two fresh X25519 public keys (c_pk, s_pk).  -> U1
2. share-keys: the server sends each client its live neighbours' public keys; the client
   draws a self-mask seed b, Shamir-shares b and its s secret key among its neighbours
   (threshold t), encrypts each neighbour's pair of shares with AES-GCM under a key agreed
   from c keys, and commits to b (SHA-256).                                              -> U2
3. collect-masked-input: the server forwards the encrypted shares and the train content;
   the client trains (the wrapped app), encodes the clipped update into Z_2^bits and sends
   y = x + PRG(b) + sum_j +-PRG(s_ij) over its live neighbours j.                       -> U3
4. unmask: each survivor returns its shares of b_j for surviving neighbours and of s_sk_j
   for neighbours that dropped after sharing, never both for the same j. The server
   reconstructs b (checked against the commitment) and s_sk (checked against s_pk),
   removes the masks, and releases the sum only if every reconstruction succeeded and at
   least ``min_survivors`` inputs are in it.                                             -> U4
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from . import records as R
from . import shamir
from .config import SecAggConfig
from .crypto import (
    agree,
    commitment,
    decrypt,
    encrypt,
    expand_mask,
    generate_keypair,
    private_key,
    public_from_private,
    share_aad,
    valid_public_key,
)
from .encoding import decode_sum, encode, ring_mask
from .errors import InputRefusedError, ProtocolViolationError, SecAggConfigError, SecAggError, ShareError
from .graph import harary_neighbours

_SHARE_KEY = b"share-enc"
_PAIR_MASK = b"pair-mask"
_HEADER = 8  # sender and receiver index, 4 bytes each, inside the encrypted plaintext
_MAX_CT_BYTES = _HEADER + 2 * shamir.SHARE_BYTES + 12 + 16


# ----------------------------------------------------------------------------- device


def refusal(stage: str, code: str) -> RecordDict:
    return RecordDict({R.REFUSED: ConfigRecord({"code": code, "stage": stage})})


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProtocolViolationError(f"{what} must be a list of integers")
    return list(value)


def _bytes_list(value: object, what: str) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise ProtocolViolationError(f"{what} must be a list of byte strings")
    return list(value)


class ClientSession:
    """One device's side of a round; all state lives in ``state`` (memory only)."""

    def __init__(self, state: ConfigRecord):
        self.state = state

    # -- stage 1
    def setup(self, msg: ConfigRecord) -> RecordDict:
        try:
            config = SecAggConfig(
                num_neighbours=int(msg["num_neighbours"]),
                threshold=msg["threshold"],
                max_dropout_fraction=float(msg["max_dropout_fraction"]),
                clip_range=float(msg["clip_range"]),
                frac_bits=int(msg["frac_bits"]),
                ring_bits=int(msg["ring_bits"]),
                max_cohort=int(msg["max_cohort"]),
                out_of_range=str(msg["out_of_range"]),
                metric_keys=tuple(msg.get("metric_keys", [])),
            )
            n, index, round_ = int(msg["n"]), int(msg["index"]), int(msg["round"])
            vector_length = int(msg["vector_length"])
        except KeyError as exc:
            raise ProtocolViolationError("the setup message lacks a parameter") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, SecAggConfigError):
                raise
            raise ProtocolViolationError("the setup message has a malformed parameter") from exc
        k, t, min_survivors = config.round_parameters(n)  # refuses unsafe parameters
        if not 1 <= index <= n or vector_length < 1:
            raise ProtocolViolationError("the setup message has an invalid index or length")
        previous = self.state.get("round")
        if previous is not None and int(previous) == round_ and self.state.get("stage") != "done":
            raise ProtocolViolationError("a second setup for a round in progress", round=round_)
        c_sk, c_pk = generate_keypair()
        s_sk, s_pk = generate_keypair()
        self.state.clear()
        self.state.update(
            {
                "stage": R.STAGE_SETUP, "round": round_, "index": index, "n": n, "k": k, "t": t,
                "min_survivors": min_survivors, "ring_bits": config.ring_bits,
                "frac_bits": config.frac_bits, "clip_range": float(config.clip_range),
                "clip": config.out_of_range == "clip", "metric_keys": list(config.metric_keys),
                "vector_length": vector_length, "c_sk": c_sk, "s_sk": s_sk,
            }
        )
        return RecordDict({R.PUBLIC_KEYS: ConfigRecord({"c_pk": c_pk, "s_pk": s_pk})})

    def _expect(self, msg: ConfigRecord, stage: str, previous: str) -> tuple[int, int]:
        if self.state.get("stage") != previous:
            raise ProtocolViolationError(f"stage {stage} out of order or repeated", stage=stage)
        if int(msg.get("round", -1)) != int(self.state["round"]):
            raise ProtocolViolationError("a message for another round", stage=stage)
        return int(self.state["round"]), int(self.state["index"])

    # -- stage 2
    def share_keys(self, msg: ConfigRecord) -> RecordDict:
        round_, me = self._expect(msg, R.STAGE_SHARE_KEYS, R.STAGE_SETUP)
        neighbours = _int_list(msg.get("neighbours"), "neighbours")
        c_pks = _bytes_list(msg.get("c_pk"), "c_pk")
        s_pks = _bytes_list(msg.get("s_pk"), "s_pk")
        n, k, t = int(self.state["n"]), int(self.state["k"]), int(self.state["t"])
        if not (len(neighbours) == len(c_pks) == len(s_pks)) or len(set(neighbours)) != len(neighbours):
            raise ProtocolViolationError("neighbour lists are inconsistent")
        if me in neighbours or any(not 1 <= j <= n for j in neighbours) or len(neighbours) > k:
            raise ProtocolViolationError("the neighbour list is invalid")
        if len(neighbours) < t:
            raise ProtocolViolationError("fewer live neighbours than the threshold")
        # the server validated every key at setup; a bad point still fails the agreement
        if any(len(p) != 32 for p in c_pks + s_pks):
            raise ProtocolViolationError("a neighbour public key is invalid")
        own = {public_from_private(bytes(self.state["c_sk"])), public_from_private(bytes(self.state["s_sk"]))}
        if own & set(c_pks + s_pks):
            raise ProtocolViolationError("a neighbour advertises this device's own key")
        b_seed = os.urandom(32)
        b_shares = shamir.split(b_seed, neighbours, t)
        sk_shares = shamir.split(bytes(self.state["s_sk"]), neighbours, t)
        c_sk = private_key(bytes(self.state["c_sk"]))
        cts, share_keys = [], []
        for j, c_pk, b_share, sk_share in zip(neighbours, c_pks, b_shares, sk_shares):
            key = agree(c_sk, c_pk, _SHARE_KEY, round_, me, j)
            share_keys.append(key)  # the same key decrypts j's share to us (symmetric)
            plaintext = me.to_bytes(4, "big") + j.to_bytes(4, "big") + b_share + sk_share
            cts.append(encrypt(key, plaintext, share_aad(round_, me, j)))
        self.state.update(
            {"stage": R.STAGE_SHARE_KEYS, "neighbours": neighbours, "nb_s_pk": s_pks,
             "nb_share_key": share_keys, "b_seed": b_seed}
        )
        del self.state["c_sk"]  # no longer needed: the pairwise share keys are derived
        return RecordDict(
            {R.SHARES: ConfigRecord({"dst": neighbours, "ct": cts, "b_commit": commitment(round_, me, b_seed)})}
        )

    # -- stage 3 (the update comes from the wrapped app; see mod.py)
    def check_collect(self, msg: ConfigRecord) -> None:
        """Validate the collect message before the (costly) local training."""
        self._expect(msg, R.STAGE_COLLECT, R.STAGE_SHARE_KEYS)
        src = _int_list(msg.get("src"), "src")
        cts = _bytes_list(msg.get("ct"), "ct")
        if len(src) != len(cts) or len(set(src)) != len(src):
            raise ProtocolViolationError("the forwarded shares are inconsistent")
        if not set(src) <= set(self.state["neighbours"]):
            raise ProtocolViolationError("a forwarded share is not from a neighbour")
        if len(src) < int(self.state["t"]):
            raise ProtocolViolationError("fewer live neighbours than the threshold")

    def collect(self, msg: ConfigRecord, update: np.ndarray, metrics: MetricRecord | None = None) -> RecordDict:
        self.check_collect(msg)
        round_, me = int(self.state["round"]), int(self.state["index"])
        src, cts = list(msg["src"]), list(msg["ct"])
        vector_length, ring_bits = int(self.state["vector_length"]), int(self.state["ring_bits"])
        update = np.asarray(update)
        if update.ndim != 1 or update.shape[0] != vector_length:
            raise InputRefusedError("the update has the wrong length", code="bad-length")
        encoded = encode(
            update, clip_range=float(self.state["clip_range"]), frac_bits=int(self.state["frac_bits"]),
            ring_bits=ring_bits, clip=bool(self.state["clip"]),
        )
        neighbours = list(self.state["neighbours"])
        share_key = dict(zip(neighbours, self.state["nb_share_key"]))
        s_pk = dict(zip(neighbours, self.state["nb_s_pk"]))
        s_sk = private_key(bytes(self.state["s_sk"]))
        held_owner, held_b, held_sk, bad = [], [], [], []
        for j, ct in zip(src, cts):
            try:
                plaintext = decrypt(share_key[j], ct, share_aad(round_, j, me))
                if len(plaintext) != _HEADER + 2 * shamir.SHARE_BYTES or plaintext[:4] != j.to_bytes(4, "big") or plaintext[4:8] != me.to_bytes(4, "big"):
                    raise ShareError("a decrypted share has the wrong layout")
                b_share = plaintext[_HEADER : _HEADER + shamir.SHARE_BYTES]
                sk_share = plaintext[_HEADER + shamir.SHARE_BYTES :]
                shamir.parse_share(b_share)
                shamir.parse_share(sk_share)
            except ShareError:
                bad.append(j)
                continue
            held_owner.append(j)
            held_b.append(b_share)
            held_sk.append(sk_share)
        masked = encoded.copy()
        masked += expand_mask(bytes(self.state["b_seed"]), vector_length, 64)
        for j in src:  # every live neighbour, also those whose share to us was bad
            seed = agree(s_sk, s_pk[j], _PAIR_MASK, round_, me, j)
            if me < j:
                masked += expand_mask(seed, vector_length, 64)
            else:
                masked -= expand_mask(seed, vector_length, 64)
        masked &= ring_mask(ring_bits)
        # The round's secrets are no longer needed here: the server recovers them from shares.
        for name in ("s_sk", "b_seed", "nb_share_key"):
            del self.state[name]
        self.state.update(
            {"stage": R.STAGE_COLLECT, "held_owner": held_owner, "held_b": held_b, "held_sk": held_sk}
        )
        reply = RecordDict(
            {
                R.MASKED_INPUT: ArrayRecord({R.MASKED_ARRAY: Array(masked)}),
                R.MASKED_STATUS: ConfigRecord({"bad_share_senders": bad}),
            }
        )
        keys = list(self.state["metric_keys"])
        if metrics is not None and keys:
            kept = {k: metrics[k] for k in keys if k in metrics and isinstance(metrics[k], (int, float))}
            if kept:
                reply[R.METRICS] = MetricRecord(kept)
        return reply

    # -- stage 4
    def unmask(self, msg: ConfigRecord) -> RecordDict:
        self._expect(msg, R.STAGE_UNMASK, R.STAGE_COLLECT)
        b_owners = _int_list(msg.get("b_owners"), "b_owners")
        sk_owners = _int_list(msg.get("sk_owners"), "sk_owners")
        n_survivors = int(msg.get("n_survivors", 0))
        if set(b_owners) & set(sk_owners) or len(set(b_owners)) != len(b_owners) or len(set(sk_owners)) != len(sk_owners):
            raise ProtocolViolationError("the server asked for both secrets of one client")
        if n_survivors < int(self.state["min_survivors"]):
            raise ProtocolViolationError("fewer survivors than the configured minimum")
        held = {o: (b, s) for o, b, s in zip(self.state["held_owner"], self.state["held_b"], self.state["held_sk"])}
        b_owner = [o for o in b_owners if o in held]
        sk_owner = [o for o in sk_owners if o in held]
        reply = ConfigRecord(
            {
                "b_owner": b_owner, "b_share": [held[o][0] for o in b_owner],
                "sk_owner": sk_owner, "sk_share": [held[o][1] for o in sk_owner],
            }
        )
        for name in ("held_owner", "held_b", "held_sk"):
            del self.state[name]
        self.state["stage"] = "done"
        return RecordDict({R.UNMASK_SHARES: reply})


# ----------------------------------------------------------------------------- server

Reply = RecordDict | Error


@dataclass
class SecureSumResult:
    """What one secure round released.

    total      decoded sum of the survivors' vectors (float64), None when aborted
    survivors  node ids whose input is in ``total``
    dropped    node id -> stage at which it stopped answering
    excluded   node id -> why its input was refused (malformed, duplicate, refused, ...)
    faults     node id -> a fault that did not remove its input (bad unmask shares)
    aborted    True when nothing was released; ``reason`` says why
    metrics    mean over survivors of the allow-listed metrics (config.metric_keys)
    total_ring the ring value of the sum (uint64), for exact checks; None when aborted
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


class RoundAborted(SecAggError):
    pass


class ServerRound:
    """The server's view of one round over client indices 1..n (node ids mapped)."""

    def __init__(self, config: SecAggConfig, node_ids: list[int], round_: int, vector_length: int):
        if len(set(node_ids)) != len(node_ids):
            raise SecAggConfigError("node ids must be distinct")
        if not isinstance(vector_length, int) or vector_length < 1:
            raise SecAggConfigError("vector_length must be a positive integer")
        self.config = config
        self.round = int(round_)
        self.vector_length = vector_length
        self.n = len(node_ids)
        self.k, self.t, self.min_survivors = config.round_parameters(self.n)
        self.node_of = {i + 1: int(node) for i, node in enumerate(node_ids)}
        self.index_of = {node: i for i, node in self.node_of.items()}
        self.graph = harary_neighbours(list(self.node_of), self.k)
        self.live: set[int] = set(self.node_of)
        self.dropped: dict[int, str] = {}
        self.excluded: dict[int, str] = {}
        self.faults: dict[int, str] = {}
        self.c_pk: dict[int, bytes] = {}
        self.s_pk: dict[int, bytes] = {}
        self.b_commit: dict[int, bytes] = {}
        self.cts: dict[int, dict[int, bytes]] = {}  # receiver -> sender -> ciphertext
        self.active: dict[int, list[int]] = {}
        self.held: dict[int, set[int]] = {}  # holder -> owners whose shares it holds
        self.u2: set[int] = set()
        self.u3: set[int] = set()
        self.masked: dict[int, np.ndarray] = {}
        self.metric_sums: dict[str, float] = {}
        self.metric_counts: dict[str, int] = {}

    # -- bookkeeping
    def _drop(self, i: int, stage: str) -> None:
        self.live.discard(i)
        self.dropped[self.node_of[i]] = stage

    def _exclude(self, i: int, reason: str) -> None:
        self.live.discard(i)
        self.excluded.setdefault(self.node_of[i], reason)

    def _sort_replies(self, stage: str, replies: dict[int, list[Reply]]) -> dict[int, RecordDict]:
        """One valid content per live index; drops, duplicates, errors and refusals out."""
        good: dict[int, RecordDict] = {}
        for i in sorted(self.live):
            got = replies.get(self.node_of[i], [])
            if not got:
                self._drop(i, stage)
            elif len(got) > 1:
                self._exclude(i, f"{stage}: duplicate replies")
            elif isinstance(got[0], Error):
                self._exclude(i, f"{stage}: the device reported an error")
            elif R.REFUSED in got[0].config_records:
                code = got[0].config_records[R.REFUSED].get("code", "unknown")
                self._exclude(i, f"{stage}: the device refused ({str(code)[:40]})")
            else:
                good[i] = got[0]
        return good

    def _require(self, count: int, stage: str) -> None:
        if count < self.min_survivors:
            raise RoundAborted(
                f"round aborted at {stage}: {count} of {self.n} clients remain, fewer than "
                f"the {self.min_survivors} needed (max_dropout_fraction "
                f"{self.config.max_dropout_fraction}); nothing was released"
            )

    def _base(self, stage: str) -> dict:
        return {"stage": stage, "round": self.round}

    # -- stage 1
    def setup_messages(self) -> dict[int, RecordDict]:
        c = self.config
        out = {}
        for i in sorted(self.live):
            rec = ConfigRecord(
                {
                    **self._base(R.STAGE_SETUP), "index": i, "n": self.n,
                    "num_neighbours": c.num_neighbours, "threshold": c.threshold,
                    "max_dropout_fraction": float(c.max_dropout_fraction),
                    "clip_range": float(c.clip_range), "frac_bits": c.frac_bits,
                    "ring_bits": c.ring_bits, "max_cohort": c.max_cohort,
                    "out_of_range": c.out_of_range, "metric_keys": list(c.metric_keys),
                    "vector_length": self.vector_length,
                }
            )
            out[self.node_of[i]] = RecordDict({R.SERVER_RECORD: rec})
        return out

    def receive_setup(self, replies: dict[int, list[Reply]]) -> None:
        for i, content in self._sort_replies(R.STAGE_SETUP, replies).items():
            rec = content.config_records.get(R.PUBLIC_KEYS)
            c_pk = rec.get("c_pk") if rec is not None else None
            s_pk = rec.get("s_pk") if rec is not None else None
            if not (valid_public_key(c_pk) and valid_public_key(s_pk)) or c_pk == s_pk:
                self._exclude(i, "setup: malformed public keys")
                continue
            self.c_pk[i], self.s_pk[i] = c_pk, s_pk
        seen: dict[bytes, int] = {}
        for i in sorted(self.live):  # a key advertised twice is a replay: refuse both
            for key in (self.c_pk[i], self.s_pk[i]):
                if key in seen and seen[key] != i:
                    self._exclude(i, "setup: public key reused by another client")
                    self._exclude(seen[key], "setup: public key reused by another client")
                seen[key] = i
        self._require(len(self.live), R.STAGE_SETUP)

    # -- stage 2
    def share_keys_messages(self) -> dict[int, RecordDict]:
        out = {}
        for i in sorted(self.live):
            nb = [j for j in self.graph[i] if j in self.live]
            rec = ConfigRecord(
                {
                    **self._base(R.STAGE_SHARE_KEYS), "neighbours": nb,
                    "c_pk": [self.c_pk[j] for j in nb], "s_pk": [self.s_pk[j] for j in nb],
                }
            )
            self.active[i] = nb
            out[self.node_of[i]] = RecordDict({R.SERVER_RECORD: rec})
        return out

    def receive_share_keys(self, replies: dict[int, list[Reply]]) -> None:
        for i, content in self._sort_replies(R.STAGE_SHARE_KEYS, replies).items():
            rec = content.config_records.get(R.SHARES)
            try:
                if rec is None:
                    raise ProtocolViolationError("no shares")
                dst = _int_list(rec.get("dst"), "dst")
                cts = _bytes_list(rec.get("ct"), "ct")
                commit = rec.get("b_commit")
                if dst != self.active[i] or len(cts) != len(dst):
                    raise ProtocolViolationError("shares for the wrong neighbours")
                if any(len(ct) > _MAX_CT_BYTES for ct in cts) or not isinstance(commit, bytes) or len(commit) != 32:
                    raise ProtocolViolationError("oversized shares or a malformed commitment")
            except ProtocolViolationError as exc:
                self._exclude(i, f"share-keys: {exc}")
                continue
            self.b_commit[i] = commit
            for j, ct in zip(dst, cts):
                self.cts.setdefault(j, {})[i] = ct
        self.u2 = set(self.live)
        self._require(len(self.u2), R.STAGE_SHARE_KEYS)

    # -- stage 3
    def collect_messages(self, train_content: RecordDict) -> dict[int, RecordDict]:
        out = {}
        for i in sorted(self.live):
            src = [j for j in self.active[i] if j in self.u2]
            self.active[i] = src
            rec = ConfigRecord(
                {**self._base(R.STAGE_COLLECT), "src": src, "ct": [self.cts[i][j] for j in src]}
            )
            content = RecordDict(dict(train_content.items()))
            content[R.SERVER_RECORD] = rec
            out[self.node_of[i]] = content
        self.cts.clear()
        return out

    def receive_collect(self, replies: dict[int, list[Reply]]) -> None:
        mask = ring_mask(self.config.ring_bits)
        reported: dict[int, int] = {}
        metrics_of: dict[int, MetricRecord | None] = {}
        good = self._sort_replies(R.STAGE_COLLECT, replies)
        for i, content in good.items():
            try:
                arrays = content.array_records.get(R.MASKED_INPUT)
                if arrays is None or R.MASKED_ARRAY not in arrays:
                    raise ProtocolViolationError("no masked input")
                y = arrays[R.MASKED_ARRAY].numpy()
                if y.dtype != np.uint64 or y.ndim != 1:
                    raise ProtocolViolationError("the masked input is not a uint64 vector")
                if y.shape[0] != self.vector_length:
                    raise ProtocolViolationError("the masked input has the wrong length")
                if self.config.ring_bits < 64 and np.any(y > mask):
                    raise ProtocolViolationError("the masked input has values outside the ring")
                status = content.config_records.get(R.MASKED_STATUS)
                bad = _int_list(status.get("bad_share_senders") if status is not None else None, "bad_share_senders")
                if not set(bad) <= set(self.active[i]):
                    raise ProtocolViolationError("a share report names a non-neighbour")
            except ProtocolViolationError as exc:
                self._exclude(i, f"collect-masked-input: {exc}")
                continue
            except Exception:  # undecodable array bytes etc.: never crash on a device's data
                self._exclude(i, "collect-masked-input: the masked input cannot be decoded")
                continue
            self.masked[i] = y
            self.held[i] = set(self.active[i]) - set(bad)
            for j in bad:
                reported.setdefault(j, i)
            metrics_of[i] = content.metric_records.get(R.METRICS)
        for j, reporter in reported.items():
            if j in self.live:  # a reported client that also dropped is simply dropped
                self._exclude(j, f"share-keys: its share to client {self.node_of[reporter]} was malformed or failed authentication")
        for j in list(self.masked):
            if j not in self.live:
                self.masked.pop(j)
        self.u3 = set(self.masked)
        for i in self.u3:  # only survivors' allow-listed metrics are averaged
            metrics = metrics_of.get(i)
            for key in self.config.metric_keys if metrics is not None else ():
                value = metrics.get(key)
                if isinstance(value, (int, float)) and np.isfinite(value):
                    self.metric_sums[key] = self.metric_sums.get(key, 0.0) + float(value)
                    self.metric_counts[key] = self.metric_counts.get(key, 0) + 1
        self._require(len(self.u3), R.STAGE_COLLECT)

    # -- stage 4
    def _needed_sk_owners(self) -> set[int]:
        """Clients that dropped after sharing and whose pairwise mask is in some
        survivor's input (only their mask keys are reconstructed)."""
        dropped_after_sharing = self.u2 - self.u3
        return {j for i in self.u3 for j in self.active[i] if j in dropped_after_sharing}

    def _check_reachable(self, dropped_after_sharing: set[int]) -> None:
        """Abort *before* any share is requested if some needed secret is held by fewer
        than t survivors: asking for shares of a round that cannot complete would only
        hand the server self-mask seeds for nothing."""
        holders: dict[int, int] = {}
        for l in self.u3:
            for j in self.held[l]:
                holders[j] = holders.get(j, 0) + 1
        for j in sorted(self.u3 | dropped_after_sharing):
            if holders.get(j, 0) < self.t:
                what = "self-mask seed" if j in self.u3 else "mask key"
                raise RoundAborted(
                    f"round aborted before unmask: the {what} of client {self.node_of[j]} is "
                    f"held by {holders.get(j, 0)} surviving neighbours, fewer than the {self.t} "
                    f"needed (too many dropouts in one neighbourhood); no shares were requested "
                    f"and nothing was released"
                )

    def unmask_messages(self) -> dict[int, RecordDict]:
        out = {}
        dropped_after_sharing = self._needed_sk_owners()
        self._check_reachable(dropped_after_sharing)
        for i in sorted(self.u3):
            held = self.held[i]
            rec = ConfigRecord(
                {
                    **self._base(R.STAGE_UNMASK),
                    "b_owners": sorted(j for j in held if j in self.u3),
                    "sk_owners": sorted(j for j in held if j in dropped_after_sharing),
                    "n_survivors": len(self.u3),
                }
            )
            out[self.node_of[i]] = RecordDict({R.SERVER_RECORD: rec})
        return out

    def receive_unmask(self, replies: dict[int, list[Reply]]) -> None:
        """Reconstruct the secrets; raises RoundAborted if any is out of reach."""
        dropped_after_sharing = self._needed_sk_owners()
        b_parts: dict[int, list[tuple[int, bytes]]] = {j: [] for j in self.u3}
        sk_parts: dict[int, list[tuple[int, bytes]]] = {j: [] for j in dropped_after_sharing}
        for i in sorted(self.u3):
            node = self.node_of[i]
            got = replies.get(node, [])
            if len(got) != 1 or isinstance(got[0], Error):
                if not got:
                    self.dropped[node] = R.STAGE_UNMASK  # its input is still in the sum
                else:
                    self.faults[node] = "unmask: duplicate or error reply; its shares were not used"
                continue
            rec = got[0].config_records.get(R.UNMASK_SHARES)
            try:
                if rec is None:
                    raise ProtocolViolationError("no shares")
                b_owner = _int_list(rec.get("b_owner"), "b_owner")
                sk_owner = _int_list(rec.get("sk_owner"), "sk_owner")
                b_share = _bytes_list(rec.get("b_share"), "b_share")
                sk_share = _bytes_list(rec.get("sk_share"), "sk_share")
                if len(b_owner) != len(b_share) or len(sk_owner) != len(sk_share):
                    raise ProtocolViolationError("owner and share lists differ in length")
                if not set(b_owner) <= self.held[i] & self.u3 or not set(sk_owner) <= self.held[i] & dropped_after_sharing:
                    raise ProtocolViolationError("shares for owners that were not asked for")
                if len(set(b_owner)) != len(b_owner) or len(set(sk_owner)) != len(sk_owner):
                    raise ProtocolViolationError("duplicate shares")
                for s in b_share + sk_share:
                    shamir.parse_share(s)
            except (ProtocolViolationError, ShareError) as exc:
                self.faults[node] = f"unmask: {exc}; its shares were not used"
                continue
            for j, s in zip(b_owner, b_share):
                b_parts[j].append((i, s))
            for j, s in zip(sk_owner, sk_share):
                sk_parts[j].append((i, s))
        self.b_seed: dict[int, bytes] = {}
        self.sk: dict[int, bytes] = {}
        for j, parts in b_parts.items():
            self.b_seed[j] = self._reconstruct(j, parts, lambda s, j=j: commitment(self.round, j, s) == self.b_commit[j], "self-mask seed")
        for j, parts in sk_parts.items():
            self.sk[j] = self._reconstruct(j, parts, lambda s, j=j: _pk_matches(s, self.s_pk[j]), "mask key")

    def _reconstruct(self, owner: int, parts: list[tuple[int, bytes]], verify, what: str) -> bytes:
        t = self.t
        if len(parts) < t:
            raise RoundAborted(
                f"round aborted at unmask: the {what} of client {self.node_of[owner]} has "
                f"{len(parts)} of the {t} shares needed; nothing was released"
            )
        rng = random.Random(owner)  # which subsets to try is not secret

        def candidates():
            yield parts[:t]
            for _ in range(48 if len(parts) > t else 0):
                yield rng.sample(parts, t)

        for attempt, subset in enumerate(candidates()):
            try:
                secret = shamir.reconstruct([x for x, _ in subset], [s for _, s in subset])
            except ShareError:
                continue
            if verify(secret):
                # the first t shares almost always verify; only after a failure is it
                # worth finding which holders returned wrong shares
                bad = _inconsistent_holders(subset, parts) if attempt else []
                for holder in bad:
                    self.faults.setdefault(self.node_of[holder], "unmask: returned a wrong share")
                return secret
        raise RoundAborted(
            f"round aborted at unmask: the shares of client {self.node_of[owner]}'s {what} "
            f"do not reconstruct it (tampered shares); nothing was released"
        )

    def aggregate(self) -> np.ndarray:
        """The unmasked ring sum of the survivors' inputs (uint64)."""
        d, bits = self.vector_length, self.config.ring_bits
        total = np.zeros(d, dtype=np.uint64)
        for i in sorted(self.u3):
            total += self.masked[i]
            total -= expand_mask(self.b_seed[i], d, 64)
        for j, sk in self.sk.items():  # pairwise masks of survivors with clients that dropped
            for i in sorted(self.u3):
                if j in self.active[i]:
                    seed = agree(sk, self.s_pk[i], _PAIR_MASK, self.round, i, j)
                    if i < j:
                        total -= expand_mask(seed, d, 64)
                    else:
                        total += expand_mask(seed, d, 64)
        total &= ring_mask(bits)
        return total

    def result(self, aborted_reason: str | None = None) -> SecureSumResult:
        survivors = sorted(self.node_of[i] for i in self.u3)
        metrics = {k: self.metric_sums[k] / self.metric_counts[k] for k in self.metric_sums}
        if aborted_reason is not None:
            return SecureSumResult(None, [], self.dropped, self.excluded, True, aborted_reason,
                                   faults=self.faults, round=self.round, num_sampled=self.n)
        ring_total = self.aggregate()
        total = decode_sum(ring_total, frac_bits=self.config.frac_bits, ring_bits=self.config.ring_bits)
        return SecureSumResult(total, survivors, self.dropped, self.excluded, False, None,
                               faults=self.faults, metrics=metrics, total_ring=ring_total,
                               round=self.round, num_sampled=self.n)


def _pk_matches(secret: bytes, public: bytes) -> bool:
    try:
        return public_from_private(secret) == public
    except ValueError:
        return False


def _inconsistent_holders(subset: list[tuple[int, bytes]], parts: list[tuple[int, bytes]]) -> list[int]:
    """Holders whose share is off the polynomial through the verified ``subset``."""
    chosen = {x for x, _ in subset}
    rest = [(x, s) for x, s in parts if x not in chosen]
    if not rest:
        return []
    xs = [x for x, _ in subset]
    vals = [shamir.parse_share(s) for _, s in subset]
    bad = []
    for x, s in rest:
        coeffs = _lagrange_at(xs, x)
        expected = [sum(c * v[ch] for c, v in zip(coeffs, vals)) % shamir.PRIME for ch in range(3)]
        if expected != shamir.parse_share(s):
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
