"""``restwise evaluate --task early-warning``: does a warning predict a low week (or an injury
or illness report) before it happens, better than the literature's rules?

Pure: persons' :class:`~restwise.models.features.DailyData` (and, where the cohort has them,
their report days) in, numbers out. Events, features, the model and the operating point are
defined in :mod:`restwise.models.warning`.

Protocol, per person (the readiness protocol of :mod:`restwise.models.evaluation`, with
7-day targets):

* **examples**: days t with a defined low-week label (4+ of days t+1..t+7 answered) and a
  full 7-day input window;
* **split, never shuffled**: the first 75% of those days are training days; with T the last
  training day, T+7 is the last day a training label looks at; test days are the later
  labelled days whose input window (t-6..t) starts after T + 7 + 7 (gap). Asserted on day
  indices (``evaluation.check_no_leakage_days`` with horizon 7);
* **personal part** fitted on the training period only: the low threshold (median answer - 1,
  the day-ahead flag's), the scale, the person's rate of low weeks;
* **scored**: every day from the first to the last test day (a warning is shown daily);
  labels where defined;
* **methods see no test label**: the labels a row receives are NaN after the training period;
* **operating points** are chosen on validation data only: the same split inside each
  person's training days (last 20%, same gap) for the non-private rows; on public data (the
  prior's own persons, stored with the prior) for the prior and the private rows; the
  literature's cuts for the rules.

Metrics per row: AUROC over all persons' labelled test days pooled (scores are on a common
scale: a risk, a ratio, SWC units, points per day) with a 95% bootstrap interval over persons;
the mean of per-person AUROCs (persons with both classes); PR-AUC (average precision, with
the base rate); AUROC on the days the person is **not low today** (answered above their
threshold: does the warning add anything to "you are already low"?); at the operating point:
false alarms per person-month, median lead time from the first warning to the episode start,
detection, and how many alarms were followed by the event; the paired bootstrap interval of
the AUROC difference to the best single rule. The secondary event (reports) is scored the
same way where the cohort has reports.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from restwise.models.evaluation import auroc, check_no_leakage_days
from restwise.models.features import DailyData
from restwise.models.linear_head import (
    NotEnoughDataError,
    solve_with_prior,
    sum_statistics,
    unpack_statistics,
)
from restwise.models.prior import PriorAssignment
from restwise.models.warning import (
    ACWR_CUT,
    FALSE_ALARM_BUDGET,
    HORIZON,
    HRV_SWC_CUT,
    MONOTONY_CUT,
    N_FEATURES,
    TARGET_BOUND,
    WINDOW,
    FEATURE_NAMES,
    OPERATING_GRID,
    AlarmRecord,
    PersonDays,
    ScoredDays,
    WarningError,
    WarningInputs,
    WarningModel,
    WarningPersonal,
    alarm_record,
    choose_operating_point,
    device_statistics,
    fit_person,
    hrv_swc_units,
    low_week_labels,
    labelled_rows,
    low_week_episodes,
    operating_point_of,
    report_episodes,
    report_labels,
    split_rows,
    trailing_windows,
    window_slope,
)

PRIMARY = "low week"
SECONDARY = "injury or illness report"
RULE_ROWS = ("ACWR > 1.5", "monotony > 2", "HRV below baseline (SWC)", "readiness trend")
LEVEL_ROW = "recent readiness level"


@dataclass(frozen=True)
class WarningProtocol:
    target: str = "readiness"
    train_fraction: float = 0.75
    gap_days: int = 7
    validation_fraction: float = 0.2
    min_train: int = 28  # labelled training days
    min_test: int = 14  # labelled test days
    false_alarm_budget: float = FALSE_ALARM_BUDGET
    bootstrap: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction < 1.0 or not 0.0 < self.validation_fraction < 1.0:
            raise WarningError("train_fraction and validation_fraction must be in (0, 1)")
        if self.min_train < 2 or self.min_test < 1 or self.gap_days < 0 or self.bootstrap < 0:
            raise WarningError("min_train >= 2, min_test >= 1, gap_days >= 0, bootstrap >= 0")
        if not self.false_alarm_budget > 0:
            raise WarningError("the false-alarm budget must be positive")


# ------------------------------------------------------------------------------ splits
@dataclass
class WarningSplit:
    """One person: their days, training and test days (labelled day indices), the personal
    part fitted on the training period, feature rows and labels of every day at that
    threshold, low-week episode starts and (where the cohort has them) report days."""

    person: str
    days: PersonDays
    train: np.ndarray
    test: np.ndarray
    personal: WarningPersonal
    inputs: WarningInputs
    labels: np.ndarray  # every day; NaN undefined
    starts: np.ndarray  # low-week episode starts (day indices)
    reports: np.ndarray | None = None  # report days (day indices); None: no report data

    @property
    def scored(self) -> np.ndarray:
        """Every day from the first to the last test day."""
        return np.arange(int(self.test.min()), int(self.test.max()) + 1)

    @property
    def last_visible(self) -> int:
        """The last day a training label looks at: labels after it are hidden from rows."""
        return int(self.train.max()) + HORIZON

    def visible_labels(self) -> np.ndarray:
        """What a row may see: the labels of training days only (NaN elsewhere)."""
        out = np.full_like(self.labels, np.nan)
        out[self.train] = self.labels[self.train]
        return out

    def not_low_today(self) -> np.ndarray:
        a = self.days.answers
        return np.isfinite(a) & (a > self.personal.low_threshold)


def make_split(person: str, days: PersonDays, train: np.ndarray, test: np.ndarray,
               reports: np.ndarray | None = None) -> WarningSplit:
    personal, inputs, labels = fit_person(days, train)
    starts = np.asarray([s for s, _ in low_week_episodes(days.answers, personal.low_threshold)], dtype=int)
    return WarningSplit(person, days, train, test, personal, inputs, labels, starts, reports)


def split_warning_person(person: str, data: DailyData, protocol: WarningProtocol,
                         reports: Sequence[str] | None = None) -> tuple[WarningSplit | None, str | None]:
    """The person's split, or (None, reason) when they have too few labelled days."""
    if protocol.target not in data.series:
        raise WarningError(f"no series named {protocol.target!r} in the data")
    if not np.isfinite(data.series[protocol.target]).any():
        return None, f"no {protocol.target} answers"
    days = PersonDays.from_daily(data, protocol.target)
    rows = labelled_rows(days)
    if rows.size < protocol.min_train + protocol.min_test:
        return None, f"too few days with a defined 7-day label ({rows.size}; need {protocol.min_train + protocol.min_test})"
    train, test = split_rows(rows, protocol.train_fraction, protocol.gap_days)
    if train.size < protocol.min_train:
        return None, f"too few labelled training days ({train.size} < {protocol.min_train})"
    if test.size < protocol.min_test:
        return None, f"too few labelled test days after the gap ({test.size} < {protocol.min_test})"
    check_no_leakage_days(train, test, protocol.gap_days, window=WINDOW, horizon=HORIZON)
    report_idx = None
    if reports is not None:
        index = {d: i for i, d in enumerate(days.days)}
        report_idx = np.asarray(sorted({index[d] for d in reports if d in index}), dtype=int)  # report days
    return make_split(person, days, train, test, report_idx), None


def validation_splits(splits: Sequence[WarningSplit], protocol: WarningProtocol) -> list[WarningSplit]:
    """The same split inside each person's training days (fit on the first 80%, validate on
    the rest after the gap), the personal part refitted on the fit part."""
    out = []
    for s in splits:
        fit, val = split_rows(s.train, 1.0 - protocol.validation_fraction, protocol.gap_days)
        if fit.size < max(14, protocol.min_train // 2) or val.size < 7:
            continue
        check_no_leakage_days(fit, val, protocol.gap_days, window=WINDOW, horizon=HORIZON)
        out.append(make_split(s.person, s.days, fit, val, s.reports))
    return out


def scored_days(s: WarningSplit, scores: np.ndarray, labels: np.ndarray | None = None,
                starts: np.ndarray | None = None) -> ScoredDays:
    days = s.scored
    lab = s.labels if labels is None else labels
    st = s.starts if starts is None else starts
    inside = st[(st >= days[0]) & (st <= days[-1] + 1)]
    return ScoredDays(days, np.asarray(scores)[days], lab[days], inside)


def visible(s: WarningSplit) -> WarningSplit:
    """A copy a row may see: test-period labels hidden (NaN)."""
    return WarningSplit(s.person, s.days, s.train, s.test, s.personal, s.inputs, s.visible_labels(),
                        s.starts[s.starts <= s.last_visible], None)


# ------------------------------------------------------------------------------ rows
class WarningMethod(Protocol):
    """A row: ``fit_score(splits, protocol, seed) -> {person: score per day}`` (all days of the
    person; higher = more likely a low week ahead), after which ``operating_point`` (the score
    above which the coach would warn) and ``operating_point_source`` are set. ``splits`` carry
    no test label. ``unavailable(splits)``: a reason when the cohort lacks the row's data."""

    description: str

    def fit_score(self, splits: Sequence[WarningSplit], protocol: WarningProtocol,
                  seed: int) -> dict[str, np.ndarray]: ...


def _validated_point(method, splits, protocol, seed) -> tuple[float, str]:
    """A non-private row's operating point: its scores on the validation slices (the row
    refitted there), chosen by ``choose_operating_point``."""
    val = validation_splits(splits, protocol)
    if not val:
        raise WarningError("no person has enough training days for a validation slice")
    scores = method.score_splits(val, protocol, seed)
    rec = choose_operating_point([scored_days(v, scores[v.person]) for v in val], protocol.false_alarm_budget)
    return rec.threshold, (f"validation slices of {len(val)} persons' training days: "
                           f"{rec.false_alarms_per_person_month:.2f} false alarms per person-month, "
                           f"{rec.detected} of {rec.episodes} episode starts warned")


@dataclass
class RuleRow:
    """A rule on one day's value: ``score(split) -> per-day score``; a fixed literature cut, or
    (``cut=None``) an operating point chosen on the validation slices. ``needs`` names the
    data the rule reads ("hrv", "load"), for a cohort without it."""

    score: Callable[[WarningSplit], np.ndarray]
    cut: float | None
    description: str
    needs: str | None = None
    operating_point: float | None = field(default=None, init=False)
    operating_point_source: str = field(default="", init=False)

    def unavailable(self, splits: Sequence[WarningSplit]) -> str | None:
        if self.needs is None:
            return None
        column = {"hrv": "hrv_swc", "load": "acwr"}[self.needs]
        if not any(np.isfinite(s.days.raw.column(column)[s.scored]).any() for s in splits):
            return {"hrv": "no HRV data (nightly RMSSD) in this cohort",
                    "load": "no training-load data in this cohort"}[self.needs]
        return None

    def score_splits(self, splits, protocol, seed):
        return {s.person: np.nan_to_num(self.score(s), nan=0.0) for s in splits}

    def fit_score(self, splits, protocol, seed):
        if self.cut is not None:
            self.operating_point, self.operating_point_source = self.cut, "the literature's cut"
        else:
            self.operating_point, self.operating_point_source = _validated_point(self, splits, protocol, seed)
        return self.score_splits(splits, protocol, seed)


def acwr_score(s: WarningSplit) -> np.ndarray:
    return s.days.raw.column("acwr")


def monotony_score(s: WarningSplit) -> np.ndarray:
    return s.days.raw.column("monotony")


def hrv_score(s: WarningSplit) -> np.ndarray:
    """SWCs below the baseline (the rule warns above 1: below baseline - SWC)."""
    return -hrv_swc_units(s.days.raw)


def readiness_trend_score(s: WarningSplit) -> np.ndarray:
    """Minus the least-squares slope of the answers over days t-6..t (points per day)."""
    return -window_slope(trailing_windows(s.days.answers, WINDOW))


def recent_level_score(s: WarningSplit) -> np.ndarray:
    """How far the 7-day mean answer lies below the low threshold, in the person's units
    (the "already low" baseline: what the model must beat to say more than that)."""
    return -s.inputs.raw[:, FEATURE_NAMES.index("answer_7d")]


def usual_rate_score(s: WarningSplit) -> np.ndarray:
    return s.inputs.anchor


def rule_rows() -> dict[str, RuleRow]:
    return {
        "ACWR > 1.5": RuleRow(acwr_score, ACWR_CUT, "acute:chronic workload ratio (7 / 28-day sRPE means) above "
                              "1.5 (Gabbett 2016); score: the ratio", "load"),
        "monotony > 2": RuleRow(monotony_score, MONOTONY_CUT, "Foster's monotony (7-day mean / SD of load) "
                                "above 2 (Foster 1998); score: monotony", "load"),
        "HRV below baseline (SWC)": RuleRow(hrv_score, HRV_SWC_CUT, "7-day lnRMSSD mean more than one SWC "
                                            "(0.5 x baseline SD) below the 60-day baseline (Plews 2012/2013); "
                                            "score: SWCs below baseline", "hrv"),
        "readiness trend": RuleRow(readiness_trend_score, None, "falling answers: minus the 7-day "
                                   "least-squares slope (points per day); operating point on validation"),
    }


def baseline_rows() -> dict[str, RuleRow]:
    """Sceptic's baselines: what the warning must beat to say more than the obvious."""
    return {
        LEVEL_ROW: RuleRow(recent_level_score, None, "how far the 7-day mean answer lies below "
                                          "the person's low threshold (\"already low\"); operating point on "
                                          "validation"),
        "your usual rate": RuleRow(usual_rate_score, None, "the person's own rate of low weeks in their "
                                   "training period (no features); operating point on validation"),
    }


def solve_groups(A: np.ndarray, b: np.ndarray, assignment: PriorAssignment, *, noise_std: float,
                 devices: int) -> dict[str, WarningModel]:
    """One model per prior group from (noisy or exact) summed statistics, shrunk toward it."""
    return {g: WarningModel(solve_with_prior(A, b, prior, noise_std=noise_std, devices=devices,
                                             target_bound=TARGET_BOUND))
            for g, prior in assignment.groups.items()}


def statistics_vectors(splits: Sequence[WarningSplit]) -> tuple[list[np.ndarray], int]:
    """Each device's statistics over its training days; devices with too few send nothing."""
    vectors, skipped = [], 0
    for s in splits:
        try:
            vectors.append(device_statistics(s.inputs, s.labels, s.train))
        except NotEnoughDataError:
            skipped += 1
    return vectors, skipped


def model_scores(models: Mapping[str, WarningModel], assignment: PriorAssignment,
                 splits: Sequence[WarningSplit]) -> dict[str, np.ndarray]:
    return {s.person: models[assignment.person_group[s.person]].score(s.inputs) for s in splits}


def public_point(assignment: PriorAssignment) -> tuple[float, str]:
    """The operating point stored with the person's prior (chosen on public data). With
    cross-fitting each half has its own; a row applies each person's."""
    points = {g: operating_point_of(d) for g, d in assignment.details.items()}
    if set(points) != set(assignment.groups):
        raise WarningError("every prior group needs its operating point")
    return points, "chosen on public data with the prior (" + ", ".join(
        f"{g}: {v:.3f}" for g, v in sorted(points.items())) + ")"


@dataclass
class PriorRow:
    """The warning model with the public prior's weights only (epsilon 0)."""

    assignment: PriorAssignment
    description: str = "warning model with the public prior's weights (no private release)"
    epsilon: float = 0.0
    operating_point: object = field(default=None, init=False)
    operating_point_source: str = field(default="", init=False)

    def fit_score(self, splits, protocol, seed):
        self.operating_point, self.operating_point_source = public_point(self.assignment)
        models = {g: WarningModel(p.weights) for g, p in self.assignment.groups.items()}
        return model_scores(models, self.assignment, splits)


@dataclass
class ExactStatisticsRow:
    """Non-private: the devices' statistics summed exactly (no noise), solved toward the
    prior; operating point on the validation slices (the row refitted there)."""

    assignment: PriorAssignment
    description: str = ("warning model from the devices' exact statistics (no DP), solved toward the "
                        "public prior; operating point on validation")
    operating_point: float | None = field(default=None, init=False)
    operating_point_source: str = field(default="", init=False)

    def score_splits(self, splits, protocol, seed):
        vectors, _ = statistics_vectors(splits)
        if not vectors:
            raise WarningError("no device has enough labelled training days")
        A, b = unpack_statistics(sum_statistics(vectors), N_FEATURES, TARGET_BOUND)
        models = solve_groups(A, b, self.assignment, noise_std=0.0, devices=len(vectors))
        return model_scores(models, self.assignment, splits)

    def fit_score(self, splits, protocol, seed):
        self.operating_point, self.operating_point_source = _validated_point(self, splits, protocol, seed)
        return self.score_splits(splits, protocol, seed)


# ------------------------------------------------------------------------------ metrics
def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision (precision at each distinct score, weighted by the recall it
    adds; tied scores enter together); NaN without a positive."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    if n_pos == 0 or labels.size == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    k = last_of_tie + 1
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_gain * tp / k))


def _pooled(splits, scores, labels_of, mask_of=None):
    """Per person (labels, scores) on their labelled test days (optionally masked)."""
    out = []
    for s in splits:
        lab = labels_of(s)[s.test]
        sc = np.asarray(scores[s.person])[s.test]
        keep = np.isfinite(lab) & (mask_of(s)[s.test] if mask_of is not None else True)
        out.append((lab[keep].astype(bool), sc[keep]))
    return out


def bootstrap_aurocs(per_person: Mapping[str, list], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Pooled AUROC of each row on the same person resamples (paired), NaN where a resample
    lacks a class. Every row's per-person label arrays are the same (only scores differ)."""
    names = list(per_person)
    out = {k: np.full(n_boot, np.nan) for k in names}
    if not names:
        return out
    first = per_person[names[0]]
    offsets = np.r_[0, np.cumsum([len(p[0]) for p in first])]
    labels = np.concatenate([p[0] for p in first]) if first else np.zeros(0, bool)
    scores = {k: np.concatenate([p[1] for p in per_person[k]]) if first else np.zeros(0) for k in names}
    rng = np.random.default_rng(seed)
    for b in range(n_boot):
        idx = rng.integers(0, len(first), size=len(first))
        gather = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
        for k in names:
            out[k][b] = auroc(labels[gather], scores[k][gather])
    return out


def _ci(values: np.ndarray) -> list[float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]


def _pooled_auroc(pairs) -> float:
    return auroc(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))


@dataclass
class EventScore:
    """One row's numbers for one event."""

    auroc: float
    auroc_ci: list[float]
    auroc_within_person: float
    persons_with_both: int
    pr_auc: float
    base_rate: float
    auroc_not_low_today: float
    auroc_not_low_today_ci: list[float]
    at_operating_point: dict
    events: int  # positive labelled test days
    episodes: int
    # Paired bootstrap over persons of the AUROC difference ({"mean", "ci", "resamples"}):
    # against the best single rule, against "recent readiness level" (is the warning more than
    # "you are already low"?), and the same on the days the person is not low today.
    paired_vs_best_rule: dict | None = None
    paired_vs_recent_level: dict | None = None
    paired_not_low_today_vs_recent_level: dict | None = None


@dataclass
class WarningRowResult:
    """One row of the early-warning table: its numbers for each event, or why it has none."""

    name: str
    description: str
    epsilon: float | None  # a number for private rows (0: public data only), None otherwise
    available: bool  # False: the cohort lacks the row's data (``reason`` says which)
    reason: str | None
    operating_point: object
    operating_point_source: str
    primary: EventScore | None
    secondary: EventScore | dict | None
    chosen: dict = field(default_factory=dict)
    per_person_auroc: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class WarningResult:
    dataset: str
    protocol: dict
    persons: list[dict]
    excluded: dict[str, str]
    events: dict  # event counts per kind
    rows: list[WarningRowResult]
    best_rule: str | None
    privacy: dict | None = None
    planner: dict | None = None
    coach_record: dict | None = None
    curves: dict = field(default_factory=dict)  # row -> lead_curve points

    def row(self, name: str) -> WarningRowResult:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"task": "early-warning", "dataset": self.dataset, "protocol": self.protocol,
                "n_persons": len(self.persons), "persons": self.persons, "excluded": self.excluded,
                "events": self.events, "best_rule": self.best_rule, "privacy": self.privacy,
                "planner": self.planner, "coach_record": self.coach_record,
                "methods": [_row_dict(r) for r in self.rows], "lead_false_alarm_curves": self.curves}

    def to_json(self) -> str:
        return json.dumps(_clean(self.to_dict()), indent=2)

    def to_markdown(self) -> str:
        return warning_markdown(self)


def _row_dict(r: WarningRowResult) -> dict:
    d = asdict(r)
    prim = d.pop("primary")
    if prim is not None:  # the primary event's numbers at the top level of the row
        for k, v in prim.items():
            d[k] = v
        op = prim["at_operating_point"]
        d["false_alarms_per_person_month"] = op.get("false_alarms_per_person_month")
        d["median_lead_days"] = op.get("median_lead_days")
    return d


def _clean(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (np.floating, np.integer)):
        return _clean(o.item())
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _point_for(method, s: WarningSplit, assignment_groups: Mapping | None):
    op = method.operating_point
    if isinstance(op, Mapping):
        return float(op[assignment_groups[s.person]])
    return float(op)


def _record_at_point(method, splits, scores, labels_of, starts_of) -> AlarmRecord:
    """The alarm record with each person's operating point (per prior group, or one)."""
    groups = getattr(getattr(method, "assignment", None), "person_group", None)
    by_point: dict[float, list[ScoredDays]] = {}
    for s in splits:
        by_point.setdefault(_point_for(method, s, groups), []).append(
            scored_days(s, scores[s.person], labels_of(s), starts_of(s)))
    records = [alarm_record(periods, thr) for thr, periods in by_point.items()]
    return merge_records(records)


def merge_records(records: Sequence[AlarmRecord]) -> AlarmRecord:
    if len(records) == 1:
        return records[0]
    return AlarmRecord(float("nan"), *(sum(getattr(r, k) for r in records) for k in (
        "alarms", "true_alarms", "false_alarms", "person_months", "episodes", "detected")),
        tuple(t for r in records for t in r.lead_times), sum(r.warning_days for r in records),
        sum(r.scored_days for r in records))


def _op_dict(rec: AlarmRecord) -> dict:
    d = rec.to_dict()
    leads = d.pop("lead_times")
    d["lead_days_histogram"] = {str(k): leads.count(k) for k in range(1, HORIZON + 1)}
    d["precision"] = rec.true_alarms / rec.alarms if rec.alarms else float("nan")
    d["warning_share"] = rec.warning_days / rec.scored_days if rec.scored_days else float("nan")
    return d


def _event_score(method, splits, scores, labels_of, starts_of, boot: np.ndarray, boot_nl: np.ndarray,
                 pairs, pairs_nl) -> EventScore:
    lab = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, bool)
    sc = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0)
    within = [auroc(p[0], p[1]) for p in pairs]
    within = [a for a in within if math.isfinite(a)]
    rec = _record_at_point(method, splits, scores, labels_of, starts_of)
    return EventScore(
        auroc=auroc(lab, sc), auroc_ci=_ci(boot), auroc_within_person=float(np.mean(within)) if within else float("nan"),
        persons_with_both=len(within), pr_auc=average_precision(lab, sc),
        base_rate=float(lab.mean()) if lab.size else float("nan"),
        auroc_not_low_today=_pooled_auroc(pairs_nl), auroc_not_low_today_ci=_ci(boot_nl),
        at_operating_point=_op_dict(rec), events=int(lab.sum()), episodes=rec.episodes)


def _paired(boot_a: np.ndarray, boot_b: np.ndarray, point: float) -> dict:
    diff = boot_a - boot_b
    return {"mean": point, "ci": _ci(diff), "resamples": int(np.isfinite(diff).sum())}


def _secondary_labels(s: WarningSplit) -> np.ndarray:
    return report_labels(len(s.days), s.reports, s.days.answers)


def _secondary_starts(s: WarningSplit) -> np.ndarray:
    return np.asarray([a for a, _ in report_episodes(s.reports)], dtype=int)


def evaluate_warning(
    cohort: Mapping[str, DailyData],
    methods: Mapping[str, WarningMethod],
    *,
    protocol: WarningProtocol | None = None,
    dataset: str = "cohort",
    reports: Mapping[str, Sequence[str]] | None = None,
    on_method: Callable[[str], None] | None = None,
    prepared: tuple[list, dict] | None = None,
) -> WarningResult:
    """Run every row on the cohort under the protocol and score it on both events.

    ``reports``: person -> ISO days of their injury/illness reports, or None when the cohort
    has no report data (the secondary event is then stated as unavailable). ``prepared``: the
    result of :func:`split_cohort` when the caller made it already."""
    protocol = protocol or WarningProtocol()
    splits, excluded = prepared if prepared is not None else split_cohort(cohort, protocol, reports)
    seen = [visible(s) for s in splits]
    has_reports = reports is not None
    rows: list[WarningRowResult] = []
    primary_pairs, primary_nl, secondary_pairs, secondary_nl, all_scores, fitted = {}, {}, {}, {}, {}, {}
    curves: dict[str, dict] = {}
    for name, method in methods.items():
        if on_method is not None:
            on_method(name)
        reason = method.unavailable(splits) if hasattr(method, "unavailable") else None
        if reason:
            rows.append(WarningRowResult(name, method.description, _epsilon(method), False, reason, None, "",
                                         None, None))
            continue
        t0 = time.perf_counter()
        scores = method.fit_score(seen, protocol, protocol.seed)
        seconds = time.perf_counter() - t0
        for s in splits:
            if np.asarray(scores.get(s.person, np.zeros(0))).shape != (len(s.days),):
                raise WarningError(f"row {name!r} gave no score per day for a person")
        all_scores[name], fitted[name] = scores, method
        primary_pairs[name] = _pooled(splits, scores, lambda s: s.labels)
        primary_nl[name] = _pooled(splits, scores, lambda s: s.labels, WarningSplit.not_low_today)
        if has_reports:
            secondary_pairs[name] = _pooled(splits, scores, _secondary_labels)
            secondary_nl[name] = _pooled(splits, scores, _secondary_labels, WarningSplit.not_low_today)
        rows.append(WarningRowResult(name, method.description, _epsilon(method), True, None,
                                     method.operating_point, method.operating_point_source, None, None,
                                     dict(getattr(method, "chosen", {}) or {}), seconds=seconds))
    boot = bootstrap_aurocs(primary_pairs, protocol.bootstrap, protocol.seed)
    boot_nl = bootstrap_aurocs(primary_nl, protocol.bootstrap, protocol.seed)
    sboot = bootstrap_aurocs(secondary_pairs, protocol.bootstrap, protocol.seed) if has_reports else {}
    sboot_nl = bootstrap_aurocs(secondary_nl, protocol.bootstrap, protocol.seed) if has_reports else {}
    secondary_events = sum(int(np.nansum(_secondary_labels(s)[s.test])) for s in splits) if has_reports else 0
    for r in rows:
        if not r.available:
            continue
        m, sc = fitted[r.name], all_scores[r.name]
        r.primary = _event_score(m, splits, sc, lambda s: s.labels, lambda s: s.starts, boot[r.name],
                                 boot_nl[r.name], primary_pairs[r.name], primary_nl[r.name])
        r.per_person_auroc = {s.person: auroc(*primary_pairs[r.name][i]) for i, s in enumerate(splits)}
        curves[r.name] = lead_curve(m, splits, sc)
        if not has_reports:
            r.secondary = {"available": False, "reason": "this cohort has no injury or illness reports"}
        elif secondary_events == 0:
            r.secondary = {"available": False, "reason": "no injury or illness report starts in the persons' "
                                                         "test periods: nothing to score"}
        else:
            r.secondary = _event_score(m, splits, sc, _secondary_labels, _secondary_starts, sboot[r.name],
                                       sboot_nl[r.name], secondary_pairs[r.name], secondary_nl[r.name])
    # paired differences: every row against the best single rule and the "already low" baseline
    rules = [r for r in rows if r.available and r.name in RULE_ROWS and math.isfinite(r.primary.auroc)]
    best = max(rules, key=lambda r: r.primary.auroc) if rules else None
    for r in rows:
        if not r.available:
            continue
        if best is not None:
            r.primary.paired_vs_best_rule = {"rule": best.name, **_paired(
                boot[r.name], boot[best.name], r.primary.auroc - best.primary.auroc)}
        if LEVEL_ROW in boot:
            lvl = next(x for x in rows if x.name == LEVEL_ROW)
            r.primary.paired_vs_recent_level = _paired(boot[r.name], boot[LEVEL_ROW],
                                                       r.primary.auroc - lvl.primary.auroc)
            r.primary.paired_not_low_today_vs_recent_level = _paired(
                boot_nl[r.name], boot_nl[LEVEL_ROW], r.primary.auroc_not_low_today - lvl.primary.auroc_not_low_today)
    events = {
        PRIMARY: {"definition": "3+ of the next 7 days at or below the person's low threshold (median - 1)",
                  "all_days_of_all_persons": cohort_event_counts(cohort, protocol.target),
                  "labelled_test_days": sum(int(np.isfinite(s.labels[s.test]).sum()) for s in splits),
                  "positive_test_days": sum(int(np.nansum(s.labels[s.test])) for s in splits),
                  "episodes_all_days": sum(len(s.starts) for s in splits),
                  "episodes_in_test_periods": sum(int(((s.starts >= s.scored[0]) & (s.starts <= s.scored[-1] + 1)).sum())
                                                  for s in splits),
                  "persons_with_an_episode_in_test": sum(int(((s.starts >= s.scored[0]) & (s.starts <= s.scored[-1] + 1)).any())
                                                         for s in splits)},
    }
    if has_reports:
        eps = [(s, _secondary_starts(s)) for s in splits]
        evaluated = {s.person for s in splits}
        given = sum(len(set(v)) for v in reports.values())
        of_evaluated = sum(len(set(v)) for p, v in reports.items() if p in evaluated)
        events[SECONDARY] = {
            "definition": "a report episode (reports less than 7 days apart) starts within the next 7 days",
            "report_days_given": given,
            "report_days_of_persons_not_evaluated": given - of_evaluated,
            "report_days_outside_the_persons_days": of_evaluated - sum(len(s.reports) for s in splits),
            "reports_of_evaluated_persons": sum(len(s.reports) for s in splits),
            "episodes_all_days": sum(len(st) for _, st in eps),
            "episodes_in_test_periods": sum(int(((st >= s.scored[0]) & (st <= s.scored[-1] + 1)).sum()) for s, st in eps),
            "persons_with_an_episode_in_test": sum(int(((st >= s.scored[0]) & (st <= s.scored[-1] + 1)).any())
                                                   for s, st in eps),
            "positive_test_days": secondary_events,
        }
    else:
        events[SECONDARY] = {"available": False, "reason": "this cohort has no injury or illness reports"}
    return WarningResult(
        dataset=dataset, protocol={**asdict(protocol), "horizon": HORIZON, "window": WINDOW},
        persons=[{"person": s.person, "train_days": int(s.train.size), "test_days": int(s.test.size),
                  "scored_days": int(s.scored.size), "low_threshold_from": "training period"} for s in splits],
        excluded=excluded, events=events, rows=rows, best_rule=None if best is None else best.name,
        curves=curves)


def split_cohort(cohort: Mapping[str, DailyData], protocol: WarningProtocol,
                 reports: Mapping[str, Sequence[str]] | None = None) -> tuple[list[WarningSplit], dict[str, str]]:
    """Every person's split, and the excluded persons with their reason. Fewer than two
    persons: a WarningError that says why and what events the cohort has over all days."""
    excluded: dict[str, str] = {}
    splits: list[WarningSplit] = []
    for person, data in cohort.items():
        rep = None if reports is None else list(reports.get(person, ()))
        split, why = split_warning_person(person, data, protocol, rep)
        if split is None:
            excluded[person] = why or "excluded"
        else:
            splits.append(split)
    if len(splits) < 2:
        why_counts: dict[str, int] = {}
        for reason in excluded.values():
            key = reason.split(" (")[0]
            why_counts[key] = why_counts.get(key, 0) + 1
        counts = cohort_event_counts(cohort, protocol.target)
        raise WarningError(
            f"only {len(splits)} of {len(cohort)} persons have enough labelled days for the protocol (need >= 2): "
            + "; ".join(f"{v} {k}" for k, v in sorted(why_counts.items())) + f". Over all days the cohort has "
            f"{counts['labelled_days']} days with a defined 7-day label, {counts['positive_days']} followed by a "
            f"low week, {counts['episodes']} low-week episodes ({counts['persons_with_answers']} persons answered)")
    return splits, excluded


def cohort_event_counts(cohort: Mapping[str, DailyData], target: str) -> dict:
    """Low-week events over all of each person's days (descriptive: the threshold is their
    median answer over all days - 1; the evaluation fits it on the training period only)."""
    out = {"persons_with_answers": 0, "labelled_days": 0, "positive_days": 0, "episodes": 0,
           "persons_with_an_episode": 0}
    for data in cohort.values():
        if target not in data.series or not np.isfinite(data.series[target]).any():
            continue
        days = PersonDays.from_daily(data, target)
        threshold = WarningPersonal.fit(days.answers).low_threshold
        labels = low_week_labels(days.answers, threshold)[labelled_rows(days)]
        episodes = low_week_episodes(days.answers, threshold)
        out["persons_with_answers"] += 1
        out["labelled_days"] += int(labels.size)
        out["positive_days"] += int(np.nansum(labels))
        out["episodes"] += len(episodes)
        out["persons_with_an_episode"] += int(bool(episodes))
    return out


def _epsilon(method) -> float | None:
    eps = getattr(method, "epsilon_total", getattr(method, "epsilon", None))
    return None if eps is None else float(eps)


# ------------------------------------------------------------------------------ reporting
def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _ci_text(point, ci, fmt="{:.3f}") -> str:
    return f"{_f(point, fmt)} [{_f(ci[0], fmt)}, {_f(ci[1], fmt)}]"


def _paired_text(p: dict | None) -> str:
    return "–" if p is None else _ci_text(p["mean"], p["ci"], "{:+.3f}")


def warning_markdown(res: WarningResult) -> str:
    ev = res.events[PRIMARY]
    scored = [r for r in res.rows if r.available]
    lines = [f"**{res.dataset}**, early warning of a low week (3+ of the next 7 days at or below the "
             f"person's low threshold): {len(res.persons)} persons ({len(res.excluded)} excluded), "
             f"{ev['labelled_test_days']} labelled test days, {ev['positive_test_days']} of them followed by a "
             f"low week; {ev['episodes_in_test_periods']} low-week episodes start in the test periods "
             f"({ev['persons_with_an_episode_in_test']} persons).", "",
             "| row | ε | AUROC [95% CI] | AUROC within person (persons) | PR-AUC | "
             "ΔAUROC vs best rule [95% CI] | ΔAUROC vs recent readiness level [95% CI] | "
             "AUROC not low today [95% CI] | Δ not low today vs recent level [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res.rows:
        eps = "–" if r.epsilon is None else f"{r.epsilon:.2f}"
        if not r.available:
            lines.append(f"| {r.name} | {eps} | {r.reason} | | | | | | |")
            continue
        p = r.primary
        lines.append(
            f"| {r.name} | {eps} | {_ci_text(p.auroc, p.auroc_ci)} | {_f(p.auroc_within_person)} "
            f"({p.persons_with_both}) | {_f(p.pr_auc)} | {_paired_text(p.paired_vs_best_rule)} | "
            f"{_paired_text(p.paired_vs_recent_level)} | {_ci_text(p.auroc_not_low_today, p.auroc_not_low_today_ci)} | "
            f"{_paired_text(p.paired_not_low_today_vs_recent_level)} |")
    lines += ["", f"AUROC over all persons' labelled test days pooled, 95% bootstrap interval over persons "
                  f"({res.protocol['bootstrap']} resamples); Δ: paired differences on the same resamples. PR-AUC "
                  f"base rate: {_f(scored[0].primary.base_rate) if scored else '–'}. Best single rule: "
                  f"{res.best_rule or 'none'} (picked on the test period, which favours the rule). \"Not low "
                  "today\": only days answered above the person's low threshold.", "",
              "At the operating point the coach would use:", "",
              "| row | operating point (chosen on) | false alarms / person-month | median lead (days) | "
              "episodes warned | alarms followed by a low week | days with a warning |",
              "|---|---|---|---|---|---|---|"]
    for r in scored:
        op = r.primary.at_operating_point
        point = r.operating_point
        point_text = (", ".join(f"{v:.3f}" for v in point.values()) if isinstance(point, Mapping)
                      else _f(point, "{:.3g}"))
        lines.append(f"| {r.name} | {point_text} ({r.operating_point_source.split(' (')[0].split(':')[0]}) | "
                     f"{_f(op['false_alarms_per_person_month'], '{:.2f}')} | {_f(op['median_lead_days'], '{:.1f}')} | "
                     f"{op['detected']} / {op['episodes']} | {op['true_alarms']} / {op['alarms']} | "
                     f"{_f(op['warning_share'], '{:.0%}')} |")
    sec = res.events[SECONDARY]
    lines += ["", f"**Secondary event ({SECONDARY} within 7 days)**: " + (
        sec["reason"] + "." if not sec.get("available", True) else
        f"{sec['episodes_in_test_periods']} report episodes start in the test periods "
        f"({sec['persons_with_an_episode_in_test']} persons; {sec['episodes_all_days']} over all days of the "
        f"evaluated persons, from {sec['reports_of_evaluated_persons']} report days; of the "
        f"{sec['report_days_given']} report days given, {sec['report_days_of_persons_not_evaluated']} belong to "
        f"persons not evaluated and {sec['report_days_outside_the_persons_days']} lie outside the person's days).")]
    if any(isinstance(r.secondary, EventScore) for r in res.rows):
        lines += ["", "| row | AUROC [95% CI] | PR-AUC (base rate) | false alarms / person-month | "
                      "median lead (days) | episodes warned |", "|---|---|---|---|---|---|"]
        for r in res.rows:
            if isinstance(r.secondary, EventScore):
                q = r.secondary
                op = q.at_operating_point
                lines.append(f"| {r.name} | {_ci_text(q.auroc, q.auroc_ci)} | {_f(q.pr_auc)} ({_f(q.base_rate)}) | "
                             f"{_f(op['false_alarms_per_person_month'], '{:.2f}')} | "
                             f"{_f(op['median_lead_days'], '{:.1f}')} | {op['detected']} / {op['episodes']} |")
    elif sec.get("available", True):
        lines += ["", next((r.secondary["reason"] for r in res.rows if isinstance(r.secondary, dict)), "")]
    if res.excluded:
        lines += ["", "Excluded: " + "; ".join(f"{p}: {why}" for p, why in sorted(res.excluded.items()))]
    if res.planner:
        lines += ["", f"Planner: {res.planner.get('message', '')} Decision: {res.planner.get('decision', '')}."]
    if res.coach_record:
        records = {rec["row"]: rec["sentence"] for rec in res.coach_record.values()}  # once per row
        lines += ["", "The coach's record in plain words: " + "; ".join(
            f"{row}: \"{sentence}\"" for row, sentence in records.items()) + "."]
    if res.privacy and res.privacy.get("statement"):
        lines += ["", res.privacy["statement"]]
    return "\n".join(lines) + "\n"


def coach_record(result: WarningResult, row: str) -> dict:
    """What the coach may say about its own warnings: how many of the row's alarms (new
    warnings) in the test periods were followed by a low week, at its operating point."""
    r = result.row(row)
    if not r.available or r.primary is None:
        raise WarningError(f"row {row!r} was not scored")
    op = r.primary.at_operating_point
    k, n = int(op["true_alarms"]), int(op["alarms"])
    sentence = (f"in past data, {k} of {n} such warnings were followed by a low week, and it warned ahead of "
                f"{op['detected']} of {op['episodes']} low weeks" if n else
                "in past data this warning was never shown, so its record is unknown")
    return {"row": row, "dataset": result.dataset, "true_alarms": k, "alarms": n,
            "false_alarms_per_person_month": op["false_alarms_per_person_month"],
            "median_lead_days": op["median_lead_days"], "detected": op["detected"], "episodes": op["episodes"],
            "persons": len(result.persons), "sentence": sentence}


def plot_warning(result: WarningResult, path) -> None:
    """Lead time against false alarms per person-month, per row: its curve over thresholds on
    the test periods (descriptive; nothing is chosen on it) and its operating point (dot).
    Left: the median lead of the warned episodes; right: the share of all episodes warned at
    least 2 days ahead (the median alone hides how many episodes were missed)."""
    # Deferred: matplotlib is only needed to draw the plot (its import is slow).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    for i, r in enumerate(x for x in result.rows if x.available):
        color = plt.cm.tab10(i % 10)
        curve = result.curves.get(r.name) or {k: [] for k in CURVE_KEYS}
        fa = curve["false_alarms_per_person_month"]
        ax1.plot(fa, curve["median_lead_days"], "-", color=color, alpha=0.45, lw=1)
        ax2.plot(fa, curve["warned_2_days_ahead"], "-", color=color, alpha=0.45, lw=1)
        op = r.primary.at_operating_point
        hist = op["lead_days_histogram"]
        early = sum(v for k, v in hist.items() if int(k) >= 2) / op["episodes"] if op["episodes"] else math.nan
        ax1.plot(op["false_alarms_per_person_month"], op["median_lead_days"], "o", color=color,
                 label=f"{r.name} ({op['detected']}/{op['episodes']} warned)")
        ax2.plot(op["false_alarms_per_person_month"], early, "o", color=color)
    for ax in (ax1, ax2):
        ax.axvline(FALSE_ALARM_BUDGET, color="grey", ls=":", lw=1)
        ax.set_xlabel("false alarms per person-month (test periods)")
        ax.set_xlim(0, 4)
    ax1.axhline(2.0, color="grey", ls=":", lw=1)
    ax1.set_ylabel("median lead time of warned episodes, days")
    ax1.set_ylim(0, HORIZON + 0.5)
    ax2.set_ylabel("share of episodes warned at least 2 days ahead")
    ax2.set_ylim(0, 1)
    ax1.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result.dataset}: early warning of a low week (dots: operating points)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


CURVE_KEYS = ("threshold", "false_alarms_per_person_month", "median_lead_days", "warned_2_days_ahead")


def lead_curve(method, splits: Sequence[WarningSplit], scores: Mapping[str, np.ndarray]) -> dict[str, list]:
    """The trade-off the operating point sits on (descriptive only: nothing is chosen on it):
    per threshold at the quantiles of the pooled test scores (sorted by false alarms), false
    alarms per person-month, the median lead and the share of episodes warned at least 2 days
    ahead; one list per key, rounded to 4 decimals."""
    periods = [scored_days(s, scores[s.person]) for s in splits]
    pooled = np.concatenate([p.scores for p in periods])
    points = []
    for thr in sorted({float(v) for v in np.quantile(pooled[np.isfinite(pooled)], OPERATING_GRID)}):
        rec = alarm_record(periods, thr)
        early = sum(1 for t in rec.lead_times if t >= 2) / rec.episodes if rec.episodes else float("nan")
        points.append((thr, rec.false_alarms_per_person_month, rec.median_lead, early))
    points.sort(key=lambda p: p[1])
    return {k: [round(p[i], 4) for p in points] for i, k in enumerate(CURVE_KEYS)}


__all__ = [
    "WarningProtocol", "WarningSplit", "WarningMethod", "WarningResult", "WarningRowResult", "EventScore",
    "RuleRow", "PriorRow", "ExactStatisticsRow", "rule_rows", "baseline_rows", "evaluate_warning",
    "split_warning_person", "validation_splits", "average_precision", "bootstrap_aurocs", "coach_record",
    "plot_warning", "cohort_event_counts", "split_cohort", "solve_groups", "statistics_vectors", "model_scores", "public_point", "PRIMARY",
    "SECONDARY", "RULE_ROWS", "LEVEL_ROW", "make_split", "scored_days", "visible", "lead_curve",
]
