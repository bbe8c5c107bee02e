"""`scaling synth|shard|labels`: data commands (synthetic shards, real videos into shards,
label spaces). One function per subcommand."""
from __future__ import annotations

import argparse
import os
import sys

from scaling.data.kinetics import DATASETS


def cmd_labels_k710(args) -> int:
    from scaling.data.kinetics import merge_annotations

    files = {f"k{n}_{split}": getattr(args, f"k{n}_{split}", None) for n in DATASETS for split in ("train", "val")}
    s = merge_annotations(args.out, **files)  # a bad path or header: AnnotationError, one sentence
    t, v = s["train"], s["val"]
    print(
        f"wrote {t['kept']} train / {v['kept']} val videos over {s['num_classes']} classes to {args.out}: "
        f"duplicates removed {t['duplicates_removed']} train + {v['duplicates_removed']} val, "
        f"val in train removed {v['overlap_with_train_removed']}, "
        f"conflicting labels {t['conflicting_labels'] + v['conflicting_labels']}, "
        f"unknown-label rows {t['unknown_label_rows'] + v['unknown_label_rows']} (see summary.json)"
    )
    return 0


def add_labels_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("labels", help="label spaces: merge Kinetics 400/600/700 into Kinetics-710")
    sub = p.add_subparsers(dest="labels_command", required=True)
    s = sub.add_parser(
        "k710",
        help="merge K400/K600/K700 annotation CSVs into Kinetics-710 train/val lists",
        description="Harmonize older class spellings, deduplicate videos by YouTube id (K700 > K600 > K400), "
        "drop val videos found in any train set, and write k710_train.csv, k710_val.csv, summary.json, "
        "the 710-class list and the 710->400/600/700 index maps. Any input may be omitted.",
    )
    for n in DATASETS:
        for split in ("train", "val"):
            s.add_argument(
                f"--k{n}-{split}", metavar="CSV", default=None,
                help=f"Kinetics-{n} {split} annotations (label,youtube_id,time_start,time_end,split[,is_cc])",
            )
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.set_defaults(func=cmd_labels_k710)
    return p


def cmd_synth(args) -> int:
    from scaling.data.synth import write_synthetic_shards

    shards = write_synthetic_shards(args.out, args.num_videos, videos_per_shard=args.per_shard, seed=args.seed,
                                    task=args.task)
    print(f"wrote {args.num_videos} {args.task} videos into {len(shards)} shards under {args.out}")
    return 0


def add_synth_parser(sub) -> None:
    s = sub.add_parser("synth", help="write synthetic mp4 videos into webdataset shards")
    s.add_argument("--out", required=True, help="output folder for synth-NNNNNN.tar shards")
    s.add_argument("--num-videos", type=int, default=64)
    s.add_argument("--per-shard", type=int, default=16, help="videos per shard")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--task", choices=("shapes", "motion"), default="shapes",
                   help="shapes: the class is a shape's form, hue and direction (easy); motion: the class is only "
                        "the direction the shapes move (right, left, down, up), no single frame tells it")
    s.set_defaults(func=cmd_synth)


_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def _bytes(text: str) -> int:
    """'500M' / '1G' / '123456' -> bytes (decimal units, as disk sizes are quoted)."""
    t = text.strip().lower().removesuffix("b")
    try:
        return int(float(t[:-1]) * _UNITS[t[-1]]) if t and t[-1] in _UNITS else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 500M, 2G or a byte count)") from None


def add_shard_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "shard",
        help="write real videos (folder, CSV/TSV, VideoMAE or K710 list, raw-frame folders) into webdataset mp4+json shards",
        description="Write videos into webdataset shards PREFIX-NNNNNN.tar of mp4 + json, with manifest.json and "
        "failures.jsonl. Re-running the same command finishes only the missing shards.",
    )
    s.add_argument("--input", required=True,
                   help="a folder scanned recursively (class subfolders give labels); a CSV/TSV of path[,label] "
                        "(optional header naming 'path' and 'label'); a VideoMAE list, space-separated: 'path label', "
                        "'path 0 -1' (unlabeled), 'folder start_idx total_frames label' or 'folder total_frames label' "
                        "(raw frames); or a `scaling labels k710` list (k710_train.csv), whose videos are found by "
                        "file name <youtube_id>_<start>_<end> under --video-root. Relative paths are relative to the "
                        "list, or to --video-root")
    s.add_argument("--video-root", default=None, help="folder the list's relative paths (and K710 videos) are under")
    s.add_argument("--frame-pattern", default="img_{:05d}.jpg",
                   help="file name of frame i in raw-frame folders (Python format); default img_{:05d}.jpg")
    s.add_argument("--frames-fps", type=float, default=30.0,
                   help="frame rate raw-frame folders were extracted at (SSv2 frames are often 12); default 30")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--prefix", default=None, help="shard name prefix (default: the source name)")
    s.add_argument("--source", default=None, help="source name stored in every sample (default: folder name or list stem)")
    s.add_argument("--short-side", type=int, default=320,
                   help="scale videos down so the short side is at most this many pixels (0 = keep size); default 320")
    s.add_argument("--max-duration", type=float, default=0.0, help="cut videos after this many seconds (0 = keep all)")
    s.add_argument("--crf", type=int, default=23, help="x264 quality of transcoded videos (lower = better, bigger); default 23")
    s.add_argument("--preset", default="fast",
                   help="x264 speed preset of transcoded videos (veryfast: ~2x faster on 720p input here); default fast")
    s.add_argument("--samples-per-shard", type=int, default=1000, help="inputs per shard (default 1000)")
    s.add_argument("--max-shard-bytes", type=_bytes, default=0,
                   help="also start a new shard before the shard's *input* files exceed this size, e.g. 1G "
                        "(input sizes keep the plan fixed up front, so re-runs stay resumable; transcoding down "
                        "usually shrinks videos, so output shards stay below it)")
    s.add_argument("--workers", type=int, default=None, help="worker processes (default: the cores this process may use)")
    s.add_argument("--classes", default=None,
                   help="class map for name labels: a .txt (one name per line), a .json name->index, or another "
                        "run's manifest.json (use the train split's map for the val split)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")
    s.set_defaults(func=cmd_shard)
    return s


def cmd_shard(args) -> int:
    from scaling.data.shards import usable_cores, write_shards

    try:
        m = write_shards(
            args.input, args.out, prefix=args.prefix, source=args.source, short_side=args.short_side,
            max_duration=args.max_duration, crf=args.crf, preset=args.preset, samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes, workers=args.workers or usable_cores(), classes=args.classes,
            progress=args.progress, video_root=args.video_root, frame_pattern=args.frame_pattern,
            frames_fps=args.frames_fps,
        )
    except KeyboardInterrupt:
        print("scaling shard: interrupted; run the same command again to finish the missing shards", file=sys.stderr)
        return 130
    print(f"wrote {m['count']} of {m['inputs']} videos ({m['copied']} copied, {m['transcoded']} transcoded, "
          f"{m['bytes'] / 1e6:.1f} MB) into {len(m['shards'])} shards under {args.out}")
    if m["failures"]:
        print(f"skipped {m['failures']} unreadable videos: see {os.path.join(args.out, 'failures.jsonl')}")
    # Every input failing means a systematic problem (wrong list, missing codec), not bad files.
    return 1 if m["count"] == 0 else 0
