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
from tf_consreg import training as config_lib
from tf_consreg import tuning

_TUNING_DIR = flags.DEFINE_string("tuning_dir", None, "Directory of the search: keras-tuner project, trials, "
                                  "HParams summary, trials.md/.tsv, best.flags. The same flags resume it.")
_TUNER = flags.DEFINE_enum("tuner", "random", tuning.TUNERS, "random search, bayesian optimization (needs "
                           "scikit-learn) or hyperband.")
_MAX_TRIALS = flags.DEFINE_integer("max_trials", 10, "Most trials (Hyperband also stops when its brackets end).")
_EPOCHS_PER_TRIAL = flags.DEFINE_integer("epochs_per_trial", 10, "Training epochs of a trial (hyperband: the most "
                                         "epochs one model trains).")
_LBD_RANGE = flags.DEFINE_list("lbd_range", ["1", "20"], "lambda: lo,hi sampled on a log scale, or one value.")
_ETA_RANGE = flags.DEFINE_list("eta_range", ["0.1", "1"], "eta: lo,hi sampled uniformly, or one value.")
_NUM_NOISE_CHOICES = flags.DEFINE_list("num_noise_choices", ["2", "4"], "The values of m (noisy copies) to try.")
_SIGMA_RANGE = flags.DEFINE_list("sigma_range", None, "Not supported: sigma is fixed per search (--sigma), since "
                                 "certified radii at different sigma are not comparable.")
_OBJECTIVE = flags.DEFINE_enum("objective", "acr", tuning.OBJECTIVES, "Maximize the held-out images' average "
                               "certified radius, or their certified accuracy at --objective_radius.")
_OBJECTIVE_RADIUS = flags.DEFINE_float("objective_radius", None, "Radius of --objective=certified_accuracy.")
_CERTIFY_EXAMPLES = flags.DEFINE_integer("certify_examples", 200, "Images held out of the END of the training "
                                         "split (never trained on) and certified to score each trial.")
_CERTIFY_N0 = flags.DEFINE_integer("certify_n0", 100, "CERTIFY's selection samples per image.")
_CERTIFY_N = flags.DEFINE_integer("certify_n", 1000, "CERTIFY's estimation samples per image.")
_CERTIFY_ALPHA = flags.DEFINE_float("certify_alpha", 0.001, "CERTIFY's failure probability.")
_CERTIFY_BATCH_SIZE = flags.DEFINE_integer("certify_batch_size", 1000, "Noisy copies per forward pass when "
                                           "certifying.")
_CERTIFY_EVERY = flags.DEFINE_integer("certify_every", 0, "Also certify every this many epochs within a trial, "
                                      "for TensorBoard (0: only after its last epoch, which scores it).")

# The training flags every trial shares; as bin/train.py's.
_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "Dataset: fashion_mnist, mnist or cifar10.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset files (see bin/train.py --data_dir).")
_ARCH = flags.DEFINE_string("arch", "lenet", "Architecture (see tf_consreg.models.ARCHITECTURES).")
_SIGMA = flags.DEFINE_float("sigma", 0.25, "Noise standard deviation, in [0, 1] pixel units; fixed per search.")
_CONSISTENCY_LOSS = flags.DEFINE_string("consistency_loss", None, "Form of the consistency term (see "
                                        "bin/train.py; default 'default').")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Clean images per optimizer step.")
_LR = flags.DEFINE_float("lr", 0.01, "Initial learning rate of SGD.")
_LR_STEP_SIZE = flags.DEFINE_integer("lr_step_size", 30, "Multiply the learning rate by --lr_gamma every this "
                                     "many epochs.")
_LR_GAMMA = flags.DEFINE_float("lr_gamma", 0.1, "Learning-rate decay factor.")
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 1e-4, "L2 weight decay, coupled as in PyTorch's SGD.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every trial's training and certification, and of the search.")
_TRAIN_EXAMPLES = flags.DEFINE_integer("train_examples", 0, "Train each trial on the first N images of the "
                                       "training split (0 = all but the --certify_examples held-out ones).")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 0, "Test images for the per-epoch noisy accuracy in "
                                      "TensorBoard (0 = none; the search never scores on the test set).")
_STRATEGY = flags.DEFINE_string("strategy", "auto", "auto, default or mirrored (see bin/train.py).")


_HANDLES = (_TUNING_DIR, _TUNER, _MAX_TRIALS, _EPOCHS_PER_TRIAL, _LBD_RANGE, _ETA_RANGE, _NUM_NOISE_CHOICES,
            _OBJECTIVE, _OBJECTIVE_RADIUS, _CERTIFY_EXAMPLES, _CERTIFY_N0, _CERTIFY_N, _CERTIFY_ALPHA,
            _CERTIFY_BATCH_SIZE, _CERTIFY_EVERY, _DATASET, _DATA_DIR, _ARCH, _SIGMA, _CONSISTENCY_LOSS, _BATCH_SIZE,
            _LR, _LR_STEP_SIZE, _LR_GAMMA, _MOMENTUM, _WEIGHT_DECAY, _SEED, _TRAIN_EXAMPLES, _EVAL_EXAMPLES,
            _STRATEGY)


def flags_text() -> str:
    """The resolved flags as a flagfile (`--flagfile=` repeats the search)."""
    return "".join(flags.FLAGS[h.name].serialize() + "\n" for h in _HANDLES if h.value is not None)


def make_config() -> tuning.TuneConfig:
    """Builds the validated search config from the flags."""
    if _SIGMA_RANGE.value is not None:
        raise config_lib.ConfigError("--sigma_range: sigma is fixed per search, since certified radii at different "
                                     "sigma are not comparable; run one search per --sigma")
    if not _TUNING_DIR.value:
        raise config_lib.ConfigError("--tuning_dir is required: the directory of the search, its trials and results")
    lbd_range = tuning.parse_numbers("lbd_range", _LBD_RANGE.value)
    eta_range = tuning.parse_numbers("eta_range", _ETA_RANGE.value)
    num_noise_choices = tuning.parse_integers("num_noise_choices", _NUM_NOISE_CHOICES.value)
    train = config_lib.TrainConfig(
        model_dir=_TUNING_DIR.value, dataset=_DATASET.value, arch=_ARCH.value, method="consistency",
        sigma=_SIGMA.value, consistency_loss=_CONSISTENCY_LOSS.value, batch_size=_BATCH_SIZE.value, lr=_LR.value,
        lr_step_size=_LR_STEP_SIZE.value, lr_gamma=_LR_GAMMA.value, momentum=_MOMENTUM.value,
        weight_decay=_WEIGHT_DECAY.value, seed=_SEED.value, train_examples=_TRAIN_EXAMPLES.value,
        eval_examples=_EVAL_EXAMPLES.value, data_dir=_DATA_DIR.value, strategy=_STRATEGY.value)
    return tuning.TuneConfig(
        tuning_dir=_TUNING_DIR.value, train=train, tuner=_TUNER.value, max_trials=_MAX_TRIALS.value,
        epochs_per_trial=_EPOCHS_PER_TRIAL.value, lbd_range=lbd_range, eta_range=eta_range,
        num_noise_choices=num_noise_choices, objective=_OBJECTIVE.value, objective_radius=_OBJECTIVE_RADIUS.value,
        certify_examples=_CERTIFY_EXAMPLES.value, certify_n0=_CERTIFY_N0.value, certify_n=_CERTIFY_N.value,
        certify_alpha=_CERTIFY_ALPHA.value, certify_batch_size=_CERTIFY_BATCH_SIZE.value,
        certify_every=_CERTIFY_EVERY.value)


def main(argv):
    del argv
    config = make_config()
    rows = tuning.search(config, flags_text=flags_text())
    print(tuning.markdown_table(config, rows), end="")
    if rows and rows[0].rank is not None:
        print(f"Best trial's training flags: {config.tuning_dir}/{tuning.BEST_FLAGS}")


if __name__ == "__main__":
    cli.run(main)
