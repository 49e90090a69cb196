r"""Cost and outcome of every training method on LeNet / Fashion-MNIST.

For each method it trains with the paper's MNIST flagfile for that method at
sigma = 0.50 (configs/mnist_<method>_sigma0.50.flags, dataset switched to
Fashion-MNIST, fewer epochs and images), then prints clean images per second
of training and the seconds of training per epoch they make (the last epoch,
without tracing and evaluation), that time over Gaussian training's when both
ran, the first and last epoch's training loss, the accuracy of the base
classifier on noisy test images (one draw at sigma = 0.50), and how many
cores other processes used meanwhile (measure.OtherLoad).

  python bench/methods_bench.py                          # 3 epochs on 10,000 images
  python bench/methods_bench.py --methods=gaussian,consistency --examples=2048 --epochs=1
"""

import argparse
import os
import tempfile

import numpy as np

import measure
from measure import OtherLoad

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "gaussian": "mnist_gaussian_sigma0.50.flags",
    "consistency": "mnist_consistency_sigma0.50.flags",
    "stability": "mnist_stability_sigma0.50.flags",
    "smoothadv": "mnist_smoothadv_sigma0.50.flags",
    "macer": "mnist_macer_sigma0.50.flags",
    "smoothadv+consistency": "mnist_smoothadv_consistency_sigma0.50.flags",
    "smoothmix": "mnist_smoothmix_sigma0.50.flags",
}


def _config_from_flagfile(path, model_dir, examples, epochs):
    from absl import flags  # pylint: disable=import-outside-toplevel

    from tf_consreg.commands import train as train_bin  # pylint: disable=import-outside-toplevel

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train", f"--flagfile={path}", "--dataset=fashion_mnist", f"--model_dir={model_dir}",
                 f"--train_examples={examples}", f"--epochs={epochs}"])
    return train_bin.make_config()


def _noisy_accuracy(base_model, images: np.ndarray, labels: np.ndarray, sigma: float, seed: int = 0,
                    batch_size: int = 1000) -> float:
    """Accuracy of the base classifier on one noisy copy of each image.

    Args:
      base_model: maps images in [0, 1] to logits.
      images: float32 images in [0, 1].
      labels: int labels.
      sigma: noise standard deviation.
      seed: noise seed.
      batch_size: images per forward pass.
    """
    rng = np.random.default_rng(seed)
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        noisy = x + sigma * rng.standard_normal(x.shape, dtype=np.float32)
        logits = base_model(noisy, training=False)
        correct += int(np.sum(np.argmax(logits, axis=1) == labels[start:start + batch_size]))
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(CONFIGS))
    parser.add_argument("--examples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    from tf_consreg import data  # pylint: disable=import-outside-toplevel
    from tf_consreg import models  # pylint: disable=import-outside-toplevel
    from tf_consreg import training  # pylint: disable=import-outside-toplevel

    test_x, test_y = data.load_arrays("fashion_mnist", "test")
    print(f"machine: {measure.machine()}")
    print(f"LeNet / Fashion-MNIST, {args.examples} images x {args.epochs} epochs, paper MNIST settings at "
          "sigma = 0.50")
    print("| method | flags | clean images/s | s/epoch | x gaussian | loss first -> last epoch "
          "| noisy test accuracy | other load (cores) |")
    print("|---|---|---|---|---|---|---|---|")
    gaussian_seconds = None
    for method in args.methods.split(","):
        path = os.path.join(REPO, "configs", CONFIGS[method])
        with tempfile.TemporaryDirectory() as model_dir, OtherLoad() as load:
            config = _config_from_flagfile(path, model_dir, args.examples, args.epochs)
            history = training.train(config).history
            base = models.load_base_model(model_dir)
            accuracy = _noisy_accuracy(base, test_x, test_y, config.sigma)
        speed = history.get("images_per_second", [float("nan")])[-1]
        seconds = args.examples / speed
        if method == "gaussian":
            gaussian_seconds = seconds
        ratio = f"{seconds / gaussian_seconds:.1f}" if gaussian_seconds else "-"
        objective = config.objective
        shown = (f"m={objective.num_noise}" + (f" lbd={objective.lbd:g}" if objective.lbd is not None else "")
                 + (f" eps={objective.epsilon:.3g} steps={objective.num_steps}" if objective.adversarial else ""))
        if objective.method == "smoothmix":
            shown += (f" T={objective.num_steps} step={objective.attack_step:g} eta={objective.eta:g} "
                      f"mix_step={objective.mix_step}")
        other = "n/a" if load.cores is None else f"{load.cores:.2f}"
        print(f"| {method} | {shown} | {speed:.0f} | {seconds:.1f} | {ratio} | {history['loss'][0]:.3f} -> "
              f"{history['loss'][-1]:.3f} | {accuracy:.3f} | {other} |", flush=True)


if __name__ == "__main__":
    main()
