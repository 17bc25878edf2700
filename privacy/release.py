"""The server-side DP release, as one workflow (in the spirit of Flower's DP strategy wrappers:
the orchestration around it stays privacy-unaware).

A release is **a Gaussian mechanism over a secure sum of bounded vectors with a known L2
sensitivity** C: every device of the cohort clips its vector to L2 norm <= C (on the device,
``privacy.dp_mods``), secure aggregation (``privacy.secagg``) reveals only the sum of the
survivors' vectors, Gaussian noise of standard deviation >= z C protects each person in it
(distributed: shares added on the devices before masking; central: added here), and the release
is accounted from what it actually carried. One workflow serves

* a round of DP-FedAvg (the vector: a device's model update; C: the run's clip norm), and
* a one-shot release of sufficient statistics (the vector: a device's bounded statistics,
  e.g. XᵀX/m and Xᵀy/m; C: the documented bound of that vector, given by the model
  architecture, not the clip norm of an update).

It reads a plain privacy-side :class:`ReleasePolicy` (nothing here imports ``server``). The
planner :func:`plan_release` turns a policy into a :class:`ReleasePlan` (noise multiplier
given or calibrated, adjacency, budget); :func:`check_plan` is the start-time check of a
planned run against its budget, a service-wide cap and each person's budget across runs, and
:func:`check_cap` the creation-time check against the run's own cap (``max_epsilon``, default
:data:`DEFAULT_MAX_EPSILON`). Every epsilon planned, calibrated or checked here holds against
the server, which draws each cohort: no amplification by sampling is claimed; the amplified
value (third parties who see only the model) is computed beside it and never charged. :class:`ReleaseWorkflow` runs one release, step by step (each step is one method, so a
change of the release lands in one place)::

    1. check_budget(round)           before anything is sent: refuse the release if its worst
                                     case (noise exactly z C) would exceed the run's budget;
                                     ledger BudgetRefusalEvent
    2. round_input(plan)             once the round's participants are known: the DP parameters
                                     the devices' mods apply (clip C, z, noise shares sized for
                                     the fewest survivors a released sum can hold) and the
                                     round's encoding range
    3. the secure round              one round of the run's SecAggSession (privacy/secagg): the
                                     first message of a device's round carries the announced run
                                     record (consent is asked there), masked vectors in, then
       5. release_event(...)         -- write-ahead (issue 17), in the session's before_unmask
       6. ledger.append(event)          hook: every masked input is in, no unmasking share has
                                        been asked for. GaussianRoundEvent with the actual
                                        survivors and noise, naming the commitment to the masked
                                        sum (model_hash). From here the release is SPENT.
                                     unmask, decode, the sum bound (fails closed)
    4. add_noise(...)                central: N(0, (z C)^2) added here; either way the standard
                                     deviation of the noise that protects one person
       publish(...)                  the caller builds its model from the released sum
    7. epsilon()                     the accountant's epsilon over the run's releases, read
                                     back from the ledger (what an auditor recomputes)
    8. applied(release, hash)        after the caller stored its model: AuditEvent
                                     ``release.applied`` naming the release and the model hash

A spent release that produces no model (the secure round aborted after the write-ahead entry,
the decoded sum failed its bound, the model could not be built) is recorded by
:meth:`ReleaseWorkflow.release` as AuditEvent ``release.not-applied``: it stays counted, and a
retry of the round is a new release (attempt + 1). A release the server crashed in the middle
of is settled at the next start (:meth:`ReleaseWorkflow.reconcile`). A round that ends before
the write-ahead entry released nothing and spent nothing: :meth:`ReleaseWorkflow.fail` records
it (AuditEvent ``round.failed``). The order of writes, and why no crash point under-counts:
docs/privacy-accounting.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from restwise.privacy.accountant import MIN_NOISE_MULTIPLIER, AccountingResult, PrivacyAccountant
from restwise.privacy.budget import DEFAULT_MAX_EPSILON, PrivacyBudget
from restwise.privacy.calibration import calibrate_noise_multiplier
from restwise.privacy.dp_mods import DPRoundParams, add_central_noise, noise_rng, total_noise_std
from restwise.privacy.egress import EgressPolicy
from restwise.privacy.errors import BudgetExceededError, PrivacyError
from restwise.privacy.events import (
    AuditEvent,
    BudgetRefusalEvent,
    GaussianRoundEvent,
    ReleaseSpec,
    counted_noise_shares,
    event_from_dict,
)
from restwise.privacy.report import NOT_APPLIED_ACTION
from restwise.privacy.secagg.config import SecAggConfig
from restwise.privacy.secagg.errors import SecAggConfigError
from restwise.privacy.secagg.protocol import Announce, PendingUnmask, RoundPlan
from restwise.privacy.secagg.records import FIRST_STAGES
from restwise.privacy.secagg.workflow import OnStage, RoundInput, SecAggSession

SAMPLING_METHODS = ("poisson", "fixed")
NOISE_PLACEMENTS = ("distributed", "central")
MIN_COHORT = 3  # secure aggregation needs at least 3 devices
# The fixed-point encoding range holds this many per-device noise standard deviations.
ENCODING_NOISE_SDS = 12.0
SERVER_ACTOR = "restwise-server"
# Ledger AuditEvent actions of a release's fate (after its GaussianRoundEvent, which is
# written ahead: spent) and of a round that spent nothing.
APPLIED_ACTION = "release.applied"
FAILED_ACTION = "round.failed"


# -- the policy: what a run may release --------------------------------------------------------
@dataclass(frozen=True)
class SecureAggregationPolicy:
    """The secure-aggregation settings of a run's releases (see privacy.secagg.config)."""

    num_neighbours: int
    threshold: int | float
    max_dropout_fraction: float
    timeout_s: float


@dataclass(frozen=True)
class ReleasePolicy:
    """Everything the privacy side needs to know about a run's releases, as plain values.

    sensitivity       C: the L2 bound of one person's vector, enforced on the device (the clip
                      norm of a DP-FedAvg update, or the documented bound of a device's
                      statistics for a one-shot release)
    population        N: the persons (devices) who may be sampled; one person = one device
    sampling          "poisson" (each device independently with probability ``sampling_rate``)
                      or "fixed" (exactly ``cohort_size`` of N, uniformly without replacement)
    releases          the planned number of releases (rounds)
    delta             the run's delta; with ``target_epsilon`` its budget (give exactly one of
                      ``target_epsilon`` and ``noise_multiplier``)
    noise             "distributed" (shares added on the devices before masking) or "central"
    secure_aggregation  the SecAgg+ settings (None: the policy can be planned and accounted, but
                      :class:`ReleaseWorkflow` refuses to release without secure aggregation)
    """

    sensitivity: float
    population: int
    sampling: str
    releases: int
    delta: float
    sampling_rate: float | None = None
    cohort_size: int | None = None
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    noise: str = "distributed"
    secure_aggregation: SecureAggregationPolicy | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.sensitivity, (int, float)) and math.isfinite(self.sensitivity) and self.sensitivity > 0):
            raise PrivacyError("the sensitivity (L2 bound of one person's vector) must be a positive finite number")
        if self.sampling not in SAMPLING_METHODS:
            raise PrivacyError(f"sampling must be one of {', '.join(SAMPLING_METHODS)}")
        if self.noise not in NOISE_PLACEMENTS:
            raise PrivacyError(f"noise must be one of {', '.join(NOISE_PLACEMENTS)}")
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise PrivacyError("give exactly one of target_epsilon and noise_multiplier")
        if self.noise_multiplier is not None and self.noise_multiplier < MIN_NOISE_MULTIPLIER:
            raise PrivacyError(f"noise_multiplier must be at least {MIN_NOISE_MULTIPLIER}")
        if self.sampling == "poisson" and self.sampling_rate is None:
            raise PrivacyError("Poisson sampling needs a sampling rate")
        if self.sampling == "fixed" and self.cohort_size is None:
            raise PrivacyError("fixed-size sampling needs a cohort size")

    @property
    def expected_cohort(self) -> float:
        """The expected number of devices sampled per release."""
        if self.sampling == "fixed":
            return float(self.cohort_size)
        return float(self.sampling_rate) * self.population

    @property
    def sampling_probability(self) -> float:
        """q: the probability that one given person is in a release's cohort."""
        if self.sampling == "fixed":
            return self.cohort_size / self.population
        return float(self.sampling_rate)

    @property
    def adjacency(self) -> str:
        """Poisson sampling is accounted under add/remove-one-person adjacency; fixed-size
        sampling under replace-one (the population size is public), with the accountant's
        dominating pair for sampling without replacement (docs/privacy-accounting.md)."""
        return "replace_one" if self.sampling == "fixed" else "add_remove"

    @property
    def claim_amplification(self) -> bool:
        """No amplification by sampling is claimed: the server draws every cohort, so the
        headline epsilon, the budget, the calibration and every check hold against it. The
        amplified value (third parties who see only the model) is computed beside it
        (:attr:`ReleasePlan.planned_epsilon_amplified`), never charged."""
        return False

    def sampling_plan(self) -> dict[str, Any]:
        """The sampling and adjacency of one release, as ``ReleaseSpec.plan`` and the
        calibration take them."""
        if self.sampling == "poisson":
            return dict(sampling="poisson", adjacency=self.adjacency, sampling_rate=self.sampling_rate)
        return dict(sampling="fixed", adjacency=self.adjacency, cohort_size=self.cohort_size,
                    population=self.population)

    def spec(self, noise_multiplier: float) -> ReleaseSpec:
        """One release at noise multiplier ``noise_multiplier``, as the accountant reads it."""
        return ReleaseSpec.plan(noise_multiplier=noise_multiplier, **self.sampling_plan())


# -- the planner ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReleasePlan:
    """A policy planned: the noise multiplier every release carries at least, and the budget
    the run's releases are checked against."""

    policy: ReleasePolicy
    noise_multiplier: float  # z per release (the planned minimum; actual releases carry >= z C)
    budget_epsilon: float  # target_epsilon, or (z given) what the planned releases spend
    planned: AccountingResult  # epsilon after all planned releases at z
    calibrated: bool

    @property
    def adjacency(self) -> str:
        return self.policy.adjacency

    @property
    def claim_amplification(self) -> bool:
        return self.policy.claim_amplification

    @property
    def delta(self) -> float:
        return self.policy.delta

    @property
    def planned_epsilon(self) -> float:
        return self.planned.epsilon

    @property
    def spec(self) -> ReleaseSpec:
        """The worst release the plan allows (noise exactly z C)."""
        return self.policy.spec(self.noise_multiplier)

    @property
    def planned_epsilon_amplified(self) -> float | None:
        """Epsilon after all planned releases for third parties who see only the released model
        (amplified by sampling; None where undefined). Shown beside the headline, never charged."""
        return self.accountant().epsilon_amplified([self.spec] * self.policy.releases, self.delta)

    def accountant(self) -> PrivacyAccountant:
        return PrivacyAccountant(claim_amplification=self.claim_amplification)


def plan_release(policy: ReleasePolicy) -> ReleasePlan:
    """The noise multiplier (given, or the smallest that keeps ``policy.releases`` releases
    within ``target_epsilon``) and the run's budget. Raises the accountant's errors for a
    configuration it cannot account (e.g. a noise multiplier below the minimum)."""
    accountant = PrivacyAccountant(claim_amplification=policy.claim_amplification)
    if policy.noise_multiplier is None:
        calibration = calibrate_noise_multiplier(float(policy.target_epsilon), policy.delta, policy.releases,
                                                 accountant=accountant, **policy.sampling_plan())
        return ReleasePlan(policy, calibration.noise_multiplier, float(policy.target_epsilon), calibration.result, True)
    z = float(policy.noise_multiplier)
    planned = accountant.epsilon_for_rounds(policy.spec(z), policy.releases, policy.delta)
    return ReleasePlan(policy, z, planned.epsilon, planned, False)


CAP_RAISED_ACTION = "cap.raised"


@dataclass(frozen=True)
class CapCheck:
    """A planned run against its epsilon cap: the projected epsilon against the sampler (no
    amplification claimed), the amplified value for third parties beside it (never checked),
    and whether the cap is the default or was raised."""

    plan: ReleasePlan
    max_epsilon: float
    default_max_epsilon: float = DEFAULT_MAX_EPSILON

    @property
    def projected_epsilon(self) -> float:
        return float(self.plan.planned.epsilon)

    @cached_property
    def epsilon_amplified(self) -> float | None:
        # a PLD composition: computed when a message or a record needs it, not for every check
        return self.plan.planned_epsilon_amplified

    @property
    def delta(self) -> float:
        return float(self.plan.delta)

    @property
    def rounds(self) -> int:
        return int(self.plan.policy.releases)

    @property
    def allowed(self) -> bool:
        return self.projected_epsilon <= self.max_epsilon

    @property
    def raised(self) -> bool:
        return self.max_epsilon > self.default_max_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {"projected_epsilon": self.projected_epsilon, "epsilon_amplified": self.epsilon_amplified,
                "max_epsilon": self.max_epsilon, "default_max_epsilon": self.default_max_epsilon,
                "cap_raised": self.raised, "delta": self.delta, "rounds": self.rounds}

    def message(self) -> str:
        amp = ("" if self.epsilon_amplified is None or abs(self.epsilon_amplified - self.projected_epsilon) < 1e-9
               else f" (for third parties who see only the model, amplified by sampling: {self.epsilon_amplified:.4g};"
                    " not what a cap is checked against)")
        head = (f"projected epsilon {self.projected_epsilon:.4g} against the server (no amplification by sampling "
                f"claimed) after {self.rounds} round(s) at delta {self.delta:g}{amp}")
        if self.allowed:
            return f"{head} is within the run's epsilon cap {self.max_epsilon:g}"
        return (f"{head} exceeds the run's epsilon cap {self.max_epsilon:g}"
                + (" (the default)" if not self.raised else "")
                + ": add noise or plan fewer rounds, or raise the cap explicitly (max_epsilon, --max-epsilon);"
                " a raised cap is recorded in the run's ledger and the audit log")


def check_cap(plan: ReleasePlan, max_epsilon: float, default_max_epsilon: float = DEFAULT_MAX_EPSILON) -> CapCheck:
    """The planned run's epsilon after all its releases (against the sampler) against ``max_epsilon``."""
    return CapCheck(plan, float(max_epsilon), float(default_max_epsilon))


@dataclass(frozen=True)
class BudgetDecision:
    """A planned run against its budget, a service-wide cap and (optionally) each person's
    budget across runs over the same persons."""

    projected_epsilon: float
    budget_epsilon: float | None  # None: no target and no service cap
    delta: float
    rounds: int
    accountant: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    # Person level (across runs over the same dataset), when a person budget is configured.
    person_spent_epsilon: float | None = None
    person_projected_epsilon: float | None = None
    person_budget_epsilon: float | None = None

    @property
    def run_allowed(self) -> bool:
        return self.budget_epsilon is None or self.projected_epsilon <= self.budget_epsilon

    @property
    def person_allowed(self) -> bool:
        return self.person_budget_epsilon is None or (self.person_projected_epsilon or 0.0) <= self.person_budget_epsilon

    @property
    def allowed(self) -> bool:
        return self.run_allowed and self.person_allowed

    def to_dict(self) -> dict[str, Any]:
        out = {
            "projected_epsilon": self.projected_epsilon,
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "rounds": self.rounds,
            "accountant": self.accountant,
            **self.detail,
        }
        if self.person_budget_epsilon is not None:
            out.update(
                person_spent_epsilon=self.person_spent_epsilon,
                person_projected_epsilon=self.person_projected_epsilon,
                person_budget_epsilon=self.person_budget_epsilon,
            )
        return out


def check_plan(
    policy: ReleasePolicy,
    *,
    epsilon_cap: float | None = None,
    person_epsilon_cap: float | None = None,
    past_releases: Sequence[dict[str, Any]] = (),
) -> BudgetDecision:
    """Epsilon after all planned releases against the run's budget (its ``target_epsilon``)
    and ``epsilon_cap`` - the smaller wins; a run given a noise multiplier instead of a target
    is bounded by the cap only. With ``person_epsilon_cap``, the planned releases are also
    composed with ``past_releases`` (ledger payloads of earlier releases over the same
    persons) against each person's budget. Raises the accountant's errors for a configuration
    it cannot account."""
    plan = plan_release(policy)
    accountant = plan.accountant()
    spec, rounds, delta = plan.spec, policy.releases, policy.delta
    limits = [float(v) for v in (policy.target_epsilon, epsilon_cap) if v is not None]
    budget = min(limits) if limits else None
    projected = float(plan.planned.epsilon)
    if budget is not None:
        try:
            projected = PrivacyBudget(epsilon=budget, delta=delta).check_plan(
                [], spec, rounds, run_id="planned", round=1, accountant=accountant
            )
        except BudgetExceededError as exc:
            projected = float(exc.projected)
    person: dict[str, Any] = {}
    if person_epsilon_cap is not None:
        past = [event_from_dict(p) for p in past_releases]
        person_accountant = accountant
        if not all(person_accountant.supports(e) for e in past):
            person_accountant = PrivacyAccountant(claim_amplification=False)
        person_budget = PrivacyBudget(epsilon=float(person_epsilon_cap), delta=delta, scope="person")
        try:
            person_projected = person_budget.check_plan(past, spec, rounds, run_id="planned", round=1,
                                                        accountant=person_accountant)
            spent = person_budget.spent(past, accountant=person_accountant)
        except BudgetExceededError as exc:
            person_projected, spent = float(exc.projected), float(exc.spent)
        person = dict(
            person_spent_epsilon=float(spent),
            person_projected_epsilon=float(person_projected),
            person_budget_epsilon=float(person_epsilon_cap),
        )
    result = plan.planned
    return BudgetDecision(
        projected_epsilon=projected,
        budget_epsilon=budget,
        delta=delta,
        rounds=rounds,
        accountant=f"{result.accountant} ({result.accountant_version})",
        detail={
            "epsilon_cap": None if epsilon_cap is None else float(epsilon_cap),
            "noise_multiplier": float(plan.noise_multiplier),
            # The headline (projected_epsilon) holds against the sampler; the amplified value
            # only for third parties who see just the model, and is never checked against a cap.
            "epsilon_amplified": plan.planned_epsilon_amplified,
            "amplification_claimed": bool(result.amplification_claimed),
            "adjacency": result.adjacency,
        },
        **person,
    )


# -- the per-release steps that need no transport -------------------------------------------------
def dp_parameters(policy: ReleasePolicy, noise_multiplier: float, min_survivors: int) -> DPRoundParams:
    """What the devices' DP mods apply in a release at noise multiplier ``noise_multiplier``
    that needs at least ``min_survivors`` survivors. Distributed noise is sized so that the
    shares that protect one person at that smallest releasable cohort add up to exactly z C:
    under add/remove that is the other ``min_survivors - 1`` devices' shares (a person's own
    share is never relied on)."""
    distributed = policy.noise == "distributed"
    divisor = counted_noise_shares(min_survivors, policy.adjacency) if distributed else 1
    if divisor < 1:
        raise PrivacyError("distributed noise needs at least 2 survivors under add/remove adjacency")
    return DPRoundParams(clip_norm=policy.sensitivity, noise_multiplier=noise_multiplier,
                         placement=policy.noise, noise_divisor=divisor)


def released_noise_std(plan: ReleasePlan, params: DPRoundParams, survivors: int) -> float:
    """The standard deviation of the noise protecting one person in a released sum of
    ``survivors`` vectors (central: z C; distributed: the counted shares, z C sqrt(m'/d))."""
    if params.placement == "central":
        return plan.noise_multiplier * params.clip_norm
    return total_noise_std(plan.noise_multiplier, params.clip_norm,
                           counted_noise_shares(survivors, plan.adjacency), params.noise_divisor)


def sum_noise_std(plan: ReleasePlan, params: DPRoundParams, survivors: int) -> float:
    """The std per coordinate of all the noise in a released sum of ``survivors`` vectors (every
    device's share, a person's own included): what a solve on the sum should expect."""
    if params.placement == "central":
        return plan.noise_multiplier * params.clip_norm
    return params.share_std * math.sqrt(survivors)


def add_noise(plan: ReleasePlan, params: DPRoundParams, total: np.ndarray, survivors: int,
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, float]:
    """Step 4: (the released sum, the std of the noise protecting one person in it). Central
    noise is added here (a fresh OS-seeded generator unless ``rng``); distributed noise is
    already in ``total``."""
    total = np.asarray(total, dtype=np.float64)
    if params.placement == "central":
        total = add_central_noise(total, plan.noise_multiplier, params.clip_norm, rng or noise_rng())
    return total, released_noise_std(plan, params, survivors)


def release_event(plan: ReleasePlan, *, run_id: str, round_: int, sampled: int, survivors: int, noise_std: float,
                  model_hash: str, attempt: int = 0) -> GaussianRoundEvent:
    """Step 5: the ledger event of a release of ``survivors`` vectors out of ``sampled``, whose
    noise protecting one person has std ``noise_std``; ``model_hash`` names what was built from
    it. The accounted noise multiplier is the effective one, ``noise_std / C``."""
    policy = plan.policy
    cohort = int(policy.cohort_size) if policy.sampling == "fixed" else max(sampled, survivors, 1)
    return GaussianRoundEvent(
        run_id=run_id, round=round_, noise_multiplier=noise_std / policy.sensitivity,
        clip_norm=policy.sensitivity, sampling=policy.sampling, sampling_rate=policy.sampling_probability,
        cohort_size=cohort, population=policy.population, adjacency=plan.adjacency,
        planned_clients=sampled, survivors=survivors, noise_std_total=noise_std, model_hash=model_hash,
        attempt=attempt,
    )


def expected_epsilon(plan: ReleasePlan, releases: int) -> float:
    """The accountant's epsilon after ``releases`` releases at the plan's noise (planning)."""
    return float(plan.accountant().epsilon_for_rounds(plan.spec, int(releases), plan.delta).epsilon)


# -- one release ----------------------------------------------------------------------------------
class Published(Protocol):
    """What the orchestrator builds from a released sum (e.g. the new model checkpoint)."""

    def model_hash(self) -> str: ...


@dataclass(frozen=True)
class RoundParameters:
    secagg: SecAggConfig
    dp: DPRoundParams
    min_survivors: int


@dataclass
class Release:
    """The outcome of :meth:`ReleaseWorkflow.release`.

    released   a model may be built: the sum was decoded, checked and noised
    spent      the release is in the ledger (written ahead, before any unmasking share):
               counted in epsilon whether or not it was released
    failure    the secure round's failure code when it aborted (``sum-out-of-bounds``, ...)"""

    released: bool
    reason: str | None = None
    survivors: int = 0
    noise_std: float | None = None
    published: Any = None
    accounting: AccountingResult | None = None
    event: GaussianRoundEvent | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # none today: no metric leaves a device in the clear
    entry: Any = None  # the ledger entry of the release (seq, hash, signature): what a device receipt names
    spent: bool = False
    failure: str | None = None
    participants: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    mode: str = ""
    # Nodes that answered the first message of their round: they received what it announced.
    reached: frozenset[int] = frozenset()
    declined: frozenset[int] = frozenset()  # answered "not taking part"

    @property
    def noise_multiplier_effective(self) -> float | None:
        return None if self.event is None else self.event.noise_multiplier


class ReleaseWorkflow:
    """The steps of a run's releases (see the module docstring) around an orchestrator's
    rounds. ``ledger`` is the run's :class:`~restwise.privacy.ledger.PrivacyLedger`."""

    def __init__(self, plan: ReleasePlan, ledger, run_id: str, *,
                 noise_rng_factory: Callable[[], np.random.Generator] = noise_rng):
        self.plan = plan
        self.ledger = ledger
        self.run_id = run_id
        self._noise_rng = noise_rng_factory

    @property
    def policy(self) -> ReleasePolicy:
        return self.plan.policy

    def attempt(self, round_: int) -> int:
        """How many releases of ``round_`` the ledger already holds: a round re-run after a
        crash is a new, separately accounted release (attempt 1, 2, ...)."""
        return sum(1 for e in self.ledger.releases(self.run_id) if e.round == round_)

    # 1 ----------------------------------------------------------------------------------------
    def check_budget(self, round_: int) -> str | None:
        """Refuse (and record in the ledger) a release whose worst case - the fewest survivors,
        noise exactly z C - would exceed the run's budget. Returns the reason, or None."""
        budget = PrivacyBudget(epsilon=self.plan.budget_epsilon * (1 + 1e-9), delta=self.plan.delta)
        try:
            budget.check_next_round(self.ledger.releases(self.run_id), self.plan.spec,
                                    run_id=self.run_id, round=round_, accountant=self.plan.accountant())
        except BudgetExceededError as exc:
            self.ledger.append(BudgetRefusalEvent.from_error(exc, run_id=self.run_id, round=round_))
            return str(exc)
        return None

    # 2 ----------------------------------------------------------------------------------------
    def round_parameters(self, n: int) -> RoundParameters:
        """The SecAgg+ configuration for ``n`` participants and the DP parameters their mods
        apply. Raises SecAggConfigError when no safe secure round exists for ``n``."""
        sa = self.policy.secure_aggregation
        if sa is None:
            raise SecAggConfigError("this workflow releases only through secure aggregation")
        z, c = self.plan.noise_multiplier, self.policy.sensitivity
        # The largest per-device noise std of the round (shares are sized for min_survivors,
        # or min_survivors - 1 under add/remove): the encoding range must hold
        # ENCODING_NOISE_SDS of them.
        share = z * c / math.sqrt(max(1, n - math.floor(sa.max_dropout_fraction * n) - 1))
        clip_range = c + (ENCODING_NOISE_SDS * share if self.policy.noise == "distributed" else 0.0)
        secagg = SecAggConfig(
            num_neighbours=sa.num_neighbours, threshold=sa.threshold, max_dropout_fraction=sa.max_dropout_fraction,
            clip_range=float(clip_range * (1 + 1e-6)), max_cohort=max(MIN_COHORT, self.policy.population, n),
            timeout_s=sa.timeout_s, metric_keys=EgressPolicy().metric_keys,
        )
        t_min = secagg.min_survivors(n)
        return RoundParameters(secagg, dp_parameters(self.policy, z, t_min), t_min)

    def session_config(self) -> SecAggConfig:
        """The configuration of the run's :class:`SecAggSession`: the policy's settings, with
        the widest encoding range any round may use (the smallest cohort's noise shares are
        the largest); each round sets its own range (:meth:`round_input`)."""
        return self.round_parameters(MIN_COHORT).secagg

    # 2 (per round, in the session) -------------------------------------------------------------
    def round_input(self, plan_: RoundPlan, content_for: Callable[[DPRoundParams], RecordDict]
                    ) -> tuple[RoundInput, DPRoundParams]:
        """The round's train content and encoding range once its participants are known:
        noise shares sized for ``plan_.min_survivors`` (the fewest inputs a released sum can
        hold), the range holding ENCODING_NOISE_SDS of them."""
        dp = dp_parameters(self.policy, self.plan.noise_multiplier, plan_.min_survivors)
        clip_range = self.policy.sensitivity + ENCODING_NOISE_SDS * dp.share_std
        return RoundInput(content_for(dp), clip_range=float(clip_range * (1 + 1e-6))), dp

    # 2-7 --------------------------------------------------------------------------------------
    def release(
        self,
        grid: Grid,
        session: SecAggSession,
        cohort: list[int],
        content_for: Callable[[DPRoundParams], RecordDict],
        *,
        round_: int,
        attempt: int,
        vector_length: int,
        publish: Callable[[np.ndarray, int, float], Published],
        announce: Announce = None,
        last: bool = False,
        on_stage: OnStage | None = None,
        on_step: Callable[[str], None] | None = None,
    ) -> Release:
        """One release over the sampled ``cohort`` through one round of the run's ``session``:
        ``content_for(dp_params)`` is what each device's app receives; ``announce`` goes with
        the first message of each device's round (the run record: the device decides there
        whether it takes part); ``publish(released_sum, survivors, noise_std_of_the_sum)``
        builds what the orchestrator will store. The release is written to the ledger as spent
        before any unmasking share is asked for; what happens after is in the result (and,
        for a spent release that produced nothing, in the ledger: ``release.not-applied``).
        The caller records a stored model with :meth:`applied`, and a round that spent nothing
        with :meth:`fail`. What ``publish`` raises propagates (the release stays spent).
        ``on_step(name)`` is told ``"after-write-ahead"`` once the release's ledger entry is
        appended and before any unmasking share is asked for (the crash matrix's hook)."""
        sampled = len(cohort)
        chosen: dict[str, Any] = {}

        def build(plan_: RoundPlan) -> RoundInput:
            round_input, chosen["dp"] = self.round_input(plan_, content_for)
            return round_input

        def write_ahead(pending: PendingUnmask) -> None:
            survivors = len(pending.survivors)
            std = released_noise_std(self.plan, chosen["dp"], survivors)
            event = self.release_event(round_, attempt, sampled, survivors, std, pending.commitment)
            chosen["event"], chosen["entry"] = event, self.ledger.append(event)
            if on_step is not None:
                on_step("after-write-ahead")

        try:
            result = session.round(grid, cohort, build, round=round_, vector_length=vector_length, announce=announce,
                                   before_unmask=write_ahead, last=last, on_stage=on_stage)
        except SecAggConfigError as exc:
            return Release(False, f"secure aggregation refused the round: {exc}")
        reached = frozenset(n for n, sent in result.messages.items()
                            if sent and result.dropped.get(n) not in FIRST_STAGES)
        common = dict(failure=result.failure, participants=result.participants, stage_seconds=dict(result.stage_seconds),
                      mode=result.mode, reached=reached, declined=frozenset(result.declined))
        if "entry" not in chosen:  # ended before any unmasking share was asked for: nothing revealed
            return Release(False, f"secure aggregation aborted: {result.reason}", survivors=len(result.survivors),
                           **common)
        event, entry, dp = chosen["event"], chosen["entry"], chosen["dp"]
        spent = dict(spent=True, event=event, entry=entry, survivors=event.survivors, **common)
        if result.aborted or result.total is None:
            reason = f"secure aggregation aborted after the release was accounted (spent, not applied): {result.reason}"
            self.not_applied(entry, reason, failure=result.failure)
            return Release(False, reason, accounting=self.epsilon(), **spent)
        survivors = len(result.survivors)
        released, std = add_noise(self.plan, dp, result.total, survivors, self._noise_rng())
        try:
            published = publish(released, survivors, sum_noise_std(self.plan, dp, survivors))
        except Exception as exc:  # noqa: BLE001 - recorded, then re-raised
            self.not_applied(entry, f"the model could not be built from the released sum: {type(exc).__name__}")
            raise
        return Release(True, None, noise_std=std, published=published, accounting=self.epsilon(),
                       metrics=dict(result.metrics), **spent)

    # 8 ----------------------------------------------------------------------------------------
    def applied(self, release: Release, model_hash: str):
        """Record that the caller stored the model built from ``release`` (after it wrote it):
        AuditEvent ``release.applied`` naming the release's ledger entry and the model hash."""
        return self._settle(release.entry, APPLIED_ACTION, model_hash=model_hash)

    def not_applied(self, entry, reason: str, failure: str | None = None):
        """Record that a spent release produced no stored model (it stays counted)."""
        extra = {"failure": failure} if failure else {}
        return self._settle(entry, NOT_APPLIED_ACTION, reason=reason[:500], **extra)

    def _settle(self, entry, action: str, **details: Any):
        ev = entry.event
        return self.ledger.append(AuditEvent(
            actor=SERVER_ACTOR, action=action, target=self.run_id,
            details={"round": ev.round, "attempt": ev.attempt, "release_seq": entry.seq, "release_hash": entry.hash,
                     **details},
        ))

    def reconcile(self, stored_round: int, stored_model_hash: str | None) -> list[str]:
        """At a run's (re)start: settle the releases a crash left unsettled (spent, neither
        applied nor not-applied). The orchestrator writes its checkpoint before
        ``release.applied``, so the last unsettled release of the stored checkpoint's round is
        the one that built it (applied); every other was spent and never stored (not applied:
        its round is re-run as a new release). Only releases of the stored round or later are
        looked at: an earlier one was settled when the run went past it (or predates
        write-ahead accounting). Returns the actions written."""
        entries = self.ledger.entries()
        settled = {int(e.event.details.get("release_seq", -1)) for e in entries
                   if isinstance(e.event, AuditEvent) and e.event.target == self.run_id
                   and e.event.action in (APPLIED_ACTION, NOT_APPLIED_ACTION)}
        orphans = [e for e in entries if isinstance(e.event, GaussianRoundEvent) and e.event.run_id == self.run_id
                   and e.seq not in settled and e.event.round >= stored_round]
        built = max((e.seq for e in orphans if e.event.round == stored_round), default=None)
        written = []
        for e in orphans:
            if e.seq == built and stored_round >= 1 and stored_model_hash:
                self._settle(e, APPLIED_ACTION, model_hash=stored_model_hash, settled_at_restart=True)
                written.append(APPLIED_ACTION)
            else:
                self.not_applied(e, "the server stopped after the release was accounted and before its model was "
                                    "stored; the round is re-run as a new release")
                written.append(NOT_APPLIED_ACTION)
        return written

    # 5 ----------------------------------------------------------------------------------------
    def release_event(self, round_: int, attempt: int, sampled: int, survivors: int, noise_std: float,
                      model_hash: str) -> GaussianRoundEvent:
        return release_event(self.plan, run_id=self.run_id, round_=round_, attempt=attempt, sampled=sampled,
                             survivors=survivors, noise_std=noise_std, model_hash=model_hash)

    # 7 ----------------------------------------------------------------------------------------
    def epsilon(self) -> AccountingResult | None:
        """The accountant's epsilon over every release of this run in the ledger (None: none)."""
        releases = self.ledger.releases(self.run_id)
        if not releases:
            return None
        return self.plan.accountant().epsilon(releases, self.plan.delta)

    def epsilon_amplified(self) -> float | None:
        """Epsilon over this run's releases for third parties who see only the released model
        (amplified by sampling; None: no release, or undefined). Shown beside the headline."""
        releases = self.ledger.releases(self.run_id)
        if not releases:
            return None
        return self.plan.accountant().epsilon_amplified(releases, self.plan.delta)

    def release_entry(self, model_hash: str):
        """The ledger entry of this run's release that produced ``model_hash`` (its receipt),
        or None: the release a ``release.applied`` entry names with that hash (a release
        written ahead names the masked sum), or a release event naming it directly."""
        entries = self.ledger.entries()
        by_seq = {e.seq: e for e in entries}
        for entry in reversed(entries):
            ev = entry.event
            if isinstance(ev, AuditEvent) and ev.action == APPLIED_ACTION and ev.target == self.run_id \
                    and ev.details.get("model_hash") == model_hash:
                return by_seq.get(int(ev.details.get("release_seq", -1)))
            if isinstance(ev, GaussianRoundEvent) and ev.run_id == self.run_id and ev.model_hash == model_hash:
                return entry
        return None

    # the planner's verdict, overridden ------------------------------------------------------------
    def record_raised_cap(self, cap: CapCheck) -> bool:
        """Record (once per run, before its first release) that the operator raised the run's
        epsilon cap above the default: ledger AuditEvent ``cap.raised`` with the numbers.
        Returns False when the ledger already holds it."""
        for e in self.ledger.events():
            if isinstance(e, AuditEvent) and e.action == CAP_RAISED_ACTION and e.target == self.run_id:
                return False
        self.ledger.append(AuditEvent(actor=SERVER_ACTOR, action=CAP_RAISED_ACTION, target=self.run_id,
                                      details={k: v for k, v in cap.to_dict().items() if v is not None}))
        return True

    def record_forced_plan(self, message: str, numbers: dict[str, Any]) -> bool:
        """Record (once per run, before its first release) that the operator forced a plan
        the planner refuses: ledger AuditEvent ``plan.forced`` with the planner's message and
        numbers. Returns False when the ledger already holds it."""
        for e in self.ledger.events():
            if isinstance(e, AuditEvent) and e.action == "plan.forced" and e.target == self.run_id:
                return False
        kept = {k: v for k, v in numbers.items() if isinstance(v, (int, float, str, bool)) and
                (not isinstance(v, float) or math.isfinite(v))}
        self.ledger.append(AuditEvent(actor=SERVER_ACTOR, action="plan.forced", target=self.run_id,
                                      details={"message": message[:2000], **kept}))
        return True

    # a release that did not happen --------------------------------------------------------------
    def fail(self, round_: int, attempt: int, reason: str, **counts: int) -> float:
        """Record a round that released nothing (ledger AuditEvent ``round.failed``); returns
        the epsilon spent so far."""
        self.ledger.append(AuditEvent(
            actor=SERVER_ACTOR, action=FAILED_ACTION, target=self.run_id,
            details={"round": round_, "attempt": attempt, **counts, "released": False, "reason": reason[:500]},
        ))
        spent = self.epsilon()
        return 0.0 if spent is None else spent.epsilon


__all__ = [
    "ReleasePolicy", "SecureAggregationPolicy", "ReleasePlan", "plan_release", "BudgetDecision", "check_plan",
    "DEFAULT_MAX_EPSILON", "CAP_RAISED_ACTION", "CapCheck", "check_cap",
    "dp_parameters", "released_noise_std", "sum_noise_std", "add_noise", "release_event", "expected_epsilon", "ReleaseWorkflow",
    "Release",
    "RoundParameters", "Published", "MIN_COHORT", "SERVER_ACTOR", "APPLIED_ACTION", "NOT_APPLIED_ACTION", "FAILED_ACTION",
]
