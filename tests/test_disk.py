"""Black-box: nothing the disk does goes unnoticed (issue 25).

- Checked snapshots: a snapshot with one bit flipped is refused at start
  (exit 1, one line naming it, the file untouched); `python3 persistence.py
  verify FILE` checks one without a server.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from tests import support
from tests.durability_support import (
    TRACEBACK, assert_state, file_state, journals, run_cli, stop_within)

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)
import persistence                                   # noqa: E402


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


if __name__ == "__main__":
    unittest.main()
