"""The safe side of every bound, radius and p-value, in engine.py and stats.py, against mpmath at 50 digits.

"Unsafe" is decided without computing a quantile: the exact Clopper-Pearson
lower bound L* of k successes in n trials is the x with P[Bin(n, x) >= k] =
alpha, and that tail increases in x, so a value L is at or below L* iff
P[Bin(n, L) >= k] <= alpha, which mpmath evaluates at L itself (the tail as
a sum of binomial terms, `_binomial_tail`). Likewise an upper bound U is at
or above U* iff P[Bin(n, U) <= k] <= alpha; a radius r is at or below
sigma Phi^-1(L) iff Phi(r / sigma) <= L; a p-value is at or above the exact
one if it is >= 2 P[Bin(n, 1/2) <= min(k, n - k)]. The grid:
n in {1, 10, ..., 10^6}, k in {0, 1, 2, 5, n/2 - 1, n/2, n/2 + 1, 0.9 n,
0.99 n, n - 2, n - 1, n}, alpha in {1e-3, 1e-2, 0.05}.

Run with `pytest -s` to see the largest gaps between the values and the exact
ones (the cost of the safe rounding).
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import mpmath
import numpy as np
from scipy import special as scipy_special
import tensorflow as tf

from tf_consreg import engine
from tf_consreg import stats

mpmath.mp.dps = 50
_EPS = float(np.finfo(np.float64).eps)
_ALPHAS = (1e-3, 1e-2, 0.05)
_SIGMAS = (0.12, 0.25, 0.5, 1.0)


def _grid():
    """(k, n) over n in {1, 10, ..., 10^6} with the edges, the middle and the high end of k."""
    ks, ns = [], []
    for n in (1, 10, 100, 1000, 10**4, 10**5, 10**6):
        for k in sorted({0, 1, 2, 5, n // 2 - 1, n // 2, n // 2 + 1, int(0.9 * n), int(0.99 * n), n - 2, n - 1, n}):
            if 0 <= k <= n:
                ks.append(k)
                ns.append(n)
    return np.array(ks), np.array(ns)


@functools.lru_cache(maxsize=None)
def _binomial_tail(n: int, x: float, k: int, upper: bool) -> mpmath.mpf:
    """P[Bin(n, x) >= k] (upper) or P[Bin(n, x) <= k], at 50 digits.

    The terms are summed from k outward, each from the last by the ratio of
    binomial probabilities; once that ratio r is below 1 it only decreases,
    so the rest of the sum is below term r / (1 - r), and the sum stops when
    that is below 10^-45 of it.
    """
    x = mpmath.mpf(x)
    if (upper and k <= 0) or (not upper and k >= n):
        return mpmath.mpf(1)
    if x == 0 or x == 1:
        return mpmath.mpf(int((x == 1) == upper))
    term = mpmath.exp(mpmath.loggamma(n + 1) - mpmath.loggamma(k + 1) - mpmath.loggamma(n - k + 1)
                      + k * mpmath.log(x) + (n - k) * mpmath.log1p(-x))
    total, j, odds = term, k, x / (1 - x)
    tolerance = mpmath.mpf(10) ** -45
    while (j < n) if upper else (j > 0):
        ratio = (n - j) * odds / (j + 1) if upper else j / ((n - j + 1) * odds)
        term *= ratio
        j += 1 if upper else -1
        total += term
        if ratio < 1 and term * ratio / (1 - ratio) < tolerance * total:
            break
    return total


def _beta_density(k: int, n: int, x) -> mpmath.mpf:
    """The density of Beta(k, n - k + 1) at x, whose alpha quantile is the lower bound."""
    x = mpmath.mpf(x)
    return mpmath.exp(mpmath.loggamma(n + 1) - mpmath.loggamma(k) - mpmath.loggamma(n - k + 1)
                      + (k - 1) * mpmath.log(x) + (n - k) * mpmath.log1p(-x))


@functools.lru_cache(maxsize=None)
def _exact_lower(k: int, n: int, alpha: float) -> mpmath.mpf:
    """L* by Newton's method (for the gaps only; the safety checks need no quantile).

    It starts at scipy's Beta(k, n - k + 1) alpha-quantile, an independent
    value within 1.4e-15 of L*, relative, on the grid (measured against this
    function's result), from which Newton's quadratic convergence reaches
    the 50 digits in 3 steps (1e-15, 1e-30, 1e-60). Keyed by (k, n, alpha)
    alone, so the engine's and stats' tests share each L*.
    """
    x = mpmath.mpf(float(scipy_special.betaincinv(k, n - k + 1, alpha)))
    for _ in range(3):
        x -= (_binomial_tail(n, x, k, True) - alpha) / _beta_density(k, n, x)
    return x


class SafeRoundingTest(parameterized.TestCase):

    def _check_bounds(self, lower, upper, k, n, alpha, name):
        """No value on the unsafe side.

        Returns:
          The largest relative gaps to L*: of all lower bounds; of those above
          1/2 (the ones that certify); and of their radii sigma Phi^-1(L),
          unrounded, from sigma Phi^-1(L*) (the same relative gap for any sigma).
        """
        gaps, certifying, radii = [0.0], [0.0], [0.0]
        for low, up, kk, nn in zip(lower, upper, k, n):
            kk, nn = int(kk), int(nn)
            where = f"{name}: k={kk} n={nn} alpha={alpha}"
            if kk == 0:
                self.assertEqual(low, 0.0, where)
            else:
                self.assertLessEqual(_binomial_tail(nn, float(low), kk, True), alpha, f"lower bound {low} too high, {where}")
            if kk == nn:
                self.assertEqual(up, 1.0, where)
            else:
                self.assertLessEqual(_binomial_tail(nn, float(up), kk, False), alpha, f"upper bound {up} too low, {where}")
            if kk > 0 and low > 0:
                exact = _exact_lower(kk, nn, alpha)
                gaps.append(float((exact - mpmath.mpf(float(low))) / exact))
                if low > 0.5:
                    certifying.append(gaps[-1])
                    quantile = lambda p: mpmath.erfinv(2 * p - 1)
                    radii.append(float((quantile(exact) - quantile(mpmath.mpf(float(low)))) / quantile(exact)))
        return max(gaps), max(certifying), max(radii)

    def _check_radii(self, radius, p_lower, sigma, name):
        """r <= sigma Phi^-1(p) iff Phi(r / sigma) <= p; returns the largest relative gap for p > 1/2."""
        gaps = [0.0]
        for r, p in zip(radius, p_lower):
            if p == 0.0:
                self.assertEqual(r, -np.inf, name)
                continue
            self.assertLessEqual(mpmath.ncdf(mpmath.mpf(float(r)) / mpmath.mpf(sigma)), mpmath.mpf(float(p)),
                                 f"{name}: radius {r} above sigma Phi^-1({p}), sigma={sigma}")
            if p > 0.5:
                exact = mpmath.mpf(sigma) * mpmath.sqrt(2) * mpmath.erfinv(2 * mpmath.mpf(float(p)) - 1)
                gaps.append(float((exact - mpmath.mpf(float(r))) / exact))
        return max(gaps)

    @parameterized.parameters(*_ALPHAS)
    def test_engine_bounds_and_radii_on_the_safe_side(self, alpha):
        k, n = _grid()
        lower, upper = engine.clopper_pearson_bounds(k, n, alpha)
        lower, upper = lower.numpy(), upper.numpy()
        gap, certifying_gap, bound_radius_gap = self._check_bounds(lower, upper, k, n, alpha, "engine")
        # The single bounds are the joint ones (engine_test), so the engine's
        # every bound function is covered.
        radius_gap = max(self._check_radii(engine.certified_radius(lower, sigma).numpy(), lower, sigma, "engine")
                         for sigma in _SIGMAS)
        print(f"engine, alpha={alpha}: largest gap below L*, relative: {gap:.2e} ({certifying_gap:.2e} where "
              f"L > 1/2, the radius {bound_radius_gap:.2e}); rounding the radius: {radius_gap:.2e}")
        # The bisection's bracket ends where betainc < alpha (1 - c) stops
        # holding; with betainc's error below c, the exact tail there is
        # above alpha (1 - 2 c), so L lies within 2 c alpha / density of L*,
        # plus the last bracket 2^-64: a relative 1e-6 is far above both on
        # this grid (c < 3e-8 for n <= 10^6).
        self.assertLess(gap, 1e-6)
        # 8 eps of margin, one ulp, and the radius' own rounding: 12 eps.
        self.assertLess(radius_gap, 12 * _EPS)

    @parameterized.parameters(*_ALPHAS)
    def test_stats_bounds_and_radii_on_the_safe_side(self, alpha):
        k, n = _grid()
        lower, upper = stats.clopper_pearson_lower(k, n, alpha), stats.clopper_pearson_upper(k, n, alpha)
        gap, certifying_gap, bound_radius_gap = self._check_bounds(lower, upper, k, n, alpha, "stats")
        radius_gap = max(self._check_radii(np.atleast_1d(stats.certified_radius(lower, sigma)), lower, sigma,
                                           "stats") for sigma in _SIGMAS)
        print(f"stats, alpha={alpha}: largest gap below L*, relative: {gap:.2e} ({certifying_gap:.2e} where "
              f"L > 1/2, the radius {bound_radius_gap:.2e}); rounding the radius: {radius_gap:.2e}")
        self.assertLess(gap, 1e-6)  # As for the engine: Newton lands near alpha (1 - 2 c).
        self.assertLess(radius_gap, 12 * _EPS)

    def test_radius_never_above_sigma_phi_inverse_of_the_exact_bound(self):
        # The Done-when's statement itself, on the engine's certified bounds:
        # r <= sigma Phi^-1(L) (checked above) and L <= L* (checked above)
        # give r <= sigma Phi^-1(L*). Here also at the top, where ndtri's
        # argument is near 1, and near 1/2, where the radius is near 0.
        p = np.concatenate([0.5 + np.logspace(-16, -1, 40), 1 - np.logspace(-16, -1, 40)])
        for sigma in _SIGMAS:
            self._check_radii(engine.certified_radius(p, sigma).numpy(), p, sigma, "engine")
            self._check_radii(stats.certified_radius(p, sigma), p, sigma, "stats")

    def test_p_values_never_below_the_exact_ones(self):
        k, n = _grid()
        trials = np.maximum(n, 1)
        got = {"engine": engine.binomial_test_two_sided(k, trials).numpy(),
               "stats": stats.binomial_test_pvalue(k, trials)}
        worst = 0.0
        for i, (kk, nn) in enumerate(zip(k, trials)):
            m = min(int(kk), int(nn) - int(kk))
            exact = mpmath.mpf(1) if 2 * m >= nn else min(mpmath.mpf(1), 2 * _binomial_tail(int(nn), 0.5, m, False))
            for name, values in got.items():
                self.assertGreaterEqual(mpmath.mpf(float(values[i])), exact, f"{name}: p-value of k={kk}, n={nn}")
                if exact > np.finfo(np.float64).tiny:  # Below it the value is the smallest normal float.
                    worst = max(worst, float((mpmath.mpf(float(values[i])) - exact) / exact))
        print(f"p-values above the exact ones, relative: at most {worst:.2e}")
        # Raised by c = 4 eps E < 3e-8 (n <= 10^6) and an ulp, plus betainc's own error below c.
        self.assertLess(worst, 1e-7)

    def test_betainc_error_within_the_engines_bound(self):
        # The assumption behind the margins, measured: betainc's relative
        # error at the Clopper-Pearson quantiles of the grid is below the
        # bound the engine assumes (and scipy's beta.cdf below stats').
        from scipy import stats as scipy_stats  # pylint: disable=import-outside-toplevel
        k, n = _grid()
        inner = (k > 0) & (k <= n)
        k, n = k[inner], n[inner]
        worst_engine = worst_scipy = 0.0
        for alpha in _ALPHAS:
            a, b = k.astype(np.float64), (n - k + 1).astype(np.float64)
            x = scipy_stats.beta.ppf(alpha, a, b)
            tf_values = tf.math.betainc(a, b, x).numpy()
            bound = engine.betainc_error_bound(tf.constant(a), tf.constant(b), tf.constant(x)).numpy()
            scipy_values = scipy_stats.beta.cdf(x, a, b)
            scipy_bound = stats.beta_cdf_error_bound(a, b, x)
            for i in range(len(x)):
                exact = _binomial_tail(int(n[i]), float(x[i]), int(k[i]), True)
                worst_engine = max(worst_engine, float(abs(mpmath.mpf(float(tf_values[i])) - exact) / exact) / bound[i])
                worst_scipy = max(worst_scipy,
                                  float(abs(mpmath.mpf(float(scipy_values[i])) - exact) / exact) / scipy_bound[i])
        print(f"betainc's error / the engine's bound: at most {worst_engine:.3f}; "
              f"scipy's beta.cdf / stats' bound: at most {worst_scipy:.2e}")
        self.assertLess(worst_engine, 1.0)
        self.assertLess(worst_scipy, 1.0)

    def test_ndtri_error_within_the_margin(self):
        # ndtri's relative error over p from 1e-300 to 1 - 1e-16 is below the
        # margin less the 1 eps that the margin's own arithmetic may lose.
        from scipy import stats as scipy_stats  # pylint: disable=import-outside-toplevel
        p = np.concatenate([np.linspace(0.5, 1, 401)[1:-1], 1 - np.logspace(-16, -1, 60), np.logspace(-300, -1, 60)])
        worst = {"engine": 0.0, "stats": 0.0}
        for name, z in (("engine", tf.math.ndtri(p).numpy()), ("stats", scipy_stats.norm.ppf(p))):
            for value, pp in zip(z, p):
                # One Newton step from the value on Phi(z) = p (erfinv(2 p - 1)
                # would need 300 digits at p = 1e-300); its error is second order.
                value = mpmath.mpf(float(value))
                exact = value - (mpmath.ncdf(value) - mpmath.mpf(float(pp))) / mpmath.npdf(value)
                worst[name] = max(worst[name], float(abs((value - exact) / exact)))
        print(f"ndtri / norm.ppf relative errors: {worst['engine'] / _EPS:.2f} / {worst['stats'] / _EPS:.2f} eps")
        self.assertLess(worst["engine"], engine.NDTRI_MARGIN - _EPS)
        self.assertLess(worst["stats"], stats.NORM_PPF_MARGIN - _EPS)


if __name__ == "__main__":
    absltest.main()
