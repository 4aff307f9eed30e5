"""Black-box tests of DELETE /kv?prefix=P and POST /batch: many writes as one atomic step.

Each is one journal record (one revision), applied to the dict under one
hold of the store's lock: a reader sees all of it or none of it, and a
restart, clean or after SIGKILL, finds all of it or none of it.  A batch
that is refused (a bad line: 400, a failed condition: 412, too large: 413)
changes nothing.
"""
import base64
import collections
import json
import socket
import threading
import time
import types
import unittest

import persistence
import server
import store
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
    """The keys under `prefix` (up to 10,000), once the key index is ready."""
    def page():
        status, _, body = server.request("GET", "/kv?limit=10000&prefix=" + prefix)
        assert status in (200, 503), (status, body)
        return status == 200 and [body.decode().split()]
    return support.wait_until(page, 30, message="a listing")[0]


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


class DeletePrefixCostTest(support.ServerTestCase):

    def test_a_delete_by_prefix_costs_the_keys_under_it_not_a_scan_of_the_store(self):
        # Each DELETE /kv?prefix= scanned the whole dict on the loop, under
        # the store's lock: 55 ms at a million keys, matching or not, and
        # one client repeating it made every other client wait as long.
        persistence.write_snapshot(self.data_dir, {"user/%07d" % i: b"v" for i in range(500000)})
        server = self.start_server()
        self.assertEqual(server.request("DELETE", "/kv?prefix=user/0000001")[:3:2], (200, b"1\n"))
        listed(server, "nomatch/")              # the key index is built

        def median_ms(method, target, expected):
            conn, times = server.connection(), []
            try:
                for _ in range(21):
                    started = time.perf_counter()
                    conn.request(method, target)
                    reply = conn.getresponse()
                    self.assertEqual((reply.status, reply.read()), expected)
                    times.append(time.perf_counter() - started)
            finally:
                conn.close()
            return 1000 * sorted(times)[10]
        # Against the DELETE of one absent key: a write through the journal
        # as well, without the scan (25 ms at 500,000 keys, alone).
        single = median_ms("DELETE", "/kv/nomatch", (200, b""))
        deleting = median_ms("DELETE", "/kv?prefix=nomatch/", (200, b"0\n"))
        self.assertLess(deleting, single + 10, "ms for a DELETE by prefix that matches nothing, "
                                               "against a DELETE of one key's %.1f" % single)
        self.assertEqual(server.request("DELETE", "/kv?prefix=user/00000")[:3:2], (200, b"99\n"))
        self.assertEqual(listed(server, "user/00000"), [])
        self.assertEqual(server.get("user/0000100"), b"v")


def line(key, value=None, **fields):
    """One line of a batch: a put of `value` (bytes), or with op="delete" a delete."""
    fields["key"] = key
    if value is not None:
        fields["value"] = base64.b64encode(value).decode()
    return json.dumps(fields)


def body(*lines):
    return ("\n".join(lines) + "\n").encode()


class BatchTests(SharedServerTestCase):

    def batch(self, data, status=200, headers=None):
        """POST /batch; for a 200, the JSON reply (checked: its type, its applied count)."""
        got, reply_headers, reply = self.server.request("POST", "/batch", data, headers)
        self.assertEqual(got, status, reply)
        if status != 200:
            self.assertEqual(reply_headers["Content-Type"], "text/plain; charset=utf-8")
            return reply.decode()
        self.assertEqual(reply_headers["Content-Type"], JSON)
        self.assertEqual(int(reply_headers["Content-Length"]), len(reply))
        return json.loads(reply)

    def test_puts_and_deletes_applied_in_order_and_the_revision_and_count_answered(self):
        k = self.key("/")
        self.server.put(k + "old", b"old")
        binary = bytes(range(256)) * 4
        before = records(self.server)
        answer = self.batch(body(
            line(k + "a", b"1", op="put"),
            line(k + "b", binary),                      # no "op": a put
            "",                                         # blank lines are skipped
            "   \r",
            line(k + "a", op="delete"),
            line(k + "a", b"2"),
            line(k + "old", op="delete"),
            line(k + "c", b"3"),
            line(k + "c", op="delete")))
        self.assertEqual(answer["applied"], 7)
        self.assertIsInstance(answer["revision"], int)
        self.assertEqual(records(self.server) - before, 1, "one journal record for the batch")
        self.assertEqual(listed(self.server, k), [k + "a", k + "b"])
        self.assertEqual(self.server.get(k + "a"), b"2")
        self.assertEqual(self.server.get(k + "b"), binary)
        # The next batch is the next revision: a batch is one mutation.
        again = self.batch(body(line(k + "d", b"4")))
        self.assertEqual(again, {"revision": answer["revision"] + 1, "applied": 1})

    def test_an_empty_batch_applies_nothing(self):
        for data in (b"", b"\n\n", b" \r\n"):
            with self.subTest(data=data):
                self.assertEqual(self.batch(data)["applied"], 0)

    def test_a_bad_line_is_400_naming_it_and_nothing_is_applied(self):
        k = self.key("/")
        good = line(k + "first", b"v")
        bad = {
            "not json": ("{nope", "not a JSON object"),
            "an array": ("[1, 2]", "not a JSON object"),
            "a string": ('"k"', "not a JSON object"),
            "not UTF-8": (b'{"key": "\xff", "value": "dg=="}', "not a JSON object"),
            "an unknown op": (line(k + "x", b"v", op="get"), 'op must be "put" or "delete"'),
            "an op that is not a string": (line(k + "x", b"v", op=1),
                                           'op must be "put" or "delete"'),
            "an unknown field": (line(k + "x", b"v", tll=5), 'unknown field for put: "tll"'),
            "a value on a delete": (line(k + "x", b"v", op="delete"),
                                    'unknown field for delete: "value"'),
            "no key": ('{"value": "dg=="}', "key must be a string"),
            "a key that is a number": ('{"key": 5, "value": "dg=="}', "key must be a string"),
            "an empty key": (line("", b"v"), "key cannot be empty"),
            "a bad key": (line(k + "a//b", b"v"), "key contains invalid characters"),
            "a dot segment": (line(k + "../b", b"v"), "key contains invalid characters"),
            "a key too long for GET /kv/{key}": (
                line("k" * 65000, b"v"), "key too long for a request line (--max-header-bytes)"),
            "no value": (line(k + "x"), "value must be base64"),
            "a value that is not base64": ('{"key": "x", "value": "a b!"}',
                                           "value must be base64"),
            "a value with bad padding": ('{"key": "x", "value": "dg="}', "value must be base64"),
            "an empty value": (line(k + "x", b""), "value cannot be empty"),
            "a ttl of 0": (line(k + "x", b"v", ttl=0),
                           "ttl must be a whole number of seconds from 1 to 315360000"),
            "a ttl past ten years": (line(k + "x", b"v", ttl=315360001),
                                     "ttl must be a whole number of seconds from 1 to 315360000"),
            "a ttl in a string": (line(k + "x", b"v", ttl="60"),
                                  "ttl must be a whole number of seconds from 1 to 315360000"),
            "a fractional ttl": (line(k + "x", b"v", ttl=1.5),
                                 "ttl must be a whole number of seconds from 1 to 315360000"),
            "a boolean ttl": (line(k + "x", b"v", ttl=True),
                              "ttl must be a whole number of seconds from 1 to 315360000"),
            "an unquoted tag": (line(k + "x", b"v", if_match="abc"),
                                'if_match must be a tag in quotes, as in ETag, or "*"'),
            "a tag that is a number": (line(k + "x", b"v", if_match=5),
                                       'if_match must be a tag in quotes, as in ETag, or "*"'),
            "if_none_match with a tag": (line(k + "x", b"v", if_none_match='"abc"'),
                                         'if_none_match must be "*"'),
        }
        for name, (bad_line, message) in bad.items():
            with self.subTest(line=name):
                if isinstance(bad_line, str):
                    bad_line = bad_line.encode()
                data = good.encode() + b"\n\n" + bad_line + b"\n" + good.encode() + b"\n"
                self.assertEqual(self.batch(data, 400), "line 3: %s\n" % message)
                self.assertIsNone(self.server.get(k + "first"))
        self.assert_intact()

    def test_a_line_nested_deeper_than_the_decoder_goes_is_400_and_batches_go_on(self):
        # It raised RecursionError in the loop's callback: no reply ever, and
        # every later batch waited behind it for ever.
        k = self.key("/")
        for nested in (b"[" * 100000, b'{"key": "x", "value": "dg==", "ttl": %s}'
                       % (b"[" * 100000)):
            with self.subTest(nested=nested[:20]):
                status, _, reply = self.server.request(
                    "POST", "/batch", line(k + "first", b"v").encode() + b"\n" + nested,
                    timeout=10)
                self.assertEqual((status, reply), (400, b"line 2: not a JSON object\n"))
        self.assertEqual(self.batch(body(line(k + "after", b"v")))["applied"], 1)
        self.assertIsNone(self.server.get(k + "first"))
        self.assertNotIn("Unexpected error", self.server.output())

    def test_a_failed_condition_is_412_naming_its_line_and_nothing_is_applied(self):
        k = self.key("/")
        status, headers, _ = self.server.request("PUT", "/kv/" + k + "held", b"held")
        tag = headers["ETag"]
        _, headers, _ = self.server.request("PUT", "/kv/" + k + "tag-of-new", b"new")
        new_tag = headers["ETag"]
        _, headers, _ = self.server.request("PUT", "/kv/" + k + "tag-of-newer", b"newer")
        newer_tag = headers["ETag"]
        first = line(k + "first", b"v")
        failing = {
            "create only, on a key that exists": line(k + "held", b"x", if_none_match="*"),
            "a stale tag": line(k + "held", b"x", if_match=new_tag),
            "a tag, on an absent key": line(k + "absent", b"x", if_match=tag),
            "any value, on an absent key": line(k + "absent", b"x", if_match="*"),
            "a delete of an absent key with a condition": line(k + "absent", op="delete",
                                                               if_match="*"),
        }
        for name, bad_line in failing.items():
            with self.subTest(condition=name):
                self.assertEqual(self.batch(body(first, bad_line, first), 412),
                                 "precondition failed on line 2\n")
                self.assertIsNone(self.server.get(k + "first"))
                self.assertEqual(self.server.get(k + "held"), b"held")
        # Conditions that hold, each checked against the lines before it.
        self.batch(body(
            line(k + "held", b"new", if_match=tag),            # held: held -> new
            line(k + "held", b"newer", if_match=new_tag),      # its tag after line 1
            line(k + "fresh", b"x", if_none_match="*"),
            line(k + "fresh", op="delete", if_match="*"),
            line(k + "fresh", b"y", if_none_match="*"),         # absent again after line 4
            line(k + "held", b"last", if_match='"x", %s' % newer_tag),    # a list of tags
            line(k + "held", b"last", if_match="*")))
        self.assertEqual(self.server.get(k + "held"), b"last")
        self.assertEqual(self.server.get(k + "fresh"), b"y")

    def test_the_longest_key_a_batch_takes_can_be_read_and_deleted_by_its_name(self):
        # A PUT's key is bounded by the head's limit; a batch's as much, less
        # room for the request line and a few headers (1 KiB).
        longest = "k" * (65536 - 1024)
        status, _, reply = self.server.request("POST", "/batch", line(longest + "k", b"v"))
        self.assertEqual((status, reply), (400, b"line 1: key too long for a request line "
                                                b"(--max-header-bytes)\n"))
        status, _, _ = self.server.request("POST", "/batch", line(longest, b"v"))
        self.assertEqual(status, 200)
        self.assertEqual(self.server.request("GET", "/kv/" + longest)[::2], (200, b"v"))
        self.assertEqual(self.server.request("DELETE", "/kv/" + longest)[0], 200)
        self.assertEqual(self.server.request("GET", "/kv/" + longest)[0], 404)

    def test_post_without_a_length_is_411_and_other_methods_405(self):
        conn = self.server.connection()
        self.addCleanup(conn.close)
        conn.putrequest("POST", "/batch")
        conn.endheaders()
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (411, b"length required\n"))
        for method in ("GET", "PUT", "DELETE"):
            with self.subTest(method=method):
                headers = self.assertError(method, "/batch", 405, "method not allowed\n")
                self.assertEqual(headers.get_all("Allow"), ["POST"])

    def test_a_body_of_newlines(self):
        # 32 MiB of blank lines: skipped a share of bytes a turn
        # (BatchSliceTest), and counted.
        data = b"\n" * (32 << 20) + line(self.key(), b"v").encode()
        status, _, reply = self.server.request("POST", "/batch", data)
        self.assertEqual((status, json.loads(reply)["applied"]), (200, 1))
        status, _, reply = self.server.request("POST", "/batch", data + b"\n[]")
        self.assertEqual((status, reply),
                         (400, b"line %d: not a JSON object\n" % ((32 << 20) + 2)))

    def test_a_batch_of_many_lines_and_requests_pipelined_behind_it(self):
        # 10,000 lines (--max-batch-ops): the parse takes many loop turns.
        # A PUT and a GET pipelined behind the batch on its connection come
        # after it.
        k = self.key("/")
        data = body(*(line("%s%05d" % (k, i), b"%d" % i * 20) for i in range(10000)))
        pipeline = (b"POST /batch HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                    b"PUT /kv/%s00007 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nafter"
                    b"GET /kv/%s00007 HTTP/1.1\r\nHost: t\r\n\r\n"
                    % (len(data), data, k.encode(), k.encode()))
        with socket.create_connection((self.server.host, self.server.port), timeout=60) as s:
            s.sendall(pipeline)
            replies = b""
            while not replies.endswith(b"\r\n\r\nafter"):
                chunk = s.recv(65536)
                self.assertTrue(chunk, replies)
                replies += chunk
        self.assertEqual(replies.count(b"HTTP/1.1 200 OK"), 3, replies)
        self.assertIn(b'"applied": 10000}', replies)
        status, _, export = self.server.request("GET", "/export?prefix=" + k)
        self.assertEqual((status, export.count(b"\n")), (200, 10000))
        self.assertEqual(self.server.get(k + "09999"), b"9999" * 20)


class BatchLimitTests(SharedServerTestCase):

    server_args = ("--max-batch-bytes", "5000", "--max-value-bytes", "1000",
                   "--max-batch-ops", "50")

    def test_a_batch_over_the_limit_is_413_from_its_content_length_before_the_body(self):
        with socket.create_connection((self.server.host, self.server.port), timeout=10) as s:
            s.sendall(b"POST /batch HTTP/1.1\r\nHost: t\r\nContent-Length: 5001\r\n\r\n")
            reply = support.read_until_quiet(s, timeout=10)
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply)
        self.assertTrue(reply.endswith(b"\r\n\r\nbatch too large\n"), reply)

    def test_a_chunked_batch_is_413_once_it_passes_the_limit(self):
        k = self.key("/")
        data = body(*(line("%s%03d" % (k, i), b"v" * 40) for i in range(100)))
        self.assertGreater(len(data), 5000)
        conn = self.server.connection()
        self.addCleanup(conn.close)
        conn.request("POST", "/batch", iter([data[i:i + 1000] for i in range(0, len(data), 1000)]),
                     {"Transfer-Encoding": "chunked"}, encode_chunked=True)
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (413, b"batch too large\n"))
        self.assertEqual(listed(self.server, k), [])

    def test_past_the_most_operations_a_batch_is_413_naming_the_line(self):
        # A batch is one step of the loop: --max-batch-ops bounds it.  Blank
        # lines are no operations; nothing of a refused batch is applied.
        k = self.key("/")
        lines = [line("%s%02d" % (k, i), b"v") for i in range(50)]
        status, _, reply = self.server.request("POST", "/batch", body(*lines) + b"\n\n")
        self.assertEqual((status, json.loads(reply)["applied"]), (200, 50))
        lines = [line("%s%02d" % (k, i), op="delete") for i in range(50)]
        data = body(*lines[:10], "", *lines[10:], line(k + "50", b"v"))
        status, _, reply = self.server.request("POST", "/batch", data)
        self.assertEqual((status, reply), (413, b"line 52: a batch holds at most 50 operations "
                                                b"(--max-batch-ops); send the rest in another "
                                                b"batch\n"))
        self.assertEqual(len(listed(self.server, k)), 50)
        self.assertIsNone(self.server.get(k + "50"))

    def test_a_value_over_the_value_limit_is_400(self):
        k = self.key("/")
        data = body(line(k + "a", b"v" * 1000), line(k + "b", b"v" * 1001))
        status, _, reply = self.server.request("POST", "/batch", data)
        self.assertEqual((status, reply), (400, b"line 2: value too large (--max-value-bytes)\n"))
        self.assertIsNone(self.server.get(k + "a"))

    def test_the_largest_batch_passes_and_a_put_keeps_the_value_limit(self):
        k = self.key("/")
        data = body(*(line("%s%02d" % (k, i), b"v" * 600) for i in range(5)))
        data += b" " * (5000 - len(data) - 1) + b"\n"
        self.assertEqual(len(data), 5000)
        status, _, reply = self.server.request("POST", "/batch", data)
        self.assertEqual((status, json.loads(reply)["applied"]), (200, 5))
        self.assertError("PUT", "/kv/" + k + "big", 413, "value too large\n", b"v" * 1001)
        self.put_ok("/kv/" + k + "big", b"v" * 1000)


class BatchMemoryTest(SharedServerTestCase):
    """A batch's body counts in --max-inflight-bytes while it is parsed and journaled, then not."""

    server_args = ("--max-inflight-bytes", "400000")    # a large body may take 300,000 of it

    def test_the_memory_of_each_batch_is_given_back(self):
        k = self.key("/")
        data = body(*(line("%s%04d" % (k, i), b"v" * 1000) for i in range(200)))
        self.assertGreater(len(data), 150000)       # two at once would not fit
        for n in range(10):
            with self.subTest(batch=n):
                status, _, reply = self.server.request("POST", "/batch", data)
                self.assertEqual(status, 200, reply)
        # A client that leaves while its batch is parsed: its memory too.
        for _ in range(3):
            with socket.create_connection((self.server.host, self.server.port)) as s:
                s.sendall(b"POST /batch HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(data), data))
        support.wait_until(lambda: self.server.request("POST", "/batch", data)[0] == 200, 10,
                           message="a batch accepted after the clients left")

    def test_past_three_quarters_of_the_memory_cap_a_batch_is_413_not_503(self):
        self.assertError("POST", "/batch", 413, "batch too large\n", b" " * 300001)
        status, _, reply = self.server.request("POST", "/batch", b" " * 299999 + b"\n")
        self.assertEqual((status, json.loads(reply)["applied"]), (200, 0))


class BatchSliceTest(unittest.TestCase):
    """A batch is parsed a share per loop turn (BatchJob.parse_some), so that others get theirs."""

    def job(self, data, **limits):
        api = types.SimpleNamespace(server=types.SimpleNamespace(limits=server.Limits(**limits)))
        return server.BatchJob(api, types.SimpleNamespace(started=0.0),
                               types.SimpleNamespace(body=data))

    def parse(self, job):
        """Parse it all; the number of turns it took."""
        turns = 1
        while not job.parse_some():
            turns += 1
        return turns

    def test_blank_lines_cost_a_turn_a_share_of_bytes_and_count_in_line_numbers(self):
        share = server.BATCH_BYTES_PER_TURN
        job = self.job(b"\n" * (3 * share) + b" \t\r\n" * 10 + line("k", b"v").encode()
                       + b"\r\n  \n" + b"   " + line("j", b"v").encode())
        self.assertEqual(self.parse(job), 4)
        self.assertEqual([part[1] for part in job.parts], ["k", "j"])
        self.assertEqual(job.lines, [3 * share + 11, 3 * share + 13])
        job = self.job(b"\n" * share + b"\x0c\n")         # not JSON's whitespace: not blank
        with self.assertRaises(server.RequestError) as caught:
            self.parse(job)
        self.assertEqual(caught.exception.message, "line %d: not a JSON object" % (share + 1))

    def test_a_line_longer_than_a_key_and_a_value_make_is_refused_unparsed(self):
        # A key of up to 2048 - 1024 bytes, a value of 1000 (1336 in base64), 4096 for the rest.
        limits = dict(max_header_bytes=2048, max_value_bytes=1000)
        longest = 1024 + 1336 + 4096
        fits = b'{"key": "k", "value": "dg=="' + b" " * (longest - 29) + b"}"
        self.assertEqual(len(fits), longest)
        job = self.job(fits + b"\n" + fits + b" \n", **limits)
        with self.assertRaises(server.RequestError) as caught:
            self.parse(job)
        self.assertEqual(caught.exception.message, "line 2: longer than a key and a value "
                                                   "within their limits make a line")
        self.assertEqual(len(job.parts), 1)

    def test_a_turn_parses_at_most_its_share_of_lines(self):
        share = server.BATCH_LINES_PER_TURN
        job = self.job(body(*(line("k%d" % i, b"v") for i in range(2 * share + 5))))
        self.assertFalse(job.parse_some())
        self.assertEqual((len(job.parts), job.line), (share, share))
        self.assertFalse(job.parse_some())
        self.assertTrue(job.parse_some())
        self.assertEqual(len(job.parts), 2 * share + 5)
        self.assertEqual(job.parts[-1][:3], (persistence.PUT, "k%d" % (2 * share + 4), b"v"))

    def test_a_ttl_counts_from_the_hand_over_to_the_store_not_the_parse(self):
        job = self.job(body(line("k", b"v", ttl=5), line("p", b"v")))
        self.assertTrue(job.parse_some())
        parsed = store.now_ms()
        support.wait_until(lambda: store.now_ms() >= parsed + 5, 5, 0.001, "5 ms")
        handed = []
        job.api.store = types.SimpleNamespace(
            batch=lambda parts, conditions, on_durable: handed.append(list(parts)) or 7)
        before = store.now_ms()
        self.assertEqual(job.queue(None), 7)
        self.assertGreaterEqual(handed[0][0][3], before + 5000)
        self.assertLessEqual(handed[0][0][3], store.now_ms() + 5000)
        self.assertIsNone(handed[0][1][3])

    def test_one_batch_is_parsed_at_a_time_the_others_wait_in_order(self):
        # Jobs parsing side by side would each take a share of every turn:
        # with 16 importers, everyone else waited 16 shares a turn.
        ready, sent = [], []            # the loop's callbacks; the replies, in order
        loop_server = types.SimpleNamespace(
            limits=server.Limits(), batches=collections.deque(), reserved=0,
            loop=types.SimpleNamespace(call_soon=ready.append), release=lambda size: None)

        def job(name, data, closed=False):
            connection = types.SimpleNamespace(
                started=0.0, closed=closed, close_after=False, advance=lambda: None,
                send=lambda request, status, *rest: sent.append((name, status)))
            api = types.SimpleNamespace(server=loop_server,
                                        write=lambda *args, **kwargs: (200, b"", (), JSON))
            return server.BatchJob(api, connection, types.SimpleNamespace(body=data))

        share = server.BATCH_LINES_PER_TURN
        big = job("big", body(*(line("k%d" % i, b"v") for i in range(2 * share + 1))))
        gone = job("gone", body(line("g", b"v")), closed=True)     # its client left
        small = job("small", body(line("s", b"v")))
        big.start()
        gone.start()
        small.start()
        turns = 0
        while ready:
            ready.pop(0)()
            turns += 1
        self.assertEqual((sent, turns), ([("big", 200), ("small", 200)], 5))
        self.assertEqual(len(loop_server.batches), 0)

        # A bug in one job (here, the store's hand-over failing) is reported
        # and answered 500; the batches behind it still get their turn.
        reported = []
        loop_server.loop.call_exception_handler = reported.append
        broken, after = job("broken", body(line("b", b"v"))), job("after", body(line("a", b"v")))
        broken.api.write = lambda *args, **kwargs: 1 / 0
        broken.start()
        after.start()
        while ready:
            ready.pop(0)()
        self.assertEqual(sent[2:], [("broken", 500), ("after", 200)])
        self.assertIsInstance(reported[0]["exception"], ZeroDivisionError)
        self.assertTrue(broken.connection.close_after)

    def test_a_turn_parses_at_most_its_share_of_bytes(self):
        # A turn stops once past its share: lines larger than it, one a turn.
        big = b"v" * server.BATCH_BYTES_PER_TURN
        job = self.job(body(*(line("k%d" % i, big) for i in range(4))))
        turns = 1
        while not job.parse_some():
            turns += 1
        self.assertEqual((turns, len(job.parts)), (4, 4))
