"""Checkpoint locks: a checkpoint never runs while a lock is held."""

from __future__ import annotations

import os
from datetime import datetime
import signal
from pathlib import Path

from conftest import ServerProcess, free_port, spawn_script, wait_for_checkpoints, wait_until
from checker.cli.client import CallerClient

HOLDER_THEN_CHECKPOINT = """
    import threading, time
    import checker

    hold_seconds = checker.params()["hold_seconds"]
    taken = threading.Event()
    times = {}

    def worker():
        with checker.checkpoint_lock():
            taken.set()
            time.sleep(hold_seconds)
            times["released"] = time.time()

    thread = threading.Thread(target=worker)
    thread.start()
    taken.wait()
    try:
        result = checker.checkpoint()
        times["checkpointed"] = time.time()
        outcome = {"checkpoint": result.number}
    except checker.RuntimeAPIError as error:
        outcome = {"error": str(error)}
    thread.join()
    checker.exit({**outcome, **times})
"""


def test_checkpoint_waits_for_lock_release(client, job_script) -> None:
    job = spawn_script(client, job_script("holder", HOLDER_THEN_CHECKPOINT), {"hold_seconds": 1.5})
    output = client.result(job["id"], wait=60)["output"]

    assert output["checkpoint"] == 1
    assert output["checkpointed"] >= output["released"]


def test_new_locks_wait_for_pending_checkpoint(client, job_script) -> None:
    source = """
        import threading, time
        import checker

        first_taken = threading.Event()
        times = {}

        def first():
            with checker.checkpoint_lock():
                first_taken.set()
                time.sleep(1.0)

        def second():
            time.sleep(0.4)  # The checkpoint request is pending by now.
            with checker.checkpoint_lock():
                times["second_acquired"] = time.time()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        threads[0].start()
        first_taken.wait()
        threads[1].start()
        time.sleep(0.1)
        checker.checkpoint()
        times["checkpointed"] = time.time()
        for thread in threads:
            thread.join()
        checker.exit(times)
    """
    job = spawn_script(client, job_script("ordering", source))
    output = client.result(job["id"], wait=60)["output"]

    # The server records the checkpoint before it lets waiting locks proceed;
    # the job's own "checkpointed" time may come later than the second lock.
    recorded = datetime.fromisoformat(client.checkpoints(job["id"])[0]["created_at"]).timestamp()
    assert output["second_acquired"] >= recorded


def test_checkpoint_lock_timeout_keeps_job_running(tmp_path: Path, job_script) -> None:
    server = ServerProcess(state_dir=tmp_path / "state", port=free_port(), log_path=tmp_path / "server.log", extra_args=["--checkpoint-lock-timeout", "0.5"])
    server.start()
    try:
        with CallerClient(server.url) as client:
            job = spawn_script(client, job_script("holder", HOLDER_THEN_CHECKPOINT), {"hold_seconds": 2})
            result = client.result(job["id"], wait=60)
            events = [e["kind"] for e in client.events(job["id"])]
    finally:
        server.stop()

    assert result["state"] == "completed"
    assert "timed out after 0.5 s waiting for 1 checkpoint lock" in result["output"]["error"]
    assert "failed with 409" in result["output"]["error"]
    assert "checkpoint_failed" in events


def test_lock_of_killed_job_does_not_block(client, server, job_script) -> None:
    source = """
        import threading, time
        import checker

        first = checker.checkpoint()
        if not first.restored:
            taken = threading.Event()

            def hang():
                with checker.checkpoint_lock():
                    taken.set()
                    time.sleep(3600)

            threading.Thread(target=hang, daemon=True).start()
            taken.wait()
        second = checker.checkpoint()
        checker.exit({"first_restored": first.restored, "second": second.number})
    """
    job = spawn_script(client, job_script("hanger", source))
    running = wait_for_checkpoints(client, job["id"], 1)
    wait_until(lambda: any(e["kind"] == "checkpoint" for e in client.events(job["id"])), 10, "the first checkpoint")

    os.kill(running["pid"], signal.SIGKILL)
    result = client.result(job["id"], wait=60)

    assert result["state"] == "completed"
    assert result["output"]["first_restored"] is True
    assert result["output"]["second"] == 2


def test_checkpoint_inside_lock_is_refused(client, job_script) -> None:
    source = """
        import checker

        with checker.checkpoint_lock():
            try:
                checker.checkpoint()
                outcome = "no error"
            except checker.RuntimeAPIError as error:
                outcome = str(error)
        checker.exit({"outcome": outcome, "after": checker.checkpoint().number})
    """
    job = spawn_script(client, job_script("selflock", source))
    output = client.result(job["id"], wait=60)["output"]
    assert "would wait for its own lock" in output["outcome"]
    assert output["after"] == 1


def test_async_lock_holds_off_checkpoint(client, job_script) -> None:
    source = """
        import asyncio, time
        import checker
        from checker.sdk import aio

        async def main():
            times = {}
            taken = asyncio.Event()

            async def worker():
                async with aio.checkpoint_lock():
                    taken.set()
                    await asyncio.sleep(1.0)
                    times["released"] = time.time()

            task = asyncio.create_task(worker())
            await taken.wait()
            result = await aio.checkpoint()
            times["checkpointed"] = time.time()
            await task
            await aio.exit({**times, "checkpoint": result.number})

        asyncio.run(main())
    """
    job = spawn_script(client, job_script("asynclock", source))
    output = client.result(job["id"], wait=60)["output"]
    assert output["checkpoint"] == 1
    assert output["checkpointed"] >= output["released"]
