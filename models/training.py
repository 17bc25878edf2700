"""Local training and prediction of the recovery network (privacy-unaware core code).

``train_local`` is what a device runs in a federated round (shared part, personal part or
both) and what the evaluation harness runs for local-only and centralised baselines.

Targets are normalised per person: the personal part holds the person's mean and scale of
readiness, fitted on the examples it is trained on (the training split only), and the
low-readiness threshold (person's training median - 1, as in the evaluation protocol).
Loss = Huber(readiness z) + ``low_weight`` x BCE(low flag).

Deterministic: the same seed, data and starting weights give bit-identical weights (a local
``torch.Generator`` for shuffling, ``torch.manual_seed`` inside ``fork_rng`` for dropout, so
the caller's global RNG state is left alone).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from restwise.models.features import Examples
from restwise.models.metrics import CHECKIN_FIELDS
from restwise.common.arrays import flatten
from restwise.models.network import (
    ModelConfig,
    ModelError,
    RecoveryNet,
    build_model,
    set_shared_arrays,
    shared_arrays,
)

# Local-only training overfits a person's few hundred days quickly (SoccerMon: 5 epochs
# MAE 0.80, 10 -> 0.84, 20 -> 0.88), so few epochs.
DEFAULT_EPOCHS = 5
DEFAULT_LR = 3e-3
DEFAULT_BATCH_SIZE = 32
DEFAULT_WEIGHT_DECAY = 1e-2
# The federated recipe measured on SoccerMon (FedAvg of the shared part, one local epoch per
# round; more rounds start to overfit): see docs/coach.md "The model".
FEDERATED_ROUNDS = 10
FEDERATED_LOCAL_EPOCHS = 1
LOW_WEIGHT = 0.3
# Small delta: close to L1, i.e. the conditional median, which is what MAE rewards.
DEFAULT_HUBER_DELTA = 0.3
READINESS_RANGE = CHECKIN_FIELDS["readiness"]
MIN_TARGET_SCALE = 0.5  # readiness points; a person who always answers 7 is not divided by 0


class _AdamW:
    """AdamW (Loshchilov & Hutter 2019, decoupled weight decay), same update as
    ``torch.optim.AdamW`` with its defaults (betas 0.9/0.999, eps 1e-8).

    Why not ``torch.optim``: constructing any torch optimizer imports ``torch._dynamo`` (and
    sympy), +70 MB resident memory, which alone breaks the device's 300 MB budget.
    """

    def __init__(self, params, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.wd, self.eps = lr, weight_decay, eps
        self.b1, self.b2 = betas
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            p.mul_(1 - self.lr * self.wd)
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (v / c2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / c1)


def low_threshold_for(y: np.ndarray) -> float:
    """The person's low-readiness threshold: median of their training targets minus 1."""
    y = np.asarray(y, dtype=np.float64)
    y = y[np.isfinite(y)]
    if y.size == 0:
        raise ModelError("no readiness targets to fit a low-readiness threshold on")
    return float(np.median(y) - 1.0)


def low_labels(y: np.ndarray, threshold: float) -> np.ndarray:
    """1.0 where readiness is at or below the person's threshold."""
    return (np.asarray(y, dtype=np.float64) <= threshold).astype(np.float32)


def _check_inputs(model: RecoveryNet, X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim == 3:
        X = X.reshape(X.shape[0], -1)
    if X.ndim != 2 or X.shape[1] != model.config.input_size:
        raise ModelError(
            f"inputs have shape {tuple(X.shape)}, the model expects [n, {model.config.input_size}] "
            f"(window {model.config.window} x {model.config.n_features} features)"
        )
    if not np.all(np.isfinite(X)):
        raise ModelError("inputs contain NaN or inf (use features.compute_features)")
    return X


def fit_target_scaler(model: RecoveryNet, y: np.ndarray, low_threshold: float | None = None) -> None:
    """Store the person's target mean/scale and low threshold in the personal part."""
    y = np.asarray(y, dtype=np.float64)
    y = y[np.isfinite(y)]
    if y.size == 0:
        raise ModelError("no readiness targets to fit the person's scale on")
    thr = low_threshold_for(y) if low_threshold is None else float(low_threshold)
    p = model.personal
    with torch.no_grad():
        p.target_mean.fill_(float(y.mean()))
        p.target_scale.fill_(max(float(y.std()), MIN_TARGET_SCALE))
        p.low_threshold.fill_(thr)
        p.fitted.fill_(1.0)
        p.target_step.fill_(1.0 if np.all(y == np.round(y)) else 0.0)


def train_local(
    model: RecoveryNet,
    examples: Examples,
    *,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    train_shared: bool = True,
    train_personal: bool = True,
    low_threshold: float | None = None,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    fit_scaler: bool | None = None,
    huber_delta: float = DEFAULT_HUBER_DELTA,
) -> dict:
    """Train in place on ``examples``; returns ``{"loss", "n_examples", "epochs"}``.

    ``fit_scaler`` (default: when training the personal part or when it was never fitted)
    refits the person's target mean/scale and low threshold on these examples.
    """
    if not isinstance(model, RecoveryNet):
        raise ModelError("train_local needs a RecoveryNet (see build_model)")
    if epochs < 0 or batch_size < 1 or not (lr > 0):
        raise ModelError("epochs must be >= 0, batch_size >= 1 and lr > 0")
    if not (train_shared or train_personal):
        raise ModelError("nothing to train: train_shared and train_personal are both False")
    X = _check_inputs(model, examples.X)
    y = np.asarray(examples.y, dtype=np.float32).reshape(-1)
    if y.shape[0] != X.shape[0]:
        raise ModelError(f"{X.shape[0]} inputs but {y.shape[0]} targets")
    if not np.all(np.isfinite(y)):
        raise ModelError("targets contain NaN or inf")
    n = int(X.shape[0])
    if n == 0:
        return {"loss": float("nan"), "n_examples": 0, "epochs": 0}

    if fit_scaler is None:
        fit_scaler = train_personal or not bool(model.personal.fitted.item())
    if fit_scaler:
        fit_target_scaler(model, y, low_threshold)
    elif low_threshold is not None:
        with torch.no_grad():
            model.personal.low_threshold.fill_(float(low_threshold))
    thr = float(model.personal.low_threshold.item())
    if not math.isfinite(thr):
        thr = low_threshold_for(y)

    mean = float(model.personal.target_mean.item())
    scale = float(model.personal.target_scale.item())
    loss = fit_normalized(
        model, X, (y - mean) / scale, low_labels(y, thr), epochs=epochs, lr=lr, batch_size=batch_size,
        seed=seed, weight_decay=weight_decay, huber_delta=huber_delta,
        train_shared=train_shared, train_personal=train_personal,
    )
    return {"loss": loss, "n_examples": n, "epochs": int(epochs)}


def fit_normalized(
    model: RecoveryNet,
    X: np.ndarray,
    yz: np.ndarray,
    low: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    huber_delta: float = DEFAULT_HUBER_DELTA,
    train_shared: bool = True,
    train_personal: bool = True,
) -> float:
    """The one training loop: minibatch AdamW on Huber(readiness z) + ``LOW_WEIGHT`` x
    BCE(low flag), on targets already z-scored (``yz``, per person) and low flags already set
    (``low``). Trains the shared part, the personal part or both, in place; returns the last
    epoch's mean loss (NaN without epochs). Local training (one person, their own scale) and
    pooled training (many persons, each z-scored on their own scale) both run it."""
    Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    yzt = torch.from_numpy(np.asarray(yz, dtype=np.float32))
    lowt = torch.from_numpy(np.asarray(low, dtype=np.float32))
    n = int(Xt.shape[0])
    for p in model.shared.parameters():
        p.requires_grad_(train_shared)
    for p in model.personal.parameters():
        p.requires_grad_(train_personal)
    params = [p for p in model.parameters() if p.requires_grad]
    huber = nn.HuberLoss(delta=huber_delta)
    bce = nn.BCEWithLogitsLoss()
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = _AdamW(params, lr=lr, weight_decay=weight_decay)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                out = model.forward_normalized(Xt[idx])
                loss = huber(out[:, 0], yzt[idx]) + LOW_WEIGHT * bce(out[:, 1], lowt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
        model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return total / n if epochs and n else float("nan")


def federated_update(
    model: RecoveryNet,
    global_shared: list[np.ndarray],
    examples: Examples,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    **train_kwargs,
) -> tuple[np.ndarray, float]:
    """A device's step in a FedAvg round: load the global shared part into ``model`` (its
    personal part stays), train both parts on the person's own examples, and return (the raw
    change of the shared arrays as one float64 vector, the mean training loss). The deployed
    ClientApp and the in-process evaluation both run it; clipping and noise are the DP mod's
    job, not this function's."""
    set_shared_arrays(model, global_shared)
    before = flatten(shared_arrays(model))
    stats = train_local(model, examples, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                        train_shared=True, train_personal=True, **train_kwargs)
    return flatten(shared_arrays(model)) - before, float(stats.get("loss", float("nan")))


def predict(
    model: RecoveryNet, X: np.ndarray, *, snap: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(readiness on the person's 0-10 scale, probability of low readiness), both [n].

    Readiness is clipped to the 0-10 scale. ``snap`` (default: when the person's training
    answers were all whole numbers) rounds it to the nearest whole number: for answers given
    in whole numbers that is the better point forecast under absolute error (the median of an
    integer-valued quantity is an integer). ``snap=False`` gives the continuous value (the
    coach uses it).
    """
    X = _check_inputs(model, X)
    model.eval()
    with torch.no_grad():
        readiness, logit = model(torch.from_numpy(X))
    r = readiness.numpy().astype(np.float64)
    if snap is None:
        snap = float(model.personal.target_step.item()) > 0
    if snap:
        r = np.round(r)
    lo, hi = READINESS_RANGE
    return np.clip(r, lo, hi), torch.sigmoid(logit).numpy().astype(np.float64)


def snap_to_answers(model: RecoveryNet, readiness: np.ndarray) -> np.ndarray:
    """Apply ``predict``'s default post-processing to continuous forecasts (e.g. the mean of
    an ensemble of ``predict(..., snap=False)`` outputs): clip to 0-10 and, when the person
    answers in whole numbers, round."""
    r = np.asarray(readiness, dtype=np.float64)
    if float(model.personal.target_step.item()) > 0:
        r = np.round(r)
    lo, hi = READINESS_RANGE
    return np.clip(r, lo, hi)


def train_person_model(
    examples: Examples,
    *,
    config: ModelConfig | None = None,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    **kwargs,
) -> RecoveryNet:
    """Build a model for ``examples``' shape and train it locally (local-only baseline)."""
    cfg = config or ModelConfig(n_features=examples.n_features, window=examples.window, seed=seed)
    model = build_model(cfg)
    train_local(model, examples, epochs=epochs, seed=seed, **kwargs)
    return model


__all__ = [
    "fit_normalized", "federated_update", "FEDERATED_ROUNDS", "FEDERATED_LOCAL_EPOCHS", "DEFAULT_EPOCHS", "DEFAULT_LR", "DEFAULT_BATCH_SIZE", "train_local", "predict",
    "fit_target_scaler", "low_threshold_for", "low_labels", "train_person_model",
    "snap_to_answers",
]
