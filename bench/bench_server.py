"""Run a Checker server for the benchmark, with a choice the CLI does not offer.

`checker server` has no option to turn off the fsync of checkpoint images
(Settings.fsync_checkpoints), so the benchmark starts its servers through this
script: the same Server class and settings, plus `--no-fsync`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from checker.config import Settings
from checker.server.serve import run_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--state-dir", type=Path, required=True, help="state directory of this server")
    parser.add_argument("--criu", required=True, help="path of the CRIU binary")
    parser.add_argument("--no-fsync", action="store_true", help="acknowledge checkpoints without flushing images to disk")
    arguments = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = Settings(
        state_dir=arguments.state_dir,
        host="127.0.0.1",
        port=arguments.port,
        criu_path=arguments.criu,
        fsync_checkpoints=not arguments.no_fsync,
    )
    run_server(settings)


if __name__ == "__main__":
    main()
