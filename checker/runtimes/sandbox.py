"""The `sandbox` runtime: each job in a bubblewrap sandbox with a minimal file system.

The job can reach only what is mounted for it:

- read-only: /usr with the merged-usr links (/bin, /lib, ... as on the host),
  a few files of /etc that programs need to run (users, name resolution,
  dynamic linker cache, TLS certificates, the Python configuration), the
  Checker SDK at SDK_MOUNT (on PYTHONPATH), and the definition's
  `read_only_binds`;
- writable: its job directory at /run/checker/job (work directory, logs,
  identity, exit status), as in the `process` runtime, and a private /tmp;
- its own /proc and a minimal /dev; the root itself is read-only.

The job runs as PID 1's child in a new PID, mount, IPC and UTS namespace, in a
new session, with every capability dropped. With `network: "host"` (the
default) it shares the host's network and reaches the Checker server over TCP
on the loopback address. With `network: "none"` it gets a network namespace of
its own, with only a loopback interface, and reaches the server through the
unix socket `api.sock` in its job directory, which is mounted in the sandbox
anyway. As for gVisor jobs, the server closes that socket and aborts the job's
connections while it checkpoints or restores the job, so an image never
contains a unix connection to the server. The socket file needs no option of
its own: it lies in the job directory's mount, which each restore maps anyway.
CRIU (measured with 4.2.1) dumps and restores the job's network namespace
without further options, running the host's `ip`, `iptables-save` and
`iptables-restore`. Its restore log then contains two harmless "Address already
assigned" errors from `ip`, because the new namespace's loopback is up already.

bwrap's root is a tmpfs that CRIU cannot recreate by itself. A restore
therefore mounts a small tmpfs per job at ROOTS_DIR/JOB_ID, creates in it the
mount points and symbolic links that the sandbox had, and passes it to
`criu restore --root`. CRIU mounts the external bind mounts (recorded with
`--external mnt[]`) on top of it again, and restores /tmp and /dev from the
image. After a restore the job's root is that tmpfs, read-only like bwrap's.
"""

from __future__ import annotations

import os
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import checker
from checker.errors import CheckerError, ErrorCode
from checker.runtimes.base import LaunchSpec
from checker.runtimes.process import INSIDE, JOB_MOUNT, ProcessRuntime
from checker.sdk.client import ENV_API_URL

logger = logging.getLogger(__name__)

PYTHON = Path("/usr/bin/python3")
"""The host's Python, which runs the namespace init inside the sandbox."""

SDK_MOUNT = Path("/run/checker/sdk")
"""Directory on the job's PYTHONPATH that contains the Checker package, read-only."""
SDK_PACKAGE = Path(checker.__file__).resolve().parent
PIDINIT_INSIDE = SDK_MOUNT / "checker" / "runtimes" / "pidinit.py"

ROOTS_DIR = Path("/run/checker/sandbox-roots")
"""Host directory with one prepared root per sandboxed job, each a tmpfs mount."""
ROOT_TMPFS_OPTIONS = "size=1m,nr_inodes=4096,mode=0755"

MERGED_USR_NAMES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
ETC_ENTRIES = (
    "passwd", "group", "hosts", "hostname", "resolv.conf", "nsswitch.conf", "host.conf", "gai.conf",
    "localtime", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "ssl", "ca-certificates", "mime.types", "alternatives",
)
"""Entries of /etc mounted read-only when they exist on the host; /etc/python3* is added as well."""

RESERVED_TARGETS = (Path("/"), Path("/proc"), Path("/dev"), Path("/tmp"), Path("/run/checker"))
"""Paths inside the sandbox that a user's bind may neither replace nor be under."""

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
NETWORK_MODES = ("host", "none")


@dataclass(frozen=True)
class SandboxEntry:
    """One mount or symbolic link of the sandbox's file system."""

    kind: str
    """"ro-bind", "symlink", "proc", "dev" or "tmpfs"."""

    target: Path
    """Path inside the sandbox."""

    source: str = ""
    """Host path of a bind, or the link's text of a symlink."""

    is_file: bool = False
    """True when a bind's source is a file, so the mount point is a file too."""


def parse_bind(text: str) -> tuple[Path, Path]:
    """Split a `read_only_binds` entry, "HOST_PATH" or "HOST_PATH:SANDBOX_PATH", into absolute paths."""
    source, separator, target = text.partition(":")
    source_path = Path(source)
    target_path = Path(target) if separator else source_path
    if not source_path.is_absolute() or not target_path.is_absolute():
        raise ValueError(f"runtime.read_only_binds entry {text!r} is invalid; write an absolute HOST_PATH or HOST_PATH:SANDBOX_PATH")
    return source_path, target_path


def sandbox_entries(config: dict) -> list[SandboxEntry]:
    """List the sandbox's mounts and links in the order bwrap creates them.

    The same list built at restore time gives the prepared root its mount
    points, so it must only depend on the configuration and on which host
    paths exist.
    """
    entries = [SandboxEntry("ro-bind", Path("/usr"), "/usr")]
    for name in MERGED_USR_NAMES:
        host = Path("/") / name
        if host.is_symlink():
            entries.append(SandboxEntry("symlink", host, os.readlink(host)))
        elif host.is_dir():
            entries.append(SandboxEntry("ro-bind", host, str(host)))

    etc = Path("/etc")
    names = [name for name in ETC_ENTRIES if (etc / name).exists()]
    names += sorted(path.name for path in etc.glob("python3*") if path.is_dir())
    for name in names:
        host = etc / name
        entries.append(SandboxEntry("ro-bind", host, str(host), is_file=not host.is_dir()))

    entries += [SandboxEntry("proc", Path("/proc")), SandboxEntry("dev", Path("/dev")), SandboxEntry("tmpfs", Path("/tmp"))]
    entries.append(SandboxEntry("ro-bind", SDK_MOUNT / "checker", str(SDK_PACKAGE)))
    for text in config.get("read_only_binds") or []:
        source, target = parse_bind(text)
        entries.append(SandboxEntry("ro-bind", target, str(source), is_file=source.is_file()))
    return entries


def bwrap_arguments(entries: list[SandboxEntry]) -> list[str]:
    arguments: list[str] = []
    for entry in entries:
        if entry.kind == "ro-bind":
            arguments += ["--ro-bind", entry.source, str(entry.target)]
        elif entry.kind == "symlink":
            arguments += ["--symlink", entry.source, str(entry.target)]
        else:
            arguments += [f"--{entry.kind}", str(entry.target)]
    return arguments


def build_root(root: Path, entries: list[SandboxEntry]) -> None:
    """Create in `root` the mount points and symbolic links of the sandbox, and the job directory's mount point."""
    for entry in entries:
        path = root / entry.target.relative_to("/")
        if entry.kind == "symlink":
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_symlink():
                path.symlink_to(entry.source)
        elif entry.is_file:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        else:
            path.mkdir(parents=True, exist_ok=True)
    (root / JOB_MOUNT.relative_to("/")).mkdir(parents=True, exist_ok=True)


class SandboxRuntime(ProcessRuntime):
    """Jobs of untrusted code in bubblewrap sandboxes, checkpointed with CRIU like `process` jobs."""

    type_name = "sandbox"
    allowed_config_keys = frozenset({"command", "env", "read_only_binds", "user_namespace", "network", "die_with_parent"})

    def uses_job_socket(self, config: dict) -> bool:
        return config.get("network", "host") == "none"

    def validate_config(self, config: dict) -> None:
        super().validate_config(config)

        binds = config.get("read_only_binds") or []
        if not isinstance(binds, list) or not all(isinstance(bind, str) for bind in binds):
            raise ValueError("runtime.read_only_binds must be a list of strings, each HOST_PATH or HOST_PATH:SANDBOX_PATH")
        for bind in binds:
            source, target = parse_bind(bind)
            if not source.exists():
                raise ValueError(f"runtime.read_only_binds entry {bind!r} is invalid: {source} does not exist on this host")
            for reserved in RESERVED_TARGETS:
                if target == reserved or (reserved != Path("/") and target.is_relative_to(reserved)):
                    raise ValueError(f"runtime.read_only_binds entry {bind!r} is invalid: the sandbox's own {reserved} cannot be replaced; mount it elsewhere")

        user_namespace = config.get("user_namespace", False)
        if not isinstance(user_namespace, bool):
            raise ValueError("runtime.user_namespace must be true or false")

        network = config.get("network", "host")
        if network not in NETWORK_MODES:
            raise ValueError(f"runtime.network {network!r} is invalid; use 'host' or 'none'")
        if network == "none" and user_namespace:
            raise ValueError(
                "runtime.network 'none' together with runtime.user_namespace true cannot be restored: CRIU 4.2 fails to restore a "
                "network namespace inside a user namespace (it cannot write the ping_group_range sysctl); use network 'host'"
            )

        if config.get("die_with_parent"):
            raise ValueError(
                "runtime.die_with_parent cannot be used: after a restore the job's parent is the server rather than bwrap, and "
                "bwrap's --die-with-parent makes the restored job get SIGKILL at once; leave the option out"
            )

    def launch_command(self, spec: LaunchSpec) -> list[str]:
        if not PYTHON.exists():
            raise CheckerError(ErrorCode.START_FAILED, f"start of job {spec.job_id} failed: {PYTHON} is missing; the sandbox runs its init with the host's Python")
        namespaces = ["--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        if spec.config.get("user_namespace"):
            namespaces.append("--unshare-user")
        if self.uses_job_socket(spec.config):
            namespaces.append("--unshare-net")
        return [
            "bwrap", *namespaces, "--as-pid-1", "--new-session", "--cap-drop", "ALL",
            *bwrap_arguments(sandbox_entries(spec.config)),
            "--bind", str(spec.files.job_dir), str(JOB_MOUNT), "--chdir", str(INSIDE.work_dir), "--remount-ro", "/",
            "--",
            str(PYTHON), "-I", "-S", str(PIDINIT_INSIDE),
            str(INSIDE.stdout_path), str(INSIDE.stderr_path), str(INSIDE.exit_status_path), str(INSIDE.work_dir),
            "--", *spec.command,
        ]

    def launch_env(self, spec: LaunchSpec) -> dict[str, str]:
        env = super().launch_env(spec)
        defined = spec.config.get("env", {})
        # The server's own PATH and HOME name directories the sandbox does not have.
        env["PATH"] = defined.get("PATH", DEFAULT_PATH)
        env["HOME"] = defined.get("HOME", str(INSIDE.work_dir))
        env["TMPDIR"] = "/tmp"
        env["PYTHONPATH"] = ":".join(part for part in (str(SDK_MOUNT), defined.get("PYTHONPATH", "")) if part)
        if self.uses_job_socket(spec.config):
            # The server's TCP address is unreachable from the job's own network namespace.
            env[ENV_API_URL] = f"unix://{INSIDE.api_socket_path}"
        return env

    def prepare_restore_root(self, spec: LaunchSpec) -> Path:
        root = ROOTS_DIR / spec.job_id
        root.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(root):
            run_mount(["mount", "-t", "tmpfs", "-o", ROOT_TMPFS_OPTIONS, "checker-sandbox-root", str(root)], spec.job_id)
        build_root(root, sandbox_entries(spec.config))
        return root

    async def cleanup(self, spec: LaunchSpec) -> None:
        await super().cleanup(spec)
        root = ROOTS_DIR / spec.job_id
        try:
            if os.path.ismount(root):
                # The job is gone, so a lazy unmount only detaches an unused mount.
                run_mount(["umount", "--lazy", str(root)], spec.job_id)
            if root.is_dir():
                root.rmdir()
        except (CheckerError, OSError) as error:
            logger.error("job %s: cannot remove its sandbox root %s: %s", spec.job_id, root, error)


def run_mount(command: list[str], job_id: str) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout).strip()
        raise CheckerError(ErrorCode.RESTORE_FAILED, f"preparing the sandbox root of job {job_id} failed: {' '.join(command)} exited with {completed.returncode}: {output}")

