"""Resource limits of jobs through cgroups: memory, CPU quota and number of processes.

Every job gets its own cgroup, named after the job, under a `checker` group
at the top of each hierarchy that has one of the three controllers. The layout
is detected from /proc/self/mountinfo:

- v1: one hierarchy per controller (or a few controllers combined), e.g.
  /sys/fs/cgroup/memory/checker/JOB_ID;
- v2: one unified hierarchy, e.g. /sys/fs/cgroup/checker/JOB_ID, with the
  controllers enabled in the parents' cgroup.subtree_control;
- hybrid: both mounted. Each controller is used where it is attached, which
  on a hybrid machine is its v1 hierarchy, because a controller attached to
  v1 is missing from the v2 hierarchy's cgroup.controllers.

A job's cgroup is created again, empty and with fresh counters, before each
start and each restore. CRIU's `--cgroup-root CONTROLLER:/path` puts the
restored processes into it. CRIU then keeps the limits it finds there (in its
default `soft` mode it only writes properties of cgroups it creates itself).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CONTROLLERS = ("memory", "cpu", "pids")
GROUP_NAME = "checker"
"""Name of the group, at the top of each hierarchy, that contains one cgroup per job."""

CPU_PERIOD_MICROSECONDS = 100_000
"""CFS period that the CPU quota is a share of: the kernel's default, 100 ms."""

REMOVE_TIMEOUT_SECONDS = 5.0
REMOVE_INTERVAL_SECONDS = 0.02
MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Resource limits of one job; None leaves a resource unlimited."""

    memory_mib: int | None = None
    """Maximum memory in MiB (RAM and swap together), page cache included."""

    cpu_cores: float | None = None
    """CPU time per wall-clock second, in cores: 0.5 is half of one core."""

    pids: int | None = None
    """Maximum number of processes and threads, the namespace init included."""

    @classmethod
    def from_json(cls, data: dict | None) -> "Limits":
        data = data or {}
        return cls(memory_mib=data.get("memory_mib"), cpu_cores=data.get("cpu_cores"), pids=data.get("pids"))

    def to_json(self) -> dict:
        values = {"memory_mib": self.memory_mib, "cpu_cores": self.cpu_cores, "pids": self.pids}
        return {name: value for name, value in values.items() if value is not None}

    def merged_with(self, overrides: "Limits") -> "Limits":
        """Return these limits with every limit that `overrides` sets replaced."""
        return Limits(
            memory_mib=overrides.memory_mib if overrides.memory_mib is not None else self.memory_mib,
            cpu_cores=overrides.cpu_cores if overrides.cpu_cores is not None else self.cpu_cores,
            pids=overrides.pids if overrides.pids is not None else self.pids,
        )

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory_mib is None else self.memory_mib * MIB

    def requested_controllers(self) -> list[str]:
        requested = {"memory": self.memory_mib, "cpu": self.cpu_cores, "pids": self.pids}
        return [name for name, value in requested.items() if value is not None]


@dataclass(frozen=True)
class CgroupLayout:
    """Attachment of each controller to a cgroup hierarchy on this machine."""

    kind: str
    """"v1", "v2", "hybrid" or "none"."""

    v1_mounts: dict[str, Path] = field(default_factory=dict)
    """Controller name to the mount point of the v1 hierarchy it is attached to."""

    v2_mount: Path | None = None
    """Mount point of the unified (v2) hierarchy, if one is mounted."""

    v2_controllers: frozenset[str] = frozenset()
    """Controllers available in the v2 hierarchy (its root's cgroup.controllers)."""

    def version_of(self, controller: str) -> int | None:
        """Return 1 or 2 for where `controller` is usable, or None when it is usable nowhere."""
        if controller in self.v1_mounts:
            return 1
        if controller in self.v2_controllers:
            return 2
        return None

    def missing(self, controllers: list[str]) -> list[str]:
        return [name for name in controllers if self.version_of(name) is None]

    def describe(self) -> str:
        usable = [f"{name} (v{self.version_of(name)})" for name in CONTROLLERS if self.version_of(name) is not None]
        missing = self.missing(list(CONTROLLERS))
        text = f"{self.kind}; limits through {', '.join(usable) or 'no controller'}"
        if missing:
            text += f"; unavailable: {', '.join(missing)}"
        return text


def detect_layout(mountinfo_path: str = "/proc/self/mountinfo") -> CgroupLayout:
    """Read the cgroup mounts of this mount namespace."""
    v1_mounts: dict[str, Path] = {}
    v2_mount: Path | None = None
    has_v1 = False
    with open(mountinfo_path) as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            after_fields = after.split()
            if len(after_fields) < 3:
                continue
            mount_point = Path(before.split()[4])
            file_system, super_options = after_fields[0], after_fields[2].split(",")
            if file_system == "cgroup2" and v2_mount is None:
                v2_mount = mount_point
            elif file_system == "cgroup":
                has_v1 = True
                for controller in CONTROLLERS:
                    if controller in super_options:
                        v1_mounts.setdefault(controller, mount_point)

    v2_controllers: frozenset[str] = frozenset()
    if v2_mount is not None:
        try:
            v2_controllers = frozenset((v2_mount / "cgroup.controllers").read_text().split())
        except OSError:
            pass

    if has_v1 and v2_mount is not None:
        kind = "hybrid"
    elif has_v1:
        kind = "v1"
    elif v2_mount is not None:
        kind = "v2"
    else:
        kind = "none"
    return CgroupLayout(kind=kind, v1_mounts=v1_mounts, v2_mount=v2_mount, v2_controllers=v2_controllers)


class JobCgroup:
    """The cgroup of one job, across every hierarchy that has a controller Checker uses."""

    def __init__(self, layout: CgroupLayout, job_id: str) -> None:
        self.layout = layout
        self.job_id = job_id

    def directories(self) -> dict[str, Path]:
        """Return each used controller's directory of this job's cgroup (v2 controllers share one)."""
        found: dict[str, Path] = {}
        for controller in CONTROLLERS:
            version = self.layout.version_of(controller)
            if version == 1:
                found[controller] = self.layout.v1_mounts[controller] / GROUP_NAME / self.job_id
            elif version == 2 and self.layout.v2_mount is not None:
                found[controller] = self.layout.v2_mount / GROUP_NAME / self.job_id
        return found

    def unique_directories(self) -> list[Path]:
        return sorted(set(self.directories().values()))

    def relative_path(self) -> str:
        """Path of the job's cgroup inside each hierarchy, as CRIU's --cgroup-root takes it."""
        return f"/{GROUP_NAME}/{self.job_id}"

    def criu_restore_options(self) -> list[str]:
        """Return `--cgroup-root` options that restore the job's processes into this cgroup."""
        options: list[str] = []
        for controller in self.directories():
            options += ["--cgroup-root", f"{controller}:{self.relative_path()}"]
        return options

    def procs_files(self) -> list[Path]:
        """Return the cgroup.procs files a new process writes its PID to, to join this cgroup."""
        return [directory / "cgroup.procs" for directory in self.unique_directories()]

    def create(self, limits: Limits) -> None:
        """Create the cgroup afresh, empty and with zeroed counters, and apply `limits`.

        A cgroup that still has processes (another copy of the job restored
        from the same image) is kept, so they keep running, and only gets
        `limits` again. Raises OSError when a cgroup file cannot be written.
        """
        if not self.list_processes():
            self.remove()
        if self.layout.v2_mount is not None and any(self.layout.version_of(c) == 2 for c in CONTROLLERS):
            self._enable_v2_controllers()
        for directory in self.unique_directories():
            directory.mkdir(parents=True, exist_ok=True)
        self._apply(limits)

    def _enable_v2_controllers(self) -> None:
        assert self.layout.v2_mount is not None
        enabled = " ".join(f"+{name}" for name in CONTROLLERS if self.layout.version_of(name) == 2)
        group = self.layout.v2_mount / GROUP_NAME
        group.mkdir(exist_ok=True)
        # NOTE: written for the unified layout but run only on a hybrid machine,
        # where no controller Checker uses is attached to v2.
        for parent in (self.layout.v2_mount, group):
            (parent / "cgroup.subtree_control").write_text(enabled)

    def _apply(self, limits: Limits) -> None:
        directories = self.directories()
        if "memory" in directories:
            self._apply_memory(directories["memory"], limits.memory_bytes)
        if "cpu" in directories:
            self._apply_cpu(directories["cpu"], limits.cpu_cores)
        if "pids" in directories:
            value = "max" if limits.pids is None else str(limits.pids)
            (directories["pids"] / "pids.max").write_text(value)

    def _apply_memory(self, directory: Path, limit: int | None) -> None:
        if self.layout.version_of("memory") == 2:
            (directory / "memory.max").write_text("max" if limit is None else str(limit))
            swap = directory / "memory.swap.max"
            if swap.exists():
                swap.write_text("max" if limit is None else "0")
            return

        # v1 demands memory.limit_in_bytes <= memory.memsw.limit_in_bytes at
        # every step; the cgroup is new, so both start unlimited.
        value = "-1" if limit is None else str(limit)
        (directory / "memory.limit_in_bytes").write_text(value)
        swap_and_memory = directory / "memory.memsw.limit_in_bytes"
        if swap_and_memory.exists():
            swap_and_memory.write_text(value)

    def _apply_cpu(self, directory: Path, cores: float | None) -> None:
        quota = None if cores is None else max(1000, round(cores * CPU_PERIOD_MICROSECONDS))
        if self.layout.version_of("cpu") == 2:
            (directory / "cpu.max").write_text(f"{'max' if quota is None else quota} {CPU_PERIOD_MICROSECONDS}")
            return
        (directory / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_MICROSECONDS))
        (directory / "cpu.cfs_quota_us").write_text("-1" if quota is None else str(quota))

    def out_of_memory_kills(self) -> int:
        """Return how many processes the kernel's OOM killer ended in this cgroup since it was created."""
        directory = self.directories().get("memory")
        if directory is None:
            return 0
        name = "memory.events" if self.layout.version_of("memory") == 2 else "memory.oom_control"
        return read_oom_kill_count(directory / name)

    def list_processes(self) -> list[int]:
        found: set[int] = set()
        for procs in self.procs_files():
            try:
                found.update(int(pid) for pid in procs.read_text().split())
            except OSError:
                continue
        return sorted(found)

    def remove(self) -> None:
        """Kill any process left in the cgroup and remove it; a missing cgroup is fine.

        Raises RuntimeError when the cgroup is still busy after REMOVE_TIMEOUT_SECONDS.
        """
        deadline = time.monotonic() + REMOVE_TIMEOUT_SECONDS
        for directory in self.unique_directories():
            while directory.exists():
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as error:
                    if error.errno != errno.EBUSY:
                        raise
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"cgroup {directory} of job {self.job_id} still has processes {self.list_processes()} after {REMOVE_TIMEOUT_SECONDS:g} s")
                self._kill_members()
                time.sleep(REMOVE_INTERVAL_SECONDS)

    def _kill_members(self) -> None:
        for pid in self.list_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def read_oom_kill_count(path: Path) -> int:
    """Return the `oom_kill` count of a memory.oom_control (v1) or memory.events (v2) file, 0 when it cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def image_memory_bytes(image_dir: Path) -> int:
    """Return the size of the memory pages in a CRIU image (its pages-*.img files)."""
    return sum(path.stat().st_size for path in image_dir.glob("pages-*.img"))
