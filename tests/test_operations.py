"""Black-box tests of what an operator reads: the log's timestamps and its JSON form.

Every line the server writes starts with an RFC 3339 UTC timestamp, or is
one JSON object with `--log-format json`; failures (stderr) included.
"""
import datetime
import json
import socket
import time
import unittest

from tests import support
from tests.durability_support import run_cli, stop_within


def parse_time(text):
    """An RFC 3339 UTC timestamp as the server writes it, as a Unix time."""
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


class TimestampTest(support.ServerTestCase):

    def test_every_line_starts_with_an_rfc3339_utc_timestamp(self):
        before = time.time()
        server = self.start_server("--access-log")
        server.put("k", b"v")
        self.assertEqual(server.request("GET", "/kv/k")[0], 200)
        self.assertEqual(stop_within(server)[0], 0, server.output())
        after = time.time()
        lines = server.output().splitlines()
        self.assertGreaterEqual(len(lines), 5, lines)    # loaded, listening, 2 requests, bye...
        stamps = []
        for line in lines:
            with self.subTest(line=line):
                match = support.LOG_LINE.fullmatch(line)
                self.assertIsNotNone(match, "no timestamp: %r" % line)
                stamps.append(parse_time(match.group(1)))
        # UTC, and now: a local time would be off by the UTC offset.
        self.assertGreaterEqual(min(stamps), before - 1)
        self.assertLessEqual(max(stamps), after + 1)
        self.assertEqual(stamps, sorted(stamps))

    def test_a_failure_is_one_stamped_line_on_stderr(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            for log_format in ("text", "json"):
                with self.subTest(log_format=log_format):
                    result = run_cli(["--host", "127.0.0.1", "--port", str(port),
                                      "--working-dir", self.data_dir,
                                      "--log-format", log_format])
                    self.assertEqual(result.code, 1, result)
                    lines = result.lines("stderr")
                    self.assertEqual(len(lines), 1, result)
                    if log_format == "text":
                        self.assertRegex(lines[0], r"^%s error: cannot listen on "
                                                   r"127\.0\.0\.1:%d: " % (support.TIMESTAMP, port))
                    else:
                        record = json.loads(lines[0])
                        self.assertEqual(record["level"], "error", record)
                        self.assertIn("cannot listen on 127.0.0.1:%d" % port, record["message"])
                        parse_time(record["time"])


class JsonLogTest(support.ServerTestCase):

    def test_json_writes_one_object_per_line(self):
        server = self.start_server("--log-format", "json", "--access-log", host="0.0.0.0")
        server.host = "127.0.0.1"
        server.put("k", b"s3cret-value")
        self.assertEqual(server.request("GET", "/kv/k")[0], 200)
        self.assertEqual(stop_within(server)[0], 0, server.output())
        records = []
        for line in server.output().splitlines():
            with self.subTest(line=line):
                record = json.loads(line)           # fails on a line that is not JSON
                self.assertLessEqual({"time", "level", "message"}, set(record), record)
                parse_time(record["time"])
                records.append(record)
        messages = [r["message"] for r in records]
        self.assertIn("Server listening on 0.0.0.0:%d" % server.port, messages)
        warnings = [r for r in records if r["level"] == "warning"]
        self.assertEqual(len(warnings), 1, records)     # no token on 0.0.0.0
        self.assertIn("without --auth-token-file", warnings[0]["message"])
        access = [r for r in records if "status" in r]
        self.assertEqual([(r["method"], r["target"], r["status"], r["bytes"]) for r in access],
                         [("PUT", "/kv/k", 200, 0), ("GET", "/kv/k", 200, 12)], records)
        for record in access:
            self.assertEqual(record["client"], "127.0.0.1")
            self.assertGreaterEqual(record["seconds"], 0)
            self.assertLess(record["seconds"], 30)
        self.assertNotIn("s3cret", server.output())         # no value in the log
        result = run_cli(["--log-format", "xml", "--port", "0", "--working-dir", self.data_dir])
        self.assertEqual(result.code, 2, result)
        self.assertIn("xml", result.stderr)


if __name__ == "__main__":
    unittest.main()
