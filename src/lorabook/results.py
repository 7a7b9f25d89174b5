"""Results files of sweeps: JSON Lines with a header, appended run by run, resumable (chapter 4).

A results file holds one JSON object per line. The first line is the header
``{"format": "lorabook-sweep", "version": 1, "settings": {...}, ...}``; every other line is the
record of one finished run, with a unique ``"key"``. Records are appended (flushed and fsynced)
as soon as a run ends, so an interrupted sweep loses at most the run in progress and resumes
where it stopped. Nothing here ever rewrites or truncates a file: a file that is not ours, a
corrupt line or a file made with other run settings is a ValueError naming the file and line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from lorabook.config import RunSettings

FORMAT = "lorabook-sweep"  # the header's "format": what makes a file ours
VERSION = 1  # bumped when the record layout changes incompatibly
SPEC_FIELDS = ("model", "method", "r", "targets", "scaling", "base", "alpha", "lr", "steps")
# every run field but the seed: summarize groups by these and averages over seeds by default


def make_header(settings: RunSettings, extra: dict | None = None) -> dict:
    """The first line of a new results file: format, version, run settings (chapter 4)."""
    return {"format": FORMAT, "version": VERSION, "mode": settings.mode,
            "settings": asdict(settings), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            **(extra or {})}


def _where(path: Path, line: int) -> str:
    return f"{path}, line {line}"


def read_results(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(header, records) of a results file, every line checked; ValueError on anything odd (chapter 4)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last record
    if not lines:
        raise ValueError(f"{path} is empty: not a {FORMAT} results file (it has no header)")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{_where(path, 1)}: not a {FORMAT} results file (its first line is not "
                         f'the header {{"format": "{FORMAT}", ...}}); refusing to use or '
                         "overwrite it: choose another path")
    if header.get("version") != VERSION:
        raise ValueError(f"{_where(path, 1)}: results format version {header.get('version')!r}, "
                         f"this lorabook reads version {VERSION}")
    records, keys = [], {}
    for n, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{_where(path, n)}: corrupt record ({e.msg}); an interrupted write? "
                             "Delete that line by hand to re-run its run; nothing was changed") from e
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            raise ValueError(f"{_where(path, n)}: a record must be a JSON object with a string "
                             f"'key', got {line[:80]!r}")
        if record["key"] in keys:
            raise ValueError(f"{_where(path, n)}: key {record['key']!r} already on line "
                             f"{keys[record['key']]}")
        keys[record["key"]] = n
        records.append(record)
    return header, records


def load_results(path: str | os.PathLike) -> list[dict]:
    """The run records of a results file, in the order they were written (chapter 4)."""
    return read_results(path)[1]


def open_results(path: str | os.PathLike, settings: RunSettings,
                 extra: dict | None = None) -> tuple[dict, list[dict]]:
    """(header, records) of ``path``, creating it with a header if absent or empty (chapter 4).

    A file made with other run settings (mode, steps, data sizes) is an error rather than a mix
    of runs that cannot be compared: use one file per setting.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        header = make_header(settings, extra)
        _append_line(path, header)
        return header, []
    header, records = read_results(path)
    if header.get("settings") != asdict(settings):
        raise ValueError(f"{path} holds runs made with the {header.get('mode')!r} settings "
                         f"{header.get('settings')}, not with the {settings.mode!r} settings "
                         f"{asdict(settings)}; mixing them would compare unlike runs. "
                         "Use another file for this setting.")
    return header, records


def settings_changes(header: dict, settings: RunSettings) -> dict[str, tuple]:
    """Fields where a file's recorded run settings differ from ``settings``: (stored, now) (chapter 4)."""
    stored, now = header.get("settings") or {}, asdict(settings)
    return {k: (stored.get(k), v) for k, v in now.items() if stored.get(k) != v}


def _append_line(path: Path, obj: dict) -> None:
    line = json.dumps(obj, default=str, allow_nan=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before the next run starts: an interruption loses nothing


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one run's record as a line, flushed and fsynced (chapter 4)."""
    if not isinstance(record.get("key"), str):
        raise ValueError("a record needs a string 'key' (its run's RunSpec.key())")
    _append_line(Path(path), record)


def summarize(records: Iterable[dict], by: Sequence[str] = SPEC_FIELDS,
              metrics: Sequence[str] = ("score",)) -> pd.DataFrame:
    """Mean, sample std (ddof 1) and n of each metric over the runs sharing ``by`` (chapter 4).

    With the default ``by`` (every run field but the seed) that is the spread over seeds.
    Fields that are None (r, targets of full fine-tuning) form their own group, as a value.
    """
    records = list(records)
    if not records:
        raise ValueError("summarize needs at least one record")
    by, metrics = list(by), list(metrics)
    missing = sorted({k for r in records for k in by + metrics if k not in r})
    if missing:
        raise ValueError(f"records lack the fields {missing}; summarize by run fields such as "
                         f"{list(SPEC_FIELDS)} and metrics such as 'score'")
    frame = pd.DataFrame([{k: r[k] for k in by + metrics} for r in records])
    for m in metrics:
        frame[m] = pd.to_numeric(frame[m], errors="coerce")
    grouped = frame.groupby(by, dropna=False, sort=False)
    out = pd.DataFrame(index=grouped.size().index)
    for m in metrics:
        out[f"{m}_mean"] = grouped[m].mean()
        out[f"{m}_std"] = grouped[m].std(ddof=1)  # NaN for a single run
    out["n"] = grouped.size()
    return out



def difference_noise(a: tuple[float, float, int], b: tuple[float, float, int],
                     n_test: int) -> float:
    """2 sqrt(se_a^2 + se_b^2) for two mean scores given as (mean, std over seeds, n) (chapter 4).

    se^2 = std^2 / n (the spread over seeds; 0 for a single run) + p (1 - p) / n_test (binomial
    sampling of a test set of n_test examples, p = the mean score as a proportion).
    """
    def se2(mean: float, std: float, n: int) -> float:
        seeds = std**2 / n if n >= 2 and std == std else 0.0  # std is NaN for one run
        return seeds + mean * (1 - mean) / n_test

    return 2 * (se2(*a) + se2(*b)) ** 0.5


def gaps_to_full(records: Iterable[dict], n_test: int,
                 by: Sequence[str] = ("targets", "scaling", "base", "r")) -> pd.DataFrame:
    """Each LoRA configuration's mean score minus full fine-tuning's, with a noise yardstick (chapter 4).

    ``noise`` = ``difference_noise`` of the two means: twice their combined standard error from
    the spread over seeds and the binomial sampling of the test set.
    ``verdict``: "within noise" when |gap| <= noise, else "below full" or "above full". A rough
    yardstick, not a test: seeds share one test set, so these errors are not independent.
    """
    records = list(records)
    if not isinstance(n_test, int) or n_test < 1:
        raise ValueError(f"n_test must be the number of scored test examples (>= 1), got {n_test!r}")
    full = [r for r in records if r.get("method") == "full"]
    lora = [r for r in records if r.get("method") == "lora"]
    if not full or not lora:
        raise ValueError("gaps_to_full needs full fine-tuning runs and LoRA runs among the records")

    ref = summarize(full, by=("method",)).iloc[0]
    table = summarize(lora, by=by)
    table["full_mean"] = ref["score_mean"]
    table["gap"] = table["score_mean"] - ref["score_mean"]
    table["noise"] = [difference_noise((m, s, int(n)), (ref["score_mean"], ref["score_std"],
                                                        int(ref["n"])), n_test)
                      for m, s, n in zip(table["score_mean"], table["score_std"], table["n"],
                                         strict=True)]
    table["verdict"] = ["within noise" if abs(g) <= z else ("below full" if g < 0 else "above full")
                        for g, z in zip(table["gap"], table["noise"], strict=True)]
    return table
