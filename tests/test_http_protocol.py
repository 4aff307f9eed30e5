"""Black-box tests of the HTTP/1.x wire protocol, spoken with raw sockets.

Malformed and oversized request lines and headers, Content-Length and
Transfer-Encoding (chunked, ambiguous, unsupported), value limits,
`Expect: 100-continue`, keep-alive, HTTP/1.0, `Connection: close`,
pipelining, and slow clients.  Every response is parsed by hand and checked
for `Content-Type: text/plain; charset=utf-8` and a matching `Content-Length`.
After every error the server must still answer new connections and must
still hold the sentinel key written when the class started.
"""
import http.client
import os
import re
import socket
import sys
import threading
import time
import unittest

from tests import support
from tests.test_http11 import MALFORMED_CHUNKED, MALFORMED_HEADER_LINES, chunked, request  # noqa: F401 (re-exported)
from tests.test_http_api import CONTENT_TYPE, SharedServerTestCase

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)

TIMEOUT = 10          # seconds to wait for any response; a bound, not a goal
MAX_LINE = 65536


class RawResponse:
    def __init__(self, version, status, reason, headers, body):
        self.version, self.status, self.reason = version, status, reason
        self.headers, self.body = headers, body

    def get_all(self, name):
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def get(self, name):
        values = self.get_all(name)
        return values[0] if values else None

    def __repr__(self):
        return "<%s %d %s %r %r>" % (self.version, self.status, self.reason,
                                     self.headers, self.body[:200])


STATUS_LINE = re.compile(rb"(HTTP/\d\.\d) (\d{3})(?: ([^\r\n]*))?\r\n")


def read_response(rfile, method="GET"):
    """Read one response from a binary file; the body is framed by Content-Length."""
    line = rfile.readline(MAX_LINE)
    if not line:
        raise AssertionError("the connection closed before a response to %s" % method)
    match = STATUS_LINE.fullmatch(line)
    if not match:
        raise AssertionError("bad status line %r" % line[:200])
    headers = []
    while True:
        line = rfile.readline(MAX_LINE)
        if not line:
            raise AssertionError("the connection closed inside the response headers")
        if line == b"\r\n":
            break
        if not line.endswith(b"\r\n") or b":" not in line:
            raise AssertionError("bad response header line %r" % line[:200])
        name, _, value = line[:-2].decode("latin-1").partition(":")
        headers.append((name, value.strip()))
    status = int(match.group(2))
    response = RawResponse(match.group(1).decode(), status,
                           (match.group(3) or b"").decode("latin-1"), headers, b"")
    if method == "HEAD" or status < 200 or status in (204, 304):
        return response
    length = response.get("Content-Length")
    if length is None:
        response.body = rfile.read()
    else:
        response.body = rfile.read(int(length))
        if len(response.body) != int(length):
            raise AssertionError("response body cut short: %d of %s bytes"
                                 % (len(response.body), length))
    return response


class RawConnection:
    """A client socket that sends bytes and reads whole responses."""

    def __init__(self, server, timeout=TIMEOUT):
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")
        self.timeout = timeout

    def send(self, data):
        self.sock.sendall(data)

    def response(self, method="GET"):
        try:
            return read_response(self.rfile, method)
        except socket.timeout:
            raise AssertionError("no complete response to %s within %ss"
                                 % (method, self.timeout)) from None
        except ConnectionResetError:
            raise AssertionError("connection reset before a complete response to %s"
                                 % method) from None

    def is_closed(self, timeout=5):
        """True if the server closed (or reset) the connection; raises if it sent more bytes."""
        self.sock.settimeout(timeout)
        try:
            data = self.rfile.read(1)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        if data:
            raise AssertionError("unexpected bytes after the response: %r"
                                 % (data + self.rfile.peek(200)[:200]))
        return True

    def close(self):
        self.rfile.close()
        self.sock.close()


class ProtocolTestCase(SharedServerTestCase):

    def connect(self):
        conn = RawConnection(self.server)
        self.addCleanup(conn.close)
        return conn

    def check_raw_framing(self, response, method="GET"):
        what = "response %d %r" % (response.status, response.body[:100])
        self.assertEqual(response.get_all("Content-Type"), [CONTENT_TYPE],
                         "Content-Type of " + what)
        lengths = response.get_all("Content-Length")
        self.assertEqual(len(lengths), 1, "Content-Length headers of " + what)
        if method != "HEAD":
            self.assertEqual(int(lengths[0]), len(response.body), what)

    def exchange(self, data, method="GET"):
        """Send `data` on a new connection and read one response; return (conn, response)."""
        conn = self.connect()
        conn.send(data)
        response = conn.response(method)
        self.check_raw_framing(response, method)
        return conn, response

    def assertRawResponse(self, data, status, body, method="GET"):
        conn, response = self.exchange(data, method)
        self.assertEqual((response.status, response.body), (status, body),
                         "response to %r" % data[:300])
        return conn, response

    def assertRawError(self, data, status, message, closed=False, method="GET"):
        """`data` gets this error; optionally the connection is then closed; nothing is lost."""
        conn, response = self.assertRawResponse(data, status, message.encode(), method)
        if closed:
            self.assertTrue(conn.is_closed(), "connection left open after %d %r"
                            % (status, message))
        self.assert_serving()
        return conn, response

    def assert_serving(self):
        """A new connection still gets answered, and the sentinel is intact."""
        status, _, body = self.server.request("GET", "/health", timeout=TIMEOUT)
        self.assertEqual((status, body), (200, b"ok\n"), "server no longer healthy")
        self.assert_intact()

    def assert_absent(self, key):
        status, _, body = self.server.request("GET", "/kv/" + key, timeout=TIMEOUT)
        self.assertEqual((status, body), (404, b"key not found\n"), "key %r" % key)

    def assert_value(self, key, value):
        status, _, body = self.server.request("GET", "/kv/" + key, timeout=TIMEOUT)
        self.assertEqual((status, body), (200, value), "key %r" % key)


class RequestLineTests(ProtocolTestCase):

    def test_malformed_request_lines(self):
        for line in (b"hello", b"GET", b"GET /kv/a HTTP/1.1 extra", b"GET  HTTP/1.1 x y"):
            with self.subTest(line=line):
                self.assertRawError(line + b"\r\nHost: test\r\n\r\n", 400, "bad request line\n")

    def test_http_versions_other_than_1x(self):
        for version in ("HTTP/2.0", "HTTP/3.0", "HTTP/0.9"):
            with self.subTest(version=version):
                self.assertRawError(request("GET", "/health", version=version),
                                    505, "http version not supported\n")

    def test_request_line_too_long(self):
        target = "/kv/" + "k" * (MAX_LINE + 5000)
        self.assertRawError(request("GET", target), 414, "request line too long\n")

    def test_long_request_line_within_the_limit(self):
        target = "/kv/" + "k" * (MAX_LINE - 6000)
        self.assertRawResponse(request("GET", target), 404, b"key not found\n")

    def test_request_with_non_ascii_target(self):
        data = b"GET /kv/caf\xc3\xa9 HTTP/1.1\r\nHost: test\r\n\r\n"
        self.assertRawError(data, 400, "key contains invalid characters\n")


class HeaderTests(ProtocolTestCase):

    def test_header_line_too_long(self):
        data = request("GET", "/health", [("X-Big", "b" * (MAX_LINE + 5000))])
        self.assertRawError(data, 431, "header block too large\n")

    def test_long_header_within_the_limit(self):
        data = request("GET", "/health", [("X-Big", "b" * (MAX_LINE - 6000))])
        self.assertRawResponse(data, 200, b"ok\n")

    def test_more_than_100_headers(self):
        # Host plus 100 others: 101 headers.
        headers = [("X-H%d" % i, "v") for i in range(100)]
        self.assertRawError(request("GET", "/health", headers), 431, "too many headers\n")

    def test_100_headers_are_accepted(self):
        headers = [("X-H%d" % i, "v") for i in range(99)]      # plus Host
        self.assertRawResponse(request("GET", "/health", headers), 200, b"ok\n")

    def test_malformed_header_lines(self):
        cases = MALFORMED_HEADER_LINES
        for name, lines in cases.items():
            with self.subTest(name):
                data = request("PUT", "/kv/" + self.key(), lines, b"abc")
                self.assertRawError(data, 400, "bad header line\n")
        self.assert_absent(self.key())

    def test_header_value_whitespace_is_trimmed(self):
        data = request("PUT", "/kv/" + self.key(), ["Content-Length: \t 3 \t"], b"abc")
        self.assertRawResponse(data, 200, b"")
        self.assert_value(self.key(), b"abc")

    def test_header_names_are_case_insensitive(self):
        data = request("PUT", "/kv/" + self.key(), ["cOnTeNt-LeNgTh: 3"], b"xyz")
        self.assertRawResponse(data, 200, b"")
        self.assert_value(self.key(), b"xyz")


class ContentLengthTests(ProtocolTestCase):

    def test_bad_content_length_values(self):
        for value in ("abc", "-5", "1.5", "", "+5", "0x10", "1_0", "5 5", "1e3", "\xb2"):
            with self.subTest(value=value):
                data = request("PUT", "/kv/" + self.key(), [("Content-Length", value)])
                self.assertRawError(data, 400, "bad content-length\n")
        self.assert_absent(self.key())

    def test_two_different_content_lengths(self):
        data = request("PUT", "/kv/" + self.key(),
                       [("Content-Length", "3"), ("Content-Length", "4")])
        self.assertRawError(data, 400, "ambiguous message length\n", closed=True)
        self.assert_absent(self.key())

    def test_identical_duplicate_content_lengths_are_accepted(self):
        data = request("PUT", "/kv/" + self.key(),
                       [("Content-Length", "3"), ("Content-Length", "3")], b"dup")
        self.assertRawResponse(data, 200, b"")
        self.assert_value(self.key(), b"dup")

    def test_content_length_with_transfer_encoding(self):
        for name, headers in (
                ("CL first", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")]),
                ("TE first", [("Transfer-Encoding", "chunked"), ("Content-Length", "5")])):
            with self.subTest(name):
                data = request("PUT", "/kv/" + self.key(), headers)
                self.assertRawError(data, 400, "ambiguous message length\n", closed=True)
        self.assert_absent(self.key())

    def test_no_request_smuggling_after_ambiguous_length(self):
        # Read as chunked, the body is empty and a second request follows; read
        # by Content-Length, it is all body.  The server must do neither.
        smuggled = request("PUT", "/kv/" + self.key("-smuggled"),
                           [("Content-Length", "1")], b"x")
        body = b"0\r\n\r\n" + smuggled
        data = request("PUT", "/kv/" + self.key(),
                       [("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")],
                       body)
        self.assertRawError(data, 400, "ambiguous message length\n", closed=True)
        self.assert_absent(self.key())
        self.assert_absent(self.key("-smuggled"))

    def test_zero_content_length(self):
        data = request("PUT", "/kv/" + self.key(), [("Content-Length", "0")])
        self.assertRawError(data, 400, "value cannot be empty\n")

    def test_missing_content_length(self):
        self.assertRawError(request("PUT", "/kv/" + self.key()), 411, "length required\n")
        self.assert_absent(self.key())


class ChunkedTests(ProtocolTestCase):

    def put_chunked(self, key, body, te="chunked", extra=()):
        data = request("PUT", "/kv/" + key, [("Transfer-Encoding", te)] + list(extra), body)
        self.assertRawResponse(data, 200, b"")

    def test_chunked_put(self):
        value = b"hello\r\n0\r\n\r\nworld" + bytes(range(256))
        self.put_chunked(self.key(), chunked(value[:5], value[5:7], value[7:]))
        self.assert_value(self.key(), value)

    def test_single_chunk(self):
        self.put_chunked(self.key(), chunked(b"one chunk"))
        self.assert_value(self.key(), b"one chunk")

    def test_upper_and_lower_case_hex_sizes(self):
        body = b"A\r\n0123456789\r\nb\r\nabcdefghijk\r\n0\r\n\r\n"
        self.put_chunked(self.key(), body)
        self.assert_value(self.key(), b"0123456789abcdefghijk")

    def test_chunk_size_with_leading_zeros(self):
        self.put_chunked(self.key(), b"0005\r\nhello\r\n000\r\n\r\n")
        self.assert_value(self.key(), b"hello")

    def test_chunk_extensions_are_ignored(self):
        body = b"5;name=value\r\nhello\r\n6;flag\r\n world\r\n0;last=1\r\n\r\n"
        self.put_chunked(self.key(), body)
        self.assert_value(self.key(), b"hello world")

    def test_trailer_fields_are_ignored(self):
        self.put_chunked(self.key(), chunked(b"trailed", trailer=b"X-Trailer: yes\r\n"),
                         extra=[("Trailer", "X-Trailer")])
        self.assert_value(self.key(), b"trailed")

    def test_transfer_coding_name_is_case_insensitive(self):
        self.put_chunked(self.key(), chunked(b"upper"), te="Chunked")
        self.assert_value(self.key(), b"upper")

    def test_empty_chunked_body(self):
        data = request("PUT", "/kv/" + self.key(), [("Transfer-Encoding", "chunked")],
                       b"0\r\n\r\n")
        self.assertRawError(data, 400, "value cannot be empty\n")
        self.assert_absent(self.key())

    def test_many_small_chunks(self):
        value = bytes(range(250)) * 400                 # 100,000 bytes in 20,000 chunks
        self.put_chunked(self.key(), chunked(*(value[i:i + 5] for i in range(0, len(value), 5))))
        self.assert_value(self.key(), value)

    def test_framing_that_outweighs_its_data(self):
        # 1-byte chunks: five bytes of framing for each byte of data.  The
        # first 64 KiB of framing are allowed.
        body = chunked(*[b"x"] * 20000)
        data = request("PUT", "/kv/" + self.key(), [("Transfer-Encoding", "chunked")], body)
        self.assertRawError(data, 400, "chunked framing outweighs its data\n", closed=True)
        self.assert_absent(self.key())
        self.put_chunked(self.key(), chunked(*[b"x"] * 10000))
        self.assert_value(self.key(), b"x" * 10000)

    def test_unsupported_transfer_encodings(self):
        for te in ("gzip", "deflate", "identity", "gzip, chunked", "chunked, gzip", "foo"):
            with self.subTest(te=te):
                data = request("PUT", "/kv/" + self.key(), [("Transfer-Encoding", te)])
                self.assertRawError(data, 501, "transfer-encoding not supported\n", closed=True)
        self.assert_absent(self.key())

    def test_malformed_chunked_bodies(self):
        for name, body in MALFORMED_CHUNKED.items():
            with self.subTest(name):
                data = request("PUT", "/kv/" + self.key(), [("Transfer-Encoding", "chunked")],
                               body)
                self.assertRawError(data, 400, "bad chunked body\n", closed=True)
        self.assert_absent(self.key())


class LimitTests(ProtocolTestCase):
    server_args = ("--max-value-bytes", "1000")

    def test_oversized_content_length_is_refused_before_the_body(self):
        # No body is ever sent: the 413 can only come from the header.
        conn = self.connect()
        started = time.monotonic()
        conn.send(request("PUT", "/kv/" + self.key(), [("Content-Length", "1000000000")]))
        response = conn.response("PUT")
        self.check_raw_framing(response)
        self.assertEqual((response.status, response.body), (413, b"value too large\n"))
        self.assertLess(time.monotonic() - started, 5, "the 413 was slow")
        self.assertTrue(conn.is_closed(), "connection left open after 413")
        self.assert_serving()
        self.assert_absent(self.key())

    def test_exactly_max_bytes_with_content_length(self):
        value = bytes(range(200)) * 5
        data = request("PUT", "/kv/" + self.key(), [("Content-Length", "1000")], value)
        self.assertRawResponse(data, 200, b"")
        self.assert_value(self.key(), value)

    def test_exactly_max_bytes_chunked(self):
        value = bytes(range(250)) * 4
        body = chunked(value[:1], value[1:400], value[400:999], value[999:])
        data = request("PUT", "/kv/" + self.key(), [("Transfer-Encoding", "chunked")], body)
        self.assertRawResponse(data, 200, b"")
        self.assert_value(self.key(), value)

    def test_chunked_body_over_the_limit(self):
        body = chunked(b"a" * 400, b"b" * 400, b"c" * 400)
        data = request("PUT", "/kv/" + self.key(), [("Transfer-Encoding", "chunked")], body)
        self.assertRawError(data, 413, "value too large\n", closed=True)
        self.assert_absent(self.key())

    def test_chunked_body_over_the_limit_by_one(self):
        body = chunked(b"a" * 1000, b"b")
        data = request("PUT", "/kv/" + self.key(), [("Transfer-Encoding", "chunked")], body)
        self.assertRawError(data, 413, "value too large\n", closed=True)
        self.assert_absent(self.key())

    def test_huge_declared_chunk(self):
        # The chunk announces a terabyte; more than the limit is already
        # there, so a server never needs to wait for (or allocate) the rest.
        body = b"10000000000\r\n" + b"z" * 2000
        data = request("PUT", "/kv/" + self.key(), [("Transfer-Encoding", "chunked")], body)
        self.assertRawError(data, 413, "value too large\n", closed=True)
        self.assert_absent(self.key())

    def test_expect_100_continue(self):
        conn = self.connect()
        conn.send(request("PUT", "/kv/" + self.key(),
                          [("Content-Length", "5"), ("Expect", "100-continue")]))
        interim = conn.rfile.readline(MAX_LINE) + conn.rfile.readline(MAX_LINE)
        self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.send(b"hello")
        response = conn.response("PUT")
        self.check_raw_framing(response)
        self.assertEqual((response.status, response.body), (200, b""))
        self.assert_value(self.key(), b"hello")

    def test_expect_100_continue_then_keep_alive(self):
        conn = self.connect()
        conn.send(request("PUT", "/kv/" + self.key(),
                          [("Content-Length", "3"), ("Expect", "100-continue")]))
        self.assertEqual(conn.response("PUT").status, 100)
        conn.send(b"abc")
        self.assertEqual(conn.response("PUT").status, 200)
        conn.send(request("GET", "/kv/" + self.key()))
        response = conn.response("GET")
        self.assertEqual((response.status, response.body), (200, b"abc"))

    def test_expect_100_continue_with_body_sent_at_once(self):
        # A client may stop waiting for the 100 and send the body anyway.
        conn = self.connect()
        conn.send(request("PUT", "/kv/" + self.key(),
                          [("Content-Length", "4"), ("Expect", "100-continue")], b"body")
                  + request("GET", "/kv/" + self.key()))
        response = conn.response("PUT")
        if response.status == 100:
            response = conn.response("PUT")
        self.check_raw_framing(response)
        self.assertEqual((response.status, response.body), (200, b""))
        response = conn.response("GET")
        self.assertEqual((response.status, response.body), (200, b"body"))

    def test_expect_100_continue_behind_another_request_comes_after_its_reply(self):
        # A 100 belongs to the request being answered: sent before the reply
        # to the request ahead of it, the client would read it as that one's.
        conn = self.connect()
        conn.send(request("PUT", "/kv/" + self.key("a"), [("Content-Length", "1")], b"a")
                  + request("GET", "/health")
                  + request("PUT", "/kv/" + self.key("b"),
                            [("Content-Length", "1"), ("Expect", "100-continue")]))
        self.assertEqual(conn.response("PUT").status, 200)
        self.assertEqual(conn.response("GET").body, b"ok\n")
        self.assertEqual(conn.response("PUT").status, 100)
        conn.send(b"b")
        self.assertEqual(conn.response("PUT").status, 200)
        self.assert_value(self.key("b"), b"b")

    def test_expect_100_continue_with_oversized_length(self):
        conn = self.connect()
        conn.send(request("PUT", "/kv/" + self.key(),
                          [("Content-Length", "1000000000"), ("Expect", "100-continue")]))
        response = conn.response("PUT")
        self.assertNotEqual(response.status, 100, "100 Continue for a body that will be refused")
        self.check_raw_framing(response)
        self.assertEqual((response.status, response.body), (413, b"value too large\n"))
        self.assertTrue(conn.is_closed(), "connection left open after 413")
        self.assert_serving()
        self.assert_absent(self.key())


class StrictParsingTests(ProtocolTestCase):
    """As strict as Go's net/http and nginx: what a proxy could read otherwise is 400 and close."""

    def assertRefused(self, data, message):
        self.assertRawError(data, 400, message, closed=True)

    def test_bare_cr_in_a_header_cannot_smuggle_a_request(self):
        # A parser that ends lines at a bare CR sees "Content-Length: 0"; one
        # that does not sees no length, and reads the rest as a new request.
        smuggled = request("DELETE", "/kv/" + self.SENTINEL_KEY)
        data = (b"GET /health HTTP/1.1\r\nHost: test\r\nX-A: 1\rContent-Length: %d\r\n\r\n"
                % len(smuggled)) + smuggled
        self.assertRefused(data, "bad header line\n")
        self.assertRefused(b"GET /health HTTP/1.1\r\nHost: test\rX\r\n\r\n", "bad header line\n")

    def test_nul_or_another_control_byte_in_a_header(self):
        for value in (b"a\x00b", b"\x00", b"a\x1bb", b"a\x7fb"):
            with self.subTest(value=value):
                self.assertRefused(b"GET /health HTTP/1.1\r\nHost: test\r\nX-A: %s\r\n\r\n"
                                   % value, "bad header line\n")

    def test_http_1_1_without_host(self):
        self.assertRefused(request("GET", "/health", host=False), "missing host header\n")

    def test_http_1_1_with_two_hosts(self):
        self.assertRefused(request("GET", "/health", [("Host", "other")]),
                           "repeated host header\n")
        self.assertRefused(request("GET", "/health", [("Host", "test")]),
                           "repeated host header\n")

    def test_transfer_encoding_on_http_1_0(self):
        data = request("PUT", "/kv/" + self.key(), [("Transfer-Encoding", "chunked"),
                                                    ("Connection", "keep-alive")],
                       chunked(b"abc"), version="HTTP/1.0")
        self.assertRefused(data, "transfer-encoding on http/1.0\n")
        self.assert_absent(self.key())

    def test_content_length_list(self):
        for value in ("3, 3", "3,3", "3, 4"):
            with self.subTest(value=value):
                data = request("PUT", "/kv/" + self.key(), [("Content-Length", value)], b"abc")
                self.assertRefused(data, "bad content-length\n")
        self.assert_absent(self.key())

    def test_whitespace_around_a_chunk_size(self):
        for line in (b"3 ", b" 3", b"3\t", b"\t3", b"3 ;ext=1"):
            with self.subTest(line=line):
                data = request("PUT", "/kv/" + self.key(), [("Transfer-Encoding", "chunked")],
                               line + b"\r\nabc\r\n0\r\n\r\n")
                self.assertRefused(data, "bad chunked body\n")
        self.assert_absent(self.key())

    def test_request_line_separators_other_than_one_space(self):
        for separator in (b"\t", b"  ", b"\x0b", b"\x0c", b"\xa0", b"\x85", b"\r"):
            for line in (b"GET%s/health HTTP/1.1", b"GET /health%sHTTP/1.1"):
                line = line % separator
                with self.subTest(line=line):
                    self.assertRefused(line + b"\r\nHost: test\r\n\r\n", "bad request line\n")

    def test_header_block_over_the_limit(self):
        # Each line is short; together they pass the 64 KiB of the block.
        headers = [("X-H%d" % i, "v" * 800) for i in range(90)]
        self.assertRawError(request("GET", "/health", headers), 431,
                            "header block too large\n", closed=True)

    def test_header_block_just_under_the_limit(self):
        headers = [("X-H%d" % i, "v" * 700) for i in range(90)]
        self.assertRawResponse(request("GET", "/health", headers), 200, b"ok\n")


class ConnectionTests(ProtocolTestCase):

    def test_http_1_0_request_closes_the_connection(self):
        conn, _ = self.assertRawResponse(request("GET", "/health", version="HTTP/1.0"),
                                         200, b"ok\n")
        self.assertTrue(conn.is_closed(), "HTTP/1.0 connection left open")

    def test_http_1_0_without_host(self):
        conn, _ = self.assertRawResponse(
            request("GET", "/health", version="HTTP/1.0", host=False), 200, b"ok\n")
        self.assertTrue(conn.is_closed(), "HTTP/1.0 connection left open")

    def test_http_1_0_put_and_get(self):
        data = request("PUT", "/kv/" + self.key(), [("Content-Length", "6")], b"old-10",
                       version="HTTP/1.0")
        conn, _ = self.assertRawResponse(data, 200, b"")
        self.assertTrue(conn.is_closed(), "HTTP/1.0 connection left open")
        self.assertRawResponse(request("GET", "/kv/" + self.key(), version="HTTP/1.0"),
                               200, b"old-10")

    def test_http_1_0_keep_alive(self):
        conn = self.connect()
        for i, (method, target, body, status, expected) in enumerate([
                ("PUT", "/kv/" + self.key(), b"ka", 200, b""),
                ("GET", "/kv/" + self.key(), b"", 200, b"ka"),
                ("HEAD", "/kv/" + self.key(), b"", 200, b""),
                ("GET", "/health", b"", 200, b"ok\n")]):
            headers = [("Connection", "keep-alive")]
            if body:
                headers.append(("Content-Length", str(len(body))))
            conn.send(request(method, target, headers, body, version="HTTP/1.0"))
            response = conn.response(method)
            self.check_raw_framing(response, method)
            self.assertEqual((response.status, response.body), (status, expected),
                             "request %d" % i)
            self.assertEqual([v.lower() for v in response.get_all("Connection")],
                             ["keep-alive"], "Connection header of response %d" % i)

    def test_connection_close_is_honoured(self):
        data = request("GET", "/health", [("Connection", "close")])
        conn, _ = self.assertRawResponse(data, 200, b"ok\n")
        self.assertTrue(conn.is_closed(), "connection left open after Connection: close")

    def test_connection_close_after_keep_alive_requests(self):
        conn = self.connect()
        conn.send(request("GET", "/health"))
        self.assertEqual(conn.response().body, b"ok\n")
        conn.send(request("GET", "/health", [("Connection", "close")]))
        self.assertEqual(conn.response().body, b"ok\n")
        self.assertTrue(conn.is_closed(), "connection left open after Connection: close")

    def test_http_1_1_stays_open(self):
        conn = self.connect()
        for _ in range(3):
            conn.send(request("GET", "/health"))
            self.assertEqual(conn.response().body, b"ok\n")
        self.assertFalse(conn.is_closed(timeout=0.3), "HTTP/1.1 connection closed")

    def test_pipelining(self):
        key, other = self.key(), self.key("-other")
        requests = [
            ("PUT", request("PUT", "/kv/" + key, [("Content-Length", "3")], b"one"),
             200, b""),
            ("PUT", request("PUT", "/kv/" + other, [("Transfer-Encoding", "chunked")],
                            chunked(b"tw", b"o")), 200, b""),
            ("GET", request("GET", "/kv/" + key), 200, b"one"),
            ("HEAD", request("HEAD", "/kv/" + other), 200, b""),
            ("GET", request("GET", "/kv/" + self.key("-absent")), 404, b"key not found\n"),
            ("GET", request("GET", "/kv/" + other), 200, b"two"),
            ("POST", request("POST", "/kv/" + key), 405, b"method not allowed\n"),
            ("DELETE", request("DELETE", "/kv/" + key), 200, b""),
            ("GET", request("GET", "/kv/" + key), 404, b"key not found\n"),
            ("GET", request("GET", "/health?x", [("Connection", "close")]), 200, b"ok\n"),
        ]
        conn = self.connect()
        conn.send(b"".join(r[1] for r in requests))
        for i, (method, _, status, body) in enumerate(requests):
            response = conn.response(method)
            self.check_raw_framing(response, method)
            self.assertEqual((response.status, response.body), (status, body),
                             "pipelined response %d (%s)" % (i, method))
            if method == "HEAD":
                self.assertEqual(response.get("Content-Length"), "3")
        self.assertTrue(conn.is_closed(), "connection left open after the last response")

    def test_many_pipelined_writes_then_a_read(self):
        # Each PUT's 200 goes out once the journal's writer says it is
        # durable, a GET's value at once: the replies must still come in
        # request order, and the GET must see the last PUT.
        count = 300
        requests = [request("PUT", "/kv/" + self.key(), [("Content-Length", "4")], b"%04d" % i)
                    for i in range(count)]
        conn = self.connect()
        conn.send(b"".join(requests) + request("GET", "/kv/" + self.key()))
        for i in range(count):
            response = conn.response("PUT")
            self.assertEqual((response.status, response.body), (200, b""), "PUT %d" % i)
        response = conn.response("GET")
        self.assertEqual((response.status, response.body), (200, b"%04d" % (count - 1)))

    def test_a_write_that_fills_a_read_exactly_then_a_pipelined_read(self):
        # The PUT fills one 64 KiB read exactly, the GET behind it waits in
        # the socket (the old epoll loop, edge-triggered, once lost it), and
        # it must see the PUT: a read pipelined behind a write waits for it.
        key = self.key()
        head = request("PUT", "/kv/" + key, [("Content-Length", "00000")], b"")
        size = 65536 - len(head)
        put = request("PUT", "/kv/" + key, [("Content-Length", "%05d" % size)], b"v" * size)
        self.assertEqual(len(put), 65536)
        conn = self.connect()
        conn.send(put + request("GET", "/kv/" + key))
        self.assertEqual(conn.response("PUT").status, 200)
        response = conn.response("GET")
        self.assertEqual((response.status, response.body), (200, b"v" * size))

    def test_head_sends_no_body_on_the_wire(self):
        self.server.put(self.key(), b"a value of 21 bytes!!")
        conn = self.connect()
        conn.send(request("HEAD", "/kv/" + self.key()) + request("GET", "/health"))
        head = conn.response("HEAD")
        self.check_raw_framing(head, "HEAD")
        self.assertEqual((head.status, head.get("Content-Length")), (200, "21"))
        # If HEAD had sent a body, it would be read here as the next status line.
        after = conn.response("GET")
        self.assertEqual((after.status, after.body), (200, b"ok\n"))

    def test_stalled_clients_do_not_block_others(self):
        stalled_headers = self.connect()
        stalled_headers.send(b"GET /health HTTP/1.1\r\nHo")
        stalled_body = self.connect()
        stalled_body.send(request("PUT", "/kv/" + self.key(), [("Content-Length", "10")],
                                  b"abc"))
        idle = self.connect()
        for _ in range(3):
            status, _, body = self.server.request("GET", "/health", timeout=5)
            self.assertEqual((status, body), (200, b"ok\n"))
        self.server.put(self.key("-other"), b"other")
        # The stalled requests still complete once their bytes arrive.
        stalled_body.send(b"defghij")
        response = stalled_body.response("PUT")
        self.assertEqual((response.status, response.body), (200, b""))
        self.assert_value(self.key(), b"abcdefghij")
        stalled_headers.send(b"st: test\r\n\r\n")
        self.assertEqual(stalled_headers.response().body, b"ok\n")
        idle.send(request("GET", "/health"))
        self.assertEqual(idle.response().body, b"ok\n")

    def test_new_connections_are_served_past_their_first_request(self):
        # Connections parked by the accepting thread and re-parked by the
        # worker, at the same time, each served turn after turn.
        errors = []

        def client():
            connection = self.server.connection(10)
            try:
                for _ in range(3):
                    connection.request("GET", "/health")
                    response = connection.getresponse()
                    if response.read() != b"ok\n":
                        errors.append(response.status)
            except (OSError, http.client.HTTPException) as e:
                errors.append(repr(e))
            finally:
                connection.close()
        clients = [threading.Thread(target=client) for _ in range(100)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(30)
        self.assertEqual(errors, [])

    @unittest.skipUnless(os.path.isdir("/proc/self/task"), "needs /proc")
    def test_idle_keep_alive_connections_hold_no_thread(self):
        connections = [self.connect() for _ in range(200)]
        for connection in connections:
            connection.send(request("GET", "/health"))
            self.assertEqual(connection.response().body, b"ok\n")
        threads = len(os.listdir("/proc/%d/task" % self.server.proc.pid))
        self.assertLess(threads, 20, "200 idle connections kept %d threads" % threads)
        for connection in connections:      # and each is served again
            connection.send(request("GET", "/health"))
            self.assertEqual(connection.response().body, b"ok\n")

    def test_clients_that_never_read_a_large_reply_do_not_block_others(self):
        # The server's send of an 8 MB value blocks while the client does not
        # read: more such clients than the server runs requests at once must
        # still leave everyone else served.
        self.server.put(self.key(), b"v" * (8 << 20))
        readers = []
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((self.server.host, self.server.port))
            self.addCleanup(sock.close)
            sock.sendall(request("GET", "/kv/" + self.key()))
            readers.append(sock)
        for _ in range(3):
            status, _, body = self.server.request("GET", "/health", timeout=10)
            self.assertEqual((status, body), (200, b"ok\n"))
        self.server.put(self.key("-after"), b"still writable")


def socket_pair(testcase):
    """Two connected sockets, closed after the test; the second times out after TIMEOUT."""
    ours, theirs = socket.socketpair()
    testcase.addCleanup(ours.close)
    testcase.addCleanup(theirs.close)
    theirs.settimeout(TIMEOUT)
    return ours, theirs


if __name__ == "__main__":
    unittest.main()
