"""The asyncio comparison server: about as fast as pure Python serves this API.

One thread, one event loop, an asyncio.Protocol per connection with a
hand-written HTTP/1.1 parser: keep-alive, pipelining, Content-Length bodies.
All responses produced by one read go out in a single transport.write.  No
lock is needed: only the event loop thread touches the dict.  No persistence,
no chunked bodies (501).  It is the ceiling the real server is measured against.

    python3 -m bench.asyncio_server --port 8080
"""
import argparse
import asyncio
import re
import resource
import signal
from urllib.parse import unquote

KEY = re.compile(r"[A-Za-z0-9:_.-]+")
MAX_HEAD = 64 * 1024
MAX_VALUE = 10 * 1024 * 1024
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 501: "Not Implemented"}
KV_METHODS = ("GET", "HEAD", "PUT", "DELETE")
HEAD_ERRORS = {400: b"bad request\n", 413: b"value too large\n",
               501: b"transfer-encoding not supported\n"}

store = {}


def response(status, body=b"", head_only=False, close=False, allow=None):
    """Status line, headers and body as one bytes object."""
    extra = ""
    if allow:
        extra += "Allow: %s\r\n" % allow
    if close:
        extra += "Connection: close\r\n"
    head = ("HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Length: %d\r\n%s\r\n" % (status, REASONS[status], len(body), extra))
    return head.encode("latin-1") + (b"" if head_only else body)


def handle(method, target, body):
    """Apply one request to the store: (status, body, allow)."""
    path = target.split("?", 1)[0]
    if path == "/health":
        return (200, b"ok\n", None) if method in ("GET", "HEAD") else (405, b"method not allowed\n", "GET, HEAD")
    if path == "/clear":
        if method != "DELETE":
            return 405, b"method not allowed\n", "DELETE"
        store.clear()
        return 200, b"", None
    if not path.startswith("/kv/"):
        return 404, b"not found\n", None
    if method not in KV_METHODS:
        return 405, b"method not allowed\n", ", ".join(KV_METHODS)
    key = unquote(path[4:], errors="replace") if "%" in path else path[4:]
    if not key:
        return 400, b"key cannot be empty\n", None
    if not KEY.fullmatch(key):
        return 400, b"key contains invalid characters\n", None
    if method == "PUT":
        if not body:
            return 400, b"value cannot be empty\n", None
        store[key] = body
        return 200, b"", None
    if method == "DELETE":
        store.pop(key, None)
        return 200, b"", None
    value = store.get(key)
    return (404, b"key not found\n", None) if value is None else (200, value, None)


class Head:
    """A parsed request head, or the error that ends the connection."""

    def __init__(self, raw):
        self.error = None
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self.error = 400
            return
        self.method, self.target, version = parts
        self.headers = {}
        lengths = set()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            self.headers[name] = value
            if name == "content-length":
                lengths.add(value)
        conn = self.headers.get("connection", "").lower()
        self.keep_alive = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        self.length = None
        if "transfer-encoding" in self.headers:
            # Chunked bodies are out of scope here; both headers at once would be smuggling.
            self.error = 400 if lengths else 501
        elif len(lengths) > 1 or not all(v.isdigit() for v in lengths):
            self.error = 400
        elif "content-length" in self.headers:
            self.length = int(self.headers["content-length"])
            if self.length > MAX_VALUE:
                self.error = 413


class KVProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = bytearray()
        self.head = None       # parsed head of a request whose body is still arriving
        self.continued = False

    def data_received(self, data):
        self.buf += data
        out = []
        close = self.parse(out)
        if out:
            self.transport.write(b"".join(out))
        if close:
            self.transport.close()

    def parse(self, out):
        """Answer every complete request in the buffer; True if the connection must close."""
        while True:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        out.append(response(431, b"header too large\n", close=True))
                        return True
                    return False
                self.head = Head(bytes(self.buf[:end]))
                del self.buf[:end + 4]
                self.continued = False
            head = self.head
            if head.error:
                out.append(response(head.error, HEAD_ERRORS[head.error], close=True))
                return True
            if head.method == "PUT" and head.length is None:
                out.append(response(411, b"length required\n", close=True))
                return True
            length = head.length or 0
            if len(self.buf) < length:
                if head.headers.get("expect", "").lower() == "100-continue" and not self.continued:
                    self.continued = True
                    out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
                return False
            body = bytes(self.buf[:length])
            del self.buf[:length]
            self.head = None
            status, payload, allow = handle(head.method, head.target, body)
            out.append(response(status, payload, head.method == "HEAD", not head.keep_alive, allow))
            if not head.keep_alive:
                return True

    # A client that pipelines without reading must not make us buffer without bound.
    def pause_writing(self):
        self.transport.pause_reading()

    def resume_writing(self):
        self.transport.resume_reading()


async def serve(host, port):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A large backlog: a burst of thousands of connects must not overflow the accept queue.
    server = await loop.create_server(KVProtocol, host, port, backlog=4096)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print("Server listening on %s:%d" % (bound_host, bound_port), flush=True)
    await stop.wait()
    server.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    # Thousands of simultaneous connections need as many file descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
