"""`scaling memory plan`: will a model size fit on given GPUs, and with what micro-batch?

Per GPU at the step's peak, in bytes:

    model states      DeepSpeed's own estimate (what `estimate_zero3_model_states_mem_needs_all_cold`
                      and `estimate_zero2_model_states_mem_needs_all_cold` print), re-derived here
                      from named per-parameter byte counts and tested to agree exactly
  + extras            what that estimate leaves out but a run allocates, each named with its reason
                      (stage 1's unpartitioned gradients, ZeRO-3's 16-bit partition and the gathered
                      parameters it keeps for reuse, the gradient reduce bucket)
  + max(activations, optimizer temporaries)
                      activations: clips x (bytes autograd saves for backward, counted on the real
                      model + the clip and its target + under checkpointing one block recomputed);
                      they are freed before the optimizer step, whose temporaries take their place
  + reserve           CUDA context, NCCL and allocator slack: a flat guess (--reserve-gb), not measured
  + on CPU ranks       three measured terms (CPU_TERMS): framework buffers (gloo, shared-memory comm,
                      oneDNN, malloc arenas), DeepSpeed flat buffers per partitioned parameter, and the
                      share of the activations glibc's arenas keep beside the next step's; fitted to the
                      peak RSS of real 2-rank runs of debug, ViT-S and ViT-B (bench/plan_calibrate.py)

Checkpointing is true, false or N: the first N encoder blocks and the same share of the
decoder's; `--budget-gb` picks, per masking mode, the fewest blocks with which the clips fit.

Activations are counted, not modelled: the project's own model, masks and loss run on meta
tensors (`counting.meta_counting`, the GPU code path), on 1- and 2-block models extrapolated per
block; for CPU ranks such as this box's, one real block per stack adds what fp32 attention saves.
bench/plan_validate.py compares the prediction with the peak RSS of real 2-rank ZeRO-3 runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache

import torch

from scaling.errors import UserError
from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
from scaling.masking import MASKINGS, make_masks, running_cell_maps
from scaling.memory.counting import SavedTensors, meta_counting
from scaling.models.pretrain import VideoMAEPretrain
from scaling.models.vit import Block, ViTSize, checkpoint_count, get_size, num_tokens
from scaling.precision import DTYPES

GiB = 2**30

OFFLOAD = ("none", "cpu", "nvme")
# DeepSpeed's defaults for the ZeRO settings the extras depend on (deepspeed/runtime/zero/config.py).
ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                 "contiguous_gradients": True, "sub_group_size": 1e9, "buffer_count": 4}


# What CPU ranks hold beyond the named states, buffers and counted activations: fitted to the
# per-rank peak RSS (above an idle rank, after 3 steps) of real 2-rank ZeRO-3 bf16 runs of debug,
# ViT-S and ViT-B (bench/plan_calibrate.py, bench/results/plan_calibration.json). Each is one
# named term in the plan; none of them exists on a GPU's memory.
CPU_TERMS = {
    # gloo and shared-memory comm buffers, oneDNN primitive caches, per-thread malloc arenas
    # and the autograd engine: the same for every size (the debug model's run is almost only this)
    "framework_bytes": 135 * 2**20,
    # DeepSpeed's flat buffers beyond the estimate's 18 bytes/param (fp32 gradient partition
    # buffers, the reduce-scatter copies of a bucket), bytes per parameter of the rank's partition
    "flat_buffer_bytes_per_param": 8.4,
    # glibc keeps freed activation pages in its arenas and a later step allocates beside them
    # (the peak RSS grows over the first steps): a share of the step's activations
    "allocator_share_of_activations": 0.44,
}


class PlanError(UserError, ValueError):
    """A setting the user can fix; the message is one sentence naming it and the fix."""


@dataclass(frozen=True)
class PlanSpec:
    model: str = "vit_g"
    masking: str = "dual"  # dual (VideoMAE V2) | encoder_only (VideoMAE)
    checkpointing: bool | int = True  # true, false or N encoder blocks (and the same share of the decoder's)
    precision: str = "bf16"
    zero_stage: int = 3
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_params: str = "none"  # none | cpu | nvme (ZeRO-3 only)
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gb: float = 80.0  # GiB
    frames: int = 16
    input_size: int = 224
    encoder_ratio: float = 0.9
    decoder_ratio: float = 0.5
    reserve_gb: float = 2.0
    device: str = "gpu"  # whose code path and memory: gpu, or cpu (this box: GPU memory = host RAM)
    ds_config: str = "ds_configs/zero3_bf16.json"
    micro_batch: int = 0  # clips per GPU to show the total for; 0 = only the largest that fits
    budget_gb: float = 0.0  # GiB per rank: recommend the fewest checkpointed blocks and the largest micro-batch; 0 = no
    calibrated: bool = True  # device cpu: add the measured terms of CPU_TERMS (False: what the model alone predicts)

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


def validate(spec: PlanSpec) -> None:
    try:
        grid = num_tokens(get_size(spec.model), spec.frames, spec.input_size)
    except ValueError as e:
        raise PlanError(str(e)) from None
    checks = [
        (spec.masking in MASKINGS, f"unknown masking '{spec.masking}': choose dual or encoder_only"),
        (spec.precision in DTYPES, f"unknown precision '{spec.precision}': choose bf16, fp16 or fp32"),
        (spec.zero_stage in (1, 2, 3), f"ZeRO stage {spec.zero_stage} does not exist: choose 1, 2 or 3"),
        (spec.offload_optimizer in OFFLOAD and spec.offload_params in OFFLOAD,
         f"unknown offload '{spec.offload_optimizer}/{spec.offload_params}': choose none, cpu or nvme"),
        (spec.offload_optimizer != "nvme" or spec.zero_stage == 3,
         f"NVMe offload needs ZeRO stage 3 (ZeRO-Infinity), not stage {spec.zero_stage}: use --zero-stage 3 or --offload-optimizer cpu"),
        (spec.offload_params == "none" or spec.zero_stage == 3,
         f"parameter offload needs ZeRO stage 3, not stage {spec.zero_stage}: use --zero-stage 3 or --offload-params none"),
        (spec.offload_params == "none" or spec.offload_optimizer != "none",
         "parameter offload without optimizer offload is not a DeepSpeed set-up: add --offload-optimizer cpu or nvme"),
        (spec.gpus_per_node >= 1 and spec.nodes >= 1, "--gpus-per-node and --nodes must be at least 1"),
        (spec.gpu_memory_gb > 0 and spec.reserve_gb >= 0, "--gpu-memory-gb must be positive and --reserve-gb not negative"),
        (0 < spec.encoder_ratio < 1, f"--encoder-ratio {spec.encoder_ratio} must be in (0, 1), e.g. 0.9"),
        (spec.device in ("gpu", "cpu"), f"unknown device '{spec.device}': choose gpu or cpu"),
        (spec.micro_batch >= 0, "--micro-batch must be 0 (largest that fits) or a clip count"),
        (isinstance(spec.checkpointing, bool) or 0 <= spec.checkpointing <= get_size(spec.model).depth,
         f"--checkpoint-blocks {spec.checkpointing} is not a block count of {spec.model}: use 0..{get_size(spec.model).depth}"),
        (spec.budget_gb >= 0, "--budget-gb must be positive (GiB per rank), or 0 for no recommendation"),
    ]
    for ok, message in checks:
        if not ok:
            raise PlanError(message)
    try:
        running_cell_maps(grid, spec.decoder_ratio)
    except ValueError as e:
        raise PlanError(str(e)) from None
    zero_settings(spec.ds_config)


def zero_settings(ds_config: str, device: str = "gpu") -> dict:
    """The ZeRO settings the extras depend on, from a ds_configs/*.json as ranks on `device` read
    it (DeepSpeed's defaults where it sets none)."""
    from scaling.config import ConfigError, ds_json_for

    try:
        zero = ds_json_for(ds_config, device).get("zero_optimization", {})
    except ConfigError as e:
        raise PlanError(str(e)) from None
    settings = {**zero, **zero.get("offload_optimizer", {})}  # buffer_count lives in offload_optimizer
    return {k: settings.get(k, v) for k, v in ZERO_DEFAULTS.items()}


# ---------------------------------------------------------------- parameters and model states

@cache
def param_counts(model: str, frames: int = 16, input_size: int = 224) -> dict:
    """Total parameters and the largest layer (most parameters held directly by one module),
    as DeepSpeed's `model_to_params` counts them; built on meta, so free for any size."""
    with torch.device("meta"):
        m = VideoMAEPretrain(get_size(model), frames, input_size)
    total = sum(p.numel() for p in m.parameters())
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in m.modules())
    return {"total": total, "largest_layer": largest}


def state_bytes(precision: str) -> dict:
    """Bytes per parameter of each model state. 16-bit training keeps 16-bit params and grads for
    compute plus an fp32 gradient, fp32 master weights and Adam's two fp32 moments for the
    optimizer: 2 + 2 + 4 + 4 + 8 (DeepSpeed's "18 = 2 grads16 + 4 grads32 + 4 params32 + 8
    optimizer states" plus the 16-bit params). fp32 training has no copies: 4 + 4 + 8."""
    if precision == "fp32":
        return {"param": 4, "grad": 4, "grad32": 0, "master": 0, "adam": 8}
    return {"param": 2, "grad": 2, "grad32": 4, "master": 4, "adam": 8}


def model_states(total: int, largest: int, precision: str, stage: int, offload_optimizer: str, offload_params: str,
                 gpus_per_node: int, nodes: int, buffer_factor: float = 1.5) -> dict:
    """{"gpu": bytes per GPU, "host_per_node": bytes}, with DeepSpeed's estimator assumptions.

    Stages 1 and 2 share DeepSpeed's one estimate: 16-bit params replicated, the rest
    partitioned. ZeRO-3 partitions the same optimizer-side bytes and gathers one layer (its
    16-bit params and grads) at a time; built under `zero.Init` (as the project does), the host
    holds one fp32 layer per GPU while building. Host figures carry DeepSpeed's 1.5 buffer
    factor. NVMe counts as CPU offload here (same GPU side; its host side is an upper bound).
    The float expressions follow DeepSpeed's order so that the results agree to the byte.
    """
    b = state_bytes(precision)
    optimizer_side = b["grad"] + b["grad32"] + b["master"] + b["adam"]  # 18 for 16-bit
    # What offloading moves off the GPU: the optimizer's fp32 side (16 for 16-bit training).
    offloaded = b["grad32"] + b["master"] + b["adam"] if b["master"] else b["grad"] + b["adam"]
    gpus = nodes * gpus_per_node
    fp32 = 4  # DeepSpeed builds in fp32 before converting
    if stage in (1, 2):
        if offload_optimizer != "none":
            gpu = b["param"] * total
            host = total * max(fp32 * gpus, offloaded) * buffer_factor
        else:
            gpu = b["param"] * total + int(optimizer_side * total / gpus)
            host = total * fp32 * gpus_per_node * buffer_factor
        return {"gpu": int(gpu), "host_per_node": int(host)}
    layer = (b["param"] + b["grad"]) * largest  # one gathered layer: params + grads
    if offload_optimizer != "none" and offload_params != "none":
        gpu, host = layer, total * (offloaded + b["param"]) * (1 / nodes) * buffer_factor
    elif offload_optimizer != "none":
        gpu, host = layer + int(b["param"] * total / gpus), total * offloaded * (1 / nodes) * buffer_factor
    else:
        gpu, host = layer + int(optimizer_side * total / gpus), largest * fp32 * gpus_per_node * buffer_factor
    return {"gpu": int(gpu), "host_per_node": int(host)}


def deepspeed_estimate(total: int, largest: int, stage: int, offload_optimizer: str, offload_params: str,
                       gpus_per_node: int, nodes: int) -> dict:
    """DeepSpeed's own numbers (the functions its `..._all_cold`/`..._all_live` helpers print),
    for the same set-up; they assume 16-bit mixed precision and know no NVMe (read as CPU)."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpus_per_node, nodes, cpu_offload=offload_optimizer != "none",
            cpu_offload_params=offload_params != "none", zero_init=True)
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        host, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=offload_optimizer != "none")
    return {"gpu": gpu, "host_per_node": host}


def extras(spec: PlanSpec, total: int, largest: int, zero: dict) -> list[dict]:
    """What a run holds beyond DeepSpeed's estimate, as {"name", "bytes", "where", "why"}.
    `where` is "gpu" or "host" (per rank); on the CPU device both are the same RAM."""
    b, G, stage = state_bytes(spec.precision), spec.gpus, spec.zero_stage
    out = []

    def add(name, nbytes, where, why):
        out.append({"name": name, "bytes": int(nbytes), "where": where, "why": why})

    if stage == 1:
        add(f"unpartitioned {spec.precision} gradients",
            b["grad"] * total - (0 if spec.offload_optimizer != "none" else b["grad"] * total // G),
            "gpu", "ZeRO-1 keeps every gradient until the reduce; DeepSpeed's one ZeRO-1/2 estimate partitions them")
    if stage == 3:
        if spec.offload_optimizer == "none":
            add(f"{spec.precision} parameter partition", b["param"] * total / G, "gpu", "ZeRO-3's own shard of the params: "
                "the estimate's 18 bytes/param leave it out (its ZeRO-2 and its optimizer-offload counts have it)")
        elif spec.offload_params != "none" and spec.device == "cpu":
            add(f"{spec.precision} parameter partition, in RAM", b["param"] * total / G, "host",
                "offloaded params: on this box the offload target is the same RAM")
        # A gathered parameter stays gathered when the trace reuses it within max_reuse_distance
        # parameters. Forward then backward puts the layer at depth x (in parameters) 2 (P - x)
        # apart from its own reuse, so the last reuse_distance / 2 parameters stay gathered,
        # capped by max_live_parameters. From the second step on (the first one records the trace).
        kept = min(total, zero["stage3_max_reuse_distance"] / 2, zero["stage3_max_live_parameters"])
        add("gathered params kept for reuse", max(0.0, b["param"] * (kept - largest)), "gpu",
            f"stage3_max_reuse_distance {zero['stage3_max_reuse_distance']:.0e} keeps the last {kept / 1e6:.0f} M "
            f"params gathered between forward and backward (beyond the estimate's one layer)")
    if stage >= 2 and zero["contiguous_gradients"]:
        bucket = zero["reduce_bucket_size"]
        # The GPU allocator reserves the whole bucket; on the CPU only the pages written count.
        used = bucket if spec.device == "gpu" else min(bucket, total)
        add("gradient reduce bucket", b["grad"] * used, "gpu", f"contiguous_gradients: one reduce_bucket_size "
            f"({bucket:.0e}) buffer of gradients")
    if spec.device == "cpu" and spec.offload_optimizer != "none":
        # On this box the offload target is the same RAM: what DeepSpeed keeps on the host counts too.
        add(f"{spec.precision} gradient partition, in RAM", b["grad"] * total / G, "host",
            "with the optimizer offloaded, ZeRO keeps its gradient partition where the optimizer steps")
        if spec.offload_optimizer == "cpu":
            add("optimizer states offloaded, in RAM", (b["grad32"] + b["master"] + b["adam"]) * total / G, "host",
                "fp32 gradient, master weights and Adam moments of the partition")
        else:
            # ZeRO-Infinity steps one sub-group at a time: its fp32 master, gradient and moments are
            # read into buffer_count swap buffers, and torch's AdamW makes its moments at the
            # first step before they are swapped out.
            sub = min(total / G, zero["sub_group_size"])
            add("NVMe swap buffers", zero["buffer_count"] * 4 * sub, "host",
                f"buffer_count ({zero['buffer_count']}) fp32 buffers of one sub-group ({sub / 1e6:.0f} M elements)")
            add("sub-group fp32 gradient and new Adam moments", (4 + 8) * sub, "host",
                "the fp32 gradient buffer of a sub-group and the moments AdamW creates before they are swapped out")
    if spec.device == "cpu" and spec.calibrated:
        add("framework buffers (measured)", CPU_TERMS["framework_bytes"], "host",
            "gloo and shared-memory comm buffers, oneDNN caches, malloc arenas, autograd: constant, fitted to real runs")
        add("DeepSpeed flat buffers (measured)", CPU_TERMS["flat_buffer_bytes_per_param"] * total / G, "host",
            f"{CPU_TERMS['flat_buffer_bytes_per_param']:.2f} bytes per partitioned parameter beyond the estimate, fitted to real runs")
    return out


def allocator_share(spec: PlanSpec) -> float:
    """Extra activation bytes per counted byte that CPU ranks' malloc arenas hold (CPU_TERMS)."""
    return CPU_TERMS["allocator_share_of_activations"] if spec.device == "cpu" and spec.calibrated else 0.0


def optimizer_temporaries(spec: PlanSpec, total: int, zero: dict) -> int:
    """Scratch of torch's AdamW at the step, on the optimizer's device: one fp32 tensor per
    partition element with the foreach implementation (GPU), two with the single-tensor one
    (CPU: `exp_avg_sq.sqrt() / bias_correction` holds both). ZeRO-3 steps one sub-group at a time."""
    if spec.offload_optimizer != "none" and spec.device == "gpu":
        return 0  # on the host
    part = total / spec.gpus
    if spec.zero_stage == 3:
        part = min(part, zero["sub_group_size"])
    return int((4 if spec.device == "gpu" else 8) * part)


# ---------------------------------------------------------------- activations

def _step_saved_bytes(size: ViTSize, frames: int, input_size: int, masking: str, precision: str,
                      checkpointing: bool, device: str, batch: int, encoder_ratio: float, decoder_ratio: float) -> int:
    """Bytes autograd saves for backward in one forward + loss of the real pre-training model:
    on meta tensors (`device="meta"`, the GPU path) or real ones. Parameters and buffers excluded."""
    dtype = DTYPES[precision]
    with torch.device(device):
        model = VideoMAEPretrain(size, frames, input_size).to(dtype)
        video = torch.empty(batch, 3, frames, input_size, input_size, dtype=dtype)
    if device != "meta":
        video.normal_(generator=torch.Generator(device).manual_seed(0))
    model.train()
    model.set_grad_checkpointing(checkpointing)
    g = torch.Generator().manual_seed(0)
    # Masks stay real CPU tensors: the model turns them into index lists (see meta_counting).
    enc, dec = make_masks(batch, model.grid, "tube", encoder_ratio, MASKINGS[masking], decoder_ratio, g)
    saved = SavedTensors(exclude=[*model.parameters(), *model.buffers()])
    with meta_counting(), saved:
        target = normalized_pixel_target(video, size.patch, size.tubelet)
        masked_reconstruction_loss(model(video, enc, dec), target, enc, dec)
    return saved.bytes


def _block_saved_bytes(width: int, heads: int, mlp_ratio: float, tokens: int, precision: str, device: str) -> int:
    """Bytes one lone transformer block saves for backward on (1, tokens, width)."""
    dtype = DTYPES[precision]
    with torch.device(device):
        block = Block(width, heads, mlp_ratio).to(dtype)
        x = torch.zeros(1, tokens, width, dtype=dtype, requires_grad=True)
    saved = SavedTensors(exclude=list(block.parameters()))
    with meta_counting(), saved:
        block(x)
    return saved.bytes


@cache
def activation_profile(model: str | ViTSize, masking: str, precision: str, device: str = "gpu", frames: int = 16,
                       input_size: int = 224, encoder_ratio: float = 0.9, decoder_ratio: float = 0.5) -> dict:
    """Activation bytes per clip of one set-up, with and without activation checkpointing.

    Counted on meta tensors, which take the GPU code path. Every block of a stack saves the
    same, so a 1+1-block model and one a block deeper in the encoder or the decoder give the
    whole model exactly (tests check it against the full count). On the CPU, attention runs in
    fp32 (models/vit.py) and saves more: that difference is measured on one real block of each
    stack and added per block (a real full-size CPU forward would cost minutes: bf16 Conv3d).
    Returns bytes per clip: saved (plain / checkpointing), encoder and decoder block, the clip
    + target the loop holds, and the token counts the per-token figures divide by.
    """
    size = get_size(model) if isinstance(model, str) else model

    def saved(enc_depth: int, dec_depth: int, ckpt: bool) -> int:
        shape = dataclasses.replace(size, depth=enc_depth, decoder_depth=dec_depth)
        return _step_saved_bytes(shape, frames, input_size, masking, precision, ckpt, "meta", 1, encoder_ratio, decoder_ratio)

    t, h, w = num_tokens(size, frames, input_size)
    n = t * h * w
    enc, dec = make_masks(1, (t, h, w), "tube", encoder_ratio, MASKINGS[masking], decoder_ratio, torch.Generator().manual_seed(0))
    visible, decoded = int((~enc[0]).sum()), int(dec[0].sum())
    stacks = {"encoder_block": (size.width, size.heads, size.depth, visible),
              "decoder_block": (size.decoder_width, size.decoder_heads, size.decoder_depth, visible + decoded)}
    out = {"depth": {"encoder_block": size.depth, "decoder_block": size.decoder_depth}}
    for ckpt in (False, True):
        base = saved(1, 1, ckpt)
        blocks = {"encoder_block": saved(2, 1, ckpt) - base, "decoder_block": saved(1, 2, ckpt) - base}
        total = base + sum((depth - 1) * blocks[k] for k, (_, _, depth, _) in stacks.items())
        if device == "cpu" and not ckpt:  # under checkpointing a block keeps only its input either way
            for k, (width, heads, depth, tokens) in stacks.items():
                extra = (_block_saved_bytes(width, heads, size.mlp_ratio, tokens, precision, "cpu")
                         - _block_saved_bytes(width, heads, size.mlp_ratio, tokens, precision, "meta"))
                blocks[k] += extra
                total += depth * extra
        out["checkpointing" if ckpt else "plain"] = total
        # A checkpointed block keeps only its input: what each block saves either way.
        out.update({(f"{k}_checkpointed" if ckpt else k): v for k, v in blocks.items()})
    out["tokens"] = {"encoder": visible, "decoder": visible + decoded, "predicted": decoded}
    out["per_token"] = {"encoder_block": out["encoder_block"] / visible, "decoder_block": out["decoder_block"] / (visible + decoded)}
    # The training loop holds the fp32 clip and its fp32 normalized-pixel target (B, N, 2*p*p*3).
    out["inputs"] = 4 * 3 * frames * input_size * input_size + 4 * n * size.tubelet * size.patch**2 * 3
    return out


def checkpointed_counts(profile: dict, checkpointing: bool | int) -> dict:
    """Checkpointed blocks per stack for `model.activation_checkpointing` (vit.checkpoint_count)."""
    enc = profile["depth"]["encoder_block"]
    return {k: checkpoint_count(checkpointing, depth, enc) for k, depth in profile["depth"].items()}


def saved_bytes(profile: dict, checkpointing: bool | int) -> int:
    """Bytes saved for backward per clip with `checkpointing` (true, false or N blocks): every
    checkpointed block keeps its input instead of everything it would save."""
    counts = checkpointed_counts(profile, checkpointing)
    return profile["plain"] - sum(n * (profile[k] - profile[f"{k}_checkpointed"]) for k, n in counts.items())


def per_clip(profile: dict, checkpointing: bool | int) -> int:
    """Activation bytes per clip at the backward peak: what is saved, the loop's inputs, and
    when any block is checkpointed the activations of the largest one being recomputed."""
    counts = checkpointed_counts(profile, checkpointing)
    recompute = max((profile[k] for k, n in counts.items() if n), default=0)
    return saved_bytes(profile, checkpointing) + profile["inputs"] + recompute


def largest_micro_batch(budget: int, fixed: int, clip: int, optimizer_scratch: int) -> int:
    """Most clips with fixed + max(clips x clip, optimizer scratch) <= budget (0: nothing fits)."""
    if fixed + optimizer_scratch > budget or fixed + clip > budget:
        return 0
    return (budget - fixed) // clip


def plan(spec: PlanSpec) -> dict:
    validate(spec)
    counts = param_counts(spec.model, spec.frames, spec.input_size)
    total, largest = counts["total"], counts["largest_layer"]
    zero = zero_settings(spec.ds_config, spec.device)
    states = model_states(total, largest, spec.precision, spec.zero_stage, spec.offload_optimizer, spec.offload_params,
                          spec.gpus_per_node, spec.nodes)
    ds = deepspeed_estimate(total, largest, spec.zero_stage, spec.offload_optimizer, spec.offload_params,
                            spec.gpus_per_node, spec.nodes)
    more = extras(spec, total, largest, zero)
    counted = ("gpu", "host") if spec.device == "cpu" else ("gpu",)
    fixed = states["gpu"] + sum(e["bytes"] for e in more if e["where"] in counted)
    scratch = optimizer_temporaries(spec, total, zero)
    budget = int(spec.gpu_memory_gb * GiB) - int(spec.reserve_gb * GiB)
    rows = []
    settings = [False, True] + ([] if isinstance(spec.checkpointing, bool) else [spec.checkpointing])
    for masking in MASKINGS:
        profile = activation_profile(spec.model, masking, spec.precision, spec.device, spec.frames, spec.input_size,
                                     spec.encoder_ratio, spec.decoder_ratio)
        for ckpt in settings:
            counted_clip = per_clip(profile, ckpt)
            clip = int(counted_clip * (1 + allocator_share(spec)))
            rows.append({"masking": masking, "checkpointing": ckpt, "saved_per_clip": saved_bytes(profile, ckpt),
                         "activation_per_clip": clip, "allocator_retention_per_clip": clip - counted_clip,
                         "largest_micro_batch": largest_micro_batch(budget, fixed, clip, scratch),
                         "selected": masking == spec.masking and same_setting(ckpt, spec.checkpointing)})
    chosen = next(r for r in rows if r["selected"])
    result = {
        "spec": dataclasses.asdict(spec),
        "params": counts,
        "model_states": {"planner": states, "deepspeed_estimator": ds if spec.precision != "fp32" else None,
                         "agree": states == ds if spec.precision != "fp32" else None},
        "extras": more,
        "optimizer_temporaries": scratch,
        "fixed_per_gpu": fixed,
        "reserve": int(spec.reserve_gb * GiB),
        "budget_per_gpu": budget,
        "activations": {m: activation_profile(spec.model, m, spec.precision, spec.device, spec.frames, spec.input_size,
                                              spec.encoder_ratio, spec.decoder_ratio) for m in MASKINGS},
        "fits": rows,
        "largest_micro_batch": chosen["largest_micro_batch"],
    }
    if spec.micro_batch:
        result["at_micro_batch"] = {"clips": spec.micro_batch, **peak(result, spec.micro_batch)}
    if spec.budget_gb:
        result["budget"] = recommend(spec, fixed, scratch)
    return result


def same_setting(a: bool | int, b: bool | int) -> bool:
    """`model.activation_checkpointing` values compared as written: 1 is one block, not true."""
    return type(a) is type(b) and a == b


def recommend(spec: PlanSpec, fixed: int, scratch: int) -> dict:
    """Per masking mode, for `--budget-gb` per rank: the fewest checkpointed encoder blocks N
    with which `--micro-batch` clips (at least 1) fit, and the largest micro-batch at that N.
    Fewer blocks recompute less, so this N is the fastest setting that fits; a larger budget
    never asks for more blocks. {"fits": False, ...} when even every block checkpointed does not."""
    budget = int(spec.budget_gb * GiB) - int(spec.reserve_gb * GiB)
    clips = max(spec.micro_batch, 1)
    out = {"budget_gb": spec.budget_gb, "budget_per_rank": budget, "clips": clips, "by_masking": {}}
    for masking in MASKINGS:
        profile = activation_profile(spec.model, masking, spec.precision, spec.device, spec.frames, spec.input_size,
                                     spec.encoder_ratio, spec.decoder_ratio)
        depth = profile["depth"]["encoder_block"]
        clips_of = [int(per_clip(profile, n) * (1 + allocator_share(spec))) for n in range(depth + 1)]
        sweep = [{"blocks": n, "activation_per_clip": c, "largest_micro_batch": largest_micro_batch(budget, fixed, c, scratch)}
                 for n, c in enumerate(clips_of)]
        pick = next((r for r in sweep if r["largest_micro_batch"] >= clips), None)
        least = fixed + max(clips * sweep[-1]["activation_per_clip"], scratch)
        out["by_masking"][masking] = {
            "fits": pick is not None, "sweep": sweep,
            **({"checkpoint_blocks": pick["blocks"], "largest_micro_batch": pick["largest_micro_batch"],
                "peak": fixed + max(clips * pick["activation_per_clip"], scratch)} if pick else
               {"least_needed": least}),
        }
    return out


def peak(result: dict, clips: int, masking: str | None = None, checkpointing: bool | int | None = None) -> dict:
    """Predicted peak per GPU (without the reserve) for `clips` per GPU, by phase."""
    spec = result["spec"]
    want = spec["checkpointing"] if checkpointing is None else checkpointing
    row = next(r for r in result["fits"] if r["masking"] == (masking or spec["masking"])
               and same_setting(r["checkpointing"], want))
    backward = result["fixed_per_gpu"] + clips * row["activation_per_clip"]
    step = result["fixed_per_gpu"] + result["optimizer_temporaries"]
    return {"forward_backward": backward, "optimizer_step": step, "peak": max(backward, step),
            "fits": max(backward, step) <= result["budget_per_gpu"]}


# ---------------------------------------------------------------- output and CLI

def table(result: dict) -> str:
    s, c = result["spec"], result["params"]
    gib = lambda n: f"{n / GiB:8.2f}"  # noqa: E731
    offload = f", offload optimizer={s['offload_optimizer']} params={s['offload_params']}" if s["offload_optimizer"] != "none" else ""
    lines = [f"{s['model']}: {c['total'] / 1e6:.1f} M params (largest layer {c['largest_layer'] / 1e6:.2f} M), {s['precision']}, "
             f"ZeRO-{s['zero_stage']}{offload}, {s['gpus_per_node']} GPUs x {s['nodes']} node(s), "
             f"{s['gpu_memory_gb']:g} GiB per GPU, {s['frames']}x{s['input_size']}",
             f"activations counted on the {'GPU code path (meta tensors)' if s['device'] == 'gpu' else 'CPU code path (real tensors)'}",
             "", "per GPU                                          GiB"]
    ms, ds = result["model_states"]["planner"], result["model_states"]["deepspeed_estimator"]
    lines.append(f"  model states (DeepSpeed's assumptions)    {gib(ms['gpu'])}   host per node {ms['host_per_node'] / GiB:.2f}")
    if ds is not None:
        lines.append(f"    DeepSpeed estimator says                {gib(ds['gpu'])}   host per node {ds['host_per_node'] / GiB:.2f}")
    for e in result["extras"]:
        lines.append(f"  + {e['name'] + (' (host)' if e['where'] == 'host' else ''):<39s}{gib(e['bytes'])}")
    lines.append(f"  = fixed                                   {gib(result['fixed_per_gpu'])}")
    lines.append(f"  optimizer-step scratch (not with acts)    {gib(result['optimizer_temporaries'])}")
    if s["device"] == "cpu" and s["calibrated"]:
        share = CPU_TERMS["allocator_share_of_activations"]
        lines.append(f"  + malloc arenas keep {share:.0%} of the activations (measured; in the act/clip column)")
    lines.append(f"  reserve (CUDA context, allocator slack)   {gib(result['reserve'])}")
    lines += ["", "masking       checkpointing  saved/clip MiB  peak act/clip MiB  largest micro-batch (clips/GPU)"]
    for r in result["fits"]:
        mark = "  <-" if r["selected"] else ""
        ckpt = r["checkpointing"]
        said = ("yes" if ckpt else "no") if isinstance(ckpt, bool) else f"{ckpt} blocks"
        lines.append(f"{r['masking']:<13s} {said:<14s} {r['saved_per_clip'] / 2**20:14.1f} "
                     f"{r['activation_per_clip'] / 2**20:18.1f}  {r['largest_micro_batch']:>10d}{mark}")
    if "at_micro_batch" in result:
        a = result["at_micro_batch"]
        lines.append(f"\nat {a['clips']} clips per GPU: peak {a['peak'] / GiB:.2f} GiB + reserve -> "
                     f"{'fits' if a['fits'] else 'does NOT fit'} in {s['gpu_memory_gb']:g} GiB")
    if "budget" in result:
        lines += budget_lines(result["budget"])
    return "\n".join(lines)


def budget_lines(budget: dict) -> list[str]:
    """The --budget-gb recommendation, one line per masking mode."""
    lines = [f"\nin {budget['budget_gb']:g} GiB per rank (less the reserve), {budget['clips']}+ clips per rank:"]
    for masking, r in budget["by_masking"].items():
        if r["fits"]:
            lines.append(f"  {masking:<13s} model.activation_checkpointing={r['checkpoint_blocks']}, micro-batch up to "
                         f"{r['largest_micro_batch']} (peak {r['peak'] / GiB:.2f} GiB at {budget['clips']})")
        else:
            lines.append(f"  {masking:<13s} nothing fits: even with every block checkpointed {budget['clips']} clip(s) "
                         f"need {r['least_needed'] / GiB:.2f} GiB; use more ranks, offload or a larger budget")
    return lines
