"""`train.zero_stage: auto`: the lowest ZeRO stage whose per-GPU memory fits the job.

Lower stages communicate less: ZeRO-1 and 2 reduce gradients once per step (the volume of
plain data parallelism), ZeRO-3 also gathers every parameter in the forward and again in the
backward (1.5x the volume, and a gather before each layer). So the choice is the lowest stage
whose predicted peak per GPU (`scaling.memory.plan`: model states, what ZeRO adds, the
activations of the recipe's micro-batch, the reserve) fits the GPU. DeepSpeed is not imported
here, so `scaling pipeline show` can print the choice.

Pre-training activations are counted by the planner on the real model. Fine-tuning ones are
not (the planner knows the pre-training model only), so a fine-tune stage is decided on what
the stages differ in, the model states and ZeRO's extras, and the reason says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from scaling.memory import plan as P
from scaling.memory.plan import GiB, PlanSpec

STAGES = (1, 2, 3)
DEFAULT_GPU_MEMORY_GB = 80.0  # what `scaling pipeline show` assumes when it cannot ask a GPU


@dataclass(frozen=True)
class ZeroChoice:
    stage: int
    reason: str  # one sentence: which stage and why


def plan_spec(cfg, stage: int, gpus_per_node: int, nodes: int, gpu_memory_gb: float, device: str) -> PlanSpec:
    """The planner's question for run config `cfg` at ZeRO `stage`."""
    m, k, t = cfg.model, cfg.mask, cfg.train
    pretrain = cfg.stage == "pretrain"
    return PlanSpec(model=m.name, masking="encoder_only" if pretrain and k.decoder == "none" else "dual",
                    checkpointing=m.activation_checkpointing, zero_stage=stage,
                    # `auto` is resolved before ranks start; unresolved (pipeline show, GPUs) it means bf16
                    precision="bf16" if t.precision == "auto" else t.precision,
                    gpus_per_node=gpus_per_node, nodes=nodes, gpu_memory_gb=gpu_memory_gb, frames=m.num_frames,
                    input_size=m.input_size, encoder_ratio=k.encoder_ratio if pretrain else 0.9,
                    decoder_ratio=k.decoder_ratio if pretrain else 0.5, device=device, ds_config=t.ds_config)


def stage_peak(cfg, stage: int, clips: int, gpus_per_node: int, nodes: int, gpu_memory_gb: float, device: str) -> dict:
    """{"peak": bytes, "budget": bytes} per GPU at `stage` for `clips` clips per GPU.

    The sum `plan.plan` makes, from its parts: `plan.plan` also asks DeepSpeed's estimator,
    whose import would print to stdout (`scaling pipeline show --json` must print JSON only)."""
    spec = plan_spec(cfg, stage, gpus_per_node, nodes, gpu_memory_gb, device)
    P.validate(spec)
    counts = P.param_counts(spec.model, spec.frames, spec.input_size)
    total, largest = counts["total"], counts["largest_layer"]
    zero = P.zero_settings(spec.ds_config, spec.device)
    states = P.model_states(total, largest, spec.precision, stage, "none", "none", gpus_per_node, nodes)
    counted = ("gpu", "host") if device == "cpu" else ("gpu",)
    fixed = states["gpu"] + sum(e["bytes"] for e in P.extras(spec, total, largest, zero) if e["where"] in counted)
    step = fixed + P.optimizer_temporaries(spec, total, zero)
    budget = int(spec.gpu_memory_gb * GiB) - int(spec.reserve_gb * GiB)
    if cfg.stage != "pretrain":  # fine-tune: activations not counted
        return {"peak": step, "budget": budget}
    profile = P.activation_profile(spec.model, spec.masking, spec.precision, device, spec.frames, spec.input_size,
                                   spec.encoder_ratio, spec.decoder_ratio)
    return {"peak": max(fixed + clips * P.per_clip(profile, spec.checkpointing), step), "budget": budget}


def choose_zero_stage(cfg, gpus_per_node: int, nodes: int = 1, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
                      device: str = "gpu") -> ZeroChoice:
    """The lowest ZeRO stage that fits `cfg`'s micro-batch on `nodes` x `gpus_per_node` GPUs of
    `gpu_memory_gb` GiB; ZeRO-3 (with the numbers) when none does, the run then fails as it would have."""
    world = gpus_per_node * nodes
    clips = max(1, cfg.train.global_batch // (world * cfg.train.grad_accum)) * cfg.data.num_sample
    where = f"{world} {'GPU' if device == 'gpu' else 'CPU rank'}{'s' if world > 1 else ''} of {gpu_memory_gb:.3g} GiB"
    what = f"{cfg.model.name} at {clips} clips per rank" if cfg.stage == "pretrain" else \
        f"{cfg.model.name}'s model states (fine-tune activations are not counted)"
    peaks = {}
    for stage in STAGES:
        peaks[stage] = stage_peak(cfg, stage, clips, gpus_per_node, nodes, gpu_memory_gb, device)
        p = peaks[stage]
        if p["peak"] <= p["budget"]:
            lower = "" if stage == 1 else "; " + ", ".join(
                f"ZeRO-{s} would need {peaks[s]['peak'] / GiB:.1f}" for s in STAGES if s < stage)
            return ZeroChoice(stage, f"train.zero_stage=auto chose ZeRO-{stage}: {what} needs "
                                     f"{p['peak'] / GiB:.1f} of {p['budget'] / GiB:.1f} GiB usable per rank on "
                                     f"{where}{lower} (the lowest stage that fits communicates least)")
    p = peaks[3]
    fix = "use more GPUs or fewer videos per step" if cfg.model.activation_checkpointing else \
        "turn on model.activation_checkpointing"
    return ZeroChoice(3, f"train.zero_stage=auto chose ZeRO-3, though {what} needs {p['peak'] / GiB:.1f} of "
                         f"{p['budget'] / GiB:.1f} GiB usable per rank on {where} even there; {fix}")


def local_memory_gb(local_ranks: int) -> tuple[float, str]:
    """(GiB per rank, device) of this machine: the GPU's memory, or on CPU ranks the RAM shared by them."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB, "gpu"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / max(1, local_ranks) / GiB, "cpu"


def resolve_zero_stage(cfg, world: int) -> ZeroChoice:
    """This run's stage: an explicit train.zero_stage as given, `auto` decided for the ranks and
    memory this process sees (the same answer on every rank: it reads no per-rank state)."""
    stage = cfg.train.zero_stage
    if stage != "auto":
        return ZeroChoice(int(stage), f"ZeRO-{stage} (train.zero_stage={stage})")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    memory, device = local_memory_gb(local)
    return choose_zero_stage(cfg, local, max(1, world // local), memory, device)
