"""Diagnosis for the proof of value, part 2: the attentive probe on a *random* debug encoder,
fed by the pipeline's own fine-tune loader (motion shards as bench/proof_of_value.py writes
them), with its training crop (scale 0.08-1) or without it (scale 1), in fp32 or bf16.

In-process (bench/pov_diagnose.py, clips rendered at 64 px, no augmentation) this probe reaches
75 % on random weights; the pipeline's random arm got 25 %. This finds which difference costs it.

Measured (1 thread, debug, 10 augmented epochs of 256 videos, 2 passes of the head = 160 steps
of 32): 21 % with the 0.08-1 crop, 24 % without, the same in bf16. Clips rendered in memory,
same head steps: 28 % (256 clips), 30 % (512 clips); pov_diagnose.py's 75 % comes from 512
clips and 320 head steps. So neither the crop, nor bf16, nor the loader costs the probe the
motion: the attentive head on random features is slow and data-hungry to train. A
phase-correlation motion estimator (`direction`) reads the direction of every clip the loader
gives, crop 0.08-1 included (`estimator_top1_*` in the JSON): the loader keeps the motion.

    python bench/pov_loader_probe.py     # writes bench/results/pov_loader_probe.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pov_diagnose import attentive, make_clips  # noqa: E402

from scaling.data.finite import build_finetune_loader  # noqa: E402
from scaling.data.synth import write_synthetic_shards  # noqa: E402
from scaling.models.probe_heads import build_probe  # noqa: E402


def direction(video: torch.Tensor) -> int:
    """Class of a (3, T, H, W) clip from the peak of the summed frame-to-frame phase correlation."""
    g = video.float().mean(0).numpy()  # (T, H, W)
    acc = np.zeros(g.shape[1:])
    for t in range(g.shape[0] - 1):
        r = np.fft.fft2(g[t + 1]) * np.conj(np.fft.fft2(g[t]))
        acc += np.real(np.fft.ifft2(r / (np.abs(r) + 1e-9)))
    acc[0, 0] = -np.inf  # the static background
    y, x = np.unravel_index(np.argmax(acc), acc.shape)
    h, w = acc.shape
    y, x = (y - h if y > h // 2 else y), (x - w if x > w // 2 else x)
    if abs(x) >= abs(y):
        return 0 if x > 0 else 1  # right, left
    return 2 if y > 0 else 3  # down, up


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    torch.manual_seed(0)
    data = Path("/tmp/pov_loader_probe")
    for split, n, per, seed in (("train", 256, 64, 0), ("val", 128, 16, 1)):  # as proof_of_value.py
        if not (data / split / f"synth-{n // per - 1:06d}.tar").is_file():
            write_synthetic_shards(data / split, n, videos_per_shard=per, seed=seed, task="motion")
    train = str(data / "train" / "synth-{000000..000003}.tar")
    val = str(data / "val" / "synth-{000000..000007}.tar")
    probe = build_probe("debug", 4, 16, 64, head="attentive").eval()
    common = dict(videos_per_batch=16, num_frames=16, stride=2, input_size=64, num_sample=1, rand_aug=None,
                  reprob=0.0, flip=False)
    result = {"epochs": 10}

    def tokens(loader, dtype):
        enc = probe.to(dtype)
        ts, ys = [], []
        for b in loader:
            ts.append(enc.encode(b["video"].to(dtype)).float())
            ys.append(torch.as_tensor(b["label"]))
        return torch.cat(ts), torch.cat(ys)

    for scale in ((0.08, 1.0), (1.0, 1.0)):
        hits = [direction(v) == int(y) for b in build_finetune_loader(train, train=True, scale=scale, **common)
                for v, y in zip(b["video"], b["label"])]
        result[f"estimator_top1_scale{scale[0]:g}-{scale[1]:g}"] = round(100.0 * float(np.mean(hits)), 1)
    print({k: v for k, v in result.items() if k.startswith("estimator")}, flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        tva, yva = tokens(build_finetune_loader(val, train=False, test_clips=1, test_crops=1, **common), dtype)
        for scale in ((0.08, 1.0), (1.0, 1.0)):
            t0 = time.time()
            parts = [tokens(build_finetune_loader(train, train=True, scale=scale, epoch=e, seed=0, **common), dtype)
                     for e in range(result["epochs"])]  # a fresh augmentation per epoch
            ttr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            acc = attentive(ttr, ytr, tva, yva, 64, 2, epochs=2, seed=0)  # 2 passes over 10 augmented epochs
            key = f"{str(dtype).split('.')[-1]}_scale{scale[0]:g}-{scale[1]:g}"
            result[key] = {"attentive_val": round(acc, 1), "s": round(time.time() - t0, 1)}
            print(key, result[key], flush=True)
    probe.float()
    # The same sizes and schedule on clips rendered in memory at 64 px (pov_diagnose's data):
    # is the gap the loader's, or the smaller data set's and shorter schedule's?
    with torch.no_grad():
        enc = lambda x: torch.cat([probe.encode(x[i:i + 64]) for i in range(0, len(x), 64)])  # noqa: E731
        for n_train in (256, 512):
            xtr, ytr = make_clips(n_train, 16, 64, 2, seed=1)
            xva, yva = make_clips(128, 16, 64, 2, seed=2)
            ttr, tva = enc(xtr), enc(xva)
            reps = 2560 // n_train  # the same number of head steps as above
            with torch.enable_grad():
                acc = attentive(ttr.repeat(reps, 1, 1), ytr.repeat(reps), tva, yva, 64, 2, epochs=2, seed=0)
            result[f"in_memory_{n_train}_clips"] = {"attentive_val": round(acc, 1)}
            print(n_train, result[f"in_memory_{n_train}_clips"], flush=True)
    out = REPO / "bench" / "results" / "pov_loader_probe.json"
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
