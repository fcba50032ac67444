"""Local checkpoint store: one directory of CRIU image files per checkpoint.

Layout under the store's root::

    <job id>/<number>.partial/   being written; never restored from
    <job id>/<number>/           complete: CRIU's image files and manifest.json

A checkpoint exists only once its `manifest.json` is in place: the manifest is
written last, atomically (temporary file, fsync, rename), and the directory is
renamed from `.partial` after that. A crash at any point leaves either a
complete checkpoint or a `.partial` directory that is deleted on the next start.

Manifest format, version 1 (JSON object)::

    format          "checker-checkpoint"
    format_version  1
    job_id          the job's id
    checkpoint      checkpoint number, from 1
    parent          number of the previous checkpoint of the job, or null
    runtime         runtime type that wrote the image ("process")
    criu_version    version of the CRIU that dumped the image
    created_at      Unix time, seconds
    job_files       sizes in bytes of the job's stdout and stderr logs at the dump
    files           [{"path", "size", "sha256"}] for every image file

Version rule: a reader accepts exactly the format versions it supports (here: 1)
and rejects any other with an error that names the version, because a newer
format may change what a field means. Every listed file is checked for size
and sha256 before a restore; a file in the directory that the manifest does not
list is ignored, except that it is never restored from.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from checker.errors import CorruptCheckpointError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "checker-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
HASH_BLOCK_BYTES = 4 << 20

# Files in an image directory that are not part of the image itself.
NOT_IMAGE_FILES = frozenset({MANIFEST_NAME, MANIFEST_NAME + ".tmp"})


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    """Size in bytes."""
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest of one checkpoint."""

    job_id: str
    checkpoint: int
    parent: int | None
    runtime: str
    criu_version: str
    created_at: float
    job_files: dict[str, int]
    files: tuple[ManifestFile, ...]
    format_version: int = FORMAT_VERSION

    @property
    def image_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": self.format_version,
            "job_id": self.job_id,
            "checkpoint": self.checkpoint,
            "parent": self.parent,
            "runtime": self.runtime,
            "criu_version": self.criu_version,
            "created_at": self.created_at,
            "job_files": self.job_files,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }


def parse_manifest(text: str, where: str) -> Manifest:
    """Parse and validate a manifest; raise CorruptCheckpointError naming `where` and the problem."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise CorruptCheckpointError(f"manifest {where} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise CorruptCheckpointError(f"manifest {where} is not a Checker checkpoint manifest (format field missing or wrong)")

    version = data.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CorruptCheckpointError(
            f"manifest {where} has format version {version!r}; this Checker reads version(s) "
            f"{sorted(SUPPORTED_FORMAT_VERSIONS)}; restore it with the Checker release that wrote it"
        )

    try:
        files = tuple(ManifestFile(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"])
        return Manifest(
            job_id=str(data["job_id"]),
            checkpoint=int(data["checkpoint"]),
            parent=None if data.get("parent") is None else int(data["parent"]),
            runtime=str(data["runtime"]),
            criu_version=str(data["criu_version"]),
            created_at=float(data["created_at"]),
            job_files={str(k): int(v) for k, v in data.get("job_files", {}).items()},
            files=files,
            format_version=version,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptCheckpointError(f"manifest {where} is missing or has an invalid field: {error!r}") from error


def hash_file(path: Path) -> tuple[int, str]:
    """Return the size and sha256 hex digest of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as image_file:
        while True:
            block = image_file.read(HASH_BLOCK_BYTES)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


class StreamingImageHasher:
    """Hash CRIU's page images, and flush them to disk, while CRIU is still writing them.

    The page images hold nearly all of a checkpoint's bytes. Hashing them after
    the dump would add about 0.7 s per GiB (sha256 on one core of the 2-core
    machine measured in docs/benchmarks.md) to every checkpoint; following
    them as they grow overlaps that work with the dump. CRIU writes each
    `pages-*.img` sequentially, and the kernel raises a file's size only after
    the data before it is in place, so reading up to the current size always
    sees final bytes. `commit()` hashes any file again whose size changed after
    this hasher last read it, and the restore verifies every hash, so a file
    written out of order is caught rather than restored.
    """

    FOLLOWED_PREFIX = "pages-"
    READ_BYTES = 8 << 20
    POLL_SECONDS = 0.005

    def __init__(self, directory: Path, fsync: bool) -> None:
        self.directory = directory
        self.fsync = fsync
        self._files: dict[str, _FollowedFile] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"hash-{directory.name}", daemon=True)

    def start(self) -> "StreamingImageHasher":
        self._thread.start()
        return self

    def finish(self) -> dict[str, tuple[int, str]]:
        """Stop following, hash what remains, flush, and return {file name: (size, sha256)}."""
        self._stop.set()
        self._thread.join()
        try:
            self._read_available()
            result = {}
            for name, followed in self._files.items():
                if self.fsync:
                    os.fdatasync(followed.fd)
                result[name] = (followed.size, followed.digest.hexdigest())
            return result
        finally:
            self._close()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()
        self._close()

    def _follow(self) -> None:
        while not self._stop.is_set():
            if not self._read_available():
                self._stop.wait(self.POLL_SECONDS)

    def _read_available(self) -> bool:
        """Read and hash every followed file up to its current end; return whether anything was read."""
        progressed = False
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return False

        for entry in entries:
            if not (entry.name.startswith(self.FOLLOWED_PREFIX) and entry.name.endswith(".img")):
                continue
            followed = self._files.get(entry.name)
            if followed is None:
                followed = self._files[entry.name] = _FollowedFile(os.open(entry.path, os.O_RDONLY))
            while block := os.read(followed.fd, self.READ_BYTES):
                if self.fsync:
                    start_writeback(followed.fd, followed.size, len(block))
                followed.add(block)
                progressed = True
        return progressed

    def _close(self) -> None:
        for followed in self._files.values():
            os.close(followed.fd)
        self._files = {}


class _FollowedFile:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.digest = hashlib.sha256()
        self.size = 0

    def add(self, block: bytes) -> None:
        self.digest.update(block)
        self.size += len(block)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of the file to disk, without waiting.

    The final fdatasync then waits only for the last blocks instead of the
    whole image. Failure is harmless: that fdatasync still flushes everything.
    """
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalCheckpointStore:
    """Checkpoint images in a local directory."""

    def __init__(self, root: Path, fsync: bool = True, hash_threads: int = 4) -> None:
        self.root = root
        self.fsync = fsync
        self._pool = ThreadPoolExecutor(max_workers=hash_threads, thread_name_prefix="checkpoint-hash")
        root.mkdir(parents=True, exist_ok=True)

    def location(self, job_id: str, number: int) -> Path:
        return self.root / job_id / str(number)

    def begin(self, job_id: str, number: int) -> Path:
        """Create an empty staging directory for checkpoint `number`, replacing a stale one."""
        staging = self.root / job_id / f"{number}.partial"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        return staging

    def commit(
        self,
        staging: Path,
        *,
        job_id: str,
        number: int,
        parent: int | None,
        runtime: str,
        criu_version: str,
        job_files: dict[str, int],
        hashed_already: dict[str, tuple[int, str]] | None = None,
    ) -> Manifest:
        """Hash the staged image, write its manifest last, and move it into place.

        `hashed_already` holds (size, sha256) of files that a StreamingImageHasher
        hashed and flushed during the dump; a file whose size differs is hashed again.
        """
        image_paths = sorted(p for p in staging.iterdir() if p.is_file() and p.name not in NOT_IMAGE_FILES)
        known = hashed_already or {}
        pending = [p for p in image_paths if p.name not in known or known[p.name][0] != p.stat().st_size]
        fresh = dict(zip((p.name for p in pending), self._pool.map(hash_file, pending)))
        if self.fsync:
            list(self._pool.map(fsync_path, pending))
        hashed = [fresh.get(p.name) or known[p.name] for p in image_paths]

        manifest = Manifest(
            job_id=job_id,
            checkpoint=number,
            parent=parent,
            runtime=runtime,
            criu_version=criu_version,
            created_at=time.time(),
            job_files=job_files,
            files=tuple(ManifestFile(p.name, size, digest) for p, (size, digest) in zip(image_paths, hashed)),
        )
        self._write_manifest(staging, manifest)

        final = self.location(job_id, number)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        if self.fsync:
            fsync_path(final.parent)
        return manifest

    def _write_manifest(self, directory: Path, manifest: Manifest) -> None:
        temporary = directory / (MANIFEST_NAME + ".tmp")
        with open(temporary, "w") as manifest_file:
            json.dump(manifest.to_json(), manifest_file, indent=1)
            manifest_file.flush()
            if self.fsync:
                os.fsync(manifest_file.fileno())
        os.rename(temporary, directory / MANIFEST_NAME)
        if self.fsync:
            fsync_path(directory)

    def read_manifest(self, job_id: str, number: int) -> Manifest:
        path = self.location(job_id, number) / MANIFEST_NAME
        where = f"of job {job_id} checkpoint {number}"
        try:
            text = path.read_text()
        except FileNotFoundError as error:
            raise CorruptCheckpointError(f"checkpoint {number} of job {job_id} has no manifest at {path}; it was never completed") from error
        manifest = parse_manifest(text, where)
        if manifest.job_id != job_id or manifest.checkpoint != number:
            raise CorruptCheckpointError(
                f"manifest {where} belongs to job {manifest.job_id} checkpoint {manifest.checkpoint}; the store directory was altered"
            )
        return manifest

    def copy(self, source_job_id: str, number: int, target_job_id: str) -> Manifest:
        """Copy checkpoint `number` of one job into another job's checkpoints, under the same number.

        Image files are hard-linked where the file system allows it, so a copy
        costs no space. The manifest is rewritten for the target job and, as
        in `commit`, written last.
        """
        manifest = self.read_manifest(source_job_id, number)
        source = self.location(source_job_id, number)
        staging = self.begin(target_job_id, number)
        for entry in manifest.files:
            try:
                os.link(source / entry.path, staging / entry.path)
            except OSError:
                shutil.copy2(source / entry.path, staging / entry.path)

        copied = dataclasses.replace(manifest, job_id=target_job_id)
        self._write_manifest(staging, copied)
        os.rename(staging, self.location(target_job_id, number))
        if self.fsync:
            fsync_path(self.location(target_job_id, number).parent)
        return copied

    def hasher_for(self, staging: Path) -> StreamingImageHasher:
        return StreamingImageHasher(staging, self.fsync)

    def verify(self, job_id: str, number: int) -> Manifest:
        """Check every image file against the manifest; raise CorruptCheckpointError naming the first bad file."""
        manifest = self.read_manifest(job_id, number)
        directory = self.location(job_id, number)
        paths = [directory / entry.path for entry in manifest.files]

        for entry, path in zip(manifest.files, paths):
            if not path.is_file():
                raise CorruptCheckpointError(f"checkpoint {number} of job {job_id} is missing image file {entry.path}")
            actual_size = path.stat().st_size
            if actual_size != entry.size:
                raise CorruptCheckpointError(
                    f"checkpoint {number} of job {job_id}: image file {entry.path} has {actual_size} bytes, but the manifest records {entry.size}"
                )

        for entry, (_, digest) in zip(manifest.files, self._pool.map(hash_file, paths)):
            if digest != entry.sha256:
                raise CorruptCheckpointError(f"checkpoint {number} of job {job_id}: image file {entry.path} fails its sha256 check")
        return manifest

    def delete(self, job_id: str, number: int) -> None:
        """Delete one checkpoint: its manifest first, so a crash midway leaves no valid-looking remains."""
        directory = self.location(job_id, number)
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def remove_partial(self) -> list[Path]:
        """Delete staging directories left by a crash; return what was removed."""
        removed = []
        for staging in self.root.glob("*/*.partial"):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
        return removed

    def size_on_disk(self, job_id: str, number: int) -> int:
        directory = self.location(job_id, number)
        return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
