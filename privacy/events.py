"""Privacy events: immutable, versioned records of what was released and what was refused.

In the style of dp_accounting's ``dp_event``: an event is plain frozen data; the accountant
(``restwise.privacy.accountant``) interprets it, the ledger (``restwise.privacy.ledger``) stores
it, and verification re-reads it. Every event serialises to a JSON-able dict with ``kind`` and
``schema_version``; :func:`event_from_dict` reads it back and refuses unknown versions, unknown
kinds and unknown or missing fields with a precise error.

Kinds:

* ``gaussian_round`` (:class:`GaussianRoundEvent`): one release of a clipped, Gaussian-noised
  sum (one federated round). ``noise_multiplier`` is the *effective* one:
  ``noise_std_total / clip_norm``, where ``noise_std_total`` is the standard deviation of the
  total noise actually present in the released sum. With distributed noise calibrated for
  ``planned_clients`` devices of which only ``survivors`` contributed, the effective multiplier
  is smaller than planned (see :meth:`GaussianRoundEvent.from_distributed_noise`), and that is
  what is accounted.
* ``budget_refusal`` (:class:`BudgetRefusalEvent`): a round the server refused to start.
* ``audit`` (:class:`AuditEvent`): any other action worth an auditable trace (who did what).
* ``report_issued`` (:class:`ReportIssuedEvent`): the digests of a report, anchoring it in
  the ledger so any change of a report file is detected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, Mapping

from restwise.privacy.errors import EventValidationError, UnknownSchemaVersionError

EVENT_SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)

SAMPLING_METHODS = ("poisson", "fixed", "full")
ADJACENCIES = ("add_remove", "replace_one")
MECHANISMS = ("gaussian",)

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_HEX_RE = re.compile(r"^[0-9a-f]{16,128}$")
# Relative tolerance between the recorded noise multiplier and noise_std_total / clip_norm.
_NOISE_CONSISTENCY_RTOL = 1e-9


def utc_now() -> str:
    """The current time as an ISO-8601 UTC timestamp with microseconds, e.g. 2026-01-01T00:00:00.000000Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_timestamp(value: Any, name: str = "timestamp") -> str:
    if not isinstance(value, str):
        raise EventValidationError(f"{name} must be an ISO-8601 UTC string", field=name)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise EventValidationError(f"{name} is not an ISO-8601 timestamp", field=name) from None
    if parsed.tzinfo is None or parsed.utcoffset() != timezone.utc.utcoffset(None):
        raise EventValidationError(f"{name} must be in UTC (end with 'Z')", field=name)
    return value


def _check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventValidationError(f"{name} must be an integer", field=name)
    if minimum is not None and value < minimum:
        raise EventValidationError(f"{name} must be >= {minimum}, got {value}", field=name)
    if maximum is not None and value > maximum:
        raise EventValidationError(f"{name} must be <= {maximum}, got {value}", field=name)
    return value


def _check_float(
    value: Any, name: str, *, positive: bool = False, nonnegative: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventValidationError(f"{name} must be a number", field=name)
    value = float(value)
    if not math.isfinite(value):
        raise EventValidationError(f"{name} must be finite", field=name)
    if positive and value <= 0:
        raise EventValidationError(f"{name} must be > 0, got {value!r}", field=name)
    if nonnegative and value < 0:
        raise EventValidationError(f"{name} must be >= 0, got {value!r}", field=name)
    return value


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise EventValidationError(f"{name} must be one of {', '.join(choices)}", field=name)
    return value


def _check_text(value: Any, name: str, max_len: int = 200, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise EventValidationError(f"{name} must be a non-empty string of at most {max_len} characters", field=name)
    if any(ord(c) < 32 for c in value):
        raise EventValidationError(f"{name} must not contain control characters", field=name)
    return value


def _check_run_id(value: Any) -> str:
    if not isinstance(value, str) or not _RUN_ID_RE.match(value):
        raise EventValidationError(
            "run_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'", field="run_id"
        )
    return value


def _check_hex(value: Any, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not _HEX_RE.match(value):
        raise EventValidationError(f"{name} must be 16-128 lowercase hex digits", field=name)
    return value


def counted_noise_shares(survivors: int, adjacency: str) -> int:
    """How many devices' noise shares protect one person in a distributed-noise release.

    Under add/remove adjacency the neighbouring dataset lacks the person *and their device's
    noise share*, so only the other ``survivors - 1`` shares are counted (the conservative
    convention of distributed DP: a person's own noise is never relied on to protect them).
    Under replace-one the person's device takes part on both sides, so every share counts.
    """
    if adjacency == "add_remove":
        return survivors - 1
    if adjacency == "replace_one":
        return survivors
    raise ValueError(f"unknown adjacency {adjacency!r}")


@dataclass(frozen=True)
class ReleaseSpec:
    """What the accountant needs to know about one release, normalised so identical
    mechanisms compare equal: any release with sampling probability 1 is ``full``; Poisson
    releases forget their realised cohort size (it does not change the analysis)."""

    noise_multiplier: float
    sampling: str
    sampling_rate: float
    adjacency: str
    cohort_size: int | None = None
    population: int | None = None

    @classmethod
    def plan(
        cls,
        *,
        noise_multiplier: float,
        sampling: str,
        adjacency: str,
        sampling_rate: float | None = None,
        cohort_size: int | None = None,
        population: int | None = None,
    ) -> "ReleaseSpec":
        """A validated, normalised spec for planning (CLI, calibration, budget projection)."""
        z = _check_float(noise_multiplier, "noise_multiplier", positive=True)
        _check_choice(sampling, "sampling", SAMPLING_METHODS)
        _check_choice(adjacency, "adjacency", ADJACENCIES)
        if sampling == "full":
            if sampling_rate not in (None, 1, 1.0):
                raise EventValidationError("sampling_rate must be 1 for full participation", field="sampling_rate")
            return cls(z, "full", 1.0, adjacency)
        if sampling == "fixed":
            if cohort_size is None or population is None:
                raise EventValidationError(
                    "fixed-size sampling needs cohort_size and population", field="cohort_size"
                )
            m = _check_int(cohort_size, "cohort_size", 1)
            n = _check_int(population, "population", 1)
            if m > n:
                raise EventValidationError("cohort_size must be <= population", field="cohort_size")
            if sampling_rate is not None and abs(float(sampling_rate) - m / n) > 1e-12:
                raise EventValidationError(
                    "sampling_rate must equal cohort_size / population for fixed-size sampling",
                    field="sampling_rate",
                )
            if m == n:
                return cls(z, "full", 1.0, adjacency)
            return cls(z, "fixed", m / n, adjacency, m, n)
        # Poisson: a rate, or an expected cohort over a population.
        if sampling_rate is None:
            if cohort_size is None or population is None:
                raise EventValidationError(
                    "Poisson sampling needs sampling_rate, or cohort_size and population", field="sampling_rate"
                )
            m = _check_int(cohort_size, "cohort_size", 1)
            n = _check_int(population, "population", 1)
            if m > n:
                raise EventValidationError("cohort_size must be <= population", field="cohort_size")
            sampling_rate = m / n
        q = _check_float(sampling_rate, "sampling_rate", positive=True)
        if q > 1:
            raise EventValidationError("sampling_rate must be in (0, 1]", field="sampling_rate")
        if q == 1.0:
            return cls(z, "full", 1.0, adjacency)
        return cls(z, "poisson", q, adjacency)

    def with_noise_multiplier(self, noise_multiplier: float) -> "ReleaseSpec":
        return dataclasses.replace(self, noise_multiplier=float(noise_multiplier))


class _Event:
    """Shared (de)serialisation for the frozen event dataclasses below."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = getattr(self, f.name)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        event = event_from_dict(data)
        if not isinstance(event, cls):
            raise EventValidationError(f"expected a {cls.kind!r} event, got {event.kind!r}", field="kind")
        return event


@dataclass(frozen=True, kw_only=True)
class GaussianRoundEvent(_Event):
    """One release of a clipped sum with Gaussian noise (one federated round)."""

    kind: ClassVar[str] = "gaussian_round"

    run_id: str
    round: int
    noise_multiplier: float
    clip_norm: float
    sampling: str
    sampling_rate: float
    cohort_size: int
    population: int
    adjacency: str
    planned_clients: int
    survivors: int
    noise_std_total: float
    model_hash: str
    timestamp: str = field(default_factory=utc_now)
    mechanism: str = "gaussian"
    # A round re-run after a crash is a second release: it gets attempt 1, 2, ... and is
    # accounted again. (run_id, round, attempt) is the ledger's idempotency key.
    attempt: int = 0
    schema_version: int = EVENT_SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_schema(self.schema_version)
        _check_run_id(self.run_id)
        _check_int(self.round, "round", 0)
        _check_int(self.attempt, "attempt", 0)
        _check_choice(self.mechanism, "mechanism", MECHANISMS)
        _check_choice(self.sampling, "sampling", SAMPLING_METHODS)
        _check_choice(self.adjacency, "adjacency", ADJACENCIES)
        for name in ("noise_multiplier", "clip_norm", "noise_std_total"):
            object.__setattr__(self, name, _check_float(getattr(self, name), name, positive=True))
        object.__setattr__(self, "sampling_rate", _check_float(self.sampling_rate, "sampling_rate", positive=True))
        n = _check_int(self.population, "population", 1)
        m = _check_int(self.cohort_size, "cohort_size", 1, n)
        _check_int(self.planned_clients, "planned_clients", 1)
        _check_int(self.survivors, "survivors", 1, m)
        q = self.sampling_rate
        if q > 1:
            raise EventValidationError("sampling_rate must be in (0, 1]", field="sampling_rate")
        if self.sampling == "full" and (q != 1.0 or m != n):
            raise EventValidationError(
                "full participation needs sampling_rate 1 and cohort_size == population", field="sampling"
            )
        if self.sampling == "fixed" and abs(q - m / n) > 1e-12:
            raise EventValidationError(
                "sampling_rate must equal cohort_size / population for fixed-size sampling", field="sampling_rate"
            )
        effective = self.noise_std_total / self.clip_norm
        if abs(self.noise_multiplier - effective) > _NOISE_CONSISTENCY_RTOL * effective:
            raise EventValidationError(
                "noise_multiplier must be the effective one, noise_std_total / clip_norm "
                f"(= {effective:.12g}), got {self.noise_multiplier:.12g}",
                field="noise_multiplier",
            )
        _check_hex(self.model_hash, "model_hash")
        _check_timestamp(self.timestamp)

    @classmethod
    def from_distributed_noise(
        cls,
        *,
        run_id: str,
        round: int,
        clip_norm: float,
        planned_noise_multiplier: float,
        planned_clients: int,
        survivors: int,
        sampling: str,
        cohort_size: int,
        population: int,
        adjacency: str,
        model_hash: str,
        sampling_rate: float | None = None,
        timestamp: str | None = None,
        attempt: int = 0,
    ) -> "GaussianRoundEvent":
        """The event for a release whose noise was added in shares on the devices.

        Each device adds N(0, (planned_noise_multiplier * clip_norm)^2 / planned_clients)
        (``planned_clients``: the number of shares the noise was sized for). The noise that
        protects one person is the sum of the shares counted by :func:`counted_noise_shares`:
        under add/remove only the *other* survivors' shares (the person's own device is absent
        from the neighbouring dataset, so its share cannot be relied on), under replace-one all
        of them. The accounted std is ``z * C * sqrt(counted / planned_clients)``: fewer
        survivors than planned means less noise, and a larger epsilon.
        """
        z = _check_float(planned_noise_multiplier, "planned_noise_multiplier", positive=True)
        c = _check_float(clip_norm, "clip_norm", positive=True)
        p = _check_int(planned_clients, "planned_clients", 1)
        s = _check_int(survivors, "survivors", 1)
        counted = counted_noise_shares(s, adjacency)
        if counted < 1:
            raise EventValidationError(
                "a distributed-noise release needs at least 2 survivors under add/remove "
                "(the person's own share does not count)"
            )
        std = z * c * math.sqrt(counted / p)
        if sampling_rate is None:
            sampling_rate = 1.0 if sampling == "full" else cohort_size / population
        return cls(
            run_id=run_id,
            round=round,
            noise_multiplier=std / c,
            clip_norm=c,
            sampling=sampling,
            sampling_rate=sampling_rate,
            cohort_size=cohort_size,
            population=population,
            adjacency=adjacency,
            planned_clients=p,
            survivors=s,
            noise_std_total=std,
            model_hash=model_hash,
            timestamp=timestamp or utc_now(),
            attempt=attempt,
        )

    @property
    def idempotency_key(self) -> tuple[str, int, int]:
        return (self.run_id, self.round, self.attempt)

    def spec(self) -> ReleaseSpec:
        """The accounting-relevant part of this release (normalised, see ReleaseSpec)."""
        if self.sampling == "poisson":
            return ReleaseSpec.plan(
                noise_multiplier=self.noise_multiplier,
                sampling="poisson",
                sampling_rate=self.sampling_rate,
                adjacency=self.adjacency,
            )
        return ReleaseSpec.plan(
            noise_multiplier=self.noise_multiplier,
            sampling=self.sampling,
            cohort_size=self.cohort_size,
            population=self.population,
            adjacency=self.adjacency,
        )


@dataclass(frozen=True, kw_only=True)
class BudgetRefusalEvent(_Event):
    """A release the server refused because it would exceed a budget."""

    kind: ClassVar[str] = "budget_refusal"

    run_id: str
    round: int
    scope: str  # "run" or "person"
    spent_epsilon: float
    projected_epsilon: float
    budget_epsilon: float
    delta: float
    timestamp: str = field(default_factory=utc_now)
    schema_version: int = EVENT_SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_schema(self.schema_version)
        _check_run_id(self.run_id)
        _check_int(self.round, "round", 0)
        _check_choice(self.scope, "scope", ("run", "person"))
        for name in ("spent_epsilon", "projected_epsilon", "budget_epsilon"):
            object.__setattr__(self, name, _check_float(getattr(self, name), name, nonnegative=True))
        object.__setattr__(self, "delta", _check_float(self.delta, "delta", positive=True))
        _check_timestamp(self.timestamp)

    @classmethod
    def from_error(cls, error, *, run_id: str, round: int, timestamp: str | None = None) -> "BudgetRefusalEvent":
        """From a :class:`~restwise.privacy.errors.BudgetExceededError`."""
        return cls(
            run_id=run_id,
            round=round,
            scope=error.scope,
            spent_epsilon=error.spent,
            projected_epsilon=error.projected,
            budget_epsilon=error.budget_epsilon,
            delta=error.delta,
            timestamp=timestamp or utc_now(),
        )


@dataclass(frozen=True, kw_only=True)
class AuditEvent(_Event):
    """Who did what: API actions, run starts/stops, failed rounds, key rotations."""

    kind: ClassVar[str] = "audit"

    actor: str
    action: str
    target: str | None = None
    details: dict = field(default_factory=dict)
    timestamp: str = field(default_factory=utc_now)
    schema_version: int = EVENT_SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_schema(self.schema_version)
        _check_text(self.actor, "actor")
        _check_text(self.action, "action")
        _check_text(self.target, "target", 500, optional=True)
        if not isinstance(self.details, dict):
            raise EventValidationError("details must be a JSON object", field="details")
        try:
            encoded = json.dumps(self.details, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError):
            raise EventValidationError("details must be JSON-serialisable (finite numbers)", field="details") from None
        if len(encoded) > 8192:
            raise EventValidationError("details must be at most 8 KiB of JSON", field="details")
        # Freeze a private copy so later mutation by the caller cannot change the event.
        object.__setattr__(self, "details", json.loads(encoded))
        _check_timestamp(self.timestamp)

    def __hash__(self) -> int:  # details is a dict; hash the canonical JSON instead
        return hash(self.to_json())


@dataclass(frozen=True, kw_only=True)
class ReportIssuedEvent(_Event):
    """A report was issued: the SHA-256 of its files, so verify can detect any change."""

    kind: ClassVar[str] = "report_issued"

    run_id: str
    report_sha256: str
    html_sha256: str | None = None
    report_schema_version: int = 1
    timestamp: str = field(default_factory=utc_now)
    schema_version: int = EVENT_SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_schema(self.schema_version)
        _check_run_id(self.run_id)
        _check_hex(self.report_sha256, "report_sha256")
        _check_hex(self.html_sha256, "html_sha256", optional=True)
        _check_int(self.report_schema_version, "report_schema_version", 1)
        _check_timestamp(self.timestamp)


EVENT_TYPES: dict[str, type] = {
    cls.kind: cls for cls in (GaussianRoundEvent, BudgetRefusalEvent, AuditEvent, ReportIssuedEvent)
}


def _check_schema(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_SCHEMA_VERSIONS:
        raise UnknownSchemaVersionError(
            f"unknown privacy event schema_version {version!r}; this Restwise reads "
            f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}",
            found=version,
            supported=SUPPORTED_SCHEMA_VERSIONS,
        )


def event_from_dict(data: Mapping[str, Any]):
    """Read any event back from :meth:`to_dict` output, refusing anything not exactly valid."""
    if not isinstance(data, Mapping):
        raise EventValidationError("an event must be a JSON object")
    if "schema_version" not in data:
        raise EventValidationError("event has no schema_version", field="schema_version")
    _check_schema(data["schema_version"])
    kind = data.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EventValidationError(
            f"unknown event kind; expected one of {', '.join(sorted(EVENT_TYPES))}", field="kind"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    }
    given = set(data) - {"kind"}
    unknown = sorted(given - names)
    if unknown:
        raise EventValidationError(f"{kind} event has unknown field(s): {', '.join(unknown)}", field=unknown[0])
    missing = sorted(required - given)
    if missing:
        raise EventValidationError(f"{kind} event is missing field(s): {', '.join(missing)}", field=missing[0])
    return cls(**{k: data[k] for k in given})
