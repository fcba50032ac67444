"""Locating and running the CRIU binary.

Checker needs CRIU 4.2 or newer: older releases cannot dump a process that holds
an inet socket on kernels 6.16 and newer (SO_PASSCRED changed), and Debian 12's
criu 3.17 also fails `criu check` there. `scripts/install-criu.sh` installs a
good build under the project prefix.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from checker.errors import CriuError, ErrorCode

ENV_CRIU = "CHECKER_CRIU"
ENV_PREFIX = "CHECKER_PREFIX"
DEFAULT_PREFIX = "/opt/checker"
MIN_VERSION = (4, 2)
MAX_ERROR_LINES = 3
DEFAULT_TIMEOUT_SECONDS = 1800.0
"""Maximum seconds one CRIU run may take. At the slowest dump rate measured on a 2-vCPU VM (4.2 s/GiB), 24 GiB would take an estimated 100 s."""
WATCH_INTERVAL_SECONDS = 0.05
ABANDON_GRACE_SECONDS = 1.0


class CriuNotFoundError(Exception):
    """No usable CRIU binary was found; the message says how to install one."""


@dataclass(frozen=True)
class Criu:
    """A CRIU binary that reported a supported version."""

    path: Path
    version: str


def parse_version(text: str) -> tuple[int, ...] | None:
    """Parse the `Version: X.Y[.Z]` line of `criu --version`."""
    match = re.search(r"^Version:\s*([0-9]+(?:\.[0-9]+)*)", text, re.MULTILINE)
    if match is None:
        return None
    return tuple(int(part) for part in match.group(1).split("."))


def read_version(path: Path) -> str | None:
    """Run `criu --version` and return the version string, or None when it fails."""
    try:
        completed = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = parse_version(completed.stdout)
    return ".".join(str(part) for part in version) if version else None


def candidate_paths(configured: str | None = None) -> list[tuple[str, Path]]:
    """List where CRIU is looked for, in order: the setting, the project prefix, PATH."""
    candidates: list[tuple[str, Path]] = []
    if configured:
        candidates.append(("setting --criu", Path(configured)))
    elif os.environ.get(ENV_CRIU):
        candidates.append((f"setting {ENV_CRIU}", Path(os.environ[ENV_CRIU])))

    prefix = Path(os.environ.get(ENV_PREFIX, DEFAULT_PREFIX))
    candidates.append(("project prefix", prefix / "bin" / "criu"))

    on_path = shutil.which("criu")
    if on_path:
        candidates.append(("PATH", Path(on_path)))
    return candidates


def find_criu(configured: str | None = None) -> Criu:
    """Return the first CRIU >= 4.2 among the candidates, or raise CriuNotFoundError.

    A configured path that is missing or too old is an error rather than a
    reason to fall through, so a typo in the setting never silently picks a
    different binary.
    """
    rejected: list[str] = []
    for origin, path in candidate_paths(configured):
        if not path.exists():
            if origin.startswith("setting"):
                raise CriuNotFoundError(f"CRIU path {path} from {origin} does not exist; fix the setting or unset it")
            continue
        if not path.is_file() or not os.access(path, os.X_OK):
            problem = f"CRIU path {path} from {origin} is not an executable file"
            if origin.startswith("setting"):
                raise CriuNotFoundError(f"{problem}; point it at the criu binary")
            rejected.append(problem)
            continue

        version = read_version(path)
        if version is None or tuple(int(p) for p in version.split(".")) < MIN_VERSION:
            problem = f"{path} ({origin}) reports version {version or 'unknown'}, older than 4.2"
            if origin.startswith("setting"):
                raise CriuNotFoundError(f"CRIU {problem}; point the {origin.removeprefix('setting ')} setting at CRIU 4.2 or newer, e.g. one built by scripts/install-criu.sh")
            rejected.append(problem)
            continue

        return Criu(path=path, version=version)

    details = "; ".join(rejected) if rejected else "none found"
    raise CriuNotFoundError(
        f"no CRIU 4.2 or newer ({details}); run scripts/install-criu.sh as root, or set {ENV_CRIU} to a CRIU binary"
    )


def first_error_lines(log_path: Path, limit: int = MAX_ERROR_LINES) -> list[str]:
    """Return the first `Error` lines of a CRIU log, without the timestamp prefix."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []

    lines = []
    for line in text.splitlines():
        # CRIU 4.x logs this on every run here and goes on; it is never the cause.
        if "Error" in line and "RLIMIT_NOFILE" not in line:
            lines.append(re.sub(r"^\(\s*[0-9.]+\)\s*", "", line).strip())
            if len(lines) >= limit:
                break
    return lines


async def run_criu(
    criu: Criu,
    arguments: list[str],
    log_path: Path,
    code: ErrorCode,
    context: str,
    *,
    timeout: float | None = None,
    abandon_when: Callable[[], str | None] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run CRIU with its log at `log_path`; raise CriuError naming `context` on failure.

    `context` names the operation, job and checkpoint ("dump of job 3f2a,
    checkpoint 7"), so the error reads on its own in logs and API answers.
    `env` adds variables to CRIU's environment, for its action scripts.

    CRIU is killed when it runs longer than `timeout` seconds, or when
    `abandon_when()` returns a reason and CRIU has not ended
    ABANDON_GRACE_SECONDS later. The second guards against a deadlock seen
    with CRIU 4.2.1 on Linux 6.18. A dump whose namespace init gets SIGKILL
    waits in wait4() for the init, while the init waits in the kernel for a
    zombie that only CRIU, its tracer, can release. Killing CRIU detaches it
    and lets the init exit.
    """
    command = [str(criu.path), *arguments, "--log-file", str(log_path)]
    run = await run_watched(command, timeout=timeout, abandon_when=abandon_when, env=env)
    if run.abandoned is not None:
        message = f"{context} failed: {run.abandoned}, so CRIU was stopped (log: {log_path})"
        raise CriuError(code, message, str(log_path), first_error_lines(log_path))
    if run.returncode == 0:
        return

    error_lines = first_error_lines(log_path)
    if not error_lines:
        error_lines = [line for line in run.stderr.splitlines() if line][:MAX_ERROR_LINES]
    reported = "; ".join(f"'{line}'" for line in error_lines) or "no error lines in its log"
    message = f"{context} failed: CRIU exited with {run.returncode} and reported {reported} (log: {log_path})"
    raise CriuError(code, message, str(log_path), error_lines)


@dataclass(frozen=True)
class WatchedRun:
    """Outcome of a command run under the watchdog of run_watched()."""

    returncode: int | None
    """Exit code, or None when the watchdog killed the command."""

    stderr: str

    abandoned: str | None
    """Reason the watchdog killed the command, or None when it ended by itself."""


async def run_watched(
    command: list[str],
    *,
    timeout: float | None,
    abandon_when: Callable[[], str | None] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> WatchedRun:
    """Run CRIU, or a program that runs CRIU (runc, podman), killing it as run_criu() describes."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        close_fds=True,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
    )
    communication = asyncio.ensure_future(process.communicate())
    abandoned = await _watch_criu(communication, timeout, abandon_when)
    if abandoned is not None:
        process.kill()
        await asyncio.wait({communication})
        return WatchedRun(returncode=None, stderr="", abandoned=abandoned)

    _, stderr = communication.result()
    return WatchedRun(returncode=process.returncode, stderr=stderr.decode(errors="replace").strip(), abandoned=None)


async def _watch_criu(communication: asyncio.Future, timeout: float | None, abandon_when: Callable[[], str | None] | None) -> str | None:
    """Wait for CRIU to end; return why it must be killed instead, or None once it has ended."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        done, _ = await asyncio.wait({communication}, timeout=WATCH_INTERVAL_SECONDS)
        if done:
            return None
        if deadline is not None and loop.time() >= deadline:
            return f"CRIU ran longer than {timeout:g} s"
        reason = abandon_when() if abandon_when is not None else None
        if reason is not None:
            done, _ = await asyncio.wait({communication}, timeout=ABANDON_GRACE_SECONDS)
            return None if done else f"{reason} and CRIU did not end within {ABANDON_GRACE_SECONDS:g} s"
