r"""Summarizes certification logs: ACR and certified accuracy per radius.

Reads TSV files written by bin/certify.py or the authors' certify.py and
prints, per file, the number of examples, the smoothed classifier's accuracy
('smoothed acc.', its certified accuracy at r = 0), the average certified radius (ACR) and the certified accuracy at
each radius (correct with radius >= r), as a Markdown table or JSON.

Example:

  python bin/analyze.py tests/testdata/reference_certify/mnist_*.tsv \
      --radii=0,0.5,1,1.5,2 --plot=mnist.png

  python bin/analyze.py runs/fmnist/certify.tsv --format=json
  python bin/analyze.py --tsv='runs/*/certify.tsv'    # the same files as a flag

The shard files of a sharded run (bin/certify.py --num_shards=K) are reported
as one run, found by the settings file bin/certify.py writes beside each TSV:

  python bin/analyze.py runs/fmnist/certify.shard*.tsv

Shards that overlap or come from runs of other settings are refused; so is a
run with missing or unfinished shards, unless --allow_incomplete (then it is
reported with a warning on stderr and marked incomplete).

A fixed-radius run (bin/certify.py --radii) decided each image at its radii
only, stopping as soon as they were settled, with a smaller radius than full
CERTIFY's: its table row has no ACR ("n/a") and a "samples/image" column
(the mean estimation samples; full CERTIFY runs show their n), and its
certified accuracy is reported at its radii (the default columns) and
nowhere else; --radii naming another radius is refused. A note under the
table says why such a run has no ACR:

  python bin/analyze.py runs/fmnist/certify_full.tsv runs/fmnist/certify_r0.5.tsv
  # | file | n | smoothed acc. | ACR | samples/image | r=0.5 |
  # ...
  # No ACR for a fixed-radius run (bin/certify.py --radii): ...

Installed with pip, this command is `tf-consreg-analyze`; from a checkout, `python bin/analyze.py`; either way
`python -m tf_consreg.commands.analyze`. The flags are the same.
"""

import sys

from tf_consreg import analysis
from tf_consreg import cli

_FLAGS = cli.define_flags(analysis.AnalyzeConfig, {
    "tsv": "Certification TSV files, comma-separated, besides those given as arguments; glob patterns (quoted) "
           "are expanded, e.g. --tsv='runs/*/certify.tsv'.",
    "radii": "Radii of the certified-accuracy columns, comma-separated. Default: 0, 0.25, ..., 2.5 (the paper's "
             "tables); with fixed-radius runs (bin/certify.py --radii), the radii they all decided. A radius a "
             "fixed-radius run did not decide is refused: its certified accuracy there would be biased low.",
    "format": "Output format: markdown or json.",
    "plot": "Also draw certified accuracy against radius for all files into this PNG (a fixed-radius run as "
            "points at its radii). An existing file is refused unless --overwrite.",
    "labels": "Names of the runs in the table and the plot legend, one per file (the shards of a sharded run "
              "count as one).",
    "model": "A saved .keras base model: adds its clean accuracy on each run's examples ('base acc. (clean)'), "
             "read from the dataset each run's settings name, beside the smoothed classifier's ('smoothed acc.'); "
             "logs without settings show n/a.",
    "data_dir": "Where that dataset lives (the runs' --data_dir); only with --model.",
    "allow_incomplete": "Report sharded runs with missing or unfinished shards (marked incomplete, with a "
                        "warning) instead of refusing them.",
    "overwrite": "Replace an existing --plot file.",
})


def make_config(files=()) -> analysis.AnalyzeConfig:
    """Builds the validated config from the flags; `files` (the arguments) come before --tsv's."""
    values = cli.flag_values(analysis.AnalyzeConfig, _FLAGS)
    values["tsv"] = tuple(files) + (values["tsv"] or ())
    return cli.config_from_values(analysis.AnalyzeConfig, values)


def _warn(message: str) -> None:
    print(f"analyze.py: warning: {message}", file=sys.stderr)


def main(argv):
    print(analysis.analyze(make_config(argv[1:]), warn=_warn), end="")


def run() -> None:
    """Runs the command on sys.argv: the console script tf-consreg-analyze, bin/analyze.py and `python -m`."""
    cli.run(main, positional=True)


if __name__ == "__main__":
    run()
