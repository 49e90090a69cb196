r"""FM-15: does training or certifying in bfloat16 change what we certify? (issue 17)

The protocol: LeNet on all 60,000 Fashion-MNIST training images, consistency
regularization at sigma = 0.5 (m = 2, lambda = 5, eta = 0.5), 15 epochs,
batch 256, SGD lr 0.01 stepped x0.1 at epoch 10; once per training precision
(float32 and mixed_bfloat16) and seed. Every model is then certified on 500
test images (every 20th) at n0 = 100, n = 10,000, alpha = 0.001 in float32;
the bfloat16-trained ones also in bfloat16 (the network their users would
deploy).

Training runs `bin/train.py` itself, one process per run, so a run directory
is a normal training run (flags.txt, train_config.json, base_model.keras);
an interrupted run resumes when the script is started again, and a finished
one is reused. Certification calls `smoothing.Smooth.certify_batch` on the
model loaded in the chosen compute dtype, with the keys bin/certify.py uses
(--seed, dataset index), its default --batch_size and its TSV columns, so a
float32 row equals bin/certify.py's row for the same example. The report
reads the ACR and certified accuracies with `analysis.summarize`, the
training speed per epoch from the run's TensorBoard scalars, and the
certification speed from the TSV's per-example times.

  python bench/precision_bench.py --runs_dir=/work/runs-precision
  python bench/precision_bench.py --runs_dir=/work/runs-precision --phases=report

Timings are only comparable when nothing else runs on the machine.
"""

import fcntl
import glob
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

import tf_consreg  # pylint: disable=unused-import  Sets TensorFlow's environment (oneDNN) first.
import numpy as np
import tensorflow as tf

from tf_consreg import analysis
from tf_consreg import data
from tf_consreg import models
from tf_consreg import precision
from tf_consreg import smoothing

import measure
from measure import OtherLoad
from measure import row_seconds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("train", "certify", "report")
# Training precision (bin/train.py's --mixed_precision) -> its name in run directories.
TRAINED_IN = {"none": "float32", "mixed_bfloat16": "bfloat16"}
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)

_RUNS_DIR = flags.DEFINE_string("runs_dir", None, "Directory of the runs: one training run per precision and "
                                "seed, each with its certification TSVs. Finished parts are reused.")
_PHASES = flags.DEFINE_list("phases", list(PHASES), "Which of train, certify, report to do.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Training seeds.")
_TRAIN_PRECISIONS = flags.DEFINE_list("train_precisions", list(TRAINED_IN), "bin/train.py --mixed_precision "
                                      "values to train with.")
_EPOCHS = flags.DEFINE_integer("epochs", 15, "Training epochs.")
_LR_STEP_SIZE = flags.DEFINE_integer("lr_step_size", 10, "Epochs between learning-rate drops (x0.1).")
_TRAIN_EXAMPLES = flags.DEFINE_integer("train_examples", 0, "Training images (0: all 60,000).")
_SKIP = flags.DEFINE_integer("skip", 20, "Certify every skip-th test image.")
_MAX = flags.DEFINE_integer("max", 10000, "Certify test images below this index.")
_N0 = flags.DEFINE_integer("n0", 100, "Selection samples per image.")
_N = flags.DEFINE_integer("n", 10000, "Estimation samples per image.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
_CERTIFY_SEED = flags.DEFINE_integer("certify_seed", 0, "Certification noise seed (bin/certify.py's --seed).")
_CERTIFY_BATCH_SIZE = flags.DEFINE_integer("certify_batch_size", smoothing.DEFAULT_BATCH_SIZE,
                                           "Noisy copies per forward pass (bin/certify.py's --batch_size).")

SIGMA = 0.5


def run_name(train_precision: str, seed: int) -> str:
    return f"fm15_{TRAINED_IN[train_precision]}_seed{seed}"


def certify_tsv(run_dir: str, compute_dtype: str) -> str:
    return os.path.join(run_dir, f"certify_n{_N.value}_skip{_SKIP.value}_{compute_dtype}.tsv")


def compute_dtypes(train_precision: str):
    """float32 for every model; bfloat16 too for the bfloat16-trained ones."""
    return ("float32", "bfloat16") if train_precision == "mixed_bfloat16" else ("float32",)


def runs():
    for seed in (int(s) for s in _SEEDS.value):
        for train_precision in _TRAIN_PRECISIONS.value:
            yield train_precision, seed, os.path.join(_RUNS_DIR.value, run_name(train_precision, seed))


def train_flags(run_dir: str, train_precision: str, seed: int):
    return [f"--model_dir={run_dir}", "--dataset=fashion_mnist", "--arch=lenet", "--method=consistency",
            f"--sigma={SIGMA}", "--num_noise=2", "--lbd=5", "--eta=0.5", f"--epochs={_EPOCHS.value}",
            "--batch_size=256", "--lr=0.01", f"--lr_step_size={_LR_STEP_SIZE.value}", "--lr_gamma=0.1",
            f"--train_examples={_TRAIN_EXAMPLES.value}", f"--seed={seed}", f"--mixed_precision={train_precision}"]


def train_all() -> None:
    log_dir = os.path.join(_RUNS_DIR.value, "logs")
    os.makedirs(log_dir, exist_ok=True)
    for train_precision, seed, run_dir in runs():
        if os.path.exists(os.path.join(run_dir, models.BASE_MODEL_FILE)):
            print(f"{run_dir}: trained already", flush=True)
            continue
        command = [sys.executable, os.path.join(REPO, "bin", "train.py"), *train_flags(run_dir, train_precision, seed)]
        print(f"training {run_dir} ...", flush=True)
        began = time.time()
        with open(os.path.join(log_dir, f"{os.path.basename(run_dir)}.train.log"), "a", encoding="utf-8") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        print(f"  done in {time.time() - began:.0f} s", flush=True)


def certify_one(run_dir: str, compute_dtype: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Certifies the selected test images into a TSV, resuming after its last row.

    The TSV is locked while it is written, so several copies of this script
    (say, one per seed) can run at once: a TSV another one holds is skipped.
    """
    path = certify_tsv(run_dir, compute_dtype)
    indices = np.arange(0, min(_MAX.value, len(images)), _SKIP.value)
    with open(path, "a+", encoding="utf-8") as out:
        try:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{path}: being certified by another process; skipped", flush=True)
            return
        out.seek(0)
        done = max(0, len(out.read().splitlines()) - 1)
        if done >= len(indices):
            print(f"{path}: certified already", flush=True)
            return
        base = models.load_base_model(run_dir, compute_dtype=compute_dtype)
        info = data.get_dataset_info("fashion_mnist")
        smooth = smoothing.Smooth(base, info.num_classes, SIGMA)
        print(f"certifying {len(indices) - done} images of {run_dir} in {compute_dtype} ...", flush=True)
        with OtherLoad() as load:
            if done == 0:
                out.write(smoothing.HEADERS["certify"] + "\n")
            for idx in indices[done:]:
                began = time.time()
                classes, radii = smooth.certify_batch(images[idx:idx + 1], _N0.value, _N.value, _ALPHA.value,
                                                      _CERTIFY_BATCH_SIZE.value, seed=_CERTIFY_SEED.value,
                                                      image_ids=[idx])
                seconds = time.time() - began
                out.write(format_row(int(idx), int(labels[idx]), int(classes[0]), float(radii[0]), seconds))
                out.flush()
    print(f"  other processes used {load.cores if load.cores is None else round(load.cores, 2)} cores",
          flush=True)


def format_row(idx: int, label: int, prediction: int, radius: float, seconds: float) -> str:
    """bin/certify.py's row: idx label predict radius correct time."""
    import datetime  # pylint: disable=import-outside-toplevel

    return (f"{idx}\t{label}\t{prediction}\t{radius:.3}\t{int(prediction == label)}\t"
            f"{datetime.timedelta(seconds=seconds)}\n")


def certify_all() -> None:
    images, labels = data.load_arrays("fashion_mnist", "test")
    for train_precision, _, run_dir in runs():
        if not os.path.exists(os.path.join(run_dir, models.BASE_MODEL_FILE)):
            print(f"{run_dir}: not trained (yet); skipped", flush=True)
            continue
        for compute_dtype in compute_dtypes(train_precision):
            certify_one(run_dir, compute_dtype, images, labels)


def epoch_scalars(run_dir: str, tag: str, subdir: str = "train"):
    """One scalar per epoch from the run's TensorBoard events (the last value written for each epoch)."""
    values = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "logs", subdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return [values[k] for k in sorted(values)]


def report() -> None:
    capability = precision.probe()
    print(f"machine: {measure.machine()}")
    print(f"bfloat16: {capability.describe()}")
    print(f"FM-15: LeNet, Fashion-MNIST (60k), consistency sigma={SIGMA} m=2 lambda=5 eta=0.5, {_EPOCHS.value} "
          f"epochs, lr 0.01 x0.1 every {_LR_STEP_SIZE.value}, batch 256; certified on every {_SKIP.value}th test "
          f"image, n0={_N0.value} n={_N.value} alpha={_ALPHA.value}")
    header = (["trained in", "seed", "certified in", "ACR", "clean acc."] + [f"cert. acc. @{r:g}" for r in RADII[1:]]
              + ["noisy test acc. (last epoch)", "train clean img/s (median epoch)", "certify samples/s (median image)"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * 3 + "---:|" * (len(header) - 3))
    rows = []
    for train_precision, seed, run_dir in runs():
        speeds = epoch_scalars(run_dir, "epoch/images_per_second")
        noisy = epoch_scalars(run_dir, "epoch/accuracy", "validation")
        for compute_dtype in compute_dtypes(train_precision):
            path = certify_tsv(run_dir, compute_dtype)
            if not os.path.exists(path):
                continue
            log = analysis.read_certify_tsv(path)
            summary = analysis.summarize(log, RADII)
            # The ACR is a mean over the images: its sampling error over test images, for comparing runs.
            acr_standard_error = float(np.std(log.radius * log.correct, ddof=1) / np.sqrt(len(log.idx)))
            # The median row: rows that trace (the first of each resumed run) or meet a load spike do not count.
            rate = (_N0.value + _N.value) / float(np.median(row_seconds(path)))
            rows.append({"trained_in": TRAINED_IN[train_precision], "seed": seed, "certified_in": compute_dtype,
                         "n": summary.n, "acr": summary.acr, "acr_standard_error": acr_standard_error, "clean_accuracy": summary.clean_accuracy,
                         "certified_accuracy": {f"{r:g}": summary.certified_accuracy[r] for r in RADII},
                         "noisy_test_accuracy": noisy[-1] if noisy else None,
                         "train_images_per_second": speeds, "certify_samples_per_second": rate,
                         "run_dir": run_dir, "tsv": path})
            cells = [TRAINED_IN[train_precision], str(seed), compute_dtype, f"{summary.acr:.4f}",
                     f"{summary.clean_accuracy:.3f}"]
            cells += [f"{summary.certified_accuracy[r]:.3f}" for r in RADII[1:]]
            cells += [f"{noisy[-1]:.4f}" if noisy else "-", f"{np.median(speeds):,.0f}" if speeds else "-",
                      f"{rate:,.0f}"]
            print("| " + " | ".join(cells) + " |")
    print("ACR standard errors over the images, sd(radius x correct) / sqrt(n): "
          + "; ".join(f"{r['trained_in']} seed {r['seed']} in {r['certified_in']}: {r['acr_standard_error']:.4f}"
                      for r in rows))
    # One model certified in both dtypes, image by image (the same noise keys): how much the dtype moves a certificate.
    for train_precision, seed, run_dir in runs():
        paths = [certify_tsv(run_dir, dtype) for dtype in compute_dtypes(train_precision)]
        if len(paths) == 2 and all(os.path.exists(p) for p in paths):
            a, b = (analysis.read_certify_tsv(p) for p in paths)
            n = min(len(a.idx), len(b.idx))
            gain = b.radius[:n] * b.correct[:n] - a.radius[:n] * a.correct[:n]
            print(f"{TRAINED_IN[train_precision]} seed {seed}, bfloat16 - float32 certification on the same "
                  f"{n} images: same prediction on {np.mean(a.predict[:n] == b.predict[:n]):.1%}, ACR difference "
                  f"{gain.mean():+.4f} (paired standard error {gain.std(ddof=1) / np.sqrt(n):.4f}), "
                  f"|radius difference| median {np.median(np.abs(b.radius[:n] - a.radius[:n])):.3f}")
    for row in rows:
        speeds = row["train_images_per_second"]
        if row["certified_in"] == "float32" and speeds:
            print(f"{row['trained_in']} seed {row['seed']}: clean images/s per epoch: "
                  + ", ".join(f"{s:,.0f}" for s in speeds))
    with open(os.path.join(_RUNS_DIR.value, "fm15_report.json"), "w", encoding="utf-8") as f:
        json.dump({"capability": capability.describe(), "rows": rows}, f, indent=2)
        f.write("\n")


def main(argv):
    del argv
    if not _RUNS_DIR.value:
        raise app.UsageError("--runs_dir is required")
    unknown = set(_PHASES.value) - set(PHASES)
    if unknown:
        raise app.UsageError(f"--phases: unknown {sorted(unknown)}; choose from {', '.join(PHASES)}")
    unknown = set(_TRAIN_PRECISIONS.value) - set(TRAINED_IN)
    if unknown:
        raise app.UsageError(f"--train_precisions: unknown {sorted(unknown)}; choose from {', '.join(TRAINED_IN)}")
    if "train" in _PHASES.value:
        train_all()
    if "certify" in _PHASES.value:
        certify_all()
    if "report" in _PHASES.value:
        report()


if __name__ == "__main__":
    app.run(main)
