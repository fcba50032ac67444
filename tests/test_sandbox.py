"""The `sandbox` runtime with real bubblewrap, cgroups and CRIU, through a real server."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from checker.cli.client import APIError, CallerClient
from conftest import ServerProcess, event_kinds, wait_for_checkpoints, wait_until

SANDBOX_PYTHON = "/usr/bin/python3"

# Each job waits for a file named "gate" in its work directory, which the test
# creates from the host: the sandbox cannot see the test's temporary files.
# MEMORY_JOB also reports what its network reaches after the checkpoint: the
# server's TCP port, its network interfaces and the API URL it was given.
MEMORY_JOB = """
    import hashlib, os, socket, time
    import checker

    def connect_to_server():
        port = checker.params().get("server_port")
        if port is None:
            return "not checked"  # The container and podman tests share this job without the check.
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return "connected"
        except OSError as error:
            return type(error).__name__

    secret = os.urandom(8).hex()
    block = bytearray(os.urandom(32 * 1024 * 1024))
    digest = hashlib.sha256(block).hexdigest()
    result = checker.checkpoint()
    print("checkpoint", result.number, "restored" if result.restored else "original", flush=True)
    for _ in range(3000):
        if os.path.exists("gate"):
            break
        time.sleep(0.02)
    checker.exit({
        "secret": secret,
        "digest_intact": hashlib.sha256(block).hexdigest() == digest,
        "restored": result.restored,
        "pid": os.getpid(),
        "tcp_to_server": connect_to_server(),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "api_url": os.environ["CHECKER_API_URL"],
    })
"""

SLEEP_JOB = """
    import os
    import checker

    secret = os.urandom(8).hex()
    result = checker.sleep(1)
    checker.exit({"secret": secret, "restored": result.restored})
"""

ISOLATION_JOB = """
    import os
    import checker

    def try_write(path):
        try:
            with open(path, "w") as target:
                target.write("x")
            return "written"
        except OSError as error:
            return type(error).__name__

    attempts = {path: try_write(path) for path in ("/escape", "/usr/escape", "/etc/escape", "/run/checker/sdk/escape", "/job/escape")}
    attempts["tmp"] = try_write("/tmp/private")
    attempts["work"] = try_write("inside-work-dir")
    processes = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    checker.exit({"attempts": attempts, "processes": processes, "host_file_visible": os.path.exists(checker.params()["host_file"])})
"""


def work_dir(server: ServerProcess, job_id: str) -> Path:
    return server.state_dir / "jobs" / job_id / "work"


def open_gate(server: ServerProcess, job_id: str) -> None:
    (work_dir(server, job_id) / "gate").touch()


def create_sandbox_definition(client: CallerClient, script: Path, limits: dict | None = None, **runtime) -> dict:
    """Create a sandbox definition that runs `script` with the host's Python, its directory mounted at /job."""
    return client.create_definition(
        script.stem,
        [SANDBOX_PYTHON, f"/job/{script.name}"],
        runtime={"type": "sandbox", "read_only_binds": [f"{script.parent}:/job"], **runtime},
        limits=limits,
    )


def spawn_sandboxed(client: CallerClient, script: Path, params: dict | None = None, limits: dict | None = None, **runtime) -> dict:
    definition = create_sandbox_definition(client, script, limits=limits, **runtime)
    return client.spawn(definition["name"], params=params or {}, version=definition["version"])


def spawn_memory_job(server: ServerProcess, client: CallerClient, job_script, **runtime) -> dict:
    return spawn_sandboxed(client, job_script("memory", MEMORY_JOB), params={"server_port": server.port}, **runtime)


def assert_network(output: dict, network: str) -> None:
    """Check what a MEMORY_JOB with `runtime.network` set to `network` reached."""
    if network == "host":
        assert output["tcp_to_server"] == "connected"
        assert output["api_url"].startswith("http://127.0.0.1:")
        return
    # The job's own loopback has no listener, so connecting to the server's port is refused.
    assert output["tcp_to_server"] == "ConnectionRefusedError"
    assert output["interfaces"] == ["lo"]
    assert output["api_url"] == "unix:///run/checker/job/api.sock"


NETWORKS = pytest.mark.parametrize("network", ["host", "none"], ids=["network-host", "network-none"])


@pytest.mark.parametrize(
    "runtime",
    [{}, {"user_namespace": True}, {"network": "none"}],
    ids=["no-userns", "userns", "network-none"],
)
def test_sandbox_restores_after_sigkill(server: ServerProcess, client: CallerClient, job_script, runtime: dict) -> None:
    job = spawn_memory_job(server, client, job_script, **runtime)
    running = wait_for_checkpoints(client, job["id"], 1)
    assert running["state"] == "running"

    os.kill(running["pid"], signal.SIGKILL)
    restored = wait_until(lambda: (current := client.get_job(job["id"]))["restore_count"] >= 1 and current, 60, "the restore")
    assert restored["pid"] != running["pid"]
    open_gate(server, job["id"])

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    assert result["output"]["digest_intact"] is True
    assert_network(result["output"], runtime.get("network", "host"))
    assert "crashed" in event_kinds(client, job["id"])
    # The restore cut the original's output after the checkpoint from the log.
    log = (server.state_dir / "jobs" / job["id"] / "stdout.log").read_text()
    assert log == "checkpoint 1 restored\n"


@NETWORKS
def test_sandbox_checkpoint_keeps_running(server: ServerProcess, client: CallerClient, job_script, network: str) -> None:
    job = spawn_memory_job(server, client, job_script, network=network)
    running = wait_for_checkpoints(client, job["id"], 1)
    open_gate(server, job["id"])

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is False
    assert_network(result["output"], network)
    assert client.get_job(job["id"])["restore_count"] == 0
    assert client.checkpoints(job["id"])[0]["mode"] == "keep-running"
    assert running["pid"] is not None


@NETWORKS
def test_sandbox_sleep_and_wake(server: ServerProcess, client: CallerClient, job_script, network: str) -> None:
    job = spawn_sandboxed(client, job_script("sleeper", SLEEP_JOB), network=network)

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    kinds = event_kinds(client, job["id"])
    assert "suspended" in kinds
    assert "woke" in kinds


@NETWORKS
def test_sandbox_restored_after_server_sigkill(server: ServerProcess, client: CallerClient, job_script, network: str) -> None:
    job = spawn_memory_job(server, client, job_script, network=network)
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
    assert_network(result["output"], network)


@NETWORKS
def test_sandbox_adopted_after_server_sigkill(server: ServerProcess, client: CallerClient, job_script, network: str) -> None:
    job = spawn_memory_job(server, client, job_script, network=network)
    wait_for_checkpoints(client, job["id"], 1)

    server.sigkill()
    server.start()

    with CallerClient(server.url) as fresh:
        open_gate(server, job["id"])
        result = fresh.result(job["id"], wait=60)
        assert "adopted" in event_kinds(fresh, job["id"])
        assert fresh.get_job(job["id"])["restore_count"] == 0
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is False
    assert_network(result["output"], network)


def test_sandbox_confines_writes_and_processes(server: ServerProcess, client: CallerClient, job_script, tmp_path: Path) -> None:
    host_file = tmp_path / "host-only"
    host_file.write_text("secret")
    job = spawn_sandboxed(client, job_script("isolation", ISOLATION_JOB), params={"host_file": str(host_file)})

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    attempts = result["output"]["attempts"]
    for path in ("/escape", "/usr/escape", "/etc/escape", "/run/checker/sdk/escape", "/job/escape"):
        assert attempts[path] != "written", f"the job wrote {path}"
    assert attempts["tmp"] == "written"
    assert attempts["work"] == "written"
    assert (work_dir(server, job["id"]) / "inside-work-dir").exists()
    assert not Path("/tmp/private").exists()
    assert not (Path(job_script("unused", "").parent) / "escape").exists()
    # Only the namespace init (PID 1) and the job (PID 2) are visible.
    assert result["output"]["processes"] == [1, 2]
    assert result["output"]["host_file_visible"] is False


@NETWORKS
def test_sandbox_fork_runs_beside_original(server: ServerProcess, client: CallerClient, job_script, network: str) -> None:
    original = spawn_memory_job(server, client, job_script, network=network)
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
    assert_network(original_result["output"], network)
    assert_network(fork_result["output"], network)
    assert fork["runtime"] == "sandbox"


@pytest.mark.parametrize(
    ("runtime", "expected"),
    [
        ({"network": "none", "user_namespace": True}, "cannot be restored"),
        ({"network": "bridge"}, "runtime.network 'bridge' is invalid"),
        ({"die_with_parent": True}, "runtime.die_with_parent cannot be used"),
        ({"read_only_binds": ["/usr/share:/proc/share"]}, "the sandbox's own /proc cannot be replaced"),
        ({"read_only_binds": ["relative/path"]}, "write an absolute HOST_PATH"),
        ({"read_only_binds": ["/no/such/checker/path"]}, "does not exist on this host"),
    ],
    ids=["userns-with-netns", "network-unknown", "die-with-parent", "bind-over-proc", "bind-relative", "bind-missing"],
)
def test_sandbox_rejects_configuration(client: CallerClient, job_script, runtime: dict, expected: str) -> None:
    script = job_script("rejected", "print('never runs')\n")
    with pytest.raises(APIError) as raised:
        create_sandbox_definition(client, script, **runtime)
    assert raised.value.status == 422
    assert expected in str(raised.value)


def test_process_runtime_rejects_sandbox_options(client: CallerClient, job_script) -> None:
    script = job_script("rejected", "print('never runs')\n")
    with pytest.raises(APIError) as raised:
        client.create_definition("rejected", [SANDBOX_PYTHON, str(script)], runtime={"read_only_binds": ["/usr"]})
    assert raised.value.status == 422
    assert "runtime.read_only_binds is not an option of the process runtime" in str(raised.value)
