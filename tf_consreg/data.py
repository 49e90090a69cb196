"""Datasets as images in [0, 1], and the input pipelines of training and evaluation.

Images stay in pixel space: the model normalizes in its first layer, so the
Gaussian noise of randomized smoothing is added where the certificate's L2
radius is measured (Cohen et al., 2019; the authors' `NormalizeLayer`).

Sources:

* fashion_mnist, the offline default, is read from IDX files: `--data_dir`
  when given, else Debian's `dataset-fashion-mnist` package, else
  tensorflow-datasets.
* mnist and cifar10 come from tensorflow-datasets and are held in memory as
  uint8 arrays (50,000 CIFAR-10 images are 150 MB).
* imagenet2012 comes from tensorflow-datasets and is streamed from its
  TFRecord shards, never held in memory. tfds builds those once, offline,
  from the two archives of the ILSVRC 2012 challenge, which the user
  downloads into `<data_dir>/downloads/manual`.

Preprocessing follows the authors' torchvision transforms (`code/datasets.py`):

* cifar10, train: RandomCrop(32, padding=4) and RandomHorizontalFlip; test: none.
* imagenet2012, train: RandomResizedCrop(224), scale (0.08, 1), ratio
  (3/4, 4/3), and RandomHorizontalFlip; test: Resize(256) of the shorter
  side, then CenterCrop(224). Resizing is bilinear with antialiasing, as
  PIL's, and rounds back to uint8, as torchvision's PIL path does.
* mnist, fashion_mnist: none.

Random choices are stateless ops seeded from `tf.data.Dataset.random(seed,
rerandomize_each_iteration=True)`: a seeded pipeline is reproducible and
still draws new crops in every epoch. A training run's pipeline is built for
its epochs instead (`epochs=range(first, end)`): then each epoch's order and
augmentation are drawn from (seed, epoch) alone, so a run resumed at epoch e
trains on what the uninterrupted run trained on, and each worker of a
cluster, building epoch e on its own, on what one process would.

`open_source` opens a split (checks it; loads it if it is held in memory)
before any work, and `Source.make_input` builds its training or evaluation
pipeline: augmentation, batching and, under a `tf.distribute` strategy,
per-replica batching with `distribute_datasets_from_function`. `make_input`
does both in one call. `holdout_split` holds the end of a training split out
for validation.
With `mock=True` every source is replaced by random data of the right shapes
(a fixed seed), for smoke runs on machines without the dataset.
"""

import dataclasses
import functools
import gzip
import math
import os
import struct
from typing import Any, Callable, Optional, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from tf_consreg import noise as noise_lib
from tf_consreg.errors import ConfigError

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test")

# Datasets read from tfds shards as a stream rather than held in memory.
STREAMED = ("imagenet2012",)
IMAGENET_ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "test": "ILSVRC2012_img_val.tar"}
IMAGENET_URL = "https://image-net.org/download-images"
# At most this many images of a streamed dataset are loaded into memory by
# `load_uint8` (224 x 224 x 3 bytes each: 1.5 GB).
MAX_IN_MEMORY_STREAMED = 10_000
# Examples per split when `mock=True` and no limit is given.
MOCK_EXAMPLES = {"train": 1024, "test": 256}

# tfds split names where they differ from ours.
_TFDS_SPLITS = {"imagenet2012": {"test": "validation"}}
_MOCK_SEEDS = {"train": 1001, "test": 1002}
# Shuffle buffer of the streamed training set, in encoded JPEGs (about 110 kB each).
_STREAM_SHUFFLE_BUFFER = 10_000
_CIFAR_PADDING = 4
_IMAGENET_CROP = 224
_IMAGENET_RESIZE = 256


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a certificate need to know about a dataset.

    Attributes:
      name: dataset name, as given to --dataset.
      num_classes: number of classes.
      input_shape: (height, width, channels) of an image, as the model sees it.
      class_names: human-readable class names, index = label.
      mean: per-channel mean used by the model's normalization layer.
      std: per-channel standard deviation used by the normalization layer.
    """

    name: str
    num_classes: int
    input_shape: Tuple[int, int, int]
    class_names: Tuple[str, ...]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_INFOS = {
    # Fashion-MNIST statistics of the training images; MNIST uses the identity,
    # as in the authors' code, so their flagfiles reproduce their runs.
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), _FASHION_CLASSES, (0.2860,), (0.3530,)),
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), tuple(str(i) for i in range(10)), (0.0,), (1.0,)),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), _CIFAR10_CLASSES, (0.4914, 0.4822, 0.4465),
                           (0.2023, 0.1994, 0.2010)),
}

DATASETS = (*_INFOS, "imagenet2012")


@functools.lru_cache(maxsize=None)
def _imagenet_info() -> DatasetInfo:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    # The WordNet ids (n01440764, ...) in label order; tfds ships them with its
    # builder, so they are known without the data.
    names = tuple(tfds.builder("imagenet2012").info.features["label"].names)
    return DatasetInfo("imagenet2012", 1000, (_IMAGENET_CROP, _IMAGENET_CROP, 3), names, (0.485, 0.456, 0.406),
                       (0.229, 0.224, 0.225))


def get_dataset_info(name: str) -> DatasetInfo:
    """Returns the `DatasetInfo` of a dataset.

    Raises:
      ConfigError: the dataset is unknown.
    """
    if name == "imagenet2012":
        return _imagenet_info()
    if name not in _INFOS:
        raise ConfigError(f"--dataset={name!r} is unknown; choose one of {', '.join(DATASETS)}")
    return _INFOS[name]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"--split={split!r} is unknown; choose one of {', '.join(SPLITS)}")


# --------------------------------------------------------------------------
# IDX files (the format of MNIST and Fashion-MNIST).

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_COUNTS = {"train": 60000, "test": 10000}


def _find_idx_file(directory: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzip-compressed) of unsigned bytes.

    Args:
      path: an `.idx?-ubyte` file, or the same with `.gz`.

    Returns:
      A uint8 array with the shape the file's header declares.

    Raises:
      ConfigError: the file is unreadable, not IDX, or shorter than its header says.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ConfigError(f"{path}: cannot read ({e}); reinstall the data files") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{path}: truncated header; reinstall the data files")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ConfigError(f"{path}: holds {len(raw) - header} data bytes, header says {expected} "
                          "(truncated or corrupt); reinstall the data files")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_directory(data_dir: Optional[str]) -> Optional[str]:
    """The directory to read Fashion-MNIST IDX files from, or None for tfds."""
    if data_dir:
        if not os.path.isdir(data_dir):
            raise ConfigError(f"--data_dir={data_dir} is not a directory")
        if _find_idx_file(data_dir, _IDX_FILES["train"][0]) or _find_idx_file(data_dir, _IDX_FILES["test"][0]):
            return data_dir
        return None  # A tfds data directory.
    if os.path.isdir(DEBIAN_FASHION_MNIST_DIR):
        return DEBIAN_FASHION_MNIST_DIR
    return None


def _load_idx_split(directory: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    paths = []
    for stem in _IDX_FILES[split]:
        path = _find_idx_file(directory, stem)
        if path is None:
            raise ConfigError(f"{os.path.join(directory, stem)}[.gz] not found; install Debian's "
                              "dataset-fashion-mnist package or point --data_dir at the four IDX files")
        paths.append(path)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ConfigError(f"{paths[0]} and {paths[1]} do not match: {images.shape} images, {labels.shape} labels")
    if len(images) != _IDX_COUNTS[split]:
        raise ConfigError(f"{paths[0]}: {len(images)} images, expected {_IDX_COUNTS[split]} "
                          "(truncated download?); reinstall the data files")
    return images[..., None], labels.astype(np.int64)



# --------------------------------------------------------------------------
# tensorflow-datasets.


def _tfds_root(data_dir: Optional[str]) -> str:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _imagenet_manual_dir(data_dir: Optional[str]) -> str:
    # tfds' default manual directory, <data_dir>/downloads/manual.
    return os.path.join(_tfds_root(data_dir), "downloads", "manual")


def _missing_dataset_message(name: str, split: str, data_dir: Optional[str]) -> str:
    root = _tfds_root(data_dir)
    or_data_dir = "" if data_dir else ", or pass --data_dir"
    if name == "imagenet2012":
        manual = _imagenet_manual_dir(data_dir)
        return (f"--dataset=imagenet2012 ({split}) is not prepared in {root} and "
                f"{os.path.join(manual, IMAGENET_ARCHIVES[split])} is missing: download "
                f"{IMAGENET_ARCHIVES['train']} and {IMAGENET_ARCHIVES['test']} from {IMAGENET_URL} (free "
                f"registration) into {manual}; tfds converts them once, offline, on first use (hours){or_data_dir}")
    if name == "fashion_mnist":
        return (f"--dataset=fashion_mnist ({split}) not found in {root}; install Debian's dataset-fashion-mnist "
                "package or point --data_dir at the four IDX files")
    return (f"--dataset={name} ({split}) not found in {root} and tfds cannot download here: on a machine with "
            f"network access run `tfds build {name} --data_dir=DIR` and copy DIR/{name} to {root}/{name}"
            f"{or_data_dir}")


def _prepare_imagenet(data_dir: Optional[str], split: str) -> bool:
    """Builds imagenet2012 from the manual archives, if the one `split` needs is there.

    Returns:
      False when that archive is missing (nothing was done).
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    manual = _imagenet_manual_dir(data_dir)
    if not os.path.isfile(os.path.join(manual, IMAGENET_ARCHIVES[split])):
        return False
    logging.warning("Preparing imagenet2012 in %s from the archives in %s; this runs once and takes hours.",
                    _tfds_root(data_dir), manual)
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return True


def _tfds_load(name: str, split: str, *, data_dir: Optional[str], limit: Optional[int] = None,
               shuffle_files: bool = False, seed: Optional[int] = None,
               input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
    """A tfds split as (encoded image bytes, int64 label), optionally the first `limit`.

    Raises:
      ConfigError: the dataset is not prepared (and, for imagenet2012, the
        archive to prepare it from is missing), or lacks the split.
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    tfds_split = _TFDS_SPLITS.get(name, {}).get(split, split)

    def load():
        # Slicing makes the first `limit` examples the same subset in every
        # epoch, whatever the file order; tfds refuses a slice past the end.
        sliced = tfds_split
        if limit:
            try:
                available = tfds.builder(name, data_dir=data_dir).info.splits[tfds_split].num_examples
            except KeyError:  # Not prepared (the load fails below), or mocked.
                available = None
            if available is None or limit < available:
                sliced = f"{tfds_split}[:{limit}]"
        return tfds.load(name, split=sliced, data_dir=data_dir, as_supervised=True, download=False,
                         shuffle_files=shuffle_files, decoders={"image": tfds.decode.SkipDecoding()},
                         read_config=tfds.ReadConfig(shuffle_seed=seed, input_context=input_context,
                                                     try_autocache=False))

    missing = (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError)
    try:
        try:
            ds = load()
        except missing as e:
            if not (name == "imagenet2012" and _prepare_imagenet(data_dir, split)):
                raise ConfigError(_missing_dataset_message(name, split, data_dir)) from e
            ds = load()
    except ValueError as e:
        if isinstance(e, ConfigError) or "split" not in str(e).lower():
            raise
        # E.g. imagenet2012 prepared from the validation archive only.
        raise ConfigError(f"--dataset={name}: {_tfds_root(data_dir)} holds no {split} split ({e}); add its archive "
                          "and delete the prepared copy to rebuild it") from e
    if limit:
        ds = ds.take(limit)  # tfds.testing.mock_data ignores split slicing.
    return ds


def decode_image(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """Decodes a JPEG or PNG to uint8 [H, W, channels]."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def _load_tfds_split(name: str, split: str, data_dir: Optional[str],
                     limit: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    info = get_dataset_info(name)
    ds = _tfds_load(name, split, data_dir=data_dir, limit=limit)
    if name in STREAMED:
        ds = ds.map(lambda x, y: (resize_center_crop(decode_image(x, 3)), y), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: (decode_image(x, info.input_shape[-1]), y), num_parallel_calls=tf.data.AUTOTUNE)
    # Batches rather than tfds' batch_size=-1, which needs a known cardinality
    # (and crashes under tfds.testing.mock_data).
    images, labels = [], []
    for x, y in ds.batch(1024).prefetch(2).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    if not images:
        raise ConfigError(f"--dataset={name} ({split}) in {_tfds_root(data_dir)} holds no examples")
    return np.concatenate(images).astype(np.uint8, copy=False), np.concatenate(labels).astype(np.int64)


def _mock_arrays(info: DatasetInfo, split: str, n: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_MOCK_SEEDS[split])
    images = rng.integers(0, 256, size=(n, *info.input_shape), dtype=np.uint8)
    return images, rng.integers(0, info.num_classes, size=n, dtype=np.int64)


def load_uint8(name: str, split: str, *, data_dir: Optional[str] = None, limit: Optional[int] = None,
               mock: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Loads a split as uint8 images [N, H, W, C] and int64 labels [N].

    A streamed dataset (imagenet2012) is loaded only up to
    `MAX_IN_MEMORY_STREAMED` images, in its test-time view (resize 256,
    center crop 224), e.g. for certification; train on it with `make_input`.

    Args:
      name: dataset name (see DATASETS).
      split: "train" or "test".
      data_dir: a directory with the IDX files (Fashion-MNIST) or a tfds data directory.
      limit: keep only the first `limit` examples (None or 0: all).
      mock: return random images and labels of the right shapes instead
        (`limit`, else `MOCK_EXAMPLES[split]` of them; fixed seed).

    Raises:
      ConfigError: unknown dataset or split, missing or corrupt files, or a
        streamed dataset asked for more than `MAX_IN_MEMORY_STREAMED` images.
    """
    info = get_dataset_info(name)
    _check_split(split)
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 (0 = all), got {limit}")
    count = limit or (MOCK_EXAMPLES[split] if mock else 0)  # 0: the whole split.
    if name in STREAMED and not 0 < count <= MAX_IN_MEMORY_STREAMED:
        raise ConfigError(f"--dataset={name} is too large to hold in memory: ask for at most "
                          f"{MAX_IN_MEMORY_STREAMED} {split} images (--train_examples/--eval_examples), "
                          "or stream it with tf_consreg.data.make_input")
    if mock:
        images, labels = _mock_arrays(info, split, count)
    else:
        directory = _idx_directory(data_dir) if name == "fashion_mnist" else None
        if directory is not None:
            images, labels = _load_idx_split(directory, split)
        else:
            images, labels = _load_tfds_split(name, split, data_dir, limit)
    if images.shape[1:] != info.input_shape:
        raise ConfigError(f"dataset {name!r}: images of shape {images.shape[1:]}, expected {info.input_shape}")
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def load_arrays(name: str, split: str, *, data_dir: Optional[str] = None, limit: Optional[int] = None,
                mock: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Loads a split as float32 images in [0, 1] [N, H, W, C] and int64 labels [N].

    Same arguments and errors as `load_uint8`.
    """
    images, labels = load_uint8(name, split, data_dir=data_dir, limit=limit, mock=mock)
    return images.astype(np.float32) / 255.0, labels


def holdout_split(images: np.ndarray, labels: np.ndarray, num: int, *,
                  train_examples: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Holds the last `num` examples of a training split out for validation.

    The held-out examples are the same whatever `train_examples` is, so runs
    that train on different amounts of data are validated on the same images.

    Args:
      images: the whole training split, [S, ...].
      labels: its labels, [S].
      num: examples to hold out (`--certify_examples`), >= 1.
      train_examples: train on the first this many of the remaining S - num
        examples (`--train_examples`); 0 = all of them.

    Returns:
      (train_images, train_labels, holdout_images, holdout_labels); the first
      two are the first `train_examples` (or S - num) examples, the last two
      the last `num`.

    Raises:
      ConfigError: `num` < 1, `num` >= S (no training images left), or
        `train_examples` > S - num.
    """
    size = len(images)
    if len(labels) != size:
        raise ValueError(f"{size} images but {len(labels)} labels")
    if num < 1:
        raise ConfigError(f"--certify_examples must be >= 1, got {num}")
    if num > size:
        raise ConfigError(f"--certify_examples={num} is larger than the training split ({size} images); "
                          "hold out fewer")
    if num == size:
        raise ConfigError(f"--certify_examples={num} holds out the whole training split ({size} images), "
                          "leaving nothing to train on; hold out fewer")
    if train_examples < 0:
        raise ConfigError(f"--train_examples must be >= 0 (0 = all), got {train_examples}")
    rest = size - num
    if train_examples > rest:
        raise ConfigError(f"--train_examples={train_examples} with --certify_examples={num}: the training split "
                          f"has {size} images, so at most {rest} are left to train on")
    stop = train_examples or rest
    return images[:stop], labels[:stop], images[rest:], labels[rest:]


# --------------------------------------------------------------------------
# Augmentation and test-time views: uint8 in, uint8 out.


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


def random_resized_crop(encoded: tf.Tensor, seed: tf.Tensor, size: int = _IMAGENET_CROP) -> tf.Tensor:
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


def resize_center_crop(image: tf.Tensor, resize: int = _IMAGENET_RESIZE, crop: int = _IMAGENET_CROP) -> tf.Tensor:
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


# --------------------------------------------------------------------------
# Input pipelines.


def _random_seeds(seed: Optional[int], salt: int) -> tf.data.Dataset:
    """Endless int64 [2] stateless seeds; new ones each epoch, reproducible given `seed`."""
    if seed is not None:
        seed = (seed * 1_000_003 + salt) % (2 ** 31 - 1)  # Apart from the shuffle's stream.
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


def _replicas_per_pipeline(input_context: Optional[tf.distribute.InputContext]) -> int:
    if input_context is None:
        return 1
    return max(1, input_context.num_replicas_in_sync // input_context.num_input_pipelines)


def _batch_and_finish(ds: tf.data.Dataset, batch_size: int, *, drop_remainder: bool, deterministic: bool,
                      input_context: Optional[tf.distribute.InputContext], augment: Optional[Callable] = None,
                      seed: Optional[int] = None, repeat: bool = False) -> tf.data.Dataset:
    """Batches, augments (batch-wise), converts to float32 in [0, 1], repeats if asked, prefetches.

    `batch_size` is per replica. When one pipeline feeds several replicas,
    it batches their examples together and splits the batch in order, so the
    replicas of a step hold consecutive, equally many examples (replica r the
    r-th slice, as `tf_consreg.distribute.example_seeds` assumes).
    """
    replicas = _replicas_per_pipeline(input_context)
    ds = ds.batch(batch_size * replicas, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)

    def to_float(images):
        return tf.cast(images, tf.float32) / 255.0  # One op per batch, after the uint8 work.

    if augment is None:
        ds = ds.map(lambda x, y: (to_float(x), tf.cast(y, tf.int64)), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        salt = 0 if input_context is None else input_context.input_pipeline_id
        ds = tf.data.Dataset.zip((ds, _random_seeds(seed, salt)))
        ds = ds.map(lambda xy, s: (to_float(augment(xy[0], s)), tf.cast(xy[1], tf.int64)),
                    num_parallel_calls=tf.data.AUTOTUNE)
    if replicas > 1:
        ds = ds.rebatch(batch_size, drop_remainder=drop_remainder)
    if repeat:
        ds = ds.repeat()  # Each pass reshuffles and redraws the augmentation.
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


# Independent random streams of a run's epochs (`epochs=` pipelines): each
# epoch's order, and its augmentation, keyed by (seed, stream, epoch).
_ORDER_STREAM, _AUGMENT_STREAM = 1, 2


def _check_epochs(epochs: Optional[range]) -> None:
    if epochs is not None and (not isinstance(epochs, range) or epochs.step != 1 or epochs.start < 0
                               or not epochs):
        raise ValueError(f"epochs must be a non-empty range(first, end) of epoch numbers >= 0, got {epochs!r}")


def _epochs_seed(seed: Optional[int]) -> int:
    """The seed of an `epochs=` pipeline: `seed`, or a fresh random one when None (nondeterministic)."""
    return int(np.random.default_rng().integers(2 ** 31)) if seed is None else int(seed)


def _in_memory_epochs(images: np.ndarray, labels: np.ndarray, batch_size: int, epochs: range, *, shuffle: bool,
                      seed: int, drop_remainder: bool, augment: Optional[Callable],
                      input_context: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
    """The batches of `epochs`, one epoch after another, each drawn from (seed, epoch) alone.

    Epoch e's order is a stateless permutation of this pipeline's examples
    keyed by (seed, e), and batch j of it is augmented with a stateless seed
    keyed by (seed, e, pipeline, j). Batches never span two epochs; they are
    gathered from the arrays, uint8, and converted to float once augmented.
    """
    images_t = tf.convert_to_tensor(images)
    labels_t = tf.cast(tf.convert_to_tensor(labels), tf.int64)
    positions = tf.range(len(images), dtype=tf.int64)
    pipeline = 0
    if input_context is not None and input_context.num_input_pipelines > 1:
        pipeline = input_context.input_pipeline_id
        positions = positions[pipeline::input_context.num_input_pipelines]
    replicas = _replicas_per_pipeline(input_context)

    def epoch_batches(epoch):
        order = positions
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(positions, noise_lib.step_seed(seed, _ORDER_STREAM, epoch))
        key = tf.random.experimental.stateless_fold_in(noise_lib.step_seed(seed, _AUGMENT_STREAM, epoch), pipeline)

        def load(j, indices):
            batch = tf.gather(images_t, indices)
            if augment is not None:
                batch = augment(batch, tf.random.experimental.stateless_fold_in(key, j))
            return tf.cast(batch, tf.float32) / 255.0, tf.gather(labels_t, indices)

        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size * replicas,
                                                                  drop_remainder=drop_remainder)
        return batches.enumerate().map(load, num_parallel_calls=tf.data.AUTOTUNE)

    ds = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_batches)
    if replicas > 1:
        ds = ds.rebatch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, *, shuffle: bool,
                 seed: Optional[int] = None, drop_remainder: bool = False, augment: Optional[str] = None,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 repeat: bool = False, epochs: Optional[range] = None) -> tf.data.Dataset:
    """A batched `tf.data` pipeline of (float32 images in [0, 1], int64 labels) from arrays.

    The uint8 arrays stay in memory as they are (a quarter of float32);
    augmentation and the conversion to float run on whole batches.

    Args:
      images: uint8 images [N, H, W, C].
      labels: int64 labels [N].
      batch_size: images per batch (per replica when `input_context` is given).
      shuffle: reshuffle every epoch (full-dataset buffer).
      seed: seed of the shuffle and the augmentation, for reproducible runs.
      drop_remainder: drop the last partial batch (static shapes).
      augment: a dataset name: apply its training augmentation (cifar10:
        random crop with 4-pixel zero padding and horizontal flip; mnist,
        fashion_mnist: none). None: no augmentation.
      input_context: from `distribute_datasets_from_function`; this pipeline
        reads its shard of the examples.
      repeat: repeat endlessly (reshuffled, newly augmented each pass).
      epochs: the epochs of a training run, range(first, end): the dataset
        holds their batches in turn (ignoring `repeat`), epoch e shuffled and
        augmented from (seed, e) alone, so the batches of an epoch do not
        depend on the epochs before it or on the pipeline that drew them.
        Pass the epoch's steps to `fit` (`steps_per_epoch`). None: one pass,
        reshuffled at each new iteration (`repeat`).

    Raises:
      ConfigError: `augment` names no dataset held in memory.
    """
    if augment is not None and augment not in _BATCH_AUGMENTATIONS:
        raise ConfigError(f"augment={augment!r}: no in-memory training augmentation; choose one of "
                          f"{', '.join(_BATCH_AUGMENTATIONS)}")
    augment_fn = _BATCH_AUGMENTATIONS.get(augment)
    _check_epochs(epochs)
    if epochs is not None:
        return _in_memory_epochs(images, labels, batch_size, epochs, shuffle=shuffle, seed=_epochs_seed(seed),
                                 drop_remainder=drop_remainder, augment=augment_fn, input_context=input_context)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    # Unseeded shuffled pipelines may reorder for speed; evaluation keeps its order.
    return _batch_and_finish(ds, batch_size, drop_remainder=drop_remainder,
                             deterministic=seed is not None or not shuffle, input_context=input_context,
                             augment=augment_fn, seed=seed, repeat=repeat)


def _mock_encoded(info: DatasetInfo, split: str, n: int) -> tf.data.Dataset:
    """n random JPEGs of random sizes (160 to 319 pixels a side) and labels, fixed seed."""

    def example(i):
        seeds = tf.random.experimental.stateless_split(tf.stack([tf.constant(_MOCK_SEEDS[split], tf.int64), i]), 3)
        size = tf.random.stateless_uniform([2], seeds[0], 160, 320, dtype=tf.int32)
        image = tf.random.stateless_uniform(tf.concat([size, [3]], 0), seeds[1], 0, 256, dtype=tf.int32)
        label = tf.random.stateless_uniform([], seeds[2], 0, info.num_classes, dtype=tf.int64)
        return tf.io.encode_jpeg(tf.cast(image, tf.uint8)), label

    return tf.data.Dataset.range(n).map(example, num_parallel_calls=tf.data.AUTOTUNE)


def _streamed_source(name: str, split: str, *, data_dir: Optional[str], limit: Optional[int], mock: bool,
                     shuffle_files: bool, seed: Optional[int],
                     input_context: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
    if mock:
        ds = _mock_encoded(get_dataset_info(name), split, limit or MOCK_EXAMPLES[split])
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return ds
    return _tfds_load(name, split, data_dir=data_dir, limit=limit, shuffle_files=shuffle_files, seed=seed,
                      input_context=input_context)


def _streamed_dataset(name: str, split: str, batch_size: int, *, training: bool, data_dir: Optional[str],
                      limit: Optional[int], seed: Optional[int], drop_remainder: bool, mock: bool,
                      input_context: Optional[tf.distribute.InputContext], repeat: bool) -> tf.data.Dataset:
    ds = _streamed_source(name, split, data_dir=data_dir, limit=limit, mock=mock, shuffle_files=training,
                          seed=seed, input_context=input_context)
    if training:
        ds = ds.shuffle(_STREAM_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
        salt = 0 if input_context is None else input_context.input_pipeline_id
        ds = tf.data.Dataset.zip((ds, _random_seeds(seed, salt)))
        ds = ds.map(lambda xy, s: (random_resized_crop(xy[0], s), xy[1]), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: (resize_center_crop(decode_image(x, 3)), y), num_parallel_calls=tf.data.AUTOTUNE)
    return _batch_and_finish(ds, batch_size, drop_remainder=drop_remainder,
                             deterministic=seed is not None or not training, input_context=input_context,
                             repeat=repeat)


def _streamed_epochs(name: str, split: str, batch_size: int, epochs: range, *, seed: int, **kwargs) -> tf.data.Dataset:
    """The training batches of `epochs` of a streamed dataset, one epoch after another.

    tfds shuffles its files by a Python seed, so the epochs are not drawn in
    one graph as `_in_memory_epochs` draws them: epoch e is a pipeline of its
    own, seeded by (seed, e) alone, and they are chained (a pipeline starts
    when the one before it ends).
    """
    def epoch_seed(epoch: int) -> int:
        return int(noise_lib.step_seed(seed, _ORDER_STREAM, epoch)[1]) % (2 ** 31 - 1)

    return functools.reduce(tf.data.Dataset.concatenate, [
        _streamed_dataset(name, split, batch_size, training=True, seed=epoch_seed(epoch), repeat=False, **kwargs)
        for epoch in epochs])


@dataclasses.dataclass(frozen=True)
class Input:
    """An input pipeline ready for `fit`/`evaluate`, and its size.

    Attributes:
      dataset: a `tf.data.Dataset` that ends after one pass; or, when built
        for a strategy, a distributed dataset that repeats endlessly; or,
        when built for a run's `epochs`, their batches in turn. For the last
        two, pass `steps_per_epoch` (or `validation_steps`) to `fit`.
        tf.distribute reports the length of a per-replica pipeline in
        per-replica batches, which Keras would take for steps.
      num_examples: examples in one pass (after `limit`).
      batch_size: global batch size (all replicas together).
      drop_remainder: whether the last partial batch is dropped.
    """

    dataset: Any
    num_examples: int
    batch_size: int
    drop_remainder: bool

    @property
    def steps_per_epoch(self) -> int:
        """Batches (global steps) in one pass."""
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """An opened dataset split: checked to exist, and loaded if it is held in memory.

    Open it before doing any work (it raises the data errors), then build
    pipelines from it with `make_input`, e.g. once the seed of a resumed run
    is known.

    Attributes:
      name: dataset name.
      split: "train" or "test".
      num_examples: examples in the split (after `limit`).
      data_dir, limit, mock: as given to `open_source`.
      images, labels: the uint8 images and int64 labels of an in-memory
        dataset; None for a streamed one (imagenet2012).
    """

    name: str
    split: str
    num_examples: int
    data_dir: Optional[str] = None
    limit: Optional[int] = None
    mock: bool = False
    images: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None

    def make_input(self, batch_size: int, *, training: bool, seed: Optional[int] = None,
                   drop_remainder: bool = False, strategy: Optional[tf.distribute.Strategy] = None,
                   epochs: Optional[range] = None) -> Input:
        """The input pipeline of this split, for training or for evaluation.

        Training pipelines shuffle every epoch and apply the dataset's
        training augmentation; evaluation pipelines keep the order and apply
        the test-time view.

        Args:
          batch_size: GLOBAL batch size; under `strategy` each replica gets
            batch_size / replicas examples.
          training: shuffle and augment (True) or not.
          seed: seed of shuffling and augmentation (None: nondeterministic).
          drop_remainder: drop the last partial batch (static shapes; needed
            for equal per-replica batches).
          strategy: when given, the dataset is built with
            `strategy.distribute_datasets_from_function`: one pipeline per
            input worker, sharded, batched per replica, repeated endlessly
            (see `Input`).
          epochs: for a training run, the epochs to draw, range(first, end):
            the dataset holds their batches in turn, each epoch's order and
            augmentation drawn from (seed, epoch) alone, so a run resumed at
            epoch `first` trains on what the uninterrupted run trained on
            (see `make_dataset`). Pass `steps_per_epoch` to `fit`.

        Returns:
          An `Input`; its `dataset` yields (float32 images in [0, 1], int64 labels).

        Raises:
          ConfigError: a batch size below 1, or one that does not split
            evenly over the strategy's replicas.
          ValueError: `epochs` without `training`, or not a non-empty range.
        """
        if batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
        replicas = strategy.num_replicas_in_sync if strategy is not None else 1
        if batch_size % replicas:
            raise ConfigError(f"--batch_size: {batch_size} images per step do not split evenly over {replicas} "
                              "replicas")
        _check_epochs(epochs)
        if epochs is not None and not training:
            raise ValueError("epochs: only a training input is drawn by epoch")
        repeat = strategy is not None and epochs is None
        if epochs is not None:
            seed = _epochs_seed(seed)  # Once: every input pipeline of a strategy draws the same epochs.

        def build(local_batch, context):
            if self.images is None:
                stream = dict(data_dir=self.data_dir, limit=self.limit, drop_remainder=drop_remainder,
                              mock=self.mock, input_context=context)
                if epochs is not None:
                    return _streamed_epochs(self.name, self.split, local_batch, epochs, seed=seed, **stream)
                return _streamed_dataset(self.name, self.split, local_batch, training=training, seed=seed,
                                         repeat=repeat, **stream)
            return make_dataset(self.images, self.labels, local_batch, shuffle=training, seed=seed,
                                drop_remainder=drop_remainder, augment=self.name if training else None,
                                input_context=context, repeat=repeat, epochs=epochs)

        if strategy is None:
            dataset = build(batch_size, None)
        else:
            dataset = strategy.distribute_datasets_from_function(
                lambda context: build(context.get_per_replica_batch_size(batch_size), context))
        return Input(dataset, self.num_examples, batch_size, drop_remainder)


def open_source(name: str, split: str, *, data_dir: Optional[str] = None, limit: Optional[int] = None,
                mock: bool = False) -> Source:
    """Opens a dataset split: checks that it exists and loads it if it is held in memory.

    Args:
      name: dataset name (see DATASETS).
      split: "train" or "test".
      data_dir: IDX directory (Fashion-MNIST) or tfds data directory.
      limit: use only the first `limit` examples (None or 0: all).
      mock: random data of the right shapes instead of the dataset (see
        `load_uint8`), for smoke runs without the data.

    Raises:
      ConfigError: unknown dataset or split, or missing or corrupt data.
    """
    get_dataset_info(name)
    _check_split(split)
    limit = limit or None
    if name in STREAMED:
        # Opening the split checks that it exists and gives its size; the
        # pipelines open it again, sharded and shuffled as they need.
        stream = _streamed_source(name, split, data_dir=data_dir, limit=limit, mock=mock, shuffle_files=False,
                                  seed=None, input_context=None)
        num_examples = int(stream.cardinality())
        if num_examples < 0:
            raise ConfigError(f"--dataset={name} ({split}): its size is unknown; rebuild it with tfds")
        return Source(name, split, num_examples, data_dir, limit, mock)
    images, labels = load_uint8(name, split, data_dir=data_dir, limit=limit, mock=mock)
    return Source(name, split, len(images), data_dir, limit, mock, images, labels)


def make_input(name: str, split: str, batch_size: int, *, training: bool, data_dir: Optional[str] = None,
               limit: Optional[int] = None, seed: Optional[int] = None, drop_remainder: bool = False,
               mock: bool = False, strategy: Optional[tf.distribute.Strategy] = None) -> Input:
    """`open_source(...).make_input(...)` in one call; see those for the arguments.

    Raises:
      ConfigError: unknown dataset or split, missing data, or a bad batch size.
    """
    source = open_source(name, split, data_dir=data_dir, limit=limit, mock=mock)
    return source.make_input(batch_size, training=training, seed=seed, drop_remainder=drop_remainder,
                             strategy=strategy)
