"""Capture of a job's work directory with its memory, and its return before a restore.

CRIU runs this file as its action script (`criu dump --action-script`). At
the `post-dump` action every process of the job is still frozen, so the tar
archive written then matches the memory image exactly: files the job writes
after the checkpoint are rolled back with its memory on restore, and files it
keeps open have the sizes CRIU recorded. The archive is one more file of the
checkpoint's image, hashed and verified with the rest.

Run as `python -I -S worksnapshot.py` with CHECKER_WORK_DIR and
CHECKER_WORK_SNAPSHOT in the environment; it uses only the standard library.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

SNAPSHOT_NAME = "workdir.tar"
"""File name of the work directory's archive inside a checkpoint's image directory."""

ENV_WORK_DIR = "CHECKER_WORK_DIR"
ENV_SNAPSHOT = "CHECKER_WORK_SNAPSHOT"


def write_snapshot(work_dir: Path, target: Path) -> None:
    """Write `work_dir` as an uncompressed tar archive to `target`, atomically."""
    staging = target.with_name(target.name + ".tmp")
    with tarfile.open(staging, "w", format=tarfile.PAX_FORMAT) as archive:
        # Symbolic links are stored as links, never followed, so a job cannot make the archive read other files.
        archive.add(work_dir, arcname=".", recursive=True)
    os.replace(staging, target)


def restore_snapshot(snapshot: Path, work_dir: Path) -> None:
    """Replace `work_dir` with the contents of `snapshot`.

    The archive is unpacked next to the work directory first and swapped in by
    renames, so a crash midway leaves one of the two directories whole, and the
    next restore unpacks again. The "tar" extraction filter keeps every member
    inside the directory, whatever links the job put in its archive.
    """
    unpacking = work_dir.with_name(work_dir.name + ".restoring")
    replaced = work_dir.with_name(work_dir.name + ".replaced")
    for leftover in (unpacking, replaced):
        shutil.rmtree(leftover, ignore_errors=True)

    unpacking.mkdir()
    with tarfile.open(snapshot, "r") as archive:
        archive.extractall(unpacking, filter="tar")
    if work_dir.exists():
        work_dir.rename(replaced)
    unpacking.rename(work_dir)
    shutil.rmtree(replaced, ignore_errors=True)


def put_back_work_dir(image_dir: Path, work_dir: Path) -> None:
    """Replace `work_dir` with the archive in `image_dir` when the image has one, then make sure the directory exists.

    Raises OSError or tarfile.TarError when the archive cannot be unpacked.
    """
    snapshot = image_dir / SNAPSHOT_NAME
    if snapshot.exists():
        restore_snapshot(snapshot, work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)


def main() -> int:
    if os.environ.get("CRTOOLS_SCRIPT_ACTION") != "post-dump":
        return 0
    try:
        work_dir = Path(os.environ[ENV_WORK_DIR])
        target = Path(os.environ[ENV_SNAPSHOT])
    except KeyError as error:
        sys.stderr.write(f"worksnapshot: environment variable {error.args[0]} is missing\n")
        return 2
    try:
        write_snapshot(work_dir, target)
    except OSError as error:
        sys.stderr.write(f"worksnapshot: cannot archive the work directory {work_dir} to {target}: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
