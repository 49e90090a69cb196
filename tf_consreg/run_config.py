"""The recorded configs of a training run, and their reader.

`TrainConfig` is everything a run needs (bin/train.py's flags), with its
`ObjectiveConfig` (the method and its settings); a run directory records it
(`train_config.json`, `flags.txt`). Certification and export read a run's
config (`read_train_config`) to take its dataset and sigma: this module lets
them do so without loading training (the wrapper, the losses and attacks, the
callbacks, the multi-worker loop).
"""

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from tf_consreg import certify_spec
from tf_consreg import cli
from tf_consreg import data as data_lib
from tf_consreg import denoise
from tf_consreg import distribute
from tf_consreg import files
from tf_consreg import models
from tf_consreg import objectives
from tf_consreg import precision
from tf_consreg.certify_spec import CertifySpec
from tf_consreg.errors import ConfigError, check

MIXED_PRECISION = precision.POLICIES

# What a run directory holds (besides models.BASE_MODEL_FILE).
TRAIN_CONFIG_FILE = "train_config.json"
FLAGS_FILE = "flags.txt"
CHECKPOINT_DIR = "checkpoints"
LOGS_DIR = "logs"

# Live certification of a held-out training subset (callbacks.CertifyCallback),
# by --certify_every and in every trial of a search: how many images; its
# sampling settings default to certify_spec.LIVE.
CERTIFY_EXAMPLES = 200
# Live certification's settings (TrainConfig.certify) are flags under this
# prefix: full CERTIFY of the float32 network at the run's sigma, so n0, n,
# alpha and batch_size.
CERTIFY_PREFIX = "certify_"
_CERTIFY_FIELDS = ("n0", "n", "alpha", "batch_size")
CERTIFY_FLAGS = tuple(CERTIFY_PREFIX + name for name in _CERTIFY_FIELDS)


def live_certify_spec(spec: CertifySpec, sigma: float) -> CertifySpec:
    """Live certification's settings, checked (full CERTIFY of the float32 network) and at the run's `sigma`.

    Its noise is float (`certify_spec.LIVE` says why); --certify_n and
    --certify_alpha must leave an image a chance of a certificate.

    Raises:
      ConfigError: `spec` is no CertifySpec, has stages or another dtype or
        noise, another sigma, or an n and alpha at which every image abstains.
    """
    check(isinstance(spec, CertifySpec), f"certify must be a CertifySpec, got {type(spec).__name__}")
    live = certify_spec.LIVE
    check((spec.stages, spec.compute_dtype, spec.noise) == (live.stages, live.compute_dtype, live.noise),
          f"certify: live certification is full CERTIFY of the {live.compute_dtype} network with "
          f"{live.noise} noise, got {spec}")
    if not certify_spec.certify_can_certify(spec.n, spec.alpha):
        smallest = certify_spec.smallest_n(lambda n: certify_spec.certify_can_certify(n, spec.alpha))
        raise ConfigError(f"--{CERTIFY_PREFIX}n={spec.n} and --{CERTIFY_PREFIX}alpha={spec.alpha:g} cannot certify "
                          f"any image: with all {spec.n} samples in the top class the lower bound on p_A is "
                          f"{spec.alpha:g}^(1/{spec.n}) = {spec.alpha ** (1 / spec.n):.4g}, not above 1/2; the "
                          f"smallest --{CERTIFY_PREFIX}n that can certify at this alpha is {smallest}")
    return spec.with_sigma(sigma)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The training method and its settings as bin/train.py's flags name them, flat; checked at construction.

    The record of a run's objective (its flags, train_config.json); `build`
    gives the method's `objectives.Objective`, whose class says what each
    setting means for that method (`eta` is Consistency's entropy weight and
    SmoothMix's mixup weight). The settings (`num_noise` and those after it
    up to `denoiser_arch`) are None when not given: they get the authors'
    defaults (`objectives.REGISTRY`) for the methods that use them, and must
    stay None for the methods that do not, so a setting that would be
    silently ignored is refused instead. Its fields but `deferred_epochs`
    are flags of bin/train.py (the defaults are theirs).

    Attributes:
      method: a name of `objectives.REGISTRY`: "gaussian", "consistency",
        "stability", "smoothadv", "macer", "smoothmix", "standard" or
        "denoise".
      sigma: noise standard deviation, in [0, 1] pixel units.
      num_noise, lbd, eta, consistency_loss, beta, gamma, deferred_epochs,
        epsilon, num_steps, warmup, attack_step, mix_step, maxnorm,
        maxnorm_s, denoise_objective, classifier, denoiser_arch: the
        settings of the methods that have them (see each method's class in
        objectives.py).
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
    denoise_objective: Optional[str] = None
    classifier: Optional[str] = None
    denoiser_arch: Optional[str] = None
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
# --method=denoise's settings: recorded only when set, so the records of other
# runs stay as they were before the method existed (and resume unchanged).
_DENOISE_FLAGS = ("denoise_objective", "classifier", "denoiser_arch")


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
    certify: CertifySpec = dataclasses.field(default=certify_spec.LIVE, metadata={cli.FLAG_PREFIX: CERTIFY_PREFIX})
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
        if self.objective.method == "denoise":
            if self.objective.denoiser_arch is None:
                object.__setattr__(self, "objective", dataclasses.replace(
                    self.objective, denoiser_arch=denoise.default_denoiser_arch(self.dataset)))
            denoise.check_denoiser_arch(self.objective.denoiser_arch, self.dataset)
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
        object.__setattr__(self, "certify", live_certify_spec(self.certify, self.sigma))
        live = certify_spec.LIVE
        if not self.certify_every:
            # A value other than the default is a flag given for nothing.
            check(self.certify_examples is None,
                  "--certify_examples is used only with --certify_every; add --certify_every=N or remove it")
            for name in _CERTIFY_FIELDS:
                check(getattr(self.certify, name) == getattr(live, name), f"--{CERTIFY_PREFIX}{name} is used only "
                      "with --certify_every; add --certify_every=N or remove it")
            return
        check(self.dataset not in data_lib.STREAMED,
              f"--certify_every holds images out of the training split in memory; --dataset={self.dataset} "
              "is streamed")
        if self.certify_examples is None:
            object.__setattr__(self, "certify_examples", CERTIFY_EXAMPLES)
        check(self.certify_examples >= 1, f"--certify_examples must be >= 1, got {self.certify_examples}")

    @property
    def sigma(self) -> float:
        """The run's noise level (`objective.sigma`), which certifying or exporting the run defaults to."""
        return self.objective.sigma

    @property
    def clean_batch_size(self) -> int:
        """Clean images per optimizer step (each step sees m times as many noisy copies)."""
        return self.batch_size // self.objective.num_noise if self.batch_split else self.batch_size

    def to_dict(self) -> Dict[str, Any]:
        """The flags' values, by name (the objective's and live certification's among them)."""
        values = {}
        for field in dataclasses.fields(self):
            if field.name == "objective":
                values.update({name: getattr(self.objective, name) for name in _OBJECTIVE_FLAGS
                               if name not in _DENOISE_FLAGS or getattr(self.objective, name) is not None})
            elif field.name == "certify":
                values.update({name: value if self.certify_every else None
                               for name, value in cli.flat_values(self, CERTIFY_FLAGS).items()})
            else:
                values[field.name] = getattr(self, field.name)
        return values

    def to_flags(self, exclude: Sequence[str] = ()) -> str:
        """The config as a flagfile of bin/train.py (`cli.format_flags`), without the flags in `exclude`.

        `--flagfile=` gives back this config (with `exclude` set as given),
        but for `precision_policy`, which is no flag: when `auto` chose it, a
        comment says which it is and how to ask for it on any machine.
        """
        comment = ""
        if self.mixed_precision == "auto" and self.precision_policy is not None:
            comment = (f"# --mixed_precision=auto chose {self.precision_policy} for this run; "
                       f"--mixed_precision={self.precision_policy} asks for it on any machine\n")
        return comment + cli.format_flags({name: value for name, value in self.to_dict().items()
                                       if name not in exclude and name != "precision_policy"})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], origin: Optional[str] = None) -> "TrainConfig":
        """The config of `to_dict`'s values (live certification's None: its defaults).

        Args:
          values: flag name -> value, as `to_dict` gives them.
          origin: the file they were read from, named by the messages.

        Raises:
          ConfigError: an unknown field, a value of the wrong type, or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"objective", "certify"}
        unknown = sorted(set(values) - known - set(_OBJECTIVE_FLAGS) - set(CERTIFY_FLAGS))
        if unknown:
            raise ConfigError(f"unknown training config fields: {', '.join(unknown)}")
        # deferred_epochs is no flag (TrainConfig's deferred sets it), so the objective's other fields go
        # through config_from_values's type checks with the rest.
        objective = {name: values[name] for name in _OBJECTIVE_FLAGS if name in values}
        certify = {name: values[name] for name in CERTIFY_FLAGS if values.get(name) is not None}
        return cli.config_from_values(cls, {**objective, **certify,
                                            **{name: value for name, value in values.items() if name in known}},
                                      origin=origin)


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
      ConfigError: the directory or its train_config.json is missing or
        unreadable, or a recorded value is of the wrong type or refused by
        the checks the flags get (the message names the file and the field).
    """
    path = os.path.join(model_dir, TRAIN_CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: is --model_dir a directory written by bin/train.py?")
    values = files.load_json_object(path)
    values["model_dir"] = model_dir
    try:
        return TrainConfig.from_dict(values, origin=path)
    except ConfigError as e:  # The configs' own checks name the flag: say which file holds it.
        message = str(e)
        raise ConfigError(message if message.startswith(path) else f"{path}: {message}") from None
