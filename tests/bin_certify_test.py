"""bin/certify.py end to end: the TSV it writes and its one-line errors.

`CertifyBinaryTest` runs the binary in a fresh interpreter once per exit
path (rows written; a ConfigError; absl's flag parsing). The other tests call
its main in process (tests/binaries.py loads it, since its flags share names
with other binaries' flags): `CertifyErrorsTest`, `CertifyRunTest`, and
`ImagenetCertifyTest`, where `tfds.testing.mock_data` patches only this
process. The run it calls is tested in certify_run_test.py.
"""

import contextlib
import errno
import io
import os
import subprocess
import tempfile
from unittest import mock

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
import tensorflow_datasets as tfds

import binaries  # tests/binaries.py
import mounts  # tests/mounts.py
from certify_run_test import HEADER, TINY, RunFixture, error_lines, make_config, make_model_dir, read_rows
from certify_run_test import run_binary
from smoothing_test import with_nan_weights
from tf_consreg import certify_run
from tf_consreg import data
from tf_consreg import files
from tf_consreg import models
from tf_consreg.errors import ConfigError

# Every flag of bin/certify.py and its default, as users rely on them.
FLAG_DEFAULTS = {
    "model_dir": None, "model": None, "dataset": None, "data_dir": None, "split": "test", "sigma": None, "n0": 100,
    "mock_data": False, "n": 100000, "alpha": 0.001, "batch_size": 1000, "skip": 1, "max": -1, "output": None,
    "seed": 0,
    "num_shards": 1, "shard_index": 0, "strategy": "default", "compute_dtype": "float32", "radii": None,
    "stages": None, "noise": "grid", "classifier": None, "denoiser": None,
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
        # One case per exit path through the real process: a ConfigError (cli.run prints it as one line) and
        # absl's flag parsing. The other checks, the refused outputs among them, run in process
        # (CertifyErrorsTest, CertifyRunTest): they raise the same ConfigError.
        ("n", ["--n=0"], "certify.py: error: --n must be an integer in [1, 2^31), got 0"),
        ("radius_not_a_number", ["--radii=half"], "certify.py: error: --radii: 'half' is not a list of float"),
    )
    def test_errors_are_one_line(self, args, expected):
        output = os.path.join(self.dir, "errors", "certify.tsv")
        result = run_binary("certify.py", f"--model_dir={self.model_dir}", *args, f"--output={output}")
        self.assertEqual(result.returncode, 2)
        lines = error_lines(result.stderr)
        self.assertLen(lines, 1, result.stderr)
        self.assertStartsWith(lines[0], expected)
        self.assertFalse(os.path.exists(output))
        self.assertFalse(os.path.lexists(output + ".json"))


class CertifyErrorsTest(RunFixture, parameterized.TestCase):
    """Each flag check of bin/certify.py fails before any work, in the binary's own words; run in process.

    `cli.run` prints a ConfigError as `certify.py: error: <message>` with exit
    status 2 (CertifyBinaryTest runs that path in a real process, and cli_test
    tests it); here main's ConfigError is checked, with no file left behind.
    """

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.certify = binaries.load("certify")
        cls.model_dir = make_model_dir(cls.dir)

    @classmethod
    def tearDownClass(cls):
        binaries.unload(cls.certify)
        super().tearDownClass()

    @parameterized.named_parameters(
        ("alpha", ["--alpha=1.5"], "--alpha must be in (0, 1), got 1.5"),
        ("model_without_sigma", ["--model=/tmp/x.keras", "--dataset=fashion_mnist"],
         "--sigma is required with --model"),
        ("shard_index_too_large", ["--num_shards=3", "--shard_index=3"],
         "--shard_index must be in [0, --num_shards=3), got 3"),
        ("negative_shard_index", ["--num_shards=3", "--shard_index=-1"],
         "--shard_index must be in [0, --num_shards=3), got -1"),
        ("no_shards", ["--num_shards=0"], "--num_shards must be >= 1, got 0"),
        ("strategy", ["--strategy=tpu"], "--strategy='tpu' is unknown"),
        ("compute_dtype", ["--compute_dtype=float16"],
         "--compute_dtype='float16' is unknown; choose one of float32, bfloat16"),
        # Fixed-radius mode (issue 13): each bad value fails before any work, naming its flag.
        ("radius_zero", ["--radii=0.5,0"], "--radii must be finite and > 0, got 0.0"),
        # Not finite: refused by every config's float check (cli.check_value) before the spec's own.
        ("radius_nan", ["--radii=nan"], "--radii: each value must be a finite number, got nan"),
        ("radius_inf", ["--radii=inf"], "--radii: each value must be a finite number, got inf"),
        ("stages_decrease", ["--radii=0.5", "--n=1000", "--stages=500,200,1000"],
         "--stages must strictly increase (cumulative sample counts), got [500, 200, 1000]"),
        ("stages_end", ["--radii=0.5", "--n=1000", "--stages=100,500"], "--stages must end at n=1000"),
        ("stage_below_n0", ["--radii=0.5", "--n=1000", "--stages=50,1000"], "--stages must start at n0=100 or above"),
        ("stages_without_radii", ["--stages=100,100000"], "--stages needs --radii"),
        # Issue 24: n and alpha at which every example abstains (0.001^(1/9) = 0.464 <= 1/2 < 0.001^(1/10)).
        ("hopeless_n", ["--n=9"], "--n=9 and --alpha=0.001 cannot certify any example: with all 9 samples in the "
                                  "top class the lower bound on p_A is 0.001^(1/9) = 0.4642"),
        ("hopeless_staged_n", ["--n0=5", "--n=10", "--radii=0.1", "--stages=5,10"],
         "--n=10 and --alpha=0.001 cannot certify any example: with all 10 samples in the top class the lower bound "
         "on p_A is 0.0005^(1/10) = 0.4676 less the grid slack 7.1e-10 (the level of its last stage: 0.0005)"),
    )
    def test_errors(self, args, expected):
        output = os.path.join(self.dir, "errors", "certify.tsv")
        if not any(a.startswith("--model") for a in args):
            args = [f"--model_dir={self.model_dir}", *args]
        with flagsaver.flagsaver():
            flags.FLAGS(["certify.py", *args, f"--output={output}"])
            with self.assertRaises(ConfigError) as raised:
                self.certify.main(["certify.py"])
        self.assertStartsWith(str(raised.exception), expected)
        self.assertNotIn("\n", str(raised.exception))
        self.assertFalse(os.path.lexists(output))
        self.assertFalse(os.path.lexists(output + ".json"))

    def test_a_dangling_output_link_is_refused_and_leaves_nothing(self):
        # Issue 16, item 6: one error (no traceback), no stray settings file.
        output = os.path.join(self.dir, "errors", "dangling.tsv")
        os.makedirs(os.path.dirname(output), exist_ok=True)
        os.symlink(os.path.join(self.dir, "nowhere", "certify.tsv"), output)
        self.addCleanup(os.remove, output)
        with flagsaver.flagsaver():
            flags.FLAGS(["certify.py", f"--model_dir={self.model_dir}", f"--output={output}"])
            with self.assertRaises(ConfigError) as raised:
                self.certify.main(["certify.py"])
        self.assertStartsWith(str(raised.exception), "--output=")
        self.assertNotIn("\n", str(raised.exception))
        self.assertFalse(os.path.exists(output))
        self.assertFalse(os.path.lexists(output + ".json"))


def save_constant_imagenet_model(directory: str, winner: int) -> str:
    """A tiny ImageNet-shaped model (224x224x3 in, 1000 logits) whose top class is always `winner`; its path."""
    model = keras.Sequential([keras.Input((224, 224, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(1000)])
    bias = np.zeros(1000, np.float32)
    bias[winner] = 10.0
    model.layers[-1].set_weights([np.zeros((3, 1000), np.float32), bias])  # Logits independent of the image.
    path = os.path.join(directory, "imagenet_constant.keras")
    model.save(path)
    return path


class WriteFailureTest(RunFixture, parameterized.TestCase):
    """A read-only --output: refused before the model loads; a full disk mid-run: resumable (#22, item 2).

    Each case runs on a real tmpfs ("mount", where mounting is allowed: root)
    and with the OS error raised by mock ("mock", always).
    """

    # 200 examples in batches of 26 (certify_run's 16 batches of 200 samples / 120 per example), 30 bytes a row
    # (130 rows: 3916 bytes with the header), so the TSV passes 4096 bytes, one tmpfs page, in the 6th batch.
    _MAX = 200

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = make_model_dir(cls.dir)

    @parameterized.product(how=("mount", "mock"), radii=(None, (0.25,)))
    def test_a_read_only_output_is_refused_before_the_model_loads(self, how, radii):
        with mounts.tmpfs("ro") if how == "mount" else contextlib.nullcontext(tempfile.mkdtemp(dir=self.dir)) \
                as read_only:
            if read_only is None:
                self.skipTest("mounting a tmpfs needs root here; the mock case covers the code")
            erofs = (contextlib.nullcontext() if how == "mount" else mock.patch.object(
                files.tempfile, "mkstemp", side_effect=OSError(errno.EROFS, os.strerror(errno.EROFS))))
            output = os.path.join(read_only, "certify.tsv")
            staged = {} if radii is None else dict(radii=radii, stages=(100,))
            with erofs, mock.patch.object(models, "load_base_model") as load:
                with self.assertRaisesWithLiteralMatch(
                        ConfigError, f"--output={output}: cannot write in {read_only} (Read-only file system)"):
                    certify_run.certify_dataset(make_config(output=output, model_dir=self.model_dir, max=3,
                                                            **{**TINY, **staged}), verbose=0)
                load.assert_not_called()
            self.assertEqual(os.listdir(read_only), [])

    @contextlib.contextmanager
    def _full_after_a_page(self, how):
        """A directory whose files cannot grow past 4096 bytes, and a function that frees space."""
        if how == "mount":
            # Two pages: the settings file's and the TSV's first; the write that needs a third fails.
            with mounts.tmpfs("size=8k") as directory:
                if directory is None:
                    self.skipTest("mounting a tmpfs needs root here; the mock case covers the code")
                yield directory, lambda: subprocess.run(["mount", "-o", "remount,size=1m", directory], check=True)
            return
        # By mock: the ENOSPC a file system that allocates late reports at fsync, once the TSV passes a page.
        real_fsync, full = os.fsync, [True]

        def fsync(fd):
            if full[0] and os.fstat(fd).st_size > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        with mock.patch.object(certify_run.os, "fsync", side_effect=fsync):
            yield tempfile.mkdtemp(dir=self.dir), lambda: full.__setitem__(0, False)

    @parameterized.parameters("mount", "mock")
    @pytest.mark.slow
    def test_a_full_disk_mid_run_resumes_to_the_rows_of_an_uninterrupted_run(self, how):
        uninterrupted = os.path.join(tempfile.mkdtemp(dir=self.dir), "certify.tsv")
        certify_run.certify_dataset(make_config(output=uninterrupted, model_dir=self.model_dir, max=self._MAX,
                                                **TINY), verbose=0)
        with self._full_after_a_page(how) as (directory, free_space):
            output = os.path.join(directory, "certify.tsv")
            config = make_config(output=output, model_dir=self.model_dir, max=self._MAX, **TINY)
            with self.assertRaises(OSError) as raised:
                certify_run.certify_dataset(config, verbose=0)
            self.assertEqual((raised.exception.filename, raised.exception.errno), (output, errno.ENOSPC))
            with open(output, encoding="utf-8") as f:
                kept = f.read().count("\n") - 1  # Whole rows; on the mount the last may be cut off mid-row.
            free_space()
            certify_run.certify_dataset(config, verbose=0)  # The same command, resumed.
            header, rows = read_rows(output)
        _, expected = read_rows(uninterrupted)
        self.assertBetween(kept, 26, self._MAX - 1)  # It failed mid-run, after rows were written.
        # Every column but the seconds each took (the last).
        self.assertEqual((header, [row[:5] for row in rows]), (HEADER, [row[:5] for row in expected]))


class ImagenetCertifyTest(RunFixture, absltest.TestCase):
    """Issue 21: bin/certify.py certifies ImageNet, in process (tfds.testing.mock_data patches this process)."""

    WINNER = 7
    SIGMA, N0, N, ALPHA = 0.5, 8, 16, 0.01

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.certify = binaries.load("certify")
        cls.model = save_constant_imagenet_model(cls.dir, cls.WINNER)

    @classmethod
    def tearDownClass(cls):
        binaries.unload(cls.certify)
        super().tearDownClass()

    def _run(self, output, *args):
        with flagsaver.flagsaver():
            flags.FLAGS(["certify.py", f"--model={self.model}", "--dataset=imagenet2012", f"--sigma={self.SIGMA}",
                         f"--n0={self.N0}", f"--n={self.N}", f"--alpha={self.ALPHA}", "--batch_size=24",
                         f"--output={output}", *args])
            self.certify.main(["certify.py"])
        return read_rows(output)

    def _expected_radius(self):
        # Every sample is the winner: k = n, so the one-sided Clopper-Pearson
        # bound is the Beta(n, 1) alpha-quantile, alpha^(1/n), and the radius
        # sigma Phi^-1(alpha^(1/n)), printed "{:.3}" as the authors do.
        p_lower = scipy.stats.beta.ppf(self.ALPHA, self.N, 1)
        self.assertAlmostEqual(p_lower, self.ALPHA ** (1 / self.N), places=12)
        return "{:.3}".format(self.SIGMA * scipy.stats.norm.ppf(p_lower))

    def _check_rows(self, rows, idx, labels):
        radius = self._expected_radius()
        expected = [[str(i), str(y), str(self.WINNER), radius, str(int(y == self.WINNER))]
                    for i, y in zip(idx, labels)]
        self.assertEqual([r[:5] for r in rows], expected)

    def test_mock_data_flag(self):
        output = os.path.join(self.dir, "mock_flag", "certify.tsv")
        header, rows = self._run(output, "--mock_data", "--skip=2", "--max=5")
        self.assertEqual(header, HEADER)
        # The labels of bin/train.py's --mock_data stream, loaded whole (not by index).
        _, labels = data.load_uint8("imagenet2012", "test", limit=5, mock=True)
        self._check_rows(rows, [0, 2, 4], labels[[0, 2, 4]])

    def test_tfds_mock_imagenet2012(self):
        output = os.path.join(self.dir, "tfds_mock", "certify.tsv")
        with tfds.testing.mock_data(num_examples=6):
            header, rows = self._run(output, "--skip=2", "--num_shards=1")
            # Labels as tfds itself reads the split (ImageNet's test split is tfds' validation).
            labels = [int(y) for _, y in tfds.load("imagenet2012", split="validation", as_supervised=True)]
        self.assertEqual(header, HEADER)
        self._check_rows(rows, [0, 2, 4], [labels[i] for i in (0, 2, 4)])


def save_nan_model(directory: str) -> str:
    """A LeNet whose weights are all NaN, as a diverged training run leaves it; returns its .keras path."""
    path = os.path.join(directory, "nan_model.keras")
    with_nan_weights(models.get_architecture("lenet", "fashion_mnist")).save(path)
    return path


@pytest.mark.slow  # Each test certifies for real (in this process: CertifyBinaryTest starts the interpreters).
class CertifyRunTest(RunFixture, absltest.TestCase):
    """bin/certify.py's main in process: its modes end to end and its refusals after the model loads."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.certify = binaries.load("certify")
        cls.model_dir = make_model_dir(cls.dir)

    @classmethod
    def tearDownClass(cls):
        binaries.unload(cls.certify)
        super().tearDownClass()

    def _run(self, *args):
        """Runs main on `args`; what it printed."""
        with flagsaver.flagsaver(), contextlib.redirect_stdout(io.StringIO()) as out:
            flags.FLAGS(["certify.py", *args])
            self.certify.main(["certify.py"])
        return out.getvalue()

    def test_grid_noise_end_to_end(self):
        output = os.path.join(self.dir, "grid", "certify.tsv")
        printed = self._run(f"--model_dir={self.model_dir}", "--max=2", "--n0=20", "--n=100", "--batch_size=100",
                            "--noise=grid", f"--output={output}")
        self.assertEqual([r[0] for r in read_rows(output)[1]], ["0", "1"])
        self.assertIn("noise: grid (exact 8-bit grid noise", printed)
        with open(output + ".json", encoding="utf-8") as f:
            self.assertIn('"noise": "grid"', f.read())

    def test_fixed_radius_mode_end_to_end(self):
        output = os.path.join(self.dir, "staged", "certify.tsv")
        self._run(f"--model_dir={self.model_dir}", "--max=3", "--n0=20", "--n=1000", "--batch_size=200",
                  "--radii=0.25", "--stages=100,1000", f"--output={output}")
        header, rows = read_rows(output)
        self.assertEqual(header, HEADER + "\tsamples")
        self.assertEqual([r[0] for r in rows], ["0", "1", "2"])
        self.assertTrue(all(r[6] in ("100", "1000") for r in rows), rows)

    def test_resumed_shard_with_other_shard_settings_is_refused(self):
        output = os.path.join(self.dir, "resume", "certify.shard0.tsv")
        certify_run.certify_dataset(make_config(output=output, model_dir=self.model_dir, max=2, num_shards=3,
                                                shard_index=0, **TINY), verbose=0)
        with open(output, "rb") as f:
            before = f.read()
        with self.assertRaises(ConfigError) as raised:
            self._run(f"--model_dir={self.model_dir}", "--n0=20", "--n=100", "--alpha=0.01", "--batch_size=200",
                      "--num_shards=3", "--shard_index=1", f"--output={output}")
        self.assertStartsWith(str(raised.exception), f"--output={output} holds a run with other settings "
                              "(shard_index: 0 there, 1 now)")
        self.assertNotIn("\n", str(raised.exception))
        with open(output, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(sorted(os.listdir(os.path.dirname(output))), ["certify.shard0.tsv",
                                                                       "certify.shard0.tsv.json"])

    def test_a_nan_model_gets_no_certificate(self):
        # argmax over NaN logits is 0: counted as votes, every sample would
        # be class 0, certified with radius sigma Phi^-1(alpha^(1/n)).
        output = os.path.join(self.dir, "nan", "certify.tsv")
        self._run(f"--model={save_nan_model(self.dir)}", "--dataset=fashion_mnist", "--sigma=0.25", "--max=3",
                  "--n0=20", "--n=100", "--batch_size=100", f"--output={output}")
        _, rows = read_rows(output)
        self.assertEqual([(r[2], r[3]) for r in rows], [("-1", "0.0")] * 3)


if __name__ == "__main__":
    tf.test.main()
