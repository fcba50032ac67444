"""The `gvisor` runtime with real runsc: checkpoints, restores, suspension and server crashes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from conftest import event_kinds, printed_secret, wait_for_checkpoints, wait_for_state, wait_until
from checker.runtimes.gvisor import find_runsc

pytestmark = pytest.mark.skipif(find_runsc() is None, reason="runsc is not installed; run scripts/install-runsc.sh")

# A job that draws a secret and prints it before its checkpoint, then waits for
# the signal "go". The restored copy must report the same secret, which lives
# only in its memory.
SIGNALLED_JOB = """
    import os, time
    import checker

    secret = os.urandom(16).hex()
    ballast = bytearray(os.urandom(1 << 20)) * 20
    print(f"secret {secret}", flush=True)
    result = checker.checkpoint()
    print(f"checkpoint {result.number} restored={result.restored}", flush=True)
    for _ in range(1200):
        if checker.receive_signal("go") is not None:
            break
        time.sleep(0.05)
    second = checker.checkpoint()
    checker.exit({"secret": secret, "restored": result.restored, "ballast": len(ballast), "second": second.number})
"""

# Several threads call the runtime API in a loop while the main thread takes
# checkpoints; every call must succeed exactly once from the job's view.
THREADED_JOB = """
    import threading
    import checker

    CALLS = 40
    counts = [0] * 4
    errors = []

    def call_api(index):
        for _ in range(CALLS):
            try:
                if index % 2:
                    checker.params()
                else:
                    checker.receive_signal("never")
                counts[index] += 1
            except Exception as error:
                errors.append(repr(error))

    threads = [threading.Thread(target=call_api, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    results = [checker.checkpoint() for _ in range(5)]
    for thread in threads:
        thread.join()
    checker.exit({"counts": counts, "errors": errors, "numbers": [r.number for r in results], "restored": [r.restored for r in results]})
"""

SLEEPING_JOB = """
    import os
    import checker

    secret = os.urandom(16).hex()
    print(f"secret {secret}", flush=True)
    result = checker.sleep(1)
    checker.exit({"secret": secret, "restored": result.restored})
"""


def spawn_gvisor(client, script: Path) -> dict:
    definition = client.create_definition(
        script.stem, [sys.executable, str(script)], runtime={"type": "gvisor", "mounts": [str(script.parent)]}
    )
    return client.spawn(definition["name"], version=definition["version"])


def test_gvisor_sigkill_restores_memory(client, server, job_script) -> None:
    job = spawn_gvisor(client, job_script("signalled", SIGNALLED_JOB))
    running = wait_for_checkpoints(client, job["id"], 1)
    assert running["state"] == "running"

    os.kill(running["pid"], signal.SIGKILL)
    restored = wait_until(lambda: (j := client.get_job(job["id"]))["restore_count"] == 1 and j, 60, "the restore")
    assert restored["pid"] != running["pid"]

    client.send_signal(job["id"], "go")
    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["secret"] == printed_secret(server, job["id"])
    assert result["output"]["restored"] is True
    assert result["output"]["ballast"] == 20 << 20
    assert result["output"]["second"] == 2


def test_gvisor_checkpoint_during_api_calls(client, server, job_script) -> None:
    job = spawn_gvisor(client, job_script("threaded", THREADED_JOB))
    result = client.result(job["id"], wait=120)

    assert result["state"] == "completed", result
    output = result["output"]
    assert output["errors"] == []
    assert output["counts"] == [40, 40, 40, 40]
    assert output["numbers"] == [1, 2, 3, 4, 5]
    assert output["restored"] == [False] * 5
    assert client.get_job(job["id"])["restore_count"] == 0


def test_gvisor_suspend_and_wake(client, server, job_script) -> None:
    job = spawn_gvisor(client, job_script("sleeping", SLEEPING_JOB))
    wait_for_state(client, job["id"], ("suspended",), timeout=60)

    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    assert result["output"]["secret"] == printed_secret(server, job["id"])
    assert {"suspended", "woke", "restored"} <= set(event_kinds(client, job["id"]))


def test_gvisor_server_sigkill_readopts_job(client, server, job_script) -> None:
    job = spawn_gvisor(client, job_script("signalled", SIGNALLED_JOB))
    running = wait_for_checkpoints(client, job["id"], 1)

    server.sigkill()
    server.start()
    wait_until(lambda: "adopted" in event_kinds(client, job["id"]), 30, "the new server to re-adopt the job")

    # The new server serves the job's socket again, so the job's calls and
    # its second checkpoint go through.
    client.send_signal(job["id"], "go")
    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is False
    assert result["output"]["second"] == 2
    assert client.get_job(job["id"])["pid"] is None
    assert running["pid"] is not None


def test_gvisor_server_and_job_sigkill_restores(client, server, job_script) -> None:
    job = spawn_gvisor(client, job_script("signalled", SIGNALLED_JOB))
    running = wait_for_checkpoints(client, job["id"], 1)

    server.sigkill()
    os.kill(running["pid"], signal.SIGKILL)
    server.start()
    wait_until(lambda: client.get_job(job["id"])["restore_count"] == 1, 60, "the restore by the new server")

    client.send_signal(job["id"], "go")
    result = client.result(job["id"], wait=60)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    assert result["output"]["secret"] == printed_secret(server, job["id"])


def test_gvisor_fork_runs_beside_original(client, server, job_script) -> None:
    original = spawn_gvisor(client, job_script("signalled", SIGNALLED_JOB))
    wait_for_checkpoints(client, original["id"], 1)

    fork = client.fork(original["id"], 1)
    wait_until(lambda: client.get_job(fork["id"])["restore_count"] >= 1, 60, "the fork's restore")
    client.send_signal(fork["id"], "go")
    fork_result = client.result(fork["id"], wait=60)
    client.send_signal(original["id"], "go")
    original_result = client.result(original["id"], wait=60)

    assert fork_result["state"] == "completed", fork_result
    assert original_result["state"] == "completed", original_result
    assert fork_result["output"]["secret"] == original_result["output"]["secret"] == printed_secret(server, original["id"])
    assert fork_result["output"]["restored"] is True
    assert original_result["output"]["restored"] is False
    assert fork_result["output"]["second"] == 2
    assert original_result["output"]["second"] == 2
    assert fork["id"] != original["id"]
