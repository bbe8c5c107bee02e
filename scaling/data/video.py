"""Decode clips from mp4 bytes with decord, and choose which frames a clip uses.

Frame choice is driven by an explicit `random.Random` so that the loader can derive it from
(seed, rank, worker, sample index) and reproduce it exactly on resume.
"""

from __future__ import annotations

import io
import random

import decord
import numpy as np


class VideoDecodeError(ValueError):
    """The bytes of a sample are not a readable video (corrupt, empty, or zero frames)."""


def open_video(mp4_bytes: bytes) -> decord.VideoReader:
    """Open in-memory video bytes; raise VideoDecodeError if decord cannot read them."""
    if not mp4_bytes:
        raise VideoDecodeError("empty video bytes")
    try:
        # One decode thread: the loader gets its parallelism from DataLoader workers, and
        # extra threads per worker only oversubscribe the cores.
        vr = decord.VideoReader(io.BytesIO(mp4_bytes), num_threads=1)
    except Exception as exn:  # decord raises DECORDError / RuntimeError with C++ messages
        raise VideoDecodeError(f"decord cannot open the video: {exn}") from exn
    if len(vr) == 0:
        raise VideoDecodeError("video has zero frames")
    return vr


def clip_indices(num_video_frames: int, num_frames: int, stride: int, rng: random.Random) -> list[int]:
    """Indices of `num_frames` frames `stride` apart, from a random start.

    The start is uniform over the positions where the whole clip fits. A video shorter than
    the clip span (num_frames * stride) starts at 0 and *loops*: index i*stride is taken modulo
    the video length, so the clip wraps around to the beginning instead of failing or
    repeating the last frame (it still has `num_frames` frames and real motion).
    """
    span = num_frames * stride
    # randint is drawn even when there is no choice, so that a short video consumes the same
    # amount of randomness as a long one (keeps later draws of the same rng comparable).
    start = rng.randint(0, max(num_video_frames - span, 0))
    return [(start + i * stride) % num_video_frames for i in range(num_frames)]


def read_clip(vr: decord.VideoReader, num_frames: int, stride: int, rng: random.Random) -> np.ndarray:
    """One clip from an open reader. Returns uint8 (T, H, W, 3)."""
    indices = clip_indices(len(vr), num_frames, stride, rng)
    try:
        frames = vr.get_batch(indices).asnumpy()  # (T, H, W, 3) uint8
    except Exception as exn:  # truncated streams open fine but fail at frame decode
        raise VideoDecodeError(f"decord cannot decode frames {indices[0]}..{indices[-1]}: {exn}") from exn
    return frames


def decode_frames(mp4_bytes: bytes, num_frames: int, stride: int, rng: random.Random) -> np.ndarray:
    """Decode `num_frames` frames, `stride` apart, from a random start (looping short videos).

    Returns uint8 (T, H, W, 3). Raises VideoDecodeError on unreadable bytes or zero frames.
    """
    return read_clip(open_video(mp4_bytes), num_frames, stride, rng)


__all__ = ["VideoDecodeError", "open_video", "clip_indices", "read_clip", "decode_frames"]
