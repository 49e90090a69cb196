r"""Searches lambda, eta and m of consistency regularization with keras-tuner, maximizing certified robustness.

Every trial trains a base classifier like bin/train.py (its own run directory
under --tuning_dir/trials, with checkpoints and TensorBoard logs), then
certifies --certify_examples images held out of the end of the TRAINING split
(never the test set) at --certify_n samples, and scores the trial by their
average certified radius (--objective=acr) or certified accuracy at
--objective_radius. sigma is fixed per search: certificates at different sigma
are not comparable. Running the same command again resumes an interrupted
search; a larger --max_trials extends a finished one.

--tuning_dir gets the keras-tuner project (search/), the trials (trials/), a
TensorBoard HParams summary (hparams/; `tensorboard --logdir=<tuning_dir>`,
tab HPARAMS), the ranked trials (trials.md, trials.tsv) and the best trial's
training flags (best.flags).

Example (a tiny search on Fashion-MNIST at sigma = 0.5):

  python bin/tune.py --tuning_dir=runs/tune_fmnist_0.50 --sigma=0.5 \
      --tuner=random --max_trials=8 --epochs_per_trial=5 \
      --lbd_range=1,20 --eta_range=0.5 --num_noise_choices=2,4 \
      --train_examples=10000 --certify_examples=200 --certify_n=1000

  python bin/train.py --flagfile=runs/tune_fmnist_0.50/best.flags \
      --model_dir=runs/fmnist_best_0.50 --epochs=90 --train_examples=0
"""

from absl import flags

from tf_consreg import cli  # Sets TensorFlow's environment before TensorFlow loads.
from tf_consreg import run_config
from tf_consreg import tuning
from tf_consreg.errors import ConfigError

# One flag per field of TuneConfig, which states its type and default.
_TUNE_FLAGS = cli.define_flags(tuning.TuneConfig, {
    "tuning_dir": "Directory of the search: keras-tuner project, trials, HParams summary, trials.md/.tsv, "
                  "best.flags. The same flags resume it.",
    "tuner": "random (random search), bayesian (Bayesian optimization; needs scikit-learn) or hyperband.",
    "max_trials": "Most trials (Hyperband also stops when its brackets end).",
    "epochs_per_trial": "Training epochs of a trial (hyperband: the most epochs one model trains).",
    "lbd_range": "lambda: lo,hi sampled on a log scale, or one value.",
    "eta_range": "eta: lo,hi sampled uniformly, or one value.",
    "num_noise_choices": "The values of m (noisy copies) to try.",
    "objective": "acr or certified_accuracy: maximize the held-out images' average certified radius, or their "
                 "certified accuracy at --objective_radius.",
    "objective_radius": "Radius of --objective=certified_accuracy.",
    "certify_examples": "Images held out of the END of the training split (never trained on) and certified to "
                        "score each trial.",
    "certify_n0": "CERTIFY's selection samples per image.",
    "certify_n": "CERTIFY's estimation samples per image.",
    "certify_alpha": "CERTIFY's failure probability.",
    "certify_batch_size": "Noisy copies per forward pass when certifying.",
    "certify_every": "Also certify every this many epochs within a trial, for TensorBoard (0: only after its last "
                     "epoch, which scores it).",
})
# The training flags every trial shares, as bin/train.py's; no evaluation on
# the test set by default (the search never scores on it).
_TRAIN_FLAGS = cli.define_flags(
    run_config.TrainConfig,
    {**{name: cli.TRAIN_HELP[name] for name in tuning.TRAIN_FLAGS},
     "seed": "Seed of every trial's training and certification, and of the search."},
    defaults={"eval_examples": 0})
_SIGMA_RANGE = flags.DEFINE_list("sigma_range", None, "Not supported: sigma is fixed per search (--sigma), since "
                                 "certified radii at different sigma are not comparable.")


def make_config() -> tuning.TuneConfig:
    """Builds the validated search config from the flags."""
    if _SIGMA_RANGE.value is not None:
        raise ConfigError("--sigma_range: sigma is fixed per search, since certified radii at different sigma are "
                          "not comparable; run one search per --sigma")
    # Each trial trains in its own directory under --tuning_dir (TuneConfig sets them).
    train = cli.config_from_flags(run_config.TrainConfig, _TRAIN_FLAGS, model_dir=tuning.TRIALS_DIR)
    return cli.config_from_flags(tuning.TuneConfig, _TUNE_FLAGS, train=train)


def main(argv):
    del argv
    config = make_config()
    rows = tuning.search(config)
    print(tuning.markdown_table(config, rows), end="")
    if rows and rows[0].rank is not None:
        print(f"Best trial's training flags: {config.tuning_dir}/{tuning.BEST_FLAGS}")


def run() -> None:
    """Runs the command on sys.argv: the console script tf-consreg-tune, bin/tune.py and `python -m`."""
    cli.run(main)


if __name__ == "__main__":
    run()
