"""End-to-end tests of bin/analyze.py: main under flagsaver, and one-line errors in a subprocess."""

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from unittest import mock

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import pytest

from tf_consreg import analysis
from tf_consreg import files
from tf_consreg.errors import ConfigError

import binaries  # tests/binaries.py
import mounts  # tests/mounts.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bin/analyze.py, loaded by setUpModule: its --radii is bin/certify.py's
# name too, so the two binaries' flags cannot be defined at once.
analyze_bin = None


def setUpModule():
    global analyze_bin  # pylint: disable=global-statement
    analyze_bin = binaries.load("analyze")


def tearDownModule():
    binaries.unload(analyze_bin)


# Three rows: correct with radii 0.5 and 1.5, one abstention. n = 3,
# clean accuracy 2/3, ACR (0.5 + 1.5) / 3 = 2/3, certified accuracy at
# r = 1: only the 1.5 row -> 1/3.
TSV = ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
       "0\t1\t1\t0.5\t1\t0:00:00.100000\n"
       "1\t2\t2\t1.5\t1\t0:00:00.100000\n"
       "2\t3\t-1\t0.0\t0\t0:00:00.100000\n")

# TensorFlow's C++ runtime logs a few lines on import whatever the log level.
_TF_LOG_PREFIXES = ("I0000", "W0000", "E0000", "WARNING: All log messages")


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(_TF_LOG_PREFIXES)]


@contextlib.contextmanager
def _fifo_never_blocks(path):
    """Makes a FIFO at `path`; should anything open it for reading, a writer comes and goes at once.

    The reader then reads an empty file instead of waiting forever, so a
    check that opens the FIFO fails its test instead of hanging it.
    """
    os.mkfifo(path)
    done = threading.Event()

    def unblock():
        while not done.wait(0.05):
            try:  # Succeeds only while a reader has the FIFO open.
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join(timeout=10)


class AnalyzeBinaryTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.tsv = os.path.join(self.dir, "run.tsv")
        with open(self.tsv, "w", encoding="utf-8") as f:
            f.write(TSV)

    def _main(self, *files, **flag_values):
        out = io.StringIO()
        with flagsaver.flagsaver(**flag_values), contextlib.redirect_stdout(out):
            analyze_bin.main(["analyze", *files])
        return out.getvalue()

    def test_files_as_arguments_come_before_the_flag_list(self):
        other = os.path.join(self.dir, "other.tsv")
        shutil.copy(self.tsv, other)
        report = json.loads(self._main(other, tsv=[self.tsv], format="json"))
        self.assertEqual([r["file"] for r in report], [other, self.tsv])

    def test_json(self):
        report = json.loads(self._main(tsv=[self.tsv, self.tsv], format="json", radii=["0", "1"]))
        self.assertLen(report, 2)
        self.assertEqual(report[0]["n"], 3)
        self.assertAlmostEqual(report[0]["clean_accuracy"], 2 / 3)
        self.assertAlmostEqual(report[0]["acr"], 2 / 3)
        self.assertEqual(list(report[0]["certified_accuracy"]), ["0.0", "1.0"])
        self.assertAlmostEqual(report[0]["certified_accuracy"]["1.0"], 1 / 3)

    def test_markdown_and_plot(self):
        plot = os.path.join(self.dir, "curves.png")
        table = self._main(tsv=[self.tsv], labels=["mine"], plot=plot)
        self.assertIn("| mine | 3 | 0.667 | 0.6667 | 0.667 | 0.667 | 0.667 | 0.333 |", table)
        with open(plot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def _shards(self, num_shards=2, **settings):
        """TSV's rows dealt to shards, with the settings files bin/certify.py writes."""
        rows = TSV.split("\n")[1:-1]
        paths = []
        for index in range(num_shards):
            path = os.path.join(self.dir, f"certify.shard{index}.tsv")
            with open(path, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in [TSV.split("\n")[0]] + rows[index::num_shards]))
            with open(path + ".json", "w", encoding="utf-8") as f:
                json.dump(dict({"n": 100, "sigma": 0.5, "skip": 1}, num_shards=num_shards, shard_index=index,
                               **settings), f)
            paths.append(path)
        return paths

    def test_shards_are_one_run(self):
        shards = self._shards()
        report = json.loads(self._main(*shards, self.tsv, format="json"))
        self.assertEqual([r["n"] for r in report], [3, 3])
        self.assertEqual(report[0]["files"], shards)
        self.assertAlmostEqual(report[0]["acr"], report[1]["acr"])

    def test_incomplete_run_only_with_the_flag(self):
        shards = self._shards(num_shards=3)
        with self.assertRaisesRegex(ConfigError, "shard 2 of 3 is missing"):
            self._main(*shards[:2])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            table = self._main(*shards[:2], allow_incomplete=True)
        self.assertIn("(incomplete) | 2 |", table)
        self.assertRegex(err.getvalue(), r"^analyze.py: warning: .*shard\{0,1\}.tsv: incomplete sharded run "
                         r"\(shard 2 of 3 is missing\); reporting its 2 examples\n$")

    @contextlib.contextmanager
    def _failing_place(self, how, options, error):
        """A tmpfs mounted with `options` (root), or a temporary directory where `error` is raised by mock."""
        if how == "mount":
            with mounts.tmpfs(options) as directory:
                if directory is None:
                    self.skipTest("mounting a tmpfs needs root here; the mock case covers the code")
                yield directory
            return
        with error:
            yield self.dir

    @parameterized.parameters("mount", "mock")
    def test_a_read_only_plot_directory_is_refused_before_any_work(self, how):
        erofs = mock.patch.object(files.tempfile, "mkstemp", side_effect=OSError(errno.EROFS, os.strerror(errno.EROFS)))
        with self._failing_place(how, "ro", erofs) as read_only:
            plot = os.path.join(read_only, "curves.png")
            with mock.patch.object(analysis, "read_run") as read:
                with self.assertRaisesWithLiteralMatch(
                        ConfigError, f"--plot={plot}: cannot write in {read_only} (Read-only file system)"):
                    self._main(tsv=[self.tsv], plot=plot)
                read.assert_not_called()
            self.assertFalse(os.path.exists(plot))

    @parameterized.parameters("mount", "mock")
    def test_a_full_disk_leaves_no_plot(self, how):
        # 4 KiB hold the write check's empty file, not the PNG (tens of KB). By mock: the ENOSPC a file system
        # that allocates late reports at fsync.
        enospc = mock.patch.object(files.os, "fsync", side_effect=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        with self._failing_place(how, "size=4k", enospc) as full:
            before = sorted(os.listdir(full))
            plot = os.path.join(full, "curves.png")
            with self.assertRaises(OSError) as raised:
                self._main(tsv=[self.tsv], plot=plot)
            self.assertEqual((raised.exception.filename, raised.exception.errno), (plot, errno.ENOSPC))
            self.assertEqual(sorted(os.listdir(full)), before)  # Neither the plot nor its temporary file.

    def test_plot_over_a_file_needs_overwrite(self):
        # Issue 16, item 5: nothing is overwritten without being asked.
        plot = os.path.join(self.dir, "curves.png")
        with open(plot, "w", encoding="utf-8") as f:
            f.write("mine")
        with self.assertRaisesRegex(ConfigError, f"^--plot={plot} exists; pass --overwrite"):
            self._main(tsv=[self.tsv], plot=plot)
        with open(plot, encoding="utf-8") as f:
            self.assertEqual(f.read(), "mine")
        self._main(tsv=[self.tsv], plot=plot, overwrite=True)
        with open(plot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_a_fifo_or_a_device_is_named_not_opened(self):
        with _fifo_never_blocks(os.path.join(self.dir, "pipe.tsv")) as fifo:
            with self.assertRaisesRegex(ConfigError, f"^--tsv: {fifo} is a FIFO \\(named pipe\\), not a file$"):
                self._main(fifo)
            # Matched by a pattern too.
            with self.assertRaisesRegex(ConfigError, f"^--tsv: {fifo} is a FIFO"):
                self._main(tsv=[os.path.join(self.dir, "*.tsv")])
        with self.assertRaisesRegex(ConfigError, "^--tsv: /dev/zero is a character device, not a file$"):
            self._main("/dev/zero")

    def test_bad_radii_flag(self):
        with self.assertRaisesRegex(ConfigError, "--radii"):
            self._main(tsv=[self.tsv], radii=["zero"])

    def test_flags_and_defaults(self):
        # --radii: None is analysis.DEFAULT_RADII, or a fixed-radius run's own radii.
        expected = {"tsv": None, "radii": None, "format": "markdown", "plot": None, "labels": None,
                    "allow_incomplete": False, "overwrite": False}
        self.assertEqual({name: flags.FLAGS[name].default for name in expected}, expected)

    @pytest.mark.slow  # Two fresh interpreters importing TensorFlow.
    def test_errors_are_one_line(self):
        bad = os.path.join(self.dir, "bad.tsv")
        with open(bad, "w", encoding="utf-8") as f:
            f.write(TSV + "3\t1\t1\n")
        shards = self._shards()
        fifo = os.path.join(self.dir, "pipe")
        os.mkfifo(fifo)
        for args, expected in (
                (["--tsv=" + self.tsv, "--format=yaml"], "analyze.py: error: --format='yaml' is unknown"),
                (["--tsv=" + bad], f"analyze.py: error: {bad}:5: expected 6 tab-separated fields, got 3"),
                ([*shards, shards[1]], f"analyze.py: error: {shards[1]} is given twice (shard 1 of 2)"),
                ([shards[0]], "analyze.py: error: " + os.path.join(self.dir, "certify.shard0.tsv: incomplete")),
                ([self.dir], f"analyze.py: error: --tsv: {self.dir} is a directory; give the TSV files in it"),
                (["/dev/zero"], "analyze.py: error: --tsv: /dev/zero is a character device, not a file"),
                ([fifo], f"analyze.py: error: --tsv: {fifo} is a FIFO (named pipe), not a file"),
        ):
            # Bounded: a binary that opened the FIFO would wait for a writer forever.
            result = subprocess.run([sys.executable, os.path.join(REPO, "bin", "analyze.py"), *args],
                                    capture_output=True, text=True, check=False, timeout=300)
            self.assertEqual(result.returncode, 2)
            lines = _error_lines(result.stderr)
            self.assertLen(lines, 1, result.stderr)
            self.assertStartsWith(lines[0], expected)
            self.assertEqual(result.stdout, "")


if __name__ == "__main__":
    absltest.main()
