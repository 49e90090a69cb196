"""The certification log: the TSV that bin/certify.py and bin/predict.py write, and its settings file.

This module is the one definition of the format, for the writer
(`certify_run.certify_dataset`) and the readers (`analysis`):

- A log is a TSV with the columns of the authors' certify.py and predict.py,
  `idx label predict radius correct time` for CERTIFY and
  `idx label predict correct time` for PREDICT (predict = -1: abstain, radius
  0), one row per example (`header_line`, `format_row`).
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
import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_consreg import files
from tf_consreg.errors import ConfigError

# Exactly the authors' certify.py and predict.py headers, by mode.
CERTIFY_HEADER = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_HEADER = ("idx", "label", "predict", "correct", "time")
HEADERS = {"certify": CERTIFY_HEADER, "predict": PREDICT_HEADER}
MODES = tuple(HEADERS)
# The settings file beside each log: `<tsv>` + SETTINGS_SUFFIX.
SETTINGS_SUFFIX = ".json"


def header_line(mode: str) -> str:
    """The first line of a log of `mode` ("certify" or "predict"), without its newline."""
    return "\t".join(HEADERS[mode])


def format_row(mode: str, idx: int, label: int, prediction: int, radius: float, seconds: float) -> str:
    """One row of a log, with its newline, as the authors print it.

    Args:
      mode: "certify" or "predict" (which has no radius column).
      idx: the example's index in its split.
      label: its true class.
      prediction: the smoothed classifier's class, -1 = abstain.
      radius: the certified radius (0 when abstaining); printed with 3
        significant digits ("{:.3}") as the authors do.
      seconds: the time spent on the example, printed as H:MM:SS.ffffff.
    """
    elapsed = str(datetime.timedelta(seconds=seconds))
    correct = int(prediction == label)
    if mode == "certify":
        return f"{idx}\t{label}\t{prediction}\t{float(radius):.3}\t{correct}\t{elapsed}\n"
    return f"{idx}\t{label}\t{prediction}\t{correct}\t{elapsed}\n"


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
      ConfigError: the settings file is unreadable or not a JSON object (the
        message names it; callers add what to do).
    """
    sidecar = settings_path(path)
    if not os.path.exists(sidecar):
        return None
    try:
        with open(sidecar, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{sidecar}: unreadable settings file of {path} ({e})") from e
    if not isinstance(settings, dict):
        raise ConfigError(f"{sidecar}: the settings file of {path} is not a JSON object")
    return settings


def comparable_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The settings two runs must share to be one run (or for one to resume the other).

    The model is compared by the SHA-256 of its file (`model_sha256`), not by
    its path: shards certified on hosts that keep the model at other paths
    belong together.
    """
    return {k: v for k, v in settings.items() if k != "model"}


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
    """

    path: str
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray


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

