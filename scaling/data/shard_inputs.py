"""What `scaling shard` reads: the list of inputs, in every format people bring.

- a folder, scanned recursively (class subfolders give labels: `root/class/video.mp4`);
- a CSV/TSV of `path[,label]` (an optional header naming `path` and `label`);
- the VideoMAE lists, space-separated: `path label` (fine-tuning), `path 0 -1` (unlabeled
  pre-training videos: start index 0, total frames -1 = a video file), and raw-frame folders,
  `folder start_idx total_frames label` (pre-training) or `folder total_frames label`
  (fine-tuning, frames numbered from 1); a label of -1 means unlabeled;
- the Kinetics-710 lists `scaling labels k710` writes (`youtube_id,time_start,time_end,label,
  label_index,source`): each row's video is the file named `<youtube_id>_<start>_<end>.<ext>`
  (start/end as 6-digit seconds, the Kinetics downloaders' naming) anywhere under the video
  root, and the label is its K710 index.

Relative paths are relative to the list's folder, or to `video_root` when given.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from scaling.errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")
KINETICS_COLUMNS = ("youtube_id", "time_start", "time_end", "label_index")


class ShardInputError(UserError, ValueError):
    """A user-fixable problem with the input list, the class map or the options."""


@dataclass(frozen=True)
class Item:
    index: int  # position in the input list; also the sample key, so keys are unique per run
    path: str
    label: int | None = None
    label_name: str | None = None
    # A folder of raw frames: `num_frames` images numbered from `start_frame`; -1 = a video file.
    start_frame: int = 0
    num_frames: int = -1


@dataclass(frozen=True)
class Row:
    """One input as listed, before labels are indexed."""

    path: str
    label: str | None = None
    start_frame: int = 0
    num_frames: int = -1


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def load_class_map(path) -> dict[str, int]:
    """Class name -> index from a `.json` dict, a manifest.json (its "classes"), or a text
    file with one class name per line (index = line number, as `k710_classes.txt`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class map not found: {path}")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        data = data.get("classes", data) if isinstance(data, dict) else data
        if isinstance(data, list):
            return {name: i for i, name in enumerate(data)}
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise ShardInputError(f"{path}: expected a JSON object of class name -> int index")
        return dict(data)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {name: i for i, name in enumerate(names)}


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _read_table(path: Path, text: str, base: Path) -> list[Row]:
    """CSV/TSV rows of path[,label]; an optional header names the columns, in any order."""
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") or "\t" in text.split("\n", 1)[0] else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if r and r[0].strip() and not r[0].startswith("#")]
    path_col, label_col = 0, 1
    if rows and "path" in [c.strip().lower() for c in rows[0]]:
        header = [c.strip().lower() for c in rows.pop(0)]
        path_col = header.index("path")
        label_col = header.index("label") if "label" in header else None
    out = []
    for r in rows:
        if path_col >= len(r):
            raise ShardInputError(f"{path}: row {r} has no path column; rows are path[,label]")
        label = r[label_col].strip() if label_col is not None and label_col < len(r) else ""
        out.append(Row(str((base / r[path_col].strip()).resolve()), label or None))
    return out


def _label(field: str) -> str | None:
    return None if field == "-1" else field


def _read_videomae_list(path: Path, text: str, base: Path) -> list[Row]:
    """The reference's space-separated lists (see the module docstring for the four shapes)."""
    rows = []
    for number, line in enumerate(_lines(text), 1):
        fields = line.split()
        where = base / fields[0]
        # Every field between the path and the last one is a frame number.
        if len(fields) > 4 or not all(_is_int(f) for f in fields[1:-1]) or (len(fields) == 3 and not _is_int(fields[2])):
            raise ShardInputError(f"{path}, line {number}: '{line.strip()}' is none of the list formats "
                                  "'path [label]', 'path 0 -1', 'folder start_idx total_frames label', "
                                  "'folder total_frames label'")
        if len(fields) <= 2:
            rows.append(Row(str(where.resolve()), _label(fields[1]) if len(fields) == 2 else None))
        elif len(fields) == 3 and where.is_dir():  # fine-tune raw frames: folder total label, frames from 1
            rows.append(Row(str(where.resolve()), _label(fields[2]), start_frame=1, num_frames=int(fields[1])))
        elif len(fields) == 3:  # pre-training video: path start total (total < 0: a video file)
            if int(fields[2]) >= 0:
                raise ShardInputError(f"{path}, line {number}: {fields[0]} is not a folder, yet the line gives "
                                      f"{fields[2]} frames; a video file is listed as '{fields[0]} 0 -1'")
            rows.append(Row(str(where.resolve())))
        else:  # path start total label
            start, total = int(fields[1]), int(fields[2])
            if total < 0:
                rows.append(Row(str(where.resolve()), _label(fields[3])))
            else:
                rows.append(Row(str(where.resolve()), _label(fields[3]), start_frame=start, num_frames=total))
    return rows


def _video_index(root: Path) -> dict[str, str]:
    """File stem -> path of every video under `root` (Kinetics sits flat or in class folders)."""
    return {p.stem: str(p.resolve()) for p in sorted(root.rglob("*")) if p.suffix.lower() in VIDEO_EXTENSIONS}


def _read_kinetics_list(path: Path, text: str, root: Path) -> list[Row]:
    """A `scaling labels k710` list: youtube id + segment -> the downloaded file, label = K710 index."""
    table = list(csv.DictReader(io.StringIO(text)))
    index = _video_index(root)
    rows = []
    for r in table:
        stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        # A video not downloaded keeps its row: it is skipped with the reason in failures.jsonl.
        rows.append(Row(index.get(stem, str(root / f"{stem}.mp4")), r["label_index"]))
    return rows


def _scan_folder(root: Path) -> list[Row]:
    """Videos under `root`, recursively, sorted. Label = class subfolder name when every video
    sits exactly one folder deep (the Kinetics `root/class/video.mp4` layout), else None."""
    found = sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.suffix.lower() in VIDEO_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )
    by_class = bool(found) and all(len(p.parts) == 2 for p in found)
    return [Row(str(root / p), p.parts[0] if by_class else None) for p in found]


def read_rows(src: Path, video_root: Path | None = None) -> tuple[list[Row], dict[str, int] | None]:
    """The rows of a folder or list, and the class map the list itself implies (K710 lists)."""
    if src.is_dir():
        return _scan_folder(src), None
    text = src.read_text(encoding="utf-8-sig")
    first = (_lines(text) or [""])[0]
    base = video_root or src.parent
    header = [c.strip().lower() for c in next(csv.reader([first]))]
    if all(c in header for c in KINETICS_COLUMNS):
        from scaling.data.kinetics import load_k710_classes

        return _read_kinetics_list(src, text, base), {n: i for i, n in enumerate(load_k710_classes())}
    if "," in first or "\t" in first or src.suffix.lower() in (".csv", ".tsv", ".tab"):
        return _read_table(src, text, base), None
    return _read_videomae_list(src, text, base), None


def list_inputs(input_path, class_map: dict[str, int] | None = None,
                video_root=None) -> tuple[list[Item], dict[str, int] | None]:
    """Items to shard, and the class map (None when labels are plain ints or absent).

    Labels that are all integers are used as given; otherwise they are class names, indexed by
    `class_map` or, without one, by their sorted order (pass the training split's map, e.g. its
    manifest.json, when sharding a validation split, so indices agree)."""
    src = Path(input_path).resolve()  # absolute paths: the plan must not depend on the cwd
    if not src.exists():
        raise FileNotFoundError(f"--input: no such file or folder: {src}")
    root = Path(video_root).resolve() if video_root else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--video-root: no such folder: {root}")
    rows, implied = read_rows(src, root)
    class_map = class_map or implied
    if not rows:
        raise ShardInputError(f"--input: no videos found in {src} (extensions: {', '.join(VIDEO_EXTENSIONS)})")
    labels = [r.label for r in rows if r.label is not None]
    if all(_is_int(lab) for lab in labels):
        names = {i: n for n, i in (class_map or {}).items()}
        return [Item(i, r.path, None if r.label is None else int(r.label),
                     None if r.label is None else names.get(int(r.label)), r.start_frame, r.num_frames)
                for i, r in enumerate(rows)], class_map
    if class_map is None:
        class_map = {name: i for i, name in enumerate(sorted(set(labels)))}
    unknown = sorted(set(labels) - set(class_map))
    if unknown:
        raise ShardInputError(f"labels not in the class map: {unknown[:5]}; add them to the --classes file or fix the list")
    return [Item(i, r.path, None if r.label is None else class_map[r.label], r.label, r.start_frame, r.num_frames)
            for i, r in enumerate(rows)], class_map
