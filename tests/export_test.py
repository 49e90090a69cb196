"""Tests for tf_consreg.export: in-graph statistics, the SavedModel and its signatures."""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import parameterized
import keras
import mpmath
import numpy as np
import pytest
from scipy import stats as scipy_stats
import tensorflow as tf

from smoothing_test import partly_nonfinite_model  # tests/ is on sys.path under pytest
from smoothing_test import partly_nonfinite_probabilities
from smoothing_test import with_nan_weights
import mounts  # tests/mounts.py
import threshold_models  # tests/threshold_models.py
from tf_consreg import certify_spec
from tf_consreg import cli
from tf_consreg import data
from tf_consreg import export
from tf_consreg import models
from tf_consreg import noise as noise_lib
from tf_consreg import signatures
from tf_consreg import smoothing
from tf_consreg import stats
from tf_consreg import run_config
from tf_consreg import serving_load
from tf_consreg.errors import ConfigError

_PYTHON_FUNCTION_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def linear_model(w: np.ndarray, b: float) -> keras.Model:
    """Two-class model with logits (w.x + b, -(w.x + b)) on images of w's shape.

    Class 0 wins iff w.x + b > 0. Under noise d ~ N(0, sigma^2 I),
    w.(x + d) + b ~ N(w.x + b, sigma^2 |w|^2), so the smoothed classifier has
    P(class 0) = Phi((w.x + b) / (sigma |w|)), and Cohen's radius
    sigma Phi^-1(p_A) equals |w.x + b| / |w|, the distance to the hyperplane:
    the true certified radius.
    """
    model = keras.Sequential([keras.Input(w.shape), keras.layers.Flatten(), keras.layers.Dense(2)])
    kernel = np.stack([w.ravel(), -w.ravel()], axis=1).astype(np.float32)
    model.layers[-1].set_weights([kernel, np.array([b, -b], np.float32)])
    return model


def images_at_margins(w: np.ndarray, b: float, margins: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images in [0, 1] with signed distance (w.x + b) / |w| = margins[i] to the hyperplane.

    Starts from 0.5 + small noise and moves along w; w is small per pixel, so
    the images stay inside [0, 1] for the margins used here.
    """
    base = 0.5 + 0.05 * rng.uniform(-1, 1, size=(len(margins), *w.shape))
    norm = np.linalg.norm(w)
    current = (np.tensordot(base, w, axes=w.ndim) + b) / norm
    images = base + ((margins - current) / norm)[:, None, None, None] * w
    assert images.min() >= 0 and images.max() <= 1, "margins too large for [0, 1] images"
    return images.astype(np.float32)


# A base classifier on the 8-bit grid whose smoothed classifier under grid
# noise is known exactly. Integer weights on 2 x 2 pixels: with pixel values
# a_i + j_i (integers) the model's score sum_i w_i (a_i + j_i) / 255 + b, b =
# -(T + 1/2) / 255, is positive iff the integer S = sum_i w_i (a_i + j_i) is
# >= T + 1. Float32 arithmetic cannot move that decision: |x| < 3 and |w| <= 3,
# so the 4-term dot product and the bias are off by < 1e-5, far below the
# margin 1/2 / 255 ~ 2e-3 of every S to the threshold.
GRID_W = np.array([1.0, -2.0, 3.0, 1.0]).reshape(2, 2, 1)
GRID_T = 384  # = sum(w) * 128: the grey image 128 / 255 sits half a step below the threshold.
GRID_B = -(GRID_T + 0.5) / 255
GRID_SIGMA = 2 / 255  # 255 sigma = 2 levels: the rounding of the noise matters.


def grid_class0_probability(pixels: np.ndarray, sigma: float = GRID_SIGMA) -> np.ndarray:
    """P(class 0) of the grid model at integer `pixels` [B, 2, 2, 1] under the exactly rounded Gaussian.

    Independent of the code under test: j_i are iid with P(j) = Phi((j + 1/2) /
    (255 sigma)) - Phi((j - 1/2) / (255 sigma)), computed by mpmath at 40
    digits for |j| <= 40 (20 standard deviations at 255 sigma = 2; the mass
    beyond is < 1e-88), rounded to float64 (relative error 2^-53 each). The law
    of N = sum_i w_i j_i is the convolution of the four laws of w_i j_i on the
    integers, and P(class 0) = P(N >= T + 1 - sum_i w_i a_i). Float64
    convolution and summation of < 10^5 terms of probabilities add an absolute
    error below 10^5 * 2^-52 < 3e-11 (a crude bound; the true one is ~1e-15).
    """
    scale = mpmath.mpf(255) * mpmath.mpf(sigma)
    with mpmath.workdps(40):
        pmf = np.array([float(mpmath.ncdf((j + mpmath.mpf(0.5)) / scale) - mpmath.ncdf((j - mpmath.mpf(0.5)) / scale))
                        for j in range(-40, 41)])
    law = np.array([1.0])  # The law of N from its lowest value, `low`, on.
    low = 0
    for w in GRID_W.ravel().astype(int):
        term = np.zeros(80 * abs(w) + 1)
        term[(np.arange(-40, 41) * w + 40 * abs(w))] = pmf
        law, low = np.convolve(law, term), low - 40 * abs(w)
    tail = np.concatenate([np.cumsum(law[::-1])[::-1], [0.0]])  # tail[m] = P(N >= low + m)
    need = GRID_T + 1 - np.tensordot(pixels.astype(np.int64), GRID_W.astype(np.int64), axes=3) - low
    return tail[np.clip(need, 0, len(law))]


def grid_images(count: int, rng: np.random.Generator, spread: int = 16) -> np.ndarray:
    """Integer pixels [count, 2, 2, 1] near grey whose score S lies within `spread` of the threshold."""
    pixels = []
    while len(pixels) < count:
        a = rng.integers(112, 145, size=(2, 2, 1))
        if abs(int(np.sum(a * GRID_W)) - GRID_T - 1) <= spread:
            pixels.append(a)
    return np.array(pixels)


def on_grid(pixels: np.ndarray) -> np.ndarray:
    """float32 images of integer pixels, as the data pipeline makes them: float32(a) / 255."""
    return pixels.astype(np.float32) / np.float32(255)


def export_config(**values) -> export.ExportConfig:
    """The ExportConfig of `values` by flag name, the sampling settings (its CertifySpec's fields) among them.

    Float noise unless `values` say otherwise (the CertifySpec default is grid): most tests here feed random
    float images and compare with the closed forms of float noise; GridExportTest asks for grid.
    """
    return cli.config_from_values(export.ExportConfig, {"noise": "float", **values})


def version_config(**values) -> export.VersionExportConfig:
    """The VersionExportConfig of `values` by flag name, as bin/export.py builds it from its flags."""
    return cli.config_from_values(export.VersionExportConfig, values)


def export_flat(base_model: keras.Model, export_dir: str, **values) -> str:
    """`export.export_smoothed` of the settings `values`, given flat as for `export_config`."""
    config = export_config(**values)
    return export.export_smoothed(base_model, export_dir, config.spec, num_classes=config.num_classes,
                                  class_names=config.class_names, seed=config.seed, max_batch=config.max_batch)


def _linear_setup(shape=(4, 4, 1), seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape) * 0.25
    b = -float(np.sum(w)) * 0.5  # the hyperplane passes through the grey image
    return w, b, rng


def make_model_dir(root: str, sigma: float = 0.5) -> str:
    """A finished training run as bin/train.py leaves it: base_model.keras + train_config.json."""

    model_dir = os.path.join(root, "run")
    os.makedirs(model_dir)
    models.get_architecture("lenet", "fashion_mnist").save(os.path.join(model_dir, models.BASE_MODEL_FILE))
    train_config = run_config.TrainConfig.from_dict({"model_dir": model_dir, "dataset": "fashion_mnist",
                                                     "sigma": sigma})
    with open(os.path.join(model_dir, run_config.TRAIN_CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(train_config.to_json())
    return model_dir


def _signature_outputs(loaded, images, name=signatures.SERVING_SIGNATURE, radius=None):
    inputs = {"images": tf.constant(images)}
    if radius is not None:
        inputs["radius"] = tf.constant(radius, tf.float32)
    return {k: v.numpy() for k, v in loaded.signatures[name](**inputs).items()}


def library_staged_certify(smooth, images, radius, *, n0, n, alpha, batch_size, stages, seed):
    """`Smooth.certify_staged_batch` with one radius per image, keyed as the export keys a request.

    The library asks every image of a call the same radii, so images are
    grouped by radius; image i keeps its id i, which fixes its noise
    whatever group it is certified in.

    Returns:
      dict of class, certified, radius, samples [B], as certify_radius.
    """
    out = {"class": np.zeros(len(images), np.int64), "certified": np.zeros(len(images), bool),
           "radius": np.zeros(len(images)), "samples": np.zeros(len(images), np.int64)}
    for r in np.unique(radius):
        ids = np.flatnonzero(radius == r)
        result = smooth.certify_staged_batch(images[ids], n0, n, alpha, batch_size, radii=[float(r)], stages=stages,
                                             seed=seed, image_ids=ids)
        out["class"][ids], out["certified"][ids] = result.classes, result.certified[:, 0]
        out["radius"][ids], out["samples"][ids] = result.radii, result.samples
    return out


class ExportConfigTest(parameterized.TestCase):

    @parameterized.named_parameters(
        # The sampling settings' own checks: certify_spec_test.
        ("no_sigma", dict(sigma=None), "^--sigma is required"),
        ("one_class", dict(num_classes=1), "num_classes"),
        ("class_names_length", dict(class_names=("a", "b", "c")), "class_names"),
        ("seed_negative", dict(seed=-1), "--seed"),
        ("max_batch_zero", dict(max_batch=0), "^--max_batch must be an integer >= 1, got 0$"),
        ("stage_below_n0", dict(n=10000, stages=(50, 10000)), "^--stages must start at n0=100"),
        ("grid_sigma_above_16", dict(noise="grid", sigma=20.0),
         r"^--sigma=20.0 with --noise=grid: grid noise: sigma must be in \(0, 16\]"),
    )
    def test_bad_values_raise_naming_the_field(self, change, name):
        values = {"sigma": 0.25, "num_classes": 2, **change}
        with self.assertRaisesRegex(ConfigError, name):
            export_config(**values)

    def test_stages_default_and_levels(self):
        # The library's default from max(n0, 100), and the library's split: alpha / 2 last, alpha / 14 before.
        config = export_config(sigma=0.25, num_classes=2, n0=100, n=100000, alpha=0.001)
        self.assertEqual(config.spec.stages, (100, 300, 1000, 3000, 10000, 30000, 50000, 100000))
        self.assertEqual(config.spec.stages, stats.resolve_stages(None, 100000, 100))
        self.assertEqual(config.levels, (0.001 / 14,) * 7 + (0.0005,))
        self.assertEqual(config.levels, stats.stage_levels(0.001, 8))
        self.assertAlmostEqual(sum(config.levels), 0.001, delta=1e-15)
        self.assertEqual(export_config(sigma=0.25, num_classes=2, n0=500, n=10000).spec.stages, (1000, 3000, 5000,
                                                                                                   10000))
        # One stage n: the staged signatures are fixed-n PREDICT (and CERTIFY at n).
        one = export_config(sigma=0.25, num_classes=2, n=5000, stages=[5000])
        self.assertEqual((one.spec.stages, one.levels), ((5000,), (0.001,)))

    def test_grid_predict_level_left_by_the_slack(self):
        # Grid noise pays n samples' slack in PREDICT's level (alpha - n d slack_per_pixel); an ImageNet-size
        # image at n = 10^5 (1.5e5 pixels x ~1e-12 x 1e5 = 0.015) leaves nothing of alpha = 0.001.
        config = export_config(sigma=0.25, num_classes=2, n=100000, alpha=0.001, noise="grid")
        with self.assertRaisesRegex(ConfigError, r"^--n=100000, --alpha=0.001: grid noise: n=100000 samples"):
            config.predict_levels((224, 224, 3))
        table = noise_lib.grid_noise_table(0.25)
        levels = config.predict_levels((28, 28, 1))
        self.assertLessEqual(sum(levels), 0.001 - 100000 * 784 * table.tv_slack_per_pixel)
        self.assertEqual(config.levels, stats.stage_levels(0.001, 8))  # certify_radius keeps alpha.
        self.assertEqual(export_config(sigma=0.25, num_classes=2, n=100000).predict_levels((224, 224, 3)),
                         config.levels)  # Float noise: no slack.

    def test_bad_arguments_write_nothing(self):
        model = linear_model(*_linear_setup()[:2])
        with tempfile.TemporaryDirectory() as root:
            target = os.path.join(root, "export")
            with self.assertRaisesRegex(ConfigError, "--sigma"):
                export_flat(model, target, sigma=0.0, num_classes=2)
            with self.assertRaisesRegex(ConfigError, "num_classes=3"):
                export_flat(model, target, sigma=0.25, num_classes=3)
            self.assertFalse(os.path.exists(target))
            os.makedirs(target)
            open(os.path.join(target, "keep"), "w").close()
            with self.assertRaisesRegex(ConfigError, "not an empty directory"):
                export_flat(model, target, sigma=0.25, num_classes=2)
            self.assertEqual(os.listdir(target), ["keep"])


class VersionExportTest(parameterized.TestCase):
    """`VersionExportConfig` and `export_version`, the library side of bin/export.py."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.model_dir = make_model_dir(cls._tmp.name, sigma=0.5)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    def _tempdir(self):
        path = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def _export_dir(self):
        return os.path.join(self._tempdir(), "serving")

    def test_exports_one_complete_version_and_checks_it_on_test_images(self):
        # One export for what were two tests of the same settings (issue 21); without --check_images the
        # check is None (test_stale_staging_directories_are_removed).
        config = version_config(export_dir=self._export_dir(), model_dir=self.model_dir, n0=4, n=16,
                                batch_size=16, version=3, check_images=3, max_batch=2)
        # max_batch 2: the 3 check images go in two requests (2 + 1), which the export takes.
        self.assertEqual(config.spec.sigma, 0.5)  # from train_config.json
        path, check, _ = export.export_version(config)
        self.assertEqual(path, os.path.join(config.export_dir, "3"))
        self.assertEqual(os.listdir(config.export_dir), ["3"])  # no staging directory left
        meta = export.read_metadata(path)
        self.assertEqual(meta["sigma"], 0.5)
        self.assertEqual(meta["n"], 16)
        self.assertEqual(meta["n_max"], 16)
        self.assertEqual(meta["stages"], [16])  # n below 100: the one stage n.
        self.assertEqual(meta["levels"], [0.001])
        self.assertEqual(meta["input_shape"], [28, 28, 1])
        self.assertEqual(meta["class_names"][0], "T-shirt/top")
        self.assertEqual(meta["seed"], -1)
        self.assertEqual(meta["compute_dtype"], "float32")  # The default.
        self.assertEqual(meta["max_batch"], 2)
        self.assertEqual(version_config(export_dir=config.export_dir, model_dir=self.model_dir).max_batch,
                         export.DEFAULT_MAX_BATCH)  # The default.
        # bin/export.py's default is grid noise (every dataset we ship is 8-bit): the test images, on the
        # grid as the data pipeline gives them, were certified by the reloaded grid export below.
        self.assertEqual((meta["noise"], meta["input_contract"]), ("grid", signatures.INPUT_CONTRACTS["grid"]))
        self.assertEqual(certify_spec.EXPORT.noise, "grid")
        with self.assertRaisesRegex(ConfigError, "exists; exports are never overwritten"):
            version_config(export_dir=config.export_dir, model_dir=self.model_dir, version=3)
        _, labels = data.load_arrays("fashion_mnist", "test", limit=3)
        np.testing.assert_array_equal(check["label"], labels)
        self.assertCountEqual(check, ["label", "class", "radius", "p_lower"])
        for value in check.values():
            self.assertEqual(value.shape, (3,))

    def test_check_images_beyond_the_test_split_is_refused_before_writing(self):
        config = version_config(export_dir=self._export_dir(), model_dir=self.model_dir, n0=4, n=16,
                                batch_size=16, version=4, check_images=10001)
        with self.assertRaisesRegex(ConfigError, "^--check_images=10001 is more than the 10000 images of "
                                    "fashion_mnist's test split$"):
            export.export_version(config)
        self.assertFalse(os.path.exists(config.export_dir))

    def test_stages_reach_the_export(self):
        config = version_config(export_dir=self._export_dir(), model_dir=self.model_dir, n0=4, n=400,
                                batch_size=100, version=5, stages=[100, 400], alpha=0.01, max_batch=7)
        meta = export.read_metadata(export.export_version(config).path)
        self.assertEqual((meta["stages"], meta["levels"], meta["n_max"]), ([100, 400], [0.005, 0.005], 400))
        self.assertEqual(meta["max_batch"], 7)
        default = version_config(export_dir=self._export_dir(), model_dir=self.model_dir, n=100000)
        self.assertEqual(default.spec.stages, stats.default_stages(100000))

    def _staging_dir(self, parent, name, age_seconds):
        path = tempfile.mkdtemp(dir=parent, prefix=f".{name}.incomplete-")
        open(os.path.join(path, "saved_model.pb"), "w").close()
        then = time.time() - age_seconds
        os.utime(path, (then, then))
        return path

    def test_stale_staging_directories_are_removed(self):
        export_dir = self._export_dir()
        os.makedirs(export_dir)
        stale = self._staging_dir(export_dir, "3", age_seconds=3600)
        held = self._staging_dir(export_dir, "4", age_seconds=3600)
        fresh = self._staging_dir(export_dir, "5", age_seconds=0)
        other = os.path.join(export_dir, ".notes.incomplete")  # Not a staging name: never touched.
        os.makedirs(other)
        os.utime(other, (0, 0))
        # A running export holds its staging directory's lock (another open file: flock conflicts in-process too).
        lock = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, lock)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        config = version_config(export_dir=export_dir, model_dir=self.model_dir, n0=4, n=16,
                                batch_size=16, version=6)
        exported = export.export_version(config)
        self.assertEqual(exported.removed, (stale,))
        self.assertIsNone(exported.check)  # No --check_images.
        self.assertCountEqual(os.listdir(export_dir), ["6", os.path.basename(held), os.path.basename(fresh),
                                                       ".notes.incomplete"])
        self.assertFalse(os.path.exists(stale))

    @pytest.mark.slow
    def test_killed_export_leaves_a_staging_directory_that_the_next_export_removes(self):
        export_dir = self._export_dir()
        # A real export in another process, stopped for good while it writes the warm-up file.
        script = (
            "import os, signal, sys\n"
            "sys.path.insert(0, sys.argv[3])\n"
            "from unittest import mock\n"
            "from tf_consreg import certify_spec\n"
            "from tf_consreg import export\n"
            "def stop(*args, **kwargs):\n"
            "    print('staged', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "with mock.patch.object(export, '_write_warmup', stop):\n"
            "    spec = certify_spec.CertifySpec(n0=4, n=16, batch_size=16, noise='float')\n"
            "    export.export_version(export.VersionExportConfig(export_dir=sys.argv[1], model_dir=sys.argv[2],\n"
            "                                                     spec=spec, version=1))\n"
        )
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run([sys.executable, "-c", script, export_dir, self.model_dir, repo], capture_output=True,
                                text=True, timeout=300, check=False)
        self.assertEqual(result.returncode, -9, result.stderr[-2000:])
        self.assertIn("staged", result.stdout)
        (left,) = os.listdir(export_dir)
        self.assertRegex(left, r"^\.1\.incomplete-")
        path = os.path.join(export_dir, left)
        os.utime(path, (time.time() - 120, time.time() - 120))  # Older than a staging directory being locked.
        export.export_version(version_config(export_dir=export_dir, model_dir=self.model_dir, n0=4, n=16,
                                             batch_size=16, version=2))
        self.assertEqual(os.listdir(export_dir), ["2"])

    def test_default_version_is_the_time(self):
        before = int(time.time())
        config = version_config(export_dir=self._export_dir(), model_dir=self.model_dir)
        self.assertBetween(config.version, before, int(time.time()))

    def test_failed_export_leaves_nothing_behind(self):
        config = version_config(export_dir=self._export_dir(), model_dir=self.model_dir, version=1)
        with mock.patch.object(export, "_write_warmup", side_effect=OSError("disk full")):
            with self.assertRaisesRegex(OSError, "disk full"):
                export.export_version(config)
        self.assertEqual(os.listdir(config.export_dir), [])

    def test_export_dir_filled_meanwhile_is_left_untouched(self):
        export_dir = os.path.join(self._tempdir(), "model")
        model = linear_model(*_linear_setup()[:2])
        real_write = export._write_warmup  # pylint: disable=protected-access

        def write_and_race(*args, **kwargs):
            real_write(*args, **kwargs)
            os.makedirs(export_dir)
            open(os.path.join(export_dir, "other"), "w").close()

        with mock.patch.object(export, "_write_warmup", side_effect=write_and_race):
            with self.assertRaisesRegex(ConfigError, "was filled during the export"):
                export_flat(model, export_dir, sigma=0.25, num_classes=2, n0=2, n=4)
        self.assertEqual(os.listdir(export_dir), ["other"])
        self.assertEqual(os.listdir(os.path.dirname(export_dir)), ["model"])

    def test_model_file_with_sigma_compute_dtype_and_float_noise(self):
        # One export for what were two tests (issue 21); the default compute_dtype, float32, is checked in
        # test_exports_one_complete_version_and_checks_it_on_test_images.
        model_file = os.path.join(self.model_dir, models.BASE_MODEL_FILE)
        config = version_config(export_dir=self._export_dir(), model=model_file, sigma=0.3, n0=2, n=8,
                                batch_size=8, version=9, compute_dtype="bfloat16", noise="float")
        meta = export.read_metadata(export.export_version(config).path)
        self.assertEqual(meta["sigma"], 0.3)
        self.assertEqual(meta["class_names"], [str(i) for i in range(10)])
        self.assertEqual(meta["compute_dtype"], "bfloat16")
        self.assertEqual((meta["noise"], meta["input_contract"], meta["tv_slack"]),
                         ("float", signatures.INPUT_CONTRACTS["float"], 0.0))
        self.assertEqual(meta["predict_levels"], meta["levels"])

    @parameterized.named_parameters(
        ("no_model", dict(), "exactly one of --model_dir"),
        ("both_models", dict(model_dir="MODEL_DIR", model="x.keras"), "exactly one of --model_dir"),
        ("missing_model_dir", dict(model_dir="/nonexistent/run"), "--model_dir=/nonexistent/run is not a directory"),
        ("empty_model_dir", dict(model_dir="EMPTY"), "holds no base_model.keras"),
        ("model_without_sigma", dict(model="MODEL_FILE"), "--sigma is required with --model"),
        ("model_not_keras", dict(model="/nonexistent.keras", sigma=0.2), "--model=/nonexistent.keras"),
        # The sampling settings' own checks (sigma, n0, n, alpha, batch_size, stages, compute_dtype):
        # certify_spec_test.
        ("version", dict(model_dir="MODEL_DIR", version=0), "--version"),
        ("export_dir", dict(model_dir="MODEL_DIR", export_dir=""), "--export_dir is required"),
        ("check_images_negative", dict(model_dir="MODEL_DIR", check_images=-1), "--check_images"),
        ("check_images_without_run", dict(model="MODEL_FILE", sigma=0.2, check_images=1),
         "--check_images needs --model_dir"),
        ("max_batch", dict(model_dir="MODEL_DIR", max_batch=-3), "^--max_batch must be an integer >= 1, got -3$"),
        ("stage_below_n0", dict(model_dir="MODEL_DIR", n=1000, n0=200, stages=(100, 1000)),
         "^--stages must start at n0=200"),
        ("grid_sigma", dict(model="MODEL_FILE", sigma=17.0), r"^--sigma=17.0 with --noise=grid"),
    )
    def test_bad_values_fail_before_any_work(self, values, message):
        empty = self._tempdir()
        substitute = {"MODEL_DIR": self.model_dir, "EMPTY": empty,
                      "MODEL_FILE": os.path.join(self.model_dir, models.BASE_MODEL_FILE)}
        values = {k: substitute.get(v, v) if isinstance(v, str) else v for k, v in values.items()}
        export_dir = self._export_dir()
        with self.assertRaisesRegex(ConfigError, message):
            version_config(**{"export_dir": export_dir, **values})
        self.assertFalse(os.path.exists(export_dir))

    def test_model_dir_without_train_config(self):
        model_dir = self._tempdir()
        shutil.copy(os.path.join(self.model_dir, models.BASE_MODEL_FILE), model_dir)
        with self.assertRaisesRegex(ConfigError, "train_config.json not found"):
            version_config(export_dir=self._export_dir(), model_dir=model_dir)


class WriteFailureTest(parameterized.TestCase):
    """A read-only or full --export_dir: refused before any work, or one OSError naming it, nothing left (#22, 2).

    Each case runs on a real tmpfs ("mount", where mounting is allowed: root)
    and with the OS error raised by mock ("mock", always), so both paths run
    wherever root is available and the mock one runs everywhere.
    """

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.model_dir = make_model_dir(cls._tmp.name, sigma=0.5)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    @contextlib.contextmanager
    def _place(self, how, options, failure):
        """A directory where writing fails: a tmpfs mounted with `options`, or a temporary one and `failure` mocked."""
        if how == "mock":
            with tempfile.TemporaryDirectory() as directory, failure:
                yield directory
            return
        with mounts.tmpfs(options) as directory:
            if directory is None:
                self.skipTest("mounting a tmpfs needs root here; the mock case covers the code")
            yield directory

    @parameterized.parameters("mount", "mock")
    def test_a_read_only_export_dir_is_refused_before_loading(self, how):
        erofs = mock.patch.object(export.files.tempfile, "mkstemp",
                                  side_effect=OSError(errno.EROFS, os.strerror(errno.EROFS)))
        with self._place(how, "ro", erofs) as read_only:
            link = os.path.join(self._tmp.name, f"link_{how}")
            os.symlink(read_only, link)  # The case: a writable name for a read-only directory.
            self.addCleanup(os.remove, link)
            for export_dir, probed in ((os.path.join(read_only, "serving"), read_only), (read_only, read_only),
                                       (link, link)):
                with self.subTest(export_dir=export_dir), \
                        mock.patch.object(export.models, "load_base_model") as load:
                    with self.assertRaisesWithLiteralMatch(
                            ConfigError, f"--export_dir={export_dir}: cannot write in {os.path.abspath(probed)} "
                                         "(Read-only file system)"):
                        export.export_version(version_config(export_dir=export_dir, model_dir=self.model_dir,
                                                             version=1))
                    load.assert_not_called()
            self.assertEqual(os.listdir(read_only), [])

    @parameterized.parameters("mount", "mock")
    def test_a_full_disk_is_one_os_error_naming_the_version_and_leaves_nothing(self, how):
        # On the mount, TensorFlow's SaveV2 meets ENOSPC: LeNet's variables alone (~250 KB) exceed 200 KiB.
        # By mock, the same error from tf.saved_model.save, which keras's ExportArchive.write_out calls.
        enospc = mock.patch.object(tf.saved_model, "save", side_effect=tf.errors.ResourceExhaustedError(
            None, None, "{{function_node __wrapped__SaveV2}} /x/variables.data-00000-of-00001.tempstate1; "
                        "No space left on device [Op:SaveV2]"))
        with self._place(how, "size=200k", enospc) as full:
            export_dir = os.path.join(full, "serving")
            config = version_config(export_dir=export_dir, model_dir=self.model_dir, n0=4, n=16, batch_size=16,
                                    version=1)
            with self.assertRaises(OSError) as raised:
                export.export_version(config)
            self.assertEqual(raised.exception.filename, config.version_dir)
            self.assertRegex(raised.exception.strerror, r"^/\S+; No space left on device$")
            self.assertEqual(os.listdir(export_dir), [])  # The staging directory is removed.


class LenetExportTest(tf.test.TestCase):
    """One export of the project's LeNet, shared by the checks on its SavedModel."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.export_dir = os.path.join(cls._tmp.name, "lenet")
        cls.info_names = tuple(f"c{i}" for i in range(10))
        keras.utils.set_random_seed(1)
        cls.model = models.get_architecture("lenet", "fashion_mnist")
        cls.kwargs = dict(sigma=0.25, num_classes=10, n0=8, n=64, alpha=0.01, batch_size=64,
                          class_names=cls.info_names, seed=123)
        export_flat(cls.model, cls.export_dir, **cls.kwargs)
        cls.loaded = tf.saved_model.load(cls.export_dir)
        cls.images = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    def test_layout(self):
        self.assertTrue(os.path.isfile(os.path.join(self.export_dir, "saved_model.pb")))
        self.assertTrue(os.path.isdir(os.path.join(self.export_dir, "variables")))
        extra = os.path.join(self.export_dir, export.ASSETS_EXTRA)
        self.assertCountEqual(os.listdir(extra), [export.WARMUP_FILE, export.METADATA_FILE])

    def test_reloaded_equals_in_memory(self):
        # A fixed seed makes both runs draw the same noise, so they agree exactly.
        _, endpoints = export.build_archive(self.model, export_config(**self.kwargs))
        radius = np.array([0.05, 0.1, 0.2], np.float32)
        expected_keys = {signatures.SERVING_SIGNATURE: ["class", "radius", "p_lower"],
                         signatures.CERTIFY_RADIUS_SIGNATURE: ["class", "certified", "radius", "samples"],
                         signatures.PREDICT_SIGNATURE: ["class", "samples"]}
        for name, keys in expected_keys.items():
            with self.subTest(signature=name):
                args = [tf.constant(self.images)] + ([tf.constant(radius)] if "certified" in keys else [])
                in_memory = {k: v.numpy() for k, v in endpoints[name](*args).items()}
                reloaded = _signature_outputs(self.loaded, self.images, name,
                                              radius if "certified" in keys else None)
                self.assertCountEqual(reloaded, keys)
                for key in reloaded:
                    np.testing.assert_array_equal(reloaded[key], in_memory[key], err_msg=key)

    def test_output_types_and_certificate_rule(self):
        out = _signature_outputs(self.loaded, self.images)
        self.assertEqual(out["class"].dtype, np.int64)
        self.assertEqual(out["radius"].dtype, np.float32)
        self.assertEqual(out["p_lower"].dtype, np.float32)
        for value in out.values():
            self.assertEqual(value.shape, (3,))
        abstain = out["class"] == stats.ABSTAIN
        np.testing.assert_array_equal(abstain, out["p_lower"] < 0.5)
        np.testing.assert_array_equal(out["radius"][abstain], 0.0)
        np.testing.assert_allclose(out["radius"][~abstain], 0.25 * scipy_stats.norm.ppf(out["p_lower"][~abstain]),
                                   rtol=1e-5, atol=1e-5)

    def test_certify_radius_outputs(self):
        radius = np.array([0.05, 0.1, 0.2], np.float32)
        out = _signature_outputs(self.loaded, self.images, signatures.CERTIFY_RADIUS_SIGNATURE, radius)
        self.assertEqual({k: v.dtype for k, v in out.items()},
                         {"class": np.int64, "certified": np.bool_, "radius": np.float32, "samples": np.int64})
        for value in out.values():
            self.assertEqual(value.shape, (3,))
        self.assertTrue(np.all(np.isin(out["samples"], export_config(**self.kwargs).spec.stages)))
        abstain = out["class"] == stats.ABSTAIN
        np.testing.assert_array_equal(out["radius"][abstain], 0.0)
        np.testing.assert_array_equal(out["certified"], (out["radius"] >= radius) & ~abstain)

    def test_empty_batch(self):
        empty = np.zeros((0, 28, 28, 1), np.float32)
        for name, radius in ((signatures.SERVING_SIGNATURE, None), (signatures.PREDICT_SIGNATURE, None),
                             (signatures.CERTIFY_RADIUS_SIGNATURE, np.zeros(0, np.float32))):
            for value in _signature_outputs(self.loaded, empty, name, radius).values():
                self.assertEqual(value.shape, (0,))

    def test_metadata_signature_and_file(self):
        meta = {k: v.numpy() for k, v in self.loaded.signatures[signatures.METADATA_SIGNATURE]().items()}
        self.assertEqual(meta["sigma"], 0.25)
        self.assertEqual(meta["n0"], 8)
        self.assertEqual(meta["n"], 64)
        self.assertEqual(meta["n_max"], 64)
        np.testing.assert_array_equal(meta["stages"], [64])  # n = 64 < 100: the one stage n.
        np.testing.assert_array_equal(meta["levels"], [0.01])
        self.assertEqual(meta["alpha"], 0.01)
        self.assertEqual(meta["num_classes"], 10)
        self.assertEqual(meta["seed"], 123)
        np.testing.assert_array_equal(meta["input_shape"], [28, 28, 1])
        self.assertEqual([c.decode() for c in meta["class_names"]], list(self.info_names))
        from tf_consreg import __version__  # pylint: disable=import-outside-toplevel
        self.assertEqual(meta["version"].decode(), __version__)
        self.assertEqual(meta["compute_dtype"].decode(), "float32")
        on_disk = export.read_metadata(self.export_dir)
        self.assertEqual(on_disk["class_names"], list(self.info_names))
        self.assertEqual(on_disk["input_shape"], [28, 28, 1])
        self.assertEqual(on_disk["sigma"], 0.25)

    def test_saved_model_cli_lists_signatures_with_predict_method(self):
        cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
        result = subprocess.run([cli, "show", "--dir", self.export_dir, "--all"], capture_output=True, text=True,
                                timeout=120, check=True)
        for name in (signatures.SERVING_SIGNATURE, signatures.CERTIFY_RADIUS_SIGNATURE, signatures.PREDICT_SIGNATURE,
                     signatures.METADATA_SIGNATURE):
            self.assertIn(f"signature_def['{name}']", result.stdout)
        for key in ("inputs['images']", "inputs['radius']", "outputs['class']", "outputs['radius']",
                    "outputs['p_lower']", "outputs['certified']", "outputs['samples']"):
            self.assertIn(key, result.stdout)
        blocks = result.stdout.split("signature_def[")[1:]
        for block in blocks:
            if block.startswith("'__saved_model_init_op'"):
                continue
            self.assertIn("Method name is: tensorflow/serving/predict", block)

    def test_graph_has_no_python_function_ops(self):
        from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel

        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(self.export_dir, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        ops = set()
        for meta_graph in proto.meta_graphs:
            ops.update(node.op for node in meta_graph.graph_def.node)
            for function in meta_graph.graph_def.library.function:
                ops.update(node.op for node in function.node_def)
        self.assertIn("Betainc", ops)  # the walk does reach the function library (the CP bound)
        self.assertFalse(ops & _PYTHON_FUNCTION_OPS, ops & _PYTHON_FUNCTION_OPS)

    def test_loads_and_runs_in_a_process_without_tf_consreg(self):
        script = (
            "import json, sys\n"
            "import numpy as np, tensorflow as tf\n"
            f"loaded = tf.saved_model.load({self.export_dir!r})\n"
            "out = loaded.signatures['serving_default'](images=tf.constant(np.full((2, 28, 28, 1), 0.5, np.float32)))\n"
            "meta = loaded.signatures['metadata']()\n"
            "print(json.dumps({'classes': out['class'].numpy().tolist(), 'sigma': float(meta['sigma']),\n"
            "                  'imported': sorted(m for m in sys.modules if m.startswith('tf_consreg'))}))\n"
        )
        env = dict(os.environ, PYTHONPATH="")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                                env=env, cwd=self._tmp.name, check=False)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertEqual(answer["imported"], [])
        self.assertLen(answer["classes"], 2)
        self.assertEqual(answer["sigma"], 0.25)

    def test_warmup_file_holds_requests_that_run(self):
        from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=import-outside-toplevel

        path = os.path.join(self.export_dir, export.ASSETS_EXTRA, export.WARMUP_FILE)
        names = []
        for record in tf.data.TFRecordDataset(path):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            request = log.predict_log.request
            names.append(request.model_spec.signature_name)
            inputs = {key: tf.constant(tf.make_ndarray(value)) for key, value in request.inputs.items()}
            self.assertEqual(inputs["images"].shape, (1, 28, 28, 1))
            out = self.loaded.signatures[request.model_spec.signature_name](**inputs)
            self.assertEqual(out["class"].shape, (1,))
        self.assertEqual(names, [signatures.SERVING_SIGNATURE, signatures.CERTIFY_RADIUS_SIGNATURE,
                                 signatures.PREDICT_SIGNATURE])

    def test_bad_requests_fail_with_clear_messages(self):
        good = np.full((1, 28, 28, 1), 0.5, np.float32)
        nan, inf = good.copy(), good.copy()
        nan[0, 3, 3, 0] = np.nan
        inf[0, 3, 3, 0] = np.inf
        cases = {
            "rank": (np.zeros((2, 28, 28), np.float32), r"images must be float32 \[batch, 28, 28, 1\].*\[2 28 28\]"),
            "size": (np.zeros((1, 32, 32, 1), np.float32), r"got shape\] \[1 32 32 1\]"),
            "channels": (np.zeros((1, 28, 28, 3), np.float32), r"got shape\] \[1 28 28 3\]"),
            "nan": (nan, "images must be finite.*NaN"),
            "inf": (inf, "images must be finite.*Inf"),
            # The first pixel outside [0, 1], by index and value (issue 24's guardrail for the served model).
            "above_one": (good * 2.5, r"images must be in \[0, 1\].*first pixel outside \(index, value\):\] "
                                      r"\[\[0 0 0 0\]\] \[1.25\]"),
            "negative": (good - 0.6, r"images must be in \[0, 1\].*\[\[0 0 0 0\]\] \[-0.1"),
        }
        for signature in (signatures.SERVING_SIGNATURE, signatures.CERTIFY_RADIUS_SIGNATURE,
                          signatures.PREDICT_SIGNATURE):
            for name, (images, message) in cases.items():
                with self.subTest(signature=signature, case=name):
                    inputs = {"images": tf.constant(images)}
                    if signature == signatures.CERTIFY_RADIUS_SIGNATURE:
                        inputs["radius"] = tf.fill(tf.shape(images)[:1], 0.1)
                    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
                        self.loaded.signatures[signature](**inputs)

    def test_bad_radii_fail_with_clear_messages(self):
        images = tf.constant(np.full((2, 28, 28, 1), 0.5, np.float32))
        cases = {
            "scalar": (0.1, r"radius must be float32 \[batch\], one radius per image; got shape\] \[\] "
                            r"\[for a batch of\] \[2\]"),
            "too_few": ([0.1], r"one radius per image; got shape\] \[1\] \[for a batch of\] \[2\]"),
            "rank_2": ([[0.1], [0.2]], r"got shape\] \[2 1\]"),
            "zero": ([0.1, 0.0], r"radius must be finite and > 0.*\[0.1 0\]"),
            "negative": ([-0.1, 0.2], "radius must be finite and > 0"),
            "nan": ([0.1, np.nan], "radius must be finite and > 0"),
            "inf": ([np.inf, 0.1], "radius must be finite and > 0"),
            # Once refused as "got [0 0]": the CPU kernels flush subnormals to 0 in the printout too.
            "subnormal": ([0.1, 1e-45], r"smallest normal float32 .*got a subnormal radius at positions\] \[1\]"),
        }
        for name, (radius, message) in cases.items():
            with self.subTest(case=name):
                with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
                    self.loaded.signatures[signatures.CERTIFY_RADIUS_SIGNATURE](
                        images=images, radius=tf.constant(radius, tf.float32))


class ComputeDtypeTest(tf.test.TestCase):
    """The export samples the float32 network by default, whatever the model computes in; bfloat16 on request.

    The base model is tests/threshold_models.py's threshold on pixel 5 at
    1/2, trained (saved) computing in bfloat16: its float32 network is
    [x_5 > 1/2], its bfloat16 one [x_5 > 1/2 + 2^-9]. At x_5 = 0.501 they
    disagree; sigma = 1e-4 keeps every sample 9 sigma from both thresholds.
    """

    def setUp(self):
        super().setUp()
        self.model = threshold_models.in_dtype(threshold_models.threshold_model((4, 4, 1), 5, 0.5), "bfloat16")
        images = np.full((2, 16), 0.9, np.float32)
        images[:, 5] = (0.501, 0.3)
        self.images = images.reshape(2, 4, 4, 1)
        self.kwargs = dict(sigma=1e-4, num_classes=2, n0=10, n=50, alpha=0.01, batch_size=100, seed=1)

    def test_each_dtype_certifies_its_network(self):
        for compute_dtype, classes in (("float32", [1, 0]), ("bfloat16", [0, 0])):
            config = export_config(**self.kwargs, compute_dtype=compute_dtype)
            _, endpoints = export.build_archive(self.model, config)
            out = endpoints[signatures.SERVING_SIGNATURE](tf.constant(self.images))
            self.assertAllEqual(out["class"], classes, msg=compute_dtype)
            self.assertEqual(endpoints[signatures.METADATA_SIGNATURE]()["compute_dtype"].numpy().decode(),
                             compute_dtype)
        self.assertEqual(export_config(**self.kwargs).spec.compute_dtype, "float32")  # The default.

    def test_radius_exceeds_the_closed_form_no_more_often_than_alpha_in_both_dtypes(self):
        # smoothing_test's ClosedFormInBothDtypesTest through the export: the
        # exact radius at x is |x_5 - t|, t = 1/2 in float32 and 1/2 + 2^-9 in
        # bfloat16; float32's rounding of x + noise moves it by < 3e-7 (the
        # derivation is there), so radii are compared with 1e-5 to spare.
        sigma, alpha, count = 0.25, 0.1, 400
        rng = np.random.default_rng(1)
        images = rng.uniform(size=(count, 16)).astype(np.float32)
        pixels = images[:, 5].astype(np.float64)
        for compute_dtype, threshold in (("float32", 0.5), ("bfloat16", threshold_models.bfloat16_threshold(0.5))):
            config = export_config(sigma=sigma, num_classes=2, n0=20, n=50, alpha=alpha, batch_size=1000,
                                   seed=1, compute_dtype=compute_dtype, max_batch=count)
            _, endpoints = export.build_archive(self.model, config)
            out = endpoints[signatures.SERVING_SIGNATURE](tf.constant(images.reshape(count, 4, 4, 1)))
            classes, radii = out["class"].numpy(), out["radius"].numpy()
            margin = pixels - threshold
            certified = classes != stats.ABSTAIN
            wrong = certified & ((classes != (margin > 0)) | (radii > np.abs(margin) + 1e-5))
            # Allowed: the 1 - 1e-6 quantile of Binomial(count, alpha); not vacuous: most clear images certified.
            self.assertLessEqual(int(wrong.sum()), scipy_stats.binom.isf(1e-6, count, alpha), msg=compute_dtype)
            self.assertGreater(certified[np.abs(margin) > 0.15].mean(), 0.9, msg=compute_dtype)

    def test_a_bfloat16_export_reloads_as_bfloat16(self):
        with tempfile.TemporaryDirectory() as root:
            path = os.path.join(root, "export")
            export_flat(self.model, path, compute_dtype="bfloat16", **self.kwargs)
            loaded = tf.saved_model.load(path)
            self.assertAllEqual(_signature_outputs(loaded, self.images)["class"], [0, 0])
            self.assertEqual(export.read_metadata(path)["compute_dtype"], "bfloat16")


class LinearClosedFormTest(tf.test.TestCase):
    """The export on a linear base model, whose smoothed classifier is known in closed form.

    Tests that only read an export of the same settings share it (issue 21):
    `_export` makes each one once per class, on first use.
    """

    SIGMA = 0.25
    # Fresh noise per request (as deployed); and a fixed seed, for answers that must not vary.
    FRESH = dict(n0=50, n=1000, alpha=0.01, batch_size=1000)
    SEEDED = dict(n0=50, n=1000, alpha=0.001, batch_size=1000, seed=3)
    # The partly non-finite model's export, shared by its soundness test and the comparison with the library
    # (which needs the fixed seed; the soundness test holds for any seed, as for fresh noise).
    PARTLY = dict(sigma=0.5, n0=100, n=500, alpha=0.1, batch_size=1000, stages=(100, 500), max_batch=300, seed=17)
    PIXEL, THRESHOLD = 0, 0.8  # partly_nonfinite_model's NaN event: x[PIXEL] > THRESHOLD, with w[PIXEL] = 0.

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls._exports = {}

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    def _model(self, name):
        """The base model `name` ("linear" or "partly_nonfinite"), w, b, and a fresh rng of the weights' seed."""
        w, b, rng = _linear_setup()
        if name == "linear":
            return linear_model(w, b), w, b, rng
        w[self.PIXEL, 0, 0] = 0.0
        return partly_nonfinite_model(w, b, self.PIXEL, self.THRESHOLD), w, b, rng

    def _export(self, name="linear", **kwargs):
        """The shared export of model `name` with `kwargs`; (loaded, w, b, a fresh rng of the weights' seed)."""
        model, w, b, rng = self._model(name)
        # The statistical tests send their hundreds of images in one request.
        kwargs.setdefault("max_batch", 1000)
        kwargs.setdefault("sigma", self.SIGMA)
        key = (name, tuple(sorted(kwargs.items())))
        if key not in self._exports:
            path = os.path.join(self._tmp.name, f"{name}{len(self._exports)}")
            export_flat(model, path, num_classes=2, **kwargs)
            self._exports[key] = tf.saved_model.load(path)
        return self._exports[key], w, b, rng

    def test_radius_exceeds_true_radius_no_more_often_than_alpha(self):
        alpha, count = 0.01, 300
        loaded, w, b, rng = self._export(**self.FRESH)
        # True P(class 0) spread over [0.02, 0.98] on both sides of the hyperplane.
        p_true = rng.uniform(0.02, 0.98, size=count)
        margins = self.SIGMA * scipy_stats.norm.ppf(p_true)
        out = _signature_outputs(loaded, images_at_margins(w, b, margins, rng))
        true_class = np.where(margins > 0, 0, 1)
        true_radius = np.abs(margins)
        certified = out["class"] != stats.ABSTAIN
        # A certificate fails when it names the wrong class or claims too large a radius;
        # CERTIFY guarantees P(failure) <= alpha per image.
        failures = certified & ((out["class"] != true_class) | (out["radius"] > true_radius + 1e-5))
        # Fail only if the count is implausible under Binomial(count, alpha): P(false alarm) < 1e-6.
        limit = scipy_stats.binom.isf(1e-6, count, alpha)
        self.assertLessEqual(failures.sum(), limit)
        # Not vacuous: most images with p far from 1/2 get a certificate.
        clear = np.abs(p_true - 0.5) > 0.15
        self.assertGreater(certified[clear].mean(), 0.9)

    def test_certify_radius_certified_beyond_true_radius_at_most_alpha(self):
        # The guarantee of certify_radius, per image: with probability
        # >= 1 - alpha the class is not wrong and the reported radius is at
        # most the true one, so in particular a radius above the true one is
        # not certified. The images' true p_A spread over [0.55, 0.95]; each
        # is asked at 0.9, 0.98, 1.02 or 1.1 times its true radius, just
        # inside and just outside. Images are independent, so failures are
        # Binomial(count, q) with q <= alpha: allowed up to the (1 - 1e-6)
        # quantile of Binomial(count, alpha), a false alarm probability
        # < 1e-6. alpha = 0.05 makes failures countable: a bound at level
        # alpha instead of alpha / K per stage, or one that took the upper
        # bound, would fail far more often.
        alpha, count, stages = 0.05, 400, (100, 1000, 10000)
        w, b, rng = _linear_setup()
        model = linear_model(w, b)
        with tempfile.TemporaryDirectory() as root:
            path = os.path.join(root, "linear")
            export_flat(model, path, sigma=self.SIGMA, num_classes=2, n0=100, n=10000, alpha=alpha,
                        batch_size=10000, stages=stages, max_batch=count)
            p_true = rng.uniform(0.55, 0.95, count)
            margins = self.SIGMA * scipy_stats.norm.ppf(p_true) * np.where(np.arange(count) % 2 == 0, 1, -1)
            images = images_at_margins(w, b, margins, rng)
            factor = np.tile([0.9, 0.98, 1.02, 1.1], count // 4)
            true_radius = np.abs(margins)
            asked = (factor * true_radius).astype(np.float32)
            out = _signature_outputs(tf.saved_model.load(path), images, signatures.CERTIFY_RADIUS_SIGNATURE, asked)
        true_class = np.where(margins > 0, 0, 1)
        wrong_class = (out["class"] != stats.ABSTAIN) & (out["class"] != true_class)
        too_far = out["radius"] > true_radius + 1e-5
        failures = wrong_class | too_far
        limit = scipy_stats.binom.isf(1e-6, count, alpha)
        self.assertLessEqual(int(failures.sum()), limit)
        self.assertLessEqual(int((out["certified"] & (asked > true_radius)).sum()), limit)
        # Not vacuous: at p_A >= 0.7 the bound at n = 10^4 (level alpha / 3,
        # z = 2.13, SE <= 0.0046) lies below p_A by <= 0.0098, while Phi of 0.9
        # times the true z lies >= 0.0185 below p_A: about 97% certified.
        inside = (factor == 0.9) & (p_true >= 0.7)
        self.assertGreater(out["certified"][inside].mean(), 0.8)
        # Far from the thresholds, images stop early.
        self.assertLess(out["samples"].mean(), 10000)
        self.assertTrue(np.all(np.isin(out["samples"], stages)))

    def test_signatures_equal_the_library_with_a_fixed_seed(self):
        # A fixed seed keys each image's noise as Smooth does with
        # image_ids = positions, so the export and the library draw the same
        # samples and give the same answers, also for a model whose logits
        # are NaN on part of the inputs (x[0] > 0.8, with w[0] = 0).
        linear = dict(sigma=self.SIGMA, n0=50, n=2000, alpha=0.01, batch_size=512, stages=(100, 500, 2000), seed=17)
        for name, settings in (("linear", linear), ("partly_nonfinite", self.PARTLY)):
            with self.subTest(model=name), tempfile.TemporaryDirectory() as root:
                model, w, b, rng = self._model("partly_nonfinite")
                if name == "linear":  # The same w (w[0] = 0), its own export.
                    model = linear_model(w, b)
                    export_flat(model, os.path.join(root, name), num_classes=2, **settings)
                    loaded = tf.saved_model.load(os.path.join(root, name))
                else:
                    loaded = self._export(name, **settings)[0]
                kwargs = {k: settings[k] for k in ("n0", "n", "alpha", "batch_size", "stages")}
                images = images_at_margins(w, b, self.SIGMA * scipy_stats.norm.ppf(rng.uniform(0.05, 0.95, 24)), rng)
                radius = rng.choice(np.array([0.02, 0.1, 0.3], np.float32), 24)
                smooth = smoothing.Smooth(model, 2, settings["sigma"], noise="float")
                ids = np.arange(len(images))
                staged = library_staged_certify(smooth, images, radius, seed=17, **kwargs)
                out = _signature_outputs(loaded, images, signatures.CERTIFY_RADIUS_SIGNATURE, radius)
                for key in ("class", "certified", "samples"):
                    np.testing.assert_array_equal(out[key], staged[key], err_msg=key)
                np.testing.assert_allclose(out["radius"], staged["radius"], rtol=1e-6)
                self.assertGreater(len(set(out["samples"].tolist())), 1)
                classes, radii = smooth.certify_batch(images, kwargs["n0"], kwargs["n"], kwargs["alpha"],
                                                      kwargs["batch_size"], seed=17, image_ids=ids)
                out = _signature_outputs(loaded, images)
                np.testing.assert_array_equal(out["class"], classes)
                np.testing.assert_allclose(out["radius"], radii, rtol=1e-6)
                predicted = smooth.predict_staged_batch(images, kwargs["n"], kwargs["alpha"], kwargs["batch_size"],
                                                        stages=kwargs["stages"], seed=17, image_ids=ids)
                out = _signature_outputs(loaded, images, signatures.PREDICT_SIGNATURE)
                np.testing.assert_array_equal(out["class"], predicted.classes)
                np.testing.assert_array_equal(out["samples"], predicted.samples)

    def test_nan_model_gives_no_certificate(self):
        # argmax over NaN logits is 0: counted as votes, every sample would certify class 0.
        w, b, rng = _linear_setup()
        with tempfile.TemporaryDirectory() as root:
            path = os.path.join(root, "nan")
            export_flat(with_nan_weights(linear_model(w, b)), path, sigma=self.SIGMA, num_classes=2,
                        n0=50, n=1000, alpha=0.001, batch_size=1000)
            loaded = tf.saved_model.load(path)
            images = images_at_margins(w, b, np.array([0.2, -0.2, 0.0]), rng)
            certificate = _signature_outputs(loaded, images)
            at_radius = _signature_outputs(loaded, images, signatures.CERTIFY_RADIUS_SIGNATURE,
                                           np.full(3, 0.01, np.float32))
            predicted = _signature_outputs(loaded, images, signatures.PREDICT_SIGNATURE)
        np.testing.assert_array_equal(certificate["class"], [-1] * 3)
        np.testing.assert_array_equal(certificate["radius"], [0.0] * 3)
        np.testing.assert_array_equal(certificate["p_lower"], [0.0] * 3)
        np.testing.assert_array_equal(at_radius["class"], [-1] * 3)
        np.testing.assert_array_equal(at_radius["certified"], [False] * 3)
        np.testing.assert_array_equal(at_radius["radius"], [0.0] * 3)
        np.testing.assert_array_equal(predicted["class"], [-1] * 3)
        np.testing.assert_array_equal(predicted["samples"], [1000] * 3)  # Abstains only at n_max.

    def test_partly_nonfinite_certificates_stay_sound(self):
        # As smoothing_test's test of the same name, through the export: the
        # bound must stay below the true P(f = returned class), where a NaN
        # sample is no class (x[0] > 0.8 gives NaN logits; w[0] = 0).
        # Failures Binomial(count, <= alpha); allowed the (1 - 1e-6) quantile.
        # Counting NaN samples as class 0 (argmax's answer; the model's
        # logits are [0, w.x + b]) would add 1 - q in [0.16, 0.42] to P(f = 0).
        alpha, count, pixel, threshold, sigma = (self.PARTLY["alpha"], self.PARTLY["max_batch"], self.PIXEL,
                                                 self.THRESHOLD, self.PARTLY["sigma"])
        loaded, w, b, rng = self._export("partly_nonfinite", **self.PARTLY)
        images = images_at_margins(w, b, rng.uniform(-0.5, 0.5, count), rng).reshape(count, -1)
        images[:, pixel] = rng.uniform(0.3, 0.7, count)
        images = images.reshape(count, *w.shape)
        truth = partly_nonfinite_probabilities(images, w, b, pixel, threshold, sigma)
        certificate = _signature_outputs(loaded, images)
        at_radius = _signature_outputs(loaded, images, signatures.CERTIFY_RADIUS_SIGNATURE,
                                       np.full(count, 0.05, np.float32))
        limit = scipy_stats.binom.isf(1e-6, count, alpha)
        for name, out in (("serving_default", certificate), ("certify_radius", at_radius)):
            certified = out["class"] >= 0
            p_true = truth[np.arange(count), np.maximum(out["class"], 0)]
            failures = certified & (out["radius"] > sigma * scipy_stats.norm.ppf(p_true) + 1e-5)
            self.assertLessEqual(int(failures.sum()), limit, msg=name)
            self.assertGreater(int((out["class"] == 0).sum()), count // 10, msg=name)  # Not vacuous.

    def test_radius_within_a_few_percent_at_n_100000(self):
        alpha, n = 0.001, 100000
        p_true = np.array([0.73, 0.84, 0.92])
        loaded, w, b, rng = self._export(n0=100, n=n, alpha=alpha, batch_size=10000)
        margins = self.SIGMA * scipy_stats.norm.ppf(p_true)
        out = _signature_outputs(loaded, images_at_margins(w, b, margins, rng))
        np.testing.assert_array_equal(out["class"], 0)
        # p_lower, the one-sided Clopper-Pearson bound at alpha, is p_hat less
        # about z_alpha binomial SEs, and p_hat lies within 6 SE of p except
        # with probability 2e-9 per image: so p_lower is in
        # [p - (z_alpha + 6) SE, p + 6 SE]. (A fixed 4% band on the radius
        # instead failed about once in 300 runs: 2.7 SE of p_hat below its mean
        # at p = 0.73, where one SE moves the radius by 0.7%.)
        se = np.sqrt(p_true * (1 - p_true) / n)
        z_alpha = scipy_stats.norm.isf(alpha)
        lower, upper = p_true - (z_alpha + 6) * se, p_true + 6 * se
        self.assertTrue(np.all((out["p_lower"] >= lower) & (out["p_lower"] <= upper)),
                        f"p_lower {out['p_lower']} outside [{lower}, {upper}]")
        # The radius is sigma Phi^-1(p_lower): float32 rounding of p_lower and
        # of the radius moves it by < 1e-6 relative here (Phi^-1's condition
        # number p / (phi(z) z) is below 4 for these p).
        np.testing.assert_allclose(out["radius"], self.SIGMA * scipy_stats.norm.ppf(out["p_lower"].astype(np.float64)),
                                   rtol=1e-5)
        # Together: the radius is at most 6.3% below the true one at p = 0.73 (3.6% at 0.92).

    def test_predict_signature_abstains_at_the_boundary(self):
        # A fixed seed keeps this deterministic; p = 0.5 would otherwise fail with probability <= alpha.
        loaded, w, b, rng = self._export(**self.SEEDED)
        # p = 0.95, 0.05: clear; p = 0.5: H0 holds, so abstain except with probability <= alpha.
        margins = self.SIGMA * scipy_stats.norm.ppf([0.95, 0.05, 0.5, 0.5])
        out = _signature_outputs(loaded, images_at_margins(w, b, margins, rng), signatures.PREDICT_SIGNATURE)
        np.testing.assert_array_equal(out["class"], [0, 1, -1, -1])

    def test_fresh_noise_per_request_without_seed(self):
        loaded, w, b, rng = self._export(**self.FRESH)
        images = images_at_margins(w, b, np.zeros(8), rng)  # p = 1/2: counts vary most
        first = _signature_outputs(loaded, images)["p_lower"]
        second = _signature_outputs(loaded, images)["p_lower"]
        # Two independent Binomial(1000, 1/2) counts are equal with probability 0.018 (< 1 / sqrt(pi 500));
        # for all 8 images by chance, < 0.02^8.
        self.assertFalse(np.array_equal(first, second))

    def test_fixed_seed_repeats(self):
        loaded, w, b, rng = self._export(**self.SEEDED)
        images = images_at_margins(w, b, np.zeros(8), rng)
        first, second = _signature_outputs(loaded, images), _signature_outputs(loaded, images)
        for key in first:
            np.testing.assert_array_equal(first[key], second[key])


class GridExportTest(tf.test.TestCase):
    """One grid-noise export of the grid model (GRID_W, GRID_T), shared by every test that reads it.

    Under grid noise the smoothed classifier is Gaussian smoothing of the base
    classifier composed with rounding to the grid, whose class probabilities
    `grid_class0_probability` computes exactly (mpmath and a convolution,
    nothing of the code under test). The seed is fixed so that the library
    comparison can draw the same noise; the images sit at distinct positions
    of a request, so their noise is independent all the same.
    """

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.export_dir = os.path.join(cls._tmp.name, "grid")
        cls.model = linear_model(GRID_W, GRID_B)
        cls.kwargs = dict(n0=50, n=1000, alpha=0.01, batch_size=1000, stages=(100, 1000))
        # max_batch 1000: the closed-form tests send their hundreds of images in one request.
        export_flat(cls.model, cls.export_dir, sigma=GRID_SIGMA, num_classes=2, seed=29, noise="grid", max_batch=1000,
                    **cls.kwargs)
        cls.loaded = tf.saved_model.load(cls.export_dir)
        cls.pixels = grid_images(300, np.random.default_rng(5))
        cls.images = on_grid(cls.pixels)
        cls.p_class0 = grid_class0_probability(cls.pixels)

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    def test_metadata_records_the_noise_mode_the_contract_and_the_slack(self):
        meta = {k: v.numpy() for k, v in self.loaded.signatures[signatures.METADATA_SIGNATURE]().items()}
        on_disk = export.read_metadata(self.export_dir)
        self.assertEqual(meta["noise"].decode(), "grid")
        self.assertEqual(on_disk["noise"], "grid")
        self.assertEqual(meta["input_contract"].decode(), signatures.INPUT_CONTRACTS["grid"])
        self.assertEqual(on_disk["input_contract"], signatures.INPUT_CONTRACTS["grid"])
        # The budget per pixel: a tail below 1e-12 and bins * 2^-64 (plus Phi's 1e-45) of rounding;
        # 4 pixels. Doubling the rounding term covers the rounding up of the float sums.
        table = noise_lib.grid_noise_table(GRID_SIGMA)
        slack = float(meta["tv_slack"])
        self.assertEqual(on_disk["tv_slack"], slack)
        self.assertGreater(slack, 0.0)
        self.assertLessEqual(slack, 4 * (1e-12 + 2 * table.num_bins * 2.0 ** -64))
        # certify_radius's levels are the float export's; predict's pay n samples' slack (alpha - n slack).
        np.testing.assert_array_equal(meta["levels"], [0.005, 0.005])
        levels = np.array(on_disk["predict_levels"])
        np.testing.assert_array_equal(meta["predict_levels"], levels)
        self.assertLessEqual(levels.sum(), 0.01 - 1000 * slack)
        self.assertGreater(levels.sum(), 0.01 - 1000 * slack - 1e-17)  # alpha's float spacing is 1.7e-18.
        self.assertEqual(levels[0], levels[1])

    def test_signatures_equal_the_library_with_a_fixed_seed(self):
        # Smooth in grid mode keys its noise as the export does: the same samples, the same answers.
        smooth = smoothing.Smooth(self.model, 2, GRID_SIGMA, noise="grid")
        images, ids = self.images[:12], np.arange(12)
        radius = np.random.default_rng(2).choice(np.array([0.001, 0.005, 0.02], np.float32), 12)
        staged = library_staged_certify(smooth, images, radius, seed=29, **self.kwargs)
        out = _signature_outputs(self.loaded, images, signatures.CERTIFY_RADIUS_SIGNATURE, radius)
        for key in ("class", "certified", "samples"):
            np.testing.assert_array_equal(out[key], staged[key], err_msg=key)
        np.testing.assert_allclose(out["radius"], staged["radius"], rtol=1e-6)
        classes, radii = smooth.certify_batch(images, self.kwargs["n0"], self.kwargs["n"], self.kwargs["alpha"],
                                              self.kwargs["batch_size"], seed=29, image_ids=ids)
        out = _signature_outputs(self.loaded, images)
        np.testing.assert_array_equal(out["class"], classes)
        np.testing.assert_allclose(out["radius"], radii, rtol=1e-6)
        predicted = smooth.predict_staged_batch(images, self.kwargs["n"], self.kwargs["alpha"],
                                                self.kwargs["batch_size"], stages=self.kwargs["stages"], seed=29,
                                                image_ids=ids)
        out = _signature_outputs(self.loaded, images, signatures.PREDICT_SIGNATURE)
        np.testing.assert_array_equal(out["class"], predicted.classes)
        np.testing.assert_array_equal(out["samples"], predicted.samples)
        self.assertGreater(len(set(out["samples"].tolist())), 1)

    def test_closed_form_soundness(self):
        check_grid_soundness(self, _signature_outputs(self.loaded, self.images), self.p_class0, alpha=0.01)

    def test_certify_radius_and_predict_are_sound_in_closed_form(self):
        # As LinearClosedFormTest's certify_radius test, against the exact grid probabilities: asked half or
        # 1.1 times the true radius, an image may be certified beyond it with probability <= alpha only.
        p_top = np.maximum(self.p_class0, 1 - self.p_class0)
        true_radius = GRID_SIGMA * scipy_stats.norm.ppf(p_top)
        asked = (np.tile([0.5, 1.1], len(p_top) // 2) * true_radius).astype(np.float32)
        out = _signature_outputs(self.loaded, self.images, signatures.CERTIFY_RADIUS_SIGNATURE, asked)
        true_class = np.where(self.p_class0 > 0.5, 0, 1)
        limit = scipy_stats.binom.isf(1e-6, len(p_top), 0.01)
        wrong_class = (out["class"] != stats.ABSTAIN) & (out["class"] != true_class)
        # The bound: float64 scipy at p <= 0.9998 is exact to 1e-15; 1e-12 covers it.
        self.assertLessEqual(int((wrong_class | (out["radius"] > true_radius + 1e-12)).sum()), limit)
        self.assertLessEqual(int((out["certified"] & (asked > true_radius)).sum()), limit)
        # Not vacuous: at p_A > 0.9 the bound after 1000 samples (level alpha / 2, z = 2.58, SE < 0.0095) lies
        # within 0.025 of p_A, far above Phi(z_A / 2) <= 0.74 (z_A > 1.28), so nearly all are certified.
        self.assertGreater(out["certified"][(asked < true_radius) & (p_top > 0.9)].mean(), 0.8)
        predicted = _signature_outputs(self.loaded, self.images, signatures.PREDICT_SIGNATURE)["class"]
        self.assertLessEqual(int(((predicted != stats.ABSTAIN) & (predicted != true_class)).sum()), limit)
        self.assertGreater((predicted == true_class)[p_top > 0.65].mean(), 0.9)

    def test_every_grid_value_is_taken_and_anything_else_is_refused_naming_the_first_bad_pixel(self):
        every_level = on_grid(np.arange(256).reshape(64, 2, 2, 1))
        self.assertEqual(_signature_outputs(self.loaded, every_level)["class"].shape, (64,))
        one_ulp = every_level[:2].copy()
        one_ulp[1, 0, 1, 0] = np.nextafter(one_ulp[1, 0, 1, 0], np.float32(1))
        off = every_level[:2].copy()
        off[1, 1, 0, 0] = 0.3
        outside = every_level[:2].copy()
        outside[0, 1, 1, 0] = 1.5
        cases = {
            "one_ulp": (one_ulp, r"not on the 8-bit grid .*first bad pixel \(index, value\):\] \[\[1 0 1 0\]\]"),
            "off": (off, r"not on the 8-bit grid .*\[\[1 1 0 0\]\] \[0.3\]"),
            "outside": (outside, r"images must be in \[0, 1\].*first pixel outside \(index, value\):\] "
                                 r"\[\[0 1 1 0\]\] \[1.5\]"),
        }
        for signature in (signatures.SERVING_SIGNATURE, signatures.CERTIFY_RADIUS_SIGNATURE,
                          signatures.PREDICT_SIGNATURE):
            for name, (images, message) in cases.items():
                with self.subTest(signature=signature, case=name):
                    radius = np.full(2, 0.01, np.float32) if signature == signatures.CERTIFY_RADIUS_SIGNATURE else None
                    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
                        _signature_outputs(self.loaded, images, signature, radius)

    def test_load_runs_refuse_an_off_grid_pool_before_sending(self):
        # Every request would fail: refused in one line before the load starts (the C++ path before the
        # program runs, so a missing binary is never reached).
        pool = on_grid(self.pixels[:4])
        pool[2, 1, 0, 0] = 0.5
        message = r"^images: the pool breaks the export's input contract: images\[2, 1, 0, 0\] = 0.5 is not on"
        with self.assertRaisesRegex(ConfigError, message):
            serving_load.run_python_load(self.export_dir, pool, serving_load.LoadConfig())
        with self.assertRaisesRegex(ConfigError, message):
            serving_load.run_cpp_load("/nonexistent/serving_check", self.export_dir, pool, serving_load.LoadConfig())

    def test_warmup_requests_are_on_the_grid_and_run(self):
        from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=import-outside-toplevel

        path = os.path.join(self.export_dir, export.ASSETS_EXTRA, export.WARMUP_FILE)
        for record in tf.data.TFRecordDataset(path):
            request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
            inputs = {key: tf.constant(tf.make_ndarray(value)) for key, value in request.inputs.items()}
            np.testing.assert_array_equal(inputs["images"].numpy(), np.float32(128) / np.float32(255))
            out = self.loaded.signatures[request.model_spec.signature_name](**inputs)
            self.assertEqual(out["class"].shape, (1,))


def check_grid_soundness(test: tf.test.TestCase, out: dict, p_class0: np.ndarray, alpha: float) -> None:
    """serving_default's answers `out` against the exact grid probabilities `p_class0`, per image.

    CERTIFY's guarantee: with probability >= 1 - alpha an image's answer is
    right: no wrong class, p_lower at most the exact probability of its class
    and the radius at most sigma Phi^-1 of it. Failures are Binomial(count,
    <= alpha), allowed up to the (1 - 1e-6) quantile of Binomial(count, alpha).
    Tolerances: the exact probability is known to 3e-11 (`grid_class0_probability`);
    sigma Phi^-1 by scipy to 1e-15 relative, so 1e-12 on the radius.
    """
    certified = out["class"] != stats.ABSTAIN
    p_class = np.where(out["class"] == 1, 1 - p_class0, p_class0)
    true_class = np.where(p_class0 > 0.5, 0, 1)
    exact_radius = GRID_SIGMA * scipy_stats.norm.ppf(np.minimum(p_class + 3e-11, 1.0))
    failures = certified & ((out["class"] != true_class) | (out["p_lower"] > p_class + 3e-11)
                            | (out["radius"] > exact_radius + 1e-12))
    test.assertLessEqual(int(failures.sum()), scipy_stats.binom.isf(1e-6, len(p_class0), alpha))
    clear = np.abs(p_class0 - 0.5) > 0.15
    test.assertGreater(certified[clear].mean(), 0.9)  # Not vacuous.


if __name__ == "__main__":
    tf.test.main()
