"""Tests for tf_consreg.losses against the authors' outputs, float64 numpy references and closed forms."""

import json
import os

from absl.testing import parameterized
import numpy as np
from scipy import special, stats
import tensorflow as tf

from tf_consreg import losses

# The authors' PyTorch outputs (see testdata/SOURCE.md).
_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "reference_losses.json")


def _load_cases():
    with open(_FIXTURES, encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    named = []
    for i, case in enumerate(cases):
        name = f"{i:02d}_{case['kind']}" + (f"_{case['loss']}_m{case['m']}" if "loss" in case else "")
        named.append((name, case))
    return named


_CASES = _load_cases()


def _run_case(case, dtype, reduction="mean"):
    """Our function on a fixture case; returns the values to compare and the expected ones."""
    if case["kind"] == "consistency":
        logits = [tf.constant(z, dtype) for z in case["logits"]]
        got = losses.consistency_loss(logits, case["lbd"], case["eta"], case["loss"], reduction=reduction)
        return [got], [case["expected"]]
    if case["kind"] == "stability":
        got = losses.stability_loss(tf.constant(case["clean_logits"], dtype),
                                    tf.constant(case["noisy_logits"], dtype), reduction=reduction)
        return [got], [case["expected"]]
    out = losses.macer_loss(tf.constant(case["logits"], dtype), tf.constant(case["targets"]),
                            sigma=case["sigma"], lbd=case["lbd"], beta=case["beta"],
                            gamma=case["gamma"], reduction=reduction)
    keys = ("classification", "robustness", "total")
    return [out[k] for k in keys], [case["expected_" + k] for k in keys]


def _macer_reference(logits, labels, sigma, lbd, beta, gamma):
    """MACER's objective from the paper's formula with numpy/scipy, batch-normalized.

    Robustness: sigma/2 * sum over correctly classified examples of
    max(0, gamma - (Phi^-1(q1) - Phi^-1(q2))) with q the mean softmax of
    beta * logits, divided by the batch size like the classification NLL.
    """
    p = special.softmax(logits, axis=2).mean(axis=1)
    classification = -np.log(p[np.arange(len(labels)), labels] + 1e-10)
    q = special.softmax(beta * logits, axis=2).mean(axis=1)
    order = np.argsort(-q, axis=1)
    q1 = q[np.arange(len(q)), order[:, 0]]
    q2 = q[np.arange(len(q)), order[:, 1]]
    margin = stats.norm.ppf(q1) - stats.norm.ppf(q2)
    hinge = np.where(order[:, 0] == labels, np.maximum(0.0, gamma - margin), 0.0)
    robustness = sigma / 2 * hinge
    return classification.mean(), robustness.mean(), (classification + lbd * robustness).mean(), margin


class FixtureTest(tf.test.TestCase, parameterized.TestCase):
    """Outputs of the authors' PyTorch functions (float64) in testdata/reference_losses.json."""

    @parameterized.named_parameters(_CASES)
    def test_matches_authors_float64(self, case):
        got, expected = _run_case(case, tf.float64)
        for g, e in zip(got, expected):
            self.assertEqual(g.dtype, tf.float64)
            # 1e-6 is the contract; float64 agrees far tighter, and 1e-10
            # catches hyperparameters rounded through float32 (0.1 -> 0.10000000149).
            self.assertAllClose(g, e, rtol=1e-10, atol=1e-12)

    @parameterized.named_parameters(_CASES)
    def test_matches_authors_float32(self, case):
        got, expected = _run_case(case, tf.float32)
        for g, e in zip(got, expected):
            self.assertEqual(g.dtype, tf.float32)
            self.assertAllClose(g, e, rtol=1e-5, atol=1e-5)

    @parameterized.named_parameters(_CASES)
    def test_per_example_reduction_averages_to_mean(self, case):
        per_example, _ = _run_case(case, tf.float64, reduction="none")
        mean, _ = _run_case(case, tf.float64, reduction="mean")
        for p, m in zip(per_example, mean):
            self.assertEqual(p.shape.rank, 1)
            self.assertAllClose(tf.reduce_mean(p), m, rtol=1e-12)

    def test_fixture_covers_every_kind_and_loss(self):
        kinds = {c["kind"] for _, c in _CASES}
        names = {c["loss"] for _, c in _CASES if c["kind"] == "consistency"}
        self.assertEqual(kinds, {"consistency", "stability", "macer"})
        self.assertEqual(names, set(losses.CONSISTENCY_LOSSES))


class ConsistencyClosedFormTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.rng = np.random.default_rng(0)

    @parameterized.product(m=[1, 2, 4], eta=[0.0, 0.5, 2.0])
    def test_identical_copies_give_eta_times_entropy(self, m, eta):
        logits = self.rng.normal(scale=3.0, size=(5, 7))
        p = special.softmax(logits, axis=1)
        entropy = stats.entropy(p, axis=1)  # natural log, as the paper
        copies = [tf.constant(logits)] * m
        terms = losses.consistency_terms(copies)
        self.assertAllClose(terms["kl"], np.zeros(5), atol=1e-12)
        self.assertAllClose(terms["entropy"], entropy, rtol=1e-12)
        got = losses.consistency_loss(copies, lbd=10.0, eta=eta, reduction="none")
        self.assertAllClose(got, eta * entropy, rtol=1e-10, atol=1e-12)

    def test_kl_matches_scipy(self):
        logits = self.rng.normal(scale=2.0, size=(3, 4, 6))  # m=3, B=4, C=6
        p = special.softmax(logits, axis=2)
        p_bar = p.mean(axis=0)
        kl = np.mean([stats.entropy(p_bar, p_i, axis=1) for p_i in p], axis=0)
        terms = losses.consistency_terms(list(logits))
        self.assertAllClose(terms["kl"], kl, rtol=1e-10)
        self.assertAllClose(terms["entropy"], stats.entropy(p_bar, axis=1), rtol=1e-10)
        self.assertNotIn("mse", terms)  # only defined for m == 2
        self.assertAllClose(losses.consistency_loss(list(logits), lbd=2.0, loss="kl"), 2.0 * kl.mean())

    @parameterized.parameters(0.5, 3.0, 20.0)
    def test_xent_equals_default_when_eta_equals_lbd(self, lbd):
        logits = list(self.rng.normal(scale=2.0, size=(2, 8, 10)))
        self.assertAllClose(losses.consistency_loss(logits, lbd, eta=lbd, loss="xent"),
                            losses.consistency_loss(logits, lbd, eta=lbd, loss="default"), rtol=1e-12)

    def test_mse_with_known_probabilities(self):
        # softmax(log p) = p, so the probabilities are exact:
        # ||[.25, .25, .5] - [.5, .25, .25]||^2 = .0625 + 0 + .0625 = .125; identical rows give 0.
        p1 = np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
        p2 = np.array([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]])
        got = losses.consistency_loss([np.log(p1), np.log(p2)], lbd=4.0, loss="mse", reduction="none")
        self.assertAllClose(got, [4.0 * 0.125, 0.0], atol=1e-12)

    def test_entropy_clamp_matches_authors(self):
        # The authors' entropy clamps p_bar at 1e-20 inside the log only, so a
        # probability of 1e-30 contributes -1e-30 * log(1e-20), not 0 log 0 = 0.
        p = np.array([[1.0 - 1e-30, 1e-30]])
        entropy = losses.consistency_terms([tf.constant(np.log(p))])["entropy"]
        expected = -(p[0, 0] * np.log(p[0, 0]) + 1e-30 * np.log(1e-20))
        self.assertAllClose(entropy, [expected], rtol=1e-10, atol=0)

    @parameterized.product(loss=list(losses.CONSISTENCY_LOSSES), scale=[1e3, 1e4])
    def test_gradients_finite_with_large_logits_float32(self, loss, scale):
        signs = self.rng.choice([-1.0, 1.0], size=(2, 4, 5))
        logits = [tf.Variable(s * scale, dtype=tf.float32) for s in signs]
        with tf.GradientTape() as tape:
            value = losses.consistency_loss(logits, lbd=10.0, eta=0.5, loss=loss)
        grads = tape.gradient(value, logits)
        self.assertTrue(np.isfinite(value.numpy()))
        for g in grads:
            self.assertAllEqual(np.isfinite(g.numpy()), np.ones(g.shape, bool))

    def test_half_precision_is_computed_in_float32(self):
        logits = [tf.constant(self.rng.normal(size=(3, 4)), tf.float16) for _ in range(2)]
        value = losses.consistency_loss(logits, lbd=1.0)
        self.assertEqual(value.dtype, tf.float32)
        self.assertTrue(np.isfinite(value.numpy()))

    def test_traces_with_tensor_hyperparameters(self):
        logits = list(self.rng.normal(size=(2, 3, 4)).astype(np.float32))

        @tf.function
        def fn(lbd, eta):
            return losses.consistency_loss(logits, lbd, eta)

        terms = losses.consistency_terms(logits)
        expected = tf.reduce_mean(3.0 * terms["kl"] + 0.25 * terms["entropy"])
        self.assertAllClose(fn(tf.constant(3.0), tf.constant(0.25)), expected, rtol=1e-6)

    def test_works_in_tf_function_with_unknown_batch(self):
        spec = tf.TensorSpec([None, 4], tf.float32)

        @tf.function(input_signature=[spec, spec])
        def fn(a, b):
            return losses.consistency_loss([a, b], 1.0, loss="mse", reduction="none")

        logits = self.rng.normal(size=(2, 3, 4)).astype(np.float32)
        self.assertEqual(fn(logits[0], logits[1]).shape, [3])


class StabilityTest(tf.test.TestCase):

    def test_equal_logits_give_entropy(self):
        logits = np.random.default_rng(1).normal(size=(4, 5))
        got = losses.stability_loss(logits, logits, reduction="none")
        self.assertAllClose(got, stats.entropy(special.softmax(logits, axis=1), axis=1), rtol=1e-10)

    def test_cross_entropy_against_clean_soft_labels(self):
        rng = np.random.default_rng(2)
        clean, noisy = rng.normal(size=(2, 3, 4))
        expected = -(special.softmax(clean, axis=1) * special.log_softmax(noisy, axis=1)).sum(1)
        self.assertAllClose(losses.stability_loss(clean, noisy), expected.mean(), rtol=1e-12)

    def test_clean_side_is_not_detached(self):
        # The authors' train_stab.py backpropagates through softmax(clean).
        rng = np.random.default_rng(3)
        clean = tf.Variable(rng.normal(size=(3, 4)))
        noisy = tf.Variable(rng.normal(size=(3, 4)))
        with tf.GradientTape() as tape:
            value = losses.stability_loss(clean, noisy)
        grad_clean, grad_noisy = tape.gradient(value, [clean, noisy])
        self.assertGreater(np.abs(grad_clean.numpy()).max(), 1e-3)
        self.assertGreater(np.abs(grad_noisy.numpy()).max(), 1e-3)

    def test_gradients_finite_with_large_logits_float32(self):
        clean = tf.Variable([[1e3, -1e3, 0.0]], dtype=tf.float32)
        noisy = tf.Variable([[-1e3, 1e3, 0.0]], dtype=tf.float32)
        with tf.GradientTape() as tape:
            value = losses.stability_loss(clean, noisy)
        for g in tape.gradient(value, [clean, noisy]):
            self.assertTrue(np.all(np.isfinite(g.numpy())))


class MacerTest(tf.test.TestCase, parameterized.TestCase):

    # B=5 inputs, K=3 copies, C=4 classes, chosen so that the batch has
    # correct examples inside the hinge (margin < gamma), a correct example
    # outside it (margin > gamma) and a misclassified one.
    _LOGITS = np.array([
        [[2.0, 1.0, 0.0, -1.0], [1.5, 1.2, 0.3, 0.0], [1.0, 0.8, -0.5, 0.2]],
        [[0.1, 0.3, 0.2, 0.0], [0.0, 0.5, 0.1, 0.2], [0.2, 0.4, 0.0, -0.1]],
        [[6.0, 0.0, 0.0, 0.0], [5.0, 1.0, 0.0, -1.0], [7.0, 0.5, 0.0, 0.0]],
        [[0.0, 0.0, 3.0, 0.0], [0.0, 1.0, 2.0, 0.0], [0.5, 0.0, 2.5, 0.0]],
        [[1.0, 0.9, 0.0, 0.0], [0.2, 1.1, 0.0, 0.3], [0.9, 0.8, 0.1, 0.0]],
    ])
    _LABELS = np.array([0, 1, 0, 3, 1])
    _HPARAMS = dict(sigma=0.5, lbd=3.0, beta=2.0, gamma=4.0)

    def test_nonzero_robustness_matches_numpy_reference(self):
        cl, rl, total, margin = _macer_reference(self._LOGITS, self._LABELS, **self._HPARAMS)
        # The case really exercises the hinge: 3 correct examples, one of them
        # beyond gamma, one misclassified example, and a positive term.
        q = special.softmax(self._HPARAMS["beta"] * self._LOGITS, axis=2).mean(axis=1)
        correct = q.argmax(axis=1) == self._LABELS
        self.assertEqual(correct.sum(), 4)
        self.assertEqual((correct & (margin < self._HPARAMS["gamma"])).sum(), 3)
        self.assertGreater(rl, 0.1)

        for dtype, rtol in ((tf.float64, 1e-10), (tf.float32, 1e-5)):
            out = losses.macer_loss(tf.constant(self._LOGITS, dtype), self._LABELS, **self._HPARAMS)
            self.assertAllClose(out["classification"], cl, rtol=rtol)
            self.assertAllClose(out["robustness"], rl, rtol=rtol)
            self.assertAllClose(out["total"], total, rtol=rtol)

    def test_per_example_robustness_is_zero_outside_hinge(self):
        _, _, _, margin = _macer_reference(self._LOGITS, self._LABELS, **self._HPARAMS)
        out = losses.macer_loss(self._LOGITS, self._LABELS, reduction="none", **self._HPARAMS)
        q = special.softmax(self._HPARAMS["beta"] * self._LOGITS, axis=2).mean(axis=1)
        inside = (q.argmax(axis=1) == self._LABELS) & (margin <= self._HPARAMS["gamma"])
        self.assertAllEqual(out["robustness"].numpy() > 0, inside)
        self.assertAllClose(out["robustness"][inside],
                            self._HPARAMS["sigma"] / 2 * (self._HPARAMS["gamma"] - margin[inside]))

    def test_robustness_gradient_sign_and_finiteness(self):
        # Large logits make q1 round to 1 in float32 (ndtri = inf): such rows
        # are dropped as in the authors' code and must not give NaN gradients.
        logits = np.concatenate([self._LOGITS, np.full((1, 3, 4), -1e3)], axis=0)
        logits[-1, :, 2] = 1e3
        labels = np.append(self._LABELS, 2)
        var = tf.Variable(logits, dtype=tf.float32)
        with tf.GradientTape() as tape:
            out = losses.macer_loss(var, labels, **self._HPARAMS)
        grad = tape.gradient(out["total"], var).numpy()
        self.assertTrue(np.all(np.isfinite(grad)))
        self.assertAllEqual(grad[-1, :, [0, 1, 3]], np.zeros((3, 3)))

    @parameterized.named_parameters(
        ("sigma", dict(sigma=0.0)), ("lbd", dict(lbd=-1.0)), ("beta", dict(beta=0.0)),
        ("gamma", dict(gamma=-0.5)))
    def test_bad_hyperparameters_raise(self, override):
        kwargs = {**self._HPARAMS, **override}
        (name,) = override
        with self.assertRaisesRegex(ValueError, f"^{name}:"):
            losses.macer_loss(self._LOGITS, self._LABELS, **kwargs)

    def test_bad_shapes_raise(self):
        with self.assertRaisesRegex(ValueError, "^logits:"):
            losses.macer_loss(self._LOGITS[:, 0], self._LABELS, **self._HPARAMS)
        with self.assertRaisesRegex(ValueError, "^labels:"):
            losses.macer_loss(self._LOGITS, self._LABELS[:3], **self._HPARAMS)
        with self.assertRaisesRegex(ValueError, "^labels:"):
            losses.macer_loss(self._LOGITS, self._LABELS.astype(np.float32), **self._HPARAMS)


def _smoothmix_reference(start_logits, mixed_logits, labels, mix_weights, eta):
    """SmoothMix's objective per example from its formulas with numpy/scipy (float64).

    Arrays [m, B, C]; returns (cross_entropy, mixup, total, correct), each [B]:
    CE averaged over the m copies; p_bar the copies' mean softmax; the target
    (1 - lam) p_bar + lam / C; KL(target || softmax(mixed)) as scipy's
    rel_entr summed over classes, averaged over copies, kept where
    argmax p_bar is the label.
    """
    _, batch, num_classes = start_logits.shape
    cross_entropy = -special.log_softmax(start_logits, axis=2)[:, np.arange(batch), labels].mean(axis=0)
    p_bar = special.softmax(start_logits, axis=2).mean(axis=0)
    correct = (np.argmax(p_bar, axis=1) == labels).astype(np.float64)
    lam = mix_weights[:, None]
    target = (1 - lam) * p_bar + lam / num_classes
    kl = special.rel_entr(target[None], special.softmax(mixed_logits, axis=2)).sum(axis=2).mean(axis=0)
    mixup = correct * kl
    return cross_entropy, mixup, cross_entropy + eta * mixup, correct


class _OneHiddenLayer:
    """f(x) = tanh(x W1 + b1) W2 + b2 with fixed float64 weights, in numpy and in TensorFlow."""

    def __init__(self, rng, dim, hidden, classes):
        self.weights = [rng.normal(size=(dim, hidden)), 0.1 * rng.normal(size=hidden),
                        rng.normal(size=(hidden, classes)), 0.1 * rng.normal(size=classes)]

    def numpy(self, x, weights=None):
        w1, b1, w2, b2 = self.weights if weights is None else weights
        return np.tanh(x @ w1 + b1) @ w2 + b2

    @staticmethod
    def tf(x, weights):
        w1, b1, w2, b2 = weights
        return tf.tanh(x @ w1 + b1) @ w2 + b2


class SmoothMixTest(tf.test.TestCase, parameterized.TestCase):
    """smoothmix_loss on a one-hidden-layer model against the float64 numpy objective."""

    M, B, DIM, CLASSES = 3, 8, 6, 4

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(7)
        self.model = _OneHiddenLayer(rng, self.DIM, 5, self.CLASSES)
        self.images = rng.uniform(size=(self.B, self.DIM))  # the start points s
        self.ends = rng.uniform(size=(self.B, self.DIM))  # the walk's ends
        self.noises = rng.normal(scale=0.5, size=(self.M, self.B, self.DIM))
        self.mix_weights = rng.uniform(0, 0.5, size=self.B)  # the authors' U[0, 1/2)
        p_bar = special.softmax(self._start_logits(self.model.weights), axis=2).mean(axis=0)
        top2 = np.sort(p_bar, axis=1)[:, -2:]
        # The mask must not flip under the finite differences' perturbations (~1e-5).
        self.assertGreater((top2[:, 1] - top2[:, 0]).min(), 1e-3)
        predicted = np.argmax(p_bar, axis=1)
        # Half the examples predicted right (in the mixup's mask), half wrong.
        self.labels = np.where(np.arange(self.B) % 2 == 0, predicted, (predicted + 1) % self.CLASSES)
        self.eta = 5.0

    def _mixed(self):
        lam = self.mix_weights[:, None]
        return (1 - lam) * self.images + lam * self.ends

    def _start_logits(self, weights):
        return np.stack([self.model.numpy(self.images + n, weights) for n in self.noises])

    def _mixed_logits(self, weights):
        return np.stack([self.model.numpy(self._mixed() + n, weights) for n in self.noises])

    def _reference_total(self, weights):
        return _smoothmix_reference(self._start_logits(weights), self._mixed_logits(weights), self.labels,
                                    self.mix_weights, self.eta)[2].mean()

    def _ours(self, weights, reduction="mean"):
        start = [self.model.tf(tf.constant(self.images + n), weights) for n in self.noises]
        mixed = [self.model.tf(tf.constant(self._mixed() + n), weights) for n in self.noises]
        return losses.smoothmix_loss(start, mixed, self.labels, self.mix_weights, eta=self.eta,
                                     reduction=reduction)

    @parameterized.parameters("mean", "none")
    def test_matches_numpy_objective(self, reduction):
        expected = _smoothmix_reference(self._start_logits(self.model.weights),
                                        self._mixed_logits(self.model.weights), self.labels,
                                        self.mix_weights, self.eta)
        got = self._ours([tf.constant(w) for w in self.model.weights], reduction)
        # Both sides compute the same float64 quantities in other orders (rel_entr
        # vs xlogy, log_softmax vs sparse cross-entropy): a few ulps of terms of size
        # <= |log q| ~ 5 over C = 4 classes and m = 3 copies, <= 1e-14; eta = 5 scales
        # the mixup's error in the total. 1e-12 leaves a 10x margin and would catch
        # any float32 step (1e-7).
        for key, value in zip(("cross_entropy", "mixup", "total", "correct"), expected):
            self.assertEqual(got[key].dtype, tf.float64)
            self.assertAllClose(got[key], value.mean() if reduction == "mean" else value, rtol=0, atol=1e-12)
        in_mask = (np.arange(self.B) % 2 == 0).astype(np.float64)
        self.assertAllEqual(got["correct"], in_mask if reduction == "none" else in_mask.mean())

    def test_weight_gradient_matches_finite_differences(self):
        weights = [tf.Variable(w) for w in self.model.weights]
        with tf.GradientTape() as tape:
            total = self._ours(weights)["total"]
        grads = tape.gradient(total, weights)
        h = 1e-5
        for index, (value, grad) in enumerate(zip(self.model.weights, grads)):
            numeric = np.zeros_like(value)
            for position in np.ndindex(value.shape):
                shifted = [w.copy() for w in self.model.weights]
                shifted[index][position] += h
                up = self._reference_total(shifted)
                shifted[index][position] -= 2 * h
                numeric[position] = (up - self._reference_total(shifted)) / (2 * h)
            # Central differences: rounding ~ 10 ulps of the objective (~3) / h
            # = 10 * 2.2e-16 * 3 / 1e-5 ~ 7e-10, truncation h^2 |J'''| / 6 ~ 2e-10 for
            # |J'''| <= 10; 1e-8 leaves a 10x margin. A gradient that stopped at the
            # target (the authors' is not detached) is off by up to 0.2 here.
            self.assertAllClose(grad, numeric, rtol=0, atol=1e-8)

    def test_target_passes_gradient_to_the_start_logits(self):
        start = [tf.constant(z) for z in self._start_logits(self.model.weights)]
        mixed = [tf.constant(z) for z in self._mixed_logits(self.model.weights)]
        with tf.GradientTape() as tape:
            tape.watch(start)
            mixup = losses.smoothmix_loss(start, mixed, self.labels, self.mix_weights, eta=1.0,
                                          reduction="none")["mixup"]
            total = tf.reduce_sum(mixup)
        grad = np.stack(tape.gradient(total, start))  # [m, B, C]
        per_example = np.linalg.norm(grad, axis=(0, 2))
        in_mask = np.arange(self.B) % 2 == 0
        self.assertAllGreater(per_example[in_mask], 1e-3)
        self.assertAllEqual(per_example[~in_mask], np.zeros((~in_mask).sum()))

    def test_identical_copies_without_mixing_give_zero_mixup(self):
        logits = [tf.constant(self._start_logits(self.model.weights)[0])]
        out = losses.smoothmix_loss(logits, logits, self.labels, np.zeros(self.B), eta=3.0, reduction="none")
        # lam = 0 and one copy: target = softmax(z) = q, so KL = 0 up to rounding.
        self.assertAllClose(out["mixup"], np.zeros(self.B), rtol=0, atol=1e-15)
        self.assertAllClose(out["total"], out["cross_entropy"], rtol=0, atol=1e-15)

    def test_full_mixing_towards_uniform_predictions_gives_zero_mixup(self):
        start = list(self._start_logits(self.model.weights))
        uniform = [np.zeros((self.B, self.CLASSES))] * self.M
        out = losses.smoothmix_loss(start, uniform, self.labels, np.ones(self.B), eta=1.0, reduction="none")
        self.assertAllClose(out["mixup"], np.zeros(self.B), rtol=0, atol=1e-15)

    def test_masked_examples_count_in_the_mean(self):
        start = list(self._start_logits(self.model.weights))
        mixed = list(self._mixed_logits(self.model.weights))
        per_example = losses.smoothmix_loss(start, mixed, self.labels, self.mix_weights, eta=2.0,
                                            reduction="none")
        mean = losses.smoothmix_loss(start, mixed, self.labels, self.mix_weights, eta=2.0)
        for key in ("cross_entropy", "mixup", "total", "correct"):
            self.assertAllClose(mean[key], np.mean(per_example[key]), rtol=1e-15, atol=0)
        # Only the correctly predicted half gets the mixup term; the mean divides by all B.
        self.assertAllEqual(np.asarray(per_example["mixup"])[1::2], np.zeros(self.B // 2))
        self.assertAllGreater(np.asarray(per_example["mixup"])[0::2], 0.0)

    def test_half_precision_is_computed_in_float32(self):
        start = [tf.constant(z, tf.float16) for z in self._start_logits(self.model.weights)]
        mixed = [tf.constant(z, tf.float16) for z in self._mixed_logits(self.model.weights)]
        out = losses.smoothmix_loss(start, mixed, self.labels, self.mix_weights.astype(np.float16), eta=1.0)
        self.assertEqual(out["total"].dtype, tf.float32)
        expected = _smoothmix_reference(self._start_logits(self.model.weights),
                                        self._mixed_logits(self.model.weights), self.labels,
                                        self.mix_weights, 1.0)[2].mean()
        # float16 rounding of logits (~5e-4 relative on values ~3) and weights: ~1e-2.
        self.assertAllClose(out["total"], expected, rtol=0, atol=2e-2)

    def test_traces_once_with_tensor_eta_and_unknown_batch(self):
        spec = tf.TensorSpec([None, self.CLASSES], tf.float64)

        @tf.function(input_signature=[[spec] * self.M, [spec] * self.M, tf.TensorSpec([None], tf.int64),
                                      tf.TensorSpec([None], tf.float64), tf.TensorSpec([], tf.float64)])
        def fn(start, mixed, labels, weights, eta):
            return losses.smoothmix_loss(start, mixed, labels, weights, eta=eta)["total"]

        start = list(self._start_logits(self.model.weights))
        mixed = list(self._mixed_logits(self.model.weights))
        for eta in (0.0, 1.0, 5.0):
            expected = _smoothmix_reference(np.stack(start), np.stack(mixed), self.labels, self.mix_weights,
                                            eta)[2].mean()
            self.assertAllClose(fn(start, mixed, self.labels, self.mix_weights, eta), expected, rtol=0,
                                atol=1e-12)
        self.assertEqual(fn.experimental_get_tracing_count(), 1)

    @parameterized.named_parameters(
        ("negative_eta", dict(eta=-1.0), "^eta:"),
        ("reduction", dict(reduction="sum"), "^reduction:"),
        ("empty_start", dict(start_logits=[]), "^start_logits:"),
        ("stacked_mixed", dict(mixed_logits=tf.zeros((2, 3, 4))), "^mixed_logits:"),
        ("m_mismatch", dict(mixed_logits=[np.zeros((3, 4))] * 3), "^mixed_logits:.*m=2"),
        ("class_mismatch", dict(mixed_logits=[np.zeros((3, 5))] * 2), "^mixed_logits:"),
        ("dtype_mismatch", dict(mixed_logits=[np.zeros((3, 4), np.float32)] * 2), "^mixed_logits:"),
        ("start_rank", dict(start_logits=[np.zeros((3, 4, 1))] * 2), r"^start_logits\[0\]:"),
        ("float_labels", dict(labels=np.zeros(3)), "^labels:"),
        ("label_batch", dict(labels=np.zeros(4, np.int64)), "^labels:"),
        ("weights_batch", dict(mix_weights=np.zeros(4)), "^mix_weights:"),
        ("integer_weights", dict(mix_weights=np.zeros(3, np.int32)), "^mix_weights:"),
        ("weights_above_one", dict(mix_weights=np.array([0.1, 1.5, 0.2])), r"^mix_weights: must lie in \[0, 1\]"),
        ("negative_weights", dict(mix_weights=np.array([-0.1, 0.5, 0.2])), r"^mix_weights: must lie in \[0, 1\]"),
    )
    def test_bad_arguments_raise(self, override, pattern):
        kwargs = dict(start_logits=[np.zeros((3, 4))] * 2, mixed_logits=[np.ones((3, 4))] * 2,
                      labels=np.zeros(3, np.int64), mix_weights=np.full(3, 0.25), eta=1.0)
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, pattern):
            losses.smoothmix_loss(**kwargs)


class BadArgumentsTest(tf.test.TestCase, parameterized.TestCase):

    _LOGITS = [np.zeros((2, 3)), np.ones((2, 3))]

    @parameterized.named_parameters(
        ("unknown_loss", dict(loss="js"), "^loss:"),
        ("unknown_reduction", dict(reduction="sum"), "^reduction:"),
        ("negative_lbd", dict(lbd=-0.1), "^lbd:"),
        ("nan_lbd", dict(lbd=float("nan")), "^lbd:"),
        ("negative_eta", dict(eta=-1.0), "^eta:"),
        ("negative_tensor_eta", dict(eta=tf.constant(-1.0)), "^eta:"),
        ("empty", dict(logits=[]), "^logits:"),
        ("mse_needs_two", dict(logits=_LOGITS * 2, loss="mse"), "^logits:.*m must be 2"),
        ("shape_mismatch", dict(logits=[np.zeros((2, 3)), np.zeros((2, 4))]), "^logits:.*shape"),
        ("batch_mismatch", dict(logits=[np.zeros((2, 3)), np.zeros((3, 3))]), "^logits:.*shape"),
        ("rank", dict(logits=[np.zeros((2, 3, 1))]), r"^logits\[0\]:"),
        ("dtype_mismatch", dict(logits=[np.zeros((2, 3)), np.zeros((2, 3), np.float32)]), "^logits:.*dtype"),
        ("integer_logits", dict(logits=[np.zeros((2, 3), np.int32)]), r"^logits\[0\]:"),
        ("stacked_tensor", dict(logits=tf.zeros((2, 2, 3))), "^logits:.*tf.unstack"),
    )
    def test_consistency_raises(self, override, pattern):
        kwargs = {"logits": self._LOGITS, "lbd": 1.0, **override}
        with self.assertRaisesRegex(ValueError, pattern):
            losses.consistency_loss(**kwargs)

    def test_stability_raises(self):
        with self.assertRaisesRegex(ValueError, "^noisy_logits:"):
            losses.stability_loss(np.zeros((2, 3)), np.zeros((2, 4)))
        with self.assertRaisesRegex(ValueError, "^clean_logits:"):
            losses.stability_loss(np.zeros((2, 3, 1)), np.zeros((2, 3)))
        with self.assertRaisesRegex(ValueError, "^reduction:"):
            losses.stability_loss(np.zeros((2, 3)), np.zeros((2, 3)), reduction="sum")


if __name__ == "__main__":
    tf.test.main()
