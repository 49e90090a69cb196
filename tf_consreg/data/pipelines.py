"""Input pipelines of training and evaluation: `tf.data` batches of float32 images in [0, 1].

`open_source` opens a split (checks it; loads it if it is held in memory)
before any work, and `Source.make_input` builds its training or evaluation
pipeline: augmentation (`augmentation`), batching and, under a
`tf.distribute` strategy, per-replica batching with
`distribute_datasets_from_function`. `make_input` does both in one call.

Random choices are stateless ops seeded from `tf.data.Dataset.random(seed,
rerandomize_each_iteration=True)`: a seeded pipeline is reproducible and
still draws new crops in every epoch. A training run's pipeline is built for
its epochs instead (`epochs=range(first, end)`; `make_epoch_dataset` for
arrays): then each epoch's order and augmentation are drawn from (seed,
epoch) alone, so a run resumed at epoch e trains on what the uninterrupted
run trained on, and each worker of a cluster, building epoch e on its own,
on what one process would.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

from tf_consreg import noise as noise_lib
from tf_consreg.data.names import STREAMED
from tf_consreg.data import augmentation
from tf_consreg.data import sources
from tf_consreg.errors import ConfigError

# Shuffle buffer of the streamed training set, in encoded JPEGs (about 110 kB each).
_STREAM_SHUFFLE_BUFFER = 10_000


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


def make_epoch_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, epochs: range, *, shuffle: bool,
                       seed: Optional[int] = None, drop_remainder: bool = False, augment: Optional[str] = None,
                       input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
    """The batches of a training run's `epochs` from arrays, one epoch after another, each from (seed, epoch) alone.

    Epoch e's order is a stateless permutation of this pipeline's examples
    keyed by (seed, e), and batch j of it is augmented with a stateless seed
    keyed by (seed, e, pipeline, j), so the batches of an epoch do not depend
    on the epochs before it or on the pipeline that drew them. Batches never
    span two epochs; they are gathered from the arrays, uint8, and converted
    to float once augmented. Pass the epoch's steps to `fit`
    (`steps_per_epoch`).

    Args:
      images, labels, batch_size, shuffle, drop_remainder, augment,
        input_context: as for `make_dataset`.
      epochs: range(first, end) of epoch numbers >= 0, not empty.
      seed: seed of every epoch's order and augmentation; None: a fresh
        random one (nondeterministic).

    Raises:
      ConfigError: `augment` names no dataset held in memory.
      ValueError: `epochs` is not a non-empty range.
    """
    augment_fn = None if augment is None else augmentation.batch_augmentation(augment)
    _check_epochs(epochs)
    seed = _epochs_seed(seed)
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
            if augment_fn is not None:
                batch = augment_fn(batch, tf.random.experimental.stateless_fold_in(key, j))
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
                 repeat: bool = False) -> tf.data.Dataset:
    """A batched `tf.data` pipeline of (float32 images in [0, 1], int64 labels) from arrays: one pass, or endless.

    The uint8 arrays stay in memory as they are (a quarter of float32);
    augmentation and the conversion to float run on whole batches. A
    training run's epochs are `make_epoch_dataset`'s.

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
      repeat: repeat endlessly (reshuffled, newly augmented each pass);
        False: one pass, reshuffled at each new iteration.

    Raises:
      ConfigError: `augment` names no dataset held in memory.
    """
    augment_fn = None if augment is None else augmentation.batch_augmentation(augment)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    # Unseeded shuffled pipelines may reorder for speed; evaluation keeps its order.
    return _batch_and_finish(ds, batch_size, drop_remainder=drop_remainder,
                             deterministic=seed is not None or not shuffle, input_context=input_context,
                             augment=augment_fn, seed=seed, repeat=repeat)


def _streamed_dataset(name: str, split: str, batch_size: int, *, training: bool, data_dir: Optional[str],
                      limit: Optional[int], seed: Optional[int], drop_remainder: bool, mock: bool,
                      input_context: Optional[tf.distribute.InputContext], repeat: bool) -> tf.data.Dataset:
    ds = sources.encoded_stream(name, split, data_dir=data_dir, limit=limit, mock=mock, shuffle_files=training,
                                seed=seed, input_context=input_context)
    if training:
        ds = ds.shuffle(_STREAM_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
        salt = 0 if input_context is None else input_context.input_pipeline_id
        ds = tf.data.Dataset.zip((ds, _random_seeds(seed, salt)))
        ds = ds.map(lambda xy, s: (augmentation.random_resized_crop(xy[0], s), xy[1]), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        view = sources.evaluation_view(name)
        ds = ds.map(lambda x, y: (view(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return _batch_and_finish(ds, batch_size, drop_remainder=drop_remainder,
                             deterministic=seed is not None or not training, input_context=input_context,
                             repeat=repeat)


def _streamed_epochs(name: str, split: str, batch_size: int, epochs: range, *, seed: int, **kwargs) -> tf.data.Dataset:
    """The training batches of `epochs` of a streamed dataset, one epoch after another.

    tfds shuffles its files by a Python seed, so the epochs are not drawn in
    one graph as `make_epoch_dataset` draws them: epoch e is a pipeline of its
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
            (see `make_epoch_dataset`). Pass `steps_per_epoch` to `fit`.

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
            arrays = dict(shuffle=training, seed=seed, drop_remainder=drop_remainder,
                          augment=self.name if training else None, input_context=context)
            if epochs is not None:
                return make_epoch_dataset(self.images, self.labels, local_batch, epochs, **arrays)
            return make_dataset(self.images, self.labels, local_batch, repeat=repeat, **arrays)

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
    sources.get_dataset_info(name)
    sources.check_split(split)
    limit = limit or None
    if name in STREAMED:
        # Opening the split checks that it exists and gives its size; the
        # pipelines open it again, sharded and shuffled as they need.
        stream = sources.encoded_stream(name, split, data_dir=data_dir, limit=limit, mock=mock)
        num_examples = int(stream.cardinality())
        if num_examples < 0:
            raise ConfigError(f"--dataset={name} ({split}): its size is unknown; rebuild it with tfds")
        return Source(name, split, num_examples, data_dir, limit, mock)
    images, labels = sources.load_uint8(name, split, data_dir=data_dir, limit=limit, mock=mock)
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
