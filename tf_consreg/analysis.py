"""Summaries of certification logs: ACR, certified accuracy, tables and plots.

Reads the TSV files that bin/certify.py writes, which have the format of the
authors' certify.py (`idx label predict radius correct time`, predict = -1
when abstaining), so the paper's published logs can be compared with ours.
Certified accuracy at radius r is the fraction of examples that are correctly
classified with a certified radius >= r (as in the authors' analyze.py); the
average certified radius (ACR) is the mean of radius * correct.

numpy only (matplotlib for plots): no TensorFlow needed.
"""

import dataclasses
import json
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from tf_consreg.errors import ConfigError

CERTIFY_HEADER = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_HEADER = ("idx", "label", "predict", "correct", "time")

# 0, 0.25, ..., 2.5: the radii of the paper's tables.
DEFAULT_RADII = tuple(i / 4 for i in range(11))


@dataclasses.dataclass(frozen=True)
class CertifyLog:
    """The rows of one certification TSV, as columns.

    Attributes:
      path: the file read.
      idx: int64 [N] example indices.
      label: int64 [N] true labels.
      predict: int64 [N] predictions of the smoothed classifier, -1 = abstain.
      radius: float64 [N] certified radii (0 when abstaining).
      correct: bool [N], predict == label.
    """

    path: str
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray


@dataclasses.dataclass(frozen=True)
class Summary:
    """What the paper reports for one certification run.

    Attributes:
      file: the TSV summarized.
      n: number of examples.
      clean_accuracy: fraction of examples the smoothed classifier gets right.
      acr: average certified radius, mean of radius * correct.
      certified_accuracy: radius -> fraction correct with certified radius >= radius.
    """

    file: str
    n: int
    clean_accuracy: float
    acr: float
    certified_accuracy: Dict[float, float]

    def to_json_dict(self) -> dict:
        """JSON-ready form; radii become strings such as "0.25"."""
        return {
            "file": self.file,
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "acr": self.acr,
            "certified_accuracy": {radius_key(r): a for r, a in self.certified_accuracy.items()},
        }


def radius_key(radius: float) -> str:
    """The JSON key of a radius: Python's shortest float repr ("0.0", "0.25", "1.0")."""
    return repr(float(radius))


def _parse_row(fields: List[str], path: str, line_number: int) -> tuple:
    where = f"{path}:{line_number}"
    if len(fields) != len(CERTIFY_HEADER):
        raise ConfigError(f"{where}: expected {len(CERTIFY_HEADER)} tab-separated fields, got {len(fields)}")
    try:
        idx, label, predict, correct = (int(fields[i]) for i in (0, 1, 2, 4))
        radius = float(fields[3])
    except ValueError as e:
        raise ConfigError(f"{where}: malformed row ({e})") from e
    if idx < 0 or label < 0 or predict < -1:
        raise ConfigError(f"{where}: idx and label must be >= 0 and predict >= -1")
    if not (math.isfinite(radius) and radius >= 0):
        raise ConfigError(f"{where}: radius must be a finite number >= 0, got {fields[3]}")
    if correct != int(predict == label):
        raise ConfigError(f"{where}: correct={correct} contradicts label={label}, predict={predict}")
    return idx, label, predict, radius, correct


def read_certify_tsv(path: str) -> CertifyLog:
    """Reads a certification TSV (ours or the authors').

    Args:
      path: a TSV with the header `idx label predict radius correct time`.

    Returns:
      Its rows as a `CertifyLog`.

    Raises:
      ConfigError: the file is unreadable, has another header, no rows, or a
        malformed row; the message names the file and line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from e
    if lines and lines[-1] == "":
        lines.pop()  # The final newline.
    if not lines:
        raise ConfigError(f"{path}:1: empty file; expected the header {' '.join(CERTIFY_HEADER)}")
    header = tuple(lines[0].rstrip("\r").split("\t"))
    if header != CERTIFY_HEADER:
        hint = " (a bin/predict.py log has no radii)" if header == PREDICT_HEADER else ""
        raise ConfigError(f"{path}:1: header must be the tab-separated columns {' '.join(CERTIFY_HEADER)}, "
                          f"got {' '.join(header)!r}{hint}")
    if len(lines) == 1:
        raise ConfigError(f"{path}: no rows after the header")
    rows = [_parse_row(line.rstrip("\r").split("\t"), path, number)
            for number, line in enumerate(lines[1:], start=2)]
    idx, label, predict, radius, correct = (np.array(column) for column in zip(*rows))
    return CertifyLog(path=path, idx=idx.astype(np.int64), label=label.astype(np.int64),
                      predict=predict.astype(np.int64), radius=radius.astype(np.float64),
                      correct=correct.astype(bool))


def check_radii(radii: Sequence[float]) -> tuple:
    """Validates radii for the table: finite, >= 0, at least one.

    Raises:
      ConfigError: naming --radii.
    """
    radii = tuple(float(r) for r in radii)
    if not radii:
        raise ConfigError("--radii: give at least one radius, e.g. --radii=0,0.5,1")
    for r in radii:
        if not (math.isfinite(r) and r >= 0):
            raise ConfigError(f"--radii: radii must be finite and >= 0, got {r}")
    return radii


def certified_accuracy(log: CertifyLog, radii: Sequence[float]) -> np.ndarray:
    """Fraction of examples correct with certified radius >= r, for each r in radii."""
    radii = np.asarray(radii, dtype=np.float64)
    return (log.correct[None, :] & (log.radius[None, :] >= radii[:, None])).mean(axis=1)


def summarize(log: CertifyLog, radii: Sequence[float] = DEFAULT_RADII) -> Summary:
    """The paper's numbers for one log: n, clean accuracy, ACR, certified accuracies."""
    radii = check_radii(radii)
    accuracies = certified_accuracy(log, radii)
    return Summary(
        file=log.path,
        n=int(len(log.idx)),
        clean_accuracy=float(log.correct.mean()),
        acr=float(np.mean(log.radius * log.correct)),
        certified_accuracy={r: float(a) for r, a in zip(radii, accuracies)},
    )


def markdown_table(summaries: Sequence[Summary], labels: Optional[Sequence[str]] = None) -> str:
    """A Markdown table: one row per file; n, clean accuracy, ACR, accuracy per radius."""
    labels = list(labels) if labels else [s.file for s in summaries]
    radii = list(summaries[0].certified_accuracy) if summaries else []
    header = ["file", "n", "clean acc.", "ACR"] + [f"r={r:g}" for r in radii]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for label, s in zip(labels, summaries):
        cells = [label.replace("|", "\\|"), str(s.n), f"{s.clean_accuracy:.3f}", f"{s.acr:.4f}"]
        cells += [f"{s.certified_accuracy[r]:.3f}" for r in radii]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def json_report(summaries: Sequence[Summary]) -> str:
    """The summaries as a JSON list, one object per file, in order."""
    return json.dumps([s.to_json_dict() for s in summaries], indent=2) + "\n"


def plot_certified_accuracy(logs: Sequence[CertifyLog], path: str, labels: Optional[Sequence[str]] = None,
                            title: Optional[str] = None) -> None:
    """Draws certified accuracy against radius for all logs on one PNG figure.

    Args:
      logs: the runs to draw.
      path: the PNG file to write (atomically).
      labels: legend entries, one per log (default: file names).
      title: optional figure title.
    """
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    from tf_consreg import cli  # pylint: disable=import-outside-toplevel

    labels = list(labels) if labels else [os.path.basename(log.path) for log in logs]
    max_radius = max(float(log.radius.max()) for log in logs) if logs else 1.0
    max_radius = max(max_radius * 1.05, 0.1)
    grid = np.linspace(0.0, max_radius, 1000)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for log, label in zip(logs, labels):
        ax.plot(grid, certified_accuracy(log, grid), label=label, linewidth=1.8)
    ax.set_xlim(0, max_radius)
    ax.set_ylim(0, 1)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    with cli.atomic_output(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


FORMATS = ("markdown", "json")


@dataclasses.dataclass(frozen=True)
class AnalyzeConfig:
    """What bin/analyze.py does, checked at construction (flags first, then files).

    Attributes:
      tsv: certification TSV files, or glob patterns (each must match a file).
      radii: radii of the certified-accuracy columns.
      format: "markdown" or "json".
      plot: a PNG file to draw the certified-accuracy curves into, or None.
      labels: names for the files in the table and legend (default: the paths).
    """

    tsv: Sequence[str]
    radii: Sequence[float] = DEFAULT_RADII
    format: str = "markdown"
    plot: Optional[str] = None
    labels: Optional[Sequence[str]] = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"--format={self.format!r} is unknown; choose one of {', '.join(FORMATS)}")
        object.__setattr__(self, "radii", check_radii(self.radii))
        if not self.tsv:
            raise ConfigError("--tsv: give one or more certification TSV files, e.g. --tsv=runs/a.tsv,runs/b.tsv")
        if self.plot is not None and not self.plot.lower().endswith(".png"):
            raise ConfigError(f"--plot={self.plot}: the plot is a PNG file; name it *.png")
        if self.plot is not None and os.path.isdir(self.plot):
            raise ConfigError(f"--plot={self.plot} is a directory; give a .png file name")
        files = _expand(self.tsv)
        if self.labels and len(self.labels) != len(files):
            raise ConfigError(f"--labels: got {len(self.labels)} labels for {len(files)} files")
        object.__setattr__(self, "tsv", tuple(files))


def _expand(patterns: Sequence[str]) -> List[str]:
    """Expands glob patterns (sorted); plain names are kept as given."""
    import glob  # pylint: disable=import-outside-toplevel

    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ConfigError(f"--tsv: no file matches {pattern!r}")
            files.extend(matches)
        else:
            if not os.path.isfile(pattern):
                raise ConfigError(f"--tsv: {pattern} not found")
            files.append(pattern)
    return files


def analyze(config: AnalyzeConfig) -> str:
    """Reads the logs, draws the plot if asked, and returns the report text.

    Raises:
      ConfigError: an unreadable or malformed TSV (naming file and line).
    """
    logs = [read_certify_tsv(path) for path in config.tsv]
    summaries = [summarize(log, config.radii) for log in logs]
    if config.plot:
        plot_certified_accuracy(logs, config.plot, config.labels)
    if config.format == "json":
        return json_report(summaries)
    return markdown_table(summaries, config.labels)
