"""The certification log: the TSV that bin/certify.py and bin/predict.py write, and its settings file.

This module is the one definition of the format, for the writer
(`certify_run.certify_dataset`) and the readers (`analysis`):

- A log is a TSV with the columns of the authors' certify.py and predict.py,
  `idx label predict radius correct time` for CERTIFY and
  `idx label predict correct time` for PREDICT (predict = -1: abstain, radius
  0), one row per example (`header_line`, `format_row`).
- A staged run (fixed-radius CERTIFY, `--radii`; staged PREDICT, `--stages`)
  adds one last column, `samples`: the estimation samples the example used
  (its stopping stage). Its mode is "certify_staged" or "predict_staged". It
  is the last column so that readers that take the authors' columns by name
  (their analyze.py, pandas) or by position read a staged log as they read
  any other. Full CERTIFY and PREDICT logs do not get it: every row would say
  n, which the settings file holds; without it they stay byte for byte the
  authors' format, and logs written before staged runs existed resume and
  merge as before.
- A staged CERTIFY log prints each radius rounded DOWN to 3 significant
  digits (`format_radius`), never up: its radii have at most 3 significant
  digits (`certify_spec.check_radii`), so "printed radius >= r" is exactly the
  run's decision "certified at r" for each radius r it asked, and reading
  the log back can never certify an image the run did not. (Full CERTIFY
  logs keep the authors' round-to-nearest "{:.3}".)
- Beside each log of ours, `<tsv>.json` (the settings file) holds the
  settings of the run that wrote it (`certify_run.CertifyConfig.settings`).
  A run resumes a log only if their settings are comparable
  (`comparable_settings`, `settings_differences`), and the shards of a
  sharded run (`--num_shards=K`) are found and merged by them
  (`read_shard_settings`, `group_runs`, `read_run`).
- `read_certify_tsv` reads a CERTIFY log, ours or the authors', into a
  `CertifyLog`; logs without a settings file (the authors') are single runs.

numpy and the standard library only: no TensorFlow needed.
"""

import dataclasses
import datetime
import decimal
import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_consreg import certify_spec
from tf_consreg import files
from tf_consreg.errors import ConfigError

# Exactly the authors' certify.py and predict.py headers, by mode; staged
# runs add the column `samples` (the module docstring says why last).
CERTIFY_HEADER = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_HEADER = ("idx", "label", "predict", "correct", "time")
SAMPLES_COLUMN = "samples"
HEADERS = {"certify": CERTIFY_HEADER, "predict": PREDICT_HEADER,
           "certify_staged": CERTIFY_HEADER + (SAMPLES_COLUMN,), "predict_staged": PREDICT_HEADER + (SAMPLES_COLUMN,)}
MODES = tuple(HEADERS)
# The radius column's significant digits (the authors' "{:.3}").
RADIUS_DIGITS = 3
# The settings file beside each log: `<tsv>` + SETTINGS_SUFFIX.
SETTINGS_SUFFIX = ".json"


def staged_mode(mode: str) -> str:
    """The log mode of a staged run of `mode` ("certify" -> "certify_staged", "predict" -> "predict_staged")."""
    return f"{mode}_staged"


def header_line(mode: str) -> str:
    """The first line of a log of `mode` (one of MODES), without its newline."""
    return "\t".join(HEADERS[mode])


def format_radius(radius: float, round_down: bool = False) -> str:
    """A radius as the log prints it: 3 significant digits ("{:.3}", the authors' format).

    Args:
      radius: the certified radius, finite and >= 0.
      round_down: round down rather than to nearest, so that the printed
        value read back is <= radius (staged logs; see the module docstring).
    """
    text = f"{float(radius):.{RADIUS_DIGITS}}"
    if round_down and float(text) > radius:
        # Decimal(radius) is the float's exact value: no rounding on the way.
        exact = decimal.Decimal(float(radius))
        floor = exact.quantize(decimal.Decimal(1).scaleb(exact.adjusted() - RADIUS_DIGITS + 1),
                               rounding=decimal.ROUND_FLOOR)
        # floor <= radius, so the float nearest to it is too (radius is a float).
        text = f"{float(floor):.{RADIUS_DIGITS}}"
    return text


def format_row(mode: str, idx: int, label: int, prediction: int, radius: float, seconds: float,
               samples: Optional[int] = None) -> str:
    """One row of a log, with its newline, as the authors print it (plus `samples` in a staged log).

    Args:
      mode: one of MODES; the predict modes have no radius column.
      idx: the example's index in its split.
      label: its true class.
      prediction: the smoothed classifier's class, -1 = abstain.
      radius: the certified radius (0 when abstaining); printed with 3
        significant digits ("{:.3}") as the authors do; rounded down in a
        staged log (`format_radius`).
      seconds: the time spent on the example, printed as H:MM:SS.ffffff.
      samples: the estimation samples used; required in a staged log, else None.

    Raises:
      ValueError: `samples` given for a log without the column, or missing for one with it.
    """
    staged = SAMPLES_COLUMN in HEADERS[mode]
    if staged != (samples is not None):
        raise ValueError(f"a {mode} row {'needs' if staged else 'has no'} samples")
    fields = [str(idx), str(label), str(prediction)]
    if "radius" in HEADERS[mode]:
        fields.append(format_radius(radius, round_down=staged))
    fields += [str(int(prediction == label)), str(datetime.timedelta(seconds=seconds))]
    if staged:
        fields.append(str(int(samples)))
    return "\t".join(fields) + "\n"


def write_header(path: str, mode: str) -> None:
    """Creates the log `path` holding only its header line; never replaces a file.

    Of several processes creating `path` at once, exactly one succeeds.

    Raises:
      FileExistsError: `path` exists (nothing written).
    """
    with files.atomic_output(path, replace=False) as f:
        f.write(header_line(mode) + "\n")


# --------------------------------------------------------------------------
# The settings file.


def settings_path(path: str) -> str:
    """The settings file of the log `path`."""
    return path + SETTINGS_SUFFIX


def write_settings(path: str, settings: Dict[str, Any]) -> None:
    """Writes the settings file of the log `path` (JSON); never replaces one.

    Raises:
      FileExistsError: the settings file exists (nothing written).
    """
    with files.atomic_output(settings_path(path), replace=False) as f:
        json.dump(settings, f, indent=2, sort_keys=True)
        f.write("\n")


def read_settings(path: str) -> Optional[Dict[str, Any]]:
    """The settings of the run that wrote the log `path`, or None if it has no settings file.

    Raises:
      ConfigError: the settings file is unreadable or not a JSON object
        (`files.load_json_object`; the message names it and the log, callers
        add what to do).
    """
    sidecar = settings_path(path)
    if not os.path.exists(sidecar):
        return None
    try:
        return files.load_json_object(sidecar)
    except ConfigError as e:  # It names the file; say whose settings it holds.
        raise ConfigError(f"{e} (the settings file of {path})") from e


def comparable_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The settings two runs must share to be one run (or for one to resume the other).

    The model is compared by the SHA-256 of its file (`model_sha256`), not by
    its path: shards certified on hosts that keep the model at other paths
    belong together. The noise mode is compared too: a run records
    `noise` only when it is "grid", so settings without it are "float"'s (the
    logs of before the grid sampler), and runs of the two modes never resume
    or merge into one another.
    """
    return {"noise": "float", **{k: v for k, v in settings.items() if k != "model"}}


def settings_differences(a: Dict[str, Any], b: Dict[str, Any], labels: Optional[Tuple[str, str]] = None) -> str:
    """How the comparable settings of two runs differ; "" when they are one run's.

    Args:
      a, b: the two runs' settings.
      labels: None gives `key: <a> vs <b>, ...`; labels such as
        ("there", "now") give `key: <a> there, <b> now; ...`.
    """
    a, b = comparable_settings(a), comparable_settings(b)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if labels is None:
        return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)
    return "; ".join(f"{k}: {a.get(k)!r} {labels[0]}, {b.get(k)!r} {labels[1]}" for k in keys)


# --------------------------------------------------------------------------
# Reading logs.


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
      samples: int64 [N] estimation samples per example: a staged log's
        column, or the run's n for a full CERTIFY log with a settings file;
        None when unknown (the authors' logs).
      radii: for a staged (fixed-radius) log, the radii its run asked and
        settled, sorted: certified accuracy is known at these (and at 0)
        only; None for a full CERTIFY log, which holds each image's largest
        radius.
    """

    path: str
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    samples: Optional[np.ndarray] = None
    radii: Optional[Tuple[float, ...]] = None

    @property
    def staged(self) -> bool:
        """Whether the log is a fixed-radius run's (only its `radii` are settled)."""
        return self.radii is not None


def _parse_time(text: str) -> float:
    """The `time` column (`str(datetime.timedelta)`: [D day[s], ]H:MM:SS[.ffffff]) in seconds."""
    days = 0
    if " day" in text:
        count, _, text = text.partition(" day")
        days = int(count)
        text = text.lstrip("s").lstrip(",").strip()
    hours, minutes, seconds = text.split(":")
    value = float(seconds)  # int() and float() raise ValueError on anything malformed.
    if days < 0 or int(hours) < 0 or not 0 <= int(minutes) < 60 or not (math.isfinite(value) and 0 <= value < 60):
        raise ValueError(f"time {text!r} is not H:MM:SS")
    return days * 86400 + int(hours) * 3600 + int(minutes) * 60 + value


def parse_row(mode: str, fields: List[str], where: str, *, num_classes: Optional[int] = None,
              stages: Optional[Sequence[int]] = None) -> tuple:
    """One row of a log of `mode`, checked: the one row parser of resuming and of analysis.

    Args:
      mode: one of MODES.
      fields: the row's tab-separated fields.
      where: "path:line", for the message.
      num_classes: when known, labels and predictions must be below it.
      stages: when known, a staged row's samples must be one of them.

    Returns:
      (idx, label, predict, radius, correct, samples): radius 0 in the predict
      modes, samples 0 in the full ones.

    Raises:
      ConfigError: a malformed or impossible row, naming `where`.
    """
    columns = HEADERS[mode]
    if len(fields) != len(columns):
        raise ConfigError(f"{where}: expected {len(columns)} tab-separated fields, got {len(fields)}")
    row = dict(zip(columns, fields))
    try:
        idx, label, predict, correct = (int(row[name]) for name in ("idx", "label", "predict", "correct"))
        radius = float(row["radius"]) if "radius" in row else 0.0
        samples = int(row[SAMPLES_COLUMN]) if SAMPLES_COLUMN in row else 0
        _parse_time(row["time"])
    except ValueError as e:
        raise ConfigError(f"{where}: malformed row ({e})") from e
    if idx < 0 or label < 0 or predict < -1:
        raise ConfigError(f"{where}: idx and label must be >= 0 and predict >= -1")
    if num_classes is not None and max(label, predict) >= num_classes:
        raise ConfigError(f"{where}: label {label} or class {predict} is not below the {num_classes} classes")
    if not (math.isfinite(radius) and radius >= 0):
        raise ConfigError(f"{where}: radius must be a finite number >= 0, got {row['radius']}")
    if predict == -1 and radius != 0:
        raise ConfigError(f"{where}: an abstention (predict = -1) with radius {row['radius']}; an abstention certifies "
                          "nothing (radius 0): the log is corrupt")
    if correct != int(predict == label):
        raise ConfigError(f"{where}: correct={correct} contradicts label={label}, predict={predict}")
    if SAMPLES_COLUMN in row and samples < 1:
        raise ConfigError(f"{where}: samples must be >= 1, got {row[SAMPLES_COLUMN]}")
    if SAMPLES_COLUMN in row and stages is not None and samples not in stages:
        raise ConfigError(f"{where}: samples {samples} is not one of the run's stages {tuple(stages)}")
    return idx, label, predict, radius, correct, samples


def _check_log_settings(path: str, staged: bool) -> Tuple[Optional[int], Optional[Tuple[float, ...]]]:
    """What the settings file of a CERTIFY log says about it: (n, the staged run's radii).

    Raises:
      ConfigError: the settings file is unreadable, or contradicts the log's
        columns, or a staged log has none (its radii are unknown without it).
    """
    settings = read_settings(path)
    mode = "certify_staged" if staged else "certify"
    if settings is None:
        if staged:
            raise ConfigError(f"{path} is a fixed-radius run's log (its last column is samples) without its settings "
                              f"file {settings_path(path)}, which says at which radii the run decided; keep the "
                              "two together")
        return None, None
    if settings.get("mode", mode) != mode:
        raise ConfigError(f"{path}:1: the columns are a {mode} log's, but {settings_path(path)} says mode "
                          f"{settings['mode']!r}: the two do not belong together")
    n = settings.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None
    if not staged:
        return n, None
    radii = settings.get("radii")
    try:
        radii = (tuple(sorted(certify_spec.check_radii(radii, digits=RADIUS_DIGITS))) if isinstance(radii, list)
                 else None)
    except ConfigError:
        radii = None
    if radii is None:
        raise ConfigError(f"{settings_path(path)}: a fixed-radius run's settings without a valid list of radii "
                          f"(got {settings.get('radii')!r}); fix or remove it")
    return n, radii


def read_certify_tsv(path: str) -> CertifyLog:
    """Reads a certification TSV (ours or the authors').

    A full CERTIFY log has the authors' columns; a staged (fixed-radius) one
    adds `samples` and needs its settings file, which says at which radii
    its run decided (`CertifyLog.radii`).

    Args:
      path: a TSV with the header `idx label predict radius correct time`
        (`... time samples` for a staged run).

    Returns:
      Its rows as a `CertifyLog`.

    Raises:
      ConfigError: the file is unreadable, has another header, no rows, a
        malformed or impossible row (an abstention with a positive radius, an
        example given twice), or a settings file that contradicts it; the
        message names the file and line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a certification TSV") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from e
    if lines and lines[-1] == "":
        lines.pop()  # The final newline.
    if not lines:
        raise ConfigError(f"{path}:1: empty file; expected the header {' '.join(CERTIFY_HEADER)}")
    header = tuple(lines[0].rstrip("\r").split("\t"))
    if header not in (CERTIFY_HEADER, HEADERS["certify_staged"]):
        hint = " (a bin/predict.py log has no radii)" if header in (PREDICT_HEADER, HEADERS["predict_staged"]) else ""
        raise ConfigError(f"{path}:1: header must be the tab-separated columns {' '.join(CERTIFY_HEADER)}, "
                          f"got {' '.join(header)!r}{hint}")
    staged = header == HEADERS["certify_staged"]
    if len(lines) == 1:
        raise ConfigError(f"{path}: no rows after the header")
    mode = "certify_staged" if staged else "certify"
    rows = [parse_row(mode, line.rstrip("\r").split("\t"), f"{path}:{number}")
            for number, line in enumerate(lines[1:], start=2)]
    idx, label, predict, radius, correct, samples = (np.array(column) for column in zip(*rows))
    _check_unique(idx, lambda row: f"{path}:{row + 2}")
    n, radii = _check_log_settings(path, staged)
    if not staged:
        samples = None if n is None else np.full(len(idx), n)
    return CertifyLog(path=path, idx=idx.astype(np.int64), label=label.astype(np.int64),
                      predict=predict.astype(np.int64), radius=radius.astype(np.float64),
                      correct=correct.astype(bool), samples=None if samples is None else samples.astype(np.int64),
                      radii=radii)


def _check_unique(idx: np.ndarray, where: Callable[[int], str]) -> None:
    """Refuses an example index that appears twice, naming where it does the second time (`where(row)`)."""
    order = np.argsort(idx, kind="stable")
    repeated = np.flatnonzero(idx[order][1:] == idx[order][:-1])
    if repeated.size:
        second = int(min(order[repeated + 1]))  # The earliest row that repeats an index.
        first = int(np.flatnonzero(idx == idx[second])[0])
        raise ConfigError(f"{where(second)}: example {idx[second]} again (first at {where(first)}): every example "
                          "is certified once, so the log is corrupt")


# --------------------------------------------------------------------------
# Sharded runs: the shard files of one bin/certify.py --num_shards=K run.


def read_shard_settings(path: str) -> Optional[Dict[str, Any]]:
    """The settings of `path` if it is a shard of a sharded run, else None.

    A shard is a log with a settings file (see `read_settings`) that says
    num_shards > 1. Logs without one (the authors') and unsharded runs give
    None.

    Raises:
      ConfigError: the settings file exists but is unreadable or inconsistent.
    """
    try:
        settings = read_settings(path)
    except ConfigError as e:
        raise ConfigError(f"{e}; fix or remove it") from e
    if settings is None or settings.get("num_shards") == 1:
        return None
    num_shards, shard_index, skip = (settings.get(k) for k in ("num_shards", "shard_index", "skip"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (num_shards, shard_index, skip)) or not (
            num_shards > 1 and 0 <= shard_index < num_shards and skip >= 1):
        raise ConfigError(f"{settings_path(path)}: num_shards={num_shards!r}, shard_index={shard_index!r}, "
                          f"skip={skip!r} are not a shard of a run; fix or remove it")
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
                                  f"with different settings ({settings_differences(key_a, key_b)}): shards of "
                                  "one run need the same flags but --shard_index; give the shards of each run")

    runs = []
    for item in order:
        if isinstance(item, str):
            runs.append(Run(files=(item,)))
            continue
        key, members = groups[item]
        members = sorted(members)
        runs.append(Run(files=tuple(p for _, p in members), num_shards=key["num_shards"],
                        shard_indices=tuple(i for i, _ in members), skip=key["skip"]))
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
    # Each shard holds exactly its own examples, in order, so no example is
    # in two shards (nor twice in one).
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
    columns = ["idx", "label", "predict", "radius", "correct"]
    if all(log.samples is not None for log in logs):
        columns.append("samples")
    merged = CertifyLog(path=run.name, radii=logs[0].radii, **{
        column: np.concatenate([getattr(log, column) for log in logs]) for column in columns})
    order = np.argsort(merged.idx, kind="stable")
    merged = dataclasses.replace(merged, **{column: getattr(merged, column)[order] for column in columns})
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

