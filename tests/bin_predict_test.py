"""bin/predict.py end to end: PREDICT rows in the authors' format, and one-line errors.

As in bin_certify_test.py, one real process per exit path (PredictBinaryTest);
the other runs call the command's main in process (tests/binaries.py). The run
in predict mode is tested in certify_run_test.py.
"""

import os
import shutil
import tempfile

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import pytest
import tensorflow as tf

import binaries  # tests/binaries.py
from bin_certify_test import FLAG_DEFAULTS
from bin_certify_test import save_nan_model
from certify_run_test import PREDICT_HEADER, RunFixture, error_lines, make_model_dir, read_rows, run_binary
from tf_consreg.errors import ConfigError


class FlagsTest(absltest.TestCase):

    def test_the_flags_of_certify_but_n0(self):
        self.assertEqual(binaries.flag_defaults("predict"),
                         {k: v for k, v in FLAG_DEFAULTS.items() if k not in ("n0", "radii")})


class PredictErrorsTest(RunFixture, parameterized.TestCase):
    """bin/predict.py's flag checks in process, in its own words (PredictBinaryTest runs one in a real process)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.predict = binaries.load("predict")
        cls.model_dir = make_model_dir(cls.dir)

    @classmethod
    def tearDownClass(cls):
        binaries.unload(cls.predict)
        super().tearDownClass()

    @parameterized.named_parameters(
        ("shard_index", ["--num_shards=2", "--shard_index=2"], "--shard_index must be in [0, --num_shards=2), got 2"),
        ("stages_end", ["--n=1000", "--stages=100,500"],
         "--stages must end at n=1000 (the total sample count), got [100, 500]"),
        # Issue 24: all 10 samples in one class give p = 2^-9 = 0.00195 > alpha = 0.001: every example abstains.
        ("hopeless_n", ["--n=10"], "--n=10 and --alpha=0.001 cannot predict any example: with all 10 samples in one "
                                   "class the test's p-value is 2^(1-10) = 0.001953, not below its level 0.000999993 "
                                   "(alpha - n x the grid slack), so every example abstains; the smallest --n that "
                                   "can predict at --alpha=0.001 is 11"),
    )
    def test_errors(self, args, expected):
        output = os.path.join(self.dir, "bad", "predict.tsv")
        with flagsaver.flagsaver():
            flags.FLAGS(["predict.py", f"--model_dir={self.model_dir}", *args, f"--output={output}"])
            with self.assertRaises(ConfigError) as raised:
                self.predict.main(["predict.py"])
        self.assertEqual(str(raised.exception), expected)
        self.assertFalse(os.path.lexists(output))


@pytest.mark.slow  # Fresh interpreters importing TensorFlow.
class PredictBinaryTest(tf.test.TestCase):
    """One real process per exit path of bin/predict.py: rows written (0) and a flag refused (2)."""

    def test_end_to_end_and_one_line_error(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        model_dir = make_model_dir(directory)
        output = os.path.join(directory, "out", "predict.tsv")
        result = run_binary("predict.py", f"--model_dir={model_dir}", "--max=3", "--n=100", "--batch_size=100",
                            f"--output={output}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(read_rows(output)[0], PREDICT_HEADER)
        self.assertLen(read_rows(output)[1], 3)

        bad = os.path.join(directory, "bad", "predict.tsv")
        result = run_binary("predict.py", f"--model_dir={model_dir}", "--skip=0", f"--output={bad}")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(error_lines(result.stderr), ["predict.py: error: --skip must be >= 1, got 0"])
        self.assertFalse(os.path.exists(bad))


@pytest.mark.slow  # Each test certifies for real (in this process: PredictBinaryTest starts the interpreters).
class PredictRunTest(RunFixture, tf.test.TestCase):
    """bin/predict.py's main in process on what a run writes; exit statuses are PredictBinaryTest's."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.predict = binaries.load("predict")
        cls.model_dir = make_model_dir(cls.dir)

    @classmethod
    def tearDownClass(cls):
        binaries.unload(cls.predict)
        super().tearDownClass()

    def _run(self, *args):
        with flagsaver.flagsaver():
            flags.FLAGS(["predict.py", *args])
            self.predict.main(["predict.py"])

    def test_stages_turn_on_staged_predict(self):
        staged = os.path.join(self.dir, "staged", "predict.tsv")
        self._run(f"--model_dir={self.model_dir}", "--max=3", "--n=1000", "--stages=100,1000", "--batch_size=100",
                  f"--output={staged}")
        header, rows = read_rows(staged)
        self.assertEqual(header, PREDICT_HEADER + "\tsamples")
        self.assertTrue(all(r[5] in ("100", "1000") for r in rows), rows)

    def test_a_nan_model_gets_no_prediction(self):
        # Counted as votes, its NaN samples would all be class 0: 100 to 0, a sure "class 0".
        output = os.path.join(self.dir, "nan", "predict.tsv")
        self._run(f"--model={save_nan_model(self.dir)}", "--dataset=fashion_mnist", "--sigma=0.25", "--max=3",
                  "--n=100", "--batch_size=100", f"--output={output}")
        self.assertEqual([r[2] for r in read_rows(output)[1]], ["-1"] * 3)


if __name__ == "__main__":
    tf.test.main()
