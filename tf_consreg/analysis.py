"""Summaries of certification logs: ACR, certified accuracy, tables and plots.

Reads the logs that bin/certify.py writes and the authors' published ones
(both in the format of the authors' certify.py, read by `certify_log`), so
the paper's logs can be compared with ours. Certified accuracy at radius r is
the fraction of examples that are correctly classified with a certified
radius >= r (as in the authors' analyze.py); the average certified radius
(ACR) is the mean of radius * correct.

Fixed-radius runs (bin/certify.py --radii) decided each image only at the
radii they asked: an image stops as soon as those answers are settled, with
a certified radius smaller than full CERTIFY's. Their certified accuracy is
reported at those radii (and 0) and nowhere else, and their ACR not at all:
both would be biased low (`certified_accuracy` refuses; the table shows
"n/a"). By default a table with fixed-radius runs has the columns of the
radii they all settled, and a "samples/image" column (the mean estimation
samples; n for full CERTIFY runs with a settings file).

Sharded runs (bin/certify.py --num_shards=K) are reported as ONE run: the
shards given with the same settings are merged after checking that they
neither overlap nor leave gaps (`certify_log.group_runs` and
`certify_log.read_run`). Files without a settings file, such as the authors'
logs, are reported one by one.

Two accuracies, never confused (issue 24): "smoothed acc." is the smoothed
classifier g's accuracy on the log's examples, abstentions counted wrong,
i.e. its certified accuracy at r = 0; "base acc. (clean)", with a base model
given (`AnalyzeConfig.model`), is the base classifier f's accuracy on the
same examples without noise, read from the dataset the run's settings name.

numpy only (matplotlib for plots; TensorFlow only to run a given base
model).
"""

import dataclasses
import glob
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_consreg import certify_spec
from tf_consreg import files
from tf_consreg.certify_log import CertifyLog, Run, group_runs, read_run, read_settings
from tf_consreg.errors import ConfigError

# 0, 0.25, ..., 2.5: the radii of the paper's tables.
DEFAULT_RADII = tuple(i / 4 for i in range(11))


@dataclasses.dataclass(frozen=True)
class Summary:
    """What the paper reports for one certification run.

    Attributes:
      file: the TSV summarized (for a sharded run, its name, see `Run.name`).
      n: number of examples.
      clean_accuracy: fraction of examples the smoothed classifier gets
        right (abstaining counts as wrong): its certified accuracy at r = 0,
        "smoothed acc." in the table. Not the base model's accuracy.
      acr: average certified radius, mean of radius * correct; None for a
        fixed-radius run (it would be biased low).
      certified_accuracy: radius -> fraction correct with certified radius >= radius.
      files: the shard files of a sharded run, by shard index; () for one TSV.
      complete: False for a sharded run reported with gaps (--allow_incomplete).
      samples_per_image: mean estimation samples per example, None if unknown.
      settled_radii: the radii a fixed-radius run decided; None for full CERTIFY.
      base_accuracy: the base model's accuracy on the same examples without
        noise, "base acc. (clean)"; None when no base model was given or the
        log names no dataset (`base_accuracy`).
    """

    file: str
    n: int
    clean_accuracy: float
    acr: Optional[float]
    certified_accuracy: Dict[float, float]
    files: Tuple[str, ...] = ()
    complete: bool = True
    samples_per_image: Optional[float] = None
    settled_radii: Optional[Tuple[float, ...]] = None
    base_accuracy: Optional[float] = None

    def to_json_dict(self) -> dict:
        """JSON-ready form; radii become strings such as "0.25".

        "clean_accuracy" is the smoothed classifier's (`clean_accuracy`). A
        sharded run also has "files" (its shards) and "complete"; a run
        whose samples are known "samples_per_image"; a fixed-radius run
        "settled_radii", and "acr" null. `json_report` adds
        "base_clean_accuracy" when a base model was given.
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
        if self.samples_per_image is not None:
            result["samples_per_image"] = self.samples_per_image
        if self.settled_radii is not None:
            result["settled_radii"] = list(self.settled_radii)
        return result


def radius_key(radius: float) -> str:
    """The JSON key of a radius: Python's shortest float repr ("0.0", "0.25", "1.0")."""
    return repr(float(radius))


def check_settled(log: CertifyLog, radii: Sequence[float]) -> None:
    """Refuses a radius at which a fixed-radius run's log says nothing unbiased.

    Raises:
      ConfigError: naming the log and the first such radius.
    """
    if not log.staged:
        return
    for r in radii:
        if r != 0 and r not in log.radii:
            raise ConfigError(f"--radii: {log.path} is a fixed-radius run that decided only at r = "
                              f"{', '.join(f'{s:g}' for s in log.radii)} (and 0); its certified accuracy at r = "
                              f"{r:g} would be biased low (its images stopped once their own radii were settled). "
                              "Ask for its radii, or certify with full CERTIFY (no --radii)")


def certified_accuracy(log: CertifyLog, radii: Sequence[float]) -> np.ndarray:
    """Fraction of examples correct with certified radius >= r, for each r in radii.

    Raises:
      ConfigError: a fixed-radius run's log and a radius it did not settle (`check_settled`).
    """
    check_settled(log, radii)
    radii = np.asarray(radii, dtype=np.float64)
    return (log.correct[None, :] & (log.radius[None, :] >= radii[:, None])).mean(axis=1)


def summarize(log: CertifyLog, radii: Optional[Sequence[float]] = None) -> Summary:
    """The paper's numbers for one log: n, clean accuracy, ACR, certified accuracies.

    Args:
      log: the rows.
      radii: the certified-accuracy radii; None: DEFAULT_RADII, or a
        fixed-radius run's own radii.

    Raises:
      ConfigError: bad radii, or a radius a fixed-radius run did not settle.
    """
    radii = certify_spec.check_radii((log.radii if log.staged else DEFAULT_RADII) if radii is None else radii,
                                     allow_zero=True, name="--radii")
    accuracies = certified_accuracy(log, radii)
    return Summary(
        file=log.path,
        n=int(len(log.idx)),
        clean_accuracy=float(log.correct.mean()),
        acr=None if log.staged else float(np.mean(log.radius * log.correct)),
        certified_accuracy={r: float(a) for r, a in zip(radii, accuracies)},
        samples_per_image=None if log.samples is None else float(log.samples.mean()),
        settled_radii=log.radii,
    )


# The table's two accuracies, labelled so that neither passes for the other.
SMOOTHED_ACCURACY = "smoothed acc."
BASE_ACCURACY = "base acc. (clean)"
# Below a table with the base model's column: what each accuracy is.
ACCURACY_NOTE = (f"{SMOOTHED_ACCURACY}: the smoothed classifier's accuracy (abstentions count as wrong), its certified "
                 f"accuracy at r = 0. {BASE_ACCURACY}: the base model's accuracy on the same examples without noise "
                 "(--model); it certifies nothing.")


def markdown_table(summaries: Sequence[Summary], labels: Optional[Sequence[str]] = None, base: bool = False) -> str:
    """A Markdown table: one row per file; n, the smoothed classifier's accuracy, ACR, accuracy per radius.

    With fixed-radius runs, a "samples/image" column follows the ACR, whose
    cell is "n/a" for them; a table of fixed-radius runs only has no ACR.
    With `base`, the base model's clean accuracy follows the smoothed one
    ("n/a" for a log that names no dataset).
    """
    labels = list(labels) if labels else [s.file for s in summaries]
    radii = list(summaries[0].certified_accuracy) if summaries else []
    staged = any(s.settled_radii is not None for s in summaries)
    with_acr = not summaries or not all(s.settled_radii is not None for s in summaries)
    header = (["file", "n", SMOOTHED_ACCURACY] + [BASE_ACCURACY] * base + ["ACR"] * with_acr
              + ["samples/image"] * staged + [f"r={r:g}" for r in radii])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for label, s in zip(labels, summaries):
        cells = [label.replace("|", "\\|"), str(s.n), f"{s.clean_accuracy:.3f}"]
        if base:
            cells.append("n/a" if s.base_accuracy is None else f"{s.base_accuracy:.3f}")
        if with_acr:
            cells.append("n/a" if s.acr is None else f"{s.acr:.4f}")
        if staged:
            cells.append("n/a" if s.samples_per_image is None else f"{s.samples_per_image:,.0f}")
        cells += [f"{s.certified_accuracy[r]:.3f}" for r in radii]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def json_report(summaries: Sequence[Summary], base: bool = False) -> str:
    """The summaries as a JSON list, one object per file, in order; with `base`, each has "base_clean_accuracy"."""
    return json.dumps([{**s.to_json_dict(), **({"base_clean_accuracy": s.base_accuracy} if base else {})}
                       for s in summaries], indent=2) + "\n"


def base_accuracy(log: CertifyLog, settings: Optional[Dict[str, Any]], model: Any,
                  data_dir: Optional[str] = None, batch_size: int = 256) -> Optional[float]:
    """The base model's accuracy, without noise, on the examples of a log: None if its settings name no dataset.

    The examples are read by index from the dataset, split and mock data the
    run's settings name (`certify_log.read_settings`); their labels must be
    the log's.

    Args:
      log: the rows (their idx and label).
      settings: the run's settings, or None (the authors' logs have none).
      model: a Keras base classifier from images in [0, 1] to logits.
      data_dir: where the dataset lives (the run's --data_dir), None for the default.
      batch_size: images per forward pass.

    Raises:
      ConfigError: the dataset is missing, or its labels are not the log's (another dataset or split).
    """
    # TensorFlow only here: analyze without --model stays numpy only.
    from tf_consreg import data  # pylint: disable=import-outside-toplevel

    if not settings or "dataset" not in settings or "split" not in settings:
        return None
    if not len(log.idx):
        return None
    reader = data.open_reader(settings["dataset"], settings["split"], data_dir=data_dir,
                              mock=bool(settings.get("mock_data", False)))
    right = 0
    for ids, images, labels in reader.read(log.idx).batch(batch_size).as_numpy_iterator():
        expected = log.label[np.searchsorted(log.idx, ids)]
        if not np.array_equal(labels, expected):
            where = int(ids[np.flatnonzero(labels != expected)[0]])
            raise ConfigError(f"{log.path}: example {where} of {settings['dataset']} ({settings['split']}) is not "
                              "labelled as in the log; give the --data_dir the run certified")
        predictions = np.argmax(np.asarray(model(images, training=False)), axis=-1)
        right += int((predictions == labels).sum())
    return right / len(log.idx)


def plot_certified_accuracy(logs: Sequence[CertifyLog], path: str, labels: Optional[Sequence[str]] = None,
                            title: Optional[str] = None, replace: bool = True) -> None:
    """Draws certified accuracy against radius for all logs on one PNG figure.

    A fixed-radius run is drawn as points at 0 and its radii.

    Args:
      logs: the runs to draw.
      path: the PNG file to write (atomically).
      labels: legend entries, one per log (default: file names).
      title: optional figure title.
      replace: whether an existing `path` is replaced.

    Raises:
      FileExistsError: `replace` is False and `path` exists (nothing written).
    """
    # Loaded here, when a plot is asked for: matplotlib takes a second to import.
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    labels = list(labels) if labels else [os.path.basename(log.path) for log in logs]
    ends = [max(log.radii) if log.staged else float(log.radius.max()) for log in logs]
    max_radius = max(max(ends) * 1.05, 0.1) if logs else 1.0
    grid = np.linspace(0.0, max_radius, 1000)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for log, label in zip(logs, labels):
        if log.staged:  # Known at its radii only: points, not a curve.
            points = (0.0,) + log.radii
            ax.plot(points, certified_accuracy(log, points), label=label, marker="o", linestyle="none")
        else:
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
    try:
        with files.atomic_output(path, "wb", replace=replace) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


FORMATS = ("markdown", "json")
# Below a Markdown table with fixed-radius runs: why their ACR is missing.
STAGED_NOTE = ("No ACR for a fixed-radius run (bin/certify.py --radii): each of its examples stopped as soon as its "
               "answer at the run's radii was settled, with a smaller certified radius than full CERTIFY's, so its "
               "ACR would be biased low and not comparable; certify without --radii for an ACR.")


@dataclasses.dataclass(frozen=True)
class AnalyzeConfig:
    """What bin/analyze.py does, checked at construction (flags first, then files).

    Attributes:
      tsv: certification TSV files, or glob patterns (each must match a file).
      radii: radii of the certified-accuracy columns; None: DEFAULT_RADII,
        or, with fixed-radius runs, the radii they all settled.
      format: "markdown" or "json".
      plot: a PNG file to draw the certified-accuracy curves into, or None.
      overwrite: replace an existing `plot` (otherwise refused).
      labels: names for the runs in the table and legend (default: the paths);
        the shards of one run count once.
      allow_incomplete: report sharded runs with missing or unfinished shards
        (with a warning) instead of refusing them.
      model: a saved .keras base model: adds its clean accuracy on each
        run's examples ("base acc. (clean)"), read from the dataset its
        settings name; None: no base model column.
      data_dir: where that dataset lives (the runs' --data_dir).
      runs: set at construction: the files grouped into runs (`group_runs`).
    """

    tsv: Sequence[str]
    radii: Optional[Sequence[float]] = None
    format: str = "markdown"
    plot: Optional[str] = None
    labels: Optional[Sequence[str]] = None
    allow_incomplete: bool = False
    overwrite: bool = False
    model: Optional[str] = None
    data_dir: Optional[str] = None
    runs: Tuple[Run, ...] = dataclasses.field(default=(), init=False)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"--format={self.format!r} is unknown; choose one of {', '.join(FORMATS)}")
        if self.radii is not None:
            object.__setattr__(self, "radii", certify_spec.check_radii(self.radii, allow_zero=True, name="--radii"))
        if not self.tsv:
            raise ConfigError("--tsv: give one or more certification TSV files, e.g. --tsv=runs/a.tsv,runs/b.tsv")
        if self.plot is not None and not self.plot.lower().endswith(".png"):
            raise ConfigError(f"--plot={self.plot}: the plot is a PNG file; name it *.png")
        if self.plot is not None:
            files.check_output_path(self.plot, "plot")
            if os.path.lexists(self.plot) and not self.overwrite:
                raise ConfigError(f"--plot={self.plot} exists; pass --overwrite to replace it, or give another "
                                  "file name")
        if self.model is not None:
            files.check_input_file(self.model, "model")
            if not self.model.endswith(".keras"):
                raise ConfigError(f"--model={self.model}: give a saved .keras base model (a run's base_model.keras)")
        if self.data_dir is not None and self.model is None:
            raise ConfigError("--data_dir is used only with --model (the base model's clean accuracy)")
        paths = _expand(self.tsv)
        runs = group_runs(paths)
        if self.labels and len(self.labels) != len(runs):
            what = "files" if len(runs) == len(paths) else "runs (the shards of a run count once)"
            raise ConfigError(f"--labels: got {len(self.labels)} labels for {len(runs)} {what}")
        object.__setattr__(self, "tsv", tuple(paths))
        object.__setattr__(self, "runs", tuple(runs))


def _expand(patterns: Sequence[str]) -> List[str]:
    """Expands glob patterns (sorted); plain names are kept as given."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"--tsv: no file matches {pattern!r}")
        for path in matches:
            files.check_input_file(path, "tsv", directory_hint="give the TSV files in it, e.g. "
                                   f"'{os.path.join(path, '*.tsv')}'")
        paths.extend(matches)
    return paths


def table_radii(logs: Sequence[CertifyLog]) -> Tuple[float, ...]:
    """The default certified-accuracy radii of a table of `logs`.

    DEFAULT_RADII when every log is full CERTIFY's; otherwise the radii every
    fixed-radius run among them settled (full CERTIFY runs can be read at any).

    Raises:
      ConfigError: the fixed-radius runs settled no radius in common.
    """
    staged = [log for log in logs if log.staged]
    if not staged:
        return DEFAULT_RADII
    common = sorted(set.intersection(*(set(log.radii) for log in staged)))
    if not common:
        raise ConfigError("the fixed-radius runs " + ", ".join(
            f"{log.path} (r = {', '.join(f'{r:g}' for r in log.radii)})" for log in staged)
            + " decided at no radius in common; analyze them apart, or give --radii=0 for one table")
    return tuple(common)


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
    logs, completes = [], []
    for run in config.runs:
        log, complete = read_run(run, config.allow_incomplete, warn)
        logs.append(log)
        completes.append(complete)
    radii = table_radii(logs) if config.radii is None else config.radii
    model = None
    if config.model is not None:
        from tf_consreg import models  # pylint: disable=import-outside-toplevel  TensorFlow with --model only.
        model = models.load_base_model(config.model, compute_dtype="float32")
    summaries = []
    for run, log, complete in zip(config.runs, logs, completes):
        summary = summarize(log, radii)
        if run.sharded:
            summary = dataclasses.replace(summary, files=run.files, complete=complete)
        if model is not None:
            summary = dataclasses.replace(summary, base_accuracy=base_accuracy(
                log, read_settings(run.files[0]), model, config.data_dir))
        summaries.append(summary)
    if config.plot:
        try:  # AnalyzeConfig refused an existing plot; this catches one made since.
            plot_certified_accuracy(logs, config.plot, config.labels, replace=config.overwrite)
        except FileExistsError:
            raise ConfigError(f"--plot={config.plot} exists; pass --overwrite to replace it, or give another "
                              "file name") from None
    base = model is not None
    if config.format == "json":
        return json_report(summaries, base=base)
    labels = list(config.labels) if config.labels else [s.file for s in summaries]
    labels = [label if s.complete else f"{label} (incomplete)" for label, s in zip(labels, summaries)]
    table = markdown_table(summaries, labels, base=base)
    if base:
        table += "\n" + ACCURACY_NOTE + "\n"
    if any(s.settled_radii is not None for s in summaries):
        table += "\n" + STAGED_NOTE + "\n"
    return table
