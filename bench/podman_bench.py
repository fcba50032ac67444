"""Benchmark: checkpoint and restore of a `podman` job, PodmanRuntime against raw podman.

For each size the driver starts one Python process that keeps SIZE MiB
resident in a podman container, through PodmanRuntime with a memory limit.
Each repetition:

1. times `podman container checkpoint --leave-running --export FILE
   --compress none` of the job's container, run by hand (raw), and
   PodmanRuntime.checkpoint() with leave_running (Checker), into separate
   directories. The two take turns at going first. Both pass the runtime's global
   options (`--runtime runc --cgroup-manager cgroupfs`) and both dumps read
   the same CRIU configuration file with the runtime's dump options
   (tcp-close, link-remap). Only the Checker dump adds the action script
   that archives the work directory;
2. SIGKILLs the job and times `podman container restore --import FILE
   --name NAME` of the raw archive, with the runtime's restore options in
   the CRIU configuration file (raw), and PodmanRuntime.restore() of the
   Checker archive, which also reads the archive's spec and puts back the
   work directory. Each restored copy is killed and removed before the
   other variant restores, and the two take turns at going first. When the
   Checker restore went first, an untimed Checker restore brings the job
   back for the next repetition.

The Checker figures exclude the server (HTTP, hashing, SQLite): see
bench/checkpoint_bench.py for those. Run as root, with an image in podman's
local storage that has /usr/bin/python3 (tests/test_podman.py imports the
test root file system as localhost/checker-test-bookworm):

    .venv/bin/python bench/podman_bench.py --image localhost/checker-test-bookworm:latest --sizes 50,500 --repetitions 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from checker.runtimes.base import JobFiles, LaunchSpec
from checker.runtimes.cgroups import Limits
from checker.runtimes.container import DUMP_CRIU_OPTIONS, RESTORE_CRIU_OPTIONS, container_prefix, write_criu_config
from checker.runtimes.criu import find_criu
from checker.runtimes.podman import PODMAN_OPTIONS, PodmanRuntime, find_podman
from checker.runtimes.procfs import ProcessIdentity, become_child_subreaper, identify
from runtime_pairs import kill_and_wait, print_ratio_header, print_ratio_row, write_hold_job


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="image in podman's local storage with /usr/bin/python3, e.g. localhost/checker-test-bookworm:latest")
    parser.add_argument("--sizes", default="50,500", help="comma-separated sizes of the job's memory, in MiB")
    parser.add_argument("--repetitions", type=int, default=5, help="checkpoints and restores per size and variant")
    return parser.parse_args()


def podman_command(*arguments: str) -> list[str]:
    podman = find_podman()
    assert podman is not None, "podman is not installed; run scripts/install-podman.sh"
    return [podman, *PODMAN_OPTIONS, *arguments]


def podman_environment() -> dict[str, str]:
    """Return the environment for podman, with CRIU's directory first on PATH as PodmanRuntime sets it."""
    return {**os.environ, "PATH": f"{find_criu().path.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def run_podman(*arguments: str) -> str:
    completed = subprocess.run(
        podman_command(*arguments), check=True, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, env=podman_environment()
    )
    return completed.stdout


def timed_podman(*arguments: str) -> float:
    started = time.perf_counter()
    run_podman(*arguments)
    return time.perf_counter() - started


def container_of(job_id: str, pid: int) -> str:
    """Return the name of the job's podman container whose init has PID `pid`."""
    listed = json.loads(run_podman("ps", "--all", "--format", "json", "--filter", f"name=^{container_prefix(job_id)}") or "[]")
    return next(container["Names"][0] for container in listed if container.get("Pid") == pid)


def criu_config_of(name: str) -> Path:
    """Return the CRIU configuration file that the container's org.criu.config annotation names."""
    return Path(run_podman("inspect", "--format", '{{ index .Config.Annotations "org.criu.config" }}', name).strip())


async def measure_size(runtime: PodmanRuntime, image: str, work: Path, size_mib: int, repetitions: int) -> dict[str, list[float]]:
    scripts = work / "scripts"
    scripts.mkdir(exist_ok=True)
    write_hold_job(scripts)
    config = {"command": ["/usr/bin/python3", "/bench/hold.py", str(size_mib)], "image": image, "mounts": [f"{scripts}:/bench"]}
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
            name = container_of(spec.job_id, process.pid)
            criu_config = criu_config_of(name)
            raw_archive = raw_image / "checkpoint.tar"

            async def raw_dump() -> None:
                write_criu_config(criu_config, DUMP_CRIU_OPTIONS)
                os.sync()
                timings["raw dump"].append(
                    timed_podman("container", "checkpoint", "--leave-running", "--export", str(raw_archive), "--compress", "none", name)
                )

            async def checker_dump() -> None:
                os.sync()
                started = time.perf_counter()
                await runtime.checkpoint(spec, process, checker_image, leave_running=True, log_path=work / "checker-dump.log", context="bench dump")
                timings["checker dump"].append(time.perf_counter() - started)

            # The variants take turns going first, so neither always pays for the other's writeback.
            checker_first = repetition % 2 == 1
            for dump in [checker_dump, raw_dump] if checker_first else [raw_dump, checker_dump]:
                await dump()

            await kill_and_wait(process)
            await runtime.wait(spec, process)  # Removes the stopped container.

            async def raw_restore() -> None:
                raw_name = f"{container_prefix(spec.job_id)}raw-{repetition}"
                write_criu_config(criu_config, RESTORE_CRIU_OPTIONS)
                os.sync()
                timings["raw restore"].append(timed_podman("container", "restore", "--import", str(raw_archive), "--name", raw_name))
                raw_copy = identify(int(run_podman("inspect", "--format", "{{.State.Pid}}", raw_name).strip()))
                assert raw_copy is not None, "the raw restore's copy exited at once"
                await kill_and_wait(raw_copy)
                run_podman("rm", "--force", "--time", "0", raw_name)

            async def checker_restore() -> ProcessIdentity:
                os.sync()
                started = time.perf_counter()
                restored = await runtime.restore(spec, checker_image, log_path=work / "checker-restore.log", context="bench restore")
                timings["checker restore"].append(time.perf_counter() - started)
                return restored

            if checker_first:
                process = await checker_restore()
                await kill_and_wait(process)
                await runtime.wait(spec, process)
                await raw_restore()
                process = await runtime.restore(spec, checker_image, log_path=work / "checker-restore.log", context="bench restore, untimed")
            else:
                await raw_restore()
                process = await checker_restore()

            shutil.rmtree(raw_image)
            shutil.rmtree(checker_image)
    finally:
        await kill_and_wait(process)
        await runtime.wait(spec, process)
        await runtime.cleanup(spec)
    return timings


async def main() -> None:
    arguments = parse_arguments()
    become_child_subreaper()
    runtime = PodmanRuntime(find_criu())
    work = Path(tempfile.mkdtemp(prefix="checker-podman-bench-", dir="/var/tmp"))
    try:
        print_ratio_header()
        for size in (int(part) for part in arguments.sizes.split(",")):
            timings = await measure_size(runtime, arguments.image, work, size, arguments.repetitions)
            print_ratio_row(size, timings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
