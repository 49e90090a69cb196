"""Statistics of randomized smoothing (Cohen et al., 2019), in numpy and scipy.

The functions take class counts of noisy samples and return what CERTIFY and
PREDICT report: a one-sided Clopper-Pearson lower bound on the top class's
probability, the certified L2 radius sigma * Phi^-1(p_lower), and the
two-sided binomial test that PREDICT uses to abstain. All of them work
elementwise on arrays. No TensorFlow here, so the analysis tools and these
tests run without it.
"""

from typing import Tuple, Union

import numpy as np
from scipy import stats as scipy_stats

ABSTAIN = -1

ArrayLike = Union[int, float, np.ndarray]


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:  # Also false for NaN.
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _check_counts(successes: ArrayLike, trials: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Validates binomial counts; returns them as broadcast int64 arrays."""
    k, n = np.asarray(successes), np.asarray(trials)
    for name, value in (("successes", k), ("trials", n)):
        if value.size and not np.issubdtype(value.dtype, np.integer):
            if not np.all(np.isfinite(value)) or np.any(value != np.round(value)):
                raise ValueError(f"{name} must be whole numbers, got {value}")
    k, n = np.broadcast_arrays(k.astype(np.int64), n.astype(np.int64))
    if np.any(n < 1):
        raise ValueError(f"trials must be >= 1, got {n.min()}")
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("successes must be in [0, trials]")
    return k, n


def clopper_pearson_lower(successes: ArrayLike, trials: ArrayLike, alpha: float) -> Union[float, np.ndarray]:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion.

    It is the lower end of the two-sided (1 - 2 alpha) "beta" interval, the
    bound of Cohen et al.'s CERTIFY: with probability at least 1 - alpha over
    the samples, the true proportion is >= the returned value. It is the
    alpha quantile of Beta(k, n - k + 1), and 0 when k = 0.

    Args:
      successes: number of successes k (int or int array), 0 <= k <= trials.
      trials: number of trials n (int or int array), >= 1.
      alpha: failure probability, in (0, 1).

    Returns:
      The lower bound(s), float in [0, 1); an array if an input is an array.

    Raises:
      ValueError: alpha outside (0, 1), trials < 1, successes outside [0, trials]
        or not whole numbers.
    """
    _check_alpha(alpha)
    k, n = _check_counts(successes, trials)
    # beta.ppf is NaN for a shape parameter of 0; the bound is 0 there.
    with np.errstate(invalid="ignore"):
        lower = scipy_stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1)
    lower = np.where(k == 0, 0.0, lower)
    return lower if lower.ndim else float(lower)


def certified_radius(p_lower: ArrayLike, sigma: float) -> Union[float, np.ndarray]:
    """The L2 radius sigma * Phi^-1(p_lower) certified by a lower bound on p_A.

    Cohen et al. (2019), Theorem 1 with p_B <= 1 - p_A. The value is <= 0 when
    p_lower <= 1/2, where CERTIFY abstains instead of reporting it.

    Args:
      p_lower: lower bound(s) on the top class's probability, in [0, 1].
      sigma: noise standard deviation, > 0.

    Returns:
      The radius (float or array; -inf at p_lower = 0, +inf at 1).

    Raises:
      ValueError: sigma <= 0 or p_lower outside [0, 1].
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    p = np.asarray(p_lower, dtype=np.float64)
    if np.any(~(p >= 0) | ~(p <= 1)):
        raise ValueError(f"p_lower must be in [0, 1], got {p_lower}")
    radius = sigma * scipy_stats.norm.ppf(p)
    return radius if radius.ndim else float(radius)


def binomial_test_pvalue(successes: ArrayLike, trials: ArrayLike, p: float = 0.5) -> Union[float, np.ndarray]:
    """Two-sided exact binomial test p-value of k successes in n trials (scipy's `binomtest`).

    PREDICT applies it to the top two class counts (k = count of the top
    class, n = sum of the top two) with p = 1/2.

    Args:
      successes: k (int or int array), 0 <= k <= trials.
      trials: n (int or int array), >= 1.
      p: success probability under the null hypothesis, in (0, 1).

    Returns:
      The p-value(s) in [0, 1].

    Raises:
      ValueError: bad counts or p outside (0, 1).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    k, n = _check_counts(successes, trials)
    flat = [scipy_stats.binomtest(int(a), int(b), p).pvalue for a, b in zip(k.ravel(), n.ravel())]
    pvalues = np.asarray(flat, dtype=np.float64).reshape(k.shape)
    return pvalues if pvalues.ndim else float(pvalues)


def certify_from_counts(selection_counts: np.ndarray, estimation_counts: np.ndarray, *, alpha: float,
                        sigma: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen et al.'s CERTIFY decision from the two rounds of class counts.

    The top class is guessed from the selection counts; its probability is
    bounded with the (independent) estimation counts. Where the bound is below
    1/2 the result is ABSTAIN with radius 0.

    Args:
      selection_counts: int [B, num_classes], counts of the n0 selection samples.
      estimation_counts: int [B, num_classes], counts of the n fresh estimation samples.
      alpha: failure probability, in (0, 1).
      sigma: noise standard deviation, > 0.

    Returns:
      (classes int64 [B] with ABSTAIN = -1, radii float64 [B] >= 0, p_lower float64 [B]).

    Raises:
      ValueError: bad shapes or arguments.
    """
    selection = np.asarray(selection_counts)
    estimation = np.asarray(estimation_counts)
    if selection.ndim != 2 or selection.shape != estimation.shape:
        raise ValueError(f"counts must both be [B, num_classes], got {selection.shape} and {estimation.shape}")
    guess = np.argmax(selection, axis=1)
    n_a = np.take_along_axis(estimation, guess[:, None], axis=1)[:, 0]
    p_lower = np.atleast_1d(clopper_pearson_lower(n_a, estimation.sum(axis=1), alpha))
    certified = p_lower >= 0.5
    radii = np.where(certified, certified_radius(np.where(certified, p_lower, 0.5), sigma), 0.0)
    classes = np.where(certified, guess, ABSTAIN).astype(np.int64)
    return classes, radii.astype(np.float64), p_lower


def predict_from_counts(counts: np.ndarray, *, alpha: float) -> np.ndarray:
    """Cohen et al.'s PREDICT decision from class counts.

    Returns the top class unless the two-sided binomial test of the top two
    counts cannot reject a tie at level alpha (p-value > alpha): then ABSTAIN.

    Args:
      counts: int [B, num_classes] with num_classes >= 2.
      alpha: failure probability, in (0, 1).

    Returns:
      int64 [B] classes, ABSTAIN = -1.

    Raises:
      ValueError: bad shapes or arguments.
    """
    _check_alpha(alpha)
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] < 2:
        raise ValueError(f"counts must be [B, num_classes >= 2], got {counts.shape}")
    order = np.argsort(-counts, axis=1, kind="stable")
    top, runner_up = order[:, 0], order[:, 1]
    count1 = np.take_along_axis(counts, top[:, None], axis=1)[:, 0]
    count2 = np.take_along_axis(counts, runner_up[:, None], axis=1)[:, 0]
    pvalues = np.atleast_1d(binomial_test_pvalue(count1, count1 + count2, 0.5))
    return np.where(pvalues > alpha, ABSTAIN, top).astype(np.int64)
