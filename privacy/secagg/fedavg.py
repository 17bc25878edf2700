"""FedAvg over secure aggregation: helpers for the ServerApp and the device's app.

The update a device contributes is the flattened difference between its locally trained
model and the global one, in the order of ``flatten_arrays`` (record order, then array
order, each array C-order). The server releases only the sum of the survivors' updates and
applies their mean; one ``SecAggSession`` serves the run's rounds:

    session = SecAggSession(config)
    new_arrays, result = secure_fedavg_round(grid, session, nodes, arrays, train_config, round=r)
    if new_arrays is None: ...       # aborted: model unchanged, result.reason says why

Device side (inside the wrapped app, before the privacy mods clip and noise it):

    vector = flatten_arrays(trained) - flatten_arrays(received)
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from restwise.common.arrays import flatten, unflatten

from .protocol import SecureSumResult
from .workflow import SecAggSession

MODEL_RECORD = "arrays"
CONFIG_RECORD = "config"


def flatten_arrays(arrays: ArrayRecord) -> np.ndarray:
    """All arrays of ``arrays`` as one float64 vector (record key order, C order)."""
    return flatten([array.numpy() for array in arrays.values()])


def unflatten_like(vector: np.ndarray, like: ArrayRecord) -> ArrayRecord:
    """``vector`` cut into arrays with the names, shapes and dtypes of ``like``."""
    cut = unflatten(vector, [array.numpy() for array in like.values()])
    return ArrayRecord({name: Array(a) for name, a in zip(like.keys(), cut)})


def secure_fedavg_round(
    grid: Grid,
    session: SecAggSession,
    node_ids: list[int],
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    *,
    round: int,  # noqa: A002
) -> tuple[ArrayRecord | None, SecureSumResult]:
    """One FedAvg round whose aggregate is computed under secure aggregation.

    Devices receive ``RecordDict({"arrays": arrays, "config": train_config})`` and reply
    with their update vector (see module docstring). Returns the new global arrays (the
    mean update over survivors applied) or None when the round aborted."""
    content = RecordDict({MODEL_RECORD: arrays, CONFIG_RECORD: train_config})
    result = session.round(grid, node_ids, content, round=round)
    if result.aborted or not result.survivors:
        return None, result
    mean_update = result.total / len(result.survivors)
    return unflatten_like(flatten_arrays(arrays) + mean_update, arrays), result
