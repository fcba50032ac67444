"""Shared fixtures: a real `checker server` process on loopback, and job scripts.

Every test here runs real processes under real CRIU. A server is started per
test in its own state directory, so tests never share jobs or checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from checker.cli.client import CallerClient
from checker.runtimes.process import mounts_job_dir
from checker.runtimes.criu import CriuNotFoundError, find_criu
from checker.runtimes.procfs import ProcessIdentity, become_child_subreaper, is_alive

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() != 0:
        pytest.exit("the tests run real CRIU dumps and PID namespaces, which need root", returncode=2)
    try:
        find_criu()
    except CriuNotFoundError as error:
        pytest.exit(f"{error}", returncode=2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll `condition` until it returns a truthy value; fail the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class ServerProcess:
    """A `checker server` subprocess that tests can SIGKILL and start again."""

    state_dir: Path
    port: int
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "checker", "server", "--port", str(self.port), "--state-dir", str(self.state_dir), *self.extra_args]
        log = open(self.log_path, "a")
        env = {**os.environ, **self.extra_env}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env)
        log.close()
        client = CallerClient(self.url)
        try:
            wait_until(lambda: client.is_up() or self.process.poll() is not None, 30, "the server to start")
        finally:
            client.close()
        if self.process.poll() is not None:
            pytest.fail(f"the server exited with {self.process.returncode}; its log:\n{self.log_path.read_text()}")

    def sigkill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture
def server(tmp_path: Path) -> ServerProcess:
    handle = ServerProcess(state_dir=tmp_path / "state", port=free_port(), log_path=tmp_path / "server.log")
    handle.start()
    yield handle
    # Stop the server first: while it runs, it would restore every job killed here.
    handle.stop()
    kill_jobs_of(handle)


def kill_jobs_of(handle: ServerProcess) -> None:
    """Kill every job process the test left, by the PIDs the state store recorded."""
    from checker.store.state import sqlite_url

    database = handle.state_dir / "state.db"
    if not database.exists():
        return
    kill_jobs_in(sqlite_url(handle.state_dir))


def kill_jobs_in(database_url: str) -> None:
    """Kill every job process that the state store at `database_url` records as alive."""
    from checker.store.state import StateStore

    state = StateStore(database_url)
    try:
        for job in state.list_jobs(limit=100_000):
            if job.pid is not None and job.pid_start_time is not None and is_alive(ProcessIdentity(job.pid, job.pid_start_time)):
                os.kill(job.pid, signal.SIGKILL)
    finally:
        state.close()


@pytest.fixture(scope="session")
def postgres_cluster():
    """A PostgreSQL server for the whole test session; each test makes its own database."""
    from postgres import start_cluster

    cluster = start_cluster(free_port())
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster, request) -> str:
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50] + f"_{free_port()}"
    return postgres_cluster.create_database(name)


@pytest.fixture
def client(server: ServerProcess) -> CallerClient:
    with CallerClient(server.url) as caller:
        yield caller


@pytest.fixture
def job_script(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a job script from dedented source; return its path."""

    def write(name: str, source: str) -> Path:
        path = tmp_path / "scripts" / f"{name}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    return write


def spawn_script(client: CallerClient, script: Path, params: dict | None = None, name: str | None = None) -> dict:
    definition = client.create_definition(name or script.stem, [sys.executable, str(script)])
    return client.spawn(definition["name"], params=params or {}, version=definition["version"])


def wait_for_state(client: CallerClient, job_id: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    return wait_until(lambda: (job := client.get_job(job_id))["state"] in states and job, timeout, f"job {job_id} to reach {states}")


def wait_for_checkpoints(client: CallerClient, job_id: str, count: int, timeout: float = 60) -> dict:
    return wait_until(
        lambda: (job := client.get_job(job_id))["checkpoint_count"] >= count and job, timeout, f"job {job_id} to take {count} checkpoint(s)"
    )


TOKEN_WRITER_JOB = """
import os, time
import checker

params = checker.params()
with open(params["token_file"], "w") as token_file:
    token_file.write(os.environ["CHECKER_TOKEN"])
while not os.path.exists(params["gate"]):
    time.sleep(0.02)
checker.exit({})
"""


@pytest.fixture
def token_jobs(client: CallerClient, job_script, tmp_path: Path):
    """Start jobs that write their runtime token to a file and wait at a gate; yield a starter returning (job id, token)."""
    gate = tmp_path / "token-jobs-gate"
    script = job_script("tokens", TOKEN_WRITER_JOB)
    started = 0

    def start() -> tuple[str, str]:
        nonlocal started
        started += 1
        token_file = tmp_path / f"token-{started}"
        job = spawn_script(client, script, {"gate": str(gate), "token_file": str(token_file)})
        wait_until(token_file.exists, 30, f"job {job['id']} to write its token")
        return job["id"], token_file.read_text()

    yield start
    gate.touch()


@pytest.fixture
def child_subreaper():
    """Make the test process a child subreaper for one test, as the server is.

    It must not stay one: orphans of every later test's SIGKILLed server would
    then be re-parented to pytest, which never reaps them, and runsc waits for
    its dead helper processes to be reaped.
    """
    become_child_subreaper()
    try:
        yield
    finally:
        become_child_subreaper(False)


def job_processes(state_dir: Path, job_id: str) -> list[int]:
    """Return the PIDs of the job's processes: those that see its directory as their job mount, and its bwrap launcher."""
    job_dir = state_dir / "jobs" / job_id
    marker = str(job_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in command_line or mounts_job_dir(int(entry.name), job_dir):
            found.append(int(entry.name))
    return found


def manifest_chunks(state_dir: Path, job_id: str, number: int) -> set[str]:
    """Return the chunk digests that the manifest of checkpoint `number` lists."""
    manifest = json.loads((state_dir / "checkpoints" / job_id / str(number) / "manifest.json").read_text())
    return {digest for entry in manifest["files"] for digest in entry["chunks"]}


def chunk_path(state_dir: Path, job_id: str, digest: str) -> Path:
    chunks = state_dir / "checkpoints" / job_id / "chunks"
    compressed = chunks / f"{digest}.zst"
    return compressed if compressed.exists() else chunks / digest


def printed_secret(server: ServerProcess, job_id: str) -> str:
    """Return the secret a test job printed as its "secret VALUE" line in stdout."""
    stdout = (server.state_dir / "jobs" / job_id / "stdout.log").read_text()
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith("secret "))


def event_kinds(client: CallerClient, job_id: str) -> list[str]:
    return [event["kind"] for event in client.events(job_id)]
