"""Assemble and run a server: state store, checkpoint store, runtimes, HTTP APIs."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import uvicorn

from checker.config import Settings
from checker.runtimes import create_runtimes, find_criu
from checker.runtimes.procfs import become_child_subreaper
from checker.server.app import create_app
from checker.server.jobsockets import JobSockets
from checker.server.manager import JobManager
from checker.store.checkpoints import LocalCheckpointStore
from checker.store.state import StateStore, sqlite_url

logger = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket first, so the port is known (also for port 0) before jobs start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}; is another server running? Use --port to pick another") from error
    listener.listen(512)
    listener.set_inheritable(False)
    return listener


def api_url_for(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class StateDirectoryInUse(Exception):
    """Another server runs with the same state directory."""


def lock_state_directory(state_dir: Path) -> int:
    """Take an exclusive lock on the state directory for this process's lifetime; return its fd.

    Two servers on one state directory would both restore a crashed job and
    then fail it, so the second one is refused.
    """
    lock_path = state_dir / "server.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirectoryInUse(
            f"state directory {state_dir} is in use by another Checker server (pid {owner}); stop that server or pass another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def create_checkpoint_store(settings: Settings) -> LocalCheckpointStore:
    """Create the local checkpoint store, or the S3 one after checking that its bucket is reachable (raises S3StoreError)."""
    if settings.checkpoint_store is None:
        return LocalCheckpointStore(
            settings.checkpoints_dir,
            fsync=settings.fsync_checkpoints,
            compression_level=settings.checkpoint_compression_level,
            dedupe=settings.checkpoint_dedupe,
        )
    from checker.store.s3 import S3CheckpointStore, create_s3_client, parse_s3_url

    location = parse_s3_url(settings.checkpoint_store)
    store = S3CheckpointStore(
        settings.checkpoints_dir,
        location,
        create_s3_client(settings.s3_endpoint_url),
        fsync=settings.fsync_checkpoints,
        compression_level=settings.checkpoint_compression_level,
        endpoint_url=settings.s3_endpoint_url,
    )
    store.check_bucket()
    logger.info("checkpoints stored in %s (endpoint %s), cached in %s", location, settings.s3_endpoint_url or "default", settings.checkpoints_dir)
    return store


class Server:
    """A Checker server bound to its socket, ready to run."""

    def __init__(self, settings: Settings) -> None:
        settings.validate()
        self.settings = settings
        self.criu = find_criu(settings.criu_path)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_state_directory(settings.state_dir)
        self.checkpoints = create_checkpoint_store(settings)
        self.listener = bind_socket(settings.host, settings.port)
        self.api_url = api_url_for(self.listener)
        self.manager: JobManager | None = None
        self._uvicorn: uvicorn.Server | None = None
        self.job_sockets = JobSockets()
        """Unix sockets of jobs without a network (gvisor), served by the same application."""

    @asynccontextmanager
    async def _manager(self) -> AsyncIterator[JobManager]:
        become_child_subreaper()
        state = StateStore(self.settings.database_url or sqlite_url(self.settings.state_dir))
        if state.applied_migrations:
            logger.info("state store migrated to schema version %d", state.applied_migrations[-1])
        checkpoints = self.checkpoints
        runtimes = create_runtimes(self.criu, self.settings.criu_timeout_seconds, self.settings.state_dir)
        manager = JobManager(self.settings, state, checkpoints, runtimes, self.api_url, self.criu.version, self.job_sockets)
        self.manager = manager
        logger.info("server listening on %s (CRIU %s at %s, state in %s)", self.api_url, self.criu.version, self.criu.path, self.settings.state_dir)
        await manager.recover()
        try:
            yield manager
        finally:
            await manager.shutdown()
            await self.job_sockets.close_all()
            state.close()
            if self.settings.drain_on_shutdown:
                logger.info("server stopped; drained jobs resume at the next start")
            else:
                logger.info("server stopped; running jobs were left running for the next server to re-adopt")

    def build_uvicorn(self) -> uvicorn.Server:
        app = create_app(self._manager, self.settings.api_token)
        config = uvicorn.Config(app, log_config=None, access_log=False, timeout_keep_alive=5, lifespan="on")
        self._uvicorn = uvicorn.Server(config)
        self.job_sockets.attach(self._uvicorn)
        return self._uvicorn

    async def serve(self) -> None:
        server = self.build_uvicorn()
        await server.serve(sockets=[self.listener])

    def request_stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    @property
    def started(self) -> bool:
        return self._uvicorn is not None and self._uvicorn.started


def run_server(settings: Settings) -> None:
    """Run a server in the foreground until SIGINT or SIGTERM."""
    asyncio.run(Server(settings).serve())
