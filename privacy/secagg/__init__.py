"""restwise.privacy.secagg: Restwise secure aggregation (SecAgg+) on Flower's Message API."""
