"""The Keras callbacks of the project.

* `EpochSchedule` tells `consistency_model.ConsistencyModel` the epoch (SmoothAdv's
  warm-up, MACER's deferred start);
* `StopOnDivergence` stops training at the first non-finite loss, before
  anything of the diverged epoch is saved;
* `EpochCheckpoint` saves a resumable checkpoint after every epoch;
* `ScalarLogger` writes every reported term to TensorBoard, per step and
  per epoch, continuing its curves when a run resumes;
* `Throughput` adds the training speed to the epoch logs;
* `CertifyCallback` runs CERTIFY (`Smooth.certify_batch`) on a fixed subset
  held out of the training split every few epochs and reports what the paper
  reports - the average certified radius (ACR) and certified accuracy at a
  few radii, from `tf_consreg.analysis` - plus the abstention rate, to
  TensorBoard and to the epoch logs (`val_acr`, ...), where ModelCheckpoint,
  EarlyStopping or keras-tuner can use them. `data.holdout_split` carves that
  subset out, so the test set is never looked at while choosing a model.
"""

import dataclasses
import glob
import math
import os
import shutil
import tempfile
import time
from typing import Dict, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_consreg import analysis
from tf_consreg import certify_spec
from tf_consreg import files
from tf_consreg import models
from tf_consreg import smoothing
from tf_consreg.certify_spec import CertifySpec
from tf_consreg.errors import ConfigError

# Radii of the logged certified accuracies: every other radius of the paper's
# tables (0, 0.5, ..., 2.5), enough to see the trade-off without clutter.
DEFAULT_RADII = analysis.DEFAULT_RADII[::2]
# TensorBoard runs under a training run's log directory: CertifyCallback
# writes to the validation run, ScalarLogger to both.
TRAIN_RUN = "train"
VALIDATION_RUN = "validation"


# Epoch-log keys CertifyCallback adds (see ValidationCertificate.metrics); it
# writes them to TensorBoard itself, as val/<key without "val_">.
_METRIC_NAMES = ("val_acr", "val_smoothed_accuracy", "val_abstain_rate")
_RADIUS_METRIC_PREFIX = "val_certified_accuracy_"


def is_certify_metric(name: str) -> bool:
    """Whether an epoch-log key is one CertifyCallback adds (so other loggers can skip it)."""
    return name in _METRIC_NAMES or name.startswith(_RADIUS_METRIC_PREFIX)


def radius_name(radius: float) -> str:
    """The suffix of a radius in metric names: 0.5 -> "r0.5", 1.0 -> "r1"."""
    return f"r{radius:g}"


class EpochSchedule(keras.callbacks.Callback):
    """Tells the wrapper the epoch, for SmoothAdv's warm-up and MACER's deferral."""

    def on_epoch_begin(self, epoch, logs=None):
        self.model.set_epoch(epoch)


class TrainingDivergedError(ConfigError):
    """Training produced a non-finite loss or non-finite weights.

    A `ConfigError`: the binaries report it as one line with exit status 2,
    since the cure is a setting (most often a smaller learning rate).
    """


class StopOnDivergence(keras.callbacks.Callback):
    """Raises `TrainingDivergedError` at the first non-finite loss, and before non-finite weights are saved.

    Keras's `TerminateOnNaN` only stops the loop: the epoch's callbacks then
    checkpoint the diverged model and the caller saves it as if the run had
    finished. Raising stops everything after it, so place it before the
    callbacks that certify or save.

    The loss it reads is the epoch's running mean that the step reports
    (`consistency_model.ConsistencyModel`'s tracker), which stays non-finite from the
    first non-finite step of the epoch on: the step named is that step (the
    last of its call with steps_per_execution > 1). Reading it adds no wait
    for the device: Keras converts the logs to Python floats at every batch
    end anyway (for the progress bar and the other callbacks). At each
    epoch's end it also checks the weights, which the last step's update may
    have made non-finite after its loss was computed. Under multi_worker
    every worker sees the same all-reduced loss and weights, so all of them
    stop at the same step.

    Args:
      advice: what to try instead, appended to the message.
    """

    def __init__(self, advice: str = ""):
        super().__init__()
        self._advice = advice
        self._epoch = 0

    def _base_model(self) -> keras.Model:
        return getattr(self.model, "base_model", self.model)

    def _fail(self, what: str) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        raise TrainingDivergedError(f"training diverged: {what} (optimizer step {step}); nothing of this epoch "
                                    "was saved" + (f"; {self._advice}" if self._advice else ""))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            steps = (self.params or {}).get("steps")
            self._fail(f"the loss is {loss} at step {batch + 1}{f'/{steps}' if steps else ''} of epoch "
                       f"{self._epoch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        if not all(np.isfinite(w).all() for w in self._base_model().get_weights()):
            self._fail(f"the weights are not finite after epoch {epoch + 1}")


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves model, optimizer and the finished epoch count after every epoch.

    `tf.train.CheckpointManager` writes the new checkpoint completely before it
    updates its index file, so a run killed at any moment resumes from the
    last complete epoch.

    Args:
      manager: writes the checkpoints.
      epoch_var: the checkpointed count of finished epochs.
      keep: False for a multi-worker non-chief, which must take part in
        every save (saving reads variables through collectives) but whose
        copy nobody reads: it is deleted at once.
    """

    def __init__(self, manager: tf.train.CheckpointManager, epoch_var: tf.Variable, keep: bool = True):
        super().__init__()
        self._manager = manager
        self._epoch = epoch_var
        self._keep = keep

    def on_epoch_end(self, epoch, logs=None):
        self._epoch.assign(epoch + 1)
        # "ckpt": the manager's default checkpoint_name, which training.py keeps.
        prefix = os.path.join(self._manager.directory, f"ckpt-{epoch + 1}")
        try:
            # A full disk or read-only mount: one OSError naming the checkpoint. The manager's index still
            # names the last complete checkpoint, which the same command resumes from.
            with files.naming_tf_write(prefix):
                self._manager.save(checkpoint_number=epoch + 1)
        except OSError:
            for path in glob.glob(glob.escape(prefix) + "[._]*"):  # This checkpoint's partial files: space back.
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
            raise
        if not self._keep:
            shutil.rmtree(self._manager.directory, ignore_errors=True)


class ScalarLogger(keras.callbacks.Callback):
    """Writes every reported term to TensorBoard: per step and per epoch.

    Steps are the optimizer's iteration count, and epochs the true epoch
    numbers, so curves continue where they stopped when a run resumes (Keras's
    own TensorBoard callback restarts its step counter at every `fit`).
    """

    def __init__(self, log_dir: str, update_freq: int):
        super().__init__()
        self._update_freq = max(1, update_freq)
        self._train = tf.summary.create_file_writer(os.path.join(log_dir, TRAIN_RUN))
        self._val = tf.summary.create_file_writer(os.path.join(log_dir, VALIDATION_RUN))

    def _learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_train_begin(self, logs=None):
        # Count steps on the host: reading the optimizer's counter every step
        # would wait for each step to finish before dispatching the next.
        self._step = int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._step

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the epoch's last finished step (several per call with
        # steps_per_execution > 1).
        previous, self._step = self._step, self._epoch_start + batch + 1
        if logs and self._step // self._update_freq > previous // self._update_freq:
            with self._train.as_default(step=self._step):
                for name, value in logs.items():
                    tf.summary.scalar(f"step/{name}", float(value))
                tf.summary.scalar("step/learning_rate", self._learning_rate())

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        step = epoch + 1
        with self._train.as_default(step=step):
            for name, value in logs.items():
                if not name.startswith("val_"):
                    tf.summary.scalar(f"epoch/{name}", float(value))
            tf.summary.scalar("epoch/learning_rate", self._learning_rate())
        with self._val.as_default(step=step):
            for name, value in logs.items():
                # CertifyCallback writes its own numbers; show each number once.
                if name.startswith("val_") and not is_certify_metric(name):
                    tf.summary.scalar(f"epoch/{name[4:]}", float(value))
        self._train.flush()
        self._val.flush()


class Throughput(keras.callbacks.Callback):
    """Adds the epoch's training speed, in clean images per second, to the logs.

    Timed from the end of the epoch's first step (which pays for tracing) to
    the end of its last, so validation is not counted.
    """

    def __init__(self, clean_images_per_step: int):
        super().__init__()
        self._per_step = clean_images_per_step
        self._start = self._end = None
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._end = None
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._start is None:
            self._start, self._first = now, batch
        self._end, self._steps = now, batch - self._first

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._steps:
            logs["images_per_second"] = self._steps * self._per_step / max(self._end - self._start, 1e-9)


@dataclasses.dataclass(frozen=True)
class ValidationCertificate:
    """One certification of the validation subset.

    Attributes:
      epoch: 1-based epoch after which it was computed (0: not during training).
      summary: ACR, smoothed accuracy and certified accuracies (analysis.summarize).
      abstain_rate: fraction of images where CERTIFY abstained.
      seconds: wall time of the certification.
      log: the per-image results, as a certification log.
    """

    epoch: int
    summary: analysis.Summary
    abstain_rate: float
    seconds: float
    log: analysis.CertifyLog

    def metrics(self) -> Dict[str, float]:
        """The numbers as epoch-log entries: `val_acr`, `val_certified_accuracy_r0.5`, ...

        `val_smoothed_accuracy` is the accuracy of the smoothed classifier g
        (abstentions count as wrong), what certification tables call its
        "clean accuracy": certified accuracy at radius 0.
        """
        values = dict(zip(_METRIC_NAMES, (self.summary.acr, self.summary.clean_accuracy, self.abstain_rate)))
        for radius, accuracy in self.summary.certified_accuracy.items():
            values[_RADIUS_METRIC_PREFIX + radius_name(radius)] = accuracy
        return values


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class CertifyCallback(keras.callbacks.Callback):
    """Certifies a held-out subset every `every` epochs and reports ACR and certified accuracy.

    After every `every`-th epoch and after the last one, it runs CERTIFY
    (Cohen et al., 2019; `Smooth.certify_batch`) with the current base
    classifier on `images` and:

    * adds `ValidationCertificate.metrics()` to the epoch logs (`val_acr`,
      `val_smoothed_accuracy`, `val_abstain_rate`,
      `val_certified_accuracy_r<radius>`), so callbacks that come after it in
      the list (ModelCheckpoint, EarlyStopping, a logger) and `History` see them;
    * writes them to TensorBoard as `val/acr`, `val/smoothed_accuracy`,
      `val/abstain_rate`, `val/certified_accuracy_r<radius>`, with its cost
      `val/certify_seconds` and the curve of certified accuracy against radius
      as the image `val/certified_accuracy_curve`, at step = epoch (1-based);
    * prints one line with the numbers and the seconds it took.

    The same `seed` is used at every evaluation: each image gets the same
    noise every time, so changes between epochs come from the model, not
    from the Monte Carlo draw.

    The base classifier is `model.base_model` when the trained model is a
    `consistency_model.ConsistencyModel` (or any wrapper with that attribute), else
    the trained model itself. It is certified computing in `compute_dtype`,
    whatever policy it trains under: a model training under mixed_bfloat16
    computes in bfloat16, so by default a float32 twin of it is certified,
    built once and given the current weights at every certification
    (`models.with_compute_dtype`), as bin/certify.py would certify the saved
    model.

    Args:
      images: the validation images, float32 in [0, 1] or uint8, [N, H, W, C].
      labels: their int labels, [N].
      spec: CERTIFY's settings: sigma (required), n0, n, alpha, batch_size,
        the dtype of the network certified (`compute_dtype`) and the noise
        (grid, CertifySpec's default, needs images on the 8-bit grid); no
        stages (full CERTIFY). `certify_spec.LIVE` holds training's
        defaults, float noise among them (it says why).
      num_classes: number of classes.
      every: certify after every this many epochs (and after the last), >= 1.
      log_dir: TensorBoard directory (a run's `logs/`); events go to its
        `validation/` run. None: no TensorBoard output.
      seed: seed of the certification noise.
      radii: radii of the logged certified accuracies.
      image_ids: ids that key each image's noise (e.g. its index in the
        dataset; default: 0..N-1), see `Smooth.certify_batch`.
      verbose: print one line per certification.

    Raises:
      ValueError: bad arguments (checked here, before training starts).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, spec: CertifySpec, num_classes: int, every: int = 1,
                 log_dir: Optional[str] = None, seed: int = 0, radii: Sequence[float] = DEFAULT_RADII,
                 image_ids: Optional[Sequence[int]] = None, verbose: bool = True):
        super().__init__()
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        labels = np.asarray(labels, dtype=np.int64)
        if images.ndim != 4 or len(images) < 1 or labels.shape != (len(images),):
            raise ValueError(f"need images [N >= 1, H, W, C] and labels [N], got shapes {images.shape} "
                             f"and {labels.shape}")
        radii = certify_spec.check_radii(radii, allow_zero=True)
        if not isinstance(spec, CertifySpec) or spec.sigma is None or spec.stages is not None:
            raise ValueError(f"spec must be a CertifySpec with sigma and no stages (full CERTIFY), got {spec!r}")
        self.images = images.astype(np.float32, copy=False)
        smoothing.check_pixels(self.images, grid=spec.noise == "grid")  # Before training, not at its first epoch.
        self.labels = labels
        self.image_ids = np.arange(len(images)) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
        if self.image_ids.shape != labels.shape:
            raise ValueError(f"image_ids must have shape {labels.shape}, got {self.image_ids.shape}")
        self.spec = spec
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.every = _check_positive_int("every", every)
        self.seed = int(seed)
        self.radii = radii
        self.log_dir = log_dir
        self.verbose = verbose
        self.last_result: Optional[ValidationCertificate] = None
        self._smooth: Optional[smoothing.Smooth] = None
        self._twin: Optional[tuple] = None  # (base model, its copy computing in compute_dtype)
        self._writer = None

    def _base_model(self) -> keras.Model:
        return getattr(self.model, "base_model", self.model)

    def certified_model(self, base_model: keras.Model) -> keras.Model:
        """`base_model` computing in `spec.compute_dtype`: itself if it does, else its twin with its current weights."""
        compute_dtype = self.spec.compute_dtype
        if models.model_compute_dtype(base_model) == compute_dtype:
            return base_model
        if self._twin is None or self._twin[0] is not base_model:
            self._twin = (base_model, models.with_compute_dtype(base_model, compute_dtype))
        else:
            self._twin[1].set_weights(base_model.get_weights())
        return self._twin[1]

    def evaluate(self, base_model: keras.Model, epoch: int = 0) -> ValidationCertificate:
        """Certifies the validation subset with `base_model`, computing in `compute_dtype`, and summarizes it.

        Args:
          base_model: maps images in [0, 1] to logits.
          epoch: 1-based epoch to record in the result (0: outside training).

        Returns:
          The `ValidationCertificate`; it is also kept as `last_result`.
        """
        # One Smooth per base model: its tf.function is traced once and reads
        # the current weights at every call.
        base_model = self.certified_model(base_model)
        if self._smooth is None or self._smooth.base_model is not base_model:
            self._smooth = smoothing.Smooth(base_model, self.num_classes, self.spec.sigma, noise=self.spec.noise)
        spec, start = self.spec, time.perf_counter()
        classes, radii = self._smooth.certify_batch(self.images, spec.n0, spec.n, spec.alpha, spec.batch_size,
                                                    seed=self.seed, image_ids=self.image_ids)
        seconds = time.perf_counter() - start
        log = analysis.CertifyLog(path=VALIDATION_RUN, idx=self.image_ids, label=self.labels, predict=classes,
                                  radius=radii, correct=classes == self.labels)
        self.last_result = ValidationCertificate(
            epoch=epoch, summary=analysis.summarize(log, self.radii),
            abstain_rate=float(np.mean(classes == smoothing.Smooth.ABSTAIN)), seconds=seconds, log=log)
        return self.last_result

    def _due(self, epoch: int) -> bool:
        done = epoch + 1
        return done % self.every == 0 or done == (self.params or {}).get("epochs")

    def on_epoch_end(self, epoch, logs=None):
        if not self._due(epoch):
            return
        result = self.evaluate(self._base_model(), epoch=epoch + 1)
        metrics = result.metrics()
        if logs is not None:
            logs.update(metrics)
        if self.verbose:
            radius = 0.5 if 0.5 in self.radii else self.radii[-1]
            print(f"Epoch {epoch + 1}: certified {len(self.images)} validation images (n={self.spec.n}) in "
                  f"{result.seconds:.1f} s: ACR {result.summary.acr:.3f}, smoothed accuracy "
                  f"{result.summary.clean_accuracy:.3f}, certified accuracy at r={radius:g} "
                  f"{result.summary.certified_accuracy[radius]:.3f}, abstained {result.abstain_rate:.3f}",
                  flush=True)
        if self.log_dir is not None:
            self._write_summaries(result, metrics, step=epoch + 1)

    def _write_summaries(self, result: ValidationCertificate, metrics: Dict[str, float], step: int) -> None:
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, VALIDATION_RUN))
        with self._writer.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar("val/" + name[len("val_"):], value)
            tf.summary.scalar("val/certify_seconds", result.seconds)
            png = _curve_png(result.log, title=f"epoch {step}, sigma={self.spec.sigma:g}, n={self.spec.n}")
            tf.summary.image("val/certified_accuracy_curve", tf.image.decode_png(png)[tf.newaxis], max_outputs=1)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _curve_png(log: analysis.CertifyLog, title: str) -> bytes:
    """The certified-accuracy curve of one log, as PNG bytes (analysis's plot)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "curve.png")
        analysis.plot_certified_accuracy([log], path, labels=["validation"], title=title)
        with open(path, "rb") as f:
            return f.read()
