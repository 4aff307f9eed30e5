"""Shared helpers for the black-box tests.

`ServerProcess` starts the real server (`server.py`) as a subprocess in its
own process group, on a port the kernel picks (`--port 0`), with a data
directory of the test's own.  It learns the port from the server's
"Server listening on HOST:PORT" log line, keeps every line of output, and
lets a test send HTTP requests, raw bytes, and signals.

Every wait here polls with a deadline; nothing sleeps blindly.
"""
import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "server.py")

# Generous: the suite must pass on a busy shared machine.  These bound how
# long a broken server can hang a test, they are not speed goals.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0

LISTENING = re.compile(r"Server listening on (\S+):(\d+)")
# Every log line starts with an RFC 3339 UTC timestamp (--log-format text).
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
LOG_LINE = re.compile(r"(%s) (.*)" % TIMESTAMP)

# The servers started here must get SIGHUP as under a terminal, even when
# this runner was started with it ignored (under nohup, or by a service
# that ignores it): a child inherits an ignored signal, and the server
# rightly keeps it ignored then, so the SIGHUP tests would fail.  The test
# that wants it ignored starts the server under nohup itself.
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class ServerProcess:
    """One run of the server.  Use as a context manager, or call start()/stop()."""

    def __init__(self, data_dir, *args, env=None, port=0, host="127.0.0.1", prefix=(),
                 python=None, preexec_fn=None, server=SERVER, cwd=ROOT):
        """`prefix`: a command that runs the server (prlimit, setpriv); `python`: the
        interpreter; `server`: the script it runs (a copy of server.py: see
        copy_of_server), in `cwd`."""
        self.data_dir = data_dir
        self.prefix, self.python, self.preexec_fn = list(prefix), python, preexec_fn
        self.server, self.cwd = server, cwd
        self.args = list(args)
        self.env = env
        self.host = host
        self.requested_port = port
        self.port = None
        self.proc = None
        self._lines = []
        self._changed = threading.Condition()
        self._reader = None

    # -- lifecycle ---------------------------------------------------------

    def command(self):
        return self.prefix + [self.python or sys.executable, self.server, "--host", self.host,
                "--port", str(self.requested_port),
                "--working-dir", self.data_dir] + self.args

    def start(self, wait=True):
        env = dict(os.environ)
        env.update(self.env or {})
        self.proc = subprocess.Popen(
            self.command(), cwd=self.cwd, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=self.preexec_fn)
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        if wait:
            match = self.wait_for_line(LISTENING, START_TIMEOUT)
            self.port = int(match.group(2))
        return self

    def _read_output(self):
        for raw in self.proc.stdout:
            with self._changed:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._lines.append(None)          # end of output
            self._changed.notify_all()

    def wait_for_line(self, pattern, timeout=START_TIMEOUT):
        """Wait until a line of output matches `pattern`; return the match."""
        if isinstance(pattern, str):
            pattern = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = 0
            while True:
                for line in self._lines[seen:]:
                    if line is None:
                        raise AssertionError("server exited (code %s) before printing %r; "
                                             "output:\n%s" % (self.proc.poll(), pattern.pattern,
                                                              self.output()))
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for %r; output:\n%s"
                                         % (pattern.pattern, self.output()))
                self._changed.wait(left)

    def output(self):
        return "\n".join(l for l in list(self._lines) if l is not None)

    def signal(self, signum):
        os.killpg(self.proc.pid, signum)

    def wait(self, timeout=STOP_TIMEOUT):
        """Wait for the process to exit and for its output to be read; return its exit code."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self, signum=None, timeout=STOP_TIMEOUT):
        """Signal the process group (default SIGTERM) and wait; return the exit code."""
        signum = signal.SIGTERM if signum is None else signum
        if self.proc.poll() is None:
            self.signal(signum)
        return self.wait(timeout)

    def kill(self):
        """SIGKILL the whole process group, as a crash would."""
        return self.stop(signal.SIGKILL)

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(STOP_TIMEOUT)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()

    # -- talking HTTP --------------------------------------------------------

    def connection(self, timeout=30):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=30):
        """One request on a new connection: returns (status, headers, body)."""
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()

    def put(self, key, value):
        status, _, body = self.request("PUT", "/kv/" + key, value)
        if status != 200:
            raise AssertionError("PUT %s: %d %r" % (key, status, body))

    def get(self, key):
        """The value of `key`, or None if the server answers 404."""
        status, _, body = self.request("GET", "/kv/" + key)
        if status == 404:
            return None
        if status != 200:
            raise AssertionError("GET %s: %d %r" % (key, status, body))
        return body

    def raw(self, data, timeout=10, shut_write=False):
        """Send raw bytes on a new socket; return everything read until the server closes or goes quiet."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(data)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
            return read_until_quiet(sock, timeout)


def read_until_quiet(sock, timeout=10, quiet=0.5):
    """Read until the peer closes, or no byte arrives for `quiet` seconds after some did."""
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(quiet if chunks else max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            if chunks:
                break
            continue
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def error_lines(output):
    """The lines of `output` that report a failure ("<timestamp> error: ..."), each without its timestamp."""
    messages = [LOG_LINE.fullmatch(line) for line in output.splitlines()]
    return [m.group(2) for m in messages if m and m.group(2).startswith("error: ")]


def wait_until(predicate, timeout=30.0, interval=0.01, message="condition"):
    """Poll `predicate` until it returns a true value; return it, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + message)
        time.sleep(interval)


def metric(server, name, *more):
    """The value of metric `name` (None if absent); with `more` names, a tuple of
    the values, all from the same GET /metrics (one instant of the server)."""
    status, _, body = server.request("GET", "/metrics")
    values = []
    for one in (name,) + more:
        found = re.search(rb"^%s (\S+)$" % one.encode(), body, re.M)
        values.append(float(found.group(1)) if found else None)
    return tuple(values) if more else values[0]


def temp_file(test, name, content):
    """Write `content` (bytes) to a file `name` in a new directory, removed after the test; its path."""
    directory = tempfile.mkdtemp(prefix="kvtest-")
    test.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def copy_of_server(test):
    """A copy of the server's code in a new directory that any user may read; its path.

    For a test that runs the server as another user (nobody): the checkout
    itself may sit where that user cannot go (a clone in root's 0700 home).
    The copy holds the project's top-level modules and packages, not its tests,
    benchmark or data; it is removed after the test.
    """
    directory = tempfile.mkdtemp(prefix="kvtest-code-")
    test.addCleanup(shutil.rmtree, directory, True)
    for name in os.listdir(ROOT):
        path = os.path.join(ROOT, name)
        if name.endswith(".py") and os.path.isfile(path):
            shutil.copy(path, directory)
        elif (name not in ("tests", "bench") and not name.startswith(".")
              and os.path.isfile(os.path.join(path, "__init__.py"))):
            shutil.copytree(path, os.path.join(directory, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
    for parent, directories, files in os.walk(directory):
        os.chmod(parent, 0o755)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o644)
    return directory


def free_port():
    """A port that was free a moment ago (for tests that must name a port).

    It is taken below the kernel's ephemeral range: there, between this check
    and the server's bind, no client's connect() and no other server's bind to
    port 0 (the suite runs several at once, and bursts of 10,000 connections)
    can take it.  Random, so that parallel workers do not pick the same one.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    for _ in range(100):
        if ephemeral <= 2048:
            break
        port = random.randrange(max(1024, ephemeral - 20000), ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerTestCase(unittest.TestCase):
    """A test case with a fresh temporary data directory in self.data_dir."""

    def setUp(self):
        self.data_dir = tempfile.mkdtemp(prefix="kvtest-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self._servers = []

    def start_server(self, *args, **kwargs):
        """Start a server on self.data_dir; it is killed at the end of the test if still running."""
        server = ServerProcess(kwargs.pop("data_dir", self.data_dir), *args, **kwargs)
        self.addCleanup(server.__exit__, None, None, None)
        return server.start()

    def restart(self, server, *args):
        """Start a new server process on the same data directory (after the old one exited)."""
        return self.start_server(*(args or server.args), data_dir=server.data_dir)
