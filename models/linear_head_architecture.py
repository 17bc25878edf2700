"""The linear head as a federated model architecture (registry name ``linear-head``): one
release of the devices' bounded sufficient statistics, solved on the server toward the shipped
public prior, then delivered to every device for its coach.

(The head itself - features, bounds, statistics, the solve, the model - is
:mod:`restwise.models.linear_head`; its prior is :mod:`restwise.models.prior`. This module
joins them, which neither can do alone: the prior module imports the head.)

Device: ``examples`` -> ``contribute``
    The person's examples of next-day readiness (``models.evaluation.windowed_examples``: the
    7-day feature window and 56 days of their own answers). Their :class:`PersonalScale`
    (mean, scale, answer step, range, low threshold) is fitted on their answers and kept in
    the model state (:class:`HeadState`) - never sent. The vector shared is
    ``linear_head.device_statistics``: 560 numbers, L2 norm <= sqrt 2 (checked), refused on
    NaN/inf before anything is masked; fewer than ``MIN_EXAMPLES`` examples and the device
    answers the round's hello with "no" (``min_examples``) and sends nothing.
Server: ``initial_shared`` -> ``apply_release``
    Round 0 is the prior's weights. The released noisy sum is unpacked, A projected onto the
    PSD cone, and the ridge system shrunk toward the prior is solved with the known standard
    deviation of all the noise in the sum (``ReleasedSum.noise_std``) and the number of devices
    in it (``linear_head.solve_with_prior``). The weights are kept as float32, exactly what
    the ledger's model hash names and the devices receive.
Delivery: ``adopt``
    The device checks the model's feature spec, keeps the released weights with its personal
    part (:class:`HeadState`) and its coach forecasts with them
    (:class:`LinearHeadForecaster`).
Planning: ``release_shape``
    One statistics release: sensitivity sqrt 2, 560 numbers, the prior's signal and spread
    (``privacy.utility.assess_release``).

The model configuration, the prior check, the solve and the check of a delivered model are
those of every one-release model (:mod:`restwise.models.one_release`, ``HEAD``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from restwise.common.errors import ModelError
from restwise.models.evaluation import ExampleSet, windowed_examples
from restwise.models.features import DailyData, FeatureFrame, compute_features
from restwise.models.linear_head import (
    ARCHITECTURE_NAME,
    FEATURE_NAMES,
    FEATURE_SPEC_VERSION,
    HISTORY_DAYS,
    MIN_EXAMPLES,
    N_FEATURES,
    SENSITIVITY,
    STATISTICS_LENGTH,
    TARGET_BOUND,
    WINDOW,
    LinearHead,
    PersonalScale,
    PriorWeights,
    device_statistics,
    feature_spec_sha256,
    head_inputs,
    solve_with_prior,
    target_delta,
    unpack_statistics,
)
from restwise.models.one_release import StatisticsModel
from restwise.models.prior import PublicPrior, load_prior, statistics_release_shape
from restwise.models.registry import ONE_RELEASE, READINESS, Contribution, LocalTraining, ReleasedSum

NAME = ARCHITECTURE_NAME
STATE_NAME = "linear_head_model"  # the device store's slot (the coach reads it)
TARGET = "readiness"  # the coach's question: tomorrow's readiness
STATE_FORMAT = "restwise-linear-head-state"


@lru_cache(maxsize=1)
def shipped_prior() -> PublicPrior:
    """The shipped prior, verified against its pinned sha256 (PriorError otherwise)."""
    return load_prior()


HEAD = StatisticsModel(NAME, FEATURE_SPEC_VERSION, feature_spec_sha256, N_FEATURES, TARGET_BOUND, shipped_prior)


def parse_model_config(model_config: str) -> dict:
    """The run's configuration (``one_release.StatisticsModel.parse``)."""
    return HEAD.parse(model_config)


# ------------------------------------------------------------------------------ device state
@dataclass(frozen=True)
class HeadState:
    """What a device keeps in its store for the linear head: the personal part its statistics
    were computed with (None when it never contributed) and, once delivered, the released
    weights and the hash that names them in the run's ledger."""

    personal: PersonalScale | None = None
    weights: np.ndarray | None = None
    model_hash: str | None = None
    prior_sha256: str | None = None

    @property
    def model(self) -> LinearHead | None:
        return None if self.weights is None else LinearHead(self.weights)

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format": STATE_FORMAT, "feature_spec_version": FEATURE_SPEC_VERSION,
            "feature_spec_sha256": feature_spec_sha256(),
            "personal": None if self.personal is None else self.personal.to_dict(),
            "weights": None if self.weights is None else [float(w) for w in self.weights],
            "model_hash": self.model_hash, "prior_sha256": self.prior_sha256,
        }, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "HeadState":
        """ModelError when the stored state is unreadable or of another feature spec."""
        try:
            d = json.loads(blob)
            if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
                raise ModelError("not a stored linear-head model")
            if d.get("feature_spec_sha256") != feature_spec_sha256():
                raise ModelError("the stored linear head was made under another feature spec")
            personal = None if d.get("personal") is None else PersonalScale(**d["personal"])
            weights = None if d.get("weights") is None else LinearHead(np.asarray(d["weights"])).weights
            return cls(personal, weights, d.get("model_hash"), d.get("prior_sha256"))
        except ModelError:
            raise
        except (ValueError, TypeError, KeyError):
            raise ModelError("the stored linear-head model is unreadable") from None


# ------------------------------------------------------------------------------ the coach's forecasts
def forecast_inputs(frame: FeatureFrame, answers: np.ndarray, end: int) -> tuple[np.ndarray, np.ndarray]:
    """The feature window of days end-6..end (days before the data repeat day 0, as the
    network's inputs) and the answers of days end-55..end (NaN before the data), one row each."""
    idx = np.clip(np.arange(end - WINDOW + 1, end + 1), 0, None)
    x = np.asarray(frame.X, dtype=np.float64)[idx].reshape(1, -1)
    padded = np.concatenate([np.full(HISTORY_DAYS, np.nan), np.asarray(answers, dtype=np.float64)])
    history = padded[end + 1 : end + 1 + HISTORY_DAYS].reshape(1, -1)
    return x, history


@dataclass(frozen=True)
class LinearHeadForecaster:
    """The coach's view of a released linear head: the forecast of day j's answer made on day
    j-1, with the person's scale fitted on their answers up to day j-1 only (on the device)."""

    model: LinearHead
    label: str = "linear head"

    def unusable(self, frame: FeatureFrame) -> str | None:
        """Always usable: its personal part is fitted from the person's answers as it goes."""
        return None

    def forecast(self, data: DailyData, frame: FeatureFrame, targets: Sequence[int]) -> list[tuple[float, float, float] | None]:
        """Per target day index j: (forecast, the person's mean, their scale), or None when no
        answer precedes it. The forecast is the model's point forecast: snapped to the
        person's answer step and clipped to the range of their answers."""
        answers = np.asarray(data.series[TARGET], dtype=np.float64)
        out: list[tuple[float, float, float] | None] = []
        for j in targets:
            end = int(j) - 1
            past = answers[: end + 1]
            past = past[np.isfinite(past)]
            if end < 0 or past.size == 0:
                out.append(None)
                continue
            personal = PersonalScale.fit(past)
            x, history = forecast_inputs(frame, answers, end)
            value, _ = self.model.predict(head_inputs(x, history, personal), personal)
            out.append((float(value[0]), personal.mean, personal.scale))
        return out


# ------------------------------------------------------------------------------ the architecture
@dataclass(frozen=True)
class LinearHeadArchitecture:
    """The registry's ``linear-head`` (see the module docstring)."""

    name: str = NAME
    protocol: str = ONE_RELEASE
    window: int = WINDOW
    state_name: str = STATE_NAME
    l2_sensitivity: float = SENSITIVITY
    min_examples: int = MIN_EXAMPLES
    delivers_model: bool = True
    coach_role: str = READINESS
    history_days: int = HISTORY_DAYS
    statistics_length: int = STATISTICS_LENGTH

    def feature_names(self) -> Sequence[str]:
        return FEATURE_NAMES

    def examples(self, data: DailyData) -> ExampleSet:
        if TARGET not in data.series:
            raise ModelError(f"the person's data has no {TARGET!r} series")
        return windowed_examples(compute_features(data), data.series[TARGET], WINDOW, HISTORY_DAYS)

    def model_config(self, seed: int) -> str:
        """Deterministic (no seed): the feature spec, the target and the shipped prior."""
        return HEAD.model_config(TARGET)

    def initial_shared(self, model_config: str) -> list[np.ndarray]:
        return [HEAD.prior_weights(model_config).weights.astype(np.float32)]

    def contribution_size(self, shared: list[np.ndarray]) -> int:
        return STATISTICS_LENGTH

    def contribute(self, model_config: str, shared: list[np.ndarray], examples: ExampleSet,
                   training: LocalTraining, state: bytes | None) -> Contribution:
        """The device's statistics over all its examples (nothing is trained: ``training``
        is ignored), its personal part kept with any model it already has."""
        parse_model_config(model_config)
        personal = PersonalScale.fit(examples.y)
        inputs = head_inputs(examples.X, examples.history, personal)
        vector = device_statistics(inputs.x, target_delta(examples.y, inputs.anchor, personal))
        previous = self.stored_state(state)
        kept = HeadState(personal, previous.weights, previous.model_hash, previous.prior_sha256)
        return Contribution(vector, math.nan, kept.to_bytes())

    def apply_release(self, model_config: str, shared: list[np.ndarray], released: ReleasedSum) -> list[np.ndarray]:
        return HEAD.solve(model_config, released)

    def release_metrics(self, model_config: str, released: ReleasedSum) -> dict[str, float]:
        return {}  # one release of statistics: no rounds, no training loss

    def adopt(self, model_config: str, shared: list[np.ndarray], state: bytes | None) -> bytes:
        weights, model_hash, cfg = HEAD.delivered(model_config, shared)
        return HeadState(self.stored_state(state).personal, weights, model_hash, cfg["prior_sha256"]).to_bytes()

    @staticmethod
    def stored_state(state: bytes | None) -> HeadState:
        """The device's stored state (an unreadable one is replaced, never used)."""
        if state is None:
            return HeadState()
        try:
            return HeadState.from_bytes(state)
        except ModelError:
            return HeadState()

    @staticmethod
    def coach_model(state: bytes) -> LinearHeadForecaster | None:
        """The coach's forecaster from a stored state; None before a model was delivered."""
        model = HeadState.from_bytes(state).model
        return None if model is None else LinearHeadForecaster(model, "linear head (released)")

    def release_shape(self, *, rounds: int = 1, clip_norm: float = 1.0, sampling_rate: float = 1.0,
                      prior_path: str | None = None, target: str = TARGET) -> dict:
        prior = shipped_prior() if prior_path is None else load_prior(prior_path)
        return statistics_release_shape(self.name, STATISTICS_LENGTH, SENSITIVITY, TARGET_BOUND, prior.target(target))

    # -- the head's parts, as the phase-1 evaluation and benchmarks use them ------------------
    @staticmethod
    def device_statistics(window_features: np.ndarray, history: np.ndarray, targets: np.ndarray,
                          personal: PersonalScale) -> np.ndarray:
        inputs = head_inputs(window_features, history, personal)
        return device_statistics(inputs.x, target_delta(targets, inputs.anchor, personal))

    @staticmethod
    def server_model(noisy_sum: np.ndarray, *, noise_std: float, devices: int, prior: PriorWeights) -> LinearHead:
        A, b = unpack_statistics(noisy_sum)
        return LinearHead(solve_with_prior(A, b, prior, noise_std=noise_std, devices=devices))

    @staticmethod
    def predict(model: LinearHead, window_features: np.ndarray, history: np.ndarray,
                personal: PersonalScale) -> tuple[np.ndarray, np.ndarray]:
        return model.predict(head_inputs(window_features, history, personal), personal)

    @staticmethod
    def serialise(model: LinearHead) -> bytes:
        return model.to_bytes()

    @staticmethod
    def deserialise(blob: bytes) -> LinearHead:
        return LinearHead.from_bytes(blob)


ARCHITECTURE = LinearHeadArchitecture()

__all__ = ["ARCHITECTURE", "LinearHeadArchitecture", "HeadState", "LinearHeadForecaster", "NAME", "STATE_NAME",
           "TARGET", "HEAD", "parse_model_config", "shipped_prior", "forecast_inputs"]
