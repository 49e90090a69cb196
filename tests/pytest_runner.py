"""Runs one test file with pytest: the main of every `bazel test` target in tests/.

`pytest_test` (tests/pytest_test.bzl) copies this file next to each test as
its main and passes the test file's workspace-relative path, so that under
Bazel a test file runs exactly as under the README's `.venv/bin/pytest tests/`:
same pytest.ini, same tests/conftest.py (two logical CPU devices), same
markers. Extra arguments go to pytest, e.g.
`bazel run //tests:stats_test -- -v`.

It follows Bazel's test protocol: results as JUnit XML in $XML_OUTPUT_FILE,
and `bazel test --test_filter=EXPR` becomes pytest's `-k EXPR`.
"""

import os
import sys

import pytest


def pytest_args(argv, environ):
    """The pytest command line for `pytest_runner.py TEST_FILE [PYTEST_ARGS...]`.

    Args:
      argv: sys.argv; argv[1] is the test file relative to the workspace root.
      environ: the environment Bazel set (XML_OUTPUT_FILE, TESTBRIDGE_TEST_ONLY).

    Returns:
      Arguments for `pytest.main`.
    """
    # This file (a copy of it) lives in <runfiles>/<workspace>/tests/.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Bazel runs one target per file and schedules the targets itself: the file
    # runs in this process, not in pytest.ini's worker processes (`-n 0`).
    # A Bazel target is a whole file (Bazel's `size` is its tier): both of
    # pytest.ini's tiers, slow tests included.
    args = [os.path.join(root, argv[1]), "--rootdir", root, "-c", os.path.join(root, "pytest.ini"), "-n", "0",
            "-m", "slow or not slow"]
    if environ.get("XML_OUTPUT_FILE"):
        args.append("--junitxml=" + environ["XML_OUTPUT_FILE"])
    if environ.get("TESTBRIDGE_TEST_ONLY"):
        args += ["-k", environ["TESTBRIDGE_TEST_ONLY"]]
    return args + argv[2:]


def main():
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} TEST_FILE [PYTEST_ARGS...]")
    sys.exit(pytest.main(pytest_args(sys.argv, os.environ)))


if __name__ == "__main__":
    main()
