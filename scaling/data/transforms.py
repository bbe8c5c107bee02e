"""Clip transforms. Frames stay uint8 (T, H, W, 3) until `to_normalized_tensor`, the one
float conversion, straight into the batch (float32 (3, T, S, S)).

Pre-training: VideoMAE's multi-scale crop (hand-written: the reference `GroupMultiScaleCrop`
works on lists of PIL images; this does the same arithmetic on an array with an explicit rng,
so the crop is reproducible from (seed, rank, worker, sample index)), no flip.

Fine-tuning (`finetune_clip`), in VideoMAE's order: timm's RandAugment with the same ops and
magnitudes on every frame, random resized crop (one box for all frames), horizontal flip (one
coin for all frames, off per source), normalization, timm's RandomErasing as a "cube" (one
box through all frames). Test views: `resize_short_side` + `long_side_crops`.
"""

from __future__ import annotations

import contextlib
import math
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


def resize_frames(frames: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of uint8 (T, h, w, 3) to uint8 (T, size, size, 3) (or (T, H, W, 3) for
    size=(H, W)); upscales frames smaller than the target the same way.

    Antialiased, like the reference's PIL BILINEAR resize when it shrinks (identical to plain
    bilinear when it enlarges). `frames` may be a strided crop view: torch's uint8
    antialiased kernel reads it in place, and measured faster (5.5 vs 9.9 ms for 16 frames of
    a 480x480 crop to 224) than copying the crop and taking the non-antialiased path.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if frames.shape[1] == out_h and frames.shape[2] == out_w:
        return frames
    if any(st < 0 for st in frames.strides):  # a flipped view: torch takes no negative strides
        frames = np.ascontiguousarray(frames)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, 3, h, w) uint8 view, channels-last strides
    x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).numpy()  # (T, out_h, out_w, 3) uint8


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


def normalize_video(video: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (..., 3, T, S, S) clips (a `normalize=False` loader's) -> ImageNet-normalized
    `dtype`, on the clips' device: the same values as `to_normalized_tensor` (in float32)."""
    shape = (3, 1, 1, 1)
    mean = _MEAN.view(shape).to(video.device)
    inv_std = _INV_STD.view(shape).to(video.device)
    return ((video.float() - mean) * inv_std).to(dtype)


# ---- fine-tuning ----------------------------------------------------------------------------


def random_resized_crop_box(
    height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng: random.Random | None = None
) -> tuple[int, int, int, int]:
    """(x, y, crop_w, crop_h) as torchvision's RandomResizedCrop.get_params (which VideoMAE's
    `random_resized_crop` copies): area fraction uniform in `scale`, aspect log-uniform in
    `ratio`, 10 tries, then a centre crop clamped to the ratio range."""
    if rng is None:
        raise TypeError("random_resized_crop_box needs an explicit rng (random.Random) for reproducibility")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Run timm's augmentations (which draw from the global `random`, `np.random` and torch
    generators) from `seed`, then put the global states back as they were."""
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


class ClipRandAugment:
    """timm's `rand_augment_transform` with the same ops and magnitudes on every frame.

    timm's RandAugment draws its ops (`np.random.choice`), each op's apply-coin, magnitude
    noise and sign (`random`) when called on one image. Re-seeding both global generators with
    the clip's seed before each frame makes every frame replay the very same draws: the same
    ops, magnitudes and signs, whatever timm's internals (sampling the ops once by hand would
    have to mirror those internals). hparams as VideoMAE's `create_random_augment`:
    translate_const = 0.45 * input size, bicubic interpolation.
    """

    def __init__(self, config_str: str = "rand-m7-n4-mstd0.5-inc1", input_size: int = 224):
        from PIL import Image  # timm (and torchvision, which it imports) load only for fine-tuning
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_const": int(input_size * 0.45), "interpolation": Image.BICUBIC}
        self.transform = rand_augment_transform(config_str, hparams)
        self._image = Image

    def __call__(self, frames: np.ndarray, seed: int) -> np.ndarray:
        """uint8 (T, H, W, 3) -> uint8 (T, H, W, 3), every frame augmented alike."""
        out = np.empty_like(frames)
        with seeded_global_rngs(seed):
            for t, frame in enumerate(frames):
                random.seed(seed)
                np.random.seed(seed & 0xFFFF_FFFF)
                out[t] = np.asarray(self.transform(self._image.fromarray(frame)))
        return out


class ClipRandomErasing:
    """timm's RandomErasing (mode 'pixel', device cpu) as a cube through all frames.

    VideoMAE (V1 and V2) erase with their own copy of timm's class whose default `cube=True`
    puts ONE box at the same place in every frame of the (T, C, H, W) clip, filled with fresh
    per-pixel noise. Plain timm on (T, C, H, W) would erase an independent box per frame
    (it treats T as a batch); on the (C*T, H, W) view of our (3, T, S, S) clip it draws one
    box for all C*T planes, which is exactly the cube.
    """

    def __init__(self, probability: float = 0.25, mode: str = "pixel"):
        from timm.data.random_erasing import RandomErasing

        self.erase = RandomErasing(probability=probability, mode=mode, device="cpu")

    def __call__(self, clip: torch.Tensor, seed: int) -> torch.Tensor:
        """In place on a normalized float (3, T, S, S) clip; returns it."""
        c, t, h, w = clip.shape
        with seeded_global_rngs(seed):
            random.seed(seed)
            self.erase(clip.view(c * t, h, w))
        return clip


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (T, H', W', 3) with min(H', W') = size, aspect kept."""
    _, h, w, _ = frames.shape
    if h <= w:
        return resize_frames(frames, (size, max(size, int(round(w * size / h)))))
    return resize_frames(frames, (max(size, int(round(h * size / w))), size))


def long_side_crops(frames: np.ndarray, size: int, num_crops: int) -> list[np.ndarray]:
    """`num_crops` size x size views evenly spaced along the long side (one: the centre), of
    frames whose short side is `size` (VideoMAE's multi-crop test). Views, not copies."""
    _, h, w, _ = frames.shape
    free = max(h, w) - size
    starts = [free // 2] if num_crops == 1 else [round(k * free / (num_crops - 1)) for k in range(num_crops)]
    if h >= w:
        return [frames[:, s : s + size, :size] for s in starts]
    return [frames[:, :size, s : s + size] for s in starts]


def finetune_clip(
    frames: np.ndarray,
    size: int,
    rng: random.Random,
    out: torch.Tensor,
    *,
    rand_aug: ClipRandAugment | None,
    erase: ClipRandomErasing | None,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """VideoMAE's fine-tune augmentation of one clip, uint8 (T, H, W, 3) -> out float32
    (3, T, S, S). All draws come from `rng` (seeds for timm's parts included)."""
    if rand_aug is not None:
        frames = rand_aug(frames, rng.getrandbits(63))  # (T, H, W, 3) uint8, full frames as VideoMAE
    x, y, w, h = random_resized_crop_box(frames.shape[1], frames.shape[2], scale, ratio, rng)
    # Crop/resize on uint8 (VideoMAE does it after normalizing; only the rounding differs).
    frames = resize_frames(frames[:, y : y + h, x : x + w], size)  # (T, S, S, 3)
    if flip and rng.random() < 0.5:
        frames = frames[:, :, ::-1]
    to_normalized_tensor(frames, out=out)  # (3, T, S, S) float32
    erase_seed = rng.getrandbits(63)
    if erase is not None:
        erase(out, erase_seed)
    return out


__all__ = [
    "random_resized_crop_box",
    "seeded_global_rngs",
    "ClipRandAugment",
    "ClipRandomErasing",
    "resize_short_side",
    "long_side_crops",
    "finetune_clip",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRETRAIN_SCALES",
    "fixed_crop_offsets",
    "sample_crop_box",
    "resize_frames",
    "multi_scale_crop",
    "to_normalized_tensor",
    "normalize_video",
]
