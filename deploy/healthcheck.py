"""The Docker HEALTHCHECK: GET /health where the server listens, however its port was given.

    python healthcheck.py [PID]      exit 0 if /health answers 2xx, else 1

The server is PID 1 in its container.  Its address comes from its own
command line and environment (/proc/PID/cmdline and environ), read by the
server's own parse_args: `--port 9000`, `--port=9000` and PORT=9000 give
the same answer as they do to the server.  (Reading $PORT alone, a port
given as a flag was probed on 8080, and the container called unhealthy.)
An address that binds every interface is asked on loopback.
"""
import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import server  # noqa: E402  (the image's /app, beside this file)

EVERY_INTERFACE = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def server_address(pid):
    """(host, port) that process `pid`, a server.py, listens on, as its parse_args reads them."""
    with open("/proc/%s/cmdline" % pid, "rb") as f:
        argv = [arg.decode() for arg in f.read().split(b"\0")[:-1]]
    with open("/proc/%s/environ" % pid, "rb") as f:
        environ = dict(item.decode().partition("=")[::2] for item in f.read().split(b"\0") if item)
    script = next(i for i, arg in enumerate(argv) if arg.endswith("server.py"))
    args = server.parse_args(argv[script + 1:], environ)
    return EVERY_INTERFACE.get(args.host, args.host), args.port


def main(argv):
    pid = argv[1] if len(argv) > 1 else 1
    try:
        host, port = server_address(pid)
    except (OSError, StopIteration) as e:
        print("no server.py as process %s: %s" % (pid, e))
        return 1
    url = "http://%s/health" % server.format_address(host, port)
    try:
        urllib.request.urlopen(url, timeout=2)      # a status other than 2xx raises
    except OSError as e:
        print("%s: %s" % (url, e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
