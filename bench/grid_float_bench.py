r"""Grid noise against float noise on the same images: does the sound sampler change the certificates?

Reads two full-CERTIFY TSVs of one model on the same images, one certified
with `bin/certify.py --noise=float` and one with `--noise=grid`, whose
settings (sigma, n0, n, alpha, model, images, ...) differ in the noise mode
alone, and prints as Markdown what issue 20 asks of them:
- each run's clean accuracy (certified accuracy at r = 0), ACR and certified
  accuracy at --radii, and grid minus float (`analysis.summarize`);
- the relative ACR difference, (ACR_grid - ACR_float) / ACR_float, against
  --acr_tolerance;
- the share of images with the same prediction (abstentions included: an
  image abstained on in one mode and not the other counts as different),
  against --min_same_prediction;
- the paired standard error of the ACR difference: with d_i = radius_i *
  correct_i under grid minus the same under float, for the N images,
  SE = std(d, ddof=1) / sqrt(N), the standard error of the mean of d with
  the images as a sample of the test set. Each d_i carries the image's
  Monte Carlo noise (the two modes draw different noise) and the d_i are
  independent (each image draws its own), so a difference within about 2 SE
  is what chance alone gives. Pairing removes what both modes share (which
  images are hard), so this SE is far smaller than each run's own ACR
  standard error, std(radius * correct, ddof=1) / sqrt(N), printed beside
  it for scale.

Example (FM-15: 500 test images, every 20th, n0 = 100, n = 10,000):

  python bin/certify.py --model_dir=runs/fm15_consistency_0.50 --skip=20 --n=10000 \
      --noise=float --output=runs/fm15_consistency_0.50/certify_n10k_float.tsv
  python bin/certify.py --model_dir=runs/fm15_consistency_0.50 --skip=20 --n=10000 \
      --noise=grid --output=runs/fm15_consistency_0.50/certify_n10k_grid.tsv
  python bench/grid_float_bench.py \
      --float_tsv=runs/fm15_consistency_0.50/certify_n10k_float.tsv \
      --grid_tsv=runs/fm15_consistency_0.50/certify_n10k_grid.tsv
"""

import dataclasses
import math
from typing import Optional, Sequence, Tuple

from absl import flags
import numpy as np

from tf_consreg import analysis
from tf_consreg import certify_log
from tf_consreg import certify_spec
from tf_consreg import cli
from tf_consreg.errors import ConfigError

_FLOAT_TSV = flags.DEFINE_string("float_tsv", None, "TSV of bin/certify.py --noise=float.", required=True)
_GRID_TSV = flags.DEFINE_string("grid_tsv", None, "TSV of bin/certify.py --noise=grid: the same run but the noise.",
                                required=True)
_RADII = flags.DEFINE_list("radii", ["0", "0.25", "0.5", "0.75", "1.0"],
                           "Radii of the certified-accuracy columns (0 is the clean accuracy).")
_ACR_TOLERANCE = flags.DEFINE_float("acr_tolerance", 0.005, "Target: |relative ACR difference| at most this.")
_MIN_SAME_PREDICTION = flags.DEFINE_float("min_same_prediction", 0.99,
                                          "Target: at least this share of images with the same prediction.")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Grid against float on the same images.

    Attributes:
      float_summary, grid_summary: `analysis.summarize` of each log.
      relative_acr_difference: (ACR_grid - ACR_float) / ACR_float; None when ACR_float is 0.
      same_prediction: share of images whose prediction (or abstention) is the same.
      acr_difference_se: paired standard error of ACR_grid - ACR_float (module docstring).
      float_acr_se, grid_acr_se: each run's own ACR standard error over the images.
    """

    float_summary: analysis.Summary
    grid_summary: analysis.Summary
    relative_acr_difference: Optional[float]
    same_prediction: float
    acr_difference_se: float
    float_acr_se: float
    grid_acr_se: float


def _mean_se(values: np.ndarray) -> float:
    """Standard error of the mean of `values` (sample standard deviation / sqrt(N))."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def read_pair(float_path: str, grid_path: str) -> Tuple[certify_log.CertifyLog, certify_log.CertifyLog]:
    """Reads the two logs and checks that they are one run but the noise mode.

    Raises:
      ConfigError: one line naming the file: no settings file, the wrong noise
        mode, other settings differing, a fixed-radius log, or other images.
    """
    settings = {}
    for path, mode in ((float_path, "float"), (grid_path, "grid")):
        found = certify_log.read_settings(path)
        if found is None:
            raise ConfigError(f"{path}: no settings file ({certify_log.settings_path(path)}); cannot tell its noise "
                              "mode: give a TSV that bin/certify.py wrote")
        got = certify_log.comparable_settings(found)["noise"]
        if got != mode:
            raise ConfigError(f"{path}: certified with --noise={got}, expected --noise={mode}")
        settings[mode] = {k: v for k, v in found.items() if k != "noise"}
    differences = certify_log.settings_differences(settings["float"], settings["grid"])
    if differences:
        raise ConfigError(f"{grid_path}: its run differs from {float_path}'s in more than the noise mode "
                          f"({differences}); certify both with the same flags but --noise")
    logs = certify_log.read_certify_tsv(float_path), certify_log.read_certify_tsv(grid_path)
    for log in logs:
        if log.staged:
            raise ConfigError(f"{log.path}: a fixed-radius run has no ACR; compare full CERTIFY runs (no --radii)")
    if not np.array_equal(logs[0].idx, logs[1].idx):
        raise ConfigError(f"{grid_path}: holds examples {len(logs[1].idx)} other than {float_path}'s "
                          f"{len(logs[0].idx)}; let both runs finish")
    return logs


def compare(float_log: certify_log.CertifyLog, grid_log: certify_log.CertifyLog,
            radii: Sequence[float]) -> Comparison:
    """Grid against float, row by row (the logs hold the same examples in the same order)."""
    float_summary, grid_summary = analysis.summarize(float_log, radii), analysis.summarize(grid_log, radii)
    float_terms, grid_terms = float_log.radius * float_log.correct, grid_log.radius * grid_log.correct
    return Comparison(
        float_summary=float_summary,
        grid_summary=grid_summary,
        relative_acr_difference=((grid_summary.acr - float_summary.acr) / float_summary.acr
                                 if float_summary.acr else None),
        same_prediction=float(np.mean(float_log.predict == grid_log.predict)),
        acr_difference_se=_mean_se(grid_terms - float_terms),
        float_acr_se=_mean_se(float_terms),
        grid_acr_se=_mean_se(grid_terms),
    )


def markdown(c: Comparison, acr_tolerance: float, min_same_prediction: float) -> str:
    """The comparison as a Markdown table and a verdict per target."""
    radii = list(c.float_summary.certified_accuracy)
    header = ["noise", "images", "ACR", "ACR's SE"] + [
        "clean acc." if r == 0 else f"cert. acc. @{r:g}" for r in radii]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, s, se in (("float", c.float_summary, c.float_acr_se), ("grid", c.grid_summary, c.grid_acr_se)):
        lines.append("| " + " | ".join([name, str(s.n), f"{s.acr:.4f}", f"{se:.4f}"]
                                       + [f"{s.certified_accuracy[r]:.3f}" for r in radii]) + " |")
    difference = c.grid_summary.acr - c.float_summary.acr
    lines.append("| " + " | ".join(
        ["grid - float", "", f"{difference:+.4f}", f"{c.acr_difference_se:.4f} (paired)"]
        + [f"{c.grid_summary.certified_accuracy[r] - c.float_summary.certified_accuracy[r]:+.3f}"
           for r in radii]) + " |")
    acr_ok = c.relative_acr_difference is not None and abs(c.relative_acr_difference) <= acr_tolerance
    relative = ("undefined (float's ACR is 0)" if c.relative_acr_difference is None
                else f"{c.relative_acr_difference:+.3%}")
    in_se = (f"{difference / c.acr_difference_se:+.2f} paired standard errors" if c.acr_difference_se
             else f"{difference:+.4f} with a paired standard error of 0")
    same_ok = c.same_prediction >= min_same_prediction
    lines += [
        "",
        f"- relative ACR difference (grid - float) / float: {relative} "
        f"(target: within {acr_tolerance:.1%}: {'met' if acr_ok else 'NOT met'}); the difference is {in_se}",
        f"- same prediction (abstentions included): {c.same_prediction:.1%} of {c.float_summary.n} images "
        f"(target: at least {min_same_prediction:.0%}: {'met' if same_ok else 'NOT met'})",
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    radii = certify_spec.check_radii([float(r) for r in _RADII.value], allow_zero=True, name="--radii")
    float_log, grid_log = read_pair(_FLOAT_TSV.value, _GRID_TSV.value)
    settings = certify_log.read_settings(_FLOAT_TSV.value)
    shown = ", ".join(f"{k} = {settings[k]}" for k in ("sigma", "n0", "n", "alpha", "skip") if k in settings)
    print(f"{_FLOAT_TSV.value} against {_GRID_TSV.value} ({shown})\n")
    print(markdown(compare(float_log, grid_log, radii), _ACR_TOLERANCE.value, _MIN_SAME_PREDICTION.value), end="")


if __name__ == "__main__":
    cli.run(main)  # A bad flag or file: one line, exit 2.
