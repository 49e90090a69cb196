r"""Evaluates a smoothed classifier's prediction on a dataset split (Cohen et al.'s PREDICT).

For every --skip-th example below --max, draws --n noisy samples and returns
the top class, or abstains (-1) when the two-sided binomial test of the top
two counts gives a p-value above --alpha. Writes one row per example to
--output in the authors' format `idx label predict correct time`, flushed as
it goes; running the same command again resumes after the last complete row.

Example:

  python bin/predict.py --model_dir=runs/fmnist_consistency_0.25 --n=1000 \
      --alpha=0.001 --output=runs/fmnist_consistency_0.25/predict.tsv

Staged PREDICT (--stages): the samples are drawn in stages, at level
alpha / 2 at the last of K stages and alpha / (2 (K - 1)) at the others, and an example stops at the first stage
whose test rejects a tie; it abstains only if none did by --n. Far fewer
samples for the clear examples, at the same guarantee; the TSV gets the
column samples (the samples each example used):

  python bin/predict.py --model_dir=runs/fmnist_consistency_0.25 --n=100000 \
      --stages=100,300,1000,3000,10000,30000,50000,100000 \
      --output=runs/fmnist_consistency_0.25/predict_staged.tsv

--num_shards=K --shard_index=i evaluates every K-th selected example from the
i-th on (one shard per host or array task), --strategy=mirrored splits each
example's samples across the local GPUs, and --compute_dtype picks the
network sampled (float32 by default), as for bin/certify.py. So do --dataset
(every dataset bin/train.py trains on, imagenet2012 included) and --mock_data
(random images of the dataset's shape, for a smoke run without the data).
--noise=grid samples exact 8-bit grid noise as bin/certify.py does; its
test then runs at level alpha - n x (the sampler's total-variation slack).
"""

from tf_consreg import certify_run
from tf_consreg import cli

_FLAGS = cli.define_flags(certify_run.CertifyConfig, cli.PREDICT_HELP)


def main(argv):
    del argv
    config = cli.config_from_flags(certify_run.CertifyConfig, _FLAGS, mode="predict")
    written = certify_run.certify_dataset(config)
    print(f"predicted {written} examples into {config.output}")


def run() -> None:
    """Runs the command on sys.argv: the console script tf-consreg-predict, bin/predict.py and `python -m`."""
    cli.run(main)


if __name__ == "__main__":
    run()
