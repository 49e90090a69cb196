"""bin/certify.py end to end: the TSV it writes and its one-line errors.

The binary runs in subprocesses, because its flags (--model_dir, --sigma,
...) share names with other binaries' flags and absl refuses to define a flag
twice in one process. The run it calls is tested in certify_run_test.py.
"""

import os

from absl.testing import absltest
from absl.testing import parameterized
import pytest
import tensorflow as tf

import binaries  # tests/binaries.py
from certify_run_test import HEADER, TINY, RunFixture, error_lines, make_config, make_model_dir, read_rows
from certify_run_test import run_binary
from smoothing_test import with_nan_weights
from tf_consreg import certify_run
from tf_consreg import models

# Every flag of bin/certify.py and its default, as users rely on them.
FLAG_DEFAULTS = {
    "model_dir": None, "model": None, "dataset": None, "data_dir": None, "split": "test", "sigma": None, "n0": 100,
    "n": 100000, "alpha": 0.001, "batch_size": 1000, "skip": 1, "max": -1, "output": None, "seed": 0,
    "num_shards": 1, "shard_index": 0, "strategy": "default", "compute_dtype": "float32", "radii": None,
    "stages": None,
}


class FlagsTest(absltest.TestCase):

    def test_flags_and_defaults(self):
        self.assertEqual(binaries.flag_defaults("certify"), FLAG_DEFAULTS)


@pytest.mark.slow  # Each case starts a fresh interpreter that imports TensorFlow.
class CertifyBinaryTest(RunFixture, parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = make_model_dir(cls.dir)

    def test_end_to_end(self):
        output = os.path.join(self.dir, "e2e", "certify.tsv")
        result = run_binary("certify.py", f"--model_dir={self.model_dir}", "--max=5", "--n0=20", "--n=100",
                            "--batch_size=100", f"--output={output}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        header, rows = read_rows(output)
        self.assertEqual(header, HEADER)
        self.assertEqual([r[0] for r in rows], ["0", "1", "2", "3", "4"])
        self.assertIn(f"certified 5 examples into {output}", result.stdout)
        self.assertIn("computing in float32 (--compute_dtype)", result.stdout)
        with open(output + ".json", encoding="utf-8") as f:
            self.assertIn('"compute_dtype": "float32"', f.read())

    @parameterized.named_parameters(
        ("n", ["--n=0"], "certify.py: error: --n must be >= 1, got 0"),
        ("alpha", ["--alpha=1.5"], "certify.py: error: --alpha must be in (0, 1), got 1.5"),
        ("model_without_sigma", ["--model=/tmp/x.keras", "--dataset=fashion_mnist"],
         "certify.py: error: --sigma is required with --model"),
        ("shard_index_too_large", ["--num_shards=3", "--shard_index=3"],
         "certify.py: error: --shard_index must be in [0, --num_shards=3), got 3"),
        ("negative_shard_index", ["--num_shards=3", "--shard_index=-1"],
         "certify.py: error: --shard_index must be in [0, --num_shards=3), got -1"),
        ("no_shards", ["--num_shards=0"], "certify.py: error: --num_shards must be >= 1, got 0"),
        ("strategy", ["--strategy=tpu"], "certify.py: error: --strategy='tpu' is unknown"),
        ("compute_dtype", ["--compute_dtype=float16"],
         "certify.py: error: --compute_dtype='float16' is unknown; choose one of float32, bfloat16"),
        # Fixed-radius mode (issue 13): each bad value fails before any work, naming its flag.
        ("radius_zero", ["--radii=0.5,0"], "certify.py: error: --radii must be finite and > 0, got 0.0"),
        ("radius_nan", ["--radii=nan"], "certify.py: error: --radii must be finite and > 0, got nan"),
        ("radius_inf", ["--radii=inf"], "certify.py: error: --radii must be finite and > 0, got inf"),
        ("radius_not_a_number", ["--radii=half"], "certify.py: error: --radii: 'half' is not a list of float"),
        ("stages_decrease", ["--radii=0.5", "--n=1000", "--stages=500,200,1000"],
         "certify.py: error: --stages must strictly increase (cumulative sample counts), got [500, 200, 1000]"),
        ("stages_end", ["--radii=0.5", "--n=1000", "--stages=100,500"],
         "certify.py: error: --stages must end at n=1000"),
        ("stage_below_n0", ["--radii=0.5", "--n=1000", "--stages=50,1000"],
         "certify.py: error: --stages must start at n0=100 or above"),
        ("stages_without_radii", ["--stages=100,100000"], "certify.py: error: --stages needs --radii"),
        ("dangling_output", ["--output_is_a_dangling_link"], "certify.py: error: --output="),
    )
    def test_errors_are_one_line(self, args, expected):
        output = os.path.join(self.dir, "errors", "certify.tsv")
        if not any(a.startswith("--model") for a in args):
            args = [f"--model_dir={self.model_dir}", *args]
        if "--output_is_a_dangling_link" in args:  # Issue 16, item 6: no traceback, no stray settings file.
            args = [a for a in args if a != "--output_is_a_dangling_link"]
            output = os.path.join(self.dir, "errors", "dangling.tsv")
            os.makedirs(os.path.dirname(output), exist_ok=True)
            os.symlink(os.path.join(self.dir, "nowhere", "certify.tsv"), output)
            self.addCleanup(os.remove, output)
        result = run_binary("certify.py", *args, f"--output={output}")
        self.assertEqual(result.returncode, 2)
        lines = error_lines(result.stderr)
        self.assertLen(lines, 1, result.stderr)
        self.assertStartsWith(lines[0], expected)
        self.assertFalse(os.path.exists(output))
        self.assertFalse(os.path.lexists(output + ".json"))

    def test_fixed_radius_mode_end_to_end(self):
        output = os.path.join(self.dir, "staged", "certify.tsv")
        result = run_binary("certify.py", f"--model_dir={self.model_dir}", "--max=3", "--n0=20", "--n=1000",
                            "--batch_size=200", "--radii=0.25", "--stages=100,1000", f"--output={output}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        header, rows = read_rows(output)
        self.assertEqual(header, HEADER + "\tsamples")
        self.assertEqual([r[0] for r in rows], ["0", "1", "2"])
        self.assertTrue(all(r[6] in ("100", "1000") for r in rows), rows)

    def test_resumed_shard_with_other_shard_settings_is_one_line(self):
        output = os.path.join(self.dir, "resume", "certify.shard0.tsv")
        certify_run.certify_dataset(make_config(output=output, model_dir=self.model_dir, max=2, num_shards=3,
                                                shard_index=0, **TINY), verbose=0)
        with open(output, "rb") as f:
            before = f.read()
        result = run_binary("certify.py", f"--model_dir={self.model_dir}", "--n0=20", "--n=100", "--alpha=0.01",
                            "--batch_size=200", "--num_shards=3", "--shard_index=1", f"--output={output}")
        self.assertEqual(result.returncode, 2)
        lines = error_lines(result.stderr)
        self.assertLen(lines, 1, result.stderr)
        self.assertStartsWith(lines[0], f"certify.py: error: --output={output} holds a run with other settings "
                              "(shard_index: 0 there, 1 now)")
        with open(output, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(sorted(os.listdir(os.path.dirname(output))), ["certify.shard0.tsv",
                                                                       "certify.shard0.tsv.json"])


def save_nan_model(directory: str) -> str:
    """A LeNet whose weights are all NaN, as a diverged training run leaves it; returns its .keras path."""
    path = os.path.join(directory, "nan_model.keras")
    with_nan_weights(models.get_architecture("lenet", "fashion_mnist")).save(path)
    return path


@pytest.mark.slow  # A fresh interpreter importing TensorFlow.
class NanModelTest(RunFixture, absltest.TestCase):

    def test_a_nan_model_gets_no_certificate(self):
        # argmax over NaN logits is 0: counted as votes, every sample would
        # be class 0, certified with radius sigma Phi^-1(alpha^(1/n)).
        output = os.path.join(self.dir, "nan", "certify.tsv")
        result = run_binary("certify.py", f"--model={save_nan_model(self.dir)}", "--dataset=fashion_mnist",
                            "--sigma=0.25", "--max=3", "--n0=20", "--n=100", "--batch_size=100", f"--output={output}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        _, rows = read_rows(output)
        self.assertEqual([(r[2], r[3]) for r in rows], [("-1", "0.0")] * 3)


if __name__ == "__main__":
    tf.test.main()
