"""ResNet-50 for ImageNet with torchvision's layout (ResNet v1.5).

The authors train `torchvision.models.resnet50()`. Keras' own
`keras.applications.ResNet50` differs from it in two ways that matter here:

* it is ResNet v1: a bottleneck block strides with its first 1x1
  convolution, while torchvision (v1.5) strides with the 3x3 convolution,
  which sees every input pixel and gains about 0.5% top-1 accuracy;
* its convolutions carry biases (25,583,592 trainable parameters against
  torchvision's 25,557,032) and its BN epsilon is 1.001e-5.

So this module builds v1.5 itself. Layout:

* stem: 7x7 conv, stride 2, 64 channels, BN, ReLU, 3x3 max pool stride 2;
* four stages of (3, 4, 6, 3) bottleneck blocks of widths 64, 128, 256, 512:
  conv1x1(width)-BN-ReLU-conv3x3(width, stride)-BN-ReLU-conv1x1(4 width)-BN,
  plus the shortcut, then ReLU; the first block of each stage has a
  projection shortcut (strided 1x1 conv + BN), and the first block of stages
  2 to 4 strides by 2 in its 3x3 convolution;
* global average pooling, linear classifier (2048 -> 1000).

25,557,032 trainable parameters, as torchvision's. Padding is PyTorch's
(symmetric k // 2; the max pool pads with zeros, which equals PyTorch's
-inf padding because it follows a ReLU). Initialization as torchvision's:
convolutions Kaiming-normal with fan-out, BN gamma 1 and beta 0 (no
zero-initialized residual gamma, torchvision's default), classifier
U(+-1/sqrt(2048)) with a zero bias where torchvision's bias is uniform too.
The classifier outputs float32 logits under mixed precision.
"""

from typing import Tuple

import keras

from tf_consreg.models import layers

STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (width, blocks)
EXPANSION = 4


def _bottleneck(x, width: int, strides: int, name: str):
    shortcut = x
    if strides != 1 or x.shape[-1] != width * EXPANSION:
        shortcut = layers.conv2d(x, width * EXPANSION, 1, strides, name=f"{name}_proj_conv")
        shortcut = layers.batch_norm(shortcut, name=f"{name}_proj_bn")
    y = layers.conv2d(x, width, 1, name=f"{name}_conv1")
    y = layers.batch_norm(y, name=f"{name}_bn1")
    y = layers.relu(y, name=f"{name}_relu1")
    y = layers.conv2d(y, width, 3, strides, name=f"{name}_conv2")  # v1.5: the stride is here.
    y = layers.batch_norm(y, name=f"{name}_bn2")
    y = layers.relu(y, name=f"{name}_relu2")
    y = layers.conv2d(y, width * EXPANSION, 1, name=f"{name}_conv3")
    y = layers.batch_norm(y, name=f"{name}_bn3")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.relu(y, name=f"{name}_out")


def resnet50(num_classes: int = 1000, input_shape: Tuple[int, int, int] = (224, 224, 3)) -> keras.Model:
    """ResNet-50 v1.5 (torchvision's `resnet50`).

    Args:
      num_classes: number of logits.
      input_shape: (height, width, channels) of the (normalized) input.

    Returns:
      A functional `keras.Model` mapping normalized images to logits.
    """
    inputs = keras.Input(input_shape, name="normalized_images")
    x = layers.conv2d(inputs, 64, 7, 2, name="stem_conv")
    x = layers.batch_norm(x, name="stem_bn")
    x = layers.relu(x, name="stem_relu")
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, 2, name="stem_pool")(x)
    for stage, (width, blocks) in enumerate(STAGES):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _bottleneck(x, width, strides, name=f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.logits(x, num_classes)
    return keras.Model(inputs, outputs, name="resnet50")
