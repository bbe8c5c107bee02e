"""`bench/step.py --stage finetune`: what MAR's fine-tune masking and bridging head cost and save.

Variants: head (linear | bridging) x fine-tune mask (none | running_cell). Each step is the
training loop's own: `scaling.losses.finetune_loss` (cross-entropy, plus the weighted
reconstruction of the dropped tokens with `--reconstruction`) and backward, on a model from
`build_classifier`. Steps are interleaved across variants so drift hits all alike.

Forward FLOPs come from `scaling.memory.compare.classifier_forward_flops` (FlopCounterMode
with the CPU's fused flash-attention op counted, split encoder / head / reconstruction, the
same split `scaling memory compare --finetune` uses) on the benchmarked models and inputs.
FLOPs are 2 x multiply-accumulates.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from scaling.losses import finetune_loss
from scaling.masking import finetune_drop_mask
from scaling.memory.compare import classifier_forward_flops as forward_flops
from scaling.models.classify import build_classifier


def variant_name(head: str, mask: str) -> str:
    return f"{head}/{'masked' if mask != 'none' else 'unmasked'}"


def build(args, head: str, device) -> torch.nn.Module:
    torch.manual_seed(args.seed)  # the same encoder weights for both heads
    return build_classifier(args.model, args.classes, args.frames, args.size, head=head,
                            reconstruction=args.reconstruction > 0).to(device).train()


def finetune_main(args, peak_cuda, peak_rss) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = args.precision == "bf16"
    variants = [(h, k) for h in args.heads for k in args.finetune_masks]

    models = {head: build(args, head, device) for head in args.heads}
    for m in models.values():
        m.set_grad_checkpointing(args.checkpointing)
    gen = torch.Generator().manual_seed(args.seed)
    video = torch.randn(args.batch, 3, args.frames, args.size, args.size, generator=gen).to(device)
    target = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)
    grid = models[args.heads[0]].grid
    masks = {k: finetune_drop_mask(k, args.batch, grid, args.finetune_ratio, train=True, generator=gen) for k in args.finetune_masks}
    masks = {k: (None if m is None else m.to(device)) for k, m in masks.items()}
    criterion = torch.nn.CrossEntropyLoss()
    flops = {variant_name(h, k): forward_flops(models[h], video, masks[k]) for h, k in variants}

    def step(head: str, mask_kind: str) -> float:
        model = models[head]
        model.zero_grad(set_to_none=True)
        weight = args.reconstruction if mask_kind != "none" else 0.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = finetune_loss(model, video, target, criterion, masks[mask_kind], weight)
        loss.backward()
        return loss.item()  # .item() also synchronizes a GPU

    names = [variant_name(h, k) for h, k in variants]
    res = {n: {"seconds": [], "cpu_seconds": [], "warmup_s": [], "loss": None} for n in names}
    t_start = time.perf_counter()
    load_before = list(os.getloadavg())
    for (h, k), n in zip(variants, names):
        for _ in range(args.warmup):
            t0 = time.perf_counter()
            step(h, k)
            res[n]["warmup_s"].append(time.perf_counter() - t0)
    for _ in range(args.steps):
        for (h, k), n in zip(variants, names):
            t0, c0 = time.perf_counter(), time.process_time()
            res[n]["loss"] = step(h, k)
            res[n]["seconds"].append(time.perf_counter() - t0)
            res[n]["cpu_seconds"].append(time.process_time() - c0)
    meter = peak_cuda if device.type == "cuda" else peak_rss
    for (h, k), n in zip(variants, names):  # memory in an extra, untimed step (see step.py)
        with meter() as mem:
            step(h, k)
        res[n]["peak_mb"] = mem.delta / 2**20
    for n in names:
        r = res[n]
        r["median_s"], r["min_s"] = statistics.median(r["seconds"]), min(r["seconds"])
        r["median_cpu_s"] = statistics.median(r["cpu_seconds"])
        r["forward_flops"] = flops[n]
        r["forward_gflops"] = {part: v / 1e9 for part, v in flops[n].items()}

    ratios = {}
    for h in args.heads:
        full, cut = variant_name(h, "none"), variant_name(h, "running_cell")
        if full in res and cut in res:
            ratios[h] = {
                "encoder_flops_masked_over_unmasked": flops[cut]["encoder"] / flops[full]["encoder"],
                "total_flops_masked_over_unmasked": flops[cut]["total"] / flops[full]["total"],
                "step_s_masked_over_unmasked_median": res[cut]["median_s"] / res[full]["median_s"],
                "step_s_masked_over_unmasked_min": res[cut]["min_s"] / res[full]["min_s"],
            }
    n_tokens = grid[0] * grid[1] * grid[2]
    out = {
        "settings": vars(args) | {"device": str(device)},
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg_before_after": [load_before, list(os.getloadavg())],
        "tokens": {"all": n_tokens, "kept_running_cell": n_tokens - int(n_tokens * args.finetune_ratio)},
        "flops": "forward only, FlopCounterMode (2 x MACs), for the whole batch, in fp32",
        "step": "forward + backward of cross-entropy"
        + (f" + {args.reconstruction} x reconstruction (masked variants)" if args.reconstruction else ""),
        "peak_memory": "torch.cuda.max_memory_allocated above the step's start" if device.type == "cuda"
        else "peak RSS above the step's start",
        "wall_s": time.perf_counter() - t_start,
        "results": res,
        "masked_over_unmasked": ratios,
    }
    path = Path(args.out or Path(__file__).resolve().parent / "results" / f"step_finetune_{args.model}_{args.precision}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")

    print(f"{args.model} fine-tune step, batch {args.batch} {args.frames}x{args.size} {args.precision} on {device} "
          f"({args.threads} threads), tokens {n_tokens} -> {out['tokens']['kept_running_cell']} with MAR masking")
    print(f"{'variant':<20} {'fwd GFLOP':>10} {'encoder':>9} {'head':>7} {'s/step':>8} {'min s':>7} {'peak MB':>8} {'loss':>8}")
    for n in names:
        r, f = res[n], res[n]["forward_gflops"]
        print(f"{n:<20} {f['total']:10.1f} {f['encoder']:9.1f} {f['head']:7.2f} {r['median_s']:8.3f} {r['min_s']:7.3f} "
              f"{r['peak_mb']:8.0f} {r['loss']:8.4f}")
    for h, r in ratios.items():
        print(f"{h}: masked / unmasked encoder FLOPs {r['encoder_flops_masked_over_unmasked']:.3f}, total FLOPs "
              f"{r['total_flops_masked_over_unmasked']:.3f}, step time {r['step_s_masked_over_unmasked_median']:.3f} (medians)")
    print(f"wrote {path}")
    return out
