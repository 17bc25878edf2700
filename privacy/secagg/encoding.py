"""Fixed-point encoding of a clipped update into the ring Z_{2^ring_bits}.

A coordinate x with |x| <= clip_range encodes as q = round(x * 2^frac_bits), an integer with
|q| <= Q = ceil(clip_range * 2^frac_bits), stored in two's complement mod 2^ring_bits. The
sum of n such vectors has |sum q| <= n * Q; it decodes without ambiguity iff
n * Q < 2^(ring_bits - 1). ``SecAggConfig`` refuses parameters where this fails for its
``max_cohort``, so the ring never wraps silently. Rounding error per coordinate of the sum
is at most n / 2^(frac_bits + 1).

Values outside [-clip_range, clip_range], NaN and inf are refused on the device before any
masking (``InputRefusedError``), or clipped into the range when the config asks for that.
"""

from __future__ import annotations

import numpy as np

from .errors import InputRefusedError


def ring_mask(ring_bits: int) -> np.uint64:
    return np.uint64((1 << ring_bits) - 1) if ring_bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)


def encode(
    vector: np.ndarray, *, clip_range: float, frac_bits: int, ring_bits: int, clip: bool = False
) -> np.ndarray:
    """uint64 ring elements for a 1-D float vector; refuses non-finite or out-of-range
    values (or clips them into the range when ``clip``)."""
    x = np.asarray(vector)
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise InputRefusedError("the update must be a 1-D numeric vector", code="bad-shape")
    x = x.astype(np.float64, copy=False)
    if not np.all(np.isfinite(x)):
        raise InputRefusedError("the update contains NaN or infinite values", code="non-finite")
    if clip:
        x = np.clip(x, -clip_range, clip_range)
    elif np.any(np.abs(x) > clip_range):
        raise InputRefusedError("the update has values outside the declared range", code="out-of-range")
    q = np.rint(x * float(1 << frac_bits)).astype(np.int64)
    return q.view(np.uint64) & ring_mask(ring_bits)


def decode_sum(total: np.ndarray, *, frac_bits: int, ring_bits: int) -> np.ndarray:
    """float64 values of a ring-valued sum (two's complement, then / 2^frac_bits)."""
    t = np.asarray(total, dtype=np.uint64) & ring_mask(ring_bits)
    if ring_bits < 64:
        signed = t.astype(np.int64)
        signed = np.where(signed >= (1 << (ring_bits - 1)), signed - (1 << ring_bits), signed)
    else:
        signed = t.view(np.int64)
    return signed.astype(np.float64) / float(1 << frac_bits)
