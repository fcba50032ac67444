"""Benchmark: checkpoint and restore of a `sandbox` job, SandboxRuntime against raw CRIU.

For each size the driver starts one sandboxed Python process that keeps SIZE
MiB resident, through SandboxRuntime with a memory limit. Each repetition:

1. times `criu dump --leave-running` of the job, run by hand with the
   runtime's dump options (raw), and SandboxRuntime.checkpoint() with
   leave_running (Checker), into separate directories, taking turns at
   going first;
2. SIGKILLs the job and times a hand-run `criu restore` of the raw image
   with the runtime's restore options, its prepared root and cgroup set up
   beforehand and outside the timing (raw), then kills that copy and times
   SandboxRuntime.restore() of the Checker image, which includes setting up
   the cgroup and the root.

The Checker figures exclude the server (HTTP, hashing, SQLite): see
bench/checkpoint_bench.py for those. Run as root:

    .venv/bin/python bench/sandbox_bench.py --sizes 50,500 --repetitions 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from checker.runtimes.base import JobFiles, LaunchSpec
from checker.runtimes.cgroups import Limits
from checker.runtimes.criu import find_criu
from checker.runtimes.process import DUMP_OPTIONS, restore_options
from checker.runtimes.procfs import become_child_subreaper, identify
from checker.runtimes.sandbox import SandboxRuntime
from runtime_pairs import kill_and_wait, print_ratio_header, print_ratio_row, write_hold_job


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,500", help="comma-separated sizes of the job's memory, in MiB")
    parser.add_argument("--repetitions", type=int, default=5, help="dumps and restores per size and variant")
    return parser.parse_args()


def timed_criu(arguments: list[str], log_path: Path) -> float:
    criu = find_criu()
    started = time.perf_counter()
    subprocess.run([str(criu.path), *arguments, "--log-file", str(log_path)], check=True, timeout=600)
    return time.perf_counter() - started


async def measure_size(runtime: SandboxRuntime, work: Path, size_mib: int, repetitions: int) -> dict[str, list[float]]:
    scripts = work / "scripts"
    scripts.mkdir(exist_ok=True)
    write_hold_job(scripts)
    config = {"command": ["/usr/bin/python3", "/bench/hold.py", str(size_mib)], "read_only_binds": [f"{scripts}:/bench"]}
    files = JobFiles.under(work / f"job-{size_mib}")
    spec = LaunchSpec(job_id=f"bench-{size_mib}-{os.getpid()}", command=config["command"], env={}, files=files, config=config, limits=Limits(memory_mib=size_mib + 256))
    timings: dict[str, list[float]] = {"raw dump": [], "checker dump": [], "raw restore": [], "checker restore": []}

    process = await runtime.start(spec)
    await asyncio.sleep(2.0 + size_mib / 200)  # Time to fill the memory.
    try:
        for repetition in range(repetitions):
            raw_image = work / f"raw-{size_mib}-{repetition}"
            checker_image = work / f"checker-{size_mib}-{repetition}"
            raw_image.mkdir()
            checker_image.mkdir()

            async def raw_dump() -> None:
                os.sync()
                arguments = ["dump", "--tree", str(process.pid), "--images-dir", str(raw_image), *DUMP_OPTIONS, "--leave-running"]
                timings["raw dump"].append(timed_criu(arguments, raw_image / "dump.log"))

            async def checker_dump() -> None:
                os.sync()
                started = time.perf_counter()
                await runtime.checkpoint(spec, process, checker_image, leave_running=True, log_path=checker_image / "dump.log", context="bench dump")
                timings["checker dump"].append(time.perf_counter() - started)

            # The variants take turns going first, so neither always pays for the other's writeback.
            dumps = [raw_dump, checker_dump] if repetition % 2 == 0 else [checker_dump, raw_dump]
            for dump in dumps:
                await dump()

            await kill_and_wait(process)
            runtime.job_cgroup(spec).create(spec.limits)
            root = runtime.prepare_restore_root(spec)
            pid_file = files.job_dir / "raw.pid"
            pid_file.unlink(missing_ok=True)
            os.sync()
            arguments = ["restore", "--images-dir", str(raw_image), *restore_options(files.job_dir, root), *runtime.job_cgroup(spec).criu_restore_options(), "--pidfile", str(pid_file)]
            timings["raw restore"].append(timed_criu(arguments, raw_image / "restore.log"))
            raw_copy = identify(int(pid_file.read_text()))
            assert raw_copy is not None, "the raw restore's copy exited at once"
            await kill_and_wait(raw_copy)

            os.sync()
            started = time.perf_counter()
            process = await runtime.restore(spec, checker_image, log_path=checker_image / "restore.log", context="bench restore")
            timings["checker restore"].append(time.perf_counter() - started)

            shutil.rmtree(raw_image)
            shutil.rmtree(checker_image)
    finally:
        await kill_and_wait(process)
        await runtime.cleanup(spec)
    return timings


async def main() -> None:
    arguments = parse_arguments()
    become_child_subreaper()
    runtime = SandboxRuntime(find_criu())
    work = Path(tempfile.mkdtemp(prefix="checker-sandbox-bench-", dir="/var/tmp"))
    try:
        print_ratio_header()
        for size in (int(part) for part in arguments.sizes.split(",")):
            timings = await measure_size(runtime, work, size, arguments.repetitions)
            print_ratio_row(size, timings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
