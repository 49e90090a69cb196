"""training.py: its configs, and ConsistencyModel's train_step/test_step against a numpy reference.

The base model is linear (logits = x W + b) with set weights, so the whole
objective can be written again in float64 numpy, independently of
tf_consreg.losses, and its gradient taken by central finite differences. One
SGD step (lr, no momentum) must then move the weights by -lr * gradient, and
the reported metrics must equal the numpy values.
"""

import dataclasses
import io
import json
import os
import shutil
import tempfile
from contextlib import redirect_stdout

import numpy as np
import pytest
import scipy.special
import scipy.stats
import tensorflow as tf
from absl import flags
from absl.testing import parameterized

import keras

from tf_consreg import cli
from tf_consreg import models
from tf_consreg import noise
from tf_consreg import precision
from tf_consreg import training
from tf_consreg.errors import ConfigError

B, H, W_, C = 4, 2, 2, 3
D = H * W_


def _linear_base(weights, bias):
    inputs = keras.Input((H, W_, 1))
    dense = keras.layers.Dense(C)
    outputs = dense(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    dense.set_weights([weights.astype(np.float32), bias.astype(np.float32)])
    return model


def _reference(noisy, labels, weights, bias, m, method, lbd, eta, weight_decay, clean=None, beta=16.0,
               gamma=8.0, sigma=0.5):
    """The objectives in float64 numpy, term by term.

    noisy: [m * B, D] copy-major, as ConsistencyModel orders them.
    CE = mean over all m*B copies of -log softmax(z)_y;
    p_bar = mean_i p_i; KL = mean_i sum_c p_bar (log p_bar - log p_i);
    H = -sum_c p_bar log p_bar; consistency = mean_B (lbd KL + eta H).
    stability: CE on the clean images + lbd * mean_B sum_c -softmax(z_clean) log softmax(z_noisy).
    macer: classification = mean_B -log(p_bar_y + 1e-10); with q = mean_i softmax(beta z_i), for
    examples where argmax q = y and the margin M = Phi^-1(q_top1) - Phi^-1(q_top2) is within
    [0, gamma]: robustness = sum (gamma - M) * sigma / 2 / B; loss = classification + lbd robustness.
    """
    logits = noisy @ weights + bias
    log_p = scipy.special.log_softmax(logits, axis=1)
    labels_c = np.tile(labels, m)
    ce = -np.mean(log_p[np.arange(len(labels_c)), labels_c])
    out = {"cross_entropy": ce, "loss": ce,
           "accuracy": np.mean(np.argmax(logits, axis=1) == labels_c)}
    if method == "stability":
        clean_log_p = scipy.special.log_softmax(clean @ weights + bias, axis=1)
        out["cross_entropy"] = -np.mean(clean_log_p[np.arange(len(labels)), labels])
        out["stability"] = np.mean(np.sum(-np.exp(clean_log_p) * log_p, axis=1))
        out["loss"] = out["cross_entropy"] + lbd * out["stability"]
    if method == "macer":
        p_bar = np.exp(log_p.reshape(m, -1, C)).mean(axis=0)
        out["classification"] = np.mean(-np.log(p_bar[np.arange(len(labels)), labels] + 1e-10))
        q = scipy.special.softmax(beta * logits.reshape(m, -1, C), axis=2).mean(axis=0)
        top = np.sort(q, axis=1)[:, ::-1]
        margin = scipy.stats.norm.ppf(top[:, 0]) - scipy.stats.norm.ppf(top[:, 1])
        hinge = (np.argmax(q, axis=1) == labels) & (margin <= gamma)
        out["robustness"] = np.sum(np.where(hinge, gamma - margin, 0.0)) * sigma / 2 / len(labels)
        out["loss"] = out["classification"] + lbd * out["robustness"]
    if method == "consistency":
        log_p = log_p.reshape(m, -1, C)
        p_bar = np.exp(log_p).mean(axis=0)
        kl = np.mean([np.sum(p_bar * (np.log(p_bar) - log_p[i]), axis=1) for i in range(m)], axis=0)
        ent = -np.sum(p_bar * np.log(p_bar), axis=1)
        out.update(kl=kl.mean(), entropy=ent.mean(), consistency=np.mean(lbd * kl + eta * ent))
        out["loss"] = ce + out["consistency"]
    out["objective"] = out["loss"] + 0.5 * weight_decay * (np.sum(weights ** 2) + np.sum(bias ** 2))
    return out


def _numeric_grad(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


class TrainStepTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        ("consistency_m2", "consistency", 2, 2.0, 0.5, 0.01),
        ("consistency_m3", "consistency", 3, 5.0, 0.1, 0.0),
        ("gaussian_m1", "gaussian", 1, 0.0, 0.0, 0.01),
        ("stability", "stability", 1, 2.0, 0.0, 0.01),
        ("macer_k4", "macer", 4, 3.0, 0.0, 0.01),
    )
    def test_one_step_matches_numpy(self, method, m, lbd, eta, weight_decay):
        rng = np.random.default_rng(0)
        weights, bias = rng.normal(size=(D, C)), rng.normal(size=C) * 0.1
        images = rng.uniform(size=(B, H, W_, 1)).astype(np.float32)
        labels = np.array([0, 1, 2, 1], np.int64)
        sigma, seed, lr = 0.5, 7, 0.1

        # beta = 1 keeps MACER's margins inside the hinge for these weights.
        method_fields = {"consistency": dict(lbd=lbd, eta=eta), "gaussian": {}, "stability": dict(lbd=lbd),
                         "macer": dict(lbd=lbd, beta=1.0, gamma=8.0)}[method]
        objective = training.ObjectiveConfig(method=method, sigma=sigma, num_noise=m, weight_decay=weight_decay,
                                             **method_fields)
        model = training.ConsistencyModel(_linear_base(weights, bias), objective, seed=seed)
        model.compile(optimizer=keras.optimizers.SGD(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        logs = model.train_on_batch(images, labels, return_dict=True)

        # The noise the first step (iteration 0) of the training stream draws.
        seeds = noise.example_seeds(noise.step_seed(seed, 1, 0), B)
        x = tf.constant(images)
        noisy = (noise.tile_copies(x, m) + noise.gaussian_noise(x, m, sigma, seeds)).numpy()
        noisy = noisy.reshape(m * B, D).astype(np.float64)
        extra = dict(clean=images.reshape(B, D).astype(np.float64), beta=1.0, gamma=8.0, sigma=sigma)
        ref = _reference(noisy, labels, weights, bias, m, method, lbd, eta, weight_decay, **extra)
        if method == "macer":
            self.assertGreater(ref["robustness"], 0.0)  # The hinge term is exercised.

        expected_terms = {"consistency": {"cross_entropy", "consistency", "kl", "entropy"},
                          "gaussian": {"cross_entropy"}, "stability": {"cross_entropy", "stability"},
                          "macer": {"classification", "robustness"}}[method]
        self.assertEqual(set(logs), {"loss", "accuracy"} | expected_terms)
        for name in logs:
            self.assertAllClose(logs[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)

        def objective_w(w):
            return _reference(noisy, labels, w, bias, m, method, lbd, eta, weight_decay, **extra)["objective"]

        def objective_b(b):
            return _reference(noisy, labels, weights, b, m, method, lbd, eta, weight_decay, **extra)["objective"]

        new_w, new_b = model.base_model.get_weights()
        self.assertAllClose(new_w, weights - lr * _numeric_grad(objective_w, weights), atol=2e-5)
        self.assertAllClose(new_b, bias - lr * _numeric_grad(objective_b, bias), atol=2e-5)

    def test_test_step_reports_clean_and_noisy_accuracy(self):
        weights = np.zeros((D, C))
        bias = np.array([0.0, 5.0, 0.0])  # Predicts class 1 whatever the input.
        model = training.ConsistencyModel(
            _linear_base(weights, bias),
            training.ObjectiveConfig(method="consistency", sigma=0.5, num_noise=2, lbd=1.0, eta=0.5))
        model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        images = np.zeros((B, H, W_, 1), np.float32)
        logs = model.test_on_batch(images, np.array([1, 1, 0, 2]), return_dict=True)
        self.assertAllClose(logs["accuracy"], 0.5)
        self.assertAllClose(logs["clean_accuracy"], 0.5)
        # All copies agree exactly: KL is 0 and the entropy is H(softmax(bias)).
        p = scipy.special.softmax(bias)
        self.assertAllClose(logs["kl"], 0.0, atol=1e-6)
        self.assertAllClose(logs["entropy"], -np.sum(p * np.log(p)), rtol=1e-5)


def _smoothmix_walk(images, labels, noises, weights, bias, *, step_size, num_steps, mix_step, maxnorm, maxnorm_s):
    """SmoothMix's walk (the authors' SmoothMix_PGD) on the linear model, in float64 numpy.

    images [B, D], noises [m, B, D]. Per example, L(x') = -log(max(p_bar_y, 1e-20)) with
    p_bar = mean_i softmax((x' + n_i) W + b); since dz_i/dx' = W^T and
    dp_i,y/dz_i = p_i,y (e_y - p_i), grad L = -mean_i p_i,y (W[:, y] - W p_i) / p_bar_y.
    Step: x' += step_size * g / (||g|| + 1e-8); then d = x' - x is scaled by
    r / (||d|| + 1e-7) where ||d|| > r (r = maxnorm; none when None) and x + d clipped to
    [0, 1]. The start is x' after mix_step steps (x if mix_step = 0), then projected the
    same way with r = maxnorm_s.
    """

    def project(points, radius):
        delta = points - images
        if radius is not None:
            norm = np.linalg.norm(delta, axis=1, keepdims=True)
            delta = np.where(norm > radius, delta * radius / (norm + 1e-7), delta)
        return np.clip(images + delta, 0.0, 1.0)

    rows = np.arange(len(labels))
    adv, start = images.copy(), images.copy()
    for step in range(num_steps):
        if step == mix_step:
            start = adv.copy()
        p = scipy.special.softmax((adv[None] + noises) @ weights + bias, axis=2)  # [m, B, C]
        p_y = p[:, rows, labels]  # [m, B]
        toward = weights[:, labels].T[None] - p @ weights.T  # [m, B, D]: W[:, y] - W p_i
        grad = -np.mean(p_y[..., None] * toward, axis=0) / np.maximum(p_y.mean(axis=0), 1e-20)[:, None]
        adv = adv + step_size * grad / (np.linalg.norm(grad, axis=1, keepdims=True) + 1e-8)
        adv = project(adv, maxnorm)
    return project(start, maxnorm_s), adv


def _smoothmix_objective(start, end, labels, noises, mix_weights, weights, bias, *, eta, weight_decay):
    """SmoothMix's objective (the authors' code/train.py) on the linear model, in float64 numpy.

    Over the m * B copies: CE = mean -log softmax((s + n_i) W + b)_y; p_bar = mean_i of those
    softmaxes; mask = [argmax p_bar = y]; target t = (1 - lam) p_bar + lam / C; the mixes
    x_mix = (1 - lam) s + lam e get KL_i = sum_c t (log t - log softmax((x_mix + n_i) W + b));
    mixup = mean over copies of mask * KL_i; loss = CE + eta * mixup.
    """
    rows = np.arange(len(labels))
    log_p = scipy.special.log_softmax((start[None] + noises) @ weights + bias, axis=2)  # [m, B, C]
    ce = -np.mean(log_p[:, rows, labels])
    p_bar = np.exp(log_p).mean(axis=0)
    mask = (np.argmax(p_bar, axis=1) == labels).astype(np.float64)
    lam = mix_weights[:, None]
    target = (1 - lam) * p_bar + lam / p_bar.shape[1]
    mixed = (1 - lam) * start + lam * end
    log_q = scipy.special.log_softmax((mixed[None] + noises) @ weights + bias, axis=2)
    kl = np.sum(target * (np.log(target) - log_q), axis=2)  # [m, B]
    mixup = np.mean(mask[None] * kl)
    loss = ce + eta * mixup
    return {"cross_entropy": ce, "mixup": mixup, "mixup_fraction": mask.mean(), "loss": loss,
            "accuracy": np.mean(np.argmax(log_p, axis=2) == labels[None]), "p_bar": p_bar,
            "objective": loss + 0.5 * weight_decay * (np.sum(weights ** 2) + np.sum(bias ** 2))}


class SmoothMixTrainStepTest(tf.test.TestCase, parameterized.TestCase):
    """One SmoothMix step against `_smoothmix_walk` and `_smoothmix_objective`."""

    @parameterized.named_parameters(
        # m, T, step, mix_step, maxnorm, maxnorm_s, eta, warmup: the epoch-0 factor 1/warmup scales eta and
        # the start bound.
        ("clean_start", 2, 3, 0.5, 0, None, None, 1.0, 1),
        ("one_step_adversary_warming_up", 3, 2, 0.4, 1, None, None, 5.0, 2),
        ("bounded", 2, 4, 0.3, 1, 0.5, 0.2, 2.0, 1),
    )
    def test_one_step_matches_numpy(self, m, num_steps, step_size, mix_step, maxnorm, maxnorm_s, eta, warmup):
        rng = np.random.default_rng(3)
        weights, bias = rng.normal(size=(D, C)) * 2, rng.normal(size=C) * 0.1
        images = rng.uniform(size=(B, H, W_, 1)).astype(np.float32)
        labels = np.array([0, 1, 2, 1], np.int64)
        sigma, seed, lr, weight_decay = 0.25, 5, 0.1, 0.01
        objective = training.ObjectiveConfig(
            method="smoothmix", sigma=sigma, num_noise=m, num_steps=num_steps, attack_step=step_size,
            mix_step=mix_step, maxnorm=maxnorm, maxnorm_s=maxnorm_s, eta=eta, warmup=warmup,
            weight_decay=weight_decay)
        model = training.ConsistencyModel(_linear_base(weights, bias), objective, seed=seed)
        model.compile(optimizer=keras.optimizers.SGD(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.set_epoch(0)
        logs = model.train_on_batch(images, labels, return_dict=True)

        # The first step's (iteration 0) draws: noise of stream 1, mixing weights of stream 3, each keyed
        # by the example's position (noise.example_seeds); lam = U[0, 1) / 2.
        seeds = noise.example_seeds(noise.step_seed(seed, 1, 0), B)
        x = tf.constant(images)
        noises = noise.gaussian_noise(x, m, sigma, seeds).numpy().reshape(m, B, D).astype(np.float64)
        mix_seeds = noise.example_seeds(noise.step_seed(seed, 3, 0), B)
        lam = np.array([0.5 * tf.random.stateless_uniform([], s).numpy() for s in mix_seeds], np.float64)
        self.assertTrue(np.all((lam >= 0) & (lam < 0.5)) and len(set(lam)) == B)

        warmed = 1 / warmup  # min(1, (epoch + 1) / warmup) at epoch 0
        start_bound = warmed * (step_size * mix_step if maxnorm_s is None else maxnorm_s)
        clean = images.reshape(B, D).astype(np.float64)
        start, end = _smoothmix_walk(clean, labels, noises, weights, bias, step_size=step_size,
                                     num_steps=num_steps, mix_step=mix_step, maxnorm=maxnorm, maxnorm_s=start_bound)
        ref = _smoothmix_objective(start, end, labels, noises, lam, weights, bias, eta=warmed * eta,
                                   weight_decay=weight_decay)
        # Not vacuous: the walk moved, and the mask holds some examples but not all, with no
        # near-tie that float32 could flip.
        self.assertGreater(np.abs(end - clean).max(), 0.1)
        self.assertTrue(0 < ref["mixup_fraction"] < 1 and ref["mixup"] > 0)
        top2 = np.sort(ref["p_bar"], axis=1)[:, -2:]
        self.assertGreater(np.min(top2[:, 1] - top2[:, 0]), 1e-3)

        # float32 against float64: rounding (2^-24 ~ 6e-8 per operation) over the walk's
        # T <= 4 normalized steps and the two forward passes stays below ~1e-6 relative;
        # rtol 1e-5 leaves a factor 10, as the other methods' test.
        self.assertEqual(set(logs), {"loss", "accuracy", "cross_entropy", "mixup", "mixup_fraction"})
        for name in logs:
            self.assertAllClose(logs[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)

        # The attack's points are constants of the objective (no gradient flows through them).
        def objective_w(w):
            return _smoothmix_objective(start, end, labels, noises, lam, w, bias, eta=warmed * eta,
                                        weight_decay=weight_decay)["objective"]

        def objective_b(b):
            return _smoothmix_objective(start, end, labels, noises, lam, weights, b, eta=warmed * eta,
                                        weight_decay=weight_decay)["objective"]

        new_w, new_b = model.base_model.get_weights()
        self.assertAllClose(new_w, weights - lr * _numeric_grad(objective_w, weights), atol=2e-5)
        self.assertAllClose(new_b, bias - lr * _numeric_grad(objective_b, bias), atol=2e-5)


class AdversarialAndScheduleTest(tf.test.TestCase):

    def _model(self, **kwargs):
        rng = np.random.default_rng(1)
        model = training.ConsistencyModel(_linear_base(rng.normal(size=(D, C)), np.zeros(C)),
                                          training.ObjectiveConfig(sigma=0.25, **kwargs), seed=4)
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def test_smoothadv_with_zero_radius_is_gaussian_training(self):
        images = np.random.default_rng(2).uniform(size=(B, H, W_, 1)).astype(np.float32)
        labels = np.array([0, 1, 2, 0])
        plain = self._model(num_noise=2, method="gaussian")
        adv = self._model(num_noise=2, method="smoothadv", epsilon=0.0, num_steps=3)
        attacked = self._model(num_noise=2, method="smoothadv", epsilon=0.5, num_steps=3)
        for model in (plain, adv, attacked):
            model.set_epoch(0)
            model.train_on_batch(images, labels)
        self.assertAllClose(plain.base_model.get_weights(), adv.base_model.get_weights())
        self.assertNotAllClose(plain.base_model.get_weights()[0], attacked.base_model.get_weights()[0])

    def test_attack_radius_warms_up_and_macer_defers(self):
        adv = self._model(num_noise=2, method="consistency", adv_training=True, epsilon=1.0, warmup=4, lbd=1.0)
        radii = []
        for epoch in range(6):
            adv.set_epoch(epoch)
            radii.append(float(adv._attack_radius.numpy()))  # pylint: disable=protected-access
        self.assertAllClose(radii, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])

        macer = self._model(num_noise=4, method="macer", lbd=6.0, deferred_epochs=3)
        weights = []
        for epoch in range(5):
            macer.set_epoch(epoch)
            weights.append(float(macer._robust_weight.numpy()))  # pylint: disable=protected-access
        self.assertAllClose(weights, [0.0, 0.0, 0.0, 6.0, 6.0])

    def test_smoothmix_warms_up_eta_and_the_start_bound(self):
        # min(1, (epoch + 1) / warmup) times eta and times maxnorm_s (default attack_step * mix_step).
        for fields, bound in ((dict(mix_step=1, attack_step=0.8), 0.8), (dict(mix_step=0), 0.0),
                              (dict(mix_step=0, maxnorm_s=2.0), 2.0)):
            model = self._model(method="smoothmix", eta=5.0, warmup=4, **fields)
            values = []
            for epoch in range(6):
                model.set_epoch(epoch)
                values.append((float(model._mixup_weight.numpy()),  # pylint: disable=protected-access
                               float(model._start_bound.numpy())))  # pylint: disable=protected-access
            factors = np.array([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
            self.assertAllClose(values, np.stack([5.0 * factors, bound * factors], axis=1), msg=str(fields))

    def test_smoothmix_evaluation_does_not_attack(self):
        # With no walk, start = end = x: val_mixup is the copies at x against the target.
        model = self._model(method="smoothmix", num_noise=2, eta=5.0, mix_step=1, attack_step=0.5)
        images = np.random.default_rng(2).uniform(size=(B, H, W_, 1)).astype(np.float32)
        terms = model.compute_terms(tf.constant(images), tf.constant([0, 1, 2, 0]), training=False, step=0)
        gaussian = self._model(method="gaussian", num_noise=2)
        plain = gaussian.compute_terms(tf.constant(images), tf.constant([0, 1, 2, 0]), training=False, step=0)
        self.assertAllClose(terms["logits"], plain["logits"])  # The same noisy copies of x.
        self.assertAllClose(terms["cross_entropy"], plain["cross_entropy"])


# One checkpoint per method, written by the wrapper before objectives.py
# existed (commit 2972909; testdata/SOURCE.md): a linear base after one
# training and one evaluation step, saved as `train` saves them.
_CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "wrapper_checkpoints")
_CHECKPOINT_CONFIGS = {
    "gaussian": dict(method="gaussian"),
    "consistency": dict(method="consistency"),
    "adv_consistency": dict(method="consistency", adv_training=True, num_steps=1),
    "stability": dict(method="stability"),
    "smoothadv": dict(method="smoothadv", num_steps=1),
    "macer": dict(method="macer", num_noise=2),
    "smoothmix": dict(method="smoothmix", num_steps=1),
}


class CheckpointCompatibilityTest(tf.test.TestCase, parameterized.TestCase):
    """Runs saved before the objectives had their own classes resume: same variables, same keys."""

    @parameterized.named_parameters((name, name) for name in _CHECKPOINT_CONFIGS)
    def test_restores_and_writes_the_same_variables(self, run):
        fields = _CHECKPOINT_CONFIGS[run]
        path = os.path.join(_CHECKPOINTS, run, "ckpt-1")
        inputs = keras.Input((2, 2, 1))
        base = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
        model = training.ConsistencyModel(base, training.ObjectiveConfig(sigma=0.5, **fields), seed=1)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.build((None, 2, 2, 1))
        model.optimizer.build(base.trainable_weights)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch)
        _ = checkpoint.save_counter  # As `train` creates it.
        # Every value of the checkpoint finds its variable, and every variable its value.
        checkpoint.restore(path).assert_consumed()

        reader = tf.train.load_checkpoint(path)
        saved = reader.get_variable_to_shape_map()
        for attribute in ("_eval_steps", "_attack_radius", "_robust_weight", "_mixup_weight", "_start_bound"):
            key = f"model/{attribute}/.ATTRIBUTES/VARIABLE_VALUE"
            self.assertEqual(hasattr(model, attribute), key in saved, attribute)
            if key in saved:
                self.assertEqual(getattr(model, attribute).numpy(), reader.get_tensor(key), attribute)
        self.assertEqual(int(epoch.numpy()), 1)
        self.assertEqual(int(model._eval_steps.numpy()), 1)  # pylint: disable=protected-access
        for i, weight in enumerate(base.get_weights()):
            self.assertAllEqual(weight, reader.get_tensor(f"optimizer/_trainable_variables/{i}/.ATTRIBUTES/"
                                                          "VARIABLE_VALUE"))
        # What the wrapper writes now has the same keys and shapes.
        manager = tf.train.CheckpointManager(checkpoint, os.path.join(self.get_temp_dir(), run), max_to_keep=1)
        self.assertEqual(tf.train.load_checkpoint(manager.save()).get_variable_to_shape_map(), saved)


class BuildOptionsTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters("mixed_float16", "mixed_bfloat16")
    def test_mixed_precision_keeps_losses_and_logits_float32(self, policy):
        config = training.TrainConfig(model_dir="/unused", mixed_precision=policy,
                                      objective=training.ObjectiveConfig(sigma=0.5, lbd=5.0))
        model = training.build(config, steps_per_epoch=10)
        self.assertEqual(keras.config.dtype_policy().name, "float32")  # Not leaked to other models.
        layers = training._leaf_layers(model.base_model)  # pylint: disable=protected-access
        self.assertEqual(layers[2].compute_dtype, policy[6:])  # The first conv computes in 16 bits ...
        self.assertEqual(layers[-1].compute_dtype, "float32")  # ... the logits in float32.
        self.assertEqual(isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
                         policy == "mixed_float16")
        images = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype(np.float32)
        terms = model.compute_terms(tf.constant(images), tf.constant(np.arange(8) % 10), training=False, step=0)
        for name in ("loss", "cross_entropy", "consistency", "kl", "entropy"):
            self.assertEqual(terms[name].dtype, tf.float32, name)
        logs = model.train_on_batch(images, np.arange(8) % 10, return_dict=True)
        self.assertTrue(np.isfinite(logs["loss"]))

    def test_pretrained_model_keeps_body_and_replaces_head(self):
        path = os.path.join(self.get_temp_dir(), "pretrained.keras")
        source = models.get_architecture("lenet", "mnist")
        source.save(path)
        config = training.TrainConfig(model_dir="/unused", dataset="fashion_mnist", pretrained_model=path)
        model = training.build(config, 10)
        for new, old in zip(model.base_model.weights, source.weights):
            self.assertAllEqual(new, old)

        # A 5-class head cannot take the 10-class weights: it stays freshly initialized.
        inputs = keras.Input((28, 28, 1))
        other = keras.Model(inputs, models.lenet(5)(models.Normalization((0.5,), (0.5,))(inputs)))
        leaf = training._leaf_layers  # pylint: disable=protected-access
        for target, weights in zip(leaf(other)[:-1], leaf(source)[:-1]):
            target.set_weights(weights.get_weights())
        other_path = os.path.join(self.get_temp_dir(), "five.keras")
        other.save(other_path)
        model = training.build(training.TrainConfig(model_dir="/unused", pretrained_model=other_path), 10)
        new_layers = training._leaf_layers(model.base_model)  # pylint: disable=protected-access
        self.assertAllEqual(new_layers[2].weights[0], source.weights[0])  # conv1 copied
        self.assertEqual(model.base_model.output_shape, (None, 10))
        self.assertNotAllClose(new_layers[-1].weights[0][:, :5], other.weights[-2])  # head not copied

    def test_pretrained_model_of_another_architecture_is_refused(self):
        inputs = keras.Input((28, 28, 1))
        path = os.path.join(self.get_temp_dir(), "dense.keras")
        keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))).save(path)
        with self.assertRaisesRegex(ConfigError, "--pretrained_model=.*same --arch"):
            training.build(training.TrainConfig(model_dir="/unused", pretrained_model=path), 10)


class ObjectiveConfigTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("gaussian", dict(method="gaussian"), dict(num_noise=1)),
        ("consistency", dict(method="consistency"), dict(num_noise=2, lbd=10.0, eta=0.5, consistency_loss="default")),
        ("stability", dict(method="stability"), dict(num_noise=1, lbd=2.0)),
        ("smoothadv", dict(method="smoothadv"), dict(num_noise=1, epsilon=0.25, num_steps=10, warmup=1)),
        ("macer", dict(method="macer"), dict(num_noise=16, lbd=16.0, beta=16.0, gamma=8.0, deferred_epochs=0)),
        ("adv_consistency", dict(method="consistency", adv_training=True),
         dict(num_noise=2, lbd=10.0, eta=0.5, consistency_loss="default", epsilon=2.0, num_steps=4, warmup=10)),
        ("given", dict(method="consistency", num_noise=4, lbd=3.0),
         dict(num_noise=4, lbd=3.0, eta=0.5, consistency_loss="default")),
        # The authors' argparse defaults (code/train.py of jh-jeong/smoothmix); no bounds.
        ("smoothmix", dict(method="smoothmix"),
         dict(num_noise=1, eta=1.0, num_steps=8, warmup=10, attack_step=1.0, mix_step=0)),
        ("smoothmix_given", dict(method="smoothmix", num_noise=4, mix_step=1, maxnorm=2.0, maxnorm_s=0.5),
         dict(num_noise=4, eta=1.0, num_steps=8, warmup=10, attack_step=1.0, mix_step=1, maxnorm=2.0,
              maxnorm_s=0.5)),
    )
    def test_the_methods_defaults_and_nothing_else(self, given, expected):
        objective = training.ObjectiveConfig(sigma=0.5, **given)
        method_fields = ("num_noise", "lbd", "eta", "consistency_loss", "beta", "gamma", "deferred_epochs", "epsilon",
                         "num_steps", "warmup", "attack_step", "mix_step", "maxnorm", "maxnorm_s")
        self.assertEqual({name: getattr(objective, name) for name in method_fields
                          if getattr(objective, name) is not None}, expected)

    @parameterized.named_parameters(
        ("unused", dict(method="gaussian", lbd=1.0), "^--lbd is used only by --method=consistency or "
                                                     "--method=stability or --method=macer; remove it for "
                                                     "--method=gaussian$"),
        ("attack_field", dict(method="macer", num_steps=3), "--num_steps is used only by --method=smoothadv or "
                                                            "--method=smoothmix or --method=consistency "
                                                            "--adv_training"),
        ("adv_training", dict(method="stability", adv_training=True), "--adv_training combines SmoothAdv"),
        ("method", dict(method="mixup"), "--method='mixup' is unknown"),
        ("sigma", dict(method="gaussian", sigma=0.0), "--sigma must be > 0"),
        ("weight_decay", dict(method="gaussian", weight_decay=-1.0), "--weight_decay must be >= 0"),
        ("deferred", dict(method="macer", deferred_epochs=-1), "deferred_epochs must be >= 0"),
        ("attack_step", dict(method="smoothmix", attack_step=0.0), "^--attack_step must be > 0 "),
        ("smoothmix_steps", dict(method="smoothmix", num_steps=0), "^--num_steps must be >= 1, got 0$"),
        ("mix_step", dict(method="smoothmix", mix_step=2), "^--mix_step must be 0 .* or 1 .*, got 2$"),
        ("smoothmix_eta", dict(method="smoothmix", eta=-1.0), "^--eta must be >= 0, got -1.0$"),
        ("maxnorm", dict(method="smoothmix", maxnorm=0.0), "^--maxnorm must be > 0 "),
        ("maxnorm_s", dict(method="smoothmix", maxnorm_s=-0.5), "^--maxnorm_s must be > 0 "),
        ("smoothmix_warmup", dict(method="smoothmix", warmup=0), "^--warmup must be >= 1, got 0$"),
        ("smoothmix_lbd", dict(method="smoothmix", lbd=1.0), "^--lbd is used only by .*; remove it for "
                                                              "--method=smoothmix$"),
        ("smoothmix_epsilon", dict(method="smoothmix", epsilon=0.5), "^--epsilon is used only by "),
        ("smoothmix_beta", dict(method="smoothmix", beta=1.0), "^--beta is used only by --method=macer"),
        ("smoothmix_consistency_loss", dict(method="smoothmix", consistency_loss="kl"),
         "^--consistency_loss is used only by --method=consistency"),
        ("smoothmix_adv_training", dict(method="smoothmix", adv_training=True), "--adv_training combines SmoothAdv"),
        ("attack_step_smoothadv", dict(method="smoothadv", attack_step=1.0),
         "^--attack_step is used only by --method=smoothmix; remove it for --method=smoothadv$"),
        ("mix_step_consistency", dict(method="consistency", mix_step=0),
         "^--mix_step is used only by --method=smoothmix; remove it for --method=consistency$"),
        ("maxnorm_gaussian", dict(method="gaussian", maxnorm=1.0), "^--maxnorm is used only by --method=smoothmix"),
        ("maxnorm_s_macer", dict(method="macer", maxnorm_s=1.0), "^--maxnorm_s is used only by --method=smoothmix"),
    )
    def test_refuses(self, fields, message):
        with self.assertRaisesRegex(ConfigError, message):
            training.ObjectiveConfig(**{"sigma": 0.5, **fields})

    def test_adversarial_is_smoothadv_or_adv_training(self):
        adversarial = {method: training.ObjectiveConfig(method=method, sigma=0.5).adversarial
                       for method in training.METHODS}
        self.assertEqual(adversarial, {"gaussian": False, "consistency": False, "stability": False,
                                       "smoothadv": True, "macer": False, "smoothmix": False})
        self.assertTrue(training.ObjectiveConfig(method="consistency", sigma=0.5, adv_training=True).adversarial)


class TrainConfigTest(parameterized.TestCase):

    def test_records_its_objective_flat_by_flag_name(self):
        config = training.TrainConfig(model_dir="/m", objective=training.ObjectiveConfig(sigma=0.5, lbd=3.0))
        values = config.to_dict()
        self.assertEqual((values["sigma"], values["num_noise"], values["lbd"], values["eta"], values["beta"]),
                         (0.5, 2, 3.0, 0.5, None))
        self.assertNotIn("objective", values)
        self.assertNotIn("deferred_epochs", values)  # --deferred's, derived.
        self.assertEqual(training.TrainConfig.from_dict(values), config)
        with self.assertRaisesRegex(ConfigError, "unknown training config fields: nope"):
            training.TrainConfig.from_dict({**values, "nope": 1})
        self.assertEqual(config.sigma, 0.5)

    def test_deferred_macer_waits_for_the_first_learning_rate_drop(self):
        macer = training.ObjectiveConfig(method="macer")
        config = training.TrainConfig(model_dir="/m", objective=macer, deferred=True, lr_step_size=5)
        self.assertEqual(config.objective.deferred_epochs, 6)  # train_macer.py: while epoch <= lr_step_size
        self.assertEqual(dataclasses.replace(config, lr_step_size=9).objective.deferred_epochs, 10)
        self.assertEqual(training.TrainConfig(model_dir="/m", objective=macer).objective.deferred_epochs, 0)
        self.assertFalse(training.TrainConfig(model_dir="/m", objective=macer).deferred)
        with self.assertRaisesRegex(ConfigError, "^--deferred is used only by --method=macer; remove it for "
                                                 "--method=gaussian$"):
            training.TrainConfig(model_dir="/m", objective=training.ObjectiveConfig(method="gaussian"),
                                 deferred=False)
        with self.assertRaisesRegex(ConfigError, "^--deferred is used only by --method=macer; remove it for "
                                                 "--method=smoothmix$"):
            training.TrainConfig(model_dir="/m", objective=training.ObjectiveConfig(method="smoothmix"),
                                 deferred=True)

    def test_batch_split_needs_whole_chunks(self):
        objective = training.ObjectiveConfig(num_noise=4)
        self.assertEqual(training.TrainConfig(model_dir="/m", objective=objective, batch_size=64,
                                              batch_split=True).clean_batch_size, 16)
        with self.assertRaisesRegex(ConfigError, "^--batch_size=66 must be divisible by --num_noise=4 with "
                                                 "--batch_split$"):
            training.TrainConfig(model_dir="/m", objective=objective, batch_size=66, batch_split=True)


class FlagsTest(parameterized.TestCase):
    """TrainConfig.to_flags, the one way training flags are written (flags.txt, best.flags)."""

    def test_one_help_per_flag(self):
        # precision_policy is no flag: the run resolves it (PrecisionTest).
        names = {f.name for f in dataclasses.fields(training.TrainConfig)} - {"objective", "precision_policy"}
        names |= {f.name for f in dataclasses.fields(training.ObjectiveConfig) if f.name != "deferred_epochs"}
        self.assertEqual(set(cli.TRAIN_HELP), names)

    @parameterized.named_parameters(
        ("gaussian", dict(method="gaussian"), {}),
        ("consistency", dict(method="consistency", lbd=2.5, eta=0.1, consistency_loss="xent"), {}),
        ("stability", dict(method="stability", weight_decay=0.0), {}),
        ("smoothadv", dict(method="smoothadv", epsilon=255 / 256, num_steps=2), {}),
        ("macer", dict(method="macer", num_noise=4), {}),
        ("macer_deferred", dict(method="macer"), dict(deferred=True, lr_step_size=7)),
        ("adv_consistency", dict(method="consistency", adv_training=True, sigma=1 / 3), {}),
        ("smoothmix", dict(method="smoothmix", num_noise=4, num_steps=2, attack_step=0.5, eta=5.0), {}),
        ("smoothmix_bounded", dict(method="smoothmix", mix_step=1, maxnorm=2.0, maxnorm_s=1 / 3), {}),
        ("everything_else", {}, dict(dataset="cifar10", arch="cifar_resnet20", batch_split=True, certify_every=2,
                                     certify_alpha=1e-5, data_dir="/data dir/x", mock_data=True, strategy="mirrored",
                                     steps_per_execution=4, mixed_precision="mixed_bfloat16", jit_compile=True)),
    )
    def test_to_flags_parses_back_to_the_same_config(self, objective, fields):
        config = training.TrainConfig(model_dir="/runs/a run", objective=training.ObjectiveConfig(**objective),
                                      **fields)
        values = flags.FlagValues()
        holders = cli.define_flags(training.TrainConfig, cli.TRAIN_HELP, flag_values=values)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "flags.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config.to_flags())
        values(["train", f"--flagfile={path}"])
        self.assertEqual(cli.config_from_flags(training.TrainConfig, holders), config)

    def test_to_flags_lines(self):
        text = training.TrainConfig(model_dir="/m", objective=training.ObjectiveConfig(lbd=2.5, sigma=0.5),
                                    batch_size=64, train_examples=128, eval_examples=0).to_flags(exclude=("model_dir",))
        lines = text.splitlines()
        self.assertIn("--lbd=2.5", lines)
        self.assertIn("--noadv_training", lines)
        self.assertIn("--train_examples=128", lines)
        self.assertNotIn("--model_dir=/m", lines)
        self.assertFalse(any(line.startswith("--beta") for line in lines))  # None: not a flag of this method
        self.assertIn("--model_dir=/m", training.TrainConfig(model_dir="/m").to_flags().splitlines())

    def test_a_line_break_cannot_be_written(self):
        with self.assertRaisesRegex(ValueError, "--data_dir: .* holds a line break"):
            training.format_flags({"data_dir": "a\nb"})


AMX_CPU = precision.Capability("Intel(R) Xeon(R) Platinum 8480+", ("avx512_bf16", "amx_bf16"))
AVX2_CPU = precision.Capability("AMD EPYC 7B12", ())
AMPERE = precision.Capability(None, None, (precision.Gpu("NVIDIA A100-SXM4-40GB", (8, 0)),))


class PrecisionTest(parameterized.TestCase):
    """--mixed_precision: auto by default, resolved per machine at the run's start, kept when a run resumes."""

    def test_auto_is_the_default_and_unresolved_until_the_run_starts(self):
        config = training.TrainConfig(model_dir="/m")
        self.assertEqual((config.mixed_precision, config.precision_policy), ("auto", None))

    @parameterized.parameters(("none", "float32"), ("float32", "float32"), ("mixed_bfloat16", "mixed_bfloat16"),
                              ("mixed_float16", "mixed_float16"))
    def test_a_named_policy_is_fixed_at_construction(self, requested, policy):
        self.assertEqual(training.TrainConfig(model_dir="/m", mixed_precision=requested).precision_policy, policy)

    @parameterized.named_parameters(
        ("native_cpu", AMX_CPU, "mixed_bfloat16"), ("avx2_cpu", AVX2_CPU, "float32"), ("ampere", AMPERE,
                                                                                       "mixed_bfloat16"))
    def test_auto_resolves_for_the_machine(self, capability, policy):
        config, reason = training.resolve_precision(training.TrainConfig(model_dir="/m"), capability=capability)
        self.assertEqual(config.precision_policy, policy)
        self.assertEqual(reason, precision.resolve("auto", capability).reason)
        self.assertEqual(json.loads(config.to_json())["precision_policy"], policy)  # train_config.json keeps it.

    @parameterized.named_parameters(
        ("bfloat16_run_on_an_avx2_cpu", "mixed_bfloat16", AVX2_CPU, " (here auto would choose float32: "
                                                                    "CPU AMD EPYC 7B12: no native bfloat16"),
        ("float32_run_on_an_amx_cpu", "float32", AMX_CPU, " (here auto would choose mixed_bfloat16: "),
        ("same_machine", "mixed_bfloat16", AMX_CPU, ""))
    def test_a_resumed_auto_run_keeps_its_policy(self, started_in, capability, note):
        recorded = training.TrainConfig(model_dir="/m", precision_policy=started_in).to_dict()
        config, reason = training.resolve_precision(training.TrainConfig(model_dir="/m"), recorded, capability)
        self.assertEqual(config.precision_policy, started_in)
        self.assertTrue(reason.startswith(f"--mixed_precision=auto: resuming in {started_in}, the policy this run "
                                          f"started with{note}"), reason)

    def test_a_record_of_another_request_does_not_decide(self):
        # _check_model_dir then refuses the directory: another run.
        recorded = training.TrainConfig(model_dir="/m", mixed_precision="none").to_dict()
        config, _ = training.resolve_precision(training.TrainConfig(model_dir="/m"), recorded, AMX_CPU)
        self.assertEqual(config.precision_policy, "mixed_bfloat16")

    def test_a_record_older_than_the_policy_field(self):
        recorded = training.TrainConfig(model_dir="/m", mixed_precision="mixed_bfloat16").to_dict()
        del recorded["precision_policy"]
        config, _ = training.resolve_precision(training.TrainConfig(model_dir="/m", mixed_precision="mixed_bfloat16"),
                                               recorded, AVX2_CPU)
        self.assertEqual(config.precision_policy, "mixed_bfloat16")

    def test_a_preset_policy_is_kept_or_refused(self):
        # A search resolves auto once and gives each trial the policy.
        preset = training.TrainConfig(model_dir="/m", precision_policy="mixed_bfloat16")
        config, reason = training.resolve_precision(preset, None, AVX2_CPU)
        self.assertEqual(config, preset)
        self.assertIn("mixed_bfloat16, resolved before this run", reason)
        recorded = training.TrainConfig(model_dir="/m", precision_policy="float32").to_dict()
        with self.assertRaisesRegex(ConfigError, "^--model_dir=/m computes in float32, recorded when the run "
                                                 "started; it cannot resume in mixed_bfloat16$"):
            training.resolve_precision(preset, recorded, AMX_CPU)

    @parameterized.named_parameters(
        ("unknown_request", dict(mixed_precision="bfloat16"), "^--mixed_precision='bfloat16' is unknown; choose one "
                                                              "of auto, none, float32, mixed_bfloat16, mixed_float16$"),
        ("unknown_policy", dict(precision_policy="bfloat16"), "^precision_policy='bfloat16' is unknown"),
        ("contradiction", dict(mixed_precision="none", precision_policy="mixed_bfloat16"),
         "^precision_policy=mixed_bfloat16 contradicts --mixed_precision=none, which computes in float32$"))
    def test_bad_values(self, fields, message):
        with self.assertRaisesRegex(ConfigError, message):
            training.TrainConfig(model_dir="/m", **fields)

    def test_flags_file_names_the_choice_and_parses_back_to_auto(self):
        config, _ = training.resolve_precision(training.TrainConfig(model_dir="/m"), capability=AMX_CPU)
        text = config.to_flags()
        self.assertEqual(text.splitlines()[0], "# --mixed_precision=auto chose mixed_bfloat16 for this run; "
                                               "--mixed_precision=mixed_bfloat16 asks for it on any machine")
        self.assertIn("--mixed_precision=auto", text.splitlines())
        self.assertNotIn("precision_policy", text.replace("# --mixed_precision", ""))
        values = flags.FlagValues()
        holders = cli.define_flags(training.TrainConfig, cli.TRAIN_HELP, flag_values=values)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "flags.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        values(["train", f"--flagfile={path}"])
        # The flags repeat the request; a new run resolves it on its machine.
        self.assertEqual(cli.config_from_flags(training.TrainConfig, holders),
                         dataclasses.replace(config, precision_policy=None))


@pytest.mark.slow
class PrecisionRunTest(tf.test.TestCase):
    """train() under a stubbed capability: what it prints, records and computes in, and resuming elsewhere."""

    def _train(self, model_dir, capability, **fields):
        config = training.TrainConfig(model_dir=model_dir, train_examples=64, eval_examples=0, batch_size=32,
                                      **{"epochs": 1, **fields})
        out = io.StringIO()
        with redirect_stdout(out):
            training.train(config, capability=capability)
        return out.getvalue()

    def test_auto_run_records_its_policy_and_keeps_it_on_another_machine(self):
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        printed = self._train(model_dir, AMX_CPU)
        self.assertIn(precision.resolve("auto", AMX_CPU).reason + "\n", printed)
        with open(os.path.join(model_dir, training.TRAIN_CONFIG_FILE), encoding="utf-8") as f:
            record = json.load(f)
        self.assertEqual((record["mixed_precision"], record["precision_policy"]), ("auto", "mixed_bfloat16"))
        with open(os.path.join(model_dir, training.FLAGS_FILE), encoding="utf-8") as f:
            self.assertTrue(f.readline().startswith("# --mixed_precision=auto chose mixed_bfloat16"))
        self.assertEqual(models.model_compute_dtype(models.load_base_model(model_dir)), "bfloat16")

        # Resumed for one more epoch where auto would choose float32: still bfloat16.
        printed = self._train(model_dir, AVX2_CPU, epochs=2)
        self.assertIn("--mixed_precision=auto: resuming in mixed_bfloat16, the policy this run started with (here "
                      "auto would choose float32", printed)
        self.assertIn("Resuming from", printed)
        self.assertEqual(models.model_compute_dtype(models.load_base_model(model_dir)), "bfloat16")
        with open(os.path.join(model_dir, training.TRAIN_CONFIG_FILE), encoding="utf-8") as f:
            self.assertEqual(json.load(f)["precision_policy"], "mixed_bfloat16")

        # Asking for another policy is asking for another run.
        with self.assertRaisesRegex(ConfigError, "holds a different run.*--mixed_precision: 'float32' here, 'auto' "
                                                 "there"):
            self._train(model_dir, AMX_CPU, epochs=2, mixed_precision="float32")

    def test_auto_on_a_machine_without_bfloat16_trains_in_float32(self):
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        printed = self._train(model_dir, AVX2_CPU)
        self.assertIn("--mixed_precision=auto chose float32: CPU AMD EPYC 7B12: no native bfloat16", printed)
        self.assertEqual(models.model_compute_dtype(models.load_base_model(model_dir)), "float32")


class LearningRateTest(tf.test.TestCase):

    def test_step_schedule_like_torch_steplr(self):
        config = training.TrainConfig(model_dir="/unused", epochs=90, lr=0.01, lr_step_size=30, lr_gamma=0.1)
        schedule = training._learning_rate(config, steps_per_epoch=10)  # pylint: disable=protected-access
        # torch StepLR: lr * gamma ** (epoch // 30), epoch = step // 10.
        for step, expected in ((0, 0.01), (299, 0.01), (300, 0.001), (599, 0.001), (600, 1e-4), (899, 1e-4)):
            self.assertAllClose(float(schedule(step)), expected, rtol=1e-6, msg=f"step {step}")


if __name__ == "__main__":
    tf.test.main()
