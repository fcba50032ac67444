"""Benchmark: checkpoint and restore of a `container` job, ContainerRuntime against raw runc.

For each size the driver starts one Python process in a container that keeps
SIZE MiB resident, through ContainerRuntime with a memory limit. Each
repetition:

1. times `runc checkpoint --leave-running` of the job's container, run by
   hand with runc's own defaults (raw: an empty CRIU configuration file, so
   no work directory archive), and ContainerRuntime.checkpoint() with
   leave_running (Checker: tcp-close, link-remap and the action script that
   archives the work directory), into separate directories, taking turns
   at going first;
2. SIGKILLs the job and times a hand-run `runc restore --detach` of the raw
   image into a new container from a copy of the job's bundle (raw), then
   kills that copy and times ContainerRuntime.restore() of the Checker
   image, which includes writing the bundle and putting back the work
   directory.

The Checker figures exclude the server (HTTP, hashing, SQLite): see
bench/checkpoint_bench.py for those. Run as root, with a root file system
built by scripts/build-rootfs.sh:

    .venv/bin/python bench/container_bench.py --rootfs /var/cache/checker-tests/rootfs-bookworm --sizes 50,500 --repetitions 5
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
from checker.runtimes.container import BUNDLES_DIR, RUNC_ROOT, ContainerRuntime, find_runc, write_criu_config
from checker.runtimes.criu import find_criu
from checker.runtimes.procfs import become_child_subreaper, identify
from runtime_pairs import kill_and_wait, print_ratio_header, print_ratio_row, write_hold_job


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rootfs", required=True, help="root file system directory with python3 (scripts/build-rootfs.sh DIR)")
    parser.add_argument("--sizes", default="50,500", help="comma-separated sizes of the job's memory, in MiB")
    parser.add_argument("--repetitions", type=int, default=5, help="checkpoints and restores per size and variant")
    return parser.parse_args()


def runc_command(*arguments: str) -> list[str]:
    runc = find_runc()
    assert runc is not None, "runc is not installed; run scripts/install-runc.sh"
    return [runc, "--root", str(RUNC_ROOT), "--criu", str(find_criu().path), *arguments]


def timed_runc(*arguments: str) -> float:
    started = time.perf_counter()
    subprocess.run(runc_command(*arguments), check=True, timeout=600, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def container_of(pid: int) -> str:
    listed = subprocess.run(runc_command("list", "--format", "json"), check=True, capture_output=True, text=True, timeout=60)
    return next(container["id"] for container in json.loads(listed.stdout) if container["pid"] == pid)


def raw_bundle(job_bundle: Path, target: Path) -> Path:
    """Copy the job's config.json to `target`, pointing it at an empty CRIU configuration file."""
    target.mkdir(parents=True)
    config = json.loads((job_bundle / "config.json").read_text())
    config["annotations"]["org.criu.config"] = str(target / "criu.conf")
    (target / "config.json").write_text(json.dumps(config))
    write_criu_config(target / "criu.conf", [])
    return target


async def measure_size(runtime: ContainerRuntime, rootfs: str, work: Path, size_mib: int, repetitions: int) -> dict[str, list[float]]:
    scripts = work / "scripts"
    scripts.mkdir(exist_ok=True)
    write_hold_job(scripts)
    config = {"command": ["/usr/bin/python3", "/bench/hold.py", str(size_mib)], "rootfs": rootfs, "mounts": [f"{scripts}:/bench"]}
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
            container_id = container_of(process.pid)

            async def raw_dump() -> None:
                write_criu_config(BUNDLES_DIR / container_id / "criu.conf", [])
                os.sync()
                timings["raw dump"].append(
                    timed_runc("checkpoint", "--leave-running", "--image-path", str(raw_image), "--work-path", str(work / "raw-dump"), container_id)
                )

            async def checker_dump() -> None:
                os.sync()
                started = time.perf_counter()
                await runtime.checkpoint(spec, process, checker_image, leave_running=True, log_path=work / "checker-dump.log", context="bench dump")
                timings["checker dump"].append(time.perf_counter() - started)

            # The variants take turns going first, so neither always pays for the other's writeback.
            dumps = [raw_dump, checker_dump] if repetition % 2 == 0 else [checker_dump, raw_dump]
            for dump in dumps:
                await dump()

            raw_id = f"bench-raw-{size_mib}-{repetition}-{os.getpid()}"
            bundle = raw_bundle(BUNDLES_DIR / container_id, work / raw_id)
            await kill_and_wait(process)
            await runtime.wait(spec, process)  # Deletes the stopped container and its bundle.
            pid_file = work / f"{raw_id}.pid"
            os.sync()
            timings["raw restore"].append(
                timed_runc(
                    "restore", "--detach", "--image-path", str(raw_image), "--work-path", str(work / "raw-restore"),
                    "--bundle", str(bundle), "--pid-file", str(pid_file), raw_id,
                )
            )
            raw_copy = identify(int(pid_file.read_text()))
            assert raw_copy is not None, "the raw restore's copy exited at once"
            await kill_and_wait(raw_copy)
            subprocess.run(runc_command("delete", "--force", raw_id), check=True, timeout=60)

            os.sync()
            started = time.perf_counter()
            process = await runtime.restore(spec, checker_image, log_path=work / "checker-restore.log", context="bench restore")
            timings["checker restore"].append(time.perf_counter() - started)

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
    runtime = ContainerRuntime(find_criu())
    work = Path(tempfile.mkdtemp(prefix="checker-container-bench-", dir="/var/tmp"))
    try:
        print_ratio_header()
        for size in (int(part) for part in arguments.sizes.split(",")):
            timings = await measure_size(runtime, arguments.rootfs, work, size, arguments.repetitions)
            print_ratio_row(size, timings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
