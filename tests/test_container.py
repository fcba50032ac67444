"""The `container` runtime with real runc, CRIU and cgroups, through a real server.

The root file system is built once with scripts/build-rootfs.sh (debootstrap
from the mirror of this machine's apt sources) and cached outside the
repository in ROOTFS; delete that directory to build it again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from checker.cli.client import APIError, CallerClient
from checker.runtimes.cgroups import JobCgroup, detect_layout
from checker.runtimes.container import RUNC_ROOT, container_prefix
from conftest import REPO_ROOT, ServerProcess, event_kinds, wait_for_checkpoints, wait_until
from test_limits import ALLOCATING_JOB, FORK_BOMB_JOB
from test_sandbox import ISOLATION_JOB, MEMORY_JOB, SLEEP_JOB, open_gate, work_dir

ROOTFS = Path(os.environ.get("CHECKER_TEST_ROOTFS", "/var/cache/checker-tests/rootfs-bookworm"))
ROOTFS_BUILD_TIMEOUT_SECONDS = 900
CONTAINER_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed; run scripts/install-runc.sh")


# Writes a file before its checkpoint and one after, then waits to be killed.
FILES_JOB = """
    import os, time
    import checker

    with open("before.txt", "w") as before:
        before.write("kept")
    result = checker.checkpoint()
    if not result.restored:
        with open("after.txt", "w") as after:
            after.write("rolled back")
        for _ in range(3000):
            time.sleep(0.02)
    checker.exit({"before": os.path.exists("before.txt"), "after": os.path.exists("after.txt")})
"""


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """Return a Debian root file system with python3, building it on first use."""
    if not (ROOTFS / "usr/bin/python3").exists():
        completed = subprocess.run(
            [str(REPO_ROOT / "scripts" / "build-rootfs.sh"), str(ROOTFS)], capture_output=True, text=True, timeout=ROOTFS_BUILD_TIMEOUT_SECONDS
        )
        if completed.returncode != 0:
            pytest.fail(f"scripts/build-rootfs.sh {ROOTFS} failed with {completed.returncode}: {completed.stderr[-2000:]}")
    return ROOTFS


def create_container_definition(client: CallerClient, rootfs: Path, script: Path, limits: dict | None = None, **runtime) -> dict:
    """Create a container definition that runs `script` with the root file system's Python, its directory mounted at /job."""
    return client.create_definition(
        script.stem,
        [CONTAINER_PYTHON, f"/job/{script.name}"],
        runtime={"type": "container", "rootfs": str(rootfs), "mounts": [f"{script.parent}:/job"], **runtime},
        limits=limits,
    )


def spawn_in_container(client: CallerClient, rootfs: Path, script: Path, params: dict | None = None, limits: dict | None = None) -> dict:
    definition = create_container_definition(client, rootfs, script, limits=limits)
    return client.spawn(definition["name"], params=params or {}, version=definition["version"])


def runc_containers(job_id: str) -> list[str]:
    """Return the ids of the job's containers that runc still has."""
    if not RUNC_ROOT.is_dir():
        return []
    return sorted(entry.name for entry in RUNC_ROOT.iterdir() if entry.name.startswith(container_prefix(job_id)))


def test_container_restores_after_sigkill(server: ServerProcess, client: CallerClient, job_script, rootfs: Path) -> None:
    job = spawn_in_container(client, rootfs, job_script("memory", MEMORY_JOB))
    running = wait_for_checkpoints(client, job["id"], 1)
    assert running["state"] == "running"
    assert client.checkpoints(job["id"])[0]["mode"] == "keep-running"

    os.kill(running["pid"], signal.SIGKILL)
    restored = wait_until(lambda: (current := client.get_job(job["id"]))["restore_count"] >= 1 and current, 60, "the restore")
    assert restored["pid"] != running["pid"]
    open_gate(server, job["id"])

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    assert result["output"]["digest_intact"] is True
    assert "crashed" in event_kinds(client, job["id"])
    log = (server.state_dir / "jobs" / job["id"] / "stdout.log").read_text()
    assert log == "checkpoint 1 restored\n"
    wait_until(lambda: not runc_containers(job["id"]), 30, "runc to forget the job's containers")


def test_container_checkpoint_keeps_running(server: ServerProcess, client: CallerClient, job_script, rootfs: Path) -> None:
    job = spawn_in_container(client, rootfs, job_script("memory", MEMORY_JOB))
    wait_for_checkpoints(client, job["id"], 1)
    open_gate(server, job["id"])

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is False
    assert client.get_job(job["id"])["restore_count"] == 0


def test_container_work_dir_rolled_back(server: ServerProcess, client: CallerClient, job_script, rootfs: Path) -> None:
    script = job_script("files", FILES_JOB)
    job = spawn_in_container(client, rootfs, script)
    running = wait_for_checkpoints(client, job["id"], 1)
    wait_until(lambda: (work_dir(server, job["id"]) / "after.txt").exists(), 30, "the job to write after.txt")

    os.kill(running["pid"], signal.SIGKILL)
    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"] == {"before": True, "after": False}


def test_container_sleep_and_wake(server: ServerProcess, client: CallerClient, job_script, rootfs: Path) -> None:
    job = spawn_in_container(client, rootfs, job_script("sleeper", SLEEP_JOB))

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    kinds = event_kinds(client, job["id"])
    assert "suspended" in kinds
    assert "woke" in kinds


def test_container_adopted_after_server_sigkill(server: ServerProcess, client: CallerClient, job_script, rootfs: Path) -> None:
    job = spawn_in_container(client, rootfs, job_script("memory", MEMORY_JOB))
    running = wait_for_checkpoints(client, job["id"], 1)

    server.sigkill()
    server.start()

    with CallerClient(server.url) as fresh:
        wait_until(lambda: "adopted" in event_kinds(fresh, job["id"]), 30, "the new server to re-adopt the container")
        assert fresh.get_job(job["id"])["pid"] == running["pid"]
        open_gate(server, job["id"])
        result = fresh.result(job["id"], wait=60)
        assert fresh.get_job(job["id"])["restore_count"] == 0
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is False
    wait_until(lambda: not runc_containers(job["id"]), 30, "runc to forget the job's container")


def test_container_restored_after_server_sigkill(server: ServerProcess, client: CallerClient, job_script, rootfs: Path) -> None:
    job = spawn_in_container(client, rootfs, job_script("memory", MEMORY_JOB))
    running = wait_for_checkpoints(client, job["id"], 1)

    server.sigkill()
    os.kill(running["pid"], signal.SIGKILL)
    server.start()

    with CallerClient(server.url) as fresh:
        wait_until(lambda: fresh.get_job(job["id"])["restore_count"] >= 1, 60, "the restore by the new server")
        open_gate(server, job["id"])
        result = fresh.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    assert result["output"]["digest_intact"] is True


def test_container_fork_runs_beside_original(server: ServerProcess, client: CallerClient, job_script, rootfs: Path) -> None:
    original = spawn_in_container(client, rootfs, job_script("memory", MEMORY_JOB))
    wait_for_checkpoints(client, original["id"], 1)

    fork = client.fork(original["id"], 1)
    wait_until(lambda: client.get_job(fork["id"])["restore_count"] >= 1, 60, "the fork's restore")
    open_gate(server, original["id"])
    open_gate(server, fork["id"])

    original_result = client.result(original["id"], wait=60)
    fork_result = client.result(fork["id"], wait=60)
    assert original_result["state"] == "completed", original_result
    assert fork_result["state"] == "completed", fork_result
    assert fork_result["output"]["secret"] == original_result["output"]["secret"]
    assert fork_result["output"]["restored"] is True
    assert fork_result["output"]["digest_intact"] is True
    assert fork["runtime"] == "container"


def test_container_confines_writes_and_processes(server: ServerProcess, client: CallerClient, job_script, rootfs: Path, tmp_path: Path) -> None:
    host_file = tmp_path / "host-only"
    host_file.write_text("secret")
    job = spawn_in_container(client, rootfs, job_script("isolation", ISOLATION_JOB), params={"host_file": str(host_file)})

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    attempts = result["output"]["attempts"]
    for path in ("/escape", "/usr/escape", "/etc/escape", "/run/checker/sdk/escape", "/job/escape"):
        assert attempts[path] != "written", f"the job wrote {path}"
    assert attempts["tmp"] == "written"
    assert attempts["work"] == "written"
    assert not (rootfs / "escape").exists()
    # The init and the job; runc's own setup took the PIDs in between.
    assert len(result["output"]["processes"]) == 2
    assert result["output"]["processes"][0] == 1
    assert result["output"]["host_file_visible"] is False


def test_container_pids_limit_applied(client: CallerClient, job_script, rootfs: Path) -> None:
    job = spawn_in_container(client, rootfs, job_script("fork_bomb", FORK_BOMB_JOB), limits={"pids": 8})

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["forked"] <= 6
    assert result["output"]["refused"] >= 58


def test_container_memory_limit_fails_job(client: CallerClient, job_script, rootfs: Path) -> None:
    job = spawn_in_container(client, rootfs, job_script("allocating", ALLOCATING_JOB), limits={"memory_mib": 64})

    result = client.result(job["id"], wait=90)
    assert result["state"] == "failed", result
    assert "out of memory" in result["error"]
    assert client.get_job(job["id"])["error_code"] == "out_of_memory"


def test_container_restore_keeps_memory_limit(server: ServerProcess, client: CallerClient, job_script, rootfs: Path) -> None:
    job = spawn_in_container(client, rootfs, job_script("memory", MEMORY_JOB), limits={"memory_mib": 256, "cpu_cores": 1.5})
    running = wait_for_checkpoints(client, job["id"], 1)

    os.kill(running["pid"], signal.SIGKILL)
    restored = wait_until(lambda: (current := client.get_job(job["id"]))["restore_count"] >= 1 and current, 60, "the restore")

    directories = JobCgroup(detect_layout(), job["id"]).directories()
    assert restored["pid"] in JobCgroup(detect_layout(), job["id"]).list_processes()
    assert int((directories["memory"] / "memory.limit_in_bytes").read_text()) == 256 * 1024 * 1024
    assert (directories["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "150000"
    open_gate(server, job["id"])
    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result


@pytest.mark.parametrize(
    ("runtime", "expected"),
    [
        ({"rootfs": None}, "runtime.rootfs is missing"),
        ({"rootfs": "relative/rootfs"}, "runtime.rootfs 'relative/rootfs' is invalid"),
        ({"rootfs": "/no/such/checker/rootfs"}, "is not a directory on this host"),
        ({"rootfs": "/proc/self/fdinfo"}, "has no /usr/bin/python3"),
        ({"python": "python3"}, "runtime.python 'python3' is invalid"),
        ({"mounts": ["/usr/share:/proc/share"]}, "the container's own /proc cannot be replaced"),
        ({"mounts": ["/usr/share"]}, "write HOST_PATH:CONTAINER_PATH"),
        ({"mounts": ["/usr/share:/share:rwx"]}, "write HOST_PATH:CONTAINER_PATH"),
        ({"mounts": ["/no/such/checker/path:/data"]}, "does not exist on this host"),
        ({"working_dir": "work"}, "runtime.working_dir 'work' is invalid"),
        ({"network": "none"}, "runtime.network 'none' is not supported"),
        ({"read_only_binds": ["/usr"]}, "runtime.read_only_binds is not an option of the container runtime"),
    ],
    ids=[
        "rootfs-missing", "rootfs-relative", "rootfs-absent", "rootfs-without-python", "python-relative", "mount-over-proc",
        "mount-without-target", "mount-bad-mode", "mount-source-missing", "working-dir-relative", "network-none", "sandbox-option",
    ],
)
def test_container_rejects_configuration(client: CallerClient, job_script, rootfs: Path, runtime: dict, expected: str) -> None:
    script = job_script("rejected", "print('never runs')\n")
    runtime = {"type": "container", "rootfs": str(rootfs), **runtime}
    if runtime["rootfs"] is None:
        del runtime["rootfs"]
    with pytest.raises(APIError) as raised:
        client.create_definition("rejected", [CONTAINER_PYTHON, "/job/rejected.py"], runtime=runtime)
    assert raised.value.status == 422
    assert expected in str(raised.value)


def test_cli_creates_container_definition(server: ServerProcess, client: CallerClient, job_script, rootfs: Path) -> None:
    script = job_script("memory", MEMORY_JOB)
    arguments = ["definitions", "create", "memory", "--runtime", "container", "--rootfs", str(rootfs), "--mount", f"{script.parent}:/job"]
    completed = subprocess.run(
        [sys.executable, "-m", "checker", *arguments, "--", CONTAINER_PYTHON, "/job/memory.py"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "CHECKER_SERVER_URL": server.url},
    )
    assert completed.returncode == 0, completed.stderr

    runtime = client.list_definitions("memory")[0]["runtime"]
    assert runtime["type"] == "container"
    assert runtime["rootfs"] == str(rootfs)
    assert runtime["mounts"] == [f"{script.parent}:/job"]
