"""The `podman` runtime with real podman, runc and CRIU, through a real server.

The image is the container tests' root file system, imported once into
podman's local storage as IMAGE.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from checker.cli.client import APIError, CallerClient
from checker.runtimes.container import container_prefix
from conftest import ServerProcess, event_kinds, wait_for_checkpoints, wait_until
from test_container import CONTAINER_PYTHON, FILES_JOB, rootfs  # noqa: F401 (the rootfs fixture)
from test_limits import ALLOCATING_JOB, FORK_BOMB_JOB
from test_sandbox import MEMORY_JOB, SLEEP_JOB, open_gate, work_dir

IMAGE = "localhost/checker-test-bookworm:latest"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]

pytestmark = pytest.mark.skipif(shutil.which("podman") is None or shutil.which("runc") is None, reason="podman is not installed; run scripts/install-podman.sh")


@pytest.fixture(scope="session")
def image(rootfs: Path) -> str:
    """Return the test image's name, importing the root file system into podman on first use."""
    if subprocess.run([*PODMAN, "image", "exists", IMAGE], timeout=60).returncode != 0:
        archive = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([*PODMAN, "import", "-", IMAGE], stdin=archive.stdout, capture_output=True, text=True, timeout=300)
        archive.wait(timeout=60)
        if imported.returncode != 0:
            pytest.fail(f"podman import of {rootfs} failed with {imported.returncode}: {imported.stderr}")
    return IMAGE


def create_podman_definition(client: CallerClient, image: str, script: Path, limits: dict | None = None, **runtime) -> dict:
    return client.create_definition(
        script.stem,
        [CONTAINER_PYTHON, f"/job/{script.name}"],
        runtime={"type": "podman", "image": image, "mounts": [f"{script.parent}:/job"], **runtime},
        limits=limits,
    )


def spawn_in_podman(client: CallerClient, image: str, script: Path, limits: dict | None = None) -> dict:
    definition = create_podman_definition(client, image, script, limits=limits)
    return client.spawn(definition["name"], version=definition["version"])


def criu_config_of(job_id: str) -> Path:
    """Return the CRIU configuration file that the job's running podman container names in its annotation."""
    listed = subprocess.run([*PODMAN, "ps", "--format", "{{.Names}}", "--filter", f"name=^{container_prefix(job_id)}"], capture_output=True, text=True, timeout=60)
    names = listed.stdout.split()
    assert len(names) == 1, listed
    inspected = subprocess.run([*PODMAN, "inspect", "--format", '{{ index .Config.Annotations "org.criu.config" }}', names[0]], capture_output=True, text=True, timeout=60)
    return Path(inspected.stdout.strip())


def test_podman_restores_after_sigkill(server: ServerProcess, client: CallerClient, job_script, image: str) -> None:
    job = spawn_in_podman(client, image, job_script("memory", MEMORY_JOB))
    running = wait_for_checkpoints(client, job["id"], 1)
    assert client.checkpoints(job["id"])[0]["mode"] == "keep-running"

    os.kill(running["pid"], signal.SIGKILL)
    restored = wait_until(lambda: (current := client.get_job(job["id"]))["restore_count"] >= 1 and current, 60, "the restore")
    assert restored["pid"] != running["pid"]
    open_gate(server, job["id"])

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    assert result["output"]["digest_intact"] is True
    log = (server.state_dir / "jobs" / job["id"] / "stdout.log").read_text()
    assert log == "checkpoint 1 restored\n"


def test_podman_work_dir_rolled_back(server: ServerProcess, client: CallerClient, job_script, image: str) -> None:
    job = spawn_in_podman(client, image, job_script("files", FILES_JOB))
    running = wait_for_checkpoints(client, job["id"], 1)
    wait_until(lambda: (work_dir(server, job["id"]) / "after.txt").exists(), 30, "the job to write after.txt")

    os.kill(running["pid"], signal.SIGKILL)
    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"] == {"before": True, "after": False}


def test_podman_adopted_after_server_sigkill(server: ServerProcess, client: CallerClient, job_script, image: str) -> None:
    job = spawn_in_podman(client, image, job_script("memory", MEMORY_JOB))
    running = wait_for_checkpoints(client, job["id"], 1)

    server.sigkill()
    server.start()

    with CallerClient(server.url) as fresh:
        wait_until(lambda: "adopted" in event_kinds(fresh, job["id"]), 30, "the new server to re-adopt the container")
        assert fresh.get_job(job["id"])["pid"] == running["pid"]
        open_gate(server, job["id"])
        result = fresh.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is False


def test_podman_sleep_and_wake(client: CallerClient, job_script, image: str) -> None:
    job = spawn_in_podman(client, image, job_script("sleeper", SLEEP_JOB))

    result = client.result(job["id"], wait=90)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    assert "woke" in event_kinds(client, job["id"])


def test_podman_restored_after_server_sigkill(server: ServerProcess, client: CallerClient, job_script, image: str) -> None:
    job = spawn_in_podman(client, image, job_script("memory", MEMORY_JOB))
    running = wait_for_checkpoints(client, job["id"], 1)

    server.sigkill()
    os.kill(running["pid"], signal.SIGKILL)
    server.start()

    with CallerClient(server.url) as fresh:
        wait_until(lambda: fresh.get_job(job["id"])["restore_count"] >= 1, 60, "the restore by the new server")
        open_gate(server, job["id"])
        result = fresh.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["digest_intact"] is True


def test_podman_fork_runs_beside_original(server: ServerProcess, client: CallerClient, job_script, image: str) -> None:
    original = spawn_in_podman(client, image, job_script("memory", MEMORY_JOB))
    wait_for_checkpoints(client, original["id"], 1)

    fork = client.fork(original["id"], 1)
    wait_until(lambda: client.get_job(fork["id"])["restore_count"] >= 1, 60, "the fork's restore")

    # The fork's restore wrote a CRIU configuration of its own, so the original's keeps its dump options.
    fork_config = criu_config_of(fork["id"])
    original_config = criu_config_of(original["id"])
    assert fork_config.parent.name.startswith(container_prefix(fork["id"]))
    assert "link-remap" in original_config.read_text().split()
    open_gate(server, fork["id"])
    fork_result = client.result(fork["id"], wait=60)

    # The gate is in the fork's own work directory, so the original is still waiting.
    assert fork_result["state"] == "completed", fork_result
    assert client.get_job(original["id"])["state"] == "running"
    open_gate(server, original["id"])
    original_result = client.result(original["id"], wait=60)
    assert original_result["state"] == "completed", original_result

    assert fork_result["output"]["secret"] == original_result["output"]["secret"]
    assert fork_result["output"]["restored"] is True
    assert fork_result["output"]["digest_intact"] is True
    assert original_result["output"]["restored"] is False
    assert fork["runtime"] == "podman"
    jobs_dir = server.state_dir / "jobs"
    assert (jobs_dir / fork["id"] / "stdout.log").read_text() == "checkpoint 1 restored\n"
    assert (jobs_dir / original["id"] / "stdout.log").read_text() == "checkpoint 1 original\n"


def test_podman_fork_restored_after_sigkill(server: ServerProcess, client: CallerClient, job_script, image: str) -> None:
    original = spawn_in_podman(client, image, job_script("memory", MEMORY_JOB))
    wait_for_checkpoints(client, original["id"], 1)
    fork = client.fork(original["id"], 1)
    restored = wait_until(lambda: (job := client.get_job(fork["id"]))["restore_count"] >= 1 and job, 60, "the fork's restore")

    # The fork has no checkpoint of its own yet, so it is restored again from the one it was forked from.
    os.kill(restored["pid"], signal.SIGKILL)
    wait_until(lambda: client.get_job(fork["id"])["restore_count"] >= 2, 60, "the fork's second restore")
    open_gate(server, fork["id"])

    fork_result = client.result(fork["id"], wait=60)
    assert fork_result["state"] == "completed", fork_result
    assert fork_result["output"]["digest_intact"] is True
    assert (server.state_dir / "jobs" / fork["id"] / "stdout.log").read_text() == "checkpoint 1 restored\n"
    assert client.get_job(original["id"])["state"] == "running"
    client.kill(original["id"])


def test_podman_pids_limit_applied(client: CallerClient, job_script, image: str) -> None:
    job = spawn_in_podman(client, image, job_script("fork_bomb", FORK_BOMB_JOB), limits={"pids": 8})

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["forked"] <= 6
    assert result["output"]["refused"] >= 58


def test_podman_memory_limit_fails_job(client: CallerClient, job_script, image: str) -> None:
    job = spawn_in_podman(client, image, job_script("allocating", ALLOCATING_JOB), limits={"memory_mib": 64})

    result = client.result(job["id"], wait=90)
    assert result["state"] == "failed", result
    assert client.get_job(job["id"])["error_code"] == "out_of_memory"


@pytest.mark.parametrize(
    ("runtime", "expected"),
    [
        ({"image": None}, "runtime.image is missing"),
        ({"image": "localhost/checker-no-such-image:1"}, "is not in podman's local storage"),
        ({"rootfs": "/"}, "runtime.rootfs is not an option of the podman runtime"),
        ({"mounts": ["/usr/share:/proc/share"]}, "the container's own /proc cannot be replaced"),
        ({"network": "none"}, "runtime.network 'none' is not supported"),
    ],
    ids=["image-missing", "image-unknown", "rootfs-option", "mount-over-proc", "network-none"],
)
def test_podman_rejects_configuration(client: CallerClient, image: str, runtime: dict, expected: str) -> None:
    runtime = {"type": "podman", "image": image, **runtime}
    if runtime["image"] is None:
        del runtime["image"]
    with pytest.raises(APIError) as raised:
        client.create_definition("rejected", [CONTAINER_PYTHON, "/job/rejected.py"], runtime=runtime)
    assert raised.value.status == 422
    assert expected in str(raised.value)
