"""The sparse neighbour graph of SecAgg+: a random Harary graph H(k, n).

Clients are placed on a ring in a uniformly random order drawn by the server from the OS
CSPRNG; each is connected to the k/2 nearest on either side (k even), or to everyone when
k = n - 1. The graph is k-regular and symmetric.
"""

from __future__ import annotations

import secrets as _secrets

import numpy as np


def harary_neighbours(indices: list[int], k: int) -> dict[int, list[int]]:
    """Neighbours (sorted) of every index; ``indices`` are the round's client indices."""
    n = len(indices)
    if k >= n - 1:
        return {i: sorted(j for j in indices if j != i) for i in indices}
    order = list(indices)
    for pos in range(n - 1, 0, -1):  # Fisher-Yates with a CSPRNG
        swap = _secrets.randbelow(pos + 1)
        order[pos], order[swap] = order[swap], order[pos]
    ring = np.asarray(order)
    offsets = np.concatenate([np.arange(1, k // 2 + 1), -np.arange(1, k // 2 + 1)])
    positions = (np.arange(n)[:, None] + offsets[None, :]) % n
    neighbours = ring[positions]
    return {int(ring[p]): sorted(int(j) for j in neighbours[p]) for p in range(n)}
