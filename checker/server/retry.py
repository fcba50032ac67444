"""Retry policies: how often and how soon a failed job is tried again."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RetryPolicy:
    """Retry policy of a job definition; the default makes one attempt only."""

    max_attempts: int = 1
    """Total attempts, the first one included."""

    initial_delay_seconds: float = 1.0
    """Delay before the second attempt, in seconds."""

    backoff_multiplier: float = 2.0
    """Factor between consecutive delays."""

    max_delay_seconds: float = 300.0
    """Upper bound of any delay, in seconds."""

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "RetryPolicy":
        return cls(**data) if data else cls()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (2 or more)."""
        exponent = max(0, attempt - 2)
        return min(self.max_delay_seconds, self.initial_delay_seconds * self.backoff_multiplier**exponent)
