r"""Noise sampling throughput: the float sampler against the exact grid sampler, in samples per second.

Times, inside one `tf.function` each, the noisy model inputs of one
certification batch of LeNet-sized images (--pixels values per sample,
--batch samples per call):
- float: `noise.standard_normal` scaled by sigma and added in float32 to the
  image, as `smoothing.sample_counts` does;
- grid: `noise.grid_noise` from the exact table of sigma, then
  `noise.grid_inputs` (integer add, one conversion);
and the samplers alone (without the add), and LeNet's forward pass on the
same batch, to estimate what each sampler costs whole certification: the
ratio (float inputs + forward) / (grid inputs + forward). Each figure is the best of
--repeats timed rounds of --calls calls, each call with a fresh seed, after
one warm-up call that traces; the rounds of the different steps are
interleaved. The script prints the machine line and how
many cores other processes used meanwhile.

Example:

  python bench/noise_bench.py
  python bench/noise_bench.py --sigma=1.0 --batch=4000
"""

import time
from typing import Callable, Dict, Tuple

from absl import app
from absl import flags

import tf_consreg  # pylint: disable=unused-import  Sets TensorFlow's environment (oneDNN) first.
import tensorflow as tf

from tf_consreg import models
from tf_consreg import noise

import measure
from measure import OtherLoad

_FORWARD = flags.DEFINE_bool("forward", True, "Also time LeNet's forward pass (28 x 28 x 1 inputs only).")
_SIGMA = flags.DEFINE_float("sigma", 0.25, "Noise standard deviation (pixel units).")
_PIXELS = flags.DEFINE_integer("pixels", 784, "Values per sample (784: 28 x 28 x 1).")
_BATCH = flags.DEFINE_integer("batch", 1000, "Samples per call.")
_CALLS = flags.DEFINE_integer("calls", 20, "Calls per timed round.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds; the best is reported.")


def best_seconds(steps: Dict[str, Callable], calls: int, repeats: int) -> Dict[str, Tuple[float, float]]:
    """Best-of-`repeats` seconds per call of each step, and the other processes' load (cores) in its best round.

    The rounds of the steps are interleaved, so that a change in the
    machine's load hits every step alike.
    """
    for step in steps.values():
        step(tf.constant([0, 0], tf.int64)).numpy()  # traces
    best = {name: (float("inf"), None) for name in steps}
    for r in range(repeats):
        for name, step in steps.items():
            with OtherLoad() as load:
                began = time.perf_counter()
                for c in range(calls):
                    out = step(tf.constant([r + 1, c], tf.int64))
                out.numpy()
                seconds = (time.perf_counter() - began) / calls
            if seconds < best[name][0]:
                best[name] = (seconds, load.cores)
    return best


def main(argv):
    del argv
    print(measure.machine())
    sigma, batch, pixels = _SIGMA.value, _BATCH.value, _PIXELS.value
    began = time.perf_counter()
    table = noise.grid_noise_table(sigma)
    print(f"grid table for sigma = {sigma}: J = {table.j_max}, {table.num_bins} bins, 2^{table.index_bits} buckets, "
          f"TV slack {table.tv_slack_per_pixel:.3g} per pixel; built in {time.perf_counter() - began:.2f} s")
    shape = tf.constant([batch, pixels])
    pixels_int = tf.random.stateless_uniform([1, pixels], [9, 9], minval=0, maxval=256, dtype=tf.int32)
    image = tf.cast(pixels_int, tf.float32) / 255.0
    spec = [tf.TensorSpec([2], tf.int64)]
    steps = {
        "float sampler (standard_normal)": tf.function(lambda s: noise.standard_normal(shape, s), input_signature=spec),
        "grid sampler (grid_noise)": tf.function(lambda s: noise.grid_noise(shape, s, table), input_signature=spec),
        "float inputs (x + sigma z, float32)": tf.function(
            lambda s: image + sigma * noise.standard_normal(shape, s), input_signature=spec),
        "grid inputs ((a + j) / 255)": tf.function(
            lambda s: noise.grid_inputs(pixels_int, noise.grid_noise(shape, s, table)), input_signature=spec),
    }
    if _FORWARD.value:
        if pixels != 28 * 28:
            raise app.UsageError("--forward needs --pixels=784 (LeNet's 28 x 28 x 1 inputs)")
        lenet = models.get_architecture("lenet", "fashion_mnist")
        steps["LeNet forward (float32)"] = tf.function(
            lambda s: lenet(tf.reshape(image + sigma * noise.standard_normal(shape, s), [-1, 28, 28, 1]),
                            training=False), input_signature=spec)
    best = best_seconds(steps, _CALLS.value, _REPEATS.value)
    rates = {name: batch / seconds for name, (seconds, _) in best.items()}
    for name, (_, cores) in best.items():
        load = "" if cores is None else f"; other load {cores:.2f} cores"
        print(f"{name:40s} {rates[name]:12,.0f} samples/s  ({pixels} values each{load})")
    names = list(steps)
    print(f"grid / float: sampler {rates[names[1]] / rates[names[0]]:.2f}x, "
          f"model inputs {rates[names[3]] / rates[names[2]]:.2f}x")
    if _FORWARD.value:
        # The forward step above includes float inputs: subtract them to get the network alone (seconds per sample).
        network = 1 / rates[names[4]] - 1 / rates[names[2]]
        print(f"estimated certification throughput, grid / float: "
              f"{(1 / rates[names[2]] + network) / (1 / rates[names[3]] + network):.2f}x")


if __name__ == "__main__":
    app.run(main)
