"""Fork: a new job restored from another job's checkpoint, with its own namespace, token and files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from checker.cli.client import APIError, CallerClient
from conftest import ServerProcess, event_kinds, job_processes, spawn_script, wait_for_checkpoints, wait_until

FORKABLE_JOB = """
    import os, time
    import checker

    params = checker.params()
    secret = os.urandom(8).hex()
    print("secret", secret, flush=True)
    result = checker.checkpoint()
    print("after checkpoint", result.number, "restored" if result.restored else "original", flush=True)
    while not os.path.exists(params["gate"]):
        time.sleep(0.02)
    with open("written-after-fork.txt", "w") as note:
        note.write(secret)
    checker.exit({"secret": secret, "restored": result.restored, "checkpoint": result.number, "pid": os.getpid()})
"""

NO_CHECKPOINT_JOB = """
    import os, time
    import checker

    params = checker.params()
    while not os.path.exists(params["gate"]):
        time.sleep(0.02)
    checker.exit({})
"""


def fork_with_cli(server: ServerProcess, job_id: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "checker", "jobs", "fork", job_id, "--server", server.url, *arguments], capture_output=True, text=True, timeout=120
    )


def test_fork_runs_beside_original(server: ServerProcess, client: CallerClient, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    original = spawn_script(client, job_script("forkable", FORKABLE_JOB), {"gate": str(gate)})
    wait_for_checkpoints(client, original["id"], 1)

    completed = fork_with_cli(server, original["id"], "--checkpoint", "1")
    assert completed.returncode == 0, completed.stderr
    fork_id = completed.stdout.split()[1]
    assert fork_id != original["id"]
    assert f"forked from checkpoint 1 of job {original['id']}" in completed.stdout

    fork = wait_until(lambda: (job := client.get_job(fork_id))["restore_count"] >= 1 and job, 60, "the fork to be restored")
    assert fork["state"] == "running"
    assert fork["restore_count"] == 1
    assert fork["pid"] != client.get_job(original["id"])["pid"]
    gate.touch()

    original_result = client.result(original["id"], wait=60)
    fork_result = client.result(fork_id, wait=60)
    assert original_result["state"] == "completed", original_result
    assert fork_result["state"] == "completed", fork_result

    # Same memory up to the checkpoint, and the fork's checkpoint call returned restored=True.
    assert fork_result["output"]["secret"] == original_result["output"]["secret"]
    assert original_result["output"]["restored"] is False
    assert fork_result["output"]["restored"] is True
    assert fork_result["output"]["checkpoint"] == 1
    # Each copy is PID 2 of its own namespace.
    assert fork_result["output"]["pid"] == original_result["output"]["pid"]


def test_fork_has_own_files_and_token(server: ServerProcess, client: CallerClient, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    original = spawn_script(client, job_script("forkable", FORKABLE_JOB), {"gate": str(gate)})
    wait_for_checkpoints(client, original["id"], 1)
    fork = client.fork(original["id"])
    wait_until(lambda: client.get_job(fork["id"])["restore_count"] >= 1, 60, "the fork to be restored")
    gate.touch()
    client.result(original["id"], wait=60)
    client.result(fork["id"], wait=60)

    jobs_dir = server.state_dir / "jobs"
    original_stdout = (jobs_dir / original["id"] / "stdout.log").read_text().splitlines()
    fork_stdout = (jobs_dir / fork["id"] / "stdout.log").read_text().splitlines()
    secret_line = original_stdout[0]
    assert original_stdout == [secret_line, "after checkpoint 1 original"]
    assert fork_stdout == [secret_line, "after checkpoint 1 restored"]

    secret = secret_line.split()[1]
    assert (jobs_dir / original["id"] / "work" / "written-after-fork.txt").read_text() == secret
    assert (jobs_dir / fork["id"] / "work" / "written-after-fork.txt").read_text() == secret

    original_identity = (jobs_dir / original["id"] / "identity.json").read_text()
    fork_identity = (jobs_dir / fork["id"] / "identity.json").read_text()
    assert fork["id"] in fork_identity
    assert original_identity != fork_identity
    assert "restored" not in event_kinds(client, original["id"])
    assert "forked_into" in event_kinds(client, original["id"])
    assert "forked" in event_kinds(client, fork["id"])


def test_fork_checkpoints_and_recovers_alone(server: ServerProcess, client: CallerClient, job_script, tmp_path: Path) -> None:
    source = """
        import os, time
        import checker

        params = checker.params()
        checker.checkpoint()
        while not os.path.exists(params["gate"]):
            time.sleep(0.02)
        second = checker.checkpoint()
        with open(params["crash_marker"], "a") as marker:
            marker.write("x")
        while not os.path.exists(params["gate2"]):
            time.sleep(0.02)
        checker.exit({"second": second.number, "restored": second.restored})
    """
    gate, gate2 = tmp_path / "gate", tmp_path / "gate2"
    original = spawn_script(client, job_script("fork-recovers", source), {"gate": str(gate), "gate2": str(gate2), "crash_marker": str(tmp_path / "marker")})
    wait_for_checkpoints(client, original["id"], 1)
    client.kill(original["id"])
    fork = client.fork(original["id"], checkpoint=1)
    wait_until(lambda: client.get_job(fork["id"])["restore_count"] >= 1, 60, "the fork to be restored")
    gate.touch()

    wait_for_checkpoints(client, fork["id"], 2)
    wait_until(lambda: (tmp_path / "marker").exists(), 30, "the fork to pass its second checkpoint")
    for pid in job_processes(server.state_dir, fork["id"]):
        subprocess.run(["kill", "-KILL", str(pid)], check=False)
    wait_until(lambda: client.get_job(fork["id"])["restore_count"] >= 2, 60, "the fork to be restored after its crash")
    gate2.touch()

    result = client.result(fork["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"] == {"second": 2, "restored": True}
    assert client.get_job(original["id"])["state"] == "failed"


def test_fork_rejects_invalid_requests(server: ServerProcess, client: CallerClient, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    waiting = spawn_script(client, job_script("no-checkpoint", NO_CHECKPOINT_JOB), {"gate": str(gate)})
    forkable = spawn_script(client, job_script("forkable", FORKABLE_JOB), {"gate": str(gate)})
    wait_for_checkpoints(client, forkable["id"], 1)

    with pytest.raises(APIError) as missing:
        client.fork("0123456789abcdef")
    assert missing.value.status == 404
    assert "job '0123456789abcdef' not found" in str(missing.value)

    with pytest.raises(APIError) as no_checkpoint:
        client.fork(waiting["id"])
    assert no_checkpoint.value.status == 409
    assert f"job {waiting['id']} has no valid checkpoint to fork from" in str(no_checkpoint.value)

    with pytest.raises(APIError) as unknown_number:
        client.fork(forkable["id"], checkpoint=7)
    assert unknown_number.value.status == 404
    assert "has no valid checkpoint 7; its valid checkpoints: 1" in str(unknown_number.value)

    answer = httpx.post(f"{server.url}/v1/jobs/{forkable['id']}/fork", json={"checkpoint": 0}, timeout=30)
    assert answer.status_code == 422
    assert "checkpoint: Input should be greater than or equal to 1 (got 0)" in answer.json()["detail"]
    for loose in ("1", True, 1.0):
        answer = httpx.post(f"{server.url}/v1/jobs/{forkable['id']}/fork", json={"checkpoint": loose}, timeout=30)
        assert answer.status_code == 422, (loose, answer.text)
        assert "checkpoint" in answer.json()["detail"]

    completed = fork_with_cli(server, forkable["id"], "--checkpoint", "9")
    assert completed.returncode != 0
    assert "has no valid checkpoint 9; its valid checkpoints: 1" in completed.stderr
    assert "jobs list" not in completed.stderr
    assert "Traceback" not in completed.stderr

    gate.touch()
    client.result(waiting["id"], wait=60)
    with pytest.raises(APIError) as finished:
        client.fork(waiting["id"])
    assert finished.value.status == 409
    assert f"job {waiting['id']} is completed and has no valid checkpoint, so there is nothing to fork from" in str(finished.value)
