"""The CIFAR ResNets of He et al. (2016, Sec. 4.2): ResNet-20 and ResNet-110.

Layout of the authors' `archs/cifar_resnet.py`, which is pytorch-classification's
`models/cifar/resnet.py` (Wei Yang) with BasicBlocks:

* stem: 3x3 conv, 16 channels, BN, ReLU (32x32);
* three stages of n = (depth - 2) / 6 basic blocks with 16, 32 and 64
  channels, the first block of stages 2 and 3 striding by 2 (16x16, 8x8);
  a basic block is conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU;
* global average pooling over the 8x8 map (their AvgPool2d(8)), then a
  linear classifier.

Shortcuts are projections, He et al.'s option B, not the parameter-free
option A (zero-padded identity) of the original CIFAR experiments: where a
block changes the shape (the first block of stages 2 and 3), the shortcut is
a strided 1x1 convolution followed by BN, because that is what the authors'
`_make_layer` builds (`downsample = Sequential(Conv2d(1x1, stride), BatchNorm2d)`
whenever stride != 1 or the channel count changes). Every other shortcut is
the identity. This is the network their published CIFAR-10 checkpoints and
certification logs come from, so reproducing their numbers needs it; the two
projections add 2,752 parameters (ResNet-20: 272,474 trainable parameters,
ResNet-110: 1,730,714, pytorch-classification's "0.27M" and "1.7M").

Initialization as theirs: convolutions N(0, 2 / (9 * out)), BN gamma 1, beta 0
(see `layers.py`). The classifier outputs float32 logits under mixed precision.
"""

from typing import Tuple

import keras

from tf_consreg.models import layers

STAGE_WIDTHS = (16, 32, 64)


def _basic_block(x, filters: int, strides: int, name: str):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = layers.conv2d(x, filters, 1, strides, name=f"{name}_proj_conv")
        shortcut = layers.batch_norm(shortcut, name=f"{name}_proj_bn")
    y = layers.conv2d(x, filters, 3, strides, name=f"{name}_conv1")
    y = layers.batch_norm(y, name=f"{name}_bn1")
    y = layers.relu(y, name=f"{name}_relu1")
    y = layers.conv2d(y, filters, 3, name=f"{name}_conv2")
    y = layers.batch_norm(y, name=f"{name}_bn2")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.relu(y, name=f"{name}_out")


def cifar_resnet(depth: int, num_classes: int = 10, input_shape: Tuple[int, int, int] = (32, 32, 3),
                 name: str = None) -> keras.Model:
    """A CIFAR ResNet of `depth` = 6n + 2 layers with basic blocks.

    Args:
      depth: 20, 32, 44, 56, 110, ... (6n + 2).
      num_classes: number of logits.
      input_shape: (height, width, channels) of the (normalized) input.
      name: model name (default "cifar_resnet{depth}").

    Returns:
      A functional `keras.Model` mapping normalized images to logits.

    Raises:
      ValueError: depth is not 6n + 2.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
    blocks = (depth - 2) // 6
    inputs = keras.Input(input_shape, name="normalized_images")
    x = layers.conv2d(inputs, STAGE_WIDTHS[0], 3, name="stem_conv")
    x = layers.batch_norm(x, name="stem_bn")
    x = layers.relu(x, name="stem_relu")
    for stage, width in enumerate(STAGE_WIDTHS):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, width, strides, name=f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.logits(x, num_classes)
    return keras.Model(inputs, outputs, name=name or f"cifar_resnet{depth}")


def cifar_resnet20(num_classes: int = 10, input_shape: Tuple[int, int, int] = (32, 32, 3)) -> keras.Model:
    """ResNet-20 (3 basic blocks per stage), about 0.27M parameters."""
    return cifar_resnet(20, num_classes, input_shape)


def cifar_resnet110(num_classes: int = 10, input_shape: Tuple[int, int, int] = (32, 32, 3)) -> keras.Model:
    """ResNet-110 (18 basic blocks per stage), about 1.7M parameters."""
    return cifar_resnet(110, num_classes, input_shape)
