"""Privacy budgets: refuse a release before it would exceed (epsilon, delta).

Two scopes:

* ``run``: the releases of one training run (events with the same ``run_id``);
* ``person``: every release any person took part in, across runs. Runs over the same
  population compose, so the person-level check accounts all releases it is given.

Every budget is charged the epsilon against the party that samples (no amplification by
sampling claimed: the server draws each cohort and knows who took part), whatever accountant
is passed in. The amplified value, for third parties who see only the model, is reported
beside the headline and is never charged.

The comparison is ``projected <= budget``: a release that lands exactly on the budget is
allowed, anything above is refused with :class:`BudgetExceededError` (which carries the
spent, projected and budget numbers). The caller logs the refusal to the ledger as a
:class:`~restwise.privacy.events.BudgetRefusalEvent` (see :func:`refusal_event`).

Before a round, project it with the *fewest survivors the round can release with* (the secure
aggregation threshold): fewer survivors mean less distributed noise and a larger epsilon, so
this is the worst case the round can actually produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from restwise.privacy.accountant import PrivacyAccountant
from restwise.privacy.errors import BudgetExceededError, PrivacyError
from restwise.privacy.events import BudgetRefusalEvent, GaussianRoundEvent, ReleaseSpec

# The default cap on a run's epsilon (against the sampler, at the run's delta): a run whose
# planned releases would spend more is refused at creation unless its operator raises the cap
# explicitly (RunConfig.max_epsilon, --max-epsilon), which is recorded (ledger AuditEvent
# ``cap.raised``, the service's audit log). 10 is where the literature's "reasonable" range
# for a per-person guarantee ends (deployed systems publish single-digit epsilons; past 10 the
# e^epsilon likelihood ratio exceeds 20,000 and the guarantee says little).
DEFAULT_MAX_EPSILON = 10.0
SCOPES = ("run", "person")
# Only the epsilon against the sampler is ever charged. ("amplified" was accepted before the
# headline stopped claiming amplification against the server; it is refused, never honoured.)
AGAINST = ("no_amplification",)


@dataclass(frozen=True)
class PrivacyBudget:
    """An (epsilon, delta) budget for one run (``scope="run"``) or for each person across runs
    (``scope="person"``). ``against`` names the epsilon charged: always the one against a
    server that knows the cohort (``no_amplification``)."""

    epsilon: float
    delta: float
    scope: str = "run"
    against: str = "no_amplification"

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not (0 < self.epsilon < float("inf")):
            raise PrivacyError("budget epsilon must be a positive finite number")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not (0 < self.delta < 1):
            raise PrivacyError("budget delta must be in (0, 1)")
        if self.scope not in SCOPES:
            raise PrivacyError(f"budget scope must be one of {', '.join(SCOPES)}")
        if self.against not in AGAINST:
            raise PrivacyError(
                f"budget 'against' must be {', '.join(AGAINST)}: a budget is charged the epsilon against the "
                "server, which draws each cohort, never the one amplified by sampling"
            )

    def _relevant(self, past_events: Iterable[object], run_id: str | None) -> list[GaussianRoundEvent]:
        releases = [e for e in past_events if isinstance(e, GaussianRoundEvent)]
        if self.scope == "run":
            if run_id is None:
                raise PrivacyError("a run budget needs the run_id of the next release")
            releases = [e for e in releases if e.run_id == run_id]
        return releases

    def _charged(self, accountant: PrivacyAccountant, releases: Sequence[GaussianRoundEvent | ReleaseSpec]) -> float:
        if not releases:
            return 0.0
        return accountant.epsilon_value(releases, self.delta, against="no_amplification")

    def spent(self, past_events: Iterable[object], *, run_id: str | None = None, accountant: PrivacyAccountant | None = None) -> float:
        """Epsilon already charged to this budget."""
        accountant = accountant or PrivacyAccountant()
        return self._charged(accountant, self._relevant(past_events, run_id))

    def check_next_round(
        self,
        past_events: Iterable[object],
        next_release: GaussianRoundEvent | ReleaseSpec,
        *,
        run_id: str | None = None,
        round: int | None = None,
        accountant: PrivacyAccountant | None = None,
    ) -> float:
        """Projected epsilon after ``next_release``; raises BudgetExceededError if above budget.

        ``past_events`` may hold any events (refusals and audit entries are ignored);
        ``next_release`` is the event the round will produce, or a planning ReleaseSpec (then
        give ``run_id`` and ``round``)."""
        return self.check_plan(past_events, next_release, 1, run_id=run_id, round=round, accountant=accountant)

    def check_plan(
        self,
        past_events: Iterable[object],
        next_release: GaussianRoundEvent | ReleaseSpec,
        rounds: int,
        *,
        run_id: str | None = None,
        round: int | None = None,
        accountant: PrivacyAccountant | None = None,
    ) -> float:
        """Like check_next_round for ``rounds`` identical releases (check a run before it starts)."""
        accountant = accountant or PrivacyAccountant()
        if isinstance(next_release, GaussianRoundEvent):
            run_id = next_release.run_id if run_id is None else run_id
            round = next_release.round if round is None else round
        past = self._relevant(past_events, run_id)
        projected = self._charged(accountant, list(past) + [next_release] * rounds)
        if projected > self.epsilon:
            raise BudgetExceededError(
                scope=self.scope,
                spent=self._charged(accountant, past),
                projected=projected,
                budget_epsilon=float(self.epsilon),
                delta=float(self.delta),
                run_id=run_id,
                round=round,
            )
        return projected


def check_next_round(
    past_events: Iterable[object],
    next_release: GaussianRoundEvent | ReleaseSpec,
    *,
    run_budget: PrivacyBudget,
    person_budget: PrivacyBudget | None = None,
    run_id: str | None = None,
    round: int | None = None,
    accountant: PrivacyAccountant | None = None,
) -> float:
    """Check the run budget and (if given) the person-level budget; return the run's projected
    epsilon. ``past_events`` should hold every past event the person-level budget must see
    (all runs); the run budget picks its own run's releases from them."""
    past = list(past_events)
    projected = run_budget.check_next_round(past, next_release, run_id=run_id, round=round, accountant=accountant)
    if person_budget is not None:
        person_budget.check_next_round(past, next_release, run_id=run_id, round=round, accountant=accountant)
    return projected


def refusal_event(error: BudgetExceededError, *, run_id: str | None = None, round: int | None = None) -> BudgetRefusalEvent:
    """The ledger event recording a refusal (run_id/round default to those in the error)."""
    rid = run_id if run_id is not None else error.run_id
    rnd = round if round is not None else error.round
    if rid is None or rnd is None:
        raise PrivacyError("a refusal event needs the run_id and round")
    return BudgetRefusalEvent.from_error(error, run_id=rid, round=rnd)
