"""Dataset sources: tfds splits under mock data, a tiny ImageNet from fake archives, reading by index.

tfds cannot download here, so every tfds path runs under
`tfds.testing.mock_data` or on a tiny ImageNet built from fake archives.
"""

import gzip
import io
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized

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


class NamesTest(tf.test.TestCase):

    def test_every_dataset_has_an_info_and_the_names_need_no_tensorflow(self):
        for name in data.DATASETS:
            self.assertEqual(data.get_dataset_info(name).name, name)
        # The flags' help texts import the names: that must not load TensorFlow.
        code = ("import sys; from tf_consreg.data import DATASETS, SPLITS, STREAMED; "
                "print(DATASETS, SPLITS, STREAMED, 'tensorflow' in sys.modules)")
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True,
                                timeout=300)
        self.assertEqual(result.stdout.split()[-1], "False")


class SplitReaderTest(tf.test.TestCase, parameterized.TestCase):
    """`open_reader`: chosen examples, by index, as the whole-split loaders give them."""

    def test_fashion_mnist_by_index_is_what_the_files_and_load_arrays_hold(self):
        reader = data.open_reader("fashion_mnist", "test")
        self.assertEqual(reader.num_examples, 10000)
        indices = [0, 1, 7, 500, 9998, 9999]
        images, labels = reader.arrays(indices)
        # Independently of the loader: the Debian IDX files, read with numpy.
        with gzip.open(os.path.join(data.DEBIAN_FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
            raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(10000, 28, 28, 1)
        with gzip.open(os.path.join(data.DEBIAN_FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
            raw_labels = np.frombuffer(f.read(), np.uint8, offset=8)
        self.assertEqual((images.dtype, labels.dtype), (np.float32, np.int64))
        self.assertAllEqual(labels, raw_labels[indices])
        # Bit for bit what load_arrays gave certification before (correctly
        # rounded float32 division, in numpy or in TensorFlow).
        self.assertAllEqual(images, raw[indices].astype(np.float32) / np.float32(255))
        whole, whole_labels = data.load_arrays("fashion_mnist", "test")
        self.assertAllEqual(images, whole[indices])
        self.assertAllEqual(labels, whole_labels[indices])
        ids = [int(i) for i, _, _ in reader.read(indices).as_numpy_iterator()]
        self.assertEqual(ids, indices)

    @parameterized.parameters("mnist", "cifar10", "imagenet2012")
    def test_tfds_splits_stream_the_chosen_examples_in_order(self, name):
        with _mock(12):
            reader = data.open_reader(name, "test")
            self.assertEqual(reader.num_examples, 12)
            self.assertIsNone(reader.images)  # Streamed, not loaded.
            indices = [1, 4, 5, 11]
            read = list(reader.read(indices).as_numpy_iterator())
            # The whole split in the test view (ImageNet: resize 256, crop 224).
            whole, whole_labels = data.load_arrays(name, "test", limit=12)
            # Independently of our loaders: tfds' own decoding of the same split, for the labels.
            tfds_split = "validation" if name == "imagenet2012" else "test"
            tfds_labels = [int(y) for _, y in tfds.load(name, split=tfds_split, as_supervised=True)]
        self.assertEqual([int(i) for i, _, _ in read], indices)
        self.assertEqual([int(y) for _, _, y in read], [tfds_labels[i] for i in indices])
        self.assertAllEqual(np.stack([x for _, x, _ in read]), whole[indices])
        self.assertEqual(read[0][1].shape, data.get_dataset_info(name).input_shape)

    @parameterized.parameters("fashion_mnist", "mnist", "cifar10", "imagenet2012")
    def test_mock_data_is_load_uint8s_mock(self, name):
        reader = data.open_reader(name, "test", mock=True, data_dir="/nonexistent")
        self.assertEqual(reader.num_examples, data.MOCK_EXAMPLES["test"])
        indices = [0, 3, 255]
        images, labels = reader.arrays(indices)
        whole, whole_labels = data.load_arrays(name, "test", mock=True)
        self.assertAllEqual(images, whole[indices])
        self.assertAllEqual(labels, whole_labels[indices])

    def test_empty_and_bad_indices(self):
        reader = data.open_reader("imagenet2012", "test", mock=True)
        images, labels = reader.arrays([])
        self.assertEqual((images.shape, labels.shape), ((0, 224, 224, 3), (0,)))
        for bad in ([3, 2], [1, 1], [-1], [256]):
            with self.assertRaisesRegex(ValueError, r"indices must increase within \[0, 256\)"):
                reader.read(bad)

    def test_missing_data_is_one_line_before_reading(self):
        with tempfile.TemporaryDirectory() as empty:
            with self.assertRaisesRegex(ConfigError, f"^--dataset=cifar10 \\(test\\) not found in {empty}"):
                data.open_reader("cifar10", "test", data_dir=empty)
            with self.assertRaisesRegex(ConfigError, f"{empty}/downloads/manual/ILSVRC2012_img_val.tar is missing"):
                data.open_reader("imagenet2012", "test", data_dir=empty)
            with self.assertRaisesRegex(ConfigError, "--split='validation' is unknown"):
                data.open_reader("cifar10", "validation", data_dir=empty)
            self.assertEqual(os.listdir(empty), [])


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
            xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in train.dataset])
            self.assertEqual(xs[0].shape, (2, 224, 224, 3))
            self.assertCountEqual(np.concatenate(ys), [0, 0, 0, 1, 1, 1])
            images, labels = data.load_uint8("imagenet2012", "test", data_dir=root, limit=100)
            self.assertEqual(images.shape, (4, 224, 224, 3))
            self.assertEqual(labels.dtype, np.int64)
            # By index: example k is tfds' split[k:k+1] (its files' order), decoded
            # here by tfds itself and put through the test view.
            reader = data.open_reader("imagenet2012", "test", data_dir=root)
            self.assertEqual(reader.num_examples, 4)
            ids, read_images, _ = zip(*reader.read([1, 3]).as_numpy_iterator())
            self.assertEqual(ids, (1, 3))
            for k, image in zip((1, 3), read_images):
                (single,) = tfds.load("imagenet2012", split=f"validation[{k}:{k + 1}]", data_dir=root,
                                      download=False)
                reference = data.resize_center_crop(single["image"]).numpy() / np.float32(255)
                self.assertAllEqual(image, reference)


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
