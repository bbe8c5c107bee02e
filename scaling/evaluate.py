"""Multi-view evaluation: clips x crops per video, softmax averaged, top-1/top-5 over all ranks.

The finite eval loader gives every video to exactly one rank (padding rows are marked
invalid), so gathering per-video results across ranks counts each video once.

With MAR fine-tune masking (`mask.finetune`) every view drops the same tokens, MAR's fixed
test pattern, so the encoder sees only the kept half at test time as in training; the
reconstruction branch is never run here.

The same functions serve the fine-tune stage (a DeepSpeed engine, `evaluate`) and
`scaling eval` (a plain model on each rank, scaling/use/eval_run.py).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from scaling.config import RunConfig, micro_batch
from scaling.data.finite import build_finetune_loader
from scaling.masking import finetune_drop_mask
from scaling.precision import input_dtype


@torch.no_grad()
def video_probabilities(model, loader, dtype, mask: str = "none", mask_ratio: float = 0.5,
                        device: torch.device | str = "cpu") -> dict[int, tuple[torch.Tensor, int]]:
    """{video index: (softmax averaged over its views (classes,), label)} for this rank's videos.

    `mask`/`mask_ratio`: the fine-tune drop mask (`mask.finetune`), fixed at test time."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = defaultdict(int)
    labels: dict[int, int] = {}
    grid = getattr(model, "module", model).grid
    for batch in loader:
        video = batch["video"].to(device=device, dtype=dtype)  # (B * views, 3, T, H, W)
        drop_mask = finetune_drop_mask(mask, video.shape[0], grid, mask_ratio, train=False)  # (B * views, N) or None
        if drop_mask is not None:
            drop_mask = drop_mask.to(device)
        probs = model(video, drop_mask).float().softmax(dim=-1).cpu()  # (B * views, classes)
        for p, index, label, valid in zip(probs, batch["index"].tolist(), batch["label"].tolist(), batch["valid"].tolist()):
            if not valid:
                continue  # padding that keeps ranks in step
            sums[index] = sums[index] + p if index in sums else p.clone()
            counts[index] += 1
            labels[index] = label
    return {i: (sums[i] / counts[i], labels[i]) for i in sums}


def gather_videos(local: dict[int, tuple[torch.Tensor, int]], world: int) -> dict[int, tuple[torch.Tensor, int]]:
    """Every rank's per-video results, merged (each video was on exactly one rank)."""
    if world == 1:
        return dict(local)
    gathered = [None] * world
    dist.all_gather_object(gathered, {i: (p.tolist(), label) for i, (p, label) in local.items()})
    merged = {}
    for part in gathered:
        merged.update({i: (torch.tensor(p), label) for i, (p, label) in part.items()})
    return merged


def accuracy(per_video: dict[int, tuple[torch.Tensor, int]], num_classes: int) -> dict:
    if not per_video:
        raise ValueError("evaluation saw no labelled video; check finetune.val_shards")
    probs = torch.stack([p for p, _ in per_video.values()])  # (V, classes)
    labels = torch.tensor([label for _, label in per_video.values()])  # (V,)
    top5 = probs.topk(min(5, num_classes), dim=-1).indices  # (V, 5)
    hit1 = top5[:, 0] == labels
    per_class = {}
    for c in labels.unique().tolist():
        rows = labels == c
        per_class[int(c)] = float(hit1[rows].float().mean() * 100)
    return {"top1": float(hit1.float().mean() * 100), "top5": float((top5 == labels[:, None]).any(-1).float().mean() * 100),
            "videos": len(per_video), "per_class_accuracy": per_class}


def evaluate(engine, cfg: RunConfig, rank: int, world: int, clips: int | None = None, crops: int | None = None) -> dict:
    """Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively);
    rank 0's return value holds the metrics over all videos. `clips`/`crops` default to
    `finetune.test_clips`/`test_crops` (validation during training passes 1 x 1)."""
    m, f = cfg.model, cfg.finetune
    loader = build_finetune_loader(
        f.val_shards, videos_per_batch=max(1, micro_batch(cfg, world)), num_frames=m.num_frames, stride=cfg.data.stride,
        input_size=m.input_size, num_workers=cfg.data.num_workers, rank=rank, world_size=world, train=False,
        test_clips=clips or f.test_clips, test_crops=crops or f.test_crops, sampling=cfg.data.sampling,
    )
    was_training = engine.module.training
    engine.module.eval()
    local = video_probabilities(engine, loader, input_dtype(cfg.train.precision), cfg.mask.finetune,
                                cfg.mask.finetune_ratio, device=engine.device)
    engine.module.train(was_training)
    return accuracy(gather_videos(local, world), f.num_classes)
