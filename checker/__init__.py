"""Checker: durable execution by memory checkpointing.

Inside a job, use the SDK functions exported here::

    import checker

    settings = checker.params()
    ...
    result = checker.checkpoint()
    if result.restored:
        reconnect()
    ...
    checker.exit({"rows": 42})

This module imports only the standard library, so jobs can use it anywhere.
"""

from checker.sdk import (
    CheckpointResult,
    RuntimeAPIError,
    SignalResult,
    checkpoint,
    checkpoint_lock,
    exit,
    in_checker,
    params,
    receive_signal,
    sleep,
    suspend,
    wait_for_signal,
)

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
__version__ = "0.1.0"
