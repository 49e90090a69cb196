"""Denoised smoothing: a denoiser D in front of a frozen classifier f, certified as the composition f∘D.

Salman et al. (NeurIPS 2020, "Denoised Smoothing: A Provable Defense for
Pretrained Classifiers"). `compose` builds f∘D as a functional Keras model of
two nested models, D then f, with f frozen (not trainable). It maps images in
[0, 1] to f's logits, like every base model of the project, so certify,
predict, analyze, export and query use it unchanged, and it loads with
`keras.models.load_model` when D and f do.

Training (`--method=denoise`, `objectives.Denoise`) builds it from a
classifier file and a fresh denoiser (`training_model`): the wrapper trains
its trainable weights, D's. The run saves f∘D as base_model.keras and D as
denoiser.keras beside it. Certification and export of a denoiser trained
elsewhere (a diffusion model wrapped as a Keras model, say) load the pair
with `load_composition` (--classifier with --denoiser).
"""

import hashlib
import os
from typing import Optional, Sequence, Tuple

import keras
import numpy as np

from tf_consreg import models
from tf_consreg.errors import ConfigError, check
from tf_consreg.models import denoisers

DENOISER_FILE = "denoiser.keras"
DENOISER_ARCHITECTURES = tuple(denoisers.DENOISERS)


def default_denoiser_arch(dataset: str) -> str:
    """The denoiser sized for a dataset: dncnn_small for 28x28 images, else Salman et al.'s DnCNN."""
    return next(name for name, (_, datasets) in denoisers.DENOISERS.items() if dataset in datasets)


def check_denoiser_arch(name: str, dataset: str) -> None:
    """Checks, without building anything, that a denoiser architecture is sized for a dataset.

    Raises:
      ConfigError: an unknown name, or one sized for other datasets.
    """
    check(name in denoisers.DENOISERS,
          f"--denoiser_arch={name!r} is unknown; choose one of {', '.join(DENOISER_ARCHITECTURES)}")
    sized_for = denoisers.DENOISERS[name][1]
    check(dataset in sized_for, f"--denoiser_arch={name} is sized for {', '.join(sized_for)}, not "
          f"--dataset={dataset}; choose one of " + ", ".join(n for n, (_, d) in denoisers.DENOISERS.items()
                                                           if dataset in d))


def _shape(model: keras.Model, which: str) -> Optional[Tuple[Optional[int], ...]]:
    """A model's single input or output shape without the batch, or None if it declares none."""
    tensors = getattr(model, f"{which}s", None)
    if not tensors or len(tensors) != 1:
        return None
    return tuple(tensors[0].shape[1:])


def _fits(shape: Optional[Sequence[Optional[int]]], expected: Sequence[int]) -> bool:
    """Whether a declared shape (None dims match anything; None: undeclared) is `expected`."""
    return shape is None or (len(shape) == len(expected)
                             and all(d is None or d == e for d, e in zip(shape, expected)))


def _load(path: str, flag: str, compute_dtype: Optional[str]) -> keras.Model:
    check(bool(path) and not path.endswith("/"), f"--{flag} is empty; give a .keras file")
    try:
        return models.load_base_model(path, compute_dtype=compute_dtype)
    except ConfigError as e:
        raise ConfigError(f"--{flag}: {e}") from None


def load_classifier(path: str, input_shape: Sequence[int], num_classes: Optional[int] = None,
                    compute_dtype: Optional[str] = None) -> keras.Model:
    """Loads the classifier f, frozen, and checks that it fits the images and classes.

    Args:
      path: a .keras file of a model from images in [0, 1] to logits.
      input_shape: (H, W, C) of the images.
      num_classes: the class count it must output; None: not checked.
      compute_dtype: as `models.load_base_model`.

    Raises:
      ConfigError: an unloadable file or a shape that does not fit, naming --classifier.
    """
    classifier = _load(path, "classifier", compute_dtype)
    taken, given = _shape(classifier, "input"), _shape(classifier, "output")
    check(_fits(taken, input_shape), f"--classifier={path} takes images of shape {taken}, not "
          f"{tuple(input_shape)}")
    check(given is None or len(given) == 1, f"--classifier={path} gives outputs of shape {given}, not logits [C]")
    check(num_classes is None or given is None or given[0] in (None, num_classes),
          f"--classifier={path} gives {given[0] if given else None} logits, not {num_classes} classes")
    classifier.trainable = False
    return classifier


def load_denoiser(path: str, input_shape: Sequence[int], compute_dtype: Optional[str] = None) -> keras.Model:
    """Loads a denoiser D and checks that it maps images of `input_shape` to images of that shape.

    Raises:
      ConfigError: an unloadable file or a shape mismatch, naming --denoiser.
    """
    denoiser = _load(path, "denoiser", compute_dtype)
    for which in ("input", "output"):
        shape = _shape(denoiser, which)
        check(_fits(shape, input_shape), f"--denoiser={path}: its {which} has shape {shape}, but the classifier "
              f"takes {tuple(input_shape)}")
    return denoiser


def compose(denoiser: keras.Model, classifier: keras.Model, input_shape: Sequence[int],
            name: str = "denoised_classifier") -> keras.Model:
    """f∘D: the functional model images -> D -> f -> logits, with f frozen.

    Args:
      denoiser: D, images to images of `input_shape`.
      classifier: f, images in [0, 1] to logits; it is set not trainable.
      input_shape: (H, W, C) of the images.
      name: the composition's name.
    """
    classifier.trainable = False
    inputs = keras.Input(tuple(input_shape), name="images")
    return keras.Model(inputs, classifier(denoiser(inputs)), name=name)


def parts(model: keras.Model) -> Tuple[keras.Model, keras.Model]:
    """(D, f) of a composition built by `compose` (also after saving and loading it).

    Raises:
      ConfigError: `model` is no such composition.
    """
    inner = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if len(inner) != 2 or not all(isinstance(layer, keras.Model) for layer in inner):
        raise ConfigError(f"{model.name} is not a denoiser followed by a classifier (denoise.compose)")
    return inner[0], inner[1]


def training_model(denoiser_arch: str, classifier: str, dataset: str) -> keras.Model:
    """f∘D for --method=denoise: the classifier file, frozen, behind a fresh denoiser of `denoiser_arch`.

    Raises:
      ConfigError: a bad --denoiser_arch or --classifier.
    """
    from tf_consreg import data  # pylint: disable=import-outside-toplevel
    check_denoiser_arch(denoiser_arch, dataset)
    info = data.get_dataset_info(dataset)
    frozen = load_classifier(classifier, info.input_shape, info.num_classes)
    return compose(denoisers.DENOISERS[denoiser_arch][0](info.input_shape), frozen, info.input_shape)


def check_files(classifier: Optional[str], denoiser: Optional[str], *others: Optional[str]) -> bool:
    """Checks --classifier and --denoiser of a certification or an export; True when they are given.

    Args:
      classifier, denoiser: the flags' values (None: not given).
      *others: the values of --model_dir and --model, which the pair replaces.

    Raises:
      ConfigError: one without the other, or a path that is not a file.
    """
    if classifier is None and denoiser is None:
        return False
    check(classifier is not None and denoiser is not None,
          "--classifier and --denoiser go together: give both (a denoiser in front of a classifier) or neither")
    check(not any(others), "--classifier with --denoiser is the model: give them without --model_dir and --model")
    for flag, path in (("classifier", classifier), ("denoiser", denoiser)):
        check(path.endswith(".keras") and os.path.isfile(path), f"--{flag}={path} is not a .keras file")
    return True


def identity(classifier: str, denoiser: str) -> Tuple[str, str]:
    """What a certification's settings record as the model of --classifier with --denoiser: (name, SHA-256).

    The name is both absolute paths; the digest is the SHA-256 of the two
    files' hex digests, joined by a space.
    """
    from tf_consreg import files  # pylint: disable=import-outside-toplevel
    digests = " ".join(files.file_sha256(path) for path in (classifier, denoiser))
    return (f"{os.path.abspath(classifier)} after {os.path.abspath(denoiser)}",
            hashlib.sha256(digests.encode("ascii")).hexdigest())


# keras.applications' "caffe" preprocessing of ResNet50: BGR channel order, mean subtracted, in [0, 255].
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def caffe_preprocessing(input_shape: Sequence[int] = (224, 224, 3)) -> keras.Model:
    """keras.applications.resnet50.preprocess_input for images in [0, 1], as one frozen 1x1 convolution.

    255 x, the channels reversed to BGR, minus the mean: a linear map per
    pixel, so a built-in Conv2D holds it (kernel 255 times the channel
    permutation, bias minus the mean) and the model loads with Keras alone.
    """
    permutation = np.eye(3)[::-1] * 255.0  # output channel j = input channel 2 - j
    conv = keras.layers.Conv2D(3, 1, trainable=False, name="caffe_bgr")
    inputs = keras.Input(tuple(input_shape), name="images")
    outputs = conv(inputs)
    conv.set_weights([permutation.T.reshape(1, 1, 3, 3).astype(np.float32),
                      -np.asarray(CAFFE_BGR_MEAN, np.float32)])
    return keras.Model(inputs, outputs, name="caffe_preprocessing")


def keras_resnet50(weights: Optional[str]) -> keras.Model:
    """keras.applications.ResNet50 as a classifier for denoising: images in [0, 1] -> 1000 logits.

    Args:
      weights: the .h5 weights file of keras.applications.ResNet50 (with the
        top), or None for random weights.
    """
    network = keras.applications.ResNet50(weights=weights, classifier_activation=None)
    inputs = keras.Input((224, 224, 3), name="images")
    return keras.Model(inputs, network(caffe_preprocessing()(inputs)), name="keras_resnet50")


def load_composition(classifier: str, denoiser: str, input_shape: Optional[Sequence[int]] = None,
                     num_classes: Optional[int] = None, compute_dtype: Optional[str] = None) -> keras.Model:
    """f∘D of a classifier file and a denoiser file, checked against each other (and the dataset).

    Args:
      classifier, denoiser: .keras files (--classifier, --denoiser).
      input_shape: (H, W, C) of the dataset's images; None: the classifier's.
      num_classes: the dataset's class count; None: not checked.
      compute_dtype: as `models.load_base_model`, for both.

    Raises:
      ConfigError: an unloadable file, or shapes that do not fit, naming the flag.
    """
    if input_shape is None:
        f = _load(classifier, "classifier", compute_dtype)
        input_shape = _shape(f, "input")
        check(input_shape is not None and len(input_shape) == 3 and None not in input_shape,
              f"--classifier={classifier} declares no image shape [H, W, C], got {input_shape}")
    f = load_classifier(classifier, input_shape, num_classes, compute_dtype)
    d = load_denoiser(denoiser, input_shape, compute_dtype)
    return compose(d, f, input_shape)
