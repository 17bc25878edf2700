"""One local training round on a person-year, on one CPU thread: seconds and peak RSS.

Targets (issue 4): <= 1 s and <= 300 MB. The measurement runs in a fresh subprocess so the
peak RSS is that of a device process doing exactly this (Python + numpy + torch + the
round), not of whatever ran before.

    python benchmarks/device.py            # 365 days, default epochs, 5 repeats
    python benchmarks/device.py --quick    # 1 repeat

What is timed: features for 365 days -> examples -> build the model -> ``train_local`` with
the default epochs (shared and personal parts). Reported separately: the federated round
(``FEDERATED_LOCAL_EPOCHS`` epochs, shared part only), which is what a device runs per round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TARGET_SECONDS = 1.0
TARGET_MB = 300.0

CHILD = r"""
import json, resource, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
torch.set_num_interop_threads(1)
from restwise.models.features import DailyData, compute_features, make_examples
from restwise.models.network import ModelConfig, build_model
from restwise.models.synthetic import synthetic_person
from restwise.models.training import DEFAULT_EPOCHS, FEDERATED_LOCAL_EPOCHS, train_local

repeats = int(sys.argv[1])
days = synthetic_person(7, days=365)
nan = float("nan")
data = DailyData.from_columns(
    [d.day for d in days],
    rmssd_ms=[d.rmssd_ms if d.rmssd_ms is not None else nan for d in days],
    resting_hr=[d.resting_hr if d.resting_hr is not None else nan for d in days],
    sleep_minutes=[d.sleep_minutes if d.sleep_minutes is not None else nan for d in days],
    load=[d.session_minutes * d.session_rpe for d in days],
    readiness=[d.readiness if d.readiness is not None else nan for d in days],
    fatigue=[d.fatigue if d.fatigue is not None else nan for d in days],
    soreness=[d.soreness if d.soreness is not None else nan for d in days],
    stress=[d.stress if d.stress is not None else nan for d in days],
    mood=[d.mood if d.mood is not None else nan for d in days],
    sleep_quality=[d.sleep_quality if d.sleep_quality is not None else nan for d in days],
)
# warm-up (first-call overheads of torch are not part of a round on a running device)
ex = make_examples(compute_features(data), data)
m = build_model(ModelConfig(n_features=ex.n_features, window=ex.window))
train_local(m, ex, epochs=1)

full, fed = [], []
for r in range(repeats):
    t0 = time.perf_counter()
    frame = compute_features(data)
    ex = make_examples(frame, data)
    model = build_model(ModelConfig(n_features=ex.n_features, window=ex.window, seed=r))
    info = train_local(model, ex, epochs=DEFAULT_EPOCHS, seed=r)
    full.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    train_local(model, ex, epochs=FEDERATED_LOCAL_EPOCHS, seed=r, train_personal=False)
    fed.append(time.perf_counter() - t0)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n_params = sum(p.numel() for p in model.parameters())
print(json.dumps({
    "days": len(data), "examples": info["n_examples"], "inputs": int(ex.X.shape[1]),
    "parameters": int(n_params), "epochs": DEFAULT_EPOCHS,
    "federated_epochs": FEDERATED_LOCAL_EPOCHS,
    "seconds_median": float(np.median(full)), "seconds_max": float(np.max(full)),
    "federated_seconds_median": float(np.median(fed)), "peak_rss_mb": peak_mb,
    "threads": torch.get_num_threads(),
}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    env_threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(repeats)], capture_output=True, text=True,
        env={**os.environ, **env_threads}, check=False,
    )
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return 1
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ok_t = r["seconds_max"] <= TARGET_SECONDS
    ok_m = r["peak_rss_mb"] <= TARGET_MB
    print(f"person-year: {r['days']} days -> {r['examples']} examples x {r['inputs']} inputs; "
          f"model {r['parameters']} parameters; torch threads {r['threads']}")
    print(f"local training round ({r['epochs']} epochs, features included): "
          f"median {r['seconds_median']:.3f} s, max {r['seconds_max']:.3f} s over {repeats} "
          f"run(s)  [target <= {TARGET_SECONDS:.0f} s: {'met' if ok_t else 'NOT met'}]")
    print(f"federated round ({r['federated_epochs']} epoch, shared part): "
          f"median {r['federated_seconds_median']:.3f} s")
    print(f"peak RSS of the device process: {r['peak_rss_mb']:.0f} MB  "
          f"[target <= {TARGET_MB:.0f} MB: {'met' if ok_m else 'NOT met'}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
