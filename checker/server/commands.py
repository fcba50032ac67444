"""Commands of the per-job actor, and the results it returns to the job's calls.

The HTTP handlers put these on a runner's queue (see runner.py), and the
runner handles them one at a time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from checker.runtimes.base import ExitStatus
from checker.runtimes.procfs import ProcessIdentity
from checker.store.state import StateStore, TokenRecord


def answer_from_token(state: StateStore, known: "TokenRecord") -> "CheckpointAnswer":
    """Answer a repeated call from its stored token: `restored` when the job was restored since."""
    job = state.get_job(known.job_id)
    restored = job is not None and job.restore_count > known.restore_count
    return CheckpointAnswer(restored=restored, checkpoint=known.checkpoint_number, result=known.result)


@dataclass(frozen=True)
class CheckpointAnswer:
    restored: bool
    checkpoint: int
    result: dict | None = None
    """For a suspending call: {"signal": ...}, {"timed_out": true} or {"woke": "time"}."""


@dataclass(frozen=True)
class SuspendRequest:
    """Wake condition of a job that suspends itself."""

    wake_at: float | None
    """Unix time to restore the job at; None waits for the signal only."""

    signal: str | None
    """Name of the signal that wakes the job, or None for a plain sleep."""


@dataclass
class PendingCheckpoint:
    """One dump that every concurrent checkpoint request of the job shares.

    A suspending dump (stop mode) belongs to exactly one call and is never shared.
    """

    tokens: list[str]
    answer: asyncio.Future
    leave_running: bool = True
    dump_finished: bool = False
    suspend: SuspendRequest | None = None


RESUMED_BY_CALLER = "a caller resumed it"


@dataclass(frozen=True)
class Wake:
    """Restore a suspended job: its wake time came or its signal arrived."""

    reason: str


@dataclass(frozen=True)
class ProcessExited:
    process: ProcessIdentity
    status: ExitStatus


@dataclass(frozen=True)
class KillCommand:
    reason: str
    done: asyncio.Future
    error_code: str = "killed"


@dataclass(frozen=True)
class Retry:
    """Start the next attempt of a job that is pending_retry."""


@dataclass(frozen=True)
class ExitReport:
    exit_code: int
    output: Any
    done: asyncio.Future


@dataclass(frozen=True)
class Boot:
    """First command of every runner: start, restore or adopt the job."""

    adopt: ProcessIdentity | None = None
    restore_reason: str | None = None
    """Restore the newest valid checkpoint at once, for this reason (a fork)."""
