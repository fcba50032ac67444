"""The `process` runtime: each job in its own PID and mount namespace on the host.

Layout of a running job, as seen from the host::

    bwrap                          (host process, only until the first restore)
      └─ pidinit.py                PID 1 of the namespace, session leader
           └─ the job's command    PID 2, stdout/stderr appended to log files

Own PID namespace: a restored job gets back the PIDs it had, which would clash
with any process (even a zombie) using them. In a fresh namespace they are
free, so the same image can be restored several times at once.

Own mount namespace: bubblewrap bind-mounts the whole host filesystem, and the
job's directory at JOB_MOUNT on top. Every path of the job's own files (logs,
exit status, work directory, identity) is therefore the same for every job and
every copy, and a restore decides which host directory is mounted there. That
is what lets a fork run from another job's image with its own files. CRIU
treats the host bind mounts as external and mounts them again on restore, so
isolatemounts.py first freezes the job's mount table (see there). A host
mount that existed when the job started must still exist when it is restored.

The namespace init is the root of every dump. After `criu restore -d` the
restored init is re-parented to the nearest child subreaper, which is the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

from checker.errors import CheckerError, ErrorCode
from checker.runtimes import procfs, worksnapshot
from checker.runtimes.base import ExitStatus, JobFiles, LaunchSpec, Runtime, read_exit_status
from checker.runtimes.cgroups import MIB, CgroupLayout, JobCgroup, Limits, detect_layout, image_memory_bytes
from checker.runtimes.criu import DEFAULT_TIMEOUT_SECONDS, Criu, run_criu
from checker.runtimes.procfs import ProcessIdentity
from checker.sdk.client import ENV_IDENTITY_FILE

logger = logging.getLogger(__name__)

PIDINIT = Path(__file__).with_name("pidinit.py")
ISOLATE_MOUNTS = Path(__file__).with_name("isolatemounts.py")
START_TIMEOUT_SECONDS = 10.0

SNAPSHOT_SCRIPT = Path(worksnapshot.__file__).with_suffix(".sh")
"""CRIU's action script: archives the work directory while the job is frozen (see worksnapshot.py)."""
LAUNCHER_LOG = "launcher.log"
JOB_MOUNT = Path("/run/checker/job")
"""Path of each job's own directory inside its mount namespace; an empty directory on the host."""
JOB_MOUNT_KEY = "checker-job"
"""CRIU's name for the job directory's mount, which each restore maps to a host directory."""
INSIDE = JobFiles.under(JOB_MOUNT)

# Options used on every dump and restore:
#   --tcp-close   connections are not frozen; a restored copy finds them closed
#                 and re-opens them (the SDK retries its pending call).
#   --link-remap  open files that were unlinked (tempfile.TemporaryFile) are
#                 dumped through a temporary link instead of failing the dump.
#   --external mnt[]  bind mounts of host directories are external: CRIU
#                 records their source instead of their contents, and on restore
#                 mounts the same host paths again, except the job directory,
#                 which each restore maps through JOB_MOUNT_KEY.
DUMP_OPTIONS = ["--tcp-close", "--link-remap", "--external", "mnt[]", "--external", f"mnt[{JOB_MOUNT}]:{JOB_MOUNT_KEY}"]
RESTORE_OPTIONS = ["--tcp-close", "--restore-detached", "--external", "mnt[]"]


def launch_command(job_dir: Path, command: list[str]) -> list[str]:
    """Return the bwrap command that runs `command` as a job whose directory is `job_dir`."""
    return [
        "bwrap", "--unshare-pid", "--as-pid-1", "--new-session",
        "--dev-bind", "/", "/", "--bind", str(job_dir), str(JOB_MOUNT), "--chdir", str(INSIDE.work_dir),
        "--",
        sys.executable, "-I", "-S", str(ISOLATE_MOUNTS), str(JOB_MOUNT), "--",
        sys.executable, "-I", "-S", str(PIDINIT),
        str(INSIDE.stdout_path), str(INSIDE.stderr_path), str(INSIDE.exit_status_path), str(INSIDE.work_dir),
        "--", *command,
    ]


def validate_command_and_env(config: dict) -> None:
    """Raise ValueError when the `command` or `env` of a runtime configuration is invalid."""
    command = config.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(part, str) and part for part in command):
        raise ValueError("runtime.command must be a non-empty list of non-empty strings, e.g. [\"python3\", \"job.py\"]")
    env = config.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("runtime.env must be an object of string values")


def restore_options(job_dir: Path, root: Path = Path("/")) -> list[str]:
    """Return the options of a `criu restore` that mounts `job_dir` as the restored job's directory.

    `root` becomes the restored job's root directory.
    """
    return [*RESTORE_OPTIONS, "--root", str(root), "--external", f"mnt[{JOB_MOUNT_KEY}]:{job_dir}"]


# Joins the cgroups whose cgroup.procs files come before "--", then runs the
# command after it, so bwrap and everything it starts begin inside the cgroups.
JOIN_CGROUPS_SCRIPT = 'while [ "$1" != "--" ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def join_cgroups_command(procs_files: list[Path], command: list[str]) -> list[str]:
    """Return `command` prefixed with a shell that first moves itself into the given cgroups."""
    return ["/bin/sh", "-c", JOIN_CGROUPS_SCRIPT, "sh", *(str(path) for path in procs_files), "--", *command]


class ProcessRuntime(Runtime):
    """Jobs as host processes in their own PID namespace, checkpointed with CRIU."""

    type_name = "process"

    def __init__(self, criu: Criu, criu_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, cgroup_layout: CgroupLayout | None = None) -> None:
        self.criu = criu
        self.criu_timeout_seconds = criu_timeout_seconds
        self.cgroup_layout = cgroup_layout if cgroup_layout is not None else detect_layout()
        self._launchers: dict[int, subprocess.Popen] = {}

    allowed_config_keys = frozenset({"command", "env"})

    def validate_config(self, config: dict) -> None:
        unknown = sorted(set(config) - self.allowed_config_keys)
        if unknown:
            raise ValueError(f"runtime.{unknown[0]} is not an option of the {self.type_name} runtime; its options are {', '.join(sorted(self.allowed_config_keys))}")
        validate_command_and_env(config)

    def validate_limits(self, limits: Limits) -> None:
        """Raise ValueError when this machine has no cgroup controller for a limit in `limits`."""
        missing = self.cgroup_layout.missing(limits.requested_controllers())
        if missing:
            raise ValueError(
                f"limits need the cgroup controller(s) {', '.join(missing)}, which this machine does not provide "
                f"(cgroup layout: {self.cgroup_layout.describe()}); remove those limits or enable the controllers"
            )

    def job_cgroup(self, spec: LaunchSpec) -> JobCgroup:
        return JobCgroup(self.cgroup_layout, spec.job_id)

    def launch_command(self, spec: LaunchSpec) -> list[str]:
        """Return the command that starts the job's namespace init and, under it, the job's command."""
        return launch_command(spec.files.job_dir, spec.command)

    def launch_env(self, spec: LaunchSpec) -> dict[str, str]:
        return {**spec.env, ENV_IDENTITY_FILE: str(INSIDE.identity_path)}

    def prepare_restore_root(self, spec: LaunchSpec) -> Path:
        """Return the directory that becomes the restored job's root; the host's root here."""
        return Path("/")

    async def _create_cgroup(self, spec: LaunchSpec, code: ErrorCode, context: str) -> JobCgroup:
        cgroup = self.job_cgroup(spec)
        try:
            await asyncio.to_thread(cgroup.create, spec.limits)
        except (OSError, RuntimeError) as error:
            raise CheckerError(code, f"{context} failed: cannot set up the job's cgroup with limits {spec.limits.to_json() or 'none'}: {error}") from error
        return cgroup

    async def start(self, spec: LaunchSpec) -> ProcessIdentity:
        files = spec.files
        files.work_dir.mkdir(parents=True, exist_ok=True)
        files.exit_status_path.unlink(missing_ok=True)

        JOB_MOUNT.mkdir(parents=True, exist_ok=True)
        cgroup = await self._create_cgroup(spec, ErrorCode.START_FAILED, f"start of job {spec.job_id}")
        command = join_cgroups_command(cgroup.procs_files(), self.launch_command(spec))
        try:
            with open(files.job_dir / LAUNCHER_LOG, "wb") as launcher_log:
                launcher = subprocess.Popen(
                    command,
                    env=self.launch_env(spec),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=launcher_log,
                    close_fds=True,
                    start_new_session=True,
                )
        except OSError as error:
            raise CheckerError(
                ErrorCode.START_FAILED, f"start of job {spec.job_id} failed: cannot run bwrap: {error}; install bubblewrap (apt-get install bubblewrap)"
            ) from error

        init = await self._find_namespace_init(spec, launcher)
        self._launchers[init.pid] = launcher
        return init

    async def _find_namespace_init(self, spec: LaunchSpec, launcher: subprocess.Popen) -> ProcessIdentity:
        """Return the namespace init, which bwrap starts as its only child."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_SECONDS
        while loop.time() < deadline:
            for child in procfs.list_children(launcher.pid):
                identity = procfs.identify(child)
                if identity is not None:
                    return identity
            if launcher.poll() is not None:
                output = (spec.files.job_dir / LAUNCHER_LOG).read_text(errors="replace").strip() or "no output"
                raise CheckerError(
                    ErrorCode.START_FAILED,
                    f"start of job {spec.job_id} failed: bwrap exited with {launcher.returncode} ({output}); "
                    "creating PID and mount namespaces needs root (CAP_SYS_ADMIN)",
                )
            await asyncio.sleep(0.005)

        launcher.kill()
        raise CheckerError(ErrorCode.START_FAILED, f"start of job {spec.job_id} failed: no namespace init after {START_TIMEOUT_SECONDS:.0f} s")

    async def checkpoint(self, spec: LaunchSpec, process: ProcessIdentity, image_dir: Path, *, leave_running: bool, log_path: Path, context: str) -> None:
        command = self._job_command(process)
        if command is None or spec.files.exit_status_path.exists():
            raise CheckerError(ErrorCode.CHECKPOINT_FAILED, f"{context} failed: the job's command has already exited")

        arguments = ["dump", "--tree", str(process.pid), "--images-dir", str(image_dir), *DUMP_OPTIONS, "--action-script", str(SNAPSHOT_SCRIPT)]
        if leave_running:
            arguments.append("--leave-running")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        snapshot_env = {
            "CHECKER_PYTHON": sys.executable,
            worksnapshot.ENV_WORK_DIR: str(spec.files.work_dir),
            worksnapshot.ENV_SNAPSHOT: str(image_dir / worksnapshot.SNAPSHOT_NAME),
        }

        def init_exiting() -> str | None:
            return "the job's process died during the dump" if procfs.is_exiting(process) else None

        await run_criu(
            self.criu,
            arguments,
            log_path,
            ErrorCode.CHECKPOINT_FAILED,
            context,
            timeout=self.criu_timeout_seconds,
            abandon_when=init_exiting,
            env=snapshot_env,
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
        check_image_fits(spec, image_dir, context)
        await put_back_work_dir(spec, image_dir, context)

        log_path.parent.mkdir(parents=True, exist_ok=True)
        pid_file = spec.files.job_dir / "restored.pid"
        pid_file.unlink(missing_ok=True)
        JOB_MOUNT.mkdir(parents=True, exist_ok=True)
        cgroup = await self._create_cgroup(spec, ErrorCode.RESTORE_FAILED, context)
        root = await asyncio.to_thread(self.prepare_restore_root, spec)
        arguments = [
            "restore", "--images-dir", str(image_dir), *restore_options(spec.files.job_dir, root), *cgroup.criu_restore_options(), "--pidfile", str(pid_file)
        ]
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

        if not mounts_job_dir(pid, spec.files.job_dir):
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

        status = read_exit_status(spec.files, wait_status)
        killed_by_kernel = status.signal == signal.SIGKILL or not status.reported
        if killed_by_kernel and self.job_cgroup(spec).out_of_memory_kills() > 0:
            status = dataclasses.replace(status, out_of_memory=True)
        return status

    async def cleanup(self, spec: LaunchSpec) -> None:
        (spec.files.job_dir / "restored.pid").unlink(missing_ok=True)
        try:
            await asyncio.to_thread(self.job_cgroup(spec).remove)
        except (OSError, RuntimeError) as error:
            logger.error("job %s: cannot remove its cgroup: %s", spec.job_id, error)


async def put_back_work_dir(spec: LaunchSpec, image_dir: Path, context: str) -> None:
    """Replace the job's work directory with the image's archive of it, and clear the old exit status."""
    try:
        await asyncio.to_thread(worksnapshot.put_back_work_dir, image_dir, spec.files.work_dir)
    except (OSError, tarfile.TarError) as error:
        raise CheckerError(ErrorCode.RESTORE_FAILED, f"{context} failed: cannot put back the work directory from {image_dir / worksnapshot.SNAPSHOT_NAME}: {error}") from error
    spec.files.exit_status_path.unlink(missing_ok=True)


def check_image_fits(spec: LaunchSpec, image_dir: Path, context: str) -> None:
    """Reject a restore whose image has more memory pages than the job's memory limit.

    Without this check CRIU would start the restore and the kernel would kill
    it half-way with the OOM killer, which reads as a crash.
    """
    check_image_fits_bytes(spec, image_memory_bytes(image_dir), context)


def check_image_fits_bytes(spec: LaunchSpec, pages: int, context: str) -> None:
    """Reject a restore of an image with `pages` bytes of memory pages above the job's memory limit."""
    limit = spec.limits.memory_bytes
    if limit is None:
        return
    if pages > limit:
        raise CheckerError(
            ErrorCode.RESTORE_FAILED,
            f"{context} rejected: the image holds {pages / MIB:.1f} MiB of memory pages, more than the job's memory limit of "
            f"{limit / MIB:.1f} MiB; raise limits.memory_mib above {math.ceil(pages / MIB)}",
        )


def mounts_job_dir(pid: int, job_dir: Path) -> bool:
    """Return whether process `pid` has `job_dir` mounted at JOB_MOUNT, which makes it a process of that job."""
    try:
        seen = os.stat(f"/proc/{pid}/root{JOB_MOUNT}")
        expected = os.stat(job_dir)
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return False
    return (seen.st_dev, seen.st_ino) == (expected.st_dev, expected.st_ino)
