"""Input pipelines: order, shuffling, augmentation by epoch, replicas; on tfds mock data and synthetic images."""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized

from tf_consreg import data
from tf_consreg.errors import ConfigError


def _mock(num_examples=20):
    return tfds.testing.mock_data(num_examples=num_examples)


def _batches(dataset):
    xs, ys = [], []
    for x, y in dataset:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return xs, ys


class MakeDatasetTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(4)
        self.images = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
        self.labels = np.arange(50, dtype=np.int64)

    def test_evaluation_order_and_values(self):
        xs, ys = _batches(data.make_dataset(self.images, self.labels, 16, shuffle=False))
        self.assertEqual([len(y) for y in ys], [16, 16, 16, 2])
        self.assertAllEqual(np.concatenate(ys), self.labels)
        self.assertEqual(xs[0].dtype, np.float32)
        self.assertAllClose(np.concatenate(xs), self.images / 255.0)

    def test_shuffle_is_a_permutation_reproducible_and_new_each_epoch(self):
        ds = data.make_dataset(self.images, self.labels, 16, shuffle=True, seed=7, drop_remainder=True)
        epoch1 = np.concatenate(_batches(ds)[1])
        epoch2 = np.concatenate(_batches(ds)[1])
        self.assertLen(epoch1, 48)
        self.assertLen(set(epoch1), 48)
        self.assertNotAllEqual(epoch1, epoch2)
        again = data.make_dataset(self.images, self.labels, 16, shuffle=True, seed=7, drop_remainder=True)
        self.assertAllEqual(epoch1, np.concatenate(_batches(again)[1]))

    def test_cifar_augmentation_crops_each_image_and_redraws_each_epoch(self):
        ds = data.make_dataset(self.images, self.labels, 10, shuffle=False, seed=1, augment="cifar10")
        first, _ = _batches(ds)
        second, _ = _batches(ds)
        first, second = np.concatenate(first), np.concatenate(second)
        padded = np.pad(self.images, ((0, 0), (4, 4), (4, 4), (0, 0)))
        for k in (0, 17, 49):
            crops = [padded[k, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
            crops += [c[:, ::-1] for c in crops]
            self.assertTrue(any(np.array_equal(np.round(first[k] * 255).astype(np.uint8), c) for c in crops))
        self.assertNotAllClose(first, second)

    def test_each_epoch_is_drawn_from_seed_and_epoch_alone(self):
        # A run resumed at epoch e builds its input with epochs=range(e, ...):
        # it must get, bit for bit, the batches (order and CIFAR crops and
        # flips) that the uninterrupted run's input gives in epoch e.
        def epochs(first, end, **kwargs):
            xs, ys = _batches(data.make_epoch_dataset(self.images, self.labels, 16, range(first, end), shuffle=True,
                                                      seed=7, augment="cifar10", **kwargs))
            return xs, ys

        xs, ys = epochs(0, 3)
        self.assertEqual([len(y) for y in ys], [16, 16, 16, 2] * 3)  # No batch spans two epochs.
        per_epoch = [np.concatenate(ys[4 * e:4 * e + 4]) for e in range(3)]
        for order in per_epoch:
            self.assertCountEqual(order, self.labels)
        self.assertNotAllEqual(per_epoch[0], per_epoch[1])
        self.assertNotAllEqual(per_epoch[1], per_epoch[2])
        for first in (1, 2):
            resumed_xs, resumed_ys = epochs(first, 3)
            self.assertLen(resumed_ys, 4 * (3 - first))
            for a, b in zip(resumed_xs + resumed_ys, xs[4 * first:] + ys[4 * first:]):
                self.assertAllEqual(a, b)
        # The crops differ between epochs: image k in epoch 0 against epoch 1.
        positions = [{label: i for i, label in enumerate(order)} for order in per_epoch]
        epoch_images = [np.concatenate(xs[4 * e:4 * e + 4]) for e in range(2)]
        differs = [not np.array_equal(epoch_images[0][positions[0][k]], epoch_images[1][positions[1][k]])
                   for k in range(50)]
        self.assertGreater(sum(differs), 40)  # Equal only where both epochs drew the same crop and flip (1/162).
        # The same epochs from another seed are another order.
        other = _batches(data.make_epoch_dataset(self.images, self.labels, 16, range(0, 1), shuffle=True, seed=8))
        self.assertNotAllEqual(np.concatenate(other[1]), per_epoch[0])
        with self.assertRaisesRegex(ValueError, "non-empty range"):
            data.make_epoch_dataset(self.images, self.labels, 16, range(2, 2), shuffle=True, seed=7)

    def test_epochs_and_repeat_cannot_be_asked_together(self):
        # make_dataset once took both and let `epochs` silently override
        # `repeat`; now each builder takes only its own.
        with self.assertRaisesRegex(TypeError, "unexpected keyword argument 'epochs'"):
            data.make_dataset(self.images, self.labels, 16, shuffle=True, seed=7, repeat=True, epochs=range(0, 2))
        with self.assertRaisesRegex(TypeError, "unexpected keyword argument 'repeat'"):
            data.make_epoch_dataset(self.images, self.labels, 16, range(0, 2), shuffle=True, seed=7, repeat=True)
        # repeat=True is endless: more batches than one pass holds.
        endless = data.make_dataset(self.images, self.labels, 16, shuffle=True, seed=7, repeat=True)
        self.assertLen(list(endless.take(10)), 10)  # One pass of 50 images holds 4 batches.

    def test_epochs_over_replicas_split_each_global_batch_in_order(self):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                                  cross_device_ops=tf.distribute.ReductionToOneDevice())
        source = data.Source("cifar10", "train", 50, images=self.images, labels=self.labels)
        plain = source.make_input(16, training=True, seed=3, drop_remainder=True, epochs=range(1, 3))
        distributed = source.make_input(16, training=True, seed=3, drop_remainder=True, epochs=range(1, 3),
                                        strategy=strategy)
        expected = _batches(plain.dataset)[1]
        self.assertLen(expected, 2 * plain.steps_per_epoch)
        iterator = iter(distributed.dataset)
        for e in expected:
            local = strategy.experimental_local_results(next(iterator)[1])
            self.assertAllEqual(np.concatenate([part.numpy() for part in local]), e)

    def test_mnist_has_no_augmentation_and_unknown_is_refused(self):
        images = self.images[:, :28, :28, :1]
        xs, _ = _batches(data.make_dataset(images, self.labels, 50, shuffle=False, augment="mnist"))
        self.assertAllClose(xs[0], images / 255.0)
        with self.assertRaisesRegex(ConfigError, "augment='imagenet2012': no in-memory training augmentation"):
            data.make_dataset(self.images, self.labels, 10, shuffle=False, augment="imagenet2012")


class MakeInputTest(tf.test.TestCase, parameterized.TestCase):

    def test_cifar10_training_and_test_pipelines(self):
        with _mock(40):
            train = data.make_input("cifar10", "train", 16, training=True, seed=0, drop_remainder=True)
            test = data.make_input("cifar10", "test", 16, training=False)
            raw, raw_labels = data.load_uint8("cifar10", "test")
        self.assertEqual((train.num_examples, train.steps_per_epoch), (40, 2))
        self.assertEqual((test.num_examples, test.steps_per_epoch), (40, 3))
        xs, _ = _batches(train.dataset)
        self.assertEqual([x.shape for x in xs], [(16, 32, 32, 3)] * 2)
        xs, ys = _batches(test.dataset)
        self.assertAllClose(np.concatenate(xs), raw / 255.0)  # The test view is the image itself.
        self.assertAllEqual(np.concatenate(ys), raw_labels)

    def test_imagenet_streams_under_mock_data(self):
        with _mock(10):
            train = data.make_input("imagenet2012", "train", 4, training=True, seed=0)
            test = data.make_input("imagenet2012", "test", 4, training=False, limit=6)
            xs, ys = _batches(train.dataset)
            self.assertEqual(train.num_examples, 10)
            self.assertEqual([x.shape[0] for x in xs], [4, 4, 2])
            self.assertEqual(xs[0].shape[1:], (224, 224, 3))
            self.assertEqual((xs[0].dtype, ys[0].dtype), (np.float32, np.int64))
            self.assertTrue(0.0 <= xs[0].min() and xs[0].max() <= 1.0)
            xs, _ = _batches(test.dataset)
            self.assertEqual(test.num_examples, 6)
            self.assertEqual(sum(len(x) for x in xs), 6)

    def test_streamed_epochs_are_drawn_from_seed_and_epoch_alone(self):
        source = data.open_source("imagenet2012", "train", limit=6, mock=True)
        run = _batches(source.make_input(4, training=True, seed=5, epochs=range(0, 2)).dataset)
        resumed = _batches(source.make_input(4, training=True, seed=5, epochs=range(1, 2)).dataset)
        self.assertEqual([len(y) for y in run[1]], [4, 2, 4, 2])
        for a, b in zip(resumed[0] + resumed[1], run[0][2:] + run[1][2:]):
            self.assertAllEqual(a, b)
        self.assertCountEqual(np.concatenate(run[1][:2]), np.concatenate(run[1][2:]))

    def test_mock_needs_no_data(self):
        for name, shape in (("cifar10", (32, 32, 3)), ("imagenet2012", (224, 224, 3)), ("mnist", (28, 28, 1))):
            pipeline = data.make_input(name, "train", 8, training=True, seed=0, limit=16, mock=True,
                                       data_dir="/nonexistent")
            xs, ys = _batches(pipeline.dataset)
            self.assertEqual((pipeline.num_examples, len(xs)), (16, 2))
            self.assertEqual(xs[0].shape, (8, *shape))

    def test_open_once_then_build_pipelines_with_other_seeds(self):
        source = data.open_source("cifar10", "train", limit=32, mock=True)
        self.assertEqual((source.num_examples, source.images.shape), (32, (32, 32, 32, 3)))
        first = np.concatenate(_batches(source.make_input(8, training=True, seed=1).dataset)[1])
        again = np.concatenate(_batches(source.make_input(8, training=True, seed=1).dataset)[1])
        other = np.concatenate(_batches(source.make_input(8, training=True, seed=2).dataset)[1])
        self.assertAllEqual(first, again)
        self.assertNotAllEqual(first, other)
        self.assertCountEqual(first, other)
        streamed = data.open_source("imagenet2012", "test", limit=4, mock=True)
        self.assertEqual(streamed.num_examples, 4)
        self.assertIsNone(streamed.images)

    def test_per_replica_batches_split_each_global_batch_in_order(self):
        # conftest.py gives two logical CPUs.
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                                  cross_device_ops=tf.distribute.ReductionToOneDevice())
        plain = data.make_input("cifar10", "test", 8, training=False, limit=40, mock=True, drop_remainder=True)
        distributed = data.make_input("cifar10", "test", 8, training=False, limit=40, mock=True,
                                      drop_remainder=True, strategy=strategy)
        self.assertEqual(distributed.steps_per_epoch, 5)
        expected = _batches(plain.dataset)[1]
        got = []
        iterator = iter(distributed.dataset)
        for _ in range(2 * distributed.steps_per_epoch):  # It repeats: two passes.
            local = strategy.experimental_local_results(next(iterator)[1])
            self.assertEqual([len(part) for part in local], [4, 4])
            got.append(np.concatenate([part.numpy() for part in local]))
        for g, e in zip(got, expected + expected):
            self.assertAllEqual(g, e)
        with self.assertRaisesRegex(ConfigError, "--batch_size: 7 images per step do not split evenly over 2"):
            data.make_input("cifar10", "train", 7, training=True, mock=True, strategy=strategy)

    def test_fit_consumes_a_distributed_input(self):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                                  cross_device_ops=tf.distribute.ReductionToOneDevice())
        pipeline = data.make_input("mnist", "train", 16, training=True, seed=0, limit=64, mock=True,
                                   drop_remainder=True, strategy=strategy)
        with strategy.scope():
            model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(pipeline.dataset, epochs=2, steps_per_epoch=pipeline.steps_per_epoch,
                            shuffle=False, verbose=0)
        self.assertLen(history.history["loss"], 2)
        self.assertEqual(int(model.optimizer.iterations.numpy()), 2 * 4)


if __name__ == "__main__":
    tf.test.main()
