"""Errors that the server turns into API error responses, each with a stable code."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Stable error codes; API clients match on these, never on message text."""

    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    INVALID_STATE = "invalid_state"
    CHECKPOINT_FAILED = "checkpoint_failed"
    CHECKPOINT_LOCK_TIMEOUT = "checkpoint_lock_timeout"
    RESTORE_FAILED = "restore_failed"
    START_FAILED = "start_failed"
    CORRUPT_CHECKPOINT = "corrupt_checkpoint"
    UNAVAILABLE = "unavailable"


_HTTP_STATUS = {
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INVALID_STATE: 409,
    ErrorCode.CHECKPOINT_FAILED: 500,
    ErrorCode.CHECKPOINT_LOCK_TIMEOUT: 409,
    ErrorCode.RESTORE_FAILED: 500,
    ErrorCode.START_FAILED: 500,
    ErrorCode.CORRUPT_CHECKPOINT: 500,
    ErrorCode.UNAVAILABLE: 503,
}


class CheckerError(Exception):
    """An error with a code and a message that names what failed and what to do."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self.code]


class CriuError(CheckerError):
    """CRIU exited with an error; the message carries the first `Error` lines of its log."""

    def __init__(self, code: ErrorCode, message: str, log_path: str | None, error_lines: list[str]) -> None:
        super().__init__(code, message)
        self.log_path = log_path
        self.error_lines = error_lines


class CorruptCheckpointError(CheckerError):
    """A checkpoint image failed verification against its manifest."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.CORRUPT_CHECKPOINT, message)


class CorruptRestoreCacheError(CorruptCheckpointError):
    """A file of the local restore cache failed verification; the checkpoint's chunks may still be intact."""
