"""denoise.py and --method=denoise: the objectives against numpy, the frozen classifier, bad files, and the run.

The training step is checked as consistency_model_test checks the other
methods: a linear denoiser D(x) = x A + a (on the flattened image) in front
of a frozen linear classifier f(y) = y W + b, set weights and the wrapper's
noise, so each objective can be written again in float64 numpy and its
gradient taken by central finite differences. One SGD step must move D by
-lr * gradient and leave f's weights byte for byte.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import scipy.special
import tensorflow as tf
from absl.testing import flagsaver
from absl.testing import parameterized

import binaries  # tests/binaries.py
from consistency_model_test import _numeric_grad as numeric_grad  # central differences
from consistency_model_test import first_step_copies  # the wrapper's noise, drawn again
import keras

from tf_consreg import certify_run
from tf_consreg import cli
from tf_consreg import consistency_model
from tf_consreg import data
from tf_consreg import denoise
from tf_consreg import export
from tf_consreg import models
from tf_consreg import objectives
from tf_consreg import run_config
from tf_consreg.certify_spec import CertifySpec
from tf_consreg.errors import ConfigError
from tf_consreg.models import denoisers

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, H, W_, C = 4, 2, 2, 3
D = H * W_


def _linear_pair(a, a_bias, w, w_bias):
    """f∘D of the linear D and f above, composed by `denoise.compose`."""
    image = keras.Input((H, W_, 1))
    dense = keras.layers.Dense(D)
    denoiser = keras.Model(image, keras.layers.Reshape((H, W_, 1))(dense(keras.layers.Flatten()(image))))
    dense.set_weights([a.astype(np.float32), a_bias.astype(np.float32)])
    image = keras.Input((H, W_, 1))
    head = keras.layers.Dense(C)
    classifier = keras.Model(image, head(keras.layers.Flatten()(image)))
    head.set_weights([w.astype(np.float32), w_bias.astype(np.float32)])
    return denoise.compose(denoiser, classifier, (H, W_, 1))


def _reference(noisy, clean, a, a_bias, w, w_bias, m, objective, lbd, weight_decay):
    """The three objectives in float64 numpy.

    noisy: [m * B, D] copy-major; clean: [B, D].
    den_i = noisy_i A + a; z_i = den_i W + b; y = argmax(clean W + b);
    mse = mean over all m * B * D entries of (den - clean)^2;
    cross_entropy = mean over the m * B copies of -log softmax(z)_y;
    kl = mean_B mean_i sum_c p_bar (log p_bar - log p_i);
    loss: mse, cross_entropy, or cross_entropy + lbd kl; plus weight_decay / 2 (|A|^2 + |a|^2) (D's weights only).
    """
    den = noisy @ a + a_bias
    logits = den @ w + w_bias
    target = np.tile(np.argmax(clean @ w + w_bias, axis=1), m)
    log_p = scipy.special.log_softmax(logits, axis=1)
    ce = -np.mean(log_p[np.arange(m * len(clean)), target])
    mse = np.mean((den - np.tile(clean, (m, 1))) ** 2)
    log_p = log_p.reshape(m, -1, C)
    p_bar = np.exp(log_p).mean(axis=0)
    kl = np.mean([np.sum(p_bar * (np.log(p_bar) - log_p[i]), axis=1) for i in range(m)], axis=0).mean()
    loss = {"mse": mse, "stability": ce, "consistency": ce + (lbd or 0.0) * kl}[objective]
    return {"mse": mse, "cross_entropy": ce, "kl": kl, "loss": loss,
            "objective": loss + 0.5 * weight_decay * (np.sum(a ** 2) + np.sum(a_bias ** 2))}


class TrainStepTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        ("mse", "mse", 1, None, 0.01),
        ("stability_m2", "stability", 2, None, 0.01),
        ("consistency_m2", "consistency", 2, 3.0, 0.01),
        ("consistency_m3", "consistency", 3, 10.0, 0.0),
    )
    def test_one_step_matches_numpy_and_moves_only_the_denoiser(self, objective, m, lbd, weight_decay):
        rng = np.random.default_rng(0)
        a, a_bias = np.eye(D) + 0.3 * rng.normal(size=(D, D)), 0.05 * rng.normal(size=D)
        w, w_bias = rng.normal(size=(D, C)), 0.1 * rng.normal(size=C)
        images = rng.uniform(size=(B, H, W_, 1)).astype(np.float32)
        labels = np.array([0, 1, 2, 1], np.int64)  # Reported accuracy only: the targets are f's labels.
        sigma, seed, lr = 0.5, 7, 0.1
        config = run_config.ObjectiveConfig(
            method="denoise", sigma=sigma, num_noise=m, lbd=lbd, weight_decay=weight_decay,
            denoise_objective=objective, classifier="never-loaded.keras")  # The test composes f∘D itself.
        base = _linear_pair(a, a_bias, w, w_bias)
        classifier_before = [v.numpy().tobytes() for v in denoise.parts(base)[1].weights]
        model = consistency_model.ConsistencyModel(base, config, seed=seed)
        model.compile(optimizer=keras.optimizers.SGD(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        logs = model.train_on_batch(images, labels, return_dict=True)

        noisy = first_step_copies(images, m, sigma, seed)
        clean = images.reshape(B, D).astype(np.float64)
        ref = _reference(noisy, clean, a, a_bias, w, w_bias, m, objective, lbd, weight_decay)
        if m > 1:
            self.assertGreater(ref["kl"], 1e-3)  # The copies disagree: the KL term is exercised.
        self.assertEqual(set(logs), {"loss", "accuracy", "mse", "cross_entropy", "kl"})
        # float32 forward passes of a few dozen terms of size ~1: relative error ~1e-6.
        for name in ("loss", "mse", "cross_entropy", "kl"):
            self.assertAllClose(logs[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)

        def objective_a(value):
            return _reference(noisy, clean, value, a_bias, w, w_bias, m, objective, lbd, weight_decay)["objective"]

        def objective_bias(value):
            return _reference(noisy, clean, a, value, w, w_bias, m, objective, lbd, weight_decay)["objective"]

        denoiser, classifier = denoise.parts(base)
        new_a, new_bias = denoiser.get_weights()
        # Central differences in float64 (error ~eps^2 ~ 1e-12) against a float32 step of lr * O(1) gradients.
        self.assertAllClose(new_a, a - lr * numeric_grad(objective_a, a), atol=2e-5)
        self.assertAllClose(new_bias, a_bias - lr * numeric_grad(objective_bias, a_bias), atol=2e-5)
        self.assertGreater(np.abs(new_a - a).max(), 1e-4)  # D moved.
        self.assertEqual([v.numpy().tobytes() for v in classifier.weights], classifier_before)
        self.assertEqual({id(v) for v in base.trainable_weights}, {id(v) for v in denoiser.trainable_weights})


class RegistryTest(parameterized.TestCase):

    def test_defaults(self):
        self.assertEqual(objectives.create("denoise", sigma=0.25, classifier="f.keras"),
                         objectives.Denoise(sigma=0.25, weight_decay=1e-4, denoise_objective="mse",
                                            classifier="f.keras", denoiser_arch=None, num_noise=1, lbd=None))
        consistency = objectives.create("denoise", sigma=0.25, classifier="f.keras", denoise_objective="consistency")
        self.assertEqual((consistency.num_noise, consistency.lbd), (2, 10.0))
        self.assertEqual(objectives.create("standard", sigma=0.25).num_noise, 1)

    @parameterized.named_parameters(
        ("no_classifier", dict(), "^--method=denoise needs --classifier"),
        ("objective", dict(classifier="f", denoise_objective="l1"), "^--denoise_objective='l1' is unknown"),
        ("lbd", dict(classifier="f", lbd=1.0), "^--lbd is used only by --denoise_objective=consistency; "),
        ("copies", dict(classifier="f", denoise_objective="consistency", num_noise=1), "--num_noise must be >= 2"),
        ("eta", dict(classifier="f", eta=0.5), "^--eta is used only by "),
    )
    def test_refuses(self, settings, message):
        with self.assertRaisesRegex(ConfigError, message):
            objectives.create("denoise", sigma=0.5, **settings)

    def test_standard_refuses_copies_and_denoise_settings(self):
        with self.assertRaisesRegex(ConfigError, "^--method=standard trains on clean images: --num_noise must be 1"):
            objectives.create("standard", sigma=0.5, num_noise=2)
        with self.assertRaisesRegex(ConfigError, "^--classifier is used only by --method=denoise; "):
            objectives.create("standard", sigma=0.5, classifier="f.keras")

    def test_the_run_records_the_datasets_denoiser_and_only_then_the_denoise_settings(self):
        objective = run_config.ObjectiveConfig(method="denoise", classifier="f.keras")
        for dataset, arch in (("fashion_mnist", "dncnn_small"), ("cifar10", "dncnn")):
            config = run_config.TrainConfig(model_dir="x", dataset=dataset, arch="lenet" if dataset != "cifar10"
                                            else "cifar_resnet110", objective=objective)
            self.assertEqual(config.to_dict()["denoiser_arch"], arch)
            self.assertEqual(run_config.TrainConfig.from_dict(config.to_dict()), config)
        self.assertNotIn("classifier", run_config.TrainConfig(model_dir="x").to_dict())

    def test_denoiser_arch_must_fit_the_dataset(self):
        with self.assertRaisesRegex(ConfigError, "^--denoiser_arch=dncnn is sized for cifar10, imagenet2012, not "
                                                 "--dataset=fashion_mnist; choose one of dncnn_small$"):
            run_config.TrainConfig(model_dir="x", objective=run_config.ObjectiveConfig(
                method="denoise", classifier="f.keras", denoiser_arch="dncnn"))


class StandardStepTest(tf.test.TestCase):

    def test_trains_on_the_clean_images(self):
        # Plain cross-entropy of the clean logits: its gradient for a linear model is X^T (softmax - onehot) / B.
        rng = np.random.default_rng(1)
        w = rng.normal(size=(D, C))
        images = rng.uniform(size=(B, H, W_, 1)).astype(np.float32)
        labels = np.array([0, 1, 2, 1])
        inputs = keras.Input((H, W_, 1))
        dense = keras.layers.Dense(C, use_bias=False)
        base = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
        dense.set_weights([w.astype(np.float32)])
        model = consistency_model.ConsistencyModel(
            base, run_config.ObjectiveConfig(method="standard", sigma=1.0, weight_decay=0.0), seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        logs = model.train_on_batch(images, labels, return_dict=True)
        x = images.reshape(B, D).astype(np.float64)
        p = scipy.special.softmax(x @ w, axis=1)
        self.assertAllClose(logs["cross_entropy"], -np.mean(np.log(p[np.arange(B), labels])), rtol=1e-5)
        expected = w - 0.1 * x.T @ (p - np.eye(C)[labels]) / B
        self.assertAllClose(dense.get_weights()[0], expected, atol=1e-5)  # float32 step of O(1) terms.


class FilesTest(tf.test.TestCase):
    """Loading --classifier and --denoiser: bad files and shape mismatches are one ConfigError naming the flag."""

    def _save(self, model, name):
        path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), name)
        model.save(path)
        return path

    def test_composition_saves_and_loads_with_plain_keras(self):
        classifier = models.get_architecture("lenet", "fashion_mnist")
        denoiser = denoisers.dncnn_small((28, 28, 1))
        images = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype(np.float32)
        # A fresh DnCNN is the identity (its last kernel is zero): f∘D starts as f.
        self.assertAllEqual(denoiser(images), images)
        composed = denoise.load_composition(self._save(classifier, "f.keras"), self._save(denoiser, "d.keras"),
                                            (28, 28, 1), 10)
        path = self._save(composed, "base_model.keras")
        loaded = keras.models.load_model(path, compile=False)
        self.assertAllClose(loaded(images), classifier(images), atol=1e-6)
        self.assertEqual([type(m).__name__ for m in denoise.parts(loaded)], ["Functional", "Functional"])
        self.assertEqual(loaded.trainable_weights, [v for v in denoise.parts(loaded)[0].trainable_weights])

    def test_caffe_preprocessing_is_keras_resnet50s_preprocess_input(self):
        # keras_resnet50 puts it in front of keras.applications.ResNet50 (building that network here costs 40 s).
        images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
        expected = keras.applications.resnet50.preprocess_input(images * 255.0)
        # 255 x_c + 0 + 0 - mean against 255 x_c - mean, in float32: a few ulps of values below 256 (ulp 3e-5).
        self.assertAllClose(denoise.caffe_preprocessing((8, 8, 3))(images), expected, atol=1e-4, rtol=0)

    def test_bad_files_and_mismatches_are_one_line(self):
        garbage = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "f.keras")
        with open(garbage, "wb") as f:
            f.write(b"not a model")
        classifier = self._save(models.get_architecture("lenet", "fashion_mnist"), "f.keras")
        cifar = self._save(denoisers.dncnn((32, 32, 3), depth=3, channels=4), "d3.keras")
        with self.assertRaisesRegex(ConfigError, r"^--classifier: .*f\.keras is not a complete \.keras file"):
            denoise.load_composition(garbage, cifar, (28, 28, 1))
        with self.assertRaisesRegex(ConfigError, r"^--denoiser=.*d3\.keras: its input has shape \(32, 32, 3\), "
                                                 r"but the classifier takes \(28, 28, 1\)$"):
            denoise.load_composition(classifier, cifar)
        with self.assertRaisesRegex(ConfigError, r"^--classifier=.*f\.keras gives 10 logits, not 100 classes$"):
            denoise.load_composition(classifier, cifar, (28, 28, 1), 100)
        with self.assertRaisesRegex(ConfigError, r"^--classifier=.*f\.keras takes images of shape \(28, 28, 1\), "
                                                 r"not \(32, 32, 3\)$"):
            denoise.load_composition(classifier, cifar, (32, 32, 3), 10)
        with self.assertRaisesRegex(ConfigError, "^--classifier and --denoiser go together"):
            denoise.check_files(classifier, None)
        with self.assertRaisesRegex(ConfigError, r"^--denoiser=.*nothing\.keras is not a \.keras file$"):
            denoise.check_files(classifier, os.path.join(os.path.dirname(cifar), "nothing.keras"))


class CertifyAndExportTest(tf.test.TestCase):
    """--classifier with --denoiser in certification and export: f∘D, as if saved and given as --model."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp(dir=tf.compat.v1.test.get_temp_dir())
        keras.utils.set_random_seed(0)
        cls.classifier = os.path.join(cls.dir, "f.keras")
        models.get_architecture("lenet", "fashion_mnist").save(cls.classifier)
        denoiser = denoisers.dncnn_small((28, 28, 1))
        # A denoiser that is no identity: a nonzero last kernel.
        last = denoiser.layers[-2]
        last.set_weights([np.random.default_rng(0).normal(size=last.get_weights()[0].shape) * 0.1])
        cls.denoiser = os.path.join(cls.dir, "d.keras")
        denoiser.save(cls.denoiser)
        cls.composed = os.path.join(cls.dir, "base_model.keras")
        denoise.load_composition(cls.classifier, cls.denoiser).save(cls.composed)

    def _certify(self, **model):
        output = os.path.join(tempfile.mkdtemp(dir=self.dir), "certify.tsv")
        config = cli.config_from_values(certify_run.CertifyConfig, dict(
            output=output, dataset="fashion_mnist", sigma=0.25, n0=20, n=100, alpha=0.01, batch_size=200, max=2,
            **model))
        certify_run.certify_dataset(config, verbose=0)
        with open(output, encoding="utf-8") as f:
            return config, [line.split("\t")[:-1] for line in f if not line.startswith("#")]  # Without the time.

    @pytest.mark.slow
    def test_certifies_the_pair_as_its_composition(self):
        pair_config, pair_rows = self._certify(classifier=self.classifier, denoiser=self.denoiser)
        _, model_rows = self._certify(model=self.composed)
        self.assertLen(pair_rows, 3)  # The header and 2 examples.
        self.assertEqual(pair_rows, model_rows)
        name, digest = pair_config.model_name
        self.assertEqual(name, f"{self.classifier} after {self.denoiser}")
        self.assertEqual(len(digest), 64)

    def test_bad_pairs_are_refused_before_any_output(self):
        output = os.path.join(tempfile.mkdtemp(dir=self.dir), "certify.tsv")
        base = dict(output=output, dataset="fashion_mnist", sigma=0.25)
        for extra, message in (
                (dict(classifier=self.classifier), "^--classifier and --denoiser go together"),
                (dict(classifier=self.classifier, denoiser=self.denoiser, model=self.composed),
                 "^--classifier with --denoiser is the model: give them without --model_dir and --model$"),
                (dict(classifier=self.classifier, denoiser=self.denoiser, dataset=None),
                 r"^--dataset is required with --classifier with --denoiser "),
                (dict(classifier=self.classifier, denoiser=self.denoiser, dataset="cifar10", mock_data=True), None)):
            with self.subTest(extra=extra):
                values = {**base, **extra}
                if message is None:  # Valid flags; the classifier does not fit CIFAR-10's images.
                    config = cli.config_from_values(certify_run.CertifyConfig, values)
                    with self.assertRaisesRegex(ConfigError, r"^--classifier=.*f\.keras takes images of shape "
                                                             r"\(28, 28, 1\), not \(32, 32, 3\)$"):
                        certify_run.certify_dataset(config, verbose=0)
                else:
                    with self.assertRaisesRegex(ConfigError, message):
                        cli.config_from_values(certify_run.CertifyConfig, values)
                self.assertFalse(os.path.exists(output))

    def test_export_takes_the_pair_with_sigma(self):
        # What export_version then loads is load_composition's f∘D, certified above; the export itself
        # (tracing the signatures of a DnCNN) is left to the serving check of the README.
        export_dir = os.path.join(tempfile.mkdtemp(dir=self.dir), "export")
        config = export.VersionExportConfig(export_dir=export_dir, classifier=self.classifier,
                                            denoiser=self.denoiser, spec=CertifySpec(sigma=0.25), version=1)
        self.assertEqual((config.classifier, config.denoiser, config.spec.sigma),
                         (self.classifier, self.denoiser, 0.25))
        with self.assertRaisesRegex(ConfigError, "^--sigma is required with --classifier with --denoiser "):
            export.VersionExportConfig(export_dir=export_dir, classifier=self.classifier, denoiser=self.denoiser,
                                       version=2)
        with self.assertRaisesRegex(ConfigError, "^--classifier with --denoiser is the model: "):
            export.VersionExportConfig(export_dir=export_dir, classifier=self.classifier, denoiser=self.denoiser,
                                       model=self.composed, spec=CertifySpec(sigma=0.25), version=3)
        self.assertFalse(os.path.exists(export_dir))


# Epochs of 2 steps of 32 images, no evaluation: the cost is in tracing and saving.
_TINY = dict(method="denoise", denoiser_arch="dncnn_small", denoise_objective="consistency", train_examples=64,
             eval_examples=0, batch_size=32, sigma=0.5, lbd=2.0, lr=0.05, mixed_precision="float32")


class TrainRunTest(tf.test.TestCase):
    """bin/train.py --method=denoise in process: the files, the frozen classifier, resume, bad --classifier."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.train_bin = binaries.load("train")

    @classmethod
    def tearDownClass(cls):
        binaries.unload(cls.train_bin)
        super().tearDownClass()

    @pytest.mark.slow
    def test_resumed_run_equals_the_uninterrupted_one_and_f_never_changes(self):
        classifier = os.path.join(self.create_tempdir().full_path, "f.keras")
        models.get_architecture("lenet", "fashion_mnist").save(classifier)
        with open(classifier, "rb") as f:
            classifier_bytes = f.read()
        original = keras.models.load_model(classifier).get_weights()
        resumed, uninterrupted = self.create_tempdir().full_path, self.create_tempdir().full_path
        for model_dir, epochs in ((resumed, 1), (resumed, 2), (uninterrupted, 2)):
            with flagsaver.flagsaver(model_dir=model_dir, classifier=classifier, epochs=epochs, **_TINY):
                self.train_bin.main(["train"])
        runs = [keras.models.load_model(os.path.join(d, models.BASE_MODEL_FILE)) for d in (resumed, uninterrupted)]
        denoiser_file = keras.models.load_model(os.path.join(resumed, denoise.DENOISER_FILE))
        (d1, f1), (d2, f2) = (denoise.parts(run) for run in runs)
        for a, b in zip(d1.get_weights(), d2.get_weights()):
            self.assertAllEqual(a, b)
        for a, b in zip(d1.get_weights(), denoiser_file.get_weights()):
            self.assertAllEqual(a, b)
        # D trained: its last kernel (zero at the start) moved.
        self.assertGreater(np.abs(d1.get_weights()[-1]).max(), 0)
        for f in (f1, f2):
            for a, b in zip(f.get_weights(), original):
                self.assertEqual(a.tobytes(), b.tobytes())
        with open(classifier, "rb") as f:
            self.assertEqual(f.read(), classifier_bytes)

    def test_a_garbage_classifier_fails_before_any_file_is_written(self):
        garbage = os.path.join(self.create_tempdir().full_path, "f.keras")
        with open(garbage, "w", encoding="utf-8") as f:
            f.write("garbage")
        model_dir = os.path.join(self.create_tempdir().full_path, "run")
        with flagsaver.flagsaver(model_dir=model_dir, classifier=garbage, epochs=1, **_TINY):
            with self.assertRaisesRegex(ConfigError, r"^--classifier: .*f\.keras is not a complete \.keras file"):
                self.train_bin.main(["train"])
        self.assertFalse(os.path.exists(model_dir))

    @pytest.mark.slow
    def test_the_binary_says_it_in_one_line_and_exits_2(self):
        # The one real process: what a user sees of a D/f mismatch (a CIFAR-10 classifier for Fashion-MNIST).
        classifier = os.path.join(self.create_tempdir().full_path, "f.keras")
        image = keras.Input((32, 32, 3))
        keras.Model(image, keras.layers.Dense(10)(keras.layers.Flatten()(image))).save(classifier)
        model_dir = os.path.join(self.create_tempdir().full_path, "run")
        result = subprocess.run(
            [sys.executable, os.path.join(_REPO, "bin", "train.py"), "--method=denoise", f"--classifier={classifier}",
             f"--model_dir={model_dir}", "--epochs=1", "--train_examples=64", "--eval_examples=0"],
            capture_output=True, text=True, timeout=300, check=False)
        self.assertEqual(result.returncode, 2, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines()
                 if line.strip() and not line.startswith(("I0000", "W0000", "E0000", "WARNING:", "--mixed_precision"))]
        self.assertEqual(len(lines), 1, result.stderr[-2000:])
        self.assertRegex(lines[0], r"--classifier=.*f\.keras takes images of shape \(32, 32, 3\), not \(28, 28, 1\)$")
        self.assertFalse(os.path.exists(model_dir))


if __name__ == "__main__":
    tf.test.main()
