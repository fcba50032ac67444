"""Content-addressed, zstd-compressed chunks of checkpoint images, shared by a job's checkpoints.

Layout of one job's chunk directory::

    chunks/<sha256>.zst     a chunk compressed with zstd (one zstd frame)
    chunks/<sha256>         a chunk stored as is (compression off, or its first 16 KiB did not compress)
    chunks/<name>.tmp       a chunk being written; deleted by the next sweep

A chunk's name is the sha256 hex digest of its uncompressed bytes, so equal
chunks of different checkpoints (or of one image) are stored once, and a
reader checks every chunk against its name. A chunk appears under its name
only by a rename after its bytes are written (and flushed, with fsync on), so
a crash never leaves a half-written chunk under a valid name. With fsync on,
`put` only starts the writeback of a new chunk's temporary file, and `flush`
later waits for all of them and renames them, so hashing goes on while the
disk writes.

Image files are cut at content-defined boundaries, decided page by page:
a chunk ends after a 4 KiB page whose zlib.crc32 has its low BOUNDARY_BITS
bits all zero, once it contains MIN_CHUNK_PAGES pages, and at MAX_CHUNK_PAGES
pages in any case. A page image is the concatenation of the dumped memory
areas in address order, so a mapping that appears, grows or shrinks below a
large heap shifts every later page by whole pages. The boundaries travel
with the page contents, so after a shift the chunks realign at the first
boundary page past it, and only the chunks around a change are new. Fixed
offsets (format 2) shared nothing after such a shift: a brk heap that grew
by 31 pages between two checkpoints of bench/heap_change_job.py moved the
whole 1 GiB heap.

A change of single pages scattered over the heap still touches most
chunks: with chunks of about 144 pages, 1 % of pages changed at random
leave about a quarter of the chunks unchanged. See docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import secrets
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

from checker.errors import CorruptCheckpointError

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
"""Chunk size of format 2, which cut files at fixed offsets; read only."""
PAGE_BYTES = 4096
MIN_CHUNK_PAGES = 16
"""No boundary before this many pages (64 KiB), so no chunk but a file's last is smaller."""
MAX_CHUNK_PAGES = 512
"""A chunk ends after this many pages (2 MiB) even without a boundary page."""
BOUNDARY_BITS = 7
"""A page ends a chunk when the low 7 bits of its crc32 are zero (1 page in 128), so chunks average about 144 pages (576 KiB)."""
BOUNDARY_MASK = (1 << BOUNDARY_BITS) - 1
MAP_BYTES = 64 << 20
"""Bytes of an image file that the chunker maps into memory at a time."""

ZSTD_SUFFIX = ".zst"
TEMPORARY_SUFFIX = ".tmp"
MAX_ZSTD_LEVEL = 22
PAUSE_ENV = "CHECKER_TEST_PAUSE_AT"
"""Test hook: names a pause point (see `pause_point`) where the server stops for a while."""
PAUSE_SECONDS = 60.0
PROBE_BYTES = 16 << 10
"""Bytes of a chunk that zstd compresses first, to decide whether to compress the chunk."""
PROBE_MIN_SAVING = 0.03
"""A chunk is stored uncompressed unless its probe shrinks by this fraction or more."""
VERIFY_WINDOW_CHUNKS = 16
"""Chunks decompressed ahead of the sequential sha256 of a file during verification."""


def is_chunk_name(name: str) -> bool:
    digest = name.removesuffix(ZSTD_SUFFIX)
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


class ChunkDirectory:
    """The chunk files of one job."""

    def __init__(self, path: Path, compression_level: int | None, fsync: bool) -> None:
        self.path = path
        self.compression_level = compression_level
        """zstd level for chunks written from now on; None stores them uncompressed."""
        self.fsync = fsync
        self._local = threading.local()
        self._unflushed: list[tuple[Path, Path]] = []
        """(temporary, final) paths of chunks written but not yet flushed and renamed."""
        self._unflushed_lock = threading.Lock()

    def stored_path(self, digest: str) -> Path | None:
        """Return the file of chunk `digest`, compressed or not, or None when the directory has neither."""
        for candidate in (self.path / (digest + ZSTD_SUFFIX), self.path / digest):
            if candidate.exists():
                return candidate
        return None

    def put(self, digest: str, data: bytes | memoryview) -> int:
        """Store chunk `digest` unless it exists; return the bytes written (0 for a chunk already stored).

        With fsync on, the chunk gets its name only at the next `flush`.
        """
        if self.stored_path(digest) is not None:
            return 0
        self.path.mkdir(parents=True, exist_ok=True)
        if self.compression_level is None or not self._compresses(data):
            encoded, name = data, digest
        else:
            encoded, name = self._compressor().compress(data), digest + ZSTD_SUFFIX

        temporary = self.path / f"{name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, encoded)
            if self.fsync:
                start_writeback(fd, 0, len(encoded))
        finally:
            os.close(fd)
        if self.fsync:
            with self._unflushed_lock:
                self._unflushed.append((temporary, self.path / name))
        else:
            os.rename(temporary, self.path / name)
        return len(encoded)

    def flush(self, pool: ThreadPoolExecutor) -> None:
        """Wait until every chunk written since the last flush is on disk, rename each to its name, and flush the directory."""
        with self._unflushed_lock:
            unflushed, self._unflushed = self._unflushed, []
        for _ in pool.map(lambda paths: fsync_path(paths[0], data_only=True), unflushed):
            pass
        for temporary, final in unflushed:
            os.rename(temporary, final)
        if self.path.exists():
            fsync_path(self.path)

    def read(self, digest: str, where: str, size: int | None = None) -> bytes:
        """Return the uncompressed bytes of chunk `digest`; raise CorruptCheckpointError when it is missing, fails its sha256 check or is not `size` bytes long.

        `where` names the checkpoint and file for the message.
        """
        path = self.stored_path(digest)
        if path is None:
            raise CorruptCheckpointError(f"{where}: chunk {digest} is missing from {self.path}")
        with open(path, "rb") as chunk_file:
            stored = chunk_file.read()
        return self.decode(path.name, stored, where, size)

    def decode(self, name: str, stored: bytes, where: str, size: int | None = None) -> bytes:
        """Return the uncompressed bytes of the chunk file `name` whose content is `stored`, checked like `read` checks them."""
        digest = name.removesuffix(ZSTD_SUFFIX)
        if name.endswith(ZSTD_SUFFIX):
            try:
                data = self._decompressor().decompress(stored)
            except zstandard.ZstdError as error:
                raise CorruptCheckpointError(f"{where}: chunk {digest} is not a valid zstd frame ({error}); it is truncated or damaged") from error
        else:
            data = stored
        if size is not None and len(data) != size:
            raise CorruptCheckpointError(f"{where}: chunk {digest} has {len(data)} bytes, but the manifest records {size}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptCheckpointError(f"{where}: chunk {digest} fails its sha256 check")
        return data

    def install(self, name: str, stored: bytes) -> None:
        """Store the chunk file `name` with content `stored`, as fetched from elsewhere and already checked with `decode`."""
        self.path.mkdir(parents=True, exist_ok=True)
        temporary = self.path / f"{name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, stored)
        finally:
            os.close(fd)
        os.rename(temporary, self.path / name)

    def stored_size(self, digest: str) -> int | None:
        path = self.stored_path(digest)
        return None if path is None else path.stat().st_size

    def sweep(self, referenced: set[str]) -> tuple[int, int]:
        """Delete every chunk not in `referenced` and every temporary file; return (files, bytes) deleted.

        Call it only while no checkpoint of the job is being written, because
        that checkpoint's chunks are not referenced by a manifest yet.
        """
        removed_files = removed_bytes = 0
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return 0, 0
        for entry in entries:
            digest = entry.name.removesuffix(ZSTD_SUFFIX)
            if entry.name.endswith(TEMPORARY_SUFFIX) or (is_chunk_name(entry.name) and digest not in referenced):
                size = entry.stat().st_size
                os.unlink(entry.path)
                removed_files += 1
                removed_bytes += size
                if removed_files == 1:
                    pause_point("chunk-sweep", self.path.parent.parent)
        if removed_files and self.fsync:
            fsync_path(self.path)
        return removed_files, removed_bytes

    def _compresses(self, data: bytes | memoryview) -> bool:
        """Return whether zstd shrinks the chunk's first PROBE_BYTES by at least PROBE_MIN_SAVING.

        Random or already compressed memory does not shrink. Compressing a
        whole chunk of it only to store it at the same size cost about
        0.17 s per GiB at level 1 on the 2-vCPU machine of docs/benchmarks.md,
        against 0.02 s for the probes.
        """
        probe = data[:PROBE_BYTES]
        return len(self._compressor().compress(probe)) <= len(probe) * (1 - PROBE_MIN_SAVING)

    def _compressor(self) -> zstandard.ZstdCompressor:
        # A ZstdCompressor must not be shared between threads.
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.compression_level)
        return compressor

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor


def pause_point(name: str, root: Path) -> None:
    """Stop here for PAUSE_SECONDS when $CHECKER_TEST_PAUSE_AT names this point; for crash tests.

    The pause creates `<root>/paused-at-<name>` first, so a test can tell when to
    SIGKILL the server.
    """
    if os.environ.get(PAUSE_ENV) != name:
        return
    (root / f"paused-at-{name}").touch()
    logger.warning("pausing %.0f s at %s, as %s requests", PAUSE_SECONDS, name, PAUSE_ENV)
    time.sleep(PAUSE_SECONDS)


def list_page_images(directory: Path) -> list[os.DirEntry]:
    """Return CRIU's page images (`pages-*.img`) in `directory`; none when it is gone."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return [entry for entry in entries if entry.name.startswith("pages-") and entry.name.endswith(".img")]


def map_file_range(fd: int, offset: int, length: int) -> memoryview:
    """Return a read-only view of `length` bytes of a file from `offset`, a multiple of the page size.

    The view reads the file's page cache in place. Reading a copy instead
    would touch as much fresh memory as the image is large, and on a VM whose
    balloon reports free pages to the host every fresh page costs a fault
    into the host (see docs/benchmarks.md). The mapping is removed when the
    last view of it is gone.

    NOTE: a read through the view raises SIGBUS if the file was truncated
    below it. CRIU never truncates its image files, and nothing else writes
    to a staging directory or a restore cache.
    """
    return memoryview(mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=offset))


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of the file to disk, without waiting.

    A later fdatasync then waits only for what is not written yet. Failure is
    harmless, because that fdatasync still flushes everything.
    """
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def fsync_path(path: Path, data_only: bool = False) -> None:
    """Flush a file or directory to disk; `data_only` uses fdatasync, which skips metadata that reading does not need."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if data_only:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ChunkedFile:
    """One image file as stored: its size and its chunks in file order."""

    size: int
    chunks: tuple[str, ...]
    """sha256 hex digests of the chunks."""
    chunk_sizes: tuple[int, ...]
    """Uncompressed size of each chunk in bytes."""


@dataclass(frozen=True)
class ChunkedImage:
    files: dict[str, ChunkedFile]
    """Image files by name."""
    stored_bytes: int
    """Bytes of the chunk files this checkpoint added; chunks that existed already cost nothing."""


def is_boundary(page: memoryview, pages_in_chunk: int) -> bool:
    """Return whether a chunk that ends with `page`, its `pages_in_chunk`-th page, ends there."""
    if pages_in_chunk >= MAX_CHUNK_PAGES:
        return True
    return pages_in_chunk >= MIN_CHUNK_PAGES and zlib.crc32(page) & BOUNDARY_MASK == 0


class ImageChunker:
    """Split CRIU's image files into chunks and store them, starting while CRIU still writes the page images.

    The page images contain nearly all of a checkpoint's bytes. A thread
    follows each `pages-*.img` as it grows, reads its whole pages and cuts
    chunks at content-defined boundaries (see the module documentation). It
    hands each chunk to a thread pool, which hashes it, and compresses and
    writes it when it is new. CRIU writes each page image sequentially, and the kernel
    raises a file's size only after the data before it is in place, so
    reading up to the current size sees final bytes. `finish()` reads the
    rest, and every other image file, after the dump.

    No whole-file digest is computed: the ordered chunk digests and sizes
    identify each file, so every byte is hashed once.

    NOTE: a file that CRIU rewrote in place after this chunker read that part
    would be stored with its old bytes, and the restore would not notice.
    CRIU 4.2.1 writes page images only by appending, so this does not happen.
    """

    POLL_SECONDS = 0.005

    def __init__(self, staging: Path, chunks: ChunkDirectory, pool: ThreadPoolExecutor, max_pending_chunks: int) -> None:
        self.staging = staging
        self.chunks = chunks
        self._pool = pool
        self._window = threading.BoundedSemaphore(max_pending_chunks)
        self._files: dict[str, _ChunkingFile] = {}
        self._claimed: set[str] = set()
        self._claimed_lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._follow, name=f"chunk-{staging.name}", daemon=True)

    def start(self) -> "ImageChunker":
        self._thread.start()
        return self

    def finish(self) -> ChunkedImage:
        """Stop following, chunk what remains and every other image file, and return what was stored."""
        self._stop.set()
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            for name in sorted(os.listdir(self.staging)):
                if (self.staging / name).is_file() and name not in self._files and is_image_file(name):
                    self._files[name] = _ChunkingFile(os.open(self.staging / name, os.O_RDONLY))
            for followed in self._files.values():
                self._read_pages(followed, final=True)

            files = {name: followed.result() for name, followed in sorted(self._files.items())}
            stored = sum(f.result()[2] for followed in self._files.values() for f in followed.futures)
            if self.chunks.fsync:
                self.chunks.flush(self._pool)
            return ChunkedImage(files=files, stored_bytes=stored)
        finally:
            self._close()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()
        for followed in self._files.values():
            for future in followed.futures:
                future.cancel()
        for followed in self._files.values():
            for future in followed.futures:
                if not future.cancelled():
                    future.exception()
        self._close()

    def _follow(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._read_available():
                    self._stop.wait(self.POLL_SECONDS)
        except BaseException as error:  # Reported by finish(); the dump itself goes on.
            self._error = error

    def _read_available(self) -> bool:
        """Chunk the whole pages that the page images have gained; return whether any was read."""
        progressed = False
        for entry in list_page_images(self.staging):
            followed = self._files.get(entry.name)
            if followed is None:
                followed = self._files[entry.name] = _ChunkingFile(os.open(entry.path, os.O_RDONLY))
            progressed |= self._read_pages(followed, final=False)
        return progressed

    def _read_pages(self, followed: _ChunkingFile, final: bool) -> bool:
        """Read whole pages from the file's current offset (and a short last page when `final`) and cut them into chunks."""
        progressed = False
        while True:
            available = os.fstat(followed.fd).st_size - followed.size
            if not final:
                available -= available % PAGE_BYTES
            if available <= 0:
                break
            block = map_file_range(followed.fd, followed.size, min(available, MAP_BYTES))
            followed.size += len(block)
            self._cut(followed, block)
            progressed = True
        if final and followed.pending:
            self._submit(followed, bytes(followed.pending))
            followed.pending = bytearray()
        return progressed

    def _cut(self, followed: _ChunkingFile, view: memoryview) -> None:
        """Submit every chunk that ends in `view`, and keep its unfinished tail in `followed.pending`."""
        start = 0
        for offset in range(0, len(view), PAGE_BYTES):
            end = offset + PAGE_BYTES
            followed.pending_pages += 1
            if end > len(view) or not is_boundary(view[offset:end], followed.pending_pages):
                continue
            if followed.pending:
                followed.pending += view[start:end]
                self._submit(followed, bytes(followed.pending))
                followed.pending = bytearray()
            else:
                self._submit(followed, view[start:end])
            start = end
            followed.pending_pages = 0
        followed.pending += view[start:]

    def _submit(self, followed: _ChunkingFile, data: bytes | memoryview) -> None:
        self._window.acquire()
        future = self._pool.submit(self._store_chunk, data)
        future.add_done_callback(lambda _: self._window.release())
        followed.futures.append(future)

    def _store_chunk(self, data: bytes | memoryview) -> tuple[str, int, int]:
        """Hash a chunk and store it unless this image or an earlier one has it; return its digest, size and bytes written."""
        digest = hashlib.sha256(data).hexdigest()
        with self._claimed_lock:
            first = digest not in self._claimed
            self._claimed.add(digest)
        return digest, len(data), self.chunks.put(digest, data) if first else 0

    def _close(self) -> None:
        for followed in self._files.values():
            os.close(followed.fd)
        self._files = {}


class FollowedFile:
    """An image file read while it grows: its descriptor, the sha256 and size of what was read so far."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.digest = hashlib.sha256()
        self.size = 0

    def add(self, block: bytes) -> None:
        self.digest.update(block)
        self.size += len(block)


def close_followed(files: dict[str, FollowedFile]) -> None:
    for followed in files.values():
        os.close(followed.fd)


class _ChunkingFile:
    """An image file being chunked: its descriptor, the bytes read, the chunks submitted so far and the unfinished one."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self.futures: list[Future] = []
        self.pending = bytearray()
        self.pending_pages = 0

    def result(self) -> ChunkedFile:
        stored = [future.result() for future in self.futures]
        return ChunkedFile(size=self.size, chunks=tuple(s[0] for s in stored), chunk_sizes=tuple(s[1] for s in stored))


# Files in an image directory that are not part of the image itself.
NOT_IMAGE_SUFFIXES = (".tmp",)
NOT_IMAGE_FILES = frozenset({"manifest.json"})


def is_image_file(name: str) -> bool:
    return name not in NOT_IMAGE_FILES and not name.endswith(NOT_IMAGE_SUFFIXES)


def iterate_chunks(
    chunks: ChunkDirectory, digests: Iterable[str], sizes: Iterable[int | None], pool: ThreadPoolExecutor, where: str
) -> Iterator[bytes]:
    """Yield the verified bytes of `digests` in order, decompressing up to VERIFY_WINDOW_CHUNKS ahead in `pool`.

    `sizes` gives each chunk's expected size, or None where any size is accepted.
    """
    pending: list[Future] = []
    digests, sizes = list(digests), list(sizes)
    position = 0
    while position < len(digests) or pending:
        while position < len(digests) and len(pending) < VERIFY_WINDOW_CHUNKS:
            pending.append(pool.submit(chunks.read, digests[position], where, sizes[position]))
            position += 1
        yield pending.pop(0).result()
