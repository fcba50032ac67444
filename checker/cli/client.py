"""HTTP client of the caller API, used by the CLI, the demo and the tests."""

from __future__ import annotations

import os
from typing import Any

import httpx

DEFAULT_SERVER_URL = "http://127.0.0.1:8181"


class APIError(Exception):
    """The server rejected a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def server_url_from_environment() -> str:
    return os.environ.get("CHECKER_SERVER_URL", DEFAULT_SERVER_URL)


class CallerClient:
    """Thin wrapper of the /v1 caller API that raises APIError with the server's message."""

    def __init__(self, base_url: str, api_token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "CallerClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def request(self, method: str, path: str, *, expected: tuple[int, ...] = (200, 201, 202, 204), timeout: float | None = None, **kwargs: Any) -> httpx.Response:
        try:
            extra = {"timeout": timeout} if timeout is not None else {}
            response = self._http.request(method, path, **kwargs, **extra)
        except httpx.TransportError as error:
            raise APIError(f"cannot reach the Checker server at {self.base_url}: {error}; start it with 'checker server'") from error
        if response.status_code not in expected:
            try:
                body = response.json()
                detail, code = body.get("detail", response.text), body.get("error")
            except ValueError:
                detail, code = response.text, None
            raise APIError(f"{method} {path} failed with {response.status_code}: {detail}", response.status_code, code)
        return response

    def is_up(self) -> bool:
        try:
            return self._http.get("/v1/health", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict:
        return self.request("GET", "/v1/health").json()

    def create_definition(
        self,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        metadata: dict | None = None,
        retry_policy: dict | None = None,
        execution_timeout_seconds: float | None = None,
        runtime: dict | None = None,
        limits: dict | None = None,
    ) -> dict:
        """Create the next version of a definition; `runtime` adds to or replaces the runtime's fields ({"type": "process"} by default)."""
        runtime_body = {"type": "process", "command": command, "env": env or {}, **(runtime or {})}
        body: dict[str, Any] = {"name": name, "runtime": runtime_body, "metadata": metadata or {}}
        if limits is not None:
            body["limits"] = limits
        if retry_policy is not None:
            body["retry_policy"] = retry_policy
        if execution_timeout_seconds is not None:
            body["execution_timeout_seconds"] = execution_timeout_seconds
        return self.request("POST", "/v1/job-definitions", json=body).json()

    def list_definitions(self, name: str | None = None) -> list[dict]:
        params = {"name": name} if name else {}
        return self.request("GET", "/v1/job-definitions", params=params).json()["items"]

    def spawn(
        self,
        definition: str,
        params: dict | None = None,
        env: dict | None = None,
        version: int | None = None,
        idempotency_key: str | None = None,
        metadata: dict | None = None,
        limits: dict | None = None,
    ) -> dict:
        body: dict[str, Any] = {"definition": definition, "params": params or {}, "env": env or {}, "metadata": metadata or {}}
        if limits is not None:
            body["limits"] = limits
        if version is not None:
            body["version"] = version
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return self.request("POST", "/v1/jobs", json=body).json()

    def get_job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def list_jobs(
        self,
        states: list[str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
        definition: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if states:
            params["state"] = states
        if definition:
            params["definition"] = definition
        if metadata:
            params["metadata"] = [f"{key}={value}" for key, value in metadata.items()]
        if cursor:
            params["cursor"] = cursor
        return self.request("GET", "/v1/jobs", params=params).json()

    def kill(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/kill").json()

    def result(self, job_id: str, wait: float = 0) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}/result", params={"wait": wait}, timeout=wait + 30).json()

    def logs(self, job_id: str, stream: str = "stdout", offset: int = 0, limit: int = 65536) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}/logs", params={"stream": stream, "offset": offset, "limit": limit}).json()

    def checkpoints(self, job_id: str) -> list[dict]:
        return self.request("GET", f"/v1/jobs/{job_id}/checkpoints").json()["items"]

    def checkpoint_details(self, job_id: str, number: int, verify: bool = False) -> dict:
        params = {"verify": "true"} if verify else {}
        return self.request("GET", f"/v1/jobs/{job_id}/checkpoints/{number}", params=params, timeout=3600).json()

    def checkpoint(self, job_id: str, suspend: bool = False) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/checkpoint", json={"suspend": suspend}, timeout=3600).json()

    def fork(self, job_id: str, checkpoint: int | None = None, limits: dict | None = None) -> dict:
        body: dict[str, Any] = {"checkpoint": checkpoint}
        if limits is not None:
            body["limits"] = limits
        return self.request("POST", f"/v1/jobs/{job_id}/fork", json=body, timeout=3600).json()

    def resume(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/resume").json()

    def send_signal(self, job_id: str, name: str, payload: Any = None) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/signals", json={"name": name, "payload": payload}).json()

    def signals(self, job_id: str) -> list[dict]:
        return self.request("GET", f"/v1/jobs/{job_id}/signals").json()["items"]

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        return self.request("GET", f"/v1/jobs/{job_id}/events", params={"after": after}).json()["items"]
