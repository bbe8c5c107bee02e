"""Pre-training loader: endless, resampled webdataset stream -> decoded, cropped clip batches.

Determinism (what exact resume relies on)
-----------------------------------------
The batches a rank sees are a pure function of (seed, rank, num_workers, shards):

* Every random choice comes from a `random.Random` seeded by a string of its coordinates
  (string seeds go through SHA-512, so they do not depend on PYTHONHASHSEED or the process):
  shard choice and shuffle buffer from (seed, rank, num_workers, worker); frame start and
  crop of a video from those and i, the index of the raw sample in that worker's shuffled
  stream. Nothing reads the clock or global random state. (num_workers=0 is one worker 0.)
* A batch is made from a fixed *group* of raw samples: batch n of a worker is built from its
  raw samples [n*B, (n+1)*B), B = videos_per_batch. A video that cannot be decoded is replaced
  by another video of the same group (re-cropped with the bad sample's own rng, the way
  VideoMAE retries another video), so one bad file never shifts the later batches.
* DataLoader returns batch j from worker j % W (W workers, in-order). So `skip_batches=k`
  rotates the workers (physical worker p plays logical worker (p + k) % W, which produced
  batch k + p of the uninterrupted run) and each logical worker w drops the
  len(range(w, k, W)) * B raw samples it had consumed, *before* decoding: skipping costs tar
  reads, not video decodes. The skipped samples still pass through the shuffle buffer, so the
  buffer is in the same state as in the uninterrupted run.

Changing num_workers, the shard list, seed or shuffle_buffer changes the stream, so a resume
must use the same values. Limitation: a group in which *no* video decodes yields no batch
(logged as an error); from there on `skip_batches` arithmetic is off by one for that worker.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from scaling.data.transforms import PRETRAIN_SCALES, multi_scale_crop, to_normalized_tensor
from scaling.data.video import VideoDecodeError, open_video, read_clip

log = logging.getLogger(__name__)

# Shared counters (all workers add into them), in this order.
STAT_NAMES = ("raw_samples", "skipped_raw", "videos", "clips", "batches", "bad_samples", "bad_groups", "tar_errors")
# Consecutive undecodable samples after which the data is declared unusable (rather than
# spinning forever on a shard set with nothing decodable in it).
MAX_CONSECUTIVE_BAD = 1000


def _rng(*parts) -> random.Random:
    """A Random seeded from its coordinates, e.g. _rng("clip", seed, rank, worker, i)."""
    return random.Random("/".join(map(str, parts)))


def _seed_int(*parts) -> int:
    """A 63-bit int seed from coordinates (for APIs that want ints)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Brace pattern or list -> list of urls; local paths must exist (clear error if not)."""
    urls = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else [str(s) for s in shards]
    if not urls:
        raise ValueError(f"no shards in {shards!r}; pass a brace pattern like 'data/k400-{{000000..000099}}.tar' or a list of paths")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]!r}; check the shard path or pattern")
    return urls


class PretrainClips(IterableDataset):
    """Endless stream of batches {"video": (B * num_sample, 3, T, S, S) float32} for one rank.

    An IterableDataset that batches itself (use with DataLoader(batch_size=None)); see the
    module docstring for how its randomness is seeded and how skip_batches works.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        videos_per_batch: int,
        num_frames: int,
        stride: int,
        input_size: int,
        num_sample: int,
        seed: int,
        rank: int,
        skip_batches: int,
        shuffle_buffer: int,
        scales=PRETRAIN_SCALES,
    ):
        super().__init__()
        self.urls = urls
        self.videos_per_batch = videos_per_batch
        self.num_frames, self.stride, self.input_size = num_frames, stride, input_size
        self.num_sample = num_sample
        self.seed, self.rank = seed, rank
        self.skip_batches = skip_batches
        self.shuffle_buffer = shuffle_buffer
        self.scales = tuple(scales)
        # Inherited by forked (or passed to spawned) DataLoader workers, so the parent can read
        # the counts; best effort: workers run ahead of the consumer by the prefetch depth.
        self._stats = multiprocessing.Array("q", len(STAT_NAMES))
        self._warned: set[str] = set()  # per process: warn once per bad key

    # ---- bookkeeping -------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        with self._stats.get_lock():
            return dict(zip(STAT_NAMES, self._stats[:]))

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats.get_lock():
            self._stats[STAT_NAMES.index(name)] += n

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s (skipped; further failures of this key are counted, not logged)", msg)

    def _tar_handler(self, exn: Exception) -> bool:
        """webdataset handler for unreadable tars/members: count, warn, keep streaming."""
        self._count("tar_errors")
        self._warn_once(f"tar:{exn!r}", f"tar read error: {exn!r}")
        return True

    # ---- stream --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Logical worker: the one whose batches this process must produce after the skip.
        lw = (worker + self.skip_batches) % num_workers
        skip_raw = len(range(lw, self.skip_batches, num_workers)) * self.videos_per_batch
        coords = (self.seed, self.rank, num_workers, lw)

        # Shard choice: webdataset's resampler with an explicit seed (deterministic=True and a
        # constant worker_seed, so neither pid/time nor RANK/WORKER env vars enter the seed).
        shards = wds.ResampledShards(
            self.urls, seed=_seed_int("shards", *coords), worker_seed=lambda: 0, deterministic=True
        )
        samples = wds.tarfile_to_samples(handler=self._tar_handler)(iter(shards))  # {"__key__", "mp4", ...}
        samples = wds.shuffle(
            bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=_rng("shuffle", *coords)
        )(samples)
        indexed = enumerate(samples)  # (i, sample): i = raw index in this worker's stream
        if skip_raw:
            # Drop what the uninterrupted run had already consumed, before any decoding.
            indexed = itertools.islice(indexed, skip_raw, None)
            self._count("skipped_raw", skip_raw)
        groups = wds.batched(self.videos_per_batch, collation_fn=None, partial=False)(indexed)

        consecutive_bad = 0
        for group in groups:  # list of B (i, sample)
            batch, n_bad = self._make_batch(group, coords)
            consecutive_bad = consecutive_bad + n_bad if n_bad == len(group) else 0
            if consecutive_bad >= MAX_CONSECUTIVE_BAD:
                raise RuntimeError(
                    f"{consecutive_bad} consecutive samples could not be decoded as video from "
                    f"{len(self.urls)} shards (e.g. {self.urls[0]!r}); check that the shards hold 'mp4' videos"
                )
            if batch is not None:
                self._count("batches")
                yield batch

    def _clips_into(self, mp4: bytes, rng: random.Random, out: torch.Tensor) -> None:
        """Open a video once and cut num_sample clips from it into out (num_sample, 3, T, S, S)."""
        vr = open_video(mp4)
        for c in range(self.num_sample):
            frames = read_clip(vr, self.num_frames, self.stride, rng)  # (T, H, W, 3) uint8
            if min(frames.shape[1:3]) < 2:
                raise VideoDecodeError(f"frames of {frames.shape[2]}x{frames.shape[1]} px are too small to crop")
            frames = multi_scale_crop(frames, self.input_size, self.scales, rng)  # (T, S, S, 3) uint8
            to_normalized_tensor(frames, out=out[c])  # (3, T, S, S) float32

    def _empty_batch(self, num_videos: int) -> torch.Tensor:
        """Uninitialized (B, num_sample, 3, T, S, S) float32. In a DataLoader worker it lives in
        shared memory from the start (as torch's default_collate does), so handing it to the
        main process is not one more copy of the whole batch."""
        shape = (num_videos, self.num_sample, 3, self.num_frames, self.input_size, self.input_size)
        if torch.utils.data.get_worker_info() is None:
            return torch.empty(shape)
        numel = math.prod(shape)
        storage = torch.empty(0)._typed_storage()._new_shared(numel, device="cpu")
        return torch.empty(0).new(storage).view(shape)

    def _substitute(self, group: list, good: list[int], rng: random.Random, out: torch.Tensor) -> bool:
        """Clips for a bad sample: another video of the same group, cut with the bad sample's
        own rng. Deterministic, and the batch keeps its size without reading further samples
        (so later groups do not shift). False if no other video decodes."""
        for p in rng.sample(good, len(good)):
            try:
                self._clips_into(group[p][1]["mp4"], rng, out)
                return True
            except VideoDecodeError:  # e.g. a broken frame only reached with this start
                continue
        return False

    def _make_batch(self, group: list, coords: tuple) -> tuple[dict[str, torch.Tensor] | None, int]:
        """Decode a group of B raw samples into one batch; returns (batch or None, #bad)."""
        self._count("raw_samples", len(group))
        video = self._empty_batch(len(group))  # (B, num_sample, 3, T, S, S)
        bad = []
        for p, (i, sample) in enumerate(group):
            try:
                self._clips_into(sample["mp4"], _rng("clip", *coords, i), video[p])
            except (VideoDecodeError, KeyError) as exn:
                bad.append(p)
                key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
                self._count("bad_samples")
                self._warn_once(key, f"cannot use sample {key}: {exn!r}")
        good = [p for p in range(len(group)) if p not in bad]
        # all() stops at the first bad sample without a stand-in; the batch is dropped then.
        if not all(good and self._substitute(group, good, _rng("substitute", *coords, group[p][0]), video[p]) for p in bad):
            self._count("bad_groups")
            log.error("no decodable video among %d samples; this batch is dropped (skip_batches drifts by one)", len(group))
            return None, len(bad)
        self._count("videos", len(group))
        self._count("clips", len(group) * self.num_sample)
        # Clips of one video stay adjacent: [v0c0, v0c1, v1c0, ...]
        return {"video": video.flatten(0, 1)}, len(bad)  # (B * num_sample, 3, T, S, S)


class PretrainLoader:
    """Iterable over batches (a DataLoader) plus the dataset's shared `stats` counters."""

    def __init__(self, dataset: PretrainClips, loader: DataLoader):
        self.dataset = dataset
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Each iter() restarts the stream from the beginning (from skip_batches), identically.
        return iter(self.loader)

    @property
    def stats(self) -> dict[str, int]:
        """Counts summed over workers: raw_samples, skipped_raw, videos, clips, batches,
        bad_samples (undecodable videos replaced), bad_groups (batches dropped), tar_errors."""
        return self.dataset.stats


def build_pretrain_loader(
    shards,
    *,
    videos_per_batch,
    num_frames=16,
    stride=4,
    input_size=224,
    num_sample=1,
    num_workers=0,
    seed=0,
    rank=0,
    world_size=1,
    skip_batches=0,
    shuffle_buffer=256,
    prefetch_factor=2,
) -> PretrainLoader:
    """Endless pre-training batches {"video": (videos_per_batch * num_sample, 3, T, S, S)}.

    Shards are resampled with replacement, independently per (rank, worker), so no node or
    worker splitting of the shard list is needed (world_size only validates rank). The stream
    is a pure function of (seed, rank, num_workers); `skip_batches=k` starts at batch k of it
    without decoding the skipped videos (see the module docstring).
    """
    for name, value, low in (
        ("videos_per_batch", videos_per_batch, 1), ("num_frames", num_frames, 1), ("stride", stride, 1),
        ("input_size", input_size, 1), ("num_sample", num_sample, 1), ("num_workers", num_workers, 0),
        ("skip_batches", skip_batches, 0), ("shuffle_buffer", shuffle_buffer, 1), ("world_size", world_size, 1),
    ):  # fmt: skip
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    dataset = PretrainClips(
        expand_shards(shards),
        videos_per_batch=videos_per_batch,
        num_frames=num_frames,
        stride=stride,
        input_size=input_size,
        num_sample=num_sample,
        seed=seed,
        rank=rank,
        skip_batches=skip_batches,
        shuffle_buffer=shuffle_buffer,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset batches itself
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        # in_order (the default) is what makes batch j come from worker j % num_workers.
        in_order=True,
    )
    return PretrainLoader(dataset, loader)


__all__ = ["build_pretrain_loader", "PretrainLoader", "PretrainClips", "expand_shards", "STAT_NAMES"]
