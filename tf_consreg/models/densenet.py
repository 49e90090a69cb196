"""DenseNet-40 for CIFAR, as in the authors' `archs/densenet.py` (growth rate 12).

Layout (Huang et al., 2017, with the authors' choices):

* stem: 3x3 conv with 2k = 24 channels;
* three dense blocks of 6 bottleneck layers each; a layer is BN-ReLU-conv1x1
  (4k = 48 channels) then BN-ReLU-conv3x3 (k = 12 channels), and its output is
  concatenated to its input, so a block adds 72 channels (24 -> 96 -> 168 -> 240);
* between blocks a transition; the authors use compression 1.0, under which
  a transition has no 1x1 convolution and is a 2x2 average pooling only
  (32x32 -> 16x16 -> 8x8);
* BN, ReLU, global average pooling over the 8x8 map (their AvgPool2d(8)),
  linear classifier.

So it is DenseNet-B (bottleneck layers, no compression), not DenseNet-BC.
3 blocks x 6 layers x 2 convolutions + stem + classifier + 2 transitions is the
"40" in its name. 211,978 trainable parameters for 10 classes.

Initialization as theirs: convolutions N(0, 2 / (k * k * out)), BN gamma 1 and
beta 0, classifier bias 0 (see `layers.py`). The classifier outputs float32
logits under mixed precision.
"""

from typing import Sequence, Tuple

import keras

from tf_consreg.models import layers


def _dense_layer(x, growth_rate: int, name: str):
    y = layers.batch_norm(x, name=f"{name}_bn1")
    y = layers.relu(y, name=f"{name}_relu1")
    y = layers.conv2d(y, 4 * growth_rate, 1, name=f"{name}_conv1")
    y = layers.batch_norm(y, name=f"{name}_bn2")
    y = layers.relu(y, name=f"{name}_relu2")
    y = layers.conv2d(y, growth_rate, 3, name=f"{name}_conv2")
    return keras.layers.Concatenate(name=f"{name}_concat")([x, y])


def _transition(x, out_channels: int, name: str):
    if x.shape[-1] != out_channels:  # Compression < 1 only.
        x = layers.batch_norm(x, name=f"{name}_bn")
        x = layers.relu(x, name=f"{name}_relu")
        x = layers.conv2d(x, out_channels, 1, name=f"{name}_conv")
    return keras.layers.AveragePooling2D(2, name=f"{name}_pool")(x)


def cifar_densenet(block_config: Sequence[int] = (6, 6, 6), growth_rate: int = 12, compression: float = 1.0,
                   num_classes: int = 10, input_shape: Tuple[int, int, int] = (32, 32, 3),
                   name: str = "cifar_densenet") -> keras.Model:
    """A CIFAR DenseNet with bottleneck layers.

    Args:
      block_config: bottleneck layers per dense block.
      growth_rate: k, channels each layer adds.
      compression: theta in (0, 1]; a transition keeps int(theta * channels).
      num_classes: number of logits.
      input_shape: (height, width, channels) of the (normalized) input.
      name: model name.

    Returns:
      A functional `keras.Model` mapping normalized images to logits.

    Raises:
      ValueError: compression outside (0, 1].
    """
    if not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression}")
    inputs = keras.Input(input_shape, name="normalized_images")
    x = layers.conv2d(inputs, 2 * growth_rate, 3, name="stem_conv")
    for i, num_layers in enumerate(block_config):
        for j in range(num_layers):
            x = _dense_layer(x, growth_rate, name=f"block{i + 1}_layer{j + 1}")
        if i != len(block_config) - 1:
            x = _transition(x, int(x.shape[-1] * compression), name=f"transition{i + 1}")
    x = layers.batch_norm(x, name="final_bn")
    x = layers.relu(x, name="final_relu")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.logits(x, num_classes)
    return keras.Model(inputs, outputs, name=name)


def cifar_densenet40(num_classes: int = 10, input_shape: Tuple[int, int, int] = (32, 32, 3)) -> keras.Model:
    """The authors' DenseNet-40: blocks (6, 6, 6), growth rate 12, compression 1."""
    return cifar_densenet((6, 6, 6), 12, 1.0, num_classes, input_shape, name="cifar_densenet40")
