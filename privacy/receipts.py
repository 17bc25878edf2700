"""Device receipts: the run's signed ledger, anchored outside the operator's machine.

Whoever holds a run's signing key can rewrite its ledger and re-sign it (issue 15). Receipts
take that power away: every device that takes part in a run receives the run's ledger entries
as they are written (in the first message of its next round, in the model delivery, and in
one final ``receipts`` message at the end of the run), checks them and keeps them in its
encrypted store. An auditor then compares the devices' copies with the ledger the operator
ships: an entry that is missing, or differs in any byte, fails verification.

Pure functions over ledger entries, shared by the device (:func:`check_segment`) and the
auditor (:func:`compare_with_ledger`); no I/O except reading and writing receipt files.

The device's checks on a segment (``check_segment``), all against the key it pinned at the
run's first message:

* every entry is canonical, hash-correct and signed under the pinned key;
* the segment is one chain: consecutive seqs, each ``prev_hash`` the hash before it, and the
  first entry continues the device's stored copy (``prev_hash`` = the stored entry before it,
  or the genesis hash at seq 1);
* an entry the device already holds must come back byte-identical.

A receipt is the ``gaussian_round`` entry of a release (run, round, attempt) this device sent a
masked input to: the signed statement of what that release cost it.

A receipt file (``restwise device receipts export``) is one JSON object::

    {"format": "restwise-receipts-v1", "run_id": ..., "public_key": <64 hex>,
     "public_key_fingerprint": "sha256:...", "entries": [<canonical ledger line>, ...],
     "receipts": [<seq>, ...]}

What anchoring does not protect against (docs/privacy-accounting.md): a server that withholds
entries from a device (the device then counts its unsettled spends at their worst case), a
release no honest device took part in, and a server that shows different devices different
ledgers that an auditor never compares (give the verifier every device's file).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from restwise.privacy.errors import KeyFileError, LedgerCorruptError, ReceiptError
from restwise.privacy.events import GaussianRoundEvent
from restwise.privacy.ledger import (
    GENESIS_HASH,
    LedgerEntry,
    key_fingerprint,
    parse_ledger_segment,
    public_key_from_hex,
    public_key_hex,
    verify_signatures,
)

FORMAT = "restwise-receipts-v1"
FILE_PREFIX = "receipts-"


# -- the server: what a device has not received yet ----------------------------------------------
def segment_after(entries: Sequence[LedgerEntry], after_seq: int) -> list[str]:
    """The canonical lines (no newline) of the entries after ``after_seq``, in order."""
    return [e.line().decode("ascii").rstrip("\n") for e in entries if e.seq > after_seq]


# -- the device: checking a segment ------------------------------------------------------------
def first_seq(lines: Sequence[str]) -> int | None:
    """The seq the segment starts at (None: empty or unreadable - :func:`check_segment` says
    why)."""
    if not lines:
        return None
    try:
        seq = json.loads(lines[0]).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def continues(lines: Sequence[str], stored: Mapping[int, str]) -> bool:
    """Does the segment start where the device's copy can check it: at seq 1, or at or
    before the entry after the stored head? (A segment that starts later leaves a gap the
    device cannot check: the server's bookkeeping of what it delivered is behind.)"""
    start = first_seq(lines)
    if start is None:
        return True  # unreadable: check_segment refuses it
    head = max(stored, default=0)
    return start == 1 or (start - 1) in stored and start <= head + 1


def differing_fields(mine: LedgerEntry, theirs: LedgerEntry) -> list[str]:
    """The fields in which two entries differ (``payload.<key>`` for the payload's)."""
    a, b = mine.to_dict(), theirs.to_dict()
    if a["kind"] != b["kind"]:
        return [name for name in a if a[name] != b[name] and name != "payload"]  # another event altogether
    out = []
    for name in a:
        if a[name] == b[name]:
            continue
        if name == "payload" and isinstance(a[name], dict) and isinstance(b[name], dict):
            keys = sorted(k for k in set(a[name]) | set(b[name]) if a[name].get(k) != b[name].get(k))
            out.extend(f"payload.{k}" for k in keys)
        else:
            out.append(name)
    return out


def parse_lines(lines: Sequence[str], public_key, *, after: tuple[int, str] | None = None) -> list[LedgerEntry]:
    """Parse consecutive canonical ledger lines and check every signature under
    ``public_key``. ``after`` = (seq, hash) the first line must continue; None: it continues
    whatever its own ``prev_hash`` names (a receipt file's first entry). ReceiptError."""
    if not lines:
        return []
    if any(not isinstance(line, str) or "\n" in line for line in lines):
        raise ReceiptError("a ledger line is not a single line of text", field="line")
    if after is None:
        start = first_seq(lines)
        try:
            prev_hash = json.loads(lines[0]).get("prev_hash")
        except (ValueError, AttributeError):
            prev_hash = None
        if start is None or start < 1 or not isinstance(prev_hash, str):
            raise ReceiptError("the first ledger line has no valid seq and prev_hash", field="seq")
        after = (start - 1, prev_hash if start > 1 else GENESIS_HASH)
    try:
        data = ("\n".join(lines) + "\n").encode("ascii")
    except UnicodeEncodeError:
        raise ReceiptError("a ledger line is not ASCII (canonical lines are)", field="line") from None
    try:
        entries = parse_ledger_segment(data, after_seq=after[0], after_hash=after[1])
        verify_signatures(entries, public_key)
    except LedgerCorruptError as exc:
        seq = exc.context.get("line")
        what = str(exc).removeprefix(f"ledger line {seq}: ")  # for a segment, the line is the seq
        raise ReceiptError(f"seq {seq}: {what}", seq=seq, field="chain or signature") from None
    return entries


def check_segment(lines: Sequence[str], public_key, stored: Mapping[int, str]) -> list[LedgerEntry]:
    """The entries of ``lines`` the device does not hold yet, once the whole segment passed
    the device's checks (module docstring). ``stored``: seq -> canonical line of the device's
    copy of this run's ledger. Raises ReceiptError naming the seq and what failed; the caller
    then keeps nothing of the segment."""
    if not lines:
        return []
    start = first_seq(lines)
    if start is None or start < 1:
        raise ReceiptError("the segment's first entry has no valid seq", field="seq")
    if not continues(lines, stored):
        raise ReceiptError(f"the segment starts at seq {start}, after a gap in this device's copy", seq=start,
                           field="seq")
    if start == 1:
        after = (0, GENESIS_HASH)
    else:
        before = parse_lines([stored[start - 1]], public_key, after=None)[0]
        after = (before.seq, before.hash)
    entries = parse_lines(lines, public_key, after=after)
    new = []
    for entry in entries:
        held = stored.get(entry.seq)
        if held is None:
            new.append(entry)
            continue
        if entry.line().decode("ascii").rstrip("\n") != held:
            old = parse_lines([held], public_key, after=None)[0]
            fields = differing_fields(old, entry) or ["bytes"]
            raise ReceiptError(f"seq {entry.seq} ({entry.kind}) differs from the entry this device received before "
                               f"({', '.join(fields)})", seq=entry.seq, kind=entry.kind, field=fields[0])
    return new


def release_key(entry: LedgerEntry) -> tuple[str, int, int] | None:
    """(run_id, round, attempt) of a ``gaussian_round`` entry, else None."""
    if entry.kind != GaussianRoundEvent.kind:
        return None
    p = entry.payload
    return str(p.get("run_id")), int(p.get("round", -1)), int(p.get("attempt", 0))


# -- receipt files ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReceiptFile:
    path: Path
    run_id: str
    public_key_hex: str
    fingerprint: str
    lines: tuple[str, ...]
    receipts: tuple[int, ...]


def receipt_document(run_id: str, public_key, lines: Sequence[str], receipts: Iterable[int]) -> dict:
    return {
        "format": FORMAT, "run_id": run_id, "public_key": public_key_hex(public_key),
        "public_key_fingerprint": key_fingerprint(public_key), "entries": list(lines),
        "receipts": sorted(int(s) for s in receipts),
    }


def write_receipt_file(folder: Path, document: dict) -> Path:
    """Write ``document`` as ``receipts-<run_id>-<8 random hex>.json`` in ``folder``: many
    devices may export into one folder, and the name says nothing about who wrote it. Never
    overwrites (O_EXCL)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(document, sort_keys=True, indent=1) + "\n").encode("ascii")
    while True:
        path = folder / f"{FILE_PREFIX}{document['run_id']}-{secrets.token_hex(4)}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path


def read_receipt_file(path: Path) -> ReceiptFile:
    """A receipt file, checked for form (not yet against any key or ledger). ReceiptError."""
    try:
        doc = json.loads(Path(path).read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReceiptError(f"{Path(path).name} is not a readable receipt file ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ReceiptError(f"{Path(path).name} is not a {FORMAT} file", field="format")
    run_id, key, fp, lines, receipts = (doc.get(k) for k in ("run_id", "public_key", "public_key_fingerprint",
                                                             "entries", "receipts"))
    if not (isinstance(run_id, str) and isinstance(key, str) and isinstance(fp, str)
            and isinstance(lines, list) and all(isinstance(x, str) for x in lines)
            and isinstance(receipts, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in receipts)):
        raise ReceiptError(f"{Path(path).name}: run_id, public_key, public_key_fingerprint, entries or receipts "
                           "is missing or has the wrong type", field="format")
    return ReceiptFile(Path(path), run_id, key, fp, tuple(lines), tuple(receipts))


def receipt_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(f"{FILE_PREFIX}*.json"))


def compare_with_ledger(folder: Path, run_id: str, public_key, ledger: Sequence[LedgerEntry]) -> tuple[list[str], int]:
    """Every receipt file in ``folder`` for ``run_id`` against the run's ledger: signed under
    the pinned ``public_key`` (its fingerprint the file's), and each entry byte-identical at
    the same seq in ``ledger``. Returns (problems, number of files checked); no file for the
    run is a problem too (nothing anchors the ledger then)."""
    problems: list[str] = []
    pinned = key_fingerprint(public_key)
    by_seq = {e.seq: e for e in ledger}
    checked = 0
    for path in receipt_files(folder):
        try:
            rf = read_receipt_file(path)
        except ReceiptError as exc:
            problems.append(str(exc))
            continue
        if rf.run_id != run_id:
            continue
        checked += 1
        name = path.name
        if rf.fingerprint != pinned:
            problems.append(f"{name}: the device pinned key {rf.fingerprint}, the ledger is checked with {pinned}")
            continue
        try:
            if public_key_hex(public_key_from_hex(rf.public_key_hex)) != public_key_hex(public_key):
                problems.append(f"{name}: its public key does not match its fingerprint")
                continue
            entries = parse_lines(rf.lines, public_key)
        except (ReceiptError, KeyFileError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        # The first entry that is missing or differs is named in full; a chain breaks from
        # there on, so the rest are counted.
        bad = [e for e in entries if by_seq.get(e.seq) is None or by_seq[e.seq].line() != e.line()]
        if bad:
            entry, theirs = bad[0], by_seq.get(bad[0].seq)
            if theirs is None:
                problems.append(f"{name}: seq {entry.seq} ({entry.kind}) is missing from the ledger")
            else:
                fields = differing_fields(entry, theirs) or ["bytes"]
                problems.append(f"{name}: seq {entry.seq} ({entry.kind}) differs from the ledger's entry "
                                f"(the ledger's is {theirs.kind}; differing: {', '.join(fields)})")
            if len(bad) > 1:
                problems.append(f"{name}: {len(bad) - 1} later entries (seq {', '.join(str(e.seq) for e in bad[1:])}) "
                                "are missing from the ledger or differ")
        missing_receipts = sorted(set(rf.receipts) - {e.seq for e in entries})
        if missing_receipts:
            problems.append(f"{name}: receipts name seq {missing_receipts} the file does not hold")
    if checked == 0:
        problems.append(f"no receipt file for run {run_id} in {folder}: nothing anchors this ledger")
    return problems, checked


__all__ = [
    "FORMAT", "segment_after", "check_segment", "continues", "first_seq", "parse_lines", "differing_fields",
    "release_key", "ReceiptFile", "receipt_document", "write_receipt_file", "read_receipt_file", "receipt_files",
    "compare_with_ledger",
]
