"""HTTP front end and process lifecycle of the key-value server.

    python3 server.py [--port 8080] [--working-dir ./data] ...   (--help for all)

The server is an http.server.ThreadingHTTPServer whose threads serve
requests, not connections, and never wait for a client.  The main thread
accepts connections; one worker thread watches them all (epoll) and gives
each a turn when its socket is ready: it reads what has arrived, without
blocking, into the connection's buffer; serves each whole request found
there (calls the Store, store.py); sends what the socket takes of the
reply, keeping the rest for later turns.  A request that has not fully
arrived costs a buffer, not a thread, so slow or stalled clients hold
nobody up, and the number of threads is fixed.  The worker also drives
the journal: it sends the writes of its turns to the journal's writer, a
process of its own that writes and fsyncs them, and sends each write's
reply once the writer says it is durable (KVHandler.write).  Every wait
on a client has a deadline, and everything a client can make the server
spend has a bound (Limits).  On a host of
its own, --cpu N adds two changes, each explained where it is made: every
thread runs on one CPU (pin_to_one_cpu), and a woken thread does not
preempt the running one (no_wakeup_preemption).  The store is a dict
behind one lock; persistence.py puts it on disk.

A PUT, from the socket to the disk
----------------------------------
    KVServer._accept_queued       accepts; process_request arms the socket in
                                  the worker's epoll set (watch_new)
    KVServer._serve_connections   the worker thread: the socket is readable,
                                  so the connection gets a turn:
    KVHandler.turn                one non-blocking read into its buffer
    KVHandler.read_head           once the head's blank line is there:
    KVHandler.parse_request       request line and headers, strictly
    KVHandler.frame_body          Content-Length or chunked, at most
                                  --max-value-bytes, 413 before reading more;
                                  the body from the buffer, or over later turns
    KVHandler.do_kv               validates the key, then Store.put:
    Store._mutate                 under the lock, Journal.append queues the
                                  record and its callback (send_when_durable);
                                  the dict waits until it is durable; the
                                  connection is owed its reply, and the
                                  worker goes on with the others
    Journal.pump                  before the worker waits in poll(): every
                                  record queued by its turns, as one round,
                                  down the socket pair to the writer process
    _write_rounds                 the journal's writer (persistence.py), a
                                  process of its own: every round that has
                                  arrived, one writev, one fsync (group
                                  commit); its reply comes back to the worker
    Journal.on_readable           the worker: Store._apply_round applies the
                                  round to the dict; then each write's
                                  callback:
    KVServer.hand_reply           queues the 200, which the worker sends
                                  (send_replies): status, headers, body in one
                                  send; the socket stayed in the epoll set,
                                  which reports the next request

A SIGTERM, from the signal to exit 0
------------------------------------
    signal.set_wakeup_fd the signal's number goes down a pipe; the Python
                         handler does nothing (it would interrupt the main
                         thread, which may hold a lock).
    stopper              a thread reading that pipe: logs, then calls
                         server.shutdown(), which waits for serve_forever()
                         to return, so the main thread cannot call it itself.
                         A second signal is logged and changes nothing.
    serve_forever()      returns in the main thread; no more accepts, and
                         server_close() closes the listening socket.
    KVServer.drain       closes idle keep-alive connections at once; lets
                         requests in flight finish (Connection: close), up
                         to --shutdown-timeout, and drain() logs what it
                         waits for.
    Store.seal           any later write gets 503; the dict is frozen.
    Store.save_and_close the final snapshot, then the journals go; exit 0,
                         or exit 1 if the save failed (the journal stays).
"""

import sys

# Before anything an older Python cannot import or run.  Python compiles
# the whole file before this line runs, so all of it must parse under 3.6
# (no walrus, no positional-only parameters, no f"{x=}", no match):
# tests/test_lifecycle.py checks that.
if sys.version_info < (3, 10):
    sys.stderr.write("error: kvstore needs Python 3.10 or newer; %s is Python %s\n"
                     % (sys.executable or "this interpreter", sys.version.split()[0]))
    sys.exit(2)

# The imports wait for the version check (flake8 would say E402).
import argparse
import bisect
import collections
import email.utils
import errno
import hmac
import http.server
import ipaddress
import os
import pickle
import re
import resource
import select
import selectors
import signal
import socket
import socketserver
import threading
import time
import urllib.parse

import persistence
from store import ConditionFailed, KeyIndexBuilding, Sealed, Store, value_tag

# ------------------------------------------------------------------ logging --
#
# Logging never raises: a log pipe that dies (`./run.sh | head -2`), a
# closed stdout or a full disk under a redirect must not stop a request, the
# thread that handles signals, or the final save.  Lines go straight to the
# file descriptor with os.write: no buffer to hold lines that cannot be
# written, and nothing left to flush at exit.

_log_lock = threading.Lock()


def _write_line(fd, line):
    """Write one line to `fd`; a failure drops the line, it never raises."""
    data = (line + "\n").encode("utf-8", "backslashreplace")
    try:
        while data:
            data = data[os.write(fd, data):]
    except (OSError, ValueError):
        pass                    # EPIPE, EBADF, ENOSPC...: nobody to tell


def log(message):
    """One line to stdout, at once (the harnesses read it live)."""
    with _log_lock:
        _write_line(1, message)


def fail(message):
    """One line to stderr: what failed and why, never a traceback."""
    with _log_lock:
        _write_line(2, "error: " + message)


# ---------------------------------------------------------------- HTTP layer --

READ_SIZE = 65536           # one recv per turn at most: it bounds the work of a turn
REQUESTS_PER_TURN = 32      # pipelined requests served in one turn; then the others' turn
MAX_HEADERS = 100           # as in http.client / http.server
MAX_CHUNK_LINE = 4096       # a chunk-size line, extensions included
CHUNKS_PER_TURN = 1024      # chunks decoded in one turn (a few microseconds of Python each)
FRAMING_ALLOWANCE = 65536   # chunked framing may outweigh the data it frames by this much
LINGER_SECONDS = 2.0        # after an error that closes: how long unread input is drained
KEY = re.compile(r"[A-Za-z0-9:_.\-]+")
TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"                 # an RFC 9110 token
HEADER_NAME = re.compile(TOKEN)
# One SP between the three parts, nothing else (RFC 9112 3): a TAB or another
# Unicode space as separator is an error, not a space.
REQUEST_LINE = re.compile(r"(%s) ([^\x00-\x20\x7f]+) (HTTP/(\d)\.(\d))" % TOKEN)
HEAD_END = re.compile(rb"\r?\n\r?\n")
# In a request head: a NUL or another control byte but TAB, or a CR not
# followed by LF.  A bare CR ends a line for some parsers and not for others:
# it can hide a header (a Content-Length) from one and show it to another.
BAD_HEAD_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")
CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\x00]*)?\r?")   # no space around the size
REASONS = {status: phrase.encode() for status, (phrase, _)
           in http.server.BaseHTTPRequestHandler.responses.items()}
ALLOWED = {"/kv/": "GET, HEAD, PUT, DELETE", "/kv": "GET, HEAD", "/clear": "DELETE",
           "/health": "GET, HEAD", "/metrics": "GET, HEAD", "/snapshot": "GET"}


class Limits:
    """Every bound on what a client can make the server spend; each is a flag (parse_args).

    Timeouts are in seconds, measured by the sweep (KVServer), so they are
    exact to within a second.
      header_timeout      a request line and headers must arrive within it,
                          from the first byte (from the accept for a new
                          connection); else 408, and the connection closes.
      body_timeout        a body must keep arriving: a pause longer than it
                          gets 408.
      send_timeout        a client must keep reading its reply: a pause
                          longer than it closes the connection.
      idle_timeout        a keep-alive connection without a request for so
                          long is closed.
      max_connections     past it, a new connection gets a canned 503 and is
                          closed at once.
      max_inflight_bytes  bodies being received, header blocks and unsent
                          replies, for all connections together; a request
                          that would pass it gets 503 with Retry-After.
      max_header_bytes    request line and headers; past it, 431 (414 if the
                          request line alone is longer).
      max_value_bytes     the largest body; past it, 413.
    """

    def __init__(self, header_timeout=10.0, body_timeout=30.0, send_timeout=30.0,
                 idle_timeout=60.0, max_connections=16384, max_inflight_bytes=256 << 20,
                 max_header_bytes=65536, max_value_bytes=10 << 20):
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.send_timeout, self.idle_timeout = send_timeout, idle_timeout
        self.max_connections, self.max_inflight_bytes = max_connections, max_inflight_bytes
        self.max_header_bytes, self.max_value_bytes = max_header_bytes, max_value_bytes


class RequestError(Exception):
    """A request we answer with an error status; `close` if the stream is unusable after it."""

    def __init__(self, status, message, close=False, headers=()):
        super().__init__(message)
        self.status, self.message, self.close, self.headers = status, message, close, headers


def storage_error(error):
    """(status, message) for a write the journal could not make durable (the journal logs why)."""
    if error.errno in persistence.STORAGE_FULL:
        return 507, "insufficient storage"
    return 500, "storage error"


def parse_key(raw):
    """The key named by the path after /kv/ (percent-decoded), or RequestError."""
    if "%" in raw:
        try:
            raw = urllib.parse.unquote_to_bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            raise RequestError(400, "key contains invalid characters")
    if not raw:
        raise RequestError(400, "key cannot be empty")
    if not KEY.fullmatch(raw):
        raise RequestError(400, "key contains invalid characters")
    return raw


class _ThisSecond:
    """What changes only once per second, built once per second instead of once per reply.

    The Date header; and the 200 of a write, which differs from one to the
    next only by its Date and Connection headers (building it costs a
    microsecond, a tenth of a PUT's Python time).
    """

    def __init__(self):
        self._second = None
        self._value = b""
        self._write_ok = {}         # Connection header -> the 200 of a write

    def date_header(self):
        now = int(time.time())
        if now != self._second:
            value = email.utils.formatdate(now, usegmt=True)
            self._write_ok = {}
            self._value, self._second = ("Date: %s\r\n" % value).encode("ascii"), now
        return self._value

    def write_ok(self, connection, etag=None):
        """The 200 of a write (no body), with this Connection header and ETag (bytes) if any."""
        self.date_header()              # a new second empties the cache
        cache = self._write_ok
        reply = cache.get(connection)
        if reply is None:
            reply = cache[connection] = build_reply(200, b"", connection)
        if etag is None:
            return reply
        return b"%sETag: %s\r\n\r\n" % (reply[:-2], etag)     # before the blank line


_this_second = _ThisSecond()


TEXT_PLAIN = b"text/plain; charset=utf-8"


def build_head(status, length, connection, headers=(), content_type=TEXT_PLAIN):
    """Status line and headers of a reply, up to its blank line.

    Pure, so that another thread (the snapshot stream's) may build one too:
    it must not touch the state of a handler that is already on its next
    request.
    """
    head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
            b"Content-Type: %s\r\n" % content_type,
            b"Content-Length: %d\r\n" % length, _this_second.date_header(), connection]
    for name, value in headers:
        head.append(("%s: %s\r\n" % (name, value)).encode("latin-1"))
    head.append(b"\r\n")
    return b"".join(head)


def build_reply(status, body, connection, headers=()):
    """A whole small reply as bytes: head and body."""
    return build_head(status, len(body), connection, headers) + body


# A connection is in one of these states; the worker thread moves it from one
# to the next (KVHandler.turn); OWED ends when the worker sends the reply that
# a durable write, or the snapshot stream, handed over (KVServer.send_replies).
HEAD = "head"           # waiting for (the rest of) a request line and headers
BODY = "body"           # receiving a Content-Length body, straight into its buffer
CHUNKED = "chunked"     # decoding a chunked body as it arrives
OWED = "owed"           # a write is in the journal: its reply comes once durable
CLOSING = "closing"     # close once the reply is out
LINGER = "linger"       # after an error: reply out, then read and drop input until EOF
CLOSED = "closed"


class KVHandler(http.server.BaseHTTPRequestHandler):
    """One connection: its buffers, where it is in a request, its deadline.

    A connection never has a thread of its own, and no thread ever waits
    for its client.  The worker thread gives it a turn when its socket is
    ready (KVServer): a turn reads what has arrived, without blocking, into
    the connection's buffer; serves each whole request found there (route);
    sends the reply, or as much of it as the socket takes; and hands the
    socket back to the kernel to watch, for more input or for room to send
    the rest.  A stalled client costs its buffer, never a thread.

    The request head is parsed once its blank line is in the buffer; a
    Content-Length body is received straight into a buffer of its size; a
    chunked one is decoded as it arrives, in bulk (decode_chunks).  route()
    runs only once the whole request is there, so a handler never waits.

    Overridden hooks of BaseHTTPRequestHandler, and why:
      __init__            only sets the connection up: it is served in turns,
                          not by one call to handle();
      parse_request       a stricter parser of our own, on a head already in
                          memory (the base one reads lines from a file, and
                          goes through email.parser);
      send_error          text/plain bodies, as every reply of ours;
      log_message         to stdout, and only with --access-log.
    Replies go out whole (reply): status line, headers and body in one
    send, so that a reply is one TCP segment when it fits (with Nagle off,
    two writes would be two segments).
    """

    protocol_version = "HTTP/1.1"
    server_version = "kvstore"

    def __init__(self, request, client_address, server):
        self.request = self.connection = request
        self.client_address, self.server = client_address, server
        self.state = HEAD
        self.inbuf = b""            # bytes received and not yet used
        self.body = None            # the body being received (bytearray), or received
        self.body_got = 0           # bytes of a BODY body received so far
        self.chunk_left = -1        # CHUNKED: data bytes left in the chunk, or a _CHUNK_ step
        self.trailer_bytes = 0
        self.out = []               # the unsent rest of replies: memoryviews
        self.out_bytes = 0
        self.held = 0               # bytes counted in the server's in-flight total
        self.idle = False           # between two requests, none begun
        self.lingering = False      # LINGER: the write side is shut
        self.yielded = False        # this turn's share of decoding is spent
        self.missed = False         # OWED: an event came, and was left for later
        self.unread = True          # the socket may hold input not yet read (Poller)
        self.handed_off = False     # this request's write is the journal's now
        self.close_connection = False
        self.requestline = ""
        self.command = None
        self.request_version = "HTTP/1.1"
        self.deadline = server.now + server.limits.header_timeout
        self.started = server.now       # when the request began, for the latency metric

    # -- a turn ---------------------------------------------------------------

    def turn(self, readable):
        """Do what can be done now without waiting; the worker thread calls it.

        `readable`: the kernel reported the socket (more input, or room to
        send); a turn from the ready queue reads only what is left unread.
        """
        if readable:
            self.unread = True
        if self.state is OWED:
            self.missed = True      # its turn comes once its reply is sent (send_replies)
            return
        if self.state is CLOSED:
            return                  # a stale event
        try:
            self._turn(readable)
        except Exception:
            self.server.handle_error(self.request, self.client_address)
            self.close()

    def _turn(self, readable):
        server = self.server
        if self.out and not self.flush():
            return self.wait(OUT)
        if self.state is CLOSING or (self.state is HEAD and self.close_connection):
            return self.close()      # the last reply said Connection: close
        if self.state is LINGER:
            return self.linger()
        if self.unread and not self.receive():
            return self.close()
        for _ in range(REQUESTS_PER_TURN):
            if not self.advance():
                if self.yielded:
                    self.yielded = False
                    self.account()
                    server.ready.append(self)   # back of the queue, its input still buffered
                    return
                break                           # the rest of a request has yet to come
            if self.handed_off:
                return                          # until its reply is sent (send_replies)
            if self.close_connection or self.state is LINGER:
                if self.state is not LINGER:
                    self.state = CLOSING
                return self._turn(False)
            if self.out:
                return self.wait(OUT)
        else:
            self.account()
            server.ready.append(self)           # the others first: back of the queue
            return
        if self.state is HEAD and not self.inbuf:
            if server.draining:
                return self.close()
            if not self.idle:
                self.idle = True
                self.deadline = server.now + server.limits.idle_timeout
        self.wait(IN)

    def wait(self, events):
        """Count what this connection holds, and let the kernel watch its socket.

        Input left unread (a full READ_SIZE read) gives the connection
        another turn instead: the kernel reports only input that arrives.
        """
        self.account()
        if events == IN and self.unread:
            self.server.ready.append(self)
        else:
            self.server.poller.arm(self.request.fileno(), events)

    def receive(self):
        """One non-blocking read.  False if the client has gone."""
        server = self.server
        try:
            if self.state is BODY:
                want = len(self.body) - self.body_got
                n = self.request.recv_into(memoryview(self.body)[self.body_got:])
                if not n:
                    return False
                self.unread = n == want         # all it asked for: maybe more
                self.body_got += n
                self.deadline = server.now + server.limits.body_timeout
                return True
            data = self.request.recv(READ_SIZE)
        except BlockingIOError:
            self.unread = False
            return True
        except OSError:
            return False
        if not data:
            return False
        self.unread = len(data) == READ_SIZE
        if self.state is HEAD:
            if not self.inbuf:                  # a request's first bytes: its latency starts
                self.started = server.now
            if self.idle:                       # a new request begins: its head has a deadline
                self.idle = False
                self.deadline = server.now + server.limits.header_timeout
            if server.inflight > server.limits.max_inflight_bytes:
                self.inbuf = b""
                self.refuse_busy()
                return True
        else:
            self.deadline = server.now + server.limits.body_timeout
        self.inbuf = self.inbuf + data if self.inbuf else data
        return True

    def advance(self):
        """Serve the next request if the buffer holds all of it; False if more must come."""
        if self.state is LINGER:
            return True                         # refused: nothing more to serve
        try:
            if self.state is HEAD:
                if not self.inbuf or not self.read_head():
                    return False
            if self.state is BODY:
                if self.body_got < len(self.body):
                    return False
                self.body = bytes(self.body)
            elif self.state is CHUNKED:
                done = self.decode_chunks()
                if not done:
                    if (len(self.body) > READ_SIZE and self.server.inflight
                            > self.server.limits.max_inflight_bytes):
                        self.refuse_busy()
                        return True
                    if done is None:                # its share spent: the others first
                        self.yielded = True
                    return False
                self.body = bytes(self.body)
            self.state = HEAD
            self.handed_off = False
            self.route()
        except RequestError as e:
            self.state = HEAD
            self.reply(e.status, (e.message + "\n").encode(), close=e.close, headers=e.headers)
            if e.close:
                self.state = LINGER             # the client may still be sending
        self.body = None
        if not self.handed_off:                 # the next request's head starts now
            self.started = self.server.now
            self.deadline = self.server.now + self.server.limits.header_timeout
        return True

    def refuse_busy(self):
        """503: the requests in flight already hold all the memory they may."""
        self.state, self.command = HEAD, None
        self.reply(503, b"server busy\n", close=True, headers=(("Retry-After", "1"),))
        self.state = LINGER

    # -- reading a request ----------------------------------------------------

    def read_head(self):
        """Parse the head if its blank line is in the buffer; then frame the body.

        Returns False if more must come.  Raises RequestError.
        """
        buf = self.inbuf
        if buf[:1] in (b"\r", b"\n"):           # RFC 9112 2.2: ignore stray CRLFs first
            buf = self.inbuf = buf.lstrip(b"\r\n")
        limit = self.server.limits.max_header_bytes
        end = HEAD_END.search(buf, 0, limit + 4)
        if end is None:
            if len(buf) <= limit:
                return False
            self.close_connection = True
            if b"\n" not in buf[:limit]:
                raise RequestError(414, "request line too long", close=True)
            raise RequestError(431, "header block too large", close=True)
        self.parse_request(buf[:end.start()])
        self.inbuf = buf[end.end():]
        self.head_received()
        self.frame_body()
        return True

    def parse_request(self, head):
        """Parse the request line and headers into command, path, headers.

        As strict as Go's net/http and nginx: anything a second parser on
        the way (a proxy) could read differently is a 400 that closes the
        connection.  self.headers is a dict of lower-cased names; repeated
        headers are joined with ", " (RFC 9110 5.3).  Raises RequestError.
        """
        self.close_connection = True            # until the head says otherwise
        self.command = None
        text = head.decode("latin-1")
        bad = BAD_HEAD_BYTE.search(head)
        lines = text.replace("\r\n", "\n").split("\n")
        self.requestline = lines[0]
        line = REQUEST_LINE.fullmatch(lines[0])
        if not line or (bad and bad.start() < len(lines[0])):
            raise RequestError(400, "bad request line", close=True)
        self.command, self.path, self.request_version, major, minor = line.groups()
        if major != "1":
            raise RequestError(505, "http version not supported", close=True)
        if bad:
            raise RequestError(400, "bad header line", close=True)
        if len(lines) > MAX_HEADERS + 1:
            raise RequestError(431, "too many headers", close=True)
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not HEADER_NAME.fullmatch(name):
                raise RequestError(400, "bad header line", close=True)
            name = name.lower()
            value = value.strip(" \t")
            if name in headers:
                if name == "host":
                    raise RequestError(400, "repeated host header", close=True)
                if name == "content-length":
                    if value != headers[name]:
                        raise RequestError(400, "ambiguous message length", close=True)
                    continue
                headers[name] += ", " + value
            else:
                headers[name] = value
        self.headers = headers
        self.http_1_0 = minor == "0"
        if not self.http_1_0 and "host" not in headers:
            raise RequestError(400, "missing host header", close=True)
        tokens = headers.get("connection", "").lower()
        if self.http_1_0:
            self.close_connection = "keep-alive" not in tokens
        else:
            self.close_connection = "close" in tokens
        return True

    def frame_body(self):
        """Find how the body is framed; take it whole from the buffer, or set the state to receive it.

        A body over --max-value-bytes is refused from its Content-Length,
        before a byte of it is read; a request that is ambiguous about its
        length is refused, because that ambiguity is how requests get
        smuggled past a proxy.  Both close the connection: we cannot know
        where the next request would start.
        """
        length = self.headers.get("content-length")
        encoding = self.headers.get("transfer-encoding")
        self.has_length = length is not None or encoding is not None
        limits = self.server.limits
        if encoding is not None:
            if self.http_1_0:
                raise RequestError(400, "transfer-encoding on http/1.0", close=True)
            if length is not None:
                raise RequestError(400, "ambiguous message length", close=True)
            if encoding.lower() != "chunked":
                raise RequestError(501, "transfer-encoding not supported", close=True)
            self.body, self.chunk_left = bytearray(), _CHUNK_SIZE
            self.trailer_bytes = self.chunk_framing = 0
            self.state = CHUNKED
            if not self.inbuf:
                self.send_continue()
            self.deadline = self.server.now + limits.body_timeout
            return
        if length is None:
            self.body = b""
            return
        if not (length.isascii() and length.isdigit()):
            raise RequestError(400, "bad content-length", close=True)
        length = int(length)
        if length > limits.max_value_bytes:
            raise RequestError(413, "value too large", close=True)
        buf = self.inbuf
        if len(buf) >= length:
            self.body, self.inbuf = buf[:length], buf[length:]
            return
        if length > READ_SIZE and self.server.inflight + length > limits.max_inflight_bytes:
            raise RequestError(503, "server busy", close=True, headers=(("Retry-After", "1"),))
        self.body = bytearray(length)
        self.body[:len(buf)] = buf
        self.body_got, self.inbuf = len(buf), b""
        self.state = BODY
        if not buf:
            self.send_continue()
        self.deadline = self.server.now + limits.body_timeout

    def decode_chunks(self):
        """Decode the chunks in the buffer onto self.body.

        Returns True once the body is complete, False if more must come,
        None if this turn's share is spent with more in the buffer.

        Chunk data is copied onto the body in bulk, with no Python object
        per chunk; but each chunk's size line costs a few steps of Python
        (about a microsecond), which no bulk copy saves.  So two bounds: a
        turn decodes at most CHUNKS_PER_TURN chunks, and the others get
        their turns in between; and the framing (size lines and CRLFs) may
        not outweigh the data it frames by more than FRAMING_ALLOWANCE, a
        400 otherwise.  Chunks of 5 bytes or more always pass; ten million
        1-byte chunks (10 MB of data, 50 MB of framing) would have cost 12 s
        of CPU, and are refused after the first 16,000 or so.  Raises
        RequestError.
        """
        buf = self.inbuf
        view = memoryview(buf)
        pos, end = 0, len(buf)
        body, left = self.body, self.chunk_left
        chunks = 0
        try:
            while pos < end:
                if left > 0:                            # chunk data
                    take = min(left, end - pos)
                    body += view[pos:pos + take]
                    pos += take
                    left -= take
                    if not left:
                        left = _CHUNK_END
                elif left == _CHUNK_END:                # the CRLF after the data
                    if buf.startswith(b"\r\n", pos):
                        pos += 2
                    elif buf.startswith(b"\n", pos):
                        pos += 1
                    elif buf[pos:end] == b"\r":
                        break
                    else:
                        raise RequestError(400, "bad chunked body", close=True)
                    left = _CHUNK_SIZE
                else:                                   # a size line, or a trailer line
                    newline = buf.find(b"\n", pos)
                    if newline < 0:
                        if end - pos > MAX_CHUNK_LINE:
                            raise RequestError(400, "bad chunked body", close=True)
                        break
                    if left == _CHUNK_SIZE:
                        if chunks == CHUNKS_PER_TURN:
                            self.inbuf, self.chunk_left = buf[pos:], left
                            return None
                        chunks += 1
                        size = CHUNK_LINE.fullmatch(buf, pos, newline)
                        if not size:
                            raise RequestError(400, "bad chunked body", close=True)
                        left = int(size.group(1), 16)
                        if len(body) + left > self.server.limits.max_value_bytes:
                            raise RequestError(413, "value too large", close=True)
                        self.chunk_framing += newline + 3 - pos      # with the CRLF after
                        if self.chunk_framing > len(body) + left + FRAMING_ALLOWANCE:
                            raise RequestError(400, "chunked framing outweighs its data",
                                               close=True)
                        if not left:
                            left = _TRAILER
                    else:                               # trailer fields: skipped
                        self.trailer_bytes += newline + 1 - pos
                        if self.trailer_bytes > self.server.limits.max_header_bytes:
                            raise RequestError(400, "bad chunked body", close=True)
                        if newline == pos or (newline == pos + 1 and buf[pos] == 13):
                            self.inbuf = buf[newline + 1:]
                            return True
                    pos = newline + 1
        finally:
            view.release()
        self.inbuf = buf[pos:] if pos else buf
        self.chunk_left = left
        return False

    def send_continue(self):
        """Honour Expect: 100-continue: the client waits for this before sending the body."""
        if not self.http_1_0 and self.headers.get("expect", "").lower() == "100-continue":
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- routing and the API --------------------------------------------------

    def head_received(self):
        """The head is parsed, the body not yet received: checks that need no body go here."""
        path = self.path
        if not path.startswith("/"):              # absolute form: http://host/path
            scheme, _, rest = path.partition("://")
            path = "/" + rest.partition("/")[2] if scheme.lower() in ("http", "https") else ""
        self.route_path, _, self.route_query = path.partition("?")
        check_auth(self, self.route_path)

    def route(self):
        """Serve a request that has arrived whole (self.body), from the worker thread."""
        path = self.route_path
        if path.startswith("/kv/"):
            self.check_method("/kv/", ("GET", "HEAD", "PUT", "DELETE"))
            self.do_kv(parse_key(path[4:]), self.body)
        elif path == "/kv":
            self.check_method("/kv", ("GET", "HEAD"))
            self.do_list(self.route_query)
        elif path == "/clear":
            self.check_method("/clear", ("DELETE",))
            self.write(self.server.store.clear)
        elif path == "/health":
            self.check_method("/health", ("GET", "HEAD"))
            problem = self.server.store.write_problem()
            if problem:
                raise RequestError(503, problem)
            self.reply(200, b"ok\n")
        elif path == "/metrics":
            self.check_method("/metrics", ("GET", "HEAD"))
            self.reply(200, self.server.metrics.render(self.server), content_type=METRICS_TYPE)
        elif path == "/snapshot":
            self.check_method("/snapshot", ("GET",))
            SnapshotStream.start(self)
        else:
            raise RequestError(404, "not found")

    def check_method(self, path, methods):
        if self.command not in methods:
            raise RequestError(405, "method not allowed", headers=(("Allow", ALLOWED[path]),))

    def do_kv(self, key, body):
        store = self.server.store
        if self.command in ("GET", "HEAD"):
            value, tag = store.get_tagged(key)
            if value is None:
                raise RequestError(404, "key not found")
            self.reply(read_status(self.headers, tag), value, headers=(("ETag", '"%s"' % tag),))
        elif self.command == "PUT":
            if not self.has_length:
                raise RequestError(411, "length required")
            if not body:
                raise RequestError(400, "value cannot be empty")
            tag = value_tag(body)
            self.write(store.put, key, body, tag=tag, condition=write_condition(self.headers),
                       etag=b'"%s"' % tag.encode())
        else:
            self.write(store.delete, key, condition=write_condition(self.headers))

    def do_list(self, query):
        """GET /kv?prefix=P&limit=N&after=K: a page of keys, one per line; Link: the next page."""
        prefix, after, limit = listing_query(query)
        try:
            keys, more = self.server.store.keys_page(prefix, after, limit)
        except KeyIndexBuilding:
            raise RequestError(503, "key index being built, retry", headers=(("Retry-After", "1"),))
        keys, cut = within_page_bytes(keys)
        headers = ()
        if more or cut:
            headers = (("Link", '</kv?prefix=%s&limit=%d&after=%s>; rel="next"'
                        % (quote(prefix), limit, quote(keys[-1]))),)
        body = ("\n".join(keys) + "\n").encode() if keys else b""
        self.reply(200, body, headers=headers)

    def write(self, mutation, *args, etag=None, **options):
        """Run a store mutation; its 200 is sent once it is durable.

        The worker does not wait for the disk: the connection is OWED to the
        journal; once the journal's writer has made the write durable (or
        failed to), the worker, which drives the journal, builds the reply
        or the error in send_when_durable and sends it (KVServer.hand_reply);
        until then no later request of the connection is read, so replies go
        out in request order.
        Sealed gets a 503, a failed condition (`options`: see Store.put) a
        412, and a journal that had already failed an error, all from here
        at once.  `etag` (bytes): the 200's ETag header.
        """
        connection = self.connection_header()
        ok = _this_second.write_ok(connection, etag)
        requestline, command, started = self.requestline, self.command, self.started
        metrics = self.server.metrics

        def send_when_durable(error):          # the journal's driver: the worker
            reply, status = ok, 200
            if error:
                status, message = storage_error(error)
                reply = build_reply(status, message.encode() + b"\n", connection)
            self.server.hand_reply(self, reply)
            metrics.request_done(command, status, started)
            self.log_message('"%s" %s %s', requestline, status, 0)

        try:
            self.hand_over(mutation, *args, on_durable=send_when_durable, **options)
        except Sealed:
            raise RequestError(503, "shutting down", close=True)
        except ConditionFailed:
            raise RequestError(412, "precondition failed")
        except OSError as e:
            raise RequestError(*storage_error(e))

    def hand_over(self, start, *args, **kwargs):
        """Make the connection OWED to another thread: call start(*args, **kwargs), then watch it.

        The body's memory is given back first.  While OWED, the worker reads
        no later request of the connection, so replies go out in request
        order; the thread that owes the reply gives the connection back with
        it (KVServer.hand_reply).  The socket is armed for the next request
        at once (with epoll it stays registered): an event that comes
        meanwhile is kept for when the reply is sent (`missed`).  If start()
        raises, the connection is the worker's again, and the exception goes
        on.
        """
        self.body = None
        self.account()
        self.state, self.handed_off, self.missed = OWED, True, False
        try:
            start(*args, **kwargs)
        except BaseException:
            self.state, self.handed_off = HEAD, False
            raise
        try:
            self.server.poller.arm(self.request.fileno(), IN)
        except OSError:
            self.missed = True          # a turn after the reply, to try again

    def send_owed(self, reply):
        """From another thread, for a connection handed over (OWED): send `reply`, then give it back.

        The worker sends it (KVServer.hand_reply), then gives the connection
        a turn, which watches it for the next request.
        """
        self.missed = True
        self.server.hand_reply(self, reply)

    # -- replies --------------------------------------------------------------

    def connection_header(self, close=False):
        """The Connection header of this request's reply; decides whether the connection closes."""
        if close or self.server.draining:
            self.close_connection = True
        if self.close_connection:
            return b"Connection: close\r\n"
        if self.request_version == "HTTP/1.0":
            return b"Connection: keep-alive\r\n"
        return b""

    def reply(self, status, body=b"", close=False, headers=(), content_type=TEXT_PLAIN):
        """Send a whole reply; what the socket does not take now goes out in later turns.

        HEAD, and a 304, get the headers of GET and no body.  A large body that would
        take the requests in flight past --max-inflight-bytes gets a 503.
        """
        if self.command == "HEAD" or status == 304:
            send = b""
        else:
            send = body
            if (len(body) > READ_SIZE and self.server.inflight + len(body)
                    > self.server.limits.max_inflight_bytes):
                status, body = 503, b"server busy\n"
                send, close, headers = body, True, (("Retry-After", "1"),)
        head = build_head(status, len(body), self.connection_header(close), headers,
                          content_type)
        if len(send) <= READ_SIZE:
            self.send(head + send)
        else:
            self.send(head, send)               # a large value is not copied
        self.server.metrics.request_done(self.command, status, self.started)
        if self.server.access_log:
            self.log_request(status, len(body))

    def send(self, *parts):
        """Send what the socket takes now, without waiting; keep the rest in self.out."""
        if not self.out:
            try:
                sent = self.request.sendmsg(parts) if len(parts) > 1 else self.request.send(parts[0])
            except BlockingIOError:
                sent = 0
            except OSError:                         # the client is gone
                self.close_connection = True
                return
            for part in parts:
                if sent >= len(part):
                    sent -= len(part)
                    continue
                self.out.append(memoryview(part)[sent:])
                self.out_bytes += len(part) - sent
                sent = 0
        else:
            for part in parts:
                self.out.append(memoryview(part))
                self.out_bytes += len(part)
        if self.out:
            self.deadline = self.server.now + self.server.limits.send_timeout

    def flush(self):
        """Send more of self.out; True once it is all sent."""
        out = self.out
        try:
            while out:
                sent = self.request.sendmsg(out[:64])
                self.deadline = self.server.now + self.server.limits.send_timeout
                self.out_bytes -= sent
                while out and sent >= len(out[0]):
                    sent -= len(out.pop(0))
                if sent:
                    out[0] = out[0][sent:]
                    break                           # the socket took less than offered
        except BlockingIOError:
            pass
        except OSError:                             # the client is gone
            out.clear()
            self.out_bytes = 0
            self.state = CLOSING
            return True
        return not out

    # -- the end of a connection ----------------------------------------------

    def linger(self):
        """Read and drop what the client still sends after an error, so that it reads the error.

        Closing a socket with unread input makes the kernel send a reset,
        which can destroy the reply before the client reads it.
        """
        if not self.lingering:
            self.lingering = True
            self.inbuf = b""
            self.deadline = self.server.now + LINGER_SECONDS
            try:
                self.request.shutdown(socket.SHUT_WR)
            except OSError:
                return self.close()
        for _ in range(16):
            try:
                if not self.request.recv(READ_SIZE):
                    return self.close()
            except BlockingIOError:
                self.unread = False
                return self.wait(IN)
            except OSError:
                return self.close()
        self.server.ready.append(self)

    def expire(self):
        """The deadline passed (the sweep calls it): 408 where a reply can still be made, and close."""
        if self.state in (BODY, CHUNKED) or (self.state is HEAD and self.inbuf) or self.out:
            self.server.requests_timed_out += 1     # not an idle connection
        if self.state in (BODY, CHUNKED) or (self.state is HEAD and self.inbuf and not self.out):
            self.out.clear()
            self.close_connection = True
            self.command = None
            try:
                self.request.send(build_reply(408, b"request timeout\n", b"Connection: close\r\n"))
            except OSError:
                pass
        self.close()

    def close(self):
        """Forget the connection and close its socket."""
        if self.state is CLOSED:
            return
        self.state = CLOSED
        self.inbuf, self.body, self.out, self.out_bytes = b"", None, [], 0
        self.account()
        self.server.forget(self)                    # before the fd can be reused
        self.request.close()

    def account(self):
        """Update the server's count of the bytes that requests in flight hold."""
        body = self.body
        held = len(self.inbuf) + self.out_bytes + (len(body) if body is not None else 0)
        if held != self.held:
            self.server.inflight += held - self.held
            self.held = held

    def send_error(self, code, message=None, explain=None):
        """The base class's error path (not normally reached): text/plain, and close."""
        self.reply(code, ("%s\n" % (message or self.responses[code][0])).encode(), close=True)

    def log_message(self, format, *args):
        # The request line names the key, never the value.
        if self.server.access_log:
            log("%s - %s" % (self.address_string(), format % args))


_CHUNK_SIZE, _CHUNK_END, _TRAILER = -1, -2, -3     # KVHandler.chunk_left: what comes next


# ----------------------------------------------------- conditional requests --
#
# RFC 9110, section 13.  A value's ETag is its tag (store.value_tag) in
# quotes: a strong validator, since the tag changes whenever a byte does.
# If-Match compares strongly (a weak W/ tag never matches), If-None-Match
# weakly; "*" matches any value.  A header that is not a list of quoted tags
# or "*" is a 400: better told than a condition silently misread.

ENTITY_TAG = re.compile(r'[ \t]*(?:(W/)?"([\x21\x23-\x7e\x80-\xff]*)"|(\*))[ \t]*(?:,|\Z)')
ANY = "*"


def entity_tags(headers, name, weak_ok):
    """The tags an If-Match / If-None-Match header lists: None (no header), ANY, or a set.

    Weak tags are dropped unless `weak_ok`: they never match strongly.
    """
    value = headers.get(name.lower())
    if value is None:
        return None
    tags, pos = set(), 0
    while pos < len(value):
        element = ENTITY_TAG.match(value, pos)
        if element is None:
            raise RequestError(400, "bad %s header" % name)
        weak, opaque, star = element.groups()
        if star:
            if value.strip(" \t") != "*":
                raise RequestError(400, "bad %s header" % name)
            return ANY
        if weak_ok or not weak:
            tags.add(opaque)
        pos = element.end()
    return tags


def _matches(tag, tags):
    return tags is ANY or tag in tags


def read_status(headers, tag):
    """The status of a GET or HEAD of a present value with this tag: 200, 304 or 412."""
    if "if-none-match" not in headers and "if-match" not in headers:
        return 200
    if_match = entity_tags(headers, "If-Match", weak_ok=False)
    if if_match is not None and not _matches(tag, if_match):
        raise RequestError(412, "precondition failed")
    if_none_match = entity_tags(headers, "If-None-Match", weak_ok=True)
    if if_none_match is not None and _matches(tag, if_none_match):
        return 304
    return 200


def write_condition(headers):
    """The condition (see Store.put) of a PUT or DELETE with these headers, or None.

    It gets the tag of the key's latest value, None when the key is absent:
    If-Match holds if that tag is listed ("*": if there is a value),
    If-None-Match if it is not ("*": if there is none).
    """
    if "if-match" not in headers and "if-none-match" not in headers:
        return None
    if_match = entity_tags(headers, "If-Match", weak_ok=False)
    if_none_match = entity_tags(headers, "If-None-Match", weak_ok=True)

    def holds(tag):
        if if_match is not None and (tag is None or not _matches(tag, if_match)):
            return False
        return if_none_match is None or tag is None or not _matches(tag, if_none_match)
    return holds


# ------------------------------------------------------------------ listing --
#
# GET /kv?prefix=P&limit=N&after=K.  The store keeps the keys sorted once a
# listing has asked for them (store.SortedKeys), so a page costs a bisect
# and a slice, not a scan of the store.  A bad parameter is a 400: a limit
# over LIST_LIMIT_MAX too, since a client that asked for more than it gets
# would have to notice it from the Link header.

LIST_LIMIT = 1000               # keys per page when the request names no limit
LIST_LIMIT_MAX = 10000          # the largest limit accepted
LIST_PAGE_BYTES = 1 << 20       # a page stops past this many bytes (long keys); Link has the rest
LIST_PARAMETERS = ("prefix", "after", "limit")


def listing_query(query):
    """(prefix, after, limit) of a listing's query string, or RequestError(400)."""
    try:
        # (Python 3.10's strict parsing refuses an empty query string.)
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True,
                                       errors="strict", max_num_fields=len(LIST_PARAMETERS)
                                       ) if query else []
    except ValueError:
        raise RequestError(400, "bad query string")
    params = {}
    for name, value in pairs:
        if name not in LIST_PARAMETERS:
            raise RequestError(400, "unknown parameter (prefix, limit and after are known)")
        if name in params:
            raise RequestError(400, "parameter %s given twice" % name)
        params[name] = value
    for name in ("prefix", "after"):
        if params.get(name) and not KEY.fullmatch(params[name]):
            raise RequestError(400, "%s contains invalid characters" % name)
    limit = params.get("limit", str(LIST_LIMIT))
    if not (limit.isascii() and limit.isdigit() and len(limit) <= 6
            and 1 <= int(limit) <= LIST_LIMIT_MAX):
        raise RequestError(400, "limit must be a number from 1 to %d" % LIST_LIMIT_MAX)
    return params.get("prefix", ""), params.get("after", ""), int(limit)


def within_page_bytes(keys):
    """(keys, cut): the first keys whose lines fit in LIST_PAGE_BYTES (at least one)."""
    if sum(map(len, keys)) + len(keys) <= LIST_PAGE_BYTES:
        return keys, False
    total = 0
    for n, key in enumerate(keys):
        total += len(key) + 1
        if total > LIST_PAGE_BYTES and n:
            return keys[:n], True
    return keys, False


def quote(text):
    """Percent-encode a query value for the Link header (RFC 3986: unreserved characters stay)."""
    return urllib.parse.quote(text, safe="")


# -------------------------------------------------------------------- server --

IN = getattr(select, "EPOLLIN", 1)
OUT = getattr(select, "EPOLLOUT", 4)


class Poller:
    """The kernel's watch over connections: poll() reports the sockets that are ready.

    On Linux an epoll set in which each new socket is registered once, by
    the accepting thread (register, thread_safe), for input and for room
    to send, edge-triggered (EPOLLET): it is reported each time more input
    arrives or room appears, and arm() is free.  Re-arming a one-shot
    registration after every turn was one epoll_ctl per request (GET at 64
    connections +8% without it).  So a turn must read until the socket has
    nothing more, or come back for the rest (KVHandler.unread).  Elsewhere
    a selectors.DefaultSelector, armed for one event at a time by the
    worker thread, the only one that may touch it.
    """

    def __init__(self, use_epoll=hasattr(select, "epoll")):
        self.thread_safe = use_epoll
        self._epoll = select.epoll() if use_epoll else None
        self._selector = None if use_epoll else selectors.DefaultSelector()
        self._persistent = set()

    def watch(self, fd, events=IN):
        """Report `fd` whenever it is ready, not once (the wake-up pipe, the journal's channel).

        Called again for the same fd, it changes the events watched.
        """
        mask = (selectors.EVENT_READ if events & IN else 0) | (
            selectors.EVENT_WRITE if events & OUT else 0)
        if self._epoll:
            if fd in self._persistent:
                self._epoll.modify(fd, events)
            else:
                self._epoll.register(fd, events)
        elif fd in self._persistent:
            self._selector.modify(fd, mask)
        else:
            self._selector.register(fd, mask)
        self._persistent.add(fd)

    def register(self, fd):
        """Epoll only, from any thread: watch a new socket, for good."""
        self._epoll.register(fd, IN | OUT | select.EPOLLET)

    def arm(self, fd, events):
        """Report `fd` once it is ready for `events` (IN or OUT); nothing to do on epoll."""
        if self._epoll:
            return
        else:
            mask = selectors.EVENT_READ if events == IN else selectors.EVENT_WRITE
            try:
                self._selector.modify(fd, mask)
            except KeyError:
                self._selector.register(fd, mask)

    def poll(self, timeout):
        """The fds that are ready, waiting up to `timeout` seconds for one."""
        if self._epoll:
            return [fd for fd, _ in self._epoll.poll(timeout)]
        ready = [key.fd for key, _ in self._selector.select(timeout)]
        for fd in ready:
            if fd not in self._persistent:
                self._selector.unregister(fd)           # once, as EPOLLONESHOT
        return ready

    def forget(self, fd, persistent=False):
        """Before the fd closes (a selector would keep it registered; epoll drops it itself)."""
        if persistent:
            self._persistent.discard(fd)
            if self._epoll:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass                                # closed already
        if self._selector:
            try:
                self._selector.unregister(fd)
            except KeyError:
                pass


class KVServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer whose one worker thread serves every connection in turns.

    The main thread accepts (serve_forever); each connection is handed to
    the worker thread, which runs an event loop (_serve_connections): it
    asks the kernel which sockets are ready, gives each a turn
    (KVHandler.turn), and once a second sweeps the connections for passed
    deadlines.  It drives the journal too: before it waits it sends the
    writes its turns queued, and when the journal's writer replies it
    sends their replies (_serve_connections).  Those threads, the stopper
    and the storage watch (serve), the store's checkpointer, and at most
    one snapshot stream and one key-index build, are all the threads there
    are, whatever the clients do: running out of threads cannot happen.

    ThreadingMixIn gives each connection a thread of its own, which sleeps
    in recv() until the next request: every request then costs a thread
    switch, a burst of 10,000 connects means 10,000 threads, and each
    stalled client holds one for as long as it likes.  One worker suffices
    because one thread runs Python at a time anyway; it serves turns in
    the order sockets became ready, and a connection that still has work
    after its turn's budget (REQUESTS_PER_TURN, or one READ_SIZE read) goes
    to the back of the queue (self.ready): a client that pipelines without
    pause, or streams tiny chunks, shares the worker with the others.
    """

    request_queue_size = 4096   # listen backlog (the stdlib's 5 drops a burst
                                # of connects; the kernel caps it at somaxconn)
    SWEEP_INTERVAL = 1.0        # seconds between two looks for passed deadlines

    def __init__(self, address, store, max_value_bytes, access_log, auth_token=None,
                 limits=None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store = store
        self.auth_token = auth_token            # bytes, or None: no auth (check_auth)
        self.limits = limits or Limits()
        self.limits.max_value_bytes = self.max_value_bytes = max_value_bytes
        self.metrics = Metrics()
        self.snapshot_streams = threading.BoundedSemaphore(SNAPSHOT_STREAMS)
        self.access_log = access_log
        self.draining = False
        self.now = time.monotonic()             # the worker's clock, read once per round
        self.inflight = 0                       # bytes held by requests in flight (worker only)
        self.ready = collections.deque()        # handlers with work left: a turn each, in order
        self._connections = {}                  # fd -> handler, until it closes
        self._resumed = collections.deque()     # handlers given back by other threads
        self._replies = collections.deque()     # (handler, its reply) for the worker to send
        self._worker_asleep = False             # the worker waits in poll(): wake it
        self.journal = store.journal            # the worker drives its rounds, if it may
        if self.journal.driven:
            self.journal.wake_driver = self.wake_if_asleep
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)      # a connection ended
        self.connections_refused = 0            # past --max-connections (for /metrics)
        self.requests_timed_out = 0             # cut off at a deadline (for /metrics)
        self._accept_delay = 0                  # the back-off while out of file descriptors
        self._logged = {}                       # message kind -> when last logged
        self.poller = Poller()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self.poller.watch(self._wake_read)
        super().__init__(address, KVHandler)
        threading.Thread(target=self._serve_connections, name="worker", daemon=True).start()

    def server_bind(self):
        # HTTPServer.server_bind() looks up our fully qualified host name,
        # which can hang for seconds on a machine without DNS; nothing here
        # uses it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    # -- accepting (the main thread) ------------------------------------------

    def server_activate(self):
        super().server_activate()
        # Non-blocking, so that _accept_queued() can accept until the
        # kernel's queue is empty.
        self.socket.setblocking(False)

    def service_actions(self):
        # Called by serve_forever() after each accept and every poll_interval.
        self._accept_queued()

    def _handle_request_noblock(self):
        # serve_forever() calls it when the listening socket is readable;
        # service_actions(), which runs right after, accepts them all.
        pass

    def _accept_queued(self):
        """Accept every connection already waiting; back off while out of file descriptors.

        Out of descriptors (EMFILE, ENFILE), the connection stays in the
        kernel's queue and the listening socket stays readable: accepting
        again at once would spin.  So wait, 5 ms doubling up to 1 s, as Go's
        net/http does, and log it at most once a second.
        """
        for _ in range(self.request_queue_size):
            try:
                request, client_address = self.socket.accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    break                       # ECONNABORTED and the like: that one is gone
                self._accept_delay = min(max(self._accept_delay * 2, 0.005), 1.0)
                self.log_at_most_once_a_second(
                    "accept", "Cannot accept connections: %s; retrying in %d ms"
                    % (e.strerror, self._accept_delay * 1000))
                time.sleep(self._accept_delay)
                return
            self._accept_delay = 0
            self.process_request(request, client_address)

    def process_request(self, request, client_address):
        if len(self._connections) >= self.limits.max_connections:
            self.connections_refused += 1
            self.log_at_most_once_a_second(
                "connections", "Refusing connections: %d open (--max-connections)"
                % len(self._connections))
            try:
                request.send(build_reply(503, b"too many connections\n",
                                         b"Connection: close\r\n", (("Retry-After", "1"),)),
                             socket.MSG_DONTWAIT)
            except OSError:
                pass
            request.close()
            return
        try:
            request.setblocking(False)
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            handler = KVHandler(request, client_address, self)
            handler.deadline = time.monotonic() + self.limits.header_timeout
            self._connections[request.fileno()] = handler
            self.watch_new(handler)
        except Exception:
            self.handle_error(request, client_address)
            self._connections.pop(request.fileno(), None)
            request.close()

    def log_at_most_once_a_second(self, kind, message):
        now = time.monotonic()
        if now - self._logged.get(kind, -2.0) >= 1.0:
            self._logged[kind] = now
            log(message)

    # -- the worker thread ----------------------------------------------------

    def watch_new(self, handler):
        """Hand a new connection to the worker (from the accepting thread).

        On Linux its socket is registered in the worker's epoll set, which
        any thread may do, and the worker need not be woken.  After it is in
        self._connections: an edge reported before would be lost.
        """
        if self.poller.thread_safe:
            self.poller.register(handler.request.fileno())
        else:
            self.resume(handler)

    def hand_reply(self, handler, reply):
        """The worker is to send this reply (from the snapshot stream's thread, or the worker).

        The journal's rounds end on the worker, whose callbacks hand the
        replies to writes over here without a system call; another thread
        wakes the worker, if it sleeps.
        """
        self._replies.append((handler, reply))
        self.wake_if_asleep()

    def send_replies(self):
        """Send the replies handed over (hand_reply), from the worker thread."""
        replies, ready = self._replies, self.ready
        idle_deadline = self.now + self.limits.idle_timeout
        while replies:
            handler, reply = replies.popleft()
            handler.state, handler.deadline, handler.idle = HEAD, idle_deadline, True
            handler.send(reply)
            # The socket was armed when the write was handed over; a turn
            # only if there is more to do, or input left unread.
            if (handler.missed or handler.unread or handler.out or handler.inbuf
                    or handler.close_connection or self.draining):
                ready.append(handler)

    def resume(self, handler):
        """Give a connection to the worker, from another thread: its next turn comes soon."""
        self._resumed.append(handler)
        self.wake()

    def wake_if_asleep(self):
        """Bring the worker round its loop, if it waits in poll(); else it will look anyway."""
        if self._worker_asleep:
            self._worker_asleep = False
            self.wake()

    def wake(self):
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass                                # full: the worker will wake anyway

    def _serve_connections(self):
        """The worker's loop: a turn for each connection that is ready, in order.

        It also drives the journal (persistence.Journal): before it waits,
        it sends the writes queued by the turns as one round (pump), and
        when the journal's writer replies, it ends the round: the writes are
        applied, and their replies sent.
        """
        connections, ready, poller = self._connections, self.ready, self.poller
        journal, replies, resumed = self.journal, self._replies, self._resumed
        driven = journal.driven
        journal_fd, journal_events = (journal.fileno() if driven else None), IN
        if driven:
            poller.watch(journal_fd)
        next_sweep = time.monotonic() + self.SWEEP_INTERVAL
        while True:
            if replies:
                self.send_replies()
            if driven:
                journal.pump()
                if journal_fd is not None and journal.sending() != (journal_events != IN):
                    journal_events = IN | OUT if journal.sending() else IN
                    poller.watch(journal_fd, journal_events)
            timeout = 0 if ready else max(0.0, next_sweep - self.now)
            if timeout:
                self._worker_asleep = True
                if replies or resumed or (driven and journal.has_work()):   # handed over just now
                    timeout = 0
            fds = poller.poll(timeout)
            self._worker_asleep = False
            self.now = now = time.monotonic()
            for fd in fds:
                handler = connections.get(fd)
                if handler is not None:
                    handler.turn(True)
                elif fd == self._wake_read:
                    self._take_resumed()
                elif fd == journal_fd:
                    if not journal.on_readable():       # its writer has gone
                        poller.forget(journal_fd, persistent=True)
                        journal_fd = None
                    if replies:
                        self.send_replies()
            for _ in range(len(ready)):
                ready.popleft().turn(False)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + self.SWEEP_INTERVAL

    def _take_resumed(self):
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        self.send_replies()
        resumed = self._resumed
        while resumed:
            self.ready.append(resumed.popleft())
        if self.draining:           # close every connection with no request in flight
            for handler in list(self._connections.values()):
                if handler.state is LINGER or (handler.state is HEAD and not handler.out and not (
                        handler.inbuf and HEAD_END.search(handler.inbuf))):
                    handler.close()

    def _sweep(self, now):
        """Close the connections whose deadline has passed (KVHandler.expire)."""
        for handler in list(self._connections.values()):
            if handler.deadline <= now and handler.state is not OWED:
                handler.expire()

    def forget(self, handler):
        fd = handler.request.fileno()
        self.poller.forget(fd)
        if self._connections.get(fd) is handler:
            del self._connections[fd]
        if self.draining:
            with self._lock:
                self._changed.notify_all()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            return                        # the client went away: nothing to report
        log("Unexpected error serving %s: %r" % (client_address[0], error))

    def drain(self, timeout):
        """Close idle connections now; wait up to `timeout` s for the others.

        Guarantees: when it returns, no connection is between requests, and
        each request that was in flight has finished, unless the deadline
        passed first; returns how many connections were still open then.
        It does not stop a request that is still running: Store.seal() is
        what keeps such a late request from changing the saved state.
        """
        deadline = time.monotonic() + timeout
        self.draining = True
        self.wake()                     # the worker closes the idle ones
        with self._lock:
            while self._connections:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.1))
            return len(self._connections)


# --------------------------------------------------------------------- auth --
#
# With --auth-token-file, every request but GET and HEAD of /health must
# carry "Authorization: Bearer <token>"; the others get 401 and a
# WWW-Authenticate header (RFC 6750).  head_received() calls check_auth() as
# soon as the headers are parsed, before the body is read: a client without the
# token cannot make the server read a 10 MiB upload.  Nothing logs request
# headers, so the token never reaches a log.

AUTH_TOKEN_ENV = "KV_AUTH_TOKEN_FILE"
MAX_TOKEN_BYTES = 4096          # a longer file is a mistake (or /dev/zero)
OPEN_TO_ALL = {"/health": ("GET", "HEAD")}      # probes need no token
UNAUTHORIZED_HEADERS = (("WWW-Authenticate", 'Bearer realm="kvstore"'),)


def read_auth_token(path):
    """The token in the file at `path`: its content without surrounding whitespace, as bytes.

    An argparse type, so a file that cannot be used is bad usage (exit 2),
    reported in one line that names the file and never shows the token.
    """
    try:
        with open(path, "rb") as f:
            token = f.read(MAX_TOKEN_BYTES + 1).strip()
    except OSError as e:
        raise argparse.ArgumentTypeError("cannot read %s: %s" % (path, e.strerror or e))
    if not token:
        raise argparse.ArgumentTypeError("%s holds no token (it is empty)" % path)
    if len(token) > MAX_TOKEN_BYTES:
        raise argparse.ArgumentTypeError("%s is longer than %d bytes" % (path, MAX_TOKEN_BYTES))
    if not all(0x21 <= byte <= 0x7e for byte in token):
        raise argparse.ArgumentTypeError("%s: the token must be one word of printable ASCII"
                                         % path)
    return token


def check_auth(handler, path):
    """Raise a 401 unless the request may go on: no token is set, the path is open, or it has the token."""
    token = handler.server.auth_token
    if token is None or handler.command in OPEN_TO_ALL.get(path, ()):
        return
    scheme, _, credentials = handler.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long whatever the bytes: no timing tells how
    # much of a guess was right.
    if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip(" ").encode("latin-1"), token):
        return
    headers = handler.headers
    unread_body = "transfer-encoding" in headers or headers.get("content-length", "0") != "0"
    # A body we will not read leaves the stream unusable: close it.
    raise RequestError(401, "unauthorized", close=unread_body, headers=UNAUTHORIZED_HEADERS)


def warn_if_exposed(server):
    """One warning line when anyone beyond this machine can reach a server without a token."""
    host = server.server_address[0]
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if server.auth_token is None and not loopback:
        log("Warning: listening on %s without --auth-token-file: anyone who can reach "
            "this port can read, change and delete every key" % host)


# ------------------------------------------------------------------ metrics --
#
# GET /metrics: the Prometheus text format, version 0.0.4.  Requests are
# counted as their reply goes out (Metrics.request_done: a lookup, a bisect,
# two increments); everything else is read at scrape time from where it
# already lives: the Store, its Journal, the KVServer.

METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
METHOD_LABELS = ("GET", "HEAD", "PUT", "DELETE", "other")    # bounded: any other is "other"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 10.0)       # seconds; a reply waits for its fsync, a few ms on SSD


class Metrics:
    """The counters of requests served, and the rendering of /metrics.

    Latency is from the request's first bytes to the reply's hand-over to
    the kernel (for a write: after its fsync).
    """

    def __init__(self):
        self._lock = threading.Lock()   # guards adding to _rows, and reading it whole
        # (method label, status) -> [seconds in all, then a count per
        # latency bucket, the last one +Inf]: the request counters and the
        # histogram in one row, so that a request costs one lookup.
        self._rows = {}

    def request_done(self, method, status, started):
        """Count a request whose reply went out; `started` is its time.monotonic() on arrival.

        No lock, although the worker and the snapshot stream both count:
        since Python 3.10 a thread lets the GIL go only at a call or a
        backward jump, so `row[i] += 1` is never cut in two, and no
        increment is lost (on 3.9 some are).  A
        lost one could make a counter go backwards between two scrapes,
        which Prometheus would read as a restart.  The lock cost a third
        of this method.
        """
        seconds = time.monotonic() - started
        row = self._rows.get((method, status))
        if row is None:
            row = self._new_row(method, status)
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds) + 1    # le is inclusive
        row[0] += seconds
        row[bucket] += 1

    def _new_row(self, method, status):
        if method not in METHOD_LABELS:
            method = "other"            # rare, and bounded: each costs the lock once more
        with self._lock:
            return self._rows.setdefault((method, status),
                                         [0.0] + [0] * (len(LATENCY_BUCKETS) + 1))

    def render(self, server):
        """The text of /metrics, as bytes."""
        store = server.store
        journal = store.journal
        rows = {m: [0.0] + [0] * (len(LATENCY_BUCKETS) + 1) for m in METHOD_LABELS}
        requests = {}
        with self._lock:
            for (method, status), row in self._rows.items():
                row = row[:]            # one read of it (a copy is one step)
                requests[method, status] = sum(row[1:])
                rows[method] = [a + b for a, b in zip(rows[method], row)]
        out = []

        def metric(name, kind, text, samples):
            out.append("# HELP kvstore_%s %s\n# TYPE kvstore_%s %s\n" % (name, text, name, kind))
            for suffix, labels, value in samples:
                label_text = ",".join('%s="%s"' % pair for pair in labels)
                out.append("kvstore_%s%s%s %s\n" % (name, suffix,
                                                    "{%s}" % label_text if labels else "",
                                                    value))

        def one(name, kind, text, value):
            metric(name, kind, text, [("", (), value)])

        metric("requests_total", "counter", "Requests answered, by method and status code.",
               [("", (("method", m), ("code", c)), n) for (m, c), n in sorted(requests.items())])
        latency = []
        for method, (seconds, *counts) in rows.items():
            total = 0
            for le, count in zip(LATENCY_BUCKETS + ("+Inf",), counts):
                total += count
                latency.append(("_bucket", (("method", method), ("le", le)), total))
            latency.append(("_sum", (("method", method),), repr(seconds)))
            latency.append(("_count", (("method", method),), total))
        metric("request_duration_seconds", "histogram",
               "Time from a request's first bytes to its reply (a write's, after its fsync).",
               latency)
        one("connections", "gauge", "Client connections open now.", len(server._connections))
        one("connections_refused_total", "counter", "Connections refused at the cap "
            "(--max-connections).", server.connections_refused)
        one("requests_timed_out_total", "counter", "Requests cut off at a deadline (a client "
            "too slow to send or to read).", server.requests_timed_out)
        one("keys", "gauge", "Keys in the store.", len(store))
        one("value_bytes", "gauge", "Bytes of all values in the store.", store.value_bytes)
        one("storage_writable", "gauge", "1 if writes can be served, 0 if the storage refuses "
            "them (see /health).", 0 if store.write_problem() else 1)
        one("journal_bytes", "gauge", "Bytes in the current journal file (a checkpoint "
            "starts a new one).", journal.size)
        one("journal_records_total", "counter", "Records appended to the journal.",
            journal.records)
        one("journal_fsyncs_total", "counter", "Journal fsyncs (each may cover many writes).",
            journal.fsyncs)
        one("journal_fsync_seconds_total", "counter", "Seconds spent in journal rounds that "
            "fsynced (their write and their fsync).", repr(journal.fsync_seconds))
        one("checkpoints_total", "counter", "Checkpoints written (snapshot, new journal).",
            store.checkpoints)
        one("checkpoint_failures_total", "counter", "Checkpoints that failed (the journal "
            "was kept).", store.checkpoint_failures)
        return "".join(out).encode("utf-8")


# ------------------------------------------------------------------- backup --
#
# GET /snapshot: the whole store at one instant, in the snapshot file's
# format (the dict pickled with protocol 5), streamed: the backup that
# `cp` of the data directory is not (a copy made during a checkpoint can
# pair an old snapshot with a newer journal).  Restoring is putting the
# file as store.pickle in an empty data directory and starting there.

SNAPSHOT_STREAMS = 1        # snapshots sent at once; more get 503 with Retry-After
SNAPSHOT_RETRY_AFTER = 5    # seconds, in that 503


class SnapshotStream:
    """One GET /snapshot, sent by a thread of its own, so that the worker never waits for it.

    The worker, in route(), takes a slot (at most SNAPSHOT_STREAMS at once:
    each holds a copy of the dict, its references if not its values) and
    hands the connection over to the thread as a write does
    (KVHandler.hand_over: the worker reads no later request of it), which
    starts the thread.  The thread copies the dict
    (Store.copy), then pickles it straight into the socket: pickle.dump
    writes frames of about 64 KiB, each sent as an HTTP chunk, so the
    pickle is never whole in memory.  Chunks also let a client tell a
    cut-off backup from a whole one (an HTTP/1.0 client, which cannot have
    them, gets the bytes until the connection closes).  A client that takes
    nothing for --send-timeout seconds is cut off.  Then the connection goes
    back to the worker (KVHandler.send_owed), with the last chunk.
    """

    def __init__(self, handler):
        self.handler = handler
        self.server = handler.server
        self.sock = handler.request
        self.chunked = handler.request_version != "HTTP/1.0"
        self.connection = handler.connection_header(close=not self.chunked)
        self.started, self.requestline = handler.started, handler.requestline
        self.size = 0
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLOUT)

    @classmethod
    def start(cls, handler):
        """Take a slot, hand the connection over and start the thread; a 503 if no slot is free."""
        slots = handler.server.snapshot_streams
        if not slots.acquire(blocking=False):
            raise RequestError(503, "a snapshot is already being sent; retry later",
                               headers=(("Retry-After", SNAPSHOT_RETRY_AFTER),))
        try:
            thread = threading.Thread(target=cls(handler).run, name="snapshot", daemon=True)
            handler.hand_over(thread.start)     # as a write does
        except BaseException:
            slots.release()
            raise

    def run(self):
        handler = self.handler
        whole = False
        try:
            data = self.server.store.copy()
            self.send([b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n",
                       b"Transfer-Encoding: chunked\r\n" if self.chunked else b"",
                       b'Content-Disposition: attachment; filename="store.pickle"\r\n',
                       _this_second.date_header(), self.connection, b"\r\n"])
            pickle.dump(data, self, protocol=persistence.PICKLE_PROTOCOL)
            whole = True
        except Exception as e:          # the client gone or too slow, mostly
            handler.close_connection = True
            log("Snapshot to %s cut off after %d bytes: %s"
                % (handler.client_address[0], self.size,
                   "nothing taken for %g s (--send-timeout)" % self.server.limits.send_timeout
                   if isinstance(e, TimeoutError) else e))
        finally:
            data = None
            self.server.snapshot_streams.release()
        if whole:
            self.server.metrics.request_done("GET", 200, self.started)
            handler.log_message('"%s" %s %s', self.requestline, 200, self.size)
        # The last chunk, and the connection back to the worker.
        handler.send_owed(b"0\r\n\r\n" if whole and self.chunked else b"")

    def write(self, data):
        """pickle.dump's file: each write, one chunk."""
        size = len(data)
        if size:
            self.size += size
            if self.chunked:
                self.send([b"%x\r\n" % size, data, b"\r\n"])
            else:
                self.send([data])
        return size

    def send(self, buffers):
        """Send every buffer (without joining them: a frame may be 10 MiB); raise OSError.

        Raises TimeoutError if the client takes nothing for --send-timeout.
        """
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        timeout_ms = self.server.limits.send_timeout * 1000
        while views:
            try:
                sent = self.sock.sendmsg(views)     # the socket is non-blocking
            except BlockingIOError:
                sent = 0
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0], sent = views[0][sent:], 0
            if views and not self._poll.poll(timeout_ms):
                raise TimeoutError()


# --------------------------------------------------------------- lifecycle --

def positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:          # also refuses nan
        raise ValueError(text)
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or value == float("inf"):      # also refuses nan
        raise ValueError(text)
    return value


def port_number(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


def cpu_number(text):
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"
cpu_number.__name__ = "CPU number"
non_negative_float.__name__ = "non-negative number"
positive_float.__name__ = "positive number"
port_number.__name__ = "port (0-65535)"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line, exit 2: "bad usage" (argparse would add the usage text).
        self.exit(2, "error: %s (see --help)\n" % message)


def parse_args(argv, environ):
    parser = ArgumentParser(
        description="An HTTP key-value store that keeps every acknowledged write "
                    "through clean shutdowns and crashes.",
        epilog="Environment: HOST, PORT, DATA_DIR and KV_AUTH_TOKEN_FILE are used when the "
               "flag is not given. SIGTERM, SIGINT and SIGHUP (unless ignored at start, as "
               "under nohup) shut the server down cleanly. "
               "Exit codes: 0 clean shutdown, 1 runtime failure, 2 bad usage.")
    parser.add_argument("--host", default=environ.get("HOST", "0.0.0.0"),
                        help="address to bind (env HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=port_number, default=environ.get("PORT", "8080"),
                        help="TCP port; 0 picks a free one (env PORT, default 8080)")
    parser.add_argument("--working-dir", default=environ.get("DATA_DIR", "./data"),
                        metavar="DIR",
                        help="data directory, created if missing "
                             "(env DATA_DIR, default ./data)")
    parser.add_argument("--shutdown-timeout", type=non_negative_float, default=15.0,
                        metavar="SECONDS",
                        help="how long shutdown waits for requests in flight (default 15)")
    parser.add_argument("--max-value-bytes", type=positive_int, default=10 * 1024 * 1024,
                        metavar="N", help="largest accepted value (default 10485760)")
    parser.add_argument("--fsync", choices=persistence.Journal.POLICIES, default="always",
                        help="journal fsync policy: always = before each reply, shared by "
                             "concurrent writers; everysec = once a second; no = left to "
                             "the OS (default always)")
    parser.add_argument("--checkpoint-bytes", type=positive_int, default=64 * 1024 * 1024,
                        metavar="N",
                        help="write a snapshot and start a new journal when the journal "
                             "grows past N bytes (default 67108864)")
    parser.add_argument("--lock-wait", type=non_negative_float, default=5.0,
                        metavar="SECONDS",
                        help="if another process holds the data directory's lock, wait "
                             "this long for it to exit (a server still dying) before "
                             "refusing to start (default 5)")
    parser.add_argument("--cpu", type=cpu_number, default=None, metavar="N",
                        help="for a host dedicated to this server: run every thread on "
                             "CPU N, scheduled as SCHED_BATCH (default: not pinned, "
                             "normal scheduling; see README, Performance)")
    parser.add_argument("--auth-token-file", dest="auth_token", type=read_auth_token,
                        default=environ.get(AUTH_TOKEN_ENV) or None, metavar="FILE",
                        help="require 'Authorization: Bearer <token>' on every request "
                             "but GET /health; the token is the file's content without "
                             "surrounding whitespace (env %s, default: no auth)"
                             % AUTH_TOKEN_ENV)
    limits = parser.add_argument_group(
        "limits and timeouts", "what one client can make the server spend; each bound keeps "
        "the server available to the others (see README, Limits and timeouts)")
    limits.add_argument("--header-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                        help="a request line and headers must arrive within it, else 408 "
                             "and close; ample for any real client (default 10)")
    limits.add_argument("--body-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                        help="a body that stops arriving for longer gets 408 and close; a "
                             "pause, not a total, so slow links still upload (default 30)")
    limits.add_argument("--send-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                        help="a client that stops reading its reply for longer is cut off "
                             "(default 30)")
    limits.add_argument("--idle-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                        help="a keep-alive connection with no request for longer is "
                             "closed, without a reply (default 60)")
    limits.add_argument("--max-connections", type=positive_int, default=16384, metavar="N",
                        help="open connections; past it a new one gets 503 and is closed; "
                             "room for a burst of 10,000 clients (default 16384)")
    limits.add_argument("--max-inflight-bytes", type=positive_int, default=256 << 20,
                        metavar="N",
                        help="memory of all requests in flight together (bodies being "
                             "received, header blocks, unsent replies); a request past it "
                             "gets 503 with Retry-After (default 268435456 = 256 MiB)")
    limits.add_argument("--max-header-bytes", type=positive_int, default=65536, metavar="N",
                        help="request line and headers together; past it 431, or 414 for "
                             "the request line alone (default 65536)")
    parser.add_argument("--access-log", action="store_true",
                        help="log one line per request (never a value); off by default")
    return parser.parse_args(argv)


def raise_open_file_limit():
    """Each connection is a file descriptor; a burst of 10,000 needs more than the usual 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else max(soft, 1 << 20), hard))
        except (ValueError, OSError):
            pass


def pin_to_one_cpu(cpu):
    """Keep every thread of the process on CPU `cpu` (--cpu; off by default).

    Only one thread runs Python at a time (the GIL), so a second CPU buys
    the server little; but a thread woken on another CPU than the one that
    woke it costs an inter-processor interrupt, each time the GIL or a lock
    changes hands: several times per request.  On a 2-CPU VM, pinning
    made GET throughput x2.5.  Not the default: on a
    shared host every instance would crowd onto the CPU it was given, and
    the scheduler could no longer move it away from a busy one.  Must run
    before other threads start: they inherit the main thread's CPU set.
    """
    if not hasattr(os, "sched_setaffinity"):
        raise OSError(0, "CPU affinity is not supported on this system")
    os.sched_setaffinity(0, {cpu})


def no_wakeup_preemption():
    """Ask Linux not to let a woken thread preempt the running one (SCHED_BATCH); True if done.

    On one CPU, a thread woken because its request arrived would preempt
    the thread that holds the GIL, find the GIL taken, and sleep again: two
    context switches for nothing.  Under SCHED_BATCH it waits until the
    running thread blocks, which is when that thread lets the GIL go.  It
    needs no privilege, and threads started later inherit it.  On the
    2-CPU VM it took PUT at 64 connections from 19.3k to 23.5k/s.  The
    price is a longer tail latency when there are many more threads than
    CPUs.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        return True
    except (AttributeError, OSError):
        return False            # not Linux, or not allowed: only slower


def open_standard_fds():
    """Point stdin, stdout or stderr at /dev/null if the process started with it closed.

    Otherwise the first file opened (the lock, a journal) would get fd 1,
    and log lines would be written into it.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)      # the lowest free fd: this one


class StoppedWhileStarting(Exception):
    """A stopping signal came before there was anything to serve or save."""


def lock_directory(directory, wait, signal_pipe):
    """Take the data directory's lock; wait up to `wait` s for a holder to exit.

    A harness may restart the server as soon as it has sent SIGKILL to the
    previous one, which holds the lock until it is gone, maybe a moment
    later (lsfr restarts after 1 s).  A signal (install_signal_handlers)
    ends the wait: StoppedWhileStarting.
    """
    deadline = time.monotonic() + wait
    waited = False
    while True:
        try:
            return persistence.lock_directory(directory)
        except persistence.DirectoryInUse as e:
            left = deadline - time.monotonic()
            if left <= 0 and waited:
                raise persistence.DirectoryInUse("%s (waited %g s for it to exit)"
                                                 % (e, wait)) from None
            if left <= 0:
                raise
            if not waited:
                log("%s is in use by another process; waiting up to %g s for it to exit"
                    % (directory, wait))
                waited = True
            if select.select([signal_pipe], [], [], min(LOCK_POLL, left))[0]:
                raise StoppedWhileStarting(read_signal(signal_pipe))


LOCK_POLL = 0.05        # seconds between two tries of a taken lock (--lock-wait)


def open_store(args, signal_pipe):
    """Create the data directory, lock it, recover the data, open a new journal."""
    directory = os.path.abspath(args.working_dir)
    try:
        persistence.make_data_directory(directory)
        lock = lock_directory(directory, args.lock_wait, signal_pipe)
        data, generation, replayed = persistence.load(directory, log)
        # Creating the new journal also proves the directory is writable:
        # better to fail now than at shutdown.
        journal = persistence.Journal(directory, generation, args.fsync, writer_process=True,
                                      driven=True, pass_fds=(lock,))
    except OSError as e:
        raise persistence.DataError("%s: data directory is not usable: %s"
                                    % (e.filename or directory, e.strerror))
    # Past RLIMIT_FSIZE, a write fails with EFBIG (a full disk, to the
    # journal) instead of the process being killed by SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    store = Store(data, journal, args.checkpoint_bytes, log)
    store.keep_open_in_child = (lock,)
    if replayed:
        store.request_checkpoint()      # fold the replayed journals into a snapshot
    return store, lock


def install_signal_handlers():
    """Route SIGTERM, SIGINT and SIGHUP to a pipe; return its read end.

    Python's own C-level handler writes each signal's number to the fd given
    to signal.set_wakeup_fd(); the stopper thread (serve()) reads it.  The
    Python-level handler does nothing at all: it runs in the main thread
    between two bytecodes, perhaps while that thread holds a lock (in
    log(), or in Event.set()), and a handler that took the same lock would
    wait for itself forever.

    SIGHUP (the terminal closed) stops the server as SIGTERM does, unless
    it was ignored when the process started: whoever ran us under `nohup`
    asked for the server to outlive its terminal.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)       # required by set_wakeup_fd()
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    stopping = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        stopping.append(signal.SIGHUP)
    for signum in stopping:
        signal.signal(signum, lambda signum, frame: None)
    return read_end


def read_signal(signal_pipe):
    """Block until a signal arrives (install_signal_handlers); return its name."""
    signum = os.read(signal_pipe, 1)[0]
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum


def stop_on_signal(server, signal_pipe):
    """The stopper thread: the first signal shuts the server down; later ones change nothing.

    server.shutdown() waits until serve_forever() has returned, so it must
    run on a thread other than the main one, which runs serve_forever().
    (Called before serve_forever() starts, it makes it return at once.)
    Later signals are logged, at most once a second: a storm of them must
    not flood the log.
    """
    log("Received %s, shutting down" % read_signal(signal_pipe))
    server.shutdown()
    last_logged = 0.0
    while True:
        name = read_signal(signal_pipe)
        if time.monotonic() - last_logged >= 1.0:
            last_logged = time.monotonic()
            log("Received %s: already shutting down; it changes nothing" % name)


DRAIN_SETTLE = 0.2          # seconds for idle connections to close before counting
DRAIN_REPORT_EVERY = 5.0    # seconds between two "Waiting up to" lines


def drain(server, timeout):
    """KVServer.drain, saying what the shutdown waits for and for how long.

    Idle connections close at once; those still open after DRAIN_SETTLE
    are in a request.  Returns how many were still open at the deadline.
    """
    deadline = time.monotonic() + timeout
    still_open = server.drain(min(timeout, DRAIN_SETTLE))
    while still_open:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        log("Waiting up to %.1f s (--shutdown-timeout) for %d connection(s) in a request"
            % (left, still_open))
        still_open = server.drain(min(left, DRAIN_REPORT_EVERY))
    return still_open


def serve(args, store, signal_pipe):
    """Serve until a signal, then drain, seal and save.  Returns the exit code."""
    try:
        limits = Limits(args.header_timeout, args.body_timeout, args.send_timeout,
                        args.idle_timeout, args.max_connections, args.max_inflight_bytes,
                        args.max_header_bytes)
        server = KVServer((args.host, args.port), store, args.max_value_bytes, args.access_log,
                          args.auth_token, limits)
    except (OSError, OverflowError) as e:
        store.abandon()
        fail("cannot listen on %s:%s: %s" % (args.host, args.port,
                                              getattr(e, "strerror", None) or e))
        return 1

    def stop_on_storage_failure():
        store.fatal.wait()
        log("Storage failed for good (%s); shutting down" % store.write_problem())
        server.shutdown()

    threading.Thread(target=stop_on_signal, args=(server, signal_pipe),
                     name="stopper", daemon=True).start()
    threading.Thread(target=stop_on_storage_failure, name="storage-watch", daemon=True).start()
    host, port = server.server_address[:2]
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files != resource.RLIM_INFINITY and files < args.max_connections + 64:
        log("Open file limit %d is below --max-connections %d: past it, connections wait "
            "in the kernel's queue" % (files, args.max_connections))
    warn_if_exposed(server)
    log("Server listening on %s:%d" % (host, port))
    # A short poll interval: serve_forever() notices shutdown() within it.
    server.serve_forever(poll_interval=0.05)
    server.server_close()

    still_open = drain(server, args.shutdown_timeout)
    if still_open:
        log("Shutdown timeout: %d connection(s) still in a request; their writes are refused"
            % still_open)
    store.seal()
    path = persistence.snapshot_path(store.directory)
    log("Flushing %d keys to %s" % (len(store), path))
    started = time.monotonic()
    try:
        size = store.save_and_close()
    except OSError as e:
        fail("saving %s failed: %s" % (path, e))    # e says what the journal still holds
        return 1
    log("Saved %d bytes in %.2f s; bye" % (size, time.monotonic() - started))
    failure = store.storage_failure()
    if failure:
        # The snapshot holds every acknowledged write and none that failed.
        fail("stopped after a storage failure: %s" % failure)
        return 1
    return 0


def main(argv=None):
    open_standard_fds()
    args = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    raise_open_file_limit()
    if args.cpu is not None:
        try:
            pin_to_one_cpu(args.cpu)            # before any thread starts
        except OSError as e:
            fail("cannot run on CPU %s: %s" % (args.cpu, e.strerror))
            os._exit(1)
        batch = no_wakeup_preemption()          # every thread shares that CPU
        log("Running on CPU %d%s (--cpu)" % (args.cpu, ", SCHED_BATCH" if batch else ""))
    signal_pipe = install_signal_handlers()     # before the load, which may be long
    try:
        store, directory_lock = open_store(args, signal_pipe)
    except persistence.DataError as e:
        fail(str(e))
        os._exit(1)
    except StoppedWhileStarting as e:
        log("Received %s while waiting for the data directory; nothing to save, bye" % e)
        os._exit(0)
    code = serve(args, store, signal_pipe)
    # Exit at once, while `store` is still referenced: the data is saved,
    # and freeing a dict of a million keys object by object takes longer
    # than saving it did.  Worker threads stalled on slow clients end too.
    os._exit(code)


if __name__ == "__main__":
    main()
