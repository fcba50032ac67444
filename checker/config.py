"""Server settings, from command-line options and CHECKER_* environment variables."""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from checker.runtimes.criu import DEFAULT_TIMEOUT_SECONDS as DEFAULT_CRIU_TIMEOUT_SECONDS
from checker.store.chunks import MAX_ZSTD_LEVEL

DEFAULT_PORT = 8181


def default_state_dir() -> Path:
    """$CHECKER_STATE_DIR, else $XDG_STATE_HOME/checker, else ~/.local/state/checker."""
    configured = os.environ.get("CHECKER_STATE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "checker"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    """Everything a server needs to run."""

    state_dir: Path = field(default_factory=default_state_dir)
    """Directory of the SQLite state store, job files and local checkpoints."""

    host: str = "127.0.0.1"
    """Address the HTTP APIs listen on; loopback unless an API token is set."""

    port: int = DEFAULT_PORT
    """TCP port of both APIs; 0 picks a free port."""

    database_url: str | None = None
    """SQLAlchemy URL of the state store; None means SQLite in `state_dir`."""

    criu_path: str | None = None
    """CRIU binary; None searches CHECKER_CRIU, the project prefix, then PATH."""

    criu_timeout_seconds: float = DEFAULT_CRIU_TIMEOUT_SECONDS
    """Maximum seconds one CRIU dump or restore may run before it is killed and the operation fails."""

    api_token: str | None = None
    """Bearer token the caller API requires; None leaves it open to local callers."""

    keep_checkpoints: int = 3
    """Number of most recent valid checkpoints kept per job; older images are deleted."""

    fsync_checkpoints: bool = True
    """Flush each image to disk before its checkpoint is acknowledged."""

    checkpoint_compression_level: int | None = 1
    """zstd level (1-22) of checkpoint chunks; None stores them uncompressed."""

    checkpoint_dedupe: bool = True
    """Store images as chunks shared by a job's checkpoints; False stores plain image files (format 1, uncompressed)."""

    finished_checkpoints_retention_seconds: float = 7 * 86400.0
    """How long the checkpoints of a completed or failed job are kept after it finished, in seconds."""

    max_restores_without_progress: int = 3
    """Crashes tolerated from the same checkpoint before the job is failed."""

    checkpoint_lock_timeout_seconds: float = 60.0
    """How long a checkpoint waits for the job's checkpoint locks before it fails (the job keeps running)."""

    drain_on_shutdown: bool = False
    """Checkpoint and suspend running jobs when the server stops (SIGTERM or SIGINT)."""

    drain_timeout_seconds: float = 60.0
    """Maximum time a drain waits for the jobs' checkpoints, in seconds; jobs not suspended by then keep running."""

    checkpoint_store: str | None = None
    """Location of the checkpoints: None for `checkpoints_dir`, or `s3://BUCKET/PREFIX` for an S3 bucket with a local cache in `checkpoints_dir`."""

    s3_endpoint_url: str | None = None
    """URL of the S3 endpoint of an S3 checkpoint store; None uses boto3's default for its region."""

    exit_grace_seconds: float = 30.0
    """How long a job may keep running after reporting its exit before it is killed."""

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    def validate(self) -> None:
        if not is_loopback(self.host) and not self.api_token:
            raise ValueError(
                f"listening on {self.host} would expose the caller API beyond this machine; "
                "set an API token (--api-token or CHECKER_API_TOKEN) or listen on 127.0.0.1"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints is {self.keep_checkpoints}; keep at least 1 checkpoint per job")
        level = self.checkpoint_compression_level
        if level is not None and not 1 <= level <= MAX_ZSTD_LEVEL:
            raise ValueError(f"checkpoint compression level {level} is invalid; give a zstd level from 1 to {MAX_ZSTD_LEVEL}, or off")
        if level is not None and not self.checkpoint_dedupe:
            raise ValueError(
                f"checkpoint compression level {level} needs deduplication: without it images are stored as plain files; "
                "drop --no-checkpoint-dedupe or pass --checkpoint-compression off"
            )
        if self.finished_checkpoints_retention_seconds < 0:
            raise ValueError(f"retention of finished jobs' checkpoints {self.finished_checkpoints_retention_seconds} s is invalid; give 0 or more seconds")
        if self.checkpoint_lock_timeout_seconds <= 0:
            raise ValueError(f"checkpoint lock timeout {self.checkpoint_lock_timeout_seconds} s is invalid; give a positive number of seconds")
        if self.criu_timeout_seconds <= 0:
            raise ValueError(f"CRIU timeout {self.criu_timeout_seconds} s is invalid; give a positive number of seconds")
        self._validate_checkpoint_store()
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 0-65535")

    def _validate_checkpoint_store(self) -> None:
        from checker.store.s3 import parse_s3_url

        if self.checkpoint_store is None:
            if self.s3_endpoint_url is not None:
                raise ValueError(f"--s3-endpoint-url {self.s3_endpoint_url!r} is set, but the checkpoint store is local; add --checkpoint-store s3://BUCKET/PREFIX")
            return
        parse_s3_url(self.checkpoint_store)
        if not self.checkpoint_dedupe:
            raise ValueError(f"checkpoint store {self.checkpoint_store!r} stores chunks and needs deduplication; drop --no-checkpoint-dedupe")
        endpoint = self.s3_endpoint_url
        if endpoint is not None:
            parsed = urllib.parse.urlsplit(endpoint)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"S3 endpoint URL {endpoint!r} is invalid; give http://HOST:PORT or https://HOST")
            try:
                parsed.port
            except ValueError:
                raise ValueError(f"S3 endpoint URL {endpoint!r} has an invalid port; give a port from 1 to 65535") from None
