"""Every message and record name of Restwise secure aggregation, in one place.

The device's egress guard, the server workflow and the auditor's information-leakage
section import this module: anything a device sends during secure aggregation is listed in
``CLIENT_REPLY_RECORDS``.

All stages travel as Flower messages of type ``"train"`` (``MESSAGE_TYPE``): a decorator
``ClientApp`` routes by message type *before* mods run, so the stage is named inside the
content instead, in ConfigRecord ``SERVER_RECORD`` field ``"stage"``. A train message
without ``SERVER_RECORD`` is not a secure-aggregation message and passes the mod untouched.

A run is one *session* (``session``: a random id the server draws); a session has *epochs*
(``epoch``: a key-agreement setup over a cohort, numbered from 1). A round of an epoch is
either a **setup round** (four messages: setup, share-keys, collect-masked-input, unmask)
or, once the epoch is set up, a **fast round** (two messages: collect-masked-input,
unmask). A sampled device that is not ready for a fast round (it is new, it dropped out, it
declined) gets one ``join`` message in that round instead and takes part from the next.
See docs/secure-aggregation.md for the protocol and its security argument.

Server -> device, ConfigRecord ``SERVER_RECORD`` ("secagg.server"), always with ``stage``
(str), ``session`` (str), ``epoch`` (int) and ``round`` (int); per stage:

    setup                 index (int, 1..n), n, num_neighbours, threshold, max_dropout_fraction,
                          frac_bits, ring_bits, max_cohort, out_of_range      (the epoch's
                          parameters; the first message of a setup round)
    share-keys            neighbours (list[int]), c_pk (list[bytes]), s_pk (list[bytes])
    join                  the setup fields, plus neighbours (list[int]) and their c_pk
                          (list[bytes]); the device takes part from round + 1
    collect-masked-input  n (int: devices asked for a masked input), min_survivors (int),
                          clip_range (float), vector_length (int: the update's length),
                          extras (list[str]: names summed in slots after the update),
                          extras_lo, extras_hi (list[float]: each extra's range),
                          src (list[int]: the neighbours it masks with) with src_c_pk (their
                          share-encryption keys), s_pk (their mask keys for this round) and ct
                          (their encrypted shares to this device; all list[bytes]),
                          neighbours (list[int]) with c_pk (list[bytes]): whom to deal the
                          next round's shares to, last (bool: the session's last round, deal
                          nothing); the message also carries the train content (global
                          model, config) under its own names
    unmask                b_owners (list[int]), sk_owners (list[int]), n_survivors (int)
    finish                (nothing: the message carries only the announced records)

The first message of a round (setup, join or collect-masked-input) may carry *announced*
records next to ``SERVER_RECORD`` (the run record, the signed receipt of the previous
release): the protocol never reads them; the device's ``take_part`` hook does. So does the
``finish`` message (the receipt of the last release).

Device -> server (the egress allow-list):

    setup                 ConfigRecord PUBLIC_KEYS   c_pk (bytes32), s_pk (bytes32)
    share-keys            ConfigRecord SHARES        dst (list[int]), ct (list[bytes]),
                                                     b_commit (bytes32)
    join                  ConfigRecord PUBLIC_KEYS   c_pk, s_pk (the next round's mask key)
                          ConfigRecord SHARES        dst, ct, b_commit (the next round's)
    collect-masked-input  ArrayRecord  MASKED_INPUT  "masked": 1-D uint64
                          ConfigRecord MASKED_STATUS bad_share_senders (list[int])
                          ConfigRecord PUBLIC_KEYS   s_pk (the next round's mask key)
                          ConfigRecord SHARES        dst, ct, b_commit (the next round's)
    unmask                ConfigRecord UNMASK_SHARES b_owner, sk_owner (list[int]),
                                                     b_share, sk_share (list[bytes48])
    finish                ConfigRecord ACK           (no keys)
    first stage of a      ConfigRecord DECLINED      (no keys): "not taking part", the same
      round                                          whatever the reason
    any stage             ConfigRecord REFUSED       code (str), stage (str)

No metric ever travels in the clear: per-device numbers (the training loss) are summed
inside the masked vector, in extra slots after the update (``extras``).

Inner app contract (inside the device, never sent): the mod calls the wrapped app with a
``"train"`` message whose content is the train content; the app replies with ArrayRecord
``INNER_UPDATE`` holding one 1-D float array ``INNER_VECTOR`` (already clipped and noised)
and optionally MetricRecord ``INNER_METRICS`` (the values of the requested extras).

Device state: ConfigRecord ``CLIENT_STATE`` in ``context.state`` (memory only), never sent.
"""

from __future__ import annotations

MESSAGE_TYPE = "train"

STAGE_SETUP = "setup"
STAGE_SHARE_KEYS = "share-keys"
STAGE_JOIN = "join"
STAGE_COLLECT = "collect-masked-input"
STAGE_UNMASK = "unmask"
STAGE_FINISH = "finish"
# The stages of a setup round, in order (a fast round is its last two).
STAGES = (STAGE_SETUP, STAGE_SHARE_KEYS, STAGE_COLLECT, STAGE_UNMASK)
FAST_STAGES = (STAGE_COLLECT, STAGE_UNMASK)
# Every stage, in the order a device can meet them within a round.
ALL_STAGES = (STAGE_SETUP, STAGE_SHARE_KEYS, STAGE_JOIN, STAGE_COLLECT, STAGE_UNMASK, STAGE_FINISH)
# The stages that open a round for a device: they may carry announced records, and the
# device decides there whether it takes part.
FIRST_STAGES = (STAGE_SETUP, STAGE_JOIN, STAGE_COLLECT)

SERVER_RECORD = "secagg.server"

PUBLIC_KEYS = "secagg.public-keys"
SHARES = "secagg.shares"
MASKED_INPUT = "secagg.masked-input"
MASKED_ARRAY = "masked"
MASKED_STATUS = "secagg.masked-status"
UNMASK_SHARES = "secagg.unmask-shares"
DECLINED = "secagg.not-taking-part"
ACK = "secagg.ack"
REFUSED = "secagg.refused"
# The coarse metrics record of a plain (server-trusted) train reply; never sent by a
# secure-aggregation stage.
METRICS = "metrics"

INNER_UPDATE = "update"
INNER_VECTOR = "vector"
INNER_METRICS = "metrics"

CLIENT_STATE = "secagg.client-state"

# record name -> (record kind, allowed keys); per stage, what a device may send.
_REFUSAL = {REFUSED: ("config", ("code", "stage"))}
_DECLINE = {DECLINED: ("config", ())}
_NEXT_ROUND = {
    PUBLIC_KEYS: ("config", ("c_pk", "s_pk")),
    SHARES: ("config", ("dst", "ct", "b_commit")),
}
CLIENT_REPLY_RECORDS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    STAGE_SETUP: {PUBLIC_KEYS: ("config", ("c_pk", "s_pk")), **_DECLINE, **_REFUSAL},
    STAGE_SHARE_KEYS: {SHARES: ("config", ("dst", "ct", "b_commit")), **_REFUSAL},
    STAGE_JOIN: {**_NEXT_ROUND, **_DECLINE, **_REFUSAL},
    STAGE_COLLECT: {
        MASKED_INPUT: ("array", (MASKED_ARRAY,)),
        MASKED_STATUS: ("config", ("bad_share_senders",)),
        **_NEXT_ROUND,
        **_DECLINE,
        **_REFUSAL,
    },
    STAGE_UNMASK: {UNMASK_SHARES: ("config", ("b_owner", "b_share", "sk_owner", "sk_share")), **_REFUSAL},
    STAGE_FINISH: {ACK: ("config", ()), **_REFUSAL},
}
