"""Resource limits (memory, CPU quota, processes) with real cgroups, for both runtimes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from checker.cli.client import APIError, CallerClient
from checker.runtimes.cgroups import JobCgroup, detect_layout
from conftest import ServerProcess, wait_for_checkpoints, wait_until
from test_sandbox import SANDBOX_PYTHON, create_sandbox_definition, open_gate

# Allocates and touches 16 MiB at a time, up to 512 MiB; a 64 MiB limit stops it long before.
ALLOCATING_JOB = """
    import checker

    blocks = []
    for index in range(32):
        blocks.append(bytearray(16 * 1024 * 1024))
        for offset in range(0, len(blocks[-1]), 4096):
            blocks[-1][offset] = 1
        print("allocated", (index + 1) * 16, "MiB", flush=True)
    checker.exit({"allocated_mib": 512})
"""

BUSY_JOB = """
    import time
    import checker

    started = time.monotonic()
    total = 0
    for number in range(6_000_000):
        total += number * number
    checker.exit({"seconds": time.monotonic() - started})
"""

# Forks at most 64 sleeping children and counts how many forks succeeded.
FORK_BOMB_JOB = """
    import os, signal, time
    import checker

    children, refused = [], 0
    for _ in range(64):
        try:
            pid = os.fork()
        except BlockingIOError:
            refused += 1
            continue
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    checker.exit({"forked": len(children), "refused": refused})
"""

HOLDING_JOB = """
    import os, time
    import checker

    block = bytearray(os.urandom(96 * 1024 * 1024))
    result = checker.checkpoint()
    for _ in range(3000):
        if os.path.exists("gate"):
            break
        time.sleep(0.02)
    checker.exit({"restored": result.restored, "size": len(block)})
"""


def spawn_in_runtime(client: CallerClient, runtime: str, script: Path, limits: dict | None = None) -> dict:
    """Spawn `script` in the `process` or `sandbox` runtime with `limits` in its definition."""
    if runtime == "sandbox":
        definition = create_sandbox_definition(client, script, limits=limits)
    else:
        definition = client.create_definition(script.stem, [sys.executable, str(script)], limits=limits)
    return client.spawn(definition["name"], version=definition["version"])


@pytest.mark.parametrize("runtime", ["process", "sandbox"])
def test_memory_limit_fails_job_out_of_memory(client: CallerClient, job_script, runtime: str) -> None:
    job = spawn_in_runtime(client, runtime, job_script("allocating", ALLOCATING_JOB), limits={"memory_mib": 64})

    result = client.result(job["id"], wait=90)
    assert result["state"] == "failed", result
    assert "out of memory" in result["error"]
    assert "64 MiB" in result["error"]
    assert client.get_job(job["id"])["error_code"] == "out_of_memory"
    assert client.get_job(job["id"])["restore_count"] == 0


def test_cpu_quota_slows_busy_loop(client: CallerClient, job_script) -> None:
    script = job_script("busy", BUSY_JOB)
    definition = client.create_definition("busy", [sys.executable, str(script)])

    unlimited = client.spawn("busy", version=definition["version"])
    unlimited_result = client.result(unlimited["id"], wait=120)
    limited = client.spawn("busy", version=definition["version"], limits={"cpu_cores": 0.2})
    limited_result = client.result(limited["id"], wait=120)

    assert unlimited_result["state"] == "completed", unlimited_result
    assert limited_result["state"] == "completed", limited_result
    assert client.get_job(limited["id"])["limits"] == {"cpu_cores": 0.2}
    # 0.2 cores would make it 5 times slower on an idle machine; 2.5 leaves room for a busy one.
    assert limited_result["output"]["seconds"] > 2.5 * unlimited_result["output"]["seconds"], (limited_result, unlimited_result)


@pytest.mark.parametrize("runtime", ["process", "sandbox"])
def test_pids_limit_stops_fork_bomb(client: CallerClient, job_script, runtime: str) -> None:
    job = spawn_in_runtime(client, runtime, job_script("fork_bomb", FORK_BOMB_JOB), limits={"pids": 8})

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    # The init and the job count against the limit, so at most 6 children fit.
    assert result["output"]["forked"] <= 6
    assert result["output"]["refused"] >= 58


def test_restored_job_keeps_limits(server: ServerProcess, client: CallerClient, job_script) -> None:
    limits = {"memory_mib": 256, "pids": 32, "cpu_cores": 1.5}
    job = spawn_in_runtime(client, "process", job_script("holding", HOLDING_JOB), limits=limits)
    running = wait_for_checkpoints(client, job["id"], 1)

    os.kill(running["pid"], signal.SIGKILL)
    restored = wait_until(lambda: (current := client.get_job(job["id"]))["restore_count"] >= 1 and current, 60, "the restore")

    cgroup = JobCgroup(detect_layout(), job["id"])
    directories = cgroup.directories()
    assert restored["pid"] in cgroup.list_processes()
    assert int((directories["memory"] / "memory.limit_in_bytes").read_text()) == 256 * 1024 * 1024
    assert (directories["pids"] / "pids.max").read_text().strip() == "32"
    assert (directories["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "150000"

    open_gate(server, job["id"])
    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    wait_until(lambda: not any(path.exists() for path in directories.values()), 30, "the cgroup's removal")


def test_fork_into_smaller_memory_rejected(client: CallerClient, job_script) -> None:
    source = spawn_in_runtime(client, "sandbox", job_script("holding", HOLDING_JOB), limits={"memory_mib": 256})
    wait_for_checkpoints(client, source["id"], 1)

    fork = client.fork(source["id"], 1, limits={"memory_mib": 32})
    result = client.result(fork["id"], wait=60)
    assert result["state"] == "failed", result
    assert "rejected: the image holds" in result["error"]
    assert "memory limit of 32.0 MiB" in result["error"]
    assert client.get_job(fork["id"])["error_code"] == "restore_failed"
    assert client.get_job(source["id"])["state"] == "running"
    client.kill(source["id"])


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"memory_mib": 0}, "limits.memory_mib"),
        ({"memory_mib": -64}, "limits.memory_mib"),
        ({"memory_mib": "64"}, "limits.memory_mib"),
        ({"memory_mib": 64.5}, "limits.memory_mib"),
        ({"cpu_cores": 0}, "limits.cpu_cores"),
        ({"cpu_cores": 2000}, "limits.cpu_cores"),
        ({"pids": 1}, "limits.pids"),
        ({"pids": True}, "limits.pids"),
        ({"swap_mib": 10}, "limits.swap_mib"),
    ],
    ids=["memory-zero", "memory-negative", "memory-string", "memory-fraction", "cpu-zero", "cpu-huge", "pids-one", "pids-bool", "unknown-limit"],
)
def test_invalid_limits_rejected(client: CallerClient, job_script, limits: dict, field: str) -> None:
    script = job_script("limited", "print('never runs')\n")
    with pytest.raises(APIError) as on_definition:
        client.create_definition("limited", [SANDBOX_PYTHON, str(script)], limits=limits)
    assert on_definition.value.status == 422
    assert field in str(on_definition.value)

    definition = client.create_definition("limited", [SANDBOX_PYTHON, str(script)])
    with pytest.raises(APIError) as on_spawn:
        client.spawn("limited", version=definition["version"], limits=limits)
    assert on_spawn.value.status == 422
    assert field in str(on_spawn.value)
