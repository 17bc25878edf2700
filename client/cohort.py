"""Import a research cohort: every person into their own encrypted store, as on a device.

Three layouts::

    import_cohort("soccermon", ".../soccermon", stores_dir, keystore=ks)   # one store per player
    import_cohort("lifesnaps", ".../lifesnaps", stores_dir, keystore=ks)   # one store per id
    import_cohort("folder", "my-cohort/", stores_dir, keystore=ks)         # see below

A *cohort folder* holds one sub-folder per person with that person's own exports, in any
format the importers read (Apple Health ``export.zip``, a Fitbit export folder or zip, Garmin
``.fit`` files, Open mHealth JSON, check-in CSVs, ...)::

    my-cohort/
      column-map.json            optional: column map for every person's check-in CSVs
      alice/
        export.zip               Apple Health
        checkins.csv             check-in CSV in another app's layout ...
        column-map.json          ... read with this column map (wins over the cohort's)
      bob/
        fitbit/                  a Fitbit account export folder (imported as one export)
        run-2024-01-02.fit

A person's folder holds their files exactly as the sources wrote them (a Fitbit dump's
``resting_heart_rate.json`` without a date suffix, the team app's ``wellness.csv`` with
ISO timestamps, columns in any order, ...). It is imported as one export: every file goes
to the importer that recognises its content (per-file column maps, keyed by file-name
pattern, let check-in CSVs of different apps sit side by side). A file no importer
recognises, or one that is damaged, is skipped and reported on that person
(:attr:`PersonStore.failures`) while the rest imports: one broken file must not sink a
person, one person must not sink a cohort. Hidden files are left out, and so is the column
map itself. Links are followed to files anywhere inside the cohort folder, never outside it. ``tz`` places timestamps on the persons' local days (one zone for the cohort).

Stores are opened through a keystore (:class:`~restwise.client.keys.FileKeystore` for
simulated devices): a raw-key open per store instead of an Argon2 derivation, so a cohort of
hundreds of persons imports in seconds. Re-running on the same ``stores_dir`` reopens the
stores and re-imports: imports are idempotent, so nothing is stored twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from restwise.client.errors import ImportFailedError, NothingImportedError, RestwiseDeviceError
from restwise.client.importers import ImportOptions, ImportReport, get_importer, lifesnaps, run_import, soccermon
from restwise.client.importers.checkin_csv import load_column_map
from restwise.client.keys import KeystoreProvider
from restwise.client.store import DeviceStore

COHORT_KINDS = ("soccermon", "lifesnaps", "folder")
COLUMN_MAP_NAME = "column-map.json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class PersonStore:
    """One imported person: their store folder and what each import did."""

    person: str
    folder: Path
    reports: tuple[ImportReport, ...] = ()
    failures: tuple[str, ...] = field(default=())  # "<file>: <why>" (no personal values)

    def open(self, keystore: KeystoreProvider) -> DeviceStore:
        return DeviceStore.open(self.folder, keystore=keystore)


def store_folder_name(person: str) -> str:
    """A file-system-safe, stable folder name for a person id."""
    name = _SAFE.sub("_", person).strip("._")
    if not name:
        raise ValueError("a person id must contain at least one letter or digit")
    return name


def _open_or_create(folder: Path, keystore: KeystoreProvider) -> DeviceStore:
    if DeviceStore.exists(folder):
        return DeviceStore.open(folder, keystore=keystore)
    return DeviceStore.create(folder, keystore=keystore)


def _dataset_persons(kind: str, data_path: Path) -> list[str]:
    list_persons = soccermon.list_persons if kind == "soccermon" else lifesnaps.list_persons
    return list_persons(data_path)


def import_cohort(
    kind: str,
    data_path: Path | str,
    stores_dir: Path | str,
    *,
    keystore: KeystoreProvider,
    persons: int | None = None,
    on_person: Callable[[int, int, str], None] | None = None,
    tz: str | None = None,
) -> list[PersonStore]:
    """Import a cohort (``kind`` in :data:`COHORT_KINDS`), one store per person under
    ``stores_dir``; ``persons`` keeps the first N persons (dataset order / folder name order).
    ``on_person(i, n, person)`` is called before each person (progress). ``tz``: the persons'
    time zone (cohort folders)."""
    if kind not in COHORT_KINDS:
        raise ValueError(f"unknown cohort kind {kind!r}; expected one of {', '.join(COHORT_KINDS)}")
    if persons is not None and persons < 1:
        raise ValueError("persons must be >= 1")
    data_path = Path(data_path)
    stores_dir = Path(stores_dir)
    if not data_path.exists():
        raise ImportFailedError(f"{data_path} does not exist")
    stores_dir.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        return _import_folder(data_path, stores_dir, keystore, persons, on_person, tz)

    importer = get_importer(kind)
    ids = _dataset_persons(kind, data_path)
    if persons is not None:
        ids = ids[:persons]
    out: list[PersonStore] = []
    used: set[str] = set()
    for i, person in enumerate(ids):
        if on_person is not None:
            on_person(i, len(ids), person)
        name = store_folder_name(person)
        if name in used:
            raise ImportFailedError("two person ids map to the same store folder name")
        used.add(name)
        folder = stores_dir / name
        with _open_or_create(folder, keystore) as store:
            report = run_import(store, data_path, importer, options=ImportOptions(person=person))
        out.append(PersonStore(person=person, folder=folder, reports=(report,)))
    return out


def _load_map(path: Path) -> dict | None:
    return load_column_map(path) if path.is_file() else None


def _import_folder(
    root: Path,
    stores_dir: Path,
    keystore: KeystoreProvider,
    persons: int | None,
    on_person: Callable[[int, int, str], None] | None,
    tz: str | None = None,
) -> list[PersonStore]:
    if not root.is_dir():
        raise ImportFailedError(f"{root.name} is not a folder (a cohort folder holds one folder per person)")
    cohort_map = _load_map(root / COLUMN_MAP_NAME)
    person_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not person_dirs:
        raise ImportFailedError(f"{root.name} holds no person folders")
    if persons is not None:
        person_dirs = person_dirs[:persons]
    out: list[PersonStore] = []
    for i, pdir in enumerate(person_dirs):
        person = pdir.name
        if on_person is not None:
            on_person(i, len(person_dirs), person)
        folder = stores_dir / store_folder_name(person)
        reports: list[ImportReport] = []
        failures: list[str] = []
        with _open_or_create(folder, keystore) as store:
            try:
                person_map = _load_map(pdir / COLUMN_MAP_NAME)
                column_map = person_map if person_map is not None else cohort_map
                report = run_import(
                    store, pdir, options=ImportOptions(column_map=column_map, tz=tz),
                    exclude=_hidden_members(pdir), link_root=root,
                )
                reports.append(report)
                failures += [f"{member}: {why}" for member, why in report.skipped_files]
            except NothingImportedError as exc:
                failures.append(str(exc))
                if exc.report is not None:
                    failures += [f"{m}: {why}" for m, why in exc.report.skipped_files]
            except RestwiseDeviceError as exc:
                failures.append(str(exc))
        out.append(PersonStore(person=person, folder=folder, reports=tuple(reports),
                               failures=tuple(failures)))
    return out


def _hidden_members(pdir: Path) -> list[str]:
    """Relative paths left out of a person's import: the column map and hidden files."""
    out = [COLUMN_MAP_NAME]
    for path in pdir.rglob(".*"):
        if path.is_file() or path.is_symlink():
            out.append(path.relative_to(pdir).as_posix())
        elif path.is_dir():
            out += [p.relative_to(pdir).as_posix() for p in path.rglob("*")]
    return out
