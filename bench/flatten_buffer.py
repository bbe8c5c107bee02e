"""Flattening a gradient partition into new memory vs into a buffer kept between steps (CPU).

    python bench/flatten_buffer.py --numel 43e6 --out bench/results/flatten_buffer.json

ZeRO-1/2 flatten a rank's reduced gradients into one tensor of the partition's size in every
optimizer step (ViT-B fp32 on 2 ranks: 43 M elements). Into new memory, each step pays the
kernel's page faults and zeroing on first touch; into a kept buffer
(scaling/train/grad_partition_buffer.py) only the copy. Both copy the same views (300 k elements
each, a ViT-B weight's size) with torch.cat on one thread; median of --repeats after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--numel", type=float, default=43e6)
    p.add_argument("--view", type=int, default=300_000, help="elements per gradient view")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    source = torch.randn(int(args.numel))
    views = list(source.split(args.view))
    kept = torch.empty_like(source)
    arms = {"new_memory": lambda: torch.cat(views), "kept_buffer": lambda: torch.cat(views, out=kept)}
    seconds = {}
    for name, flatten in arms.items():
        runs = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            flat = flatten()
            runs.append(time.perf_counter() - t0)
            del flat
        seconds[name] = {"median_s": statistics.median(runs[1:]), "runs_s": runs[1:], "first_s": runs[0]}
        print(f"{name:<12} {seconds[name]['median_s']:.4f} s (median of {args.repeats})")
    result = {"settings": vars(args), "torch": torch.__version__, "seconds": seconds}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
