"""The recovery network: a shared part trained federatedly and a personal part that never
leaves the device.

::

    x [window * n_features]  (features z-scored against the person's own past)
      │
      ├── shared.linear: Linear(in, 2)                       "wide" path (ridge-like)
      └── shared.body:   Linear(in, h1) ─ GELU ─ Dropout ─ Linear(h1, h2) ─ GELU
            └── shared.head: Linear(h2, 2)                     "deep" path
      shared output  s = linear(x) + head(body(x))            [readiness_z, low_logit]
      │
      personal: out = s * (1 + personal.gain_delta) + personal.bias + personal.head(body(x))
      readiness = target_mean + target_scale * out[0]      (person's own scale, fitted on train)
      p_low     = sigmoid(out[1])

The personal part holds the person's target mean/scale and low-readiness threshold (buffers)
and a small calibration (gain, bias, a zero-initialised personal head on the shared body's
features). Federated training exchanges only :func:`shared_arrays`.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from restwise.common.errors import ModelError


@dataclass(frozen=True)
class ModelConfig:
    n_features: int
    window: int = 7
    hidden: tuple[int, ...] = (32, 16)
    dropout: float = 0.1
    seed: int = 0
    personal_head: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.n_features, int) or self.n_features < 1:
            raise ModelError("ModelConfig.n_features must be a positive integer")
        if not isinstance(self.window, int) or self.window < 1:
            raise ModelError("ModelConfig.window must be a positive integer")
        hidden = tuple(self.hidden)
        if len(hidden) < 1 or any((not isinstance(h, int)) or h < 1 for h in hidden):
            raise ModelError("ModelConfig.hidden must be one or more positive integers")
        object.__setattr__(self, "hidden", hidden)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ModelError("ModelConfig.dropout must be in [0, 1)")
        if not isinstance(self.seed, int):
            raise ModelError("ModelConfig.seed must be an integer")

    @property
    def input_size(self) -> int:
        return self.n_features * self.window

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            d = json.loads(text)
            d["hidden"] = tuple(d["hidden"])
            return cls(**d)
        except (TypeError, KeyError, json.JSONDecodeError) as exc:
            raise ModelError(f"not a valid model configuration ({type(exc).__name__})") from None


class SharedPart(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        prev = cfg.input_size
        for i, h in enumerate(cfg.hidden):
            layers.append(nn.Linear(prev, h))
            layers.append(nn.GELU())
            if i == 0 and cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            prev = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, 2)
        self.linear = nn.Linear(cfg.input_size, 2)
        self.out_features = prev

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.linear(x) + self.head(h), h


class PersonalPart(nn.Module):
    def __init__(self, cfg: ModelConfig, body_features: int):
        super().__init__()
        # Gain as 1 + delta: weight decay then pulls the calibration towards the identity
        # (the shared model as is), not towards switching the shared part off.
        self.gain_delta = nn.Parameter(torch.zeros(2))
        self.bias = nn.Parameter(torch.zeros(2))
        self.head = nn.Linear(body_features, 2) if cfg.personal_head else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        # The person's target scale and low-readiness threshold, fitted on their training days.
        self.register_buffer("target_mean", torch.tensor(5.0, dtype=torch.float32))
        self.register_buffer("target_scale", torch.tensor(2.0, dtype=torch.float32))
        self.register_buffer("low_threshold", torch.tensor(float("nan"), dtype=torch.float32))
        self.register_buffer("fitted", torch.tensor(0.0, dtype=torch.float32))
        # 1.0 when the person answers in whole numbers (then predictions are snapped to them:
        # the median of an integer-valued answer is an integer, and MAE rewards the median).
        self.register_buffer("target_step", torch.tensor(0.0, dtype=torch.float32))

    def forward(self, shared_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = shared_out * (1.0 + self.gain_delta) + self.bias
        if self.head is not None:
            out = out + self.head(h)
        return out


class RecoveryNet(nn.Module):
    """Next-day readiness (regression, person's own scale) and a low-readiness logit."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.shared = SharedPart(cfg)
        self.personal = PersonalPart(cfg, self.shared.out_features)

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 2]: readiness in the person's z units, low-readiness logit."""
        s, h = self.shared(x)
        return self.personal(s, h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.forward_normalized(x)
        readiness = self.personal.target_mean + self.personal.target_scale * out[:, 0]
        return readiness, out[:, 1]


def build_model(cfg: ModelConfig) -> RecoveryNet:
    """A fresh model; the same ``cfg.seed`` gives the same initial weights."""
    if not isinstance(cfg, ModelConfig):
        raise ModelError("build_model needs a ModelConfig")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = RecoveryNet(cfg)
    return model


# ------------------------------------------------------------------------------ arrays
def _tensors(module: nn.Module, *, with_buffers: bool) -> list[tuple[str, torch.Tensor]]:
    items = list(module.named_parameters())
    if with_buffers:
        items += list(module.named_buffers())
    return items


def _get(module: nn.Module, with_buffers: bool) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().copy() for _, t in _tensors(module, with_buffers=with_buffers)]


def _set(module: nn.Module, arrays, with_buffers: bool, what: str) -> None:
    targets = _tensors(module, with_buffers=with_buffers)
    arrays = list(arrays)
    if len(arrays) != len(targets):
        raise ModelError(f"{what}: expected {len(targets)} arrays, got {len(arrays)}")
    converted = []
    for (name, t), a in zip(targets, arrays):
        a = np.asarray(a)
        if tuple(a.shape) != tuple(t.shape):
            raise ModelError(
                f"{what}: array for {name} has shape {tuple(a.shape)}, expected {tuple(t.shape)}"
            )
        if not np.issubdtype(a.dtype, np.number):
            raise ModelError(f"{what}: array for {name} is not numeric")
        if name != "low_threshold" and not np.all(np.isfinite(a)):
            raise ModelError(f"{what}: array for {name} contains NaN or inf")
        converted.append(torch.as_tensor(a.astype(np.float32)))
    with torch.no_grad():
        for (_, t), a in zip(targets, converted):
            t.copy_(a)


def shared_arrays(model: RecoveryNet) -> list[np.ndarray]:
    """The federated part: parameters of ``model.shared`` in a fixed order (float32)."""
    return _get(model.shared, with_buffers=False)


def set_shared_arrays(model: RecoveryNet, arrays) -> None:
    _set(model.shared, arrays, with_buffers=False, what="shared arrays")


def shared_shapes(model: RecoveryNet) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for _, p in model.shared.named_parameters()]


def personal_arrays(model: RecoveryNet) -> list[np.ndarray]:
    """The on-device part: personal parameters, then its buffers (target mean/scale, ...)."""
    return _get(model.personal, with_buffers=True)


def set_personal_arrays(model: RecoveryNet, arrays) -> None:
    _set(model.personal, arrays, with_buffers=True, what="personal arrays")


# ------------------------------------------------------------------------------ bytes
_FORMAT = "restwise-recoverynet-1"


def model_to_bytes(model: RecoveryNet) -> bytes:
    """A self-describing blob (npz, no pickle) for the encrypted store."""
    buf = io.BytesIO()
    arrays = {f"s{i}": a for i, a in enumerate(shared_arrays(model))}
    arrays.update({f"p{i}": a for i, a in enumerate(personal_arrays(model))})
    header = json.dumps({"format": _FORMAT, "config": json.loads(model.config.to_json())})
    np.savez(buf, header=np.frombuffer(header.encode("utf-8"), dtype=np.uint8), **arrays)
    return buf.getvalue()


def model_from_bytes(blob: bytes) -> RecoveryNet:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode("utf-8"))
            if header.get("format") != _FORMAT:
                raise ModelError("not a Restwise recovery model blob")
            cfg = ModelConfig.from_json(json.dumps(header["config"]))
            model = build_model(cfg)
            n_s = len(shared_arrays(model))
            n_p = len(personal_arrays(model))
            set_shared_arrays(model, [z[f"s{i}"] for i in range(n_s)])
            set_personal_arrays(model, [z[f"p{i}"] for i in range(n_p)])
    except ModelError:
        raise
    except Exception as exc:  # zip/npz/json damage
        raise ModelError(f"the stored model cannot be read ({type(exc).__name__})") from None
    return model


__all__ = [
    "ModelConfig", "ModelError", "RecoveryNet", "build_model", "shared_arrays",
    "set_shared_arrays", "shared_shapes", "personal_arrays", "set_personal_arrays",
    "model_to_bytes", "model_from_bytes",
]
