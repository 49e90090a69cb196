"""Datasets as images in [0, 1], and the training input pipeline.

Images stay in pixel space: the model normalizes in its first layer, so the
Gaussian noise of randomized smoothing is added where the certificate's L2
radius is measured (Cohen et al., 2019; the authors' `NormalizeLayer`).

Fashion-MNIST, the offline default, is read from IDX files: `--data_dir`
when given, else Debian's `dataset-fashion-mnist` package, else
tensorflow-datasets. MNIST and CIFAR-10 come from tensorflow-datasets.
"""

import dataclasses
import gzip
import os
import struct
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from tf_consreg.errors import ConfigError

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a certificate need to know about a dataset.

    Attributes:
      name: dataset name, as given to --dataset.
      num_classes: number of classes.
      input_shape: (height, width, channels) of an image.
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

DATASETS = tuple(_INFOS)


def get_dataset_info(name: str) -> DatasetInfo:
    """Returns the `DatasetInfo` of a dataset.

    Raises:
      ConfigError: the dataset is unknown.
    """
    if name not in _INFOS:
        raise ConfigError(f"--dataset={name!r} is unknown; choose one of {', '.join(DATASETS)}")
    return _INFOS[name]


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


def _load_tfds_split(name: str, split: str, data_dir: Optional[str]) -> Tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    try:
        images, labels = tfds.as_numpy(
            tfds.load(name, split=split, data_dir=data_dir, as_supervised=True, batch_size=-1, download=False))
    except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as e:
        where = data_dir or "~/tensorflow_datasets"
        hint = ("install Debian's dataset-fashion-mnist package or point --data_dir at the four IDX files"
                if name == "fashion_mnist" else f"prepare it with `tfds build {name}` on a machine with network "
                                                f"access and copy it into {where}, or pass --data_dir")
        raise ConfigError(f"dataset {name!r} ({split}) not found in {where}; {hint}") from e
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


def load_uint8(name: str, split: str, *, data_dir: Optional[str] = None,
               limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Loads a split as uint8 images [N, H, W, C] and int64 labels [N].

    Args:
      name: dataset name (see DATASETS).
      split: "train" or "test".
      data_dir: a directory with the IDX files (Fashion-MNIST) or a tfds data directory.
      limit: keep only the first `limit` examples (None or 0: all).

    Raises:
      ConfigError: unknown dataset or split, or missing or corrupt files.
    """
    info = get_dataset_info(name)
    if split not in SPLITS:
        raise ConfigError(f"--split={split!r} is unknown; choose one of {', '.join(SPLITS)}")
    directory = _idx_directory(data_dir) if name == "fashion_mnist" else None
    if directory is not None:
        images, labels = _load_idx_split(directory, split)
    else:
        images, labels = _load_tfds_split(name, split, data_dir)
    if images.shape[1:] != info.input_shape:
        raise ConfigError(f"dataset {name!r}: images of shape {images.shape[1:]}, expected {info.input_shape}")
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def load_arrays(name: str, split: str, *, data_dir: Optional[str] = None,
                limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Loads a split as float32 images in [0, 1] [N, H, W, C] and int64 labels [N].

    Same arguments and errors as `load_uint8`.
    """
    images, labels = load_uint8(name, split, data_dir=data_dir, limit=limit)
    return images.astype(np.float32) / 255.0, labels


# --------------------------------------------------------------------------
# Input pipelines.


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, *, shuffle: bool,
                 seed: Optional[int] = None, drop_remainder: bool = False) -> tf.data.Dataset:
    """A batched `tf.data` pipeline of (float32 images in [0, 1], int64 labels).

    The uint8 arrays are cached in memory as they are (a quarter of float32);
    batches are converted to float after batching, one op per batch.

    Args:
      images: uint8 images [N, H, W, C].
      labels: int64 labels [N].
      batch_size: global batch size.
      shuffle: reshuffle every epoch (full-dataset buffer).
      seed: shuffle seed, for reproducible runs.
      drop_remainder: drop the last partial batch (static shapes).
    """
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).cache()
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y), num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = seed is not None
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
