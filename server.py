"""The key-value server: its HTTP API, its connections, and the process's life.

    python3 server.py [--port 8080] [--working-dir ./data] ...   (--help for all)

The standard library's event loop (asyncio) serves every connection on one
thread: its transports read and write the sockets, buffer, and apply flow
control; a Connection (an asyncio.Protocol) turns the bytes into requests
with http11.py, the wire format, which does no I/O; the Api says what each
request means and calls the Store (store.py), a dict behind one lock;
persistence.py puts it on disk.  A write is handed to the store, which
queues it for the journal; once per loop turn the queued writes go to the
journal's writer, a process of its own, as one round (one write, one
fsync: group commit); the writes' 200s go out when it says they are
durable.  Nothing on the loop waits: not for a client, not for the disk.
Every wait on a client has a deadline and everything a client can make the
server hold has a bound (Limits).  Threads exist only where a call must
block or would hold the loop for seconds: a backup's pickling
(SnapshotStream), an export's sorting and encoding (ExportStream), the
checkpointer, the final save.

The sections, in order: logging; the API (routes, keys, writes); conditional
requests; listing; batches (BatchJob); connections (Connection); the server
(Server: the connections' shared bounds and deadlines); auth; metrics;
backup and export; the lifecycle (flags, start, signals, drain, save).

A PUT, from the socket to the disk
----------------------------------
    asyncio                       accepts, makes a Connection; when the socket
                                  is readable, reads and calls:
    Connection.data_received      feeds the bytes to its http11.RequestParser
    Connection.advance            each whole request the parser gives, at most
                                  REQUESTS_PER_TURN a turn:
    Connection.head               its head: auth, room for its body
    Api.serve                     routes it; a PUT validates the key, then
    Api.write                     Store.put, with the callback of an Owed reply,
                                  whose place in the connection's queue keeps
                                  the replies in request order
    Store._mutate                 under the lock, Journal.append queues the
                                  record; the dict waits until it is durable
    Journal.pump                  after the loop turn: every record queued in
                                  it, as one round, to the writer process
    _write_rounds                 the journal's writer (persistence.py): one
                                  writev, one fsync for every round that came
    Journal._received             its reply: Store.apply_round applies the
                                  round to the dict, then each write's
    Owed.durable                  callback: Connection.written builds the 200
    Connection.flush              in the next turn: every reply that is ready,
                                  in order, in one transport.write

A SIGTERM, from the signal to exit 0
------------------------------------
    Stopper.on_signal    asyncio runs it on the loop (add_signal_handler);
                         a second signal is logged and changes nothing
    serve                stops accepting (listener.close), then
    drain                closes idle connections at once; lets requests in
                         flight finish, up to --shutdown-timeout, and logs
                         what it waits for
    Store.seal           any later write gets 503; the dict is frozen
    Store.save_and_close the final snapshot, then the journals go; exit 0,
                         or exit 1 if the save failed (the journal stays)
"""

import sys

__version__ = "1.0.0"     # --version, and kvstore_build_info in /metrics

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
import asyncio
import base64
import binascii
import bisect
import collections
import hmac
import ipaddress
import json
import os
import re
import resource
import signal
import socket
import threading
import time
import urllib.parse

import http11
import persistence
from store import (ConditionFailed, KeyIndexBuilding, Sealed, Store, now_ms, sorted_in_runs,
                   value_tag)

# ------------------------------------------------------------------ logging --
#
# Logging never raises: a log pipe that dies (`./run.sh | head -2`), a
# closed stdout or a full disk under a redirect must not stop a request, the
# thread that handles signals, or the final save.  Lines go straight to the
# file descriptor with os.write: no buffer to hold lines that cannot be
# written, and nothing left to flush at exit.
#
# Every line starts with when it happened, as RFC 3339 in UTC (a log read
# next to another host's, or after a DST change, needs no guessing), or is
# one JSON object (--log-format json) for a log shipper that would
# otherwise have to parse the text.  Events go to stdout, failures to
# stderr.  No line ever holds a value or the token: log_access takes only
# what the request line and the reply's status say.

LOG_FORMATS = ("text", "json")
ACCESS_TARGET_MAX = 1024        # characters of a request target kept in the access log

_log_lock = threading.Lock()
_log_json = False               # set_log_format("json")


def set_log_format(name):
    """Choose how every later line is written: "text" (the default) or "json"."""
    global _log_json
    if name not in LOG_FORMATS:
        raise ValueError("unknown log format %r" % name)
    _log_json = name == "json"


def timestamp(now=None):
    """`now` (default: now) as RFC 3339 in UTC, to the millisecond: 2026-01-05T09:30:00.250Z."""
    now = time.time() if now is None else now
    millis = int(now % 1 * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%03dZ" % millis


def _write_line(fd, line):
    """Write one line to `fd`; a failure drops the line, it never raises."""
    data = (line + "\n").encode("utf-8", "backslashreplace")
    try:
        while data:
            data = data[os.write(fd, data):]
    except (OSError, ValueError):
        pass                    # EPIPE, EBADF, ENOSPC...: nobody to tell


def _emit(fd, level, prefix, message, fields=None):
    """One event as one line: timestamped text, or a JSON object with the same facts."""
    if _log_json:
        record = {"time": timestamp(), "level": level, "message": message}
        record.update(fields or {})
        line = json.dumps(record, separators=(",", ":"))
    else:
        # A newline would make one event look like two.
        line = "%s %s%s" % (timestamp(), prefix, message.replace("\n", "\\n"))
    with _log_lock:
        _write_line(fd, line)


def log(message):
    """One line to stdout, at once (the harnesses read it live)."""
    _emit(1, "info", "", message)


def warn(message):
    """One line to stdout about something an operator should change ("Warning: ...")."""
    _emit(1, "warning", "Warning: ", message)


def fail(message):
    """One line to stderr: what failed and why, never a traceback."""
    _emit(2, "error", "error: ", message)


def log_access(client, method, target, status, nbytes, seconds):
    """The access log's line for one request (--access-log): who, what, the outcome, how long.

    `client` is the peer's address, `method` and `target` come from the
    request line (None if it could not be parsed), `nbytes` is the reply
    body's length and `seconds` the time from the request's first bytes to
    its reply.  Text: 127.0.0.1 "GET /kv/a" 200 5 0.000412, as the common
    log format (request, status, bytes) with nginx's $request_time after.
    The target is quoted with its own quotes escaped, so that a client
    cannot forge a field, and cut at ACCESS_TARGET_MAX characters.
    """
    method, target = method or "-", target or "-"
    if len(target) > ACCESS_TARGET_MAX:
        target = target[:ACCESS_TARGET_MAX] + "..."
    if _log_json:
        _emit(1, "info", "", "%s %s %d" % (method, target, status),
              {"client": client, "method": method, "target": target, "status": status,
               "bytes": nbytes, "seconds": round(seconds, 6)})
        return
    quoted = ("%s %s" % (method, target)).replace("\\", "\\\\").replace('"', '\\"')
    _emit(1, "info", "", '%s "%s" %d %d %.6f' % (client, quoted, status, nbytes, seconds))


def format_address(host, port):
    """host:port as a URL writes it: an IPv6 address in brackets ([::1]:8080)."""
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


# ---------------------------------------------------------------- the API --
#
# What each request means.  The wire format is http11.py's; the sockets are
# asyncio's (Connection, below).  Api.serve() takes a whole request and
# returns its reply as (status, body, headers, content type), or PENDING
# when the reply will come later: a write's once the journal has made it
# durable, a backup's once it is streamed.  Errors are RequestError.

# A key is one or more of these characters (so is a listing's prefix, which
# may end in the middle of a segment) ...
KEY = re.compile(r"[A-Za-z0-9:_./\-]+")
# ... in segments separated by single slashes (app/db/url), none of them "."
# or "..": a client or a proxy would resolve /kv/a/../b to /kv/b, and
# reach another key than the one named.
SEGMENT = r"(?!\.\.?(?:/|\Z))[A-Za-z0-9:_.\-]+"
KEY_PATH = re.compile(r"%s(?:/%s)*" % (SEGMENT, SEGMENT))
KEY_METHODS = ("GET", "HEAD", "PUT", "DELETE")
WRITE_METHODS = ("PUT", "DELETE", "POST")
PENDING = object()          # Api.serve(): the reply comes later, through the connection
NEED_DATA, PAUSED = http11.NEED_DATA, http11.PAUSED
SMALL_BODY = 16384          # bodies up to this size may use the last quarter of the memory cap
# The routes other than /kv/{key}: path -> {method: Api method}; a 405's
# Allow header lists the methods.
ROUTE_TABLE = {
    "/kv": {"GET": "listing", "HEAD": "listing", "DELETE": "delete_prefix"},
    "/clear": {"DELETE": "clear"},
    "/health": {"GET": "health", "HEAD": "health"},
    "/metrics": {"GET": "metrics_page", "HEAD": "metrics_page"},
    "/snapshot": {"GET": "snapshot"},
    "/export": {"GET": "export"},
    "/batch": {"POST": "batch"},
}


class Limits:
    """Every bound on what a client can make the server spend; each is a flag (parse_args).

    Timeouts are in seconds, checked by a sweep (Server.sweep) once a second,
    or at a tenth of the shortest timeout if that is shorter, so they are
    exact to within that.  Each starts when the connection is accepted.
      header_timeout      a request line and headers must arrive within it,
                          from their first byte (from the accept for a new
                          connection); else 408 (nothing sent yet: just
                          closed), and the connection closes.
      body_timeout        a body must keep arriving: a pause longer than it
                          gets 408.
      send_timeout        a client must keep reading its replies: a pause
                          longer than it closes the connection.
      idle_timeout        a keep-alive connection without a request for so
                          long is closed.
      max_connections     past it, a new connection gets a canned 503 and is
                          closed at once.
      max_inflight_bytes  bytes that clients make the server hold: input not
                          yet served, bodies being received (reserved from
                          their Content-Length), writes waiting for the
                          journal, replies not yet sent.  A body that does
                          not fit gets 503 with Retry-After; a request
                          without a body is never refused for it.
      max_journal_bytes   writes handed to the journal and not yet durable
                          (a stalled disk); past it new writes get 503 with
                          Retry-After, and those already handed over wait.
      max_header_bytes    request line and headers; past it, 431 (414 if the
                          request line alone is longer).
      max_value_bytes     the largest body; past it, 413.
      max_watchers        requests held by ?wait= (watches); past it, 503
                          with Retry-After.
      max_batch_bytes     the largest body of POST /batch; past it, 413.  At
                          most what a large body may reserve of
                          max_inflight_bytes (Server.reserve): a batch that
                          can never fit is told so (413), not to retry (503).
      max_batch_ops       the most operations (lines) in one POST /batch; past
                          it, 413 naming the line.  A batch is queued and
                          applied in one loop step (it is atomic), about
                          1.5 us an operation: this bounds that stall.
    """

    def __init__(self, header_timeout=10.0, body_timeout=30.0, send_timeout=30.0,
                 idle_timeout=60.0, max_connections=16384, max_inflight_bytes=256 << 20,
                 max_header_bytes=65536, max_value_bytes=10 << 20, max_journal_bytes=64 << 20,
                 max_watchers=10000, max_batch_bytes=64 << 20, max_batch_ops=10000):
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.send_timeout, self.idle_timeout = send_timeout, idle_timeout
        self.max_connections, self.max_inflight_bytes = max_connections, max_inflight_bytes
        self.max_header_bytes, self.max_value_bytes = max_header_bytes, max_value_bytes
        self.max_journal_bytes, self.max_watchers = max_journal_bytes, max_watchers
        self.max_batch_bytes = min(max_batch_bytes, max_inflight_bytes - max_inflight_bytes // 4)
        self.max_batch_ops = max_batch_ops


class RequestError(Exception):
    """A request we answer with an error status; `close` if the stream is unusable after it."""

    def __init__(self, status, message, close=False, headers=()):
        super().__init__(message)
        self.status, self.message, self.close, self.headers = status, message, close, headers

    def reply(self):
        """(status, body, headers, content type), as Api.serve returns replies."""
        return self.status, (self.message + "\n").encode(), self.headers, http11.TEXT_PLAIN


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
    return check_key(raw)


def check_key(key):
    """`key` if it is a key (KEY_PATH); else RequestError(400) saying why."""
    if not key:
        raise RequestError(400, "key cannot be empty")
    if not KEY_PATH.fullmatch(key):
        raise RequestError(400, "key contains invalid characters")
    return key


TTL_MAX = 315360000          # seconds: ten years
WAIT_MAX = 300              # seconds a watch may be held
KEY_PARAMETERS = ("ttl", "wait")    # known on /kv/{key}; any other is ignored, as before
NO_PARAMETERS = {}                  # key_query of no query (read, never written)


def whole_seconds(name, text, most):
    """The whole number of seconds, 1 to `most`, that parameter `name` says; else 400."""
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and 1 <= int(text) <= most):
        raise RequestError(400, "%s must be a whole number of seconds from 1 to %d"
                           % (name, most))
    return int(text)


def key_query(query):
    """{name: seconds} of a key request's ttl and wait parameters; 400 if one is bad."""
    found = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name in KEY_PARAMETERS:
            if name in found:
                raise RequestError(400, "parameter %s given twice" % name)
            found[name] = whole_seconds(name, urllib.parse.unquote(value),
                                        TTL_MAX if name == "ttl" else WAIT_MAX)
    return found


def seconds_left(deadline):
    """The KV-TTL of a key that expires at `deadline` (ms since the epoch): rounded up."""
    return str(max(1, -(-(deadline - now_ms()) // 1000)))


# Without a Cache-Control header a cache may reuse a reply (a 404 too) for
# as long as its heuristics like.  A value may be kept but must be checked
# again with its ETag before each use ("no-cache"); every other reply, a
# write's, an error, a listing, /health, says "no-store".
VALUE_CACHING = ("Cache-Control", "no-cache")
NO_STORE = (("Cache-Control", "no-store"),)


def busy(message="server busy", retry_after=1):
    return RequestError(503, message, headers=(("Retry-After", str(retry_after)),))


class Api:
    """The HTTP API over the store: keys, conditions, listing, batches, health, metrics, backup.

    Knows requests (http11.Request) and the store; not sockets.  A write is
    handed to the store with a callback (Owed.durable) that the journal
    calls once the write is durable, or has failed; until then the
    connection holds the write's place in its order of replies.
    """

    def __init__(self, store, metrics, server, auth_token=None):
        self.store, self.metrics, self.server = store, metrics, server
        self.auth_token = auth_token            # bytes, or None: no auth (check_auth)
        limits = server.limits
        self.value_limit = (limits.max_value_bytes, "value too large")
        self.batch_limit = (limits.max_batch_bytes, "batch too large")

    def check_head(self, request):
        """Checks that need only the head, made before the body is read: auth."""
        check_auth(self.auth_token, request)

    def revision_header(self, request):
        """KV-Revision, for a reply about /kv or a key (every one carries it), as headers."""
        path = request.path if request is not None else ""
        if path == "/kv" or path.startswith("/kv/"):
            return (("KV-Revision", str(self.store.revision)),)
        return ()

    def body_limit(self, request):
        """The parser asks, from a request's head: (its largest body, the 413's message)."""
        return self.batch_limit if request.path == "/batch" else self.value_limit

    def serve(self, request, connection):
        """The reply to a whole request: (status, body, headers, content type) or PENDING."""
        path = request.path
        try:
            if path.startswith("/kv/"):
                if request.method not in KEY_METHODS:
                    raise RequestError(405, "method not allowed",
                                       headers=(("Allow", ", ".join(KEY_METHODS)),))
                return self.key(request, parse_key(path[4:]), connection)
            route = ROUTE_TABLE.get(path)
            if route is None:
                raise RequestError(404, "not found")
            name = route.get(request.method)
            if name is None:
                raise RequestError(405, "method not allowed",
                                   headers=(("Allow", ", ".join(route)),))
            return getattr(self, name)(request, connection)
        except RequestError as e:       # about /kv or a key: the revision it reflects, now
            e.headers += self.revision_header(request)
            raise

    def key(self, request, key, connection):
        method = request.method
        query = key_query(request.query) if request.query else NO_PARAMETERS
        if method == "GET" or method == "HEAD":
            reply = self.read(request, key)
            if "wait" in query and reply[0] in (304, 404):     # a watch: until that changes
                return self.server.watches.hold(connection, request, query["wait"],
                                                lambda: self.read(request, key), reply[0],
                                                key=key)
            return reply
        if method == "DELETE":
            return self.write(request, connection, self.store.delete, key,
                              condition=write_condition(request.headers))
        if not request.framed:
            raise RequestError(411, "length required")
        body = request.body
        if not body:
            raise RequestError(400, "value cannot be empty")
        tag = value_tag(body)
        deadline = now_ms() + 1000 * query["ttl"] if "ttl" in query else None
        return self.write(request, connection, self.store.put, key, body, tag=tag,
                          condition=write_condition(request.headers), deadline=deadline,
                          etag='"%s"' % tag)

    def read(self, request, key):
        """The reply to GET or HEAD of `key`: 200, 304 or 404, with the revision it reflects."""
        value, tag, deadline, revision = self.store.read(key)
        if value is None:
            return 404, b"key not found\n", (("KV-Revision", str(revision)),), http11.TEXT_PLAIN
        headers = (("KV-Revision", str(revision)), ("ETag", '"%s"' % tag), VALUE_CACHING)
        if deadline is not None:
            headers += (("KV-TTL", seconds_left(deadline)),)
        return read_status(request.headers, tag), value, headers, http11.TEXT_PLAIN

    def write(self, request, connection, mutation, *args, etag=None, answer=None, **options):
        """Hand a mutation to the store; its reply is owed until it is durable.

        Refused at once: past the journal's backlog (a stalled disk: the
        writes already handed over wait, new ones are told to retry),
        after the store is sealed (503), a failed condition (412), a
        journal that has failed for good (500/507).  The 200 has an empty
        body, or answer(what the mutation returned) -> (body, content type).
        """
        size = len(request.body)
        if not self.server.journal_has_room(size):
            raise busy("journal busy: the disk is slow to take writes")
        owed = Owed(connection, request, size, etag)    # queued once the store takes it
        try:
            done = mutation(*args, on_durable=owed.durable, **options)
            # The revision it will have: a prefix delete's comes with its count.
            owed.revision = done[1] if type(done) is tuple else done
        except Sealed:
            raise RequestError(503, "shutting down", close=True)
        except ConditionFailed:
            raise RequestError(412, "precondition failed")
        except OSError as e:
            raise RequestError(*storage_error(e))
        if answer is not None:
            owed.body, owed.content_type = answer(done)
        connection.queue_owed(owed)
        return PENDING

    def clear(self, request, connection):
        return self.write(request, connection, self.store.clear)

    def delete_prefix(self, request, connection):
        """DELETE /kv?prefix=P: every key under P, in one atomic, journaled step; the count."""
        prefix = prefix_query(request.query, required=True)
        return self.write(request, connection, self.store.delete_prefix, prefix,
                          answer=lambda done: (b"%d\n" % done[0], http11.TEXT_PLAIN))

    def listing(self, request, connection):
        """GET /kv?prefix=P&limit=N&after=K: a page of keys, one per line; Link: the next page.

        With wait=S (and since=R, else the revision now): held until a key
        under P changes after revision R, or S seconds pass.
        """
        prefix, after, limit, wait, since = listing_query(request.query)
        if wait is not None and not self.store.changed_since(
                prefix, self.store.revision if since is None else since):
            return self.server.watches.hold(
                connection, request, wait, lambda: self.page(prefix, after, limit),
                prefix=prefix)
        return self.page(prefix, after, limit)

    def page(self, prefix, after, limit):
        """A page of the listing, with the revision it reflects."""
        revision = self.store.revision      # read first: the page reflects at least it
        try:
            keys, more = self.store.keys_page(prefix, after, limit)
        except KeyIndexBuilding:
            raise busy("key index being built, retry")
        keys, cut = within_page_bytes(keys)
        headers = (("KV-Revision", str(revision)),)
        if more or cut:
            # A relative reference (RFC 3986 4.2): the same path, this
            # query.  Behind a proxy that serves us under /store/, the
            # client resolves it to /store/kv?..., where /kv?... would 404.
            headers += (("Link", '<?prefix=%s&limit=%d&after=%s>; rel="next"'
                         % (quote(prefix), limit, quote(keys[-1]))),)
        body = ("\n".join(keys) + "\n").encode() if keys else b""
        return 200, body, headers, http11.TEXT_PLAIN

    def health(self, request, connection):
        problem = self.store.write_problem() or self.server.journal_stalled()
        if problem:
            raise RequestError(503, problem)
        return 200, b"ok\n", (), http11.TEXT_PLAIN

    def metrics_page(self, request, connection):
        return 200, self.metrics.render(self.server), (), METRICS_TYPE

    def snapshot(self, request, connection):
        SnapshotStream.start(self.server, connection, request)
        return PENDING

    def batch(self, request, connection):
        """POST /batch: NDJSON operations, all or none, as one mutation (BatchJob)."""
        if not request.framed:
            raise RequestError(411, "length required")
        BatchJob(self, connection, request).start()
        return PENDING

    def export(self, request, connection):
        """GET /export?prefix=P: the keys under P, sorted, as NDJSON, from one cut."""
        ExportStream.start(self.server, connection, request, prefix_query(request.query))
        return PENDING


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
LIST_PARAMETERS = ("prefix", "after", "limit", "wait", "since")


def listing_query(query):
    """(prefix, after, limit, wait, since) of a listing's query string, or RequestError(400).

    wait and since are None when not given.
    """
    params = query_parameters(query, LIST_PARAMETERS)
    for name in ("prefix", "after"):
        if params.get(name) and not KEY.fullmatch(params[name]):
            raise RequestError(400, "%s contains invalid characters" % name)
    limit = params.get("limit", str(LIST_LIMIT))
    if not (limit.isascii() and limit.isdigit() and len(limit) <= 6
            and 1 <= int(limit) <= LIST_LIMIT_MAX):
        raise RequestError(400, "limit must be a number from 1 to %d" % LIST_LIMIT_MAX)
    wait = whole_seconds("wait", params["wait"], WAIT_MAX) if "wait" in params else None
    since = params.get("since")
    if since is not None:
        if not (since.isascii() and since.isdigit() and len(since) <= 19):
            raise RequestError(400, "since must be a revision: a whole number")
        since = int(since)
    return params.get("prefix", ""), params.get("after", ""), int(limit), wait, since


def query_parameters(query, known):
    """{name: value} of a query string whose names are among `known`, each once; or a 400."""
    try:
        # (Python 3.10's strict parsing refuses an empty query string.)
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True,
                                       errors="strict", max_num_fields=len(known) + 1
                                       ) if query else []
    except ValueError:
        raise RequestError(400, "bad query string")
    params = {}
    for name, value in pairs:
        if name not in known:
            raise RequestError(400, "unknown parameter (known: %s)" % ", ".join(known))
        if name in params:
            raise RequestError(400, "parameter %s given twice" % name)
        params[name] = value
    return params


def prefix_query(query, required=False):
    """The prefix of /export?prefix=P or DELETE /kv?prefix=P: "" if none; or a 400.

    `required`: an empty or missing prefix is a 400 (DELETE /clear is how
    to delete every key: a DELETE /kv that lost its query string must not).
    """
    prefix = query_parameters(query, ("prefix",)).get("prefix", "")
    if not prefix and required:
        raise RequestError(400, "prefix cannot be empty (DELETE /clear deletes every key)")
    if prefix and not KEY.fullmatch(prefix):
        raise RequestError(400, "prefix contains invalid characters")
    return prefix


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


# ---------------------------------------------------------------- batches --
#
# POST /batch: one operation a line (NDJSON), {"op": "put", "key": K,
# "value": BASE64} with optional "ttl", "if_match", "if_none_match": "*";
# {"op": "delete", "key": K} with optional "if_match".  A line without "op"
# is a put, so an export is a batch.  Blank lines (spaces, tabs, CRs) are
# skipped (an export's last newline, files joined with cat); line numbers
# count them, as an editor does.  A key and a value have the limits of a
# PUT's (BatchJob.max_key, --max-value-bytes).  All or nothing: the
# operations go to the store as one mutation (Store.batch), one journal
# record, applied under one hold of its lock, answered once durable with
# {"revision": R, "applied": N}.

BATCH_LINES_PER_TURN = 1000     # lines parsed in one loop turn, then the others' turn ...
BATCH_BYTES_PER_TURN = 1 << 20  # ... or this many bytes of lines, whichever comes first
BATCH_FIELDS = {"put": {"op", "key", "value", "ttl", "if_match", "if_none_match"},
                "delete": {"op", "key", "if_match"}}
JSON_TYPE = b"application/json"
KEY_HEAD_ROOM = 1024            # bytes of a head besides its key: request line, Host, a few more
LINE_ROOM = 4096                # bytes of a line besides its key and value: JSON, op, ttl, tags
BLANK = re.compile(rb"[ \t\r\n]*")    # JSON's whitespace: blank lines, and a line's indent


def batch_operation(line, max_key, max_value):
    """(record, condition) of one line of a batch: Store.batch's part and condition, with
    a put's ttl in seconds (or None) for its deadline (a ttl counts from BatchJob.queue).

    A key is at most `max_key` long: GET /kv/{key} must be able to name it
    within the head's limit (a longer one could be written here, but never
    read or deleted by its name).  A value is at most `max_value` bytes, as
    a PUT's.  RequestError(400) saying what is wrong with the line.
    """
    try:
        fields = json.loads(line)
    # Not JSON, or not UTF-8; or nested deeper than the decoder recurses (a
    # line of 100,000 "[" raises RecursionError: uncaught, it ended the
    # loop's callback, and the batch queue, BatchJob.step, waited for it
    # for ever, with every later batch behind it).
    except (ValueError, RecursionError):
        fields = None
    if type(fields) is not dict:
        raise RequestError(400, "not a JSON object")
    op = fields.get("op", "put")
    allowed = BATCH_FIELDS.get(op) if type(op) is str else None
    if allowed is None:
        raise RequestError(400, 'op must be "put" or "delete"')
    unknown = fields.keys() - allowed
    if unknown:
        raise RequestError(400, "unknown field for %s: %s" % (op, json_string(min(unknown))[:80]))
    key = fields.get("key")
    if type(key) is not str:
        raise RequestError(400, "key must be a string")
    if len(key) > max_key:
        raise RequestError(400, "key too long for a request line (--max-header-bytes)")
    check_key(key)
    condition = batch_condition(fields.get("if_match"), fields.get("if_none_match"))
    if op == "delete":
        return (persistence.DELETE, key, b"", None), condition
    value, ttl = fields.get("value"), fields.get("ttl")
    try:
        value = base64.b64decode(value, validate=True) if type(value) is str else None
    except (binascii.Error, ValueError):
        value = None
    if value is None:
        raise RequestError(400, "value must be base64")
    if not value:
        raise RequestError(400, "value cannot be empty")
    if len(value) > max_value:
        raise RequestError(400, "value too large (--max-value-bytes)")
    if ttl is not None:                 # a whole JSON number: not "60", 1.5 or true
        ttl = whole_seconds("ttl", str(ttl) if type(ttl) is int else "", TTL_MAX)
    return (persistence.PUT, key, value, ttl), condition


def batch_condition(if_match, if_none_match):
    """The condition (as write_condition's) of a line's if_match and if_none_match; or None."""
    if if_match is None and if_none_match is None:
        return None
    if if_none_match is not None and if_none_match != ANY:
        raise RequestError(400, 'if_none_match must be "*"')
    headers = {} if if_none_match is None else {"if-none-match": ANY}
    if if_match is not None:
        # Not empty: as a header, an empty If-Match would be a condition never met.
        if type(if_match) is not str or not if_match.strip(" \t"):
            raise RequestError(400, BAD_IF_MATCH)
        headers["if-match"] = if_match
    try:
        return write_condition(headers)
    except RequestError:
        raise RequestError(400, BAD_IF_MATCH) from None


BAD_IF_MATCH = 'if_match must be a tag in quotes, as in ETag, or "*"'


class BatchJob:
    """One POST /batch: its lines parsed a slice per loop turn, then one Store.batch.

    Parsing a 64 MiB batch takes seconds of CPU: in one piece it would
    stall every other client as long.  So the job parses
    BATCH_LINES_PER_TURN lines (or BATCH_BYTES_PER_TURN bytes) a turn and
    goes to the back of the loop's queue (call_soon).  One job at a time
    does so, the others waiting in order (Server.batches): 16 importers
    parsing side by side took 16 shares of every turn, and others waited
    that long (p99 0.2 s).  Its connection reads nothing meanwhile (busy),
    so a request pipelined behind the batch comes after it, in the journal
    too.  A bad line ends it: 400 naming the line,
    nothing applied.  Then the parts go to the store through Api.write:
    its reply is owed until durable, 412 naming the first failed condition.
    The body counts in the memory cap meanwhile (a reservation, then the
    Owed's size, until durable); the parts, about as large, do not.  The
    store's own work cannot be sliced, the batch being atomic: queueing it
    (its record encoded under the store's lock) and applying it hold the
    loop about 1.5 us an operation, so --max-batch-ops (10,000 by default:
    15 ms) bounds that step.
    """

    def __init__(self, api, connection, request):
        self.api, self.connection, self.request = api, connection, request
        self.started = connection.started       # the request's first bytes (its latency)
        self.pos = self.line = 0                # where the parse is: byte offset, line number
        self.parts, self.conditions, self.lines = [], [], []    # Store.batch's; line numbers
        self.expiring = []                      # the parts with a ttl (a deadline to set)
        limits = api.server.limits              # the longest key and value: batch_operation
        self.max_key = limits.max_header_bytes - KEY_HEAD_ROOM
        self.max_value = limits.max_value_bytes
        self.max_line = self.max_key + (self.max_value + 2) // 3 * 4 + LINE_ROOM    # base64
        self.max_ops = limits.max_batch_ops

    def start(self):
        self.connection.busy = True
        server = self.api.server
        server.reserved += len(self.request.body)     # in memory already: no refusal
        server.batches.append(self)
        if len(server.batches) == 1:
            server.loop.call_soon(self.step)

    def next(self):
        """This job is done with the loop: the next batch's turn."""
        server = self.api.server
        server.batches.popleft()
        if server.batches:
            server.loop.call_soon(server.batches[0].step)

    def step(self):
        """A loop turn's share: parse some lines; once all are, hand the batch to the store."""
        if self.connection.closed:              # the client has gone: nobody to answer
            self.api.server.release(len(self.request.body))
            return self.next()
        self.connection.started = self.started  # busy, its request is this one (its latency)
        try:
            if not self.parse_some():
                self.api.server.loop.call_soon(self.step)
                return
            reply = self.apply()
        except RequestError as e:
            reply = e.reply()
            if e.close:
                self.connection.close_after = True
        except Exception as e:
            # A bug of ours: reported as asyncio reports one, answered 500,
            # and the next batch's turn all the same: a job that never
            # finished would hold up every batch after it.
            self.api.server.loop.call_exception_handler(
                {"message": "POST /batch failed", "exception": e})
            reply = RequestError(500, "internal error").reply()
            self.connection.close_after = True
        self.finish(reply)

    def parse_some(self):
        """Parse the next lines, within a turn's share; True once every line is parsed.

        Blank lines are skipped by a regular expression (C's speed: a body
        of newlines costs what one of JSON would, not a Python step a
        byte); a line longer than a key and a value may make it is refused
        before it is parsed.
        """
        body, pos = self.request.body, self.pos
        end = len(body)
        stop = min(end, pos + BATCH_BYTES_PER_TURN)
        for _ in range(BATCH_LINES_PER_TURN):
            if pos >= stop:
                break
            blank = BLANK.match(body, pos, stop).end()
            self.line += body.count(b"\n", pos, blank)
            pos = blank
            if pos >= stop:
                break
            self.line += 1
            if len(self.parts) == self.max_ops:
                raise RequestError(413, "line %d: a batch holds at most %d operations "
                                        "(--max-batch-ops); send the rest in another batch"
                                   % (self.line, self.max_ops))
            newline = body.find(b"\n", pos, pos + self.max_line + 1)
            if newline < 0 and end - pos > self.max_line:
                raise RequestError(400, "line %d: longer than a key and a value within their "
                                        "limits make a line" % self.line)
            newline = end if newline < 0 else newline
            line, pos = body[pos:newline], newline + 1
            try:
                part, condition = batch_operation(line, self.max_key, self.max_value)
            except RequestError as e:
                raise RequestError(400, "line %d: %s" % (self.line, e.message))
            if part[3] is not None:
                self.expiring.append(len(self.parts))
            self.parts.append(part)
            self.conditions.append(condition)
            self.lines.append(self.line)
        self.pos = pos
        return pos >= end

    def apply(self):
        """The parsed batch to the store, as one mutation: PENDING (owed), or a reply now."""
        if not self.parts:                      # nothing to make durable
            return 200, self.answer(self.api.store.revision)[0], (), JSON_TYPE
        return self.api.write(self.request, self.connection, self.queue, answer=self.answer)

    def queue(self, on_durable):
        """Store.batch, each ttl made a deadline now: a large batch may have taken seconds
        to parse, and a ttl counts from the write."""
        now, parts = now_ms(), self.parts
        for index in self.expiring:
            op, key, value, ttl = parts[index]
            parts[index] = op, key, value, now + 1000 * ttl
        try:
            return self.api.store.batch(parts, self.conditions, on_durable)
        except ConditionFailed as e:
            raise RequestError(412, "precondition failed on line %d" % self.lines[e.index])

    def answer(self, revision):
        """The 200's body and type, given the batch's revision."""
        return (b'{"revision": %d, "applied": %d}\n' % (revision, len(self.parts)), JSON_TYPE)

    def finish(self, reply):
        """The connection is ours no more: the reply (or its place), and its next requests."""
        self.next()
        connection = self.connection
        connection.busy = False
        self.api.server.release(len(self.request.body))        # the Owed's size counts it now
        if reply is not PENDING:
            connection.send(self.request, *reply)
        connection.since = connection.started = time.monotonic()
        connection.advance()


# ------------------------------------------------------------ connections --
#
# asyncio does the socket work: its event loop says when a socket is
# readable, its transport reads (data_received), buffers what we write and
# tells us when that buffer is too full (pause_writing) or has drained
# (resume_writing).  A Connection turns bytes into requests (http11), asks
# the Api for each reply, and writes the replies back in request order.
# Nothing here blocks, and nothing here touches a socket.

REQUESTS_PER_TURN = 8       # then the other connections' turn: a pipeline cannot hog the loop
MAX_OWED = 1024             # replies a connection may have waiting; then it reads no more
PIPELINE_BYTES = 65536      # unserved input past which a connection reads no more for now
HEAD_SOFT_BYTES = 8192      # over the memory cap, a head larger than this is refused
LINGER_SECONDS = 2.0        # after an error that closes: how long unread input is drained
LARGE_REPLY = 65536         # a reply this large may be refused (503) over the memory cap


class Owed:
    """A write's place in its connection's replies, until the journal says it is durable."""

    __slots__ = ("connection", "request", "size", "etag", "revision", "reply", "started", "body",
                 "content_type")

    def __init__(self, connection, request, size, etag):
        self.connection, self.request, self.size, self.etag = connection, request, size, etag
        self.revision = None        # the store's revision once the write is applied
        self.reply, self.started = None, connection.started
        self.body, self.content_type = b"", http11.TEXT_PLAIN     # its 200's (Api.write)

    def durable(self, error):
        """The journal, on the loop: the write is durable (error None), or will never be."""
        self.connection.written(self, error)

    def answer(self, error):
        """(status, body, headers, content type) of its reply: 200 with the ETag, or why not."""
        if error:
            status, message = storage_error(error)
            revision = self.connection.server.store.revision    # it was never applied
            return (status, message.encode() + b"\n", (("KV-Revision", str(revision)),) + NO_STORE,
                    http11.TEXT_PLAIN)
        headers = (("KV-Revision", str(self.revision)),) + NO_STORE
        if self.etag is not None:
            headers = (("ETag", self.etag),) + headers
        return 200, self.body, headers, self.content_type


class Replies(collections.deque):
    """A connection's replies in request order: ready ones (bytes), and writes owed (Owed).

    A deque, so that len() and truth, asked a few times per request, cost
    no Python call; beside it, the writes still owed and their bodies' bytes.
    """

    __slots__ = ("owed", "owed_bytes")

    def __init__(self):
        super().__init__()
        self.owed = 0               # writes not yet durable
        self.owed_bytes = 0         # their bodies

    add = collections.deque.append

    def owe(self, owed):
        self.append(owed)
        self.owed += 1
        self.owed_bytes += owed.size

    def settle(self, owed, reply):
        """A write's verdict has come: `reply` takes its place."""
        owed.reply = reply
        self.owed -= 1
        self.owed_bytes -= owed.size

    def first_is(self, owed):
        return self[0] is owed

    def take_ready(self):
        """The replies ready at the front, in order: up to the first write still owed."""
        out = []
        while self:
            reply = self[0]
            if type(reply) is not bytes:    # a write owed, or a watch held
                if reply.reply is None:
                    break
                reply = reply.reply
            out.append(reply)
            self.popleft()
        return out


class Connection(asyncio.Protocol):
    """One client connection: bytes to requests to replies, in order, within its limits.

    A turn (advance) serves the whole requests the parser has, at most
    REQUESTS_PER_TURN of them; a connection with more waits for the next
    turn behind everyone else (call_soon), and reads no more meanwhile
    (pause_reading): a pipelining client shares the loop with the others.
    Writes do not stop the turn: each is handed to the store, which queues
    it for the journal's next round, and its place in `queue` waits for
    the journal; the requests pipelined behind it go on, so that they join
    the same round.  A read pipelined behind this connection's own writes
    waits for them (`waiting`), so that it sees them, as the client expects.
    """

    def __init__(self, server):
        self.server, self.api, limits = server, server.api, server.limits
        self.parser = http11.RequestParser(limits.max_header_bytes, body_limit=self.api.body_limit)
        self.transport, self.client = None, "-"
        self.queue = Replies()
        self.held = 0                       # bytes counted in server.inflight
        self.reserved = 0                   # body bytes reserved against the memory cap
        self.checked = None                 # the request whose head was checked
        self.waiting = None                 # a read that waits for this connection's writes
        self.busy = False                   # a backup is being streamed into it
        self.close_after = False            # close once every reply is out
        self.turn_due = False               # a turn is scheduled (call_soon)
        self.flush_due = False              # its replies go out at the turn's end (flush_soon)
        self.lingering = self.write_paused = self.closed = self.timed_out = self.idle = False
        self.reading = True
        self.now = server.now()             # this turn's time (data_received, take_turn)
        self.since = self.now               # when the current state began (its deadline)
        self.started = self.now             # when the current request began (its latency)
        self.drained = None                 # a future a backup waits on while write_paused

    # -- asyncio's calls ----------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else "-"
        if not self.server.admit(self):
            self.closed = True

    def data_received(self, data):
        if self.lingering:
            return                          # an error was sent: input is dropped
        self.now = now = time.monotonic()
        parser = self.parser
        if self.idle:                       # a new request begins: its head has a deadline
            self.idle, self.since, self.started = False, now, now
        elif parser.in_body:
            self.since = now                # a body must keep arriving
        parser.feed(data)
        if not self.server.room_for(self):
            return self.refuse(503, "server busy", (("Retry-After", "1"),), flush=True,
                               about=self.checked if parser.in_body else None)
        self.advance()

    def eof_received(self):
        """The client has sent all it will (a half-close): finish what it asked, then close.

        Its watches are answered now: a client that has left would hold them to their end."""
        self.close_after = True
        self.server.watches.finish_all(self)
        if self.lingering or not (self.queue or self.busy or self.waiting):
            self.advance()
            self.flush()                    # now: asyncio closes once what we wrote is out
            return False
        return True

    def pause_writing(self):
        self.write_paused, self.since = True, self.server.now()
        self.update_reading()

    def resume_writing(self):
        self.write_paused, self.since = False, self.server.now()
        if self.drained is not None:
            self.drained.set_result(None)
            self.drained = None
        self.advance()

    def connection_lost(self, exc):
        self.closed = True
        self.parser = None
        if self.drained is not None:
            self.drained.set_exception(ConnectionError("connection lost"))
            self.drained = None
        self.server.release(self.reserved)
        self.reserved = 0
        self.account()
        self.server.forget(self)

    # -- a turn ---------------------------------------------------------------

    def advance(self):
        """Serve the whole requests the parser has, within this turn's budget.

        What is ready goes out at the end of the loop's turn (Server.flush_soon)."""
        if self.closed:
            return
        try:
            self.serve_some()
        except http11.ProtocolError as e:
            self.refuse(e.status, e.message, about=e.request)
        except RequestError as e:           # refused from its head: the body is not read
            self.refuse(e.status, e.message, e.headers, about=self.checked)
        self.update_reading()               # now: before the loop looks for input again
        self.server.flush_soon(self)

    def serve_some(self):
        parser, queue, auth = self.parser, self.queue, self.api.auth_token
        for _ in range(REQUESTS_PER_TURN):
            if self.write_paused or self.busy or self.lingering or len(queue) >= MAX_OWED:
                return
            request = self.waiting
            if request is not None:         # a read waiting for this connection's writes
                if queue.owed:
                    return
                self.waiting = None
            else:
                if self.close_after and not parser.in_body:
                    return                  # no new request: only the one in flight
                request = parser.next_event()
                if request is NEED_DATA:
                    return
                if request is PAUSED:
                    return self.next_turn()
                if self.checked is not request:
                    self.checked = request
                    if (auth is not None or not request.complete) and not self.head(request):
                        continue            # answered from its head alone
                if not request.complete:
                    continue
                if queue.owed and request.method not in WRITE_METHODS:
                    self.waiting = request  # a read sees this connection's writes first
                    return
            self.serve(request)
        self.next_turn()

    def next_turn(self):
        """More to do, but the others first: back of the loop's queue, reading nothing meanwhile."""
        if not self.turn_due:
            self.turn_due = True
            self.server.loop.call_soon(self.take_turn)

    def take_turn(self):
        self.turn_due = False
        self.now = time.monotonic()
        self.advance()

    def head(self, request):
        """The head has come (maybe not the body): auth, then room for the body, 100 Continue.

        False if the request is answered already.  RequestError if it is
        refused with its body unread: the connection then closes.
        """
        try:
            self.api.check_head(request)
        except RequestError as e:
            if not request.complete:
                raise
            e.headers += self.api.revision_header(request)
            self.send(request, *e.reply())
            return False
        if request.complete:
            return True
        self.reserved = self.server.reserve_body(request, self.parser.buffered)
        self.since = self.now
        if request.expect_continue and not self.parser.body_started:
            self.queue.add(http11.CONTINUE)     # in order: after the replies before it
        return True

    def serve(self, request):
        """A whole request: its reply, now or (a write) once durable."""
        if self.reserved:
            self.server.release(self.reserved)
            self.reserved = 0
        try:
            reply = self.api.serve(request, self)
        except RequestError as e:
            reply = e.reply()
            if e.close:
                self.close_after = True
        if reply is not PENDING:
            self.send(request, *reply)
        # The next request's head (and latency) start here.
        self.since = self.started = self.now

    # -- replies ----------------------------------------------------------------

    def connection_value(self, request):
        """The Connection header of this request's reply; decides whether the connection closes."""
        if self.close_after or not request.keep_alive or self.server.draining:
            self.close_after = True
            return "close"
        return "keep-alive" if request.http_1_0 else None

    def send(self, request, status, body, headers=(), content_type=http11.TEXT_PLAIN):
        self.queue.add(self.render(request, status, body, headers, content_type))

    def render(self, request, status, body, headers=(), content_type=http11.TEXT_PLAIN,
               started=None):
        """A whole reply's bytes, counted as done: HEAD and 304 get the head without the body."""
        head_only = request.method == "HEAD" or status == 304
        if (len(body) > LARGE_REPLY and not head_only
                and self.server.inflight + len(body) > self.server.limits.max_inflight_bytes):
            status, body, headers = 503, b"server busy\n", (("Retry-After", "1"),)
            self.close_after = True
        if VALUE_CACHING not in headers:
            headers += NO_STORE
        self.server.request_done(self, request, status, len(body), started or self.started,
                                 self.now)
        return http11.response(status, body, headers, content_type,
                               self.connection_value(request), head_only)

    def queue_owed(self, owed):
        self.queue.owe(owed)
        self.server.handed(owed.size)

    def written(self, owed, error):
        """The journal's verdict on a write of ours: build its reply; send what is ready."""
        self.server.written(owed.size)
        if self.closed:
            return self.queue.settle(owed, None)
        status, body, headers, content_type = owed.answer(error)
        self.queue.settle(owed, http11.response(status, body, headers, content_type,
                                                self.connection_value(owed.request)))
        self.server.request_done(self, owed.request, status, len(body), owed.started)
        if not self.queue.owed and not self.turn_due:
            self.now = time.monotonic()
            self.advance()                  # its last write: its replies go out now
        elif self.queue.first_is(owed):
            self.next_turn()                # more to come in this round: together, next turn

    def refuse(self, status, message, headers=(), flush=False, about=None):
        """An error after which the stream is unusable: send it, drain input briefly, close.

        `about`: the request it answers, if its head was read (its KV-Revision)."""
        self.waiting = None
        headers += NO_STORE + self.api.revision_header(about)
        self.queue.add(http11.error_response(status, message, "close", headers))
        self.server.request_done(self, None, status, len(message) + 1, self.started)
        self.close_after = self.lingering = True
        self.since = self.server.now()
        if flush:
            self.flush()

    def flush(self):
        """Write the replies that are ready, in order; then decide about reading and closing."""
        self.flush_due = False
        queue = self.queue
        out = queue.take_ready()
        if out and not self.closed:
            # write(), not writelines(): on Python 3.12.1 writelines() never
            # pauses the protocol, so flow control (pause_writing) would not see it.
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self.closed:
            return
        if not queue and not self.busy and not self.waiting:
            if self.lingering:
                self.transport.write_eof()  # the client may still send: read and drop it
            elif self.close_after:
                self.transport.close()
                return
            elif not (self.idle or self.parser.buffered or self.parser.in_body):
                self.idle, self.since = True, self.now
        if not self.reading:                # replies gone: maybe room to read again
            self.update_reading()           # (the turn decided when to stop: advance)
        self.account()

    def update_reading(self):
        """Read more only when there is room for it: the transport's flow control, and ours."""
        want = self.lingering or not (
            self.write_paused or self.turn_due or self.close_after or self.waiting
            or len(self.queue) >= MAX_OWED
            or (self.parser.buffered > PIPELINE_BYTES and not self.parser.in_body))
        if want != self.reading and not self.closed:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def account(self):
        """Keep the server's count of the bytes this connection makes it hold."""
        held = self.queue.owed_bytes
        if not self.closed:
            held += self.parser.buffered + self.transport.get_write_buffer_size()
        if held != self.held:
            self.server.inflight += held - self.held
            self.held = held

    # -- deadlines and the end ----------------------------------------------------

    def drain(self):
        """The server is stopping: close now if no request is in flight, else after its reply."""
        if self.queue or self.busy or self.waiting or self.parser.in_body:
            self.close_after = True
        else:
            self.transport.close()


# ----------------------------------------------------------------- server --

SWEEP_INTERVAL = 1.0        # seconds between two looks for passed deadlines, at most
SWEEP_INTERVAL_MIN = 0.05   # ... and at least (Server.sweep_interval)
STALL_SECONDS = 3.0         # a write older than this waits on a stalled disk (/health: 503)
EXPIRY_INTERVAL = 0.025     # seconds between two looks for keys whose deadline passed
EXPIRE_PER_TURN = 250       # keys expired at a look at most: 10,000 a second
BACKLOG = 4096              # listen backlog: the kernel caps it at somaxconn
TOO_MANY = http11.error_response(503, "too many connections", "close",
                                 (("Retry-After", "1"),) + NO_STORE)


class Server:
    """What all connections share: their count, the memory they hold, deadlines, the drain.

    Runs on the loop's thread; the Connections call it.  Deadlines are
    checked by one periodic sweep rather than a timer per connection: a
    request then costs a float assignment, not a timer handle.
    """

    def __init__(self, loop, store, limits, metrics, auth_token=None, access_log=False):
        self.loop, self.store, self.limits, self.metrics = loop, store, limits, metrics
        self.api = Api(store, metrics, self, auth_token)
        self.access_log = access_log
        self.now = time.monotonic
        self.connections = set()
        self._to_flush = []         # connections whose replies go out at this turn's end
        self.draining = False
        self.inflight = 0           # bytes held for clients (Connection.account)
        self.reserved = 0           # bytes reserved for bodies being received
        self.journal_bytes = 0      # bodies of writes handed to the journal, not yet durable
        self._handed = collections.deque()  # when each of those writes was handed over
        self.connections_refused = 0
        self.requests_timed_out = 0
        self.stream_slots = {"snapshot": threading.BoundedSemaphore(SNAPSHOT_STREAMS),
                             "export": threading.BoundedSemaphore(EXPORT_STREAMS)}
        self.batches = collections.deque()  # BatchJobs: the first is parsed, the others wait
        self._logged = {}           # message kind -> when last logged
        self._emptied = asyncio.Event()
        self.on_fatal = None        # called once the store has failed for good
        self.watches = Watches(loop, limits.max_watchers)
        store.listen(self.watches.changed)
        self.sweep_every = self.sweep_interval(limits)
        loop.call_later(self.sweep_every, self.sweep)
        loop.call_later(EXPIRY_INTERVAL, self.expire)

    # -- connections --------------------------------------------------------

    def admit(self, connection):
        """A new connection: counted, or refused past --max-connections (a canned 503)."""
        if len(self.connections) >= self.limits.max_connections:
            self.connections_refused += 1
            self.log_at_most_once_a_second(
                "connections", "Refusing connections: %d open (--max-connections)"
                % len(self.connections))
            connection.transport.write(TOO_MANY)
            connection.transport.close()
            return False
        self.connections.add(connection)
        if self.draining:
            connection.drain()
        return True

    def forget(self, connection):
        self.connections.discard(connection)
        if connection in self.watches.by_connection:
            self.watches.forget(connection)
        if not self.connections:
            self._emptied.set()

    def flush_soon(self, connection):
        """Write `connection`'s ready replies once this turn of the loop has served the others.

        As Redis does before it sleeps: the replies of a turn go out back to
        back, after every connection's requests were served, instead of one
        at a time between them.  A client then finds several replies each
        time it wakes up rather than being woken once per reply: on the
        2-CPU VM, GET at 64 connections went from 0.33x to 0.51x the asyncio
        reference's throughput (bench/README.md).
        """
        if connection.flush_due:
            return
        connection.flush_due = True
        if not self._to_flush:
            self.loop.call_soon(self._flush_all)
        self._to_flush.append(connection)

    def _flush_all(self):
        connections, self._to_flush = self._to_flush, []
        for connection in connections:
            try:
                connection.flush()
            except Exception as e:          # a bug: that connection ends, the others go on
                self.loop.call_exception_handler({
                    "message": "Unexpected error writing replies", "exception": e,
                    "protocol": connection})
                if connection.transport is not None:
                    connection.transport.abort()

    def log_at_most_once_a_second(self, kind, message):
        now = self.now()
        if now - self._logged.get(kind, -2.0) >= 1.0:
            self._logged[kind] = now
            log(message)

    def request_done(self, connection, request, status, size, started, now=None):
        """Count a reply in the metrics, and log it with --access-log (never a value).

        `request` is None for one that could not be parsed; `size` is the
        reply body's length, `started` when the request's first bytes came,
        `now` when the reply goes out (this loop turn's time).
        """
        seconds = (now or self.now()) - started
        if request is None:
            self.metrics.request_done("other", "", status, seconds)
        else:
            self.metrics.request_done(request.method, request.path, status, seconds)
        if self.access_log:
            log_access(connection.client, request and request.method, request and request.target,
                       status, size, seconds)

    # -- memory ---------------------------------------------------------------

    def reserve(self, size):
        """Room for a body of `size` bytes, or False.

        Large bodies may reserve three quarters of --max-inflight-bytes; small
        ones (SMALL_BODY) all of it, so that slow large uploads cannot keep
        small writes out.
        """
        cap = self.limits.max_inflight_bytes
        if size > SMALL_BODY:
            cap -= cap // 4
        if self.reserved + size > cap:
            return False
        self.reserved += size
        return True

    def reserve_body(self, request, buffered):
        """Room for a request's body (chunked: as much as has come); its size, or a 503."""
        size = request.content_length if not request.chunked else max(buffered, 1)
        if not self.reserve(size):
            raise busy()
        return size

    def room_for(self, connection):
        """False if what `connection` now holds passes the memory cap.

        A chunked body's size shows as it comes: its reservation grows with
        it.  A head is not a body, but over the cap one past HEAD_SOFT_BYTES
        is refused: 16,384 connections of 64 KiB heads are 1 GiB.
        """
        parser = connection.parser
        if parser.in_body:
            grow = parser.buffered - connection.reserved if connection.checked.chunked else 0
            if grow > 0:
                if not self.reserve(grow):
                    return False
                connection.reserved += grow
            return True
        return not (parser.buffered > HEAD_SOFT_BYTES and parser.in_head and self.over_cap())

    def release(self, size):
        self.reserved -= size

    def over_cap(self):
        return self.inflight + self.reserved > self.limits.max_inflight_bytes

    def journal_has_room(self, size):
        return self.journal_bytes + size <= self.limits.max_journal_bytes or not self._handed

    def handed(self, size):
        """A write handed to the journal; its reply waits until it is durable (written)."""
        self.journal_bytes += size
        self._handed.append(self.now())

    def written(self, size):
        self.journal_bytes -= size
        self._handed.popleft()      # the journal finishes writes in the order it took them

    def journal_stalled(self):
        """Why writes cannot be served now, if the disk has stalled; else None."""
        if self._handed and self.now() - self._handed[0] > STALL_SECONDS:
            return "journal stalled: a write has waited %d s for the disk" % (
                self.now() - self._handed[0])
        return None

    # -- deadlines and the end -----------------------------------------------------

    @staticmethod
    def sweep_interval(limits):
        """Seconds between two sweeps: a deadline is passed by up to that much.

        Once a second suits the default timeouts (10 s and more).  A shorter
        one (a test's half second, say) is swept at a tenth of itself, so
        that it stays exact to a tenth, but never more often than every
        SWEEP_INTERVAL_MIN: a sweep looks at every connection.
        """
        shortest = min(limits.header_timeout, limits.body_timeout, limits.send_timeout,
                       limits.idle_timeout)
        return min(SWEEP_INTERVAL, max(SWEEP_INTERVAL_MIN, shortest / 10))

    def sweep(self):
        """Every sweep_every s: connections past their deadline, and a store failed for good."""
        now = self.now()
        for connection in list(self.connections):
            deadline = self.deadline(connection)
            if deadline is not None and deadline <= now:
                self.time_out(connection)
        if self.store.fatal.is_set() and self.on_fatal is not None:
            on_fatal, self.on_fatal = self.on_fatal, None
            on_fatal()
        self.loop.call_later(self.sweep_every, self.sweep)

    def expire(self):
        """Every EXPIRY_INTERVAL: journal the expiry of keys whose deadline passed.

        At most EXPIRE_PER_TURN keys each time.  Reads hide an expired key
        at once, so only its memory (and a watch on it) waits: when many
        expire together, the rate is capped rather than the others' latency
        (catching up at every loop turn took PUT p99 at 64 connections from
        5 to 12 ms while 100,000 keys expired).
        """
        self.store.expire_due(EXPIRE_PER_TURN)
        self.loop.call_later(EXPIRY_INTERVAL, self.expire)

    def time_out(self, connection):
        """A connection's deadline passed: 408 if a request is half received, and close."""
        connection.timed_out = True
        transport = connection.transport
        half = not (connection.lingering or connection.write_paused) and bool(
            connection.parser.in_body or connection.parser.buffered)
        if half or connection.write_paused:
            self.requests_timed_out += 1        # not an idle connection
        if half:
            about = connection.checked if connection.parser.in_body else None
            transport.write(http11.error_response(
                408, "request timeout", "close", NO_STORE + self.api.revision_header(about)))
            self.request_done(connection, None, 408, 16, connection.started)
            transport.close()
        else:
            transport.abort()               # idle, lingering, or not reading its replies

    def deadline(self, connection):
        """When a connection's wait on its client ends; None while it waits on us."""
        limits = self.limits
        if connection.lingering:
            return connection.since + LINGER_SECONDS
        if connection.write_paused:
            return connection.since + limits.send_timeout
        if connection.queue or connection.busy or connection.waiting:
            return None                     # a write in the journal, a backup being made
        if connection.parser.in_body:
            return connection.since + limits.body_timeout
        return connection.since + (limits.idle_timeout if connection.idle
                                   else limits.header_timeout)

    def drain(self):
        """Answer the watches; close idle connections now, the others after the reply in flight."""
        self.draining = True
        self.watches.stopping = True
        self.watches.finish_all()
        self._emptied.clear()       # set again by forget() when the last one has gone
        for connection in list(self.connections):
            connection.drain()
        if not self.connections:
            self._emptied.set()

    async def wait_closed(self, timeout):
        """Wait up to `timeout` s for every connection to close; returns how many are still open."""
        if not self.connections:
            return 0
        try:
            await asyncio.wait_for(self._emptied.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return len(self.connections)


# ------------------------------------------------------------------ watches --
#
# A watch is a GET held until its answer would change: a key's 304 or 404
# (?wait=S), or a listing with no change under its prefix since a revision
# (?wait=S&since=R).  It holds a place in its connection's replies, a
# timer, and no thread.  The store tells us of every round applied, so a
# watch is woken only by durable changes; it is answered then if its
# answer is now another, at its timer, or at once when the server stops.

WATCH_RETRY_AFTER = 1       # seconds, in the 503 past --max-watchers


class Watch:
    """One held request: where its reply goes, and how to compute it."""

    __slots__ = ("watches", "connection", "request", "answer", "status", "key", "prefix",
                 "timer", "started", "reply", "round")

    def __init__(self, watches, connection, request, answer, status, key, prefix):
        self.watches, self.connection, self.request = watches, connection, request
        self.answer, self.status, self.key, self.prefix = answer, status, key, prefix
        self.started, self.reply, self.timer = connection.started, None, None
        self.round = watches.rounds     # the rounds applied before it: none of them wakes it

    def changed(self):
        """A durable change to its key or under its prefix: answer if the answer is now another."""
        reply = self.compute()
        if self.key is None or reply[0] != self.status:
            self.finish(reply)

    def compute(self):
        try:
            return self.answer()
        except RequestError as e:
            return e.reply()

    def finish(self, reply=None):
        """Answer now (the timer, a change, the server stopping): the reply takes its place."""
        self.watches.drop(self)
        connection = self.connection
        if connection.closed:
            return
        connection.now = time.monotonic()
        self.reply = connection.render(self.request, *(reply or self.compute()),
                                       started=self.started)
        connection.advance()


WATCH_SHARE = 1 << 20       # bytes of keys sliced to find their watches in one loop step
WAKE_COST = 1 << 14         # what waking a watch counts for in that share (its answer)


class Watches:
    """The watches held, by key and by prefix; at most `limit` of them (--max-watchers).

    A changed key's watches are found by a lookup per prefix length watched,
    not per watch.  But each lookup slices the key: 10,000 prefixes of
    lengths up to 60,000 bytes made one changed key 300 MB of slices (0.2 s
    of the loop).  So a round's keys are matched a share (WATCH_SHARE) per
    loop step, in order (`matching`); a watch woken a few steps late answers
    with what the store holds then, which is at least the change.
    """

    def __init__(self, loop, limit):
        self.loop, self.limit = loop, limit
        self.by_key = {}            # key -> set of its watches
        self.by_prefix = {}         # prefix -> set of its watches
        self.by_connection = {}     # connection -> set of its watches
        self.prefix_lengths = collections.Counter()     # length -> prefixes watched of it
        self.held = set()
        self.stopping = False       # the server drains: no watch is held any more (hold)
        self.matching = collections.deque()     # rounds' matches under way (generators)
        self.rounds = 0                 # rounds of changes told so far (changed)

    def __len__(self):
        return len(self.held)

    def hold(self, connection, request, seconds, answer, status=None, key=None, prefix=None):
        """Hold `request` for up to `seconds`: its place in the replies is kept.  PENDING.

        A key's watch (`key`) is answered when answer() gives another status
        than `status`; a prefix's, at the first change under `prefix`.
        """
        if self.stopping:
            # Answered at once, as the drain answered the others: a request
            # served after it began (pipelined behind a write, or its body
            # still coming) was held to its end, and the stop waited the
            # whole --shutdown-timeout for it.
            return answer()
        if len(self.held) >= self.limit:
            raise busy("too many watches (--max-watchers)", WATCH_RETRY_AFTER)
        watch = Watch(self, connection, request, answer, status, key, prefix)
        self.held.add(watch)
        for table, name in self.tables(watch):
            if name not in table:
                table[name] = set()
                if table is self.by_prefix:
                    self.prefix_lengths[len(name)] += 1
            table[name].add(watch)
        watch.timer = self.loop.call_later(seconds, watch.finish)
        connection.queue.add(watch)
        return PENDING

    def tables(self, watch):
        """(table, entry) pairs that list `watch`."""
        if watch.key is not None:
            return (self.by_key, watch.key), (self.by_connection, watch.connection)
        return (self.by_prefix, watch.prefix), (self.by_connection, watch.connection)

    def drop(self, watch):
        if watch not in self.held:
            return
        self.held.discard(watch)
        watch.timer.cancel()
        for table, name in self.tables(watch):
            watchers = table[name]
            watchers.discard(watch)
            if not watchers:
                del table[name]
                if table is self.by_prefix:
                    self.prefix_lengths[len(name)] -= 1
                    if not self.prefix_lengths[len(name)]:
                        del self.prefix_lengths[len(name)]

    def changed(self, keys, everything):
        """The store, after a round is applied: wake the watches of what changed."""
        self.rounds += 1
        if not self.held:
            return
        round = self.rounds
        self.matching.append(self.wake_all(round) if everything else self.wake(keys, round))
        if len(self.matching) == 1:
            self.match_some()

    def match_some(self):
        """One share of the matching under way; the rest after the loop's other callbacks."""
        while self.matching:
            try:
                next(self.matching[0])
            except StopIteration:
                self.matching.popleft()
                continue
            self.loop.call_soon(self.match_some)
            return

    def wake(self, keys, round):
        """Wake the watches of `keys`, changed by `round`; a generator that pauses after each
        WATCH_SHARE."""
        lengths, spent = sorted(self.prefix_lengths), 0
        by_key, by_prefix = self.by_key, self.by_prefix
        for key in keys:
            if not self.held:
                return
            woken = list(by_key.get(key, ()))
            for length in lengths:
                if length > len(key):
                    break
                woken += by_prefix.get(key[:length], ())
                spent += length
                if spent >= WATCH_SHARE:
                    spent = self.answer(woken, round)
                    woken = []
                    yield
            spent += self.answer(woken, round)
            if spent >= WATCH_SHARE:
                spent = 0
                yield

    def wake_all(self, round):
        """Wake every watch (`round` was a CLEAR); a generator that pauses after each
        WATCH_SHARE."""
        spent = 0
        for watch in list(self.held):
            spent += self.answer([watch], round)
            if spent >= WATCH_SHARE:
                spent = 0
                yield

    def answer(self, woken, round):
        """Tell the `woken` watches of a change made by `round`; what that counts for in a
        share.  A watch held since that round began is left alone: it counts from later."""
        for watch in woken:
            if watch.round < round and watch in self.held:
                watch.changed()
        return len(woken) * WAKE_COST

    def forget(self, connection):
        """A connection closed: its watches go with it."""
        for watch in list(self.by_connection.get(connection, ())):
            self.drop(watch)

    def finish_all(self, connection=None):
        """Answer every watch (of `connection`) now, as a GET would: the server is stopping,
        or the client has half-closed."""
        for watch in list(self.held if connection is None
                          else self.by_connection.get(connection, ())):
            watch.finish()


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


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file, never the token."""


def read_auth_token(path):
    """The token in the file at `path`: its content without surrounding whitespace, as bytes.

    Raises TokenFileError, in one line that names the file and never shows
    the token: at start that is bad usage (exit 2, parse_args), on a reload
    a reason to keep the current token (reload_auth_token).
    """
    try:
        with open(path, "rb") as f:
            token = f.read(MAX_TOKEN_BYTES + 1).strip()
    except OSError as e:
        raise TokenFileError("cannot read %s: %s" % (path, e.strerror or e))
    if not token:
        raise TokenFileError("%s holds no token (it is empty)" % path)
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenFileError("%s is longer than %d bytes" % (path, MAX_TOKEN_BYTES))
    if not all(0x21 <= byte <= 0x7e for byte in token):
        raise TokenFileError("%s: the token must be one word of printable ASCII" % path)
    return token


def token_file_exposure(path):
    """Why the token file at `path` is open to more users than its owner, or None.

    Not refused: a file shared with a group can be deliberate, and a
    refusal at a reload would be worse than a warning.  But a token that
    other accounts of the host can read is a token they have.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None                         # read_auth_token reports it
    if not mode & 0o066:
        return None
    return ("token file %s can be read or changed by users other than its owner "
            "(mode %04o): chmod 600 %s" % (path, mode & 0o7777, path))


def reload_auth_token(server, path):
    """Read the token file `path` again (SIGHUP) and put its token in `server.auth_token`.

    A file that cannot be used now (missing, empty, unreadable) keeps the
    current token, and the line logged says why: a rotation that went wrong
    must not lock every client out, nor open the server to all.  Without a
    token file at start there is nothing to read: auth is not switched on
    by a signal.  One line is logged either way.  Returns True if the token
    was read.
    """
    if path is None:
        log("No --auth-token-file: there is no token to reload")
        return False
    try:
        token = read_auth_token(path)
    except TokenFileError as e:
        warn("Keeping the current token: %s" % e)
        return False
    changed = not hmac.compare_digest(token, server.auth_token or b"")
    server.auth_token = token               # one assignment: check_auth sees old or new
    log("Reloaded the token from %s (%s)" % (path, "changed" if changed else "unchanged"))
    exposure = token_file_exposure(path)
    if exposure:
        warn(exposure)
    return True


def check_auth(token, request):
    """Raise a 401 unless the request may go on: no token is set, the path is open, or it has the token."""
    if token is None or request.method in OPEN_TO_ALL.get(request.path, ()):
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long whatever the bytes: no timing tells how
    # much of a guess was right.
    if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip(" ").encode("latin-1"), token):
        return
    # A body left unread makes the connection close (Connection.head).
    raise RequestError(401, "unauthorized", headers=UNAUTHORIZED_HEADERS)


def warn_if_exposed(host, auth_token, token_file=None):
    """At start: a warning line for each way the server is more open than it looks.

    No token on an address beyond loopback; a token file (`token_file`, the
    --auth-token-file path) that other users of the host can read.
    """
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if auth_token is None and not loopback:
        warn("listening on %s without --auth-token-file: anyone who can reach "
             "this port can read, change and delete every key" % host)
    exposure = token_file and token_file_exposure(token_file)
    if exposure:
        warn(exposure)


# ------------------------------------------------------------------ metrics --
#
# GET /metrics: the Prometheus text format, version 0.0.4.  Requests are
# counted as their reply goes out (Metrics.request_done: a lookup, a bisect,
# two increments); everything else is read at scrape time from where it
# already lives: the Store, its Journal, the KVServer, /proc/self.  Besides
# the kvstore_ families, the process_ ones that Prometheus's own client
# libraries export under these very names, so that the usual dashboards and
# alerts (memory, file descriptors, restarts, CPU) work unchanged.

METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
METHOD_LABELS = ("GET", "HEAD", "PUT", "DELETE", "POST", "other")  # any other is "other"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 10.0)       # seconds; a reply waits for its fsync, a few ms on SSD
# The route label of the latency histogram: what a request asked for, in a
# bounded set (a label per key would be a series per key).
ROUTES = ("key", "listing", "health", "metrics", "snapshot", "export", "batch", "other")
ROUTE_OF_PATH = {"/kv": "listing", "/health": "health", "/metrics": "metrics",
                 "/snapshot": "snapshot", "/export": "export", "/batch": "batch"}


class Metrics:
    """The counters of requests served, and the rendering of /metrics.

    Latency is from the request's first bytes to the reply's hand-over to
    the kernel (for a write: after its fsync).
    """

    def __init__(self):
        self._lock = threading.Lock()   # guards adding to _rows, and reading it whole
        # (method label, route, status) -> [seconds in all, then a count per
        # latency bucket, the last one +Inf]: the request counters and the
        # histogram in one row, so that a request costs one lookup.
        self._rows = {}

    def request_done(self, method, path, status, seconds):
        """Count a request whose reply went out.

        `method` is the request's (any other than METHOD_LABELS counts as
        "other"), `path` its path without the query (its route: /kv/a is
        "key", see ROUTES), `status` the reply's code, `seconds` the time
        from the request's first bytes to the reply's hand-over to the kernel.

        No lock, although the worker and the snapshot stream both count:
        since Python 3.10 a thread lets the GIL go only at a call or a
        backward jump, so `row[i] += 1` is never cut in two, and no
        increment is lost (on 3.9 some are).  A
        lost one could make a counter go backwards between two scrapes,
        which Prometheus would read as a restart.  The lock cost a third
        of this method.
        """
        route = "key" if path.startswith("/kv/") else ROUTE_OF_PATH.get(path, "other")
        row = self._rows.get((method, route, status))
        if row is None:
            row = self._new_row(method, route, status)
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds) + 1    # le is inclusive
        row[0] += seconds
        row[bucket] += 1

    def _new_row(self, method, route, status):
        if method not in METHOD_LABELS:
            method = "other"            # rare, and bounded: each costs the lock once more
        if route not in ROUTES:
            route = "other"
        with self._lock:
            return self._rows.setdefault((method, route, status),
                                         [0.0] + [0] * (len(LATENCY_BUCKETS) + 1))

    def _requests(self):
        """({(method, code): count}, {(route, method): histogram row}) of the requests so far."""
        requests, latency = {}, {}
        with self._lock:
            for (method, route, status), row in self._rows.items():
                row = row[:]            # one read of it (a copy is one step)
                requests[method, status] = requests.get((method, status), 0) + sum(row[1:])
                total = latency.get((route, method))
                latency[route, method] = row if total is None else [
                    a + b for a, b in zip(total, row)]
        return requests, latency

    def render(self, server):
        """The text of /metrics, as bytes."""
        out = []
        requests, latency = self._requests()
        family(out, "kvstore_requests_total", "counter",
               "Requests answered, by method and status code.",
               [("", (("method", m), ("code", c)), n) for (m, c), n in sorted(requests.items())])
        # By route and method: a key's GET and its PUT, which waits for an
        # fsync, differ tenfold; /snapshot and /metrics mix with neither.
        samples = []
        for (route, method), (seconds, *counts) in sorted(latency.items()):
            labels, total = (("route", route), ("method", method)), 0
            for le, count in zip(LATENCY_BUCKETS + ("+Inf",), counts):
                total += count
                samples.append(("_bucket", labels + (("le", le),), total))
            samples.append(("_sum", labels, repr(seconds)))
            samples.append(("_count", labels, total))
        family(out, "kvstore_request_duration_seconds", "histogram",
               "Time from a request's first bytes to its reply (a write's, after its fsync), "
               "by route and method.", samples)
        single(out, "kvstore_connections", "gauge", "Client connections open now.",
               len(server.connections))
        single(out, "kvstore_connections_refused_total", "counter", "Connections refused at the "
               "cap (--max-connections).", server.connections_refused)
        single(out, "kvstore_requests_timed_out_total", "counter", "Requests cut off at a "
               "deadline (a client too slow to send or to read).", server.requests_timed_out)
        single(out, "kvstore_watches", "gauge", "Requests held by ?wait= now (watches).",
               len(server.watches))
        store_metrics(out, server.store)
        family(out, "kvstore_build_info", "gauge", "Always 1; the labels say which kvstore and "
               "which Python this is.", [("", (("version", __version__),
                                               ("python", sys.version.split()[0])), 1)])
        process_metrics(out)
        return "".join(out).encode("utf-8")


def family(out, name, kind, text, samples):
    """Append a metric family to `out`: HELP and TYPE, then each (suffix, labels, value)."""
    out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, text, name, kind))
    for suffix, labels, value in samples:
        label_text = ",".join('%s="%s"' % pair for pair in labels)
        out.append("%s%s%s %s\n" % (name, suffix, "{%s}" % label_text if labels else "", value))


def single(out, name, kind, text, value):
    """Append a metric family of one sample without labels."""
    family(out, name, kind, text, [("", (), value)])


def store_metrics(out, store):
    """The store's and its journal's families, read from where they live."""
    journal = store.journal
    single(out, "kvstore_keys", "gauge", "Keys in the store.", len(store))
    single(out, "kvstore_value_bytes", "gauge", "Bytes of all values in the store.",
           store.value_bytes)
    single(out, "kvstore_keys_expiring", "gauge", "Keys that have a ttl (expired ones until "
           "their expiry is journaled).", store.expiring)
    single(out, "kvstore_keys_expired_total", "counter", "Keys expired since start.",
           store.expired)
    single(out, "kvstore_revision", "gauge", "The store's revision: mutations applied since "
           "it began.", store.revision)
    single(out, "kvstore_storage_writable", "gauge", "1 if writes can be served, 0 if the "
           "storage refuses them (see /health).", 0 if store.write_problem() else 1)
    single(out, "kvstore_journal_bytes", "gauge", "Bytes in the current journal file (a "
           "checkpoint starts a new one).", journal.size)
    single(out, "kvstore_journal_records_total", "counter", "Records appended to the journal.",
           journal.records)
    single(out, "kvstore_journal_fsyncs_total", "counter", "Journal fsyncs (each may cover "
           "many writes).", journal.fsyncs)
    single(out, "kvstore_journal_fsync_seconds_total", "counter", "Seconds spent in journal "
           "rounds that fsynced (their write and their fsync).", repr(journal.fsync_seconds))
    samples, total = [], 0
    for le, count in zip(journal.FSYNC_BUCKETS + ("+Inf",), journal.fsync_histogram):
        total += count
        samples.append(("_bucket", (("le", le),), total))
    samples += [("_sum", (), repr(journal.fsync_seconds)), ("_count", (), total)]
    family(out, "kvstore_journal_fsync_duration_seconds", "histogram", "Journal fsyncs by "
           "how long their round took to write and fsync, as the writer timed it.", samples)
    single(out, "kvstore_checkpoints_total", "counter", "Checkpoints written (snapshot, new "
           "journal).", store.checkpointer.done)
    single(out, "kvstore_checkpoint_failures_total", "counter", "Checkpoints that failed (the "
           "journal was kept).", store.checkpointer.failures)
    single(out, "kvstore_last_checkpoint_timestamp_seconds", "gauge", "When the snapshot was "
           "last written (a checkpoint or a clean stop), in Unix time; 0 if never.",
           repr(last_checkpoint_time(store)))


def last_checkpoint_time(store):
    """The Unix time of the last snapshot written: this run's, else the file's, else 0.0."""
    if store.last_checkpoint_time is not None:
        return store.last_checkpoint_time
    try:
        return os.stat(persistence.snapshot_path(store.directory)).st_mtime
    except OSError:
        return 0.0                      # no snapshot yet: a store that was never saved


_process_start_time = None      # process_start_time_seconds: read once, it cannot change


def process_metrics(out):
    """The standard process_ families, read from /proc/self; none where there is no /proc.

    CPU counts this process only: the journal's writer and a checkpoint's
    child are processes of their own.
    """
    global _process_start_time
    try:
        with open("/proc/self/stat", "rb") as f:
            # Fields after the command name, which is in parentheses and
            # may hold anything, spaces and parentheses included.
            fields = f.read().rpartition(b")")[2].split()
        open_fds = len(os.listdir("/proc/self/fd"))
        if _process_start_time is None:
            _process_start_time = boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return
    cpu = os.times()
    single(out, "process_cpu_seconds_total", "counter", "User and system CPU time spent, in "
           "seconds.", repr(round(cpu.user + cpu.system, 2)))     # counted in clock ticks
    single(out, "process_open_fds", "gauge", "Open file descriptors.", open_fds)
    single(out, "process_max_fds", "gauge", "The limit of open file descriptors.",
           resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    single(out, "process_resident_memory_bytes", "gauge", "Resident memory size, in bytes.",
           int(fields[21]) * os.sysconf("SC_PAGE_SIZE"))
    single(out, "process_virtual_memory_bytes", "gauge", "Virtual memory size, in bytes.",
           int(fields[20]))
    single(out, "process_start_time_seconds", "gauge", "When the process started, in Unix "
           "time.", repr(round(_process_start_time, 2)))


def boot_time():
    """When the machine booted, in Unix time (/proc/stat's btime): start times count from it."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return int(line.split()[1])
    raise ValueError("no btime in /proc/stat")


# ------------------------------------------------------------------- backup --
#
# GET /snapshot: the whole store at one instant, in the snapshot file's
# format (the dict pickled with protocol 5), streamed: the backup that
# `cp` of the data directory is not (a copy made during a checkpoint can
# pair an old snapshot with a newer journal).  Restoring is putting the
# file as store.pickle in an empty data directory and starting there.

SNAPSHOT_STREAMS = 1        # snapshots sent at once; more get 503 with Retry-After
EXPORT_STREAMS = 1          # exports sent at once, likewise (each holds a copy of the dict too)
SNAPSHOT_RETRY_AFTER = 5    # seconds, in that 503


class SnapshotStream:
    """One GET /snapshot, pickled by a thread of its own into the connection.

    Pickling a large store takes seconds of CPU: on the loop it would stall
    every client, so a thread does it (at most SNAPSHOT_STREAMS at once:
    each holds a copy of the dict, its references if not its values).  The
    thread copies the dict (Store.copy), then pickle.dump writes frames of
    about 64 KiB, each sent as an HTTP chunk through the loop
    (SnapshotStream.send_parts), which waits while the transport's buffer is
    full: the pickle is never whole in memory, and a client that takes
    nothing for --send-timeout is cut off by the sweep.  Chunks also let a
    client tell a cut-off backup from a whole one (an HTTP/1.0 client,
    which cannot have them, gets the bytes until the connection closes).
    The connection reads no later request until the stream is done (busy).
    ExportStream is the same stream with other bytes in it.
    """

    KIND = "snapshot"       # its slots (Server.stream_slots), its thread, its log lines
    BUSY = "a snapshot is already being sent; retry later"     # the 503 past its slots
    HEAD = (b"Content-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="store.pickle"\r\n')

    def __init__(self, server, connection, request):
        self.server, self.connection, self.request = server, connection, request
        self.chunked = not request.http_1_0
        self.size = 0

    @classmethod
    def start(cls, server, connection, request, *args):
        """Take a slot and start the thread; a 503 if no slot is free."""
        if not server.stream_slots[cls.KIND].acquire(blocking=False):
            raise RequestError(503, cls.BUSY,
                               headers=(("Retry-After", str(SNAPSHOT_RETRY_AFTER)),))
        connection.busy = True
        # The replies before it out first: the thread writes to the transport
        # itself, and the turn's flush (Server.flush_soon) might come after.
        connection.flush()
        stream = cls(server, connection, request, *args)
        threading.Thread(target=stream.run, name=cls.KIND, daemon=True).start()

    def run(self):
        whole, error = False, None
        try:
            connection = "keep-alive" if self.chunked and self.request.keep_alive else "close"
            self.send([b"HTTP/1.1 200 OK\r\n", self.HEAD,
                       b"Cache-Control: no-store\r\n",          # a copy of the data: no cache
                       b"Transfer-Encoding: chunked\r\n" if self.chunked else b"",
                       http11.date_header().encode(), b"Connection: %s\r\n\r\n" % connection.encode()])
            self.body()
            whole = True
        except Exception as e:              # the client gone or too slow, mostly
            error = e
        finally:
            # Before the last chunk: a client that has read it may ask again.
            self.server.stream_slots[self.KIND].release()
        self.server.loop.call_soon_threadsafe(self.done, whole, error)

    def body(self):
        """The thread: the store as it is now, written to self (write) as it is made."""
        data, ledger = self.server.store.copy()
        persistence.dump_snapshot(data, self, ledger)   # the pickles, then their checksum

    def done(self, whole, error):
        """On the loop: the last chunk, the request counted, the connection given back.

        In one loop step: a client that has read the last chunk finds the
        request counted in its next scrape, on whichever connection.
        """
        connection = self.connection
        if whole and self.chunked:
            if connection.closed:
                whole, error = False, ConnectionError("the client has gone")
            else:
                connection.transport.write(http11.LAST_CHUNK)
        if whole:
            self.server.request_done(connection, self.request, 200, self.size,
                                     connection.started)
        else:
            log("%s to %s cut off after %d bytes: %s"
                % (self.KIND.capitalize(), connection.client, self.size,
                   "nothing taken for %g s (--send-timeout)" % self.server.limits.send_timeout
                   if connection.timed_out else error))
        connection.busy = False
        if not (whole and self.chunked and self.request.keep_alive):
            connection.close_after = True
        connection.since = connection.started = time.monotonic()
        connection.advance()

    async def send_parts(self, parts):
        """On the loop: write parts of the reply, then wait until the transport has room."""
        connection = self.connection
        if not connection.closed:
            connection.transport.write(b"".join(parts))     # not writelines(): see flush()
        await self.room()

    def room(self):
        """A future done once the transport has room for more, failed if the client has gone."""
        connection = self.connection
        future = self.server.loop.create_future()
        if connection.closed:
            future.set_exception(ConnectionError("the client has gone"))
        elif connection.write_paused:
            connection.drained = future     # its resume_writing or connection_lost ends it
        else:
            future.set_result(None)
        return future

    def write(self, data):
        """pickle.dump's file: each write, one chunk."""
        size = len(data)
        if size:
            self.size += size
            self.send(http11.chunk(data) if self.chunked else [data])
        return size

    def send(self, parts):
        """Send through the loop; return once the transport has room again.  Raises OSError."""
        asyncio.run_coroutine_threadsafe(self.send_parts(parts), self.server.loop).result()


# GET /export?prefix=P: the keys under P, sorted, one JSON object a line
# (NDJSON), {"key": K, "value": BASE64} and "ttl": S (seconds left, rounded
# up) for a key with a deadline; an export is a valid body for POST /batch,
# which copies a store.  Like a backup, a consistent cut (Store.cut: every
# write acknowledged before the request, a batch whole or not at all),
# streamed by a thread of its own.

EXPORT_CHUNK = 65536        # bytes of lines sent as one chunk
json_string = json.encoder.encode_basestring_ascii     # a str as a JSON string, quotes included


def export_line(key, value, ttl=None):
    """One line of an export: bytes, its newline included."""
    line = b'{"key": %s, "value": "%s"' % (json_string(key).encode(), base64.b64encode(value))
    return line + (b'}\n' if ttl is None else b', "ttl": %d}\n' % ttl)


class ExportStream(SnapshotStream):
    """One GET /export: SnapshotStream's thread, flow control and deadline, with NDJSON in it.

    The thread takes the cut (a copy of the dict's references, under the
    store's lock), keeps the keys under the prefix, sorts them in runs
    (sorted_in_runs: no step holds the GIL long enough to stall the loop)
    and sends the lines in chunks of about EXPORT_CHUNK bytes.  Keys whose
    deadline has passed at the cut are left out, as a GET would leave them.
    """

    KIND = "export"
    BUSY = "an export is already being sent; retry later"
    HEAD = b"Content-Type: application/x-ndjson\r\n"

    def __init__(self, server, connection, request, prefix):
        super().__init__(server, connection, request)
        self.prefix = prefix

    def body(self):
        data, deadlines, _ = self.server.store.cut()
        now, prefix = now_ms(), self.prefix
        keys = [key for key in data if key.startswith(prefix)] if prefix else list(data)
        lines, size = [], 0
        for key in sorted_in_runs(keys):
            deadline = deadlines.get(key) if deadlines else None
            if deadline is None:
                line = export_line(key, data[key])
            elif deadline > now:
                line = export_line(key, data[key], -((now - deadline) // 1000))  # rounded up
            else:
                continue                    # expired: gone for every request
            lines.append(line)
            size += len(line)
            if size >= EXPORT_CHUNK:
                self.write(b"".join(lines))
                lines, size = [], 0
        self.write(b"".join(lines))


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


# A host name as RFC 1123 allows it: dot-separated labels of letters, digits
# and inner hyphens; the last one not all digits (999.1.1.1 is a bad address,
# not a name).
HOST_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
HOST_NAME = re.compile(r"(%s\.)*(?=[0-9-]*[A-Za-z])%s\.?" % (HOST_LABEL, HOST_LABEL))


def host_address(text):
    """An address to bind: an IP address ([::1] as in a URL, or ::1) or a host name.

    A syntax check only: a name is resolved when the server binds, and a
    name that does not resolve then is a runtime failure (exit 1; DNS may
    be down for a moment), where a malformed address is bad usage (exit 2).
    """
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        ipaddress.IPv6Address(text)         # brackets hold an IPv6 address, nothing else
        return text
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if len(text) > 253 or not HOST_NAME.fullmatch(text):
        raise ValueError(text)
    return text


def not_empty(text):
    """A path given on the command line: an empty one would mean the current directory."""
    if not text:
        raise ValueError(text)
    return text


positive_int.__name__ = "positive integer"
cpu_number.__name__ = "CPU number"
non_negative_float.__name__ = "non-negative number"
positive_float.__name__ = "positive number"
port_number.__name__ = "port (0-65535)"
host_address.__name__ = "address (an IP address, [IPv6] or a host name)"
not_empty.__name__ = "path (it is empty)"

# Environment variables that stand for a flag when the flag is not given.
# Set to the empty string, each would silently mean something else (HOST=
# binding every address, DATA_DIR= the current directory, KV_AUTH_TOKEN_FILE=
# no auth at all), so an empty one is refused like any other bad value.
ENVIRONMENT = {"HOST": "--host", "PORT": "--port", "DATA_DIR": "--working-dir",
               AUTH_TOKEN_ENV: "--auth-token-file"}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line, exit 2: "bad usage" (argparse would add the usage text).
        self.exit(2, "error: %s (see --help)\n" % message)


# Every flag, as a table: (group, flag, add_argument's keywords).  The
# group None is the main one; ENVIRONMENT gives the variables that stand in
# for a flag that is not given.
LIMITS_GROUP = ("limits and timeouts", "what one client can make the server spend; each "
                "bound keeps the server available to the others (see README, Limits and "
                "timeouts)")
FLAGS = (
    (None, "--version", dict(action="version", version="kvstore " + __version__)),
    (None, "--host", dict(type=host_address, default="0.0.0.0", help=(
        "address to bind: an IP address ([::1] or ::1 for IPv6) or a host name "
        "(env HOST, default 0.0.0.0)"))),
    (None, "--port", dict(type=port_number, default="8080", help=(
        "TCP port; 0 picks a free one (env PORT, default 8080)"))),
    (None, "--working-dir", dict(type=not_empty, default="./data", metavar="DIR", help=(
        "data directory, created if missing (env DATA_DIR, default ./data)"))),
    (None, "--shutdown-timeout", dict(type=non_negative_float, default=15.0, metavar="SECONDS",
                                      help="how long shutdown waits for requests in flight "
                                           "(default 15)")),
    (None, "--max-value-bytes", dict(type=positive_int, default=10 << 20, metavar="N",
                                     help="largest accepted value (default 10485760)")),
    (None, "--max-batch-bytes", dict(type=positive_int, default=64 << 20, metavar="N", help=(
        "largest accepted body of POST /batch, past it 413; at most three quarters of "
        "--max-inflight-bytes (default 67108864 = 64 MiB)"))),
    (None, "--max-batch-ops", dict(type=positive_int, default=10000, metavar="N", help=(
        "most operations (lines) in one POST /batch, past it 413; a batch holds the server "
        "about 1.5 us an operation, others waiting (default 10000)"))),
    (None, "--fsync", dict(choices=persistence.Journal.POLICIES, default="always", help=(
        "journal fsync policy: always = before each reply, shared by concurrent writers; "
        "everysec = once a second; no = left to the OS (default always)"))),
    (None, "--checkpoint-bytes", dict(type=positive_int, default=64 << 20, metavar="N", help=(
        "write a snapshot and start a new journal when the journal grows past N bytes "
        "(default 67108864)"))),
    (None, "--lock-wait", dict(type=non_negative_float, default=5.0, metavar="SECONDS", help=(
        "if another process holds the data directory's lock, wait this long for it to exit "
        "(a server still dying) before refusing to start (default 5)"))),
    (None, "--cpu", dict(type=cpu_number, default=None, metavar="N", help=(
        "for a host dedicated to this server: run every thread on CPU N, scheduled as "
        "SCHED_BATCH (default: not pinned, normal scheduling; see README, Performance)"))),
    (None, "--auth-token-file", dict(type=not_empty, default=None, metavar="FILE", help=(
        "require 'Authorization: Bearer <token>' on every request but GET /health; the "
        "token is the file's content without surrounding whitespace; SIGHUP reads it "
        "again (env %s, default: no auth)" % AUTH_TOKEN_ENV))),
    (LIMITS_GROUP, "--header-timeout", dict(type=positive_float, default=10.0,
                                            metavar="SECONDS", help=(
        "a request line and headers must arrive within it, else 408 and close; ample for "
        "any real client (default 10)"))),
    (LIMITS_GROUP, "--body-timeout", dict(type=positive_float, default=30.0, metavar="SECONDS",
                                          help=(
        "a body that stops arriving for longer gets 408 and close; a pause, not a total, "
        "so slow links still upload (default 30)"))),
    (LIMITS_GROUP, "--send-timeout", dict(type=positive_float, default=30.0, metavar="SECONDS",
                                          help=(
        "a client that stops reading its reply for longer is cut off (default 30)"))),
    (LIMITS_GROUP, "--idle-timeout", dict(type=positive_float, default=60.0, metavar="SECONDS",
                                          help=(
        "a keep-alive connection with no request for longer is closed, without a reply "
        "(default 60)"))),
    (LIMITS_GROUP, "--max-connections", dict(type=positive_int, default=16384, metavar="N",
                                             help=(
        "open connections; past it a new one gets 503 and is closed; room for a burst of "
        "10,000 clients (default 16384)"))),
    (LIMITS_GROUP, "--max-inflight-bytes", dict(type=positive_int, default=256 << 20,
                                                metavar="N", help=(
        "bytes clients make the server hold (input not yet served, bodies being received, "
        "writes waiting for the journal, unsent replies); a body past it gets 503 with "
        "Retry-After, a request without one never (default 268435456 = 256 MiB)"))),
    (LIMITS_GROUP, "--max-header-bytes", dict(type=positive_int, default=65536, metavar="N",
                                              help=(
        "request line and headers together; past it 431, or 414 for the request line "
        "alone (default 65536)"))),
    (LIMITS_GROUP, "--max-journal-bytes", dict(type=positive_int, default=64 << 20,
                                               metavar="N", help=(
        "writes handed to the journal and not yet durable (a slow or stalled disk); past "
        "it new writes get 503 with Retry-After (default 67108864 = 64 MiB)"))),
    (LIMITS_GROUP, "--max-watchers", dict(type=positive_int, default=10000, metavar="N", help=(
        "requests held by ?wait= (watches) at once; past it a new one gets 503 with "
        "Retry-After (default 10000)"))),
    (None, "--access-log", dict(action="store_true", help=(
        "log one line per request: client, request line, status, bytes, seconds (never a "
        "value); off by default"))),
    (None, "--log-format", dict(choices=LOG_FORMATS, default="text", help=(
        "text: a line per event after an RFC 3339 UTC timestamp; json: a JSON object per "
        "line (default text)"))),
)


def parse_args(argv, environ):
    """The command line and the environment, as argparse's namespace; exit 2 on bad usage.

    Besides the flags: args.auth_token, the token (bytes) read from
    args.auth_token_file, or None when no token file is given.
    """
    parser = ArgumentParser(
        description="An HTTP key-value store that keeps every acknowledged write "
                    "through clean shutdowns and crashes.",
        epilog="Environment: HOST, PORT, DATA_DIR and KV_AUTH_TOKEN_FILE are used when the "
               "flag is not given; set to the empty string, each is bad usage. "
               "SIGTERM and SIGINT shut the server down cleanly; SIGHUP reads the token "
               "file again (a bad one keeps the current token) and never stops it. "
               "Exit codes: 0 clean shutdown, 1 runtime failure, 2 bad usage.")
    groups = {None: parser}
    stands_for = {flag: name for name, flag in ENVIRONMENT.items()}
    for group, flag, options in FLAGS:
        if group not in groups:
            groups[group] = parser.add_argument_group(*group)
        if flag in stands_for:
            # An empty variable counts as unset here, so that --help still
            # works; it is refused below.
            options = dict(options, default=environ.get(stands_for[flag]) or options["default"])
        groups[group].add_argument(flag, **options)
    args = parser.parse_args(argv)          # --help and --version exit here
    for name, flag in ENVIRONMENT.items():
        if environ.get(name) == "":
            parser.error("%s is set but empty: unset it, or set it to a value (it stands "
                         "for %s)" % (name, flag))
    args.auth_token = None
    if args.auth_token_file is not None:
        try:
            args.auth_token = read_auth_token(args.auth_token_file)
        except TokenFileError as e:
            parser.error("--auth-token-file: %s" % e)
    return args


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


def stop_while_starting(signum, frame):
    """Before the loop runs (the lock wait, the load), SIGTERM or SIGINT ends the start."""
    raise StoppedWhileStarting(signal.Signals(signum).name)


def lock_directory(directory, wait):
    """Take the data directory's lock; wait up to `wait` s for a holder to exit.

    A harness may restart the server as soon as it has sent SIGKILL to the
    previous one, which holds the lock until it is gone, maybe a moment
    later (lsfr restarts after 1 s).  A signal ends the wait
    (stop_while_starting).
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
            time.sleep(min(LOCK_POLL, left))


LOCK_POLL = 0.05        # seconds between two tries of a taken lock (--lock-wait)


def open_store(args, loop):
    """Create the data directory, lock it, recover the data, open a new journal on `loop`."""
    directory = os.path.abspath(args.working_dir)
    try:
        persistence.make_data_directory(directory)
        lock = lock_directory(directory, args.lock_wait)
        ledger = persistence.Ledger()
        data, generation, replayed = persistence.load(directory, log, ledger)
        # Creating the new journal also proves the directory is writable:
        # better to fail now than at shutdown.
        journal = persistence.Journal(directory, generation, args.fsync, loop, pass_fds=(lock,))
    except OSError as e:
        raise persistence.DataError("%s: data directory is not usable: %s"
                                    % (e.filename or directory, e.strerror))
    # Past RLIMIT_FSIZE, a write fails with EFBIG (a full disk, to the
    # journal) instead of the process being killed by SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    store = Store(data, journal, args.checkpoint_bytes, log, ledger)
    store.checkpointer.keep_open_in_child = (lock,)
    if replayed:
        store.checkpointer.request()     # fold the replayed journals into a snapshot
    return store, lock


def listen(host, port):
    """The listening socket, bound before the data is loaded: a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only on
    # sockets that say they are TCP, and accepted sockets inherit it.  With
    # Nagle on, a reply written in two parts waited 40 ms for the client's
    # delayed ACK: a pipelined bulk load ran at a fifth of its speed.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


DRAIN_SETTLE = 0.2          # seconds for idle connections to close before counting
DRAIN_REPORT_EVERY = 5.0    # seconds between two "Waiting up to" lines


async def drain(server, timeout):
    """Server.drain, saying what the shutdown waits for and for how long.

    Idle connections close at once; those still open after DRAIN_SETTLE
    are in a request.  Returns how many were still open at the deadline.
    """
    deadline = time.monotonic() + timeout
    server.drain()
    still_open = await server.wait_closed(min(timeout, DRAIN_SETTLE))
    while still_open:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        log("Waiting up to %.1f s (--shutdown-timeout) for %d connection(s) in a request"
            % (left, still_open))
        still_open = await server.wait_closed(min(left, DRAIN_REPORT_EVERY))
    return still_open


class Stopper:
    """SIGTERM and SIGINT stop the server once; later ones are logged and change nothing.

    SIGHUP re-reads the token file (reload_auth_token), as nginx, Consul and
    Prometheus reload theirs, and never stops the server: a logrotate
    `kill -HUP` must not end the service.  asyncio's add_signal_handler runs the
    handlers on the loop, between two callbacks, never inside one.
    """

    def __init__(self, loop, server, token_file):
        self.loop, self.server, self.token_file = loop, server, token_file
        self.stopped = loop.create_future()
        self._last_logged = 0.0
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.on_signal, signum)
        # Under nohup SIGHUP was ignored at start: whoever ran us asked for that.
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        quiet_signal_wakeups()
        server.on_fatal = self.on_fatal

    def on_signal(self, signum):
        name = signal.Signals(signum).name
        if not self.stopped.done():
            log("Received %s, shutting down" % name)
            self.stopped.set_result(name)
        elif time.monotonic() - self._last_logged >= 1.0:
            self._last_logged = time.monotonic()
            log("Received %s: already shutting down; it changes nothing" % name)

    def on_fatal(self):
        if not self.stopped.done():
            log("Storage failed for good (%s); shutting down" % self.server.store.write_problem())
            self.stopped.set_result("storage failure")

    def reload(self):
        """SIGHUP: the token file again (rotation without a restart); a bad one keeps the old."""
        reload_auth_token(self.server.api, self.token_file)


def quiet_signal_wakeups():
    """No warning when a signal finds the loop's wakeup socket full.

    asyncio asks for one on stderr each time: a storm of signals would
    write thousands of lines, and block on a full pipe.  Nothing is lost:
    one byte wakes the loop, and after the first, a stopping signal changes
    nothing.  The signals wait (blocked) while the wakeup fd is swapped.
    """
    stopping = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    try:
        signal.set_wakeup_fd(signal.set_wakeup_fd(-1), warn_on_full_buffer=False)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


async def serve(args, store, sock):
    """Serve until a signal, then drain, seal and save.  Returns the exit code."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log_loop_error)
    limits = Limits(args.header_timeout, args.body_timeout, args.send_timeout,
                    args.idle_timeout, args.max_connections, args.max_inflight_bytes,
                    args.max_header_bytes, args.max_value_bytes, args.max_journal_bytes,
                    args.max_watchers, args.max_batch_bytes, args.max_batch_ops)
    server = Server(loop, store, limits, Metrics(), args.auth_token, args.access_log)
    stopper = Stopper(loop, server, args.auth_token_file)
    listener = await loop.create_server(lambda: Connection(server), sock=sock, backlog=BACKLOG)
    host, port = sock.getsockname()[:2]
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files != resource.RLIM_INFINITY and files < args.max_connections + 64:
        log("Open file limit %d is below --max-connections %d: past it, connections wait "
            "in the kernel's queue" % (files, args.max_connections))
    warn_if_exposed(host, args.auth_token, args.auth_token_file)
    log("Server listening on %s" % format_address(host, port))
    await stopper.stopped
    listener.close()
    still_open = await drain(server, args.shutdown_timeout)
    if still_open:
        log("Shutdown timeout: %d connection(s) still in a request; their writes are refused"
            % still_open)
    store.seal()
    path = persistence.snapshot_path(store.directory)
    log("Flushing %d keys to %s" % (len(store), path))
    started = time.monotonic()
    try:
        # In a thread: the journal's last rounds need the loop to drive them.
        size = await loop.run_in_executor(None, store.save_and_close)
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


def log_loop_error(loop, context):
    """asyncio's reports: out of file descriptors at accept (it retries in 1 s), or a bug."""
    error = context.get("exception")
    if context.get("message", "").startswith("socket.accept() out of system resource"):
        message = "Cannot accept connections: %s; retrying in 1000 ms" % (
            getattr(error, "strerror", None) or error)
        kind = "accept"
    elif isinstance(error, ConnectionError):
        return                          # a client went away: nothing to report
    else:
        message, kind = "Unexpected error: %s: %r" % (context.get("message"), error), "error"
    now = time.monotonic()
    if now - _loop_errors.get(kind, -2.0) >= 1.0:
        _loop_errors[kind] = now
        log(message)


_loop_errors = {}


def main(argv=None):
    open_standard_fds()
    args = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    set_log_format(args.log_format)
    raise_open_file_limit()
    if args.cpu is not None:
        try:
            pin_to_one_cpu(args.cpu)            # before any thread starts
        except OSError as e:
            fail("cannot run on CPU %s: %s" % (args.cpu, e.strerror))
            os._exit(1)
        batch = no_wakeup_preemption()          # every thread shares that CPU
        log("Running on CPU %d%s (--cpu)" % (args.cpu, ", SCHED_BATCH" if batch else ""))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_while_starting)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        sock = listen(args.host, args.port)
        store, directory_lock = open_store(args, loop)
    except (OSError, OverflowError) as e:
        fail("cannot listen on %s: %s" % (format_address(args.host, args.port),
                                           getattr(e, "strerror", None) or e))
        os._exit(1)
    except persistence.DataError as e:
        fail(str(e))
        os._exit(1)
    except StoppedWhileStarting as e:
        log("Received %s while waiting for the data directory or loading it; nothing to "
            "save, bye" % e)
        os._exit(0)
    code = loop.run_until_complete(serve(args, store, sock))
    # Exit at once, while `store` is still referenced: the data is saved,
    # and freeing a dict of a million keys object by object takes longer
    # than saving it did.  A snapshot thread stalled on a slow client ends too.
    os._exit(code)


if __name__ == "__main__":
    main()
