"""Restwise's own JSON-lines format: what `restwise device export` writes, and the format of
the demo's bundled data. One JSON object per line, ``{"table": ...}`` first:

    {"table": "observations", "metric": "hrv_rmssd", "ts": 1704070800, "end_ts": null,
     "tz_offset_min": 60, "value": 52.1, "unit": "ms", "source": "apple_health", "device": null}
    {"table": "checkins", "day": "2024-01-01", "readiness": 7, "fatigue": 4, ...}
    {"table": "sessions", "day": "2024-01-01", "minutes": 60, "rpe": 6, "load": 360, ...}

Other tables in an export (egress log, consent, imports) are the person's records of what
happened on their device; they are not re-imported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from restwise.client.errors import MalformedInputError
from restwise.client.importers.base import CheckinRecord, ImportOptions, InputSource, Record, Skip
from restwise.client.store import Observation, Session, record_key
from restwise.models.metrics import CHECKIN_FIELDS

FIRST_LINE_PREFIX = b'{"table": '


class RestwiseJsonlImporter:
    name = "restwise_jsonl"
    description = "Restwise JSON lines (device export, demo data)"

    def sniff(self, source: InputSource) -> bool:
        members = source.members()
        if len(members) != 1:
            return False
        return source.head(members[0], 64).lstrip().startswith(FIRST_LINE_PREFIX)

    def records(self, source: InputSource, options: ImportOptions) -> Iterator[Record]:
        (member,) = source.members()
        with source.open(member) as raw:
            for lineno, line in enumerate(raw, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    table = row["table"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise MalformedInputError(
                        f"{member}: line {lineno} is not a Restwise JSON record"
                    ) from None
                try:
                    if table == "observations":
                        yield Observation(
                            metric=str(row["metric"]), ts=int(row["ts"]), value=float(row["value"]),
                            unit=str(row["unit"]), source=str(row["source"]),
                            end_ts=None if row.get("end_ts") is None else int(row["end_ts"]),
                            tz_offset_min=int(row.get("tz_offset_min") or 0),
                            device=row.get("device"),
                            record_key=record_key(
                                "obs", row["metric"], row["ts"], row.get("end_ts"), row["source"],
                                row.get("device"),
                            ),
                        )
                    elif table == "checkins":
                        values = {k: row.get(k) for k in CHECKIN_FIELDS if row.get(k) is not None}
                        yield CheckinRecord(day=str(row["day"]), values={k: float(v) for k, v in values.items()},
                                            source=str(row.get("source") or self.name))
                    elif table == "sessions":
                        yield Session(
                            day=str(row["day"]), minutes=float(row["minutes"]), load=float(row["load"]),
                            rpe=None if row.get("rpe") is None else float(row["rpe"]),
                            start_ts=row.get("start_ts"), kind=row.get("kind"),
                            source=str(row.get("source") or self.name),
                            record_key=record_key("session", row["day"], row.get("start_ts"),
                                                  row.get("kind"), row.get("source")),
                        )
                    else:
                        yield Skip(f"table {table} is not imported")
                except (KeyError, TypeError, ValueError):
                    yield Skip(f"{table}: record with missing or malformed fields")
