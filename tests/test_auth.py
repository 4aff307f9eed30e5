"""Black-box tests of --auth-token-file: 401 without the bearer token, /health open, no token in logs.

Every endpoint is tried four ways (no Authorization header, another scheme,
a wrong token, the right token); a refused request must change nothing.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unittest

from tests import support
from tests.test_http_protocol import RawConnection

TOKEN = "s3cret-Token_0123456789abcdef"
WRONG = "s3cret-Token_0123456789abcdeX"       # one character off
RIGHT = {"Authorization": "Bearer " + TOKEN}
REFUSED = {
    "no header": {},
    "another scheme": {"Authorization": "Basic czNjcmV0OnMzY3JldA=="},
    "the token without a scheme": {"Authorization": TOKEN},
    "a wrong token": {"Authorization": "Bearer " + WRONG},
    "an empty token": {"Authorization": "Bearer "},
    "the token twice": {"Authorization": "Bearer %s, Bearer %s" % (TOKEN, TOKEN)},
}
# (method, path, body, status with the right token)
ENDPOINTS = [
    ("PUT", "/kv/guarded", b"new", 200),
    ("GET", "/kv/guarded", None, 200),
    ("HEAD", "/kv/guarded", None, 200),
    ("DELETE", "/kv/guarded", None, 200),
    ("GET", "/kv?prefix=g", None, 200),
    ("HEAD", "/kv", None, 200),
    ("DELETE", "/clear", None, 200),
    ("POST", "/batch", b'{"key": "guarded", "value": "bmV3"}\n', 200),
    ("GET", "/export", None, 200),
    ("DELETE", "/kv?prefix=guarded", None, 200),
    ("GET", "/metrics", None, 200),
    ("HEAD", "/metrics", None, 200),
    ("GET", "/snapshot", None, 200),
    ("HEAD", "/snapshot", None, 405),
    ("GET", "/no/such/path", None, 404),
    ("POST", "/health", None, 405),
    ("PUT", "/health", b"x", 405),
]


def token_file(test, content, mode=0o600):
    path = support.temp_file(test, "token", content)
    os.chmod(path, mode)
    return path


class AuthTest(support.ServerTestCase):
    """One server for the class: no test here depends on what another wrote (the
    one that stops its server to read all it logged has a server of its own)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.server = cls.start_auth_server(cls.addClassCleanup)

    @staticmethod
    def start_auth_server(add_cleanup):
        directory = tempfile.mkdtemp(prefix="kvtest-")
        add_cleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "token")
        with open(path, "wb") as f:
            f.write(b"\n  " + TOKEN.encode() + b"  \n\n")     # whitespace is not part of it
        os.chmod(path, 0o600)
        server = support.ServerProcess(os.path.join(directory, "data"),
                                       "--auth-token-file", path, "--access-log")
        add_cleanup(server.__exit__, None, None, None)
        return server.start()

    def refused(self, method, path, body, headers, why):
        status, reply_headers, reply = self.server.request(method, path, body, headers)
        self.assertEqual(status, 401, "%s %s with %s" % (method, path, why))
        self.assertEqual(reply, b"" if method == "HEAD" else b"unauthorized\n")
        self.assertEqual(reply_headers.get("WWW-Authenticate"), 'Bearer realm="kvstore"')
        self.assertEqual(reply_headers.get("Content-Type"), "text/plain; charset=utf-8")
        # Every reply about /kv or a key carries the revision, a refusal too.
        about_keys = path.split("?")[0] == "/kv" or path.startswith("/kv/")
        self.assertEqual("KV-Revision" in reply_headers, about_keys, path)

    def test_a_refusal_from_the_head_before_the_body_carries_the_revision(self):
        for path, expected in (("/kv/guarded", True), ("/batch", False)):
            connection = RawConnection(self.server)
            connection.send(b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
                            % path.encode())       # the body never comes
            reply = connection.response()
            self.assertEqual(reply.status, 401)
            self.assertEqual(reply.get("KV-Revision") is not None, expected, path)

    def test_every_endpoint_needs_the_token(self):
        self.server.request("PUT", "/kv/guarded", b"old", RIGHT)
        for method, path, body, status in ENDPOINTS:
            for why, headers in REFUSED.items():
                with self.subTest(method=method, path=path, headers=why):
                    self.refused(method, path, body, headers, why)
                    # A refused request changed nothing.
                    self.assertEqual(self.server.request("GET", "/kv/guarded", None, RIGHT)[2],
                                     b"old")
        for method, path, body, expected in ENDPOINTS:
            with self.subTest(method=method, path=path, headers="the right token"):
                status, _, _ = self.server.request(method, path, body, RIGHT)
                self.assertEqual(status, expected, "%s %s" % (method, path))

    def test_the_scheme_is_case_insensitive(self):
        status, _, _ = self.server.request("PUT", "/kv/k", b"v",
                                           {"Authorization": "bEARER " + TOKEN})
        self.assertEqual(status, 200)

    def test_health_is_open(self):
        self.assertEqual(self.server.request("GET", "/health")[::2], (200, b"ok\n"))
        self.assertEqual(self.server.request("HEAD", "/health")[::2], (200, b""))
        self.assertEqual(self.server.request("GET", "/health", None,
                                             {"Authorization": "Bearer " + WRONG})[0], 200)

    def test_a_refused_request_keeps_the_connection_and_the_next_one_passes(self):
        conn = self.server.connection()
        self.addCleanup(conn.close)
        conn.request("GET", "/kv/k")
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (401, b"unauthorized\n"))
        conn.request("PUT", "/kv/k", b"v", RIGHT)
        self.assertEqual(conn.getresponse().status, 200)

    def test_refused_before_the_body_is_read(self):
        # A client without the token announces 10 MiB and sends none of it:
        # the 401 comes at once, and the connection is closed (the body
        # would otherwise be taken for the next request).
        with socket.create_connection((self.server.host, self.server.port), timeout=10) as s:
            s.sendall(b"PUT /kv/big HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n")
            reply = support.read_until_quiet(s, timeout=10)
            self.assertTrue(reply.startswith(b"HTTP/1.1 401 "), reply)
            self.assertIn(b"\r\nConnection: close\r\n", reply)
            s.settimeout(10)
            self.assertEqual(s.recv(1), b"", "the connection stays open")

    def test_the_token_never_reaches_the_log(self):
        server = self.start_auth_server(self.addCleanup)
        for headers in (RIGHT, {"Authorization": "Bearer " + WRONG}):
            for method, path, body, _ in ENDPOINTS:
                server.request(method, path, body, headers)
        server.wait_for_line(r'"GET /kv/guarded" 401', 10)       # it logs
        self.assertEqual(server.stop(), 0)
        output = server.output()
        self.assertNotIn(TOKEN, output)
        self.assertNotIn(WRONG, output)
        self.assertNotIn(TOKEN[:12], output)


class AuthStartTest(support.ServerTestCase):

    def run_server(self, *args, env=None):
        environment = dict(os.environ, **(env or {}))
        return subprocess.run([sys.executable, support.SERVER, "--port", "0",
                               "--working-dir", self.data_dir] + list(args),
                              capture_output=True, text=True, env=environment, timeout=60)

    def test_an_unusable_token_file_is_bad_usage_in_one_line(self):
        cases = {
            "empty": token_file(self, b""),
            "only whitespace": token_file(self, b" \n\t\n"),
            "two words": token_file(self, b"s3cret " + TOKEN.encode()),
            "missing": os.path.join(self.data_dir, "no-such-file"),
            "a directory": self.data_dir,
        }
        for what, path in cases.items():
            with self.subTest(what):
                run = self.run_server("--auth-token-file", path)
                self.assertEqual(run.returncode, 2, run.stderr)
                self.assertEqual(len(run.stderr.splitlines()), 1, run.stderr)
                self.assertIn(path, run.stderr)
                self.assertNotIn("Traceback", run.stderr)
                self.assertNotIn(TOKEN, run.stderr + run.stdout)
                self.assertNotIn("Server listening", run.stdout)

    def test_the_environment_names_the_file_when_the_flag_is_absent(self):
        server = self.start_server(env={"KV_AUTH_TOKEN_FILE": token_file(self, TOKEN.encode())})
        self.assertEqual(server.request("GET", "/kv/k")[0], 401)
        self.assertEqual(server.request("GET", "/kv/k", None, RIGHT)[0], 404)
        run = self.run_server(env={"KV_AUTH_TOKEN_FILE": os.path.join(self.data_dir, "nope")})
        self.assertEqual(run.returncode, 2, run.stderr)

    def test_without_a_token_nothing_changes(self):
        server = self.start_server()
        self.assertEqual(server.request("PUT", "/kv/k", b"v")[0], 200)
        self.assertEqual(server.request("GET", "/kv/k")[::2], (200, b"v"))
        self.assertEqual(server.request("GET", "/kv/k", None, {"Authorization": "Bearer x"})[0],
                         200)

    def test_a_warning_when_listening_beyond_loopback_without_a_token(self):
        warning = "without --auth-token-file"
        exposed = self.start_server(host="0.0.0.0")
        lines = exposed.output().splitlines()
        warned = [i for i, line in enumerate(lines) if warning in line]
        self.assertEqual(len(warned), 1, exposed.output())
        self.assertIn("0.0.0.0", lines[warned[0]])
        exposed.stop()
        path = token_file(self, TOKEN.encode())
        for host, args in (("127.0.0.1", ()), ("0.0.0.0", ("--auth-token-file", path))):
            with self.subTest(host=host, args=args):
                server = self.start_server(*args, host=host)
                self.assertNotIn(warning, server.output())
                server.stop()


    def test_a_warning_when_others_can_read_the_token_file(self):
        for mode in (0o644, 0o640, 0o606, 0o600, 0o400):
            with self.subTest(mode=oct(mode)):
                path = token_file(self, TOKEN.encode(), mode)
                server = self.start_server("--auth-token-file", path,
                                           data_dir=tempfile.mkdtemp(dir=self.data_dir))
                warnings = [line for line in server.output().splitlines()
                            if "Warning:" in line]
                if mode & 0o066:
                    self.assertEqual(len(warnings), 1, server.output())
                    self.assertIn(path, warnings[0])
                    self.assertIn("chmod 600", warnings[0])
                else:
                    self.assertEqual(warnings, [])
                self.assertEqual(server.stop(), 0)
                self.assertNotIn(TOKEN, server.output())


# reload_auth_token, which SIGHUP calls, run in a process of its own (its
# lines go to fd 1): argv[1] is the token file, the holder starts with OLD.
RELOAD = """
import sys, types
import server
holder = types.SimpleNamespace(auth_token=b"OLD")
done = server.reload_auth_token(holder, sys.argv[1] if sys.argv[1] != "-" else None)
print("result", done, holder.auth_token.decode())
"""


class ReloadTest(unittest.TestCase):
    """reload_auth_token: the new token, or the old one kept and why; never the token logged."""

    def reload(self, path):
        run = subprocess.run([sys.executable, "-c", RELOAD, path], cwd=support.ROOT,
                             capture_output=True, text=True, timeout=60)
        self.assertEqual((run.returncode, run.stderr), (0, ""), run.stdout + run.stderr)
        lines = run.stdout.splitlines()
        self.assertNotIn("NEW-" + TOKEN, "\n".join(lines[:-1]))
        return lines[:-1], lines[-1]

    def test_a_good_file_replaces_the_token_in_one_line(self):
        path = token_file(self, b"NEW-" + TOKEN.encode() + b"\n")
        lines, result = self.reload(path)
        self.assertEqual(result, "result True NEW-" + TOKEN)
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r"^%s Reloaded the token from %s \(changed\)$"
                         % (support.TIMESTAMP, re.escape(path)))

    def test_a_bad_file_keeps_the_old_token_and_says_why(self):
        directory = tempfile.mkdtemp(prefix="kvtest-")
        self.addCleanup(shutil.rmtree, directory, True)
        cases = {"missing": os.path.join(directory, "gone"),
                 "empty": token_file(self, b"\n"),
                 "two words": token_file(self, b"two words")}
        for what, path in cases.items():
            with self.subTest(what):
                lines, result = self.reload(path)
                self.assertEqual(result, "result False OLD")
                self.assertEqual(len(lines), 1, lines)
                self.assertIn("Keeping the current token", lines[0])
                self.assertIn(path, lines[0])

    def test_a_readable_file_is_read_and_warned_about(self):
        path = token_file(self, b"NEW-" + TOKEN.encode(), 0o644)
        lines, result = self.reload(path)
        self.assertEqual(result, "result True NEW-" + TOKEN)
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("Warning: token file %s" % path, lines[1])

    def test_without_a_token_file_there_is_nothing_to_reload(self):
        lines, result = self.reload("-")
        self.assertEqual(result, "result False OLD")
        self.assertEqual(len(lines), 1, lines)


class SighupTest(support.ServerTestCase):

    def test_sighup_reloads_the_token_and_never_stops_the_server(self):
        path = token_file(self, TOKEN.encode())
        server = self.start_server("--auth-token-file", path)
        self.assertEqual(server.request("PUT", "/kv/k", b"v", RIGHT)[0], 200)
        with open(path, "w") as f:
            f.write(WRONG + "\n")                   # the rotated token
        server.signal(signal.SIGHUP)
        server.wait_for_line(r"Reloaded the token from %s" % re.escape(path), 10)
        self.assertEqual(server.request("GET", "/kv/k", None, RIGHT)[0], 401)
        self.assertEqual(server.request("GET", "/kv/k", None,
                                        {"Authorization": "Bearer " + WRONG})[0], 200)
        os.unlink(path)                             # a rotation gone wrong
        server.signal(signal.SIGHUP)
        server.wait_for_line(r"Keeping the current token: cannot read %s" % re.escape(path), 10)
        self.assertEqual(server.request("GET", "/kv/k", None,
                                        {"Authorization": "Bearer " + WRONG})[0], 200)
        self.assertIsNone(server.proc.poll(), "SIGHUP stopped the server")
        self.assertEqual(server.stop(), 0)
        self.assertNotIn(WRONG, server.output())


if __name__ == "__main__":
    unittest.main()
