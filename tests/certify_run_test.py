"""Tests for tf_consreg.certify_run: the rows a run writes, resuming, shards, locking and refusals.

`CertifyConfig` + `certify_dataset` (the one library call of bin/certify.py
and bin/predict.py) run in-process on untrained or hand-built models; the
binaries themselves are tested in bin_certify_test.py and bin_predict_test.py.
"""

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl.testing import parameterized
import mpmath
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import threshold_models  # tests/threshold_models.py
from tf_consreg import analysis
from tf_consreg import certify_log
from tf_consreg import certify_run
from tf_consreg import cli
from tf_consreg import run_config
from tf_consreg import data
from tf_consreg import models
from tf_consreg import noise
from tf_consreg import smoothing
from tf_consreg.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
PREDICT_HEADER = "idx\tlabel\tpredict\tcorrect\ttime"
# Tiny but real: LeNet on Fashion-MNIST test images.
TINY = dict(n0=20, n=100, batch_size=200, alpha=0.01)
PREDICT_TINY = dict(n=100, batch_size=200, alpha=0.01)


def make_config(**values) -> certify_run.CertifyConfig:
    """The run of these values by flag name (the sampling settings among them), as bin/certify.py builds it."""
    return cli.config_from_values(certify_run.CertifyConfig, values)
# TensorFlow's C++ runtime logs a few lines on import whatever the log level.
_TF_LOG_PREFIXES = ("I0000", "W0000", "E0000", "WARNING: All log messages")
_TIME = re.compile(r"^\d+:\d\d:\d\d(\.\d{6})?$")


def make_model_dir(directory: str, sigma: float = 0.25) -> str:
    """A training run directory with an untrained LeNet and its train_config.json."""
    model_dir = os.path.join(directory, "run")
    os.makedirs(model_dir)
    keras_seed = 0
    tf.keras.utils.set_random_seed(keras_seed)
    models.get_architecture("lenet", "fashion_mnist").save(os.path.join(model_dir, models.BASE_MODEL_FILE))
    train = run_config.TrainConfig.from_dict({"model_dir": model_dir, "dataset": "fashion_mnist", "sigma": sigma})
    with open(os.path.join(model_dir, run_config.TRAIN_CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(train.to_json())
    return model_dir


def make_nearest_mean_model(directory: str) -> str:
    """A linear Fashion-MNIST classifier built without training, saved as .keras.

    Logits 2 mu_c.x - |mu_c|^2 = |x|^2 - |x - mu_c|^2: the nearest class mean
    of 2,000 training images. Right on most test images and confident enough
    under noise to certify nonzero radii, so certification results are not
    all abstentions.
    """
    images, labels = data.load_arrays("fashion_mnist", "train", limit=2000)
    flat = images.reshape(len(images), -1)
    means = np.stack([flat[labels == c].mean(axis=0) for c in range(10)])
    inputs = tf.keras.Input((28, 28, 1))
    dense = tf.keras.layers.Dense(10)
    model = tf.keras.Model(inputs, dense(tf.keras.layers.Flatten()(inputs)))
    dense.set_weights([2 * means.T.astype(np.float32), -(means ** 2).sum(axis=1).astype(np.float32)])
    path = os.path.join(directory, "nearest_mean.keras")
    model.save(path)
    return path


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[-1] == "", "the file must end with a newline"
    return lines[0], [line.split("\t") for line in lines[1:-1]]


def without_time(rows):
    return [[field for field in row if not _TIME.match(field)] for row in rows]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(_TF_LOG_PREFIXES)]


def run_binary(name, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "bin", name), *args], capture_output=True, text=True,
                          check=False)


class RunFixture:
    """A test class's own directory (`cls.dir`) and runs configured by `cls.config` (set in setUpClass).

    A mixin, not a TestCase, so that test modules importing it do not
    collect it. List it before the TestCase base.
    """

    config: dict = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)
        super().tearDownClass()

    def _config(self, output, **overrides):
        return make_config(**{"output": output, **self.config, **overrides})

    def _output(self, name="certify.tsv"):
        return os.path.join(tempfile.mkdtemp(dir=self.dir), name)


class CertifyDatasetTest(RunFixture, tf.test.TestCase, parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = make_model_dir(cls.dir)
        cls.config = dict(model_dir=cls.model_dir, **TINY)
        _, cls.labels = data.load_arrays("fashion_mnist", "test", limit=20)

    def test_rows_in_the_authors_format(self):
        output = self._output()
        self.assertEqual(certify_run.certify_dataset(self._config(output, max=8), verbose=0), 8)
        header, rows = read_rows(output)
        self.assertEqual(header, HEADER)
        self.assertEqual([int(r[0]) for r in rows], list(range(8)))
        for idx, label, predict, radius, correct, elapsed in rows:
            self.assertEqual(int(label), self.labels[int(idx)])
            self.assertEqual(int(correct), int(predict == label))
            self.assertGreaterEqual(int(predict), -1)
            # The authors print radii with "{:.3}" (0.0 when abstaining).
            self.assertEqual(radius, "{:.3}".format(float(radius)))
            if predict == "-1":
                self.assertEqual(radius, "0.0")
            self.assertRegex(elapsed, _TIME)
        with open(output + ".json", encoding="utf-8") as f:
            settings = f.read()
        for expected in ('"sigma": 0.25', '"n": 100', '"n0": 20', '"seed": 0', '"dataset": "fashion_mnist"',
                         '"split": "test"', '"batch_size": 200', '"compute_dtype": "float32"'):
            self.assertIn(expected, settings)

    def test_skip_and_max(self):
        output = self._output()
        certify_run.certify_dataset(self._config(output, skip=3, max=10), verbose=0)
        self.assertEqual([int(r[0]) for r in read_rows(output)[1]], [0, 3, 6, 9])

    def test_reads_the_selected_examples_by_index(self):
        # Issue 21: the run reads only the selected examples, streaming; they
        # must be the images and labels that the whole split holds at those
        # indices. A scattered selection (shard 1 of 2 of every 37th below
        # 3000) of the test split, against Smooth on load_arrays' images.
        model = make_nearest_mean_model(self.dir)
        output = self._output()
        config = make_config(output=output, model=model, dataset="fashion_mnist", sigma=0.25, skip=37, max=3000,
                             num_shards=2, shard_index=1, **TINY)
        self.assertEqual(certify_run.certify_dataset(config, verbose=0), 41)  # 82 selected: 0, 37, ..., 2997.
        _, rows = read_rows(output)
        idx = np.arange(37, 3000, 74)
        self.assertEqual([int(r[0]) for r in rows], idx.tolist())
        images, labels = data.load_arrays("fashion_mnist", "test")
        self.assertEqual([int(r[1]) for r in rows], labels[idx].tolist())
        smooth = smoothing.Smooth(models.load_base_model(model), 10, 0.25)
        classes, radii = smooth.certify_batch(images[idx], TINY["n0"], TINY["n"], TINY["alpha"], TINY["batch_size"],
                                              seed=0, image_ids=idx)
        self.assertEqual([int(r[2]) for r in rows], classes.tolist())
        self.assertEqual([r[3] for r in rows], ["{:.3}".format(float(r)) for r in radii])
        self.assertGreater(len(set(classes.tolist())), 5)  # Not vacuous: the images differ.

    def test_mock_data_certifies_the_mock_and_is_part_of_the_settings(self):
        output = self._output()
        self.assertEqual(certify_run.certify_dataset(self._config(output, max=3, mock_data=True), verbose=0), 3)
        _, rows = read_rows(output)
        _, mock_labels = data.load_uint8("fashion_mnist", "test", mock=True)
        self.assertEqual([int(r[1]) for r in rows], mock_labels[:3].tolist())
        with open(output + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
            self.assertIs(json.load(f)["mock_data"], True)
        with self.assertRaisesRegex(ConfigError, "mock_data: True there, None now"):
            certify_run.certify_dataset(self._config(output, max=4), verbose=0)
        # A run on the data records no mock_data: its logs from before the flag resume.
        real = self._output()
        certify_run.certify_dataset(self._config(real, max=1), verbose=0)
        with open(real + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
            self.assertNotIn("mock_data", json.load(f))

    def test_sigma_and_dataset_default_to_the_training_run(self):
        config = self._config(self._output())
        self.assertEqual((config.spec.sigma, config.dataset), (0.25, "fashion_mnist"))
        self.assertEqual(config.model, os.path.join(self.model_dir, models.BASE_MODEL_FILE))
        self.assertEqual(self._config(self._output(), sigma=0.5).spec.sigma, 0.5)

    def test_resumed_run_equals_uninterrupted_run(self):
        whole = self._output()
        certify_run.certify_dataset(self._config(whole, max=9), verbose=0)

        pieces = self._output()
        certify_run.certify_dataset(self._config(pieces, max=4), verbose=0)
        with open(pieces, "a", encoding="utf-8") as f:
            f.write("4\t7\t")  # Killed while writing row 4.
        self.assertEqual(certify_run.certify_dataset(self._config(pieces, max=6), verbose=0), 2)
        # Killed in the middle of row 6 after its bytes partly reached disk.
        with open(pieces, "rb+") as f:
            f.seek(0, os.SEEK_END)
            f.truncate(f.tell() - 5)
        self.assertEqual(certify_run.certify_dataset(self._config(pieces, max=9), verbose=0), 4)
        self.assertEqual(without_time(read_rows(pieces)[1]), without_time(read_rows(whole)[1]))

        # Nothing left to do: nothing written, nothing duplicated.
        with open(pieces, "rb") as f:
            before = f.read()
        self.assertEqual(certify_run.certify_dataset(self._config(pieces, max=9), verbose=0), 0)
        with open(pieces, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_model_is_named_by_the_digest_of_its_file(self):
        moved = os.path.join(tempfile.mkdtemp(dir=self.dir), "moved.keras")
        shutil.copy(os.path.join(self.model_dir, models.BASE_MODEL_FILE), moved)
        output = self._output()
        by_path = dict(model_dir=None, model=moved, dataset="fashion_mnist", sigma=0.25)
        certify_run.certify_dataset(self._config(output, max=2, **by_path), verbose=0)
        with open(moved, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        with open(output + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
            self.assertEqual(json.load(f)["model_sha256"], digest)

        # The same bytes elsewhere (another host's path) continue the run ...
        elsewhere = os.path.join(tempfile.mkdtemp(dir=self.dir), "base_model.keras")
        shutil.copy(moved, elsewhere)
        self.assertEqual(certify_run.certify_dataset(
            self._config(output, max=3, **dict(by_path, model=elsewhere)), verbose=0), 1)
        # ... other weights at the same path do not.
        model = models.load_base_model(moved)
        model.layers[-1].set_weights([w + 1.0 for w in model.layers[-1].get_weights()])
        model.save(moved)
        with open(output, "rb") as f:
            before = f.read()
        with self.assertRaisesRegex(ConfigError, "holds a run with other settings \\(model_sha256: "):
            certify_run.certify_dataset(self._config(output, max=4, **by_path), verbose=0)
        with open(output, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_refuses_an_output_with_another_header(self):
        foreign = self._output()
        with open(foreign, "w", encoding="utf-8") as f:
            f.write("epoch\tloss\n1\t0.5\n")
        with self.assertRaisesRegex(ConfigError, "not written by this tool"):
            certify_run.certify_dataset(self._config(foreign, max=2), verbose=0)
        with open(foreign, encoding="utf-8") as f:
            self.assertEqual(f.read(), "epoch\tloss\n1\t0.5\n")
        # Even next to a matching settings file, another header is refused.
        other = self._output()
        certify_run.certify_dataset(self._config(other, max=1), verbose=0)
        with open(other, "w", encoding="utf-8") as f:
            f.write("idx\tlabel\tpredict\tcorrect\ttime\n")
        with self.assertRaisesRegex(ConfigError, "header"):
            certify_run.certify_dataset(self._config(other, max=2), verbose=0)

    @parameterized.named_parameters(
        ("sigma", dict(sigma=0.5), "sigma: 0.25 there, 0.5 now"),
        ("n", dict(n=200), "n: 100 there, 200 now"),
        ("seed", dict(seed=1), "seed"),
        ("skip", dict(skip=2), "skip"),
        ("batch_size", dict(batch_size=100), "batch_size"),
        ("split", dict(split="train"), "split"),
        ("compute_dtype", dict(compute_dtype="bfloat16"), "compute_dtype: 'float32' there, 'bfloat16' now"),
    )
    def test_refuses_an_output_of_other_settings(self, overrides, message):
        output = self._output()
        certify_run.certify_dataset(self._config(output, max=2), verbose=0)
        with open(output, "rb") as f:
            before = f.read()
        with self.assertRaisesRegex(ConfigError, message):
            certify_run.certify_dataset(self._config(output, max=4, **overrides), verbose=0)
        with open(output, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_refuses_a_corrupt_row(self):
        output = self._output()
        certify_run.certify_dataset(self._config(output, max=3), verbose=0)
        with open(output, encoding="utf-8") as f:
            lines = f.readlines()
        lines[2] = "7" + lines[2][1:]
        with open(output, "w", encoding="utf-8") as f:
            f.writelines(lines)
        with self.assertRaisesRegex(ConfigError, r"certify.tsv:3: expected a row for example 1"):
            certify_run.certify_dataset(self._config(output, max=5), verbose=0)

    @parameterized.named_parameters(
        # Resuming once checked only the field count and idx: these resumed with exit 0, and analyze then refused the log.
        ("nan_radius_label_77", {1: "77", 3: "nan", 4: "0"}, r"certify.tsv:3: label 77 or class"),
        ("nan_radius", {3: "nan"}, r"certify.tsv:3: radius must be a finite number >= 0, got nan"),
        ("class_out_of_range", {2: "10", 4: "0"}, r"certify.tsv:3: label \d+ or class 10 is not below the 10"),
        ("abstention_with_radius", {2: "-1", 3: "0.5", 4: "0"}, r"certify.tsv:3: an abstention"),
        ("correct_contradicts", {4: "2"}, r"certify.tsv:3: correct=2 contradicts"),
        ("garbage_time", {5: "soon"}, r"certify.tsv:3: malformed row"),
    )
    def test_refuses_to_resume_an_impossible_row(self, changes, message):
        output = self._output()
        certify_run.certify_dataset(self._config(output, max=3), verbose=0)
        with open(output, encoding="utf-8") as f:
            lines = f.readlines()
        fields = lines[2].rstrip("\n").split("\t")
        for column, value in changes.items():
            fields[column] = value
        lines[2] = "\t".join(fields) + "\n"
        with open(output, "w", encoding="utf-8") as f:
            f.writelines(lines)
        with open(output, "rb") as f:
            before = f.read()
        with self.assertRaisesRegex(ConfigError, message + ".*the file is corrupt"):
            certify_run.certify_dataset(self._config(output, max=5), verbose=0)
        with open(output, "rb") as f:
            self.assertEqual(f.read(), before)  # Nothing appended, nothing cut.

    @parameterized.named_parameters(
        ("skip", dict(skip=0), "--skip must be >= 1"),
        ("max", dict(max=-2), "--max"),
        ("split", dict(split="valid"), "--split"),
        ("dataset", dict(dataset="imagenet"), "--dataset"),
        ("both_models", dict(model="x.keras"), "exactly one of --model_dir"),
        ("no_model", dict(model_dir=None), "exactly one of --model_dir"),
        ("no_output", dict(output=""), "--output is required"),
        ("missing_model_dir", dict(model_dir="/nonexistent/run"), "--model_dir"),
    )
    def test_bad_config(self, overrides, message):
        args = dict(output=self._output())
        args.update(overrides)
        with self.assertRaisesRegex(ConfigError, message):
            self._config(**args)

    def test_model_file_needs_sigma_and_dataset(self):
        model = os.path.join(self.model_dir, models.BASE_MODEL_FILE)
        with self.assertRaisesRegex(ConfigError, "--sigma is required with --model"):
            make_config(output=self._output(), model=model, dataset="fashion_mnist")
        with self.assertRaisesRegex(ConfigError, "--dataset is required with --model"):
            make_config(output=self._output(), model=model, sigma=0.5)
        config = make_config(output=self._output(), model=model, dataset="fashion_mnist", sigma=0.5, max=2, **TINY)
        self.assertEqual(certify_run.certify_dataset(config, verbose=0), 2)

    def test_model_that_does_not_fit_the_dataset(self):
        model = os.path.join(self.dir, "cifar.keras")
        tf.keras.Sequential([tf.keras.Input((32, 32, 3)), tf.keras.layers.Flatten(),
                             tf.keras.layers.Dense(10)]).save(model)
        output = self._output()
        config = make_config(output=output, model=model, dataset="fashion_mnist", sigma=0.5, max=2)
        with self.assertRaisesRegex(ConfigError, "takes images of shape"):
            certify_run.certify_dataset(config, verbose=0)
        self.assertFalse(os.path.exists(output))


class ComputeDtypeTest(RunFixture, tf.test.TestCase, parameterized.TestCase):
    """--compute_dtype: which network a run samples, whatever the policy the model was saved under.

    The model is the threshold f(x) = [x_p > t] of tests/threshold_models.py,
    saved computing in bfloat16 as a mixed_bfloat16 run saves its model. Its
    float32 network is [x_p > t] and its bfloat16 one [q(x_p) > t], with q
    the rounding to bfloat16. Every Fashion-MNIST pixel k/255 (0 < k < 255)
    rounds up (k/255 = k/256 + k/(255 * 256), more than half a bfloat16 step
    above the multiple of the step below it), so t halfway between the
    pixel v of the first test image and q(v) makes the two networks answer
    differently on it. sigma = 1e-7 is far below every distance involved
    (pixels sit >= 7.7e-6 from a rounding midpoint and ~1e-3 from t), so
    each network's class is certain; radii are tiny and positive.
    """

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        images, _ = data.load_arrays("fashion_mnist", "test", limit=8)
        cls.images = images.reshape(8, -1)
        cls.pixel = int(np.flatnonzero((cls.images[0] > 0) & (cls.images[0] < 1))[0])
        v = cls.images[0, cls.pixel]
        cls.threshold = float((v + threshold_models.round_to_bfloat16(v)) / 2)
        model = threshold_models.threshold_model((28, 28, 1), cls.pixel, cls.threshold, num_classes=10)
        cls.model = os.path.join(cls.dir, "trained_in_bfloat16.keras")
        threshold_models.in_dtype(model, "bfloat16").save(cls.model)
        cls.config = dict(model=cls.model, dataset="fashion_mnist", sigma=1e-7, n0=10, n=20, batch_size=200,
                          alpha=0.001, max=8)

    def _classes(self, compute_dtype):
        pixels = self.images[:, self.pixel]
        if compute_dtype == "bfloat16":
            pixels = threshold_models.round_to_bfloat16(pixels)
        return (pixels > self.threshold).astype(int)

    @parameterized.parameters("float32", "bfloat16")
    def test_samples_the_network_of_its_compute_dtype(self, compute_dtype):
        self.assertNotEqual(self._classes("float32")[0], self._classes("bfloat16")[0])  # Not vacuous.
        output = self._output()
        overrides = {} if compute_dtype == "float32" else {"compute_dtype": compute_dtype}  # float32: the default.
        certify_run.certify_dataset(self._config(output, **overrides), verbose=0)
        rows = read_rows(output)[1]
        self.assertAllEqual([int(r[2]) for r in rows], self._classes(compute_dtype))
        self.assertTrue(all(float(r[3]) > 0 for r in rows))
        with open(output + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
            self.assertEqual(json.load(f)["compute_dtype"], compute_dtype)

    def test_shards_of_other_dtypes_are_not_one_run(self):
        shards = [self._output(f"certify.shard{i}.tsv") for i in range(2)]
        for index, compute_dtype in enumerate(("float32", "bfloat16")):
            certify_run.certify_dataset(self._config(shards[index], num_shards=2, shard_index=index,
                                                     compute_dtype=compute_dtype), verbose=0)
        with self.assertRaisesRegex(ConfigError, r"come from runs with different settings \(compute_dtype: "
                                                 r"'float32' vs 'bfloat16'\)"):
            certify_log.group_runs(shards)


class ShardedCertifyTest(RunFixture, tf.test.TestCase, parameterized.TestCase):
    """K = 3 shards over the first 30 test images against one unsharded run."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = make_nearest_mean_model(cls.dir)
        cls.config = dict(model=cls.model, n0=10, n=100, batch_size=200, alpha=0.001, sigma=0.25,
                          dataset="fashion_mnist", max=30)
        cls.whole = os.path.join(cls.dir, "whole", "certify.tsv")
        certify_run.certify_dataset(make_config(output=cls.whole, **cls.config), verbose=0)
        cls.whole_rows = without_time(read_rows(cls.whole)[1])

    def _shard_path(self, index):
        return self._output(f"certify.shard{index}.tsv")

    def test_shards_give_the_rows_of_one_run_and_analyze_as_one(self):
        # Not vacuous: the model certifies nonzero radii and makes mistakes.
        radii = [float(r[3]) for r in self.whole_rows]
        self.assertGreater(max(radii), 0.2)
        self.assertIn("0", [r[4] for r in self.whole_rows])

        shards = []
        for index in range(3):
            shards.append(self._shard_path(index))
            self.assertEqual(certify_run.certify_dataset(
                self._config(shards[-1], num_shards=3, shard_index=index), verbose=0), 10)
            header, rows = read_rows(shards[-1])
            self.assertEqual(header, HEADER)
            self.assertEqual([int(r[0]) for r in rows], list(range(index, 30, 3)))
            self.assertEqual(without_time(rows), self.whole_rows[index::3])
            with open(shards[-1] + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
                settings = f.read()
            self.assertIn('"num_shards": 3', settings)
            self.assertIn(f'"shard_index": {index}', settings)

        report = analysis.analyze(analysis.AnalyzeConfig(tsv=shards + [self.whole], format="json"))
        merged, whole = json.loads(report)
        self.assertEqual(merged["files"], shards)
        self.assertEqual((merged["n"], whole["n"]), (30, 30))
        self.assertGreater(whole["acr"], 0.0)
        self.assertEqual(merged["acr"], whole["acr"])
        self.assertEqual(merged["certified_accuracy"], whole["certified_accuracy"])

    def test_skip(self):
        shard = self._shard_path(1)
        certify_run.certify_dataset(self._config(shard, num_shards=2, shard_index=1, skip=4), verbose=0)
        # Selected 0, 4, ..., 28; shard 1 of 2 holds every other one from the second on.
        self.assertEqual([r[0] for r in read_rows(shard)[1]], ["4", "12", "20", "28"])

    def test_each_shard_resumes_on_its_own(self):
        shard = self._shard_path(1)
        # Cut after examples 1, 4, 7 (--max=10), then while writing example 10.
        self.assertEqual(certify_run.certify_dataset(
            self._config(shard, num_shards=3, shard_index=1, max=10), verbose=0), 3)
        with open(shard, "a", encoding="utf-8") as f:
            f.write("10\t")
        self.assertEqual(certify_run.certify_dataset(self._config(shard, num_shards=3, shard_index=1), verbose=0), 7)
        self.assertEqual(without_time(read_rows(shard)[1]), self.whole_rows[1::3])

    @parameterized.named_parameters(
        ("shard_index", dict(num_shards=3, shard_index=1), "shard_index: 0 there, 1 now"),
        ("num_shards", dict(num_shards=2, shard_index=0), "num_shards: 3 there, 2 now"),
        ("unsharded", dict(), "num_shards: 3 there, 1 now"),
    )
    def test_refuses_to_resume_with_other_shard_settings(self, overrides, message):
        shard = self._shard_path(0)
        certify_run.certify_dataset(self._config(shard, num_shards=3, shard_index=0, max=4), verbose=0)
        with open(shard, "rb") as f:
            before = f.read()
        with self.assertRaisesRegex(ConfigError, message):
            certify_run.certify_dataset(self._config(shard, **overrides), verbose=0)
        with open(shard, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_an_output_another_process_writes_is_refused(self):
        output = self._shard_path(0)
        certify_run.certify_dataset(self._config(output, max=2), verbose=0)
        with open(output, "rb") as f:
            before = f.read()
        with open(output, "rb") as held:  # Another open file description: flock conflicts as across processes.
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            with self.assertRaisesRegex(ConfigError, f"--output={output} is being written by another process"):
                certify_run.certify_dataset(self._config(output, max=5), verbose=0)
        with open(output, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(certify_run.certify_dataset(self._config(output, max=5), verbose=0), 3)

    @pytest.mark.slow  # Three interpreters importing TensorFlow at once.
    def test_processes_started_together_on_one_output_never_lose_or_duplicate_rows(self):
        # A job array whose tasks were all given the same --output: every
        # task starts at once; one writes, the others are refused in one line
        # (another process holds it, or it holds another shard), whatever the timing.
        output = os.path.join(tempfile.mkdtemp(dir=self.dir), "certify.tsv")
        flags = [f"--model={self.model}", "--dataset=fashion_mnist", "--sigma=0.25", "--n0=10", "--n=100",
                 "--batch_size=200", "--alpha=0.001", "--max=30", "--num_shards=3", f"--output={output}"]
        processes = [subprocess.Popen([sys.executable, os.path.join(REPO, "bin", "certify.py"), *flags,
                                       f"--shard_index={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for i in range(3)]
        try:
            results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
        finally:
            for p in processes:
                p.kill()
                p.wait()
                p.stdout.close()
                p.stderr.close()
        winners = [i for i, (code, _) in enumerate(results) if code == 0]
        self.assertLen(winners, 1, results)
        for i, (code, stderr) in enumerate(results):
            if i in winners:
                continue
            self.assertEqual(code, 2, stderr)
            lines = error_lines(stderr)
            self.assertLen(lines, 1, stderr)
            self.assertRegex(lines[0], f"^certify.py: error: --output={re.escape(output)} "
                             "(is being written by another process|holds a run with other settings "
                             f"\\(shard_index: {winners[0]} there, {i} now\\))")
        with open(output + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
            self.assertEqual(json.load(f)["shard_index"], winners[0])
        self.assertEqual(without_time(read_rows(output)[1]), self.whole_rows[winners[0]::3])
        self.assertEqual(sorted(os.listdir(os.path.dirname(output))), ["certify.tsv", "certify.tsv.json"])

    @parameterized.named_parameters(
        ("index_too_large", dict(num_shards=3, shard_index=3), r"--shard_index must be in \[0, --num_shards=3\), got 3"),
        ("negative_index", dict(num_shards=3, shard_index=-1), r"--shard_index must be in \[0, --num_shards=3\)"),
        ("no_shards", dict(num_shards=0), "--num_shards must be >= 1, got 0"),
        ("strategy", dict(strategy="tpu"), "--strategy='tpu' is unknown; choose one of default, mirrored"),
    )
    def test_bad_shard_config(self, overrides, message):
        with self.assertRaisesRegex(ConfigError, message):
            self._config(self._shard_path(0), **overrides)


class StagedCertifyTest(RunFixture, tf.test.TestCase, parameterized.TestCase):
    """Fixed-radius mode (--radii) on the nearest-mean model, whose images settle at different stages."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = make_nearest_mean_model(cls.dir)
        # At sigma = 1 its images stop at 100, 500 or 2000 samples, most but not all certified.
        cls.config = dict(model=cls.model, dataset="fashion_mnist", sigma=1.0, n0=20, n=2000, batch_size=400,
                          alpha=0.01, radii=(1.0, 0.5), stages=(100, 500, 2000), max=12)

    def test_rows_are_the_runs_decisions(self):
        output = self._output()
        self.assertEqual(certify_run.certify_dataset(self._config(output), verbose=0), 12)
        header, rows = read_rows(output)
        self.assertEqual(header, HEADER + "\tsamples")
        images, labels = data.load_arrays("fashion_mnist", "test", limit=12)
        smooth = smoothing.Smooth(models.load_base_model(self.model), 10, 1.0)
        expected = smooth.certify_staged_batch(images, 20, 2000, 0.01, 400, radii=[0.5, 1.0],
                                               stages=(100, 500, 2000), seed=0, image_ids=np.arange(12))
        self.assertEqual([int(r[0]) for r in rows], list(range(12)))
        self.assertEqual([int(r[2]) for r in rows], expected.classes.tolist())
        self.assertEqual([int(r[6]) for r in rows], expected.samples.tolist())
        self.assertEqual([int(r[1]) for r in rows], labels.tolist())
        printed = np.array([float(r[3]) for r in rows])
        np.testing.assert_array_less(printed, expected.radii + 1e-12)
        np.testing.assert_array_equal(printed[:, None] >= [0.5, 1.0], expected.certified)
        # Not vacuous: images stop at different stages, and some are certified, some not.
        self.assertGreater(len(set(expected.samples.tolist())), 1)
        self.assertTrue(expected.certified.any() and not expected.certified.all())
        with open(output + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
            settings = json.load(f)
        self.assertEqual((settings["mode"], settings["radii"], settings["stages"]),
                         ("certify_staged", [0.5, 1.0], [100, 500, 2000]))
        # analyze reports the run's decisions at its radii.
        report, = json.loads(analysis.analyze(analysis.AnalyzeConfig(tsv=[output], format="json")))
        correct = expected.classes == labels
        self.assertEqual(report["certified_accuracy"],
                         {"0.5": float(np.mean(expected.certified[:, 0] & correct)),
                          "1.0": float(np.mean(expected.certified[:, 1] & correct))})
        self.assertEqual(report["samples_per_image"], float(expected.samples.mean()))

    def test_default_stages(self):
        config = self._config(self._output(), stages=None, n=100000, n0=200)
        self.assertEqual(config.spec.stages, (300, 1000, 3000, 10000, 30000, 50000, 100000))
        self.assertEqual(self._config(self._output(), radii=None, stages=None).spec.stages, None)

    def test_resumed_run_equals_uninterrupted_run(self):
        whole, pieces = self._output(), self._output()
        certify_run.certify_dataset(self._config(whole), verbose=0)
        certify_run.certify_dataset(self._config(pieces, max=5), verbose=0)
        with open(pieces, "a", encoding="utf-8") as f:
            f.write("5\t1\t")
        self.assertEqual(certify_run.certify_dataset(self._config(pieces), verbose=0), 7)
        self.assertEqual(without_time(read_rows(pieces)[1]), without_time(read_rows(whole)[1]))

    @parameterized.named_parameters(
        ("not_a_number", "abc", r"certify.tsv:2: malformed row"),
        ("not_a_stage", "123", r"certify.tsv:2: samples 123 is not one of the run's stages \(100, 500, 2000\)"),
    )
    def test_refuses_to_resume_corrupt_samples(self, samples, message):
        output = self._output()
        certify_run.certify_dataset(self._config(output, max=2), verbose=0)
        with open(output, encoding="utf-8") as f:
            lines = f.readlines()
        lines[1] = lines[1].rsplit("\t", 1)[0] + f"\t{samples}\n"
        with open(output, "w", encoding="utf-8") as f:
            f.writelines(lines)
        with self.assertRaisesRegex(ConfigError, message + ".*the file is corrupt"):
            certify_run.certify_dataset(self._config(output, max=4), verbose=0)

    @parameterized.named_parameters(
        ("full_then_staged", dict(radii=None, stages=None), dict(), "mode: 'certify' there, 'certify_staged' now"),
        ("staged_then_full", dict(), dict(radii=None, stages=None), "mode: 'certify_staged' there, 'certify' now"),
        ("other_radii", dict(), dict(radii=(0.5,)), "radii: \\[0.5, 1.0\\] there, \\[0.5\\] now"),
        ("other_stages", dict(), dict(stages=(200, 2000)), "stages: \\[100, 500, 2000\\] there, \\[200, 2000\\] now"),
    )
    def test_a_run_never_resumes_another_mode(self, first, then, message):
        output = self._output()
        certify_run.certify_dataset(self._config(output, max=2, **first), verbose=0)
        with open(output, "rb") as f:
            before = f.read()
        with self.assertRaisesRegex(ConfigError, "holds a run with other settings \\(.*" + message):
            certify_run.certify_dataset(self._config(output, max=4, **then), verbose=0)
        with open(output, "rb") as f:
            self.assertEqual(f.read(), before)

    @parameterized.named_parameters(
        ("radius_zero", dict(radii=(0.0,)), "--radii must be finite and > 0, got 0.0"),
        ("radius_negative", dict(radii=(0.5, -0.25)), "--radii must be finite and > 0, got -0.25"),
        # Not finite: refused by every config's float check (cli.check_value) before the spec's own.
        ("radius_nan", dict(radii=(float("nan"),)), "--radii: each value must be a finite number, got nan"),
        ("radius_inf", dict(radii=(float("inf"),)), "--radii: each value must be a finite number, got inf"),
        ("radius_digits", dict(radii=(0.1234,)), "--radii: 0.1234 has more than 3 significant digits"),
        ("stages_decrease", dict(stages=(500, 100, 2000)), "--stages must strictly increase"),
        ("stages_end", dict(stages=(100, 500)), "--stages must end at n=2000"),
        ("stage_below_n0", dict(stages=(10, 2000)), "--stages must start at n0=20 or above"),
        ("stages_empty", dict(stages=()), "--stages must be a non-empty"),
        ("stages_without_radii", dict(radii=None), "--stages needs --radii"),
        ("radii_in_predict", dict(mode="predict", stages=None), "PREDICT has no radii"),
    )
    def test_bad_config(self, overrides, message):
        output = self._output()
        with self.assertRaisesRegex(ConfigError, "^" + re.escape(message)):
            self._config(output, **overrides)
        self.assertEqual(os.listdir(os.path.dirname(output)), [])


class OutputPathTest(RunFixture, tf.test.TestCase):
    """--output names that cannot be a log: one line each, and nothing written (issue 16, items 6 and 8)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.config = dict(model_dir=make_model_dir(cls.dir), **TINY)

    def test_dangling_symlink(self):
        output = self._output()
        os.symlink(os.path.join(self.dir, "nowhere", "certify.tsv"), output)
        with self.assertRaisesRegex(ConfigError, f"^--output={output} is a symbolic link to .*nowhere/certify.tsv, "
                                    "which does not exist"):
            self._config(output, max=2)
        self.assertEqual(os.listdir(os.path.dirname(output)), ["certify.tsv"])

    def test_under_a_regular_file(self):
        afile = self._output("afile")
        with open(afile, "w", encoding="utf-8") as f:
            f.write("x")
        output = os.path.join(afile, "sub", "certify.tsv")
        with self.assertRaisesRegex(ConfigError, f"^--output={output}: {afile} is a file, not a directory"):
            self._config(output, max=2)

    def test_a_directory(self):
        with self.assertRaisesRegex(ConfigError, f"^--output={self.dir} is a directory"):
            self._config(self.dir, max=2)


class PredictDatasetTest(RunFixture, tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = make_model_dir(cls.dir)
        cls.config = dict(model_dir=cls.model_dir, mode="predict", **PREDICT_TINY)
        _, cls.labels = data.load_arrays("fashion_mnist", "test", limit=10)

    def _output(self, name="predict.tsv"):
        return super()._output(name)

    def test_rows_in_the_authors_format(self):
        output = self._output()
        self.assertEqual(certify_run.certify_dataset(self._config(output, max=6), verbose=0), 6)
        header, rows = read_rows(output)
        self.assertEqual(header, PREDICT_HEADER)
        self.assertEqual([int(r[0]) for r in rows], list(range(6)))
        for idx, label, predict, correct, _ in rows:
            self.assertEqual(int(label), self.labels[int(idx)])
            self.assertEqual(int(correct), int(predict == label))
        with open(output + ".json", encoding="utf-8") as f:
            self.assertNotIn('"n0"', f.read())

    def test_matches_smooth_predict(self):
        # The rows are Smooth.predict_batch keyed by (seed, idx).
        output = self._output()
        certify_run.certify_dataset(self._config(output, max=4, seed=3), verbose=0)
        images, _ = data.load_arrays("fashion_mnist", "test", limit=4)
        smooth = smoothing.Smooth(tf.keras.models.load_model(os.path.join(self.model_dir, "base_model.keras")),
                                  10, 0.25)
        expected = smooth.predict_batch(images, 100, 0.01, 200, seed=3, image_ids=np.arange(4))
        self.assertEqual([int(r[2]) for r in read_rows(output)[1]], list(expected))

    def test_resume_after_a_torn_row(self):
        whole, pieces = self._output(), self._output()
        certify_run.certify_dataset(self._config(whole, max=6), verbose=0)
        certify_run.certify_dataset(self._config(pieces, max=3), verbose=0)
        with open(pieces, "a", encoding="utf-8") as f:
            f.write("3\t1")
        self.assertEqual(certify_run.certify_dataset(self._config(pieces, max=6), verbose=0), 3)
        self.assertEqual(without_time(read_rows(pieces)[1]), without_time(read_rows(whole)[1]))

    def test_shards_give_the_rows_of_one_run(self):
        whole = self._output()
        certify_run.certify_dataset(self._config(whole, max=7), verbose=0)
        rows = without_time(read_rows(whole)[1])
        for index in range(2):
            shard = self._output()
            self.assertEqual(certify_run.certify_dataset(
                self._config(shard, max=7, num_shards=2, shard_index=index), verbose=0), 4 - index)
            self.assertEqual(without_time(read_rows(shard)[1]), rows[index::2])

    def test_mirrored(self):
        # 2 logical CPU devices (conftest.py) share each example's samples.
        output = self._output()
        certify_run.certify_dataset(self._config(output, max=3, strategy="mirrored"), verbose=0)
        self.assertEqual([r[0] for r in read_rows(output)[1]], ["0", "1", "2"])
        with open(output + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
            settings = f.read()
        self.assertIn('"strategy": "mirrored"', settings)
        self.assertIn('"replicas": 2', settings)

    def test_staged(self):
        output = self._output()
        config = self._config(output, max=6, stages=(20, 100), seed=3)
        self.assertEqual(certify_run.certify_dataset(config, verbose=0), 6)
        header, rows = read_rows(output)
        self.assertEqual(header, PREDICT_HEADER + "\tsamples")
        images, _ = data.load_arrays("fashion_mnist", "test", limit=6)
        smooth = smoothing.Smooth(models.load_base_model(os.path.join(self.model_dir, "base_model.keras")), 10, 0.25)
        expected = smooth.predict_staged_batch(images, 100, 0.01, 200, stages=(20, 100), seed=3,
                                               image_ids=np.arange(6))
        self.assertEqual([int(r[2]) for r in rows], expected.classes.tolist())
        self.assertEqual([int(r[5]) for r in rows], expected.samples.tolist())
        with open(output + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
            settings = json.load(f)
        self.assertEqual((settings["mode"], settings["stages"], "radii" in settings), ("predict_staged", [20, 100], False))
        with self.assertRaisesRegex(ConfigError, "mode: 'predict_staged' there, 'predict' now"):
            certify_run.certify_dataset(self._config(output, max=8), verbose=0)

    def test_refuses_a_certify_output(self):
        output = self._output()
        certify_run.certify_dataset(
            make_config(output=output, model_dir=self.model_dir, max=1, n0=10, **PREDICT_TINY), verbose=0)
        with self.assertRaisesRegex(ConfigError, "other settings.*mode: 'certify' there, 'predict' now"):
            certify_run.certify_dataset(self._config(output, max=2), verbose=0)


if __name__ == "__main__":
    tf.test.main()


class GridNoiseRunTest(RunFixture, tf.test.TestCase, parameterized.TestCase):
    """--noise=grid through the run: Smooth's grid rows, the settings, and the refusals to mix modes."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = make_model_dir(cls.dir)
        cls.config = dict(model_dir=cls.model_dir, **TINY)

    def _settings(self, output):
        with open(output + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
            return json.load(f)

    def test_rows_are_smooth_in_grid_mode_and_the_mode_is_printed_and_recorded(self):
        output = self._output()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            certify_run.certify_dataset(self._config(output, max=4, seed=3, noise="grid"), verbose=1)
        self.assertIn("noise: grid (exact 8-bit grid noise, sound in floating point", printed.getvalue())
        self.assertEqual(self._settings(output)["noise"], "grid")
        images, _ = data.load_arrays("fashion_mnist", "test", limit=4)
        model = tf.keras.models.load_model(os.path.join(self.model_dir, "base_model.keras"))
        expected = smoothing.Smooth(model, 10, 0.25, noise="grid").certify_batch(
            images, 20, 100, 0.01, 200, seed=3, image_ids=np.arange(4))
        rows = read_rows(output)[1]
        self.assertGreater(int((expected[0] >= 0).sum()), 0)  # Not vacuous: some examples are certified.
        self.assertEqual([int(r[2]) for r in rows], list(expected[0]))
        self.assertEqual([r[3] for r in rows], [certify_log.format_radius(r) for r in expected[1]])

    def test_grid_is_the_default_and_every_run_records_its_noise(self):
        output, float_output = self._output(), self._output()
        certify_run.certify_dataset(self._config(output, max=1), verbose=0)
        self.assertEqual(self._settings(output)["noise"], "grid")
        certify_run.certify_dataset(self._config(float_output, max=1, noise="float"), verbose=0)
        self.assertEqual(self._settings(float_output)["noise"], "float")

    def test_a_log_from_before_the_noise_setting_is_a_float_run(self):
        # A settings file without "noise" (written before --noise existed): it resumes as --noise=float, and the
        # default grid run refuses it.
        output = self._output()
        certify_run.certify_dataset(self._config(output, max=1, noise="float"), verbose=0)
        settings = self._settings(output)
        del settings["noise"]
        with open(output + certify_log.SETTINGS_SUFFIX, "w", encoding="utf-8") as f:
            json.dump(settings, f)
        with self.assertRaisesRegex(ConfigError, "noise: 'float' there, 'grid' now"):
            certify_run.certify_dataset(self._config(output, max=2), verbose=0)
        self.assertEqual(certify_run.certify_dataset(self._config(output, max=2, noise="float"), verbose=0), 1)
        self.assertEqual([int(r[0]) for r in read_rows(output)[1]], [0, 1])

    @parameterized.named_parameters(("grid_then_float", "grid", "float"), ("float_then_grid", "float", "grid"))
    def test_a_resume_never_changes_the_mode(self, first, then):
        output = self._output()
        certify_run.certify_dataset(self._config(output, max=2, noise=first), verbose=0)
        with open(output, "rb") as f:
            before = f.read()
        with self.assertRaisesRegex(ConfigError, f"noise: '{first}' there, '{then}' now"):
            certify_run.certify_dataset(self._config(output, max=4, noise=then), verbose=0)
        with open(output, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_shards_of_other_modes_are_not_one_run(self):
        shards = [self._output(f"certify.shard{i}.tsv") for i in range(2)]
        for index, mode in enumerate(("float", "grid")):
            certify_run.certify_dataset(self._config(shards[index], max=2, num_shards=2, shard_index=index,
                                                     noise=mode), verbose=0)
        with self.assertRaisesRegex(ConfigError, r"different settings \(noise: 'float' vs 'grid'\)"):
            certify_log.group_runs(shards)

    def test_an_off_grid_example_is_refused_naming_it_and_its_pixel(self):
        images = np.full((3, 2, 2, 1), 7 / np.float32(255), np.float32)
        images[2, 1, 0, 0] = 0.3
        with self.assertRaisesRegex(ConfigError, r"^--noise=grid: example 40: image\[1, 0, 0\] = 0\.3\d* is not "
                                                 r"on the 8-bit grid.*; --noise=float is for inputs that are not "
                                                 r"quantized$"):
            certify_run._check_pixels(images, np.array([20, 30, 40]), "grid")  # pylint: disable=protected-access
        certify_run._check_pixels(images[:2], np.array([20, 30]), "grid")  # pylint: disable=protected-access
        certify_run._check_pixels(images, np.array([20, 30, 40]), "float")  # pylint: disable=protected-access

    @parameterized.parameters(("float", 1.5), ("grid", 1.5), ("float", -1.0), ("grid", np.nan))
    def test_an_example_outside_the_unit_interval_is_refused_in_both_modes(self, mode, value):
        images = np.full((3, 2, 2, 1), 7 / np.float32(255), np.float32)
        images[1, 0, 1, 0] = value
        with self.assertRaisesRegex(ConfigError, rf"^--noise={mode}: example 30: image\[0, 1, 0\] = "
                                                 r"[-.0-9na]+ is outside \[0, 1\]"):
            certify_run._check_pixels(images, np.array([20, 30, 40]), mode)  # pylint: disable=protected-access


def _cdf_quantile_radius(alpha: float, n: int, sigma: float, slack: float = 0.0) -> str:
    """sigma Phi^-1(alpha^(1/n) - slack) by mpmath at 40 digits, printed as the run prints it (3 digits, down)."""
    mpmath.mp.dps = 40
    radius = sigma * mpmath.sqrt(2) * mpmath.erfinv(2 * (mpmath.root(mpmath.mpf(alpha), n) - slack) - 1)
    digits = mpmath.floor(mpmath.log10(radius))
    return "{:.3}".format(float(mpmath.floor(radius / 10**(digits - 2)) * 10**(digits - 2)))


class GuardrailRunTest(RunFixture, tf.test.TestCase, parameterized.TestCase):
    """What a run checks and says before any work (issue 24): n and alpha, the largest radius, the base model."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = make_model_dir(cls.dir)
        cls.config = dict(model_dir=cls.model_dir, **TINY)

    @parameterized.named_parameters(
        # Smallest n: 0.001^(1/10) = 0.5012 > 1/2 >= 0.001^(1/9) = 0.464 (test_smallest_n_against_scipy checks these).
        ("certify", dict(n=5, alpha=0.001), "certify", 10),
        # A staged run's last stage bounds at alpha / 2: 0.0005^(1/10) = 0.467, 0.0005^(1/11) = 0.5005.
        ("staged", dict(n=10, n0=5, alpha=0.001, radii=[0.1], stages=[5, 10]), "certify", 11),
        # PREDICT: all n in one class gives p = 2^(1-n); 2^-9 = 0.00195 > 0.001 > 2^-10.
        ("predict", dict(n=10, alpha=0.001, mode="predict"), "predict", 11),
    )
    def test_n_and_alpha_too_small_are_refused_naming_the_smallest_n(self, overrides, verb, smallest):
        values = {**self.config, **overrides}
        if verb == "predict":
            del values["n0"]
        output = self._output()
        with self.assertRaisesRegex(ConfigError, rf"^--n={values['n']} and --alpha=0.001 cannot {verb} any example: "
                                                 rf".*every example abstains; the smallest --n that can {verb} at "
                                                 rf"--alpha=0.001 is {smallest}$"):
            make_config(output=output, **values)
        self.assertFalse(os.path.exists(output))
        make_config(output=output, **{**values, "n": smallest,
                                      **({"stages": [5, smallest]} if "stages" in values else {})})

    def test_smallest_n_against_scipy(self):
        # The values the test above names, from scipy: Clopper-Pearson's bound with k = n (beta.ppf) and the
        # two-sided binomial test of (n, 0).
        self.assertGreater(scipy.stats.beta.ppf(0.001, 10, 1), 0.5)
        self.assertLess(scipy.stats.beta.ppf(0.001, 9, 1), 0.5)
        self.assertGreater(scipy.stats.beta.ppf(0.0005, 11, 1), 0.5)
        self.assertLess(scipy.stats.beta.ppf(0.0005, 10, 1), 0.5)
        self.assertLess(scipy.stats.binomtest(11, 11, 0.5).pvalue, 0.001)
        self.assertGreater(scipy.stats.binomtest(10, 10, 0.5).pvalue, 0.001)

    @parameterized.parameters("float", "grid")
    def test_prints_the_largest_radius(self, mode):
        # sigma Phi^-1(alpha^(1/n) - slack), n = 100, alpha = 0.01, sigma = 0.25: 0.4237... by mpmath, printed
        # rounded down to 3 digits. The engine's bound and radius are within 1e-13 below the exact ones, far from
        # the next 3-digit boundary (checked by the two prints agreeing).
        config = self._config(self._output(), max=1, noise=mode)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            certify_run.certify_dataset(config, verbose=1)
        expected = _cdf_quantile_radius(0.01, 100, 0.25, config.sample_slack)
        self.assertEqual(expected, "0.423")
        self.assertIn(f"largest radius this run can certify: {expected} (sigma Phi^-1", printed.getvalue())
        self.assertEqual(config.sample_slack, 0.0 if mode == "float" else noise.grid_noise_table(0.25).tv_slack(784))

    def test_probe_threshold_against_scipy(self):
        # The largest c with P[Binomial(m, 1/2) <= c] <= 1e-6, by scipy's CDF.
        for m in (16, 17, 32, 64, 100):
            c = certify_run.probe_threshold(m)
            self.assertEqual(c, int(np.sum(scipy.stats.binom.cdf(np.arange(m + 1), m, 0.5) <= 1e-6)) - 1)
        self.assertEqual(certify_run.probe_threshold(64), 13)
        self.assertEqual(certify_run.probe_threshold(16), -1)  # 2^-16 > 1e-6: too few images to ever warn.

    def test_warns_about_a_base_model_at_chance_only(self):
        # A model whose logits are 0 says class 0 for every image: right on the test images of class 0 among the
        # first 64, 6 of them (at most 13 warn). The nearest-class-mean model is right on most noisy images.
        constant = os.path.join(self.dir, "constant.keras")
        inputs = tf.keras.Input((28, 28, 1))
        tf.keras.Model(inputs, tf.keras.layers.Dense(10, kernel_initializer="zeros")(
            tf.keras.layers.Flatten()(inputs))).save(constant)
        warnings = {}
        for name, model in (("constant", constant), ("nearest_mean", make_nearest_mean_model(self.dir))):
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                certify_run.certify_dataset(make_config(output=self._output(), model=model, dataset="fashion_mnist",
                                                        sigma=0.25, max=64, n=10, batch_size=64, alpha=0.01,
                                                        mode="predict"), verbose=0)
            warnings[name] = [line for line in stderr.getvalue().splitlines() if "not trained with noise" in line]
        _, labels = data.load_arrays("fashion_mnist", "test", limit=64)
        self.assertEqual(warnings["constant"], [
            f"warning: the base model classifies {int((labels == 0).sum())} of 64 noisy copies of the first examples "
            "right at sigma=0.25 (chance: 1/10): not trained with noise at this sigma?"])
        self.assertEqual(warnings["nearest_mean"], [])

