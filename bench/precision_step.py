"""Where a bf16 pre-training step spends its time on this CPU, next to fp32.

    .venv/bin/python bench/precision_step.py --model vit_b --batch 1 --steps 3

Three arms on the same weights and inputs, interleaved (fp32, bf16, autocast, fp32, ...):
  fp32      the model in fp32
  bf16      the model cast to bf16 and bf16 inputs: what DeepSpeed's bf16 mode runs
  autocast  fp32 weights under torch.autocast(bf16): what bench/step.py's bf16 runs
Then one profiled step per arm, its self CPU time summed per op into groups (GEMM, attention,
norm, elementwise, casts/copies, other), so the loss or gain of bf16 can be pinned on a group.
Writes bench/results/precision_step_<model>.json with the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scaling.losses import masked_reconstruction_loss, normalized_pixel_target  # noqa: E402
from scaling.masking import make_masks  # noqa: E402
from scaling.models.pretrain import build_pretrain_model  # noqa: E402

GROUPS = {  # first match wins; op names as the profiler reports them
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::convolution",
             "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward", "aten::slow_conv3d"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax"),
    "norm": ("layer_norm",),
    "casts_copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat"),
    "elementwise": ("aten::gelu", "aten::add", "aten::mul", "aten::sub", "aten::div", "aten::pow", "aten::mean",
                    "aten::sum", "aten::sqrt", "aten::var", "aten::fill_", "aten::zero_", "aten::mse", "aten::neg"),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k in name for k in keys):
            return group
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arms", nargs="+", default=["fp32", "bf16", "autocast"], choices=["fp32", "bf16", "autocast"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = build_pretrain_model(args.model, args.frames, args.size).train()
    models = {"fp32": base, "autocast": base}
    if "bf16" in args.arms:
        models["bf16"] = build_pretrain_model(args.model, args.frames, args.size).train()
        models["bf16"].load_state_dict(base.state_dict())
        models["bf16"].to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    enc, dec = make_masks(args.batch, base.grid, "tube", 0.9, "running_cell", 0.5, g)
    video = torch.randn(args.batch, 3, args.frames, args.size, args.size, generator=g)
    size = base.size

    def step(arm: str) -> float:
        m = models[arm]
        m.zero_grad(set_to_none=True)
        target = normalized_pixel_target(video, size.patch, size.tubelet)
        x = video.to(torch.bfloat16) if arm == "bf16" else video
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=arm == "autocast"):
            pred = m(x, enc, dec)
        loss = masked_reconstruction_loss(pred, target, enc, dec)
        loss.backward()
        return loss.item()

    load_before = list(os.getloadavg())
    for arm in args.arms:
        step(arm)  # warm-up
    seconds = {a: [] for a in args.arms}
    for _ in range(args.steps):
        for arm in args.arms:
            t0 = time.perf_counter()
            step(arm)
            seconds[arm].append(time.perf_counter() - t0)
    groups = {}
    top = {}
    for arm in args.arms:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(arm)
        by_group: dict[str, float] = {}
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        for e in rows:
            by_group[group_of(e.key)] = by_group.get(group_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
        groups[arm] = {k: round(v, 4) for k, v in sorted(by_group.items(), key=lambda kv: -kv[1])}
        top[arm] = [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count} for e in rows[:15]]
    out = {
        "settings": vars(args), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg_before_after": [load_before, list(os.getloadavg())],
        "seconds": seconds, "min_s": {a: round(min(s), 3) for a, s in seconds.items()},
        "median_s": {a: round(statistics.median(s), 3) for a, s in seconds.items()},
        "profiled_self_cpu_s_by_group": groups, "top_ops": top,
    }
    path = Path(args.out or ROOT / "bench" / "results" / f"precision_step_{args.model}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{args.model} batch {args.batch} {args.frames}x{args.size}, {args.threads} threads, load {load_before[0]:.1f}")
    for arm in args.arms:
        print(f"{arm:<9s} min {out['min_s'][arm]:.3f} s  median {out['median_s'][arm]:.3f} s  profile: "
              + ", ".join(f"{k} {v:.3f}" for k, v in groups[arm].items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
