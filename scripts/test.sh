#!/usr/bin/env bash
# Run the test suite: installs CRIU and the Python dependencies first when missing.
# Extra arguments go to pytest, e.g. scripts/test.sh -k recovery
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-criu.sh
scripts/setup-venv.sh
exec .venv/bin/python -m pytest "$@"
