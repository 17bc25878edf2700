"""A tiny model architecture for tests: the whole of what adding a model takes (this module,
plus one registry line in the test that uses it).

Tomorrow's readiness from today's, ``y = w0 + w1 x`` (both on the 0-10 scale divided by 10),
learnt from **one release of sufficient statistics**: each device sends
``(XᵀX/m, Xᵀy/m)`` over its own m days - five numbers in [0, 1], so the L2 norm of a device's
vector is at most sqrt(5), the architecture's documented sensitivity - and the server solves
the ridge normal equations on the released mean. Nothing here knows about clipping, noise,
masking or the ledger.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from restwise.models.features import DailyData, Examples
from restwise.models.registry import ONE_RELEASE, Contribution, LocalTraining, ReleasedSum

SCALE = 10.0  # readiness 0-10 -> 0-1
RIDGE = 1e-3


def statistics(examples: Examples) -> np.ndarray:
    """(XᵀX/m upper triangle, Xᵀy/m) with X = [1, x]: every entry in [0, 1]."""
    x = examples.X[:, 0].astype(np.float64)
    y = examples.y.astype(np.float64) / SCALE
    m = len(y)
    return np.array([1.0, x.sum() / m, (x * x).sum() / m, y.sum() / m, (x * y).sum() / m])


def solve(mean_stats: np.ndarray) -> np.ndarray:
    a00, a01, a11, b0, b1 = (float(v) for v in mean_stats)
    a = np.array([[a00, a01], [a01, a11]]) + RIDGE * np.eye(2)
    return np.linalg.solve(a, np.array([b0, b1]))


@dataclass(frozen=True)
class LinearStats:
    name: str = "linear-stats-test"
    protocol: str = ONE_RELEASE
    window: int = 1
    state_name: str = "linear_stats_test"
    l2_sensitivity: float = math.sqrt(5.0)
    min_examples: int = 14
    delivers_model: bool = False
    coach_role: str = "readiness"

    def feature_names(self):
        return ("readiness_today",)

    def examples(self, data: DailyData) -> Examples:
        r = np.asarray(data.series["readiness"], dtype=np.float64)
        ends = [t for t in range(len(r) - 1) if np.isfinite(r[t]) and np.isfinite(r[t + 1])]
        return Examples(
            X=np.array([[r[t] / SCALE] for t in ends], dtype=np.float32).reshape(len(ends), 1),
            y=np.array([r[t + 1] for t in ends], dtype=np.float32),
            target_days=[data.days[t + 1] for t in ends], input_end_days=[data.days[t] for t in ends],
            last_readiness=np.array([r[t] for t in ends], dtype=np.float32), window=1, n_features=1,
        )

    def model_config(self, seed: int) -> str:
        return json.dumps({"ridge": RIDGE, "scale": SCALE})

    def initial_shared(self, model_config: str) -> list[np.ndarray]:
        return [np.zeros(2, dtype=np.float32)]

    def contribution_size(self, shared) -> int:
        return 5

    def contribute(self, model_config, shared, examples, training: LocalTraining, state):
        stats = statistics(examples)
        return Contribution(stats, float("nan"), json.dumps({"days": len(examples)}).encode())

    def apply_release(self, model_config, shared, released: ReleasedSum):
        return [solve(np.asarray(released.total, dtype=np.float64) / released.divisor).astype(np.float32)]

    def release_metrics(self, model_config, released: ReleasedSum):
        return {}

    def adopt(self, model_config, shared, state):
        return json.dumps({"weights": [float(w) for w in shared[0]]}).encode()

    def coach_model(self, state):
        return None  # a test model: the coach never uses it

    def release_shape(self, *, rounds, clip_norm, sampling_rate, prior_path=None, target="readiness"):
        return {"mechanism": "statistics", "name": self.name, "statistics_length": 5,
                "sensitivity": self.l2_sensitivity, "target_bound": 1.0,
                "mean_second_moment": np.array([[1.0, 0.5], [0.5, 0.3]]), "prior_tau2": np.ones(2),
                "prior_weights_norm2": 0.0, "person_variance": 0.01, "mean_statistics_norm": 1.5}


ARCHITECTURE = LinearStats()
