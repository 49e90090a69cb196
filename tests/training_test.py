"""training.py: building the wrapper (precision, pretrained weights), the learning-rate schedule, runs in a precision.

The configs are run_config_test's, the wrapper consistency_model_test's.
"""

import io
import json
import os
import tempfile
from contextlib import redirect_stdout

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

import keras

from run_config_test import AMX_CPU, AVX2_CPU  # tests/run_config_test.py
from tf_consreg import models
from tf_consreg import precision
from tf_consreg import run_config
from tf_consreg import training
from tf_consreg.errors import ConfigError

class BuildOptionsTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters("mixed_float16", "mixed_bfloat16")
    def test_mixed_precision_keeps_losses_and_logits_float32(self, policy):
        config = run_config.TrainConfig(model_dir="/unused", mixed_precision=policy,
                                        objective=run_config.ObjectiveConfig(sigma=0.5, lbd=5.0))
        model = training.build(config, steps_per_epoch=10)
        self.assertEqual(keras.config.dtype_policy().name, "float32")  # Not leaked to other models.
        layers = training._leaf_layers(model.base_model)  # pylint: disable=protected-access
        self.assertEqual(layers[2].compute_dtype, policy[6:])  # The first conv computes in 16 bits ...
        self.assertEqual(layers[-1].compute_dtype, "float32")  # ... the logits in float32.
        self.assertEqual(isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
                         policy == "mixed_float16")
        images = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype(np.float32)
        terms = model.compute_terms(tf.constant(images), tf.constant(np.arange(8) % 10), training=False, step=0)
        for name in ("loss", "cross_entropy", "consistency", "kl", "entropy"):
            self.assertEqual(terms[name].dtype, tf.float32, name)
        logs = model.train_on_batch(images, np.arange(8) % 10, return_dict=True)
        self.assertTrue(np.isfinite(logs["loss"]))

    def test_pretrained_model_keeps_body_and_replaces_head(self):
        path = os.path.join(self.get_temp_dir(), "pretrained.keras")
        source = models.get_architecture("lenet", "mnist")
        source.save(path)
        config = run_config.TrainConfig(model_dir="/unused", dataset="fashion_mnist", pretrained_model=path)
        model = training.build(config, 10)
        for new, old in zip(model.base_model.weights, source.weights):
            self.assertAllEqual(new, old)

        # A 5-class head cannot take the 10-class weights: it stays freshly initialized.
        inputs = keras.Input((28, 28, 1))
        other = keras.Model(inputs, models.lenet(5)(models.Normalization((0.5,), (0.5,))(inputs)))
        leaf = training._leaf_layers  # pylint: disable=protected-access
        for target, weights in zip(leaf(other)[:-1], leaf(source)[:-1]):
            target.set_weights(weights.get_weights())
        other_path = os.path.join(self.get_temp_dir(), "five.keras")
        other.save(other_path)
        model = training.build(run_config.TrainConfig(model_dir="/unused", pretrained_model=other_path), 10)
        new_layers = training._leaf_layers(model.base_model)  # pylint: disable=protected-access
        self.assertAllEqual(new_layers[2].weights[0], source.weights[0])  # conv1 copied
        self.assertEqual(model.base_model.output_shape, (None, 10))
        self.assertNotAllClose(new_layers[-1].weights[0][:, :5], other.weights[-2])  # head not copied

    def test_pretrained_model_of_another_architecture_is_refused(self):
        inputs = keras.Input((28, 28, 1))
        path = os.path.join(self.get_temp_dir(), "dense.keras")
        keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))).save(path)
        with self.assertRaisesRegex(ConfigError, "--pretrained_model=.*same --arch"):
            training.build(run_config.TrainConfig(model_dir="/unused", pretrained_model=path), 10)


@pytest.mark.slow
class PrecisionRunTest(tf.test.TestCase):
    """train() under a stubbed capability: what it prints, records and computes in, and resuming elsewhere."""

    def _train(self, model_dir, capability, **fields):
        config = run_config.TrainConfig(model_dir=model_dir, train_examples=64, eval_examples=0, batch_size=32,
                                        **{"epochs": 1, **fields})
        out = io.StringIO()
        with redirect_stdout(out):
            training.train(config, capability=capability)
        return out.getvalue()

    def test_auto_run_records_its_policy_and_keeps_it_on_another_machine(self):
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        printed = self._train(model_dir, AMX_CPU)
        self.assertIn(precision.resolve("auto", AMX_CPU).reason + "\n", printed)
        with open(os.path.join(model_dir, run_config.TRAIN_CONFIG_FILE), encoding="utf-8") as f:
            record = json.load(f)
        self.assertEqual((record["mixed_precision"], record["precision_policy"]), ("auto", "mixed_bfloat16"))
        with open(os.path.join(model_dir, run_config.FLAGS_FILE), encoding="utf-8") as f:
            self.assertTrue(f.readline().startswith("# --mixed_precision=auto chose mixed_bfloat16"))
        self.assertEqual(models.model_compute_dtype(models.load_base_model(model_dir)), "bfloat16")

        # Resumed for one more epoch where auto would choose float32: still bfloat16.
        printed = self._train(model_dir, AVX2_CPU, epochs=2)
        self.assertIn("--mixed_precision=auto: resuming in mixed_bfloat16, the policy this run started with (here "
                      "auto would choose float32", printed)
        self.assertIn("Resuming from", printed)
        self.assertEqual(models.model_compute_dtype(models.load_base_model(model_dir)), "bfloat16")
        with open(os.path.join(model_dir, run_config.TRAIN_CONFIG_FILE), encoding="utf-8") as f:
            self.assertEqual(json.load(f)["precision_policy"], "mixed_bfloat16")

        # Asking for another policy is asking for another run.
        with self.assertRaisesRegex(ConfigError, "holds a different run.*--mixed_precision: 'float32' here, 'auto' "
                                                 "there"):
            self._train(model_dir, AMX_CPU, epochs=2, mixed_precision="float32")

    def test_auto_on_a_machine_without_bfloat16_trains_in_float32(self):
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        printed = self._train(model_dir, AVX2_CPU)
        self.assertIn("--mixed_precision=auto chose float32: CPU AMD EPYC 7B12: no native bfloat16", printed)
        self.assertEqual(models.model_compute_dtype(models.load_base_model(model_dir)), "float32")


class LearningRateTest(tf.test.TestCase):

    def test_step_schedule_like_torch_steplr(self):
        config = run_config.TrainConfig(model_dir="/unused", epochs=90, lr=0.01, lr_step_size=30, lr_gamma=0.1)
        schedule = training._learning_rate(config, steps_per_epoch=10)  # pylint: disable=protected-access
        # torch StepLR: lr * gamma ** (epoch // 30), epoch = step // 10.
        for step, expected in ((0, 0.01), (299, 0.01), (300, 0.001), (599, 0.001), (600, 1e-4), (899, 1e-4)):
            self.assertAllClose(float(schedule(step)), expected, rtol=1e-6, msg=f"step {step}")


if __name__ == "__main__":
    tf.test.main()
