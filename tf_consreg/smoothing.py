"""Monte Carlo sampling of a smoothed classifier g(x) = argmax_c P(f(x + d) = c).

`sample_counts` is the one sampling loop of the project: noise, forward pass,
class counts, all TensorFlow ops, so it runs inside a `tf.function` here and
inside the exported SavedModel (export.py) alike.
"""

from typing import Union

import keras
import tensorflow as tf

_IntLike = Union[int, tf.Tensor]


def _per_image_seeds(seed: tf.Tensor, num_images: tf.Tensor) -> tf.Tensor:
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


def sample_counts(
    model: keras.Model,
    images: tf.Tensor,
    num_samples: _IntLike,
    *,
    sigma: Union[float, tf.Tensor],
    num_classes: int,
    batch_size: _IntLike,
    seed: tf.Tensor,
) -> tf.Tensor:
    """Counts the base classifier's predictions under Gaussian noise.

    For each image x, draws `num_samples` noise vectors d ~ N(0, sigma^2 I) in
    [0, 1] pixel space (the model normalizes inside) and counts
    argmax model(x + d, training=False) per class.

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

    Returns:
      int64 [B, num_classes]: counts[i, c] is the number of samples of image i
      classified as c; each row sums to `num_samples`.

    Raises:
      ValueError: if `images` is not rank 4 or a static `batch_size` or
        `num_samples` is out of range.
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

    image_shape = images.shape[1:]
    sigma = tf.cast(sigma, tf.float32)
    n = tf.cast(num_samples, tf.int32)
    num_images = tf.shape(images)[0]
    seeds = _per_image_seeds(seed, num_images)

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
        noise = tf.map_fn(
            lambda s: tf.random.stateless_normal(
                tf.concat([[size], image_shape], 0),
                seed=tf.random.fold_in(s, tf.cast(j, tf.int64)),
            ),
            seeds[start:stop],
            fn_output_signature=tf.TensorSpec([None, *image_shape], tf.float32),
        )
        noisy = images[start:stop, tf.newaxis] + sigma * noise
        noisy = tf.reshape(noisy, [-1, *image_shape])
        logits = model(noisy, training=False)
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        # Cell (image, class) of each sample, counted on device in one op.
        owner = start + tf.range(tf.shape(predictions)[0]) // size
        cells = owner * num_classes + predictions
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
