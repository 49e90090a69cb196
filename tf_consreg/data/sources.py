"""Where datasets come from: files and tfds splits, as uint8 images or encoded JPEGs, and read by index.

Images stay in pixel space: the model normalizes in its first layer, so the
Gaussian noise of randomized smoothing is added where the certificate's L2
radius is measured (Cohen et al., 2019; the authors' `NormalizeLayer`).

* fashion_mnist, the offline default, is read from IDX files: `--data_dir`
  when given, else Debian's `dataset-fashion-mnist` package, else
  tensorflow-datasets.
* mnist and cifar10 come from tensorflow-datasets; training holds them in
  memory as uint8 arrays (50,000 CIFAR-10 images are 150 MB).
* imagenet2012 comes from tensorflow-datasets and is streamed from its
  TFRecord shards, never held in memory. tfds builds those once, offline,
  from the two archives of the ILSVRC 2012 challenge, which the user
  downloads into `<data_dir>/downloads/manual`.

`load_uint8` and `load_arrays` load a split (or its first examples) whole.
`open_reader` opens a split for reading chosen examples by index, in the
test-time view (`evaluation_view`), streaming from tfds so that no split
has to fit in memory: certification and the export's check images read
through it. With `mock=True` every source is replaced by random data of the
right shapes (a fixed seed), for smoke runs on machines without the dataset.
"""

import dataclasses
import functools
import gzip
import os
import struct
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from tf_consreg.data.names import DATASETS, SPLITS, STREAMED
from tf_consreg.data.augmentation import IMAGENET_CROP, decode_image, resize_center_crop
from tf_consreg.errors import ConfigError

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
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



@functools.lru_cache(maxsize=None)
def _imagenet_info() -> DatasetInfo:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    # The WordNet ids (n01440764, ...) in label order; tfds ships them with its
    # builder, so they are known without the data.
    names = tuple(tfds.builder("imagenet2012").info.features["label"].names)
    return DatasetInfo("imagenet2012", 1000, (IMAGENET_CROP, IMAGENET_CROP, 3), names, (0.485, 0.456, 0.406),
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


def check_split(split: str) -> None:
    """Raises ConfigError naming --split unless `split` is one of SPLITS."""
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
               input_context: Optional[tf.distribute.InputContext] = None,
               in_order: bool = False) -> tf.data.Dataset:
    """A tfds split as (encoded image bytes, int64 label), optionally the first `limit`.

    By default tfds interleaves 16 files, so the k-th example read depends on
    how much of the split is read; `in_order` reads its files one after
    another, so the k-th example read is the split's example k (its
    `split[k:k+1]`), however far the read goes.

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
                                                     try_autocache=False,
                                                     **({"interleave_cycle_length": 1} if in_order else {})))

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


def evaluation_view(name: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """The test-time view of a dataset's encoded images: encoded JPEG or PNG -> uint8 [H, W, C].

    imagenet2012: Resize(256) of the shorter side, then CenterCrop(224), as
    training evaluates (`pipelines`); the others: the image as it is.
    """
    if name in STREAMED:
        return lambda encoded: resize_center_crop(decode_image(encoded, 3))
    channels = get_dataset_info(name).input_shape[-1]
    return lambda encoded: decode_image(encoded, channels)


def _load_stream(name: str, split: str, data_dir: Optional[str], limit: Optional[int],
                 mock: bool) -> Tuple[np.ndarray, np.ndarray]:
    """A tfds split (or a streamed dataset's mock), decoded whole in its test view."""
    view = evaluation_view(name)
    ds = encoded_stream(name, split, data_dir=data_dir, limit=limit, mock=mock)
    ds = ds.map(lambda x, y: (view(x), y), num_parallel_calls=tf.data.AUTOTUNE)
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
    center crop 224); train on it with `make_input`, and read chosen
    examples of a whole split with `open_reader`.

    Args:
      name: dataset name (see DATASETS).
      split: "train" or "test".
      data_dir: a directory with the IDX files (Fashion-MNIST) or a tfds data directory.
      limit: keep only the first `limit` examples (None or 0: all).
      mock: return random images and labels of the right shapes instead
        (`limit`, else `MOCK_EXAMPLES[split]` of them; fixed seed); for a
        streamed dataset, the test view of its mock stream's random JPEGs.

    Raises:
      ConfigError: unknown dataset or split, missing or corrupt files, or a
        streamed dataset asked for more than `MAX_IN_MEMORY_STREAMED` images.
    """
    info = get_dataset_info(name)
    check_split(split)
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 (0 = all), got {limit}")
    count = limit or (MOCK_EXAMPLES[split] if mock else 0)  # 0: the whole split.
    if name in STREAMED and not 0 < count <= MAX_IN_MEMORY_STREAMED:
        raise ConfigError(f"--dataset={name} is too large to hold in memory: ask for at most "
                          f"{MAX_IN_MEMORY_STREAMED} {split} images (--train_examples/--eval_examples), "
                          "or stream it with tf_consreg.data.make_input, or read it by index with "
                          "tf_consreg.data.open_reader")
    directory = _idx_directory(data_dir) if name == "fashion_mnist" and not mock else None
    if mock and name not in STREAMED:
        images, labels = _mock_arrays(info, split, count)
    elif directory is not None:
        images, labels = _load_idx_split(directory, split)
    else:
        # A streamed dataset's mock is the stream's (random JPEGs, in the test view), as training evaluates on it.
        images, labels = _load_stream(name, split, data_dir, count or None, mock)
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


def _mock_encoded(info: DatasetInfo, split: str, n: int) -> tf.data.Dataset:
    """n random JPEGs of random sizes (160 to 319 pixels a side) and labels, fixed seed."""

    def example(i):
        seeds = tf.random.experimental.stateless_split(tf.stack([tf.constant(_MOCK_SEEDS[split], tf.int64), i]), 3)
        size = tf.random.stateless_uniform([2], seeds[0], 160, 320, dtype=tf.int32)
        image = tf.random.stateless_uniform(tf.concat([size, [3]], 0), seeds[1], 0, 256, dtype=tf.int32)
        label = tf.random.stateless_uniform([], seeds[2], 0, info.num_classes, dtype=tf.int64)
        return tf.io.encode_jpeg(tf.cast(image, tf.uint8)), label

    return tf.data.Dataset.range(n).map(example, num_parallel_calls=tf.data.AUTOTUNE)


def encoded_stream(name: str, split: str, *, data_dir: Optional[str] = None, limit: Optional[int] = None,
                   mock: bool = False, shuffle_files: bool = False, seed: Optional[int] = None,
                   input_context: Optional[tf.distribute.InputContext] = None,
                   in_order: bool = False) -> tf.data.Dataset:
    """A tfds split (or its mock) as a stream of (encoded image, int64 label), in file order unless shuffled.

    Args:
      name: a tfds dataset.
      split: "train" or "test".
      data_dir: tfds data directory.
      limit: only the first `limit` examples (None: all).
      mock: random JPEGs instead (`limit`, else `MOCK_EXAMPLES[split]`).
      shuffle_files: read the files in a random order (training).
      seed: seed of that order.
      input_context: read this input pipeline's share (by file; by example when mocked).
      in_order: read the files one after another, so that the k-th example
        read is the split's example k whatever `limit` is (tfds interleaves
        16 files otherwise).

    Raises:
      ConfigError: the dataset is not prepared, or lacks the split.
    """
    if mock:
        ds = _mock_encoded(get_dataset_info(name), split, limit or MOCK_EXAMPLES[split])
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return ds
    return _tfds_load(name, split, data_dir=data_dir, limit=limit, shuffle_files=shuffle_files, seed=seed,
                      input_context=input_context, in_order=in_order)


# --------------------------------------------------------------------------
# Reading chosen examples.


@dataclasses.dataclass(frozen=True, eq=False)
class SplitReader:
    """An opened split that reads chosen examples, by index, in its test-time view.

    tfds splits are streamed: `read` goes through the split up to the last
    index asked for, decoding only the examples asked for, so no split has to
    fit in memory. Fashion-MNIST's IDX files (gzip: no random access; 47 MB
    of uint8 at most) and the in-memory mocks are held as uint8 arrays and
    indexed. Either way an example's index is its position in the split:
    for tfds, in its files' order (`split[k:k+1]`), read file after file, so
    that it does not depend on how far a run reads.

    Attributes:
      name: dataset name.
      split: "train" or "test".
      num_examples: examples in the split.
      data_dir, mock: as given to `open_reader`.
      images, labels: the uint8 images and int64 labels of a split held as
        arrays; None for a streamed one.
    """

    name: str
    split: str
    num_examples: int
    data_dir: Optional[str] = None
    mock: bool = False
    images: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)
    labels: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)

    def read(self, indices: Sequence[int]) -> tf.data.Dataset:
        """The examples at `indices`, in that order: (int64 index, float32 image in [0, 1], int64 label).

        Args:
          indices: increasing example indices in [0, num_examples).

        Raises:
          ValueError: `indices` not increasing or out of range.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices[0] < 0 or indices[-1] >= self.num_examples or np.any(np.diff(indices) <= 0)):
            shown = ", ".join(map(str, indices[:10].tolist())) + (", ..." if len(indices) > 10 else "")
            raise ValueError(f"indices must increase within [0, {self.num_examples}), got [{shown}]")
        info = get_dataset_info(self.name)
        if self.images is not None or not len(indices):
            images = (self.images[indices] if self.images is not None
                      else np.zeros((0, *info.input_shape), np.uint8))
            labels = self.labels[indices] if self.labels is not None else np.zeros(0, np.int64)
            ds = tf.data.Dataset.from_tensor_slices((indices, images, labels))
        else:
            stop = int(indices[-1]) + 1
            selected = np.zeros(stop, dtype=bool)
            selected[indices] = True
            selected = tf.constant(selected)
            view = evaluation_view(self.name)
            # In order: example k is the split's k-th whatever `stop` is, so a
            # resumed or sharded run's idx name the same images.
            ds = encoded_stream(self.name, self.split, data_dir=self.data_dir, limit=stop, mock=self.mock,
                                in_order=True)
            # Filtered before decoding: the examples skipped are read, not decoded.
            ds = ds.enumerate().filter(lambda i, example: tf.gather(selected, i))
            ds = ds.map(lambda i, example: (i, tf.ensure_shape(view(example[0]), info.input_shape), example[1]),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.map(lambda i, image, label: (i, tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int64)))
        return ds.prefetch(tf.data.AUTOTUNE)

    def arrays(self, indices: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """The examples at `indices` as arrays: float32 images in [0, 1] [K, H, W, C] and int64 labels [K]."""
        info = get_dataset_info(self.name)
        images, labels = [np.zeros((0, *info.input_shape), np.float32)], [np.zeros(0, np.int64)]
        for _, x, y in self.read(indices).batch(256).as_numpy_iterator():
            images.append(x)
            labels.append(y)
        return np.concatenate(images), np.concatenate(labels)


def open_reader(name: str, split: str, *, data_dir: Optional[str] = None, mock: bool = False) -> SplitReader:
    """Opens a split for reading examples by index (`SplitReader`): checks it exists and counts it.

    Args:
      name: dataset name (see DATASETS).
      split: "train" or "test".
      data_dir: IDX directory (Fashion-MNIST) or tfds data directory.
      mock: random data of the right shapes instead of the dataset, as
        `load_uint8(mock=True)` gives it (`MOCK_EXAMPLES[split]` examples).

    Raises:
      ConfigError: unknown dataset or split, missing or corrupt data, or a
        split whose size tfds does not know.
    """
    info = get_dataset_info(name)
    check_split(split)
    arrays = None
    if mock and name not in STREAMED:
        arrays = _mock_arrays(info, split, MOCK_EXAMPLES[split])
    elif name == "fashion_mnist" and not mock:
        directory = _idx_directory(data_dir)
        if directory is not None:
            arrays = _load_idx_split(directory, split)
    if arrays is not None:
        return SplitReader(name, split, len(arrays[0]), data_dir, mock, *arrays)
    num_examples = int(encoded_stream(name, split, data_dir=data_dir, mock=mock).cardinality())
    if num_examples < 0:
        raise ConfigError(f"--dataset={name} ({split}): its size is unknown; rebuild it with tfds")
    if num_examples == 0:
        raise ConfigError(f"--dataset={name} ({split}) in {_tfds_root(data_dir)} holds no examples")
    return SplitReader(name, split, num_examples, data_dir, mock)
