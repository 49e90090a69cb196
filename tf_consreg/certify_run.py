"""The certification run: CERTIFY or PREDICT over a dataset split, into a certification log.

What bin/certify.py and bin/predict.py run. `CertifyConfig` is one run,
validated at construction; `certify_dataset` certifies (or predicts) its
examples with `smoothing.Smooth` and appends one row per example to the log
(format: `certify_log`). A run is

- resumable: an existing log of the same settings is continued after its
  last complete row, and the noise of example idx is keyed by (seed, idx),
  so a resumed run writes the rows of an uninterrupted one;
- shardable: `num_shards` processes or hosts each certify their share of
  the examples into their own log (`CertifyConfig.shard_indices`), which
  `analysis` reports as one run;
- locked: a log is written by one process at a time (`_claim_output`);
- full or staged: with `radii` (CERTIFY) or `stages` (PREDICT) the
  estimation samples are drawn in stages and each example stops once its
  answer is settled (`smoothing.Smooth.certify_staged_batch`,
  `predict_staged_batch`): a fixed-radius run. Its log has the column
  `samples`, and its settings record the mode, radii and stages, so a run
  never resumes or merges with one of the other kind;
- grid or float noise (`CertifySpec.noise`, grid by default): a grid run
  refuses an image off the 8-bit grid naming the example and its first bad
  pixel, and the settings record `noise` (a log without it is a float
  run's), so runs of the two modes never resume or merge into one another;
- guarded: before any work it refuses --n and --alpha too small for any
  example to get an answer (naming the smallest --n that can), a model
  whose output is not the dataset's classes, and images outside [0, 1]
  (naming the first bad pixel); it prints the sampler and the largest
  radius the run can certify, and warns when the base model is near chance
  on noisy copies of the first examples (`probe_threshold`).
"""

import contextlib
import dataclasses
import fcntl
import fractions
import math
import os
import sys
import time
from typing import IO, Any, Dict, Optional, Sequence, Tuple

import keras
import numpy as np

from tf_consreg import certify_log
from tf_consreg import certify_spec
from tf_consreg import data
from tf_consreg import denoise
from tf_consreg import distribute
from tf_consreg import engine
from tf_consreg import files
from tf_consreg import models
from tf_consreg import run_config
from tf_consreg import smoothing
from tf_consreg import stats
from tf_consreg.certify_spec import CertifySpec
from tf_consreg.errors import ConfigError, check

# What a run does: CertifyConfig.mode (a staged run's log mode adds "_staged").
_MODES = ("certify", "predict")
# Samples per `certify_batch` call: enough images to fill the forward batches
# when n is small; one image at a time when n is large, so rows (and the
# progress bar) advance every few seconds.
_SAMPLES_PER_CALL_IN_BATCHES = 16


@dataclasses.dataclass(frozen=True)
class CertifyConfig:
    """One run of CERTIFY (or PREDICT) over a dataset split, checked at construction.

    Flag values are checked first, then files: a training `model_dir` supplies
    the defaults of `dataset`, `sigma` and `data_dir` from its
    train_config.json. After construction every field is resolved (`model` is
    the .keras file, `dataset` and `spec.sigma` are set).

    Each field but `mode` and `spec`, and each field of `spec` (the sampling
    settings, `certify_spec.CertifySpec`), is a flag of bin/certify.py and
    bin/predict.py (PREDICT has no `n0` and no `radii`); see their --help.

    Staged runs: CERTIFY with `radii` is fixed-radius mode; `spec.stages`
    then sets the schedule (default `certify_spec.default_stages(n)` from
    max(n0, 100)), and stages without `radii` are refused. PREDICT with
    stages is staged PREDICT. After construction `spec.stages` is resolved
    (None for a full run) and `radii` sorted.

    Sharding: the selected examples idx = 0, skip, 2 skip, ... (below `max`)
    are dealt out round-robin, the j-th to shard j mod num_shards, so shard i
    holds idx = (i + t num_shards) skip for t = 0, 1, ...: a fixed set that
    does not depend on `max` (a resumed shard may go further), balanced to
    one example, and spread evenly over the split, so an unfinished shard
    leaves scattered gaps rather than a missing block of (possibly sorted)
    examples.
    """

    output: str
    model_dir: Optional[str] = None
    model: Optional[str] = None
    dataset: Optional[str] = None
    data_dir: Optional[str] = None
    mock_data: bool = False
    split: str = "test"
    spec: CertifySpec = dataclasses.field(default_factory=CertifySpec)
    skip: int = 1
    max: int = -1
    seed: int = 0
    mode: str = "certify"
    num_shards: int = 1
    shard_index: int = 0
    strategy: str = "default"
    radii: Optional[Sequence[float]] = None
    classifier: Optional[str] = None
    denoiser: Optional[str] = None

    def __post_init__(self):
        # Flags first.
        check(self.mode in _MODES, f"mode={self.mode!r} is unknown; choose one of {', '.join(_MODES)}")
        check(bool(self.output), "--output is required: the TSV file to write (or to resume)")
        files.check_output_path(self.output, "output")
        denoised = denoise.check_files(self.classifier, self.denoiser, self.model_dir, self.model)
        check(denoised or bool(self.model_dir) != bool(self.model),
              "give exactly one of --model_dir (a training run) and --model (a saved .keras base model)")
        check(self.skip >= 1, f"--skip must be >= 1, got {self.skip}")
        check(self.max >= -1, f"--max must be -1 (no limit) or an index >= 0, got {self.max}")
        check(0 <= self.seed < 2**63, f"--seed must be in [0, 2^63), got {self.seed}")
        check(self.num_shards >= 1, f"--num_shards must be >= 1, got {self.num_shards}")
        check(0 <= self.shard_index < self.num_shards,
              f"--shard_index must be in [0, --num_shards={self.num_shards}), got {self.shard_index}")
        check(self.strategy in distribute.LOCAL_STRATEGIES,
              f"--strategy={self.strategy!r} is unknown; choose one of {', '.join(distribute.LOCAL_STRATEGIES)}")
        check(self.split in data.SPLITS, f"--split={self.split!r} is unknown; choose one of {', '.join(data.SPLITS)}")
        check(isinstance(self.spec, CertifySpec), f"spec must be a CertifySpec, got {type(self.spec).__name__}")
        self._check_staging()
        if self.dataset is not None:
            data.get_dataset_info(self.dataset)
        if self.model is not None or denoised:
            given = "--classifier with --denoiser" if denoised else "--model"
            check(self.spec.sigma is not None, f"--sigma is required with {given} (a run's --model_dir supplies it)")
            check(self.dataset is not None, f"--dataset is required with {given} (a run's --model_dir supplies it)")

        # Then files.
        if self.model_dir:
            check(os.path.isdir(self.model_dir), f"--model_dir={self.model_dir} is not a directory")
            train = run_config.read_train_config(self.model_dir)
            for name in ("dataset", "data_dir"):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, getattr(train, name))
            if self.spec.sigma is None:
                object.__setattr__(self, "spec", dataclasses.replace(self.spec, sigma=train.sigma))
            object.__setattr__(self, "model", os.path.join(self.model_dir, models.BASE_MODEL_FILE))
            check(os.path.isfile(self.model),
                  f"{self.model} not found: has the training run in --model_dir finished?")
        elif self.model:
            check(os.path.isfile(self.model), f"--model={self.model} is not a file; give a saved .keras model")
        self._check_can_decide()

    def _check_can_decide(self) -> None:
        """Refuses --n and --alpha too small for any example to get an answer (every one would abstain).

        Raises:
          ConfigError: naming --n, --alpha and the smallest --n that can answer at this --alpha.
        """
        n, alpha, slack = self.spec.n, self.spec.alpha, self.sample_slack
        if self.can_decide(n):
            return
        smallest = certify_spec.smallest_n(self.can_decide)
        advice = (f"the smallest --n that can {self.mode} at --alpha={alpha:g} is {smallest}" if smallest
                  else f"no --n can {self.mode} at --alpha={alpha:g}; raise it")
        level = self.final_level(n)
        if self.mode == "certify":
            where = f" (the level of its last stage: {level:g})" if self.staged else ""
            bound = f"{level:g}^(1/{n}) = {level ** (1 / n):.4g}" + (f" less the grid slack {slack:.2g}" if slack else "")
            raise ConfigError(f"--n={n} and --alpha={alpha:g} cannot certify any example: with all {n} samples in the "
                              f"top class the lower bound on p_A is {bound}{where}, not above 1/2, so every example "
                              f"abstains; {advice}")
        notes = ["alpha - n x the grid slack"] * bool(slack) + ["its last stage's share"] * self.staged
        test = ("no level (n x the grid slack uses up alpha)" if level is None
                else f"its level {level:.6g}" + (f" ({'; '.join(notes)})" if notes else ""))
        raise ConfigError(f"--n={n} and --alpha={alpha:g} cannot predict any example: with all {n} samples in one "
                          f"class the test's p-value is 2^(1-{n}) = {2.0 ** (1 - n):.4g}, not below {test}, so every "
                          f"example abstains; {advice}")

    @property
    def sample_slack(self) -> float:
        """The total-variation slack of one sample of this dataset's images (0 for float noise)."""
        num_pixels = math.prod(data.get_dataset_info(self.dataset).input_shape)
        return smoothing.sample_slack(self.spec.noise, self.spec.sigma, num_pixels)

    def final_level(self, n: int) -> Optional[float]:
        """The level of the last bound (CERTIFY) or test (PREDICT) an example meets when it draws n samples.

        alpha for a full run; a staged run's last stage's share
        (`stats.stage_levels`); PREDICT under grid noise first gives up n
        slack (`smoothing.grid_predict_alpha`). None when that leaves no level.
        """
        alpha, slack = self.spec.alpha, self.sample_slack
        if self.mode == "predict" and slack:
            try:
                alpha = smoothing.grid_predict_alpha(alpha, n, slack)
            except ValueError:
                return None
        return float(stats.stage_levels(alpha, len(self.spec.stages))[-1]) if self.staged else alpha

    def can_decide(self, n: int) -> bool:
        """Whether an example can get an answer from n samples: a radius > 0 (CERTIFY) or a class (PREDICT).

        Exact (`certify_spec.certify_can_certify`, `predict_can_decide`): when
        False, every example abstains whatever the model.
        """
        level = self.final_level(n)
        if level is None:
            return False
        if self.mode == "certify":
            return certify_spec.certify_can_certify(n, level, self.sample_slack)
        return certify_spec.predict_can_decide(n, level)

    def largest_radius(self) -> float:
        """The largest radius this run can certify: sigma Phi^-1(the bound with all n samples in the top class).

        The engine's bound and radius (engine.py), so rounded down as every
        radius of the run is; for a staged run, at its last stage's level
        (an earlier stage's bound is lower still).
        """
        n, level, slack = self.spec.n, self.final_level(self.spec.n), self.sample_slack
        return float(engine.certified_radius(engine.clopper_pearson_lower(n, n, level, slack), self.spec.sigma))

    @property
    def model_name(self) -> Tuple[str, str]:
        """The model as the settings record it: its absolute path (both, with --denoiser) and SHA-256."""
        if self.model:
            return os.path.abspath(self.model), files.file_sha256(self.model)
        return denoise.identity(self.classifier, self.denoiser)

    def _check_staging(self) -> None:
        """Checks and resolves `radii` and `stages` (flags only; before any file is read)."""
        if self.mode == "predict":
            check(self.radii is None, "PREDICT has no radii: bin/predict.py's staged mode is --stages alone")
        elif self.radii is None:
            check(self.spec.stages is None, "--stages needs --radii: the stages schedule fixed-radius mode "
                                            "(--radii); without --radii bin/certify.py runs full CERTIFY with --n "
                                            "samples")
        if self.radii is not None:
            object.__setattr__(self, "radii", tuple(sorted(certify_spec.check_radii(
                self.radii, digits=certify_log.RADIUS_DIGITS, name="--radii"))))
        if self.staged:
            object.__setattr__(self, "spec", self.spec.resolved(selection=self.mode == "certify"))

    @property
    def staged(self) -> bool:
        """Whether the run draws its samples in stages: CERTIFY with radii, PREDICT with stages."""
        return self.radii is not None or (self.mode == "predict" and self.spec.stages is not None)

    @property
    def log_mode(self) -> str:
        """The log's mode (`certify_log.MODES`): "certify", "predict", or "<mode>_staged"."""
        return certify_log.staged_mode(self.mode) if self.staged else self.mode

    @property
    def header(self) -> str:
        """The first line of the TSV, without its newline."""
        return certify_log.header_line(self.log_mode)

    def settings(self, replicas: int = 1) -> Dict[str, Any]:
        """What determines the rows of the TSV; a resumed run must match it.

        `max` is left out (a resumed run may go further), and so is `data_dir`
        (the same dataset may live elsewhere). `mock_data` is in when set
        (other images), and left out otherwise, so older logs resume.
        `compute_dtype` is in: the
        certificate holds for the function sampled in that dtype, so runs (and
        shards) of other dtypes are not one run. `batch_size` is in: it sets the
        noise blocks, so it changes the noise drawn; so do `strategy` and the
        number of `replicas` sharing each image's samples (1 without
        --strategy=mirrored). All shards of one run have the same settings
        but `shard_index`. A staged run's mode is "certify_staged" or
        "predict_staged" and its settings add `stages` and (CERTIFY) `radii`;
        a full run's settings are as they were before staged runs existed,
        so its older logs resume. `noise` is in: logs from before it have
        none and are float runs (`certify_log.comparable_settings` reads a
        missing `noise` as "float"), so they resume as --noise=float.

        Args:
          replicas: replicas of the run's strategy (`num_replicas_in_sync`).
        """
        model, digest = self.model_name
        settings = {
            "mode": self.log_mode, "model": model, "model_sha256": digest,
            "dataset": self.dataset, **({"mock_data": True} if self.mock_data else {}),
            "split": self.split, "sigma": self.spec.sigma, "n0": self.spec.n0, "n": self.spec.n,
            "alpha": self.spec.alpha, "seed": self.seed, "skip": self.skip, "batch_size": self.spec.batch_size,
            "num_shards": self.num_shards, "shard_index": self.shard_index,
            "strategy": self.strategy, "replicas": int(replicas), "compute_dtype": self.spec.compute_dtype,
        }
        if self.mode == "predict":
            del settings["n0"]
        settings["noise"] = self.spec.noise
        if self.staged:
            settings["stages"] = list(self.spec.stages)
            if self.radii is not None:
                settings["radii"] = list(self.radii)
        return settings

    def row_index(self, row: int) -> int:
        """The example index of this shard's row number `row` (0 = first row after the header)."""
        return (self.shard_index + row * self.num_shards) * self.skip

    def shard_indices(self, num_examples: int) -> np.ndarray:
        """This shard's example indices, in order, in a split of `num_examples`."""
        stop = num_examples if self.max < 0 else min(self.max, num_examples)
        return np.arange(0, stop, self.skip)[self.shard_index::self.num_shards]


def _check_settings_file(config: CertifyConfig, wanted: Dict[str, Any]) -> None:
    """Checks that --output's settings file holds the settings `wanted` of this run.

    Raises:
      ConfigError: the settings file is missing, unreadable or of another run.
    """
    output = config.output
    try:
        stored = certify_log.read_settings(output)
    except ConfigError as e:
        raise ConfigError(f"{e}; refusing to append to --output={output}") from e
    if stored is None:
        raise ConfigError(f"--output={output} exists but {certify_log.settings_path(output)} (the run's settings) "
                          "does not: it was not written by this tool; refusing to append. Choose a new --output")
    differences = certify_log.settings_differences(stored, wanted, labels=("there", "now"))
    if differences:
        raise ConfigError(f"--output={output} holds a run with other settings ({differences}); "
                          "rerun with the same flags to resume, or choose a new --output")


def _read_existing_rows(config: CertifyConfig, wanted: Dict[str, Any]) -> Tuple[int, int]:
    """Checks an existing --output belongs to this run; returns (complete rows, their byte length).

    A last line without its newline (a run killed while writing) is not
    counted, so it is redone.

    Raises:
      ConfigError: the output or its settings file belongs to another run or is corrupt.
    """
    _check_settings_file(config, wanted)
    output = config.output
    try:
        with open(output, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"--output={output} is unreadable ({e})") from e
    complete = raw[:raw.rfind(b"\n") + 1]
    lines = complete.decode("utf-8", errors="replace").split("\n")[:-1]
    if not lines or lines[0] != config.header:
        found = lines[0] if lines else raw[:80].decode("utf-8", errors="replace")
        raise ConfigError(f"--output={output} has the header {found!r}, not {config.header!r}; "
                          "refusing to append. Choose a new --output")
    num_classes = data.get_dataset_info(config.dataset).num_classes
    for number, line in enumerate(lines[1:], start=2):
        where = f"{output}:{number}"
        try:  # The row checks of analysis (bin/analyze.py), so that what resumes can be analyzed.
            idx = certify_log.parse_row(config.log_mode, line.split("\t"), where, num_classes=num_classes,
                                        stages=config.spec.stages if config.staged else None)[0]
        except ConfigError as e:
            raise ConfigError(f"{e}; the file is corrupt, choose a new --output") from None
        expected_idx = config.row_index(number - 2)
        if idx != expected_idx or line.split("\t")[0] != str(expected_idx):
            raise ConfigError(f"{where}: expected a row for example {expected_idx}, got {line!r}; "
                              "the file is corrupt, choose a new --output")
    return len(lines) - 1, len(complete)


def _claim_output(config: CertifyConfig, settings: Dict[str, Any]) -> Tuple[IO[bytes], int]:
    """Opens --output for this process alone, creating it if needed; returns (file, rows already there).

    Several processes may start on one --output at once (say, the tasks of
    a job array given the same file). The settings file and the header are
    created without replacing anything, so exactly one process creates each,
    and the TSV is then locked (`flock`) for as long as this run writes it:
    a second process is refused instead of writing rows that would be lost
    or duplicated. The rows are counted under the lock.

    Returns:
      The TSV, opened for appending after its last complete row (a torn last
      line is cut off), and locked; and the number of complete rows.

    Raises:
      ConfigError: another process holds the output, or it belongs to another run.
    """
    output = config.output
    try:
        certify_log.write_settings(output, settings)
    except FileExistsError:
        _check_settings_file(config, settings)  # Before creating the TSV: nothing written for another run.
    with contextlib.suppress(FileExistsError):
        certify_log.write_header(output, config.log_mode)
    f = open(output, "r+b")  # pylint: disable=consider-using-with  Held, locked, for the whole run.
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"--output={output} is being written by another process (its lock is held); "
                          "wait for it, or give this run another --output") from None
    except OSError as e:  # A file system without locks: run unguarded.
        print(f"warning: cannot lock --output={output} ({e}); make sure no other process writes it",
              file=sys.stderr)
    try:
        done, valid_bytes = _read_existing_rows(config, settings)
        f.truncate(valid_bytes)  # Drops a torn last line.
        f.seek(0, os.SEEK_END)
    except BaseException:
        f.close()
        raise
    return f, done


def _certify_batch(smooth: smoothing.Smooth, config: CertifyConfig, images: np.ndarray,
                   ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Sequence[Optional[int]]]:
    """The run's answer for a batch of images: (classes, radii (0 for PREDICT), samples (None for a full run))."""
    keys, spec = dict(seed=config.seed, image_ids=ids), config.spec
    if config.mode == "certify" and config.staged:
        result = smooth.certify_staged_batch(images, spec.n0, spec.n, spec.alpha, spec.batch_size,
                                             radii=config.radii, stages=spec.stages, **keys)
        return result.classes, result.radii, result.samples
    if config.mode == "certify":
        classes, radii = smooth.certify_batch(images, spec.n0, spec.n, spec.alpha, spec.batch_size, **keys)
        return classes, radii, [None] * len(ids)
    if config.staged:
        result = smooth.predict_staged_batch(images, spec.n, spec.alpha, spec.batch_size, stages=spec.stages, **keys)
        return result.classes, np.zeros(len(ids)), result.samples
    classes = smooth.predict_batch(images, spec.n, spec.alpha, spec.batch_size, **keys)
    return classes, np.zeros(len(ids)), [None] * len(ids)


# What a run prints at start about its sampler (--noise).
_NOISE_LINES = {
    "float": "noise: float (float32 Gaussian noise added to the image, for inputs that are not quantized; the "
             "default --noise=grid is sound in floating point)",
    "grid": "noise: grid (exact 8-bit grid noise, sound in floating point; bounds take its total-variation slack)",
}

# The check that the base model was trained with noise at this sigma: one
# noisy copy of each of the run's first _PROBE_IMAGES examples (a fraction of
# a second for the demo's LeNet; 64 forward passes of any model, against
# n0 + n per example for the run), and a warning when it gets at most
# `probe_threshold(64)` = 13 of them right. A model that gets half its noisy
# images right (far below a trained model of the demo's quality) does so
# with probability 9.4e-7 (exactly: P[Binomial(64, 1/2) <= 13]); a model at
# chance with 10 classes with probability 0.996, with 1000 classes almost
# surely.
_PROBE_IMAGES = 64
_PROBE_FALSE_ALARM = fractions.Fraction(1, 10**6)


def probe_threshold(num_images: int) -> int:
    """The most right answers out of `num_images` noisy images that still warn (-1: none would).

    The largest c with P[Binomial(num_images, 1/2) <= c] <= `_PROBE_FALSE_ALARM`,
    in exact integers (p = 1/2 makes the CDF a sum of binomial coefficients
    over 2^m): a base model right on half its noisy images or more is warned
    about with at most that probability.
    """
    total, threshold = 0, -1
    limit = 2**num_images * _PROBE_FALSE_ALARM  # A Fraction: the comparisons below are exact.
    while threshold < num_images and total + math.comb(num_images, threshold + 1) <= limit:
        threshold += 1
        total += math.comb(num_images, threshold)
    return threshold


def _check_pixels(images: np.ndarray, indices: np.ndarray, noise: str) -> None:
    """Refuses, in one line naming the example and its first bad pixel, a batch outside [0, 1] or (grid) off the grid.

    Raises:
      ConfigError: naming the example and --noise.
    """
    try:
        smoothing.check_pixels(images, grid=noise == "grid", float_hint="--noise=float")
    except ValueError:
        for image, idx in zip(images, indices):  # Only on failure: which example, and its own pixel index.
            try:
                smoothing.check_pixels(image, grid=noise == "grid", float_hint="--noise=float")
            except ValueError as e:
                raise ConfigError(f"--noise={noise}: example {int(idx)}: {str(e).replace('images[', 'image[', 1)}"
                                  ) from None
        raise


def _probe_base_model(smooth: smoothing.Smooth, config: CertifyConfig, reader, num_classes: int) -> None:
    """Checks the pixels of the run's first examples and warns, in one line, if the base model is near chance on them.

    Raises:
      ConfigError: one of those examples is outside [0, 1] or (grid) off the grid.
    """
    indices = config.shard_indices(reader.num_examples)[:_PROBE_IMAGES]
    if not len(indices):
        return
    ids, images, labels = next(reader.read(indices).batch(len(indices)).as_numpy_iterator())
    _check_pixels(images, ids, config.spec.noise)
    counts = smooth.sample_counts(images, 1, config.spec.batch_size, seed=config.seed, image_ids=ids)
    right = int(counts[np.arange(len(ids)), labels].sum())
    if right <= probe_threshold(len(ids)):
        print(f"warning: the base model classifies {right} of {len(ids)} noisy copies of the first examples right "
              f"at sigma={config.spec.sigma:g} (chance: 1/{num_classes}): not trained with noise at this sigma?",
              file=sys.stderr)


def certify_dataset(config: CertifyConfig, *, verbose: int = 1) -> int:
    """Certifies (or predicts) the examples of a split and appends rows to the TSV.

    Examples idx = 0, skip, 2 skip, ... below `max` (-1: all), or this
    shard's share of them (see `CertifyConfig`), are processed in order,
    read by index in the dataset's test-time view (`data.open_reader`):
    only they are decoded, streaming, so no split has to fit in memory. Each
    row is written after its batch of images, flushed and synced,
    with the authors' columns; `time` is the batch's wall time divided by its
    images. An existing output of the same settings is resumed after its last
    complete row. The noise of example idx is keyed by (seed, idx), so a
    resumed run writes the same rows as an uninterrupted one, and a shard the
    same rows as an unsharded run. A staged run (`CertifyConfig.staged`)
    also writes each example's estimation samples. With `strategy="mirrored"` the samples of
    each image are split across the local devices
    (`smoothing.mirrored_sample_counts`):
    other noise, so other rows than the default strategy's, reproducible for a
    given seed and device count, which the settings record.

    Args:
      config: the validated run.
      verbose: 1 shows a progress bar with ETA, 0 is silent.

    Returns:
      The number of rows written by this call.

    Raises:
      ConfigError: an output of another run, missing data, a model that
        does not fit the dataset, or one of the first examples outside
        [0, 1] or (--noise=grid) off the 8-bit grid (all before any row is
        written); such an example further on (the rows before it stay).
    """
    strategy = distribute.get_strategy(config.strategy)
    settings = config.settings(strategy.num_replicas_in_sync)
    if os.path.exists(config.output):
        _read_existing_rows(config, settings)  # Refuses another run's output before any work.
    info = data.get_dataset_info(config.dataset)
    # Opened (checked and counted) before any work; read by index below, streaming.
    reader = data.open_reader(config.dataset, config.split, data_dir=config.data_dir, mock=config.mock_data)

    with strategy.scope():  # Mirrored variables: each replica reads its own copy.
        # The network computing in --compute_dtype, whatever policy it was trained under.
        if config.model:
            base_model = models.load_base_model(config.model, compute_dtype=config.spec.compute_dtype)
        else:  # Checked against the dataset as it loads.
            base_model = denoise.load_composition(config.classifier, config.denoiser, info.input_shape,
                                                  info.num_classes, compute_dtype=config.spec.compute_dtype)
    model_shape = smoothing.model_image_shape(base_model)
    if model_shape is not None and tuple(model_shape) != tuple(info.input_shape):
        raise ConfigError(f"{config.model} takes images of shape {model_shape}, but --dataset={config.dataset} "
                          f"has {info.input_shape}")
    outputs = smoothing.model_num_outputs(base_model)
    if outputs is not None and outputs != info.num_classes:
        raise ConfigError(f"{config.model} has {outputs} outputs, but --dataset={config.dataset} has "
                          f"{info.num_classes} classes")
    smooth = smoothing.Smooth(base_model, info.num_classes, config.spec.sigma,
                              strategy=strategy if config.strategy == "mirrored" else None, noise=config.spec.noise)
    if verbose:
        print(_NOISE_LINES[config.spec.noise])
        print(f"Sampling {config.model or config.model_name[0]} computing in {config.spec.compute_dtype} (--compute_dtype); the results hold "
              "for that function")
        if config.mode == "certify":
            print(f"largest radius this run can certify: {certify_log.format_radius(config.largest_radius(), True)} "
                  f"(sigma Phi^-1 of the lower bound when all n={config.spec.n} samples are in the top class; "
                  "a larger one needs a larger --n or --alpha, or another --sigma)")
    if config.strategy == "mirrored" and verbose:
        devices = strategy.extended.worker_devices
        print(f"--strategy=mirrored: each example's samples are split over {len(devices)} device(s), "
              f"{', '.join(devices)}" + (" (one device: no speed-up)" if len(devices) == 1 else ""))

    _probe_base_model(smooth, config, reader, info.num_classes)

    # The rows are counted under the lock: another process may have added
    # some since the check above.
    out, done = _claim_output(config, settings)
    indices = config.shard_indices(reader.num_examples)[done:]

    # Samples per image before its first decision; a staged batch then runs
    # on until its last image is settled.
    first = config.spec.stages[0] if config.staged else config.spec.n
    samples = (config.spec.n0 + first) if config.mode == "certify" else first
    per_call = max(1, _SAMPLES_PER_CALL_IN_BATCHES * config.spec.batch_size // samples)
    progress = keras.utils.Progbar(len(indices), verbose=verbose, unit_name="example")
    # Closing flushes what a failed write left buffered, which fails again (ENOSPC): that error must name the file too.
    with files.naming(config.output), out:
        for batch, images, labels in reader.read(indices).batch(per_call).as_numpy_iterator():
            began = time.time()
            _check_pixels(images, batch, config.spec.noise)
            predictions, radii, used = _certify_batch(smooth, config, images, batch)
            seconds = (time.time() - began) / len(batch)
            rows = "".join(certify_log.format_row(config.log_mode, int(i), int(y), int(p), r, seconds,
                                                  None if u is None else int(u))
                           for i, y, p, r, u in zip(batch, labels, predictions, radii, used))
            with files.naming(config.output):  # A full disk: one line naming --output; the rows before stay.
                out.write(rows.encode("utf-8"))
                out.flush()
                os.fsync(out.fileno())
            progress.add(len(batch))
    return len(indices)
