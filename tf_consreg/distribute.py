"""The one place that chooses a distribution strategy, and replica-aware helpers.

Two rules hold for every loss term the project adds by hand:

* Scaling: a replica's loss is its local mean divided by the number of
  replicas, the rule Keras's own loss reductions follow, so that the SUM
  all-reduce of gradients gives the gradient of the global mean.
* Noise: each example's noise is drawn from a stateless seed derived from
  (run seed, step, the example's index in the global batch). Replicas hold
  different examples, so they draw different noise (unlike a Keras
  `SeedGenerator`, whose state is identical on every replica), and the noise
  an example gets does not depend on how many replicas share the batch.
"""

from typing import Optional

import tensorflow as tf

from tf_consreg.errors import ConfigError


def get_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Turns a `--strategy` value into a `tf.distribute.Strategy`.

    Args:
      name: "auto" (MirroredStrategy over all GPUs when more than one is
        visible, otherwise the default strategy), "default" (one device), or
        "mirrored" (MirroredStrategy over all visible GPUs, or over all logical
        CPU devices when there is no GPU).

    Returns:
      The strategy; build models, optimizers and metrics inside its scope.

    Raises:
      ConfigError: unknown name.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        # On CPU only machines the all-reduce must not use NCCL.
        cross_device_ops = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
    raise ConfigError(f"--strategy={name!r} is unknown; choose one of auto, default, mirrored")


def num_replicas() -> int:
    """Replicas in sync under the current strategy (1 outside any strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_loss(value: tf.Tensor) -> tf.Tensor:
    """Local mean -> this replica's share of the global mean (divides by replicas)."""
    n = num_replicas()
    return value if n == 1 else value * tf.cast(1.0 / n, value.dtype)


def unscale_loss(value: tf.Tensor) -> tf.Tensor:
    """Inverse of `scale_loss`, for reporting a replica's loss as its local mean."""
    n = num_replicas()
    return value if n == 1 else value * tf.cast(n, value.dtype)


def replica_id() -> tf.Tensor:
    """This replica's index in its sync group (0 outside a replica context)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.constant(0, tf.int32)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


def example_seeds(step_seed: tf.Tensor, local_batch_size: tf.Tensor) -> tf.Tensor:
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
    positions = tf.cast(replica_id(), tf.int64) * local + tf.range(local, dtype=tf.int64)
    step_seed = tf.cast(step_seed, tf.int64)
    return tf.stack([tf.fill([local], step_seed[0]), step_seed[1] * (1 << 32) + positions], axis=1)


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


def gaussian_noise(images: tf.Tensor, num_copies: int, sigma: float, seeds: tf.Tensor) -> tf.Tensor:
    """N(0, sigma^2 I) noise for `num_copies` copies of each image, copy-major.

    Args:
      images: [B, ...] images (only their shape and dtype are used).
      num_copies: m, noisy copies per image.
      sigma: noise standard deviation.
      seeds: int64 [B, 2] per-example seeds (see `example_seeds`).

    Returns:
      [m * B, ...]: rows [i * B, (i + 1) * B) are the noise of copy i of every image.
    """
    shape = tf.concat([[num_copies], tf.shape(images)[1:]], axis=0)
    noise = tf.map_fn(lambda s: tf.random.stateless_normal(shape, s, dtype=images.dtype), seeds,
                      fn_output_signature=images.dtype, parallel_iterations=64)  # [B, m, ...]
    noise = tf.experimental.numpy.swapaxes(noise, 0, 1)  # [m, B, ...]
    return sigma * tf.reshape(noise, tf.concat([[-1], tf.shape(images)[1:]], axis=0))


def gaussian_copies(images: tf.Tensor, num_copies: int, sigma: float, seeds: tf.Tensor) -> tf.Tensor:
    """Noisy copies x + N(0, sigma^2 I), `num_copies` per image, copy-major.

    Same arguments as `gaussian_noise`; returns [m * B, ...] where rows
    [i * B, (i + 1) * B) are copy i of every image.
    """
    return tile_copies(images, num_copies) + gaussian_noise(images, num_copies, sigma, seeds)


def tile_copies(values: tf.Tensor, num_copies: int) -> tf.Tensor:
    """[B, ...] -> [m * B, ...], copy-major (the whole batch repeated m times)."""
    multiples = tf.concat([[num_copies], tf.ones([tf.rank(values) - 1], tf.int32)], axis=0)
    return tf.tile(values, multiples)
