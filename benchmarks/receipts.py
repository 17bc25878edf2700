"""Bytes device receipts add to a run's messages, and messages per device and round.

    python benchmarks/receipts.py               # 20 rounds, 6 devices, sampling rate 1
    python benchmarks/receipts.py --rounds 5

A real private run (the real ServerApp loop, the real ClientApp with all its mods, real
encrypted stores, the real signed ledger) on the in-process Grid (privacy/secagg/harness.py:
real Flower Messages, no Ray). Every message the server sends a device is measured as Flower
serialises it (``egress.content_bytes``), with and without its ``restwise.receipts`` record
(the ledger entries that device lacked), and the run record's ``ledger_key`` field. Reports,
per device: messages per round (issue 14 wants <= 2 in a fast round), the receipts bytes in the
first message of each round, the final receipts message, and the total.

No timing: byte counts are deterministic up to the timestamps' and signatures' fixed widths.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from restwise.client.app import DeviceLocator, make_client_app
from restwise.privacy import wire
from restwise.privacy.egress import content_bytes
from restwise.privacy.secagg import records as SR
from restwise.privacy.secagg.harness import InProcessGrid
from restwise.server.app import FederatedServer
from restwise.server.rundir import open_ledger
from restwise.server.runconfig import RunConfig
from restwise.simulation.fleet import prepare_fleet


def measure(rounds: int, devices: int) -> dict:
    config = RunConfig(
        name="receipts-bench", rounds=rounds, population=devices, sampling="poisson", sampling_rate=1.0,
        noise_multiplier=3.0,  # 20 releases stay under the devices' default cap of 10
        delta=1e-3, clip_norm=1.0, secagg_num_neighbours=devices - 1, secagg_threshold=3, max_dropout_fraction=0.3,
        local_epochs=1, learning_rate=0.003, batch_size=32, round_timeout_s=60.0, dataset="demo", seed=2, force=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "runs" / "run-bench0001"
        run_dir.mkdir(parents=True)
        prepare_fleet(run_dir / "fleet", config, demo_days=60)
        app = make_client_app(DeviceLocator(run_dir / "fleet"))
        seen: dict[int, list[dict]] = defaultdict(list)

        def device(msg: Message, context: Context) -> Message:
            content = msg.content
            total = len(content_bytes(content))
            receipts = content.config_records.get(wire.RECEIPTS_RECORD)
            without = RecordDict({k: v for k, v in content.items() if k != wire.RECEIPTS_RECORD})
            server = content.config_records.get(SR.SERVER_RECORD)
            seen[context.node_id].append({
                "type": msg.metadata.message_type, "stage": None if server is None else str(server["stage"]),
                "round": int(server["round"]) if server is not None else
                int(content.config_records[wire.RUN_RECORD]["round"]),
                "bytes": total, "receipts_bytes": total - len(content_bytes(without)) if receipts is not None else 0,
                "entries": len(receipts[wire.RECEIPTS_ENTRIES]) if receipts is not None else 0,
            })
            return app(msg, context)

        nodes = [3000 + i for i in range(devices)]
        grid = InProcessGrid(device, nodes)
        for i, nid in enumerate(nodes):
            grid.contexts[nid] = Context(run_id=1, node_id=nid, node_config={"partition-id": i}, state=RecordDict(),
                                         run_config={})
        summary = FederatedServer(config, run_dir, run_id=run_dir.name, ledger=open_ledger(run_dir, config),
                                  node_wait_s=0.5).run(grid)
        ledger_lines = (run_dir / "ledger.jsonl").read_bytes().splitlines()
    one = seen[nodes[0]]
    per_round = defaultdict(int)
    first_receipts = []
    for m in one:
        if m["type"] == wire.TRAIN_MESSAGE_TYPE:
            per_round[m["round"]] += 1
            if m["receipts_bytes"]:
                first_receipts.append((m["round"], m["entries"], m["receipts_bytes"]))
    final = [m for m in one if m["type"] == wire.RECEIPTS_MESSAGE_TYPE]
    return {
        "status": summary.status, "rounds": rounds, "devices": devices,
        "ledger_entries": len(ledger_lines), "ledger_line_bytes_median": statistics.median(len(x) for x in ledger_lines),
        "messages_per_round_device0": dict(per_round),
        "fast_round_messages_max": max((v for r, v in per_round.items() if r > 1), default=None),
        "receipts_in_first_message": [{"round": r, "entries": e, "bytes": b} for r, e, b in first_receipts],
        "receipts_bytes_per_round_median": statistics.median(b for r, _, b in first_receipts if r > 1)
        if len(first_receipts) > 1 else None,
        "final_receipts_message": [{"entries": m["entries"], "bytes": m["bytes"], "receipts_bytes": m["receipts_bytes"]}
                                   for m in final],
        "receipts_bytes_total_device0": sum(m["receipts_bytes"] for m in one),
        "all_bytes_total_device0": sum(m["bytes"] for m in one),
        "ledger_key_bytes_per_message": len('"ledger_key"') + 64,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=6)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    print(json.dumps(measure(args.rounds, args.devices), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
