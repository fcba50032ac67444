"""In-job client of the runtime API, standard library only.

A job may run in any environment Checker starts it in, so this module imports
nothing outside the standard library. It opens a fresh HTTP connection for each
call: a connection that stays open across a checkpoint is restored closed
(CRIU restores with --tcp-close), and a new connection per call never hits that.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

ENV_API_URL = "CHECKER_API_URL"
ENV_JOB_ID = "CHECKER_JOB_ID"
ENV_TOKEN = "CHECKER_TOKEN"
ENV_PARAMS = "CHECKER_PARAMS"
ENV_RETRY_SECONDS = "CHECKER_API_RETRY_SECONDS"

DEFAULT_RETRY_SECONDS = 600.0
"""How long a call keeps retrying while the server cannot be reached, in seconds.

A server restart (an upgrade, or recovery after a crash) must not fail the jobs
that call it meanwhile, so the default covers a slow restart.
"""

CHECKPOINT_TIMEOUT_SECONDS = 3600.0
"""Maximum wait for the response to one checkpoint call, in seconds; dumping a large job takes seconds."""


class RuntimeAPIError(Exception):
    """A call to the runtime API was rejected (4xx) or never succeeded in time."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CheckpointResult:
    """Result of `checkpoint()` in the job."""

    restored: bool
    """True in a copy of the job restored from the checkpoint's image, False in
    the process that asked for the checkpoint and goes on running. A restored
    copy should re-open network connections and refresh clocks and credentials."""

    number: int | None
    """Checkpoint number within the job (1, 2, ...), or None outside Checker."""

    standalone: bool = False
    """True when the script runs outside Checker and no checkpoint was taken."""


class RuntimeClient:
    """Client of the runtime API for one job, authenticated by the job's token."""

    def __init__(self, api_url: str, job_id: str, token: str, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        parsed = urllib.parse.urlsplit(api_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise RuntimeAPIError(f"invalid {ENV_API_URL} {api_url!r}: expected http://HOST:PORT")
        self._host = parsed.hostname
        self._port = parsed.port or 80
        self._job_id = job_id
        self._token = token
        self._retry_seconds = retry_seconds

    @classmethod
    def from_environment(cls) -> "RuntimeClient | None":
        """Build a client from the job's environment, or None outside Checker."""
        api_url = os.environ.get(ENV_API_URL)
        if not api_url:
            return None

        job_id = os.environ.get(ENV_JOB_ID)
        token = os.environ.get(ENV_TOKEN)
        if not job_id or not token:
            raise RuntimeAPIError(f"{ENV_API_URL} is set but {ENV_JOB_ID} or {ENV_TOKEN} is missing")

        retry_seconds = float(os.environ.get(ENV_RETRY_SECONDS, DEFAULT_RETRY_SECONDS))
        return cls(api_url, job_id, token, retry_seconds)

    @property
    def job_id(self) -> str:
        return self._job_id

    def params(self) -> dict[str, Any]:
        """Fetch the parameters the job was spawned with."""
        return self._call("GET", "params", None, timeout=60.0)["params"]

    def checkpoint(self) -> CheckpointResult:
        """Ask the server to snapshot this process, and wait for the answer.

        The token identifies this one call. When the connection breaks, the
        call is sent again with the same token, so the server answers it
        without taking a second checkpoint. A restored copy wakes up inside
        this call with its connection closed, retries, and is told
        `restored: true`.
        """
        flush_standard_streams()
        token = secrets.token_hex(16)
        answer = self._call("POST", "checkpoint", {"token": token}, timeout=CHECKPOINT_TIMEOUT_SECONDS)
        return CheckpointResult(restored=bool(answer["restored"]), number=int(answer["checkpoint"]))

    def report_exit(self, output: Any, exit_code: int) -> None:
        """Store the job's result on the server before the process exits."""
        self._call("POST", "exit", {"exit_code": exit_code, "output": output}, timeout=60.0)

    def _call(self, method: str, action: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        path = f"/v1/runtime/jobs/{urllib.parse.quote(self._job_id)}/{action}"
        deadline = time.monotonic() + self._retry_seconds
        delay = 0.05

        while True:
            try:
                status, payload = self._send(method, path, body, timeout)
            except (ConnectionError, http.client.HTTPException, TimeoutError, OSError) as error:
                last_problem = f"{type(error).__name__}: {error}"
            else:
                if status < 300:
                    return payload
                if status < 500 and status != 429:
                    raise RuntimeAPIError(f"{method} {path} was rejected with {status}: {payload.get('detail', payload)}", status)
                last_problem = f"HTTP {status}: {payload.get('detail', payload)}"

            if time.monotonic() + delay > deadline:
                raise RuntimeAPIError(f"{method} {path} failed for {self._retry_seconds:.0f} s; last error: {last_problem}")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _send(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()

        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {"detail": raw[:200].decode(errors="replace")}
        return response.status, payload


def flush_standard_streams() -> None:
    """Flush Python's stdout and stderr buffers into the job's log files.

    Buffered text that is still in memory at a checkpoint would be written
    once by the running process and once more by every restored copy.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
