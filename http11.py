"""The HTTP/1.1 wire format, without I/O: bytes in, requests out; replies out as bytes.

A RequestParser is a small state machine over one connection's input, in
the manner of h11: the transport feeds it whatever bytes arrived (feed) and
asks what they amount to (next_event): NEED_DATA, PAUSED, a Request, or a
ProtocolError, after which the connection must be answered and closed.
It never reads a socket, never waits and never starts a thread, so the
same code serves an asyncio protocol, a test feeding one byte at a time,
or anything else.  Its states, one per kind of bytes it expects next:

    HEAD      a request line and header fields, up to their blank line
    BODY      a Content-Length body: it stays in the input buffer until whole
    CHUNKED   a chunked body; `_left` says where inside it: data bytes still
              due (> 0), or _SIZE (a size line), _DATA_END (the CRLF after
              the data), _TRAILER (trailer lines, up to the blank one)
    DEAD      a ProtocolError was raised; it is raised again on every call

The parser is as strict as Go's net/http and nginx, because a request that
two parsers on its way (a proxy and us) could read differently is how
requests get smuggled: anything ambiguous is a 400 that closes the
connection.  Input is one bytearray consumed from the front (`del buf[:n]`
only moves its start, in CPython), and every search resumes where the last
one stopped, so a pipeline of many requests, fed at once or byte by byte,
costs time linear in its bytes.  Chunk data is copied in bulk, and a run of
small chunks framed alike (a client writing a fixed-size buffer again and
again) is taken with a few strided slices instead of a Python step per chunk.

Replies are built by response_head / response / error_response: the status
line, Content-Type, Content-Length, a Date header rebuilt once per second,
Connection, the caller's headers.
"""
import email.utils
import http
import re
import time

MAX_HEADERS = 100           # header lines in a head, as in http.client / http.server
MAX_CHUNK_LINE = 4096       # a chunk-size line, extensions included
FRAMING_ALLOWANCE = 65536   # chunked framing may outweigh the data it frames by this much
RUN_MAX_SIZE = 256          # chunks up to this size, framed alike, are decoded as a run

TEXT_PLAIN = b"text/plain; charset=utf-8"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
REASONS = {status.value: status.phrase.encode("ascii") for status in http.HTTPStatus}

TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"                 # an RFC 9110 token
# One SP between the three parts, nothing else (RFC 9112 3): a TAB or another
# Unicode space as separator is an error, not a space.
REQUEST_LINE = re.compile(r"(%s) ([^\x00-\x20\x7f]+) HTTP/([0-9])\.([0-9])" % TOKEN)
STRAY_LINE_ENDS = re.compile(rb"[\r\n]*")
# The header lines of a head whose CRLFs are LFs now, from the LF that ends
# the request line: each a name, a colon and a value without a NUL or another
# control byte but TAB, nor a CR (a bare one, then).  A bare CR ends a line
# for some parsers and not for others: it can hide a header (a
# Content-Length) from one and show it to another.  One match for the whole
# block costs less than a check per line.
HEADER_BLOCK = re.compile(r"(?:\n%s:[^\x00-\x08\x0a-\x1f\x7f]*)*" % TOKEN)
CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\x00]*)?\r?")   # no space around the size

HEAD, BODY, CHUNKED, DEAD = "head", "body", "chunked", "dead"
_SIZE, _DATA_END, _TRAILER = -1, -2, -3         # RequestParser._left inside CHUNKED


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")


class ProtocolError(Exception):
    """A request we cannot read on: answer `status` with `message`, then close the connection.

    `request`: the Request whose head was read, when its framing is what is
    refused (a Content-Length too large, say); else None.
    """

    request = None

    def __init__(self, status, message):
        super().__init__(status, message)
        self.status, self.message = status, message

    def __str__(self):
        return "%d %s" % (self.status, self.message)


def _bad(message="bad chunked body"):
    return ProtocolError(400, message)


class Request:
    """One request: its head, and its body once `complete` (see RequestParser.next_event).

    target is as sent; path and query are its parts (an absolute form's path,
    "" for a scheme but http(s)); version is "HTTP/1.0" or "HTTP/1.1";
    headers maps lower-case names to latin-1 values, OWS stripped, repeats
    joined with ", ".  framed: by Content-Length or Transfer-Encoding (a PUT
    without is a 411); content_length: None if chunked or absent;
    head_bytes: the request line, headers and blank line; body: bytes, b""
    until complete.
    """

    __slots__ = ("method", "target", "path", "query", "http_1_0", "headers", "keep_alive",
                 "framed", "expect_continue", "content_length", "chunked", "head_bytes",
                 "complete", "body")

    def __init__(self, method, target, minor, headers):
        self.method, self.target, self.headers = method, target, headers
        if target[0] != "/":                    # absolute form: http://host/path?query
            scheme, _, rest = target.partition("://")
            target = "/" + rest.partition("/")[2] if scheme.lower() in ("http", "https") else ""
        self.path, _, self.query = target.partition("?")
        # Any 1.x but 1.0 is read as 1.1 (RFC 9112 2.3).
        self.http_1_0 = http_1_0 = minor == "0"
        tokens = headers.get("connection", "").lower()
        if http_1_0:
            self.keep_alive, self.expect_continue = "keep-alive" in tokens, False
        else:
            self.keep_alive = "close" not in tokens
            self.expect_continue = headers.get("expect", "").lower() == "100-continue"
        self.framed = self.chunked = self.complete = False
        self.content_length, self.head_bytes, self.body = None, 0, b""

    @property
    def version(self):
        return "HTTP/1.0" if self.http_1_0 else "HTTP/1.1"

    def __repr__(self):
        return "<Request %s %r %s%s>" % (self.method, self.target, self.version,
                                          "" if self.complete else " (body to come)")


def _too_large(buf, limit):
    """The error for a head over `limit` bytes: 414 if its request line alone is."""
    newline = buf.find(b"\n", 0, limit + 2)
    if newline < 0 or newline - (buf[newline - 1] == 13) > limit:
        return ProtocolError(414, "request line too long")
    return ProtocolError(431, "header block too large")


def _parse_head(buf, size):
    """The Request whose head, blank line excluded, is buf[:size]; ProtocolError if malformed."""
    text = buf[:size].decode("latin-1").replace("\r\n", "\n")
    line_end = text.find("\n")
    line = REQUEST_LINE.fullmatch(text, 0, line_end if line_end >= 0 else len(text))
    if line is None:                            # (it admits no control byte)
        raise ProtocolError(400, "bad request line")
    method, target, major, minor = line.groups()
    if major != "1":
        raise ProtocolError(505, "http version not supported")
    if line_end < 0:
        lines = ()
    elif HEADER_BLOCK.fullmatch(text, line_end) is None:
        raise ProtocolError(400, "bad header line")
    else:
        lines = text[line_end + 1:].split("\n")
        if len(lines) > MAX_HEADERS:
            raise ProtocolError(431, "too many headers")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.lower()
        value = value.strip(" \t")
        seen = headers.get(name)
        if seen is None:
            headers[name] = value
        elif name == "host":
            raise ProtocolError(400, "repeated host header")
        elif name == "content-length":
            if value != seen:                   # the same value twice is harmless
                raise ProtocolError(400, "ambiguous message length")
        else:
            headers[name] = seen + ", " + value     # RFC 9110 5.3
    if minor != "0" and "host" not in headers:
        raise ProtocolError(400, "missing host header")
    return Request(method, target, minor, headers)


def _content_length(value, limit, too_large):
    """The number a Content-Length names: 400 unless 1*DIGIT below 2**63, 413 over `limit`."""
    if not (value.isascii() and value.isdigit()):
        raise ProtocolError(400, "bad content-length")
    digits = value.lstrip("0") or "0"
    # int() of thousands of digits raises ValueError (Python 3.11+), and no
    # body that large can exist: refuse what a 64-bit parser (Go's) refuses.
    length = int(digits) if len(digits) <= 19 else 1 << 63
    if length >= 1 << 63:
        raise ProtocolError(400, "bad content-length")
    if length > limit:
        raise ProtocolError(413, too_large)
    return length


class RequestParser:
    """One connection's requests, from the bytes fed to it; see the module docstring."""

    def __init__(self, max_header_bytes=65536, max_body_bytes=10 << 20, chunks_per_step=1024,
                 body_limit=None):
        """`body_limit`, if given, says per request, from its head, what max_body_bytes says
        for all: body_limit(request) -> (the largest body, the message of the 413 past it).
        One route may take larger bodies than another (a batch of keys, a value)."""
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.chunks_per_step = chunks_per_step
        self.body_limit = body_limit
        self._limit = (max_body_bytes, "value too large")  # the current body's: see body_limit
        self._buf = bytearray()     # input not yet consumed
        self._state = HEAD
        self._scanned = 0           # HEAD: no head ends before this offset
        self._request = None        # BODY, CHUNKED: the request whose body is awaited
        self._body = None           # CHUNKED: the data decoded so far
        self._left = _SIZE          # CHUNKED: where inside the body (module docstring)
        self._framing = 0           # CHUNKED: bytes of size lines and CRLFs so far
        self._trailer = 0           # CHUNKED: bytes of trailer lines so far
        self._consumed = False      # CHUNKED: some of this body has been decoded
        self._error = None

    def feed(self, data):
        """Append bytes that arrived; nothing is parsed until next_event()."""
        if self._state is not DEAD:
            self._buf += data

    @property
    def buffered(self):
        """Bytes held: unconsumed input and a chunked body being assembled."""
        return len(self._buf) + (len(self._body) if self._body is not None else 0)

    @property
    def body_started(self):
        return self.in_body and bool(self._buf or self._consumed)

    @property
    def in_head(self):
        return self._state is HEAD and len(self._buf) > 0

    @property
    def in_body(self):
        return self._state is BODY or self._state is CHUNKED

    def next_event(self):
        """NEED_DATA, PAUSED or a Request (complete or not: see Request.complete).

        After a Request that is not complete, call it again at once: the body
        may be buffered already.  Raises ProtocolError, then again on every call.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        if not self._buf and self._state is HEAD:
            return NEED_DATA            # the usual end of a turn: nothing more has come
        try:
            if self._state is HEAD:
                return self._next_head()
            if self._state is BODY:
                request = self._request
                if len(self._buf) < request.content_length:
                    return NEED_DATA
                request.body = self._take(request.content_length)
                return self._done(request)
            return self._next_chunks(False)
        except ProtocolError as error:
            self._error, self._state = error, DEAD
            self._buf, self._body, self._request = bytearray(), None, None
            raise

    def _next_head(self):
        buf = self._buf
        if buf and (buf[0] == 13 or buf[0] == 10):     # RFC 9112 2.2: stray CRLFs first
            del buf[:STRAY_LINE_ENDS.match(buf).end()]
            self._scanned = 0
        if not buf:
            return NEED_DATA
        # The head ends at its first LF followed by LF or CRLF (a CR before
        # that LF belongs to the end).  Two finds are four times faster than
        # a regex; they resume where the last call's stopped.
        limit = self.max_header_bytes
        start, stop = max(self._scanned - 3, 0), limit + 4
        newline = buf.find(b"\n\r\n", start, stop)
        bare = buf.find(b"\n\n", start, stop if newline < 0 else newline + 2)
        if bare >= 0:
            newline, end = bare, bare + 2
        elif newline >= 0:
            end = newline + 3
        elif len(buf) < stop:
            self._scanned = len(buf)
            return NEED_DATA
        else:
            raise _too_large(buf, limit)
        size = newline - 1 if buf[newline - 1] == 13 else newline
        if size > limit:
            raise _too_large(buf, limit)
        request = _parse_head(buf, size)
        request.head_bytes = end
        del buf[:end]
        self._scanned = 0
        try:
            return self._frame(request)
        except ProtocolError as error:
            error.request = request
            raise

    def _frame(self, request):
        """Find how the body is framed (RFC 9112 6.3); take it if it is all here.

        A body over its limit (max_body_bytes, or body_limit's) is refused
        from its Content-Length, before a byte of it arrives.  A request
        ambiguous about its length is refused: we could not know where the
        next request starts.
        """
        headers = request.headers
        encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if encoding is None and length is None:
            request.complete = True             # no body: a GET, mostly
            return request
        if self.body_limit is not None:
            self._limit = self.body_limit(request)
        if encoding is not None:
            if request.http_1_0:
                raise _bad("transfer-encoding on http/1.0")
            if length is not None:
                raise _bad("ambiguous message length")
            if encoding.lower() != "chunked":
                raise ProtocolError(501, "transfer-encoding not supported")
            request.framed = request.chunked = True
            self._state, self._request, self._body = CHUNKED, request, bytearray()
            self._left, self._framing, self._trailer = _SIZE, 0, 0
            return self._next_chunks(True)
        request.framed = True
        request.content_length = length = _content_length(length, *self._limit)
        if len(self._buf) >= length:
            request.body = self._take(length)
            request.complete = True
            return request
        self._state, self._request = BODY, request
        return request

    def _take(self, size):
        """The first `size` bytes of the input, as bytes, consumed: one copy."""
        buf = self._buf
        with memoryview(buf) as view:
            body = view[:size].tobytes()
        del buf[:size]
        return body

    def _done(self, request):
        request.complete = True
        self._state, self._request, self._body, self._consumed = HEAD, None, None, False
        return request

    def _next_chunks(self, at_head):
        done = self._decode_chunks()
        request = self._request
        if done:
            request.body = bytes(self._body)
            return self._done(request)
        if at_head:
            return request                      # its head now; its body on later calls
        return NEED_DATA if done is False else PAUSED

    def _decode_chunks(self):
        """Decode the buffered chunks: True once the body is whole, False if more
        must come, None if this step's share is spent first: chunks_per_step
        lines (size or trailer lines), each a few steps of Python."""
        buf, body, left = self._buf, self._body, self._left
        pos, end, budget = 0, len(buf), self.chunks_per_step
        view = memoryview(buf)
        try:
            while pos < end:
                if left > 0:                                    # chunk data, in bulk
                    take = min(left, end - pos)
                    body += view[pos:pos + take]
                    pos += take
                    left = left - take or _DATA_END
                elif left == _DATA_END:                         # the CRLF after the data
                    if buf.startswith(b"\r\n", pos):
                        pos += 2
                    elif buf[pos] == 10:
                        pos += 1
                    elif pos + 1 == end and buf[pos] == 13:
                        break
                    else:
                        raise _bad()
                    left = _SIZE
                else:                                           # a size line or a trailer line
                    newline = buf.find(b"\n", pos)
                    line = (newline if newline >= 0 else end) + 1 - pos
                    if left == _TRAILER and self._trailer + line > self.max_header_bytes:
                        raise _bad()
                    if newline < 0:
                        if left == _SIZE and line > MAX_CHUNK_LINE + 1:
                            raise _bad()
                        break
                    if not budget:                      # this step's share is spent
                        return None
                    budget -= 1
                    if left == _TRAILER:                # trailer fields: skipped
                        self._trailer += line
                        if line == 1 or (line == 2 and buf[pos] == 13):
                            pos = newline + 1
                            return True
                    else:
                        left = self._chunk_size(buf, pos, newline, len(body)) or _TRAILER
                        if 0 < left <= RUN_MAX_SIZE and line + 2 <= left:
                            pos, left, budget = self._run(buf, pos, newline + 1, left, budget)
                            continue
                    pos = newline + 1
        finally:
            view.release()
            if pos:
                del buf[:pos]
                self._consumed = True
            self._left = left
        return False

    def _chunk_size(self, buf, pos, newline, have):
        """The size the line buf[pos:newline] announces, `have` bytes of data decoded."""
        if newline - pos > MAX_CHUNK_LINE:
            raise _bad()
        match = CHUNK_LINE.fullmatch(buf, pos, newline)
        if match is None:
            raise _bad()
        size = int(match[1], 16)
        limit, too_large = self._limit
        if have + size > limit:
            raise ProtocolError(413, too_large)
        # A size line costs a few steps of Python, whatever it frames: 1-byte
        # chunks (five bytes of framing each) would cost seconds for 10 MB.
        self._framing += newline + 3 - pos                  # with the CRLF after the data
        if self._framing > have + size + FRAMING_ALLOWANCE:
            raise _bad("chunked framing outweighs its data")
        return size

    def _run(self, buf, start, data_at, size, budget):
        """A small chunk whose size line was just read, and the chunks after it framed alike.

        Each framing byte (of the size line, of the CRLF after the data) is
        compared across all of them at once, a strided slice; then the data
        is gathered by one strided copy per byte of a chunk: O(size) steps of
        Python for up to budget + 1 chunks, instead of several per chunk.
        Each chunk of a run frames no more than its data (checked by the
        caller) and stays within the body's limit, so none of them would have
        failed a check of _chunk_size.  Returns (pos, left, budget) for the
        decoding loop.
        """
        line = data_at - start
        period = line + size + 2
        count = min((len(buf) - start) // period, budget + 1,
                    (self._limit[0] - len(self._body)) // size)
        if count < 4 or buf[start:data_at] != buf[start + period:start + period + line]:
            return data_at, size, budget                # not a run worth the set-up
        framing = [(i, buf[start + i:start + i + 1]) for i in range(line)]
        for offset, byte in framing + [(period - 2, b"\r"), (period - 1, b"\n")]:
            column = buf[start + offset:start + count * period:period]
            count = len(column) - len(column.lstrip(byte))     # up to its first other byte
        if count < 2:
            return data_at, size, budget
        data = bytearray(count * size)
        stop = start + count * period
        for i in range(size):
            data[i::size] = buf[data_at + i:stop:period]
        self._body += data
        self._framing += (count - 1) * (line + 2)
        return stop, _SIZE, budget - (count - 1)


# ---------------------------------------------------------------- replies --

_CONNECTION = {None: "", "close": "Connection: close\r\n",
               "keep-alive": "Connection: keep-alive\r\n"}
_STATUS_LINES = {status: "HTTP/1.1 %d %s\r\n" % (status, reason.decode("ascii"))
                 for status, reason in REASONS.items()}
_type_lines = {}            # content type -> its header line: the few kinds we send, built once
_date = (None, "")          # (second, its Date header): replaced whole, so threads may share it


def date_header():
    """The Date header line (str), built once per second, not once per reply."""
    global _date
    now = int(time.time())
    second, header = _date
    if now != second:
        header = "Date: %s\r\n" % email.utils.formatdate(now, usegmt=True)
        _date = (now, header)
    return header


def _type_line(content_type):
    line = _type_lines.get(content_type)
    if line is None:
        text = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
        line = _type_lines[content_type] = "Content-Type: %s\r\n" % text
    return line


def response_head(status, length, headers=(), content_type=TEXT_PLAIN, connection=None):
    """The status line and headers of a reply with a body of `length` bytes, blank line included.

    `headers`: (name, value) pairs of str (latin-1).  A 304 has no
    Content-Type (it describes no body), but the Content-Length of the 200
    it stands for, as a HEAD does.  `connection`: None, "close" or
    "keep-alive".  The head is built as one str and encoded once: a third
    of the time of formatting bytes piece by piece.
    """
    type_line = "" if content_type is None or status == 304 else _type_line(content_type)
    status_line = _STATUS_LINES.get(status) or "HTTP/1.1 %d \r\n" % status
    return ("%s%sContent-Length: %d\r\n%s%s%s\r\n" % (
        status_line, type_line, length, date_header(), _CONNECTION[connection],
        "".join([name + ": " + value + "\r\n" for name, value in headers]))).encode("latin-1")


def response(status, body=b"", headers=(), content_type=TEXT_PLAIN, connection=None,
             head_only=False):
    """A whole reply; head_only (HEAD, and always for a 304): its head, without the body."""
    head = response_head(status, len(body), headers, content_type, connection)
    return head if head_only or status == 304 else head + body


def error_response(status, message, connection="close", headers=()):
    """A text/plain error reply: `message` and a newline."""
    return response(status, (message + "\n").encode("utf-8"), headers, TEXT_PLAIN, connection)


def chunk(data):
    """The pieces of one chunk of a chunked reply, for writelines(); none for empty data,
    which would end the body (LAST_CHUNK does that)."""
    return [b"%x\r\n" % len(data), data, b"\r\n"] if data else []
