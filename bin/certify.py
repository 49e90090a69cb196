r"""Certifies a smoothed classifier on a dataset split (Cohen et al.'s CERTIFY).

For every --skip-th example of --split below index --max, draws --n0 noisy
samples to guess the top class and --n fresh ones to lower-bound its
probability; writes one row per example to --output, in the authors' format
`idx label predict radius correct time` (predict = -1: abstain, radius 0).
Rows are flushed as they are written; running the same command again resumes
after the last complete row. Summarize the TSV with bin/analyze.py.

Example (the README's demo: 100 Fashion-MNIST test images, n = 10,000):

  python bin/certify.py --model_dir=runs/fmnist_consistency_0.25 --max=100 \
      --n=10000 --output=runs/fmnist_consistency_0.25/certify_n10k.tsv

  python bin/certify.py --model=base_model.keras --dataset=fashion_mnist \
      --sigma=0.5 --skip=20 --output=certify.tsv

Sharded over 3 hosts or array tasks (i = 0, 1, 2; each shard resumes on its
own), then summarized as one run:

  python bin/certify.py --model_dir=runs/fmnist_consistency_0.25 --n=10000 \
      --num_shards=3 --shard_index=$i --output=runs/fmnist_consistency_0.25/certify_n10k.shard$i.tsv
  python bin/analyze.py runs/fmnist_consistency_0.25/certify_n10k.shard*.tsv

--strategy=mirrored splits each example's samples across the local GPUs.
"""

from absl import flags

from tf_consreg import cli  # Sets TensorFlow's environment before TensorFlow loads.
from tf_consreg import certify_run

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A bin/train.py run directory: its base_model.keras is "
                                 "certified, and its train_config.json gives --dataset, --sigma, --data_dir.")
_MODEL = flags.DEFINE_string("model", None, "A saved base model (.keras) instead of --model_dir; needs "
                             "--dataset and --sigma.")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset: fashion_mnist, mnist or cifar10 (default: the "
                               "training run's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the dataset files (default: the training "
                                "run's, else the standard locations).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to certify: test or train.")
_SIGMA = flags.DEFINE_float("sigma", None, "Noise level of the smoothed classifier (default: the sigma the "
                            "model was trained with).")
_N0 = flags.DEFINE_integer("n0", 100, "Selection samples per example (guess the top class).")
_N = flags.DEFINE_integer("n", 100000, "Estimation samples per example (bound the top class's probability).")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", certify_run.DEFAULT_BATCH_SIZE,
                                   "Noisy copies per forward pass. Part of the run's settings: it fixes how the "
                                   "noise is drawn, so a resumed run must use the same value.")
_SKIP = flags.DEFINE_integer("skip", 1, "Certify every skip-th example (idx = 0, skip, 2 skip, ...).")
_MAX = flags.DEFINE_integer("max", -1, "Stop before example index max (-1: the whole split).")
_OUTPUT = flags.DEFINE_string("output", None, "TSV file to write, or to resume if it holds the same run.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed; example idx uses the noise of (seed, idx).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Split the selected examples into this many shards, one "
                                   "per process or host; bin/analyze.py reports the shard files as one run.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "Which shard to certify, 0 <= shard_index < num_shards: "
                                    "the j-th selected example belongs to shard j mod num_shards.")
_STRATEGY = flags.DEFINE_string("strategy", "default", "default: one device. mirrored: each example's samples "
                                "are split across the local GPUs (or logical CPU devices), with other noise "
                                "than default, so the strategy and device count are part of the run's settings.")


def make_config() -> certify_run.CertifyConfig:
    """Builds the validated config from the flags."""
    return certify_run.CertifyConfig(
        output=_OUTPUT.value, model_dir=_MODEL_DIR.value, model=_MODEL.value, dataset=_DATASET.value,
        data_dir=_DATA_DIR.value, split=_SPLIT.value, sigma=_SIGMA.value, n0=_N0.value, n=_N.value,
        alpha=_ALPHA.value, batch_size=_BATCH_SIZE.value, skip=_SKIP.value, max=_MAX.value, seed=_SEED.value,
        num_shards=_NUM_SHARDS.value, shard_index=_SHARD_INDEX.value, strategy=_STRATEGY.value, mode="certify")


def main(argv):
    del argv
    config = make_config()
    written = certify_run.certify_dataset(config)
    print(f"certified {written} examples into {config.output}")


if __name__ == "__main__":
    cli.run(main)
