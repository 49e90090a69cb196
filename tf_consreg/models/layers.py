"""Layers shared by the architectures."""

from typing import Sequence

import keras


@keras.saving.register_keras_serializable(package="tf_consreg")
class Normalization(keras.layers.Layer):
    """Standardizes channels of images in [0, 1]: (x - mean) / std.

    It is the first layer of every model, so that the smoothing noise is added
    in pixel space before it, where the certified L2 radius is measured. Unlike
    `keras.layers.Normalization` it holds fixed constants (no `adapt`), which
    keeps the saved model self-describing.

    Args:
      mean: per-channel means.
      std: per-channel standard deviations (> 0).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def call(self, inputs):
        mean = keras.ops.convert_to_tensor(self.mean, dtype=inputs.dtype)
        std = keras.ops.convert_to_tensor(self.std, dtype=inputs.dtype)
        return (inputs - mean) / std

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}
