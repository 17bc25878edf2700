"""The device's side of Restwise secure aggregation, as a transport-free state machine.

``DeviceSession`` acts on one device's state - a ConfigRecord the mod keeps in
``context.state`` (Flower's SuperNode holds it in memory; it is never logged, sent or
written to disk) - and on the server's stage record. Every method validates the whole
message first and changes the state only once nothing can fail, so a refused message
(replayed, out of order, for another round or session, malformed) leaves the device as it
was; it raises a ``SecAggError`` subclass and the mod replies with a refusal code.

What the state holds between messages (docs/secure-aggregation.md says why):

    the epoch      session id, epoch number, this device's index, the epoch's parameters,
                   its neighbours in the epoch's graph
    share channel  the epoch's ``c`` key pair and the AES key agreed with each neighbour
                   (one X25519 agreement per neighbour and epoch, cached)
    next round     the mask key pair ``s`` and self-mask seed ``b`` of the one round the
                   device has already dealt shares for (``mat_round``); each is used in
                   exactly that round and deleted when its masked input is sent
    this round     between its masked input and the unmask message: the shares it holds of
                   its neighbours' ``b`` and ``s_sk`` for that round; deleted once answered

Rounds only move forward: a device answers one first message (join or collect) per round
number, in increasing order, and an unmask only for the round whose masked input it sent.
"""

from __future__ import annotations

import math
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

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
    key_info,
    private_key,
    share_aad,
)
from .encoding import encode, ring_mask
from .errors import InputRefusedError, ProtocolViolationError, ShareError
from .fields import (
    PAIR_MASK_PURPOSE,
    SESSION_CHARS,
    SHARE_KEY_PURPOSE,
    Extra,
    bytes_list,
    config_from_fields,
    distinct,
    extra_slots,
    float_list,
    int_list,
    int_value,
    share_plaintext,
    split_plaintext,
)

# What a device forgets when it stops taking part in a round (material) or answers an unmask.
MATERIAL_KEYS = ("mat_round", "mat_s_sk", "mat_s_pk", "mat_b")
HELD_KEYS = ("cur_round", "held", "cur_min_survivors", "last")
SECRET_KEYS = ("c_sk", "share_keys", "mat_s_sk", "mat_b", "held")
# Packed layouts (one bytes value each: Flower validates a ConfigRecord list element by
# element, and copies the state with every message).
_CACHE_ENTRY = 4 + 32 + 32  # peer index, its share-encryption public key, the agreed AES key
_HELD_ENTRY = 4 + 2 * shamir.SHARE_BYTES  # owner index, share of its b, share of its s_sk


def _pack_cache(cache: dict[int, tuple[bytes, bytes]]) -> bytes:
    return b"".join(p.to_bytes(4, "big") + pub + key for p, (pub, key) in sorted(cache.items()))


def _unpack_cache(blob: bytes) -> dict[int, tuple[bytes, bytes]]:
    out = {}
    for at in range(0, len(blob), _CACHE_ENTRY):
        entry = blob[at:at + _CACHE_ENTRY]
        out[int.from_bytes(entry[:4], "big")] = (entry[4:36], entry[36:68])
    return out


def _pack_held(held: dict[int, tuple[bytes, bytes]]) -> bytes:
    return b"".join(o.to_bytes(4, "big") + b + sk for o, (b, sk) in sorted(held.items()))


def _unpack_held(blob: bytes) -> dict[int, tuple[bytes, bytes]]:
    out, n = {}, shamir.SHARE_BYTES
    for at in range(0, len(blob), _HELD_ENTRY):
        entry = blob[at:at + _HELD_ENTRY]
        out[int.from_bytes(entry[:4], "big")] = (entry[4:4 + n], entry[4 + n:4 + 2 * n])
    return out


def refusal(stage: str, code: str) -> RecordDict:
    return RecordDict({R.REFUSED: ConfigRecord({"code": code, "stage": stage})})


def declined() -> RecordDict:
    """'Not taking part': the same reply whatever the reason (no consent, no data, budget)."""
    return RecordDict({R.DECLINED: ConfigRecord({})})


def _ids(msg: ConfigRecord) -> tuple[str, int, int]:
    session = msg.get("session")
    if not isinstance(session, str) or len(session) != SESSION_CHARS:
        raise ProtocolViolationError("the message names no valid session")
    return session, int_value(msg.get("epoch"), "epoch"), int_value(msg.get("round"), "round")


class CollectRequest:
    """A validated collect-masked-input message (checked before the costly local training)."""

    def __init__(self, round_: int, n: int, min_survivors: int, clip_range: float, vector_length: int,
                 extras: tuple[Extra, ...], src: list[int], src_c_pk: list[bytes], s_pk: list[bytes], ct: list[bytes],
                 deal_to: list[int], deal_c_pk: list[bytes], last: bool):
        self.round, self.n, self.min_survivors, self.last = round_, n, min_survivors, last
        self.clip_range, self.vector_length, self.extras = clip_range, vector_length, extras
        self.src, self.src_c_pk, self.s_pk, self.ct = src, src_c_pk, s_pk, ct
        self.deal_to, self.deal_c_pk = deal_to, deal_c_pk


class DeviceSession:
    """One device's side of a session; all state lives in ``state`` (memory only)."""

    def __init__(self, state: ConfigRecord):
        self.state = state

    # -- reading the state ------------------------------------------------------------------
    @property
    def index(self) -> int:
        return int(self.state["index"])

    def _round_of(self, msg: ConfigRecord, stage: str) -> int:
        """The message's round, after checking it is for this device's session and epoch."""
        session, epoch, round_ = _ids(msg)
        if self.state.get("session") != session or self.state.get("epoch") != epoch:
            raise ProtocolViolationError(f"a {stage} message for another session or epoch", stage=stage)
        return round_

    def config(self) -> SecAggConfig:
        """The epoch's parameters as the device accepted them."""
        threshold = self.state["threshold"]
        return SecAggConfig(
            num_neighbours=int(self.state["num_neighbours"]),
            threshold=int(threshold) if isinstance(threshold, int) else float(threshold),
            max_dropout_fraction=float(self.state["delta"]), frac_bits=int(self.state["frac_bits"]),
            ring_bits=int(self.state["ring_bits"]), max_cohort=int(self.state["max_cohort"]),
            out_of_range=str(self.state["out_of_range"]),
        )

    # -- the share channel ------------------------------------------------------------------
    def _cache(self) -> dict[int, tuple[bytes, bytes]]:
        """peer -> (its share-encryption public key, the AES key agreed with it)."""
        return _unpack_cache(bytes(self.state.get("share_keys", b"")))

    @staticmethod
    def _share_keys(peers: list[int], publics: list[bytes], cache: dict[int, tuple[bytes, bytes]], c_sk: bytes,
                    own_c_pk: bytes, session: str, epoch: int, me: int) -> tuple[list[bytes], dict[int, tuple[bytes, bytes]]]:
        """AES keys shared with each peer, and the cache with any new agreement added (one
        X25519 agreement per peer key and epoch)."""
        cache = dict(cache)
        parsed = None
        keys = []
        for peer, pub in zip(peers, publics):
            if len(pub) != 32 or pub == own_c_pk:
                raise ProtocolViolationError("a neighbour's share-encryption key is invalid or this device's own")
            hit = cache.get(peer)
            if hit is None or hit[0] != pub:
                parsed = parsed or private_key(c_sk)
                hit = (pub, agree(parsed, pub, key_info(SHARE_KEY_PURPOSE, session, epoch, 0, me, peer)))
                cache[peer] = hit
            keys.append(hit[1])
        return keys, cache

    @staticmethod
    def _cache_fields(cache: dict[int, tuple[bytes, bytes]]) -> dict:
        return {"share_keys": _pack_cache(cache)}

    def _deal(self, for_round: int, peers: list[int], publics: list[bytes], t: int, *, cache: dict, c_sk: bytes,
              own_c_pk: bytes, session: str, epoch: int, me: int,
              s_key: tuple[bytes, bytes] | None = None) -> tuple[dict, dict]:
        """A mask key pair (fresh unless ``s_key``) and a fresh self-mask seed for
        ``for_round``, Shamir-shared among ``peers`` (threshold t) and encrypted to each:
        (the state to store, the SHARES record fields)."""
        if len(peers) < t:
            raise ProtocolViolationError("fewer neighbours to deal shares to than the threshold")
        keys, cache = self._share_keys(peers, publics, cache, c_sk, own_c_pk, session, epoch, me)
        s_sk, s_pk = s_key or generate_keypair()
        b_seed = os.urandom(32)
        b_shares = shamir.split(b_seed, peers, t)
        sk_shares = shamir.split(s_sk, peers, t)
        cts = [
            encrypt(key, share_plaintext(me, j, bs, ss), share_aad(session, epoch, for_round, me, j))
            for j, key, bs, ss in zip(peers, keys, b_shares, sk_shares)
        ]
        state = {"mat_round": for_round, "mat_s_sk": s_sk, "mat_s_pk": s_pk, "mat_b": b_seed,
                 **self._cache_fields(cache)}
        shares = {"dst": list(peers), "ct": cts, "b_commit": commitment(session, for_round, me, b_seed)}
        return state, shares

    def _forget(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            if key in self.state:
                del self.state[key]

    # -- setup round ------------------------------------------------------------------------
    def setup(self, msg: ConfigRecord) -> RecordDict:
        """Stage 1 of a setup round: a new epoch. Advertise the epoch's share-encryption key
        and this round's mask key."""
        session, epoch, round_ = _ids(msg)
        config = config_from_fields(msg)
        n = int_value(msg.get("n"), "n")
        index = int_value(msg.get("index"), "index")
        config.round_parameters(n)  # refuses unsafe parameters for this cohort
        if not 1 <= index <= n:
            raise ProtocolViolationError("the setup message has an invalid index")
        if self.state.get("session") == session:
            if epoch <= int(self.state["epoch"]):
                raise ProtocolViolationError("a setup for an epoch this device already knows", stage=R.STAGE_SETUP)
            if round_ <= int(self.state.get("answered_round", 0)):
                raise ProtocolViolationError("a setup for a round already answered", stage=R.STAGE_SETUP)
        c_sk, c_pk = generate_keypair()
        s_sk, s_pk = generate_keypair()
        self.state.clear()
        self.state.update({
            "session": session, "epoch": epoch, "index": index, "n_index": n,
            "num_neighbours": config.num_neighbours, "threshold": config.threshold,
            "delta": float(config.max_dropout_fraction), "ring_bits": config.ring_bits, "frac_bits": config.frac_bits,
            "max_cohort": config.max_cohort, "out_of_range": config.out_of_range,
            "c_sk": c_sk, "c_pk": c_pk, "phase": "advertised", "answered_round": round_ - 1,
            "mat_round": round_, "mat_s_sk": s_sk, "mat_s_pk": s_pk,
        })
        return RecordDict({R.PUBLIC_KEYS: ConfigRecord({"c_pk": c_pk, "s_pk": s_pk})})

    def _epoch_graph(self, msg: ConfigRecord, config: SecAggConfig, n_index: int, me: int) -> tuple[int, int, int, list[int], list[bytes]]:
        """(members n, k, t, neighbours, their c_pk) of a share-keys or join message."""
        n = int_value(msg.get("n"), "n")
        if not 3 <= n <= n_index:
            raise ProtocolViolationError("the epoch's member count is invalid")
        k, t, _ = config.round_parameters(n)
        neighbours = distinct(int_list(msg.get("neighbours"), "neighbours"), "neighbours")
        c_pks = bytes_list(msg.get("c_pk"), "c_pk")
        if len(neighbours) != len(c_pks):
            raise ProtocolViolationError("neighbour lists are inconsistent")
        if me in neighbours or any(not 1 <= j <= n_index for j in neighbours) or len(neighbours) > k:
            raise ProtocolViolationError("the neighbour list is invalid")
        if len(neighbours) < t:
            raise ProtocolViolationError("fewer neighbours than the threshold")
        return n, k, t, neighbours, c_pks

    def share_keys(self, msg: ConfigRecord) -> RecordDict:
        """Stage 2 of a setup round: deal this round's shares (of b and s_sk) to the
        neighbours."""
        round_ = self._round_of(msg, R.STAGE_SHARE_KEYS)
        if self.state.get("phase") != "advertised" or int(self.state["mat_round"]) != round_:
            raise ProtocolViolationError("share-keys out of order or repeated", stage=R.STAGE_SHARE_KEYS)
        me = self.index
        n, k, t, neighbours, c_pks = self._epoch_graph(msg, self.config(), int(self.state["n_index"]), me)
        state, shares = self._deal(
            round_, neighbours, c_pks, t, cache=self._cache(), c_sk=bytes(self.state["c_sk"]),
            own_c_pk=bytes(self.state["c_pk"]),
            session=str(self.state["session"]), epoch=int(self.state["epoch"]), me=me,
            s_key=(bytes(self.state["mat_s_sk"]), bytes(self.state["mat_s_pk"])),
        )
        self.state.update({**state, "n": n, "k": k, "t": t, "graph": neighbours, "phase": "ready"})
        return RecordDict({R.SHARES: ConfigRecord(shares)})

    # -- join: deal the next round's material, take part from then on -------------------------
    def join(self, msg: ConfigRecord) -> RecordDict:
        """A device that is not ready for this round (new key needed: it dropped out, its
        key was revealed, it declined, or it lost its state) deals shares of a fresh mask key
        and self-mask seed for the next round. It keeps the epoch's share-encryption key
        when it still has it (same session, epoch and index), else it draws a new one."""
        session, epoch, round_ = _ids(msg)
        config = config_from_fields(msg)
        n_index = int_value(msg.get("n_index"), "n_index")
        index = int_value(msg.get("index"), "index")
        config.round_parameters(n_index)
        if not 1 <= index <= n_index:
            raise ProtocolViolationError("the join message has an invalid index")
        same_epoch = (self.state.get("session") == session and self.state.get("epoch") == epoch
                      and self.state.get("index") == index and "c_sk" in self.state)
        if self.state.get("session") == session:
            if epoch < int(self.state["epoch"]) or round_ <= int(self.state.get("answered_round", 0)):
                raise ProtocolViolationError("a join for an earlier round or epoch", stage=R.STAGE_JOIN)
        n, k, t, neighbours, c_pks = self._epoch_graph(msg, config, n_index, index)
        if same_epoch:
            c_sk, c_pk, cache = bytes(self.state["c_sk"]), bytes(self.state["c_pk"]), self._cache()
        else:
            (c_sk, c_pk), cache = generate_keypair(), {}
        state, shares = self._deal(round_ + 1, neighbours, c_pks, t, cache=cache, c_sk=c_sk, own_c_pk=c_pk,
                                   session=session, epoch=epoch, me=index)
        self.state.clear()
        self.state.update({
            "session": session, "epoch": epoch, "index": index, "n_index": n_index, "n": n, "k": k, "t": t,
            "num_neighbours": config.num_neighbours, "threshold": config.threshold,
            "delta": float(config.max_dropout_fraction), "ring_bits": config.ring_bits, "frac_bits": config.frac_bits,
            "max_cohort": config.max_cohort, "out_of_range": config.out_of_range,
            "c_sk": c_sk, "c_pk": c_pk, "graph": neighbours, "phase": "ready", "answered_round": round_, **state,
        })
        return RecordDict({
            R.PUBLIC_KEYS: ConfigRecord({"c_pk": c_pk, "s_pk": state["mat_s_pk"]}),
            R.SHARES: ConfigRecord(shares),
        })

    # -- collect-masked-input ---------------------------------------------------------------
    def check_collect(self, msg: ConfigRecord) -> CollectRequest:
        """Validate the collect message before the (costly) local training."""
        round_ = self._round_of(msg, R.STAGE_COLLECT)
        if self.state.get("phase") not in ("ready", "collected") or "mat_round" not in self.state:
            raise ProtocolViolationError("collect without this round's shares dealt", stage=R.STAGE_COLLECT)
        if int(self.state["mat_round"]) != round_ or round_ <= int(self.state.get("answered_round", 0)):
            raise ProtocolViolationError("collect for another round, or repeated", stage=R.STAGE_COLLECT)
        config = self.config()
        n = int_value(msg.get("n"), "n")
        min_survivors = int_value(msg.get("min_survivors"), "min_survivors")
        if not 3 <= n <= config.max_cohort or min_survivors != n - math.floor(config.max_dropout_fraction * n):
            raise ProtocolViolationError("the round's cohort size or minimum of survivors is invalid")
        clip_range = msg.get("clip_range")
        if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)):
            raise ProtocolViolationError("clip_range must be a number")
        config.check_encoding(float(clip_range))  # the sum of max_cohort inputs never wraps
        vector_length = int_value(msg.get("vector_length"), "vector_length")
        if vector_length < 1:
            raise ProtocolViolationError("vector_length must be positive")
        names = msg.get("extras", [])
        if not isinstance(names, list) or not all(isinstance(x, str) and x for x in names) or len(set(names)) != len(names):
            raise ProtocolViolationError("extras must be distinct names")
        lo, hi = float_list(msg.get("extras_lo", []), "extras_lo"), float_list(msg.get("extras_hi", []), "extras_hi")
        if not len(names) == len(lo) == len(hi) or any(a >= b for a, b in zip(lo, hi)):
            raise ProtocolViolationError("every extra needs a range lo < hi")
        extras = tuple(Extra(x, a, b) for x, a, b in zip(names, lo, hi))
        graph = set(self.state["graph"])
        src = distinct(int_list(msg.get("src"), "src"), "src")
        src_c_pk = bytes_list(msg.get("src_c_pk"), "src_c_pk")
        s_pk = bytes_list(msg.get("s_pk"), "s_pk")
        ct = bytes_list(msg.get("ct"), "ct")
        if not len(src) == len(src_c_pk) == len(s_pk) == len(ct) or not set(src) <= graph:
            raise ProtocolViolationError("the forwarded shares are inconsistent or not from neighbours")
        if len(src) < int(self.state["t"]):
            raise ProtocolViolationError("fewer live neighbours than the threshold")
        if any(len(pk) != 32 for pk in s_pk) or bytes(self.state["mat_s_pk"]) in s_pk:
            raise ProtocolViolationError("a neighbour's mask key is invalid or this device's own")
        deal_to = distinct(int_list(msg.get("neighbours"), "neighbours"), "neighbours")
        deal_c_pk = bytes_list(msg.get("c_pk"), "c_pk")
        last = msg.get("last", False)
        if not isinstance(last, bool):
            raise ProtocolViolationError("last must be a boolean")
        if not set(deal_to) <= graph or len(deal_to) != len(deal_c_pk):
            raise ProtocolViolationError("the neighbours to deal to are inconsistent")
        return CollectRequest(round_, n, min_survivors, float(clip_range), vector_length, extras, src, src_c_pk, s_pk,
                              ct, deal_to, deal_c_pk, last)

    def collect(self, request: CollectRequest, update: np.ndarray, metrics: dict[str, float] | None = None) -> RecordDict:
        """Mask the (clipped, noised) update and the extras with this round's pairwise masks
        and self-mask, report neighbours whose shares failed, and deal the next round's
        shares. ``update`` comes from the wrapped app; it is refused (InputRefusedError)
        before anything is masked if it has NaN/inf, values outside the range, or the wrong
        length."""
        me, session, epoch = self.index, str(self.state["session"]), int(self.state["epoch"])
        round_, t = request.round, int(self.state["t"])
        update = np.asarray(update)
        if update.ndim != 1 or update.shape[0] != request.vector_length:
            raise InputRefusedError("the update has the wrong length", code="bad-length")
        vector = np.concatenate([np.asarray(update, dtype=np.float64),
                                 extra_slots(request.extras, dict(metrics or {}), request.clip_range)])
        ring_bits, frac_bits = int(self.state["ring_bits"]), int(self.state["frac_bits"])
        encoded = encode(vector, clip_range=request.clip_range, frac_bits=frac_bits, ring_bits=ring_bits,
                         clip=self.state["out_of_range"] == "clip")
        c_sk, own_c_pk = bytes(self.state["c_sk"]), bytes(self.state["c_pk"])
        keys, cache = self._share_keys(request.src, request.src_c_pk, self._cache(), c_sk, own_c_pk, session, epoch, me)
        held: dict[int, tuple[bytes, bytes]] = {}
        bad = []
        for j, key, ct in zip(request.src, keys, request.ct):
            try:
                held[j] = split_plaintext(decrypt(key, ct, share_aad(session, epoch, round_, j, me)), j, me)
            except ShareError:
                bad.append(j)
        d = vector.shape[0]
        masked = encoded.copy()
        masked += expand_mask(bytes(self.state["mat_b"]), d, 64)
        s_sk = private_key(bytes(self.state["mat_s_sk"]))
        for j, pk in zip(request.src, request.s_pk):  # every live neighbour, also those whose share was bad
            seed = agree(s_sk, pk, key_info(PAIR_MASK_PURPOSE, session, epoch, round_, me, j))
            if me < j:
                masked += expand_mask(seed, d, 64)
            else:
                masked -= expand_mask(seed, d, 64)
        masked &= ring_mask(ring_bits)
        reply = RecordDict({
            R.MASKED_INPUT: ArrayRecord({R.MASKED_ARRAY: Array(masked)}),
            R.MASKED_STATUS: ConfigRecord({"bad_share_senders": bad}),
        })
        # The next round's material, dealt to every epoch neighbour whose key the server sent
        # (fewer than t: none; the server then asks this device to join before it takes part).
        state: dict = self._cache_fields(cache)
        forget: tuple[str, ...] = MATERIAL_KEYS
        if not request.last and len(request.deal_to) >= t:
            state, shares = self._deal(round_ + 1, request.deal_to, request.deal_c_pk, t, cache=cache, c_sk=c_sk,
                                       own_c_pk=own_c_pk, session=session, epoch=epoch, me=me)
            forget = ()
            reply[R.PUBLIC_KEYS] = ConfigRecord({"s_pk": state["mat_s_pk"]})
            reply[R.SHARES] = ConfigRecord(shares)
        # This round's key and seed are never used again: the server recovers what it needs
        # from the neighbours' shares.
        self._forget(HELD_KEYS + forget)
        self.state.update({
            **state, "phase": "collected", "answered_round": round_, "cur_round": round_,
            "cur_min_survivors": request.min_survivors, "held": _pack_held(held), "last": request.last,
        })
        return reply

    def start_collect(self, request: CollectRequest) -> None:
        """Before the wrapped app runs: the round's minimum of survivors is what the DP mod
        sizes its noise share against (``min_survivors``); shares held from an earlier round
        are forgotten (that round's unmask will not come to this device any more)."""
        if self.state.get("phase") == "collected" and int(self.state.get("cur_round", -1)) < request.round:
            self._forget(HELD_KEYS)
            self.state["phase"] = "ready"
        self.state["min_survivors"] = request.min_survivors

    def decided(self, msg: ConfigRecord) -> bool:
        """Whether this device already decided to take part in the message's round (the
        collect of a setup round follows the setup, where it decided)."""
        try:
            session, epoch, round_ = _ids(msg)
        except ProtocolViolationError:
            return False
        return (self.state.get("session"), self.state.get("epoch"), self.state.get("decided_round")) == (
            session, epoch, round_)

    def mark_decided(self, msg: ConfigRecord) -> None:
        if "session" in self.state:
            self.state["decided_round"] = int(msg.get("round", -1))

    def decline_round(self) -> None:
        """The device does not take part in the round it was asked into: its material for it
        is dropped (a later join deals fresh material); the epoch's share channel stays."""
        self._forget(MATERIAL_KEYS + HELD_KEYS)
        if "phase" in self.state:
            self.state["phase"] = "idle"

    # -- unmask -----------------------------------------------------------------------------
    def unmask(self, msg: ConfigRecord) -> RecordDict:
        round_ = self._round_of(msg, R.STAGE_UNMASK)
        if self.state.get("phase") != "collected" or int(self.state.get("cur_round", -1)) != round_:
            raise ProtocolViolationError("unmask out of order, repeated or for another round", stage=R.STAGE_UNMASK)
        b_owners = distinct(int_list(msg.get("b_owners"), "b_owners"), "b_owners")
        sk_owners = distinct(int_list(msg.get("sk_owners"), "sk_owners"), "sk_owners")
        n_survivors = int_value(msg.get("n_survivors"), "n_survivors")
        if set(b_owners) & set(sk_owners):
            raise ProtocolViolationError("the server asked for both secrets of one client")
        if n_survivors < int(self.state["cur_min_survivors"]):
            raise ProtocolViolationError("fewer survivors than the configured minimum")
        held = _unpack_held(bytes(self.state["held"]))
        b_owner = [o for o in b_owners if o in held]
        sk_owner = [o for o in sk_owners if o in held]
        reply = ConfigRecord({
            "b_owner": b_owner, "b_share": [held[o][0] for o in b_owner],
            "sk_owner": sk_owner, "sk_share": [held[o][1] for o in sk_owner],
        })
        if self.state.get("last"):
            self.state.clear()  # the session's last round: nothing of it is needed any more
        else:
            self._forget(HELD_KEYS)
            self.state["phase"] = "ready" if "mat_round" in self.state else "idle"
        return RecordDict({R.UNMASK_SHARES: reply})

    # -- the end of a run -------------------------------------------------------------------
    def finish(self, msg: ConfigRecord) -> RecordDict:
        """The run is over: acknowledge, and forget every secret of the session (a device
        that already forgot it, after the last round's unmask, acknowledges too)."""
        session, _, _ = _ids(msg)
        if self.state.get("session") not in (None, session):
            raise ProtocolViolationError("a finish message for another session", stage=R.STAGE_FINISH)
        self.state.clear()
        return RecordDict({R.ACK: ConfigRecord({})})
