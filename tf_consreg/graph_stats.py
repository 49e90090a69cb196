"""The statistics of randomized smoothing as TensorFlow graph ops, for the exported model.

The float64 twins of stats.py's numpy/scipy functions that the exported
signatures (export.py) compute inside the SavedModel: Clopper-Pearson bounds,
Cohen et al.'s radius, PREDICT's two-sided binomial test and the staged
"settled" rule. They use core TensorFlow ops only (no py_function), so TF
Serving and the C++ loader run them without Python; the tests compare each
with scipy and with stats.py.
"""

import tensorflow as tf

# Bisection halves [0, 1] per step; after 64 steps the bracket is narrower
# than 2^-64 ~ 5e-20, below float64 resolution for bounds >= ~1e-4 and far
# below the 1e-6 accuracy needed anywhere.
_BISECTION_STEPS = 64


def _float64(value) -> tf.Tensor:
    # dtype_hint keeps Python floats from passing through float32 first.
    return tf.cast(tf.convert_to_tensor(value, dtype_hint=tf.float64), tf.float64)


def clopper_pearson_lower(successes: tf.Tensor, trials: tf.Tensor, alpha) -> tf.Tensor:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound.

    The bound is the alpha quantile of Beta(k, n - k + 1), i.e. the x with
    I_x(k, n - k + 1) = alpha where I is the regularized incomplete beta
    function, and 0 when k = 0. It equals
    `scipy.stats.beta.ppf(alpha, k, n - k + 1)` and Cohen et al.'s
    `proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]`. The
    quantile is found by bisection on `tf.math.betainc`, which increases in x.

    Args:
      successes: counts k, any integer or float dtype, shape [...].
      trials: counts n >= k, broadcastable to `successes`.
      alpha: significance level in (0, 1), a float or a scalar tensor.

    Returns:
      float64 tensor with the broadcast shape of `successes` and `trials`.
    """
    k, n = _float64(successes), _float64(trials)
    k, n = k + tf.zeros_like(n), n + tf.zeros_like(k)
    alpha = _float64(alpha)
    # betainc needs a > 0; the k = 0 entries are replaced by 0 at the end.
    a = tf.maximum(k, 1.0)
    b = n - k + 1.0

    def step(i, low, high):
        mid = 0.5 * (low + high)
        below = tf.math.betainc(a, b, mid) < alpha
        return i + 1, tf.where(below, mid, low), tf.where(below, high, mid)

    _, low, high = tf.while_loop(
        lambda i, low, high: i < _BISECTION_STEPS,
        step,
        (tf.constant(0), tf.zeros_like(k), tf.ones_like(k)),
    )
    return tf.where(k > 0, 0.5 * (low + high), tf.zeros_like(k))


def clopper_pearson_upper(successes: tf.Tensor, trials: tf.Tensor, alpha) -> tf.Tensor:
    """One-sided (1 - alpha) Clopper-Pearson upper confidence bound.

    The 1 - alpha quantile of Beta(k + 1, n - k), and 1 when k = n: by the
    symmetry of the binomial (failures are successes of 1 - p), it is
    1 - `clopper_pearson_lower`(n - k, n, alpha), as `stats.clopper_pearson_upper`.

    Args:
      successes: counts k, any integer or float dtype, shape [...].
      trials: counts n >= k, broadcastable to `successes`.
      alpha: significance level in (0, 1), a float or a scalar tensor.

    Returns:
      float64 tensor with the broadcast shape of `successes` and `trials`.
    """
    k, n = _float64(successes), _float64(trials)
    return 1.0 - clopper_pearson_lower(n - k, n, alpha)


def certified_radius(p_lower: tf.Tensor, sigma: float) -> tf.Tensor:
    """Cohen et al.'s L2 radius sigma * Phi^-1(p_lower) (float64; negative below 1/2)."""
    return _float64(sigma) * tf.math.ndtri(_float64(p_lower))


def binomial_test_two_sided(successes: tf.Tensor, trials: tf.Tensor) -> tf.Tensor:
    """Exact two-sided p-value of H0: p = 1/2 for k successes in n trials.

    Equals `scipy.stats.binomtest(k, n, 0.5).pvalue`, the sum of the
    probabilities of all outcomes no more likely than k. Under p = 1/2 the
    pmf is symmetric and strictly increases towards n/2, so with
    m = min(k, n - k) those outcomes are {x <= m} and {x >= n - m}, and the
    p-value is min(1, 2 P[X <= m]) (1 when k = n/2), with
    P[X <= m] = I_{1/2}(n - m, m + 1). (scipy treats pmfs within a relative
    1e-7 as equal; adjacent pmfs differ by the factor (n - m) / (m + 1),
    which is that close to 1 only for n > ~1e7.)

    Args:
      successes: counts k, any integer or float dtype.
      trials: counts n >= k (n = 0 gives p-value 1).

    Returns:
      float64 p-values with the broadcast shape of the arguments.
    """
    k, n = _float64(successes), _float64(trials)
    m = tf.minimum(k, n - k)
    # n - m >= n / 2 > 0 except when n = 0, handled by the final where.
    tail = tf.math.betainc(tf.maximum(n - m, 1.0), m + 1.0, tf.constant(0.5, tf.float64))
    p_value = tf.minimum(2.0 * tail, 1.0)
    return tf.where(2.0 * m >= n, tf.ones_like(p_value), p_value)


def settled(p_lower: tf.Tensor, p_upper: tf.Tensor, radius: tf.Tensor, sigma: float) -> tf.Tensor:
    """Whether an image's staged answer is settled: neither 1/2 nor Phi(radius / sigma) lies strictly between its bounds.

    The in-graph `stats.settled` for one radius per image, compared in radius
    units as there: sigma Phi^-1(p_lower) < r < sigma Phi^-1(p_upper) for
    r = 0 (a class or abstain) and r = radius (certified or not).

    Args:
      p_lower, p_upper: bounds on p_A, [B].
      radius: the radius asked of each image, [B], > 0.
      sigma: noise standard deviation.

    Returns:
      bool [B].
    """
    low, high = certified_radius(p_lower, sigma), certified_radius(p_upper, sigma)
    radius = _float64(radius)
    between = lambda r: tf.logical_and(low < r, r < high)
    return tf.logical_not(tf.logical_or(between(tf.zeros_like(radius)), between(radius)))
