"""Black-box attacks on the transport (issue 24), as an outsider runs them.

Each test starts the real server on a free port with a data directory of its
own, plays one attack with plain sockets, and asserts what SPEC.md ("Limits
and timeouts", "Transport") requires while it goes on.  Every failure message
carries the figures measured, so a failing run says how far off the server is.
The comment on each test says what the thread-and-epoll server (main 322ce3d)
did, measured on a shared 2-CPU machine (load average 0.2 to 1.6).

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
import tempfile
import threading
import time
import unittest

from tests import support
from tests.test_http_protocol import RawConnection, read_response, request
from tests.test_limits import rss_bytes

MiB = 1 << 20


def group_memory(pgid):
    """The memory of a process group (the server and its helper processes): the sum of
    their proportional set sizes (Pss: a page shared by two counts half in each), or of
    their RSS where the kernel has no /proc/PID/smaps_rollup."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                if int(f.read().rpartition(")")[2].split()[2]) != pgid:
                    continue
            try:
                with open("/proc/%s/smaps_rollup" % name) as f:
                    total += next(int(line.split()[1]) for line in f
                                  if line.startswith("Pss:")) * 1024
            except FileNotFoundError:
                total += rss_bytes(int(name))
        except (OSError, ValueError, StopIteration, AssertionError):
            continue                    # gone meanwhile, or a kernel thread
    return total


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
        # The server looks for passed deadlines every 0.05 s here (a tenth of
        # the shortest): closed 0.5 to 0.55 s in, give or take a busy machine.
        server = self.start_server("--header-timeout", "0.5", "--idle-timeout", "60")
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            closed, elapsed, received = closed_within(sock, 3.0)
        # Silence is the answer to a connection that asked nothing (as nginx and
        # Go do, and DeadlineTest requires); a 408 would do no harm either.
        if received:
            self.assertTrue(received.startswith(b"HTTP/1.1 408 "), received[:200])
        self.assertTrue(closed, "a connection that sent nothing still open after %.1f s "
                        "(--header-timeout 0.5, --idle-timeout 60)" % elapsed)
        self.assertGreater(elapsed, 0.45, "closed before the header timeout")
        self.assertEqual(server.request("GET", "/health")[0], 200)

    def test_an_idle_keep_alive_connection_lasts_until_the_idle_timeout(self):
        # Passes on main 322ce3d: it guards the fix of the test above.  A header
        # deadline applied to it would close it 0.5 to 0.55 s after its reply (the
        # server looks every 0.05 s here), the idle timeout 2 to 2.05 s after.
        server = self.start_server("--header-timeout", "0.5", "--idle-timeout", "2")
        connection = RawConnection(server)
        self.addCleanup(connection.close)
        connection.send(request("GET", "/health"))
        self.assertEqual(connection.response().status, 200)
        replied = time.monotonic()
        closed, _, received = closed_within(connection.sock, 1.0)
        self.assertEqual(received, b"")
        self.assertFalse(closed, "an idle keep-alive connection closed %.1f s after its reply, "
                         "before the idle timeout (2 s)" % (time.monotonic() - replied))
        closed, _, received = closed_within(connection.sock, 5.0)
        self.assertEqual(received, b"", "an idle connection is closed without a reply")
        elapsed = time.monotonic() - replied
        self.assertTrue(closed, "an idle connection still open %.1f s after its reply "
                        "(--idle-timeout 2)" % elapsed)
        self.assertGreater(elapsed, 1.5, "closed before the idle timeout")



def stall_uploads(test, server, count, declared, sent):
    """`count` connections that each send a PUT head declaring `declared` bytes and the first
    `sent` bytes of the body, then stall; closed at the end of the test."""
    head = request("PUT", "/kv/stalled", [("Content-Length", str(declared))])
    body = b"s" * sent
    sockets = []
    test.addCleanup(lambda: [sock.close() for sock in sockets])
    for _ in range(count):
        sock = socket.create_connection((server.host, server.port), timeout=10)
        sockets.append(sock)
        try:
            sock.sendall(head + body)
        except OSError:
            pass                        # refused and closed while it sent: allowed
    return sockets


def probe(server):
    """A well-behaved client's requests, each on a new connection: [(request, status, expected)]."""
    results = []
    for method, path, body, expected in (("GET", "/kv/before", None, 200),
                                         ("GET", "/kv/absent", None, 404),
                                         ("HEAD", "/kv/before", None, 200),
                                         ("GET", "/health", None, 200),
                                         ("DELETE", "/kv/gone", None, 200),
                                         ("PUT", "/kv/small", b"small", 200)):
        try:
            status = server.request(method, path, body, timeout=5)[0]
        except OSError as e:
            status = type(e).__name__
        results.append(("%s %s" % (method, path), status, expected))
    return results


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class InflightMemoryTest(support.ServerTestCase):
    """(d, g) Memory that stalled uploads declare, or hold, does not refuse anybody else."""

    def check_served_while_stalled(self, server, stalled, rounds=3, bodies_may_wait=False):
        """Every probe answered as expected in `rounds` rounds, while `stalled` stall.

        `bodies_may_wait`: the memory cap is really full, so a PUT, which brings
        a body, may be refused with 503 (a request without one may not).
        """
        failures, total = [], 0
        for _ in range(rounds):
            for what, status, expected in probe(server):
                total += 1
                if bodies_may_wait and what.startswith("PUT") and status == 503:
                    continue
                if status != expected:
                    failures.append("%s: %s" % (what, status))
        if failures:
            self.fail("%d of %d requests of a well-behaved client not served while %d uploads "
                      "stall: %s" % (len(failures), total, len(stalled), ", ".join(failures)))

    def test_declared_lengths_of_stalled_uploads_do_not_refuse_others(self):
        # (d) 4,500 x 64 KiB declared is past the default 256 MiB, but only
        # 4,500 bytes are held.  main 322ce3d: it reserves the declared length,
        # and answers every request after them, GET and /health included, with
        # 503 server busy (18 of 18).
        count = 4500
        raise_fd_limit(count + 200)
        server = self.start_server()
        server.put("before", b"written before")
        stalled = stall_uploads(self, server, count, 65536, 1)
        # The server has taken them all (its descriptors), before the probes.
        support.wait_until(lambda: open_fds(server.proc.pid) >= count, 15,
                           message="the server to accept %d connections (it has %d fds)"
                           % (count, open_fds(server.proc.pid)))
        self.check_served_while_stalled(server, stalled)
        self.assertEqual(server.get("small"), b"small")
        self.assertNotIn("Traceback", server.output())

    def test_bodyless_requests_are_not_refused_past_the_cap(self):
        # (g) 200 uploads hold 64 KiB each (all but a byte), past an 8 MiB
        # cap: some of them may be refused (503) or paused, but a request
        # without a body never is.  A new PUT may get 503, with Retry-After.
        # main 322ce3d: the 128 uploads that fit fill the cap to the byte, and
        # all 15 requests without a body after them get 503 server busy, GET
        # and /health included.  (With 65,537 bytes declared each, 127 fit and
        # the bytes left over happened to take a GET's header block: it passed.)
        cap = 8 * MiB
        server = self.start_server("--max-inflight-bytes", str(cap))
        server.put("before", b"written before")
        stalled = stall_uploads(self, server, 200, 65536, 65535)
        support.wait_until(lambda: open_fds(server.proc.pid) >= 200, 15,
                           message="the server to accept 200 connections")
        self.check_served_while_stalled(server, stalled, bodies_may_wait=True)
        status, headers, body = server.request("PUT", "/kv/large", b"L" * MiB)
        if status != 200:
            self.assertEqual((status, body), (503, b"server busy\n"))
            self.assertIsNotNone(headers.get("Retry-After"), "a 503 without Retry-After")
        self.assertNotIn("Traceback", server.output())

    def test_past_the_cap_a_large_header_block_is_refused_however_it_trickles_in(self):
        # Over the cap, a head past HEAD_SOFT_BYTES (8 KiB) gets 503 and the
        # connection closes: heads are not bodies, but 16,384 connections of
        # 64 KiB heads are 1 GiB.  Sent 1 KiB at a time, as a slow client would.
        cap = 1 * MiB
        server = self.start_server("--max-inflight-bytes", str(cap))
        stall_uploads(self, server, 1, 700 * 1024, 400 * 1024)     # reserved 700, held 400 KiB
        support.wait_until(lambda: open_fds(server.proc.pid) >= 1, 15,
                           message="the server to accept the upload")
        head = request("GET", "/health", [("X-Filler", "f" * (20 * 1024))])
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            received = b""
            try:
                for start in range(0, len(head), 1024):
                    sock.sendall(head[start:start + 1024])
                    time.sleep(0.01)            # a slow client, on purpose
                received = sock.recv(4096)
            except OSError:                     # refused, and reset while it sent
                received = received or b"reset"
        self.assertTrue(received.startswith(b"HTTP/1.1 503 ") or received == b"reset",
                        received[:200])
        self.assertEqual(server.request("GET", "/health")[0], 200)     # a small head passes



# The flooding client runs in a process of its own, so that its threads do not
# compete for this process's GIL with the client whose latency is measured.
# It pipelines one request over and over on each of N connections, as fast as
# the sockets take them, and discards the replies.  It prints "flooding" once
# every connection has had a reply back (the server is busy with the flood),
# or "flooding slowly" if that takes over 5 s, and the number of reply bytes
# it got when its stdin closes.
FLOODER = r"""
import socket, sys, threading
host, port, kind, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
received = [0] * count
replied = threading.Barrier(count + 1)

def drain(sock, i):
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            if not received[i]:
                replied.wait()
            received[i] += len(data)
    except (OSError, threading.BrokenBarrierError):
        pass

def flood(i):
    if kind == "get":
        one = b"GET /kv/probe HTTP/1.1\r\nHost: flood\r\n\r\n"
    else:
        one = (b"PUT /kv/flood-%d HTTP/1.1\r\nHost: flood\r\nContent-Length: 16\r\n\r\n"
               b"0123456789abcdef" % i)
    data = one * (65536 // len(one) + 1)
    sock = socket.create_connection((host, port))
    threading.Thread(target=drain, args=(sock, i), daemon=True).start()
    try:
        while True:
            sock.sendall(data)
    except OSError:
        pass

for i in range(count):
    threading.Thread(target=flood, args=(i,), daemon=True).start()
try:
    replied.wait(5)
    print("flooding", flush=True)
except threading.BrokenBarrierError:
    print("flooding slowly", flush=True)
sys.stdin.read()
print(sum(received), flush=True)
"""


def start_flood(test, server, kind, connections):
    """Start the flooding client (FLOODER) and wait until the server is busy with it
    (5 s at most); returns a function that stops it and returns the bytes of replies
    it got."""
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, server.host, str(server.port),
                                kind, str(connections)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def kill():
        if flooder.poll() is None:
            flooder.kill()
        flooder.wait(10)
        flooder.stdin.close()
        flooder.stdout.close()
    test.addCleanup(kill)
    line = flooder.stdout.readline()
    test.assertTrue(line.startswith(b"flooding"), "the flooding client did not start")

    def stop():
        flooder.stdin.close()
        try:
            received = int(flooder.stdout.readline() or 0)
        finally:
            kill()
        return received
    return stop


def latencies(server, samples, seconds, between=None):
    """Sequential GETs of a small key on one keep-alive connection, `samples` of them or
    as many as `seconds` allow: (latencies of the 200s, other answers).  `between` is
    called after each, untimed."""
    connection = RawConnection(server, timeout=30)
    measured, errors = [], []
    try:
        ends = time.monotonic() + seconds
        while len(measured) + len(errors) < samples and time.monotonic() < ends:
            started = time.monotonic()
            connection.send(request("GET", "/kv/probe"))
            response = connection.response()
            elapsed = time.monotonic() - started
            if (response.status, response.body) == (200, b"probe value"):
                measured.append(elapsed)
            else:
                errors.append("%d %r" % (response.status, response.body))
                if response.get("Connection") == "close":
                    connection.close()
                    connection = RawConnection(server, timeout=30)
            if between:
                between()
    finally:
        connection.close()
    return measured, errors


def summary(measured):
    ordered = sorted(measured) or [float("nan")]
    return {"n": len(measured), "median": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max": ordered[-1]}


def describe(figures):
    return "n=%(n)d median %(median).4f s, p99 %(p99).4f s, max %(max).4f s" % figures


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class PipelineFloodTest(support.ServerTestCase):
    """(e) Connections that pipeline without pause share the server fairly.

    Another client's sequential GETs are timed before the flood and during it,
    in the same test.  A fair server adds a few milliseconds (a bounded turn of
    each flooding connection); the bound is many times that, for a loaded 2-CPU
    machine where the flooder, the server and this client share the CPUs.  The
    median and the 99th percentile of 400 samples: one slow sample (the
    scheduler, a checkpoint) does not fail the test, a server that serves the
    flood first does.
    """

    SAMPLES = 400
    SECONDS = 4.0           # at most, for the samples during the flood
    # The attack these guard against made the median 0.13-0.18 s and the p99
    # 0.76-0.80 s; 0.02 and 0.05 failed on a machine running two suites at once.
    SLACK_P99 = 0.100
    SLACK_MEDIAN = 0.050

    def check_fair(self, server, kind, connections, between=None, flood_seconds=0):
        """The flood lasts `flood_seconds` at least; `between` is called every 0.1 s or so."""
        server.put("probe", b"probe value")
        baseline, errors = latencies(server, self.SAMPLES, self.SECONDS)
        self.assertEqual(errors, [], "before the flood")
        baseline = summary(baseline)
        stop = start_flood(self, server, kind, connections)
        flood_ends = time.monotonic() + flood_seconds
        measured, errors = latencies(server, self.SAMPLES, self.SECONDS, between)
        while between and time.monotonic() < flood_ends:
            time.sleep(0.1)                 # the flood goes on: a measuring interval
            between()
        flood_bytes = stop()
        flood = summary(measured)
        report = ("another client's GETs before the flood: %s; during it: %s, and %d refused "
                  "%s; the flood (%d connection(s) pipelining %ss) got %.1f MB of replies"
                  % (describe(baseline), describe(flood), len(errors), errors[:1], connections,
                     kind.upper(), flood_bytes / 1e6))
        self.assertEqual(errors, [], report)
        self.assertGreaterEqual(flood["n"], 100, report)
        self.assertLess(flood["p99"], baseline["p99"] + self.SLACK_P99, report)
        self.assertLess(flood["median"], baseline["median"] + self.SLACK_MEDIAN, report)
        self.assertEqual(server.request("GET", "/health")[0], 200)
        self.assertNotIn("Traceback", server.output())
        note(report)
        return report

    def test_a_connection_pipelining_gets(self):
        # main 322ce3d: 18-20 GETs answered in the 4 s of flood (400 in 0.03 s
        # before it), median 0.13-0.18 s, p99 = max 0.76-0.80 s.
        server = self.start_server()
        self.check_fair(server, "get", 1)

    def test_connections_pipelining_small_puts(self):
        # And the server reads no faster than it answers: its memory stays
        # bounded through 6 s of flood.  main 322ce3d: its RSS went from 28 MiB
        # to 252-255 MiB (the input piles up: 10 connections got 0.3 MB of
        # replies, about 2,000 PUTs, in 6 s), while the other client's GETs
        # stayed within the bounds here (median 0.2-10 ms, p99 34-43 ms).
        server = self.start_server()
        rss = [group_memory(server.proc.pid)]
        bound = 150 * MiB

        def sample():
            if time.monotonic() - sampled[0] >= 0.05:
                rss.append(group_memory(server.proc.pid))
                sampled[0] = time.monotonic()
        sampled = [time.monotonic()]
        try:
            report = self.check_fair(server, "put", 10, sample, flood_seconds=6)
        except AssertionError as e:
            raise AssertionError("%s; the server's memory reached %.0f MiB" % (e, max(rss) / MiB))
        self.assertLess(max(rss), bound, "the server's memory reached %.0f MiB (%.0f MiB "
                        "before the flood); %s" % (max(rss) / MiB, rss[0] / MiB, report))
        note("the server's memory reached %.0f MiB (%.0f MiB before the flood)"
             % (max(rss) / MiB, rss[0] / MiB))

def note(report):
    """With KV_ATTACK_REPORT set, print what an attack measured even when the test passes."""
    if os.environ.get("KV_ATTACK_REPORT"):
        sys.stderr.write("\n  measured: %s\n" % report)


def run_tool(*command):
    """Run a system tool; its CompletedProcess (stdout and stderr captured as text)."""
    return subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60)


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc")
class StalledDiskTest(support.ServerTestCase):
    """(f) A disk whose fsync does not return: memory stays bounded, reads go on,
    /health says 503, writes get 503 past the journal's backlog, and no answer lies.

    The data directory is on a loop-mounted ext4 file system, frozen with
    fsfreeze (every write to it, and every fsync, blocks until the thaw).  The
    memory measured is the server's with its helper processes (their Pss).
    main 322ce3d, with --fsync always: its memory went from 20-28 MiB to
    536-590 MiB while frozen (the brief had 1.3 GB for the same attack),
    reads went on (slowest 0.1-0.6 s), /health said "200 ok" for the whole 10 s
    of freeze; 0-43 PUTs got 503 while frozen, the others 200 after the thaw,
    and every answer was true.
    """

    CLIENTS = 400
    VALUE_BYTES = MiB
    IMAGE_BYTES = 1 << 30       # sparse: only what is written takes room
    MEMORY_BOUND = 450 * MiB
    HEALTH_WITHIN = 10.0        # seconds after the freeze (SPEC: "after a few seconds")
    CLIENT_TIMEOUT = 20.0       # a write handed to the journal waits for the thaw

    def mount_small_file_system(self):
        """A fresh ext4 file system on a loop device, mounted on a new directory; its path.

        Unmounted (and the loop device freed) at the end of the test, after the
        server is gone and the file system thawed.
        """
        if os.geteuid() != 0:
            self.skipTest("needs root, to mount a loop file system and freeze it")
        missing = [t for t in ("truncate", "mkfs.ext4", "mount", "umount", "losetup",
                               "fsfreeze") if not shutil.which(t)]
        if missing or not os.path.exists("/dev/loop-control"):
            self.skipTest("needs loop devices and %s" % ", ".join(missing or ["/dev/loop-control"]))
        work = tempfile.mkdtemp(prefix="kvtest-disk-")
        self.addCleanup(shutil.rmtree, work, True)
        image, mountpoint = os.path.join(work, "fs.img"), os.path.join(work, "mnt")
        os.mkdir(mountpoint)
        for command in (("truncate", "-s", str(self.IMAGE_BYTES), image),
                        ("mkfs.ext4", "-q", "-F", image)):
            done = run_tool(*command)
            if done.returncode != 0:
                self.skipTest("cannot make the file system: %s" % done.stderr.strip())
        done = run_tool("mount", "-o", "loop", image, mountpoint)
        if done.returncode != 0:
            self.skipTest("cannot mount a loop file system here: %s" % done.stderr.strip())
        self.addCleanup(self.unmount, image, mountpoint)
        return mountpoint

    def unmount(self, image, mountpoint):
        run_tool("fsfreeze", "-u", mountpoint)          # in case: an error if not frozen
        # The server's helper processes may still be exiting (they hold files).
        support.wait_until(lambda: run_tool("umount", mountpoint).returncode == 0
                           or not os.path.ismount(mountpoint), 30, interval=0.1,
                           message="umount %s" % mountpoint)
        # mount -o loop frees its loop device at umount; any left over goes too.
        for line in run_tool("losetup", "-j", image).stdout.splitlines():
            run_tool("losetup", "-d", line.split(":", 1)[0])

    def test_a_frozen_disk(self):
        mountpoint = self.mount_small_file_system()
        # No checkpoint: the 64 MiB of writes that land at the thaw pass the
        # default threshold, and the checkpoint child's copy of them (over
        # 250 MiB for a moment: 524 MiB in all once, in a full run) is the
        # price of a checkpoint, not memory the freeze made the server hold.
        server = self.start_server("--fsync", "always", "--checkpoint-bytes", str(1 << 30),
                                   data_dir=os.path.join(mountpoint, "data"))
        server.put("before", b"written before the freeze")
        rss = [group_memory(server.proc.pid)]

        def thaw():
            done = run_tool("fsfreeze", "-u", mountpoint)
            return done.returncode == 0 or "Invalid argument" in done.stderr  # not frozen
        # Registered after the server, so it runs before the server is killed:
        # a process blocked on a frozen file system cannot die until the thaw.
        self.addCleanup(thaw)
        done = run_tool("fsfreeze", "-f", mountpoint)
        self.assertEqual(done.returncode, 0, done.stderr)
        frozen = time.monotonic()

        tail = os.urandom(self.VALUE_BYTES - 8)
        answers = [None] * self.CLIENTS        # a status, or None: no answer
        no_retry_after = []

        def write(i):
            try:
                with socket.create_connection((server.host, server.port),
                                              timeout=self.CLIENT_TIMEOUT) as sock:
                    sock.sendall(request("PUT", "/kv/w%03d" % i,
                                         [("Content-Length", str(self.VALUE_BYTES))]))
                    sock.sendall(b"%08d" % i)
                    sock.sendall(tail)
                    with sock.makefile("rb") as rfile:
                        response = read_response(rfile, "PUT")
                    answers[i] = response.status
                    if response.status == 503 and response.get("Retry-After") is None:
                        no_retry_after.append(i)
            except (OSError, AssertionError):
                pass
        writers = [threading.Thread(target=write, args=(i,), daemon=True)
                   for i in range(self.CLIENTS)]
        for writer in writers:
            writer.start()

        # While frozen: memory, reads and /health, until /health says 503 (and
        # a second more), or HEALTH_WITHIN.
        reads, health, unhealthy_at = [], None, None
        while time.monotonic() < frozen + self.HEALTH_WITHIN:
            rss.append(group_memory(server.proc.pid))
            started = time.monotonic()
            try:
                status, _, body = server.request("GET", "/kv/before", timeout=5)
                reads.append((status == 200 and body == b"written before the freeze",
                              time.monotonic() - started, status))
            except OSError as e:
                reads.append((False, time.monotonic() - started, type(e).__name__))
            try:
                status, _, body = server.request("GET", "/health", timeout=5)
                health = "%d %r" % (status, body)
            except OSError as e:
                status, health = None, type(e).__name__
            if status == 503 and unhealthy_at is None:
                unhealthy_at = time.monotonic() - frozen
            if unhealthy_at is not None and time.monotonic() - frozen > unhealthy_at + 1:
                break
            time.sleep(0.1)                     # the interval between samples
        rss.append(group_memory(server.proc.pid))
        frozen_for = time.monotonic() - frozen
        answered_while_frozen = sum(a is not None for a in answers)
        self.assertTrue(thaw(), "fsfreeze -u failed")

        rss_frozen = max(rss)
        deadline = time.monotonic() + self.CLIENT_TIMEOUT
        while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
            rss.append(group_memory(server.proc.pid))
            time.sleep(0.1)                     # the interval between samples
        rss.append(group_memory(server.proc.pid))
        thawed_for = time.monotonic() - deadline + self.CLIENT_TIMEOUT

        # Only 200 means applied; an error means not applied; no answer, either.
        lies = []
        for i, status in enumerate(answers):
            got = server.get("w%03d" % i)
            expected = b"%08d" % i + tail
            if got is not None and got != expected:
                lies.append("w%03d: a value of %d bytes, not its own" % (i, len(got)))
            elif status == 200 and got is None:
                lies.append("w%03d: answered 200, absent" % i)
            elif status is not None and status >= 300 and got is not None:
                lies.append("w%03d: answered %d, present" % (i, status))
        tally = {}
        for status in answers:
            tally[status] = tally.get(status, 0) + 1
        bad_reads = [r for r in reads if not r[0]]
        report = ("with the disk frozen for %.1f s: the server's memory went from %.0f MiB to %.0f "
                  "MiB (%.0f MiB at most in the %.1f s after the thaw); %d reads, %d failed "
                  "(%s), slowest %.3f s; /health said 503 after %s, last %s; %d of %d PUTs of "
                  "1 MiB answered while frozen; answers by the end: %s; %d lies: %s"
                  % (frozen_for, rss[0] / MiB, rss_frozen / MiB, max(rss) / MiB, thawed_for,
                     len(reads), len(bad_reads),
                     bad_reads[:1], max(r[1] for r in reads),
                     "never" if unhealthy_at is None else "%.1f s" % unhealthy_at, health,
                     answered_while_frozen, self.CLIENTS,
                     ", ".join("%s: %d" % (k, v) for k, v in sorted(tally.items(), key=str)),
                     len(lies), lies[:3]))
        note(report)
        self.assertEqual(lies, [], report)
        self.assertEqual(no_retry_after, [], "503s without Retry-After; " + report)
        self.assertLess(max(rss), self.MEMORY_BOUND, report)
        self.assertEqual(bad_reads, [], report)
        self.assertIsNotNone(unhealthy_at, report)
        # After the thaw the server recovers by itself, within seconds.
        support.wait_until(lambda: server.request("GET", "/health")[0] == 200, 10, interval=0.1,
                           message="/health 200 after the thaw; " + report)
        server.put("after", b"written after the thaw")
        self.assertEqual(server.get("after"), b"written after the thaw")
        self.assertNotIn("Traceback", server.output())


if __name__ == "__main__":
    unittest.main()
