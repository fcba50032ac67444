"""Pieces shared by the benchmarks that time one runtime against its raw tool for the same job."""

from __future__ import annotations

import os
import signal
import statistics
import textwrap
from pathlib import Path

from checker.runtimes.procfs import ProcessIdentity, is_alive, wait_for_exit

HOLD_JOB = """
    import os, sys, time
    block = bytearray(os.urandom(1 << 20)) * int(sys.argv[1])
    for _ in range(6000):
        time.sleep(0.1)
"""
"""Job that keeps `argv[1]` MiB of random (incompressible) memory resident for at most 10 minutes."""


def write_hold_job(directory: Path) -> Path:
    """Write HOLD_JOB as `hold.py` in `directory`; return its path."""
    path = directory / "hold.py"
    path.write_text(textwrap.dedent(HOLD_JOB))
    return path


async def kill_and_wait(process: ProcessIdentity) -> None:
    if is_alive(process):
        os.kill(process.pid, signal.SIGKILL)
    await wait_for_exit(process)


def print_ratio_header() -> None:
    print("| size | raw dump (s) | Checker dump (s) | ratio | raw restore (s) | Checker restore (s) | ratio |")
    print("|---|---|---|---|---|---|---|")


def print_ratio_row(size_mib: int, timings: dict[str, list[float]]) -> None:
    """Print the medians of `timings` ("raw dump", "checker dump", "raw restore", "checker restore") and the Checker/raw ratios."""
    medians = {name: statistics.median(values) for name, values in timings.items()}
    print(
        f"| {size_mib} MiB | {medians['raw dump']:.3f} | {medians['checker dump']:.3f} | {medians['checker dump'] / medians['raw dump']:.2f} "
        f"| {medians['raw restore']:.3f} | {medians['checker restore']:.3f} | {medians['checker restore'] / medians['raw restore']:.2f} |",
        flush=True,
    )
