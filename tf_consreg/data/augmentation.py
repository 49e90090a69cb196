"""Image views, uint8 in, uint8 out: the training augmentations and the test-time view.

They follow the authors' torchvision transforms (`code/datasets.py`):

* cifar10, train: RandomCrop(32, padding=4) and RandomHorizontalFlip
  (`random_crop_flip`, on whole batches); test: none.
* imagenet2012, train: RandomResizedCrop(224), scale (0.08, 1), ratio
  (3/4, 4/3), and RandomHorizontalFlip (`random_resized_crop`, from the
  encoded JPEG); test: Resize(256) of the shorter side, then CenterCrop(224)
  (`resize_center_crop`). Resizing is bilinear with antialiasing, as PIL's,
  and rounds back to uint8, as torchvision's PIL path does.
* mnist, fashion_mnist: none.

Random choices are stateless ops of an explicit seed, so that a pipeline
(`pipelines`) decides which seed each batch or image gets.
"""

import math
from typing import Callable, Optional, Tuple

import tensorflow as tf

from tf_consreg.errors import ConfigError

IMAGENET_CROP = 224
IMAGENET_RESIZE = 256
_CIFAR_PADDING = 4


def decode_image(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """Decodes a JPEG or PNG to uint8 [H, W, channels]."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def random_crop_flip(images: tf.Tensor, seed: tf.Tensor, padding: int = _CIFAR_PADDING) -> tf.Tensor:
    """torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, per image of a batch.

    Each image is zero-padded by `padding` pixels on every side, cropped back
    to its size at a uniformly drawn offset in [0, 2 * padding] (both axes),
    and mirrored with probability 1/2. Done with two gathers for the whole
    batch rather than one crop per image.

    Args:
      images: [B, H, W, C].
      seed: int32/int64 [2], stateless seed of this batch.
      padding: zero padding on every side.

    Returns:
      [B, H, W, C], same dtype.
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    offsets = tf.random.stateless_uniform([batch, 2], seeds[0], 0, 2 * padding + 1, dtype=tf.int32)
    flip = tf.random.stateless_uniform([batch], seeds[1]) < 0.5
    rows = offsets[:, :1] + tf.range(height)[None]
    cols = offsets[:, 1:] + tf.range(width)[None]
    cols = tf.where(flip[:, None], tf.reverse(cols, [1]), cols)  # A mirror reads the columns backwards.
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def random_resized_crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                               scale: Tuple[float, float] = (0.08, 1.0),
                               ratio: Tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> tf.Tensor:
    """The crop window of torchvision's RandomResizedCrop (`get_params`).

    Up to `attempts` draws of an area fraction uniform in `scale` and an
    aspect ratio (width / height) log-uniform in `ratio`; the first whose
    rounded size fits the image is placed at a uniform position. If none
    fits, the whole image, cut to the nearest ratio bound and centered.

    Args:
      height, width: image size (scalars).
      seed: int [2], stateless seed.
      scale: range of the crop's area as a fraction of the image's.
      ratio: range of the crop's aspect ratio.
      attempts: draws before the fallback.

    Returns:
      int32 [4]: top, left, crop height, crop width.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    target_area = h * w * tf.random.stateless_uniform([attempts], seeds[0], scale[0], scale[1])
    aspect = tf.exp(tf.random.stateless_uniform([attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1])))
    crop_w = tf.round(tf.sqrt(target_area * aspect))
    crop_h = tf.round(tf.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
    first = tf.argmax(tf.cast(fits, tf.int32))  # The first attempt that fits.
    position = tf.random.stateless_uniform([2], seeds[2])
    random_h, random_w = crop_h[first], crop_w[first]
    random_top = tf.floor(position[0] * (h - random_h + 1))
    random_left = tf.floor(position[1] * (w - random_w + 1))
    # The fallback: the largest centered crop within the ratio bounds.
    image_ratio = w / h
    fallback_w = tf.where(image_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fallback_h = tf.where(image_ratio < ratio[0], tf.round(w / ratio[0]), h)
    fallback_top = tf.floor((h - fallback_h) / 2)
    fallback_left = tf.floor((w - fallback_w) / 2)
    found = tf.reduce_any(fits)
    window = tf.where(found, tf.stack([random_top, random_left, random_h, random_w]),
                      tf.stack([fallback_top, fallback_left, fallback_h, fallback_w]))
    return tf.cast(window, tf.int32)


def _resize_uint8(image: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    # Bilinear with antialiasing, as PIL's resize under torchvision; rounded
    # back to uint8, as torchvision's PIL images are.
    resized = tf.image.resize(image, size, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def random_resized_crop(encoded: tf.Tensor, seed: tf.Tensor, size: int = IMAGENET_CROP) -> tf.Tensor:
    """The ImageNet training view: RandomResizedCrop(size) + RandomHorizontalFlip.

    JPEGs are cropped while decoding (`decode_and_crop_jpeg`), which skips
    the work outside the window; other formats are decoded whole.

    Args:
      encoded: a JPEG or PNG, scalar string.
      seed: int [2], stateless seed.
      size: output height and width.

    Returns:
      uint8 [size, size, 3].
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)

    def crop_jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        window = random_resized_crop_window(shape[0], shape[1], seeds[0])
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def crop_other():
        image = decode_image(encoded, 3)
        shape = tf.shape(image)
        top, left, height, width = tf.unstack(random_resized_crop_window(shape[0], shape[1], seeds[0]))
        return image[top:top + height, left:left + width]

    crop = tf.cond(tf.io.is_jpeg(encoded), crop_jpeg, crop_other)
    crop.set_shape([None, None, 3])
    image = _resize_uint8(crop, [size, size])
    return tf.image.stateless_random_flip_left_right(image, seeds[1])


def resize_center_crop(image: tf.Tensor, resize: int = IMAGENET_RESIZE, crop: int = IMAGENET_CROP) -> tf.Tensor:
    """The ImageNet test view: torchvision's Resize(resize) then CenterCrop(crop).

    The shorter side becomes `resize` and the longer int(resize * long / short);
    the crop's offset is round((side - crop) / 2), halves to even as Python's.

    Args:
      image: uint8 [H, W, C].
      resize: target of the shorter side (>= crop).
      crop: output height and width.

    Returns:
      uint8 [crop, crop, C].
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    new_long = (resize * long) // short  # int() of the ratio, in exact integer arithmetic.
    size = tf.where(height <= width, tf.stack([resize, new_long]), tf.stack([new_long, resize]))
    resized = _resize_uint8(image, size)
    top = tf.cast(tf.round(tf.cast(size[0] - crop, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(size[1] - crop, tf.float32) / 2), tf.int32)
    out = resized[top:top + crop, left:left + crop]
    out.set_shape([crop, crop, image.shape[-1]])
    return out


# Training augmentation of the in-memory datasets, applied to uint8 batches.
_BATCH_AUGMENTATIONS = {"cifar10": random_crop_flip, "mnist": None, "fashion_mnist": None}


def batch_augmentation(name: str) -> Optional[Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]:
    """The training augmentation of an in-memory dataset: (uint8 batch, seed) -> uint8 batch, or None.

    Raises:
      ConfigError: `name` is no dataset held in memory.
    """
    if name not in _BATCH_AUGMENTATIONS:
        raise ConfigError(f"augment={name!r}: no in-memory training augmentation; choose one of "
                          f"{', '.join(_BATCH_AUGMENTATIONS)}")
    return _BATCH_AUGMENTATIONS[name]
