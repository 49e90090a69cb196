"""The custom layer of `base_model.keras` files written before the models used built-in layers only.

Until issue #21 every model normalized its input with this layer, registered
with Keras as "tf_consreg>Normalization". Such a file names it in its config,
so Keras can load the file only where this class is registered: importing
`tf_consreg.models` (which `load_base_model` does) registers it. The file
then loads as it was saved, with this layer, computing the numbers it
computed when it was trained and certified.

New models use `keras.layers.Normalization` (see `layers.normalization`),
which loads with Keras alone. Do not build new models with this class.
"""

from typing import Sequence

import keras


@keras.saving.register_keras_serializable(package="tf_consreg")
class Normalization(keras.layers.Layer):
    """Standardizes channels of images in [0, 1]: (x - mean) / std (the old format's first layer).

    The class name stays "Normalization": a saved file names the layer by it,
    and Keras keys the layer's place in the weights file by it too.

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
