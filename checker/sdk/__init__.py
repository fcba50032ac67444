"""The in-job SDK: checkpoint(), params(), exit(), sleep(), suspend(), wait_for_signal(),
receive_signal() and checkpoint_lock(), with asyncio forms in `checker.sdk.aio`.

Inside a Checker job the functions call the runtime API of the server that runs
the job. Outside Checker (no CHECKER_API_URL in the environment) the script
runs standalone: `checkpoint()` takes no checkpoint and returns
`CheckpointResult(restored=False, number=None, standalone=True)`, `params()`
reads the JSON object in CHECKER_PARAMS (or returns {}), and `exit(output)`
prints the output as JSON on stdout and exits.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any, NoReturn

import contextlib
import contextvars
import datetime
import time
from collections.abc import Iterator

from checker.sdk.client import ENV_PARAMS, CheckpointResult, RuntimeAPIError, RuntimeClient, SignalResult, flush_standard_streams, parse_duration

__all__ = [
    "CheckpointResult",
    "RuntimeAPIError",
    "SignalResult",
    "checkpoint",
    "checkpoint_lock",
    "exit",
    "in_checker",
    "params",
    "receive_signal",
    "sleep",
    "suspend",
    "wait_for_signal",
]

_client: RuntimeClient | None = None
_client_loaded = False
_client_lock = threading.Lock()


def _runtime_client() -> RuntimeClient | None:
    global _client, _client_loaded
    with _client_lock:
        if not _client_loaded:
            _client = RuntimeClient.from_environment()
            _client_loaded = True
        return _client


def in_checker() -> bool:
    """Return whether this process runs as a Checker job."""
    return _runtime_client() is not None


# Checkpoint locks held by the current thread or asyncio task. A ContextVar is
# per thread and per task, and asyncio.to_thread copies it into the worker.
_locks_held: contextvars.ContextVar[int] = contextvars.ContextVar("checker_locks_held", default=0)


def _refuse_checkpoint_under_lock() -> None:
    if _locks_held.get():
        raise RuntimeAPIError(
            "a checkpoint inside checkpoint_lock() (checkpoint, sleep, suspend or wait_for_signal) would wait for its own lock; "
            "call it outside the lock"
        )


@contextlib.contextmanager
def checkpoint_lock() -> Iterator[None]:
    """Hold off checkpoints while the block runs, so none cuts its work in half.

    Any number of threads may hold locks at once; a checkpoint waits until
    none is held, and new locks wait while a checkpoint is pending. The lock is
    released on leaving the block, also by an exception. Outside Checker it
    does nothing.
    """
    client = _runtime_client()
    if client is None:
        yield
        return

    lock = client.acquire_lock()
    depth = _locks_held.set(_locks_held.get() + 1)
    try:
        yield
    finally:
        _locks_held.reset(depth)
        client.release_lock(lock)


def checkpoint() -> CheckpointResult:
    """Snapshot this whole process; return whether this is the continuing or a restored copy."""
    _refuse_checkpoint_under_lock()
    client = _runtime_client()
    if client is None:
        return CheckpointResult(restored=False, number=None, standalone=True)
    return client.checkpoint()


def params() -> dict[str, Any]:
    """Return the job's parameters (a JSON object)."""
    client = _runtime_client()
    if client is not None:
        return client.params()

    raw = os.environ.get(ENV_PARAMS)
    if not raw:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise RuntimeAPIError(f"{ENV_PARAMS} must hold a JSON object, got {type(value).__name__}")
    return value


def sleep(duration: float | str) -> CheckpointResult:
    """Suspend the job for `duration` (seconds, or a string such as "90s", "6h", "1h30m").

    The job is checkpointed and its process ends, so a long sleep costs disk,
    not memory or CPU. The call returns in the copy restored at the wake time,
    with `restored=True`. Outside Checker it sleeps in place.
    """
    seconds = parse_duration(duration)
    _refuse_checkpoint_under_lock()
    client = _runtime_client()
    if client is None:
        time.sleep(seconds)
        return CheckpointResult(restored=False, number=None, standalone=True)
    return client.suspend(seconds=seconds)


def suspend(until: datetime.datetime | float) -> CheckpointResult:
    """Suspend the job until a time: an aware datetime or a Unix time in seconds. See `sleep`."""
    if isinstance(until, datetime.datetime):
        if until.tzinfo is None:
            raise ValueError(f"suspend(until={until!r}) needs a timezone-aware datetime, e.g. datetime.now(timezone.utc)")
        wake_at = until.timestamp()
    elif isinstance(until, (int, float)) and not isinstance(until, bool):
        wake_at = float(until)
    else:
        raise ValueError(f"suspend(until={until!r}) needs a timezone-aware datetime or a Unix time in seconds")
    parse_duration(max(0.0, wake_at - time.time()))  # Rejects a wake time more than 366 days ahead.
    _refuse_checkpoint_under_lock()
    client = _runtime_client()
    if client is None:
        time.sleep(max(0.0, wake_at - time.time()))
        return CheckpointResult(restored=False, number=None, standalone=True)
    return client.suspend(until=wake_at)


def wait_for_signal(name: str, timeout: float | str | None = None) -> SignalResult:
    """Wait for the next signal `name`, suspended to disk; give up after `timeout` (seconds or "6h").

    A signal sent before the call is kept and returned at once. Each signal is
    delivered to exactly one call. A timeout of 0 only polls: the job is not
    suspended, and the result is timed out when no signal is waiting. Outside
    Checker no signal can arrive: the call sleeps for `timeout` and returns a
    timed-out result, or raises RuntimeAPIError without a timeout.
    """
    timeout_seconds = None if timeout is None else parse_duration(timeout)
    if timeout_seconds == 0:
        received = receive_signal(name)
        return received if received is not None else SignalResult(name=name, received=False, timed_out=True)
    _refuse_checkpoint_under_lock()
    client = _runtime_client()
    if client is None:
        if timeout_seconds is None:
            raise RuntimeAPIError(f"wait_for_signal({name!r}) without a timeout would wait forever outside Checker")
        time.sleep(timeout_seconds)
        return SignalResult(name=name, received=False, timed_out=True)
    return client.wait_for_signal(name, timeout_seconds)


def receive_signal(name: str) -> SignalResult | None:
    """Return the next signal `name` if one is waiting, else None; the job keeps running. None outside Checker."""
    client = _runtime_client()
    return None if client is None else client.receive_signal(name)


def exit(output: Any = None, exit_code: int = 0) -> NoReturn:
    """Report `output` (JSON-serialisable) as the job's result and exit with `exit_code`."""
    json.dumps(output)  # Raise TypeError here, in the job, not as a rejected request.

    client = _runtime_client()
    if client is None:
        print(json.dumps(output), flush=True)
    else:
        client.report_exit(output, exit_code)

    flush_standard_streams()
    sys.exit(exit_code)
