"""The project's Keras callbacks: CertifyCallback against an independent run of Smooth.certify_batch,
StopOnDivergence against a run whose loss becomes NaN."""

import contextlib
import glob
import os
import shutil
import tempfile
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import mounts  # tests/mounts.py
import threshold_models  # tests/threshold_models.py
from tf_consreg import analysis
from tf_consreg import callbacks
from tf_consreg import consistency_model
from tf_consreg import models
from tf_consreg import run_config
from tf_consreg import smoothing
from tf_consreg.certify_spec import CertifySpec
from tf_consreg.errors import ConfigError

SIGMA = 0.25
SIDE = 4
# CERTIFY's sampling settings, and float noise: the images are not all on the 8-bit grid (training's live
# certification is float too).
SAMPLING = dict(n0=32, n=100, alpha=0.001, batch_size=256)
CERTIFY = dict(SAMPLING, noise="float")


def _brightness_model(scale: float = 4.0) -> keras.Model:
    """Two classes by mean brightness: logits (s * (sum(x) - 8), -s * (sum(x) - 8)) on 4x4 images.

    Under noise sum(x + d) - 8 ~ N(16 b - 8, (4 sigma)^2) for a flat image of
    brightness b, so images far from b = 0.5 are certified with large radii,
    images near it abstain: the certificates cover every case.
    """
    inputs = keras.Input((SIDE, SIDE, 1))
    flat = keras.layers.Flatten()(inputs)
    dense = keras.layers.Dense(2)
    outputs = dense(flat)
    model = keras.Model(inputs, outputs)
    pixels = SIDE * SIDE
    dense.set_weights([np.stack([np.full(pixels, scale), np.full(pixels, -scale)], axis=1).astype(np.float32),
                       np.array([-scale * pixels / 2, scale * pixels / 2], np.float32)])
    return model


def _validation_set():
    brightness = np.array([0.05, 0.15, 0.3, 0.42, 0.48, 0.5, 0.52, 0.58, 0.7, 0.85, 0.95, 0.99], np.float32)
    images = np.broadcast_to(brightness[:, None, None, None], (12, SIDE, SIDE, 1)).copy()
    labels = (brightness < 0.5).astype(np.int64)  # class 0 = bright
    labels[[0, 11]] = 1 - labels[[0, 11]]  # two confidently wrong images
    return images, labels


def _scalars(log_dir):
    values = {}
    for path in glob.glob(os.path.join(log_dir, "validation", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    values.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
                else:
                    values.setdefault(value.tag, {})[event.step] = value.metadata.plugin_data.plugin_name
    return values


class CertifyCallbackTest(tf.test.TestCase, parameterized.TestCase):

    def test_reports_what_certify_batch_and_analysis_give(self):
        images, labels = _validation_set()
        base = _brightness_model()
        log_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, log_dir)
        seed = 7

        # Reference, computed here: the library's CERTIFY on the same images and seed.
        classes, radii = smoothing.Smooth(base, 2, SIGMA, noise="float").certify_batch(images, seed=seed, **SAMPLING)
        correct = classes == labels
        expected_acr = float(np.mean(radii * correct))
        self.assertGreater(expected_acr, 0.1)
        self.assertTrue(np.any(classes == smoothing.Smooth.ABSTAIN))  # every case occurs
        self.assertTrue(np.any((classes != labels) & (classes != smoothing.Smooth.ABSTAIN)))
        summary = analysis.summarize(
            analysis.CertifyLog("ref", np.arange(12), labels, classes, radii, correct), callbacks.DEFAULT_RADII)

        # Training with lr = 0 keeps the weights: every certification sees the reference model.
        model = consistency_model.ConsistencyModel(
            base, run_config.ObjectiveConfig(method="consistency", sigma=SIGMA, num_noise=2, lbd=1.0, eta=0.5))
        model.compile(optimizer=keras.optimizers.SGD(0.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        certify = callbacks.CertifyCallback(images, labels, num_classes=2, every=2, log_dir=log_dir,
                                            seed=seed, verbose=False, spec=CertifySpec(sigma=SIGMA, **CERTIFY))
        history = model.fit(images, labels, batch_size=6, epochs=3, callbacks=[certify], verbose=0)

        # Certified after epoch 2 (every=2) and after the last one (3).
        self.assertEqual(certify.last_result.epoch, 3)
        self.assertAllClose(history.history["val_acr"], [expected_acr] * 2, rtol=0, atol=1e-12)
        self.assertAllClose(history.history["val_acr"], [summary.acr] * 2, rtol=0, atol=1e-12)
        self.assertAllClose(history.history["val_smoothed_accuracy"], [np.mean(correct)] * 2, atol=1e-12)
        self.assertAllClose(history.history["val_abstain_rate"], [np.mean(classes == -1)] * 2, atol=1e-12)
        for r in callbacks.DEFAULT_RADII:
            expected = np.mean(correct & (radii >= r))
            self.assertAllClose(history.history[f"val_certified_accuracy_{callbacks.radius_name(r)}"],
                                [expected] * 2, atol=1e-12)

        scalars = _scalars(log_dir)
        self.assertEqual(set(scalars["val/acr"]), {2, 3})
        self.assertAllClose(scalars["val/acr"][3], expected_acr, atol=1e-6)
        self.assertAllClose(scalars["val/certified_accuracy_r0.5"][2], np.mean(correct & (radii >= 0.5)),
                            atol=1e-6)
        self.assertIn("val/abstain_rate", scalars)
        self.assertIn("val/certify_seconds", scalars)
        self.assertEqual(scalars["val/certified_accuracy_curve"], {2: "images", 3: "images"})

    def test_later_callbacks_see_val_acr(self):
        images, labels = _validation_set()
        model = consistency_model.ConsistencyModel(
            _brightness_model(), run_config.ObjectiveConfig(method="gaussian", sigma=SIGMA, num_noise=1))
        model.compile(optimizer=keras.optimizers.SGD(0.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        seen = []
        recorder = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(logs.get("val_acr")))
        certify = callbacks.CertifyCallback(images, labels, num_classes=2, seed=1, verbose=False,
                                            spec=CertifySpec(sigma=SIGMA, **CERTIFY))
        model.fit(images, labels, batch_size=12, epochs=2, callbacks=[certify, recorder], verbose=0)
        self.assertLen(seen, 2)
        self.assertTrue(all(v is not None and v > 0 for v in seen))
        self.assertEqual(seen[0], seen[1])  # same weights, same noise

    def test_evaluate_takes_uint8_images_and_a_plain_model(self):
        images, labels = _validation_set()
        base = _brightness_model()
        as_uint8 = np.round(images * 255).astype(np.uint8)
        certify = callbacks.CertifyCallback(as_uint8, labels, num_classes=2, seed=3, verbose=False,
                                            spec=CertifySpec(sigma=SIGMA, **CERTIFY))
        result = certify.evaluate(base)
        classes, radii = smoothing.Smooth(base, 2, SIGMA, noise="float").certify_batch(
            as_uint8 / np.float32(255), seed=3, **SAMPLING)
        self.assertAllClose(result.summary.acr, np.mean(radii * (classes == labels)), atol=1e-12)
        self.assertEqual(result.epoch, 0)

    def test_a_model_training_in_bfloat16_is_certified_as_its_float32_network(self):
        # The threshold model f(x) = [x_5 > 1/2] computes [x_5 > 1/2 + 2^-9]
        # in bfloat16 (tests/threshold_models.py). Images with x_5 = 0.501
        # are class 1 for the float32 network and class 0 for the bfloat16
        # one; sigma = 1e-4 keeps every sample 9 sigma from both thresholds,
        # so each network's class is certain.
        pixels = np.array([0.501] * 6 + [0.3] * 6, np.float32)
        images = np.full((12, SIDE * SIDE), 0.9, np.float32)
        images[:, 5] = pixels
        images = images.reshape(12, SIDE, SIDE, 1)
        labels = (pixels > 0.5).astype(np.int64)
        base = threshold_models.in_dtype(threshold_models.threshold_model((SIDE, SIDE, 1), 5, 0.5), "bfloat16")
        self.assertEqual(models.model_compute_dtype(base), "bfloat16")
        model = consistency_model.ConsistencyModel(base, run_config.ObjectiveConfig(method="gaussian", sigma=1e-4,
                                                                                    num_noise=1))
        model.compile(optimizer=keras.optimizers.SGD(0.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        certify = callbacks.CertifyCallback(images, labels, num_classes=2, seed=1, verbose=False,
                                            spec=CertifySpec(sigma=1e-4, **CERTIFY))
        history = model.fit(images, labels, batch_size=12, epochs=1, callbacks=[certify], verbose=0)
        self.assertEqual(history.history["val_smoothed_accuracy"], [1.0])  # The float32 network, by default.
        self.assertIsNot(certify.certified_model(base), base)
        in_bfloat16 = callbacks.CertifyCallback(images, labels, num_classes=2, seed=1, verbose=False,
                                                spec=CertifySpec(sigma=1e-4, compute_dtype="bfloat16", **CERTIFY))
        self.assertIs(in_bfloat16.certified_model(base), base)
        self.assertEqual(in_bfloat16.evaluate(base).summary.clean_accuracy, 0.5)  # The 0.501 images are class 0.

        # Training moves the threshold to 0.6: the float32 twin certifies the current weights.
        head = base.get_layer("logits")
        head.set_weights([head.get_weights()[0], np.array([0.0, -0.6], np.float32)])
        result = certify.evaluate(base)
        self.assertAllEqual(result.log.predict, [0] * 12)
        self.assertEqual(result.summary.clean_accuracy, 0.5)

    def test_a_float32_model_is_certified_as_it_is(self):
        images, labels = _validation_set()
        base = _brightness_model()
        certify = callbacks.CertifyCallback(images, labels, num_classes=2, verbose=False,
                                            spec=CertifySpec(sigma=SIGMA, **CERTIFY))
        self.assertIs(certify.certified_model(base), base)

    @parameterized.named_parameters(
        # The sampling settings' own checks (n, alpha, sigma, compute_dtype): certify_spec_test.
        ("every", dict(every=0), "every"),
        ("radii", dict(radii=()), "radii"),
        ("negative_radius", dict(radii=(0.5, -1.0)), "radii must be finite and >= 0"),
        ("ids", dict(image_ids=[1, 2]), "image_ids"),
        ("no_sigma", dict(spec=CertifySpec(**CERTIFY)), "spec must be a CertifySpec with sigma"),
        ("staged", dict(spec=CertifySpec(sigma=SIGMA, n0=32, n=100, stages=(50, 100))), "no stages"),
        # Grid noise takes 8-bit images only, refused at construction rather than at the first epoch's end.
        ("off_grid", dict(spec=CertifySpec(sigma=SIGMA, **{**CERTIFY, "noise": "grid"})),
         r"images\[0, 0, 0, 0\] = 0.05000000074505806 is not on the 8-bit grid"),
    )
    def test_bad_arguments(self, override, message):
        images, labels = _validation_set()
        kwargs = dict(spec=CertifySpec(sigma=SIGMA, **CERTIFY), num_classes=2)
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, message):
            callbacks.CertifyCallback(images, labels, **kwargs)

    def test_grid_noise_on_8_bit_images(self):
        # The same brightness images quantized to the grid (uint8 in, as a pipeline gives them): grid noise
        # certifies the images far from the threshold (0.05 -> 13/255 and 0.99 -> 252/255 are confidently wrong).
        images, labels = _validation_set()
        pixels = np.round(images * 255).astype(np.uint8)
        certify = callbacks.CertifyCallback(pixels, labels, num_classes=2, verbose=False,
                                            spec=CertifySpec(sigma=SIGMA, **{**CERTIFY, "noise": "grid"}))
        result = certify.evaluate(_brightness_model())
        self.assertEqual(certify._smooth.noise, "grid")  # pylint: disable=protected-access
        self.assertGreater(result.summary.acr, 0.0)

    def test_is_certify_metric(self):
        images, labels = _validation_set()
        certify = callbacks.CertifyCallback(images, labels, num_classes=2, verbose=False,
                                            spec=CertifySpec(sigma=SIGMA, **CERTIFY))
        names = certify.evaluate(_brightness_model()).metrics()
        self.assertLen(names, 3 + len(callbacks.DEFAULT_RADII))
        self.assertTrue(all(callbacks.is_certify_metric(name) for name in names))
        self.assertFalse(any(callbacks.is_certify_metric(n) for n in ("val_accuracy", "val_clean_accuracy", "acr")))

    def test_radius_name(self):
        self.assertEqual([callbacks.radius_name(r) for r in (0.0, 0.25, 0.5, 1.0, 2.5)],
                         ["r0", "r0.25", "r0.5", "r1", "r2.5"])


if __name__ == "__main__":
    tf.test.main()

class EpochCheckpointTest(parameterized.TestCase, tf.test.TestCase):
    """A checkpoint that cannot be written: one OSError naming it, its partial files removed, the last kept (#22, 2)."""

    # A Dense kernel of 7500 x 4 float32: 120,000 bytes per checkpoint, so a 200 KiB tmpfs holds the first and
    # not the second (each checkpoint's data file alone is 120,000 bytes; tmpfs counts whole 4 KiB pages).
    _FEATURES = 7500

    def _fit_two_epochs(self, directory):
        inputs = keras.Input((self._FEATURES,))
        model = keras.Model(inputs, keras.layers.Dense(4, use_bias=False)(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(True))
        epoch = tf.Variable(0, dtype=tf.int64)
        checkpoint = tf.train.Checkpoint(model=model, epoch=epoch)
        manager = tf.train.CheckpointManager(checkpoint, directory, 3)
        ds = tf.data.Dataset.from_tensor_slices((np.ones((2, self._FEATURES), np.float32), np.array([0, 1])))
        model.fit(ds.batch(2).repeat(), epochs=2, steps_per_epoch=1, verbose=0, shuffle=False,
                  callbacks=[callbacks.EpochCheckpoint(manager, epoch)])

    @contextlib.contextmanager
    def _second_save_fails(self):
        """A temporary directory, and the error TensorFlow raises on ENOSPC from the second save, by mock."""
        real_save = tf.train.CheckpointManager.save
        calls = []

        def save(manager, **kwargs):
            calls.append(kwargs)
            if len(calls) == 2:
                open(os.path.join(manager.directory, "ckpt-2_temp"), "w").close()  # What a failed save leaves.
                raise tf.errors.ResourceExhaustedError(
                    None, None, "/x/ckpt-2_temp/part-00000; No space left on device [Op:SaveV2]")
            return real_save(manager, **kwargs)

        with tempfile.TemporaryDirectory() as directory, \
                mock.patch.object(tf.train.CheckpointManager, "save", autospec=True, side_effect=save):
            yield directory

    @parameterized.parameters("mount", "mock")
    def test_a_full_disk_keeps_the_last_complete_checkpoint(self, how):
        with (mounts.tmpfs("size=200k") if how == "mount" else self._second_save_fails()) as directory:
            if directory is None:
                self.skipTest("mounting a tmpfs needs root here; the mock case covers the code")
            with self.assertRaises(OSError) as raised:
                self._fit_two_epochs(directory)
            self.assertEqual(raised.exception.filename, os.path.join(directory, "ckpt-2"))
            self.assertIn("No space left on device", raised.exception.strerror)
            # ckpt-2's partial files are gone; the index still names ckpt-1, which a resumed run restores.
            self.assertEqual(sorted(os.listdir(directory)), ["checkpoint", "ckpt-1.data-00000-of-00001",
                                                             "ckpt-1.index"])
            self.assertEqual(tf.train.latest_checkpoint(directory), os.path.join(directory, "ckpt-1"))
            self.assertEqual(tf.train.load_checkpoint(directory).get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"), 1)


class StopOnDivergenceTest(tf.test.TestCase):

    def _new_dir(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return directory

    def _fit(self, images, labels, epochs, manager_dir, lr=0.01):
        """Fits a linear model on batches of 4 with StopOnDivergence before EpochCheckpoint."""
        inputs = keras.Input((SIDE, SIDE, 1))
        model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
        model.compile(optimizer=keras.optimizers.SGD(lr), loss=keras.losses.SparseCategoricalCrossentropy(True))
        epoch = tf.Variable(0, dtype=tf.int64)
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, epoch=epoch), manager_dir, 3)
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
        model.fit(ds, epochs=epochs, steps_per_epoch=len(images) // 4 // epochs, verbose=0, shuffle=False,
                  callbacks=[callbacks.StopOnDivergence(advice=f"try a smaller --lr than {lr:g}"),
                             callbacks.EpochCheckpoint(manager, epoch)])
        return model

    def test_stops_at_the_first_nan_loss_before_the_epoch_is_saved(self):
        rng = np.random.default_rng(0)
        images = rng.uniform(size=(32, SIDE, SIDE, 1)).astype(np.float32)
        labels = rng.integers(0, 2, size=32)
        images[4 * 6 + 1, 0, 0, 0] = np.nan  # Epoch 2 (1-based), its 3rd batch: optimizer step 7.
        directory = self._new_dir()
        with self.assertRaisesRegex(callbacks.TrainingDivergedError,
                                    r"^training diverged: the loss is nan at step 3/4 of epoch 2 \(optimizer step 7\); "
                                    r"nothing of this epoch was saved; try a smaller --lr than 0.01$"):
            self._fit(images, labels, 2, directory)
        checkpoints = tf.train.get_checkpoint_state(directory).all_model_checkpoint_paths
        self.assertEqual([os.path.basename(p) for p in checkpoints], ["ckpt-1"])  # Epoch 1 only.

    def test_non_finite_weights_are_not_saved_even_with_a_finite_loss(self):
        # One step: its loss (logits of a few hundred) is finite, but its
        # update, lr 1e38 times gradients of tens, overflows the weights.
        images = np.full((4, SIDE, SIDE, 1), 100.0, np.float32)
        labels = np.array([0, 1, 0, 1])
        directory = self._new_dir()
        with self.assertRaisesRegex(callbacks.TrainingDivergedError,
                                    r"the weights are not finite after epoch 1 \(optimizer step 1\)"):
            self._fit(images, labels, 1, directory, lr=1e38)
        self.assertIsNone(tf.train.latest_checkpoint(directory))

    def test_is_a_config_error(self):
        # The binaries print ConfigErrors as one line with exit status 2.
        self.assertTrue(issubclass(callbacks.TrainingDivergedError, ConfigError))

