"""What the absl binaries in bin/ share: flags made from configs, and one-line errors.

A binary's flags are made from the fields of the config it builds
(`define_flags`): each flag takes its type and default from the dataclass
field, so a default is stated once, in the config, and the config is built
from the flags without a field-by-field copy (`config_from_flags`). Binaries
that share flags (bin/certify.py and bin/predict.py; bin/train.py and
bin/tune.py) define them from one table of help texts here.

`run` gives every binary the same failure: a bad flag, flagfile or input is
one line `<program>: error: <message>` on stderr and exit status 2.

The library never reads flags: binaries pass configs to it.
"""

import collections.abc
import dataclasses
import os
import sys
import typing
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Type

from absl import app
from absl import flags
from absl import logging

from tf_consreg.errors import ConfigError

FlagHolders = Dict[str, flags.FlagHolder]

# The flags of bin/certify.py and bin/predict.py: the fields of
# certify_run.CertifyConfig but `mode`, which each binary sets.
CERTIFY_HELP = {
    "model_dir": "A bin/train.py run directory: its base_model.keras is smoothed, and its train_config.json gives "
                 "--dataset, --sigma, --data_dir.",
    "model": "A saved base model (.keras) instead of --model_dir; needs --dataset and --sigma.",
    "dataset": "Dataset: fashion_mnist, mnist or cifar10 (default: the training run's).",
    "data_dir": "Directory with the dataset files (default: the training run's, else the standard locations).",
    "split": "Split whose examples are taken: test or train.",
    "sigma": "Noise level of the smoothed classifier (default: the sigma the model was trained with).",
    "n0": "Selection samples per example (guess the top class).",
    "n": "Samples per example: certify.py bounds the top class's probability with them (after --n0 selection "
         "samples); predict.py tests the top class against the runner-up with them.",
    "alpha": "Failure probability of each certificate (certify.py), or of each prediction, which abstains unless "
             "the top class wins the binomial test at this level (predict.py).",
    "batch_size": "Noisy copies per forward pass. Part of the run's settings: it fixes how the noise is drawn, so "
                  "a resumed run must use the same value.",
    "skip": "Take every skip-th example (idx = 0, skip, 2 skip, ...).",
    "max": "Stop before example index max (-1: the whole split).",
    "output": "TSV file to write, or to resume if it holds the same run.",
    "seed": "Noise seed; example idx uses the noise of (seed, idx).",
    "num_shards": "Split the selected examples into this many shards, one per process or host; bin/analyze.py "
                  "reports the shard files as one run.",
    "shard_index": "Which shard to take, 0 <= shard_index < num_shards: the j-th selected example belongs to shard "
                   "j mod num_shards.",
    "strategy": "default: one device. mirrored: each example's samples are split across the local GPUs (or logical "
                "CPU devices), with other noise than default, so the strategy and device count are part of the "
                "run's settings.",
}
# PREDICT draws no selection samples: bin/predict.py has no --n0.
PREDICT_HELP = {name: text for name, text in CERTIFY_HELP.items() if name != "n0"}

# What a flag's value is parsed as, by the (unwrapped) type of its field.
_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}


def _unwrap(annotation) -> Any:
    """Optional[X] -> X; sequence and tuple annotations -> (list, element type)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return _unwrap(args[0])
    if typing.get_origin(annotation) in (tuple, list, collections.abc.Sequence) or annotation in (tuple, list):
        element = args[0] if args else str
        return (list, element)
    return annotation


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None  # A required field: the config says what is missing.


def define_flags(config_cls: Type, helps: Mapping[str, str], *, defaults: Optional[Mapping[str, Any]] = None,
                 flag_values: flags.FlagValues = flags.FLAGS) -> FlagHolders:
    """Defines one absl flag per field of `config_cls` named in `helps`.

    The flag has the field's name, the type of its annotation (bool, int,
    float, str, or a comma-separated list for sequence fields) and the
    field's default, so the default is stated once, in the config.

    Args:
      config_cls: a dataclass config.
      helps: field name -> help text, for the fields that become flags.
      defaults: field name -> a default that differs from the field's for
        this binary (say, no evaluation by default in a search).
      flag_values: where to define them (absl's global FLAGS).

    Returns:
      Field name -> the flag's holder.

    Raises:
      TypeError: a name is not a field, or its type has no flag type.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    defaults = dict(defaults or {})
    holders = {}
    for name, help_text in helps.items():
        if name not in fields:
            raise TypeError(f"{config_cls.__name__} has no field {name!r}")
        kind = _unwrap(hints[name])
        default = defaults.pop(name) if name in defaults else _field_default(fields[name])
        if isinstance(kind, tuple):
            default = None if default is None else [f"{v:g}" if isinstance(v, float) else str(v) for v in default]
            holders[name] = flags.DEFINE_list(name, default, help_text, flag_values=flag_values)
        elif kind in _DEFINE:
            holders[name] = _DEFINE[kind](name, default, help_text, flag_values=flag_values)
        else:
            raise TypeError(f"{config_cls.__name__}.{name}: no flag type for {hints[name]}")
    if defaults:
        raise TypeError(f"defaults for fields without a flag: {', '.join(sorted(defaults))}")
    return holders


def flag_values(config_cls: Type, holders: FlagHolders) -> Dict[str, Any]:
    """The flags' values as the config's field values.

    List flags are converted element by element to the field's element type.

    Raises:
      ConfigError: a list element is not of its type (the message names the flag).
    """
    hints = typing.get_type_hints(config_cls)
    values = {}
    for name, holder in holders.items():
        value, kind = holder.value, _unwrap(hints[name])
        if isinstance(kind, tuple) and value is not None:
            element = kind[1]
            try:
                value = tuple(element(v) for v in value)
            except ValueError as e:
                raise ConfigError(f"--{name}: {','.join(holder.value)!r} is not a list of "
                                  f"{element.__name__} values") from e
        values[name] = value
    return values


def config_from_flags(config_cls: Type, holders: FlagHolders, **fields) -> Any:
    """Builds the validated `config_cls` from its flags, plus `fields` set by the binary.

    Raises:
      ConfigError: a bad value (raised by the config's own checks).
    """
    return config_cls(**flag_values(config_cls, holders), **fields)


def _program() -> str:
    return os.path.basename(sys.argv[0])


def _fail(message: str) -> None:
    print(f"{_program()}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: Sequence[str]) -> Sequence[str]:
    """absl's flag parsing, failing as every other check does: one line, exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(" ".join(str(e).split()))
    except UnicodeDecodeError as e:  # A flagfile that is not text.
        _fail(f"a --flagfile is not UTF-8 text ({e})")
    except OSError as e:  # A flagfile that cannot be read.
        _fail(f"a --flagfile cannot be read ({e})")
    return argv  # Not reached.


def run(main: Callable[[Sequence[str]], None], positional: bool = False) -> None:
    """Runs an absl `main`, turning every input error into one line on stderr.

    Malformed or unknown flags, unreadable flagfiles, and every check the
    library makes on values (ranges, files, combinations; `ConfigError`) give
    `<program>: error: <message>` and exit status 2, with no traceback.

    Args:
      main: the binary's main function, as for `absl.app.run`.
      positional: the binary takes positional arguments (otherwise any is an error).
    """

    def _main(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines drown the progress bar.
        if len(argv) > 1 and not positional:
            _fail(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            main(argv)
        except ConfigError as e:
            _fail(str(e))

    app.run(_main, flags_parser=_parse_flags)
