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

The base model computes in float32, whatever policy it was trained under;
--compute_dtype=bfloat16 certifies its bfloat16 network instead (the network
a --mixed_precision=mixed_bfloat16 run computes). The settings file beside
the TSV records which.
"""

from tf_consreg import certify_run
from tf_consreg import cli

_FLAGS = cli.define_flags(certify_run.CertifyConfig, cli.CERTIFY_HELP)


def main(argv):
    del argv
    config = cli.config_from_flags(certify_run.CertifyConfig, _FLAGS, mode="certify")
    written = certify_run.certify_dataset(config)
    print(f"certified {written} examples into {config.output}")


if __name__ == "__main__":
    cli.run(main)
