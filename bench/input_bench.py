r"""Throughput of the training input pipelines alone, in images per second.

* cifar10: `tf_consreg.data.make_input` on 50,000 CIFAR-10-shaped mock images
  (the size of the real training set), training mode: full shuffle, random
  crop with 4-pixel padding and flip on whole batches, float conversion.
* imagenet2012: the ImageNet training view (`random_resized_crop`: JPEG
  decode-and-crop, bilinear antialiased resize to 224, flip) on in-memory
  JPEGs of ImageNet's typical size (500x375, smooth content), batched and
  converted as the streamed pipeline does; reading the TFRecord shards is
  not included.

Each pipeline is iterated for a warm-up and then timed. The input pipeline
should outrun training by at least 5x (compare bench/resnet_bench.py, or pass
--training_images_per_second to print the ratio).

  python bench/input_bench.py
  python bench/input_bench.py --training_images_per_second=150 --batches=100
"""

import argparse
import time

import numpy as np
import tensorflow as tf

import measure


def _rate(dataset: tf.data.Dataset, batches: int, warmup: int) -> float:
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        x, _ = next(iterator)
        images += int(x.shape[0])
    return images / (time.perf_counter() - start)


def _cifar10(batch_size: int) -> tf.data.Dataset:
    from tf_consreg import data  # pylint: disable=import-outside-toplevel

    pipeline = data.make_input("cifar10", "train", batch_size, training=True, seed=0, drop_remainder=True,
                               mock=True, limit=50_000)
    return pipeline.dataset.repeat()


def _imagenet(batch_size: int, num_jpegs: int = 64) -> tf.data.Dataset:
    from tf_consreg import data  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    jpegs = []
    for _ in range(num_jpegs):
        # Smooth gradients plus mild noise compress and decode like photographs, unlike pure noise.
        base = np.stack([xx * rng.uniform(0.2, 0.5), yy * rng.uniform(0.2, 0.6), (xx + yy) * 0.2], -1)
        image = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        jpegs.append(tf.io.encode_jpeg(image, quality=90).numpy())
    source = tf.data.Dataset.from_tensor_slices((jpegs, np.arange(num_jpegs, dtype=np.int64))).repeat()
    seeds = tf.data.Dataset.random(seed=0).batch(2)
    ds = tf.data.Dataset.zip((source, seeds)).map(lambda xy, s: (data.random_resized_crop(xy[0], s), xy[1]),
                                                   num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y)).prefetch(tf.data.AUTOTUNE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=60, help="timed batches per pipeline")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--training_images_per_second", type=float, default=None,
                        help="training throughput to compare with (bench/resnet_bench.py)")
    parser.add_argument("--pipelines", default="cifar10,imagenet2012")
    args = parser.parse_args()

    print(f"machine: {measure.machine()}")
    builders = {"cifar10": _cifar10, "imagenet2012": _imagenet}
    for name in args.pipelines.split(","):
        batches = args.batches if name == "cifar10" else max(1, args.batches // 6)
        rate = _rate(builders[name](args.batch_size), batches, args.warmup if name == "cifar10" else 2)
        line = f"{name:13s} training input: {rate:9.0f} images/s (batch {args.batch_size}, {batches} batches)"
        if args.training_images_per_second and name == "cifar10":
            ratio = rate / args.training_images_per_second
            line += f"; {ratio:.0f}x the training throughput ({'ok' if ratio >= 5 else 'TOO SLOW'}: needs >= 5x)"
        print(line)


if __name__ == "__main__":
    main()
