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
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import hmac
import json
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

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


TOKEN_ROLES = (Role.operator, Role.auditor)


@dataclass(frozen=True)
class Principal:
    """Who is making a request: the token's public id, its name and role. Never the secret."""

    token_id: str
    name: str
    role: Role


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
        match = TOKEN_RE.match(token or "")
        if match is None:
            return None
        token_id, secret = match.groups()
        with self.db.engine.connect() as conn:
            row = conn.execute(sa.select(dbm.tokens).where(dbm.tokens.c.id == token_id)).mappings().first()
        stored = row["token_hash"] if row is not None else _DUMMY_DIGEST
        ok = hmac.compare_digest(stored, _digest(secret))
        if not ok or row is None or row["revoked_at"] is not None:
            return None
        self._touch(token_id, row["last_used_at"])
        return Principal(token_id, row["name"], Role(row["role"]))

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
        if not session_id or len(session_id) > 64 or not re.fullmatch(r"[A-Za-z0-9_-]+", session_id):
            return None
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
        if row is None or row["revoked_at"] is not None or row["expires_at"] <= now:
            return None
        return Principal(row["id"], row["name"], Role(row["role"]))

    def close_session(self, session_id: str) -> None:
        if not session_id or len(session_id) > 64:
            return
        with self.db.engine.begin() as conn:
            conn.execute(dbm.sessions.delete().where(dbm.sessions.c.session_hash == _digest(session_id)))


SYSTEM_PRINCIPAL = Principal("cli", "server command line", Role.admin)


class AuditTrail:
    """The service's own audit log: who changed what, when, and whether it was allowed.

    Written to the database (for listing) and appended to the signed hash-chained ledger
    (``restwise.privacy.ledger.PrivacyLedger``), whose file an auditor can verify without
    trusting this database.
    """

    def __init__(self, database: dbm.Database, ledger: PrivacyLedger):
        self.db = database
        self.ledger = ledger
        self._lock = threading.Lock()

    def record(
        self,
        actor: Principal,
        action: str,
        target: str | None,
        outcome: str,
        detail: dict[str, Any] | None = None,
    ) -> None:
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
                    )
                )

    def entries(self, limit: int = 200, offset: int = 0) -> list[dict[str, Any]]:
        with self.db.engine.connect() as conn:
            rows = (
                conn.execute(
                    sa.select(dbm.audit_log).order_by(dbm.audit_log.c.seq.desc()).limit(limit).offset(offset)
                )
                .mappings()
                .all()
            )
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
