"""restwise.privacy: DP events, accounting, calibration, budget, ledger, reports and
verification, secure aggregation, clipping/noise and the egress guard (as Flower mods and
workflows). Imports nothing else from Restwise."""
