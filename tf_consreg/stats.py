"""Statistics of randomized smoothing (Cohen et al., 2019), in numpy and scipy.

The functions take class counts of noisy samples and return what CERTIFY and
PREDICT report: a one-sided Clopper-Pearson lower bound on the top class's
probability, the certified L2 radius sigma * Phi^-1(p_lower), and the
two-sided binomial test that PREDICT uses to abstain. All of them work
elementwise on arrays. No TensorFlow here, so the analysis tools and these
tests run without it.

Staged certification (`staged_certify`, `staged_predict`) draws the
estimation samples in stages n_1 < ... < n_K = n_max and stops an image as
soon as its answer is settled. Why stopping early keeps the (1 - alpha)
guarantee: the top class c is fixed by separate selection samples, so
p_A = P(f(x + d) = c) is a fixed number during estimation. At stage k the
one-sided Clopper-Pearson lower bound L_k on p_A, at level a_k, from the
first n_k estimation samples, satisfies P(L_k > p_A) <= a_k, and the levels
sum to alpha (`stage_levels`). By the union bound P(L_k > p_A for some k) <=
alpha: with probability >= 1 - alpha all K bounds hold at once, so the bound
L_tau at the stage tau where an image stops is valid whatever
(data-dependent) rule chose tau. The certificate uses L_tau only. The upper
bounds U_k (also at level a_k) steer the stopping and nothing else: a U_k
below p_A stops an image as "not certified" where n_max samples might have
certified it, which costs power, never soundness. PREDICT is the same
argument with its binomial test at level a_k at stage k.

Safe rounding, as in the certification engine (engine.py, whose docstring
derives the margins): a lower bound is never above the exact
Clopper-Pearson bound, an upper bound never below it, a radius never above
sigma Phi^-1(exact lower bound), and a p-value never below the exact one.
scipy's beta.ppf is moved down until beta.cdf, less its error bound
`BETA_CDF_ERROR_FACTOR` eps E, shows the point below the exact quantile
(scipy's beta.cdf was measured against mpmath within 0.1 eps E on the
grid k, n <= 10^6, far inside the bound; beta.ppf within 18 eps), and
norm.ppf (measured within 3.1 eps) by `NORM_PPF_MARGIN` of itself and one
ulp. tests/safe_rounding_test.py checks both against mpmath.
"""

from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import special as scipy_special
from scipy import stats as scipy_stats

from tf_consreg import certify_spec
# The stage schedule's rules are the configs' (certify_spec); the library's
# staged sampling and these references check schedules by them.
from tf_consreg.certify_spec import check_stages, default_stages, resolve_stages  # pylint: disable=unused-import

ABSTAIN = -1

_EPS = float(np.finfo(np.float64).eps)
# The relative error assumed of scipy's beta.cdf(x, a, b) is this many eps E,
# E = lgamma(a + b) + lgamma(a) + lgamma(b) + a |ln x| + b |ln(1 - x)| + 1:
# the engine's bound for tf.math.betainc (engine.BETAINC_ERROR_FACTOR),
# which scipy's measured error is far inside.
BETA_CDF_ERROR_FACTOR = 4.0
# norm.ppf's measured 3.1 eps relative error plus 1 eps for the margin's own
# rounding, with 2x headroom (engine.NDTRI_MARGIN).
NORM_PPF_MARGIN = 8.0 * _EPS
# Newton steps of `_beta_quantile_down`; one or two suffice on the grid.
_MAX_CORRECTIONS = 64

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
    lower = _lower_quantile(k, n, alpha)
    return lower if lower.ndim else float(lower)


def beta_cdf_error_bound(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The relative error assumed of `scipy.stats.beta.cdf(x, a, b)`: `BETA_CDF_ERROR_FACTOR` eps E.

    E = lgamma(a + b) + lgamma(a) + lgamma(b) + a |ln x| + b |ln(1 - x)| + 1
    (engine.py's docstring says where it comes from); inf at x = 0 and 1.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        size = (scipy_special.gammaln(a + b) + scipy_special.gammaln(a) + scipy_special.gammaln(b)
                + a * np.abs(np.log(x)) + b * np.abs(np.log1p(-x)) + 1.0)
    return BETA_CDF_ERROR_FACTOR * _EPS * size


def _lower_quantile(k: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """The alpha quantile of Beta(k, n - k + 1), never above the exact one; 0 where k = 0.

    scipy's beta.ppf, moved down by Newton steps toward the level
    alpha (1 - 2 c) (at least one ulp each) until beta.cdf shows it below the
    exact quantile: beta.cdf(x) < alpha (1 - c), c = `beta_cdf_error_bound`.
    """
    a, b = np.maximum(k, 1).astype(np.float64), (n - k + 1).astype(np.float64)
    # beta.ppf is NaN for a shape parameter of 0; the bound is 0 there.
    with np.errstate(invalid="ignore"):
        q = np.where(k == 0, 0.0, scipy_stats.beta.ppf(alpha, a, b))
    for _ in range(_MAX_CORRECTIONS):
        c = beta_cdf_error_bound(a, b, q)
        cdf = scipy_stats.beta.cdf(q, a, b)
        unproven = (q > 0) & ~(cdf < alpha * (1.0 - c))
        if not unproven.any():
            return q
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = q - (cdf - alpha * (1.0 - 2.0 * c)) / scipy_stats.beta.pdf(q, a, b)
        newton = np.where(np.isfinite(newton) & (newton >= 0), newton, 0.5 * q)
        q = np.where(unproven, np.minimum(newton, np.nextafter(q, 0.0)), q)
    # Not proven after all the steps (never seen): 0 is a valid lower bound.
    return np.where((q > 0) & ~(scipy_stats.beta.cdf(q, a, b) < alpha * (1.0 - beta_cdf_error_bound(a, b, q))),
                    0.0, q)


def _one_minus_up(y: np.ndarray) -> np.ndarray:
    """1 - y rounded up, for y in [0, 1]: exact for y >= 1/2 (Sterbenz), else checked (engine._one_minus_up)."""
    u = 1.0 - y
    return np.where((1.0 - u) > y, np.nextafter(u, np.inf), u)


def _radius(p: np.ndarray, sigma: float, direction: float) -> np.ndarray:
    """sigma Phi^-1(p), moved by norm.ppf's error bound and one ulp in `direction` (-1 down, +1 up)."""
    z = scipy_stats.norm.ppf(p)
    finite = np.isfinite(z)
    with np.errstate(invalid="ignore"):
        radius = sigma * np.where(finite, z + direction * np.abs(z) * NORM_PPF_MARGIN, z)
    radius = np.where(finite, np.nextafter(radius, direction * np.inf), radius)
    return np.where(z == 0.0, 0.0, radius)


def certified_radius(p_lower: ArrayLike, sigma: float) -> Union[float, np.ndarray]:
    """The L2 radius sigma * Phi^-1(p_lower) certified by a lower bound on p_A, rounded down.

    Cohen et al. (2019), Theorem 1 with p_B <= 1 - p_A. The value is <= 0 when
    p_lower <= 1/2, where CERTIFY abstains instead of reporting it. Never above
    the exact sigma Phi^-1(p_lower): norm.ppf is moved down by
    `NORM_PPF_MARGIN` of itself and the product by one ulp.

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
    radius = _radius(p, float(sigma), -1.0)
    return radius if radius.ndim else float(radius)


def binomial_test_pvalue(successes: ArrayLike, trials: ArrayLike, p: float = 0.5) -> Union[float, np.ndarray]:
    """Two-sided exact binomial test p-value of k successes in n trials (scipy's `binomtest`).

    PREDICT applies it to the top two class counts (k = count of the top
    class, n = sum of the top two) with p = 1/2. For p = 1/2 the p-value is
    rounded up (raised by beta.cdf's error bound and one ulp), never below
    the exact one, so PREDICT may only abstain more.

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
    if p == 0.5:
        # Vectorized: `binomtest` costs about a millisecond per call, too
        # slow for staged PREDICT's many tests. Under p = 1/2 the pmf is
        # symmetric and increases towards n/2, so the outcomes no more likely
        # than k are x <= m and x >= n - m, m = min(k, n - k): the p-value is
        # min(1, 2 P[X <= m]), and 1 at k = n/2. (binomtest counts pmfs within
        # a relative 1e-7 as equal; adjacent ones differ by (n - m) / (m + 1),
        # that close to 1 only for n above about 1e7.)
        m = np.minimum(k, n - k)
        # binom.cdf(m, n, 1/2) = I_{1/2}(n - m, m + 1), beta.cdf's function.
        tail = scipy_stats.binom.cdf(m, n, 0.5)
        # At least the smallest normal float, as the engine (an exact 2^-10000 must not round to 0).
        tail = np.maximum(np.nextafter(tail * (1.0 + beta_cdf_error_bound(n - m, m + 1, 0.5)), np.inf),
                          np.finfo(np.float64).tiny)
        pvalues = np.where(2 * m >= n, 1.0, np.minimum(1.0, 2.0 * tail))
    else:
        flat = [scipy_stats.binomtest(int(a), int(b), p).pvalue for a, b in zip(k.ravel(), n.ravel())]
        pvalues = np.asarray(flat, dtype=np.float64).reshape(k.shape)
    return pvalues if pvalues.ndim else float(pvalues)


def certify_from_counts(selection_counts: np.ndarray, estimation_counts: np.ndarray, *, n: int, alpha: float,
                        sigma: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen et al.'s CERTIFY decision from the two rounds of class counts.

    The top class is guessed from the selection counts; its probability is
    bounded with the (independent) estimation counts, out of n trials. Where
    the bound is below 1/2 the result is ABSTAIN with radius 0.

    Args:
      selection_counts: int [B, num_classes], counts of the n0 selection samples.
      estimation_counts: int [B, num_classes], counts of the n fresh estimation
        samples. A row may sum to less than n: samples that voted for no class
        (non-finite logits, see `smoothing.sample_counts`) are failures.
      n: the estimation samples drawn per image, the trials of the bound.
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
    if np.any(estimation.sum(axis=1) > n):
        raise ValueError(f"estimation counts sum to more than n={n}")
    # The trials are n, not the row sums: a sample that voted for no class is a failure.
    p_lower = np.atleast_1d(clopper_pearson_lower(n_a, n, alpha))
    classes, radii = _certify_decision(guess, p_lower, sigma)
    return classes, radii, p_lower


def _certify_decision(guess: np.ndarray, p_lower: np.ndarray, sigma: float) -> Tuple[np.ndarray, np.ndarray]:
    """CERTIFY's answer from the guessed class and its lower bound: (classes, radii), ABSTAIN below 1/2."""
    certified = p_lower >= 0.5
    radii = np.where(certified, certified_radius(np.where(certified, p_lower, 0.5), sigma), 0.0)
    classes = np.where(certified, guess, ABSTAIN).astype(np.int64)
    return classes, radii.astype(np.float64)


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
    trials = count1 + count2
    # Where no sample voted for a class (all logits non-finite, see
    # smoothing.sample_counts) there is nothing to test: p-value 1, abstain.
    pvalues = np.ones(len(counts))
    voted = trials > 0
    pvalues[voted] = binomial_test_pvalue(count1[voted], trials[voted], 0.5)
    return np.where(pvalues > alpha, ABSTAIN, top).astype(np.int64)


# --------------------------------------------------------------------------
# Staged certification: stop each image as soon as its answer is settled.


def clopper_pearson_upper(successes: ArrayLike, trials: ArrayLike, alpha: float) -> Union[float, np.ndarray]:
    """One-sided (1 - alpha) Clopper-Pearson upper confidence bound on a binomial proportion.

    The mirror image of `clopper_pearson_lower`: the 1 - alpha quantile of
    Beta(k + 1, n - k), and 1 when k = n; it equals
    1 - clopper_pearson_lower(n - k, n, alpha), and is computed so, with the
    subtraction rounded up: never below the exact bound.

    Args:
      successes: number of successes k (int or int array), 0 <= k <= trials.
      trials: number of trials n (int or int array), >= 1.
      alpha: failure probability, in (0, 1).

    Returns:
      The upper bound(s), float in (0, 1]; an array if an input is an array.

    Raises:
      ValueError: as `clopper_pearson_lower`.
    """
    _check_alpha(alpha)
    k, n = _check_counts(successes, trials)
    upper = _one_minus_up(_lower_quantile(n - k, n, alpha))
    return upper if upper.ndim else float(upper)


def check_radii(radii: Sequence[float]) -> np.ndarray:
    """The radii asked of a staged certification, checked (`certify_spec.check_radii`), as float64 [R] in order."""
    return np.asarray(certify_spec.check_radii(radii), dtype=np.float64)


def settled(p_lower: ArrayLike, p_upper: ArrayLike, radii: Sequence[float], sigma: float) -> np.ndarray:
    """Whether an image's answer is settled for the radii: no threshold lies strictly between its bounds.

    The thresholds are Phi(r / sigma) for r in radii (certified at r or not)
    and 1/2 (a class or ABSTAIN). The comparison is made in radius units,
    sigma Phi^-1(p_lower) < r < sigma Phi^-1(p_upper) for r in radii and 0,
    which is the same in exact arithmetic (Phi increases strictly) and, in
    floating point, uses the very numbers that the decision "radius >= r"
    compares (the lower radius rounded down, as `certified_radius`; the
    upper one rounded up), so a settled image's answer is what its bounds say.

    Args:
      p_lower, p_upper: bounds on p_A, arrays of one shape [B], in [0, 1].
      radii: the radii asked, finite and > 0.
      sigma: noise standard deviation, > 0.

    Returns:
      bool [B].

    Raises:
      ValueError: bad radii, sigma or bounds.
    """
    points = np.concatenate([[0.0], check_radii(radii)])
    low = np.asarray(certified_radius(p_lower, sigma))[..., None]
    certified_radius(p_upper, sigma)  # Checks sigma and the bounds.
    high = np.asarray(_radius(np.asarray(p_upper, dtype=np.float64), float(sigma), 1.0))[..., None]
    return ~np.any((low < points) & (points < high), axis=-1)


class StagedCertificate(NamedTuple):
    """The answer of a staged CERTIFY for a batch of B images and R radii.

    Attributes:
      classes: int64 [B], the guessed class, or ABSTAIN (-1) where the lower
        bound at the stopping stage is below 1/2.
      radii: float64 [B], the certified radius sigma Phi^-1(p_lower) at the
        stopping stage; 0 where abstaining.
      certified: bool [B, R], certified[i, j] iff radii[i] >= the j-th radius
        asked: g is then constant within that L2 distance of image i (with
        probability >= 1 - alpha over the whole run).
      samples: int64 [B], estimation samples drawn for the image (one of the
        stages).
      p_lower: float64 [B], the lower bound on p_A (at the stopping stage's level) at the
        stopping stage.
    """

    classes: np.ndarray
    radii: np.ndarray
    certified: np.ndarray
    samples: np.ndarray
    p_lower: np.ndarray


class StagedPrediction(NamedTuple):
    """The answer of a staged PREDICT for a batch of B images.

    Attributes:
      classes: int64 [B], the top class, or ABSTAIN (-1) where the test did
        not reject a tie of the top two classes by the last stage.
      samples: int64 [B], samples drawn for the image (one of the stages).
    """

    classes: np.ndarray
    samples: np.ndarray


# draw(active, stage, num_new) -> new counts of the images `active`.
DrawFn = Callable[[np.ndarray, int, int], np.ndarray]
# stage_rule(successes [A], n_k, level) -> (p_lower [A], settled bool [A]) for the radii asked.
StageRuleFn = Callable[[np.ndarray, int, float], Tuple[np.ndarray, np.ndarray]]
# decision(guesses [B], p_lower [B]) -> (classes int64 [B], radii float64 [B]), CERTIFY's answer.
DecisionFn = Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]
# predict_rule(counts [A, C], level) -> classes int64 [A], ABSTAIN where the test does not reject.
PredictRuleFn = Callable[[np.ndarray, float], np.ndarray]


def _check_draw(new: np.ndarray, shape: Tuple[int, ...], num_new: int) -> np.ndarray:
    """Checks what `draw` returned: [A] successes <= num_new, or [A, C] class counts summing to <= num_new.

    Counts may sum to less than num_new: samples that voted for no class
    (see `smoothing.sample_counts`).
    """
    new = np.asarray(new)
    if new.shape != shape or (new.size and (not np.issubdtype(new.dtype, np.integer) or new.min() < 0)):
        raise ValueError(f"draw must return non-negative integer counts of shape {shape}, got {new.shape} "
                         f"{new.dtype}")
    if new.size and (new.max() if new.ndim == 1 else new.sum(axis=1).max()) > num_new:
        raise ValueError(f"draw must return counts of the {num_new} samples asked for")
    return new.astype(np.int64)


def stage_levels(alpha: float, num_stages: int) -> Tuple[float, ...]:
    """The level of each stage's bounds (or test) in a staged run; they sum to alpha.

    One stage: alpha, i.e. fixed-n CERTIFY or PREDICT. K > 1 stages: the last
    alpha / 2 and each earlier one alpha / (2 (K - 1)). The union bound
    allows any split; this one spends half the budget where it decides
    certificates. The images still running at the last stage are the ones
    whose p_A lies near a threshold, and there the level moves the answer: at
    alpha / 2 the last bound is within ln(2) / n_K of fixed-n CERTIFY's in
    -log(1 - p_lower) terms, where an even split (alpha / 8 for the default 8
    stages) lost certificates at the largest radii of a grid. The early
    stages only stop images far from every threshold, for which a smaller
    level costs few samples (the samples needed grow like log(1 / level)).

    Args:
      alpha: failure probability of the whole run, in (0, 1).
      num_stages: K, >= 1.

    Returns:
      K levels, in stage order.
    """
    _check_alpha(alpha)
    if isinstance(num_stages, bool) or not isinstance(num_stages, (int, np.integer)) or num_stages < 1:
        raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
    if num_stages == 1:
        return (alpha,)
    return (alpha / (2 * (num_stages - 1)),) * (num_stages - 1) + (alpha / 2,)


def staged_certify(guesses: np.ndarray, draw: DrawFn, stages: Sequence[int], *, alpha: float, sigma: float,
                   radii: Sequence[float], stage_rule: Optional[StageRuleFn] = None,
                   decision: Optional[DecisionFn] = None) -> StagedCertificate:
    """CERTIFY with estimation samples drawn in stages, each image stopping once its answer is settled.

    At stage k = 0, ..., K - 1, the images still running get n_k - n_{k-1}
    fresh samples (n_{-1} = 0); the one-sided Clopper-Pearson bounds at level
    `stage_levels(alpha, K)[k]` on the guessed class's probability, from
    all n_k samples so far, decide whether the image is settled (`settled`). An image stops at
    the first settled stage, and at n_K otherwise. Its radius is sigma
    Phi^-1(lower bound) at that stage, and it is certified at a radius r iff
    radius >= r, the convention of certified accuracy in analysis.py (g is
    then constant on the open L2 ball of radius r). Why this is valid at
    level alpha: see the module docstring. With one stage it is CERTIFY.

    The draws must be independent of the selection samples that chose
    `guesses`, and fresh for every image and stage.

    Args:
      guesses: int [B], each image's class from its selection samples.
      draw: draw(active, k, m) returns int [len(active)], how many of m fresh
        samples of each image `guesses[active]` classified as its guess;
        `active` is an int array of indices into `guesses`, the images still
        running, in increasing order. Called once per stage while any image runs.
      stages: cumulative estimation counts n_1 < ... < n_K (`check_stages`).
      alpha: failure probability of the whole run, in (0, 1).
      sigma: noise standard deviation, > 0.
      radii: the radii asked, finite and > 0.
      stage_rule: the bounds and the settled rule of a stage; default this
        module's (`clopper_pearson_lower`, `clopper_pearson_upper`,
        `settled`). `smoothing.Smooth` passes the engine's.
      decision: CERTIFY's answer from the final bounds; default this
        module's. `smoothing.Smooth` passes the engine's.

    Returns:
      A `StagedCertificate`.

    Raises:
      ValueError: bad arguments, or `draw` returned counts of the wrong shape
        or more than it was asked for.
    """
    _check_alpha(alpha)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    stages, radii = check_stages(stages), check_radii(radii)
    guesses = np.asarray(guesses, dtype=np.int64)
    if guesses.ndim != 1:
        raise ValueError(f"guesses must be [B], got shape {guesses.shape}")
    if stage_rule is None:
        def stage_rule(successes, n_k, level):
            lower = np.atleast_1d(clopper_pearson_lower(successes, n_k, level))
            return lower, settled(lower, clopper_pearson_upper(successes, n_k, level), radii, sigma)
    if decision is None:
        decision = lambda guesses, p_lower: _certify_decision(guesses, p_lower, sigma)
    levels = stage_levels(alpha, len(stages))
    successes = np.zeros(len(guesses), np.int64)
    samples = np.zeros(len(guesses), np.int64)
    p_lower = np.zeros(len(guesses), np.float64)
    active, previous = np.arange(len(guesses)), 0
    for k, n_k in enumerate(stages):
        if not active.size:
            break
        successes[active] += _check_draw(draw(active, k, n_k - previous), active.shape, n_k - previous)
        samples[active] = n_k
        p_lower[active], done = stage_rule(successes[active], n_k, levels[k])
        if k < len(stages) - 1:
            active = active[~np.asarray(done, bool)]
        previous = n_k
    classes, radius = decision(guesses, p_lower)
    return StagedCertificate(classes=classes, radii=radius, certified=radius[:, None] >= radii[None, :],
                             samples=samples, p_lower=p_lower)


def staged_predict(num_images: int, draw: DrawFn, stages: Sequence[int], *, alpha: float,
                   predict_rule: Optional[PredictRuleFn] = None) -> StagedPrediction:
    """PREDICT with samples drawn in stages, each image stopping once its test rejects a tie.

    At each stage the two-sided binomial test of the top two counts so far
    (as `predict_from_counts`) runs at level `stage_levels(alpha, K)[k]`; an
    image stops with its top class as soon as it rejects, and ABSTAINs if it
    has not rejected at n_K. With probability >= 1 - alpha a returned class is
    g(x): stage k's test errs with probability <= its level, and the union bound
    covers every stage at once (module docstring). With one stage it is
    PREDICT.

    Args:
      num_images: B, >= 0.
      draw: draw(active, k, m) returns int [len(active), num_classes], the
        class counts of m fresh samples of each image in `active` (indices in
        range(B), increasing), with num_classes >= 2 fixed across calls.
      stages: cumulative sample counts n_1 < ... < n_K (`check_stages`).
      alpha: failure probability, in (0, 1).
      predict_rule: PREDICT's decision at a stage's level; default
        `predict_from_counts`. `smoothing.Smooth` passes the engine's.

    Returns:
      A `StagedPrediction`.

    Raises:
      ValueError: bad arguments or counts.
    """
    _check_alpha(alpha)
    stages = check_stages(stages)
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 0:
        raise ValueError(f"num_images must be an integer >= 0, got {num_images!r}")
    levels = stage_levels(alpha, len(stages))
    classes = np.full(num_images, ABSTAIN, np.int64)
    samples = np.zeros(num_images, np.int64)
    counts = None
    active, previous = np.arange(num_images), 0
    for k, n_k in enumerate(stages):
        if not active.size:
            break
        new = np.asarray(draw(active, k, n_k - previous))
        if counts is None:
            if new.ndim != 2 or new.shape[1] < 2:
                raise ValueError(f"draw must return counts [len(active), num_classes >= 2], got {new.shape}")
            counts = np.zeros((num_images, new.shape[1]), np.int64)
        counts[active] += _check_draw(new, (len(active), counts.shape[1]), n_k - previous)
        samples[active] = n_k
        if predict_rule is None:
            classes[active] = predict_from_counts(counts[active], alpha=levels[k])
        else:
            classes[active] = predict_rule(counts[active], levels[k])
        active = active[classes[active] == ABSTAIN]
        previous = n_k
    return StagedPrediction(classes=classes, samples=samples)
