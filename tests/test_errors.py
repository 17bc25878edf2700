"""One error tree, one exit-code registry, one mapping step for foreign errors, and the
README's exit-code table generated from the registry."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
from pathlib import Path

import pytest
import sqlcipher3.dbapi2 as sqlcipher

import restwise
from restwise.common import errors as E
from restwise.common.exit_codes import EXIT_CODE_HELP, ExitCode, exit_for, markdown_table
from restwise.privacy.errors import BudgetExceededError, LedgerCorruptError, VerificationError
from restwise.server.errors import DeploymentConfigError, RunConfigError

REPO = Path(__file__).resolve().parents[1]


def _production_sources() -> list[Path]:
    out = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in ("tests", "build", "docs") and not d.startswith((".", "__"))]
        out += [Path(folder) / f for f in files if f.endswith(".py")]
    return out


def _all_restwise_errors() -> set[type]:
    for info in pkgutil.walk_packages(restwise.__path__, "restwise."):
        if ".tests" not in info.name:
            importlib.import_module(info.name)
    out, todo = set(), [E.RestwiseError]
    while todo:
        cls = todo.pop()
        out.add(cls)
        todo += cls.__subclasses__()
    return out


def test_every_code_has_help_and_the_readme_table_is_the_registrys():
    assert set(EXIT_CODE_HELP) == set(ExitCode)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme
    # Codes scripts rely on never change meaning.
    assert (ExitCode.USAGE, ExitCode.KEY_REFUSED, ExitCode.STORE_UNAVAILABLE, ExitCode.STORE_DAMAGED,
            ExitCode.IMPORT_REFUSED, ExitCode.BUDGET_EXCEEDED, ExitCode.VERIFICATION_FAILED,
            ExitCode.INTERRUPTED) == (2, 3, 4, 5, 6, 7, 8, 130)


def test_the_tree_in_one_docstring_names_every_error_with_its_exit_code():
    drawn = {}
    for line in E.__doc__.splitlines():
        m = re.match(r"^\s*[│├└─\s]*([A-Z]\w+)\s+(\d+)\s", line)
        if m:
            drawn[m.group(1)] = int(m.group(2))
    classes = _all_restwise_errors()
    assert len(classes) >= 50
    missing = sorted(c.__name__ for c in classes if c.__name__ not in drawn)
    assert missing == []
    wrong = sorted(c.__name__ for c in classes if drawn[c.__name__] != int(c.exit_code))
    assert wrong == []


def test_exit_for_reads_the_class_and_nothing_else():
    assert exit_for(BudgetExceededError(scope="run", spent=1.0, projected=2.0, budget_epsilon=1.5, delta=1e-5)) == 7
    assert exit_for(LedgerCorruptError("bad chain", line=3)) == 8
    assert exit_for(VerificationError(["epsilon differs"])) == 8
    assert exit_for(E.StoreFormatError()) == 5 and exit_for(E.WrongPassphraseError()) == 3
    assert exit_for(RunConfigError("rounds", "must be positive")) == ExitCode.USAGE
    assert exit_for(DeploymentConfigError("plaintext without --insecure")) == ExitCode.USAGE
    assert exit_for(KeyboardInterrupt()) == 130
    assert exit_for(ValueError("not ours")) == ExitCode.FAILURE


def test_errors_carry_their_context():
    err = BudgetExceededError(scope="run", spent=1.0, projected=2.0, budget_epsilon=1.5, delta=1e-5, run_id="r", round=3)
    assert err.context["projected"] == 2.0 and err.projected == 2.0 and err.round == 3
    assert "projected epsilon after this release=2" in str(err)
    field_error = RunConfigError("clip_norm", "must be a positive number")
    assert field_error.field == "clip_norm" and isinstance(field_error, ValueError)


def test_one_mapping_step_for_os_and_sqlcipher_errors(tmp_path):
    missing = tmp_path / "absent.json"
    with pytest.raises(OSError) as info:
        missing.read_text()
    mapped = E.translate_error(info.value)
    assert isinstance(mapped, E.FileAccessError) and mapped.path == str(missing)
    assert str(missing) in str(mapped) and exit_for(mapped) == 1

    not_a_db = tmp_path / "noise.db"
    not_a_db.write_bytes(b"\x13" * 8192)
    conn = sqlcipher.connect(str(not_a_db))
    conn.execute("PRAGMA key = \"x'" + "ab" * 32 + "'\"")
    with pytest.raises(sqlcipher.DatabaseError) as info:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    conn.close()
    damaged = E.translate_error(info.value)
    assert isinstance(damaged, E.StoreFormatError) and exit_for(damaged) == 5

    busy = E.translate_error(sqlcipher.OperationalError("database is locked"))
    assert isinstance(busy, E.StoreLockedError) and exit_for(busy) == 4
    assert E.translate_error(sqlcipher.ProgrammingError("Cannot operate on a closed database.")) is None
    assert E.translate_error(ValueError("a bug")) is None


def test_no_command_exits_with_a_bare_number():
    """Every CLI ends through the registry (restwise.common.cli_errors / ExitCode)."""
    bare = []
    for path in _production_sources():
        rel = path.relative_to(REPO)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.search(r"typer\.Exit\((code=)?\d", line) or re.search(r"\breturn [0-9]+\b.*# exit", line):
                bare.append(f"{rel}:{n}")
    assert bare == []
