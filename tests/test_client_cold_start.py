"""A cheap ClientApp start (issue 14 item 2): Flower 1.42 starts a fresh ClientApp process for
every message, and the secure-aggregation stages that only do cryptography must not pay for
torch. A fresh interpreter imports the real ClientApp and answers a setup message of a real
store (the participation check opens the store, reads its data, pins the run's ledger key,
checks and keeps the ledger entries the message carries, and checks the device's epsilon cap);
torch stays unloaded, and so does scipy (the device's budget check needs none).
(The timings are measured by ``benchmarks/deployment.py``, not here.)"""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

CHILD = r"""
import json, pickle, sys
from restwise.client.app import app  # what flwr-clientapp loads
imported = "torch" in sys.modules
from flwr.supercore.task_identity import TaskIdentity
with open(sys.argv[1], "rb") as fh:
    message, context = pickle.load(fh)
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, context.node_id, 1
reply = app(message, context)
print(json.dumps({"after_import": imported, "after_setup": "torch" in sys.modules,
                  "scipy": "scipy" in sys.modules,
                  "records": [] if reply.has_error() else sorted(reply.content.keys())}))
"""


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    from restwise.client.importers.base import run_import
    from restwise.client.keys import FileKeystore
    from restwise.client.store import DeviceStore
    from restwise.simulation.fleet import write_demo_export

    root = tmp_path_factory.mktemp("cold-start")
    export = write_demo_export(11, root / "export.jsonl", days=45)
    with DeviceStore.create(root / "store", keystore=FileKeystore(root / "keystore")) as store:
        run_import(store, export)
    return root


def test_crypto_stages_never_import_torch(device, tmp_path):
    assert importlib.util.find_spec("torch") is not None  # it is installed: the check can fail
    from restwise.privacy import wire
    from restwise.privacy.secagg import records as R
    from restwise.privacy.secagg.config import SecAggConfig
    from restwise.privacy.secagg.harness import ensure_task_identity
    from restwise.privacy.secagg.protocol import ServerSession

    ensure_task_identity()
    session = ServerSession(SecAggConfig())
    rnd = session.start_round([1, 2, 3, 4], 1, 10)
    from restwise.privacy.events import AuditEvent
    from restwise.privacy.ledger import PrivacyLedger, generate_audit_key, public_key_hex

    key = generate_audit_key(tmp_path / "audit_key.pem")
    entry = PrivacyLedger(tmp_path / "ledger.jsonl", key).append(AuditEvent(actor="t", action="plan.forced",
                                                                            target="run-cold"))
    announce = RecordDict({
        wire.RUN_RECORD: ConfigRecord({"run_id": "run-cold", "round": 1, "model": "recovery-mlp", "attempt": 0,
                                       "ledger_key": public_key_hex(key), "noise_multiplier": 1.0,
                                       "adjacency": "add_remove", "delta": 1e-5}),
        wire.RECEIPTS_RECORD: ConfigRecord({wire.RECEIPTS_ENTRIES: [entry.line().decode().rstrip("\n")]}),
    })
    content = rnd.setup_messages(announce)[1]
    message = Message(content, dst_node_id=1, message_type=R.MESSAGE_TYPE)
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"store": str(device / "store"), "keystore": str(device / "keystore")})
    path = tmp_path / "message.pkl"
    path.write_bytes(pickle.dumps((message, context)))
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["records"] == [R.PUBLIC_KEYS]  # it took part: consent and enough data were read
    assert result == {"after_import": False, "after_setup": False, "scipy": False, "records": [R.PUBLIC_KEYS]}
    from restwise.client import receipts_store
    from restwise.client.store import DeviceStore
    from restwise.client.keys import FileKeystore

    with DeviceStore.open(device / "store", keystore=FileKeystore(device / "keystore")) as store:
        assert list(receipts_store.stored_lines(store, "run-cold")) == [1]  # checked and kept in the cold process
