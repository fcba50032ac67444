"""Local checkpoint store: CRIU images as zstd-compressed chunks shared by a job's checkpoints.

Layout under the store's root::

    <job id>/chunks/              the job's chunks, named by sha256 (see checker.store.chunks)
    <job id>/<number>.partial/    being written: CRIU's image files; never restored from
    <job id>/<number>/            complete: manifest.json (format 1 also has the image files)
    <job id>/<number>.restore/    image files being rebuilt from chunks for `criu restore`
    <job id>/<number>.cache/      the newest checkpoint's image files, kept for a fast restore
    <job id>/<number>.deleting/   being deleted
    .deleting-<job id>/           a whole job being deleted

A checkpoint exists only once its `manifest.json` is in place: every chunk is
written (and flushed, with fsync on) first, the manifest is written last,
atomically (temporary file, fsync, rename), and the directory is renamed from
`.partial` after that. A crash at any point leaves either a complete
checkpoint or a `.partial` directory and unreferenced chunks, which the next
start deletes. Deletion renames a directory before removing it, and chunks
are deleted only when no manifest of the job lists them, so a crash during
garbage collection loses no chunk that a complete checkpoint references.

Manifest (JSON object), common fields::

    format          "checker-checkpoint"
    format_version  1 or 2
    job_id          the job's id
    checkpoint      checkpoint number, from 1
    parent          number of the previous checkpoint of the job, or null
    runtime         runtime type that wrote the image ("process")
    criu_version    version of the CRIU that dumped the image
    created_at      Unix time, seconds
    job_files       sizes in bytes of the job's stdout and stderr logs at the dump
    files           [{"path", "size", "sha256"}] for every image file

Format 1 keeps the image files themselves in the checkpoint directory. It is
written when deduplication is off. Formats 2 and 3 keep only the manifest in
the checkpoint directory and add::

    compression     "zstd" or "none": how this checkpoint wrote its new chunks;
                    with "zstd", a chunk whose first 16 KiB do not compress
                    is stored as is
    stored_bytes    bytes of the chunk files this checkpoint added
    files[].chunks  sha256 digests of the file's chunks, in file order

Format 2 (read only) cut files at fixed offsets and has::

    chunk_bytes     size of every chunk but the last of a file, in bytes

Format 3 cuts files at content-defined page boundaries (see
checker.store.chunks), has no files[].sha256, and has::

    chunking             {"page_bytes", "min_pages", "max_pages", "boundary_bits"}:
                         the parameters that cut the chunks, for information
    files[].chunk_sizes  uncompressed size of each chunk in bytes; they add up
                         to files[].size

A format-3 file is identified by its ordered chunk digests and sizes, so
its bytes are hashed once, chunk by chunk. Each chunk's file name shows how
it is stored (a `.zst` suffix for zstd), so chunks written under another
compression setting are read as well.

Version rule: a reader accepts exactly the format versions it supports (here:
1, 2 and 3) and rejects any other with an error that names the version,
because a newer format may change what a field means. A writer writes the
lowest version that can hold what it stores. Before a restore every chunk is
checked against its name and size, and every file against its size and
sha256 (format 1 and 2) or its chunk digests (format 3).

Restore cache: after a format-3 commit the staging image files are moved to
`<number>.cache/` instead of being deleted, and the caches of older
checkpoints of the job are deleted. A restore of the newest checkpoint then
runs `criu restore` on those plain files while they are checked against the
manifest's chunk digests, and rebuilds the files from chunks only when the
cache is missing or fails that check. The cache costs one uncompressed image
per job on disk, and it is not flushed, because the chunks are the durable
copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from checker.errors import CorruptCheckpointError, CorruptRestoreCacheError
from checker.store.chunks import (
    BOUNDARY_BITS,
    MAX_CHUNK_PAGES,
    MIN_CHUNK_PAGES,
    PAGE_BYTES,
    ChunkDirectory,
    ChunkedImage,
    FollowedFile,
    ImageChunker,
    fsync_path,
    iterate_chunks,
    list_page_images,
    map_file_range,
    pause_point,
    start_writeback,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "checker-checkpoint"
PLAIN_FORMAT_VERSION = 1
FIXED_CHUNKS_FORMAT_VERSION = 2
CONTENT_CHUNKS_FORMAT_VERSION = 3
FORMAT_VERSION = CONTENT_CHUNKS_FORMAT_VERSION
SUPPORTED_FORMAT_VERSIONS = frozenset({PLAIN_FORMAT_VERSION, FIXED_CHUNKS_FORMAT_VERSION, CONTENT_CHUNKS_FORMAT_VERSION})
HASH_BLOCK_BYTES = 4 << 20
CHUNKS_DIR = "chunks"
PARTIAL_SUFFIX = ".partial"
RESTORE_SUFFIX = ".restore"
CACHE_SUFFIX = ".cache"
DELETING_SUFFIX = ".deleting"
DELETING_JOB_PREFIX = ".deleting-"

# Files in an image directory that are not part of the image itself.
NOT_IMAGE_FILES = frozenset({MANIFEST_NAME, MANIFEST_NAME + ".tmp"})


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    """Size in bytes."""
    sha256: str | None
    """sha256 of the whole file (formats 1 and 2); None in format 3."""
    chunks: tuple[str, ...] | None = None
    """sha256 digests of the file's chunks in file order (formats 2 and 3); None in format 1."""
    chunk_sizes: tuple[int, ...] | None = None
    """Uncompressed size of each chunk in bytes (formats 2 and 3; computed from chunk_bytes in format 2)."""

    def extents(self) -> Iterator[tuple[int, int, str]]:
        """Yield (offset, size, digest) of each chunk of the file, in file order."""
        offset = 0
        for digest, size in zip(self.chunks or (), self.chunk_sizes or ()):
            yield offset, size, digest
            offset += size


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
    chunk_bytes: int | None = None
    """Size of every chunk but a file's last one, in bytes (format 2)."""
    chunking: dict[str, int] | None = None
    """Parameters of the content-defined chunk boundaries (format 3)."""
    compression: str | None = None
    """"zstd" or "none": how this checkpoint wrote its new chunks (formats 2 and 3)."""
    stored_bytes: int | None = None
    """Bytes of the chunk files this checkpoint added (formats 2 and 3)."""

    @property
    def image_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    @property
    def chunked(self) -> bool:
        return self.format_version in (FIXED_CHUNKS_FORMAT_VERSION, CONTENT_CHUNKS_FORMAT_VERSION)

    def chunk_digests(self) -> set[str]:
        return {digest for entry in self.files for digest in entry.chunks or ()}

    def to_json(self) -> dict:
        if self.format_version == CONTENT_CHUNKS_FORMAT_VERSION:
            return {
                **self._common_json(),
                "chunking": self.chunking,
                "compression": self.compression,
                "stored_bytes": self.stored_bytes,
                "files": [
                    {"path": f.path, "size": f.size, "chunks": list(f.chunks or ()), "chunk_sizes": list(f.chunk_sizes or ())} for f in self.files
                ],
            }
        if self.chunked:
            return {
                **self._common_json(),
                "chunk_bytes": self.chunk_bytes,
                "compression": self.compression,
                "stored_bytes": self.stored_bytes,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "chunks": list(f.chunks or ())} for f in self.files],
            }
        return {**self._common_json(), "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files]}

    def _common_json(self) -> dict:
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
        chunked = version in (FIXED_CHUNKS_FORMAT_VERSION, CONTENT_CHUNKS_FORMAT_VERSION)
        content_chunks = version == CONTENT_CHUNKS_FORMAT_VERSION
        files = tuple(
            ManifestFile(
                str(f["path"]),
                int(f["size"]),
                None if content_chunks else str(f["sha256"]),
                tuple(str(c) for c in f["chunks"]) if chunked else None,
                tuple(int(n) for n in f["chunk_sizes"]) if content_chunks else None,
            )
            for f in data["files"]
        )
        manifest = Manifest(
            job_id=str(data["job_id"]),
            checkpoint=int(data["checkpoint"]),
            parent=None if data.get("parent") is None else int(data["parent"]),
            runtime=str(data["runtime"]),
            criu_version=str(data["criu_version"]),
            created_at=float(data["created_at"]),
            job_files={str(k): int(v) for k, v in data.get("job_files", {}).items()},
            files=files,
            format_version=version,
            chunk_bytes=int(data["chunk_bytes"]) if version == FIXED_CHUNKS_FORMAT_VERSION else None,
            chunking={str(k): int(v) for k, v in data["chunking"].items()} if content_chunks else None,
            compression=str(data["compression"]) if chunked else None,
            stored_bytes=int(data["stored_bytes"]) if chunked else None,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptCheckpointError(f"manifest {where} is missing or has an invalid field: {error!r}") from error
    if manifest.format_version == FIXED_CHUNKS_FORMAT_VERSION:
        return with_fixed_chunk_sizes(manifest, where)
    if manifest.format_version == CONTENT_CHUNKS_FORMAT_VERSION:
        check_chunk_sizes(manifest, where)
    return manifest


def with_fixed_chunk_sizes(manifest: Manifest, where: str) -> Manifest:
    """Check that a format-2 manifest's chunk lists cover its file sizes, and return it with each file's chunk sizes filled in."""
    chunk_bytes = manifest.chunk_bytes or 0
    if chunk_bytes <= 0 or chunk_bytes % 4096:
        raise CorruptCheckpointError(f"manifest {where} has chunk_bytes {chunk_bytes}; expected a positive multiple of 4096")
    files = []
    for entry in manifest.files:
        expected = -(-entry.size // chunk_bytes)
        if len(entry.chunks or ()) != expected:
            raise CorruptCheckpointError(
                f"manifest {where} lists {len(entry.chunks or ())} chunks for {entry.path} of {entry.size} bytes; expected {expected}"
            )
        sizes = tuple(min(chunk_bytes, entry.size - index * chunk_bytes) for index in range(expected))
        files.append(dataclasses.replace(entry, chunk_sizes=sizes))
    return dataclasses.replace(manifest, files=tuple(files))


def check_chunk_sizes(manifest: Manifest, where: str) -> None:
    """Reject a format-3 manifest whose chunk sizes do not match its chunk lists or add up to its file sizes."""
    for entry in manifest.files:
        chunks, sizes = entry.chunks or (), entry.chunk_sizes or ()
        if len(chunks) != len(sizes):
            raise CorruptCheckpointError(f"manifest {where} lists {len(chunks)} chunks but {len(sizes)} chunk sizes for {entry.path}")
        if any(size <= 0 for size in sizes) or sum(sizes) != entry.size:
            raise CorruptCheckpointError(
                f"manifest {where}: the chunk sizes of {entry.path} add up to {sum(sizes)} bytes, but the file has {entry.size}; expected positive sizes that add up"
            )


def referenced_chunks(text: str) -> set[str] | None:
    """Return every chunk digest that a manifest's text lists, whatever its version; None when it is not JSON.

    Garbage collection keeps these chunks. It reads the chunk lists of
    manifests it cannot fully parse too, so that a manifest of a newer format
    never has its chunks deleted by an older server.
    """
    try:
        data = json.loads(text)
    except ValueError:
        return None
    found: set[str] = set()
    files = data.get("files") if isinstance(data, dict) else None
    for entry in files if isinstance(files, list) else []:
        chunks = entry.get("chunks") if isinstance(entry, dict) else None
        if isinstance(chunks, list):
            found.update(str(digest) for digest in chunks)
    return found


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

    READ_BYTES = 8 << 20
    POLL_SECONDS = 0.005

    def __init__(self, directory: Path, fsync: bool) -> None:
        self.directory = directory
        self.fsync = fsync
        self._files: dict[str, FollowedFile] = {}
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
        for entry in list_page_images(self.directory):
            followed = self._files.get(entry.name)
            if followed is None:
                followed = self._files[entry.name] = FollowedFile(os.open(entry.path, os.O_RDONLY))
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


@dataclass(frozen=True)
class RestoreImage:
    """A directory of image files ready for `criu restore`."""

    directory: Path
    source: str
    """"plain" (format 1), "cache" (the restore cache) or "chunks" (rebuilt from chunks)."""
    verified: bool
    """Whether every byte was already checked against the manifest; when False, run `verify_files` before the restored job runs."""


@dataclass(frozen=True)
class GarbageCollected:
    checkpoints: int
    """Checkpoint directories deleted."""
    chunks: int
    """Chunk files deleted."""
    chunk_bytes: int
    """Bytes of the chunk files deleted."""


class LocalCheckpointStore:
    """Checkpoint images in a local directory, as chunks (format 3) or plain files (format 1, deduplication off)."""

    def __init__(
        self, root: Path, fsync: bool = True, hash_threads: int = 4, compression_level: int | None = 1, dedupe: bool = True
    ) -> None:
        self.root = root
        self.fsync = fsync
        self.compression_level = compression_level
        """zstd level of new chunks; None writes them uncompressed."""
        self.dedupe = dedupe
        """Write format 3 (chunks shared by a job's checkpoints); False writes format 1 (plain image files)."""
        self.stores_job_logs = False
        """Whether each image also contains the job's logs as of the checkpoint, for servers that restore without this state directory."""
        self._threads = hash_threads
        self._pool = ThreadPoolExecutor(max_workers=hash_threads, thread_name_prefix="checkpoint-hash")
        self._guard = threading.Lock()
        self._job_locks: dict[str, threading.Lock] = {}
        self._pins: dict[tuple[str, int], int] = {}
        root.mkdir(parents=True, exist_ok=True)

    def location(self, job_id: str, number: int) -> Path:
        return self.root / job_id / str(number)

    def chunk_directory(self, job_id: str) -> ChunkDirectory:
        return ChunkDirectory(self.root / job_id / CHUNKS_DIR, self.compression_level, self.fsync)

    def begin(self, job_id: str, number: int) -> Path:
        """Create an empty staging directory for checkpoint `number`, replacing a stale one."""
        staging = self.root / job_id / f"{number}{PARTIAL_SUFFIX}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        return staging

    def image_writer(self, job_id: str, staging: Path) -> "ImageChunker | StreamingImageHasher":
        """Return what follows CRIU's writes into `staging`: a chunker (format 3) or a hasher (format 1). Call `start()` on it."""
        if self.dedupe:
            return ImageChunker(staging, self.chunk_directory(job_id), self._pool, max_pending_chunks=4 * self._threads)
        return StreamingImageHasher(staging, self.fsync)

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
        writer: "ImageChunker | StreamingImageHasher | None" = None,
    ) -> Manifest:
        """Store the staged image, write its manifest last, and move it into place.

        `writer` is the started result of `image_writer`, which has followed
        the dump; without one, the image is read and stored here.
        """
        if writer is None:
            writer = self.image_writer(job_id, staging).start()
        common = {"job_id": job_id, "checkpoint": number, "parent": parent, "runtime": runtime, "criu_version": criu_version, "job_files": job_files}
        if isinstance(writer, ImageChunker):
            manifest = self._chunked_manifest(writer.finish(), common)
            self._keep_as_cache(staging, job_id, number)
        else:
            manifest = self._plain_manifest(staging, writer.finish(), common)
        pause_point("before-manifest", self.root)
        self._publish(manifest)
        self._write_manifest(staging, manifest)

        final = self.location(job_id, number)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        if self.fsync:
            fsync_path(final.parent)
        return manifest

    def _publish(self, manifest: Manifest) -> None:
        """Copy a committed checkpoint to remote storage before its local manifest is written; the local store keeps nothing elsewhere."""

    def _chunked_manifest(self, image: ChunkedImage, common: dict) -> Manifest:
        files = tuple(ManifestFile(name, stored.size, None, stored.chunks, stored.chunk_sizes) for name, stored in sorted(image.files.items()))
        return Manifest(
            **common,
            created_at=time.time(),
            files=files,
            format_version=CONTENT_CHUNKS_FORMAT_VERSION,
            chunking={"page_bytes": PAGE_BYTES, "min_pages": MIN_CHUNK_PAGES, "max_pages": MAX_CHUNK_PAGES, "boundary_bits": BOUNDARY_BITS},
            compression="none" if self.compression_level is None else "zstd",
            stored_bytes=image.stored_bytes,
        )

    def cache_location(self, job_id: str, number: int) -> Path:
        return self.root / job_id / f"{number}{CACHE_SUFFIX}"

    def _keep_as_cache(self, staging: Path, job_id: str, number: int) -> None:
        """Move the staged image files to the restore cache of checkpoint `number`, and delete the job's older caches.

        The chunks hold the image now; the cache only spares a restore the rebuild.
        """
        cache = self.cache_location(job_id, number)
        if cache.exists():
            shutil.rmtree(cache)
        cache.mkdir()
        for path in staging.iterdir():
            os.rename(path, cache / path.name)
        for older in (self.root / job_id).glob(f"*{CACHE_SUFFIX}"):
            if older != cache:
                shutil.rmtree(older, ignore_errors=True)

    def drop_restore_cache(self, job_id: str, number: int) -> None:
        shutil.rmtree(self.cache_location(job_id, number), ignore_errors=True)

    def _plain_manifest(self, staging: Path, hashed_already: dict[str, tuple[int, str]], common: dict) -> Manifest:
        """Hash the image files the hasher missed, flush them, and return a format-1 manifest."""
        image_paths = sorted(p for p in staging.iterdir() if p.is_file() and p.name not in NOT_IMAGE_FILES)
        pending = [p for p in image_paths if p.name not in hashed_already or hashed_already[p.name][0] != p.stat().st_size]
        fresh = dict(zip((p.name for p in pending), self._pool.map(hash_file, pending)))
        if self.fsync:
            list(self._pool.map(fsync_path, pending))
        hashed = [fresh.get(p.name) or hashed_already[p.name] for p in image_paths]
        files = tuple(ManifestFile(p.name, size, digest) for p, (size, digest) in zip(image_paths, hashed))
        return Manifest(**common, created_at=time.time(), files=files, format_version=PLAIN_FORMAT_VERSION)

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
        where = f"of job {job_id} checkpoint {number}"
        manifest = parse_manifest(self._read_manifest_text(job_id, number), where)
        if manifest.job_id != job_id or manifest.checkpoint != number:
            raise CorruptCheckpointError(
                f"manifest {where} belongs to job {manifest.job_id} checkpoint {manifest.checkpoint}; the store directory was altered"
            )
        return manifest

    def _read_manifest_text(self, job_id: str, number: int) -> str:
        path = self.location(job_id, number) / MANIFEST_NAME
        try:
            return path.read_text()
        except FileNotFoundError as error:
            raise CorruptCheckpointError(f"checkpoint {number} of job {job_id} has no manifest at {path}; it was never completed") from error

    def copy(self, source_job_id: str, number: int, target_job_id: str) -> Manifest:
        """Copy checkpoint `number` of one job into another job's checkpoints, under the same number.

        Image files and chunks are hard-linked where the file system allows
        it, so a copy costs no space, and the target keeps them when the
        source's are deleted. The manifest is rewritten for the target job
        and, as in `commit`, written last.
        """
        with self.pinned(source_job_id, number), self._job_lock(source_job_id):
            manifest = self.read_manifest(source_job_id, number)
            staging = self.begin(target_job_id, number)
            if manifest.chunked:
                self._link_chunks(manifest, source_job_id, target_job_id)
            else:
                source = self.location(source_job_id, number)
                for entry in manifest.files:
                    link_or_copy(source / entry.path, staging / entry.path)

        copied = dataclasses.replace(manifest, job_id=target_job_id)
        self._write_manifest(staging, copied)
        os.rename(staging, self.location(target_job_id, number))
        if self.fsync:
            fsync_path(self.location(target_job_id, number).parent)
        return copied

    def _link_chunks(self, manifest: Manifest, source_job_id: str, target_job_id: str) -> None:
        source, target = self.chunk_directory(source_job_id), self.chunk_directory(target_job_id)
        target.path.mkdir(parents=True, exist_ok=True)
        where = f"checkpoint {manifest.checkpoint} of job {source_job_id}"
        for digest in sorted(manifest.chunk_digests()):
            stored = source.stored_path(digest)
            if stored is None:
                raise CorruptCheckpointError(f"{where}: chunk {digest} is missing from {source.path}")
            if not (target.path / stored.name).exists():
                link_or_copy(stored, target.path / stored.name)
        if self.fsync:
            fsync_path(target.path)

    def verify(self, job_id: str, number: int) -> Manifest:
        """Check every chunk against its name and every image file against its size and sha256.

        Raises CorruptCheckpointError naming the first bad file or chunk.
        """
        manifest = self.read_manifest(job_id, number)
        if not manifest.chunked:
            self.verify_files(manifest, self.location(job_id, number))
            return manifest

        chunks = self.chunk_directory(job_id)
        for entry in manifest.files:
            where = f"checkpoint {number} of job {job_id}, image file {entry.path}"
            digest = hashlib.sha256() if entry.sha256 is not None else None
            size = 0
            for data in iterate_chunks(chunks, entry.chunks or (), entry.chunk_sizes or (), self._pool, where):
                if digest is not None:
                    digest.update(data)
                size += len(data)
            self._check_size(manifest, entry, size)
            if digest is not None:
                self._check_file(manifest, entry, size, digest.hexdigest())
        return manifest

    def verify_files(self, manifest: Manifest, directory: Path) -> None:
        """Check the image files in `directory` against the manifest: their sizes, and their sha256 or chunk digests.

        Format 3 files are checked chunk by chunk in the thread pool, and a
        mismatch raises CorruptRestoreCacheError, because the restore cache is
        the only source of format-3 files that were not checked yet. Every chunk the manifest lists
        must also exist, so a missing chunk is found even when the cache is
        intact.
        """
        paths = [directory / entry.path for entry in manifest.files]
        for entry, path in zip(manifest.files, paths):
            if not path.is_file():
                raise CorruptCheckpointError(f"checkpoint {manifest.checkpoint} of job {manifest.job_id} is missing image file {entry.path}")
            self._check_size(manifest, entry, path.stat().st_size)
        if manifest.format_version == CONTENT_CHUNKS_FORMAT_VERSION:
            self._check_chunks_exist(manifest)
            self._verify_extents(manifest, paths)
            return
        for entry, (size, digest) in zip(manifest.files, self._pool.map(hash_file, paths)):
            self._check_file(manifest, entry, size, digest)

    def _check_chunks_exist(self, manifest: Manifest) -> None:
        """Raise CorruptCheckpointError when a chunk the manifest lists is missing; the chunks' contents are not read."""
        chunks = self.chunk_directory(manifest.job_id)
        for digest in sorted(manifest.chunk_digests()):
            if chunks.stored_path(digest) is None:
                raise CorruptCheckpointError(f"checkpoint {manifest.checkpoint} of job {manifest.job_id}: chunk {digest} is missing from {chunks.path}")

    def _verify_extents(self, manifest: Manifest, paths: list[Path]) -> None:
        """Check each chunk-sized extent of the format-3 files at `paths` against its digest, in the thread pool."""
        tasks = [(entry, path, *extent) for entry, path in zip(manifest.files, paths) for extent in entry.extents()]

        views = {}
        for path in paths:
            with open(path, "rb", buffering=0) as image_file:
                size = os.fstat(image_file.fileno()).st_size
                views[path] = map_file_range(image_file.fileno(), 0, size) if size else memoryview(b"")

        def check_extent(task: tuple[ManifestFile, Path, int, int, str]) -> None:
            entry, path, offset, size, digest = task
            data = views[path][offset:offset + size]
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                raise CorruptRestoreCacheError(
                    f"checkpoint {manifest.checkpoint} of job {manifest.job_id}: image file {entry.path} in {path.parent} "
                    f"does not match chunk {digest} at offset {offset}"
                )

        for _ in self._pool.map(check_extent, tasks):
            pass

    @staticmethod
    def _check_size(manifest: Manifest, entry: ManifestFile, size: int) -> None:
        if size != entry.size:
            raise CorruptCheckpointError(
                f"checkpoint {manifest.checkpoint} of job {manifest.job_id}: image file {entry.path} has {size} bytes, but the manifest records {entry.size}"
            )

    def _check_file(self, manifest: Manifest, entry: ManifestFile, size: int, digest: str) -> None:
        self._check_size(manifest, entry, size)
        if digest != entry.sha256:
            raise CorruptCheckpointError(f"checkpoint {manifest.checkpoint} of job {manifest.job_id}: image file {entry.path} fails its sha256 check")

    def prepare_restore(self, manifest: Manifest, use_cache: bool = True) -> RestoreImage:
        """Return a directory of the image files for `criu restore`; release it with `release_restore`.

        A format-3 image comes from the restore cache when `use_cache` is set
        and the cache has every file at its size. Such an image is not
        verified yet.
        Otherwise a chunked image is rebuilt from its chunks into
        `<number>.restore/`, decompressing in the thread pool, and every
        chunk is checked against its name and size on the way. A rebuilt
        format-3 image is then complete and verified, and becomes the
        checkpoint's restore cache. Run `verify_files` on an image that is not
        `verified`, which can overlap with the restore.
        """
        if not manifest.chunked:
            return RestoreImage(self.location(manifest.job_id, manifest.checkpoint), source="plain", verified=False)
        content_chunks = manifest.format_version == CONTENT_CHUNKS_FORMAT_VERSION
        cache = self.cache_location(manifest.job_id, manifest.checkpoint)
        if content_chunks and use_cache and self._cache_is_complete(manifest, cache):
            return RestoreImage(cache, source="cache", verified=False)

        directory = self.root / manifest.job_id / f"{manifest.checkpoint}{RESTORE_SUFFIX}"
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir()
        try:
            self._rebuild_files(manifest, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        if not content_chunks:
            return RestoreImage(directory, source="chunks", verified=False)
        shutil.rmtree(cache, ignore_errors=True)
        os.rename(directory, cache)
        return RestoreImage(cache, source="chunks", verified=True)

    @staticmethod
    def _cache_is_complete(manifest: Manifest, cache: Path) -> bool:
        try:
            return all((cache / entry.path).stat().st_size == entry.size for entry in manifest.files)
        except FileNotFoundError:
            return False

    def _rebuild_files(self, manifest: Manifest, directory: Path) -> None:
        chunks = self.chunk_directory(manifest.job_id)
        descriptors = []
        try:
            tasks = []
            for entry in manifest.files:
                fd = os.open(directory / entry.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                descriptors.append(fd)
                os.ftruncate(fd, entry.size)
                where = f"checkpoint {manifest.checkpoint} of job {manifest.job_id}, image file {entry.path}"
                tasks.extend((fd, *extent, where) for extent in entry.extents())

            def write_chunk(task: tuple[int, int, int, str, str]) -> None:
                fd, offset, size, digest, where = task
                data = chunks.read(digest, where, size)
                write_at(fd, data, offset)

            for _ in self._pool.map(write_chunk, tasks):
                pass
        finally:
            for fd in descriptors:
                os.close(fd)

    def release_restore(self, image: RestoreImage) -> None:
        """Delete an image directory rebuilt for one restore; the plain files of format 1 and the restore cache stay."""
        if image.directory.name.endswith(RESTORE_SUFFIX):
            shutil.rmtree(image.directory, ignore_errors=True)

    def stored_bytes_of(self, manifest: Manifest) -> int:
        """Bytes of the chunk files the checkpoint references, each counted once; its size without sharing."""
        if not manifest.chunked:
            directory = self.location(manifest.job_id, manifest.checkpoint)
            return sum((directory / entry.path).stat().st_size for entry in manifest.files if (directory / entry.path).exists())
        chunks = self.chunk_directory(manifest.job_id)
        return sum(size for digest in manifest.chunk_digests() if (size := chunks.stored_size(digest)) is not None)

    # Pins, deletion and garbage collection

    @contextmanager
    def pinned(self, job_id: str, number: int) -> Iterator[None]:
        """Keep checkpoint `number` from deletion while a fork or restore reads it."""
        key = (job_id, number)
        with self._guard:
            self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield
        finally:
            with self._guard:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]

    def is_pinned(self, job_id: str, number: int | None = None) -> bool:
        """Return whether checkpoint `number` (any checkpoint of the job when None) is pinned."""
        with self._guard:
            return any(job == job_id and (number is None or pinned == number) for job, pinned in self._pins)

    def _job_lock(self, job_id: str) -> threading.Lock:
        with self._guard:
            return self._job_locks.setdefault(job_id, threading.Lock())

    def delete(self, job_id: str, number: int) -> None:
        """Delete one checkpoint directory and its restore cache; its chunks go at the next `collect_garbage`.

        The directory is renamed first, so a crash midway leaves no
        valid-looking remains.
        """
        self.drop_restore_cache(job_id, number)
        directory = self.location(job_id, number)
        doomed = directory.with_name(f"{number}{DELETING_SUFFIX}")
        try:
            os.rename(directory, doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def collect_garbage(self, job_id: str) -> GarbageCollected:
        """Delete the chunks of job `job_id` that no manifest in its directory lists.

        Call it only while no checkpoint of the job is being written. Every
        manifest that is JSON counts, whatever its status or version; a
        manifest that is not JSON cannot be restored from, so it keeps nothing.
        """
        with self._job_lock(job_id):
            job_dir = self.root / job_id
            referenced: set[str] = set()
            for manifest_path in job_dir.glob(f"*/{MANIFEST_NAME}"):
                if not manifest_path.parent.name.isdigit():
                    continue
                listed = referenced_chunks(manifest_path.read_text())
                if listed is None:
                    logger.warning("job %s: %s is not JSON; its chunks are not kept", job_id, manifest_path)
                    continue
                referenced |= listed
            files, size = self.chunk_directory(job_id).sweep(referenced)
        if files:
            logger.info("job %s: deleted %d unreferenced chunk(s), %.1f MB", job_id, files, size / 1e6)
        return GarbageCollected(checkpoints=0, chunks=files, chunk_bytes=size)

    def delete_job(self, job_id: str) -> bool:
        """Delete every checkpoint and chunk of a job; return whether there was anything to delete."""
        with self._job_lock(job_id):
            doomed = self.root / f"{DELETING_JOB_PREFIX}{job_id}"
            try:
                os.rename(self.root / job_id, doomed)
            except FileNotFoundError:
                return False
            shutil.rmtree(doomed, ignore_errors=True)
            return True

    def has_job(self, job_id: str) -> bool:
        return (self.root / job_id).is_dir()

    def checkpoint_numbers(self, job_id: str) -> list[int]:
        """Numbers of the job's checkpoint directories, complete or not."""
        try:
            return sorted(int(p.name) for p in (self.root / job_id).iterdir() if p.name.isdigit())
        except FileNotFoundError:
            return []

    def remove_partial(self) -> list[Path]:
        """Delete what a crash left: staging, restore and deleting directories, then unreferenced chunks; return the directories removed.

        Call it at startup, before any checkpoint is written.
        """
        removed = []
        leftovers = [*self.root.glob(f"*/*{PARTIAL_SUFFIX}"), *self.root.glob(f"*/*{RESTORE_SUFFIX}"), *self.root.glob(f"*/*{DELETING_SUFFIX}")]
        leftovers += self.root.glob(f"{DELETING_JOB_PREFIX}*")
        for leftover in leftovers:
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
        for chunks in self.root.glob(f"*/{CHUNKS_DIR}"):
            self.collect_garbage(chunks.parent.name)
        return removed

    def size_on_disk(self, job_id: str, number: int) -> int:
        directory = self.location(job_id, number)
        return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
