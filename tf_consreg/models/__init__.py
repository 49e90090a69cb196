"""Architecture registry: `get_architecture(name, dataset)` and model loading.

Every model takes images in [0, 1], normalizes them in its first layer and
returns logits (float32 even under a mixed-precision policy). The networks
are the authors' (`code/architectures.py`):

  lenet             MNIST, Fashion-MNIST   lenet.py
  cifar_resnet20    CIFAR-10               cifar_resnet.py (0.27M parameters)
  cifar_resnet110   CIFAR-10               cifar_resnet.py (1.7M)
  cifar_densenet40  CIFAR-10               densenet.py (0.21M)
  resnet50          ImageNet               resnet50.py (torchvision's v1.5, 25.6M)
"""

import os
from typing import Dict

import keras

from tf_consreg.errors import ConfigError
from tf_consreg.models.cifar_resnet import cifar_resnet20, cifar_resnet110
from tf_consreg.models.densenet import cifar_densenet40
from tf_consreg.models.layers import Normalization
from tf_consreg.models.lenet import lenet
from tf_consreg.models.resnet50 import resnet50

BASE_MODEL_FILE = "base_model.keras"

# name -> (builder(num_classes, input_shape), datasets it fits)
_REGISTRY: Dict[str, tuple] = {
    "lenet": (lenet, ("mnist", "fashion_mnist")),
    "cifar_resnet20": (cifar_resnet20, ("cifar10",)),
    "cifar_resnet110": (cifar_resnet110, ("cifar10",)),
    "cifar_densenet40": (cifar_densenet40, ("cifar10",)),
    "resnet50": (resnet50, ("imagenet2012",)),
}

ARCHITECTURES = tuple(_REGISTRY)


def check_architecture(name: str, dataset: str) -> None:
    """Checks, without building anything, that an architecture fits a dataset.

    Config validation calls it so that a bad pair fails before any work.

    Raises:
      ConfigError: unknown architecture or dataset, or an architecture built
        for other datasets (input shape, class count or normalization).
    """
    from tf_consreg import data  # pylint: disable=import-outside-toplevel

    if name not in _REGISTRY:
        raise ConfigError(f"--arch={name!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
    info = data.get_dataset_info(dataset)
    datasets = _REGISTRY[name][1]
    if dataset not in datasets:
        shape = "x".join(str(d) for d in info.input_shape)
        raise ConfigError(f"--arch={name} does not fit --dataset={dataset} ({shape} images, {info.num_classes} "
                          f"classes); it is built for {', '.join(datasets)}")


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

    check_architecture(name, dataset)
    info = data.get_dataset_info(dataset)
    body = _REGISTRY[name][0](info.num_classes, info.input_shape)
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


__all__ = ["ARCHITECTURES", "BASE_MODEL_FILE", "Normalization", "check_architecture", "get_architecture",
           "load_base_model"]
