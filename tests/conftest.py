"""Test-wide settings: TensorFlow's environment before it is first imported."""

import os

# Same default as the package (see tf_consreg/__init__.py); set here too
# because some tests import tensorflow before tf_consreg.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
