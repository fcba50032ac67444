"""Suspend to disk, durable sleep and signals, with real CRIU and server SIGKILLs."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from conftest import event_kinds, job_processes, spawn_script, wait_for_state, wait_until

SLEEPER = """
    import os, time
    import checker

    params = checker.params()
    secret = os.urandom(16).hex()
    with open(params["secret_file"], "w") as secret_file:
        secret_file.write(f"{os.getpid()} {secret}")
    started = time.time()
    result = checker.sleep(params["seconds"])
    checker.exit({"secret": secret, "restored": result.restored, "slept": time.time() - started})
"""

WAITER = """
    import checker

    params = checker.params()
    first = checker.wait_for_signal("go", timeout=params.get("timeout"))
    second = checker.wait_for_signal("go", timeout=params.get("second_timeout", 1))
    checker.exit({
        "first": [first.received, first.payload, first.timed_out, first.restored],
        "second": [second.received, second.payload, second.timed_out],
    })
"""


def test_sleep_frees_process_and_keeps_memory(client, server, job_script, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    job = spawn_script(client, job_script("sleeper", SLEEPER), {"secret_file": str(secret_file), "seconds": 2})
    suspended = wait_for_state(client, job["id"], ("suspended",), timeout=30)

    assert suspended["pid"] is None
    assert suspended["wake_at"] is not None
    assert not Path(f"/proc/{suspended_job_host_pid(server, job['id'])}").exists()

    result = client.result(job["id"], wait=30)
    assert result["state"] == "completed"
    assert result["output"]["secret"] == secret_file.read_text().split()[1]
    assert result["output"]["restored"] is True
    assert result["output"]["slept"] >= 2


def suspended_job_host_pid(server, job_id: str) -> int:
    """Return the host PID the job had before it suspended, from its 'started' event."""
    with httpx.Client(base_url=server.url) as http:
        events = http.get(f"/v1/jobs/{job_id}/events").json()["items"]
    return [e for e in events if e["kind"] == "started"][0]["data"]["pid"]


def test_sleep_survives_server_sigkill(client, server, job_script, tmp_path: Path) -> None:
    job = spawn_script(client, job_script("sleeper", SLEEPER), {"secret_file": str(tmp_path / "secret"), "seconds": 2})
    wait_for_state(client, job["id"], ("suspended",), timeout=30)

    server.sigkill()
    time.sleep(3)  # The wake time passes while no server runs.
    server.start()

    result = client.result(job["id"], wait=30)
    assert result["state"] == "completed"
    assert result["output"]["restored"] is True
    assert "woke" in event_kinds(client, job["id"])


def test_signal_sent_before_wait_is_kept(client, job_script, tmp_path: Path) -> None:
    source = """
        import os, time
        import checker

        gate = checker.params()["gate"]
        while not os.path.exists(gate):
            time.sleep(0.02)
        result = checker.wait_for_signal("go", timeout=30)
        checker.exit({"payload": result.payload, "restored": result.restored})
    """
    gate = tmp_path / "gate"
    job = spawn_script(client, job_script("early", source), {"gate": str(gate)})
    wait_for_state(client, job["id"], ("running",))
    client.send_signal(job["id"], "go", {"n": 1})
    gate.touch()

    output = client.result(job["id"], wait=30)["output"]
    assert output == {"payload": {"n": 1}, "restored": False}
    assert client.get_job(job["id"])["restore_count"] == 0


def test_signal_wakes_waiting_job(client, job_script) -> None:
    job = spawn_script(client, job_script("waiter", WAITER))
    waiting = wait_for_state(client, job["id"], ("suspended",), timeout=30)
    assert waiting["wait_signal"] == "go"
    assert waiting["wake_at"] is None

    client.send_signal(job["id"], "go", {"approved": True})
    output = client.result(job["id"], wait=30)["output"]

    assert output["first"] == [True, {"approved": True}, False, True]
    assert output["second"] == [False, None, True]


def test_wait_for_signal_times_out(client, job_script) -> None:
    job = spawn_script(client, job_script("waiter", WAITER), {"timeout": 1, "second_timeout": 0})
    output = client.result(job["id"], wait=60)["output"]
    assert output["first"] == [False, None, True, True]
    assert output["second"] == [False, None, True]


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_signal_delivered_once_across_server_kill(client, server, job_script, delay: float) -> None:
    job = spawn_script(client, job_script("waiter", WAITER), {"second_timeout": 1})
    wait_for_state(client, job["id"], ("suspended",), timeout=30)

    client.send_signal(job["id"], "go", {"once": True})
    time.sleep(delay)
    server.sigkill()
    server.start()

    output = client.result(job["id"], wait=60)["output"]
    assert output["first"][:3] == [True, {"once": True}, False]
    assert output["second"] == [False, None, True]
    delivered = [s for s in client.signals(job["id"]) if s["delivered"]]
    assert len(delivered) == 1
    # A copy restored by the killed server, if it got that far, must not linger.
    wait_until(lambda: not job_processes(server.state_dir, job["id"]), 10, "no process of the finished job")


def test_receive_signal_polls_without_suspending(client, job_script) -> None:
    source = """
        import time
        import checker

        deadline = time.time() + 30
        signal = None
        while signal is None and time.time() < deadline:
            signal = checker.receive_signal("tick")
            time.sleep(0.05)
        checker.exit({"payload": signal.payload if signal else None, "again": checker.receive_signal("tick")})
    """
    job = spawn_script(client, job_script("poller", source))
    wait_for_state(client, job["id"], ("running",))
    client.send_signal(job["id"], "tick", [1, 2, 3])

    output = client.result(job["id"], wait=30)["output"]
    assert output == {"payload": [1, 2, 3], "again": None}
    assert client.get_job(job["id"])["restore_count"] == 0


def test_wait_with_zero_timeout_polls(client, job_script) -> None:
    source = """
        import time
        import checker

        before = checker.wait_for_signal("go", timeout=0)
        print("polled", flush=True)
        deadline = time.time() + 30
        after = checker.wait_for_signal("go", timeout="0s")
        while not after.received and time.time() < deadline:
            time.sleep(0.05)
            after = checker.wait_for_signal("go", timeout=0)
        checker.exit({"before": [before.received, before.timed_out], "after": [after.received, after.payload]})
    """
    job = spawn_script(client, job_script("zero-timeout", source))
    wait_until(lambda: "polled" in client.logs(job["id"])["data"], 30, "the job's first poll")
    client.send_signal(job["id"], "go", {"n": 1})

    output = client.result(job["id"], wait=30)["output"]
    assert output == {"before": [False, True], "after": [True, {"n": 1}]}
    job = client.get_job(job["id"])
    assert job["checkpoint_count"] == 0
    assert job["restore_count"] == 0


def test_signal_without_payload_is_null(client, job_script) -> None:
    job = spawn_script(client, job_script("waiter", WAITER))
    wait_for_state(client, job["id"], ("suspended",), timeout=30)

    sent = client.send_signal(job["id"], "go")
    output = client.result(job["id"], wait=30)["output"]

    assert sent["payload"] is None
    assert output["first"] == [True, None, False, True]


def test_sleep_inside_lock_is_refused(client, job_script) -> None:
    source = """
        import checker

        outcomes = []
        with checker.checkpoint_lock():
            for call in (lambda: checker.sleep(1), lambda: checker.wait_for_signal("go", timeout=1), lambda: checker.suspend(until=0)):
                try:
                    call()
                    outcomes.append("no error")
                except checker.RuntimeAPIError as error:
                    outcomes.append(str(error))
        checker.exit({"outcomes": outcomes})
    """
    job = spawn_script(client, job_script("lockedsleep", source))
    outcomes = client.result(job["id"], wait=30)["output"]["outcomes"]
    assert len(outcomes) == 3
    assert all("would wait for its own lock" in outcome for outcome in outcomes)


def test_kill_suspended_job_never_restores(client, job_script) -> None:
    job = spawn_script(client, job_script("waiter", WAITER))
    wait_for_state(client, job["id"], ("suspended",), timeout=30)

    killed = client.kill(job["id"])
    assert killed["state"] == "failed"
    assert killed["error_code"] == "killed"

    with httpx.Client(base_url=client.base_url) as http:
        late = http.post(f"/v1/jobs/{job['id']}/signals", json={"name": "go"})
    assert late.status_code == 409
    time.sleep(0.5)
    final = client.get_job(job["id"])
    assert final["restore_count"] == 0
    assert final["state"] == "failed"


class TestValidation:
    @pytest.fixture
    def running_job(self, token_jobs):
        return token_jobs()

    @pytest.mark.parametrize(
        ("path", "body", "fragment"),
        [
            ("suspend", {"token": "a" * 16, "seconds": -1}, "seconds"),
            ("suspend", {"token": "a" * 16}, "exactly one"),
            ("suspend", {"token": "a" * 16, "seconds": 1, "until": 5}, "exactly one"),
            ("signals/wait", {"token": "a" * 16, "name": "bad name"}, "name"),
            ("signals/wait", {"token": "a" * 16, "name": "go", "timeout_seconds": -2}, "timeout_seconds"),
            ("signals/receive", {"token": "a" * 16, "name": ""}, "name"),
        ],
    )
    def test_runtime_rejects_invalid(self, server, running_job, path, body, fragment) -> None:
        job_id, token = running_job
        with httpx.Client(base_url=server.url) as http:
            response = http.post(f"/v1/runtime/jobs/{job_id}/{path}", json=body, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 422, response.text
        assert fragment in response.json()["detail"]

    @pytest.mark.parametrize(
        ("body", "status", "fragment"),
        [
            ({"name": "white space"}, 422, "name"),
            ({"name": "x" * 200}, 422, "name"),
            ({"payload": 1}, 422, "name"),
        ],
    )
    def test_signal_rejects_invalid(self, server, running_job, body, status, fragment) -> None:
        job_id, _ = running_job
        with httpx.Client(base_url=server.url) as http:
            response = http.post(f"/v1/jobs/{job_id}/signals", json=body)
        assert response.status_code == status, response.text
        assert fragment in response.json()["detail"]

    def test_signal_to_unknown_job_is_404(self, server) -> None:
        with httpx.Client(base_url=server.url) as http:
            response = http.post("/v1/jobs/nope/signals", json={"name": "go"})
        assert response.status_code == 404
        assert "nope" in response.json()["detail"]


def test_sdk_rejects_negative_sleep(client, job_script) -> None:
    source = """
        import checker
        try:
            checker.sleep(-5)
        except ValueError as error:
            checker.exit({"error": str(error)})
    """
    job = spawn_script(client, job_script("negative", source))
    output = client.result(job["id"], wait=30)["output"]
    assert "give a number of seconds of 0 or more" in output["error"]
