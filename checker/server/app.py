"""The FastAPI application: caller API under /v1, runtime API under /v1/runtime."""

from __future__ import annotations

import base64
import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import checker
from checker.errors import CheckerError, ErrorCode
from checker.server import models
from checker.server.manager import CheckpointDetails, JobManager
from checker.server.runner import SuspendRequest, hash_token
from checker.store.state import CheckpointRecord, DefinitionRecord, EventRecord, JobRecord, JobState, SignalRecord

logger = logging.getLogger(__name__)

MAX_LOG_CHUNK = 1 << 20
MAX_WAIT_SECONDS = 300.0


def definition_out(record: DefinitionRecord) -> models.DefinitionOut:
    return models.DefinitionOut(
        name=record.name,
        version=record.version,
        runtime={"type": record.runtime_type, **record.runtime_config},
        metadata=record.metadata,
        created_at=models.iso_time(record.created_at),
        retry_policy=record.retry_policy,
        execution_timeout_seconds=record.execution_timeout_seconds,
        limits=record.limits,
    )


def job_out(job: JobRecord) -> models.JobOut:
    return models.JobOut(
        id=job.id,
        definition=job.definition_name,
        version=job.definition_version,
        runtime=job.runtime_type,
        state=job.state,
        params=job.params,
        metadata=job.metadata,
        idempotency_key=job.idempotency_key,
        pid=job.pid,
        checkpoint_count=job.checkpoint_count,
        last_checkpoint=job.last_checkpoint,
        restore_count=job.restore_count,
        restart_count=job.restart_count,
        output=job.output,
        exit_code=job.exit_code,
        error=job.error,
        error_code=job.error_code,
        created_at=models.iso_time(job.created_at),
        started_at=models.iso_time(job.started_at),
        finished_at=models.iso_time(job.finished_at),
        updated_at=models.iso_time(job.updated_at),
        wake_at=models.iso_time(job.wake_at),
        wait_signal=job.wait_signal,
        attempt=job.attempt,
        next_attempt_at=models.iso_time(job.next_attempt_at),
        attempt_errors=job.attempt_errors or [],
        execution_timeout_seconds=job.execution_timeout_seconds,
        limits=job.limits,
    )


def checkpoint_out(record: CheckpointRecord) -> models.CheckpointOut:
    return models.CheckpointOut(
        number=record.number,
        mode=record.mode,
        status=record.status,
        size_bytes=record.size_bytes,
        stored_bytes=record.stored_bytes,
        dump_seconds=record.dump_seconds,
        total_seconds=record.total_seconds,
        criu_version=record.criu_version,
        created_at=models.iso_time(record.created_at),
    )


def checkpoint_detail_out(details: CheckpointDetails) -> models.CheckpointDetailOut:
    manifest = details.manifest
    files = [
        models.CheckpointFileOut(path=f.path, size_bytes=f.size, sha256=f.sha256, chunks=None if f.chunks is None else len(f.chunks))
        for f in (manifest.files if manifest else ())
    ]
    return models.CheckpointDetailOut(
        **checkpoint_out(details.record).model_dump(),
        format_version=manifest.format_version if manifest else None,
        compression=manifest.compression if manifest else None,
        chunk_bytes=manifest.chunk_bytes if manifest else None,
        chunk_count=len(manifest.chunk_digests()) if manifest and manifest.chunked else None,
        referenced_stored_bytes=details.referenced_stored_bytes,
        files=files,
        manifest_error=details.manifest_error,
        verification=details.verification,
    )


def event_out(record: EventRecord) -> models.EventOut:
    return models.EventOut(seq=record.seq, kind=record.kind, message=record.message, data=record.data, created_at=models.iso_time(record.created_at))


def signal_out(record: SignalRecord) -> models.SignalOut:
    return models.SignalOut(
        seq=record.seq,
        name=record.name,
        payload=record.payload,
        created_at=models.iso_time(record.created_at),
        delivered=record.delivered_token is not None,
        delivered_at=models.iso_time(record.delivered_at),
    )


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        kind, value = base64.urlsafe_b64decode(padded.encode()).decode().split(":", 1)
        if kind != "seq":
            raise ValueError(kind)
        return int(value)
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckerError(ErrorCode.INVALID_REQUEST, f"cursor {cursor!r} is invalid; pass the next_cursor of a previous page") from error


def error_response(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": code, "detail": detail})


def describe_validation_error(error: RequestValidationError) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        message = str(item.get("msg", "invalid"))
        # pydantic prefixes the messages of ValueErrors raised by validators.
        message = message.removeprefix("Value error, ")
        problem = f"{location}: {message}"
        if item.get("type") in ("string_pattern_mismatch", "greater_than_equal", "less_than_equal", "greater_than", "less_than", "int_type"):
            problem += f" (got {item.get('input')!r})"
        problems.append(problem)
    return "; ".join(problems)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CheckerError)
    async def checker_error(request: Request, error: CheckerError) -> JSONResponse:
        return error_response(error.http_status, error.code.value, error.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, ErrorCode.INVALID_REQUEST.value, describe_validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, "http_error", str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        # The details stay in the server log: they may name tables, paths or values.
        return error_response(500, "internal_error", f"internal error ({type(error).__name__}) in {request.method} {request.url.path}; see the server log")


def manager_of(request: Request) -> JobManager:
    return request.app.state.manager


Manager = Annotated[JobManager, Depends(manager_of)]


def caller_auth(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Require the server's API token on the caller API when one is configured."""
    expected = request.app.state.api_token
    if not expected:
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise CheckerError(ErrorCode.UNAUTHORIZED, "the caller API needs 'Authorization: Bearer <API token>'")
    if not hmac.compare_digest(authorization.removeprefix("Bearer ").encode(), expected.encode()):
        raise CheckerError(ErrorCode.UNAUTHORIZED, "the API token is wrong")


def job_token_auth(job_id: str, request: Request, authorization: Annotated[str | None, Header()] = None) -> JobRecord:
    """Authenticate a runtime API call by the job's own bearer token.

    A token valid for another job is rejected with 403, an unknown token with 401.
    """
    if not authorization or not authorization.startswith("Bearer "):
        raise CheckerError(ErrorCode.UNAUTHORIZED, "the runtime API needs 'Authorization: Bearer <job token>' (CHECKER_TOKEN)")
    presented = hash_token(authorization.removeprefix("Bearer "))

    manager: JobManager = request.app.state.manager
    job = manager.state.get_job(job_id)
    if job is not None and hmac.compare_digest(presented, job.token_hash):
        return job
    if manager.state.job_id_for_token_hash(presented) is not None:
        raise CheckerError(ErrorCode.FORBIDDEN, f"this token belongs to another job; it cannot act on job {job_id}")
    raise CheckerError(ErrorCode.UNAUTHORIZED, "the job token is invalid")


AuthenticatedJob = Annotated[JobRecord, Depends(job_token_auth)]


def build_caller_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(caller_auth)], tags=["caller"])

    @router.post("/job-definitions", status_code=201, response_model=models.DefinitionOut)
    async def create_definition(body: models.DefinitionCreate, manager: Manager) -> models.DefinitionOut:
        runtime = manager.context.runtimes.get(body.runtime.type)
        if runtime is None:
            raise CheckerError(
                ErrorCode.INVALID_REQUEST,
                f"runtime.type {body.runtime.type!r} is not available on this server; run 'checker doctor' to see which runtimes work here and why",
            )
        config = body.runtime.model_dump(exclude={"type"}, exclude_none=True)
        retry_policy = body.retry_policy.model_dump() if body.retry_policy is not None else None
        limits = body.limits.model_dump(exclude_none=True) if body.limits is not None else None
        manager.validate_definition(body.runtime.type, config, limits)
        record = manager.state.create_definition(body.name, body.runtime.type, config, body.metadata, retry_policy, body.execution_timeout_seconds, limits)
        logger.info("job definition %s version %d created", record.name, record.version)
        return definition_out(record)

    @router.get("/job-definitions", response_model=models.DefinitionList)
    async def list_definitions(manager: Manager, name: str | None = None) -> models.DefinitionList:
        return models.DefinitionList(items=[definition_out(r) for r in manager.state.list_definitions(name)])

    @router.get("/job-definitions/{name}", response_model=models.DefinitionOut)
    async def get_definition(name: str, manager: Manager, version: Annotated[int | None, Query(ge=1)] = None) -> models.DefinitionOut:
        record = manager.state.get_definition(name, version)
        if record is None:
            raise CheckerError(ErrorCode.NOT_FOUND, f"job definition {name!r}{f' version {version}' if version else ''} not found")
        return definition_out(record)

    @router.delete("/job-definitions/{name}", status_code=204)
    async def delete_definition(name: str, manager: Manager, version: Annotated[int | None, Query(ge=1)] = None) -> Response:
        deleted = manager.state.delete_definition(name, version)
        if deleted == 0:
            raise CheckerError(ErrorCode.NOT_FOUND, f"job definition {name!r}{f' version {version}' if version else ''} not found")
        logger.info("job definition %s deleted (%d version(s))", name, deleted)
        return Response(status_code=204)

    @router.post("/jobs", status_code=201, response_model=models.JobOut, responses={200: {"model": models.JobOut, "description": "Existing job with this idempotency key"}})
    async def spawn_job(body: models.JobSpawn, manager: Manager, response: Response) -> models.JobOut:
        limits = body.limits.model_dump(exclude_none=True) if body.limits is not None else None
        job, created = manager.spawn(body.definition, body.version, body.params, body.env, body.metadata, body.idempotency_key, limits)
        if not created:
            response.status_code = 200
        return job_out(job)

    @router.get("/jobs", response_model=models.JobList)
    async def list_jobs(
        manager: Manager,
        state: Annotated[list[str] | None, Query(description="Filter by state; repeat for several.")] = None,
        definition: Annotated[str | None, Query(description="Only jobs of this job definition name.")] = None,
        metadata: Annotated[list[str] | None, Query(description="KEY=VALUE that the job's metadata must contain; repeat for several.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> models.JobList:
        for value in state or []:
            if value not in JobState.ALL:
                raise CheckerError(ErrorCode.INVALID_REQUEST, f"state {value!r} is invalid; use one of {', '.join(JobState.ALL)}")
        metadata_match = {}
        for pair in metadata or []:
            key, separator, value = pair.partition("=")
            if not separator or not key:
                raise CheckerError(ErrorCode.INVALID_REQUEST, f"metadata filter {pair!r} is invalid; write KEY=VALUE")
            metadata_match[key] = value
        after = decode_cursor(cursor) if cursor else None
        page = manager.state.list_jobs(states=state, after_seq=after, limit=limit + 1, definition=definition, metadata_match=metadata_match)
        next_cursor = encode_cursor(page[limit - 1].seq) if len(page) > limit else None
        return models.JobList(items=[job_out(j) for j in page[:limit]], next_cursor=next_cursor)

    @router.get("/jobs/{job_id}", response_model=models.JobOut)
    async def get_job(job_id: str, manager: Manager) -> models.JobOut:
        return job_out(manager.get_job(job_id))

    @router.post("/jobs/{job_id}/kill", response_model=models.JobOut)
    async def kill_job(job_id: str, manager: Manager) -> models.JobOut:
        return job_out(await manager.kill(job_id, "killed on request"))

    @router.get("/jobs/{job_id}/result", response_model=models.ResultOut, responses={202: {"model": models.ResultOut, "description": "Not finished yet"}})
    async def get_result(
        job_id: str, manager: Manager, response: Response, wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for the job to finish.")] = 0
    ) -> models.ResultOut:
        job = await manager.wait_finished(job_id, wait)
        if not job.terminal:
            response.status_code = 202
        return models.ResultOut(id=job.id, state=job.state, finished=job.terminal, output=job.output, exit_code=job.exit_code, error=job.error)

    @router.get("/jobs/{job_id}/logs", response_model=models.LogChunk)
    async def read_logs(
        job_id: str,
        manager: Manager,
        stream: Annotated[str, Query(pattern="^(stdout|stderr)$")] = "stdout",
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_LOG_CHUNK)] = 65536,
    ) -> models.LogChunk:
        job = manager.get_job(job_id)
        path = manager.settings.jobs_dir / job.id / f"{stream}.log"
        data = b""
        try:
            with open(path, "rb") as log_file:
                log_file.seek(offset)
                data = log_file.read(limit)
        except FileNotFoundError:
            pass
        return models.LogChunk(stream=stream, offset=offset, next_offset=offset + len(data), data=data.decode(errors="replace"), finished=job.terminal and not data)

    @router.get("/jobs/{job_id}/checkpoints", response_model=models.CheckpointList)
    async def list_checkpoints(job_id: str, manager: Manager) -> models.CheckpointList:
        manager.get_job(job_id)
        return models.CheckpointList(items=[checkpoint_out(c) for c in manager.state.list_checkpoints(job_id)])

    @router.get("/jobs/{job_id}/checkpoints/{number}", response_model=models.CheckpointDetailOut)
    async def show_checkpoint(
        job_id: str,
        number: int,
        manager: Manager,
        verify: Annotated[bool, Query(description="Check every chunk and image file against the manifest; reads the whole image.")] = False,
    ) -> models.CheckpointDetailOut:
        return checkpoint_detail_out(await manager.checkpoint_details(job_id, number, verify))

    @router.post("/jobs/{job_id}/checkpoint", response_model=models.ExternalCheckpointOut)
    async def checkpoint_job(job_id: str, manager: Manager, body: models.ExternalCheckpointBody | None = None) -> models.ExternalCheckpointOut:
        suspend = body.suspend if body is not None else False
        answer = await manager.checkpoint_from_outside(job_id, suspend)
        return models.ExternalCheckpointOut(checkpoint=answer.checkpoint, suspended=suspend)

    @router.post("/jobs/{job_id}/fork", response_model=models.JobOut, status_code=201)
    async def fork_job(job_id: str, manager: Manager, body: models.ForkBody | None = None) -> models.JobOut:
        limits = body.limits.model_dump(exclude_none=True) if body is not None and body.limits is not None else None
        return job_out(await manager.fork(job_id, body.checkpoint if body is not None else None, limits))

    @router.post("/jobs/{job_id}/resume", response_model=models.JobOut)
    async def resume_job(job_id: str, manager: Manager) -> models.JobOut:
        return job_out(manager.resume(job_id))

    @router.post("/jobs/{job_id}/signals", status_code=202, response_model=models.SignalOut)
    async def send_signal(job_id: str, body: models.SignalSend, manager: Manager) -> models.SignalOut:
        return signal_out(manager.send_signal(job_id, body.name, body.payload))

    @router.get("/jobs/{job_id}/signals", response_model=models.SignalList)
    async def list_signals(job_id: str, manager: Manager) -> models.SignalList:
        manager.get_job(job_id)
        return models.SignalList(items=[signal_out(s) for s in manager.state.list_signals(job_id)])

    @router.get("/jobs/{job_id}/events", response_model=models.EventList)
    async def list_events(job_id: str, manager: Manager, after: Annotated[int, Query(ge=0)] = 0) -> models.EventList:
        manager.get_job(job_id)
        return models.EventList(items=[event_out(e) for e in manager.state.list_events(job_id, after)])

    return router


def build_runtime_router() -> APIRouter:
    router = APIRouter(prefix="/v1/runtime/jobs/{job_id}", tags=["runtime"])

    @router.get("/params", response_model=models.ParamsResponse)
    async def get_params(job: AuthenticatedJob) -> models.ParamsResponse:
        return models.ParamsResponse(job_id=job.id, params=job.params)

    @router.post("/checkpoint", response_model=models.CheckpointResponse)
    async def take_checkpoint(body: models.CheckpointRequest, job: AuthenticatedJob, manager: Manager) -> models.CheckpointResponse:
        answer = await manager.checkpoint(job.id, body.token)
        return models.CheckpointResponse(restored=answer.restored, checkpoint=answer.checkpoint)

    @router.post("/suspend", response_model=models.SuspendResponse)
    async def suspend(body: models.SuspendBody, job: AuthenticatedJob, manager: Manager) -> models.SuspendResponse:
        wake_at = body.until if body.until is not None else time.time() + (body.seconds or 0.0)
        answer = await manager.suspend(job.id, body.token, SuspendRequest(wake_at=wake_at, signal=None))
        return models.SuspendResponse(restored=answer.restored, checkpoint=answer.checkpoint, woke=(answer.result or {}).get("woke"))

    @router.post("/signals/wait", response_model=models.WaitSignalResponse)
    async def wait_for_signal(body: models.WaitSignalBody, job: AuthenticatedJob, manager: Manager) -> models.WaitSignalResponse:
        wake_at = None if body.timeout_seconds is None else time.time() + body.timeout_seconds
        answer = await manager.suspend(job.id, body.token, SuspendRequest(wake_at=wake_at, signal=body.name))
        result = answer.result or {}
        return models.WaitSignalResponse(
            restored=answer.restored, checkpoint=answer.checkpoint, timed_out=bool(result.get("timed_out")), signal=result.get("signal")
        )

    @router.post("/signals/receive", response_model=models.ReceiveSignalResponse)
    async def receive_signal(body: models.ReceiveSignalBody, job: AuthenticatedJob, manager: Manager) -> models.ReceiveSignalResponse:
        return models.ReceiveSignalResponse(signal=manager.receive_signal(job.id, body.token, body.name))

    @router.post("/locks", response_model=models.LockResponse)
    async def acquire_lock(body: models.LockBody, job: AuthenticatedJob, manager: Manager) -> models.LockResponse:
        await manager.acquire_lock(job.id, body.token)
        return models.LockResponse(lock=body.token, held=True)

    @router.delete("/locks/{lock}", response_model=models.LockResponse)
    async def release_lock(lock: str, job: AuthenticatedJob, manager: Manager) -> models.LockResponse:
        released = await manager.release_lock(job.id, lock)
        return models.LockResponse(lock=lock, held=False, released=released)

    @router.post("/exit", status_code=200)
    async def report_exit(body: models.ExitRequest, job: AuthenticatedJob, manager: Manager) -> dict:
        await manager.report_exit(job.id, body.exit_code, body.output)
        return {"ok": True}

    return router


def create_app(manager_factory, api_token: str | None) -> FastAPI:
    """Build the application; `manager_factory` is an async context manager yielding the JobManager."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with manager_factory() as manager:
            app.state.manager = manager
            yield

    # No /docs or /redoc pages: they load their scripts from a CDN, which a
    # machine without internet access cannot reach. /openapi.json is served.
    app = FastAPI(
        title="Checker",
        version=checker.__version__,
        lifespan=lifespan,
        description="Durable execution by memory checkpointing.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.api_token = api_token
    install_error_handlers(app)
    app.include_router(build_caller_router())
    app.include_router(build_runtime_router())

    @app.get("/v1/health", tags=["caller"])
    async def health(request: Request) -> dict:
        manager: JobManager = request.app.state.manager
        return {"status": "ok", "version": checker.__version__, "criu_version": manager.context.criu_version, "jobs_supervised": len(manager.runners)}

    return app
