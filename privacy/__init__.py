"""restwise.privacy: DP events, accounting, calibration, budget, the DP release workflow
(``release.py``), wire names (``wire.py``), ledger, reports and verification, secure
aggregation, clipping/noise and the egress guard (as Flower mods and workflows). Imports only
``restwise.common`` and ``restwise.models`` (the metric vocabulary) from Restwise."""
