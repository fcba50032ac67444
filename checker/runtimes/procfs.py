"""Process identity and exit notification through /proc and pidfds."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import signal
from dataclasses import dataclass

PR_SET_CHILD_SUBREAPER = 36
PF_EXITING = 0x4
"""Kernel task flag (field 9 of /proc/PID/stat): the task has entered do_exit()."""


@dataclass(frozen=True)
class ProcessIdentity:
    """A process on the host, identified so that a reused PID is never mistaken for it."""

    pid: int
    """PID in the host's PID namespace (the job's namespace init)."""

    start_time: int
    """Start time in clock ticks after boot (field 22 of /proc/PID/stat)."""


def read_stat_fields(pid: int) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name (field 3 on), or None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None

    # The command name in field 2 may contain spaces and parentheses, so split after its last ')'.
    return stat[stat.rindex(")") + 2 :].split()


def read_start_time(pid: int) -> int | None:
    """Return the process's start time in clock ticks, or None when it does not exist."""
    fields = read_stat_fields(pid)
    return None if fields is None else int(fields[19])


def read_state(pid: int) -> str | None:
    """Return the one-letter process state (R, S, Z, ...), or None when it does not exist."""
    fields = read_stat_fields(pid)
    return None if fields is None else fields[0]


def identify(pid: int) -> ProcessIdentity | None:
    start_time = read_start_time(pid)
    return None if start_time is None else ProcessIdentity(pid, start_time)


def is_alive(identity: ProcessIdentity) -> bool:
    """Return whether the same process (same PID and start time) still runs and is not a zombie."""
    if read_start_time(identity.pid) != identity.start_time:
        return False
    return read_state(identity.pid) not in (None, "Z", "X")


def is_exiting(identity: ProcessIdentity) -> bool:
    """Return whether the process is gone or has begun to exit.

    A namespace init that got SIGKILL stays in do_exit() until every process
    of its namespace is reaped, so it neither runs nor is a zombie yet; the
    PF_EXITING flag distinguishes that state from a sleeping process.
    """
    fields = read_stat_fields(identity.pid)
    if fields is None or int(fields[19]) != identity.start_time:
        return True
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & PF_EXITING)


def kill_if_alive(identity: ProcessIdentity) -> None:
    """Send SIGKILL to the process unless it has exited or its PID now belongs to another process."""
    if not is_alive(identity):
        return
    try:
        os.kill(identity.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def become_child_subreaper(enabled: bool = True) -> None:
    """Make this process adopt orphaned descendants, such as jobs restored by `criu restore -d`; `enabled=False` stops that."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(code)}")


def list_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children_file:
            return [int(child) for child in children_file.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def list_descendants(pid: int) -> list[int]:
    """Return `pid` and all its descendants, parents before children."""
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        try:
            threads = os.listdir(f"/proc/{current}/task")
        except FileNotFoundError:
            threads = []
        for thread in threads:
            try:
                with open(f"/proc/{current}/task/{thread}/children") as children_file:
                    found.extend(int(child) for child in children_file.read().split())
            except FileNotFoundError:
                continue
        index += 1
    return found


async def wait_for_exit(identity: ProcessIdentity) -> int | None:
    """Wait until the process exits; return its wait status when it was our child, else None.

    A pidfd works for any process, also one adopted from a previous server
    that is not our child. When it is our child, it is reaped here so no
    zombie is left behind.
    """
    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return None

    try:
        if read_start_time(identity.pid) == identity.start_time:
            loop = asyncio.get_running_loop()
            exited = loop.create_future()
            loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)

    return reap(identity.pid)


def reap(pid: int) -> int | None:
    """Collect the exit status of an exited child; None when it is not our child."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    except OSError as error:
        if error.errno == errno.ECHILD:
            return None
        raise
    return status if reaped == pid else None
