"""The importer registry: format name -> importer class, loaded lazily (the CLI starts fast
and one broken importer cannot break the others), and detection by content.

Order matters for auto-detection: more specific formats are asked first (Restwise's own
export before Open mHealth's JSON; the team app's questionnaire CSVs before the generic
check-in CSV). Formats marked ``whole_source`` (research datasets holding many persons)
are recognised from a whole folder, never file by file.
"""

from __future__ import annotations

import importlib
import importlib.util

from restwise.client.errors import ImportFailedError, UnknownFormatError

# ``options`` below is an importers.base.ImportOptions and ``source`` an InputSource; they
# are not imported for annotations because base imports this module.

# format name -> "module:Class"
REGISTRY: dict[str, str] = {
    "apple_health": "restwise.client.importers.apple_health:AppleHealthImporter",
    "fitbit": "restwise.client.importers.fitbit:FitbitImporter",
    "garmin_fit": "restwise.client.importers.garmin_fit:GarminFitImporter",
    "restwise_jsonl": "restwise.client.importers.restwise_jsonl:RestwiseJsonlImporter",
    "open_mhealth": "restwise.client.importers.open_mhealth:OpenMHealthImporter",
    "team_app": "restwise.client.importers.team_app:TeamAppImporter",
    "checkin_csv": "restwise.client.importers.checkin_csv:CheckinCsvImporter",
    "soccermon": "restwise.client.importers.soccermon:SoccerMonImporter",
    "lifesnaps": "restwise.client.importers.lifesnaps:LifeSnapsImporter",
}


def available_formats() -> list[str]:
    out = []
    for name, target in REGISTRY.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            out.append(name)
    return out


def get_importer(name: str, options=None):
    """A fresh importer of format ``name``. The check-in CSV importer takes the column map
    from ``options`` (it recognises mapped files by their mapped header)."""
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
    factory = getattr(mod, cls)
    if options is not None and options.column_map is not None and name == "checkin_csv":
        return factory(column_map=options.column_map)
    return factory()


def candidate_importers(options=None) -> list:
    """One importer of every available format, in detection order."""
    return [get_importer(name, options) for name in available_formats()]


def sniffs(importer, source) -> bool:
    """Does ``importer`` recognise ``source``? A sniffer that trips over the content (a
    damaged member) says no; an ImportFailedError (a refusal with a reason) propagates."""
    try:
        return bool(importer.sniff(source))
    except ImportFailedError:
        raise
    except Exception:  # one broken sniffer must never break detection
        return False


def detect_format(source, options=None):
    """Ask each importer whether it recognises the whole source; the first yes wins."""
    for importer in candidate_importers(options):
        try:
            if sniffs(importer, source):
                return importer
        except ImportFailedError:
            continue
    raise UnknownFormatError(
        f"{source.path.name}: not a format Restwise can import "
        f"(known: {', '.join(available_formats())})"
    )


__all__ = ["REGISTRY", "available_formats", "get_importer", "candidate_importers", "detect_format", "sniffs"]
