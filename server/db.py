"""The service's database: runs, per-round metrics, ledger mirrors, API tokens, dashboard
sessions and the service's own audit trail (state changes, denied attempts, and coalesced
entries for what its rate limit kept out: ``audit_log.attempts``).

SQLAlchemy Core only (no ORM), so the same statements run on the embedded default (an SQLite
file in the server's data directory) and on PostgreSQL (``postgresql+psycopg://...``; install
the driver). The schema is versioned: ``MIGRATIONS`` is an append-only list of steps, each a
frozen description of the DDL it applies (never edit an applied step, add a new one), recorded
in ``schema_migrations``. ``Database.open`` applies the missing steps in one transaction each
and refuses a database written by a newer Restwise.

Secrets are never stored here: tokens and session ids only as SHA-256 digests.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from restwise.server.errors import DatabaseError


def utcnow() -> str:
    """Timestamps are ISO-8601 UTC strings: portable, sortable, readable in a dump."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------
# Current table shapes, used for queries. Migrations below carry their own frozen copies.
metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.String(40), nullable=False),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("revoked_at", sa.String(40), nullable=True),
    sa.Column("last_used_at", sa.String(40), nullable=True),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("config_json", sa.Text, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("current_round", sa.Integer, nullable=False, default=0),
    sa.Column("planned_rounds", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("created_by", sa.String(32), nullable=False),
    sa.Column("started_at", sa.String(40), nullable=True),
    sa.Column("finished_at", sa.String(40), nullable=True),
    sa.Column("run_dir", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("projected_epsilon", sa.Float, nullable=True),
    # Reconciled from the run's signed ledger (the truth; this is its cache): the releases it
    # records for the run and ε composed over them at the run's δ.
    sa.Column("releases", sa.Integer, nullable=True),
    sa.Column("epsilon_spent", sa.Float, nullable=True),
    # The epsilon cap in force when the run was started (the smaller of its own max_epsilon and
    # the service-wide cap at that moment), recorded then: never read from today's settings.
    sa.Column("epsilon_cap", sa.Float, nullable=True),
)

rounds = sa.Table(
    "rounds",
    metadata,
    sa.Column("run_id", sa.String(40), sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("round", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("status", sa.String(20), nullable=True),
    sa.Column("sampled", sa.Integer, nullable=True),
    sa.Column("survived", sa.Integer, nullable=True),
    sa.Column("dropped", sa.Integer, nullable=True),
    sa.Column("train_loss", sa.Float, nullable=True),
    sa.Column("epsilon", sa.Float, nullable=True),
    sa.Column("delta", sa.Float, nullable=True),
    sa.Column("noise_multiplier_effective", sa.Float, nullable=True),
)

ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("run_id", sa.String(40), sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("entry_json", sa.Text, nullable=False),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("session_hash", sa.String(64), primary_key=True),
    sa.Column("token_id", sa.String(32), sa.ForeignKey("tokens.id"), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("expires_at", sa.String(40), nullable=False),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("actor_token_id", sa.String(32), nullable=False),
    sa.Column("actor_role", sa.String(20), nullable=False),
    sa.Column("action", sa.String(40), nullable=False),
    sa.Column("target", sa.String(100), nullable=True),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("detail_json", sa.Text, nullable=True),
    # How many requests this row stands for: 1, or N for a coalesced entry of the attempts
    # the rate limit kept out of the log individually (auth.AuditTrail).
    sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
)


# ---------------------------------------------------------------------------------------
# Migrations: append-only. Each step builds its tables in a private MetaData so that later
# changes to the query-side definitions above can never alter what an old step does.
@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _m1_core(conn: Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "tokens",
        md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("revoked_at", sa.String(40), nullable=True),
        sa.Column("last_used_at", sa.String(40), nullable=True),
    )
    sa.Table(
        "runs",
        md,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("config_json", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("current_round", sa.Integer, nullable=False),
        sa.Column("planned_rounds", sa.Integer, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("created_by", sa.String(32), nullable=False),
        sa.Column("started_at", sa.String(40), nullable=True),
        sa.Column("finished_at", sa.String(40), nullable=True),
        sa.Column("run_dir", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Index("ix_runs_created_at", "created_at"),
    )
    sa.Table(
        "rounds",
        md,
        sa.Column("run_id", sa.String(40), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("round", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("status", sa.String(20), nullable=True),
        sa.Column("sampled", sa.Integer, nullable=True),
        sa.Column("survived", sa.Integer, nullable=True),
        sa.Column("dropped", sa.Integer, nullable=True),
        sa.Column("train_loss", sa.Float, nullable=True),
        sa.Column("epsilon", sa.Float, nullable=True),
        sa.Column("delta", sa.Float, nullable=True),
        sa.Column("noise_multiplier_effective", sa.Float, nullable=True),
    )
    sa.Table(
        "ledger_entries",
        md,
        sa.Column("run_id", sa.String(40), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("entry_json", sa.Text, nullable=False),
    )
    sa.Table(
        "audit_log",
        md,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.String(40), nullable=False),
        sa.Column("actor_token_id", sa.String(32), nullable=False),
        sa.Column("actor_role", sa.String(20), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("target", sa.String(100), nullable=True),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("detail_json", sa.Text, nullable=True),
    )
    md.create_all(conn)


def _m2_sessions(conn: Connection) -> None:
    md = sa.MetaData()
    sa.Table("tokens", md, sa.Column("id", sa.String(32), primary_key=True))
    sa.Table(
        "sessions",
        md,
        sa.Column("session_hash", sa.String(64), primary_key=True),
        sa.Column("token_id", sa.String(32), sa.ForeignKey("tokens.id"), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("expires_at", sa.String(40), nullable=False),
    )
    md.tables["sessions"].create(conn)


def _m3_projected_epsilon(conn: Connection) -> None:
    # ADD COLUMN with a nullable column is the portable subset of ALTER TABLE.
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN projected_epsilon FLOAT"))


def _m4_audit_attempts(conn: Connection) -> None:
    # NOT NULL with a constant default: existing rows become 1 (each stood for one request);
    # valid ADD COLUMN on SQLite and PostgreSQL alike.
    conn.execute(sa.text("ALTER TABLE audit_log ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1"))


def _m5_reconciled_epsilon(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN releases INTEGER"))
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN epsilon_spent FLOAT"))


def _m6_epsilon_cap(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN epsilon_cap FLOAT"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, rounds, ledger mirror, tokens, audit log", _m1_core),
    Migration(2, "dashboard sessions", _m2_sessions),
    Migration(3, "runs.projected_epsilon (budget check result)", _m3_projected_epsilon),
    Migration(4, "audit_log.attempts (coalesced denied and rate-limited requests)", _m4_audit_attempts),
    Migration(5, "runs.releases, runs.epsilon_spent (reconciled from the signed ledger)", _m5_reconciled_epsilon),
    Migration(6, "runs.epsilon_cap (the cap in force when the run started)", _m6_epsilon_cap),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def _schema_migrations_table(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "schema_migrations",
        md,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("description", sa.String(200), nullable=False),
        sa.Column("applied_at", sa.String(40), nullable=False),
    )


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / 'restwise-server.db'}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
    cur = dbapi_conn.cursor()
    # WAL lets the dashboard read while the run watcher writes; foreign keys are off by
    # default in SQLite; busy_timeout makes concurrent writers wait instead of failing.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class Database:
    """An engine plus the schema version check. Use ``Database.open(url)``."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> "Database":
        engine_kwargs: dict = {"future": True}
        if url.startswith("sqlite"):
            engine_kwargs["connect_args"] = {"check_same_thread": False}
        try:
            engine = sa.create_engine(url, **engine_kwargs)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise DatabaseError(f"cannot use the database URL: {exc}") from None
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        db = cls(engine)
        if migrate:
            db.migrate()
        return db

    def current_version(self) -> int:
        try:
            with self.engine.connect() as conn:
                if not sa.inspect(conn).has_table("schema_migrations"):
                    return 0
                value = conn.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar()
        except sa.exc.OperationalError as exc:
            raise DatabaseError(f"cannot open the database: {exc.orig}") from None
        return int(value or 0)

    def migrate(self) -> list[int]:
        """Apply the missing migration steps; return the versions applied."""
        current = self.current_version()
        if current > SCHEMA_VERSION:
            raise DatabaseError(
                f"the database has schema version {current}, newer than this Restwise "
                f"({SCHEMA_VERSION}); upgrade Restwise instead of downgrading the database"
            )
        applied: list[int] = []
        with self.engine.begin() as conn:
            _schema_migrations_table(sa.MetaData()).create(conn, checkfirst=True)
        for step in MIGRATIONS:
            if step.version <= current:
                continue
            # One transaction per step: a failed step leaves the previous version intact.
            with self.engine.begin() as conn:
                step.apply(conn)
                conn.execute(
                    schema_migrations.insert().values(
                        version=step.version, description=step.description, applied_at=utcnow()
                    )
                )
            applied.append(step.version)
        return applied

    def dispose(self) -> None:
        self.engine.dispose()
