"""Tests for tf_consreg.losses against the authors' outputs and closed forms."""

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
