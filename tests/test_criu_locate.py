"""Finding CRIU: the setting, the project prefix, PATH, and versions older than 4.2."""

from __future__ import annotations

from pathlib import Path

import pytest

from checker.runtimes.criu import CriuNotFoundError, find_criu, first_error_lines, parse_version


def fake_criu(directory: Path, version: str) -> Path:
    path = directory / "criu"
    path.write_text(f"#!/bin/sh\necho 'Version: {version}'\n")
    path.chmod(0o755)
    return path


def test_parse_version_reads_criu_output() -> None:
    assert parse_version("Version: 4.2.1\nGitID: v4.2.1\n") == (4, 2, 1)
    assert parse_version("Version: 3.17\n") == (3, 17)
    assert parse_version("nothing here") is None


def test_setting_wins_over_prefix(tmp_path: Path, monkeypatch) -> None:
    configured = fake_criu(tmp_path, "4.3")
    monkeypatch.setenv("CHECKER_CRIU", str(configured))
    assert find_criu().path == configured


def test_old_criu_in_setting_is_rejected(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CHECKER_CRIU", str(fake_criu(tmp_path, "3.17")))
    with pytest.raises(CriuNotFoundError, match="older than 4.2"):
        find_criu()


def test_option_is_named_in_error(tmp_path: Path) -> None:
    with pytest.raises(CriuNotFoundError, match="setting --criu does not exist"):
        find_criu(str(tmp_path / "nope"))


def test_directory_is_not_criu(tmp_path: Path) -> None:
    with pytest.raises(CriuNotFoundError, match="is not an executable file"):
        find_criu(str(tmp_path))


def test_missing_setting_path_is_rejected(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CHECKER_CRIU", str(tmp_path / "nope"))
    with pytest.raises(CriuNotFoundError, match="does not exist"):
        find_criu()


def test_old_criu_on_path_is_skipped(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_criu(bin_dir, "3.17")
    monkeypatch.delenv("CHECKER_CRIU", raising=False)
    monkeypatch.setenv("CHECKER_PREFIX", str(tmp_path / "empty-prefix"))
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(CriuNotFoundError, match="install-criu.sh"):
        find_criu()


def test_first_error_lines_skip_rlimit_noise(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(
        "(00.001) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
        "(00.010) Warn  (criu/files.c:10): something\n"
        "(00.020) Error (criu/files-reg.c:2193): File work/out.csv has bad size 10 (expect 5)\n"
    )
    assert first_error_lines(log) == ["Error (criu/files-reg.c:2193): File work/out.csv has bad size 10 (expect 5)"]
