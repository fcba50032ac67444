"""Tests of the demo parts: document generator, loopback S3 server ledger and the parse job.

They run moto in server mode on 127.0.0.1 and talk to it with boto3, and they
run the job script standalone, where the Checker SDK takes no checkpoints.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import urllib.parse
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from demo.aggregate import CityAggregate  # noqa: E402
from demo.dataset import ID_STRIDE, iter_document_chunks, load_cities, upload_document  # noqa: E402
from demo.s3client import create_s3_client  # noqa: E402
from demo.s3server import WRITE_SLICE_BYTES, DemoS3Server  # noqa: E402

JOB_SCRIPT = REPO_ROOT / "demo" / "parse_job.py"
JOB_TIMEOUT_SECONDS = 120
LEDGER_WAIT_SECONDS = 5.0


@pytest.fixture(scope="module")
def s3_server() -> Iterator[DemoS3Server]:
    server = DemoS3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_client(s3_server: DemoS3Server) -> Any:
    return create_s3_client(s3_server.endpoint_url)


@pytest.fixture
def bucket(s3_client: Any) -> str:
    name = f"demo-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


def aggregate_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    aggregate = CityAggregate()
    for record in records:
        aggregate.add(record)
    return aggregate.to_dict()


def test_document_parses_to_expected_aggregate() -> None:
    target_bytes = 2_000_000
    expected = CityAggregate()
    document = b"".join(iter_document_chunks(target_bytes, expected, chunk_bytes=64 * 1024))

    records = json.loads(document)

    assert isinstance(records, list)
    assert len(document) >= target_bytes
    assert len(document) - target_bytes < 10_000
    assert len(records) == expected.record_count
    assert len({record["id"] for record in records}) == len(records)
    assert aggregate_records(records) == expected.to_dict()


def test_document_repeats_tiles_with_new_ids() -> None:
    records = json.loads(b"".join(iter_document_chunks(20_000_000, CityAggregate())))
    first_tile = {record["geonameid"]: record for record in records if record["id"] < ID_STRIDE}
    second_tile = [record for record in records if ID_STRIDE <= record["id"] < 2 * ID_STRIDE]
    changed_populations = [
        record for record in second_tile if record["population"] != first_tile[record["geonameid"]]["population"]
    ]

    assert len({record["id"] for record in records}) == len(records)
    assert len(first_tile) == len(load_cities())
    assert second_tile
    assert all(record["id"] == ID_STRIDE + record["geonameid"] for record in second_tile)
    assert len(changed_populations) > len(second_tile) // 2


def test_document_is_deterministic() -> None:
    first = b"".join(iter_document_chunks(1_000_000, CityAggregate()))
    second = b"".join(iter_document_chunks(1_000_000, CityAggregate()))
    other_seed = b"".join(iter_document_chunks(20_000_000, CityAggregate(), seed=7))
    same_seed = b"".join(iter_document_chunks(20_000_000, CityAggregate()))

    assert first == second
    assert other_seed != same_seed


def test_aggregate_orders_top_cities() -> None:
    aggregate = CityAggregate(top_count=3)
    for city_id, population in [(5, 100), (3, 300), (4, 300), (1, 50), (2, 200)]:
        aggregate.add({"id": city_id, "name": f"city {city_id}", "countrycode": "XX", "population": population})

    result = aggregate.to_dict()

    assert [city["id"] for city in result["top_cities"]] == [3, 4, 2]
    assert result["population_by_country"] == {"XX": 950}
    assert result["records"] == 5


def test_ledger_counts_two_range_gets(s3_server: DemoS3Server, s3_client: Any, bucket: str) -> None:
    content = bytes(range(256)) * 40
    s3_client.put_object(Bucket=bucket, Key="data.bin", Body=content)

    first = s3_client.get_object(Bucket=bucket, Key="data.bin", Range="bytes=0-999")["Body"].read()
    second = s3_client.get_object(Bucket=bucket, Key="data.bin", Range="bytes=1000-10239")["Body"].read()
    assert s3_server.ledger.wait_until_idle(LEDGER_WAIT_SECONDS)
    reads = s3_server.ledger.reads(bucket, "data.bin")
    summary = s3_server.ledger.summarize(bucket, "data.bin")

    assert first == content[:1000]
    assert second == content[1000:]
    assert [(read.start, read.end) for read in reads] == [(0, 999), (1000, 10239)]
    assert [read.bytes_sent for read in reads] == [1000, 9240]
    assert [read.range_header for read in reads] == ["bytes=0-999", "bytes=1000-10239"]
    assert all(read.status == 206 and read.complete for read in reads)
    assert summary.requests == 2
    assert summary.bytes_sent == len(content)
    assert summary.distinct_bytes == len(content)
    assert summary.repeated_ranges == []


def test_ledger_reports_repeated_range(s3_server: DemoS3Server, s3_client: Any, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="data.bin", Body=b"x" * 5000)

    for byte_range in ["bytes=0-1999", "bytes=1000-2999", "bytes=0-1999"]:
        s3_client.get_object(Bucket=bucket, Key="data.bin", Range=byte_range)["Body"].read()
    assert s3_server.ledger.wait_until_idle(LEDGER_WAIT_SECONDS)
    summary = s3_server.ledger.summarize(bucket, "data.bin")

    assert summary.requests == 3
    assert summary.bytes_sent == 6000
    assert summary.distinct_bytes == 3000
    assert summary.repeated_ranges == [(0, 1999)]


def test_ledger_ignores_other_requests(s3_server: DemoS3Server, s3_client: Any, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="data.bin", Body=b"y" * 100)

    s3_client.head_object(Bucket=bucket, Key="data.bin")
    s3_client.list_objects_v2(Bucket=bucket)
    s3_client.get_object_tagging(Bucket=bucket, Key="data.bin")
    s3_client.get_object(Bucket=bucket, Key="data.bin")["Body"].read()
    assert s3_server.ledger.wait_until_idle(LEDGER_WAIT_SECONDS)
    reads = s3_server.ledger.reads(bucket)

    assert len(reads) == 1
    assert (reads[0].start, reads[0].end, reads[0].status) == (0, 99, 200)
    assert reads[0].range_header is None
    assert reads[0].bytes_sent == 100


def test_ledger_marks_interrupted_read(s3_server: DemoS3Server, s3_client: Any, bucket: str) -> None:
    size = 32 * 1024 * 1024
    s3_client.put_object(Bucket=bucket, Key="large.bin", Body=b"z" * size)

    url = urllib.parse.urlsplit(
        s3_client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "large.bin"})
    )
    request = (
        f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Range: bytes=0-{size - 1}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", s3_server.port), timeout=10) as connection:
        connection.sendall(request.encode("ascii"))
        received = b""
        while len(received) < 512 * 1024:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
        # Linger 0 makes close() reset the connection, so the server's next write fails.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert s3_server.ledger.wait_until_idle(LEDGER_WAIT_SECONDS)
    reads = s3_server.ledger.reads(bucket, "large.bin")

    body_received = len(received) - (received.index(b"\r\n\r\n") + 4)

    assert received.startswith(b"HTTP/1.1 206")
    assert len(reads) == 1
    assert reads[0].complete is False
    assert (reads[0].start, reads[0].end) == (0, size - 1)
    # Bytes the client received were written by completed slice writes, except
    # possibly the last slice, which may have been received only in part.
    assert reads[0].bytes_sent >= body_received - WRITE_SLICE_BYTES
    assert reads[0].bytes_sent < size
    assert s3_server.ledger.summarize(bucket, "large.bin").incomplete_reads == 1


def test_upload_stores_generated_document(s3_client: Any, bucket: str) -> None:
    part_bytes = 5 * 1024 * 1024
    size, expected = upload_document(s3_client, bucket, "cities.json", 11_000_000, part_bytes=part_bytes)

    stored = s3_client.get_object(Bucket=bucket, Key="cities.json")["Body"].read()
    generated = b"".join(iter_document_chunks(11_000_000, CityAggregate()))

    assert size == len(stored)
    assert stored == generated
    assert aggregate_records(json.loads(stored)) == expected


def test_parse_job_standalone_matches_expected(s3_server: DemoS3Server, s3_client: Any, bucket: str, tmp_path: Path) -> None:
    # An odd range size splits records, numbers and multi-byte UTF-8 characters across ranges.
    range_size = 1_000_003
    size, expected = upload_document(s3_client, bucket, "cities.json", 6_000_000)
    params = {"endpoint_url": s3_server.endpoint_url, "bucket": bucket, "key": "cities.json", "range_size": range_size}
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CHECKER_")}
    environment["CHECKER_PARAMS"] = json.dumps(params)
    environment.pop("PYTHONPATH", None)

    completed = subprocess.run(
        [sys.executable, str(JOB_SCRIPT)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_SECONDS,
    )
    lines = completed.stdout.splitlines()
    progress = [line for line in lines if line.startswith("progress ")]
    range_count = -(-size // range_size)
    assert s3_server.ledger.wait_until_idle(LEDGER_WAIT_SECONDS)
    summary = s3_server.ledger.summarize(bucket, "cities.json")

    assert completed.returncode == 0, completed.stderr
    assert len(progress) == range_count
    assert progress[0] == f"progress fetched={range_size} total={size} checkpoint=None restored=False"
    assert progress[-1] == f"progress fetched={size} total={size} checkpoint=None restored=False"
    assert json.loads(lines[-1]) == {"aggregate": expected, "bytes_parsed": size, "ranges": range_count}
    assert summary.requests == range_count
    assert summary.bytes_sent == size
    assert summary.distinct_bytes == size
    assert summary.repeated_ranges == []
