"""Tests of tf_consreg.engine: the in-graph statistics and decisions against scipy, closed forms and stats.py.

The safe side of every rounding is checked against mpmath in safe_rounding_test.py.
"""

from absl.testing import parameterized
import numpy as np
from scipy import stats as scipy_stats
import tensorflow as tf

from tf_consreg import engine
from tf_consreg import stats

_PYTHON_FUNCTION_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


class InGraphStatisticsTest(parameterized.TestCase):
    """The in-graph statistics against scipy and closed forms."""

    @staticmethod
    def _grid():
        ks, ns = [], []
        for n in (1, 2, 7, 10, 100, 1000, 10000, 100000):
            for k in sorted({0, 1, 2, n // 3, n // 2, n - 2, n - 1, n}):
                if 0 <= k <= n:
                    ks.append(k)
                    ns.append(n)
        return np.array(ks), np.array(ns)

    @parameterized.parameters(1e-6, 0.001, 0.01, 0.05, 0.3)
    def test_clopper_pearson_matches_scipy_beta_ppf(self, alpha):
        k, n = self._grid()
        got = engine.clopper_pearson_lower(k, n, alpha).numpy()
        expected = np.where(k > 0, scipy_stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
        np.testing.assert_array_equal(got[k == 0], 0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)

    def test_clopper_pearson_closed_forms(self):
        # k = n: P(all n successes) = p^n = alpha. k = 1: Beta(1, n) quantile 1 - (1 - alpha)^(1/n).
        n = np.array([1, 10, 1000, 100000])
        np.testing.assert_allclose(engine.clopper_pearson_lower(n, n, 0.001).numpy(), 0.001 ** (1 / n), rtol=1e-9)
        np.testing.assert_allclose(engine.clopper_pearson_lower(np.ones_like(n), n, 0.001).numpy(),
                                   1 - 0.999 ** (1 / n), rtol=1e-7)

    @parameterized.parameters(1e-6, 0.001, 0.05, 0.3)
    def test_clopper_pearson_upper_matches_scipy_beta_isf(self, alpha):
        k, n = self._grid()
        got = engine.clopper_pearson_upper(k, n, alpha).numpy()
        expected = np.where(k < n, scipy_stats.beta.isf(alpha, k + 1, np.maximum(n - k, 1)), 1.0)
        np.testing.assert_array_equal(got[k == n], 1.0)
        # 1 - x loses relative precision near 0: the bound is accurate to 1e-6 of it plus 1e-15.
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-15)
        np.testing.assert_allclose(got, stats.clopper_pearson_upper(k, n, alpha), rtol=1e-6, atol=1e-15)

    def test_clopper_pearson_upper_closed_form_and_tensor_level(self):
        # k = 0: P(no success) = (1 - p)^n = alpha at the bound, so 1 - alpha^(1/n).
        n = np.array([1, 10, 1000, 100000])
        level = tf.constant(0.001, tf.float64)
        np.testing.assert_allclose(engine.clopper_pearson_upper(np.zeros_like(n), n, level).numpy(),
                                   1 - 0.001 ** (1 / n), rtol=1e-9)

    def test_settled_matches_stats(self):
        # Bounds around 1/2 and around Phi(r / sigma) for r = 0.25, sigma = 0.5 (Phi(0.5) = 0.6915).
        rng = np.random.default_rng(2)
        low = rng.uniform(0.3, 0.8, 2000)
        high = np.minimum(low + rng.uniform(0, 0.2, 2000), 1.0)
        radius = rng.choice([0.1, 0.25, 0.4], 2000)
        got = engine.settled(low, high, radius[:, np.newaxis], 0.5).numpy()  # One radius per image: [B, 1].
        expected = np.array([stats.settled(low[i:i + 1], high[i:i + 1], [radius[i]], 0.5)[0] for i in range(2000)])
        np.testing.assert_array_equal(got, expected)
        self.assertTrue(0.2 < got.mean() < 0.8)  # Both answers occur.

    def test_binomial_test_matches_scipy_binomtest(self):
        k, n = self._grid()
        got = engine.binomial_test_two_sided(k, n).numpy()
        expected = np.array([scipy_stats.binomtest(int(a), int(b), 0.5).pvalue for a, b in zip(k, n)])
        not_tiny = expected > 1e-12
        np.testing.assert_allclose(got[not_tiny], expected[not_tiny], rtol=1e-6)
        np.testing.assert_allclose(got[~not_tiny], expected[~not_tiny], rtol=0, atol=1e-12)

    def test_binomial_test_near_the_middle(self):
        # Around n/2, where the two tails meet; odd and even n.
        for n in (99, 100, 9999, 10000, 100000):
            k = np.arange(n // 2 - 200, n // 2 + 201) if n > 400 else np.arange(n + 1)
            got = engine.binomial_test_two_sided(k, np.full_like(k, n)).numpy()
            expected = np.array([scipy_stats.binomtest(int(a), n, 0.5).pvalue for a in k])
            np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"n={n}")

    def test_binomial_test_closed_forms(self):
        # 10 heads of 10: 2 * 2^-10. Equal counts: 1. No trials: 1.
        got = engine.binomial_test_two_sided([10, 5, 0], [10, 10, 0]).numpy()
        np.testing.assert_allclose(got, [2.0 / 1024, 1.0, 1.0], rtol=1e-12)

    def test_certified_radius_is_sigma_times_normal_quantile(self):
        p = np.array([0.5, 0.6, 0.9, 0.999, 1 - 1e-7])
        np.testing.assert_allclose(engine.certified_radius(p, 0.5).numpy(), 0.5 * scipy_stats.norm.ppf(p),
                                   rtol=1e-12, atol=1e-15)

    def test_statistics_trace_with_core_ops_only(self):
        fn = tf.function(lambda k, n: (engine.clopper_pearson_lower(k, n, 0.001),
                                       engine.clopper_pearson_upper(k, n, 0.001),
                                       engine.binomial_test_two_sided(k, n)))
        graph = fn.get_concrete_function(tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64)).graph
        ops = {op.type for op in graph.get_operations()}
        self.assertFalse(ops & _PYTHON_FUNCTION_OPS)

    def test_decisions_trace_with_core_ops_only(self):
        counts = tf.TensorSpec([None, 3], tf.int64)
        fn = tf.function(lambda selection, estimation, level: (
            engine.certify_from_counts(selection, estimation, 100, level, 0.5),
            engine.predict_from_counts(estimation, level),
            engine.certify_stage(estimation[:, 0], 100, level, 0.5, [0.25, 0.5]),
            engine.stage_levels(level, 3)))
        graph = fn.get_concrete_function(counts, counts, tf.TensorSpec([], tf.float64)).graph
        self.assertFalse({op.type for op in graph.get_operations()} & _PYTHON_FUNCTION_OPS)


class BoundsTest(parameterized.TestCase):
    """The joint bounds, the slack and the decisions against stats.py."""

    def test_joint_bounds_are_the_single_ones(self):
        k, n = InGraphStatisticsTest._grid()  # pylint: disable=protected-access
        lower, upper = engine.clopper_pearson_bounds(k, n, 0.01)
        # The same bisection on the same inputs: bit for bit.
        np.testing.assert_array_equal(lower.numpy(), engine.clopper_pearson_lower(k, n, 0.01).numpy())
        np.testing.assert_array_equal(upper.numpy(), engine.clopper_pearson_upper(k, n, 0.01).numpy())

    def test_slack_widens_the_bounds_outward(self):
        k, n = InGraphStatisticsTest._grid()  # pylint: disable=protected-access
        lower, upper = engine.clopper_pearson_bounds(k, n, 0.01)
        lower, upper = lower.numpy(), upper.numpy()
        for slack in (1e-12, 1e-3, 0.3):
            wide_lower, wide_upper = engine.clopper_pearson_bounds(k, n, 0.01, slack=slack)
            wide_lower, wide_upper = wide_lower.numpy(), wide_upper.numpy()
            # max(0, L - s), rounded down: never above the exact L - s (the float
            # subtraction is within half an ulp, the rounding takes one more).
            self.assertTrue(np.all(wide_lower <= np.maximum(lower - slack, 0.0)))
            self.assertTrue(np.all((wide_lower == 0.0) | (wide_lower - (lower - slack) >= -2 * np.spacing(lower))))
            self.assertTrue(np.all(wide_upper >= np.minimum(upper + slack, 1.0)))
            self.assertTrue(np.all(wide_upper <= 1.0) & np.all(wide_lower >= 0.0))
            self.assertTrue(np.all((wide_upper == 1.0) | (wide_upper - (upper + slack) <= 2 * np.spacing(upper + slack))))
        # The slack may be one per count.
        got = engine.clopper_pearson_lower([50, 50], [100, 100], 0.01, slack=[0.0, 0.1]).numpy()
        self.assertEqual(got[0], engine.clopper_pearson_lower(50, 100, 0.01).numpy())
        self.assertLess(got[1], got[0] - 0.1)

    def test_certify_from_counts_matches_stats(self):
        rng = np.random.default_rng(5)
        selection = rng.multinomial(100, [0.7, 0.2, 0.1], size=300)
        estimation = rng.multinomial(1000, [0.55, 0.3, 0.15], size=300)
        estimation[:5, 0] = [1000, 999, 0, 500, 501]  # The edges k = n, n - 1, 0 and the middle.
        estimation[:5, 1:] = 0
        classes, radii, p_lower = engine.certify_from_counts(selection, estimation, 1000, 0.001, 0.5)
        expected = stats.certify_from_counts(selection, estimation, n=1000, alpha=0.001, sigma=0.5)
        np.testing.assert_array_equal(classes.numpy(), expected[0])
        # Both are safely rounded with the margins of their own functions, each
        # within a relative 1e-9 of the exact value on this grid (n <= 1000).
        np.testing.assert_allclose(p_lower.numpy(), expected[2], rtol=1e-9, atol=0)
        np.testing.assert_allclose(radii.numpy(), expected[1], rtol=1e-8, atol=0)
        self.assertTrue(np.all(radii.numpy()[classes.numpy() == -1] == 0.0))
        self.assertTrue(0 < (classes.numpy() == -1).sum() < 300)  # Both answers occur.

    def test_radius_is_zero_at_one_half_and_positive_above(self):
        classes, radii = engine.certify_decision([3, 4, 5], [0.5, np.nextafter(0.5, 1), 0.4999], 1.0)
        np.testing.assert_array_equal(classes.numpy(), [3, 4, -1])
        self.assertEqual(radii.numpy()[0], 0.0)
        self.assertGreater(radii.numpy()[1], 0.0)
        self.assertEqual(radii.numpy()[2], 0.0)

    def test_predict_from_counts_matches_stats(self):
        rng = np.random.default_rng(6)
        counts = rng.multinomial(200, [0.4, 0.35, 0.25], size=500)
        counts[:4] = [[0, 0, 0], [100, 100, 0], [0, 7, 7], [200, 0, 0]]  # No votes, ties, unanimity.
        for alpha in (0.001, 0.05):
            got = engine.predict_from_counts(counts, alpha).numpy()
            np.testing.assert_array_equal(got, stats.predict_from_counts(counts, alpha=alpha))
        self.assertEqual(list(got[:4]), [-1, -1, -1, 0])

    def test_settled_broadcasts_a_list_of_radii_like_stats(self):
        rng = np.random.default_rng(7)
        low = rng.uniform(0.3, 0.95, 1000)
        high = np.minimum(low + rng.uniform(0, 0.2, 1000), 1.0)
        radii = [0.1, 0.25, 0.6]
        got = engine.settled(low, high, radii, 0.5).numpy()
        np.testing.assert_array_equal(got, stats.settled(low, high, radii, 0.5))
        # One radius per image, [B, 1], is the list of one radius for each image.
        for radius in radii:
            per_image = engine.settled(low, high, np.full((1000, 1), radius), 0.5).numpy()
            np.testing.assert_array_equal(per_image, engine.settled(low, high, [radius], 0.5).numpy())
        self.assertTrue(0.1 < got.mean() < 0.9)

    def test_certify_stage_is_bounds_and_settled(self):
        successes = np.array([10, 300, 500, 990])
        p_lower, done = engine.certify_stage(successes, 1000, 0.0005, 0.5, [0.25])
        lower, upper = engine.clopper_pearson_bounds(successes, 1000, 0.0005)
        np.testing.assert_array_equal(p_lower.numpy(), lower.numpy())
        np.testing.assert_array_equal(done.numpy(), engine.settled(lower, upper, [0.25], 0.5).numpy())
        # 1% and 30% are surely below 1/2, 99% surely above Phi(0.5); 50% straddles 1/2.
        np.testing.assert_array_equal(done.numpy(), [True, True, False, True])

    def test_to_float32_down_is_the_largest_float32_not_above(self):
        x = np.concatenate([np.random.default_rng(8).uniform(0, 3, 1000), [0.0, 0.5, 1.0, 1 - 1e-12, np.inf]])
        got = engine.to_float32_down(x).numpy()
        self.assertEqual(got.dtype, np.float32)
        self.assertTrue(np.all(got.astype(np.float64) <= x))
        finite = np.isfinite(x)
        up = np.nextafter(got[finite], np.float32(np.inf)).astype(np.float64)
        self.assertTrue(np.all(up > x[finite]))
        np.testing.assert_array_equal(got[-5:-1], [0.0, 0.5, 1.0, np.nextafter(np.float32(1), np.float32(0))])

    @parameterized.parameters((0.001, 1), (0.001, 2), (0.001, 8), (0.05, 3), (1e-6, 13))
    def test_stage_levels_are_stats_bit_for_bit(self, alpha, num_stages):
        got = engine.stage_levels(alpha, num_stages).numpy()
        self.assertEqual(tuple(got.tolist()), stats.stage_levels(alpha, num_stages))
        # The union bound's budget: they sum to alpha (up to the sum's rounding, K ulps).
        self.assertLessEqual(abs(got.sum() - alpha), num_stages * np.spacing(alpha))


if __name__ == "__main__":
    tf.test.main()
