"""restwise.privacy.secagg: Restwise secure aggregation (SecAgg+) on Flower's Message API.

Public API (lazily imported, so ``records`` stays import-light for the egress guard)::

    SecAggConfig                      config.py   validated parameters
    secure_sum(grid, node_ids, content, config, *, round, ...) -> SecureSumResult
    config_from_run_config(run_config, prefix="secagg")
    secagg_mod                        mod.py      the device-side Flower mod
    secure_fedavg_round(grid, node_ids, arrays, train_config, config, *, round)
    flatten_arrays / unflatten_like   fedavg.py   the update vector's layout
    InProcessGrid                     harness.py  in-process Grid for tests/benchmarks
    records                           every message/record name (egress allow-list)

See docs/secure-aggregation.md.
"""

from importlib import import_module

_EXPORTS = {
    "SecAggConfig": "config",
    "SecureSumResult": "protocol",
    "secure_sum": "workflow",
    "config_from_run_config": "workflow",
    "secagg_mod": "mod",
    "InProcessGrid": "harness",
    "secure_fedavg_round": "fedavg",
    "flatten_arrays": "fedavg",
    "unflatten_like": "fedavg",
}

__all__ = [*_EXPORTS, "records"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
