"""The early-warning model as a federated architecture (registry name ``early-warning``):
learned like the linear head, from one release of the devices' bounded statistics solved
toward the shipped warning prior, then delivered to the devices.

Device (``examples`` -> ``contribute``): the person's labelled days (a low week known to have
followed or not, :func:`restwise.models.warning.labelled_rows`), their personal part
(:class:`~restwise.models.warning.WarningPersonal`: low threshold, scale, own rate of low
weeks; fitted on their answers, kept in the model state, never sent) and the statistics of
:func:`restwise.models.warning.device_statistics`: 350 numbers, L2 norm <= sqrt 2 (the linear
head's derivation, target bound 1); fewer than 14 labelled days and the device takes no part.
Server (``apply_release``): the PSD projection and the ridge solve shrunk toward the warning
prior with the known noise of the released sum (``linear_head.solve_with_prior``, B = 1).
Delivery (``adopt``): the device keeps the released weights; its coach's 7-day warning then
scores with them (:func:`restwise.models.warning.warning_today` ``weights=``), at the prior's
operating point (chosen on public data for the prior; the released weights are shrunk toward
it) - and says that the measured record it quotes is the public prior's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from restwise.common.errors import ModelError
from restwise.models.features import DailyData
from restwise.models.one_release import StatisticsModel
from restwise.models.prior import PublicPrior, load_prior, statistics_release_shape
from restwise.models.registry import ONE_RELEASE, WARNING, Contribution, LocalTraining, ReleasedSum
from restwise.models.warning import (
    ARCHITECTURE_NAME,
    FEATURE_NAMES,
    FEATURE_SPEC_VERSION,
    MIN_EXAMPLES,
    N_FEATURES,
    SENSITIVITY,
    STATISTICS_LENGTH,
    TARGET_BOUND,
    WARNING_PRIOR,
    WINDOW,
    PersonDays,
    WarningModel,
    WarningError,
    device_statistics,
    feature_spec_sha256,
    fit_person,
    labelled_rows,
)

NAME = ARCHITECTURE_NAME
STATE_NAME = "warning_model"
TARGET = "readiness"
STATE_FORMAT = "restwise-early-warning-state"


@lru_cache(maxsize=1)
def shipped_warning_prior() -> PublicPrior:
    return load_prior(spec=WARNING_PRIOR)


WARNING_MODEL = StatisticsModel(NAME, FEATURE_SPEC_VERSION, feature_spec_sha256, N_FEATURES, TARGET_BOUND,
                                shipped_warning_prior)


@dataclass(frozen=True)
class WarningExamples:
    """A person's labelled days, as the device computes them (``len``: how many)."""

    person: PersonDays
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.size)


@dataclass(frozen=True)
class WarningState:
    """What a device keeps: its personal part's numbers (threshold, scale, rate) when it
    contributed, and once delivered the released weights and their hash."""

    personal: dict | None = None
    weights: np.ndarray | None = None
    model_hash: str | None = None

    def to_bytes(self) -> bytes:
        return json.dumps({"format": STATE_FORMAT, "feature_spec_sha256": feature_spec_sha256(),
                           "personal": self.personal,
                           "weights": None if self.weights is None else [float(w) for w in self.weights],
                           "model_hash": self.model_hash}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "WarningState":
        try:
            d = json.loads(blob)
            if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
                raise ModelError("not a stored early-warning model")
            if d.get("feature_spec_sha256") != feature_spec_sha256():
                raise ModelError("the stored early-warning model was made under another feature spec")
            weights = None if d.get("weights") is None else WarningModel(np.asarray(d["weights"])).weights
            return cls(d.get("personal"), weights, d.get("model_hash"))
        except ModelError:
            raise
        except (ValueError, TypeError, KeyError, WarningError):
            raise ModelError("the stored early-warning model is unreadable") from None


@dataclass(frozen=True)
class WarningArchitecture:
    name: str = NAME
    protocol: str = ONE_RELEASE
    window: int = WINDOW
    state_name: str = STATE_NAME
    l2_sensitivity: float = SENSITIVITY
    min_examples: int = MIN_EXAMPLES
    delivers_model: bool = True
    coach_role: str = WARNING

    def feature_names(self) -> Sequence[str]:
        return FEATURE_NAMES

    def examples(self, data: DailyData) -> WarningExamples:
        person = PersonDays.from_daily(data, TARGET)
        return WarningExamples(person, labelled_rows(person))

    def model_config(self, seed: int) -> str:
        return WARNING_MODEL.model_config(TARGET)

    def initial_shared(self, model_config: str) -> list[np.ndarray]:
        return [WARNING_MODEL.prior_weights(model_config).weights.astype(np.float32)]

    def contribution_size(self, shared: list[np.ndarray]) -> int:
        return STATISTICS_LENGTH

    def contribute(self, model_config: str, shared: list[np.ndarray], examples: WarningExamples,
                   training: LocalTraining, state: bytes | None) -> Contribution:
        WARNING_MODEL.parse(model_config)
        personal, inputs, labels = fit_person(examples.person, examples.rows)
        vector = device_statistics(inputs, labels, examples.rows)
        previous = self.stored_state(state)
        kept = WarningState({"low_threshold": personal.low_threshold, "scale": personal.scale,
                             "base_rate": personal.base_rate}, previous.weights, previous.model_hash)
        return Contribution(vector, float("nan"), kept.to_bytes())

    def apply_release(self, model_config: str, shared: list[np.ndarray], released: ReleasedSum) -> list[np.ndarray]:
        return WARNING_MODEL.solve(model_config, released)

    def release_metrics(self, model_config: str, released: ReleasedSum) -> dict[str, float]:
        return {}  # one release of statistics: no rounds, no training loss

    def adopt(self, model_config: str, shared: list[np.ndarray], state: bytes | None) -> bytes:
        weights, model_hash, _ = WARNING_MODEL.delivered(model_config, shared)
        return WarningState(self.stored_state(state).personal, weights, model_hash).to_bytes()

    @staticmethod
    def stored_state(state: bytes | None) -> WarningState:
        if state is None:
            return WarningState()
        try:
            return WarningState.from_bytes(state)
        except ModelError:
            return WarningState()

    @staticmethod
    def coach_model(state: bytes) -> np.ndarray | None:
        """The released weights the coach's 7-day warning scores with (None before delivery)."""
        return WarningState.from_bytes(state).weights

    def release_shape(self, *, rounds: int = 1, clip_norm: float = 1.0, sampling_rate: float = 1.0,
                      prior_path: str | None = None, target: str = TARGET) -> dict:
        prior = shipped_warning_prior() if prior_path is None else load_prior(prior_path, spec=WARNING_PRIOR)
        return statistics_release_shape(self.name, STATISTICS_LENGTH, SENSITIVITY, TARGET_BOUND, prior.target(target))


ARCHITECTURE = WarningArchitecture()

__all__ = ["ARCHITECTURE", "WarningArchitecture", "WarningExamples", "WarningState", "NAME", "STATE_NAME",
           "shipped_warning_prior", "WARNING_MODEL"]
