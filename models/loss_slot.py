"""The training loss inside the DP-FedAvg vector: one extra value, summed securely and noised
with everything else, so the server learns the cohort's mean training loss as a DP release and
never a device's own loss (issue 15 item 6: no metric in the clear).

On the device (:meth:`LossSlot.append`), in a FedAvg round whose clip norm is C::

    u  = the raw model update, scaled down to L2 norm <= C sqrt(1 - beta^2)
    s  = beta C (2 min(max(loss, 0), L) / L - 1)          in [-beta C, +beta C]
    v  = [u, s]                                            ||v||^2 <= C^2 (1 - beta^2) + beta^2 C^2 = C^2

so the whole vector already has norm <= C before the DP mod clips it (the mod's clip to C is a
no-op, the L2 sensitivity of a person's vector is still C) and the slot gets the same Gaussian
noise as every coordinate of the update. No extra epsilon is spent: the release is the same
Gaussian mechanism on a vector of norm <= C (docs/privacy-accounting.md, "The loss slot").
The update gets its own, smaller bound first so that clipping never shrinks the slot: a large
update costs the loss estimate nothing, and the estimate stays unbiased.

The slot is centred (it spans [-beta C, +beta C] rather than [0, beta C]): the same noise on
twice the range halves the loss estimate's noise.

On the server (:meth:`LossSlot.decode`), from the released sum's last value S over m survivors
with noise std sigma (all noise in one coordinate of the sum)::

    mean loss = (S / (beta C) + m) L / (2 m)        std = sigma L / (2 beta C m)

an unbiased estimate of the survivors' mean of min(max(loss, 0), L) (not clipped afterwards:
a noisy estimate may fall outside [0, L]). A loss above L (a diverged model) counts as L.

The price: the model update's bound is C sqrt(1 - beta^2) instead of C (beta = 0.3: 95.4%),
i.e. about the update noise of a 4.8% larger noise multiplier when updates are clipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from restwise.common.errors import ModelError

LOSS_SLOT_BETA = 0.3  # the slot's share of the clip norm (see the price in the module docstring)
LOSS_SLOT_MAX_LOSS = 4.0  # losses above this count as this (a healthy recovery-network loss is 0.3-0.8)
# The update's bound is shrunk by this relative margin so that rounding can never lift the
# whole vector's norm above C (the DP mod's clip then never touches the slot).
_NORM_MARGIN = 1e-9


@dataclass(frozen=True)
class LossEstimate:
    """The released mean training loss of one round's survivors and its noise std."""

    mean: float
    std: float


@dataclass(frozen=True)
class LossSlot:
    """The slot's constants (recorded in the run's model configuration: ``to_dict``)."""

    beta: float = LOSS_SLOT_BETA
    max_loss: float = LOSS_SLOT_MAX_LOSS

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and 0.0 < self.beta < 1.0):
            raise ModelError("the loss slot's beta must be in (0, 1)")
        if not (isinstance(self.max_loss, (int, float)) and math.isfinite(self.max_loss) and self.max_loss > 0):
            raise ModelError("the loss slot's max_loss must be a positive finite number")

    def to_dict(self) -> dict[str, float]:
        return {"beta": float(self.beta), "max_loss": float(self.max_loss)}

    @classmethod
    def from_dict(cls, d: object) -> "LossSlot":
        if not isinstance(d, dict):
            raise ModelError("the model configuration's loss_slot must be an object")
        try:
            return cls(beta=float(d["beta"]), max_loss=float(d["max_loss"]))
        except (KeyError, TypeError, ValueError):
            raise ModelError("the model configuration's loss_slot needs numbers beta and max_loss") from None

    def update_bound(self, clip_norm: float) -> float:
        """The L2 bound of the model update part of the vector."""
        return float(clip_norm) * math.sqrt(1.0 - self.beta**2) * (1.0 - _NORM_MARGIN)

    def slot_value(self, loss: float, clip_norm: float) -> float:
        """The slot of a device whose mean training loss is ``loss`` (NaN stays NaN: the DP mod
        refuses a vector holding it)."""
        if math.isnan(loss):
            return float("nan")
        clamped = min(max(float(loss), 0.0), self.max_loss)
        return self.beta * float(clip_norm) * (2.0 * clamped / self.max_loss - 1.0)

    def append(self, update: np.ndarray, loss: float, clip_norm: float) -> np.ndarray:
        """The vector a device shares: its update scaled to :meth:`update_bound`, then the slot
        (norm <= C). A non-finite update is passed on unscaled (the DP mod refuses it)."""
        if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
            raise ModelError("the round names no positive clip norm (the loss slot is sized by it)")
        u = np.asarray(update, dtype=np.float64).reshape(-1)
        if np.all(np.isfinite(u)):
            peak = float(np.max(np.abs(u))) if u.size else 0.0
            if peak > 0.0:
                scaled = u / peak
                norm = peak * math.sqrt(float(np.einsum("i,i->", scaled, scaled)))
                bound = self.update_bound(clip_norm)
                if norm > bound:
                    u = u * (bound / norm)
        return np.concatenate([u, [self.slot_value(loss, clip_norm)]])

    def decode(self, slot_sum: float, survivors: int, noise_std: float, clip_norm: float) -> LossEstimate:
        """The survivors' mean loss from the slot's value in the released sum (module docstring)."""
        if survivors < 1:
            raise ModelError("no survivor: a released sum of no vectors holds no loss")
        if not (clip_norm > 0 and noise_std >= 0):
            raise ModelError("decoding the loss slot needs a positive clip norm and a noise std >= 0")
        scale = self.beta * float(clip_norm)
        mean = (float(slot_sum) / scale + survivors) * self.max_loss / (2.0 * survivors)
        return LossEstimate(mean, float(noise_std) * self.max_loss / (2.0 * scale * survivors))


def with_loss_slot(network_config_json: str, slot: LossSlot) -> str:
    """A network configuration (JSON object) with the loss slot's constants added."""
    d = json.loads(network_config_json)
    d["loss_slot"] = slot.to_dict()
    return json.dumps(d, sort_keys=True)


def split_loss_slot(model_config: str) -> tuple[str, LossSlot]:
    """(the network configuration without the slot, the slot). A configuration without one
    (a checkpoint written before the slot existed) gets the default constants, which are what
    its devices use."""
    try:
        d = json.loads(model_config)
    except json.JSONDecodeError:
        raise ModelError("not a valid model configuration (JSONDecodeError)") from None
    if not isinstance(d, dict):
        raise ModelError("not a valid model configuration (not an object)")
    slot = LossSlot.from_dict(d.pop("loss_slot")) if "loss_slot" in d else LossSlot()
    return json.dumps(d, sort_keys=True), slot


def recorded_loss_slot(model_config: str) -> LossSlot | None:
    """The loss slot a model configuration records, or None (not a JSON object with one)."""
    try:
        d = json.loads(model_config)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(d, dict) or "loss_slot" not in d:
        return None
    return LossSlot.from_dict(d["loss_slot"])


__all__ = ["recorded_loss_slot", "LossSlot", "LossEstimate", "LOSS_SLOT_BETA", "LOSS_SLOT_MAX_LOSS", "with_loss_slot", "split_loss_slot"]
