"""Test-wide settings, applied before TensorFlow initializes its devices."""

import os

# Same default as the package (see tf_consreg/__init__.py); set here too
# because some tests import tensorflow before tf_consreg.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position
from absl.testing import absltest  # noqa: E402  pylint: disable=wrong-import-position

# absltest's main creates its temporary directory; under pytest nothing does
# unless a tf.test.TestCase ran first in the same process.
os.makedirs(absltest.get_default_test_tmpdir(), exist_ok=True)

# Two logical CPU devices for the multi-replica tests (distribute_test.py).
# Devices can only be configured before TensorFlow first uses them, which in
# a single pytest process means here. Single-device code is unaffected.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
