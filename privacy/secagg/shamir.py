"""Shamir secret sharing of 32-byte secrets over GF(p), p = 2^127 - 1 (a Mersenne prime).

A 32-byte secret is split into three chunks of at most 15 bytes (< 2^120 < p), each shared
with its own random polynomial of degree t-1; a share is the three evaluations, 16 bytes
each, big-endian (48 bytes). Evaluation points are the receivers' protocol indices (1..n),
never 0. Coefficients come from ``secrets`` (the OS CSPRNG).

The field elements are 127-bit, beyond NumPy's integer types, so arithmetic uses Python
integers; the work per client is k shares x 3 chunks x t coefficients (Horner) and per
reconstruction t modular inverses, which is small next to the mask expansion that is
vectorised.
"""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Sequence

from .errors import ShareError

PRIME = (1 << 127) - 1
SECRET_BYTES = 32
_CHUNKS = (15, 15, 2)  # byte lengths of the chunks of a 32-byte secret
ELEMENT_BYTES = 16
SHARE_BYTES = ELEMENT_BYTES * len(_CHUNKS)


def _chunks(secret: bytes) -> list[int]:
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"a secret to share must be {SECRET_BYTES} bytes")
    out, pos = [], 0
    for size in _CHUNKS:
        out.append(int.from_bytes(secret[pos : pos + size], "big"))
        pos += size
    return out


def split(secret: bytes, xs: Sequence[int], threshold: int) -> list[bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, 1 <= x < p); any ``threshold``
    of them reconstruct it, fewer reveal nothing."""
    if not 1 <= threshold <= len(xs):
        raise ShareError("threshold must be between 1 and the number of shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShareError("share points must be distinct and in 1..p-1")
    polys = [[c] + [_secrets.randbelow(PRIME) for _ in range(threshold - 1)] for c in _chunks(secret)]
    shares = []
    for x in xs:
        parts = []
        for coeffs in polys:
            acc = 0
            for c in reversed(coeffs):  # Horner
                acc = (acc * x + c) % PRIME
            parts.append(acc.to_bytes(ELEMENT_BYTES, "big"))
        shares.append(b"".join(parts))
    return shares


def parse_share(share: bytes) -> list[int]:
    """Field elements of one share; raises ShareError if malformed."""
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        raise ShareError("a share has the wrong length")
    values = [
        int.from_bytes(share[i : i + ELEMENT_BYTES], "big")
        for i in range(0, SHARE_BYTES, ELEMENT_BYTES)
    ]
    if any(v >= PRIME for v in values):
        raise ShareError("a share holds a value outside the field")
    return values


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients l_j with f(0) = sum_j l_j f(x_j) (mod p)."""
    nums, dens = [], []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        nums.append(num)
        dens.append(den)
    # batch inversion: one modular inverse for all denominators
    prefix = [1] * (len(dens) + 1)
    for j, den in enumerate(dens):
        prefix[j + 1] = prefix[j] * den % PRIME
    inv = pow(prefix[-1], -1, PRIME)
    coeffs = [0] * len(dens)
    for j in range(len(dens) - 1, -1, -1):
        coeffs[j] = nums[j] * (inv * prefix[j] % PRIME) % PRIME
        inv = inv * dens[j] % PRIME
    return coeffs


def reconstruct(xs: Sequence[int], shares: Sequence[bytes]) -> bytes:
    """The secret from shares at distinct points ``xs`` (at least the threshold many).

    With fewer than the threshold the result is a random-looking wrong value: callers
    verify it (public key or commitment), see protocol.py."""
    if len(xs) != len(shares) or not xs:
        raise ShareError("need as many share points as shares, at least one")
    if len(set(xs)) != len(xs):
        raise ShareError("share points must be distinct")
    values = [parse_share(s) for s in shares]
    lag = lagrange_at_zero(xs)
    out = []
    for chunk, size in enumerate(_CHUNKS):
        v = sum(l * vals[chunk] for l, vals in zip(lag, values)) % PRIME
        if v >= 1 << (8 * size):
            raise ShareError("shares do not reconstruct a valid secret")
        out.append(v.to_bytes(size, "big"))
    return b"".join(out)
