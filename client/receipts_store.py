"""The device's anchor of the runs it takes part in, kept in its encrypted store.

* **Run keys**: the ledger public key a run announced in the first message this device saw of
  it, pinned (``run_keys``). A later message of that run naming another key is refused, and an
  alarm is raised.
* **Ledger entries**: the run's signed ledger entries as received (``ledger_entries``), each
  segment checked before anything of it is stored (:func:`restwise.privacy.receipts.check_segment`:
  signatures under the pinned key, chain continuity, overlaps byte-identical). A segment that
  fails raises a tamper alarm (``run_alarms``); a run with an alarm gets no further
  participation from this device.
* **Spends** (``spends``): each release this device sent a masked input to, recorded *before*
  the input leaves, with the DP parameters its round announced (pending); the release's
  ``gaussian_round`` entry - its receipt - settles it.
* **The cap**: the owner's maximum epsilon over all runs (``meta`` key ``device.max_epsilon``;
  default :data:`restwise.privacy.device_budget.DEFAULT_MAX_EPSILON`).

Flower starts a fresh ClientApp process per message: all of this lives in the store, nothing
in memory. Messages and alarms name the run and what failed (seq, kind, field), never a value.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from restwise.client.store import MAX_EPSILON_KEY, DeviceStore
from restwise.privacy.device_budget import DEFAULT_MAX_EPSILON, Spend, device_epsilon, within_cap
from restwise.privacy.errors import AccountingError, KeyFileError, ReceiptError
from restwise.privacy.ledger import key_fingerprint, public_key_from_hex
from restwise.privacy.receipts import check_segment, continues, receipt_document, release_key

_log = logging.getLogger(__name__)


# -- the owner's cap --------------------------------------------------------------------------
def max_epsilon(store: DeviceStore) -> float:
    row = store.conn.execute("SELECT value FROM meta WHERE key = ?", (MAX_EPSILON_KEY,)).fetchone()
    return DEFAULT_MAX_EPSILON if row is None else float(row[0])


def set_max_epsilon(store: DeviceStore, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError("the maximum epsilon must be a positive finite number")
    with store.transaction() as c:
        c.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                  (MAX_EPSILON_KEY, repr(float(value))))


# -- keys, entries, alarms --------------------------------------------------------------------
def pinned_key(store: DeviceStore, run_id: str) -> str | None:
    row = store.conn.execute("SELECT public_key FROM run_keys WHERE run_id = ?", (run_id,)).fetchone()
    return None if row is None else str(row[0])


def stored_lines(store: DeviceStore, run_id: str) -> dict[int, str]:
    return {int(s): str(line) for s, line in
            store.conn.execute("SELECT seq, line FROM ledger_entries WHERE run_id = ? ORDER BY seq", (run_id,))}


def alarms(store: DeviceStore, run_id: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT run_id, ts, reason FROM run_alarms" + (" WHERE run_id = ?" if run_id is not None else "") + " ORDER BY id"
    return [{"run_id": r, "ts": int(t), "reason": why} for r, t, why in
            store.conn.execute(sql, () if run_id is None else (run_id,))]


def raise_alarm(store: DeviceStore, run_id: str, reason: str) -> None:
    with store.transaction() as c:
        c.execute("INSERT INTO run_alarms(run_id, ts, reason) VALUES (?,?,?)", (run_id, int(time.time()), reason[:500]))
    _log.warning("run %s: tamper alarm (%s); this device takes no further part in the run", run_id, reason[:200])


def receive(store: DeviceStore, run_id: str, ledger_key: object, lines: Sequence[str]) -> str | None:
    """Take in what a run's message announced: its ledger key (pinned at the first message,
    compared afterwards) and the ledger entries this device has not received yet. Returns why
    this device must not take part in the run (for its own log: never sent), or None.

    A segment that fails its checks is stored in no part; the run gets an alarm. A segment
    that starts after a gap in this device's copy (the server's record of what it delivered is
    behind) cannot be checked: it is not stored, raises no alarm, and the device's spends
    stay pending (counted in full)."""
    if alarms(store, run_id):
        return "a tamper alarm was raised for this run"
    if not isinstance(ledger_key, str) or not ledger_key:
        return "the run announced no ledger key"
    try:
        key = public_key_from_hex(ledger_key)
    except KeyFileError:
        raise_alarm(store, run_id, "the run announced a malformed ledger key")
        return "the run announced a malformed ledger key"
    pinned = pinned_key(store, run_id)
    if pinned is None:
        with store.transaction() as c:
            c.execute("INSERT INTO run_keys(run_id, public_key, pinned_at) VALUES (?,?,?)",
                      (run_id, ledger_key, int(time.time())))
    elif pinned != ledger_key:
        raise_alarm(store, run_id, "the run's ledger key differs from the key pinned at its first message")
        return "the run's ledger key changed"
    if not lines:
        return None
    stored = stored_lines(store, run_id)
    if not continues(lines, stored):
        _log.warning("run %s: ledger entries after a gap in this device's copy were not kept", run_id)
        return None
    try:
        new = check_segment(lines, key, stored)
    except ReceiptError as exc:
        raise_alarm(store, run_id, f"ledger entries failed their checks: {exc}")
        return "the run's ledger entries failed their checks"
    now = int(time.time())
    with store.transaction() as c:
        for entry in new:
            c.execute("INSERT INTO ledger_entries(run_id, seq, kind, line, received_at) VALUES (?,?,?,?,?)",
                      (run_id, entry.seq, entry.kind, entry.line().decode("ascii").rstrip("\n"), now))
            released = release_key(entry)
            if released is None or released[0] != run_id:
                continue
            # The receipt settles the spend; it never lowers it below the round's worst case.
            c.execute("UPDATE spends SET receipt_seq = ?, noise_multiplier = min(noise_multiplier, ?) "
                      "WHERE run_id = ? AND round = ? AND attempt = ? AND receipt_seq IS NULL",
                      (entry.seq, float(entry.payload["noise_multiplier"]), *released))
    return None


# -- spends and the budget --------------------------------------------------------------------
def spends(store: DeviceStore, run_id: str | None = None) -> list[Spend]:
    sql = ("SELECT run_id, round, attempt, noise_multiplier, sensitivity, delta, adjacency, receipt_seq FROM spends"
           + (" WHERE run_id = ?" if run_id is not None else "") + " ORDER BY recorded_at, run_id, round, attempt")
    return [Spend(r, int(rd), int(a), float(z), float(c), float(d), str(adj), None if seq is None else int(seq))
            for r, rd, a, z, c, d, adj, seq in store.conn.execute(sql, () if run_id is None else (run_id,))]


def planned_spend(run_id: str, round_: int, attempt: int, record: Mapping[str, Any]) -> Spend:
    """The spend a round would be, from its run record (or DP record) fields. AccountingError
    (or KeyError/ValueError/TypeError) when they are missing or malformed."""
    return Spend(run_id, int(round_), int(attempt), float(record["noise_multiplier"]),
                 float(record.get("clip_norm", 1.0)), float(record["delta"]), str(record["adjacency"]))


def may_spend(store: DeviceStore, spend: Spend) -> bool:
    """Would the device stay within its owner's cap after ``spend`` (besides everything it
    already spent, pending or settled)? A spend already recorded is not counted twice."""
    past = [s for s in spends(store) if (s.run_id, s.round, s.attempt) != (spend.run_id, spend.round, spend.attempt)]
    return within_cap(past + [spend], max_epsilon(store))


def record_spend(store: DeviceStore, spend: Spend) -> None:
    """Record a pending spend before the masked input leaves (idempotent per release)."""
    with store.transaction() as c:
        c.execute("INSERT INTO spends(run_id, round, attempt, noise_multiplier, sensitivity, delta, adjacency, "
                  "recorded_at, receipt_seq) VALUES (?,?,?,?,?,?,?,?,NULL) ON CONFLICT(run_id, round, attempt) DO "
                  "UPDATE SET noise_multiplier = min(noise_multiplier, excluded.noise_multiplier)",
                  (spend.run_id, spend.round, spend.attempt, float(spend.noise_multiplier), float(spend.sensitivity),
                   float(spend.delta), spend.adjacency, int(time.time())))


# -- what `device history` shows and `device receipts export` writes -------------------------------
@dataclass(frozen=True)
class RunAnchor:
    run_id: str
    releases: int  # releases this device sent a masked input to
    receipts: int  # of which settled by a receipt
    pending: int
    epsilon: float  # this run's releases alone, no amplification, at the run's delta
    entries: int  # ledger entries held
    key_fingerprint: str | None
    alarms: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def runs(store: DeviceStore) -> list[RunAnchor]:
    ids = sorted({r for (r,) in store.conn.execute(
        "SELECT run_id FROM run_keys UNION SELECT run_id FROM spends UNION SELECT run_id FROM run_alarms")})
    out = []
    for run_id in ids:
        mine = spends(store, run_id)
        key = pinned_key(store, run_id)
        (held,) = store.conn.execute("SELECT count(*) FROM ledger_entries WHERE run_id = ?", (run_id,)).fetchone()
        out.append(RunAnchor(
            run_id, len(mine), sum(1 for s in mine if s.settled), sum(1 for s in mine if not s.settled),
            _epsilon(mine), int(held), None if key is None else key_fingerprint(public_key_from_hex(key)),
            alarms(store, run_id),
        ))
    return out


def _epsilon(items: list[Spend]) -> float:
    """The accountant's epsilon; infinite where it refuses (e.g. a noise multiplier below its
    supported minimum): never a number it cannot stand behind."""
    try:
        return device_epsilon(items)
    except AccountingError:
        return math.inf


def total_epsilon(store: DeviceStore) -> float:
    return _epsilon(spends(store))


def export_document(store: DeviceStore, run_id: str) -> dict | None:
    """The receipt file of ``run_id`` (privacy.receipts), or None when this device holds no
    ledger entry of it."""
    key = pinned_key(store, run_id)
    lines = stored_lines(store, run_id)
    if key is None or not lines:
        return None
    receipts = [s.receipt_seq for s in spends(store, run_id) if s.settled]
    return receipt_document(run_id, public_key_from_hex(key), [lines[s] for s in sorted(lines)], receipts)


__all__ = [
    "MAX_EPSILON_KEY", "max_epsilon", "set_max_epsilon", "pinned_key", "stored_lines", "alarms", "raise_alarm",
    "receive", "spends", "planned_spend", "may_spend", "record_spend", "RunAnchor", "runs", "total_epsilon",
    "export_document",
]
