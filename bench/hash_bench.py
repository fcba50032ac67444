"""Time the post-dump steps of a checkpoint on one file: hash choices and fsync order.

Writes a 1 GiB file of random data (by default) under --dir and reads it back
from the page cache --repetitions times per case. The cases are: no hash;
sha256 on one thread, as a checkpoint's page image is hashed;
sha256 over 64 MiB chunks on two threads; BLAKE2b. BLAKE3 (package `blake3`)
and XXH3-128 (package `xxhash`) are added when those packages are installed.

Then it compares two orders for a freshly written (dirty) file: sha256 and
then fsync, and fsync in a second thread while the file is hashed.

Run: .venv/bin/python bench/hash_bench.py --dir /tmp/some-dir
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from checker.store.checkpoints import HASH_BLOCK_BYTES, fsync_path, hash_file

CHUNK_BYTES = 64 << 20
PATTERN_BYTES = 1 << 20


def hash_stream(path: Path, make_hash: Callable) -> None:
    digest = make_hash()
    with open(path, "rb", buffering=0) as image_file:
        while block := image_file.read(HASH_BLOCK_BYTES):
            digest.update(block)
    digest.digest()


def read_only(path: Path) -> None:
    with open(path, "rb", buffering=0) as image_file:
        while image_file.read(HASH_BLOCK_BYTES):
            pass


def sha256_chunks(path: Path, threads: int) -> None:
    """Hash each CHUNK_BYTES slice of the file on its own, `threads` slices at a time."""
    size = path.stat().st_size

    def hash_chunk(offset: int) -> bytes:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as image_file:
            image_file.seek(offset)
            remaining = min(CHUNK_BYTES, size - offset)
            while remaining > 0:
                block = image_file.read(min(HASH_BLOCK_BYTES, remaining))
                digest.update(block)
                remaining -= len(block)
        return digest.digest()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(hash_chunk, range(0, size, CHUNK_BYTES)))


def hash_cases() -> list[tuple[str, Callable[[Path], None]]]:
    cases: list[tuple[str, Callable[[Path], None]]] = [
        ("read, no hash", read_only),
        ("sha256, one thread (as commit() on one file)", lambda path: hash_stream(path, hashlib.sha256)),
        ("sha256, 64 MiB chunks on 2 threads", lambda path: sha256_chunks(path, 2)),
        ("blake2b, one thread", lambda path: hash_stream(path, hashlib.blake2b)),
    ]
    try:
        import blake3

        cases.append(("blake3, one thread", lambda path: hash_stream(path, blake3.blake3)))
    except ImportError:
        print("blake3 is not installed; skipping BLAKE3")
    try:
        import xxhash

        cases.append(("xxh3_128, one thread", lambda path: hash_stream(path, xxhash.xxh3_128)))
    except ImportError:
        print("xxhash is not installed; skipping XXH3")
    return cases


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as output:
        output.write(data)


def time_hash_then_fsync(path: Path, data: bytes) -> tuple[float, float]:
    """Return (sequential, overlapped) seconds for sha256 plus fsync of a freshly written file."""
    write_file(path, data)
    started = time.perf_counter()
    hash_file(path)
    fsync_path(path)
    sequential = time.perf_counter() - started
    path.unlink()
    os.sync()

    write_file(path, data)
    started = time.perf_counter()
    flusher = threading.Thread(target=fsync_path, args=(path,))
    flusher.start()
    hash_file(path)
    flusher.join()
    overlapped = time.perf_counter() - started
    path.unlink()
    os.sync()
    return sequential, overlapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="directory for the test file, on the file system of the state dir (default: a new one under /tmp)")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the test file in MiB (default: 1024)")
    parser.add_argument("--repetitions", type=int, default=3, help="timings per case; the minimum is printed (default: 3)")
    arguments = parser.parse_args()

    directory = arguments.dir or Path(tempfile.mkdtemp(prefix="checker-hash-bench-", dir="/tmp"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "image.bin"
    data = os.urandom(PATTERN_BYTES) * arguments.size_mib
    gib = arguments.size_mib / 1024

    try:
        write_file(path, data)
        os.sync()
        for name, run in hash_cases():
            timings = []
            for _ in range(arguments.repetitions):
                started = time.perf_counter()
                run(path)
                timings.append(time.perf_counter() - started)
            print(f"{name:48s} {min(timings) / gib:.3f} s/GiB (runs: {', '.join(f'{t:.3f}' for t in timings)} s)")
        path.unlink()
        os.sync()

        for _ in range(arguments.repetitions):
            sequential, overlapped = time_hash_then_fsync(path, data)
            print(f"sha256 then fsync {sequential / gib:.3f} s/GiB; fsync in a thread while hashing {overlapped / gib:.3f} s/GiB")
    finally:
        path.unlink(missing_ok=True)
        if arguments.dir is None:
            directory.rmdir()


if __name__ == "__main__":
    main()
