"""Seconds per round of a real deployment: Flower's plain FedAvg vs Restwise secure rounds.

    python benchmarks/deployment.py                      # 4 SuperNodes, 4 rounds per variant
    python benchmarks/deployment.py --nodes 4 --rounds 6 --superexec-poll 1.0   # Flower's default poll
    python benchmarks/deployment.py --cold-start-only    # the ClientApp cold start per stage
    python benchmarks/deployment.py --in-process 100     # both variants' CPU, no transport

Everything runs on 127.0.0.1 and is started by this script: a trial CA and server certificate
(``server/deploy.py``), a SuperLink with TLS and SuperNode authentication, one EC key per
SuperNode registered through the Control API, and N SuperNodes (``--isolation subprocess``:
Flower's default, a fresh ``flwr-clientapp`` process per message), each with its own
encrypted store of a generated person (``simulation.fleet``). Each variant is one
``flwr run`` of a throw-away app folder holding ``benchmarks/deployment_apps.py``:

    plain     Flower's ``FedAvg`` strategy (Message API, ``fraction_evaluate=0``: one train
              message per device per round), a ClientApp that trains the same Restwise model
              on the same store and replies its arrays. No privacy.
    restwise  what an operator runs: ``restwise server run --run-dir DIR --config ... --force``
              with the real ServerApp (``restwise.server.app:app``) and ClientApp
              (``restwise.client.app:app``: egress guard + secure-aggregation mod + DP mod):
              DP-FedAvg with distributed noise through the run's secure-aggregation session
              (round 1: setup, 4 messages per device; later rounds: 2), the write-ahead signed
              ledger entry, the checkpoint, progress, and the report at the end. s/round is
              each round's own time from ``rounds.jsonl`` (budget check to the applied entry).
    driver    (informational) the same rounds through the session driver alone
              (``deployment_apps.restwise_server``): no ledger, no checkpoint, no report.

Output as ``benchmarks/secagg.py``: a header, then one row per variant
(``nodes variant s/round x-plain``). s/round is the mean of rounds 2..R (round 1 is each
variant's warm-up; for restwise it is the setup round, reported in the note). Then the cold
start of a ClientApp process per stage: a fresh interpreter that imports what
``flwr-clientapp`` imports, loads the Restwise ClientApp and answers one captured message of
that stage on a real store (Flower's Runtime API round trips and FAB install excluded).

``--in-process N`` runs the same two variants (the same apps, stores and training) over the
in-process Grid (``privacy/secagg/harness.py``) with N devices and reports process CPU seconds
per round (every device runs in this process): the cost of privacy without Flower's transport.

Flower settings: both variants run on the same SuperLink and SuperNodes, started as Restwise
starts them (``server/deploy.py`` ``flower_env``): the SuperExec looks for a task every 0.25 s
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; Flower's default 1.0 s; ``--superexec-poll`` sets another
value for the SuperLink and every SuperNode), no telemetry, no update check, no runtime installs.

Flower 1.42 costs that no setting removes (read from its source): an idle SuperNode sleeps 3 s
between polls of the SuperLink (``start_client_internal.py``, hard-coded), so every stage waits
up to 3 s for its last device; a ``flwr-clientapp`` process serves one message and exits, with
or without ``--isolation process`` (``run_clientapp.py``: one task token, one message); the
SuperNode checks for the ClientApp's reply every 0.5 s; Flower's ``Grid.send_and_receive``
(used by its strategies, so by ``plain``) pulls replies every 3 s, where Restwise's ServerApp
pulls every <= 0.1 s.

After the rows: each variant's round split into its stages (restwise: from ``progress.jsonl``;
the rest is the budget check, ledger entries and checkpoint) and the load average of the
machine before and after (other work on it slows every variant).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # deployment_apps, beside this file

from deployment_apps import RestwiseRounds, bench_config, prepare_bench_fleet  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402

from restwise.client.app import make_client_app  # noqa: E402
from restwise.privacy.secagg.harness import InProcessGrid, ensure_task_identity  # noqa: E402
from restwise.server import deploy as D  # noqa: E402
from restwise.server.rundir import read_progress  # noqa: E402

VARIANTS = {
    "plain": ("deployment_apps:plain_server", "deployment_apps:plain_client"),
    "restwise": ("restwise.server.app:app", "restwise.client.app:app"),  # through `restwise server run`
    "driver": ("deployment_apps:restwise_server", "restwise.client.app:app"),
}
# The run-config keys of the benchmark's apps and their defaults (deployment_apps.py reads them).
APP_CONFIG = {"bench-nodes": 0, "bench-rounds": 0, "bench-result": "", "bench-wait-s": 120.0}
RESTWISE_CLI = [sys.executable, "-c", "import sys; from restwise.cli import main; sys.argv[0] = 'restwise'; main()"]


def write_app(folder: Path, variant: str) -> Path:
    """A throw-away Flower app directory for ``variant`` (server/deploy.py's template), with
    ``deployment_apps.py`` shipped in its FAB."""
    serverapp, clientapp = VARIANTS[variant]
    return D.write_app_dir(
        folder, name=f"restwise-bench-{variant}", description=f"Restwise deployment benchmark ({variant})",
        serverapp=serverapp, clientapp=clientapp, config=APP_CONFIG,
        extra_files={"deployment_apps.py": (HERE / "deployment_apps.py").read_text(encoding="utf-8")},
    )


class CpuMeter:
    """CPU seconds used by this benchmark's processes, by kind (ClientApps, ServerApp, SuperLink,
    SuperNodes, SuperExecs, the rest), sampled from /proc every 0.25 s (Linux; elsewhere none).
    A process that lives less than 0.25 s may be missed."""

    KINDS = ("flwr-clientapp", "flwr-serverapp", "flower-superlink", "flower-supernode", "flower-superexec")
    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self):
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._seen: dict[tuple[int, str], tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for pid in D.descendant_pids(os.getpid()):
                try:
                    with open(f"/proc/{pid}/stat", "rb") as fh:
                        stat = fh.read()
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                rest = stat[stat.rfind(b")") + 2:].split()
                key = (pid, rest[19].decode())
                # An exited ClientApp stays a zombie (its SuperExec does not wait for it) with an
                # empty command line but its final CPU times: keep what it was seen as alive.
                kind = next((k for k in self.KINDS if k in cmd), None) or \
                    (self._seen[key][0] if key in self._seen else "other (flwr CLI, server run)")
                self._seen[key] = (kind, (int(rest[11]) + int(rest[12])) / self.TICK)
            totals: dict[str, float] = {}
            for kind, cpu in self._seen.values():
                totals[kind] = totals.get(kind, 0.0) + cpu
            self.samples.append((time.time(), totals))

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per kind used between two wall-clock times (the nearest samples)."""
        if not self.samples:
            return {}
        a = min(self.samples, key=lambda s: abs(s[0] - start))[1]
        b = min(self.samples, key=lambda s: abs(s[0] - end))[1]
        return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in b}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Deployment:
    """A SuperLink and N SuperNodes on 127.0.0.1, TLS and node auth, each node with a store."""

    def __init__(self, root: Path, nodes: int, rounds: int, superexec_poll: float | None):
        env = D.flower_env()  # Restwise's Flower settings, for the SuperLink and every SuperNode
        if superexec_poll is not None:
            env[D.SUPEREXEC_TASK_POLL_ENV] = str(superexec_poll)
        self.task_poll_s = float(env[D.SUPEREXEC_TASK_POLL_ENV])
        self.root, self.n = root, nodes
        self.procs: list[D.ManagedProcess] = []
        self.windows: dict[str, tuple[float, float]] = {}  # variant -> wall-clock span of rounds 2..R
        t0 = time.perf_counter()
        self.fleet = root / "fleet"
        prepare_bench_fleet(self.fleet, bench_config(nodes, rounds), demo_days=90)
        pki = D.make_trial_pki(root / "pki")
        keys = [D.make_node_keys(root / "keys", f"node-{i}") for i in range(nodes)]
        port = D.free_port()
        self.procs.append(D.start_superlink(D.SuperLinkConfig(port=port, tls=pki, node_auth=True), root / "superlink.log",
                                            env=env))
        self.conn = D.FlwrConnection(root / "flwr-home", f"127.0.0.1:{port}", root_cert=pki.ca_cert)
        self.superlink, self.ca_cert = f"127.0.0.1:{port}", pki.ca_cert
        for i, key in enumerate(keys):
            D.register_node(self.conn, key.public_key, name=f"node-{i}")
        for i, key in enumerate(keys):
            cfg = D.SuperNodeConfig(
                f"127.0.0.1:{port}", root_cert=pki.ca_cert, auth_key=key.private_key, runtime_port=D.free_port(),
                node_config={"store": str(self.fleet / f"device-{i:05d}"), "keystore": str(self.fleet / "keystore")},
            )
            self.procs.append(D.start_supernode(f"node-{i}", cfg, root / f"node-{i}.log", env=env))
        deadline = time.monotonic() + 120
        while sum(n.get("status") == "online" for n in D.list_nodes(self.conn)) < nodes:
            if time.monotonic() > deadline:
                raise SystemExit("the SuperNodes did not come online within 120 s; logs in " + str(root))
            time.sleep(1.0)
        self.setup_s = time.perf_counter() - t0

    def server_run(self, rounds: int, timeout_s: float) -> list[dict]:
        """``restwise server run`` of a fresh run folder; one dict per round (rounds.jsonl,
        plus the round's stages from progress.jsonl)."""
        run_dir = self.root / "runs" / "run-deploybench01"
        run_dir.mkdir(parents=True, exist_ok=True)
        config = self.root / "run-config.json"
        config.write_text(json.dumps(bench_config(self.n, rounds).to_dict()), encoding="utf-8")
        started = time.perf_counter()
        out = subprocess.run([*RESTWISE_CLI, "server", "run", "--run-dir", str(run_dir), "--config", str(config),
                              "--superlink", self.superlink, "--root-cert", str(self.ca_cert), "--force", "--json",
                              "--timeout", str(timeout_s)], capture_output=True, text=True, timeout=timeout_s + 60)
        self.server_run_s = time.perf_counter() - started
        (self.root / "server-run.log").write_text(out.stderr, encoding="utf-8")
        lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()] \
            if (run_dir / "rounds.jsonl").exists() else []
        if out.returncode != 0 or len(lines) < rounds:
            raise SystemExit(f"restwise server run exited {out.returncode} after {len(lines)} of {rounds} rounds: "
                             f"{out.stdout.strip()[-500:]} (progress in {self.root / 'server-run.log'})")
        progress = read_progress(run_dir)
        last = [p["at"] for p in progress if p["round"] == rounds and p["stage"] == "release"] \
            or [p["at"] for p in progress if p["round"] == rounds]
        self.windows["restwise"] = (min(p["at"] for p in progress if p["round"] == 2), max(last))
        for line in lines:
            marks = [p for p in progress if p["round"] == line["round"]]
            starts = [p for i, p in enumerate(marks) if i == 0 or marks[i - 1]["stage"] != p["stage"]]
            # a stage lasts from its first line to the first line of the next stage
            line["stages"] = {here["stage"]: round(after["at"] - here["at"], 3) for here, after in zip(starts, starts[1:])}
            line["aborted"] = line["status"] != "completed"
            line["messages"] = 4 if line.get("mode") == "setup" else 2
        return lines

    def run(self, variant: str, rounds: int, timeout_s: float) -> list[dict]:
        if variant == "restwise":
            return self.server_run(rounds, timeout_s)
        app = write_app(self.root / f"app-{variant}", variant)
        result = self.root / f"result-{variant}.jsonl"
        result.unlink(missing_ok=True)
        run_id = D.submit_run(self.conn, app, {"bench-nodes": self.n, "bench-rounds": rounds,
                                               "bench-result": str(result), "bench-wait-s": 120.0})

        def lines() -> list[dict]:
            try:
                return [json.loads(x) for x in result.read_text(encoding="utf-8").splitlines() if x.strip()]
            except OSError:
                return []

        # `flwr list` (a CPU-second each) when the rounds are written, else every 30 s: the same
        # as `restwise server run` does for the restwise variant: both variants pay the same for it.
        status = D.wait_for_run(self.conn, run_id, timeout_s=timeout_s, poll_s=30.0, wake=lambda: len(lines()) >= rounds)
        got = lines()
        if len(got) >= rounds:
            self.windows[variant] = (got[0]["ended_at"], got[rounds - 1]["ended_at"])
        if len(got) < rounds:
            raise SystemExit(f"{variant}: the run ended {status.status} after {len(got)} of {rounds} rounds; "
                             f"logs in {self.root}")
        return got

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout_s=5)


# -- the cold start of a ClientApp process, per stage ------------------------------------------
CHILD = r"""
import json, pickle, sys, time
start = time.perf_counter()
import flwr.supernode.runtime.run_clientapp  # what `flwr-clientapp` imports before it loads an app
flower = time.perf_counter()
from restwise.client.app import app
loaded = time.perf_counter()
from flwr.supercore.task_identity import TaskIdentity
with open(sys.argv[1], "rb") as fh:
    message, context = pickle.load(fh)
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = context.run_id, context.node_id, 1
reply = app(message, context)
done = time.perf_counter()
print(json.dumps({"flower_import_s": flower - start, "app_import_s": loaded - flower, "handle_s": done - loaded,
                  "torch": "torch" in sys.modules, "error": reply.has_error(),
                  "records": [] if reply.has_error() else sorted(reply.content.keys())}))
"""


def cold_start(root: Path, fleet: Path, nodes: int, repeats: int) -> list[dict]:
    """Capture one device's (message, context) at every stage of a setup round and a fast
    round of an in-process session over real stores, then answer each in a fresh process."""
    ensure_task_identity()
    app = make_client_app()
    node_ids = [7000 + i for i in range(nodes)]
    captured: dict[str, bytes] = {}

    def capturing(message, context):
        record = message.content.get("secagg.server")
        if context.node_id == node_ids[0] and record is not None:
            label = f"{record['stage']} (round {record['round']})"
            captured.setdefault(label, pickle.dumps((message, context)))  # before the mod changes either
        return app(message, context)

    grid = InProcessGrid(capturing, node_ids)
    for i, node in enumerate(node_ids):
        grid.contexts[node] = Context(run_id=1, node_id=node, state=RecordDict(), run_config={}, node_config={
            "store": str(fleet / f"device-{i:05d}"), "keystore": str(fleet / "keystore")})
    rounds = RestwiseRounds(bench_config(nodes, 3), node_ids, root)
    for r in (1, 2):
        result = rounds.round(grid, r)
        if result.aborted:
            raise SystemExit(f"cold start capture: round {r} aborted: {result.reason}")
    rows = []
    for label, blob in captured.items():
        path = root / "cold.pkl"
        path.write_bytes(blob)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300)
            wall = time.perf_counter() - start
            if out.returncode != 0:
                raise SystemExit(f"cold start of {label} failed: {out.stderr[-2000:]}")
            samples.append({**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": wall})
        rows.append({"stage": label, **{k: statistics.median(s[k] for s in samples) for k in
                                        ("wall_s", "flower_import_s", "app_import_s", "handle_s")},
                     "torch": samples[0]["torch"], "error": samples[0]["error"], "records": samples[0]["records"]})
    path.unlink(missing_ok=True)
    return rows


def in_process(root: Path, nodes: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(wall s, CPU s) per round of each variant over the in-process Grid, N real devices."""
    import deployment_apps as A  # noqa: PLC0415 - the same module the Flower apps load, here in-process

    ensure_task_identity()
    fleet = root / "fleet"
    prepare_bench_fleet(fleet, bench_config(nodes, rounds), demo_days=90)
    node_ids = [9000 + i for i in range(nodes)]

    def grid_for(app) -> InProcessGrid:
        grid = InProcessGrid(app, node_ids)
        for i, node in enumerate(node_ids):
            grid.contexts[node] = Context(run_id=1, node_id=node, state=RecordDict(), run_config={}, node_config={
                "store": str(fleet / f"device-{i:05d}"), "keystore": str(fleet / "keystore")})
        return grid

    out: dict[str, list[tuple[float, float]]] = {"plain": [], "restwise": []}
    config = bench_config(nodes, rounds)
    grid = grid_for(A.plain_client)
    ckpt = A.initial_checkpoint(config)
    arrays = A.wire.arrays_record(ckpt.arrays)
    train = A.ConfigRecord({"model": ckpt.model, "model_config": ckpt.model_config, "local_epochs": config.local_epochs,
                            "learning_rate": config.learning_rate, "batch_size": config.batch_size, "seed": 7})
    strategy = A.FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        arrays = strategy.start(grid, arrays, num_rounds=1, train_config=train, timeout=600.0).arrays
        out["plain"].append((time.perf_counter() - wall, time.process_time() - cpu))
    grid = grid_for(make_client_app())
    restwise = RestwiseRounds(config, node_ids, root)
    for r in range(1, rounds + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        result = restwise.round(grid, r)
        if result.aborted:
            raise SystemExit(f"in-process restwise round {r} aborted: {result.reason}")
        out["restwise"].append((time.perf_counter() - wall, time.process_time() - cpu))
    return out


def stage_means(variant: str, lines: list[dict]) -> dict[str, float]:
    """Each stage's mean seconds over rounds 2..R, and what the stages leave of the round."""
    counted = lines[1:]
    if variant == "plain":
        # one message per device: the node's poll, the ClientApp, Flower's 3-s reply poll, FedAvg
        return {"train (one message per device)": statistics.mean(r["seconds"] for r in counted)}
    names = list(dict.fromkeys(name for r in counted for name in r.get("stages", {})))
    out = {name: statistics.mean(r.get("stages", {}).get(name, 0.0) for r in counted) for name in names}
    out["rest (budget check, ledger, checkpoint)" if variant == "restwise" else "rest"] = statistics.mean(
        r["seconds"] - sum(r.get("stages", {}).values()) for r in counted)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per variant; the first is not counted")
    parser.add_argument("--variants", nargs="*", default=["plain", "restwise"], choices=sorted(VARIANTS))
    parser.add_argument("--superexec-poll", type=float, default=None,
                        help=f"FLWR_SUPEREXEC_TASK_POLL_INTERVAL for the SuperLink and every SuperNode (Restwise's "
                             f"default: {D.SUPEREXEC_TASK_POLL_S} s; Flower's: 1.0 s)")
    parser.add_argument("--cold-start-repeats", type=int, default=3)
    parser.add_argument("--cold-start-only", action="store_true")
    parser.add_argument("--timeout", type=float, default=900.0, help="per variant")
    parser.add_argument("--keep", type=Path, default=None, help="keep the deployment's folder (logs) here")
    parser.add_argument("--in-process", type=int, default=None, metavar="N",
                        help="instead of a deployment: both variants over the in-process Grid with N devices (CPU)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round is not counted)")
    root = Path(tempfile.mkdtemp(prefix="restwise-deploy-bench-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    deployment = None
    if args.in_process:
        runs = in_process(root, args.in_process, args.rounds)
        print(f"in-process Grid, {args.in_process} devices with real stores; CPU = process CPU seconds (every device "
              f"runs in this process); mean of rounds 2..{args.rounds}")
        print(f"{'nodes':>6} {'variant':>9} {'s/round':>9} {'x plain':>8} {'CPU s':>7} {'x plain':>8}  note")
        base_wall = statistics.mean(w for w, _ in runs["plain"][1:])
        base_cpu = statistics.mean(c for _, c in runs["plain"][1:])
        for variant, values in runs.items():
            wall = statistics.mean(w for w, _ in values[1:])
            cpu = statistics.mean(c for _, c in values[1:])
            note = "round 1 (setup) not counted" if variant == "restwise" else ""
            print(f"{args.in_process:>6} {variant:>9} {wall:>9.2f} {wall / base_wall:>8.2f} {cpu:>7.2f} "
                  f"{cpu / base_cpu:>8.2f}  {note}")
        return 0
    try:
        if not args.cold_start_only:
            load_before = os.getloadavg()
            meter = CpuMeter()
            deployment = Deployment(root, args.nodes, args.rounds, args.superexec_poll)
            print(f"SuperLink (TLS, node auth) + {args.nodes} SuperNodes on 127.0.0.1 ready in "
                  f"{deployment.setup_s:.1f} s; Flower settings for both variants: SuperExec task poll "
                  f"{deployment.task_poll_s:g} s, no telemetry, isolation subprocess (a process per message); "
                  f"mean of rounds 2..{args.rounds}")
            for variant in args.variants:
                rows[variant] = deployment.run(variant, args.rounds, args.timeout)
            print(f"{'nodes':>6} {'variant':>9} {'s/round':>9} {'x plain':>8}  note")
            base = statistics.mean(r["seconds"] for r in rows["plain"][1:]) if "plain" in rows else None
            for variant, lines in rows.items():
                sec = statistics.mean(r["seconds"] for r in lines[1:])
                ratio = f"{sec / base:.2f}" if base else "-"
                note = f"round 1 {lines[0]['seconds']:.1f} s"
                if variant == "restwise":
                    note = (f"`restwise server run` (ledger, checkpoint, progress; report after the rounds; "
                            f"{deployment.server_run_s:.0f} s in all); round 1 = setup {lines[0]['seconds']:.1f} s, "
                            f"then {'/'.join(sorted({str(r.get('mode')) for r in lines[1:]}))} rounds"
                            + ("; FAILED rounds" if any(r["aborted"] for r in lines) else ""))
                elif variant == "driver":
                    stages = lines[-1]["stages"]
                    note = (f"ServerApp: benchmark-only Grid driver (no ledger); round 1 = setup "
                            f"{lines[0]['seconds']:.1f} s ({lines[0]['messages']} messages), then "
                            f"{'/'.join(sorted({r['mode'] for r in lines[1:]}))} rounds of "
                            f"{max(r['messages'] for r in lines[1:])} messages; last stages {json.dumps(stages)}"
                            + ("; ABORTED rounds" if any(r["aborted"] for r in lines) else ""))
                print(f"{args.nodes:>6} {variant:>9} {sec:>9.2f} {ratio:>8}  {note}", flush=True)
            if "restwise" in rows:
                sec = statistics.mean(r["seconds"] for r in rows["restwise"][1:])
                verdicts = [f"<= 10 s per secure round with {args.nodes} SuperNodes: {sec:.2f} s -> "
                            + ("met" if sec <= 10 else "NOT met")]
                if base:
                    verdicts.append(f"<= 1.5 x plain: {sec / base:.2f} x -> " + ("met" if sec / base <= 1.5 else "NOT met"))
                print("targets: " + "; ".join(verdicts))
            print(f"\nper stage, s (mean of rounds 2..{args.rounds}):")
            for variant, lines in rows.items():
                print(f"{variant:>9}  " + "  ".join(f"{name} {sec:.2f}" for name, sec in stage_means(variant, lines).items()))
            meter.stop()
            print(f"\nCPU s per round by process (rounds 2..{args.rounds}; all on this machine's "
                  f"{os.cpu_count()} cores):")
            for variant in rows:
                if variant in deployment.windows:
                    used = meter.between(*deployment.windows[variant])
                    print(f"{variant:>9}  " + "  ".join(f"{k} {v / (args.rounds - 1):.1f}"
                                                        for k, v in sorted(used.items(), key=lambda kv: -kv[1])))
            load_after = os.getloadavg()
            print(f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
                  f"{'/'.join(f'{x:.1f}' for x in load_after)} on {os.cpu_count()} cores")
        fleet = deployment.fleet if deployment is not None else root / "fleet"
        if deployment is None:
            prepare_bench_fleet(fleet, bench_config(args.nodes, 3), demo_days=90)
        if deployment is not None:
            deployment.stop()
            deployment = None
        print(f"\nClientApp cold start per stage (fresh interpreter; median of {args.cold_start_repeats}; "
              f"Flower's Runtime API round trips and FAB install excluded)")
        print(f"{'stage':>30} {'wall s':>7} {'flower':>7} {'app':>6} {'handle':>7} torch")
        for row in cold_start(root, fleet, args.nodes, args.cold_start_repeats):
            print(f"{row['stage']:>30} {row['wall_s']:>7.2f} {row['flower_import_s']:>7.2f} {row['app_import_s']:>6.2f} "
                  f"{row['handle_s']:>7.2f} {'yes' if row['torch'] else 'no'}"
                  + ("  (error reply)" if row["error"] else ""), flush=True)
    finally:
        if deployment is not None:
            deployment.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
