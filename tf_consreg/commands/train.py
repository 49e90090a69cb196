r"""Trains a base classifier for randomized smoothing, with consistency regularization or a baseline.

Each clean image of a batch becomes --num_noise (m) noisy copies
x + N(0, sigma^2 I); the loss is the mean cross-entropy over all copies plus,
for --method=consistency, lambda * mean_i KL(p_mean || p_i) + eta * H(p_mean)
(Jeong & Shin, NeurIPS 2020). --method=gaussian is Gaussian augmentation
(Cohen et al., 2019). The run directory gets the resolved flags, TensorBoard
events, a checkpoint per epoch and the trained `base_model.keras`; running the
same command again resumes from the last checkpoint.

Example (the paper's MNIST setting at sigma = 0.50, on Fashion-MNIST):

  python bin/train.py --dataset=fashion_mnist --arch=lenet --method=consistency \
      --sigma=0.5 --num_noise=2 --lbd=5 --eta=0.5 --epochs=90 --batch_size=256 \
      --lr=0.01 --lr_step_size=30 --model_dir=runs/fmnist_consistency_0.50

  python bin/train.py --flagfile=configs/mnist_consistency_sigma0.50.flags \
      --model_dir=runs/mnist_consistency_0.50

On several machines (the same command on each; TF_CONFIG gives each its index,
see the README's "Running on a cluster"):

  TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}' \
  python bin/train.py --strategy=multi_worker --flagfile=configs/mnist_consistency_sigma0.50.flags \
      --model_dir=runs/mnist_consistency_0.50
"""

import sys

from tf_consreg import cli  # Sets TensorFlow's environment before TensorFlow loads.
from tf_consreg import run_config
from tf_consreg import training

# One flag per field of TrainConfig, which states its type and default.
_FLAGS = cli.define_flags(run_config.TrainConfig, cli.TRAIN_HELP)


def make_config() -> run_config.TrainConfig:
    """Builds the validated config from the flags."""
    return cli.config_from_flags(run_config.TrainConfig, _FLAGS)


def main(argv):
    del argv
    config = make_config()
    for warning in training.config_warnings(config):
        print(f"train.py: warning: {warning}", file=sys.stderr, flush=True)
    training.train(config)


def run() -> None:
    """Runs the command on sys.argv: the console script tf-consreg-train, bin/train.py and `python -m`."""
    cli.run(main)


if __name__ == "__main__":
    run()
