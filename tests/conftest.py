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

# The files that take longest in each tier, longest first (per-file totals of
# `pytest --durations` with --junitxml on a quiet machine, issue 21). Under
# pytest-xdist's --dist=loadfile each file goes whole to the next free worker
# in collection order, so a long file collected last finishes alone on one
# worker while the other idles; handing out the long files first (longest
# processing time first) keeps both workers busy to the end. Order only:
# every selected test runs.
_LONGEST_FIRST = {
    # The default tier, pytest.ini's `-m "not slow"`.
    "fast": ("export_test.py", "certify_run_test.py", "serving_check_test.py", "serving_load_test.py",
             "models_test.py", "bin_train_test.py", "bin_export_test.py", "distribute_test.py", "bin_query_test.py",
             "safe_rounding_test.py", "smoothing_test.py", "serving_client_test.py", "data_sources_test.py"),
    # `-m slow`.
    "slow": ("multi_worker_test.py", "bin_certify_test.py", "bin_train_test.py", "demo_test.py", "bin_tune_test.py",
             "bin_predict_test.py", "bin_export_test.py", "certify_run_test.py", "readme_test.py", "denoise_test.py"),
    # Both tiers (`-m "slow or not slow"`) or any other selection.
    "all": ("export_test.py", "bin_train_test.py", "certify_run_test.py", "multi_worker_test.py",
            "bin_certify_test.py", "bin_export_test.py", "demo_test.py", "bin_tune_test.py", "models_test.py",
            "serving_check_test.py", "serving_load_test.py", "bin_predict_test.py", "distribute_test.py"),
}


def pytest_collection_modifyitems(config, items):
    """Sorts the collected tests so that the longest files of the tier selected come first (stable)."""
    tier = {"not slow": "fast", "slow": "slow"}.get(config.getoption("markexpr", "").strip(), "all")
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST[tier])}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
