"""The `container` runtime: each job in an OCI container run by runc, checkpointed by runc with CRIU.

Layout of a running job, as seen from the host::

    pidinit.py             PID 1 of the container (its init), a child of the
      └─ the job's command server once `runc run --detach` has exited

Each start and each restore creates a container of its own, named
`checker-JOB_ID-RANDOM`, with a bundle (config.json, see oci.py) in
BUNDLES_DIR and runc's state under RUNC_ROOT. The job's process identity is
that of the container's init, as in the other runtimes, and the server finds
the container again from that PID with `runc list`, also after a restart.

Checkpoints use `runc --criu PATH checkpoint`, which freezes the container
through the freezer cgroup and runs CRIU. runc 1.1 has no option for
`--tcp-close`, `--link-remap`, `--leave-stopped` or action scripts, so each
container names a CRIU configuration file (the `org.criu.config` annotation)
that runc passes to CRIU, and Checker writes that file before each dump and
restore. Its `action-script` runs worksnapshot.py at `post-dump`, while the
container is still frozen, which is how the work directory is captured with
the memory, exactly as in the `process` runtime.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from checker.errors import CheckerError, CriuError, ErrorCode
from checker.runtimes import oci, procfs, worksnapshot
from checker.runtimes.base import ExitStatus, LaunchSpec, read_exit_status
from checker.runtimes.criu import DEFAULT_TIMEOUT_SECONDS, MAX_ERROR_LINES, Criu, first_error_lines, run_watched
from checker.runtimes.process import LAUNCHER_LOG, SNAPSHOT_SCRIPT, ProcessRuntime, check_image_fits, put_back_work_dir
from checker.runtimes.procfs import ProcessIdentity

logger = logging.getLogger(__name__)

RUNC_ROOT = Path("/run/checker/runc")
"""runc's state directory for Checker's containers (`runc --root`), apart from other users of runc."""
BUNDLES_DIR = Path("/run/checker/containers")
"""Host directory with one OCI bundle per container, named like the container."""
CONTAINER_PREFIX = "checker-"
RUNC_TIMEOUT_SECONDS = 60.0
"""Maximum seconds for a runc command other than checkpoint and restore (run, list, delete)."""

DUMP_CRIU_OPTIONS = ["tcp-close", "link-remap"]
"""CRIU options of every dump, as lines of its configuration file (see DUMP_OPTIONS in process.py for the reasons)."""
RESTORE_CRIU_OPTIONS = ["tcp-close"]


def find_runc() -> str | None:
    return shutil.which("runc")


def container_prefix(job_id: str) -> str:
    return f"{CONTAINER_PREFIX}{job_id}-"


def new_container_id(job_id: str) -> str:
    return container_prefix(job_id) + secrets.token_hex(4)


class ContainerRuntime(ProcessRuntime):
    """Jobs in OCI containers from a root file system directory, run and checkpointed by runc.

    It shares with ProcessRuntime the job's cgroup (runc creates it at the
    same path, /checker/JOB_ID), the limit checks, kill and resume.
    """

    type_name = "container"
    allowed_config_keys = oci.ALLOWED_KEYS

    def __init__(self, criu: Criu, criu_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, runc: str | None = None, **kwargs) -> None:
        super().__init__(criu, criu_timeout_seconds, **kwargs)
        self.runc = runc
        self._containers: dict[int, str] = {}
        """Container id of each init PID this server started or restored."""

    def validate_config(self, config: dict) -> None:
        oci.validate_container_config(config)

    def _runc_path(self, job_id: str, code: ErrorCode) -> str:
        path = self.runc or find_runc()
        if path is None:
            raise CheckerError(code, f"job {job_id}: runc is not installed; the container runtime needs it (install it with scripts/install-runc.sh)")
        return path

    def _runc_command(self, runc: str, *arguments: str) -> list[str]:
        return [runc, "--root", str(RUNC_ROOT), *arguments]

    def _remove_idle_cgroup(self, spec: LaunchSpec) -> None:
        """Remove the job's cgroup when no process is in it, so runc creates it with zeroed counters (the OOM count included)."""
        cgroup = self.job_cgroup(spec)
        if not cgroup.list_processes():
            cgroup.remove()

    def _write_bundle(self, spec: LaunchSpec, container_id: str, env: dict[str, str], criu_options: list[str]) -> Path:
        bundle_dir = BUNDLES_DIR / container_id
        criu_config = bundle_dir / "criu.conf"
        bundle = oci.bundle_config(spec.job_id, spec.files.job_dir, spec.command, env, spec.config, spec.limits, criu_config)
        oci.write_bundle(bundle_dir, bundle)
        write_criu_config(criu_config, criu_options)
        return bundle_dir

    async def start(self, spec: LaunchSpec) -> ProcessIdentity:
        runc = self._runc_path(spec.job_id, ErrorCode.START_FAILED)
        files = spec.files
        files.work_dir.mkdir(parents=True, exist_ok=True)
        files.exit_status_path.unlink(missing_ok=True)

        container_id = new_container_id(spec.job_id)
        env = oci.container_env(spec.env, spec.config)
        try:
            await asyncio.to_thread(self._remove_idle_cgroup, spec)
            bundle_dir = self._write_bundle(spec, container_id, env, DUMP_CRIU_OPTIONS)
        except (OSError, RuntimeError) as error:
            raise CheckerError(ErrorCode.START_FAILED, f"start of job {spec.job_id} failed: cannot prepare container {container_id}: {error}") from error

        pid_file = bundle_dir / "init.pid"
        command = self._runc_command(runc, "run", "--detach", "--bundle", str(bundle_dir), "--pid-file", str(pid_file), container_id)
        returncode, output = await run_runc(command, files.job_dir / LAUNCHER_LOG, RUNC_TIMEOUT_SECONDS)
        if returncode != 0:
            await self._delete_container(runc, container_id)
            raise CheckerError(ErrorCode.START_FAILED, f"start of job {spec.job_id} failed: runc run exited with {returncode}: {output or 'no output'}")

        init = read_pid_file(pid_file)
        if init is None:
            raise CheckerError(ErrorCode.START_FAILED, f"start of job {spec.job_id} failed: the container's init exited at once; see {files.stderr_path}")
        self._containers[init.pid] = container_id
        logger.info("job %s: started container %s, init PID %d", spec.job_id, container_id, init.pid)
        return init

    async def checkpoint(self, spec: LaunchSpec, process: ProcessIdentity, image_dir: Path, *, leave_running: bool, log_path: Path, context: str) -> None:
        runc = self._runc_path(spec.job_id, ErrorCode.CHECKPOINT_FAILED)
        command_process = self._job_command(process)
        if command_process is None or spec.files.exit_status_path.exists():
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the job's command has already exited")
        container_id = await self._find_container(runc, spec.job_id, process.pid)
        if container_id is None:
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: no runc container of job {spec.job_id} has init PID {process.pid}")

        write_criu_config(BUNDLES_DIR / container_id / "criu.conf", [*DUMP_CRIU_OPTIONS, f"action-script {SNAPSHOT_SCRIPT}"])
        work_path = runc_work_path(log_path)
        arguments = ["--criu", str(self.criu.path), "checkpoint", "--image-path", str(image_dir), "--work-path", str(work_path)]
        if leave_running:
            arguments.append("--leave-running")
        snapshot_env = {
            "CHECKER_PYTHON": sys.executable,
            worksnapshot.ENV_WORK_DIR: str(spec.files.work_dir),
            worksnapshot.ENV_SNAPSHOT: str(image_dir / worksnapshot.SNAPSHOT_NAME),
        }

        def init_exiting() -> str | None:
            return "the job's process died during the dump" if procfs.is_exiting(process) else None

        await self._run_criu_through_runc(
            self._runc_command(runc, *arguments, container_id), work_path / "dump.log", log_path, ErrorCode.CHECKPOINT_FAILED, context,
            abandon_when=init_exiting, env=snapshot_env,
        )

        # A command that died while CRIU was dumping leaves an image of the init alone.
        if leave_running and (spec.files.exit_status_path.exists() or not procfs.is_alive(command_process)):
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the job's command exited during the dump, so the image is incomplete")

    async def restore(self, spec: LaunchSpec, image_dir: Path, *, log_path: Path, context: str, leave_stopped: bool = False) -> ProcessIdentity:
        runc = self._runc_path(spec.job_id, ErrorCode.RESTORE_FAILED)
        check_image_fits(spec, image_dir, context)
        await put_back_work_dir(spec, image_dir, context)

        # The environment is part of the image; config.json only needs a valid process entry.
        container_id = new_container_id(spec.job_id)
        criu_options = [*RESTORE_CRIU_OPTIONS, *(["leave-stopped"] if leave_stopped else [])]
        try:
            await asyncio.to_thread(self._remove_idle_cgroup, spec)
            bundle_dir = self._write_bundle(spec, container_id, {}, criu_options)
        except (OSError, RuntimeError) as error:
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: cannot prepare container {container_id}: {error}") from error

        pid_file = bundle_dir / "init.pid"
        work_path = runc_work_path(log_path)
        arguments = [
            "--criu", str(self.criu.path), "restore", "--detach", "--image-path", str(image_dir), "--work-path", str(work_path),
            "--bundle", str(bundle_dir), "--pid-file", str(pid_file), container_id,
        ]
        try:
            await self._run_criu_through_runc(self._runc_command(runc, *arguments), work_path / "restore.log", log_path, ErrorCode.RESTORE_FAILED, context)
        except CheckerError:
            await self._delete_container(runc, container_id)
            raise

        init = read_pid_file(pid_file)
        if init is None:
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: the restored container {container_id} exited at once; see {spec.files.stderr_path}")
        self._containers[init.pid] = container_id
        return init

    async def _run_criu_through_runc(self, command: list[str], criu_log: Path, log_path: Path, code: ErrorCode, context: str, **options) -> None:
        """Run a runc checkpoint or restore and copy CRIU's log to `log_path`; raise CriuError with its first Error lines on failure."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        criu_log.parent.mkdir(parents=True, exist_ok=True)
        run = await run_watched(command, timeout=self.criu_timeout_seconds, **options)
        if criu_log.exists():
            shutil.copyfile(criu_log, log_path)
        shutil.rmtree(criu_log.parent, ignore_errors=True)
        if run.abandoned is not None:
            raise CriuError(code, f"{context} failed: {run.abandoned}, so runc was stopped (log: {log_path})", str(log_path), first_error_lines(log_path))
        if run.returncode == 0:
            return

        error_lines = first_error_lines(log_path) or [line for line in run.stderr.splitlines() if line][:MAX_ERROR_LINES]
        reported = "; ".join(f"'{line}'" for line in error_lines) or "no error lines in its log"
        raise CriuError(code, f"{context} failed: runc exited with {run.returncode} and reported {reported} (log: {log_path})", str(log_path), error_lines)

    async def discard_interrupted_restore(self, spec: LaunchSpec, keep: ProcessIdentity | None) -> int | None:
        runc = self.runc or find_runc()
        if runc is None:
            return None
        killed = None
        for container in await self._list_containers(runc, spec.job_id):
            pid = container.get("pid") or 0
            if keep is not None and pid == keep.pid:
                continue
            if pid > 0 and container.get("status") != "stopped":
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed = killed or pid
                except ProcessLookupError:
                    pass
            await self._delete_container(runc, container["id"])
        return killed

    async def wait(self, spec: LaunchSpec, process: ProcessIdentity) -> ExitStatus:
        runc = self.runc or find_runc()
        container_id = self._containers.get(process.pid)
        if container_id is None and runc is not None:
            container_id = await self._find_container(runc, spec.job_id, process.pid)

        wait_status = await procfs.wait_for_exit(process)
        status = read_exit_status(spec.files, wait_status)
        killed_by_kernel = status.signal == signal.SIGKILL or not status.reported
        if killed_by_kernel and self.job_cgroup(spec).out_of_memory_kills() > 0:
            status = dataclasses.replace(status, out_of_memory=True)

        # A dump without --leave-running has deleted the container already.
        self._containers.pop(process.pid, None)
        if container_id is not None and runc is not None:
            await self._delete_container(runc, container_id)
        return status

    async def cleanup(self, spec: LaunchSpec) -> None:
        runc = self.runc or find_runc()
        if runc is not None:
            for container in await self._list_containers(runc, spec.job_id):
                await self._delete_container(runc, container["id"])
        await super().cleanup(spec)

    async def _list_containers(self, runc: str, job_id: str) -> list[dict]:
        """Return runc's state ({"id", "pid", "status", ...}) of every container of the job."""
        completed = await asyncio.to_thread(
            subprocess.run, self._runc_command(runc, "list", "--format", "json"), capture_output=True, text=True, timeout=RUNC_TIMEOUT_SECONDS
        )
        if completed.returncode != 0:
            logger.error("job %s: runc list failed: %s", job_id, completed.stderr.strip())
            return []
        containers = json.loads(completed.stdout or "null") or []
        return [container for container in containers if container["id"].startswith(container_prefix(job_id))]

    async def _find_container(self, runc: str, job_id: str, pid: int) -> str | None:
        known = self._containers.get(pid)
        if known is not None:
            return known
        for container in await self._list_containers(runc, job_id):
            if container.get("pid") == pid:
                self._containers[pid] = container["id"]
                return container["id"]
        return None

    async def _delete_container(self, runc: str, container_id: str) -> None:
        """Delete the container (killing what is left of it) and its bundle; a container runc no longer has is fine."""
        completed = await asyncio.to_thread(
            subprocess.run, self._runc_command(runc, "delete", "--force", container_id), capture_output=True, text=True, timeout=RUNC_TIMEOUT_SECONDS
        )
        message = completed.stderr.strip()
        if completed.returncode != 0 and "does not exist" not in message:
            logger.error("runc delete of container %s failed: %s", container_id, message)
        shutil.rmtree(BUNDLES_DIR / container_id, ignore_errors=True)


def write_criu_config(path: Path, options: list[str]) -> None:
    """Write CRIU's configuration file: one long option (without the dashes) per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text("".join(f"{option}\n" for option in options))
    os.replace(staging, path)


def runc_work_path(log_path: Path) -> Path:
    """Return the directory where runc makes CRIU write its log, next to the log's final place."""
    return log_path.with_name(log_path.name + ".runc")


def read_pid_file(pid_file: Path) -> ProcessIdentity | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return procfs.identify(pid)


async def run_runc(command: list[str], output_path: Path, timeout: float) -> tuple[int, str]:
    """Run a runc command with its output appended to `output_path`; return its exit code and that output."""
    with open(output_path, "ab") as output_file:
        start = output_file.tell()
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=output_file, close_fds=True
        )
        try:
            returncode = await asyncio.wait_for(process.wait(), timeout)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            return -1, f"runc did not finish within {timeout:g} s"
    with open(output_path, "rb") as output_file:
        output_file.seek(start)
        return returncode, output_file.read().decode(errors="replace").strip()
