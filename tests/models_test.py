"""The architecture registry and the CIFAR/ImageNet networks.

Parameter counts are checked against closed forms written from the papers'
layouts (and, for ResNet-50, torchvision's published 25,557,032), never
against the code under test. PyTorch counts parameters without BN's running
statistics, so the trainable weights are compared.
"""

import functools
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from tf_consreg import data
from tf_consreg import models
from tf_consreg import training
from tf_consreg.run_config import TrainConfig
from tf_consreg.errors import ConfigError
from tf_consreg.models import layers
from tf_consreg.models import legacy


def _bn(channels):
    return 2 * channels  # gamma, beta


def _cifar_resnet_params(depth, classes=10):
    """He et al.'s CIFAR ResNet with 1x1-conv + BN projections where the shape changes."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + _bn(16)
    width_in = 16
    for width in (16, 32, 64):
        for block in range(n):
            c_in = width_in if block == 0 else width
            total += 9 * c_in * width + _bn(width) + 9 * width * width + _bn(width)
            if c_in != width:
                total += c_in * width + _bn(width)
        width_in = width
    return total + 64 * classes + classes


def _densenet40_params(classes=10, k=12):
    """Stem conv 2k, 3 blocks x 6 bottleneck layers (BN, 1x1 -> 4k, BN, 3x3 -> k), no transition convs."""
    channels = 2 * k
    total = 3 * channels * 9
    for _ in range(3):
        for _ in range(6):
            total += _bn(channels) + channels * 4 * k + _bn(4 * k) + 9 * 4 * k * k
            channels += k
    return total + _bn(channels) + channels * classes + classes


def _resnet50_params(classes=1000):
    """torchvision's resnet50: bias-free convs, bottlenecks (3, 4, 6, 3), projections on each stage's first block."""
    total = 3 * 64 * 49 + _bn(64)
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            total += c_in * width + _bn(width) + 9 * width * width + _bn(width) + width * 4 * width + _bn(4 * width)
            if block == 0:
                total += c_in * 4 * width + _bn(4 * width)
            c_in = 4 * width
    return total + 2048 * classes + classes


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@functools.lru_cache(maxsize=None)
def _model(arch):
    dataset = {"resnet50": "imagenet2012"}.get(arch, "cifar10")
    keras.utils.set_random_seed(0)
    return models.get_architecture(arch, dataset)


CIFAR_ARCHS = ("cifar_resnet20", "cifar_resnet110", "cifar_densenet40")


class ParameterCountTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("resnet20", "cifar_resnet20", _cifar_resnet_params(20), 0.27e6),
        ("resnet110", "cifar_resnet110", _cifar_resnet_params(110), 1.7e6),
        ("densenet40", "cifar_densenet40", _densenet40_params(), None),
        ("resnet50", "resnet50", _resnet50_params(), 25.6e6),
    )
    def test_matches_closed_form_and_published(self, arch, expected, published):
        count = _trainable(_model(arch))
        self.assertEqual(count, expected)
        if published is not None:  # pytorch-classification's 0.27M / 1.7M, torchvision's 25.6M.
            self.assertAlmostEqual(count / published, 1.0, delta=0.025)

    def test_resnet50_is_torchvision_exactly(self):
        self.assertEqual(_trainable(_model("resnet50")), 25_557_032)

    def test_closed_forms_are_sane(self):
        # Option-A (parameter-free) shortcuts would give 0.27M - 2,752; the
        # projections are 16*32 + 2*32 + 32*64 + 2*64 weights.
        self.assertEqual(_cifar_resnet_params(20) - 2752, 269722)


class ForwardTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(*CIFAR_ARCHS, "resnet50")
    def test_logits_shape_dtype_and_finite(self, arch):
        model = _model(arch)
        info = data.get_dataset_info({"resnet50": "imagenet2012"}.get(arch, "cifar10"))
        batch = 1 if arch == "resnet50" else 3
        images = np.random.default_rng(0).random((batch, *info.input_shape), dtype=np.float32)
        logits = model(images, training=False)
        self.assertEqual(tuple(logits.shape), (batch, info.num_classes))
        self.assertEqual(logits.dtype, tf.float32)
        self.assertTrue(np.all(np.isfinite(logits.numpy())))
        self.assertEqual(tuple(model.input_shape[1:]), info.input_shape)

    @parameterized.parameters(*CIFAR_ARCHS, "resnet50")
    def test_first_layer_normalizes_with_dataset_statistics(self, arch):
        model = _model(arch)
        info = data.get_dataset_info({"resnet50": "imagenet2012"}.get(arch, "cifar10"))
        norm = model.layers[1]
        self.assertIs(type(norm), keras.layers.Normalization)
        self.assertEqual(norm.input_mean, list(info.mean))
        # variance = (float32 std)^2, so that its float32 square root is the float32 std (see NormalizationTest).
        self.assertEqual(norm.input_variance, [float(np.float32(s)) ** 2 for s in info.std])
        self.assertAllClose(np.sqrt(norm.input_variance), info.std, rtol=2 ** -24, atol=0)  # float32's rounding.
        # The whole model is body((x - mean) / std) with the dataset's constants.
        x = np.random.default_rng(1).random((1, *info.input_shape), dtype=np.float32)
        body = model.layers[-1]
        expected = body((x - np.array(info.mean, np.float32)) / np.array(info.std, np.float32), training=False)
        self.assertAllClose(model(x, training=False), expected, atol=1e-4, rtol=1e-4)

    def test_dataset_statistics_are_the_papers(self):
        cifar, imagenet = data.get_dataset_info("cifar10"), data.get_dataset_info("imagenet2012")
        self.assertEqual(cifar.mean, (0.4914, 0.4822, 0.4465))
        self.assertEqual(cifar.std, (0.2023, 0.1994, 0.2010))
        self.assertEqual(imagenet.mean, (0.485, 0.456, 0.406))
        self.assertEqual(imagenet.std, (0.229, 0.224, 0.225))
        self.assertEqual((imagenet.num_classes, len(imagenet.class_names)), (1000, 1000))
        self.assertEqual(imagenet.class_names[0], "n01440764")  # tench, the first WordNet id.


class LayoutTest(tf.test.TestCase):

    def _body(self, arch):
        return _model(arch).layers[-1]

    def test_batch_norm_and_conv_follow_pytorch(self):
        for arch in (*CIFAR_ARCHS, "resnet50"):
            for layer in self._body(arch).layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    self.assertEqual((layer.momentum, layer.epsilon), (0.9, 1e-5), layer.name)
                    self.assertAllEqual(layer.gamma.numpy(), np.ones(layer.gamma.shape))
                    self.assertAllEqual(layer.beta.numpy(), np.zeros(layer.beta.shape))
                if isinstance(layer, keras.layers.Conv2D):
                    self.assertFalse(layer.use_bias, layer.name)

    def test_conv_init_is_he_normal_fan_out(self):
        # A 3x3x64x64 kernel: 36,864 draws of N(0, 2 / (9 * 64)); the sample std
        # is within 2% with overwhelming probability (sd of the estimate ~0.4%).
        kernel = self._body("cifar_resnet110").get_layer("stage3_block5_conv1").kernel.numpy()
        self.assertAllClose(kernel.std(), np.sqrt(2.0 / (9 * 64)), rtol=0.02)
        self.assertAllClose(kernel.mean(), 0.0, atol=0.002)

    def test_cifar_resnet_projections_only_where_shape_changes(self):
        body = self._body("cifar_resnet20")
        projections = sorted(layer.name for layer in body.layers if layer.name.endswith("_proj_conv"))
        self.assertEqual(projections, ["stage2_block1_proj_conv", "stage3_block1_proj_conv"])
        self.assertEqual(body.get_layer("stage2_block1_proj_conv").strides, (2, 2))
        self.assertEqual(tuple(body.get_layer("pool").input.shape[1:]), (8, 8, 64))

    def test_resnet50_is_v1_5(self):
        body = self._body("resnet50")
        for stage in (2, 3, 4):
            self.assertEqual(body.get_layer(f"stage{stage}_block1_conv1").strides, (1, 1))
            self.assertEqual(body.get_layer(f"stage{stage}_block1_conv2").strides, (2, 2))
        self.assertEqual(tuple(body.get_layer("pool").input.shape[1:]), (7, 7, 2048))

    def test_densenet40_has_pooling_only_transitions(self):
        body = self._body("cifar_densenet40")
        self.assertFalse([layer.name for layer in body.layers if layer.name.startswith("transition")
                          and isinstance(layer, keras.layers.Conv2D)])
        self.assertEqual(tuple(body.get_layer("final_bn").input.shape[1:]), (8, 8, 240))

    def test_strided_conv_pads_like_pytorch(self):
        # PyTorch's Conv2d(k=3, stride=2, padding=1) on a 6x6 input: zero-pad
        # one pixel on every side, windows start at rows/cols 0, 2, 4.
        x = np.random.default_rng(2).random((1, 6, 6, 2), dtype=np.float32)
        inputs = keras.Input((6, 6, 2))
        model = keras.Model(inputs, layers.conv2d(inputs, 3, 3, 2, name="conv"))
        kernel = model.get_layer("conv").kernel.numpy()
        padded = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
        expected = np.zeros((3, 3, 3), np.float32)
        for i in range(3):
            for j in range(3):
                window = padded[2 * i:2 * i + 3, 2 * j:2 * j + 3]
                expected[i, j] = np.einsum("hwc,hwco->o", window, kernel)
        self.assertAllClose(model(x)[0], expected, atol=1e-5)


class MixedPrecisionTest(tf.test.TestCase, parameterized.TestCase):

    def tearDown(self):
        keras.config.set_dtype_policy("float32")
        super().tearDown()

    @parameterized.parameters("mixed_float16", "mixed_bfloat16")
    def test_float32_logits_under_mixed_policy(self, policy):
        keras.config.set_dtype_policy(policy)
        model = models.get_architecture("cifar_resnet20", "cifar10")
        body = model.layers[-1]
        self.assertEqual(body.get_layer("stem_conv").compute_dtype, policy.split("_")[1])
        self.assertEqual(body.get_layer("stem_conv").variable_dtype, "float32")
        self.assertEqual(body.get_layer("logits").compute_dtype, "float32")
        logits = model(np.random.default_rng(3).random((2, 32, 32, 3), dtype=np.float32), training=True)
        self.assertEqual(logits.dtype, tf.float32)
        self.assertTrue(np.all(np.isfinite(logits.numpy())))


def _leaves(model):
    leaves = []
    for layer in model.layers:
        leaves.extend(_leaves(layer) if isinstance(layer, keras.Model) else [layer])
    return leaves


class LoadComputeDtypeTest(tf.test.TestCase, parameterized.TestCase):
    """load_base_model(..., compute_dtype=...): the function certified, whatever the training policy.

    The models are built by `training.build`, as bin/train.py builds them under
    --mixed_precision, and saved as training saves them. The reference of each
    check is the architecture built afresh under the policy in question and
    given the same weights: the same layers on the same inputs and device, so
    the logits must be equal bit for bit.
    """

    def tearDown(self):
        keras.config.set_dtype_policy("float32")
        super().tearDown()

    def _trained(self, directory, arch, dataset, mixed_precision):
        config = TrainConfig(model_dir=directory, arch=arch, dataset=dataset, mixed_precision=mixed_precision)
        keras.utils.set_random_seed(8)
        base = training.build(config, steps_per_epoch=1).base_model
        info = data.get_dataset_info(dataset)
        x = np.random.default_rng(9).random((4, *info.input_shape), dtype=np.float32)
        base(x, training=True)  # Moves BN running statistics (ResNet) off their initial values.
        base.save(os.path.join(directory, models.BASE_MODEL_FILE))
        return base, x

    def _reference(self, arch, dataset, policy, weights):
        keras.config.set_dtype_policy(policy)
        try:
            model = models.get_architecture(arch, dataset)
        finally:
            keras.config.set_dtype_policy("float32")
        model.set_weights(weights)
        return model

    @parameterized.parameters(("lenet", "fashion_mnist"), ("cifar_resnet20", "cifar10"))
    def test_bfloat16_trained_model_loads_as_float32(self, arch, dataset):
        with tempfile.TemporaryDirectory() as directory:
            trained, x = self._trained(directory, arch, dataset, "mixed_bfloat16")
            as_saved = models.load_base_model(directory)
            loaded = models.load_base_model(directory, compute_dtype="float32")
        # The saved model is a bfloat16 one: loaded as is, it computes in bfloat16.
        first_conv = next(layer for layer in _leaves(as_saved) if isinstance(layer, keras.layers.Conv2D))
        self.assertEqual(first_conv.compute_dtype, "bfloat16")
        for layer in _leaves(loaded):
            self.assertEqual(layer.compute_dtype, "float32", layer.name)
        for variable in loaded.weights:
            self.assertEqual(variable.dtype, "float32", variable.path)
        reference = self._reference(arch, dataset, "float32", trained.get_weights())
        logits = loaded(x, training=False)
        self.assertEqual(logits.dtype, tf.float32)
        self.assertAllEqual(logits, reference(x, training=False))
        # And that is another function than the bfloat16 one it was trained as.
        self.assertNotAllClose(logits, as_saved(x, training=False), atol=0, rtol=0)

    @parameterized.parameters(
        ("lenet", "fashion_mnist", "mixed_bfloat16"), ("lenet", "fashion_mnist", "none"),
        ("cifar_resnet20", "cifar10", "none"))
    def test_bfloat16_loading_computes_in_bfloat16(self, arch, dataset, mixed_precision):
        with tempfile.TemporaryDirectory() as directory:
            trained, x = self._trained(directory, arch, dataset, mixed_precision)
            loaded = models.load_base_model(directory, compute_dtype="bfloat16")
        leaves = _leaves(loaded)
        head = leaves[-1]
        self.assertIsInstance(head, keras.layers.Dense)
        self.assertEqual(head.compute_dtype, "float32")  # float32 logits, as the architectures build them.
        for layer in leaves[:-1]:
            if not isinstance(layer, keras.layers.InputLayer):
                self.assertEqual(layer.compute_dtype, "bfloat16", layer.name)
        for variable in loaded.weights:
            self.assertEqual(variable.dtype, "float32", variable.path)
        # The layer before the classifier really returns bfloat16 (its matmul runs in bfloat16).
        penultimate = leaves[-2]
        features = penultimate(tf.zeros([1, *penultimate.input.shape[1:]]))
        self.assertEqual(features.dtype, tf.bfloat16)
        reference = self._reference(arch, dataset, "mixed_bfloat16", trained.get_weights())
        logits = loaded(x, training=False)
        self.assertEqual(logits.dtype, tf.float32)
        self.assertAllEqual(logits, reference(x, training=False))
        float32 = self._reference(arch, dataset, "float32", trained.get_weights())
        self.assertNotAllClose(logits, float32(x, training=False), atol=0, rtol=0)

    def test_default_keeps_the_saved_policies(self):
        with tempfile.TemporaryDirectory() as directory:
            trained, x = self._trained(directory, "lenet", "fashion_mnist", "mixed_bfloat16")
            loaded = models.load_base_model(directory)
        def policies(model):
            return [(layer.name, layer.dtype_policy.name) for layer in _leaves(model)
                    if not isinstance(layer, keras.layers.InputLayer)]  # An input layer computes nothing.

        self.assertEqual(policies(loaded), policies(trained))
        self.assertAllEqual(loaded(x, training=False), trained(x, training=False))

    @parameterized.parameters(("none", "float32"), ("mixed_bfloat16", "bfloat16"), ("mixed_float16", None))
    def test_model_compute_dtype_names_the_training_policy(self, mixed_precision, computes_in):
        with tempfile.TemporaryDirectory() as directory:
            trained, _ = self._trained(directory, "lenet", "fashion_mnist", mixed_precision)
            self.assertEqual(models.model_compute_dtype(trained), computes_in)
            self.assertEqual(models.model_compute_dtype(models.load_base_model(directory)), computes_in)
            for dtype in ("float32", "bfloat16"):
                self.assertEqual(models.model_compute_dtype(models.load_base_model(directory, dtype)), dtype)

    def test_a_head_computing_in_bfloat16_is_neither_dtype(self):
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(2, dtype="mixed_bfloat16")(inputs))
        self.assertIsNone(models.model_compute_dtype(model))

    def test_with_compute_dtype_copies_only_when_the_dtype_differs(self):
        with tempfile.TemporaryDirectory() as directory:
            trained, x = self._trained(directory, "lenet", "fashion_mnist", "mixed_bfloat16")
        self.assertIs(models.with_compute_dtype(trained, "bfloat16"), trained)
        twin = models.with_compute_dtype(trained, "float32")
        self.assertIsNot(twin, trained)
        self.assertEqual(models.model_compute_dtype(twin), "float32")
        reference = self._reference("lenet", "fashion_mnist", "float32", trained.get_weights())
        self.assertAllEqual(twin(x, training=False), reference(x, training=False))
        # The copy holds its own variables: the trained model's later steps do not reach it.
        trained.set_weights([w + 1.0 for w in trained.get_weights()])
        self.assertAllEqual(twin(x, training=False), reference(x, training=False))

    def test_unknown_compute_dtype(self):
        with tempfile.TemporaryDirectory() as directory:
            self._trained(directory, "lenet", "fashion_mnist", "none")
            with self.assertRaisesRegex(ConfigError, "^--compute_dtype='float16' is unknown"):
                models.load_base_model(directory, compute_dtype="float16")

    def test_truncated_or_garbage_file_is_not_reported_missing(self):
        with tempfile.TemporaryDirectory() as directory:
            self._trained(directory, "lenet", "fashion_mnist", "none")
            path = os.path.join(directory, models.BASE_MODEL_FILE)
            with open(path, "rb") as f:
                whole = f.read()
            for name, content in (("truncated", whole[:len(whole) // 2]), ("garbage", b"not a model\n" * 100),
                                  ("empty", b"")):
                with self.subTest(case=name):
                    broken = os.path.join(directory, f"{name}.keras")
                    with open(broken, "wb") as f:
                        f.write(content)
                    with self.assertRaisesRegex(ConfigError, f"^{broken} is not a complete .keras file \\(a zip "
                                                "archive\\): it is truncated or not a Keras model; save or copy it "
                                                "again$"):
                        models.load_base_model(broken)
            with self.assertRaisesRegex(ConfigError, "missing.keras not found"):
                models.load_base_model(os.path.join(directory, "missing.keras"))

    def test_the_global_policy_is_left_as_it_was(self):
        with tempfile.TemporaryDirectory() as directory:
            self._trained(directory, "lenet", "fashion_mnist", "none")
            models.load_base_model(directory, compute_dtype="bfloat16")
        self.assertEqual(keras.config.dtype_policy().name, "float32")


class RegistryTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(
        ("cifar_resnet110", "mnist", "--arch=cifar_resnet110 does not fit --dataset=mnist (28x28x1 images, 10 "
                                     "classes); it is built for cifar10"),
        ("resnet50", "cifar10", "--arch=resnet50 does not fit --dataset=cifar10"),
        ("lenet", "imagenet2012", "--arch=lenet does not fit --dataset=imagenet2012 (224x224x3 images, 1000 "
                                  "classes)"),
        ("cifar_densenet40", "fashion_mnist", "--arch=cifar_densenet40 does not fit --dataset=fashion_mnist"),
    )
    def test_mismatch_is_one_clear_line(self, arch, dataset, message):
        for check in (models.check_architecture, models.get_architecture):
            with self.assertRaises(ConfigError) as e:
                check(arch, dataset)
            self.assertIn(message, str(e.exception))
            self.assertNotIn("\n", str(e.exception))

    def test_unknown_names(self):
        with self.assertRaisesRegex(ConfigError, "--arch='resnet18' is unknown; choose one of .*cifar_resnet110"):
            models.check_architecture("resnet18", "cifar10")
        with self.assertRaisesRegex(ConfigError, "--dataset='svhn' is unknown"):
            models.check_architecture("cifar_resnet20", "svhn")

    def test_registry_lists_the_authors_architectures(self):
        self.assertCountEqual(models.ARCHITECTURES,
                              ["lenet", "cifar_resnet20", "cifar_resnet110", "cifar_densenet40", "resnet50"])

    @parameterized.parameters("cifar_resnet20", "cifar_densenet40")
    def test_save_and_load_roundtrip(self, arch):
        keras.utils.set_random_seed(4)
        model = models.get_architecture(arch, "cifar10")
        x = np.random.default_rng(5).random((4, 32, 32, 3), dtype=np.float32)
        model(x, training=True)  # Moves the BN running statistics away from their initial values.
        expected = model(x, training=False).numpy()
        with tempfile.TemporaryDirectory() as model_dir:
            model.save(os.path.join(model_dir, models.BASE_MODEL_FILE))
            loaded = models.load_base_model(model_dir)
        self.assertAllClose(loaded(x, training=False), expected, atol=1e-5)
        self.assertIs(type(loaded.layers[1]), keras.layers.Normalization)


_TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
# (architecture, dataset) for every architecture of the registry.
_ARCH_DATASET = (("lenet", "fashion_mnist"), ("cifar_resnet20", "cifar10"), ("cifar_resnet110", "cifar10"),
                 ("cifar_densenet40", "cifar10"), ("resnet50", "imagenet2012"))


def _tensorflow_only_site_packages(directory: str) -> str:
    """A site-packages in `directory` holding what `pip install tensorflow` installs, and nothing else.

    It is a view of this interpreter's installation: symlinks to the files
    that the installation records (RECORD) of tensorflow and of its
    dependencies, recursively (extras left out), list. A folder is linked
    whole when all its files are theirs; a namespace folder shared with
    other distributions (google/) is made and only their parts linked.
    Distributions installed in several roots (Bazel's runfiles keep one per
    package) are merged.

    Returns:
      The path of the view.
    """
    # pylint: disable=import-outside-toplevel
    import importlib.metadata
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dists, todo = {}, ["tensorflow"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name not in dists:
            dists[name] = importlib.metadata.distribution(name)
            for line in dists[name].requires or ():
                requirement = Requirement(line)
                if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                    todo.append(requirement.name)
    owned = {}  # root -> the files (relative paths) the distributions there installed
    for dist in dists.values():
        files = {os.path.normpath(str(f)) for f in dist.files or () if f.parts[0] != ".."}
        owned.setdefault(str(dist.locate_file("")), set()).update(files)
    folders = {}  # root -> the folders holding those files
    for root, files in owned.items():
        folders[root] = set()
        for path in files:
            path = os.path.dirname(path)
            while path:
                folders[root].add(path)
                path = os.path.dirname(path)
    in_several_roots = {f for root in folders for f in folders[root]
                        if sum(f in other for other in folders.values()) > 1}
    wanted = {root: owned[root] | folders[root] for root in owned}
    view = os.path.join(directory, "site-packages")
    os.mkdir(view)

    def wholly_owned(root, folder):
        for parent, subfolders, files in os.walk(os.path.join(root, folder)):
            subfolders[:] = [f for f in subfolders if f != "__pycache__"]
            if any(os.path.relpath(os.path.join(parent, f), root) not in owned[root] for f in files):
                return False
        return True

    def link(root, path):
        if path in owned[root] or (path not in in_several_roots and wholly_owned(root, path)):
            os.symlink(os.path.join(root, path), os.path.join(view, path))
            return
        os.makedirs(os.path.join(view, path), exist_ok=True)
        for child in os.listdir(os.path.join(root, path)):
            if os.path.join(path, child) in wanted[root]:
                link(root, os.path.join(path, child))

    for root in owned:
        for child in os.listdir(root):
            if child in wanted[root]:
                link(root, child)
    return view


# Runs with `python -I -S`: no site (so no .pth file, and no editable install
# of tf_consreg), no PYTHONPATH, no current directory; sys.path is the
# standard library plus argv[1]. argv[2] is an .npz of images; each further
# argument is key=path: the images under key go through the model at path,
# whose logits (or the error that loading raised) are written next to it.
_LOAD_WITH_KERAS_ONLY = """
import importlib.util, sys
sys.path.append(sys.argv[1])
for name in ("tf_consreg", "scipy"):  # scipy: a package of the project's venv that tensorflow does not install.
    if importlib.util.find_spec(name) is not None:
        sys.exit(f"{name} is importable: the environment is not tensorflow's alone")
import keras, numpy as np
images = np.load(sys.argv[2])
for arg in sys.argv[3:]:
    key, path = arg.split("=", 1)
    try:
        model = keras.models.load_model(path)
    except Exception as e:
        with open(path + ".error.txt", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        continue
    np.save(path + ".logits.npy", model(images[key], training=False))
if any(name.startswith("tf_consreg") for name in sys.modules):
    sys.exit("loading imported tf_consreg")
"""


class PlainKerasTest(tf.test.TestCase):
    """base_model.keras holds built-in Keras layers only, so Keras alone loads it (issue #21)."""

    def test_every_architecture_is_built_from_keras_layers(self):
        for arch, dataset in _ARCH_DATASET:
            model = _model(arch) if arch != "lenet" else models.get_architecture(arch, dataset)
            for layer in [model, *model.layers, *_leaves(model)]:
                self.assertTrue(type(layer).__module__.startswith("keras."), f"{arch}: {layer.name} is a "
                                f"{type(layer).__module__}.{type(layer).__name__}")

    def test_saved_models_load_where_only_tensorflow_is_installed(self):
        """Loads base_model.keras files in a Python that sees only tensorflow's installation.

        What it proves: a subprocess started with `python -I -S` whose
        sys.path is the standard library plus the files that `pip install
        tensorflow` installs (`_tensorflow_only_site_packages`; the
        subprocess checks that neither tf_consreg nor scipy is importable)
        loads each file with `keras.models.load_model` alone, without
        importing tf_consreg, and computes the logits of the model that was
        saved, bit for bit (same machine, same kernels). The files are built
        as training builds them (`training.build`), in float32 and under
        mixed_bfloat16, with a Sequential body (LeNet) and functional ones
        (ResNet-20, DenseNet-40); `test_every_architecture_is_built_from_keras_layers`
        extends it to the registry's other architectures (the same layer
        types; ResNet-110 and ResNet-50 are too big to save here). As a
        control, the same subprocess fails to load a file of the old format
        (tests/testdata/legacy_float32.keras), as the issue reported.
        What it does not prove: that a fresh venv resolves tensorflow's
        dependencies to the versions installed here.
        """
        cases = (("lenet", "fashion_mnist", "none"), ("lenet", "fashion_mnist", "mixed_bfloat16"),
                 ("cifar_resnet20", "cifar10", "none"), ("cifar_densenet40", "cifar10", "none"))
        with tempfile.TemporaryDirectory() as directory:
            images, args, expected = {"legacy": np.zeros((1, 8, 8, 3), np.float32)}, [], {}
            for arch, dataset, mixed_precision in cases:
                model_dir = os.path.join(directory, f"{arch}_{mixed_precision}")
                config = TrainConfig(model_dir=model_dir, arch=arch, dataset=dataset, mixed_precision=mixed_precision)
                keras.utils.set_random_seed(10)
                base = training.build(config, steps_per_epoch=1).base_model
                x = np.random.default_rng(11).random((2, *data.get_dataset_info(dataset).input_shape), np.float32)
                base(x, training=True)  # BN running statistics off their initial values.
                os.mkdir(model_dir)
                path = os.path.join(model_dir, models.BASE_MODEL_FILE)
                base.save(path)
                images[dataset] = x
                args.append(f"{dataset}={path}")
                expected[path] = base(x, training=False).numpy()
            legacy = os.path.join(directory, "legacy_float32.keras")
            shutil.copy(os.path.join(_TESTDATA, "legacy_float32.keras"), legacy)
            np.savez(os.path.join(directory, "images.npz"), **images)
            site = _tensorflow_only_site_packages(directory)
            result = subprocess.run([sys.executable, "-I", "-S", "-c", _LOAD_WITH_KERAS_ONLY, site,
                                     os.path.join(directory, "images.npz"), *args, f"legacy={legacy}"],
                                    capture_output=True, text=True, check=False)
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            for path, logits in expected.items():
                self.assertFalse(os.path.exists(path + ".error.txt"), path)
                self.assertAllEqual(np.load(path + ".logits.npy"), logits)
            with open(legacy + ".error.txt", encoding="utf-8") as f:
                self.assertIn("Could not locate class 'Normalization'", f.read())


def _float32_sample():
    """About a million float32 numbers spread over every bit pattern: signs, zeros, subnormals, inf, nan."""
    return np.arange(0, 2 ** 32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)


def _all_bfloat16():
    """Every bfloat16 number (65,536 bit patterns), as float32 (exactly)."""
    return np.arange(2 ** 16, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)


def _per_channel(values, channels):
    """[N, 1, 1, channels] images whose every channel runs through `values`."""
    return np.repeat(values[:, None], channels, axis=1).reshape(-1, 1, 1, channels)


def _bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _same(got, want):
    """Elementwise: the same bits, or both nan (a nan's payload is not part of the arithmetic)."""
    nan = np.isnan(np.asarray(got, np.float32)) & np.isnan(np.asarray(want, np.float32))
    return (_bits(got) == _bits(want)) | nan


class NormalizationTest(tf.test.TestCase, parameterized.TestCase):
    """The built-in normalization against the layer it replaces (`legacy.Normalization`, unchanged since it was saved).

    The reference is the old layer's own arithmetic, (x - mean) / std, on the
    same inputs: in float32 the two must agree bit for bit on every input;
    in bfloat16 (mixed_bfloat16, the policy under which both compute in
    bfloat16) on every bfloat16 input, except where the documented ImageNet
    divisors differ.
    """

    DATASETS = ("mnist", "fashion_mnist", "cifar10", "imagenet2012")

    def test_float32_sqrt_of_a_square_is_exact(self):
        # Boldo (2015): sqrt(fl(s * s)) = s in binary round-to-nearest. Every
        # float32 in [1, 2), through TensorFlow's own kernels; scaling s by
        # 2^k scales s * s by 4^k exactly, so this covers every float32 std
        # whose square neither overflows nor underflows.
        s = np.arange(1.0, 2.0, 2.0 ** -23, dtype=np.float32)
        self.assertEqual(s.size, 2 ** 23)
        self.assertAllEqual(_bits(tf.sqrt(tf.constant(s) * tf.constant(s))), _bits(s))

    @parameterized.parameters(*DATASETS)
    def test_float32_is_the_old_layer_bit_for_bit(self, dataset):
        info = data.get_dataset_info(dataset)
        new = layers.normalization(info.mean, info.std, name="new")
        old = legacy.Normalization(info.mean, info.std)
        x = _per_channel(_float32_sample(), len(info.mean))
        got, want = new(x).numpy(), old(x).numpy()
        self.assertEqual(got.dtype, np.float32)
        self.assertTrue(_same(got, want).all())
        # The divisor it uses is the float32 std itself.
        self.assertAllEqual(_bits(tf.sqrt(new.variance)).ravel(), _bits(np.float32(info.std)))

    @parameterized.parameters(*DATASETS)
    def test_computes_in_bfloat16_under_mixed_bfloat16_as_the_old_layer(self, dataset):
        info = data.get_dataset_info(dataset)
        channels = len(info.mean)
        new = layers.normalization(info.mean, info.std, name="new")
        new = keras.layers.Normalization.from_config({**new.get_config(), "dtype": "mixed_bfloat16"})
        old = legacy.Normalization(info.mean, info.std, dtype="mixed_bfloat16")
        self.assertEqual((new.compute_dtype, new.variable_dtype), (old.compute_dtype, old.variable_dtype))
        finite = _all_bfloat16()
        finite = finite[np.abs(finite) < 2.0 ** 20]  # No overflow of (x - mean) / std; images are in [0, 1] + noise.
        for x in (_per_channel(finite, channels), _per_channel(_float32_sample(), channels)):
            got, want = new(x).numpy(), old(x).numpy()
            self.assertEqual((got.dtype, want.dtype), (ml_dtypes.bfloat16, ml_dtypes.bfloat16))
            if dataset != "imagenet2012":
                self.assertTrue(_same(got, want).all())
        # ImageNet: the channels of std 0.229 and 0.224 divide by one bfloat16
        # ulp more (see layers.normalization); the third is bit for bit.
        if dataset == "imagenet2012":
            old_divisor = np.float32(np.array(info.std, np.float32).astype(ml_dtypes.bfloat16))
            variance = np.array([float(np.float32(s)) ** 2 for s in info.std], np.float32)
            new_divisor = np.sqrt(variance.astype(ml_dtypes.bfloat16).astype(np.float32)).astype(
                ml_dtypes.bfloat16).astype(np.float32)
            self.assertAllEqual(old_divisor, [0.228515625, 0.2236328125, 0.224609375])
            self.assertAllEqual(new_divisor, [0.2294921875, 0.224609375, 0.224609375])
            x = _per_channel(finite, channels)
            got, want = new(x).numpy().astype(np.float64), old(x).numpy().astype(np.float64)
            self.assertTrue((got != want)[..., :2].any())
            self.assertAllEqual(got[..., 2], want[..., 2])
            # Both compute q / d from the same q = bf16(bf16(x) - bf16(mean))
            # and round it to float32 then bfloat16 (TensorFlow's bfloat16
            # division): relative error <= 2^-24 + 2^-8 (1 + 2^-24) < 2^-8 +
            # 2^-23, the quotients being 0 or normal (q is 0 or at least the
            # bfloat16 spacing at the mean, 2^-9, and d < 1). So they differ by
            # at most |q| |1/d_old - 1/d_new| + (2^-8 + 2^-23) (|q / d_old| + |q / d_new|).
            mean = np.array(info.mean, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
            q = (x.astype(ml_dtypes.bfloat16).astype(np.float64) - mean).astype(ml_dtypes.bfloat16).astype(np.float64)
            bound = (np.abs(q) * np.abs(1 / old_divisor - 1 / new_divisor)
                     + (2.0 ** -8 + 2.0 ** -23) * (np.abs(q / old_divisor) + np.abs(q / new_divisor)))
            self.assertTrue(np.all(np.abs(got - want) <= bound))

    def test_bad_constants_are_refused(self):
        with self.assertRaisesRegex(ValueError, "mean and std differ in length: 2 vs 1"):
            layers.normalization((0.1, 0.2), (0.3,), name="n")
        with self.assertRaisesRegex(ValueError, r"std must be positive, got \[0.3, 0.0\]"):
            layers.normalization((0.1, 0.2), (0.3, 0.0), name="n")


def _with_layers_rebuilt(model, policy, replace=None):
    """A copy of `model` rebuilt from its layers' configs, with `model`'s weights.

    Args:
      model: a functional model (nested models are rebuilt too).
      policy: the dtype policy of every layer of the copy ("float64"), or None
        to keep each layer's own; the containers take it, or the float32 one.
      replace: `replace(layer)` may return a layer to put in `layer`'s place
        (None: rebuild it).
    """
    def rebuild(layer):
        other = replace(layer) if replace else None
        config = layer.get_config()
        if policy:
            config["dtype"] = policy
        return other or layer.__class__.from_config(config)

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy or "float32")  # The containers clone_model makes take the global policy.
    try:
        twin = keras.models.clone_model(model, clone_function=rebuild, recursive=True)
    finally:
        keras.config.set_dtype_policy(previous)
    twin.set_weights(model.get_weights())
    return twin


def _builtin_normalization(layer):
    """The built-in layer that replaces a `legacy.Normalization`, with its dtype policy (None for other layers)."""
    if not isinstance(layer, legacy.Normalization):
        return None
    new = layers.normalization(layer.mean, layer.std, name=layer.name)
    return keras.layers.Normalization.from_config({**new.get_config(), "dtype": layer.dtype_policy.name})


class LegacyFormatTest(tf.test.TestCase, parameterized.TestCase):
    """base_model.keras files of the old format (with the custom `Normalization`) still load and compute as they did.

    tests/testdata/legacy_{float32,mixed_bfloat16}.keras were written by the
    code before this change, and legacy_base_models.npz holds the logits
    that code computed from them (testdata/SOURCE.md says how).
    """

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        with np.load(os.path.join(_TESTDATA, "legacy_base_models.npz")) as recorded:
            cls.recorded = dict(recorded)

    def tearDown(self):
        keras.config.set_dtype_policy("float32")
        super().tearDown()

    def _path(self, policy):
        return os.path.join(_TESTDATA, f"legacy_{policy}.keras")

    @parameterized.parameters("float32", "mixed_bfloat16")
    def test_loads_with_its_layer_and_gives_the_recorded_logits(self, policy):
        x = self.recorded["images"]
        model = models.load_base_model(self._path(policy))
        self.assertIsInstance(model.layers[1], legacy.Normalization)
        self.assertEqual(model.layers[1].dtype_policy.name, policy)
        exact = self.recorded[f"{policy}/float64"]
        # float64: the recorded float32 logits are within 8.1e-8 of these
        # float64 ones (measured when recorded); rounding errors scale with
        # the unit roundoff, 2^29 times smaller in float64, so two float64
        # evaluations that sum in different orders agree to ~2 * 8.1e-8 *
        # 2^-29 = 3e-16. 1e-12 leaves a margin of 3,000 and still fails a
        # 1% change of one channel's std (2.5e-3) or lost BN statistics (0.4).
        twin = _with_layers_rebuilt(model, "float64")
        self.assertAllClose(twin(x.astype(np.float64), training=False), exact, rtol=0, atol=1e-12)
        for mode, compute_dtype in (("as_saved", None), ("float32", "float32"), ("bfloat16", "bfloat16")):
            loaded = models.load_base_model(self._path(policy), compute_dtype)
            logits = loaded(x, training=False)
            self.assertEqual(logits.dtype, tf.float32)
            computes_in = compute_dtype or {"float32": "float32", "mixed_bfloat16": "bfloat16"}[policy]
            # Another CPU's kernels may sum in other orders. float32: a sum of
            # K terms is off by at most K * 2^-24 of the sum of their
            # magnitudes (Higham, Thm 3.1), 8.6e-6 for this net's longest
            # sums (K = 144, 3x3x16); the logits recorded were 8.1e-8 from the
            # float64 ones. 1e-5 is that worst case for sums of magnitude ~1
            # and 120 times the error measured. bfloat16: every layer rounds
            # its output to 8 significant bits (2^-8 relative); the recorded
            # logits were 2.8e-3 from the float64 ones, so two evaluations
            # differ by about twice that at most: 1e-2, which lost BN
            # statistics (0.37) or a missing normalization (0.21) exceed by far.
            atol = 1e-5 if computes_in == "float32" else 1e-2
            self.assertAllClose(logits, self.recorded[f"{policy}/{mode}"], rtol=0, atol=atol, msg=mode)
            self.assertAllClose(logits, exact, rtol=0, atol=atol, msg=mode)

    @parameterized.parameters(("float32", None), ("float32", "bfloat16"), ("mixed_bfloat16", None),
                              ("mixed_bfloat16", "float32"))
    def test_the_built_in_layer_gives_the_same_logits_bit_for_bit(self, policy, compute_dtype):
        # The network with the built-in normalization in place of the old
        # layer, and the old file's weights, on the same machine: the CIFAR-10
        # constants are exact in float32 and bfloat16 (NormalizationTest), so
        # every logit is equal.
        x = self.recorded["images"]
        loaded = models.load_base_model(self._path(policy), compute_dtype)
        twin = _with_layers_rebuilt(loaded, None, _builtin_normalization)
        self.assertIs(type(twin.layers[1]), keras.layers.Normalization)
        self.assertEqual(twin.layers[1].compute_dtype, loaded.layers[1].compute_dtype)
        self.assertEqual(models.model_compute_dtype(twin), models.model_compute_dtype(loaded))
        self.assertIsNotNone(models.model_compute_dtype(twin))
        self.assertAllEqual(twin(x, training=False), loaded(x, training=False))

    def test_a_checkpoint_of_the_old_layer_restores_into_the_new_model(self):
        # A training run checkpoints the wrapper, which holds the base model:
        # neither normalization layer has variables, so the old checkpoint's
        # objects and values map one to one onto the new model's.
        info = data.get_dataset_info("fashion_mnist")
        keras.utils.set_random_seed(12)
        inputs = keras.Input(info.input_shape, name="images")
        old = keras.Model(inputs, models.lenet(info.num_classes, info.input_shape)(
            legacy.Normalization(info.mean, info.std, name="normalize")(inputs)))
        x = np.random.default_rng(13).random((3, *info.input_shape), dtype=np.float32)
        keras.utils.set_random_seed(14)
        new = models.get_architecture("lenet", "fashion_mnist")
        self.assertNotAllClose(new(x), old(x))
        path = tf.train.Checkpoint(model=old).write(os.path.join(self.get_temp_dir(), "old"))
        tf.train.Checkpoint(model=new).read(path).assert_consumed().assert_existing_objects_matched()
        self.assertAllEqual(new(x), old(x))  # Fashion-MNIST's std 0.353 is the one a naive variance would change.


@pytest.mark.slow
class TrainStepTest(tf.test.TestCase):
    """A few SGD steps on a fixed batch lower the loss (the graph trains end to end)."""

    def test_resnet20_fits_a_tiny_batch(self):
        keras.utils.set_random_seed(6)
        model = models.get_architecture("cifar_resnet20", "cifar10")
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.default_rng(7).random((16, 32, 32, 3), dtype=np.float32)
        y = np.arange(16) % 10
        losses = model.fit(x, y, batch_size=16, epochs=8, verbose=0).history["loss"]
        self.assertLess(losses[-1], 0.5 * losses[0])
