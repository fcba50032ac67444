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

from checker.sdk import CheckpointResult, RuntimeAPIError, checkpoint, exit, in_checker, params

__all__ = ["CheckpointResult", "RuntimeAPIError", "checkpoint", "exit", "in_checker", "params"]
__version__ = "0.1.0"
