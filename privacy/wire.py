"""Every Restwise message type, record name and message error code, in one place.

Server and device never import each other: both read what crosses the wire from here, and so
do the egress guard (what a device may send, ``privacy/egress.py``) and the auditor's
information-leakage section. Secure aggregation's own stage records are listed in
``privacy/secagg/records.py`` (the protocol package keeps its names together); the ones a
Restwise app uses are re-exported below.

Server -> device::

    query "query.restwise_hello"   RUN_RECORD     ConfigRecord run_id (str), round (int),
                                                  model (str: the architecture's registry name);
                                                  private runs add attempt (int), ledger_key (the
                                                  run ledger's Ed25519 public key, 64 hex: the
                                                  device pins it), noise_multiplier (the planned
                                                  z), adjacency (str), delta (float): what the
                                                  device's own budget check needs
    train (secure-aggregation      RUN_RECORD     as above
      stages, privacy/secagg)      GLOBAL_RECORD  ArrayRecord: the shared arrays, keys s000, s001, ...
                                   TRAIN_RECORD   ConfigRecord: model (str), model_config (json),
                                                  local_epochs, learning_rate, batch_size, seed
                                   DP_RECORD      ConfigRecord: clip_norm, noise_multiplier,
                                                  placement, noise_divisor (privacy.dp_mods)
      first message of a device's  RECEIPTS_RECORD ConfigRecord entries (list of str): the run's
      round, and the model                        ledger entries this device has not received
      delivery                                    yet, as canonical signed lines (absent: none)
    query "query.restwise_receipts" RUN_RECORD,   the run's last entries, once at its end, to
      (end of a run)               RECEIPTS_RECORD devices that took part and lack some
    query "query.restwise_model"   RUN_RECORD     as above (round: the release's)
      (after a run whose model     GLOBAL_RECORD  the run's released shared arrays
      is computed on the server)   MODEL_RECORD   ConfigRecord: model, model_config, model_hash
                                                  (common.arrays.arrays_sha256 of the arrays: the
                                                  ledger event's), ledger_seq, ledger_hash (the
                                                  release's signed ledger entry)

Device -> server::

    hello reply                    CONSENT_RECORD ConfigRecord participate (bool)
    model delivery reply           nothing (an empty message, whatever the device did with it)
    receipts reply                 nothing (an empty message, whatever the device found)
    secure-aggregation stages      privacy/secagg/records.py CLIENT_REPLY_RECORDS (no metric:
                                                  nothing per device travels in the clear)
    plain train reply (benchmark   UPDATE_RECORD  ArrayRecord "vector" (1-D float), only for
      baseline, server-trusted)                   server-trusted runs

Device-internal (never sent): ``DEVICE_STATE`` in ``context.state``.

Error codes a device replies with (an ``Error`` carries only the code and a fixed reason):
43xx. A server reads them to count why devices did not contribute.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from restwise.privacy.secagg import records as SR

# -- message types ---------------------------------------------------------------------------
HELLO_MESSAGE_TYPE = "query.restwise_hello"
MODEL_MESSAGE_TYPE = "query.restwise_model"
RECEIPTS_MESSAGE_TYPE = "query.restwise_receipts"
TRAIN_MESSAGE_TYPE = SR.MESSAGE_TYPE  # "train": every secure-aggregation stage travels as train

# -- server -> device ------------------------------------------------------------------------
RUN_RECORD = "restwise.run"
GLOBAL_RECORD = "restwise.global"
TRAIN_RECORD = "restwise.train"
DP_RECORD = "restwise.dp"
MODEL_RECORD = "restwise.model"
RECEIPTS_RECORD = "restwise.receipts"
RECEIPTS_ENTRIES = "entries"

# -- device -> server ------------------------------------------------------------------------
CONSENT_RECORD = "restwise.consent"
UPDATE_RECORD = SR.INNER_UPDATE  # "update": the update as the train function replies it
UPDATE_VECTOR = SR.INNER_VECTOR  # "vector"
METRICS_RECORD = SR.METRICS  # "metrics"

# -- device-internal -------------------------------------------------------------------------
DEVICE_STATE = "restwise.device"  # context.state (memory only): the Restwise run id per Flower run

# -- error codes -------------------------------------------------------------------------------
# egress guard (privacy.egress)
ERROR_CODE_REFUSED = 4301  # the guard refused a reply (not on the allow-list)
ERROR_CODE_APP_FAILED = 4302  # the wrapped app raised; only the exception type is reported
ERROR_CODE_NO_CONSENT = 4303  # the person has not consented to this run
ERROR_CODE_LOG_FAILED = 4304  # the egress log could not be written: nothing sent
# device DP step (privacy.dp_mods)
ERROR_CODE_NON_FINITE = 4311  # the update contains NaN or inf: refused on the device
ERROR_CODE_BAD_PARAMS = 4312  # the server's DP parameters are missing or unsafe
ERROR_CODE_NO_UPDATE = 4313  # the wrapped app returned no update vector
# the device app (client.app)
ERROR_CODE_NOT_ENOUGH_DATA = 4321  # too few check-ins to train on
ERROR_CODE_BAD_REQUEST = 4322  # a malformed train message


# -- the shared arrays as a record ----------------------------------------------------------------
def arrays_record(arrays: list[np.ndarray]) -> ArrayRecord:
    """GLOBAL_RECORD's content: the arrays as float32, keys s000, s001, ... (in order)."""
    return ArrayRecord({f"s{i:03d}": Array(np.asarray(a, dtype=np.float32)) for i, a in enumerate(arrays)})


def arrays_from_record(record: ArrayRecord) -> list[np.ndarray]:
    return [record[k].numpy() for k in sorted(record.keys())]


__all__ = [
    "HELLO_MESSAGE_TYPE", "TRAIN_MESSAGE_TYPE", "MODEL_MESSAGE_TYPE", "RUN_RECORD", "GLOBAL_RECORD", "TRAIN_RECORD",
    "DP_RECORD", "MODEL_RECORD", "RECEIPTS_MESSAGE_TYPE", "RECEIPTS_RECORD", "RECEIPTS_ENTRIES",
    "CONSENT_RECORD", "UPDATE_RECORD", "UPDATE_VECTOR", "METRICS_RECORD", "DEVICE_STATE",
    "ERROR_CODE_REFUSED", "ERROR_CODE_APP_FAILED", "ERROR_CODE_NO_CONSENT", "ERROR_CODE_LOG_FAILED",
    "ERROR_CODE_NON_FINITE", "ERROR_CODE_BAD_PARAMS", "ERROR_CODE_NO_UPDATE", "ERROR_CODE_NOT_ENOUGH_DATA",
    "ERROR_CODE_BAD_REQUEST", "arrays_record", "arrays_from_record",
]
