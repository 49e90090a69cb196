"""Training of smoothed classifiers: its configs, the `ConsistencyModel` wrapper, and `train`.

`ConsistencyModel` holds a base classifier and overrides `train_step` and
`test_step`: every clean image becomes m noisy copies x + N(0, sigma^2 I), and
the loss is what the method's objective (objectives.py, built from the
`ObjectiveConfig`) computes on them. `train` runs what a
`TrainConfig` (bin/train.py's flags) says and writes a run directory. The
base classifier, not the wrapper, is what `train` saves, certifies and
exports.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from tf_consreg import callbacks as callbacks_lib
from tf_consreg import data as data_lib
from tf_consreg import distribute
from tf_consreg import files
from tf_consreg import models
from tf_consreg import multi_worker
from tf_consreg import noise as noise_lib
from tf_consreg import objectives
from tf_consreg import precision
from tf_consreg.errors import ConfigError, check

METHODS = objectives.METHODS
MIXED_PRECISION = precision.POLICIES

# What a run directory holds (besides models.BASE_MODEL_FILE).
TRAIN_CONFIG_FILE = "train_config.json"
FLAGS_FILE = "flags.txt"
CHECKPOINT_DIR = "checkpoints"
LOGS_DIR = "logs"

# Live certification of a held-out training subset (callbacks.CertifyCallback),
# by --certify_every and in every trial of a search.
CERTIFY_DEFAULTS = {"certify_examples": 200, "certify_n0": 100, "certify_n": 1000, "certify_alpha": 0.001,
                     "certify_batch_size": 1000}


def format_flags(values: Mapping[str, Any]) -> str:
    """Flag values as a flagfile that absl's `--flagfile=` parses back to the same values.

    The one way the project writes flags: a run's `flags.txt`, tuning's
    `best.flags` and a search's `flags.txt`.

    Args:
      values: flag name -> value (bool, int, float, str, or a sequence for a
        list flag); None values are left out (the flag keeps its default).

    Returns:
      One line per flag: `--name=value`, `--name` or `--noname` for bools,
      floats in their exact `repr`, sequences comma-separated.

    Raises:
      ValueError: a value holds a line break (it would not parse back).
    """
    lines = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"--{name}" if value else f"--no{name}")
            continue
        items = value if isinstance(value, (tuple, list)) else (value,)
        text = ",".join(repr(v) if isinstance(v, float) else str(v) for v in items)
        if "\n" in text or "\r" in text:
            raise ValueError(f"--{name}: {text!r} holds a line break; a flagfile cannot hold it")
        lines.append(f"--{name}={text}")
    return "".join(line + "\n" for line in lines)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The training method and its settings as bin/train.py's flags name them, flat; checked at construction.

    The record of a run's objective (its flags, train_config.json); `build`
    gives the method's `objectives.Objective`, whose class says what each
    setting means for that method (`eta` is Consistency's entropy weight and
    SmoothMix's mixup weight). The settings (`num_noise` and those after it
    up to `maxnorm_s`) are None when not given: they get the authors'
    defaults (`objectives.REGISTRY`) for the methods that use them, and must
    stay None for the methods that do not, so a setting that would be
    silently ignored is refused instead. Its fields but `deferred_epochs`
    are flags of bin/train.py (the defaults are theirs).

    Attributes:
      method: a name of `objectives.REGISTRY`: "gaussian", "consistency",
        "stability", "smoothadv", "macer" or "smoothmix".
      sigma: noise standard deviation, in [0, 1] pixel units.
      num_noise, lbd, eta, consistency_loss, beta, gamma, deferred_epochs,
        epsilon, num_steps, warmup, attack_step, mix_step, maxnorm,
        maxnorm_s: the settings of the methods that have them (see each
        method's class in objectives.py).
      adv_training: attack before the consistency objective.
      weight_decay: coupled L2 weight decay (PyTorch SGD's `weight_decay`):
        the loss gains weight_decay / 2 * ||w||^2 over the trainable weights.
    """

    method: str = "consistency"
    sigma: float = 0.25
    num_noise: Optional[int] = None
    lbd: Optional[float] = None
    eta: Optional[float] = None
    consistency_loss: Optional[str] = None
    beta: Optional[float] = None
    gamma: Optional[float] = None
    deferred_epochs: Optional[int] = None
    adv_training: bool = False
    epsilon: Optional[float] = None
    num_steps: Optional[int] = None
    warmup: Optional[int] = None
    attack_step: Optional[float] = None
    mix_step: Optional[int] = None
    maxnorm: Optional[float] = None
    maxnorm_s: Optional[float] = None
    weight_decay: float = 1e-4

    def __post_init__(self):
        objective = self.build()
        # The record holds the settings the run uses: the defaults filled in.
        for name in _SETTING_NAMES:
            object.__setattr__(self, name, getattr(objective, name, None))

    def build(self) -> objectives.Objective:
        """The method's objective with these settings (`objectives.create`).

        Raises:
          ConfigError: an unknown method, a setting it does not use, or a bad value.
        """
        return objectives.create(self.method, sigma=self.sigma, weight_decay=self.weight_decay,
                                 adv_training=self.adv_training,
                                 **{name: getattr(self, name) for name in _SETTING_NAMES})

    @property
    def adversarial(self) -> bool:
        """Whether each training step first attacks the inputs (SmoothAdv)."""
        return self.build().adversarial


# The fields that are settings of some methods only (None when not given).
_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(ObjectiveConfig)
                       if f.name not in ("method", "sigma", "adv_training", "weight_decay"))
# ObjectiveConfig's fields that are flags. deferred_epochs is not: TrainConfig's
# --deferred sets it from the learning-rate schedule.
_OBJECTIVE_FLAGS = tuple(f.name for f in dataclasses.fields(ObjectiveConfig) if f.name != "deferred_epochs")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, checked at construction.

    Its fields, and those of its `objective`, are bin/train.py's flags (see
    its --help); a run directory records them (`train_config.json`,
    `flags.txt`, flat, by flag name: `to_dict`, `to_flags`).

    `deferred` (MACER) defers the robustness term as the authors'
    train_macer.py does: while epoch <= lr_step_size (0-based), i.e. for the
    first lr_step_size + 1 epochs. It sets `objective.deferred_epochs`.

    `precision_policy` is not a flag: it is the Keras dtype policy the run
    computes in, which `mixed_precision` names (float32 for "none") or, for
    "auto", `resolve_precision` chooses when the run starts; None until then.
    The run's record keeps it, so a resumed run keeps its policy.
    """

    model_dir: str
    dataset: str = "fashion_mnist"
    arch: str = "lenet"
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    deferred: Optional[bool] = None
    epochs: int = 90
    batch_size: int = 256
    batch_split: bool = False
    lr: float = 0.01
    lr_step_size: int = 30
    lr_gamma: float = 0.1
    momentum: float = 0.9
    seed: int = 0
    train_examples: int = 0
    eval_examples: int = 10000
    certify_every: int = 0
    certify_examples: Optional[int] = None
    certify_n0: Optional[int] = None
    certify_n: Optional[int] = None
    certify_alpha: Optional[float] = None
    certify_batch_size: Optional[int] = None
    data_dir: Optional[str] = None
    mock_data: bool = False
    strategy: str = "auto"
    steps_per_execution: int = 1
    mixed_precision: str = "auto"
    jit_compile: bool = False
    pretrained_model: Optional[str] = None
    precision_policy: Optional[str] = None

    def __post_init__(self):
        check(bool(self.model_dir), "--model_dir is required: the directory for checkpoints, logs and the model")
        check(self.dataset in data_lib.DATASETS,
              f"--dataset={self.dataset!r} is unknown; choose one of {', '.join(data_lib.DATASETS)}")
        check(self.arch in models.ARCHITECTURES,
              f"--arch={self.arch!r} is unknown; choose one of {', '.join(models.ARCHITECTURES)}")
        models.check_architecture(self.arch, self.dataset)
        check(isinstance(self.objective, ObjectiveConfig),
              f"objective must be an ObjectiveConfig, got {type(self.objective).__name__}")
        check(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        check(self.lr_step_size >= 1, f"--lr_step_size must be >= 1, got {self.lr_step_size}")
        check(0 < self.lr_gamma <= 1, f"--lr_gamma must be in (0, 1], got {self.lr_gamma}")
        check(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        self._set_deferral()
        check(self.train_examples >= 0, f"--train_examples must be >= 0 (0 = all), got {self.train_examples}")
        check(self.eval_examples >= 0, f"--eval_examples must be >= 0 (0 = no evaluation), got {self.eval_examples}")
        check(self.strategy in distribute.STRATEGIES,
              f"--strategy={self.strategy!r} is unknown; choose one of {', '.join(distribute.STRATEGIES)}")
        check(self.steps_per_execution >= 1, f"--steps_per_execution must be >= 1, got {self.steps_per_execution}")
        fixed = precision.fixed_policy(self.mixed_precision)
        if self.precision_policy is None:
            object.__setattr__(self, "precision_policy", fixed)
        check(self.precision_policy in (None, *precision.KERAS_POLICIES),
              f"precision_policy={self.precision_policy!r} is unknown; choose one of "
              f"{', '.join(precision.KERAS_POLICIES)}")
        check(fixed in (None, self.precision_policy), f"precision_policy={self.precision_policy} contradicts "
              f"--mixed_precision={self.mixed_precision}, which computes in {fixed}")
        if self.pretrained_model is not None:
            check(os.path.isfile(self.pretrained_model),
                  f"--pretrained_model={self.pretrained_model} is not a file; give a base_model.keras")
        if self.batch_split:
            num_noise = self.objective.num_noise
            check(self.batch_size % num_noise == 0,
                  f"--batch_size={self.batch_size} must be divisible by --num_noise={num_noise} with --batch_split")
        check(self.clean_batch_size >= 1, "--batch_size is smaller than --num_noise with --batch_split")
        self._resolve_certify_fields()

    def _set_deferral(self) -> None:
        """MACER's `deferred`: False when not given; it sets `objective.deferred_epochs`."""
        objective = self.objective
        if objective.deferred_epochs is None:  # Not MACER.
            check(self.deferred is None, f"--deferred is used only by {objectives.used_by('deferred_epochs')}; "
                  f"remove it for --method={objective.method}")
            return
        object.__setattr__(self, "deferred", bool(self.deferred))
        object.__setattr__(self, "objective", dataclasses.replace(
            objective, deferred_epochs=self.lr_step_size + 1 if self.deferred else 0))

    def _resolve_certify_fields(self) -> None:
        """Live certification's fields: defaults when it is on, refused when it is off."""
        check(self.certify_every >= 0, f"--certify_every must be >= 0 (0 = off), got {self.certify_every}")
        if not self.certify_every:
            for name in CERTIFY_DEFAULTS:
                check(getattr(self, name) is None,
                      f"--{name} is used only with --certify_every; add --certify_every=N or remove it")
            return
        check(self.dataset not in data_lib.STREAMED,
              f"--certify_every holds images out of the training split in memory; --dataset={self.dataset} "
              "is streamed")
        for name, default in CERTIFY_DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        check(self.certify_examples >= 1, f"--certify_examples must be >= 1, got {self.certify_examples}")
        check(self.certify_n0 >= 1, f"--certify_n0 must be >= 1, got {self.certify_n0}")
        check(self.certify_n >= 1, f"--certify_n must be >= 1, got {self.certify_n}")
        check(0 < self.certify_alpha < 1, f"--certify_alpha must be in (0, 1), got {self.certify_alpha}")
        check(self.certify_batch_size >= 1, f"--certify_batch_size must be >= 1, got {self.certify_batch_size}")

    @property
    def sigma(self) -> float:
        """The run's noise level (`objective.sigma`), which certifying or exporting the run defaults to."""
        return self.objective.sigma

    @property
    def clean_batch_size(self) -> int:
        """Clean images per optimizer step (each step sees m times as many noisy copies)."""
        return self.batch_size // self.objective.num_noise if self.batch_split else self.batch_size

    def to_dict(self) -> Dict[str, Any]:
        """The flags' values, by name (the objective's among them)."""
        values = {}
        for field in dataclasses.fields(self):
            if field.name == "objective":
                values.update({name: getattr(self.objective, name) for name in _OBJECTIVE_FLAGS})
            else:
                values[field.name] = getattr(self, field.name)
        return values

    def to_flags(self, exclude: Sequence[str] = ()) -> str:
        """The config as a flagfile of bin/train.py (`format_flags`), without the flags in `exclude`.

        `--flagfile=` gives back this config (with `exclude` set as given),
        but for `precision_policy`, which is no flag: when `auto` chose it, a
        comment says which it is and how to ask for it on any machine.
        """
        comment = ""
        if self.mixed_precision == "auto" and self.precision_policy is not None:
            comment = (f"# --mixed_precision=auto chose {self.precision_policy} for this run; "
                       f"--mixed_precision={self.precision_policy} asks for it on any machine\n")
        return comment + format_flags({name: value for name, value in self.to_dict().items()
                                       if name not in exclude and name != "precision_policy"})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """The config of `to_dict`'s values."""
        known = {f.name for f in dataclasses.fields(cls)} - {"objective"}
        unknown = sorted(set(values) - known - set(_OBJECTIVE_FLAGS))
        if unknown:
            raise ConfigError(f"unknown training config fields: {', '.join(unknown)}")
        objective = ObjectiveConfig(**{name: values[name] for name in _OBJECTIVE_FLAGS if name in values})
        return cls(objective=objective, **{name: value for name, value in values.items() if name in known})


def resolve_precision(config: TrainConfig, recorded: Optional[Mapping[str, Any]] = None,
                      capability: Optional[precision.Capability] = None) -> Tuple[TrainConfig, str]:
    """The config with the Keras policy its run computes in (`precision_policy`), and a line saying why.

    A policy the config holds already is kept. Otherwise `mixed_precision`
    is resolved for this machine (`precision.resolve`), except that a run
    resumed with the request it was recorded with keeps the policy it started
    with, so it never switches precision mid-run on a machine of another
    capability; the line then says what this machine would have chosen.

    Args:
      config: the run's config.
      recorded: the values the run recorded when it started (its
        train_config.json, `to_dict`), or None for a new run.
      capability: this machine's; default: `precision.probe()`.

    Returns:
      (the config with `precision_policy` set, one line for the user).

    Raises:
      ConfigError: the config's policy contradicts the recorded one.
    """
    requested = config.mixed_precision
    kept = None
    if recorded is not None and recorded.get("mixed_precision") == requested:
        # A record from before precision_policy existed holds a fixed request.
        kept = recorded.get("precision_policy") or precision.fixed_policy(requested)
    if kept is not None and config.precision_policy not in (None, kept):
        raise ConfigError(f"--model_dir={config.model_dir} computes in {kept}, recorded when the run started; it "
                          f"cannot resume in {config.precision_policy}")
    if requested == "auto" and capability is None:
        capability = precision.probe()
    here = precision.resolve(requested, capability)
    chosen = kept or config.precision_policy
    if requested != "auto" or chosen is None:
        return dataclasses.replace(config, precision_policy=here.policy), here.reason
    note = "" if here.policy == chosen else f" (here auto would choose {here.policy}: {capability.describe()})"
    if kept is not None:
        return (dataclasses.replace(config, precision_policy=kept),
                f"--mixed_precision=auto: resuming in {kept}, the policy this run started with{note}")
    return config, f"--mixed_precision=auto: {chosen}, resolved before this run (once for a whole search){note}"


def read_train_config(model_dir: str) -> TrainConfig:
    """Reads the config a training run saved in its model directory.

    Args:
      model_dir: a `--model_dir` written by bin/train.py.

    Returns:
      The run's TrainConfig (its `model_dir` field set to `model_dir`).

    Raises:
      ConfigError: the directory or its train_config.json is missing or unreadable.
    """
    path = os.path.join(model_dir, TRAIN_CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: is --model_dir a directory written by bin/train.py?")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable: {e}") from e
    values["model_dir"] = model_dir
    return TrainConfig.from_dict(values)


# Independent random streams of one run: the copies' noise (objectives.py
# takes the next ones).
_TRAIN_NOISE, _EVAL_NOISE = 1, 2
# Epoch values that every run's checkpoint holds, whatever its method: the
# wrapper created them for all methods before each objective owned its own,
# and those checkpoints must restore. 0 for a method that has no such value.
_CHECKPOINTED_VALUES = ("attack_radius", "robust_weight")


class ConsistencyModel(keras.Model):
    """Wraps a base classifier to train it on noisy copies, with any objective of objectives.py.

    Each step draws m = `num_noise` noisy copies x + N(0, sigma^2 I) of every
    clean image (noise seeded per example, see noise.py), asks the objective
    for its terms on them (`objectives.Objective.terms`), and minimizes its
    loss plus the weight decay. The objective's epoch values (warm-ups,
    deferral) are variables of the wrapper, named `_<name>`, set by
    `set_epoch`.

    Args:
      base_model: maps images in [0, 1] to logits.
      objective: the method and its settings: an `objectives.Objective`, or
        an `ObjectiveConfig` (its `build()`).
      seed: seed of the noise; with the optimizer's step it fixes every draw.
      **kwargs: for `keras.Model` (name, ...).
    """

    def __init__(self, base_model: keras.Model, objective: "ObjectiveConfig | objectives.Objective", *,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.base_model = base_model
        self.objective = objective if isinstance(objective, objectives.Objective) else objective.build()
        self.seed = int(seed)
        self._trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", *self.objective.term_names)}
        self._accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self._clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name="clean_accuracy")
        # Counts evaluation batches, to seed evaluation noise; one per replica set.
        self._eval_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="eval_steps",
                                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # Epoch-dependent values, set by `set_epoch` (variables: no retracing);
        # until then, their values after warm-up and deferral. Attributes, not
        # a dict: their names are their checkpoint keys.
        initial = self.objective.epoch_values()
        self._epoch_value_names = tuple(dict.fromkeys((*_CHECKPOINTED_VALUES, *initial)))
        for name in self._epoch_value_names:
            setattr(self, f"_{name}", tf.Variable(initial.get(name, 0.0), dtype=tf.float32, trainable=False,
                                                  name=name, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA))

    @property
    def metrics(self):
        return [*self._trackers.values(), self._accuracy, self._clean_accuracy]

    def call(self, inputs, training=False):
        return self.base_model(inputs, training=training)

    def set_epoch(self, epoch: int) -> None:
        """Sets the objective's values that change with the (0-based) epoch (`epoch_values`)."""
        for name, value in self.objective.epoch_values(epoch).items():
            getattr(self, f"_{name}").assign(value)

    def _cross_entropy(self, x, labels, logits, training):
        # compute_loss applies Keras's rule (local mean / replicas, see
        # distribute.py); report the local mean and scale again in train_step.
        return distribute.unscale_loss(self.compute_loss(x=x, y=labels, y_pred=logits, training=training))

    def compute_terms(self, images, labels, training: bool, step) -> Dict[str, tf.Tensor]:
        """The training objective on one (local) batch.

        Every entry is a local mean over this replica's examples, unscaled.

        Args:
          images: clean images [B, H, W, C] in [0, 1].
          labels: int labels [B].
          training: a training step (attack, training-mode layers) or an evaluation.
          step: seeds the noise together with `seed`.

        Returns:
          dict with "loss" (the objective), the objective's `term_names`, and
          "logits" [m * B, C] of the noisy copies, copy-major.
        """
        m = self.objective.num_noise
        seeds = noise_lib.example_seeds(
            noise_lib.step_seed(self.seed, _TRAIN_NOISE if training else _EVAL_NOISE, step), tf.shape(images)[0])
        noise = noise_lib.gaussian_noise(images, m, self.objective.sigma, seeds)
        return self.objective.terms(objectives.Step(
            images=images, labels=labels, noise=noise, num_copies=m, training=training, step=step, seed=self.seed,
            values={name: getattr(self, f"_{name}") for name in self._epoch_value_names},
            base_model=self.base_model,
            cross_entropy=lambda x, y, logits: self._cross_entropy(x, y, logits, training)))

    def _weight_decay_term(self) -> tf.Tensor:
        if not self.objective.weight_decay:
            return tf.constant(0.0)
        return 0.5 * self.objective.weight_decay * tf.add_n(
            [tf.reduce_sum(tf.square(tf.cast(w, tf.float32))) for w in self.base_model.trainable_weights])

    def _update_metrics(self, terms, labels, clean_logits=None):
        for name, tracker in self._trackers.items():
            tracker.update_state(terms[name])
        self._accuracy.update_state(noise_lib.tile_copies(labels, self.objective.num_noise), terms["logits"])
        reported = self.metrics
        if clean_logits is None:  # Clean accuracy is measured in evaluation only.
            reported = [m for m in reported if m is not self._clean_accuracy]
        else:
            self._clean_accuracy.update_state(labels, clean_logits)
        return {m.name: m.result() for m in reported}

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            terms = self.compute_terms(images, labels, training=True, step=self.optimizer.iterations)
            # One rule for every term: local mean / replicas (distribute.py).
            # Weight decay is a global quantity; each replica adds 1/replicas of it.
            loss = distribute.scale_loss(terms["loss"] + self._weight_decay_term())
            loss = self.optimizer.scale_loss(loss)
        weights = self.base_model.trainable_weights
        self.optimizer.apply(tape.gradient(loss, weights), weights)
        return self._update_metrics(terms, labels)

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        terms = self.compute_terms(images, labels, training=False, step=self._eval_steps)
        self._eval_steps.assign_add(1)
        return self._update_metrics(terms, labels, clean_logits=self.base_model(images, training=False))


# MACER's λ from which training from scratch without --deferred collapsed
# (issue 16: λ = 16, Fashion-MNIST, in 3 epochs, also with the authors' code).
MACER_UNDEFERRED_LBD = 8.0


def config_warnings(config: TrainConfig) -> List[str]:
    """One-line warnings about a valid config that is known to train badly.

    Args:
      config: the validated run configuration.

    Returns:
      The warnings, each one line naming the flags (empty when none applies).
    """
    objective = config.objective
    found = []
    if objective.method == "macer" and objective.lbd >= MACER_UNDEFERRED_LBD and not config.deferred:
        found.append(f"--method=macer with --lbd={objective.lbd:g} (>= {MACER_UNDEFERRED_LBD:g}) and no --deferred "
                     "tends to collapse to one class within a few epochs when trained from scratch (the authors' "
                     "code does too); the authors train MNIST MACER with --deferred")
    return found


# --------------------------------------------------------------------------
# The training run.


def _check_model_dir(config: TrainConfig) -> None:
    """Refuses a model_dir that holds another run, or other files (see `files.check_run_dir`).

    The same run, resumed, may train more epochs. `precision_policy` is not
    compared: `resolve_precision` keeps the recorded one (older records lack it).
    """
    here = config.to_dict()
    ignore = ("epochs", "model_dir", "precision_policy")
    files.check_run_dir(config.model_dir, TRAIN_CONFIG_FILE, lambda there: files.differences(here, there, ignore),
                        flag="model_dir", kind="run", resume="the same flags to resume")


def _chief_precision(strategy: tf.distribute.Strategy, task: distribute.ClusterTask, config: TrainConfig,
                     reason: str) -> Tuple[TrainConfig, str]:
    """The config in the chief's precision policy, and the line to print, on every worker of a cluster.

    Workers may differ in hardware, so "auto" may resolve differently on
    each; one run computes in one policy, the one the chief records.
    """
    with strategy.scope():
        code = tf.Variable(precision.KERAS_POLICIES.index(config.precision_policy), dtype=tf.int64,
                           trainable=False, name="precision_policy")
    distribute.broadcast_from_first_replica(strategy, [code])
    chief = precision.KERAS_POLICIES[int(code.numpy())]
    if chief == config.precision_policy:
        return config, reason
    return (dataclasses.replace(config, precision_policy=chief),
            f"Worker {task.worker_index}: computing in {chief}, the chief's policy (here: {reason})")


def _learning_rate(config: TrainConfig, steps_per_epoch: int):
    """PyTorch's StepLR: lr * gamma ** (epoch // step_size), as a step schedule."""
    num_drops = (config.epochs - 1) // config.lr_step_size
    if num_drops == 0:
        return config.lr
    # The schedule sees the step count before the update, and keeps values[k]
    # while step <= boundaries[k]: so the last step of an lr period is the boundary.
    boundaries = [steps_per_epoch * config.lr_step_size * k - 1 for k in range(1, num_drops + 1)]
    values = [config.lr * config.lr_gamma ** k for k in range(num_drops + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def build(config: TrainConfig, steps_per_epoch: int) -> ConsistencyModel:
    """Builds and compiles the wrapper for `config`, in the current strategy's scope.

    It computes under `config.precision_policy`; an unresolved "auto" is
    resolved for this machine (`resolve_precision`).
    """
    policy = config.precision_policy or resolve_precision(config)[0].precision_policy
    # Layers take their dtype policy when they are created: set it for this
    # model only, so other models of the process keep theirs.
    previous_policy = keras.config.dtype_policy()
    if policy != "float32":
        keras.config.set_dtype_policy(policy)
    try:
        base = models.get_architecture(config.arch, config.dataset)
        if config.pretrained_model:
            load_pretrained(base, config.pretrained_model)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    model = ConsistencyModel(base, config.objective, seed=config.seed, name="consistency_model")
    # SGD with momentum as torch.optim.SGD (weight decay is in the loss, coupled
    # as PyTorch applies it, rather than Keras's decoupled `weight_decay`).
    optimizer = keras.optimizers.SGD(learning_rate=_learning_rate(config, steps_per_epoch),
                                     momentum=config.momentum)
    if policy == "mixed_float16":
        # float16 gradients underflow without loss scaling; train_step calls
        # optimizer.scale_loss and `apply` unscales (and skips non-finite steps).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=config.steps_per_execution, jit_compile=config.jit_compile)
    return model


def _leaf_layers(model: keras.Model) -> List[keras.layers.Layer]:
    layers = []
    for layer in model.layers:
        layers.extend(_leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def load_pretrained(base: keras.Model, path: str) -> None:
    """Copies a saved base model's weights into `base`, layer by layer.

    Both must be the same architecture. When their class counts differ, the
    classifier (the last Dense layer) keeps its fresh initialization, as the
    authors' fine-tuning replaces the `fc` layer.

    Raises:
      ConfigError: the saved model is not of `base`'s architecture.
    """
    try:
        pretrained = models.load_base_model(path)
    except ConfigError as e:
        raise ConfigError(f"--pretrained_model: {e}") from e
    new_layers, old_layers = _leaf_layers(base), _leaf_layers(pretrained)
    heads = [i for i, layer in enumerate(new_layers) if isinstance(layer, keras.layers.Dense)]
    replaced = None
    if len(new_layers) != len(old_layers) or not heads:
        raise ConfigError(f"--pretrained_model={path}: its layers do not match --arch's; use a model trained with "
                          "the same --arch")
    for i, (target, source) in enumerate(zip(new_layers, old_layers)):
        target_shapes = [tuple(w.shape) for w in target.weights]
        source_shapes = [tuple(w.shape) for w in source.weights]
        if target_shapes == source_shapes:
            target.set_weights(source.get_weights())
        elif i == heads[-1] and target_shapes[0][0] == source_shapes[0][0]:
            replaced = (source_shapes[-1][0], target_shapes[-1][0])
        else:
            raise ConfigError(f"--pretrained_model={path}: layer {source.name} has weights {source_shapes}, "
                              f"--arch's has {target_shapes}; use a model trained with the same --arch")
    print(f"Initialized from {path}" + (f" (new classifier: {replaced[0]} -> {replaced[1]} classes)"
                                        if replaced else ""))


def train(config: TrainConfig, extra_callbacks: Optional[List[keras.callbacks.Callback]] = None, *,
          capability: Optional[precision.Capability] = None) -> keras.callbacks.History:
    """Trains a base classifier as `config` says and saves it in `config.model_dir`.

    Writes `train_config.json`, `flags.txt` (`config.to_flags()`, for
    `bin/train.py --flagfile=`), TensorBoard events
    (`logs/`), a checkpoint per epoch (`checkpoints/`) and, at the end,
    `base_model.keras`. A second call with the same config resumes from the
    last checkpoint, and trains on when `epochs` grew. A call on a finished
    run (as many epochs done as `epochs`) leaves every file of the run as it
    is, byte for byte, and returns an empty History.

    Each epoch trains on batches drawn from (seed, epoch) alone
    (`data.Source.make_input`'s `epochs`), so a run stopped at an epoch's end
    and resumed trains on what the uninterrupted run would have: on one
    device it ends with bit-identical weights.

    Training stops with `callbacks.TrainingDivergedError` at the first
    non-finite loss, before anything of that epoch is saved. A fresh run
    that diverges before its first checkpoint leaves nothing in `model_dir`,
    so the corrected command may use it.

    With `strategy="multi_worker"`, every worker of the `TF_CONFIG` cluster
    calls this with the same config. The chief writes the files above; the
    other workers write theirs to a temporary directory they delete at the
    end, and start from the chief's checkpoint (see
    `multi_worker.share_chief_state`). Each worker prints a fingerprint of
    its final weights, equal on all of them.

    It first seeds Python, NumPy and TensorFlow with `config.seed`
    (`keras.utils.set_random_seed`), so the same config starts from the same
    initialization, in a fresh process or after other runs in this one.

    It then resolves the precision (`resolve_precision`: a resumed run keeps
    the policy it started with) and prints the choice and why; the run's
    record holds it (`precision_policy` in train_config.json, a comment in
    flags.txt). Under multi_worker every worker computes in the chief's
    policy, whatever its own hardware would choose.

    Args:
      config: the validated run configuration.
      extra_callbacks: more Keras callbacks (under multi_worker they run on
        every worker and must not stop training on one worker only).
      capability: the machine's bfloat16 capability, for "auto"; default:
        `precision.probe()`.

    Returns:
      The Keras `History` of this call.

    Raises:
      ConfigError: bad data files, an invalid `TF_CONFIG` or
        `--pretrained_model`, a `model_dir` that holds another run or more
        epochs than `epochs`; raised before anything is written.
      callbacks.TrainingDivergedError: the loss or the weights became
        non-finite (a `ConfigError` too).
    """
    keras.utils.set_random_seed(config.seed)
    task = distribute.cluster_task_from_env() if config.strategy == "multi_worker" else None
    batch = config.clean_batch_size
    if task is not None:
        multi_worker.check_batch_size(task, batch)
    # A resumed run keeps the policy it recorded (an unreadable record: _check_model_dir says so).
    recorded = files.read_json_object(os.path.join(config.model_dir, TRAIN_CONFIG_FILE))
    config, precision_reason = resolve_precision(config, recorded, capability)
    # Every worker checks (read only): on a shared file system they all see the chief's directory.
    _check_model_dir(config)
    done = _epochs_done(config.model_dir)
    check(done <= config.epochs, f"--epochs={config.epochs}: --model_dir={config.model_dir} already holds {done} "
          f"epochs of this run; resume it with --epochs={done} or more, or use a new --model_dir")
    is_chief = task is None or task.is_chief
    strategy = distribute.get_strategy(config.strategy)
    if task is not None:
        config, precision_reason = _chief_precision(strategy, task, config, precision_reason)
    print(precision_reason, flush=True)
    replicas = strategy.num_replicas_in_sync
    info = data_lib.get_dataset_info(config.dataset)
    certify = None
    if config.certify_every:
        # The held-out images are the LAST certify_examples of the whole
        # training split, whatever --train_examples is; they are never trained on.
        full = data_lib.open_source(config.dataset, "train", data_dir=config.data_dir, mock=config.mock_data)
        train_x, train_y, val_x, val_y = data_lib.holdout_split(
            full.images, full.labels, config.certify_examples, train_examples=config.train_examples)
        train_source = dataclasses.replace(full, num_examples=len(train_x), images=train_x, labels=train_y)
        if is_chief:
            # Under multi_worker the chief certifies while the others wait for
            # its next all-reduce: a cost in time, not in correctness.
            certify = callbacks_lib.CertifyCallback(
                val_x, val_y, sigma=config.sigma, num_classes=info.num_classes, every=config.certify_every,
                n0=config.certify_n0, n=config.certify_n, alpha=config.certify_alpha,
                batch_size=config.certify_batch_size, log_dir=os.path.join(config.model_dir, LOGS_DIR),
                seed=config.seed, image_ids=np.arange(full.num_examples - len(val_x), full.num_examples))
    else:
        train_source = data_lib.open_source(config.dataset, "train", data_dir=config.data_dir,
                                            limit=config.train_examples or None, mock=config.mock_data)
    eval_source = None
    if config.eval_examples:
        eval_source = data_lib.open_source(config.dataset, "test", data_dir=config.data_dir,
                                           limit=config.eval_examples, mock=config.mock_data)
    if replicas > 1 and batch % replicas:
        raise ConfigError(f"--batch_size: {batch} clean images per step do not split evenly over {replicas} replicas")
    # Equal local batches under several replicas (see noise.example_seeds).
    drop_remainder = replicas > 1
    num_train = train_source.num_examples
    steps_per_epoch = num_train // batch if drop_remainder else math.ceil(num_train / batch)
    if steps_per_epoch < 1:
        raise ConfigError(f"--train_examples: {num_train} images make no full batch of {batch}")
    if task is not None and eval_source is not None and eval_source.num_examples < batch:
        raise ConfigError(f"--eval_examples: {eval_source.num_examples} images make no full batch of {batch}")
    if task is None and steps_per_epoch % config.steps_per_execution:
        # fit takes whole calls of steps_per_execution steps from an input
        # that runs on into the next epoch: an epoch would take some of the next one's batches.
        raise ConfigError(f"--steps_per_execution={config.steps_per_execution} must divide the {steps_per_epoch} "
                          "steps of an epoch")

    # The chief writes the run; other workers write what they must (every
    # worker takes part in saving a checkpoint) to a directory of their own.
    with contextlib.ExitStack() as cleanup:
        if is_chief:
            work_dir = config.model_dir
        else:
            work_dir = tempfile.mkdtemp(prefix=f"tf_consreg_worker{task.worker_index}_")
            cleanup.callback(shutil.rmtree, work_dir, ignore_errors=True)
        history = _train_in(config, strategy, task, work_dir, train_source, eval_source, steps_per_epoch,
                            drop_remainder, [certify] if certify else [], extra_callbacks or [])
    return history


def _epochs_done(model_dir: str) -> int:
    """The epochs a run directory's last checkpoint holds (0 when it has none); reads only.

    Raises:
      ConfigError: the last checkpoint is unreadable.
    """
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_DIR))
    if latest is None:
        return 0
    try:
        reader = tf.train.load_checkpoint(latest)
        names = [name for name in reader.get_variable_to_shape_map() if name.startswith("epoch/")]
        return int(reader.get_tensor(names[0])) if names else 0
    except (tf.errors.OpError, ValueError) as e:
        raise ConfigError(f"{latest}: the last checkpoint is unreadable ({type(e).__name__}: {e})") from e


def _record_run(config: TrainConfig) -> None:
    """Writes the run's `train_config.json` and `flags.txt`, each only when its content changes.

    A resumed run rewrites neither (their bytes and times stay); one whose
    `epochs` grew rewrites both.
    """
    os.makedirs(config.model_dir, exist_ok=True)
    for name, text in ((TRAIN_CONFIG_FILE, config.to_json()), (FLAGS_FILE, config.to_flags())):
        path = os.path.join(config.model_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        with files.atomic_output(path) as f:
            f.write(text)


def _forget_run(config: TrainConfig) -> None:
    """Removes what `_record_run` and a first epoch wrote, leaving `model_dir` empty (for a fresh run that diverged)."""
    for name in (TRAIN_CONFIG_FILE, FLAGS_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(config.model_dir, name))
    for name in (LOGS_DIR, CHECKPOINT_DIR):
        shutil.rmtree(os.path.join(config.model_dir, name), ignore_errors=True)


def _train_in(config: TrainConfig, strategy: tf.distribute.Strategy, task: Optional[distribute.ClusterTask],
              work_dir: str, train_source: data_lib.Source, eval_source: Optional[data_lib.Source],
              steps_per_epoch: int, drop_remainder: bool, certify: List[keras.callbacks.Callback],
              extra_callbacks: List[keras.callbacks.Callback]) -> keras.callbacks.History:
    """`train` once its checks are done: `work_dir` is the model_dir, or a non-chief's own directory.

    Nothing is written before the model is built (which loads
    `--pretrained_model`) and restored: a finished run is left as it is.
    """
    info = data_lib.get_dataset_info(config.dataset)
    batch = config.clean_batch_size
    is_chief = task is None or task.is_chief
    with strategy.scope():
        model = build(config, steps_per_epoch)
        model.build((None, *info.input_shape))
        model.optimizer.build(model.base_model.trainable_weights)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch)
        # Created now on every worker: a variable created later on one worker
        # only (restoring creates it) would wait for the others' broadcast.
        _ = checkpoint.save_counter
        manager = tf.train.CheckpointManager(checkpoint, os.path.join(work_dir, CHECKPOINT_DIR), max_to_keep=3)
        _restore(model, checkpoint, manager, epoch, strategy, task, config.epochs)
    initial_epoch = int(epoch.numpy())
    base_model_path = os.path.join(config.model_dir, models.BASE_MODEL_FILE)
    if initial_epoch >= config.epochs:
        print(f"{config.model_dir} is already trained for {initial_epoch} epochs; nothing to do")
        if task is not None:
            multi_worker.print_final_weights(task, model.base_model)
        if is_chief and not os.path.isfile(base_model_path):  # Killed between the last checkpoint and the save.
            save_base_model(model.base_model, config.model_dir)
        return keras.callbacks.History()

    fresh = initial_epoch == 0
    if is_chief:
        _record_run(config)
    callbacks = [
        callbacks_lib.EpochSchedule(),
        # Before everything that certifies or saves the epoch.
        callbacks_lib.StopOnDivergence(advice=f"try a smaller --lr than {config.lr:g}"),
        callbacks_lib.Throughput(batch),
        # Adds val_acr & co. to the epoch logs: before everything that reads them.
        *certify,
        # After it: a kill during certification redoes that epoch.
        callbacks_lib.EpochCheckpoint(manager, epoch, keep=is_chief),
        callbacks_lib.ScalarLogger(os.path.join(work_dir, LOGS_DIR), update_freq=max(1, steps_per_epoch // 20)),
        *extra_callbacks,
    ]
    verbose = 1 if sys.stdout.isatty() else 2
    try:
        if task is not None:
            history = multi_worker.fit_cluster(model, strategy, train_source, eval_source, batch_size=batch,
                                               seed=config.seed, epochs=config.epochs, initial_epoch=initial_epoch,
                                               steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                                               verbose=verbose)
        else:
            # Under several replicas each gets its share of every global batch, in order.
            input_strategy = strategy if strategy.num_replicas_in_sync > 1 else None
            train_input = train_source.make_input(batch, training=True, seed=config.seed,
                                                  epochs=range(initial_epoch, config.epochs),
                                                  drop_remainder=drop_remainder, strategy=input_strategy)
            eval_input = None
            if eval_source is not None:
                eval_input = eval_source.make_input(batch, training=False, drop_remainder=drop_remainder,
                                                    strategy=input_strategy)
            # The training input holds the remaining epochs one after another:
            # fit must be told where each ends.
            history = model.fit(train_input.dataset, epochs=config.epochs, initial_epoch=initial_epoch,
                                steps_per_epoch=steps_per_epoch,
                                validation_data=eval_input.dataset if eval_input else None,
                                validation_steps=eval_input.steps_per_epoch if eval_input and input_strategy else None,
                                callbacks=callbacks, shuffle=False, verbose=verbose)
    except callbacks_lib.TrainingDivergedError as e:
        if is_chief and fresh and manager.latest_checkpoint is None:
            _forget_run(config)
            raise callbacks_lib.TrainingDivergedError(
                f"{e}; --model_dir={config.model_dir} was left empty for the corrected command") from None
        raise
    if task is not None:
        multi_worker.print_final_weights(task, model.base_model)
    if is_chief:
        save_base_model(model.base_model, config.model_dir)
    return history


def _restore(model: "ConsistencyModel", checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager,
             epoch: tf.Variable, strategy: tf.distribute.Strategy, task: Optional[distribute.ClusterTask],
             epochs: int) -> None:
    """Restores the last checkpoint; under multi_worker, the chief's, on every worker.

    See `multi_worker.share_chief_state`.
    """
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(f"Resuming from {manager.latest_checkpoint} (epoch {int(epoch.numpy())} of {epochs})")
    if task is not None:
        multi_worker.share_chief_state(strategy, task, [*model.base_model.weights, *model.optimizer.variables,
                                                        model._eval_steps], epoch, epochs)


def save_base_model(base_model: keras.Model, model_dir: str) -> str:
    """Writes `base_model.keras` atomically; returns its path."""
    path = os.path.join(model_dir, models.BASE_MODEL_FILE)
    tmp = os.path.join(model_dir, ".tmp_" + models.BASE_MODEL_FILE)
    base_model.save(tmp)
    os.replace(tmp, path)
    return path
