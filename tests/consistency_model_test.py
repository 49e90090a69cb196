"""consistency_model.py: ConsistencyModel's train_step/test_step against a numpy reference, and its checkpoints.

The base model is linear (logits = x W + b) with set weights, so the whole
objective can be written again in float64 numpy, independently of
tf_consreg.losses, and its gradient taken by central finite differences. One
SGD step (lr, no momentum) must then move the weights by -lr * gradient, and
the reported metrics must equal the numpy values.
"""

import os

import numpy as np
import scipy.special
import scipy.stats
import tensorflow as tf
from absl.testing import parameterized

import keras

from tf_consreg import consistency_model
from tf_consreg import noise
from tf_consreg import run_config

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


def first_step_copies(images, m, sigma, seed):
    """The m noisy copies the first training step (iteration 0 of the training stream) draws, [m * B, pixels] float64."""
    seeds = noise.example_seeds(noise.step_seed(seed, 1, 0), len(images))
    x = tf.constant(images)
    noisy = (noise.tile_copies(x, m) + noise.gaussian_noise(x, m, sigma, seeds)).numpy()
    return noisy.reshape(m * len(images), -1).astype(np.float64)


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
        objective = run_config.ObjectiveConfig(method=method, sigma=sigma, num_noise=m, weight_decay=weight_decay,
                                               **method_fields)
        model = consistency_model.ConsistencyModel(_linear_base(weights, bias), objective, seed=seed)
        model.compile(optimizer=keras.optimizers.SGD(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        logs = model.train_on_batch(images, labels, return_dict=True)

        noisy = first_step_copies(images, m, sigma, seed)
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
        model = consistency_model.ConsistencyModel(
            _linear_base(weights, bias),
            run_config.ObjectiveConfig(method="consistency", sigma=0.5, num_noise=2, lbd=1.0, eta=0.5))
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
        objective = run_config.ObjectiveConfig(
            method="smoothmix", sigma=sigma, num_noise=m, num_steps=num_steps, attack_step=step_size,
            mix_step=mix_step, maxnorm=maxnorm, maxnorm_s=maxnorm_s, eta=eta, warmup=warmup,
            weight_decay=weight_decay)
        model = consistency_model.ConsistencyModel(_linear_base(weights, bias), objective, seed=seed)
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
        model = consistency_model.ConsistencyModel(_linear_base(rng.normal(size=(D, C)), np.zeros(C)),
                                                   run_config.ObjectiveConfig(sigma=0.25, **kwargs), seed=4)
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
        model = consistency_model.ConsistencyModel(base, run_config.ObjectiveConfig(sigma=0.5, **fields), seed=1)
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


if __name__ == "__main__":
    tf.test.main()
