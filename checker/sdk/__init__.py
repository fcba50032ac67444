"""The in-job SDK: checkpoint(), params() and exit(), with asyncio forms in `checker.sdk.aio`.

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

from checker.sdk.client import ENV_PARAMS, CheckpointResult, RuntimeAPIError, RuntimeClient, flush_standard_streams

__all__ = ["CheckpointResult", "RuntimeAPIError", "checkpoint", "exit", "in_checker", "params"]

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


def checkpoint() -> CheckpointResult:
    """Snapshot this whole process; return whether this is the continuing or a restored copy."""
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
