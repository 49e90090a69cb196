"""The certification engine: class counts to decisions, as TensorFlow graph ops rounded toward the safe side.

One implementation of Cohen et al.'s (2019) CERTIFY and PREDICT decisions,
the staged rule and the radius, used by `smoothing.Smooth` (hence the
binaries) and by the exported signatures (export.py): the library and the
served model decide with the same code. Core TensorFlow ops only (no
py_function), so TF Serving and the C++ loader run them without Python.
stats.py is the independent scipy reference that the tests hold this
against.

Safe rounding. Every number that a certificate rests on is rounded toward
the side that can only cost a certificate, never grant one:

* a Clopper-Pearson lower bound is never above the exact one, an upper bound
  never below it;
* a radius is never above sigma Phi^-1(exact lower bound);
* PREDICT's p-value is never below the exact one (PREDICT may only abstain
  more).

How. The bounds are found by bisection on `tf.math.betainc`, and a point x
counts as below the lower bound only if betainc(x) < alpha (1 - c), where c
bounds betainc's relative error there: the bisection then returns the end
of its bracket where the exact I_x is below alpha. betainc's error grows
with the size of the exponent of its prefactor x^a (1 - x)^b / B(a, b),
each of whose terms is rounded to a relative float64 epsilon:
E = lgamma(a + b) + lgamma(a) + lgamma(b) + a |ln x| + b |ln(1 - x)| + 1.
Measured against mpmath at 50 digits at the Clopper-Pearson quantiles of
the grid k, n <= 10^6, alpha in {1e-3, 1e-2, 0.05, 7e-5}, its relative
error was at most 0.61 eps E (eps = 2^-52; worst 2.6e-9 at k = 990,000,
n = 10^6), so c = 4 eps E (`BETAINC_ERROR_FACTOR`) leaves 6.5x headroom.
`tf.math.ndtri`'s relative error was at most 3.1 eps (p from 1e-300 to
1 - 1e-16), so Phi^-1 is moved by 8 eps of itself (`NDTRI_MARGIN`) and the
product with sigma by one more ulp, toward the safe side.
tests/safe_rounding_test.py checks every bound, radius and p-value of the
grid against mpmath at 50 digits: none is on the unsafe side.

The cost, measured on that grid (tests/safe_rounding_test.py, `pytest -s`):
a bound moves by about 2 c alpha / density, at most a relative 2.3e-8 of
L* (small bounds of k = 1 in n = 10^6, where c is largest) and 3.6e-12 of
the bounds above 1/2 that certify; their radius sigma Phi^-1(L) lies at
most a relative 3.5e-10 below sigma Phi^-1(L*) (bounds just above 1/2,
where the radius is near 0), and rounding the radius itself costs 2.2e-15
of it. PREDICT's p-values are at most a relative 2.3e-8 above the exact ones.
"""

from typing import Tuple

import numpy as np
import tensorflow as tf

ABSTAIN = -1

# float64's machine epsilon, 2^-52.
_EPS = float(np.finfo(np.float64).eps)
# betainc's relative error is taken to be at most this many eps E (see the
# module docstring: measured at most 0.61 eps E on the grid).
BETAINC_ERROR_FACTOR = 4.0
# The relative margin on Phi^-1: ndtri's measured 3.1 eps, plus the rounding
# of the margin's own arithmetic (1 eps), with 2x headroom.
NDTRI_MARGIN = 8.0 * _EPS
# The smallest normal float64.
_TINY = float(np.finfo(np.float64).tiny)
# Bisection halves [0, 1] per step; after 64 steps the bracket is narrower
# than 2^-64 ~ 5e-20, below float64 resolution for bounds >= ~1e-4 and a
# relative 5e-11 of a bound as small as 1e-9.
_BISECTION_STEPS = 64


def _float64(value) -> tf.Tensor:
    # dtype_hint keeps Python floats from passing through float32 first.
    return tf.cast(tf.convert_to_tensor(value, dtype_hint=tf.float64), tf.float64)


def betainc_error_bound(a: tf.Tensor, b: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """The relative error assumed of `tf.math.betainc(a, b, x)` in float64: `BETAINC_ERROR_FACTOR` eps E.

    E = lgamma(a + b) + lgamma(a) + lgamma(b) + a |ln x| + b |ln(1 - x)| + 1,
    the size of the exponent of betainc's prefactor x^a (1 - x)^b / B(a, b);
    see the module docstring for the measurement behind the factor.

    Args:
      a, b: float64 parameters > 0.
      x: float64 points in (0, 1) (inf at 0 and 1).

    Returns:
      float64, broadcast shape.
    """
    return _betainc_error_bound(_log_beta_size(a, b), a, b, x)


def _log_beta_size(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    # The part of E that does not depend on x, computed once per bisection.
    return tf.math.lgamma(a + b) + tf.math.lgamma(a) + tf.math.lgamma(b) + 1.0


def _betainc_error_bound(size_ab: tf.Tensor, a: tf.Tensor, b: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    size = size_ab + a * tf.abs(tf.math.log(x)) + b * tf.abs(tf.math.log1p(-x))
    return BETAINC_ERROR_FACTOR * _EPS * size


def _round_down(x: tf.Tensor) -> tf.Tensor:
    return tf.math.nextafter(x, tf.fill(tf.shape(x), tf.constant(-np.inf, tf.float64)))


def _round_up(x: tf.Tensor) -> tf.Tensor:
    return tf.math.nextafter(x, tf.fill(tf.shape(x), tf.constant(np.inf, tf.float64)))


def _lower_quantile(successes: tf.Tensor, trials: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    """The alpha quantile of Beta(k, n - k + 1), never above the exact one; 0 where k = 0."""
    k, n = successes, trials
    # betainc needs a > 0; the k = 0 entries are replaced by 0 at the end.
    a = tf.maximum(k, 1.0)
    b = n - k + 1.0
    size_ab = _log_beta_size(a, b)

    def step(i, low, high):
        mid = 0.5 * (low + high)
        # x is below the exact quantile if even betainc(x) plus its largest
        # error is below alpha: then I_x < alpha exactly.
        below = tf.math.betainc(a, b, mid) < alpha * (1.0 - _betainc_error_bound(size_ab, a, b, mid))
        return i + 1, tf.where(below, mid, low), tf.where(below, high, mid)

    # `low` only ever holds 0 or a point shown to be below the quantile.
    _, low, _ = tf.while_loop(
        lambda i, low, high: i < _BISECTION_STEPS,
        step,
        (tf.constant(0), tf.zeros_like(k), tf.ones_like(k)),
    )
    return tf.where(k > 0, low, tf.zeros_like(k))


def _one_minus_up(y: tf.Tensor) -> tf.Tensor:
    """1 - y rounded up (never below the exact 1 - y), for y in [0, 1].

    fl(1 - y) is exact for y >= 1/2 (Sterbenz). For y < 1/2, u = fl(1 - y)
    is in [1/2, 1], so 1 - u is exact and u < 1 - y iff 1 - u > y: then
    the next float up is >= 1 - y.
    """
    u = 1.0 - y
    return tf.where((1.0 - u) > y, _round_up(u), u)


def _counts(successes, trials) -> Tuple[tf.Tensor, tf.Tensor]:
    k, n = _float64(successes), _float64(trials)
    return k + tf.zeros_like(n), n + tf.zeros_like(k)


def clopper_pearson_bounds(successes, trials, alpha, slack=0.0) -> Tuple[tf.Tensor, tf.Tensor]:
    """One-sided (1 - alpha) Clopper-Pearson lower and upper bounds, each rounded toward the safe side.

    The lower bound is the alpha quantile of Beta(k, n - k + 1) (0 when
    k = 0), `scipy.stats.beta.ppf(alpha, k, n - k + 1)`, Cohen et al.'s
    CERTIFY bound; the upper bound is the 1 - alpha quantile of
    Beta(k + 1, n - k) (1 when k = n), i.e. 1 - lower(n - k, n). One
    bisection finds both. With `slack` s > 0 they widen to
    max(0, lower - s) and min(1, upper + s), again rounded outward: the
    bounds of a count whose distribution is within total variation s of the
    binomial.

    Args:
      successes: counts k, any integer or float dtype, shape [...].
      trials: counts n >= k, broadcastable to `successes`.
      alpha: level in (0, 1), a float or a tensor broadcastable to the counts.
      slack: float64 >= 0, broadcastable to the counts.

    Returns:
      (lower, upper), float64 with the broadcast shape of the counts:
      lower never above the exact bound, upper never below it.
    """
    k, n = _counts(successes, trials)
    alpha, slack = _float64(alpha), _float64(slack)
    alpha = alpha + tf.zeros_like(k)
    both = _lower_quantile(tf.concat([k[tf.newaxis], (n - k)[tf.newaxis]], 0),
                           tf.concat([n[tf.newaxis], n[tf.newaxis]], 0),
                           tf.concat([alpha[tf.newaxis], alpha[tf.newaxis]], 0))
    lower, upper = both[0], _one_minus_up(both[1])
    slack = slack + tf.zeros_like(lower)
    lower = tf.where(slack > 0, tf.maximum(_round_down(lower - slack), 0.0), lower)
    upper = tf.where(slack > 0, tf.minimum(_round_up(upper + slack), 1.0), upper)
    return lower, upper


def clopper_pearson_lower(successes, trials, alpha, slack=0.0) -> tf.Tensor:
    """The lower bound of `clopper_pearson_bounds`, never above the exact one.

    Args:
      successes, trials, alpha, slack: as for `clopper_pearson_bounds`.

    Returns:
      float64 with the broadcast shape of the counts.
    """
    k, n = _counts(successes, trials)
    lower = _lower_quantile(k, n, _float64(alpha) + tf.zeros_like(k))
    slack = _float64(slack) + tf.zeros_like(lower)
    return tf.where(slack > 0, tf.maximum(_round_down(lower - slack), 0.0), lower)


def clopper_pearson_upper(successes, trials, alpha, slack=0.0) -> tf.Tensor:
    """The upper bound of `clopper_pearson_bounds`, never below the exact one.

    Args:
      successes, trials, alpha, slack: as for `clopper_pearson_bounds`.

    Returns:
      float64 with the broadcast shape of the counts.
    """
    k, n = _counts(successes, trials)
    upper = _one_minus_up(_lower_quantile(n - k, n, _float64(alpha) + tf.zeros_like(k)))
    slack = _float64(slack) + tf.zeros_like(upper)
    return tf.where(slack > 0, tf.minimum(_round_up(upper + slack), 1.0), upper)


def _radius(p: tf.Tensor, sigma, direction: float) -> tf.Tensor:
    """sigma Phi^-1(p), moved by ndtri's error bound and one ulp in `direction` (-1 down, +1 up)."""
    z = tf.math.ndtri(_float64(p))
    moved = z + direction * tf.abs(z) * NDTRI_MARGIN
    finite = tf.math.is_finite(z)
    radius = _float64(sigma) * tf.where(finite, moved, z)
    radius = tf.where(finite, tf.math.nextafter(
        radius, tf.fill(tf.shape(radius), tf.constant(direction * np.inf, tf.float64))), radius)
    # Phi^-1(1/2) = 0 exactly; ndtri returns 0 only there (or next to it, on the safe side either way).
    return tf.where(tf.equal(z, 0.0), tf.zeros_like(radius), radius)


def certified_radius(p_lower, sigma) -> tf.Tensor:
    """Cohen et al.'s L2 radius sigma Phi^-1(p_lower), rounded down (float64; negative below 1/2).

    Never above sigma Phi^-1(p_lower) in exact arithmetic: ndtri's result is
    moved down by `NDTRI_MARGIN` of itself and the product by one ulp. It
    costs a relative 2e-15 of the radius.

    Args:
      p_lower: lower bounds on p_A, float64, in [0, 1].
      sigma: noise standard deviation, > 0.

    Returns:
      float64, the shape of `p_lower`; -inf at 0, +inf at 1.
    """
    return _radius(p_lower, sigma, -1.0)


def binomial_test_two_sided(successes, trials) -> tf.Tensor:
    """Exact two-sided p-value of H0: p = 1/2 for k successes in n trials, rounded up.

    Equals `scipy.stats.binomtest(k, n, 0.5).pvalue`, the sum of the
    probabilities of all outcomes no more likely than k. Under p = 1/2 the
    pmf is symmetric and strictly increases towards n/2, so with
    m = min(k, n - k) those outcomes are {x <= m} and {x >= n - m}, and the
    p-value is min(1, 2 P[X <= m]) (1 when k = n/2), with
    P[X <= m] = I_{1/2}(n - m, m + 1). (scipy treats pmfs within a relative
    1e-7 as equal; adjacent pmfs differ by the factor (n - m) / (m + 1),
    which is that close to 1 only for n > ~1e7.) The tail is raised by
    betainc's error bound and one ulp, so the p-value is never below the
    exact one: PREDICT may only abstain more.

    Args:
      successes: counts k, any integer or float dtype.
      trials: counts n >= k (n = 0 gives p-value 1).

    Returns:
      float64 p-values with the broadcast shape of the arguments.
    """
    k, n = _counts(successes, trials)
    m = tf.minimum(k, n - k)
    half = tf.constant(0.5, tf.float64)
    # n - m >= n / 2 > 0 except when n = 0, handled by the final where.
    a, b = tf.maximum(n - m, 1.0), m + 1.0
    tail = tf.math.betainc(a, b, half)
    # Never below the smallest normal float: TensorFlow flushes subnormals to
    # zero, and an exact tail like 2^-10000 must not round to 0.
    tail = tf.maximum(_round_up(tail * (1.0 + betainc_error_bound(a, b, half))), _TINY)
    p_value = tf.minimum(2.0 * tail, 1.0)
    return tf.where(2.0 * m >= n, tf.ones_like(p_value), p_value)


def to_float32_down(x) -> tf.Tensor:
    """float64 to float32 rounded toward -inf, for a served lower bound or radius (a cast rounds to nearest).

    The largest float32 not above x: a served radius r >= r' (float32) holds
    exactly when the float64 radius does.

    Args:
      x: float64 tensor.

    Returns:
      float32, the shape of x.
    """
    x = _float64(x)
    nearest = tf.cast(x, tf.float32)
    above = tf.cast(nearest, tf.float64) > x
    return tf.where(above, tf.math.nextafter(nearest, tf.fill(tf.shape(nearest), tf.constant(-np.inf, tf.float32))),
                    nearest)


def certify_from_counts(selection_counts, estimation_counts, trials, alpha, sigma,
                        slack=0.0) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """CERTIFY's decision from the two rounds of class counts.

    The top class is the argmax of the selection counts (the lowest index
    among ties); its probability is bounded below from the estimation counts
    out of `trials` (samples that voted for no class are failures). Where the
    bound is below 1/2: ABSTAIN with radius 0; otherwise the class with
    radius sigma Phi^-1(bound), both rounded down.

    Args:
      selection_counts: int [B, C], counts of the selection samples.
      estimation_counts: int [B, C], counts of the estimation samples.
      trials: the estimation samples drawn per image (scalar or [B]).
      alpha: level in (0, 1).
      sigma: noise standard deviation, > 0.
      slack: as for `clopper_pearson_bounds`.

    Returns:
      (classes int64 [B] with ABSTAIN = -1, radii float64 [B] >= 0, p_lower float64 [B]).
    """
    guess = tf.argmax(selection_counts, axis=-1, output_type=tf.int64)
    successes = tf.gather(estimation_counts, guess, axis=1, batch_dims=1)
    p_lower = clopper_pearson_lower(successes, trials, alpha, slack)
    classes, radii = certify_decision(guess, p_lower, sigma)
    return classes, radii, p_lower


def certify_decision(guess, p_lower, sigma) -> Tuple[tf.Tensor, tf.Tensor]:
    """CERTIFY's answer from the guessed class and its lower bound: ABSTAIN (radius 0) below 1/2.

    Args:
      guess: int [B], the class chosen by the selection samples.
      p_lower: float64 [B], its lower bound.
      sigma: noise standard deviation, > 0.

    Returns:
      (classes int64 [B], radii float64 [B] >= 0, rounded down).
    """
    p_lower = _float64(p_lower)
    certified = p_lower >= 0.5
    # At p_lower = 1/2 the radius is 0 exactly, not the -0 ulp of rounding down.
    radii = tf.where(certified, tf.maximum(certified_radius(tf.where(certified, p_lower, 0.5), sigma), 0.0), 0.0)
    classes = tf.where(certified, tf.cast(guess, tf.int64), tf.constant(ABSTAIN, tf.int64))
    return classes, radii


def predict_from_counts(counts, alpha) -> tf.Tensor:
    """PREDICT's decision: the top class, or ABSTAIN where the test of the top two counts has p-value > alpha.

    Among equal counts the lower class comes first (as `stats.predict_from_counts`).
    A row without votes has p-value 1 and abstains.

    Args:
      counts: int [B, C], C >= 2.
      alpha: level in (0, 1), scalar or [B].

    Returns:
      int64 [B] classes, ABSTAIN = -1.
    """
    top = tf.math.top_k(counts, k=2)
    p_value = binomial_test_two_sided(top.values[:, 0], top.values[:, 0] + top.values[:, 1])
    return tf.where(p_value > _float64(alpha), tf.constant(ABSTAIN, tf.int64), tf.cast(top.indices[:, 0], tf.int64))


def settled(p_lower, p_upper, radii, sigma) -> tf.Tensor:
    """Whether an image's staged answer is settled: no threshold lies strictly between its bounds.

    The thresholds are 1/2 (a class or ABSTAIN) and Phi(r / sigma) for each
    radius r asked (certified at r or not), compared in radius units:
    sigma Phi^-1(p_lower) < r < sigma Phi^-1(p_upper) for r = 0 and r in
    `radii`, with the lower radius rounded down (the very number that the
    certificate compares with r) and the upper one rounded up. The radii
    broadcast against [B, 1]: [R] asks every image the same R radii, [B, 1]
    one radius per image.

    Args:
      p_lower, p_upper: bounds on p_A, [B].
      radii: float [R] or [B, R], > 0.
      sigma: noise standard deviation, > 0.

    Returns:
      bool [B].
    """
    low = certified_radius(p_lower, sigma)[:, tf.newaxis]
    high = _radius(p_upper, sigma, 1.0)[:, tf.newaxis]
    radii = _float64(radii)
    points = tf.concat([tf.zeros_like(radii[..., :1]), radii], axis=-1)
    between = tf.logical_and(low < points, points < high)
    return tf.logical_not(tf.reduce_any(between, axis=-1))


def certify_stage(successes, trials, level, sigma, radii, slack=0.0) -> Tuple[tf.Tensor, tf.Tensor]:
    """One stage of a staged CERTIFY: the lower bound at the stage's level and whether the image is settled.

    Args:
      successes: int [B], the guessed class's count among the `trials`
        estimation samples so far.
      trials: n_k, the stage's cumulative sample count.
      level: the stage's level (`stage_levels`).
      sigma: noise standard deviation.
      radii: [R] or [B, R], as for `settled`.
      slack: as for `clopper_pearson_bounds`.

    Returns:
      (p_lower float64 [B], settled bool [B]).
    """
    lower, upper = clopper_pearson_bounds(successes, trials, level, slack)
    return lower, settled(lower, upper, radii, sigma)


def stage_levels(alpha, num_stages) -> tf.Tensor:
    """The level of each stage of a staged run; they sum to alpha (`stats.stage_levels`, bit for bit).

    One stage: alpha. K > 1 stages: alpha / (2 (K - 1)) for each but the
    last, alpha / 2 for the last (stats.py's docstring says why).

    Args:
      alpha: level of the whole run, in (0, 1).
      num_stages: K >= 1, int or scalar int tensor.

    Returns:
      float64 [K].
    """
    alpha = _float64(alpha)
    num_stages = tf.cast(num_stages, tf.int32)
    early = alpha / tf.cast(2 * tf.maximum(num_stages - 1, 1), tf.float64)
    last = tf.where(num_stages > 1, alpha / 2.0, alpha)
    return tf.where(tf.range(num_stages) < num_stages - 1, early, last)
