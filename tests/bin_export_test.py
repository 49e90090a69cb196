"""bin/export.py end to end, in subprocesses: the TF Serving layout it writes and its one-line errors.

The binary runs in a subprocess rather than under `flagsaver`: its flags
(--model_dir, --sigma, ...) share names with other binaries' flags, and absl
refuses to define a flag twice in one process. The library side
(`VersionExportConfig`, `export_version`) is tested in-process in export_test.py.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf

import binaries  # tests/binaries.py
import mounts  # tests/mounts.py
from export_test import make_model_dir  # tests/ is on sys.path under pytest
from tf_consreg import export
from tf_consreg.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY = ("--n0=4", "--n=16", "--batch_size=16")


def _run_bin(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "bin", "export.py"), *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("export.py: error:")]


class FlagsTest(absltest.TestCase):

    def test_flags_and_defaults(self):
        self.assertEqual(binaries.flag_defaults("export"), {
            "model_dir": None, "model": None, "export_dir": None, "sigma": None, "n0": 100, "n": 10000,
            "alpha": 0.001, "batch_size": 1000, "stages": None, "version": None, "check_images": 0, "compute_dtype": "float32",
            "noise": "grid", "max_batch": 64, "classifier": None, "denoiser": None})


class ExportBinaryTest(parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.model_dir = make_model_dir(cls._tmp.name, sigma=0.5)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    def _export_dir(self, name):
        return os.path.join(self._tmp.name, name)

    @pytest.mark.slow
    def test_writes_a_servable_version_and_never_overwrites_it(self):
        export_dir = self._export_dir("serving")
        result = _run_bin(f"--model_dir={self.model_dir}", f"--export_dir={export_dir}", "--version=7",
                          "--check_images=2", *_TINY)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn(os.path.join(export_dir, "7"), result.stdout)
        # The check answers one request through the reloaded serving_default.
        self.assertRegex(result.stdout, r"image 0: label 9 \(Ankle boot\) -> (abstain|class \d \(.*\), radius \d)")
        self.assertIn("image 1: label 2 (Pullover) ->", result.stdout)
        self.assertEqual(os.listdir(export_dir), ["7"])
        version_dir = os.path.join(export_dir, "7")
        for name in ("saved_model.pb", "variables", "assets.extra/tf_serving_warmup_requests",
                     "assets.extra/smoothing_metadata.json"):
            self.assertTrue(os.path.exists(os.path.join(version_dir, name)), name)
        meta = export.read_metadata(version_dir)
        self.assertEqual((meta["sigma"], meta["n0"], meta["n"], meta["alpha"]), (0.5, 4, 16, 0.001))
        self.assertEqual(meta["stages"], [16])
        self.assertIn("stages=16, base model computing in float32) to", result.stdout)
        self.assertEqual(meta["class_names"][9], "Ankle boot")
        # The default export samples grid noise: its images must be on the 8-bit grid (128 / 255, not 0.5).
        self.assertEqual(meta["noise"], "grid")
        out = tf.saved_model.load(version_dir).signatures["serving_default"](
            images=tf.constant(np.full((2, 28, 28, 1), np.float32(128) / np.float32(255), np.float32)))
        self.assertEqual(out["class"].shape, (2,))

        saved = open(os.path.join(version_dir, "saved_model.pb"), "rb").read()
        again = _run_bin(f"--model_dir={self.model_dir}", f"--export_dir={export_dir}", "--version=7",
                         "--sigma=0.25", *_TINY)
        self.assertEqual(again.returncode, 2)
        self.assertLen(_error_lines(again), 1)
        self.assertIn("exists; exports are never overwritten", again.stderr)
        self.assertEqual(os.listdir(export_dir), ["7"])
        self.assertEqual(open(os.path.join(version_dir, "saved_model.pb"), "rb").read(), saved)

    @pytest.mark.slow
    def test_model_file_and_timestamp_version(self):
        export_dir = self._export_dir("from_file")
        # What a killed export leaves (unlocked, older than a minute): removed, and said so.
        os.makedirs(export_dir)
        stale = tempfile.mkdtemp(dir=export_dir, prefix=".5.incomplete-")
        os.utime(stale, (time.time() - 3600, time.time() - 3600))
        before = int(time.time())
        result = _run_bin(f"--model={os.path.join(self.model_dir, 'base_model.keras')}", "--sigma=0.3",
                          f"--export_dir={export_dir}", "--compute_dtype=bfloat16", *_TINY)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn(f"Removed {stale}, the unfinished staging directory of an export that was killed",
                      result.stdout)
        self.assertIn("base model computing in bfloat16", result.stdout)
        (version,) = os.listdir(export_dir)
        self.assertRegex(version, r"^\d+$")
        self.assertBetween(int(version), before, int(time.time()))
        meta = export.read_metadata(os.path.join(export_dir, version))
        self.assertEqual((meta["sigma"], meta["compute_dtype"]), (0.3, "bfloat16"))

    @pytest.mark.slow  # each case starts TensorFlow in a subprocess (~10 s on 2 busy cores)
    @parameterized.named_parameters(
        # One case per exit path through the real process: a config check (ConfigError), absl's flag parsing, and
        # a model file that cannot be loaded. The other checks run in process (ExportErrorsTest).
        ("sigma", ("--model_dir=MODEL_DIR", "--sigma=0"), r"--sigma must be a finite number > 0, got 0.0"),
        ("stages_words", ("--model_dir=MODEL_DIR", "--stages=ten,100"),
         r"^export.py: error: --stages: 'ten,100' is not a list of int values$"),
        ("truncated_model", ("--model=TRUNCATED", "--sigma=0.25"),
         r"^export.py: error: .*truncated\.keras is not a complete \.keras file \(a zip archive\)"),
    )
    def test_bad_input_gives_one_line_and_writes_nothing(self, args, message):
        export_dir = self._export_dir("bad_" + re.sub(r"\W", "_", args[-1]))
        truncated = os.path.join(self._tmp.name, "truncated.keras")
        if not os.path.exists(truncated):
            with open(os.path.join(self.model_dir, "base_model.keras"), "rb") as f:
                whole = f.read()
            with open(truncated, "wb") as f:
                f.write(whole[:len(whole) // 2])
        args = [a.replace("MODEL_DIR", self.model_dir).replace("TRUNCATED", truncated) for a in args]
        result = _run_bin(*args, f"--export_dir={export_dir}", timeout=120)
        self.assertEqual(result.returncode, 2, result.stderr[-2000:])
        lines = _error_lines(result)
        self.assertLen(lines, 1, result.stderr)
        self.assertRegex(lines[0], message)
        self.assertEqual(result.stderr.rstrip().splitlines()[-1], lines[0])  # the last thing printed
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(os.path.exists(export_dir))

    def test_a_full_disk_is_one_line_and_leaves_nothing(self):
        # The real failure end to end (export_test.WriteFailureTest covers it by mock where mounting is refused).
        with mounts.tmpfs("size=200k") as full:
            if full is None:
                self.skipTest("mounting a tmpfs needs root here")
            export_dir = os.path.join(full, "serving")
            result = _run_bin(f"--model_dir={self.model_dir}", f"--export_dir={export_dir}", "--version=3", *_TINY)
            self.assertEqual(result.returncode, 2, result.stderr[-3000:])
            self.assertRegex(result.stderr.rstrip().splitlines()[-1],
                             rf"^export.py: error: {re.escape(os.path.join(export_dir, '3'))}: /\S+; No space left "
                             "on device; nothing written before the failure is lost")
            self.assertNotIn("Traceback", result.stderr)
            self.assertEqual(os.listdir(export_dir), [])


class ExportErrorsTest(parameterized.TestCase):
    """Each flag check of bin/export.py fails before any work, in the binary's own words; run in process.

    `cli.run` prints main's ConfigError as `export.py: error: <message>` with
    exit status 2 (ExportBinaryTest runs that path in a real process).
    """

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.model_dir = make_model_dir(cls._tmp.name, sigma=0.5)
        cls.export_bin = binaries.load("export")

    @classmethod
    def tearDownClass(cls):
        binaries.unload(cls.export_bin)
        cls._tmp.cleanup()
        super().tearDownClass()

    @parameterized.named_parameters(
        ("missing_model_dir", ("--model_dir=/nonexistent/run",), r"^--model_dir=/nonexistent/run is not a directory"),
        ("n0", ("--model_dir=MODEL_DIR", "--n0=0"), r"^--n0 must be an integer in \[1, 2\^31\), got 0"),
        ("alpha", ("--model_dir=MODEL_DIR", "--alpha=1.5"), r"^--alpha must be in \(0, 1\), got 1.5"),
        ("stages_end", ("--model_dir=MODEL_DIR", "--stages=100,500"),
         r"^--stages must end at n=10000 \(the total sample count\), got \[100, 500\]$"),
        ("stages_below_n0", ("--model_dir=MODEL_DIR", "--n0=200", "--stages=100,10000"),
         r"^--stages must start at n0=200 or above"),
        ("max_batch", ("--model_dir=MODEL_DIR", "--max_batch=0"), r"^--max_batch must be an integer >= 1, got 0$"),
        ("check_images_beyond_split", ("--model_dir=MODEL_DIR", "--check_images=10001"),
         r"^--check_images=10001 is more than the 10000 images of fashion_mnist's test split$"),
    )
    def test_errors(self, args, message):
        export_dir = os.path.join(self._tmp.name, "bad_" + re.sub(r"\W", "_", args[-1]))
        args = [a.replace("MODEL_DIR", self.model_dir) for a in args]
        with flagsaver.flagsaver():
            flags.FLAGS(["export.py", *args, f"--export_dir={export_dir}"])
            with self.assertRaises(ConfigError) as raised:
                self.export_bin.main(["export.py"])
        self.assertRegex(str(raised.exception), message)
        self.assertNotIn("\n", str(raised.exception))
        self.assertFalse(os.path.exists(export_dir))


if __name__ == "__main__":
    tf.test.main()
