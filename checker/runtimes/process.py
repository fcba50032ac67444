"""The `process` runtime: each job in its own PID namespace on the host.

Layout of a running job, as seen from the host::

    unshare --pid --fork           (host process, only until the first restore)
      └─ pidinit.py                PID 1 of the namespace, session leader
           └─ the job's command    PID 2, stdout/stderr appended to log files

Own PID namespace: a restored job gets back the PIDs it had, which would clash
with any process (even a zombie) using them; in a fresh namespace they are free,
so the same image can be restored several times at once (its copies share the
job's log and exit-status paths, which are part of the image). The namespace init is
the root of every dump. After `criu restore -d` the restored init is re-parented
to the nearest child subreaper, which is the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from checker.errors import CheckerError, ErrorCode
from checker.runtimes import procfs
from checker.runtimes.base import ExitStatus, LaunchSpec, Runtime, read_exit_status
from checker.runtimes.criu import DEFAULT_TIMEOUT_SECONDS, Criu, run_criu
from checker.runtimes.procfs import ProcessIdentity

logger = logging.getLogger(__name__)

PIDINIT = Path(__file__).with_name("pidinit.py")
START_TIMEOUT_SECONDS = 10.0

# Options used on every dump and restore:
#   --tcp-close   connections are not frozen; a restored copy finds them closed
#                 and re-opens them (the SDK retries its pending call).
#   --link-remap  open files that were unlinked (tempfile.TemporaryFile) are
#                 dumped through a temporary link instead of failing the dump.
DUMP_OPTIONS = ["--tcp-close", "--link-remap"]
RESTORE_OPTIONS = ["--tcp-close", "--restore-detached"]


class ProcessRuntime(Runtime):
    """Jobs as host processes in their own PID namespace, checkpointed with CRIU."""

    type_name = "process"

    def __init__(self, criu: Criu, criu_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.criu = criu
        self.criu_timeout_seconds = criu_timeout_seconds
        self._launchers: dict[int, subprocess.Popen] = {}

    def validate_config(self, config: dict) -> None:
        command = config.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(part, str) and part for part in command):
            raise ValueError("runtime.command must be a non-empty list of non-empty strings, e.g. [\"python3\", \"job.py\"]")
        env = config.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("runtime.env must be an object of string values")

    async def start(self, spec: LaunchSpec) -> ProcessIdentity:
        files = spec.files
        files.work_dir.mkdir(parents=True, exist_ok=True)
        files.exit_status_path.unlink(missing_ok=True)

        command = [
            "unshare", "--pid", "--fork", "--",
            sys.executable, "-I", "-S", str(PIDINIT),
            str(files.stdout_path), str(files.stderr_path), str(files.exit_status_path), str(files.work_dir),
            "--", *spec.command,
        ]
        try:
            launcher = subprocess.Popen(
                command,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as error:
            raise CheckerError(ErrorCode.START_FAILED, f"start of job {spec.job_id} failed: cannot run unshare: {error}") from error

        init = await self._find_namespace_init(spec, launcher)
        self._launchers[init.pid] = launcher
        return init

    async def _find_namespace_init(self, spec: LaunchSpec, launcher: subprocess.Popen) -> ProcessIdentity:
        """Return the namespace init that `unshare --fork` started as its only child."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_SECONDS
        while loop.time() < deadline:
            for child in procfs.list_children(launcher.pid):
                identity = procfs.identify(child)
                if identity is not None:
                    return identity
            if launcher.poll() is not None:
                raise CheckerError(
                    ErrorCode.START_FAILED,
                    f"start of job {spec.job_id} failed: unshare exited with {launcher.returncode}; "
                    "creating a PID namespace needs root (CAP_SYS_ADMIN)",
                )
            await asyncio.sleep(0.005)

        launcher.kill()
        raise CheckerError(ErrorCode.START_FAILED, f"start of job {spec.job_id} failed: no namespace init after {START_TIMEOUT_SECONDS:.0f} s")

    async def checkpoint(self, spec: LaunchSpec, process: ProcessIdentity, image_dir: Path, *, leave_running: bool, log_path: Path, context: str) -> None:
        command = self._job_command(process)
        if command is None or spec.files.exit_status_path.exists():
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the job's command has already exited")

        arguments = ["dump", "--tree", str(process.pid), "--images-dir", str(image_dir), *DUMP_OPTIONS]
        if leave_running:
            arguments.append("--leave-running")
        log_path.parent.mkdir(parents=True, exist_ok=True)

        def init_exiting() -> str | None:
            return "the job's process died during the dump" if procfs.is_exiting(process) else None

        await run_criu(
            self.criu, arguments, log_path, ErrorCode.CHECKPOINT_FAILED, context, timeout=self.criu_timeout_seconds, abandon_when=init_exiting
        )

        # A command that died while CRIU was dumping leaves an image of the init
        # alone, or of a zombie; restoring either would only end the job again.
        if leave_running and (spec.files.exit_status_path.exists() or not procfs.is_alive(command)):
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the job's command exited during the dump, so the image is incomplete")

    @staticmethod
    def _job_command(process: ProcessIdentity) -> ProcessIdentity | None:
        """Return the job's command: the init's oldest child (younger ones are re-parented orphans)."""
        children = [procfs.identify(pid) for pid in procfs.list_children(process.pid)]
        alive = [child for child in children if child is not None]
        return min(alive, key=lambda child: child.start_time) if alive else None

    async def restore(self, spec: LaunchSpec, image_dir: Path, *, log_path: Path, context: str, leave_stopped: bool = False) -> ProcessIdentity:
        spec.files.work_dir.mkdir(parents=True, exist_ok=True)
        spec.files.exit_status_path.unlink(missing_ok=True)

        log_path.parent.mkdir(parents=True, exist_ok=True)
        pid_file = spec.files.job_dir / "restored.pid"
        pid_file.unlink(missing_ok=True)
        arguments = ["restore", "--images-dir", str(image_dir), *RESTORE_OPTIONS, "--pidfile", str(pid_file)]
        if leave_stopped:
            arguments.append("--leave-stopped")
        await run_criu(self.criu, arguments, log_path, ErrorCode.RESTORE_FAILED, context, timeout=self.criu_timeout_seconds)

        pid = int(pid_file.read_text().strip())
        identity = procfs.identify(pid)
        if identity is None:
            raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: the restored process {pid} exited at once; see {spec.files.stderr_path}")
        return identity

    async def resume(self, process: ProcessIdentity) -> None:
        # SIGCONT resumes a stopped process even where the signal itself is
        # ignored, as it is for a namespace init without a handler.
        for pid in procfs.list_descendants(process.pid):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    async def discard_interrupted_restore(self, spec: LaunchSpec, keep: ProcessIdentity | None) -> int | None:
        # CRIU writes the pid file as soon as the copy exists; the server deletes
        # it before every restore. A copy named there that is not the job's
        # process was restored by a server that died before recording it.
        pid_file = spec.files.job_dir / "restored.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if keep is not None and pid == keep.pid:
            return None

        try:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            return None
        if str(spec.files.exit_status_path).encode() not in command_line:
            return None  # The PID was reused by an unrelated process.

        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        pid_file.unlink(missing_ok=True)
        return pid

    async def kill(self, process: ProcessIdentity) -> None:
        if not procfs.is_alive(process):
            return
        try:
            # SIGKILL to a namespace's init kills every process in the namespace.
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def wait(self, spec: LaunchSpec, process: ProcessIdentity) -> ExitStatus:
        wait_status = await procfs.wait_for_exit(process)

        launcher = self._launchers.pop(process.pid, None)
        if launcher is not None:
            # The unshare launcher exits right after the init; reap it.
            await asyncio.to_thread(launcher.wait)

        return read_exit_status(spec.files, wait_status)

    async def cleanup(self, spec: LaunchSpec) -> None:
        (spec.files.job_dir / "restored.pid").unlink(missing_ok=True)
