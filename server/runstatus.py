"""The statuses of a run: in its state.json, the service's database and the API."""

from __future__ import annotations

STATUSES = ("pending", "running", "completed", "failed", "stopped", "refused")
TERMINAL_STATUSES = frozenset({"completed", "failed", "stopped", "refused"})
ACTIVE_STATUSES = frozenset({"pending", "running"})

__all__ = ["STATUSES", "TERMINAL_STATUSES", "ACTIVE_STATUSES"]
