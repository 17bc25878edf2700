"""Restwise's own JSON-lines format: what `restwise device export` writes, and the format of
the demo's bundled data. One JSON object per line, ``{"table": ...}`` first:

    {"table": "restwise_export", "version": 2}                      (an export's first line)
    {"table": "observations", "metric": "hrv_rmssd", "ts": 1704070800, "end_ts": null,
     "tz_offset_min": 60, "value": 52.1, "unit": "ms", "source": "apple_health",
     "device": null, "record_key": "9f0c..."}
    {"table": "checkins", "day": "2024-01-01", "readiness": 7, "fatigue": 4, ...}
    {"table": "sessions", "day": "2024-01-01", "minutes": 60, "rpe": 6, "load": 360, ...}

A file that starts with the export header is a **restore**: everything comes back as it was
(record identities, check-in times and override flags, session load kinds, and the device's
own history: what it sent, consent choices, past imports), so exporting the new store gives
the same bytes again. The restore itself is noted in the store's metadata, not added to the
import history it restores. Without the header (demo data, hand-written files) observations,
check-ins and sessions are imported as new data and the other tables are skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

from restwise.client.errors import MalformedInputError
from restwise.client.importers.base import (
    HISTORY_TABLES,
    CheckinRecord,
    ExportHeader,
    HistoryRecord,
    ImportOptions,
    InputSource,
    Record,
    Skip,
)
from restwise.client.store import (
    EXPORT_HEADER,
    EXPORT_TABLES,
    LOAD_KINDS,
    OWNER_SETTING_KEYS,
    SRPE_LOAD,
    Observation,
    Session,
    record_key,
)
from restwise.models.metrics import CHECKIN_FIELDS

DATA_TABLES = ("observations", "checkins", "sessions")
KNOWN_TABLES = (EXPORT_HEADER["table"], *DATA_TABLES, *HISTORY_TABLES)
SNIFF_BYTES = 4096


def _first_line(source: InputSource, member: str) -> dict | None:
    head = source.head(member, SNIFF_BYTES).lstrip()
    line = head.split(b"\n", 1)[0]
    if not line.startswith(b"{"):
        return None
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def _key(row: dict) -> bytes | None:
    """An exported record identity (hex), None when absent (demo data)."""
    text = row.get("record_key")
    if text is None:
        return None
    if not isinstance(text, str) or len(text) > 128:
        raise ValueError("record_key")
    return bytes.fromhex(text)


def _opt_int(value) -> int | None:
    return None if value is None else int(value)


class RestwiseJsonlImporter:
    name = "restwise_jsonl"
    description = "Restwise JSON lines (device export, demo data)"
    single_file = True  # each file is read alone (a folder of several: one group each)

    def sniff(self, source: InputSource) -> bool:
        members = source.members()
        if len(members) != 1:
            return False
        row = _first_line(source, members[0])
        return row is not None and row.get("table") in KNOWN_TABLES

    def records(self, source: InputSource, options: ImportOptions) -> Iterator[Record]:
        (member,) = source.members()
        restoring = False
        with source.open(member) as raw:
            for lineno, line in enumerate(raw, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    table = row["table"]
                except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
                    raise MalformedInputError(
                        f"{member}: line {lineno} is not a Restwise JSON record"
                    ) from None
                if lineno == 1 and table == EXPORT_HEADER["table"]:
                    if row.get("version") != EXPORT_HEADER["version"]:
                        raise MalformedInputError(
                            f"{member}: a Restwise export of version {str(row.get('version'))[:8]} "
                            f"(this Restwise reads version {EXPORT_HEADER['version']})"
                        )
                    restoring = True
                    yield ExportHeader(version=int(row["version"]))
                    continue
                try:
                    yield self._record(table, row, restoring)
                except (KeyError, TypeError, ValueError, OverflowError):
                    yield Skip(f"{table}: record with missing or malformed fields")

    def _record(self, table: object, row: dict, restoring: bool) -> Record:
        if table == "observations":
            key = _key(row) or record_key(
                "obs", row["metric"], row["ts"], row.get("end_ts"), row["source"], row.get("device"),
            )
            device = row.get("device")
            return Observation(
                metric=str(row["metric"]), ts=int(row["ts"]), value=float(row["value"]),
                unit=str(row["unit"]), source=str(row["source"]),
                end_ts=_opt_int(row.get("end_ts")), tz_offset_min=int(row.get("tz_offset_min") or 0),
                device=None if device is None else str(device), record_key=key,
            )
        if table == "checkins":
            values = {k: float(row[k]) for k in CHECKIN_FIELDS if row.get(k) is not None}
            return CheckinRecord(
                day=str(row["day"]), values=values, source=str(row.get("source") or self.name),
                is_override=bool(row.get("is_override") or False) if restoring else False,
                updated_at=_opt_int(row.get("updated_at")) if restoring else None,
            )
        if table == "sessions":
            load_kind = str(row.get("load_kind") or SRPE_LOAD)
            if load_kind not in LOAD_KINDS:
                raise ValueError("load_kind")
            kind = row.get("kind")
            key = _key(row) or record_key(
                "session", row["day"], row.get("start_ts"), row.get("kind"), row.get("source"),
            )
            return Session(
                day=str(row["day"]), minutes=float(row["minutes"]), load=float(row["load"]),
                rpe=None if row.get("rpe") is None else float(row["rpe"]),
                start_ts=_opt_int(row.get("start_ts")), kind=None if kind is None else str(kind),
                source=str(row.get("source") or self.name), record_key=key, load_kind=load_kind,
            )
        if table in HISTORY_TABLES and restoring:
            columns = EXPORT_TABLES[str(table)][0]
            return HistoryRecord(table=str(table), row=_history_row(str(table), row, columns))
        return Skip(f"table {str(table)[:32]} is not imported")


_HISTORY_TYPES = {
    "egress_log": {"ts": int, "run_id": str, "round": "int?", "message_type": str,
                   "records": str, "n_bytes": int, "sha256": str},
    "consent": {"scope": str, "allowed": int, "updated_at": int},
    "imports": {"started_at": int, "finished_at": int, "format": str, "source_name": str,
                "inserted": int, "duplicates": int, "skipped": int, "summary": str},
    "run_keys": {"run_id": str, "public_key": str, "pinned_at": int},
    "ledger_entries": {"run_id": str, "seq": int, "kind": str, "line": str, "received_at": int},
    "spends": {"run_id": str, "round": int, "attempt": int, "noise_multiplier": float, "sensitivity": float,
               "delta": float, "adjacency": str, "recorded_at": int, "receipt_seq": "int?"},
    "run_alarms": {"run_id": str, "ts": int, "reason": str},
    "owner_settings": {"key": str, "value": str},
}


def _history_row(table: str, row: dict, columns: tuple[str, ...]) -> dict:
    """The row's columns with their SQL types checked (ValueError/TypeError when wrong); an
    owner setting must be a known one with a positive finite value."""
    if table == "owner_settings":
        value = float(row["value"])
        if row["key"] not in OWNER_SETTING_KEYS or not (math.isfinite(value) and value > 0):
            raise ValueError("owner_settings")
    out = {}
    for column in columns:
        want = _HISTORY_TYPES[table][column]
        value = row[column]
        if want == "int?":
            out[column] = None if value is None else int(value)
        elif want is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(column)
            out[column] = value
        elif want is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(column)
            out[column] = float(value)
        else:
            if not isinstance(value, str):
                raise TypeError(column)
            out[column] = value
    return out


__all__ = ["RestwiseJsonlImporter"]
