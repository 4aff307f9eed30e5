"""Black-box tests of GET /kv?prefix=P&limit=N&after=K, and unit tests of the sorted key index.

Each test of the shared server lists under a prefix of its own (its name),
so that the keys of other tests stay out of its pages.
"""
import random
import re
import shutil
import socket
import tempfile
import unittest
import urllib.parse
from unittest import mock

import persistence
import store as store_module
from tests import support
from tests.test_http_api import SharedServerTestCase

# A relative reference: the query alone, which the client resolves against
# the URL it asked (so that it works under a proxy's sub-path too).
LINK = re.compile(r'<(\?[^>]*)>; rel="next"\Z')


def next_page(target, link):
    """The target of the next page: `link`, a Link header, resolved against `target`."""
    match = LINK.fullmatch(link)
    if match is None:
        raise AssertionError("Link header: %r" % link)
    return urllib.parse.urljoin(target, match.group(1))


def put_many(server, keys, value=b"v", batch=200):
    """PUT every key, pipelined on one connection, `batch` requests at a time."""
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        for start in range(0, len(keys), batch):
            chunk = keys[start:start + batch]
            sock.sendall(b"".join(b"PUT /kv/%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                                  % (key.encode(), len(value), value) for key in chunk))
            replies = b""
            while replies.count(b"\r\n\r\n") < len(chunk):     # each 200 of a PUT has no body
                data = sock.recv(65536)
                if not data:
                    raise AssertionError("the server closed the connection")
                replies += data
            if replies.count(b"HTTP/1.1 200 ") != len(chunk):
                raise AssertionError("a PUT failed: %r" % replies[:300])


class ListingTestCase(SharedServerTestCase):

    def prefix(self):
        return self._testMethodName + ":"

    def listing(self, target, method="GET"):
        """(keys, next target or None) of a 200 listing."""
        status, headers, body = self.call(method, target)
        self.assertEqual(status, 200, "%s %s: %r" % (method, target, body[:200]))
        self.assertTrue(body == b"" or body.endswith(b"\n"), body[-50:])
        keys = body.decode().splitlines()
        link = headers.get("Link")
        if link is None:
            return keys, None
        return keys, next_page(target, link)

    def all_pages(self, target):
        """Every key, following Link headers from `target`; and the number of pages."""
        keys, pages = [], 0
        while target is not None:
            page, target = self.listing(target)
            self.assertTrue(page, "an empty page before the last")
            keys += page
            pages += 1
            self.assertLess(pages, 1000, "the Link headers do not end")
        return keys, pages


class ListingTests(ListingTestCase):

    def test_keys_sorted_one_per_line(self):
        prefix = self.prefix()
        keys = [prefix + k for k in ("b", "a", "B", "10", "9", "a.b", "a-b", "a_b", "z", "A:1")]
        for key in keys:
            self.put_ok("/kv/" + key, b"v")
        got, link = self.listing("/kv?prefix=" + prefix)
        self.assertEqual(got, sorted(keys))
        self.assertIsNone(link)

    def test_prefix_keeps_only_its_keys(self):
        prefix = self.prefix()
        for key in ("a1", "a2", "ab", "b1", "a"):
            self.put_ok("/kv/%s%s" % (prefix, key), b"v")
        self.assertEqual(self.listing("/kv?prefix=%sa" % prefix)[0],
                         [prefix + k for k in ("a", "a1", "a2", "ab")])
        self.assertEqual(self.listing("/kv?prefix=%sa1" % prefix)[0], [prefix + "a1"])
        self.assertEqual(self.listing("/kv?prefix=%sc" % prefix), ([], None))

    def test_after_starts_after_that_key(self):
        prefix = self.prefix()
        for key in ("a", "b", "c", "d"):
            self.put_ok("/kv/%s%s" % (prefix, key), b"v")
        target = "/kv?prefix=%s&after=%s" % (prefix, prefix)
        self.assertEqual(self.listing(target + "b")[0], [prefix + "c", prefix + "d"])
        self.assertEqual(self.listing(target + "bb")[0], [prefix + "c", prefix + "d"])  # absent
        self.assertEqual(self.listing(target + "d"), ([], None))
        # An `after` before the prefix starts at the prefix's first key.
        self.assertEqual(self.listing("/kv?prefix=%s&after=A" % prefix)[0][0], prefix + "a")

    def test_pages_follow_the_link_header(self):
        prefix = self.prefix()
        keys = sorted("%s%03d" % (prefix, i) for i in range(25))
        put_many(self.server, keys)
        page, link = self.listing("/kv?prefix=%s&limit=10" % prefix)
        self.assertEqual(page, keys[:10])
        self.assertEqual(link, "/kv?prefix=%s&limit=10&after=%s"
                         % (prefix.replace(":", "%3A"), keys[9].replace(":", "%3A")))
        got, pages = self.all_pages("/kv?prefix=%s&limit=10" % prefix)
        self.assertEqual((got, pages), (keys, 3))
        # Exactly `limit` left: no Link on the page that takes the last of them.
        self.assertEqual(self.listing("/kv?prefix=%s&limit=5&after=%s" % (prefix, keys[19])),
                         (keys[20:], None))

    def test_the_link_resolves_under_a_proxys_sub_path(self):
        # nginx serving the store under /store/ passes /store/kv?... on as
        # /kv?...; the client follows the Link from the URL it asked.
        prefix = self.prefix()
        for key in ("a", "b"):
            self.put_ok("/kv/%s%s" % (prefix, key), b"v")
        _, headers, _ = self.call("GET", "/kv?prefix=%s&limit=1" % prefix)
        asked = "https://example.com/store/kv?prefix=%s&limit=1" % prefix
        self.assertEqual(next_page(asked, headers["Link"]),
                         "https://example.com/store/kv?prefix=%s&limit=1&after=%s"
                         % (urllib.parse.quote(prefix, safe=""),
                            urllib.parse.quote(prefix + "a", safe="")))

    def test_default_limit_is_1000(self):
        prefix = self.prefix()
        keys = sorted("%s%04d" % (prefix, i) for i in range(1001))
        put_many(self.server, keys)
        page, link = self.listing("/kv?prefix=" + prefix)
        self.assertEqual(page, keys[:1000])
        self.assertIsNotNone(link)
        self.assertEqual(self.listing(link), ([keys[1000]], None))

    def test_limit_10000_is_accepted(self):
        prefix = self.prefix()
        self.put_ok("/kv/%sonly" % prefix, b"v")
        self.assertEqual(self.listing("/kv?prefix=%s&limit=10000" % prefix),
                         ([prefix + "only"], None))

    def test_listing_follows_writes(self):
        prefix = self.prefix()
        self.put_ok("/kv/%sa" % prefix, b"v")
        self.put_ok("/kv/%sb" % prefix, b"v")
        self.assertEqual(self.listing("/kv?prefix=" + prefix)[0], [prefix + "a", prefix + "b"])
        self.assertResponse("DELETE", "/kv/%sa" % prefix, 200)
        self.put_ok("/kv/%sb" % prefix, b"overwritten")
        self.put_ok("/kv/%sc" % prefix, b"v")
        self.assertEqual(self.listing("/kv?prefix=" + prefix)[0], [prefix + "b", prefix + "c"])

    def test_head_is_get_without_body(self):
        prefix = self.prefix()
        for key in ("a", "b", "c"):
            self.put_ok("/kv/%s%s" % (prefix, key), b"v")
        target = "/kv?prefix=%s&limit=2" % prefix
        _, get_headers, body = self.call("GET", target)
        status, head_headers, head_body = self.call("HEAD", target)
        self.assertEqual((status, head_body), (200, b""))
        self.assertEqual(head_headers["Content-Length"], str(len(body)))
        self.assertEqual(head_headers["Link"], get_headers["Link"])

    def test_bad_parameters_are_400(self):
        limit = "limit must be a number from 1 to 10000\n"
        cases = [
            ("limit=0", limit), ("limit=-1", limit), ("limit=10001", limit),
            ("limit=abc", limit), ("limit=", limit), ("limit=1.5", limit),
            ("limit=" + "9" * 5000, limit), ("limit=%C2%B2", limit),
            ("limitt=5", "unknown parameter (known: prefix, after, limit, wait, since)\n"),
            ("limit=5&limit=6", "parameter limit given twice\n"),
            ("prefix=a%20b", "prefix contains invalid characters\n"),
            ("prefix=a%5Cb", "prefix contains invalid characters\n"),
            ("prefix=a+b", "prefix contains invalid characters\n"),
            ("after=%C3%A9", "after contains invalid characters\n"),
            ("after=%FF", "bad query string\n"),
            ("prefix", "bad query string\n"),
            ("prefix=a&&limit=1", "bad query string\n"),
        ]
        for query, message in cases:
            for method in ("GET", "HEAD"):
                with self.subTest(query=query, method=method):
                    self.assertError(method, "/kv?" + query, 400, message)

    def test_other_methods_are_405(self):
        for method, body in (("PUT", b"x"), ("POST", b"x"), ("PATCH", b"x")):
            with self.subTest(method=method):
                headers = self.assertError(method, "/kv", 405, "method not allowed\n", body)
                self.assertEqual(headers.get_all("Allow"), ["GET, HEAD, DELETE"])

    def test_hierarchical_keys_by_prefix(self):
        # A prefix may end with a slash or inside a segment; a page's Link
        # carries it, slashes percent-encoded, and the next page follows.
        prefix = self.prefix()
        keys = sorted(prefix + name for name in (
            "app/db/url", "app/db/user", "app/dbx", "app/web/port", "apple", "b/c"))
        put_many(self.server, keys)
        for under, expected in (("app/", keys[:4]), ("app/db", keys[:3]), ("app/db/", keys[:2]),
                                ("app", keys[:5]), ("b/", keys[5:]), ("app/db/url/", [])):
            with self.subTest(prefix=under):
                target = "/kv?prefix=%s&limit=2" % urllib.parse.quote(prefix + under, safe="")
                got, _ = self.all_pages(target) if expected else (self.listing(target)[0], 1)
                self.assertEqual(got, expected)
        self.assertEqual(self.listing("/kv?prefix=%s&after=%s" % (
            prefix + "app/", prefix + "app/db/user"))[0], keys[2:4])

    def test_empty_key_is_still_400(self):
        for target in ("/kv/", "/kv/?prefix=a"):
            with self.subTest(target=target):
                self.assertError("GET", target, 400, "key cannot be empty\n")

    def test_page_stops_at_a_mebibyte(self):
        prefix = self.prefix()
        keys = sorted("%s%02d-%s" % (prefix, i, "k" * 60000) for i in range(20))
        put_many(self.server, keys, batch=5)
        got, pages = self.all_pages("/kv?prefix=%s&limit=100" % prefix)
        self.assertEqual(got, keys)
        self.assertEqual(pages, 2)


class EmptyStoreListingTests(support.ServerTestCase):

    def test_no_parameters_lists_every_key(self):
        server = self.start_server()
        status, headers, body = server.request("GET", "/kv")
        self.assertEqual((status, body, headers["Content-Length"]), (200, b"", "0"))
        for key in ("b", "a", "c"):
            server.put(key, b"v")
        self.assertEqual(server.request("GET", "/kv")[2], b"a\nb\nc\n")
        self.assertEqual(server.request("DELETE", "/clear")[0], 200)
        self.assertEqual(server.request("GET", "/kv")[2], b"")

    def test_listing_after_a_crash(self):
        server = self.start_server()
        for key in ("b", "a"):
            server.put(key, b"v")
        self.assertEqual(server.request("GET", "/kv")[2], b"a\nb\n")
        server.put("c", b"v")
        server.kill()
        server = self.restart(server)
        self.assertEqual(server.request("GET", "/kv")[2], b"a\nb\nc\n")


class LargeStoreListingTests(support.ServerTestCase):
    """A store larger than KeyIndex.AT_ONCE builds its index in the background."""

    def test_first_listing_is_503_then_every_key(self):
        server = self.start_server("--fsync", "no")
        keys = ["k%06d" % i for i in range(store_module.KeyIndex.AT_ONCE + 500)]
        random.Random(18).shuffle(keys)
        put_many(server, keys)
        status, headers, body = server.request("GET", "/kv?limit=1")
        self.assertEqual((status, body), (503, b"key index being built, retry\n"))
        self.assertEqual(headers["Retry-After"], "1")
        # Writes made while the index is built are in it.
        put_many(server, ["new-%d" % i for i in range(50)])
        for key in keys[:50]:
            self.assertEqual(server.request("DELETE", "/kv/" + key)[0], 200)
        expected = sorted(set(keys[50:]) | {"new-%d" % i for i in range(50)})
        support.wait_until(lambda: server.request("GET", "/kv?limit=1")[0] == 200, 60,
                           message="the key index")
        got, target = [], "/kv?limit=10000"
        while target:
            status, headers, body = server.request("GET", target)
            self.assertEqual(status, 200)
            got += body.decode().splitlines()
            link = headers.get("Link")
            target = next_page(target, link) if link else None
        self.assertEqual(got, expected)


class SortedKeysTest(unittest.TestCase):
    """The index against a sorted list, with tiny blocks so that they split and empty."""

    class Tiny(store_module.SortedKeys):
        BLOCK = 3

    def check(self, index, model, rng):
        model = sorted(model)
        self.assertEqual(index.page("", "", len(model) + 1), model)
        for _ in range(20):
            prefix = rng.choice(["", "a", "b", "ab", "c", "zz"])
            after = rng.choice(["", "a", "ab", "b", "ba", "c"])
            count = rng.randint(1, 8)
            expected = [k for k in model if k.startswith(prefix) and k > after][:count]
            self.assertEqual(index.page(prefix, after, count), expected, (prefix, after, count))

    def test_random_adds_and_removes(self):
        rng = random.Random(18)
        alphabet = "abc"
        for _ in range(20):
            index, model = self.Tiny(), set()
            for _ in range(300):
                key = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
                if rng.random() < 0.6:
                    index.add(key)
                    model.add(key)
                else:
                    index.remove(key)
                    model.discard(key)
            self.check(index, model, rng)

    def test_built_from_sorted_keys(self):
        keys = sorted("k%d" % i for i in range(100))
        index = self.Tiny(keys)
        index.add("k50")                    # already there
        index.remove("nope")
        self.check(index, keys, random.Random(1))


class KeyIndexBuildTest(unittest.TestCase):
    """Writes made while the background build runs end up in the index (a unit test: the
    build's interleaving with writes cannot be steered from outside).  The build's
    thread is held back until the writes are made, then run here."""

    def start_build(self, keys=5000):
        """A store of `keys` keys whose first listing started a build; (store, model, run it)."""
        directory = tempfile.mkdtemp(prefix="kvtest-index-")
        self.addCleanup(shutil.rmtree, directory, True)
        data, generation, _ = persistence.load(directory, lambda line: None)
        data.update(("k%05d" % i, b"v") for i in range(keys))
        journal = persistence.Journal(directory, generation, "no")
        self.addCleanup(journal.close)
        store = store_module.Store(data, journal, 1 << 40, lambda line: None)
        store._contents.keys.AT_ONCE, store._contents.keys.RUN = 0, 7     # many runs to merge
        model = set(data)
        with mock.patch.object(store_module.threading, "Thread") as thread:
            with self.assertRaises(store_module.KeyIndexBuilding):
                store.keys_page()
        build = thread.call_args.kwargs
        return store, model, lambda: build["target"](*build["args"])

    def random_writes(self, store, model, n=3000):
        rng = random.Random(18)
        for _ in range(n):
            key = "k%05d" % rng.randrange(6000)
            if rng.random() < 0.5:
                store.put(key, b"w")
                model.add(key)
            else:
                store.delete(key)
                model.discard(key)

    def test_writes_during_the_build(self):
        store, model, build = self.start_build()
        self.random_writes(store, model)
        with self.assertRaises(store_module.KeyIndexBuilding):
            store.keys_page()
        build()
        self.assertEqual(store.keys_page(limit=10000), (sorted(model), False))
        store.delete("k00001")
        store.put("k99999", b"v")
        model = (model - {"k00001"}) | {"k99999"}
        self.assertEqual(store.keys_page(limit=10000), (sorted(model), False))

    def test_clear_during_the_build(self):
        store, model, build = self.start_build()
        self.random_writes(store, model, 100)
        store.clear()
        model.clear()
        self.random_writes(store, model, 500)
        build()
        self.assertEqual(store.keys_page(limit=10000), (sorted(model), False))


class BenchRowTest(unittest.TestCase):

    def test_make_bench_has_the_listing_rows(self):
        from bench import run
        from bench.listing import listing_rows
        self.assertIn("listing", run.PARTS)
        opts = run.parse_args(["--listing-keys", "0"])
        self.assertIn("listing", opts.skip)
        self.assertIn(("listing", listing_rows), run.OUR_SERVER_MEASUREMENTS)
