"""Checks of the deployment files: Dockerfile, .dockerignore, deploy/kvstore.service.

No Docker engine is needed (there is none where this was written): the
Dockerfile is parsed for what the clstr harness and `docker stop` rely on,
and its CMD and HEALTHCHECK are run here as the container would run them,
from a directory holding only the files the image COPYs, against a real
server.  The systemd unit goes through `systemd-analyze verify` and
`systemd-analyze security --offline=yes` when systemd-analyze is installed.
"""
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

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
        self.assertIn("/health", " ".join(argv))

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
        # /app of the image: only the files it COPYs.
        app = tempfile.mkdtemp(prefix="kvtest-app-")
        self.addCleanup(shutil.rmtree, app, True)
        for instruction, args in self.instructions:
            if instruction == "COPY":
                for source in args.split()[:-1]:
                    shutil.copy(os.path.join(support.ROOT, source), app)
        env = {"DATA_DIR": os.path.join(app, "data"), "PORT": str(support.free_port()),
               "HOST": "127.0.0.1", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd, check = self.cmd(), self.healthcheck()
        self.assertEqual((cmd[0], check[0]), ("python", "python"))

        def healthcheck():
            return subprocess.run([sys.executable] + check[1:], env=clean_env(env), cwd=app,
                                  timeout=10, stdin=subprocess.DEVNULL,
                                  capture_output=True).returncode

        server = BareServer(*cmd[1:], env=env, cwd=app, executable=sys.executable)
        self.addCleanup(server.__exit__, None, None, None)
        server.start()
        self.assertEqual(healthcheck(), 0, server.output())
        server.put("k", b"v")
        server.signal(signal.SIGTERM)                   # docker stop
        self.assertEqual(server.wait(DOCKER_STOP_TIMEOUT), 0, server.output())
        self.assertTrue(os.path.exists(os.path.join(app, "data", "store.pickle")))
        self.assertEqual(healthcheck(), 1, "the healthcheck passed with no server")


@unittest.skipUnless(shutil.which("systemd-analyze"), "needs systemd-analyze")
class SystemdUnitTest(unittest.TestCase):

    def analyze(self, *args):
        return subprocess.run(["systemd-analyze"] + list(args) + [UNIT], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    def test_verify_is_clean(self):
        exec_start = unit_settings()["ExecStart"][0].split()[0]
        if not os.access(exec_start, os.X_OK):
            self.skipTest("%s (the unit's ExecStart) is not here" % exec_start)
        result = self.analyze("verify")
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


class StopTimeoutsTest(unittest.TestCase):

    def test_systemd_waits_longer_than_the_drain_and_the_save(self):
        settings = unit_settings()
        drain = shutdown_timeout(shlex.split(settings["ExecStart"][0]))
        self.assertEqual(settings["KillSignal"], ["SIGTERM"])
        self.assertGreaterEqual(float(settings["TimeoutStopSec"][0]), drain + 2 * SAVE_MARGIN)


if __name__ == "__main__":
    unittest.main()
