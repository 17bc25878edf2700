"""The public prior of the linear head: weights fitted on public data only, shipped in the
package, costing no device any privacy.

Fitted by ``restwise model prior --data DIR --out FILE`` on the shared public datasets (CC BY
4.0): SoccerMon's wellness answers and, where its features exist, LifeSnaps. One prior per
target series: each public person whose series has enough answers contributes their own
per-example means ``(A_i, b_i)`` (:func:`restwise.models.linear_head.moments`) with weight
one, exactly as a device would in the private release. So the ``readiness`` prior comes from
SoccerMon (LifeSnaps asks no readiness question) and the ``fatigue`` prior from both.

Per target (all on public data, nothing tuned on a test period):

* the ridge penalty toward 0 ("same as your last answer") is chosen from ``RIDGE_GRID`` by
  5-fold cross-validation over persons (person k in fold k mod 5, persons sorted), scored by
  the held-out persons' mean squared error of the bounded target, computed from their moments;
* ``weights`` w0: the ridge solution on all persons at that penalty;
* ``tau2``: the variance of each weight over ``BOOTSTRAP`` resamples of the persons (seeded):
  how far a cohort's weights may plausibly lie from w0. Floored at the median over the weights
  the public data inform; a weight no public person informs (a feature that is always 0 there,
  e.g. HRV in SoccerMon's readiness prior) has w0 = 0 and the largest variance of the informed
  ones: the release may move it as far as the least certain informed weight, no further (the
  noise in a released A would otherwise fit it to noise);
* ``person_variance``: the mean over persons of ``||b_i - A_i w0||^2 / d``;
* for the planner: the mean second-moment matrix ``mean_A`` (upper triangle) and the mean
  norm of one person's statistics vector.

The file is JSON with its provenance (datasets, licences, citations, persons and rows per
target, the feature-spec version and its sha256, the command) and the sha256 of everything
else in it. :func:`load_prior` refuses (:class:`PriorError`) a file whose hash does not match
its content, whose feature-spec version or spec hash is not this code's, or, for the shipped
file, whose hash is not the one pinned here (``SHIPPED_PRIOR_SHA256``).

Another architecture released as bounded statistics (the early-warning model,
:mod:`restwise.models.warning`) uses the same fit, file, verification and cross-fitting
through a :class:`PriorSpec` (its format name, feature spec, per-person moments, target bound,
shipped file and pin, and optional extra public-data fields such as an operating point);
every function takes ``spec=`` and defaults to the linear head's, :data:`LINEAR_HEAD_PRIOR`.

Cross-fitting for the evaluation (:func:`cross_fitted_priors`): the public dataset's persons
are split in two by a fixed rule (sorted ids, alternating), each half is scored with the prior
fitted on the other half (plus other public datasets with that target); no person's data is
in the prior that scores them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from restwise.common.errors import ModelError
from restwise.models.evaluation import PersonSplit, Prediction, windowed_examples
from restwise.models.features import DailyData, compute_features
from restwise.models.linear_head import (
    ARCHITECTURE_NAME,
    FEATURE_SPEC_VERSION,
    HISTORY_DAYS,
    MIN_EXAMPLES,
    TARGET_BOUND,
    WINDOW,
    LinearHead,
    LinearHeadError,
    PersonalScale,
    PriorWeights,
    feature_spec_sha256,
    head_inputs,
    moments,
    pack_statistics,
    target_delta,
)

PRIOR_FORMAT = "restwise-linear-head-prior"
PRIOR_FORMAT_VERSION = 1
SHIPPED_PRIOR = "priors/linear_head_prior.json"  # inside restwise.models (package data)
# The sha256 of the shipped prior (its "sha256" field). Rebuilding the prior means updating
# this pin in the same change (tests/test_prior.py checks that they agree).
SHIPPED_PRIOR_SHA256 = "219eb6106a8dbb6ef4533f79be160b47f2f3225a603ff11414d2189e7e46d4fd"
RIDGE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1)  # x persons: the penalty toward 0
CV_FOLDS = 5
BOOTSTRAP = 200

PUBLIC_DATASETS = {
    "soccermon": {
        "licence": "CC BY 4.0",
        "citation": "Midoglu et al., A large-scale multivariate soccer athlete health, performance, "
                    "and position monitoring dataset (SoccerMon), Scientific Data 11, 2024",
    },
    "lifesnaps": {
        "licence": "CC BY 4.0",
        "citation": "Yfantidou et al., LifeSnaps, a 4-month multi-modal dataset capturing unobtrusive "
                    "snapshots of our lives in the wild, Scientific Data 9, 2022",
    },
}


class PriorError(ModelError):
    """A prior cannot be fitted or loaded (a hash or spec mismatch, a missing target...)."""


@dataclass(frozen=True)
class PublicCohort:
    """Persons of one public dataset: name (a key of ``PUBLIC_DATASETS`` for provenance)."""

    name: str
    days: Mapping[str, DailyData]


@dataclass(frozen=True)
class PersonMoments:
    person: str
    dataset: str
    A: np.ndarray
    b: np.ndarray
    c: float  # mean squared target
    rows: int


def person_moments(person: str, dataset: str, data: DailyData, target: str) -> PersonMoments | None:
    """One public person's per-example means over all their days, or None when the target
    has fewer than ``MIN_EXAMPLES`` examples (they would not take part as a device either)."""
    if target not in data.series or int(np.isfinite(data.series[target]).sum()) < MIN_EXAMPLES + 1:
        return None
    ex = windowed_examples(compute_features(data), data.series[target], WINDOW, HISTORY_DAYS)
    if len(ex) < MIN_EXAMPLES:
        return None
    personal = PersonalScale.fit(ex.y)
    inputs = head_inputs(ex.X, ex.history, personal)
    delta = target_delta(ex.y, inputs.anchor, personal)
    A, b = moments(inputs.x, delta)
    return PersonMoments(person, dataset, A, b, float(np.mean(delta**2)), len(ex))


def ridge_from_moments(items: Sequence[PersonMoments], lam_per_person: float) -> np.ndarray:
    """The ridge solution toward 0 on persons' moments, each person weighted once."""
    A = sum(p.A for p in items)
    b = sum(p.b for p in items)
    return np.linalg.solve(A + lam_per_person * len(items) * np.eye(b.shape[0]), b)


def _cv_error(items: Sequence[PersonMoments], lam: float) -> float:
    errs = []
    for fold in range(CV_FOLDS):
        train = [p for i, p in enumerate(items) if i % CV_FOLDS != fold]
        held = [p for i, p in enumerate(items) if i % CV_FOLDS == fold]
        if not train or not held:
            continue
        w = ridge_from_moments(train, lam)
        errs += [float(w @ p.A @ w - 2 * p.b @ w + p.c) for p in held]
    return float(np.mean(errs))


@dataclass(frozen=True)
class PriorSpec:
    """What a prior file belongs to: an architecture whose devices release bounded statistics
    once. ``person_moments(person, dataset, days, target)`` gives one public person's moments
    (or None when they have too few examples); ``annotate(target, cohorts, fitted)``, when set,
    adds extra public-data fields to a fitted target (stored under ``extra``)."""

    format: str
    architecture: str
    feature_spec_version: int
    feature_spec_sha256: Callable[[], str]
    person_moments: Callable[[str, str, DailyData, str], "PersonMoments | None"]
    target_bound: float
    min_examples: int
    shipped: str  # package-relative path inside restwise.models
    shipped_sha256: str
    build_command: str  # how to refit it (named in refusals)
    annotate: Callable | None = None


LINEAR_HEAD_PRIOR = PriorSpec(
    format=PRIOR_FORMAT, architecture=ARCHITECTURE_NAME, feature_spec_version=FEATURE_SPEC_VERSION,
    feature_spec_sha256=feature_spec_sha256, person_moments=person_moments, target_bound=TARGET_BOUND,
    min_examples=MIN_EXAMPLES, shipped=SHIPPED_PRIOR, shipped_sha256=SHIPPED_PRIOR_SHA256,
    build_command="restwise model prior")


@dataclass(frozen=True)
class TargetPrior:
    """The fitted prior of one target series (see the module docstring)."""

    target: str
    weights: np.ndarray
    tau2: np.ndarray
    person_variance: float
    ridge_lambda: float
    persons: dict[str, int]  # dataset -> persons
    rows: dict[str, int]  # dataset -> examples
    mean_A: np.ndarray
    mean_statistics_norm: float
    extra: dict = field(default_factory=dict)  # PriorSpec.annotate's fields (none for the linear head)

    def prior_weights(self) -> PriorWeights:
        return PriorWeights(self.weights, self.tau2, self.person_variance)

    def to_dict(self) -> dict:
        iu = np.triu_indices(self.weights.shape[0])
        out = {
            "weights": [float(v) for v in self.weights],
            "tau2": [float(v) for v in self.tau2],
            "person_variance": float(self.person_variance),
            "ridge_lambda_per_person": float(self.ridge_lambda),
            "persons": dict(self.persons),
            "rows": dict(self.rows),
            "mean_A_upper": [float(v) for v in self.mean_A[iu]],
            "mean_statistics_norm": float(self.mean_statistics_norm),
        }
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_dict(cls, target: str, d: Mapping) -> "TargetPrior":
        try:
            d_features = len(d["weights"])
            iu = np.triu_indices(d_features)
            A = np.zeros((d_features, d_features))
            A[iu] = np.asarray(d["mean_A_upper"], dtype=np.float64)
            A = A + A.T - np.diag(np.diag(A))
            out = cls(target, np.asarray(d["weights"], dtype=np.float64), np.asarray(d["tau2"], dtype=np.float64),
                      float(d["person_variance"]), float(d["ridge_lambda_per_person"]),
                      {str(k): int(v) for k, v in d["persons"].items()},
                      {str(k): int(v) for k, v in d["rows"].items()}, A, float(d["mean_statistics_norm"]),
                      dict(d.get("extra") or {}))
            out.prior_weights()  # validates shapes and values
            return out
        except (KeyError, TypeError, ValueError) as exc:
            raise PriorError(f"the prior's entry for {target!r} is malformed ({exc})") from None


def fit_target_prior(target: str, cohorts: Sequence[PublicCohort], *, seed: int = 0,
                     spec: PriorSpec | None = None) -> TargetPrior:
    """Fit one target's prior on every person of ``cohorts`` with enough answers."""
    spec = spec or LINEAR_HEAD_PRIOR
    items = []
    for cohort in cohorts:
        for person in sorted(cohort.days):
            pm = spec.person_moments(person, cohort.name, cohort.days[person], target)
            if pm is not None:
                items.append(pm)
    if len(items) < 2 * CV_FOLDS:
        raise PriorError(f"only {len(items)} public persons have {spec.min_examples}+ examples of {target!r}; "
                         f"a prior needs at least {2 * CV_FOLDS}")
    d_features = items[0].b.shape[0]
    lam = min(RIDGE_GRID, key=lambda g: (_cv_error(items, g), g))
    w0 = ridge_from_moments(items, lam)
    rng = np.random.default_rng(seed)
    boot = np.stack([ridge_from_moments([items[i] for i in rng.integers(0, len(items), len(items))], lam)
                     for _ in range(BOOTSTRAP)])
    var = boot.var(axis=0)
    informed = np.array([any(p.A[j, j] > 0 for p in items) for j in range(d_features)])
    if not informed.any():
        raise PriorError(f"no feature of {target!r} is informed by the public data")
    floor = float(np.median(var[informed]))
    tau2 = np.where(informed, np.maximum(var, floor), float(np.max(np.maximum(var, floor)[informed])))
    resid = [float(np.sum((p.b - p.A @ w0) ** 2)) / d_features for p in items]
    persons: dict[str, int] = {}
    rows: dict[str, int] = {}
    for p in items:
        persons[p.dataset] = persons.get(p.dataset, 0) + 1
        rows[p.dataset] = rows.get(p.dataset, 0) + p.rows
    mean_vec = np.mean([pack_statistics(p.A, p.b, spec.target_bound) for p in items], axis=0)
    fitted = TargetPrior(target, w0, tau2, float(np.mean(resid)), lam, persons, rows,
                         np.mean([p.A for p in items], axis=0), float(np.linalg.norm(mean_vec)))
    if spec.annotate is None:
        return fitted
    return TargetPrior(**{**fitted.__dict__, "extra": dict(spec.annotate(target, cohorts, fitted))})


# ------------------------------------------------------------------------------ the file
def _canonical(payload: Mapping) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class PublicPrior:
    """A loaded (verified) or freshly fitted prior: one :class:`TargetPrior` per target."""

    targets: dict[str, TargetPrior]
    datasets: list[dict]
    command: str = ""
    sha256: str = ""
    spec: PriorSpec | None = None  # None: the linear head's (LINEAR_HEAD_PRIOR)

    @property
    def kind(self) -> PriorSpec:
        return self.spec or LINEAR_HEAD_PRIOR

    def target(self, name: str) -> TargetPrior:
        if name not in self.targets:
            raise PriorError(f"the prior has no weights for target {name!r} "
                             f"(it has: {', '.join(sorted(self.targets)) or 'none'})")
        return self.targets[name]

    def weights_for(self, name: str) -> PriorWeights:
        return self.target(name).prior_weights()

    def payload(self) -> dict:
        return {
            "format": self.kind.format,
            "format_version": PRIOR_FORMAT_VERSION,
            "architecture": self.kind.architecture,
            "feature_spec_version": self.kind.feature_spec_version,
            "feature_spec_sha256": self.kind.feature_spec_sha256(),
            "command": self.command,
            "datasets": self.datasets,
            "targets": {k: v.to_dict() for k, v in sorted(self.targets.items())},
        }

    def to_json(self) -> str:
        payload = self.payload()
        payload["sha256"] = hashlib.sha256(_canonical(payload)).hexdigest()
        return json.dumps(payload, indent=1, sort_keys=True) + "\n"


def fit_prior(cohorts: Sequence[PublicCohort], targets: Sequence[str] = ("readiness", "fatigue"), *,
              command: str = "", seed: int = 0, spec: PriorSpec | None = None) -> PublicPrior:
    """Fit every target some public person answered often enough; provenance per dataset."""
    for c in cohorts:
        if c.name not in PUBLIC_DATASETS:
            raise PriorError(f"{c.name!r} is not a known public dataset (known: {', '.join(PUBLIC_DATASETS)})")
    fitted: dict[str, TargetPrior] = {}
    reasons = []
    for t in targets:
        try:
            fitted[t] = fit_target_prior(t, cohorts, seed=seed, spec=spec)
        except PriorError as exc:
            reasons.append(str(exc))
    if not fitted:
        raise PriorError("no target could be fitted: " + "; ".join(reasons))
    datasets = []
    for c in cohorts:
        datasets.append({
            "name": c.name, **PUBLIC_DATASETS[c.name], "persons_in_data": len(c.days),
            "persons_used": {t: p.persons.get(c.name, 0) for t, p in fitted.items()},
            "rows_used": {t: p.rows.get(c.name, 0) for t, p in fitted.items()},
        })
    return PublicPrior(fitted, datasets, command, spec=spec)


def parse_prior(text: str | bytes, *, expected_sha256: str | None = None,
                spec: PriorSpec | None = None) -> PublicPrior:
    """Verify and read a prior file's content; refuses anything that does not match."""
    kind = spec or LINEAR_HEAD_PRIOR
    try:
        data = json.loads(text)
    except ValueError:
        raise PriorError("the prior file is not JSON") from None
    if not isinstance(data, dict) or data.get("format") != kind.format:
        raise PriorError(f"not a Restwise {kind.architecture} prior file")
    if data.get("format_version") != PRIOR_FORMAT_VERSION:
        raise PriorError(f"prior format version {data.get('format_version')!r} is not supported "
                         f"(this Restwise reads {PRIOR_FORMAT_VERSION})")
    recorded = data.pop("sha256", None)
    try:
        actual = hashlib.sha256(_canonical(data)).hexdigest()
    except (TypeError, ValueError):
        raise PriorError("the prior file's content is not canonical JSON") from None
    if recorded != actual:
        raise PriorError("the prior file's sha256 does not match its content (damaged or edited); refusing it")
    if expected_sha256 is not None and actual != expected_sha256:
        raise PriorError(f"the prior's sha256 {actual[:12]}... is not the expected {expected_sha256[:12]}...; "
                         "refusing it")
    if data.get("feature_spec_version") != kind.feature_spec_version:
        raise PriorError(f"the prior was fitted under feature spec version {data.get('feature_spec_version')!r}; "
                         f"this Restwise computes version {kind.feature_spec_version}. Refit it with "
                         f"`{kind.build_command}`")
    if data.get("feature_spec_sha256") != kind.feature_spec_sha256():
        raise PriorError("the prior was fitted under another feature spec (spec sha256 differs); refit it "
                         f"with `{kind.build_command}`")
    targets = data.get("targets")
    if not isinstance(targets, dict) or not targets:
        raise PriorError("the prior file holds no targets")
    return PublicPrior({str(k): TargetPrior.from_dict(str(k), v) for k, v in targets.items()},
                       list(data.get("datasets") or []), str(data.get("command") or ""), actual, spec)


def load_prior(path: Path | str | None = None, *, expected_sha256: str | None = None,
               spec: PriorSpec | None = None) -> PublicPrior:
    """The prior at ``path``, or the shipped one (pinned to the spec's ``shipped_sha256``)."""
    kind = spec or LINEAR_HEAD_PRIOR
    if path is None:
        try:
            text = resources.files("restwise.models").joinpath(kind.shipped).read_bytes()
        except (FileNotFoundError, OSError):
            raise PriorError(f"the shipped {kind.architecture} prior file is missing from the package") from None
        return parse_prior(text, expected_sha256=kind.shipped_sha256, spec=spec)
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise PriorError(f"cannot read the prior file {path}: {exc.strerror or exc}") from None
    return parse_prior(text, expected_sha256=expected_sha256, spec=spec)


def statistics_release_shape(name: str, statistics_length: int, sensitivity: float, target_bound: float,
                             target_prior: TargetPrior) -> dict:
    """What one release of a bounded-statistics architecture shares, for the planner
    (``Architecture.release_shape``; the fields of ``privacy.utility.StatisticsReleaseShape``):
    its signal and prior taken from a fitted prior (public data)."""
    tp = target_prior
    return {"mechanism": "statistics", "name": name, "statistics_length": int(statistics_length),
            "sensitivity": float(sensitivity), "target_bound": float(target_bound),
            "mean_second_moment": tp.mean_A, "prior_tau2": tp.tau2,
            "prior_weights_norm2": float(tp.weights @ tp.weights), "person_variance": float(tp.person_variance),
            "mean_statistics_norm": float(tp.mean_statistics_norm)}


# ------------------------------------------------------------------------------ evaluation
@dataclass
class PriorAssignment:
    """Which prior scores which person: ``groups`` label -> weights, ``person_group`` person ->
    label (a person's own data is never in their group's prior); ``sources`` label -> what the
    prior was fitted on."""

    groups: dict[str, PriorWeights]
    person_group: dict[str, str]
    sources: dict[str, str] = field(default_factory=dict)
    # label -> the fitted prior's extra public-data fields (PriorSpec.annotate; e.g. the
    # early-warning model's operating point); empty for the linear head
    details: dict[str, dict] = field(default_factory=dict)

    def weights_for(self, person: str) -> PriorWeights:
        if person not in self.person_group:
            raise PriorError("a person has no prior assigned (cross-fitting covers the cohort's persons only)")
        return self.groups[self.person_group[person]]

    def describe(self) -> dict:
        return {"sources": dict(self.sources),
                "persons_per_group": {g: sum(1 for v in self.person_group.values() if v == g)
                                      for g in self.groups}}


def cross_fit_halves(persons: Sequence[str]) -> dict[str, int]:
    """The fixed rule: persons sorted by id, alternately in half 0 and half 1."""
    return {p: i % 2 for i, p in enumerate(sorted(persons))}


def cross_fitted_priors(dataset: str, cohort: Mapping[str, DailyData], target: str, *,
                        extra: Sequence[PublicCohort] = (), seed: int = 0,
                        spec: PriorSpec | None = None) -> PriorAssignment:
    """Half h of ``cohort`` is scored by the prior fitted on the other half (plus ``extra``)."""
    halves = cross_fit_halves(list(cohort))
    groups, sources, details = {}, {}, {}
    for h in (0, 1):
        other = {p: d for p, d in cohort.items() if halves[p] != h}
        fitted = fit_target_prior(target, [PublicCohort(dataset, other), *extra], seed=seed, spec=spec)
        label = f"half {h}"
        groups[label] = fitted.prior_weights()
        details[label] = dict(fitted.extra)
        sources[label] = (", ".join(f"{k}: {v} persons" for k, v in sorted(fitted.persons.items()))
                          + f" ({dataset}: the other half only)")
    return PriorAssignment(groups, {p: f"half {h}" for p, h in halves.items()}, sources, details)


def shipped_assignment(prior: PublicPrior, target: str, persons: Sequence[str]) -> PriorAssignment:
    """Everybody scored with one (shipped) prior: for cohorts none of whose persons is in it."""
    return PriorAssignment({"shipped": prior.weights_for(target)}, {p: "shipped" for p in persons},
                           {"shipped": f"shipped prior sha256 {prior.sha256[:12]}... ("
                            + ", ".join(f"{k}: {v} persons" for k, v in sorted(prior.target(target).persons.items()))
                            + ")"}, {"shipped": dict(prior.target(target).extra)})


def split_inputs(s: PersonSplit) -> tuple[PersonalScale, object]:
    """The person's scale (from their training examples) and their test-period feature rows."""
    personal = PersonalScale.fit(s.train.y, low_threshold=s.low_threshold)
    return personal, head_inputs(s.test.X, s.test.history, personal)


def predict_split(model: LinearHead, s: PersonSplit) -> Prediction:
    personal, inputs = split_inputs(s)
    value, cont = model.predict(inputs, personal)
    return Prediction(value, model.low_score(cont, personal))


@dataclass
class PublicPriorMethod:
    """Row ``public prior``: the prior's weights alone (epsilon 0: public data only)."""

    assignment: PriorAssignment
    description: str = "linear head with the public prior's weights only (no private release)"
    epsilon: float = 0.0

    def fit_predict(self, splits, seed):
        check_history(splits)
        self.chosen = {"prior": self.assignment.describe()}
        return {s.person: predict_split(LinearHead(self.assignment.weights_for(s.person).weights), s)
                for s in splits}


def check_history(splits: Sequence[PersonSplit]) -> None:
    for s in splits:
        if s.test.history.shape[1] != HISTORY_DAYS:
            raise LinearHeadError(f"the linear head needs {HISTORY_DAYS} days of answer history per example "
                                  "(ProtocolConfig.history_days)")


__all__ = [
    "PriorError", "PublicCohort", "PublicPrior", "TargetPrior", "PriorAssignment", "PublicPriorMethod",
    "fit_prior", "fit_target_prior", "load_prior", "parse_prior", "cross_fitted_priors", "cross_fit_halves",
    "shipped_assignment", "person_moments", "predict_split", "split_inputs", "PUBLIC_DATASETS",
    "SHIPPED_PRIOR_SHA256", "check_history", "PriorSpec", "LINEAR_HEAD_PRIOR", "PersonMoments",
    "ridge_from_moments", "statistics_release_shape",
]
