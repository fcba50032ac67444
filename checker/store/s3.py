"""Checkpoint store in an S3 bucket, with the local store as staging area and cache.

Objects under `s3://<bucket>/<prefix>/`::

    <job id>/chunks/<sha256>[.zst]     the job's chunks, named as in checker.store.chunks
    <job id>/<number>/manifest.json    the manifest of a complete checkpoint (format 3)

The local state directory keeps the staging directories, the restore cache
of each job's newest checkpoint, a copy of each manifest read or written, and
the chunks of the job's retained checkpoints (see checker.store.checkpoints).
It is a cache: a server with an empty state directory restores from the
bucket alone.

A checkpoint exists only once its manifest object exists. `commit` uploads
the chunks that the bucket lacks in parallel, then the manifest, and only
then writes the local manifest. A crash before the manifest upload leaves
chunk objects that no manifest lists, and garbage collection deletes them.

Deletion removes the manifest object first, and garbage collection deletes
a chunk object only when no manifest object of the job lists it, so a crash
during either step loses no chunk that a complete checkpoint references.
Garbage collection must not run while a checkpoint of the job is being
uploaded, which the local store's rule already ensures for one server.
Two servers must not share one bucket prefix.

Restore downloads the chunks missing from the local cache in parallel. Each
one is checked against its sha256 name and its size in the manifest before
it gets a local name. A damaged object raises CorruptCheckpointError, so the
job restores from its previous checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checker.errors import CheckerError, CorruptCheckpointError, ErrorCode
from checker.store.checkpoints import (
    CHUNKS_DIR,
    MANIFEST_NAME,
    GarbageCollected,
    LocalCheckpointStore,
    Manifest,
    RestoreImage,
    referenced_chunks,
)
from checker.store.chunks import ZSTD_SUFFIX, is_chunk_name, pause_point

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"
TRANSFER_THREADS = 8
"""Chunk objects uploaded or downloaded at once."""
MULTIPART_THRESHOLD_BYTES = 16 << 20
"""Objects from this size on are uploaded in parts.

NOTE: chunks are at most 2 MiB and a manifest lists about 100 bytes per
chunk, so no object reaches this size in practice, and no test uploads
one in parts."""
DELETE_BATCH = 1000
"""Most keys one DeleteObjects request accepts (an S3 API limit)."""

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3StoreError(Exception):
    """The bucket of an S3 checkpoint store cannot be used."""


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix, parsed from `s3://BUCKET/PREFIX`."""

    bucket: str
    prefix: str
    """Key prefix without leading or trailing slashes; empty for the whole bucket."""

    def key(self, *parts: str) -> str:
        return "/".join(part for part in (self.prefix, *parts) if part)

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{S3_SCHEME}{self.bucket}"


def parse_s3_url(url: str) -> S3Location:
    """Parse `s3://BUCKET/PREFIX`; raise ValueError naming the URL and the problem."""
    if not url.startswith(S3_SCHEME):
        raise ValueError(f"checkpoint store {url!r} is invalid; give s3://BUCKET/PREFIX, or omit --checkpoint-store for the local store")
    bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise ValueError(
            f"checkpoint store {url!r} has an invalid bucket name {bucket!r}; "
            "a bucket name has 3 to 63 lowercase letters, digits, dots or hyphens and starts and ends with a letter or digit"
        )
    prefix = prefix.strip("/")
    if "//" in prefix:
        raise ValueError(f"checkpoint store {url!r} has an empty path segment in its prefix {prefix!r}; remove the doubled slash")
    return S3Location(bucket, prefix)


def create_s3_client(endpoint_url: str | None) -> Any:
    """Create a boto3 S3 client (boto3 comes with the `s3` extra); credentials and region come from boto3's usual sources (environment, config files, instance role).

    Path-style addressing is used with an explicit endpoint, because
    S3-compatible servers on a plain host and port seldom serve
    bucket subdomains.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        max_pool_connections=2 * TRANSFER_THREADS,
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


@contextmanager
def raising_os_error(action: str) -> Iterator[None]:
    """Turn boto3's errors during `action` into OSError, which the runner reports as a checkpoint that could not be stored."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as error:
        raise OSError(f"{action} failed: {error}") from error


@contextmanager
def raising_unavailable(action: str) -> Iterator[None]:
    """Turn boto3's errors during `action` into a CheckerError with code `unavailable`.

    NOTE: the runner fails a job whose restore raises this, although the
    bucket may be reachable again later; boto3 has already retried by then.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as error:
        raise CheckerError(ErrorCode.UNAVAILABLE, f"{action} failed: {error}; check that the S3 endpoint is reachable") from error


@contextmanager
def logging_errors(action: str) -> Iterator[None]:
    """Log boto3's errors during `action` instead of raising them, for deletions that the next retention or start repeats."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError, OSError) as error:
        logger.warning("%s failed: %s; it is tried again at the next retention or server start", action, error)


class S3CheckpointStore(LocalCheckpointStore):
    """Checkpoint images as chunks and manifests in an S3 bucket, staged and cached under a local directory."""

    def __init__(
        self,
        root: Path,
        location: S3Location,
        client: Any,
        fsync: bool = True,
        hash_threads: int = 4,
        compression_level: int | None = 1,
        endpoint_url: str | None = None,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        super().__init__(root, fsync=fsync, hash_threads=hash_threads, compression_level=compression_level, dedupe=True)
        self.stores_job_logs = True
        self.bucket = location
        self.endpoint_url = endpoint_url
        self._client = client
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD_BYTES, max_concurrency=TRANSFER_THREADS)
        self._transfer_pool = ThreadPoolExecutor(max_workers=TRANSFER_THREADS, thread_name_prefix="checkpoint-s3")
        self._manifest_lock = threading.Lock()

    def check_bucket(self) -> None:
        """Raise S3StoreError when the bucket does not exist or the credentials cannot reach it."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket.bucket)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "unknown")
            raise S3StoreError(
                f"checkpoint store {self.bucket} at {self._endpoint_name()} is not usable: HeadBucket returned {code}; "
                "create the bucket, or check the credentials and --s3-endpoint-url"
            ) from None
        except BotoCoreError as error:
            raise S3StoreError(f"checkpoint store {self.bucket} at {self._endpoint_name()} is not reachable: {error}; check --s3-endpoint-url") from None

    def _endpoint_name(self) -> str:
        return self.endpoint_url or "the default S3 endpoint"

    # Keys

    def _chunk_prefix(self, job_id: str) -> str:
        return self.bucket.key(job_id, CHUNKS_DIR) + "/"

    def _manifest_key(self, job_id: str, number: int) -> str:
        return self.bucket.key(job_id, str(number), MANIFEST_NAME)

    def _list_keys(self, prefix: str) -> list[str]:
        keys = []
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", ()))
        return keys

    def _remote_chunks(self, job_id: str) -> dict[str, str]:
        """Return {digest: object name} of the job's chunk objects."""
        prefix = self._chunk_prefix(job_id)
        names = (key[len(prefix):] for key in self._list_keys(prefix))
        return {name.removesuffix(ZSTD_SUFFIX): name for name in names if is_chunk_name(name)}

    def _remote_manifest_keys(self, job_id: str) -> list[str]:
        prefix = self.bucket.key(job_id) + "/"
        return [key for key in self._list_keys(prefix) if key.endswith("/" + MANIFEST_NAME) and key[len(prefix):].split("/")[0].isdigit()]

    # Commit

    def _publish(self, manifest: Manifest) -> None:
        """Upload the checkpoint's chunks that the bucket lacks, in parallel, then its manifest."""
        with raising_os_error(f"upload of checkpoint {manifest.checkpoint} of job {manifest.job_id} to {self.bucket}"):
            self._upload(manifest)

    def _upload(self, manifest: Manifest) -> None:
        chunks = self.chunk_directory(manifest.job_id)
        remote = self._remote_chunks(manifest.job_id)
        missing = sorted(manifest.chunk_digests() - remote.keys())
        paths = []
        for digest in missing:
            path = chunks.stored_path(digest)
            if path is None:
                raise CorruptCheckpointError(f"checkpoint {manifest.checkpoint} of job {manifest.job_id}: chunk {digest} is missing from {chunks.path}")
            paths.append(path)
        prefix = self._chunk_prefix(manifest.job_id)
        for _ in self._transfer_pool.map(lambda path: self._upload_file(path, prefix + path.name), paths):
            pass

        # The manifest object appears only when its upload completes, also when it is uploaded in parts.
        body = io.BytesIO(json_bytes(manifest))
        self._client.upload_fileobj(body, self.bucket.bucket, self._manifest_key(manifest.job_id, manifest.checkpoint), Config=self._transfer)
        logger.info(
            "job %s: checkpoint %d uploaded to %s: %d new chunk(s) of %d",
            manifest.job_id, manifest.checkpoint, self.bucket, len(missing), len(manifest.chunk_digests()),
        )

    def _upload_file(self, path: Path, key: str) -> None:
        self._client.upload_file(str(path), self.bucket.bucket, key, Config=self._transfer)

    # Read and restore

    def _read_manifest_text(self, job_id: str, number: int) -> str:
        """Return the local copy of the manifest, downloading it from the bucket first when the local one is missing."""
        local = self.location(job_id, number) / MANIFEST_NAME
        if local.exists():
            return local.read_text()
        key = self._manifest_key(job_id, number)
        with raising_unavailable(f"download of the manifest of checkpoint {number} of job {job_id} from {self.bucket}"):
            try:
                response = self._client.get_object(Bucket=self.bucket.bucket, Key=key)
            except self._client.exceptions.NoSuchKey:
                raise CorruptCheckpointError(f"checkpoint {number} of job {job_id} has no manifest at {self.bucket}/{key}; it was never completed") from None
            text = response["Body"].read().decode()
        with self._manifest_lock:
            local.parent.mkdir(parents=True, exist_ok=True)
            temporary = local.with_name(MANIFEST_NAME + ".tmp")
            temporary.write_text(text)
            temporary.rename(local)
        return text

    def fetch_chunks(self, manifest: Manifest) -> int:
        """Download the manifest's chunks missing from the local cache, in parallel, each checked against its name and size; return how many.

        Raises CorruptCheckpointError naming the first chunk object that is
        missing or fails its check; that chunk is not kept.
        """
        with raising_unavailable(f"download of the chunks of checkpoint {manifest.checkpoint} of job {manifest.job_id} from {self.bucket}"):
            return self._download_missing_chunks(manifest)

    def _download_missing_chunks(self, manifest: Manifest) -> int:
        chunks = self.chunk_directory(manifest.job_id)
        sizes = {digest: size for entry in manifest.files for _, size, digest in entry.extents()}
        missing = sorted(digest for digest in sizes if chunks.stored_path(digest) is None)
        if not missing:
            return 0
        remote = self._remote_chunks(manifest.job_id)
        where = f"checkpoint {manifest.checkpoint} of job {manifest.job_id}"
        for digest in missing:
            if digest not in remote:
                raise CorruptCheckpointError(f"{where}: chunk {digest} is missing from {self.bucket}")
        prefix = self._chunk_prefix(manifest.job_id)

        def download(digest: str) -> None:
            name = remote[digest]
            try:
                stored = self._client.get_object(Bucket=self.bucket.bucket, Key=prefix + name)["Body"].read()
            except self._client.exceptions.NoSuchKey:
                raise CorruptCheckpointError(f"{where}: chunk {digest} is missing from {self.bucket}") from None
            chunks.decode(name, stored, f"{where} (object {prefix + name})", sizes[digest])
            chunks.install(name, stored)

        for _ in self._transfer_pool.map(download, missing):
            pass
        logger.info("job %s: downloaded %d chunk(s) of checkpoint %d from %s", manifest.job_id, len(missing), manifest.checkpoint, self.bucket)
        return len(missing)

    def prepare_restore(self, manifest: Manifest, use_cache: bool = True) -> RestoreImage:
        if not (use_cache and self._cache_is_complete(manifest, self.cache_location(manifest.job_id, manifest.checkpoint))):
            self.fetch_chunks(manifest)
        return super().prepare_restore(manifest, use_cache)

    def _check_chunks_exist(self, manifest: Manifest) -> None:
        self.fetch_chunks(manifest)

    def verify(self, job_id: str, number: int) -> Manifest:
        self.fetch_chunks(self.read_manifest(job_id, number))
        return super().verify(job_id, number)

    def copy(self, source_job_id: str, number: int, target_job_id: str) -> Manifest:
        """Copy a checkpoint to another job locally, then upload the target's chunks and manifest as `commit` does."""
        self.fetch_chunks(self.read_manifest(source_job_id, number))
        copied = super().copy(source_job_id, number, target_job_id)
        self._publish(copied)
        return copied

    # Deletion and garbage collection

    def delete(self, job_id: str, number: int) -> None:
        """Delete the checkpoint's manifest object, then its local directory; its chunks go at the next `collect_garbage`."""
        with logging_errors(f"job {job_id}: deletion of checkpoint {number} from {self.bucket}"):
            self._client.delete_object(Bucket=self.bucket.bucket, Key=self._manifest_key(job_id, number))
        super().delete(job_id, number)

    def collect_garbage(self, job_id: str) -> GarbageCollected:
        """Delete the local chunks and the chunk objects of job `job_id` that no manifest lists.

        Local chunks are kept by local manifests, and chunk objects by
        manifest objects. A manifest object that is not JSON keeps nothing,
        as in the local store.
        """
        local = super().collect_garbage(job_id)
        deleted = 0
        with logging_errors(f"job {job_id}: garbage collection in {self.bucket}"):
            deleted = self._collect_remote_garbage(job_id)
        return GarbageCollected(checkpoints=0, chunks=local.chunks + deleted, chunk_bytes=local.chunk_bytes)

    def _collect_remote_garbage(self, job_id: str) -> int:
        """Delete the chunk objects of the job that no manifest object lists; return how many."""
        with self._job_lock(job_id):
            referenced: set[str] = set()
            for key in self._remote_manifest_keys(job_id):
                text = self._client.get_object(Bucket=self.bucket.bucket, Key=key)["Body"].read().decode(errors="replace")
                listed = referenced_chunks(text)
                if listed is None:
                    logger.warning("job %s: %s/%s is not JSON; its chunks are not kept", job_id, self.bucket, key)
                    continue
                referenced |= listed
            prefix = self._chunk_prefix(job_id)
            doomed = [prefix + name for digest, name in self._remote_chunks(job_id).items() if digest not in referenced]
            if doomed:
                pause_point("s3-chunk-sweep", self.root)
            self._delete_keys(doomed)
        if doomed:
            logger.info("job %s: deleted %d unreferenced chunk object(s) from %s", job_id, len(doomed), self.bucket)
        return len(doomed)

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start:start + DELETE_BATCH]]
            response = self._client.delete_objects(Bucket=self.bucket.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = response.get("Errors", ())
            if errors:
                first = errors[0]
                raise OSError(f"deleting {len(errors)} object(s) from {self.bucket} failed, first {first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    def delete_job(self, job_id: str) -> bool:
        """Delete every checkpoint and chunk of a job, locally and in the bucket: manifests first, then chunks."""
        local = super().delete_job(job_id)
        manifests: list[str] = []
        rest: list[str] = []
        with logging_errors(f"job {job_id}: deletion of its objects from {self.bucket}"):
            manifests = self._remote_manifest_keys(job_id)
            self._delete_keys(manifests)
            rest = self._list_keys(self.bucket.key(job_id) + "/")
            self._delete_keys(rest)
        return local or bool(manifests or rest)

    def has_job(self, job_id: str) -> bool:
        if super().has_job(job_id):
            return True
        with logging_errors(f"job {job_id}: listing of its objects in {self.bucket}"):
            response = self._client.list_objects_v2(Bucket=self.bucket.bucket, Prefix=self.bucket.key(job_id) + "/", MaxKeys=1)
            return bool(response.get("KeyCount"))
        return False

    def remove_partial(self) -> list[Path]:
        """Delete what a crash left locally, then the chunk objects of every job in the bucket that no manifest object lists."""
        removed = super().remove_partial()
        prefix = self.bucket.key() + "/" if self.bucket.prefix else ""
        job_ids: set[str] = set()
        with logging_errors(f"listing of the jobs in {self.bucket}"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket.bucket, Prefix=prefix, Delimiter="/"):
                job_ids.update(common["Prefix"][len(prefix):].rstrip("/") for common in page.get("CommonPrefixes", ()))
        for job_id in sorted(job_ids):
            self.collect_garbage(job_id)
        return removed


def json_bytes(manifest: Manifest) -> bytes:
    return json.dumps(manifest.to_json(), indent=1).encode()
