#!/bin/sh
# CRIU's action script: CRIU runs it by path, without a shell, for every
# action of a dump or restore. Only post-dump needs work, so the other actions
# return here without paying for a Python start; post-dump starts
# worksnapshot.py with the server's Python (CHECKER_PYTHON).
[ "$CRTOOLS_SCRIPT_ACTION" = "post-dump" ] || exit 0
exec "$CHECKER_PYTHON" -I -S "$(dirname "$0")/worksnapshot.py"
