"""`scaling memory compare`: dual vs encoder-only masking (and optionally none), side by side,
and with `finetune` the fine-tune steps next to them: every token (VideoMAE V2) vs MAR's
running-cell drop mask with a linear or bridging head.

Per variant: parameters, forward/backward FLOPs split encoder/decoder, the bytes autograd
saves for backward with and without activation checkpointing, and (on real tensors) step
time and peak CUDA memory. Counting runs on the meta device (`counting.meta_counting`), so a
ViT-g step is counted without being computed; timing needs real tensors and is skipped on
the CPU for models above `time_max_params`.

The model, masks and loss are the project's own (`build_pretrain_model`, `make_masks`,
`masked_reconstruction_loss`; `build_classifier`, `finetune_drop_mask`, `finetune_loss` for
the fine-tune variants); nothing here re-implements them.
"""
from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from scaling.errors import UserError
from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
from scaling.masking import MASKINGS, finetune_drop_mask, make_masks, mask_names, running_cell_maps
from scaling.memory.counting import SavedTensors, count_flops, cuda_peak_bytes, meta_counting, step_flops, time_step
from scaling.models.classify import HEADS, VideoClassifier, build_classifier
from scaling.models.pretrain import VideoMAEPretrain, build_pretrain_model
from scaling.models.vit import count_params, get_size, num_tokens

VARIANTS = {
    "dual": "encoder mask + running-cell decoder mask (VideoMAE V2 dual masking)",
    "encoder_only": "encoder mask only; the decoder reconstructs every hidden token (VideoMAE)",
    "unmasked": "no masking: the fine-tune model (encoder on every token, mean pool, linear head, "
                "cross-entropy); the pre-training model has no honest unmasked form, its decoder "
                "would have nothing to reconstruct",
}
MAR_PREFIX = "mar"  # fine-tune variants with MAR's drop mask: "mar50_linear", "mar50_bridging"

# The published compute of VideoMAE V2 (paper and public code): forward multiply-accumulates per clip of the public code,
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
    num_classes: int = 710  # head of the unmasked and MAR (fine-tune) variants
    unmasked_head: str = "linear"  # head of the unmasked variant (a fine-tune run counting its own step may differ)
    finetune: bool = False  # "unmasked" plus MAR's masked fine-tune step per head in finetune_heads
    finetune_heads: tuple[str, ...] = ("linear", "bridging")
    finetune_ratio: float = 0.5  # share of tokens MAR's running-cell mask drops before the encoder
    finetune_reconstruction: float = 0.0  # weight of MAR's reconstruction branch (0: no branch)
    time: bool = True
    repeats: int = 3
    warmup: int = 1
    time_checkpointing: bool = False
    time_max_params: float = 400e6  # CPU only: larger models are counted but not timed
    seed: int = 0

    @property
    def variants(self) -> list[str]:
        out = ["dual", "encoder_only"] + (["unmasked"] if self.with_unmasked or self.finetune else [])
        return out + (list(mar_variants(self)) if self.finetune else [])


def mar_variants(spec: CompareSpec) -> dict[str, str]:
    """Name -> head of the MAR fine-tune variants, e.g. {"mar50_linear": "linear"}."""
    return {f"{MAR_PREFIX}{round(100 * spec.finetune_ratio)}_{head}": head for head in spec.finetune_heads}


def describe(variant: str, spec: CompareSpec) -> str:
    if variant in VARIANTS:
        return VARIANTS[variant]
    head = mar_variants(spec)[variant]
    rec = (f", plus {spec.finetune_reconstruction} x the reconstruction branch's MSE on the dropped tokens"
           if spec.finetune_reconstruction > 0 else "")
    return (f"MAR fine-tuning: the running-cell mask drops {spec.finetune_ratio:.0%} of the tokens before the "
            f"encoder (patch embedding still runs on all), {head} head, cross-entropy{rec}")


class CompareError(UserError, ValueError):
    """A bad size, ratio or shape for `scaling memory compare`: one sentence naming the fix."""


def validate(spec: CompareSpec) -> None:
    """Raise CompareError with one sentence naming the bad setting and the fix."""
    try:
        _check(spec)
    except CompareError:
        raise
    except ValueError as e:  # get_size, running_cell_maps: already one sentence
        raise CompareError(str(e)) from None


def _check(spec: CompareSpec) -> None:
    size = get_size(spec.model)
    grid = num_tokens(size, spec.frames, spec.input_size)
    if spec.batch < 1:
        raise CompareError(f"--batch {spec.batch} must be at least 1")
    if spec.encoder_mask not in mask_names("encoder"):
        raise CompareError(f"unknown encoder mask '{spec.encoder_mask}': choose one of {', '.join(mask_names('encoder'))}")
    hidden = int(spec.encoder_ratio * grid[1] * grid[2])  # per slot for tube; a lower bound for random
    if not 0 < spec.encoder_ratio < 1 or hidden == 0 or hidden == grid[1] * grid[2]:
        raise CompareError(f"--encoder-ratio {spec.encoder_ratio} must hide some but not all tokens; use a value in (0, 1) such as 0.9")
    if not 0 < spec.decoder_ratio < 1:
        raise CompareError(f"--decoder-ratio {spec.decoder_ratio} must be in (0, 1); the running cell takes 0.25, 0.5 or 0.75")
    running_cell_maps(grid, spec.decoder_ratio)  # raises for odd grids and ratios with no cell pattern
    if spec.finetune:
        bad = [h for h in spec.finetune_heads if h not in HEADS]
        if bad or not spec.finetune_heads:
            raise CompareError(f"--finetune-heads {','.join(spec.finetune_heads)}: choose from {', '.join(HEADS)}")
        if not 0 < spec.finetune_ratio < 1:
            raise CompareError(f"--finetune-ratio {spec.finetune_ratio} must be in (0, 1); MAR drops 0.5")
        running_cell_maps(grid, spec.finetune_ratio)
        if spec.finetune_reconstruction < 0:
            raise CompareError(f"--finetune-reconstruction {spec.finetune_reconstruction} must be at least 0")
    if spec.repeats < 1 or spec.warmup < 0:
        raise CompareError("--repeats must be at least 1 and --warmup at least 0")


def make_step(variant: str, spec: CompareSpec, device: str | torch.device):
    """Build the variant's model on `device` and a `forward() -> loss` closure over fixed inputs.

    Masks are made on the CPU with a seeded generator (the same masks on every device) and
    moved only for real devices: on meta they must stay real (see `meta_counting`).
    Returns (model, forward, tokens) with tokens = {"encoder": N_vis, "decoder": N_dec_seq, "predicted": N_pred}.
    """
    device = torch.device(device)
    size = get_size(spec.model)
    real = device.type != "meta"
    mar = mar_variants(spec).get(variant)
    with torch.device(device):
        if variant == "unmasked" or mar:
            rec = mar is not None and spec.finetune_reconstruction > 0
            model = build_classifier(spec.model, spec.num_classes, spec.frames, spec.input_size,
                                     head=mar or spec.unmasked_head, reconstruction=rec)
        else:
            model = build_pretrain_model(spec.model, spec.frames, spec.input_size)
        video = torch.randn(spec.batch, 3, spec.frames, spec.input_size, spec.input_size) if real else \
            torch.empty(spec.batch, 3, spec.frames, spec.input_size, spec.input_size)
    model.train()
    g = torch.Generator().manual_seed(spec.seed)
    if variant == "unmasked" or mar:
        from scaling.losses import finetune_loss  # the training loop's loss

        labels = torch.zeros(spec.batch, dtype=torch.long, device=device)
        n = model.grid[0] * model.grid[1] * model.grid[2]
        drop = finetune_drop_mask("running_cell" if mar else "none", spec.batch, model.grid, spec.finetune_ratio,
                                  train=True, generator=g)
        dropped = 0 if drop is None else int(drop[0].sum())
        weight = spec.finetune_reconstruction if model.reconstruction is not None else 0.0
        if real and drop is not None:
            drop = drop.to(device)
        criterion = nn.CrossEntropyLoss()

        def finetune_forward() -> torch.Tensor:  # the training loop's own loss
            return finetune_loss(model, video, labels, criterion, drop, weight)[0]

        decoded = n if weight else 0  # the reconstruction decoder runs on kept + dropped tokens
        return model, finetune_forward, {"encoder": n - dropped, "decoder": decoded, "predicted": dropped if weight else 0}

    decoder = MASKINGS[variant]
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
    (patch embedding and blocks), the decoder its reconstruction branch (MAR) if any, and the
    head (linear or bridging) is 'other'."""
    total = count_params(model)
    if isinstance(model, VideoMAEPretrain):
        enc, dec = count_params(model.encoder), count_params(model.decoder)
    else:
        enc = count_params(model.patch_embed) + count_params(model.blocks)
        dec = count_params(model.reconstruction) if model.reconstruction is not None else 0
    # "other": the encoder-to-decoder projection and mask token, or the fine-tune head.
    return {"total": total, "encoder": enc, "decoder": dec, "other": total - enc - dec}


def flop_split(summary: dict, model: nn.Module) -> dict:
    """FLOPs total / encoder / decoder / other (+ the attention matmuls within them).

    For the fine-tune model: encoder = patch embedding + blocks, decoder = the reconstruction
    branch (MAR), other = the head (bridging blocks, fc_norm, linear)."""
    root = type(model).__name__
    mods = summary["modules"]
    if isinstance(model, VideoMAEPretrain):
        enc, dec = mods.get(f"{root}.encoder", 0), mods.get(f"{root}.decoder", 0)
    else:  # the trunk: patch embedding and the top-level blocks (a ModuleList is never called itself)
        trunk = [f"{root}.patch_embed"] + [f"{root}.blocks.{i}" for i in range(len(model.blocks))]
        enc, dec = sum(mods.get(name, 0) for name in trunk), mods.get(f"{root}.reconstruction", 0)
    attention = sum(v for op, v in summary["ops"].items() if "attention" in op)
    return {"total": summary["total"], "encoder": enc, "decoder": dec, "other": summary["total"] - enc - dec,
            "attention": attention}


def classifier_forward_flops(model: VideoClassifier, video: torch.Tensor, drop_mask: torch.Tensor | None) -> dict[str, int]:
    """Forward FLOPs of one fine-tune batch (no grad), split into encoder (patch embedding +
    blocks), head (bridge, fc_norm, linear) and the reconstruction branch when it runs.
    CPU fused attention is counted (`counting.flop_counter`). Used by bench/finetune_step.py."""
    reconstruct = drop_mask is not None and model.reconstruction is not None
    with torch.no_grad():
        split = flop_split(count_flops(lambda: model(video, drop_mask, reconstruct=reconstruct)), model)
    return {"total": split["total"], "encoder": split["encoder"], "head": split["other"], "reconstruction": split["decoder"]}


def count_variant(variant: str, spec: CompareSpec, device: str = "meta", plain_only: bool = False) -> dict:
    """Parameters, FLOPs and saved bytes of one variant, counted on meta tensors (or, to check
    that meta counting is faithful, on a real device). `plain_only`: skip the second pass with
    activation checkpointing (its recompute and saved bytes), which a FLOP count for MFU does
    not use (seconds for ViT-g at every run's start)."""
    out: dict = {"description": describe(variant, spec)}
    for checkpointing in (False,) if plain_only else (False, True):
        model, forward, tokens = make_step(variant, spec, device)
        model.set_grad_checkpointing(checkpointing)
        saved = SavedTensors(exclude=[*model.parameters(), *model.buffers()])

        def forward_saving(saved=saved, forward=forward) -> torch.Tensor:
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
    model = forward = None  # free this variant's weights before the next one
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
    """Our forward MACs per clip against the published numbers, where the setting is the reference's."""
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


def mar_savings(spec: CompareSpec, variants: dict) -> dict | None:
    """Each MAR variant against the unmasked fine-tune step: ratios of forward FLOPs (encoder,
    head, total) and of the bytes saved for backward."""
    if not spec.finetune:
        return None
    base = variants["unmasked"]
    out = {}
    for name in mar_variants(spec):
        v = variants[name]
        out[name] = {
            **{f"forward_flops_{part}": v["forward_flops"][part] / base["forward_flops"][part]
               for part in ("encoder", "other", "total")},
            **{f"saved_bytes_{key}": v["saved_bytes"][key] / base["saved_bytes"][key] for key in ("plain", "checkpointing")},
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
        "mar_over_unmasked": mar_savings(spec, variants),
    }
