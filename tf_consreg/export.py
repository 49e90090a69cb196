"""Export of the smoothed classifier as a SavedModel that TF Serving serves.

`export_smoothed` writes a SavedModel whose signatures run Cohen et al.'s
CERTIFY and PREDICT, and CERTIFY for a given radius with staged sampling, for
every image of a request, entirely in the graph: Monte Carlo sampling through
`tf_consreg.smoothing.sample_counts`, the decisions through the
certification engine `tf_consreg.engine` that `smoothing.Smooth` uses too
(core TensorFlow ops only, so TensorFlow's C++ loader, and hence TF
Serving, runs the export without Python; bounds and radii rounded toward
the safe side).

Layout of an export:

    <export_dir>/saved_model.pb, variables/, fingerprint.pb
    <export_dir>/assets.extra/tf_serving_warmup_requests   (TF Serving warm-up)
    <export_dir>/assets.extra/smoothing_metadata.json      (what `metadata` returns)

Signatures (all with method name `tensorflow/serving/predict`):

    serving_default  images float32 [batch, H, W, C] in [0, 1] (on the
                     8-bit grid for a grid export: see the input contract
                     below) -> class int64 [batch] (-1 = abstain), radius
                     float32 [batch] (certified L2 radius, 0 when
                     abstaining), p_lower float32
                     [batch] (one-sided (1 - alpha) Clopper-Pearson lower
                     bound of the selected class's probability). Fixed-n
                     CERTIFY: n0 selection and n estimation samples per image.
    certify_radius   images, radius float32 [batch] (one radius per image,
                     > 0) -> class int64 [batch] (-1 = abstain), certified bool
                     [batch] (g is constant within L2 distance `radius`),
                     radius float32 [batch] (the certified radius sigma
                     Phi^-1(lower bound) at the stage where the image stopped,
                     0 when abstaining), samples int64 [batch] (estimation
                     samples drawn, one of the stages). The top class comes
                     from n0 selection samples, as in serving_default; the
                     estimation samples are drawn in the stages n_1 < ... <
                     n_K = n, only for the images not settled yet, and the
                     graph's loop ends when every image of the request is
                     settled (see `stats.staged_certify`).
    predict          images -> class int64 [batch] (-1 = abstain), samples
                     int64 [batch]: PREDICT with the same stages, each image
                     stopping as soon as its binomial test rejects a tie
                     (`stats.staged_predict`), abstaining only at n. It
                     replaces the fixed-n PREDICT: it answers the same
                     question at the same alpha, usually with far fewer
                     samples, and an export with the one stage n
                     (`stages=(n,)`, bin/export.py --stages=<n>) is exactly
                     the fixed-n PREDICT.
    metadata         no input -> sigma, n0, n, n_max (= n), stages, levels
                     (the per-stage levels of the union bound), alpha,
                     num_classes, class_names, input_shape, batch_size,
                     max_batch, seed, version, compute_dtype, noise ("grid" or
                     "float"), input_contract (what the image signatures
                     take, `signatures.INPUT_CONTRACTS`), tv_slack (the
                     grid sampler's total-variation slack per sample of an
                     image, 0 for float noise) and predict_levels (the
                     predict signature's per-stage levels)

Noise modes (`CertifySpec.noise`; bin/export.py's default is grid, every
dataset we ship being 8-bit):

  grid   The exact grid sampler of the library (`noise.grid_noise`, through
         `smoothing.sample_counts`, Voráček & Hein 2023): integer noise from
         the exactly rounded Gaussian is added to the integer pixels, and the
         model sees float32(a + j) / 255, a function of a + j alone. The
         certificates are Cohen's for the base classifier composed with
         rounding to the grid, and they hold in floating point. The sampler's
         law is within `tv_slack` (d pixels times ~1e-12) of the exact one
         per sample, which the signatures account for as `smoothing.Smooth`
         does: every Clopper-Pearson bound widens by it (CERTIFY and each
         stage of certify_radius), and predict tests at alpha - n tv_slack
         (`smoothing.grid_predict_alpha`), split over the stages.
         Input contract: the same float32 images as float exports, each
         pixel exactly float32(k) / 255 for an integer k in [0, 255] (what
         `tf.cast(uint8, tf.float32) / 255` gives, as every data pipeline of
         the project does). Any other value is refused with InvalidArgument
         naming the first bad pixel (index and value), before any sampling:
         it is never rounded, since a certificate for the rounded image is
         not one for the image sent.
  float  Float32 Gaussian noise added to the image: for inputs that are not
         quantized. Its certificates assume exact arithmetic (float rounding
         of x + noise can leak x; see noise.py). Input contract: finite
         pixels in [0, 1], anything else refused naming the first bad pixel.

Bounded work and memory per request. Each image signature refuses a request
of more than `max_batch` images (default `DEFAULT_MAX_BATCH`), as TF
Serving's `max_batch_size` does: the check runs first, before the request's
pixels are read or any sample drawn, and its InvalidArgument error names the
batch size and the maximum. So one request costs at most max_batch * (n0 +
n) forward passes. Memory does not grow with the request: the samples are
evaluated in chunks of at most `batch_size` noisy copies
(`smoothing.sample_counts`), so the largest tensor of a request is one
chunk's (`batch_size` copies of an image, or the base model's activations of
them), whatever B and n; the request's own tensors are B images and B rows
of counts.

Each staged signature holds with probability >= 1 - alpha per image: stage k
runs its bounds (or test) at level levels[k], and the levels sum to alpha
(`stats.stage_levels`, as in the library; the union-bound argument is in
stats.py's docstring).

The base model computes in `compute_dtype` inside the export: float32 by
default, whatever policy it was trained under (a model trained under
mixed_bfloat16 is exported as its float32 network), or bfloat16 on request.
The certificates hold for that function, and `metadata` says which it is.

The inputs are declared with unknown shape on purpose: TF Serving and the
C++ loader feed tensors without checking them against the signature, so the
shape checks live in the graph, where they give a clear error on every path
(Python, C++, TF Serving) instead of a failure deep inside the model. The
expected shape is in the `metadata` signature. Each image has its own radius
(rather than one scalar per request) so that TF Serving's server-side
batching, which concatenates requests along the first dimension, still
works.

Noise: the image at position i of a request has the key (request seed, i),
and each kind of samples (selection, estimation, each stage) draws from that
key folded with its stream, exactly as `smoothing.Smooth` does with
`image_ids` = positions. By default every request draws a fresh, OS-seeded
request seed (see `_request_keys`), so no two requests, processes or server
restarts share noise. `seed=` fixes it for reproducible tests; the
signatures then draw the noise of `Smooth`'s methods with that seed.

A sample whose logits are not finite votes for no class (see
`smoothing.sample_counts`), so a model with NaN weights abstains everywhere.

`export_version` (bin/export.py) writes a TF Serving version
`<export_dir>/<version>/`, staged in a hidden directory
`<export_dir>/.<version>.incomplete-*` and renamed when complete. The
staging directory is locked (`flock`) while its export runs; an export
removes the staging directories that no process holds, the leftovers of
exports that were killed.
"""

import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from tf_consreg import __version__
from tf_consreg import certify_spec
from tf_consreg import data
from tf_consreg import denoise
from tf_consreg import engine
from tf_consreg import files
from tf_consreg import models
from tf_consreg import noise as noise_lib
from tf_consreg import run_config
from tf_consreg import smoothing
from tf_consreg import stats
from tf_consreg.certify_spec import CertifySpec
from tf_consreg.errors import ConfigError, check
from tf_consreg.signatures import CERTIFY_RADIUS_SIGNATURE, INPUT_KEY, METADATA_SIGNATURE, PREDICT_SIGNATURE
from tf_consreg.signatures import INPUT_CONTRACTS, RADIUS_KEY, SERVING_SIGNATURE

ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "smoothing_metadata.json"
# Most images per request. Work grows with the batch (n0 + n forward passes
# per image; at the default n = 10,000 one LeNet image takes 0.4-0.9 s of
# serving_default on 2 EPYC cores) but throughput does not once a request
# fills the forward batches (B * n0 >= batch_size: 10 images at the defaults),
# and memory does not at all (chunked sampling; docs/benchmarks.md, "Serving under load").
# 64 keeps a worst-case request near a minute at the defaults on that machine,
# and its input small beside one chunk's activations (64 CIFAR-10 images are
# 0.8 MB, 64 ImageNet 224x224x3 images 38 MB).
DEFAULT_MAX_BATCH = 64

def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_max_batch(max_batch) -> None:
    check(_is_int(max_batch) and max_batch >= 1, f"--max_batch must be an integer >= 1, got {max_batch!r}")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What the exported smoothed classifier computes, checked at construction.

    Attributes:
      spec: the sampling settings (sigma required). `n` is CERTIFY's
        estimation samples per image, and n_max of the staged signatures
        (certify_radius, predict); `batch_size` bounds the noisy copies per
        forward pass inside the graph; `stages` are the staged signatures'
        cumulative sample counts n_1 < ... < n_K = n (with more than one
        stage, n_1 >= n0), None for the default,
        `certify_spec.default_stages(n)` from max(n0, 100): resolved here.
      num_classes: number of classes of the base model.
      class_names: optional names, index = class.
      seed: None draws a fresh random seed on every request (for deployment);
        an int fixes the noise of every request (reproducible, for tests).
      max_batch: most images per request; each image signature refuses a
        larger request before any sampling (module docstring).

    The spec's `noise` picks the sampler (module docstring); grid noise
    needs sigma in (0, 16] (`certify_spec.GRID_MAX_SIGMA`, which the spec
    checks), and n samples' slack
    must leave PREDICT a level (`predict_levels`, checked by `build_archive`).
    """

    spec: CertifySpec
    num_classes: int
    class_names: Optional[Tuple[str, ...]] = None
    seed: Optional[int] = None
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self):
        check(isinstance(self.spec, CertifySpec), f"spec must be a CertifySpec, got {type(self.spec).__name__}")
        check(self.spec.sigma is not None, "--sigma is required: the noise level of the smoothed classifier")
        check(_is_int(self.num_classes) and self.num_classes >= 2,
              f"num_classes must be an integer >= 2, got {self.num_classes}")
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
            check(len(self.class_names) == self.num_classes,
                  f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
              f"--seed must be None or an integer in [0, 2^63), got {self.seed}")
        object.__setattr__(self, "spec", self.spec.resolved(selection=True))
        _check_max_batch(self.max_batch)

    @property
    def levels(self) -> Tuple[float, ...]:
        """The per-stage levels of certify_radius, the library's (`stats.stage_levels`)."""
        return stats.stage_levels(self.spec.alpha, len(self.spec.stages))

    @property
    def grid(self) -> Optional[noise_lib.GridNoise]:
        """The grid noise table of sigma in grid mode (`noise.grid_noise_table`, cached); None for float noise."""
        return noise_lib.grid_noise_table(self.spec.sigma) if self.spec.noise == "grid" else None

    def slack(self, input_shape: Sequence[int]) -> float:
        """The total-variation slack of one sample of an image of `input_shape`: 0 for float noise.

        In grid mode, `GridNoise.tv_slack(d)` of the image's d pixels, which the
        bounds of CERTIFY and certify_radius take, as `smoothing.Smooth` does.
        """
        grid = self.grid
        return 0.0 if grid is None else grid.tv_slack(math.prod(int(d) for d in input_shape))

    def predict_levels(self, input_shape: Sequence[int]) -> Tuple[float, ...]:
        """The per-stage levels of the predict signature, the library's.

        Float noise: `levels`. Grid noise: the stage levels of
        `smoothing.grid_predict_alpha(alpha, n, slack)`, the level
        `Smooth.predict_staged_batch` tests at (the slack of n samples is
        paid in the level, since a binomial test has no bound to widen).

        Raises:
          ConfigError: n samples' slack uses up alpha.
        """
        if self.grid is None:
            return self.levels
        try:
            alpha = smoothing.grid_predict_alpha(self.spec.alpha, self.spec.n, self.slack(input_shape))
        except ValueError as e:
            raise ConfigError(f"--n={self.spec.n}, --alpha={self.spec.alpha}: {e}") from None
        return stats.stage_levels(alpha, len(self.spec.stages))

    def metadata(self, input_shape: Sequence[int]) -> dict:
        """The JSON-able description that the `metadata` signature returns."""
        names = self.class_names or tuple(str(i) for i in range(self.num_classes))
        spec = self.spec
        return {
            "sigma": spec.sigma,
            "n0": spec.n0,
            "n": spec.n,
            # The staged signatures' most samples; the same number as n, named for them.
            "n_max": spec.n,
            "stages": list(spec.stages),
            "levels": [float(level) for level in self.levels],
            "alpha": spec.alpha,
            "num_classes": int(self.num_classes),
            "class_names": list(names),
            "input_shape": [int(d) for d in input_shape],
            "batch_size": spec.batch_size,
            "max_batch": int(self.max_batch),
            "seed": -1 if self.seed is None else int(self.seed),
            "version": __version__,
            "compute_dtype": spec.compute_dtype,
            "noise": spec.noise,
            "input_contract": INPUT_CONTRACTS[spec.noise],
            # What every lower bound on p_A gives up (and every upper bound adds) per sample: 0 for float noise.
            "tv_slack": self.slack(input_shape),
            "predict_levels": [float(level) for level in self.predict_levels(input_shape)],
        }


def _input_shape(base_model: keras.Model) -> Tuple[int, int, int]:
    shape = tuple(base_model.inputs[0].shape[1:]) if base_model.inputs else ()
    if len(shape) != 3 or any(d is None for d in shape):
        raise ConfigError(f"the base model's input shape must be [batch, H, W, C] with known H, W, C; "
                          f"got {tuple(base_model.inputs[0].shape) if base_model.inputs else 'no inputs'}")
    return tuple(int(d) for d in shape)


def _first_bad_pixel(bad: tf.Tensor, images: tf.Tensor) -> List[tf.Tensor]:
    """The index and value of the first True of `bad` in `images` (empty when there is none), for a message."""
    first = tf.where(bad)[:1]
    return [first, tf.gather_nd(images, first)]


def _validated(images: tf.Tensor, input_shape: Tuple[int, int, int], grid: bool) -> tf.Tensor:
    """Checks a request in the graph; returns images with a static shape.

    The checks run in order (shape, finiteness, range, and in grid mode the
    8-bit grid, `noise.to_grid`'s check) so each failure gets the message
    that explains it; the range and grid messages name the first bad pixel
    (index and value). Everything the signature computes depends on the
    returned tensor, so a refused request draws no sample.
    """
    h, w, c = input_shape
    expected = tf.constant([h, w, c], tf.int32)
    shape = tf.shape(images)
    shape_ok = tf.cond(
        tf.equal(tf.size(shape), 4),
        lambda: tf.reduce_all(tf.equal(shape[1:], expected)),
        lambda: tf.constant(False),
    )
    check_shape = tf.debugging.Assert(
        shape_ok,
        [f"images must be float32 [batch, {h}, {w}, {c}] (batch, height, width, channels); got shape", shape],
        summarize=16,
    )
    with tf.control_dependencies([check_shape]):
        images = tf.debugging.assert_all_finite(
            images, "images must be finite: the request holds NaN or Inf pixels")
    outside = tf.logical_or(images < 0.0, images > 1.0)
    check_range = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(outside)),
        ["images must be in [0, 1] (scale pixel intensities to [0, 1]); first pixel outside (index, value):",
         *_first_bad_pixel(outside, images)],
        summarize=8,
    )
    with tf.control_dependencies([check_range]):
        images = tf.ensure_shape(images, [None, h, w, c])
    if grid:
        with tf.control_dependencies([noise_lib.to_grid(images)]):  # In a graph: its assertion.
            images = tf.identity(images)
    return images


def _within_max_batch(images: tf.Tensor, max_batch: int) -> tf.Tensor:
    """Refuses, in the graph, a request of more than `max_batch` images; returns `images`.

    It reads only the shape, so an oversized request is refused before its
    pixels are checked or any sample drawn. (A rank-0 input counts as 0
    images here and is refused by the shape check that follows.)
    """
    shape = tf.shape(images)
    num_images = tf.reduce_max(tf.concat([shape[:1], [0]], axis=0))
    refuse = tf.debugging.Assert(
        num_images <= max_batch,
        [f"images must be at most max_batch = {max_batch} per request (split a larger request); got a batch of",
         num_images],
    )
    with tf.control_dependencies([refuse]):
        return tf.identity(images)


def _refusing_over_max_batch(endpoint: Callable[..., dict], max_batch: int) -> Callable[..., dict]:
    """`endpoint` (images first) with `_within_max_batch` run on its images before anything else."""

    @functools.wraps(endpoint)
    def limited(images, *inputs):
        return endpoint(_within_max_batch(images, max_batch), *inputs)

    return limited


def _validated_radius(radius: tf.Tensor, num_images: tf.Tensor) -> tf.Tensor:
    """Checks the radius input of certify_radius in the graph: float32 [batch], finite, > 0.

    Returns:
      float64 [batch] radii (the float32 values, exactly).
    """
    shape = tf.shape(radius)
    shape_ok = tf.logical_and(tf.equal(tf.size(shape), 1), tf.reduce_all(tf.equal(shape, num_images)))
    check_shape = tf.debugging.Assert(
        shape_ok,
        ["radius must be float32 [batch], one radius per image; got shape", shape, "for a batch of", num_images,
         "images"],
        summarize=16,
    )
    with tf.control_dependencies([check_shape]):
        radius = tf.identity(radius)
    # TensorFlow's CPU kernels flush subnormal floats to 0 (in comparisons and
    # in printing alike), so a subnormal radius is told apart by its bits.
    bits = tf.bitcast(radius, tf.int32)
    subnormal = tf.logical_and(tf.equal(tf.bitwise.bitwise_and(bits, 0x7F800000), 0),
                               tf.not_equal(tf.bitwise.bitwise_and(bits, 0x007FFFFF), 0))
    check_subnormal = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(subnormal)),
        ["radius must be >= 1.17549435e-38, the smallest normal float32 (smaller ones are flushed to 0); got a "
         "subnormal radius at positions", tf.where(subnormal)[:, 0]],
        summarize=8,
    )
    with tf.control_dependencies([check_subnormal]):
        valid = tf.logical_and(tf.math.is_finite(radius), radius > 0.0)
    check_values = tf.debugging.Assert(
        tf.reduce_all(valid),
        ["radius must be finite and > 0 (an L2 distance in [0, 1] pixel units); got", radius],
        summarize=8,
    )
    with tf.control_dependencies([check_values]):
        radius = tf.identity(radius)
    return tf.cast(tf.ensure_shape(radius, [None]), tf.float64)


def _request_keys(seed: Optional[int], num_images: tf.Tensor) -> tf.Tensor:
    """The noise keys of a request's images, int64 [B, 2]: (request seed, position).

    `smoothing.Smooth` keys image i as (seed, image id); with `image_ids` =
    positions and the same seed, the signatures draw its noise.

    With `seed=None` the request seed comes from a stateful op with seed =
    seed2 = 0, which TensorFlow seeds from the OS when the kernel is created:
    every request, every server process and every restart draws new noise,
    and a client cannot learn the noise of a future request. (A
    `tf.random.Generator` would restart from the state saved in the
    checkpoint on every load and replay the same noise after each restart.)
    """
    if seed is None:
        request_seed = tf.raw_ops.RandomUniformInt(
            shape=tf.constant([], tf.int32),
            minval=tf.constant(0, tf.int64),
            maxval=tf.constant(np.iinfo(np.int64).max, tf.int64),
            seed=0,
            seed2=0,
        )
    else:
        request_seed = tf.constant(seed, tf.int64)
    positions = tf.range(tf.cast(num_images, tf.int64))
    return tf.stack([tf.fill(tf.shape(positions), request_seed), positions], axis=1)


def _metadata_tensor(value) -> tf.Tensor:
    """float (or list of float) -> float64, int (or list of int) -> int64, str (or list of str) -> string."""
    if isinstance(value, float) or (isinstance(value, list) and value and all(isinstance(v, float) for v in value)):
        return tf.constant(value, tf.float64)
    if isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
        return tf.constant(value, tf.int64)
    return tf.constant(value, tf.string)


def _write_warmup(path: str, input_shape: Tuple[int, int, int], radius: float) -> None:
    """Writes TF Serving's warm-up file: one request per image signature.

    The request is a single mid-grey image, every pixel 128 / 255 (on the
    8-bit grid, so a grid export takes it too), with `radius` for
    certify_radius; it runs each signature's whole graph like a real request.
    """
    from tensorflow_serving.apis import model_pb2  # pylint: disable=import-outside-toplevel
    from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel
    from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=import-outside-toplevel

    inputs = {INPUT_KEY: np.full((1, *input_shape), np.float32(128) / np.float32(255), np.float32)}
    with tf.io.TFRecordWriter(path) as writer:
        for signature in (SERVING_SIGNATURE, CERTIFY_RADIUS_SIGNATURE, PREDICT_SIGNATURE):
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature))
            request.inputs[INPUT_KEY].CopyFrom(tf.make_tensor_proto(inputs[INPUT_KEY]))
            if signature == CERTIFY_RADIUS_SIGNATURE:
                request.inputs[RADIUS_KEY].CopyFrom(tf.make_tensor_proto(np.array([radius], np.float32)))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def build_archive(base_model: keras.Model,
                  config: ExportConfig) -> Tuple[keras.export.ExportArchive, Dict[str, Callable[..., dict]]]:
    """Builds the export archive (signatures traced, nothing written).

    Args:
      base_model: classifier mapping float32 [N, H, W, C] images in [0, 1] to
        logits [N, num_classes]; it computes in `config.spec.compute_dtype` in the
        archive (a copy of it when it computes in another dtype).
      config: what to compute.

    Returns:
      (archive, endpoints): the `keras.export.ExportArchive` holding the four
      endpoints, and the endpoint functions by signature name, callable in
      memory (`endpoints["serving_default"](images)`) exactly as exported.

    Raises:
      ConfigError: the model's input shape is not [batch, H, W, C], its
        output size is not `config.num_classes`, or (grid noise) n samples'
        slack over its pixels leaves PREDICT no level.
    """
    input_shape = _input_shape(base_model)
    base_model = models.with_compute_dtype(base_model, config.spec.compute_dtype)
    outputs = base_model.outputs[0].shape[-1] if base_model.outputs else None
    if outputs != config.num_classes:
        raise ConfigError(f"the base model has {outputs} outputs but num_classes={config.num_classes}")
    metadata = config.metadata(input_shape)
    image_spec = tf.TensorSpec(shape=None, dtype=tf.float32, name=INPUT_KEY)
    radius_spec = tf.TensorSpec(shape=None, dtype=tf.float32, name=RADIUS_KEY)
    abstain = tf.constant(stats.ABSTAIN, tf.int64)
    num_stages = len(config.spec.stages)
    # Cumulative counts with n_0 = 0 in front, each stage's noise stream and
    # level: stage k draws stages[k + 1] - stages[k] new samples per image.
    stages = tf.constant((0, *config.spec.stages), tf.int32)
    levels = engine.stage_levels(config.spec.alpha, num_stages)
    # Grid noise: the sampler's total-variation slack widens every bound (0 for float noise, bounds as they
    # are), and PREDICT's test runs at alpha less n samples' slack, as `smoothing.Smooth` decides.
    grid = config.grid
    slack = tf.constant(config.slack(input_shape), tf.float64)
    predict_levels = tf.constant(config.predict_levels(input_shape), tf.float64)

    def streams(kind):
        return tf.constant([smoothing.staged_stream(kind, k) for k in range(num_stages)], tf.int64)

    def counts(images, num_samples, keys, stream):
        return smoothing.sample_counts(
            base_model, images, num_samples, sigma=config.spec.sigma, num_classes=config.num_classes,
            batch_size=config.spec.batch_size, seed=smoothing.stream_seeds(keys, stream), grid=grid)

    def staged(images, keys, stream, state, update):
        """Runs the stages while any image is active; `update` folds a stage's new counts into `state`.

        update(k, n_k, active, running, state, new) -> (state, still_active):
        `running` holds the indices of the active images, in order, and `new`
        their counts [A, C] of the stage's new samples, drawn from their
        keys' stream of stage k; n_k is the stage's cumulative count.
        """
        stage_streams = streams(stream)

        def body(k, active, state):
            running = tf.where(active)[:, 0]
            new = counts(tf.gather(images, running), stages[k + 1] - stages[k], tf.gather(keys, running),
                         stage_streams[k])
            state, still_active = update(k, stages[k + 1], active, running, state, new)
            # The last stage settles everything: stats.staged_certify stops there too.
            return k + 1, tf.logical_and(still_active, k + 1 < num_stages), state

        _, _, state = tf.while_loop(
            lambda k, active, state: tf.logical_and(k < num_stages, tf.reduce_any(active)),
            body,
            (tf.constant(0), tf.ones([tf.shape(images)[0]], tf.bool), state),
        )
        return state

    def certify(images):
        images = _validated(images, input_shape, grid=grid is not None)
        keys = _request_keys(config.seed, tf.shape(images)[0])
        spec = config.spec
        classes, radius, p_lower = engine.certify_from_counts(
            counts(images, spec.n0, keys, smoothing.SELECTION), counts(images, spec.n, keys, smoothing.ESTIMATION),
            spec.n, spec.alpha, spec.sigma, slack)
        return {
            "class": classes,
            # Rounded down to float32 like everything a certificate rests on.
            "radius": engine.to_float32_down(radius),
            "p_lower": engine.to_float32_down(p_lower),
        }

    def certify_at_radius(images, radius):
        images = _validated(images, input_shape, grid=grid is not None)
        num_images = tf.shape(images)[0]
        asked = _validated_radius(radius, num_images)
        keys = _request_keys(config.seed, num_images)
        guess = tf.argmax(counts(images, config.spec.n0, keys, smoothing.SELECTION), axis=-1)

        def update(k, n_k, active, running, state, new):
            successes, p_lower, samples = state
            won = tf.gather(new, tf.gather(guess, running), axis=1, batch_dims=1)
            successes = tf.tensor_scatter_nd_add(successes, running[:, tf.newaxis], won)
            # Bounds of every image (cheap beside the sampling); kept for the active ones.
            lower, done = engine.certify_stage(successes, n_k, levels[k], config.spec.sigma, asked[:, tf.newaxis],
                                               slack)
            p_lower = tf.where(active, lower, p_lower)
            samples = tf.where(active, tf.cast(n_k, tf.int64), samples)
            still_active = tf.logical_and(active, tf.logical_not(done))
            return (successes, p_lower, samples), still_active

        zeros = tf.zeros([num_images], tf.int64)
        _, p_lower, samples = staged(images, keys, smoothing.ESTIMATION,
                                     (zeros, tf.zeros([num_images], tf.float64), zeros), update)
        classes, certified_at = engine.certify_decision(guess, p_lower, config.spec.sigma)
        return {
            "class": classes,
            # As stats.staged_certify: certified at r iff the radius is >= r.
            "certified": certified_at >= asked,
            "radius": engine.to_float32_down(certified_at),
            "samples": samples,
        }

    def predict(images):
        images = _validated(images, input_shape, grid=grid is not None)
        num_images = tf.shape(images)[0]
        keys = _request_keys(config.seed, num_images)

        def update(k, n_k, active, running, state, new):
            del n_k
            totals, classes, samples = state
            totals = tf.tensor_scatter_nd_add(totals, running[:, tf.newaxis], new)
            stage_classes = engine.predict_from_counts(totals, predict_levels[k])
            rejects = tf.logical_and(active, tf.not_equal(stage_classes, abstain))
            classes = tf.where(rejects, stage_classes, classes)
            samples = tf.where(active, tf.cast(stages[k + 1], tf.int64), samples)
            return (totals, classes, samples), tf.logical_and(active, tf.logical_not(rejects))

        state = (tf.zeros([num_images, config.num_classes], tf.int64), tf.fill([num_images], abstain),
                 tf.zeros([num_images], tf.int64))
        _, classes, samples = staged(images, keys, smoothing.PREDICTION, state, update)
        return {"class": classes, "samples": samples}

    def describe():
        return {key: _metadata_tensor(value) for key, value in metadata.items()}

    archive = keras.export.ExportArchive()
    archive.track(base_model)
    # serving_default first: ExportArchive would alias the first endpoint anyway.
    max_batch = config.max_batch
    endpoints = {
        SERVING_SIGNATURE: archive.add_endpoint(SERVING_SIGNATURE, _refusing_over_max_batch(certify, max_batch),
                                                input_signature=[image_spec]),
        CERTIFY_RADIUS_SIGNATURE: archive.add_endpoint(CERTIFY_RADIUS_SIGNATURE,
                                                       _refusing_over_max_batch(certify_at_radius, max_batch),
                                                       input_signature=[image_spec, radius_spec]),
        PREDICT_SIGNATURE: archive.add_endpoint(PREDICT_SIGNATURE, _refusing_over_max_batch(predict, max_batch),
                                                input_signature=[image_spec]),
        METADATA_SIGNATURE: archive.add_endpoint(METADATA_SIGNATURE, describe, input_signature=[]),
    }
    return archive, endpoints


def export_smoothed(
    base_model: keras.Model,
    export_dir: str,
    spec: CertifySpec,
    *,
    num_classes: int,
    class_names: Optional[Sequence[str]] = None,
    seed: Optional[int] = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> str:
    """Exports the smoothed classifier of `base_model` as one SavedModel.

    See the module docstring for the signatures and the layout.

    The SavedModel is staged in a hidden directory beside `export_dir`,
    locked while the export runs, and renamed into place when complete: a
    failed export leaves nothing behind, and the staging directory of a
    killed one is removed by the next export into the same parent directory
    (`remove_stale_staging`).

    Args:
      base_model: classifier mapping float32 [N, H, W, C] images in [0, 1] to
        logits [N, num_classes] (it normalizes inside).
      export_dir: directory for the SavedModel; must not exist or be empty.
      spec: the sampling settings, sigma required: n0 selection samples per
        image for CERTIFY, n estimation samples for CERTIFY and samples for
        PREDICT, alpha (the certificate's failure probability, PREDICT's
        test level), batch_size (most noisy copies per forward pass in the
        graph), stages (the cumulative sample counts of certify_radius and
        predict, see `ExportConfig`; None for the default) and
        compute_dtype (the dtype the base model computes in, float32
        whatever it was trained in, or bfloat16; recorded in the metadata).
        `certify_spec.EXPORT` holds bin/export.py's defaults.
      num_classes: number of classes.
      class_names: optional class names recorded in the metadata.
      seed: None (default) for fresh noise on every request; an int for
        reproducible requests (testing only: fixed noise is known to anyone
        who can read the SavedModel).
      max_batch: most images per request (recorded in the metadata); the
        image signatures refuse a larger request before any sampling.

    Returns:
      `export_dir`.

    Raises:
      ConfigError: a bad argument, a model that does not fit, or a non-empty
        `export_dir`.
      OSError: the SavedModel could not be written (a full disk, a read-only
        mount), naming `export_dir`; nothing is left behind.
    """
    config = ExportConfig(spec, num_classes=num_classes, class_names=class_names, seed=seed, max_batch=max_batch)
    if os.path.exists(export_dir) and (not os.path.isdir(export_dir) or os.listdir(export_dir)):
        raise ConfigError(f"--export_dir: {export_dir} exists and is not an empty directory; "
                          "choose a new directory (exports are never overwritten)")
    archive, _ = build_archive(base_model, config)
    target = os.path.abspath(export_dir)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Written beside its place and renamed when complete, so no reader (e.g. TF
    # Serving polling the parent for versions) sees a partial export. The
    # hidden name is not an integer, which TF Serving ignores.
    remove_stale_staging(os.path.dirname(target))
    staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}{_STAGING_INFIX}")
    lock = _lock_staging(staging)
    try:
        saved_model = os.path.join(staging, "saved_model")
        # A full disk or read-only mount fails here as one OSError naming export_dir; the staging goes below.
        with files.naming_tf_write(export_dir):
            archive.write_out(saved_model, verbose=False)
            extra = os.path.join(saved_model, ASSETS_EXTRA)
            os.makedirs(extra, exist_ok=True)
            _write_warmup(os.path.join(extra, WARMUP_FILE), _input_shape(base_model), radius=config.spec.sigma)
            with open(os.path.join(extra, METADATA_FILE), "w", encoding="utf-8") as f:
                json.dump(config.metadata(_input_shape(base_model)), f, indent=2, sort_keys=True)
                f.write("\n")
        # rename(2) replaces a missing or empty directory and fails on a non-empty one.
        try:
            os.rename(saved_model, target)
        except OSError as e:
            raise ConfigError(f"--export_dir: {export_dir} was filled during the export; it was left untouched "
                              f"({e.strerror})") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(lock)
    return export_dir


_STAGING_INFIX = ".incomplete-"
# tempfile.mkdtemp's names: the prefix, then 8 random letters, digits or "_".
_STAGING_NAME = re.compile(r"^\..+" + re.escape(_STAGING_INFIX) + r"[A-Za-z0-9_]{8}$")
# A staging directory is locked just after it is made; one modified this
# recently may be that young, so only older ones count as stale.
_STALE_AFTER_SECONDS = 60.0


def _lock_staging(path: str) -> int:
    """Locks a staging directory (flock, released when the process ends, even by SIGKILL); returns the fd.

    On a file system without locks the directory stays unlocked, and
    `remove_stale_staging`, which cannot lock it either, leaves it alone.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass
    return fd


def remove_stale_staging(parent: str) -> List[str]:
    """Removes the staging directories that killed exports left in `parent`.

    An export stages its SavedModel in `<parent>/.<name>.incomplete-XXXXXXXX`
    and holds a lock (flock) on it until it finishes; a killed export's lock
    is released by the kernel, so a staging directory that no process holds
    and that was last modified more than a minute ago is a leftover. The
    others (a running export's, or any on a file system without locks) are
    left alone; remove those by hand (`rm -r <parent>/.*.incomplete-*`) once
    no export runs.

    Args:
      parent: the directory holding the exports (TF Serving's base path).

    Returns:
      The directories removed.
    """
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not _STAGING_NAME.match(name) or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            if time.time() - os.stat(path).st_mtime < _STALE_AFTER_SECONDS:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # Held by a running export: raises.
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def read_metadata(export_dir: str) -> dict:
    """Reads `assets.extra/smoothing_metadata.json` of an export (no TensorFlow needed)."""
    path = os.path.join(export_dir, ASSETS_EXTRA, METADATA_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: is {export_dir} written by export_smoothed?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class VersionExportConfig:
    """One TF Serving model version to export (bin/export.py), checked at construction.

    Give either `model_dir` (a training run: `base_model.keras` plus
    `train_config.json`, which supplies sigma, the class names and the input
    shape) or `model` (a `.keras` file, with `sigma`). Every check, including
    that the version directory does not exist yet, runs here, before anything
    is loaded or written.

    Attributes:
      export_dir: TF Serving's model base path; the export goes to
        `<export_dir>/<version>/`.
      model_dir: a `--model_dir` written by bin/train.py.
      model: a `.keras` base model file (instead of `model_dir`).
      classifier, denoiser: instead of both: export f∘D, the classifier's
        .keras file behind the denoiser's (`denoise.load_composition`), with `sigma`.
      spec: the sampling settings, as for `export_smoothed` (default:
        `certify_spec.EXPORT`); sigma defaults to the training run's, and
        stages to `certify_spec.default_stages(n)` from max(n0, 100) (both
        filled in here).
      version: the TF Serving version number; default `int(time.time())`.
      check_images: after exporting, certify this many test images of the
        run's dataset through the reloaded SavedModel (needs `model_dir`),
        in requests of at most `max_batch` images.
      max_batch: most images per request, as `ExportConfig.max_batch`.
      dataset, data_dir: filled from the training run (None with `model`).
    """

    export_dir: str
    model_dir: Optional[str] = None
    model: Optional[str] = None
    spec: CertifySpec = certify_spec.EXPORT
    version: Optional[int] = None
    check_images: int = 0
    max_batch: int = DEFAULT_MAX_BATCH
    classifier: Optional[str] = None
    denoiser: Optional[str] = None
    dataset: Optional[str] = dataclasses.field(default=None, init=False)
    data_dir: Optional[str] = dataclasses.field(default=None, init=False)

    def __post_init__(self):
        check(bool(self.export_dir), "--export_dir is required: TF Serving's base path for the model versions")
        denoised = denoise.check_files(self.classifier, self.denoiser, self.model_dir, self.model)
        check(denoised or bool(self.model_dir) != bool(self.model), "give exactly one of --model_dir (a training "
              "run) or --model (a .keras file)")
        if self.model_dir:
            check(os.path.isdir(self.model_dir),
                  f"--model_dir={self.model_dir} is not a directory; pass a run directory of bin/train.py")
            model_file = os.path.join(self.model_dir, models.BASE_MODEL_FILE)
            check(os.path.isfile(model_file), f"--model_dir={self.model_dir} holds no {models.BASE_MODEL_FILE}; "
                  "is the training run finished?")
            train_config = run_config.read_train_config(self.model_dir)
            object.__setattr__(self, "dataset", train_config.dataset)
            object.__setattr__(self, "data_dir", train_config.data_dir)
            if self.spec.sigma is None:
                object.__setattr__(self, "spec", dataclasses.replace(self.spec, sigma=train_config.sigma))
        else:
            check(denoised or (os.path.isfile(self.model) and self.model.endswith(".keras")),
                  f"--model={self.model} is not a .keras file")
            check(self.spec.sigma is not None, f"--sigma is required with "
                  f"{'--classifier with --denoiser' if denoised else '--model'} (there is no training config to read)")
        object.__setattr__(self, "spec", self.spec.resolved(selection=True))
        check(_is_int(self.check_images) and self.check_images >= 0,
              f"--check_images must be an integer >= 0, got {self.check_images}")
        check(not self.check_images or self.model_dir,
              "--check_images needs --model_dir: the test images come from the training run's dataset")
        _check_max_batch(self.max_batch)
        if self.version is None:
            object.__setattr__(self, "version", int(time.time()))
        check(_is_int(self.version) and self.version >= 1,
              f"--version must be a positive integer (TF Serving's version number), got {self.version}")
        check(not os.path.exists(self.version_dir),
              f"--export_dir: {self.version_dir} exists; exports are never overwritten, choose another --version")
        check(not os.path.exists(self.export_dir) or os.path.isdir(self.export_dir),
              f"--export_dir={self.export_dir} is not a directory")
        # Before the model is loaded and the graph traced: a read-only --export_dir (or a link to one) stops here.
        files.check_writable(self.export_dir, "export_dir")

    @property
    def version_dir(self) -> str:
        return os.path.join(self.export_dir, str(self.version))


class ExportedVersion(NamedTuple):
    """What `export_version` did.

    Attributes:
      path: the version directory.
      check: None, or the answers of the reloaded `serving_default` for
        `check_images` test images: int64 `label`, `class`, and float32
        `radius`, `p_lower`, each [check_images].
      removed: the staging directories of killed exports that were removed
        from `export_dir` (`remove_stale_staging`), so that the binary can say so.
    """

    path: str
    check: Optional[Dict[str, np.ndarray]]
    removed: Tuple[str, ...] = ()


def export_version(config: VersionExportConfig) -> ExportedVersion:
    """Exports a TF Serving version `<export_dir>/<version>/` of the smoothed classifier.

    Like every `export_smoothed` call, the version is staged in a hidden
    directory and renamed into place when complete, so TF Serving (which
    polls `export_dir`) never sees a partial version. With `check_images`,
    the version is then loaded back from disk, as a server would, and answers
    one request of that many test images.

    Args:
      config: the validated export.

    Returns:
      The version directory and the check's answers.

    Raises:
      ConfigError: the model does not fit the training run's dataset, or the
        version directory appeared meanwhile.
    """
    if config.classifier:  # f∘D (VersionExportConfig checked the pair).
        base_model = denoise.load_composition(config.classifier, config.denoiser)
    else:
        base_model = models.load_base_model(config.model_dir or config.model)
    input_shape = _input_shape(base_model)
    num_classes = base_model.outputs[0].shape[-1]
    class_names = None
    if config.dataset is not None:
        info = data.get_dataset_info(config.dataset)
        check(tuple(info.input_shape) == input_shape and info.num_classes == num_classes,
              f"--model_dir={config.model_dir}: the model takes {input_shape} and gives {num_classes} classes, "
              f"but dataset {config.dataset} has {tuple(info.input_shape)} images and {info.num_classes} classes")
        class_names = info.class_names
    if config.check_images:  # Read before writing anything: missing data files stop here.
        reader = data.open_reader(config.dataset, "test", data_dir=config.data_dir)
        check(config.check_images <= reader.num_examples, f"--check_images={config.check_images} is more than the "
              f"{reader.num_examples} images of {config.dataset}'s test split")
        images, labels = reader.arrays(range(config.check_images))
    # export_smoothed removes them too; removed here first to report them.
    removed = tuple(remove_stale_staging(config.export_dir))
    path = export_smoothed(base_model, config.version_dir, config.spec, num_classes=num_classes,
                           class_names=class_names, max_batch=config.max_batch)
    if not config.check_images:
        return ExportedVersion(path, None, removed)
    certify = tf.saved_model.load(path).signatures[SERVING_SIGNATURE]
    # As a client must: the export refuses requests of more than max_batch images.
    answers = [certify(images=tf.constant(images[i:i + config.max_batch]))
               for i in range(0, len(images), config.max_batch)]
    return ExportedVersion(path, {"label": labels, **{k: np.concatenate([a[k].numpy() for a in answers])
                                                      for k in answers[0]}}, removed)
