"""Seconds per pre-training step (forward + backward with the normalized-pixel loss), or per
fine-tuning step with and without MAR masking (`--stage finetune`).

Pre-training: runs our model with its SDPA attention and, in the same process on the same
weights and inputs, the reference VideoMAE explicit-softmax attention
(bench/naive_attention.py). Steps are interleaved (sdpa, naive, sdpa, naive, ...) so drift
hits both alike. Writes JSON and prints a table.

Fine-tuning (bench/finetune_step.py): linear vs bridging head x every token vs MAR's 50 %
running-cell drop mask, the same interleaving; forward FLOPs of each (total, encoder, head)
counted with `torch.utils.flop_counter.FlopCounterMode`.

    python bench/step.py --model vit_b --batch 2 --precision bf16 --attention both
    python bench/step.py --stage finetune --model vit_b --batch 1 --precision fp32
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_step import finetune_main  # noqa: E402
from naive_attention import naive_copy  # noqa: E402

from scaling.losses import masked_reconstruction_loss, normalized_pixel_target  # noqa: E402
from scaling.masking import make_masks  # noqa: E402
from scaling.models.pretrain import build_pretrain_model  # noqa: E402

# --masking -> make_masks arguments (encoder, ratio, decoder, ratio)
MASKINGS = {
    "dual": ("tube", 0.9, "running_cell", 0.5),  # VideoMAE V2
    "encoder_only": ("tube", 0.9, "none", 0.0),  # VideoMAE
    "random": ("random", 0.9, "none", 0.0),  # MAE-ST
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("pretrain", "finetune"), default="pretrain",
                   help="finetune: linear/bridging head x unmasked/MAR running-cell, FLOPs and step times")
    p.add_argument("--model", default="vit_b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--masking", choices=MASKINGS, default="dual")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every block")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    p.add_argument("--attention", choices=("sdpa", "naive", "both"), default="both")
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", choices=("none", "sdpa", "both"), default="none",
                   help="torch.compile every block of ours (sdpa) or of both models; the first warm-up step holds the compile time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: bench/results/step_<model>_<masking>_<precision>.json "
                   "(finetune: step_finetune_<model>_<precision>.json)")
    p.add_argument("--heads", nargs="+", choices=("linear", "bridging"), default=["linear", "bridging"], help="finetune only")
    p.add_argument("--finetune-masks", nargs="+", choices=("none", "running_cell"), default=["none", "running_cell"],
                   help="finetune only")
    p.add_argument("--finetune-ratio", type=float, default=0.5, help="finetune only: tokens dropped by MAR's mask")
    p.add_argument("--reconstruction", type=float, default=0.0,
                   help="finetune only: weight of MAR's reconstruction branch in the masked variants (0: none)")
    p.add_argument("--classes", type=int, default=400, help="finetune only")
    return p.parse_args(argv)


class PeakRSS:
    """Peak resident memory above the starting point while active (CPU), sampled every ms.

    glibc keeps freed heap pages, so `malloc_trim` first returns them to the OS; otherwise a
    step would reuse the previous step's pages and show a too-small delta.
    """

    _page = os.sysconf("SC_PAGE_SIZE")

    def __init__(self):
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = self._rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


class PeakCuda:
    def __enter__(self):
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()

    @property
    def delta(self) -> int:
        return self.peak - self.base


def sdpa_backend(device: torch.device, dtype: torch.dtype, heads: int, tokens: int, head_dim: int = 64) -> str:
    """Which fused kernel SDPA picks for a (B, h, N, c) input that needs grad."""
    try:
        from torch.nn.attention import SDPBackend

        q = torch.randn(2, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
        return SDPBackend(torch._fused_sdp_choice(q, q, q)).name
    except Exception as e:  # private API: report rather than fail the benchmark
        return f"unknown ({type(e).__name__})"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.stage == "finetune":
        return finetune_main(args, PeakCuda, PeakRSS)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = args.precision == "bf16"
    torch.manual_seed(args.seed)
    model = build_pretrain_model(args.model, args.frames, args.size).to(device).train()
    model.set_grad_checkpointing(args.checkpointing)
    size = model.size

    gen = torch.Generator().manual_seed(args.seed)
    enc_kind, enc_ratio, dec_kind, dec_ratio = MASKINGS[args.masking]
    enc_mask, dec_mask = make_masks(args.batch, model.grid, enc_kind, enc_ratio, dec_kind, dec_ratio, gen)
    video = torch.randn(args.batch, 3, args.frames, args.size, args.size, generator=gen)
    video, enc_mask, dec_mask = video.to(device), enc_mask.to(device), dec_mask.to(device)
    n_vis = int((~enc_mask[0]).sum())
    n_dec_seq = n_vis + int(dec_mask[0].sum())

    kinds = ("sdpa", "naive") if args.attention == "both" else (args.attention,)
    models = {k: (model if k == "sdpa" else naive_copy(model)) for k in kinds}  # same weights
    for k, m in models.items():
        if args.compile == "both" or args.compile == k:
            for block in [*m.encoder.blocks, *m.decoder.blocks]:
                block.compile()

    def step(m) -> float:
        m.zero_grad(set_to_none=True)
        target = normalized_pixel_target(video, size.patch, size.tubelet)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = m(video, enc_mask, dec_mask)
        loss = masked_reconstruction_loss(pred, target, enc_mask, dec_mask)
        loss.backward()
        return loss.item()  # .item() also synchronizes a GPU

    peak_meter = PeakCuda if device.type == "cuda" else PeakRSS
    res = {k: {"seconds": [], "cpu_seconds": [], "warmup_s": [], "peak_bytes": [], "loss": None} for k in kinds}
    t_start = time.perf_counter()
    load_before = list(os.getloadavg())
    for k in kinds:
        for _ in range(args.warmup):  # the first one includes compilation with --compile
            t0 = time.perf_counter()
            step(models[k])
            res[k]["warmup_s"].append(time.perf_counter() - t0)
    for _ in range(args.steps):
        for k in kinds:
            t0, c0 = time.perf_counter(), time.process_time()
            res[k]["loss"] = step(models[k])
            res[k]["seconds"].append(time.perf_counter() - t0)
            res[k]["cpu_seconds"].append(time.process_time() - c0)
    # Memory in one extra, untimed step each: the RSS sampler thread would steal cycles from
    # the OpenMP workers (2 threads on 2 cores) and perturb the timings.
    for k in kinds:
        with peak_meter() as mem:
            step(models[k])
        res[k]["peak_bytes"].append(mem.delta)
    for k in kinds:
        r = res[k]
        r["median_s"] = statistics.median(r["seconds"])
        r["min_s"] = min(r["seconds"])  # robust to other processes stealing the 2 cores
        # CPU seconds of all our threads: with OMP_WAIT_POLICY=PASSIVE (no spinning) this
        # counts work done, not time spent waiting for cores that others hold.
        r["median_cpu_s"] = statistics.median(r["cpu_seconds"])
        r["clips_per_s"] = args.batch / r["median_s"]
        r["peak_mb"] = r["peak_bytes"][0] / 2**20
    if len(kinds) == 2:
        res["sdpa_over_naive"] = res["sdpa"]["median_s"] / res["naive"]["median_s"]
        res["sdpa_over_naive_min"] = res["sdpa"]["min_s"] / res["naive"]["min_s"]
        res["sdpa_over_naive_cpu"] = res["sdpa"]["median_cpu_s"] / res["naive"]["median_cpu_s"]

    dtype = torch.bfloat16 if bf16 else torch.float32
    out = {
        "settings": vars(args) | {"device": str(device)},
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        # Other processes on a 2-core machine skew timings; interleaving keeps the ratio fair.
        "load_avg_before_after": [load_before, list(os.getloadavg())],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "tokens": {"encoder": n_vis, "decoder": n_dec_seq},
        "sdpa_backend": {
            "encoder": sdpa_backend(device, dtype, size.heads, n_vis),
            "decoder": sdpa_backend(device, dtype, size.decoder_heads, n_dec_seq),
        },
        "peak_memory": "torch.cuda.max_memory_allocated above the step's start" if device.type == "cuda"
        else "peak RSS above the step's start (sampled every 1 ms, after malloc_trim)",
        "wall_s": time.perf_counter() - t_start,
        "results": res,
    }
    path = Path(args.out or Path(__file__).resolve().parent / "results" / f"step_{args.model}_{args.masking}_{args.precision}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")

    print(f"{args.model} batch {args.batch} {args.frames}x{args.size} {args.masking} {args.precision}"
          f"{' ckpt' if args.checkpointing else ''}{'' if args.compile == 'none' else ' compiled: ' + args.compile}"
          f" on {device} ({args.threads} threads), "
          f"tokens enc {n_vis} / dec {n_dec_seq}, SDPA backend {out['sdpa_backend']}")
    print(f"{'attention':<10} {'s/step':>8} {'min s':>7} {'cpu s':>7} {'clips/s':>8} {'peak MB':>9} {'loss':>10} {'warm-up s':>9}  steps")
    for k in kinds:
        r = res[k]
        print(f"{k:<10} {r['median_s']:8.3f} {r['min_s']:7.3f} {r['median_cpu_s']:7.3f} {r['clips_per_s']:8.3f} "
              f"{r['peak_mb']:9.0f} {r['loss']:10.6f} {r['warmup_s'][0] if r['warmup_s'] else 0:9.2f}  "
              + " ".join(f"{s:.3f}" for s in r["seconds"]))
    if len(kinds) == 2:
        print(f"sdpa / naive = {res['sdpa_over_naive']:.3f} (medians), {res['sdpa_over_naive_min']:.3f} (minima), "
              f"{res['sdpa_over_naive_cpu']:.3f} (CPU seconds)")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
