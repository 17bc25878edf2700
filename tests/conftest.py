"""Shared fixtures. Real parts: real SQLCipher files in tmp folders, real data from
../shared/data when present (tests that need it skip otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RESTWISE_SHARED_DATA", REPO.parent / "shared" / "data"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def fast_argon2():
    from restwise.client.keys import FAST_INSECURE_ARGON2

    return FAST_INSECURE_ARGON2


@pytest.fixture
def new_store(tmp_path, fast_argon2):
    """A fresh encrypted store (passphrase 'correct horse') opened for the test."""
    from restwise.client.store import DeviceStore

    store = DeviceStore.create(tmp_path / "store", "correct horse", argon2=fast_argon2)
    yield store
    if store._conn is not None:
        store.close()
