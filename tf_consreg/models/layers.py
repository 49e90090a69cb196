"""Layers and layer helpers shared by the architectures.

The helpers build layers the way the authors' PyTorch networks are built, so
that their hyperparameters (learning rate, weight decay, schedule) transfer:

* convolutions have no bias and PyTorch's symmetric zero padding of k // 2
  (Keras' "same" pads a stride-2 convolution asymmetrically, which would shift
  the main path of a residual block by one pixel against its 1x1 shortcut);
* convolution kernels start He-normal with fan-out, N(0, 2 / (k * k * out)),
  as in the authors' CIFAR ResNet and DenseNet and torchvision's ResNet;
* batch normalization uses PyTorch's defaults: gamma = 1, beta = 0, running
  averages updated with momentum 0.1 (Keras momentum 0.9), epsilon 1e-5;
* the classifier kernel starts as PyTorch's nn.Linear, U(+-1/sqrt(fan_in)),
  with a zero bias, and computes in float32 even under a mixed-precision
  policy, so logits (and the losses on them) are float32.
"""

from typing import Sequence

import keras
import numpy as np

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def normalization(mean: Sequence[float], std: Sequence[float], *, name: str) -> keras.layers.Normalization:
    """The first layer of every model: (x - mean) / std per channel, as a built-in Keras layer.

    Noise is added in pixel space before it, where the certified L2 radius is
    measured. Built-in, so that `base_model.keras` loads with Keras alone.

    `keras.layers.Normalization` divides by max(sqrt(variance), 1e-7), not by
    a std. The variance given is s * s with s the float32 rounding of std,
    squared in float64 (exactly: 48 significant bits). Keras rounds it to
    float32, and in binary floating point with round-to-nearest
    sqrt(fl(s * s)) = s (Boldo, "Stupid is as stupid does: Taking the square
    root of the square of a floating-point number", 2015), so in float32 the
    layer divides by the float32 std: the same two operations on the same
    constants as the `(x - mean) / std` of the layer it replaces
    (`legacy.Normalization`), bit for bit. (With variance = std * std instead,
    Fashion-MNIST's 0.353 and ImageNet's 0.229 would become divisors one
    float32 ulp away.) In bfloat16 (under mixed_bfloat16, where the layer
    computes as its predecessor did) the square root is rounded to bfloat16,
    which gives the bfloat16 std for the MNIST, Fashion-MNIST and CIFAR-10
    constants but one bfloat16 ulp more for two of ImageNet's (0.229 and
    0.224: divisors 0.2295 and 0.2246 instead of 0.2285 and 0.2236, 0.4%
    apart), a change within bfloat16's own rounding of the normalized image.

    Args:
      mean: per-channel means.
      std: per-channel standard deviations (> 0).
      name: layer name.

    Raises:
      ValueError: mean and std differ in length, or a std is not positive.
    """
    if len(mean) != len(std):
        raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}")
    variance = [float(np.float32(s)) ** 2 for s in std]
    return keras.layers.Normalization(mean=[float(m) for m in mean], variance=variance, name=name)


def conv_initializer() -> keras.initializers.Initializer:
    """He-normal with fan-out (not truncated): N(0, 2 / (k * k * filters))."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def dense_initializer() -> keras.initializers.Initializer:
    """PyTorch's nn.Linear default, U(+-1/sqrt(fan_in)) (Kaiming-uniform, a = sqrt(5))."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def conv2d(x, filters: int, kernel_size: int, strides: int = 1, *, name: str):
    """A bias-free convolution with PyTorch's padding (kernel_size // 2 on every side).

    Args:
      x: NHWC input tensor.
      filters: output channels.
      kernel_size: odd square kernel size.
      strides: stride in both directions.
      name: layer name (the padding layer, if any, gets `name + "_pad"`).
    """
    pad = kernel_size // 2
    padding = "same"  # Symmetric for stride 1 and an odd kernel, as in PyTorch.
    if strides > 1 and pad:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    return keras.layers.Conv2D(filters, kernel_size, strides, padding=padding, use_bias=False,
                               kernel_initializer=conv_initializer(), name=name)(x)


def batch_norm(x, *, name: str):
    """Batch normalization with PyTorch's defaults (gamma 1, beta 0, momentum 0.1, eps 1e-5)."""
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)(x)


def relu(x, *, name: str):
    return keras.layers.ReLU(name=name)(x)


def logits(x, num_classes: int, *, name: str = "logits"):
    """The classifier: a float32 Dense layer (float32 logits under mixed precision)."""
    return keras.layers.Dense(num_classes, kernel_initializer=dense_initializer(), bias_initializer="zeros",
                              dtype="float32", name=name)(x)
