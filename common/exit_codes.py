"""The exit codes of every Restwise command, in one registry (in the manner of Flower's
``common/exit/exit_code.py``): a named code, its help text, and one :func:`exit_for`.

Every CLI ends through :func:`restwise.common.cli_errors.exit_with` (or its context manager
``cli_errors``), which prints one line and exits with ``exit_for(exc)``. An error class names
its code with a class attribute (``exit_code = ExitCode.STORE_DAMAGED``); anything that is
not a Restwise error exits with ``FAILURE``. The README's table is generated from
:data:`EXIT_CODE_HELP` (``markdown_table()``) and a test keeps the two identical.

Adding a code: one member of :class:`ExitCode`, its line in :data:`EXIT_CODE_HELP` (a test
refuses a code without help), ``exit_code = ExitCode.NEW`` on the error class that ends with
it, and ``python -m restwise.common.exit_codes`` prints the new README table. A code's number
never changes meaning once released: scripts rely on it.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Why a Restwise command ended."""

    SUCCESS = 0
    FAILURE = 1
    USAGE = 2
    KEY_REFUSED = 3
    STORE_UNAVAILABLE = 4
    STORE_DAMAGED = 5
    IMPORT_REFUSED = 6
    BUDGET_EXCEEDED = 7
    VERIFICATION_FAILED = 8
    NOTHING_IMPORTED = 9
    INTERRUPTED = 130


# The README's "Exit codes" table, row by row (markdown allowed).
EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.SUCCESS: "success",
    ExitCode.FAILURE: "the operation failed",
    ExitCode.USAGE: (
        "bad command-line usage (unknown option, missing argument, unreadable passphrase file, a new "
        "passphrase that is too easy to guess)"
    ),
    ExitCode.KEY_REFUSED: "wrong passphrase, or a keystore that is missing or does not open this store",
    ExitCode.STORE_UNAVAILABLE: "no store at that location, store already exists, or store in use",
    ExitCode.STORE_DAMAGED: "the store is damaged, truncated or was tampered with",
    ExitCode.IMPORT_REFUSED: "an import was refused (unknown or malformed file); the store is unchanged",
    ExitCode.BUDGET_EXCEEDED: "the privacy budget would be exceeded",
    ExitCode.VERIFICATION_FAILED: "verification failed (report, ledger or signature mismatch)",
    ExitCode.NOTHING_IMPORTED: (
        "an import stored nothing (every record skipped, every file not read); the reasons are listed "
        "and the store is unchanged"
    ),
    ExitCode.INTERRUPTED: "interrupted",
}


def exit_for(exc: BaseException) -> ExitCode:
    """The exit code a command ends with after ``exc``: the code its class names (Restwise
    errors), ``INTERRUPTED`` for Ctrl-C, ``FAILURE`` for anything else."""
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    code = getattr(type(exc), "exit_code", None)
    return code if isinstance(code, ExitCode) else ExitCode.FAILURE


def markdown_table() -> str:
    """The README's exit-code table."""
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {int(code)} | {EXIT_CODE_HELP[code]} |" for code in ExitCode]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
