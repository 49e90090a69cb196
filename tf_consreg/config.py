"""TEMPORARY, for merging: the training config now lives in `tf_consreg.training`.

smoothing.py and export.py, and the tests of certification and export, are
being restructured on another branch at the same time and still read a run's
config through this module. When the branches meet they import
`read_train_config`, `TrainConfig` and `TRAIN_CONFIG_FILE` from
`tf_consreg.training`, and this file goes.
"""

from tf_consreg.training import TRAIN_CONFIG_FILE, TrainConfig, read_train_config

__all__ = ["TRAIN_CONFIG_FILE", "TrainConfig", "read_train_config"]
