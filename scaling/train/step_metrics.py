"""Per-step performance figures of a training run: time, throughput, FLOPs, MFU, data wait, memory, ETA.

    perf = StepMetrics(cfg, rank, world)
    perf.set_range(start, end, total)
    for step in ...:
        perf.step_started()
        with perf.waiting_for_data():
            batch = next(batches)
        ...
        perf.step_ended()
        if logging:
            figures = perf.collect(step + 1)   # every rank (a max over ranks); {} except on rank 0

FLOPs per step are counted once, at start, by `scaling memory compare`'s own counter
(`count_variant`: FlopCounterMode on meta tensors, the run's model, masks and loss), for the
batch one rank sees in one micro-step, times ranks x accumulation steps. They are model FLOPs:
forward plus backward without what activation checkpointing recomputes (MFU's usual definition).

MFU = FLOPs per step over all ranks / (step time x peak per rank x ranks). The peak comes from
`GPU_PEAK_TFLOPS` (dense bf16/fp16 and fp32 figures of the vendors' data sheets, matched on the
device name); on the CPU it is measured once at start-up with a GEMM in the run's dtype on the
rank's threads, and the log says so.
"""
from __future__ import annotations

import contextlib
import os
import re
import resource
import time

import torch
import torch.distributed as dist

from scaling.config import RunConfig
from scaling.precision import input_dtype
from scaling.train.schedule import clips_per_step

GIB = 1024**3
STAGE_ENV = "SCALING_PIPELINE_STAGE"  # "2/3 postpretrain": set by `scaling pipeline run` for the stage's ranks

# Dense (no structured sparsity) peak TFLOP/s per GPU: "half" = bf16/fp16 tensor cores (V100 and
# T4 have no bf16: their fp16 peak), "fp32" = plain FP32 (PyTorch's default matmul, no TF32).
GPU_PEAK_TFLOPS = {
    "GH200": {"half": 989.4, "fp32": 66.9},
    "H200 NVL": {"half": 835.0, "fp32": 60.0},
    "H200": {"half": 989.4, "fp32": 66.9},  # SXM
    "H100 NVL": {"half": 835.0, "fp32": 60.0},
    "H100 PCIe": {"half": 756.0, "fp32": 51.2},
    "H100": {"half": 989.4, "fp32": 66.9},  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": {"half": 312.0, "fp32": 19.5},  # SXM and PCIe alike
    "L40S": {"half": 362.0, "fp32": 91.6},
    "L40": {"half": 181.0, "fp32": 90.5},
    "L4": {"half": 121.0, "fp32": 30.3},
    "A10": {"half": 125.0, "fp32": 31.2},
    "A40": {"half": 149.7, "fp32": 37.4},
    "RTX A6000": {"half": 154.8, "fp32": 38.7},
    "V100S": {"half": 130.0, "fp32": 16.4},
    "V100 PCIe": {"half": 112.0, "fp32": 14.0},
    "V100": {"half": 125.0, "fp32": 15.7},  # SXM2
    "T4": {"half": 65.0, "fp32": 8.1},
    "MI300X": {"half": 1307.4, "fp32": 163.4},
}
# Device name -> table row, most specific first ("A10" must not match "A100" or "A10G").
GPU_NAMES = [
    (r"GH200", "GH200"), (r"H200 NVL", "H200 NVL"), (r"H200", "H200"), (r"H100 NVL", "H100 NVL"),
    (r"H100 PCIe", "H100 PCIe"), (r"H100", "H100"), (r"A100", "A100"), (r"L40S", "L40S"), (r"\bL40\b", "L40"),
    (r"\bL4\b", "L4"), (r"\bA10\b", "A10"), (r"\bA40\b", "A40"), (r"RTX A6000", "RTX A6000"), (r"V100S", "V100S"),
    (r"V100[- ]PCIE", "V100 PCIe"), (r"V100", "V100"), (r"\bT4\b", "T4"), (r"MI300X", "MI300X"),
]


def gpu_row(device_name: str) -> str | None:
    """The GPU_PEAK_TFLOPS row of a torch.cuda.get_device_name(), or None when it is not in the table."""
    for pattern, row in GPU_NAMES:
        if re.search(pattern, device_name, re.IGNORECASE):
            return row
    return None


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    row = gpu_row(device_name)
    if row is None:
        return None
    return GPU_PEAK_TFLOPS[row]["fp32" if precision == "fp32" else "half"]


def measure_cpu_peak_tflops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.25) -> float:
    """TFLOP/s of the best (size x size) @ (size x size) GEMM in `dtype` on this process's threads,
    over about `seconds` after one untimed warm-up: the CPU's practical matmul peak."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e12


def mfu(flops_per_step: float, step_seconds: float, peak_tflops_per_rank: float, ranks: int) -> float:
    """Model FLOPs utilization in [0, 1]: achieved FLOP/s over all ranks / (peak per rank x ranks)."""
    return flops_per_step / (step_seconds * peak_tflops_per_rank * 1e12 * ranks)


def eta_seconds(first_step_end: float, last_step_end: float, steps_done: int, steps_left: int,
                first_step_seconds: float) -> float:
    """Seconds until `steps_left` more steps at this run's mean step time (end to end, so saves and
    logging count), the first step (compilation, warm-up) left out once a second one is done."""
    if steps_done > 1:
        mean = (last_step_end - first_step_end) / (steps_done - 1)
    else:
        mean = first_step_seconds
    return mean * steps_left


def flop_rate(tflops: float) -> str:
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------- FLOPs per step


def compare_spec_for(cfg: RunConfig, clips: int):
    """(variant, CompareSpec) that `scaling memory compare` counts for this run's model, masks, loss
    and `clips` clips per batch (no timing)."""
    from scaling.masking import MASKINGS
    from scaling.memory.compare import CompareSpec, mar_variants

    m, k, f = cfg.model, cfg.mask, cfg.finetune
    if cfg.stage == "probe":  # a frozen encoder (forward only) + a head: no `memory compare` variant counts that
        raise ValueError("memory compare has no probe variant (frozen encoder forward + head)")
    common = dict(model=m.name, frames=m.num_frames, input_size=m.input_size, batch=clips, time=False)
    if cfg.stage == "pretrain":
        variant = {decoder: name for name, decoder in MASKINGS.items()}[k.decoder]
        return variant, CompareSpec(**common, encoder_mask=k.encoder, encoder_ratio=k.encoder_ratio,
                                    decoder_ratio=k.decoder_ratio)
    spec = CompareSpec(**common, num_classes=f.num_classes, finetune=True, finetune_heads=(m.head,),
                       finetune_ratio=k.finetune_ratio, finetune_reconstruction=f.reconstruction_weight,
                       unmasked_head=m.head)
    return ("unmasked" if k.finetune == "none" else next(iter(mar_variants(spec)))), spec


def count_step(cfg: RunConfig, world: int) -> dict:
    """{"flops_per_step": model FLOPs of one optimizer step over all ranks, "encoder_tokens" /
    "decoder_tokens": tokens per clip, "variant", "clips_per_micro_batch": the batch counted}."""
    from scaling.memory.compare import count_variant

    clips = clips_per_step(cfg) // (world * cfg.train.grad_accum)  # what one rank's model sees per micro-step
    variant, spec = compare_spec_for(cfg, clips)
    counted = count_variant(variant, spec, plain_only=True)
    per_micro_batch = counted["forward_flops"]["total"] + counted["backward_flops"]["plain"]["total"]
    return {"flops_per_step": per_micro_batch * world * cfg.train.grad_accum, "variant": variant,
            "clips_per_micro_batch": clips, "encoder_tokens": counted["tokens"]["encoder"],
            "decoder_tokens": counted["tokens"]["decoder"]}


# ---------------------------------------------------------------- memory


def memory_now() -> dict[str, float]:
    """This process's peak memory in GiB: CUDA's max allocated/reserved, else peak and current RSS."""
    if torch.cuda.is_available():
        return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "memory/peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    import psutil

    rss = psutil.Process().memory_info().rss
    # ru_maxrss (KiB on Linux) is the kernel's high-water mark, updated lazily: it can trail the current RSS.
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss)
    return {"memory/peak_rss_gib": peak / GIB, "memory/rss_gib": rss / GIB}


def max_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Every rank calls it with the same keys; returns each key's maximum over ranks."""
    keys = sorted(values)
    on_gpu = dist.get_backend() == "nccl"
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


# ---------------------------------------------------------------- the per-step figures


class StepMetrics:
    """Times each step and its data wait and turns them into the figures logged at log_every.

    Rank 0 counts the FLOPs per step and finds the peak at construction (a second or two on the
    meta device, a quarter second of GEMM on the CPU); the other ranks only time."""

    def __init__(self, cfg: RunConfig, rank: int, world: int, log=lambda text: print(text, flush=True)):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.end_step = self.total_steps = 0
        self.stage_label = os.environ.get(STAGE_ENV, "")
        self.clips_per_step = clips_per_step(cfg)
        self.count: dict = {}
        self.peak_tflops: float | None = None
        self.peak_source = ""
        if rank == 0:
            self.count = self._count(log)
            self.peak_tflops, self.peak_source = self._find_peak(log)
        self._t0 = self._first_end = self._last_end = self._run_start = None
        self._first_seconds = 0.0
        self._steps_done = 0
        self._waited = 0.0
        self.seconds = 0.0

    def _count(self, log) -> dict:
        try:
            return count_step(self.cfg, self.world)
        except Exception as e:  # noqa: BLE001 - e.g. a mask mode `memory compare` has no variant for
            log(f"[scaling] FLOPs per step not counted ({type(e).__name__}: {e}); tokens/s, TFLOP/s and MFU omitted")
            return {}

    def _find_peak(self, log) -> tuple[float | None, str]:
        precision = self.cfg.train.precision
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            peak = gpu_peak_tflops(name, precision)
            if peak is None:
                log(f"[scaling] MFU omitted: no peak TFLOP/s for GPU '{name}' in scaling/train/step_metrics.py "
                    "GPU_PEAK_TFLOPS (add its dense bf16/fp32 figures there)")
                return None, ""
            return peak, f"{gpu_row(name)} {precision} data-sheet peak"
        peak, threads = measure_cpu_peak_tflops(input_dtype(precision)), torch.get_num_threads()
        log(f"[scaling] MFU vs measured CPU GEMM peak: {peak * 1e3:.1f} GFLOP/s per rank "
            f"({precision}, 1024x1024, {threads} thread{'s' if threads > 1 else ''})")
        return peak, f"measured CPU GEMM {precision}"

    def params(self) -> dict:
        """What the MLflow run records once: the counted FLOPs and the peak they are measured against."""
        if self.rank != 0:
            return {}
        counted = {"flops_per_step": self.count["flops_per_step"], "flops_counted_for": self.count["variant"]} \
            if self.count else {}
        return {**counted, "peak_tflops_per_rank": self.peak_tflops if self.peak_tflops is not None else "unknown",
                "peak_tflops_source": self.peak_source or "none"}

    def set_range(self, start: int, end: int, total: int) -> None:
        """This run goes from step `start` to `end` (ETA) of the training's `total` steps."""
        self.end_step, self.total_steps = end, total

    def step_started(self) -> None:
        self._t0 = time.perf_counter()
        if self._run_start is None:
            self._run_start = self._t0
        self._waited = 0.0

    @contextlib.contextmanager
    def waiting_for_data(self):
        """Around `next(batches)`: the time this step spent waiting for the loader."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._waited += time.perf_counter() - t0

    def step_ended(self) -> float:
        """Seconds of this step (what clips/s and MFU use)."""
        now = time.perf_counter()
        self.seconds = now - self._t0
        self._steps_done += 1
        if self._first_end is None:
            self._first_end, self._first_seconds = now, self.seconds
        self._last_end = now
        return self.seconds

    def collect(self, step: int) -> dict:
        """The figures after `step` (every rank calls it: data wait and memory are maxima over ranks);
        {} on ranks other than 0."""
        worst = max_over_ranks({"data_wait_fraction": self._waited / self.seconds, **memory_now()})
        if self.rank != 0:
            return {}
        s, c = self.seconds, self.count
        out = {"steps_total": self.total_steps, "step_time_s": s, "clips_per_s": self.clips_per_step / s}
        if c:
            out.update({"encoder_tokens_per_s": c["encoder_tokens"] * self.clips_per_step / s,
                        "decoder_tokens_per_s": c["decoder_tokens"] * self.clips_per_step / s,
                        "flops_per_step": c["flops_per_step"], "tflops_per_s": c["flops_per_step"] / s / 1e12})
        if c and self.peak_tflops:
            out["mfu"] = mfu(c["flops_per_step"], s, self.peak_tflops, self.world)
        out.update(worst)
        out["elapsed_s"] = self._last_end - self._run_start
        out["eta_s"] = eta_seconds(self._first_end, self._last_end, self._steps_done, self.end_step - step,
                                   self._first_seconds)
        return out

    def line(self, step: int, metrics: dict) -> str:
        """One console line: progress, loss, throughput, MFU, data wait, memory, time."""
        stage = f" (stage {self.stage_label})" if self.stage_label else ""
        m = metrics
        mem = m.get("memory/peak_allocated_gib", m.get("memory/peak_rss_gib", 0.0))
        compute = ""
        if "flops_per_step" in m:
            tokens = (m["encoder_tokens_per_s"] + m["decoder_tokens_per_s"]) / 1e3
            compute = f", {tokens:.1f}k tok/s, {flop_rate(m['tflops_per_s'])}"
        compute += f", MFU {100 * m['mfu']:.1f}%" if "mfu" in m else ""
        return (f"[scaling] step {step}/{self.total_steps}{stage} loss {m['loss']:.4f} lr {m['lr']:.2e} | "
                f"{m['step_time_s']:.2f} s/step, {m['clips_per_s']:.1f} clips/s{compute}, data wait {100 * m['data_wait_fraction']:.0f}% | "
                f"peak mem {mem:.2f} GiB | elapsed {hms(m['elapsed_s'])}, ETA {hms(m['eta_s'])}")
