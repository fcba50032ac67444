"""Compare the vm runtime's checkpoint and restore with QEMU's own save and load of the same VM.

One guest boots through the vm runtime with a job that fills --size-mb MiB of
memory with random data and then sleeps. Each repetition then measures, in
alternating order:

- raw save: QMP `stop`, `migrate` to `exec:cat > FILE`, poll `query-migrate`
  until it completes, `cont`; the plain QEMU way of saving a VM.
- Checker save: the runtime's checkpoint with the VM left running (stop when
  no API connection is open, migrate through zstd, continue, correct the
  guest clock).
- raw restore: QEMU with the same command line and `-S -incoming "exec:cat
  FILE"`, polled until the snapshot is loaded, then `cont`.
- Checker restore: the runtime's restore of its image, clock correction
  included.

Each restored VM is killed before the next step. The figures exclude the
server's checkpoint store (see runtime_bench.py for the whole path).

Run as root: .venv/bin/python bench/vm_bench.py [--size-mb 50] [--repetitions 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checker.runtimes import procfs
from checker.runtimes.base import JobFiles, LaunchSpec, write_identity
from checker.runtimes.vm import MEMORY_NAME, Machine, Qmp, VmFiles, VmRuntime, find_qemu

JOB_SOURCE = """
import os, sys, time
ballast = bytearray(os.urandom(1 << 20)) * int(sys.argv[1])
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""


async def wait_for_ready(files: JobFiles, deadline_seconds: float = 600.0) -> None:
    deadline = time.monotonic() + deadline_seconds
    while "ready" not in files.stdout_path.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guest job did not fill its memory within {deadline_seconds:.0f} s")
        await asyncio.sleep(0.1)


async def raw_save(vm: VmFiles, target: Path) -> float:
    started = time.monotonic()
    qmp = await Qmp.connect(vm.qmp_socket)
    try:
        await qmp.execute("stop")
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        await qmp.execute("migrate", {"uri": f"exec:cat > {target}"})
        for _ in range(100_000):
            status = (await qmp.execute("query-migrate")).get("status")
            if status in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.01)
        if status != "completed":
            raise RuntimeError(f"raw save ended {status}")
        await qmp.execute("cont")
    finally:
        await qmp.close()
    return time.monotonic() - started


async def raw_restore(runtime: VmRuntime, spec: LaunchSpec, machine: Machine, vm: VmFiles, source: Path) -> tuple[float, procfs.ProcessIdentity]:
    started = time.monotonic()
    vm.prepare()
    process = subprocess.Popen(
        [*runtime._command(spec, machine, vm), "-S", "-incoming", f"exec:cat {source}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    qmp = await Qmp.connect(vm.qmp_socket)
    try:
        for _ in range(100_000):
            status = (await qmp.execute("query-status")).get("status")
            if status != "inmigrate":
                break
            await asyncio.sleep(0.01)
        await qmp.execute("cont")
    finally:
        await qmp.close()
    seconds = time.monotonic() - started
    return seconds, procfs.identify(process.pid)


async def stop(runtime: VmRuntime, spec: LaunchSpec, process: procfs.ProcessIdentity) -> None:
    await runtime.kill(process)
    await procfs.wait_for_exit(process)


async def run(size_mb: int, repetitions: int, work: Path) -> dict[str, list[float]]:
    qemu = find_qemu()
    if qemu is None:
        raise SystemExit("vm_bench: qemu-system-x86_64 not found; run scripts/install-qemu.sh")
    runtime = VmRuntime(qemu)
    script = work / "ballast.py"
    script.write_text(JOB_SOURCE)
    files = JobFiles.under(work / "job")
    files.work_dir.mkdir(parents=True)
    write_identity(files, "bench", "not-a-token")
    config = {"command": ["python3", str(script), str(size_mb)], "files": [str(script)]}
    spec = LaunchSpec("bench", config["command"], {}, files, config)
    vm = VmFiles.of(files)

    process = await runtime.start(spec)
    await wait_for_ready(files)
    machine = Machine.read(vm.machine)
    figures: dict[str, list[float]] = {"raw save": [], "Checker save": [], "raw restore": [], "Checker restore": [], "raw MB": [], "Checker MB": []}
    raw_image = work / "raw.img"
    checker_image = work / "image"

    for repetition in range(repetitions):
        shutil.rmtree(checker_image, ignore_errors=True)
        checker_image.mkdir()
        order = ("raw", "Checker") if repetition % 2 == 0 else ("Checker", "raw")
        for variant in order:
            started = time.monotonic()
            if variant == "raw":
                figures["raw save"].append(await raw_save(vm, raw_image))
            else:
                await runtime.checkpoint(spec, process, checker_image, leave_running=True, log_path=work / "checkpoint.log", context="bench")
                figures["Checker save"].append(time.monotonic() - started)
        figures["raw MB"].append(raw_image.stat().st_size / 1e6)
        figures["Checker MB"].append((checker_image / MEMORY_NAME).stat().st_size / 1e6)

        await stop(runtime, spec, process)
        for variant in order:
            if variant == "raw":
                seconds, restored = await raw_restore(runtime, spec, machine, vm, raw_image)
                figures["raw restore"].append(seconds)
            else:
                started = time.monotonic()
                restored = await runtime.restore(spec, checker_image, log_path=work / "restore.log", context="bench")
                figures["Checker restore"].append(time.monotonic() - started)
            await stop(runtime, spec, restored)
        process = await runtime.restore(spec, checker_image, log_path=work / "restore.log", context="bench")

    await stop(runtime, spec, process)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50, help="memory the guest job fills with random data, in MiB (default 50)")
    parser.add_argument("--repetitions", type=int, default=5, help="saves and restores of each kind (default 5)")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="checker-vm-bench-") as work:
        figures = asyncio.run(run(arguments.size_mb, arguments.repetitions, Path(work)))

    median = {name: statistics.median(values) for name, values in figures.items()}
    print(f"guest job: {arguments.size_mb} MiB of random data; {arguments.repetitions} repetitions, medians, alternating order\n")
    print("| step | raw QEMU s | Checker s | ratio |")
    print("|---|---|---|---|")
    for step in ("save", "restore"):
        raw, ours = median[f"raw {step}"], median[f"Checker {step}"]
        print(f"| {step} | {raw:.3f} | {ours:.3f} | {ours / raw:.2f} |")
    print(f"| image MB | {median['raw MB']:.0f} | {median['Checker MB']:.0f} | {median['Checker MB'] / median['raw MB']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
