"""Black-box tests of the HTTP API: routing, keys, values, errors, concurrency, logging.

Each test talks to the real server (a subprocess) through `http.client`.
Tests that cannot disturb each other share one server: the classes here
with the same flags, except the one that empties the store (see
`SharedServerTestCase`); each test uses keys named after itself.  Every
response is checked for the framing every response must carry: exactly one
`Content-Type: text/plain; charset=utf-8` and a `Content-Length` equal to
the body's length.

The wire-level behaviour (raw bytes, malformed requests, chunked bodies,
pipelining, 100-continue) is in test_http_protocol.py.
"""
import http.client
import os
import re
import shutil
import tempfile
import threading
import time
import unittest
import uuid

from tests import support

CONTENT_TYPE = "text/plain; charset=utf-8"
KV_ALLOW = "GET, HEAD, PUT, DELETE"


# The servers that classes with `share_server` set share: by module and flags.
_shared_servers = {}


class SharedServerTestCase(unittest.TestCase):
    """One server for the whole class, plus a sentinel key that no test may lose.

    `server_args` are extra command-line flags.  With `share_server` set, the
    class shares its server with every other class of its module that sets it
    and has the same flags (stopped when the module is done).  After an error
    case a test calls `assert_intact()`: the sentinel written in setUpClass
    must still be there, byte for byte.
    """

    server_args = ()
    share_server = False
    SENTINEL_KEY = "sentinel.key"
    SENTINEL_VALUE = bytes(range(256)) * 3     # under the 1000-byte limit of some classes

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        shared = (cls.__module__, tuple(cls.server_args)) if cls.share_server else None
        cls.server = _shared_servers.get(shared)
        if cls.server is None:
            data_dir = tempfile.mkdtemp(prefix="kvtest-http-")
            cls.server = support.ServerProcess(data_dir, *cls.server_args)
            if shared:
                _shared_servers[shared] = cls.server
                unittest.addModuleCleanup(shutil.rmtree, data_dir, True)
                unittest.addModuleCleanup(cls.server.__exit__, None, None, None)
                unittest.addModuleCleanup(_shared_servers.pop, shared, None)
            else:
                cls.addClassCleanup(shutil.rmtree, data_dir, True)
                cls.addClassCleanup(cls.server.__exit__, None, None, None)
            cls.server.start()
        cls.server.put(cls.SENTINEL_KEY, cls.SENTINEL_VALUE)

    # -- helpers ---------------------------------------------------------------

    def key(self, suffix=""):
        """A key of this test's own: the test method's name plus `suffix`."""
        return self._testMethodName + suffix

    def check_framing(self, method, headers, body, what=""):
        """The headers every response carries, and a body that matches its Content-Length."""
        self.assertEqual(headers.get_all("Content-Type"), [CONTENT_TYPE],
                         "Content-Type of %s" % what)
        lengths = headers.get_all("Content-Length")
        self.assertIsNotNone(lengths, "no Content-Length in the response to %s" % what)
        self.assertEqual(len(lengths), 1, "several Content-Length headers for %s" % what)
        if method == "HEAD":
            self.assertEqual(body, b"", "HEAD response to %s has a body" % what)
        else:
            self.assertEqual(int(lengths[0]), len(body), "Content-Length of %s" % what)

    def call(self, method, path, body=None, headers=None):
        """One request on a new connection; checks the framing; returns (status, headers, body)."""
        status, resp_headers, resp_body = self.server.request(method, path, body, headers)
        self.check_framing(method, resp_headers, resp_body, "%s %s" % (method, path))
        return status, resp_headers, resp_body

    def assertResponse(self, method, path, status, body=b"", send=None, headers=None):
        """The request gets exactly this status and body; returns the response headers."""
        got_status, got_headers, got_body = self.call(method, path, send, headers)
        self.assertEqual((got_status, got_body), (status, body),
                         "%s %s" % (method, path))
        return got_headers

    def assertError(self, method, path, status, message, send=None, headers=None):
        """An error response with this status and message, and no data lost."""
        expected = b"" if method == "HEAD" else message.encode()
        got_headers = self.assertResponse(method, path, status, expected, send, headers)
        self.assert_intact()
        return got_headers

    def assert_intact(self):
        status, _, body = self.server.request("GET", "/kv/" + self.SENTINEL_KEY)
        self.assertEqual(status, 200, "the sentinel key is gone")
        self.assertEqual(body, self.SENTINEL_VALUE, "the sentinel value changed")

    def put_ok(self, key_path, value, headers=None):
        self.assertResponse("PUT", key_path, 200, b"", value, headers)

    def get_value(self, key_path):
        status, _, body = self.call("GET", key_path)
        self.assertEqual(status, 200, "GET %s: %d %r" % (key_path, status, body))
        return body


class HealthTests(SharedServerTestCase):
    share_server = True


    def test_get_health(self):
        self.assertResponse("GET", "/health", 200, b"ok\n")

    def test_head_health_has_headers_and_no_body(self):
        headers = self.assertResponse("HEAD", "/health", 200, b"")
        self.assertEqual(headers["Content-Length"], "3")

    def test_health_ignores_query_string(self):
        self.assertResponse("GET", "/health?verbose=1", 200, b"ok\n")


class KeyValueTests(SharedServerTestCase):
    share_server = True


    def test_put_then_get(self):
        path = "/kv/" + self.key()
        self.put_ok(path, b"hello")
        self.assertEqual(self.get_value(path), b"hello")

    def test_put_answers_200_with_empty_body(self):
        headers = self.assertResponse("PUT", "/kv/" + self.key(), 200, b"", b"v")
        self.assertEqual(headers["Content-Length"], "0")

    def test_put_overwrites(self):
        path = "/kv/" + self.key()
        self.put_ok(path, b"first value, longer")
        self.put_ok(path, b"second")
        self.assertEqual(self.get_value(path), b"second")

    def test_get_absent_key_is_404(self):
        self.assertError("GET", "/kv/" + self.key("-never-written"), 404, "key not found\n")

    def test_head_present_key(self):
        path = "/kv/" + self.key()
        self.put_ok(path, b"twelve bytes")
        headers = self.assertResponse("HEAD", path, 200, b"")
        self.assertEqual(headers["Content-Length"], "12")

    def test_head_absent_key_is_404_without_body(self):
        self.assertError("HEAD", "/kv/" + self.key("-never-written"), 404, "key not found\n")

    def test_delete_present_key(self):
        path = "/kv/" + self.key()
        self.put_ok(path, b"doomed")
        headers = self.assertResponse("DELETE", path, 200, b"")
        self.assertEqual(headers["Content-Length"], "0")
        self.assertError("GET", path, 404, "key not found\n")

    def test_delete_absent_key_is_200(self):
        self.assertResponse("DELETE", "/kv/" + self.key("-never-written"), 200, b"")
        self.assert_intact()

    def test_delete_removes_only_that_key(self):
        self.put_ok("/kv/" + self.key("-a"), b"a")
        self.put_ok("/kv/" + self.key("-b"), b"b")
        self.assertResponse("DELETE", "/kv/" + self.key("-a"), 200)
        self.assertEqual(self.get_value("/kv/" + self.key("-b")), b"b")

    def test_put_after_delete(self):
        path = "/kv/" + self.key()
        self.put_ok(path, b"one")
        self.assertResponse("DELETE", path, 200)
        self.put_ok(path, b"two")
        self.assertEqual(self.get_value(path), b"two")


class KeyRuleTests(SharedServerTestCase):
    share_server = True


    def test_every_allowed_character(self):
        key = "AZaz09:_.-" + self.key()
        self.put_ok("/kv/" + key, b"all allowed")
        self.assertEqual(self.get_value("/kv/" + key), b"all allowed")

    def test_keys_are_case_sensitive(self):
        self.put_ok("/kv/" + self.key("-Case"), b"upper")
        self.put_ok("/kv/" + self.key("-case"), b"lower")
        self.assertEqual(self.get_value("/kv/" + self.key("-Case")), b"upper")
        self.assertEqual(self.get_value("/kv/" + self.key("-case")), b"lower")
        self.assertError("GET", "/kv/" + self.key("-CASE"), 404, "key not found\n")

    def test_key_is_percent_decoded(self):
        # %41 is "A", %3a is ":" and %2E is ".": all allowed once decoded.
        self.put_ok("/kv/%41" + self.key("%3a%2E"), b"decoded")
        self.assertEqual(self.get_value("/kv/A" + self.key(":.")), b"decoded")

    def test_dots_inside_a_segment_are_ordinary_characters(self):
        for name in ("...", "a..b", ".hidden", "a/.b", "a/..b/c", "a/b."):
            with self.subTest(key=name):
                self.put_ok("/kv/" + self.key("/") + name, name.encode())
                self.assertEqual(self.get_value("/kv/" + self.key("%2F") + name.replace(
                    ".", "%2E")), name.encode())

    def test_hierarchical_keys(self):
        # Slashes between non-empty segments, as etcd and Consul users write keys;
        # %2F is a slash.
        for name in ("app/db/url", "app/db/user", "a/b/c/d/e/f", "x:1/y_2/z-3"):
            with self.subTest(key=name):
                path = "/kv/" + self.key("/") + name
                self.put_ok(path, name.encode())
                self.assertEqual(self.get_value(path), name.encode())
                encoded = "/kv/" + (self.key("/") + name).replace("/", "%2F")
                self.assertEqual(self.get_value(encoded), name.encode())
                self.assertResponse("HEAD", path, 200)
        path = "/kv/" + self.key("/app/db/url")
        self.assertResponse("DELETE", path, 200)
        self.assertError("GET", path, 404, "key not found\n")
        self.assertEqual(self.get_value("/kv/" + self.key("/app/db/user")), b"app/db/user")

    def test_query_string_is_ignored(self):
        self.put_ok("/kv/" + self.key() + "?x=1", b"queried")
        self.assertEqual(self.get_value("/kv/" + self.key()), b"queried")
        self.assertEqual(self.get_value("/kv/" + self.key() + "?y=2&z"), b"queried")
        self.assertResponse("DELETE", "/kv/" + self.key() + "?", 200)
        self.assertError("GET", "/kv/" + self.key(), 404, "key not found\n")

    def test_long_key(self):
        key = self.key("-") + "k" * 4000
        self.put_ok("/kv/" + key, b"long key")
        self.assertEqual(self.get_value("/kv/" + key), b"long key")

    def test_empty_key(self):
        for method, body in (("GET", None), ("HEAD", None), ("PUT", b"value"), ("DELETE", None)):
            with self.subTest(method=method):
                self.assertError(method, "/kv/", 400, "key cannot be empty\n", body)

    def test_empty_key_with_query_string(self):
        self.assertError("GET", "/kv/?x=1", 400, "key cannot be empty\n")

    INVALID = [
        "a%20b",      # space
        "a//b",       # an empty segment
        "/a",
        "a/",
        "a%2F%2Fb",   # encoded slashes
        "%2Fa",
        "a%2F",
        ".",          # a "." or ".." segment: a path to resolve, not a key
        "..",
        "%2E%2e",
        "a/./b",
        "a/../b",
        "./a",
        "a/..",
        "a/%2E%2E/b",
        "a%25b",      # "%" after decoding
        "a%2541",     # decodes once to "a%41": must not be decoded twice
        "%C3%A9",     # non-ASCII (é in UTF-8)
        "%c3%a9",
        "%E2%9C%93",  # non-ASCII (a check mark)
        "a%00b",      # NUL
        "a%0Ab",      # newline
        "a+b",
        "a~b",
        "a*b",
        "a!b",
        "a,b",
        "a;b",
        "a'b",
        "a%",         # a bare "%", not an escape
        "a%2",
        "a%zz",
    ]

    def test_invalid_keys_on_put(self):
        for key in self.INVALID:
            with self.subTest(key=key):
                self.assertError("PUT", "/kv/" + key, 400, "key contains invalid characters\n",
                                 b"value")

    def test_invalid_keys_on_get_head_delete(self):
        for key in self.INVALID:
            for method in ("GET", "HEAD", "DELETE"):
                with self.subTest(key=key, method=method):
                    self.assertError(method, "/kv/" + key, 400,
                                     "key contains invalid characters\n")

    def test_invalid_key_does_not_store_under_a_mangled_name(self):
        # "a%2F%2Fb" must not be stored as "a", "b", "a/b" nor "ab"; nor "a/../b" as "b".
        self.assertError("PUT", "/kv/" + self.key("%2F%2Fx"), 400,
                         "key contains invalid characters\n", b"value")
        self.assertError("PUT", "/kv/" + self.key("/../y"), 400,
                         "key contains invalid characters\n", b"value")
        for mangled in (self.key(), "x", self.key("x"), self.key("/x"), "y", self.key("y")):
            self.assertError("GET", "/kv/" + mangled, 404, "key not found\n")

    def test_absolute_form_target(self):
        base = "http://%s:%d" % (self.server.host, self.server.port)
        self.put_ok(base + "/kv/" + self.key() + "?q=1", b"absolute")
        self.assertEqual(self.get_value("/kv/" + self.key()), b"absolute")
        self.assertEqual(self.get_value(base + "/kv/" + self.key()), b"absolute")
        self.assertResponse("GET", base + "/health", 200, b"ok\n")


class ValueTests(SharedServerTestCase):
    share_server = True


    def roundtrip(self, value, suffix=""):
        path = "/kv/" + self.key(suffix)
        self.put_ok(path, value)
        self.assertEqual(self.get_value(path), value)
        headers = self.assertResponse("HEAD", path, 200, b"")
        self.assertEqual(int(headers["Content-Length"]), len(value))

    def test_all_byte_values(self):
        self.roundtrip(bytes(range(256)))

    def test_all_byte_values_reversed_and_repeated(self):
        self.roundtrip(bytes(reversed(range(256))) * 17)

    def test_one_mebibyte(self):
        self.roundtrip(os.urandom(1024 * 1024))

    def test_utf8_text(self):
        self.roundtrip("héllo wörld ✓ 日本語 🙂\n".encode("utf-8"))

    def test_single_byte(self):
        self.roundtrip(b"x", "-x")
        self.roundtrip(b"\x00", "-nul")
        self.roundtrip(b"\n", "-newline")

    def test_value_that_looks_like_http(self):
        self.roundtrip(b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n0\r\n\r\n")

    def test_value_with_whitespace_at_the_ends(self):
        self.roundtrip(b"  padded \t\r\n")

    def test_empty_value_is_refused(self):
        path = "/kv/" + self.key()
        self.assertError("PUT", path, 400, "value cannot be empty\n", b"")
        self.assertError("GET", path, 404, "key not found\n")

    def test_empty_value_does_not_erase_existing_value(self):
        path = "/kv/" + self.key()
        self.put_ok(path, b"keep me")
        self.assertError("PUT", path, 400, "value cannot be empty\n", b"")
        self.assertEqual(self.get_value(path), b"keep me")

    def test_put_without_content_length_is_411(self):
        # http.client adds "Content-Length: 0" to a body-less PUT made with
        # request(), so build this one by hand.
        conn = self.server.connection()
        try:
            conn.putrequest("PUT", "/kv/" + self.key())
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        self.check_framing("PUT", resp.headers, body, "PUT without Content-Length")
        self.assertEqual((resp.status, body), (411, b"length required\n"))
        self.assert_intact()
        self.assertError("GET", "/kv/" + self.key(), 404, "key not found\n")


class MethodRoutingTests(SharedServerTestCase):
    share_server = True


    OTHER_METHODS = ("POST", "PATCH", "OPTIONS", "TRACE", "FOO")

    def assert405(self, method, path, allow, body=None):
        headers = self.assertError(method, path, 405, "method not allowed\n", body)
        self.assertEqual(headers.get_all("Allow"), [allow], "Allow header of %s %s" % (method, path))

    def test_other_methods_on_kv(self):
        path = "/kv/" + self.key()
        for method in self.OTHER_METHODS:
            with self.subTest(method=method):
                self.assert405(method, path, KV_ALLOW)

    def test_other_methods_on_kv_with_a_body(self):
        path = "/kv/" + self.key()
        for method in ("POST", "PATCH", "FOO"):
            with self.subTest(method=method):
                self.assert405(method, path, KV_ALLOW, b"a value")
        self.assertError("GET", path, 404, "key not found\n")

    def test_405_on_existing_key_leaves_it_alone(self):
        path = "/kv/" + self.key()
        self.put_ok(path, b"original")
        self.assert405("POST", path, KV_ALLOW, b"replacement")
        self.assertEqual(self.get_value(path), b"original")

    def test_other_methods_on_clear(self):
        for method in ("GET", "PUT", "POST", "PATCH", "OPTIONS", "FOO"):
            with self.subTest(method=method):
                body = b"x" if method in ("PUT", "POST", "PATCH") else None
                self.assert405(method, "/clear", "DELETE", body)

    def test_head_on_clear_is_405_without_body(self):
        self.assert405("HEAD", "/clear", "DELETE")

    def test_other_methods_on_health(self):
        for method in ("PUT", "DELETE", "POST", "PATCH", "OPTIONS", "FOO"):
            with self.subTest(method=method):
                body = b"x" if method in ("PUT", "POST", "PATCH") else None
                self.assert405(method, "/health", "GET, HEAD", body)

    def test_unknown_paths_are_404(self):
        paths = ("/", "/kvx/a", "/kvx", "/foo", "/foo/bar", "/KV/a", "/KV", "/health/x",
                 "/healthz", "/clear/x", "/clearall", "//kv/a", "//kv")
        for path in paths:
            for method in ("GET", "HEAD", "PUT", "DELETE", "POST", "FOO"):
                with self.subTest(path=path, method=method):
                    body = b"x" if method in ("PUT", "POST") else None
                    self.assertError(method, path, 404, "not found\n", body)


class CachingTests(SharedServerTestCase):
    """What a cache between client and server may do with a reply (RFC 9111).

    With no Cache-Control, a cache may reuse a reply for a time of its own
    choosing (heuristic freshness): a stale value, or a 404 after the PUT.
    """

    share_server = True

    def test_a_value_may_be_kept_but_is_revalidated_with_its_etag(self):
        path = "/kv/" + self.key()
        self.put_ok(path, b"v")
        for method in ("GET", "HEAD"):
            with self.subTest(method=method):
                headers = self.assertResponse(method, path, 200, b"v" if method == "GET" else b"")
                self.assertEqual(headers.get_all("Cache-Control"), ["no-cache"])
                self.assertIsNotNone(headers.get("ETag"))

    def test_replies_without_a_validator_are_not_stored(self):
        self.put_ok("/kv/" + self.key(), b"v")
        for method, path in (("GET", "/kv?prefix=" + self.key()), ("GET", "/health"),
                             ("GET", "/metrics"), ("GET", "/kv/" + self.key("-absent")),
                             ("PUT", "/kv/" + self.key()), ("DELETE", "/kv/" + self.key()),
                             ("GET", "/no/such/path"), ("POST", "/kv/x")):
            with self.subTest(method=method, path=path):
                _, headers, _ = self.server.request(method, path,
                                                    b"v" if method == "PUT" else None)
                self.assertEqual(headers.get_all("Cache-Control"), ["no-store"])


class ClearTests(SharedServerTestCase):
    """DELETE /clear empties the store, so it gets a server of its own."""

    def test_clear_removes_everything(self):
        keys = ["clear-%d" % i for i in range(20)]
        for key in keys:
            self.put_ok("/kv/" + key, key.encode())
        headers = self.assertResponse("DELETE", "/clear", 200, b"")
        self.assertEqual(headers["Content-Length"], "0")
        for key in keys + [self.SENTINEL_KEY]:
            self.assertResponse("GET", "/kv/" + key, 404, b"key not found\n")
        # The store still works afterwards, and clearing an empty store is fine.
        self.assertResponse("DELETE", "/clear?x=1", 200, b"")
        self.put_ok("/kv/after-clear", b"new")
        self.assertEqual(self.get_value("/kv/after-clear"), b"new")


class ValueLimitTests(SharedServerTestCase):
    server_args = ("--max-value-bytes", "1000")

    def test_exactly_max_bytes_is_accepted(self):
        path = "/kv/" + self.key()
        value = bytes(range(250)) * 4
        self.put_ok(path, value)
        self.assertEqual(self.get_value(path), value)

    def test_one_byte_over_is_413(self):
        path = "/kv/" + self.key()
        self.assertError("PUT", path, 413, "value too large\n", b"v" * 1001)
        self.assertError("GET", path, 404, "key not found\n")

    def test_413_keeps_the_old_value(self):
        path = "/kv/" + self.key()
        self.put_ok(path, b"small")
        self.assertError("PUT", path, 413, "value too large\n", b"v" * 5000)
        self.assertEqual(self.get_value(path), b"small")


class KeepAliveTests(SharedServerTestCase):
    share_server = True


    def test_many_requests_on_one_connection(self):
        conn = self.server.connection()
        self.addCleanup(conn.close)
        path = "/kv/" + self.key()
        steps = [
            ("PUT", path, b"value one", 200, b""),
            ("GET", path, None, 200, b"value one"),
            ("HEAD", path, None, 200, b""),
            ("PUT", path, b"2", 200, b""),
            ("GET", path, None, 200, b"2"),
            ("GET", "/kv/" + self.key("-absent"), None, 404, b"key not found\n"),
            ("GET", "/kv/a%20b", None, 400, b"key contains invalid characters\n"),
            ("GET", "/health", None, 200, b"ok\n"),
            ("DELETE", path, None, 200, b""),
            ("GET", path, None, 404, b"key not found\n"),
        ]
        sock = None
        for i, (method, target, body, status, expected) in enumerate(steps):
            conn.request(method, target, body=body)
            if sock is None:
                sock = conn.sock
            self.assertIs(conn.sock, sock, "request %d (%s %s) needed a new connection"
                          % (i, method, target))
            resp = conn.getresponse()
            got = resp.read()
            self.check_framing(method, resp.headers, got, "%s %s" % (method, target))
            self.assertEqual((resp.status, got), (status, expected), "%s %s" % (method, target))
            self.assertFalse(resp.will_close, "server closed after %s %s" % (method, target))


class ConcurrencyTests(SharedServerTestCase):
    share_server = True


    THREADS = 32
    ROUNDS = 40        # 4 requests a round: 160 requests a thread
    SHARED_KEYS = 4

    def test_many_threads(self):
        errors = []
        shared_value = re.compile(rb"\d+:\d+:[a-f0-9]{8}")

        def worker(i):
            keep_alive = i % 2 == 0
            conn = self.server.connection() if keep_alive else None
            own = "/kv/" + self.key("-own-%d" % i)

            def call(method, path, body=None):
                c = conn if keep_alive else self.server.connection()
                try:
                    c.request(method, path, body=body)
                    resp = c.getresponse()
                    return resp.status, resp.read()
                finally:
                    if not keep_alive:
                        c.close()
            try:
                for n in range(self.ROUNDS):
                    value = ("%d:%d:%s" % (i, n, uuid.uuid4().hex[:8])).encode()
                    shared = "/kv/" + self.key("-shared-%d" % (n % self.SHARED_KEYS))
                    answers = [
                        (("PUT", own), call("PUT", own, value), (200, b"")),
                        (("GET", own), call("GET", own), (200, value)),
                        (("PUT", shared), call("PUT", shared, value), (200, b"")),
                    ]
                    for what, got, expected in answers:
                        if got != expected:
                            errors.append("thread %d round %d %s: %r, expected %r"
                                          % (i, n, what, got, expected))
                    status, body = call("GET", shared)
                    if status != 200 or not shared_value.fullmatch(body):
                        errors.append("thread %d round %d GET %s: %r"
                                      % (i, n, shared, (status, body)))
                    if len(errors) > 20:
                        return
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append("thread %d: %r" % (i, exc))
            finally:
                if conn is not None:
                    conn.close()

        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(self.THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertFalse([t for t in threads if t.is_alive()], "threads still running")
        self.assertEqual(errors, [])
        # Each thread's own key holds its last write.
        for i in range(self.THREADS):
            value = self.get_value("/kv/" + self.key("-own-%d" % i))
            self.assertTrue(value.startswith(b"%d:%d:" % (i, self.ROUNDS - 1)), value)
        self.assert_intact()


class AccessLogDefaultTests(support.ServerTestCase):

    def test_no_request_log_and_no_value_by_default(self):
        server = self.start_server()
        marker = uuid.uuid4().hex
        key, value = "nolog-" + marker, ("secret-value-" + marker).encode()
        self.assertEqual(server.request("PUT", "/kv/" + key, value)[0], 200)
        self.assertEqual(server.request("GET", "/kv/" + key)[2], value)
        self.assertEqual(server.request("PUT", "/kv/bad%20" + key, value)[0], 400)
        self.assertEqual(server.request("DELETE", "/kv/" + key)[0], 200)
        server.stop()         # all of its output is read once it has exited
        output = server.output()
        self.assertNotIn(marker, output, "a request was logged without --access-log")


class AccessLogTests(SharedServerTestCase):
    """Each test finds its own lines in the class's server's log by a marker of its own."""

    server_args = ("--access-log",)

    def test_one_line_per_request_without_the_value(self):
        server = self.server
        marker = uuid.uuid4().hex
        key, value = "logged-" + marker, ("secret-value-" + marker[::-1]).encode()
        self.assertEqual(server.request("PUT", "/kv/" + key, value)[0], 200)
        self.assertEqual(server.request("GET", "/kv/" + key)[2], value)
        self.assertEqual(server.request("HEAD", "/kv/" + key)[0], 200)
        self.assertEqual(server.request("PUT", "/kv/" + key + "%20bad", value)[0], 400)
        self.assertEqual(server.request("DELETE", "/kv/" + key)[0], 200)
        # Requests are answered in order, so once the last one is logged the
        # others have been too.
        self.assertEqual(server.request("GET", "/kv/end-" + marker)[0], 404)
        server.wait_for_line("end-" + marker, 10)
        lines = [l for l in server.output().splitlines() if key in l]
        self.assertEqual(len(lines), 5, "access log lines for %s:\n%s" % (key, "\n".join(lines)))
        self.assertNotIn(marker[::-1], server.output(), "a value was logged")

    def test_each_line_says_who_what_the_outcome_and_how_long(self):
        server = self.server
        marker = uuid.uuid4().hex
        key, value = "timed-" + marker, b"0123456789"
        waited = {}
        for method, body in (("PUT", value), ("GET", None), ("DELETE", None), ("GET", None)):
            started = time.monotonic()
            server.request(method, "/kv/" + key, body)
            waited.setdefault(method, []).append(time.monotonic() - started)
        server.wait_for_line('"GET /kv/%s" 404' % key, 10)
        line = re.compile(r'(%s) (\S+) "(\S+) (\S+)" (\d{3}) (\d+) (\d+\.\d{6})'
                          % support.TIMESTAMP)
        logged = [line.fullmatch(l) for l in server.output().splitlines() if key in l]
        self.assertTrue(all(logged), "\n".join(server.output().splitlines()[-4:]))
        self.assertEqual([m.group(2, 3, 4, 5, 6) for m in logged],
                         [("127.0.0.1", "PUT", "/kv/" + key, "200", "0"),
                          ("127.0.0.1", "GET", "/kv/" + key, "200", "10"),
                          ("127.0.0.1", "DELETE", "/kv/" + key, "200", "0"),
                          ("127.0.0.1", "GET", "/kv/" + key, "404", "14")])
        seconds = [float(m.group(7)) for m in logged]
        client = waited["PUT"] + waited["GET"][:1] + waited["DELETE"] + waited["GET"][1:]
        for server_side, client_side in zip(seconds, client):
            self.assertLessEqual(server_side, client_side + 0.001)
        self.assertGreater(seconds[0], 0, "a PUT waits for its fsync")

    def test_a_quote_in_the_target_cannot_forge_a_field(self):
        server = self.server
        marker = uuid.uuid4().hex
        reply = server.raw(('GET /kv/x"%s"_200_0 HTTP/1.1\r\nHost: x\r\nConnection: close'
                            '\r\n\r\n' % marker).encode())
        self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), reply)
        line = server.wait_for_line(marker, 10).string
        self.assertIn('"GET /kv/x\\"%s\\"_200_0" 400 ' % marker, line)

    def test_logging_does_not_break_keep_alive_or_errors(self):
        server = self.server
        marker = uuid.uuid4().hex
        conn = server.connection()
        self.addCleanup(conn.close)
        sock = None
        for i in range(3):
            conn.request("GET", "/kv/ka-%s-%d" % (marker, i))
            sock = sock or conn.sock
            self.assertIs(conn.sock, sock, "request %d needed a new connection" % i)
            try:
                resp = conn.getresponse()
            except http.client.RemoteDisconnected:
                self.fail("the server dropped the keep-alive connection: no response to request %d" % i)
            self.assertEqual((resp.status, resp.read()), (404, b"key not found\n"))
        # Errors found before the request is parsed are answered, and logged
        # without breaking the server.
        for data, status in ((b"hello\r\n\r\n", b"400"),
                             (b"GET /" + b"k" * 70000 + b" HTTP/1.1\r\n\r\n", b"414")):
            reply = server.raw(data)
            self.assertTrue(reply.startswith(b"HTTP/1.1 " + status + b" "), reply[:100])
        self.assertEqual(server.request("GET", "/kv/end-" + marker)[0], 404)
        server.wait_for_line("end-" + marker, 10)
        lines = [l for l in server.output().splitlines() if "ka-" + marker in l]
        self.assertEqual(len(lines), 3, "\n".join(lines))
        self.assertNotIn("Traceback", server.output())


if __name__ == "__main__":
    unittest.main()
