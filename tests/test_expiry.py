"""Black-box tests of expiry (?ttl=), the revision (KV-Revision) and watches (?wait=).

Deadlines are whole seconds, so the tests that wait for an expiry take
one to two seconds each; they poll with deadlines, never sleep blindly.
A watch is known to be held once /metrics counts it (kvstore_watches):
only then does a test make the change that must wake it.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest

from tests import support
from tests.support import metric
from tests.test_docs import readme, shell_recipes
from tests.test_http_api import SharedServerTestCase
from tests.test_http_protocol import RawConnection


def revision(headers):
    return int(headers["KV-Revision"])


class Held(threading.Thread):
    """A request sent on a thread of its own; its reply in .reply = (status, headers, body)."""

    def __init__(self, server, method, path, headers=None):
        super().__init__(daemon=True)
        self.server, self.method, self.path, self.headers = server, method, path, headers
        self.reply, self.answered_at = None, None
        self.start()

    def run(self):
        self.reply = self.server.request(self.method, self.path, headers=self.headers,
                                         timeout=60)
        self.answered_at = time.monotonic()

    def result(self, timeout=10):
        self.join(timeout)
        if self.reply is None:
            raise AssertionError("%s %s: no answer within %s s" % (self.method, self.path,
                                                                    timeout))
        return self.reply


def wait_watches(server, count):
    support.wait_until(lambda: metric(server, "kvstore_watches") == count, timeout=10,
                       message="%d watches held" % count)


class ExpiryTest(SharedServerTestCase):

    def put(self, path, value=b"v", headers=None):
        status, got, body = self.server.request("PUT", path, value, headers)
        return status, got, body

    def test_a_bad_ttl_is_400_and_writes_nothing(self):
        key = self.key()
        for ttl in ("0", "-1", "1.5", "abc", "", "315360001", "99999999999", "1&ttl=2"):
            with self.subTest(ttl=ttl):
                status, headers, body = self.put("/kv/%s?ttl=%s" % (key, ttl))
                self.assertEqual(status, 400, body)
                self.assertIn(b"ttl", body)
                self.assertIn("KV-Revision", headers)
        self.assertIsNone(self.server.get(key))
        self.assertEqual(self.put("/kv/%s?ttl=315360000" % key)[0], 200)

    def test_a_refusal_before_routing_carries_the_revision(self):
        connection = RawConnection(self.server)
        connection.send(b"PUT /kv/%s HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n"
                        % self.key().encode())     # refused from its Content-Length
        reply = connection.response()
        self.assertEqual(reply.status, 413)
        self.assertIsNotNone(reply.get("KV-Revision"))

    def test_ttl_header_counts_down_and_a_put_without_ttl_makes_the_key_permanent(self):
        key = self.key()
        self.assertEqual(self.put("/kv/%s?ttl=100" % key)[0], 200)
        for method in ("GET", "HEAD"):
            status, headers, _ = self.server.request(method, "/kv/" + key)
            self.assertEqual(status, 200)
            self.assertIn(int(headers["KV-TTL"]), (99, 100))
        self.assertEqual(self.put("/kv/" + key)[0], 200)
        status, headers, _ = self.server.request("GET", "/kv/" + key)
        self.assertEqual(status, 200)
        self.assertNotIn("KV-TTL", headers)

    def test_an_expired_key_is_gone_for_reads_the_listing_and_conditions(self):
        key = self.key()
        self.assertEqual(self.put("/kv/%s.short?ttl=1" % key, b"short")[0], 200)
        self.assertEqual(self.put("/kv/%s.long?ttl=300" % key, b"long")[0], 200)
        status, _, body = self.server.request("GET", "/kv?prefix=" + key)
        self.assertEqual(body.split(), [(key + ".long").encode(), (key + ".short").encode()])
        support.wait_until(lambda: self.server.get(key + ".short") is None, timeout=5,
                           message="the key expires")
        self.assertEqual(self.server.request("HEAD", "/kv/%s.short" % key)[0], 404)
        status, _, body = self.server.request("GET", "/kv?prefix=" + key)
        self.assertEqual(body.split(), [(key + ".long").encode()])
        # If-Match: * fails on an expired key; If-None-Match: * creates it again.
        self.assertEqual(self.put("/kv/%s.short" % key, b"x", {"If-Match": "*"})[0], 412)
        self.assertEqual(self.put("/kv/%s.short" % key, b"x", {"If-None-Match": "*"})[0], 200)
        self.assertEqual(self.server.get(key + ".short"), b"x")
        self.assert_intact()

    def test_a_lock_with_a_lease_frees_itself_and_is_renewed_with_if_match(self):
        lock = "/kv/%s?ttl=1" % self.key()
        status, headers, _ = self.put(lock, b"me", {"If-None-Match": "*"})
        self.assertEqual(status, 200)
        tag = headers["ETag"]
        self.assertEqual(self.put(lock, b"you", {"If-None-Match": "*"})[0], 412)
        # Renewed for longer: it outlives its first lease.
        status, headers, _ = self.put("/kv/%s?ttl=30" % self.key(), b"me", {"If-Match": tag})
        self.assertEqual(status, 200)
        self.assertGreater(int(self.server.request("GET", "/kv/" + self.key())[1]["KV-TTL"]), 2)
        self.assertEqual(self.put(lock, b"me", {"If-Match": tag})[0], 200)     # lease: 1 s
        support.wait_until(lambda: self.put(lock, b"you", {"If-None-Match": "*"})[0] == 200,
                           timeout=5, message="the lock frees itself")
        self.assertEqual(self.server.get(self.key()), b"you")

    def test_every_reply_about_kv_carries_the_revision_and_each_write_adds_one(self):
        # Other tests' keys expire meanwhile (each expiry is a revision): only
        # the order of revisions is certain, and a write's own.
        key = self.key()
        status, headers, _ = self.put("/kv/" + key)
        first = revision(headers)
        replies = [self.put("/kv/" + key, b"2"), self.server.request("DELETE", "/kv/" + key)]
        second, third = [revision(h) for _, h, _ in replies]
        self.assertLess(first, second)
        self.assertLess(second, third)
        for method, path, expected in (("GET", "/kv/" + key, 404), ("GET", "/kv", 200),
                                       ("GET", "/kv?limit=0", 400), ("POST", "/kv/x", 405),
                                       ("GET", "/kv/a%20b", 400)):
            with self.subTest(path=path):
                status, headers, _ = self.server.request(method, path)
                self.assertEqual(status, expected)
                self.assertGreaterEqual(revision(headers), third)
        status, headers, _ = self.put("/kv/" + key, b"3", {"If-Match": '"nope"'})
        self.assertEqual(status, 412)
        self.assertGreaterEqual(revision(headers), third)


class WatchTest(SharedServerTestCase):

    server_args = ("--max-watchers", "3")

    def tag_of(self, key):
        return self.server.request("GET", "/kv/" + key)[1]["ETag"]

    def test_a_key_watch_is_woken_by_a_put_a_delete_and_an_expiry(self):
        key = self.key()
        absent = Held(self.server, "GET", "/kv/%s?wait=30" % key)
        wait_watches(self.server, 1)
        self.server.put(key, b"one")
        status, headers, body = absent.result()
        self.assertEqual((status, body), (200, b"one"))
        same = Held(self.server, "GET", "/kv/%s?wait=30" % key, {"If-None-Match": headers["ETag"]})
        wait_watches(self.server, 1)
        self.server.put(key, b"one")            # the same bytes: the answer is still 304
        self.server.put(key + ".other", b"x")
        self.assertIsNone(same.reply)
        self.assertEqual(self.server.request("DELETE", "/kv/" + key)[0], 200)
        self.assertEqual(same.result()[0], 404)
        self.assertEqual(self.server.request("PUT", "/kv/%s?ttl=1" % key, b"two")[0], 200)
        expiring = Held(self.server, "HEAD", "/kv/%s?wait=30" % key,
                        {"If-None-Match": self.tag_of(key)})
        status, headers, _ = expiring.result()
        self.assertEqual(status, 404)
        self.assertEqual(metric(self.server, "kvstore_watches"), 0)

    def test_a_watch_that_sees_no_change_is_answered_when_its_time_is_up(self):
        key = self.key()
        self.server.put(key, b"v")
        started = time.monotonic()
        status, headers, body = self.server.request(
            "GET", "/kv/%s?wait=1" % key, headers={"If-None-Match": self.tag_of(key)})
        self.assertEqual((status, body), (304, b""))
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        # A reply that is not 304 or 404 is given at once.
        self.assertEqual(self.server.request("GET", "/kv/%s?wait=300" % key)[0], 200)
        for wait in ("0", "301", "x"):
            self.assertEqual(self.server.request("GET", "/kv/%s?wait=%s" % (key, wait))[0], 400)

    def test_a_prefix_watch_is_woken_by_its_prefix_only(self):
        key = self.key()
        self.server.put(key + ".a", b"1")
        _, headers, _ = self.server.request("GET", "/kv?prefix=" + key)
        since = revision(headers)
        watch = Held(self.server, "GET", "/kv?prefix=%s.&wait=30&since=%d" % (key, since))
        wait_watches(self.server, 1)
        self.server.put("other." + key, b"x")
        self.server.put(key + "-not-under", b"x")
        self.assertIsNone(watch.reply)
        self.server.put(key + ".b", b"2")
        status, headers, body = watch.result()
        self.assertEqual(status, 200)
        self.assertEqual(body.split(), [(key + ".a").encode(), (key + ".b").encode()])
        self.assertGreater(revision(headers), since)
        # Changed since an older revision: at once.
        status, _, body = self.server.request("GET", "/kv?prefix=%s.&wait=30&since=%d"
                                              % (key, since))
        self.assertEqual(status, 200)

    def test_past_the_cap_a_watch_gets_503_with_retry_after(self):
        key = self.key()
        held = [Held(self.server, "GET", "/kv/%s%d?wait=30" % (key, i)) for i in range(3)]
        wait_watches(self.server, 3)
        status, headers, body = self.server.request("GET", "/kv/%s?wait=30" % key)
        self.assertEqual(status, 503, body)
        self.assertIn("Retry-After", headers)
        self.assertEqual(self.server.request("GET", "/kv/" + key)[0], 404)   # no wait: served
        for i, watch in enumerate(held):
            self.server.put("%s%d" % (key, i), b"v")
            self.assertEqual(watch.result()[0], 200)
        wait_watches(self.server, 0)

    def test_a_client_that_leaves_takes_its_watch_with_it(self):
        key = self.key()
        with socket.create_connection((self.server.host, self.server.port)) as sock:
            sock.sendall(b"GET /kv/%s?wait=300 HTTP/1.1\r\nHost: x\r\n\r\n" % key.encode())
            wait_watches(self.server, 1)
        wait_watches(self.server, 0)


class RestartTest(support.ServerTestCase):

    def test_ttl_and_revision_survive_sigterm_and_sigkill(self):
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with self.subTest(signal=signum.name):
                server = self.start_server()
                server.put("permanent", b"p")
                self.assertEqual(server.request("PUT", "/kv/long?ttl=300", b"l")[0], 200)
                status, headers, _ = server.request("PUT", "/kv/short?ttl=1", b"s")
                before = revision(headers)
                self.assertEqual(server.stop(signum), 0 if signum == signal.SIGTERM else -9)
                server = self.restart(server)
                status, headers, _ = server.request("GET", "/kv/long")
                self.assertEqual(status, 200)
                self.assertLessEqual(int(headers["KV-TTL"]), 300)
                self.assertNotIn("KV-TTL", server.request("GET", "/kv/permanent")[1])
                self.assertGreaterEqual(revision(headers), before)
                # Changes before the start are not remembered: a watch since then is
                # answered at once.
                started = time.monotonic()
                status, _, body = server.request("GET", "/kv?prefix=zz&wait=30&since=1")
                self.assertEqual((status, body), (200, b""))
                self.assertLess(time.monotonic() - started, 5)
                # The short one expires, after the restart too, and its expiry counts.
                support.wait_until(lambda: server.get("short") is None, timeout=5,
                                   message="the key expires")
                support.wait_until(lambda: revision(server.request("GET", "/kv")[1]) == before + 1,
                                   timeout=5, message="the expiry is journaled")
                self.assertEqual(server.stop(), 0)
                server = self.restart(server)
                self.assertEqual(revision(server.request("GET", "/kv")[1]), before + 1)
                self.assertIsNone(server.get("short"))
                self.assertEqual(server.request("DELETE", "/clear")[0], 200)
                server.stop()

    def test_five_thousand_expired_keys_are_reclaimed_without_a_read(self):
        server = self.start_server()
        count, batch = 5000, 250
        with socket.create_connection((server.host, server.port)) as sock:
            # Batches small enough for the socket buffers: a client that sends
            # everything before reading a reply is one that does not read.
            for first in range(0, count, batch):
                sock.sendall(b"".join(
                    b"PUT /kv/k%d?ttl=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                    % i + b"v" * 100 for i in range(first, first + batch)))
                replies = b""
                while replies.count(b"HTTP/1.1 200") < batch:
                    chunk = sock.recv(1 << 16)
                    self.assertTrue(chunk, "the server closed the connection")
                    replies += chunk
        # Some may have expired already (the ttl is 1 s), some expire meanwhile:
        # both counts from one instant.
        self.assertEqual(sum(metric(server, "kvstore_keys", "kvstore_keys_expired_total")),
                         count)
        support.wait_until(lambda: metric(server, "kvstore_keys") == 0, timeout=10,
                           message="expired keys reclaimed")
        self.assertEqual(metric(server, "kvstore_keys_expired_total"), count)
        self.assertEqual(metric(server, "kvstore_value_bytes"), 0)
        self.assertEqual(metric(server, "kvstore_keys_expiring"), 0)

    def test_sigterm_answers_the_watches_at_once(self):
        server = self.start_server()
        server.put("there", b"v")
        tag = server.request("GET", "/kv/there")[1]["ETag"]
        held = [Held(server, "GET", "/kv/absent%d?wait=300" % i) for i in range(5)]
        held.append(Held(server, "GET", "/kv/there?wait=300", {"If-None-Match": tag}))
        wait_watches(server, 6)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        self.assertEqual([watch.result()[0] for watch in held], [404] * 5 + [304])
        self.assertEqual(server.wait(), 0)
        self.assertLess(time.monotonic() - started, 5)

    def test_a_watch_that_begins_during_the_drain_is_answered_at_once(self):
        # A GET whose body is still coming when the stop begins is served
        # after it (so is a read pipelined behind a write): its watch was
        # held to its end, and the stop waited --shutdown-timeout for it.
        server = self.start_server("--shutdown-timeout", "20")
        with socket.create_connection((server.host, server.port), timeout=30) as sock:
            sock.sendall(b"GET /kv/absent?wait=300 HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 1\r\nExpect: 100-continue\r\n\r\n")
            self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 100 Continue"))
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            server.wait_for_line("Received SIGTERM")
            sock.sendall(b"x")
            reply = support.read_until_quiet(sock, 30)
        self.assertTrue(reply.startswith(b"HTTP/1.1 404 "), reply)
        self.assertIn(b"\r\nConnection: close\r\n", reply)
        self.assertEqual(server.wait(), 0)
        self.assertLess(time.monotonic() - started, 5)


@unittest.skipUnless(shutil.which("curl") or os.environ.get("CI"), "needs curl")
class ReadmeRecipeTest(SharedServerTestCase):
    """The README's shell recipes, run by bash with the real curl against a server (one for
    the class: each recipe has keys of its own)."""

    def setUp(self):
        super().setUp()
        self.data_dir = tempfile.mkdtemp(prefix="kvtest-")     # the recipes' working directory
        self.addCleanup(shutil.rmtree, self.data_dir, True)

    def recipe(self, word):
        found = [script for script in shell_recipes(readme()) if word in script]
        self.assertEqual(len(found), 1, "one README recipe with %r" % word)
        return found[0]

    def run_recipe(self, server, script, **kwargs):
        script = script.replace("localhost:8080", "127.0.0.1:%d" % server.port)
        return subprocess.Popen(["bash", "-euc", script], cwd=self.data_dir,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)

    def test_the_lock_recipe_takes_renews_and_releases_the_lock(self):
        server = self.server
        script = self.recipe("lock.backup")
        out, err = self.run_recipe(server, script).communicate(timeout=30)
        self.assertIsNone(server.get("lock.backup"), err)
        server.request("PUT", "/kv/lock.backup?ttl=30", b"someone else")
        process = self.run_recipe(server, script)
        process.communicate(timeout=30)
        self.assertNotEqual(process.returncode, 0, "the lock was taken twice")
        self.assertEqual(server.get("lock.backup"), b"someone else")

    def test_the_cache_recipe_shows_the_seconds_left(self):
        server = self.server
        process = self.run_recipe(server, self.recipe("cache.user.7"))
        out, err = process.communicate(timeout=30)
        self.assertEqual(process.returncode, 0, err)
        self.assertRegex(out.decode(), r"(?i)^KV-TTL: (59|60)\r?$")

    def test_the_watch_recipe_prints_each_new_version(self):
        server = self.server
        process = self.run_recipe(server, self.recipe("config.app"), start_new_session=True)
        self.addCleanup(lambda: process.poll() is None and os.killpg(process.pid, signal.SIGKILL))
        wait_watches(server, 1)
        server.put("config.app", b"version 1")
        wait_watches(server, 1)
        server.put("config.app", b"version 2")
        wait_watches(server, 1)
        os.killpg(process.pid, signal.SIGTERM)
        out, _ = process.communicate(timeout=10)
        self.assertEqual(out.decode().splitlines(),
                         ["config.app: version 1", "config.app: version 2"])


if __name__ == "__main__":
    unittest.main()


class WatchCostTest(support.ServerTestCase):
    """A changed key's watches are found a share per loop turn: others are served meanwhile."""

    def test_prefix_watches_of_many_lengths_do_not_hold_up_the_others(self):
        # 400 prefix watches of lengths 150 to 60,000: a changed key is a slice
        # and a lookup per length.  A batch of 300 keys of 60,000 bytes (under
        # none of the prefixes) is 3.6 GB of slices: 2.5 s of the loop in one
        # step before they were shared out.
        server = self.start_server()
        lengths = range(150, 60001, 150)
        batch = b"".join(b'{"key": "%s%05d", "value": "dg=="}\n' % (b"y" * 59995, i)
                         for i in range(300))
        with socket.create_connection((server.host, server.port), timeout=60) as watcher:
            watcher.sendall(b"".join(b"GET /kv?prefix=%s&wait=60 HTTP/1.1\r\nHost: t\r\n\r\n"
                                     % (b"z" * n) for n in lengths))
            wait_watches(server, len(lengths))
            latencies, stop = [], threading.Event()

            def probe():
                conn = server.connection(30)
                while not stop.is_set():
                    started = time.monotonic()
                    conn.request("GET", "/health")
                    conn.getresponse().read()
                    latencies.append(time.monotonic() - started)
                    stop.wait(0.02)         # the probe's pace, on purpose: not a wait
                conn.close()
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            self.assertEqual(server.request("POST", "/batch", batch, timeout=60)[0], 200)
            # A key under the shortest prefix: its round is matched after the
            # batch's, so its watch's answer says the batch's matching is done.
            server.put("z" * 150, b"last")
            first = b""
            while b"\r\n\r\n" not in first:
                data = watcher.recv(65536)
                self.assertTrue(data, "the watcher's connection closed")
                first += data
            stop.set()
            prober.join(30)
        self.assertTrue(first.startswith(b"HTTP/1.1 200 "), first[:100])
        self.assertGreater(len(latencies), 5)
        self.assertLess(max(latencies), 1.0, "the slowest of %d /health" % len(latencies))
