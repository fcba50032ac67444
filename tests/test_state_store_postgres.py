"""The state store and a whole server on PostgreSQL (Debian's package, a throwaway cluster)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import text

from checker.cli.client import CallerClient
from checker.store.migrations import MIGRATIONS
from checker.store.state import CheckpointRecord, DuplicateIdempotencyKey, StateStore
from conftest import ServerProcess, free_port, spawn_script, wait_for_checkpoints, wait_until

JOB_VALUES = {
    "definition_name": "d",
    "definition_version": 1,
    "runtime_type": "process",
    "runtime_config": {"command": ["true"]},
    "state": "pending",
    "params": {"n": 1},
    "env": {},
    "metadata": {"team": "red"},
    "request_digest": "x",
    "token_hash": "",
}


@pytest.fixture
def store(postgres_url: str) -> StateStore:
    state = StateStore(postgres_url)
    yield state
    state.close()


def test_migrations_apply_once(postgres_url: str) -> None:
    first = StateStore(postgres_url)
    assert first.applied_migrations == [m.version for m in MIGRATIONS]
    first.close()
    second = StateStore(postgres_url)
    assert second.applied_migrations == []
    with second.engine.connect() as connection:
        assert connection.execute(text("SELECT MAX(version) FROM schema_migrations")).scalar() == MIGRATIONS[-1].version
    second.close()


def test_jobs_and_idempotency(store: StateStore) -> None:
    first = store.insert_job({"id": "a", "idempotency_key": "k1", **JOB_VALUES}, "created")
    store.insert_job({"id": "b", "idempotency_key": None, **JOB_VALUES}, "created")
    with pytest.raises(DuplicateIdempotencyKey):
        store.insert_job({"id": "c", "idempotency_key": "k1", **JOB_VALUES}, "created")

    assert first.params == {"n": 1}
    assert [job.id for job in store.list_jobs(limit=1)] == ["a"]
    assert [job.id for job in store.list_jobs(after_seq=first.seq)] == ["b"]
    assert [job.id for job in store.list_jobs(metadata_match={"team": "red"})] == ["a", "b"]
    updated = store.update_job("a", event=("started", "started", {}), state="running", pid=42)
    assert (updated.state, updated.pid) == ("running", 42)


def test_checkpoints_tokens_and_signals(store: StateStore) -> None:
    store.insert_job({"id": "a", "idempotency_key": None, **JOB_VALUES}, "created")
    record = CheckpointRecord("a", 1, "keep-running", "/x", 10, 0.1, 0.2, "valid", "4.2.1", 0.0)
    job = store.record_checkpoint(record, ["tok-1"], 0, "checkpoint 1", stop=False)
    assert (job.checkpoint_count, job.last_checkpoint) == (1, 1)
    assert store.get_token("a", "tok-1").checkpoint_number == 1

    store.add_signal("a", "go", None)
    store.add_signal("a", "go", {"second": True})
    first = store.deliver_signal("a", "go", "wait-1", 1, 0)
    again = store.deliver_signal("a", "go", "wait-2", 1, 0)
    none_left = store.deliver_signal("a", "go", "wait-3", 1, 0)
    assert first.payload is None
    assert again.payload == {"second": True}
    assert none_left is None
    assert store.get_token("a", "wait-1").result == {"signal": {"name": "go", "payload": None, "seq": first.seq}}


def test_server_on_postgres_restores_job(postgres_url: str, tmp_path: Path, job_script) -> None:
    source = """
        import os, time
        import checker

        gate = checker.params()["gate"]
        result = checker.checkpoint()
        while not os.path.exists(gate):
            time.sleep(0.02)
        checker.exit({"restored": result.restored})
    """
    server = ServerProcess(state_dir=tmp_path / "state", port=free_port(), log_path=tmp_path / "server.log", extra_args=["--database-url", postgres_url])
    server.start()
    try:
        with CallerClient(server.url) as client:
            gate = tmp_path / "gate"
            job = spawn_script(client, job_script("pg", source), {"gate": str(gate)})
            running = wait_for_checkpoints(client, job["id"], 1)

            os.kill(running["pid"], signal.SIGKILL)
            wait_until(lambda: client.get_job(job["id"])["restore_count"] == 1, 30, "the restore")
            gate.touch()
            result = client.result(job["id"], wait=30)
    finally:
        server.stop()

    assert result["state"] == "completed"
    assert result["output"] == {"restored": True}
