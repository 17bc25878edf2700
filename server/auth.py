"""API tokens, roles, dashboard sessions and the service's audit trail.

A token is ``rw_<id>_<secret>``: ``id`` (16 hex chars) is public and finds the row; ``secret``
is 256 random bits. Only SHA-256(secret) is stored (a slow KDF adds nothing for a 256-bit
random secret), compared with ``hmac.compare_digest``. A token is shown once, at creation
(``restwise server token create``), and can be revoked; a revoked token and every dashboard
session opened with it stop working at once.

Roles:
    operator   read everything; create, start and stop runs
    auditor    read runs, rounds, ledgers, reports and the audit log; download the
               verification bundle; change nothing

Every request that changes state is recorded by ``AuditTrail`` with the actor's token id and
role (never the token), in the database and in the service's signed, hash-chained audit
ledger (``restwise.privacy.ledger``; the key is created on first use, 0600). There is no
service without that ledger.

Denied attempts are recorded too (``auth.denied``, outcome ``denied``): a 403 with the
token's id and role; a 401 with the token's id when the presented token names an existing
token (wrong secret, revoked), and otherwise with a stable label that cannot be turned back
into what was presented: ``anon-<16 hex>`` (a header) or ``cookie-<16 hex>`` (a session
cookie), an HMAC-SHA256 under a key derived (HKDF) from the audit signing key, so the same
junk gets the same label across restarts; ``anonymous`` when nothing was presented.

Rate limit (``AuditRateLimit``): one token bucket per key - ``write:<token id>`` (every
request that changes state, and dashboard sign-in/out: checked *before* the change, so a
request refused by the limit changes nothing and is answered 429), ``denied:<token id>``
(401s naming an existing token, and 403s) and ``denied:unauthenticated`` (every other 401,
one bucket for all labels, so varying the junk does not buy more entries). A bucket holds
``burst`` writes and refills at ``per_minute``. What the limit keeps out is counted, never
dropped: the next entry written for that key is preceded by one ``audit.coalesced`` entry
(``attempts`` = how many, by action, route and reason, first and last time), and a read of
the audit log or the service's shutdown writes any that are still held. So one key adds at
most ``2 x (burst + per_minute x minutes)`` entries, however many requests it sends; the
number of keys is bounded by the number of tokens (plus one).
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from restwise.privacy.events import AuditEvent
from restwise.privacy.ledger import PrivacyLedger, load_or_create_audit_key, public_key_pem
from restwise.server import db as dbm
from restwise.server.errors import TokenError

SESSION_COOKIE = "restwise_session"  # the dashboard's session cookie (see server/dashboard.py)
TOKEN_RE = re.compile(r"^rw_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
SESSION_LIFETIME = _dt.timedelta(hours=12)


class Role(str, enum.Enum):
    operator = "operator"
    auditor = "auditor"
    # The server's own command line (token management). Never a token's role: it only names
    # the actor of `restwise server token ...` in the audit trail.
    admin = "admin"
    # Whoever presented no valid credentials: the actor of a denied 401 in the audit trail.
    unauthenticated = "unauthenticated"


TOKEN_ROLES = (Role.operator, Role.auditor)


@dataclass(frozen=True)
class Principal:
    """Who is making a request: the token's public id, its name and role. Never the secret."""

    token_id: str
    name: str
    role: Role


@dataclass(frozen=True)
class AuthCheck:
    """The answer to presented credentials: the principal, or ``reason`` why not and, when the
    credentials name an existing token, that token's (public) id. Never the secret."""

    principal: Principal | None
    known_token_id: str | None = None
    reason: str | None = None


# Why a request was denied (the audit entry's ``reason``): a fixed vocabulary, so the
# coalesced counts stay small.
NO_CREDENTIALS = "no credentials"
NOT_BEARER = "not a bearer token"
MALFORMED = "malformed token"
UNKNOWN_TOKEN = "unknown token id"
WRONG_SECRET = "wrong secret"
REVOKED = "revoked token"
BAD_SESSION = "unknown or expired session"
COOKIE_WRITE = "a session cookie cannot authorize a change"
NEEDS_OPERATOR = "needs the operator role"
RATE_LIMITED = "rate limited"


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    role: Role
    created_at: str
    revoked_at: str | None
    last_used_at: str | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


# A fixed digest to compare against when the id is unknown, so the time taken does not tell
# whether a token id exists.
_DUMMY_DIGEST = _digest("x" * 43)


class TokenStore:
    def __init__(self, database: dbm.Database):
        self.db = database

    def create(self, role: Role | str, name: str) -> tuple[TokenInfo, str]:
        """Create a token; return its info and the plaintext (show it once, never store it)."""
        role = Role(role)
        if role not in TOKEN_ROLES:
            raise ValueError("a token's role is operator or auditor")
        name = name.strip()
        if not (1 <= len(name) <= 100) or not name.isprintable():
            raise TokenError("a token name must be 1-100 printable characters")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)  # 32 bytes = 256 bits -> 43 url-safe characters
        now = dbm.utcnow()
        with self.db.engine.begin() as conn:
            conn.execute(
                dbm.tokens.insert().values(
                    id=token_id, name=name, role=role.value, token_hash=_digest(secret), created_at=now
                )
            )
        info = TokenInfo(token_id, name, role, now, None, None)
        return info, f"rw_{token_id}_{secret}"

    def list(self) -> list[TokenInfo]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(sa.select(dbm.tokens).order_by(dbm.tokens.c.created_at)).mappings().all()
        return [
            TokenInfo(r["id"], r["name"], Role(r["role"]), r["created_at"], r["revoked_at"], r["last_used_at"])
            for r in rows
        ]

    def get(self, token_id: str) -> TokenInfo | None:
        return next((t for t in self.list() if t.id == token_id), None)

    def revoke(self, token_id: str) -> TokenInfo:
        with self.db.engine.begin() as conn:
            row = conn.execute(sa.select(dbm.tokens).where(dbm.tokens.c.id == token_id)).mappings().first()
            if row is None:
                raise TokenError(f"no token with id {token_id!r}")
            if row["revoked_at"] is None:
                conn.execute(dbm.tokens.update().where(dbm.tokens.c.id == token_id).values(revoked_at=dbm.utcnow()))
            conn.execute(dbm.sessions.delete().where(dbm.sessions.c.token_id == token_id))
        info = self.get(token_id)
        assert info is not None
        return info

    def authenticate(self, token: str) -> Principal | None:
        """The principal for a presented token, or None (malformed, unknown, wrong or revoked)."""
        return self.check(token).principal

    def check(self, token: str) -> AuthCheck:
        """Like :meth:`authenticate`, and says why not (for the audit trail; the client gets
        the same 401 whatever the reason)."""
        match = TOKEN_RE.match(token or "")
        if match is None:
            return AuthCheck(None, None, MALFORMED)
        token_id, secret = match.groups()
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(dbm.tokens).where(dbm.tokens.c.id == token_id)).mappings().first()
        stored = row["token_hash"] if row is not None else _DUMMY_DIGEST
        ok = hmac.compare_digest(stored, _digest(secret))
        if row is None:
            return AuthCheck(None, None, UNKNOWN_TOKEN)
        if not ok:
            return AuthCheck(None, token_id, WRONG_SECRET)
        if row["revoked_at"] is not None:
            return AuthCheck(None, token_id, REVOKED)
        self._touch(token_id, row["last_used_at"])
        return AuthCheck(Principal(token_id, row["name"], Role(row["role"])), token_id)

    def _touch(self, token_id: str, last: str | None) -> None:
        now = _dt.datetime.now(_dt.timezone.utc)
        # At most one write a minute per token: reads must not turn into a write each.
        if last is not None and last > (now - _dt.timedelta(minutes=1)).isoformat(timespec="milliseconds"):
            return
        try:
            with self.db.engine.begin() as conn:
                conn.execute(dbm.tokens.update().where(dbm.tokens.c.id == token_id).values(last_used_at=dbm.utcnow()))
        except sa.exc.OperationalError:  # a busy database must not fail a read request
            pass

    # -- dashboard sessions: a random id in an HttpOnly cookie, stored hashed ------------
    def open_session(self, principal: Principal) -> str:
        session_id = secrets.token_urlsafe(32)
        now = _dt.datetime.now(_dt.timezone.utc)
        with self.db.engine.begin() as conn:
            conn.execute(
                dbm.sessions.insert().values(
                    session_hash=_digest(session_id),
                    token_id=principal.token_id,
                    created_at=now.isoformat(timespec="milliseconds"),
                    expires_at=(now + SESSION_LIFETIME).isoformat(timespec="milliseconds"),
                )
            )
        return session_id

    def session_principal(self, session_id: str) -> Principal | None:
        return self.session_check(session_id).principal

    def session_check(self, session_id: str) -> AuthCheck:
        """The principal of a dashboard session, or why not (a session that exists names its
        token: an expired session or a revoked token is recorded with that token's id)."""
        if not session_id or len(session_id) > 64 or not re.fullmatch(r"[A-Za-z0-9_-]+", session_id):
            return AuthCheck(None, None, BAD_SESSION)
        now = dbm.utcnow()
        with self.db.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(dbm.tokens.c.id, dbm.tokens.c.name, dbm.tokens.c.role, dbm.tokens.c.revoked_at, dbm.sessions.c.expires_at)
                    .select_from(dbm.sessions.join(dbm.tokens, dbm.sessions.c.token_id == dbm.tokens.c.id))
                    .where(dbm.sessions.c.session_hash == _digest(session_id))
                )
                .mappings()
                .first()
            )
        if row is None:
            return AuthCheck(None, None, BAD_SESSION)
        if row["revoked_at"] is not None:
            return AuthCheck(None, row["id"], REVOKED)
        if row["expires_at"] <= now:
            return AuthCheck(None, row["id"], BAD_SESSION)
        return AuthCheck(Principal(row["id"], row["name"], Role(row["role"])), row["id"])

    def close_session(self, session_id: str) -> None:
        if not session_id or len(session_id) > 64:
            return
        with self.db.engine.begin() as conn:
            conn.execute(dbm.sessions.delete().where(dbm.sessions.c.session_hash == _digest(session_id)))


SYSTEM_PRINCIPAL = Principal("cli", "server command line", Role.admin)
ANONYMOUS = Principal("anonymous", "", Role.unauthenticated)  # nothing was presented
UNAUTHENTICATED = Principal("unauthenticated", "", Role.unauthenticated)  # the shared bucket's actor
UNAUTHENTICATED_KEY = "denied:unauthenticated"
AUDIT_BURST = 30
AUDIT_PER_MINUTE = 30.0
LABEL_INFO = b"restwise service: labels of denied credentials v1"
# Server-side details of a run's configuration that no token holder sees (the service's own
# file paths); the runner reads them from config.json.
SERVER_ONLY_CONFIG_KEYS = ("audit_key_path",)


def public_run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's configuration as operators and auditors may see it: without server paths."""
    return {k: v for k, v in config.items() if k not in SERVER_ONLY_CONFIG_KEYS}


class AuditRateLimit:
    """A token bucket per key: at most ``burst`` writes at once, refilled at ``per_minute``.
    ``clock`` (seconds, monotonic) is injectable for tests."""

    def __init__(self, burst: int = AUDIT_BURST, per_minute: float = AUDIT_PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic):
        if not (isinstance(burst, int) and burst >= 1):
            raise ValueError("the audit burst must be a whole number of at least 1")
        if not (per_minute > 0 and math.isfinite(per_minute)):
            raise ValueError("the audit rate must be a positive number of writes per minute")
        self.burst, self.per_minute, self.clock = burst, float(per_minute), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (writes left, at)

    def _level(self, key: str) -> tuple[float, float]:
        now = self.clock()
        left, at = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), left + max(0.0, now - at) * self.per_minute / 60.0), now

    def take(self, key: str) -> bool:
        """Use one write of ``key``'s bucket; False (and nothing used) when it is empty."""
        left, now = self._level(key)
        if left >= 1.0:
            self._buckets[key] = (left - 1.0, now)
            return True
        self._buckets[key] = (left, now)
        return False

    def wait_s(self, key: str) -> float:
        """Seconds until ``key``'s bucket holds one write again (0 when it does)."""
        left, _ = self._level(key)
        return 0.0 if left >= 1.0 else (1.0 - left) * 60.0 / self.per_minute


@dataclass
class _Held:
    """The requests of one key the rate limit kept out of the log, until they are written as
    one ``audit.coalesced`` entry."""

    actor: Principal
    attempts: int = 0
    first_at: str | None = None
    last_at: str | None = None
    by_action: Counter = field(default_factory=Counter)
    by_route: Counter = field(default_factory=Counter)
    by_reason: Counter = field(default_factory=Counter)


class AuditTrail:
    """The service's own audit log: who changed what, when, and whether it was allowed; and
    who was denied (see the module docstring for labels and the rate limit).

    Written to the database (for listing) and appended to the signed hash-chained ledger
    (``restwise.privacy.ledger.PrivacyLedger``), whose file an auditor can verify without
    trusting this database.
    """

    def __init__(self, database: dbm.Database, ledger: PrivacyLedger, limit: AuditRateLimit | None = None):
        self.db = database
        self.ledger = ledger
        self.limit = limit or AuditRateLimit()
        self._lock = threading.RLock()
        self._held: dict[str, _Held] = {}
        key = ledger.signing_key
        if key is not None:
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
            self._label_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LABEL_INFO).derive(raw)
        else:  # an unsigned ledger (tests): labels are stable for this process only
            self._label_key = secrets.token_bytes(32)

    def label(self, presented: str, kind: str = "anon") -> str:
        """A stable label for credentials that name no token: ``<kind>-<16 hex>``. It cannot
        be turned back into what was presented (an HMAC under a key only the service holds)."""
        digest = hmac.new(self._label_key, presented.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return f"{kind}-{digest.hexdigest()[:16]}"

    # -- writing ------------------------------------------------------------------------
    def record(
        self,
        actor: Principal,
        action: str,
        target: str | None,
        outcome: str,
        detail: dict[str, Any] | None = None,
        *,
        attempts: int = 1,
    ) -> None:
        """Write one entry (ledger, then database). Not rate-limited: the server's command
        line, and requests already admitted by :meth:`admit`."""
        at = dbm.utcnow()
        with self._lock:
            self.ledger.append(
                AuditEvent(
                    actor=f"{actor.role.value}:{actor.token_id}",
                    action=action,
                    target=target,
                    details={"outcome": outcome, **(detail or {})},
                )
            )
            with self.db.engine.begin() as conn:
                conn.execute(
                    dbm.audit_log.insert().values(
                        at=at,
                        actor_token_id=actor.token_id,
                        actor_role=actor.role.value,
                        action=action,
                        target=target,
                        outcome=outcome,
                        detail_json=json.dumps(detail or {}, sort_keys=True),
                        attempts=attempts,
                    )
                )

    def admit(self, who: Principal, route: str) -> bool:
        """Before a request that changes state (and is then recorded): take one write from
        the token's ``write:`` bucket. False: refuse the request (429) - it is counted into
        the token's next coalesced entry, nothing else happens."""
        key = f"write:{who.token_id}"
        with self._lock:
            if self.limit.take(key):
                self._write_held(key)
                return True
            self._hold(key, who, route, route, RATE_LIMITED)
            return False

    def retry_after_s(self, who: Principal) -> int:
        return max(1, math.ceil(self.limit.wait_s(f"write:{who.token_id}")))

    def deny(
        self,
        check: AuthCheck | None,
        *,
        route: str,
        target: str | None = None,
        presented: str | None = None,
        kind: str = "anon",
        reason: str | None = None,
    ) -> None:
        """Record a 401: with the token id when the credentials name an existing token, else
        with the label of what was presented, else as ``anonymous``."""
        reason = reason or (check.reason if check is not None else None) or NO_CREDENTIALS
        if check is not None and check.known_token_id is not None:
            actor, key = Principal(check.known_token_id, "", Role.unauthenticated), f"denied:{check.known_token_id}"
        elif presented:
            actor, key = Principal(self.label(presented, kind), "", Role.unauthenticated), UNAUTHENTICATED_KEY
        else:
            actor, key = ANONYMOUS, UNAUTHENTICATED_KEY
        self._denied(key, actor, route, target, 401, reason)

    def forbid(self, who: Principal, *, route: str, target: str | None = None, reason: str = NEEDS_OPERATOR) -> None:
        """Record a 403 (an authenticated token without the role the route needs)."""
        self._denied(f"denied:{who.token_id}", who, route, target, 403, reason)

    def _denied(self, key: str, actor: Principal, route: str, target: str | None, status: int, reason: str) -> None:
        with self._lock:
            if self.limit.take(key):
                self._write_held(key)
                self.record(actor, "auth.denied", target, "denied", {"status": status, "reason": reason, "route": route})
            else:
                self._hold(key, actor, "auth.denied", route, reason)

    def _hold(self, key: str, actor: Principal, action: str, route: str, reason: str) -> None:
        now = dbm.utcnow()
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Held(UNAUTHENTICATED if key == UNAUTHENTICATED_KEY else actor, first_at=now)
        held.attempts += 1
        held.last_at = now
        held.by_action[action] += 1
        held.by_route[route] += 1
        held.by_reason[reason] += 1

    def _write_held(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        self.record(
            held.actor, "audit.coalesced", None, "coalesced",
            {
                "attempts": held.attempts, "first_at": held.first_at, "last_at": held.last_at,
                "by_action": dict(held.by_action), "by_route": dict(held.by_route), "by_reason": dict(held.by_reason),
                "rate_limit": {"burst": self.limit.burst, "per_minute": self.limit.per_minute},
            },
            attempts=held.attempts,
        )

    def flush(self, *, force: bool = False) -> int:
        """Write the coalesced entries still held: each when its key's bucket has a write
        left, or all of them with ``force`` (at shutdown). Returns how many were written."""
        written = 0
        with self._lock:
            for key in list(self._held):
                if force or self.limit.take(key):
                    self._write_held(key)
                    written += 1
        return written

    def held_attempts(self) -> int:
        """Requests counted but not written yet (they will be, as coalesced entries)."""
        with self._lock:
            return sum(h.attempts for h in self._held.values())

    # -- reading ------------------------------------------------------------------------
    def entries(
        self, limit: int = 200, offset: int = 0, *, action: str | None = None, outcome: str | None = None
    ) -> list[dict[str, Any]]:
        q = sa.select(dbm.audit_log).order_by(dbm.audit_log.c.seq.desc()).limit(limit).offset(offset)
        if action is not None:
            q = q.where(dbm.audit_log.c.action == action)
        if outcome is not None:
            q = q.where(dbm.audit_log.c.outcome == outcome)
        with self.db.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        out = []
        for r in rows:
            item = dict(r)
            item["detail"] = json.loads(item.pop("detail_json") or "{}")
            out.append(item)
        return out


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    try:
        path.chmod(0o700)
    except OSError:
        pass
    return path


AUDIT_KEY_FILE = "audit-key.pem"
AUDIT_PUBLIC_KEY_FILE = "audit-public-key.pem"
AUDIT_LEDGER_FILE = "service-ledger.jsonl"


def open_audit_ledger(audit_dir: Path) -> tuple[PrivacyLedger, bytes]:
    """The service's signed audit ledger and its public key (PEM), created on first use."""
    audit_dir = ensure_private_dir(audit_dir)
    key = load_or_create_audit_key(audit_dir / AUDIT_KEY_FILE)
    pem = public_key_pem(key)
    public_path = audit_dir / AUDIT_PUBLIC_KEY_FILE
    if not public_path.exists() or public_path.read_bytes() != pem:
        public_path.write_bytes(pem)
    return PrivacyLedger(audit_dir / AUDIT_LEDGER_FILE, signing_key=key), pem
