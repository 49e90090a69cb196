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

from tf_consreg.errors import ConfigError

METHODS = ("gaussian", "consistency")
CONSISTENCY_LOSSES = ("default", "xent", "kl", "mse")
STRATEGIES = ("auto", "default", "mirrored")

TRAIN_CONFIG_FILE = "train_config.json"

# Defaults of the authors' train_consistency.py, used when the flag is absent.
_CONSISTENCY_DEFAULTS = {"lbd": 10.0, "eta": 0.5, "consistency_loss": "default"}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, checked at construction.

    Method-specific fields (`lbd`, `eta`, `consistency_loss`) are None when not
    given; they get the authors' defaults for the methods that use them and
    must stay None for the methods that do not, so a flag that would be
    silently ignored is refused instead.

    Attributes mirror the flags of bin/train.py; see its --help.
    """

    model_dir: str
    dataset: str = "fashion_mnist"
    arch: str = "lenet"
    method: str = "consistency"
    sigma: float = 0.25
    num_noise: int = 2
    lbd: Optional[float] = None
    eta: Optional[float] = None
    consistency_loss: Optional[str] = None
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
    data_dir: Optional[str] = None
    strategy: str = "auto"
    steps_per_execution: int = 1

    def __post_init__(self):
        from tf_consreg import data  # pylint: disable=import-outside-toplevel
        from tf_consreg import models  # pylint: disable=import-outside-toplevel

        _check(bool(self.model_dir), "--model_dir is required: the directory for checkpoints, logs and the model")
        _check(self.dataset in data.DATASETS,
               f"--dataset={self.dataset!r} is unknown; choose one of {', '.join(data.DATASETS)}")
        _check(self.arch in models.ARCHITECTURES,
               f"--arch={self.arch!r} is unknown; choose one of {', '.join(models.ARCHITECTURES)}")
        _check(self.method in METHODS, f"--method={self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        _check(self.sigma > 0, f"--sigma must be > 0, got {self.sigma}")
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
        _check(self.strategy in STRATEGIES,
               f"--strategy={self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
        _check(self.steps_per_execution >= 1, f"--steps_per_execution must be >= 1, got {self.steps_per_execution}")
        if self.batch_split:
            _check(self.batch_size % self.num_noise == 0,
                   f"--batch_size={self.batch_size} must be divisible by --num_noise={self.num_noise} "
                   "with --batch_split")
        _check(self.clean_batch_size >= 1, "--batch_size is smaller than --num_noise with --batch_split")

        if self.method == "consistency":
            for name, default in _CONSISTENCY_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
            _check(self.lbd >= 0, f"--lbd must be >= 0, got {self.lbd}")
            _check(self.eta >= 0, f"--eta must be >= 0, got {self.eta}")
            _check(self.consistency_loss in CONSISTENCY_LOSSES,
                   f"--consistency_loss={self.consistency_loss!r} is unknown; "
                   f"choose one of {', '.join(CONSISTENCY_LOSSES)}")
            if self.consistency_loss == "mse":
                _check(self.num_noise == 2, f"--consistency_loss=mse needs --num_noise=2, got {self.num_noise}")
        else:
            for name in _CONSISTENCY_DEFAULTS:
                _check(getattr(self, name) is None,
                       f"--{name} is used only by --method=consistency; remove it for --method={self.method}")

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
