"""The statuses of a run: in its state.json, the service's database and the API.

    pending      launched, the runner has not started its first round yet
    running      a runner holds the run's lock and runs rounds
    finishing    the rounds are over (state.json ``outcome`` says how they ended); the report
                 is being written and anchored. Only then is the outcome the status.
    completed | failed | stopped | refused     ended; every run that released anything has
                 an anchored report (its bundle verifies)
    interrupted  its runner vanished without recording an end (killed, crashed, machine
                 restarted): ``reason`` says what was seen. It resumes from its checkpoint
                 (``restwise server runs resume``), or a stop ends it with its report.
"""

from __future__ import annotations

STATUSES = ("pending", "running", "finishing", "interrupted", "completed", "failed", "stopped", "refused")
TERMINAL_STATUSES = frozenset({"completed", "failed", "stopped", "refused"})
ACTIVE_STATUSES = frozenset({"pending", "running", "finishing"})
# A run the operator may continue from its checkpoint (a failed run too: e.g. after a fix).
RESUMABLE_STATUSES = frozenset({"interrupted", "failed"})

__all__ = ["STATUSES", "TERMINAL_STATUSES", "ACTIVE_STATUSES", "RESUMABLE_STATUSES"]
