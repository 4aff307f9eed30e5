# The server in a container: what `clstr test` builds from the project root
# and runs with DATA_DIR=/app/data on port 8080.
#
#   docker build -t kvstore .
#   docker run -d --name kv -p 8080:8080 -v kvdata:/app/data kvstore
#
# A TOKEN: the container runs as UID 10001, which must be able to read the
# file; mode 0400, or the server warns that others can read it:
#   sudo chown 10001 /etc/kvstore/token && sudo chmod 400 /etc/kvstore/token
#   docker run -d --name kv -p 8080:8080 -v kvdata:/app/data \
#     -v /etc/kvstore/token:/run/secrets/kvstore-token:ro \
#     -e KV_AUTH_TOKEN_FILE=/run/secrets/kvstore-token kvstore
# `docker kill -s HUP kv` makes the server read it again after a rotation.
#
# STOPPING: `docker stop` sends SIGTERM and, 10 s later by default, SIGKILL.
# The server drains for up to --shutdown-timeout (5 s here, not the 15 s
# default) and then writes its snapshot, which must fit in what is left:
# about 1 s per million small keys.  For a larger store, or a longer drain,
# raise Docker's timeout to match (`docker stop -t 30`, `docker run
# --stop-timeout 30`, compose `stop_grace_period: 30s`, Kubernetes
# `terminationGracePeriodSeconds`).  Even a SIGKILL loses no acknowledged
# write: the journal has it, and the next start replays it.
FROM python:3.13-slim

# No .pyc files: the code is not the server's to write.
ENV PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/app/data \
    PORT=8080

# A user of its own (a fixed, numeric ID, so that `runAsNonRoot` can check
# it) that owns the data directory and nothing else.  A named volume mounted
# there starts with this owner; a bind mount must be writable by UID 10001.
RUN groupadd --system --gid 10001 kvstore \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin kvstore \
 && mkdir -p /app/data \
 && chown 10001:10001 /app/data \
 && chmod 0700 /app/data

WORKDIR /app
COPY server.py http11.py store.py persistence.py deploy/healthcheck.py ./

USER 10001:10001
VOLUME ["/app/data"]
EXPOSE 8080
STOPSIGNAL SIGTERM

# No curl in the slim image: healthcheck.py asks /health itself (any error
# or a status other than 2xx exits 1), on the port the server (PID 1) was
# given, as a flag or as PORT.  --start-period covers loading a large
# snapshot.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "healthcheck.py"]

# Exec form: the server is PID 1 and gets the SIGTERM itself.
CMD ["python", "server.py", "--shutdown-timeout", "5"]
