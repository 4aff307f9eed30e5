"""Unit tests of bench/run.py's options and tables (`make bench` itself takes minutes)."""
import unittest

from bench.run import PARTS, markdown, parse_args, scale_markdown


class OptionsTest(unittest.TestCase):

    def test_defaults(self):
        opts = parse_args([])
        self.assertEqual(opts.server_flags, [])             # our server on its defaults
        self.assertEqual(opts.sizes, [100000, 1000000, 5000000])
        self.assertEqual(opts.skip, [])

    def test_zero_sizes_and_skip(self):
        opts = parse_args(["--sizes", "0", "--checkpoint-keys", "0", "--skip", "burst,stalled",
                           "--server-flags", "--cpu 1", "--batch-keys", "0"])
        self.assertEqual(sorted(opts.skip), ["batch", "burst", "checkpoint", "scale", "stalled"])
        self.assertEqual(opts.server_flags, ["--cpu", "1"])
        self.assertTrue(set(opts.skip) <= set(PARTS))
        with self.assertRaises(SystemExit):
            parse_args(["--skip", "nothing-of-the-kind"])


class TablesTest(unittest.TestCase):

    def test_scale_table_has_a_column_per_size(self):
        rows = [{"test": "%d keys: %s" % (n, f), "figure": f, "keys": n, "summary": "%s@%d" % (f, n)}
                for n in (100000, 1000000) for f in ("start to serving", "server RSS")]
        rows.append({"test": "PUT c=64 --fsync always", "summary": "not a figure"})
        self.assertEqual(scale_markdown(rows).splitlines(), [
            "| figure | 100,000 keys | 1,000,000 keys |",
            "|---|---|---|",
            "| start to serving | start to serving@100000 | start to serving@1000000 |",
            "| server RSS | server RSS@100000 | server RSS@1000000 |"])

    def test_a_missing_cell_is_empty(self):
        table = markdown({"a": [{"test": "x", "summary": "1"}], "b": []})
        self.assertEqual(table.splitlines()[-1], "| x | 1 |  |")


if __name__ == "__main__":
    unittest.main()
