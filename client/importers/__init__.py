"""Importers for wearable exports. Each lives in its own module; this registry maps a format
name to it, lazily, so the CLI starts fast and one broken importer cannot break the others.

Order matters for auto-detection: more specific formats are asked first.
"""

from __future__ import annotations

import importlib

from restwise.client.errors import UnknownFormatError
from restwise.client.importers.base import (  # noqa: F401 - re-exported
    CheckinRecord,
    ImportOptions,
    ImportReport,
    InputSource,
    Skip,
    run_import,
)

# format name -> "module:Class"
REGISTRY: dict[str, str] = {
    "apple_health": "restwise.client.importers.apple_health:AppleHealthImporter",
    "fitbit": "restwise.client.importers.fitbit:FitbitImporter",
    "garmin_fit": "restwise.client.importers.garmin_fit:GarminFitImporter",
    "open_mhealth": "restwise.client.importers.open_mhealth:OpenMHealthImporter",
    "checkin_csv": "restwise.client.importers.checkin_csv:CheckinCsvImporter",
    "soccermon": "restwise.client.importers.soccermon:SoccerMonImporter",
    "lifesnaps": "restwise.client.importers.lifesnaps:LifeSnapsImporter",
    "restwise_jsonl": "restwise.client.importers.restwise_jsonl:RestwiseJsonlImporter",
}


def available_formats() -> list[str]:
    out = []
    for name, target in REGISTRY.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            out.append(name)
    return out


def get_importer(name: str):
    if name not in REGISTRY:
        raise UnknownFormatError(
            f"unknown format {name!r}; known formats: {', '.join(available_formats())}"
        )
    module, cls = REGISTRY[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise UnknownFormatError(f"the {name} importer is not available in this build") from None
        raise
    return getattr(mod, cls)()


def detect_format(source: InputSource):
    """Ask each importer whether it recognises the content; the first yes wins."""
    for name in available_formats():
        try:
            imp = get_importer(name)
            if imp.sniff(source):
                return imp
        except Exception:  # one broken importer or sniffer must never break detection
            continue
    raise UnknownFormatError(
        f"{source.path.name}: not a format Restwise can import "
        f"(known: {', '.join(available_formats())})"
    )
