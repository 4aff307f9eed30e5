"""The README tells the truth: every flag of --help is documented, every curl example works.

The curl examples are read from README.md, in order, and sent to a running
server: interpreted with http.client (so the test needs nothing but Python),
and also run with the real curl when it is installed.  Examples that send
the bearer token ("$(cat token)", as the README writes it) go to a server
started with --auth-token-file.  Each must get 200, or the status its
trailing comment starts with (`curl ...   # 412: why`).
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from tests import support

README = os.path.join(support.ROOT, "README.md")
TOKEN = "docs-example-token"
TOKEN_IN_README = "$(cat token)"


def readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def curl_examples(text):
    """Every line of the README that is a curl command, in order."""
    return [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]


def with_token(command):
    return command.replace(TOKEN_IN_README, TOKEN)


def expected_status(command):
    """The status a README curl example must get: its comment's leading number, else 200."""
    comment = re.search(r"\s#\s*(\d{3})\b", command)
    return int(comment.group(1)) if comment else 200


def as_request(command):
    """(method, path, body, headers) of a curl command line; only the flags the README uses."""
    words = shlex.split(with_token(command), comments=True)[1:]
    method, body, url, headers = None, None, None, {}
    while words:
        word = words.pop(0)
        if word == "-X":
            method = words.pop(0)
        elif word in ("--data-binary", "-d"):
            body = words.pop(0).encode()
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
    path = "/" + url.split("/", 1)[1]
    return method or ("PUT" if body is not None else "GET"), path, body, headers


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

    def servers(self):
        """A server without a token, and one whose token is TOKEN; `pick(command)` chooses."""
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
                method, path, body, headers = as_request(command)
                self.assertTrue(path.startswith(("/kv", "/clear", "/health", "/metrics",
                                                 "/snapshot")), command)
                status, _, _ = pick(command).request(method, path, body, headers)
                self.assertEqual(status, expected_status(command), command)

    def test_curl_examples_with_the_real_curl(self):
        if not shutil.which("curl"):
            self.skipTest("curl is not installed")
        pick = self.servers()
        workdir = tempfile.mkdtemp(dir=self.data_dir)      # where `-o FILE` writes
        for command in curl_examples(readme()):
            with self.subTest(command=command):
                words = shlex.split(with_token(command).replace(
                    "localhost:8080", "127.0.0.1:%d" % pick(command).port), comments=True)
                if "-o" not in words:
                    words += ["-o", os.devnull]
                run = subprocess.run(words + ["-s", "-w", "%{http_code}", "--max-time", "30"],
                                     capture_output=True, text=True, cwd=workdir)
                self.assertEqual((run.returncode, run.stdout),
                                 (0, str(expected_status(command))), command)
