"""Asyncio forms of the SDK functions.

Each call runs the blocking call in a worker thread, so the event loop keeps
serving other tasks while a checkpoint is being taken. The dump freezes the
whole process anyway; the thread only keeps the loop responsive before and after.
"""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

from checker import sdk
from checker.sdk.client import CheckpointResult


async def checkpoint() -> CheckpointResult:
    """Snapshot this whole process; see `checker.checkpoint`."""
    return await asyncio.to_thread(sdk.checkpoint)


async def params() -> dict[str, Any]:
    """Return the job's parameters; see `checker.params`."""
    return await asyncio.to_thread(sdk.params)


async def exit(output: Any = None, exit_code: int = 0) -> NoReturn:
    """Report the result and exit; see `checker.exit`."""
    await asyncio.to_thread(_report, output, exit_code)
    raise SystemExit(exit_code)


def _report(output: Any, exit_code: int) -> None:
    try:
        sdk.exit(output, exit_code)
    except SystemExit:
        pass
