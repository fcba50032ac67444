"""The demo end to end, on a small object: job kill, server kill, exact aggregate."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, free_port


@pytest.mark.parametrize("store", ["local", "s3"])
def test_demo_survives_job_and_server_kill(tmp_path, store: str) -> None:
    command = [
        sys.executable, "-m", "demo", "--size-mb", "30", "--range-mb", "2",
        "--port", str(free_port()), "--state-dir", str(tmp_path / "state"), "--checkpoint-store", store,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    output = completed.stdout

    assert completed.returncode == 0, output + completed.stderr
    assert "SIGKILL job process" in output
    assert "SIGKILL checker server" in output
    assert "restored from checkpoint" in output
    assert "re-adopted" in output
    assert "aggregate equals an uninterrupted parse: yes" in output

    served = re.search(r"served (\d+) range reads, ([\d,]+) bytes, for an object of ([\d,]+) bytes", output)
    assert served is not None, output
    bytes_sent = int(served.group(2).replace(",", ""))
    size = int(served.group(3).replace(",", ""))
    range_bytes = 2 * 1024 * 1024
    assert size <= bytes_sent <= size + range_bytes
    assert re.search(r"ranges fetched more than once: [01] ", output), output
    if store == "s3":
        objects = re.search(r"checkpoint objects in s3://checker-checkpoints/demo: (\d+)", output)
        assert objects is not None and int(objects.group(1)) > 0, output
