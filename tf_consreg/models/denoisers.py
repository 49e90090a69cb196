"""Denoisers for denoised smoothing: DnCNN as Salman et al. (2020) use it, and a small one for 28x28 images.

A denoiser maps images in [0, 1] to images of the same shape (no
normalization: the classifier behind it normalizes). It is DnCNN's residual
form (Zhang et al., 2017; Salman et al.'s `code/archs/dncnn.py`):
D(x) = x - r(x), r a stack of 3x3 convolutions, the first with a bias and a
ReLU, the middle ones without bias, with batch normalization and a ReLU, the
last without bias or activation. Kernels start orthogonal and the last one at
zero, so a fresh denoiser is the identity and f∘D starts as f.
"""

import keras

# Salman et al.'s BatchNorm2d(eps=0.0001, momentum=0.95): PyTorch's momentum
# weighs the batch, Keras's the running average.
_BN_EPSILON = 1e-4
_BN_MOMENTUM = 0.05


def dncnn(input_shape, depth: int = 17, channels: int = 64, name: str = "dncnn") -> keras.Model:
    """DnCNN: `depth` 3x3 convolutions of `channels` channels, residual (x - r(x)).

    Args:
      input_shape: (H, W, C) of the images; H and W may be None (it is fully convolutional).
      depth: convolutions in all, >= 2.
      channels: channels of every convolution but the last.
      name: the model's name.
    """
    inputs = keras.Input(input_shape, name="images")
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu",
                            kernel_initializer=keras.initializers.Orthogonal())(inputs)
    for _ in range(depth - 2):
        x = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False,
                                kernel_initializer=keras.initializers.Orthogonal())(x)
        x = keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM)(x)
        x = keras.layers.ReLU()(x)
    residual = keras.layers.Conv2D(input_shape[-1], 3, padding="same", use_bias=False, kernel_initializer="zeros",
                                   dtype="float32")(x)  # The image stays float32 under mixed precision.
    outputs = keras.layers.Subtract(dtype="float32")([inputs, residual])
    return keras.Model(inputs, outputs, name=name)


def dncnn_small(input_shape, name: str = "dncnn_small") -> keras.Model:
    """DnCNN of 5 convolutions of 16 channels, for 28x28 images.

    About 5.7M multiply-adds per 28x28 image (3 x 3 x 16 x 16 x 784 per middle
    layer), 2.5 times LeNet's 2.3M: cheap enough to train on a CPU.
    """
    return dncnn(input_shape, depth=5, channels=16, name=name)


# name -> (builder(input_shape), datasets it is sized for)
DENOISERS = {
    "dncnn": (dncnn, ("cifar10", "imagenet2012")),
    "dncnn_small": (dncnn_small, ("mnist", "fashion_mnist")),
}
