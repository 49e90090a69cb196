r"""Certification throughput: noise samples per second through bin/certify.py's code path.

Certifies the first --examples Fashion-MNIST test images with LeNet exactly as
`bin/certify.py --model=... --max=<examples>` does with its defaults (n0 = 100,
n = 100,000, the default --batch_size), via `certify_run.certify_dataset`, and
reads the time of each row from the TSV it writes. The first call, which pays
for tracing, is reported apart from the steady state: the first image, or
with few samples per image (fixed-radius runs) the first batch of images
certified together, whose rows share one time (certify_run writes each
image of a call the call's time divided by its images). The same run measures
the machine's float32 matmul rate (tf.linalg.matmul of 2048 x 2048 matrices)
and reports the throughput as a fraction of it, counting LeNet's forward
pass as 4.58 MFLOP per sample.

Each dtype of --compute_dtypes is certified in turn, as
`bin/certify.py --compute_dtype=...` certifies it, and reported with its
ratio to float32 in the same run; the script first prints the CPU's bfloat16
capability (tf_consreg.precision).

Each sampler of --noise (float, grid: `bin/certify.py --noise=...`) is
certified in turn for each dtype, and grid reported with its ratio to float
in the same run. With --rounds=R the samplers are interleaved: each round
certifies the images once with each, in reversed order every other round
(float, grid; grid, float; ...), so that a change in the machine's load
reaches both alike; every round's rates and grid/float ratio are printed,
then each sampler's best round and the median of the rounds' ratios.

With --radii the runs are fixed-radius ones (`bin/certify.py --radii=...`,
staged): an image draws n0 plus the estimation samples of its stopping stage
(the TSV's samples column), and the rate counts those.

Other processes share the CPU on a busy machine: the script also reports how
many cores they used during each measurement (from /proc/stat), so numbers
taken under load can be told apart.

Example:

  python bench/certify_bench.py                 # defaults of bin/certify.py
  python bench/certify_bench.py --batch_size=4000 --examples=4
  python bench/certify_bench.py --model_dir=runs/fmnist_consistency_0.25
  python bench/certify_bench.py --compute_dtypes=float32
  python bench/certify_bench.py --compute_dtypes=float32 --noise=float,grid --radii=0.25
  python bench/certify_bench.py --compute_dtypes=float32 --noise=float,grid --rounds=3 \
      --model_dir=runs/fm15_consistency_0.50 --examples=4 --n=100000
"""

import os
import shutil
import statistics
import tempfile
import time

from absl import app
from absl import flags

import tf_consreg  # pylint: disable=unused-import  Sets TensorFlow's environment (oneDNN) first.
import tensorflow as tf

from tf_consreg import certify_log
from tf_consreg import certify_run
from tf_consreg import certify_spec
from tf_consreg import data
from tf_consreg import models
from tf_consreg import precision

import measure
from measure import OtherLoad
from measure import row_seconds

LENET_FLOPS_PER_SAMPLE = 4.58e6

_EXAMPLES = flags.DEFINE_integer("examples", 4, "Test images to certify (the first one also traces).")
_N = flags.DEFINE_integer("n", 100000, "Estimation samples per image (bin/certify.py's default).")
_N0 = flags.DEFINE_integer("n0", 100, "Selection samples per image (bin/certify.py's default).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", certify_spec.CertifySpec.batch_size,
                                   "Noisy copies per forward pass (bin/certify.py's default).")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A trained run to certify (default: an untrained LeNet; "
                                 "the speed does not depend on the weights).")
_COMPUTE_DTYPES = flags.DEFINE_list("compute_dtypes", list(precision.COMPUTE_DTYPES),
                                    "Compute dtypes to certify in, in turn; float32 is the ratios' base.")
flags.register_validator("compute_dtypes", lambda values: set(values) <= set(precision.COMPUTE_DTYPES),
                         message=f"choose among {', '.join(precision.COMPUTE_DTYPES)}")
_NOISE = flags.DEFINE_list("noise", list(certify_spec.NOISE_MODES),
                           "Samplers to certify with, in turn (bin/certify.py's --noise); float is the ratios' base.")
flags.register_validator("noise", lambda values: set(values) <= set(certify_spec.NOISE_MODES),
                         message=f"choose among {', '.join(certify_spec.NOISE_MODES)}")
_RADII = flags.DEFINE_list("radii", None, "Fixed-radius (staged) runs at these radii, as bin/certify.py --radii; "
                           "default: full CERTIFY with n samples per image.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Rounds of certification; each certifies the images once with every "
                               "sampler of --noise, in reversed order every other round.", lower_bound=1)
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the square matrices of the matmul rate.")


def matmul_gflops(size: int, repeats: int = 10) -> float:
    """Best-of-3 float32 matmul rate in GFLOP/s."""
    a = tf.random.uniform([size, size])
    b = tf.random.uniform([size, size])
    step = tf.function(lambda: tf.linalg.matmul(a, b))
    step().numpy()
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(repeats):
            result = step()
        result.numpy()
        best = min(best, (time.perf_counter() - began) / repeats)
    return 2 * size**3 / best / 1e9


def certify_rows(directory: str, compute_dtype: str, noise: str, round_index: int):
    """Runs certify_dataset like `bin/certify.py --compute_dtype=... --noise=...`.

    Each round writes a TSV of its own (one already written would be resumed,
    certifying nothing).

    Returns:
      (row seconds, samples drawn per row, the other processes' load in cores).
    """
    sigma = None
    if _MODEL_DIR.value:
        where = dict(model_dir=_MODEL_DIR.value)
    else:
        model = os.path.join(directory, "lenet.keras")
        if not os.path.exists(model):
            models.get_architecture("lenet", "fashion_mnist").save(model)
        where, sigma = dict(model=model, dataset="fashion_mnist"), 0.25
    radii = None if _RADII.value is None else tuple(float(r) for r in _RADII.value)
    output = os.path.join(directory, f"certify_{compute_dtype}_{noise}_{round_index}.tsv")
    spec = certify_spec.CertifySpec(sigma=sigma, n0=_N0.value, n=_N.value, batch_size=_BATCH_SIZE.value,
                                    compute_dtype=compute_dtype, noise=noise)
    config = certify_run.CertifyConfig(output=output, max=_EXAMPLES.value, radii=radii, spec=spec, **where)
    data.load_arrays(config.dataset, config.split)  # Warm the file cache; not part of certification.
    with OtherLoad() as load:
        certify_run.certify_dataset(config, verbose=0)
    log = certify_log.read_certify_tsv(config.output)
    drawn = [_N0.value + int(s) for s in log.samples] if log.samples is not None else [_N0.value + _N.value] * len(
        log.idx)
    return row_seconds(config.output), drawn, load.cores


def main(argv):
    del argv
    directory = tempfile.mkdtemp()
    runs = {}
    try:
        # The matmul rate before and after certification; the best counts.
        with OtherLoad() as before:
            gflops = matmul_gflops(_MATMUL_SIZE.value)
        for round_index in range(_ROUNDS.value):
            for compute_dtype in _COMPUTE_DTYPES.value:
                for noise in _NOISE.value[::-1] if round_index % 2 else _NOISE.value:
                    runs.setdefault((compute_dtype, noise), []).append(
                        certify_rows(directory, compute_dtype, noise, round_index))
        with OtherLoad() as after:
            gflops = max(gflops, matmul_gflops(_MATMUL_SIZE.value))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    loads = [load.cores for load in (before, after) if load.cores is not None]
    matmul_load = max(loads) if loads else None

    def load_text(cores):
        return "unknown" if cores is None else f"{cores:.2f} of {os.cpu_count()} cores"

    print(f"machine: {measure.machine()}")
    print(f"bfloat16: {precision.probe().describe()}")
    print(f"float32 matmul ({_MATMUL_SIZE.value}^2): {gflops:.1f} GFLOP/s "
          f"(other processes: {load_text(matmul_load)})")
    kind = f"fixed-radius (staged) at radii {','.join(_RADII.value)}" if _RADII.value else "full CERTIFY"

    def first_call(seconds):
        # The rows of the first call share its time; a later call of exactly the same duration is a tie that
        # can only drop a few more rows from the steady state.
        return next((i for i, s in enumerate(seconds) if s != seconds[0]), len(seconds))

    def steady_rate(seconds, drawn):
        # The first call pays for tracing; with one call there is nothing else.
        k = first_call(seconds)
        steady, steady_drawn = (seconds[k:], drawn[k:]) if k < len(seconds) else (seconds, drawn)
        return sum(steady_drawn) / sum(steady)

    # rates[dtype, noise][round]: the steady-state samples/s of each round.
    rates = {key: [steady_rate(seconds, drawn) for seconds, drawn, _ in rounds] for key, rounds in runs.items()}
    for (compute_dtype, noise), rounds in runs.items():
        for round_index, (seconds, drawn, certify_load) in enumerate(rounds):
            rate = rates[compute_dtype, noise][round_index]
            ratios = []
            if noise == "float" and ("float32", "float") in rates and compute_dtype != "float32":
                ratios.append(f"{rate / rates['float32', 'float'][round_index]:.2f} x float32")
            if noise != "float" and (compute_dtype, "float") in rates:
                ratios.append(f"{rate / rates[compute_dtype, 'float'][round_index]:.2f} x float noise")
            ratio = "".join(f" = {r}" for r in ratios)
            fraction = rate * LENET_FLOPS_PER_SAMPLE / (gflops * 1e9)
            which = f", round {round_index + 1} of {len(rounds)}" if len(rounds) > 1 else ""
            print(f"certify in {compute_dtype}, --noise={noise}{which}: LeNet, Fashion-MNIST, {kind}, "
                  f"n0={_N0.value} n={_N.value} batch_size={_BATCH_SIZE.value}, {len(seconds)} images, "
                  f"{sum(drawn) / len(drawn):,.0f} samples per image (other processes: {load_text(certify_load)})")
            k = first_call(seconds)
            print(f"  first call (traces; {k} image{'s' * (k > 1)}): {sum(drawn[:k]) / sum(seconds[:k]):,.0f} "
                  "samples/s")
            print(f"  steady state: {rate:,.0f} samples/s{ratio} = {rate * LENET_FLOPS_PER_SAMPLE / 1e9:.1f} "
                  f"GFLOP/s = {fraction:.0%} of the float32 matmul rate")
    if _ROUNDS.value > 1:
        for (compute_dtype, noise), values in rates.items():
            line = f"best of {len(values)} rounds, {compute_dtype}, --noise={noise}: {max(values):,.0f} samples/s"
            if noise != "float" and (compute_dtype, "float") in rates:
                # Paired by round: both samplers of a round ran back to back, under about the same load.
                floats = rates[compute_dtype, "float"]
                paired = [g / f for g, f in zip(values, floats)]
                line += (f"; {noise} / float per round {', '.join(f'{r:.2f}' for r in paired)}, median "
                         f"{statistics.median(paired):.2f}x; best / best {max(values) / max(floats):.2f}x")
            print(line)


if __name__ == "__main__":
    app.run(main)
