"""The `vm` runtime with real QEMU (a microvm, under TCG on machines without usable KVM)."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import event_kinds, printed_secret, wait_for_checkpoints, wait_for_state, wait_until
from checker.cli.client import APIError
from checker.runtimes.vm import DEFAULT_IMAGE_DIR, GUEST_PATH, MACHINE_FORMAT, Machine, accelerator, find_qemu, open_api_connections

pytestmark = pytest.mark.skipif(
    find_qemu() is None or not (DEFAULT_IMAGE_DIR / "initramfs.cpio").exists(),
    reason="QEMU or the guest image is missing; run scripts/install-qemu.sh and scripts/build-vm-image.sh",
)

BOOT_SECONDS = 120
"""A TCG boot takes 5-10 s on an idle machine; much longer when the machine is busy."""

# The guest draws a secret, prints it, takes a checkpoint and waits for the
# signal "go". A copy restored after QEMU was killed must report the same
# secret, which lives only in guest memory, and the wall-clock time it reads
# when the signal arrives.
SIGNALLED_JOB = """
    import os, time
    import checker

    secret = os.urandom(16).hex()
    ballast = bytearray(os.urandom(1 << 20)) * 20
    print(f"secret {secret}", flush=True)
    result = checker.checkpoint()
    print(f"checkpoint {result.number} restored={result.restored}", flush=True)
    for _ in range(3000):
        if checker.receive_signal("go") is not None:
            break
        time.sleep(0.1)
    checker.exit({"secret": secret, "restored": result.restored, "ballast": len(ballast), "guest_time": time.time()})
"""

SLEEPING_JOB = """
    import os
    import checker

    secret = os.urandom(16).hex()
    print(f"secret {secret}", flush=True)
    result = checker.sleep(1)
    checker.exit({"secret": secret, "restored": result.restored})
"""


CLOCK_JOB = """
    import os, time
    import checker

    first_time = time.time()
    checker.exit({"first_time": first_time, "env": {name: os.environ.get(name) for name in ("FROM_DEFINITION", "FROM_SPAWN", "PATH")}})
"""


def spawn_vm(client, script: Path, **runtime) -> dict:
    definition = client.create_definition(script.stem, ["python3", str(script)], runtime={"type": "vm", "files": [str(script)], **runtime})
    return client.spawn(definition["name"], version=definition["version"])


def test_vm_kill_qemu_restores_memory(client, server, job_script) -> None:
    job = spawn_vm(client, job_script("signalled", SIGNALLED_JOB))
    running = wait_for_checkpoints(client, job["id"], 1, timeout=BOOT_SECONDS)
    assert running["state"] == "running"

    os.kill(running["pid"], signal.SIGKILL)
    restored = wait_until(lambda: (j := client.get_job(job["id"]))["restore_count"] == 1 and j, 120, "the restore")
    assert restored["pid"] != running["pid"]

    client.send_signal(job["id"], "go")
    result = client.result(job["id"], wait=120)
    assert result["state"] == "completed", result
    assert result["output"]["secret"] == printed_secret(server, job["id"])
    assert result["output"]["restored"] is True
    assert result["output"]["ballast"] == 20 << 20

    events = client.events(job["id"])
    started = next(event for event in events if event["kind"] == "started")
    expected = accelerator()[0]
    assert started["data"]["accelerator"] == expected
    assert "QEMU microvm under" in started["message"]
    assert next(event for event in events if event["kind"] == "restored")["data"]["accelerator"] == expected


def test_vm_restore_corrects_guest_clock(client, server, job_script) -> None:
    job = spawn_vm(client, job_script("signalled", SIGNALLED_JOB))
    running = wait_for_checkpoints(client, job["id"], 1, timeout=BOOT_SECONDS)
    checkpointed_at = time.time()

    # The snapshot is 10 s old when it is restored. The guest clock stood
    # still meanwhile, so without a correction the guest would read a time
    # about 10 s in the past.
    time.sleep(10)
    os.kill(running["pid"], signal.SIGKILL)
    wait_until(lambda: client.get_job(job["id"])["restore_count"] == 1, 120, "the restore")
    signalled_at = time.time()
    client.send_signal(job["id"], "go")
    result = client.result(job["id"], wait=120)
    finished_at = time.time()

    assert result["state"] == "completed", result
    guest_time = result["output"]["guest_time"]
    assert guest_time > checkpointed_at + 10
    assert signalled_at - 1.0 <= guest_time <= finished_at + 1.0, (signalled_at, guest_time, finished_at)


def test_vm_guest_clock_and_env_from_start(client, server, job_script) -> None:
    script = job_script("clock", CLOCK_JOB)
    definition = client.create_definition(
        script.stem, ["python3", str(script)], env={"FROM_DEFINITION": "definition"}, runtime={"type": "vm", "files": [str(script)]}
    )
    job = client.spawn(definition["name"], env={"FROM_SPAWN": "spawn"}, version=definition["version"])
    result = client.result(job["id"], wait=BOOT_SECONDS)

    assert result["state"] == "completed", result
    started = next(event for event in client.events(job["id"]) if event["kind"] == "started")
    started_at = datetime.fromisoformat(started["created_at"].replace("Z", "+00:00")).timestamp()
    # The guest init starts the job just before the server records the start.
    # A clock set before the boot would be a whole boot (seconds) behind.
    assert result["output"]["first_time"] >= started_at - 1.5, (result["output"]["first_time"], started_at)
    assert result["output"]["env"]["FROM_DEFINITION"] == "definition"
    assert result["output"]["env"]["FROM_SPAWN"] == "spawn"
    assert result["output"]["env"]["PATH"] == GUEST_PATH


def test_vm_suspend_and_wake(client, server, job_script) -> None:
    job = spawn_vm(client, job_script("sleeping", SLEEPING_JOB))
    wait_for_state(client, job["id"], ("suspended",), timeout=BOOT_SECONDS)

    result = client.result(job["id"], wait=120)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is True
    assert result["output"]["secret"] == printed_secret(server, job["id"])
    assert {"suspended", "woke", "restored"} <= set(event_kinds(client, job["id"]))


@pytest.mark.parametrize(
    ("runtime", "named"),
    [
        ({"memory_mib": 64}, "memory_mib 64"),
        ({"vcpus": 0}, "vcpus 0"),
        ({"memory_mib": 1 << 30}, "more than this machine's"),
        ({"files": ["/nonexistent/job.py"]}, "/nonexistent/job.py"),
        ({"kernel": "/nonexistent/vmlinuz"}, "/nonexistent/vmlinuz"),
    ],
)
def test_vm_invalid_definitions_are_rejected(client, server, job_script, runtime, named) -> None:
    script = job_script("noop", "print('never runs')\n")
    with pytest.raises(APIError) as raised:
        client.create_definition("invalid", ["python3", str(script)], runtime={"type": "vm", "files": [str(script)], **runtime})
    assert named in str(raised.value)


def test_vm_limits_it_cannot_enforce_are_rejected(client, server, job_script) -> None:
    script = job_script("noop", "print('never runs')\n")
    with pytest.raises(APIError) as raised:
        client.create_definition("invalid", ["python3", str(script)], runtime={"type": "vm", "files": [str(script)]}, limits={"pids": 10})
    assert "pids" in str(raised.value)


def test_vm_fields_on_other_runtimes_are_rejected(client, server) -> None:
    with pytest.raises(APIError) as raised:
        client.create_definition("invalid", ["python3", "-c", "pass"], runtime={"type": "process", "vcpus": 2})
    assert "runtime: vcpus applies to the vm runtime only, not to 'process'" in str(raised.value)
    assert "Value error" not in str(raised.value)


@pytest.mark.skipif(accelerator()[0] == "kvm", reason="this machine can run KVM guests")
def test_vm_kvm_is_rejected_where_it_cannot_run(client, server, job_script) -> None:
    script = job_script("noop", "print('never runs')\n")
    with pytest.raises(APIError) as raised:
        client.create_definition("invalid", ["python3", str(script)], runtime={"type": "vm", "files": [str(script)], "accelerator": "kvm"})
    assert "runtime.accelerator 'kvm' cannot work on this machine" in str(raised.value)


def machine_file(tmp_path: Path, **changes) -> Path:
    data = {"format": MACHINE_FORMAT, "memory_mib": 512, "vcpus": 1, "accelerator": "tcg", "kernel": "/k", "initramfs": "/i", "tsc_khz": None, **changes}
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(data))
    return path


def test_machine_definition_round_trips(tmp_path: Path) -> None:
    machine = Machine(memory_mib=768, vcpus=2, accelerator="tcg", kernel="/k", initramfs="/i", tsc_khz=2_000_000)
    machine.write(tmp_path / "machine.json")
    assert Machine.read(tmp_path / "machine.json") == machine


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (None, "is missing"),
        ("{not json", "is not valid JSON"),
        ({"format": 99}, "has format 99"),
        ({"memory_mib": "lots"}, "has no valid 'memory_mib'"),
    ],
)
def test_machine_definition_errors(tmp_path: Path, contents, message) -> None:
    path = tmp_path / "machine.json"
    if isinstance(contents, dict):
        path = machine_file(tmp_path, **contents)
    elif contents is not None:
        path.write_text(contents)
    with pytest.raises(ValueError, match=message):
        Machine.read(path)


def test_vm_server_sigkill_readopts_job(client, server, job_script) -> None:
    job = spawn_vm(client, job_script("signalled", SIGNALLED_JOB))
    running = wait_for_checkpoints(client, job["id"], 1, timeout=BOOT_SECONDS)

    server.sigkill()
    server.start()
    wait_until(lambda: "adopted" in event_kinds(client, job["id"]), 60, "the new server to re-adopt the job")

    client.send_signal(job["id"], "go")
    result = client.result(job["id"], wait=120)
    assert result["state"] == "completed", result
    assert result["output"]["restored"] is False
    assert result["output"]["secret"] == printed_secret(server, job["id"])
    assert client.get_job(job["id"])["restore_count"] == 0
    assert running["pid"] is not None


def test_vm_fork_runs_beside_original(client, server, job_script) -> None:
    original = spawn_vm(client, job_script("signalled", SIGNALLED_JOB))
    wait_for_checkpoints(client, original["id"], 1, timeout=BOOT_SECONDS)

    fork = client.fork(original["id"], 1)
    wait_until(lambda: client.get_job(fork["id"])["restore_count"] >= 1, 120, "the fork's restore")
    client.send_signal(fork["id"], "go")
    fork_result = client.result(fork["id"], wait=120)
    client.send_signal(original["id"], "go")
    original_result = client.result(original["id"], wait=120)

    assert fork_result["state"] == "completed", fork_result
    assert original_result["state"] == "completed", original_result
    assert fork_result["output"]["secret"] == original_result["output"]["secret"] == printed_secret(server, original["id"])
    assert fork_result["output"]["restored"] is True
    assert original_result["output"]["restored"] is False


USERNET_TABLE = """Hub -1 (net):\r
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r
  TCP[TIME_WAIT]     18       10.0.2.15 47900      10.0.2.100    80     0     0\r
  TCP[FIN_WAIT_2]    19       10.0.2.15 47902      10.0.2.100    80     0     0\r
  TCP[ESTABLISHED]   20       10.0.2.15 47912      10.0.2.100    80     0     0\r
  TCP[FIN_WAIT_1]    21       10.0.2.15 47914      10.0.2.100    80     0     0\r
  TCP[ESTABLISHED]   22       10.0.2.15 47916      10.0.2.2      22     0     0\r
"""


def test_open_api_connections_skips_closed_ones() -> None:
    rows = open_api_connections(USERNET_TABLE)
    assert [row.split()[3] for row in rows] == ["47912", "47914"]
    assert open_api_connections(USERNET_TABLE.replace("ESTABLISHED]   20", "TIME_WAIT]     20").replace("FIN_WAIT_1", "TIME_WAIT")) == []
