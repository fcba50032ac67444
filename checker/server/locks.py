"""Checkpoint locks: a readers-writer lock between a job's async work and its checkpoints.

Work inside the job that must not be cut in half by a checkpoint (an upload, a
download, a transaction) holds a read lock; a checkpoint is the writer. A
checkpoint waits until no lock is held, and new locks wait while a checkpoint
waits or runs, so a steady stream of short locks cannot starve a checkpoint.
The locks live in the server's memory: a job's process holds none after a
crash or restore (a checkpoint never captures a held lock), so losing them
with the server loses nothing.
"""

from __future__ import annotations

import asyncio


class CheckpointLocks:
    """The lock state of one job, used from the server's event loop only."""

    def __init__(self) -> None:
        self._holders: set[str] = set()
        self._writers_waiting = 0
        self._writer_active = False
        self._changed = asyncio.Condition()

    @property
    def held(self) -> int:
        return len(self._holders)

    async def acquire(self, token: str) -> None:
        """Take a read lock named `token`; wait while a checkpoint waits or runs. Taking a held token again is a no-op."""
        async with self._changed:
            if token in self._holders:
                return
            await self._changed.wait_for(lambda: not self._writers_waiting and not self._writer_active)
            self._holders.add(token)

    async def release(self, token: str) -> bool:
        """Release lock `token`; return whether it was held."""
        async with self._changed:
            held = token in self._holders
            self._holders.discard(token)
            self._changed.notify_all()
            return held

    async def release_all(self) -> int:
        """Release every lock, for a job whose process ended; return how many were held."""
        async with self._changed:
            count = len(self._holders)
            self._holders.clear()
            self._changed.notify_all()
            return count

    async def begin_checkpoint(self, timeout: float) -> None:
        """Wait until no lock is held, then block new locks until `end_checkpoint()`.

        Raises TimeoutError when locks are still held after `timeout` seconds;
        the waiting locks then proceed.
        """
        async with self._changed:
            self._writers_waiting += 1
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: not self._holders), timeout)
                self._writer_active = True
            finally:
                self._writers_waiting -= 1
                self._changed.notify_all()

    async def end_checkpoint(self) -> None:
        async with self._changed:
            self._writer_active = False
            self._changed.notify_all()
