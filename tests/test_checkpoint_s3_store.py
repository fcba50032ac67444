"""S3CheckpointStore without CRIU: upload order, downloads and their checks, garbage collection and an unreachable endpoint."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import pytest

from checker.errors import CheckerError, CorruptCheckpointError, ErrorCode
from checker.store.s3 import S3CheckpointStore, S3Location, create_s3_client
from demo.s3client import TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY
from demo.s3server import DemoS3Server
from test_checkpoint_store import PAGES, write_checkpoint


@pytest.fixture(scope="module")
def s3_endpoint():
    with DemoS3Server() as s3_server:
        yield s3_server.endpoint_url


@pytest.fixture
def s3_credentials(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", TEST_REGION)


def new_store(root: Path, endpoint: str, bucket: str) -> S3CheckpointStore:
    return S3CheckpointStore(root, S3Location(bucket, "prefix"), create_s3_client(endpoint), fsync=False, endpoint_url=endpoint)


@pytest.fixture
def bucket(s3_endpoint: str, s3_credentials) -> str:
    """A new bucket for one test, because moto keeps every bucket for the whole process."""
    name = f"store-{secrets.token_hex(6)}"
    create_s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def store(tmp_path: Path, s3_endpoint: str, bucket: str) -> S3CheckpointStore:
    return new_store(tmp_path / "first", s3_endpoint, bucket)


@pytest.fixture
def fresh_store(tmp_path: Path, s3_endpoint: str, bucket: str) -> S3CheckpointStore:
    """A second store on the same bucket with an empty local directory, as on another server."""
    return new_store(tmp_path / "second", s3_endpoint, bucket)


def object_keys(store: S3CheckpointStore) -> set[str]:
    listing = store._client.list_objects_v2(Bucket=store.bucket.bucket)
    return {item["Key"] for item in listing.get("Contents", ())}


def chunk_keys(store: S3CheckpointStore, job_id: str = "job1") -> set[str]:
    return {key for key in object_keys(store) if key.startswith(f"prefix/{job_id}/chunks/")}


def test_commit_uploads_chunks_and_manifest(store: S3CheckpointStore) -> None:
    write_checkpoint(store)

    manifest = store.read_manifest("job1", 1)
    keys = object_keys(store)
    uploaded = {key.rsplit("/", 1)[1].removesuffix(".zst") for key in chunk_keys(store)}
    assert "prefix/job1/1/manifest.json" in keys
    assert uploaded == manifest.chunk_digests()


def test_fresh_store_restores_from_bucket(store: S3CheckpointStore, fresh_store: S3CheckpointStore) -> None:
    write_checkpoint(store)

    manifest = fresh_store.read_manifest("job1", 1)
    image = fresh_store.prepare_restore(manifest)
    try:
        pages = (image.directory / "pages-1.img").read_bytes()
    finally:
        fresh_store.release_restore(image)
    assert image.verified
    assert pages == PAGES
    assert fresh_store.chunk_directory("job1").path.is_dir()


def test_fresh_store_rejects_damaged_chunk(store: S3CheckpointStore, fresh_store: S3CheckpointStore) -> None:
    write_checkpoint(store)
    damaged_key = sorted(chunk_keys(store))[0]
    damaged = damaged_key.rsplit("/", 1)[1]
    store._client.put_object(Bucket=store.bucket.bucket, Key=damaged_key, Body=b"damaged")

    manifest = fresh_store.read_manifest("job1", 1)
    with pytest.raises(CorruptCheckpointError) as raised:
        fresh_store.prepare_restore(manifest)
    assert damaged.removesuffix(".zst") in raised.value.message
    assert not (fresh_store.chunk_directory("job1").path / damaged).exists()


def test_fresh_store_reports_missing_chunk(store: S3CheckpointStore, fresh_store: S3CheckpointStore) -> None:
    write_checkpoint(store)
    missing_key = sorted(chunk_keys(store))[0]
    store._client.delete_object(Bucket=store.bucket.bucket, Key=missing_key)

    with pytest.raises(CorruptCheckpointError) as raised:
        fresh_store.verify("job1", 1)
    assert missing_key.rsplit("/", 1)[1].removesuffix(".zst") in raised.value.message
    assert "missing" in raised.value.message


def test_manifest_missing_means_never_completed(fresh_store: S3CheckpointStore) -> None:
    with pytest.raises(CorruptCheckpointError) as raised:
        fresh_store.read_manifest("job1", 7)
    assert "never completed" in raised.value.message
    assert "prefix/job1/7/manifest.json" in raised.value.message


def test_garbage_collection_keeps_listed_chunks(store: S3CheckpointStore) -> None:
    write_checkpoint(store, 1)
    write_checkpoint(store, 2, pages=PAGES[::-1])
    first = store.read_manifest("job1", 1).chunk_digests()
    second = store.read_manifest("job1", 2).chunk_digests()

    store.delete("job1", 1)
    store.collect_garbage("job1")

    left = {key.rsplit("/", 1)[1].removesuffix(".zst") for key in chunk_keys(store)}
    assert first - second
    assert left == second
    assert "prefix/job1/1/manifest.json" not in object_keys(store)


def test_chunks_without_manifest_deleted_at_start(store: S3CheckpointStore, tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    # Chunks uploaded by a commit that crashed before its manifest upload.
    store._client.put_object(Bucket=bucket, Key="prefix/job2/chunks/" + "0" * 64, Body=b"orphan")
    write_checkpoint(store)
    kept = chunk_keys(store)

    restarted = new_store(tmp_path / "first", s3_endpoint, bucket)
    restarted.remove_partial()

    assert chunk_keys(restarted, "job2") == set()
    assert chunk_keys(restarted) == kept


def test_non_json_manifest_object_keeps_nothing(store: S3CheckpointStore) -> None:
    write_checkpoint(store)
    store._client.put_object(Bucket=store.bucket.bucket, Key="prefix/job1/1/manifest.json", Body=b"{not json")

    store.collect_garbage("job1")

    assert chunk_keys(store) == set()


def test_delete_job_removes_every_object(store: S3CheckpointStore) -> None:
    write_checkpoint(store)

    assert store.delete_job("job1") is True
    assert not {key for key in object_keys(store) if key.startswith("prefix/job1/")}
    assert store.has_job("job1") is False


def unused_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_endpoint_fails_commit(tmp_path: Path, s3_credentials) -> None:
    endpoint = f"http://127.0.0.1:{unused_loopback_port()}"
    store = new_store(tmp_path / "state", endpoint, "checkpoints")

    with pytest.raises(OSError) as raised:
        write_checkpoint(store)
    assert "checkpoint 1 of job job1" in str(raised.value)
    assert not (store.location("job1", 1) / "manifest.json").exists()


def test_unreachable_endpoint_fails_download(tmp_path: Path, store: S3CheckpointStore, s3_credentials) -> None:
    write_checkpoint(store)
    endpoint = f"http://127.0.0.1:{unused_loopback_port()}"
    cut_off = new_store(tmp_path / "second", endpoint, store.bucket.bucket)

    with pytest.raises(CheckerError) as raised:
        cut_off.read_manifest("job1", 1)
    assert raised.value.code == ErrorCode.UNAVAILABLE
    assert "checkpoint 1 of job job1" in raised.value.message
