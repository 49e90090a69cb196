r"""LeNet's biases at zero (ours) against PyTorch's uniform +-1/sqrt(fan_in) (the authors').

For each seed it builds LeNet for Fashion-MNIST once, then trains two copies
that differ only in their biases: zero, as tf_consreg/models/lenet.py starts
them, and uniform in +-1/sqrt(fan_in), as PyTorch's nn.Conv2d and nn.Linear
(the authors' archs/lenet.py) start them. Kernels, data order and training
noise are the same in both. Training is the demo's consistency objective
(m = 2, lambda = 5, eta = 0.5, sigma = 0.5, weight decay 1e-4) with the
authors' SGD (lr 0.01, momentum 0.9) at batch 256. After every epoch it prints
the base classifier's accuracy on the test images under noise (m = 2 copies
each, the same noise for both) and clean.

  python bench/init_bench.py                                   # seeds 0 and 1, 3 epochs on 10,000 images
  python bench/init_bench.py --seeds=0 --epochs=1 --examples=2048
"""

import argparse

import numpy as np

import keras
import tensorflow as tf

import tf_consreg
from tf_consreg import models
from tf_consreg.data import load_arrays


def pytorch_biases(model: keras.Model, rng: np.random.Generator) -> int:
    """Sets every Conv2D and Dense bias of `model` as PyTorch initializes it: uniform in +-1/sqrt(fan_in).

    Returns the number of biases set (the network sits inside the model, after its normalization layer).
    """
    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            count += pytorch_biases(layer, rng)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            fan_in = int(np.prod(layer.kernel.shape[:-1]))
            bound = 1.0 / np.sqrt(fan_in)
            layer.bias.assign(rng.uniform(-bound, bound, layer.bias.shape).astype(np.float32))
            count += 1
    return count


def train_and_evaluate(weights, with_pytorch_biases: bool, seed: int, data, epochs: int):
    """Trains LeNet from `weights`; returns [(noisy accuracy, clean accuracy)] after each epoch."""
    train_ds, test_ds = data
    base = models.get_architecture("lenet", "fashion_mnist")
    base.set_weights(weights)
    if with_pytorch_biases and pytorch_biases(base, np.random.default_rng(seed)) != 4:
        raise AssertionError("LeNet has 4 layers with biases: 2 convolutions, 2 dense")
    objective = tf_consreg.ObjectiveConfig(method="consistency", sigma=0.5, num_noise=2, lbd=5.0, eta=0.5,
                                           weight_decay=1e-4)
    model = tf_consreg.ConsistencyModel(base, objective, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = []
    for _ in range(epochs):
        model.fit(train_ds, epochs=1, verbose=0)
        # Evaluation noise is keyed by the seed and the step count, equal in both arms: the same noise.
        result = model.evaluate(test_ds, verbose=0, return_dict=True)
        history.append((result["accuracy"], result["clean_accuracy"]))
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=10000, help="training images")
    parser.add_argument("--test_examples", type=int, default=10000)
    args = parser.parse_args()

    images, labels = load_arrays("fashion_mnist", "train", limit=args.examples)
    test_images, test_labels = load_arrays("fashion_mnist", "test", limit=args.test_examples)
    print(f"LeNet, Fashion-MNIST: {len(images):,} training images, {args.epochs} epochs; "
          f"base-model accuracy on {len(test_images):,} test images, noisy (sigma = 0.5, 2 copies) / clean")
    print("| seed | biases | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " |")
    print("|---:|---|" + "---:|" * args.epochs)
    for seed in (int(s) for s in args.seeds.split(",")):
        keras.utils.set_random_seed(seed)
        weights = models.get_architecture("lenet", "fashion_mnist").get_weights()
        test_ds = tf.data.Dataset.from_tensor_slices((test_images, test_labels)).batch(1000)
        for with_pytorch in (False, True):
            # A new dataset per arm: its shuffle state restarts, so both arms see the same orders.
            train_ds = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(
                len(images), seed=seed, reshuffle_each_iteration=True).batch(256)
            history = train_and_evaluate(weights, with_pytorch, seed, (train_ds, test_ds), args.epochs)
            cells = " | ".join(f"{noisy:.4f} / {clean:.4f}" for noisy, clean in history)
            print(f"| {seed} | {'PyTorch uniform' if with_pytorch else 'zero (ours)'} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
