"""bin/predict.py: PREDICT rows in the authors' format, resuming, and one-line errors.

As in bin_certify_test.py, the library call runs in-process and the binary in
subprocesses (flag names are shared between binaries).
"""

import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from bin_certify_test import error_lines, make_model_dir, read_rows, run_binary, without_time
from tf_consreg import data
from tf_consreg import smoothing
from tf_consreg.errors import ConfigError

HEADER = "idx\tlabel\tpredict\tcorrect\ttime"
TINY = dict(n=100, batch_size=200, alpha=0.01)


class PredictDatasetTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp()
        cls.model_dir = make_model_dir(cls.dir)
        _, cls.labels = data.load_arrays("fashion_mnist", "test", limit=10)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)
        super().tearDownClass()

    def _config(self, output, **overrides):
        args = dict(output=output, model_dir=self.model_dir, mode="predict", **TINY)
        args.update(overrides)
        return smoothing.CertifyConfig(**args)

    def _output(self):
        return os.path.join(tempfile.mkdtemp(dir=self.dir), "predict.tsv")

    def test_rows_in_the_authors_format(self):
        output = self._output()
        self.assertEqual(smoothing.certify_dataset(self._config(output, max=6), verbose=0), 6)
        header, rows = read_rows(output)
        self.assertEqual(header, HEADER)
        self.assertEqual([int(r[0]) for r in rows], list(range(6)))
        for idx, label, predict, correct, _ in rows:
            self.assertEqual(int(label), self.labels[int(idx)])
            self.assertEqual(int(correct), int(predict == label))
        with open(output + ".json", encoding="utf-8") as f:
            self.assertNotIn('"n0"', f.read())

    def test_matches_smooth_predict(self):
        # The rows are Smooth.predict_batch keyed by (seed, idx).
        output = self._output()
        smoothing.certify_dataset(self._config(output, max=4, seed=3), verbose=0)
        images, _ = data.load_arrays("fashion_mnist", "test", limit=4)
        smooth = smoothing.Smooth(tf.keras.models.load_model(os.path.join(self.model_dir, "base_model.keras")),
                                  10, 0.25)
        expected = smooth.predict_batch(images, 100, 0.01, 200, seed=3, image_ids=np.arange(4))
        self.assertEqual([int(r[2]) for r in read_rows(output)[1]], list(expected))

    def test_resume_after_a_torn_row(self):
        whole, pieces = self._output(), self._output()
        smoothing.certify_dataset(self._config(whole, max=6), verbose=0)
        smoothing.certify_dataset(self._config(pieces, max=3), verbose=0)
        with open(pieces, "a", encoding="utf-8") as f:
            f.write("3\t1")
        self.assertEqual(smoothing.certify_dataset(self._config(pieces, max=6), verbose=0), 3)
        self.assertEqual(without_time(read_rows(pieces)[1]), without_time(read_rows(whole)[1]))

    def test_shards_give_the_rows_of_one_run(self):
        whole = self._output()
        smoothing.certify_dataset(self._config(whole, max=7), verbose=0)
        rows = without_time(read_rows(whole)[1])
        for index in range(2):
            shard = self._output()
            self.assertEqual(smoothing.certify_dataset(
                self._config(shard, max=7, num_shards=2, shard_index=index), verbose=0), 4 - index)
            self.assertEqual(without_time(read_rows(shard)[1]), rows[index::2])

    def test_mirrored(self):
        # 2 logical CPU devices (conftest.py) share each example's samples.
        output = self._output()
        smoothing.certify_dataset(self._config(output, max=3, strategy="mirrored"), verbose=0)
        self.assertEqual([r[0] for r in read_rows(output)[1]], ["0", "1", "2"])
        with open(output + smoothing.SETTINGS_SUFFIX, encoding="utf-8") as f:
            settings = f.read()
        self.assertIn('"strategy": "mirrored"', settings)
        self.assertIn('"replicas": 2', settings)

    def test_refuses_a_certify_output(self):
        output = self._output()
        smoothing.certify_dataset(
            smoothing.CertifyConfig(output=output, model_dir=self.model_dir, max=1, n0=10, **TINY), verbose=0)
        with self.assertRaisesRegex(ConfigError, "other settings.*mode: 'certify' there, 'predict' now"):
            smoothing.certify_dataset(self._config(output, max=2), verbose=0)


@pytest.mark.slow  # Fresh interpreters importing TensorFlow.
class PredictBinaryTest(tf.test.TestCase):

    def test_end_to_end_and_one_line_error(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        model_dir = make_model_dir(directory)
        output = os.path.join(directory, "out", "predict.tsv")
        result = run_binary("predict.py", f"--model_dir={model_dir}", "--max=3", "--n=100", "--batch_size=100",
                            f"--output={output}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(read_rows(output)[0], HEADER)
        self.assertLen(read_rows(output)[1], 3)

        bad = os.path.join(directory, "bad", "predict.tsv")
        result = run_binary("predict.py", f"--model_dir={model_dir}", "--skip=0", f"--output={bad}")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(error_lines(result.stderr), ["predict.py: error: --skip must be >= 1, got 0"])
        self.assertFalse(os.path.exists(bad))

        result = run_binary("predict.py", f"--model_dir={model_dir}", "--num_shards=2", "--shard_index=2",
                            f"--output={bad}")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(error_lines(result.stderr),
                         ["predict.py: error: --shard_index must be in [0, --num_shards=2), got 2"])
        self.assertFalse(os.path.exists(bad))


if __name__ == "__main__":
    tf.test.main()
