"""Per-job unix sockets on which the server serves the runtime API.

A job in a gVisor sandbox has no network. It reaches the server through a
unix socket of its own, bind-mounted into the sandbox. runsc (2024-07 build)
cannot checkpoint a sandbox that has a connection to a host unix socket open,
because the checkpoint fails with an encoding error. So while the server checkpoints such
a job it stops listening on the job's socket and aborts every connection of
it, the in-flight checkpoint call included. The SDK's connects are refused
meanwhile and it retries with the same token, so the call is answered from
the stored result once the socket listens again, as after a restore.

Each socket is served by the same ASGI application as the TCP listener, in
the same event loop, with uvicorn's HTTP protocol. Each socket has its own
uvicorn ServerState, so the connections of one job are known.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import uvicorn
from uvicorn.server import ServerState

logger = logging.getLogger(__name__)


@dataclass
class JobSocket:
    """The listener of one job's socket and the connections accepted on it."""

    path: Path
    state: ServerState = field(default_factory=ServerState)
    listener: asyncio.AbstractServer | None = None


class JobSockets:
    """Opens, pauses and closes the unix socket of each job that needs one."""

    def __init__(self) -> None:
        self._uvicorn: uvicorn.Server | None = None
        self._sockets: dict[str, JobSocket] = {}

    def attach(self, server: uvicorn.Server) -> None:
        """Serve the sockets with `server`'s application and HTTP protocol."""
        self._uvicorn = server

    async def open(self, job_id: str, path: Path) -> None:
        """Listen on `path` for job `job_id`, replacing a stale socket file; do nothing when it listens already."""
        job_socket = self._sockets.setdefault(job_id, JobSocket(path))
        if job_socket.listener is not None:
            return
        server = self._uvicorn
        if server is None:
            raise RuntimeError("JobSockets.attach() must be called before a job socket is opened")
        config = server.config
        app_state = server.lifespan.state

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(config=config, server_state=job_socket.state, app_state=app_state)

        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        job_socket.listener = await asyncio.get_running_loop().create_unix_server(create_protocol, path=str(path), backlog=64)
        os.chmod(path, 0o600)

    async def stop_listening(self, job_id: str) -> int:
        """Stop accepting connections of job `job_id` and abort the open ones; return how many were aborted."""
        job_socket = self._sockets.get(job_id)
        if job_socket is None:
            return 0
        if job_socket.listener is not None:
            job_socket.listener.close()
            job_socket.listener = None

        # A socket file with no listener makes the job's connects fail with
        # ECONNREFUSED, which the SDK retries.
        connections = list(job_socket.state.connections)
        for connection in connections:
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()
        # Let the event loop run connection_lost() of each aborted connection.
        await asyncio.sleep(0)
        return len(connections)

    @asynccontextmanager
    async def paused(self, job_id: str) -> AsyncIterator[None]:
        """Keep job `job_id` without any connection to the server while the block runs, then listen again."""
        job_socket = self._sockets.get(job_id)
        aborted = await self.stop_listening(job_id)
        if aborted:
            logger.debug("job %s: aborted %d runtime API connection(s) for a checkpoint", job_id, aborted)
        try:
            yield
        finally:
            if job_socket is not None:
                await self.open(job_id, job_socket.path)

    async def close(self, job_id: str) -> None:
        """Stop serving job `job_id` and remove its socket file."""
        await self.stop_listening(job_id)
        job_socket = self._sockets.pop(job_id, None)
        if job_socket is not None:
            job_socket.path.unlink(missing_ok=True)

    async def close_all(self) -> None:
        for job_id in list(self._sockets):
            await self.close(job_id)
