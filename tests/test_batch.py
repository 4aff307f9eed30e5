"""Black-box tests of DELETE /kv?prefix=P and POST /batch: many writes as one atomic step.

Each is one journal record (one revision), applied to the dict under one
hold of the store's lock: a reader sees all of it or none of it, and a
restart, clean or after SIGKILL, finds all of it or none of it.  A batch
that is refused (a bad line: 400, a failed condition: 412, too large: 413)
changes nothing.
"""
import base64
import json
import socket
import threading

from tests import support
from tests.test_http_api import SharedServerTestCase
from tests.test_listing import put_many
from tests.test_metrics import Scrape

NDJSON = "application/x-ndjson"
JSON = "application/json"


def records(server):
    """Journal records appended since the server started (/metrics)."""
    return Scrape(server).value("kvstore_journal_records_total")


def listed(server, prefix):
    status, _, body = server.request("GET", "/kv?limit=10000&prefix=" + prefix)
    assert status == 200, (status, body)
    return body.decode().split()


class DeletePrefixTests(SharedServerTestCase):

    def prefix(self):
        return self._testMethodName + "/"

    def test_deletes_every_key_under_the_prefix_and_answers_the_count(self):
        prefix = self.prefix()
        keep = [self._testMethodName + "x", self._testMethodName, prefix[:-1] + "-a/b"]
        put_many(self.server, [prefix + "a", prefix + "b/c", prefix + "b/d"] + keep)
        before = records(self.server)
        headers = self.assertResponse("DELETE", "/kv?prefix=" + prefix, 200, b"3\n")
        self.assertEqual(records(self.server) - before, 1, "one journal record for the three")
        self.assertEqual(headers["Cache-Control"], "no-store")
        self.assertEqual(listed(self.server, prefix), [])
        for key in keep:
            self.assertEqual(self.server.get(key), b"v", key)
        self.assertResponse("DELETE", "/kv?prefix=" + prefix, 200, b"0\n")
        # A prefix that ends inside a segment, %2F for a slash.
        put_many(self.server, [prefix + "ab/1", prefix + "abc", prefix + "b"])
        self.assertResponse("DELETE", "/kv?prefix=" + prefix.replace("/", "%2F") + "ab", 200,
                            b"2\n")
        self.assertEqual(listed(self.server, prefix), [prefix + "b"])

    def test_an_empty_or_missing_prefix_is_400_and_deletes_nothing(self):
        self.server.put(self.prefix() + "k", b"v")
        for target in ("/kv", "/kv?", "/kv?prefix=", "/kv?prefix"):
            with self.subTest(target=target):
                status, _, body = self.call("DELETE", target)
                self.assertEqual(status, 400, body)
                self.assert_intact()
        self.assertError("DELETE", "/kv?prefix=", 400,
                         "prefix cannot be empty (DELETE /clear deletes every key)\n")
        self.assertEqual(self.server.get(self.prefix() + "k"), b"v")

    def test_bad_parameters_are_400(self):
        for query, message in (("prefix=a%20b", "prefix contains invalid characters\n"),
                               ("prefix=a&limit=5", "unknown parameter (known: prefix)\n"),
                               ("prefix=a&prefix=b", "parameter prefix given twice\n"),
                               ("prefix=%FF", "bad query string\n")):
            with self.subTest(query=query):
                self.assertError("DELETE", "/kv?" + query, 400, message)

    def test_kv_allows_get_head_and_delete(self):
        for method in ("PUT", "POST", "PATCH"):
            with self.subTest(method=method):
                headers = self.assertError(method, "/kv?prefix=a", 405, "method not allowed\n",
                                           b"x")
                self.assertEqual(headers.get_all("Allow"), ["GET, HEAD, DELETE"])

    def test_readers_see_all_the_keys_or_none(self):
        prefix = self.prefix()
        keys = ["%s%04d" % (prefix, i) for i in range(3000)]
        put_many(self.server, keys)
        counts, stop = [], threading.Event()

        def reader():
            while not stop.is_set():
                counts.append(len(listed(self.server, prefix)))
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            support.wait_until(lambda: len(counts) >= 3, 30, message="a few listings first")
            self.assertResponse("DELETE", "/kv?prefix=" + prefix, 200, b"3000\n")
            seen = len(counts)
            support.wait_until(lambda: len(counts) >= seen + 3, 30, message="listings after")
        finally:
            stop.set()
            thread.join(30)
        self.assertEqual(set(counts), {3000, 0})


class DeletePrefixDurabilityTest(support.ServerTestCase):

    def test_an_acknowledged_delete_by_prefix_survives_sigkill_and_a_restart(self):
        server = self.start_server()
        put_many(server, ["app/%d" % i for i in range(100)] + ["apple", "b"])
        self.assertEqual(server.request("DELETE", "/kv?prefix=app/")[:3:2], (200, b"100\n"))
        server.kill()
        server = self.restart(server)
        self.assertEqual(listed(server, ""), ["apple", "b"])
        self.assertEqual(server.stop(), 0)
        server = self.restart(server)
        self.assertEqual(listed(server, ""), ["apple", "b"])
