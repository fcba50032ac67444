"""The interface every runtime implements, and the data it exchanges with the runner."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from checker.runtimes.cgroups import Limits
from checker.runtimes.procfs import ProcessIdentity


INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
"""Variables the server copies from its own environment into every job's; anything else, such as its credentials, stays out."""


@dataclass(frozen=True)
class JobFiles:
    """Paths of one job's files, on the host or as the job sees them inside its mount namespace."""

    job_dir: Path
    """Directory with everything below; removed by cleanup."""

    work_dir: Path
    """The job's current directory."""

    stdout_path: Path
    stderr_path: Path

    exit_status_path: Path
    """JSON file the job's init writes when the job exits: {"exit_code": N} or {"signal": N}."""

    @property
    def identity_path(self) -> Path:
        """JSON file with the job's id and token, which the SDK reads before each call."""
        return self.job_dir / "identity.json"

    @property
    def api_socket_path(self) -> Path:
        """Unix socket on which the server serves the runtime API to this job, for runtimes without a network."""
        return self.job_dir / "api.sock"

    @classmethod
    def under(cls, job_dir: Path) -> "JobFiles":
        return cls(
            job_dir=job_dir,
            work_dir=job_dir / "work",
            stdout_path=job_dir / "stdout.log",
            stderr_path=job_dir / "stderr.log",
            exit_status_path=job_dir / "exit-status.json",
        )


def write_identity(files: JobFiles, job_id: str, token: str) -> None:
    """Write the identity file the SDK reads, readable by its owner only, replacing any old one atomically."""
    files.job_dir.mkdir(parents=True, exist_ok=True)
    staging = files.identity_path.with_suffix(".tmp")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as identity_file:
        json.dump({"job_id": job_id, "token": token}, identity_file)
    os.replace(staging, files.identity_path)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a runtime needs to start or restore one job."""

    job_id: str
    command: list[str]
    env: dict[str, str]
    """Complete environment of the job, Checker's variables included."""
    files: JobFiles
    config: dict = field(default_factory=dict)
    """The runtime's own configuration from the job definition."""
    limits: Limits = field(default_factory=Limits)
    """Resource limits of the job: its definition's, with the spawn's overrides applied."""


@dataclass(frozen=True)
class ExitStatus:
    """Exit status of a job's process."""

    exit_code: int | None
    """Exit code of the job's command, when it exited normally."""

    signal: int | None
    """Signal that killed the job's command or its init, when one did."""

    reported: bool
    """True when the job's init recorded the status; False when the init itself died (a crash)."""

    out_of_memory: bool = False
    """True when the kernel's OOM killer ended the job's command or its init at its memory limit."""

    @property
    def crashed(self) -> bool:
        return not self.reported


def read_exit_status(files: JobFiles, wait_status: int | None) -> ExitStatus:
    """Combine the init's exit-status file with the wait status, when there is one.

    The file is the primary source: the job's command may have exited while
    the runner was down. Without the file the init itself was killed (for
    example by SIGKILL), which counts as a crash.
    """
    try:
        recorded = json.loads(files.exit_status_path.read_text())
    except (FileNotFoundError, ValueError):
        recorded = None

    if isinstance(recorded, dict):
        return ExitStatus(exit_code=recorded.get("exit_code"), signal=recorded.get("signal"), reported=True)

    signal_number = None
    if wait_status is not None:
        if os.WIFSIGNALED(wait_status):
            signal_number = os.WTERMSIG(wait_status)
    return ExitStatus(exit_code=None, signal=signal_number, reported=False)


class Runtime(ABC):
    """Starts, checkpoints, restores and stops jobs of one runtime type."""

    type_name: str

    def uses_job_socket(self, config: dict) -> bool:
        """Return whether a job with runtime configuration `config` reaches the server only through its own unix socket.

        That socket is JobFiles.api_socket_path. The server listens on it
        while the job runs, and stops listening and aborts the job's
        connections while it checkpoints or restores the job.
        """
        return False

    def launch_details(self, config: dict) -> dict:
        """Return facts about how jobs of `config` run here, for their events; "summary" is a sentence for people."""
        return {}

    @abstractmethod
    async def start(self, spec: LaunchSpec) -> ProcessIdentity:
        """Start the job from the beginning."""

    @abstractmethod
    async def checkpoint(self, spec: LaunchSpec, process: ProcessIdentity, image_dir: Path, *, leave_running: bool, log_path: Path, context: str) -> None:
        """Write the job's image to `image_dir`; stop the job unless `leave_running`.

        CRIU's log goes to `log_path`; `context` names the job and checkpoint in errors.
        """

    @abstractmethod
    async def restore(self, spec: LaunchSpec, image_dir: Path, *, log_path: Path, context: str, leave_stopped: bool = False) -> ProcessIdentity:
        """Start a copy of the job from the image in `image_dir`, detached.

        With `leave_stopped` every process of the copy stays stopped until `resume()`.
        """

    @abstractmethod
    async def resume(self, process: ProcessIdentity) -> None:
        """Let a copy restored with `leave_stopped` run."""

    @abstractmethod
    async def discard_interrupted_restore(self, spec: LaunchSpec, keep: ProcessIdentity | None) -> int | None:
        """Kill a copy left by a restore that a server crash interrupted; return its PID, if any.

        `keep` is the job's current process, which is never killed.
        """

    @abstractmethod
    async def kill(self, process: ProcessIdentity) -> None:
        """Kill the job and every process of it."""

    @abstractmethod
    async def wait(self, spec: LaunchSpec, process: ProcessIdentity) -> ExitStatus:
        """Wait until the job's process ends."""

    @abstractmethod
    async def cleanup(self, spec: LaunchSpec) -> None:
        """Remove what the runtime created for the job, keeping logs."""

    def validate_config(self, config: dict) -> None:
        """Raise ValueError with a message naming the field when `config` is invalid."""

    def validate_limits(self, limits: Limits) -> None:
        """Raise ValueError when this runtime cannot enforce `limits` on this machine."""
