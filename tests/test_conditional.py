"""Black-box tests of ETags and conditional requests (RFC 9110, section 13).

A value's ETag is a digest of its bytes, so the tests compare tags between
replies, never against a formula: the same bytes give the same tag, other
bytes another one, before and after a restart.  Values of 1 MiB take the
path where the server keeps the tag beside the value; small ones the path
where it hashes on every read.
"""
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import unittest

import persistence
import store as store_module
from tests import support
from tests.test_http_api import SharedServerTestCase

STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e]+"')
BIG = 1024 * 1024


class ConditionalTestCase(SharedServerTestCase):

    def put_tag(self, path, value, headers=None):
        """PUT, expecting 200 with a strong ETag; returns the ETag."""
        status, headers, body = self.call("PUT", path, value, headers)
        self.assertEqual((status, body), (200, b""), "PUT %s" % path)
        etag = headers.get("ETag")
        self.assertIsNotNone(etag, "no ETag on the 200 of PUT %s" % path)
        self.assertRegex(etag, STRONG_ETAG)
        return etag

    def get_tag(self, path, method="GET"):
        status, headers, _ = self.call(method, path)
        self.assertEqual(status, 200, "%s %s" % (method, path))
        self.assertEqual(len(headers.get_all("ETag") or ()), 1, "ETag of %s %s" % (method, path))
        return headers["ETag"]

    def assert_412(self, method, path, body=None, headers=None):
        self.assertError(method, path, 412, "precondition failed\n", body, headers)


class ETagTests(ConditionalTestCase):

    def test_put_get_and_head_carry_the_same_strong_etag(self):
        path = "/kv/" + self.key()
        etag = self.put_tag(path, b"tagged")
        self.assertEqual(self.get_tag(path), etag)
        self.assertEqual(self.get_tag(path, "HEAD"), etag)

    def test_etag_changes_with_the_value_and_only_with_it(self):
        for size, suffix in ((5, "-small"), (BIG, "-big")):
            with self.subTest(size=size):
                path = "/kv/" + self.key(suffix)
                first, second = os.urandom(size), os.urandom(size)
                tag1 = self.put_tag(path, first)
                tag2 = self.put_tag(path, second)
                self.assertNotEqual(tag1, tag2)
                self.assertEqual(self.get_tag(path), tag2)
                self.assertEqual(self.put_tag(path, first), tag1, "same bytes, another tag")
                self.assertEqual(self.get_tag(path), tag1)

    def test_one_byte_more_is_another_tag(self):
        path = "/kv/" + self.key()
        value = os.urandom(BIG)
        tag = self.put_tag(path, value)
        self.assertNotEqual(self.put_tag(path, value + b"x"), tag)
        self.assertNotEqual(self.get_tag(path), tag)

    def test_big_value_replaced_by_small_and_deleted(self):
        # The tag kept beside a big value must go with it.
        path = "/kv/" + self.key()
        big_tag = self.put_tag(path, os.urandom(BIG))
        self.assertEqual(self.get_tag(path), big_tag)
        small_tag = self.put_tag(path, b"small now")
        self.assertEqual(self.get_tag(path), small_tag)
        self.assertResponse("DELETE", path, 200)
        again = self.put_tag(path, b"small again")
        self.assertEqual(self.get_tag(path), again)

    def test_same_value_under_two_keys_has_the_same_tag(self):
        value = os.urandom(100)
        self.assertEqual(self.put_tag("/kv/" + self.key("-a"), value),
                         self.put_tag("/kv/" + self.key("-b"), value))

    def test_absent_key_has_no_etag(self):
        headers = self.assertError("GET", "/kv/" + self.key(), 404, "key not found\n")
        self.assertIsNone(headers.get("ETag"))

    def test_http10_keep_alive_put_has_etag(self):
        # The 200 of a write is cached per Connection header: each variant gets its ETag.
        key = self.key()
        reply = self.server.raw(b"PUT /kv/%s HTTP/1.0\r\nConnection: keep-alive\r\n"
                                b"Content-Length: 2\r\n\r\nv1" % key.encode())
        self.assertIn(b"\r\nConnection: keep-alive\r\n", reply)
        self.assertIn(("ETag: %s\r\n" % self.get_tag("/kv/" + key)).encode(), reply)
        self.assertTrue(reply.endswith(b"\r\n\r\n"), reply)


class ConditionalWriteTests(ConditionalTestCase):

    def test_if_match_current_tag_writes(self):
        path = "/kv/" + self.key()
        tag = self.put_tag(path, b"one")
        new = self.put_tag(path, b"two", {"If-Match": tag})
        self.assertEqual(self.get_value(path), b"two")
        self.assertEqual(self.get_tag(path), new)

    def test_if_match_stale_tag_is_412_and_changes_nothing(self):
        path = "/kv/" + self.key()
        stale = self.put_tag(path, b"one")
        self.put_tag(path, b"two")
        self.assert_412("PUT", path, b"three", {"If-Match": stale})
        self.assertEqual(self.get_value(path), b"two")

    def test_if_match_list(self):
        path = "/kv/" + self.key()
        tag = self.put_tag(path, b"one")
        other = '"%s"' % ("0" * 32)
        self.assert_412("PUT", path, b"x", {"If-Match": '%s, "nope"' % other})
        self.put_tag(path, b"two", {"If-Match": '%s,%s , "nope"' % (other, tag)})
        self.assertEqual(self.get_value(path), b"two")

    def test_if_match_repeated_header_is_a_list(self):
        path = "/kv/" + self.key()
        tag = self.put_tag(path, b"one")
        conn = self.server.connection()
        self.addCleanup(conn.close)
        conn.putrequest("PUT", path)
        conn.putheader("If-Match", '"nope"')
        conn.putheader("If-Match", tag)
        conn.putheader("Content-Length", "3")
        conn.endheaders(b"two")
        resp = conn.getresponse()
        self.assertEqual((resp.status, resp.read()), (200, b""))
        self.assertEqual(self.get_value(path), b"two")

    def test_weak_tag_never_matches_if_match(self):
        path = "/kv/" + self.key()
        tag = self.put_tag(path, b"one")
        self.assert_412("PUT", path, b"two", {"If-Match": "W/" + tag})
        self.assert_412("DELETE", path, None, {"If-Match": "W/" + tag})
        self.assertEqual(self.get_value(path), b"one")

    def test_if_match_star(self):
        path = "/kv/" + self.key()
        self.assert_412("PUT", path, b"x", {"If-Match": "*"})
        self.assertError("GET", path, 404, "key not found\n")
        self.put_tag(path, b"one")
        self.put_tag(path, b"two", {"If-Match": "*"})
        self.assertEqual(self.get_value(path), b"two")

    def test_if_none_match_star_creates_only(self):
        path = "/kv/" + self.key()
        tag = self.put_tag(path, b"created", {"If-None-Match": "*"})
        self.assert_412("PUT", path, b"overwritten", {"If-None-Match": "*"})
        self.assertEqual(self.get_value(path), b"created")
        self.assertEqual(self.get_tag(path), tag)

    def test_if_none_match_tag_on_put(self):
        path = "/kv/" + self.key()
        tag = self.put_tag(path, b"one")
        self.assert_412("PUT", path, b"two", {"If-None-Match": tag})
        self.assert_412("PUT", path, b"two", {"If-None-Match": "W/" + tag})    # weak comparison
        self.put_tag(path, b"three", {"If-None-Match": '"other"'})
        self.assertEqual(self.get_value(path), b"three")

    def test_conditional_delete(self):
        path = "/kv/" + self.key()
        stale = self.put_tag(path, b"one")
        tag = self.put_tag(path, b"two")
        self.assert_412("DELETE", path, None, {"If-Match": stale})
        self.assertEqual(self.get_value(path), b"two")
        self.assert_412("DELETE", path, None, {"If-None-Match": "*"})
        self.assertResponse("DELETE", path, 200, b"", None, {"If-Match": tag})
        self.assertError("GET", path, 404, "key not found\n")
        self.assert_412("DELETE", path, None, {"If-Match": "*"})        # nothing to match
        self.assertResponse("DELETE", path, 200, b"", None, {"If-None-Match": "*"})

    def test_conditional_write_of_a_big_value(self):
        path = "/kv/" + self.key()
        first, second = os.urandom(BIG), os.urandom(BIG)
        tag = self.put_tag(path, first)
        new = self.put_tag(path, second, {"If-Match": tag})
        self.assert_412("PUT", path, first, {"If-Match": tag})
        self.assertEqual(self.get_value(path), second)
        self.assertEqual(self.get_tag(path), new)

    def test_malformed_condition_is_400_and_changes_nothing(self):
        path = "/kv/" + self.key()
        self.put_tag(path, b"kept")
        for name in ("If-Match", "If-None-Match"):
            for value in ("abc", '"unterminated', '"a" "b"', '*, "a"', "W/abc", '"a"x'):
                with self.subTest(name=name, value=value):
                    self.assertError("PUT", path, 400, "bad %s header\n" % name, b"new",
                                     {name: value})
                    self.assertError("DELETE", path, 400, "bad %s header\n" % name, None,
                                     {name: value})
        self.assertEqual(self.get_value(path), b"kept")

    def test_unconditional_writes_are_unchanged(self):
        # No header, no condition: overwrite and delete of an absent key still 200.
        path = "/kv/" + self.key()
        self.put_tag(path, b"one")
        self.put_tag(path, b"two")
        self.assertResponse("DELETE", path, 200)
        self.assertResponse("DELETE", path, 200)


class ConditionalReadTests(ConditionalTestCase):

    def request_on(self, conn, method, path, headers=None):
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()

    def test_if_none_match_current_tag_is_304_without_body(self):
        path = "/kv/" + self.key()
        value = b"0123456789"
        tag = self.put_tag(path, value)
        conn = self.server.connection()
        self.addCleanup(conn.close)
        for method in ("GET", "HEAD"):
            with self.subTest(method=method):
                status, headers, body = self.request_on(conn, method, path,
                                                        {"If-None-Match": tag})
                self.assertEqual((status, body), (304, b""))
                self.assertEqual(headers["ETag"], tag)
                # RFC 9110 8.6: a 304's Content-Length, if any, is the 200's.
                self.assertEqual(headers["Content-Length"], str(len(value)))
                # 15.4.5: a 304 has no content, so nothing has a type; a
                # cache updates the stored 200's headers from it.
                self.assertNotIn("Content-Type", headers)
                self.assertEqual(headers.get_all("Cache-Control"), ["no-cache"])
        # Had the 304 carried a body, this reply would be garbled.
        self.assertEqual(self.request_on(conn, "GET", path)[::2], (200, value))

    def test_304_sends_no_body_bytes(self):
        path = "/kv/" + self.key()
        tag = self.put_tag(path, b"payload-that-must-not-be-sent")
        reply = self.server.raw(("GET %s HTTP/1.1\r\nHost: x\r\nIf-None-Match: %s\r\n"
                                 "Connection: close\r\n\r\n" % (path, tag)).encode())
        self.assertTrue(reply.startswith(b"HTTP/1.1 304 "), reply)
        self.assertTrue(reply.endswith(b"\r\n\r\n"), reply)
        self.assertNotIn(b"payload", reply)

    def test_if_none_match_weak_list_and_star(self):
        path = "/kv/" + self.key()
        tag = self.put_tag(path, b"v")
        for header in ("W/" + tag, '"x", %s' % tag, "*"):
            with self.subTest(header=header):
                status, _, body = self.server.request("GET", path, headers={"If-None-Match": header})
                self.assertEqual((status, body), (304, b""))

    def test_if_none_match_other_tag_is_200(self):
        path = "/kv/" + self.key()
        stale = self.put_tag(path, b"old")
        tag = self.put_tag(path, b"new")
        headers = self.assertResponse("GET", path, 200, b"new", None, {"If-None-Match": stale})
        self.assertEqual(headers["ETag"], tag)

    def test_if_none_match_on_absent_key_is_404(self):
        self.assertError("GET", "/kv/" + self.key(), 404, "key not found\n", None,
                         {"If-None-Match": "*"})

    def test_if_match_on_get(self):
        path = "/kv/" + self.key()
        stale = self.put_tag(path, b"old")
        tag = self.put_tag(path, b"new")
        self.assert_412("GET", path, None, {"If-Match": stale})
        self.assertResponse("GET", path, 200, b"new", None, {"If-Match": tag})


class RaceTests(ConditionalTestCase):
    """Many clients with the same tag: the check and the write are one step, so one wins."""

    CLIENTS = 50

    def race(self, path, headers):
        """CLIENTS PUTs of distinct values sent at once; returns [(status, etag, value)]."""
        conns = [self.server.connection(60) for _ in range(self.CLIENTS)]
        for conn in conns:
            conn.connect()
            self.addCleanup(conn.close)
        start = threading.Barrier(self.CLIENTS)
        results = [None] * self.CLIENTS

        def client(i):
            value = b"client-%d" % i
            try:
                start.wait(30)
                conns[i].request("PUT", path, body=value, headers=headers)
                resp = conns[i].getresponse()
                resp.read()
                results[i] = (resp.status, resp.headers.get("ETag"), value)
            except Exception as e:      # noqa: BLE001 - reported by the assertion below
                results[i] = (repr(e), None, value)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(self.CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results

    def assert_one_winner(self, path, results):
        statuses = sorted(str(status) for status, _, _ in results)
        self.assertEqual(statuses, ["200"] + ["412"] * (self.CLIENTS - 1), statuses)
        (_, etag, value), = [r for r in results if r[0] == 200]
        self.assertEqual(self.get_value(path), value)
        self.assertEqual(self.get_tag(path), etag)

    def test_50_clients_if_match_the_same_tag(self):
        path = "/kv/" + self.key()
        tag = self.put_tag(path, b"start")
        self.assert_one_winner(path, self.race(path, {"If-Match": tag}))

    def test_50_clients_create_the_same_key(self):
        path = "/kv/" + self.key()
        self.assert_one_winner(path, self.race(path, {"If-None-Match": "*"}))


class RestartTests(support.ServerTestCase):
    """A tag is a digest of the value: the same after a restart, clean or not."""

    def tags(self, server, keys):
        return {key: server.request("GET", "/kv/" + key)[1]["ETag"] for key in keys}

    def check_restart(self, signum):
        server = self.start_server()
        values = {"small": b"small value", "big": os.urandom(BIG)}
        for key, value in values.items():
            server.put(key, value)
        before = self.tags(server, values)
        server.stop(signum)
        server = self.restart(server)
        self.assertEqual(self.tags(server, values), before)
        for key in values:
            status, _, body = server.request("GET", "/kv/" + key,
                                             headers={"If-None-Match": before[key]})
            self.assertEqual((status, body), (304, b""), key)
            status, _, _ = server.request("PUT", "/kv/" + key, b"next",
                                          headers={"If-Match": before[key]})
            self.assertEqual(status, 200, key)

    def test_tags_survive_sigterm(self):
        self.check_restart(signal.SIGTERM)

    def test_tags_survive_sigkill(self):
        self.check_restart(signal.SIGKILL)

    def test_failed_condition_is_not_in_the_journal(self):
        server = self.start_server()
        server.put("k", b"kept")
        status, _, _ = server.request("PUT", "/kv/k", b"refused", headers={"If-None-Match": "*"})
        self.assertEqual(status, 412)
        server.kill()
        server = self.restart(server)
        self.assertEqual(server.get("k"), b"kept")


class StoreConditionTest(unittest.TestCase):
    """Store.put's check and write are one critical section (a unit test: see below).

    Over HTTP the server runs one request at a time, so RaceTests passes
    even with a check made apart from the write.  Here each writer's
    condition sleeps, letting the others run between check and write if
    the lock allowed it: exactly one may still win.
    """

    def open_store(self):
        directory = tempfile.mkdtemp(prefix="kvtest-store-")
        self.addCleanup(shutil.rmtree, directory, True)
        data, generation, _ = persistence.load(directory, lambda line: None)
        journal = persistence.Journal(directory, generation, "no")
        self.addCleanup(journal.close)
        return store_module.Store(data, journal, 1 << 40, lambda line: None), journal

    def test_threads_racing_with_the_same_tag(self):
        store, _ = self.open_store()
        store.put("k", b"start")
        _, tag = store.get_tagged("k")

        def holds(current):
            time.sleep(0.002)               # lets the other threads run, if they may
            return current == tag

        start, wins, lost = threading.Barrier(20), [], []

        def writer(i):
            start.wait(30)
            try:
                store.put("k", b"writer-%d" % i, condition=holds)
                wins.append(i)
            except store_module.ConditionFailed:
                lost.append(i)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual((len(wins), len(lost)), (1, 19))
        self.assertEqual(store.get("k"), b"writer-%d" % wins[0])

    def test_reads_during_a_queued_write_keep_the_old_tag(self):
        # A write is applied once durable, but its value's tag is kept when it
        # is queued: a read in between must get the old value's own tag, and
        # a condition must already see the new one.
        store, journal = self.open_store()
        old, new = os.urandom(BIG), os.urandom(BIG)
        old_tag, new_tag = store_module.value_tag(old), store_module.value_tag(new)
        store.put("k", old, tag=old_tag)
        # The journal's writer, a process, held still: the write stays queued.
        # (A patch of this process's _write_group, as once, no longer holds
        # it: the test then raced the writer, and failed when it lost.)
        writer = journal._process.pid
        done = threading.Event()
        os.kill(writer, signal.SIGSTOP)
        try:
            store.put("k", new, tag=new_tag, on_durable=lambda error: done.set())
            self.assert_tagged(store, old, old_tag)
            with self.assertRaises(store_module.ConditionFailed):
                store.put("k", b"x", condition=lambda tag: tag == old_tag)
            self.assertFalse(done.is_set())
        finally:
            os.kill(writer, signal.SIGCONT)
        self.assertTrue(done.wait(30))
        self.assert_tagged(store, new, new_tag)

    def assert_tagged(self, store, value, tag):
        """store.get_tagged("k") is (value, tag); not assertEqual, whose diff of
        two MiB of bytes takes minutes."""
        got_value, got_tag = store.get_tagged("k")
        self.assertEqual(got_tag, tag)
        self.assertTrue(got_value == value, "the value of another write")
