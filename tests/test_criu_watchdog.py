"""CRIU runs that would never end are killed: a dump whose job dies mid-way, and any run past its timeout."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checker.errors import CriuError, ErrorCode
from checker.runtimes.base import JobFiles, LaunchSpec
from checker.runtimes.criu import ABANDON_GRACE_SECONDS, Criu, find_criu, run_criu
from checker.runtimes.process import ProcessRuntime
from checker.runtimes.procfs import identify, is_exiting, read_state

from conftest import wait_until

MEMORY_JOB = """
import time
memory = bytearray(60 << 20)
for offset in range(0, len(memory), 4096):
    memory[offset] = 1
print("ready", flush=True)
while True:
    time.sleep(0.01)
"""

# Each kill lands at a random point of a dump. About one in twelve hit the
# deadlock with CRIU 4.2.1 on kernel 6.18, so 30 rounds miss it with a
# probability of about 7 %; the test asserts no round hangs either way.
KILL_ROUNDS = 30


def stand_in_criu(tmp_path: Path, body: str) -> Criu:
    """A shell script in CRIU's place, for the watchdog's own logic."""
    script = tmp_path / "criu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return Criu(path=script, version="4.2")


def criu_processes(image_root: Path) -> list[int]:
    """PIDs of CRIU processes working on images under `image_root`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"criu" in command_line and str(image_root).encode() in command_line:
            found.append(int(entry.name))
    return found


def test_dump_ends_after_job_sigkill(tmp_path: Path, child_subreaper) -> None:
    async def one_round(runtime: ProcessRuntime, index: int) -> tuple[float, str]:
        files = JobFiles.under(tmp_path / f"job-{index}")
        files.work_dir.mkdir(parents=True)
        spec = LaunchSpec(f"killed-{index}", [sys.executable, "-c", MEMORY_JOB], {"PATH": os.environ["PATH"]}, files)
        process = await runtime.start(spec)
        for _ in range(500):
            if files.stdout_path.exists() and files.stdout_path.read_text():
                break
            await asyncio.sleep(0.01)
        exited = asyncio.create_task(runtime.wait(spec, process))

        image = tmp_path / "images" / str(index)
        image.mkdir(parents=True)
        dump = asyncio.create_task(
            runtime.checkpoint(spec, process, image, leave_running=True, log_path=tmp_path / f"dump-{index}.log", context=f"dump {index}")
        )
        await asyncio.sleep(random.uniform(0.0, 0.04))
        os.kill(process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        done, _ = await asyncio.wait({dump, exited}, timeout=ABANDON_GRACE_SECONDS + 10, return_when=asyncio.ALL_COMPLETED)
        assert done == {dump, exited}, f"round {index}: the dump or the job's exit did not end after the SIGKILL"
        error = dump.exception()
        return time.monotonic() - killed_at, "" if error is None else str(error)

    async def scenario() -> tuple[list[tuple[float, str]], list[int]]:
        runtime = ProcessRuntime(find_criu())
        rounds = [await one_round(runtime, index) for index in range(KILL_ROUNDS)]
        return rounds, criu_processes(tmp_path / "images")

    try:
        rounds, lingering_criu = asyncio.run(scenario())
    finally:
        # A hung CRIU keeps the killed job in the kernel, so end both and leave nothing behind after a failure.
        for pid in criu_processes(tmp_path / "images"):
            os.kill(pid, signal.SIGKILL)
    assert all(seconds < ABANDON_GRACE_SECONDS + 5 for seconds, _ in rounds), rounds
    # A dump that the SIGKILL did not reach in time succeeds and is then refused; every round fails.
    assert all(message.startswith(f"dump {index} failed") for index, (_, message) in enumerate(rounds)), rounds
    assert lingering_criu == []


def test_criu_past_its_timeout_is_killed(tmp_path: Path) -> None:
    criu = stand_in_criu(tmp_path, "echo $$ > \"$(dirname \"$0\")/pid\"; exec sleep 60")
    started = time.monotonic()
    with pytest.raises(CriuError) as raised:
        asyncio.run(run_criu(criu, ["dump"], tmp_path / "dump.log", ErrorCode.CHECKPOINT_FAILED, "dump of job x", timeout=0.5))
    assert time.monotonic() - started < 5
    assert raised.value.code == ErrorCode.CHECKPOINT_FAILED
    assert "dump of job x failed: CRIU ran longer than 0.5 s, so CRIU was stopped" in raised.value.message
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists()


def test_criu_is_killed_when_abandoned_and_still_running(tmp_path: Path) -> None:
    criu = stand_in_criu(tmp_path, "exec sleep 60")
    started = time.monotonic()
    with pytest.raises(CriuError) as raised:
        asyncio.run(
            run_criu(criu, ["dump"], tmp_path / "dump.log", ErrorCode.CHECKPOINT_FAILED, "dump of job x", abandon_when=lambda: "the job died")
        )
    assert ABANDON_GRACE_SECONDS <= time.monotonic() - started < ABANDON_GRACE_SECONDS + 5
    assert f"the job died and CRIU did not end within {ABANDON_GRACE_SECONDS:g} s, so CRIU was stopped" in raised.value.message


def test_criu_ending_within_the_grace_keeps_its_result(tmp_path: Path) -> None:
    criu = stand_in_criu(tmp_path, "sleep 0.3; exit 0")
    asyncio.run(run_criu(criu, ["dump"], tmp_path / "dump.log", ErrorCode.CHECKPOINT_FAILED, "dump of job x", abandon_when=lambda: "the job died"))


def test_is_exiting_follows_a_process_to_its_end() -> None:
    process = subprocess.Popen(["sleep", "60"])
    identity = identify(process.pid)
    assert identity is not None
    assert not is_exiting(identity)
    os.kill(process.pid, signal.SIGKILL)
    wait_until(lambda: read_state(process.pid) == "Z", 10, "the killed child to become a zombie")
    assert is_exiting(identity)
    process.wait()
    assert is_exiting(identity)
