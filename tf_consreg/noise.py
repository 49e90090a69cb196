"""Gaussian noise for randomized smoothing: its seeds, the float sampler and the exact grid sampler.

Every float draw of the project (training copies, certification samples,
the exported model's samples) goes through `standard_normal` with a
stateless seed, so that a draw depends only on its key, never on how work is
batched, split over replicas or resumed:

* Training: the seed of an example is keyed by (run seed, stream, step, the
  example's position in the global batch) (`step_seed`, `example_seeds`).
  Replicas hold different positions, so they draw different noise (unlike a
  Keras `SeedGenerator`, whose state is identical on every replica), and an
  example's noise does not depend on the number of replicas.
* Certification: the seed of an image is keyed by (run seed, image id,
  stream), and block j of its samples by `fold_in(seed, j)`
  (`per_image_seeds`; see `tf_consreg.smoothing.sample_counts`).

Noise is added in [0, 1] pixel space, before the model's normalization layer.

Grid noise (`grid_noise_table`, `grid_noise`, `grid_inputs`, `to_grid`) is
the sound alternative for 8-bit images (Voráček & Hein 2023): integer noise
j from the exactly rounded Gaussian, added to the integer pixels, so that
the model's input float32(a + j) / 255 is a function of a + j alone and the
smoothing is exact up to `GridNoise.tv_slack`. It takes the same stateless
seeds. To certify an image x in [0, 1] of d pixels with m samples:

    table = grid_noise_table(sigma)     # once per sigma (cached)
    pixels = to_grid(x)                 # int32 [H, W, C]; refuses an off-grid image
    j = grid_noise(tf.concat([[m], tf.shape(pixels)], 0), seed, table)  # int32 [m, H, W, C]
    inputs = grid_inputs(pixels, j)     # float32 [m, H, W, C]: what the model sees
    p_lower -= table.tv_slack(d); p_upper += table.tv_slack(d)
"""

import dataclasses
import decimal
import fractions
import functools
import math
from typing import Sequence, Tuple

import numpy as np
import tensorflow as tf

from tf_consreg import certify_spec
from tf_consreg import distribute


def standard_normal(shape: tf.Tensor, seed: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Stateless N(0, 1) noise of `shape`, by the Box-Muller transform.

    Exact Gaussian pairs from two uniforms, (sqrt(-2 ln u1) cos(2 pi u2),
    sqrt(-2 ln u1) sin(2 pi u2)), computed with vectorized TensorFlow ops. On
    this project's 2-core CPU it takes 7.6 us of CPU per 784-pixel sample,
    against 13 us for `tf.random.stateless_normal`, whose Box-Muller runs
    element by element: about 5% of LeNet certification time, so it is the
    one sampler of the project. Its float32 uniforms have 23 random bits, as
    TensorFlow's own normal sampler does, so the tails are cut at the same
    |z| of about 5.7.

    Args:
      shape: int32 1-D shape.
      seed: stateless seed, int32/int64 [2].
      dtype: float32 (the default) or float64.

    Returns:
      `dtype` tensor of `shape`.
    """
    size = tf.reduce_prod(shape)
    uniform = tf.random.stateless_uniform(tf.stack([2, (size + 1) // 2]), seed=seed, dtype=dtype)
    radius = tf.sqrt(-2.0 * tf.math.log1p(-uniform[0]))  # 1 - u in (0, 1]: no log(0).
    angle = (2.0 * math.pi) * uniform[1]
    pairs = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
    return tf.reshape(pairs[:size], shape)


def per_image_seeds(seed: tf.Tensor, num_images: tf.Tensor) -> tf.Tensor:
    """Returns one stateless seed per image, int64 [num_images, 2].

    A seed of shape [num_images, 2] is used as is; a seed of shape [2] is
    spread over the images by folding in each image's position.
    """
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 2:
        return seed
    return tf.map_fn(
        lambda i: tf.random.fold_in(seed, i),
        tf.range(tf.cast(num_images, tf.int64)),
        fn_output_signature=tf.TensorSpec([2], tf.int64),
    )


def step_seed(seed: int, stream: int, step: tf.Tensor) -> tf.Tensor:
    """The seed of one step of one random stream (training noise, eval noise, ...).

    Args:
      seed: the run's seed.
      stream: distinguishes independent uses of randomness in one run.
      step: int counter (the optimizer's iterations, say).

    Returns:
      int64 [2] stateless seed.
    """
    base = tf.constant([seed, stream], tf.int64)
    return tf.cast(tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64)), tf.int64)


def example_seeds(step_seed: tf.Tensor, local_batch_size: tf.Tensor) -> tf.Tensor:  # pylint: disable=redefined-outer-name
    """Stateless seeds for the examples this replica holds.

    The examples of a global batch are split across replicas in order, replica
    r holding positions [r * local, (r + 1) * local), so the global position of
    a local example is r * local + i. The training pipeline drops a last
    partial batch whenever there is more than one replica, which keeps every
    local batch the same size.

    Args:
      step_seed: int64 [2], the seed of this step (same on every replica).
      local_batch_size: scalar, examples on this replica.

    Returns:
      int64 [local_batch_size, 2]: one stateless seed per example.
    """
    local = tf.cast(local_batch_size, tf.int64)
    positions = tf.cast(distribute.replica_id(), tf.int64) * local + tf.range(local, dtype=tf.int64)
    step_seed = tf.cast(step_seed, tf.int64)
    return tf.stack([tf.fill([local], step_seed[0]), step_seed[1] * (1 << 32) + positions], axis=1)


def gaussian_noise(images: tf.Tensor, num_copies: int, sigma: float, seeds: tf.Tensor) -> tf.Tensor:
    """N(0, sigma^2 I) noise for `num_copies` copies of each image, copy-major.

    Example i's m copies are one `standard_normal` draw of shape [m, ...]
    from its seed.

    Args:
      images: [B, ...] images (only their shape and dtype are used).
      num_copies: m, noisy copies per image.
      sigma: noise standard deviation.
      seeds: int64 [B, 2] per-example seeds (see `example_seeds`).

    Returns:
      [m * B, ...] in the images' dtype: rows [i * B, (i + 1) * B) are the
      noise of copy i of every image (the layout of `tile_copies`).
    """
    shape = tf.concat([[num_copies], tf.shape(images)[1:]], axis=0)
    noise = tf.map_fn(lambda s: standard_normal(shape, s, dtype=images.dtype), seeds,
                      fn_output_signature=images.dtype, parallel_iterations=64)  # [B, m, ...]
    noise = tf.experimental.numpy.swapaxes(noise, 0, 1)  # [m, B, ...]
    return tf.cast(sigma, images.dtype) * tf.reshape(noise, tf.concat([[-1], tf.shape(images)[1:]], axis=0))


def tile_copies(values: tf.Tensor, num_copies: int) -> tf.Tensor:
    """[B, ...] -> [m * B, ...], copy-major (the whole batch repeated m times)."""
    multiples = tf.concat([[num_copies], tf.ones([tf.rank(values) - 1], tf.int32)], axis=0)
    return tf.tile(values, multiples)


# ---------------------------------------------------------------------------
# Exact grid noise (Voráček & Hein, "Sound randomized smoothing in
# floating-point arithmetics", ICLR 2023).
# ---------------------------------------------------------------------------

GRID_LEVELS = 255  # Pixels are a / 255 for integers a in [0, 255].
GRID_PRECISION_BITS = 64  # Q: the masses are integers over 2^Q, and one draw spends exactly Q fair bits.
GRID_TAIL_MASS = 1e-12  # Per pixel, the mass outside [-J, J] that the table folds into its two end bins.
# A rigorous bound on |Phi computed by `_phi` - Phi| (see `_phi`), far above its actual error of about 1e-55.
_PHI_ERROR_BOUND = fractions.Fraction(1, 10**45)
_PHI_DIGITS = 60  # decimal working precision of `_phi`
# pi to 75 decimals (tests check it against mpmath.pi).
_PI = decimal.Decimal("3.141592653589793238462643383279502884197169399375105820974944592307816406286")


def _phi(y: decimal.Decimal) -> decimal.Decimal:
    """Phi(y), the standard normal CDF, to within `_PHI_ERROR_BOUND`, in the standard library's `decimal`.

    For y >= 0, Phi(y) = 1/2 + phi(y) * S with S = sum_n t_n, t_0 = y,
    t_n = t_{n-1} y^2 / (2n + 1) (Abramowitz & Stegun 26.2.11): all terms are
    positive, so nothing cancels. Once the ratio y^2 / (2n + 3) is <= 1/2 the
    remainder after t_n is at most t_n, and the series stops when also
    t_n <= 10^-60 S: the truncation error is <= 10^-60 S < 10^-60 (phi S < 1/2).
    Every operation (`exp` and `sqrt` are correctly rounded by `decimal`)
    is done with 60 significant digits, relative error 10^-59 each; for
    |y| < 15 there are fewer than 1,000 of them, so the rounding error is below
    10^-55. Phi(-y) = 1 - Phi(y). For |y| >= 15 it returns 1 (or 0): there
    1 - Phi(|y|) < phi(15) / 15 < 4e-51, and the series would need ~y^2 terms.
    """
    if abs(y) >= 15:
        return decimal.Decimal(1 if y > 0 else 0)
    with decimal.localcontext() as ctx:
        ctx.prec = _PHI_DIGITS
        x = abs(y)
        square = x * x
        term = x
        total = x
        n = 0
        while True:
            n += 1
            term = term * square / (2 * n + 1)
            total += term
            if square * 2 <= 2 * n + 3 and term * decimal.Decimal(10) ** _PHI_DIGITS <= total:
                break
        density = (-square / 2).exp() / (2 * _PI).sqrt()
        upper = decimal.Decimal("0.5") + density * total
        return +upper if y >= 0 else 1 - upper


def _round_up(value: fractions.Fraction) -> float:
    """The smallest float >= `value`."""
    nearest = float(value)
    return nearest if fractions.Fraction(nearest) >= value else math.nextafter(nearest, math.inf)


@dataclasses.dataclass(frozen=True, eq=False)
class GridNoise:
    """The exactly rounded Gaussian on the 8-bit grid, as an alias table with integer thresholds.

    Built by `grid_noise_table(sigma)`; sampled by `grid_noise`. The target
    is the distribution of j = round(255 delta), delta ~ N(0, sigma^2):
    P(j) = Phi((j + 1/2) / (255 sigma)) - Phi((j - 1/2) / (255 sigma)), so that
    pixel a plus noise j is round(255 (a / 255 + delta)) exactly.

    The table holds the law of clip(j, -J, J) with every CDF value C(k + 1/2)
    replaced by an integer over 2^Q (Q = 64): C(y) = floor(2^Q Phi(y / (255
    sigma))) for y > 0 and 2^Q - C(-y) for y < 0 (so the masses are symmetric),
    and the masses m_j = C(j + 1/2) - C(j - 1/2), with C(-J - 1/2) = 0 and
    C(J + 1/2) = 2^Q, sum to 2^Q exactly.

    Total-variation slack (`tv_slack_per_pixel`): the table's law P' differs
    from the exact P in two ways. (1) Truncation: clipping moves the tail
    mass T = 2 (1 - Phi((J + 1/2) / (255 sigma))) < 1e-12 to the end bins,
    which moves at most T in total variation. (2) Rounding: each computed CDF
    value is within eta = 2^-Q + 1e-45 (floor, plus the error of `_phi`) of
    the truth, so each mass is within 2 eta and TV = 1/2 sum |P' - P| <=
    bins * eta over the bins = 2J + 1 bins. The alias table and the fair bits
    reproduce the masses m_j / 2^Q exactly (no further error). Pixels are
    drawn independently, and TV of a product is at most the sum of the
    factors' TVs, so over d pixels TV <= d * slack: for any event, such as
    "the base classifier says class c", its probability under grid noise is
    within d * slack of its probability under the exact rounded Gaussian.
    A certificate therefore subtracts d * slack (`GridNoise.tv_slack`) from
    its lower bound on p_A and adds it to its upper bounds.

    Attributes:
      sigma: the noise standard deviation, in [0, 1] pixel units.
      j_max: J, the largest |j| drawn; the smallest J whose tail is < 1e-12.
      precision_bits: Q; masses are integers over 2^Q.
      masses: the 2J + 1 integer masses of j = -J, ..., J, summing to 2^Q.
      index_bits: b; the alias table has 2^b buckets (2^b >= 2J + 1, b >= 2).
      thresholds: int64 [2^b]: bucket i keeps its own value i - J when the
        remaining Q - b bits, as an integer r, are < thresholds[i] (all in
        [0, 2^(Q - b)]); buckets i >= 2J + 1 are empty (threshold 0).
      aliases: int64 [2^b], the bucket whose value a bucket gives otherwise
        (a full bucket, threshold 2^(Q - b), is its own alias).
      packed: int32 [2^b], what `grid_noise` gathers: with t = min(threshold,
        2^(Q - b) - 1) (a full bucket aliases to itself, so t changes
        nothing), (t >> 32) * 2^b + alias - 2^31: the threshold's high part
        above the alias, offset like a signed 32-bit word.
      low_thresholds: int64 [2^b], t mod 2^32, used only on a tie of the
        high parts.
      tail_bound: an upper bound on T (a float rounded up).
      tv_slack_per_pixel: T's bound + bins * eta, a float rounded up.
    """

    sigma: float
    j_max: int
    precision_bits: int
    masses: Tuple[int, ...]
    index_bits: int
    thresholds: np.ndarray
    aliases: np.ndarray
    packed: np.ndarray
    low_thresholds: np.ndarray
    tail_bound: float
    tv_slack_per_pixel: float

    @property
    def num_bins(self) -> int:
        """2J + 1, the values j can take."""
        return 2 * self.j_max + 1

    def tv_slack(self, num_pixels: int) -> float:
        """num_pixels * `tv_slack_per_pixel`, rounded up: the slack of a whole image."""
        return _round_up(fractions.Fraction(self.tv_slack_per_pixel) * num_pixels)


def _tail_bound(j_max: int, scale: decimal.Decimal) -> fractions.Fraction:
    """An upper bound on 2 (1 - Phi((J + 1/2) / scale)), the mass outside [-J, J]."""
    upper = _phi((j_max + decimal.Decimal("0.5")) / scale)
    return 2 * (1 - fractions.Fraction(upper)) + 2 * _PHI_ERROR_BOUND


def _alias_table(masses: Sequence[int], total_bits: int) -> Tuple[int, np.ndarray, np.ndarray]:
    """Walker's alias table of integer masses summing to 2^total_bits, exactly, in integers.

    With 2^b buckets each holds capacity K = 2^(total_bits - b); Vose's
    pairing of an underfull bucket with an overfull one moves integer amounts
    only, so bucket i keeps thresholds[i] / K of its mass and sends the rest
    to aliases[i], and the masses are reproduced without error.

    Returns:
      (b, thresholds int64 [2^b], aliases int64 [2^b]), aliases as bucket indices.
    """
    bits = max(2, (len(masses) - 1).bit_length())  # b >= 2: a capacity of 2^(64 - b) must fit int64
    capacity = 1 << (total_bits - bits)
    left = list(masses) + [0] * ((1 << bits) - len(masses))
    thresholds = [capacity] * len(left)
    aliases = list(range(len(left)))
    small = [i for i, m in enumerate(left) if m < capacity]
    large = [i for i, m in enumerate(left) if m > capacity]
    while small:
        # Every underfull bucket has an overfull partner: the masses sum to exactly 2^b * K.
        s, g = small.pop(), large[-1]
        thresholds[s], aliases[s] = left[s], g
        left[g] -= capacity - left[s]
        if left[g] < capacity:
            large.pop()
            small.append(g)
        elif left[g] == capacity:
            large.pop()
    assert not large, "the masses do not sum to 2^total_bits"
    return bits, np.array(thresholds, np.int64), np.array(aliases, np.int64)


@functools.lru_cache(maxsize=None)
def grid_noise_table(sigma: float) -> GridNoise:
    """The `GridNoise` table of `sigma`, computed exactly once per sigma (cached).

    The CDF is evaluated with the standard library's `decimal` (`_phi`), never
    float Phi: about 0.1 s for sigma = 0.25 and 0.5 s for sigma = 1.

    Args:
      sigma: the noise standard deviation in [0, 1] pixel units, in (0, 16]
        (`certify_spec.GRID_MAX_SIGMA`, which configs and `Smooth` check first).

    Returns:
      The table.

    Raises:
      ValueError: sigma is not in (0, 16].
    """
    if not 0 < sigma <= certify_spec.GRID_MAX_SIGMA:  # Also rejects NaN.
        raise ValueError(f"grid noise: sigma must be in (0, {certify_spec.GRID_MAX_SIGMA:g}], got {sigma!r}")
    sigma = float(sigma)
    scale = decimal.Decimal(sigma) * GRID_LEVELS  # exact: a float times 255 has < 60 digits
    # A float guess of J (1 - Phi(7.13) = 5.0e-13), then moved to the smallest J whose exact tail is < 1e-12.
    j_max = max(0, math.ceil(float(scale) * 7.13 - 0.5))
    while _tail_bound(j_max, scale) >= GRID_TAIL_MASS:
        j_max += 1
    while j_max > 0 and _tail_bound(j_max - 1, scale) < GRID_TAIL_MASS:
        j_max -= 1
    one = 1 << GRID_PRECISION_BITS
    # C(j + 1/2) for j = 0, ..., J - 1, the cut points above 0; those below 0 mirror them.
    upper = [math.floor(_phi((j + decimal.Decimal("0.5")) / scale) * one) for j in range(j_max)]
    cdf = [one - c for c in reversed(upper)] + upper + [one]  # C(j + 1/2) for j = -J, ..., J
    masses = tuple(c - p for c, p in zip(cdf, [0] + cdf[:-1]))
    if min(masses) < 0:
        raise AssertionError(f"grid noise: a negative mass for sigma={sigma!r} (CDF not monotone)")
    bits, thresholds, aliases = _alias_table(masses, GRID_PRECISION_BITS)
    if bits > 31:
        raise AssertionError(f"grid noise: {bits} index bits for sigma={sigma!r}; grid_noise needs at most 31")
    clipped = np.minimum(thresholds, (1 << (GRID_PRECISION_BITS - bits)) - 1)
    packed = ((clipped >> 32) << bits) + aliases - (1 << 31)  # in [-2^31, 2^31): fits int32
    low_thresholds = clipped & ((1 << 32) - 1)
    tail = _tail_bound(j_max, scale)
    eta = fractions.Fraction(1, one) + _PHI_ERROR_BOUND
    arrays = [thresholds, aliases, packed.astype(np.int32), low_thresholds]
    for array in arrays:
        array.setflags(write=False)
    return GridNoise(sigma=sigma, j_max=j_max, precision_bits=GRID_PRECISION_BITS, masses=masses,
                     index_bits=bits, thresholds=arrays[0], aliases=arrays[1], packed=arrays[2],
                     low_thresholds=arrays[3], tail_bound=_round_up(tail),
                     tv_slack_per_pixel=_round_up(tail + len(masses) * eta))


def grid_noise(shape: tf.Tensor, seed: tf.Tensor, table: GridNoise) -> tf.Tensor:
    """Stateless integer grid noise j, int32 of `shape`, drawn from `table` (see `GridNoise`).

    Walker's alias method on 64 fair bits per value, in 32-bit words. From
    two keys split off `seed`, each value gets one full-range 32-bit word of
    `tf.random.stateless_uniform(dtype=int32, minval=None, maxval=None)`
    (Philox; tests/noise_test.py checks that its bits are fair: `FairBitsTest`),
    read as the unsigned u = w + 2^31 (a fixed bijection, so u is uniform on
    [0, 2^32) too, and signed order of w is the order of u): its low b bits
    pick a bucket, its other 32 - b bits are the high part r_hi of the
    (64 - b)-bit integer r that is compared with the bucket's threshold.
    One gather of the packed table gives the threshold's high part and the
    alias. Only when r_hi equals the threshold's high part (probability
    below 2^-(32 - b) per value, about 0.2 values per 1000 x 784 draw at
    sigma = 0.25) is the comparison undecided; then the 32 low bits of r of
    every position are drawn from the second key (static shapes, so the
    sampler also compiles under XLA) and used where a tie occurred. The value
    at a position thus depends only on the seed, the shape and the position
    (under XLA too, but XLA's stateless kernels give other bits than
    TensorFlow's for most seeds, as for `standard_normal`). So
    P(j) = masses[j] / 2^64 exactly, with core TensorFlow ops only (the
    tables become graph constants; it runs in a `tf.function` and in a
    SavedModel).

    Args:
      shape: int32 1-D shape.
      seed: stateless seed, int32/int64 [2].
      table: `grid_noise_table(sigma)`.

    Returns:
      int32 tensor of `shape`, values in [-J, J].
    """
    bits = table.index_bits
    keys = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    words = tf.random.stateless_uniform(shape, seed=keys[0], dtype=tf.int32, minval=None, maxval=None)
    bucket = tf.bitwise.bitwise_and(words, (1 << bits) - 1)
    packed = tf.gather(tf.constant(table.packed), bucket)
    # words and packed are both u - 2^31 (see GridNoise.packed), so signed order is the order of r_hi:
    # r_hi < threshold_hi keeps, r_hi > threshold_hi aliases, and equality is settled below.
    keep = words < packed
    high, packed_high = tf.bitwise.right_shift(words, bits), tf.bitwise.right_shift(packed, bits)
    tie = tf.equal(high, packed_high)

    def settle_ties():
        # Low words for every position (static shapes, so XLA compiles it too), used only where the high parts tie.
        low = tf.cast(tf.random.stateless_uniform(shape, seed=keys[1], dtype=tf.uint32, minval=None, maxval=None),
                      tf.int64)
        return tf.where(tie, low < tf.gather(tf.constant(table.low_thresholds), bucket), keep)

    keep = tf.cond(tf.reduce_any(tie), settle_ties, lambda: keep)
    alias = tf.bitwise.bitwise_and(packed, (1 << bits) - 1)
    return tf.where(keep, bucket, alias) - table.j_max


def grid_inputs(pixels: tf.Tensor, j: tf.Tensor) -> tf.Tensor:
    """The model's input in grid mode: float32 (a + j) / 255, a function of the integer a + j alone.

    The integers are added first and converted once: int32 a + j is exact,
    its float32 conversion is exact (|a + j| < 2^24), and the division is one
    correctly rounded IEEE operation, so two pairs (a, j) with the same sum
    give bit-identical inputs. Not clipped to [0, 1]: the base classifier
    f o round sees the whole rounded Gaussian, which is what makes the
    smoothing exact.

    Args:
      pixels: int32 or uint8 pixels a in [0, 255] (`to_grid`).
      j: int32 noise (`grid_noise`), broadcastable against `pixels`.

    Returns:
      float32 model input.
    """
    return tf.cast(tf.cast(pixels, tf.int32) + j, tf.float32) / float(GRID_LEVELS)


def to_grid(images: tf.Tensor) -> tf.Tensor:
    """Float images in [0, 1] -> int32 pixels a, refusing an image that is not on the 8-bit grid.

    "On the grid" means exactly equal to float32(k) / 255 (one correctly
    rounded float32 division) for an integer k in [0, 255]: the values that
    `grid_inputs` and the data pipeline (`tf.cast(uint8, float32) / 255`)
    produce, one per k. No tolerance: an image one ulp away is not the
    image a certificate for k / 255 would be about, so it is refused rather
    than silently certified as its neighbour. 255 x is computed exactly in
    float64 (24 + 8 bits), so k = round(255 x) is the only candidate.

    Args:
      images: float32 (or float64 holding float32 values) images.

    Returns:
      int32 pixels of the images' shape.

    Raises:
      ValueError: the images are not float, or (eagerly) a pixel is off the
        grid; the message names the first one by index and value. In a graph, the same check is an
        assertion that raises InvalidArgumentError when it runs.
    """
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        raise ValueError(f"to_grid: images must be float in [0, 1], got {images.dtype.name} "
                         "(pass integer pixels to grid_inputs as they are)")
    scaled = tf.round(tf.cast(images, tf.float64) * GRID_LEVELS)
    pixels = tf.cast(tf.clip_by_value(scaled, 0, GRID_LEVELS), tf.int32)  # clip: NaN or out of range fails below
    # The 256 grid values from a table, not a division in the graph: in a tf.function, grappler turns x / 255
    # into x * (1 / 255), which differs by an ulp for 126 of the 256 levels, and would refuse on-grid images.
    grid_values = tf.constant(np.arange(GRID_LEVELS + 1, dtype=np.float32) / np.float32(GRID_LEVELS))
    on_grid = tf.logical_and(tf.equal(scaled, tf.cast(pixels, tf.float64)),
                             tf.equal(tf.cast(images, tf.float32),
                                      tf.gather(grid_values, tf.clip_by_value(pixels, 0, GRID_LEVELS))))  # NaN casts anywhere
    on_grid = tf.logical_and(on_grid, tf.equal(tf.cast(tf.cast(images, tf.float32), images.dtype), images))
    off_grid = tf.logical_not(on_grid)
    first_index, first_value = tf.where(off_grid)[:1], tf.boolean_mask(images, off_grid)[:1]  # empty if none
    if tf.executing_eagerly():
        if first_index.shape[0]:
            index = [int(i) for i in first_index[0]]
            raise ValueError(f"images{index} = {float(first_value[0])!r} is not on the 8-bit grid "
                             f"(float32(k) / 255 for an integer k in [0, 255]); grid noise needs 8-bit images")
        return pixels
    check = tf.debugging.Assert(
        tf.reduce_all(on_grid),
        ["images not on the 8-bit grid (float32(k) / 255, k in [0, 255]); first bad pixel (index, value):",
         first_index, first_value],
        summarize=8)  # The whole index of a 4-D batch (the default, 3, would cut it).
    with tf.control_dependencies([check]):
        return tf.identity(pixels)
