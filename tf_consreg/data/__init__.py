"""Datasets as images in [0, 1]: where they come from, how they are augmented, how they are batched.

Three modules, in the order data flows through them:

* `sources`: the dataset files and tfds splits (IDX files, tfds, the
  offline preparation of ImageNet, mocks), loaded whole (`load_uint8`,
  `load_arrays`) or read by index in the test-time view (`open_reader`,
  for certification: no split has to fit in memory).
* `augmentation`: the training augmentations and the test-time view, uint8
  in, uint8 out (torchvision's transforms, as the authors used them).
* `pipelines`: the `tf.data` pipelines of training and evaluation
  (`open_source`, `Source.make_input`, `make_dataset`,
  `make_epoch_dataset`), per replica under `tf.distribute`.

The names below are importable from `tf_consreg.data` as they were from the
one module it replaces. They are loaded lazily (PEP 562), so that
`DATASETS`, `SPLITS` and `STREAMED` (from `names`) are importable without
TensorFlow: the flags' help texts list them.
"""

import importlib

from tf_consreg.data.names import DATASETS, SPLITS, STREAMED

_MODULES = {
    "sources": ("DEBIAN_FASHION_MNIST_DIR", "IMAGENET_ARCHIVES", "IMAGENET_URL", "MAX_IN_MEMORY_STREAMED",
                "MOCK_EXAMPLES", "DatasetInfo", "SplitReader", "check_split", "encoded_stream", "evaluation_view",
                "get_dataset_info", "holdout_split", "load_arrays", "load_uint8", "open_reader", "read_idx"),
    "augmentation": ("batch_augmentation", "decode_image", "random_crop_flip", "random_resized_crop",
                     "random_resized_crop_window", "resize_center_crop"),
    "pipelines": ("Input", "Source", "make_dataset", "make_epoch_dataset", "make_input", "open_source"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted([*_LAZY, "DATASETS", "SPLITS", "STREAMED"])


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
