"""Compare Checker's checkpoint and restore times with raw CRIU on the same process.

For each job size (about 50 MB, 500 MB and 1 GiB resident) the benchmark runs
bench/memory_job.py three times at once:

* as a job of a Checker server that fsyncs checkpoint images (the default),
* as a job of a second Checker server with fsync_checkpoints=False,
* standalone in the same kind of namespaces as a Checker job (the same bwrap
  command, with Checker's pidinit.py as PID 1), for raw `criu dump` and
  `criu restore`.

Checkpoint: the job times `checker.checkpoint()` itself. The raw figure is the
wall time of a `criu dump` process with the options Checker uses.

Restore: the driver SIGKILLs the job's namespace init. It records the
"seconds" of the server's "restored" event (sha256 verification plus
`criu restore`) and the time from the kill until the restored copy runs
again. The raw figure is the wall time of a `criu restore` process.

Repetitions of the three variants are interleaved, and before
each timed operation the driver calls sync() and waits --settle-seconds, so
that no operation pays for the writeback of another one's dirty pages.

Run as root: /work/main/.venv/bin/python bench/checkpoint_bench.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from checker.cli.client import APIError, CallerClient
from checker.runtimes.process import DUMP_OPTIONS, launch_command, restore_options
from checker.runtimes.procfs import become_child_subreaper, list_children
from checker.runtimes.base import INHERITED_ENV
from checker.store.checkpoints import fsync_path, hash_file

logger = logging.getLogger("checkpoint_bench")

BENCH_DIR = Path(__file__).resolve().parent
JOB_SCRIPT = BENCH_DIR / "memory_job.py"
SERVER_SCRIPT = BENCH_DIR / "bench_server.py"

SIZES = {"50MB": 50_000_000, "500MB": 500_000_000, "1GiB": 1 << 30}
DEFAULT_CRIU = "/opt/checker/bin/criu"
DEFAULT_PORT = 8437
RAW_IMAGES_KEPT = 3
"""Raw images kept on disk, like the server's default keep_checkpoints."""

HASH_THREADS = 4
"""Threads for the sha256 profile of raw images, as in LocalCheckpointStore."""

START_TIMEOUT_SECONDS = 60.0
STEP_TIMEOUT_SECONDS = 300.0
POLL_SECONDS = 0.01
STATE_CHECK_SECONDS = 1.0


class BenchError(Exception):
    """A step of the benchmark failed; the message names the step and the cause."""


def wait_until(condition: Callable[[], Any], timeout: float, description: str) -> Any:
    """Poll `condition` until it returns a truthy value, or raise BenchError naming `description` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_SECONDS)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {description}")


def settle(seconds: float) -> None:
    """Flush all dirty pages and pause, so the next timed step starts from a quiet disk."""
    os.sync()
    time.sleep(seconds)


def job_environment() -> dict[str, str]:
    """Return the environment Checker gives a job, without the CHECKER_* variables."""
    return {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}


def job_command(size_bytes: int, control_dir: Path, repetitions: int) -> list[str]:
    return [
        sys.executable, str(JOB_SCRIPT),
        "--size-bytes", str(size_bytes),
        "--control-dir", str(control_dir),
        "--checkpoints", str(repetitions),
        "--restores", str(repetitions),
    ]


def read_results(control_dir: Path) -> list[dict[str, Any]]:
    path = control_dir / "results.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        # A line the job is still writing has no newline yet and may not parse.
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def find_result(control_dir: Path, kind: str, **match: Any) -> dict[str, Any] | None:
    for record in read_results(control_dir):
        if record["kind"] == kind and all(record.get(key) == value for key, value in match.items()):
            return record
    return None


def wait_for_result(control_dir: Path, kind: str, description: str, timeout: float = STEP_TIMEOUT_SECONDS, **match: Any) -> dict[str, Any]:
    return wait_until(lambda: find_result(control_dir, kind, **match), timeout, description)


def reap(pid: int, timeout: float) -> None:
    """Wait for our child (or adopted orphan) `pid` to exit and reap it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if reaped == pid:
            return
        time.sleep(POLL_SECONDS)
    raise BenchError(f"process {pid} did not exit within {timeout:.0f} s of SIGKILL")


# Checker servers and jobs


@dataclass
class BenchServer:
    """A Checker server subprocess started through bench_server.py."""

    name: str
    fsync: bool
    port: int
    state_dir: Path
    criu: str
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, str(SERVER_SCRIPT), "--port", str(self.port), "--state-dir", str(self.state_dir), "--criu", self.criu]
        if not self.fsync:
            command.append("--no-fsync")
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        logger.info("server %s started as process %d on port %d (log %s)", self.name, self.process.pid, self.port, self.log_path)

        with CallerClient(self.url) as client:
            wait_until(lambda: client.is_up() or self.process.poll() is not None, START_TIMEOUT_SECONDS, f"server {self.name} to start")
        if self.process.poll() is not None:
            log_tail = self.log_path.read_text()[-2000:]
            raise BenchError(f"server {self.name} exited with {self.process.returncode} at start (is port {self.port} in use? pick another with --port). End of its log:\n{log_tail}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            logger.warning("server %s (process %d) ignored SIGTERM for 15 s; sending SIGKILL", self.name, self.process.pid)
            self.process.kill()
            self.process.wait(timeout=15)
        logger.info("server %s stopped", self.name)


@dataclass
class CheckerRun:
    """One benchmark job on one Checker server."""

    server: BenchServer
    control_dir: Path
    client: CallerClient
    job_id: str = ""
    finished: bool = False
    checkpoint_seconds: list[float] = field(default_factory=list)
    checkpoint_numbers: list[int] = field(default_factory=list)
    restore_event_seconds: list[float] = field(default_factory=list)
    restore_wall_seconds: list[float] = field(default_factory=list)

    def spawn(self, definition: str, command: list[str]) -> None:
        self.client.create_definition(definition, command)
        self.job_id = self.client.spawn(definition)["id"]
        logger.info("job %s spawned on server %s", self.job_id, self.server.name)

    def take_checkpoint(self, repetition: int) -> None:
        (self.control_dir / f"go-checkpoint-{repetition}").touch()
        record = self.wait_for("checkpoint", f"checkpoint {repetition} of job {self.job_id}", repetition=repetition)
        self.checkpoint_seconds.append(record["seconds"])
        self.checkpoint_numbers.append(record["number"])

    def crash_and_restore(self, repetition: int) -> None:
        """SIGKILL the job's namespace init and wait until the restored copy runs."""
        job = self.client.get_job(self.job_id)
        if job["state"] != "running" or job["pid"] is None:
            raise BenchError(f"job {self.job_id} is {job['state']} with pid {job['pid']}; expected a running job to kill")
        events = self.client.events(self.job_id)
        last_seq = events[-1]["seq"] if events else 0

        killed_at = time.time()
        os.kill(job["pid"], signal.SIGKILL)

        record = self.wait_for("restored", f"restore {repetition + 1} of job {self.job_id}", restore=repetition + 1)
        event = wait_until(lambda: self._restored_event(last_seq), STEP_TIMEOUT_SECONDS, f"the restored event of job {self.job_id}")
        self.restore_event_seconds.append(event["data"]["seconds"])
        self.restore_wall_seconds.append(record["time"] - killed_at)

    def _restored_event(self, after: int) -> dict[str, Any] | None:
        for event in self.client.events(self.job_id, after=after):
            if event["kind"] == "restored":
                return event
            if event["kind"] in ("restore_failed", "failed", "checkpoint_corrupt"):
                raise BenchError(f"job {self.job_id} was not restored: {event['message']}")
        return None

    def wait_for(self, kind: str, description: str, **match: Any) -> dict[str, Any]:
        """Wait for a line of the job's results file, and raise BenchError early if the job ends.

        The job's state is requested only once a second, so that polling adds
        little load to the server while it takes a timed checkpoint.
        """
        next_state_check = time.monotonic() + STATE_CHECK_SECONDS

        def find() -> dict[str, Any] | None:
            nonlocal next_state_check
            record = find_result(self.control_dir, kind, **match)
            if record is None and time.monotonic() >= next_state_check:
                next_state_check = time.monotonic() + STATE_CHECK_SECONDS
                job = self.client.get_job(self.job_id)
                if job["state"] in ("completed", "failed"):
                    raise BenchError(f"job {self.job_id} is {job['state']} ({job['error']}) while waiting for {description}")
            return record

        return wait_until(find, STEP_TIMEOUT_SECONDS, description)

    def finish(self) -> dict[int, dict[str, Any]]:
        """Wait for the job to complete and return its checkpoints by number."""
        result = self.client.result(self.job_id, wait=60)
        job = self.client.get_job(self.job_id)
        if job["state"] != "completed":
            raise BenchError(f"job {self.job_id} ended {job['state']} ({job['error']}); result {result}")
        self.finished = True
        return {entry["number"]: entry for entry in self.client.checkpoints(self.job_id)}

    def kill_if_running(self) -> None:
        if self.finished or not self.job_id:
            return
        try:
            self.client.kill(self.job_id)
        except APIError as error:
            logger.error("kill of job %s on server %s failed: %s", self.job_id, self.server.name, error)


# The raw CRIU process


@dataclass
class RawProcess:
    """The benchmark job run standalone, dumped and restored with CRIU directly."""

    size_bytes: int
    control_dir: Path
    job_dir: Path
    images_root: Path
    criu: str
    repetitions: int
    launcher: subprocess.Popen | None = None
    init_pid: int | None = None
    restored_pid: int | None = None
    image_dirs: list[Path] = field(default_factory=list)
    dump_seconds: list[float] = field(default_factory=list)
    sha256_seconds: list[float] = field(default_factory=list)
    fsync_seconds: list[float] = field(default_factory=list)
    image_bytes: list[int] = field(default_factory=list)
    restore_seconds: list[float] = field(default_factory=list)

    def start(self) -> None:
        work_dir = self.job_dir / "work"
        work_dir.mkdir(parents=True)
        command = launch_command(self.job_dir, job_command(self.size_bytes, self.control_dir, self.repetitions))
        self.launcher = subprocess.Popen(
            command, env=job_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        children = wait_until(lambda: list_children(self.launcher.pid), START_TIMEOUT_SECONDS, "the raw process's namespace init")
        self.init_pid = children[0]
        logger.info("raw process started: bwrap %d, namespace init %d", self.launcher.pid, self.init_pid)

    def dump(self, repetition: int) -> None:
        """Dump with the options Checker uses, timed as a whole `criu dump` process."""
        image_dir = self.images_root / str(repetition)
        image_dir.mkdir(parents=True)
        command = [self.criu, "dump", "--tree", str(self.init_pid), "--images-dir", str(image_dir), "--leave-running", *DUMP_OPTIONS]
        command += ["--log-file", str(image_dir / "criu-dump.log")]

        started = time.perf_counter()
        completed = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - started
        if completed.returncode != 0:
            raise BenchError(f"raw criu dump {repetition} failed with {completed.returncode}: {completed.stderr.decode(errors='replace')}; see {image_dir}/criu-dump.log")
        self.dump_seconds.append(seconds)
        self.image_dirs.append(image_dir)
        self._profile_image(image_dir)

        for old in self.image_dirs[:-RAW_IMAGES_KEPT]:
            shutil.rmtree(old)
        self.image_dirs = self.image_dirs[-RAW_IMAGES_KEPT:]

    def _profile_image(self, image_dir: Path) -> None:
        """Time the extra steps Checker runs on an image: sha256 of every file, then fsync."""
        paths = sorted(p for p in image_dir.iterdir() if p.is_file() and p.name != "criu-dump.log")
        with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
            started = time.perf_counter()
            hashed = list(pool.map(hash_file, paths))
            self.sha256_seconds.append(time.perf_counter() - started)

            started = time.perf_counter()
            list(pool.map(fsync_path, paths))
            self.fsync_seconds.append(time.perf_counter() - started)
        self.image_bytes.append(sum(size for size, _ in hashed))

    def kill_current(self) -> None:
        """SIGKILL the running copy (the original or the last restored one) and reap it."""
        if self.launcher is not None:
            if self.launcher.poll() is None:
                os.kill(self.init_pid, signal.SIGKILL)
                # bwrap exits once its child, the namespace init, is gone.
                self.launcher.wait(timeout=30)
            self.launcher = None
            self.init_pid = None
        if self.restored_pid is not None:
            try:
                os.kill(self.restored_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            reap(self.restored_pid, timeout=30)
            self.restored_pid = None

    def restore(self) -> None:
        """Kill the running copy, then restore the newest image, timed as a whole `criu restore` process."""
        self.kill_current()
        image_dir = self.image_dirs[-1]
        pid_file = self.job_dir / "restored.pid"
        pid_file.unlink(missing_ok=True)
        command = [self.criu, "restore", "--images-dir", str(image_dir), *restore_options(self.job_dir), "--pidfile", str(pid_file)]
        command += ["--log-file", str(self.job_dir / "criu-restore.log")]

        started = time.perf_counter()
        completed = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - started
        if completed.returncode != 0:
            raise BenchError(f"raw criu restore failed with {completed.returncode}: {completed.stderr.decode(errors='replace')}; see {self.job_dir}/criu-restore.log")
        self.restored_pid = int(pid_file.read_text().strip())
        self.restore_seconds.append(seconds)


# One size


def bench_size(label: str, size_bytes: int, servers: list[BenchServer], arguments: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    size_dir = work_dir / label
    repetitions = arguments.repetitions
    raw_control = size_dir / "raw-control"
    raw_control.mkdir(parents=True)
    raw = RawProcess(size_bytes, raw_control, size_dir / "raw-job", work_dir / "raw-images" / label, arguments.criu, repetitions)

    runs: list[CheckerRun] = []
    try:
        raw.start()
        for server in servers:
            control_dir = size_dir / f"{server.name}-control"
            control_dir.mkdir()
            run = CheckerRun(server, control_dir, CallerClient(server.url, timeout=60.0))
            runs.append(run)
            run.spawn(f"bench-{label}", job_command(size_bytes, control_dir, repetitions))

        filled = {"raw": wait_for_result(raw_control, "filled", "the raw process to fill its memory")}
        for run in runs:
            filled[run.server.name] = run.wait_for("filled", f"job {run.job_id} to fill its memory")
        for name, record in filled.items():
            logger.info("%s %s: %.1f MB resident (%.1f MB buffer)", label, name, record["resident_bytes"] / 1e6, record["size_bytes"] / 1e6)

        for repetition in range(repetitions):
            settle(arguments.settle_seconds)
            raw.dump(repetition)
            for run in runs:
                settle(arguments.settle_seconds)
                run.take_checkpoint(repetition)
            figures = ", ".join(f"{run.server.name} {run.checkpoint_seconds[-1]:.3f} s" for run in runs)
            logger.info("%s checkpoint %d: raw dump %.3f s, %s", label, repetition, raw.dump_seconds[-1], figures)

        for repetition in range(repetitions):
            for run in runs:
                run.wait_for("ready", f"job {run.job_id} to checkpoint before restore {repetition + 1}", restore=repetition)
            settle(arguments.settle_seconds)
            raw.restore()
            for run in runs:
                settle(arguments.settle_seconds)
                run.crash_and_restore(repetition)
                if repetition + 1 < repetitions:
                    # The restored copy checkpoints again at once; let that finish
                    # before the next variant's restore is timed.
                    run.wait_for("ready", f"job {run.job_id} to checkpoint before restore {repetition + 2}", restore=repetition + 1)
            figures = ", ".join(f"{run.server.name} {run.restore_event_seconds[-1]:.3f} s (wall {run.restore_wall_seconds[-1]:.3f} s)" for run in runs)
            logger.info("%s restore %d: raw restore %.3f s, %s", label, repetition, raw.restore_seconds[-1], figures)

        result: dict[str, Any] = {"size_bytes": size_bytes, "resident_bytes": {name: record["resident_bytes"] for name, record in filled.items()}}
        result["raw"] = {
            "dump_seconds": raw.dump_seconds,
            "restore_seconds": raw.restore_seconds,
            "image_bytes": raw.image_bytes,
            "sha256_seconds": raw.sha256_seconds,
            "fsync_seconds": raw.fsync_seconds,
        }
        for run in runs:
            checkpoints = run.finish()
            result[run.server.name] = {
                "checkpoint_seconds": run.checkpoint_seconds,
                "server_dump_seconds": [checkpoints[number]["dump_seconds"] for number in run.checkpoint_numbers],
                "server_total_seconds": [checkpoints[number]["total_seconds"] for number in run.checkpoint_numbers],
                "image_bytes": [checkpoints[number]["size_bytes"] for number in run.checkpoint_numbers],
                "restore_event_seconds": run.restore_event_seconds,
                "restore_wall_seconds": run.restore_wall_seconds,
            }
        return result
    finally:
        for run in runs:
            run.kill_if_running()
            run.client.close()
        raw.kill_current()
        shutil.rmtree(raw.images_root, ignore_errors=True)


# Report


def median(values: list[float]) -> float:
    return statistics.median(values)


def format_range(values: list[float]) -> str:
    return f"{median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def summary_table(results: dict[str, dict[str, Any]], server_names: list[str]) -> str:
    """Return the main table as Markdown: medians of Checker and raw CRIU, and their ratios.

    "paired ratio" is the median over checkpoints of `checker.checkpoint()`
    time divided by the `criu dump` time of the same checkpoint inside the
    server, so it leaves out the large run-to-run spread of `criu dump` itself.
    """
    lines = [
        "| size | Checker server | checkpoint s | raw dump s | ratio | paired ratio | restore s (event) | raw restore s | ratio | kill to running again s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, result in results.items():
        raw = result["raw"]
        raw_dump = median(raw["dump_seconds"])
        raw_restore = median(raw["restore_seconds"])
        for name in server_names:
            checker = result[name]
            checkpoint = median(checker["checkpoint_seconds"])
            restore = median(checker["restore_event_seconds"])
            wall = median(checker["restore_wall_seconds"])
            paired = median([total / dump for total, dump in zip(checker["checkpoint_seconds"], checker["server_dump_seconds"])])
            lines.append(
                f"| {label} | {name} | {checkpoint:.3f} | {raw_dump:.3f} | {checkpoint / raw_dump:.2f} | {paired:.2f} "
                f"| {restore:.3f} | {raw_restore:.3f} | {restore / raw_restore:.2f} | {wall:.3f} |"
            )
    return "\n".join(lines)


def breakdown_table(results: dict[str, dict[str, Any]], server_names: list[str]) -> str:
    """Return where a checkpoint's time goes, as Markdown: medians with (min-max) in seconds."""
    lines = [
        "| size | image MB | step | seconds, median (min-max) |",
        "|---|---|---|---|",
    ]
    for label, result in results.items():
        raw = result["raw"]
        image_mb = f"{median(raw['image_bytes']) / 1e6:.0f}"
        rows = [
            ("raw `criu dump`", raw["dump_seconds"]),
            ("sha256 of the raw image, 4 threads", raw["sha256_seconds"]),
            ("fsync of the raw image", raw["fsync_seconds"]),
            ("raw `criu restore`", raw["restore_seconds"]),
        ]
        for name in server_names:
            checker = result[name]
            fsync_step = "" if name == "no-fsync" else "fsync + "
            overhead = [total - dump for total, dump in zip(checker["checkpoint_seconds"], checker["server_dump_seconds"])]
            rows += [
                (f"{name}: `criu dump` in the server (dump_seconds)", checker["server_dump_seconds"]),
                (f"{name}: dump + sha256 + {fsync_step}manifest (total_seconds)", checker["server_total_seconds"]),
                (f"{name}: `checker.checkpoint()` in the job", checker["checkpoint_seconds"]),
                (f"{name}: `checker.checkpoint()` minus its own `criu dump`", overhead),
                (f"{name}: restore, verify + `criu restore` (event seconds)", checker["restore_event_seconds"]),
                (f"{name}: SIGKILL to restored copy running", checker["restore_wall_seconds"]),
            ]
        for step, values in rows:
            lines.append(f"| {label} | {image_mb} | {step} | {format_range(values)} |")
    return "\n".join(lines)


# Main


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Needs root (CRIU and PID namespaces).")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES), help="job sizes to measure (default: all)")
    parser.add_argument("--repetitions", type=int, default=5, help="timed checkpoints and restores per size and variant (default: 5)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port of the fsync server on 127.0.0.1; the no-fsync server uses PORT+1 (default: {DEFAULT_PORT})")
    parser.add_argument("--criu", default=DEFAULT_CRIU, help=f"CRIU binary for the servers and the raw runs (default: {DEFAULT_CRIU})")
    parser.add_argument("--work-dir", type=Path, help="directory for state, images and logs; must not exist (default: a new directory under /tmp)")
    parser.add_argument("--keep-work-dir", action="store_true", help="leave the work directory in place for inspection")
    parser.add_argument("--settle-seconds", type=float, default=1.0, help="pause after sync() before each timed step, in seconds (default: 1.0)")
    parser.add_argument("--no-fsync-variant", dest="fsync_variant", action="store_false", help="skip the server with fsync_checkpoints=False")
    parser.add_argument("--json-output", type=Path, help="also write every sample to this JSON file")
    arguments = parser.parse_args()
    if arguments.repetitions < 1:
        parser.error("--repetitions must be at least 1")
    return arguments


def main() -> int:
    arguments = parse_arguments()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        print("checkpoint_bench: needs root for CRIU and PID namespaces; run it with sudo", file=sys.stderr)
        return 2

    # Restored raw processes are re-parented to the nearest subreaper, so they can be reaped here.
    become_child_subreaper()
    if arguments.work_dir is not None:
        arguments.work_dir.mkdir(parents=True)
        work_dir = arguments.work_dir
    else:
        work_dir = Path(tempfile.mkdtemp(prefix="checker-bench-", dir="/tmp"))
    logger.info("work directory %s", work_dir)

    servers = [BenchServer("fsync", True, arguments.port, work_dir / "state-fsync", arguments.criu, work_dir / "server-fsync.log")]
    if arguments.fsync_variant:
        servers.append(BenchServer("no-fsync", False, arguments.port + 1, work_dir / "state-no-fsync", arguments.criu, work_dir / "server-no-fsync.log"))

    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    succeeded = False
    try:
        for server in servers:
            server.start()
        for label in arguments.sizes:
            results[label] = bench_size(label, SIZES[label], servers, arguments, work_dir)
        succeeded = True
    except BenchError as error:
        logger.error("benchmark failed: %s", error)
        return 1
    finally:
        for server in servers:
            server.stop()
        if succeeded and not arguments.keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            logger.info("logs and images are kept in %s", work_dir)

    names = [server.name for server in servers]
    print(f"\nMedians of {arguments.repetitions} repetitions; ratio = Checker / raw CRIU. Run time {time.monotonic() - started:.0f} s.\n")
    print(summary_table(results, names))
    print("\nWhere the time goes, seconds:\n")
    print(breakdown_table(results, names))
    if arguments.json_output is not None:
        arguments.json_output.write_text(json.dumps({"repetitions": arguments.repetitions, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
