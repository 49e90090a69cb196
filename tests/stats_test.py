"""Tests for tf_consreg.stats against statsmodels, scipy and closed forms (no TensorFlow)."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats.proportion import proportion_confint

from tf_consreg import stats

_TRIALS = (1, 2, 7, 100, 1000, 100000)
_ALPHAS = (0.001, 0.01, 0.05, 0.3)


def _grid():
    """(k, n, alpha) with the edges k = 0, 1, n - 1, n and a few inner points."""
    for n, alpha in itertools.product(_TRIALS, _ALPHAS):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            yield k, n, alpha


class ClopperPearsonTest(parameterized.TestCase):

    def test_matches_statsmodels_beta_interval_on_grid(self):
        # Cohen et al.'s bound: the lower end of the two-sided 1 - 2 alpha interval.
        for k, n, alpha in _grid():
            expected = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]
            self.assertAlmostEqual(stats.clopper_pearson_lower(k, n, alpha), expected, places=12,
                                   msg=f"k={k} n={n} alpha={alpha}")

    def test_vectorized_equals_scalar(self):
        ks, ns, alphas = zip(*[(k, n, a) for k, n, a in _grid() if a == 0.001])
        got = stats.clopper_pearson_lower(np.array(ks), np.array(ns), 0.001)
        self.assertEqual(got.shape, (len(ks),))
        for value, k, n in zip(got, ks, ns):
            self.assertEqual(value, stats.clopper_pearson_lower(k, n, 0.001))

    def test_defining_tail_property(self):
        # Independent of the beta quantile: the exact bound p_L solves
        # P(Binomial(n, p_L) >= k) = alpha for 0 < k.
        for k, n, alpha in _grid():
            if k == 0:
                continue
            p_l = stats.clopper_pearson_lower(k, n, alpha)
            self.assertAlmostEqual(scipy_stats.binom.sf(k - 1, n, p_l), alpha, delta=1e-9 + 1e-6 * alpha)

    def test_edges_in_closed_form(self):
        # k = 0: nothing to bound; k = n: P(all n successes) = p^n = alpha.
        self.assertEqual(stats.clopper_pearson_lower(0, 50, 0.01), 0.0)
        self.assertAlmostEqual(stats.clopper_pearson_lower(50, 50, 0.01), 0.01 ** (1 / 50), places=12)
        self.assertAlmostEqual(stats.clopper_pearson_lower(1, 1, 0.2), 0.2, places=12)

    def test_monotone_in_successes(self):
        bounds = stats.clopper_pearson_lower(np.arange(101), 100, 0.001)
        self.assertTrue(np.all(np.diff(bounds) > 0))

    @parameterized.named_parameters(
        ("alpha_zero", 5, 10, 0.0, "alpha"),
        ("alpha_one", 5, 10, 1.0, "alpha"),
        ("alpha_nan", 5, 10, float("nan"), "alpha"),
        ("no_trials", 0, 0, 0.01, "trials"),
        ("too_many_successes", 11, 10, 0.01, "successes"),
        ("negative_successes", -1, 10, 0.01, "successes"),
        ("fractional_successes", 2.5, 10, 0.01, "successes"),
    )
    def test_bad_arguments(self, k, n, alpha, word):
        with self.assertRaisesRegex(ValueError, word):
            stats.clopper_pearson_lower(k, n, alpha)


class RadiusTest(parameterized.TestCase):

    @parameterized.parameters((0.5, 0.25, 0.0), (0.8413447460685429, 0.5, 0.5), (0.9772498680518208, 1.0, 2.0))
    def test_closed_form(self, p, sigma, expected):
        # Phi(1) = 0.8413..., Phi(2) = 0.9772...
        self.assertAlmostEqual(stats.certified_radius(p, sigma), expected, places=9)

    def test_vectorized(self):
        np.testing.assert_allclose(stats.certified_radius(np.array([0.5, 0.975]), 2.0),
                                   [0.0, 2 * 1.959963984540054], rtol=1e-12)

    def test_authors_mnist_log_value(self):
        # The authors' logs print 0.953 for sigma = 0.25, nA = n = 100,000, alpha = 0.001.
        p = stats.clopper_pearson_lower(100000, 100000, 0.001)
        self.assertEqual(f"{stats.certified_radius(p, 0.25):.3}", "0.953")

    @parameterized.parameters((0.7, 0.0, "sigma"), (0.7, -1.0, "sigma"), (1.5, 0.25, "p_lower"),
                              (float("nan"), 0.25, "p_lower"))
    def test_bad_arguments(self, p, sigma, word):
        with self.assertRaisesRegex(ValueError, word):
            stats.certified_radius(p, sigma)


class BinomialTestTest(parameterized.TestCase):

    def test_symmetric_closed_form(self):
        # For p = 1/2 the two-sided p-value is min(1, 2 P(X <= min(k, n - k))).
        for k, n, _ in _grid():
            expected = min(1.0, 2 * scipy_stats.binom.cdf(min(k, n - k), n, 0.5))
            self.assertAlmostEqual(stats.binomial_test_pvalue(k, n), expected, places=10, msg=f"k={k} n={n}")

    def test_vectorized_shape(self):
        got = stats.binomial_test_pvalue(np.array([[0, 5], [10, 3]]), 10)
        self.assertEqual(got.shape, (2, 2))
        self.assertAlmostEqual(got[0, 0], 2 * 0.5 ** 10)
        self.assertEqual(got[0, 1], 1.0)

    @parameterized.parameters((3, 2, 0.5, "successes"), (1, 2, 0.0, "p"), (1, 0, 0.5, "trials"))
    def test_bad_arguments(self, k, n, p, word):
        with self.assertRaisesRegex(ValueError, word):
            stats.binomial_test_pvalue(k, n, p)


class DecisionsTest(absltest.TestCase):

    def test_certify_from_counts(self):
        selection = np.array([[90, 10, 0], [10, 90, 0], [40, 60, 0], [100, 0, 0]])
        # Row 0: guess 0, 1000/1000 in estimation. Row 1: guess 1 but the
        # estimation favours class 0 -> bound < 1/2 -> abstain. Row 2: guess 1,
        # 500/1000 -> bound < 1/2 -> abstain. Row 3: guess 0, 900/1000.
        estimation = np.array([[1000, 0, 0], [900, 100, 0], [500, 500, 0], [900, 50, 50]])
        classes, radii, p_lower = stats.certify_from_counts(selection, estimation, alpha=0.001, sigma=0.5)
        np.testing.assert_array_equal(classes, [0, -1, -1, 0])
        expected_p = [0.001 ** (1 / 1000), proportion_confint(100, 1000, alpha=0.002, method="beta")[0],
                      proportion_confint(500, 1000, alpha=0.002, method="beta")[0],
                      proportion_confint(900, 1000, alpha=0.002, method="beta")[0]]
        np.testing.assert_allclose(p_lower, expected_p, rtol=1e-10)
        np.testing.assert_allclose(radii, [0.5 * scipy_stats.norm.ppf(expected_p[0]), 0.0, 0.0,
                                           0.5 * scipy_stats.norm.ppf(expected_p[3])], rtol=1e-10)

    def test_predict_from_counts(self):
        counts = np.array([[50, 50, 0], [0, 100, 0], [30, 40, 30], [0, 0, 20]])
        # Tie -> p = 1; 100 vs 0 -> p = 2^-99; 40 vs 30 -> p ~ 0.28; 20 vs 0 -> p = 2^-19.
        np.testing.assert_array_equal(stats.predict_from_counts(counts, alpha=0.001), [-1, 1, -1, 2])

    def test_bad_shapes(self):
        with self.assertRaisesRegex(ValueError, "counts"):
            stats.certify_from_counts(np.zeros((2, 3)), np.zeros((3, 3)), alpha=0.01, sigma=1.0)
        with self.assertRaisesRegex(ValueError, "counts"):
            stats.predict_from_counts(np.zeros((2, 1), int), alpha=0.01)

    def test_module_needs_no_tensorflow(self):
        # Loaded as a lone file, because the package's __init__ may import Keras.
        import subprocess  # pylint: disable=import-outside-toplevel
        import sys  # pylint: disable=import-outside-toplevel
        code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('s', sys.argv[1]); "
                "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
                "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", code, stats.__file__], check=False)
        self.assertEqual(result.returncode, 0)

if __name__ == "__main__":
    absltest.main()
