"""Checkpoint, SIGKILL and recovery of real jobs through the real server and CRIU."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from conftest import chunk_path, event_kinds, manifest_chunks, spawn_script, wait_for_checkpoints, wait_for_state, wait_until

# A job that draws a secret before its checkpoint, then waits at a gate file.
# The restored copy must report the same secret: it lives only in memory.
GATED_JOB = """
    import os, time
    import checker

    gate = checker.params()["gate"]
    secret = os.urandom(16).hex()
    ballast = bytearray(os.urandom(1 << 20)) * 8
    result = checker.checkpoint()
    print(f"checkpoint {result.number} restored={result.restored}", flush=True)
    while not os.path.exists(gate):
        time.sleep(0.02)
    checker.exit({"secret": secret, "restored": result.restored, "checkpoint": result.number, "ballast": len(ballast)})
"""


def test_job_sigkill_restores_from_checkpoint(client, server, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = spawn_script(client, job_script("gated", GATED_JOB), {"gate": str(gate)})
    running = wait_for_checkpoints(client, job["id"], 1)

    os.kill(running["pid"], signal.SIGKILL)
    restored = wait_until(lambda: (j := client.get_job(job["id"]))["restore_count"] == 1 and j, 30, "the restore")
    assert restored["pid"] != running["pid"]
    assert restored["state"] == "running"

    gate.touch()
    result = client.result(job["id"], wait=30)
    assert result["state"] == "completed"
    assert result["output"]["restored"] is True
    assert result["output"]["checkpoint"] == 1
    assert "restored" in event_kinds(client, job["id"])


def test_restored_memory_matches_checkpoint(client, server, job_script, tmp_path: Path) -> None:
    source = """
        import json, os, time
        import checker

        params = checker.params()
        secret = os.urandom(16).hex()
        with open(params["secret_file"], "w") as secret_file:
            secret_file.write(secret)
        result = checker.checkpoint()
        while not os.path.exists(params["gate"]):
            time.sleep(0.02)
        checker.exit({"secret": secret, "restored": result.restored})
    """
    gate, secret_file = tmp_path / "gate", tmp_path / "secret"
    job = spawn_script(client, job_script("secret", source), {"gate": str(gate), "secret_file": str(secret_file)})
    running = wait_for_checkpoints(client, job["id"], 1)
    written_before_checkpoint = secret_file.read_text()

    os.kill(running["pid"], signal.SIGKILL)
    wait_until(lambda: client.get_job(job["id"])["restore_count"] == 1, 30, "the restore")
    gate.touch()

    output = client.result(job["id"], wait=30)["output"]
    assert output["restored"] is True
    assert output["secret"] == written_before_checkpoint


def test_server_sigkill_readopts_live_job(client, server, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = spawn_script(client, job_script("gated", GATED_JOB), {"gate": str(gate)})
    running = wait_for_checkpoints(client, job["id"], 1)

    server.sigkill()
    server.start()

    after = client.get_job(job["id"])
    assert after["state"] == "running"
    assert after["pid"] == running["pid"]
    gate.touch()
    result = client.result(job["id"], wait=30)
    assert result["state"] == "completed"
    assert result["output"]["restored"] is False
    kinds = event_kinds(client, job["id"])
    assert "adopted" in kinds
    assert "restored" not in kinds


def test_server_and_job_sigkill_restores_on_start(client, server, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = spawn_script(client, job_script("gated", GATED_JOB), {"gate": str(gate)})
    running = wait_for_checkpoints(client, job["id"], 1)

    server.sigkill()
    os.kill(running["pid"], signal.SIGKILL)
    server.start()

    after = wait_until(lambda: (j := client.get_job(job["id"]))["restore_count"] == 1 and j, 30, "the restore at startup")
    assert after["state"] == "running"
    assert after["pid"] != running["pid"]
    gate.touch()
    result = client.result(job["id"], wait=30)
    assert result["state"] == "completed"
    assert result["output"]["restored"] is True


def test_job_without_checkpoint_restarts_from_beginning(client, server, job_script, tmp_path: Path) -> None:
    source = """
        import os, time
        import checker

        params = checker.params()
        with open(params["starts"], "a") as starts:
            starts.write("start\\n")
        while not os.path.exists(params["gate"]):
            time.sleep(0.02)
        checker.exit({"ok": True})
    """
    gate, starts = tmp_path / "gate", tmp_path / "starts"
    job = spawn_script(client, job_script("nocheckpoint", source), {"gate": str(gate), "starts": str(starts)})
    first = wait_until(lambda: starts.exists() and client.get_job(job["id"]), 30, "the first start")

    os.kill(first["pid"], signal.SIGKILL)
    wait_until(lambda: starts.read_text().count("start") == 2, 30, "the second start")
    gate.touch()

    result = client.result(job["id"], wait=30)
    assert result["state"] == "completed"
    final = client.get_job(job["id"])
    assert final["restart_count"] == 1
    assert final["restore_count"] == 0


def test_crash_loop_is_capped(client, server, job_script, tmp_path: Path) -> None:
    source = """
        import os, signal
        import checker

        checker.checkpoint()
        os.kill(os.getpid(), signal.SIGKILL)  # Killed by a signal: a crash, after every restore too.
    """
    job = spawn_script(client, job_script("crashloop", source))
    final = wait_for_state(client, job["id"], ("failed",), timeout=60)
    assert final["error_code"] == "crash_loop"
    assert "crashed 4 times since checkpoint 1 (3 restores)" in final["error"]
    assert final["restore_count"] == 3
    assert event_kinds(client, job["id"]).count("crashed") == 4


def test_restore_failure_names_job_and_criu_error(client, server, job_script, tmp_path: Path) -> None:
    source = """
        import os, time
        import checker

        params = checker.params()
        data = open(params["data"], "w")
        data.write("before checkpoint\\n")
        data.flush()
        checker.checkpoint()
        data.write("written after the checkpoint\\n")
        data.flush()
        while True:
            time.sleep(0.1)
    """
    data_file = tmp_path / "data.txt"
    job = spawn_script(client, job_script("badsize", source), {"data": str(data_file)})
    running = wait_for_checkpoints(client, job["id"], 1)
    wait_until(lambda: "after" in data_file.read_text(), 10, "the write after the checkpoint")

    os.kill(running["pid"], signal.SIGKILL)
    final = wait_for_state(client, job["id"], ("failed",), timeout=30)

    assert final["error_code"] == "restore_failed"
    assert job["id"] in final["error"]
    assert "checkpoint 1" in final["error"]
    assert "size" in final["error"]
    assert final["pid"] is None
    checkpoints = client.checkpoints(job["id"])
    assert [c["status"] for c in checkpoints] == ["valid"]
    restore_failed = [e for e in client.events(job["id"]) if e["kind"] == "restore_failed"]
    assert restore_failed and restore_failed[0]["data"]["criu_errors"]


def test_corrupt_checkpoint_falls_back_to_previous(client, server, job_script, tmp_path: Path) -> None:
    source = """
        import os, time
        import checker

        gate = checker.params()["gate"]
        first = checker.checkpoint()
        second = checker.checkpoint()
        while not os.path.exists(gate):
            time.sleep(0.02)
        checker.exit({"first": [first.number, first.restored], "second": [second.number, second.restored]})
    """
    gate = tmp_path / "gate"
    job = spawn_script(client, job_script("corrupt", source), {"gate": str(gate)})
    running = wait_for_checkpoints(client, job["id"], 2)

    # A damaged chunk is read only when the image is rebuilt from chunks, so drop the restore cache.
    shutil.rmtree(server.state_dir / "checkpoints" / job["id"] / "2.cache")
    only_second = manifest_chunks(server.state_dir, job["id"], 2) - manifest_chunks(server.state_dir, job["id"], 1)
    with open(chunk_path(server.state_dir, job["id"], sorted(only_second)[0]), "r+b") as image:
        byte = image.read(1)
        image.seek(0)
        image.write(bytes([byte[0] ^ 0xFF]))

    os.kill(running["pid"], signal.SIGKILL)
    wait_until(lambda: client.get_job(job["id"])["restore_count"] == 1, 30, "the restore")
    gate.touch()

    output = client.result(job["id"], wait=30)["output"]
    assert output["first"] == [1, True]
    statuses = {c["number"]: c["status"] for c in client.checkpoints(job["id"])}
    assert statuses[2] == "corrupt"
    assert statuses[1] == "valid"
    corrupt_events = [e for e in client.events(job["id"]) if e["kind"] == "checkpoint_corrupt"]
    assert "chunk" in corrupt_events[0]["message"]


def test_kill_running_job(client, server, job_script, tmp_path: Path) -> None:
    job = spawn_script(client, job_script("gated", GATED_JOB), {"gate": str(tmp_path / "never")})
    running = wait_for_checkpoints(client, job["id"], 1)

    killed = client.kill(job["id"])

    assert killed["state"] == "failed"
    assert killed["error_code"] == "killed"
    wait_until(lambda: not Path(f"/proc/{running['pid']}").exists(), 10, "the job's process to disappear")


def test_asyncio_sdk_checkpoint_and_restore(client, server, job_script, tmp_path: Path) -> None:
    source = """
        import asyncio, os
        from checker.sdk import aio

        async def main():
            params = await aio.params()
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(ticker())
            result = await aio.checkpoint()
            while not os.path.exists(params["gate"]):
                await asyncio.sleep(0.02)
            task.cancel()
            await aio.exit({"restored": result.restored, "checkpoint": result.number, "ticked": ticks > 0})

        asyncio.run(main())
    """
    gate = tmp_path / "gate"
    job = spawn_script(client, job_script("asyncjob", source), {"gate": str(gate)})
    running = wait_for_checkpoints(client, job["id"], 1)

    os.kill(running["pid"], signal.SIGKILL)
    wait_until(lambda: client.get_job(job["id"])["restore_count"] == 1, 30, "the restore")
    gate.touch()

    output = client.result(job["id"], wait=30)["output"]
    assert output == {"restored": True, "checkpoint": 1, "ticked": True}


def test_criu_logs_kept_per_operation(client, server, job_script, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = spawn_script(client, job_script("gated", GATED_JOB), {"gate": str(gate)})
    running = wait_for_checkpoints(client, job["id"], 1)
    os.kill(running["pid"], signal.SIGKILL)
    wait_until(lambda: client.get_job(job["id"])["restore_count"] == 1, 30, "the restore")
    gate.touch()
    client.result(job["id"], wait=30)

    logs = sorted(p.name for p in (server.state_dir / "jobs" / job["id"] / "criu").iterdir())
    assert logs == ["dump-1.log", "restore-1-from-1.log"]


def test_restore_survives_host_mounts_that_went_away(client, server, job_script, tmp_path: Path) -> None:
    """Host mounts that come and go (Checker's own, tmpfs ones, any made after the job started) stay out of its image."""
    source = """
        import os, time
        import checker

        params = checker.params()
        first = checker.checkpoint()
        while not os.path.exists(params["gate"]):
            time.sleep(0.02)
        second = checker.checkpoint()
        while not os.path.exists(params["gate2"]):
            time.sleep(0.02)
        checker.exit({"second": [second.number, second.restored]})
    """
    before = Path(f"/run/checker/test-transient-{os.getpid()}-before")
    tmpfs_before = tmp_path / "tmpfs-mounted-before-start"
    after = tmp_path / "mounted-after-start"
    for point in (before, tmpfs_before, after):
        point.mkdir(parents=True, exist_ok=True)
    for point in (before, tmpfs_before):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "checker-test", str(point)], check=True)
    try:
        gate, gate2 = tmp_path / "gate", tmp_path / "gate2"
        job = spawn_script(client, job_script("mounts", source), {"gate": str(gate), "gate2": str(gate2)})
        wait_for_checkpoints(client, job["id"], 1)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "checker-test", str(after)], check=True)
        # Mounts gone before the next dump must not fail it.
        for point in (tmpfs_before, before):
            subprocess.run(["umount", "-l", str(point)], check=True)
        tmpfs_before.rmdir()  # As container engines do with their mount points.
        gate.touch()
        running = wait_for_checkpoints(client, job["id"], 2)
    finally:
        for point in (after, tmpfs_before, before):
            subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
        before.rmdir()

    os.kill(running["pid"], signal.SIGKILL)
    wait_until(lambda: client.get_job(job["id"])["restore_count"] == 1, 30, "the restore")
    gate2.touch()
    result = client.result(job["id"], wait=30)
    assert result["state"] == "completed", (result, [e["message"] for e in client.events(job["id"])])
    assert result["output"]["second"] == [2, True]
