"""In-job client of the runtime API, standard library only.

A job may run in any environment Checker starts it in, so this module imports
nothing outside the standard library. It opens a fresh HTTP connection for each
call: a connection that stays open across a checkpoint is restored closed
(CRIU restores with --tcp-close), and a new connection per call never hits that.

The transport comes from CHECKER_API_URL: `http://HOST:PORT` is TCP, and
`unix:///PATH` is HTTP over the unix socket at PATH, which is how jobs in a
gVisor sandbox reach the server. User code sees no difference.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

ENV_API_URL = "CHECKER_API_URL"
ENV_JOB_ID = "CHECKER_JOB_ID"
ENV_TOKEN = "CHECKER_TOKEN"
ENV_IDENTITY_FILE = "CHECKER_IDENTITY_FILE"
ENV_PARAMS = "CHECKER_PARAMS"
ENV_RETRY_SECONDS = "CHECKER_API_RETRY_SECONDS"

DEFAULT_RETRY_SECONDS = 600.0
"""How long a call keeps retrying while the server cannot be reached, in seconds.

A server restart (an upgrade, or recovery after a crash) must not fail the jobs
that call it meanwhile, so the default covers a slow restart.
"""

CHECKPOINT_TIMEOUT_SECONDS = 3600.0
"""Maximum wait for the response to one checkpoint call, in seconds; dumping a large job takes seconds."""


# Statuses that mean "try again": a server starting or overloaded, or a proxy
# that lost it. A 500 is a failed operation (a dump that failed, say) and is raised.
RETRIED_STATUSES = frozenset({429, 502, 503, 504})


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


@dataclass(frozen=True)
class SignalResult:
    """Result of `wait_for_signal()` or `receive_signal()`."""

    name: str
    """Name of the signal that was waited for."""

    received: bool
    """True when a signal arrived; False after a timeout."""

    payload: Any = None
    """The JSON payload the signal was sent with."""

    timed_out: bool = False

    restored: bool = False
    """True when the job was suspended to wait and restored to receive the result."""


MAX_SUSPEND_SECONDS = 366 * 24 * 3600.0
"""Maximum sleep, suspension or signal timeout the server accepts, in seconds."""

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(duration: float | int | str) -> float:
    """Return seconds for a number of seconds or a string such as "90s", "6h" or "1h30m"; raise ValueError otherwise."""
    if isinstance(duration, bool) or not isinstance(duration, (int, float, str)):
        raise ValueError(f"invalid duration {duration!r}: use seconds or a string such as '6h'")
    if isinstance(duration, (int, float)):
        seconds = float(duration)
    else:
        text = duration.strip().replace(" ", "")
        parts = _DURATION_PART.findall(text)
        if not text or "".join(number + unit for number, unit in parts) != text:
            raise ValueError(f"invalid duration {duration!r}: use seconds or a string such as '90s', '6h' or '1h30m'")
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if seconds != seconds or seconds < 0:
        raise ValueError(f"invalid duration {duration!r}: give a number of seconds of 0 or more")
    if seconds > MAX_SUSPEND_SECONDS:
        raise ValueError(f"invalid duration {duration!r}: the longest is 366 days")
    return seconds


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP connection over a unix stream socket at `socket_path`."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.settimeout(self.timeout)
            connection.connect(self._socket_path)
        except OSError:
            # A refused connect must leave no socket behind: gVisor cannot
            # checkpoint a sandbox that has a host unix socket open.
            connection.close()
            raise
        self.sock = connection


class KeepaliveHTTPConnection(http.client.HTTPConnection):
    """HTTP connection over TCP that notices within seconds when its peer has forgotten it.

    A call may wait minutes for its response (a checkpoint), so a read timeout
    cannot tell a slow response from a lost connection. Keepalive probes can:
    a peer that has forgotten the connection, such as the user network of a
    restored VM, replies to them with a reset, and the call is retried.
    """

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                self.sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class RuntimeClient:
    """Client of the runtime API for one job, authenticated by the job's token."""

    def __init__(self, api_url: str, job_id: str, token: str, retry_seconds: float = DEFAULT_RETRY_SECONDS, identity_file: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(api_url)
        self._socket_path: str | None = None
        if parsed.scheme == "unix" and parsed.path.startswith("/") and not parsed.netloc:
            self._socket_path = urllib.parse.unquote(parsed.path)
        elif parsed.scheme != "http" or not parsed.hostname:
            raise RuntimeAPIError(f"invalid {ENV_API_URL} {api_url!r}: expected http://HOST:PORT or unix:///SOCKET-PATH")
        self._host = parsed.hostname or "localhost"
        self._port = parsed.port or 80
        self._job_id = job_id
        self._token = token
        self._retry_seconds = retry_seconds
        self._identity_file = identity_file

    @classmethod
    def from_environment(cls) -> "RuntimeClient | None":
        """Build a client from the job's environment, or None outside Checker."""
        api_url = os.environ.get(ENV_API_URL)
        if not api_url:
            return None
        retry_seconds = float(os.environ.get(ENV_RETRY_SECONDS, DEFAULT_RETRY_SECONDS))

        identity_file = os.environ.get(ENV_IDENTITY_FILE)
        if identity_file:
            job_id, token = read_identity(identity_file)
            return cls(api_url, job_id, token, retry_seconds, identity_file)

        job_id = os.environ.get(ENV_JOB_ID)
        token = os.environ.get(ENV_TOKEN)
        if not job_id or not token:
            raise RuntimeAPIError(f"{ENV_API_URL} is set but {ENV_JOB_ID} or {ENV_TOKEN} is missing")
        return cls(api_url, job_id, token, retry_seconds)

    @property
    def job_id(self) -> str:
        self._reload_identity()
        return self._job_id

    def _reload_identity(self) -> None:
        """Read the job id and token again, because a copy forked from this process's image belongs to another job."""
        if self._identity_file is not None:
            self._job_id, self._token = read_identity(self._identity_file)

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

    def suspend(self, *, seconds: float | None = None, until: float | None = None) -> CheckpointResult:
        """Checkpoint, stop and free this process until a time; return in the copy restored then."""
        flush_standard_streams()
        body: dict[str, Any] = {"token": secrets.token_hex(16)}
        if until is not None:
            body["until"] = until
        else:
            body["seconds"] = seconds
        answer = self._call("POST", "suspend", body, timeout=CHECKPOINT_TIMEOUT_SECONDS)
        return CheckpointResult(restored=bool(answer["restored"]), number=int(answer["checkpoint"]))

    def wait_for_signal(self, name: str, timeout_seconds: float | None) -> SignalResult:
        """Return the next signal `name`, suspending the job until it arrives or the timeout passes."""
        flush_standard_streams()
        body = {"token": secrets.token_hex(16), "name": name, "timeout_seconds": timeout_seconds}
        answer = self._call("POST", "signals/wait", body, timeout=CHECKPOINT_TIMEOUT_SECONDS)
        signal = answer.get("signal")
        if signal is None:
            return SignalResult(name=name, received=False, timed_out=bool(answer.get("timed_out")), restored=bool(answer["restored"]))
        return SignalResult(name=name, received=True, payload=signal["payload"], restored=bool(answer["restored"]))

    def receive_signal(self, name: str) -> SignalResult | None:
        """Return the next signal `name` if one is waiting, else None, without suspending."""
        answer = self._call("POST", "signals/receive", {"token": secrets.token_hex(16), "name": name}, timeout=60.0)
        signal = answer.get("signal")
        return None if signal is None else SignalResult(name=name, received=True, payload=signal["payload"])

    def acquire_lock(self) -> str:
        """Take a checkpoint lock; wait while a checkpoint is pending. Return the lock's name."""
        token = secrets.token_hex(16)
        self._call("POST", "locks", {"token": token}, timeout=CHECKPOINT_TIMEOUT_SECONDS)
        return token

    def release_lock(self, lock: str) -> None:
        self._call("DELETE", f"locks/{lock}", None, timeout=60.0)

    def report_exit(self, output: Any, exit_code: int) -> None:
        """Store the job's result on the server before the process exits."""
        self._call("POST", "exit", {"exit_code": exit_code, "output": output}, timeout=60.0)

    def _call(self, method: str, action: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + self._retry_seconds
        delay = 0.05

        while True:
            # Each attempt may run in a restored or forked copy, so it reads the identity again.
            self._reload_identity()
            path = f"/v1/runtime/jobs/{urllib.parse.quote(self._job_id)}/{action}"
            try:
                status, payload = self._send(method, path, body, timeout)
            except (ConnectionError, http.client.HTTPException, TimeoutError, OSError) as error:
                last_problem = f"{type(error).__name__}: {error}"
            else:
                if status < 300:
                    return payload
                if status not in RETRIED_STATUSES:
                    raise RuntimeAPIError(f"{method} {path} failed with {status}: {payload.get('detail', payload)}", status)
                last_problem = f"HTTP {status}: {payload.get('detail', payload)}"

            if time.monotonic() + delay > deadline:
                raise RuntimeAPIError(f"{method} {path} failed for {self._retry_seconds:.0f} s; last error: {last_problem}")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _send(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, dict[str, Any]]:
        connection: http.client.HTTPConnection
        if self._socket_path is not None:
            connection = UnixHTTPConnection(self._socket_path, timeout)
        else:
            connection = KeepaliveHTTPConnection(self._host, self._port, timeout=timeout)
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


def read_identity(path: str) -> tuple[str, str]:
    """Read the job id and token from the identity file that Checker writes for each job."""
    try:
        with open(path, encoding="utf-8") as identity_file:
            identity = json.load(identity_file)
        return str(identity["job_id"]), str(identity["token"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RuntimeAPIError(f"cannot read the job identity from {ENV_IDENTITY_FILE} {path!r}: {error}") from error


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
