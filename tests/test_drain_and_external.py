"""Checkpoints and suspensions requested from outside the job, and the drain on SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from conftest import ServerProcess, free_port, job_processes, spawn_script, wait_for_state, wait_until
from checker.cli.client import CallerClient

COUNTER = """
    import os, time
    import checker

    params = checker.params()
    total = 0
    for step in range(1, params["steps"] + 1):
        total += step
        with open(params["progress"], "w") as progress:
            progress.write(str(step))
        time.sleep(params.get("pause", 0.05))
    checker.exit({"total": total, "pid_in_namespace": os.getpid()})
"""


def counter_params(tmp_path: Path, steps: int = 60) -> dict:
    return {"steps": steps, "progress": str(tmp_path / "progress"), "pause": 0.05}


def progress_of(tmp_path: Path) -> int:
    path = tmp_path / "progress"
    return int(path.read_text() or 0) if path.exists() else 0


def test_external_checkpoint_then_crash_restores(client, job_script, tmp_path: Path) -> None:
    job = spawn_script(client, job_script("counter", COUNTER), counter_params(tmp_path))
    wait_until(lambda: progress_of(tmp_path) >= 5, 30, "the job to count")

    taken = client.checkpoint(job["id"])
    assert taken == {"checkpoint": 1, "suspended": False}
    os.kill(client.get_job(job["id"])["pid"], signal.SIGKILL)

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", (result, [event["message"] for event in client.events(job["id"])])
    assert result["output"]["total"] == sum(range(1, 61))
    assert client.get_job(job["id"])["restore_count"] == 1


def test_external_checkpoint_waits_for_lock(client, job_script) -> None:
    source = """
        import threading, time
        import checker

        times = {}
        with checker.checkpoint_lock():
            print("locked", flush=True)
            time.sleep(1.5)
            times["released"] = time.time()
        time.sleep(1.0)
        checker.exit(times)
    """
    job = spawn_script(client, job_script("locked", source))
    wait_until(lambda: "locked" in client.logs(job["id"])["data"], 30, "the job to take its lock")

    client.checkpoint(job["id"])
    taken_at = time.time()
    released = client.result(job["id"], wait=30)["output"]["released"]
    assert taken_at >= released


def test_external_suspend_and_resume(client, job_script, tmp_path: Path) -> None:
    job = spawn_script(client, job_script("counter", COUNTER), counter_params(tmp_path))
    wait_until(lambda: progress_of(tmp_path) >= 5, 30, "the job to count")

    taken = client.checkpoint(job["id"], suspend=True)
    assert taken["suspended"] is True
    suspended = client.get_job(job["id"])
    assert suspended["state"] == "suspended"
    assert suspended["pid"] is None
    frozen_at = progress_of(tmp_path)
    time.sleep(0.5)
    assert progress_of(tmp_path) == frozen_at

    client.resume(job["id"])
    result = client.result(job["id"], wait=60)
    assert result["output"]["total"] == sum(range(1, 61))


def test_drain_on_sigterm_then_resume(client, server, job_script, tmp_path: Path) -> None:
    job = spawn_script(client, job_script("counter", COUNTER), counter_params(tmp_path, steps=80))
    wait_until(lambda: progress_of(tmp_path) >= 5, 30, "the job to count")

    server.stop()  # SIGTERM: the server drains.
    assert "drain finished: 1 of 1 job(s) suspended" in server.log()
    assert job_processes(server.state_dir, job["id"]) == []

    server.start()
    with CallerClient(server.url) as restarted:
        result = restarted.result(job["id"], wait=60)
        final = restarted.get_job(job["id"])
    assert result["output"]["total"] == sum(range(1, 81))
    assert final["restore_count"] == 1


def test_drain_timeout_leaves_job_running(tmp_path: Path, job_script) -> None:
    source = """
        import time
        import checker

        with checker.checkpoint_lock():
            print("locked", flush=True)
            time.sleep(3600)
    """
    server = ServerProcess(
        state_dir=tmp_path / "state", port=free_port(), log_path=tmp_path / "server.log", extra_args=["--drain-timeout", "1", "--checkpoint-lock-timeout", "30"]
    )
    server.start()
    with CallerClient(server.url) as client:
        job = spawn_script(client, job_script("forever", source))
        wait_until(lambda: "locked" in client.logs(job["id"])["data"], 30, "the job to take its lock")
        started = time.monotonic()
        server.stop()
    stop_seconds = time.monotonic() - started

    try:
        assert stop_seconds < 15
        assert f"drain: job {job['id']} keeps running" in server.log()
        assert job_processes(server.state_dir, job["id"])
    finally:
        for pid in job_processes(server.state_dir, job["id"]):
            os.kill(pid, signal.SIGKILL)


def test_external_checkpoint_rejects_wrong_state(client, server, job_script) -> None:
    source = """
        import checker
        checker.wait_for_signal("go")
        checker.exit({})
    """
    job = spawn_script(client, job_script("waiter", source))
    wait_for_state(client, job["id"], ("suspended",), timeout=30)
    with httpx.Client(base_url=server.url) as http:
        checkpoint = http.post(f"/v1/jobs/{job['id']}/checkpoint", json={"suspend": False})
        bad_body = http.post(f"/v1/jobs/{job['id']}/checkpoint", json={"suspend": "sometimes"})
        unknown = http.post("/v1/jobs/nope/resume")
    assert checkpoint.status_code == 409
    assert "only a running job" in checkpoint.json()["detail"]
    assert bad_body.status_code == 422
    assert unknown.status_code == 404

    client.resume(job["id"])
    result = client.result(job["id"], wait=30)
    assert result["state"] == "completed"
