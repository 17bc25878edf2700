"""The parts of ``restwise evaluate --task early-warning`` that run many devices in one
process: the rows, the planner's decision, the coach's records, and SoccerMon's reports.

``simulation.evaluate_cli.run_warning_evaluation`` imports every person into their own encrypted
store and reads them back as the coach reads them (as the readiness evaluation), then uses
these. SoccerMon's injury and illness reports (not imported into the stores: they are
evaluation outcomes, read here from the dataset's ``injury/injury.csv`` and
``illness/illness.csv``) give the secondary event. Rows (:mod:`restwise.models.warning_evaluation`): the literature's rules, the readiness
trend, two sceptic's baselines, the warning model with its public prior (cross-fitted on a
public dataset, the shipped warning prior on a cohort folder), non-private from exact
statistics, and private from one DP release at each epsilon. The planner
(``restwise privacy plan --model early-warning``) states whether a release is expected to
beat the prior at the cohort's size; its decision names the row the coach's record comes
from. Files: ``results.json``, ``results.md``, ``results.png`` (lead time against false
alarms).

    restwise evaluate --task early-warning --dataset soccermon --data ../shared/data/soccermon \\
        --out docs/results/early-warning/soccermon
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from restwise.models.prior import PUBLIC_DATASETS, PriorError, cross_fitted_priors, load_prior, shipped_assignment
from restwise.models.warning import WARNING_PRIOR, WarningError
from restwise.models.warning_evaluation import (
    ExactStatisticsRow,
    PriorRow,
    WarningResult,
    baseline_rows,
    coach_record,
    rule_rows,
)
from restwise.models.warning import ARCHITECTURE_NAME as WARNING_MODEL
from restwise.planning import plan_run
from restwise.simulation.warning_statistics import DEFAULT_EPSILONS, row_name, warning_statistics_methods

PRIOR_ROW = "warning model, public prior"  # what a device runs today (the shipped prior)
PLANNED_EPSILON = 4.0  # the private row the targets are measured on (epsilon <= 4)
REPORT_FILES = {"injury": "injury/injury.csv", "illness": "illness/illness.csv"}


@dataclass
class Reports:
    """Injury and illness reports of a SoccerMon folder: person -> ISO days, and counts."""

    days: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # kind -> report rows read
    unreadable: dict[str, int] = field(default_factory=dict)  # kind -> rows without a person or date

    def to_dict(self) -> dict:
        return {"rows": dict(self.rows), "unreadable_rows": dict(self.unreadable),
                "persons_with_reports": sum(1 for v in self.days.values() if v)}


def read_soccermon_reports(data_path: Path | str) -> Reports | None:
    """SoccerMon's injury and illness report rows (``player_name``, ``timestamp`` dd.mm.yyyy),
    or None when the folder has neither file. A row without a player or a readable date is
    counted as unreadable, never silently dropped."""
    root = Path(data_path)
    if (root / "subjective").is_dir():
        root = root / "subjective"
    found = {k: root / rel for k, rel in REPORT_FILES.items() if (root / rel).is_file()}
    if not found:
        return None
    out = Reports()
    for kind, path in found.items():
        out.rows[kind] = out.unreadable[kind] = 0
        with path.open(newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                person = (row.get("player_name") or "").strip()
                try:
                    day = dt.datetime.strptime((row.get("timestamp") or "").strip(), "%d.%m.%Y").date().isoformat()
                except ValueError:
                    day = ""
                if not person or not day:
                    out.unreadable[kind] += 1
                    continue
                out.rows[kind] += 1
                out.days.setdefault(person, []).append(day)
    return out


def warning_methods(kind: str, cohort: Mapping, target: str, *, prior_path: Path | str | None = None,
                    extra: Sequence = (), epsilons: Sequence[float] = DEFAULT_EPSILONS) -> dict:
    """The rows. A public dataset is cross-fitted (each half scored by the warning prior and
    operating point fitted on the other half, plus ``extra``: other public datasets'
    ``PublicCohort`` with that target); a cohort folder by the shipped warning prior."""
    if kind in PUBLIC_DATASETS:
        try:
            assignment = cross_fitted_priors(kind, cohort, target, extra=extra, spec=WARNING_PRIOR)
        except (PriorError, WarningError) as exc:
            raise PriorError(f"the cross-fitted warning prior cannot be fitted: {exc} (evaluate more persons)") from None
    else:
        assignment = shipped_assignment(load_prior(prior_path, spec=WARNING_PRIOR), target, list(cohort))
    return {**rule_rows(), **baseline_rows(), PRIOR_ROW: PriorRow(assignment),
            "warning model, non-private": ExactStatisticsRow(assignment),
            **warning_statistics_methods(assignment, epsilons)}


def planner_decision(devices: int, target: str, epsilon: float = PLANNED_EPSILON) -> dict:
    """What the planner says for a release from ``devices`` devices at ``epsilon``, and the
    resulting choice: prior + one DP release when it is expected to beat the prior, else the
    prior only."""
    verdict = plan_run(WARNING_MODEL, max(int(devices), 2), epsilon, target=target)
    decision = "prior + one DP release" if verdict.expected_to_beat_prior else "prior only"
    return {"devices": devices, "epsilon": epsilon, "message": verdict.message, "decision": decision,
            "expected_to_beat_prior": verdict.expected_to_beat_prior,
            "reduction_of_prior_error": verdict.numbers.get("reduction"),
            "coach_row": row_name(epsilon) if verdict.expected_to_beat_prior else PRIOR_ROW}


def finish(result: WarningResult, target: str) -> WarningResult:
    """The planner's decision for the cohort's size, and the coach's records: with the shipped
    prior (a device without a deployment's release) and with the planner's choice."""
    result.planner = planner_decision(len(result.persons), target)
    result.coach_record = {"device_with_public_prior": coach_record(result, PRIOR_ROW),
                           "planner_choice": coach_record(result, result.planner["coach_row"])}
    return result


__all__ = ["warning_methods", "read_soccermon_reports", "Reports", "planner_decision", "finish", "PRIOR_ROW"]
