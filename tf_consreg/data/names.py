"""The names of the datasets and splits, without TensorFlow (the flags' help texts list them)."""

# Every dataset bin/train.py trains on and bin/certify.py, bin/predict.py
# and bin/export.py certify: the one list (`sources` holds their infos).
DATASETS = ("fashion_mnist", "mnist", "cifar10", "imagenet2012")
SPLITS = ("train", "test")
# Datasets read from tfds shards as a stream rather than held in memory.
STREAMED = ("imagenet2012",)
