"""Run the whole suite: `python3 -m tests` (what `make test` does).

unittest's own summary ("Ran N tests ... OK") is followed by one plain line,
"N passed, N failed, N skipped", so that CI can read the count at a glance.
Arguments are test name patterns passed to unittest's -k, e.g.
`python3 -m tests shutdown`.
"""
import os
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
    loader = unittest.TestLoader()
    if argv:
        loader.testNamePatterns = ["*%s*" % a for a in argv]
    suite = loader.discover(os.path.join(ROOT, "tests"), top_level_dir=ROOT)
    result = unittest.TextTestRunner(verbosity=2, buffer=False).run(suite)
    # A failing subtest is listed once per subtest: count each test once.
    failed = len({getattr(test, "test_case", test).id()
                  for test, _ in result.failures + result.errors}
                 | {test.id() for test in result.unexpectedSuccesses})
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped), flush=True)
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
