"""Chunked checkpoints of real jobs: deduplication, corruption, crashes of the server, retention and the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, ServerProcess, chunk_path, event_kinds, free_port, kill_jobs_of, manifest_chunks, spawn_script, wait_for_checkpoints, wait_for_state, wait_until
from checker.cli.client import CallerClient

# A job with a heap of random bytes. It changes a small region before each
# checkpoint after the first, writes its heap's sha256 to a file before the
# last one, and reports the sha256 again at the end, after any restore.
HEAP_JOB = """
    import hashlib, os, time
    import checker

    params = checker.params()
    heap = bytearray(os.urandom(params["heap_mb"] << 20))
    results = []
    for step in range(params["checkpoints"]):
        go = os.path.join(params["control"], f"go-{step}")
        while not os.path.exists(go):
            time.sleep(0.02)
        if step:
            offset = step * (1 << 20)
            heap[offset:offset + 65536] = os.urandom(65536)
        if step == params["checkpoints"] - 1:
            with open(os.path.join(params["control"], "digest"), "w") as digest_file:
                digest_file.write(hashlib.sha256(heap).hexdigest())
        result = checker.checkpoint()
        results.append([result.number, result.restored])
    while not os.path.exists(os.path.join(params["control"], "gate")):
        time.sleep(0.02)
    checker.exit({"results": results, "digest": hashlib.sha256(heap).hexdigest()})
"""


class HeapJob:
    """A HEAP_JOB and the control directory through which the test drives it."""

    def __init__(self, client: CallerClient, script: Path, control: Path, heap_mb: int = 24, checkpoints: int = 2) -> None:
        control.mkdir(exist_ok=True)
        self.client = client
        self.control = control
        self.job = spawn_script(client, script, {"heap_mb": heap_mb, "checkpoints": checkpoints, "control": str(control)})
        self.id = self.job["id"]

    def checkpoint(self, step: int) -> dict:
        (self.control / f"go-{step}").touch()
        return wait_for_checkpoints(self.client, self.id, step + 1)

    def crash(self) -> None:
        job = self.client.get_job(self.id)
        restores = job["restore_count"]
        os.kill(job["pid"], signal.SIGKILL)
        wait_until(lambda: self.client.get_job(self.id)["restore_count"] > restores, 60, f"the restore of job {self.id}")

    def finish(self) -> dict:
        (self.control / "gate").touch()
        result = self.client.result(self.id, wait=60)
        assert result["state"] == "completed", result
        return result["output"]

    def digest_before_last_checkpoint(self) -> str:
        return (self.control / "digest").read_text()


@pytest.fixture
def heap_script(job_script) -> Path:
    return job_script("heap", HEAP_JOB)


def chunk_names(state_dir: Path, job_id: str) -> set[str]:
    chunks = state_dir / "checkpoints" / job_id / "chunks"
    return {path.name.removesuffix(".zst") for path in chunks.iterdir()}


def run_cli(server: ServerProcess, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "checker", *arguments, "--server", server.url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


@pytest.fixture
def restartable_server(tmp_path: Path):
    """A server the test configures and starts itself, possibly several times."""
    handle = ServerProcess(state_dir=tmp_path / "state", port=free_port(), log_path=tmp_path / "server.log")
    yield handle
    handle.stop()
    kill_jobs_of(handle)


# Deduplication


def test_second_checkpoint_stores_little(client, server, heap_script, tmp_path) -> None:
    heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=24)
    heap.checkpoint(0)
    heap.checkpoint(1)

    first, second = client.checkpoints(heap.id)
    assert first["stored_bytes"] >= 24 << 20
    # Chunks average about 576 KiB, so on a 24 MiB heap the interpreter's own
    # changed pages cost a varying share (22 % in one suite run). Without dedupe
    # it is about 100 %. The 5 % target is measured on 1 GiB by bench/dedupe_bench.py.
    assert second["stored_bytes"] < first["stored_bytes"] * 0.4
    shared = manifest_chunks(server.state_dir, heap.id, 1) & manifest_chunks(server.state_dir, heap.id, 2)
    assert len(shared) >= 20

    heap.crash()
    output = heap.finish()
    assert output["results"][-1] == [2, True]
    assert output["digest"] == heap.digest_before_last_checkpoint()
    restored = [e for e in client.events(heap.id) if e["kind"] == "restored"]
    assert restored[0]["data"]["image_source"] == "cache"


def test_corrupt_restore_cache_rebuilds_from_chunks(client, server, heap_script, tmp_path) -> None:
    heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=8)
    heap.checkpoint(0)
    heap.checkpoint(1)
    cached_pages = max((server.state_dir / "checkpoints" / heap.id / "2.cache").glob("pages-*.img"), key=lambda path: path.stat().st_size)
    with open(cached_pages, "r+b") as image_file:
        image_file.seek(cached_pages.stat().st_size // 2)
        byte = image_file.read(1)[0]
        image_file.seek(cached_pages.stat().st_size // 2)
        image_file.write(bytes([byte ^ 0x01]))

    heap.crash()
    output = heap.finish()

    assert output["results"] == [[1, False], [2, True]]
    assert output["digest"] == heap.digest_before_last_checkpoint()
    assert {c["number"]: c["status"] for c in client.checkpoints(heap.id)} == {1: "valid", 2: "valid"}
    restored = [e for e in client.events(heap.id) if e["kind"] == "restored"]
    assert restored[0]["data"]["checkpoint"] == 2
    assert restored[0]["data"]["image_source"] == "chunks"


def test_uncompressed_chunks_restore(restartable_server, heap_script, tmp_path) -> None:
    restartable_server.extra_args = ["--checkpoint-compression", "off"]
    restartable_server.start()
    with CallerClient(restartable_server.url) as client:
        heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=8, checkpoints=1)
        heap.checkpoint(0)
        chunks = restartable_server.state_dir / "checkpoints" / heap.id / "chunks"
        assert not any(path.name.endswith(".zst") for path in chunks.iterdir())

        heap.crash()
        output = heap.finish()
    assert output["digest"] == heap.digest_before_last_checkpoint()


# Corruption of the newest checkpoint: each is detected and checkpoint 1 is restored.
# A missing chunk is found even while the restore cache is intact. A damaged
# chunk is found when the image is rebuilt from chunks, so those cases also
# delete the restore cache.


def corrupt_missing_chunk(state_dir: Path, job_id: str) -> None:
    chunk_path(state_dir, job_id, only_in_second(state_dir, job_id)).unlink()


def delete_restore_cache(state_dir: Path, job_id: str) -> None:
    shutil.rmtree(state_dir / "checkpoints" / job_id / "2.cache")


def corrupt_truncated_chunk(state_dir: Path, job_id: str) -> None:
    delete_restore_cache(state_dir, job_id)
    path = chunk_path(state_dir, job_id, only_in_second(state_dir, job_id))
    os.truncate(path, path.stat().st_size // 2)


def corrupt_flipped_byte(state_dir: Path, job_id: str) -> None:
    delete_restore_cache(state_dir, job_id)
    path = chunk_path(state_dir, job_id, only_in_second(state_dir, job_id))
    with open(path, "r+b") as chunk:
        chunk.seek(path.stat().st_size // 2)
        byte = chunk.read(1)[0]
        chunk.seek(path.stat().st_size // 2)
        chunk.write(bytes([byte ^ 0x01]))


def corrupt_manifest_version(state_dir: Path, job_id: str) -> None:
    path = state_dir / "checkpoints" / job_id / "2" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))


def corrupt_missing_manifest(state_dir: Path, job_id: str) -> None:
    (state_dir / "checkpoints" / job_id / "2" / "manifest.json").unlink()


def only_in_second(state_dir: Path, job_id: str) -> str:
    """Return a chunk that checkpoint 2 lists and checkpoint 1 does not, so damaging it leaves checkpoint 1 whole."""
    return sorted(manifest_chunks(state_dir, job_id, 2) - manifest_chunks(state_dir, job_id, 1))[0]


@pytest.mark.parametrize(
    ("corrupt", "expected_message"),
    [
        (corrupt_missing_chunk, "is missing from"),
        (corrupt_truncated_chunk, "chunk [0-9a-f]{64} (is not a valid zstd frame|has [0-9]+ bytes, but the manifest records)"),
        (corrupt_flipped_byte, "chunk [0-9a-f]{64} (is not a valid zstd frame|fails its sha256 check)"),
        (corrupt_manifest_version, "format version 99"),
        (corrupt_missing_manifest, "has no manifest"),
    ],
    ids=["missing-chunk", "truncated-chunk", "flipped-byte", "unknown-version", "missing-manifest"],
)
def test_corrupt_checkpoint_falls_back(client, server, heap_script, tmp_path, corrupt, expected_message) -> None:
    heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=8)
    heap.checkpoint(0)
    heap.checkpoint(1)
    corrupt(server.state_dir, heap.id)

    heap.crash()
    output = heap.finish()

    # The copy restored from checkpoint 1 takes its second checkpoint again, as number 3.
    assert output["results"] == [[1, True], [3, False]]
    statuses = {c["number"]: c["status"] for c in client.checkpoints(heap.id)}
    assert statuses == {1: "valid", 2: "corrupt", 3: "valid"}
    corrupt_events = [e for e in client.events(heap.id) if e["kind"] == "checkpoint_corrupt"]
    assert len(corrupt_events) == 1
    assert re.search(expected_message, corrupt_events[0]["message"])
    assert not list((server.state_dir / "checkpoints" / heap.id).glob("*.restore"))


# Crashes of the server


def test_server_killed_before_manifest(restartable_server, heap_script, tmp_path) -> None:
    server = restartable_server
    server.start()
    client = CallerClient(server.url)
    heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=16)
    heap.checkpoint(0)
    server.sigkill()

    server.extra_env = {"CHECKER_TEST_PAUSE_AT": "before-manifest"}
    server.start()
    (heap.control / "go-1").touch()
    wait_until((server.state_dir / "checkpoints" / "paused-at-before-manifest").exists, 60, "the pause before the manifest")
    staging = server.state_dir / "checkpoints" / heap.id / "2.partial"
    assert staging.is_dir()
    assert not (staging / "manifest.json").exists()
    server.sigkill()

    server.extra_env = {}
    server.start()
    # The job's pending call is retried and gets a new checkpoint 2.
    wait_for_checkpoints(client, heap.id, 2)
    checkpoints_dir = server.state_dir / "checkpoints" / heap.id
    assert not list(checkpoints_dir.glob("*.partial"))
    assert chunk_names(server.state_dir, heap.id) == manifest_chunks(server.state_dir, heap.id, 1) | manifest_chunks(server.state_dir, heap.id, 2)
    assert client.checkpoint_details(heap.id, 1, verify=True)["verification"]["status"] == "passed"

    heap.crash()
    output = heap.finish()
    client.close()
    assert output["digest"] == heap.digest_before_last_checkpoint()
    assert output["results"][-1] == [2, True]


def test_server_killed_during_chunk_sweep(restartable_server, heap_script, tmp_path) -> None:
    server = restartable_server
    server.extra_args = ["--keep-checkpoints", "1"]
    server.start()
    client = CallerClient(server.url)
    heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=16)
    heap.checkpoint(0)
    first_chunks = manifest_chunks(server.state_dir, heap.id, 1)
    server.sigkill()

    server.extra_env = {"CHECKER_TEST_PAUSE_AT": "chunk-sweep"}
    server.start()
    heap.checkpoint(1)
    wait_until((server.state_dir / "checkpoints" / "paused-at-chunk-sweep").exists, 60, "the pause in the chunk sweep")
    second_chunks = manifest_chunks(server.state_dir, heap.id, 2)
    left = chunk_names(server.state_dir, heap.id)
    assert second_chunks <= left
    assert left - second_chunks, "the sweep had unreferenced chunks left to delete"
    assert not (server.state_dir / "checkpoints" / heap.id / "1").exists()
    server.sigkill()

    server.extra_env = {}
    server.start()
    assert chunk_names(server.state_dir, heap.id) == second_chunks
    assert first_chunks - second_chunks
    assert client.checkpoint_details(heap.id, 2, verify=True)["verification"]["status"] == "passed"

    heap.crash()
    output = heap.finish()
    client.close()
    assert output["results"][-1] == [2, True]
    assert output["digest"] == heap.digest_before_last_checkpoint()


def test_format_1_checkpoint_restores_after_upgrade(restartable_server, heap_script, tmp_path) -> None:
    server = restartable_server
    server.extra_args = ["--no-checkpoint-dedupe", "--checkpoint-compression", "off"]
    server.start()
    client = CallerClient(server.url)
    heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=8, checkpoints=1)
    heap.checkpoint(0)
    manifest = json.loads((server.state_dir / "checkpoints" / heap.id / "1" / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    server.sigkill()

    server.extra_args = []
    server.start()
    heap.crash()
    output = heap.finish()
    client.close()
    assert output["results"] == [[1, True]]
    assert output["digest"] == heap.digest_before_last_checkpoint()


# Retention


def test_retention_deletes_unreferenced_chunks(restartable_server, heap_script, tmp_path) -> None:
    server = restartable_server
    server.extra_args = ["--keep-checkpoints", "1"]
    server.start()
    with CallerClient(server.url) as client:
        heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=8, checkpoints=3)
        for step in range(3):
            heap.checkpoint(step)
        statuses = [c["status"] for c in client.checkpoints(heap.id)]
        heap.finish()
    assert statuses == ["deleted", "deleted", "valid"]
    assert sorted(p.name for p in (server.state_dir / "checkpoints" / heap.id).iterdir()) == ["3", "3.cache", "chunks"]
    assert chunk_names(server.state_dir, heap.id) == manifest_chunks(server.state_dir, heap.id, 3)


def test_finished_job_checkpoints_expire(restartable_server, heap_script, tmp_path) -> None:
    server = restartable_server
    server.extra_args = ["--keep-finished-checkpoints", "1"]
    server.start()
    with CallerClient(server.url) as client:
        heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=4, checkpoints=1)
        heap.checkpoint(0)
        heap.finish()
        # The server deletes the files first and records the event after them.
        wait_until(lambda: "checkpoints_expired" in event_kinds(client, heap.id), 30, "the checkpoints of the finished job to be deleted")
        statuses = [c["status"] for c in client.checkpoints(heap.id)]
    assert statuses == ["deleted"]
    assert not (server.state_dir / "checkpoints" / heap.id).exists()


def test_fork_keeps_chunks_after_source_expires(restartable_server, heap_script, tmp_path) -> None:
    server = restartable_server
    server.extra_args = ["--keep-finished-checkpoints", "1"]
    server.start()
    with CallerClient(server.url) as client:
        heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=8, checkpoints=1)
        heap.checkpoint(0)
        fork = client.fork(heap.id, 1)
        client.kill(heap.id)  # The fork waits at the gate, so only the source finishes.
        wait_until(lambda: not (server.state_dir / "checkpoints" / heap.id).exists(), 30, "the source's checkpoints to be deleted")

        verification = client.checkpoint_details(fork["id"], 1, verify=True)["verification"]
        (heap.control / "gate").touch()
        forked = wait_for_state(client, fork["id"], ("completed", "failed"))
    assert verification["status"] == "passed", verification
    assert forked["state"] == "completed"
    assert forked["output"]["results"] == [[1, True]]


# The CLI


def test_cli_lists_and_shows_checkpoints(client, server, heap_script, tmp_path) -> None:
    heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=8)
    heap.checkpoint(0)
    heap.checkpoint(1)

    listed = run_cli(server, "checkpoints", "list", heap.id)
    shown = run_cli(server, "checkpoints", "show", heap.id, "2", "--verify")
    heap.finish()

    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert "stored MB" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2"]
    assert shown.returncode == 0, shown.stderr
    assert "checkpoint 2 of job" in shown.stdout
    assert "format version:" in shown.stdout
    assert "pages-" in shown.stdout
    assert "verification:               passed" in shown.stdout


def test_cli_verify_reports_corrupt_chunk(client, server, heap_script, tmp_path) -> None:
    heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=8)
    heap.checkpoint(0)
    heap.checkpoint(1)
    corrupt_missing_chunk(server.state_dir, heap.id)

    shown = run_cli(server, "checkpoints", "show", heap.id, "2", "--verify")
    heap.finish()

    assert shown.returncode == 1
    assert "verification:               failed" in shown.stdout
    assert "is missing from" in shown.stdout
    assert "Traceback" not in shown.stderr


def test_cli_unknown_checkpoint_names_number(client, server, heap_script, tmp_path) -> None:
    heap = HeapJob(client, heap_script, tmp_path / "control", heap_mb=4, checkpoints=1)
    heap.checkpoint(0)

    shown = run_cli(server, "checkpoints", "show", heap.id, "99")
    heap.finish()

    assert shown.returncode == 1
    assert f"job {heap.id} has no checkpoint 99; its checkpoints: 1" in shown.stderr
    assert "Traceback" not in shown.stderr


@pytest.mark.parametrize(
    ("arguments", "expected_message"),
    [
        (["checkpoints", "show", "somejob", "two"], "invalid checkpoint number 'two'"),
        (["checkpoints", "show", "somejob", "0"], "invalid checkpoint number '0'"),
        (["checkpoints", "list", "nosuchjob"], "job 'nosuchjob' not found"),
        (["server", "--checkpoint-compression", "fast"], "invalid compression 'fast'"),
        (["server", "--checkpoint-compression", "23"], "invalid compression '23'"),
        (["server", "--keep-finished-checkpoints", "soon"], "invalid number of seconds 'soon'"),
    ],
    ids=["number-not-integer", "number-zero", "unknown-job", "compression-word", "compression-too-high", "retention-not-number"],
)
def test_cli_bad_input_names_value(server, arguments, expected_message) -> None:
    if arguments[0] == "server":
        completed = subprocess.run([sys.executable, "-m", "checker", *arguments], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    else:
        completed = run_cli(server, *arguments)
    assert completed.returncode != 0
    assert expected_message in completed.stderr
    assert "Traceback" not in completed.stderr


def test_server_rejects_compression_without_dedupe(tmp_path) -> None:
    command = [sys.executable, "-m", "checker", "server", "--state-dir", str(tmp_path / "state"), "--no-checkpoint-dedupe", "--port", str(free_port())]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert completed.returncode == 1
    assert "checkpoint compression level 1 needs deduplication" in completed.stderr
    assert "Traceback" not in completed.stderr
