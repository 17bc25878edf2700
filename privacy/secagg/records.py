"""Every message and record name of Restwise secure aggregation, in one place.

The device's egress guard, the server workflow and the auditor's information-leakage
section import this module: anything a device sends during a secure round is listed in
``CLIENT_REPLY_RECORDS``.

All stages travel as Flower messages of type ``"train"`` (``MESSAGE_TYPE``): a decorator
``ClientApp`` routes by message type *before* mods run, so the stage is named inside the
content instead, in ConfigRecord ``SERVER_RECORD`` field ``"stage"``. A train message
without ``SERVER_RECORD`` is not a secure-aggregation message and passes the mod untouched.

Server -> device, ConfigRecord ``SERVER_RECORD`` ("secagg.server"), always with
``stage`` (str) and ``round`` (int); per stage:

    setup                 index (int, 1..n), n, num_neighbours, threshold, max_dropout_fraction,
                          clip_range, frac_bits, ring_bits, max_cohort, out_of_range,
                          metric_keys (list[str]), vector_length
    share-keys            neighbours (list[int]), c_pk (list[bytes]), s_pk (list[bytes])
    collect-masked-input  src (list[int]), ct (list[bytes]) - encrypted shares addressed to
                          this device, one per live neighbour; the message also carries
                          the train content (global model, config) under its own names
    unmask                b_owners (list[int]), sk_owners (list[int]), n_survivors (int)

Device -> server (the egress allow-list):

    setup                 ConfigRecord PUBLIC_KEYS   c_pk (bytes32), s_pk (bytes32)
    share-keys            ConfigRecord SHARES        dst (list[int]), ct (list[bytes]),
                                                     b_commit (bytes32)
    collect-masked-input  ArrayRecord  MASKED_INPUT  "masked": 1-D uint64, length n_params
                          ConfigRecord MASKED_STATUS bad_share_senders (list[int])
                          MetricRecord METRICS       only keys in config.metric_keys
    unmask                ConfigRecord UNMASK_SHARES b_owner, sk_owner (list[int]),
                                                     b_share, sk_share (list[bytes48])
    any stage             ConfigRecord REFUSED       code (str), stage (str)

Inner app contract (inside the device, never sent): the mod calls the wrapped app with a
``"train"`` message whose content is the train content; the app replies with ArrayRecord
``INNER_UPDATE`` holding one 1-D float array ``INNER_VECTOR`` (already clipped and noised)
and optionally MetricRecord ``INNER_METRICS``.

Device state: ConfigRecord ``CLIENT_STATE`` in ``context.state`` (memory only), never sent.
"""

from __future__ import annotations

MESSAGE_TYPE = "train"

STAGE_SETUP = "setup"
STAGE_SHARE_KEYS = "share-keys"
STAGE_COLLECT = "collect-masked-input"
STAGE_UNMASK = "unmask"
STAGES = (STAGE_SETUP, STAGE_SHARE_KEYS, STAGE_COLLECT, STAGE_UNMASK)

SERVER_RECORD = "secagg.server"

PUBLIC_KEYS = "secagg.public-keys"
SHARES = "secagg.shares"
MASKED_INPUT = "secagg.masked-input"
MASKED_ARRAY = "masked"
MASKED_STATUS = "secagg.masked-status"
METRICS = "metrics"
UNMASK_SHARES = "secagg.unmask-shares"
REFUSED = "secagg.refused"

INNER_UPDATE = "update"
INNER_VECTOR = "vector"
INNER_METRICS = "metrics"

CLIENT_STATE = "secagg.client-state"

# record name -> (record kind, allowed keys); per stage, what a device may send.
_REFUSAL = {REFUSED: ("config", ("code", "stage"))}
CLIENT_REPLY_RECORDS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    STAGE_SETUP: {PUBLIC_KEYS: ("config", ("c_pk", "s_pk")), **_REFUSAL},
    STAGE_SHARE_KEYS: {SHARES: ("config", ("dst", "ct", "b_commit")), **_REFUSAL},
    STAGE_COLLECT: {
        MASKED_INPUT: ("array", (MASKED_ARRAY,)),
        MASKED_STATUS: ("config", ("bad_share_senders",)),
        METRICS: ("metric", ()),  # keys: SecAggConfig.metric_keys
        **_REFUSAL,
    },
    STAGE_UNMASK: {UNMASK_SHARES: ("config", ("b_owner", "b_share", "sk_owner", "sk_share")), **_REFUSAL},
}
