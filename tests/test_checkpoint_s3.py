"""The S3 checkpoint store against a moto S3 server on loopback: restores, a second server, a damaged chunk object and bad options."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, ServerProcess, free_port, kill_jobs_in, spawn_script, wait_for_checkpoints, wait_until
from checker.cli.client import CallerClient
from checker.store.chunks import ChunkDirectory
from checker.store.state import sqlite_url
from demo.s3client import TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY, create_s3_client
from demo.s3server import DemoS3Server

BUCKET = "checkpoints"
PREFIX = "cluster-a"
S3_ENV = {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY, "AWS_DEFAULT_REGION": TEST_REGION}

# A job that takes `checkpoints` checkpoints, drawing fresh random memory
# before each, and reports the number of its last checkpoint at the end.
# The memory of each checkpoint lives in chunks that no other one shares.
STEPPED_JOB = """
    import os, time
    import checker

    params = checker.params()
    secrets = []
    ballast = []
    result = None
    for step in range(params["checkpoints"]):
        secrets.append(os.urandom(16).hex())
        ballast.append(bytearray(os.urandom(4 << 20)))
        result = checker.checkpoint()
    while not os.path.exists(params["gate"]):
        time.sleep(0.02)
    checker.exit({"secrets": secrets, "restored": result.restored, "checkpoint": result.number})
"""


@pytest.fixture
def s3_endpoint():
    with DemoS3Server() as s3_server:
        create_s3_client(s3_server.endpoint_url).create_bucket(Bucket=BUCKET)
        yield s3_server.endpoint_url


def s3_server_process(tmp_path: Path, endpoint: str, name: str, port: int | None = None) -> ServerProcess:
    return ServerProcess(
        state_dir=tmp_path / name,
        port=port or free_port(),
        log_path=tmp_path / f"{name}.log",
        extra_args=["--checkpoint-store", f"s3://{BUCKET}/{PREFIX}", "--s3-endpoint-url", endpoint],
        extra_env=S3_ENV,
    )


@pytest.fixture
def s3_servers(tmp_path: Path, s3_endpoint: str):
    """Start S3-store servers on demand; stop them and kill their jobs at the end."""
    started: list[tuple[ServerProcess, str]] = []

    def start(
        name: str, port: int | None = None, database_from: ServerProcess | None = None, database_url: str | None = None, options: tuple[str, ...] = ()
    ) -> ServerProcess:
        handle = s3_server_process(tmp_path, s3_endpoint, name, port)
        handle.extra_args += options
        if database_url is not None:
            handle.extra_args += ["--database-url", database_url]
        elif database_from is not None:
            handle.state_dir.mkdir(parents=True)
            shutil.copy2(database_from.state_dir / "state.db", handle.state_dir / "state.db")
        handle.start()
        started.append((handle, database_url or sqlite_url(handle.state_dir)))
        return handle

    yield start
    for handle, _ in started:
        handle.stop()
    for _, url in started:
        kill_jobs_in(url)


def bucket_keys(endpoint: str, job_id: str) -> list[str]:
    listing = create_s3_client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{job_id}/")
    return [item["Key"] for item in listing.get("Contents", ())]


def bucket_manifest(endpoint: str, job_id: str, number: int) -> dict:
    body = create_s3_client(endpoint).get_object(Bucket=BUCKET, Key=f"{PREFIX}/{job_id}/{number}/manifest.json")["Body"].read()
    return json.loads(body)


def manifest_digests(manifest: dict) -> set[str]:
    return {digest for entry in manifest["files"] for digest in entry["chunks"]}


def chunk_object_digests(endpoint: str, job_id: str) -> set[str]:
    return {key.rsplit("/", 1)[1].removesuffix(".zst") for key in bucket_keys(endpoint, job_id) if "/chunks/" in key}


def checkpoint_then_crash(start_server, script: Path, gate: Path, checkpoints: int, database_url: str | None = None) -> tuple[ServerProcess, str]:
    """Run STEPPED_JOB on a new server until it took its checkpoints, then SIGKILL the server and the job; return the server and job id."""
    first = start_server("first", database_url=database_url)
    with CallerClient(first.url) as client:
        job = spawn_script(client, script, {"gate": str(gate), "checkpoints": checkpoints})
        wait_for_checkpoints(client, job["id"], checkpoints)
    first.sigkill()
    kill_jobs_in(database_url or sqlite_url(first.state_dir))
    return first, job["id"]


def finish_after_restore(client: CallerClient, job_id: str, gate: Path, timeout: float) -> dict:
    """Wait for the job's first restore, open its gate, and return its result."""
    restored = wait_until(lambda: (j := client.get_job(job_id))["restore_count"] == 1 and j, timeout, f"the restore of job {job_id}")
    assert restored["state"] == "running"
    gate.touch()
    return client.result(job_id, wait=30)


def test_s3_store_job_sigkill_restores(s3_servers, s3_endpoint: str, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    server = s3_servers("state")
    with CallerClient(server.url) as client:
        job = spawn_script(client, job_script("stepped", STEPPED_JOB), {"gate": str(gate), "checkpoints": 1})
        running = wait_for_checkpoints(client, job["id"], 1)

        manifest = bucket_manifest(s3_endpoint, job["id"], 1)
        assert f"{PREFIX}/{job['id']}/1/manifest.json" in bucket_keys(s3_endpoint, job["id"])
        assert manifest_digests(manifest) <= chunk_object_digests(s3_endpoint, job["id"])

        os.kill(running["pid"], signal.SIGKILL)
        result = finish_after_restore(client, job["id"], gate, 30)
    assert result["state"] == "completed"
    assert result["output"]["restored"] is True
    assert result["output"]["checkpoint"] == 1


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_s3_store_restores_on_second_server(s3_servers, job_script, tmp_path: Path, request, database: str) -> None:
    gate = tmp_path / "gate"
    database_url = request.getfixturevalue("postgres_url") if database == "postgres" else None
    first, job_id = checkpoint_then_crash(s3_servers, job_script("stepped", STEPPED_JOB), gate, 1, database_url)

    # Same port, because the job's SDK calls back to the URL it started with.
    if database_url is None:
        second = s3_servers("second", port=first.port, database_from=first)
    else:
        second = s3_servers("second", port=first.port, database_url=database_url)
    with CallerClient(second.url) as client:
        result = finish_after_restore(client, job_id, gate, 60)
        verification = client.checkpoint_details(job_id, 1, verify=True)["verification"]
    assert result["state"] == "completed"
    assert result["output"]["restored"] is True
    assert result["output"]["checkpoint"] == 1
    assert verification["status"] == "passed", verification
    assert (second.state_dir / "checkpoints" / job_id / "chunks").is_dir()


def test_s3_corrupt_chunk_object_uses_previous(s3_servers, s3_endpoint: str, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    first, job_id = checkpoint_then_crash(s3_servers, job_script("stepped", STEPPED_JOB), gate, 2)

    newest_only = manifest_digests(bucket_manifest(s3_endpoint, job_id, 2)) - manifest_digests(bucket_manifest(s3_endpoint, job_id, 1))
    assert newest_only
    damaged = sorted(newest_only)[0]
    s3 = create_s3_client(s3_endpoint)
    damaged_key = next(key for key in bucket_keys(s3_endpoint, job_id) if f"/chunks/{damaged}" in key)
    s3.put_object(Bucket=BUCKET, Key=damaged_key, Body=b"not the chunk that was uploaded")

    second = s3_servers("second", port=first.port, database_from=first)
    with CallerClient(second.url) as client:
        result = finish_after_restore(client, job_id, gate, 60)
        events = client.events(job_id)
    corrupt = [event for event in events if event["kind"] == "checkpoint_corrupt"]
    restored = [event for event in events if event["kind"] == "restored"]
    assert result["state"] == "completed"
    assert len(corrupt) == 1
    assert damaged in corrupt[0]["message"]
    assert len(restored) == 1
    assert "restored from checkpoint 1 " in restored[0]["message"]
    # The damaged object never reaches the local cache. A later checkpoint of
    # the restored job may store the same chunk again, from memory: then its
    # local file must hold the right bytes.
    local_chunks = ChunkDirectory(second.state_dir / "checkpoints" / job_id / "chunks", compression_level=None, fsync=False)
    if local_chunks.stored_path(damaged) is not None:
        local_chunks.read(damaged, "the local chunk cache")  # Raises CorruptCheckpointError on the damaged bytes.


def test_s3_server_killed_during_chunk_sweep(s3_servers, s3_endpoint: str, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    paused = s3_server_process(tmp_path, s3_endpoint, "state")
    paused.extra_args += ["--keep-checkpoints", "1"]
    paused.extra_env = {**S3_ENV, "CHECKER_TEST_PAUSE_AT": "s3-chunk-sweep"}
    paused.start()
    with CallerClient(paused.url) as client:
        job = spawn_script(client, job_script("stepped", STEPPED_JOB), {"gate": str(gate), "checkpoints": 2})
        wait_until((paused.state_dir / "checkpoints" / "paused-at-s3-chunk-sweep").exists, 60, "the pause in the chunk object sweep")
    second_chunks = manifest_digests(bucket_manifest(s3_endpoint, job["id"], 2))
    chunk_objects = chunk_object_digests(s3_endpoint, job["id"])
    assert f"{PREFIX}/{job['id']}/1/manifest.json" not in bucket_keys(s3_endpoint, job["id"])
    assert second_chunks <= chunk_objects
    assert chunk_objects - second_chunks, "the sweep had unreferenced chunk objects left to delete"
    paused.sigkill()

    # The job keeps running; the next server with the same state directory re-adopts it.
    server = s3_servers("state", port=paused.port)
    assert chunk_object_digests(s3_endpoint, job["id"]) == second_chunks
    with CallerClient(server.url) as client:
        running = client.get_job(job["id"])
        os.kill(running["pid"], signal.SIGKILL)
        result = finish_after_restore(client, job["id"], gate, 60)
    assert result["state"] == "completed"
    assert result["output"]["checkpoint"] == 2


def test_s3_fork_outlives_expired_source(s3_servers, s3_endpoint: str, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    server = s3_servers("state", options=("--keep-finished-checkpoints", "1"))
    with CallerClient(server.url) as client:
        job = spawn_script(client, job_script("stepped", STEPPED_JOB), {"gate": str(gate), "checkpoints": 1})
        wait_for_checkpoints(client, job["id"], 1)
        fork = client.fork(job["id"], 1)
        fork_chunks = manifest_digests(bucket_manifest(s3_endpoint, fork["id"], 1))
        client.kill(job["id"])  # The fork waits at the gate, so only the source finishes.
        wait_until(lambda: not bucket_keys(s3_endpoint, job["id"]), 30, "the source's objects to be deleted from the bucket")

        verification = client.checkpoint_details(fork["id"], 1, verify=True)["verification"]
        gate.touch()
        forked = client.result(fork["id"], wait=30)
    assert fork_chunks <= chunk_object_digests(s3_endpoint, fork["id"])
    assert verification["status"] == "passed", verification
    assert forked["state"] == "completed"
    assert forked["output"]["restored"] is True


def run_server_command(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "checker", "server", "--port", str(free_port()), "--state-dir", str(tmp_path / "state"), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env={**os.environ, **S3_ENV})


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--checkpoint-store", "ftp://checkpoints/a"], "ftp://checkpoints/a"),
        (["--checkpoint-store", "s3://Bad_Bucket/a"], "Bad_Bucket"),
        (["--checkpoint-store", "s3://checkpoints/a//b"], "a//b"),
        (["--s3-endpoint-url", "http://127.0.0.1:9000"], "http://127.0.0.1:9000"),
        (["--checkpoint-store", "s3://checkpoints/a", "--s3-endpoint-url", "127.0.0.1:9000"], "127.0.0.1:9000"),
        (["--checkpoint-store", "s3://checkpoints/a", "--no-checkpoint-dedupe", "--checkpoint-compression", "off"], "s3://checkpoints/a"),
    ],
)
def test_s3_options_invalid(tmp_path: Path, options: list[str], named: str) -> None:
    completed = run_server_command(tmp_path, *options)
    assert completed.returncode == 1
    assert named in completed.stderr
    assert "Traceback" not in completed.stderr


def test_s3_bucket_missing(tmp_path: Path, s3_endpoint: str) -> None:
    completed = run_server_command(tmp_path, "--checkpoint-store", "s3://no-such-bucket/a", "--s3-endpoint-url", s3_endpoint)
    assert completed.returncode == 1
    assert "s3://no-such-bucket/a" in completed.stderr
    assert "404" in completed.stderr
