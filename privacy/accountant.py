"""The privacy accountant: epsilon for a sequence of Gaussian releases, tight and never low.

Built on Google's ``dp_accounting`` (pinned 0.6.0):

* the reported epsilon comes from its PLD (privacy loss distribution) accountant with
  pessimistic discretisation, so discretisation error can only make epsilon larger;
* its RDP accountant gives a second, independent upper bound (``epsilon_rdp_bound``), cheap to
  compute and used as a monitor;
* the headline is the epsilon against an adversary who knows who was sampled: the server
  picks each cohort, so against the server itself amplification by sampling does not hold.
  ``PrivacyAccountant()`` claims no amplification (``claim_amplification=False``, the
  default): its ``epsilon`` is that value, and every budget, calibration and report headline
  uses it. :meth:`PrivacyAccountant.epsilon_amplified` gives the amplified value, valid only
  for third parties who see just the released model, to stand beside it, labelled.
  (``claim_amplification=True`` makes ``epsilon`` the amplified value: what schema-1 reports
  headlined, kept so that they still verify.)

What is accounted, and how (C = clip norm, z = noise std / C):

=========================  ============================  ==========================================
sampling                   add/remove one person         replace one person (sensitivity 2C)
=========================  ============================  ==========================================
full (q = 1)               Gaussian(z)                   Gaussian, shift 2C (PLD REPLACE_ONE; RDP z/2)
poisson (rate q < 1)       PoissonSampled(q, Gaussian)   PLD: the larger of the REPLACE_ONE pair
                                                         (u = -v) and the add/remove pair (v = 0);
                                                         RDP: no bound in dp_accounting (None)
fixed (m of n, m < n)      refused (not defined: the     PLD of C_q(G_{2/z}) (Dong, Roth & Su 2022,
                           population size is public)    Thm 4.2): profile max(delta_R, delta_A) of
                                                         ((1-q)N(0)+qN(2C), N(0)) and its swap, one
                                                         symmetric PLD (valid under composition,
                                                         Lebeda et al. 2024); RDP: Wang et al. 2019
=========================  ============================  ==========================================

``claim_amplification=False`` (the default) accounts every release as if the adversary knew
the cohort (no amplification): valid for any sampling scheme, including fixed-size sampling.

Identical releases are grouped and composed with ``SelfComposedDpEvent`` (one FFT
self-composition per distinct mechanism, never one PLD per round), so 10,000 rounds cost
about as much as one. Composition is commutative, so grouping ignores order.

``dp_accounting`` is imported inside the functions that compute a number: it loads scipy
(about 1.3 s), and naming a release, validating a configuration, a device's DP mod or
``restwise --help`` must not pay for it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.metadata import version
from typing import Any, Iterable, Sequence

import numpy as np

from restwise.privacy.errors import AccountingError, NoiseTooSmallError, UnsupportedEventError
from restwise.privacy.events import GaussianRoundEvent, ReleaseSpec

MIN_NOISE_MULTIPLIER = 0.5
ACCOUNTANT_NAME = "dp_accounting.pld (privacy loss distribution, pessimistic)"
RDP_ACCOUNTANT_NAME = "dp_accounting.rdp.RdpAccountant"
# Added to root-finder results so they are upper bounds (the finder's tolerance is 1e-12).
_ROOT_TOLERANCE = 1e-9


@lru_cache(maxsize=1)
def dp_accounting_version() -> str:
    return version("dp-accounting")


@dataclass(frozen=True)
class PLDParameters:
    """Discretisation of the PLD. ``value_discretization_interval=None`` (default) picks it from
    the number of composed releases n: ``clip(1e-3 * sqrt(100 / n), 1e-4, 1e-3)`` - fine where
    many compositions accumulate discretisation error, coarse (and 10x faster) where few do.
    Either way the estimate is pessimistic: discretisation only ever raises epsilon.
    ``pessimistic_estimate``, ``use_connect_dots`` and ``log_mass_truncation_bound`` are
    dp_accounting's defaults, recorded so the report states them."""

    value_discretization_interval: float | None = None
    pessimistic_estimate: bool = True
    use_connect_dots: bool = True
    log_mass_truncation_bound: float = -50.0

    def __post_init__(self) -> None:
        vdi = self.value_discretization_interval
        if vdi is not None and not (isinstance(vdi, (int, float)) and 1e-6 <= vdi <= 0.1):
            raise AccountingError("value_discretization_interval must be in [1e-6, 0.1] or None (adaptive)")
        if self.pessimistic_estimate is not True:
            raise AccountingError("only pessimistic PLD discretisation is allowed (epsilon must never be low)")
        if not isinstance(self.use_connect_dots, bool) or not isinstance(self.log_mass_truncation_bound, (int, float)):
            raise AccountingError("invalid PLD parameters")
        if self.log_mass_truncation_bound > -20:
            raise AccountingError("log_mass_truncation_bound must be <= -20")

    def interval_for(self, releases: int) -> float:
        if self.value_discretization_interval is not None:
            return float(self.value_discretization_interval)
        return float(min(1e-3, max(1e-4, 1e-3 * math.sqrt(100.0 / max(1, releases)))))


@lru_cache(maxsize=128)
def _base_pld(noise_multiplier: float, sampling_rate: float, adjacency: str, interval: float, params: PLDParameters):
    """One release's PLD (built once, reused across compositions and curve points)."""
    # deferred: dp_accounting loads scipy (see the module docstring)
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sensitivity=1.0,
        pessimistic_estimate=params.pessimistic_estimate,
        value_discretization_interval=interval,
        log_mass_truncation_bound=params.log_mass_truncation_bound,
        sampling_prob=sampling_rate,
        use_connect_dots=params.use_connect_dots,
        neighboring_relation=_neighbor_relation(adjacency),
    )


@lru_cache(maxsize=128)
def _fixed_size_pld(noise_multiplier: float, sampling_rate: float, interval: float, params: PLDParameters):
    """One release's PLD under fixed-size sampling without replacement (m of n, q = m/n) and
    replace-one adjacency, as a symmetric PLD that composes validly.

    Dong, Roth & Su (2022, Thm 4.2): if releasing the noised sum of a cohort is f-DP under
    replace-one, sampling the cohort without replacement makes it C_q(f)-DP with
    C_q(f) = min(f_q, f_q^-1)** and f_q = q f + (1 - q) Id. Here f = G_{2/z} (replacing one
    person moves the clipped sum by up to 2C). By convex conjugacy its privacy profile is
    delta(eps) = max(delta_R(eps), delta_A(eps)) for every eps, where R is the pair
    ((1-q) N(0, z^2) + q N(2, z^2), N(0, z^2)) and A the same pair swapped (Zhu, Dong & Wang
    2022). Composing R alone (or R and A apart) is the pitfall Lebeda et al. (2024) warn of;
    a PLD of the symmetric C_q(f) itself composes. It is built from that profile by
    dp_accounting's pessimistic connect-the-dots (Doroshenko et al. 2022) on the grid
    spanning both pairs' truncated loss ranges, as dp_accounting does for its own mechanisms.
    See docs/privacy-accounting.md, "Fixed-size sampling".
    """
    # deferred: dp_accounting loads scipy (see the module docstring)
    from dp_accounting.pld import pld_pmf, privacy_loss_distribution, privacy_loss_mechanism

    adjacency = privacy_loss_mechanism.AdjacencyType
    pairs = [
        privacy_loss_mechanism.GaussianPrivacyLoss(
            noise_multiplier,
            sensitivity=2.0,
            pessimistic_estimate=params.pessimistic_estimate,
            log_mass_truncation_bound=params.log_mass_truncation_bound,
            sampling_prob=sampling_rate,
            adjacency_type=direction,
        )
        for direction in (adjacency.REMOVE, adjacency.ADD)
    ]
    bounds = [pair.connect_dots_bounds() for pair in pairs]
    lower = math.floor(min(b.epsilon_lower for b in bounds) / interval)
    upper = math.ceil(max(b.epsilon_upper for b in bounds) / interval)
    grid = np.arange(lower, upper + 1) * interval
    deltas = np.maximum(pairs[0].get_delta_for_epsilon(grid), pairs[1].get_delta_for_epsilon(grid))
    pmf = pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(interval, lower, upper, deltas)
    return privacy_loss_distribution.PrivacyLossDistribution(pmf)  # symmetric: C_q(f) is


@dataclass(frozen=True)
class AccountingResult:
    epsilon: float  # the reported value (PLD)
    epsilon_rdp_bound: float | None  # independent RDP upper bound, None where dp_accounting has none
    epsilon_no_amplification: float  # against an adversary who knows the sampled cohort (PLD)
    delta: float
    releases: int
    adjacency: str
    amplification_claimed: bool
    accountant: str
    accountant_version: str
    pld_parameters: dict
    groups: tuple = ()  # ((spec as dict, count), ...): what was composed
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["groups"] = [{"spec": spec, "count": count} for spec, count in self.groups]
        out["notes"] = list(self.notes)
        return out


def _neighbor_relation(adjacency: str):
    # deferred: dp_accounting loads scipy (see the module docstring)
    import dp_accounting

    return {
        "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
    }[adjacency]


def _specs(items: Iterable[GaussianRoundEvent | ReleaseSpec]) -> list[ReleaseSpec]:
    out = []
    for item in items:
        if isinstance(item, GaussianRoundEvent):
            out.append(item.spec())
        elif isinstance(item, ReleaseSpec):
            out.append(item)
        else:
            raise UnsupportedEventError(
                f"the accountant reads GaussianRoundEvent releases only, got {type(item).__name__}", event=item
            )
    return out


@lru_cache(maxsize=1)
def _rdp_orders():
    # deferred: dp_accounting loads scipy (see the module docstring)
    from dp_accounting.rdp import rdp_privacy_accountant

    return tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


# Integer orders only: closed forms, much faster at small noise; a (looser) valid bound. Used
# where any upper bound will do (the calibration's starting point).
FAST_RDP_ORDERS = tuple(range(2, 129)) + (160, 192, 256, 384, 512)


@lru_cache(maxsize=256)
def _rdp_vector(spec: ReleaseSpec, amplified: bool, orders: tuple | None = None):
    """RDP of one release at dp_accounting's default orders (numpy array), or None."""
    # deferred: dp_accounting loads scipy (see the module docstring)
    import dp_accounting
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    relation = dp_accounting.NeighboringRelation
    if spec.adjacency == "add_remove":
        z = spec.noise_multiplier
        if amplified and spec.sampling == "poisson":
            event = dp_event.PoissonSampledDpEvent(spec.sampling_rate, dp_event.GaussianDpEvent(z))
        else:
            event = dp_event.GaussianDpEvent(z)
        rel = relation.ADD_OR_REMOVE_ONE
    else:
        # dp_accounting's RDP Gaussian assumes sensitivity 1 whatever the relation; replace-one
        # moves the clipped sum by up to 2C, so the multiplier halves.
        half = dp_event.GaussianDpEvent(spec.noise_multiplier / 2.0)
        if not amplified or spec.sampling == "full":
            event = half
        elif spec.sampling == "fixed":
            event = dp_event.SampledWithoutReplacementDpEvent(spec.population, spec.cohort_size, half)
        else:
            return None  # Poisson + replace-one: no RDP analysis in dp_accounting 0.6
        rel = relation.REPLACE_ONE
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(orders or _rdp_orders()), neighboring_relation=rel)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # it logs each order it skips at small noise; the bound stays valid
    try:
        accountant.compose(event)
    finally:
        absl.setLevel(level)
    vector = np.array(accountant._rdp, dtype=float)  # the per-order RDP it accumulated
    vector.setflags(write=False)
    return vector


class PrivacyAccountant:
    """Computes (epsilon, delta) for Gaussian releases. Stateless: pass all releases each time.

    ``supports(event)`` says whether an event can be accounted (``why_unsupported`` says why
    not); ``epsilon(events, delta)`` refuses unsupported ones with UnsupportedEventError.
    """

    def __init__(
        self,
        *,
        pld: PLDParameters | None = None,
        claim_amplification: bool = False,
    ):
        self.pld = pld or PLDParameters()
        self.claim_amplification = claim_amplification

    # -- what can be accounted -------------------------------------------------------------
    def why_unsupported(self, item: GaussianRoundEvent | ReleaseSpec) -> str | None:
        try:
            spec = _specs([item])[0]
        except UnsupportedEventError as exc:
            return str(exc)
        if spec.noise_multiplier < MIN_NOISE_MULTIPLIER:
            return (
                f"noise multiplier {spec.noise_multiplier:.6g} is below the supported minimum "
                f"{MIN_NOISE_MULTIPLIER} (noise this small gives no meaningful protection and "
                "the numerical accountant is not trusted there)"
            )
        if self.claim_amplification and spec.sampling == "fixed" and spec.adjacency == "add_remove":
            return (
                "fixed-size sampling without replacement is only defined under replace-one "
                "adjacency (the population size is public, so a neighbouring population has the "
                "same size); account it under replace-one, or use Poisson sampling"
            )
        return None

    def supports(self, item: GaussianRoundEvent | ReleaseSpec) -> bool:
        return self.why_unsupported(item) is None

    def _check(self, specs: Sequence[ReleaseSpec], events: Sequence[Any]) -> str:
        if not specs:
            raise AccountingError("no releases to account")
        adjacencies = {s.adjacency for s in specs}
        if len(adjacencies) > 1:
            raise UnsupportedEventError(
                "releases under different adjacency relations (add_remove and replace_one) cannot "
                "be composed into one epsilon"
            )
        for spec, event in zip(specs, events):
            reason = self.why_unsupported(spec)
            if reason is None:
                continue
            if spec.noise_multiplier < MIN_NOISE_MULTIPLIER:
                raise NoiseTooSmallError(
                    reason, noise_multiplier=spec.noise_multiplier, minimum=MIN_NOISE_MULTIPLIER, event=event
                )
            where = ""
            if isinstance(event, GaussianRoundEvent):
                where = f"run {event.run_id!r} round {event.round}: "
            raise UnsupportedEventError(where + reason, event=event)
        return adjacencies.pop()

    # -- dp_accounting events --------------------------------------------------------------
    def _pld_epsilon(self, groups: Counter, delta: float, adjacency: str, amplified: bool) -> float:
        """PLD epsilon: each distinct release's PLD self-composed ``count`` times (FFT, one
        call per group), then the groups composed. Same construction as dp_accounting's
        PLDAccountant for PoissonSampledDpEvent/GaussianDpEvent, with base PLDs cached."""
        if not amplified:
            return self._gaussian_epsilon(groups, delta, adjacency)
        eps = self._composed_pld_epsilon(groups, delta, adjacency)
        if adjacency == "replace_one" and any(spec.sampling == "poisson" for spec in groups):
            # Under Poisson sampling, replacing a person's update u by v gives the pair
            # ((1-q)N(0)+qN(u), (1-q)N(0)+qN(v)). dp_accounting's replace-one PLD takes
            # u = -v (|u| = C); v = 0 (a zero update) gives the add/remove pair instead. The
            # pair that is worst for one round need not stay worst under composition
            # (Lebeda et al. 2024), so both are composed and the larger epsilon is reported.
            eps = max(eps, self._composed_pld_epsilon(groups, delta, "add_remove"))
        return eps

    def _composed_pld_epsilon(self, groups: Counter, delta: float, relation: str) -> float:
        interval = self.pld.interval_for(sum(groups.values()))
        composed = None
        for spec, count in sorted(groups.items(), key=lambda kv: repr(kv[0])):
            if spec.sampling == "fixed":
                # replace-one only (add/remove is refused before this point); one symmetric
                # PLD whatever ``relation`` the Poisson groups beside it are composed under
                base = _fixed_size_pld(spec.noise_multiplier, spec.sampling_rate, interval, self.pld)
            else:
                base = _base_pld(spec.noise_multiplier, spec.sampling_rate, relation, interval, self.pld)
            part = base.self_compose(count) if count > 1 else base
            composed = part if composed is None else composed.compose(part)
        return float(composed.get_epsilon_for_delta(delta))

    @staticmethod
    def _gaussian_epsilon(groups: Counter, delta: float, adjacency: str) -> float:
        """Exact epsilon of composed Gaussian releases without sampling.

        Gaussians compose exactly into one Gaussian (1/z_total^2 = sum of 1/z_i^2), whose
        epsilon has a closed form (Balle & Wang 2018, as dp_accounting.gaussian_mechanism);
        replace-one doubles the sensitivity. This is exact where a PLD would only approximate
        (and is orders of magnitude faster for large epsilons). The root finder's tolerance
        is added so the value never errs low.
        """
        # deferred: dp_accounting loads scipy (see the module docstring)
        from dp_accounting import gaussian_mechanism

        precision = sum(count / spec.noise_multiplier**2 for spec, count in groups.items())
        sigma = 1.0 / math.sqrt(precision)
        if adjacency == "replace_one":
            sigma /= 2.0
        return float(gaussian_mechanism.get_epsilon_gaussian(sigma, delta, tol=1e-12)) + _ROOT_TOLERANCE

    @staticmethod
    def _rdp_epsilon(groups: Counter, delta: float, amplified: bool, orders: tuple | None = None) -> float | None:
        """RDP upper bound, or None where dp_accounting has no sound RDP analysis. RDP composes
        by adding per-order vectors, so each distinct release's vector is computed once."""
        # deferred: dp_accounting loads scipy (see the module docstring)
        from dp_accounting.rdp import rdp_privacy_accountant

        total = None
        for spec, count in groups.items():
            vector = _rdp_vector(spec, amplified, orders)
            if vector is None:
                return None
            total = count * vector if total is None else total + count * vector
        eps, _ = rdp_privacy_accountant.compute_epsilon(orders or _rdp_orders(), total, delta)
        return float(eps)

    # -- public API ------------------------------------------------------------------------
    def epsilon(self, releases: Sequence[GaussianRoundEvent | ReleaseSpec], delta: float) -> AccountingResult:
        """Epsilon at ``delta`` for all ``releases`` (events or planning specs) composed."""
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise AccountingError("delta must be in (0, 1)")
        releases = list(releases)
        specs = _specs(releases)
        adjacency = self._check(specs, releases)
        return self._result(Counter(specs), delta, adjacency)

    def epsilon_value(
        self, releases: Sequence[GaussianRoundEvent | ReleaseSpec], delta: float, *, against: str = "amplified"
    ) -> float:
        """Only the reported epsilon (``against="amplified"``) or the one against a server that
        knows the cohort (``"no_amplification"``): what budgets and calibration need, without
        the RDP bound and the second value."""
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise AccountingError("delta must be in (0, 1)")
        if against not in ("amplified", "no_amplification"):
            raise AccountingError("against must be 'amplified' or 'no_amplification'")
        releases = list(releases)
        specs = _specs(releases)
        # Without amplification any sampling scheme is accountable (fixed-size included).
        checker = self if against == "amplified" else PrivacyAccountant(pld=self.pld, claim_amplification=False)
        adjacency = checker._check(specs, releases)
        groups = Counter(specs)
        amplified = against == "amplified" and self.claim_amplification and any(s.sampling != "full" for s in groups)
        return self._pld_epsilon(groups, delta, adjacency, amplified=amplified)

    def epsilon_amplified(self, releases: Sequence[GaussianRoundEvent | ReleaseSpec], delta: float) -> float | None:
        """The epsilon for third parties who see only the released model: amplified by
        sampling (PLD), which holds only against someone who does not know each round's
        cohort - never against the server, which drew it. Equal to the unamplified value when
        every release used all devices; None where amplification is not defined (fixed-size
        sampling under add/remove). Never a headline or a budget: it stands beside one."""
        amplifying = PrivacyAccountant(pld=self.pld, claim_amplification=True)
        try:
            return amplifying.epsilon_value(releases, delta, against="amplified")
        except UnsupportedEventError:
            specs = _specs(list(releases))
            if any(amplifying.why_unsupported(s) for s in specs) and not any(
                    self.why_unsupported(s) for s in specs):
                return None  # defined without amplification, not with it
            raise

    def rdp_epsilon_for_rounds(
        self, spec: ReleaseSpec, rounds: int, delta: float, *, fast: bool = False
    ) -> float | None:
        """The RDP upper bound alone (None where dp_accounting has no RDP analysis). ``fast``
        uses integer orders only: quicker at small noise, looser, still an upper bound."""
        self._check([spec], [spec])
        orders = FAST_RDP_ORDERS if fast else None
        return self._rdp_epsilon(Counter({spec: rounds}), delta, amplified=self.claim_amplification, orders=orders)

    def epsilon_for_rounds(self, spec: ReleaseSpec, rounds: int, delta: float) -> AccountingResult:
        """Epsilon after ``rounds`` identical releases (planning)."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise AccountingError("rounds must be a positive integer")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise AccountingError("delta must be in (0, 1)")
        adjacency = self._check([spec], [spec])
        return self._result(Counter({spec: rounds}), delta, adjacency)

    def _result(self, groups: Counter, delta: float, adjacency: str) -> AccountingResult:
        eps_no_amp = self._pld_epsilon(groups, delta, adjacency, amplified=False)
        amplified = self.claim_amplification and any(s.sampling != "full" for s in groups)
        eps = self._pld_epsilon(groups, delta, adjacency, amplified=True) if amplified else eps_no_amp
        rdp = self._rdp_epsilon(groups, delta, amplified=self.claim_amplification)
        notes = []
        if rdp is None:
            notes.append(
                "no RDP bound: dp_accounting's RDP accountant has no analysis of Poisson "
                "sampling under replace-one adjacency"
            )
        elif rdp < eps:
            notes.append(
                f"the RDP bound is below the PLD value by {eps - rdp:.3g}: the PLD "
                "discretisation is pessimistic; the reported epsilon errs high"
            )
        if not self.claim_amplification:
            notes.append("amplification by sampling not claimed: every release accounted as if the cohort were known")
        return AccountingResult(
            epsilon=eps,
            epsilon_rdp_bound=rdp,
            epsilon_no_amplification=eps_no_amp,
            delta=float(delta),
            releases=sum(groups.values()),
            adjacency=adjacency,
            amplification_claimed=self.claim_amplification,
            accountant=ACCOUNTANT_NAME,
            accountant_version=f"dp-accounting {dp_accounting_version()}",
            pld_parameters=asdict(self.pld) | {"interval_used": self.pld.interval_for(sum(groups.values()))},
            groups=tuple(
                (asdict(spec), count) for spec, count in sorted(groups.items(), key=lambda kv: repr(kv[0]))
            ),
            notes=tuple(notes),
        )

    def epsilon_curve(
        self, releases: Sequence[GaussianRoundEvent], delta: float, *, max_points: int = 40
    ) -> list[dict[str, Any]]:
        """Epsilon after each prefix of ``releases`` (in ledger order), at most ``max_points``
        evenly spaced prefixes, always including the last. Each point is computed exactly like
        :meth:`epsilon` on that prefix, so a verifier gets the same numbers."""
        releases = list(releases)
        n = len(releases)
        if n == 0:
            return []
        if n <= max_points:
            cuts = list(range(1, n + 1))
        else:
            cuts = sorted({max(1, round(n * k / max_points)) for k in range(1, max_points + 1)} | {n})
        points = []
        for cut in cuts:
            res = self.epsilon(releases[:cut], delta)
            last = releases[cut - 1]
            points.append(
                {
                    "releases": cut,
                    "round": last.round if isinstance(last, GaussianRoundEvent) else cut,
                    "epsilon": res.epsilon,
                    "epsilon_rdp_bound": res.epsilon_rdp_bound,
                    "epsilon_no_amplification": res.epsilon_no_amplification,
                }
            )
        return points


def clear_caches() -> None:
    """Forget the cached release PLDs and RDP vectors (benchmarks time cold computations)."""
    _base_pld.cache_clear()
    _fixed_size_pld.cache_clear()
    _rdp_vector.cache_clear()


def epsilon(releases: Sequence[GaussianRoundEvent | ReleaseSpec], delta: float, **kwargs) -> AccountingResult:
    """Shortcut: ``PrivacyAccountant(**kwargs).epsilon(releases, delta)``."""
    return PrivacyAccountant(**kwargs).epsilon(releases, delta)
