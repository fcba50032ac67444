#!/usr/bin/env bash
# Run the demo: installs CRIU and the Python dependencies first when missing.
# Extra arguments go to the demo, e.g. scripts/demo.sh --size-mb 100
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-criu.sh
scripts/install-bubblewrap.sh
scripts/setup-venv.sh
exec .venv/bin/python -m demo "$@"
