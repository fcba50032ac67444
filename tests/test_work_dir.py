"""The work directory is captured with each checkpoint and put back before each restore."""

from __future__ import annotations

import os
import signal
import tarfile
from pathlib import Path

from checker.cli.client import CallerClient
from checker.runtimes.worksnapshot import restore_snapshot, write_snapshot
from checker.store.checkpoints import LocalCheckpointStore
from conftest import ServerProcess, spawn_script, wait_for_checkpoints, wait_until

ROLLBACK_JOB = """
    import os, time
    import checker

    params = checker.params()
    held = open("held-open.txt", "w")  # Written in place, never closed: CRIU checks its size on restore.
    for line in range(1, 11):
        with open("lines.txt", "a") as lines:
            lines.write(f"{line}\\n")
    held.write("before\\n")
    held.flush()
    result = checker.checkpoint()
    for line in range(11, 21):
        with open("lines.txt", "a") as lines:
            lines.write(f"{line}\\n")
    held.write("after the checkpoint\\n")
    held.flush()
    print("after checkpoint", flush=True)
    while not os.path.exists(params["gate"]):
        time.sleep(0.02)
    with open("lines.txt") as lines:
        written = [int(line) for line in lines]
    checker.exit({"lines": written, "restored": result.restored, "held": open("held-open.txt").read()})
"""

COUNTER_JOB = """
    import os
    import checker

    params = checker.params()
    count, mismatches = 0, []
    with open("counter.txt", "w") as counter:
        counter.write("0")
    while not os.path.exists(params["gate"]):
        with open("counter.txt") as counter:
            on_disk = int(counter.read())
        if on_disk != count:
            mismatches.append((count, on_disk))
        count += 1
        with open("counter.txt", "w") as counter:
            counter.write(str(count))
    checker.exit({"count": count, "mismatches": mismatches})
"""


def stdout_of(server: ServerProcess, job_id: str) -> str:
    path = server.state_dir / "jobs" / job_id / "stdout.log"
    return path.read_text() if path.exists() else ""


def test_restore_rolls_back_work_files(server: ServerProcess, client: CallerClient, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = spawn_script(client, job_script("rollback", ROLLBACK_JOB), {"gate": str(gate)})
    wait_until(lambda: "after checkpoint" in stdout_of(server, job["id"]), 30, "the job to write past its checkpoint")

    os.kill(client.get_job(job["id"])["pid"], signal.SIGKILL)
    wait_until(lambda: client.get_job(job["id"])["restore_count"] >= 1, 60, "the job to be restored")
    gate.touch()
    result = client.result(job["id"], wait=60)

    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    # Without the capture, lines 11-20 would be there twice and CRIU would reject held-open.txt.
    assert result["output"]["lines"] == list(range(1, 21))
    assert result["output"]["held"] == "before\nafter the checkpoint\n"


def test_work_snapshot_matches_frozen_memory(server: ServerProcess, client: CallerClient, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = spawn_script(client, job_script("counter", COUNTER_JOB), {"gate": str(gate)})
    counter = server.state_dir / "jobs" / job["id"] / "work" / "counter.txt"
    wait_until(lambda: counter.exists() and counter.read_text() not in ("", "0"), 30, "the job to count")

    # External checkpoints land at arbitrary points of the loop.
    for _ in range(5):
        client.checkpoint(job["id"])
    os.kill(client.get_job(job["id"])["pid"], signal.SIGKILL)
    wait_until(lambda: client.get_job(job["id"])["restore_count"] >= 1, 60, "the job to be restored")
    gate.touch()
    result = client.result(job["id"], wait=60)

    assert result["state"] == "completed", result
    assert result["output"]["mismatches"] == []
    assert result["output"]["count"] > 0


def test_fork_gets_work_dir_of_its_checkpoint(server: ServerProcess, client: CallerClient, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    original = spawn_script(client, job_script("rollback", ROLLBACK_JOB), {"gate": str(gate)})
    wait_until(lambda: "after checkpoint" in stdout_of(server, original["id"]), 30, "the job to write past its checkpoint")

    fork = client.fork(original["id"])
    wait_until(lambda: client.get_job(fork["id"])["restore_count"] >= 1, 60, "the fork to be restored")
    gate.touch()

    assert client.result(fork["id"], wait=60)["output"]["lines"] == list(range(1, 21))
    assert client.result(original["id"], wait=60)["output"]["lines"] == list(range(1, 21))


def test_checkpoint_image_holds_work_archive(server: ServerProcess, client: CallerClient, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = spawn_script(client, job_script("rollback", ROLLBACK_JOB), {"gate": str(gate)})
    wait_for_checkpoints(client, job["id"], 1)
    gate.touch()
    client.result(job["id"], wait=60)

    store = LocalCheckpointStore(server.state_dir / "checkpoints")
    manifest = store.read_manifest(job["id"], 1)
    assert "workdir.tar" in [entry.path for entry in manifest.files]
    image = store.prepare_restore(manifest, use_cache=False)  # Rebuilt from the stored chunks.
    try:
        with tarfile.open(image.directory / "workdir.tar") as archive:
            names = sorted(archive.getnames())
            lines = archive.extractfile("./lines.txt").read().decode()
    finally:
        store.release_restore(image)
    assert names == [".", "./held-open.txt", "./lines.txt"]
    assert lines == "".join(f"{line}\n" for line in range(1, 11))


def test_snapshot_restore_replaces_directory(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "kept.txt").write_text("at checkpoint")
    (work / "sub" / "nested.txt").write_text("nested")
    os.symlink("kept.txt", work / "link")
    write_snapshot(work, tmp_path / "workdir.tar")

    (work / "kept.txt").write_text("changed after the checkpoint")
    (work / "new.txt").write_text("created after the checkpoint")
    restore_snapshot(tmp_path / "workdir.tar", work)

    assert (work / "kept.txt").read_text() == "at checkpoint"
    assert (work / "sub" / "nested.txt").read_text() == "nested"
    assert not (work / "new.txt").exists()
    assert os.readlink(work / "link") == "kept.txt"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["work", "workdir.tar"]


def test_snapshot_restore_rejects_escaping_members(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("outside")
    with tarfile.open(evil, "w") as archive:
        archive.add(payload, arcname="../escaped.txt")

    work = tmp_path / "job" / "work"
    work.mkdir(parents=True)
    try:
        restore_snapshot(evil, work)
    except tarfile.TarError as error:
        assert "outside" in str(error) or "escaped" in str(error)
    else:
        raise AssertionError("an archive member outside the work directory was extracted")
    assert not (tmp_path / "job" / "escaped.txt").exists()
