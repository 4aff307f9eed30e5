"""Unit tests of http11.py, the HTTP/1.1 wire format without I/O: bytes are fed in-process.

The parsing cases of test_http_protocol (spoken there over sockets to a
running server) are here as parser cases, with the stricter rules the
parser adds; then incremental feeding (one byte at a time, every split
point), the state properties, chunked decoding and its budget, the
serialization of replies, and a check that work is linear in the input.
"""
import email.utils
import os
import re
import sys
import time
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import http11                                   # noqa: E402
from http11 import NEED_DATA, PAUSED, ProtocolError, Request, RequestParser   # noqa: E402

MAX_LINE = 65536


def request(method, target, headers=(), body=b"", version="HTTP/1.1", host=True):
    """The bytes of one request; `headers` is a list of (name, value) or raw header lines."""
    lines = ["%s %s %s" % (method, target, version)]
    if host:
        lines.append("Host: test")
    for header in headers:
        lines.append(header if isinstance(header, str) else "%s: %s" % header)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*pieces, trailer=b""):
    """A chunked body made of `pieces` (bytes), then the last chunk and `trailer`."""
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return out + b"0\r\n" + trailer + b"\r\n"


def put_chunked(body, te="chunked", extra=()):
    return request("PUT", "/kv/k", [("Transfer-Encoding", te)] + list(extra), body)


def summary(req):
    """Everything a Request says, as a tuple (two parses agree if their summaries do)."""
    return tuple(getattr(req, name) for name in Request.__slots__)


def outcome(pieces, **options):
    """Feed `pieces` one after the other; the summaries of the whole requests, then the error.

    Checks the contract on the way: an incomplete Request comes back as the
    same object once complete, and nothing else comes in between.
    """
    parser = RequestParser(**options)
    results, pending = [], None
    for piece in pieces:
        parser.feed(piece)
        try:
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                if event is PAUSED:
                    continue
                assert isinstance(event, Request), event
                if not event.complete:
                    assert pending is None, "two incomplete requests at once"
                    pending = event
                    continue
                assert pending is None or event is pending, "not the incomplete request"
                pending = None
                results.append(summary(event))
        except ProtocolError as error:
            results.append((error.status, error.message))
            break
    return results



# Header lines every strict parser refuses (400 "bad header line"); also sent
# over the wire by test_http_protocol.
MALFORMED_HEADER_LINES = {
    "no colon": ["NoColonHere"],
    "leading whitespace on the first header": [" X-A: 1"],
    "obs-fold continuation": ["X-A: 1", "  continued"],
    "tab continuation": ["X-A: 1", "\tcontinued"],
    "space before colon": ["X-A : 1"],
    "tab before colon": ["X-A\t: 1"],
    "space before colon of Content-Length": ["Content-Length : 3"],
    "empty name": [": 1"],
    "separator in the name": ["X(A): 1"],
    "non-ASCII name": ["X-\xe9: 1"],
}

# Chunked bodies every strict parser refuses (400 "bad chunked body"); also
# sent over the wire by test_http_protocol.
MALFORMED_CHUNKED = {
    "non-hex size": b"zz\r\n",
    "empty size line": b"\r\n",
    "negative size": b"-5\r\nhello\r\n0\r\n\r\n",
    "plus sign": b"+5\r\nhello\r\n0\r\n\r\n",
    "0x prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "underscore in size": b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    "data longer than its size": b"3\r\nabcXY\r\n0\r\n\r\n",
    "17 hex digits": b"00000000000000003\r\nabc\r\n0\r\n\r\n",
    "bare CR after the data": b"3\r\nabc\rX0\r\n\r\n",
    "NUL in an extension": b"3;a\x00\r\nabc\r\n0\r\n\r\n",
}

class ParserTestCase(unittest.TestCase):

    def parse(self, data, **options):
        """The one Request in `data`, complete (fails otherwise)."""
        parser = RequestParser(**options)
        parser.feed(data)
        event = parser.next_event()
        while event is PAUSED or (isinstance(event, Request) and not event.complete):
            event = parser.next_event()
        self.assertIsInstance(event, Request, "for %r" % data[:300])
        self.assertTrue(event.complete)
        self.assertIs(parser.next_event(), NEED_DATA, "more than one request in %r" % data[:300])
        return event

    def assertError(self, data, status, message, **options):
        """`data`, fed at once, is refused with this error, and only with it."""
        self.assertEqual(outcome([data], **options)[-1:], [(status, message)],
                         "for %r" % data[:300])

    def assertRefused(self, data, message):
        self.assertError(data, 400, message)


class RequestLineTests(ParserTestCase):

    def test_a_simple_get(self):
        req = self.parse(b"GET /kv/a?x=1&y HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual((req.method, req.target, req.path, req.query, req.version),
                         ("GET", "/kv/a?x=1&y", "/kv/a", "x=1&y", "HTTP/1.1"))
        self.assertEqual(req.headers, {"host": "h"})
        self.assertEqual((req.http_1_0, req.keep_alive, req.framed, req.chunked),
                         (False, True, False, False))
        self.assertEqual((req.content_length, req.body, req.head_bytes), (None, b"", 37))

    def test_malformed_request_lines(self):
        for line in (b"hello", b"GET", b"GET /kv/a HTTP/1.1 extra", b"GET  HTTP/1.1 x y",
                     b"GET /kv/a", b"GET /kv/a HTTP/1", b"GET /kv/a HTTP/1.10",
                     b"GET /kv/a http/1.1",
                     b"G(T /kv/a HTTP/1.1", b" GET /kv/a HTTP/1.1", b"GET /kv/a HTTP/1.1 "):
            with self.subTest(line=line):
                self.assertRefused(line + b"\r\nHost: test\r\n\r\n", "bad request line")

    def test_http_versions_other_than_1x(self):
        for version in ("HTTP/2.0", "HTTP/3.0", "HTTP/0.9"):
            with self.subTest(version=version):
                self.assertError(request("GET", "/health", version=version),
                                 505, "http version not supported")

    def test_a_later_1x_minor_version_reads_as_1_1(self):
        req = self.parse(request("GET", "/health", version="HTTP/1.7"))
        self.assertEqual((req.version, req.http_1_0), ("HTTP/1.1", False))

    def test_request_line_too_long(self):
        self.assertError(request("GET", "/kv/" + "k" * (MAX_LINE + 5000)),
                         414, "request line too long")

    def test_long_request_line_within_the_limit(self):
        target = "/kv/" + "k" * (MAX_LINE - 6000)
        self.assertEqual(self.parse(request("GET", target)).path, target)

    def test_request_with_non_ascii_target(self):
        req = self.parse(b"GET /kv/caf\xc3\xa9 HTTP/1.1\r\nHost: test\r\n\r\n")
        self.assertEqual(req.path, "/kv/caf\xc3\xa9")       # latin-1: the API refuses the key

    def test_request_line_separators_other_than_one_space(self):
        for separator in (b"\t", b"  ", b"\x0b", b"\x0c", b"\xa0", b"\x85", b"\r", b"\x00"):
            for line in (b"GET%s/health HTTP/1.1", b"GET /health%sHTTP/1.1"):
                line = line % separator
                with self.subTest(line=line):
                    self.assertRefused(line + b"\r\nHost: test\r\n\r\n", "bad request line")

    def test_control_bytes_in_the_target(self):
        for byte in (b"\x00", b"\x01", b"\x1f", b"\x7f"):
            with self.subTest(byte=byte):
                self.assertRefused(b"GET /kv/a%sb HTTP/1.1\r\nHost: t\r\n\r\n" % byte,
                                   "bad request line")

    def test_absolute_form(self):
        for target, path, query in (("http://host/kv/a?x", "/kv/a", "x"),
                                    ("HTTPS://host:8080/kv/b", "/kv/b", ""),
                                    ("http://host", "/", ""),
                                    ("ftp://host/kv/a?q", "", ""),
                                    ("*", "", "")):
            with self.subTest(target=target):
                req = self.parse(request("GET", target))
                self.assertEqual((req.target, req.path, req.query), (target, path, query))

    def test_stray_line_ends_before_a_request_are_skipped(self):
        req = self.parse(b"\r\n\r\n\n" + request("GET", "/health"))
        self.assertEqual((req.path, req.head_bytes), ("/health", len(request("GET", "/health"))))
        parser = RequestParser()
        parser.feed(b"\r\n\r\n")
        self.assertIs(parser.next_event(), NEED_DATA)
        self.assertEqual((parser.in_head, parser.buffered), (False, 0))

    def test_bare_lf_line_ends_are_accepted(self):
        req = self.parse(b"PUT /kv/a HTTP/1.1\nHost: h\nContent-Length: 2\n\nab")
        self.assertEqual((req.headers["host"], req.body), ("h", b"ab"))
        for end in (b"\n\n", b"\r\n\n", b"\n\r\n", b"\r\n\r\n"):
            with self.subTest(end=end):        # the first blank line ends the head
                got = outcome([b"GET /a HTTP/1.0%s\r\n\nGET /b HTTP/1.0\n\n" % end])
                self.assertEqual([r[Request.__slots__.index("path")] for r in got],
                                 ["/a", "/b"])


class HeaderTests(ParserTestCase):

    def test_header_line_too_long(self):
        data = request("GET", "/health", [("X-Big", "b" * (MAX_LINE + 5000))])
        self.assertError(data, 431, "header block too large")

    def test_long_header_within_the_limit(self):
        data = request("GET", "/health", [("X-Big", "b" * (MAX_LINE - 6000))])
        self.assertEqual(len(self.parse(data).headers["x-big"]), MAX_LINE - 6000)

    def test_the_limit_is_on_the_head_without_its_blank_line(self):
        head = request("GET", "/", [("X", "")])[:-4]
        for extra, blank in ((0, b"\r\n\r\n"), (0, b"\n\n"), (1, b"\r\n\r\n"), (1, b"\n\n")):
            data = head + b"x" * extra + blank
            with self.subTest(extra=extra, blank=blank):
                got = outcome([data], max_header_bytes=len(head))
                if extra:
                    self.assertEqual(got, [(431, "header block too large")])
                else:
                    self.assertEqual(summary(self.parse(data)), got[0])
                self.assertEqual(outcome([data[i:i + 1] for i in range(len(data))],
                                         max_header_bytes=len(head)), got)

    def test_414_or_431_by_the_request_line_alone(self):
        for line_size, status, end in ((100, 431, b"\r\n"), (101, 414, b"\r\n"),
                                       (200, 414, b"\r\n"), (100, 431, b"\n"), (101, 414, b"\n")):
            data = b"GET /%s HTTP/1.1%sHost: %s%s%s" % (
                b"a" * (line_size - 14), end, b"h" * 200, end, end)
            with self.subTest(line_size=line_size, end=end):
                self.assertEqual(len(data.split(end)[0]), line_size)
                self.assertError(data, status, "request line too long" if status == 414
                                 else "header block too large", max_header_bytes=100)

    def test_more_than_100_headers(self):
        headers = [("X-H%d" % i, "v") for i in range(100)]         # plus Host: 101
        self.assertError(request("GET", "/health", headers), 431, "too many headers")

    def test_100_headers_are_accepted(self):
        headers = [("X-H%d" % i, "v") for i in range(99)]          # plus Host
        self.assertEqual(len(self.parse(request("GET", "/health", headers)).headers), 100)

    def test_malformed_header_lines(self):
        cases = MALFORMED_HEADER_LINES
        for name, lines in cases.items():
            with self.subTest(name):
                self.assertRefused(request("PUT", "/kv/k", lines, b"abc"), "bad header line")

    def test_header_value_whitespace_is_trimmed(self):
        req = self.parse(request("PUT", "/kv/k", ["Content-Length: \t 3 \t", "X-A:b c"], b"abc"))
        self.assertEqual((req.body, req.headers["x-a"]), (b"abc", "b c"))

    def test_header_names_are_case_insensitive(self):
        req = self.parse(request("PUT", "/kv/k", ["cOnTeNt-LeNgTh: 3"], b"xyz"))
        self.assertEqual((req.body, req.content_length, list(req.headers)),
                         (b"xyz", 3, ["host", "content-length"]))

    def test_repeated_headers_are_joined(self):
        req = self.parse(request("GET", "/", [("Accept", "a"), ("X", ""), ("accept", "b")]))
        self.assertEqual(req.headers["accept"], "a, b")

    def test_header_values_are_latin_1(self):
        req = self.parse(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: caf\xe9\r\n\r\n")
        self.assertEqual(req.headers["x-a"], "caf\xe9")

    def test_bare_cr_in_a_header_cannot_smuggle_a_request(self):
        smuggled = request("DELETE", "/kv/sentinel")
        data = (b"GET /health HTTP/1.1\r\nHost: test\r\nX-A: 1\rContent-Length: %d\r\n\r\n"
                % len(smuggled)) + smuggled
        self.assertEqual(outcome([data]), [(400, "bad header line")])
        self.assertRefused(b"GET /health HTTP/1.1\r\nHost: test\rX\r\n\r\n", "bad header line")
        self.assertRefused(b"GET /health HTTP/1.1\r\nHost: test\r\r\n\r\n", "bad header line")

    def test_nul_or_another_control_byte_in_a_header(self):
        for value in (b"a\x00b", b"\x00", b"a\x1bb", b"a\x7fb", b"a\x0bb", b"\x0c"):
            with self.subTest(value=value):
                self.assertRefused(b"GET /health HTTP/1.1\r\nHost: test\r\nX-A: %s\r\n\r\n"
                                   % value, "bad header line")

    def test_a_tab_in_a_value_is_allowed(self):
        req = self.parse(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\tb\r\n\r\n")
        self.assertEqual(req.headers["x-a"], "a\tb")

    def test_http_1_1_without_host(self):
        self.assertRefused(request("GET", "/health", host=False), "missing host header")

    def test_http_1_1_with_two_hosts(self):
        for other in ("other", "test"):
            with self.subTest(other=other):
                self.assertRefused(request("GET", "/health", [("Host", other)]),
                                   "repeated host header")

    def test_header_block_over_the_limit(self):
        headers = [("X-H%d" % i, "v" * 800) for i in range(90)]
        self.assertError(request("GET", "/health", headers), 431, "header block too large")

    def test_header_block_just_under_the_limit(self):
        headers = [("X-H%d" % i, "v" * 700) for i in range(90)]
        self.assertEqual(len(self.parse(request("GET", "/health", headers)).headers), 91)


class ContentLengthTests(ParserTestCase):

    def test_bad_content_length_values(self):
        for value in ("abc", "-5", "1.5", "", "+5", "0x10", "1_0", "5 5", "1e3", "\xb2",
                      "\xd9\xa3", "3, 3", "3,3", "3, 4"):
            with self.subTest(value=value):
                self.assertRefused(request("PUT", "/kv/k", [("Content-Length", value)], b"abc"),
                                   "bad content-length")

    def test_a_content_length_no_bounded_parser_takes(self):
        for value in ("9" * 5001, "1" + "0" * 5000, "1" * 20, str(1 << 63)):
            with self.subTest(digits=len(value)):
                self.assertRefused(request("PUT", "/kv/k", [("Content-Length", value)]),
                                   "bad content-length")

    def test_leading_zeros(self):
        self.assertEqual(self.parse(request("PUT", "/kv/k", [("Content-Length", "0" * 5000 + "3")],
                                            b"abc")).body, b"abc")
        self.assertError(request("PUT", "/kv/k", [("Content-Length", str((1 << 63) - 1))]),
                         413, "value too large")

    def test_two_different_content_lengths(self):
        self.assertRefused(request("PUT", "/kv/k", [("Content-Length", "3"),
                                                    ("Content-Length", "4")]),
                           "ambiguous message length")

    def test_identical_duplicate_content_lengths_are_accepted(self):
        req = self.parse(request("PUT", "/kv/k", [("Content-Length", "3"),
                                                  ("Content-Length", "3")], b"dup"))
        self.assertEqual((req.body, req.headers["content-length"]), (b"dup", "3"))

    def test_content_length_with_transfer_encoding(self):
        for headers in ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
                        [("Transfer-Encoding", "chunked"), ("Content-Length", "5")]):
            with self.subTest(headers=headers):
                self.assertRefused(request("PUT", "/kv/k", headers), "ambiguous message length")

    def test_no_request_smuggling_after_ambiguous_length(self):
        smuggled = request("PUT", "/kv/smuggled", [("Content-Length", "1")], b"x")
        body = b"0\r\n\r\n" + smuggled
        data = request("PUT", "/kv/k", [("Content-Length", str(len(body))),
                                        ("Transfer-Encoding", "chunked")], body)
        self.assertEqual(outcome([data]), [(400, "ambiguous message length")])

    def test_zero_content_length(self):
        req = self.parse(request("PUT", "/kv/k", [("Content-Length", "0")]))
        self.assertEqual((req.framed, req.content_length, req.body), (True, 0, b""))

    def test_missing_content_length(self):
        req = self.parse(request("PUT", "/kv/k"))
        self.assertEqual((req.framed, req.content_length, req.body), (False, None, b""))

    def test_oversized_content_length_is_refused_from_the_head(self):
        self.assertError(request("PUT", "/kv/k", [("Content-Length", "1001")]),
                         413, "value too large", max_body_bytes=1000)
        self.assertError(request("PUT", "/kv/k", [("Content-Length", "1000000000"),
                                                  ("Expect", "100-continue")]),
                         413, "value too large", max_body_bytes=1000)

    def test_exactly_max_bytes_with_content_length(self):
        value = bytes(range(200)) * 5
        req = self.parse(request("PUT", "/kv/k", [("Content-Length", "1000")], value),
                         max_body_bytes=1000)
        self.assertEqual(req.body, value)
        self.assertIs(type(req.body), bytes)


def batch_body_limit(request):
    """A body_limit as the server's: POST /batch may be larger than a value."""
    return (3000, "batch too large") if request.path == "/batch" else (1000, "value too large")


class BodyLimitTests(ParserTestCase):
    """body_limit: the largest body, and its 413's message, asked of each request's head."""

    def test_each_request_gets_its_own_limit_from_its_head(self):
        body = b"x" * 2000
        batch = request("POST", "/batch", [("Content-Length", "2000")], body)
        put = request("PUT", "/kv/k", [("Content-Length", "2000")], body)
        self.assertEqual(self.parse(batch, body_limit=batch_body_limit).body, body)
        self.assertError(put, 413, "value too large", body_limit=batch_body_limit)
        # On one connection, one after the other: the limit is the current request's.
        results = outcome([batch + put], body_limit=batch_body_limit)
        self.assertEqual(len(results), 2, results)
        self.assertEqual(results[1], (413, "value too large"))

    def test_past_the_route_limit_from_the_content_length_with_its_message(self):
        self.assertError(request("POST", "/batch", [("Content-Length", "3001")]),
                         413, "batch too large", body_limit=batch_body_limit)

    def test_a_chunked_body_past_the_route_limit(self):
        for body in (chunked(b"a" * 2000, b"b" * 1001), chunked(*[b"abcde"] * 601)):
            with self.subTest(body=body[:20]):
                self.assertError(request("POST", "/batch", [("Transfer-Encoding", "chunked")],
                                         body), 413, "batch too large",
                                 body_limit=batch_body_limit)
        exactly = chunked(*[b"abcde"] * 600)
        req = self.parse(request("POST", "/batch", [("Transfer-Encoding", "chunked")], exactly),
                         body_limit=batch_body_limit)
        self.assertEqual(req.body, b"abcde" * 600)


class ChunkedTests(ParserTestCase):

    def body(self, data, **options):
        req = self.parse(data, **options)
        self.assertEqual((req.framed, req.chunked, req.content_length), (True, True, None))
        self.assertIs(type(req.body), bytes)
        return req.body

    def test_chunked_put(self):
        value = b"hello\r\n0\r\n\r\nworld" + bytes(range(256))
        self.assertEqual(self.body(put_chunked(chunked(value[:5], value[5:7], value[7:]))), value)

    def test_single_chunk(self):
        self.assertEqual(self.body(put_chunked(chunked(b"one chunk"))), b"one chunk")

    def test_upper_and_lower_case_hex_sizes(self):
        body = b"A\r\n0123456789\r\nb\r\nabcdefghijk\r\n0\r\n\r\n"
        self.assertEqual(self.body(put_chunked(body)), b"0123456789abcdefghijk")

    def test_chunk_size_with_leading_zeros(self):
        self.assertEqual(self.body(put_chunked(b"0005\r\nhello\r\n000\r\n\r\n")), b"hello")

    def test_chunk_extensions_are_ignored(self):
        body = b"5;name=value\r\nhello\r\n6;flag\r\n world\r\n0;last=1\r\n\r\n"
        self.assertEqual(self.body(put_chunked(body)), b"hello world")

    def test_trailer_fields_are_ignored(self):
        data = put_chunked(chunked(b"trailed", trailer=b"X-Trailer: yes\r\nX-B: 2\r\n"),
                           extra=[("Trailer", "X-Trailer")])
        self.assertEqual(self.body(data), b"trailed")

    def test_bare_lf_in_the_framing_is_accepted(self):
        self.assertEqual(self.body(put_chunked(b"3\nabc\n2;x\nde\n0\nX: y\n\n")), b"abcde")

    def test_transfer_coding_name_is_case_insensitive(self):
        self.assertEqual(self.body(put_chunked(chunked(b"upper"), te="Chunked")), b"upper")

    def test_empty_chunked_body(self):
        self.assertEqual(self.body(put_chunked(b"0\r\n\r\n")), b"")

    def test_many_small_chunks(self):
        value = bytes(range(250)) * 400                 # 100,000 bytes in 20,000 chunks
        self.assertEqual(self.body(put_chunked(chunked(*(value[i:i + 5] for i in
                                                         range(0, len(value), 5))))), value)

    def test_framing_that_outweighs_its_data(self):
        # 1-byte chunks: five bytes of framing for each byte of data.  The
        # first 64 KiB of framing are allowed.
        self.assertRefused(put_chunked(chunked(*[b"x"] * 20000)),
                           "chunked framing outweighs its data")
        self.assertEqual(self.body(put_chunked(chunked(*[b"x"] * 10000))), b"x" * 10000)

    def test_the_framing_of_a_run_counts_as_that_of_single_chunks(self):
        # 8-byte chunks, decoded as runs, frame 3 bytes less than their data
        # each; 1-byte chunks then frame 4 bytes more each.
        run = chunked(*[b"abcdefgh"] * 10000)[:-5]
        for ones, refused in ((20000, False), (30000, True)):
            data = put_chunked(run + chunked(*[b"x"] * ones))
            with self.subTest(ones=ones):
                if refused:
                    self.assertRefused(data, "chunked framing outweighs its data")
                else:
                    self.assertEqual(len(self.body(data)), 80000 + ones)

    def test_unsupported_transfer_encodings(self):
        for te in ("gzip", "deflate", "identity", "gzip, chunked", "chunked, gzip", "foo", ""):
            with self.subTest(te=te):
                self.assertError(request("PUT", "/kv/k", [("Transfer-Encoding", te)]),
                                 501, "transfer-encoding not supported")

    def test_transfer_encoding_repeated(self):
        self.assertError(request("PUT", "/kv/k", [("Transfer-Encoding", "chunked"),
                                                  ("Transfer-Encoding", "chunked")]),
                         501, "transfer-encoding not supported")

    def test_transfer_encoding_on_http_1_0(self):
        data = request("PUT", "/kv/k", [("Transfer-Encoding", "chunked"),
                                        ("Connection", "keep-alive")],
                       chunked(b"abc"), version="HTTP/1.0")
        self.assertRefused(data, "transfer-encoding on http/1.0")

    def test_malformed_chunked_bodies(self):
        for name, body in MALFORMED_CHUNKED.items():
            with self.subTest(name):
                self.assertRefused(put_chunked(body), "bad chunked body")

    def test_whitespace_around_a_chunk_size(self):
        for line in (b"3 ", b" 3", b"3\t", b"\t3", b"3 ;ext=1"):
            with self.subTest(line=line):
                self.assertRefused(put_chunked(line + b"\r\nabc\r\n0\r\n\r\n"), "bad chunked body")

    def test_a_size_line_over_4096_bytes(self):
        extension = b";" + b"e" * 5000
        self.assertEqual(self.body(put_chunked(b"3%s\r\nabc\r\n0\r\n\r\n" % extension[:4094])),
                         b"abc")                                    # 4096 bytes before its LF
        for data in (put_chunked(b"3%s\r\nabc\r\n0\r\n\r\n" % extension[:4095]),
                     put_chunked(b"3" + extension * 2)):            # no line end yet
            self.assertRefused(data, "bad chunked body")

    def test_trailer_fields_count_against_the_header_limit(self):
        trailer = b"X-T: %s\r\n" % (b"t" * 100)
        fits, over = trailer * 9, trailer * 10                     # 963 and 1070 bytes
        self.assertEqual(self.body(put_chunked(chunked(b"ab", trailer=fits)),
                                   max_header_bytes=1000), b"ab")
        for data in (put_chunked(chunked(b"ab", trailer=over)),
                     put_chunked(b"2\r\nab\r\n0\r\n" + b"t" * 2000)):
            self.assertError(data, 400, "bad chunked body", max_header_bytes=1000)

    def test_exactly_max_bytes_chunked(self):
        value = bytes(range(250)) * 4
        body = chunked(value[:1], value[1:400], value[400:999], value[999:])
        self.assertEqual(self.body(put_chunked(body), max_body_bytes=1000), value)

    def test_chunked_body_over_the_limit(self):
        for body in (chunked(b"a" * 400, b"b" * 400, b"c" * 400), chunked(b"a" * 1000, b"b"),
                     chunked(*[b"abcde"] * 201), b"10000000000\r\n" + b"z" * 2000,
                     b"ffffffffffffffff\r\n"):
            with self.subTest(body=body[:20]):
                self.assertError(put_chunked(body), 413, "value too large", max_body_bytes=1000)

    def test_a_chunked_body_equals_its_content_length_twin(self):
        value = bytes(range(256)) * 40 + b"\r\n0\r\n\r\n5\r\n" * 50
        for sizes in ((5,), (8,), (7, 9), (1, 2, 3, 4, 5, 6), (256,), (257,), (4000,)):
            pieces, i, n = [], 0, 0
            while i < len(value):
                size = sizes[n % len(sizes)]
                pieces.append(value[i:i + size])
                i, n = i + size, n + 1
            with self.subTest(sizes=sizes):
                twin = self.parse(request("PUT", "/kv/k", [("Content-Length", len(value))], value))
                self.assertEqual(self.body(put_chunked(chunked(*pieces))), twin.body)

    def test_a_run_of_chunks_framed_alike_stops_where_they_differ(self):
        for pieces in ([b"abcde"] * 40 + [b"abcdef"] + [b"vwxyz"] * 40,
                       [b"abcde"] * 40 + [b"a\r\n5\r\n"] + [b"vwxyz"] * 40,
                       [b"\r\n5\r\n"] * 50):
            with self.subTest(pieces=pieces[40]):
                self.assertEqual(self.body(put_chunked(chunked(*pieces))), b"".join(pieces))
        wire = chunked(*[b"abcde"] * 40)
        bad = wire[:10 * 30 + 8] + b"X" + wire[10 * 30 + 9:]        # chunk 31: no CRLF
        self.assertRefused(put_chunked(bad), "bad chunked body")
        self.assertEqual(self.body(put_chunked(wire.replace(b"\r\n", b"\n"))), b"abcde" * 40)

    def test_small_chunks_framed_alike_are_decoded_in_bulk(self):
        # One size line in a run is matched by the regex, not each: that is
        # what makes 5-byte chunks cost little more than a Content-Length.
        value = bytes(range(250)) * 80                  # 4,000 chunks
        data = put_chunked(chunked(*(value[i:i + 5] for i in range(0, len(value), 5))))
        calls = []
        real = http11.CHUNK_LINE

        class Counting:
            def fullmatch(self, *args):
                calls.append(args)
                return real.fullmatch(*args)
        with mock.patch.object(http11, "CHUNK_LINE", Counting()):
            self.assertEqual(self.body(data), value)
        self.assertLess(len(calls), 40)

    def test_paused_after_chunks_per_step_chunks(self):
        parser = RequestParser(chunks_per_step=10)
        pieces = [b"%d" % (i % 10) for i in range(25)]
        parser.feed(put_chunked(chunked(*pieces)))
        req = parser.next_event()
        self.assertFalse(req.complete)
        self.assertTrue((parser.in_body, parser.body_started))
        self.assertEqual(parser.next_event(), PAUSED)        # chunks 11 to 20
        req2 = parser.next_event()                            # 21 to 25, and the last chunk
        self.assertIs(req2, req)
        self.assertEqual((req.complete, req.body), (True, b"".join(pieces)))

    def test_trailer_lines_count_against_the_budget_too(self):
        parser = RequestParser(chunks_per_step=3)
        parser.feed(put_chunked(b"1\r\na\r\n0\r\n" + b"T: 1\r\n" * 5 + b"\r\n"))
        req = parser.next_event()                   # two size lines, one trailer line
        self.assertEqual([parser.next_event() for _ in range(2)], [PAUSED, req])
        self.assertEqual((req.complete, req.body), (True, b"a"))

    def test_not_paused_when_the_budget_ends_with_the_input(self):
        parser = RequestParser(chunks_per_step=2)
        parser.feed(put_chunked(b"1\r\na\r\n1\r\nb\r\n"))
        self.assertFalse(parser.next_event().complete)
        self.assertIs(parser.next_event(), NEED_DATA)
        parser.feed(b"1\r\nc\r\n1\r\nd\r\n1\r\ne\r\n")
        self.assertIs(parser.next_event(), PAUSED)
        self.assertIs(parser.next_event(), NEED_DATA)
        parser.feed(b"0\r\n\r\n")
        self.assertEqual(parser.next_event().body, b"abcde")

    def test_paused_within_runs_of_alike_chunks(self):
        parser = RequestParser(chunks_per_step=100)
        parser.feed(put_chunked(chunked(*[b"abcde"] * 450)))
        self.assertFalse(parser.next_event().complete)             # chunks 1 to 100
        self.assertEqual([parser.next_event() for _ in range(3)], [PAUSED] * 3)
        self.assertEqual(parser.buffered - 5 * 400, len(chunked(*[b"abcde"] * 50)))
        req = parser.next_event()
        self.assertEqual((req.complete, req.body), (True, b"abcde" * 450))


class ConnectionTests(ParserTestCase):

    def test_keep_alive(self):
        for version, connection, keep_alive in (
                ("HTTP/1.1", None, True), ("HTTP/1.1", "close", False),
                ("HTTP/1.1", "Keep-Alive, Close", False), ("HTTP/1.0", None, False),
                ("HTTP/1.0", "keep-alive", True), ("HTTP/1.0", "Keep-Alive", True),
                ("HTTP/1.0", "close", False)):
            headers = [("Connection", connection)] if connection else []
            with self.subTest(version=version, connection=connection):
                req = self.parse(request("GET", "/health", headers, version=version))
                self.assertEqual((req.version, req.http_1_0, req.keep_alive),
                                 (version, version == "HTTP/1.0", keep_alive))

    def test_http_1_0_without_host(self):
        self.assertEqual(self.parse(request("GET", "/health", version="HTTP/1.0",
                                            host=False)).headers, {})

    def test_expect_continue(self):
        for version, expect, wanted in (("HTTP/1.1", "100-continue", True),
                                        ("HTTP/1.1", "100-Continue", True),
                                        ("HTTP/1.1", "200-ok", False),
                                        ("HTTP/1.0", "100-continue", False)):
            with self.subTest(version=version, expect=expect):
                req = self.parse(request("PUT", "/kv/k", [("Content-Length", "1"),
                                                          ("Expect", expect)], b"x", version))
                self.assertEqual(req.expect_continue, wanted)

    def test_expect_continue_then_the_body(self):
        for framing, body in (("Content-Length: 5", b"hello"),
                              ("Transfer-Encoding: chunked", chunked(b"hel", b"lo"))):
            with self.subTest(framing=framing):
                parser = RequestParser()
                parser.feed(request("PUT", "/kv/k", [framing, "Expect: 100-continue"]))
                req = parser.next_event()
                self.assertEqual((req.complete, req.expect_continue), (False, True))
                self.assertEqual((parser.in_body, parser.body_started, parser.in_head),
                                 (True, False, False))     # the caller sends CONTINUE now
                self.assertIs(parser.next_event(), NEED_DATA)
                parser.feed(body[:2])
                self.assertTrue(parser.body_started)
                self.assertIs(parser.next_event(), NEED_DATA)
                parser.feed(body[2:] + request("GET", "/"))
                self.assertIs(parser.next_event(), req)
                self.assertEqual((req.complete, req.body), (True, b"hello"))
                self.assertEqual((parser.in_body, parser.body_started, parser.in_head),
                                 (False, False, True))
                self.assertEqual(parser.next_event().method, "GET")

    def test_body_started_is_of_the_current_request(self):
        for first in (put_chunked(chunked(b"abc")),
                      request("PUT", "/kv/k", [("Content-Length", "3")], b"abc")):
            for framing in ("Content-Length: 5", "Transfer-Encoding: chunked"):
                with self.subTest(first=first[:40], framing=framing):
                    parser = RequestParser()
                    parser.feed(first)
                    self.assertTrue(parser.next_event().complete)
                    parser.feed(request("PUT", "/kv/k", [framing, "Expect: 100-continue"]))
                    self.assertFalse(parser.next_event().complete)
                    self.assertEqual((parser.in_body, parser.body_started), (True, False))

    def test_expect_continue_with_the_body_sent_at_once(self):
        parser = RequestParser()
        parser.feed(request("PUT", "/kv/k", [("Content-Length", "4"),
                                             ("Expect", "100-continue")], b"bo"))
        req = parser.next_event()
        self.assertEqual((req.complete, parser.body_started), (False, True))   # no CONTINUE
        parser.feed(b"dy")
        self.assertEqual(parser.next_event().body, b"body")
        parser = RequestParser()
        parser.feed(request("PUT", "/kv/k", [("Content-Length", "4"),
                                             ("Expect", "100-continue")], b"body"))
        req = parser.next_event()
        self.assertEqual((req.complete, req.body), (True, b"body"))    # never incomplete first

    def test_state_properties_and_buffered(self):
        parser = RequestParser()
        self.assertEqual((parser.in_head, parser.in_body, parser.body_started, parser.buffered),
                         (False, False, False, 0))
        parser.feed(b"PUT /kv/k HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n")
        self.assertIs(parser.next_event(), NEED_DATA)
        self.assertEqual((parser.in_head, parser.in_body, parser.buffered), (True, False, 49))
        parser.feed(b"\r\nabc")
        req = parser.next_event()
        self.assertEqual((req.head_bytes, parser.buffered), (51, 3))
        self.assertEqual((parser.in_head, parser.in_body, parser.body_started),
                         (False, True, True))
        parser.feed(b"defghij" + b"GET")
        self.assertIs(parser.next_event(), req)
        self.assertEqual((req.body, parser.buffered, parser.in_head), (b"abcdefghij", 3, True))
        parser = RequestParser()
        parser.feed(put_chunked(b"5\r\nhello\r\n3\r\nwor"))
        self.assertFalse(parser.next_event().complete)
        self.assertEqual(parser.buffered, len(b"hello") + len(b"wor"))

    def test_pipelining(self):
        requests = [
            request("PUT", "/kv/a", [("Content-Length", "3")], b"one"),
            request("PUT", "/kv/b", [("Transfer-Encoding", "chunked")], chunked(b"tw", b"o")),
            request("GET", "/kv/a"),
            request("HEAD", "/kv/b"),
            request("POST", "/kv/a"),
            request("DELETE", "/kv/a", [("Content-Length", "0")]),
            b"\r\n" + request("GET", "/health?x", [("Connection", "close")]),
        ]
        got = outcome([b"".join(requests)])
        fields = Request.__slots__.index("method"), Request.__slots__.index("path"), \
            Request.__slots__.index("body"), Request.__slots__.index("keep_alive")
        self.assertEqual([tuple(r[i] for i in fields) for r in got], [
            ("PUT", "/kv/a", b"one", True), ("PUT", "/kv/b", b"two", True),
            ("GET", "/kv/a", b"", True), ("HEAD", "/kv/b", b"", True),
            ("POST", "/kv/a", b"", True), ("DELETE", "/kv/a", b"", True),
            ("GET", "/health", b"", False)])
        self.assertEqual(got, [outcome([r])[0] for r in requests])

    def test_an_error_is_final(self):
        parser = RequestParser()
        parser.feed(b"GET / HTTP/1.1\r\n\r\n" + request("GET", "/"))
        for _ in range(3):
            with self.assertRaises(ProtocolError) as caught:
                parser.next_event()
            self.assertEqual((caught.exception.status, caught.exception.message),
                             (400, "missing host header"))
            parser.feed(request("GET", "/"))
        self.assertEqual((parser.buffered, parser.in_head, parser.in_body), (0, False, False))

    def test_protocol_error(self):
        error = ProtocolError(431, "too many headers")
        self.assertEqual((error.status, error.message, str(error)),
                         (431, "too many headers", "431 too many headers"))


# Requests that parse, and requests that fail, to be fed in pieces.  Small
# limits keep the limit cases short enough to feed one byte at a time.
LIMITS = {"max_header_bytes": 300, "max_body_bytes": 200, "chunks_per_step": 3}
CORPUS = [
    request("GET", "/kv/a?b") + request("HEAD", "http://h/kv/b", version="HTTP/1.0"),
    b"\r\n\n" + request("PUT", "/kv/k", ["Content-Length: 5", "Expect: 100-continue"], b"hello"),
    request("PUT", "/kv/k", [("Content-Length", "200")], b"v" * 200) + request("GET", "/"),
    put_chunked(chunked(b"a", b"bc", b"\r\n0\r\n", b"d" * 17, trailer=b"T: 1\r\n")),
    put_chunked(chunked(*[b"12345"] * 30)) + request("GET", "/x"),
    put_chunked(b"3\nabc\n0\n\n") + request("GET", "/y"),
    b"PUT /kv/k HTTP/1.1\nHost: h\nContent-Length: 2\n\nab",
    b"GET / HTTP/1.1\r\nHost: h\r\n\n" + request("GET", "/z"),
    request("GET", "/", [("X", "y" * 300)]),
    request("GET", "/" + "a" * 300),
    request("GET", "/", [("X", "1\r2")]),
    request("GET", "/", version="HTTP/2.0"),
    request("PUT", "/kv/k", [("Content-Length", "201")]),
    request("PUT", "/kv/k", [("Content-Length", "9" * 250)]),
    put_chunked(chunked(b"x" * 150, b"y" * 51)),
    put_chunked(b"3 \r\nabc\r\n0\r\n\r\n"),
    put_chunked(b"3\r\nabcd\r\n0\r\n\r\n"),
    put_chunked(b"3\r\nabc\r\n0\r\n" + b"T: x\r\n" * 60),
    put_chunked(b"1" * 20 + b"\r\n"),
    request("GET", "/") + request("GET", "/", host=False),
]


class IncrementalTests(unittest.TestCase):
    """However the bytes are cut, the parser gives the same requests and errors."""

    def test_the_corpus_covers_requests_and_errors(self):
        results = [outcome([data], **LIMITS) for data in CORPUS]
        self.assertEqual(sum(len(r) for r in results if isinstance(r[-1][0], str)), 13)
        self.assertEqual(sorted({r[-1] for r in results if isinstance(r[-1][0], int)}), [
            (400, "bad chunked body"), (400, "bad content-length"), (400, "bad header line"),
            (400, "missing host header"), (413, "value too large"),
            (414, "request line too long"), (431, "header block too large"),
            (505, "http version not supported")])

    def test_one_byte_at_a_time(self):
        for data in CORPUS:
            with self.subTest(data=data[:60]):
                self.assertEqual(outcome([data[i:i + 1] for i in range(len(data))], **LIMITS),
                                 outcome([data], **LIMITS))

    def test_every_split_point(self):
        for data in CORPUS:
            whole = outcome([data], **LIMITS)
            with self.subTest(data=data[:60]):
                for i in range(1, len(data)):
                    self.assertEqual(outcome([data[:i], data[i:]], **LIMITS), whole, i)

    def test_a_large_body_arriving_in_pieces(self):
        value = os.urandom(1 << 20)
        data = request("PUT", "/kv/k", [("Content-Length", len(value))], value)
        pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]
        self.assertEqual(outcome(pieces)[0][Request.__slots__.index("body")], value)
        wire = put_chunked(chunked(*(value[i:i + 1000] for i in range(0, len(value), 1000))))
        pieces = [wire[i:i + 65536] for i in range(0, len(wire), 65536)]
        self.assertEqual(outcome(pieces)[0][Request.__slots__.index("body")], value)


class ReplyTests(unittest.TestCase):
    DATE = re.compile(rb"Date: (Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
                      rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
                      rb"\d\d:\d\d:\d\d GMT\r\n")

    def split(self, reply):
        head, _, body = reply.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        return status, [line.split(b": ", 1) for line in lines], body

    def test_a_reply(self):
        reply = http11.response(200, b"ok\n", headers=(("ETag", '"x"'), ("X-B", "\xff")),
                                connection="keep-alive")
        status, headers, body = self.split(reply)
        self.assertEqual((status, body), (b"HTTP/1.1 200 OK", b"ok\n"))
        self.assertEqual([h for h in headers if h[0] != b"Date"], [
            [b"Content-Type", b"text/plain; charset=utf-8"], [b"Content-Length", b"3"],
            [b"Connection", b"keep-alive"], [b"ETag", b'"x"'], [b"X-B", b"\xff"]])
        self.assertEqual([h[0] for h in headers].count(b"Date"), 1)

    def test_connection_header(self):
        for connection, expected in ((None, []), ("close", [[b"Connection", b"close"]]),
                                     ("keep-alive", [[b"Connection", b"keep-alive"]])):
            _, headers, _ = self.split(http11.response_head(404, 0, connection=connection))
            self.assertEqual([h for h in headers if h[0] == b"Connection"], expected)

    def test_head_only_and_304(self):
        head = http11.response_head(200, 21, (("ETag", '"t"'),))
        self.assertEqual(http11.response(200, b"v" * 21, (("ETag", '"t"'),), head_only=True), head)
        self.assertIn(b"\r\nContent-Length: 21\r\n", head)
        for reply in (http11.response(304, b"v" * 21, head_only=True),
                      http11.response(304, b"v" * 21)):
            status, headers, body = self.split(reply)
            self.assertEqual((status, body), (b"HTTP/1.1 304 Not Modified", b""))
            self.assertNotIn(b"Content-Type", [h[0] for h in headers])
            self.assertIn([b"Content-Length", b"21"], headers)

    def test_without_content_type_or_with_another(self):
        _, headers, _ = self.split(http11.response_head(200, 1, content_type=None))
        self.assertNotIn(b"Content-Type", [h[0] for h in headers])
        for content_type in (b"text/x", "text/x"):
            _, headers, _ = self.split(http11.response_head(200, 1, content_type=content_type))
            self.assertIn([b"Content-Type", b"text/x"], headers)

    def test_error_response(self):
        reply = http11.error_response(503, "server busy", headers=(("Retry-After", "1"),))
        status, headers, body = self.split(reply)
        self.assertEqual((status, body), (b"HTTP/1.1 503 Service Unavailable", b"server busy\n"))
        for header in ([b"Connection", b"close"], [b"Retry-After", b"1"],
                       [b"Content-Length", b"12"], [b"Content-Type", http11.TEXT_PLAIN]):
            self.assertIn(header, headers)

    def test_date_header(self):
        header = http11.date_header().encode()
        self.assertRegex(header, self.DATE)
        when = email.utils.parsedate_to_datetime(header[6:-2].decode()).timestamp()
        self.assertLess(abs(when - time.time()), 5)
        with mock.patch("time.time", return_value=784111777.5):
            self.assertEqual(http11.date_header(), "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n")
            with mock.patch("email.utils.formatdate") as formatdate:
                http11.date_header()            # the same second: not built again
            formatdate.assert_not_called()
            self.assertIn(b"\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n", http11.response(200))

    def test_constants_and_chunks(self):
        self.assertEqual(http11.CONTINUE, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual((http11.REASONS[431], http11.REASONS[200]),
                         (b"Request Header Fields Too Large", b"OK"))
        self.assertEqual(b"".join(http11.chunk(b"x" * 26)), b"1a\r\n" + b"x" * 26 + b"\r\n")
        self.assertEqual(http11.chunk(b""), [])
        self.assertEqual(http11.LAST_CHUNK, b"0\r\n\r\n")
        self.assertEqual(repr((NEED_DATA, PAUSED)), "(NEED_DATA, PAUSED)")


class LinearTimeTest(unittest.TestCase):
    """A pipeline costs time linear in its bytes, fed at once or in pieces."""

    ONE = b"GET /kv/k HTTP/1.1\r\nHost: x\r\n\r\n"

    def parse_pipeline(self, count, piece, deadline):
        """Seconds to parse `count` pipelined requests fed `piece` bytes at a time."""
        data = self.ONE * count
        parser, seen = RequestParser(), 0
        started = time.process_time()
        for i in range(0, len(data), piece):
            parser.feed(data[i:i + piece])
            event = parser.next_event()
            while event is not NEED_DATA:
                seen += 1
                event = parser.next_event()
            if time.process_time() - started > deadline:
                return float("inf")             # already too slow: no need to finish
        self.assertEqual(seen, count)
        return time.process_time() - started

    # Times are CPU times (process_time): a test runner's other workers on
    # the same CPU cannot make a linear parser look quadratic.
    def test_a_large_head_arriving_one_byte_at_a_time(self):
        def parse(size, deadline):
            data = request("GET", "/", [("X", "v" * size)])
            parser = RequestParser()
            started = time.process_time()
            for i in range(len(data)):
                parser.feed(data[i:i + 1])
                event = parser.next_event()
                if i % 1000 == 0 and time.process_time() - started > deadline:
                    return float("inf")
            self.assertEqual(len(event.headers["x"]), size)
            return time.process_time() - started
        small = min(parse(10000, 60) for _ in range(3))
        large = min(parse(40000, 8 * small) for _ in range(2))
        self.assertLess(large, 8 * small, "10 KB: %.3fs, 40 KB: %.3fs" % (small, large))

    def test_four_times_the_requests_cost_about_four_times_the_time(self):
        for piece in (len(self.ONE) * 80000, 100):
            with self.subTest(piece=piece):
                small = min(self.parse_pipeline(20000, piece, 60) for _ in range(3))
                large = min(self.parse_pipeline(80000, piece, 8 * small) for _ in range(2))
                self.assertLess(large, 8 * small, "20,000 requests: %.3fs, 80,000: %.3fs"
                                % (small, large))


if __name__ == "__main__":
    unittest.main()
