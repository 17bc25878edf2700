"""Importers for wearable exports. Each lives in its own module; :mod:`.registry` maps a
format name to it, lazily; :mod:`.base` holds what they share and :func:`run_import`."""

from __future__ import annotations

from restwise.client.importers.base import (  # noqa: F401 - re-exported
    CheckinRecord,
    ImportOptions,
    ImportPlan,
    ImportReport,
    InputSource,
    Notice,
    Skip,
    plan_import,
    run_import,
)
from restwise.client.importers.registry import (  # noqa: F401 - re-exported
    REGISTRY,
    available_formats,
    detect_format,
    get_importer,
)
