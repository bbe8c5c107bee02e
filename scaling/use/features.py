"""`scaling features`: the frozen encoder over sliding windows of each video, one `.npy` per video.

    scaling features --weights W --input VIDEOS_OR_SHARDS --out DIR [--window 16 --stride 16 --pool mean|none]

A window spans `window` consecutive frames of the video, from which the model's `num_frames`
are taken evenly (window = num_frames: every frame; 2 x num_frames: every second one);
windows start every `stride` frames, and a video shorter than one window gives one window
that loops, as the loaders' clips do. Each window is resized (short side) and centre-cropped
to the model's input size with the loaders' transforms. Features (scaling/use/weights.py,
`FeatureEncoder`): `--pool mean` -> (windows, D), `--pool none` -> (windows, tokens, D),
float32. Written into DIR:

    <key>.npy           one per video (key: the shard sample's key, or the file name without suffix)
    index.jsonl         one line per finished video: key, file, window start frames, fps, frames, shape
    features.json       the settings; a re-run with other settings is refused

Resumable like `scaling shard`: a video whose line is in index.jsonl is skipped, and a `.npy`
is renamed into place before its line is written, so a kill leaves no half-written entry.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scaling.data.video import open_video, read_clips
from scaling.errors import UserError
from scaling.precision import DTYPES
from scaling.use.views import VIDEO_SUFFIXES, centre_view
from scaling.use.weights import device_for_rank, encoder_from, load_weights

POOLS = ("mean", "none")


class FeatureInputError(UserError, ValueError):
    """Inputs that cannot be read as videos or shards, or an output folder with other settings."""


@dataclass
class FeatureOptions:
    weights: str
    inputs: list[str]
    out: str
    window: int | None = None  # None: the model's num_frames
    stride: int | None = None  # None: the window (no overlap)
    pool: str = "mean"
    batch: int = 8  # windows per forward pass
    precision: str | None = None
    trust: bool = False
    tracking: bool = True
    experiment: str = "features"


def videos_in(inputs: list[str]) -> Iterator[tuple[str, bytes]]:
    """(key, video bytes) from shards (.tar, brace patterns, globs) and video files or folders."""
    from scaling.data.sources import expand_shards

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
            yield from ((p.stem, p.read_bytes()) for p in files)
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            if not path.is_file():
                raise FileNotFoundError(f"--input {item} does not exist")
            yield path.stem, path.read_bytes()
        elif ".tar" in item or any(c in item for c in "{*?["):
            for url in expand_shards(item):
                yield from shard_videos(url)
        else:
            raise FeatureInputError(f"--input {item} is neither a video file ({', '.join(VIDEO_SUFFIXES)}), a folder of "
                                    "videos nor webdataset shards (.tar, a brace pattern or a glob)")


def shard_videos(url: str) -> Iterator[tuple[str, bytes]]:
    """(sample key, video bytes) of one shard, in the shard's order."""
    from webdataset.tariterators import base_plus_ext

    with tarfile.open(url) as tar:
        for info in tar:
            key, ext = base_plus_ext(info.name)
            if info.isreg() and key and "." + (ext or "").lower() in VIDEO_SUFFIXES:
                yield os.path.basename(key), tar.extractfile(info).read()


def frames_per_second(data: bytes) -> float | None:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            rate = container.streams.video[0].average_rate
            return float(rate) if rate else None
    except Exception:  # noqa: BLE001 - the rate is informative only; decoding decides what is readable
        return None


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start frames of the windows over a video of `length` frames (one window at 0 if shorter)."""
    return list(range(0, max(length - window, 0) + 1, stride))


def window_indices(start: int, length: int, window: int, num_frames: int) -> list[int]:
    """`num_frames` frames spread evenly over [start, start + window), looping past the end."""
    return [(start + k * window // num_frames) % length for k in range(num_frames)]


class FeatureWriter:
    """The output folder: settings, finished keys, atomic `.npy` + index line per video."""

    def __init__(self, out: Path, settings: dict):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        saved = out / "features.json"
        if saved.is_file() and json.loads(saved.read_text()) != settings:
            raise FeatureInputError(f"{out} holds features made with other settings ({saved}); pass another --out, or "
                                    "the same --weights/--window/--stride/--pool to resume")
        saved.write_text(json.dumps(settings, indent=2) + "\n")
        self.index = out / "index.jsonl"
        self.done = set()
        if self.index.is_file():
            for line in self.index.read_text().splitlines():
                try:
                    self.done.add(json.loads(line)["key"])
                except (ValueError, KeyError):
                    pass  # a line cut by a kill: that video is done again

    def write(self, key: str, features: np.ndarray, record: dict) -> None:
        final = self.out / f"{key}.npy"
        tmp = self.out / f"{key}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, features)
        tmp.replace(final)
        with open(self.index, "a") as f:
            f.write(json.dumps({"key": key, "file": final.name, **record}) + "\n")
        self.done.add(key)


@torch.no_grad()
def extract(o: FeatureOptions) -> dict:
    """Write the features of every input video not yet in `o.out`; returns the throughput."""
    if o.pool not in POOLS:
        raise FeatureInputError(f"--pool {o.pool} is unknown; choose one of {', '.join(POOLS)}")
    w = load_weights(o.weights, o.trust)
    encoder = encoder_from(w)
    device = device_for_rank()
    dtype = DTYPES[o.precision or w.setting("train", "precision", "fp32")]
    encoder.to(device=device, dtype=dtype)
    window = o.window or w.num_frames
    stride = o.stride or window
    settings = {"weights": str(Path(o.weights).resolve()), "model": w.size_name, "num_frames": w.num_frames,
                "input_size": w.input_size, "window": window, "stride": stride, "pool": o.pool,
                "precision": str(dtype).removeprefix("torch.")}
    writer = FeatureWriter(Path(o.out), settings)
    done_videos = skipped = windows = 0
    t0 = time.perf_counter()
    for key, data in videos_in(o.inputs):
        if key in writer.done:
            skipped += 1
            continue
        vr = open_video(data)
        starts = window_starts(len(vr), window, stride)
        parts = []
        for i in range(0, len(starts), o.batch):  # bounded memory: `batch` windows decoded at a time
            chunk = [window_indices(s, len(vr), window, w.num_frames) for s in starts[i:i + o.batch]]
            video = torch.stack([centre_view(frames, w.input_size) for frames in read_clips(vr, chunk)])  # (b, 3, T, S, S)
            video = video.to(device=device, dtype=dtype)
            feats = encoder.pooled(video) if o.pool == "mean" else encoder.tokens(video)  # (b, D) or (b, N, D)
            parts.append(feats.float().cpu().numpy())
        features = np.concatenate(parts)
        writer.write(key, features, {"starts": starts, "window": window, "stride": stride, "fps": frames_per_second(data),
                                     "frames": len(vr), "shape": list(features.shape)})
        done_videos += 1
        windows += len(starts)
    seconds = time.perf_counter() - t0
    stats = {"videos": done_videos, "skipped": skipped, "windows": windows, "seconds": seconds,
             "videos_per_s": done_videos / seconds if seconds else 0.0, "windows_per_s": windows / seconds if seconds else 0.0}
    print(f"[scaling] features: {done_videos} videos ({skipped} already done), {windows} windows in {seconds:.1f} s: "
          f"{stats['videos_per_s']:.2f} videos/s, {stats['windows_per_s']:.2f} windows/s; written to {o.out}", flush=True)
    if o.tracking:
        from scaling.tracking import MLflowTracker

        tracker = MLflowTracker("", o.experiment, run_name=f"features {Path(o.weights).name}")
        tracker.log_params({**settings, "inputs": " ".join(o.inputs)[:500], "out": str(o.out)})
        tracker.log_metrics({f"features/{k}": v for k, v in stats.items()}, step=0)
        tracker.log_artifact(str(Path(o.out) / "features.json"))
        tracker.close("FINISHED")
    return stats


__all__ = ["FeatureOptions", "extract", "window_starts", "window_indices", "videos_in"]
