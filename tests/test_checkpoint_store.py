"""The checkpoint store: manifest formats 1, 2 and 3, chunks, the restore cache, and every way an image can be invalid."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from checker.errors import CorruptCheckpointError, CorruptRestoreCacheError
from checker.store.checkpoints import MANIFEST_NAME, LocalCheckpointStore
from checker.store.chunks import CHUNK_BYTES, MAX_CHUNK_PAGES, MIN_CHUNK_PAGES, PAGE_BYTES, ZSTD_SUFFIX, ChunkDirectory

PAGES = random.Random(1).randbytes(3 * CHUNK_BYTES + 5000)
"""A page image of 768 pages and a short one, incompressible like most heaps. It is seeded, so its chunk boundaries are fixed."""
CORE = b"core image"


@pytest.fixture
def store(tmp_path: Path) -> LocalCheckpointStore:
    return LocalCheckpointStore(tmp_path / "checkpoints")


@pytest.fixture
def plain_store(tmp_path: Path) -> LocalCheckpointStore:
    return LocalCheckpointStore(tmp_path / "checkpoints", compression_level=None, dedupe=False)


def write_checkpoint(store: LocalCheckpointStore, number: int = 1, pages: bytes = PAGES, job_id: str = "job1") -> Path:
    staging = store.begin(job_id, number)
    (staging / "pages-1.img").write_bytes(pages)
    (staging / "core-1.img").write_bytes(CORE)
    store.commit(staging, job_id=job_id, number=number, parent=None, runtime="process", criu_version="4.2.1", job_files={"stdout": 5, "stderr": 0})
    return store.location(job_id, number)


def chunk_files(store: LocalCheckpointStore, job_id: str = "job1") -> list[Path]:
    return sorted(store.chunk_directory(job_id).path.iterdir())


def pages_chunk(store: LocalCheckpointStore, index: int) -> Path:
    manifest = store.read_manifest("job1", 1)
    digest = next(f for f in manifest.files if f.path == "pages-1.img").chunks[index]
    path = store.chunk_directory("job1").stored_path(digest)
    assert path is not None
    return path


def rebuilt_pages(store: LocalCheckpointStore, number: int = 1) -> bytes:
    """Rebuild checkpoint `number` from its chunks, ignoring the restore cache, and return its page image."""
    manifest = store.read_manifest("job1", number)
    image = store.prepare_restore(manifest, use_cache=False)
    try:
        if not image.verified:
            store.verify_files(manifest, image.directory)
        return (image.directory / "pages-1.img").read_bytes()
    finally:
        store.release_restore(image)


def pages_entry(store: LocalCheckpointStore, number: int = 1):
    return next(f for f in store.read_manifest("job1", number).files if f.path == "pages-1.img")


# Format 3: content-defined chunks


def test_chunked_commit_then_verify_passes(store) -> None:
    directory = write_checkpoint(store)
    manifest = store.verify("job1", 1)
    assert manifest.format_version == 3
    assert [f.path for f in manifest.files] == ["core-1.img", "pages-1.img"]
    assert manifest.image_bytes == len(PAGES) + len(CORE)
    assert manifest.files[1].sha256 is None
    assert sum(manifest.files[1].chunk_sizes) == len(PAGES)
    assert sorted(p.name for p in directory.iterdir()) == [MANIFEST_NAME]
    assert not (directory.parent / "1.partial").exists()


def test_chunks_end_on_page_boundaries(store) -> None:
    write_checkpoint(store)
    sizes = pages_entry(store).chunk_sizes
    assert len(sizes) > 1
    for size in sizes[:-1]:
        assert size % PAGE_BYTES == 0
        assert MIN_CHUNK_PAGES * PAGE_BYTES <= size <= MAX_CHUNK_PAGES * PAGE_BYTES


def test_rebuilt_image_equals_original(store) -> None:
    write_checkpoint(store)
    assert rebuilt_pages(store) == PAGES
    assert not (store.root / "job1" / "1.restore").exists()


def test_second_checkpoint_stores_only_changed_chunk(store) -> None:
    write_checkpoint(store, 1)
    changed = bytearray(PAGES)
    changed[CHUNK_BYTES + 100] ^= 0xFF
    write_checkpoint(store, 2, bytes(changed))

    first, second = store.read_manifest("job1", 1), store.read_manifest("job1", 2)
    assert first.stored_bytes > len(PAGES)
    assert 0 < second.stored_bytes <= MAX_CHUNK_PAGES * PAGE_BYTES * 1.01
    assert len(chunk_files(store)) == len(first.chunk_digests()) + 1
    assert rebuilt_pages(store, 2) == bytes(changed)


@pytest.mark.parametrize("shift_pages", [1, 31, 300])
def test_shifted_pages_share_chunks(store, shift_pages) -> None:
    write_checkpoint(store, 1)
    write_checkpoint(store, 2, random.Random(2).randbytes(shift_pages * PAGE_BYTES) + PAGES)

    first, second = store.read_manifest("job1", 1), store.read_manifest("job1", 2)
    assert second.stored_bytes < 0.6 * first.stored_bytes
    assert len(first.chunk_digests() & second.chunk_digests()) >= len(first.chunk_digests()) - 3
    assert rebuilt_pages(store, 2)[shift_pages * PAGE_BYTES:] == PAGES


def test_newest_checkpoint_has_restore_cache(store) -> None:
    write_checkpoint(store, 1)
    write_checkpoint(store, 2)
    manifest = store.read_manifest("job1", 2)

    image = store.prepare_restore(manifest)

    assert image.source == "cache"
    assert not image.verified
    assert (image.directory / "pages-1.img").read_bytes() == PAGES
    assert not store.cache_location("job1", 1).exists()
    store.verify_files(manifest, image.directory)


def test_corrupt_restore_cache_is_detected(store) -> None:
    write_checkpoint(store)
    manifest = store.read_manifest("job1", 1)
    cache = store.cache_location("job1", 1)
    with open(cache / "pages-1.img", "r+b") as image_file:
        image_file.seek(CHUNK_BYTES)
        original = image_file.read(1)[0]
        image_file.seek(CHUNK_BYTES)
        image_file.write(bytes([original ^ 0x01]))

    with pytest.raises(CorruptRestoreCacheError, match="pages-1.img in .* does not match chunk [0-9a-f]{64}"):
        store.verify_files(manifest, cache)
    store.drop_restore_cache("job1", 1)
    assert rebuilt_pages(store) == PAGES


def test_rebuilt_image_becomes_restore_cache(store) -> None:
    write_checkpoint(store)
    store.drop_restore_cache("job1", 1)
    manifest = store.read_manifest("job1", 1)

    image = store.prepare_restore(manifest)

    assert (image.source, image.verified) == ("chunks", True)
    assert image.directory == store.cache_location("job1", 1)
    assert store.prepare_restore(manifest).source == "cache"


def test_missing_chunk_is_found_with_cache(store) -> None:
    write_checkpoint(store)
    pages_chunk(store, 1).unlink()
    manifest = store.read_manifest("job1", 1)
    with pytest.raises(CorruptCheckpointError, match="chunk [0-9a-f]{64} is missing"):
        store.verify_files(manifest, store.cache_location("job1", 1))


def test_format_2_checkpoint_still_restores(store) -> None:
    chunks = ChunkDirectory(store.chunk_directory("job1").path, compression_level=1, fsync=False)
    files = []
    for name, data in (("core-1.img", CORE), ("pages-1.img", PAGES)):
        pieces = [data[offset:offset + CHUNK_BYTES] for offset in range(0, len(data), CHUNK_BYTES)]
        digests = [hashlib.sha256(piece).hexdigest() for piece in pieces]
        for digest, piece in zip(digests, pieces):
            chunks.put(digest, piece)
        files.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "chunks": digests})
    manifest = {
        "format": "checker-checkpoint", "format_version": 2, "job_id": "job1", "checkpoint": 1, "parent": None, "runtime": "process",
        "criu_version": "4.2.1", "created_at": 0.0, "job_files": {}, "chunk_bytes": CHUNK_BYTES, "compression": "zstd",
        "stored_bytes": 0, "files": files,
    }
    store.location("job1", 1).mkdir(parents=True)
    (store.location("job1", 1) / MANIFEST_NAME).write_text(json.dumps(manifest))

    assert store.verify("job1", 1).format_version == 2
    assert rebuilt_pages(store) == PAGES
    assert not store.cache_location("job1", 1).exists()


def test_compressible_image_is_compressed(store) -> None:
    write_checkpoint(store, pages=b"\x00\x01" * (2 * CHUNK_BYTES))
    manifest = store.read_manifest("job1", 1)
    assert manifest.compression == "zstd"
    assert manifest.stored_bytes < 100_000
    for index in range(len(pages_entry(store).chunks)):
        assert pages_chunk(store, index).name.endswith(ZSTD_SUFFIX)


def test_incompressible_chunks_are_stored_raw(store) -> None:
    write_checkpoint(store)
    manifest = store.read_manifest("job1", 1)
    assert manifest.compression == "zstd"
    assert not any(p.name.endswith(ZSTD_SUFFIX) for p in chunk_files(store) if p.stat().st_size > 100_000)
    assert rebuilt_pages(store) == PAGES


def test_compression_off_stores_raw_chunks(tmp_path) -> None:
    store = LocalCheckpointStore(tmp_path / "checkpoints", compression_level=None)
    write_checkpoint(store)
    assert store.read_manifest("job1", 1).compression == "none"
    assert not any(p.name.endswith(ZSTD_SUFFIX) for p in chunk_files(store))
    assert rebuilt_pages(store) == PAGES


def test_missing_chunk_is_detected(store) -> None:
    write_checkpoint(store)
    pages_chunk(store, 1).unlink()
    with pytest.raises(CorruptCheckpointError, match="chunk [0-9a-f]{64} is missing"):
        store.verify("job1", 1)
    with pytest.raises(CorruptCheckpointError, match="chunk [0-9a-f]{64} is missing"):
        store.prepare_restore(store.read_manifest("job1", 1), use_cache=False)
    assert not (store.root / "job1" / "1.restore").exists()


def test_truncated_chunk_is_detected(store) -> None:
    write_checkpoint(store, pages=b"\x00\x01" * (2 * CHUNK_BYTES))
    chunk = pages_chunk(store, 0)
    os.truncate(chunk, chunk.stat().st_size // 2)
    with pytest.raises(CorruptCheckpointError, match="not a valid zstd frame"):
        store.verify("job1", 1)


def test_truncated_raw_chunk_is_detected(tmp_path) -> None:
    store = LocalCheckpointStore(tmp_path / "checkpoints", compression_level=None)
    write_checkpoint(store)
    chunk = pages_chunk(store, 0)
    os.truncate(chunk, 1000)
    with pytest.raises(CorruptCheckpointError, match="chunk [0-9a-f]{64} has 1000 bytes, but the manifest records"):
        store.verify("job1", 1)


def test_flipped_byte_in_chunk_is_detected(store) -> None:
    write_checkpoint(store)
    chunk = pages_chunk(store, 2)
    with open(chunk, "r+b") as chunk_file:
        chunk_file.seek(5000)
        original = chunk_file.read(1)[0]
        chunk_file.seek(5000)
        chunk_file.write(bytes([original ^ 0x01]))
    with pytest.raises(CorruptCheckpointError, match=f"chunk {chunk.name.removesuffix(ZSTD_SUFFIX)}"):
        store.verify("job1", 1)
    with pytest.raises(CorruptCheckpointError, match=f"chunk {chunk.name.removesuffix(ZSTD_SUFFIX)}"):
        store.prepare_restore(store.read_manifest("job1", 1), use_cache=False)


def test_wrong_chunk_size_is_detected(store) -> None:
    directory = write_checkpoint(store)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    sizes = manifest["files"][1]["chunk_sizes"]
    sizes[0], sizes[1] = sizes[0] + PAGE_BYTES, sizes[1] - PAGE_BYTES
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="chunk [0-9a-f]{64} has [0-9]+ bytes, but the manifest records"):
        store.verify("job1", 1)


def test_chunk_list_shorter_than_sizes_is_rejected(store) -> None:
    directory = write_checkpoint(store)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    count = len(manifest["files"][1]["chunks"])
    manifest["files"][1]["chunks"].pop()
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=f"lists {count - 1} chunks but {count} chunk sizes for pages-1.img"):
        store.verify("job1", 1)


def test_chunk_sizes_not_adding_up_are_rejected(store) -> None:
    directory = write_checkpoint(store)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["files"][1]["chunk_sizes"][0] += 1
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=f"chunk sizes of pages-1.img add up to {len(PAGES) + 1} bytes"):
        store.verify("job1", 1)


def test_unknown_format_version_is_rejected(store) -> None:
    directory = write_checkpoint(store)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["format_version"] = 4
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=r"format version 4; this Checker reads version\(s\) \[1, 2, 3\]"):
        store.verify("job1", 1)


def test_missing_manifest_is_detected(store) -> None:
    directory = write_checkpoint(store)
    (directory / MANIFEST_NAME).unlink()
    with pytest.raises(CorruptCheckpointError, match="no manifest"):
        store.verify("job1", 1)


def test_garbled_manifest_is_rejected(store) -> None:
    directory = write_checkpoint(store)
    (directory / MANIFEST_NAME).write_text('{"format": "checker-checkpoint", "format_version": 2')
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        store.verify("job1", 1)


def test_manifest_of_other_checkpoint_is_rejected(store) -> None:
    write_checkpoint(store, 1)
    second = write_checkpoint(store, 2)
    first_manifest = (store.location("job1", 1) / MANIFEST_NAME).read_text()
    (second / MANIFEST_NAME).write_text(first_manifest)
    with pytest.raises(CorruptCheckpointError, match="belongs to job job1 checkpoint 1"):
        store.verify("job1", 2)


# Garbage collection and copies


def test_garbage_collection_keeps_referenced_chunks(store) -> None:
    write_checkpoint(store, 1)
    changed = bytearray(PAGES)
    changed[0] ^= 0xFF
    write_checkpoint(store, 2, bytes(changed))
    store.delete("job1", 1)

    collected = store.collect_garbage("job1")

    assert collected.chunks == 1
    assert len(chunk_files(store)) == len(store.read_manifest("job1", 2).chunk_digests())
    assert store.verify("job1", 2).checkpoint == 2


def test_garbage_collection_keeps_chunks_of_newer_format(store) -> None:
    directory = write_checkpoint(store)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["format_version"] = 4
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert store.collect_garbage("job1").chunks == 0


def test_copy_survives_deletion_of_source(store) -> None:
    write_checkpoint(store)
    store.copy("job1", 1, "fork1")
    digests = store.read_manifest("job1", 1).chunk_digests()
    store.delete_job("job1")
    assert store.verify("fork1", 1).job_id == "fork1"
    assert len(chunk_files(store, "fork1")) == len(digests)


def test_pinned_checkpoint_is_reported(store) -> None:
    write_checkpoint(store)
    with store.pinned("job1", 1):
        assert store.is_pinned("job1", 1)
        assert store.is_pinned("job1")
    assert not store.is_pinned("job1")


def test_interrupted_work_is_removed(store) -> None:
    write_checkpoint(store, 1)
    staging = store.begin("job1", 7)
    (staging / "pages-1.img").write_bytes(b"half written")
    orphan = store.chunk_directory("job1").path / ("ab" * 32 + ZSTD_SUFFIX)
    orphan.write_bytes(b"from a crashed checkpoint")
    temporary = store.chunk_directory("job1").path / "cd.1234.tmp"
    temporary.write_bytes(b"half a chunk")
    (store.root / "job1" / "3.deleting").mkdir()

    removed = store.remove_partial()

    assert staging in removed
    assert not staging.exists()
    assert not orphan.exists()
    assert not temporary.exists()
    assert not (store.root / "job1" / "3.deleting").exists()
    assert store.verify("job1", 1).checkpoint == 1


# Format 1: plain image files


def test_plain_commit_then_verify_passes(plain_store) -> None:
    directory = write_checkpoint(plain_store)
    manifest = plain_store.verify("job1", 1)
    assert manifest.format_version == 1
    assert manifest.image_bytes == len(PAGES) + len(CORE)
    assert (directory / "pages-1.img").read_bytes() == PAGES
    assert plain_store.prepare_restore(manifest).directory == directory


def test_plain_checkpoint_reads_with_chunked_store(plain_store, store) -> None:
    write_checkpoint(plain_store)
    assert store.verify("job1", 1).format_version == 1


def test_plain_missing_file_is_detected(plain_store) -> None:
    directory = write_checkpoint(plain_store)
    (directory / "core-1.img").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing image file core-1.img"):
        plain_store.verify("job1", 1)


def test_plain_truncated_file_is_detected(plain_store) -> None:
    directory = write_checkpoint(plain_store)
    os.truncate(directory / "pages-1.img", 1000)
    with pytest.raises(CorruptCheckpointError, match="pages-1.img has 1000 bytes"):
        plain_store.verify("job1", 1)


def test_plain_flipped_byte_is_detected(plain_store) -> None:
    directory = write_checkpoint(plain_store)
    with open(directory / "pages-1.img", "r+b") as image:
        image.seek(12345)
        original = image.read(1)[0]
        image.seek(12345)
        image.write(bytes([original ^ 0x01]))
    with pytest.raises(CorruptCheckpointError, match="pages-1.img fails its sha256 check"):
        plain_store.verify("job1", 1)
