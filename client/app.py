"""The Restwise ClientApp: what runs on a person's device in a federated training run.

Composition (outermost first)::

    ClientApp(mods=[egress_guard, secagg_mod(take_part=participates), dp_mod])
        query "restwise_hello"  -> consent (and enough data?) -> participate: bool
        train                   -> open the store, features, train locally (or compute the
                                   architecture's statistics), reply the raw vector
        query "restwise_model"  -> a run's released model (a model computed on the server from
                                   one release): checked and kept with the person's own part;
                                   the reply is empty whatever happened
        query "restwise_receipts" -> the run's last ledger entries (end of a run): checked and
                                   kept; the reply is empty whatever happened

The secure-aggregation mod asks the same question (``participates``) at the first message
of every round it is asked into, from the run record the server announces there; a "no" is
the protocol's "not taking part", the same reply whatever the reason. (The hello query
remains while the server still sends it; a server that folds it into the first stage of a
round needs only the mod's question.)

Cheap start: Flower 1.42 starts a fresh ClientApp process for every message, and most
messages of a round only do cryptography. Importing this module loads Flower, NumPy,
``cryptography`` and the store (SQLCipher) - no torch. torch is imported at the first
training (``_single_thread_torch``), i.e. only in the process that answers a collect stage;
``tests/test_client_cold_start.py`` checks that the other stages never load it.

* The store is opened with a key that never comes from the server: from the device's keystore
  (``FileKeystore`` for simulated devices and trials; the OS keyring or a key file on a real
  device), or from the key agent of `restwise device join` that unlocked a passphrase store
  once (node config ``key-agent``; see :mod:`restwise.client.unlock`). Where the store and
  keystore are is *device* configuration (:class:`DeviceLocator`): the SuperNode's
  ``--node-config "store='/path' keystore='/path'"`` in deployment, or a simulated fleet
  folder (one store per partition id) in simulation.
* The train function is privacy-unaware: the model architecture the message names
  (``restwise.models.registry``) trains on the person's examples (its personal part never
  leaves), the model is kept in the encrypted store, and the reply is the *raw* vector the
  architecture shares (the change of the shared parameters, or its bounded statistics). The
  mods make it private: ``dp_mod`` clips and adds this device's noise share, ``secagg_mod``
  masks it, the egress guard checks every record against the allow-list and logs what left
  (``restwise device history``). Record names and error codes: ``privacy/wire.py``.
* Consent: ``store.consents(run_id)`` is checked when the device is greeted for a round and
  again before training; a person who opted out (``restwise device consent``) sends only
  ``participate = false``.
* No metric leaves the device in the clear (issue 15): a FedAvg architecture carries the
  training loss as one more value of the clipped, noised, masked vector (``models/loss_slot.py``).
* Receipts and the device's own budget (issue 15; ``client/receipts_store.py``): the first
  message of a round (and the model delivery, and the run's final receipts message) carries
  the run ledger's key - pinned at the run's first message - and the ledger entries this
  device lacks; they are checked and kept before anything else, and a failure refuses the run
  from then on. Before the masked input leaves, the round is checked against the owner's
  epsilon cap (at the first message with the planned z, at training with the round's DP
  record) and recorded as a pending spend, settled later by its receipt. Every refusal is the
  same "not taking part".
* A delivered model (``adopt_model``) is kept only when its arrays hash to the hash the
  release's ledger entry names, the person consents to the run and the architecture accepts
  it (its feature spec); the person's own part (scale, threshold) stays as it was.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from restwise.client import receipts_store, unlock
from restwise.client.dataset import NoDataError, daily_data
from restwise.client.store import DeviceStore
from restwise.common.arrays import arrays_sha256
from restwise.common.errors import ModelError
from restwise.models.features import Examples
from restwise.models.registry import FEDAVG, Architecture, LocalTraining, get_architecture, round_seed
from restwise.privacy import egress as E
from restwise.privacy import wire
from restwise.privacy.dp_mods import make_dp_mod
from restwise.privacy.device_budget import Spend
from restwise.privacy.errors import PrivacyError
from restwise.privacy.secagg.mod import make_secagg_mod

_log = logging.getLogger(__name__)

SIM_KEYSTORE_DIR = "keystore"


def device_folder_name(partition_id: int) -> str:
    """The store folder of simulated device ``partition_id`` inside a fleet folder."""
    return f"device-{int(partition_id):05d}"


@dataclass(frozen=True)
class DeviceLocation:
    store: Path
    keystore: Path
    key_agent: Path | None = None  # socket of `restwise device join`'s key agent (passphrase stores)


@dataclass(frozen=True)
class DeviceLocator:
    """Where this device's store and keystore are.

    Node config ``store`` and ``keystore`` win (a real device, or a SuperNode per person);
    otherwise a simulated fleet: ``fleet_dir`` (or node config / run config
    ``restwise-fleet-dir``, or run config ``run-dir`` + ``/fleet``) holding ``keystore/`` and one
    ``device-NNNNN/`` store per Flower partition id."""

    fleet_dir: Path | None = None

    def locate(self, context: Context) -> DeviceLocation:
        node = context.node_config
        if "store" in node:
            store = Path(str(node["store"])).expanduser()
            keystore = Path(str(node.get("keystore", store.parent / SIM_KEYSTORE_DIR))).expanduser()
            agent = Path(str(node["key-agent"])) if node.get("key-agent") else None
            return DeviceLocation(store, keystore, agent)
        fleet = self.fleet_dir
        if fleet is None:
            configured = node.get("restwise-fleet-dir") or context.run_config.get("restwise-fleet-dir")
            run_dir = context.run_config.get("run-dir")
            if configured:
                fleet = Path(str(configured))
            elif run_dir:  # `flwr run . --run-config "run-dir='...'"`: the simulation's layout
                fleet = Path(str(run_dir)) / "fleet"
            else:
                raise LookupError(
                    "this node has no store configured: start the SuperNode with "
                    "--node-config \"store='/path/to/store' keystore='/path/to/keystore'\""
                )
        if "partition-id" not in node:
            raise LookupError("a simulated fleet needs the node's partition-id")
        return DeviceLocation(fleet / device_folder_name(int(node["partition-id"])), fleet / SIM_KEYSTORE_DIR)


def _open(location: DeviceLocation):
    """The store, unlocked by its keystore slot or by the join's key agent (never a
    passphrase: nobody types one into a ClientApp)."""
    return unlock.open_store(location.store, keystore_dir=location.keystore, key_agent=location.key_agent)


@contextlib.contextmanager
def open_device_store(location: DeviceLocation) -> Iterator[DeviceStore]:
    store = _open(location)
    try:
        yield store
    finally:
        store.close()


# -- the privacy-unaware core -----------------------------------------------------------
def person_examples(store: DeviceStore, architecture: Architecture) -> Examples:
    """The person's supervised examples for ``architecture``, computed on the device."""
    return architecture.examples(daily_data(store))


def has_enough_data(store: DeviceStore, architecture: Architecture) -> bool:
    """Could this device take part (``architecture.min_examples`` examples)? Decided from
    counts first (cheap), features only when close."""
    needed = architecture.min_examples
    (answered,) = store.conn.execute("SELECT count(*) FROM checkins WHERE readiness IS NOT NULL").fetchone()
    if answered < needed:
        return False  # every example needs a readiness answer as its target
    if answered - architecture.window >= needed:
        return True  # only answers within the first `window` days lack a full input window
    try:
        return len(person_examples(store, architecture)) >= needed
    except (NoDataError, ValueError):
        return False


def _single_thread_torch() -> None:
    # A phone trains one small model at a time; intra-op threads only add overhead for a model
    # this size (and simulated devices share the machine's cores). torch is imported here, at
    # the first training, not with the app: a device that only answers hellos never loads it.
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def local_update(store: DeviceStore, global_arrays: list[np.ndarray], params: ConfigRecord, *, run_id: str,
                 round_: int) -> tuple[np.ndarray, float]:
    """Train on this person's data from the global shared part (the architecture the train
    message names), or compute its statistics; keep the model, personal part included, in
    the encrypted store; return (the raw vector to share, mean training loss - which never
    leaves the device on its own: a FedAvg architecture carries it inside the vector, within the
    round's clip norm ``clip_norm`` of the train message, see ``models/loss_slot.py``)."""
    architecture = get_architecture(str(params["model"]))
    if architecture.protocol == FEDAVG:
        _single_thread_torch()  # one-release models compute statistics with numpy: torch is not loaded
    examples = person_examples(store, architecture)
    if len(examples) < architecture.min_examples:
        raise NoDataError("not enough check-ins to take part")
    stored = store.load_model_state(architecture.state_name)
    training = LocalTraining(
        epochs=int(params["local_epochs"]), learning_rate=float(params["learning_rate"]),
        batch_size=int(params["batch_size"]), seed=round_seed(int(params["seed"]), round_),
        clip_norm=float(params["clip_norm"]) if "clip_norm" in params else None,
    )
    contribution = architecture.contribute(str(params["model_config"]), global_arrays, examples, training,
                                           None if stored is None else stored[0])
    store.save_model_state(architecture.state_name, contribution.state,
                           {"trained": "federated", "run_id": run_id, "round": round_, "stored_at": int(time.time())})
    return contribution.vector, contribution.loss


def participates(store: DeviceStore, run_id: str, architecture: Architecture) -> bool:
    """Will this device take part in a round of ``run_id``? Its owner's consent, and enough
    data to train ``architecture`` on. The device never says which of the two failed."""
    return bool(store.consents(run_id)) and has_enough_data(store, architecture)


def adopt_model(store: DeviceStore, architecture: Architecture, arrays: list[np.ndarray], record: ConfigRecord, *,
                run_id: str, round_: int) -> str | None:
    """Keep a delivered model: None when kept, else why not (for the device's own log; never
    sent). Kept only when the arrays hash to the hash the release's ledger entry names, the
    person consents to the run and the architecture accepts it."""
    if not architecture.delivers_model:
        return "this model is not delivered"
    if arrays_sha256(arrays) != str(record.get("model_hash", "")):
        return "the arrays do not match the released model's hash"
    if not store.consents(run_id):
        return "the person has not consented to this run"
    stored = store.load_model_state(architecture.state_name)
    try:
        state = architecture.adopt(str(record["model_config"]), arrays, None if stored is None else stored[0])
    except ModelError as exc:
        return str(exc)
    store.save_model_state(architecture.state_name, state, {
        "trained": "released", "run_id": run_id, "round": round_, "model_hash": str(record["model_hash"]),
        "ledger_seq": int(record.get("ledger_seq", -1)), "ledger_hash": str(record.get("ledger_hash", "")),
        "stored_at": int(time.time())})
    return None


# -- the run's ledger and the device's own budget ----------------------------------------
def receipt_lines(msg: Message) -> list[str]:
    """The ledger entries a message carries (RECEIPTS_RECORD), as canonical lines."""
    record = msg.content.config_records.get(wire.RECEIPTS_RECORD)
    if record is None:
        return []
    lines = record.get(wire.RECEIPTS_ENTRIES, [])
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise ValueError("the ledger entries are malformed")
    return list(lines)


def take_in_run_record(store: DeviceStore, msg: Message) -> str | None:
    """Pin or check the run's ledger key and take in the ledger entries the message carries
    (client/receipts_store.py). Returns why the device must not take part in the run, or None."""
    run_id, _ = _run_record(msg)
    record = msg.content.config_records[wire.RUN_RECORD]
    return receipts_store.receive(store, run_id, record.get("ledger_key"), receipt_lines(msg))


def round_spend(msg: Message, params: ConfigRecord) -> Spend:
    """What this round would cost the device: its run, round and attempt, ``params``' noise
    multiplier (the run record's planned z at the first message, the DP record's z - the
    round's worst case - at training), the run's delta and adjacency. Raises KeyError,
    TypeError, ValueError or PrivacyError when any is missing or malformed."""
    run_id, round_ = _run_record(msg)
    run = msg.content.config_records[wire.RUN_RECORD]
    return receipts_store.planned_spend(run_id, round_, int(run.get("attempt", 0)), {
        "noise_multiplier": params["noise_multiplier"], "clip_norm": params.get("clip_norm", 1.0),
        "delta": run["delta"], "adjacency": run["adjacency"]})


def within_budget(store: DeviceStore, msg: Message, params: ConfigRecord) -> bool:
    """Would this round keep the device within its owner's cap? Missing or malformed
    parameters: no (fail closed)."""
    try:
        spend = round_spend(msg, params)
    except (KeyError, TypeError, ValueError, PrivacyError):
        return False
    return receipts_store.may_spend(store, spend)


# -- the app ----------------------------------------------------------------------------
def _run_record(msg: Message) -> tuple[str, int]:
    record = msg.content.config_records.get(wire.RUN_RECORD)
    if record is None or not str(record.get("run_id", "")):
        raise ValueError("the message names no run")
    return str(record["run_id"]), int(record.get("round", 0))


def make_client_app(
    locator: DeviceLocator | None = None,
    *,
    policy: E.EgressPolicy | None = None,
    private: bool = True,
    dp_rng_factory=None,
    extra_mods: tuple = (),
) -> ClientApp:
    """The Restwise ClientApp. ``policy`` defaults to the strict allow-list (masked updates
    only; a node may opt into the server-trusted plain mode with node config
    ``allow-unmasked-update = true``). ``private=False`` builds the bare app without any
    mod (benchmarks of plain FedAvg only: it sends raw updates). ``dp_rng_factory`` replaces
    the noise generator (tests only; devices draw from OS entropy). ``extra_mods`` go innermost,
    around the train function (fault injection in tests)."""
    locator = locator or DeviceLocator()

    def policy_for(context: Context) -> E.EgressPolicy:
        if policy is not None:
            return policy
        return E.EgressPolicy(allow_unmasked_update=bool(context.node_config.get("allow-unmasked-update", False)))

    # One open store per device for the life of this process: every message of a round
    # (hello, four secure-aggregation stages, each logged) would otherwise re-open it. The key
    # stays in this process's memory only while the device takes part in runs.
    open_stores: dict[DeviceLocation, DeviceStore] = {}

    @contextlib.contextmanager
    def device_store(context: Context):
        location = locator.locate(context)
        store = open_stores.get(location)
        if store is None:
            store = _open(location)
            open_stores[location] = store
        try:
            yield store
        except BaseException:
            # Anything unexpected: do not keep a connection that may be in a bad state.
            open_stores.pop(location, None)
            with contextlib.suppress(Exception):
                store.close()
            raise

    open_log = device_store

    def egress_guard(msg: Message, context: Context, call_next) -> Message:
        return E.make_egress_guard(policy_for(context), open_log)(msg, context, call_next)

    def take_part(msg: Message, context: Context) -> bool:
        """The secure-aggregation mod's question at the start of a round (the run record and
        the ledger entries this device lacks are announced there). No run record: the device
        cannot tell which run asks - no. Then: the run's ledger key and entries check out
        (else a local warning naming the run), consent and enough data, and the round keeps
        the device within its owner's epsilon cap. One answer whatever the reason."""
        run_id, _ = _run_record(msg)
        run = msg.content.config_records[wire.RUN_RECORD]
        architecture = get_architecture(str(run.get("model", "")))
        with device_store(context) as store:
            refusal = take_in_run_record(store, msg)
            if refusal is not None:
                _log.warning("run %s: not taking part: %s", run_id, refusal)
                return False
            return participates(store, run_id, architecture) and within_budget(store, msg, run)

    dp = make_dp_mod(dp_rng_factory) if dp_rng_factory is not None else make_dp_mod()
    secagg = make_secagg_mod(take_part=take_part)
    mods = ([egress_guard, secagg, dp] if private else []) + list(extra_mods)
    app = ClientApp(mods=mods)

    @app.query("restwise_hello")
    def hello(msg: Message, context: Context) -> Message:
        run_id, _ = _run_record(msg)
        architecture = get_architecture(str(msg.content.config_records[wire.RUN_RECORD].get("model", "")))
        with device_store(context) as store:
            participate = participates(store, run_id, architecture)
        return Message(RecordDict({wire.CONSENT_RECORD: ConfigRecord({"participate": participate})}), reply_to=msg)

    @app.query("restwise_model")
    def model_delivery(msg: Message, context: Context) -> Message:
        """A run's released model. The reply is the same empty message whether the device kept
        it or not: the server learns nothing from it."""
        try:
            run_id, round_ = _run_record(msg)
            record = msg.content.config_records[wire.MODEL_RECORD]
            arrays = wire.arrays_from_record(msg.content.array_records[wire.GLOBAL_RECORD])
            architecture = get_architecture(str(record["model"]))
        except (KeyError, ValueError, TypeError, ModelError):
            _log.warning("a malformed model delivery was ignored")
        else:
            with device_store(context) as store:
                why_not = take_in_run_record(store, msg)
                if why_not is None:
                    why_not = adopt_model(store, architecture, arrays, record, run_id=run_id, round_=round_)
            if why_not:
                _log.warning("the delivered %s model was not kept: %s", architecture.name, why_not)
        return Message(RecordDict(), reply_to=msg)

    @app.query("restwise_receipts")
    def receipts(msg: Message, context: Context) -> Message:
        """The run's last ledger entries, at its end. The reply is empty whatever the device
        found (an alarm stays on the device)."""
        try:
            run_id, _ = _run_record(msg)
            with device_store(context) as store:
                why_not = take_in_run_record(store, msg)
            if why_not:
                _log.warning("run %s: %s", run_id, why_not)
        except (KeyError, ValueError, TypeError):
            _log.warning("a malformed receipts message was ignored")
        return Message(RecordDict(), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            run_id, round_ = _run_record(msg)
            params = msg.content.config_records[wire.TRAIN_RECORD]
            global_arrays = wire.arrays_from_record(msg.content.array_records[wire.GLOBAL_RECORD])
        except (KeyError, ValueError, TypeError):
            return Message(Error(code=wire.ERROR_CODE_BAD_REQUEST, reason="malformed train message"), reply_to=msg)
        with device_store(context) as store:
            private = wire.DP_RECORD in msg.content.config_records
            # Over the owner's cap at this round's actual DP parameters: the same refusal as no
            # consent (the secure-aggregation mod turns either into "not taking part").
            if not store.consents(run_id) or (private and not within_budget(
                    store, msg, msg.content.config_records[wire.DP_RECORD])):
                return Message(Error(code=wire.ERROR_CODE_NO_CONSENT, reason="the person has not consented to this run"), reply_to=msg)
            try:
                update, _loss = local_update(store, global_arrays, params, run_id=run_id, round_=round_)
            except NoDataError:
                return Message(Error(code=wire.ERROR_CODE_NOT_ENOUGH_DATA, reason="not enough data to train"), reply_to=msg)
            if private:  # pending until its receipt; recorded before anything leaves (or nothing is sent)
                receipts_store.record_spend(store, round_spend(msg, msg.content.config_records[wire.DP_RECORD]))
        # The loss stays on the device: no per-device number travels in the clear.
        return Message(RecordDict({wire.UPDATE_RECORD: ArrayRecord({wire.UPDATE_VECTOR: Array(update)})}), reply_to=msg)

    return app


# The app Flower loads (pyproject [tool.flwr.app.components] clientapp = "restwise.client.app:app").
app = make_client_app()

__all__ = [
    "app", "make_client_app", "DeviceLocator", "DeviceLocation", "open_device_store", "device_folder_name",
    "local_update", "person_examples", "has_enough_data", "participates", "adopt_model", "SIM_KEYSTORE_DIR",
    "receipt_lines", "take_in_run_record", "round_spend", "within_budget",
]
