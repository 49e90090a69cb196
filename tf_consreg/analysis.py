"""Summaries of certification logs: ACR, certified accuracy, tables and plots.

Reads the logs that bin/certify.py writes and the authors' published ones
(both in the format of the authors' certify.py, read by `certify_log`), so
the paper's logs can be compared with ours. Certified accuracy at radius r is
the fraction of examples that are correctly classified with a certified
radius >= r (as in the authors' analyze.py); the average certified radius
(ACR) is the mean of radius * correct.

Sharded runs (bin/certify.py --num_shards=K) are reported as ONE run: the
shards given with the same settings are merged after checking that they
neither overlap nor leave gaps (`certify_log.group_runs` and
`certify_log.read_run`). Files without a settings file, such as the authors'
logs, are reported one by one.

numpy only (matplotlib for plots): no TensorFlow needed.
"""

import dataclasses
import glob
import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_consreg import files
from tf_consreg.certify_log import CertifyLog, Run, group_runs, read_run
from tf_consreg.errors import ConfigError

# 0, 0.25, ..., 2.5: the radii of the paper's tables.
DEFAULT_RADII = tuple(i / 4 for i in range(11))


@dataclasses.dataclass(frozen=True)
class Summary:
    """What the paper reports for one certification run.

    Attributes:
      file: the TSV summarized (for a sharded run, its name, see `Run.name`).
      n: number of examples.
      clean_accuracy: fraction of examples the smoothed classifier gets right.
      acr: average certified radius, mean of radius * correct.
      certified_accuracy: radius -> fraction correct with certified radius >= radius.
      files: the shard files of a sharded run, by shard index; () for one TSV.
      complete: False for a sharded run reported with gaps (--allow_incomplete).
    """

    file: str
    n: int
    clean_accuracy: float
    acr: float
    certified_accuracy: Dict[float, float]
    files: Tuple[str, ...] = ()
    complete: bool = True

    def to_json_dict(self) -> dict:
        """JSON-ready form; radii become strings such as "0.25".

        A sharded run also has "files" (its shards) and "complete".
        """
        result = {
            "file": self.file,
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "acr": self.acr,
            "certified_accuracy": {radius_key(r): a for r, a in self.certified_accuracy.items()},
        }
        if self.files:
            result.update(files=list(self.files), complete=self.complete)
        return result


def radius_key(radius: float) -> str:
    """The JSON key of a radius: Python's shortest float repr ("0.0", "0.25", "1.0")."""
    return repr(float(radius))


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
    # Loaded here, when a plot is asked for: matplotlib takes a second to import.
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

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
    with files.atomic_output(path, "wb") as f:
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
      labels: names for the runs in the table and legend (default: the paths);
        the shards of one run count once.
      allow_incomplete: report sharded runs with missing or unfinished shards
        (with a warning) instead of refusing them.
      runs: set at construction: the files grouped into runs (`group_runs`).
    """

    tsv: Sequence[str]
    radii: Sequence[float] = DEFAULT_RADII
    format: str = "markdown"
    plot: Optional[str] = None
    labels: Optional[Sequence[str]] = None
    allow_incomplete: bool = False
    runs: Tuple[Run, ...] = dataclasses.field(default=(), init=False)

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
        runs = group_runs(files)
        if self.labels and len(self.labels) != len(runs):
            what = "files" if len(runs) == len(files) else "runs (the shards of a run count once)"
            raise ConfigError(f"--labels: got {len(self.labels)} labels for {len(runs)} {what}")
        object.__setattr__(self, "tsv", tuple(files))
        object.__setattr__(self, "runs", tuple(runs))


def _expand(patterns: Sequence[str]) -> List[str]:
    """Expands glob patterns (sorted); plain names are kept as given."""
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


def analyze(config: AnalyzeConfig, warn: Optional[Callable[[str], None]] = None) -> str:
    """Reads the logs, draws the plot if asked, and returns the report text.

    One row (and curve) per run: a TSV, or the merged shards of a sharded run.

    Args:
      config: what to report.
      warn: receives a line for each incomplete run reported (see `read_run`).

    Raises:
      ConfigError: an unreadable or malformed TSV (naming file and line), or
        an incomplete sharded run without --allow_incomplete.
    """
    logs, summaries = [], []
    for run in config.runs:
        log, complete = read_run(run, config.allow_incomplete, warn)
        summary = summarize(log, config.radii)
        if run.sharded:
            summary = dataclasses.replace(summary, files=run.files, complete=complete)
        logs.append(log)
        summaries.append(summary)
    if config.plot:
        plot_certified_accuracy(logs, config.plot, config.labels)
    if config.format == "json":
        return json_report(summaries)
    labels = list(config.labels) if config.labels else [s.file for s in summaries]
    labels = [label if s.complete else f"{label} (incomplete)" for label, s in zip(labels, summaries)]
    return markdown_table(summaries, labels)
