"""Differential privacy on the device: clip the update, add this device's share of the noise.

A Flower ClientApp mod (``dp_mod``) placed *inside* the secure-aggregation mod::

    ClientApp(mods=[egress_guard, secagg_mod, dp_mod])   # outermost first

The wrapped (privacy-unaware) train function replies with the raw update - ArrayRecord
``"update"`` holding one 1-D float array ``"vector"`` (the change of the shared model
parameters, flattened). The mod turns it into what the secure-aggregation mod expects: the
same record, clipped and noised. Parameters arrive from the server in ConfigRecord
``"restwise.dp"`` of the train message (:class:`DPRoundParams`).

Clipping (on the device, always): a vector with any NaN or inf is *refused* (the device sends
an error, never a substitute); otherwise it is scaled to L2 norm at most C. Clipping happens
before secure aggregation, so the server cannot see or undo it; the secure-aggregation
encoding additionally bounds every coordinate (``SecAggConfig.clip_range``), so no device can
shift the aggregate by more than its clipped contribution plus its noise share.

Noise placement (``DPRoundParams.placement``):

* ``"distributed"`` - each of the round's sampled devices adds N(0, (z C)^2 / d) to every
  coordinate, where d (``noise_divisor``) is the number of shares that protect one person at
  the minimum surviving cohort t_min the server guarantees (a round with fewer survivors
  aborts: the secure-aggregation threshold): d = t_min - 1 under add/remove adjacency (a
  person's own share is never counted), t_min under replace-one. A released sum of m >= t_min
  survivors carries, for any one person, noise of std z C sqrt(m' / d) >= z C (m' = m - 1 or
  m), and the round is accounted with that *actual* std. Protects against an honest-but-curious server (and anyone who obtains the
  aggregate): even the server only ever sees a noised sum. Relies on at least t_min devices
  being honest (a device that skips its share weakens the noise by that share).
* ``"central"`` - devices add no noise; the server adds N(0, (z C)^2) to the unmasked
  aggregate (:func:`add_central_noise`). Protects the released model (and everyone who reads
  it) but trusts the server: the server sees the noise-free sum (with secure aggregation) or
  every clipped update (without it).

The noise is drawn from NumPy's PCG64 seeded with 128 bits from ``secrets`` per round.
Floating-point Gaussian sampling is not an exact discrete mechanism (Mironov 2012); the
secure-aggregation fixed-point encoding rounds the noised values to 2^-frac_bits.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from restwise.privacy.accountant import MIN_NOISE_MULTIPLIER
from restwise.privacy.errors import DPError, NonFiniteUpdateError, UnsafeParametersError
from restwise.privacy.secagg import records as SR
from restwise.privacy.wire import DP_RECORD, ERROR_CODE_BAD_PARAMS, ERROR_CODE_NO_UPDATE, ERROR_CODE_NON_FINITE

_log = logging.getLogger(__name__)

PLACEMENTS = ("distributed", "central")


@dataclass(frozen=True)
class DPRoundParams:
    """One round's DP parameters, as the server sends them."""

    clip_norm: float
    noise_multiplier: float
    placement: str
    noise_divisor: int  # t_min: the noise share is (z C)^2 / t_min; 1 for central

    def __post_init__(self) -> None:
        if not (isinstance(self.clip_norm, (int, float)) and math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise UnsafeParametersError("clip_norm must be a positive finite number")
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)):
            raise UnsafeParametersError("noise_multiplier must be a finite number")
        if self.placement not in PLACEMENTS:
            raise UnsafeParametersError(f"placement must be one of {', '.join(PLACEMENTS)}")
        if self.placement == "distributed" and self.noise_multiplier < MIN_NOISE_MULTIPLIER:
            raise UnsafeParametersError(
                f"a distributed-noise round needs noise_multiplier >= {MIN_NOISE_MULTIPLIER}"
            )
        if isinstance(self.noise_divisor, bool) or not isinstance(self.noise_divisor, int) or self.noise_divisor < 1:
            raise UnsafeParametersError("noise_divisor must be a positive integer")

    @property
    def share_std(self) -> float:
        """Standard deviation of this device's noise per coordinate."""
        if self.placement == "central":
            return 0.0
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.noise_divisor)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "clip_norm": float(self.clip_norm),
                "noise_multiplier": float(self.noise_multiplier),
                "placement": self.placement,
                "noise_divisor": int(self.noise_divisor),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "DPRoundParams":
        try:
            return cls(
                clip_norm=float(record["clip_norm"]),
                noise_multiplier=float(record["noise_multiplier"]),
                placement=str(record["placement"]),
                noise_divisor=int(record["noise_divisor"]),
            )
        except (KeyError, TypeError, ValueError):
            raise UnsafeParametersError("the round's DP parameters are incomplete") from None


def total_noise_std(noise_multiplier: float, clip_norm: float, survivors: int, noise_divisor: int) -> float:
    """Std of the noise in a distributed-noise sum of ``survivors`` counted shares, each sized
    for ``noise_divisor``: z C sqrt(m / divisor). (Which shares count for one person is
    :func:`restwise.privacy.events.counted_noise_shares`.)"""
    return noise_multiplier * clip_norm * math.sqrt(survivors / noise_divisor)


def clip_update(vector: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """(vector scaled to L2 norm <= clip_norm, its original norm) as float64.
    Raises NonFiniteUpdateError on any NaN or inf (and on a norm that overflows)."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise NonFiniteUpdateError("the update contains NaN or inf")
    # Scale first so the norm of a huge-but-finite vector cannot overflow to inf.
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    if peak == 0.0:
        return v.copy(), 0.0
    u = v / peak
    # einsum, not np.linalg.norm: the BLAS dot behind norm wakes its thread pool for a few
    # thousand values (milliseconds of CPU per call on a busy machine, measured).
    norm = peak * math.sqrt(float(np.einsum("i,i->", u, u)))
    if not math.isfinite(norm):
        raise NonFiniteUpdateError("the update norm is not finite")
    factor = min(1.0, clip_norm / norm)
    return v * factor, norm


def noise_rng() -> np.random.Generator:
    """A fresh generator with 128 bits of OS entropy (never a server-chosen seed)."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def privatize(vector: np.ndarray, params: DPRoundParams, rng: np.random.Generator | None = None) -> np.ndarray:
    """Clip, then add this device's noise share (distributed) or nothing (central)."""
    clipped, _ = clip_update(vector, params.clip_norm)
    std = params.share_std
    if std > 0:
        clipped = clipped + (rng or noise_rng()).normal(0.0, std, size=clipped.shape)
    return clipped


def add_central_noise(
    total: np.ndarray, noise_multiplier: float, clip_norm: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The server-trusted alternative: N(0, (z C)^2) added by the server to the sum."""
    total = np.asarray(total, dtype=np.float64)
    return total + (rng or noise_rng()).normal(0.0, noise_multiplier * clip_norm, size=total.shape)


def _secagg_min_survivors(context: Context) -> int | None:
    state = context.state.config_records.get(SR.CLIENT_STATE)
    if state is None or "min_survivors" not in state:
        return None
    try:
        return int(state["min_survivors"])
    except (TypeError, ValueError):
        return None


def make_dp_mod(
    rng_factory: Callable[[], np.random.Generator] = noise_rng,
) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """The DP mod. ``rng_factory`` exists for tests; devices use OS entropy."""

    def dp_mod(msg: Message, context: Context, call_next) -> Message:
        if msg.has_error() or msg.metadata.message_type != SR.MESSAGE_TYPE:
            return call_next(msg, context)
        record = msg.content.config_records.get(DP_RECORD)
        if record is None:
            # A train message without DP parameters is not a Restwise DP round: refuse rather
            # than send an unclipped update.
            return Message(Error(code=ERROR_CODE_BAD_PARAMS, reason="no DP parameters in the train message"), reply_to=msg)
        try:
            params = DPRoundParams.from_record(record)
            guaranteed = _secagg_min_survivors(context)
            if params.placement == "distributed" and guaranteed is not None and params.noise_divisor > guaranteed:
                # The server claims a larger minimum cohort than the secure-aggregation round
                # enforces: the noise would be too small for the smallest releasable cohort.
                raise UnsafeParametersError("noise_divisor exceeds the round's guaranteed minimum survivors")
        except UnsafeParametersError as exc:
            _log.warning("DP mod refused the round: %s", exc)
            return Message(Error(code=ERROR_CODE_BAD_PARAMS, reason=str(exc)), reply_to=msg)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        arrays = reply.content.array_records.get(SR.INNER_UPDATE)
        if arrays is None or SR.INNER_VECTOR not in arrays:
            return Message(Error(code=ERROR_CODE_NO_UPDATE, reason="the device app returned no update"), reply_to=msg)
        try:
            private = privatize(arrays[SR.INNER_VECTOR].numpy(), params, rng_factory())
        except NonFiniteUpdateError as exc:
            _log.warning("DP mod refused a non-finite update")
            return Message(Error(code=ERROR_CODE_NON_FINITE, reason=str(exc)), reply_to=msg)
        content = RecordDict({SR.INNER_UPDATE: ArrayRecord({SR.INNER_VECTOR: Array(private)})})
        metrics = reply.content.metric_records.get(SR.INNER_METRICS)
        if metrics is not None:
            content[SR.INNER_METRICS] = metrics
        return Message(content, reply_to=msg)

    return dp_mod


dp_mod = make_dp_mod()

__all__ = [
    "DPRoundParams", "DPError", "NonFiniteUpdateError", "UnsafeParametersError", "clip_update",
    "privatize", "add_central_noise", "total_noise_std", "noise_rng", "make_dp_mod", "dp_mod",
]
