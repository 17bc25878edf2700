"""Model architectures by name: ``RunConfig.model`` picks one.

Adding an architecture is one module and one line: the module defines ``ARCHITECTURE``, an
object with the attributes and methods of :class:`Architecture`, and :data:`ARCHITECTURES`
maps its name to ``"module:ARCHITECTURE"``. Entries are imported on first use, so naming or
validating a model never loads torch. (Tests and plugins may also :func:`register` an object.)

An architecture knows everything the federation needs about a model, so nothing in
``server/``, ``client/`` or ``simulation/`` names a model:

* **features and window**: ``examples(daily_data)`` turns a person's days into supervised
  examples (``feature_names()``, ``window`` days of input);
* **serialisation**: ``model_config(seed)`` is the configuration the server sends (a JSON
  string), the device keeps its whole model (shared and personal part) as bytes in its store
  under ``state_name``;
* **who may take part**: ``min_examples``, the fewest examples a device needs (fewer: it
  answers the round's hello with "no" and sends nothing);
* **shared/personal split and the federated protocol** (``protocol``):

  - ``FEDAVG``: rounds of FedAvg. ``initial_shared`` gives the server's starting shared
    arrays; each round a device's ``contribute`` trains on its own examples from the global
    shared arrays (its personal part stays on the device) and returns the raw change of the
    shared arrays (``contribution_size``: their number of values); the server's
    ``apply_release`` adds the released (clipped, noised, securely summed) changes divided by
    the expected cohort (:func:`fedavg_apply`). A FedAvg architecture may carry the device's
    training loss inside the vector (``models/loss_slot.py``: one more value, within the clip
    norm ``LocalTraining.clip_norm``); ``release_metrics`` then decodes the round's mean loss
    from the released sum - a DP release, never one device's loss.
  - ``ONE_RELEASE``: one release of bounded statistics (the run has exactly one round).
    ``contribute`` returns a device's statistics vector of ``contribution_size`` values (e.g.
    XᵀX/m and Xᵀy/m), whose L2 norm the architecture bounds by ``l2_sensitivity``
    (documented in its module; the release clips to it and calibrates the noise to it);
    ``apply_release`` turns the released sum into the shared arrays of the model (e.g. solves
    the normal equations, shrunk with the sum's known noise: :class:`ReleasedSum`).

* **delivery** (``delivers_model``): when set, the server sends the run's final shared arrays
  to every device after the run (one message, the device replies nothing), and the device's
  ``adopt`` keeps them with its personal part in its store: a one-release model is computed on
  the server, so this is how it reaches the coach. FedAvg devices keep the model they trained.
* **the coach** (``coach_role``, ``coach_model(state)``): what the device's coach takes from
  the stored state - a readiness model (tomorrow's forecast, checked by the trust gate) or the
  7-day warning's weights.
* **planning** (``release_shape(...)``): what one run of the model shares, as the plain numbers
  the planner (``privacy.utility.assess_release``) reads: ``mechanism`` "statistics" (the
  fields of ``privacy.utility.StatisticsReleaseShape``) or "fedavg" (``FedAvgShape``). It must
  not load torch (the service plans runs).

The privacy side never sees any of this: it releases "a Gaussian mechanism over a secure sum
of vectors of L2 norm <= C" (``privacy/release.py``), with C = ``l2_sensitivity`` when the
architecture declares one, else the run's clip norm.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from restwise.common.arrays import flatten, unflatten
from restwise.common.errors import ModelError
from restwise.models.features import DailyData, Examples

FEDAVG = "fedavg"  # rounds of FedAvg of the shared arrays
ONE_RELEASE = "one-release"  # one release of bounded sufficient statistics
PROTOCOLS = (FEDAVG, ONE_RELEASE)
READINESS = "readiness"  # the coach's forecast of tomorrow's readiness
WARNING = "warning"  # the coach's 7-day warning of a low week
COACH_ROLES = (READINESS, WARNING)

# name -> "module:attribute" of its ARCHITECTURE object. One line per architecture.
ARCHITECTURES: dict[str, str] = {
    "recovery-mlp": "restwise.models.recovery_mlp:ARCHITECTURE",
    "linear-head": "restwise.models.linear_head_architecture:ARCHITECTURE",
    "early-warning": "restwise.models.warning_architecture:ARCHITECTURE",
}
DEFAULT_MODEL = "recovery-mlp"
# A device trains round r with seed + ROUND_SEED_STRIDE x r (a prime: rounds never share a seed).
ROUND_SEED_STRIDE = 7919


def round_seed(seed: int, round_: int) -> int:
    """The seed of a device's local training in federated round ``round_``."""
    return int(seed) + ROUND_SEED_STRIDE * int(round_)


@dataclass(frozen=True)
class LocalTraining:
    """What the server asks of a device's local training in one round."""

    epochs: int
    learning_rate: float
    batch_size: int
    seed: int  # this round's seed (round_seed)
    clip_norm: float | None = None  # the round's C (what the DP mod clips to), when the server names it


@dataclass(frozen=True)
class ReleasedSum:
    """What one release gave the server: the noisy sum of the surviving devices' vectors."""

    total: np.ndarray
    survivors: int  # how many devices' vectors the sum holds
    noise_std: float  # std per coordinate of all the noise in ``total`` (what a solve should expect)
    divisor: float  # the expected cohort: FedAvg's fixed denominator
    clip_norm: float | None = None  # the run's C (a loss slot is decoded with it)


@dataclass(frozen=True)
class Contribution:
    """What a device computed in one round."""

    vector: np.ndarray  # what it shares: raw (the DP mod clips and noises it, SecAgg masks it)
    loss: float  # its mean training loss (NaN when there is none); never sent on its own
    state: bytes  # its whole model afterwards (personal part included), kept in its store


@runtime_checkable
class Architecture(Protocol):
    name: str  # the registry name (RunConfig.model)
    protocol: str  # FEDAVG or ONE_RELEASE
    window: int  # days of input per example
    state_name: str  # the store slot that holds the device's model
    l2_sensitivity: float | None  # ONE_RELEASE: the bound of a contribution's L2 norm
    min_examples: int  # fewer examples: the device does not take part
    delivers_model: bool  # the server sends the final shared arrays to the devices (adopt)
    coach_role: str  # what the device's coach uses it for: READINESS (tomorrow) or WARNING (7 days)

    def feature_names(self) -> Sequence[str]: ...

    def examples(self, data: DailyData) -> Examples:
        """The person's examples (any object ``contribute`` reads; ``len()`` counts them)."""

    def model_config(self, seed: int) -> str: ...

    def initial_shared(self, model_config: str) -> list[np.ndarray]: ...

    def contribution_size(self, shared: list[np.ndarray]) -> int: ...

    def contribute(self, model_config: str, shared: list[np.ndarray], examples: Examples,
                   training: LocalTraining, state: bytes | None) -> Contribution: ...

    def apply_release(self, model_config: str, shared: list[np.ndarray],
                      released: ReleasedSum) -> list[np.ndarray]: ...

    def release_metrics(self, model_config: str, released: ReleasedSum) -> dict[str, float]:
        """What the released sum says besides the model, e.g. ``train_loss`` and
        ``train_loss_std`` (the round's mean training loss from a loss slot and its noise
        std); {} when the vector carries nothing else."""

    def adopt(self, model_config: str, shared: list[np.ndarray], state: bytes | None) -> bytes:
        """On the device: its model state holding the delivered shared arrays (its personal
        part kept); ModelError when the delivered model is not one it can use."""

    def release_shape(self, *, rounds: int, clip_norm: float, sampling_rate: float,
                      prior_path: str | None = None, target: str = "readiness") -> dict: ...

    def coach_model(self, state: bytes):
        """What the device's coach uses from a stored state: a readiness model
        (``models.coach.Forecaster`` or a recovery network) or warning weights; None when the
        state holds no usable model yet (e.g. before a release was delivered). ModelError when
        the state is unreadable."""


_loaded: dict[str, Architecture] = {}


def known_models() -> tuple[str, ...]:
    return tuple(ARCHITECTURES)


def check_architecture(arch: object, name: str) -> Architecture:
    """Refuse an object that is not a usable architecture named ``name`` (says why)."""
    if not isinstance(arch, Architecture):
        raise ModelError(f"{name!r} does not provide every attribute and method of an Architecture")
    if arch.name != name:
        raise ModelError(f"the architecture registered as {name!r} calls itself {arch.name!r}")
    if arch.protocol not in PROTOCOLS:
        raise ModelError(f"{name!r}: protocol must be one of {', '.join(PROTOCOLS)}")
    if not isinstance(arch.window, int) or arch.window < 1:
        raise ModelError(f"{name!r}: window must be a positive integer")
    if arch.coach_role not in COACH_ROLES:
        raise ModelError(f"{name!r}: coach_role must be one of {', '.join(COACH_ROLES)}")
    if not isinstance(arch.min_examples, int) or arch.min_examples < 1:
        raise ModelError(f"{name!r}: min_examples must be a positive integer")
    bound = arch.l2_sensitivity
    if arch.protocol == ONE_RELEASE and not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise ModelError(f"{name!r}: a one-release architecture must declare a positive l2_sensitivity")
    return arch


def get_architecture(name: str) -> Architecture:
    """The architecture registered as ``name``; ModelError names the known ones otherwise."""
    arch = _loaded.get(name)
    if arch is not None:
        return arch
    target = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if target is None:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(known_models())}")
    module, _, attribute = target.partition(":")
    arch = check_architecture(getattr(importlib.import_module(module), attribute), name)
    _loaded[name] = arch
    return arch


def register(arch: Architecture) -> None:
    """Register an architecture object under its name (tests, plugins)."""
    if arch.name in ARCHITECTURES:
        raise ModelError(f"a model named {arch.name!r} is already registered")
    _loaded[arch.name] = check_architecture(arch, arch.name)
    ARCHITECTURES[arch.name] = f"<registered {type(arch).__name__}>"


def unregister(name: str) -> None:
    ARCHITECTURES.pop(name, None)
    _loaded.pop(name, None)


@contextmanager
def registered(arch: Architecture) -> Iterator[Architecture]:
    """``with registered(MyArchitecture()):`` - registered for the block only."""
    register(arch)
    try:
        yield arch
    finally:
        unregister(arch.name)


def fedavg_contribution_size(shared: list[np.ndarray]) -> int:
    """A FedAvg update has one value per shared parameter."""
    return int(sum(np.asarray(a).size for a in shared))


def fedavg_apply(shared: list[np.ndarray], released_sum: np.ndarray, divisor: float) -> list[np.ndarray]:
    """FedAvg's server step: the shared arrays plus the released sum of updates divided by
    the expected cohort (a fixed denominator: one person moves the model by at most C / it)."""
    if not divisor > 0:
        raise ModelError("the FedAvg divisor (expected cohort) must be positive")
    return unflatten(flatten(shared) + np.asarray(released_sum, dtype=np.float64) / float(divisor), shared)


__all__ = [
    "FEDAVG", "ONE_RELEASE", "PROTOCOLS", "READINESS", "WARNING", "COACH_ROLES", "ARCHITECTURES", "DEFAULT_MODEL", "Architecture", "LocalTraining",
    "Contribution", "ReleasedSum", "known_models", "get_architecture", "check_architecture", "register", "unregister",
    "registered", "fedavg_apply", "fedavg_contribution_size", "round_seed", "ROUND_SEED_STRIDE",
]
