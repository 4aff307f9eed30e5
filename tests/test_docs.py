"""The docs tell the truth: every flag of --help is in the README, every curl example works,
and every name ARCHITECTURE.md gives in backticks exists in the code.

The curl examples are read from README.md, in order, and sent to a running
server: interpreted with http.client (so the test needs nothing but Python),
and also run with the real curl when it is installed.  Examples that send
the bearer token ("$(cat ~/kvstore.token)", as the README writes it) go to
a server started with --auth-token-file.  Each must get 200, or the status
the trailing comment starts with (`curl ...   # 412: why`).  The recipes
in ```sh blocks need a shell: bash runs them, with the real curl (the copy
recipe here, the others in tests/test_expiry.py).
"""
import importlib
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

README = os.path.join(support.ROOT, "README.md")
ARCHITECTURE = os.path.join(support.ROOT, "ARCHITECTURE.md")
TOKEN = "docs-example-token"
TOKEN_IN_README = "$(cat ~/kvstore.token)"
MAX_WORDS = 2400     # 1,600 before expiry, watches, batches and export; the recipes cost most
OTHER_SERVER = "localhost:8081"     # where the README copies a store to


def readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


SHELL_RECIPE = re.compile(r"^```sh\n(.*?)^```$", re.M | re.S)


def shell_recipes(text):
    """The README's ```sh blocks: scripts that need a shell (tests/test_expiry.py runs them)."""
    return SHELL_RECIPE.findall(text)


def curl_examples(text):
    """Every line of the README that is a curl command, in order, outside the ```sh blocks."""
    text = SHELL_RECIPE.sub("", text)
    return [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]


def with_token(command):
    return command.replace(TOKEN_IN_README, TOKEN)


def expected_status(command):
    """The status a README curl example must get: its comment's leading number, else 200."""
    comment = re.search(r"\s#\s*(\d{3})\b", command)
    return int(comment.group(1)) if comment else 200


def as_request(command):
    """(method, URL, body, headers) of a curl command line; only the flags the README uses."""
    words = shlex.split(with_token(command), comments=True)
    if words.pop(0) != "curl" or "|" in words:
        raise AssertionError("a README example of something but one curl: %s" % command)
    method, body, url, headers = None, None, None, {}
    while words:
        word = words.pop(0)
        if word == "-X":
            method = words.pop(0)
        elif word in ("--data-binary", "-d"):
            body = words.pop(0).encode()
            method = method or "POST"
        elif word == "-I":
            method = "HEAD"
        elif word == "-H":
            name, _, value = words.pop(0).partition(":")
            headers[name.strip()] = value.strip()
        elif word == "-o":
            words.pop(0)                # the body is not checked, only the status
        elif word in ("-s", "-i", "-f", "-sf"):
            pass
        elif word.startswith("-"):
            raise AssertionError("README curl flag not understood by this test: %s" % word)
        else:
            url = word
    return method or "GET", url, body, headers


class ReadmeTest(support.ServerTestCase):

    def test_every_flag_of_help_is_in_the_readme(self):
        out = subprocess.run([sys.executable, support.SERVER, "--help"], capture_output=True,
                             text=True, check=True).stdout
        flags = set(re.findall(r"--[a-z][a-z-]+", out)) - {"--help"}
        self.assertGreaterEqual(len(flags), 8, out)
        text = readme()
        for flag in sorted(flags):
            with self.subTest(flag=flag):
                self.assertIn("`%s`" % flag, text)

    def test_the_quick_start_prints_what_the_readme_shows(self):
        """The log lines the README shows for ./run.sh, a PUT and Ctrl-C, numbers and paths aside."""
        text = readme()
        shown = []
        for intro in ("`./run.sh` prints:", "saves and exits 0:"):
            block = text[text.index(intro) + len(intro):].lstrip("\n")
            for line in block.splitlines():
                if not line.startswith("    "):
                    break
                shown.append(line.strip())
        self.assertGreaterEqual(len(shown), 6, shown)
        server = self.start_server(host="0.0.0.0")
        server.put("greeting", b"hello")
        server.signal(signal.SIGINT)
        self.assertEqual(server.wait(), 0)
        printed = server.output().splitlines()
        for line in shown:
            with self.subTest(line=line):
                pattern = re.escape(line)
                pattern = re.sub(r"(/[\w.-]+)+", r"\\S+", pattern.replace("\\/", "/"))
                pattern = re.sub(r"\d+(\\\.\d+)*", r"[\\d.]+", pattern)
                self.assertTrue(any(re.fullmatch(pattern, p) for p in printed),
                                "%r not in the output:\n%s" % (line, server.output()))

    def test_it_stays_short_and_its_operating_section_covers_reload_logs_and_the_proxy(self):
        text = readme()
        self.assertLessEqual(len(text.split()), MAX_WORDS)
        self.assertLess(text.index("## Quick start"), text.index("## Operating it"))
        operating = text[text.index("## Operating it"):]
        operating = operating[:operating.index("\n## ", 1)]
        for topic in ("SIGHUP", "token file again", "never stops", "`--log-format json`",
                      "RFC 3339", "`--access-log`", "`deploy/nginx.conf`", "gzip",
                      "`systemctl reload`"):
            with self.subTest(topic=topic):
                self.assertIn(topic, operating)
        self.assertNotIn("SIGHUP (unless ignored", text)        # it no longer stops the server

    @unittest.skipUnless(shutil.which("git") and os.path.exists(os.path.join(support.ROOT, ".git")),
                         "needs git and a checkout")
    def test_secrets_and_backups_stay_out_of_git(self):
        # The README's commands write outside the repository; files of these
        # names written inside it anyway stay out of commits.
        for path in ("token", "kv.token", "backup.pickle", "restored/store.pickle",
                     "data/store.pickle"):
            with self.subTest(path=path):
                run = subprocess.run(["git", "-C", support.ROOT, "check-ignore", "--no-index",
                                      "-q", path], capture_output=True, timeout=30)
                self.assertEqual(run.returncode, 0, "%s is not git-ignored" % path)
        commands = [line for line in readme().splitlines() if line.startswith("    ")]
        for command in commands:
            with self.subTest(command=command.strip()):
                self.assertNotRegex(command, r"(>|-o|cp \S+) +(token|backup\.pickle)\b")

    def servers(self):
        """A server without a token, and one whose token is TOKEN.

        Returns pick(command): the server a curl of that command line goes to.
        """
        plain = self.start_server()
        token_file = os.path.join(self.data_dir, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        guarded = self.start_server("--auth-token-file", token_file,
                                    data_dir=tempfile.mkdtemp(dir=self.data_dir))
        return lambda command: guarded if TOKEN_IN_README in command else plain

    def test_every_curl_example_works(self):
        examples = curl_examples(readme())
        self.assertGreaterEqual(len(examples), 6)
        pick = self.servers()
        for command in examples:
            with self.subTest(command=command):
                method, url, body, headers = as_request(command)
                path = "/" + url.split("/", 1)[1]
                self.assertTrue(path.startswith(("/kv", "/clear", "/health", "/metrics",
                                                 "/snapshot", "/export", "/batch")), command)
                status = pick(command).request(method, path, body, headers)[0]
                self.assertEqual(status, expected_status(command), command)

    def test_the_copy_recipe_copies_the_store(self):
        # Run by bash with the real curl; batches of 2 lines (the target's
        # --max-batch-ops, the recipe's split -l), so that 5 keys take 3.
        if not shutil.which("curl"):
            self.skipTest("curl is not installed")
        recipes = [r for r in shell_recipes(readme()) if "/export" in r and OTHER_SERVER in r]
        self.assertEqual(len(recipes), 1, "one copy recipe in the README")
        self.assertIn("split -l 10000 ", recipes[0])
        source = self.start_server()
        target = self.start_server("--max-batch-ops", "2",
                                   data_dir=tempfile.mkdtemp(dir=self.data_dir))
        copied = {"app/db/url": b"db1", "b": bytes(range(256)), "c": b"z", "d/e": b"x", "f": b"y"}
        for key, value in copied.items():
            source.put(key, value)
        script = (recipes[0].replace("split -l 10000 ", "split -l 2 ")
                  .replace(OTHER_SERVER, "127.0.0.1:%d" % target.port)
                  .replace("localhost:8080", "127.0.0.1:%d" % source.port))
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=self.data_dir,
                              capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual([json.loads(line)["applied"] for line in done.stdout.splitlines()],
                         [2, 2, 1])
        self.assertEqual({key: target.get(key) for key in copied}, copied)

    def test_curl_examples_with_the_real_curl(self):
        if not shutil.which("curl"):
            self.skipTest("curl is not installed")
        pick = self.servers()
        workdir = tempfile.mkdtemp(dir=self.data_dir)      # where `-o FILE` writes
        for command in curl_examples(readme()):
            with self.subTest(command=command):
                line = with_token(command).replace("~/", workdir + "/")
                host = as_request(command)[1].split("/", 1)[0]
                line = line.replace(host, "127.0.0.1:%d" % pick(command).port)
                line = line.split(" #", 1)[0].rstrip()
                if " -o " not in line:
                    line += " -o " + os.devnull
                run = subprocess.run(["bash", "-c", line + " -s -w '%{http_code}' --max-time 30"],
                                     capture_output=True, text=True, cwd=workdir)
                self.assertEqual((run.returncode, run.stdout),
                                 (0, str(expected_status(command))), command)


# A name in backticks: `Store.put`, `os.fsync(fd)`, `serve_forever`, `READ_SIZE`,
# `test_crash.JournalDamageTest`.  Flags, paths and phrases are not names.
NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(?:\([a-z_, ]*\))?`")
CODE_MODULES = ("server", "store", "persistence")
FILE_SUFFIXES = (".py", ".md", ".service", ".log", ".pickle")


def _code_modules():
    sys.path.insert(0, support.ROOT)
    try:
        return [importlib.import_module(name) for name in CODE_MODULES]
    finally:
        sys.path.remove(support.ROOT)


def _sources(modules):
    text = ""
    for module in modules:
        with open(module.__file__, encoding="utf-8") as f:
            text += f.read()
    return text


def resolve(name, modules, source):
    """True if `name` exists: a module or test module and its attributes, or a name in the code.

    `A.b` resolves as the attribute b of A, where A is a module (importable,
    or tests.A) or a global of a code module; failing that, b may be an
    instance attribute, set as `self.b =` in the code.  A bare name is a
    global of a code module, an attribute of one of their classes (a
    method), or an attribute set on self.
    """
    first, *rest = name.split(".")
    owners = [getattr(m, first) for m in modules if hasattr(m, first)]
    for module_name in (first, "tests." + first):
        if not owners:
            try:
                sys.path.insert(0, support.ROOT)
                owners = [importlib.import_module(module_name)]
            except ImportError:
                pass
            finally:
                sys.path.remove(support.ROOT)
    if not owners and not rest:
        owners = [getattr(value, first) for m in modules for value in vars(m).values()
                  if isinstance(value, type) and hasattr(value, first)]
    if not owners:                     # an attribute set on self, or a thread's name
        return bool(not rest and re.search(r"self\.%s\b|name=\"%s\"" % (first, first), source))
    for owner in owners:
        value = owner
        for i, part in enumerate(rest):
            if hasattr(value, part):
                value = getattr(value, part)
            elif i == len(rest) - 1 and isinstance(value, type) and re.search(
                    r"self\.%s\s*=" % re.escape(part), source):
                value = part            # an instance attribute
            else:
                break
        else:
            return True
    return False


class ArchitectureTest(unittest.TestCase):

    def test_every_name_in_backticks_exists(self):
        with open(ARCHITECTURE, encoding="utf-8") as f:
            text = f.read()
        modules = _code_modules()
        source = _sources(modules)
        names = sorted(name for name in set(NAME.findall(text))
                       if not name.endswith(FILE_SUFFIXES) and name != "Dockerfile")
        self.assertGreater(len(names), 50)
        names += sorted(set(re.findall(r"`([a-z]+(?:-[a-z]+)+)`", text)))    # threads' names
        for name in names:
            with self.subTest(name=name):
                self.assertTrue(resolve(name, modules, source), "%s is not in the code" % name)

    def test_every_file_it_names_exists(self):
        with open(ARCHITECTURE, encoding="utf-8") as f:
            text = f.read()
        for path in sorted(set(re.findall(r"`([\w/.-]+)`", text))):
            if path.endswith(FILE_SUFFIXES) or path == "Dockerfile":
                with self.subTest(path=path):
                    self.assertTrue(os.path.exists(os.path.join(support.ROOT, path)), path)

    def test_the_name_check_can_fail(self):
        modules = _code_modules()
        source = _sources(modules)
        for name in ("Store.put", "Journal.pump", "os.fsync", "REQUESTS_PER_TURN",
                     "asyncio.Protocol", "Store._lock", "journal-loop",
                     "test_crash.JournalDamageTest.test_flipped_byte_in_the_middle_refuses_to_start"):
            self.assertTrue(resolve(name, modules, source), name)
        for name in ("Store.putt", "Journal.write_round", "os.fsyncc", "REQUESTS_PER_TURNS",
                     "asyncio.Protocols", "test_crash.JournalDamageTest.test_nothing",
                     "no_such_module.thing", "journal-loops"):
            self.assertFalse(resolve(name, modules, source), name)

    def test_the_walk_throughs_in_server_py_name_real_functions(self):
        modules = _code_modules()
        source = _sources(modules)
        doc = modules[0].__doc__
        walk = doc[doc.index("A PUT, from the socket to the disk"):]
        names = re.findall(r"^    ([A-Za-z_][\w.]*)(?:\(\))? ", walk, re.MULTILINE)
        self.assertGreater(len(names), 12, walk)
        for name in names:
            with self.subTest(name=name):
                self.assertTrue(resolve(name, modules, source), "%s is not in the code" % name)
