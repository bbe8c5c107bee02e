"""Test views of one video read from bytes or a file: the fine-tune loader's evaluation path
(scaling/data/finite.py, `FiniteClips` with train=False) for a single video, so `predict` and
`features` see exactly the pixels `eval` sees for the same video."""
from __future__ import annotations

from pathlib import Path

import torch

from scaling.data.transforms import long_side_crops, resize_short_side, to_normalized_tensor
from scaling.data.video import Video, open_video, read_clips, segment_test_indices, uniform_clip_indices

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")


def read_video(path: str | Path) -> Video:
    """A video file opened with the loaders' decoder (decord, PyAV where decord fails)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist; pass paths of mp4/webm/avi files")
    return open_video(path.read_bytes())


def multi_views(vr: Video, num_frames: int, stride: int, input_size: int, clips: int, crops: int,
               sampling: str = "stride") -> torch.Tensor:
    """clips x crops views, (clips * crops, 3, T, S, S) float32 normalized, view = clip * crops + crop."""
    if sampling == "segments":
        indices = segment_test_indices(len(vr), num_frames, clips)
    else:
        indices = uniform_clip_indices(len(vr), num_frames, stride, clips)
    out = torch.empty(clips * crops, 3, num_frames, input_size, input_size)
    for c, frames in enumerate(read_clips(vr, indices)):  # (T, H, W, 3) uint8
        frames = resize_short_side(frames, input_size)
        for k, crop in enumerate(long_side_crops(frames, input_size, crops)):
            to_normalized_tensor(crop, out=out[c * crops + k])
    return out


def centre_view(frames, input_size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> the centre crop after resizing the short side: (3, T, S, S) normalized."""
    (crop,) = long_side_crops(resize_short_side(frames, input_size), input_size, 1)
    return to_normalized_tensor(crop)
