"""tf_consreg: consistency-regularized randomized smoothing in TensorFlow/Keras.

Implements "Consistency Regularization for Certified Robustness of Smoothed
Classifiers" (Jeong & Shin, NeurIPS 2020): training with m noisy copies per
image and a consistency penalty, Monte Carlo certification of the smoothed
classifier (Cohen et al., 2019), and export of the smoothed predictor as a
SavedModel for TF Serving.

Importing the package turns on TensorFlow's oneDNN kernels unless the caller
already chose (``TF_ENABLE_ONEDNN_OPTS``): on CPUs without AVX-512 TensorFlow
leaves them off, and with them LeNet training and certification run about
twice as fast (see bench/). The variable is only read when TensorFlow is
first imported, so it must be set before that; set it to 0 to opt out.
"""

import importlib
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"

# Public API, loaded lazily (PEP 562): importing the package loads neither
# TensorFlow nor Keras, so `tf_consreg.analysis`, `tf_consreg.certify_log`
# and `tf_consreg.stats` (and `tf_consreg.analyze`, `read_certify_tsv`, ...)
# run without them. `base_model.keras` holds built-in Keras layers only:
# `keras.models.load_model` loads it anywhere. Files saved before that
# (a custom Normalization layer) load with `load_base_model`, or after
# importing `tf_consreg.models`, which registers the old layer.
_LAZY = {
    "AnalyzeConfig": "tf_consreg.analysis",
    "CertifyCallback": "tf_consreg.callbacks",
    "CertifyConfig": "tf_consreg.certify_run",
    "CertifySpec": "tf_consreg.certify_spec",
    "ConsistencyModel": "tf_consreg.consistency_model",
    "ObjectiveConfig": "tf_consreg.run_config",
    "Smooth": "tf_consreg.smoothing",
    "TrainConfig": "tf_consreg.run_config",
    "TuneConfig": "tf_consreg.tuning",
    "VersionExportConfig": "tf_consreg.export",
    "analyze": "tf_consreg.analysis",
    "certify_dataset": "tf_consreg.certify_run",
    "consistency_loss": "tf_consreg.losses",
    "export_smoothed": "tf_consreg.export",
    "export_version": "tf_consreg.export",
    "get_architecture": "tf_consreg.models",
    "get_dataset_info": "tf_consreg.data",
    "holdout_split": "tf_consreg.data",
    "load_base_model": "tf_consreg.models",
    "macer_loss": "tf_consreg.losses",
    "mirrored_sample_counts": "tf_consreg.smoothing",
    "read_certify_tsv": "tf_consreg.certify_log",
    "sample_counts": "tf_consreg.smoothing",
    "search": "tf_consreg.tuning",
    "smoothadv_pgd": "tf_consreg.attacks",
    "smoothmix_inputs": "tf_consreg.attacks",
    "smoothmix_loss": "tf_consreg.losses",
    "smoothmix_pgd": "tf_consreg.attacks",
    "stability_loss": "tf_consreg.losses",
    "summarize": "tf_consreg.analysis",
    "train": "tf_consreg.training",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tf_consreg' has no attribute {name!r}")
