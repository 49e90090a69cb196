"""Architecture registry: `get_architecture(name, dataset)` and model loading.

Every model takes images in [0, 1], normalizes them in its first layer and
returns logits. The CIFAR and ImageNet networks register here as they land.
"""

import os
from typing import Callable, Dict

import keras

from tf_consreg.errors import ConfigError
from tf_consreg.models.layers import Normalization
from tf_consreg.models.lenet import lenet

BASE_MODEL_FILE = "base_model.keras"

# name -> (builder(num_classes, input_shape), datasets it fits)
_REGISTRY: Dict[str, tuple] = {
    "lenet": (lenet, ("mnist", "fashion_mnist")),
}

ARCHITECTURES = tuple(_REGISTRY)


def get_architecture(name: str, dataset: str) -> keras.Model:
    """Builds a fresh (randomly initialized) classifier for a dataset.

    Args:
      name: architecture name, one of ARCHITECTURES.
      dataset: dataset name; fixes the input shape, class count and normalization.

    Returns:
      A `keras.Model` mapping images in [0, 1] to logits, with the dataset's
      normalization as its first layer.

    Raises:
      ConfigError: unknown architecture or dataset, or an architecture that
        does not fit the dataset.
    """
    from tf_consreg import data  # pylint: disable=import-outside-toplevel

    if name not in _REGISTRY:
        raise ConfigError(f"--arch={name!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
    info = data.get_dataset_info(dataset)
    builder, datasets = _REGISTRY[name]
    if dataset not in datasets:
        raise ConfigError(f"--arch={name} does not fit --dataset={dataset}; it is built for {', '.join(datasets)}")
    body = builder(info.num_classes, info.input_shape)
    inputs = keras.Input(info.input_shape, name="images")
    outputs = body(Normalization(info.mean, info.std, name="normalize")(inputs))
    return keras.Model(inputs, outputs, name=f"{name}_{dataset}")


def load_base_model(path: str) -> keras.Model:
    """Loads a saved base classifier.

    Args:
      path: a `.keras` file, or a training `--model_dir` holding `base_model.keras`.

    Raises:
      ConfigError: nothing loadable at `path`.
    """
    if os.path.isdir(path):
        path = os.path.join(path, BASE_MODEL_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: train a model with bin/train.py first, or pass a .keras file")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a bad archive.
        raise ConfigError(f"{path}: not a loadable Keras model ({type(e).__name__}: {e})") from e


__all__ = ["ARCHITECTURES", "BASE_MODEL_FILE", "Normalization", "get_architecture", "load_base_model"]
