"""The state store: job definitions, jobs, checkpoints and events, via SQLAlchemy Core.

SQLite in WAL mode is the default, embedded and zero-setup. The same schema
and migrations run on PostgreSQL (tested with Debian 12's PostgreSQL 15). Every method commits before it returns, so a state
change is durable before the server acknowledges it to anyone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from checker.store.migrations import migrate


class JSONText(TypeDecorator):
    """JSON stored as TEXT, identical on SQLite and PostgreSQL."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else json.dumps(value, separators=(",", ":"))

    def process_result_value(self, value: str | None, dialect: Any) -> Any:
        return None if value is None else json.loads(value)


class JSONValue(JSONText):
    """Any JSON value stored as TEXT, JSON null included (stored as the text 'null', not SQL NULL)."""

    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str:
        return json.dumps(value, separators=(",", ":"))


metadata = MetaData()

job_definitions = Table(
    "job_definitions",
    metadata,
    Column("name", String, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("runtime_type", String, nullable=False),
    Column("runtime_config", JSONText, nullable=False),
    Column("metadata", JSONText, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("retry_policy", JSONText),
    Column("execution_timeout_seconds", Float),
    Column("limits", JSONText),
)

jobs = Table(
    "jobs",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String, nullable=False, unique=True),
    Column("definition_name", String, nullable=False),
    Column("definition_version", Integer, nullable=False),
    Column("runtime_type", String, nullable=False),
    Column("runtime_config", JSONText, nullable=False),
    Column("state", String, nullable=False),
    Column("params", JSONText, nullable=False),
    Column("env", JSONText, nullable=False),
    Column("metadata", JSONText, nullable=False),
    Column("idempotency_key", String),
    Column("request_digest", String),
    Column("token_hash", String, nullable=False),
    Column("pid", Integer),
    Column("pid_start_time", Integer),
    Column("last_checkpoint", Integer),
    Column("checkpoint_count", Integer, nullable=False),
    Column("restore_count", Integer, nullable=False),
    Column("restart_count", Integer, nullable=False),
    Column("failed_restores", Integer, nullable=False),
    Column("output", JSONText),
    Column("output_reported", Integer, nullable=False),
    Column("exit_code", Integer),
    Column("error", Text),
    Column("error_code", String),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("updated_at", Float, nullable=False),
    Column("wake_at", Float),
    Column("wait_signal", String),
    Column("wait_token", String),
    Column("retry_policy", JSONText),
    Column("execution_timeout_seconds", Float),
    Column("attempt", Integer, nullable=False, default=1),
    Column("next_attempt_at", Float),
    Column("attempt_errors", JSONText),
    Column("limits", JSONText),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("job_id", String, primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("mode", String, nullable=False),
    Column("location", Text, nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("dump_seconds", Float, nullable=False),
    Column("total_seconds", Float, nullable=False),
    Column("status", String, nullable=False),
    Column("criu_version", String, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("stored_bytes", BigInteger),
)

checkpoint_tokens = Table(
    "checkpoint_tokens",
    metadata,
    Column("job_id", String, primary_key=True),
    Column("token", String, primary_key=True),
    Column("checkpoint_number", Integer, nullable=False),
    Column("restore_count", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("result", JSONText),
)

signals = Table(
    "signals",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String, nullable=False),
    Column("name", String, nullable=False),
    Column("payload", JSONValue, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("delivered_token", String),
    Column("delivered_at", Float),
)

job_events = Table(
    "job_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("kind", String, nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSONText, nullable=False),
)


class JobState:
    """Job states. `checkpointing` is an operation on a running job, not a state."""

    PENDING = "pending"
    RUNNING = "running"
    SUSPENDED = "suspended"
    PENDING_RETRY = "pending_retry"
    COMPLETED = "completed"
    FAILED = "failed"

    ALL = (PENDING, RUNNING, SUSPENDED, PENDING_RETRY, COMPLETED, FAILED)
    TERMINAL = (COMPLETED, FAILED)


class CheckpointStatus:
    VALID = "valid"
    CORRUPT = "corrupt"
    DELETED = "deleted"


@dataclass(frozen=True)
class DefinitionRecord:
    name: str
    version: int
    runtime_type: str
    runtime_config: dict
    metadata: dict
    created_at: float
    retry_policy: dict | None = None
    """max_attempts, initial_delay_seconds, backoff_multiplier, max_delay_seconds; None means one attempt."""
    execution_timeout_seconds: float | None = None
    """Wall-clock limit from the job's first start, suspended time included; None means no limit."""
    limits: dict | None = None
    """Resource limits of its jobs: memory_mib, cpu_cores, pids; None or a missing key means unlimited."""


@dataclass(frozen=True)
class JobRecord:
    seq: int
    id: str
    definition_name: str
    definition_version: int
    runtime_type: str
    runtime_config: dict
    state: str
    params: dict
    env: dict
    metadata: dict
    idempotency_key: str | None
    request_digest: str | None
    token_hash: str
    pid: int | None
    pid_start_time: int | None
    last_checkpoint: int | None
    checkpoint_count: int
    restore_count: int
    restart_count: int
    failed_restores: int
    output: Any
    output_reported: int
    exit_code: int | None
    error: str | None
    error_code: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    wake_at: float | None = None
    """Unix time at which a suspended job is restored; None waits for a signal only."""
    wait_signal: str | None = None
    """Name of the signal a suspended job waits for."""
    wait_token: str | None = None
    """Token of the suspending call whose result the wake-up stores."""
    retry_policy: dict | None = None
    execution_timeout_seconds: float | None = None
    attempt: int = 1
    """Number of the current attempt, from 1."""
    next_attempt_at: float | None = None
    """Unix time of the next attempt while the job is pending_retry."""
    attempt_errors: list | None = None
    """[{"attempt", "error", "error_code", "at"}] of every failed attempt."""
    limits: dict | None = None
    """Resource limits of the job: the definition's, with the spawn's (or fork's) overrides applied."""

    @property
    def terminal(self) -> bool:
        return self.state in JobState.TERMINAL


@dataclass(frozen=True)
class CheckpointRecord:
    job_id: str
    number: int
    mode: str
    location: str
    size_bytes: int
    dump_seconds: float
    total_seconds: float
    status: str
    criu_version: str
    created_at: float
    stored_bytes: int | None = None
    """Bytes the checkpoint added to the store after deduplication and compression; None for checkpoints of older releases."""


@dataclass(frozen=True)
class TokenRecord:
    job_id: str
    token: str
    checkpoint_number: int
    restore_count: int
    created_at: float
    result: dict | None = None
    """Result of a suspending call ({"signal": ...} or {"timed_out": true}), stored at wake-up."""


@dataclass(frozen=True)
class SignalRecord:
    seq: int
    job_id: str
    name: str
    payload: Any
    created_at: float
    delivered_token: str | None
    delivered_at: float | None


@dataclass(frozen=True)
class EventRecord:
    seq: int
    job_id: str
    created_at: float
    kind: str
    message: str
    data: dict


class DuplicateIdempotencyKey(Exception):
    """Another job was spawned with the same idempotency key."""


def _enable_sqlite_durability(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a transaction is on disk when COMMIT returns, also across power loss.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def metadata_matches(job_metadata: dict, wanted: dict[str, str] | None) -> bool:
    if not wanted:
        return True
    return all(key in job_metadata and str(job_metadata[key]) == value for key, value in wanted.items())


def sqlite_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'state.db'}"


class StateStore:
    """All reads and writes of Checker's durable state."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _enable_sqlite_durability)
        with self.engine.begin() as connection:
            self.applied_migrations = migrate(connection)

    def close(self) -> None:
        self.engine.dispose()

    # Job definitions

    def create_definition(
        self,
        name: str,
        runtime_type: str,
        runtime_config: dict,
        definition_metadata: dict,
        retry_policy: dict | None = None,
        execution_timeout_seconds: float | None = None,
        limits: dict | None = None,
    ) -> DefinitionRecord:
        """Insert the next version of definition `name` (1 for a new name)."""
        with self.engine.begin() as connection:
            latest = connection.execute(select(func.max(job_definitions.c.version)).where(job_definitions.c.name == name)).scalar()
            record = DefinitionRecord(
                name, (latest or 0) + 1, runtime_type, runtime_config, definition_metadata, time.time(), retry_policy, execution_timeout_seconds, limits
            )
            connection.execute(insert(job_definitions).values(**record.__dict__))
        return record

    def get_definition(self, name: str, version: int | None) -> DefinitionRecord | None:
        """Return one version of a definition, or its latest version when `version` is None."""
        query = select(job_definitions).where(job_definitions.c.name == name)
        if version is None:
            query = query.order_by(job_definitions.c.version.desc()).limit(1)
        else:
            query = query.where(job_definitions.c.version == version)
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
        return None if row is None else DefinitionRecord(**row)

    def list_definitions(self, name: str | None = None) -> list[DefinitionRecord]:
        query = select(job_definitions).order_by(job_definitions.c.name, job_definitions.c.version)
        if name is not None:
            query = query.where(job_definitions.c.name == name)
        with self.engine.connect() as connection:
            return [DefinitionRecord(**row) for row in connection.execute(query).mappings()]

    def delete_definition(self, name: str, version: int | None) -> int:
        """Delete one version, or every version when `version` is None; return how many rows went."""
        statement = delete(job_definitions).where(job_definitions.c.name == name)
        if version is not None:
            statement = statement.where(job_definitions.c.version == version)
        with self.engine.begin() as connection:
            return connection.execute(statement).rowcount

    # Jobs

    @staticmethod
    def _new_job_row(values: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        return {
            "checkpoint_count": 0,
            "restore_count": 0,
            "restart_count": 0,
            "failed_restores": 0,
            "output_reported": 0,
            "created_at": now,
            "updated_at": now,
            **values,
        }

    def insert_job(self, values: dict[str, Any], event_message: str) -> JobRecord:
        """Insert a new job and its `created` event; raise DuplicateIdempotencyKey on a reused key."""
        row = self._new_job_row(values)
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(jobs).values(**row))
                self._insert_event(connection, row["id"], "created", event_message, {})
        except IntegrityError as error:
            if values.get("idempotency_key") and self.find_job_by_idempotency_key(values["idempotency_key"]):
                raise DuplicateIdempotencyKey(values["idempotency_key"]) from error
            raise
        job = self.get_job(row["id"])
        assert job is not None
        return job

    def insert_fork(self, values: dict[str, Any], checkpoint: CheckpointRecord, source_job_id: str, event_message: str) -> JobRecord:
        """Insert a job forked from checkpoint `checkpoint.number` of another job, atomically with its copy of that checkpoint.

        The fork also gets the source's call tokens up to that checkpoint, so
        the call that the image was taken in returns `restored` in the fork
        instead of taking a new checkpoint. The copies count as made before
        restore 0, and the fork's first restore makes them restored calls.
        """
        with self.engine.begin() as connection:
            copied = connection.execute(
                select(checkpoint_tokens).where(
                    checkpoint_tokens.c.job_id == source_job_id, checkpoint_tokens.c.checkpoint_number <= checkpoint.number
                )
            ).mappings().all()
            row = self._new_job_row({"last_checkpoint": checkpoint.number, "checkpoint_count": 1, **values})
            connection.execute(insert(jobs).values(**row))
            connection.execute(insert(checkpoints).values(**checkpoint.__dict__))
            for token_row in copied:
                connection.execute(insert(checkpoint_tokens).values(**{**token_row, "job_id": row["id"], "restore_count": 0}))
            data = {"source_job": source_job_id, "fork": row["id"], "checkpoint": checkpoint.number}
            self._insert_event(connection, row["id"], "forked", event_message, data)
            self._insert_event(connection, source_job_id, "forked_into", f"checkpoint {checkpoint.number} forked into job {row['id']}", data)
        job = self.get_job(row["id"])
        assert job is not None
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return None if row is None else JobRecord(**row)

    def job_id_for_token_hash(self, token_hash: str) -> str | None:
        with self.engine.connect() as connection:
            return connection.execute(select(jobs.c.id).where(jobs.c.token_hash == token_hash)).scalar()

    def find_job_by_idempotency_key(self, key: str) -> JobRecord | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(jobs).where(jobs.c.idempotency_key == key)).mappings().first()
        return None if row is None else JobRecord(**row)

    def list_jobs(
        self,
        states: Sequence[str] | None = None,
        after_seq: int | None = None,
        limit: int = 100,
        definition: str | None = None,
        metadata_match: dict[str, str] | None = None,
    ) -> list[JobRecord]:
        """Return jobs in creation order, after the cursor `after_seq`.

        `metadata_match` keeps jobs whose metadata has each key with that value
        (compared as text). It is applied in Python over batches of rows,
        because metadata is stored as JSON text on every database.
        """
        query = select(jobs).order_by(jobs.c.seq)
        if states:
            query = query.where(jobs.c.state.in_(list(states)))
        if definition is not None:
            query = query.where(jobs.c.definition_name == definition)

        found: list[JobRecord] = []
        cursor = after_seq
        batch = limit if not metadata_match else max(limit, 500)
        with self.engine.connect() as connection:
            while len(found) < limit:
                page = query if cursor is None else query.where(jobs.c.seq > cursor)
                rows = [JobRecord(**row) for row in connection.execute(page.limit(batch)).mappings()]
                if not rows:
                    break
                found.extend(job for job in rows if metadata_matches(job.metadata, metadata_match))
                cursor = rows[-1].seq
                if len(rows) < batch:
                    break
        return found[:limit]

    def update_job(self, job_id: str, event: tuple[str, str, dict] | None = None, **values: Any) -> JobRecord:
        """Update fields of a job and optionally add an event (kind, message, data), in one transaction."""
        values["updated_at"] = time.time()
        with self.engine.begin() as connection:
            connection.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
            if event is not None:
                self._insert_event(connection, job_id, *event)
        job = self.get_job(job_id)
        assert job is not None
        return job

    # Checkpoints

    def record_checkpoint(
        self,
        checkpoint: CheckpointRecord,
        tokens: Iterable[str],
        restore_count: int,
        event_message: str,
        stop: bool,
        job_values: dict[str, Any] | None = None,
        event_kind: str = "checkpoint",
    ) -> JobRecord:
        """Store a completed checkpoint, the tokens of the calls it serves, and the job's new state, atomically.

        `job_values` sets more job fields in the same transaction, such as the
        suspended state and wake time of a job that suspends at this checkpoint.
        """
        now = time.time()
        with self.engine.begin() as connection:
            connection.execute(insert(checkpoints).values(**checkpoint.__dict__))
            for token in tokens:
                connection.execute(
                    insert(checkpoint_tokens).values(
                        job_id=checkpoint.job_id, token=token, checkpoint_number=checkpoint.number, restore_count=restore_count, created_at=now
                    )
                )
            values: dict[str, Any] = {
                "last_checkpoint": checkpoint.number,
                "checkpoint_count": jobs.c.checkpoint_count + 1,
                "failed_restores": 0,
                "updated_at": now,
                **(job_values or {}),
            }
            connection.execute(update(jobs).where(jobs.c.id == checkpoint.job_id).values(**values))
            data = {"checkpoint": checkpoint.number, "size_bytes": checkpoint.size_bytes, "dump_seconds": checkpoint.dump_seconds, "stop": stop}
            self._insert_event(connection, checkpoint.job_id, event_kind, event_message, data)
        job = self.get_job(checkpoint.job_id)
        assert job is not None
        return job

    def list_checkpoints(self, job_id: str, statuses: Sequence[str] | None = None) -> list[CheckpointRecord]:
        query = select(checkpoints).where(checkpoints.c.job_id == job_id).order_by(checkpoints.c.number)
        if statuses:
            query = query.where(checkpoints.c.status.in_(list(statuses)))
        with self.engine.connect() as connection:
            return [CheckpointRecord(**row) for row in connection.execute(query).mappings()]

    def max_checkpoint_number(self, job_id: str) -> int:
        with self.engine.connect() as connection:
            return connection.execute(select(func.max(checkpoints.c.number)).where(checkpoints.c.job_id == job_id)).scalar() or 0

    def set_checkpoint_status(self, job_id: str, number: int, status: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(checkpoints).where(checkpoints.c.job_id == job_id, checkpoints.c.number == number).values(status=status)
            )

    def get_token(self, job_id: str, token: str) -> TokenRecord | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(checkpoint_tokens).where(checkpoint_tokens.c.job_id == job_id, checkpoint_tokens.c.token == token)
            ).mappings().first()
        return None if row is None else TokenRecord(**row)

    def set_token_result(self, job_id: str, token: str, result: dict) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(checkpoint_tokens).where(checkpoint_tokens.c.job_id == job_id, checkpoint_tokens.c.token == token).values(result=result)
            )

    # Signals

    def add_signal(self, job_id: str, name: str, payload: Any) -> SignalRecord:
        with self.engine.begin() as connection:
            seq = connection.execute(
                insert(signals).values(job_id=job_id, name=name, payload=payload, created_at=time.time()).returning(signals.c.seq)
            ).scalar_one()
            self._insert_event(connection, job_id, "signal_received", f"signal {name!r} ({seq}) received for job {job_id}", {"signal": seq, "name": name})
        signal = self.get_signal(seq)
        assert signal is not None
        return signal

    def get_signal(self, seq: int) -> SignalRecord | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(signals).where(signals.c.seq == seq)).mappings().first()
        return None if row is None else SignalRecord(**row)

    def list_signals(self, job_id: str) -> list[SignalRecord]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(signals).where(signals.c.job_id == job_id).order_by(signals.c.seq)).mappings()
            return [SignalRecord(**row) for row in rows]

    def has_pending_signal(self, job_id: str, name: str) -> bool:
        with self.engine.connect() as connection:
            return connection.execute(self._oldest_pending(job_id, name)).first() is not None

    def deliver_signal(self, job_id: str, name: str, token: str, checkpoint_number: int, restore_count: int) -> SignalRecord | None:
        """Bind the oldest undelivered signal `name` to the call `token`, once; return it, or None when there is none.

        The signal and the token's result change in one transaction, so a
        signal is delivered exactly once: a retry of the same call finds the
        token's result, and a later call gets the next signal.
        """
        now = time.time()
        with self.engine.begin() as connection:
            row = connection.execute(self._oldest_pending(job_id, name)).mappings().first()
            if row is None:
                return None
            claimed = connection.execute(
                update(signals).where(signals.c.seq == row["seq"], signals.c.delivered_token.is_(None)).values(delivered_token=token, delivered_at=now)
            ).rowcount
            if claimed != 1:
                return None

            result = {"signal": {"name": row["name"], "payload": row["payload"], "seq": row["seq"]}}
            existing = connection.execute(
                select(checkpoint_tokens.c.token).where(checkpoint_tokens.c.job_id == job_id, checkpoint_tokens.c.token == token)
            ).first()
            if existing is None:
                connection.execute(
                    insert(checkpoint_tokens).values(
                        job_id=job_id, token=token, checkpoint_number=checkpoint_number, restore_count=restore_count, created_at=now, result=result
                    )
                )
            else:
                connection.execute(
                    update(checkpoint_tokens).where(checkpoint_tokens.c.job_id == job_id, checkpoint_tokens.c.token == token).values(result=result)
                )
            self._insert_event(connection, job_id, "signal_delivered", f"signal {name!r} ({row['seq']}) delivered to job {job_id}", {"signal": row["seq"], "name": name})
        return SignalRecord(**{**row, "delivered_token": token, "delivered_at": now})

    @staticmethod
    def _oldest_pending(job_id: str, name: str) -> Any:
        return (
            select(signals)
            .where(signals.c.job_id == job_id, signals.c.name == name, signals.c.delivered_token.is_(None))
            .order_by(signals.c.seq)
            .limit(1)
        )

    # Events

    def add_event(self, job_id: str, kind: str, message: str, data: dict | None = None) -> None:
        with self.engine.begin() as connection:
            self._insert_event(connection, job_id, kind, message, data or {})

    def list_events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[EventRecord]:
        query = (
            select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.seq > after_seq)
            .order_by(job_events.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [EventRecord(**row) for row in connection.execute(query).mappings()]

    @staticmethod
    def _insert_event(connection: Any, job_id: str, kind: str, message: str, data: dict) -> None:
        connection.execute(insert(job_events).values(job_id=job_id, created_at=time.time(), kind=kind, message=message, data=data))
