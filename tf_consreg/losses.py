"""Objectives for training smoothed classifiers: consistency, stability, MACER, SmoothMix.

Plain functions, tensors in and tensors out, so the Keras `train_step` and the
tests share one implementation. Each follows the semantics of the paper
authors' PyTorch code (Jeong & Shin, 2020, `code/consistency.py`,
`code/train_stab.py`, `code/third_party/macer.py`; Jeong et al., 2021,
SmoothMix's `code/train.py`), including its clamps, so that numbers are
comparable with theirs.

Every function takes `reduction`: "mean" averages over the examples it is
given (the authors' convention), "none" returns one value per example, for
callers that need to scale by a global batch size (e.g. under
`tf.distribute`, see `tf.nn.compute_average_loss`).

Inputs in float16/bfloat16 are computed in float32: the authors' 1e-20 clamp
underflows to zero in half precision.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np
import tensorflow as tf

CONSISTENCY_LOSSES = ("default", "xent", "kl", "mse")
REDUCTIONS = ("mean", "none")

# The authors clamp p_bar at 1e-20 before taking its log in the entropy term
# (code/consistency.py) and in SmoothAdv's loss; MACER adds 1e-10 instead
# (code/third_party/macer.py). Kept as is so that values match theirs.
ENTROPY_CLAMP = 1e-20
MACER_LOG_EPS = 1e-10


def _as_float_tensor(value, name: str) -> tf.Tensor:
    """Converts `value` to a floating tensor of at least 32 bits."""
    tensor = tf.convert_to_tensor(value)
    if not tensor.dtype.is_floating:
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype.name}")
    if tensor.dtype in (tf.float16, tf.bfloat16):
        tensor = tf.cast(tensor, tf.float32)
    return tensor


def _check_rank(tensor: tf.Tensor, rank: int, name: str, layout: str) -> None:
    if tensor.shape.rank is not None and tensor.shape.rank != rank:
        raise ValueError(f"{name}: expected rank {rank} {layout}, got shape {tensor.shape}")


def _batch_vector(value, name: str, batch: tf.TensorShape, *, integer: bool) -> tf.Tensor:
    """`value` as a [B] tensor of integer (labels) or floating dtype, B compatible with `batch`."""
    tensor = tf.convert_to_tensor(value)
    if not (tensor.dtype.is_integer if integer else tensor.dtype.is_floating):
        kind = "an integer" if integer else "a floating-point"
        raise ValueError(f"{name}: expected {kind} tensor, got dtype {tensor.dtype.name}")
    _check_rank(tensor, 1, name, "[B]")
    if not tensor.shape.is_compatible_with(batch):
        raise ValueError(f"{name}: shape {tensor.shape} does not match the logits' batch {batch}")
    return tensor


def _check_scalar_hparam(value, name: str, *, positive: bool = False) -> None:
    """Raises ValueError if a hyperparameter known at trace time is out of range.

    Symbolic tensors (e.g. a schedule inside `tf.function`) are not checked.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, numbers.Real):
        static = np.asarray(value, dtype=np.float64)
    else:
        static = tf.get_static_value(value)
        if static is None:
            return
        static = np.asarray(static)
        if static.ndim != 0:
            raise ValueError(f"{name}: expected a scalar, got shape {static.shape}")
    if positive and not static > 0:
        raise ValueError(f"{name}: must be > 0, got {static}")
    if not static >= 0:
        raise ValueError(f"{name}: must be >= 0, got {static}")


def _cast_hparam(value, dtype: tf.DType) -> tf.Tensor:
    """Casts a hyperparameter to `dtype` without a float32 detour.

    `tf.cast(0.1, tf.float64)` first makes a float32 constant and so gives
    0.10000000149..., hence Python numbers go through float64.
    """
    if tf.is_tensor(value) or isinstance(value, tf.Variable):
        return tf.cast(value, dtype)
    return tf.cast(tf.constant(value, dtype=tf.float64), dtype)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(per_example: tf.Tensor, reduction: str) -> tf.Tensor:
    return tf.reduce_mean(per_example) if reduction == "mean" else per_example


def _stack_logits(logits: Sequence[tf.Tensor], name: str = "logits") -> tf.Tensor:
    """Validates m logit batches of one shape [B, C] and stacks them to [m, B, C]; errors name `name`."""
    if not isinstance(logits, (list, tuple)):
        raise ValueError(
            f"{name}: expected a list or tuple of m tensors [B, C], got "
            f"{type(logits).__name__}; split a stacked tensor with tf.unstack")
    if len(logits) < 1:
        raise ValueError(f"{name}: need at least one logit batch (m >= 1), got an empty sequence")
    tensors = [_as_float_tensor(z, f"{name}[{i}]") for i, z in enumerate(logits)]
    first = tensors[0]
    _check_rank(first, 2, f"{name}[0]", "[B, C]")
    for i, tensor in enumerate(tensors[1:], start=1):
        if tensor.dtype != first.dtype:
            raise ValueError(
                f"{name}: all m tensors must share one dtype; {name}[0] is {first.dtype.name}, "
                f"{name}[{i}] is {tensor.dtype.name}")
        if not tensor.shape.is_compatible_with(first.shape):
            raise ValueError(
                f"{name}: all m tensors must share one shape [B, C]; {name}[0] has shape "
                f"{first.shape}, {name}[{i}] has shape {tensor.shape}")
    return tf.stack(tensors, axis=0)


def consistency_terms(logits: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
    """Per-example pieces of the consistency regularizer.

    With p_i = softmax(logits[i]) and p_bar = mean_i p_i (per example):
    KL(p_bar || p_i) = sum_c p_bar * (log p_bar - log_softmax(logits[i])),
    with 0 log 0 = 0 as in `torch.nn.functional.kl_div`; the entropy is
    H(p_bar) = -sum_c p_bar * log(max(p_bar, 1e-20)), the authors' clamp.
    Gradients flow through p_bar as in the authors' code (no stop-gradient).

    Args:
        logits: list or tuple of m >= 1 tensors [B, C], the logits of m noisy
            copies of the same B inputs.

    Returns:
        Dict of [B] tensors: "kl" (mean_i KL(p_bar || p_i)), "entropy"
        (H(p_bar)) and, when m == 2, "mse" (sum_c (p_2 - p_1)^2).

    Raises:
        ValueError: if `logits` is empty, not a list/tuple, or its tensors
            differ in shape or dtype or are not [B, C] floating tensors.
    """
    stacked = _stack_logits(logits)  # [m, B, C]
    log_probs = tf.nn.log_softmax(stacked, axis=-1)
    probs = tf.nn.softmax(stacked, axis=-1)
    avg = tf.reduce_mean(probs, axis=0)  # [B, C]

    # xlogy gives 0 (and zero gradients) where p_bar underflows to 0.
    kl_each = tf.reduce_sum(tf.math.xlogy(avg, avg)[None] - avg[None] * log_probs, axis=-1)
    clamp = tf.constant(ENTROPY_CLAMP, dtype=avg.dtype)
    terms = {
        "kl": tf.reduce_mean(kl_each, axis=0),
        "entropy": -tf.reduce_sum(avg * tf.math.log(tf.maximum(avg, clamp)), axis=-1),
    }
    if len(logits) == 2:
        terms["mse"] = tf.reduce_sum(tf.square(probs[1] - probs[0]), axis=-1)
    return terms


def consistency_loss(
    logits: Sequence[tf.Tensor],
    lbd: float | tf.Tensor,
    eta: float | tf.Tensor = 0.5,
    loss: str = "default",
    reduction: str = "mean",
) -> tf.Tensor:
    """Consistency regularizer of Jeong & Shin (2020) over m noisy copies.

    With the per-example terms of `consistency_terms`:
      - "default": lbd * KL + eta * H(p_bar)  (the paper's results);
      - "xent":    lbd * (KL + H(p_bar))      (equals "default" when eta == lbd);
      - "kl":      lbd * KL;
      - "mse":     lbd * ||p_2 - p_1||^2      (m must be 2).
    `eta` is ignored except by "default".

    Args:
        logits: list or tuple of m tensors [B, C] (same B inputs, m noises).
        lbd: weight of the regularizer, >= 0.
        eta: weight of the entropy term in "default", >= 0.
        loss: one of "default", "xent", "kl", "mse".
        reduction: "mean" (scalar, mean over the B examples, as the authors)
            or "none" ([B]).

    Returns:
        The regularizer, a scalar or [B] tensor in the logits' dtype
        (float32 for half-precision logits).

    Raises:
        ValueError: naming the argument, for an unknown `loss` or `reduction`,
            m < 1, m != 2 with "mse", negative `lbd` or `eta`, or logits of
            mismatched shapes or dtypes.
    """
    if loss not in CONSISTENCY_LOSSES:
        raise ValueError(f"loss: must be one of {CONSISTENCY_LOSSES}, got {loss!r}")
    _check_reduction(reduction)
    _check_scalar_hparam(lbd, "lbd")
    _check_scalar_hparam(eta, "eta")
    if loss == "mse" and isinstance(logits, (list, tuple)) and len(logits) != 2:
        raise ValueError(f"logits: loss='mse' compares two predictions, so m must be 2; got m={len(logits)}")

    return combine_consistency_terms(consistency_terms(logits), lbd, eta, loss, reduction)


def combine_consistency_terms(
    terms: dict[str, tf.Tensor],
    lbd: float | tf.Tensor,
    eta: float | tf.Tensor = 0.5,
    loss: str = "default",
    reduction: str = "mean",
) -> tf.Tensor:
    """The consistency regularizer from the terms `consistency_terms` returned.

    For callers that also report the terms: they compute them once and
    combine them here. Arguments and result as in `consistency_loss`.
    """
    if loss not in CONSISTENCY_LOSSES:
        raise ValueError(f"loss: must be one of {CONSISTENCY_LOSSES}, got {loss!r}")
    if loss == "mse" and "mse" not in terms:
        raise ValueError("terms: loss='mse' compares two predictions, so m must be 2")
    _check_reduction(reduction)
    dtype = terms["kl"].dtype
    lbd = _cast_hparam(lbd, dtype)
    if loss == "default":
        per_example = lbd * terms["kl"] + _cast_hparam(eta, dtype) * terms["entropy"]
    elif loss == "xent":
        per_example = lbd * (terms["kl"] + terms["entropy"])
    elif loss == "kl":
        per_example = lbd * terms["kl"]
    else:
        per_example = lbd * terms["mse"]
    return _reduce(per_example, reduction)


def stability_loss(
    clean_logits: tf.Tensor,
    noisy_logits: tf.Tensor,
    reduction: str = "mean",
) -> tf.Tensor:
    """Stability-training regularizer (Li et al., 2019) as in the authors' code.

    Cross-entropy of the noisy predictions against the clean soft labels:
    -sum_c softmax(clean)_c * log_softmax(noisy)_c. As in the authors'
    `train_stab.py`, the clean side is NOT detached (gradients flow into both
    logits) and the weight lambda is applied by the caller.

    Args:
        clean_logits: [B, C] logits of the clean inputs.
        noisy_logits: [B, C] logits of the noisy inputs.
        reduction: "mean" (scalar) or "none" ([B]).

    Returns:
        The unweighted regularizer, scalar or [B].

    Raises:
        ValueError: for a bad `reduction`, non-floating logits, or shapes
            that are not the same [B, C].
    """
    _check_reduction(reduction)
    clean = _as_float_tensor(clean_logits, "clean_logits")
    noisy = _as_float_tensor(noisy_logits, "noisy_logits")
    _check_rank(clean, 2, "clean_logits", "[B, C]")
    _check_rank(noisy, 2, "noisy_logits", "[B, C]")
    if clean.dtype != noisy.dtype:
        raise ValueError(
            f"noisy_logits: dtype {noisy.dtype.name} differs from clean_logits' {clean.dtype.name}")
    if not clean.shape.is_compatible_with(noisy.shape):
        raise ValueError(
            f"noisy_logits: shape {noisy.shape} differs from clean_logits' shape {clean.shape}")
    per_example = -tf.reduce_sum(
        tf.nn.softmax(clean, axis=-1) * tf.nn.log_softmax(noisy, axis=-1), axis=-1)
    return _reduce(per_example, reduction)


def macer_loss(
    logits: tf.Tensor,
    labels: tf.Tensor,
    *,
    sigma: float,
    lbd: float,
    beta: float,
    gamma: float,
    reduction: str = "mean",
) -> dict[str, tf.Tensor]:
    """MACER objective (Zhai et al., 2020) as in the authors' `third_party/macer.py`.

    For logits [B, K, C] of K noisy copies per input:
      - classification: -log(mean_k softmax(logits)_y + 1e-10);
      - robustness: with q = mean_k softmax(beta * logits), top-1 q1 and
        top-2 q2, and margin = ndtri(q1) - ndtri(q2), the hinge
        sigma / 2 * (gamma - margin) on examples whose top-1 class is the
        label, whose margin is finite and <= gamma (others contribute 0:
        ndtri(1) = inf is dropped, not treated as a zero hinge);
      - total: classification + lbd * robustness.
    With reduction "mean" each is divided by B, the authors' normalization
    (their sums are divided by the batch size). Unlike the authors' code,
    which skips the robustness term and reports 0 when lbd == 0, it is
    always computed (the total is the same).

    Args:
        logits: [B, K, C] logits.
        labels: [B] integer labels.
        sigma: noise level, > 0.
        lbd: weight of the robustness term, >= 0.
        beta: inverse temperature of the robustness term's softmax, > 0.
        gamma: hinge margin, >= 0.
        reduction: "mean" (scalars) or "none" ([B] each).

    Returns:
        Dict with "classification", "robustness" and "total".

    Raises:
        ValueError: naming the argument, for bad shapes, dtypes,
            hyperparameters or `reduction`.
    """
    _check_reduction(reduction)
    _check_scalar_hparam(sigma, "sigma", positive=True)
    _check_scalar_hparam(lbd, "lbd")
    _check_scalar_hparam(beta, "beta", positive=True)
    _check_scalar_hparam(gamma, "gamma")
    logits = _as_float_tensor(logits, "logits")
    _check_rank(logits, 3, "logits", "[B, K, C]")
    labels = _batch_vector(labels, "labels", logits.shape[:1], integer=True)
    dtype = logits.dtype
    labels = tf.cast(labels, tf.int32)

    avg = tf.reduce_mean(tf.nn.softmax(logits, axis=-1), axis=1)  # [B, C]
    p_label = tf.gather(avg, labels, axis=1, batch_dims=1)
    classification = -tf.math.log(p_label + tf.constant(MACER_LOG_EPS, dtype))

    beta_avg = tf.reduce_mean(tf.nn.softmax(logits * _cast_hparam(beta, dtype), axis=-1), axis=1)
    top2 = tf.math.top_k(beta_avg, k=2)
    q1, q2 = top2.values[:, 0], top2.values[:, 1]
    gamma_t = _cast_hparam(gamma, dtype)
    margin = tf.math.ndtri(q1) - tf.math.ndtri(q2)
    in_hinge = (tf.equal(top2.indices[:, 0], labels) & tf.math.is_finite(margin)
                & (tf.abs(margin) <= gamma_t))
    # Evaluate ndtri again on safe values so excluded rows (q1 == 1 gives
    # inf) do not send NaN through tf.where's gradient.
    half = tf.constant(0.5, dtype)
    safe_margin = (tf.math.ndtri(tf.where(in_hinge, q1, half))
                   - tf.math.ndtri(tf.where(in_hinge, q2, half)))
    robustness = tf.where(in_hinge, gamma_t - safe_margin, tf.zeros_like(safe_margin))
    robustness = _cast_hparam(sigma, dtype) / 2 * robustness

    total = classification + _cast_hparam(lbd, dtype) * robustness
    return {
        "classification": _reduce(classification, reduction),
        "robustness": _reduce(robustness, reduction),
        "total": _reduce(total, reduction),
    }


def smoothmix_loss(
    start_logits: Sequence[tf.Tensor],
    mixed_logits: Sequence[tf.Tensor],
    labels: tf.Tensor,
    mix_weights: tf.Tensor,
    *,
    eta: float | tf.Tensor,
    reduction: str = "mean",
) -> dict[str, tf.Tensor]:
    """SmoothMix objective (Jeong et al., 2021) as in the authors' `code/train.py`.

    For m noisy copies of B start points (logits z_i = f(s + n_i)) and of
    their mixes with the attack's end points (logits w_i = f(x_mix + n_i),
    the same noises; see `attacks.smoothmix_pgd` and
    `attacks.smoothmix_inputs`), per example:
      - cross_entropy: mean_i CE(z_i, y);
      - p_bar = mean_i softmax(z_i); correct = [argmax p_bar == y] (ties go
        to the lowest class);
      - target t = (1 - lam) * p_bar + lam / C, lam = the example's mixing
        weight (the authors draw it uniformly in [0, 1/2));
      - mixup: correct * mean_i KL(t || softmax(w_i)), with 0 log 0 = 0;
      - total: cross_entropy + eta * mixup.
    The target is not detached: as in the authors' code (`F.kl_div`
    differentiates its target), the mixup term also sends gradient into the
    start logits through p_bar; `correct` gets none. With reduction "mean"
    each term is averaged over the B examples, which equals the authors'
    mean over the m * B copies (every example has m); examples outside the
    mask count in the mixup's denominator with 0, as theirs.

    Args:
        start_logits: list or tuple of m >= 1 tensors [B, C], the logits of
            the start points' noisy copies.
        mixed_logits: list or tuple of m tensors [B, C] of the mixed points'
            copies, with the same noises in the same order.
        labels: [B] integer labels.
        mix_weights: [B] mixing weights lam in [0, 1].
        eta: weight of the mixup term, >= 0 (the authors' eta times their
            warm-up factor min(1, (epoch + 1) / warmup)).
        reduction: "mean" (scalars) or "none" ([B] each).

    Returns:
        Dict with "cross_entropy", "mixup", "total" and "correct" (the
        fraction, or per-example 0/1, of examples in the mixup's mask), in
        the logits' dtype (float32 for half-precision logits).

    Raises:
        ValueError: naming the argument, for mismatched or non-[B, C] logits,
            m differing between the two lists, non-integer or mis-shaped
            labels, mis-shaped weights or weights known to leave [0, 1], a
            negative `eta`, or a bad `reduction`.
    """
    _check_reduction(reduction)
    _check_scalar_hparam(eta, "eta")
    start = _stack_logits(start_logits, "start_logits")  # [m, B, C]
    mixed = _stack_logits(mixed_logits, "mixed_logits")
    if len(start_logits) != len(mixed_logits):
        raise ValueError(f"mixed_logits: expected m={len(start_logits)} tensors like start_logits, "
                         f"got {len(mixed_logits)}")
    if mixed.dtype != start.dtype or not mixed.shape.is_compatible_with(start.shape):
        raise ValueError(f"mixed_logits: expected tensors {start.shape[1:]} of dtype {start.dtype.name} "
                         f"like start_logits, got {mixed.shape[1:]} of dtype {mixed.dtype.name}")
    labels = _batch_vector(labels, "labels", start.shape[1:2], integer=True)
    weights = _batch_vector(mix_weights, "mix_weights", start.shape[1:2], integer=False)
    dtype = start.dtype
    static = tf.get_static_value(weights)
    if static is not None and not np.all((static >= 0) & (static <= 1)):
        raise ValueError(f"mix_weights: must lie in [0, 1], got values in [{np.min(static)}, {np.max(static)}]")
    weights = tf.cast(weights, dtype)[:, None]
    labels = tf.cast(labels, tf.int32)

    cross_entropy = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.broadcast_to(labels[None], tf.shape(start)[:2]), logits=start), axis=0)
    avg = tf.reduce_mean(tf.nn.softmax(start, axis=-1), axis=0)  # [B, C]
    correct = tf.cast(tf.equal(tf.argmax(avg, axis=-1, output_type=tf.int32), labels), dtype)
    num_classes = tf.cast(tf.shape(avg)[-1], dtype)
    target = (1 - weights) * avg + weights / num_classes
    # xlogy gives 0 (and zero gradients) where the target underflows to 0.
    kl_each = tf.reduce_sum(tf.math.xlogy(target, target)[None] - target[None] * tf.nn.log_softmax(mixed, axis=-1),
                            axis=-1)  # [m, B]
    mixup = correct * tf.reduce_mean(kl_each, axis=0)
    total = cross_entropy + _cast_hparam(eta, dtype) * mixup
    return {
        "cross_entropy": _reduce(cross_entropy, reduction),
        "mixup": _reduce(mixup, reduction),
        "total": _reduce(total, reduction),
        "correct": _reduce(correct, reduction),
    }
