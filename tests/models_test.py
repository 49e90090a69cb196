"""The architecture registry and the CIFAR/ImageNet networks.

Parameter counts are checked against closed forms written from the papers'
layouts (and, for ResNet-50, torchvision's published 25,557,032), never
against the code under test. PyTorch counts parameters without BN's running
statistics, so the trainable weights are compared.
"""

import functools
import os
import tempfile

import keras
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
        self.assertIsInstance(norm, layers.Normalization)
        self.assertAllClose(norm.mean, info.mean)
        self.assertAllClose(norm.std, info.std)
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
        self.assertIsInstance(loaded.layers[1], layers.Normalization)


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
