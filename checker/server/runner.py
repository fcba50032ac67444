"""One runner per job: an actor that owns the job's process and state machine.

All changes to a job go through its runner's command queue and are handled one
at a time, so a checkpoint, a process exit and a kill can never interleave. The
HTTP handlers only enqueue commands and wait for their results.

States: pending -> running -> completed | failed. A checkpoint in progress is an
operation on a running job, not a state. A crash (the job's init died without
reporting an exit) restores the job from its last valid checkpoint, or starts
it again from the beginning when it has none.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shutil
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checker.config import Settings
from checker.errors import CheckerError, CorruptCheckpointError, CorruptRestoreCacheError, CriuError, ErrorCode
from checker.runtimes.base import INHERITED_ENV, JobFiles, LaunchSpec, Runtime, write_identity
from checker.runtimes.cgroups import Limits
from checker.runtimes.procfs import ProcessIdentity
from checker.server.commands import (
    RESUMED_BY_CALLER,
    Boot,
    CheckpointAnswer,
    ExitReport,
    KillCommand,
    PendingCheckpoint,
    ProcessExited,
    Retry,
    SuspendRequest,
    Wake,
    answer_from_token,
)
from checker.server.jobsockets import JobSockets
from checker.server.locks import CheckpointLocks
from checker.server.retry import RetryPolicy
from checker.store.checkpoints import LocalCheckpointStore, Manifest, RestoreImage
from checker.store.state import CheckpointRecord, CheckpointStatus, JobRecord, JobState, StateStore

logger = logging.getLogger(__name__)

IMAGE_LOG_PREFIX = "job-"
"""Prefix of the copies of the job's logs in an image (`job-stdout.log`, `job-stderr.log`) when the store keeps them."""

DRAIN_WAKE_AT = 0.0
"""Wake time of a job suspended by a drain: past, so the next server restores it at once."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def copy_prefix(source: Path, target: Path, size: int) -> None:
    """Copy the first `size` bytes of `source` (fewer if it is shorter or missing) to a new file `target`."""
    with open(target, "wb") as writer:
        try:
            reader = open(source, "rb")
        except FileNotFoundError:
            return
        with reader:
            remaining = size
            while remaining > 0 and (block := reader.read(min(remaining, 1 << 20))):
                writer.write(block)
                remaining -= len(block)


@dataclass
class RunnerContext:
    settings: Settings
    state: StateStore
    checkpoints: LocalCheckpointStore
    runtimes: dict[str, Runtime]
    api_url: str
    criu_version: str
    on_finished: Any = None
    job_sockets: JobSockets = field(default_factory=JobSockets)


class JobRunner:
    """The actor of one job."""

    def __init__(self, job: JobRecord, context: RunnerContext) -> None:
        self.job_id = job.id
        self.job = job
        self.context = context
        self.runtime = context.runtimes[job.runtime_type]
        self.files = JobFiles.under(context.settings.jobs_dir / job.id)
        self.process: ProcessIdentity | None = None
        self.finished = asyncio.Event()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending_checkpoint: PendingCheckpoint | None = None
        self._inflight_tokens: dict[str, PendingCheckpoint] = {}
        self._watcher: asyncio.Task | None = None
        self._exit_deadline: asyncio.TimerHandle | None = None
        self._wake_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self.locks = CheckpointLocks()
        self.draining = False
        """Set while the server shuts down: the runner suspends jobs but wakes none."""
        self._timeout_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._cleanup_task: asyncio.Future | None = None

    # Public interface, called from HTTP handlers

    def start(self, adopt: ProcessIdentity | None = None, restore_reason: str | None = None) -> None:
        self._queue.put_nowait(Boot(adopt=adopt, restore_reason=restore_reason))
        self._task = asyncio.create_task(self._run(), name=f"runner-{self.job_id}")

    async def stop(self) -> None:
        """Stop the actor without touching the job's process (server shutdown)."""
        self._cancel_wake_timer()
        for task in (self._watcher, self._task):
            if task is not None:
                task.cancel()
        for task in (self._watcher, self._task):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    async def request_checkpoint(self, token: str) -> CheckpointAnswer:
        """Take a checkpoint for a call of the job, or return the stored result of an earlier call with this token.

        Concurrent calls share one dump, and so do retries of a call with the same token.
        """
        repeated = await self._repeated_call(token)
        if repeated is not None:
            return repeated

        pending = self._shared_checkpoint()
        pending.tokens.append(token)
        self._inflight_tokens[token] = pending
        return await asyncio.shield(pending.answer)

    async def _repeated_call(self, token: str) -> CheckpointAnswer | None:
        """Return the result of a call already made with `token` (stored or in flight), or None for a new call.

        Raises CheckerError for a new call when the job has finished.
        """
        known = self.context.state.get_token(self.job_id, token)
        if known is not None:
            return answer_from_token(self.context.state, known)
        if token in self._inflight_tokens:
            return await asyncio.shield(self._inflight_tokens[token].answer)
        self._raise_if_finished()
        return None

    def _shared_checkpoint(self) -> PendingCheckpoint:
        """Return the queued or running keep-running checkpoint to join, or queue a new one.

        A dump that has finished already cannot capture the caller's state, so
        a request arriving after it gets a new checkpoint.
        """
        pending = self._pending_checkpoint
        if pending is None or pending.dump_finished:
            pending = PendingCheckpoint(tokens=[], answer=asyncio.get_running_loop().create_future())
            self._pending_checkpoint = pending
            self._queue.put_nowait(pending)
        return pending

    async def request_suspend(self, token: str, request: SuspendRequest) -> CheckpointAnswer:
        """Suspend the job until `request.wake_at` or its signal, unless a waited-for signal is already here.

        The job's process is dumped in stop mode and ends, so the copy
        restored at wake-up receives the result when it retries the call with
        the same token.
        """
        repeated = await self._repeated_call(token)
        if repeated is not None:
            return repeated

        if request.signal is not None:
            delivered = self.context.state.deliver_signal(self.job_id, request.signal, token, self.job.last_checkpoint or 0, self.job.restore_count)
            if delivered is not None:
                known = self.context.state.get_token(self.job_id, token)
                assert known is not None
                return answer_from_token(self.context.state, known)

        pending = PendingCheckpoint(tokens=[token], answer=asyncio.get_running_loop().create_future(), leave_running=False, suspend=request)
        self._inflight_tokens[token] = pending
        self._queue.put_nowait(pending)
        return await asyncio.shield(pending.answer)

    async def request_external_checkpoint(self, suspend_until: float | None, suspend: bool) -> CheckpointAnswer:
        """Checkpoint the job from outside (a caller or a drain), obeying its checkpoint locks.

        With `suspend`, the job is checkpointed in stop mode and stays
        suspended until `suspend_until` (Unix time), or until resumed when that is None.
        """
        self._raise_if_finished()
        if self.job.state != JobState.RUNNING:
            raise CheckerError(ErrorCode.INVALID_STATE, f"job {self.job_id} is {self.job.state}; only a running job can be checkpointed")
        if not suspend:
            return await asyncio.shield(self._shared_checkpoint().answer)

        request = SuspendRequest(wake_at=suspend_until, signal=None)
        pending = PendingCheckpoint(tokens=[], answer=asyncio.get_running_loop().create_future(), leave_running=False, suspend=request)
        self._queue.put_nowait(pending)
        return await asyncio.shield(pending.answer)

    def resume(self) -> None:
        """Wake a suspended job now, whatever it waits for."""
        self._raise_if_finished()
        if self.job.state != JobState.SUSPENDED:
            raise CheckerError(ErrorCode.INVALID_STATE, f"job {self.job_id} is {self.job.state}; only a suspended job can be resumed")
        self._queue.put_nowait(Wake(reason=RESUMED_BY_CALLER))

    def signal_arrived(self, name: str) -> None:
        """Wake the job if it is suspended waiting for signal `name`."""
        if self.job.state == JobState.SUSPENDED and self.job.wait_signal == name and not self.finished.is_set():
            self._queue.put_nowait(Wake(reason=f"signal {name!r} arrived"))

    async def kill(self, reason: str) -> JobRecord:
        if self.finished.is_set():
            return self.job
        done = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(KillCommand(reason, done))
        return await asyncio.shield(done)

    async def report_exit(self, exit_code: int, output: Any) -> None:
        self._raise_if_finished()
        done = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(ExitReport(exit_code, output, done))
        await asyncio.shield(done)

    def _raise_if_finished(self) -> None:
        # The actor loop has ended, so nothing would ever handle a new command.
        if self.finished.is_set():
            raise CheckerError(ErrorCode.INVALID_STATE, f"job {self.job_id} is {self.job.state}; it takes no more requests")

    # The actor loop

    async def _run(self) -> None:
        try:
            while not self.finished.is_set():
                command = await self._queue.get()
                try:
                    await self._handle(command)
                except Exception as error:  # The actor must survive any one command.
                    logger.exception("job %s: unexpected error while handling %s", self.job_id, type(command).__name__)
                    self._fail_command(command, error)
        finally:
            self._reject_remaining()

    async def _handle(self, command: Any) -> None:
        if isinstance(command, Boot):
            await self._boot(command)
        elif isinstance(command, PendingCheckpoint):
            await self._checkpoint(command)
        elif isinstance(command, ProcessExited):
            await self._on_process_exited(command)
        elif isinstance(command, KillCommand):
            await self._kill(command)
        elif isinstance(command, ExitReport):
            self._record_exit_report(command)
        elif isinstance(command, Wake):
            await self._wake(command)
        elif isinstance(command, Retry):
            await self._retry()

    def _fail_command(self, command: Any, error: Exception) -> None:
        future = getattr(command, "answer", None) or getattr(command, "done", None)
        if future is not None and not future.done():
            future.set_exception(error)
        if isinstance(command, PendingCheckpoint):
            self._forget_checkpoint(command)

    def _reject_remaining(self) -> None:
        while not self._queue.empty():
            command = self._queue.get_nowait()
            error = CheckerError(ErrorCode.INVALID_STATE, f"job {self.job_id} is {self.job.state}; it takes no more requests")
            if isinstance(command, KillCommand) and not command.done.done():
                command.done.set_result(self.job)
            else:
                self._fail_command(command, error)

    # Boot, start, adopt

    async def _boot(self, command: Boot) -> None:
        leftover = await self.runtime.discard_interrupted_restore(self._launch_spec(), command.adopt)
        if leftover is not None:
            self._event("restore_discarded", f"job {self.job_id}: killed process {leftover}, restored by a server that stopped before recording it", pid=leftover)
            logger.warning("job %s: killed process %d left by an interrupted restore", self.job_id, leftover)

        self._schedule_timeout()
        if command.adopt is not None:
            self.process = command.adopt
            await self._listen_for_job()
            # A server that died between restoring the job stopped and resuming it leaves it stopped.
            await self.runtime.resume(command.adopt)
            self._watch()
            self._event("adopted", f"job {self.job_id} re-adopted: process {command.adopt.pid} was still running", pid=command.adopt.pid)
            return
        if command.restore_reason is not None:
            await self._restore_newest(command.restore_reason)
        elif self.job.state == JobState.PENDING:
            await self._start_fresh(reason="started")
        elif self.job.state == JobState.SUSPENDED:
            self._schedule_wake()
        elif self.job.state == JobState.PENDING_RETRY:
            self._schedule_retry()
        else:
            await self._recover(reason="the server found its process gone at startup")

    def _launch_spec(self, env: dict[str, str] | None = None) -> LaunchSpec:
        config = self.job.runtime_config
        return LaunchSpec(
            job_id=self.job_id, command=list(config.get("command", [])), env=env or {}, files=self.files, config=config, limits=Limits.from_json(self.job.limits)
        )

    def _job_environment(self, token: str) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        env.update(self.job.runtime_config.get("env", {}))
        env.update(self.job.env)
        env.update({"CHECKER_API_URL": self.context.api_url, "CHECKER_JOB_ID": self.job_id, "CHECKER_TOKEN": token})
        return env

    async def _start_fresh(self, reason: str) -> None:
        token = secrets.token_urlsafe(32)
        self.job = self.context.state.update_job(self.job_id, token_hash=hash_token(token), output_reported=0, output=None)
        write_identity(self.files, self.job_id, token)
        spec = self._launch_spec(self._job_environment(token))
        await self._listen_for_job()
        try:
            self.process = await self.runtime.start(spec)
        except CheckerError as error:
            logger.error("job %s: %s", self.job_id, error.message)
            await self._fail(error.message, error.code.value)
            return

        now = time.time()
        restarted = self.job.started_at is not None
        details, summary = self._launch_details()
        self.job = self.context.state.update_job(
            self.job_id,
            event=("started", f"job {self.job_id} {reason} as process {self.process.pid}{summary}", {"pid": self.process.pid, **details}),
            state=JobState.RUNNING,
            pid=self.process.pid,
            pid_start_time=self.process.start_time,
            started_at=self.job.started_at or now,
            restart_count=self.job.restart_count + (1 if restarted else 0),
        )
        logger.info("job %s %s (pid %d, runtime %s)", self.job_id, reason, self.process.pid, self.job.runtime_type)
        self._watch()
        self._schedule_timeout()

    def _launch_details(self) -> tuple[dict[str, Any], str]:
        """Return the facts the runtime reports about how this job runs here, such as a VM's accelerator, and their summary for event messages."""
        details = dict(self.runtime.launch_details(self.job.runtime_config))
        summary = details.pop("summary", None)
        return details, f"; {summary}" if summary else ""

    async def _listen_for_job(self) -> None:
        """Serve the runtime API on the job's own socket, for runtimes whose jobs have no network."""
        if self.runtime.uses_job_socket(self.job.runtime_config):
            await self.context.job_sockets.open(self.job_id, self.files.api_socket_path)

    def _job_disconnected(self) -> AbstractAsyncContextManager:
        """Return a context in which the job has no connection to the server, for runtimes that need that to checkpoint."""
        if self.runtime.uses_job_socket(self.job.runtime_config):
            return self.context.job_sockets.paused(self.job_id)
        return nullcontext()

    def _watch(self) -> None:
        process = self.process
        assert process is not None
        spec = self._launch_spec()

        async def watch() -> None:
            status = await self.runtime.wait(spec, process)
            self._queue.put_nowait(ProcessExited(process, status))

        self._watcher = asyncio.create_task(watch(), name=f"watch-{self.job_id}-{process.pid}")

    # Checkpoints

    async def _checkpoint(self, pending: PendingCheckpoint) -> None:
        if self.process is None or self.job.state != JobState.RUNNING:
            pending.dump_finished = True
            self._resolve_checkpoint(pending, error=CheckerError(ErrorCode.INVALID_STATE, f"job {self.job_id} is {self.job.state}; no process to checkpoint"))
            return

        try:
            await self._wait_for_locks()
        except CheckerError as error:
            pending.dump_finished = True
            self._event("checkpoint_failed", error.message, locks_held=self.locks.held)
            logger.error("job %s: %s", self.job_id, error.message)
            self._resolve_checkpoint(pending, error=error)
            return
        try:
            await self._dump_and_store(pending)
        finally:
            await self.locks.end_checkpoint()

    async def _wait_for_locks(self) -> None:
        """Wait until the job holds no checkpoint lock; give up on timeout or when the process ends."""
        timeout = self.context.settings.checkpoint_lock_timeout_seconds
        begin = asyncio.create_task(self.locks.begin_checkpoint(timeout))
        # Mark its exception retrieved: a server stopping mid-wait abandons the task.
        begin.add_done_callback(lambda task: task.cancelled() or task.exception())
        waiting_on = {begin} | ({self._watcher} if self._watcher is not None else set())
        await asyncio.wait(waiting_on, return_when=asyncio.FIRST_COMPLETED)

        if not begin.done():
            begin.cancel()
            await asyncio.gather(begin, return_exceptions=True)
            raise CheckerError(ErrorCode.INVALID_STATE, f"checkpoint of job {self.job_id} abandoned: the job's process ended while it waited for checkpoint locks")
        try:
            begin.result()
        except TimeoutError:
            raise CheckerError(
                ErrorCode.CHECKPOINT_LOCK_TIMEOUT,
                f"checkpoint of job {self.job_id} timed out after {timeout:g} s waiting for {self.locks.held} checkpoint lock(s) to be released; "
                "the job keeps running. Release locks sooner, or raise the server's --checkpoint-lock-timeout",
            ) from None

    async def _dump_and_store(self, pending: PendingCheckpoint) -> None:
        number = self.context.state.max_checkpoint_number(self.job_id) + 1
        context = f"checkpoint {number} of job {self.job_id} (runtime {self.job.runtime_type})"
        staging = self.context.checkpoints.begin(self.job_id, number)
        job_files = {"stdout": self._file_size(self.files.stdout_path), "stderr": self._file_size(self.files.stderr_path)}

        started = time.monotonic()
        writer = self.context.checkpoints.image_writer(self.job_id, staging).start()
        try:
            async with self._job_disconnected():
                await self.runtime.checkpoint(
                    self._launch_spec(), self.process, staging, leave_running=pending.leave_running, log_path=self._criu_log(f"dump-{number}"), context=context
                )
        except CheckerError as error:
            # After a failed dump CRIU lets the job run on, also in stop mode.
            await asyncio.to_thread(writer.cancel)
            pending.dump_finished = True
            self._event("checkpoint_failed", error.message, checkpoint=number, criu_errors=getattr(error, "error_lines", []))
            logger.error("job %s: %s", self.job_id, error.message)
            self._discard_staging(staging)
            self._resolve_checkpoint(pending, error=error)
            return
        dump_seconds = time.monotonic() - started
        pending.dump_finished = True
        if not pending.leave_running:
            # CRIU killed the job after a stop-mode dump; its exit is no crash.
            self.process = None

        try:
            if self.context.checkpoints.stores_job_logs:
                await asyncio.to_thread(self._copy_logs_to_image, staging, job_files)
            manifest = await asyncio.to_thread(
                self.context.checkpoints.commit,
                staging,
                job_id=self.job_id,
                number=number,
                parent=self.job.last_checkpoint,
                runtime=self.job.runtime_type,
                criu_version=self.context.criu_version,
                job_files=job_files,
                writer=writer,
            )
        except OSError as error:
            message = f"{context} failed while storing the image: {error}"
            self._event("checkpoint_failed", message, checkpoint=number)
            logger.error("job %s: %s", self.job_id, message)
            self._discard_staging(staging)
            self._resolve_checkpoint(pending, error=CheckerError(ErrorCode.CHECKPOINT_FAILED, message))
            if self.process is None:
                await self._recover(reason="its suspending checkpoint could not be stored")
            return

        total_seconds = time.monotonic() - started
        record = CheckpointRecord(
            job_id=self.job_id,
            number=number,
            mode="keep-running" if pending.leave_running else "stop",
            location=str(self.context.checkpoints.location(self.job_id, number)),
            size_bytes=manifest.image_bytes,
            stored_bytes=manifest.stored_bytes if manifest.chunked else manifest.image_bytes,
            dump_seconds=dump_seconds,
            total_seconds=total_seconds,
            status=CheckpointStatus.VALID,
            criu_version=self.context.criu_version,
            created_at=time.time(),
        )
        message = (
            f"checkpoint {number} of job {self.job_id}: {manifest.image_bytes / 1e6:.1f} MB, {record.stored_bytes / 1e6:.1f} MB stored, "
            f"dump {dump_seconds:.3f} s, total {total_seconds:.3f} s"
        )
        job_values, event_kind = None, "checkpoint"
        if pending.suspend is not None:
            job_values = self._suspended_values(pending.suspend, pending.tokens[0] if pending.tokens else None)
            event_kind = "suspended"
            message += f"; suspended {self._describe_wake(pending.suspend)}"
        self.job = self.context.state.record_checkpoint(
            record, pending.tokens, self.job.restore_count, message, stop=not pending.leave_running, job_values=job_values, event_kind=event_kind
        )
        logger.info(message)

        self._resolve_checkpoint(pending, answer=CheckpointAnswer(restored=False, checkpoint=number))
        await asyncio.to_thread(self._apply_retention)
        if pending.suspend is not None:
            self._schedule_wake()

    def _resolve_checkpoint(self, pending: PendingCheckpoint, answer: CheckpointAnswer | None = None, error: Exception | None = None) -> None:
        if not pending.answer.done():
            if error is not None:
                pending.answer.set_exception(error)
            else:
                pending.answer.set_result(answer)
        # The caller may have gone away without awaiting the future; mark its error retrieved.
        if error is not None:
            pending.answer.exception()
        self._forget_checkpoint(pending)

    def _forget_checkpoint(self, pending: PendingCheckpoint) -> None:
        for token in pending.tokens:
            self._inflight_tokens.pop(token, None)
        if self._pending_checkpoint is pending:
            self._pending_checkpoint = None

    def _discard_staging(self, staging: Path) -> None:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)

    def _apply_retention(self) -> None:
        """Delete the job's valid checkpoints beyond the newest `keep_checkpoints`, then the chunks no checkpoint lists.

        A checkpoint that a fork or restore has pinned is kept until a later
        retention. The state store marks a checkpoint deleted before its files
        go, so files that a crash left behind are deleted again here.
        """
        store = self.context.checkpoints
        checkpoints = self.context.state.list_checkpoints(self.job_id)
        valid = [c for c in checkpoints if c.status == CheckpointStatus.VALID]
        for old in valid[: -self.context.settings.keep_checkpoints]:
            if store.is_pinned(self.job_id, old.number):
                logger.info("job %s: checkpoint %d is in use by a fork or restore; it is deleted at a later checkpoint", self.job_id, old.number)
                continue
            self.context.state.set_checkpoint_status(self.job_id, old.number, CheckpointStatus.DELETED)
            store.delete(self.job_id, old.number)
        for deleted in (c for c in checkpoints if c.status == CheckpointStatus.DELETED):
            store.delete(self.job_id, deleted.number)
        store.collect_garbage(self.job_id)

    def _criu_log(self, name: str) -> Path:
        """Path of one CRIU log of this job; each dump and restore keeps its own."""
        return self.files.job_dir / "criu" / f"{name}.log"

    @staticmethod
    def _file_size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    # Exit, crash, recovery

    def _record_exit_report(self, report: ExitReport) -> None:
        self.job = self.context.state.update_job(
            self.job_id,
            event=("exit_reported", f"job {self.job_id} reported its result with exit code {report.exit_code}", {"exit_code": report.exit_code}),
            output=report.output,
            output_reported=1,
            exit_code=report.exit_code,
        )
        if not report.done.done():
            report.done.set_result(None)
        loop = asyncio.get_running_loop()
        self._exit_deadline = loop.call_later(self.context.settings.exit_grace_seconds, self._kill_lingering_process)

    def _kill_lingering_process(self) -> None:
        if self.process is not None and not self.finished.is_set():
            logger.warning("job %s reported its exit %.0f s ago but still runs; killing it", self.job_id, self.context.settings.exit_grace_seconds)
            asyncio.ensure_future(self.runtime.kill(self.process))

    async def _on_process_exited(self, exited: ProcessExited) -> None:
        if exited.process != self.process:
            return  # A process this runner already replaced or stopped.
        self.process = None
        released = await self.locks.release_all()
        if released:
            self._event("locks_released", f"job {self.job_id}: released {released} checkpoint lock(s) held by its ended process", count=released)
        status = exited.status

        if self.job.output_reported:
            code = self.job.exit_code or 0
            if code == 0:
                self._finish(JobState.COMPLETED)
            else:
                await self._fail(f"job exited with code {code}", "exit_code", exit_code=code)
            return

        if status.out_of_memory:
            limit = Limits.from_json(self.job.limits).memory_mib
            if limit is None:
                reason = "job ran out of memory: the kernel's OOM killer ended it because the host ran out of memory"
            else:
                reason = f"job ran out of memory: the kernel's OOM killer ended it at its memory limit of {limit} MiB; raise limits.memory_mib"
            self._event("out_of_memory", f"job {self.job_id}: {reason}", memory_mib=limit)
            logger.warning("job %s: %s", self.job_id, reason)
            await self._fail(reason, "out_of_memory")
            return

        if status.reported and status.signal is None:
            if status.exit_code == 0:
                self._finish(JobState.COMPLETED, exit_code=0)
            else:
                await self._fail(f"job exited with code {status.exit_code}; see its stderr log", "exit_code", exit_code=status.exit_code)
            return

        cause = f"killed by signal {status.signal}" if status.signal else "its process died"
        self._event("crashed", f"job {self.job_id} crashed: {cause}", signal=status.signal)
        logger.warning("job %s crashed: %s", self.job_id, cause)
        await self._recover(reason=f"it crashed ({cause})")

    async def _recover(self, reason: str) -> None:
        """Restore the job from its newest valid checkpoint after a crash, or start it again without one."""
        limit = self.context.settings.max_restores_without_progress
        if self.job.failed_restores >= limit:
            crashes = self.job.failed_restores + 1
            await self._fail(
                f"job crashed {crashes} times since checkpoint {self.job.last_checkpoint} ({self.job.failed_restores} restores); not restored again",
                "crash_loop",
            )
            return
        self.job = self.context.state.update_job(self.job_id, failed_restores=self.job.failed_restores + 1)
        await self._restore_newest(reason)

    async def _restore_newest(self, reason: str) -> None:
        """Restore the newest valid checkpoint, skipping corrupt ones; start again when none is left."""
        for checkpoint in reversed(self.context.state.list_checkpoints(self.job_id, [CheckpointStatus.VALID])):
            try:
                await self._restore(checkpoint, reason)
                return
            except CorruptCheckpointError as error:
                self.context.state.set_checkpoint_status(self.job_id, checkpoint.number, CheckpointStatus.CORRUPT)
                self._event("checkpoint_corrupt", f"{error.message}; trying the previous checkpoint", checkpoint=checkpoint.number)
                logger.error("job %s: %s", self.job_id, error.message)
            except CriuError as error:
                self._event("restore_failed", error.message, checkpoint=checkpoint.number, criu_errors=error.error_lines)
                logger.error("job %s: %s", self.job_id, error.message)
                await self._fail(error.message, ErrorCode.RESTORE_FAILED.value)
                return
            except CheckerError as error:
                self._event("restore_failed", error.message, checkpoint=checkpoint.number)
                logger.error("job %s: %s", self.job_id, error.message)
                await self._fail(error.message, error.code.value)
                return

        await self._start_fresh(reason=f"restarted from the beginning because {reason} and it has no valid checkpoint")

    async def _restore(self, checkpoint: CheckpointRecord, reason: str) -> None:
        started = time.monotonic()
        store = self.context.checkpoints
        with store.pinned(self.job_id, checkpoint.number):
            manifest = store.read_manifest(self.job_id, checkpoint.number)
            self._rewind_logs(manifest.job_files)
            if self.runtime.uses_job_socket(self.job.runtime_config):
                # The copy's retried calls must see the restore recorded first, or
                # a retried checkpoint call would return `restored: false`.
                await self.context.job_sockets.stop_listening(self.job_id)
            try:
                process, image, rebuild_seconds = await self._restore_from_image(checkpoint, manifest, use_cache=True)
            except CorruptRestoreCacheError as error:
                logger.warning("job %s: %s; rebuilding the image of checkpoint %d from its chunks", self.job_id, error.message, checkpoint.number)
                await asyncio.to_thread(store.drop_restore_cache, self.job_id, checkpoint.number)
                process, image, rebuild_seconds = await self._restore_from_image(checkpoint, manifest, use_cache=False)
        await self.runtime.resume(process)
        self.process = process
        seconds = time.monotonic() - started

        restore_number = self.job.restore_count + 1
        details, summary = self._launch_details()
        message = f"job {self.job_id} restored from checkpoint {checkpoint.number} (restore {restore_number}) in {seconds:.3f} s because {reason}{summary}"
        self.job = self.context.state.update_job(
            self.job_id,
            event=(
                "restored",
                message,
                {
                    "checkpoint": checkpoint.number,
                    "restore": restore_number,
                    "seconds": seconds,
                    "rebuild_seconds": rebuild_seconds,
                    "image_source": image.source,
                    "pid": self.process.pid,
                    "log_sizes": manifest.job_files,
                    **details,
                },
            ),
            state=JobState.RUNNING,
            pid=self.process.pid,
            pid_start_time=self.process.start_time,
            restore_count=restore_number,
            wake_at=None,
            wait_signal=None,
            wait_token=None,
        )
        logger.info(message)
        await self._listen_for_job()
        self._watch()

    async def _restore_from_image(self, checkpoint: CheckpointRecord, manifest: Manifest, use_cache: bool) -> tuple[ProcessIdentity, RestoreImage, float]:
        """Prepare the image files, restore from them, and return the restored process, the image and the seconds spent preparing it."""
        store = self.context.checkpoints
        started = time.monotonic()
        image = await asyncio.to_thread(store.prepare_restore, manifest, use_cache)
        prepare_seconds = time.monotonic() - started
        await asyncio.to_thread(self._put_back_missing_job_files, image.directory)
        try:
            process = await self._restore_verified(checkpoint, manifest, image)
        finally:
            await asyncio.to_thread(store.release_restore, image)
        return process, image, prepare_seconds

    async def _restore_verified(self, checkpoint: CheckpointRecord, manifest: Manifest, image: RestoreImage) -> ProcessIdentity:
        """Run `criu restore` from the image and return the restored process once the image files matched the manifest."""
        store = self.context.checkpoints
        context = f"restore of job {self.job_id} from checkpoint {checkpoint.number} (runtime {self.job.runtime_type})"
        log_path = self._criu_log(f"restore-{self.job.restore_count + 1}-from-{checkpoint.number}")

        # CRIU restores the copy stopped while the image files are verified on
        # the other core; the copy runs only once every file matched its sha256.
        if image.verified:
            return await self.runtime.restore(self._launch_spec(), image.directory, log_path=log_path, context=context, leave_stopped=True)
        verification = asyncio.create_task(asyncio.to_thread(store.verify_files, manifest, image.directory))
        try:
            process = await self.runtime.restore(self._launch_spec(), image.directory, log_path=log_path, context=context, leave_stopped=True)
        except CheckerError:
            await asyncio.gather(verification, return_exceptions=True)
            if verification.exception() is not None:
                raise verification.exception() from None  # A corrupt image explains the failed restore.
            raise
        try:
            await verification
        except CorruptCheckpointError:
            await self.runtime.kill(process)
            await self.runtime.wait(self._launch_spec(), process)
            raise
        return process

    # Suspension

    @staticmethod
    def _suspended_values(request: SuspendRequest, token: str | None) -> dict[str, Any]:
        return {
            "state": JobState.SUSPENDED,
            "wake_at": request.wake_at,
            "wait_signal": request.signal,
            "wait_token": token,
            "pid": None,
            "pid_start_time": None,
        }

    @staticmethod
    def _describe_wake(request: SuspendRequest) -> str:
        if request.wake_at == DRAIN_WAKE_AT:
            return "for the server's shutdown, until a server starts"
        until = "" if request.wake_at is None else f"until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(request.wake_at))}"
        if request.signal is None:
            return until or "until resumed"
        return f"waiting for signal {request.signal!r}" + (f" {until}" if until else "")

    def _schedule_wake(self) -> None:
        """Arrange the wake-up of a suspended job: now if its signal is already here, else at its wake time."""
        self._cancel_wake_timer()
        job = self.job
        if self.draining:
            return  # The next server wakes it.
        if job.wait_signal is not None and job.wait_token is not None:
            token = self.context.state.get_token(self.job_id, job.wait_token)
            if (token is not None and token.result is not None) or self.context.state.has_pending_signal(self.job_id, job.wait_signal):
                self._queue.put_nowait(Wake(reason=f"signal {job.wait_signal!r} arrived"))
                return
        if job.wake_at is not None:
            delay = max(0.0, job.wake_at - time.time())
            reason = "a server started after a drain" if job.wake_at == DRAIN_WAKE_AT else "its wake time came"
            self._wake_timer = asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, Wake(reason=reason))

    def _cancel_wake_timer(self) -> None:
        if self._wake_timer is not None:
            self._wake_timer.cancel()
            self._wake_timer = None

    async def _wake(self, command: Wake) -> None:
        """Store the suspending call's result durably, then restore the job.

        A job suspended from outside (a drain, or a caller's request) has no
        call waiting for a result and is only restored.
        """
        job = self.job
        if job.state != JobState.SUSPENDED or self.draining:
            return
        self._cancel_wake_timer()
        token = self.context.state.get_token(self.job_id, job.wait_token) if job.wait_token is not None else None
        if token is not None and job.wait_token is not None and token.result is None:
            if job.wait_signal is not None:
                delivered = self.context.state.deliver_signal(self.job_id, job.wait_signal, job.wait_token, token.checkpoint_number, token.restore_count)
                if delivered is None:
                    resumed_by_caller = command.reason == RESUMED_BY_CALLER
                    if not resumed_by_caller and (job.wake_at is None or job.wake_at > time.time()):
                        self._schedule_wake()  # Woken too early: the signal went to another call.
                        return
                    self.context.state.set_token_result(self.job_id, job.wait_token, {"timed_out": True})
            else:
                self.context.state.set_token_result(self.job_id, job.wait_token, {"woke": "time"})

        self._event("woke", f"job {self.job_id} woke: {command.reason}")
        logger.info("job %s woke: %s", self.job_id, command.reason)
        await self._restore_newest(reason=f"it was suspended and {command.reason}")

    def _copy_logs_to_image(self, staging: Path, sizes: dict[str, int]) -> None:
        """Copy the logs, cut to their size at the checkpoint, into the image, so a server without this state directory can restore the job."""
        for name, path in (("stdout", self.files.stdout_path), ("stderr", self.files.stderr_path)):
            copy_prefix(path, staging / f"{IMAGE_LOG_PREFIX}{path.name}", sizes.get(name, 0))

    def _put_back_missing_job_files(self, image_dir: Path) -> None:
        """Create the job directory, its logs and its identity when this state directory has never held them.

        CRIU reopens the logs at restore and requires their size at the
        dump, so a server that takes over a job from another state
        directory needs the copies that `_copy_logs_to_image` stored. The
        state store keeps only a hash of the job's token, so such a server
        issues a new token. The SDK reads the identity file again before
        each call.
        """
        self.files.job_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.files.stdout_path, self.files.stderr_path):
            stored = image_dir / f"{IMAGE_LOG_PREFIX}{path.name}"
            if not path.exists() and stored.exists():
                shutil.copyfile(stored, path)
                logger.info("job %s: %s taken from the checkpoint image, as this state directory had none", self.job_id, path.name)
        if not self.files.identity_path.exists():
            token = secrets.token_urlsafe(32)
            self.job = self.context.state.update_job(self.job_id, token_hash=hash_token(token))
            write_identity(self.files, self.job_id, token)
            logger.info("job %s: issued a new token, as this state directory had no identity file for the job", self.job_id)

    def _rewind_logs(self, sizes: dict[str, int]) -> None:
        """Cut the logs back to their size at the checkpoint.

        Output written after the checkpoint is written again by the restored
        copy; without this cut it would appear twice in the logs.
        """
        for name, path in (("stdout", self.files.stdout_path), ("stderr", self.files.stderr_path)):
            size = sizes.get(name)
            if size is None or not path.exists():
                continue
            if path.stat().st_size > size:
                self._keep_rewound_output(name, path, size)
                os.truncate(path, size)

    def _keep_rewound_output(self, name: str, path: Path, size: int) -> None:
        """Save the output that a rewind cuts, often a failed attempt's traceback, to rewound/."""
        target = self.files.job_dir / "rewound" / f"restore-{self.job.restore_count + 1}-{name}.log"
        target.parent.mkdir(exist_ok=True)
        with open(path, "rb") as source, open(target, "wb") as copy:
            source.seek(size)
            copy.write(source.read())
        self._event("output_rewound", f"job {self.job_id}: {name} written after the checkpoint moved to {target}", stream=name, path=str(target), size=size)

    # Kill and finish

    async def _kill(self, command: KillCommand) -> None:
        self._cancel_wake_timer()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        await self.locks.release_all()
        if self.process is not None:
            await self.runtime.kill(self.process)
            self.process = None
            if self._watcher is not None:
                # The watcher reaps the killed process; its exit report is then ignored.
                await asyncio.wait({self._watcher}, timeout=10)
        self._finish(JobState.FAILED, error=command.reason, error_code=command.error_code)
        if not command.done.done():
            command.done.set_result(self.job)

    def _finish(self, state: str, exit_code: int | None = None, error: str | None = None, error_code: str | None = None) -> None:
        values: dict[str, Any] = {"state": state, "finished_at": time.time(), "pid": None, "pid_start_time": None}
        if exit_code is not None:
            values["exit_code"] = exit_code
        if error is not None:
            values["error"] = error
            values["error_code"] = error_code
        message = f"job {self.job_id} {state}" + (f": {error}" if error else "")
        self.job = self.context.state.update_job(self.job_id, event=(state, message, {"exit_code": exit_code}), **values)
        for timer in (self._exit_deadline, self._timeout_timer, self._retry_timer, self._wake_timer):
            if timer is not None:
                timer.cancel()
        self._cleanup_task = asyncio.ensure_future(self._clean_up())
        logger.info(message)
        self.finished.set()
        if self.context.on_finished is not None:
            self.context.on_finished(self)

    async def _clean_up(self) -> None:
        await self.context.job_sockets.close(self.job_id)
        await self.runtime.cleanup(self._launch_spec())

    # Retries and timeouts

    async def _fail(self, error: str, error_code: str, exit_code: int | None = None) -> None:
        """End the current attempt as failed: schedule the next attempt when the retry policy allows, else fail the job."""
        policy = RetryPolicy.from_json(self.job.retry_policy)
        attempt = self.job.attempt
        history = list(self.job.attempt_errors or []) + [{"attempt": attempt, "error": error, "error_code": error_code, "at": time.time()}]
        if attempt >= policy.max_attempts:
            if policy.max_attempts > 1:
                error = f"{error} (attempt {attempt} of {policy.max_attempts}; no attempts left)"
            self.job = self.context.state.update_job(self.job_id, attempt_errors=history)
            self._finish(JobState.FAILED, exit_code=exit_code, error=error, error_code=error_code)
            return

        delay = policy.delay_before(attempt + 1)
        message = f"job {self.job_id} attempt {attempt} of {policy.max_attempts} failed: {error}; attempt {attempt + 1} in {delay:g} s"
        self.job = self.context.state.update_job(
            self.job_id,
            event=("attempt_failed", message, {"attempt": attempt, "error_code": error_code, "delay_seconds": delay}),
            state=JobState.PENDING_RETRY,
            attempt=attempt + 1,
            next_attempt_at=time.time() + delay,
            attempt_errors=history,
            failed_restores=0,
            pid=None,
            pid_start_time=None,
            output_reported=0,
            output=None,
            error=error,
            error_code=error_code,
            exit_code=exit_code,
        )
        await self.locks.release_all()
        logger.warning(message)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        delay = max(0.0, (self.job.next_attempt_at or 0.0) - time.time())
        self._retry_timer = asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, Retry())

    async def _retry(self) -> None:
        if self.job.state != JobState.PENDING_RETRY:
            return
        policy = RetryPolicy.from_json(self.job.retry_policy)
        self._event("retrying", f"job {self.job_id} attempt {self.job.attempt} of {policy.max_attempts} starts from its last checkpoint")
        await self._restore_newest(reason=f"attempt {self.job.attempt - 1} failed")

    def _schedule_timeout(self) -> None:
        """Kill the job when its execution timeout passes, counted from its first start."""
        limit = self.job.execution_timeout_seconds
        if limit is None or self.job.started_at is None or self._timeout_timer is not None:
            return
        delay = max(0.0, self.job.started_at + limit - time.time())
        reason = f"execution timeout of {limit:g} s exceeded (counted from the first start, suspended time included)"
        done = asyncio.get_running_loop().create_future()
        self._timeout_timer = asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, KillCommand(reason, done, error_code="timeout"))

    def _event(self, kind: str, message: str, **data: Any) -> None:
        self.context.state.add_event(self.job_id, kind, message, data)
