"""Summaries of certification logs: ACR, certified accuracy, tables and plots.

Reads the TSV files that bin/certify.py writes, which have the format of the
authors' certify.py (`idx label predict radius correct time`, predict = -1
when abstaining), so the paper's published logs can be compared with ours.
Certified accuracy at radius r is the fraction of examples that are correctly
classified with a certified radius >= r (as in the authors' analyze.py); the
average certified radius (ACR) is the mean of radius * correct.

Sharded runs (bin/certify.py --num_shards=K) are reported as ONE run: a TSV
whose settings file (`<tsv>.json`, written by bin/certify.py) says
num_shards > 1 is a shard, and the shards given with the same settings (all
but shard_index) are merged, after checking that they neither overlap nor
leave gaps (see `group_runs` and `read_run`). Files without a settings file,
such as the authors' logs, are reported one by one, as before.

numpy only (matplotlib for plots): no TensorFlow needed.
"""

import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_consreg import files
from tf_consreg.errors import ConfigError

CERTIFY_HEADER = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_HEADER = ("idx", "label", "predict", "correct", "time")

# 0, 0.25, ..., 2.5: the radii of the paper's tables.
DEFAULT_RADII = tuple(i / 4 for i in range(11))
# The settings file bin/certify.py writes beside each TSV (smoothing.SETTINGS_SUFFIX).
SETTINGS_SUFFIX = ".json"


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


# --------------------------------------------------------------------------
# Sharded runs: the shard files of one bin/certify.py --num_shards=K run.


def read_shard_settings(path: str) -> Optional[Dict[str, Any]]:
    """The settings of `path` if it is a shard of a sharded run, else None.

    A shard is a TSV beside a bin/certify.py settings file (`path` +
    SETTINGS_SUFFIX) with num_shards > 1. Files without one (the authors'
    logs) and unsharded runs give None.

    Raises:
      ConfigError: the settings file exists but is unreadable or inconsistent.
    """
    sidecar = path + SETTINGS_SUFFIX
    if not os.path.isfile(sidecar):
        return None
    try:
        with open(sidecar, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{sidecar}: unreadable settings file of {path} ({e}); fix or remove it") from e
    if not isinstance(settings, dict):
        raise ConfigError(f"{sidecar}: the settings file of {path} is not a JSON object; fix or remove it")
    num_shards = settings.get("num_shards", 1)
    if num_shards == 1:
        return None
    shard_index, skip = settings.get("shard_index"), settings.get("skip", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (num_shards, shard_index, skip)) or not (
            num_shards > 1 and 0 <= shard_index < num_shards and skip >= 1):
        raise ConfigError(f"{sidecar}: num_shards={num_shards!r}, shard_index={shard_index!r}, skip={skip!r} "
                          "are not a shard of a run; fix or remove it")
    return settings


@dataclasses.dataclass(frozen=True)
class Run:
    """The files reported as one row: a TSV, or the shards of one sharded run.

    Attributes:
      files: the TSVs; a sharded run's in shard order.
      num_shards: K of a sharded run; 1 for a single TSV.
      shard_indices: the shard index of each file ((0,) for a single TSV).
      skip: the run's --skip (every skip-th example was selected).
    """

    files: Tuple[str, ...]
    num_shards: int = 1
    shard_indices: Tuple[int, ...] = (0,)
    skip: int = 1

    @property
    def sharded(self) -> bool:
        return self.num_shards > 1

    @property
    def name(self) -> str:
        """The files as one name: `dir/certify.shard{0,1,2}.tsv` (the shell's brace form)."""
        if len(self.files) == 1:
            return self.files[0]
        # Whole numbers stay in the braces: shard{1,10,11}, not shard1{,0,1}.
        prefix = os.path.commonprefix(self.files).rstrip("0123456789")
        rests = [f[len(prefix):] for f in self.files]
        suffix = os.path.commonprefix([r[::-1] for r in rests])[::-1]
        suffix = suffix[len(suffix) - len(suffix.lstrip("0123456789")):]
        middles = [r[:len(r) - len(suffix)] for r in rests]
        return f"{prefix}{{{','.join(middles)}}}{suffix}"


def comparable_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The settings two runs must share to be one run (or for one to resume the other).

    The model is compared by the SHA-256 of its file when the settings hold
    it, not by its path: shards certified on hosts that keep the model at
    other paths belong together. Settings files written before the digest
    was recorded are compared by path.
    """
    if "model_sha256" in settings:
        return {k: v for k, v in settings.items() if k != "model"}
    return settings


def _settings_differences(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if k != "shard_index" and a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def group_runs(paths: Sequence[str]) -> List[Run]:
    """Groups files into the runs to report, in the order the files are given.

    A file that is not a shard (see `read_shard_settings`) is a run of its own,
    even when given twice. Shards whose settings are equal except for
    `shard_index` form one run, placed where its first file is.

    Raises:
      ConfigError (one line naming the files): two files are the same shard of
        one run (they overlap), or shards of the same num_shards come from
        runs of different settings (sigma, n0, n, alpha, model, seed, ...)
        while holding disjoint sets of shard indices: shards of one run were
        meant, but certified with other flags.
    """
    groups: List[Tuple[Dict[str, Any], List[Tuple[int, str]]]] = []
    order: List[Any] = []
    for path in paths:
        settings = read_shard_settings(path)
        if settings is None:
            order.append(path)
            continue
        key = {k: v for k, v in comparable_settings(settings).items() if k != "shard_index"}
        for group_key, members in groups:
            if group_key == key:
                break
        else:
            members = []
            groups.append((key, members))
            order.append(len(groups) - 1)
        for index, other in members:
            if index == settings["shard_index"]:
                shard = f"shard {index} of {key['num_shards']}"
                what = (f"is given twice ({shard})" if other == path
                        else f"and {path} are both {shard} of one run: they overlap")
                raise ConfigError(f"{other} {what}, the same examples twice; give each shard once")
        members.append((settings["shard_index"], path))

    for i, (key_a, members_a) in enumerate(groups):
        for key_b, members_b in groups[i + 1:]:
            k = key_a["num_shards"]
            indices_a, indices_b = {i for i, _ in members_a}, {i for i, _ in members_b}
            # Disjoint shard sets: neither run is complete, and together they look like one.
            if key_b["num_shards"] == k and not indices_a & indices_b:
                (index_a, a), (index_b, b) = members_a[0], members_b[0]
                raise ConfigError(f"{a} (shard {index_a} of {k}) and {b} (shard {index_b} of {k}) come from runs "
                                  f"with different settings ({_settings_differences(key_a, key_b)}): shards of "
                                  "one run need the same flags but --shard_index; give the shards of each run")

    runs = []
    for item in order:
        if isinstance(item, str):
            runs.append(Run(files=(item,)))
            continue
        key, members = groups[item]
        members = sorted(members)
        runs.append(Run(files=tuple(p for _, p in members), num_shards=key["num_shards"],
                        shard_indices=tuple(i for i, _ in members), skip=key.get("skip", 1)))
    return runs


def read_run(run: Run, allow_incomplete: bool = False,
             warn: Optional[Callable[[str], None]] = None) -> Tuple[CertifyLog, bool]:
    """Reads a run's TSVs into one log, rows by example index.

    The shards of a run are complete when together they hold the first N
    selected examples, for some N, without gaps: every shard given, none
    lagging behind. (Whether N is all that was meant to be certified, i.e.
    --max, is not recorded; the report's n says how many there are.)

    Args:
      run: from `group_runs`.
      allow_incomplete: report a sharded run with missing or unfinished
        shards (with a warning) instead of refusing it.
      warn: called with the warning's text (default: print to stderr).

    Returns:
      (the log, whether the run is complete).

    Raises:
      ConfigError: a malformed TSV, a shard holding rows of another shard, or
        an incomplete sharded run without `allow_incomplete`.
    """
    if not run.sharded:
        return read_certify_tsv(run.files[0]), True
    k, logs = run.num_shards, [read_certify_tsv(path) for path in run.files]
    for log, index in zip(logs, run.shard_indices):
        expected = (index + k * np.arange(len(log.idx))) * run.skip
        wrong = np.flatnonzero(log.idx != expected)
        if wrong.size:
            row = int(wrong[0])
            raise ConfigError(f"{log.path}:{row + 2}: example {log.idx[row]} where shard {index} of {k} (skip "
                              f"{run.skip}) has example {expected[row]}: not a shard written by bin/certify.py")

    # The run's extent: the furthest position reached in the selection; every
    # shard should hold each of its positions below it.
    rows = dict(zip(run.shard_indices, (len(log.idx) for log in logs)))
    extent = max((rows[i] - 1) * k + i + 1 for i in rows)
    missing = [i for i in range(k) if i not in rows]
    expected = {i: -(-(extent - i) // k) for i in range(k)}  # ceil((extent - i) / k)
    lagging = [(i, path) for i, path in zip(run.shard_indices, run.files) if rows[i] < expected[i]]
    problems = []
    if missing:
        problems.append(f"shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {k} "
                        f"{'are' if len(missing) > 1 else 'is'} missing")
    if lagging:
        last = (extent - 1) * run.skip
        problems.append(", ".join(f"{path} is unfinished ({rows[i]} of its {expected[i]} rows up to example {last}, "
                                  "where other shards are)" for i, path in lagging))
    merged = CertifyLog(path=run.name, **{
        column: np.concatenate([getattr(log, column) for log in logs])
        for column in ("idx", "label", "predict", "radius", "correct")})
    order = np.argsort(merged.idx, kind="stable")
    merged = dataclasses.replace(merged, **{
        column: getattr(merged, column)[order] for column in ("idx", "label", "predict", "radius", "correct")})
    if problems:
        reason = "; ".join(problems)
        if not allow_incomplete:
            raise ConfigError(f"{run.name}: incomplete sharded run: {reason}; give every shard and finish them "
                              f"(rerun their bin/certify.py commands), or pass --allow_incomplete to report the "
                              f"{len(merged.idx)} examples there are")
        message = f"{run.name}: incomplete sharded run ({reason}); reporting its {len(merged.idx)} examples"
        if warn is None:
            print(f"warning: {message}", file=sys.stderr)
        else:
            warn(message)
    return merged, not problems


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
