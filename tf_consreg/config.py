"""Validated training configuration.

`TrainConfig` is the one object `bin/train.py` builds from its flags and
hands to `tf_consreg.training.train`. Every check runs at construction, so a
bad value fails before any data is read or any file is written, with a
message that names the flag.
"""

import dataclasses
import json
import os
from typing import Any, Dict, Optional

from tf_consreg import distribute
from tf_consreg import losses
from tf_consreg.errors import ConfigError

METHODS = ("gaussian", "consistency", "stability", "smoothadv", "macer")
MIXED_PRECISION = ("none", "mixed_float16", "mixed_bfloat16")

TRAIN_CONFIG_FILE = "train_config.json"

# Method-specific fields and their defaults, from the authors' train_*.py
# (epsilon in [0, 1] pixel units: their --epsilon divided by 256). A field a
# method does not use must stay None, so a flag is never silently ignored.
_METHOD_DEFAULTS = {
    "gaussian": {"num_noise": 1},
    "consistency": {"num_noise": 2, "lbd": 10.0, "eta": 0.5, "consistency_loss": "default"},
    "stability": {"num_noise": 1, "lbd": 2.0},
    "smoothadv": {"num_noise": 1, "epsilon": 64 / 256, "num_steps": 10, "warmup": 1},
    "macer": {"num_noise": 16, "lbd": 16.0, "beta": 16.0, "gamma": 8.0, "deferred": False},
}
# SmoothAdv inside --method=consistency --adv_training (train_consistency.py).
_ADV_CONSISTENCY_DEFAULTS = {"epsilon": 512 / 256, "num_steps": 4, "warmup": 10}
# Live certification of a held-out training subset (tf_consreg.callbacks.CertifyCallback).
_CERTIFY_DEFAULTS = {"certify_examples": 200, "certify_n0": 100, "certify_n": 1000, "certify_alpha": 0.001,
                     "certify_batch_size": 1000}
_OPTIONAL_FIELDS = ("lbd", "eta", "consistency_loss", "beta", "gamma", "deferred", "epsilon", "num_steps", "warmup")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, checked at construction.

    Method-specific fields (`num_noise`, `lbd`, `eta`, `consistency_loss`,
    `beta`, `gamma`, `deferred`, `epsilon`, `num_steps`, `warmup`) are None
    when not given; they get the authors' defaults for the methods that use
    them and must stay None for the methods that do not, so a flag that would
    be silently ignored is refused instead.

    Attributes mirror the flags of bin/train.py; see its --help.
    """

    model_dir: str
    dataset: str = "fashion_mnist"
    arch: str = "lenet"
    method: str = "consistency"
    sigma: float = 0.25
    num_noise: Optional[int] = None
    lbd: Optional[float] = None
    eta: Optional[float] = None
    consistency_loss: Optional[str] = None
    beta: Optional[float] = None
    gamma: Optional[float] = None
    deferred: Optional[bool] = None
    adv_training: bool = False
    epsilon: Optional[float] = None
    num_steps: Optional[int] = None
    warmup: Optional[int] = None
    epochs: int = 90
    batch_size: int = 256
    batch_split: bool = False
    lr: float = 0.01
    lr_step_size: int = 30
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
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
    mixed_precision: str = "none"
    jit_compile: bool = False
    pretrained_model: Optional[str] = None

    def __post_init__(self):
        from tf_consreg import data  # pylint: disable=import-outside-toplevel
        from tf_consreg import models  # pylint: disable=import-outside-toplevel

        _check(bool(self.model_dir), "--model_dir is required: the directory for checkpoints, logs and the model")
        _check(self.dataset in data.DATASETS,
               f"--dataset={self.dataset!r} is unknown; choose one of {', '.join(data.DATASETS)}")
        _check(self.arch in models.ARCHITECTURES,
               f"--arch={self.arch!r} is unknown; choose one of {', '.join(models.ARCHITECTURES)}")
        models.check_architecture(self.arch, self.dataset)
        _check(self.method in METHODS, f"--method={self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        _check(self.sigma > 0, f"--sigma must be > 0, got {self.sigma}")
        self._resolve_method_fields()
        _check(self.num_noise >= 1, f"--num_noise must be >= 1, got {self.num_noise}")
        _check(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _check(self.lr_step_size >= 1, f"--lr_step_size must be >= 1, got {self.lr_step_size}")
        _check(0 < self.lr_gamma <= 1, f"--lr_gamma must be in (0, 1], got {self.lr_gamma}")
        _check(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.train_examples >= 0, f"--train_examples must be >= 0 (0 = all), got {self.train_examples}")
        _check(self.eval_examples >= 0, f"--eval_examples must be >= 0 (0 = no evaluation), got {self.eval_examples}")
        _check(self.strategy in distribute.STRATEGIES,
               f"--strategy={self.strategy!r} is unknown; choose one of {', '.join(distribute.STRATEGIES)}")
        _check(self.steps_per_execution >= 1, f"--steps_per_execution must be >= 1, got {self.steps_per_execution}")
        _check(self.mixed_precision in MIXED_PRECISION,
               f"--mixed_precision={self.mixed_precision!r} is unknown; choose one of {', '.join(MIXED_PRECISION)}")
        if self.pretrained_model is not None:
            _check(os.path.isfile(self.pretrained_model),
                   f"--pretrained_model={self.pretrained_model} is not a file; give a base_model.keras")
        if self.batch_split:
            _check(self.batch_size % self.num_noise == 0,
                   f"--batch_size={self.batch_size} must be divisible by --num_noise={self.num_noise} "
                   "with --batch_split")
        _check(self.clean_batch_size >= 1, "--batch_size is smaller than --num_noise with --batch_split")

        self._check_method_fields()
        self._resolve_certify_fields()

    def _resolve_certify_fields(self) -> None:
        """Live certification's fields: defaults when it is on, refused when it is off."""
        from tf_consreg import data  # pylint: disable=import-outside-toplevel

        _check(self.certify_every >= 0, f"--certify_every must be >= 0 (0 = off), got {self.certify_every}")
        if not self.certify_every:
            for name in _CERTIFY_DEFAULTS:
                _check(getattr(self, name) is None,
                       f"--{name} is used only with --certify_every; add --certify_every=N or remove it")
            return
        _check(self.dataset not in data.STREAMED,
               f"--certify_every holds images out of the training split in memory; --dataset={self.dataset} "
               "is streamed")
        for name, default in _CERTIFY_DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        _check(self.certify_examples >= 1, f"--certify_examples must be >= 1, got {self.certify_examples}")
        _check(self.certify_n0 >= 1, f"--certify_n0 must be >= 1, got {self.certify_n0}")
        _check(self.certify_n >= 1, f"--certify_n must be >= 1, got {self.certify_n}")
        _check(0 < self.certify_alpha < 1, f"--certify_alpha must be in (0, 1), got {self.certify_alpha}")
        _check(self.certify_batch_size >= 1, f"--certify_batch_size must be >= 1, got {self.certify_batch_size}")

    def _resolve_method_fields(self) -> None:
        """Fills the method's defaults; refuses fields the method would ignore."""
        _check(not self.adv_training or self.method == "consistency",
               f"--adv_training combines SmoothAdv with --method=consistency; for --method={self.method} "
               "use --method=smoothadv or drop --adv_training")
        defaults = dict(_METHOD_DEFAULTS[self.method])
        if self.adv_training:
            defaults.update(_ADV_CONSISTENCY_DEFAULTS)
        for name in ("num_noise",) + _OPTIONAL_FIELDS:
            if name in defaults:
                if getattr(self, name) is None:
                    object.__setattr__(self, name, defaults[name])
            elif getattr(self, name) is not None:
                users = [m for m, d in _METHOD_DEFAULTS.items() if name in d]
                if name in _ADV_CONSISTENCY_DEFAULTS:
                    users.append("consistency --adv_training")
                raise ConfigError(f"--{name} is used only by --method={' or --method='.join(users)}; "
                                  f"remove it for --method={self.method}")

    def _check_method_fields(self) -> None:
        if self.lbd is not None:
            _check(self.lbd >= 0, f"--lbd must be >= 0, got {self.lbd}")
        if self.eta is not None:
            _check(self.eta >= 0, f"--eta must be >= 0, got {self.eta}")
        if self.consistency_loss is not None:
            _check(self.consistency_loss in losses.CONSISTENCY_LOSSES,
                   f"--consistency_loss={self.consistency_loss!r} is unknown; "
                   f"choose one of {', '.join(losses.CONSISTENCY_LOSSES)}")
            if self.consistency_loss == "mse":
                _check(self.num_noise == 2, f"--consistency_loss=mse needs --num_noise=2, got {self.num_noise}")
        if self.method == "stability":
            _check(self.num_noise == 1, f"--method=stability draws one noise per image: --num_noise must be 1, "
                   f"got {self.num_noise}")
        if self.beta is not None:
            _check(self.beta > 0, f"--beta must be > 0, got {self.beta}")
        if self.gamma is not None:
            _check(self.gamma >= 0, f"--gamma must be >= 0, got {self.gamma}")
        if self.epsilon is not None:
            _check(self.epsilon >= 0, f"--epsilon must be >= 0 (an L2 radius in [0, 1] pixel units), "
                   f"got {self.epsilon}")
        if self.num_steps is not None:
            _check(self.num_steps >= 1, f"--num_steps must be >= 1, got {self.num_steps}")
        if self.warmup is not None:
            _check(self.warmup >= 1, f"--warmup must be >= 1, got {self.warmup}")

    @property
    def adversarial(self) -> bool:
        """Whether each step first attacks the inputs (SmoothAdv)."""
        return self.method == "smoothadv" or self.adv_training

    @property
    def deferred_epochs(self) -> int:
        """MACER's deferred start: epochs trained with the robustness weight at 0.

        The authors' train_macer.py zeroes it while epoch <= lr_step_size
        (0-based), i.e. for the first lr_step_size + 1 epochs.
        """
        return self.lr_step_size + 1 if self.deferred else 0

    @property
    def clean_batch_size(self) -> int:
        """Clean images per optimizer step (each step sees m times as many noisy copies)."""
        return self.batch_size // self.num_noise if self.batch_split else self.batch_size

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training config fields: {', '.join(unknown)}")
        return cls(**values)

    def differences(self, other: "TrainConfig", ignore=("epochs", "model_dir")) -> Dict[str, tuple]:
        """Fields (other than `ignore`) whose values differ: name -> (self, other)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in ignore and mine[k] != theirs[k]}


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
