#!/bin/sh
# CRIU's action script: CRIU runs it by path, without a shell, so this file
# starts worksnapshot.py with the server's Python (CHECKER_PYTHON).
exec "$CHECKER_PYTHON" -I -S "$(dirname "$0")/worksnapshot.py"
