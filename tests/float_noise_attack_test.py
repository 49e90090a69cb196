"""Voráček & Hein's attack on float noise, at one pixel: a false certificate under float noise, none under grid noise.

Randomized smoothing's certificate (Cohen et al. 2019) assumes that the base
classifier sees x + delta with delta exactly Gaussian. Float noise gives it
float32(x + float32 delta) instead, and the rounding depends on x: floats are
an uneven grid. Voráček & Hein (ICLR 2023, arXiv 2207.07209) build a
classifier that reads this rounding; here is a one-pixel version of their
mechanism.

The base classifier: f(y) = A if y is a multiple of 2^-24, else B.

Float noise at x = 1 (pixel 255): every float32 of magnitude >= 1/2 is a
multiple of 2^-24 (its ulp is at least 2^-24). For any float32 delta,
y = float32(1 + delta) either has magnitude >= 1/2 (rounding is monotone and
1/2 is a float), or 1 + delta has magnitude < 1/2; then delta is in
(-3/2, -1/2), a multiple of 2^-24, so 1 + delta is a multiple of 2^-24 below
2^-1 in magnitude: exact in float32, and a multiple. So f(y) = A for every
draw, p_A = 1 exactly, and CERTIFY (n = 100,000, alpha = 0.001) certifies
radius sigma * Phi^-1(alpha^(1/n)) = 1.143 at sigma = 0.3.

Float noise at x' = 0 (pixel 0), at distance 1 < 1.143: y = delta itself,
whose float32 spacing below 1/2 is finer than 2^-24, so f(y) = B unless
|delta| >= 1/2 or delta's low bits happen to be zero (about 35% in all). The
test bounds P(f(y) = A) from above by a Clopper-Pearson bound over 100,000
draws at 1e-6 (fixed seed): it is below 1/2, so the smoothed classifier's class
at x' is B although x' lies inside the certified ball. A false certificate.

Grid noise: the model sees float32((a + j) / 255), a function of the integer
a + j = round(255 (a / 255 + delta)) alone, so the smoothed classifier is
the exact Gaussian smoothing of h(x) = f(float32(round(255 x)) / 255) and
Cohen's theorem holds for h. The same f, certified from grid samples at
a = 255 (with the table's TV slack subtracted), gets a radius below 1 (about
0.5: only a + j >= 128, i.e. delta >= -0.498, is surely class A), and the
smoothed class of h, computed exactly (scipy's Phi of the rounding intervals),
is A at every point of the certified ball: no false certificate.
"""

import numpy as np
from scipy import special
from scipy import stats as scipy_stats
import tensorflow as tf

from tf_consreg import noise
from tf_consreg import stats

SIGMA = 0.3
N0, N, ALPHA = 100, 100_000, 0.001  # bin/certify.py's defaults
CLASS_A, CLASS_B = 0, 1


def base_classifier(y: tf.Tensor) -> tf.Tensor:
    """A (0) when float32 y is a multiple of 2^-24, else B (1). Scaling by 2^24 is exact in float32."""
    scaled = y * 2.0**24
    return tf.where(tf.equal(tf.floor(scaled), scaled), CLASS_A, CLASS_B)


def float_counts(x: float, num: int, seed) -> int:
    """Class-A votes of `num` float-noise samples at pixel value x, as smoothing.sample_counts adds them."""
    z = noise.standard_normal(tf.constant([num, 1]), tf.constant(seed, tf.int64))
    noisy = tf.constant([x], tf.float32) + SIGMA * z
    return int(tf.reduce_sum(tf.cast(tf.equal(base_classifier(noisy), CLASS_A), tf.int32)))


def grid_counts(pixel: int, num: int, seed, table: noise.GridNoise) -> int:
    """Class-A votes of `num` grid-noise samples at integer pixel `pixel`."""
    j = noise.grid_noise(tf.constant([num, 1]), tf.constant(seed, tf.int64), table)
    noisy = noise.grid_inputs(tf.constant([pixel], tf.int32), j)
    return int(tf.reduce_sum(tf.cast(tf.equal(base_classifier(noisy), CLASS_A), tf.int32)))


def class_a_levels(limit: int) -> np.ndarray:
    """The integers k in [-limit, limit] with f(float32(k) / 255) = A, by numpy's float32 division."""
    k = np.arange(-limit, limit + 1)
    y = k.astype(np.float32) / np.float32(255)
    scaled = y.astype(np.float64) * 2.0**24  # exact
    return k[np.floor(scaled) == scaled]


def exact_grid_p_a(x: np.ndarray) -> np.ndarray:
    """P(h(x + delta) = A), delta ~ N(0, SIGMA^2), for real x: h's votes integrated over the rounding intervals.

    Every |k| >= 128 is class A (float32(k) / 255 has magnitude >= 1/2); the
    rest are listed by `class_a_levels`. float64 Phi: absolute error ~1e-16
    per term, negligible against the margins checked.
    """
    x = np.asarray(x, np.float64)[..., None]
    inner = class_a_levels(127)
    cdf = special.ndtr
    tails = (1 - cdf((127.5 / 255 - x[..., 0]) / SIGMA)) + cdf((-127.5 / 255 - x[..., 0]) / SIGMA)
    middle = cdf(((inner + 0.5) / 255 - x) / SIGMA) - cdf(((inner - 0.5) / 255 - x) / SIGMA)
    return tails + middle.sum(axis=-1)


class FloatNoiseAttackTest(tf.test.TestCase):

    def test_the_classifier_reads_the_rounding(self):
        # All levels of magnitude >= 128 are class A, and most below are not (0 is).
        a_levels = class_a_levels(2000)
        self.assertContainsSubset(list(range(128, 2001)) + list(range(-2000, -127)), a_levels.tolist())
        self.assertIn(0, a_levels)
        self.assertLess(np.sum(np.abs(a_levels) < 128), 20)

    def test_false_certificate_under_float_noise(self):
        # CERTIFY at x = 1: every selection and estimation sample is class A (proved in the docstring).
        self.assertEqual(float_counts(1.0, N0, [1, 0]), N0)
        votes = float_counts(1.0, N, [1, 1])
        self.assertEqual(votes, N)
        radius = stats.certified_radius(stats.clopper_pearson_lower(votes, N, ALPHA), SIGMA)
        self.assertAllClose(radius, SIGMA * scipy_stats.norm.isf(1 - ALPHA ** (1 / N)), rtol=1e-9)
        self.assertGreater(radius, 1.14)
        # x' = 0 lies within the radius, and its smoothed class is B: P(f = A) < 1/2 with confidence 1 - 1e-6.
        votes_at_0 = float_counts(0.0, N, [2, 1])
        self.assertLess(stats.clopper_pearson_upper(votes_at_0, N, 1e-6), 0.5)
        self.assertLess(abs(1.0 - 0.0), radius)

    def test_no_false_certificate_under_grid_noise(self):
        table = noise.grid_noise_table(SIGMA)
        self.assertGreater(grid_counts(255, N0, [1, 0], table), N0 / 2)  # the selection picks A (two classes)
        votes = grid_counts(255, N, [1, 1], table)
        p_lower = stats.clopper_pearson_lower(votes, N, ALPHA) - table.tv_slack(1)
        radius = stats.certified_radius(p_lower, SIGMA)
        # The sampled vote share agrees with the exact P_A(1) within 6 binomial standard errors.
        p_exact = float(exact_grid_p_a(1.0))
        self.assertLess(abs(votes / N - p_exact), 6 * np.sqrt(p_exact * (1 - p_exact) / N))
        # The table's own law gives the same P_A(1), up to its TV slack and float64 rounding: p_table is an exact
        # integer sum divided once (1e-16), p_exact sums ~30 ndtr differences of absolute error ~1e-16 each: 1e-14.
        a_levels = set(class_a_levels(255 + table.j_max).tolist())
        p_table = sum(m for j, m in zip(range(-table.j_max, table.j_max + 1), table.masses)
                      if 255 + j in a_levels) / 2.0**64
        self.assertLess(abs(p_table - p_exact), table.tv_slack_per_pixel + 1e-14)
        # An honest radius: about 0.5, well short of the class-B point x' = 0.
        self.assertBetween(radius, 0.3, 0.7)
        self.assertLess(float(exact_grid_p_a(0.0)), 0.5)
        # And the smoothed class is A at every point of the certified ball (a fine grid and every pixel level).
        ball = np.concatenate([np.linspace(1 - radius, 1 + radius, 4001),
                               np.arange(256)[np.abs(np.arange(256) / 255 - 1) <= radius] / 255])
        self.assertGreater(exact_grid_p_a(ball).min(), 0.5)


if __name__ == "__main__":
    tf.test.main()
