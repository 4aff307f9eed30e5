"""The little HTTP/1.1 and socket plumbing shared by the load tools.

Hand-written on purpose: http.client costs more CPU per request than the
servers we measure, so a client built on it would measure itself.
"""
import errno
import math
import resource
import selectors
import time

clock = time.perf_counter
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
SCAN_EVERY = 0.05          # seconds between sweeps for timed-out or dropped connections


def request(method, key, value=b""):
    """The bytes of one request for /kv/<key>."""
    if method == "PUT":
        return b"PUT /kv/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (
            key, len(value), value)
    return b"%s /kv/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (method.encode(), key)


def parse_response(buf, start=0):
    """(status, end, close) of the complete response at buf[start:], else None.

    `end` is the offset just past it.  Just enough HTTP for our servers: a
    response without Content-Length counts as empty-bodied (ours always send
    one); `close` means the server closes the connection after it
    (Connection: close, or HTTP/1.0 without keep-alive).
    """
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        return None
    head = bytes(buf[start:end + 2]).lower()   # + "\r\n": every header line ends in one
    i = head.find(b"\r\ncontent-length:")
    end += 4 + (int(head[i + 17:head.find(b"\r\n", i + 2)]) if i >= 0 else 0)
    if len(buf) < end:
        return None
    if head.startswith(b"http/1.0"):
        close = b"\r\nconnection: keep-alive" not in head
    else:
        close = b"\r\nconnection: close" in head
    return int(head[9:12]), end, close


def percentile(sorted_values, q):
    """The q-th percentile (0..100) of an already sorted sequence, nearest rank."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values), math.ceil(q / 100.0 * len(sorted_values))) - 1)
    return sorted_values[rank]


def raise_fd_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def errname(code):
    return errno.errorcode.get(code, str(code))


def send_some(sock, out):
    """Send what a non-blocking socket takes now: (bytes still to send, failure or None)."""
    try:
        sent = sock.send(out)
    except (BlockingIOError, InterruptedError):
        return out, None
    except OSError as exc:
        return out, errname(exc.errno)
    return out[sent:], None


def recv_some(sock):
    """Read what a non-blocking socket has: (data, or None if nothing yet; failure or None)."""
    try:
        return sock.recv(65536), None
    except (BlockingIOError, InterruptedError):
        return None, None
    except OSError as exc:
        return None, errname(exc.errno)
