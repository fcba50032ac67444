"""The checkpoint manifest: every way an image can be invalid is detected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checker.errors import CorruptCheckpointError
from checker.store.checkpoints import MANIFEST_NAME, LocalCheckpointStore


@pytest.fixture
def store(tmp_path: Path) -> LocalCheckpointStore:
    return LocalCheckpointStore(tmp_path / "checkpoints")


def write_checkpoint(store: LocalCheckpointStore, number: int = 1) -> Path:
    staging = store.begin("job1", number)
    (staging / "pages-1.img").write_bytes(bytes(range(256)) * 1000)
    (staging / "core-1.img").write_bytes(b"core image")
    store.commit(staging, job_id="job1", number=number, parent=None, runtime="process", criu_version="4.2.1", job_files={"stdout": 5, "stderr": 0})
    return store.location("job1", number)


def test_commit_then_verify_passes(store) -> None:
    directory = write_checkpoint(store)
    manifest = store.verify("job1", 1)
    assert [f.path for f in manifest.files] == ["core-1.img", "pages-1.img"]
    assert manifest.image_bytes == 256_000 + len(b"core image")
    assert manifest.job_files == {"stdout": 5, "stderr": 0}
    assert not (directory.parent / "1.partial").exists()


def test_missing_manifest_is_detected(store) -> None:
    directory = write_checkpoint(store)
    (directory / MANIFEST_NAME).unlink()
    with pytest.raises(CorruptCheckpointError, match="no manifest"):
        store.verify("job1", 1)


def test_missing_file_is_detected(store) -> None:
    directory = write_checkpoint(store)
    (directory / "core-1.img").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing image file core-1.img"):
        store.verify("job1", 1)


def test_truncated_file_is_detected(store) -> None:
    directory = write_checkpoint(store)
    with open(directory / "pages-1.img", "r+b") as image:
        image.truncate(1000)
    with pytest.raises(CorruptCheckpointError, match="pages-1.img has 1000 bytes"):
        store.verify("job1", 1)


def test_flipped_byte_is_detected(store) -> None:
    directory = write_checkpoint(store)
    with open(directory / "pages-1.img", "r+b") as image:
        image.seek(12345)
        original = image.read(1)[0]
        image.seek(12345)
        image.write(bytes([original ^ 0x01]))
    with pytest.raises(CorruptCheckpointError, match="pages-1.img fails its sha256 check"):
        store.verify("job1", 1)


def test_unknown_format_version_is_rejected(store) -> None:
    directory = write_checkpoint(store)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["format_version"] = 2
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="format version 2"):
        store.verify("job1", 1)


def test_garbled_manifest_is_rejected(store) -> None:
    directory = write_checkpoint(store)
    (directory / MANIFEST_NAME).write_text('{"format": "checker-checkpoint", "format_version": 1')
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        store.verify("job1", 1)


def test_manifest_of_other_checkpoint_is_rejected(store) -> None:
    write_checkpoint(store, 1)
    second = write_checkpoint(store, 2)
    first_manifest = (store.location("job1", 1) / MANIFEST_NAME).read_text()
    (second / MANIFEST_NAME).write_text(first_manifest)
    with pytest.raises(CorruptCheckpointError, match="belongs to job job1 checkpoint 1"):
        store.verify("job1", 2)


def test_partial_checkpoints_are_removed(store) -> None:
    staging = store.begin("job1", 7)
    (staging / "pages-1.img").write_bytes(b"half written")
    removed = store.remove_partial()
    assert removed == [staging]
    assert not staging.exists()
