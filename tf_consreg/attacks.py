"""SmoothAdv: L2 PGD against the soft smoothed classifier (Salman et al., 2019).

Follows `SmoothAdv_PGD` in the paper authors' `code/train_consistency.py`:
the m Gaussian noise draws are held fixed while the attack maximizes
-log(mean_i softmax(f(x' + delta_i))_y), and no random start is used.
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

# The authors' constants: clamp of the smoothed probability before the log,
# the guard in the gradient normalization, and torch.renorm's guard in the
# projection (factor epsilon / (norm + 1e-7) when norm > epsilon).
_PROB_CLAMP = 1e-20
_GRAD_NORM_EPS = 1e-8
_RENORM_EPS = 1e-7


def _stack_noises(noises, images: tf.Tensor) -> tf.Tensor:
    """Returns the noises as one [m, B, ...] tensor in the images' dtype."""
    if isinstance(noises, (list, tuple)):
        if len(noises) < 1:
            raise ValueError("noises: need at least one noise tensor (m >= 1), got an empty sequence")
        noises = tf.stack([tf.convert_to_tensor(n, dtype=images.dtype) for n in noises], axis=0)
    else:
        noises = tf.convert_to_tensor(noises, dtype=images.dtype)
    if noises.shape.rank is not None and noises.shape.rank != images.shape.rank + 1:
        raise ValueError(
            f"noises: expected a list of m tensors shaped like images {images.shape} or a tensor "
            f"[m, *images.shape], got shape {noises.shape}")
    if not noises.shape[1:].is_compatible_with(images.shape):
        raise ValueError(
            f"noises: each noise must have the images' shape {images.shape}, got {noises.shape[1:]}")
    return noises


def _per_example_norm(x: tf.Tensor) -> tf.Tensor:
    """L2 norm of each example, shaped [B, 1, ..., 1] to broadcast against x."""
    axes = list(range(1, x.shape.rank))
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes, keepdims=True))


def _smoothed_nll(model, adv, noises, labels, training):
    """Mean over the batch of -log(max(mean_i softmax(f(adv + noise_i))_y, 1e-20))."""
    noisy = adv[None] + noises  # [m, B, ...]
    # One forward pass over all m * B copies: with training=False the model is
    # a per-example function, so this equals the authors' m separate calls.
    example_shape = adv.shape[1:]
    if example_shape.is_fully_defined():
        flat_shape = [-1] + example_shape.as_list()
    else:
        flat_shape = tf.concat([[-1], tf.shape(adv)[1:]], axis=0)
    logits = model(tf.reshape(noisy, flat_shape), training=training)
    if logits.dtype in (tf.float16, tf.bfloat16):
        logits = tf.cast(logits, tf.float32)
    num_noises = tf.shape(noises)[0]
    batch_size = tf.shape(adv)[0]
    logits = tf.reshape(logits, tf.stack([num_noises, batch_size, tf.shape(logits)[-1]]))
    avg = tf.reduce_mean(tf.nn.softmax(logits, axis=-1), axis=0)  # [B, C]
    p_label = tf.gather(avg, labels, axis=1, batch_dims=1)
    clamp = tf.constant(_PROB_CLAMP, dtype=p_label.dtype)
    return -tf.reduce_mean(tf.math.log(tf.maximum(p_label, clamp)))


def smoothadv_pgd(
    model: Callable[..., tf.Tensor],
    images: tf.Tensor,
    labels: tf.Tensor,
    noises: Sequence[tf.Tensor] | tf.Tensor,
    *,
    epsilon: float | tf.Tensor,
    num_steps: int,
    training: bool = False,
) -> tf.Tensor:
    """SmoothAdv L2 PGD with fixed noise draws, as in the authors' training code.

    Starting at x' = x (no random start), each of `num_steps` steps does
      g = grad_x' L(x'),   L = mean_b -log(max(mean_i softmax(f(x'_b + noise_i))_y, 1e-20)),
      x' <- x' + alpha * g / (||g_b|| + 1e-8)          alpha = 2 * epsilon / num_steps,
      d = x' - x;  d <- d * epsilon / (||d_b|| + 1e-7) where ||d_b|| > epsilon,
      x' <- clip(x + d, 0, 1),
    with per-example L2 norms. Only the input is differentiated: the model's
    weights get no gradient, and the result is wrapped in `tf.stop_gradient`.
    Pure TensorFlow ops in a `tf.while_loop`, so it traces once inside a
    `tf.function` (also in a `tf.distribute` replica context, where each
    replica attacks its own examples) and `epsilon` may be a tensor or
    variable that changes between calls without retracing.

    Args:
        model: built Keras model or callable mapping [N, ...] images in
            [0, 1] to [N, C] logits; called with `training=training`.
        images: [B, ...] clean images with values in [0, 1].
        labels: [B] integer labels.
        noises: m >= 1 noise tensors shaped like `images`, as a list or a
            tensor [m, B, ...]; added to the adversarial image unclipped.
        epsilon: L2 radius, >= 0 (0 returns `images`).
        num_steps: number of PGD steps, a Python int >= 1.
        training: passed to the model; False (the authors' `model.eval()`)
            keeps BatchNorm statistics frozen and dropout off.

    Returns:
        Adversarial images [B, ...] in [0, 1], with ||x' - x||_2 <= epsilon
        per example, gradient-stopped.

    Raises:
        ValueError: naming the argument, for bad shapes or dtypes, a negative
            `epsilon` known at trace time, or `num_steps` < 1.
        tf.errors.InvalidArgumentError: at run time if `images` leave [0, 1]
            or a tensor `epsilon` is negative.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps: must be a Python int >= 1, got {num_steps!r}")
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        raise ValueError(f"images: expected a floating-point tensor, got dtype {images.dtype.name}")
    if images.shape.rank is None or images.shape.rank < 2:
        raise ValueError(f"images: expected a tensor [B, ...] of known rank >= 2, got shape {images.shape}")
    labels = tf.convert_to_tensor(labels)
    if not labels.dtype.is_integer:
        raise ValueError(f"labels: expected an integer tensor, got dtype {labels.dtype.name}")
    if labels.shape.rank is not None and labels.shape.rank != 1:
        raise ValueError(f"labels: expected shape [B], got {labels.shape}")
    if not labels.shape.is_compatible_with(images.shape[:1]):
        raise ValueError(f"labels: shape {labels.shape} does not match the images' batch {images.shape[:1]}")
    noises = _stack_noises(noises, images)

    if tf.is_tensor(epsilon) or isinstance(epsilon, tf.Variable):
        static_eps = tf.get_static_value(epsilon)
        epsilon = tf.cast(epsilon, images.dtype)
    else:
        static_eps = np.float64(epsilon)
        # Through float64 so that a Python 0.1 is not rounded to float32 first.
        epsilon = tf.cast(tf.constant(static_eps, tf.float64), images.dtype)
    if epsilon.shape.rank != 0:
        raise ValueError(f"epsilon: expected a scalar, got shape {epsilon.shape}")
    if static_eps is not None and not static_eps >= 0:
        raise ValueError(f"epsilon: must be >= 0, got {static_eps}")

    checks = [
        tf.debugging.assert_non_negative(epsilon, message="epsilon: must be >= 0"),
        tf.debugging.assert_greater_equal(images, tf.zeros([], images.dtype),
                                          message="images: values must lie in [0, 1]"),
        tf.debugging.assert_less_equal(images, tf.ones([], images.dtype),
                                       message="images: values must lie in [0, 1]"),
    ]
    with tf.control_dependencies(checks):
        images = tf.identity(images)
    labels = tf.cast(labels, tf.int32)
    step_size = 2 * epsilon / num_steps
    grad_eps = tf.constant(_GRAD_NORM_EPS, images.dtype)
    renorm_eps = tf.constant(_RENORM_EPS, images.dtype)

    def body(i, adv):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(adv)
            loss = _smoothed_nll(model, adv, noises, labels, training)
        grad = tf.cast(tape.gradient(loss, adv), images.dtype)
        adv = adv + step_size * grad / (_per_example_norm(grad) + grad_eps)
        delta = adv - images
        norm = _per_example_norm(delta)
        delta *= tf.where(norm > epsilon, epsilon / (norm + renorm_eps), tf.ones_like(norm))
        return i + 1, tf.clip_by_value(images + delta, 0, 1)

    _, adv = tf.while_loop(
        lambda i, _: i < num_steps, body, (tf.constant(0), images),
        shape_invariants=(tf.TensorShape([]), images.shape))
    return tf.stop_gradient(adv)
