"""A classifier whose float32 and bfloat16 networks are both known exactly: a threshold on one pixel.

`threshold_model(shape, pixel, t)` classifies x as 1 iff x[pixel] > t (else
0). It has a hidden layer and a classifier, like the project's networks:

    h = Dense(1, no bias, kernel e_pixel)(Flatten(x))   = x[pixel]
    logits = Dense(2, kernel [[0, 1]], bias [0, -t])(h)  = [0, h - t]

(with `num_classes` > 2, classes 2, 3, ... get the logit -1e4, below the
others for every image in [0, 1], so they are never chosen).

In float32 every step is exact but the last subtraction, whose rounding keeps
its sign, so f32(x) = [x[pixel] > t] (argmax takes class 0 on the tie h = t).

Computing in bfloat16 (`models.with_compute_policy(model, "mixed_bfloat16")`:
every layer but the classifier computes in bfloat16, the classifier in
float32) the input is rounded to bfloat16 by the first layer (q below:
round to nearest, ties to even), the kernel e_pixel is exact in bfloat16,
the matmul sums one nonzero product q(x[pixel]) * 1 and zeros (exact, also
after rounding its output to bfloat16), and the float32 classifier computes
h - t with a sign-keeping rounding again. So

    f_bf16(x) = [q(x[pixel]) > t],

for every float32 input: the bfloat16 network is again a threshold
classifier on x[pixel], at the point where q crosses t. For t exactly
representable in bfloat16 and in [2^e, 2^(e+1)), q(y) > t iff y lies above
the midpoint between t and the next bfloat16 number t + 2^(e-7) (the
midpoint itself rounds to t, whose last significand bit is even for the t
used here), so f_bf16(x) = [x[pixel] > t + 2^(e-8)]: `bfloat16_threshold`.
"""

import math

import keras
import numpy as np

from tf_consreg import models


def threshold_model(shape, pixel: int, threshold: float, num_classes: int = 2) -> keras.Model:
    """The float32 model f(x) = [x.flat[pixel] > threshold] on images of `shape` (see the module docstring)."""
    inputs = keras.Input(shape)
    hidden = keras.layers.Dense(1, use_bias=False, name="pixel")
    head = keras.layers.Dense(num_classes, name="logits")
    model = keras.Model(inputs, head(hidden(keras.layers.Flatten()(inputs))))
    select = np.zeros((int(np.prod(shape)), 1), np.float32)
    select[pixel] = 1.0
    hidden.set_weights([select])
    kernel = np.zeros((1, num_classes), np.float32)
    kernel[0, 1] = 1.0
    bias = np.full(num_classes, -1e4, np.float32)
    bias[:2] = (0.0, -threshold)
    head.set_weights([kernel, bias])
    return model


def in_dtype(model: keras.Model, compute_dtype: str) -> keras.Model:
    """`model` computing in `compute_dtype`, as a model trained under that policy does."""
    return models.with_compute_policy(model, "float32" if compute_dtype == "float32" else "mixed_bfloat16")


def bfloat16_threshold(threshold: float) -> float:
    """The threshold of the bfloat16 network of `threshold_model(..., threshold)`, for a positive power of two.

    A power of two 2^e has an all-zero (even) significand; the next bfloat16
    number is 2^e + 2^(e-7), with 8 significand bits, and the midpoint
    2^e + 2^(e-8) rounds down to 2^e.
    """
    exponent = math.log2(threshold)
    assert exponent == int(exponent), "a power of two, so that the tie at the midpoint rounds down"
    return threshold + 2.0 ** (exponent - 8)


def round_to_bfloat16(values) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32: q above, without TensorFlow.

    bfloat16 is float32's upper 16 bits: add half of the dropped part's
    range (0x7FFF, plus 1 when the kept part is odd, for ties to even) and
    clear the lower 16 bits. Finite inputs only.
    """
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)
