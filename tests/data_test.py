"""Datasets and input pipelines, on tfds mock data and small synthetic images.

tfds cannot download here, so every tfds path runs under
`tfds.testing.mock_data` or on a tiny ImageNet built from fake archives.
Augmentations are checked against their definitions (torchvision's
RandomCrop/RandomResizedCrop/Resize/CenterCrop, with PIL as the resizing
reference) and with scipy's tests for their randomness.
"""

import io
import os
import tarfile
import tempfile

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized
from PIL import Image

from tf_consreg import data
from tf_consreg.errors import ConfigError


def _mock(num_examples=20):
    return tfds.testing.mock_data(num_examples=num_examples)


class LoadTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(("mnist", "train", (28, 28, 1)), ("mnist", "test", (28, 28, 1)),
                              ("cifar10", "train", (32, 32, 3)), ("cifar10", "test", (32, 32, 3)))
    def test_tfds_arrays_under_mock_data(self, name, split, shape):
        with _mock(20):
            images, labels = data.load_uint8(name, split)
            limited, _ = data.load_uint8(name, split, limit=7)
            floats, _ = data.load_arrays(name, split, limit=7)
        self.assertEqual(images.shape, (20, *shape))
        self.assertEqual((images.dtype, labels.dtype), (np.uint8, np.int64))
        self.assertTrue(np.all((labels >= 0) & (labels < 10)))
        self.assertEqual(limited.shape, (7, *shape))
        self.assertAllEqual(limited, images[:7])
        self.assertAllClose(floats, images[:7] / 255.0)

    def test_imagenet_arrays_are_the_test_view_and_bounded(self):
        with _mock(6):
            images, labels = data.load_uint8("imagenet2012", "test", limit=6)
            self.assertEqual(images.shape, (6, 224, 224, 3))
            self.assertTrue(np.all((labels >= 0) & (labels < 1000)))
            with self.assertRaisesRegex(ConfigError, "imagenet2012 is too large to hold in memory: ask for at most "
                                                     "10000 train images"):
                data.load_uint8("imagenet2012", "train")
            with self.assertRaisesRegex(ConfigError, "at most 10000"):
                data.load_uint8("imagenet2012", "test", limit=10001)

    def test_missing_tfds_dataset_says_how_to_get_it(self):
        with tempfile.TemporaryDirectory() as empty:
            with self.assertRaises(ConfigError) as e:
                data.load_uint8("cifar10", "train", data_dir=empty)
        message = str(e.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"--dataset=cifar10 (train) not found in {empty}", message)
        self.assertIn("`tfds build cifar10 --data_dir=DIR`", message)

    def test_missing_imagenet_names_the_archives_and_where_they_go(self):
        with tempfile.TemporaryDirectory() as empty:
            for call in (lambda: data.make_input("imagenet2012", "train", 8, training=True, data_dir=empty),
                         lambda: data.load_uint8("imagenet2012", "test", data_dir=empty, limit=10)):
                with self.assertRaises(ConfigError) as e:
                    call()
                message = str(e.exception)
                self.assertNotIn("\n", message)
                self.assertIn(f"{empty}/downloads/manual", message)
                self.assertIn("ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar", message)
                self.assertIn("https://image-net.org/download-images", message)
            self.assertEqual(os.listdir(empty), [])  # Nothing written.

    def test_bad_names(self):
        with self.assertRaisesRegex(ConfigError, "--dataset='svhn' is unknown; choose one of .*imagenet2012"):
            data.load_uint8("svhn", "train")
        with self.assertRaisesRegex(ConfigError, "--split='validation' is unknown"):
            data.load_uint8("cifar10", "validation", mock=True)
        with self.assertRaisesRegex(ConfigError, "--batch_size must be >= 1"):
            data.make_input("cifar10", "train", 0, training=True, mock=True)

    @parameterized.parameters("fashion_mnist", "mnist", "cifar10", "imagenet2012")
    def test_mock_arrays_have_the_right_shapes_and_repeat(self, name):
        info = data.get_dataset_info(name)
        images, labels = data.load_uint8(name, "test", limit=5, mock=True)
        again, _ = data.load_uint8(name, "test", limit=5, mock=True)
        self.assertEqual(images.shape, (5, *info.input_shape))
        self.assertEqual((images.dtype, labels.dtype), (np.uint8, np.int64))
        self.assertTrue(np.all(labels < info.num_classes))
        self.assertAllEqual(images, again)
        self.assertLen(data.load_uint8(name, "train", mock=True)[0], data.MOCK_EXAMPLES["train"])


class RandomCropFlipTest(tf.test.TestCase):
    """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, per image."""

    def test_every_output_is_a_padded_crop_or_its_mirror_with_uniform_draws(self):
        n = 900
        images = np.random.default_rng(0).integers(1, 256, (n, 32, 32, 3), dtype=np.uint8)
        out = data.random_crop_flip(tf.constant(images), tf.constant([3, 4])).numpy()
        padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
        rows, cols, flips = [], [], []
        for k in range(n):
            found = [(i, j, f) for i in range(9) for j in range(9) for f in (0, 1)
                     if np.array_equal(out[k], (lambda c: c[:, ::-1] if f else c)(padded[k, i:i + 32, j:j + 32]))]
            self.assertLen(found, 1, f"image {k} is not a crop of its padded original")
            rows.append(found[0][0])
            cols.append(found[0][1])
            flips.append(found[0][2])
        # Offsets uniform on {0, ..., 8} (chi-square), flips Binomial(n, 1/2).
        for offsets in (rows, cols):
            self.assertGreater(scipy.stats.chisquare(np.bincount(offsets, minlength=9)).pvalue, 1e-4)
        self.assertGreater(scipy.stats.binomtest(sum(flips), n, 0.5).pvalue, 1e-4)

    def test_stateless_given_the_seed(self):
        images = tf.constant(np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
        first = data.random_crop_flip(images, tf.constant([5, 6]))
        self.assertAllEqual(first, data.random_crop_flip(images, tf.constant([5, 6])))
        self.assertNotAllEqual(first, data.random_crop_flip(images, tf.constant([5, 7])))


def _encode(image, fmt="jpeg"):
    if fmt == "jpeg":
        return tf.io.encode_jpeg(image, quality=95)
    return tf.io.encode_png(image)


def _smooth_image(height, width, seed=0):
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 64 * 4], -1)
    noise = np.random.default_rng(seed).normal(0, 8, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


class ImagenetViewsTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters((300, 400), (400, 300), (256, 300), (500, 333), (100, 150))
    def test_test_view_matches_torchvision_resize_and_center_crop(self, height, width):
        image = _smooth_image(height, width)
        ours = data.resize_center_crop(tf.constant(image)).numpy().astype(int)
        # torchvision: Resize(256) keeps the ratio with int() on the long side
        # (PIL bilinear), CenterCrop(224) offsets int(round((side - 224) / 2)).
        if width <= height:
            new_w, new_h = 256, int(256 * height / width)
        else:
            new_h, new_w = 256, int(256 * width / height)
        pil = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)).astype(int)
        top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
        reference = pil[top:top + 224, left:left + 224]
        self.assertEqual(ours.shape, (224, 224, 3))
        self.assertLessEqual(np.abs(ours - reference).max(), 1)  # PIL rounds in fixed point.
        self.assertLess(np.abs(ours - reference).mean(), 0.3)

    def test_crop_window_bounds_and_ranges(self):
        height, width = 300, 400
        windows = np.stack([data.random_resized_crop_window(height, width, tf.constant([s, 0])).numpy()
                            for s in range(400)])
        top, left, h, w = windows.T
        self.assertTrue(np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)))
        self.assertTrue(np.all((h > 0) & (w > 0)))
        area = h * w / (height * width)
        # Rounding each side to a pixel moves the area and ratio a little.
        self.assertTrue(np.all((area > 0.08 * 0.97) & (area <= 1.0)))
        self.assertTrue(np.all((w / h > 0.75 * 0.97) & (w / h < 4 / 3 * 1.03)))
        self.assertGreater(len({tuple(x) for x in windows}), 390)  # Draws differ across seeds.
        self.assertLess(area.min(), 0.15)
        self.assertGreater(area.max(), 0.85)

    @parameterized.parameters(((10, 1000), (0, 493, 10, 13)), ((1000, 10), (493, 0, 13, 10)))
    def test_crop_window_fallback(self, size, expected):
        # No draw fits a 10-pixel side (an area >= 800 at a ratio within
        # [3/4, 4/3] needs sides >= 24). torchvision then takes the whole image
        # cut to the nearest ratio bound, centered: 10x1000 (ratio 100) gives
        # h = 10, w = round(10 * 4/3) = 13, left = (1000 - 13) // 2 = 493;
        # 1000x10 (ratio 0.01) gives w = 10, h = round(10 / (3/4)) = 13, top = 493.
        height, width = size
        window = data.random_resized_crop_window(height, width, tf.constant([1, 2])).numpy()
        self.assertEqual(tuple(window), expected)

    @parameterized.parameters("jpeg", "png")
    def test_training_view_is_a_resized_crop_or_its_mirror(self, fmt):
        image = _smooth_image(120, 160, seed=2)
        encoded = _encode(image, fmt)
        decoded = tf.io.decode_image(encoded, channels=3).numpy()  # JPEG is lossy: compare with what it decodes to.
        for s in range(5):
            seed = tf.constant([s, 9], tf.int64)
            out = data.random_resized_crop(encoded, seed).numpy().astype(int)
            self.assertEqual(out.shape, (224, 224, 3))
            # The window random_resized_crop draws: its first split seed (see there).
            window_seed = tf.random.experimental.stateless_split(seed, 2)[0]
            top, left, h, w = data.random_resized_crop_window(120, 160, window_seed).numpy()
            crop = decoded[top:top + h, left:left + w]
            reference = np.asarray(Image.fromarray(crop).resize((224, 224), Image.BILINEAR)).astype(int)
            diff = min(np.abs(out - reference).mean(), np.abs(out - reference[:, ::-1]).mean())
            # decode_and_crop_jpeg may differ from decode-then-crop by a level
            # or two at block edges; the resize itself agrees with PIL to 1.
            self.assertLess(diff, 1.5)

    def test_flip_rate_is_one_half(self):
        image = _smooth_image(64, 64, seed=3)
        encoded = _encode(image, "png")
        flips = 0
        n = 200
        for s in range(n):
            out = data.random_resized_crop(encoded, tf.constant([s, 1]), size=16).numpy().astype(int)
            # Column 0 of the image is dark in the red channel (x * 255 / width).
            flips += int(out[:, 0, 0].mean() > out[:, -1, 0].mean())
        self.assertGreater(scipy.stats.binomtest(flips, n, 0.5).pvalue, 1e-4)


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
            xs, ys = _batches(data.make_dataset(self.images, self.labels, 16, shuffle=True, seed=7,
                                                augment="cifar10", epochs=range(first, end), **kwargs))
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
        other = _batches(data.make_dataset(self.images, self.labels, 16, shuffle=True, seed=8, epochs=range(0, 1)))
        self.assertNotAllEqual(np.concatenate(other[1]), per_epoch[0])
        with self.assertRaisesRegex(ValueError, "non-empty range"):
            data.make_dataset(self.images, self.labels, 16, shuffle=True, seed=7, epochs=range(2, 2))

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


def _jpeg_bytes(seed, height, width):
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return tf.io.encode_jpeg(image).numpy()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


class ImagenetPrepareTest(tf.test.TestCase):
    """From the two archives in <data_dir>/downloads/manual to batches, offline."""

    def test_prepares_from_manual_archives_then_streams(self):
        pytest.importorskip("importlib_resources", reason="tfds needs it to prepare a dataset")
        synsets = data.get_dataset_info("imagenet2012").class_names[:2]
        with tempfile.TemporaryDirectory() as root:
            manual = os.path.join(root, "downloads", "manual")
            os.makedirs(manual)
            # The train archive holds one tar per WordNet id; the validation archive the images.
            with tarfile.open(os.path.join(manual, "ILSVRC2012_img_train.tar"), "w") as outer:
                for s, synset in enumerate(synsets):
                    inner_bytes = io.BytesIO()
                    with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                        for k in range(3):
                            _add(inner, f"{synset}_{k}.JPEG", _jpeg_bytes(10 * s + k, 40 + k, 50))
                    _add(outer, f"{synset}.tar", inner_bytes.getvalue())
            with tarfile.open(os.path.join(manual, "ILSVRC2012_img_val.tar"), "w") as val:
                for k in range(1, 5):
                    _add(val, f"ILSVRC2012_val_{k:08d}.JPEG", _jpeg_bytes(100 + k, 30, 60))

            train = data.make_input("imagenet2012", "train", 2, training=True, data_dir=root, seed=0)
            self.assertEqual((train.num_examples, train.steps_per_epoch), (6, 3))
            xs, ys = _batches(train.dataset)
            self.assertEqual(xs[0].shape, (2, 224, 224, 3))
            self.assertCountEqual(np.concatenate(ys), [0, 0, 0, 1, 1, 1])
            images, labels = data.load_uint8("imagenet2012", "test", data_dir=root, limit=100)
            self.assertEqual(images.shape, (4, 224, 224, 3))
            self.assertEqual(labels.dtype, np.int64)


class HoldoutSplitTest(tf.test.TestCase, parameterized.TestCase):

    def test_holds_out_the_last_examples(self):
        images, labels = np.arange(10) * 10, np.arange(10)
        train_x, train_y, val_x, val_y = data.holdout_split(images, labels, 3)
        self.assertAllEqual(train_y, np.arange(7))
        self.assertAllEqual(val_y, [7, 8, 9])
        self.assertAllEqual(val_x, [70, 80, 90])
        # The held-out examples do not depend on how many are trained on.
        _, train_y, _, val_y = data.holdout_split(images, labels, 3, train_examples=4)
        self.assertAllEqual(train_y, np.arange(4))
        self.assertAllEqual(val_y, [7, 8, 9])

    @parameterized.named_parameters(
        ("zero", 0, 0, "--certify_examples must be >= 1"),
        ("larger", 11, 0, "--certify_examples=11 is larger than the training split \\(10 images\\)"),
        ("all", 10, 0, "leaving nothing to train on"),
        ("train_examples", 3, 8, "--train_examples=8 with --certify_examples=3: .* at most 7"),
    )
    def test_refuses(self, num, train_examples, message):
        with self.assertRaisesRegex(ConfigError, message):
            data.holdout_split(np.zeros(10), np.zeros(10), num, train_examples=train_examples)
