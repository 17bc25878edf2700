"""The linear head: a small shared model anchored on the person's last answer.

It predicts tomorrow's answer **minus the last answer**, in the person's own scale units, from
32 bounded features. Zero weights mean "same as your last answer" (the coach's trust-gate
rule), so noise and shrinkage degrade it toward that baseline, never below it. It is built for
one differentially private release of sufficient statistics (see *Release* below); a public
prior (:mod:`restwise.models.prior`) supplies what the release cannot. Pure numpy; imports
nothing from Restwise outside ``models``.

Feature spec (``FEATURE_SPEC_VERSION`` 1; :func:`feature_spec` and its sha256 pin it)
-----------------------------------------------------------------------------------------
For the example whose last input day is t (predicting day t+1), with the person's mean mu and
scale s (their own answers; kept on the device, :class:`PersonalScale`):

* the answer (the target series, e.g. readiness), in the person's units ``(answer - mu) / s``:
  ``answer_today`` (day t, 0 if unanswered), ``answered_today`` (1/0), ``answer_7d`` (mean of
  days t-6..t), ``answer_earlier`` (the most recent answer of days t-6..t-1 when day t is
  unanswered, else 0) and ``answer_weekday_profile`` (mean of the answers on the target's
  weekday in the last 8 weeks, days t+1-7k for k = 1..8, at least 2 of them; team training is
  periodised around the week);
* today and the 7-day mean of the check-in series readiness, fatigue, soreness, stress, mood,
  sleep quality, and of sleep minutes, training load (sRPE), ln RMSSD and resting heart rate:
  the person's own causal z-scores of :mod:`restwise.models.features` (expanding mean/SD over
  days <= t), 0 where unknown ("your normal"), the 7-day mean over the known days only;
* the weekday of the target day, one-hot (7).

Bounds: each feature is clipped to [-3, 3] (out-of-range values are clipped, never dropped),
divided by 4, and each row is scaled down to L2 norm 1 if longer (so ``||x|| <= 1``; about a
fifth of SoccerMon's rows are). The target is ``delta = (y_{t+1} - anchor) / s`` clipped to
[-2, 2], where ``anchor`` is day t's answer, else the person mean (the ``last value`` rule).
Every feature that is not defined is 0, and NaN or inf anywhere in the inputs is refused
(:class:`LinearHeadError`) before anything is computed, let alone shared. The constants were
chosen on public data only: SoccerMon's training periods, cross-fitted by persons.

Prediction (on the device): ``value = anchor + s * clip(w . x, -2, 2)``, snapped to the
person's answer step (whole numbers for whole-number answers: under absolute error the best
forecast of a whole number is whole) and clipped to the range of their own answers.

Release: sufficient statistics and their L2 sensitivity
-------------------------------------------------------
A device with m >= ``MIN_EXAMPLES`` training examples computes ``A = X'X / m`` (d x d) and
``b = X'delta / m`` (d) over its own days and sends the vector

    v = ( A_11, sqrt2 A_12, ..., sqrt2 A_1d, A_22, sqrt2 A_23, ..., A_dd,  b_1 / B, ..., b_d / B )

i.e. the **upper triangle** of A (row-major, off-diagonal entries times sqrt 2) followed by
b / B, B = 2 the target bound: ``d (d + 1) / 2 + d`` = 560 numbers for d = 32.

Sensitivity. For one row, ``||x x'||_F = ||x||^2 <= 1`` and ``||x delta / B|| <= ||x|| <= 1``;
A and b are means of such terms, so by the triangle inequality ``||A||_F <= 1`` and
``||b / B|| <= 1`` whatever m is. The sqrt 2 weighting makes the triangle's Euclidean norm
equal ``||A||_F`` (each off-diagonal entry stands for two equal entries of the full matrix).
Hence ``||v|| = sqrt(||A||_F^2 + ||b/B||^2) <= sqrt 2``: adding or removing one person (one
device) moves the sum by at most **Delta = sqrt 2** in L2 (replace-one: 2 sqrt 2; the
accountant doubles it itself). Sending the full d x d matrix would have the same bound
(``||A||_F <= 1``) with 1,024 + 32 numbers, and averaging its two noisy copies of each
off-diagonal entry gives exactly the noise of the sqrt 2-weighted triangle: the triangle sends
half the numbers for the same noise. A plain triangle (no sqrt 2) would not lower the
worst-case bound (``sum_{i<=j} (x_i x_j)^2 = (||x||^4 + sum x_i^4) / 2`` reaches ``||x||^4``
when x lies on an axis) but would leave twice the noise variance on the off-diagonal entries.
The device checks ``||v|| <= Delta`` before sending (it holds by construction).

Server: from the noisy sum it unpacks A_hat (projected onto the positive semidefinite cone:
negative eigenvalues are noise and set to 0) and b_hat, and solves a ridge system shrunk
toward the public prior w0, whose strength follows from the known noise scale
(:func:`solve_with_prior`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from restwise.common.errors import ModelError
from restwise.models.features import model_feature_names

ARCHITECTURE_NAME = "linear-head"
FEATURE_SPEC_VERSION = 1
WINDOW = 7  # days t-6..t of model features
HISTORY_DAYS = 56  # days t-55..t of the person's own answers (the weekday profile)
PROFILE_WEEKS = 8
PROFILE_MIN = 2
FEATURE_CLIP = 3.0  # each feature to [-3, 3] ...
FEATURE_SCALE = 4.0  # ... divided by 4, then rows to L2 norm <= 1
TARGET_BOUND = 2.0  # delta in the person's scale units, clipped to [-B, B]
MIN_EXAMPLES = 14  # fewer training examples: the device sends nothing
MIN_SCALE = 0.5  # the person's scale is at least this (as the evaluation's train_scale)
SENSITIVITY = math.sqrt(2.0)  # L2 bound of one device's statistics vector (add/remove)

CHECKIN_SERIES = ("readiness", "fatigue", "soreness", "stress", "mood", "sleep_quality")
DEVICE_SERIES = ("sleep_minutes", "load", "ln_rmssd", "resting_hr")
ANSWER_FEATURES = ("answer_today", "answered_today", "answer_7d", "answer_earlier",
                   "answer_weekday_profile")


def _feature_names() -> tuple[str, ...]:
    names = list(ANSWER_FEATURES)
    for series in CHECKIN_SERIES + DEVICE_SERIES:
        names += [f"{series}_today", f"{series}_7d"]
    names += [f"target_weekday_{i}" for i in range(7)]
    return tuple(names)


FEATURE_NAMES: tuple[str, ...] = _feature_names()
N_FEATURES = len(FEATURE_NAMES)  # 32: the shared numbers of the model (<= 64)
STATISTICS_LENGTH = N_FEATURES * (N_FEATURES + 1) // 2 + N_FEATURES  # 560 (statistics_length)


class LinearHeadError(ModelError):
    """Input to the linear head is unusable (NaN/inf, wrong shape, a bad model file...)."""


class NotEnoughDataError(LinearHeadError):
    """The device has fewer than ``MIN_EXAMPLES`` examples: it sends nothing and is counted as
    not taking part."""


def feature_spec() -> dict:
    """Everything that fixes what a feature row means. A prior or model fitted under another
    spec is refused (compare :func:`feature_spec_sha256`)."""
    return {
        "architecture": ARCHITECTURE_NAME,
        "version": FEATURE_SPEC_VERSION,
        "names": list(FEATURE_NAMES),
        "window": WINDOW,
        "history_days": HISTORY_DAYS,
        "profile_weeks": PROFILE_WEEKS,
        "profile_min": PROFILE_MIN,
        "feature_clip": FEATURE_CLIP,
        "feature_scale": FEATURE_SCALE,
        "target_bound": TARGET_BOUND,
        "min_scale": MIN_SCALE,
        "base_features": model_feature_names(),  # restwise.models.features, in this order
        "statistics": "upper triangle of A (off-diagonal x sqrt2), then b / target_bound",
        "sensitivity": SENSITIVITY,
    }


def feature_spec_sha256() -> str:
    return hashlib.sha256(json.dumps(feature_spec(), sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


# ------------------------------------------------------------------------------ personal part
@dataclass(frozen=True)
class PersonalScale:
    """What stays on the device: the person's mean and scale of their answers, their answer
    step (0 = not snapped), the range of their answers and their low threshold."""

    mean: float
    scale: float
    step: float
    low_threshold: float
    lo: float
    hi: float

    def __post_init__(self) -> None:
        for name in ("mean", "scale", "step", "low_threshold", "lo", "hi"):
            if not math.isfinite(float(getattr(self, name))):
                raise LinearHeadError(f"PersonalScale.{name} must be finite")
        if self.scale <= 0 or self.step < 0 or self.lo > self.hi:
            raise LinearHeadError("PersonalScale needs scale > 0, step >= 0 and lo <= hi")

    @classmethod
    def fit(cls, answers: np.ndarray, *, low_margin: float = 1.0,
            low_threshold: float | None = None) -> "PersonalScale":
        """From the person's own answers (their training targets): mean, SD (at least
        ``MIN_SCALE``), the coarsest step their answers all sit on (1, 0.5, 0.25, 0.1, else 0),
        range, and low threshold = median - ``low_margin`` (unless given)."""
        y = np.asarray(answers, dtype=np.float64).reshape(-1)
        if y.size == 0:
            raise NotEnoughDataError("no answers to fit the person's scale on")
        if not np.all(np.isfinite(y)):
            raise LinearHeadError("the person's answers contain NaN or inf")
        step = 0.0
        for cand in (1.0, 0.5, 0.25, 0.1):
            if np.allclose(y / cand, np.round(y / cand), atol=1e-9):
                step = cand
                break
        thr = float(np.median(y) - low_margin) if low_threshold is None else float(low_threshold)
        return cls(float(y.mean()), max(float(y.std()), MIN_SCALE), step, thr,
                   float(y.min()), float(y.max()))

    def to_dict(self) -> dict:
        return {k: float(getattr(self, k)) for k in ("mean", "scale", "step", "low_threshold", "lo", "hi")}


# ------------------------------------------------------------------------------ features
@dataclass
class HeadInputs:
    """Feature rows (bounded, ``||x|| <= 1``) and each row's anchor (the last answer)."""

    x: np.ndarray  # [n, N_FEATURES]
    anchor: np.ndarray  # [n]: day t's answer, else the person mean
    clipped: int  # how many feature values were clipped into range (never dropped)


_BASE = {name: i for i, name in enumerate(model_feature_names())}
_BASE_N = len(_BASE)


def _window_mean(X: np.ndarray, z_col: int, has_col: int) -> np.ndarray:
    z = X[:, z_col::_BASE_N][:, :WINDOW]
    has = X[:, has_col::_BASE_N][:, :WINDOW]
    n = has.sum(axis=1)
    return np.where(n > 0, (z * has).sum(axis=1) / np.maximum(n, 1.0), 0.0)


def head_inputs(window_features: np.ndarray, history: np.ndarray, personal: PersonalScale) -> HeadInputs:
    """Feature rows from the model-feature windows of days t-6..t (``[n, 7 * 72]``, as
    :func:`restwise.models.features.make_examples` / the evaluation build them) and the
    person's own answers of days t-55..t (``[n, 56]``, NaN = not answered)."""
    X = np.asarray(window_features, dtype=np.float64)
    H = np.asarray(history, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != WINDOW * _BASE_N:
        raise LinearHeadError(f"feature windows must be [n, {WINDOW * _BASE_N}] "
                              f"({WINDOW} days x {_BASE_N} model features)")
    if H.ndim != 2 or H.shape != (X.shape[0], HISTORY_DAYS):
        raise LinearHeadError(f"answer history must be [n, {HISTORY_DAYS}] (one row per example)")
    if not np.all(np.isfinite(X)):
        raise LinearHeadError("the feature windows contain NaN or inf")
    if np.any(np.isinf(H)):
        raise LinearHeadError("the answer history contains inf")
    mu, s = personal.mean, personal.scale
    n = X.shape[0]
    cols: list[np.ndarray] = []

    def units(v: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(v), (v - mu) / s, 0.0)

    today = H[:, -1]
    answered = np.isfinite(today)
    recent = H[:, -WINDOW:]
    counts = np.isfinite(recent).sum(axis=1)
    mean7 = np.where(counts > 0, np.nansum(recent, axis=1) / np.maximum(counts, 1), np.nan)
    earlier = np.full(n, np.nan)
    for k in range(WINDOW - 1):
        col = recent[:, k]
        earlier = np.where(np.isfinite(col), col, earlier)
    # Answers on the target's weekday: day t+1-7k is history column HISTORY_DAYS - 7k.
    prof_idx = [HISTORY_DAYS - 7 * k for k in range(1, PROFILE_WEEKS + 1)]
    prof = H[:, prof_idx]
    prof_n = np.isfinite(prof).sum(axis=1)
    prof_mean = np.where(prof_n >= PROFILE_MIN, np.nansum(prof, axis=1) / np.maximum(prof_n, 1), np.nan)
    cols += [units(today), answered.astype(np.float64), units(mean7),
             np.where(answered, 0.0, units(earlier)), units(prof_mean)]
    last = (WINDOW - 1) * _BASE_N
    for series in CHECKIN_SERIES + DEVICE_SERIES:
        z, has = _BASE[f"z_{series}"], _BASE[f"has_{series}"]
        cols.append(X[:, last + z] * X[:, last + has])
        cols.append(_window_mean(X, z, has))
    weekday_t = np.argmax(X[:, last + _BASE["weekday_0"] : last + _BASE["weekday_0"] + 7], axis=1)
    target_weekday = (weekday_t + 1) % 7
    for i in range(7):
        cols.append((target_weekday == i).astype(np.float64))
    x, clipped = bound_rows(np.stack(cols, axis=1) if n else np.zeros((0, N_FEATURES)))
    anchor = np.where(answered, today, mu)
    return HeadInputs(x, anchor, clipped)


def bound_rows(raw: np.ndarray) -> tuple[np.ndarray, int]:
    """The bounds of a shared feature row: each feature clipped to [-FEATURE_CLIP, FEATURE_CLIP]
    (clipped, never dropped), divided by FEATURE_SCALE, each row scaled down to L2 norm <= 1.
    Returns the rows and how many values were clipped. (Also the early-warning model's.)"""
    raw = np.asarray(raw, dtype=np.float64)
    clipped = int(np.sum(np.abs(raw) > FEATURE_CLIP))
    x = np.clip(raw, -FEATURE_CLIP, FEATURE_CLIP) / FEATURE_SCALE
    norms = np.linalg.norm(x, axis=1, keepdims=True) if x.shape[0] else np.zeros((0, 1))
    return x / np.maximum(1.0, norms), clipped


def target_delta(y: np.ndarray, anchor: np.ndarray, personal: PersonalScale) -> np.ndarray:
    """The training target: (answer of day t+1 - anchor) / scale, clipped to [-B, B]."""
    y = np.asarray(y, dtype=np.float64)
    if not np.all(np.isfinite(y)):
        raise LinearHeadError("targets contain NaN or inf")
    return np.clip((y - np.asarray(anchor, dtype=np.float64)) / personal.scale, -TARGET_BOUND, TARGET_BOUND)


# ------------------------------------------------------------------------------ statistics
# The functions below serve any bounded linear model released once (the linear head, the
# early-warning model): the number of features comes from the arrays, the target bound B and
# the minimum number of examples are parameters (defaults: the linear head's).
def statistics_length(n_features: int) -> int:
    """Numbers in one device's vector: the upper triangle of A and b."""
    return n_features * (n_features + 1) // 2 + n_features


def _triangle(n_features: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    tri = np.triu_indices(n_features)
    return tri, np.where(tri[0] == tri[1], 1.0, math.sqrt(2.0))


def moments(x: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) = (X'X / m, X'delta / m) of one person: their per-example means."""
    x = np.asarray(x, dtype=np.float64)
    delta = np.asarray(delta, dtype=np.float64)
    m = x.shape[0]
    if m == 0:
        raise NotEnoughDataError("no examples")
    return x.T @ x / m, x.T @ delta / m


def pack_statistics(A: np.ndarray, b: np.ndarray, target_bound: float = TARGET_BOUND) -> np.ndarray:
    """The shared vector: upper triangle of A (off-diagonal x sqrt 2), then b / B."""
    b = np.asarray(b, dtype=np.float64)
    tri, weight = _triangle(b.shape[0])
    return np.concatenate([np.asarray(A, dtype=np.float64)[tri] * weight, b / target_bound])


def unpack_statistics(vector: np.ndarray, n_features: int = N_FEATURES,
                      target_bound: float = TARGET_BOUND) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) back from a (summed, possibly noisy) statistics vector; A symmetric."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    length = statistics_length(n_features)
    if v.shape[0] != length:
        raise LinearHeadError(f"a statistics vector has {length} numbers, got {v.shape[0]}")
    if not np.all(np.isfinite(v)):
        raise LinearHeadError("the statistics vector contains NaN or inf")
    tri, weight = _triangle(n_features)
    ntri = tri[0].size
    A = np.zeros((n_features, n_features))
    A[tri] = v[:ntri] / weight
    A = A + A.T - np.diag(np.diag(A))
    return A, v[ntri:] * target_bound


def device_statistics(x: np.ndarray, delta: np.ndarray, *, n_features: int = N_FEATURES,
                      target_bound: float = TARGET_BOUND, min_examples: int = MIN_EXAMPLES) -> np.ndarray:
    """What one device shares: its packed (A, b), L2 norm <= ``SENSITIVITY`` (checked).

    Raises NotEnoughDataError below ``min_examples`` examples (the device takes no part) and
    LinearHeadError on NaN/inf or out-of-bound inputs (nothing is shared)."""
    x = np.asarray(x, dtype=np.float64)
    delta = np.asarray(delta, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != n_features or delta.shape != (x.shape[0],):
        raise LinearHeadError(f"statistics need x [m, {n_features}] and delta [m]")
    if x.shape[0] < min_examples:
        raise NotEnoughDataError(f"{x.shape[0]} examples; a device needs at least {min_examples} to take part")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(delta))):
        raise LinearHeadError("NaN or inf in the statistics' inputs: nothing is shared")
    if np.any(np.linalg.norm(x, axis=1) > 1.0 + 1e-9) or np.any(np.abs(delta) > target_bound + 1e-12):
        raise LinearHeadError("feature rows or targets exceed their bounds (use head_inputs/target_delta)")
    vector = pack_statistics(*moments(x, delta), target_bound)
    if float(np.linalg.norm(vector)) > SENSITIVITY * (1 + 1e-9):  # impossible by construction
        raise LinearHeadError("statistics vector exceeds its sensitivity bound")
    return vector


def project_psd(A: np.ndarray) -> np.ndarray:
    """The nearest positive semidefinite matrix (Frobenius): negative eigenvalues to 0."""
    S = (np.asarray(A, dtype=np.float64) + np.asarray(A, dtype=np.float64).T) / 2.0
    ev, V = np.linalg.eigh(S)
    return (V * np.maximum(ev, 0.0)) @ V.T


# ------------------------------------------------------------------------------ the server's solve
@dataclass(frozen=True)
class PriorWeights:
    """What the server shrinks toward (fitted on public data, :mod:`restwise.models.prior`).

    ``weights`` w0; ``tau2`` the prior variance of each weight (how far the cohort's weights
    may plausibly lie from w0); ``person_variance`` the per-coordinate variance of one person's
    ``b_i - A_i w0`` (their own deviation from the shared model plus sampling noise)."""

    weights: np.ndarray
    tau2: np.ndarray
    person_variance: float

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64)
        t = np.asarray(self.tau2, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or t.shape != w.shape:
            raise LinearHeadError("prior weights and tau2 must be vectors of the same length")
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(t)) and np.all(t > 0)):
            raise LinearHeadError("prior weights must be finite and tau2 positive")
        if not (math.isfinite(self.person_variance) and self.person_variance >= 0):
            raise LinearHeadError("prior person_variance must be finite and >= 0")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "tau2", t)


def solve_with_prior(A_sum: np.ndarray, b_sum: np.ndarray, prior: PriorWeights, *,
                     noise_std: float, devices: int, target_bound: float = TARGET_BOUND) -> np.ndarray:
    """Weights from the released (noisy) sums, shrunk toward the prior.

    The released sums satisfy ``b = A w + e`` with ``e`` the sum of the persons' own
    deviations (variance ``devices x person_variance`` per coordinate) plus the DP noise: std
    ``B x noise_std`` on b, and ``noise_std`` (diagonal) or ``noise_std / sqrt 2``
    (off-diagonal) on each entry of A, which adds at most ``noise_std^2 ||w||^2`` to each
    coordinate of ``A w``. With the prior ``w ~ N(w0, diag(tau2))`` the posterior mean is the
    ridge system

        (A'A / v + diag(1 / tau2)) w = A'b / v + w0 / tau2,
        v = devices x person_variance + (B noise_std)^2 + noise_std^2 ||w0||^2,

    on the PSD-projected A. So the shrinkage follows from the known noise scale: as the noise
    grows, v grows and w tends to w0; with w0 = 0 (no prior) to "same as your last answer".
    ``noise_std`` is the std of the noise actually in the released sum."""
    if devices < 1 or not (math.isfinite(noise_std) and noise_std >= 0):
        raise LinearHeadError("solve needs devices >= 1 and a finite noise_std >= 0")
    A = project_psd(A_sum)
    b = np.asarray(b_sum, dtype=np.float64)
    w0 = prior.weights
    if b.shape != w0.shape:
        raise LinearHeadError("the released statistics and the prior have different numbers of features")
    v = devices * prior.person_variance + (target_bound * noise_std) ** 2 + noise_std**2 * float(w0 @ w0)
    v = max(v, 1e-12)
    precision = A.T @ A / v + np.diag(1.0 / prior.tau2)
    return np.linalg.solve(precision, A.T @ b / v + w0 / prior.tau2)


# ------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class LinearHead:
    """The shared model: 32 weights under one feature spec. ``predict`` runs on the device."""

    weights: np.ndarray
    spec_sha256: str = ""

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if w.shape != (N_FEATURES,) or not np.all(np.isfinite(w)):
            raise LinearHeadError(f"a linear head has {N_FEATURES} finite weights")
        object.__setattr__(self, "weights", w)
        if not self.spec_sha256:
            object.__setattr__(self, "spec_sha256", feature_spec_sha256())
        elif self.spec_sha256 != feature_spec_sha256():
            raise LinearHeadError("the model was fitted under another feature spec; refusing it")

    @classmethod
    def zero(cls) -> "LinearHead":
        """"Same as your last answer"."""
        return cls(np.zeros(N_FEATURES))

    def delta(self, inputs: HeadInputs) -> np.ndarray:
        return np.clip(inputs.x @ self.weights, -TARGET_BOUND, TARGET_BOUND)

    def predict(self, inputs: HeadInputs, personal: PersonalScale) -> tuple[np.ndarray, np.ndarray]:
        """(snapped forecast on the person's scale, continuous forecast)."""
        cont = inputs.anchor + personal.scale * self.delta(inputs)
        value = cont
        if personal.step > 0:
            value = np.round(cont / personal.step) * personal.step
        return np.clip(value, personal.lo, personal.hi), cont

    def low_score(self, continuous: np.ndarray, personal: PersonalScale) -> np.ndarray:
        """Higher = more likely below the person's low threshold."""
        return (personal.low_threshold - continuous) / personal.scale

    def to_bytes(self) -> bytes:
        return json.dumps({"architecture": ARCHITECTURE_NAME, "feature_spec_version": FEATURE_SPEC_VERSION,
                           "feature_spec_sha256": self.spec_sha256,
                           "weights": [float(w) for w in self.weights]}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "LinearHead":
        try:
            data = json.loads(blob)
            if data["architecture"] != ARCHITECTURE_NAME:
                raise LinearHeadError("not a linear-head model")
            if data["feature_spec_version"] != FEATURE_SPEC_VERSION:
                raise LinearHeadError(f"feature spec version {data['feature_spec_version']!r} is not "
                                      f"this Restwise's ({FEATURE_SPEC_VERSION}); refusing the model")
            return cls(np.asarray(data["weights"], dtype=np.float64), str(data["feature_spec_sha256"]))
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, LinearHeadError):
                raise
            raise LinearHeadError("unreadable linear-head model") from None

    def model_hash(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def sum_statistics(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Exact float64 sum of devices' vectors (what secure aggregation releases, noise aside)."""
    if not vectors:
        raise NotEnoughDataError("no device took part")
    return np.sum(np.stack([np.asarray(v, dtype=np.float64) for v in vectors]), axis=0)


__all__ = [
    "ARCHITECTURE_NAME", "FEATURE_SPEC_VERSION", "FEATURE_NAMES", "N_FEATURES", "STATISTICS_LENGTH",
    "statistics_length", "bound_rows",
    "SENSITIVITY", "TARGET_BOUND", "MIN_EXAMPLES", "WINDOW", "HISTORY_DAYS", "LinearHeadError",
    "NotEnoughDataError", "PersonalScale", "HeadInputs", "head_inputs", "target_delta", "moments",
    "pack_statistics", "unpack_statistics", "device_statistics", "project_psd", "PriorWeights",
    "solve_with_prior", "LinearHead", "feature_spec",
    "feature_spec_sha256", "sum_statistics",
]
