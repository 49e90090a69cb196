"""What the commands (tf_consreg/commands, run as bin/*.py or tf-consreg-*) share: flags from configs, one-line errors.

A binary's flags are made from the fields of the config it builds
(`define_flags`): each flag takes its type and default from the dataclass
field, so a default is stated once, in the config, and the config is built
from the flags without a field-by-field copy (`config_from_flags`). Binaries
that share flags (bin/certify.py and bin/predict.py; bin/train.py and
bin/tune.py) define them from one table of help texts here.

`run` gives every binary the same failure: a bad flag, flagfile or input is
one line `<program>: error: <message>` on stderr and exit status 2. A stdout
closed by its reader (`tf-consreg-certify --help | head -3`) ends the binary
quietly, as SIGPIPE ends `yes | head`: status 141, nothing on stderr.

The library never reads flags: binaries pass configs to it.
"""

import collections.abc
import dataclasses
import math
import numbers
import os
import re
import select
import sys
import types
import typing
from typing import Any, Callable, Dict, Iterable, Mapping, NamedTuple, Optional, Sequence, Type

from absl import app
from absl import flags
from absl import logging

from tf_consreg import files
from tf_consreg.data import DATASETS  # The names only: no TensorFlow.
from tf_consreg.errors import ConfigError

FlagHolders = Dict[str, flags.FlagHolder]

# define_flags is a DEFINE_* wrapper: the flags it defines are key flags of
# the module that calls it (the binary), so that a binary's --help (short
# help: its key flags) lists them, not only --helpfull.
flags.disclaim_key_flags()

# The flags of bin/certify.py and bin/predict.py: the fields of
# certify_run.CertifyConfig but `mode`, which each binary sets.
CERTIFY_HELP = {
    "model_dir": "A bin/train.py run directory: its base_model.keras is smoothed, and its train_config.json gives "
                 "--dataset, --sigma, --data_dir.",
    "model": "A saved base model (.keras) instead of --model_dir; needs --dataset and --sigma.",
    "classifier": "With --denoiser, instead of --model_dir or --model: smooth f∘D, the classifier f (a .keras "
                  "model from images in [0, 1] to logits) behind the denoiser D; needs --dataset and --sigma.",
    "denoiser": "With --classifier: the denoiser D, a .keras model from images in [0, 1] to images of the same "
                "shape (a denoiser.keras of bin/train.py --method=denoise, or your own, e.g. a wrapped diffusion "
                "model).",
    "dataset": f"Dataset: {', '.join(DATASETS)} (default: the training run's). imagenet2012 is read in the test "
               "view that training evaluates on (shorter side resized to 256, center crop 224).",
    "data_dir": "Directory with the dataset files (default: the training run's, else the standard locations).",
    "mock_data": "Certify random images of the dataset's shape instead of the dataset (as bin/train.py's "
                 "--mock_data): smoke runs on machines without the data. Part of the run's settings.",
    "split": "Split whose examples are taken: test or train.",
    "sigma": "Noise level of the smoothed classifier (default: the sigma the model was trained with).",
    "n0": "Selection samples per example (guess the top class).",
    "n": "Samples per example: certify.py bounds the top class's probability with them (after --n0 selection "
         "samples); predict.py tests the top class against the runner-up with them. With --radii or --stages: the "
         "most samples per example (n_max).",
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
    "compute_dtype": "float32: sample the network computing in float32, whatever policy it was trained under (a "
                     "model trained in mixed_bfloat16 included). bfloat16: sample the network as mixed_bfloat16 "
                     "computes it (float32 logits), for deploying that network; faster where bfloat16 is native. "
                     "The certificate holds for the function sampled; part of the run's settings.",
    "noise": "The sampler. grid (the default; every dataset here is 8-bit): exact integer noise on the 8-bit "
             "grid, so the model sees (a + j)/255 of the integer pixel a plus integer noise j, sound in floating "
             "point (Voráček & Hein 2023); the inputs must be on the grid (the run fails naming the first bad "
             "pixel); each bound takes its total-variation slack (about 1e-12 per pixel) and PREDICT's test runs "
             "at alpha - n x slack. float: float32 Gaussian noise added to the image, for inputs that are not "
             "quantized. Part of the run's settings (a resume cannot change it; a log without it is a float run).",
    "radii": "Fixed-radius mode: certify only at these radii (comma-separated, each > 0, at most 3 significant "
             "digits), drawing the estimation samples in --stages and stopping each example as soon as its answer "
             "at every radius is settled: far fewer samples, at the same 1 - alpha guarantee. The TSV gets the "
             "column samples, and bin/analyze.py reports certified accuracy at these radii only, with no ACR "
             "(an example stops with a smaller radius than full CERTIFY's). Default: off, full CERTIFY.",
    "stages": "With --radii: the cumulative estimation samples after which each example's bounds are checked, "
              "increasing, ending at --n (n_max), the first >= --n0; the last stage's bounds are at level "
              "alpha/2, each earlier one's at alpha/(2(K-1)) (K stages; stats.stage_levels). Default: --n x (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1) without the stages below "
              "max(--n0, 100), i.e. 100,300,1000,3000,10000,30000,50000,100000 for --n=100000 "
              "(stats.default_stages). Why: in bench/staged_sim_bench.py on the authors' n = 100,000 logs it drew "
              "the fewest samples, or within 4% of the fewest, of 7 schedules for a grid of radii, and 9-450x fewer "
              "than fixed n for one radius; the 0.5 stage lets images with radius near the largest asked stop "
              "halfway.",
}
# PREDICT draws no selection samples and certifies no radius: bin/predict.py
# has no --n0 and no --radii; its --stages alone turns the staged mode on.
PREDICT_HELP = {name: text for name, text in CERTIFY_HELP.items() if name not in ("n0", "radii")}
PREDICT_HELP["stages"] = (
    "Staged PREDICT: the cumulative samples after which each example's test of the top two classes runs, at level "
    "alpha/2 at the last stage and alpha/(2(K-1)) at each earlier one (K stages), increasing, ending at --n; an example stops with its class at the first stage "
    "whose test rejects a tie, and abstains only if none did by --n. The TSV gets the column samples. E.g. "
    "--n=100000 --stages=100,300,1000,3000,10000,30000,50000,100000 (bin/certify.py's default schedule). "
    "Default: off, PREDICT with --n samples.")

# What a flag's value is parsed as, by the (unwrapped) type of its field.
_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}


# The help of every training flag: bin/train.py defines all of them, bin/tune.py
# those a search shares (tuning.TRAIN_FLAGS). Each is a field of
# run_config.TrainConfig or of its objective (run_config.ObjectiveConfig), which
# states its type and default.
TRAIN_HELP = {
    "model_dir": (
        "Run directory: flags, checkpoints, TensorBoard logs, base_model.keras. An existing run with the same "
        "flags resumes."),
    "dataset": f"Dataset: {', '.join(DATASETS)}.",
    "arch": "Architecture (see tf_consreg.models.ARCHITECTURES).",
    "method": (
        "consistency: cross-entropy + consistency term (Jeong & Shin 2020); gaussian: cross-entropy on noisy "
        "copies (Cohen et al. 2019); stability: clean cross-entropy + lbd * stability term (Li et al. 2019); "
        "smoothadv: cross-entropy on SmoothAdv attacks (Salman et al. 2019); macer: MACER (Zhai et al. 2020); "
        "smoothmix: cross-entropy + eta * mixup term on an adversarial walk (Jeong et al. 2021); standard: "
        "cross-entropy on clean images, no noise (--sigma then only sets the certification default); denoise: "
        "train a denoiser D in front of the frozen --classifier f (denoised smoothing, Salman et al. 2020; "
        "base_model.keras is f∘D, denoiser.keras is D). Flags a method does not use are refused."),
    "sigma": "Noise standard deviation, in [0, 1] pixel units.",
    "num_noise": (
        "m: noisy copies per clean image (K for macer). Default: 2 for consistency and denoise's consistency, "
        "16 for macer, 1 otherwise "
        "(stability needs 1; the authors' SmoothMix rows use 4 on MNIST, 2 on CIFAR-10)."),
    "lbd": (
        "lambda, weight of the regularizer: consistency (default 10), stability (default 2), macer's "
        "robustness term (default 16) or denoise's consistency KL (default 10)."),
    "eta": "eta: weight of consistency's entropy term (default 0.5) or of smoothmix's mixup term (default 1).",
    "consistency_loss": (
        "Form of the consistency term (consistency only; default 'default'): default = lbd*KL + eta*H, xent = "
        "lbd*(KL + H), kl = lbd*KL, mse = lbd*||p2 - p1||^2 (m = 2)."),
    "beta": "MACER's inverse softmax temperature (macer only; default 16).",
    "gamma": "MACER's hinge margin (macer only; default 8).",
    "deferred": (
        "MACER: keep the robustness weight at 0 until the first learning-rate drop, as the authors' MNIST runs "
        "(macer only)."),
    "adv_training": (
        "With --method=consistency: attack each batch with SmoothAdv first (the paper's 'SmoothAdv + "
        "Consistency')."),
    "epsilon": (
        "SmoothAdv's L2 radius in [0, 1] pixel units (the authors' --epsilon divided by 256: 255 -> 0.996). "
        "Default 0.25 for smoothadv, 2.0 with --adv_training."),
    "num_steps": "Attack steps: SmoothAdv's PGD (default 10 for smoothadv, 4 with --adv_training), smoothmix's T "
                 "(default 8).",
    "warmup": (
        "Epochs over which SmoothAdv's radius grows linearly to --epsilon (default 1 for smoothadv, 10 with "
        "--adv_training), or smoothmix's --eta and --maxnorm_s (default 10)."),
    "attack_step": (
        "smoothmix: L2 length of each step of the walk, in [0, 1] pixel units (the authors' --alpha, not divided "
        "by 256; default 1.0)."),
    "mix_step": "smoothmix: the mixup's start point: 0 the clean image (default), 1 the one-step adversary.",
    "maxnorm": "smoothmix: L2 bound of the walk around the clean image (default: unbounded).",
    "maxnorm_s": (
        "smoothmix: L2 bound of the start point around the clean image, warmed up with --eta (default: "
        "--attack_step * --mix_step)."),
    "denoise_objective": (
        "--method=denoise: what D minimizes over the noisy copies x + d. mse: mean (D(x + d) - x)^2 (default); "
        "stability: cross-entropy of f(D(x + d)) against f's label of x (Salman et al.); consistency: that "
        "cross-entropy + lbd * mean_i KL(p_mean || p_i) over the m copies (default m = 2, lbd = 10)."),
    "classifier": (
        "--method=denoise: the frozen classifier f, a .keras model from images in [0, 1] to logits "
        "(a base_model.keras, or any Keras classifier of that form); its weights never change."),
    "denoiser_arch": (
        "--method=denoise: the denoiser D: dncnn (DnCNN, 17 layers of 64 channels, Salman et al.'s; CIFAR-10, "
        "ImageNet; default) or dncnn_small (5 layers of 16 channels; MNIST, Fashion-MNIST)."),
    "epochs": "Training epochs.",
    "batch_size": (
        "CLEAN images per optimizer step; each step trains on m times as many noisy copies. With --batch_split, "
        "the images loaded per step of the authors' loader instead (see there)."),
    "batch_split": (
        "The authors' batching: split each loaded batch of --batch_size images into m chunks and take one "
        "optimizer step per chunk, so a step sees batch_size/m clean images and batch_size noisy copies. Use it "
        "to reproduce the paper's settings."),
    "lr": "Initial learning rate of SGD.",
    "lr_step_size": "Multiply the learning rate by --lr_gamma every this many epochs.",
    "lr_gamma": "Learning-rate decay factor.",
    "momentum": "SGD momentum.",
    "weight_decay": "L2 weight decay, coupled as in PyTorch's SGD.",
    "seed": "Seed of the noise, the shuffling and the initialization.",
    "train_examples": (
        "Use only the first N training images (0 = all; with --certify_every, all but the held-out ones)."),
    "eval_examples": "Test images for the per-epoch noisy accuracy (0 = no evaluation).",
    "certify_every": (
        "Every this many epochs (and after the last), certify --certify_examples images held out of the END of "
        "the training split (never trained on) and log val/acr, certified accuracy, the abstention rate and the "
        "certified-accuracy curve to TensorBoard, and val_acr to the epoch logs. 0 = off."),
    "certify_examples": "With --certify_every: images held out of the end of the training split (default 200).",
    "certify_n0": "With --certify_every: CERTIFY's selection samples.",
    "certify_n": "With --certify_every: CERTIFY's estimation samples.",
    "certify_alpha": "With --certify_every: CERTIFY's failure probability.",
    "certify_batch_size": "With --certify_every: noisy copies per forward pass.",
    "data_dir": (
        "Directory with the Fashion-MNIST IDX files, or a tensorflow-datasets data directory (ImageNet: the "
        "archives go in <data_dir>/downloads/manual). Default: Debian's dataset-fashion-mnist files, then "
        "~/tensorflow_datasets."),
    "mock_data": (
        "Train and evaluate on random images of the dataset's shape instead of the dataset: smoke runs on "
        "machines without the data."),
    "strategy": (
        "auto, default, mirrored or multi_worker. auto: MirroredStrategy when more than one GPU is visible, "
        "else one device. multi_worker: MultiWorkerMirroredStrategy over the cluster in the TF_CONFIG "
        "environment variable; run the same command on every worker (the chief writes --model_dir)."),
    "steps_per_execution": "Training steps per compiled call.",
    "mixed_precision": (
        "auto: mixed_bfloat16 where the hardware computes bfloat16 natively (a CPU with avx512_bf16 or amx_bf16, "
        "a GPU of compute capability 8.0 or more), else float32; the choice and why are printed at start and kept "
        "in train_config.json, and a resumed run keeps it. none or float32: float32 throughout. mixed_bfloat16, "
        "mixed_float16 (with dynamic loss scaling): layers compute in 16 bits (emulated, so slower, on hardware "
        "without it). Variables, logits and every loss term stay float32. Certification and export compute in "
        "float32 whatever the model was trained in (their --compute_dtype)."),
    "jit_compile": (
        "Compile the train step with XLA. Measure first: on CPUs it made LeNet slower, and Keras turns it off "
        "under tf.distribute."),
    "pretrained_model": (
        "Start from this base_model.keras of the same --arch (fine-tuning); when its class count differs from "
        "--dataset's, the classifier layer is replaced by a fresh one."),
}


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


# A nested config's field metadata key: the prefix of its fields' flag names
# (say "certify_": the CertifySpec of a training run gives --certify_n0).
FLAG_PREFIX = "flag_prefix"


class _FlagField(NamedTuple):
    """Where a flag's value goes: `parent` (the field holding a nested config, or None), its `field` and type."""

    parent: Optional[str]
    field: dataclasses.Field
    hint: Any


def _flag_fields(config_cls: Type) -> Dict[str, _FlagField]:
    """The fields that can be flags, by flag name.

    The fields of a field whose type is itself a dataclass (a nested config,
    possibly Optional) can be flags too, named `<prefix><field name>` with
    the prefix in the nesting field's metadata (`FLAG_PREFIX`, default
    none), unless `config_cls` has a field of that name.

    Raises:
      TypeError: two nested configs have a field of the same flag name.
    """
    hints = typing.get_type_hints(config_cls)
    own = {field.name: _FlagField(None, field, hints[field.name]) for field in dataclasses.fields(config_cls)}
    nested = {}
    for name, (_, parent, hint) in own.items():
        nested_cls = _unwrap(hint)
        if dataclasses.is_dataclass(nested_cls):
            prefix = parent.metadata.get(FLAG_PREFIX, "")
            nested_hints = typing.get_type_hints(nested_cls)
            for field in dataclasses.fields(nested_cls):
                if prefix + field.name in nested:
                    raise TypeError(f"{config_cls.__name__}: two nested fields named {prefix + field.name!r}")
                nested[prefix + field.name] = _FlagField(name, field, nested_hints[field.name])
    return {**nested, **own}


def _nested_default(config_cls: Type, parent: str) -> Any:
    """The instance that field `parent` has as its `default`, or None: its flags then take its class's defaults.

    Only a `default` instance counts, not one a `default_factory` makes: a
    nested config that resolves its own defaults (ObjectiveConfig's per
    method) must be built from its class's, not from another resolution.
    """
    field = next(f for f in dataclasses.fields(config_cls) if f.name == parent)
    default = field.default
    return default if dataclasses.is_dataclass(default) and not isinstance(default, type) else None


def define_flags(config_cls: Type, helps: Mapping[str, str], *, defaults: Optional[Mapping[str, Any]] = None,
                 flag_values: flags.FlagValues = flags.FLAGS) -> FlagHolders:
    """Defines one absl flag per field of `config_cls` named in `helps`.

    The flag has the field's name, the type of its annotation (bool, int,
    float, str, or a comma-separated list for sequence fields) and the
    field's default, so the default is stated once, in the config. The fields
    of a nested config (a field whose type is a dataclass) are flags too,
    named with the nesting field's prefix (`FLAG_PREFIX`); their defaults are
    those of the nesting field's default instance, if it has one.

    Args:
      config_cls: a dataclass config.
      helps: flag name -> help text, for the fields that become flags.
      defaults: flag name -> a default that differs from the field's for
        this binary (say, no evaluation by default in a search).
      flag_values: where to define them (absl's global FLAGS).

    Returns:
      Flag name -> the flag's holder.

    Raises:
      TypeError: a name is not a field, or its type has no flag type.
    """
    fields = _flag_fields(config_cls)
    defaults = dict(defaults or {})
    holders = {}
    for name, help_text in helps.items():
        if name not in fields:
            raise TypeError(f"{config_cls.__name__} has no field {name!r}")
        parent, field, hint = fields[name]
        kind = _unwrap(hint)
        if name in defaults:
            default = defaults.pop(name)
        elif parent is not None and _nested_default(config_cls, parent) is not None:
            default = getattr(_nested_default(config_cls, parent), field.name)
        else:
            default = _field_default(field)
        if isinstance(kind, tuple):
            default = None if default is None else [f"{v:g}" if isinstance(v, float) else str(v) for v in default]
            holders[name] = flags.DEFINE_list(name, default, help_text, flag_values=flag_values)
        elif kind in _DEFINE:
            holders[name] = _DEFINE[kind](name, default, help_text, flag_values=flag_values)
        else:
            raise TypeError(f"{config_cls.__name__}.{name}: no flag type for {hint}")
    if defaults:
        raise TypeError(f"defaults for fields without a flag: {', '.join(sorted(defaults))}")
    return holders


def flag_values(config_cls: Type, holders: FlagHolders) -> Dict[str, Any]:
    """The flags' values as the (nested) config's field values, by flag name.

    List flags are converted element by element to the field's element type.

    Raises:
      ConfigError: a list element is not of its type (the message names the flag).
    """
    fields = _flag_fields(config_cls)
    values = {}
    for name, holder in holders.items():
        value, kind = holder.value, _unwrap(fields[name].hint)
        if isinstance(kind, tuple) and value is not None:
            element = kind[1]
            try:
                value = tuple(element(v) for v in value)
            except ValueError as e:
                raise ConfigError(f"--{name}: {','.join(holder.value)!r} is not a list of "
                                  f"{element.__name__} values") from e
        values[name] = value
    return values


# What a value of each field type must be, as the message says it. bool is
# an Integral but never a number here: JSON's true where an int goes is a mistake.
_KINDS = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def check_value(label: str, value: Any, hint: Any, required: bool = False) -> None:
    """Refuses a value that is not of its field's type; every float must be finite.

    The one check every config made by `config_from_values` gets for each of
    its fields, whether the values come from flags or from a recorded file,
    so a new float flag cannot miss it: an infinite or NaN weight, step or
    radius passes most range checks (`inf > 0`) and fails far later, as a
    TensorFlow assertion or a diverged run blaming another flag.

    Args:
      label: how the message names the field ("--eta", "run.json: field 'eta'").
      value: its value; None passes unless `required`.
      hint: the field's type annotation (bool, int, float, str, Optional of
        one, or a sequence of one); other types (nested configs) pass.
      required: None is refused (a field whose type is not Optional and that
        has a default: None is never its value).

    Raises:
      ConfigError: the value is not of its type or not finite, naming `label`.
    """
    if value is None:
        if required:
            raise ConfigError(f"{label} must be given, got null")
        return
    kind = _unwrap(hint)
    if isinstance(kind, tuple):
        what, accepts = _KINDS.get(kind[1], (None, None))
        if what is None:
            return
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
            raise ConfigError(f"{label} must be a list, got {value!r}")
        for item in value:
            if not accepts(item):
                raise ConfigError(f"{label}: each value must be {what}, got {item!r}")
        return
    if kind in _KINDS and not _KINDS[kind][1](value):
        raise ConfigError(f"{label} must be {_KINDS[kind][0]}, got {value!r}")


def _required(hint: Any, field: dataclasses.Field) -> bool:
    """None is not a value of the field: its type is not Optional and it has a default."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    has_default = (field.default is not dataclasses.MISSING
                   or field.default_factory is not dataclasses.MISSING)  # type: ignore[misc]
    return not optional and has_default


def config_from_values(config_cls: Type, values: Mapping[str, Any], *, origin: Optional[str] = None) -> Any:
    """Builds the validated `config_cls` from field values by flag name, nested configs' fields among them.

    The inverse of `flat_values`. Each value is first checked against its
    field's type, every float finite (`check_value`). A nested config whose
    flags have values is built first (so its checks run first), from the
    nesting field's default instance if it has one (its fields not in
    `values` keep that instance's values); its messages name the flags with
    their prefix. One without values keeps its default.

    Args:
      config_cls: a dataclass config.
      values: flag name -> value.
      origin: the file the values were read from, if any: the type checks'
        messages then name the file and the field instead of the flag.

    Raises:
      ConfigError: a bad value (a value of another type, a float that is not
        finite, or one the configs' own checks refuse).
      TypeError: a name is no field of `config_cls` or of a nested config.
    """
    flag_fields = _flag_fields(config_cls)
    hints = typing.get_type_hints(config_cls)
    own, nested = {}, {}
    for name, value in values.items():
        if name not in flag_fields:
            raise TypeError(f"{config_cls.__name__} has no field or nested field {name!r}")
        parent, field, hint = flag_fields[name]
        check_value(f"--{name}" if origin is None else f"{origin}: field {name!r}", value, hint,
                    required=_required(hint, field))
        if parent is None:
            own[name] = value
        else:
            nested.setdefault(parent, {})[field.name] = value
    for parent, nested_values in nested.items():
        prefix = _nested_prefix(config_cls, parent)
        if parent in own:
            raise TypeError(f"{config_cls.__name__}: both {parent} and its fields "
                            f"{', '.join(prefix + name for name in nested_values)} given")
        base = _nested_default(config_cls, parent)
        try:
            if base is None:
                own[parent] = _unwrap(hints[parent])(**nested_values)
            else:
                own[parent] = dataclasses.replace(base, **nested_values)
        except ConfigError as e:
            raise ConfigError(_prefixed(str(e), prefix, nested_values)) from None
    return config_cls(**own)


def flat_values(config: Any, names: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """A config's field values by flag name, its nested configs' fields among them (`config_from_values`).

    Args:
      config: a dataclass config.
      names: the flag names to give (default: every field, nested ones
        in place of the field that nests them).

    Returns:
      Flag name -> value; a nested config that is None gives None for each of its fields.
    """
    flag_fields = _flag_fields(type(config))
    if names is None:
        nesting = {parent for parent, _, _ in flag_fields.values() if parent is not None}
        names = [name for name in flag_fields if name not in nesting]
    values = {}
    for name in names:
        parent, field, _ = flag_fields[name]
        holder = config if parent is None else getattr(config, parent)
        values[name] = None if holder is None else getattr(holder, field.name)
    return values


def config_from_flags(config_cls: Type, holders: FlagHolders, **fields) -> Any:
    """Builds the validated `config_cls` from its flags, plus `fields` set by the binary (`config_from_values`).

    Raises:
      ConfigError: a bad value (raised by the configs' own checks).
    """
    return config_from_values(config_cls, {**flag_values(config_cls, holders), **fields})


def _nested_prefix(config_cls: Type, parent: str) -> str:
    return next(f for f in dataclasses.fields(config_cls) if f.name == parent).metadata.get(FLAG_PREFIX, "")


def _prefixed(message: str, prefix: str, names: Iterable[str]) -> str:
    """`message` with each `--name` of `names` written as the flag `--<prefix>name`."""
    if not prefix:
        return message
    # Longest first: --n0 is not --n followed by 0.
    pattern = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.sub(rf"--({pattern})\b", lambda m: f"--{prefix}{m.group(1)}", message)


def _program() -> str:
    return os.path.basename(sys.argv[0])


def _fail(message: str) -> None:
    print(f"{_program()}: error: {message}", file=sys.stderr)
    sys.exit(2)


# The status of a process that SIGPIPE ended (128 + 13), which shells know.
_CLOSED_STDOUT_STATUS = 141


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (`... | head` after head exited).

    The pipe then polls as an error. A broken pipe anywhere else (a socket of
    the query command) is not this, and stays an error.
    """
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # No poll (Windows), or a stdout without a descriptor.
        return False


def _end_if_stdout_closed() -> None:
    """Ends the program quietly if stdout's reader has gone: status 141, nothing on stderr."""
    if not _stdout_closed():
        return
    # Python flushes what stdout still buffers at exit, which would fail again and say so on stderr.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(_CLOSED_STDOUT_STATUS)


def _parse_flags(argv: Sequence[str]) -> Sequence[str]:
    """absl's flag parsing, failing as every other check does: one line, exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(" ".join(str(e).split()))
    except UnicodeDecodeError as e:  # A flagfile that is not text.
        _fail(f"a --flagfile is not UTF-8 text ({e})")
    except OSError as e:
        _end_if_stdout_closed()  # --help writing to `| head`, not a flagfile.
        _fail(f"a --flagfile cannot be read ({e})")  # A flagfile that cannot be read.
    except SystemExit:  # --help and its kin print and exit: what stdout still buffers must reach the reader now.
        _flush_stdout()
        raise
    return argv  # Not reached.


def _flush_stdout() -> None:
    """Flushes stdout, ending quietly if its reader has gone."""
    try:
        sys.stdout.flush()
    except OSError:
        _end_if_stdout_closed()
        raise


def _describe_in_help(command: types.ModuleType) -> None:
    """Makes absl's --help describe `command` (its docstring and flags), however it was started.

    absl's --help prints the `__main__` module's docstring and the key flags of
    the module named sys.argv[0]. A command started as a console script (whose
    `__main__` is pip's wrapper) or through its bin/ shim is imported under its
    own name, so --help would describe the wrapper and list no flag. Run as
    `__main__` itself (`python -m tf_consreg.commands.<name>`), it needs nothing.
    """
    main_module = sys.modules["__main__"]
    if main_module is command:
        return
    main_module.__doc__ = command.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(command.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main: Callable[[Sequence[str]], None], positional: bool = False) -> None:
    """Runs an absl `main`, turning every input error into one line on stderr.

    Malformed or unknown flags, unreadable flagfiles, and every check the
    library makes on values (ranges, files, combinations; `ConfigError`) give
    `<program>: error: <message>` and exit status 2, with no traceback. A
    stdout whose reader has gone (`| head`) ends it with status 141 and
    nothing on stderr.

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
            # Here, not at exit: a reader that has gone (`| head`) is caught below.
            sys.stdout.flush()
        except ConfigError as e:
            _fail(str(e))
        except OSError as e:  # A write that failed during the run (full disk, read-only mount, ...).
            _end_if_stdout_closed()
            _fail(f"{files.describe_os_error(e)}; nothing written before the failure is lost: fix the cause and "
                  "run the same command again")

    _describe_in_help(sys.modules[main.__module__])
    app.run(_main, flags_parser=_parse_flags)


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
