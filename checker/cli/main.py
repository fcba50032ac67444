"""The `checker` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from checker.cli.client import APIError, CallerClient, server_url_from_environment
from checker.config import DEFAULT_PORT, Settings, default_state_dir
from checker.store.chunks import MAX_ZSTD_LEVEL

DEFAULT_COMPRESSION_LEVEL = Settings.checkpoint_compression_level
DEFAULT_FINISHED_RETENTION_SECONDS = Settings.finished_checkpoints_retention_seconds

TERMINAL_STATES = ("completed", "failed")
PROGRESS_EVENTS = (
    "started",
    "checkpoint",
    "checkpoint_failed",
    "suspended",
    "woke",
    "crashed",
    "restored",
    "restore_failed",
    "checkpoint_corrupt",
    "adopted",
)


class CLIError(Exception):
    """An error to print as one line, with exit code 1."""


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # One line per HTTP request would drown the job's own output.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def parse_assignments(pairs: list[str], option: str) -> dict[str, str]:
    values = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise CLIError(f"{option} {pair!r} is invalid; write NAME=VALUE")
        values[name] = value
    return values


def parse_params(pairs: list[str], params_json: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_json:
        try:
            params = json.loads(params_json)
        except ValueError as error:
            raise CLIError(f"--params-json is not valid JSON: {error}") from error
        if not isinstance(params, dict):
            raise CLIError("--params-json must be a JSON object, e.g. '{\"size\": 3}'")
    for name, raw in parse_assignments(pairs, "--param").items():
        try:
            params[name] = json.loads(raw)
        except ValueError:
            params[name] = raw
    return params


def compression_level(text: str) -> int | None:
    """Parse --checkpoint-compression: 'off' or a zstd level."""
    if text.strip().lower() == "off":
        return None
    try:
        level = int(text)
    except ValueError:
        level = 0
    if not 1 <= level <= MAX_ZSTD_LEVEL:
        raise argparse.ArgumentTypeError(f"invalid compression {text!r}; give off or a zstd level from 1 to {MAX_ZSTD_LEVEL}")
    return level


def positive_integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid checkpoint number {text!r}; give a whole number from 1")
    return value


def non_negative_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}; give 0 or more, e.g. 86400")
    return seconds


def settings_from_args(args: argparse.Namespace, port: int | None = None) -> Settings:
    return Settings(
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        host=getattr(args, "host", "127.0.0.1"),
        port=port if port is not None else getattr(args, "port", DEFAULT_PORT),
        database_url=getattr(args, "database_url", None),
        criu_path=args.criu,
        criu_timeout_seconds=getattr(args, "criu_timeout", 1800.0),
        api_token=getattr(args, "api_token", None) or os.environ.get("CHECKER_API_TOKEN") or None,
        keep_checkpoints=getattr(args, "keep_checkpoints", 3),
        checkpoint_compression_level=getattr(args, "checkpoint_compression", DEFAULT_COMPRESSION_LEVEL),
        checkpoint_dedupe=not getattr(args, "no_checkpoint_dedupe", False),
        finished_checkpoints_retention_seconds=getattr(args, "keep_finished_checkpoints", DEFAULT_FINISHED_RETENTION_SECONDS),
        checkpoint_lock_timeout_seconds=getattr(args, "checkpoint_lock_timeout", 60.0),
        drain_on_shutdown=not getattr(args, "no_drain", True),
        drain_timeout_seconds=getattr(args, "drain_timeout", 60.0),
        checkpoint_store=getattr(args, "checkpoint_store", None),
        s3_endpoint_url=getattr(args, "s3_endpoint_url", None),
    )


# checker server


def command_server(args: argparse.Namespace) -> int:
    from checker.server.serve import run_server

    settings = settings_from_args(args)
    try:
        settings.validate()
    except ValueError as error:
        raise CLIError(str(error)) from error
    run_server(settings)
    return 0


# checker run


class EmbeddedServer:
    """A server in a background thread of this process, for `checker run` without a server."""

    def __init__(self, settings: Settings) -> None:
        from checker.server.serve import Server

        self.server = Server(settings)
        self._thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), name="embedded-server", daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise CLIError("the embedded server did not start; run 'checker server' in another terminal to see why")
            time.sleep(0.02)
        return self.server.api_url

    def stop(self) -> None:
        self.server.request_stop()
        self._thread.join(timeout=30)


def definition_name_for(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).strip("-.") or "job"
    return name[:128]


def ensure_definition(client: CallerClient, name: str, command: list[str]) -> dict:
    """Return the latest version of definition `name` when it runs `command`, else create a new version."""
    try:
        latest = client.request("GET", f"/v1/job-definitions/{name}").json()
    except APIError as error:
        if error.status != 404:
            raise
        latest = None
    if latest is not None and latest["runtime"].get("command") == command and latest["runtime"].get("type") == "process" and not latest["runtime"].get("env"):
        return latest
    return client.create_definition(name, command)


def command_run(args: argparse.Namespace) -> int:
    path = Path(args.file).resolve()
    if not path.is_file():
        raise CLIError(f"job file {args.file} not found; give the path of a Python script")
    params = parse_params(args.param, args.params_json)
    env = parse_assignments(args.env, "--env")

    embedded = None
    server_url = args.server or server_url_from_environment()
    client = CallerClient(server_url, os.environ.get("CHECKER_API_TOKEN"))
    if client.is_up():
        if args.state_dir or args.criu:
            print(f"checker: using the server at {server_url}; --state-dir and --criu apply only to an embedded server", file=sys.stderr)
    else:
        if args.server:
            raise CLIError(f"no Checker server responds at {args.server}; start one with 'checker server'")
        # The embedded server takes the port callers expect, so a later 'checker server' on it serves the same jobs.
        settings = settings_from_args(args, port=urllib.parse.urlsplit(server_url).port or DEFAULT_PORT)
        print(f"checker: no server at {server_url}; starting an embedded one (state in {settings.state_dir})", file=sys.stderr)
        embedded = EmbeddedServer(settings)
        client.close()
        client = CallerClient(embedded.start())

    try:
        definition = ensure_definition(client, args.name or definition_name_for(path), [sys.executable, str(path)])
        job = client.spawn(definition["name"], params=params, env=env, version=definition["version"])
        print(f"checker: job {job['id']} started from {path.name} (definition {definition['name']} version {definition['version']})", file=sys.stderr)
        try:
            final = follow_job(client, job["id"], quiet=args.quiet)
        except KeyboardInterrupt:
            if embedded is not None:
                settings = embedded.server.settings
                advice = f"start 'checker server --port {settings.port} --state-dir {settings.state_dir}' to supervise it again"
            else:
                advice = f"the server at {server_url} still supervises it"
            print(f"\nchecker: stopped following job {job['id']}; the job keeps running, and {advice}", file=sys.stderr)
            return 130
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()

    print(json.dumps({"job": final["id"], "state": final["state"], "output": final["output"], "error": final["error"]}, indent=2))
    return 0 if final["state"] == "completed" else 1


def follow_job(client: CallerClient, job_id: str, quiet: bool = False, poll_seconds: float = 0.2, unreachable_seconds: float = 600.0) -> dict:
    """Print the job's output and progress events until it finishes; return the final job.

    While the server is unreachable (restarting, say) this keeps trying for
    `unreachable_seconds`: the job itself goes on running meanwhile.
    """
    follower = JobFollower(client, job_id, quiet)
    unreachable_since: float | None = None
    while True:
        try:
            job = follower.poll()
        except APIError as error:
            if error.status is not None:
                raise
            now = time.monotonic()
            if unreachable_since is None:
                unreachable_since = now
                print(f"checker: server unreachable; retrying for up to {unreachable_seconds:.0f} s ({error})", file=sys.stderr)
            elif now - unreachable_since > unreachable_seconds:
                raise
            time.sleep(1.0)
            continue
        if unreachable_since is not None:
            print("checker: server reachable again", file=sys.stderr)
            unreachable_since = None
        if job["state"] in TERMINAL_STATES:
            return job
        time.sleep(poll_seconds)


def rewind_offsets(offsets: dict[str, int], event: dict) -> None:
    """Move the read offsets of the logs back where a restore cut them.

    The server cuts the logs back to their size at the checkpoint before it
    restores the job, and records `output_rewound` first; the restored copy
    writes its output from there.
    """
    if event["kind"] == "output_rewound":
        sizes = {event["data"].get("stream"): event["data"].get("size")}
    elif event["kind"] == "restored":
        sizes = event["data"].get("log_sizes", {})
    else:
        return
    for stream, size in sizes.items():
        if stream in offsets and isinstance(size, int):
            offsets[stream] = min(offsets[stream], size)


class JobFollower:
    """Copies a job's new output and progress events to this terminal."""

    def __init__(self, client: CallerClient, job_id: str, quiet: bool) -> None:
        self.client = client
        self.job_id = job_id
        self.quiet = quiet
        self.offsets = {"stdout": 0, "stderr": 0}
        self.last_event = 0

    def poll(self) -> dict:
        job = self.client.get_job(self.job_id)
        self._print_events()
        for stream, target in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            self._print_output(stream, target)
        return job

    def _print_events(self) -> None:
        for event in self.client.events(self.job_id, after=self.last_event):
            self.last_event = event["seq"]
            rewind_offsets(self.offsets, event)
            if not self.quiet and event["kind"] in PROGRESS_EVENTS:
                print(f"checker: {event['message']}", file=sys.stderr)

    def _print_output(self, stream: str, target: Any) -> None:
        while True:
            chunk = self.client.logs(self.job_id, stream, self.offsets[stream])
            if not chunk["data"]:
                return
            target.write(chunk["data"])
            target.flush()
            self.offsets[stream] = chunk["next_offset"]


# checker jobs / logs


def connect(args: argparse.Namespace) -> CallerClient:
    client = CallerClient(args.server or server_url_from_environment(), os.environ.get("CHECKER_API_TOKEN"))
    return client


def command_jobs_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        page = client.list_jobs(states=args.state, limit=args.limit, definition=args.definition, metadata=parse_assignments(args.metadata, "--metadata"))
    print(f"{'ID':<18} {'STATE':<10} {'DEFINITION':<24} {'CKPTS':>5} {'RESTORES':>8}  CREATED")
    for job in page["items"]:
        definition = f"{job['definition']}@{job['version']}"
        print(f"{job['id']:<18} {job['state']:<10} {definition:<24} {job['checkpoint_count']:>5} {job['restore_count']:>8}  {job['created_at']}")
    if page["next_cursor"]:
        print("(more jobs; raise --limit to see them)")
    return 0


def command_jobs_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.get_job(args.job)
        checkpoints = client.checkpoints(args.job)
        events = client.events(args.job)
    print(json.dumps(job, indent=2))
    print("\ncheckpoints:")
    for checkpoint in checkpoints:
        print(f"  {checkpoint['number']:>4}  {checkpoint['status']:<8} {checkpoint['size_bytes'] / 1e6:9.1f} MB  dump {checkpoint['dump_seconds']:.3f} s  total {checkpoint['total_seconds']:.3f} s  {checkpoint['created_at']}")
    print("\nevents:")
    for event in events:
        print(f"  {event['created_at']}  {event['kind']:<18} {event['message']}")
    return 0


def megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def command_checkpoints_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        checkpoints = client.checkpoints(args.job)
    if not checkpoints:
        print(f"job {args.job} has no checkpoints")
        return 0
    print(f"{'number':>6}  {'status':<8} {'mode':<12} {'image MB':>9} {'stored MB':>9} {'dump s':>7} {'total s':>7}  created")
    for checkpoint in checkpoints:
        print(
            f"{checkpoint['number']:>6}  {checkpoint['status']:<8} {checkpoint['mode']:<12} {megabytes(checkpoint['size_bytes']):>9} "
            f"{megabytes(checkpoint['stored_bytes']):>9} {checkpoint['dump_seconds']:>7.3f} {checkpoint['total_seconds']:>7.3f}  {checkpoint['created_at']}"
        )
    return 0


def command_checkpoints_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        details = client.checkpoint_details(args.job, args.number, verify=args.verify)
    rows = [
        ("status", details["status"]),
        ("mode", details["mode"]),
        ("created", details["created_at"]),
        ("image", f"{megabytes(details['size_bytes'])} MB"),
        ("stored by this checkpoint", f"{megabytes(details['stored_bytes'])} MB (after deduplication and compression)"),
        ("stored chunks it uses", f"{megabytes(details['referenced_stored_bytes'])} MB in {details['chunk_count'] if details['chunk_count'] is not None else '-'} chunks"),
        ("dump", f"{details['dump_seconds']:.3f} s"),
        ("total", f"{details['total_seconds']:.3f} s"),
        ("format version", details["format_version"] if details["format_version"] is not None else "-"),
        ("compression", details["compression"] or "-"),
        ("CRIU", details["criu_version"]),
    ]
    if details["manifest_error"]:
        rows.append(("manifest", details["manifest_error"]))
    print(f"checkpoint {details['number']} of job {args.job}")
    for name, value in rows:
        print(f"  {name + ':':<27} {value}")

    if details["files"]:
        print("  files:")
        for entry in details["files"]:
            chunks = "" if entry["chunks"] is None else f"  {entry['chunks']} chunks"
            print(f"    {entry['path']:<24} {entry['size_bytes']:>12} bytes{chunks}")
    verification = details["verification"]
    if verification["status"] == "not_requested":
        print("  verification:               not run (pass --verify)")
        return 0
    seconds = f" in {verification['seconds']:.3f} s" if verification["seconds"] is not None else ""
    print(f"  verification:               {verification['status']}{seconds}" + (f": {verification['message']}" if verification["message"] else ""))
    return 0 if verification["status"] == "passed" else 1


def command_jobs_kill(args: argparse.Namespace) -> int:
    with connect(args) as client:
        before = client.get_job(args.job)
        job = client.kill(args.job)
    if before["state"] in TERMINAL_STATES:
        print(f"job {job['id']} had already finished ({job['state']}); nothing to kill")
    else:
        print(f"job {job['id']} is {job['state']}: {job['error'] or ''}")
    return 0


def command_jobs_checkpoint(args: argparse.Namespace) -> int:
    with connect(args) as client:
        taken = client.checkpoint(args.job, suspend=args.suspend)
    state = "suspended; resume it with 'checker jobs resume'" if taken["suspended"] else "running"
    print(f"job {args.job}: checkpoint {taken['checkpoint']} taken; the job is {state}")
    return 0


def command_jobs_fork(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.fork(args.job, args.checkpoint)
    print(f"job {job['id']} forked from checkpoint {job['last_checkpoint']} of job {args.job}; follow it with 'checker logs {job['id']} --follow'")
    return 0


def command_jobs_resume(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.resume(args.job)
    print(f"job {job['id']} resuming from its last checkpoint")
    return 0


def command_logs(args: argparse.Namespace) -> int:
    with connect(args) as client:
        offsets = {args.stream: 0}
        last_event = 0
        while True:
            if args.follow:
                for event in client.events(args.job, after=last_event):
                    last_event = event["seq"]
                    rewind_offsets(offsets, event)
            chunk = client.logs(args.job, args.stream, offsets[args.stream])
            if chunk["data"]:
                sys.stdout.write(chunk["data"])
                sys.stdout.flush()
                offsets[args.stream] = chunk["next_offset"]
                continue
            if not args.follow or chunk["finished"]:
                return 0
            time.sleep(0.3)


def command_signal(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload) if args.payload is not None else None
    except ValueError as error:
        raise CLIError(f"--payload is not valid JSON: {error}; quote it, e.g. --payload '{{\"approved\": true}}'") from error
    with connect(args) as client:
        signal = client.send_signal(args.job, args.name, payload)
    print(f"signal {signal['name']!r} ({signal['seq']}) stored for job {args.job}")
    return 0


def command_definitions_create(args: argparse.Namespace) -> int:
    command = args.command_after_separator
    if not command:
        raise CLIError("give the job's command after '--', e.g. checker definitions create NAME -- python3 /srv/job.py")
    metadata = parse_assignments(args.metadata, "--metadata")
    env = parse_assignments(args.env, "--env")
    runtime: dict[str, Any] = {"type": args.runtime}
    if args.read_only_bind:
        runtime["read_only_binds"] = args.read_only_bind
    if args.user_namespace:
        runtime["user_namespace"] = True
    if args.rootfs:
        runtime["rootfs"] = args.rootfs
    if args.mount:
        runtime["mounts"] = args.mount
    if args.file:
        # The guest gets each file at its absolute host path, so resolve relative ones here.
        runtime["files"] = [os.path.abspath(path) for path in args.file]
    for name in ("vcpus", "accelerator", "kernel", "initramfs"):
        value = getattr(args, name)
        if value is not None:
            runtime[name] = os.path.abspath(value) if name in ("kernel", "initramfs") else value
    limits = {name: value for name, value in (("memory_mib", args.memory_mib), ("cpu_cores", args.cpu_cores), ("pids", args.pids)) if value is not None}
    with connect(args) as client:
        definition = client.create_definition(
            args.name, command, env=env, metadata=metadata, execution_timeout_seconds=args.execution_timeout, runtime=runtime, limits=limits or None
        )
    print(f"definition {definition['name']} version {definition['version']} created; spawn it with 'checker jobs spawn {definition['name']}@{definition['version']}'")
    return 0


def command_definitions_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        definitions = client.list_definitions(args.name)
    if not definitions:
        print("no job definitions" + (f" named {args.name!r}" if args.name else ""))
        return 0
    print(f"{'NAME':<32} {'VERSION':>7}  {'RUNTIME':<8} COMMAND")
    for definition in definitions:
        runtime = definition["runtime"]
        print(f"{definition['name']:<32} {definition['version']:>7}  {runtime.get('type', ''):<8} {' '.join(runtime.get('command', []))}")
    return 0


def command_jobs_spawn(args: argparse.Namespace) -> int:
    params = parse_params(args.param, args.params_json)
    env = parse_assignments(args.env, "--env")
    metadata = parse_assignments(args.metadata, "--metadata")
    with connect(args) as client:
        job = client.spawn(args.definition, params=params, env=env, metadata=metadata, idempotency_key=args.idempotency_key)
    print(f"job {job['id']} spawned from {job['definition']} version {job['version']}; follow it with 'checker logs {job['id']} --follow'")
    return 0


def command_doctor(args: argparse.Namespace) -> int:
    from checker.cli.doctor import run_doctor

    return run_doctor(args.criu)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="checker", description="Durable execution by memory checkpointing with CRIU.")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("CHECKER_LOG_LEVEL"),
        help="Logging level: DEBUG, INFO, WARNING or ERROR (default $CHECKER_LOG_LEVEL, else INFO; WARNING for 'run', whose embedded server would drown the job's output).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add_client_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--server", help="URL of a running server (default $CHECKER_SERVER_URL or http://127.0.0.1:8181).")

    def add_server_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--state-dir", help="Directory of the state store, job files and checkpoints (default $CHECKER_STATE_DIR or ~/.local/state/checker).")
        sub.add_argument("--criu", help="Path of the CRIU binary (default $CHECKER_CRIU, then /opt/checker/bin/criu, then PATH).")

    server = commands.add_parser("server", help="Run the server (caller and runtime APIs).")
    server.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port to listen on (default {DEFAULT_PORT}).")
    server.add_argument("--database-url", help="SQLAlchemy URL of the state store (default SQLite in the state directory).")
    server.add_argument("--api-token", help="Bearer token required on the caller API (default $CHECKER_API_TOKEN; required off loopback).")
    server.add_argument("--keep-checkpoints", type=int, default=3, help="Most recent checkpoints kept per job (default 3).")
    server.add_argument(
        "--checkpoint-compression",
        type=compression_level,
        default=DEFAULT_COMPRESSION_LEVEL,
        metavar="off|LEVEL",
        help=f"zstd level (1-{MAX_ZSTD_LEVEL}) of stored checkpoint chunks, or off (default {DEFAULT_COMPRESSION_LEVEL}).",
    )
    server.add_argument(
        "--no-checkpoint-dedupe",
        action="store_true",
        help="Store each checkpoint's image files in full (format 1, uncompressed) instead of chunks shared by a job's checkpoints; needs --checkpoint-compression off.",
    )
    server.add_argument(
        "--checkpoint-store",
        metavar="s3://BUCKET/PREFIX",
        help="Keep checkpoint chunks and manifests in this S3 bucket and prefix; the state directory keeps only staging and caches "
        "(default: local, in the state directory). Credentials come from boto3's usual sources, such as AWS_ACCESS_KEY_ID.",
    )
    server.add_argument("--s3-endpoint-url", metavar="URL", help="URL of the S3 endpoint of --checkpoint-store, e.g. http://127.0.0.1:9000 (default: boto3's).")
    server.add_argument(
        "--keep-finished-checkpoints",
        type=non_negative_seconds,
        default=DEFAULT_FINISHED_RETENTION_SECONDS,
        metavar="SECONDS",
        help=f"Seconds the checkpoints of a completed or failed job are kept before they are deleted (default {DEFAULT_FINISHED_RETENTION_SECONDS:.0f}, 7 days).",
    )
    server.add_argument(
        "--no-drain",
        action="store_true",
        help="On SIGTERM or SIGINT, leave running jobs running for the next server to re-adopt, instead of checkpointing and suspending them.",
    )
    server.add_argument("--drain-timeout", type=float, default=60.0, help="Seconds a drain waits for the jobs' checkpoints (default 60).")
    server.add_argument(
        "--checkpoint-lock-timeout", type=float, default=60.0, help="Seconds a checkpoint waits for the job's checkpoint locks before it fails (default 60)."
    )
    server.add_argument(
        "--criu-timeout", type=float, default=1800.0, help="Seconds one CRIU dump or restore may run before it is killed and fails (default 1800)."
    )
    add_server_options(server)
    server.set_defaults(handler=command_server)

    run = commands.add_parser("run", help="Run a Python script as a job and print its result.")
    run.add_argument("file", help="Python script to run.")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="Job parameter; VALUE is parsed as JSON when it can be.")
    run.add_argument("--params-json", help="All job parameters as one JSON object.")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="Extra environment variable for the job.")
    run.add_argument("--name", help="Job definition name (default: the file name without extension).")
    run.add_argument("--quiet", action="store_true", help="Do not print checkpoint and restore events.")
    add_client_options(run)
    add_server_options(run)
    run.set_defaults(handler=command_run)

    definitions = commands.add_parser("definitions", help="Create and list job definitions.")
    definitions_commands = definitions.add_subparsers(dest="definitions_command", required=True)
    definitions_create = definitions_commands.add_parser(
        "create", help="Create the next version of a job definition.", usage="checker definitions create NAME [options] -- COMMAND [ARGUMENT ...]"
    )
    definitions_create.add_argument("name", help="Definition name; each create adds a version.")
    definitions_create.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="Environment variable of every job of this version.")
    definitions_create.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="Metadata of the definition; repeat for several.")
    definitions_create.add_argument("--execution-timeout", type=float, help="Seconds a job may run, suspended time included, before it fails.")
    definitions_create.add_argument("--runtime", choices=["process", "sandbox", "container", "podman", "gvisor", "vm"], default="process", help="Runtime of the jobs (default process).")
    definitions_create.add_argument(
        "--read-only-bind", action="append", default=[], metavar="HOST_PATH[:SANDBOX_PATH]", help="sandbox only: a host path the job may read; repeat for several."
    )
    definitions_create.add_argument("--user-namespace", action="store_true", help="sandbox only: run the job in its own user namespace.")
    definitions_create.add_argument("--rootfs", metavar="DIR", help="container only: host directory of the container's root file system, with python3.")
    definitions_create.add_argument(
        "--mount", action="append", default=[], metavar="HOST_PATH:CONTAINER_PATH[:ro|rw]", help="container only: a host path mounted into the container (read-only unless :rw); repeat for several."
    )
    definitions_create.add_argument(
        "--file", action="append", default=[], metavar="HOST_PATH", help="vm only: a host file or directory copied into the guest at the same path; repeat for several."
    )
    definitions_create.add_argument("--vcpus", type=int, help="vm only: the guest's virtual CPUs (default 1).")
    definitions_create.add_argument("--accelerator", choices=["auto", "kvm", "tcg"], help="vm only: KVM or TCG; auto (the default) uses KVM when it can run the guest.")
    definitions_create.add_argument("--kernel", metavar="PATH", help="vm only: the guest kernel (default /opt/checker/vm/vmlinuz).")
    definitions_create.add_argument("--initramfs", metavar="PATH", help="vm only: the guest's initramfs (default /opt/checker/vm/initramfs.cpio).")
    definitions_create.add_argument("--memory-mib", type=int, help="Memory limit (RAM and swap) of each job, in MiB; for vm jobs, the guest's RAM.")
    definitions_create.add_argument("--cpu-cores", type=float, help="CPU quota of each job, in cores (e.g. 0.5).")
    definitions_create.add_argument("--pids", type=int, help="Maximum number of processes and threads of each job.")
    add_client_options(definitions_create)
    definitions_create.set_defaults(handler=command_definitions_create)
    definitions_list = definitions_commands.add_parser("list", help="List job definitions and their versions.")
    definitions_list.add_argument("name", nargs="?", help="Only versions of this definition.")
    add_client_options(definitions_list)
    definitions_list.set_defaults(handler=command_definitions_list)

    jobs = commands.add_parser("jobs", help="Spawn, list, show, kill, checkpoint, fork and resume jobs.")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    jobs_list = jobs_commands.add_parser("list", help="List jobs, oldest first.")
    jobs_list.add_argument(
        "--state",
        action="append",
        choices=["pending", "running", "suspended", "pending_retry", "completed", "failed"],
        help="Only jobs in this state; repeat for several.",
    )
    jobs_list.add_argument("--definition", help="Only jobs of this job definition name.")
    jobs_list.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="Only jobs whose metadata has KEY=VALUE; repeat for several.")
    jobs_list.add_argument("--limit", type=int, default=100, help="Maximum number of jobs to list (default 100).")
    add_client_options(jobs_list)
    jobs_list.set_defaults(handler=command_jobs_list)
    jobs_spawn = jobs_commands.add_parser("spawn", help="Start a job from a definition: NAME, NAME@VERSION or NAME@latest.")
    jobs_spawn.add_argument("definition", help="Definition to run, e.g. etl, etl@3 or etl@latest.")
    jobs_spawn.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="Job parameter; VALUE is parsed as JSON when it can be.")
    jobs_spawn.add_argument("--params-json", help="All job parameters as one JSON object.")
    jobs_spawn.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="Extra environment variable for the job.")
    jobs_spawn.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="Metadata of the job; repeat for several.")
    jobs_spawn.add_argument("--idempotency-key", help="A repeated spawn with the same key returns the first job instead of a new one.")
    add_client_options(jobs_spawn)
    jobs_spawn.set_defaults(handler=command_jobs_spawn)
    jobs_show = jobs_commands.add_parser("show", help="Show a job with its checkpoints and events.")
    jobs_show.add_argument("job")
    add_client_options(jobs_show)
    jobs_show.set_defaults(handler=command_jobs_show)
    jobs_kill = jobs_commands.add_parser("kill", help="Kill a job; it ends as failed.")
    jobs_kill.add_argument("job")
    add_client_options(jobs_kill)
    jobs_kill.set_defaults(handler=command_jobs_kill)

    jobs_checkpoint = jobs_commands.add_parser("checkpoint", help="Checkpoint a running job now (it obeys the job's checkpoint locks).")
    jobs_checkpoint.add_argument("job")
    jobs_checkpoint.add_argument("--suspend", action="store_true", help="Stop the job after the checkpoint until 'checker jobs resume'.")
    add_client_options(jobs_checkpoint)
    jobs_checkpoint.set_defaults(handler=command_jobs_checkpoint)
    jobs_fork = jobs_commands.add_parser("fork", help="Start a new job from a checkpoint of a job; the job itself is not touched.")
    jobs_fork.add_argument("job")
    jobs_fork.add_argument("--checkpoint", type=int, help="Checkpoint number to fork from (default: the newest valid one).")
    add_client_options(jobs_fork)
    jobs_fork.set_defaults(handler=command_jobs_fork)
    jobs_resume = jobs_commands.add_parser("resume", help="Restore a suspended job now.")
    jobs_resume.add_argument("job")
    add_client_options(jobs_resume)
    jobs_resume.set_defaults(handler=command_jobs_resume)

    checkpoints = commands.add_parser("checkpoints", help="List and inspect a job's checkpoints.")
    checkpoints_commands = checkpoints.add_subparsers(dest="checkpoints_command", required=True)
    checkpoints_list = checkpoints_commands.add_parser("list", help="List a job's checkpoints with their sizes, stored bytes and durations.")
    checkpoints_list.add_argument("job")
    add_client_options(checkpoints_list)
    checkpoints_list.set_defaults(handler=command_checkpoints_list)
    checkpoints_show = checkpoints_commands.add_parser("show", help="Show one checkpoint: sizes, stored bytes, files, and verification on request.")
    checkpoints_show.add_argument("job")
    checkpoints_show.add_argument("number", type=positive_integer, help="Checkpoint number.")
    checkpoints_show.add_argument("--verify", action="store_true", help="Check every chunk and image file against the manifest (reads the whole image); exit 1 when it fails.")
    add_client_options(checkpoints_show)
    checkpoints_show.set_defaults(handler=command_checkpoints_show)

    logs = commands.add_parser("logs", help="Print a job's output.")
    logs.add_argument("job")
    logs.add_argument("--stream", choices=["stdout", "stderr"], default="stdout", help="Which output to print (default stdout).")
    logs.add_argument("--follow", "-f", action="store_true", help="Keep printing new output until the job finishes.")
    add_client_options(logs)
    logs.set_defaults(handler=command_logs)

    signal_parser = commands.add_parser("signal", help="Send a named signal with a JSON payload to a job.")
    signal_parser.add_argument("job")
    signal_parser.add_argument("name", help="Signal name, as the job passes it to wait_for_signal().")
    signal_parser.add_argument("--payload", help="JSON value the job receives (default null).")
    add_client_options(signal_parser)
    signal_parser.set_defaults(handler=command_signal)

    doctor = commands.add_parser("doctor", help="Check CRIU and the kernel, and run a dump/restore self-test.")
    doctor.add_argument("--criu", help="Path of the CRIU binary to check.")
    doctor.set_defaults(handler=command_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    # Everything after '--' is a job's command (definitions create), never Checker's options.
    command_after_separator: list[str] = []
    if "--" in arguments:
        separator = arguments.index("--")
        arguments, command_after_separator = arguments[:separator], arguments[separator + 1 :]
    args = build_parser().parse_args(arguments)
    if command_after_separator and args.command != "definitions":
        build_parser().error(f"'--' and a command after it are only for 'checker definitions create'; got {' '.join(command_after_separator)!r}")
    args.command_after_separator = command_after_separator
    default_level = "WARNING" if args.command == "run" else "INFO"
    configure_logging(args.log_level or default_level)
    from checker.runtimes.criu import CriuNotFoundError
    from checker.server.serve import StateDirectoryInUse
    from checker.store.s3 import S3StoreError

    try:
        return args.handler(args)
    except APIError as error:
        hint = "; 'checker jobs list' shows the jobs" if error.status == 404 and re.search(r"job '[^']*' not found", str(error)) else ""
        print(f"checker: error: {error}{hint}", file=sys.stderr)
        return 1
    except (CLIError, CriuNotFoundError, StateDirectoryInUse, S3StoreError, ValueError) as error:
        print(f"checker: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        # Failures to bind the port or create the state directory carry their own advice.
        print(f"checker: error: {error.strerror or error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
