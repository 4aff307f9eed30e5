"""Helpers shared by test_lifecycle.py, test_persistence.py and test_crash.py.

(Kept out of support.py, which belongs to the HTTP tests.)  Everything here
waits with a deadline; nothing sleeps blindly.

- `run_cli()`      run server.py to completion (bad usage, refusals to start),
                   stdout and stderr kept apart.
- `BareServer`     a ServerProcess with exactly the given argv, environment
                   and cwd (for env fallbacks, `--port=N`, run.sh).
- `get_many()`     GET many keys over a few keep-alive connections, pipelined.
- `FaultyFsyncServer` the server with os.fsync under the test's control:
                   held while HOLD_FSYNC exists in the data directory,
                   failing (EIO) while FAIL_FSYNC does.
- raw-socket helpers for requests held half-way: `start_put()` sends the
                   headers of a PUT with `Expect: 100-continue` and returns
                   once the server has answered 100, i.e. once the server is
                   certainly inside that request, reading its body.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

from tests import support
from tests.test_http_protocol import read_response as read_raw_response

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)
import persistence                                   # noqa: E402

ENV_VARS = ("HOST", "PORT", "DATA_DIR")
JOURNAL_NAME = re.compile(r"journal-(\d+)\.log\Z")
TRACEBACK = "Traceback"


def clean_env(extra=None):
    """os.environ without HOST/PORT/DATA_DIR (so the caller's shell cannot leak in), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(extra or {})
    return env


class Completed:
    """The outcome of run_cli(): code, stdout, stderr (text), seconds."""

    def __init__(self, code, stdout, stderr, seconds):
        self.code, self.stdout, self.stderr, self.seconds = code, stdout, stderr, seconds

    def lines(self, stream):
        return [l for l in getattr(self, stream).splitlines() if l.strip()]

    def __repr__(self):
        return "exit %s after %.2f s\n--- stdout:\n%s--- stderr:\n%s" % (
            self.code, self.seconds, self.stdout, self.stderr)


def run_cli(args, env=None, cwd=None, timeout=20.0):
    """Run `python3 server.py ARGS` until it exits (at most `timeout` s, then SIGKILL and fail)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, support.SERVER] + list(args),
                            cwd=cwd or support.ROOT, env=clean_env(env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError("server.py %s did not exit within %.0f s; output:\n%s%s"
                             % (" ".join(args), timeout, out.decode("utf-8", "replace"),
                                err.decode("utf-8", "replace")))
    return Completed(proc.returncode, out.decode("utf-8", "replace"),
                     err.decode("utf-8", "replace"), time.monotonic() - started)


class BareServer(support.ServerProcess):
    """The server started with exactly `args` (no --host/--port/--working-dir added).

    `executable` replaces `python3 server.py` (e.g. run.sh); `cwd` is the
    process's working directory; the environment is clean_env(env).
    """

    def __init__(self, *args, env=None, cwd=None, executable=None):
        super().__init__(None, *args, env=env)
        self.cwd = cwd or support.ROOT
        self.executable = executable
        self.listening = None

    def command(self):
        if self.executable:
            return [self.executable] + self.args
        return [sys.executable, support.SERVER] + self.args

    def start(self, wait=True):
        self.proc = subprocess.Popen(
            self.command(), cwd=self.cwd, env=clean_env(self.env),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        if wait:
            self.listening = self.wait_for_line(support.LISTENING, support.START_TIMEOUT)
            self.port = int(self.listening.group(2))
        return self


# server.py run with os.fsync under the test's control, through two files in
# its data directory: while HOLD_FSYNC exists, fsync waits; then, while
# FAIL_FSYNC exists, it fails with EIO (if FAIL_FSYNC says "once", only the
# first time: the wrapper removes it).  The journal's writer process, which
# makes the journal's fsyncs, runs under the same wrapper
# (persistence.Journal.WRITER_COMMAND).  Nothing else is changed.
FAULTY_FSYNC_PATCH = r"""
import errno, os, runpy, sys, time
def patch_fsync(directory):
    hold, fail = os.path.join(directory, "HOLD_FSYNC"), os.path.join(directory, "FAIL_FSYNC")
    real_fsync = os.fsync
    def fsync(fd):
        while os.path.exists(hold):         # a poll: held until the test lets go
            time.sleep(0.01)
        try:
            with open(fail) as f:
                once = f.read() == "once"
        except FileNotFoundError:
            return real_fsync(fd)
        if once:
            try:
                os.unlink(fail)
            except FileNotFoundError:
                return real_fsync(fd)           # the other process failed it just now
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    os.fsync = fsync
"""

FAULTY_FSYNC_WRITER = FAULTY_FSYNC_PATCH + r"""
patch_fsync(sys.argv[3])                # journal-writer FD DIRECTORY POLICY
sys.argv[0] = %r
runpy.run_path(sys.argv[0], run_name="__main__")
""" % os.path.join(support.ROOT, "persistence.py")

FAULTY_FSYNC = FAULTY_FSYNC_PATCH + r"""
patch_fsync(sys.argv[sys.argv.index("--working-dir") + 1])
sys.path.insert(0, %r)
import persistence
persistence.Journal.WRITER_COMMAND = [sys.executable, "-c", %r, "journal-writer"]
sys.argv[0] = %r
runpy.run_path(sys.argv[0], run_name="__main__")
""" % (support.ROOT, FAULTY_FSYNC_WRITER, support.SERVER)


class FaultyFsyncServer(support.ServerProcess):
    """The server with os.fsync held or failing on the test's word (FAULTY_FSYNC)."""

    def command(self):
        return [sys.executable, "-c", FAULTY_FSYNC] + super().command()[2:]

    def hold_fsync(self):
        open(os.path.join(self.data_dir, "HOLD_FSYNC"), "w").close()

    def release_fsync(self):
        os.unlink(os.path.join(self.data_dir, "HOLD_FSYNC"))

    def fail_fsync(self, how="always"):
        with open(os.path.join(self.data_dir, "FAIL_FSYNC"), "w") as f:
            f.write(how)

    def heal_fsync(self):
        try:
            os.unlink(os.path.join(self.data_dir, "FAIL_FSYNC"))
        except FileNotFoundError:
            pass


def stop_within(server, signum=signal.SIGTERM, timeout=20.0):
    """Signal the server's process group; return (exit code, seconds to exit).

    Fails (with the server's output) instead of raising TimeoutExpired if it
    does not exit within `timeout`.
    """
    started = time.monotonic()
    if server.proc.poll() is None:
        server.signal(signum)
    try:
        code = server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        tail = "\n".join(server.output().splitlines()[-40:])
        raise AssertionError("server did not exit within %.0f s of %s; last lines of output:\n%s"
                             % (timeout, signal.Signals(signum).name, tail)) from None
    elapsed = time.monotonic() - started
    server._reader.join(10)
    return code, elapsed


def get_many(server, keys, connections=4, timeout=30, batch=100):
    """{key: value or None (404)} for every key, over a few keep-alive connections.

    Each connection sends its GETs `batch` at a time, pipelined, then reads
    their responses in order: 10,000 keys cost 0.3 s of CPU (client and
    server), where a request and a response object of http.client for each
    cost 1.8 s.
    """
    keys = list(keys)
    result, errors = {}, []

    def work(part):
        try:
            with socket.create_connection((server.host, server.port), timeout=timeout) as sock, \
                    sock.makefile("rb") as rfile:
                for start in range(0, len(part), batch):
                    chunk = part[start:start + batch]
                    sock.sendall(b"".join(b"GET /kv/%s HTTP/1.1\r\nHost: kvtest\r\n\r\n"
                                          % key.encode() for key in chunk))
                    for key in chunk:
                        response = read_raw_response(rfile)
                        if response.status == 404:
                            result[key] = None
                        elif response.status == 200:
                            result[key] = response.body
                        else:
                            errors.append("GET %s: %d %r" % (key, response.status,
                                                             response.body))
                            return
        except (OSError, AssertionError) as e:
            errors.append("GET: %r" % e)

    threads = [threading.Thread(target=work, args=(keys[i::connections],))
               for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 4)
    if errors:
        raise AssertionError("; ".join(errors[:5]))
    return result


def assert_state(testcase, server, expected, msg=""):
    """Every key of `expected` has its value (None = absent), compared in one assertion."""
    actual = get_many(server, expected)
    wrong = {k: (actual.get(k), v) for k, v in expected.items() if actual.get(k) != v}
    if wrong:
        sample = dict(list(wrong.items())[:5])
        testcase.fail("%s%d of %d keys wrong, e.g. {key: (actual, expected)} %r"
                      % (msg + ": " if msg else "", len(wrong), len(expected), sample))


# -- raw sockets ---------------------------------------------------------------

def recv_until(sock, marker, timeout=10.0):
    """Read until `marker` is in the bytes read; return them.  Fails on EOF or timeout."""
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out waiting for %r; got %r" % (marker, buf))
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise AssertionError("connection closed while waiting for %r; got %r" % (marker, buf))
        buf += data
    return buf


def read_response(sock, timeout=10.0):
    """Read one response (framed by Content-Length): (status, {lower-case name: value}, body)."""
    buf = recv_until(sock, b"\r\n\r\n", timeout)
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    deadline = time.monotonic() + timeout
    while len(body) < length:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            break
        body += data
    return status, headers, body


def wait_closed(sock, timeout=10.0):
    """True once the peer closes the connection (EOF or reset), False after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True


def idle_connection(server):
    """A connection that has had one complete request (GET /health) and is now idle."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
    status, headers, body = read_response(sock)
    if status != 200 or headers.get("connection", "").lower() == "close":
        raise AssertionError("GET /health on a keep-alive connection: %d %r" % (status, headers))
    return sock


def start_put(server, key, total_length, first_part):
    """Send PUT headers (Content-Length, Expect: 100-continue) and `first_part` of the body.

    Returns the socket once the server has sent `100 Continue`: from then on
    the server is inside this request, waiting for the rest of the body.
    """
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(("PUT /kv/%s HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n"
                  "Expect: 100-continue\r\n\r\n" % (key, total_length)).encode())
    interim = recv_until(sock, b"\r\n\r\n")
    if not interim.startswith(b"HTTP/1.1 100"):
        raise AssertionError("expected 100 Continue, got %r" % interim)
    if first_part:
        sock.sendall(first_part)
    return sock


# -- files ---------------------------------------------------------------------

def journals(directory):
    """Paths of the journal files in `directory`, oldest generation first."""
    found = []
    for name in os.listdir(directory):
        m = JOURNAL_NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return [path for _, path in sorted(found)]


def file_state(path):
    """(bytes, mtime_ns) of a file: equal before and after means untouched."""
    with open(path, "rb") as f:
        data = f.read()
    return data, os.stat(path).st_mtime_ns


def record_offsets(buf):
    """Start offsets of the journal records in `buf` (12-byte header, length u32 first).

    In a journal with rounds (its header first), only the records of
    mutations: each round's marker is left out (round_offset() finds it).
    """
    offsets, offset = [], 0
    if buf.startswith(persistence.JOURNAL_MAGIC):
        offset = len(persistence.JOURNAL_MAGIC)
    while offset + 12 <= len(buf):
        if buf[offset + 12] != persistence.ROUND:
            offsets.append(offset)
        offset += 12 + int.from_bytes(buf[offset:offset + 4], "little")
    return offsets


def round_offset(buf, record):
    """The offset of the marker of the round that holds the record at offset `record`."""
    offset, start = len(persistence.JOURNAL_MAGIC), None
    while offset <= record:
        if buf[offset + 12] == persistence.ROUND:
            start = offset
        offset += 12 + int.from_bytes(buf[offset:offset + 4], "little")
    return start


# The journal's writer is a process of its own: a test that wants its fsync
# held, slowed or failing, or its writes failing, starts it through this
# wrapper (WriterFaults), which patches os.fsync, os.writev and os.write in
# the writer only, as files in DIRECTORY.faults say, and logs each fsync.
WRITER_FAULTS = r"""
import os, runpy, sys, time
control = sys.argv[3] + ".faults"           # journal-writer FD DIRECTORY POLICY PARENT
real_fsync, real_writev, real_write = os.fsync, os.writev, os.write

def read(name):
    try:
        with open(os.path.join(control, name)) as f:
            return f.read()
    except FileNotFoundError:
        return None

def log(name, line):
    with open(os.path.join(control, name), "a") as f:
        f.write(line + "\n")

def error(name):
    number = read(name)
    return None if number is None else OSError(int(number), os.strerror(int(number)))

def fsync(fd):
    log("fsync-started", "")
    number = len(read("fsync-started").splitlines())
    while os.path.exists(os.path.join(control, "hold")):    # a poll: until the test lets go
        time.sleep(0.005)
    time.sleep(float(read("fsync-delay") or 0))             # a slow disk, on purpose
    failure = error("fsync-error")
    if failure is not None:
        raise failure
    real_fsync(fd)
    log("fsync-finished", str(number))

def writev(fd, buffers):
    failure = error("write-error")
    if failure is not None:
        raise failure
    return real_writev(fd, buffers)

def write(fd, data):
    failure = error("write-error")
    if failure is not None:
        real_write(fd, bytes(data[:7]))     # part of it, then the disk is full
        raise failure
    return real_write(fd, data)

os.fsync, os.writev, os.write = fsync, writev, write
sys.argv[0] = %r
runpy.run_path(sys.argv[0], run_name="__main__")
""" % os.path.join(support.ROOT, "persistence.py")


class WriterFaults:
    """The journals a test opens (in `directory`) get a writer whose disk does as the test says.

    hold() makes every fsync wait until release(); fail_fsync(errno) and
    fail_writes(errno) make them fail until heal(); slow(seconds) delays
    each fsync.  started() counts the fsyncs begun, finished() lists the
    numbers of those that succeeded.
    """

    def __init__(self, testcase, directory):
        self.control = directory + ".faults"
        os.makedirs(self.control, exist_ok=True)
        testcase.addCleanup(shutil.rmtree, self.control, True)
        testcase.addCleanup(self.release)
        command = [sys.executable, "-c", WRITER_FAULTS, "journal-writer"]
        patcher = mock.patch.object(persistence.Journal, "WRITER_COMMAND", command)
        patcher.start()
        testcase.addCleanup(patcher.stop)

    def _set(self, name, text):
        with open(os.path.join(self.control, name), "w") as f:
            f.write(text)

    def _unset(self, name):
        try:
            os.unlink(os.path.join(self.control, name))
        except FileNotFoundError:
            pass

    def hold(self):
        self._set("hold", "")

    def release(self):
        self._unset("hold")

    def slow(self, seconds):
        self._set("fsync-delay", repr(seconds))

    def fail_fsync(self, number):
        self._set("fsync-error", str(number))

    def fail_writes(self, number):
        self._set("write-error", str(number))

    def heal(self):
        self._unset("fsync-error")
        self._unset("write-error")

    def _lines(self, name):
        try:
            with open(os.path.join(self.control, name)) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def started(self):
        return len(self._lines("fsync-started"))

    def finished(self):
        return [int(line) for line in self._lines("fsync-finished")]


def mount_tmpfs(testcase, size):
    """A new tmpfs of `size` ("8m") as a temporary directory, unmounted after the test.

    Skips the test where it cannot be mounted (not root, no tmpfs): a full
    disk, for real, without filling the machine's own.
    """
    directory = tempfile.mkdtemp(prefix="kvtest-tmpfs-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", directory],
                             capture_output=True)
    if mounted.returncode != 0:
        os.rmdir(directory)
        testcase.skipTest("cannot mount a tmpfs: %s" % mounted.stderr.decode().strip())
    testcase.addCleanup(os.rmdir, directory)
    testcase.addCleanup(subprocess.run, ["umount", "-l", directory])
    return directory
