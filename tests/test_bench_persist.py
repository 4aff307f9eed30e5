"""Unit tests of bench/persist.py's checkpoint accounting: which checkpoints overlapped a run."""
import collections
import unittest

from bench.persist import checkpoint_overlap, checkpoints_logged


class FakeServer:
    def __init__(self, stamped):
        self.stamped = collections.deque(stamped)


class CheckpointAccountingTest(unittest.TestCase):

    def test_log_lines_give_end_and_duration(self):
        server = FakeServer([
            (5.0, "Loaded 1000000 keys from /tmp/x/store.pickle in 0.80 s"),
            (7.0, "Checkpoint: 1000000 keys, 115000000 bytes written in 1.50 s; journals <= 1 removed"),
            (8.0, "Checkpoint of 1000000 keys failed, journal kept: [Errno 28] No space left"),
            (9.5, "checkpoint of 1000000 keys done"),          # another wording, no duration
        ])
        self.assertEqual(checkpoints_logged(server), [(7.0, 1.5), (9.5, 0.0)])

    def test_overlap_with_a_run(self):
        done = [(0.9, 0.5),     # 0.4-0.9: before the run
                (1.5, 1.0),     # 0.5-1.5: straddles its start, 0.5 s inside
                (3.0, 0.5),     # 2.5-3.0: inside
                (4.5, 1.0),     # 3.5-4.5: straddles its end, 0.5 s inside
                (6.0, 0.5)]     # 5.5-6.0: after
        count, busy = checkpoint_overlap(done, 1.0, 4.0)
        self.assertEqual(count, 3)
        self.assertAlmostEqual(busy, 1.5)
        self.assertEqual(checkpoint_overlap(done, 6.5, 9.0), (0, 0.0))


if __name__ == "__main__":
    unittest.main()
