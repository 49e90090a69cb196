"""The smoothed classifier g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I).

`sample_counts` is the one sampling loop of the project: noise, forward pass,
class counts, all TensorFlow ops, so it runs inside a `tf.function` here and
inside the exported SavedModel (export.py) alike. `Smooth` runs Cohen et al.'s
(2019) CERTIFY and PREDICT on top of it, deciding with the certification
engine (engine.py) that the exported signatures use too.
Certifying a whole dataset split into a log is `certify_run.py`'s job.
"""

import fractions
import math
from typing import Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from tf_consreg import certify_spec
from tf_consreg import distribute
from tf_consreg import engine
from tf_consreg import noise as noise_lib
from tf_consreg import stats

_IntLike = Union[int, tf.Tensor]


def sample_counts(
    model: keras.Model,
    images: tf.Tensor,
    num_samples: _IntLike,
    *,
    sigma: Union[float, tf.Tensor],
    num_classes: int,
    batch_size: _IntLike,
    seed: tf.Tensor,
    grid: Optional[noise_lib.GridNoise] = None,
) -> tf.Tensor:
    """Counts the base classifier's predictions under Gaussian noise.

    For each image x, draws `num_samples` noise vectors d ~ N(0, sigma^2 I) in
    [0, 1] pixel space (the model normalizes inside) and counts
    argmax model(x + d, training=False) per class.

    A sample whose logits are not all finite (NaN or +-Inf, from a diverged
    model or an overflow on some inputs) counts for no class, so a row sums
    to less than `num_samples`. The statistics use `num_samples` as the
    number of trials, so such a sample counts as a failure of every class:
    the bounds stay valid for the smoothed classifier that never returns a
    class for it, and a model with NaN weights gets no certificate and no
    prediction (all counts 0, hence abstain) instead of class 0 for every
    sample, which is what argmax over NaN logits returns.

    The samples are evaluated in forward batches ("chunks") of at most
    `batch_size` noisy copies; the noise of one chunk is drawn when it is
    needed, never all `num_samples` at once. When `num_samples <= batch_size`,
    one chunk holds all samples of `batch_size // num_samples` images, so that
    small sample counts still give large forward batches; otherwise each chunk
    holds `batch_size` samples (the last one of an image fewer) of one image.

    The noise of image i depends only on its own seed (see `seed`),
    `num_samples` and `batch_size`: it is drawn block by block, with block j
    of image i seeded by `fold_in(seed_i, j)`, and does not depend on the
    other images in the batch. Every sample gets fresh noise.

    Grid mode (`grid` given; Voráček & Hein 2023): the images go through
    `noise.to_grid` once (integer pixels a; in a graph an off-grid image fails
    the run's assertion), and each sample is `noise.grid_inputs(a, j)`, the
    float32 (a + j) / 255 of integer noise j = `noise.grid_noise(...)` drawn
    with the same seeds, blocks and chunks as float mode. The model's input is
    then a function of the integer a + j alone, and the counts are those of
    the table's rounded Gaussian, within `grid.tv_slack(d)` per sample of the
    exact one: the caller's bounds must take that slack (`Smooth` does).

    Pure TensorFlow ops: traceable in any `tf.function`, including a SavedModel
    endpoint. Called eagerly it works but runs the loop op by op; wrap the call
    in a `tf.function` for speed (as `Smooth` does).

    Args:
      model: base classifier mapping float32 [N, H, W, C] images in [0, 1] to
        logits [N, num_classes].
      images: float32 [B, H, W, C] in [0, 1].
      num_samples: noise samples per image (int or scalar int tensor, >= 0).
      sigma: noise standard deviation in [0, 1] pixel units.
      num_classes: number of classes (length of the count vectors).
      batch_size: most noisy copies per forward pass (int or scalar tensor, >= 1).
      seed: int32/int64 stateless RNG seed: shape [2] for the whole batch (image
        i then uses `fold_in(seed, i)`), or shape [B, 2] with one seed per image.
      grid: None for float noise N(0, sigma^2 I); `noise.grid_noise_table(sigma)`
        for grid noise (its sigma must be `sigma`).

    Returns:
      int64 [B, num_classes]: counts[i, c] is the number of samples of image i
      classified as c; each row sums to `num_samples` less the samples with
      non-finite logits.

    Raises:
      ValueError: if `images` is not rank 4, a static `batch_size` or
        `num_samples` is out of range, `grid` is of another sigma, or (eagerly)
        an image is off the 8-bit grid in grid mode.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    if images.shape.rank != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    if isinstance(batch_size, int) and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(num_samples, int) and num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank not in (1, 2) or seed.shape[-1] != 2:
        raise ValueError(f"seed must have shape [2] or [B, 2], got {seed.shape}")

    if grid is not None and not isinstance(sigma, tf.Tensor) and float(sigma) != grid.sigma:
        raise ValueError(f"grid noise: the table is for sigma={grid.sigma}, not sigma={sigma}")

    image_shape = images.shape[1:]
    pixels = noise_lib.to_grid(images) if grid is not None else None
    sigma = tf.cast(sigma, tf.float32)
    n = tf.cast(num_samples, tf.int32)
    num_images = tf.shape(images)[0]
    seeds = noise_lib.per_image_seeds(seed, num_images)

    # Noise block: the samples of one image drawn with one seed. Chunks are
    # whole blocks of `images_per_chunk` consecutive images.
    block = tf.maximum(tf.minimum(n, tf.cast(batch_size, tf.int32)), 1)
    blocks_per_image = (n + block - 1) // block
    images_per_chunk = tf.maximum(tf.cast(batch_size, tf.int32) // block, 1)
    num_groups = (num_images + images_per_chunk - 1) // images_per_chunk
    num_chunks = num_groups * blocks_per_image
    num_cells = num_images * num_classes

    def body(t, counts):
        group = t // blocks_per_image
        j = t % blocks_per_image
        start = group * images_per_chunk
        stop = tf.minimum(start + images_per_chunk, num_images)
        size = tf.minimum(block, n - j * block)
        shape = tf.concat([[size], image_shape], 0)
        if grid is None:
            noise = tf.map_fn(
                lambda s: noise_lib.standard_normal(shape, tf.random.fold_in(s, tf.cast(j, tf.int64))),
                seeds[start:stop],
                fn_output_signature=tf.TensorSpec([None, *image_shape], tf.float32),
            )
            noisy = images[start:stop, tf.newaxis] + sigma * noise
        else:
            # The same seed per (image, block) as float mode; integer noise added to integer pixels.
            steps = tf.map_fn(
                lambda s: noise_lib.grid_noise(shape, tf.random.fold_in(s, tf.cast(j, tf.int64)), grid),
                seeds[start:stop],
                fn_output_signature=tf.TensorSpec([None, *image_shape], tf.int32),
            )
            noisy = noise_lib.grid_inputs(pixels[start:stop, tf.newaxis], steps)
        noisy = tf.reshape(noisy, [-1, *image_shape])
        logits = _check_logits(model(noisy, training=False), num_classes)
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        # Cell (image, class) of each sample, counted on device in one op.
        owner = start + tf.range(tf.shape(predictions)[0]) // size
        # A sample with a non-finite logit votes for no class (argmax of NaNs
        # is 0): its cell is num_cells, which bincount's maxlength drops.
        finite = tf.reduce_all(tf.math.is_finite(logits), axis=-1)
        cells = tf.where(finite, owner * num_classes + predictions, num_cells)
        counts += tf.math.bincount(
            cells, minlength=num_cells, maxlength=num_cells, dtype=tf.int64
        )
        return t + 1, counts

    _, counts = tf.while_loop(
        lambda t, _: t < num_chunks,
        body,
        (tf.constant(0, tf.int32), tf.zeros([num_cells], tf.int64)),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None])),
    )
    return tf.reshape(counts, [num_images, num_classes])


def _check_logits(logits: tf.Tensor, num_classes: int) -> tf.Tensor:
    """The logits, checked to be [N, num_classes]: a wider row's argmax would be counted in another image's cells.

    Raises:
      ValueError: at trace time, when the width is known and wrong.
      InvalidArgumentError: when it runs, when the width was not known.
    """
    width = logits.shape[-1] if logits.shape.rank else None
    if width is not None:
        if width != num_classes:
            raise ValueError(f"the base model outputs {width} logits per image, but num_classes={num_classes}")
        return logits
    check = tf.debugging.assert_equal(tf.shape(logits)[-1], num_classes,
                                      message="the base model does not output num_classes logits per image")
    with tf.control_dependencies([check]):
        return tf.identity(logits)


def mirrored_sample_counts(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    images: tf.Tensor,
    num_samples: _IntLike,
    *,
    sigma: Union[float, tf.Tensor],
    num_classes: int,
    batch_size: _IntLike,
    seed: tf.Tensor,
    grid: Optional[noise_lib.GridNoise] = None,
) -> tf.Tensor:
    """`sample_counts` with each image's samples split across the strategy's replicas.

    Every replica gets all the images and draws its share of each image's
    `num_samples` (n // G, the first n % G replicas one more) by calling
    `sample_counts`; the per-replica counts are summed, so each row still sums
    to `num_samples` (less the samples with non-finite logits) and one image's
    samples take about 1/G of the time.

    Replica r draws image i's noise from the seed `fold_in(seed_i, r)`, so the
    replicas' noise is independent (the seeds `fold_in(seed_i, j)` of
    `sample_counts`' blocks differ from replica to replica) and the result is
    reproducible for a given seed and replica count G. It is NOT the noise of
    `sample_counts(..., seed)`: the counts follow the same distribution as the
    single-device ones but are not equal to them, and they change with G.

    Build the model's variables under `strategy.scope()` (mirrored), so each
    replica reads its own copy instead of copying weights for every chunk.

    Args:
      strategy: a `tf.distribute` strategy with local replicas (MirroredStrategy);
        G = `strategy.num_replicas_in_sync`.
      model, images, num_samples, sigma, num_classes, batch_size, seed, grid: as
        for `sample_counts` (grid mode shares its code path).

    Returns:
      int64 [B, num_classes] counts; each row sums to `num_samples` less the
      samples with non-finite logits.

    Raises:
      ValueError: as `sample_counts`.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    if images.shape.rank != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank not in (1, 2) or seed.shape[-1] != 2:
        raise ValueError(f"seed must have shape [2] or [B, 2], got {seed.shape}")
    if isinstance(num_samples, int) and num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    seeds = noise_lib.per_image_seeds(seed, tf.shape(images)[0])
    n = tf.cast(num_samples, tf.int32)
    replicas = strategy.num_replicas_in_sync

    def replica_counts():
        replica = distribute.replica_id()
        share = n // replicas + tf.cast(replica < n % replicas, tf.int32)
        replica_seeds = tf.map_fn(lambda s: tf.random.fold_in(s, tf.cast(replica, tf.int64)), seeds,
                                  fn_output_signature=tf.TensorSpec([2], tf.int64))
        return sample_counts(model, images, share, sigma=sigma, num_classes=num_classes,
                             batch_size=batch_size, seed=replica_seeds, grid=grid)

    per_replica = strategy.run(replica_counts)
    # The counts are a few integers per image: add them on one device rather
    # than all-reduce them (NCCL and friends are for gradients).
    return tf.add_n(list(strategy.experimental_local_results(per_replica)))


# Noise streams of one image: selection and estimation samples of CERTIFY and
# the samples of PREDICT never share noise (see `stream_seeds`). PROBE is a
# quick look at the base model apart from every certificate's samples
# (`Smooth.sample_counts`; certify_run's check that the model was trained
# with noise): negative, so no stage's stream (`staged_stream`) is ever it.
SELECTION, ESTIMATION, PREDICTION = 0, 1, 2
PROBE = -1


def stream_seeds(keys: tf.Tensor, stream: Union[int, tf.Tensor]) -> tf.Tensor:
    """The seeds of one noise stream: int64 [B, 2], key i folded with `stream`.

    An image's key (seed, image id) gives every stream of its samples
    (selection, estimation, prediction, each stage) its own independent seed;
    `sample_counts` draws image i's noise from row i. `Smooth` and the
    exported signatures (export.py) key the noise alike, so with one seed they
    draw the same noise.

    Args:
      keys: int64 [B, 2], one key per image.
      stream: int or scalar int64 tensor.
    """
    stream = tf.cast(stream, tf.int64)
    return tf.map_fn(lambda key: tf.random.fold_in(key, stream), tf.cast(keys, tf.int64),
                     fn_output_signature=tf.TensorSpec([2], tf.int64))


def staged_stream(stream: int, stage: int) -> int:
    """The noise stream of stage `stage` (0, 1, ...) of a staged CERTIFY or PREDICT.

    Each stage draws only its new samples, n_k - n_{k-1} per image, with the
    image's key folded with this stream: 3 + 2 stage for CERTIFY's estimation
    samples, 3 + 2 stage + 1 for PREDICT's. These never equal the fixed-n
    streams 0, 1, 2 (selection, estimation, prediction) or each other, so
    every stage gets fresh noise, and an image's noise depends only on
    (seed, image id, stage, the stage's sample count, batch_size): not on
    which other images are certified with it or are still running.

    Args:
      stream: the fixed-n stream of the samples, `ESTIMATION` or `PREDICTION`.
      stage: the stage's index k, >= 0.

    Returns:
      The stream, an int.
    """
    if stream not in (ESTIMATION, PREDICTION) or stage < 0:
        raise ValueError(f"no staged stream for stream={stream}, stage={stage}")
    return 3 + 2 * stage + (stream == PREDICTION)


_MAX_INT32 = 2**31 - 1


def _check_int(name: str, value, minimum: int) -> int:
    # Sample counts and batch sizes are int32 in the sampling graph.
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
            or value > _MAX_INT32):
        raise ValueError(f"{name} must be an integer in [{minimum}, 2^31), got {value!r}")
    return int(value)


def _check_alpha(alpha) -> float:
    if not isinstance(alpha, (float, int, np.floating)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def grid_predict_alpha(alpha: float, n: int, slack: float) -> float:
    """PREDICT's test level under grid noise: alpha - n slack, rounded down.

    PREDICT's binomial test of the top two counts has no bound to widen, so
    the slack is paid in its level by coupling: n samples from the grid
    table's law are within total variation n slack of n samples from the
    exact rounded Gaussian (TV of a product is at most the sum of its
    factors'), so a test that errs with probability <= alpha - n slack under
    the exact law errs with probability <= alpha under the table's. A staged
    PREDICT passes n = n_max: its samples are at most that many.

    Args:
      alpha: the run's failure probability, in (0, 1).
      n: the most samples an image draws.
      slack: `GridNoise.tv_slack(d)` of the image's d pixels.

    Returns:
      The level, a float never above alpha - n slack.

    Raises:
      ValueError: n slack >= alpha (no level is left for the test).
    """
    exact = fractions.Fraction(alpha) - n * fractions.Fraction(slack)
    if exact <= 0:
        raise ValueError(f"grid noise: n={n} samples of slack {slack:.3g} each use up alpha={alpha} "
                         "(PREDICT's level is alpha - n slack); lower n or raise alpha")
    level = float(exact)
    return level if fractions.Fraction(level) <= exact else math.nextafter(level, 0.0)


def sample_slack(noise: str, sigma: float, num_pixels: int) -> float:
    """The total-variation slack of one noisy sample of an image of `num_pixels` values: what its bounds widen by.

    0 for float noise; for grid noise the table's `tv_slack(num_pixels)` (the
    table is computed once per sigma).
    """
    return 0.0 if noise == "float" else noise_lib.grid_noise_table(float(sigma)).tv_slack(num_pixels)


def model_image_shape(model: keras.Model) -> Optional[Tuple[Optional[int], ...]]:
    """The [H, W, C] a model takes, or None if it does not declare its input."""
    try:
        shape = model.inputs[0].shape
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return tuple(shape[1:]) if len(shape) == 4 else None


def model_num_outputs(model: keras.Model) -> Optional[int]:
    """The number of logits a model outputs per image, or None if it does not declare its output."""
    try:
        shape = model.outputs[0].shape
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return shape[-1] if len(shape) == 2 else None


def check_pixels(images: np.ndarray, *, grid: bool, float_hint: str = 'noise="float"') -> None:
    """Refuses images that are not pixels in [0, 1] (or, for grid noise, not on the 8-bit grid), in one line.

    The message names the first bad pixel by its index and value. A value
    outside [0, 1] (or NaN) gets that message in both modes, before the grid
    check, so that an image of another scale (0..255, or normalized) is
    called what it is rather than "off the grid".

    Args:
      images: float32, [B, H, W, C] or one image [H, W, C]: the index named has its rank.
      grid: also require the 8-bit grid (`noise.to_grid`).
      float_hint: how the caller names float noise: 'noise="float"' in the
        library, "--noise=float" in a binary.

    Raises:
      ValueError: naming the first bad pixel.
    """
    outside = ~((images >= 0.0) & (images <= 1.0))  # NaN compares False: outside.
    if outside.any():
        index = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"images[{', '.join(map(str, index))}] = {float(images[index])!r} is outside [0, 1]: "
                         "the model takes pixels in [0, 1] (it normalizes inside), e.g. uint8 images / 255")
    if grid:
        try:
            noise_lib.to_grid(images)  # Eagerly: a ValueError naming the first off-grid pixel.
        except ValueError as e:
            raise ValueError(f"{e}; {float_hint} is for inputs that are not quantized") from None


class Smooth:
    """The smoothed classifier g of a base classifier f under N(0, sigma^2 I) noise.

    g(x) = argmax_c P(f(x + d) = c). `certify` and `predict` are Cohen et al.'s
    (2019) Monte Carlo CERTIFY and PREDICT; `certify_batch` and `predict_batch`
    do the same for many images in one call, which is how the binaries use it
    (several images' samples share a forward batch when n is small).
    `certify_staged_batch` and `predict_staged_batch` answer the same
    questions for given radii with samples drawn in stages, each image
    stopping as soon as its answer is settled (far fewer samples for most
    images, at the same 1 - alpha guarantee).

    Sampling runs in one `tf.function` (see `sample_counts`), traced once per
    Smooth: image count, sample counts, batch size and seeds are tensors. The
    decisions (bounds, radius, tests, the staged rule) are the certification
    engine's (engine.py), the very ops of the exported signatures, rounded
    toward the safe side; each runs once per batch (or stage) of images.

    Noise is keyed: the noise of an image depends only on (seed, its image id,
    the stream, n and batch_size), so an image gets the same result whether it
    is certified alone or in a batch with others, and selection, estimation
    and prediction samples never share noise.

    With a `strategy` (MirroredStrategy), each image's samples are split
    across its replicas (`mirrored_sample_counts`): same distribution, other
    noise than without one, reproducible for a given seed and replica count.

    Noise modes (`noise`). "grid", the default (`certify_spec.DEFAULT_NOISE`:
    every dataset we ship is 8-bit), is sound in floating point: it takes
    images on the 8-bit grid only (an image off it is refused, naming its
    first bad pixel and pointing to noise="float") and adds exact integer
    grid noise (`sample_counts`' grid mode): the certificates are those of
    the base classifier composed with rounding to the grid, smoothed by the
    rounded Gaussian. Its sampler is within total variation
    `tv_slack(d)` (about 1e-12 per pixel) of that law, so every lower bound on
    p_A is lowered and every upper bound raised by it (CERTIFY, staged
    CERTIFY), and PREDICT's test runs at level alpha - n tv_slack(d)
    (`grid_predict_alpha`). "float", for inputs that are not quantized,
    adds float32 N(0, sigma^2) noise to the image; its certificates are
    those of the exact Gaussian smoothing, up to the floating-point effects
    that Voráček & Hein (2023) exploit. In both modes an image with a pixel
    outside [0, 1] is refused, naming it.

    The certificates hold for the function `base_model` computes, in the
    dtypes its layers compute in: a model trained under mixed_bfloat16 and
    passed as trained is its bfloat16 network. The project's callers pass
    the float32 network unless asked otherwise
    (`models.load_base_model(path, compute_dtype=...)`,
    `models.with_compute_dtype`).

    Args:
      base_model: Keras classifier from float32 [N, H, W, C] images in [0, 1]
        to logits [N, num_classes]; under a strategy, built or loaded in its
        scope.
      num_classes: number of classes, >= 2.
      sigma: noise standard deviation in [0, 1] pixel units, > 0.
      strategy: None (one device) or a strategy whose replicas share the samples.
      noise: "grid" (the default) or "float" (`certify_spec.NOISE_MODES`).

    Raises:
      ValueError: num_classes < 2, a base model whose declared output is not
        num_classes logits, sigma not > 0, an unknown noise mode, or grid
        noise with sigma above 16.
    """

    ABSTAIN = stats.ABSTAIN

    def __init__(self, base_model: keras.Model, num_classes: int, sigma: float, *,
                 strategy: Optional[tf.distribute.Strategy] = None, noise: str = certify_spec.DEFAULT_NOISE):
        _check_int("num_classes", num_classes, 2)
        outputs = model_num_outputs(base_model)
        if outputs is not None and outputs != num_classes:
            raise ValueError(f"base_model outputs {outputs} logits per image, but num_classes={num_classes}")
        if not isinstance(sigma, (float, int, np.floating)) or not 0 < sigma < float("inf"):
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        if noise not in certify_spec.NOISE_MODES:
            raise ValueError(f"noise must be one of {certify_spec.NOISE_MODES}, got {noise!r}")
        certify_spec.check_grid_sigma(sigma, noise)  # Before the table is built: one line naming the way out.
        self.base_model = base_model
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.strategy = strategy
        self.noise = noise
        self._grid = noise_lib.grid_noise_table(self.sigma) if noise == "grid" else None
        self._image_shape = model_image_shape(base_model)
        image_spec = [None, *self._image_shape] if self._image_shape else [None, None, None, None]
        self._counts_fn = tf.function(
            self._counts_graph,
            input_signature=(
                tf.TensorSpec(image_spec, tf.float32),
                tf.TensorSpec([], tf.int32),  # samples per image
                tf.TensorSpec([], tf.int32),  # batch size
                tf.TensorSpec([None, 2], tf.int64),  # (seed, image id) per image
                tf.TensorSpec([], tf.int64),  # stream
            ),
        )
        # The engine's decisions, traced once each: a batch's counts in, its answers out.
        counts_spec = tf.TensorSpec([None, None], tf.int64)
        level_spec = tf.TensorSpec([], tf.float64)
        self._certify_fn = tf.function(self._certify_graph, input_signature=(
            counts_spec, counts_spec, tf.TensorSpec([], tf.int64), level_spec, level_spec))
        self._predict_fn = tf.function(engine.predict_from_counts, input_signature=(counts_spec, level_spec))
        self._stage_fn = tf.function(self._stage_graph, input_signature=(
            tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.int64), level_spec, tf.TensorSpec([None], tf.float64),
            level_spec))
        self._decision_fn = tf.function(self._decision_graph, input_signature=(
            tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.float64)))

    def _certify_graph(self, selection, estimation, n, alpha, slack):
        return engine.certify_from_counts(selection, estimation, n, alpha, self.sigma, slack)

    def _stage_graph(self, successes, n_k, level, radii, slack):
        return engine.certify_stage(successes, n_k, level, self.sigma, radii, slack)

    def _decision_graph(self, guesses, p_lower):
        return engine.certify_decision(guesses, p_lower, self.sigma)

    def slack(self, images: np.ndarray) -> float:
        """The total-variation slack of one sample of these images: 0 for float noise, `tv_slack(d)` for grid."""
        return self.pixel_slack(int(np.prod(images.shape[1:])))

    def pixel_slack(self, num_pixels: int) -> float:
        """The total-variation slack of one sample of an image of `num_pixels` values (`sample_slack`)."""
        return sample_slack(self.noise, self.sigma, num_pixels)

    def _stage_rule(self, radii: np.ndarray, slack: float) -> stats.StageRuleFn:
        """The engine's bounds and settled rule of one stage, for `stats.staged_certify`."""
        radii = tf.constant(radii, tf.float64)
        slack = tf.constant(slack, tf.float64)

        def rule(successes, n_k, level):
            p_lower, done = self._stage_fn(tf.constant(successes, tf.int64), tf.constant(n_k, tf.int64),
                                           tf.constant(level, tf.float64), radii, slack)
            return p_lower.numpy(), done.numpy()

        return rule

    def _decision(self, guesses: np.ndarray, p_lower: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        classes, radii = self._decision_fn(tf.constant(guesses, tf.int64), tf.constant(p_lower, tf.float64))
        return classes.numpy(), radii.numpy()

    def _predict_level(self, images: np.ndarray, alpha: float, n: int) -> float:
        """PREDICT's level for n samples per image: alpha, less n slack in grid mode (`grid_predict_alpha`)."""
        return alpha if self._grid is None else grid_predict_alpha(alpha, n, self.slack(images))

    def _predict_rule(self, counts: np.ndarray, level: float) -> np.ndarray:
        return self._predict_fn(tf.constant(counts, tf.int64), tf.constant(level, tf.float64)).numpy()

    def _counts_graph(self, images, num_samples, batch_size, keys, stream):
        seeds = stream_seeds(keys, stream)
        if self.strategy is not None:
            return mirrored_sample_counts(self.strategy, self.base_model, images, num_samples, sigma=self.sigma,
                                          num_classes=self.num_classes, batch_size=batch_size, seed=seeds,
                                          grid=self._grid)
        return sample_counts(self.base_model, images, num_samples, sigma=self.sigma,
                             num_classes=self.num_classes, batch_size=batch_size, seed=seeds, grid=self._grid)

    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
        if self._image_shape and any(m is not None and m != s for m, s in zip(self._image_shape, images.shape[1:])):
            raise ValueError(f"images have shape {images.shape[1:]} per image; the model takes {self._image_shape}")
        check_pixels(images, grid=self._grid is not None)
        return images

    @staticmethod
    def _keys(num_images: int, seed: Optional[int], image_ids: Optional[Sequence[int]]) -> np.ndarray:
        if seed is None:
            seed = int(np.random.default_rng().integers(2**62))
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        ids = np.arange(num_images) if image_ids is None else np.asarray(image_ids)
        if ids.shape != (num_images,) or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"image_ids must be {num_images} integers, got {image_ids!r}")
        return np.stack([np.full(num_images, seed, dtype=np.int64), ids.astype(np.int64)], axis=1)

    def _counts(self, images: np.ndarray, num_samples: int, batch_size: int, keys: np.ndarray,
                stream: int) -> np.ndarray:
        counts = self._counts_fn(tf.constant(images), tf.constant(num_samples, tf.int32),
                                 tf.constant(batch_size, tf.int32), tf.constant(keys), tf.constant(stream, tf.int64))
        return counts.numpy()

    def sample_counts(self, images, num_samples: int, batch_size: int, seed: Optional[int] = None,
                      image_ids: Optional[Sequence[int]] = None) -> np.ndarray:
        """The base classifier's class counts under this Smooth's noise, from the noise stream `PROBE`.

        No certificate uses these samples: they are for looking at the base
        model (say, its accuracy under noise), apart from every certificate's.

        Args:
          images: float32 [B, H, W, C] in [0, 1] (on the 8-bit grid in grid mode).
          num_samples: noisy copies per image, >= 1.
          batch_size: most noisy copies per forward pass, >= 1.
          seed, image_ids: key the noise, as for `certify_batch`.

        Returns:
          int64 [B, num_classes]; each row sums to num_samples less the samples with non-finite logits.

        Raises:
          ValueError: a bad argument or image.
        """
        images = self._check_images(images)
        num_samples, batch_size = _check_int("num_samples", num_samples, 1), _check_int("batch_size", batch_size, 1)
        return self._counts(images, num_samples, batch_size, self._keys(len(images), seed, image_ids), PROBE)

    def certify_batch(self, images, n0: int, n: int, alpha: float, batch_size: int, seed: Optional[int] = None,
                      image_ids: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """CERTIFY for each of a batch of images.

        For each image: n0 selection samples guess the top class c; n fresh
        estimation samples give a one-sided (1 - alpha) Clopper-Pearson lower
        bound p on P(f(x + d) = c). If p < 1/2 the image is ABSTAIN with radius
        0; otherwise g(x) = c with probability >= 1 - alpha, and g is constant
        within L2 radius sigma * Phi^-1(p) of x.

        Args:
          images: float32 [B, H, W, C] in [0, 1].
          n0: selection samples per image, >= 1.
          n: estimation samples per image, >= 1.
          alpha: failure probability, in (0, 1).
          batch_size: most noisy copies per forward pass, >= 1.
          seed: integer seed for reproducible noise; None draws one.
          image_ids: an integer id per image that keys its noise (default:
            position in the batch); give dataset indices so a result does not
            depend on the batch the image was certified in.

        Returns:
          (classes int64 [B], ABSTAIN = -1; radii float64 [B], 0 where abstaining).

        Raises:
          ValueError: a bad argument or image (shape; a pixel outside [0, 1] or NaN, or in grid mode off the
            8-bit grid, named).
        """
        images = self._check_images(images)
        n0, n = _check_int("n0", n0, 1), _check_int("n", n, 1)
        alpha, batch_size = _check_alpha(alpha), _check_int("batch_size", batch_size, 1)
        keys = self._keys(len(images), seed, image_ids)
        selection = self._counts(images, n0, batch_size, keys, SELECTION)
        estimation = self._counts(images, n, batch_size, keys, ESTIMATION)
        classes, radii, _ = self._certify_fn(tf.constant(selection), tf.constant(estimation),
                                             tf.constant(n, tf.int64), tf.constant(alpha, tf.float64),
                                             tf.constant(self.slack(images), tf.float64))
        return classes.numpy(), radii.numpy()

    def predict_batch(self, images, n: int, alpha: float, batch_size: int, seed: Optional[int] = None,
                      image_ids: Optional[Sequence[int]] = None) -> np.ndarray:
        """PREDICT for each of a batch of images.

        Draws n samples per image and returns the top class, or ABSTAIN when
        the two-sided binomial test of the top two counts gives a p-value
        above alpha. With probability >= 1 - alpha a returned class is g(x).

        Args:
          images: float32 [B, H, W, C] in [0, 1].
          n: samples per image, >= 1.
          alpha: failure probability, in (0, 1).
          batch_size: most noisy copies per forward pass, >= 1.
          seed: integer seed for reproducible noise; None draws one.
          image_ids: an integer id per image that keys its noise (see `certify_batch`).

        Returns:
          int64 [B] classes, ABSTAIN = -1.

        Raises:
          ValueError: a bad argument or image.
        """
        images = self._check_images(images)
        n = _check_int("n", n, 1)
        alpha, batch_size = _check_alpha(alpha), _check_int("batch_size", batch_size, 1)
        level = self._predict_level(images, alpha, n)
        counts = self._counts(images, n, batch_size, self._keys(len(images), seed, image_ids), PREDICTION)
        return self._predict_rule(counts, level)

    def certify_staged_batch(self, images, n0: int, n: int, alpha: float, batch_size: int,
                             radii: Sequence[float], stages: Optional[Sequence[int]] = None,
                             seed: Optional[int] = None,
                             image_ids: Optional[Sequence[int]] = None) -> stats.StagedCertificate:
        """CERTIFY for given radii, drawing estimation samples in stages until each image is settled.

        The top class of each image comes from n0 selection samples, the
        very ones `certify_batch` draws for the same seed and image id. The
        estimation samples are then drawn in stages n_1 < ... < n_K = n
        (cumulative), only for the images not yet settled: an image stops
        once neither 1/2 nor any Phi(r / sigma), r in radii, lies strictly
        between its Clopper-Pearson bounds at the stage's level
        (`stats.stage_levels`)
        (`stats.staged_certify`; the module docstring of stats.py says why
        the answer holds with probability >= 1 - alpha). Stage k draws the
        image's new n_k - n_{k-1} samples from its own noise stream
        (`staged_stream`), so the result of an image does not depend on the
        batch it is certified in.

        An image is certified at radius r iff its radius is >= r (g is then
        constant within L2 distance r), as certified accuracy counts it in
        analysis.py. The radius is sigma Phi^-1(lower bound) at the stopping
        stage: valid, but smaller than fixed-n CERTIFY's for images that stop
        early, so an average certified radius over it is biased low. Use
        `certify_batch` for the largest radius of each image.

        Args:
          images: float32 [B, H, W, C] in [0, 1].
          n0: selection samples per image, >= 1.
          n: estimation samples per image at most (n_max), >= 1.
          alpha: failure probability, in (0, 1).
          batch_size: most noisy copies per forward pass, >= 1.
          radii: the radii asked, R >= 1 of them, each finite and > 0.
          stages: cumulative estimation counts, increasing, ending at n; with
            more than one stage the first must be >= n0. None: the default
            `stats.default_stages(n)` (starting at max(n0, 100)).
          seed: integer seed for reproducible noise; None draws one.
          image_ids: an integer id per image that keys its noise (see `certify_batch`).

        Returns:
          A `stats.StagedCertificate`: classes int64 [B] (ABSTAIN = -1),
          radii float64 [B], certified bool [B, R], samples int64 [B] (the
          estimation samples drawn, one of the stages), p_lower float64 [B].

        Raises:
          ValueError: a bad argument (named) or image.
        """
        images = self._check_images(images)
        n0, n = _check_int("n0", n0, 1), _check_int("n", n, 1)
        alpha, batch_size = _check_alpha(alpha), _check_int("batch_size", batch_size, 1)
        radii = stats.check_radii(radii)
        stages = stats.resolve_stages(stages, n, n0)
        keys = self._keys(len(images), seed, image_ids)
        guesses = np.argmax(self._counts(images, n0, batch_size, keys, SELECTION), axis=1)

        def draw(active, stage, num_new):
            counts = self._counts(images[active], num_new, batch_size, keys[active],
                                  staged_stream(ESTIMATION, stage))
            return counts[np.arange(len(active)), guesses[active]]

        return stats.staged_certify(guesses, draw, stages, alpha=alpha, sigma=self.sigma, radii=radii,
                                    stage_rule=self._stage_rule(radii, self.slack(images)), decision=self._decision)

    def predict_staged_batch(self, images, n: int, alpha: float, batch_size: int,
                             stages: Optional[Sequence[int]] = None, seed: Optional[int] = None,
                             image_ids: Optional[Sequence[int]] = None) -> stats.StagedPrediction:
        """PREDICT drawing samples in stages, each image stopping as soon as its test rejects a tie.

        At each stage n_1 < ... < n_K = n the two-sided binomial test of the
        top two counts so far runs at the stage's level (`stats.staged_predict`);
        an image returns its top class at the first stage where the test
        rejects, and ABSTAIN only if it never did by n. With probability
        >= 1 - alpha a returned class is g(x). Stage k's new samples come from
        the image's own noise stream (`staged_stream`).

        Args:
          images: float32 [B, H, W, C] in [0, 1].
          n: samples per image at most (n_max), >= 1.
          alpha: failure probability, in (0, 1).
          batch_size: most noisy copies per forward pass, >= 1.
          stages: cumulative sample counts, increasing, ending at n. None: the
            default `stats.default_stages(n)`.
          seed: integer seed for reproducible noise; None draws one.
          image_ids: an integer id per image that keys its noise (see `certify_batch`).

        Returns:
          A `stats.StagedPrediction`: classes int64 [B] (ABSTAIN = -1) and
          samples int64 [B] (one of the stages).

        Raises:
          ValueError: a bad argument (named) or image.
        """
        images = self._check_images(images)
        n = _check_int("n", n, 1)
        alpha, batch_size = _check_alpha(alpha), _check_int("batch_size", batch_size, 1)
        stages = stats.resolve_stages(stages, n, None)
        level = self._predict_level(images, alpha, n)
        keys = self._keys(len(images), seed, image_ids)

        def draw(active, stage, num_new):
            return self._counts(images[active], num_new, batch_size, keys[active],
                                staged_stream(PREDICTION, stage))

        return stats.staged_predict(len(images), draw, stages, alpha=level, predict_rule=self._predict_rule)

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int,
                seed: Optional[int] = None) -> Tuple[int, float]:
        """CERTIFY for one image x of shape [H, W, C]; see `certify_batch`.

        Returns:
          (class, radius): the class is ABSTAIN (-1) with radius 0.0 when
          the bound on the top class's probability is below 1/2.
        """
        classes, radii = self.certify_batch(self._one(x), n0, n, alpha, batch_size, seed)
        return int(classes[0]), float(radii[0])

    def predict(self, x, n: int, alpha: float, batch_size: int, seed: Optional[int] = None) -> int:
        """PREDICT for one image x of shape [H, W, C]; see `predict_batch`.

        Returns:
          The class, or ABSTAIN (-1).
        """
        return int(self.predict_batch(self._one(x), n, alpha, batch_size, seed)[0])

    @staticmethod
    def _one(x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3:
            raise ValueError(f"x must be one image [H, W, C], got shape {x.shape}")
        return x[np.newaxis]
