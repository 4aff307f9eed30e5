"""Black-box tests of the limits and timeouts: what hostile clients cannot do to the server.

Each test starts the real server with small limits (flags), plays a client
that misbehaves as an attacker would (stalls, floods, hoards memory, uses up
file descriptors or threads) and checks that the server cuts it off at its
limit while another, well-behaved client is still served.  Bounds on time
are generous: they tell "served" from "stuck", they are not speed goals.
"""
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests import support
from tests.test_http_protocol import RawConnection, read_response, request

SERVED_WITHIN = 2.0     # seconds: a well-behaved request under attack is answered within it


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for %d" % pid)


def cpu_seconds(pid):
    """User plus system CPU time of a process so far (/proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_count(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def read_to_end(sock, timeout):
    """Everything the peer sends until it closes (or resets); AssertionError if it does not within `timeout`."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
    except socket.timeout:
        raise AssertionError("the server did not close the connection within %ss (got %r)"
                             % (timeout, b"".join(chunks)[:200])) from None
    except ConnectionResetError:
        pass
    return b"".join(chunks)


class Client:
    """A well-behaved client on a keep-alive connection: times each GET /health."""

    def __init__(self, server):
        self.connection = RawConnection(server, timeout=30)
        self.latencies = []

    def get_health(self):
        started = time.monotonic()
        self.connection.send(request("GET", "/health"))
        response = self.connection.response()
        self.latencies.append(time.monotonic() - started)
        if (response.status, response.body) != (200, b"ok\n"):
            raise AssertionError("GET /health: %r" % response)

    def close(self):
        self.connection.close()


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class DeadlineTest(support.ServerTestCase):

    def test_stalled_clients_are_cut_at_their_deadline(self):
        # Deadlines of 0.5 s (the idle one 1.5 s): the server looks for passed
        # deadlines every 0.05 s then (a tenth of the shortest), so each client
        # is cut 0.5 to 0.55 s in, give or take a busy machine.
        server = self.start_server("--header-timeout", "0.5", "--body-timeout", "0.5",
                                   "--send-timeout", "0.5", "--idle-timeout", "1.5")
        server.put("big", b"v" * (8 << 20))
        address = (server.host, server.port)
        started = time.monotonic()
        clients = {name: socket.create_connection(address) for name in
                   ("head", "nothing", "body", "chunked", "idle")}
        for sock in clients.values():
            self.addCleanup(sock.close)
        clients["head"].sendall(b"GET /health HTTP/1.1\r\nHo")
        clients["body"].sendall(request("PUT", "/kv/stalled", [("Content-Length", "10")], b"abc"))
        clients["chunked"].sendall(request("PUT", "/kv/stalled", [("Transfer-Encoding", "chunked")],
                                           b"3\r\nabc\r\n"))
        clients["idle"].sendall(request("GET", "/health"))
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(address)
        self.addCleanup(reader.close)
        reader.sendall(request("GET", "/kv/big"))       # and never reads it

        timeout = b"HTTP/1.1 408 Request Timeout\r\n"
        for name, expected in (("head", timeout), ("body", timeout), ("chunked", timeout),
                               ("nothing", None), ("idle", b"HTTP/1.1 200 OK\r\n")):
            with self.subTest(name):
                received = read_to_end(clients[name], 10)
                elapsed = time.monotonic() - started
                if expected is None:
                    self.assertEqual(received, b"")
                else:
                    self.assertTrue(received.startswith(expected), received[:200])
                if expected is timeout:
                    self.assertTrue(received.endswith(b"\r\n\r\nrequest timeout\n"), received)
                    # A reply about a key carries the revision; /health's does not.
                    self.assertEqual(b"\r\nKV-Revision: " in received, name != "head", received)
                self.assertGreater(elapsed, 0.45, "cut before its deadline")
        self.assertGreater(time.monotonic() - started, 1.45, "idle connection cut before 1.5 s")
        # The client that did not read: once it has been cut off (the fourth
        # request cut at a deadline, after head, body and chunked), what it
        # reads is what was already on its way, then the end.
        support.wait_until(lambda: support.metric(server, "kvstore_requests_timed_out_total")
                           >= 4, 10, message="the client that did not read to be cut off")
        received = read_to_end(reader, 10)
        self.assertLess(len(received), 8 << 20, "a client that did not read got it all")
        self.assertEqual(server.request("GET", "/health")[0], 200)
        self.assertIsNone(server.get("stalled"))
        self.assertNotIn("Traceback", server.output())


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class FairnessTest(support.ServerTestCase):
    """A flood from one client; another client's requests are each answered within SERVED_WITHIN."""

    FLOOD_SECONDS = 1.5

    def check_served_during(self, server, flood):
        """`flood(stop, busy)` floods until `stop` is set; it sets `busy` once the server
        is busy with it."""
        stop, busy = threading.Event(), threading.Event()
        errors = []

        def run():
            try:
                flood(stop, busy)
            except OSError as e:
                errors.append(e)
            busy.set()
        flooder = threading.Thread(target=run, daemon=True)
        flooder.start()
        self.assertTrue(busy.wait(10), "the flood did not start")
        self.assertEqual(errors, [])
        client = Client(server)
        self.addCleanup(client.close)
        ends = time.monotonic() + self.FLOOD_SECONDS
        while time.monotonic() < ends:
            client.get_health()
            time.sleep(0.02)                # the client's pace, on purpose: not a wait
        stop.set()
        flooder.join(30)
        self.assertFalse(flooder.is_alive())
        self.assertLess(max(client.latencies), SERVED_WITHIN,
                        "slowest of %d requests during the flood" % len(client.latencies))
        self.assertEqual(server.request("GET", "/health")[0], 200)

    def test_a_flood_of_tiny_chunks(self):
        # 8-byte chunks: as small as chunks get while their framing does not
        # outweigh their data (1-byte ones are refused: ChunkedTests).
        server = self.start_server("--max-value-bytes", str(1 << 30))

        def flood(stop, busy):
            with socket.create_connection((server.host, server.port)) as sock:
                sock.sendall(request("PUT", "/kv/flood", [("Transfer-Encoding", "chunked")]))
                chunks = b"8\r\nxxxxxxxx\r\n" * 10000
                sent = 0
                while not stop.is_set():
                    sock.sendall(chunks)
                    sent += len(chunks)
                    if sent > 8 << 20:      # past the socket buffers: the server reads it
                        busy.set()
        self.check_served_during(server, flood)

    def test_a_flood_of_pipelined_requests(self):
        server = self.start_server()

        def flood(stop, busy):
            with socket.create_connection((server.host, server.port)) as sock:
                def drain():
                    try:
                        while sock.recv(1 << 20):
                            busy.set()      # replies come: the server is busy with it
                    except OSError:
                        pass
                threading.Thread(target=drain, daemon=True).start()
                requests = request("GET", "/health") * 1000
                while not stop.is_set():
                    sock.sendall(requests)
                sock.shutdown(socket.SHUT_RDWR)
        self.check_served_during(server, flood)


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class MemoryCapTest(support.ServerTestCase):

    def test_slow_large_uploads_beyond_the_cap_get_503(self):
        cap = 32 << 20
        server = self.start_server("--max-inflight-bytes", str(cap))
        rss_before = rss_bytes(server.proc.pid)
        address = (server.host, server.port)
        head = request("PUT", "/kv/upload", [("Content-Length", str(10 << 20))])
        part = b"u" * (1 << 20)
        uploads = []
        for _ in range(200):
            sock = socket.create_connection(address, timeout=5)
            self.addCleanup(sock.close)
            try:
                sock.sendall(head + part)       # a tenth of the body, then it stalls
            except OSError:
                pass                            # refused, and closed while we sent
            uploads.append(sock)
        refused = 0
        for sock in uploads:
            sock.settimeout(0.5 if refused < 190 else 0.1)
            try:
                response = read_response(sock.makefile("rb"), "PUT")
            except (socket.timeout, AssertionError, ConnectionResetError):
                continue                        # still receiving: it fitted
            self.assertEqual((response.status, response.body, response.get("Retry-After")),
                             (503, b"server busy\n", "1"))
            refused += 1
        self.assertGreaterEqual(refused, 200 - cap // (10 << 20))
        growth = rss_bytes(server.proc.pid) - rss_before
        self.assertLess(growth, cap + (32 << 20), "RSS grew by %d MiB" % (growth >> 20))
        for sock in uploads:
            sock.close()
        # Once they are gone, a 10 MiB value fits again.
        value = os.urandom(10 << 20)
        support.wait_until(lambda: server.request("PUT", "/kv/after", value)[0] == 200, 10,
                           interval=0.2, message="a 10 MiB PUT after the uploads")
        self.assertEqual(server.get("after"), value)
        self.assertIsNone(server.get("upload"))


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class ConnectionCapTest(support.ServerTestCase):

    def test_connections_past_the_cap_are_refused_and_logged(self):
        server = self.start_server("--max-connections", "20")
        connections = []
        for _ in range(20):
            connection = RawConnection(server)
            self.addCleanup(connection.close)
            connection.send(request("GET", "/health"))
            self.assertEqual(connection.response().status, 200)
            connections.append(connection)
        for _ in range(3):
            with socket.create_connection((server.host, server.port), timeout=10) as sock:
                response = read_to_end(sock, 10)
            self.assertTrue(response.startswith(b"HTTP/1.1 503 "), response)
            self.assertTrue(response.endswith(b"too many connections\n"), response)
        server.wait_for_line("Refusing connections: 20 open", 10)
        self.assertEqual(server.output().count("Refusing connections"), 1)
        connections.pop().close()
        support.wait_until(lambda: server.request("GET", "/health")[0] == 200, 10,
                           interval=0.1, message="a connection once one closed")


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class FileDescriptorTest(support.ServerTestCase):

    def test_out_of_file_descriptors_the_server_backs_off(self):
        def few_files():
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        server = self.start_server(preexec_fn=few_files)
        sockets = []
        for _ in range(100):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((server.host, server.port))
            self.addCleanup(sock.close)
            sockets.append(sock)
        server.wait_for_line("Cannot accept connections", 10)
        before = cpu_seconds(server.proc.pid)
        time.sleep(1.5)                                 # a window to measure, not a wait
        used = cpu_seconds(server.proc.pid) - before
        # Spinning, it takes whatever CPU it gets (0.37 s per second on a busy
        # CPU); backing off, about 0.005.
        self.assertLess(used, 0.25, "%.2f s of CPU in 1.5 s while out of descriptors" % used)
        logged = server.output().count("Cannot accept connections")
        self.assertLessEqual(logged, 4, "logged %d times in about 1.5 s" % logged)
        for sock in sockets:
            sock.close()
        support.wait_until(lambda: server.request("GET", "/health")[0] == 200, 15,
                           interval=0.2, message="serving again once descriptors are free")


AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def runs_as_nobody(python):
    """True if `python` can run as user nobody, and start itself again (for the thread limit test).

    The server starts children with sys.executable (its journal writer, its
    checkpoints), which an interpreter under /root may not be for nobody.
    """
    try:
        return subprocess.run(AS_NOBODY + [python, "-c", "import subprocess, sys; "
                                           "sys.exit(sys.version_info < (3, 10) or "
                                           "subprocess.run([sys.executable, '-c', ''])"
                                           ".returncode)"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class ThreadLimitTest(support.ServerTestCase):

    def test_stalled_clients_under_a_thread_limit(self):
        if os.geteuid() != 0 or not (shutil.which("prlimit") and shutil.which("setpriv")):
            self.skipTest("needs root, prlimit and setpriv, to run the server as nobody "
                          "with at most 256 threads")
        python = next((p for p in (sys.executable, "/usr/bin/python3") if runs_as_nobody(p)),
                      None)
        if python is None:
            self.skipTest("no Python 3.10+ that user nobody may run")
        os.chown(self.data_dir, 65534, 65534)
        # Nobody runs a copy of the server: the checkout may be where nobody
        # cannot go (a clone in root's 0700 home: "can't open file").
        code = support.copy_of_server(self)
        if subprocess.run(AS_NOBODY + [python, "-c", "open(%r).close()"
                                       % os.path.join(code, "server.py")],
                          stderr=subprocess.DEVNULL, timeout=30).returncode != 0:
            self.skipTest("user nobody cannot read %s (under %s)" % (code, tempfile.gettempdir()))
        server = self.start_server(
            prefix=["prlimit", "--nproc=256"] + AS_NOBODY, python=python,
            server=os.path.join(code, "server.py"), cwd=code,
            env={"PYTHONDONTWRITEBYTECODE": "1"})
        threads_before = thread_count(server.proc.pid)
        stalled = []
        for _ in range(300):
            sock = socket.create_connection((server.host, server.port), timeout=10)
            self.addCleanup(sock.close)
            sock.sendall(b"GET /health HTTP/1.1\r\nHo")
            stalled.append(sock)
        client = Client(server)
        self.addCleanup(client.close)
        for _ in range(5):
            client.get_health()
        self.assertLess(max(client.latencies), SERVED_WITHIN)
        # A thread per connection would be 300 (or the limit, 256); the server
        # has a few, and 300 stalled clients add none.
        threads = thread_count(server.proc.pid)
        self.assertLess(threads, 20, "threads with 300 stalled clients")
        self.assertLessEqual(threads, threads_before + 5,
                             "%d threads before the 300 stalled clients, %d with them"
                             % (threads_before, threads))
        server.put("written", b"under the limit")
        self.assertEqual(server.get("written"), b"under the limit")


if __name__ == "__main__":
    unittest.main()
