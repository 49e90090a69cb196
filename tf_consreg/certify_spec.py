"""What a certification asks for: one frozen `CertifySpec`, and the checks of stages and radii.

Every job that certifies (bin/certify.py and bin/predict.py, the export, live
certification while training, a search's trials) holds its sampling settings
in one `CertifySpec`, validated once, at construction, by the same rules:
sample counts and batch sizes are integers (never bools) in [1, 2^31), since
the sampling graph counts in int32; alpha is in (0, 1); sigma is finite and
> 0; a stage schedule strictly increases to n. The configs nest it, and
`cli` makes its fields flags (`--n0`, or `--certify_n0` under a prefix).

The stage schedule's rules (`check_stages`, `default_stages`,
`resolve_stages`) and the radii's (`check_radii`) live here too, so the
library, the configs and the analysis check them one way.

Standard library only: run configs and `cli` import it without TensorFlow.
"""

import collections.abc
import dataclasses
import fractions
import math
import numbers
from typing import Callable, Iterable, Optional, Sequence, Tuple

from tf_consreg import precision
from tf_consreg.errors import ConfigError, check

# The default schedule as fractions of n_max: steps of about sqrt(10) up to
# 0.3 n_max, then 0.5 n_max. bench/staged_sim_bench.py chose it among 7
# schedules on 5 of the authors' published logs (n_max = 100,000, alpha =
# 0.001): for one radius (0.5 or 1) it drew 9-450x fewer samples than fixed
# n, and no more than 13% above the best schedule but in one case of 10;
# for a grid of radii (0.25..1.75; 0.25..0.75 at sigma = 0.25) it drew the
# fewest, or within 4% of them. The 0.5
# stage matters there: an image whose every sample lands in the top class
# needs about ln(K / alpha) / -ln Phi(r / sigma) samples to be certified at
# r, about 40,000 for r = 1.75, sigma = 0.5.
_DEFAULT_STAGE_FRACTIONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1.0)
# Below about 100 samples a stage at its level (about alpha / (2 K)) settles almost nothing
# (all of 50 samples in the top class bound p_A only by 0.83 at K = 8,
# alpha = 0.001) but still takes its share of alpha.
DEFAULT_SMALLEST_STAGE = 100
# Sample counts and batch sizes are int32 in the sampling graph.
_INT32_LIMIT = 2**31
# The samplers of a certification: float32 Gaussian noise added to the image,
# or exact integer noise on the 8-bit grid (`noise.py`), sound in floating
# point (Voráček & Hein 2023).
NOISE_MODES = ("float", "grid")
# Grid is the default, written here once (CertifySpec and `smoothing.Smooth`
# take it from here): every dataset we ship is 8-bit, and only grid noise
# gives certificates that hold in floating point. "float" is for inputs that
# are not quantized.
DEFAULT_NOISE = "grid"
# The largest sigma the grid sampler's table takes (`noise.grid_noise_table`,
# which reads it here): at 16 the table already holds 58,000 bins.
GRID_MAX_SIGMA = 16.0


def _is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_stages(stages: Sequence[int], n: Optional[int] = None) -> Tuple[int, ...]:
    """Validates a stage schedule: cumulative sample counts n_1 < n_2 < ... < n_K.

    Args:
      stages: the cumulative numbers of samples after each stage, integers.
      n: if given, the last stage must equal it (n_K = n_max).

    Returns:
      The stages as a tuple of Python ints.

    Raises:
      ConfigError: naming `stages`, if it is empty, holds a non-integer or a
        value below 1, does not strictly increase, or does not end at n.
    """
    if isinstance(stages, (str, bytes)) or not hasattr(stages, "__len__") or len(stages) == 0:
        raise ConfigError(f"stages must be a non-empty sequence of sample counts, got {stages!r}")
    for value in stages:
        if not _is_int(value) or value < 1:
            raise ConfigError(f"stages must be integers >= 1, got {value!r} in {list(stages)}")
    stages = tuple(int(value) for value in stages)
    if any(b <= a for a, b in zip(stages, stages[1:])):
        raise ConfigError(f"stages must strictly increase (cumulative sample counts), got {list(stages)}")
    if n is not None and stages[-1] != n:
        raise ConfigError(f"stages must end at n={n} (the total sample count), got {list(stages)}")
    return stages


def default_stages(n: int, smallest: int = DEFAULT_SMALLEST_STAGE) -> Tuple[int, ...]:
    """The default stage schedule for n_max = n: n x (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1).

    Rounded to integers, stages below `smallest` dropped; for n = 100,000
    that is 100, 300, 1000, 3000, 10000, 30000, 50000, 100000 (K = 8). When n
    itself is below `smallest`, the one stage n (fixed-n CERTIFY).

    Args:
      n: n_max, the last stage, >= 1.
      smallest: the smallest first stage, >= 1 (give n0 if it is larger).

    Returns:
      The cumulative stages, increasing, ending at n.

    Raises:
      ConfigError: n or smallest not an integer >= 1.
    """
    for name, value in (("n", n), ("smallest", smallest)):
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    stages = {int(round(fraction * n)) for fraction in _DEFAULT_STAGE_FRACTIONS}
    return tuple(sorted(stage for stage in stages if stage >= smallest and stage < n)) + (int(n),)


def resolve_stages(stages: Optional[Sequence[int]], n: int, n0: Optional[int] = None) -> Tuple[int, ...]:
    """The stages of a staged run with n_max = n: checked, or the default (`default_stages`).

    With selection samples (n0, CERTIFY), a schedule of more than one stage
    must start at n0 or above. A first look after fewer estimation samples
    than the selection drew takes a share of the error budget for little:
    every image has paid for n0 + n_1 samples by then anyway. Such a
    schedule is most likely a mistake (counts that include n0, or a missing
    digit). A single stage n is fixed-n CERTIFY and may be below n0. The
    default schedule starts at max(n0, 100).

    Args:
      stages: cumulative sample counts, or None for the default.
      n: n_max, the last stage, >= 1.
      n0: CERTIFY's selection samples; None for PREDICT.

    Returns:
      The stages, increasing, ending at n.

    Raises:
      ConfigError: naming `stages`.
    """
    if stages is None:
        return default_stages(n, smallest=max(n0 or 1, DEFAULT_SMALLEST_STAGE))
    stages = check_stages(stages, n)
    if n0 is not None and len(stages) > 1 and stages[0] < n0:
        raise ConfigError(f"stages must start at n0={n0} or above (they count estimation samples only), "
                          f"got {list(stages)}")
    return stages


def check_radii(radii: Iterable[float], *, allow_zero: bool = False, digits: Optional[int] = None,
                name: str = "radii") -> Tuple[float, ...]:
    """Validates radii: at least one, each a finite number > 0 (>= 0 with `allow_zero`), none twice.

    The one rule for radii, whoever asks: a staged certification (its
    radii > 0: certified accuracy at 0 is no question of a radius), an
    analysis table (radius 0 is the smoothed classifier's accuracy) and a
    fixed-radius run's log, whose radii must be printable in `digits`
    significant digits. A radius r of at most 3 significant digits is a value
    the log's radius column can hold, so an image's radius rounded down to 3
    digits is >= r exactly when the radius itself is: the log then says which
    images the run certified at r. (With r = 0.3333 a radius of 0.33331 would
    print 0.333.)

    Args:
      radii: the radii asked.
      allow_zero: accept radius 0.
      digits: if given, each radius must equal itself printed in this many
        significant digits.
      name: how the message names them: "radii" in the library, "--radii"
        for a flag.

    Returns:
      The radii as Python floats, in the order given.

    Raises:
      ConfigError: naming `name`.
    """
    if isinstance(radii, (str, bytes)) or not isinstance(radii, collections.abc.Iterable):
        raise ConfigError(f"{name} must be a list of numbers, got {radii!r}")
    values = []
    for r in radii:
        if not _is_real(r):
            raise ConfigError(f"{name} must be numbers, got {r!r}")
        r = float(r)
        if not (math.isfinite(r) and (r >= 0 if allow_zero else r > 0)):
            raise ConfigError(f"{name} must be finite and {'>=' if allow_zero else '>'} 0, got {r}")
        if digits is not None and float(f"{r:.{digits}}") != r:
            raise ConfigError(f"{name}: {r!r} has more than {digits} significant digits; the TSV prints radii with "
                              f"{digits} (the authors' format), so it could not tell whether an image was certified "
                              f"at it. Give at most {digits}, e.g. {float(f'{r:.{digits}}')!r}")
        if r in values:
            raise ConfigError(f"{name} lists {r!r} twice")
        values.append(r)
    if not values:
        raise ConfigError(f"{name} must hold at least one radius, e.g. 0.5")
    return tuple(values)


def check_grid_sigma(sigma: Optional[float], noise: str) -> None:
    """Refuses a sigma above `GRID_MAX_SIGMA` with grid noise, whose table cannot sample it.

    The one check for every job that samples (CertifySpec, `smoothing.Smooth`,
    hence the export), made before any work: `noise.grid_noise_table` would
    only refuse it once the model is loaded and the first batch drawn.

    Args:
      sigma: the noise level (None: not known yet, checked when filled in).
      noise: the sampler (`NOISE_MODES`).

    Raises:
      ConfigError: naming --sigma and the way out, --noise=float.
    """
    check(noise != "grid" or sigma is None or sigma <= GRID_MAX_SIGMA,
          f"--sigma={sigma!r} with --noise=grid: grid noise: sigma must be in (0, {GRID_MAX_SIGMA:g}] (its noise "
          f"table holds no more); give --noise=float for a larger sigma")


def certify_can_certify(n: int, level: float, slack: float = 0.0) -> bool:
    """Whether CERTIFY with n estimation samples, bounding at `level`, can give any image a radius > 0.

    The best an image can do is every sample in its top class (k = n). The
    one-sided Clopper-Pearson lower bound is then level^(1/n) exactly (the
    level quantile of Beta(n, 1), whose CDF is x^n), less the grid's
    total-variation slack; a radius > 0 needs it above 1/2:
    level^(1/n) - slack > 1/2, i.e. level > (1/2 + slack)^n. Compared in
    exact rationals (level and slack are binary floats), so the answer is
    exact: when it is False every image abstains (or gets radius 0), since
    the engine's bound is never above the exact one.

    Args:
      n: estimation samples, >= 1.
      level: the bound's level: alpha for full CERTIFY, the last stage's
        share (`stats.stage_levels`) for a staged one.
      slack: the total-variation slack of one sample (grid noise), >= 0.
    """
    base = fractions.Fraction(1, 2) + fractions.Fraction(slack)
    if base >= 1:
        return False
    level = fractions.Fraction(level)
    # level > (p / q)^n as integers, which stays fast where Fraction's gcds would not.
    return level.numerator * base.denominator**n > base.numerator**n * level.denominator


def predict_can_decide(n: int, level: float) -> bool:
    """Whether PREDICT with n samples, testing at `level`, can return a class for any image.

    The best an image can do is every sample in one class: top two counts
    (n, 0), whose two-sided binomial p-value is min(1, 2 * 2^-n) = 2^(1 - n).
    PREDICT returns the class only if the p-value is at most the level; the
    engine's p-value is never below the exact one, so at 2^(1 - n) >= level
    every image abstains. Compared exactly.

    Args:
      n: samples, >= 1.
      level: the test's level (alpha, its grid or stage share).
    """
    level = fractions.Fraction(level)
    return level.numerator * 2**n > 2 * level.denominator


def smallest_n(can_decide: Callable[[int], bool], limit: int = 4096) -> Optional[int]:
    """The smallest n >= 1 with `can_decide(n)`, or None below `limit`.

    A linear search: for any level a float can hold (>= 2^-1074) the answer
    is at most 1075, or 1105 with a slack up to 0.01 (grid slacks are below
    1e-6), so `limit` is never reached by a real run; usual levels need a
    dozen comparisons.

    Args:
      can_decide: `certify_can_certify` or `predict_can_decide` with its
        level and slack bound, as a function of n.
      limit: where to give up.
    """
    return next((n for n in range(1, limit) if can_decide(n)), None)


@dataclasses.dataclass(frozen=True)
class CertifySpec:
    """The sampling settings of a smoothed classifier's certification, checked at construction.

    Each field is a flag of the binaries that certify (`--sigma --n0 --n
    --alpha --batch_size --stages --compute_dtype`; bin/train.py's and
    bin/tune.py's under the prefix `certify_`); messages name them so.

    Attributes:
      sigma: noise standard deviation in [0, 1] pixel units, finite and > 0;
        None: not known yet (a config fills in its training run's).
      n0: CERTIFY's selection samples per image.
      n: estimation samples per image (PREDICT's samples); a staged run's
        n_max.
      alpha: failure probability of each certificate (PREDICT's test level).
      batch_size: most noisy copies per forward pass.
      stages: a staged run's cumulative estimation sample counts, strictly
        increasing, ending at n; None: off, or the default schedule where a
        job is always staged (`resolved`). That a schedule of CERTIFY starts
        at n0 or above is checked by `resolved`, which knows the mode.
      compute_dtype: the dtype the base model computes in
        (`precision.COMPUTE_DTYPES`); the certificates hold for that function.
      noise: the sampler (`NOISE_MODES`): "grid" (the default,
        `DEFAULT_NOISE`), exact integer noise on the 8-bit grid, sound in
        floating point (inputs must be on the grid), or "float", float32
        Gaussian noise added to the image, for inputs that are not
        quantized. A recorded config or log without the field is "float"
        (it predates the grid sampler).
    """

    sigma: Optional[float] = None
    n0: int = 100
    n: int = 100000
    alpha: float = 0.001
    batch_size: int = 1000
    stages: Optional[Tuple[int, ...]] = None
    compute_dtype: str = "float32"
    noise: str = DEFAULT_NOISE

    def __post_init__(self):
        if self.sigma is not None:
            check(_is_real(self.sigma) and math.isfinite(self.sigma) and self.sigma > 0,
                  f"--sigma must be a finite number > 0, got {self.sigma!r}")
            object.__setattr__(self, "sigma", float(self.sigma))
        for name in ("n0", "n", "batch_size"):
            value = getattr(self, name)
            check(_is_int(value) and 1 <= value < _INT32_LIMIT,
                  f"--{name} must be an integer in [1, 2^31), got {value!r}")
            object.__setattr__(self, name, int(value))
        check(_is_real(self.alpha) and 0 < self.alpha < 1, f"--alpha must be in (0, 1), got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.stages is not None:
            object.__setattr__(self, "stages", _flag_error(check_stages, self.stages, self.n))
        precision.compute_policy(self.compute_dtype)  # Refuses an unknown --compute_dtype.
        check(self.noise in NOISE_MODES, f"--noise must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")
        check_grid_sigma(self.sigma, self.noise)

    def resolved(self, selection: bool = True) -> "CertifySpec":
        """The spec with its stage schedule resolved: checked against n0 (CERTIFY), or the default.

        Args:
          selection: the staged job draws n0 selection samples first
            (CERTIFY); False for PREDICT, whose stages have no lower limit.

        Raises:
          ConfigError: naming --stages.
        """
        stages = _flag_error(resolve_stages, self.stages, self.n, self.n0 if selection else None)
        return dataclasses.replace(self, stages=stages)

    def with_sigma(self, sigma: float) -> "CertifySpec":
        """The spec with sigma filled in from a training run (its own, when given, must agree).

        Raises:
          ConfigError: the spec holds another sigma.
        """
        check(self.sigma in (None, sigma),
              f"the certification's sigma={self.sigma} differs from the training run's --sigma={sigma}")
        return dataclasses.replace(self, sigma=sigma)


# The defaults of two kinds of jobs, but for sigma (the training run's): each
# differs from CertifySpec's (Cohen et al.'s n = 100,000) in n alone.
# Live certification while training and a search's trials watch a model
# rather than report its certificates: n = 1000, and float noise. Its numbers
# steer training (early stopping, a search's ranking) and are never reported
# as certificates, so the floating-point soundness of grid noise buys nothing
# there, while float noise takes any held-out images: those of a pipeline
# that is not 8-bit, or whose float ops land an ulp off the grid.
LIVE = CertifySpec(n=1000, noise="float")
# An export answers requests: n = 10,000 bounds each request's work. Its noise
# is the default, the exact grid sampler: every dataset we ship is 8-bit, and a
# served certificate should hold in floating point (--noise=float for inputs
# that are not quantized).
EXPORT = CertifySpec(n=10000)


def _flag_error(function, *args):
    """`function(*args)`, its "stages must ..." message naming the flag --stages."""
    try:
        return function(*args)
    except ConfigError as e:
        raise ConfigError(f"--{e}") from None


__all__ = ["CertifySpec", "DEFAULT_NOISE", "DEFAULT_SMALLEST_STAGE", "EXPORT", "GRID_MAX_SIGMA", "LIVE",
           "NOISE_MODES", "certify_can_certify", "check_grid_sigma", "check_radii", "check_stages", "default_stages",
           "predict_can_decide", "resolve_stages", "smallest_n"]
