"""Benchmark job: fill a heap with random pages, checkpoint, change 1 % of its pages, checkpoint again.

Run by bench/dedupe_bench.py, as a Checker job or standalone (for raw CRIU):

1. fill SIZE bytes with random data, so that no page equals another and
   nothing compresses; record "ready";
2. on CONTROL_DIR/go-1: take a timed checkpoint (a no-op standalone);
3. on CONTROL_DIR/go-2: change PERCENT of the pages, record "changed", take a
   timed checkpoint; a copy restored from it records "restored";
4. wait until CONTROL_DIR/stop exists.

Results go to CONTROL_DIR/results.jsonl, one JSON object a line, opened and
closed for each line so that it is never open in a checkpoint image.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import checker

PAGE_BYTES = 4096
FILL_BYTES = 64 << 20
CLUSTERED_RUNS = 16
POLL_SECONDS = 0.01


def record(control_dir: Path, **values: object) -> None:
    with open(control_dir / "results.jsonl", "a") as results:
        results.write(json.dumps({**values, "time": time.time()}) + "\n")


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"heap_change_job: {path} did not appear within {timeout:.0f} s")
        time.sleep(POLL_SECONDS)


def change_pages(heap: bytearray, percent: float, pattern: str, seed: int) -> int:
    """Overwrite `percent` of the heap's pages with new random bytes; return the number of pages changed.

    "clustered" changes CLUSTERED_RUNS runs of adjacent pages at random
    places; "scattered" changes single pages picked at random.
    """
    generator = random.Random(seed)
    pages = len(heap) // PAGE_BYTES
    count = max(1, int(pages * percent / 100))
    if pattern == "scattered":
        for page in generator.sample(range(pages), count):
            heap[page * PAGE_BYTES:(page + 1) * PAGE_BYTES] = os.urandom(PAGE_BYTES)
        return count

    run_pages = max(1, count // CLUSTERED_RUNS)
    for _ in range(CLUSTERED_RUNS):
        start = generator.randrange(0, pages - run_pages) * PAGE_BYTES
        heap[start:start + run_pages * PAGE_BYTES] = os.urandom(run_pages * PAGE_BYTES)
    return run_pages * CLUSTERED_RUNS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-bytes", type=int, required=True, help="heap size in bytes")
    parser.add_argument("--control-dir", type=Path, required=True, help="directory of go files and results.jsonl")
    parser.add_argument("--percent", type=float, default=1.0, help="percentage of pages changed between the checkpoints")
    parser.add_argument("--pattern", choices=["clustered", "scattered"], default="clustered", help="where the changed pages lie")
    parser.add_argument("--wait-seconds", type=float, default=900.0, help="maximum wait for a control file, in seconds")
    arguments = parser.parse_args()
    control = arguments.control_dir

    heap = bytearray(arguments.size_bytes)
    for offset in range(0, arguments.size_bytes, FILL_BYTES):
        length = min(FILL_BYTES, arguments.size_bytes - offset)
        heap[offset:offset + length] = os.urandom(length)
    record(control, kind="ready")

    wait_for(control / "go-1", arguments.wait_seconds)
    started = time.perf_counter()
    first = checker.checkpoint()
    record(control, kind="checkpoint", step=1, number=first.number, seconds=time.perf_counter() - started)

    wait_for(control / "go-2", arguments.wait_seconds)
    changed = change_pages(heap, arguments.percent, arguments.pattern, seed=arguments.size_bytes)
    record(control, kind="changed", pages=changed)
    started = time.perf_counter()
    second = checker.checkpoint()
    if second.restored:
        record(control, kind="restored", number=second.number)
    else:
        record(control, kind="checkpoint", step=2, number=second.number, seconds=time.perf_counter() - started)

    wait_for(control / "stop", arguments.wait_seconds)


if __name__ == "__main__":
    main()
