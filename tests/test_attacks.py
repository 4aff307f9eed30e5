"""Black-box attacks on the transport (issue 24), as an outsider runs them.

Each test starts the real server on a free port with a data directory of its
own, plays one attack with plain sockets, and asserts what SPEC.md ("Limits
and timeouts", "Transport") requires while it goes on.  Every failure message
carries the figures measured, so a failing run says how far off the server is.
The comment on each test says what the thread-and-epoll server (main 322ce3d)
did, measured on a quiet 2-CPU machine.

Bounds on time are generous (a loaded 2-CPU CI machine must pass them); they
tell "served" from "stuck" or "starved", they are not speed goals (those are
in bench/).
"""
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import unittest

from tests import support
from tests.test_http_protocol import RawConnection, read_response, request
from tests.test_limits import rss_bytes

MiB = 1 << 20


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def closed_within(sock, timeout):
    """(closed, seconds, received): whether the peer closed (or reset) `sock` within `timeout`,
    when, and the bytes it sent before (the caller has read every reply it expects before)."""
    started = time.monotonic()
    deadline = started + timeout
    received = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, timeout, received
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return False, timeout, received
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            return True, time.monotonic() - started, received
        received += data


def raise_fd_limit(needed):
    """Raise this process's soft RLIMIT_NOFILE to `needed` if the hard limit allows; else skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise unittest.SkipTest("needs %d file descriptors, the hard limit is %d" % (needed, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class HugeContentLengthTest(support.ServerTestCase):
    """(a) A Content-Length that no bounded parser takes is a 400, not an exception.

    main 322ce3d: no reply at all, the connection is closed, and the log says
    "Unexpected error ... ValueError: Exceeds the limit (4300 digits) for integer
    string conversion" (every Python from 3.10.7 on has that limit).
    """

    def test_content_length_of_5001_digits_is_400(self):
        server = self.start_server()
        connection = RawConnection(server)
        self.addCleanup(connection.close)
        started = time.monotonic()
        connection.send(request("PUT", "/kv/k", [("Content-Length", "1" * 5001)]))
        try:
            response = connection.response("PUT")
            got = "%d %r" % (response.status, response.body)
        except AssertionError as e:
            response, got = None, "no reply (%s, after %.2f s)" % (e, time.monotonic() - started)
        # A new connection is served; its GET also gives the log time to show an error.
        self.assertEqual(server.request("GET", "/kv/k")[0], 404)
        unexpected = [l for l in server.output().splitlines() if "Unexpected error" in l
                      or "Traceback" in l]
        self.assertIsNotNone(response, "%s; log: %s" % (got, unexpected))
        self.assertEqual(response.status, 400, "%s; log: %s" % (got, unexpected))
        self.assertEqual(unexpected, [])


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class HalfCloseTest(support.ServerTestCase):
    """(b) A client's FIN right after its requests: the replies come, then the close, at once.

    main 322ce3d: both replies, then the connection stays open until the idle
    timeout: closed 60.1 s after the replies with the default --idle-timeout.
    """

    def test_fin_after_the_requests_closes_after_the_replies(self):
        server = self.start_server()
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            rfile = sock.makefile("rb")
            sock.sendall(request("PUT", "/kv/half", [("Content-Length", "5")], b"value")
                         + request("GET", "/kv/half"))
            sock.shutdown(socket.SHUT_WR)
            put = read_response(rfile, "PUT")
            get = read_response(rfile, "GET")
            self.assertEqual((put.status, get.status, get.body), (200, 200, b"value"))
            closed, seconds, extra = closed_within(sock, 2.0)
            rfile.close()
        self.assertEqual(extra, b"", "bytes after the replies")
        self.assertTrue(closed, "still open %.1f s after the replies to a half-closed "
                        "connection" % seconds)
        self.assertEqual(server.get("half"), b"value")


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class ConnectionDeadlineTest(support.ServerTestCase):
    """(c) The header deadline starts at accept; the idle timeout only after a request."""

    def test_a_silent_connection_is_closed_at_the_header_timeout(self):
        # main 322ce3d: closed at the idle timeout (after 60.1 s), not the header timeout.
        server = self.start_server("--header-timeout", "1", "--idle-timeout", "60")
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            started = time.monotonic()
            closed, elapsed, received = closed_within(sock, 3.0)
        # Silence is the answer to a connection that asked nothing (as nginx and
        # Go do, and DeadlineTest requires); a 408 would do no harm either.
        if received:
            self.assertTrue(received.startswith(b"HTTP/1.1 408 "), received[:200])
        self.assertTrue(closed, "a connection that sent nothing still open after %.1f s "
                        "(--header-timeout 1, --idle-timeout 60)" % elapsed)
        self.assertGreater(elapsed, 0.9, "closed before the header timeout")
        self.assertEqual(server.request("GET", "/health")[0], 200)

    def test_an_idle_keep_alive_connection_lasts_until_the_idle_timeout(self):
        # Passes on main 322ce3d: it guards the fix of the test above.
        server = self.start_server("--header-timeout", "1", "--idle-timeout", "5")
        connection = RawConnection(server)
        self.addCleanup(connection.close)
        connection.send(request("GET", "/health"))
        self.assertEqual(connection.response().status, 200)
        replied = time.monotonic()
        closed, _, received = closed_within(connection.sock, 2.0)
        self.assertEqual(received, b"")
        self.assertFalse(closed, "an idle keep-alive connection closed %.1f s after its reply, "
                         "before the idle timeout (5 s)" % (time.monotonic() - replied))
        closed, _, received = closed_within(connection.sock, 5.0)
        self.assertEqual(received, b"", "an idle connection is closed without a reply")
        elapsed = time.monotonic() - replied
        self.assertTrue(closed, "an idle connection still open %.1f s after its reply "
                        "(--idle-timeout 5)" % elapsed)
        self.assertGreater(elapsed, 4.5, "closed before the idle timeout")


if __name__ == "__main__":
    unittest.main()
