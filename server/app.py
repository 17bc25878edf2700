"""The Restwise ServerApp: federated rounds over Flower's Message API, orchestration only.

``FederatedServer`` does what a server must do itself: wait for nodes, sample a cohort, greet
it, send the messages, apply the released sum to the model and keep the run directory's files
(``server/rundir.py``). Every privacy step of a round - budget check, DP parameters, secure
sum, noise, ledger event, epsilon - is the release workflow's (``privacy/release.py``), which
the server wraps around its rounds as Flower wraps a strategy in its DP strategy. What the
model is - its initial shared arrays, how a released sum becomes the next model - is the
architecture's that ``RunConfig.model`` names (``models/registry.py``).

Before the first round (``FederatedServer.check_plan``): the planner's verdict on the run
(``RunConfig.plan``, the check of ``restwise privacy plan``). A DP run whose noise is expected
to swamp what it learns is refused (status refused, the numbers in the reason) unless the
configuration says ``force``; a forced plan is recorded in the ledger (AuditEvent
``plan.forced``). A plan that cannot be made (e.g. a prior file failing its checks) fails the
run before any device is contacted.

One round (``FederatedServer.run_round``)::

    release.check_budget                        refuse -> ledger BudgetRefusalEvent, status refused
    wait for nodes (bounded), sample a cohort   Poisson(q) or fixed-size m of N
    release.release: one round of the run's     the first message of a device's round carries the
      secure-aggregation session                run record: consent and enough data are decided
      (privacy/secagg, docs/secure-             there, on the device ("not taking part" otherwise);
      aggregation.md)                           a setup round (4 messages per device) when the
                                                cohort is new, else a fast round (2 messages)
        every masked input in                   ledger GaussianRoundEvent: SPENT (write-ahead,
                                                before any unmasking share is asked for)
        unmask, decode, sum bound, noise        aborted before the write-ahead entry: nothing
                                                spent; ledger AuditEvent round.failed. After it:
                                                ledger AuditEvent release.not-applied (counted)
    model = architecture.apply_release(model_config, model, released sum)   (FedAvg: / expected
                                                cohort, a fixed denominator; statistics: a solve)
    checkpoint (atomic), then ledger AuditEvent release.applied, rounds.jsonl, state.json

The session lives as long as this server object (the run, or its resumption): a resumed run
starts a new session with a setup round. At start, releases a crash left unsettled are settled
(``ReleaseWorkflow.reconcile``). One-release architectures (``delivers_model``) take the same
path: their one round is a one-round session (a setup round; devices forget it after unmask).

Progress (``progress.jsonl`` in the run folder, ``rundir.append_progress``; ``restwise server
run`` and ``runs show --watch`` render it): waiting-for-nodes, each secure-aggregation stage as
replies come in (setup, share-keys, collect-masked-input, unmask), release, deliver, report.
Counts only.

After the last round, for an architecture whose model is computed on the server
(``delivers_model``: the one-release linear head), the released model goes to every connected
device in one message (``deliver``: the arrays, the model configuration, the model hash and the
release's ledger entry); each device checks the hash, keeps the model with its own personal
part and replies with an empty message, so the server learns nothing it did not know (which
devices are connected). ``state.json`` records ``delivered``. No per-device metric is
collected: a FedAvg architecture carries each device's training loss as one value of the
clipped, noised, securely summed vector (``models/loss_slot.py``), and a round's ``train_loss``
and ``train_loss_std`` are the survivors' mean decoded from the released sum
(``architecture.release_metrics``; null for a model without one). After each round the
released losses are tested for a rise (``server/loss_trend.py``); the first rise found is one
``loss-rising`` warning in the run's events (``rundir.append_event``).

Device receipts (issue 15, ``privacy/receipts.py``, docs/privacy-accounting.md): every run
record of a private run names the ledger's public key (devices pin it); the first message of
a device's round carries the ledger entries that device is not known to have (``receipts_for``:
per node, the last seq of a message it answered, in memory for the session); the model
delivery carries them too, and a multi-round run ends with one ``receipts`` message
(``send_receipts``) to the devices that took part and still lack entries (an empty reply).

Privacy analysis: ``privacy/release.py`` and docs/federated.md. Sampling randomness comes from
the OS (``secrets``), never from the run's seed. The survivor count is released (ledger, round
metrics) and treated as public metadata.

The deployed ServerApp (``app``, what ``flwr run`` and ``restwise server run`` start) reads the
run directory from the run config and never creates stores or persons: a simulation prepares
its generated fleet itself (``restwise.simulation``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from restwise.common.errors import ModelError
from restwise.common.fsutil import atomic_write_bytes
from restwise.models.registry import ReleasedSum
from restwise.privacy import wire
from restwise.privacy.dp_mods import DPRoundParams
from restwise.privacy.ledger import public_key_hex
from restwise.privacy.receipts import segment_after
from restwise.privacy.release import MIN_COHORT, ReleaseWorkflow, plan_release
from restwise.privacy.secagg.errors import SecAggConfigError
from restwise.privacy.secagg.workflow import SecAggSession
from restwise.server.errors import PlanError
from restwise.server.loss_trend import LOSS_RISING, loss_points, loss_rise
from restwise.server.rundir import (Checkpoint, RunFiles, RunnerLock, append_event, append_progress, crash_point,
                                     finish_failed, finish_run, note_interruption, open_ledger, read_events)
from restwise.server.runconfig import RunConfig

_log = logging.getLogger(__name__)


def plan_refusal(config: RunConfig) -> str | None:
    """Why ``config`` is refused, or None when it may run: its epsilon cap first (the
    projected epsilon against the sampler above ``max_epsilon``; ``force`` does not lift it),
    then the planner (the check of ``restwise privacy plan``; unless forced). Run creation
    (service, ``restwise server run``, the simulation runner) and the ServerApp's start all
    ask this. PlanError when no plan can be made."""
    cap = config.cap_check()
    if not cap.allowed:
        return cap_refusal_reason(cap.message())
    verdict = config.plan()
    return None if verdict.allowed else refusal_reason(verdict.message)


def cap_refusal_reason(message: str) -> str:
    return f"the run's epsilon cap refuses this run: {message}"


def refusal_reason(message: str) -> str:
    return f"the planner refuses this run (set force to override): {message}"


def initial_checkpoint(config: RunConfig) -> Checkpoint:
    """Round 0: the architecture's initial shared arrays for the run's seed. PlanError when
    the architecture cannot set its model up (e.g. its shipped prior fails its checks)."""
    architecture = config.architecture
    try:
        model_config = architecture.model_config(config.seed)
        return Checkpoint(0, architecture.initial_shared(model_config), config.model, model_config, {})
    except (ValueError, ModelError) as exc:  # PriorError is a ValueError
        raise PlanError(f"the {config.model} model cannot be set up: {exc}") from None


# -- messaging helpers --------------------------------------------------------------------
def wait_for_nodes(grid: Grid, want: int, timeout_s: float, should_stop: Callable[[], bool] = lambda: False,
                   on_count: Callable[[int], None] | None = None) -> list[int]:
    """Node ids once ``want`` are connected or ``timeout_s`` passed (never waits forever).
    ``on_count(connected)``: at the start and whenever the number changes."""
    deadline = time.monotonic() + timeout_s
    nodes = sorted(int(n) for n in grid.get_node_ids())
    if on_count is not None:
        on_count(len(nodes))
    while len(nodes) < want and time.monotonic() < deadline and not should_stop():
        time.sleep(0.1)
        before, nodes = len(nodes), sorted(int(n) for n in grid.get_node_ids())
        if on_count is not None and len(nodes) != before:
            on_count(len(nodes))
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


@dataclass
class RoundOutcome:
    round: int
    status: str  # released | failed | refused | stopped
    sampled: int = 0
    participants: int = 0
    survived: int = 0
    dropped: int = 0
    train_loss: float | None = None  # the survivors' mean, released (loss slot); None: the model carries none
    train_loss_std: float | None = None  # its noise std
    spent: bool = False  # the release is in the ledger (written ahead) whether or not it was applied
    mode: str | None = None  # the secure round: setup | fast
    epsilon: float | None = None  # against the server, which drew each cohort (no amplification)
    epsilon_amplified: float | None = None  # third parties who see only the model (amplified by sampling)
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
    delivered: dict[str, Any] | None = None  # the released model's delivery (one-release models)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


class FederatedServer:
    """Runs a Restwise federation over any Flower ``Grid`` (simulation or deployment).

    ``ledger`` is the run's :class:`restwise.privacy.ledger.PrivacyLedger`. ``mode``: "private"
    (the full stack: the release workflow around every round) or "plain" (FedAvg with no
    privacy at all: benchmarks only - requires the devices' plain app)."""

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
        self.architecture = config.architecture
        self.files = RunFiles(Path(run_dir))
        self.run_id = run_id
        self._should_stop = should_stop or (lambda: False)
        self.node_wait_s = node_wait_s
        self.rng = sampling_rng or np.random.default_rng(secrets.randbits(128))
        self.mode = mode
        self.hello_timeout_s = hello_timeout_s or min(config.round_timeout_s, 120.0)
        self.release = ReleaseWorkflow(plan_release(config.release_policy()), ledger, run_id) if mode == "private" else None
        # The run's secure-aggregation session: key agreement once per epoch, then two
        # messages per device and round (privacy/secagg/workflow.py).
        self.session: SecAggSession | None = None  # created at the first private round
        self.outcomes: list[RoundOutcome] = []
        self._progress_failed = False
        # Device receipts (privacy/receipts.py): the run ledger's public key the devices pin,
        # and per node the last ledger seq it is known to have received in this session
        # (unknown: none; what it already holds comes back byte-identical and is checked).
        signing_key = getattr(ledger, "signing_key", None) if mode == "private" else None
        self.ledger_key = public_key_hex(signing_key) if signing_key is not None else None
        self.delivered_seq: dict[int, int] = {}
        self.took_part: set[int] = set()  # nodes that did not decline a round of this session

    # -- control --------------------------------------------------------------------------
    def should_stop(self) -> bool:
        return self._should_stop() or self.files.stop_requested()

    def load_checkpoint(self) -> Checkpoint:
        if not self.files.checkpoint.exists():
            return initial_checkpoint(self.config)
        ckpt = Checkpoint.from_bytes(self.files.checkpoint.read_bytes())
        if ckpt.model != self.config.model:
            raise PlanError(f"the run's checkpoint holds a {ckpt.model!r} model, its configuration names {self.config.model!r}")
        return ckpt

    # -- the run --------------------------------------------------------------------------
    def check_plan(self) -> str | None:
        """The planner's verdict before anything is sent: the reason when it refuses the run
        (not forced); a forced refusal is recorded in the ledger. PlanError when no plan can
        be made."""
        if self.release is None:
            return None  # plain FedAvg (benchmarks): no DP, nothing to plan
        cap = self.config.cap_check()
        if not cap.allowed:
            return cap_refusal_reason(cap.message())
        if cap.raised and self.release.record_raised_cap(cap):
            _log.warning("run %s: the operator raised the run's epsilon cap: %s", self.run_id, cap.message())
        verdict = self.config.plan()
        if not verdict.refused:
            return None
        if not verdict.forced:
            return refusal_reason(verdict.message)
        if self.release.record_forced_plan(verdict.message, {**verdict.numbers, "noise_to_signal": verdict.noise_to_signal,
                                                             "cohort": verdict.cohort, "epsilon": verdict.epsilon}):
            _log.warning("run %s: the operator forced a plan the planner refuses: %s", self.run_id, verdict.message)
        return None

    def progress(self, stage: str, rnd: int, attempt: int = 0, *, expected: int | None = None,
                 received: int | None = None, dropped: int | None = None) -> None:
        """One progress line (counts only). A progress file that cannot be written is logged
        once and does not stop the run: the round's own files say what happened."""
        try:
            append_progress(self.files.run_dir, stage, rnd=rnd, attempt=attempt, expected=expected,
                            received=received, dropped=dropped)
        except OSError as exc:
            if not self._progress_failed:
                _log.warning("the progress file of run %s cannot be written (%s); the run goes on", self.run_id,
                             exc.strerror)
            self._progress_failed = True

    def run(self, grid: Grid) -> RunSummary:
        ckpt = self.load_checkpoint()
        if self.release is not None:
            # A crash may have left a release spent (written ahead) and unsettled.
            for action in self.release.reconcile(ckpt.round, ckpt.model_hash() if ckpt.round >= 1 else None):
                _log.warning("run %s: a release left by an interrupted round was recorded as %s", self.run_id, action)
        # Rounds are numbered 1..rounds; failed rounds use up their number (nothing released).
        next_round = self._next_round(ckpt)
        if next_round <= self.config.rounds:
            refusal = self.check_plan()
            if refusal is not None:
                _log.warning("run %s refused: %s", self.run_id, refusal)
                self.files.write_state("refused", reason=refusal[:2000], current_round=next_round - 1, run_id=self.run_id)
                return self.summary("refused", refusal, ckpt)
        self.files.write_state("running", current_round=next_round - 1, run_id=self.run_id)
        status, reason = "completed", None
        for rnd in range(next_round, self.config.rounds + 1):
            if self.should_stop():
                status, reason = "stopped", "stop requested"
                break
            outcome, ckpt = self.run_round(grid, rnd, ckpt)
            self.outcomes.append(outcome)
            self.files.append_round(outcome.line())
            self.watch_loss(rnd)
            if outcome.status == "refused":
                status, reason = "refused", outcome.reason
                break
            self.files.write_state("running", current_round=rnd, run_id=self.run_id, last_round_status=outcome.line()["status"])
        else:
            if not any(o.status == "released" for o in self._all_outcomes()):
                status, reason = "failed", "no round could be released"
        delivered = self.files.read_state().get("delivered")
        delivering = status == "completed" and self.release is not None and self.architecture.delivers_model \
            and ckpt.round >= 1 and not (isinstance(delivered, dict) and delivered.get("model_hash") == ckpt.model_hash())
        if delivering:
            delivered = self.deliver(grid, ckpt)  # carries the receipts
        else:
            self.send_receipts(grid, self._last_round_number())
        extra = {"delivered": delivered} if isinstance(delivered, dict) else {}
        done = ckpt.round
        # Not the outcome yet: the run has that status once its report is anchored
        # (rundir.finish_run, which the runner calls next).
        self.files.write_state("finishing", reason=reason, current_round=self._last_round_number(), run_id=self.run_id,
                               completed_rounds=done, outcome=status, outcome_reason=reason, **extra)
        summary = self.summary(status, reason, ckpt)
        summary.delivered = extra.get("delivered")
        return summary

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
        spent = self.release.epsilon() if self.release else None
        return RunSummary(
            run_id=self.run_id, run_dir=self.files.run_dir, status=status, reason=reason,
            rounds_completed=ckpt.round, epsilon=None if spent is None else spent.epsilon, delta=self.config.delta,
            noise_multiplier=self.release.plan.noise_multiplier if self.release else 0.0, rounds=list(self.outcomes),
        )

    # -- one round ------------------------------------------------------------------------
    def sample(self, nodes: list[int]) -> list[int]:
        cfg = self.config
        if cfg.sampling == "poisson":
            keep = self.rng.random(len(nodes)) < cfg.sampling_rate
            return [n for n, k in zip(nodes, keep) if k]
        # K of N, N the whole population: a device that is offline takes the place of an
        # absent one and, if drawn, drops out. Drawing K of only the connected devices would
        # raise each one's chance above the K/N the accountant claims.
        slots = max(cfg.population, len(nodes))
        picked = self.rng.choice(slots, size=min(cfg.cohort_size, slots), replace=False)
        # Indices, not ids: real node ids are unsigned 64-bit integers, and numpy would turn a
        # list holding ids on both sides of 2**63 into float64, losing their low bits.
        return sorted(int(nodes[int(i)]) for i in picked if i < len(nodes))

    def run_round(self, grid: Grid, rnd: int, ckpt: Checkpoint) -> tuple[RoundOutcome, Checkpoint]:
        started = time.perf_counter()
        outcome = RoundOutcome(round=rnd, status="failed", delta=self.config.delta)
        if self.release is not None:
            outcome.attempt = self.release.attempt(rnd)
            refusal = self.release.check_budget(rnd)  # before anything is sent
            if refusal is not None:
                outcome.status, outcome.reason = "refused", refusal
                return outcome, ckpt
        want, attempt = self.config.device_count, outcome.attempt
        nodes = wait_for_nodes(grid, want, self.node_wait_s, self.should_stop,
                               lambda n: self.progress("waiting-for-nodes", rnd, attempt, expected=want, received=n))
        cohort = self.sample(nodes)
        outcome.sampled = len(cohort)
        if self.release is None:
            return self._plain_round(grid, rnd, ckpt, cohort, outcome, started)
        if len(cohort) < MIN_COHORT:
            return self._fail(outcome, ckpt, f"only {len(cohort)} devices sampled of {len(nodes)} connected "
                                             f"(at least {MIN_COHORT} needed)", started)

        try:
            if self.session is None:
                self.session = SecAggSession(self.release.session_config())
        except SecAggConfigError as exc:
            return self._fail(outcome, ckpt, f"secure aggregation refused the run's configuration: {exc}", started)

        def on_stage(stage: str, expected: int, received: int, dropped: int | None) -> None:
            self.progress(stage, rnd, attempt, expected=expected, received=received, dropped=dropped)
            if dropped is not None:  # the stage ended (the unmask stage ends in the aggregate)
                crash_point(f"after-stage-{stage}")

        announce, sent = self.announcer(rnd, attempt)
        release = self.release.release(
            grid, self.session, cohort, lambda params: self.train_content(rnd, ckpt, params, attempt),
            round_=rnd, attempt=attempt, vector_length=self.architecture.contribution_size(ckpt.arrays),
            publish=lambda total, survivors, noise_std: self._next_checkpoint(rnd, ckpt, total, survivors, noise_std),
            announce=announce, last=rnd == self.config.rounds, on_stage=on_stage, on_step=crash_point,
        )
        self.mark_delivered(release.reached, sent)
        self.took_part |= set(release.reached) - set(release.declined)
        outcome.participants, outcome.mode = release.participants, release.mode or None
        outcome.survived = release.survivors
        outcome.dropped = len(cohort) - release.survivors
        if not release.released:
            if release.spent:  # counted in epsilon; the ledger says release.not-applied
                return self._spent_not_applied(outcome, ckpt, release, started)
            return self._fail(outcome, ckpt, release.reason or "nothing released", started)
        self.progress("release", rnd, attempt, expected=len(cohort), received=release.survivors,
                      dropped=outcome.dropped)
        new_ckpt = release.published
        crash_point("after-aggregate")  # the sum decoded and noised, the model built, nothing stored
        atomic_write_bytes(self.files.checkpoint, new_ckpt.to_bytes())  # after the write-ahead ledger entry
        crash_point("after-checkpoint")
        self.release.applied(release, new_ckpt.model_hash())  # after the checkpoint (see reconcile)
        outcome.status, outcome.spent = "released", True
        outcome.epsilon = release.accounting.epsilon
        outcome.epsilon_amplified = self.release.epsilon_amplified()
        outcome.noise_multiplier_effective, outcome.noise_std_total = release.noise_multiplier_effective, release.noise_std
        outcome.train_loss, outcome.train_loss_std = new_ckpt.meta.get("train_loss"), new_ckpt.meta.get("train_loss_std")
        outcome.seconds = time.perf_counter() - started
        _log.info("round %d released: %d of %d sampled survived, epsilon %.4g", rnd, release.survivors, len(cohort), outcome.epsilon)
        return outcome, new_ckpt

    def _spent_not_applied(self, outcome: RoundOutcome, ckpt: Checkpoint, release, started: float
                           ) -> tuple[RoundOutcome, Checkpoint]:
        """A round whose release was accounted (written ahead) and then produced no model: the
        sum failed its bound, or the unmasking failed. Recorded as failed and spent."""
        outcome.status, outcome.reason, outcome.spent = "failed", release.reason, True
        outcome.epsilon = release.accounting.epsilon if release.accounting is not None else None
        outcome.epsilon_amplified = self.release.epsilon_amplified() if release.accounting else None
        outcome.noise_multiplier_effective = release.noise_multiplier_effective
        outcome.seconds = time.perf_counter() - started
        _log.warning("round %d failed after its release was accounted: %s", outcome.round, release.reason)
        return outcome, ckpt

    def _next_checkpoint(self, rnd: int, ckpt: Checkpoint, total: np.ndarray, survivors: int,
                         noise_std: float) -> Checkpoint:
        """The model after a release: the architecture turns the released sum into shared
        arrays (FedAvg: divided by the expected cohort, a fixed denominator; statistics: the
        solve with the sum's known noise)."""
        released = ReleasedSum(total, survivors, noise_std, max(self.config.expected_cohort, 1.0), self.config.sensitivity)
        arrays = self.architecture.apply_release(ckpt.model_config, ckpt.arrays, released)
        metrics = self.architecture.release_metrics(ckpt.model_config, released)  # released aggregates only
        return Checkpoint(rnd, arrays, ckpt.model, ckpt.model_config, {"run_id": self.run_id, **metrics})

    def watch_loss(self, rnd: int) -> None:
        """After round ``rnd``: the first significant rise of the released training loss is one
        ``loss-rising`` warning in the run's events (logged too). An events file that cannot be
        written is logged and does not stop the run."""
        rise = loss_rise(loss_points(self.files.round_lines()))
        if rise is None or any(e["kind"] == LOSS_RISING for e in read_events(self.files.run_dir)):
            return
        _log.warning("run %s: %s", self.run_id, rise.message())
        try:
            append_event(self.files.run_dir, LOSS_RISING, rnd=rnd, level="warning", message=rise.message(),
                         details=rise.details())
        except OSError as exc:
            _log.warning("the events file of run %s cannot be written (%s)", self.run_id, exc.strerror)

    # -- the released model to the devices ------------------------------------------------
    def deliver(self, grid: Grid, ckpt: Checkpoint) -> dict[str, Any]:
        """Send the released model to every connected device (see the module docstring);
        returns what state.json records. The replies are empty: only their arrival counts."""
        model_hash = ckpt.model_hash()
        entry = self.release.release_entry(model_hash) if self.release is not None else None
        nodes = sorted(int(n) for n in grid.get_node_ids())
        shared = {
            wire.RUN_RECORD: self.run_record(ckpt.round),
            wire.GLOBAL_RECORD: wire.arrays_record(ckpt.arrays),
            wire.MODEL_RECORD: ConfigRecord({
                "model": ckpt.model, "model_config": ckpt.model_config, "model_hash": model_hash,
                "ledger_seq": -1 if entry is None else int(entry.seq), "ledger_hash": "" if entry is None else entry.hash,
            }),
        }
        # The delivery carries each device's receipts (the run's last entries): one message.
        entries = self.release.ledger.entries() if self.release is not None else []
        contents, sent = {}, {}
        for n in nodes:
            receipts, sent[n] = self.receipts_for(n, entries)
            contents[n] = RecordDict({**shared, **receipts})
        started = time.perf_counter()
        self.progress("deliver", ckpt.round, expected=len(nodes), received=0)
        replies = exchange(grid, contents, wire.MODEL_MESSAGE_TYPE, f"model-{ckpt.round}", self.hello_timeout_s)
        self.mark_delivered([n for n, r in replies.items() if not r.has_error()], sent)
        answered = sum(1 for r in replies.values() if not r.has_error())
        self.progress("deliver", ckpt.round, expected=len(nodes), received=answered, dropped=len(nodes) - answered)
        _log.info("released model %s... delivered to %d of %d devices", model_hash[:12], answered, len(nodes))
        return {"round": ckpt.round, "model_hash": model_hash, "devices": answered, "connected": len(nodes),
                "seconds": round(time.perf_counter() - started, 3)}

    def _fail(self, outcome: RoundOutcome, ckpt: Checkpoint, reason: str, started: float) -> tuple[RoundOutcome, Checkpoint]:
        outcome.status, outcome.reason = "failed", reason
        outcome.seconds = time.perf_counter() - started
        _log.warning("round %d failed: %s", outcome.round, reason)
        if self.release is not None:
            outcome.epsilon = self.release.fail(
                outcome.round, outcome.attempt, reason, sampled=outcome.sampled,
                participants=outcome.participants, survivors=outcome.survived,
            )
        return outcome, ckpt

    def run_record(self, rnd: int, attempt: int = 0) -> ConfigRecord:
        """The run record every message carries. A private run adds what a device needs for
        its own checks: the attempt, the ledger key it pins, and the planned noise multiplier,
        adjacency and delta its budget check reads (wire.py)."""
        record: dict[str, Any] = {"run_id": self.run_id, "round": int(rnd), "model": self.config.model}
        if self.release is not None:
            record.update(attempt=int(attempt), noise_multiplier=float(self.release.plan.noise_multiplier),
                          adjacency=self.release.plan.adjacency, delta=float(self.config.delta))
            if self.ledger_key is not None:
                record["ledger_key"] = self.ledger_key
        return ConfigRecord(record)

    # -- device receipts --------------------------------------------------------------------
    def receipts_for(self, node: int, entries: list) -> tuple[dict[str, ConfigRecord], int]:
        """The RECEIPTS_RECORD for ``node`` (the ledger entries after the last one it is known
        to have) and the head seq it would then hold."""
        lines = segment_after(entries, self.delivered_seq.get(node, 0))
        head = entries[-1].seq if entries else 0
        if not lines:
            return {}, head
        return {wire.RECEIPTS_RECORD: ConfigRecord({wire.RECEIPTS_ENTRIES: lines})}, head

    def announcer(self, rnd: int, attempt: int) -> tuple[Callable[[int], RecordDict], dict[int, int]]:
        """The first message's records for each node of a round (run record + its receipts),
        and the head seq sent to each (filled as messages are built)."""
        entries = self.release.ledger.entries() if self.release is not None else []
        sent: dict[int, int] = {}

        def announce(node: int) -> RecordDict:
            receipts, sent[int(node)] = self.receipts_for(int(node), entries)
            return RecordDict({wire.RUN_RECORD: self.run_record(rnd, attempt), **receipts})
        return announce, sent

    def mark_delivered(self, nodes, sent: dict[int, int]) -> None:
        """``nodes`` answered a message that carried the entries up to ``sent[node]``."""
        for node in nodes:
            if int(node) in sent:
                self.delivered_seq[int(node)] = max(self.delivered_seq.get(int(node), 0), sent[int(node)])

    def send_receipts(self, grid: Grid, rnd: int) -> dict[str, int]:
        """The run's final message: the ledger entries each device that took part in this
        session has not received yet (one message each, an empty reply). Returns counts."""
        if self.release is None or not self.took_part:
            return {"devices": 0, "answered": 0}
        entries = self.release.ledger.entries()
        connected = {int(n) for n in grid.get_node_ids()}
        contents, sent = {}, {}
        for node in sorted(self.took_part):
            receipts, sent[node] = self.receipts_for(node, entries)
            if receipts and node in connected:
                contents[node] = RecordDict({wire.RUN_RECORD: self.run_record(rnd), **receipts})
        if not contents:
            return {"devices": 0, "answered": 0}
        replies = exchange(grid, contents, wire.RECEIPTS_MESSAGE_TYPE, f"receipts-{rnd}", self.hello_timeout_s)
        answered = [n for n, r in replies.items() if not r.has_error()]
        self.mark_delivered(answered, sent)
        _log.info("run %s: the last ledger entries went to %d of %d devices", self.run_id, len(answered), len(contents))
        return {"devices": len(contents), "answered": len(answered)}

    def train_content(self, rnd: int, ckpt: Checkpoint, params: DPRoundParams | None, attempt: int = 0) -> RecordDict:
        cfg = self.config
        content = RecordDict(
            {
                wire.RUN_RECORD: self.run_record(rnd, attempt),
                wire.GLOBAL_RECORD: wire.arrays_record(ckpt.arrays),
                wire.TRAIN_RECORD: ConfigRecord(
                    {
                        "model": ckpt.model, "model_config": ckpt.model_config, "local_epochs": cfg.local_epochs,
                        "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size,
                        "seed": int(cfg.seed % (2**31)),
                        # C: what the DP mod clips to; a loss slot inside the vector is sized by it
                        "clip_norm": float(params.clip_norm if params is not None else cfg.sensitivity),
                    }
                ),
            }
        )
        if params is not None:
            content[wire.DP_RECORD] = params.to_record()
        return content

    # -- plain FedAvg (benchmark baseline only) -------------------------------------------
    def _plain_round(self, grid, rnd, ckpt, cohort, outcome, started):
        if not cohort:
            return self._fail(outcome, ckpt, "no devices sampled", started)
        content = self.train_content(rnd, ckpt, None)
        replies = exchange(grid, {n: content for n in cohort}, wire.TRAIN_MESSAGE_TYPE, f"plain-{rnd}", self.config.round_timeout_s)
        vectors = []
        for reply in replies.values():
            if reply.has_error():
                continue
            arrays = reply.content.array_records.get(wire.UPDATE_RECORD)
            if arrays is None or wire.UPDATE_VECTOR not in arrays:
                continue
            vectors.append(arrays[wire.UPDATE_VECTOR].numpy())
        if not vectors:
            return self._fail(outcome, ckpt, "no device replied", started)
        # The plain mean of the replies (the sum over as many as replied; no noise).
        released = ReleasedSum(np.sum(np.stack(vectors), axis=0), len(vectors), 0.0, float(len(vectors)),
                               self.config.sensitivity)
        new_arrays = self.architecture.apply_release(ckpt.model_config, ckpt.arrays, released)
        metrics = self.architecture.release_metrics(ckpt.model_config, released)
        new_ckpt = Checkpoint(rnd, new_arrays, ckpt.model, ckpt.model_config, metrics)
        atomic_write_bytes(self.files.checkpoint, new_ckpt.to_bytes())
        outcome.status, outcome.survived = "released", len(vectors)
        outcome.train_loss, outcome.train_loss_std = metrics.get("train_loss"), metrics.get("train_loss_std")
        outcome.dropped = len(cohort) - len(vectors)
        outcome.seconds = time.perf_counter() - started
        return outcome, new_ckpt


# -- Flower entry points -------------------------------------------------------------------
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
    """A ServerApp bound to one run directory (the simulation runner and tests use it)."""
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


def run_dir_from(context: Context) -> Path:
    """The run directory a ``flwr run`` names: ``--run-config "run-dir='/abs/path'"``."""
    run_dir = context.run_config.get("run-dir")
    if not run_dir:
        raise PlanError("give the run directory: flwr run . --run-config \"run-dir='/path/to/run'\"")
    return Path(str(run_dir))


def run_in_directory(grid: Grid, run_dir: Path, *, node_wait_s: float = 60.0) -> RunSummary:
    """Run (or resume) the run of ``run_dir`` on ``grid`` and write its report, holding the
    run's lock (``rundir.RunnerLock``). A failure ends the run as failed, with its report when
    it released anything, before it propagates (``flwr run`` exits 0 on a failed run)."""
    files = RunFiles(run_dir)
    with RunnerLock(run_dir):
        note_interruption(files, found_by="the ServerApp at start")
        try:
            config = files.read_config()
            summary = FederatedServer(config, run_dir, run_id=run_dir.name, ledger=open_ledger(run_dir, config),
                                      node_wait_s=node_wait_s).run(grid)
        except Exception as exc:  # noqa: BLE001 - recorded in state.json, then re-raised
            finish_failed(run_dir, f"{type(exc).__name__}: {exc}"[:500])
            raise
        try:
            append_progress(run_dir, "report", rnd=summary.rounds_completed)
        except OSError:
            _log.warning("the progress file of run %s cannot be written", run_dir.name)
        finish_run(run_dir)
    return summary


# The deployed ServerApp (`restwise server run`, `flwr run` with a deployment's app directory):
# the run directory comes from the run config; the devices bring their own stores.
app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    run_in_directory(grid, run_dir_from(context))


__all__ = [
    "app", "make_server_app", "run_in_directory", "run_dir_from", "FederatedServer", "RunSummary", "RoundOutcome",
    "plan_refusal",
    "cap_refusal_reason",
    "initial_checkpoint", "wait_for_nodes", "exchange",
]
