"""The ServerApp of ``flwr run .`` on a local simulation federation (pyproject
``[tool.flwr.app.components] serverapp``): it prepares the run directory's generated fleet
(``DIR/fleet/``, where each simulated device finds its store by partition id) and then runs the
deployed ServerApp's loop (``restwise.server.app.run_in_directory``). A deployment uses
``restwise.server.app:app``, which never creates stores.

    flwr run . local-simulation --run-config "run-dir='/abs/run-dir'"
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from restwise.server.app import run_dir_from, run_in_directory
from restwise.server.rundir import RunFiles
from restwise.simulation.fleet import FLEET_DIR, prepare_fleet

app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    run_dir = run_dir_from(context)
    files = RunFiles(run_dir)
    try:
        prepare_fleet(run_dir / FLEET_DIR, files.read_config())  # no-op when prepared
    except Exception as exc:  # noqa: BLE001 - `flwr run` exits 0 on a failed run: state.json says it
        files.write_state("failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        raise
    run_in_directory(grid, run_dir)


__all__ = ["app"]
