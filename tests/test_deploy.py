"""Checks of the deployment files: Dockerfile, .dockerignore, deploy/kvstore.service, deploy/nginx.conf.

No Docker engine is needed (there is none where this was written): the
Dockerfile is parsed for what the clstr harness and `docker stop` rely on,
and its CMD and HEALTHCHECK are run here as the container would run them,
from a directory holding only the files the image COPYs, against a real
server.  The systemd unit goes through `systemd-analyze verify` and
`systemd-analyze security --offline=yes` when systemd-analyze is installed.
deploy/nginx.conf runs in a real nginx, in front of a real server (.ci/run
installs nginx and openssl; elsewhere the test is skipped without them).
"""
import base64
import fnmatch
import gzip
import http.client
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import unittest
import urllib.parse

from tests import support
from tests.durability_support import BareServer, clean_env

DOCKERFILE = os.path.join(support.ROOT, "Dockerfile")
DOCKERIGNORE = os.path.join(support.ROOT, ".dockerignore")
UNIT = os.path.join(support.ROOT, "deploy", "kvstore.service")
DOCKER_STOP_TIMEOUT = 10        # seconds from SIGTERM to SIGKILL in `docker stop`
SAVE_MARGIN = 3                 # seconds left for the final save after the drain


def dockerfile_instructions(path=DOCKERFILE):
    """[(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    with open(path, encoding="utf-8") as f:
        lines = [l for l in f.read().splitlines() if not l.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip()]


def exec_form(arguments):
    """The JSON array of an exec-form CMD, or None for the shell form."""
    try:
        argv = json.loads(arguments)
    except ValueError:
        return None
    return argv if isinstance(argv, list) and all(isinstance(a, str) for a in argv) else None


def shutdown_timeout(argv):
    """The value of --shutdown-timeout in an argv (15, the server's default, if absent)."""
    for i, arg in enumerate(argv):
        if arg == "--shutdown-timeout":
            return float(argv[i + 1])
        if arg.startswith("--shutdown-timeout="):
            return float(arg.split("=", 1)[1])
    return 15.0


def dockerignored(path, patterns):
    """Whether .dockerignore `patterns` keep `path` (relative, with /) out of the context.

    The subset of Docker's rules used here: patterns in order, the last one
    that matches wins, `!` re-includes, and a pattern that matches a
    directory matches everything under it.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pattern) and p.count("/") == pattern.count("/")
               for p in prefixes):
            ignored = not negated
    return ignored


class DockerfileTest(unittest.TestCase):

    def setUp(self):
        self.instructions = dockerfile_instructions()

    def last(self, name):
        found = [args for instruction, args in self.instructions if instruction == name]
        self.assertTrue(found, "the Dockerfile has no %s" % name)
        return found[-1]

    def cmd(self):
        argv = exec_form(self.last("CMD"))
        self.assertIsNotNone(argv, "CMD is not in exec form: the server would not be PID 1 "
                                   "and would not get docker stop's SIGTERM")
        return argv

    def healthcheck(self):
        options, _, command = self.last("HEALTHCHECK").partition("CMD ")
        argv = exec_form(command)
        self.assertIsNotNone(argv, "HEALTHCHECK CMD is not in exec form")
        return argv

    def test_the_one_dockerfile_is_at_the_root(self):
        self.assertFalse(os.path.exists(os.path.join(support.ROOT, "deploy", "Dockerfile")))

    def test_image_runs_the_server_as_a_user_with_its_data_on_a_volume(self):
        self.assertRegex(self.instructions[0][1], r"^python:3\.1\d-slim$")
        user = self.last("USER").split(":")[0]
        self.assertNotIn(user, ("root", "0"), "the server would run as root")
        self.assertIn("/app/data", self.last("VOLUME"))
        self.assertIn("8080", self.last("EXPOSE").split())
        self.assertEqual(self.last("STOPSIGNAL"), "SIGTERM")
        env = " ".join(args for instruction, args in self.instructions if instruction == "ENV")
        self.assertIn("DATA_DIR=/app/data", env)
        self.assertIn("server.py", self.cmd())

    def test_shutdown_fits_in_dockers_stop_timeout(self):
        self.assertLessEqual(shutdown_timeout(self.cmd()) + SAVE_MARGIN, DOCKER_STOP_TIMEOUT)

    def test_healthcheck_needs_no_curl(self):
        argv = self.healthcheck()
        self.assertNotIn(argv[0], ("curl", "wget"))
        self.assertEqual(argv[:2], ["python", "healthcheck.py"])
        with open(os.path.join(support.ROOT, "deploy", "healthcheck.py"), encoding="utf-8") as f:
            self.assertIn("/health", f.read())

    def test_copied_files_exist_and_are_in_the_build_context(self):
        with open(DOCKERIGNORE, encoding="utf-8") as f:
            patterns = [l.strip() for l in f if l.strip() and not l.startswith("#")]
        copies = [args.split() for instruction, args in self.instructions
                  if instruction == "COPY"]
        self.assertTrue(copies)
        for args in copies:
            for source in args[:-1]:
                with self.subTest(source=source):
                    self.assertTrue(os.path.isfile(os.path.join(support.ROOT, source)))
                    self.assertFalse(dockerignored(source, patterns),
                                     "%s is excluded by .dockerignore" % source)
        for kept_out in ("data/store.pickle", ".git/HEAD", "bench/out/x.json",
                         "__pycache__/server.cpython-311.pyc", "tests/__pycache__/x.pyc",
                         ".lsfr/run-1/journal-1.log", "kvtest-x/LOCK", "token"):
            with self.subTest(kept_out=kept_out):
                self.assertTrue(dockerignored(kept_out, patterns),
                                "%s would be sent to the Docker daemon" % kept_out)

    def test_cmd_and_healthcheck_run_as_in_the_container(self):
        app = self.image_files()
        env = {"DATA_DIR": os.path.join(app, "data"), "PORT": str(support.free_port()),
               "HOST": "127.0.0.1", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd, check = self.cmd(), self.healthcheck()
        self.assertEqual((cmd[0], check[0]), ("python", "python"))

        server = BareServer(*cmd[1:], env=env, cwd=app, executable=sys.executable)
        self.addCleanup(server.__exit__, None, None, None)
        server.start()
        healthcheck = self.healthcheck_of(app, server, env)
        self.assertEqual(healthcheck(), 0, server.output())
        server.put("k", b"v")
        server.signal(signal.SIGTERM)                   # docker stop
        self.assertEqual(server.wait(DOCKER_STOP_TIMEOUT), 0, server.output())
        self.assertTrue(os.path.exists(os.path.join(app, "data", "store.pickle")))
        self.assertEqual(healthcheck(), 1, "the healthcheck passed with no server")

    def image_files(self):
        """A directory like the image's /app: only the files the Dockerfile COPYs."""
        app = tempfile.mkdtemp(prefix="kvtest-app-")
        self.addCleanup(shutil.rmtree, app, True)
        for instruction, args in self.instructions:
            if instruction == "COPY":
                for source in args.split()[:-1]:
                    shutil.copy(os.path.join(support.ROOT, source), app)
        return app

    def healthcheck_of(self, app, server, env):
        """A function running the HEALTHCHECK's command as Docker would; its exit code.

        The server is not PID 1 here: its PID is passed to the check.
        """
        check = self.healthcheck()

        def run():
            return subprocess.run([sys.executable] + check[1:] + [str(server.proc.pid)],
                                  env=clean_env(env), cwd=app, timeout=10,
                                  stdin=subprocess.DEVNULL, capture_output=True).returncode
        return run

    def test_healthcheck_follows_a_port_given_as_a_flag(self):
        # The image sets PORT; `docker run kvstore python server.py --port N`
        # overrides it, and the check must ask N (nothing listens on PORT).
        app = self.image_files()
        port = support.free_port()
        env = {"DATA_DIR": os.path.join(app, "data"), "PORT": str(support.free_port()),
               "PYTHONDONTWRITEBYTECODE": "1"}
        for form in (["--port", str(port)], ["--port=%d" % port]):
            with self.subTest(form=form):
                server = BareServer(*self.cmd()[1:] + form + ["--host", "127.0.0.1"], env=env,
                                    cwd=app, executable=sys.executable)
                self.addCleanup(server.__exit__, None, None, None)
                server.start()
                self.assertEqual(server.port, port)
                self.assertEqual(self.healthcheck_of(app, server, env)(), 0, server.output())
                server.signal(signal.SIGTERM)
                self.assertEqual(server.wait(DOCKER_STOP_TIMEOUT), 0, server.output())


@unittest.skipUnless(shutil.which("systemd-analyze"), "needs systemd-analyze")
class SystemdUnitTest(unittest.TestCase):

    def analyze(self, *args, unit=UNIT):
        return subprocess.run(["systemd-analyze"] + list(args) + [unit], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    def test_verify_is_clean(self):
        # verify checks that ExecStart's program exists: the unit as it would
        # be with /opt/kvstore holding this checkout's files.
        directory = tempfile.mkdtemp(prefix="kvtest-unit-")
        self.addCleanup(shutil.rmtree, directory, True)
        unit = os.path.join(directory, "kvstore.service")
        with open(UNIT, encoding="utf-8") as f, open(unit, "w", encoding="utf-8") as copy:
            copy.write(f.read().replace("/opt/kvstore/", support.ROOT + "/"))
        result = self.analyze("verify", unit=unit)
        output = result.stdout + result.stderr
        # Only what is about the unit: a host's own units may draw warnings.
        about_unit = [l for l in output.splitlines() if "kvstore" in l]
        self.assertEqual((result.returncode, about_unit), (0, []), output)

    def test_security_exposure_is_at_most_4(self):
        result = self.analyze("security", "--offline=yes", "--no-pager")
        if "offline" in result.stderr and result.returncode:
            self.skipTest("this systemd-analyze has no --offline: " + result.stderr.strip())
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        self.assertIsNotNone(match, result.stdout + result.stderr)
        self.assertLessEqual(float(match.group(1)), 4.0, result.stdout)


def unit_settings():
    """{key: [values]} of deploy/kvstore.service, comments dropped."""
    settings = {}
    with open(UNIT, encoding="utf-8") as f:
        for line in f:
            if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
                key, value = line.strip().split("=", 1)
                settings.setdefault(key, []).append(value)
    return settings


class UnitTest(unittest.TestCase):

    def test_reload_is_sighup_to_the_server(self):
        # run.sh execs the interpreter, so $MAINPID is the server itself.
        settings = unit_settings()
        self.assertEqual(settings["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        self.assertEqual(settings["Type"], ["exec"])

    def test_the_interpreter_is_a_setting_not_a_path_in_exec_start(self):
        settings = unit_settings()
        self.assertEqual([shlex.split(line)[0] for line in settings["ExecStart"]],
                         ["/opt/kvstore/run.sh"])
        self.assertIn("PYTHON=/usr/bin/python3", settings.get("Environment", []))
        self.assertNotIn("python3", settings["ExecStart"][0])


class StopTimeoutsTest(unittest.TestCase):

    def test_systemd_waits_longer_than_the_drain_and_the_save(self):
        settings = unit_settings()
        drain = shutdown_timeout(shlex.split(settings["ExecStart"][0]))
        self.assertEqual(settings["KillSignal"], ["SIGTERM"])
        self.assertGreaterEqual(float(settings["TimeoutStopSec"][0]), drain + 2 * SAVE_MARGIN)


NGINX_CONF = os.path.join(support.ROOT, "deploy", "nginx.conf")
MAX_VALUE_BYTES = 10485760      # the server's default --max-value-bytes
MAX_BATCH_BYTES = 67108864      # and --max-batch-bytes
# The http {} around deploy/nginx.conf: Debian's nginx.conf with its gzip
# lines uncommented, a common setup, and the one that made every If-Match a
# 412 (it compresses text/plain, and turns a strong ETag weak doing so).
NGINX_MAIN = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    gzip on;
    gzip_vary on;
    gzip_proxied any;
    gzip_comp_level 6;
    gzip_min_length 1;
    gzip_types text/plain text/css application/json application/javascript text/xml;
    include {dir}/kvstore.conf;
}}
"""


def substitute(text, pattern, replacement):
    """`text` with the one match of `pattern` replaced; AssertionError unless there is one."""
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise AssertionError("deploy/nginx.conf: %r matched %d times" % (pattern, count))
    return new


class NginxTest(unittest.TestCase):
    """deploy/nginx.conf in a real nginx: TLS, the body size, compare-and-set, a sub-path.

    One server, certificate and nginx for the class; each test begins with
    the store emptied.
    """

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        missing = [tool for tool in ("nginx", "openssl") if not shutil.which(tool)]
        if missing:
            what = " and ".join(missing)
            if os.environ.get("CI"):                # it must run there: never a silent skip
                raise AssertionError("%s not installed: .ci/run installs it with apt-get" % what)
            raise unittest.SkipTest("needs %s (apt-get install nginx openssl)" % what)
        cls.dir = tempfile.mkdtemp(prefix="kvtest-nginx-")
        cls.addClassCleanup(shutil.rmtree, cls.dir, True)
        os.chmod(cls.dir, 0o755)                # nginx's workers run as another user under root
        token = os.path.join(cls.dir, "token")
        with open(token, "wb") as f:
            f.write(b"nginx-test-token")
        os.chmod(token, 0o600)
        cls.auth = {"Authorization": "Bearer nginx-test-token"}
        cls.server = support.ServerProcess(os.path.join(cls.dir, "data"),
                                           "--auth-token-file", token)
        cls.addClassCleanup(cls.server.__exit__, None, None, None)
        cls.server.start()
        cls.certificate = cls.make_certificate()
        cls.port = support.free_port()
        cls.start_nginx()

    def setUp(self):
        super().setUp()
        self.assertEqual(self.server.request("DELETE", "/clear", None, self.auth)[0], 200)

    @classmethod
    def make_certificate(cls):
        """A self-signed certificate for localhost and 127.0.0.1; the path of its PEM."""
        cert, key = os.path.join(cls.dir, "tls.crt"), os.path.join(cls.dir, "tls.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-keyout", key, "-out", cert,
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        return cert

    @classmethod
    def kvstore_conf(cls):
        """deploy/nginx.conf aimed at the class's server, port and certificate, plus a sub-path."""
        with open(NGINX_CONF, encoding="utf-8") as f:
            conf = f.read()
        conf = substitute(conf, r"^(\s*)server 127\.0\.0\.1:8080;",
                          r"\g<1>server 127.0.0.1:%d;" % cls.server.port)
        conf = substitute(conf, r"^(\s*)listen 443 ssl;", r"\g<1>listen 127.0.0.1:%d ssl;"
                          % cls.port)
        conf = substitute(conf, r"^\s*listen \[::\]:443 ssl;\n", "")
        conf = substitute(conf, r"^(\s*ssl_certificate)\s.*;", r"\1 %s;" % cls.certificate)
        conf = substitute(conf, r"^(\s*ssl_certificate_key)\s.*;",
                          r"\1 %s;" % cls.certificate.replace(".crt", ".key"))
        # The same location again, under a sub-path, as its comment says.
        root = re.search(r"^    location / \{.*?^    \}\n", conf, re.MULTILINE | re.DOTALL)
        if root is None:
            raise AssertionError("no `location / {` block in deploy/nginx.conf")
        sub = root.group(0).replace("location / {", "location /kv-store/ {").replace(
            "proxy_pass http://kvstore;", "proxy_pass http://kvstore/;")
        return conf[:root.end()] + sub + conf[root.end():]

    @classmethod
    def start_nginx(cls):
        with open(os.path.join(cls.dir, "kvstore.conf"), "w") as f:
            f.write(cls.kvstore_conf())
        main = os.path.join(cls.dir, "nginx.conf")
        with open(main, "w") as f:
            f.write(NGINX_MAIN.format(dir=cls.dir))
        nginx = subprocess.Popen(
            ["nginx", "-p", cls.dir, "-e", os.path.join(cls.dir, "error.log"), "-c", main],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        cls.addClassCleanup(cls.stop_nginx, nginx)

        def ready():
            if nginx.poll() is not None:
                raise AssertionError("nginx exited %s: %s" % (nginx.returncode,
                                                               cls.nginx_log(nginx)))
            try:
                return cls.request("GET", "/health")[0] == 200
            except OSError:
                return False
        support.wait_until(ready, 30, 0.05, "nginx to serve /health")

    @classmethod
    def nginx_log(cls, nginx):
        output = nginx.stdout.read().decode("utf-8", "replace") if nginx.poll() is not None else ""
        try:
            with open(os.path.join(cls.dir, "error.log"), encoding="utf-8") as f:
                return output + f.read()
        except OSError:
            return output

    @staticmethod
    def stop_nginx(nginx):
        if nginx.poll() is None:
            os.killpg(nginx.pid, signal.SIGTERM)        # fast shutdown, workers included
            try:
                nginx.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(nginx.pid, signal.SIGKILL)
                nginx.wait(30)
        nginx.stdout.close()

    @classmethod
    def request(cls, method, path, body=None, headers=None):
        """One request through nginx, over TLS checked against the class's certificate."""
        context = ssl.create_default_context(cafile=cls.certificate)
        conn = http.client.HTTPSConnection("127.0.0.1", cls.port, context=context, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            body = response.read()
            if response.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)     # as a browser or curl --compressed would
            return response.status, response.headers, body
        finally:
            conn.close()

    def test_compare_and_set_works_through_gzip(self):
        value = b"a value that gzip would gladly compress " * 8
        compressed = dict(self.auth, **{"Accept-Encoding": "gzip"})
        status, headers, _ = self.request("PUT", "/kv/cas", value, compressed)
        self.assertEqual(status, 200)
        tag = headers["ETag"]
        status, headers, body = self.request("GET", "/kv/cas", None, compressed)
        self.assertEqual((status, body), (200, value))
        self.assertEqual(headers["ETag"], tag, "nginx changed the ETag (gzip makes it weak)")
        self.assertIsNone(headers.get("Content-Encoding"))
        if_match = dict(compressed, **{"If-Match": tag})
        status, _, _ = self.request("PUT", "/kv/cas", b"second", if_match)
        self.assertEqual(status, 200, "If-Match with the tag just read failed")
        status, _, _ = self.request("PUT", "/kv/cas", b"third", if_match)
        self.assertEqual(status, 412, "If-Match with a stale tag")
        status, _, body = self.request("GET", "/kv/cas", None, compressed)
        self.assertEqual((status, body), (200, b"second"))

    def test_the_largest_value_the_server_takes_passes(self):
        biggest = os.urandom(MAX_VALUE_BYTES)
        self.assertEqual(self.request("PUT", "/kv/big", biggest, self.auth)[0], 200)
        self.assertEqual(self.request("GET", "/kv/big", None, self.auth)[2], biggest)
        status, headers, body = self.request("PUT", "/kv/big", biggest + b"x", self.auth)
        self.assertEqual((status, body), (413, b"value too large\n"))
        self.assertEqual(headers["Content-Type"], "text/plain; charset=utf-8")

    def test_a_batch_larger_than_a_value_passes_up_to_the_batch_limit(self):
        line = b'{"key": "k%07d", "value": "' + base64.b64encode(b"v" * 3000) + b'"}\n'
        data = b"".join(line % i for i in range(MAX_VALUE_BYTES // len(line) + 10))
        self.assertGreater(len(data), MAX_VALUE_BYTES)
        status, _, body = self.request("POST", "/batch", data, self.auth)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["applied"], data.count(b"\n"))
        # Past the batch limit: refused from the Content-Length, body unsent.
        context = ssl.create_default_context(cafile=self.certificate)
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"POST /batch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: %s\r\n"
                        b"Content-Length: %d\r\n\r\n" % (self.auth["Authorization"].encode(),
                                                         MAX_BATCH_BYTES + 1))
            reply = support.read_until_quiet(tls, timeout=30)
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply)
        self.assertTrue(reply.endswith(b"\r\n\r\nbatch too large\n"), reply)

    def test_the_token_and_the_listing_pass_and_links_resolve_under_a_sub_path(self):
        status, headers, _ = self.request("GET", "/kv/x")
        self.assertEqual(status, 401)
        self.assertEqual(headers["WWW-Authenticate"], 'Bearer realm="kvstore"')
        for key in ("a", "b", "c"):
            self.assertEqual(self.request("PUT", "/kv-store/kv/" + key, b"v", self.auth)[0], 200)
        target, keys, pages = "/kv-store/kv?limit=2", [], 0
        while target:
            status, headers, body = self.request("GET", target, None, self.auth)
            self.assertEqual(status, 200, target)
            keys, pages = keys + body.decode().split(), pages + 1
            link = headers.get("Link")
            if link:            # resolved against the URL asked, as a client does
                reference = re.fullmatch(r'<([^>]*)>; rel="next"', link).group(1)
                target = urllib.parse.urljoin(target, reference)
                self.assertTrue(target.startswith("/kv-store/kv?"), target)
            else:
                target = None
        self.assertEqual((keys, pages), (["a", "b", "c"], 2))

    def test_a_backup_streams_through(self):
        self.assertEqual(self.request("PUT", "/kv/k", b"v", self.auth)[0], 200)
        status, headers, body = self.request("GET", "/snapshot", None, self.auth)
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/octet-stream")
        self.assertEqual(pickle.loads(body), {"k": b"v"})


if __name__ == "__main__":
    unittest.main()
