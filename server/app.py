"""The Restwise ServerApp: DP-FedAvg with secure aggregation on Flower's Message API.

One round (``FederatedServer.run_round``)::

    budget check (before anything is sent)      refuse -> ledger BudgetRefusalEvent, status refused
    wait for nodes (bounded), sample a cohort   Poisson(q) or fixed-size m of N
    hello: run id + round -> participate?       consent and enough data, decided on the device
    secure_sum over the participants            each sends clip(update) + noise share, masked
        aborted (too many dropouts)             nothing released; ledger AuditEvent round.failed
    release: global += (sum + central noise) / expected cohort      (fixed denominator)
    ledger GaussianRoundEvent (actual survivors, actual noise std) BEFORE the checkpoint
    checkpoint (atomic), rounds.jsonl, state.json

Privacy analysis (see docs/federated.md):

* Sampling. ``poisson``: every device is in a round's cohort independently with probability q,
  accounted as Poisson subsampling under add/remove-one-person adjacency (amplification
  claimed; the accountant also reports the epsilon against a server that knows the cohort).
  ``fixed``: m of the N devices uniformly without replacement, accounted under replace-one
  adjacency *without* amplification (no tight amplified analysis exists in dp_accounting).
  Sampling randomness comes from the OS (``secrets``), never from the run's seed.
* Noise. The noise multiplier z is given or calibrated from (target epsilon, delta) for the
  planned rounds. Distributed: devices add shares sized for t_min (t_min - 1 under add/remove:
  a person's own share is never counted), the fewest survivors the
  secure-aggregation round may release with; a release with m survivors carries noise std
  z C sqrt(m' / d) >= z C (m' the shares counted for one person, d the divisor) and is accounted with exactly that. Central: the server adds
  N(0, (z C)^2) to the sum.
* The update uses a fixed denominator (the expected cohort), so one person changes the
  released model by at most C / expected cohort. The survivor count is released (it is in
  the ledger and the round metrics) and treated as public metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from restwise.privacy import egress as E
from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.dp_mods import DP_RECORD, DPRoundParams, add_central_noise, noise_rng, total_noise_std
from restwise.privacy.events import counted_noise_shares
from restwise.privacy.events import AuditEvent, BudgetRefusalEvent, GaussianRoundEvent, ReleaseSpec
from restwise.server.runconfig import RunConfig

_log = logging.getLogger(__name__)

# Shared with the ClientApp (client/app.py); repeated here because client and server never
# import each other. tests/test_federated_app.py checks they agree.
GLOBAL_RECORD = "restwise.global"
TRAIN_RECORD = "restwise.train"
MIN_COHORT = 3  # secure aggregation needs at least 3 devices
STATUSES = ("pending", "running", "completed", "failed", "stopped", "refused")


class FederationError(Exception):
    """Base of the server-side federation errors.

        FederationError
        ├── RunStateError      the run directory's files are inconsistent or unreadable
        └── PlanError          the configuration cannot be run privately as given
    """


class RunStateError(FederationError):
    pass


class PlanError(FederationError):
    pass


# -- files of a run directory -----------------------------------------------------------
def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@dataclass
class RunFiles:
    """The runner's file contract (see server/runner.py)."""

    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "config.json"

    @property
    def state(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def rounds(self) -> Path:
        return self.run_dir / "rounds.jsonl"

    @property
    def ledger(self) -> Path:
        return self.run_dir / "ledger.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint"

    @property
    def stop_file(self) -> Path:
        return self.run_dir / "STOP"

    def read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"status": "pending", "reason": None, "current_round": 0}
        except (OSError, ValueError) as exc:
            raise RunStateError(f"{self.state} is unreadable ({type(exc).__name__})") from None

    def write_state(self, status: str, *, reason: str | None = None, current_round: int = 0, **extra: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        body = {"status": status, "reason": reason, "current_round": int(current_round), "updated_at": time.time(), **extra}
        atomic_write(self.state, (json.dumps(body, sort_keys=True) + "\n").encode("utf-8"))

    def round_lines(self) -> list[dict[str, Any]]:
        if not self.rounds.exists():
            return []
        out = []
        for line in self.rounds.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line after a crash
        return out

    def append_round(self, line: dict[str, Any]) -> None:
        existing = {(d.get("round"), d.get("attempt", 0)) for d in self.round_lines()}
        if (line.get("round"), line.get("attempt", 0)) in existing:
            return
        with open(self.rounds, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def stop_requested(self) -> bool:
        return self.stop_file.exists()


@dataclass(frozen=True)
class Checkpoint:
    round: int  # the last completed round (0: the initial model)
    arrays: list[np.ndarray]
    model_config: str  # ModelConfig json
    meta: dict

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        header = json.dumps({"format": "restwise-checkpoint-1", "round": self.round, "model_config": self.model_config, "meta": self.meta})
        np.savez(buf, header=np.frombuffer(header.encode("utf-8"), dtype=np.uint8), **{f"s{i:03d}": a for i, a in enumerate(self.arrays)})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Checkpoint":
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode("utf-8"))
                if header.get("format") != "restwise-checkpoint-1":
                    raise RunStateError("not a Restwise checkpoint")
                names = sorted(k for k in z.files if k != "header")
                arrays = [np.array(z[k]) for k in names]
        except RunStateError:
            raise
        except Exception as exc:  # noqa: BLE001 - damaged file
            raise RunStateError(f"the checkpoint cannot be read ({type(exc).__name__})") from None
        return cls(int(header["round"]), arrays, str(header["model_config"]), dict(header.get("meta", {})))

    def model_hash(self) -> str:
        h = hashlib.sha256()
        for a in self.arrays:
            h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
        return h.hexdigest()


# -- the privacy plan --------------------------------------------------------------------
@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float  # z, per round (the planned minimum; actual rounds carry >= z C)
    adjacency: str
    claim_amplification: bool
    sampling: str
    sampling_rate: float
    budget_epsilon: float
    delta: float
    planned_epsilon: float
    calibrated: bool

    def accountant(self) -> PrivacyAccountant:
        return PrivacyAccountant(claim_amplification=self.claim_amplification)

    def spec(self, config: RunConfig, noise_multiplier: float | None = None) -> ReleaseSpec:
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        if config.sampling == "poisson":
            return ReleaseSpec.plan(noise_multiplier=z, sampling="poisson", adjacency=self.adjacency, sampling_rate=config.sampling_rate)
        return ReleaseSpec.plan(
            noise_multiplier=z, sampling="fixed", adjacency=self.adjacency,
            cohort_size=config.cohort_size, population=config.population,
        )


def plan_privacy(config: RunConfig) -> PrivacyPlan:
    """Noise multiplier (given or calibrated), adjacency and budget for a run."""
    from restwise.privacy.calibration import calibrate_noise_multiplier

    if config.sampling == "poisson":
        adjacency, amplify = "add_remove", True
    else:
        adjacency, amplify = "replace_one", False
    accountant = PrivacyAccountant(claim_amplification=amplify)
    kwargs = dict(sampling=config.sampling, adjacency=adjacency)
    if config.sampling == "poisson":
        kwargs["sampling_rate"] = config.sampling_rate
    else:
        kwargs.update(cohort_size=config.cohort_size, population=config.population)
    if config.noise_multiplier is None:
        result = calibrate_noise_multiplier(
            config.target_epsilon, config.delta, config.rounds, accountant=accountant, **kwargs
        )
        z, planned, budget, calibrated = result.noise_multiplier, result.result.epsilon, float(config.target_epsilon), True
    else:
        z = float(config.noise_multiplier)
        spec = ReleaseSpec.plan(noise_multiplier=z, **kwargs)
        planned = accountant.epsilon_for_rounds(spec, config.rounds, config.delta).epsilon
        budget, calibrated = planned, False
    return PrivacyPlan(
        noise_multiplier=z, adjacency=adjacency, claim_amplification=amplify, sampling=config.sampling,
        sampling_rate=config.sampling_probability, budget_epsilon=budget, delta=config.delta,
        planned_epsilon=planned, calibrated=calibrated,
    )


# -- the model ---------------------------------------------------------------------------
def initial_checkpoint(config: RunConfig) -> Checkpoint:
    from restwise.models.features import model_feature_names
    from restwise.models.network import ModelConfig, build_model, shared_arrays

    cfg = ModelConfig(n_features=len(model_feature_names()), window=7, seed=int(config.seed % (2**31)))
    model = build_model(cfg)
    return Checkpoint(0, [a.astype(np.float32) for a in shared_arrays(model)], cfg.to_json(), {})


def _flatten(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.astype(np.float64).reshape(-1) for a in arrays])


def _unflatten(vector: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    out, i = [], 0
    for a in like:
        n = a.size
        out.append(vector[i : i + n].reshape(a.shape).astype(np.float32))
        i += n
    return out


# -- messaging helpers --------------------------------------------------------------------
def wait_for_nodes(grid: Grid, want: int, timeout_s: float, should_stop: Callable[[], bool] = lambda: False) -> list[int]:
    """Node ids once ``want`` are connected or ``timeout_s`` passed (never waits forever)."""
    deadline = time.monotonic() + timeout_s
    nodes = sorted(int(n) for n in grid.get_node_ids())
    while len(nodes) < want and time.monotonic() < deadline and not should_stop():
        time.sleep(0.1)
        nodes = sorted(int(n) for n in grid.get_node_ids())
    return nodes


def exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, group_id: str, timeout_s: float) -> dict[int, Message]:
    """Send one message per node; collect the first reply of each until the deadline."""
    messages = [
        Message(content, dst_node_id=node, message_type=message_type, group_id=group_id, ttl=timeout_s + 30.0)
        for node, content in contents.items()
    ]
    ids = {mid: node for mid, node in zip(grid.push_messages(messages), contents)}
    pending = set(ids)
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout_s
    wait = 0.005
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        for reply in got:
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                replies.setdefault(ids[mid], reply)
        if pending:
            time.sleep(wait if not got else 0.005)
            wait = min(wait * 1.5, 0.1)
    return replies


# -- the server ---------------------------------------------------------------------------
@dataclass
class RoundOutcome:
    round: int
    status: str  # released | failed | refused | stopped
    sampled: int = 0
    participants: int = 0
    survived: int = 0
    dropped: int = 0
    train_loss: float | None = None
    epsilon: float | None = None
    epsilon_no_amplification: float | None = None
    delta: float | None = None
    noise_multiplier_effective: float | None = None
    noise_std_total: float | None = None
    reason: str | None = None
    attempt: int = 0
    seconds: float = 0.0

    def line(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = {"released": "completed"}.get(self.status, self.status)
        return d


@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    status: str
    reason: str | None
    rounds_completed: int
    epsilon: float | None
    delta: float
    noise_multiplier: float
    rounds: list[RoundOutcome] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


class FederatedServer:
    """Runs a Restwise federation over any Flower ``Grid`` (simulation or deployment).

    ``ledger`` is a :class:`restwise.privacy.ledger.PrivacyLedger`. ``mode``: "private" (the
    full stack) or "plain" (FedAvg with no privacy at all: benchmarks only - requires the
    devices' plain app)."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        *,
        run_id: str,
        ledger,
        should_stop: Callable[[], bool] | None = None,
        node_wait_s: float = 30.0,
        sampling_rng: np.random.Generator | None = None,
        mode: str = "private",
        hello_timeout_s: float | None = None,
    ):
        if mode not in ("private", "plain"):
            raise ValueError("mode must be 'private' or 'plain'")
        self.config = config
        self.files = RunFiles(Path(run_dir))
        self.run_id = run_id
        self.ledger = ledger
        self._should_stop = should_stop or (lambda: False)
        self.node_wait_s = node_wait_s
        self.rng = sampling_rng or np.random.default_rng(secrets.randbits(128))
        self.mode = mode
        self.hello_timeout_s = hello_timeout_s or min(config.round_timeout_s, 120.0)
        self.plan = plan_privacy(config) if mode == "private" else None
        self.outcomes: list[RoundOutcome] = []

    # -- control --------------------------------------------------------------------------
    def should_stop(self) -> bool:
        return self._should_stop() or self.files.stop_requested()

    def load_checkpoint(self) -> Checkpoint:
        if self.files.checkpoint.exists():
            return Checkpoint.from_bytes(self.files.checkpoint.read_bytes())
        return initial_checkpoint(self.config)

    # -- the run --------------------------------------------------------------------------
    def run(self, grid: Grid) -> RunSummary:
        ckpt = self.load_checkpoint()
        # Rounds are numbered 1..rounds; failed rounds use up their number (nothing released).
        next_round = self._next_round(ckpt)
        self.files.write_state("running", current_round=next_round - 1, run_id=self.run_id)
        status, reason = "completed", None
        for rnd in range(next_round, self.config.rounds + 1):
            if self.should_stop():
                status, reason = "stopped", "stop requested"
                break
            outcome, ckpt = self.run_round(grid, rnd, ckpt)
            self.outcomes.append(outcome)
            self.files.append_round(outcome.line())
            if outcome.status == "refused":
                status, reason = "refused", outcome.reason
                break
            self.files.write_state("running", current_round=rnd, run_id=self.run_id, last_round_status=outcome.line()["status"])
        else:
            if not any(o.status == "released" for o in self._all_outcomes()):
                status, reason = "failed", "no round could be released"
        done = ckpt.round
        self.files.write_state(status, reason=reason, current_round=self._last_round_number(), run_id=self.run_id, completed_rounds=done)
        return self.summary(status, reason, ckpt)

    def _all_outcomes(self) -> list[RoundOutcome]:
        seen = [RoundOutcome(**{k: v for k, v in d.items() if k in RoundOutcome.__dataclass_fields__}) for d in self.files.round_lines()]
        for o in seen:
            if o.status == "completed":
                o.status = "released"
        return seen

    def _last_round_number(self) -> int:
        lines = self.files.round_lines()
        return max((int(d.get("round", 0)) for d in lines), default=0)

    def _next_round(self, ckpt: Checkpoint) -> int:
        """After the checkpoint's round, and after any failed round already recorded."""
        return max(ckpt.round, self._last_round_number()) + 1

    def summary(self, status: str, reason: str | None, ckpt: Checkpoint) -> RunSummary:
        eps = None
        if self.mode == "private":
            releases = self.ledger.releases(self.run_id)
            if releases:
                eps = self.plan.accountant().epsilon(releases, self.config.delta).epsilon
        return RunSummary(
            run_id=self.run_id, run_dir=self.files.run_dir, status=status, reason=reason,
            rounds_completed=ckpt.round, epsilon=eps, delta=self.config.delta,
            noise_multiplier=self.plan.noise_multiplier if self.plan else 0.0, rounds=list(self.outcomes),
        )

    # -- one round ------------------------------------------------------------------------
    def sample(self, nodes: list[int]) -> list[int]:
        cfg = self.config
        if cfg.sampling == "poisson":
            keep = self.rng.random(len(nodes)) < cfg.sampling_rate
            return [n for n, k in zip(nodes, keep) if k]
        m = min(cfg.cohort_size, len(nodes))
        # Pick indices, not ids: real node ids are unsigned 64-bit integers, and numpy would
        # turn a list holding ids on both sides of 2**63 into float64, losing their low bits.
        picked = self.rng.choice(len(nodes), size=m, replace=False)
        return sorted(int(nodes[int(i)]) for i in picked)

    def _release_attempt(self, rnd: int) -> int:
        return sum(1 for e in self.ledger.releases(self.run_id) if e.round == rnd)

    def run_round(self, grid: Grid, rnd: int, ckpt: Checkpoint) -> tuple[RoundOutcome, Checkpoint]:
        started = time.perf_counter()
        cfg = self.config
        outcome = RoundOutcome(round=rnd, status="failed", delta=cfg.delta)
        if self.mode == "private":
            attempt = self._release_attempt(rnd)
            outcome.attempt = attempt
            refusal = self._check_budget(rnd)
            if refusal is not None:
                outcome.status, outcome.reason = "refused", refusal
                return outcome, ckpt
        want = cfg.device_count
        nodes = wait_for_nodes(grid, want, self.node_wait_s, self.should_stop)
        cohort = self.sample(nodes)
        outcome.sampled = len(cohort)
        if self.mode == "plain":
            return self._plain_round(grid, rnd, ckpt, cohort, outcome, started)
        participants = self._hello(grid, rnd, cohort)
        outcome.participants = len(participants)
        if len(participants) < MIN_COHORT:
            return self._fail(outcome, ckpt, f"only {len(participants)} of {len(cohort)} sampled devices can take part (at least {MIN_COHORT} needed)", started)
        from restwise.privacy.secagg.errors import SecAggConfigError
        from restwise.privacy.secagg.workflow import secure_sum

        try:
            sa_config = self.secagg_config(len(participants))
            t_min = sa_config.round_parameters(len(participants))[2]
        except SecAggConfigError as exc:
            return self._fail(outcome, ckpt, f"secure aggregation refused the round: {exc}", started)
        placement = cfg.noise
        # Distributed noise is sized so that the shares that protect one person at the
        # smallest releasable cohort (t_min survivors) add up to exactly z C: under add/remove
        # that is the other t_min - 1 devices' shares (a person's own share is not relied on).
        divisor = counted_noise_shares(t_min, self.plan.adjacency) if placement == "distributed" else 1
        params = DPRoundParams(
            clip_norm=cfg.clip_norm, noise_multiplier=self.plan.noise_multiplier,
            placement=placement, noise_divisor=divisor,
        )
        content = self.train_content(rnd, ckpt, params)
        vector_length = sum(a.size for a in ckpt.arrays)
        result = secure_sum(grid, participants, content, sa_config, round=rnd, vector_length=vector_length)
        outcome.dropped = len(cohort) - len(result.survivors)
        if result.aborted or result.total is None:
            return self._fail(outcome, ckpt, f"secure aggregation aborted: {result.reason}", started)
        m = len(result.survivors)
        outcome.survived = m
        total = np.asarray(result.total, dtype=np.float64)
        if placement == "central":
            total = add_central_noise(total, self.plan.noise_multiplier, cfg.clip_norm, noise_rng())
            std = self.plan.noise_multiplier * cfg.clip_norm
        else:
            std = total_noise_std(
                self.plan.noise_multiplier, cfg.clip_norm,
                counted_noise_shares(m, self.plan.adjacency), divisor,
            )
        new_flat = _flatten(ckpt.arrays) + total / max(cfg.expected_cohort, 1.0)
        new_ckpt = Checkpoint(rnd, _unflatten(new_flat, ckpt.arrays), ckpt.model_config, {"run_id": self.run_id})
        event = GaussianRoundEvent(
            run_id=self.run_id, round=rnd, noise_multiplier=std / cfg.clip_norm, clip_norm=cfg.clip_norm,
            sampling=self._event_sampling(), sampling_rate=self._event_rate(), cohort_size=self._event_cohort(len(cohort), m),
            population=cfg.population, adjacency=self.plan.adjacency, planned_clients=len(cohort), survivors=m,
            noise_std_total=std, model_hash=new_ckpt.model_hash(), attempt=outcome.attempt,
        )
        # The ledger first: a computed noised aggregate is accounted whatever happens next.
        self.ledger.append(event)
        atomic_write(self.files.checkpoint, new_ckpt.to_bytes())
        acc = self.plan.accountant().epsilon(self.ledger.releases(self.run_id), cfg.delta)
        outcome.status = "released"
        outcome.epsilon, outcome.epsilon_no_amplification = acc.epsilon, acc.epsilon_no_amplification
        outcome.noise_multiplier_effective, outcome.noise_std_total = std / cfg.clip_norm, std
        outcome.train_loss = result.metrics.get("train_loss")
        outcome.seconds = time.perf_counter() - started
        _log.info("round %d released: %d of %d sampled survived, epsilon %.4g", rnd, m, len(cohort), acc.epsilon)
        return outcome, new_ckpt

    def _event_sampling(self) -> str:
        return self.config.sampling

    def _event_rate(self) -> float:
        return self.config.sampling_probability

    def _event_cohort(self, sampled: int, survivors: int) -> int:
        if self.config.sampling == "fixed":
            return int(self.config.cohort_size)
        return max(sampled, survivors, 1)

    def _fail(self, outcome: RoundOutcome, ckpt: Checkpoint, reason: str, started: float) -> tuple[RoundOutcome, Checkpoint]:
        outcome.status, outcome.reason = "failed", reason
        outcome.seconds = time.perf_counter() - started
        _log.warning("round %d failed: %s", outcome.round, reason)
        if self.mode == "private":
            self.ledger.append(
                AuditEvent(
                    actor="restwise-server", action="round.failed", target=self.run_id,
                    details={"round": outcome.round, "attempt": outcome.attempt, "sampled": outcome.sampled,
                             "participants": outcome.participants, "survivors": outcome.survived,
                             "released": False, "reason": reason[:500]},
                )
            )
            releases = self.ledger.releases(self.run_id)
            if releases:
                outcome.epsilon = self.plan.accountant().epsilon(releases, self.config.delta).epsilon
            else:
                outcome.epsilon = 0.0
        return outcome, ckpt

    def _check_budget(self, rnd: int) -> str | None:
        """Refuse the round (ledger entry) if its worst-case release would exceed the budget.
        The worst case is m = t_min survivors: noise std exactly z C."""
        from restwise.privacy.budget import PrivacyBudget
        from restwise.privacy.errors import BudgetExceededError

        budget = PrivacyBudget(epsilon=self.plan.budget_epsilon * (1 + 1e-9), delta=self.config.delta)
        try:
            budget.check_next_round(
                self.ledger.releases(self.run_id), self.plan.spec(self.config),
                run_id=self.run_id, round=rnd, accountant=self.plan.accountant(),
            )
        except BudgetExceededError as exc:
            self.ledger.append(BudgetRefusalEvent.from_error(exc, run_id=self.run_id, round=rnd))
            return str(exc)
        return None

    def secagg_config(self, n: int):
        from restwise.privacy.secagg.config import SecAggConfig

        cfg = self.config
        # Largest per-device noise std of the round (shares are sized for min_survivors, or
        # min_survivors - 1 under add/remove): the encoding range must hold 12 of them.
        share = self.plan.noise_multiplier * cfg.clip_norm / math.sqrt(max(1, n - math.floor(cfg.max_dropout_fraction * n) - 1))
        clip_range = cfg.clip_norm + (12.0 * share if cfg.noise == "distributed" else 0.0)
        return SecAggConfig(
            num_neighbours=cfg.secagg_num_neighbours,
            threshold=cfg.secagg_threshold,
            max_dropout_fraction=cfg.max_dropout_fraction,
            clip_range=float(clip_range * (1 + 1e-6)),
            max_cohort=max(MIN_COHORT, cfg.device_count, n),
            timeout_s=cfg.round_timeout_s,
            metric_keys=E.EgressPolicy().metric_keys,
        )

    def run_record(self, rnd: int) -> ConfigRecord:
        return ConfigRecord({"run_id": self.run_id, "round": int(rnd), "window": 7})

    def train_content(self, rnd: int, ckpt: Checkpoint, params: DPRoundParams | None) -> RecordDict:
        cfg = self.config
        content = RecordDict(
            {
                E.RUN_RECORD: self.run_record(rnd),
                GLOBAL_RECORD: ArrayRecord({f"s{i:03d}": _array(a) for i, a in enumerate(ckpt.arrays)}),
                TRAIN_RECORD: ConfigRecord(
                    {
                        "model_config": ckpt.model_config, "local_epochs": cfg.local_epochs,
                        "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size,
                        "seed": int(cfg.seed % (2**31)),
                    }
                ),
            }
        )
        if params is not None:
            content[DP_RECORD] = params.to_record()
        return content

    def _hello(self, grid: Grid, rnd: int, cohort: list[int]) -> list[int]:
        contents = {n: RecordDict({E.RUN_RECORD: self.run_record(rnd)}) for n in cohort}
        replies = exchange(grid, contents, E.HELLO_MESSAGE_TYPE, f"hello-{rnd}", self.hello_timeout_s)
        out = []
        for node, reply in replies.items():
            if reply.has_error():
                continue
            rec = reply.content.config_records.get(E.CONSENT_RECORD)
            if rec is not None and rec.get("participate") is True:
                out.append(node)
        return sorted(out)

    # -- plain FedAvg (benchmark baseline only) -------------------------------------------
    def _plain_round(self, grid, rnd, ckpt, cohort, outcome, started):
        if not cohort:
            return self._fail(outcome, ckpt, "no devices sampled", started)
        content = self.train_content(rnd, ckpt, None)
        replies = exchange(grid, {n: content for n in cohort}, "train", f"plain-{rnd}", self.config.round_timeout_s)
        vectors, losses = [], []
        for reply in replies.values():
            if reply.has_error():
                continue
            arrays = reply.content.array_records.get("update")
            if arrays is None or "vector" not in arrays:
                continue
            vectors.append(arrays["vector"].numpy())
            metrics = reply.content.metric_records.get("metrics")
            if metrics is not None and "train_loss" in metrics:
                losses.append(float(metrics["train_loss"]))
        if not vectors:
            return self._fail(outcome, ckpt, "no device replied", started)
        mean = np.mean(np.stack(vectors), axis=0)
        new_ckpt = Checkpoint(rnd, _unflatten(_flatten(ckpt.arrays) + mean, ckpt.arrays), ckpt.model_config, {})
        atomic_write(self.files.checkpoint, new_ckpt.to_bytes())
        outcome.status, outcome.survived = "released", len(vectors)
        outcome.dropped = len(cohort) - len(vectors)
        outcome.train_loss = float(np.mean(losses)) if losses else None
        outcome.seconds = time.perf_counter() - started
        return outcome, new_ckpt


def _array(a: np.ndarray):
    from flwr.app import Array

    return Array(np.asarray(a, dtype=np.float32))


# -- Flower entry points -------------------------------------------------------------------
def open_ledger(run_dir: Path, config: RunConfig):
    """The run's signed ledger: key from ``config.audit_key_path`` or ``run_dir/../audit_key.pem``
    (created on first use, mode 0600); the public key is written next to the ledger."""
    from restwise.privacy.ledger import PrivacyLedger, export_public_key, load_or_create_audit_key

    key_path = Path(config.audit_key_path) if config.audit_key_path else Path(run_dir).resolve().parent / "audit_key.pem"
    key = load_or_create_audit_key(key_path)
    pub = Path(run_dir) / "public_key.pem"
    if not pub.exists():
        export_public_key(key, pub)
    return PrivacyLedger(Path(run_dir) / "ledger.jsonl", signing_key=key)


def make_server_app(
    config: RunConfig,
    run_dir: Path,
    *,
    run_id: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_summary: Callable[[RunSummary], None] | None = None,
    mode: str = "private",
    node_wait_s: float = 30.0,
    sampling_rng: np.random.Generator | None = None,
) -> ServerApp:
    """A ServerApp bound to one run directory (used by the runner and tests)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rid = run_id or Path(run_dir).name
        ledger = open_ledger(Path(run_dir), config) if mode == "private" else None
        server = FederatedServer(
            config, Path(run_dir), run_id=rid, ledger=ledger, should_stop=should_stop,
            node_wait_s=node_wait_s, sampling_rng=sampling_rng, mode=mode,
        )
        summary = server.run(grid)
        if on_summary is not None:
            on_summary(summary)

    return app


# `flwr run .` loads this app (pyproject [tool.flwr.app.components]); the run directory comes
# from the run config: `flwr run . --run-config "run-dir='/path/to/run'"`.
app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    from restwise.server.runner import FLEET_DIR, prepare_fleet, write_report

    run_dir = context.run_config.get("run-dir")
    if not run_dir:
        raise PlanError("give the run directory: flwr run . --run-config \"run-dir='/path/to/run'\"")
    run_dir = Path(str(run_dir))
    files = RunFiles(run_dir)
    config = RunConfig.from_dict(json.loads(files.config.read_text(encoding="utf-8")))
    try:
        prepare_fleet(run_dir / FLEET_DIR, config)  # simulation only; no-op when prepared
        ledger = open_ledger(run_dir, config)
        summary = FederatedServer(config, run_dir, run_id=run_dir.name, ledger=ledger, node_wait_s=60.0).run(grid)
    except Exception as exc:  # noqa: BLE001 - `flwr run` exits 0 on a failed run: state.json says it
        files.write_state("failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        raise
    write_report(run_dir, config, summary)


__all__ = [
    "app", "make_server_app", "FederatedServer", "RunFiles", "RunSummary", "RoundOutcome", "Checkpoint",
    "PrivacyPlan", "plan_privacy", "open_ledger", "initial_checkpoint", "wait_for_nodes", "exchange",
    "GLOBAL_RECORD", "TRAIN_RECORD", "FederationError", "RunStateError", "PlanError",
]
