"""Measure the chunk store on a heap that changes a little between two checkpoints.

bench/heap_change_job.py fills a heap (1 GiB by default) with random pages,
is checkpointed, changes 1 % of its pages, and is checkpointed again. The
benchmark runs it twice in the same run:

* as a job of a `checker server` with default settings (chunks, zstd level 1,
  fsync), started with the `checker` command. It prints the bytes the second
  checkpoint stored as a fraction of the heap, the time of each
  `checker.checkpoint()` call (measured in the job), and the `seconds` of the
  server's "restored" event after a SIGKILL of the job;
* standalone in the same kind of namespaces (the bwrap command of Checker's
  process runtime, with its pidinit.py as PID 1), dumped by `criu dump` to a
  plain directory and restored by `criu restore`, timed as whole processes.

The two variants run one after the other, and before each timed step the
driver calls sync() and waits --settle-seconds. Run as root from the
repository root: .venv/bin/python bench/dedupe_bench.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from checkpoint_bench import DEFAULT_CRIU, BenchError, job_environment, reap, settle, wait_for_result, wait_until

from checker.cli.client import CallerClient
from checker.runtimes.process import DUMP_OPTIONS, launch_command, restore_options
from checker.runtimes.procfs import become_child_subreaper, is_alive, identify, list_children

logger = logging.getLogger("dedupe_bench")

JOB_SCRIPT = Path(__file__).resolve().parent / "heap_change_job.py"
STORED_FRACTION_TARGET = 0.05
START_TIMEOUT_SECONDS = 60.0


def job_command(arguments: argparse.Namespace, control_dir: Path) -> list[str]:
    return [
        sys.executable, str(JOB_SCRIPT),
        "--size-bytes", str(arguments.size_bytes),
        "--control-dir", str(control_dir),
        "--percent", str(arguments.percent),
        "--pattern", arguments.pattern,
    ]


def run_criu(criu: str, arguments: list[str], log_path: Path, what: str) -> float:
    """Run CRIU with `arguments` and return its wall time in seconds; raise BenchError naming `what` when it fails."""
    started = time.perf_counter()
    completed = subprocess.run([criu, *arguments, "--log-file", str(log_path)], stdin=subprocess.DEVNULL, capture_output=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise BenchError(f"raw {what} failed with exit code {completed.returncode}; see {log_path}")
    return seconds


def directory_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())


def bench_raw(arguments: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Dump the job twice to plain directories and restore the second image, with CRIU alone."""
    job_dir, control, images = work_dir / "raw-job", work_dir / "raw-control", work_dir / "raw-images"
    (job_dir / "work").mkdir(parents=True)
    control.mkdir()
    images.mkdir()
    launcher = subprocess.Popen(
        launch_command(job_dir, job_command(arguments, control)),
        env=job_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    init_pid = wait_until(lambda: list_children(launcher.pid), START_TIMEOUT_SECONDS, "the raw job's namespace init")[0]
    wait_for_result(control, "ready", "the raw job to fill its heap")

    dump_seconds = []
    for step in (1, 2):
        (control / f"go-{step}").touch()
        wait_for_result(control, "checkpoint", f"the raw job to reach dump {step}", step=step)
        settle(arguments.settle_seconds)
        image_dir = images / str(step)
        image_dir.mkdir()
        dump_arguments = ["dump", "--tree", str(init_pid), "--images-dir", str(image_dir), "--leave-running", *DUMP_OPTIONS]
        dump_seconds.append(run_criu(arguments.criu, dump_arguments, work_dir / f"raw-dump-{step}.log", f"criu dump {step}"))

    os.kill(init_pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    settle(arguments.settle_seconds)
    pid_file = work_dir / "raw-restored.pid"
    restore_arguments = ["restore", "--images-dir", str(images / "2"), *restore_options(job_dir), "--pidfile", str(pid_file)]
    restore_seconds = run_criu(arguments.criu, restore_arguments, work_dir / "raw-restore.log", "criu restore")
    restored = identify(int(pid_file.read_text()))
    if restored is None or not is_alive(restored):
        raise BenchError("the raw restored process exited at once; see raw-restore.log")

    (control / "stop").touch()
    reap(restored.pid, 60)
    return {"dump_seconds": dump_seconds, "restore_seconds": restore_seconds, "image_bytes": [directory_bytes(images / "1"), directory_bytes(images / "2")]}


def bench_checker(arguments: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Checkpoint the job twice and restore it from the second checkpoint, as a job of a `checker server`."""
    state_dir, control = work_dir / "checker-state", work_dir / "checker-control"
    control.mkdir()
    log_path = work_dir / "checker-server.log"
    server_command = [sys.executable, "-m", "checker", "server", "--port", str(arguments.port), "--state-dir", str(state_dir), "--criu", arguments.criu, *arguments.server_option]
    with open(log_path, "a") as log:
        server = subprocess.Popen(server_command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    client = CallerClient(f"http://127.0.0.1:{arguments.port}")
    try:
        wait_until(lambda: client.is_up() or server.poll() is not None, START_TIMEOUT_SECONDS, "the Checker server to start")
        if server.poll() is not None:
            raise BenchError(f"the Checker server exited with {server.returncode}; see {log_path} (is port {arguments.port} in use? pick another with --port)")
        client.create_definition("heap-change", job_command(arguments, control))
        job_id = client.spawn("heap-change")["id"]
        wait_for_result(control, "ready", "the Checker job to fill its heap")

        checkpoint_seconds = []
        for step in (1, 2):
            settle(arguments.settle_seconds)
            (control / f"go-{step}").touch()
            checkpoint_seconds.append(wait_for_result(control, "checkpoint", f"checkpoint {step} of job {job_id}", step=step)["seconds"])
        checkpoints = client.checkpoints(job_id)

        if arguments.drop_restore_cache:
            shutil.rmtree(state_dir / "checkpoints" / job_id / f"{checkpoints[1]['number']}.cache")
        settle(arguments.settle_seconds)
        os.kill(client.get_job(job_id)["pid"], signal.SIGKILL)
        wait_for_result(control, "restored", f"the restore of job {job_id}")
        restored = wait_until(lambda: [e for e in client.events(job_id) if e["kind"] == "restored"], 60, f"the restored event of job {job_id}")[0]
        (control / "stop").touch()
        client.result(job_id, wait=60)
        return {
            "checkpoint_seconds": checkpoint_seconds,
            "restore_seconds": restored["data"]["seconds"],
            "rebuild_seconds": restored["data"]["rebuild_seconds"],
            "image_source": restored["data"].get("image_source"),
            "checkpoints": checkpoints,
        }
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=60)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-bytes", type=int, default=1 << 30, help="heap size in bytes (default 1 GiB)")
    parser.add_argument("--percent", type=float, default=1.0, help="percentage of pages changed between the checkpoints (default 1)")
    parser.add_argument("--pattern", choices=["clustered", "scattered"], default="clustered", help="16 runs of adjacent pages, or single pages (default clustered)")
    parser.add_argument("--criu", default=DEFAULT_CRIU, help=f"CRIU binary (default {DEFAULT_CRIU})")
    parser.add_argument("--port", type=int, default=8447, help="port of the benchmark's Checker server (default 8447)")
    parser.add_argument("--settle-seconds", type=float, default=1.0, help="pause after sync() before each timed step (default 1)")
    parser.add_argument("--server-option", action="append", default=[], help="extra option for `checker server`, such as --no-checkpoint-dedupe (repeatable; use --server-option=--flag)")
    parser.add_argument("--drop-restore-cache", action="store_true", help="delete the restore cache before the kill, so the restore rebuilds the image from chunks")
    parser.add_argument("--json-output", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the images and state directory")
    return parser.parse_args()


def main() -> int:
    arguments = parse_arguments()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        print("dedupe_bench: run as root (CRIU and PID namespaces need it)", file=sys.stderr)
        return 2
    become_child_subreaper()
    work_dir = Path(tempfile.mkdtemp(prefix="dedupe-bench-", dir=Path.cwd()))
    try:
        raw = bench_raw(arguments, work_dir)
        store = bench_checker(arguments, work_dir)
    except BenchError as error:
        print(f"dedupe_bench: {error}; work directory {work_dir}", file=sys.stderr)
        return 1
    finally:
        if not arguments.keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)

    second = store["checkpoints"][1]
    fraction = second["stored_bytes"] / arguments.size_bytes
    figures = {
        "size_bytes": arguments.size_bytes,
        "percent_changed": arguments.percent,
        "pattern": arguments.pattern,
        "stored_fraction_second": fraction,
        "checkpoint_ratios": [c / r for c, r in zip(store["checkpoint_seconds"], raw["dump_seconds"])],
        "restore_ratio": store["restore_seconds"] / raw["restore_seconds"],
        "raw": raw,
        "checker": store,
    }
    print(f"heap {arguments.size_bytes / (1 << 30):.2f} GiB, {arguments.percent:g} % of pages changed ({arguments.pattern})")
    print(f"stored by checkpoint 1: {store['checkpoints'][0]['stored_bytes'] / 1e6:.1f} MB of a {store['checkpoints'][0]['size_bytes'] / 1e6:.1f} MB image")
    verdict = "meets" if fraction <= STORED_FRACTION_TARGET else "misses"
    print(f"stored by checkpoint 2: {second['stored_bytes'] / 1e6:.1f} MB = {fraction:.2%} of the heap ({verdict} the {STORED_FRACTION_TARGET:.0%} target)")
    for step, (checked, dumped) in enumerate(zip(store["checkpoint_seconds"], raw["dump_seconds"]), start=1):
        print(f"checkpoint {step}: Checker {checked:.3f} s, raw criu dump {dumped:.3f} s, ratio {checked / dumped:.2f}")
    print(
        f"restore: Checker {store['restore_seconds']:.3f} s (image from {store['image_source']}, preparing it {store['rebuild_seconds']:.3f} s), "
        f"raw criu restore {raw['restore_seconds']:.3f} s, ratio {figures['restore_ratio']:.2f}"
    )
    if arguments.json_output:
        arguments.json_output.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
