"""Black-box storage failures: a full disk, a failed fsync, a killed journal writer.

- Out of room (a tiny RLIMIT_FSIZE set on the running server and its
  journal writer with prlimit, which needs no privilege for one's own
  processes; or, as root, a 1 MiB
  tmpfs filled up): the failing writes get 507 and are never visible,
  reads go on, /health is 503 with the reason; once there is room again,
  /health is 200 and writes succeed without a restart; a SIGKILL then
  loses no acknowledged write and brings back none that failed.
- A failed fsync (EIO; os.fsync patched in the server process by a small
  wrapper, durability_support.FaultyFsyncServer): the write gets 500 and is never visible,
  the server exits 1 with one line, and the next start has every
  acknowledged write and none that failed.
"""
import http.client
import os
import resource
import signal
import sys
import unittest

from tests import support
from tests.durability_support import (
    TRACEBACK, FaultyFsyncServer, assert_state, journals, mount_tmpfs)

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)


class FullDiskTests:
    """The scenario, whatever fills the disk: make_full() and make_room() are the subclass's."""

    def start(self):
        return self.start_server("--checkpoint-bytes", str(1 << 30))

    def status(self, server, method, key, body=None):
        status, _, reply = server.request(method, "/kv/" + key, body)
        return status, reply

    def test_full_disk_gives_507_reads_go_on_and_writes_resume(self):
        server = self.start()
        expected = {"kept-%d" % i: b"v%d" % i * 20 for i in range(5)}
        for key, value in expected.items():
            server.put(key, value)
        self.make_full(server)
        big = b"x" * 200000
        self.assertEqual(self.status(server, "PUT", "refused", big),
                         (507, b"insufficient storage\n"))
        self.assertEqual(self.status(server, "GET", "refused")[0], 404,
                         "a write answered 507 is visible")
        self.assertEqual(self.status(server, "PUT", "kept-0", big)[0], 507)
        status, _, body = server.request("GET", "/health")
        self.assertEqual(status, 503)
        self.assertIn(b"disk full", body)
        # A record small enough for the room left (a tmpfs page's end) may fit.
        status = self.status(server, "DELETE", "kept-1")[0]
        self.assertIn(status, (200, 507))
        if status == 200:
            expected["kept-1"] = None
        assert_state(self, server, expected, "reads while the disk is full")
        self.make_room(server)
        support.wait_until(lambda: server.request("GET", "/health")[0] == 200, 15,
                           message="/health 200 once there is room again")
        server.put("after", b"room again")
        expected.update({"after": b"room again", "refused": None})
        server.kill()
        server = self.restart(server)
        assert_state(self, server, expected, "after SIGKILL")
        self.assertNotIn(TRACEBACK, server.output())


class RlimitFullDiskTest(FullDiskTests, support.ServerTestCase):
    """The journal may not grow past RLIMIT_FSIZE: write() fails with EFBIG.

    The limit is set on the server and on its children, among them the
    journal's writer process, which makes the journal's writes.
    """

    def processes(self, server):
        pid = server.proc.pid
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [pid] + [int(child) for child in f.read().split()]

    def make_full(self, server):
        size = os.path.getsize(journals(self.data_dir)[-1])
        for pid in self.processes(server):
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

    def make_room(self, server):
        for pid in self.processes(server):
            resource.prlimit(pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


class TmpfsFullDiskTest(FullDiskTests, support.ServerTestCase):
    """A 1 MiB tmpfs as the data directory, filled by a file of the test's: ENOSPC."""

    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            self.skipTest("mounting a tmpfs needs root")
        self.data_dir = mount_tmpfs(self, "1m")
        self.filler = os.path.join(self.data_dir, "filler")

    def make_full(self, server):
        with open(self.filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass

    def make_room(self, server):
        os.unlink(self.filler)


class FsyncErrorTest(support.ServerTestCase):

    def fail_fsync(self, how):
        server = FaultyFsyncServer(self.data_dir)
        self.addCleanup(server.__exit__, None, None, None)
        server.start()
        expected = {"acked-%d" % i: b"value %d" % i for i in range(10)}
        for key, value in expected.items():
            server.put(key, value)
        server.fail_fsync(how)
        status, _, body = server.request("PUT", "/kv/failed", b"never acknowledged")
        self.assertEqual((status, body), (500, b"storage error\n"))
        self.assertEqual(server.wait(30), 1, server.output())
        output = server.output()
        self.assertNotIn(TRACEBACK, output)
        errors = support.error_lines(output)
        self.assertEqual(len(errors), 1, output)
        server.heal_fsync()
        again = self.start_server()
        expected["failed"] = None
        assert_state(self, again, expected)
        return errors[0]

    def test_a_failed_fsync_stops_the_server_with_exit_1_and_keeps_every_acknowledged_write(self):
        error = self.fail_fsync("once")
        self.assertIn("fsync failed: Input/output error", error)

    def test_a_disk_that_keeps_failing_loses_no_acknowledged_write_either(self):
        # The final snapshot fails too: the journal, cut back to before the
        # failed write, is what the next start recovers from.
        error = self.fail_fsync("always")
        self.assertIn("Input/output error", error)



def journal_writer_pid(server):
    """The pid of the server's journal writer process (python3 persistence.py journal-writer)."""
    pid = server.proc.pid
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        children = [int(child) for child in f.read().split()]
    for child in children:
        with open("/proc/%d/cmdline" % child, "rb") as f:
            if b"journal-writer" in f.read().split(b"\0"):
                return child
    raise AssertionError("no journal writer among the server's children %s" % children)


@unittest.skipUnless(os.path.isdir("/proc/self/task"), "needs /proc")
class JournalWriterDeathTest(support.ServerTestCase):
    """The journal's writer process killed (by the OOM killer, say): as a failed fsync."""

    def test_a_killed_journal_writer_stops_the_server_and_loses_no_acknowledged_write(self):
        server = self.start_server()
        expected = {"acked-%d" % i: b"value %d" % i for i in range(10)}
        for key, value in expected.items():
            server.put(key, value)
        os.kill(journal_writer_pid(server), signal.SIGKILL)
        try:                            # the server may be gone already: no answer is fine
            status, _, _ = server.request("PUT", "/kv/late", b"never acknowledged")
            self.assertGreaterEqual(status, 500, "a write acknowledged without a journal")
        except (OSError, http.client.HTTPException):
            pass
        self.assertEqual(server.wait(30), 1, server.output())
        output = server.output()
        self.assertNotIn(TRACEBACK, output)
        errors = support.error_lines(output)
        self.assertEqual(len(errors), 1, output)
        self.assertIn("journal writer process exited", errors[0])
        again = self.start_server()
        expected["late"] = None
        assert_state(self, again, expected)


if __name__ == "__main__":
    unittest.main()
