"""The one layout of a model's arrays as an update vector: every array in list order, each
flattened in C order, as float64. The device's update, the secure sum, the server's release
and the in-process evaluation all use these two functions."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """All of ``arrays`` as one float64 vector (an empty list gives an empty vector)."""
    if not len(arrays):
        return np.zeros(0)
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


def unflatten(vector: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``vector`` cut into arrays with the shapes and dtypes of ``like``; refuses a vector of
    another length."""
    vector = np.asarray(vector)
    out, pos = [], 0
    for template in like:
        template = np.asarray(template)
        out.append(vector[pos : pos + template.size].reshape(template.shape).astype(template.dtype))
        pos += template.size
    if pos != vector.size:
        raise ValueError(f"the vector has {vector.size} values, the arrays hold {pos}")
    return out


def arrays_sha256(arrays: Sequence[np.ndarray]) -> str:
    """The hash that names a model's shared arrays wherever they are released, checkpointed or
    delivered: SHA-256 of every array as float32 (what the wire carries), in order."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


__all__ = ["flatten", "unflatten", "arrays_sha256"]
