"""`scaling labels ...`: label-space tools. Today one: `scaling labels k710`."""
from __future__ import annotations

import argparse
import sys

from scaling.data.kinetics import DATASETS


def cmd_labels_k710(args) -> int:
    from scaling.data.kinetics import merge_annotations

    files = {f"k{n}_{split}": getattr(args, f"k{n}_{split}", None) for n in DATASETS for split in ("train", "val")}
    try:
        s = merge_annotations(args.out, **files)
    except (FileNotFoundError, ValueError) as e:  # a bad path or header: one sentence, no traceback
        print(f"scaling labels k710: error: {e}", file=sys.stderr)
        return 2
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
