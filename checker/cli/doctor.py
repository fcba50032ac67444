"""`checker doctor`: report whether this machine can checkpoint and restore jobs.

Each check prints one line; the command exits non-zero when any required check
fails. The self-test uses the real process runtime: it starts a job that holds a
TCP connection, dumps it with CRIU, kills it with SIGKILL, restores it, and
checks that the restored copy still has the secret it kept in memory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from checker.runtimes import sandbox
from checker.runtimes.base import JobFiles, LaunchSpec
from checker.runtimes.cgroups import detect_layout
from checker.runtimes.container import find_runc
from checker.runtimes.podman import find_podman
from checker.runtimes.criu import Criu, CriuNotFoundError, find_criu
from checker.runtimes.gvisor import find_runsc
from checker.runtimes.vm import DEFAULT_IMAGE_DIR, accelerator, find_qemu
from checker.runtimes.process import ProcessRuntime
from checker.runtimes.procfs import become_child_subreaper

SELF_TEST_JOB = r"""
import os, socket, sys, time
connection = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
secret = os.urandom(16).hex()
print(secret, flush=True)
while not os.path.exists("go"):
    time.sleep(0.02)
with open("answer", "w") as answer:
    answer.write(secret)
"""


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    required: bool = True


def check_criu(configured: str | None) -> tuple[CheckResult, Criu | None]:
    try:
        criu = find_criu(configured)
    except CriuNotFoundError as error:
        return CheckResult("CRIU", False, str(error)), None
    return CheckResult("CRIU", True, f"{criu.path} version {criu.version}"), criu


def run_criu_check(criu: Criu, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(criu.path), "check", *extra], capture_output=True, text=True, timeout=60)


def check_criu_check(criu: Criu) -> CheckResult:
    completed = run_criu_check(criu)
    output = (completed.stdout + completed.stderr).strip()
    # Harmless on every run here: "rlimit: Can't setup RLIMIT_NOFILE for self".
    lines = [line for line in output.splitlines() if "RLIMIT_NOFILE" not in line]
    if completed.returncode == 0:
        return CheckResult("criu check", True, lines[-1] if lines else "Looks good.")
    return CheckResult("criu check", False, "; ".join(lines[-3:]) or f"exit code {completed.returncode}")


def check_feature(criu: Criu, feature: str, label: str, meaning: str) -> CheckResult:
    completed = run_criu_check(criu, "--feature", feature)
    available = completed.returncode == 0
    detail = f"available: {meaning}" if available else f"not available: {meaning} is off"
    return CheckResult(label, available, detail, required=False)


def describe_cgroups() -> CheckResult:
    """Describe the cgroup layout: v1, v2 (unified) or hybrid."""
    v1_controllers: list[str] = []
    v2_mounts: list[str] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            fields_after = after.split()
            if not fields_after:
                continue
            mount_point = before.split()[4]
            if fields_after[0] == "cgroup2":
                v2_mounts.append(mount_point)
            elif fields_after[0] == "cgroup":
                options = fields_after[-1].split(",")
                v1_controllers.extend(o for o in options if o not in ("rw", "ro", "nosuid", "nodev", "noexec", "relatime") and not o.startswith("name="))
    if v1_controllers and v2_mounts:
        layout = f"hybrid: v1 controllers {','.join(sorted(set(v1_controllers)))}; v2 at {', '.join(v2_mounts)}"
    elif v2_mounts:
        layout = f"v2 (unified) at {', '.join(v2_mounts)}"
    elif v1_controllers:
        layout = f"v1: {','.join(sorted(set(v1_controllers)))}"
    else:
        layout = "no cgroup file system mounted"
    return CheckResult("cgroups", bool(v1_controllers or v2_mounts), layout, required=False)


def check_root() -> CheckResult:
    if os.geteuid() == 0:
        return CheckResult("privileges", True, "running as root")
    return CheckResult("privileges", False, "CRIU dumps and PID namespaces need root; run the server as root")


def check_bubblewrap() -> CheckResult:
    path = shutil.which("bwrap")
    if path is None:
        return CheckResult("bubblewrap", False, "bwrap not found; every job runs under it; install it with scripts/install-bubblewrap.sh (apt-get install bubblewrap)")
    completed = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    return CheckResult("bubblewrap", completed.returncode == 0, f"{path} ({completed.stdout.strip() or completed.stderr.strip()})")


def check_runtimes(criu_usable: bool, root: bool, bubblewrap: bool) -> list[CheckResult]:
    """Report, for each runtime type, whether jobs of that type can run here and what is missing when not."""
    shared: list[str] = []
    if not root:
        shared.append("the server must run as root")
    if not criu_usable:
        shared.append("no usable CRIU")
    if not bubblewrap:
        shared.append("bwrap is missing")

    results = [runtime_result("process", shared)]
    sandbox_missing = list(shared)
    if not sandbox.PYTHON.exists():
        sandbox_missing.append(f"{sandbox.PYTHON} is missing (the sandbox's init runs with the host's Python)")
    if shutil.which("mount") is None:
        sandbox_missing.append("the mount command is missing (restores mount a tmpfs root)")
    results.append(runtime_result("sandbox", sandbox_missing))

    layout = detect_layout()
    missing_controllers = layout.missing(["memory", "cpu", "pids"])
    detail = layout.describe() if not missing_controllers else f"{layout.describe()}; limits that need them are rejected"
    results.append(CheckResult("limits", not missing_controllers, detail, required=False))
    container = check_container_runtime(criu_usable, root)
    results.append(container)
    results.append(check_podman_runtime(container))
    results.append(check_gvisor())
    results.append(check_vm())
    return results


def check_vm() -> CheckResult:
    """Report whether the vm runtime can run here: QEMU, zstd and the guest image found, and which accelerator it would use."""
    qemu = find_qemu()
    if qemu is None:
        return CheckResult("runtime vm", False, "unavailable: qemu-system-x86_64 not found; install it with scripts/install-qemu.sh or set CHECKER_QEMU", required=False)
    if shutil.which("zstd") is None:
        return CheckResult("runtime vm", False, "unavailable: zstd not found (it compresses snapshots); install it with scripts/install-qemu.sh", required=False)
    missing = [name for name in ("vmlinuz", "initramfs.cpio") if not (DEFAULT_IMAGE_DIR / name).is_file()]
    if missing:
        return CheckResult("runtime vm", False, f"unavailable: {', '.join(missing)} missing from {DEFAULT_IMAGE_DIR}; build the guest image with scripts/build-vm-image.sh", required=False)
    try:
        version = subprocess.run([str(qemu), "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return CheckResult("runtime vm", False, f"unavailable: {qemu} --version failed", required=False)
    _, reason = accelerator()
    return CheckResult("runtime vm", True, f"available: {version}, guest image in {DEFAULT_IMAGE_DIR}; jobs run under {reason}", required=False)


def check_podman_runtime(container: CheckResult) -> CheckResult:
    """Report whether `podman` jobs can run: everything the container runtime needs, and podman."""
    missing = [container.detail.removeprefix("unusable: ")] if not container.ok else []
    podman = find_podman()
    version = ""
    if podman is None:
        missing.append("podman not found; install it with scripts/install-podman.sh")
    else:
        completed = subprocess.run([podman, "--version"], capture_output=True, text=True, timeout=30)
        version = completed.stdout.strip() or completed.stderr.strip()
    if missing:
        return CheckResult("runtime podman", False, "unusable: " + "; ".join(missing), required=False)
    return CheckResult("runtime podman", True, f"usable with {podman} ({version}) and runc; each definition needs an image with python3 in podman's local storage", required=False)


def check_container_runtime(criu_usable: bool, root: bool) -> CheckResult:
    """Report whether `container` jobs can run: runc present, CRIU usable, a freezer cgroup to freeze containers with."""
    missing: list[str] = []
    if not root:
        missing.append("the server must run as root")
    if not criu_usable:
        missing.append("no usable CRIU")
    runc = find_runc()
    version = ""
    if runc is None:
        missing.append("runc not found; install it with scripts/install-runc.sh")
    else:
        completed = subprocess.run([runc, "--version"], capture_output=True, text=True, timeout=30)
        first_line = completed.stdout.strip().splitlines()[0] if completed.stdout.strip() else ""
        if completed.returncode != 0 or not first_line:
            missing.append(f"{runc} --version failed with {completed.returncode}: {completed.stderr.strip()}")
        version = f"{runc} ({first_line})"
    if not freezer_available():
        missing.append("no freezer cgroup (v1 freezer controller or cgroup v2), which runc needs to freeze a container for a checkpoint")

    if missing:
        return CheckResult("runtime container", False, "unusable: " + "; ".join(missing), required=False)
    return CheckResult("runtime container", True, f"usable with {version}; each definition needs a root file system with python3 (scripts/build-rootfs.sh)", required=False)


def freezer_available() -> bool:
    """Return whether a freezer cgroup exists: the v1 freezer controller, or any cgroup2 mount (cgroup.freeze)."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            _, _, after = line.partition(" - ")
            fields_after = after.split()
            if not fields_after:
                continue
            if fields_after[0] == "cgroup2" or (fields_after[0] == "cgroup" and "freezer" in fields_after[-1].split(",")):
                return True
    return False


def runtime_result(name: str, missing: list[str]) -> CheckResult:
    if missing:
        return CheckResult(f"runtime {name}", False, "unusable: " + "; ".join(missing), required=False)
    return CheckResult(f"runtime {name}", True, "usable")


def check_gvisor() -> CheckResult:
    """Report whether the gvisor runtime can run here: runsc found, and a sandbox without network runs."""
    runsc = find_runsc()
    if runsc is None:
        return CheckResult("runtime gvisor", False, "unavailable: runsc not found; install it with scripts/install-runsc.sh or set CHECKER_RUNSC", required=False)
    version = subprocess.run([str(runsc), "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[:1]
    with tempfile.TemporaryDirectory(prefix="checker-doctor-runsc-") as state:
        try:
            completed = subprocess.run(
                [str(runsc), "--root", state, "--network=none", "--platform=systrap", "do", "/bin/true"], capture_output=True, text=True, timeout=60
            )
        except subprocess.TimeoutExpired:
            return CheckResult("runtime gvisor", False, f"unavailable: a sandbox of {runsc} did not finish within 60 s", required=False)
    if completed.returncode != 0:
        reason = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return CheckResult("runtime gvisor", False, f"unavailable: {runsc} could not run a sandbox on the systrap platform: {reason}", required=False)
    return CheckResult("runtime gvisor", True, f"available: {runsc} ({' '.join(version)}) ran a sandbox on the systrap platform", required=False)


async def self_test(criu: Criu) -> CheckResult:
    """Dump, SIGKILL and restore a job that holds a TCP connection."""
    become_child_subreaper()  # The restored copy is re-parented to us, so we can reap it.
    work_root = Path(tempfile.mkdtemp(prefix="checker-doctor-"))
    listener = socket.create_server(("127.0.0.1", 0))
    runtime = ProcessRuntime(criu)
    files = JobFiles.under(work_root / "job")
    files.work_dir.mkdir(parents=True)
    (files.work_dir / "job.py").write_text(SELF_TEST_JOB)
    spec = LaunchSpec("doctor", [sys.executable, "job.py", str(listener.getsockname()[1])], {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, files)
    process = restored = None
    try:
        process = await runtime.start(spec)
        accepted, _ = await asyncio.wait_for(asyncio.to_thread(listener.accept), 10)
        secret = await wait_for_line(files.stdout_path)

        image_dir = work_root / "image"
        image_dir.mkdir()
        started = time.monotonic()
        await runtime.checkpoint(spec, process, image_dir, leave_running=True, log_path=work_root / "dump.log", context="self-test dump")
        dump_seconds = time.monotonic() - started
        await runtime.kill(process)
        await runtime.wait(spec, process)

        started = time.monotonic()
        restored = await runtime.restore(spec, image_dir, log_path=work_root / "restore.log", context="self-test restore")
        restore_seconds = time.monotonic() - started
        (files.work_dir / "go").touch()
        status = await asyncio.wait_for(runtime.wait(spec, restored), 10)
        answer = (files.work_dir / "answer").read_text() if (files.work_dir / "answer").exists() else ""
        accepted.close()
    except Exception as error:  # Any failure is the result of this check.
        return CheckResult("self-test", False, f"dump and restore of a process holding a TCP connection failed: {error}")
    finally:
        for leftover in (process, restored):
            if leftover is not None:
                await runtime.kill(leftover)
        listener.close()
        shutil.rmtree(work_root, ignore_errors=True)

    if status.exit_code != 0 or answer != secret:
        return CheckResult("self-test", False, f"the restored process exited with {status} and answered {answer!r}, expected {secret!r}")
    return CheckResult("self-test", True, f"dumped a process holding a TCP connection in {dump_seconds:.3f} s, restored it in {restore_seconds:.3f} s, memory intact")


async def wait_for_line(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if text.endswith("\n"):
                return text.strip()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"the self-test job printed nothing to {path} within {timeout:.0f} s")


def run_doctor(configured_criu: str | None = None) -> int:
    results: list[CheckResult] = [check_root()]
    criu_result, criu = check_criu(configured_criu)
    results.append(criu_result)
    if criu is not None:
        results.append(check_criu_check(criu))
        results.append(check_feature(criu, "uffd-noncoop", "userfaultfd", "lazy restore (--lazy-pages)"))
        results.append(check_feature(criu, "mem_dirty_track", "dirty tracking", "incremental dumps (pre-dump)"))
    results.append(describe_cgroups())
    bubblewrap = check_bubblewrap()
    results.append(bubblewrap)
    if criu is not None and results[0].ok and bubblewrap.ok:
        results.append(asyncio.run(self_test(criu)))
    criu_usable = criu is not None and all(r.ok for r in results if r.name in ("criu check", "self-test"))
    results.extend(check_runtimes(criu_usable, results[0].ok, bubblewrap.ok))

    for result in results:
        if result.ok:
            mark = "ok  "
        elif result.required:
            mark = "FAIL"
        else:
            mark = "info"
        print(f"[{mark}] {result.name}: {result.detail}")

    failed = [r for r in results if r.required and not r.ok]
    if failed:
        print(f"\n{len(failed)} required check(s) failed: {', '.join(r.name for r in failed)}. Checker cannot checkpoint jobs on this machine until they pass.", file=sys.stderr)
        return 1
    print("\nThis machine can checkpoint and restore Checker jobs.")
    return 0
