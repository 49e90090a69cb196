"""Tests for tf_consreg.stats against statsmodels, scipy and closed forms (no TensorFlow)."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats.proportion import proportion_confint

from tf_consreg import certify_spec
from tf_consreg import stats

_TRIALS = (1, 2, 7, 100, 1000, 100000)
_ALPHAS = (0.001, 0.01, 0.05, 0.3)


def _grid():
    """(k, n, alpha) with the edges k = 0, 1, n - 1, n and a few inner points."""
    for n, alpha in itertools.product(_TRIALS, _ALPHAS):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            yield k, n, alpha


def _safe_rounding_gap(k: int, n: int, alpha: float) -> float:
    """How far `stats.clopper_pearson_lower(k, n, alpha)` may lie below a nearest-rounded reference.

    The safe bound is moved to where beta.cdf is alpha (1 - 2 c), c =
    `stats.beta_cdf_error_bound`: 2 c alpha / pdf below the quantile to
    first order (3, for Newton's second-order overshoot); the reference
    itself (statsmodels' beta.ppf, measured within 18 eps) adds 32 eps of it.
    """
    if k == 0:
        return 0.0
    a, b = k, n - k + 1
    x = scipy_stats.beta.ppf(alpha, a, b)
    c = stats.beta_cdf_error_bound(np.float64(a), np.float64(b), x)
    return 3 * c * alpha / scipy_stats.beta.pdf(x, a, b) + 32 * np.finfo(np.float64).eps * x


class ClopperPearsonTest(parameterized.TestCase):

    def test_matches_statsmodels_beta_interval_on_grid(self):
        # Cohen et al.'s bound: the lower end of the two-sided 1 - 2 alpha interval,
        # within the safe rounding's gap (tests/safe_rounding_test.py checks its side).
        for k, n, alpha in _grid():
            expected = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]
            self.assertLessEqual(abs(stats.clopper_pearson_lower(k, n, alpha) - expected),
                                 _safe_rounding_gap(k, n, alpha), msg=f"k={k} n={n} alpha={alpha}")

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

    def test_symmetric_matches_scipy_binomtest(self):
        # p = 1/2 takes a vectorized closed form; scipy's exact test is the reference.
        for k, n, _ in _grid():
            expected = scipy_stats.binomtest(k, n, 0.5).pvalue
            self.assertAlmostEqual(stats.binomial_test_pvalue(k, n), expected, places=10, msg=f"k={k} n={n}")
        ks = np.arange(0, 1001, 7)
        np.testing.assert_allclose(stats.binomial_test_pvalue(ks, 1000),
                                   [scipy_stats.binomtest(int(k), 1000, 0.5).pvalue for k in ks],
                                   rtol=1e-9, atol=1e-300)

    def test_other_p_matches_scipy_binomtest(self):
        self.assertAlmostEqual(stats.binomial_test_pvalue(3, 20, 0.3), scipy_stats.binomtest(3, 20, 0.3).pvalue,
                               places=12)

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
        classes, radii, p_lower = stats.certify_from_counts(selection, estimation, n=1000, alpha=0.001, sigma=0.5)
        np.testing.assert_array_equal(classes, [0, -1, -1, 0])
        expected_p = [0.001 ** (1 / 1000), proportion_confint(100, 1000, alpha=0.002, method="beta")[0],
                      proportion_confint(500, 1000, alpha=0.002, method="beta")[0],
                      proportion_confint(900, 1000, alpha=0.002, method="beta")[0]]
        np.testing.assert_allclose(p_lower, expected_p, rtol=1e-10)
        np.testing.assert_allclose(radii, [0.5 * scipy_stats.norm.ppf(expected_p[0]), 0.0, 0.0,
                                           0.5 * scipy_stats.norm.ppf(expected_p[3])], rtol=1e-10)

    def test_certify_from_counts_counts_samples_of_no_class_as_failures(self):
        # 900 of 1000 samples voted for class 0 and 100 for no class (their
        # logits were NaN, smoothing.sample_counts): the bound is that of
        # 900 successes in 1000 trials, not of 900 in 900 (which would be
        # 0.001^(1/900) = 0.9923 > p_A <= 0.9).
        _, _, p_lower = stats.certify_from_counts(np.array([[10, 0]]), np.array([[900, 0]]), n=1000, alpha=0.001,
                                                  sigma=0.5)
        np.testing.assert_allclose(p_lower, proportion_confint(900, 1000, alpha=0.002, method="beta")[0],
                                   rtol=1e-10)
        # No sample voted (a model with NaN weights): abstain.
        classes, radii, _ = stats.certify_from_counts(np.zeros((1, 2), int), np.zeros((1, 2), int), n=1000,
                                                      alpha=0.001, sigma=0.5)
        np.testing.assert_array_equal((classes, radii), ([-1], [0.0]))
        with self.assertRaisesRegex(ValueError, "more than n=10"):
            stats.certify_from_counts(np.array([[10, 0]]), np.array([[9, 2]]), n=10, alpha=0.001, sigma=0.5)

    def test_predict_from_counts(self):
        counts = np.array([[50, 50, 0], [0, 100, 0], [30, 40, 30], [0, 0, 20]])
        # Tie -> p = 1; 100 vs 0 -> p = 2^-99; 40 vs 30 -> p ~ 0.28; 20 vs 0 -> p = 2^-19.
        np.testing.assert_array_equal(stats.predict_from_counts(counts, alpha=0.001), [-1, 1, -1, 2])

    def test_bad_shapes(self):
        with self.assertRaisesRegex(ValueError, "counts"):
            stats.certify_from_counts(np.zeros((2, 3)), np.zeros((3, 3)), n=1, alpha=0.01, sigma=1.0)
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

class ClopperPearsonUpperTest(parameterized.TestCase):

    def test_matches_statsmodels_beta_interval_on_grid(self):
        for k, n, alpha in _grid():
            expected = proportion_confint(k, n, alpha=2 * alpha, method="beta")[1]
            # The mirror of the lower bound's gap, plus the ulp of rounding 1 - lower up.
            self.assertLessEqual(abs(stats.clopper_pearson_upper(k, n, alpha) - expected),
                                 _safe_rounding_gap(n - k, n, alpha) + np.finfo(np.float64).eps,
                                 msg=f"k={k} n={n} alpha={alpha}")

    def test_mirrors_lower_bound(self):
        for k, n, alpha in _grid():
            self.assertAlmostEqual(stats.clopper_pearson_upper(k, n, alpha),
                                   1 - stats.clopper_pearson_lower(n - k, n, alpha), places=12)

    def test_defining_tail_property(self):
        # The exact bound p_U solves P(Binomial(n, p_U) <= k) = alpha for k < n.
        for k, n, alpha in _grid():
            if k == n:
                continue
            p_u = stats.clopper_pearson_upper(k, n, alpha)
            self.assertAlmostEqual(scipy_stats.binom.cdf(k, n, p_u), alpha, delta=1e-9 + 1e-6 * alpha)

    def test_edges_in_closed_form(self):
        # k = n: nothing to bound; k = 0: P(no success) = (1 - p)^n = alpha.
        self.assertEqual(stats.clopper_pearson_upper(50, 50, 0.01), 1.0)
        self.assertAlmostEqual(stats.clopper_pearson_upper(0, 50, 0.01), 1 - 0.01 ** (1 / 50), places=12)
        # k = n - 1: P(X <= n - 1) = 1 - p^n = alpha, so p_U = (1 - alpha)^(1/n), about 1 - 1e-8 here.
        self.assertAlmostEqual(stats.clopper_pearson_upper(99999, 100000, 0.001), 0.999 ** (1 / 100000),
                               places=14)

    def test_vectorized(self):
        got = stats.clopper_pearson_upper(np.array([0, 3, 10]), 10, 0.05)
        self.assertEqual(got.shape, (3,))
        self.assertEqual(got[2], 1.0)
        self.assertEqual(got[1], stats.clopper_pearson_upper(3, 10, 0.05))

    @parameterized.named_parameters(
        ("alpha_zero", 5, 10, 0.0, "alpha"),
        ("alpha_nan", 5, 10, float("nan"), "alpha"),
        ("no_trials", 0, 0, 0.01, "trials"),
        ("too_many_successes", 11, 10, 0.01, "successes"),
    )
    def test_bad_arguments(self, k, n, alpha, word):
        with self.assertRaisesRegex(ValueError, word):
            stats.clopper_pearson_upper(k, n, alpha)


class ScheduleTest(parameterized.TestCase):
    """The schedule's and the radii's rules are certify_spec's (tests: certify_spec_test); stats uses them."""

    def test_check_radii(self):
        # certify_spec.check_radii's rule, as the float64 array the references compute with, in order.
        np.testing.assert_array_equal(stats.check_radii([0.5, 0.25]), [0.5, 0.25])
        self.assertEqual(stats.check_radii((1,)).dtype, np.float64)
        with self.assertRaisesRegex(ValueError, "^radii must be finite and > 0"):
            stats.check_radii([0.0])

    def test_stage_rules_are_certify_specs(self):
        self.assertIs(stats.resolve_stages, certify_spec.resolve_stages)
        self.assertIs(stats.check_stages, certify_spec.check_stages)
        self.assertIs(stats.default_stages, certify_spec.default_stages)


class SettledTest(parameterized.TestCase):

    @parameterized.parameters(
        # sigma = 1, radius 1: the threshold is Phi(1) = 0.8413.
        (0.6, 0.9, False),  # Phi(1) inside: certified at 1 or not is open.
        (0.85, 0.99, True),  # Certified.
        (0.55, 0.8, True),  # A class, not certified at 1.
        (0.45, 0.6, False),  # 1/2 inside: a class or ABSTAIN is open.
        (0.1, 0.4, True),  # ABSTAIN.
        (0.0, 1.0, False),
        (0.5, 0.7, True),  # Bounds on a threshold: not strictly between.
        (0.3, 0.5, True),
    )
    def test_hand_cases(self, lower, upper, expected):
        self.assertEqual(bool(stats.settled(np.array([lower]), np.array([upper]), [1.0], 1.0)[0]), expected)

    def test_matches_thresholds_in_probability(self):
        # The same rule written with the thresholds Phi(r / sigma) and 1/2.
        rng = np.random.default_rng(0)
        bounds = np.sort(rng.uniform(size=(2, 5000)), axis=0)
        radii, sigma = [0.25, 0.5, 1.0], 0.5
        thresholds = np.append(scipy_stats.norm.cdf(np.array(radii) / sigma), 0.5)
        expected = ~np.any((bounds[0][:, None] < thresholds) & (thresholds < bounds[1][:, None]), axis=1)
        np.testing.assert_array_equal(stats.settled(bounds[0], bounds[1], radii, sigma), expected)
        self.assertGreater(expected.sum(), 100)
        self.assertGreater((~expected).sum(), 100)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "radii"):
            stats.settled(np.array([0.5]), np.array([0.6]), [0.0], 1.0)
        with self.assertRaisesRegex(ValueError, "sigma"):
            stats.settled(np.array([0.5]), np.array([0.6]), [1.0], 0.0)


def _scripted(successes_by_stage):
    """A draw function returning given counts: successes_by_stage[k][i] for image i at stage k."""
    calls = []

    def draw(active, stage, num_new):
        calls.append((active.tolist(), stage, num_new))
        return np.asarray(successes_by_stage[stage])[active]

    return draw, calls


class StageLevelsTest(parameterized.TestCase):

    def test_one_stage_is_fixed_n(self):
        self.assertEqual(stats.stage_levels(0.001, 1), (0.001,))

    @parameterized.parameters(2, 3, 8)
    def test_last_stage_gets_half_and_the_levels_sum_to_alpha(self, num_stages):
        levels = stats.stage_levels(0.001, num_stages)
        self.assertLen(levels, num_stages)
        self.assertEqual(levels[-1], 0.0005)
        self.assertEqual(set(levels[:-1]), {0.001 / (2 * (num_stages - 1))})
        # The union bound needs sum <= alpha; float sums of K terms are off by a few ulps at most.
        self.assertLessEqual(abs(sum(levels) - 0.001), num_stages * np.spacing(0.001))

    @parameterized.parameters((0.0, 3), (1.0, 3), (0.01, 0), (0.01, 2.5), (0.01, True))
    def test_bad_arguments(self, alpha, num_stages):
        with self.assertRaises(ValueError):
            stats.stage_levels(alpha, num_stages)

    def test_each_stage_bounds_at_its_level(self):
        # Three stages, alpha = 0.04: levels 0.01, 0.01, 0.02. One image at
        # p-hat = 0.8 never settles at radius 0.84 (sigma = 1, threshold
        # Phi(0.84) = 0.80); its final bound must be the one-sided bound at
        # 0.02 (statsmodels' two-sided interval at 0.04), not at alpha / 3.
        draw, _ = _scripted([[40], [40], [320]])
        result = stats.staged_certify(np.array([1]), draw, (50, 100, 500), alpha=0.04, sigma=1.0, radii=[0.84])
        self.assertEqual(result.samples[0], 500)
        expected = proportion_confint(400, 500, alpha=0.04, method="beta")[0]
        self.assertAlmostEqual(result.p_lower[0], expected, places=12)
        self.assertNotAlmostEqual(result.p_lower[0], proportion_confint(400, 500, alpha=0.04 * 2 / 3,
                                                                        method="beta")[0], places=6)


class StagedCertifyTest(parameterized.TestCase):

    def test_scripted_run(self):
        # Stages (50, 200), alpha = 0.02: each bound at level 0.01. sigma = 1,
        # radius 0.5: threshold Phi(0.5) = 0.691.
        # Image 0: 50/50 -> lower 0.01^(1/50) = 0.912: settled, certified, stops at 50.
        # Image 1: 0/50 -> upper 1 - 0.912 = 0.088 < 1/2: settled, ABSTAIN at 50.
        # Image 2: 30/50 (bounds about 0.42, 0.76, both 1/2 and 0.691 inside)
        #   -> 120/200: lower about 0.51 -> a class, not certified at 0.5.
        # Image 3: 40/50 (bounds about 0.63, 0.90: 0.691 inside)
        #   -> 160/200: lower about 0.73 -> certified at 0.5.
        draw, calls = _scripted([[50, 0, 30, 40], [0, 0, 90, 120]])
        result = stats.staged_certify(np.array([3, 4, 5, 6]), draw, (50, 200), alpha=0.02, sigma=1.0, radii=[0.5])
        self.assertEqual(calls, [([0, 1, 2, 3], 0, 50), ([2, 3], 1, 150)])
        np.testing.assert_array_equal(result.samples, [50, 50, 200, 200])
        expected_lower = [proportion_confint(k, n, alpha=0.02, method="beta")[0]
                          for k, n in ((50, 50), (0, 50), (120, 200), (160, 200))]
        expected_lower[1] = 0.0
        np.testing.assert_allclose(result.p_lower, expected_lower, rtol=1e-10)
        self.assertAlmostEqual(result.p_lower[0], 0.01 ** (1 / 50), places=12)
        np.testing.assert_array_equal(result.classes, [3, -1, 5, 6])
        np.testing.assert_allclose(result.radii, [scipy_stats.norm.ppf(expected_lower[0]), 0.0,
                                                  scipy_stats.norm.ppf(expected_lower[2]),
                                                  scipy_stats.norm.ppf(expected_lower[3])], rtol=1e-10)
        np.testing.assert_array_equal(result.certified, [[True], [False], [False], [True]])
        self.assertTrue(0.5 < result.p_lower[2] < scipy_stats.norm.cdf(0.5) < result.p_lower[3])

    def test_certified_means_radius_at_least_r(self):
        # One image whose radius is exactly 0.5 in floating point: certified
        # at 0.5 (>=, as analysis.certified_accuracy counts), not above.
        draw, _ = _scripted([[7000], [0]])
        result = stats.staged_certify(np.array([0]), draw, (10000,), alpha=0.001, sigma=1.0, radii=[0.4, 0.6])
        radius = result.radii[0]
        again = stats.staged_certify(np.array([0]), _scripted([[7000]])[0], (10000,), alpha=0.001, sigma=1.0,
                                     radii=[radius, np.nextafter(radius, 1.0)])
        np.testing.assert_array_equal(again.certified, [[True, False]])

    def test_one_stage_is_certify(self):
        rng = np.random.default_rng(1)
        selection = rng.multinomial(100, [0.6, 0.3, 0.1], size=50)
        estimation = rng.multinomial(1000, [0.6, 0.3, 0.1], size=50)
        guesses = np.argmax(selection, axis=1)
        classes, radii, p_lower = stats.certify_from_counts(selection, estimation, n=1000, alpha=0.001, sigma=0.5)
        result = stats.staged_certify(guesses, lambda active, k, m: estimation[active, guesses[active]], (1000,),
                                      alpha=0.001, sigma=0.5, radii=[0.1, 0.2])
        np.testing.assert_array_equal(result.classes, classes)
        np.testing.assert_array_equal(result.radii, radii)
        np.testing.assert_array_equal(result.p_lower, p_lower)
        np.testing.assert_array_equal(result.certified, radii[:, None] >= [0.1, 0.2])
        np.testing.assert_array_equal(result.samples, [1000] * 50)

    def test_empty_batch(self):
        draw, calls = _scripted([[]])
        result = stats.staged_certify(np.zeros(0, int), draw, (10, 20), alpha=0.01, sigma=1.0, radii=[0.5, 1.0])
        self.assertEqual(calls, [])
        self.assertEqual(result.certified.shape, (0, 2))
        self.assertEqual(result.samples.shape, (0,))

    def test_soundness_monte_carlo(self):
        # Images with a known p_A, asked about a radius just above their true
        # radius sigma Phi^-1(p_A): the threshold sits at p_A, so an image
        # never settles but by a bound failing, and "certified" happens iff
        # some stage's lower bound exceeded p_A, the union of events the
        # union bound pays for. The guarantee: per image, P(failure) <= alpha.
        #
        # Tolerance: the failures F_g of a group of N_g images are
        # Binomial(N_g, q_g) with q_g <= alpha, so P(F_g > c_g) <= 1e-6 for
        # c_g = the (1 - 1e-6) quantile of Binomial(N_g, alpha); a correct
        # procedure fails one of the 6 checks with probability < 6e-6.
        # Power: the same run with every stage at the full alpha (no union
        # bound) fails 7-14% of images here, far above the tolerance (6.5%).
        alpha, sigma, stages, count = 0.05, 0.5, (20, 50, 100, 200, 500), 5000
        rng = np.random.default_rng(2)
        total, naive_total = 0, 0
        for p in (0.55, 0.6, 0.7, 0.8, 0.9, 0.95):
            radius = sigma * scipy_stats.norm.ppf(p) + 1e-12
            draw = lambda active, k, m, p=p: rng.binomial(m, p, size=len(active))
            result = stats.staged_certify(np.zeros(count, int), draw, stages, alpha=alpha, sigma=sigma,
                                          radii=[radius])
            failures = int(result.certified[:, 0].sum())
            self.assertEqual(failures, int((result.p_lower > p).sum()))
            self.assertLessEqual(failures, scipy_stats.binom.isf(1e-6, count, alpha), msg=f"p_A={p}")
            naive = stats.staged_certify(np.zeros(count, int), draw, stages, alpha=alpha * len(stages),
                                         sigma=sigma, radii=[radius])
            total += failures
            naive_total += int(naive.certified[:, 0].sum())
        # Not vacuous: the bounds are tight enough to fail, and the test
        # catches a procedure that drops the alpha / K split.
        self.assertGreater(total, 0)
        self.assertGreater(naive_total, scipy_stats.binom.isf(1e-6, 6 * count, alpha))

    def test_stops_early_when_far_from_thresholds(self):
        # p_A = 1 and 0 settle at the first stage; p_A near Phi(r / sigma) runs on.
        p = np.array([1.0, 0.0, scipy_stats.norm.cdf(1.0)])
        rng = np.random.default_rng(3)
        result = stats.staged_certify(np.zeros(3, int), lambda active, k, m: rng.binomial(m, p[active]),
                                      (100, 1000, 10000), alpha=0.001, sigma=1.0, radii=[1.0])
        np.testing.assert_array_equal(result.samples, [100, 100, 10000])

    @parameterized.named_parameters(
        ("alpha", dict(alpha=0.0), "alpha"),
        ("sigma", dict(sigma=-1.0), "sigma"),
        ("radii", dict(radii=[0.0]), "radii"),
        ("stages", dict(stages=(10, 5)), "stages"),
        ("guesses", dict(guesses=np.zeros((2, 2), int)), "guesses"),
        ("draw_shape", dict(draw=lambda active, k, m: np.zeros(len(active) + 1, int)), "shape"),
        ("draw_float", dict(draw=lambda active, k, m: np.zeros(len(active))), "integer"),
        ("draw_too_many", dict(draw=lambda active, k, m: np.full(len(active), m + 1)), "samples asked"),
    )
    def test_bad_arguments(self, override, word):
        args = dict(guesses=np.zeros(2, int), draw=lambda active, k, m: np.zeros(len(active), int),
                    stages=(10, 20), alpha=0.01, sigma=1.0, radii=[0.5])
        args.update(override)
        with self.assertRaisesRegex(ValueError, word):
            stats.staged_certify(args.pop("guesses"), args.pop("draw"), args.pop("stages"), **args)


class StagedPredictTest(parameterized.TestCase):

    def test_scripted_run(self):
        # Stages (20, 100), alpha = 0.02: each test at 0.01.
        # Image 0: 20 vs 0: p = 2^-19 -> class 0 at 20.
        # Image 1: 10 vs 10 -> on; then 50 vs 50 in all -> ABSTAIN at 100.
        # Image 2: 12 vs 8 -> on; then 70 vs 30: p = 1e-4 -> class 0... of its counts.
        stage0 = np.array([[20, 0, 0], [10, 10, 0], [8, 0, 12]])
        stage1 = np.array([[0, 0, 0], [40, 40, 0], [22, 0, 58]])
        draw, calls = _scripted([stage0, stage1])
        result = stats.staged_predict(3, draw, (20, 100), alpha=0.02)
        self.assertEqual(calls, [([0, 1, 2], 0, 20), ([1, 2], 1, 80)])
        np.testing.assert_array_equal(result.classes, [0, -1, 2])
        np.testing.assert_array_equal(result.samples, [20, 100, 100])
        self.assertLess(scipy_stats.binomtest(70, 100, 0.5).pvalue, 0.01)
        self.assertGreater(scipy_stats.binomtest(12, 20, 0.5).pvalue, 0.01)

    def test_one_stage_is_predict(self):
        rng = np.random.default_rng(4)
        counts = rng.multinomial(200, [0.4, 0.35, 0.25], size=100)
        result = stats.staged_predict(100, lambda active, k, m: counts[active], (200,), alpha=0.01)
        np.testing.assert_array_equal(result.classes, stats.predict_from_counts(counts, alpha=0.01))
        self.assertIn(-1, result.classes)
        self.assertGreater((result.classes >= 0).sum(), 0)

    def test_samples_of_no_class(self):
        # Counts may sum to less than asked: samples with non-finite logits
        # vote for no class (smoothing.sample_counts). None voting: abstain at
        # the end; 20 of 50 voting, all for class 1: p = 2^-19 -> class 1.
        draw = lambda active, k, m: np.where(active[:, None] == 0, [[0, 0]], [[0, 20]])
        result = stats.staged_predict(2, draw, (50, 100), alpha=0.01)
        np.testing.assert_array_equal(result.classes, [-1, 1])
        np.testing.assert_array_equal(result.samples, [100, 50])

    def test_soundness_monte_carlo(self):
        # PREDICT's guarantee: P(a class other than g(x)) <= alpha. Under an
        # exact tie every answer but ABSTAIN is a type I error of the test,
        # so the union over stages must keep P(any answer) <= alpha; near a
        # tie, the wrong class must come out at most alpha of the time.
        # Tolerance as in StagedCertifyTest: the (1 - 1e-6) quantile of
        # Binomial(count, alpha). Power: every stage at the full alpha
        # answers about 14% of tied images.
        alpha, stages, count = 0.05, (20, 50, 100, 200, 500), 20000
        rng = np.random.default_rng(5)
        limit = scipy_stats.binom.isf(1e-6, count, alpha)
        for p, wrong in (((0.5, 0.5), (0, 1)), ((0.505, 0.495), (1,)), ((0.45, 0.44, 0.11), (1, 2))):
            draw = lambda active, k, m, p=p: rng.multinomial(m, p, size=len(active))
            result = stats.staged_predict(count, draw, stages, alpha=alpha)
            self.assertLessEqual(int(np.isin(result.classes, wrong).sum()), limit, msg=f"p={p}")
        tied = lambda active, k, m: rng.multinomial(m, (0.5, 0.5), size=len(active))
        naive = stats.staged_predict(count, tied, stages, alpha=alpha * len(stages))
        self.assertGreater(int((naive.classes >= 0).sum()), limit)

    @parameterized.named_parameters(
        ("alpha", dict(alpha=1.0), "alpha"),
        ("stages", dict(stages=(10, 10)), "stages"),
        ("num_images", dict(num_images=-1), "num_images"),
        ("one_class", dict(draw=lambda active, k, m: np.full((len(active), 1), m)), "num_classes >= 2"),
        ("counts_sum", dict(draw=lambda active, k, m: np.tile([m, 1, 0], (len(active), 1))), "samples asked"),
    )
    def test_bad_arguments(self, override, word):
        args = dict(num_images=2, draw=lambda active, k, m: np.tile([m, 0], (len(active), 1)), stages=(10, 20),
                    alpha=0.01)
        args.update(override)
        with self.assertRaisesRegex(ValueError, word):
            stats.staged_predict(args.pop("num_images"), args.pop("draw"), args.pop("stages"), **args)


if __name__ == "__main__":
    absltest.main()
