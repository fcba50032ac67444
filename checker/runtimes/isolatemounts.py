"""Give a `process` job a mount table that stays the same until its restore.

bwrap binds the whole host file system into the job's mount namespace, as a
slave of the host's mounts, and CRIU records every mount in that namespace
and mounts it again on restore. Two kinds of host mounts would make that
restore fail once they are gone:

- mounts that Checker itself makes and removes under /run/checker, such as
  other jobs' sandbox roots, which exist when this job starts;
- any host mount made after this job started, which would propagate into it.

Run it as the first command inside bwrap:
`python -I -S isolatemounts.py KEEP -- COMMAND...`. It makes every mount of
the namespace private, so later host mounts stay out. It detaches every mount
under /run/checker except KEEP (the job's own directory) and the mounts below
KEEP. Then it executes COMMAND, the job's init, so nothing of this file stays
in the job's image.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
CHECKER_MOUNTS = "/run/checker/"


def mount_points() -> list[str]:
    """Return the mount points of this mount namespace, from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
            escaped = line.split()[4]
            points.append(escaped.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", errors="surrogateescape"))
    return points


def isolate(keep: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"cannot make the job's mounts private: {os.strerror(error)}")

    # Deepest first, so a mount is detached before the one it sits on.
    for point in sorted(set(mount_points()), key=len, reverse=True):
        if not point.startswith(CHECKER_MOUNTS) or point == keep or point.startswith(keep + "/"):
            continue
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
