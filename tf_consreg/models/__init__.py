"""Architecture registry: `get_architecture(name, dataset)` and model loading.

Every model takes images in [0, 1], normalizes them in its first layer and
returns logits (float32 even under a mixed-precision policy). Models are
made of built-in Keras layers only, so a saved `base_model.keras` loads with
`keras.models.load_model` where only TensorFlow and Keras are installed.
Files written before that hold the project's own normalization layer
(`legacy.Normalization`); importing this package registers it, so
`load_base_model` loads them too. The networks are the authors'
(`code/architectures.py`):

  lenet             MNIST, Fashion-MNIST   lenet.py
  cifar_resnet20    CIFAR-10               cifar_resnet.py (0.27M parameters)
  cifar_resnet110   CIFAR-10               cifar_resnet.py (1.7M)
  cifar_densenet40  CIFAR-10               densenet.py (0.21M)
  resnet50          ImageNet               resnet50.py (torchvision's v1.5, 25.6M)
"""

import os
from typing import Dict, List, Optional
import zipfile

import keras

from tf_consreg import precision
from tf_consreg.errors import ConfigError
from tf_consreg.models import layers
from tf_consreg.models.cifar_resnet import cifar_resnet20, cifar_resnet110
from tf_consreg.models.densenet import cifar_densenet40
# Registers the old format's layer with Keras (and keeps models.Normalization for old callers).
from tf_consreg.models.legacy import Normalization  # pylint: disable=unused-import
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
    outputs = body(layers.normalization(info.mean, info.std, name="normalize")(inputs))
    return keras.Model(inputs, outputs, name=f"{name}_{dataset}")


def load_base_model(path: str, compute_dtype: Optional[str] = None) -> keras.Model:
    """Loads a saved base classifier, computing in the dtype it was saved with or in `compute_dtype`.

    A model trained under a mixed policy is saved with that policy in its
    layers: loaded as is, it computes in bfloat16 (or float16). Certification
    must know which function it samples, so it names the dtype:

    * "float32": every layer computes in float32, whatever the training
      policy: the model trained in float32 would compute the same function
      with these weights.
    * "bfloat16": every layer computes in bfloat16 (the mixed_bfloat16
      policy) but the ones that produce the model's outputs, which compute in
      float32 as every architecture builds its classifier; this is the
      network a model trained under mixed_bfloat16 computes, whatever the
      training policy.

    Variables are float32 under both, and the logits are float32. A model
    saved computing in another dtype is rebuilt with the new policies and
    given the saved weights (`with_compute_dtype`).

    A file of the old format (with `legacy.Normalization`, see the module
    docstring) loads as it was saved, that layer included, and computes as
    it did.

    Args:
      path: a `.keras` file, or a training `--model_dir` holding `base_model.keras`.
      compute_dtype: None (as saved) or one of `tf_consreg.precision.COMPUTE_DTYPES`.

    Raises:
      ConfigError: no file at `path`, a truncated or foreign `.keras` file,
        one Keras cannot load, or an unknown `compute_dtype`.
    """
    if compute_dtype is not None:
        precision.compute_policy(compute_dtype)  # Refuses an unknown dtype before reading anything.
    if os.path.isdir(path):
        path = os.path.join(path, BASE_MODEL_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: train a model with bin/train.py first, or pass a .keras file")
    # Keras reports a .keras file that is not a whole zip archive as "File not found".
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ConfigError(f"{path} is not a complete .keras file (a zip archive): it is truncated or not a Keras "
                          "model; save or copy it again")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a bad archive.
        raise ConfigError(f"{path}: not a loadable Keras model ({type(e).__name__}: {e})") from e
    return model if compute_dtype is None else with_compute_dtype(model, compute_dtype)


def _output_layers(model: keras.Model) -> List[keras.layers.Layer]:
    """The layers, inside nested models too, whose outputs are `model`'s outputs.

    None are known for a subclassed model (it has no graph of layers).
    """
    if isinstance(model, keras.Sequential):
        heads = model.layers[-1:]
    else:
        heads = [model.get_layer(name) for name in getattr(model, "output_names", ())]
    found = []
    for layer in heads:
        found.extend(_output_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return found


def _leaf_layers(model: keras.Model) -> List[keras.layers.Layer]:
    """The layers of `model` that compute (inside nested models too); input layers compute nothing."""
    leaves = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            leaves.extend(_leaf_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            leaves.append(layer)
    return leaves


def model_compute_dtype(model: keras.Model) -> Optional[str]:
    """The dtype of `precision.COMPUTE_DTYPES` that `model` computes in, or None when it is neither.

    "float32": every layer computes in float32. "bfloat16": every layer but
    the ones producing the outputs computes in bfloat16, and those in float32:
    a model built under the mixed_bfloat16 policy, or loaded with
    `load_base_model(..., compute_dtype="bfloat16")`. Anything else (a
    mixed_float16 model, a hand-mixed one) is None.
    """
    heads = {id(layer) for layer in _output_layers(model)}
    body = {layer.compute_dtype for layer in _leaf_layers(model) if id(layer) not in heads}
    head = {layer.compute_dtype for layer in _leaf_layers(model) if id(layer) in heads}
    if head - {"float32"}:
        return None
    if body <= {"float32"}:
        return "float32"
    return "bfloat16" if body == {"bfloat16"} else None


def with_compute_dtype(model: keras.Model, compute_dtype: str) -> keras.Model:
    """`model` if it computes in `compute_dtype` (see `model_compute_dtype`), else a copy that does, with its weights.

    The copy holds its own variables: later changes to `model`'s weights do
    not reach it.

    Raises:
      ConfigError: an unknown `compute_dtype`, naming --compute_dtype.
    """
    policy = precision.compute_policy(compute_dtype)
    return model if model_compute_dtype(model) == compute_dtype else with_compute_policy(model, policy)


def with_compute_policy(model: keras.Model, policy: str) -> keras.Model:
    """A copy of `model`, with its weights, whose layers compute under the Keras dtype policy `policy`.

    The layers producing the outputs (the classifier) compute in float32
    under any policy, so the logits stay float32.

    Args:
      model: a built functional or sequential model (nested models are rebuilt too).
      policy: a Keras dtype policy name with float32 variables: "float32" or "mixed_bfloat16".
    """
    heads = {id(layer) for layer in _output_layers(model)}

    def rebuild(layer):
        config = layer.get_config()
        config["dtype"] = "float32" if id(layer) in heads else policy
        return layer.__class__.from_config(config)

    # The containers clone_model creates take the global policy.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        clone = keras.models.clone_model(model, clone_function=rebuild, recursive=True)
    finally:
        keras.config.set_dtype_policy(previous)
    clone.set_weights(model.get_weights())
    return clone


__all__ = ["ARCHITECTURES", "BASE_MODEL_FILE", "check_architecture", "get_architecture",
           "load_base_model", "model_compute_dtype", "with_compute_dtype", "with_compute_policy"]
