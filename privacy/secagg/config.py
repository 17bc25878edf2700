"""``SecAggConfig``: the validated parameters of one secure-aggregation round."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import SecAggConfigError

_EXACT_FLOAT_BITS = 53  # decoded sums are float64; keep them exactly representable


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters of Restwise SecAgg+ (see docs/secure-aggregation.md).

    num_neighbours        k: each client shares its secrets with, and masks against, k
                          neighbours of a random Harary graph; k >= n-1 means complete.
    threshold             t: shares needed to reconstruct a client's secrets; a float in
                          (0, 1] is a fraction of k (rounded up), an int a count. Must be a
                          strict majority of the neighbourhood (t > k/2) and leave room for
                          the dropouts (t <= k - floor(max_dropout_fraction * k)).
    max_dropout_fraction  the largest fraction of the sampled clients that may be lost
                          over the whole round; more and the round aborts, releasing nothing.
    clip_range            the largest |value| per coordinate a device may contribute.
    frac_bits             fixed-point scale 2^frac_bits.
    ring_bits             the ring Z_{2^ring_bits}, 16..64.
    max_cohort            the largest number of clients a round may have; the encoding is
                          checked not to wrap for this many.
    timeout_s             seconds the server waits for replies in each stage.
    out_of_range          "reject": a device whose update leaves the declared range refuses
                          to contribute (and is excluded); "clip": it clips into the range.
    metric_keys           names of the wrapped app's MetricRecord "metrics" entries each device
                          contributes inside its masked vector (two extra slots per name
                          after the update: the value mapped from ``metric_range`` into the
                          encoding range, and a presence flag); the server learns only their
                          sum and count over the survivors. No metric is ever sent in the
                          clear. Default none.
    metric_range          (lo, hi): the range each metric is clipped into on the device.
    """

    num_neighbours: int = 32
    threshold: float | int = 0.6
    max_dropout_fraction: float = 0.3
    clip_range: float = 1.0
    frac_bits: int = 20
    ring_bits: int = 64
    max_cohort: int = 10_000
    timeout_s: float = 120.0
    out_of_range: str = "reject"
    metric_keys: tuple[str, ...] = field(default=())
    metric_range: tuple[float, float] = (0.0, 100.0)

    def __post_init__(self) -> None:
        def bad(msg: str) -> SecAggConfigError:
            return SecAggConfigError(f"invalid SecAggConfig: {msg}")

        if isinstance(self.num_neighbours, bool) or not isinstance(self.num_neighbours, int) or self.num_neighbours < 2:
            raise bad("num_neighbours must be an integer >= 2")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise bad("threshold must be a fraction in (0, 1] or a count >= 2")
        if isinstance(self.threshold, float) and not 0.0 < self.threshold <= 1.0:
            raise bad("a fractional threshold must be in (0, 1]")
        if isinstance(self.threshold, int) and not 2 <= self.threshold <= self.num_neighbours:
            raise bad("a threshold count must be between 2 and num_neighbours")
        if not isinstance(self.max_dropout_fraction, (int, float)) or not 0.0 <= self.max_dropout_fraction < 0.5:
            raise bad("max_dropout_fraction must be in [0, 0.5)")
        if not isinstance(self.ring_bits, int) or not 16 <= self.ring_bits <= 64:
            raise bad("ring_bits must be an integer in 16..64")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits < self.ring_bits - 1:
            raise bad("frac_bits must be an integer in 0..ring_bits-2")
        if not isinstance(self.clip_range, (int, float)) or not math.isfinite(self.clip_range) or self.clip_range <= 0:
            raise bad("clip_range must be a positive finite number")
        if not isinstance(self.max_cohort, int) or self.max_cohort < 3:
            raise bad("max_cohort must be an integer >= 3")
        if not isinstance(self.timeout_s, (int, float)) or not 0 < self.timeout_s <= 86_400:
            raise bad("timeout_s must be in (0, 86400]")
        if self.out_of_range not in ("reject", "clip"):
            raise bad('out_of_range must be "reject" or "clip"')
        if not isinstance(self.metric_keys, tuple) or not all(isinstance(k, str) and k for k in self.metric_keys):
            raise bad("metric_keys must be a tuple of names")
        if len(set(self.metric_keys)) != len(self.metric_keys):
            raise bad("metric_keys must be distinct")
        lo_hi = self.metric_range
        if (not isinstance(lo_hi, tuple) or len(lo_hi) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in lo_hi)
                or not lo_hi[0] < lo_hi[1]):
            raise bad("metric_range must be a pair (lo, hi) of finite numbers with lo < hi")
        self.check_encoding(self.clip_range)
        self.round_parameters(self.max_cohort)  # the nominal graph must be valid too
        self.round_parameters(3)

    def check_encoding(self, clip_range: float) -> None:
        """Refuse a clip range whose sum over ``max_cohort`` clients could wrap the ring or
        lose float64 exactness (a round may use its own clip range; see ``SecAggSession``)."""
        if not isinstance(clip_range, (int, float)) or not math.isfinite(clip_range) or clip_range <= 0:
            raise SecAggConfigError("invalid SecAggConfig: clip_range must be a positive finite number")
        limit = min(self.ring_bits - 1, _EXACT_FLOAT_BITS)
        if self.max_cohort * math.ceil(clip_range * self.scale) >= 1 << limit:
            raise SecAggConfigError(
                f"invalid SecAggConfig: the sum of {self.max_cohort} clients at clip_range {clip_range} with "
                f"frac_bits {self.frac_bits} needs more than {limit} bits: it would wrap in "
                f"Z_2^{self.ring_bits} or lose float64 exactness; lower frac_bits, clip_range "
                f"or max_cohort, or raise ring_bits"
            )

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    @property
    def max_abs_encoded(self) -> int:
        """The largest |encoded coordinate| one client can contribute."""
        return math.ceil(self.clip_range * self.scale)

    def round_parameters(self, n: int) -> tuple[int, int, int]:
        """(k, t, min_survivors) for a round with n clients; raises SecAggConfigError."""
        if not isinstance(n, int) or n < 3:
            raise SecAggConfigError("secure aggregation needs at least 3 clients", clients=n)
        if n > self.max_cohort:
            raise SecAggConfigError(
                f"{n} clients exceed max_cohort {self.max_cohort} (the encoding is only "
                f"checked not to wrap up to max_cohort)", clients=n
            )
        if self.num_neighbours >= n - 1:
            k = n - 1
        else:  # a Harary graph on a ring needs an even degree
            k = self.num_neighbours + (self.num_neighbours % 2)
            k = min(k, n - 1)
        if isinstance(self.threshold, float):
            t = math.ceil(self.threshold * k - 1e-9)
        else:
            t = min(self.threshold, k)
        lo = k // 2 + 1
        hi = k - math.floor(self.max_dropout_fraction * k)
        if not lo <= t <= hi:
            raise SecAggConfigError(
                f"with {n} clients (k={k} neighbours) the threshold must be in {lo}..{hi} "
                f"(a strict majority of a neighbourhood, and reachable after a "
                f"{self.max_dropout_fraction:.0%} dropout); it is {t}",
                clients=n,
            )
        min_survivors = n - math.floor(self.max_dropout_fraction * n)
        return k, t, min_survivors

    def min_survivors(self, n: int) -> int:
        """The smallest number of inputs a round over n clients can release: size each
        device's distributed-noise share for this many (fewer and the round aborts)."""
        return self.round_parameters(n)[2]
