r"""Sharded and mirrored certification: noise samples per second.

Two comparisons on the same untrained LeNet (the speed does not depend on the
weights) and the first Fashion-MNIST test images, at bin/certify.py's flags:

1. Processes: one `bin/certify.py` process certifying --examples images,
   against --shards processes started side by side, each with
   `--num_shards=K --shard_index=i` (as K hosts or array tasks would, here on
   one machine). Reported: the steady rate while all processes certify (from
   the moment the last one has finished its first row, which pays for
   tracing, to the moment the first one is done; each row's work is placed
   in time by when it appeared in the TSV and its time column), and the rate
   over the whole wall time including start-up. The shard rows are checked
   against the single run's.
2. Strategies, in this process with 2 logical CPU devices: certification
   with the default strategy against --strategy=mirrored (each image's
   samples split over the 2 devices).

On a machine with fewer cores than shards the shards share the cores, so
expect no gain there; on K hosts each shard runs at the single-process rate.
Also printed: the cores other processes used meanwhile (from /proc/stat), as
the machine may be shared.

Example:

  python bench/shard_bench.py                      # 24 images, n = 10,000, 3 shards
  python bench/shard_bench.py --examples=12 --n=2000 --shards=2
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging

import tf_consreg  # pylint: disable=unused-import  Sets TensorFlow's environment (oneDNN) first.
import tensorflow as tf

from tf_consreg import certify_run
from tf_consreg import certify_spec
from tf_consreg import models

import measure
from measure import OtherLoad
from measure import row_seconds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_EXAMPLES = flags.DEFINE_integer("examples", 24, "Test images certified by each configuration of part 1.")
_MIRRORED_EXAMPLES = flags.DEFINE_integer("mirrored_examples", 8, "Test images of each strategy in part 2.")
_SHARDS = flags.DEFINE_integer("shards", 3, "Shard processes run side by side.")
_N = flags.DEFINE_integer("n", 10000, "Estimation samples per image (the README demo's).")
_N0 = flags.DEFINE_integer("n0", 100, "Selection samples per image (bin/certify.py's default).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", certify_spec.CertifySpec.batch_size, "Noisy copies per forward pass.")
_PARTS = flags.DEFINE_list("parts", ["processes", "mirrored"], "Which comparisons to run.")


def _count_rows(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            return max(0, f.read().count("\n") - 1)
    except FileNotFoundError:
        return 0


def _rows(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rsplit("\t", 1)[0] for line in f.read().split("\n")[1:-1]]


def _certify_processes(model: str, outputs: Sequence[str], shards: int) -> Tuple[float, float]:
    """Runs one bin/certify.py process per output side by side.

    Returns:
      (samples/s while all of them certify, wall time in seconds).
    """
    began = time.time()
    processes = []
    for index, output in enumerate(outputs):
        args = [sys.executable, os.path.join(REPO, "bin", "certify.py"), f"--model={model}", "--dataset=fashion_mnist",
                "--sigma=0.25", f"--n0={_N0.value}", f"--n={_N.value}", f"--batch_size={_BATCH_SIZE.value}",
                f"--max={_EXAMPLES.value}", f"--output={output}"]
        if shards > 1:
            args += [f"--num_shards={shards}", f"--shard_index={index}"]
        processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    appeared = [[] for _ in outputs]  # When each row reached the file.
    try:
        while any(p.poll() is None for p in processes) and time.time() - began < 1800:
            for output, times in zip(outputs, appeared):
                rows = _count_rows(output)
                times.extend([time.time()] * (rows - len(times)))
            time.sleep(0.05)
        for process in processes:
            _, stderr = process.communicate(timeout=60)
            if process.returncode:
                raise RuntimeError(f"bin/certify.py failed:\n{stderr[-2000:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    wall = time.time() - began
    for output, times in zip(outputs, appeared):
        times.extend([time.time()] * (_count_rows(output) - len(times)))
    # Row k of a process ran over [appeared - its time column, appeared].
    spans = [[(end - seconds, end) for end, seconds in zip(times, row_seconds(output))]
             for output, times in zip(outputs, appeared)]
    start, stop = max(s[0][1] for s in spans), min(s[-1][1] for s in spans)
    if stop <= start:  # Rows written in one batch (small n): no steady window.
        return float("nan"), wall
    done = sum(max(0.0, min(b, stop) - max(a, start)) / max(b - a, 1e-9) for s in spans for a, b in s)
    return done * (_N0.value + _N.value) / max(stop - start, 1e-9), wall


def _steady_rate(path: str) -> float:
    """Samples/s of one run without its first row (tracing)."""
    seconds = row_seconds(path)[1:]
    return len(seconds) * (_N0.value + _N.value) / sum(seconds)


def compare_processes(model: str, directory: str) -> List[Tuple[str, float, float, float]]:
    """Part 1: (setting, steady samples/s, whole-run samples/s, others' cores) for 1 and K processes."""
    total = _EXAMPLES.value * (_N0.value + _N.value)
    results = []
    single = os.path.join(directory, "single.tsv")
    with OtherLoad() as load:
        steady, wall = _certify_processes(model, [single], 1)
    results.append(("1 process", steady, total / wall, load.cores))

    shards = [os.path.join(directory, f"shard{i}.tsv") for i in range(_SHARDS.value)]
    with OtherLoad() as load:
        steady, wall = _certify_processes(model, shards, _SHARDS.value)
    results.append((f"{_SHARDS.value} shard processes side by side", steady, total / wall, load.cores))

    merged = sorted((row for path in shards for row in _rows(path)), key=lambda row: int(row.split("\t")[0]))
    if merged != _rows(single):
        raise RuntimeError("the shards' rows differ from the single run's")
    return results


def compare_strategies(model: str, directory: str) -> List[Tuple[str, float, float]]:
    """Part 2: (strategy, steady samples/s, others' cores), in this process."""
    results = []
    for strategy in ("default", "mirrored"):
        output = os.path.join(directory, f"{strategy}.tsv")
        config = certify_run.CertifyConfig(output=output, model=model, dataset="fashion_mnist",
                                           spec=certify_spec.CertifySpec(sigma=0.25, n0=_N0.value, n=_N.value,
                                                                         batch_size=_BATCH_SIZE.value),
                                           max=_MIRRORED_EXAMPLES.value, strategy=strategy)
        with OtherLoad() as load:
            certify_run.certify_dataset(config, verbose=0)
        results.append((strategy, _steady_rate(output), load.cores))
    return results


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # No INFO line per MirroredStrategy.
    # Before TensorFlow uses a device: 2 logical CPU devices for the mirrored
    # strategy (the child processes of part 1 keep one).
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    directory = tempfile.mkdtemp()
    try:
        model = os.path.join(directory, models.BASE_MODEL_FILE)
        tf.keras.utils.set_random_seed(0)
        models.get_architecture("lenet", "fashion_mnist").save(model)
        print(f"machine: {measure.machine()}")
        print(f"LeNet, Fashion-MNIST, n0 = {_N0.value}, n = {_N.value}, batch_size = {_BATCH_SIZE.value}")
        if "processes" in _PARTS.value:
            print(f"\n{_EXAMPLES.value} images; steady = while every process certifies (after its first row, "
                  "which traces); whole = over the wall time, start-up included")
            print("| setting | steady samples/s | whole-run samples/s | other processes (cores) |")
            print("|---|---:|---:|---:|")
            for name, steady, whole, cores in compare_processes(model, directory):
                print(f"| {name} | {steady:,.0f} | {whole:,.0f} | {cores:.2f} |")
        if "mirrored" in _PARTS.value:
            print(f"\n{_MIRRORED_EXAMPLES.value} images in one process with 2 logical CPU devices "
                  "(steady = without the first row)")
            print("| --strategy | steady samples/s | other processes (cores) |")
            print("|---|---:|---:|")
            for name, steady, cores in compare_strategies(model, directory):
                print(f"| {name} | {steady:,.0f} | {cores:.2f} |")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
