"""Hyperparameter search over lambda, eta and m of consistency regularization, with keras-tuner.

Each trial is an ordinary training run (`training.train`) in its own model
directory under `<tuning_dir>/trials/`, with checkpoints, TensorBoard logs
and `base_model.keras`, plus a `callbacks.CertifyCallback` that certifies a
subset held out of the TRAINING split (never the test set) after the trial's
last epoch. The trial's score is that subset's average certified radius
(`val_acr`) or its certified accuracy at one radius.

sigma is fixed for the whole search: certified radii at different sigma are
not comparable, and a larger sigma alone buys larger radii.

What a search writes to `tuning_dir`:

* `search/`: the keras-tuner project (oracle state and one `trial.json` per
  trial); running the same search again reloads it and goes on where it
  stopped, re-running a trial that was interrupted (its training resumes
  from its last checkpoint);
* `trials/trial_<id>/`: each trial's training run;
* `hparams/`: a TensorBoard HParams summary (the search space, then one run
  per completed trial with its validation numbers);
* `trials.md`, `trials.tsv`: all trials, best first;
* `best.flags`: the best trial's training flags, for `bin/train.py --flagfile=`;
* `tune_config.json`: the search's settings; a search with other settings is
  refused in the same directory; `flags.txt`: the flags that started it.
"""

import dataclasses
import glob
import importlib.util
import json
import math
import os
import shutil
import traceback
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp_api

from tf_consreg import analysis
from tf_consreg import callbacks
from tf_consreg import certify_spec
from tf_consreg import cli
from tf_consreg import data as data_lib
from tf_consreg import files
from tf_consreg import models
from tf_consreg import precision
from tf_consreg import run_config
from tf_consreg import training
from tf_consreg.certify_spec import CertifySpec
from tf_consreg.errors import ConfigError
from tf_consreg.run_config import TrainConfig

TUNERS = ("random", "bayesian", "hyperband")
OBJECTIVES = ("acr", "certified_accuracy")

PROJECT_NAME = "search"
TRIALS_DIR = "trials"
HPARAMS_DIR = "hparams"
TABLE_MARKDOWN = "trials.md"
TABLE_TSV = "trials.tsv"
BEST_FLAGS = "best.flags"
TUNE_CONFIG_FILE = "tune_config.json"
HYPERBAND_FACTOR = 3
# bin/train.py's flags a search takes, shared by every trial; the method is
# consistency, and lbd, eta and num_noise are searched.
TRAIN_FLAGS = ("dataset", "data_dir", "arch", "sigma", "consistency_loss", "batch_size", "lr", "lr_step_size",
               "lr_gamma", "momentum", "weight_decay", "seed", "train_examples", "eval_examples", "strategy",
               "mixed_precision")
# Settings that may change when a search is resumed.
_RESUMABLE_CHANGES = ("max_trials",)


# --------------------------------------------------------------------------
# Settings.


def _check_range(flag: str, values: Sequence[float], minimum: float, *, inclusive: bool, symbol: str,
                 example: str) -> None:
    """A range is `lo,hi` with lo < hi, or one value that fixes the hyperparameter."""
    text = ",".join(f"{v:g}" for v in values)
    if not values:
        raise ConfigError(f"--{flag} is empty; give lo,hi (e.g. --{flag}={example}) or one value to fix {symbol}")
    if len(values) > 2:
        raise ConfigError(f"--{flag}={text}: give lo,hi or one value, not {len(values)} numbers")
    for v in values:
        if not math.isfinite(v) or (v < minimum if inclusive else v <= minimum):
            bound = ">=" if inclusive else ">"
            raise ConfigError(f"--{flag}={text}: values must be finite and {bound} {minimum:g}"
                              + (" (sampled on a log scale)" if not inclusive else ""))
    if len(values) == 2:
        lo, hi = values
        if lo == hi:
            raise ConfigError(f"--{flag}={text} is an empty range; give lo < hi, or one value "
                              f"(--{flag}={lo:g}) to fix {symbol}")
        if lo > hi:
            raise ConfigError(f"--{flag}={text} is inverted; give lo,hi with lo < hi (--{flag}={hi:g},{lo:g})")


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """A hyperparameter search, checked at construction.

    Attributes mirror the flags of bin/tune.py; see its --help.

    Attributes:
      tuning_dir: where the search writes everything (see the module docstring).
      train: the training settings shared by every trial (method
        "consistency"); each trial replaces its `model_dir`, `lbd`, `eta`,
        `num_noise` and `epochs`.
      tuner: "random", "bayesian" (Gaussian-process Bayesian optimization;
        needs scikit-learn) or "hyperband".
      max_trials: most trials (Hyperband also stops when its brackets are done).
      epochs_per_trial: epochs of one trial (Hyperband: the most epochs one
        model trains, its `max_epochs`).
      lbd_range: lambda as (lo, hi), sampled on a log scale, or (value,).
      eta_range: eta as (lo, hi), sampled uniformly, or (value,).
      num_noise_choices: the values of m to try.
      objective: maximize "acr" (`val_acr`) or "certified_accuracy" at
        `objective_radius`.
      objective_radius: the radius of "certified_accuracy".
      certify_examples: images held out of the end of the training split.
      certify: CERTIFY's settings on them (flags `run_config.CERTIFY_FLAGS`;
        default `certify_spec.LIVE`), at the search's sigma.
      certify_every: also certify every this many epochs within a trial, for
        the TensorBoard curves (0: only after the trial's last epoch).
    """

    tuning_dir: str
    train: TrainConfig
    tuner: str = "random"
    max_trials: int = 10
    epochs_per_trial: int = 10
    lbd_range: Tuple[float, ...] = (1.0, 20.0)
    eta_range: Tuple[float, ...] = (0.1, 1.0)
    num_noise_choices: Tuple[int, ...] = (2, 4)
    objective: str = "acr"
    objective_radius: Optional[float] = None
    certify_examples: int = run_config.CERTIFY_EXAMPLES
    certify: CertifySpec = dataclasses.field(default=certify_spec.LIVE,
                                             metadata={cli.FLAG_PREFIX: run_config.CERTIFY_PREFIX})
    certify_every: int = 0

    def __post_init__(self):
        if not self.tuning_dir:
            raise ConfigError("--tuning_dir is required: the directory of the search, its trials and results")
        if self.tuner not in TUNERS:
            raise ConfigError(f"--tuner={self.tuner!r} is unknown; choose one of {', '.join(TUNERS)}")
        if self.tuner == "bayesian" and importlib.util.find_spec("sklearn") is None:
            raise ConfigError("--tuner=bayesian needs scikit-learn (keras-tuner's Gaussian process): "
                              "pip install scikit-learn, or use --tuner=random or --tuner=hyperband")
        if self.max_trials < 1:
            raise ConfigError(f"--max_trials must be >= 1, got {self.max_trials}")
        if self.epochs_per_trial < 1:
            raise ConfigError(f"--epochs_per_trial must be >= 1, got {self.epochs_per_trial}")
        for name in ("lbd_range", "eta_range", "num_noise_choices"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_range("lbd_range", self.lbd_range, 0.0, inclusive=False, symbol="lambda", example="1,20")
        _check_range("eta_range", self.eta_range, 0.0, inclusive=True, symbol="eta", example="0.1,1")
        choices = self.num_noise_choices
        if not choices:
            raise ConfigError("--num_noise_choices is empty; give the values of m to try, e.g. 2,4")
        if any(isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1 for m in choices):
            raise ConfigError(f"--num_noise_choices: values must be integers >= 1, got {choices}")
        if len(set(choices)) != len(choices):
            raise ConfigError(f"--num_noise_choices: {choices} repeats a value")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective={self.objective!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == "certified_accuracy":
            if self.objective_radius is None:
                raise ConfigError("--objective=certified_accuracy needs --objective_radius, e.g. 0.5")
            if not (math.isfinite(self.objective_radius) and self.objective_radius >= 0):
                raise ConfigError(f"--objective_radius must be finite and >= 0, got {self.objective_radius}")
        elif self.objective_radius is not None:
            raise ConfigError("--objective_radius is used only with --objective=certified_accuracy; remove it "
                              "for --objective=acr")
        for name, minimum in (("certify_examples", 1), ("certify_every", 0)):
            if getattr(self, name) < minimum:
                raise ConfigError(f"--{name} must be >= {minimum}, got {getattr(self, name)}")
        self._check_train()
        object.__setattr__(self, "certify", run_config.live_certify_spec(self.certify, self.train.sigma))

    def _check_train(self) -> None:
        if self.train.objective.method != "consistency":
            raise ConfigError(f"a search tunes --method=consistency; got --method={self.train.objective.method}")
        train = dataclasses.replace(self.train, model_dir=os.path.join(self.tuning_dir, TRIALS_DIR),
                                    epochs=self.epochs_per_trial)
        object.__setattr__(self, "train", train)
        # Every corner of the space must be a valid training run.
        for m in self.num_noise_choices:
            for lbd in self.lbd_range:
                for eta in self.eta_range:
                    try:
                        _tuned(train, num_noise=m, lbd=lbd, eta=eta)
                    except ConfigError as e:
                        raise ConfigError(f"--num_noise_choices={m}: {e}") from None

    @property
    def objective_metric(self) -> str:
        """The epoch-log key the search maximizes."""
        if self.objective == "acr":
            return "val_acr"
        return f"val_certified_accuracy_{callbacks.radius_name(self.objective_radius)}"

    @property
    def radii(self) -> Tuple[float, ...]:
        """Radii of the logged certified accuracies (the callback's, plus the objective's)."""
        radii = set(callbacks.DEFAULT_RADII)
        if self.objective_radius is not None:
            radii.add(float(self.objective_radius))
        return tuple(sorted(radii))

    def trial_dir(self, trial_id: str) -> str:
        """The training run directory of a trial."""
        return os.path.join(self.tuning_dir, TRIALS_DIR, f"trial_{trial_id}")

    def to_flags(self) -> str:
        """The search as a flagfile of bin/tune.py (`cli.format_flags`); `--flagfile=` repeats it."""
        values = self._flag_values()
        train = self.train.to_dict()
        values.update({name: train[name] for name in TRAIN_FLAGS})
        return cli.format_flags(values)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready settings by flag name (tuples as lists; `train` as its flags)."""
        values = {**self._flag_values(), "train": self.train.to_dict()}
        return json.loads(json.dumps(values))

    def _flag_values(self) -> Dict[str, Any]:
        """bin/tune.py's own flags' values, by name (live certification's among them)."""
        own = [f.name for f in dataclasses.fields(self) if f.name not in ("train", "certify")]
        return cli.flat_values(self, own + list(run_config.CERTIFY_FLAGS))


def trial_config(config: TuneConfig, values: Mapping[str, Any], trial_id: str, train_examples: int) -> TrainConfig:
    """The training run of one trial.

    Args:
      config: the search.
      values: the trial's hyperparameter values (`lbd`, `eta`, `num_noise`,
        and Hyperband's `tuner/epochs`).
      trial_id: keras-tuner's trial id.
      train_examples: training images per trial (the split minus the held-out ones).
    """
    return _tuned(config.train, num_noise=values["num_noise"], lbd=values["lbd"], eta=values["eta"],
                  model_dir=config.trial_dir(trial_id), train_examples=train_examples,
                  epochs=int(values.get("tuner/epochs", config.epochs_per_trial)))


def _tuned(train: TrainConfig, *, num_noise: int, lbd: float, eta: float, **fields) -> TrainConfig:
    """`train` at one point of the search space, with `fields` replaced too."""
    objective = dataclasses.replace(train.objective, num_noise=int(num_noise), lbd=float(lbd), eta=float(eta))
    return dataclasses.replace(train, objective=objective, **fields)


# --------------------------------------------------------------------------
# Results.


@dataclasses.dataclass(frozen=True)
class TrialRow:
    """One trial of the ranked table.

    Attributes:
      rank: 1 = best; None for trials that did not complete.
      trial_id: keras-tuner's trial id.
      lbd, eta, num_noise: its hyperparameters.
      epochs: epochs it trained.
      status: keras-tuner's status (COMPLETED, RUNNING, FAILED, ...).
      metrics: its last reported validation numbers (`val_acr`, ...).
    """

    rank: Optional[int]
    trial_id: str
    lbd: float
    eta: float
    num_noise: int
    epochs: int
    status: str
    metrics: Dict[str, float]


def ranked_trials(config: TuneConfig, trials: Iterable[Any]) -> List[TrialRow]:
    """keras-tuner trials as table rows: completed ones by objective (best first), then the others.

    Args:
      config: the search.
      trials: `keras_tuner` Trial objects (e.g. `oracle.trials.values()`).
    """
    rows = []
    for trial in trials:
        values = trial.hyperparameters.values
        metrics = {name: float(trial.metrics.get_last_value(name)) for name in trial.metrics.metrics
                   if trial.metrics.get_last_value(name) is not None}
        rows.append(TrialRow(rank=None, trial_id=trial.trial_id, lbd=float(values["lbd"]), eta=float(values["eta"]),
                             num_noise=int(values["num_noise"]),
                             epochs=int(values.get("tuner/epochs", config.epochs_per_trial)),
                             status=str(trial.status), metrics=metrics))
    key = config.objective_metric
    done = [r for r in rows if r.status == "COMPLETED" and key in r.metrics]
    done.sort(key=lambda r: (-r.metrics[key], r.trial_id))
    others = sorted((r for r in rows if r not in done), key=lambda r: r.trial_id)
    return [dataclasses.replace(r, rank=i) for i, r in enumerate(done, start=1)] + others


def _columns(config: TuneConfig) -> List[Tuple[str, str]]:
    """(TSV name, Markdown header) of the metric columns."""
    # val_smoothed_accuracy is the smoothed classifier's accuracy (callbacks.py): analyze's "smoothed acc.".
    columns = [("val_acr", "val ACR"), ("val_smoothed_accuracy", analysis.SMOOTHED_ACCURACY)]
    if config.objective == "certified_accuracy":
        columns.append((config.objective_metric, f"cert. acc. r={config.objective_radius:g}"))
    return columns + [("val_abstain_rate", "abstained")]


def tsv_table(config: TuneConfig, rows: Sequence[TrialRow]) -> str:
    """The ranked trials as TSV (full precision; empty cells for missing values)."""
    columns = _columns(config)
    header = ["rank", "trial", "lbd", "eta", "num_noise", "epochs"] + [c for c, _ in columns] + ["status"]
    lines = ["\t".join(header)]
    for r in rows:
        cells = ["" if r.rank is None else str(r.rank), r.trial_id, repr(r.lbd), repr(r.eta), str(r.num_noise),
                 str(r.epochs)]
        cells += [repr(r.metrics[c]) if c in r.metrics else "" for c, _ in columns]
        lines.append("\t".join(cells + [r.status]))
    return "\n".join(lines) + "\n"


def markdown_table(config: TuneConfig, rows: Sequence[TrialRow]) -> str:
    """The ranked trials as a Markdown table; "smoothed acc." is the smoothed classifier's accuracy."""
    columns = _columns(config)
    header = ["rank", "trial", "λ", "η", "m", "epochs"] + [h for _, h in columns] + ["status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + "---|"]
    for r in rows:
        cells = ["-" if r.rank is None else str(r.rank), r.trial_id, f"{r.lbd:.4g}", f"{r.eta:.3f}",
                 str(r.num_noise), str(r.epochs)]
        cells += [(f"{r.metrics[c]:.4f}" if c == "val_acr" else f"{r.metrics[c]:.3f}") if c in r.metrics else "-"
                  for c, _ in columns]
        lines.append("| " + " | ".join(cells + [r.status]) + " |")
    return "\n".join(lines) + "\n"


def best_flags_text(config: TuneConfig, best: TrialRow, num_trials: int) -> str:
    """The flagfile of the best trial: its training flags without --model_dir, after a comment."""
    trial = run_config.read_train_config(config.trial_dir(best.trial_id))
    metric = config.objective_metric
    return (
        f"# Best of {num_trials} trial(s) in {config.tuning_dir}: trial {best.trial_id}, "
        f"{metric}={best.metrics[metric]:.4f}\n"
        f"# on {config.certify_examples} images held out of the training split (n={config.certify.n}).\n"
        "# Its training flags without --model_dir; flags after --flagfile override them, e.g.\n"
        f"#   python bin/train.py --flagfile={os.path.join(config.tuning_dir, BEST_FLAGS)} --model_dir=runs/best "
        "--epochs=90 --train_examples=0\n"
        + trial.to_flags(exclude=("model_dir",)))


# --------------------------------------------------------------------------
# TensorBoard HParams.


def write_hparams_config(config: TuneConfig) -> None:
    """Writes the HParams experiment (space and metrics) once, to `<tuning_dir>/hparams`."""
    directory = os.path.join(config.tuning_dir, HPARAMS_DIR)
    if glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        return

    def interval(values):
        return hp_api.RealInterval(float(values[0]), float(values[-1]))

    hparams = [
        hp_api.HParam("lbd", interval(config.lbd_range), display_name="λ"),
        hp_api.HParam("eta", interval(config.eta_range), display_name="η"),
        hp_api.HParam("num_noise", hp_api.Discrete(list(config.num_noise_choices)), display_name="m"),
        hp_api.HParam("epochs", hp_api.IntInterval(1, config.epochs_per_trial)),
    ]
    names = ["acr", "smoothed_accuracy", "abstain_rate"] + [
        f"certified_accuracy_{callbacks.radius_name(r)}" for r in config.radii]
    metrics = [hp_api.Metric(f"val/{name}", display_name=f"val {name}") for name in names]
    writer = tf.summary.create_file_writer(directory)
    with writer.as_default():
        hp_api.hparams_config(hparams=hparams, metrics=metrics)
    writer.close()


def write_hparams_session(config: TuneConfig, row: TrialRow) -> None:
    """Writes one completed trial as an HParams run `<tuning_dir>/hparams/trial_<id>` (once)."""
    run_dir = os.path.join(config.tuning_dir, HPARAMS_DIR, f"trial_{row.trial_id}")
    if os.path.isdir(run_dir):
        return
    tmp = run_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = tf.summary.create_file_writer(tmp)
    with writer.as_default(step=row.epochs):
        hp_api.hparams({"lbd": row.lbd, "eta": row.eta, "num_noise": row.num_noise, "epochs": row.epochs},
                       trial_id=row.trial_id)
        for name, value in row.metrics.items():
            if name.startswith("val_"):
                tf.summary.scalar("val/" + name[len("val_"):], value)
    writer.close()
    os.replace(tmp, run_dir)  # A run appears complete or not at all.


def write_reports(config: TuneConfig, trials: Iterable[Any]) -> List[TrialRow]:
    """Writes the ranked tables, best.flags and the HParams runs of completed trials.

    Returns:
      The ranked rows.
    """
    rows = ranked_trials(config, trials)
    with files.atomic_output(os.path.join(config.tuning_dir, TABLE_TSV)) as f:
        f.write(tsv_table(config, rows))
    with files.atomic_output(os.path.join(config.tuning_dir, TABLE_MARKDOWN)) as f:
        f.write(markdown_table(config, rows))
    for row in rows:
        if row.rank is not None:
            write_hparams_session(config, row)
    if rows and rows[0].rank is not None:
        with files.atomic_output(os.path.join(config.tuning_dir, BEST_FLAGS)) as f:
            f.write(best_flags_text(config, rows[0], len(rows)))
    return rows


# --------------------------------------------------------------------------
# The search.


@dataclasses.dataclass(frozen=True)
class _Holdout:
    images: np.ndarray  # float32 in [0, 1]
    labels: np.ndarray
    ids: np.ndarray  # indices in the training split: key the certification noise
    train_examples: int  # training images left for each trial


def _load_holdout(config: TuneConfig) -> _Holdout:
    """The held-out validation images; ConfigError when the split is too small."""
    images, labels = data_lib.load_uint8(config.train.dataset, "train", data_dir=config.train.data_dir)
    train_images, _, val_images, val_labels = data_lib.holdout_split(
        images, labels, config.certify_examples, train_examples=config.train.train_examples)
    return _Holdout(images=val_images.astype(np.float32) / 255.0, labels=val_labels,
                    ids=np.arange(len(images) - len(val_images), len(images)), train_examples=len(train_images))


def _prepare_tuning_dir(config: TuneConfig, capability: Optional[precision.Capability] = None) -> TuneConfig:
    """Refuses a directory of another search or of something else; records this search's settings.

    The same search, resumed, may run more trials (`_RESUMABLE_CHANGES`).
    The trials' precision is resolved here, once (`run_config.resolve_precision`;
    a resumed search keeps its policy), so that every trial computes in one
    policy; the line saying which is printed.

    Returns:
      The config with the trials' `precision_policy` set.
    """
    recorded = files.read_json_object(os.path.join(config.tuning_dir, TUNE_CONFIG_FILE)) or {}
    train, reason = run_config.resolve_precision(config.train, recorded.get("train"), capability)
    config = dataclasses.replace(config, train=train)
    here = config.to_dict()
    files.check_run_dir(config.tuning_dir, TUNE_CONFIG_FILE,
                        lambda there: files.differences(_flat_settings(here), _flat_settings(there)),
                        flag="tuning_dir", kind="search",
                        resume="the same flags to resume (only --max_trials may change)")
    with files.atomic_output(os.path.join(config.tuning_dir, TUNE_CONFIG_FILE)) as f:
        f.write(json.dumps(here, indent=2, sort_keys=True) + "\n")
    print(reason, flush=True)
    return config


def _flat_settings(values: Mapping[str, Any]) -> Dict[str, Any]:
    """A search's settings by flag name, without those a resumed search may change or derives."""
    flat = {k: v for k, v in values.items() if k not in ("train", "tuning_dir") + _RESUMABLE_CHANGES}
    # The trials' model_dir and epochs derive from tuning_dir and epochs_per_trial; the precision policy
    # from mixed_precision (search() keeps a resumed search's).
    flat.update({k: v for k, v in values.get("train", {}).items()
                 if k not in ("model_dir", "epochs", "precision_policy")})
    return flat


def _warm_start(parent_dir: str, child_dir: str) -> None:
    """Hyperband: a trial that continues another starts from a copy of its run directory.

    `training.train` then resumes from the parent's last checkpoint and trains
    on to the child's epochs. Copied under a temporary name and renamed, so
    an interrupted copy is never mistaken for a run.
    """
    if os.path.isfile(os.path.join(child_dir, run_config.TRAIN_CONFIG_FILE)):
        return  # An interrupted child: its own run resumes.
    tmp = child_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(parent_dir, tmp)
    stale = os.path.join(tmp, models.BASE_MODEL_FILE)
    if os.path.exists(stale):
        os.remove(stale)
    if os.path.isdir(child_dir):
        os.rmdir(child_dir)  # Empty: nothing was written before the copy.
    os.replace(tmp, child_dir)


def _make_oracle(config: TuneConfig):
    hp = kt.HyperParameters()
    if len(config.lbd_range) == 2:
        hp.Float("lbd", config.lbd_range[0], config.lbd_range[1], sampling="log")
    else:
        hp.Fixed("lbd", float(config.lbd_range[0]))
    if len(config.eta_range) == 2:
        hp.Float("eta", config.eta_range[0], config.eta_range[1])
    else:
        hp.Fixed("eta", float(config.eta_range[0]))
    if len(config.num_noise_choices) > 1:
        hp.Choice("num_noise", [int(m) for m in config.num_noise_choices])
    else:
        hp.Fixed("num_noise", int(config.num_noise_choices[0]))
    # keras-tuner takes seed 0 for "no seed": shift it.
    common = dict(objective=kt.Objective(config.objective_metric, direction="max"), hyperparameters=hp,
                  allow_new_entries=False, tune_new_entries=False, seed=config.train.seed + 1)
    if config.tuner == "random":
        return kt.oracles.RandomSearchOracle(max_trials=config.max_trials, **common)
    if config.tuner == "bayesian":
        return kt.oracles.BayesianOptimizationOracle(max_trials=config.max_trials, **common)
    oracle = kt.oracles.HyperbandOracle(max_epochs=config.epochs_per_trial, factor=HYPERBAND_FACTOR,
                                        hyperband_iterations=1, **common)
    oracle.max_trials = config.max_trials  # The base Oracle stops creating trials at max_trials.
    return oracle


def _make_tuner(config: TuneConfig, holdout: _Holdout):
    class ConsistencyTuner(kt.engine.base_tuner.BaseTuner):
        """Runs each trial as a `training.train` run and scores it on the held-out images."""

        def run_trial(self, trial, *args, **kwargs):
            try:
                return _run_trial(config, holdout, trial)
            except callbacks.TrainingDivergedError as e:
                # These hyperparameters do not train; the search goes on with others.
                print(f"Trial {trial.trial_id} failed: {e}", flush=True)
                raise kt.errors.FailedTrialError(str(e)) from e
            except ConfigError as e:
                raise kt.errors.FatalError(str(e)) from e
            except Exception:
                traceback.print_exc()  # keras-tuner records the failure and goes on; show it.
                raise

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            write_reports(config, self.oracle.trials.values())

    return ConsistencyTuner(_make_oracle(config), directory=config.tuning_dir, project_name=PROJECT_NAME,
                            overwrite=False)


def _run_trial(config: TuneConfig, holdout: _Holdout, trial) -> Dict[str, float]:
    values = trial.hyperparameters.values
    run = trial_config(config, values, trial.trial_id, holdout.train_examples)
    parent = values.get("tuner/trial_id")
    if parent is not None:
        _warm_start(config.trial_dir(parent), run.model_dir)
    print(f"trial_{trial.trial_id}: lbd={run.objective.lbd:.4g} eta={run.objective.eta:.3f} "
          f"num_noise={run.objective.num_noise} epochs={run.epochs} in {run.model_dir}", flush=True)
    # A fresh Keras state per trial; training.train seeds it, so every trial
    # starts from the same initialization, as bin/train.py would.
    keras.backend.clear_session()
    certify = callbacks.CertifyCallback(
        holdout.images, holdout.labels, spec=config.certify,
        num_classes=data_lib.get_dataset_info(run.dataset).num_classes, every=config.certify_every or run.epochs,
        log_dir=os.path.join(run.model_dir, run_config.LOGS_DIR), seed=run.seed, radii=config.radii,
        image_ids=holdout.ids)
    training.train(run, extra_callbacks=[certify])
    result = certify.last_result
    if result is None or result.epoch != run.epochs:
        # The run had already finished (interrupted after training): score the saved model.
        result = certify.evaluate(models.load_base_model(run.model_dir), epoch=run.epochs)
    return result.metrics()


def search(config: TuneConfig, capability: Optional[precision.Capability] = None) -> List[TrialRow]:
    """Runs (or resumes) the search and writes its results to `config.tuning_dir`.

    Args:
      config: the validated search.
      capability: the machine's bfloat16 capability, for --mixed_precision=auto
        (default: `precision.probe()`); see `_prepare_tuning_dir`.

    Returns:
      All trials, best first.

    Raises:
      ConfigError: the held-out subset does not fit the training split, or
        `tuning_dir` holds something else; raised before anything is written.
    """
    holdout = _load_holdout(config)
    config = _prepare_tuning_dir(config, capability)
    with files.atomic_output(os.path.join(config.tuning_dir, run_config.FLAGS_FILE)) as f:
        f.write(config.to_flags())
    write_hparams_config(config)
    tuner = _make_tuner(config, holdout)
    try:
        tuner.search(verbose=1)
    except kt.errors.FatalError as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise
    return write_reports(config, tuner.oracle.trials.values())
