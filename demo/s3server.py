"""S3 protocol server on loopback for the demo, with a ledger of served object reads.

The server runs moto's WSGI application (moto 5.2, built the way
`moto.server.ThreadedMotoServer` builds it) in a threaded werkzeug server bound
to 127.0.0.1. A WSGI middleware in front of moto records every GET of an
object: the Range header, the byte range served and how many body bytes the
server wrote. The demo reads the ledger to report the bytes fetched against the
object size and to find ranges fetched twice, measured on the server side.

moto keeps its state in process-wide backends, so every server started in one
process serves the same buckets.

NOTE: moto 5.2 reads the whole object for every range request, so one range
costs time proportional to the object size, not to the range length.
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
STOP_TIMEOUT_SECONDS = 10.0
WRITE_SLICE_BYTES = 64 * 1024
"""Size of the slices a response body is written in, so an interrupted transfer is counted to within one slice."""

SUBRESOURCE_PARAMETERS = frozenset(
    {"acl", "attributes", "legal-hold", "retention", "tagging", "torrent", "uploadId"}
)
"""Query parameters that turn a GET on an object path into a request for something other than the object's bytes."""

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class ServedRead:
    """One GET of an object as the server served it."""

    bucket: str
    key: str
    range_header: str | None
    """The request's Range header, or None for a whole-object GET."""
    start: int | None
    """First byte offset served, or None when the response carried no object bytes (an error)."""
    end: int | None
    """Last byte offset served (inclusive), or None like `start`."""
    status: int
    bytes_sent: int
    """Body bytes the server wrote to the connection."""
    complete: bool
    """False when the connection broke before the whole body was written."""


@dataclass(frozen=True)
class LedgerSummary:
    """Totals over the ledger's successful reads of one object."""

    requests: int
    bytes_sent: int
    distinct_bytes: int
    """Bytes of the object written at least once."""
    repeated_ranges: list[tuple[int, int]]
    """(start, end) ranges served more than once, each listed once."""
    incomplete_reads: int


class RangeLedger:
    """Thread-safe list of the object reads the server served, in completion order.

    A read is recorded when the server has written its body, which can be
    shortly after the client has received it. Call `wait_until_idle()` before
    reading the ledger to include every request that has reached the server.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._reads: list[ServedRead] = []
        self._in_flight = 0

    def begin(self) -> None:
        """Count one object GET in flight until `record()` or `abandon()` ends it."""
        with self._condition:
            self._in_flight += 1

    def record(self, read: ServedRead) -> None:
        """Append one served read and end its in-flight count."""
        with self._condition:
            self._reads.append(read)
            self._in_flight -= 1
            self._condition.notify_all()

    def abandon(self) -> None:
        """End the in-flight count of a GET that failed before it produced a response."""
        with self._condition:
            self._in_flight -= 1
            self._condition.notify_all()

    def wait_until_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no object GET is in flight, and return False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: self._in_flight == 0, timeout)

    def reads(self, bucket: str | None = None, key: str | None = None) -> list[ServedRead]:
        """Return a copy of the recorded reads, optionally only those of one bucket and key."""
        with self._condition:
            reads = list(self._reads)
        return [
            read
            for read in reads
            if (bucket is None or read.bucket == bucket) and (key is None or read.key == key)
        ]

    def clear(self) -> None:
        """Forget all recorded reads."""
        with self._condition:
            self._reads.clear()

    def summarize(self, bucket: str, key: str) -> LedgerSummary:
        """Summarize the successful (2xx) reads of one object."""
        reads = [read for read in self.reads(bucket, key) if 200 <= read.status < 300 and read.start is not None]

        range_counts = Counter((read.start, read.end) for read in reads)
        repeated = sorted(span for span, count in range_counts.items() if count > 1)
        sent_spans = [(read.start, read.start + read.bytes_sent) for read in reads if read.bytes_sent > 0]

        return LedgerSummary(
            requests=len(reads),
            bytes_sent=sum(read.bytes_sent for read in reads),
            distinct_bytes=count_covered_bytes(sent_spans),
            repeated_ranges=repeated,
            incomplete_reads=sum(1 for read in reads if not read.complete),
        )


def count_covered_bytes(spans: list[tuple[int, int]]) -> int:
    """Count the bytes covered by the union of half-open [start, stop) spans."""
    covered = 0
    current_start: int | None = None
    current_stop = 0

    for start, stop in sorted(spans):
        if current_start is None or start > current_stop:
            if current_start is not None:
                covered += current_stop - current_start
            current_start, current_stop = start, stop
        else:
            current_stop = max(current_stop, stop)

    if current_start is not None:
        covered += current_stop - current_start
    return covered


def parse_object_path(path: str, query_string: str) -> tuple[str, str] | None:
    """Return (bucket, key) when a path-style GET requests an object's bytes, else None.

    `path` is the WSGI PATH_INFO: already percent-decoded, with the UTF-8 bytes
    carried as latin-1 characters as PEP 3333 requires.
    """
    decoded = path.encode("latin-1").decode("utf-8", errors="replace")
    bucket, _, key = decoded.lstrip("/").partition("/")
    if not bucket or not key:
        return None

    parameters = urllib.parse.parse_qs(query_string, keep_blank_values=True)
    if SUBRESOURCE_PARAMETERS.intersection(parameters):
        return None
    return bucket, key


def parse_served_span(status: int, headers: list[tuple[str, str]]) -> tuple[int | None, int | None]:
    """Return the (start, end) byte offsets a response serves, from Content-Range or Content-Length."""
    values = {name.lower(): value for name, value in headers}

    match = _CONTENT_RANGE.fullmatch(values.get("content-range", "").strip())
    if match:
        return int(match.group(1)), int(match.group(2))

    if status == 200 and "content-length" in values:
        length = int(values["content-length"])
        return (0, length - 1) if length > 0 else (None, None)
    return None, None


class CountingBody:
    """Response body wrapper that counts the bytes written and reports them once.

    It reports as soon as the last slice is written, so the ledger is current
    about when the client has the body, and otherwise at `close()`, which WSGI
    servers call even when the connection broke. A class rather than a
    generator because a generator that never started skips its cleanup on close.
    """

    def __init__(self, body: Iterable[bytes], on_done: Callable[[int, bool], None]) -> None:
        self._body = body
        self._on_done = on_done
        self._bytes_sent = 0
        self._reported = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            # The server requests the next slice only after it has written the previous one.
            for offset in range(0, len(chunk), WRITE_SLICE_BYTES):
                piece = chunk[offset : offset + WRITE_SLICE_BYTES]
                yield piece
                self._bytes_sent += len(piece)
        self._report(finished=True)

    def close(self) -> None:
        try:
            body_close = getattr(self._body, "close", None)
            if body_close is not None:
                body_close()
        finally:
            self._report(finished=False)

    def _report(self, finished: bool) -> None:
        if self._reported:
            return
        self._reported = True
        self._on_done(self._bytes_sent, finished)


class RangeLedgerMiddleware:
    """WSGI middleware that records every object GET passing through it in a `RangeLedger`."""

    def __init__(self, app: Callable[..., Iterable[bytes]], ledger: RangeLedger) -> None:
        self._app = app
        self._ledger = ledger

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "GET":
            return self._app(environ, start_response)

        target = parse_object_path(environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
        if target is None:
            return self._app(environ, start_response)

        response: dict[str, Any] = {}

        def capture_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            response["status"] = int(status.split(None, 1)[0])
            response["headers"] = list(headers)
            return start_response(status, headers, exc_info)

        self._ledger.begin()
        try:
            body = self._app(environ, capture_start_response)
        except BaseException:
            self._ledger.abandon()
            raise
        range_header = environ.get("HTTP_RANGE")

        def record_read(bytes_sent: int, finished: bool) -> None:
            status = response.get("status", 0)
            start, end = parse_served_span(status, response.get("headers", []))
            self._ledger.record(
                ServedRead(
                    bucket=target[0],
                    key=target[1],
                    range_header=range_header,
                    start=start,
                    end=end,
                    status=status,
                    bytes_sent=bytes_sent,
                    complete=finished,
                )
            )

        return CountingBody(body, record_read)


class QuietMotoRequestHandler(MotoRequestHandler):
    """moto's request handler without werkzeug's access-log line per request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class DemoS3Server:
    """moto's S3 in a background werkzeug server on 127.0.0.1, with a `RangeLedger` of object reads.

    Use `start()` and `stop()`, or the server as a context manager.
    """

    def __init__(self, port: int = 0, log_requests: bool = False) -> None:
        """Prepare a server on `port`. Port 0 lets the system choose a free port when `start()` binds it."""
        self.ledger = RangeLedger()
        self._requested_port = port
        self._log_requests = log_requests
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """Port the server listens on, known only after `start()`."""
        if self._server is None:
            raise RuntimeError("the S3 server is not running: call start() first")
        return int(self._server.server_port)

    @property
    def endpoint_url(self) -> str:
        """Endpoint URL to pass to boto3 as `endpoint_url`."""
        return f"http://{LOOPBACK_HOST}:{self.port}"

    def start(self) -> None:
        """Bind the socket and serve requests in a daemon thread."""
        if self._server is not None:
            raise RuntimeError(f"the S3 server is already running at {self.endpoint_url}")

        moto_app = DomainDispatcherApplication(create_backend_app)
        handler = MotoRequestHandler if self._log_requests else QuietMotoRequestHandler
        self._server = make_server(
            LOOPBACK_HOST,
            self._requested_port,
            RangeLedgerMiddleware(moto_app, self.ledger),
            threaded=True,
            request_handler=handler,
        )

        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-s3-server", daemon=True)
        self._thread.start()
        logger.info("S3 server started at %s", self.endpoint_url)

    def stop(self) -> None:
        """Stop serving, wait for the server thread and close the socket."""
        if self._server is None:
            return
        endpoint = self.endpoint_url

        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                logger.warning("S3 server thread at %s still running %.0f s after shutdown", endpoint, STOP_TIMEOUT_SECONDS)
        self._server.server_close()

        self._server = None
        self._thread = None
        logger.info("S3 server at %s stopped", endpoint)

    def __enter__(self) -> DemoS3Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
