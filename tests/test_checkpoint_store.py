"""The checkpoint store: manifest formats 1 and 2, chunks, and every way an image can be invalid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from checker.errors import CorruptCheckpointError
from checker.store.checkpoints import MANIFEST_NAME, LocalCheckpointStore
from checker.store.chunks import CHUNK_BYTES, ZSTD_SUFFIX

PAGES = os.urandom(3 * CHUNK_BYTES + 5000)
"""A page image of three whole chunks and a short one, incompressible like most heaps."""
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
    manifest = store.read_manifest("job1", number)
    directory = store.prepare_restore(manifest)
    try:
        store.verify_files(manifest, directory)
        return (directory / "pages-1.img").read_bytes()
    finally:
        store.release_restore(manifest, directory)


# Format 2: chunks


def test_chunked_commit_then_verify_passes(store) -> None:
    directory = write_checkpoint(store)
    manifest = store.verify("job1", 1)
    assert manifest.format_version == 2
    assert [f.path for f in manifest.files] == ["core-1.img", "pages-1.img"]
    assert manifest.image_bytes == len(PAGES) + len(CORE)
    assert len(manifest.files[1].chunks) == 4
    assert sorted(p.name for p in directory.iterdir()) == [MANIFEST_NAME]
    assert not (directory.parent / "1.partial").exists()


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
    assert 0 < second.stored_bytes < CHUNK_BYTES * 1.01
    assert len(chunk_files(store)) == 5 + 1
    assert rebuilt_pages(store, 2) == bytes(changed)


def test_compressible_image_is_compressed(store) -> None:
    write_checkpoint(store, pages=b"\x00\x01" * (2 * CHUNK_BYTES))
    manifest = store.read_manifest("job1", 1)
    assert manifest.compression == "zstd"
    assert manifest.stored_bytes < 100_000
    assert all(p.name.endswith(ZSTD_SUFFIX) for p in chunk_files(store))


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
        store.prepare_restore(store.read_manifest("job1", 1))
    assert not (store.root / "job1" / "1.restore").exists()


def test_truncated_chunk_is_detected(store) -> None:
    write_checkpoint(store)
    chunk = pages_chunk(store, 0)
    os.truncate(chunk, chunk.stat().st_size // 2)
    with pytest.raises(CorruptCheckpointError, match="not a valid zstd frame"):
        store.verify("job1", 1)


def test_truncated_raw_chunk_is_detected(tmp_path) -> None:
    store = LocalCheckpointStore(tmp_path / "checkpoints", compression_level=None)
    write_checkpoint(store)
    chunk = pages_chunk(store, 0)
    os.truncate(chunk, 1000)
    with pytest.raises(CorruptCheckpointError, match="fails its sha256 check"):
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
        store.prepare_restore(store.read_manifest("job1", 1))


def test_wrong_file_sha256_is_detected(store) -> None:
    directory = write_checkpoint(store)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["files"][1]["sha256"] = "0" * 64
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="pages-1.img fails its sha256 check"):
        store.verify("job1", 1)


def test_chunk_list_shorter_than_file_is_rejected(store) -> None:
    directory = write_checkpoint(store)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["files"][1]["chunks"].pop()
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="lists 3 chunks for pages-1.img"):
        store.verify("job1", 1)


def test_unknown_format_version_is_rejected(store) -> None:
    directory = write_checkpoint(store)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["format_version"] = 3
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=r"format version 3; this Checker reads version\(s\) \[1, 2\]"):
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
    assert len(chunk_files(store)) == 5
    assert store.verify("job1", 2).checkpoint == 2


def test_garbage_collection_keeps_chunks_of_newer_format(store) -> None:
    directory = write_checkpoint(store)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["format_version"] = 3
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert store.collect_garbage("job1").chunks == 0


def test_copy_survives_deletion_of_source(store) -> None:
    write_checkpoint(store)
    store.copy("job1", 1, "fork1")
    store.delete_job("job1")
    assert store.verify("fork1", 1).job_id == "fork1"
    assert len(chunk_files(store, "fork1")) == 5


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
    assert plain_store.prepare_restore(manifest) == directory


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
