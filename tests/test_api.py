"""The caller and runtime APIs: validation, authentication, pagination, idempotency."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from conftest import spawn_script, wait_for_state

QUICK_JOB = """
    import checker
    checker.exit({"params": checker.params()})
"""

WAITING_JOB = """
    import os, time
    import checker

    gate = checker.params()["gate"]
    checker.checkpoint()
    while not os.path.exists(gate):
        time.sleep(0.02)
    checker.exit({"done": True})
"""


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as session:
        yield session


def assert_rejected(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]


def definition_body(**overrides) -> dict:
    body = {"name": "quick", "runtime": {"type": "process", "command": [sys.executable, "-c", "pass"]}}
    body.update(overrides)
    return body


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"runtime": {"type": "process", "command": ["x"]}}, "name"),
        (definition_body(name="bad name!"), "name"),
        (definition_body(runtime={"type": "process", "command": []}), "runtime.command"),
        (definition_body(runtime={"type": "process", "command": ["ok", ""]}), "runtime.command"),
        (definition_body(runtime={"type": "firecracker", "command": ["x"]}), "runtime.type"),
        (definition_body(runtime={"type": "process", "command": ["x"], "env": {"CHECKER_TOKEN": "x"}}), "reserved"),
        (definition_body(runtime={"type": "process", "command": ["x"], "env": {"1BAD": "x"}}), "1BAD"),
        (definition_body(surprise=True), "surprise"),
    ],
)
def test_definition_rejects_invalid_body(http, body, fragment) -> None:
    assert_rejected(http.post("/v1/job-definitions", json=body), 422, fragment)


def test_definition_rejects_malformed_json(http) -> None:
    response = http.post("/v1/job-definitions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_rejected(response, 422, "JSON")


def test_definition_versions_and_delete(http) -> None:
    first = http.post("/v1/job-definitions", json=definition_body()).json()
    second = http.post("/v1/job-definitions", json=definition_body()).json()
    assert (first["version"], second["version"]) == (1, 2)
    assert http.get("/v1/job-definitions/quick").json()["version"] == 2
    assert http.get("/v1/job-definitions/quick", params={"version": 1}).json()["version"] == 1

    assert http.delete("/v1/job-definitions/quick", params={"version": 2}).status_code == 204
    assert http.get("/v1/job-definitions/quick").json()["version"] == 1
    assert_rejected(http.delete("/v1/job-definitions/quick", params={"version": 2}), 404, "quick")
    assert [d["version"] for d in http.get("/v1/job-definitions").json()["items"]] == [1]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"definition": "missing"}, 404, "missing"),
        ({"definition": "quick", "version": 9}, 404, "version 9"),
        ({"definition": "quick", "version": 0}, 422, "version"),
        ({"definition": "quick", "params": [1, 2]}, 422, "params"),
        ({"definition": "quick", "env": {"CHECKER_JOB_ID": "x"}}, 422, "reserved"),
        ({"definition": "quick", "idempotency_key": ""}, 422, "idempotency_key"),
    ],
)
def test_spawn_rejects_invalid_request(http, body, status, fragment) -> None:
    http.post("/v1/job-definitions", json=definition_body())
    assert_rejected(http.post("/v1/jobs", json=body), status, fragment)


@pytest.mark.parametrize(
    ("path", "params", "status", "fragment"),
    [
        ("/v1/jobs", {"state": "sleeping"}, 422, "sleeping"),
        ("/v1/jobs", {"limit": 0}, 422, "limit"),
        ("/v1/jobs", {"cursor": "garbage"}, 422, "cursor"),
        ("/v1/jobs/nope", {}, 404, "nope"),
        ("/v1/jobs/nope/checkpoints", {}, 404, "nope"),
        ("/v1/jobs/nope/result", {"wait": -1}, 422, "wait"),
        ("/v1/jobs/nope/events", {"after": -1}, 422, "after"),
        ("/v1/jobs/nope/logs", {"offset": -5}, 422, "offset"),
        ("/v1/job-definitions/nope", {}, 404, "nope"),
        ("/v1/job-definitions/nope", {"version": 0}, 422, "version"),
    ],
)
def test_job_queries_reject_invalid_input(http, path, params, status, fragment) -> None:
    assert_rejected(http.get(path, params=params), status, fragment)


def test_kill_of_unknown_job_is_404(http) -> None:
    assert_rejected(http.post("/v1/jobs/nope/kill"), 404, "nope")


def test_logs_reject_unknown_stream(client, http, job_script) -> None:
    job = spawn_script(client, job_script("quick", QUICK_JOB))
    assert_rejected(http.get(f"/v1/jobs/{job['id']}/logs", params={"stream": "stdin"}), 422, "stream")


def test_job_list_pages_with_cursor(client, http, job_script) -> None:
    script = job_script("quick", QUICK_JOB)
    spawned = [spawn_script(client, script, {"n": n})["id"] for n in range(5)]

    seen, cursor = [], None
    for _ in range(10):
        page = client.list_jobs(limit=2, cursor=cursor)
        seen.extend(job["id"] for job in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == spawned

    for job_id in spawned:
        wait_for_state(client, job_id, ("completed",))
    completed = client.list_jobs(states=["completed"])["items"]
    assert sorted(j["id"] for j in completed) == sorted(spawned)
    assert client.list_jobs(states=["running"])["items"] == []


def test_spawn_is_idempotent_by_key(client, http, job_script) -> None:
    script = job_script("quick", QUICK_JOB)
    definition = client.create_definition("quick", [sys.executable, str(script)])

    body = {"definition": definition["name"], "params": {"a": 1}, "idempotency_key": "order-17"}
    first = http.post("/v1/jobs", json=body)
    again = http.post("/v1/jobs", json=body)
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]

    different = http.post("/v1/jobs", json={**body, "params": {"a": 2}})
    assert_rejected(different, 409, "order-17", first.json()["id"])
    assert len(client.list_jobs()["items"]) == 1


def test_result_waits_and_logs_read(client, job_script) -> None:
    source = """
        import checker
        print("hello from the job", flush=True)
        checker.exit({"answer": 42})
    """
    job = spawn_script(client, job_script("hello", source))
    result = client.result(job["id"], wait=30)
    assert result["finished"] is True
    assert result["output"] == {"answer": 42}
    logs = client.logs(job["id"])
    assert logs["data"] == "hello from the job\n"
    assert client.logs(job["id"], offset=logs["next_offset"])["finished"] is True


def test_result_of_unfinished_job_is_202(client, http, job_script, tmp_path: Path) -> None:
    job = spawn_script(client, job_script("waiting", WAITING_JOB), {"gate": str(tmp_path / "gate")})
    response = http.get(f"/v1/jobs/{job['id']}/result", params={"wait": 0.2})
    assert response.status_code == 202
    assert response.json()["finished"] is False


def test_nonzero_exit_fails_job(client, job_script) -> None:
    source = """
        import sys
        print("about to fail", file=sys.stderr, flush=True)
        sys.exit(3)
    """
    job = spawn_script(client, job_script("fails", source))
    final = wait_for_state(client, job["id"], ("failed",))
    assert final["exit_code"] == 3
    assert final["error_code"] == "exit_code"
    assert "about to fail" in client.logs(job["id"], stream="stderr")["data"]


def test_openapi_lists_both_apis(http) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert "/v1/jobs" in paths
    assert "/v1/runtime/jobs/{job_id}/checkpoint" in paths


def test_runtime_api_authenticates_job_token(http, token_jobs) -> None:
    job_a, token_a = token_jobs()
    job_b, _ = token_jobs()

    own = http.get(f"/v1/runtime/jobs/{job_a}/params", headers={"Authorization": f"Bearer {token_a}"})
    assert own.status_code == 200
    assert own.json()["job_id"] == job_a

    assert_rejected(http.get(f"/v1/runtime/jobs/{job_b}/params", headers={"Authorization": f"Bearer {token_a}"}), 403, job_b)
    assert_rejected(http.get(f"/v1/runtime/jobs/{job_a}/params", headers={"Authorization": "Bearer wrong"}), 401, "invalid")
    assert_rejected(http.get(f"/v1/runtime/jobs/{job_a}/params"), 401, "Bearer")


def test_runtime_api_rejects_malformed_bodies(http, token_jobs) -> None:
    job_a, token_a = token_jobs()
    headers = {"Authorization": f"Bearer {token_a}"}

    assert_rejected(http.post(f"/v1/runtime/jobs/{job_a}/checkpoint", json={"token": "short"}, headers=headers), 422, "token")
    assert_rejected(http.post(f"/v1/runtime/jobs/{job_a}/checkpoint", json={"token": "x" * 20 + "!"}, headers=headers), 422, "token")
    assert_rejected(http.post(f"/v1/runtime/jobs/{job_a}/exit", json={"exit_code": 300}, headers=headers), 422, "exit_code")
    assert_rejected(http.post(f"/v1/runtime/jobs/{job_a}/exit", json={"extra": 1}, headers=headers), 422, "extra")


def test_concurrent_checkpoints_share_one_dump(client, job_script, tmp_path: Path) -> None:
    source = """
        import threading
        import checker
        from checker.sdk.client import RuntimeClient

        results = [None] * 4
        start = threading.Barrier(4)

        def call(index):
            start.wait()
            results[index] = checker.checkpoint().number

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        # The same token twice: the second call is answered from the store.
        runtime = RuntimeClient.from_environment()
        first = runtime._call("POST", "checkpoint", {"token": "repeat-token-123"}, timeout=60)
        second = runtime._call("POST", "checkpoint", {"token": "repeat-token-123"}, timeout=60)
        checker.exit({"concurrent": results, "first": first, "second": second})
    """
    job = spawn_script(client, job_script("concurrent", source))
    output = client.result(job["id"], wait=60)["output"]

    assert len(set(output["concurrent"])) < 4
    assert output["first"] == output["second"]
    assert output["first"]["restored"] is False
    final = client.get_job(job["id"])
    assert final["checkpoint_count"] == len(set(output["concurrent"])) + 1


def test_spawn_by_version_suffix(client, http, job_script) -> None:
    script = job_script("quick", QUICK_JOB)
    client.create_definition("quick", [sys.executable, str(script)], metadata={"v": 1})
    client.create_definition("quick", [sys.executable, str(script)], metadata={"v": 2})

    pinned = http.post("/v1/jobs", json={"definition": "quick@1"}).json()
    latest = http.post("/v1/jobs", json={"definition": "quick@latest"}).json()
    assert pinned["version"] == 1
    assert latest["version"] == 2

    assert_rejected(http.post("/v1/jobs", json={"definition": "quick@3"}), 404, "version 3")
    assert_rejected(http.post("/v1/jobs", json={"definition": "quick@1", "version": 2}), 422, "disagree")
    assert_rejected(http.post("/v1/jobs", json={"definition": "quick@0"}), 422, "definition")


def test_list_filters_definition_and_metadata(client, http, job_script) -> None:
    first = client.create_definition("alpha", [sys.executable, str(job_script("alpha", QUICK_JOB))])
    second = client.create_definition("beta", [sys.executable, str(job_script("beta", QUICK_JOB))])
    red = client.spawn(first["name"], metadata={"team": "red", "tier": 1})
    blue = client.spawn(first["name"], metadata={"team": "blue"})
    other = client.spawn(second["name"], metadata={"team": "red"})

    by_definition = [j["id"] for j in client.list_jobs(definition="alpha")["items"]]
    red_jobs = [j["id"] for j in client.list_jobs(metadata={"team": "red"})["items"]]
    red_alpha = [j["id"] for j in client.list_jobs(definition="alpha", metadata={"team": "red", "tier": "1"})["items"]]

    assert by_definition == [red["id"], blue["id"]]
    assert red_jobs == [red["id"], other["id"]]
    assert red_alpha == [red["id"]]
    assert_rejected(http.get("/v1/jobs", params={"metadata": "novalue"}), 422, "KEY=VALUE")
