"""Asyncio forms of the SDK functions.

Each call runs the blocking call in a worker thread, so the event loop keeps
serving other tasks while a checkpoint is being taken. The dump freezes the
whole process anyway; the thread only keeps the loop responsive before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from checker import sdk
from checker.sdk.client import CheckpointResult, SignalResult


@contextlib.asynccontextmanager
async def checkpoint_lock() -> AsyncIterator[None]:
    """Hold off checkpoints while the block runs; see `checker.checkpoint_lock`."""
    client = sdk._runtime_client()
    if client is None:
        yield
        return

    lock = await asyncio.to_thread(client.acquire_lock)
    depth = sdk._locks_held.set(sdk._locks_held.get() + 1)
    try:
        yield
    finally:
        sdk._locks_held.reset(depth)
        await asyncio.to_thread(client.release_lock, lock)


async def checkpoint() -> CheckpointResult:
    """Snapshot this whole process; see `checker.checkpoint`."""
    return await asyncio.to_thread(sdk.checkpoint)


async def params() -> dict[str, Any]:
    """Return the job's parameters; see `checker.params`."""
    return await asyncio.to_thread(sdk.params)


async def sleep(duration: float | str) -> CheckpointResult:
    """Suspend the job for `duration`; see `checker.sleep`."""
    return await asyncio.to_thread(sdk.sleep, duration)


async def suspend(until: Any) -> CheckpointResult:
    """Suspend the job until a time; see `checker.suspend`."""
    return await asyncio.to_thread(sdk.suspend, until)


async def wait_for_signal(name: str, timeout: float | str | None = None) -> SignalResult:
    """Wait for the next signal `name`, suspended; see `checker.wait_for_signal`."""
    return await asyncio.to_thread(sdk.wait_for_signal, name, timeout)


async def receive_signal(name: str) -> SignalResult | None:
    """Return the next signal `name` if one is waiting; see `checker.receive_signal`."""
    return await asyncio.to_thread(sdk.receive_signal, name)


async def exit(output: Any = None, exit_code: int = 0) -> NoReturn:
    """Report the result and exit; see `checker.exit`."""
    await asyncio.to_thread(_report, output, exit_code)
    raise SystemExit(exit_code)


def _report(output: Any, exit_code: int) -> None:
    try:
        sdk.exit(output, exit_code)
    except SystemExit:
        pass
