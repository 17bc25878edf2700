"""``RunConfig``: the validated configuration of one federated training run.

This is the contract between whoever *creates* a run (the API service, the CLI, the demo)
and the ServerApp that executes it (``restwise.server.app``, simulated or deployed): the creator writes
``RunConfig.to_dict()`` as ``config.json`` into the run directory, the ServerApp reads it back
with ``RunConfig.from_dict``. Every check raises ``RunConfigError`` (a ``ValueError``) whose
``field`` attribute names the offending field, so an API can answer 422 naming it.

``model`` names an architecture of the model registry (``restwise.models.registry``); the
privacy side sees the run only as a :class:`~restwise.privacy.release.ReleasePolicy`
(:meth:`RunConfig.release_policy`).

Privacy-relevant fields, in the words of the analysis (docs/federated.md):

    population       N, the number of persons (simulated or real devices) who may be sampled;
                     the privacy unit is one person = one device.
    sampling         "poisson": each device joins a round independently with probability
                     ``sampling_rate`` (q) - accounted as Poisson subsampling;
                     "fixed": exactly ``cohort_size`` devices drawn uniformly without
                     replacement - accounted as fixed-size sampling.
    target_epsilon   with ``delta``: the run's (epsilon, delta) budget; the noise multiplier
                     is calibrated from it for ``rounds`` rounds by the accountant. Give
                     exactly one of ``target_epsilon`` and ``noise_multiplier``.
    noise_multiplier z, given directly (the budget is then what z and ``rounds`` spend).
    clip_norm        C, the L2 bound of one device's update, enforced on the device. A model
                     learnt from one release of statistics (``models.registry.ONE_RELEASE``)
                     declares its own documented bound, which replaces it (``sensitivity``).
    noise            "distributed": every device adds its share of the Gaussian noise before
                     masking, so nobody - not even the server - sees a less-noised sum;
                     "central": devices send clipped, masked, un-noised updates and the
                     server adds N(0, (zC)^2) to the aggregate (trusts the server).
    secagg_*         the secure-aggregation neighbourhood k and reconstruction threshold t
                     (a count, or a fraction of k when < 1).
    max_dropout_fraction  the largest fraction of a round's sampled devices that may be lost;
                     more and the round fails and releases nothing. It also fixes the minimum
                     surviving cohort the distributed noise is sized for.
    max_epsilon      the run's epsilon cap (default ``DEFAULT_MAX_EPSILON`` = 10): a run whose
                     planned releases would spend more - against the server, which draws each
                     cohort, so with no amplification by sampling claimed - is refused at
                     creation with the numbers (:meth:`RunConfig.cap_check`). ``force`` does not
                     lift it; only raising ``max_epsilon`` does, and a raised cap is recorded
                     (ledger AuditEvent ``cap.raised``, the service's audit log, the report).
    force            the operator accepts a plan the planner refuses (:meth:`RunConfig.plan`:
                     a DP run whose noise is expected to swamp what it learns, e.g. the network
                     on a small cohort). Recorded in the run's ledger and the service's audit log.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from restwise.common.errors import ModelError
from restwise.models.registry import DEFAULT_MODEL, ONE_RELEASE, Architecture, get_architecture, known_models
from restwise.privacy.accountant import MIN_NOISE_MULTIPLIER
from restwise.privacy.release import (
    DEFAULT_MAX_EPSILON,
    NOISE_PLACEMENTS,
    SAMPLING_METHODS,
    ReleasePolicy,
    CapCheck,
    SecureAggregationPolicy,
    check_cap,
    plan_release,
)
from restwise.privacy.secagg.config import SecAggConfig
from restwise.privacy.secagg.errors import SecAggConfigError
from restwise.privacy.utility import UtilityVerdict, assess_release
from restwise.server.errors import PlanError, RunConfigError

KNOWN_DATASETS = ("demo", "synthetic", "soccermon", "lifesnaps")


@dataclass(frozen=True)
class RunConfig:
    name: str
    rounds: int
    population: int
    model: str = DEFAULT_MODEL
    sampling: str = "poisson"
    sampling_rate: float | None = None
    cohort_size: int | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    noise_multiplier: float | None = None
    clip_norm: float = 1.0
    # Complete graph up to 33 devices (k >= n - 1); a sparse k=4, t=3 graph aborts a round as
    # soon as one device loses 2 of its 4 neighbours (see docs/secure-aggregation.md).
    secagg_num_neighbours: int = 32
    secagg_threshold: int | float = 0.6  # a count (>= 1) or a fraction of k (< 1)
    max_dropout_fraction: float = 0.3
    local_epochs: int = 1
    learning_rate: float = 0.01
    batch_size: int = 32
    round_timeout_s: float = 600.0
    dataset: str = "demo"
    persons: int | None = None
    seed: int = 0
    noise: str = "distributed"
    secure_aggregation: bool = True
    audit_key_path: str | None = None
    max_epsilon: float = DEFAULT_MAX_EPSILON
    force: bool = False

    def __post_init__(self) -> None:
        _check_str(self, "name", max_len=100)
        _check_int(self, "rounds", lo=1, hi=100_000)
        if not isinstance(self.model, str) or self.model not in known_models():
            raise RunConfigError("model", f"unknown model; known models: {', '.join(known_models())}")
        try:
            architecture = self.architecture
        except ModelError as exc:
            raise RunConfigError("model", str(exc)) from None
        if architecture.protocol == ONE_RELEASE and self.rounds != 1:
            raise RunConfigError("rounds", f"the {self.model} model is learnt from one release of statistics: rounds must be 1")
        _check_int(self, "population", lo=1, hi=10_000_000)
        if self.sampling not in SAMPLING_METHODS:
            raise RunConfigError("sampling", f"must be one of {', '.join(SAMPLING_METHODS)}")
        if self.sampling == "poisson":
            if self.sampling_rate is None:
                raise RunConfigError("sampling_rate", "required with poisson sampling")
            if self.cohort_size is not None:
                raise RunConfigError("cohort_size", "not used with poisson sampling (give sampling_rate)")
            _check_float(self, "sampling_rate", lo=0.0, hi=1.0, lo_open=True)
        else:
            if self.cohort_size is None:
                raise RunConfigError("cohort_size", "required with fixed-size sampling")
            if self.sampling_rate is not None:
                raise RunConfigError("sampling_rate", "not used with fixed-size sampling (give cohort_size)")
            _check_int(self, "cohort_size", lo=1, hi=10_000_000)
            if self.cohort_size > self.population:
                raise RunConfigError(
                    "cohort_size", f"cohort ({self.cohort_size}) is larger than the population ({self.population})"
                )
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise RunConfigError("target_epsilon", "give exactly one of target_epsilon and noise_multiplier")
        if self.target_epsilon is not None:
            _check_float(self, "target_epsilon", lo=0.0, hi=1000.0, lo_open=True)
        if self.noise_multiplier is not None:
            _check_float(self, "noise_multiplier", lo=MIN_NOISE_MULTIPLIER, hi=1000.0)
        _check_float(self, "delta", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        _check_float(self, "clip_norm", lo=0.0, hi=1e6, lo_open=True)
        _check_int(self, "secagg_num_neighbours", lo=2, hi=100_000)
        _check_float(self, "secagg_threshold", lo=0.0, hi=100_000.0, lo_open=True)
        if self.secagg_threshold >= 1:
            if self.secagg_threshold != int(self.secagg_threshold):
                raise RunConfigError("secagg_threshold", "a count must be a whole number (a fraction of k must be < 1)")
            object.__setattr__(self, "secagg_threshold", int(self.secagg_threshold))  # a count
        else:
            object.__setattr__(self, "secagg_threshold", float(self.secagg_threshold))  # a fraction of k
        if self.secagg_threshold > self.secagg_num_neighbours:
            raise RunConfigError(
                "secagg_threshold",
                f"threshold ({self.secagg_threshold:g}) is above the number of shares "
                f"(secagg_num_neighbours = {self.secagg_num_neighbours})",
            )
        _check_float(self, "max_dropout_fraction", lo=0.0, hi=0.5, hi_open=True)
        _check_int(self, "local_epochs", lo=1, hi=1000)
        _check_float(self, "learning_rate", lo=0.0, hi=10.0, lo_open=True)
        _check_int(self, "batch_size", lo=1, hi=1_000_000)
        _check_float(self, "round_timeout_s", lo=0.0, hi=86_400.0, lo_open=True)
        _check_str(self, "dataset", max_len=4096)
        if self.dataset not in KNOWN_DATASETS and not (os.sep in self.dataset or "/" in self.dataset):
            raise RunConfigError(
                "dataset", f"unknown dataset; give one of {', '.join(KNOWN_DATASETS)} or a path to a cohort folder"
            )
        if self.persons is not None:
            _check_int(self, "persons", lo=1, hi=10_000_000)
            if self.persons < self.population:
                raise RunConfigError(
                    "population", f"population ({self.population}) exceeds the persons in the dataset ({self.persons})"
                )
        _check_int(self, "seed", lo=0, hi=2**63 - 1)
        if self.noise not in NOISE_PLACEMENTS:
            raise RunConfigError("noise", f"must be one of {', '.join(NOISE_PLACEMENTS)}")
        if not isinstance(self.secure_aggregation, bool):
            raise RunConfigError("secure_aggregation", "must be true or false")
        if not self.secure_aggregation and self.noise == "distributed":
            # Without masking the server would see each device's (weakly) noised update.
            raise RunConfigError("secure_aggregation", "distributed noise needs secure aggregation; use noise=central")
        if self.secure_aggregation:
            self._check_secagg()
        if self.audit_key_path is not None:
            _check_str(self, "audit_key_path", max_len=4096)
        _check_float(self, "max_epsilon", lo=0.0, hi=1000.0, lo_open=True)
        if not isinstance(self.force, bool):
            raise RunConfigError("force", "must be true or false")
        if self.expected_cohort < 1:
            raise RunConfigError("sampling_rate", "the expected cohort (rate x population) is below one device")

    def _check_secagg(self) -> None:
        """The secure-aggregation parameters must form a valid SecAgg+ configuration (threshold
        a strict majority of a neighbourhood, reachable after the allowed dropouts)."""
        try:
            SecAggConfig(
                num_neighbours=self.secagg_num_neighbours,
                threshold=self.secagg_threshold,
                max_dropout_fraction=self.max_dropout_fraction,
                clip_range=1.0,
                frac_bits=16,
                max_cohort=max(3, min(self.population, 10_000)),
            )
        except SecAggConfigError as exc:
            message = str(exc).removeprefix("invalid SecAggConfig: ")
            raise RunConfigError("secagg_threshold", message) from None

    # -- derived values ------------------------------------------------------------------
    @property
    def architecture(self) -> Architecture:
        """The model architecture ``model`` names (restwise.models.registry)."""
        return get_architecture(self.model)

    @property
    def sensitivity(self) -> float:
        """C: the L2 bound of one device's contribution - the architecture's documented bound
        for a one-release model, else the clip norm of an update."""
        bound = self.architecture.l2_sensitivity
        return float(bound) if bound is not None else float(self.clip_norm)

    def release_policy(self) -> ReleasePolicy:
        """The run as the privacy side sees it (restwise.privacy.release)."""
        return ReleasePolicy(
            sensitivity=self.sensitivity, population=self.population, sampling=self.sampling,
            releases=self.rounds, delta=self.delta, sampling_rate=self.sampling_rate,
            cohort_size=self.cohort_size, target_epsilon=self.target_epsilon,
            noise_multiplier=self.noise_multiplier, noise=self.noise,
            secure_aggregation=SecureAggregationPolicy(
                num_neighbours=self.secagg_num_neighbours, threshold=self.secagg_threshold,
                max_dropout_fraction=self.max_dropout_fraction, timeout_s=self.round_timeout_s,
            ),
        )

    def plan(self) -> UtilityVerdict:
        """The planner's verdict on this run (``privacy.utility.assess_release`` on the
        architecture's release shape: the check behind ``restwise privacy plan``), with the
        run's own noise multiplier, cohort and dropout allowance. ``refused`` and not
        ``allowed`` when a DP run's noise is expected to swamp what it learns, unless
        ``force``. Raises PlanError when the plan cannot be made (e.g. a prior file that
        fails its checks)."""
        plan = plan_release(self.release_policy())
        try:
            shape = self.architecture.release_shape(rounds=self.rounds, clip_norm=self.clip_norm,
                                                    sampling_rate=self.sampling_probability)
            cohort = max(2, int(round(self.expected_cohort))) if self.architecture.protocol == ONE_RELEASE \
                else max(2, int(self.population))
            return assess_release(shape, cohort, plan.budget_epsilon, self.delta,
                                  noise_multiplier=plan.noise_multiplier, max_dropout_fraction=self.max_dropout_fraction,
                                  distributed=self.noise == "distributed", force=self.force)
        except (ValueError, ModelError) as exc:  # PriorError is a ValueError
            raise PlanError(f"the {self.model} run cannot be planned: {exc}") from None

    def cap_check(self) -> CapCheck:
        """The run's planned epsilon (against the sampler, after all its rounds) against its
        cap ``max_epsilon``. ``allowed`` False: the run is refused (``force`` does not lift
        it). Raises the accountant's errors for a configuration it cannot account."""
        return check_cap(plan_release(self.release_policy()), self.max_epsilon)

    @property
    def expected_cohort(self) -> float:
        """The expected number of devices sampled per round."""
        return self.release_policy().expected_cohort

    @property
    def sampling_probability(self) -> float:
        """q: the probability that one given person is in a round's cohort."""
        return self.release_policy().sampling_probability

    @property
    def device_count(self) -> int:
        """How many devices the federation has (one per person of the population)."""
        return self.population

    def min_survivors(self, sampled: int) -> int:
        """t_min: the fewest devices that must survive a round of ``sampled`` devices for it
        to be released. The distributed noise shares are sized for this many."""
        lost = math.floor(self.max_dropout_fraction * sampled + 1e-9)
        return max(1, sampled - lost)

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        if not isinstance(data, Mapping):
            raise RunConfigError("config", "must be a JSON object")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise RunConfigError(str(key), "unknown field")
        for key in ("name", "rounds", "population"):
            if data.get(key) is None:
                raise RunConfigError(key, "required")
        values = dict(data)
        # JSON has one number type: accept 3.0 for an integer field and 3 for a float field.
        for f in fields(cls):
            v = values.get(f.name)
            if f.name in _INT_FIELDS and isinstance(v, float) and v.is_integer():
                values[f.name] = int(v)
            elif f.name in _FLOAT_FIELDS and isinstance(v, int) and not isinstance(v, bool):
                values[f.name] = float(v)
        return cls(**values)

    def replace(self, **changes: Any) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})


_INT_FIELDS = {
    "rounds", "population", "cohort_size", "secagg_num_neighbours", "local_epochs", "batch_size", "persons", "seed",
}
_FLOAT_FIELDS = {
    "sampling_rate", "target_epsilon", "delta", "noise_multiplier", "clip_norm", "max_epsilon",
    "max_dropout_fraction", "learning_rate", "round_timeout_s",
}


def _check_str(cfg: RunConfig, name: str, *, max_len: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, str) or not value.strip():
        raise RunConfigError(name, "must be a non-empty string")
    if len(value) > max_len:
        raise RunConfigError(name, f"must be at most {max_len} characters")


def _check_int(cfg: RunConfig, name: str, *, lo: int, hi: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RunConfigError(name, "must be an integer")
    if not lo <= value <= hi:
        raise RunConfigError(name, f"must be between {lo} and {hi}")


def _check_float(
    cfg: RunConfig, name: str, *, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunConfigError(name, "must be a number")
    if not math.isfinite(value):
        raise RunConfigError(name, "must be a finite number")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        raise RunConfigError(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
