"""Compare chunk size settings on a synthetic page image, without CRIU.

The first image is 16 random pages (other memory areas) followed by a
random heap. The second one has 31 more pages before the heap, as when a
brk heap below it grows, and PERCENT of the heap's pages changed, either in
16 runs of adjacent pages or as single pages at random places. The script
stores both images through the project's ImageChunker, once per setting of
minimum pages, maximum pages and boundary bits, and prints the bytes the
second image added as a fraction of the heap, and the number of chunks.

Run from the repository root: .venv/bin/python bench/chunk_size_sim.py
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checker.store import chunks  # noqa: E402

PAGE_BYTES = chunks.PAGE_BYTES
SETTINGS = [(16, 512, 7), (16, 256, 6), (8, 128, 5), (4, 32, 3), (1, 8, 1)]
"""(minimum pages, maximum pages, boundary bits) to compare. The first is the default, and the script sets the module constants of checker.store.chunks to each in turn."""


def changed_heap(heap: bytes, percent: float, pattern: str, generator: random.Random) -> bytes:
    pages = len(heap) // PAGE_BYTES
    count = int(pages * percent / 100)
    changed = bytearray(heap)
    if pattern == "scattered":
        starts = [(page, 1) for page in generator.sample(range(pages), count)]
    else:
        run = count // 16
        starts = [(generator.randrange(pages - run), run) for _ in range(16)]
    for page, length in starts:
        changed[page * PAGE_BYTES:(page + length) * PAGE_BYTES] = generator.randbytes(length * PAGE_BYTES)
    return bytes(changed)


def store_image(directory: Path, chunk_dir: chunks.ChunkDirectory, pool: ThreadPoolExecutor, image: bytes) -> chunks.ChunkedImage:
    directory.mkdir()
    (directory / "pages-1.img").write_bytes(image)
    return chunks.ImageChunker(directory, chunk_dir, pool, max_pending_chunks=16).start().finish()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heap-mib", type=int, default=256, help="heap size in MiB (default 256)")
    parser.add_argument("--percent", type=float, default=1.0, help="percentage of heap pages changed (default 1)")
    arguments = parser.parse_args()

    generator = random.Random(7)
    heap = os.urandom(arguments.heap_mib << 20)
    before = generator.randbytes(16 * PAGE_BYTES)
    grown = before + generator.randbytes(31 * PAGE_BYTES)
    second_heaps = {pattern: changed_heap(heap, arguments.percent, pattern, random.Random(8)) for pattern in ("clustered", "scattered")}

    print("min pages | max pages | boundary bits | chunks of the first image | stored, clustered | stored, scattered")
    with ThreadPoolExecutor(max_workers=4) as pool:
        for minimum, maximum, bits in SETTINGS:
            chunks.MIN_CHUNK_PAGES, chunks.MAX_CHUNK_PAGES, chunks.BOUNDARY_MASK = minimum, maximum, (1 << bits) - 1
            fractions = []
            for pattern, second_heap in second_heaps.items():
                work = Path(tempfile.mkdtemp(prefix="chunk-size-sim-"))
                try:
                    chunk_dir = chunks.ChunkDirectory(work / "chunks", compression_level=None, fsync=False)
                    first = store_image(work / "1", chunk_dir, pool, before + heap)
                    second = store_image(work / "2", chunk_dir, pool, grown + second_heap)
                finally:
                    shutil.rmtree(work)
                fractions.append(second.stored_bytes / len(heap))
            print(f"{minimum} | {maximum} | {bits} | {len(first.files['pages-1.img'].chunks)} | {fractions[0]:.1%} | {fractions[1]:.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
