"""Black-box: nothing the disk does goes unnoticed (issue 25).

- A torn last write: a power cut tore the journal's last group write out of
  order (its first sector or page lost, later ones there).  The start cuts
  it off and serves every acknowledged write.
- Checked snapshots: a snapshot with one bit flipped is refused at start
  (exit 1, one line naming it, the file untouched); `python3 persistence.py
  verify FILE` checks one without a server.
- The data directory under the server's feet: removed, replaced, or its
  journal removed while serving.  Writes get 500 from then on, /health
  503 with the reason, reads go on, and the stop says what was saved and
  exits 1.
- Children and the lock: the server killed alone (its checkpoint child or
  journal writer frozen, as a long checkpoint or a stalled disk holds
  them): a restart at once gets the lock.
- A full disk: checkpoints that cannot fit are reported (/health), a stop
  that cannot save exits 1 with every acknowledged write in the journal,
  and restarts neither need room nor leave empty journals behind.
- A clean stop with nothing written since the snapshot does not rewrite it.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from tests import support
from tests.durability_support import (
    TRACEBACK, assert_state, file_state, journals, mount_tmpfs, run_cli, stop_within)

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)
import persistence                                   # noqa: E402

PAGE, SECTOR = 4096, 512


def error_lines(server):
    return support.error_lines(server.output())


def health(server):
    status, _, body = server.request("GET", "/health")
    return status, body


class TornLastWriteTest(support.ServerTestCase):
    """The last group write of the journal, torn by a power cut with its pages out of order."""

    def setUp(self):
        super().setUp()
        server = self.start_server()
        self.expected = {"key-%d" % i: b"value %d " % i * 50 for i in range(10)}
        for key, value in self.expected.items():
            server.put(key, value)
        server.kill()
        [self.journal] = journals(self.data_dir)
        with open(self.journal, "rb") as f:
            self.before = f.read()

    def last_write(self):
        """One group write of ten records (7 KB) as the writer appends it to this journal."""
        records = [b"".join(persistence.encode_record(persistence.PUT, "torn-%d" % i,
                                                      bytes([65 + i]) * 700))
                   for i in range(10)]
        magic = getattr(persistence, "JOURNAL_MAGIC", None)
        if magic and self.before.startswith(magic):
            start = len(self.before)
            return b"".join(persistence.encode_round(start, start, records))
        return b"".join(records)            # a journal without rounds: the records alone

    def start_on_torn_copy(self, lose):
        """A copy of the data directory whose last write lost the byte ranges lose(start, end)."""
        directory = tempfile.mkdtemp(prefix="kvtest-torn-")
        self.addCleanup(shutil.rmtree, directory, True)
        os.rmdir(directory)
        shutil.copytree(self.data_dir, directory)
        write = bytearray(self.last_write())
        start, end = len(self.before), len(self.before) + len(write)
        for a, b in lose(start, end):
            write[a - start:b - start] = bytes(b - a)        # never reached the disk: zeros
        with open(os.path.join(directory, os.path.basename(self.journal)), "ab") as f:
            f.write(write)
        return self.start_server(data_dir=directory)

    def test_a_last_write_torn_in_any_page_order_is_cut_and_the_start_serves(self):
        def page_after(offset):
            return (offset // PAGE + 1) * PAGE
        cases = {
            "its first sector lost": lambda s, e: [(s, s + SECTOR)],
            "its first page lost": lambda s, e: [(s, page_after(s))],
            "only its last page landed": lambda s, e: [(s, page_after(e) - PAGE)],
            "a page in its middle lost": lambda s, e: [(page_after(s), page_after(s) + PAGE)],
            "its last sector lost": lambda s, e: [(e - SECTOR, e)],
        }
        expected = dict(self.expected, **{"torn-%d" % i: None for i in range(10)})
        for name, lose in cases.items():
            with self.subTest(name):
                server = self.start_on_torn_copy(lose)
                assert_state(self, server, expected)
                cut = [l for l in server.output().splitlines()
                       if os.path.basename(self.journal) in l and str(len(self.before)) in l]
                self.assertEqual(len(cut), 1, server.output())
                server.kill()


class SnapshotChecksumTest(support.ServerTestCase):

    def saved_snapshot(self):
        server = self.start_server()
        server.put("big", bytes(range(256)) * 64)    # the middle of the file is in this value
        server.put("small", b"s")
        self.assertEqual(stop_within(server)[0], 0, server.output())
        return os.path.join(self.data_dir, persistence.SNAPSHOT_NAME)

    def flip_a_bit_in_the_middle(self, path):
        with open(path, "rb") as f:
            data = bytearray(f.read())
        data[len(data) // 2] ^= 0x10
        with open(path, "wb") as f:
            f.write(data)

    def verify(self, path):
        return subprocess.run([sys.executable, os.path.join(support.ROOT, "persistence.py"),
                               "verify", path], capture_output=True, text=True, timeout=60)

    def test_a_flipped_bit_refuses_to_start_and_touches_nothing(self):
        snapshot = self.saved_snapshot()
        self.flip_a_bit_in_the_middle(snapshot)
        past = time.time() - 3600
        os.utime(snapshot, (past, past))
        before = file_state(snapshot)
        result = run_cli(["--host", "127.0.0.1", "--port", "0", "--working-dir", self.data_dir],
                         timeout=10)
        self.assertEqual(result.code, 1, result)
        self.assertNotIn(TRACEBACK, result.stdout + result.stderr)
        lines = result.lines("stderr")
        self.assertEqual(len(lines), 1, result)
        self.assertIn(os.path.realpath(snapshot), lines[0])
        self.assertIn("checksum", lines[0])
        self.assertEqual(file_state(snapshot), before, "the snapshot was modified")

    def test_verify_checks_a_snapshot_without_a_server(self):
        snapshot = self.saved_snapshot()
        sound = self.verify(snapshot)
        self.assertEqual((sound.returncode, sound.stderr), (0, ""), sound)
        self.assertEqual(len(sound.stdout.splitlines()), 1, sound)
        self.assertIn("2 keys", sound.stdout)
        self.assertIn("checksum matches", sound.stdout)
        self.flip_a_bit_in_the_middle(snapshot)
        missing = os.path.join(self.data_dir, "no-such-backup")
        for path in (snapshot, missing):
            with self.subTest(path=path):
                bad = self.verify(path)
                self.assertEqual(bad.returncode, 1, bad)
                self.assertEqual(bad.stdout, "", bad)
                self.assertEqual(len(bad.stderr.splitlines()), 1, bad)
                self.assertIn(path, bad.stderr)
                self.assertNotIn(TRACEBACK, bad.stderr)

    def test_verify_says_when_a_snapshot_has_no_checksum(self):
        import pickle
        old = support.temp_file(self, "old.pickle", pickle.dumps({"k": b"v"}, protocol=5))
        result = self.verify(old)
        self.assertEqual(result.returncode, 0, result)
        self.assertIn("no checksum", result.stdout)


class VanishedDirectoryTest(support.ServerTestCase):
    """The data directory, or its journal, removed or replaced while the server serves."""

    def start_with_writes(self):
        server = self.start_server()
        self.expected = {"acked-%d" % i: b"value %d" % i for i in range(5)}
        for key, value in self.expected.items():
            server.put(key, value)
        return server

    def assert_writes_refused_reads_served(self, server, reason):
        support.wait_until(lambda: health(server)[0] == 503, 5, 0.05,
                           message="/health 503 once the files are gone")
        self.assertIn(reason, health(server)[1])
        status, _, body = server.request("PUT", "/kv/late", b"never acknowledged")
        self.assertEqual((status, body), (500, b"storage error\n"))
        self.assertIsNone(server.get("late"), "a write answered 500 is visible")
        assert_state(self, server, self.expected, "reads after the files vanished")

    def assert_stopped_with_one_error(self, server, *said):
        self.assertEqual(stop_within(server)[0], 1, server.output())
        self.assertNotIn(TRACEBACK, server.output())
        errors = error_lines(server)
        self.assertEqual(len(errors), 1, server.output())
        for words in said:
            self.assertIn(words, errors[0])
        self.assertNotIn("still holds every", errors[0])

    def test_a_removed_data_directory(self):
        server = self.start_with_writes()
        shutil.rmtree(self.data_dir)
        self.assert_writes_refused_reads_served(server, b"removed")
        self.assert_stopped_with_one_error(server, "nothing was saved", "removed or replaced")
        self.assertFalse(os.path.exists(self.data_dir), "the stop wrote into a new directory")

    def test_a_replaced_data_directory(self):
        server = self.start_with_writes()
        moved = self.data_dir + ".moved"
        self.addCleanup(shutil.rmtree, moved, True)
        os.rename(self.data_dir, moved)
        os.mkdir(self.data_dir)
        self.assert_writes_refused_reads_served(server, b"replaced")
        self.assert_stopped_with_one_error(server, "nothing was saved")
        self.assertEqual(os.listdir(self.data_dir), [], "the stop wrote into another directory")
        # Every acknowledged write went with the directory that was moved away.
        again = self.start_server(data_dir=moved)
        assert_state(self, again, dict(self.expected, late=None))

    def test_a_removed_journal_file(self):
        server = self.start_with_writes()
        for journal in journals(self.data_dir):
            os.unlink(journal)
        self.assert_writes_refused_reads_served(server, b"journal file")
        # The directory is still this server's: the snapshot saves every
        # acknowledged write, and the stop says what failed.
        self.assert_stopped_with_one_error(server, "storage failure", "journal file")
        self.assertIn("Saved", server.output())
        again = self.restart(server)
        assert_state(self, again, dict(self.expected, late=None))


def children(pid):
    """The child processes of `pid`, whichever of its threads started them."""
    found = []
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                found += [int(child) for child in f.read().split()]
        except OSError:
            pass                        # the thread has ended
    return found


def command_line(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def has_open(pid, name):
    try:
        return any(os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith(name)
                   for fd in os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return False


@unittest.skipUnless(os.path.isdir("/proc/self/task"), "needs /proc")
class ChildrenDieWithTheServerTest(support.ServerTestCase):
    """SIGKILL of the server's own process alone, while a child of it is frozen (SIGSTOP).

    A frozen child stands for one that takes long: a checkpoint of a big
    store, a writer in a stalled fsync.  It holds the directory's LOCK; the
    restart must not wait for it.
    """

    def freeze(self, pid):
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.kill_quietly, pid)

    def kill_quietly(self, pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill_alone_and_restart(self, server):
        os.kill(server.proc.pid, signal.SIGKILL)
        server.wait()
        return self.start_server("--lock-wait", "3")

    def test_a_restart_right_after_a_kill_during_a_long_checkpoint_starts(self):
        # Enough keys that a checkpoint's child runs for a moment.
        persistence.write_snapshot(self.data_dir, {"old-%d" % i: b"o" for i in range(300000)})
        server = self.start_server("--checkpoint-bytes", "1000")
        snapshot = os.path.join(os.path.realpath(self.data_dir), persistence.SNAPSHOT_NAME)
        frozen, acked = None, {}

        def checkpoint_child_at_work():
            for child in children(server.proc.pid):
                if b"checkpoint" in command_line(child) and has_open(child, snapshot):
                    return child            # reading or writing: past its start
            return None

        for attempt in range(10):
            server.put("k%d" % attempt, b"x" * 2000)    # past --checkpoint-bytes
            acked["k%d" % attempt] = b"x" * 2000
            try:
                frozen = support.wait_until(checkpoint_child_at_work, 5, 0.002)
                break
            except AssertionError:
                continue
        self.assertIsNotNone(frozen, "no checkpoint child caught at work")
        self.freeze(frozen)
        again = self.kill_alone_and_restart(server)
        assert_state(self, again, dict(acked, **{"old-1": b"o"}))

    def test_a_restart_right_after_a_kill_with_the_journal_writer_stuck_starts(self):
        server = self.start_server()
        acked = {"acked-%d" % i: b"value %d" % i for i in range(5)}
        for key, value in acked.items():
            server.put(key, value)
        [writer] = [child for child in children(server.proc.pid)
                    if b"journal-writer" in command_line(child)]
        self.freeze(writer)
        again = self.kill_alone_and_restart(server)
        assert_state(self, again, acked)


@unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"),
                     "needs root to mount a small tmpfs (a full disk)")
class FullDiskRestartTest(support.ServerTestCase):
    """Journals that outgrow the free space: no checkpoint fits, no stop can save."""

    VALUE = 100 << 10

    def setUp(self):
        super().setUp()
        self.data_dir = mount_tmpfs(self, "8m")
        self.filler = os.path.join(self.data_dir, "filler")

    def fill(self, leave):
        """Fill the file system, then give `leave` bytes back."""
        with open(self.filler, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
            f.truncate(max(0, f.tell() - leave))

    def put_values(self, server, prefix, count):
        for i in range(count):
            server.put("%s-%d" % (prefix, i), bytes([i]) * self.VALUE)
            self.expected["%s-%d" % (prefix, i)] = bytes([i]) * self.VALUE

    def stop_that_cannot_save(self, server):
        self.assertEqual(stop_within(server)[0], 1, server.output())
        errors = error_lines(server)
        self.assertEqual(len(errors), 1, server.output())
        self.assertIn("still holds every acknowledged write", errors[0])
        return len(journals(self.data_dir))

    def test_checkpoints_that_cannot_fit_are_reported_and_restarts_serve(self):
        self.expected = {}
        server = self.start_server("--checkpoint-bytes", str(256 << 10))
        self.put_values(server, "before", 30)                 # a 3 MiB snapshot
        self.fill(leave=1 << 20)
        self.put_values(server, "after", 5)                   # past --checkpoint-bytes
        support.wait_until(lambda: health(server)[0] == 503, 20,
                           message="/health 503: no room for a checkpoint")
        self.assertIn(b"no room for a checkpoint", health(server)[1])
        # Said in the log: by the check before a checkpoint, or, when one was
        # already under way as the disk filled, by the checkpoint that failed.
        # (waited for: the line is written before /health changes, but this
        # process may not have read it yet)
        server.wait_for_line(r"a new snapshot needs about|Checkpoint failed, journal kept: "
                             r".*No space left on device", 10)
        self.stop_that_cannot_save(server)
        self.fill(leave=0)                                    # not a byte left
        files = []
        for restart in range(3):
            server = self.restart(server)
            assert_state(self, server, self.expected, "restart %d on a full disk" % restart)
            files.append(self.stop_that_cannot_save(server))
        # Each start opens a journal; the next one removes it if it stayed empty.
        self.assertEqual(files[1:], files[:-1], "each start left a journal file behind")
        os.unlink(self.filler)
        server = self.restart(server)
        support.wait_until(lambda: health(server)[0] == 200, 30,
                           message="/health 200 once a checkpoint fits again")
        self.assertEqual(stop_within(server)[0], 0, server.output())
        self.assertEqual(journals(self.data_dir), [])


class UnchangedSnapshotTest(support.ServerTestCase):

    def test_a_clean_stop_with_nothing_written_does_not_rewrite_the_snapshot(self):
        server = self.start_server()
        server.put("k", b"v")
        self.assertEqual(stop_within(server)[0], 0, server.output())
        snapshot = os.path.join(self.data_dir, persistence.SNAPSHOT_NAME)
        past = time.time() - 3600
        os.utime(snapshot, (past, past))                # a rewrite would show
        before = file_state(snapshot), os.stat(snapshot).st_ino
        server = self.restart(server)
        self.assertEqual(server.get("k"), b"v")
        self.assertEqual(stop_within(server)[0], 0, server.output())
        self.assertEqual((file_state(snapshot), os.stat(snapshot).st_ino), before,
                         "the snapshot was rewritten")
        self.assertEqual(journals(self.data_dir), [])
        # A write since: the stop saves it.
        server = self.restart(server)
        server.put("k", b"changed")
        self.assertEqual(stop_within(server)[0], 0, server.output())
        self.assertNotEqual(file_state(snapshot), before[0])
        self.assertEqual(persistence.load_snapshot(snapshot), {"k": b"changed"})


if __name__ == "__main__":
    unittest.main()
