"""The recovery network (``models/network.py``) as a federated architecture: rounds of FedAvg
of its shared part; its personal part (the person's scale, threshold and calibration) never
leaves the device.

Features: the model features of ``models/features.py`` (z-scored against the person's own
past), over a window of 7 days. The server sends the :class:`~restwise.models.network.ModelConfig`
as JSON, with the loss slot's constants (``"loss_slot"``: beta, max_loss; ``models/loss_slot.py``):
a device's vector is its update, bounded by C sqrt(1 - beta^2), and one value carrying its
training loss, so the round's mean training loss is released with the model (``release_metrics``)
at no extra epsilon and no device's loss is ever sent on its own. The device keeps its whole model (``network.model_to_bytes``) in its store under
``recovery_model``, the slot the coach reads.

torch is imported only where a network is built or trained: naming, validating and planning a
run with this architecture (the service, the run-config checks) must not load it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from restwise.common.errors import ModelError
from restwise.models.features import DailyData, Examples, compute_features, make_examples, model_feature_names
from restwise.models.loss_slot import LossSlot, split_loss_slot, with_loss_slot
from restwise.models.registry import (
    FEDAVG,
    READINESS,
    Contribution,
    LocalTraining,
    ReleasedSum,
    fedavg_apply,
    fedavg_contribution_size,
)

NAME = "recovery-mlp"
STATE_NAME = "recovery_model"  # the device store's slot for the person's model (the coach reads it)
WINDOW = 7
MIN_EXAMPLES = 14  # days with a next-day readiness answer a device needs to train
HIDDEN = (32, 16)  # network.ModelConfig's default hidden layers (a test checks they agree)
LOSS_SLOT = LossSlot()  # the constants a new run records in its model configuration


def shared_parameter_count(n_features: int, window: int = WINDOW, hidden: tuple[int, ...] = HIDDEN) -> int:
    """The number of shared values of the network (``network.SharedPart``: the body's linear
    layers, the head and the wide linear path), without building it (no torch)."""
    size = n_features * window
    count, prev = 0, size
    for h in hidden:
        count += prev * h + h
        prev = h
    return count + prev * 2 + 2 + size * 2 + 2


@dataclass(frozen=True)
class RecoveryMLP:
    name: str = NAME
    protocol: str = FEDAVG
    window: int = WINDOW
    state_name: str = STATE_NAME
    l2_sensitivity: float | None = None  # FedAvg: the run's clip norm bounds an update
    min_examples: int = MIN_EXAMPLES
    delivers_model: bool = False  # each device keeps the model it trained in its last round
    coach_role: str = READINESS

    def feature_names(self) -> Sequence[str]:
        return tuple(model_feature_names())

    def examples(self, data: DailyData) -> Examples:
        return make_examples(compute_features(data), data, window=self.window)

    def model_config(self, seed: int) -> str:
        from restwise.models.network import ModelConfig  # torch: only when a model is configured

        network = ModelConfig(n_features=len(model_feature_names()), window=self.window, seed=int(seed) % (2**31))
        return with_loss_slot(network.to_json(), LOSS_SLOT)

    def initial_shared(self, model_config: str) -> list[np.ndarray]:
        from restwise.models.network import ModelConfig, build_model, shared_arrays  # torch, see above

        network, _ = split_loss_slot(model_config)
        return [a.astype(np.float32) for a in shared_arrays(build_model(ModelConfig.from_json(network)))]

    def contribution_size(self, shared: list[np.ndarray]) -> int:
        return fedavg_contribution_size(shared) + 1  # the loss slot

    def contribute(self, model_config: str, shared: list[np.ndarray], examples: Examples,
                   training: LocalTraining, state: bytes | None) -> Contribution:
        """Train from the global shared part, keeping the person's personal part from earlier
        rounds when their stored model has this configuration; the vector is the update
        (bounded by C sqrt(1 - beta^2)) and the loss slot. A round that names no clip norm is
        not a Restwise release (Flower's own FedAvg in the deployment benchmark): the raw
        update alone. A secure round always names C, and its vector length
        (``contribution_size``) counts the slot: a vector without it is refused there."""
        # torch, see above
        from restwise.models.network import ModelConfig, build_model, model_from_bytes, model_to_bytes
        from restwise.models.training import federated_update

        network, slot = split_loss_slot(model_config)
        cfg = ModelConfig.from_json(network)
        model = None
        if state is not None:
            try:
                stored = model_from_bytes(state)
                model = stored if stored.config == cfg else None
            except ModelError:
                model = None  # an unreadable stored model is replaced, never trained on
        if model is None:
            model = build_model(cfg)
        vector, loss = federated_update(model, shared, examples, epochs=training.epochs, lr=training.learning_rate,
                                        batch_size=training.batch_size, seed=training.seed)
        if training.clip_norm is not None:
            vector = slot.append(vector, loss, training.clip_norm)
        return Contribution(vector, loss, model_to_bytes(model))

    def apply_release(self, model_config: str, shared: list[np.ndarray], released: ReleasedSum) -> list[np.ndarray]:
        """FedAvg of the update part; the last value (the loss slot) is not the model's."""
        return fedavg_apply(shared, np.asarray(released.total)[:-1], released.divisor)

    def release_metrics(self, model_config: str, released: ReleasedSum) -> dict[str, float]:
        """The survivors' mean training loss (capped at the slot's max_loss) and its noise std,
        from the loss slot of the released sum; {} without the run's clip norm."""
        if released.clip_norm is None:
            return {}
        _, slot = split_loss_slot(model_config)
        estimate = slot.decode(float(np.asarray(released.total)[-1]), released.survivors, released.noise_std,
                               released.clip_norm)
        return {"train_loss": estimate.mean, "train_loss_std": estimate.std}

    def adopt(self, model_config: str, shared: list[np.ndarray], state: bytes | None) -> bytes:
        raise ModelError("recovery-mlp devices keep the model they trained; nothing is delivered")

    def coach_model(self, state: bytes):
        """The stored network (the coach wraps it: ``models.coach.NetworkForecaster``)."""
        from restwise.models.network import model_from_bytes  # torch: only when a network is read

        return model_from_bytes(state)

    def release_shape(self, *, rounds: int, clip_norm: float, sampling_rate: float,
                      prior_path: str | None = None, target: str = "readiness") -> dict:
        """DP-FedAvg of the shared part (``privacy.utility.FedAvgShape``)."""
        return {"mechanism": "fedavg", "name": self.name,
                "shared_length": shared_parameter_count(len(model_feature_names()), self.window),
                "clip_norm": float(clip_norm), "rounds": int(rounds), "sampling_rate": float(sampling_rate)}


ARCHITECTURE = RecoveryMLP()

__all__ = ["RecoveryMLP", "ARCHITECTURE", "NAME", "STATE_NAME", "WINDOW", "MIN_EXAMPLES", "LOSS_SLOT", "shared_parameter_count"]
