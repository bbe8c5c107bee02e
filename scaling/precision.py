"""Precision names (bf16, fp16, fp32) -> torch dtypes, and what `train.precision: auto` picks.

auto, decided once per run before any rank trains and said in one line with its reason:
  CUDA    bf16 where the GPU supports it, else fp16 (with DeepSpeed's loss scaling, as the
          VideoMAE V2 reference trains on V100s)
  CPU     by measurement, not by CPU flags: one transformer block of the run's model, forward +
          backward on the tokens one clip gives the encoder, timed in fp32 and in bf16
          (interleaved, best of a few), with the threads a rank will have. bf16 wins only when it
          is at least 10 % faster. CPUs differ more than their flags say: a 2-core EPYC with
          avx512_bf16 and no AMX runs a bf16 Linear ~3x faster than fp32, while CPUs without
          either run bf16 several times slower.
The CPU answer is cached per machine in ~/.cache/scaling/precision.json (or
$SCALING_PRECISION_CACHE), keyed by CPU model, core count, torch version, threads per rank and
block shape, so another machine, torch or model measures afresh; processes that decide
together on one machine take a file lock, and only the first measures. Across nodes rank 0
decides and every rank takes its answer (`agree_on_precision`).
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISIONS = ("auto", *DTYPES)
CACHE_ENV = "SCALING_PRECISION_CACHE"
BF16_MARGIN = 0.9  # bf16 must take at most this share of fp32's time
MAX_TOKENS = 512  # a longer clip's block is timed on this many tokens: start-up stays ~seconds


def input_dtype(precision: str) -> torch.dtype:
    """DeepSpeed casts the model itself to bf16/fp16; inputs must be cast to match. An
    unresolved 'auto' reads as fp32, as the DeepSpeed config built from it (neither enabled)."""
    return DTYPES.get(precision, torch.float32)


@dataclass(frozen=True)
class Choice:
    precision: str
    reason: str


@dataclass(frozen=True)
class BlockShape:
    """The transformer block timed for the CPU decision: width, heads, MLP ratio, tokens."""

    width: int
    heads: int
    mlp_ratio: float
    tokens: int

    def key(self) -> str:
        return f"block {self.width}w {self.heads}h mlp{self.mlp_ratio:g} {self.tokens}tok"


def cpu_model() -> str:
    """The CPU's marketing name ('AMD EPYC', 'Intel(R) Xeon(R) Platinum ...'); platform.processor()
    is often empty on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(shape: BlockShape, threads: int) -> str:
    return f"{cpu_model()} | {os.cpu_count()} cores | torch {torch.__version__} | {threads} threads | {shape.key()}"


def cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scaling" / "precision.json"


def time_block(shape: BlockShape, threads: int, repeats: int = 3, min_seconds: float = 0.5, max_repeats: int = 50) -> dict:
    """Best seconds of one block's forward + backward in fp32 and in bf16, the two interleaved
    so that other load hits both: at least `repeats` rounds, more (up to `max_repeats`) until
    `min_seconds` have been timed, so that a millisecond-sized block is not decided by one
    scheduler hiccup. bf16 as DeepSpeed runs it: weights and activations in bf16 (no autocast)."""
    from scaling.models.vit import Block

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        steps = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            block = Block(shape.width, shape.heads, shape.mlp_ratio).to(dtype).train()
            x = torch.randn(1, shape.tokens, shape.width, dtype=dtype, requires_grad=True)
            steps[name] = lambda b=block, x=x: b(x).float().square().mean().backward()
        seconds = {name: [] for name in steps}
        for step in steps.values():
            step()  # warm-up: kernel selection, first allocations
        rounds = 0
        while rounds < repeats or (sum(map(sum, seconds.values())) < min_seconds and rounds < max_repeats):
            rounds += 1
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                seconds[name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {f"{name}_s": round(min(s), 5) for name, s in seconds.items()}


def decide_cpu(timings: dict) -> str:
    return "bf16" if timings["bf16_s"] <= BF16_MARGIN * timings["fp32_s"] else "fp32"


def cpu_choice(shape: BlockShape, threads: int, measure=time_block) -> Choice:
    """Measured once per machine key; later calls (and other ranks) read the cache."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = machine_key(shape, threads)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks starting together: one measures, the rest wait and read
        cache = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
        entry = cache.get(key)
        fresh = entry is None
        if fresh:
            entry = {**measure(shape, threads), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            entry["precision"] = decide_cpu(entry)
            cache[key] = entry
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(cache, indent=1) + "\n")
            tmp.replace(path)
    how = "measured now" if fresh else f"measured {entry['measured_at']}, cached in {path}"
    reason = (f"one {shape.width}-wide block forward + backward on {shape.tokens} tokens took {entry['bf16_s'] * 1e3:.3g} ms in bf16 "
              f"vs {entry['fp32_s'] * 1e3:.3g} ms in fp32 on {cpu_model()} with {threads} thread(s) ({how}); bf16 is chosen "
              f"when it takes at most {BF16_MARGIN:.0%} of fp32's time")
    return Choice(entry["precision"], reason)


def choose_precision(requested: str, shape: BlockShape, threads: int, device: str | None = None) -> Choice:
    """What to train in for `train.precision` (auto or an explicit choice), with the reason."""
    if requested != "auto":
        return Choice(requested, "set in the config")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return Choice("bf16", f"{torch.cuda.get_device_name()} supports bf16")
        return Choice("fp16", f"{torch.cuda.get_device_name()} has no bf16: fp16 with loss scaling")
    return cpu_choice(shape, threads)


def run_block_shape(cfg) -> BlockShape:
    """The run's encoder block on the tokens one clip gives the encoder (capped at MAX_TOKENS)."""
    from scaling.models.vit import get_size, num_tokens

    size = get_size(cfg.model.name)
    t, h, w = num_tokens(size, cfg.model.num_frames, cfg.model.input_size)
    hidden = cfg.mask.encoder_ratio if cfg.stage == "pretrain" else (cfg.mask.finetune_ratio if cfg.mask.finetune != "none" else 0.0)
    tokens = max(1, round(t * h * w * (1 - hidden)))
    return BlockShape(size.width, size.heads, size.mlp_ratio, min(tokens, MAX_TOKENS))


def resolve_run_precision(cfg, threads: int, say=print) -> Choice:
    """Replace `train.precision: auto` in a validated run config by its choice and say why."""
    choice = choose_precision(cfg.train.precision, run_block_shape(cfg), threads)
    if cfg.train.precision == "auto":
        cfg.train.precision = choice.precision
        say(f"[scaling] train.precision auto -> {choice.precision}: {choice.reason}")
    return choice


def agree_on_precision(cfg, say=print) -> str:
    """Every rank trains in rank 0's precision. Ranks under an external launcher start with
    `auto` unresolved (scaling/cli/train.py): rank 0 decides (its cache or a measurement) and
    broadcasts, once the process group exists and before the engine is built, so nodes whose
    CPUs, caches or timings differ cannot train in different precisions. Returns the precision."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and cfg.train.precision == "auto":
        resolve_run_precision(cfg, torch.get_num_threads(), say=say)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return cfg.train.precision
    choice = [cfg.train.precision]
    dist.broadcast_object_list(choice, src=0, device=collective_device())
    cfg.train.precision = choice[0]
    return choice[0]


def collective_device() -> torch.device | None:
    """The device a broadcast of Python objects goes through: this rank's GPU under NCCL (else each
    rank of a node would open a context on GPU 0), the CPU otherwise."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None
