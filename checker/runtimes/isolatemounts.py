"""Give a `process` job a mount table that stays the same until its restore.

bwrap binds the whole host file system into the job's mount namespace, as a
slave of the host's mounts, and CRIU records every mount in that namespace.
A mount that is gone by the time of a dump or a restore makes that dump or
restore fail. Hosts make and remove mounts all the time: container engines
(overlay roots and shm under /var/lib/containers or /var/lib/docker), user
logins (/run/user/UID), and Checker itself (other jobs' sandbox roots under
/run/checker).

Run it as the first command inside bwrap:
`python -I -S isolatemounts.py KEEP -- COMMAND...`. It makes every mount of
the namespace private, so later host mounts stay out. It keeps the host's
disk and network file systems, and /proc, /sys and /dev with what is mounted
below them. It keeps /run, /run/lock and /tmp themselves, and KEEP (the job's
own directory) with the mounts below it. It detaches every other mount. Then
it executes COMMAND, the job's init, so nothing of this file stays in the
job's image.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import sys
from dataclasses import dataclass

MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

SYSTEM_TREES = ("/proc", "/sys", "/dev")
"""Virtual file systems kept with everything mounted below them."""
SYSTEM_MOUNTS = ("/", "/run", "/run/lock", "/tmp")
"""Mount points kept themselves, whatever their file system."""
VOLATILE_TREES = ("/run/checker", "/var/lib/containers", "/var/lib/docker", "/run/containers", "/run/docker", "/run/netns", "/run/user")
"""Trees whose mounts come and go with containers, logins and other jobs; detached even on a disk."""
NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "9p", "virtiofs", "ceph", "glusterfs", "zfs")


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str


def unescape(field: str) -> str:
    """Decode mountinfo's octal escapes (space, tab, newline and backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def read_mounts() -> list[Mount]:
    """Return the mounts of this mount namespace, from /proc/self/mountinfo."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            mounts.append(Mount(point=unescape(fields[4]), fstype=fields[separator + 1], source=unescape(fields[separator + 2])))
    return mounts


def is_below(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def keeps(mount: Mount, keep: str) -> bool:
    """Return whether the job keeps `mount`: it is stable for as long as the job may be restored."""
    if is_below(mount.point, keep):
        return True
    if any(is_below(mount.point, tree) for tree in VOLATILE_TREES):
        return False
    if mount.point in SYSTEM_MOUNTS or any(is_below(mount.point, tree) for tree in SYSTEM_TREES):
        return True
    return mount.source.startswith("/dev/") or mount.fstype in NETWORK_FILE_SYSTEMS


def isolate(keep: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"cannot make the job's mounts private: {os.strerror(error)}")

    # Deepest first, so a mount is detached before the one it sits on.
    detached = {mount.point for mount in read_mounts() if not keeps(mount, keep)}
    for point in sorted(detached, key=len, reverse=True):
        if libc.umount2(os.fsencode(point), MNT_DETACH) != 0:
            error = ctypes.get_errno()
            if error not in (errno.EINVAL, errno.ENOENT):  # Already detached together with its parent.
                raise OSError(error, f"cannot detach {point} from the job's mounts: {os.strerror(error)}")


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: isolatemounts.py KEEP -- COMMAND...\n")
        return 2
    keep, command = argv[1], argv[3:]
    try:
        isolate(keep)
    except OSError as error:
        sys.stderr.write(f"checker: start of the job failed: {error.strerror}\n")
        return 127
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
