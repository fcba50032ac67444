"""Compare checkpoint and restore times of the runtimes for the same job.

One Checker server runs the same job once per runtime: it fills --size-mb MB
of memory with random data, takes --checkpoints checkpoints and then sleeps. The checkpoint
figure is the server's dump time of each checkpoint (`dump_seconds`: the
runtime's dump, plus for gvisor the pause and the work directory archive).
Then the driver SIGKILLs the job's process --restores times (at most 3,
because the server fails a job that crashes more often from one checkpoint),
and the restore
figure is the `seconds` of each `restored` event (image verification plus the
runtime's restore). Medians are printed as a Markdown table.

The process runtime is the reference: each figure is also given as a ratio
to the process runtime's, measured in the same run. A vm job's image is the
whole guest (kernel, initramfs, the job), compressed with zstd.

Run as root: .venv/bin/python bench/runtime_bench.py [--runtimes process gvisor vm]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from checker.cli.client import CallerClient  # noqa: E402
from conftest import ServerProcess, free_port  # noqa: E402

WAIT_SECONDS = 120.0
BOOT_WAIT_SECONDS = 600.0
"""A vm job boots a guest under TCG first, and its checkpoints save the whole guest."""

JOB_SOURCE = """
import os, time
import checker

params = checker.params()
ballast = bytearray(os.urandom(1 << 20)) * params["size_mb"]
for _ in range(params["checkpoints"]):
    checker.checkpoint()
while True:
    time.sleep(0.1)
"""


def wait_for(condition, what: str, seconds: float = WAIT_SECONDS) -> dict:
    """Poll `condition` until it returns a truthy value; raise TimeoutError naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {seconds:.0f} s waiting for {what}")


def measure(client: CallerClient, script: Path, runtime: str, size_mb: int, checkpoints: int, restores: int) -> dict:
    """Run the job under `runtime`; return its median dump, restore and image figures."""
    command = [sys.executable, str(script)]
    options: dict = {}
    if runtime == "gvisor":
        options = {"mounts": [str(script.parent)]}
    elif runtime == "vm":
        command = ["python3", str(script)]  # the guest's Python
        options = {"files": [str(script)]}
    definition = client.create_definition(f"bench-{runtime}", command, runtime={"type": runtime, **options})
    job = client.spawn(definition["name"], params={"size_mb": size_mb, "checkpoints": checkpoints}, version=definition["version"])
    job_id = job["id"]
    wait_for(lambda: (found := client.get_job(job_id))["checkpoint_count"] >= checkpoints and found, f"{checkpoints} checkpoints of the {runtime} job", BOOT_WAIT_SECONDS)

    for number in range(1, restores + 1):
        pid = client.get_job(job_id)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (found := client.get_job(job_id))["restore_count"] >= number and found["state"] == "running" and found, f"restore {number} of the {runtime} job")

    records = client.request("GET", f"/v1/jobs/{job_id}/checkpoints").json()["items"]
    restored = [event["data"]["seconds"] for event in client.events(job_id) if event["kind"] == "restored"]
    client.kill(job_id)
    return {
        "runtime": runtime,
        "dump": statistics.median(record["dump_seconds"] for record in records),
        "restore": statistics.median(restored),
        "image_mb": statistics.median(record["size_bytes"] for record in records) / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", nargs="+", default=["process", "gvisor", "vm"], help="runtimes to measure (default: process gvisor vm); process is always measured first, as the reference")
    parser.add_argument("--size-mb", type=int, default=50, help="memory the job fills with random data, in MiB (default 50)")
    parser.add_argument("--checkpoints", type=int, default=5, help="checkpoints per runtime (default 5)")
    parser.add_argument(
        "--restores", type=int, default=3, choices=range(1, 4), help="SIGKILLs and restores per runtime, at most 3 (default 3)"
    )
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="checker-runtime-bench-") as work:
        script = Path(work) / "jobs" / "ballast_job.py"
        script.parent.mkdir()
        script.write_text(JOB_SOURCE)
        server = ServerProcess(state_dir=Path(work) / "state", port=free_port(), log_path=Path(work) / "server.log")
        server.start()
        try:
            with CallerClient(server.url) as client:
                runtimes = ["process", *(runtime for runtime in arguments.runtimes if runtime != "process")]
                rows = [measure(client, script, runtime, arguments.size_mb, arguments.checkpoints, arguments.restores) for runtime in runtimes]
        finally:
            server.stop()

    print(f"job: {arguments.size_mb} MiB of random data, {arguments.checkpoints} checkpoints, {arguments.restores} restores per runtime (medians)\n")
    reference = rows[0]
    print(f"| runtime | checkpoint (dump) s | × {reference['runtime']} | restore s | × {reference['runtime']} | image MB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['runtime']} | {row['dump']:.3f} | {row['dump'] / reference['dump']:.2f} "
            f"| {row['restore']:.3f} | {row['restore'] / reference['restore']:.2f} | {row['image_mb']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
