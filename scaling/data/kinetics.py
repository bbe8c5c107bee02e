"""Kinetics-710: one label space for K400, K600 and K700, and their merged annotations.

Label order (`kinetics_labels/k710_classes.txt`): the 400 K400 classes in K400's own order,
then the classes K600 adds, in K600's list order, then the classes K700 adds, in K700's list
order. Why this rather than alphabetical: a K710 index below 400 *is* the K400 index, so the
710->400 map is `range(400)` and K400 labels, checkpoints and confusion matrices stay readable
with no table at all; the 600/700 maps are plain lookups either way.

Older spellings (`renamed_classes.json`, old name -> current name) are rewritten only when the
label is not itself a current class: "throwing ball" is both a table key and a current class
in every list (next to "throwing ball (not baseball or American football)"), so renaming it
would merge two of the 710 classes.

The shipped files are generated from the class lists by `write_label_files`; to refresh them:
    python -c "from scaling.data.kinetics import write_label_files as w; w(SRC, 'scaling/data/kinetics_labels')"
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from scaling.errors import UserError
from scaling.label_space import (  # noqa: F401  (re-exported: the label tools' names)
    DATASETS,
    NUM_K710,
    _check_target,
    _index_map,
    _shipped,
    head_710_to,
    index_map,
    load_class_list,
    load_k710_classes,
    load_renames,
)

# Which copy of a video wins when several train (or val) sets hold it: the newest release,
# whose annotations were re-checked last.
PRIORITY = (700, 600, 400)
SOURCE_FILES = tuple(f"classes_k{n}.txt" for n in DATASETS) + ("renamed_classes.json",)
REQUIRED_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
OUT_COLUMNS = ("youtube_id", "time_start", "time_end", "label", "label_index", "source")


class AnnotationError(UserError, ValueError):
    """An annotation file without the needed columns, or none given."""


MAX_LISTED_CONFLICTS = 1000  # the count is always exact; the listing only serves audits


# ---------------------------------------------------------------- label space (generation)


def read_class_list(path) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


def build_k710_classes(lists: dict[int, list[str]]) -> list[str]:
    """K400 order, then each later dataset's new classes in that dataset's order."""
    out: list[str] = []
    seen: set[str] = set()
    for n in DATASETS:
        for name in lists[n]:
            if name not in seen:
                seen.add(name)
                out.append(name)
    return out


def build_index_map(k710: list[str], classes: list[str]) -> list[int]:
    """For each class of one dataset, in its own order, its index in the 710 list."""
    where = {name: i for i, name in enumerate(k710)}
    return [where[name] for name in classes]


def write_label_files(src_dir, dst_dir) -> None:
    """Copy the class lists and renames from `src_dir`; write the 710 list and index maps."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in SOURCE_FILES:
        shutil.copyfile(src / name, dst / name)
    lists = {n: read_class_list(src / f"classes_k{n}.txt") for n in DATASETS}
    k710 = build_k710_classes(lists)
    if len(k710) != NUM_K710:
        raise ValueError(f"the K400/K600/K700 class lists in {src} give {len(k710)} classes, not {NUM_K710}")
    _write_label_outputs(dst, k710, lists)


def _write_label_outputs(dst: Path, k710: list[str], lists: dict[int, list[str]]) -> None:
    (dst / "k710_classes.txt").write_text("".join(f"{c}\n" for c in k710), encoding="utf-8")
    for n in DATASETS:
        (dst / f"k710_to_k{n}.json").write_text(json.dumps(build_index_map(k710, lists[n])) + "\n")


def harmonize(label: str, classes, renames: dict[str, str]) -> str | None:
    """Current name of `label`, or None when it is no Kinetics-710 class under any spelling."""
    if label in classes:  # a current name wins over the rename table (see module docstring)
        return label
    new = renames.get(label)
    return new if new in classes else None


# ---------------------------------------------------------------- annotations


@dataclass
class _Row:
    youtube_id: str
    time_start: str
    time_end: str
    label: str
    source: str


def _read_rows(path: Path, flag: str):
    """(label, youtube_id, time_start, time_end) per row; extra columns (split, is_cc) ignored."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise AnnotationError(
                f"{flag} {path}: missing column(s) {', '.join(missing)}; "
                "expected a header like label,youtube_id,time_start,time_end,split"
            )
        for r in reader:
            yield tuple((r[c] or "").strip() for c in REQUIRED_COLUMNS)


def _merge_split(split, inputs, classes, renames, train_ids, report):
    """Keep one row per YouTube id; every input row lands in exactly one bucket, checked in
    this order: unknown label, (val) video in a train set, duplicate of a kept video, kept."""
    stats = Counter()
    kept: dict[str, _Row] = {}
    seen_ids: set[str] = set()
    for source, flag, path in inputs:  # PRIORITY order, so the first copy kept is the winner
        for label, yid, t0, t1 in _read_rows(path, flag):
            stats["rows_read"] += 1
            seen_ids.add(yid)
            name = harmonize(label, classes, renames)
            if name is None:
                stats["unknown_label_rows"] += 1
                report["unknown_labels"][label] += 1
                continue
            if name != label:
                report["renamed_rows"][label] += 1
            if yid in train_ids:
                stats["overlap_with_train_removed"] += 1
                continue
            first = kept.get(yid)
            if first is not None:
                stats["duplicates_removed"] += 1
                if first.label != name:
                    stats["conflicting_labels"] += 1
                    report["conflicts"].append(
                        dict(split=split, youtube_id=yid, kept_label=first.label, kept_source=first.source,
                             dropped_label=name, dropped_source=source)
                    )
                continue
            kept[yid] = _Row(yid, t0, t1, name, source)
    rows = list(kept.values())
    stats["kept"] = len(rows)
    by_source = Counter(r.source for r in rows)
    keys = ("rows_read", "kept", "duplicates_removed", "conflicting_labels", "unknown_label_rows")
    summary = {k: stats[k] for k in keys}
    if split == "val":
        summary["overlap_with_train_removed"] = stats["overlap_with_train_removed"]
    summary["kept_by_source"] = {f"k{n}": by_source[f"k{n}"] for n in PRIORITY}
    return rows, seen_ids, summary


def _write_rows(path: Path, rows: list[_Row], index: dict[str, int]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(OUT_COLUMNS)
        for r in rows:
            w.writerow((r.youtube_id, r.time_start, r.time_end, r.label, index[r.label], r.source))


def merge_annotations(out_dir, *, k400_train=None, k400_val=None, k600_train=None, k600_val=None,
                      k700_train=None, k700_val=None) -> dict:
    """Merge K400/K600/K700 annotation CSVs into Kinetics-710 train/val lists under `out_dir`.

    Writes k710_train.csv, k710_val.csv, summary.json, k710_classes.txt and k710_to_k{400,600,700}.json;
    returns the summary. Train copies of one video: K700 > K600 > K400 wins; val videos whose id
    is in any given train file (whatever its label) are dropped, so val never leaks into train.
    """
    given = dict(k400_train=k400_train, k400_val=k400_val, k600_train=k600_train,
                 k600_val=k600_val, k700_train=k700_train, k700_val=k700_val)
    given = {k: Path(v) for k, v in given.items() if v is not None}
    if not given:
        raise AnnotationError("no annotation file given: pass at least one of --k400-train ... --k700-val")
    for key, path in given.items():  # all up front, so nothing is half-written
        if not path.is_file():
            raise FileNotFoundError(f"--{key.replace('_', '-')}: annotation file not found: {path}")

    k710 = load_k710_classes()
    classes, renames = set(k710), load_renames()
    report = {"unknown_labels": Counter(), "renamed_rows": Counter(), "conflicts": []}

    def inputs(split):
        return [(f"k{n}", f"--k{n}-{split}", given[f"k{n}_{split}"]) for n in PRIORITY if f"k{n}_{split}" in given]

    train, train_ids, train_sum = _merge_split("train", inputs("train"), classes, renames, set(), report)
    val, _, val_sum = _merge_split("val", inputs("val"), classes, renames, train_ids, report)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = {name: i for i, name in enumerate(k710)}
    _write_rows(out / "k710_train.csv", train, index)
    _write_rows(out / "k710_val.csv", val, index)
    _write_label_outputs(out, k710, {n: load_class_list(n) for n in DATASETS})
    summary = {
        "num_classes": len(k710),
        "inputs": {k: str(v) for k, v in given.items()},
        "train": train_sum,
        "val": val_sum,
        "renamed_rows": dict(sorted(report["renamed_rows"].items())),
        "unknown_labels": dict(sorted(report["unknown_labels"].items())),
        "conflicts_listed": min(len(report["conflicts"]), MAX_LISTED_CONFLICTS),
        "conflicts": report["conflicts"][:MAX_LISTED_CONFLICTS],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
