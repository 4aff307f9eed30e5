"""The "naive" comparison server: what a beginner writes with http.server.

ThreadingHTTPServer with every stdlib default left alone: HTTP/1.0 (one request
per connection), a request log line per request on stderr, a listen backlog of
5.  A dict behind a lock, the same API as SPEC.md, no persistence.  It is the
baseline the real server is measured against, so keep it plain and honest.

    python3 -m bench.naive_server --port 8080
"""
import argparse
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = re.compile(r"[A-Za-z0-9:_.-]+")
store = {}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, body=b"", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def key(self):
        """The key of a /kv/{key} path, or None after answering an error."""
        path = self.path.split("?", 1)[0]
        if not path.startswith("/kv/"):
            self.reply(404, b"not found\n")
            return None
        key = path[len("/kv/"):]
        if not key:
            self.reply(400, b"key cannot be empty\n")
        elif not KEY.fullmatch(key):
            self.reply(400, b"key contains invalid characters\n")
        else:
            return key
        return None

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/health":
            return self.reply(200, b"ok\n")
        key = self.key()
        if key is None:
            return
        with lock:
            value = store.get(key)
        if value is None:
            self.reply(404, b"key not found\n")
        else:
            self.reply(200, value)

    do_HEAD = do_GET

    def do_PUT(self):
        key = self.key()
        if key is None:
            return
        length = self.headers.get("Content-Length")
        if length is None:
            return self.reply(411, b"length required\n")
        value = self.rfile.read(int(length))
        if not value:
            return self.reply(400, b"value cannot be empty\n")
        with lock:
            store[key] = value
        self.reply(200)

    def do_DELETE(self):
        if self.path.split("?", 1)[0] == "/clear":
            with lock:
                store.clear()
            return self.reply(200)
        key = self.key()
        if key is not None:
            with lock:
                store.pop(key, None)
            self.reply(200)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    host, port = server.server_address[:2]
    print("Server listening on %s:%d" % (host, port), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
