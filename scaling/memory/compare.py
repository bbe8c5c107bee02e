"""`scaling memory compare`: dual vs encoder-only masking (and optionally none), side by side.

Per variant: parameters, forward/backward FLOPs split encoder/decoder, the bytes autograd
saves for backward with and without activation checkpointing, and (on real tensors) step
time and peak CUDA memory. Counting runs on the meta device (`counting.meta_counting`), so a
ViT-g step is counted without being computed; timing needs real tensors and is skipped on
the CPU for models above `time_max_params`.

The model, masks and loss are the project's own (`build_pretrain_model`, `make_masks`,
`masked_reconstruction_loss`); nothing here re-implements them.
"""
from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
from scaling.masking import ENCODER_MASKS, make_masks, running_cell_maps
from scaling.memory.counting import SavedTensors, cuda_peak_bytes, meta_counting, step_flops, time_step
from scaling.models.classify import build_classifier
from scaling.models.pretrain import VideoMAEPretrain, build_pretrain_model
from scaling.models.vit import count_params, get_size, num_tokens

VARIANTS = {
    "dual": "encoder mask + running-cell decoder mask (VideoMAE V2 dual masking)",
    "encoder_only": "encoder mask only; the decoder reconstructs every hidden token (VideoMAE)",
    "unmasked": "no masking: the fine-tune model (encoder on every token, mean pool, linear head, "
                "cross-entropy); the pre-training model has no honest unmasked form, its decoder "
                "would have nothing to reconstruct",
}

# REFERENCE.md "Measured compute": forward multiply-accumulates per clip of the public code,
# 16 frames at 224 px, tube 0.9 + running cell 0.5.
REFERENCE_MACS = {
    "vit_b": {"dual": {"total": 25.84e9, "decoder": 9.88e9}, "encoder_only": {"total": 35.44e9, "decoder": 19.48e9}},
    "vit_g": {"dual": {"total": 241.6e9, "decoder": 23.3e9}, "encoder_only": {"total": 264.0e9, "decoder": 45.6e9}},
}


@dataclass(frozen=True)
class CompareSpec:
    model: str
    frames: int = 16
    input_size: int = 224
    batch: int = 1
    encoder_mask: str = "tube"
    encoder_ratio: float = 0.9
    decoder_ratio: float = 0.5
    with_unmasked: bool = False
    num_classes: int = 710  # head of the unmasked (fine-tune) variant
    time: bool = True
    repeats: int = 3
    warmup: int = 1
    time_checkpointing: bool = False
    time_max_params: float = 400e6  # CPU only: larger models are counted but not timed
    seed: int = 0

    @property
    def variants(self) -> list[str]:
        return ["dual", "encoder_only"] + (["unmasked"] if self.with_unmasked else [])


def validate(spec: CompareSpec) -> None:
    """Raise ValueError with one sentence naming the bad setting and the fix."""
    size = get_size(spec.model)
    grid = num_tokens(size, spec.frames, spec.input_size)
    if spec.batch < 1:
        raise ValueError(f"--batch {spec.batch} must be at least 1")
    if spec.encoder_mask not in ENCODER_MASKS:
        raise ValueError(f"unknown encoder mask '{spec.encoder_mask}': choose one of {', '.join(ENCODER_MASKS)}")
    hidden = int(spec.encoder_ratio * grid[1] * grid[2])  # per slot for tube; a lower bound for random
    if not 0 < spec.encoder_ratio < 1 or hidden == 0 or hidden == grid[1] * grid[2]:
        raise ValueError(f"--encoder-ratio {spec.encoder_ratio} must hide some but not all tokens; use a value in (0, 1) such as 0.9")
    if not 0 < spec.decoder_ratio < 1:
        raise ValueError(f"--decoder-ratio {spec.decoder_ratio} must be in (0, 1); the running cell takes 0.25, 0.5 or 0.75")
    running_cell_maps(grid, spec.decoder_ratio)  # raises for odd grids and ratios with no cell pattern
    if spec.repeats < 1 or spec.warmup < 0:
        raise ValueError("--repeats must be at least 1 and --warmup at least 0")


def make_step(variant: str, spec: CompareSpec, device: str | torch.device):
    """Build the variant's model on `device` and a `forward() -> loss` closure over fixed inputs.

    Masks are made on the CPU with a seeded generator (the same masks on every device) and
    moved only for real devices: on meta they must stay real (see `meta_counting`).
    Returns (model, forward, tokens) with tokens = {"encoder": N_vis, "decoder": N_dec_seq, "predicted": N_pred}.
    """
    device = torch.device(device)
    size = get_size(spec.model)
    real = device.type != "meta"
    with torch.device(device):
        if variant == "unmasked":
            model = build_classifier(spec.model, spec.num_classes, spec.frames, spec.input_size)
        else:
            model = build_pretrain_model(spec.model, spec.frames, spec.input_size)
        video = torch.randn(spec.batch, 3, spec.frames, spec.input_size, spec.input_size) if real else \
            torch.empty(spec.batch, 3, spec.frames, spec.input_size, spec.input_size)
    model.train()
    if variant == "unmasked":
        labels = torch.zeros(spec.batch, dtype=torch.long, device=device)
        n = model.grid[0] * model.grid[1] * model.grid[2]
        return model, lambda: F.cross_entropy(model(video), labels), {"encoder": n, "decoder": 0, "predicted": 0}

    decoder = {"dual": "running_cell", "encoder_only": "none"}[variant]
    g = torch.Generator().manual_seed(spec.seed)
    enc, dec = make_masks(spec.batch, model.grid, spec.encoder_mask, spec.encoder_ratio, decoder, spec.decoder_ratio, g)
    visible, predicted = int((~enc[0]).sum()), int(dec[0].sum())
    if real:
        enc, dec = enc.to(device), dec.to(device)

    def forward() -> torch.Tensor:
        target = normalized_pixel_target(video, size.patch, size.tubelet)  # (B, N, 2*p*p*3), no grad
        return masked_reconstruction_loss(model(video, enc, dec), target, enc, dec)

    return model, forward, {"encoder": visible, "decoder": visible + predicted, "predicted": predicted}


def param_split(model: nn.Module) -> dict:
    """Encoder / decoder / other parameters; for the fine-tune model the encoder is its trunk
    (patch embedding and blocks) and whatever follows it is 'other'."""
    total = count_params(model)
    if isinstance(model, VideoMAEPretrain):
        enc, dec = count_params(model.encoder), count_params(model.decoder)
    else:
        enc, dec = count_params(model.patch_embed) + count_params(model.blocks), 0
    # "other": the encoder-to-decoder projection and mask token, or the fine-tune head.
    return {"total": total, "encoder": enc, "decoder": dec, "other": total - enc - dec}


def flop_split(summary: dict, model: nn.Module) -> dict:
    """FLOPs total / encoder / decoder / other (+ the attention matmuls within them)."""
    root = type(model).__name__
    mods = summary["modules"]
    if isinstance(model, VideoMAEPretrain):
        enc, dec = mods.get(f"{root}.encoder", 0), mods.get(f"{root}.decoder", 0)
    else:  # the trunk: patch embedding and the top-level blocks (a ModuleList is never called itself)
        trunk = [f"{root}.patch_embed"] + [f"{root}.blocks.{i}" for i in range(len(model.blocks))]
        enc, dec = sum(mods.get(name, 0) for name in trunk), 0
    attention = sum(v for op, v in summary["ops"].items() if "attention" in op)
    return {"total": summary["total"], "encoder": enc, "decoder": dec, "other": summary["total"] - enc - dec,
            "attention": attention}


def count_variant(variant: str, spec: CompareSpec, device: str = "meta") -> dict:
    """Parameters, FLOPs and saved bytes of one variant, counted on meta tensors (or, to check
    that meta counting is faithful, on a real device)."""
    out: dict = {"description": VARIANTS[variant]}
    for checkpointing in (False, True):
        model, forward, tokens = make_step(variant, spec, device)
        model.set_grad_checkpointing(checkpointing)
        saved = SavedTensors(exclude=[*model.parameters(), *model.buffers()])

        def forward_saving() -> torch.Tensor:
            with saved:  # only the forward: what backward will need
                return forward()

        with meta_counting():
            flops = step_flops(forward_saving)
        key = "checkpointing" if checkpointing else "plain"
        if not checkpointing:
            out["tokens"] = tokens
            out["params"] = param_split(model)
            out["forward_flops"] = flop_split(flops["forward"], model)
            out["forward_macs"] = {k: v // 2 for k, v in out["forward_flops"].items()}
            out["backward_flops"] = {}
            out["saved_bytes"] = {}
        out["backward_flops"][key] = flop_split(flops["backward"], model)
        out["saved_bytes"][key] = saved.bytes
    return out


def time_variant(variant: str, spec: CompareSpec, device: torch.device, checkpointing: bool) -> dict:
    """Median step time (forward + loss + backward) and peak CUDA memory on real tensors."""
    torch.manual_seed(spec.seed)
    model, forward, _ = make_step(variant, spec, device)
    model.set_grad_checkpointing(checkpointing)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        forward().backward()

    timing = time_step(step, repeats=spec.repeats, warmup=spec.warmup)
    model.zero_grad(set_to_none=True)
    peak = cuda_peak_bytes(step)
    del model, forward
    gc.collect()
    return {"median_s": timing["median_s"], "times_s": timing["times_s"], "peak_cuda_bytes": peak}


def timing_skip_reason(spec: CompareSpec, device: torch.device, params: int) -> str | None:
    if not spec.time:
        return "not requested (--no-time)"
    if device.type == "cpu" and spec.time_max_params and params > spec.time_max_params:
        return (f"skipped on the CPU above --time-max-params {spec.time_max_params / 1e6:.0f} M parameters "
                f"(pass --time-max-params 0 to time anyway)")
    return None


def reference_check(spec: CompareSpec, variants: dict) -> dict | None:
    """Our forward MACs per clip against REFERENCE.md, where the setting is the reference's."""
    ref = REFERENCE_MACS.get(spec.model)
    same = (spec.frames, spec.input_size, spec.encoder_mask, spec.encoder_ratio, spec.decoder_ratio) == (16, 224, "tube", 0.9, 0.5)
    if not ref or not same:
        return None
    out = {}
    for variant, parts in ref.items():
        ours = variants[variant]["forward_macs"]
        out[variant] = {
            part: {"reference": value, "ours": ours[part] / spec.batch,
                   "error_pct": 100.0 * (ours[part] / spec.batch - value) / value}
            for part, value in parts.items()
        }
    return out


def run_compare(spec: CompareSpec, device: str | None = None, log=print) -> dict:
    """Count (and where possible time) every variant; returns the result dict written as JSON."""
    validate(spec)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = {}
    for name in spec.variants:
        log(f"[memory] counting {name} ...")
        variants[name] = count_variant(name, spec)
    # Step times on a shared CPU are only as good as the machine is quiet: keep the load beside them.
    host = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_avg_1m_before": os.getloadavg()[0]}
    for name, result in variants.items():
        reason = timing_skip_reason(spec, dev, result["params"]["total"])
        result["step_time"] = {"skipped": reason} if reason else {}
        if reason:
            continue
        for checkpointing in (False, True) if spec.time_checkpointing else (False,):
            log(f"[memory] timing {name}{' with checkpointing' if checkpointing else ''} on {dev} ...")
            key = "checkpointing" if checkpointing else "plain"
            result["step_time"][key] = time_variant(name, spec, dev, checkpointing)
    host["load_avg_1m_after"] = os.getloadavg()[0]
    return {
        "spec": asdict(spec),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "host": host,
        "counting": "FlopCounterMode (matmuls, convolutions, attention; 1 MAC = 2 FLOPs) and "
                    "saved_tensors_hooks (unique storages, parameters excluded), on meta tensors, fp32",
        "variants": variants,
        "reference": reference_check(spec, variants),
    }
