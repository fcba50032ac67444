"""Benchmark job: hold SIZE bytes of resident memory, then checkpoint on request.

Run by bench/checkpoint_bench.py in two ways, with the same arguments:

* As a Checker job. It takes one timed `checker.checkpoint()` per `go-checkpoint-N`
  file that the driver creates in CONTROL_DIR. Then it enters the restore
  phase: it takes a checkpoint and waits to be killed. The restored copy
  records the time it resumed, takes the next checkpoint, and waits again,
  until it has been restored `--restores` times.
* Standalone (no Checker server), as the process for raw CRIU dumps and
  restores. It only fills its memory and waits until CONTROL_DIR/stop exists.

Results go to CONTROL_DIR/results.jsonl, one JSON object a line. The file is
opened and closed for each line, so it is never open in a checkpoint image.
Checker does not rewind it on a restore, because it only rewinds the job's
stdout and stderr logs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import checker

FILL_CHUNK_BYTES = 1 << 20
POLL_SECONDS = 0.01


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-bytes", type=int, required=True, help="bytes of memory to fill and keep resident")
    parser.add_argument("--control-dir", type=Path, required=True, help="directory for go files and results.jsonl")
    parser.add_argument("--checkpoints", type=int, default=5, help="number of timed checkpoints")
    parser.add_argument("--restores", type=int, default=5, help="number of restores to wait for")
    parser.add_argument("--wait-seconds", type=float, default=600.0, help="maximum wait for a go file or a kill, in seconds")
    return parser.parse_args()


def fill_memory(size: int) -> bytearray:
    """Return a bytearray of `size` bytes with every page written with random data.

    The buffer repeats one random 1 MiB chunk: every page is non-zero and
    resident, and filling 1 GiB takes well under a second.
    """
    chunk = os.urandom(FILL_CHUNK_BYTES)
    data = bytearray(size)
    for offset in range(0, size, FILL_CHUNK_BYTES):
        end = min(offset + FILL_CHUNK_BYTES, size)
        data[offset:end] = chunk[: end - offset]
    return data


def resident_bytes() -> int:
    """Return VmRSS of this process in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS line missing from /proc/self/status")


def report(control_dir: Path, kind: str, **values: object) -> None:
    record = {"kind": kind, "pid": os.getpid(), "time": time.time(), **values}
    with open(control_dir / "results.jsonl", "a") as results:
        results.write(json.dumps(record) + "\n")


def wait_for_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(POLL_SECONDS)
    return False


def run_checkpoints(arguments: argparse.Namespace) -> None:
    for repetition in range(arguments.checkpoints):
        if not wait_for_file(arguments.control_dir / f"go-checkpoint-{repetition}", arguments.wait_seconds):
            raise SystemExit(f"timed out after {arguments.wait_seconds:.0f} s waiting for go-checkpoint-{repetition}")
        started = time.perf_counter()
        result = checker.checkpoint()
        seconds = time.perf_counter() - started
        report(arguments.control_dir, "checkpoint", repetition=repetition, number=result.number, seconds=seconds, restored=result.restored)


def run_restores(arguments: argparse.Namespace) -> int:
    """Checkpoint and wait to be killed until restored `--restores` times, and return the restore count.

    `restores_seen` lives in the image, so each restored copy continues from
    the count at its checkpoint. A fresh checkpoint after every restore keeps
    the server's crash-loop limit (restores without a new checkpoint) from failing the job.
    """
    restores_seen = 0
    for _ in range(2 * arguments.restores + 1):
        if restores_seen >= arguments.restores:
            break
        started = time.perf_counter()
        result = checker.checkpoint()
        seconds = time.perf_counter() - started
        if result.restored:
            restores_seen += 1
            report(arguments.control_dir, "restored", restore=restores_seen, number=result.number)
            continue

        report(arguments.control_dir, "ready", restore=restores_seen, number=result.number, seconds=seconds)
        # The driver SIGKILLs this process while it sleeps here.
        time.sleep(arguments.wait_seconds)
        raise SystemExit(f"not killed within {arguments.wait_seconds:.0f} s after checkpoint {result.number}")
    return restores_seen


def main() -> None:
    arguments = parse_arguments()
    data = fill_memory(arguments.size_bytes)
    report(arguments.control_dir, "filled", size_bytes=len(data), resident_bytes=resident_bytes(), in_checker=checker.in_checker())

    if not checker.in_checker():
        if not wait_for_file(arguments.control_dir / "stop", arguments.wait_seconds):
            raise SystemExit(f"timed out after {arguments.wait_seconds:.0f} s waiting for the stop file")
        return

    run_checkpoints(arguments)
    restores = run_restores(arguments)
    checker.exit({"restores": restores, "size_bytes": len(data)})


if __name__ == "__main__":
    main()
