"""Peak memory of one attention layer's forward + backward against sequence length.

Our `vit.Attention` (SDPA) should grow linearly with the number of tokens N; the reference
explicit softmax (bench/naive_attention.py) keeps the (B, h, N, N) probabilities for backward
and grows quadratically. Each point runs in a fresh subprocess: on CPU the peak is the
kernel's RSS high-water mark (`ru_maxrss`) above the level after a tiny warm-up; on a GPU
it is `torch.cuda.max_memory_allocated` above the inputs.

    python bench/attention_memory.py                  # ViT-B decoder layer: 384 wide, 6 heads
    python bench/attention_memory.py --precision bf16 --tokens 512 1024 2048 4096 8192
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from naive_attention import reference_forward  # noqa: E402

from scaling.models.vit import Attention  # noqa: E402

KINDS = ("sdpa", "naive")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    p.add_argument("--out", default=None, help="default: bench/results/attention_memory_<device>_<precision>.json")
    p.add_argument("--worker", choices=KINDS, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args: argparse.Namespace, kind: str, tokens: int) -> dict:
    """One point, in this (fresh) process: peak bytes of forward + backward above the start."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    attn = Attention(args.dim, args.heads).to(device)
    if kind == "naive":
        attn.forward = types.MethodType(reference_forward, attn)

    def run(n: int) -> None:
        x = torch.randn(args.batch, n, args.dim, device=device, requires_grad=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            y = attn(x)
        y.float().square().mean().backward()
        attn.zero_grad(set_to_none=True)

    run(16)  # load kernels and thread pools outside the measurement
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    t0 = time.perf_counter()
    run(tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak - base, "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        print(json.dumps(measure(args, args.worker, args.tokens[0])))
        return {}
    bytes_per = 4  # the naive path's softmax output is fp32 under autocast too
    rows = []
    for kind in KINDS:
        for n in args.tokens:
            cmd = [sys.executable, __file__, "--worker", kind, "--tokens", str(n), "--dim", str(args.dim),
                   "--heads", str(args.heads), "--batch", str(args.batch), "--precision", args.precision,
                   "--threads", str(args.threads), "--device", args.device]
            point = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append({"attention": kind, "tokens": n, **point,
                         "one_n_by_n_bytes": args.batch * args.heads * n * n * bytes_per})
    for kind in KINDS:  # growth exponent between neighbouring points: ~1 linear, ~2 quadratic
        pts = [r for r in rows if r["attention"] == kind]
        for a, b in zip(pts, pts[1:]):
            b["growth_exponent"] = math.log(max(b["peak_bytes"], 1) / max(a["peak_bytes"], 1)) / math.log(b["tokens"] / a["tokens"])

    out = {"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "torch": torch.__version__,
           "measure": "torch.cuda.max_memory_allocated above start" if args.device == "cuda"
           else "ru_maxrss above the level after a 16-token warm-up, fresh process per point",
           "results": rows}
    path = Path(args.out or Path(__file__).resolve().parent / "results" / f"attention_memory_{args.device}_{args.precision}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"one attention layer, dim {args.dim}, {args.heads} heads, batch {args.batch}, {args.precision}, {args.device}: "
          "peak memory of forward + backward")
    print(f"{'attention':<9} {'tokens':>6} {'peak MB':>9} {'one NxN MB':>10} {'growth exp':>10} {'s':>6}")
    for r in rows:
        g = f"{r['growth_exponent']:.2f}" if "growth_exponent" in r else "-"
        print(f"{r['attention']:<9} {r['tokens']:>6} {r['peak_bytes'] / 2**20:9.1f} "
              f"{r['one_n_by_n_bytes'] / 2**20:10.1f} {g:>10} {r['seconds']:6.2f}")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
