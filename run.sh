#!/bin/sh
# Start the key-value server.  exec, so that this process *is* the server:
# the harnesses signal run.sh's PID and process group.  No cd: a relative
# --working-dir is relative to the caller's directory.
exec python3 "$(dirname "$0")/server.py" "$@"
