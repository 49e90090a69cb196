"""Tests of tf_consreg.graph_stats: the in-graph statistics against scipy and stats.py."""

from absl.testing import parameterized
import numpy as np
from scipy import stats as scipy_stats
import tensorflow as tf

from tf_consreg import graph_stats
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
        got = graph_stats.clopper_pearson_lower(k, n, alpha).numpy()
        expected = np.where(k > 0, scipy_stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
        np.testing.assert_array_equal(got[k == 0], 0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)

    def test_clopper_pearson_closed_forms(self):
        # k = n: P(all n successes) = p^n = alpha. k = 1: Beta(1, n) quantile 1 - (1 - alpha)^(1/n).
        n = np.array([1, 10, 1000, 100000])
        np.testing.assert_allclose(graph_stats.clopper_pearson_lower(n, n, 0.001).numpy(), 0.001 ** (1 / n), rtol=1e-9)
        np.testing.assert_allclose(graph_stats.clopper_pearson_lower(np.ones_like(n), n, 0.001).numpy(),
                                   1 - 0.999 ** (1 / n), rtol=1e-7)

    @parameterized.parameters(1e-6, 0.001, 0.05, 0.3)
    def test_clopper_pearson_upper_matches_scipy_beta_isf(self, alpha):
        k, n = self._grid()
        got = graph_stats.clopper_pearson_upper(k, n, alpha).numpy()
        expected = np.where(k < n, scipy_stats.beta.isf(alpha, k + 1, np.maximum(n - k, 1)), 1.0)
        np.testing.assert_array_equal(got[k == n], 1.0)
        # 1 - x loses relative precision near 0: the bound is accurate to 1e-6 of it plus 1e-15.
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-15)
        np.testing.assert_allclose(got, stats.clopper_pearson_upper(k, n, alpha), rtol=1e-6, atol=1e-15)

    def test_clopper_pearson_upper_closed_form_and_tensor_level(self):
        # k = 0: P(no success) = (1 - p)^n = alpha at the bound, so 1 - alpha^(1/n).
        n = np.array([1, 10, 1000, 100000])
        level = tf.constant(0.001, tf.float64)
        np.testing.assert_allclose(graph_stats.clopper_pearson_upper(np.zeros_like(n), n, level).numpy(),
                                   1 - 0.001 ** (1 / n), rtol=1e-9)

    def test_settled_matches_stats(self):
        # Bounds around 1/2 and around Phi(r / sigma) for r = 0.25, sigma = 0.5 (Phi(0.5) = 0.6915).
        rng = np.random.default_rng(2)
        low = rng.uniform(0.3, 0.8, 2000)
        high = np.minimum(low + rng.uniform(0, 0.2, 2000), 1.0)
        radius = rng.choice([0.1, 0.25, 0.4], 2000)
        got = graph_stats.settled(low, high, radius, 0.5).numpy()
        expected = np.array([stats.settled(low[i:i + 1], high[i:i + 1], [radius[i]], 0.5)[0] for i in range(2000)])
        np.testing.assert_array_equal(got, expected)
        self.assertTrue(0.2 < got.mean() < 0.8)  # Both answers occur.

    def test_binomial_test_matches_scipy_binomtest(self):
        k, n = self._grid()
        got = graph_stats.binomial_test_two_sided(k, n).numpy()
        expected = np.array([scipy_stats.binomtest(int(a), int(b), 0.5).pvalue for a, b in zip(k, n)])
        not_tiny = expected > 1e-12
        np.testing.assert_allclose(got[not_tiny], expected[not_tiny], rtol=1e-6)
        np.testing.assert_allclose(got[~not_tiny], expected[~not_tiny], rtol=0, atol=1e-12)

    def test_binomial_test_near_the_middle(self):
        # Around n/2, where the two tails meet; odd and even n.
        for n in (99, 100, 9999, 10000, 100000):
            k = np.arange(n // 2 - 200, n // 2 + 201) if n > 400 else np.arange(n + 1)
            got = graph_stats.binomial_test_two_sided(k, np.full_like(k, n)).numpy()
            expected = np.array([scipy_stats.binomtest(int(a), n, 0.5).pvalue for a in k])
            np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"n={n}")

    def test_binomial_test_closed_forms(self):
        # 10 heads of 10: 2 * 2^-10. Equal counts: 1. No trials: 1.
        got = graph_stats.binomial_test_two_sided([10, 5, 0], [10, 10, 0]).numpy()
        np.testing.assert_allclose(got, [2.0 / 1024, 1.0, 1.0], rtol=1e-12)

    def test_certified_radius_is_sigma_times_normal_quantile(self):
        p = np.array([0.5, 0.6, 0.9, 0.999, 1 - 1e-7])
        np.testing.assert_allclose(graph_stats.certified_radius(p, 0.5).numpy(), 0.5 * scipy_stats.norm.ppf(p),
                                   rtol=1e-12, atol=1e-15)

    def test_statistics_trace_with_core_ops_only(self):
        fn = tf.function(lambda k, n: (graph_stats.clopper_pearson_lower(k, n, 0.001),
                                       graph_stats.clopper_pearson_upper(k, n, 0.001),
                                       graph_stats.binomial_test_two_sided(k, n)))
        graph = fn.get_concrete_function(tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64)).graph
        ops = {op.type for op in graph.get_operations()}
        self.assertFalse(ops & _PYTHON_FUNCTION_OPS)


if __name__ == "__main__":
    tf.test.main()
