"""Honest evaluation of next-day readiness models: protocol, baselines, metrics, reports.

Pure: persons' :class:`~restwise.models.features.DailyData` in, numbers out. Nothing here
reads a store (``restwise.simulation.evaluate_cli`` imports each person into their own encrypted
store first and hands the decoded days in).

Protocol (issue 4), per person:

* **task**: predict the target (readiness, 0-10) of day t+1 from the feature rows of days
  t-6..t (features are causal: row t uses days <= t only);
* **split**: the person's examples (days t+1 with a target) in time order; the first 75% are
  training examples. Let T be the last training target day. Test examples are the later ones
  whose *input window starts at least* ``gap_days`` (7) days after T: T+1..T+7 are neither
  training targets nor test inputs. So no test input day is a training target day, and no test
  target is a training input (asserted on day indices by :func:`check_no_leakage`). Days are
  never shuffled across the split;
* **normalisation**: per person, fitted on that person's training examples only (target mean
  and scale, feature mean and SD for the linear models, the low-readiness threshold);
* **metrics**: MAE per person, then the mean over persons (each person weighs the same), with a
  95% bootstrap interval over persons (fixed seed); AUROC of the low-readiness flag (target <=
  person's training median - 1) per person with both classes in the test period, averaged over
  those persons (and pooled over all test examples, reported alongside);
* **tuning**: hyper-parameters (ridge penalty, fine-tuning) are chosen on a validation slice:
  the same split applied *inside* each person's training examples (last 20%, same gap). The
  test period is used once, for the reported numbers.

A method is anything with ``fit_predict(splits, seed) -> {person: Prediction}`` (see
:class:`Method`); it sees training examples only and returns test-period predictions. New rows
(federated with and without DP) plug in through ``evaluate(cohort, methods)``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from restwise.common.errors import ModelError
from restwise.models.features import DailyData, Examples, FeatureFrame, compute_features


class EvaluationError(ModelError):
    """The evaluation cannot run as asked (too few persons, a bad config, ...)."""


# ------------------------------------------------------------------------------ protocol
@dataclass(frozen=True)
class ProtocolConfig:
    window: int = 7
    train_fraction: float = 0.75
    gap_days: int = 7
    target: str = "readiness"
    low_margin: float = 1.0  # low flag: target <= training median - low_margin
    min_train: int = 28  # persons with fewer training examples are left out (and listed)
    min_test: int = 7
    validation_fraction: float = 0.2
    # Days of the person's own answers (days t-history_days+1..t) each example carries; the
    # input window is the last ``window`` of them. Only past answers: days <= t.
    history_days: int = 56
    bootstrap: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 1 or self.gap_days < 0:
            raise EvaluationError("window must be >= 1 and gap_days >= 0")
        if self.history_days < self.window:
            raise EvaluationError("history_days must be >= window")
        if not 0.0 < self.train_fraction < 1.0 or not 0.0 < self.validation_fraction < 1.0:
            raise EvaluationError("train_fraction and validation_fraction must be in (0, 1)")
        if self.min_train < 2 or self.min_test < 1 or self.bootstrap < 0:
            raise EvaluationError("min_train >= 2, min_test >= 1, bootstrap >= 0")


@dataclass
class ExampleSet:
    """Windowed examples of one person. Day indices refer to the person's DailyData."""

    X: np.ndarray  # [n, window * n_features] float32
    y: np.ndarray  # [n] float64
    end_idx: np.ndarray  # [n] int: day t (last input day)
    window: int
    n_features: int
    last_value: np.ndarray  # [n]: most recent target within the input window, NaN if none
    # [n, H]: the target series on days t-H+1..t (NaN = not answered or before the data)
    history: np.ndarray

    @property
    def today(self) -> np.ndarray:
        """Day t's answer (the last input day), NaN when the person did not answer."""
        return self.history[:, -1]

    @property
    def target_idx(self) -> np.ndarray:
        return self.end_idx + 1

    @property
    def start_idx(self) -> np.ndarray:
        return self.end_idx - self.window + 1

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx) -> "ExampleSet":
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return ExampleSet(self.X[idx], self.y[idx], self.end_idx[idx], self.window,
                          self.n_features, self.last_value[idx], self.history[idx])

    def to_examples(self, days: Sequence[str]) -> Examples:
        """As ``features.Examples`` (what ``training.train_local`` consumes)."""
        return Examples(
            X=np.ascontiguousarray(self.X, dtype=np.float32),
            y=self.y.astype(np.float32),
            target_days=[days[i] for i in self.target_idx],
            input_end_days=[days[i] for i in self.end_idx],
            last_readiness=self.last_value.astype(np.float32),
            window=self.window,
            n_features=self.n_features,
        )


@dataclass
class PersonSplit:
    person: str
    days: list[str]
    train: ExampleSet
    test: ExampleSet
    low_threshold: float
    gap_days: int

    @property
    def train_mean(self) -> float:
        return float(np.mean(self.train.y))

    @property
    def train_scale(self) -> float:
        return max(float(np.std(self.train.y)), 0.5)


def windowed_examples(frame: FeatureFrame, target: np.ndarray, window: int,
                      history_days: int | None = None) -> ExampleSet:
    """Every example with a target on day t+1 and a full input window t-window+1..t; with
    each the target series of days t-history_days+1..t (default: the window)."""
    X = np.asarray(frame.X, dtype=np.float32)
    n, n_feat = X.shape
    target = np.asarray(target, dtype=np.float64)
    ends = np.asarray([t for t in range(window - 1, n - 1) if np.isfinite(target[t + 1])], dtype=int)
    if ends.size:
        stacked = np.stack([X[ends - window + 1 + k] for k in range(window)], axis=1)
        Xo = stacked.reshape(len(ends), window * n_feat)
        # "Last value": the most recent target answered within the input window.
        win_targets = np.stack([target[ends - window + 1 + k] for k in range(window)], axis=1)
        last = np.full(len(ends), np.nan)
        for k in range(window):
            col = win_targets[:, k]
            last = np.where(np.isfinite(col), col, last)
    else:
        Xo = np.zeros((0, window * n_feat), dtype=np.float32)
        last = np.zeros(0)
    h = max(int(history_days or window), window)
    padded = np.concatenate([np.full(h, np.nan), target])
    history = np.stack([padded[ends + 1 + k] for k in range(h)], axis=1) if ends.size else np.zeros((0, h))
    return ExampleSet(np.ascontiguousarray(Xo), target[ends + 1] if ends.size else np.zeros(0),
                      ends, window, n_feat, last, history)


def chronological_positions(end_idx: np.ndarray, fraction: float, gap_days: int, *, window: int,
                            horizon: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The split on day indices: positions (into ``end_idx``, in time order) of the first
    ``fraction`` of the examples, and of the later ones whose input window (days
    t-window+1..t) starts more than ``gap_days`` days after the last earlier target day. An
    example ending on day t has its targets on days t+1..t+``horizon`` (1 for next-day
    readiness, 7 for a 7-day event)."""
    end_idx = np.asarray(end_idx, dtype=int)
    order = np.argsort(end_idx, kind="stable")
    n_first = int(math.floor(fraction * len(order)))
    first = order[:n_first]
    if n_first == 0:
        return first, order[:0]
    last_target = int(end_idx[first].max()) + horizon
    rest = order[n_first:]
    return first, rest[end_idx[rest] - window + 1 > last_target + gap_days]


def chronological_split(
    ex: ExampleSet, fraction: float, gap_days: int
) -> tuple[ExampleSet, ExampleSet]:
    """First ``fraction`` of the examples (time order) vs the later ones whose input window
    starts more than ``gap_days`` days after the last earlier target."""
    first, later = chronological_positions(ex.end_idx, fraction, gap_days, window=ex.window)
    return ex.take(first), ex.take(later)


def check_no_leakage_days(first_end: np.ndarray, later_end: np.ndarray, gap_days: int, *, window: int,
                          horizon: int = 1) -> None:
    """Raise AssertionError unless every later input day lies after every earlier target day
    (days t+1..t+horizon) plus the gap, and no earlier input day reaches a later target."""
    first_end = np.asarray(first_end, dtype=int)
    later_end = np.asarray(later_end, dtype=int)
    if first_end.size == 0 or later_end.size == 0:
        return
    last_target = int(first_end.max()) + horizon
    later_start = later_end - window + 1
    assert int(later_start.min()) > last_target + gap_days, "test inputs overlap training targets"
    assert int(first_end.max()) < int(later_end.min()) + 1, "training inputs reach test targets"
    first_targets = {int(t) + k for t in first_end for k in range(1, horizon + 1)}
    assert not first_targets & set(later_start.tolist()), "shared day"


def check_no_leakage(first: ExampleSet, later: ExampleSet, gap_days: int) -> None:
    """Raise AssertionError unless every later input day lies after every earlier target day
    plus the gap (so no test input is a training target and vice versa)."""
    check_no_leakage_days(first.end_idx, later.end_idx, gap_days, window=first.window)


def split_person(
    person: str, data: DailyData, config: ProtocolConfig,
    feature_fn: Callable[[DailyData], FeatureFrame] = compute_features,
) -> tuple[PersonSplit | None, str | None]:
    """The person's train/test split, or (None, reason) when they have too little data."""
    if config.target not in data.series:
        raise EvaluationError(f"no series named {config.target!r} in the data")
    target = data.series[config.target]
    if int(np.isfinite(target).sum()) < config.min_train + config.min_test:
        return None, "too few target days"
    frame = feature_fn(data)
    ex = windowed_examples(frame, target, config.window, config.history_days)
    train, test = chronological_split(ex, config.train_fraction, config.gap_days)
    if len(train) < config.min_train:
        return None, "too few training examples"
    if len(test) < config.min_test:
        return None, "too few test examples"
    check_no_leakage(train, test, config.gap_days)
    thr = float(np.median(train.y) - config.low_margin)
    return PersonSplit(person, list(data.days), train, test, thr, config.gap_days), None


def validation_splits(splits: Sequence[PersonSplit], config: ProtocolConfig) -> list[PersonSplit]:
    """The same protocol inside each person's *training* examples: fit on the first 80%,
    validate on the rest after the gap. Persons whose slice is too small are dropped."""
    out = []
    for s in splits:
        fit, val = chronological_split(s.train, 1.0 - config.validation_fraction, config.gap_days)
        if len(fit) < max(8, config.min_train // 2) or len(val) < 3:
            continue
        check_no_leakage(fit, val, config.gap_days)
        thr = float(np.median(fit.y) - config.low_margin)
        out.append(PersonSplit(s.person, s.days, fit, val, thr, s.gap_days))
    if not out:
        raise EvaluationError("no person has enough training data for a validation slice")
    return out


# ------------------------------------------------------------------------------ metrics
def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN without both classes."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average ranks of tied scores: the mean of the positions the tie occupies (1-based)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse.reshape(-1)]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_ci(values: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean, resampling persons with replacement."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    if n_boot == 0 or values.size == 1:
        m = float(values.mean())
        return (m, m)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(axis=1)
    a = (1.0 - level) / 2.0
    return (float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a)))


# ------------------------------------------------------------------------------ methods
@dataclass
class Prediction:
    """Test-period predictions for one person: the target value and a low-flag score (higher
    = more likely low; None: derived as threshold - predicted value)."""

    value: np.ndarray
    low_score: np.ndarray | None = None


class Method(Protocol):
    """A row of the results table. ``fit_predict`` may use ``split.train`` of every person
    (and nothing of ``split.test`` but its inputs ``X``/``last_value``)."""

    def fit_predict(self, splits: Sequence[PersonSplit], seed: int) -> dict[str, Prediction]: ...


@dataclass
class GlobalMean:
    description: str = "mean of all persons' training targets"

    def fit_predict(self, splits, seed):
        m = float(np.mean(np.concatenate([s.train.y for s in splits])))
        return {s.person: Prediction(np.full(len(s.test), m)) for s in splits}


@dataclass
class PersonMean:
    description: str = "the person's mean training target"

    def fit_predict(self, splits, seed):
        return {s.person: Prediction(np.full(len(s.test), s.train_mean)) for s in splits}


@dataclass
class LastValue:
    """"Same as your last answer": day t's answer, else the person mean (the coach's trust-gate
    rule, and the linear head's anchor)."""

    description: str = "tomorrow = day t's answer (else the person mean)"

    def fit_predict(self, splits, seed):
        return {s.person: Prediction(np.where(np.isfinite(s.test.today), s.test.today, s.train_mean))
                for s in splits}


@dataclass
class LastAnswerInWindow:
    description: str = "tomorrow = the most recent answer in the input window (else person mean)"

    def fit_predict(self, splits, seed):
        out = {}
        for s in splits:
            v = np.where(np.isfinite(s.test.last_value), s.test.last_value, s.train_mean)
            out[s.person] = Prediction(v)
        return out


def _standardizer(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    return mu, sd


@contextlib.contextmanager
def limited_threads(n: int = 1):
    """Run torch (and the linear algebra below, done in torch) on ``n`` threads, restoring the
    caller's setting. On a shared machine, multi-threaded BLAS on small matrices spends its
    time waiting for cores (10x slower under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ridge(X: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Weights of ridge regression on centred data (no intercept: caller centres)."""
    import torch

    with limited_threads(1):
        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))
        A = Xt.T @ Xt + alpha * torch.eye(Xt.shape[1], dtype=torch.float64)
        return torch.linalg.solve(A, Xt.T @ yt).numpy()


def _apply(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    import torch

    with limited_threads(1):
        return (torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
                @ torch.from_numpy(w)).numpy()


RIDGE_ALPHAS = (10.0, 100.0, 1000.0, 10000.0)


def round_like_answers(s: PersonSplit, value: np.ndarray) -> np.ndarray:
    """Round forecasts to whole numbers when all the person's training answers were whole
    (under absolute error the best point forecast of a whole-number answer is whole) - the
    same post-processing the recovery network applies, offered to the linear rows so the
    comparison is like for like."""
    if np.all(s.train.y == np.round(s.train.y)):
        return np.round(value)
    return value


def _person_design(s: PersonSplit, X: np.ndarray) -> np.ndarray:
    mu, sd = _standardizer(s.train.X.astype(np.float64))
    return (X.astype(np.float64) - mu) / sd


class _RidgeRows:
    """What the two ridge rows share: the penalty chosen on the validation slices, and
    predictions mapped back onto each person's own scale."""

    def _prediction(self, s: PersonSplit, w: np.ndarray) -> Prediction:
        v = s.train_mean + s.train_scale * _apply(_person_design(s, s.test.X), w)
        return Prediction(round_like_answers(s, v) if self.round_answers else v,
                          (s.low_threshold - v) / s.train_scale)

    def fit_predict(self, splits, seed):
        alpha = self.alpha
        if alpha is None:
            val = validation_or_none(splits, self.config)
            alpha = _choose(self.alphas, lambda a: self._fit_predict(val, a), val)
        self.chosen = {"alpha": alpha}
        return self._fit_predict(splits, alpha)


@dataclass
class LocalRidge(_RidgeRows):
    """Ridge on the person's own training examples only (features standardised on them)."""

    alphas: tuple[float, ...] = RIDGE_ALPHAS
    alpha: float | None = None  # None: chosen on the validation slices
    config: ProtocolConfig = field(default_factory=ProtocolConfig)
    description: str = "ridge per person, own data only"
    round_answers: bool = False

    def _fit_predict(self, splits, alpha):
        out = {}
        for s in splits:
            Xtr = _person_design(s, s.train.X)
            w = _ridge(Xtr, (s.train.y - s.train_mean) / s.train_scale, alpha)
            out[s.person] = self._prediction(s, w)
        return out


@dataclass
class CentralRidge(_RidgeRows):
    """One ridge on everyone's training examples pooled (non-private), each person's features
    and target normalised on their own training data; predictions back on their scale."""

    alphas: tuple[float, ...] = RIDGE_ALPHAS
    alpha: float | None = None
    config: ProtocolConfig = field(default_factory=ProtocolConfig)
    description: str = "one ridge on all persons' data pooled (non-private)"
    round_answers: bool = False

    def _fit_predict(self, splits, alpha):
        Xs = [_person_design(s, s.train.X) for s in splits]
        ys = [(s.train.y - s.train_mean) / s.train_scale for s in splits]
        w = _ridge(np.concatenate(Xs), np.concatenate(ys), alpha)
        return {s.person: self._prediction(s, w) for s in splits}


def _mean_mae(preds: Mapping[str, Prediction], splits: Sequence[PersonSplit]) -> float:
    return float(np.mean([np.mean(np.abs(preds[s.person].value - s.test.y)) for s in splits]))


def validation_or_none(splits, config):
    """The validation splits (:func:`validation_splits`), or None when no person has one."""
    try:
        return validation_splits(splits, config)
    except EvaluationError:
        return None


def _choose(candidates, run, val_splits):
    """The candidate with the lowest validation MAE; the first (the documented default) when
    no person has a validation slice."""
    if not val_splits:
        return candidates[0]
    scores = [(_mean_mae(run(c), val_splits), i) for i, c in enumerate(candidates)]
    return candidates[min(scores)[1]]


# ------------------------------------------------------------------------------ neural rows
@dataclass(frozen=True)
class NeuralConfig:
    """Training settings for the neural rows (models.training / models.network). Tuples are
    candidates chosen on the validation slices; the defaults were picked the same way on
    SoccerMon's validation slices (never on a test period)."""

    hidden: tuple[int, ...] = (32, 16)
    dropout: float = 0.1
    local_epochs: tuple[int, ...] = (5, 10)
    central_epochs: int = 4
    finetune_epochs: tuple[int, ...] = (0, 3)  # 0 = the central model on the person's scale
    # Weight of the model vs the person's last answer (1.0 = model only). Mixing was tried on
    # SoccerMon: validation chose 0.5, the test MAE got worse (0.779 vs 0.751): off by default.
    mix_alphas: tuple[float, ...] = (1.0,)
    lr: float = 3e-3
    finetune_lr: float = 3e-4
    batch_size: int = 32
    weight_decay: float = 1e-2
    n_seeds: int = 3  # ensemble of independently initialised models (variance, not bias)
    threads: int = 1  # torch threads while these rows train (restored afterwards)
    # The model's own post-processing (training.snap_to_answers) of the ensemble mean: clip to
    # the scale, round when the person answers in whole numbers.
    snap: bool = True

    def __post_init__(self) -> None:
        if not all(0.0 <= a <= 1.0 for a in self.mix_alphas):
            raise EvaluationError("NeuralConfig.mix_alphas must lie in [0, 1]")
        if self.n_seeds < 1 or self.central_epochs < 1 or not self.local_epochs \
                or not self.finetune_epochs or not self.mix_alphas:
            raise EvaluationError("NeuralConfig: n_seeds, central_epochs >= 1; candidate lists non-empty")


def network_config(splits, cfg: NeuralConfig, seed: int):
    """The recovery network's configuration for these splits' inputs and ``cfg``."""
    from restwise.models.network import ModelConfig

    s0 = splits[0]
    return ModelConfig(n_features=s0.train.n_features, window=s0.train.window,
                       hidden=cfg.hidden, dropout=cfg.dropout, seed=seed)


def ensemble_seeds(seed: int, n: int) -> list[int]:
    """The seeds of an ensemble of ``n`` models for the evaluation seed ``seed``."""
    return [seed * 1000 + k for k in range(n)]


def _ensemble_continuous(models: list, s: PersonSplit) -> Prediction:
    """Mean of the models' continuous forecasts and low-flag probabilities."""
    from restwise.models.training import predict

    values, lows = [], []
    for m in models:
        v, p_low = predict(m, s.test.X, snap=False)
        values.append(v)
        lows.append(p_low)
    return Prediction(np.mean(values, axis=0), np.mean(lows, axis=0))


def _snapped(model, pred: Prediction, snap: bool) -> Prediction:
    """The model's own post-processing of a (mean) forecast: clip to the scale and, when the
    person answers in whole numbers, round (the median of a whole-number answer is whole)."""
    if not snap:
        return pred
    from restwise.models.training import snap_to_answers

    return Prediction(snap_to_answers(model, pred.value), pred.low_score)


def _ensemble_predict(models: list, s: PersonSplit, snap: bool) -> Prediction:
    return _snapped(models[0], _ensemble_continuous(models, s), snap)


@dataclass
class LocalNeural:
    """The recovery network trained on the person's own training examples only (epochs chosen
    on the validation slices, ensemble of ``n_seeds``)."""

    cfg: NeuralConfig = field(default_factory=NeuralConfig)
    config: ProtocolConfig = field(default_factory=ProtocolConfig)
    description: str = "recovery network per person, own data only"

    def _fit_predict(self, splits, epochs, seed):
        from restwise.models.network import build_model
        from restwise.models.training import train_local

        out = {}
        for s in splits:
            models = []
            for sd in ensemble_seeds(seed, self.cfg.n_seeds):
                model = build_model(network_config(splits, self.cfg, sd))
                train_local(model, s.train.to_examples(s.days), epochs=epochs, lr=self.cfg.lr,
                            batch_size=self.cfg.batch_size, seed=sd, low_threshold=s.low_threshold,
                            weight_decay=self.cfg.weight_decay)
                models.append(model)
            out[s.person] = _ensemble_predict(models, s, self.cfg.snap)
        return out

    def fit_predict(self, splits, seed):
        with limited_threads(self.cfg.threads):
            return self._fit_predict_all(splits, seed)

    def _fit_predict_all(self, splits, seed):
        candidates = tuple(self.cfg.local_epochs)
        epochs = candidates[0]
        if len(candidates) > 1:
            val = validation_or_none(splits, self.config)
            epochs = _choose(candidates, lambda e: self._fit_predict(val, e, seed), val)
        self.chosen = {"epochs": epochs}
        return self._fit_predict(splits, epochs, seed)


def train_pooled(model, splits: Sequence[PersonSplit], *, epochs: int, lr: float, batch_size: int,
                 seed: int, weight_decay: float, huber_delta: float = 1.0) -> float:
    """Train the *shared* part on all persons' training examples pooled, each person's target
    z-scored on their own training targets and low-flagged at their own threshold (the
    personal part stays the identity), with ``training.fit_normalized`` (the loop
    ``train_local`` runs). Returns the last epoch's mean loss."""
    from restwise.models.training import fit_normalized

    X = np.concatenate([s.train.X for s in splits])
    yz = np.concatenate([(s.train.y - s.train_mean) / s.train_scale for s in splits])
    low = np.concatenate([(s.train.y <= s.low_threshold).astype(np.float32) for s in splits])
    return fit_normalized(model, X, yz, low, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                          weight_decay=weight_decay, huber_delta=huber_delta,
                          train_shared=True, train_personal=False)


def _with_person_scale(model, s: PersonSplit):
    from restwise.models.training import fit_target_scaler

    m = copy.deepcopy(model)
    fit_target_scaler(m, s.train.y, s.low_threshold)
    return m


def central_models(splits: Sequence[PersonSplit], cfg: NeuralConfig, seed: int) -> list:
    """``cfg.n_seeds`` recovery networks whose shared part is trained on the pooled data."""
    from restwise.models.network import build_model

    models = []
    for sd in ensemble_seeds(seed, cfg.n_seeds):
        model = build_model(network_config(splits, cfg, sd))
        train_pooled(model, splits, epochs=cfg.central_epochs, lr=cfg.lr,
                     batch_size=cfg.batch_size, seed=sd, weight_decay=cfg.weight_decay)
        models.append(model)
    return models


class CentralModelCache:
    """Central models by (persons' training data, config, seed): the centralised row and the
    personalised row start from the very same shared part, trained once."""

    def __init__(self) -> None:
        self._models: dict = {}

    def get(self, splits: Sequence[PersonSplit], cfg: NeuralConfig, seed: int) -> list:
        key = (tuple((s.person, len(s.train), int(s.train.end_idx[-1])) for s in splits), cfg, seed)
        if key not in self._models:
            self._models[key] = central_models(splits, cfg, seed)
        return self._models[key]


@dataclass
class CentralNeural:
    """The recovery network's shared part trained on everyone's data pooled (non-private);
    each person's scale (mean, SD, threshold from their training days) maps its output back."""

    cfg: NeuralConfig = field(default_factory=NeuralConfig)
    description: str = "recovery network on all persons' data pooled (non-private)"
    cache: CentralModelCache = field(default_factory=CentralModelCache, repr=False)

    def fit_predict(self, splits, seed):
        with limited_threads(self.cfg.threads):
            return self._fit_predict_all(splits, seed)

    def _fit_predict_all(self, splits, seed):
        models = self.cache.get(splits, self.cfg, seed)
        return {s.person: _ensemble_predict([_with_person_scale(m, s) for m in models], s, self.cfg.snap)
                for s in splits}


def personal_finetune(base, s: PersonSplit, cfg: NeuralConfig, epochs: int, seed: int):
    """A copy of ``base`` on the person's scale, its personal part fine-tuned on their own
    training days (what a device does after receiving the shared part)."""
    from restwise.models.training import train_local

    m = _with_person_scale(base, s)
    if epochs > 0:
        train_local(m, s.train.to_examples(s.days), epochs=epochs, lr=cfg.finetune_lr,
                    batch_size=cfg.batch_size, seed=seed, train_shared=False, train_personal=True,
                    low_threshold=s.low_threshold, weight_decay=cfg.weight_decay, fit_scaler=False)
    return m


@dataclass
class Personalised:
    """Shared part trained centrally, then on each device the personal part (gain, bias,
    personal head) fine-tuned on the person's own training days. Optionally (``mix_alphas``,
    off by default) the prediction is mixed with the person's own most recent answer,
    ``alpha x model + (1 - alpha) x last answer``, as in APFL's mixture of a shared and a
    personal predictor (Deng et al. 2020). Fine-tuning epochs (and ``alpha``) are chosen on
    the validation slices; ties prefer no fine-tuning and no mixing."""

    cfg: NeuralConfig = field(default_factory=NeuralConfig)
    config: ProtocolConfig = field(default_factory=ProtocolConfig)
    description: str = "shared part trained centrally + personal fine-tune on the device"
    cache: CentralModelCache = field(default_factory=CentralModelCache, repr=False)

    def finetune_predict(self, bases, splits, epochs, seed, alphas):
        """{alpha: {person: Prediction}}: fine-tune once, mix continuous forecasts, snap."""
        out: dict = {a: {} for a in alphas}
        for s in splits:
            models = [personal_finetune(b, s, self.cfg, epochs, seed) for b in bases]
            cont = _ensemble_continuous(models, s)
            for a in alphas:
                mixed = self._mix({s.person: cont}, [s], a)[s.person]
                out[a][s.person] = _snapped(models[0], mixed, self.cfg.snap)
        return out

    @staticmethod
    def _mix(preds, splits, alpha):
        out = {}
        for s in splits:
            p = preds[s.person]
            last = np.where(np.isfinite(s.test.last_value), s.test.last_value, p.value)
            out[s.person] = Prediction(alpha * p.value + (1.0 - alpha) * last, p.low_score)
        return out

    def fit_predict(self, splits, seed):
        with limited_threads(self.cfg.threads):
            return self._fit_predict_all(splits, seed)

    def _fit_predict_all(self, splits, seed):
        epochs_grid = tuple(self.cfg.finetune_epochs)
        alpha_grid = tuple(self.cfg.mix_alphas)
        epochs, alpha = epochs_grid[0], alpha_grid[0]
        val = validation_or_none(splits, self.config) if len(epochs_grid) * len(alpha_grid) > 1 else None
        if val:
            bases_val = self.cache.get(val, self.cfg, seed)
            scores = []
            for i, e in enumerate(epochs_grid):
                by_alpha = self.finetune_predict(bases_val, val, e, seed, alpha_grid)
                for j, a in enumerate(alpha_grid):
                    scores.append((_mean_mae(by_alpha[a], val), i, j))
            _, i, j = min(scores)
            epochs, alpha = epochs_grid[i], alpha_grid[j]
        self.chosen = {"finetune_epochs": epochs, "alpha": alpha}
        bases = self.cache.get(splits, self.cfg, seed)
        return self.finetune_predict(bases, splits, epochs, seed, (alpha,))[alpha]


BASELINE_ROWS = ("global mean", "person mean", "last value", "last answer in window", "local ridge",
                 "central ridge", "central ridge, rounded", "local neural", "central neural")


def default_methods(config: ProtocolConfig | None = None,
                    neural: NeuralConfig | None = None) -> dict[str, Method]:
    """The table's rows, in order: baselines, then our personalised model."""
    config = config or ProtocolConfig()
    neural = neural or NeuralConfig()
    cache = CentralModelCache()
    return {
        "global mean": GlobalMean(),
        "person mean": PersonMean(),
        "last value": LastValue(),
        "last answer in window": LastAnswerInWindow(),
        "local ridge": LocalRidge(config=config),
        "central ridge": CentralRidge(config=config),
        "central ridge, rounded": CentralRidge(
            config=config, round_answers=True,
            description="central ridge, forecasts rounded like the network's (whole-number answers)"),
        "local neural": LocalNeural(neural, config),
        "central neural": CentralNeural(neural, cache=cache),
        "personalised": Personalised(neural, config, cache=cache),
    }


# ------------------------------------------------------------------------------ results
@dataclass
class MethodResult:
    name: str
    description: str
    mae: float
    mae_ci: tuple[float, float]
    auroc: float  # mean over persons with both classes in their test period
    auroc_pooled: float
    n_persons_auroc: int
    seconds: float
    chosen: dict = field(default_factory=dict)
    per_person_mae: dict[str, float] = field(default_factory=dict)
    # Privacy: the epsilon of everything the row released (selection included); 0 for rows
    # fitted on public data only, None for rows that are not differentially private.
    epsilon: float | None = None
    # Per-person MAE minus the "last value" row's: {"mean", "ci"} (bootstrap over persons),
    # and how many persons the row predicts better / worse than "last value".
    paired_vs_last_value: dict | None = None
    persons_better: int | None = None
    persons_worse: int | None = None


@dataclass
class EvaluationResult:
    protocol: dict
    dataset: str
    persons: list[dict]  # person, n_train, n_test
    excluded: dict[str, str]  # person -> reason
    methods: list[MethodResult]
    # The table's privacy spend, filled by whoever can account it (restwise evaluate):
    # {"delta", "statement", ...}; stated in results.md.
    privacy: dict | None = None

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    def best_baseline(self) -> MethodResult | None:
        rows = [m for m in self.methods if m.name in BASELINE_ROWS]
        return min(rows, key=lambda m: m.mae) if rows else None

    def to_dict(self) -> dict:
        best = self.best_baseline()
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "n_persons": len(self.persons),
            "persons": self.persons,
            "excluded": self.excluded,
            "best_baseline": None if best is None else best.name,
            "privacy": self.privacy,
            "methods": [
                {**asdict(m), "mae_ci": list(m.mae_ci),
                 "vs_best_baseline": None if best is None else (best.mae - m.mae) / best.mae}
                for m in self.methods
            ],
        }

    def to_json(self) -> str:
        def clean(o):
            if isinstance(o, float) and not math.isfinite(o):
                return None
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items()}
            if isinstance(o, (list, tuple)):
                return [clean(v) for v in o]
            return o

        return json.dumps(clean(self.to_dict()), indent=2, sort_keys=False)

    def to_markdown(self) -> str:
        best = self.best_baseline()
        n_test = sum(p["n_test"] for p in self.persons)
        lines = [
            f"**{self.dataset}**: {len(self.persons)} persons, {n_test} test days "
            f"(target `{self.protocol['target']}` of day t+1 from days t-{self.protocol['window'] - 1}..t).",
            "",
            "| method | ε | MAE | 95% CI (persons) | vs last value: ΔMAE [95% CI] | better / worse | "
            "vs best baseline | AUROC low flag | AUROC pooled |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in self.methods:
            rel = "" if best is None else f"{100 * (best.mae - m.mae) / best.mae:+.1f}%"
            eps = "–" if m.epsilon is None else f"{m.epsilon:.2f}"
            paired = better = ""
            if m.paired_vs_last_value is not None:
                pv = m.paired_vs_last_value
                paired = f"{pv['mean']:+.3f} [{pv['ci'][0]:+.3f}, {pv['ci'][1]:+.3f}]"
                better = f"{m.persons_better} / {m.persons_worse}"
            lines.append(
                f"| {m.name} | {eps} | {m.mae:.3f} | {m.mae_ci[0]:.3f}–{m.mae_ci[1]:.3f} | {paired} | "
                f"{better} | {rel} | {_fmt(m.auroc)} | {_fmt(m.auroc_pooled)} |"
            )
        lines += ["", "ε: differential privacy spent by the row at δ = 1e-5, every release (selection "
                      "included) counted; 0 = public data only; – = not private. \"vs last value\": "
                      "mean per-person MAE difference to the last value row with its 95% bootstrap "
                      "interval over persons (negative = better), and the persons it predicts "
                      "better / worse."]
        if best is not None:
            lines += ["", f"Best baseline: {best.name}. \"vs best baseline\": MAE reduction "
                          "(positive = better)."]
        if self.privacy and self.privacy.get("statement"):
            lines += ["", self.privacy["statement"]]
        return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.3f}"


def blinded(splits: Sequence[PersonSplit]) -> list[PersonSplit]:
    """Copies of the splits whose test targets are NaN: what a method is given, so no row can
    peek at the answers it is scored on."""
    out = []
    for s in splits:
        t = s.test
        hidden = ExampleSet(t.X, np.full_like(t.y, np.nan), t.end_idx, t.window, t.n_features,
                            t.last_value, t.history)
        out.append(PersonSplit(s.person, s.days, s.train, hidden, s.low_threshold, s.gap_days))
    return out


def score_method(name: str, description: str, preds: Mapping[str, Prediction],
                 splits: Sequence[PersonSplit], config: ProtocolConfig, seconds: float,
                 chosen: dict | None = None) -> MethodResult:
    maes, aucs, all_lab, all_score = {}, [], [], []
    for s in splits:
        p = preds.get(s.person)
        if p is None:
            raise EvaluationError(f"method {name!r} gave no prediction for a person")
        value = np.asarray(p.value, dtype=np.float64)
        if value.shape != s.test.y.shape or not np.all(np.isfinite(value)):
            raise EvaluationError(f"method {name!r}: predictions have the wrong shape or NaN")
        maes[s.person] = float(np.mean(np.abs(value - s.test.y)))
        score = s.low_threshold - value if p.low_score is None else np.asarray(p.low_score, float)
        labels = s.test.y <= s.low_threshold
        a = auroc(labels, score)
        if math.isfinite(a):
            aucs.append(a)
        all_lab.append(labels)
        # Pooled AUROC compares scores across persons: use each person's rank within the
        # person (a probability for our models, the margin below threshold for regressors).
        all_score.append(score if p.low_score is not None else score / s.train_scale)
    per = np.array(list(maes.values()))
    return MethodResult(
        name=name, description=description, mae=float(per.mean()),
        mae_ci=bootstrap_ci(per, config.bootstrap, config.seed),
        auroc=float(np.mean(aucs)) if aucs else float("nan"),
        auroc_pooled=auroc(np.concatenate(all_lab), np.concatenate(all_score)),
        n_persons_auroc=len(aucs), seconds=seconds, chosen=dict(chosen or {}),
        per_person_mae=maes,
    )


def row_epsilon(method) -> float | None:
    """The row's privacy spend: ``method.epsilon_total`` (every release, selection included)
    when the method states it, else ``method.epsilon``; None for rows that are not private."""
    eps = getattr(method, "epsilon_total", getattr(method, "epsilon", None))
    return None if eps is None else float(eps)


def add_paired_comparison(results: Sequence[MethodResult], config: ProtocolConfig,
                          reference: str = "last value") -> None:
    """Fill each row's ``paired_vs_last_value`` and persons better/worse (per-person MAE
    differences to the reference row, bootstrap over persons with the protocol's seed)."""
    ref = next((m for m in results if m.name == reference), None)
    if ref is None:
        return
    for m in results:
        persons = [p for p in ref.per_person_mae if p in m.per_person_mae]
        diff = np.array([m.per_person_mae[p] - ref.per_person_mae[p] for p in persons])
        lo, hi = bootstrap_ci(diff, config.bootstrap, config.seed)
        m.paired_vs_last_value = {"mean": float(diff.mean()) if diff.size else float("nan"),
                                  "ci": [lo, hi], "persons": len(persons)}
        m.persons_better = int(np.sum(diff < -1e-12))
        m.persons_worse = int(np.sum(diff > 1e-12))


def evaluate(
    cohort: Mapping[str, DailyData] | Sequence[PersonSplit],
    methods: Mapping[str, Method] | None = None,
    *,
    config: ProtocolConfig | None = None,
    dataset: str = "cohort",
    seed: int | None = None,
    feature_fn: Callable[[DailyData], FeatureFrame] = compute_features,
    on_method: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Run every method on the cohort under the protocol and score it.

    ``cohort``: person -> their days (or ready-made splits). ``methods``: row name -> method
    (default: :func:`default_methods`). ``seed`` overrides ``config.seed``.
    """
    config = config or ProtocolConfig()
    if seed is not None:
        config = ProtocolConfig(**{**asdict(config), "seed": int(seed)})
    methods = dict(methods) if methods is not None else default_methods(config)
    excluded: dict[str, str] = {}
    if isinstance(cohort, Mapping):
        splits = []
        for person, data in cohort.items():
            split, why = split_person(person, data, config, feature_fn)
            if split is None:
                excluded[person] = why or "excluded"
            else:
                splits.append(split)
    else:
        splits = list(cohort)
    if len(splits) < 2:
        raise EvaluationError(
            f"only {len(splits)} person(s) have enough data for the protocol (need >= 2)"
        )
    results = []
    blind = blinded(splits)
    for name, method in methods.items():
        if on_method is not None:
            on_method(name)
        t0 = time.perf_counter()
        preds = method.fit_predict(blind, config.seed)
        seconds = time.perf_counter() - t0
        row = score_method(name, getattr(method, "description", name), preds, splits, config, seconds,
                           getattr(method, "chosen", None))
        row.epsilon = row_epsilon(method)
        results.append(row)
    add_paired_comparison(results, config)
    return EvaluationResult(
        protocol=asdict(config), dataset=dataset,
        persons=[{"person": s.person, "n_train": len(s.train), "n_test": len(s.test)} for s in splits],
        excluded=excluded, methods=results,
    )


def plot_results(result: EvaluationResult, path) -> None:
    """MAE per method with its bootstrap interval (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in result.methods]
    mae = np.array([m.mae for m in result.methods])
    lo = np.array([m.mae_ci[0] for m in result.methods])
    hi = np.array([m.mae_ci[1] for m in result.methods])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2), dpi=110)
    y = np.arange(len(names))[::-1]
    colors = ["#888888" if n in BASELINE_ROWS else "#2b7bba" for n in names]
    ax.barh(y, mae, color=colors, alpha=0.85)
    ax.errorbar(mae, y, xerr=[mae - lo, hi - mae], fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_yticks(y, names)
    ax.set_xlabel(f"MAE of next-day {result.protocol['target']} (mean over persons, 95% CI)")
    ax.set_title(f"{result.dataset}: {len(result.persons)} persons")
    ax.set_xlim(0, max(hi.max() if np.isfinite(hi).all() else mae.max(), mae.max()) * 1.1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = [
    "ProtocolConfig", "NeuralConfig", "ExampleSet", "PersonSplit", "Prediction", "Method",
    "EvaluationResult", "MethodResult", "EvaluationError", "evaluate", "default_methods",
    "split_person", "chronological_split", "check_no_leakage", "validation_splits",
    "chronological_positions", "check_no_leakage_days",
    "windowed_examples", "blinded", "round_like_answers", "auroc", "bootstrap_ci", "score_method", "plot_results",
    "row_epsilon", "add_paired_comparison", "LastAnswerInWindow",
    "train_pooled", "central_models", "CentralModelCache", "personal_finetune", "GlobalMean", "PersonMean", "LastValue", "LocalRidge", "CentralRidge",
    "LocalNeural", "CentralNeural", "Personalised", "BASELINE_ROWS", "validation_or_none",
    "network_config", "ensemble_seeds",
]
