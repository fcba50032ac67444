"""Configuration of the `container` runtime, and the OCI bundle (config.json) built from it.

A job's container has, in this order of mounts:

- the definition's `rootfs` as its root, read-only, because every job of
  the definition shares that host directory and Checker captures only the
  work directory with a checkpoint;
- its own /proc, a /dev tmpfs with the devices runc creates by default,
  /dev/pts, /dev/shm and a private /tmp (CRIU stores tmpfs contents in the
  image);
- the Checker SDK, read-only at SDK_MOUNT (on PYTHONPATH);
- the definition's `mounts`;
- its job directory at /run/checker/job, writable, exactly as in the other
  runtimes.

It gets new PID, mount, IPC and UTS namespaces and shares the host's network,
because the job reaches the Checker server over TCP on 127.0.0.1. It runs as
root inside, with the capabilities in CAPABILITIES and no seccomp filter.
PID 1 is Checker's pidinit.py, run by the Python of the root file system.
"""

from __future__ import annotations

import json
import os
import resource
from dataclasses import dataclass
from pathlib import Path

import checker
from checker.runtimes.cgroups import CPU_PERIOD_MICROSECONDS, GROUP_NAME, Limits
from checker.runtimes.process import INSIDE, JOB_MOUNT, validate_command_and_env
from checker.sdk.client import ENV_IDENTITY_FILE

SDK_MOUNT = Path("/run/checker/sdk")
"""Directory on the container's PYTHONPATH that contains the Checker package, read-only."""
SDK_PACKAGE = Path(checker.__file__).resolve().parent
PIDINIT_INSIDE = SDK_MOUNT / "checker" / "runtimes" / "pidinit.py"

DEFAULT_PYTHON = "/usr/bin/python3"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETWORK_MODES = ("host", "none")
MOUNT_MODES = ("ro", "rw")

RESERVED_TARGETS = (Path("/"), Path("/proc"), Path("/dev"), Path("/sys"), Path("/tmp"), Path("/run/checker"))
"""Paths inside the container that a mount may neither replace nor be under."""

ALLOWED_KEYS = frozenset({"command", "env", "rootfs", "mounts", "working_dir", "python", "network"})

# Capabilities of root in the container: enough to manage files, users and
# processes, but neither raw sockets (CAP_NET_RAW) nor administration (CAP_SYS_ADMIN).
CAPABILITIES = [
    "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT",
]
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
]
READ_ONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


@dataclass(frozen=True)
class ContainerMount:
    """One entry of the definition's `mounts`: a host path bind-mounted into the container."""

    source: Path
    target: Path
    writable: bool


def parse_mount(text: str) -> ContainerMount:
    """Parse "HOST_PATH:CONTAINER_PATH" or "HOST_PATH:CONTAINER_PATH:ro|rw" (read-only unless rw)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in MOUNT_MODES):
        raise ValueError(f"runtime.mounts entry {text!r} is invalid; write HOST_PATH:CONTAINER_PATH, optionally followed by :ro or :rw")
    source, target = Path(parts[0]), Path(parts[1])
    if not source.is_absolute() or not target.is_absolute():
        raise ValueError(f"runtime.mounts entry {text!r} is invalid; both paths must be absolute")
    return ContainerMount(source=source, target=target, writable=len(parts) == 3 and parts[2] == "rw")


def path_in_rootfs(rootfs: Path, inside: str) -> Path:
    return rootfs / inside.lstrip("/")


def validate_container_config(config: dict, runtime_name: str = "container", allowed_keys: frozenset[str] = ALLOWED_KEYS) -> None:
    """Raise ValueError naming the field when a `container` runtime configuration is invalid.

    Without "rootfs" in `allowed_keys` (the podman runtime, whose root is an
    image) the root file system is not checked.
    """
    unknown = sorted(set(config) - allowed_keys)
    if unknown:
        raise ValueError(f"runtime.{unknown[0]} is not an option of the {runtime_name} runtime; its options are {', '.join(sorted(allowed_keys))}")

    validate_command_and_env(config)
    python = config.get("python", DEFAULT_PYTHON)
    if not isinstance(python, str) or not python.startswith("/"):
        raise ValueError(f"runtime.python {python!r} is invalid; give the absolute path of a Python 3 inside the root file system")
    if "rootfs" in allowed_keys:
        validate_rootfs(config.get("rootfs"), python)
    validate_mounts_and_network(config)


def validate_rootfs(rootfs_text: object, python: str) -> None:
    if not isinstance(rootfs_text, str) or not rootfs_text:
        raise ValueError("runtime.rootfs is missing; set it to the host directory of the container's root file system (see scripts/build-rootfs.sh)")
    rootfs = Path(rootfs_text)
    if not rootfs.is_absolute():
        raise ValueError(f"runtime.rootfs {rootfs_text!r} is invalid; give an absolute host path")
    if not rootfs.is_dir():
        raise ValueError(f"runtime.rootfs {rootfs_text!r} is not a directory on this host; build one with scripts/build-rootfs.sh DIR")

    if not os.path.lexists(path_in_rootfs(rootfs, python)):
        raise ValueError(
            f"runtime.rootfs {rootfs_text!r} has no {python}: the container's init (Checker's pidinit.py) runs with it; "
            "install python3 in the root file system or set runtime.python"
        )


def validate_mounts_and_network(config: dict) -> None:
    mounts = config.get("mounts") or []
    if not isinstance(mounts, list) or not all(isinstance(mount, str) for mount in mounts):
        raise ValueError("runtime.mounts must be a list of strings, each HOST_PATH:CONTAINER_PATH[:ro|rw]")
    for text in mounts:
        mount = parse_mount(text)
        if not mount.source.exists():
            raise ValueError(f"runtime.mounts entry {text!r} is invalid: {mount.source} does not exist on this host")
        for reserved in RESERVED_TARGETS:
            if mount.target == reserved or (reserved != Path("/") and mount.target.is_relative_to(reserved)):
                raise ValueError(f"runtime.mounts entry {text!r} is invalid: the container's own {reserved} cannot be replaced; mount it elsewhere")

    working_dir = config.get("working_dir", str(INSIDE.work_dir))
    if not isinstance(working_dir, str) or not working_dir.startswith("/"):
        raise ValueError(f"runtime.working_dir {working_dir!r} is invalid; give an absolute path inside the container")

    network = config.get("network", "host")
    if network not in NETWORK_MODES:
        raise ValueError(f"runtime.network {network!r} is invalid; use 'host'")
    if network == "none":
        raise ValueError(
            "runtime.network 'none' is not supported: the job reaches the Checker server over TCP on the host's loopback "
            "address, which a new network namespace hides; use network 'host'"
        )


def container_env(spec_env: dict[str, str], config: dict) -> dict[str, str]:
    """Return the job's environment inside the container.

    The server's own PATH and HOME name host directories the root file system
    may not have, so they are replaced unless the definition sets them.
    """
    defined = config.get("env", {})
    env = dict(spec_env)
    env[ENV_IDENTITY_FILE] = str(INSIDE.identity_path)
    env["PATH"] = defined.get("PATH", DEFAULT_PATH)
    env["HOME"] = defined.get("HOME", str(INSIDE.work_dir))
    env["TMPDIR"] = "/tmp"
    env["PYTHONPATH"] = ":".join(part for part in (str(SDK_MOUNT), defined.get("PYTHONPATH", "")) if part)
    return env


def bundle_config(job_id: str, job_dir: Path, command: list[str], env: dict[str, str], config: dict, limits: Limits, criu_config: Path) -> dict:
    """Build the OCI runtime configuration (config.json) of one job's container.

    `criu_config` is the CRIU configuration file that runc hands to CRIU on
    every checkpoint and restore of the container (the `org.criu.config`
    annotation of runc 1.1): runc has no option for `tcp-close` or action
    scripts, and the file adds both.
    """
    python = config.get("python", DEFAULT_PYTHON)
    init = [
        python, "-I", "-S", str(PIDINIT_INSIDE),
        str(INSIDE.stdout_path), str(INSIDE.stderr_path), str(INSIDE.exit_status_path), config.get("working_dir", str(INSIDE.work_dir)),
        "--", *command,
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": init,
            "env": [f"{name}={value}" for name, value in sorted(env.items())],
            "cwd": str(INSIDE.work_dir),
            "noNewPrivileges": True,
            "capabilities": {kind: CAPABILITIES for kind in ("bounding", "effective", "permitted")},
            "rlimits": [open_files_rlimit()],
        },
        "root": {"path": config["rootfs"], "readonly": True},
        "hostname": f"checker-{job_id}"[:64],
        "mounts": bundle_mounts(job_dir, config),
        "annotations": {"org.criu.config": str(criu_config)},
        "linux": {
            # No "network" namespace: the container shares the host's network.
            "namespaces": [{"type": kind} for kind in ("pid", "mount", "ipc", "uts")],
            "cgroupsPath": f"/{GROUP_NAME}/{job_id}",
            "resources": bundle_resources(limits),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READ_ONLY_PATHS,
        },
    }


def open_files_rlimit() -> dict:
    """Return the server's own RLIMIT_NOFILE for the job.

    runc fails the start when a limit is above the hard limit of its caller
    (raising it needs CAP_SYS_RESOURCE in the initial user namespace, which
    this machine's root lacks), so a fixed value would break on some hosts.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"type": "RLIMIT_NOFILE", "hard": hard, "soft": soft}


def bundle_mounts(job_dir: Path, config: dict) -> list[dict]:
    mounts: list[dict] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": str(SDK_MOUNT / "checker"), "type": "bind", "source": str(SDK_PACKAGE), "options": ["rbind", "ro"]},
    ]
    for text in config.get("mounts") or []:
        mount = parse_mount(text)
        mounts.append({"destination": str(mount.target), "type": "bind", "source": str(mount.source), "options": ["rbind", "rw" if mount.writable else "ro"]})
    mounts.append({"destination": str(JOB_MOUNT), "type": "bind", "source": str(job_dir), "options": ["rbind", "rw"]})
    return mounts


def bundle_resources(limits: Limits) -> dict:
    """Translate Checker's limits into the OCI `linux.resources` object that runc writes to the job's cgroup."""
    resources: dict = {}
    if limits.memory_bytes is not None:
        # OCI's memory.swap is the limit of memory and swap together, so equal values forbid swap.
        resources["memory"] = {"limit": limits.memory_bytes, "swap": limits.memory_bytes}
    if limits.cpu_cores is not None:
        quota = max(1000, round(limits.cpu_cores * CPU_PERIOD_MICROSECONDS))
        resources["cpu"] = {"quota": quota, "period": CPU_PERIOD_MICROSECONDS}
    if limits.pids is not None:
        resources["pids"] = {"limit": limits.pids}
    return resources


def write_bundle(bundle_dir: Path, bundle: dict) -> None:
    bundle_dir.mkdir(parents=True, exist_ok=True)
    staging = bundle_dir / "config.json.tmp"
    staging.write_text(json.dumps(bundle, indent=1))
    os.replace(staging, bundle_dir / "config.json")
