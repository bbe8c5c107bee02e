"""Decode clips from mp4 bytes with decord, and choose which frames a clip uses.

Frame choice is driven by an explicit `random.Random` so that the loader can derive it from
(seed, rank, worker, sample index) and reproduce it exactly on resume.

What counts as a bad video (raises `VideoDecodeError`, which the loaders count and skip):
empty bytes (a zero-length `.mp4` member), bytes neither decord nor PyAV can open (corrupt
data, an mp4 truncated before its `moov` atom), zero frames, and frames under 2 px. Videos
decord alone fails on (some frame sizes, a stream cut inside its data) are decoded with PyAV
(`Video.fallback`, counted by the loaders). Not bad, but handled and counted by the
loaders: videos shorter than the clip span (the clip *loops*, see `clip_indices`), and frames
smaller than the crop (the crop is upscaled); odd sizes and portrait frames need nothing.
"""

from __future__ import annotations

import io
import random

import av
import decord
import numpy as np
from torch.utils.dlpack import from_dlpack

# decord's own log lines ("ERROR opening ...") for every corrupt file would flood the console;
# the loaders report each bad sample once, with decord's message, through `logging`.
decord.logging.set_level(decord.logging.QUIET)


class VideoDecodeError(ValueError):
    """The bytes of a sample are not a readable video (corrupt, empty, or zero frames)."""

    reason = "decode"  # counter suffix: bad/decode


class EmptyVideoError(VideoDecodeError):
    """Zero bytes: e.g. a zero-length `.mp4` member in a shard."""

    reason = "empty"


class Video:
    """An opened video: decord, or PyAV where decord fails.

    decord fails on some videos that are fine: e.g. 48x32 or 72x32 frames (any pixel format)
    open but every `get_batch` raises "DECORDArrayCopyFromTo: The size must exactly match",
    and a cut-off faststart mp4 fails to open although most of its frames are intact. Those
    are decoded with PyAV instead (`fallback` is then True; the loaders count it): one
    sequential pass per `get_batch` that keeps only the wanted frames (so a long video costs
    time, not memory), plus one counting pass when decord could not even open the bytes (the
    length is then the number of frames PyAV can decode). Bytes neither library reads raise
    VideoDecodeError.
    """

    def __init__(self, data: bytes):
        if not data:
            raise EmptyVideoError("empty video bytes (zero-length file)")
        self.data, self.fallback = data, False
        try:
            # One decode thread: the loader gets its parallelism from DataLoader workers, and
            # extra threads per worker only oversubscribe the cores.
            self._vr: decord.VideoReader | None = decord.VideoReader(io.BytesIO(data), num_threads=1)
            self._len = len(self._vr)
        except Exception as exn:  # decord raises DECORDError / RuntimeError with C++ messages
            self._vr, self.fallback = None, True
            self._error = f"decord cannot open the video: {exn}"
            self._len = self._pyav_pass(set())[0]  # counting pass: frames decoded, none kept
        if self._len == 0:
            raise VideoDecodeError("video has zero frames")

    def _pyav_pass(self, wanted: set[int]) -> tuple[int, dict[int, np.ndarray]]:
        """Decode in order with PyAV until the last wanted frame (all frames if none is wanted);
        returns (frames decoded, {index: uint8 (H, W, 3)} for the wanted ones). A stream cut
        off in its data ends early with the frames before the cut."""
        kept: dict[int, np.ndarray] = {}
        n, last = 0, max(wanted, default=None)
        try:
            with av.open(io.BytesIO(self.data), mode="r") as container:
                stream = container.streams.video[0]
                stream.codec_context.thread_count = 1
                for n, frame in enumerate(container.decode(stream), start=1):
                    if n - 1 in wanted:
                        kept[n - 1] = frame.to_ndarray(format="rgb24")
                    if last is not None and n > last:
                        break
        except Exception as exn:  # av.error.* (InvalidDataError, EOFError, ...), IndexError: no video stream
            if n == 0:
                raise VideoDecodeError(f"{self._error}; PyAV: {exn}") from exn
        if n == 0:
            raise VideoDecodeError(f"{self._error}; PyAV decodes no frame either")
        return n, kept

    def __len__(self) -> int:
        return self._len

    def get_batch(self, indices: list[int]) -> np.ndarray:
        """uint8 (T, H, W, 3) frames at `indices`."""
        if self._vr is not None:
            try:
                # A view of decord's own buffer (dlpack), not `.asnumpy()`'s copy: the loader
                # only reads it once, to crop; saves ~10 % of the decode time at 480p.
                return from_dlpack(self._vr.get_batch(indices).to_dlpack()).numpy()  # (T, H, W, 3) uint8
            except Exception as exn:  # truncated streams open fine but fail at frame decode
                self._vr, self.fallback = None, True
                self._error = f"decord cannot decode frames {indices[0]}..{indices[-1]}: {exn}"
        n, kept = self._pyav_pass(set(indices))
        if len(kept) < len(set(indices)):  # PyAV found fewer frames than decord's count: wrap
            self._len = n
            indices = [i % n for i in indices]
            if set(indices) - set(kept):
                kept.update(self._pyav_pass(set(indices) - set(kept))[1])
        try:
            return np.stack([kept[i] for i in indices])
        except ValueError as exn:  # frame size changing inside the stream
            raise VideoDecodeError(f"{self._error}; PyAV frames differ in size: {exn}") from exn


def open_video(mp4_bytes: bytes) -> Video:
    """Open in-memory video bytes; raise VideoDecodeError if neither decord nor PyAV can."""
    return Video(mp4_bytes)


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


def uniform_clip_indices(num_video_frames: int, num_frames: int, stride: int, num_clips: int) -> list[list[int]]:
    """Test-time clips: `num_clips` starts evenly spaced over [0, L - span] (one clip: the
    middle one), each `num_frames` frames `stride` apart, looping like `clip_indices` when the
    video is shorter than the span. As VideoMAE's multi-view test, without randomness."""
    free = max(num_video_frames - num_frames * stride, 0)
    starts = [free // 2] if num_clips == 1 else [round(k * free / (num_clips - 1)) for k in range(num_clips)]
    return [[(s + i * stride) % num_video_frames for i in range(num_frames)] for s in starts]


def segment_indices(num_video_frames: int, num_segments: int, rng: random.Random) -> list[int]:
    """Training segment sampling (TSN style, VideoMAE V2 on SSv2): the video is cut into
    `num_segments` segments of L // num_segments frames and one random frame is taken from each.
    A video shorter than that (under one frame per segment) repeats its first frame in front:
    [0] * (num_segments - L) + [0, 1, ..., L - 1], as the reference does."""
    seg = num_video_frames // num_segments
    if seg == 0:
        return [0] * (num_segments - num_video_frames) + list(range(num_video_frames))
    return [i * seg + rng.randrange(seg) for i in range(num_segments)]


def segment_test_indices(num_video_frames: int, num_segments: int, num_views: int) -> list[list[int]]:
    """Test-time segment sampling: view k takes frame int(k * tick / num_views + tick * x) of
    segment x, tick = L / num_segments, so the views sit at evenly spaced offsets inside every
    segment (view 0 at each segment's first frame). A short video repeats frames."""
    tick = num_video_frames / num_segments
    return [[int(k * tick / num_views + tick * x) for x in range(num_segments)] for k in range(num_views)]


def read_frames(vr: Video, indices: list[int]) -> np.ndarray:
    """Frames at `indices` from an open video: uint8 (T, H, W, 3)."""
    frames = vr.get_batch(indices)  # (T, H, W, 3) uint8
    if min(frames.shape[1:3]) < 2:
        raise VideoDecodeError(f"frames of {frames.shape[2]}x{frames.shape[1]} px are too small to crop")
    return frames


def read_clips(vr: Video, index_lists: list[list[int]]) -> list[np.ndarray]:
    """Several clips of one video from ONE pass over it: the union of their frames is decoded
    in ascending order (repeated augmentation's clips overlap and would each decode from the
    keyframe again; a looping clip would seek back), then split. Each clip is uint8
    (T, H, W, 3): a view where its frames sit evenly spaced in the union, else a copy."""
    union = sorted(set(i for idx in index_lists for i in idx))
    frames = read_frames(vr, union)  # (U, H, W, 3) uint8
    pos = {i: k for k, i in enumerate(union)}
    clips = []
    for idx in index_lists:
        sel = [pos[i] for i in idx]
        step = sel[1] - sel[0] if len(sel) > 1 else 1
        if step > 0 and all(b - a == step for a, b in zip(sel, sel[1:])):
            clips.append(frames[sel[0] : sel[-1] + 1 : step])  # view
        else:
            clips.append(frames[sel])  # copy (fancy index)
    return clips


def read_clip(vr: Video, num_frames: int, stride: int, rng: random.Random) -> np.ndarray:
    """One clip from an open reader. Returns uint8 (T, H, W, 3)."""
    return read_frames(vr, clip_indices(len(vr), num_frames, stride, rng))


def decode_frames(mp4_bytes: bytes, num_frames: int, stride: int, rng: random.Random) -> np.ndarray:
    """Decode `num_frames` frames, `stride` apart, from a random start (looping short videos).

    Returns uint8 (T, H, W, 3). Raises VideoDecodeError on unreadable bytes or zero frames.
    """
    return read_clip(open_video(mp4_bytes), num_frames, stride, rng)


__all__ = [
    "VideoDecodeError",
    "EmptyVideoError",
    "Video",
    "open_video",
    "clip_indices",
    "uniform_clip_indices",
    "segment_indices",
    "segment_test_indices",
    "read_frames",
    "read_clips",
    "read_clip",
    "decode_frames",
]
