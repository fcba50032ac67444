"""The process runtime used directly, the SDK outside Checker, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from checker.cli.client import CallerClient
from checker.runtimes.base import JobFiles, LaunchSpec
from checker.runtimes.criu import find_criu
from checker.runtimes.process import ProcessRuntime

from conftest import REPO_ROOT, free_port, wait_until

COUNTER_JOB = """
import os, sys, time
value = int.from_bytes(os.urandom(4), "big")
print(value, flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
print(value + 1, flush=True)
"""


def test_same_image_restores_twice_at_once(tmp_path: Path, child_subreaper) -> None:
    async def scenario() -> tuple[list[int], list[str], int]:
        runtime = ProcessRuntime(find_criu())
        gate = tmp_path / "gate"
        files = JobFiles.under(tmp_path / "job")
        files.work_dir.mkdir(parents=True)
        (files.work_dir / "job.py").write_text(COUNTER_JOB)
        spec = LaunchSpec("twice", [sys.executable, "job.py", str(gate)], {"PATH": os.environ["PATH"]}, files)

        original = await runtime.start(spec)
        for _ in range(200):
            if files.stdout_path.exists() and files.stdout_path.read_text().endswith("\n"):
                break
            await asyncio.sleep(0.02)
        value = int(files.stdout_path.read_text())
        image = tmp_path / "image"
        image.mkdir()
        await runtime.checkpoint(spec, original, image, leave_running=False, log_path=tmp_path / "dump.log", context="test dump")
        await runtime.wait(spec, original)

        # Both copies share the job's files: the paths are part of the image.
        copies = [await runtime.restore(spec, image, log_path=tmp_path / f"restore-{index}.log", context=f"restore {index}") for index in range(2)]
        gate.touch()
        statuses = [await runtime.wait(spec, process) for process in copies]
        return [process.pid for process in copies], [s.exit_code for s in statuses], value

    pids, exit_codes, value = asyncio.run(scenario())
    assert pids[0] != pids[1]
    assert exit_codes == [0, 0]
    lines = (tmp_path / "job" / "stdout.log").read_text().split()
    assert lines.count(str(value + 1)) == 2


def test_sdk_standalone_mode(tmp_path: Path) -> None:
    script = tmp_path / "standalone.py"
    script.write_text(textwrap.dedent("""
        import checker
        result = checker.checkpoint()
        print(result.standalone, result.restored, result.number)
        checker.exit({"params": checker.params()})
    """))
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHECKER_")}
    env["CHECKER_PARAMS"] = json.dumps({"size": 3})
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert completed.returncode == 0, completed.stderr
    first, second = completed.stdout.splitlines()
    assert first == "True False None"
    assert json.loads(second) == {"params": {"size": 3}}


def test_cli_run_embedded_server(tmp_path: Path) -> None:
    env = {**os.environ, "CHECKER_STATE_DIR": str(tmp_path / "state"), "CHECKER_SERVER_URL": f"http://127.0.0.1:{free_port()}"}
    completed = subprocess.run(
        [sys.executable, "-m", "checker", "--log-level", "WARNING", "run", str(REPO_ROOT / "examples" / "count.py"), "--param", "steps=3"],
        capture_output=True, text=True, env=env, timeout=120, cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    assert "step 3: total 6, checkpoint 3" in completed.stdout
    result = json.loads(completed.stdout[completed.stdout.index("{"):])
    assert result["state"] == "completed"
    assert result["output"] == {"steps": 3, "total": 6}
    assert "checkpoint 3 of job" in completed.stderr


def test_cli_run_rejects_missing_file(tmp_path: Path) -> None:
    completed = subprocess.run([sys.executable, "-m", "checker", "run", str(tmp_path / "nope.py")], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert "nope.py not found" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_cli_run_rejects_bad_param(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "checker", "run", str(REPO_ROOT / "examples" / "count.py"), "--param", "novalue"], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 1
    assert "--param 'novalue' is invalid" in completed.stderr


def test_doctor_passes_here() -> None:
    completed = subprocess.run([sys.executable, "-m", "checker", "doctor"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "[ok  ] self-test" in completed.stdout
    assert "[ok  ] criu check" in completed.stdout
    assert "[ok  ] runtime process: usable" in completed.stdout
    assert "[ok  ] runtime sandbox: usable" in completed.stdout
    assert "[ok  ] runtime container: usable with" in completed.stdout
    assert "[ok  ] runtime podman: usable with" in completed.stdout
    assert "[ok  ] limits:" in completed.stdout


def test_doctor_fails_without_criu(tmp_path: Path) -> None:
    completed = subprocess.run([sys.executable, "-m", "checker", "doctor", "--criu", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert "[FAIL] CRIU" in completed.stdout
    assert "[info] runtime sandbox: unusable: no usable CRIU" in completed.stdout
    assert "[info] runtime container: unusable: no usable CRIU" in completed.stdout
    assert "[info] runtime podman: unusable: no usable CRIU" in completed.stdout
    assert "required check(s) failed" in completed.stderr


def run_cli(*arguments: str, server_url: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "checker", *arguments, "--server", server_url], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def test_cli_jobs_list_show_logs_kill(server, client, job_script, tmp_path: Path) -> None:
    from conftest import spawn_script, wait_for_checkpoints

    source = """
        import os, time
        import checker
        print("output line", flush=True)
        checker.checkpoint()
        while True:
            time.sleep(0.1)
    """
    job = spawn_script(client, job_script("cli", source))
    wait_for_checkpoints(client, job["id"], 1)

    listed = run_cli("jobs", "list", "--state", "running", server_url=server.url)
    assert listed.returncode == 0, listed.stderr
    assert job["id"] in listed.stdout

    shown = run_cli("jobs", "show", job["id"], server_url=server.url)
    assert shown.returncode == 0, shown.stderr
    assert "checkpoint 1 of job" in shown.stdout
    assert '"state": "running"' in shown.stdout

    logs = run_cli("logs", job["id"], server_url=server.url)
    assert logs.stdout == "output line\n"

    killed = run_cli("jobs", "kill", job["id"], server_url=server.url)
    assert killed.returncode == 0, killed.stderr
    assert "failed: killed on request" in killed.stdout

    followed = run_cli("logs", job["id"], "--follow", server_url=server.url)
    assert followed.returncode == 0
    assert followed.stdout == "output line\n"


def test_cli_reports_unknown_job(server) -> None:
    shown = run_cli("jobs", "show", "nope", server_url=server.url)
    assert shown.returncode == 1
    assert "job 'nope' not found" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_second_server_on_same_state_dir_rejected(server) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "checker", "server", "--port", str(free_port()), "--state-dir", str(server.state_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 1
    assert "in use by another Checker server" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_server_port_in_use_is_reported(server, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "checker", "server", "--port", str(server.port), "--state-dir", str(tmp_path / "other")],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_cli_run_reuses_unchanged_definition(server, client) -> None:
    env = {**os.environ, "CHECKER_SERVER_URL": server.url}
    for _ in range(2):
        completed = subprocess.run(
            [sys.executable, "-m", "checker", "run", str(REPO_ROOT / "examples" / "count.py"), "--param", "steps=1", "--quiet"],
            capture_output=True, text=True, env=env, timeout=120, cwd=REPO_ROOT,
        )
        assert completed.returncode == 0, completed.stderr
    versions = [d["version"] for d in client.request("GET", "/v1/job-definitions", params={"name": "count"}).json()["items"]]
    assert versions == [1]
    assert len(client.list_jobs()["items"]) == 2


def test_cli_creates_definition_and_spawns_version(server, tmp_path: Path) -> None:
    script = tmp_path / "echo_params.py"
    script.write_text("import checker\nchecker.exit({'params': checker.params(), 'version': 2})\n")
    first = tmp_path / "first.py"
    first.write_text("import checker\nchecker.exit({'version': 1})\n")

    def cli(*arguments: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "CHECKER_SERVER_URL": server.url}
        return subprocess.run([sys.executable, "-m", "checker", *arguments], capture_output=True, text=True, timeout=60, env=env)

    created = cli("definitions", "create", "echo", "--metadata", "team=data", "--", sys.executable, str(first))
    assert created.returncode == 0, created.stderr
    assert "definition echo version 1 created" in created.stdout
    created = cli("definitions", "create", "echo", "--", sys.executable, str(script))
    assert "definition echo version 2 created" in created.stdout

    listed = cli("definitions", "list", "echo")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [["echo", "1"], ["echo", "2"]]

    spawned = cli("jobs", "spawn", "echo@1")
    assert spawned.returncode == 0, spawned.stderr
    assert "spawned from echo version 1" in spawned.stdout
    spawned_latest = cli("jobs", "spawn", "echo@latest", "--param", "size=3", "--metadata", "run=a")
    assert "spawned from echo version 2" in spawned_latest.stdout

    with CallerClient(server.url) as client:
        first_job = client.result(spawned.stdout.split()[1], wait=60)
        latest_job = client.result(spawned_latest.stdout.split()[1], wait=60)
    assert first_job["output"] == {"version": 1}
    assert latest_job["output"] == {"params": {"size": 3}, "version": 2}


def test_cli_definition_and_spawn_errors(server) -> None:
    def cli(*arguments: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "CHECKER_SERVER_URL": server.url}
        return subprocess.run([sys.executable, "-m", "checker", *arguments], capture_output=True, text=True, timeout=60, env=env)

    no_command = cli("definitions", "create", "empty")
    assert no_command.returncode != 0
    assert "give the job's command after '--'" in no_command.stderr

    unknown = cli("jobs", "spawn", "nothing@4")
    assert unknown.returncode != 0
    assert "version 4 of job definition 'nothing' not found" in unknown.stderr

    bad_param = cli("jobs", "spawn", "nothing", "--metadata", "novalue")
    assert bad_param.returncode != 0
    assert "--metadata 'novalue' is invalid; write NAME=VALUE" in bad_param.stderr
    for result in (no_command, unknown, bad_param):
        assert "Traceback" not in result.stderr


def test_cli_creates_sandbox_definition_with_limits(server, tmp_path: Path) -> None:
    script = tmp_path / "limited.py"
    script.write_text("import checker\nchecker.exit({'ok': True})\n")
    env = {**os.environ, "CHECKER_SERVER_URL": server.url}
    arguments = ["definitions", "create", "boxed", "--runtime", "sandbox", "--read-only-bind", f"{tmp_path}:/job", "--memory-mib", "256", "--pids", "32"]
    created = subprocess.run([sys.executable, "-m", "checker", *arguments, "--", "/usr/bin/python3", "/job/limited.py"], capture_output=True, text=True, timeout=60, env=env)
    assert created.returncode == 0, created.stderr

    with CallerClient(server.url) as client:
        definition = client.request("GET", "/v1/job-definitions/boxed").json()
        assert definition["runtime"]["type"] == "sandbox"
        assert definition["runtime"]["read_only_binds"] == [f"{tmp_path}:/job"]
        assert definition["limits"] == {"memory_mib": 256, "pids": 32}
        job = client.spawn("boxed")
        assert client.result(job["id"], wait=60)["output"] == {"ok": True}

    rejected = subprocess.run(
        [sys.executable, "-m", "checker", "definitions", "create", "bad", "--memory-mib", "1", "--", "python3", "x.py"], capture_output=True, text=True, timeout=60, env=env
    )
    assert rejected.returncode != 0
    assert "memory_mib" in rejected.stderr
    assert "Traceback" not in rejected.stderr


REWOUND_JOB = """
    import os, time
    import checker

    gate = checker.params()["gate"]
    print("before", flush=True)
    result = checker.checkpoint()
    for index in range(3):
        print(f"after {index} restored={result.restored}", flush=True)
    while not os.path.exists(gate):
        time.sleep(0.05)
    print("done", flush=True)
"""


def test_logs_follow_restarts_at_the_rewound_output(server, client, job_script, tmp_path) -> None:
    gate = tmp_path / "gate"
    definition = client.create_definition("rewound", [sys.executable, str(job_script("rewound", REWOUND_JOB))])
    job = client.spawn(definition["name"], params={"gate": str(gate)}, version=definition["version"])
    follower = subprocess.Popen(
        [sys.executable, "-m", "checker", "logs", job["id"], "--follow", "--server", server.url], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in follower.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: "after 2 restored=False" in lines, 60, "the follower to print the first run's output")
        os.kill(client.get_job(job["id"])["pid"], signal.SIGKILL)
        wait_until(lambda: "after 2 restored=True" in lines, 60, "the follower to print the restored copy's output")
        gate.touch()
        follower.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        follower.kill()

    first = [f"after {index} restored=False" for index in range(3)]
    second = [f"after {index} restored=True" for index in range(3)]
    assert lines == ["before", *first, *second, "done"]
    stdout = (server.state_dir / "jobs" / job["id"] / "stdout.log").read_text()
    assert stdout.splitlines() == ["before", *second, "done"]
