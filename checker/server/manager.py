"""The job manager: spawns jobs, owns their runners, and recovers them at startup."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from checker.config import Settings
from checker.errors import CheckerError, CorruptCheckpointError, ErrorCode
from checker.runtimes import Limits, Runtime
from checker.runtimes.base import JobFiles, write_identity
from checker.runtimes.procfs import ProcessIdentity, is_alive
from checker.server.jobsockets import JobSockets
from checker.server.runner import DRAIN_WAKE_AT, CheckpointAnswer, JobRunner, RunnerContext, SuspendRequest, answer_from_token, copy_prefix, hash_token
from checker.server import models
from checker.store.checkpoints import LocalCheckpointStore, Manifest
from checker.store.state import CheckpointRecord, CheckpointStatus, DuplicateIdempotencyKey, JobRecord, JobState, SignalRecord, StateStore

logger = logging.getLogger(__name__)


def request_digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def split_definition_reference(reference: str, version: int | None) -> tuple[str, int | None]:
    """Split 'name@3' or 'name@latest' into (name, version); a bare name keeps `version`."""
    name, separator, suffix = reference.partition("@")
    if not separator:
        return name, version
    suffix_version = None if suffix == "latest" else int(suffix)
    if version is not None and suffix_version != version:
        raise CheckerError(ErrorCode.INVALID_REQUEST, f"definition {reference!r} and version {version} disagree; give the version once")
    return name, suffix_version


@dataclass(frozen=True)
class CheckpointDetails:
    """A checkpoint's record and manifest, and the result of a verification on request."""

    record: CheckpointRecord
    manifest: Manifest | None
    manifest_error: str | None
    """Error message of a manifest that could not be read; None when it was read."""
    verification: models.VerificationOut
    referenced_stored_bytes: int | None
    """Bytes of all the chunk files the image uses, shared ones included."""


def prepare_fork_files(source: JobFiles, fork: JobFiles, log_sizes: dict[str, int]) -> None:
    """Give a fork its own logs, cut to their length at the checkpoint, and an empty work directory.

    The restore fills the work directory from the archive in the checkpoint's image.
    """
    fork.job_dir.mkdir(parents=True)
    for name, source_log, fork_log in (("stdout", source.stdout_path, fork.stdout_path), ("stderr", source.stderr_path, fork.stderr_path)):
        copy_prefix(source_log, fork_log, log_sizes.get(name, 0))
    fork.work_dir.mkdir()


class JobManager:
    """Registry of job runners, shared by the HTTP handlers."""

    def __init__(
        self,
        settings: Settings,
        state: StateStore,
        checkpoints: LocalCheckpointStore,
        runtimes: dict[str, Runtime],
        api_url: str,
        criu_version: str,
        job_sockets: JobSockets | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.runners: dict[str, JobRunner] = {}
        self._expiry_task: asyncio.Task | None = None
        self.context = RunnerContext(
            settings=settings,
            state=state,
            checkpoints=checkpoints,
            runtimes=runtimes,
            api_url=api_url,
            criu_version=criu_version,
            on_finished=self._on_runner_finished,
            job_sockets=job_sockets or JobSockets(),
        )

    async def recover(self) -> None:
        """Resume supervision of every unfinished job after a start or crash of the server.

        A running job whose process is still alive (same PID and start time) is
        re-adopted. A running job whose process is gone is restored from its last
        valid checkpoint, or started again without one. A pending job is started.
        """
        removed = self.context.checkpoints.remove_partial()
        for staging in removed:
            logger.warning("removed unfinished checkpoint %s left by a previous server", staging)

        unfinished = [JobState.RUNNING, JobState.PENDING, JobState.SUSPENDED, JobState.PENDING_RETRY]
        for job in self.state.list_jobs(states=unfinished, limit=1_000_000):
            adopt = None
            if job.state == JobState.RUNNING and job.pid is not None and job.pid_start_time is not None:
                identity = ProcessIdentity(job.pid, job.pid_start_time)
                if is_alive(identity):
                    adopt = identity
            self._start_runner(job, adopt)

        if self.runners:
            logger.info("recovery: supervising %d unfinished job(s)", len(self.runners))
        self._expiry_task = asyncio.create_task(self._expire_finished_jobs_periodically(), name="checkpoint-expiry")

    async def _expire_finished_jobs_periodically(self) -> None:
        retention = self.settings.finished_checkpoints_retention_seconds
        interval = min(60.0, max(0.5, retention / 4))
        while True:
            try:
                await asyncio.to_thread(self.expire_finished_jobs)
            except (OSError, CheckerError) as error:
                logger.error("deleting the checkpoints of finished jobs failed: %s; retrying in %.0f s", error, interval)
            await asyncio.sleep(interval)

    def expire_finished_jobs(self) -> list[str]:
        """Delete every checkpoint and chunk of jobs that completed or failed longer ago than the retention; return their ids.

        The state store marks the checkpoints deleted first, so a crash midway
        leaves files that the next pass deletes. A job with a checkpoint that
        a fork reads right now is skipped until the next pass.
        """
        cutoff = time.time() - self.settings.finished_checkpoints_retention_seconds
        store = self.context.checkpoints
        expired = []
        for job in self.state.list_jobs(states=JobState.TERMINAL, limit=1_000_000):
            if job.finished_at is None or job.finished_at > cutoff or not store.has_job(job.id) or store.is_pinned(job.id):
                continue
            for checkpoint in self.state.list_checkpoints(job.id, [CheckpointStatus.VALID, CheckpointStatus.CORRUPT]):
                self.state.set_checkpoint_status(job.id, checkpoint.number, CheckpointStatus.DELETED)
            store.delete_job(job.id)
            message = f"checkpoints of job {job.id} deleted: it {job.state} more than {self.settings.finished_checkpoints_retention_seconds:g} s ago"
            self.state.add_event(job.id, "checkpoints_expired", message, {})
            logger.info(message)
            expired.append(job.id)
        return expired

    async def shutdown(self) -> None:
        """Stop every runner, after draining running jobs when the settings ask for it.

        Without a drain, running jobs keep running and the next server
        re-adopts them.
        """
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            await asyncio.gather(self._expiry_task, return_exceptions=True)
        if self.settings.drain_on_shutdown:
            await self.drain(self.settings.drain_timeout_seconds)
        await asyncio.gather(*(runner.stop() for runner in list(self.runners.values())))
        self.runners.clear()

    async def drain(self, timeout: float) -> dict[str, str]:
        """Checkpoint and suspend every running job so the next server resumes it; return {job id: problem} for jobs not drained.

        Each job's checkpoint obeys its checkpoint locks. Jobs still not
        suspended after `timeout` seconds keep running, and the next server
        re-adopts them.
        """
        runners = [r for r in self.runners.values() if r.job.state == JobState.RUNNING]
        for runner in self.runners.values():
            runner.draining = True
        if not runners:
            return {}
        logger.info("draining %d running job(s) before shutdown (at most %.0f s)", len(runners), timeout)

        async def drain_one(runner: JobRunner) -> None:
            await runner.request_external_checkpoint(suspend_until=DRAIN_WAKE_AT, suspend=True)

        tasks = {runner.job_id: asyncio.create_task(drain_one(runner)) for runner in runners}
        done, pending = await asyncio.wait(tasks.values(), timeout=timeout)
        problems = {}
        for job_id, task in tasks.items():
            if task in pending:
                task.cancel()
                locks = self.runners[job_id].locks.held if job_id in self.runners else 0
                problems[job_id] = f"not suspended within {timeout:g} s" + (f"; it held {locks} checkpoint lock(s)" if locks else "")
            elif task.exception() is not None:
                error = task.exception()
                problems[job_id] = getattr(error, "message", str(error))
        for job_id, problem in problems.items():
            logger.warning("drain: job %s keeps running: %s", job_id, problem)
        logger.info("drain finished: %d of %d job(s) suspended", len(runners) - len(problems), len(runners))
        return problems

    async def checkpoint_from_outside(self, job_id: str, suspend: bool) -> CheckpointAnswer:
        return await self.runner_for(job_id).request_external_checkpoint(suspend_until=None, suspend=suspend)

    def resume(self, job_id: str) -> JobRecord:
        job = self.get_job(job_id)
        if job.terminal:
            raise CheckerError(ErrorCode.INVALID_STATE, f"job {job_id} is {job.state}; only a suspended job can be resumed")
        self.runner_for(job_id).resume()
        return self.get_job(job_id)

    def _start_runner(self, job: JobRecord, adopt: ProcessIdentity | None = None, restore_reason: str | None = None) -> JobRunner:
        runner = JobRunner(job, self.context)
        self.runners[job.id] = runner
        runner.start(adopt, restore_reason)
        return runner

    def _on_runner_finished(self, runner: JobRunner) -> None:
        if self.runners.get(runner.job_id) is runner:
            del self.runners[runner.job_id]

    def validate_definition(self, runtime_type: str, config: dict, limits: dict | None) -> None:
        """Raise CheckerError (invalid_request) when the runtime rejects `config` or cannot enforce `limits`."""
        runtime = self.context.runtimes.get(runtime_type)
        if runtime is None:
            raise CheckerError(ErrorCode.INVALID_REQUEST, f"runtime.type {runtime_type!r} is not available on this server; use one of {', '.join(sorted(self.context.runtimes))}")
        try:
            runtime.validate_config(config)
            runtime.validate_limits(Limits.from_json(limits))
        except ValueError as error:
            raise CheckerError(ErrorCode.INVALID_REQUEST, str(error)) from error

    def _effective_limits(self, runtime_type: str, base: dict | None, overrides: dict | None) -> dict | None:
        """Merge `overrides` into `base` limits and check that the runtime can enforce the result."""
        if overrides is None:
            return base
        merged = Limits.from_json(base).merged_with(Limits.from_json(overrides))
        try:
            self.context.runtimes[runtime_type].validate_limits(merged)
        except ValueError as error:
            raise CheckerError(ErrorCode.INVALID_REQUEST, str(error)) from error
        return merged.to_json()

    def spawn(
        self, definition_name: str, version: int | None, params: dict, env: dict, job_metadata: dict, idempotency_key: str | None, limits: dict | None = None
    ) -> tuple[JobRecord, bool]:
        """Create a job and start it; return (job, created). A repeated idempotency key returns the first job.

        `limits` overrides the definition's resource limits one by one.
        """
        definition_name, version = split_definition_reference(definition_name, version)
        request = {"definition": definition_name, "version": version, "params": params, "env": env, "metadata": job_metadata}
        if limits is not None:
            request["limits"] = limits
        digest = request_digest(request)
        if idempotency_key:
            existing = self.state.find_job_by_idempotency_key(idempotency_key)
            if existing is not None:
                return self._check_idempotent_match(existing, digest, idempotency_key), False

        definition = self.state.get_definition(definition_name, version)
        if definition is None:
            requested = f"version {version} of " if version else ""
            raise CheckerError(ErrorCode.NOT_FOUND, f"{requested}job definition {definition_name!r} not found; create it with POST /v1/job-definitions")

        job_id = secrets.token_hex(8)
        values = {
            "id": job_id,
            "definition_name": definition.name,
            "definition_version": definition.version,
            "runtime_type": definition.runtime_type,
            "runtime_config": definition.runtime_config,
            "state": JobState.PENDING,
            "params": params,
            "env": env,
            "metadata": job_metadata,
            "idempotency_key": idempotency_key,
            "request_digest": digest,
            "token_hash": "",
            "retry_policy": definition.retry_policy,
            "execution_timeout_seconds": definition.execution_timeout_seconds,
            "attempt": 1,
            "limits": self._effective_limits(definition.runtime_type, definition.limits, limits),
        }
        try:
            job = self.state.insert_job(values, f"job {job_id} created from {definition.name} version {definition.version}")
        except DuplicateIdempotencyKey:
            existing = self.state.find_job_by_idempotency_key(idempotency_key or "")
            assert existing is not None
            return self._check_idempotent_match(existing, digest, idempotency_key or ""), False

        logger.info("job %s created from %s version %d", job_id, definition.name, definition.version)
        self._start_runner(job)
        return job, True

    async def fork(self, source_id: str, number: int | None, limits: dict | None = None) -> JobRecord:
        """Create a job restored from checkpoint `number` (default: the newest valid one) of another job.

        The fork gets its own id, token, PID namespace and files: logs cut to
        their length at the checkpoint, and the work directory as it was at
        the checkpoint. The source job is not touched. `limits` overrides the
        source's resource limits one by one.
        """
        source = self.get_job(source_id)
        checkpoint = self._checkpoint_to_fork(source, number)
        fork_limits = self._effective_limits(source.runtime_type, source.limits, limits)
        fork_id = secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        store = self.context.checkpoints
        with store.pinned(source.id, checkpoint.number):
            manifest = store.read_manifest(source.id, checkpoint.number)
            source_files = JobFiles.under(self.settings.jobs_dir / source.id)
            fork_files = JobFiles.under(self.settings.jobs_dir / fork_id)
            await asyncio.to_thread(prepare_fork_files, source_files, fork_files, manifest.job_files)
            write_identity(fork_files, fork_id, token)
            await asyncio.to_thread(store.copy, source.id, checkpoint.number, fork_id)

        values = {
            "id": fork_id,
            "definition_name": source.definition_name,
            "definition_version": source.definition_version,
            "runtime_type": source.runtime_type,
            "runtime_config": source.runtime_config,
            "state": JobState.RUNNING,
            "params": source.params,
            "env": source.env,
            "metadata": source.metadata,
            "token_hash": hash_token(token),
            "retry_policy": source.retry_policy,
            "execution_timeout_seconds": source.execution_timeout_seconds,
            "attempt": 1,
            "started_at": time.time(),
            "limits": fork_limits,
        }
        copy = dataclasses.replace(checkpoint, job_id=fork_id, location=str(self.context.checkpoints.location(fork_id, checkpoint.number)))
        message = f"job {fork_id} forked from checkpoint {checkpoint.number} of job {source.id}"
        job = self.state.insert_fork(values, copy, source.id, message)
        logger.info(message)
        self._start_runner(job, restore_reason=f"it was forked from checkpoint {checkpoint.number} of job {source.id}")
        return job

    def _checkpoint_to_fork(self, source: JobRecord, number: int | None) -> CheckpointRecord:
        valid = self.state.list_checkpoints(source.id, [CheckpointStatus.VALID])
        if number is None:
            if valid:
                return valid[-1]
            if source.terminal:
                raise CheckerError(ErrorCode.INVALID_STATE, f"job {source.id} is {source.state} and has no valid checkpoint, so there is nothing to fork from")
            raise CheckerError(ErrorCode.INVALID_STATE, f"job {source.id} has no valid checkpoint to fork from; fork it after its first checkpoint")
        for checkpoint in valid:
            if checkpoint.number == number:
                return checkpoint
        numbers = ", ".join(str(checkpoint.number) for checkpoint in valid) or "none"
        raise CheckerError(ErrorCode.NOT_FOUND, f"job {source.id} has no valid checkpoint {number}; its valid checkpoints: {numbers}")

    async def checkpoint_details(self, job_id: str, number: int, verify: bool) -> CheckpointDetails:
        """Describe checkpoint `number` of a job from its record and manifest, verifying its image when `verify` is set."""
        self.get_job(job_id)
        records = self.state.list_checkpoints(job_id)
        record = next((c for c in records if c.number == number), None)
        if record is None:
            numbers = ", ".join(str(c.number) for c in records) or "none"
            raise CheckerError(ErrorCode.NOT_FOUND, f"job {job_id} has no checkpoint {number}; its checkpoints: {numbers}")

        store = self.context.checkpoints
        manifest, manifest_error = None, None
        if record.status == CheckpointStatus.DELETED:
            manifest_error = f"checkpoint {number} of job {job_id} was deleted"
        else:
            try:
                manifest = store.read_manifest(job_id, number)
            except CorruptCheckpointError as error:
                manifest_error = error.message

        verification = models.VerificationOut(status="not_requested")
        if verify:
            verification = await self._verify_checkpoint(job_id, number, manifest_error)
        return CheckpointDetails(record, manifest, manifest_error, verification, store.stored_bytes_of(manifest) if manifest else None)

    async def _verify_checkpoint(self, job_id: str, number: int, manifest_error: str | None) -> models.VerificationOut:
        if manifest_error is not None:
            return models.VerificationOut(status="failed", message=manifest_error)
        started = time.monotonic()
        try:
            with self.context.checkpoints.pinned(job_id, number):
                await asyncio.to_thread(self.context.checkpoints.verify, job_id, number)
        except CorruptCheckpointError as error:
            logger.warning("verification on request: %s", error.message)
            return models.VerificationOut(status="failed", message=error.message, seconds=time.monotonic() - started)
        return models.VerificationOut(status="passed", seconds=time.monotonic() - started)

    @staticmethod
    def _check_idempotent_match(existing: JobRecord, digest: str, key: str) -> JobRecord:
        if existing.request_digest != digest:
            raise CheckerError(
                ErrorCode.CONFLICT,
                f"idempotency key {key!r} was already used for job {existing.id} with a different request; use a new key",
            )
        return existing

    def get_job(self, job_id: str) -> JobRecord:
        job = self.state.get_job(job_id)
        if job is None:
            raise CheckerError(ErrorCode.NOT_FOUND, f"job {job_id!r} not found")
        return job

    def runner_for(self, job_id: str) -> JobRunner:
        runner = self.runners.get(job_id)
        if runner is None:
            raise self._no_runner_error(job_id)
        return runner

    def _no_runner_error(self, job_id: str) -> CheckerError:
        job = self.get_job(job_id)
        return CheckerError(ErrorCode.INVALID_STATE, f"job {job_id} is {job.state}; it has no running process")

    async def checkpoint(self, job_id: str, token: str) -> CheckpointAnswer:
        runner = self.runners.get(job_id)
        if runner is None:
            return self._answer_without_runner(job_id, token, need_result=False)
        return await runner.request_checkpoint(token)

    async def suspend(self, job_id: str, token: str, request: SuspendRequest) -> CheckpointAnswer:
        runner = self.runners.get(job_id)
        if runner is None:
            return self._answer_without_runner(job_id, token, need_result=True)
        return await runner.request_suspend(token, request)

    def _answer_without_runner(self, job_id: str, token: str, need_result: bool) -> CheckpointAnswer:
        """Answer a repeated call of a job that has no runner (it finished); raise for any other call.

        The runner looks the token up itself, so a running job's call reads it once.
        """
        known = self.state.get_token(job_id, token)
        if known is not None and (known.result is not None or not need_result):
            return answer_from_token(self.state, known)
        raise self._no_runner_error(job_id)

    def send_signal(self, job_id: str, name: str, payload: Any) -> SignalRecord:
        """Store a signal durably, then wake the job if it waits for it."""
        job = self.get_job(job_id)
        if job.terminal:
            raise CheckerError(ErrorCode.INVALID_STATE, f"job {job_id} is {job.state}; signals go only to unfinished jobs")
        signal = self.state.add_signal(job_id, name, payload)
        logger.info("signal %r (%d) stored for job %s", name, signal.seq, job_id)
        runner = self.runners.get(job_id)
        if runner is not None:
            runner.signal_arrived(name)
        return signal

    def receive_signal(self, job_id: str, token: str, name: str) -> dict | None:
        """Deliver the oldest pending signal `name` without suspending; a retried token gets the same one."""
        job = self.get_job(job_id)
        known = self.state.get_token(job_id, token)
        if known is not None and known.result is not None:
            return known.result.get("signal")
        delivered = self.state.deliver_signal(job_id, name, token, job.last_checkpoint or 0, job.restore_count)
        if delivered is None:
            return None
        return {"name": delivered.name, "payload": delivered.payload, "seq": delivered.seq}

    async def acquire_lock(self, job_id: str, token: str) -> None:
        await self.runner_for(job_id).locks.acquire(token)

    async def release_lock(self, job_id: str, token: str) -> bool:
        return await self.runner_for(job_id).locks.release(token)

    async def report_exit(self, job_id: str, exit_code: int, output: Any) -> None:
        await self.runner_for(job_id).report_exit(exit_code, output)

    async def kill(self, job_id: str, reason: str) -> JobRecord:
        job = self.get_job(job_id)
        if job.terminal:
            return job
        runner = self.runners.get(job_id)
        if runner is None:
            return self.state.update_job(job_id, event=("failed", f"job {job_id} failed: {reason}", {}), state=JobState.FAILED, error=reason, error_code="killed", finished_at=time.time())
        return await runner.kill(reason)

    async def wait_finished(self, job_id: str, timeout: float) -> JobRecord:
        job = self.get_job(job_id)
        runner = self.runners.get(job_id)
        if job.terminal or runner is None or timeout <= 0:
            return job
        try:
            await asyncio.wait_for(runner.finished.wait(), timeout)
        except TimeoutError:
            pass
        return self.get_job(job_id)
