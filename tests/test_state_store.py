"""State store migrations and records, on real SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from checker.store.migrations import MIGRATIONS
from checker.store.state import DuplicateIdempotencyKey, StateStore, sqlite_url


def test_fresh_store_applies_all_migrations(tmp_path: Path) -> None:
    store = StateStore(sqlite_url(tmp_path))
    assert store.applied_migrations == [m.version for m in MIGRATIONS]
    store.close()

    reopened = StateStore(sqlite_url(tmp_path))
    assert reopened.applied_migrations == []
    reopened.close()


def test_store_uses_wal_journal(tmp_path: Path) -> None:
    StateStore(sqlite_url(tmp_path)).close()
    with sqlite3.connect(tmp_path / "state.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    store = StateStore(sqlite_url(tmp_path))
    with store.engine.begin() as connection:
        connection.execute(text("INSERT INTO schema_migrations (version, description, applied_at) VALUES (99, 'future', 0)"))
    store.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        StateStore(sqlite_url(tmp_path))


def test_duplicate_idempotency_key_is_reported(tmp_path: Path) -> None:
    store = StateStore(sqlite_url(tmp_path))
    values = {
        "definition_name": "d", "definition_version": 1, "runtime_type": "process", "runtime_config": {}, "state": "pending",
        "params": {}, "env": {}, "metadata": {}, "idempotency_key": "k1", "request_digest": "x", "token_hash": "",
    }
    store.insert_job({"id": "a", **values}, "created")
    with pytest.raises(DuplicateIdempotencyKey):
        store.insert_job({"id": "b", **values}, "created")
    assert [job.id for job in store.list_jobs()] == ["a"]
    store.close()
