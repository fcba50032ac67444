"""Request and response bodies of the caller and runtime APIs."""

from __future__ import annotations

import datetime
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV_PREFIX = "CHECKER_"


def validate_env(env: dict[str, str]) -> dict[str, str]:
    for name in env:
        if not ENV_NAME.match(name):
            raise ValueError(f"environment variable name {name!r} is invalid; use letters, digits and '_', not starting with a digit")
        if name.startswith(RESERVED_ENV_PREFIX):
            raise ValueError(f"environment variable {name!r} is reserved: Checker sets the {RESERVED_ENV_PREFIX}* variables itself")
    return env


def iso_time(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.datetime.fromtimestamp(value, tz=datetime.timezone.utc).isoformat()


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeSpec(StrictModel):
    type: Literal["process", "sandbox", "container", "podman", "gvisor", "vm"] = Field(description="Runtime type that runs the job.")
    command: list[str] = Field(min_length=1, description="Program and arguments, e.g. [\"python3\", \"/srv/job.py\"].")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for every job of this definition.")
    read_only_binds: list[str] | None = Field(
        default=None, description="sandbox only: host paths mounted read-only, each HOST_PATH or HOST_PATH:SANDBOX_PATH."
    )
    user_namespace: bool | None = Field(default=None, strict=True, description="sandbox only: run the job in a new user namespace.")
    network: str | None = Field(default=None, description="sandbox and container: 'host' (the default) shares the host's network.")
    die_with_parent: bool | None = Field(default=None, strict=True, description="sandbox only: rejected, because a restored job would be killed.")
    rootfs: str | None = Field(default=None, description="container only: host directory of the container's root file system, mounted read-only.")
    image: str | None = Field(default=None, description="podman only: name of an image in podman's local storage, e.g. localhost/etl:latest.")
    mounts: list[str] | None = Field(
        default=None,
        description=(
            "container and podman: host paths bind-mounted into the container, each HOST_PATH:CONTAINER_PATH[:ro|rw], read-only by default. "
            "gvisor: absolute host paths bound read-only into the sandbox at the same path, e.g. the job's script directory."
        ),
    )
    working_dir: str | None = Field(default=None, description="container and podman: the job's current directory inside the container (default /run/checker/job/work).")
    python: str | None = Field(default=None, description="container and podman: Python inside the root file system or image that runs the container's init (default /usr/bin/python3).")
    platform: Literal["systrap", "ptrace"] | None = Field(default=None, description="gvisor only: gVisor platform; systrap when omitted.")
    files: list[str] | None = Field(default=None, description="vm only: absolute host paths (files or directories) copied into the guest at the same paths at each start, e.g. the job's script.")
    memory_mib: int | None = Field(default=None, strict=True, description="vm only: the guest's RAM in MiB (default 512); a memory_mib limit overrides it.")
    vcpus: int | None = Field(default=None, strict=True, description="vm only: the guest's virtual CPUs (default 1); a cpu_cores limit overrides it.")
    accelerator: Literal["auto", "kvm", "tcg"] | None = Field(default=None, description="vm only: 'auto' (the default) uses KVM when it can run the guest, else TCG.")
    kernel: str | None = Field(default=None, description="vm only: the guest kernel (default /opt/checker/vm/vmlinuz from scripts/build-vm-image.sh).")
    initramfs: str | None = Field(default=None, description="vm only: the guest's initramfs (default /opt/checker/vm/initramfs.cpio).")

    @model_validator(mode="after")
    def runtime_specific_fields(self) -> "RuntimeSpec":
        if self.type not in ("gvisor", "container", "podman") and self.mounts is not None:
            raise ValueError(f"mounts apply to the container, podman and gvisor runtimes only, not to {self.type!r}")
        if self.type != "gvisor" and self.platform is not None:
            raise ValueError(f"platform applies to the gvisor runtime only, not to {self.type!r}")
        vm_fields = ("files", "memory_mib", "vcpus", "accelerator", "kernel", "initramfs")
        for name in vm_fields:
            if self.type != "vm" and getattr(self, name) is not None:
                raise ValueError(f"{name} applies to the vm runtime only, not to {self.type!r}")
        return self

    @field_validator("mounts")
    @classmethod
    def mounts_absolute(cls, mounts: list[str] | None) -> list[str] | None:
        for mount in mounts or []:
            if not mount.startswith("/") or "\0" in mount:
                raise ValueError(f"mount {mount!r} is invalid: give an absolute host path")
        return mounts

    @field_validator("command")
    @classmethod
    def command_parts_not_empty(cls, command: list[str]) -> list[str]:
        if any(not part for part in command):
            raise ValueError("command parts must be non-empty strings")
        return command

    @field_validator("env")
    @classmethod
    def env_names_valid(cls, env: dict[str, str]) -> dict[str, str]:
        return validate_env(env)


class LimitsModel(StrictModel):
    memory_mib: int | None = Field(default=None, ge=16, le=16 * 1024 * 1024, strict=True, description="Maximum memory in MiB, swap included.")
    cpu_cores: float | None = Field(default=None, ge=0.01, le=1024, description="CPU quota in cores, e.g. 0.5 for half of one core.")
    pids: int | None = Field(default=None, ge=2, le=4_194_304, strict=True, description="Maximum processes and threads, the job's init included.")


class RetryPolicyModel(StrictModel):
    max_attempts: int = Field(default=1, ge=1, le=1000, description="Total attempts, the first one included.")
    initial_delay_seconds: float = Field(default=1.0, ge=0, description="Delay before the second attempt, in seconds.")
    backoff_multiplier: float = Field(default=2.0, ge=1, le=100, description="Factor between consecutive delays.")
    max_delay_seconds: float = Field(default=300.0, ge=0, description="Upper bound of any delay, in seconds.")


class DefinitionCreate(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, description="Definition name; letters, digits, '.', '_', '-'.")
    runtime: RuntimeSpec
    metadata: dict[str, Any] = Field(default_factory=dict)
    retry_policy: RetryPolicyModel | None = Field(default=None, description="Retries of failed attempts; one attempt when omitted.")
    execution_timeout_seconds: float | None = Field(
        default=None, gt=0, description="Kill the job this many seconds after its first start, suspended time included."
    )
    limits: LimitsModel | None = Field(default=None, description="Resource limits of every job of this definition.")


class DefinitionOut(BaseModel):
    name: str
    version: int
    runtime: dict[str, Any]
    metadata: dict[str, Any]
    created_at: str | None
    retry_policy: dict[str, Any] | None = None
    execution_timeout_seconds: float | None = None
    limits: dict[str, Any] | None = None


class DefinitionList(BaseModel):
    items: list[DefinitionOut]


class JobSpawn(StrictModel):
    definition: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@(latest|[1-9][0-9]*))?$",
        description="Name of the job definition, optionally with @VERSION or @latest, e.g. 'parse@3'.",
    )
    version: int | None = Field(default=None, ge=1, description="Definition version; the latest when omitted.")
    params: dict[str, Any] = Field(default_factory=dict, description="JSON object the job reads with params().")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for this job.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, description="Spawning again with the same key returns the first job."
    )
    limits: LimitsModel | None = Field(default=None, description="Overrides of the definition's resource limits for this job.")

    @field_validator("env")
    @classmethod
    def env_names_valid(cls, env: dict[str, str]) -> dict[str, str]:
        return validate_env(env)


class JobOut(BaseModel):
    id: str
    definition: str
    version: int
    runtime: str
    state: str
    params: dict[str, Any]
    metadata: dict[str, Any]
    idempotency_key: str | None
    pid: int | None
    checkpoint_count: int
    last_checkpoint: int | None
    restore_count: int
    restart_count: int
    output: Any
    exit_code: int | None
    error: str | None
    error_code: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    updated_at: str | None
    wake_at: str | None = Field(default=None, description="When a suspended job is restored; null while it waits for a signal only.")
    wait_signal: str | None = Field(default=None, description="Name of the signal a suspended job waits for.")
    attempt: int = 1
    next_attempt_at: str | None = Field(default=None, description="When a pending_retry job starts its next attempt.")
    attempt_errors: list[dict[str, Any]] = Field(default_factory=list, description="Error of each failed attempt.")
    execution_timeout_seconds: float | None = None
    limits: dict[str, Any] | None = Field(default=None, description="Resource limits the job runs with.")


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last page.")


class ResultOut(BaseModel):
    id: str
    state: str
    finished: bool
    output: Any
    exit_code: int | None
    error: str | None


class LogChunk(BaseModel):
    stream: str
    offset: int
    next_offset: int
    data: str
    finished: bool = Field(description="True when the job is finished and no more output will come.")


class CheckpointOut(BaseModel):
    number: int
    mode: str
    status: str
    size_bytes: int
    stored_bytes: int | None = Field(description="Bytes the checkpoint added to the store after deduplication and compression; null for older checkpoints.")
    dump_seconds: float
    total_seconds: float
    criu_version: str
    created_at: str | None


class CheckpointFileOut(BaseModel):
    path: str
    size_bytes: int
    sha256: str | None = Field(description="sha256 of the whole file; null in format 3, which checks each chunk instead.")
    chunks: int | None = Field(description="Number of chunks; null in format 1.")


class VerificationOut(BaseModel):
    status: str = Field(description="passed, failed, or not_requested.")
    message: str | None = None
    seconds: float | None = None


class CheckpointDetailOut(CheckpointOut):
    format_version: int | None = Field(description="Manifest format version; null when the manifest is missing or unreadable.")
    compression: str | None = Field(description="zstd or none for the chunks this checkpoint wrote; null in format 1.")
    chunk_bytes: int | None = Field(description="Fixed chunk size of format 2; null in formats 1 and 3.")
    chunk_count: int | None = Field(description="Distinct chunks the image uses.")
    referenced_stored_bytes: int | None = Field(description="Bytes of all the chunk files the image uses, shared ones included.")
    files: list[CheckpointFileOut]
    manifest_error: str | None = Field(description="Error message of a manifest that could not be read; null when it was read.")
    verification: VerificationOut


class CheckpointList(BaseModel):
    items: list[CheckpointOut]


class EventOut(BaseModel):
    seq: int
    kind: str
    message: str
    data: dict[str, Any]
    created_at: str | None


class EventList(BaseModel):
    items: list[EventOut]


class CheckpointRequest(StrictModel):
    token: str = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9_-]+$", description="Fresh random token per checkpoint() call.")


class CheckpointResponse(BaseModel):
    restored: bool
    checkpoint: int


class ExitRequest(StrictModel):
    exit_code: int = Field(default=0, ge=0, le=255)
    output: Any = None


class ParamsResponse(BaseModel):
    job_id: str
    params: dict[str, Any]


SIGNAL_NAME = Field(pattern=NAME_PATTERN, description="Signal name; letters, digits, '.', '_', '-', at most 128 characters.")
CALL_TOKEN = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9_-]+$", description="Fresh random token per call.")
MAX_SUSPEND_SECONDS = 366 * 24 * 3600.0


class SuspendBody(StrictModel):
    token: str = CALL_TOKEN
    seconds: float | None = Field(default=None, ge=0, le=MAX_SUSPEND_SECONDS, description="Suspend for this many seconds.")
    until: float | None = Field(default=None, ge=0, description="Suspend until this Unix time, in seconds.")

    @model_validator(mode="after")
    def one_wake_time(self) -> "SuspendBody":
        if (self.seconds is None) == (self.until is None):
            raise ValueError("give exactly one of 'seconds' and 'until'")
        if self.until is not None and self.until - time.time() > MAX_SUSPEND_SECONDS:
            raise ValueError(f"until {self.until} is more than 366 days ahead")
        return self


class WaitSignalBody(StrictModel):
    token: str = CALL_TOKEN
    name: str = SIGNAL_NAME
    timeout_seconds: float | None = Field(default=None, ge=0, le=MAX_SUSPEND_SECONDS, description="Give up after this many seconds; null waits forever.")


class ReceiveSignalBody(StrictModel):
    token: str = CALL_TOKEN
    name: str = SIGNAL_NAME


class SignalPayloadOut(BaseModel):
    name: str
    payload: Any
    seq: int


class SuspendResponse(BaseModel):
    restored: bool
    checkpoint: int
    woke: str | None = Field(description="'time' after a plain sleep.")


class WaitSignalResponse(BaseModel):
    restored: bool = Field(description="True when the job was suspended and restored to receive the result.")
    checkpoint: int
    timed_out: bool
    signal: SignalPayloadOut | None


class ReceiveSignalResponse(BaseModel):
    signal: SignalPayloadOut | None


class SignalSend(StrictModel):
    name: str = SIGNAL_NAME
    payload: Any = Field(default=None, description="Any JSON value; the job receives it unchanged.")


class SignalOut(BaseModel):
    seq: int
    name: str
    payload: Any
    created_at: str | None
    delivered: bool
    delivered_at: str | None


class SignalList(BaseModel):
    items: list[SignalOut]


class ExternalCheckpointBody(StrictModel):
    suspend: bool = Field(default=False, description="Stop the job after the checkpoint; it stays suspended until resumed.")


class ForkBody(StrictModel):
    checkpoint: int | None = Field(default=None, ge=1, strict=True, description="Checkpoint number of the source job; the newest valid one by default.")
    limits: LimitsModel | None = Field(default=None, description="Overrides of the source job's resource limits for the fork.")


class ExternalCheckpointOut(BaseModel):
    checkpoint: int
    suspended: bool


class LockBody(StrictModel):
    token: str = CALL_TOKEN


class LockResponse(BaseModel):
    lock: str
    held: bool
    released: bool | None = Field(default=None, description="On release: whether the lock was held.")


class ErrorOut(BaseModel):
    error: str
    detail: str
