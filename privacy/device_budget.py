"""The device's own privacy budget: its epsilon across every run it took part in.

A run's report accounts the run; a person takes part in many runs. Each device composes its own
epsilon from what it knows for certain: the releases it sent a masked input to (its *spends*,
recorded before the input left, :mod:`restwise.client.receipts_store`), each at the noise the
round's message guaranteed at its worst case (the fewest survivors the secure round can
release with: noise std exactly z C). A receipt (the release's signed ledger entry) settles a
spend; an unsettled spend counts exactly as much - a device that never hears back is never
under-counted - and a receipt never lowers a spend below that worst case (the server could
claim more survivors, i.e. more noise, than there were).

No amplification by sampling is claimed: the server picks each cohort, so against it a
release is a plain Gaussian mechanism on this person's clipped vector. Gaussian mechanisms
compose exactly into one Gaussian (1/z^2 adds up), which :class:`PrivacyAccountant` evaluates
in closed form (sampling "full"). Adjacency: each run's (add/remove: sensitivity C; replace-one:
2C); a device whose runs used both is accounted under replace-one for all (it dominates).
Delta: the smallest delta of the runs involved (the largest epsilon).

The participation check (:func:`within_cap`) runs in the first message of every round, in a
fresh process on a phone: it must not load scipy (~1 s). It uses the same closed form from the
other side - a composed Gaussian is (E, delta)-DP exactly when its delta at E is at most delta
(Balle & Wang 2018, Thm. 8) - with the standard library's erfc; a test checks it against the
accountant at the boundary.

Default cap (:data:`DEFAULT_MAX_EPSILON` = 10, at each run's delta): what a person may lose
over all the runs their device takes part in, against the server itself. 10 admits the
one-release linear head (epsilon 4 without amplification per run) twice, or a few rounds of
DP-FedAvg, and then stops: above ~10 a Gaussian mechanism's guarantee (e^10 ~ 22,000 in
likelihood ratio) no longer means much. An owner sets their own with
``restwise device consent --max-epsilon E``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.errors import AccountingError
from restwise.privacy.events import ReleaseSpec

DEFAULT_MAX_EPSILON = 10.0
ADJACENCIES = ("add_remove", "replace_one")


@dataclass(frozen=True)
class Spend:
    """One release this device sent a masked input to, as the round's message described it."""

    run_id: str
    round: int
    attempt: int
    noise_multiplier: float  # z at the round's worst case (std exactly z C)
    sensitivity: float  # C (informational: z is relative to it)
    delta: float  # the run's delta
    adjacency: str  # the run's adjacency
    receipt_seq: int | None = None  # the ledger seq of its receipt (None: pending)

    @property
    def settled(self) -> bool:
        return self.receipt_seq is not None

    def __post_init__(self) -> None:
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier > 0):
            raise AccountingError("a spend's noise multiplier must be a positive finite number")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise AccountingError("a spend's delta must be in (0, 1)")
        if self.adjacency not in ADJACENCIES:
            raise AccountingError(f"a spend's adjacency must be one of {', '.join(ADJACENCIES)}")


def _adjacency(spends: Iterable[Spend]) -> str:
    return "replace_one" if any(s.adjacency == "replace_one" for s in spends) else "add_remove"


def device_delta(spends: Sequence[Spend]) -> float:
    return min(s.delta for s in spends)


def device_epsilon(spends: Sequence[Spend], delta: float | None = None) -> float:
    """The device's epsilon over ``spends`` (0 for none), at ``delta`` (default: the smallest
    of theirs), by the accountant, no amplification claimed."""
    spends = list(spends)
    if not spends:
        return 0.0
    adjacency = _adjacency(spends)
    specs = [ReleaseSpec.plan(noise_multiplier=float(s.noise_multiplier), sampling="full", adjacency=adjacency)
             for s in spends]
    accountant = PrivacyAccountant(claim_amplification=False)
    return accountant.epsilon_value(specs, device_delta(spends) if delta is None else delta,
                                    against="no_amplification")


def composed_sigma(spends: Sequence[Spend]) -> float:
    """The std (in units of the sensitivity of one person's vector under the device's
    adjacency) of the one Gaussian the spends compose into."""
    precision = sum(1.0 / float(s.noise_multiplier) ** 2 for s in spends)
    sigma = 1.0 / math.sqrt(precision)
    return sigma / 2.0 if _adjacency(spends) == "replace_one" else sigma


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, epsilon: float) -> float:
    """The smallest delta at which a Gaussian mechanism of std ``sigma`` (sensitivity 1) is
    (epsilon, delta)-DP (Balle & Wang 2018, Thm. 8)."""
    a = 1.0 / (2.0 * sigma)
    b = epsilon * sigma
    second = _phi(-a - b)
    tail = 0.0 if second == 0.0 else math.exp(epsilon + math.log(second))
    return max(0.0, _phi(a - b) - tail)


def within_cap(spends: Sequence[Spend], cap: float) -> bool:
    """Is the device's epsilon over ``spends`` at most ``cap`` (at their smallest delta)?
    Exact, without scipy (module docstring). No spends: True."""
    spends = list(spends)
    if not spends:
        return True
    if math.isinf(cap):
        return True
    return gaussian_delta(composed_sigma(spends), float(cap)) <= device_delta(spends)


__all__ = ["Spend", "DEFAULT_MAX_EPSILON", "device_epsilon", "device_delta", "within_cap", "composed_sigma",
           "gaussian_delta"]
