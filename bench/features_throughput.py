"""Throughput of `scaling features` (videos/s, windows/s), arms interleaved over rounds.

    python bench/features_throughput.py --shards 'data/synth/synth-{000000..000003}.tar' \
        --trained runs/smoke/finetune/export/model_fp32.pt --videos a.mp4 b.mp4

Arms: the trained debug export over the shards (bf16), and a randomly initialized ViT-B
(16 x 224) over the video files in fp32 and bf16. Window 16, stride 16, mean pooling, batch 8.
The load average before each arm goes into the JSON: on a shared machine the numbers are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from scaling.models.classify import build_classifier
from scaling.use.features import FeatureOptions, extract


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--trained", required=True, help="a debug fine-tune export")
    p.add_argument("--videos", nargs="+", required=True, help="video files for the ViT-B arms")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench/results/features_throughput.json")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    vit_b = tmp / "vit_b.pt"
    torch.save({"model": build_classifier("vit_b", 400, 16, 224).state_dict(),
                "config": {"model": {"name": "vit_b", "num_frames": 16, "input_size": 224}}}, vit_b)
    arms = (("debug_16x64_trained", a.trained, [a.shards], "bf16"), ("vit_b_16x224_fp32", str(vit_b), a.videos, "fp32"),
            ("vit_b_16x224_bf16", str(vit_b), a.videos, "bf16"))
    rows = []
    for rnd in range(a.rounds):
        for name, weights, inputs, precision in arms:
            load = os.getloadavg()
            stats = extract(FeatureOptions(weights=weights, inputs=inputs, out=str(tmp / f"{name}_{rnd}"),
                                           precision=precision, tracking=False))
            rows.append({"arm": name, "round": rnd, "precision": precision, "loadavg_before": load, **stats})
    shutil.rmtree(tmp)
    Path(a.out).write_text(json.dumps({"what": "scaling features throughput, window 16 stride 16 pool mean, batch 8 windows, "
                                               "synthetic 40-frame 128x96 videos", "threads": torch.get_num_threads(),
                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
