"""Retry policies (resume from the last checkpoint, with backoff) and execution timeouts."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from checker.server.retry import RetryPolicy
from conftest import wait_for_state


def spawn_with_policy(client, script: Path, params: dict, retry_policy: dict | None = None, timeout: float | None = None) -> dict:
    definition = client.create_definition(script.stem, [sys.executable, str(script)], retry_policy=retry_policy, execution_timeout_seconds=timeout)
    return client.spawn(definition["name"], params=params, version=definition["version"])


FLAKY_AFTER_CHECKPOINT = """
    import os
    import checker

    params = checker.params()
    with open(params["ledger"], "a") as ledger:
        ledger.write("pre-checkpoint work\\n")
    checker.checkpoint()
    failures = params["failures"]
    count_file = params["count"]
    count = int(open(count_file).read()) if os.path.exists(count_file) else 0
    with open(count_file, "w") as counter:
        counter.write(str(count + 1))
    if count < failures:
        raise SystemExit(3)
    checker.exit({"attempts_after_checkpoint": count + 1})
"""


def test_retry_resumes_from_checkpoint(client, job_script, tmp_path: Path) -> None:
    params = {"ledger": str(tmp_path / "ledger"), "count": str(tmp_path / "count"), "failures": 2}
    policy = {"max_attempts": 3, "initial_delay_seconds": 0.2, "backoff_multiplier": 2, "max_delay_seconds": 5}
    job = spawn_with_policy(client, job_script("flaky", FLAKY_AFTER_CHECKPOINT), params, policy)

    result = client.result(job["id"], wait=60)
    final = client.get_job(job["id"])

    assert result["state"] == "completed"
    assert result["output"] == {"attempts_after_checkpoint": 3}
    assert (tmp_path / "ledger").read_text().count("pre-checkpoint work") == 1
    assert final["attempt"] == 3
    assert [e["error_code"] for e in final["attempt_errors"]] == ["exit_code", "exit_code"]
    assert final["restore_count"] == 2
    rewound = [e["data"]["path"] for e in client.events(job["id"]) if e["kind"] == "output_rewound"]
    assert rewound == []  # The failing attempts wrote nothing after their checkpoint.


def test_retry_without_checkpoint_restarts(client, job_script, tmp_path: Path) -> None:
    source = """
        import os
        import checker

        params = checker.params()
        with open(params["starts"], "a") as starts:
            starts.write("start\\n")
        if open(params["starts"]).read().count("start") < 2:
            raise SystemExit(4)
        checker.exit({"ok": True})
    """
    policy = {"max_attempts": 2, "initial_delay_seconds": 0.1}
    job = spawn_with_policy(client, job_script("restarts", source), {"starts": str(tmp_path / "starts")}, policy)

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed"
    assert (tmp_path / "starts").read_text().count("start") == 2
    assert client.get_job(job["id"])["restart_count"] == 1


def test_attempts_are_capped(client, job_script, tmp_path: Path) -> None:
    params = {"ledger": str(tmp_path / "ledger"), "count": str(tmp_path / "count"), "failures": 10}
    policy = {"max_attempts": 2, "initial_delay_seconds": 0.1}
    job = spawn_with_policy(client, job_script("flaky", FLAKY_AFTER_CHECKPOINT), params, policy)

    final = wait_for_state(client, job["id"], ("failed",), timeout=60)
    assert final["attempt"] == 2
    assert len(final["attempt_errors"]) == 2
    assert "attempt 2 of 2; no attempts left" in final["error"]
    assert (tmp_path / "count").read_text() == "2"


def test_pending_retry_survives_server_sigkill(client, server, job_script, tmp_path: Path) -> None:
    params = {"ledger": str(tmp_path / "ledger"), "count": str(tmp_path / "count"), "failures": 1}
    policy = {"max_attempts": 2, "initial_delay_seconds": 3}
    job = spawn_with_policy(client, job_script("flaky", FLAKY_AFTER_CHECKPOINT), params, policy)
    wait_for_state(client, job["id"], ("pending_retry",), timeout=30)

    server.sigkill()
    server.start()

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed"
    assert result["output"] == {"attempts_after_checkpoint": 2}


def test_execution_timeout_kills_job(client, job_script) -> None:
    source = """
        import time
        import checker

        checker.checkpoint()
        time.sleep(3600)
    """
    job = spawn_with_policy(client, job_script("slow", source), {}, timeout=1.5)
    final = wait_for_state(client, job["id"], ("failed",), timeout=30)
    assert final["error_code"] == "timeout"
    assert "execution timeout of 1.5 s exceeded" in final["error"]


def test_execution_timeout_counts_suspension(client, job_script) -> None:
    source = """
        import checker
        checker.sleep(3600)
    """
    job = spawn_with_policy(client, job_script("sleepy", source), {}, timeout=1.5)
    final = wait_for_state(client, job["id"], ("failed",), timeout=30)
    assert final["error_code"] == "timeout"
    assert final["restore_count"] == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retry_policy", {"max_attempts": 0}),
        ("retry_policy", {"initial_delay_seconds": -1}),
        ("retry_policy", {"backoff_multiplier": 0.5}),
        ("retry_policy", {"tries": 3}),
        ("execution_timeout_seconds", 0),
        ("execution_timeout_seconds", -5),
    ],
)
def test_definition_rejects_invalid_policy(server, field, value) -> None:
    body = {"name": "bad", "runtime": {"type": "process", "command": ["true"]}, field: value}
    with httpx.Client(base_url=server.url) as http:
        response = http.post("/v1/job-definitions", json=body)
    assert response.status_code == 422
    assert field in response.json()["detail"]


def test_backoff_delays_grow_to_cap() -> None:
    policy = RetryPolicy(max_attempts=6, initial_delay_seconds=1, backoff_multiplier=3, max_delay_seconds=20)
    assert [policy.delay_before(attempt) for attempt in range(2, 7)] == [1, 3, 9, 20, 20]


def test_failed_attempt_output_is_kept(client, job_script, tmp_path: Path) -> None:
    source = """
        import os, sys
        import checker

        count_file = checker.params()["count"]
        checker.checkpoint()
        count = int(open(count_file).read()) if os.path.exists(count_file) else 0
        open(count_file, "w").write(str(count + 1))
        if count == 0:
            print("first attempt failed: disk full", file=sys.stderr, flush=True)
            raise SystemExit(2)
        checker.exit({"ok": True})
    """
    policy = {"max_attempts": 2, "initial_delay_seconds": 0.1}
    job = spawn_with_policy(client, job_script("noisy", source), {"count": str(tmp_path / "count")}, policy)
    assert client.result(job["id"], wait=60)["state"] == "completed"

    rewound = [e["data"]["path"] for e in client.events(job["id"]) if e["kind"] == "output_rewound"]
    assert len(rewound) == 1
    assert "first attempt failed: disk full" in Path(rewound[0]).read_text()
    assert "disk full" not in client.logs(job["id"], stream="stderr")["data"]
