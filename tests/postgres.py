"""A throwaway PostgreSQL server from Debian's packages, for tests of the state store on PostgreSQL.

PostgreSQL refuses to run as root, so the cluster belongs to the `postgres`
user that Debian's package creates. It listens on 127.0.0.1 and a free port,
with its socket and data in a temporary directory, and trusts local
connections; it exists only for the tests.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CLUSTER_USER = "postgres"


def find_bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise RuntimeError("PostgreSQL is not installed; install Debian's 'postgresql' package (scripts/test.sh does)")
    return Path(candidates[-1]).parent


@dataclass
class PostgresCluster:
    bin_dir: Path
    directory: Path
    port: int

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://checker@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://checker@127.0.0.1:{self.port}/{database}"

    def run(self, *command: str) -> None:
        completed = subprocess.run(["runuser", "-u", CLUSTER_USER, "--", *command], capture_output=True, text=True, timeout=120)
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {completed.stderr.strip() or completed.stdout.strip()}")

    def create_database(self, name: str) -> str:
        self.run(str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "checker", name)
        return self.url(name)

    def stop(self) -> None:
        try:
            self.run(str(self.bin_dir / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_cluster(port: int) -> PostgresCluster:
    bin_dir = find_bin_dir()
    directory = Path(tempfile.mkdtemp(prefix="checker-pg-"))
    shutil.chown(directory, CLUSTER_USER)
    cluster = PostgresCluster(bin_dir, directory, port)
    data = directory / "data"
    cluster.run(str(bin_dir / "initdb"), "-D", str(data), "-U", "checker", "-A", "trust", "--no-sync", "-E", "UTF8")
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    cluster.run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(directory / "server.log"), "-w", "start")
    return cluster
