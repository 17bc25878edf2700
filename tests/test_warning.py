"""Early warning (issue 18): events, features and bounds, the operating point, the honest
protocol (split, blinding, exclusions), the rows and their privacy accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from restwise.models import warning as wn
from restwise.models import warning_evaluation as we
from restwise.models.features import DailyData
from restwise.models.prior import PublicCohort, fit_prior, shipped_assignment
from restwise.privacy.accountant import PrivacyAccountant
from restwise.simulation.warning_statistics import WarningStatisticsMethod

from .test_prior import synthetic_days

NAN = float("nan")


# ------------------------------------------------------------------------------ events
def test_low_week_labels_count_low_days_ahead_and_need_four_answers():
    a = np.array([5, 5, 3, 3, 5, 3, 5, 5, 5, NAN, NAN, NAN, NAN, 5, 5], dtype=float)
    labels = wn.low_week_labels(a, threshold=3.0)
    # day 0 looks at days 1..7 = 5,3,3,5,3,5,5: three at or below 3 -> a low week
    assert labels[0] == 1.0
    # day 2 looks at 3..9 = 3,5,3,5,5,5,NaN: two low days -> no low week
    assert labels[2] == 0.0
    # day 6 looks at 7..13 = 5,5,NaN,NaN,NaN,NaN,5: three answered (< 4) -> undefined
    assert math.isnan(labels[6])
    # the last day has nothing ahead
    assert math.isnan(labels[-1])
    # the label does not change with the threshold's definedness, only its value
    assert np.array_equal(np.isfinite(wn.low_week_labels(a, 0.0)), np.isfinite(labels))


def test_low_week_episodes_start_on_the_first_low_day_and_merge_overlapping_windows():
    a = np.full(40, 6.0)
    a[[5, 7, 9]] = 2  # one low week starting on day 5
    a[[11, 12, 14]] = 2  # continues: windows from 9 reach 11, 12 -> same episode
    a[[30, 31, 32]] = 2  # a second episode
    a[20] = 2  # a single low day is no episode
    eps = wn.low_week_episodes(a, threshold=3.0)
    assert eps == [(5, 14), (30, 32)]


def test_report_episodes_and_labels():
    assert wn.report_episodes([3, 4, 5, 20, 30, 31]) == [(3, 5), (20, 20), (30, 31)]
    answers = np.full(40, 5.0)
    answers[22:35] = NAN  # not using the app for a while
    labels = wn.report_labels(40, [10, 11, 12, 20], answers)
    assert labels[2] == 0.0 and labels[3] == 1.0 and labels[9] == 1.0  # onset 10 within t+1..t+7
    assert math.isnan(labels[10]) and math.isnan(labels[12])  # inside the episode (10..12)
    assert labels[13] == 1.0  # the next episode (20) starts 7 days later
    assert math.isnan(labels[20])  # inside the one-report episode
    assert math.isnan(labels[34])  # nothing answered on days 28..34
    assert labels[36] == 0.0


# ------------------------------------------------------------------------------ features
@pytest.fixture(scope="module")
def cohort():
    return synthetic_days(10, 220, seed0=300)


@pytest.fixture(scope="module")
def public():
    """A stand-in for public data (other persons) and the prior fitted on it."""
    days = synthetic_days(12, 220, seed0=500)
    return days, fit_prior([PublicCohort("soccermon", days)], ("readiness",), spec=wn.WARNING_PRIOR)


def test_features_are_bounded_causal_and_few(cohort):
    assert wn.N_FEATURES <= 64 and wn.STATISTICS_LENGTH == wn.N_FEATURES * (wn.N_FEATURES + 1) // 2 + wn.N_FEATURES
    data = cohort["p00"]
    person = wn.PersonDays.from_daily(data)
    personal = wn.WarningPersonal.fit(person.answers[:150])
    x = wn.warning_inputs(person, personal).x
    assert x.shape == (len(data), wn.N_FEATURES) and np.all(np.linalg.norm(x, axis=1) <= 1 + 1e-12)
    # causal: changing every day after day 120 leaves rows 0..120 unchanged
    changed = DailyData(data.days, {k: np.where(np.arange(len(data)) > 120, v[::-1], v) for k, v in data.series.items()})
    x2 = wn.warning_inputs(wn.PersonDays.from_daily(changed), personal).x
    np.testing.assert_array_equal(x[:121], x2[:121])
    assert not np.allclose(x[121:], x2[121:])


def test_device_statistics_are_bounded_and_need_enough_days(cohort):
    person = wn.PersonDays.from_daily(cohort["p01"])
    rows = wn.labelled_rows(person)
    personal, inputs, labels = wn.fit_person(person, rows)
    v = wn.device_statistics(inputs, labels, rows)
    assert v.shape == (wn.STATISTICS_LENGTH,) and np.linalg.norm(v) <= math.sqrt(2) + 1e-9
    with pytest.raises(wn.NotEnoughDataError, match="at least 14"):
        wn.device_statistics(inputs, labels, rows[:10])
    with pytest.raises(wn.WarningError, match="0 or 1"):
        wn.device_statistics(inputs, np.full_like(labels, NAN), rows)
    bad = wn.PersonDays(person.days, np.where(np.arange(len(person)) == 5, np.inf, person.answers), person.raw,
                        person.frame)
    with pytest.raises(wn.WarningError, match="inf"):
        wn.warning_inputs(bad, personal)


# ------------------------------------------------------------------------------ operating point
def _period(scores, labels, starts=()):
    n = len(scores)
    return wn.ScoredDays(np.arange(n), np.asarray(scores, float), np.asarray(labels, float), np.asarray(starts, int))


def test_a_standing_warning_is_issued_again_every_week():
    warn = np.ones(30, dtype=bool)
    assert np.flatnonzero(wn.issued_alarms(warn)).tolist() == [0, 7, 14, 21, 28]
    rec = wn.alarm_record([_period(np.ones(30), np.zeros(30))], threshold=0.5)
    assert rec.alarms == 5 and rec.false_alarms == 5 and rec.true_alarms == 0
    assert rec.false_alarms_per_person_month == pytest.approx(5 / (30 / 30.44))


def test_lead_time_is_measured_from_the_first_warning_in_the_week_before():
    scores = np.zeros(40)
    scores[[20, 23, 24]] = 1.0  # episode starts on day 25: first warning 5 days before
    labels = np.zeros(40)
    labels[18:25] = 1.0
    rec = wn.alarm_record([_period(scores, labels, starts=[25, 3])], threshold=0.5)
    # the start on day 3 has no full week before it in the period: not counted
    assert rec.episodes == 1 and rec.detected == 1 and rec.lead_times == (5,)
    assert rec.alarms == 1 and rec.true_alarms == 1  # day 20 issues; 23, 24 fall in its week


def test_operating_point_respects_the_budget_and_the_event_rate():
    rng = np.random.default_rng(0)
    periods = []
    for _ in range(6):
        labels = (rng.random(120) < 0.3).astype(float)
        scores = labels * 0.5 + rng.random(120)
        starts = np.flatnonzero(np.diff(np.r_[0, labels]) == 1) + 1
        periods.append(_period(scores, labels, starts))
    rec = wn.choose_operating_point(periods, budget=2.0)
    assert rec.false_alarms_per_person_month <= 2.0
    rate = np.mean(np.concatenate([p.labels for p in periods]))
    assert rec.warning_days <= rate * rec.scored_days
    looser = wn.choose_operating_point(periods, budget=10.0)
    assert looser.detected >= rec.detected


# ------------------------------------------------------------------------------ protocol and rows
@pytest.fixture(scope="module")
def evaluated(cohort, public):
    _, prior = public
    days = dict(cohort)
    days["short"] = synthetic_days(1, 30, seed0=900)["p00"]
    assignment = shipped_assignment(prior, "readiness", list(days))
    seen_labels = {}

    class Spy(we.RuleRow):
        def fit_score(self, splits, protocol, seed):
            for s in splits:
                seen_labels[s.person] = (s.labels.copy(), s.last_visible)
            return super().fit_score(splits, protocol, seed)

    rows = {**we.rule_rows(), "spy": Spy(we.readiness_trend_score, None, "spy"),
            **we.baseline_rows(), "warning model, public prior": we.PriorRow(assignment),
            "warning model, non-private": we.ExactStatisticsRow(assignment),
            "warning model, private (ε=4)": WarningStatisticsMethod(assignment, 4.0)}
    reports = {"p00": ["2021-03-10"], "p03": [days["p03"].days[190], days["p03"].days[191]]}
    res = we.evaluate_warning(days, rows, protocol=we.WarningProtocol(bootstrap=100), dataset="synthetic",
                              reports=reports)
    return res, rows, seen_labels


def test_split_has_a_gap_after_the_last_training_label(cohort):
    split, why = we.split_warning_person("p02", cohort["p02"], we.WarningProtocol())
    assert why is None
    last_label_day = int(split.train.max()) + wn.HORIZON
    assert int(split.test.min()) - (wn.WINDOW - 1) > last_label_day + 7
    # the threshold comes from the training period's answers only
    answers = split.days.answers[: last_label_day + 1]
    assert split.personal.low_threshold == pytest.approx(np.median(answers[np.isfinite(answers)]) - 1)


def test_rows_never_see_a_test_label(evaluated):
    _, _, seen = evaluated
    assert seen
    for labels, last_visible in seen.values():
        assert np.all(np.isnan(labels[last_visible + 1 :]))
        assert np.isfinite(labels[: last_visible - wn.HORIZON + 1]).any()


def test_results_have_every_field_and_exclusions_say_why(evaluated):
    res, rows, _ = evaluated
    assert "short" in res.excluded and "too few" in res.excluded["short"]
    d = res.to_dict()
    by_name = {m["name"]: m for m in d["methods"]}
    for name in ("ACWR > 1.5", "monotony > 2", "HRV below baseline (SWC)", "readiness trend",
                 "warning model, non-private", "warning model, private (ε=4)"):
        m = by_name[name]
        assert m["available"], (name, m["reason"])
        for key in ("auroc", "auroc_ci", "pr_auc", "false_alarms_per_person_month", "median_lead_days",
                    "epsilon", "paired_vs_best_rule", "auroc_not_low_today"):
            assert key in m
        lo, hi = m["auroc_ci"]
        assert lo <= m["auroc"] <= hi
    assert by_name["ACWR > 1.5"]["epsilon"] is None and by_name["warning model, public prior"]["epsilon"] == 0.0
    assert 0 < by_name["warning model, private (ε=4)"]["epsilon"] <= 4.0
    best = d["best_rule"]
    assert by_name[best]["paired_vs_best_rule"]["mean"] == 0.0
    # the literature's cuts are the rules' operating points; the others are chosen
    assert by_name["ACWR > 1.5"]["operating_point"] == 1.5
    assert "validation" in by_name["warning model, non-private"]["operating_point_source"]
    assert "public data" in by_name["warning model, private (ε=4)"]["operating_point_source"]
    md = res.to_markdown()
    assert "ΔAUROC vs best rule" in md and "short: too few" in md


def test_secondary_event_with_and_without_reports(evaluated, cohort, public):
    res, _, _ = evaluated
    sec = res.events[we.SECONDARY]
    # p00's report lies outside their days: counted, not dropped silently
    assert sec["report_days_given"] == 3 and sec["report_days_outside_the_persons_days"] == 1
    assert sec["reports_of_evaluated_persons"] == 2 and sec["episodes_all_days"] == 1
    if sec["episodes_in_test_periods"] == 0:
        assert all(r.secondary["available"] is False for r in res.rows if r.available)
    _, prior = public
    assignment = shipped_assignment(prior, "readiness", list(cohort))
    none = we.evaluate_warning(cohort, {"warning model, public prior": we.PriorRow(assignment)},
                               protocol=we.WarningProtocol(bootstrap=20), reports=None)
    assert none.events[we.SECONDARY] == {"available": False, "reason": "this cohort has no injury or illness reports"}
    assert "no injury or illness reports" in none.to_markdown()


def test_private_row_is_one_accounted_release_and_shrinks_to_the_prior(evaluated, cohort, public):
    res, rows, _ = evaluated
    row = rows["warning model, private (ε=4)"]
    assert len(row.privacy_releases) == 1
    assert row.epsilon == pytest.approx(PrivacyAccountant().epsilon_value(row.privacy_releases, 1e-5))
    assert row.chosen["release"]["statistics_length"] == wn.STATISTICS_LENGTH
    # almost no privacy budget: the noise swamps the statistics and the solve stays within the
    # prior's own uncertainty of it (the noise cannot carry the model away)
    _, prior = public
    tp = prior.target("readiness")
    splits, _ = we.split_cohort(cohort, we.WarningProtocol())
    tiny = WarningStatisticsMethod(shipped_assignment(prior, "readiness", list(cohort)), 0.01)
    tiny.fit_score([we.visible(s) for s in splits], we.WarningProtocol(), 0)
    assert tiny.chosen["release"]["actual_noise_std"] > 100
    assert max(tiny.chosen["weights_distance_to_prior"].values()) < math.sqrt(tp.tau2.sum())


def test_a_cohort_without_enough_days_is_refused_with_reasons():
    days = synthetic_days(3, 35, seed0=700)
    with pytest.raises(wn.WarningError, match="only 0 of 3 persons.*too few days with a defined 7-day label"):
        we.split_cohort(days, we.WarningProtocol())


def test_average_precision_matches_a_hand_count():
    assert we.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(we.average_precision([0, 0], [0.1, 0.2]))
