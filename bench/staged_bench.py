r"""Fixed-radius (staged) certification against full CERTIFY on a trained model (issue 13's benchmark).

Three runs of bin/certify.py's code path (`certify_run.certify_dataset`) on
the same images, model, seed and n_max:

- fixed: full CERTIFY, n0 selection + n estimation samples per image;
- one: fixed-radius mode for one radius (--radius), stages
  `stats.default_stages(n)`;
- grid: fixed-radius mode for the radii --grid.

Each run writes its TSV (and settings file) in --out_dir, as bin/certify.py
would: a rerun of this script resumes each TSV after its last row and skips
finished ones. Every session of a run appends one line to
`<part>.sessions.jsonl` beside it: rows written, wall seconds, and the cores
that other processes used meanwhile (`measure.OtherLoad`), so a number taken
on a busy machine says so.

The report compares, on the images all three runs have certified:
estimation samples per image (the TSV's samples column; n for fixed),
certification wall time (the sum of the TSV's time column: each row gets its
batch's wall time divided by the batch's images, so the sum is the time spent
certifying, without start-up and model loading), the certified accuracy at
each radius the staged run asked against fixed-n CERTIFY's on the same
images, and the share of images whose answer (class or abstain, and
certified or not at each radius) is the same.

Example (issue 13: the LeNet trained with consistency on all of Fashion-MNIST
at sigma = 0.5, 500 test images (every 20th), n_max = 100,000, alpha = 0.001):

  python bench/staged_bench.py --model=/work/runs-precision/fm15_float32_seed0/base_model.keras \
      --out_dir=/work/runs-staged
  python bench/staged_bench.py --model=... --out_dir=/work/runs-staged --parts=   # the report only

The report warns when the runs saw other processes' loads differing by more
than UNEVEN_LOAD cores: then their wall times are not comparable.

Fixed n = 100,000 on 500 images is 50 million forward passes: 15-20 minutes
on 2 quiet cores. --num_images=100 certifies the first 100 of them; a later
run with more resumes the same TSVs (the number of images is not part of a
run's settings), and the report covers the images all three TSVs hold, up to
--num_images.

The wall times come from runs one after the other, not side by side: read
them with the other processes' load printed beside them.
"""

import json
import os
import time
from typing import Optional, Tuple

from absl import app
from absl import flags
import numpy as np

import tf_consreg  # pylint: disable=unused-import  Sets TensorFlow's environment (oneDNN) first.

from tf_consreg import analysis
from tf_consreg import certify_log
from tf_consreg import certify_run
from tf_consreg import certify_spec

import measure
from measure import OtherLoad
from measure import row_seconds

# Fixed n first: the process's first calls (oneDNN's kernel set-up) then fall in its long run.
PARTS = ("fixed", "one", "grid")
# Issue 13's targets: (part, fewer samples at least, less wall time at least).
TARGETS = {"one": (20.0, 10.0), "grid": (2.0, None)}
# Certified accuracy within this of fixed-n CERTIFY's at every radius (1 point).
ACCURACY_TOLERANCE = 0.01
# Other processes' cores beyond which two runs' wall times are not comparable.
UNEVEN_LOAD = 0.25

_MODEL = flags.DEFINE_string("model", None, "The base model (.keras) to certify.")
_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "Its dataset.")
_SIGMA = flags.DEFINE_float("sigma", 0.5, "Its noise level.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory of the runs' TSVs; finished runs are reused, "
                               "unfinished ones resumed.")
_PARTS = flags.DEFINE_list("parts", list(PARTS), "Which runs to certify (then the report of what there is).")
_SKIP = flags.DEFINE_integer("skip", 20, "Certify every skip-th test image.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 500, "How many images (idx 0, skip, 2 skip, ...).")
_N0 = flags.DEFINE_integer("n0", 100, "Selection samples per image.")
_N = flags.DEFINE_integer("n", 100000, "n of fixed-n CERTIFY, and n_max of the staged runs.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", certify_spec.CertifySpec.batch_size, "Noisy copies per forward pass.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_RADIUS = flags.DEFINE_list("radius", ["0.5"], "The radius (or radii) of the part 'one'.")
_GRID = flags.DEFINE_list("grid", ["0.25", "0.5", "0.75", "1", "1.25", "1.5", "1.75"], "The radii of the part 'grid'.")


def part_radii(part: str) -> Optional[Tuple[float, ...]]:
    """The radii of a staged part; None for full CERTIFY."""
    return {"fixed": None, "one": tuple(float(r) for r in _RADIUS.value),
            "grid": tuple(float(r) for r in _GRID.value)}[part]


def tsv_path(part: str) -> str:
    return os.path.join(_OUT_DIR.value, f"{part}.tsv")


def config(part: str) -> certify_run.CertifyConfig:
    """The run of `part`, as bin/certify.py would build it from its flags."""
    radii = part_radii(part)
    return certify_run.CertifyConfig(
        output=tsv_path(part), model=_MODEL.value, dataset=_DATASET.value,
        spec=certify_spec.CertifySpec(sigma=_SIGMA.value, n0=_N0.value, n=_N.value, alpha=_ALPHA.value,
                                      batch_size=_BATCH_SIZE.value), skip=_SKIP.value,
        max=_SKIP.value * _NUM_IMAGES.value, seed=_SEED.value, **({} if radii is None else {"radii": radii}))


def certify(run: certify_run.CertifyConfig, part: str) -> None:
    """Certifies (or resumes) a run; appends the session's numbers to its sessions file."""
    began = time.time()
    with OtherLoad() as load:
        written = certify_run.certify_dataset(run, verbose=0)
    seconds = time.time() - began
    session = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(began)), "rows": written,
               "seconds": seconds, "other_cores": load.cores, "cpu_count": os.cpu_count()}
    with open(os.path.join(_OUT_DIR.value, f"{part}.sessions.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(session) + "\n")
    other = "unknown" if load.cores is None else f"{load.cores:.2f}"
    print(f"{part}: {written} rows in {seconds:.0f} s (other processes: {other} of {os.cpu_count()} cores)",
          flush=True)


def sessions_load(part: str) -> Optional[float]:
    """The cores other processes used over a part's sessions, weighted by their time; None if unknown."""
    path = os.path.join(_OUT_DIR.value, f"{part}.sessions.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        known = [s for s in (json.loads(line) for line in f if line.strip())
                 if s["other_cores"] is not None and s["seconds"] > 0]
    if not known:
        return None
    return sum(s["other_cores"] * s["seconds"] for s in known) / sum(s["seconds"] for s in known)


def decisions(log: certify_log.CertifyLog, radii: Tuple[float, ...]) -> np.ndarray:
    """Per image: its class (-1 abstain) and certified-or-not at each radius, as int [N, 1 + R]."""
    certified = (log.predict[:, None] >= 0) & (log.radius[:, None] >= np.asarray(radii)[None, :])
    return np.concatenate([log.predict[:, None], certified.astype(np.int64)], axis=1)


def head(log: certify_log.CertifyLog, count: int) -> certify_log.CertifyLog:
    """The first `count` rows of a log."""
    columns = ("idx", "label", "predict", "radius", "correct", "samples")
    return certify_log.CertifyLog(path=log.path, radii=log.radii, **{
        c: None if getattr(log, c) is None else getattr(log, c)[:count] for c in columns})


def report() -> bool:
    """Prints the comparison of the staged parts with fixed-n CERTIFY; returns whether every target is met."""
    paths = {part: tsv_path(part) for part in PARTS}
    missing = [p for p, path in paths.items() if not os.path.exists(path)]
    if "fixed" in missing or len(missing) == len(PARTS) - 1:
        print(f"report: nothing to compare (no TSV for {', '.join(missing)})")
        return False
    logs = {p: certify_log.read_certify_tsv(path) for p, path in paths.items() if p not in missing}
    count = min(_NUM_IMAGES.value, *(len(log.idx) for log in logs.values()))
    logs = {p: head(log, count) for p, log in logs.items()}
    seconds = {p: float(np.sum(row_seconds(paths[p])[:count])) for p in logs}
    for p, log in logs.items():
        if not np.array_equal(log.idx, logs["fixed"].idx):
            raise ValueError(f"{paths[p]} holds other images than {paths['fixed']}")
    fixed = logs["fixed"]
    print(f"\nreport: {count} images of {_DATASET.value} (idx 0, {_SKIP.value}, ...), n0 = {_N0.value}, "
          f"n_max = {_N.value:,}, alpha = {_ALPHA.value}, sigma = {_SIGMA.value}")
    print("samples: estimation samples per image (each run also draws n0 selection samples); wall: the sum of the "
          "TSV's time column (certification only, no start-up)")
    print("| run | radii | samples/image | fewer samples | wall (s) | less wall | other load while certifying |")
    print("|---|---|---:|---:|---:|---:|---|")
    loads = {p: sessions_load(p) for p in logs}
    for p, log in logs.items():
        radii = "all (full CERTIFY)" if log.radii is None else ", ".join(f"{r:g}" for r in log.radii)
        load = "unknown" if loads[p] is None else f"{loads[p]:.2f} cores"
        print(f"| {p} | {radii} | {log.samples.mean():,.0f} | {fixed.samples.mean() / log.samples.mean():.1f}x | "
              f"{seconds[p]:.1f} | {seconds['fixed'] / seconds[p]:.1f}x | {load} |")
    known = [load for load in loads.values() if load is not None]
    if len(known) < len(loads) or max(known) - min(known) > UNEVEN_LOAD:
        print(f"WARNING: the runs saw other loads (or unknown ones) differing by more than {UNEVEN_LOAD} cores: "
              "the wall-time ratios are not comparable; rerun on a quiet machine")
    met = True
    for p, log in logs.items():
        if p == "fixed":
            continue
        staged = analysis.certified_accuracy(log, log.radii)
        full = analysis.certified_accuracy(fixed, log.radii)
        same = np.all(decisions(log, log.radii) == decisions(fixed, log.radii), axis=1)
        print(f"\n{p}: certified accuracy, staged vs fixed n = {_N.value:,} on the same images; decisions (class, "
              f"and certified or not at each radius) the same for {same.mean():.1%} ({int(same.sum())} of {count})")
        print("| radius | " + " | ".join(f"{r:g}" for r in log.radii) + " |")
        print("|---|" + "---:|" * len(log.radii))
        print("| staged | " + " | ".join(f"{a:.3f}" for a in staged) + " |")
        print(f"| fixed n | " + " | ".join(f"{a:.3f}" for a in full) + " |")
        gap = float(np.max(np.abs(staged - full)))
        fewer_samples, less_wall = TARGETS.get(p, (None, None))
        checks = [(f"certified accuracy within {ACCURACY_TOLERANCE:.0%} at every radius (largest gap {gap:.3f})",
                   gap <= ACCURACY_TOLERANCE + 1e-12)]
        if fewer_samples is not None:
            ratio = fixed.samples.mean() / log.samples.mean()
            checks.append((f">= {fewer_samples:g}x fewer samples ({ratio:.2f}x)", ratio >= fewer_samples))
        if less_wall is not None:
            ratio = seconds["fixed"] / seconds[p]
            checks.append((f">= {less_wall:g}x less wall time ({ratio:.2f}x)", ratio >= less_wall))
        for text, ok in checks:
            print(f"  {'met' if ok else 'MISSED'}: {text}")
            met &= ok
    return met


def main(argv):
    del argv
    if not _MODEL.value or not _OUT_DIR.value:
        raise app.UsageError("--model and --out_dir are required")
    unknown = set(_PARTS.value) - set(PARTS)
    if unknown:
        raise app.UsageError(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if _NUM_IMAGES.value < 1:
        raise app.UsageError(f"--num_images must be >= 1, got {_NUM_IMAGES.value}")
    runs = {part: config(part) for part in PARTS if part in _PARTS.value}  # Every config checked before any work.
    print(f"machine: {measure.machine()}", flush=True)
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    for part, run in runs.items():
        certify(run, part)
    report()


if __name__ == "__main__":
    app.run(main)
