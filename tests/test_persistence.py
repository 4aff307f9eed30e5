"""The snapshot and the journal: refusals to start (black-box) and persistence.py (unit).

Black-box: a snapshot that cannot be trusted (damaged, the wrong type, or a
pickle that would run code) makes the server refuse to start with exit 1 and
one line naming the file, and the file is left exactly as it was.

Unit: the journal's record format and its recovery rules (torn tail versus
corruption), load(), group commit, a crash between any two steps of a
checkpoint, and a failed save.  These drive persistence.py and store.py
directly, because a crash at a chosen instant cannot be arranged from outside.
"""
import os
import pickle
import random
import shutil
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

from tests import support
from tests.durability_support import TRACEBACK, WriterFaults, file_state, run_cli

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)
import persistence                                   # noqa: E402
import store as store_module                         # noqa: E402
from persistence import CLEAR, DELETE, PUT           # noqa: E402

NO_CHECKPOINT = 1 << 40      # a checkpoint threshold never reached in these tests


def record(op, key, value=b""):
    return b"".join(persistence.encode_record(op, key, value))


def ignore(message):
    pass


class TempDirTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kvtest-persist-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.log_lines = []

    def log(self, message):
        self.log_lines.append(message)

    def path(self, name):
        return os.path.join(self.dir, name)

    def write(self, name, data):
        with open(self.path(name), "wb") as f:
            f.write(data)
        return self.path(name)


# ------------------------------------------------------ snapshot, black-box --

class Evil:
    """Unpickling this runs a shell command: what a tampered snapshot would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class BadSnapshotTest(TempDirTestCase):

    def assert_refuses_to_start(self, content):
        snapshot = self.write(persistence.SNAPSHOT_NAME, content)
        past = time.time() - 3600                     # so that any rewrite shows in mtime
        os.utime(snapshot, (past, past))
        before = file_state(snapshot)
        result = run_cli(["--host", "127.0.0.1", "--port", "0", "--working-dir", self.dir])
        self.assertEqual(result.code, 1, result)
        self.assertNotIn(TRACEBACK, result.stdout + result.stderr)
        lines = result.lines("stderr")
        self.assertEqual(len(lines), 1, result)
        self.assertIn(os.path.realpath(snapshot), lines[0])
        self.assertEqual(file_state(snapshot), before, "the snapshot was modified")
        return result

    def test_corrupt_snapshots_are_refused_and_left_alone(self):
        good = pickle.dumps({"a": b"1" * 100, "b": b"2" * 100}, protocol=5)
        cases = {
            "random bytes": random.Random(7).randbytes(1000),
            "empty file": b"",
            "truncated pickle": good[:len(good) // 2],
            "truncated by one byte": good[:-1],
            "trailing garbage": good + b"garbage",
            "a list": pickle.dumps([b"a", b"b"], protocol=5),
            "int values": pickle.dumps({"a": 1}, protocol=5),
            "bytes keys": pickle.dumps({b"a": b"1"}, protocol=5),
            "str values": pickle.dumps({"a": "1"}, protocol=5),
            "one str value among bytes": pickle.dumps({"a": b"1", "b": "2", "c": b"3"}, protocol=5),
            "one int key among str": pickle.dumps({"a": b"1", 2: b"2"}, protocol=5),
            "a bytearray value": pickle.dumps({"a": bytearray(b"1")}, protocol=5),
        }
        for name, content in cases.items():
            with self.subTest(name):
                self.assert_refuses_to_start(content)

    def test_malicious_pickle_is_refused_without_running_code(self):
        marker = self.path("pwned")
        payload = pickle.dumps({"k": Evil("touch " + marker)}, protocol=5)
        self.assert_refuses_to_start(payload)
        self.assertFalse(os.path.exists(marker), "loading the snapshot ran its code")

    def test_the_malicious_payload_does_run_code_when_unpickled_naively(self):
        # The test above can fail: an ordinary pickle.loads runs the payload.
        marker = self.path("naive")
        pickle.loads(pickle.dumps({"k": Evil("touch " + marker)}, protocol=5))
        self.assertTrue(os.path.exists(marker))

    def test_load_snapshot_raises_data_error_for_a_malicious_pickle(self):
        marker = self.path("pwned")
        snapshot = self.write("store.pickle", pickle.dumps(Evil("touch " + marker), protocol=5))
        with self.assertRaises(persistence.DataError) as caught:
            persistence.load_snapshot(snapshot)
        self.assertIn(snapshot, str(caught.exception))
        self.assertFalse(os.path.exists(marker))

    def test_a_good_snapshot_loads(self):
        data = {"a": b"1", "bin": bytes(range(256))}
        persistence.write_snapshot(self.dir, data)
        self.assertEqual(persistence.load_snapshot(self.path("store.pickle")), data)
        self.assertEqual(persistence.load_snapshot(self.path("absent.pickle")), {})


class SnapshotChecksumTest(TempDirTestCase):
    """The snapshot's trailer: its pickle's length and CRC32 (persistence.dump_snapshot)."""

    DATA = {"a": b"1" * 100, "bin": bytes(range(256)), "empty-ish": b"\0"}

    def saved(self):
        persistence.write_snapshot(self.dir, self.DATA)
        path = self.path(persistence.SNAPSHOT_NAME)
        with open(path, "rb") as f:
            return path, f.read()

    def test_a_snapshot_is_still_a_pickle_with_a_checksum_after_it(self):
        path, content = self.saved()
        self.assertEqual(pickle.loads(content), self.DATA)
        self.assertEqual(persistence.check_snapshot(path), (3, len(content), True))

    def test_every_flipped_bit_is_refused(self):
        path, content = self.saved()
        for position in range(len(content)):
            with self.subTest(position=position):
                damaged = bytearray(content)
                damaged[position] ^= 1 << position % 8
                self.write(persistence.SNAPSHOT_NAME, damaged)
                with self.assertRaises(persistence.DataError) as caught:
                    persistence.load_snapshot(path)
                self.assertIn(path, str(caught.exception))

    def test_a_snapshot_cut_short_is_refused(self):
        path, content = self.saved()
        whole_pickle = len(content) - 20             # the trailer: 20 bytes
        for cut in range(len(content)):
            with self.subTest(cut=cut):
                self.write(persistence.SNAPSHOT_NAME, content[:cut])
                if cut == whole_pickle:             # the pickle whole, as before checksums
                    self.assertEqual(persistence.load_snapshot(path), self.DATA)
                    continue
                with self.assertRaises(persistence.DataError):
                    persistence.load_snapshot(path)

    def test_a_snapshot_without_a_checksum_still_loads(self):
        path = self.write(persistence.SNAPSHOT_NAME, pickle.dumps(self.DATA, protocol=5))
        self.assertEqual(persistence.load_snapshot(path), self.DATA)
        self.assertEqual(persistence.check_snapshot(path)[2], False)

    def test_dump_snapshot_streams_frame_by_frame(self):
        writes = []

        class Stream:                   # as GET /snapshot's stream: write() only
            def write(self, data):
                writes.append(bytes(data))
                return len(data)

        data = {"k%d" % i: bytes([i % 256]) * 1000 for i in range(3000)}
        size = persistence.dump_snapshot(data, Stream())
        self.assertGreater(len(writes), 10, "the pickle was not written frame by frame")
        self.assertEqual(size, sum(map(len, writes)))
        path = self.write("backup.pickle", b"".join(writes))
        self.assertEqual(persistence.check_snapshot(path), (3000, size, True))
        self.assertEqual(persistence.load_snapshot(path), data)


# --------------------------------------- links and modes in the data dir, black-box --

class DataDirectorySafetyTest(TempDirTestCase):
    """Nothing in the data directory is followed or opened unless it is a regular file."""

    def setUp(self):
        super().setUp()
        self.outside = tempfile.mkdtemp(prefix="kvtest-outside-")
        self.addCleanup(shutil.rmtree, self.outside, True)
        self.victim = os.path.join(self.outside, "victim")
        with open(self.victim, "wb") as f:
            f.write(b"precious, not the server's")
        self.victim_state = file_state(self.victim)

    def plant(self, name, make):
        """make(path of `name`), after removing the LOCK that an earlier start left."""
        if os.path.isfile(self.path("LOCK")):
            os.unlink(self.path("LOCK"))
        make(self.path(name))

    def assert_refused(self, name, reason):
        result = run_cli(["--host", "127.0.0.1", "--port", "0", "--working-dir", self.dir])
        self.assertEqual(result.code, 1, result)
        self.assertNotIn(TRACEBACK, result.stdout + result.stderr)
        lines = result.lines("stderr")
        self.assertEqual(len(lines), 1, result)
        self.assertIn(os.path.join(os.path.realpath(self.dir), name), lines[0])
        self.assertRegex(lines[0], reason)
        self.assertEqual(file_state(self.victim), self.victim_state)

    def test_a_symlink_or_a_device_as_a_data_file_is_refused(self):
        journal = os.path.basename(persistence.journal_path(self.dir, 3))
        for name in (persistence.SNAPSHOT_NAME, journal, "LOCK"):
            for target, reason in ((self.victim, "symbolic link"),
                                   ("/dev/zero", "symbolic link")):
                with self.subTest(name=name, target=target):
                    self.plant(name, lambda path: os.symlink(target, path))
                    self.assert_refused(name, reason)
                    os.unlink(self.path(name))

    def test_a_fifo_or_a_directory_as_a_data_file_is_refused(self):
        journal = os.path.basename(persistence.journal_path(self.dir, 3))
        for name in (persistence.SNAPSHOT_NAME, journal, "LOCK"):
            for make in (os.mkfifo, os.mkdir):
                with self.subTest(name=name, kind=make.__name__):
                    self.plant(name, make)
                    self.assert_refused(name, "not a regular file|Is a directory")
                    os.rmdir(self.path(name)) if make is os.mkdir else os.unlink(self.path(name))

    def test_a_link_planted_at_the_temporary_snapshot_is_removed_not_followed(self):
        os.symlink(self.victim, self.path(persistence.SNAPSHOT_NAME + ".tmp"))
        with support.ServerProcess(self.dir) as server:
            server.put("k", b"v")
            self.assertEqual(server.stop(), 0, server.output())
        self.assertEqual(file_state(self.victim), self.victim_state)
        self.assertFalse(os.path.lexists(self.path(persistence.SNAPSHOT_NAME + ".tmp")))
        self.assertEqual(persistence.load_snapshot(self.path(persistence.SNAPSHOT_NAME)),
                         {"k": b"v"})

    def test_the_data_directory_is_created_0700_and_files_0600_under_umask_0(self):
        data = os.path.join(self.dir, "parent", "data")
        old = os.umask(0)
        try:
            server = support.ServerProcess(data).start()
        finally:
            os.umask(old)
        with server:
            server.put("k", b"v")
            self.assertEqual(os.stat(data).st_mode & 0o777, 0o700)
            self.assertEqual(server.stop(), 0, server.output())
        names = os.listdir(data)
        self.assertIn(persistence.SNAPSHOT_NAME, names)
        for name in names:
            with self.subTest(name=name):
                self.assertEqual(os.stat(os.path.join(data, name)).st_mode & 0o777, 0o600)


# ------------------------------------------------------- journal records, unit --

class RecordTest(TempDirTestCase):

    OPS = [(PUT, "a", b"1"), (PUT, "bin", bytes(range(256)) * 2), (PUT, "b", b"2"),
           (DELETE, "a", b""), (CLEAR, "", b""), (PUT, "c", b"\x00\r\n3"),
           (PUT, "c", b"overwritten"), (DELETE, "never-there", b"")]

    def expected_after(self, ops):
        data = {}
        for op, key, value in ops:
            persistence.apply(data, op, key, value)
        return data

    def test_round_trip(self):
        buf = b"".join(record(*op) for op in self.OPS)
        for prefix in range(len(self.OPS) + 1):
            with self.subTest(records=prefix):
                part = b"".join(record(*op) for op in self.OPS[:prefix])
                data = {"old": b"x"}
                count, end = persistence.scan_journal(part, data, "j")
                self.assertEqual((count, end), (prefix, len(part)))
                self.assertEqual(data, self.expected_after([(PUT, "old", b"x")] + self.OPS[:prefix]))
        self.assertEqual(persistence.scan_journal(buf, {}, "j")[0], len(self.OPS))

    def test_empty_journal(self):
        data = {"k": b"v"}
        self.assertEqual(persistence.scan_journal(b"", data, "j"), (0, 0))
        self.assertEqual(data, {"k": b"v"})

    def test_a_large_value(self):
        value = random.Random(1).randbytes(3 << 20)
        data = {}
        buf = record(PUT, "big", value)
        self.assertEqual(persistence.scan_journal(buf, data, "j"), (1, len(buf)))
        self.assertEqual(data["big"], value)

    def test_torn_tail_of_every_length(self):
        ops = [(PUT, "a", b"1"), (DELETE, "x", b""), (PUT, "last", b"L" * 40)]
        records = [record(*op) for op in ops]
        start = len(records[0]) + len(records[1])
        buf = b"".join(records)
        for cut in range(start + 1, len(buf)):
            with self.subTest(cut=cut):
                data = {}
                count, end = persistence.scan_journal(buf[:cut], data, "j")
                self.assertEqual((count, end), (2, start))
                self.assertEqual(data, {"a": b"1"})
        # a torn CLEAR or DELETE (no value) too
        for op in [(CLEAR, "", b""), (DELETE, "a", b"")]:
            tail = record(*op)
            for cut in range(1, len(tail)):
                data = {}
                self.assertEqual(persistence.scan_journal(buf + tail[:cut], data, "j"),
                                 (3, len(buf)))
                self.assertEqual(data, {"a": b"1", "last": b"L" * 40})

    def test_damaged_payload_of_the_last_record_is_a_torn_tail(self):
        buf = record(PUT, "a", b"1") + record(PUT, "b", b"2" * 30)
        start = len(record(PUT, "a", b"1"))
        for position in range(start + 12, len(buf)):       # payload bytes of the last one
            with self.subTest(position=position):
                damaged = bytearray(buf)
                damaged[position] ^= 0x55
                data = {}
                self.assertEqual(persistence.scan_journal(bytes(damaged), data, "j"), (1, start))
                self.assertEqual(data, {"a": b"1"})

    def test_zero_filled_tail_is_torn(self):
        buf = record(PUT, "a", b"1") + record(PUT, "b", b"2")
        for zeros in (1, 11, 12, 13, 100, 4096):
            with self.subTest(zeros=zeros):
                data = {}
                self.assertEqual(persistence.scan_journal(buf + bytes(zeros), data, "j"),
                                 (2, len(buf)))
                self.assertEqual(data, {"a": b"1", "b": b"2"})
        self.assertEqual(persistence.scan_journal(bytes(64), {}, "j"), (0, 0))

    def test_partial_last_record_then_zeros_is_torn(self):
        # A power loss on a file system that had extended the file but not
        # written all its blocks: part of the last record, then zeros.
        good = record(PUT, "a", b"1")
        last = record(PUT, "b", b"B" * 100)
        for kept in (20, 40, len(last) - 1):
            with self.subTest(kept=kept):
                buf = good + last[:kept] + bytes(4096 - len(good) - kept)
                data = {}
                self.assertEqual(persistence.scan_journal(buf, data, "j"), (1, len(good)))
                self.assertEqual(data, {"a": b"1"})

    def test_flipped_byte_in_a_middle_record_is_corruption_naming_the_offset(self):
        first, middle, last = (record(PUT, "a", b"1"), record(PUT, "middle", b"M" * 20),
                               record(DELETE, "a"))
        buf = first + middle + last
        offset = len(first)
        for position in range(offset, offset + len(middle)):
            for flip in (0x01, 0x80, 0xFF):
                with self.subTest(position=position, flip=flip):
                    damaged = bytearray(buf)
                    damaged[position] ^= flip
                    with self.assertRaises(persistence.DataError) as caught:
                        persistence.scan_journal(bytes(damaged), {}, "/some/journal.log")
                    message = str(caught.exception)
                    self.assertIn("/some/journal.log", message)
                    self.assertIn("offset %d" % offset, message)

    def test_flipped_byte_in_the_first_record_is_corruption(self):
        buf = record(PUT, "a", b"1") + record(PUT, "b", b"2")
        for position in range(len(record(PUT, "a", b"1"))):
            damaged = bytearray(buf)
            damaged[position] ^= 0xFF
            with self.assertRaises(persistence.DataError) as caught:
                persistence.scan_journal(bytes(damaged), {}, "j")
            self.assertIn("offset 0", str(caught.exception))


class TornWriteTest(TempDirTestCase):
    """A power cut tears the last write out of page order (LazyFS "torn-op").

    The rule: damage that no valid record follows is a torn tail (truncate,
    serve); damage that a valid record follows is corruption (refuse).  The
    journals here are built byte by byte.
    """

    PAGE = 4096

    def setUp(self):
        super().setUp()
        self.before = record(PUT, "a", b"1") + record(DELETE, "x") + record(PUT, "b", b"2" * 50)
        self.expected = {"a": b"1", "b": b"2" * 50}

    def assert_torn_at(self, buf, offset):
        data = {}
        self.assertEqual(persistence.scan_journal(bytes(buf), data, "j"), (3, offset))
        self.assertEqual(data, self.expected)

    def assert_corrupt_at(self, buf, offset):
        with self.assertRaises(persistence.DataError) as caught:
            persistence.scan_journal(bytes(buf), {}, "/the/journal.log")
        self.assertIn("/the/journal.log", str(caught.exception))
        self.assertIn("offset %d" % offset, str(caught.exception))

    def test_a_large_last_write_with_any_of_its_pages_lost_is_a_torn_tail(self):
        # The last write's bytes, cut at the file's page boundaries: the
        # pieces a file system writes back independently.  Any of them may
        # be lost (zeros, or the blocks' old bytes) while later ones land.
        last = record(PUT, "big", bytes(range(256)) * (self.PAGE * 3 // 256))
        start = len(self.before)
        cuts = [start] + list(range(self.PAGE, start + len(last), self.PAGE)) + [start + len(last)]
        pieces = [last[a - start:b - start] for a, b in zip(cuts, cuts[1:])]
        self.assertEqual(len(pieces), 4)
        garbage = random.Random(5).randbytes(self.PAGE)
        for lost in range(1, 1 << len(pieces)):
            for filler in ("zeros", "garbage"):
                with self.subTest(lost=bin(lost), filler=filler):
                    torn = b"".join(
                        (bytes(len(piece)) if filler == "zeros" else garbage[:len(piece)])
                        if lost >> i & 1 else piece for i, piece in enumerate(pieces))
                    self.assert_torn_at(self.before + torn, start)

    def test_a_damaged_header_that_nothing_valid_follows_is_a_torn_tail(self):
        last = record(PUT, "last", b"L" * 40)
        for position in range(12):
            with self.subTest(position=position):
                damaged = bytearray(self.before + last)
                damaged[len(self.before) + position] ^= 0x41
                self.assert_torn_at(damaged, len(self.before))

    def test_a_damaged_payload_then_garbage_is_a_torn_tail(self):
        last = bytearray(record(PUT, "last", b"L" * 40))
        last[20] ^= 0x08
        garbage = random.Random(9).randbytes(3000)
        self.assert_torn_at(self.before + last + garbage, len(self.before))

    def test_garbage_after_the_last_record_is_a_torn_tail(self):
        for seed in range(20):
            with self.subTest(seed=seed):
                garbage = random.Random(seed).randbytes(random.Random(seed).randrange(1, 5000))
                self.assert_torn_at(self.before + garbage, len(self.before))

    def test_a_zeroed_page_followed_by_valid_records_is_corruption(self):
        rest = b"".join(record(PUT, "k%d" % i, b"v" * 300) for i in range(40))
        buf = bytearray(self.before + rest)
        buf[self.PAGE:2 * self.PAGE] = bytes(self.PAGE)
        offset = len(self.before)                      # where the damaged record starts
        for i in range(40):
            following = offset + len(record(PUT, "k%d" % i, b"v" * 300))
            if following > self.PAGE:
                break
            offset = following
        self.assert_corrupt_at(buf, offset)

    def test_a_damaged_header_followed_by_a_valid_record_is_corruption(self):
        middle, after = record(PUT, "m", b"M" * 30), record(PUT, "after", b"A")
        for position in (0, 3, 5, 11):
            for filler in (b"", bytes(100), random.Random(1).randbytes(100)):
                with self.subTest(position=position, filler=len(filler)):
                    damaged = bytearray(self.before + middle + filler + after)
                    damaged[len(self.before) + position] ^= 0x10
                    self.assert_corrupt_at(damaged, len(self.before))

    def test_a_valid_record_at_an_odd_offset_in_the_garbage_is_found(self):
        garbage = random.Random(4).randbytes(777)
        buf = self.before + garbage + record(PUT, "late", b"z" * 256)
        self.assert_corrupt_at(buf, len(self.before))
        self.assertEqual(persistence.find_valid_record(buf, len(self.before)),
                         len(self.before) + len(garbage))

    def test_a_value_holding_journal_bytes_torn_short_is_a_torn_tail(self):
        # A valid header is trusted for the length: records inside a value
        # that a crash cut short are not mistaken for records that follow.
        inner = b"".join(record(PUT, "inner%d" % i, b"i" * 20) for i in range(10))
        last = record(PUT, "journal-copy", inner * 3)
        for cut in (30, len(last) // 2, len(last) - 1):
            with self.subTest(cut=cut):
                self.assert_torn_at(self.before + last[:cut], len(self.before))

    def test_load_truncates_a_torn_write_and_refuses_corruption_untouched(self):
        path = persistence.journal_path(self.dir, 1)
        torn = self.before + bytes(100) + b"\xff" * 50        # zeros then stale bytes
        with open(path, "wb") as f:
            f.write(torn)
        data, _, replayed = persistence.load(self.dir, self.log)
        self.assertEqual((data, replayed), (self.expected, 3))
        self.assertEqual(os.path.getsize(path), len(self.before))
        corrupt = self.before + bytes(100) + record(PUT, "c", b"3")
        with open(path, "wb") as f:
            f.write(corrupt)
        before = file_state(path)
        with self.assertRaises(persistence.DataError):
            persistence.load(self.dir, self.log)
        self.assertEqual(file_state(path), before)


# ---------------------------------------------------- journals with rounds, unit --

def round_journal(rounds, synced=None):
    """A journal with rounds, as the writer builds one: (its bytes, the offset of each round).

    `rounds`: lists of (op, key, value).  `synced`: what each round says was
    fsynced when it was written; None: everything before it (--fsync always).
    """
    buf = bytearray(persistence.JOURNAL_MAGIC)
    starts = []
    for ops in rounds:
        starts.append(len(buf))
        records = [record(*op) for op in ops]
        buf += b"".join(persistence.encode_round(len(buf), len(buf) if synced is None else synced,
                                                 records))
    return bytes(buf), starts


class RoundsTest(TempDirTestCase):
    """Journals in rounds: a round torn in any order, when nothing says it was fsynced, is cut."""

    PAGE, SECTOR = 4096, 512
    ROUNDS = [[(PUT, "a", b"1"), (PUT, "b", b"2")], [(DELETE, "a", b"")],
              [(PUT, "c", b"3" * 100), (CLEAR, "", b""), (PUT, "d", b"4")]]

    def assert_torn_at(self, buf, offset, records, expected):
        data = {}
        self.assertEqual(persistence.scan_journal(bytes(buf), data, "j"), (records, offset))
        self.assertEqual(data, expected)

    def assert_corrupt_at(self, buf, offset, following):
        with self.assertRaises(persistence.DataError) as caught:
            persistence.scan_journal(bytes(buf), {}, "/the/journal.log")
        message = str(caught.exception)
        self.assertIn("/the/journal.log", message)
        self.assertIn("offset %d," % offset, message)
        self.assertIn("follows at offset %d" % following, message)

    def test_round_trip(self):
        buf, _ = round_journal(self.ROUNDS)
        self.assert_torn_at(buf, len(buf), 6, {"d": b"4"})

    def test_the_writer_writes_a_header_then_a_round_per_group(self):
        journal = persistence.Journal(self.dir, 1, "always")
        for i in range(3):
            journal.append((PUT, "k%d" % i, b"v%d" % i))
            journal.commit()
        journal.close()
        with open(persistence.journal_path(self.dir, 1), "rb") as f:
            buf = f.read()
        self.assertTrue(buf.startswith(persistence.JOURNAL_MAGIC))
        offset, rounds = len(persistence.JOURNAL_MAGIC), 0
        while offset < len(buf):
            length, synced, _ = persistence._read_marker(buf, offset)
            self.assertEqual(synced, offset, "under always, all before a round is fsynced")
            offset += persistence.MARKER_SIZE + length
            rounds += 1
        self.assertEqual(rounds, 3)
        self.assert_torn_at(buf, len(buf), 3, {"k0": b"v0", "k1": b"v1", "k2": b"v2"})

    def torn_last_rounds(self, grain):
        """(before, start, variants): a journal, and its last round torn at `grain` in many orders."""
        before, _ = round_journal(self.ROUNDS)
        start = len(before)
        last = b"".join(persistence.encode_round(start, start, [
            record(PUT, "big%d" % i, bytes([65 + i]) * 1000) for i in range(12)]))
        cuts = [start] + list(range((start // grain + 1) * grain, start + len(last), grain))
        cuts.append(start + len(last))
        pieces = [last[a - start:b - start] for a, b in zip(cuts, cuts[1:])]
        rng = random.Random(grain)
        lost_sets = [{i} for i in range(len(pieces))] + [
            {i for i in range(len(pieces)) if rng.random() < 0.5} or {0} for _ in range(40)]
        garbage = rng.randbytes(grain)
        variants = []
        for lost in lost_sets:
            for filler in (bytes(grain), garbage):
                torn = b"".join(filler[:len(p)] if i in lost else p for i, p in enumerate(pieces))
                variants.append(("lost %s, %s" % (sorted(lost), "zeros" if filler[0] == 0
                                                   else "garbage"), torn))
            # the file cut short at the end of a lost piece, as a torn size would
            end = max(lost)
            variants.append(("lost %s, cut" % sorted(lost), b"".join(
                bytes(len(p)) if i in lost else p for i, p in enumerate(pieces[:end + 1]))))
        return before, start, variants

    def test_a_torn_last_round_in_any_page_or_sector_order_is_a_torn_tail(self):
        for grain in (self.PAGE, self.SECTOR):
            before, start, variants = self.torn_last_rounds(grain)
            for name, torn in variants:
                with self.subTest(grain=grain, torn=name):
                    self.assert_torn_at(before + torn, start, 6, {"d": b"4"})

    def test_damage_before_the_last_round_is_corruption(self):
        buf, starts = round_journal(self.ROUNDS + [[(PUT, "e", b"5")]])
        for position in range(starts[1], starts[2]):
            with self.subTest(position=position):
                damaged = bytearray(buf)
                damaged[position] ^= 0x40
                self.assert_corrupt_at(damaged, starts[1], starts[2])

    def test_a_lost_sector_in_a_middle_round_is_corruption(self):
        big = [(PUT, "big%d" % i, bytes([65 + i]) * 1000) for i in range(6)]
        buf, starts = round_journal([self.ROUNDS[0], big, self.ROUNDS[1]])
        damaged = bytearray(buf)
        damaged[starts[1] + 1000:starts[1] + 1000 + self.SECTOR] = bytes(self.SECTOR)
        self.assert_corrupt_at(damaged, starts[1], starts[2])

    def everysec_journal(self):
        """Rounds 0 and 1 fsynced; rounds 2, 3, 4 written after the last fsync (everysec)."""
        buf = bytearray(persistence.JOURNAL_MAGIC)
        starts = []
        for i, ops in enumerate(self.ROUNDS + [[(PUT, "e", b"5")], [(PUT, "f", b"6")]]):
            starts.append(len(buf))
            synced = len(buf) if i <= 2 else starts[2]
            buf += b"".join(persistence.encode_round(len(buf), synced, [record(*op) for op in ops]))
        return buf, starts

    def test_everysec_rounds_written_since_the_last_fsync_may_all_be_torn(self):
        buf, starts = self.everysec_journal()
        damaged = bytearray(buf)
        damaged[starts[2] + 30] ^= 1                # rounds 3 and 4 are whole, but unsynced
        self.assert_torn_at(damaged, starts[2], 3, {"b": b"2"})
        self.assertIn("2 whole round(s) after it",
                      persistence.describe_tail(bytes(damaged), starts[2]))
        damaged = bytearray(buf)
        damaged[starts[1] + 30] ^= 1                # round 2 says round 1 was fsynced
        self.assert_corrupt_at(damaged, starts[1], starts[2])

    def test_under_no_nothing_is_known_fsynced(self):
        buf, starts = round_journal(self.ROUNDS, synced=len(persistence.JOURNAL_MAGIC))
        damaged = bytearray(buf)
        damaged[starts[0] + 50] ^= 1
        self.assert_torn_at(damaged, starts[0], 0, {})

    def test_a_sound_round_whose_records_do_not_parse_is_corruption(self):
        buf, starts = round_journal(self.ROUNDS)
        garbage = record(PUT, "x", b"y")[:-1] + b"\xff" * 20     # a length that overruns
        buf += b"".join(persistence.encode_round(len(buf), len(buf), [garbage]))
        with self.assertRaises(persistence.DataError) as caught:
            persistence.scan_journal(buf, {}, "j")
        self.assertIn("written wrong", str(caught.exception))

    def test_a_torn_header_is_a_torn_tail_and_a_damaged_one_corruption(self):
        magic = persistence.JOURNAL_MAGIC
        for cut in range(1, len(magic)):
            self.assert_torn_at(magic[:cut], 0, 0, {})
        buf, _ = round_journal(self.ROUNDS)
        damaged = bytearray(buf)
        damaged[3] ^= 0x20              # the header is fsynced before any round is written
        with self.assertRaises(persistence.DataError):
            persistence.scan_journal(bytes(damaged), {}, "j")

    def test_load_replays_old_and_new_journals_cuts_torn_rounds_and_drops_empty_files(self):
        old = persistence.journal_path(self.dir, 1)
        with open(old, "wb") as f:                  # written before rounds
            f.write(record(PUT, "old", b"o") + record(PUT, "d", b"old"))
        new, starts = round_journal(self.ROUNDS + [[(PUT, "torn", b"t" * 600)]])
        torn = bytearray(new)
        torn[starts[-1]:starts[-1] + 20] = bytes(20)    # its first bytes never landed
        with open(persistence.journal_path(self.dir, 2), "wb") as f:
            f.write(torn)
        first_only, _ = round_journal([[(PUT, "lost", b"l")]])
        with open(persistence.journal_path(self.dir, 3), "wb") as f:
            f.write(first_only[:-3])                # its only round torn: nothing left
        open(persistence.journal_path(self.dir, 4), "wb").close()   # a start's, never written
        data, generation, replayed = persistence.load(self.dir, self.log)
        self.assertEqual((data, generation, replayed), ({"d": b"4"}, 5, 8))
        self.assertEqual(os.path.getsize(persistence.journal_path(self.dir, 2)), starts[-1])
        self.assertEqual(persistence.journal_generations(self.dir), [1, 2])
        cut = [l for l in self.log_lines if "torn round at offset %d" % starts[-1] in l]
        self.assertEqual(len(cut), 1, self.log_lines)
        self.assertIn("Removed 2 journal file(s)", "\n".join(self.log_lines))


class VanishedFilesTest(TempDirTestCase):
    """The directory or the journal file removed under a journal: writes fail, reads go on."""

    def setUp(self):
        super().setUp()
        self.journal = persistence.Journal(self.dir, 1, "always")
        self.store = store_module.Store({}, self.journal, NO_CHECKPOINT, self.log)
        self.store.put("a", b"1")

    def test_a_removed_directory_fails_writes_but_not_the_store(self):
        shutil.rmtree(self.dir)
        support.wait_until(self.store.write_problem, 5, message="the writer's check")
        self.assertIn("removed or replaced", self.store.write_problem())
        self.assertEqual(self.store.storage_failure(), self.store.write_problem())
        self.assertFalse(self.store.fatal.is_set(), "reads must go on: no shutdown")
        with self.assertRaises(OSError):
            self.store.put("b", b"2")
        self.assertEqual((self.store.get("a"), self.store.get("b")), (b"1", None))
        self.store.seal()
        with self.assertRaises(OSError) as caught:
            self.store.save_and_close()
        self.assertIn("nothing was saved", str(caught.exception))
        self.assertFalse(os.path.exists(self.dir))

    def test_a_write_into_a_removed_journal_file_is_never_acknowledged(self):
        os.unlink(persistence.journal_path(self.dir, 1))
        with self.assertRaises(OSError):            # at once: its group finds the file gone
            self.store.put("b", b"2")
        self.assertIsNone(self.store.get("b"))
        self.assertIn("journal file", self.store.storage_failure())
        self.assertFalse(self.store.fatal.is_set())
        self.store.seal()
        self.store.save_and_close()                 # the directory is still ours
        self.assertEqual(persistence.load(self.dir, self.log)[0], {"a": b"1"})


# ---------------------------------------------------------------- load(), unit --

class LoadTest(TempDirTestCase):

    def journal_file(self, generation, content):
        path = persistence.journal_path(self.dir, generation)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_load_truncates_a_torn_tail_and_logs_it(self):
        persistence.write_snapshot(self.dir, {"snap": b"s", "a": b"old"})
        good = record(PUT, "a", b"new") + record(DELETE, "snap")
        torn = record(PUT, "torn", b"t" * 50)[:30]
        path = self.journal_file(3, good + torn)
        data, generation, replayed = persistence.load(self.dir, self.log)
        self.assertEqual(data, {"a": b"new"})
        self.assertEqual((generation, replayed), (4, 2))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), good)
        mentions = [l for l in self.log_lines if path in l and str(len(good)) in l]
        self.assertEqual(len(mentions), 1, self.log_lines)
        # and a second load finds nothing more to do
        self.log_lines.clear()
        self.assertEqual(persistence.load(self.dir, self.log)[0], {"a": b"new"})
        self.assertFalse([l for l in self.log_lines if path in l], self.log_lines)

    def test_journals_replay_in_generation_order_over_the_snapshot(self):
        persistence.write_snapshot(self.dir, {"k": b"snap", "other": b"o"})
        self.journal_file(9, record(PUT, "k", b"nine"))
        self.journal_file(10, record(PUT, "k", b"ten") + record(CLEAR, ""))
        self.journal_file(11, record(PUT, "k", b"eleven"))
        self.write("store.pickle.tmp", b"half a snapshot being written")
        data, generation, replayed = persistence.load(self.dir, self.log)
        self.assertEqual(data, {"k": b"eleven"})
        self.assertEqual((generation, replayed), (12, 4))

    def test_empty_directory(self):
        self.assertEqual(persistence.load(self.dir, self.log), ({}, 1, 0))

    def test_corruption_in_a_later_journal_modifies_nothing(self):
        persistence.write_snapshot(self.dir, {"snap": b"s"})
        earlier = self.journal_file(1, record(PUT, "a", b"1") + record(PUT, "b", b"2")[:9])
        middle = bytearray(record(PUT, "m", b"M" * 10))
        middle[15] ^= 0xFF
        later = self.journal_file(2, record(PUT, "c", b"3") + bytes(middle) + record(DELETE, "c"))
        before = {name: file_state(self.path(name)) for name in os.listdir(self.dir)}
        with self.assertRaises(persistence.DataError) as caught:
            persistence.load(self.dir, self.log)
        self.assertIn(later, str(caught.exception))
        self.assertIn("offset %d" % len(record(PUT, "c", b"3")), str(caught.exception))
        after = {name: file_state(self.path(name)) for name in os.listdir(self.dir)}
        self.assertEqual(after, before, "a refused load modified files")
        self.assertIn(os.path.basename(earlier), after)


class LedgerTest(TempDirTestCase):
    """Deadlines, batches and the revision, in the journal and the snapshot."""

    def test_records_with_deadlines_batches_and_expiries_replay_with_their_revision(self):
        ops = [(PUT, "a", b"1", 1000), (PUT, "b", b"2", None), (PUT, "c", b"3", 3000),
               (persistence.BATCH, "", b"", ((PUT, "d", b"4", 4000), (DELETE, "b", b"", None),
                                             (PUT, "c", b"33", None))),
               (persistence.EXPIRE, "a", b"", None)]
        # Only journals with rounds hold them: those without are from before.
        records = [b"".join(persistence.encode_record(*op)) for op in ops]
        buf = persistence.JOURNAL_MAGIC + b"".join(persistence.encode_round(
            len(persistence.JOURNAL_MAGIC), 16, records))
        data, ledger = {}, persistence.Ledger(10)
        self.assertEqual(persistence.scan_journal(buf, data, "j", ledger), (5, len(buf)))
        self.assertEqual(data, {"c": b"33", "d": b"4"})
        self.assertEqual(ledger.deadlines, {"d": 4000})
        self.assertEqual(ledger.revision, 15)

    def test_no_record_is_written_with_an_empty_buffer(self):
        # Python 3.12.1's writelines() spins on an empty buffer, on the loop
        # that serves the clients: a batch's deletes have empty values.
        for op in [(PUT, "a", b"v", None), (PUT, "a", b"v", 5), (DELETE, "a", b"", None),
                   (persistence.EXPIRE, "a", b"", None), (CLEAR, "", b"", None),
                   (persistence.BATCH, "", b"", ((DELETE, "a", b"", None),
                                                 (PUT, "b", b"v", 7), (DELETE, "c", b"", None)))]:
            with self.subTest(op=op[0]):
                self.assertTrue(all(persistence.encode_record(*op)))

    def test_a_malformed_batch_in_a_sound_round_is_corruption(self):
        good = persistence.encode_record(persistence.BATCH, "", b"", ((PUT, "k", b"v", None),))
        payload = bytearray(b"".join(good)[12:])
        payload[-2:] = b"\xff\xff"     # the part's value runs past the record
        header_crc = persistence._LENGTH_CRC.pack(len(payload), persistence.zlib.crc32(payload))
        bad = header_crc + persistence.struct.pack("<I", persistence.zlib.crc32(header_crc))
        buf = persistence.JOURNAL_MAGIC + b"".join(persistence.encode_round(
            len(persistence.JOURNAL_MAGIC), 16, [bad + bytes(payload)]))
        with self.assertRaises(persistence.DataError):
            persistence.scan_journal(buf, {}, "j", persistence.Ledger())

    def test_the_snapshot_keeps_the_ledger_and_stays_a_pickle_of_the_dict(self):
        data = {"a": b"1", "b": b"2"}
        persistence.write_snapshot(self.dir, data, persistence.Ledger(7, {"a": 5000, "gone": 1}),
                                   through=3)
        path = self.path("store.pickle")
        with open(path, "rb") as f:
            self.assertEqual(pickle.load(f), data)
        ledger = persistence.Ledger()
        self.assertEqual(persistence.load_snapshot(path, ledger), data)
        self.assertEqual((ledger.revision, ledger.deadlines, ledger.through), (7, {"a": 5000}, 3))
        self.assertEqual(persistence.check_snapshot(path)[:1], (2,))

    def test_a_malformed_ledger_refuses_the_start(self):
        for ledger in ({"revision": "7", "through": 0, "deadlines": {}}, {"revision": 1},
                       {"revision": 1, "through": 0, "deadlines": {"a": "soon"}}, [1, 2]):
            with self.subTest(ledger=ledger):
                body = pickle.dumps({"a": b"1"}, protocol=5) + pickle.dumps(ledger, protocol=5)
                self.write("store.pickle", body)
                with self.assertRaises(persistence.DataError):
                    persistence.load_snapshot(self.path("store.pickle"), persistence.Ledger())

    def test_load_skips_the_journals_the_snapshot_holds(self):
        persistence.write_snapshot(self.dir, {"a": b"snap"}, persistence.Ledger(5), through=4)
        for generation, value in ((3, b"three"), (4, b"four"), (5, b"five")):
            with open(persistence.journal_path(self.dir, generation), "wb") as f:
                f.write(record(PUT, "g%d" % generation, value))
        ledger = persistence.Ledger()
        data, generation, replayed = persistence.load(self.dir, self.log, ledger)
        self.assertEqual(data, {"a": b"snap", "g5": b"five"})
        self.assertEqual((generation, replayed, ledger.revision), (6, 1, 6))

    def test_the_next_journal_follows_the_snapshot_when_none_is_left(self):
        persistence.write_snapshot(self.dir, {"a": b"1"}, persistence.Ledger(2), through=9)
        self.assertEqual(persistence.load(self.dir, self.log)[1], 10)


# ----------------------------------------------- journal order, unit --

class RecordingDict(dict):
    """A dict that logs every change made to it, in order."""

    def __init__(self):
        super().__init__()
        self.changes = []

    def __setitem__(self, key, value):
        self.changes.append(("put", key, value))
        super().__setitem__(key, value)

    def pop(self, key, *default):
        self.changes.append(("delete", key))
        return super().pop(key, *default)

    def clear(self):
        self.changes.append(("clear",))
        super().clear()


class JournalOrderTest(TempDirTestCase):
    """The journal's order is the dict's order: one lock covers both."""

    def test_the_journal_replays_the_changes_in_the_order_they_were_applied(self):
        # Threads overwrite a few shared keys, delete and clear, as fast as
        # they can; a tiny switch interval makes the GIL change hands between
        # almost any two bytecodes.  If appending and applying were not one
        # critical section, two writers could journal in one order and
        # apply in the other.
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        self.addCleanup(sys.setswitchinterval, old_interval)
        live = RecordingDict()
        journal = persistence.Journal(self.dir, 1, "no")
        store = store_module.Store(live, journal, 1 << 40, self.log)

        def writer(t):
            for n in range(300):
                key = "k%d" % (n % 4)
                if n % 50 == 49:
                    store.clear()
                elif n % 7 == 0:
                    store.delete(key)
                else:
                    store.put(key, b"%d-%d" % (t, n))

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        journal.sync()
        replayed = RecordingDict()
        with open(persistence.journal_path(self.dir, 1), "rb") as f:
            count, _ = persistence.scan_journal(f.read(), replayed, "journal")
        self.assertEqual(count, 8 * 300)
        self.assertEqual(len(live.changes), 8 * 300)
        self.assertEqual(replayed.changes, live.changes)
        self.assertEqual(replayed, live)


# ------------------------------------------------------- group commit, unit --

def cpu_seconds(pid):
    """CPU time (user + system) a process has used, from /proc."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GroupCommitTest(TempDirTestCase):

    def run_writers(self, policy, threads, writes_each, delay=0.02):
        faults = WriterFaults(self, self.dir)
        journal = persistence.Journal(self.dir, 1, policy)
        journal.sync()              # the file's header, fsynced once before any round
        header_fsyncs = faults.started()
        faults.slow(delay)          # a slow disk, so that writers pile up
        store_lock = threading.Lock()
        problems = []
        barrier = threading.Barrier(threads)

        def writer(t):
            barrier.wait()
            for n in range(writes_each):
                before = faults.started()              # fsyncs begun before this record
                with store_lock:                       # as Store._mutate does
                    journal.append((PUT, "t%d-%d" % (t, n), b"v%d-%d" % (t, n)))
                journal.commit()
                if policy == "always" and not any(s > before for s in faults.finished()):
                    problems.append("commit() of t%d-%d returned before an fsync covered it"
                                    % (t, n))

        workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        self.assertFalse(any(w.is_alive() for w in workers), "a commit never returned")
        self.assertEqual(problems, [])
        with open(persistence.journal_path(self.dir, 1), "rb") as f:
            data = {}
            count, _ = persistence.scan_journal(f.read(), data, "j")
        self.assertEqual(count, threads * writes_each)
        self.assertEqual(data, {"t%d-%d" % (t, n): b"v%d-%d" % (t, n)
                                for t in range(threads) for n in range(writes_each)})
        fsyncs = faults.started() - header_fsyncs
        journal.close()
        return fsyncs

    def test_sequential_commits_each_fsync(self):
        self.assertEqual(self.run_writers("always", 1, 10, delay=0), 10)

    def test_concurrent_commits_share_fsyncs(self):
        writes = 8 * 5
        fsyncs = self.run_writers("always", 8, 5)
        self.assertGreaterEqual(fsyncs, 1)
        self.assertLess(fsyncs, writes // 2, "%d fsyncs for %d concurrent writes" % (fsyncs, writes))

    def test_policy_no_writes_without_fsync(self):
        self.assertEqual(self.run_writers("no", 4, 5, delay=0), 0)

    def test_everysec_fsyncs_within_a_second_of_a_write(self):
        journal = persistence.Journal(self.dir, 1, "everysec")
        self.addCleanup(journal.close)
        journal.append((PUT, "k", b"v"))
        journal.commit()                    # written, not yet fsynced
        written = time.monotonic()
        self.assertEqual(journal.fsyncs, 0)
        support.wait_until(lambda: journal.fsyncs == 1, timeout=10,
                           message="the fsync that everysec owes")
        self.assertLess(time.monotonic() - written, 3)

    def test_everysec_after_a_failed_fsync_refuses_writes_and_does_not_spin(self):
        faults = WriterFaults(self, self.dir)
        journal = persistence.Journal(self.dir, 1, "everysec")
        self.addCleanup(journal.close)
        journal.sync()                      # the file's header, fsynced before any round
        faults.fail_fsync(5)
        journal.append((PUT, "k", b"v"))
        journal.commit()                    # written; its fsync is due in a second
        support.wait_until(lambda: journal.failed, timeout=10, message="the failed fsync")
        started = faults.started()
        cpu = cpu_seconds(journal._process.pid)
        time.sleep(1)                       # a writer that spins burns this second
        self.assertLess(cpu_seconds(journal._process.pid) - cpu, 0.5, "the writer spins")
        self.assertEqual(faults.started(), started, "the failed fsync was tried again")
        with self.assertRaises(OSError):
            journal.append((PUT, "k2", b"v"))

    def test_a_callback_that_raises_stops_neither_the_others_nor_the_journal(self):
        journal = persistence.Journal(self.dir, 1, "no")
        self.addCleanup(journal.close)
        called = []

        def broken(error):
            raise RuntimeError("a bug in a caller")
        with mock.patch("sys.excepthook") as excepthook:
            journal.append((PUT, "a", b"1"))
            journal.when_durable(broken)
            journal.when_durable(called.append)
            support.wait_until(lambda: called, timeout=10, message="the second callback")
            journal.append((PUT, "b", b"2"))
            journal.commit()                # the writer thread still runs rounds
        self.assertEqual(called, [None])
        self.assertEqual(excepthook.call_count, 1)

    def test_a_failed_fsync_fails_every_waiting_write_and_refuses_later_ones(self):
        faults = WriterFaults(self, self.dir)
        journal = persistence.Journal(self.dir, 1, "always")
        journal.sync()                      # the file's header, fsynced before any round
        outcomes = []
        faults.fail_fsync(5)
        journal.append((PUT, "a", b"1"))
        journal.append((PUT, "b", b"2"))
        with self.assertRaises(OSError):
            journal.commit()
        journal.when_durable(outcomes.append)
        with self.assertRaises(OSError):
            journal.append((PUT, "c", b"3"))
        support.wait_until(lambda: outcomes, timeout=10, message="the callback")
        self.assertIsInstance(outcomes[0], OSError)
        journal.close()


# --------------------------------------------- apply after durable, unit --

class ApplyAfterDurableTest(TempDirTestCase):
    """Readers see only durable writes; a failed write, and every write queued after it, fail."""

    def setUp(self):
        super().setUp()
        self.faults = WriterFaults(self, self.dir)
        self.journal = persistence.Journal(self.dir, 1, "always")
        self.store = store_module.Store({"k": b"old"}, self.journal, NO_CHECKPOINT, self.log)
        self.journal.sync()                 # the file's header, fsynced before any round
        self.header_fsyncs = self.faults.started()
        self.faults.hold()                  # every fsync waits until the test releases it
        self.outcomes = {}

    def put(self, key, value, **options):
        self.store.put(key, value, on_durable=lambda e: self.outcomes.__setitem__(key, e),
                       **options)

    def test_a_write_is_visible_only_once_durable(self):
        self.put("k", b"new")
        self.put("other", b"1")
        support.wait_until(lambda: self.faults.started() > self.header_fsyncs, 10,
                           message="the round's fsync")
        with self.store._lock:
            self.assertEqual(self.store._queued.latest("k"), b"new")
        self.assertEqual(self.store.get("k"), b"old", "visible before it was durable")
        self.assertIsNone(self.store.get("other"))
        self.faults.release()
        support.wait_until(lambda: len(self.outcomes) == 2, 10, message="the callbacks")
        self.assertEqual(self.outcomes, {"k": None, "other": None})
        self.assertEqual((self.store.get("k"), self.store.get("other")), (b"new", b"1"))

    def test_a_failed_round_fails_every_write_queued_after_it(self):
        self.faults.fail_fsync(28)
        self.put("k", b"failed")
        support.wait_until(lambda: self.faults.started() > self.header_fsyncs, 10,
                           message="the round's fsync")
        # queued while the first round is in its fsync: checked against "failed"
        self.put("k", b"after", condition=lambda tag: tag == store_module.value_tag(b"failed"))
        self.store.clear(on_durable=lambda e: self.outcomes.__setitem__("clear", e))
        with self.store._lock:
            self.assertIsNone(self.store._queued.latest("k"))
        self.faults.release()
        support.wait_until(lambda: len(self.outcomes) == 2, 10, message="the callbacks")
        self.assertTrue(all(isinstance(e, OSError) for e in self.outcomes.values()),
                        self.outcomes)
        self.assertEqual(self.store.get("k"), b"old")
        with self.store._lock:
            self.assertEqual(self.store._queued.latest("k"), b"old")
        self.assertEqual(persistence.load(self.dir, self.log)[0], {})

    def test_a_full_disk_cuts_the_failed_records_off_and_later_writes_succeed(self):
        self.faults.release()
        self.store.put("a", b"1")
        size = os.path.getsize(persistence.journal_path(self.dir, 1))
        self.faults.fail_writes(28)         # part of a write, then the disk is full
        with self.assertRaises(OSError):
            self.store.put("b", b"2" * 100)
        self.assertIn("disk full", self.store.write_problem())
        self.faults.heal()
        self.assertEqual(os.path.getsize(persistence.journal_path(self.dir, 1)), size)
        self.assertIsNone(self.store.get("b"))
        self.store.put("c", b"3")
        self.assertIsNone(self.store.write_problem())
        self.assertEqual(persistence.load(self.dir, self.log)[0], {"a": b"1", "c": b"3"})

    def test_a_failed_fsync_is_fatal_and_never_retried(self):
        self.faults.release()
        self.store.put("a", b"1")
        self.faults.fail_fsync(5)
        calls = self.faults.started()
        with self.assertRaises(OSError):
            self.store.put("b", b"2")
        self.assertTrue(self.store.fatal.is_set())
        self.assertIn("fsync failed", self.store.write_problem())
        with self.assertRaises(OSError):
            self.store.put("c", b"3")
        self.assertEqual(self.faults.started(), calls + 1, "an fsync was retried")
        self.assertIsNone(self.store.get("b"))
        self.assertEqual(persistence.load(self.dir, self.log)[0], {"a": b"1"})


class FailedCheckpointCleanupTest(TempDirTestCase):

    def test_a_checkpoint_whose_directory_fsync_fails_leaves_nothing_behind(self):
        journal = persistence.Journal(self.dir, 1, "always")
        store = store_module.Store({}, journal, NO_CHECKPOINT, self.log)
        store.put("a", b"1")
        fds = len(os.listdir("/proc/self/fd"))
        with mock.patch.object(persistence, "fsync_directory",
                               side_effect=OSError(24, "Too many open files")):
            with self.assertRaises(OSError):
                store.checkpointer.checkpoint()
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds, "a file descriptor leaked")
        self.assertEqual(persistence.journal_generations(self.dir), [1])
        store.put("b", b"2")
        store.checkpointer.checkpoint()                      # the next one works
        self.assertEqual(persistence.journal_generations(self.dir), [2])
        store.put("c", b"3")
        self.assertEqual(persistence.load(self.dir, self.log)[0],
                         {"a": b"1", "b": b"2", "c": b"3"})


# ---------------------------------------------- checkpoint crashes, unit --

class Crash(Exception):
    """Stands for the process dying at this instant (no cleanup runs after it)."""


class CheckpointCrashTest(TempDirTestCase):
    """Crash between any two steps a-d of a checkpoint (persistence.py); nothing is lost.

    A "run" is what server.py does: load(), a new Journal, a Store.  A crash
    drops the objects without closing anything (every acknowledged record is
    already with the OS), then load() must return every acknowledged write.
    """

    def open_run(self):
        ledger = persistence.Ledger()
        data, generation, _ = persistence.load(self.dir, self.log, ledger)
        journal = persistence.Journal(self.dir, generation, "always")
        return data, store_module.Store(data, journal, NO_CHECKPOINT, self.log, ledger)

    def put(self, store, key, value):
        store.put(key, value)                  # returned: acknowledged
        self.model[key] = value

    def delete(self, store, key):
        store.delete(key)
        self.model.pop(key, None)

    def writes(self, store, tag, n=5):
        for i in range(n):
            self.put(store, "%s-%d" % (tag, i), b"%s value %d" % (tag.encode(), i))
        self.put(store, "shared", tag.encode())
        self.delete(store, "%s-0" % tag)
        store.put("lease-" + tag, b"l", deadline=self.FAR)
        self.model["lease-" + tag] = b"l"
        self.deadlines["lease-" + tag] = self.FAR
        store.batch([(PUT, "batch-" + tag, b"b", None), (DELETE, "%s-1" % tag, b"", None)],
                    [None, None])
        self.model["batch-" + tag] = b"b"
        self.model.pop("%s-1" % tag)

    FAR = 4102444800000         # 2100-01-01, in ms: a deadline that does not pass in a test

    def setUp(self):
        super().setUp()
        self.model, self.deadlines = {}, {}
        # An earlier run that crashed: a journal and no snapshot; then one that
        # checkpointed cleanly, and wrote more.
        _, first = self.open_run()
        self.writes(first, "run1")
        _, second = self.open_run()
        self.writes(second, "run2")
        second.checkpointer.checkpoint()
        self.writes(second, "run2b")
        store = self.open_run()[1]
        store.clear()
        self.model.clear()
        self.deadlines.clear()
        self.writes(store, "before")
        self.store = store

    def crash_at(self, step):
        """Run store.checkpointer.checkpoint() and crash it at `step` (see the table below)."""
        store = self.store
        journal = store._journal
        real_prepare, real_switch = journal.prepare_next, journal.switch
        real_build, real_remove = persistence.snapshot_in_child, persistence.remove_journals

        def prepare_next():
            if step == "before a":
                raise Crash()
            return real_prepare()

        def switch(prepared):
            if step == "after a":
                raise Crash()
            return real_switch(prepared)

        def snapshot_in_child(directory, through, pass_fds=()):
            if step == "after b":
                self.writes(store, "after-b")          # to the new journal
                raise Crash()
            if step == "during c":
                self.writes(store, "during-c")
                with open(persistence.snapshot_path(directory) + ".tmp", "wb") as f:
                    f.write(pickle.dumps(self.model, protocol=5)[:20])
                raise Crash()
            return real_build(directory, through, pass_fds)

        def remove_journals(directory, through):
            if step == "after c":
                self.writes(store, "after-c")
                raise Crash()
            real_remove(directory, through)
            if step == "after d":
                self.writes(store, "after-d")
                raise Crash()

        with mock.patch.object(journal, "prepare_next", prepare_next), \
                mock.patch.object(journal, "switch", switch), \
                mock.patch.object(persistence, "snapshot_in_child", snapshot_in_child), \
                mock.patch.object(persistence, "remove_journals", remove_journals):
            with self.assertRaises(Crash):
                store.checkpointer.checkpoint()

    def check_recovery(self):
        ledger = persistence.Ledger()
        data, _, _ = persistence.load(self.dir, self.log, ledger)
        self.assertEqual(data, self.model)
        # Every mutation counted once, none twice (a crash after c leaves
        # journals that the new snapshot holds), and every deadline kept.
        self.assertEqual(ledger.revision, self.store.revision)
        self.assertEqual(ledger.deadlines, self.deadlines)
        # and recovery is repeatable: the next run's load() gives the same
        self.assertEqual(persistence.load(self.dir, self.log)[0], self.model)

    def test_crash_before_a(self):
        self.crash_at("before a")
        self.check_recovery()

    def test_crash_after_a(self):
        self.crash_at("after a")
        self.check_recovery()

    def test_crash_after_b_with_writes_to_the_new_journal(self):
        self.crash_at("after b")
        self.check_recovery()

    def test_crash_during_c(self):
        self.crash_at("during c")
        self.check_recovery()

    def test_crash_after_c(self):
        self.crash_at("after c")
        self.check_recovery()

    def test_crash_after_d(self):
        self.crash_at("after d")
        self.check_recovery()

    def test_crash_after_a_completed_checkpoint(self):
        self.store.checkpointer.checkpoint()
        self.writes(self.store, "after")
        self.check_recovery()
        self.assertEqual(len(persistence.journal_generations(self.dir)), 1)


# ------------------------------------------------------ failed saves, unit --

class FailedSaveTest(TempDirTestCase):

    def setUp(self):
        super().setUp()
        persistence.write_snapshot(self.dir, {"old": b"snapshot"})
        self.snapshot = persistence.snapshot_path(self.dir)
        self.previous = file_state(self.snapshot)
        data, generation, _ = persistence.load(self.dir, self.log)
        self.faults = WriterFaults(self, self.dir)
        self.journal = persistence.Journal(self.dir, generation, "always")
        self.store = store_module.Store(data, self.journal, NO_CHECKPOINT, self.log)
        self.store.put("new", b"1")
        self.store.put("old", b"overwritten")
        self.store.delete("new")
        self.store.put("newer", b"2")
        self.expected = {"old": b"overwritten", "newer": b"2"}

    def assert_nothing_lost(self):
        self.assertEqual(file_state(self.snapshot), self.previous)
        self.assertTrue(persistence.journal_generations(self.dir), "journals were removed")
        self.assertFalse(os.path.exists(self.snapshot + ".tmp"))
        self.assertEqual(persistence.load(self.dir, self.log)[0], self.expected)

    def test_final_save_succeeds_after_the_journal_failed(self):
        # A failed journal refuses writes from then on; the final snapshot,
        # which holds everything, must still be saved and the exit be clean.
        self.faults.fail_fsync(5)
        with self.assertRaises(OSError):
            self.store.put("unacknowledged", b"x")
        self.faults.heal()
        with self.assertRaises(OSError):
            self.store.put("refused", b"y")
        self.store.seal()
        self.store.save_and_close()
        self.assertEqual(persistence.journal_generations(self.dir), [])
        saved = persistence.load(self.dir, self.log)[0]
        self.assertEqual({k: saved[k] for k in self.expected}, self.expected)
        self.assertNotIn("refused", saved)

    def test_save_and_close_when_the_snapshot_cannot_be_written(self):
        self.store.seal()
        with mock.patch.object(persistence, "write_snapshot",
                               side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(OSError):
                self.store.save_and_close()
        self.assert_nothing_lost()

    def test_write_snapshot_failing_in_fsync(self):
        real = os.fsync

        def failing_fsync(fd):
            if os.path.realpath("/proc/self/fd/%d" % fd).endswith(".tmp"):
                raise OSError(5, "Input/output error")
            real(fd)

        self.store.seal()
        with mock.patch("os.fsync", failing_fsync):
            with self.assertRaises(OSError):
                self.store.save_and_close()
        self.assert_nothing_lost()

    def test_write_snapshot_failing_in_replace(self):
        self.store.seal()
        with mock.patch("os.replace", side_effect=OSError(5, "Input/output error")):
            with self.assertRaises(OSError):
                self.store.save_and_close()
        self.assert_nothing_lost()

    def test_failed_checkpoint_loses_nothing_and_writes_go_on(self):
        with mock.patch.object(persistence, "snapshot_in_child",
                               side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(OSError):
                self.store.checkpointer.checkpoint()
        self.store.put("after-failure", b"3")
        self.expected["after-failure"] = b"3"
        self.assert_nothing_lost()

    def test_a_checkpoint_whose_child_fails_loses_nothing_and_the_next_one_works(self):
        blocker = self.snapshot + ".tmp"
        os.mkdir(blocker)                   # the child can neither remove nor create it
        open(os.path.join(blocker, "x"), "w").close()
        with self.assertRaises(OSError) as caught:
            self.store.checkpointer.checkpoint()
        self.assertIn("checkpoint process failed", str(caught.exception))
        shutil.rmtree(blocker)
        self.store.put("after-failure", b"3")
        self.expected["after-failure"] = b"3"
        self.assert_nothing_lost()
        self.store.checkpointer.checkpoint()
        self.assertEqual(persistence.load_snapshot(self.snapshot), self.expected)
        self.assertEqual(len(persistence.journal_generations(self.dir)), 1)


if __name__ == "__main__":
    unittest.main()
