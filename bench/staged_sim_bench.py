r"""Simulates staged certification on the authors' published logs: samples saved, decisions kept.

Each row of a certification log (the authors' CERTIFY with n = 100,000,
alpha = 0.001) gives a realistic p_A for one image: the proportion of
estimation samples in the top class whose Clopper-Pearson lower bound prints
as the row's radius (solved for the count; the radius has 3 significant
digits, so p_A is approximate). A radius at the cap (all 100,000 samples in
the top class) gives p_A = 1. An abstaining row only says that the bound was
below 1/2; it gets p_A = --abstain_p (default 1/2, the worst case for the
staged procedure: such an image never settles and always runs to n_max).
Misclassified rows are simulated like the others (p_A of their predicted
class); they only count differently in certified accuracy.

For each image and repetition the script draws binomial counts, with the
same `stats.staged_certify` that `Smooth.certify_staged_batch` runs, for
fixed-n CERTIFY (one stage, n) and for each candidate stage schedule, with
independent draws, as the library's separate noise streams give. It reports
per question (one radius, or a grid of radii):
- mean estimation samples per image, and n divided by it (the saving);
- decision agreement: the share of images whose answer (class or ABSTAIN,
  and certified or not at every radius asked) equals fixed-n CERTIFY's;
- the largest difference in certified accuracy (staged minus fixed n) over
  the radii asked, in points (percent of images), and its radius.
The row "fixed n (again)" is a second independent fixed-n run: agreement
between two runs of the same procedure, the most one can expect.

Example:

  python bench/staged_sim_bench.py
  python bench/staged_sim_bench.py --log=tests/testdata/reference_certify/mnist_cohen_noise_0.25_3870.tsv \
      --sigma=0.25 --questions='0.25;0.5;0.25,0.5,0.75'
"""

import os
import time
from typing import Dict, List, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np
from scipy import stats as scipy_stats

from tf_consreg import certify_log
from tf_consreg import stats

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_LOG = os.path.join(_REPO, "tests", "testdata", "reference_certify",
                            "mnist_consistency_lbd_5.0_noise_0.50_1.tsv")

_LOG = flags.DEFINE_string("log", _DEFAULT_LOG, "A certification TSV with n = --n, alpha = --alpha.")
_SIGMA = flags.DEFINE_float("sigma", 0.5, "The log's noise level.")
_N = flags.DEFINE_integer("n", 100000, "n of the log, and n_max of the schedules.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "alpha of the log and of the simulated runs.")
_ABSTAIN_P = flags.DEFINE_float("abstain_p", 0.5, "p_A given to the log's abstaining rows.")
_REPS = flags.DEFINE_integer("reps", 3, "Repetitions of every run (independent draws).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the binomial draws.")
_QUESTIONS = flags.DEFINE_string("questions", "0.5;1.0;0.25,0.5,0.75,1.0,1.25,1.5,1.75",
                                 "Semicolon-separated radius sets, each comma-separated.")
_SCHEDULES = flags.DEFINE_string(
    "schedules",
    "1000,10000,100000;100,1000,10000,100000;100,1000,10000,50000,100000;"
    "100,300,1000,3000,10000,30000,100000;ratio:4;ratio:2",
    "Semicolon-separated candidate schedules besides the default (stats.default_stages): cumulative "
    "counts ending at --n, or ratio:R for n / R^j (j = 0, 1, ...) down to 100.")


def geometric_stages(n: int, ratio: float, smallest: int = 100) -> Tuple[int, ...]:
    """n / ratio^j, rounded, for j = 0, 1, ... while >= smallest, increasing."""
    stages, value = [], float(n)
    while round(value) >= smallest:
        stages.append(int(round(value)))
        value /= ratio
    return tuple(sorted(set(stages)))


def p_from_log(log: certify_log.CertifyLog, sigma: float, n: int, alpha: float, abstain_p: float) -> np.ndarray:
    """Each row's p_A: k / n for the count k whose bound is closest to the printed radius."""
    target = scipy_stats.norm.cdf(log.radius / sigma)
    low, high = np.zeros(len(target), np.int64), np.full(len(target), n, np.int64)
    # Smallest k with lower(k) >= target, by bisection (the bound increases with k).
    while np.any(low < high):
        middle = (low + high) // 2
        above = stats.clopper_pearson_lower(middle, n, alpha) >= target
        high = np.where(above, middle, high)
        low = np.where(above | (low == high), low, middle + 1)
    # k or k - 1, whichever bound is nearer the target (the radius was rounded).
    k = low
    below = np.maximum(k - 1, 0)
    nearer_below = (np.abs(stats.clopper_pearson_lower(below, n, alpha) - target)
                    < np.abs(stats.clopper_pearson_lower(k, n, alpha) - target))
    k = np.where(nearer_below, below, k)
    return np.where(log.predict < 0, abstain_p, k / n)


def run(p: np.ndarray, stages: Sequence[int], radii: np.ndarray, rng: np.random.Generator) -> stats.StagedCertificate:
    """One simulated run: binomial draws of the top class's count, stage by stage."""
    return stats.staged_certify(np.zeros(len(p), np.int64), lambda active, k, m: rng.binomial(m, p[active]),
                                stages, alpha=_ALPHA.value, sigma=_SIGMA.value, radii=radii)


def compare(p: np.ndarray, correct: np.ndarray, radii: np.ndarray, schedules: Dict[str, Tuple[int, ...]],
            reps: int, rng: np.random.Generator) -> List[Tuple[str, int, float, float, float, float]]:
    """Rows (schedule, K, mean samples, agreement, max |delta certified accuracy| in points, at radius).

    The certified-accuracy differences are averaged over the repetitions
    (signed, per radius) before the largest is taken.
    """
    rows = []
    fixed_runs = [run(p, (_N.value,), radii, rng) for _ in range(reps)]
    for name, stages in schedules.items():
        samples, agreement, delta = 0.0, 0.0, np.zeros(len(radii))
        for fixed in fixed_runs:
            result = run(p, stages, radii, rng)
            same = (result.classes == fixed.classes) & np.all(result.certified == fixed.certified, axis=1)
            samples += result.samples.mean() / reps
            agreement += same.mean() / reps
            delta += ((result.certified & correct[:, None]).mean(axis=0)
                      - (fixed.certified & correct[:, None]).mean(axis=0)) * 100 / reps
        worst = int(np.argmax(np.abs(delta)))
        rows.append((name, len(stages), samples, agreement, delta[worst], radii[worst]))
    return rows


def main(argv):
    del argv
    began = time.time()
    log = certify_log.read_certify_tsv(_LOG.value)
    p = p_from_log(log, _SIGMA.value, _N.value, _ALPHA.value, _ABSTAIN_P.value)
    correct = log.correct & (log.predict >= 0)
    schedules = {"fixed n (again)": (_N.value,), "default": stats.default_stages(_N.value)}
    for text in _SCHEDULES.value.split(";"):
        if text.startswith("ratio:"):
            schedules[f"x{text[6:]} from 100"] = geometric_stages(_N.value, float(text[6:]))
        else:
            schedules[text.replace(",", " ")] = stats.check_stages([int(v) for v in text.split(",")], _N.value)
    rng = np.random.default_rng(_SEED.value)
    print(f"{os.path.basename(_LOG.value)}: {len(p)} images, sigma={_SIGMA.value}, n_max={_N.value}, "
          f"alpha={_ALPHA.value}, {_REPS.value} repetitions; p_A from the rows: "
          f"{np.mean(p == 1):.1%} at 1, {np.mean(log.predict < 0):.1%} abstaining (p_A={_ABSTAIN_P.value})")
    for name, stages in schedules.items():
        if name.startswith("x") or name == "default":
            print(f"  {name}: {' '.join(map(str, stages))}")
    for question in _QUESTIONS.value.split(";"):
        radii = stats.check_radii([float(r) for r in question.split(",")])
        print(f"\nradii {', '.join(f'{r:g}' for r in radii)}\n")
        print("| schedule | K | mean samples | n / mean | agreement with fixed n | largest Δ cert. acc. (points) |")
        print("|---|---|---|---|---|---|")
        for name, k, mean, agreement, delta, radius in compare(p, correct, radii, schedules, _REPS.value, rng):
            print(f"| {name} | {k} | {mean:,.0f} | {_N.value / mean:.1f}x | {agreement:.2%} | "
                  f"{delta:+.2f} at r = {radius:g} |")
    print(f"\n({time.time() - began:.0f} s)")


if __name__ == "__main__":
    app.run(main)
