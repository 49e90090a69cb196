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
--help describes every flag.

Every dataset bin/train.py trains on is certified, imagenet2012 included,
in the test view that training evaluates on (resize 256, center crop 224).
Examples are read by index, streaming, so no split has to fit in memory.
--mock_data certifies random images of the dataset's shape instead, as
bin/train.py's --mock_data trains on them (a smoke run without the data):

  python bin/certify.py --model_dir=runs/imagenet_consistency_0.50 --skip=100 \
      --output=runs/imagenet_consistency_0.50/certify.tsv
  python bin/certify.py --model=base_model.keras --dataset=imagenet2012 --sigma=0.5 \
      --mock_data --max=3 --n=1000 --output=/tmp/mock_certify.tsv

The base model computes in float32, whatever policy it was trained under;
--compute_dtype=bfloat16 certifies its bfloat16 network instead (the network
a --mixed_precision=mixed_bfloat16 run computes). The settings file beside
the TSV records which.

--noise=grid samples exact integer noise on the 8-bit grid, sound in
floating point (Voráček & Hein 2023); the examples must be 8-bit images (the
run stops naming the first off-grid pixel). The default, --noise=float, is
today's sampler. The settings file records a grid run's mode, so a resume
or a merge of shards never mixes the two.

Fixed-radius mode (--radii): answers "is this example certified at r?" for
the given radii only. The estimation samples are drawn in --stages and an
example stops as soon as its answer at every radius is settled, at the same
1 - alpha guarantee (the last stage's bounds at level alpha / 2, each earlier
stage's at alpha / (2 (K - 1)) for K stages).
The default stages are --n x (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1)
from max(--n0, 100) on: 100,300,1000,3000,10000,30000,50000,100000 for
--n=100000. Why: steps of about sqrt(10) settle most examples after a few
hundred or thousand samples for a small share of alpha each, and the 0.5
stage lets examples whose radius is near the largest asked one stop halfway;
bench/staged_sim_bench.py chose it among 7 schedules on the authors' logs.

The TSV adds the column samples; its radius column is the radius certified
where the example stopped (rounded down), so "radius >= r" is the run's
decision at each r of --radii, but it is smaller than full CERTIFY's:
bin/analyze.py reports such a run at its radii, without an ACR.

  python bin/certify.py --model_dir=runs/fmnist_consistency_0.25 --radii=0.25,0.5 \
      --output=runs/fmnist_consistency_0.25/certify_r0.25_0.5.tsv
"""

from tf_consreg import certify_run
from tf_consreg import cli

_FLAGS = cli.define_flags(certify_run.CertifyConfig, cli.CERTIFY_HELP)


def main(argv):
    del argv
    config = cli.config_from_flags(certify_run.CertifyConfig, _FLAGS, mode="certify")
    written = certify_run.certify_dataset(config)
    print(f"certified {written} examples into {config.output}")


def run() -> None:
    """Runs the command on sys.argv: the console script tf-consreg-certify, bin/certify.py and `python -m`."""
    cli.run(main)


if __name__ == "__main__":
    run()
