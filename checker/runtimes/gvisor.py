"""The `gvisor` runtime: each job in a gVisor sandbox, checkpointed with runsc.

Layout of a running job, as seen from the host::

    runsc-sandbox                  host process of the sandbox (the job's ProcessIdentity)
      └─ pidinit.py                PID 1 inside the sandbox
           └─ the job's command    stdout/stderr appended to log files
    runsc-gofer                    serves the sandbox's file system from the host

The sandbox has no network (`--network=none`). Its root file system is a
small skeleton directory, read-only, with the host's /usr, the server's
Python environment, the Checker SDK and the definition's `mounts` bound
read-only at their host paths, and a tmpfs at /tmp. The job's directory is
bound read-write at the same path as in the `process` runtime, so the job's
files look the same in both runtimes.

The job reaches the server only through the unix socket `api.sock` in its
directory (`--host-uds=open` lets the sandbox connect to host sockets). The
server serves that socket itself and closes it while it checkpoints the job,
because runsc cannot checkpoint a sandbox with a host unix connection open.

A checkpoint pauses the sandbox, archives the work directory, and runs
`runsc checkpoint --leave-running`, so a failed checkpoint never ends the job.
A stop-mode checkpoint kills the sandbox only after the image is written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import checker
from checker.errors import CheckerError, ErrorCode
from checker.runtimes import procfs, worksnapshot
from checker.runtimes.base import ExitStatus, JobFiles, LaunchSpec, Runtime, read_exit_status
from checker.runtimes.procfs import ProcessIdentity
from checker.runtimes.process import INSIDE, JOB_MOUNT, PIDINIT
from checker.sdk.client import ENV_API_URL, ENV_IDENTITY_FILE

logger = logging.getLogger(__name__)

ENV_RUNSC = "CHECKER_RUNSC"
DEFAULT_RUNSC = Path("/opt/checker/bin/runsc")
PLATFORMS = ("systrap", "ptrace")
"""Platforms that work on the machines measured (the `kvm` platform hangs on kvm-pvm hosts)."""

INSIDE_SOCKET = JOB_MOUNT / "api.sock"
COMMAND_TIMEOUT_SECONDS = 120.0
"""Maximum seconds one runsc command (run, checkpoint, restore) may take before it is killed."""
CHECKPOINT_ATTEMPTS = 20
"""Checkpoint attempts before giving up; an attempt fails while the job still has an aborted API connection open."""
CHECKPOINT_RETRY_SECONDS = 0.1
SKELETON_DIRS = ("usr", "etc", "tmp", "proc", "dev", "sys", "run/checker/job", "root")
SKELETON_LINKS = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/sbin"}


def find_runsc(configured: str | None = None) -> Path | None:
    """Return the runsc binary from `configured`, CHECKER_RUNSC, the project prefix or PATH; None when there is none."""
    for candidate in (configured, os.environ.get(ENV_RUNSC), str(DEFAULT_RUNSC)):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("runsc")
    return Path(found) if found else None


@dataclass(frozen=True)
class Sandbox:
    """Names runsc uses for one job's sandbox."""

    container_id: str
    root: Path
    """runsc's state directory (`--root`) for this job."""
    bundle: Path
    """OCI bundle directory with config.json."""


class GVisorRuntime(Runtime):
    """Jobs in gVisor sandboxes, checkpointed and restored by runsc."""

    type_name = "gvisor"

    def __init__(self, runsc: Path, runtime_dir: Path) -> None:
        self.runsc = runsc
        self.runtime_dir = runtime_dir
        """Directory for the shared root file system skeleton and each job's bundle and runsc state."""

    def uses_job_socket(self, config: dict) -> bool:
        return True

    def validate_config(self, config: dict) -> None:
        command = config.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(part, str) and part for part in command):
            raise ValueError("runtime.command must be a non-empty list of non-empty strings, e.g. [\"python3\", \"job.py\"]")
        platform = config.get("platform", "systrap")
        if platform not in PLATFORMS:
            raise ValueError(f"runtime.platform {platform!r} is not supported; use one of {', '.join(PLATFORMS)}")
        for mount in config.get("mounts", []):
            if not isinstance(mount, str) or not mount.startswith("/"):
                raise ValueError(f"runtime.mounts entry {mount!r} is invalid: give an absolute host path")

    # Sandbox files

    def _sandbox(self, job_id: str) -> Sandbox:
        job_runtime_dir = self.runtime_dir / "jobs" / job_id
        return Sandbox(container_id=f"checker-{job_id}", root=job_runtime_dir / "runsc", bundle=job_runtime_dir / "bundle")

    def _skeleton(self) -> Path:
        """Return the read-only root file system shared by all sandboxes, creating it on first use."""
        rootfs = self.runtime_dir / "rootfs"
        for directory in SKELETON_DIRS:
            (rootfs / directory).mkdir(parents=True, exist_ok=True)
        for name, target in SKELETON_LINKS.items():
            link = rootfs / name
            if not link.is_symlink():
                link.symlink_to(target)
        return rootfs

    def _read_only_mounts(self, spec: LaunchSpec) -> list[str]:
        """Return the host directories bound read-only into the sandbox, outermost first, without nested duplicates."""
        sdk_root = Path(checker.__file__).resolve().parent.parent
        wanted = ["/usr", sys.base_prefix, sys.prefix, str(sdk_root), *spec.config.get("mounts", [])]
        paths = sorted({os.path.normpath(path) for path in wanted})
        kept: list[str] = []
        for path in paths:
            if not any(path == outer or path.startswith(outer.rstrip("/") + "/") for outer in kept):
                kept.append(path)
        return kept

    def _write_bundle(self, spec: LaunchSpec, sandbox: Sandbox) -> None:
        rootfs = self._skeleton()
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ]
        for path in self._read_only_mounts(spec):
            if path != "/usr":
                (rootfs / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            mounts.append({"destination": path, "type": "bind", "source": path, "options": ["rbind", "ro"]})
        mounts.append({"destination": str(JOB_MOUNT), "type": "bind", "source": str(spec.files.job_dir), "options": ["rbind", "rw"]})

        env = {**spec.env, ENV_API_URL: f"unix://{INSIDE_SOCKET}", ENV_IDENTITY_FILE: str(INSIDE.identity_path)}
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": [sys.executable, "-I", "-S", str(PIDINIT), *pidinit_arguments(INSIDE), "--", *spec.command],
                "env": [f"{name}={value}" for name, value in env.items()],
                "cwd": str(INSIDE.work_dir),
                "capabilities": {},
            },
            "root": {"path": str(rootfs), "readonly": True},
            "hostname": "checker-job",
            "mounts": mounts,
            "linux": {"namespaces": [{"type": kind} for kind in ("pid", "mount", "ipc", "uts", "network")]},
        }
        sandbox.bundle.mkdir(parents=True, exist_ok=True)
        staging = sandbox.bundle / "config.json.tmp"
        staging.write_text(json.dumps(config, indent=1))
        os.replace(staging, sandbox.bundle / "config.json")

    # runsc commands

    def _global_options(self, spec: LaunchSpec, sandbox: Sandbox) -> list[str]:
        platform = spec.config.get("platform", "systrap")
        return [str(self.runsc), "--root", str(sandbox.root), "--network=none", "--host-uds=open", f"--platform={platform}"]

    async def _runsc(self, spec: LaunchSpec, sandbox: Sandbox, arguments: list[str], *, log_path: Path | None, error_code: ErrorCode, context: str) -> None:
        """Run one runsc command; raise CheckerError with its last output lines when it fails or times out."""
        command = [*self._global_options(spec, sandbox), *arguments]
        # Output goes to a file, not a pipe: the sandbox started by `run` or
        # `restore` inherits the command's stdio, so a pipe would never reach EOF.
        with tempfile.TemporaryFile() as output_file:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=output_file, stderr=output_file, start_new_session=True
            )
            # `runsc delete` waits until the gofer's PID is gone, and an exited
            # gofer stays a zombie of this server until reaped here.
            reaper = asyncio.create_task(reap_runsc_helpers_until_cancelled())
            try:
                await asyncio.wait_for(process.wait(), COMMAND_TIMEOUT_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise CheckerError(error_code, f"{context} failed: 'runsc {arguments[0]}' timed out after {COMMAND_TIMEOUT_SECONDS:.0f} s") from None
            finally:
                reaper.cancel()
            output_file.seek(0)
            text = output_file.read(1 << 20).decode(errors="replace")

        reap_runsc_helpers()
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as log_file:
                log_file.write(f"$ {' '.join(command)}\n{text}(exit {process.returncode})\n")
        if process.returncode != 0:
            summary = " | ".join(line.strip() for line in text.strip().splitlines()[-3:]) or "no output"
            raise CheckerError(error_code, f"{context} failed: 'runsc {arguments[0]}' exited with {process.returncode}: {summary}")

    async def _delete_stale(self, spec: LaunchSpec, sandbox: Sandbox) -> None:
        """Remove runsc's record of an earlier sandbox of this job, killing it if it still runs."""
        if not sandbox.root.exists():
            return
        try:
            await self._runsc(spec, sandbox, ["delete", "--force", sandbox.container_id], log_path=None, error_code=ErrorCode.START_FAILED, context="delete")
        except CheckerError:
            pass  # No such container: nothing to delete.

    async def _sandbox_process(self, spec: LaunchSpec, sandbox: Sandbox, context: str, error_code: ErrorCode) -> ProcessIdentity:
        """Return the host process of the sandbox, from `runsc state`."""
        command = [*self._global_options(spec, sandbox), "state", sandbox.container_id]
        process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        output, errors = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_SECONDS)
        try:
            pid = int(json.loads(output)["pid"])
        except (ValueError, KeyError, TypeError):
            raise CheckerError(error_code, f"{context} failed: 'runsc state' returned no sandbox process: {errors.decode(errors='replace').strip()}") from None
        identity = procfs.identify(pid)
        if identity is None:
            raise CheckerError(error_code, f"{context} failed: the sandbox process {pid} exited at once; see {spec.files.stderr_path}")
        return identity

    # The Runtime interface

    async def start(self, spec: LaunchSpec) -> ProcessIdentity:
        files = spec.files
        files.work_dir.mkdir(parents=True, exist_ok=True)
        files.exit_status_path.unlink(missing_ok=True)
        sandbox = self._sandbox(spec.job_id)
        await self._delete_stale(spec, sandbox)
        self._write_bundle(spec, sandbox)

        context = f"start of job {spec.job_id} (runtime gvisor)"
        log_path = files.job_dir / "runsc" / "start.log"
        await self._runsc(spec, sandbox, ["run", "--detach", "--bundle", str(sandbox.bundle), sandbox.container_id], log_path=log_path, error_code=ErrorCode.START_FAILED, context=context)
        return await self._sandbox_process(spec, sandbox, context, ErrorCode.START_FAILED)

    async def checkpoint(self, spec: LaunchSpec, process: ProcessIdentity, image_dir: Path, *, leave_running: bool, log_path: Path, context: str) -> None:
        if spec.files.exit_status_path.exists() or not procfs.is_alive(process):
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the job's command has already exited")
        sandbox = self._sandbox(spec.job_id)
        snapshot = image_dir / worksnapshot.SNAPSHOT_NAME
        arguments = ["checkpoint", "--image-path", str(image_dir), "--leave-running", "--compression=none", sandbox.container_id]

        # A connection the server aborted just before stays open in the job
        # until its thread notices, and runsc rejects the checkpoint until then.
        for attempt in range(1, CHECKPOINT_ATTEMPTS + 1):
            await self._runsc(spec, sandbox, ["pause", sandbox.container_id], log_path=log_path, error_code=ErrorCode.CHECKPOINT_FAILED, context=context)
            try:
                # The sandbox is paused, so the archive matches the memory image.
                await asyncio.to_thread(worksnapshot.write_snapshot, spec.files.work_dir, snapshot)
                await self._runsc(spec, sandbox, arguments, log_path=log_path, error_code=ErrorCode.CHECKPOINT_FAILED, context=context)
            except CheckerError:
                await self._resume(spec, sandbox, log_path, context)
                if attempt == CHECKPOINT_ATTEMPTS or spec.files.exit_status_path.exists():
                    raise
                await asyncio.sleep(CHECKPOINT_RETRY_SECONDS)
                continue
            except OSError as error:
                await self._resume(spec, sandbox, log_path, context)
                raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: cannot archive the work directory: {error}") from error
            break

        if leave_running:
            await self._resume(spec, sandbox, log_path, context)
        else:
            await self.kill(process)

    async def _resume(self, spec: LaunchSpec, sandbox: Sandbox, log_path: Path, context: str) -> None:
        await self._runsc(spec, sandbox, ["resume", sandbox.container_id], log_path=log_path, error_code=ErrorCode.CHECKPOINT_FAILED, context=context)

    async def restore(self, spec: LaunchSpec, image_dir: Path, *, log_path: Path, context: str, leave_stopped: bool = False) -> ProcessIdentity:
        try:
            await asyncio.to_thread(worksnapshot.put_back_work_dir, image_dir, spec.files.work_dir)
        except (OSError, tarfile.TarError) as error:
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: cannot put back the work directory from {image_dir / worksnapshot.SNAPSHOT_NAME}: {error}") from error
        spec.files.exit_status_path.unlink(missing_ok=True)

        sandbox = self._sandbox(spec.job_id)
        await self._delete_stale(spec, sandbox)
        self._write_bundle(spec, sandbox)
        arguments = ["restore", "--image-path", str(image_dir), "--bundle", str(sandbox.bundle), "--detach", sandbox.container_id]
        await self._runsc(spec, sandbox, arguments, log_path=log_path, error_code=ErrorCode.RESTORE_FAILED, context=context)
        if leave_stopped:
            # NOTE: runsc 2024-07 has no option to restore paused, so the job
            # runs for the moment between the restore and this pause. The
            # server keeps the job's socket closed until the restore is
            # recorded, so the job cannot reach it in that moment.
            await self._runsc(spec, sandbox, ["pause", sandbox.container_id], log_path=log_path, error_code=ErrorCode.RESTORE_FAILED, context=context)
        return await self._sandbox_process(spec, sandbox, context, ErrorCode.RESTORE_FAILED)

    async def resume(self, process: ProcessIdentity) -> None:
        found = self._sandbox_of(process)
        if found is None:
            return
        spec, sandbox = found
        try:
            await self._runsc(spec, sandbox, ["resume", sandbox.container_id], log_path=None, error_code=ErrorCode.RESTORE_FAILED, context="resume")
        except CheckerError as error:
            # A sandbox that was not paused (a re-adopted running job) rejects resume.
            logger.debug("job %s: %s", sandbox.container_id, error.message)

    def _sandbox_of(self, process: ProcessIdentity) -> tuple[LaunchSpec, Sandbox] | None:
        """Find the sandbox whose host process is `process`, from its command line (also after a server restart)."""
        try:
            arguments = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, ProcessLookupError):
            return None
        arguments = [argument for argument in arguments if argument]
        prefix = "checker-"
        if not arguments or not arguments[-1].startswith(prefix):
            return None
        job_id = arguments[-1][len(prefix) :]
        platform = next((argument.split("=", 1)[1] for argument in arguments if argument.startswith("--platform=")), "systrap")
        spec = LaunchSpec(job_id=job_id, command=[], env={}, files=JobFiles.under(Path("/nonexistent")), config={"platform": platform})
        return spec, self._sandbox(job_id)

    async def discard_interrupted_restore(self, spec: LaunchSpec, keep: ProcessIdentity | None) -> int | None:
        sandbox = self._sandbox(spec.job_id)
        if not sandbox.root.exists():
            return None
        try:
            current = await self._sandbox_process(spec, sandbox, "discard", ErrorCode.RESTORE_FAILED)
        except (CheckerError, TimeoutError):
            return None
        if keep is not None and current == keep:
            return None
        await self.kill(current)
        return current.pid

    async def kill(self, process: ProcessIdentity) -> None:
        # SIGKILL to the sandbox's host process ends every process in the sandbox.
        procfs.kill_if_alive(process)

    async def wait(self, spec: LaunchSpec, process: ProcessIdentity) -> ExitStatus:
        wait_status = await procfs.wait_for_exit(process)
        reap_runsc_helpers()
        return read_exit_status(spec.files, wait_status)

    async def cleanup(self, spec: LaunchSpec) -> None:
        sandbox = self._sandbox(spec.job_id)
        await self._delete_stale(spec, sandbox)
        shutil.rmtree(self.runtime_dir / "jobs" / spec.job_id, ignore_errors=True)


def pidinit_arguments(files: JobFiles) -> list[str]:
    """Return pidinit.py's arguments before `--`: log files, exit status file and work directory."""
    return [str(files.stdout_path), str(files.stderr_path), str(files.exit_status_path), str(files.work_dir)]


def reap_runsc_helpers() -> None:
    """Reap exited runsc helper processes that were re-parented to this server.

    runsc starts its sandbox, its gofer and short-lived helpers by executing
    /proc/self/exe, so their command name is `exe`. The runsc command that
    started them exits first, and they are re-parented to this server, a
    child subreaper, which must reap them. No other child of the server
    has that name.
    """
    for child in procfs.list_children(os.getpid()):
        if procfs.read_state(child) != "Z":
            continue
        try:
            name = Path(f"/proc/{child}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if name == "exe":
            procfs.reap(child)


async def reap_runsc_helpers_until_cancelled(interval: float = 0.05) -> None:
    while True:
        reap_runsc_helpers()
        await asyncio.sleep(interval)
