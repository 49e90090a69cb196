r"""Evaluates a smoothed classifier's prediction on a dataset split (Cohen et al.'s PREDICT).

For every --skip-th example below --max, draws --n noisy samples and returns
the top class, or abstains (-1) when the two-sided binomial test of the top
two counts gives a p-value above --alpha. Writes one row per example to
--output in the authors' format `idx label predict correct time`, flushed as
it goes; running the same command again resumes after the last complete row.

Example:

  python bin/predict.py --model_dir=runs/fmnist_consistency_0.25 --n=1000 \
      --alpha=0.001 --output=runs/fmnist_consistency_0.25/predict.tsv

--num_shards=K --shard_index=i evaluates every K-th selected example from the
i-th on (one shard per host or array task), --strategy=mirrored splits each
example's samples across the local GPUs, as for bin/certify.py.
"""

from absl import flags

from tf_consreg import cli  # Sets TensorFlow's environment before TensorFlow loads.
from tf_consreg import certify_run

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A bin/train.py run directory: its base_model.keras is "
                                 "evaluated, and its train_config.json gives --dataset, --sigma, --data_dir.")
_MODEL = flags.DEFINE_string("model", None, "A saved base model (.keras) instead of --model_dir; needs "
                             "--dataset and --sigma.")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset: fashion_mnist, mnist or cifar10 (default: the "
                               "training run's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the dataset files (default: the training "
                                "run's, else the standard locations).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate: test or train.")
_SIGMA = flags.DEFINE_float("sigma", None, "Noise level of the smoothed classifier (default: the sigma the "
                            "model was trained with).")
_N = flags.DEFINE_integer("n", 100000, "Samples per example.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability: abstain unless the top class wins the "
                            "binomial test at this level.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", certify_run.DEFAULT_BATCH_SIZE,
                                   "Noisy copies per forward pass. Part of the run's settings: it fixes how the "
                                   "noise is drawn, so a resumed run must use the same value.")
_SKIP = flags.DEFINE_integer("skip", 1, "Evaluate every skip-th example (idx = 0, skip, 2 skip, ...).")
_MAX = flags.DEFINE_integer("max", -1, "Stop before example index max (-1: the whole split).")
_OUTPUT = flags.DEFINE_string("output", None, "TSV file to write, or to resume if it holds the same run.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed; example idx uses the noise of (seed, idx).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Split the selected examples into this many shards, one "
                                   "per process or host; bin/analyze.py reports the shard files as one run.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "Which shard to evaluate, 0 <= shard_index < num_shards: "
                                    "the j-th selected example belongs to shard j mod num_shards.")
_STRATEGY = flags.DEFINE_string("strategy", "default", "default: one device. mirrored: each example's samples "
                                "are split across the local GPUs (or logical CPU devices), with other noise "
                                "than default, so the strategy and device count are part of the run's settings.")


def make_config() -> certify_run.CertifyConfig:
    """Builds the validated config from the flags."""
    return certify_run.CertifyConfig(
        output=_OUTPUT.value, model_dir=_MODEL_DIR.value, model=_MODEL.value, dataset=_DATASET.value,
        data_dir=_DATA_DIR.value, split=_SPLIT.value, sigma=_SIGMA.value, n=_N.value, alpha=_ALPHA.value,
        batch_size=_BATCH_SIZE.value, skip=_SKIP.value, max=_MAX.value, seed=_SEED.value,
        num_shards=_NUM_SHARDS.value, shard_index=_SHARD_INDEX.value, strategy=_STRATEGY.value, mode="predict")


def main(argv):
    del argv
    config = make_config()
    written = certify_run.certify_dataset(config)
    print(f"predicted {written} examples into {config.output}")


if __name__ == "__main__":
    cli.run(main)
