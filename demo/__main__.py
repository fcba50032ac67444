"""The demo: stream-parse a large JSON document from S3 through crashes.

    python -m demo [--size-mb 400] [--range-mb 8]

1. Starts an S3 server (moto) on loopback and uploads a JSON array of real
   GeoNames cities, tiled to the requested size, computing the expected
   aggregate while generating it.
2. Starts `checker server` as a separate process and spawns demo/parse_job.py,
   which fetches the object in sequential range reads and checkpoints after
   each range.
3. SIGKILLs the job's process at about 40 % progress (the server restores it
   from its last checkpoint), and SIGKILLs the server at about 70 % (the job
   keeps running; the restarted server re-adopts it).
4. Prints the checkpoints, the restores, the bytes the S3 server served against
   the object's size, and the result, and exits non-zero unless the result
   equals the expected aggregate and no range was fetched twice except one
   per job kill.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from checker.cli.client import APIError, CallerClient
from demo.dataset import upload_document
from demo.s3client import TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY, create_s3_client
from demo.s3server import DemoS3Server

REPO_ROOT = Path(__file__).resolve().parent.parent
PARSE_JOB = REPO_ROOT / "demo" / "parse_job.py"
BUCKET = "geonames"
KEY = "cities.json"
CHECKPOINT_BUCKET = "checker-checkpoints"
MIB = 1024 * 1024


@dataclass
class DemoPlan:
    size_bytes: int
    range_bytes: int
    kill_job_at: float
    kill_server_at: float
    port: int
    state_dir: Path


@dataclass
class DemoProgress:
    fetched: int = 0
    total: int = 0
    job_killed_at: float | None = None
    server_killed_at: float | None = None
    log_offset: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.fetched / self.total if self.total else 0.0


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


class CheckerServerProcess:
    """`checker server` in its own process, so the demo can SIGKILL it."""

    def __init__(self, plan: DemoPlan) -> None:
        self.plan = plan
        self.process: subprocess.Popen | None = None
        self.log_path = plan.state_dir / "server.log"
        self.extra_args: list[str] = []
        """More `checker server` options, such as an S3 checkpoint store."""
        self.extra_env: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.plan.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "checker", "server", "--port", str(self.plan.port), "--state-dir", str(self.plan.state_dir), *self.extra_args]
        env = {**os.environ, **self.extra_env}
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env)
        with CallerClient(self.url) as client:
            deadline = time.monotonic() + 30
            while not client.is_up():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"checker server did not start; see {self.log_path}")
                time.sleep(0.05)

    def sigkill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def print_log_tail(self, lines: int = 30) -> None:
        """Print the end of the server's log, which explains most failures."""
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return
        say(f"last {len(tail)} lines of {self.log_path}:")
        for line in tail:
            print(f"    {line}", flush=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def prepare_object(s3: DemoS3Server, plan: DemoPlan) -> tuple[int, dict]:
    client = create_s3_client(s3.endpoint_url)
    client.create_bucket(Bucket=BUCKET)
    started = time.monotonic()
    size, expected = upload_document(client, BUCKET, KEY, plan.size_bytes)
    say(f"uploaded s3://{BUCKET}/{KEY}: {size / 1e6:.1f} MB of GeoNames cities in {time.monotonic() - started:.1f} s")
    s3.ledger.clear()
    return size, expected


def read_progress(client: CallerClient, job_id: str, progress: DemoProgress) -> None:
    """Read the job's new `progress fetched=... total=...` lines from its stdout."""
    while True:
        chunk = client.logs(job_id, "stdout", progress.log_offset)
        if not chunk["data"]:
            return
        progress.log_offset = chunk["next_offset"]
        for line in chunk["data"].splitlines():
            if line.startswith("progress "):
                fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
                progress.fetched = int(fields.get("fetched", progress.fetched))
                progress.total = int(fields.get("total", progress.total))


def drive(plan: DemoPlan, server: CheckerServerProcess, s3: DemoS3Server, job_id: str) -> dict:
    """Watch the job, kill the job and then the server at the planned points, until it finishes."""
    progress = DemoProgress()
    client = CallerClient(server.url)
    last_report = 0.0
    try:
        while True:
            job = client.get_job(job_id)
            if job["state"] in ("completed", "failed"):
                return job
            read_progress(client, job_id, progress)

            if progress.fraction - last_report >= 0.1:
                last_report = progress.fraction
                say(f"progress {progress.fraction:5.1%} ({progress.fetched / 1e6:.0f} of {progress.total / 1e6:.0f} MB), checkpoints {job['checkpoint_count']}")

            if progress.job_killed_at is None and progress.fraction >= plan.kill_job_at and job["pid"]:
                progress.job_killed_at = progress.fraction
                os.kill(job["pid"], signal.SIGKILL)
                say(f"SIGKILL job process {job['pid']} at {progress.fraction:.1%}")
                restored = wait_for_restore(client, job_id, job["restore_count"] + 1)
                say(f"the server restored the job: {restored}")
                # The restored copy rewinds to its checkpoint; re-read its output from there.
                progress.log_offset = 0

            elif progress.job_killed_at is not None and progress.server_killed_at is None and progress.fraction >= plan.kill_server_at:
                progress.server_killed_at = progress.fraction
                server.sigkill()
                say(f"SIGKILL checker server at {progress.fraction:.1%}; the job keeps running without it")
                time.sleep(2.0)
                server.start()
                say("checker server started again")
                adopted = [e["message"] for e in client.events(job_id) if e["kind"] in ("adopted", "restored")]
                say(f"after the restart: {adopted[-1] if adopted else 'no recovery event yet'}")

            time.sleep(0.1)
    finally:
        client.close()


def wait_for_restore(client: CallerClient, job_id: str, restore_count: int, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if job["restore_count"] >= restore_count or job["state"] in ("completed", "failed"):
            restores = [e["message"] for e in client.events(job_id) if e["kind"] == "restored"]
            return restores[-1] if restores else f"job is {job['state']}"
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} was not restored within {timeout:.0f} s")


def report(client: CallerClient, s3: DemoS3Server, job: dict, size: int, expected: dict, job_kills: int) -> bool:
    """Print what happened; return whether the run met every check."""
    print()
    checkpoints = client.checkpoints(job["id"])
    say(f"{len(checkpoints)} checkpoints (number, image size, dump time, total time until the job got its answer):")
    for checkpoint in checkpoints:
        print(f"    {checkpoint['number']:>4}  {checkpoint['size_bytes'] / 1e6:7.1f} MB  dump {checkpoint['dump_seconds']:.3f} s  total {checkpoint['total_seconds']:.3f} s  ({checkpoint['status']})")
    if checkpoints:
        sizes = sorted(c["total_seconds"] for c in checkpoints)
        say(f"median checkpoint time {sizes[len(sizes) // 2]:.3f} s, largest image {max(c['size_bytes'] for c in checkpoints) / 1e6:.1f} MB")

    print()
    for event in client.events(job["id"]):
        if event["kind"] in ("crashed", "restored", "adopted"):
            say(f"{event['kind']}: {event['message']}")

    print()
    s3.ledger.wait_until_idle(10)  # The server records a read a few milliseconds after its last byte.
    summary = s3.ledger.summarize(BUCKET, KEY)
    repeated = summary.repeated_ranges
    say(f"S3 server served {summary.requests} range reads, {summary.bytes_sent:,} bytes, for an object of {size:,} bytes ({summary.bytes_sent / size:.3f}x)")
    say(f"ranges fetched more than once: {len(repeated)} {repeated if repeated else ''}; incomplete reads (cut by a kill): {summary.incomplete_reads}")

    print()
    output = job.get("output") or {}
    aggregate = output.get("aggregate")
    say(f"job {job['id']} {job['state']}; restores {job['restore_count']}, checkpoints {job['checkpoint_count']}")
    if aggregate:
        say(f"{aggregate.get('records', 0):,} records; top 10 cities by population:")
        for city in aggregate.get("top_cities", [])[:10]:
            print(f"    {city.get('population', 0):>12,}  {city.get('name')} ({city.get('countrycode')}), id {city.get('id')}")
        countries = aggregate.get("population_by_country", {})
        largest = sorted(countries.items(), key=lambda item: -item[1])[:5]
        say(f"{len(countries)} countries; largest by population: {largest}")

    matches = aggregate == expected
    covered = summary.distinct_bytes == size
    few_repeats = len(repeated) <= job_kills
    print()
    say(f"aggregate equals an uninterrupted parse: {'yes' if matches else 'NO'}")
    say(f"every byte fetched: {'yes' if covered else 'NO'}; ranges fetched twice within the {job_kills} allowed by job kills: {'yes' if few_repeats else 'NO'}")
    return job["state"] == "completed" and matches and covered and few_repeats


def use_s3_checkpoint_store(server: CheckerServerProcess, s3: DemoS3Server) -> None:
    """Make the demo's Checker server keep its checkpoints in a bucket of the demo's S3 server."""
    create_s3_client(s3.endpoint_url).create_bucket(Bucket=CHECKPOINT_BUCKET)
    server.extra_args = ["--checkpoint-store", f"s3://{CHECKPOINT_BUCKET}/demo", "--s3-endpoint-url", s3.endpoint_url]
    server.extra_env = {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY, "AWS_DEFAULT_REGION": TEST_REGION}
    say(f"checkpoints go to s3://{CHECKPOINT_BUCKET}/demo on the same S3 server")


def count_checkpoint_objects(s3: DemoS3Server) -> int:
    client = create_s3_client(s3.endpoint_url)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=CHECKPOINT_BUCKET)
    return sum(len(page.get("Contents", [])) for page in pages)


def kill_unfinished_job(server: CheckerServerProcess, job_id: str | None) -> None:
    """Kill the demo's job when the demo stops early, so it does not outlive the demo."""
    if job_id is None or server.process is None or server.process.poll() is not None:
        return
    try:
        with CallerClient(server.url) as client:
            if client.get_job(job_id)["state"] not in ("completed", "failed"):
                client.kill(job_id)
                say(f"killed the unfinished job {job_id}")
    except APIError as error:
        say(f"could not kill job {job_id}: {error}")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description="Parse a large JSON document from S3 through a job kill and a server kill.")
    parser.add_argument("--size-mb", type=float, default=400, help="Size of the JSON document in MB (default 400, about a minute here).")
    parser.add_argument("--range-mb", type=float, default=8, help="Bytes per range read, in MiB (default 8).")
    parser.add_argument("--kill-job-at", type=float, default=0.4, help="Progress fraction at which the job is SIGKILLed (default 0.4).")
    parser.add_argument("--kill-server-at", type=float, default=0.7, help="Progress fraction at which the server is SIGKILLed (default 0.7).")
    parser.add_argument("--port", type=int, default=8191, help="Port of the demo's Checker server (default 8191).")
    parser.add_argument(
        "--checkpoint-store", choices=["local", "s3"], default="local", help="Where the Checker server keeps checkpoints: its state directory (default) or a bucket of the demo's S3 server."
    )
    parser.add_argument("--state-dir", help="State directory of the demo's server (default: a temporary directory, removed afterwards).")
    args = parser.parse_args(argv)
    if not 0 < args.kill_job_at < args.kill_server_at < 1:
        parser.error(f"need 0 < --kill-job-at ({args.kill_job_at}) < --kill-server-at ({args.kill_server_at}) < 1")
    if args.size_mb <= 0 or args.range_mb <= 0:
        parser.error("--size-mb and --range-mb must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    temporary = args.state_dir is None
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="checker-demo-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    plan = DemoPlan(int(args.size_mb * 1e6), int(args.range_mb * MIB), args.kill_job_at, args.kill_server_at, args.port, state_dir)

    server = CheckerServerProcess(plan)
    job: dict | None = None
    started = time.monotonic()
    try:
        with DemoS3Server() as s3:
            size, expected = prepare_object(s3, plan)
            if args.checkpoint_store == "s3":
                use_s3_checkpoint_store(server, s3)
            server.start()
            say(f"checker server running at {server.url} (state in {state_dir})")
            with CallerClient(server.url) as client:
                definition = client.create_definition("geonames-parse", [sys.executable, str(PARSE_JOB)])
                params = {"endpoint_url": s3.endpoint_url, "bucket": BUCKET, "key": KEY, "range_size": plan.range_bytes}
                job = client.spawn(definition["name"], params=params, version=definition["version"])
            say(f"job {job['id']} spawned: parse in {plan.range_bytes // MIB} MiB ranges, a checkpoint after each")

            final = drive(plan, server, s3, job["id"])
            with CallerClient(server.url) as client:
                ok = report(client, s3, final, size, expected, job_kills=1)
            if args.checkpoint_store == "s3":
                objects = count_checkpoint_objects(s3)
                say(f"checkpoint objects in s3://{CHECKPOINT_BUCKET}/demo: {objects}")
                ok = ok and objects > 0
    except (APIError, RuntimeError, OSError) as error:
        say(f"error: {error}")
        server.print_log_tail()
        return 1
    finally:
        kill_unfinished_job(server, job["id"] if job else None)
        server.stop()
        if temporary:
            shutil.rmtree(state_dir, ignore_errors=True)

    say(f"finished in {time.monotonic() - started:.1f} s: {'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
