"""Clip transforms for pre-training: VideoMAE's multi-scale crop, then ImageNet normalization.

Hand-written because the reference (VideoMAE's `GroupMultiScaleCrop`) works on lists of PIL
images; this does the same arithmetic on a (T, H, W, 3) array with an explicit rng, so the
crop is reproducible from (seed, rank, worker, sample index).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAIN_SCALES = (1, 0.875, 0.75, 0.66)


def fixed_crop_offsets(image_w: int, image_h: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """The 13 (x, y) top-left positions of VideoMAE's `more_fix_crop`: corners, centre, edge
    centres and the four quarter points, on a 4x4 grid of the free space."""
    ws, hs = (image_w - crop_w) // 4, (image_h - crop_h) // 4
    return [
        (0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),  # corners, centre
        (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),  # edge centres
        (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs),  # quarter points
    ]  # fmt: skip


def sample_crop_box(
    height: int, width: int, size: int, scales=PRETRAIN_SCALES, rng: random.Random | None = None, max_distort: int = 1
) -> tuple[int, int, int, int]:
    """Pick (x, y, crop_w, crop_h) as GroupMultiScaleCrop does.

    Crop sides are `int(min(H, W) * s)` for each scale s, chosen independently for width and
    height but at most `max_distort` scale steps apart (so aspect ratio stays near 1); a side
    within 3 px of `size` snaps to `size` (as the reference does, avoiding a near-identity
    resize). The position is one of the 13 fixed offsets.
    """
    if rng is None:
        raise TypeError("sample_crop_box needs an explicit rng (random.Random) for reproducibility")
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]
    crop_w, crop_h = rng.choice(pairs)
    x, y = rng.choice(fixed_crop_offsets(width, height, crop_w, crop_h))
    return x, y, crop_w, crop_h


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 (T, h, w, 3) to uint8 (T, size, size, 3).

    torch's uint8 bilinear path (no antialias) rounds like PIL's output does; the reference
    resizes PIL images with BILINEAR, which antialiases when shrinking, so strong downscales
    differ slightly (pre-training crops are rarely shrunk by more than ~1.5x).
    """
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, h, w) uint8
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x.permute(0, 2, 3, 1).numpy()  # (T, size, size, 3) uint8


def multi_scale_crop(frames: np.ndarray, size: int, scales=PRETRAIN_SCALES, rng: random.Random | None = None) -> np.ndarray:
    """VideoMAE's GroupMultiScaleCrop (max_distort 1, 13 fixed offsets) + resize to size x size.

    frames: uint8 (T, H, W, 3). Returns uint8 (T, size, size, 3). The same crop is used for
    every frame, so motion inside the clip is not distorted.
    """
    _, height, width, _ = frames.shape
    x, y, crop_w, crop_h = sample_crop_box(height, width, size, scales, rng)
    return resize_frames(frames[:, y : y + crop_h, x : x + crop_w], size)


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1) * 255.0
_INV_STD = 1.0 / (torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255.0)


def to_normalized_tensor(frames: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (T, S, S, 3) -> float32 (3, T, S, S), (x/255 - mean) / std with ImageNet stats.

    `out` (float32, (3, T, S, S)), e.g. a slot of a preallocated batch, avoids allocating a
    fresh clip and stacking it later: on these machines page-faulting fresh memory costs more
    than the arithmetic. Folding /255 into mean and std saves a pass.
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # (3, T, S, S) uint8 view
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32)
    out.copy_(x)  # uint8 -> float32, into (3, T, S, S) layout
    return out.sub_(_MEAN).mul_(_INV_STD)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRETRAIN_SCALES",
    "fixed_crop_offsets",
    "sample_crop_box",
    "resize_frames",
    "multi_scale_crop",
    "to_normalized_tensor",
]
