#!/bin/sh
# Start the key-value server.  exec, so that this process *is* the server:
# the harnesses signal run.sh's PID and process group.  No cd: a relative
# --working-dir is relative to the caller's directory.  PYTHON names
# another interpreter (as `make test PYTHON=...` does), for a host whose
# python3 is older than 3.10.
exec "${PYTHON:-python3}" "$(dirname "$0")/server.py" "$@"
