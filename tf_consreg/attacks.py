"""Attacks on the soft smoothed classifier: SmoothAdv's PGD and SmoothMix's walk.

Both climb L(x') = -log(max(mean_i softmax(f(x' + noise_i))_y, 1e-20)), the
soft smoothed classifier's loss, with the m Gaussian noise draws held fixed,
by normalized L2 gradient steps from the clean image (no random start),
projecting after every step. They follow the paper authors' training code:

* `smoothadv_pgd`: `SmoothAdv_PGD` in `code/train_consistency.py` of
  jh-jeong/smoothing-consistency (Salman et al., 2019): steps of
  2 * epsilon / num_steps on the batch mean of L, within the epsilon ball.
* `smoothmix_pgd`: `SmoothMix_PGD` in `code/train.py` of jh-jeong/smoothmix
  (Jeong et al., 2021): steps of a fixed length on the batch sum of L,
  optionally bounded, returning the mixup's start point and the walk's end.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

# The authors' constants: clamp of the smoothed probability before the log,
# the guard in the gradient normalization, and torch.renorm's guard in the
# projection (factor radius / (norm + 1e-7) when norm > radius).
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


def _check_inputs(images, labels, noises) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Validates an attack's inputs; returns images, int32 labels and [m, B, ...] noises.

    Shapes and dtypes are checked at trace time; the images' range [0, 1] at
    run time (the returned images carry the assertion).
    """
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
    checks = [
        tf.debugging.assert_greater_equal(images, tf.zeros([], images.dtype),
                                          message="images: values must lie in [0, 1]"),
        tf.debugging.assert_less_equal(images, tf.ones([], images.dtype),
                                       message="images: values must lie in [0, 1]"),
    ]
    with tf.control_dependencies(checks):
        images = tf.identity(images)
    return images, tf.cast(labels, tf.int32), noises


def _check_num_steps(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: must be a Python int >= {minimum}, got {value!r}")


def _scalar(value, name: str, dtype: tf.DType, *, positive: bool) -> tf.Tensor:
    """A scalar hyperparameter (Python number, tensor or variable) as a `dtype` tensor.

    Raises ValueError for a non-scalar, or a value known at trace time that is
    negative (or zero when `positive`); a tensor's value is also asserted at
    run time, so a variable changed between calls is checked too.
    """
    if tf.is_tensor(value) or isinstance(value, tf.Variable):
        static = tf.get_static_value(value)
        tensor = tf.cast(value, dtype)
    else:
        static = np.float64(value)
        # Through float64 so that a Python 0.1 is not rounded to float32 first.
        tensor = tf.cast(tf.constant(static, tf.float64), dtype)
    if tensor.shape.rank != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {tensor.shape}")
    if static is not None and not (static > 0 if positive else static >= 0):
        raise ValueError(f"{name}: must be {'> 0' if positive else '>= 0'}, got {static}")
    message = f"{name}: must be {'> 0' if positive else '>= 0'}"
    check = (tf.debugging.assert_positive(tensor, message=message) if positive
             else tf.debugging.assert_non_negative(tensor, message=message))
    with tf.control_dependencies([check]):
        return tf.identity(tensor)


def _per_example_norm(x: tf.Tensor) -> tf.Tensor:
    """L2 norm of each example, shaped [B, 1, ..., 1] to broadcast against x."""
    axes = list(range(1, x.shape.rank))
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes, keepdims=True))


def _smoothed_nll(model, adv, noises, labels, training) -> tf.Tensor:
    """Per-example [B] -log(max(mean_i softmax(f(adv + noise_i))_y, 1e-20))."""
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
    return -tf.math.log(tf.maximum(p_label, clamp))


def _project(points: tf.Tensor, center: tf.Tensor, radius: Optional[tf.Tensor]) -> tf.Tensor:
    """torch.renorm of points - center to L2 norm <= radius per example (None: no bound), then clip to [0, 1]."""
    if radius is not None:
        delta = points - center
        norm = _per_example_norm(delta)
        delta *= tf.where(norm > radius, radius / (norm + tf.constant(_RENORM_EPS, norm.dtype)),
                          tf.ones_like(norm))
        points = center + delta
    return tf.clip_by_value(points, 0, 1)


def _walk(model, start, images, labels, noises, *, num_steps: int, step_size: tf.Tensor,
          radius: Optional[tf.Tensor], reduce: Callable[[tf.Tensor], tf.Tensor], training: bool) -> tf.Tensor:
    """`num_steps` normalized gradient-ascent steps on reduce(per-example NLL), each projected around `images`.

    Pure TensorFlow ops in a `tf.while_loop`: traces once inside a
    `tf.function` whatever `num_steps` is, and only the input is
    differentiated (the model's weights get no gradient).
    """
    grad_eps = tf.constant(_GRAD_NORM_EPS, images.dtype)

    def body(i, adv):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(adv)
            loss = reduce(_smoothed_nll(model, adv, noises, labels, training))
        grad = tf.cast(tape.gradient(loss, adv), images.dtype)
        adv = adv + step_size * grad / (_per_example_norm(grad) + grad_eps)
        return i + 1, _project(adv, images, radius)

    _, end = tf.while_loop(
        lambda i, _: i < num_steps, body, (tf.constant(0), start),
        shape_invariants=(tf.TensorShape([]), images.shape))
    return end


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
    _check_num_steps(num_steps, "num_steps", 1)
    images, labels, noises = _check_inputs(images, labels, noises)
    epsilon = _scalar(epsilon, "epsilon", images.dtype, positive=False)
    adv = _walk(model, images, images, labels, noises, num_steps=num_steps, step_size=2 * epsilon / num_steps,
                radius=epsilon, reduce=tf.reduce_mean, training=training)
    return tf.stop_gradient(adv)


def smoothmix_pgd(
    model: Callable[..., tf.Tensor],
    images: tf.Tensor,
    labels: tf.Tensor,
    noises: Sequence[tf.Tensor] | tf.Tensor,
    *,
    step_size: float | tf.Tensor,
    num_steps: int,
    mix_step: int = 0,
    maxnorm: Optional[float | tf.Tensor] = None,
    maxnorm_s: Optional[float | tf.Tensor] = None,
    training: bool = False,
) -> Tuple[tf.Tensor, tf.Tensor]:
    """SmoothMix's adversarial walk with fixed noise draws, as in the authors' `SmoothMix_PGD`.

    Starting at x' = x (no random start), each of `num_steps` steps does
      g = grad_x' L(x'),   L = sum_b -log(max(mean_i softmax(f(x'_b + noise_i))_y, 1e-20)),
      x' <- x' + step_size * g / (||g_b|| + 1e-8),
      x' <- clip(x + renorm(x' - x, maxnorm), 0, 1),
    with per-example L2 norms, where renorm(d, r) scales d by r / (||d_b|| + 1e-7)
    where ||d_b|| > r (torch.renorm) and is skipped when `maxnorm` is None:
    the walk is then unbounded but for the clip. The loss is the batch sum,
    as the authors' (SmoothAdv's is the mean), so each example's step depends
    on its own loss only, also through the 1e-8 guard.

    The mixup's start point is the walk after `mix_step` steps (x itself for
    0, the one-step adversary for 1; x when `mix_step` >= `num_steps`),
    projected as clip(x + renorm(start - x, maxnorm_s), 0, 1).

    Only the input is differentiated: the model's weights get no gradient,
    and both results are wrapped in `tf.stop_gradient`. Pure TensorFlow ops
    in `tf.while_loop`s, so it traces once inside a `tf.function` (also in a
    `tf.distribute` replica context), and the tensor hyperparameters (e.g. a
    `maxnorm_s` warmed up per epoch) may change between calls without
    retracing.

    Args:
        model: built Keras model or callable mapping [N, ...] images in
            [0, 1] to [N, C] logits; called with `training=training`.
        images: [B, ...] clean images with values in [0, 1].
        labels: [B] integer labels.
        noises: m >= 1 noise tensors shaped like `images`, as a list or a
            tensor [m, B, ...]; added to the walk's points unclipped.
        step_size: L2 length of each step, > 0 (the authors' `--alpha`, in
            [0, 1] pixel units).
        num_steps: number of steps T, a Python int >= 1.
        mix_step: steps taken before the start point is recorded, a Python
            int >= 0 (the authors' `--mix_step`: 0 or 1).
        maxnorm: L2 bound of the walk around x, > 0, or None (unbounded, the
            authors' default).
        maxnorm_s: L2 bound of the start point around x, >= 0, or None for
            `step_size * mix_step` (the authors' default; their training
            multiplies it by the warm-up factor and passes it in).
        training: passed to the model; False (the authors' `model.eval()`)
            keeps BatchNorm statistics frozen and dropout off.

    Returns:
        (start, end): two [B, ...] tensors in [0, 1], gradient-stopped: the
        mixup's start point and the walk's end.

    Raises:
        ValueError: naming the argument, for bad shapes or dtypes,
            `num_steps` < 1, `mix_step` < 0, or a step size or bound out of
            range known at trace time.
        tf.errors.InvalidArgumentError: at run time if `images` leave [0, 1]
            or a tensor hyperparameter is out of range.
    """
    _check_num_steps(num_steps, "num_steps", 1)
    _check_num_steps(mix_step, "mix_step", 0)
    images, labels, noises = _check_inputs(images, labels, noises)
    step_size = _scalar(step_size, "step_size", images.dtype, positive=True)
    if maxnorm is not None:
        maxnorm = _scalar(maxnorm, "maxnorm", images.dtype, positive=True)
    maxnorm_s = (step_size * mix_step if maxnorm_s is None
                 else _scalar(maxnorm_s, "maxnorm_s", images.dtype, positive=False))

    def walk(start, steps):
        return _walk(model, start, images, labels, noises, num_steps=steps, step_size=step_size,
                     radius=maxnorm, reduce=tf.reduce_sum, training=training)

    if 0 < mix_step < num_steps:
        start = walk(images, mix_step)
        end = walk(start, num_steps - mix_step)
    else:  # The authors record the start at step mix_step, so never when mix_step >= num_steps.
        start, end = images, walk(images, num_steps)
    start = _project(start, images, maxnorm_s)
    return tf.stop_gradient(start), tf.stop_gradient(end)


def smoothmix_inputs(start: tf.Tensor, end: tf.Tensor, mix_weights: tf.Tensor) -> tf.Tensor:
    """The SmoothMix inputs (1 - lam_b) * start_b + lam_b * end_b, one weight per example.

    The authors draw lam_b uniformly in [0, 1/2) (`_mixup_data` in their
    `code/train.py`); the same weights mix the targets (`losses.smoothmix_loss`).

    Args:
        start: [B, ...] start points (`smoothmix_pgd`'s first result).
        end: [B, ...] end points of the walk, same shape and dtype.
        mix_weights: [B] weights lam_b, cast to the points' dtype.

    Returns:
        [B, ...] mixed points.

    Raises:
        ValueError: for points of other shapes or dtypes, or weights not [B].
    """
    start = tf.convert_to_tensor(start)
    end = tf.convert_to_tensor(end)
    if not start.dtype.is_floating or start.dtype != end.dtype:
        raise ValueError(f"end: expected the start points' floating dtype {start.dtype.name}, got {end.dtype.name}")
    if start.shape.rank is None or start.shape.rank < 1 or not start.shape.is_compatible_with(end.shape):
        raise ValueError(f"end: shape {end.shape} differs from the start points' shape {start.shape}")
    weights = tf.cast(mix_weights, start.dtype)
    if weights.shape.rank != 1 or not weights.shape.is_compatible_with(start.shape[:1]):
        raise ValueError(f"mix_weights: expected shape [B] = {start.shape[:1]}, got {weights.shape}")
    weights = tf.reshape(weights, [-1] + [1] * (start.shape.rank - 1))
    return (1 - weights) * start + weights * end
