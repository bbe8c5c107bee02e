"""DeepSpeed set-up: the JSON in ds_configs/ merged with what the run config decides.

Batch sizes, gradient accumulation, clipping and precision always come from the run config,
so a DeepSpeed JSON can never disagree with it.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
from torch import nn

from scaling.config import DS_OWNED_KEYS, RunConfig, ds_json_for, micro_batch, resolve_ds_config
from scaling.train import gloo_gather, grad_partition_buffer, overlap_reduce, shared_params
from scaling.train.offload_optimizer import build_optimizer, with_offload_adam

# The lr rule lives beside the schedule (no DeepSpeed import there, for `scaling pipeline show`).
from scaling.train.schedule import (  # noqa: F401  (re-exported: the training loops import them from here)
    clips_per_step,
    lr_of_step,
    min_lr,
    peak_lr,
    run_steps,
    videos_per_step,
    warmup_cosine,
    warmup_lr,
)

# Keys the run config owns; a DeepSpeed JSON that sets them is refused (by config.validate,
# before launch) instead of overridden.
OWNED_KEYS = tuple(DS_OWNED_KEYS)


def build_ds_config(cfg: RunConfig, world_size: int) -> dict:
    path = resolve_ds_config(cfg.train.ds_config)
    ds = ds_json_for(cfg.train.ds_config, "gpu" if torch.cuda.is_available() else "cpu")
    clashes = [k for k in OWNED_KEYS if k in ds]
    if clashes:
        raise ValueError(f"{path} sets {', '.join(clashes)}; remove them, the run config computes these")
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = micro_batch(cfg, world_size)
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.global_batch
    ds["gradient_clipping"] = cfg.optim.clip_grad
    ds["bf16"] = {"enabled": t.precision == "bf16"}
    ds["fp16"] = {"enabled": t.precision == "fp16", "auto_cast": False, "initial_scale_power": 16}
    ds.setdefault("zero_optimization", {})["stage"] = zero_stage_of(cfg, world_size)
    return with_offload_adam(ds, cfg.optim.offload_adam)


def zero_stage_of(cfg: RunConfig, world_size: int) -> int:
    """train.zero_stage, with `auto` decided here and the choice printed once (rank 0) at start."""
    from scaling.memory.zero_choice import resolve_zero_stage

    choice = resolve_zero_stage(cfg, world_size)
    if cfg.train.zero_stage == "auto" and int(os.environ.get("RANK", "0")) == 0:
        print(f"[scaling] {choice.reason}", flush=True)
    return choice.stage


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on biases, norms (all 1-D tensors) and the model's `no_weight_decay()` names."""
    from scaling.train.param_groups import no_decay_names, skips_decay

    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if skips_decay(name, p, skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(make_model: Callable[[], nn.Module], ds_config: dict) -> nn.Module:
    """Build under `deepspeed.zero.Init` for ZeRO-3 so no rank ever holds the full model."""
    stage = ds_config["zero_optimization"]["stage"]
    ctx = deepspeed.zero.Init(config_dict_or_path=ds_config) if stage == 3 else contextlib.nullcontext()
    with ctx:
        return make_model()


def initialize(model: nn.Module, cfg: RunConfig, ds_config: dict, groups: list[dict] | None = None,
               total_steps: int | None = None, warmup_steps: int | None = None):
    """AdamW over `groups` (default: decay / no-decay) + the reference's warmup-cosine, inside DeepSpeed.

    A group may carry its own `lr` (layer decay: peak lr x lr_scale); the schedule multiplies
    every group's initial lr, so the per-group ratios hold at every step."""
    lr = peak_lr(cfg)
    o = cfg.optim
    groups = groups if groups is not None else param_groups(model, o.weight_decay)
    optimizer = build_optimizer(groups, lr, o.betas, o.offload_adam, ds_config)
    total, warmup = run_steps(cfg)
    total = total_steps or total
    warmup = warmup if warmup_steps is None else warmup_steps
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: warmup_cosine(opt, lr, min_lr(cfg), warmup_lr(cfg), warmup, total),
        config=ds_config,
    )
    gloo_gather.install_for(engine)
    overlap_reduce.install_for(engine)
    shared_params.install_for(engine)
    grad_partition_buffer.install_for(engine)
    compile_engine(engine, cfg)
    return engine, scheduler


def compile_engine(engine, cfg: RunConfig) -> None:
    """train.compile: DeepSpeed's `engine.compile()` (torch.compile of the whole module, inside
    the engine so ZeRO's hooks stay outside the graph). Inductor's cache goes beside the run's
    checkpoints (unless TORCHINDUCTOR_CACHE_DIR says otherwise), so a resumed run reuses the
    compiled kernels; the first forward, which compiles, prints its time. fp32 matmuls use TF32
    on CUDA either way, as the reference does (`set_float32_matmul_precision('high')`)."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    if not cfg.train.compile:
        return
    if engine.zero_optimization_partition_weights():  # auto chose ZeRO-3 (an explicit 3 is refused by validate)
        if int(os.environ.get("RANK", "0")) == 0:
            print("[scaling] train.compile: skipped under ZeRO-3, whose partitioned parameters torch.compile "
                  "cannot trace; the model runs eager", flush=True)
        return
    cache = compile_cache_dir(Path(cfg.train.output_dir))
    engine.compile()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[scaling] train.compile: the model compiles at its first forward (cache {cache})", flush=True)
        report_first_call(engine, "[scaling] first forward with compilation: {:.1f} s")


def compile_cache_dir(output_dir: Path) -> str:
    """Inductor's cache: <output_dir>/compile_cache, unless the user set TORCHINDUCTOR_CACHE_DIR.
    (Inductor writes its own default into the environment once it has looked, so that value
    counts as unset.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(output_dir.resolve() / "compile_cache")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def report_first_call(module: nn.Module, message: str) -> None:
    """Print `message` with the seconds of `module`'s first forward, then remove the hooks. (On the
    engine, not the compiled module: hooks there would be traced into its graph.)"""
    started = []

    def before(*_):
        started.append(time.perf_counter())

    def after(*_):
        print(message.format(time.perf_counter() - started[0]), flush=True)
        pre.remove()
        post.remove()

    pre, post = module.register_forward_pre_hook(before), module.register_forward_hook(after)


