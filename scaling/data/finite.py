"""Fine-tune / evaluation loader: FINITE, every sample of the shards exactly once per epoch.

How the split works
-------------------
1. Index (once, in the building process; `ShardIndex`): every tar is scanned for its member
   headers (offset and size of each `.mp4` / `.json`; a header is 512 bytes, so this reads
   almost nothing: ~50 us per sample here, ~30 s for Kinetics-710's 658k). Samples are
   numbered 0..N-1 in (source, shard, member) order. A truncated tar keeps the samples whose
   members are complete; the shard counts as a `tar_errors`.
2. Plan (per epoch): training orders the N samples by a permutation seeded by (seed, epoch)
   (a true per-sample shuffle across all shards, not a shard shuffle plus a buffer);
   evaluation keeps index order. The order is padded by repeating its head up to
   M = world_size * nb * B slots, nb = ceil(N / (world_size * B)), and rank r takes slots
   r, r + world_size, ... (DistributedSampler's interleave). So every rank has exactly nb
   batches of exactly B videos, slots < N hold each sample exactly once over all ranks, and
   the M - N padding slots (< world_size * B, at the tail) are marked `valid=False`.
3. Read: a map-style dataset over this rank's nb batch numbers; DataLoader workers take whole
   batches (worker splitting is DataLoader's), read the members by offset and decode. Which
   worker builds a batch changes nothing: the clips of slot m depend only on
   (seed, epoch, m), so the output does not depend on num_workers.

Why not webdataset's node/worker splitting: it splits at shard granularity, so ranks get
unequal sample counts (DDP/DeepSpeed ranks must step together) and 2 ranks x 2 workers over
3 shards leave a worker idle; it cannot promise "exactly once, same batch count" without this
very index. The price is that shards must be local files (or a mounted file system).

Bad samples (corrupt / truncated / zero-length video, missing `mp4`, missing label in
training) cannot be dropped without unbalancing ranks: their slot is filled with a stand-in
(another clip of the same batch, or zeros), marked `valid=False` and counted. So `valid`
masks out padding and bad samples; the loss/accuracy must use it.
"""

from __future__ import annotations

import array
import json
import logging
import math
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from webdataset.tariterators import base_plus_ext

from scaling.data.sources import Source, as_sources, expand_shards
from scaling.data.stream import (
    STAT_NAMES,
    Counters,
    _rng,
    _seed_int,
    bad_reason,
    check_positive_ints,
    outlive_stop_signals,
    shared_empty,
    source_stat_names,
)
from scaling.data.transforms import (
    ClipRandAugment,
    ClipRandomErasing,
    finetune_clip,
    long_side_crops,
    resize_short_side,
    to_normalized_tensor,
)
from scaling.data.video import (
    VideoDecodeError,
    clip_indices,
    open_video,
    read_clips,
    segment_indices,
    segment_test_indices,
    uniform_clip_indices,
)

log = logging.getLogger(__name__)

FINETUNE_STAT_NAMES = STAT_NAMES + ("samples", "padded", "bad/no_label", "index_samples")


class NoLabelError(ValueError):
    """A training sample whose json has no usable label (see `label_fn`)."""


class ShardIndex:
    """Where each sample's `mp4` and `json` are: parallel arrays (an int64 row per sample and
    its key), compact enough for a million samples per process. Sample i is row i."""

    MEMBERS = ("mp4", "json")

    def __init__(self):
        self.urls: list[str] = []
        self.keys: list[str] = []
        # per sample: shard, source, then (offset, size) per member in MEMBERS; -1 = absent
        self._rows = array.array("q")
        self._table: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def table(self) -> np.ndarray:
        if self._table is None or len(self._table) != len(self.keys):
            self._table = np.array(self._rows, dtype=np.int64).reshape(len(self.keys), 2 + 2 * len(self.MEMBERS))
        return self._table

    def add_shard(self, url: str, source: int, counters: Counters | None = None) -> int:
        """Index one local tar from its headers only; returns its sample count. Members cut off
        by a truncated tar are left out (a sample keeps its complete members) and the shard
        counts as one tar error; a tar that cannot be read at all, likewise."""
        if "://" in url or url.startswith("pipe:"):
            raise ValueError(f"the finite loader reads shards by file offset and needs local paths, got {url!r}; copy or mount the shards")
        size, shard, before = os.path.getsize(url), len(self.urls), len(self.keys)
        self.urls.append(url)
        width = 2 + 2 * len(self.MEMBERS)
        broken = False
        try:
            with tarfile.open(url, "r:") as tar:
                for info in tar:
                    key, ext = base_plus_ext(info.name)
                    if not info.isreg() or key is None or os.path.basename(info.name).startswith("__"):
                        continue
                    if info.offset_data + info.size > size:  # data cut off by truncation
                        broken = True
                        break
                    if len(self.keys) == before or self.keys[-1] != key:  # webdataset: consecutive members, one key
                        self.keys.append(key)
                        self._rows.extend([shard, source] + [-1] * (width - 2))
                    ext = ext.lower()
                    if ext in self.MEMBERS:
                        col = len(self._rows) - width + 2 + 2 * self.MEMBERS.index(ext)
                        self._rows[col], self._rows[col + 1] = info.offset_data, info.size
        except (tarfile.TarError, OSError) as exn:  # truncated header, empty or non-tar file
            broken = True
            log.warning("shard %s is truncated or unreadable (%r); using the %d samples before the damage",
                        url, exn, len(self.keys) - before)
        if broken and counters is not None:
            counters.add("tar_errors")
        return len(self.keys) - before

    def source(self, i: int) -> int:
        return int(self.table[i, 1])

    def name(self, i: int) -> str:
        return f"{self.urls[self.table[i, 0]]}:{self.keys[i]}"

    def read(self, i: int, member: str) -> bytes:
        row = self.table[i]
        col = 2 + 2 * self.MEMBERS.index(member)
        offset, size = int(row[col]), int(row[col + 1])
        if offset < 0:
            raise KeyError(f"sample {self.name(i)} has no '{member}' member")
        with open(self.urls[row[0]], "rb") as f:
            f.seek(offset)
            return f.read(size)


def default_label(meta: dict) -> int:
    """The class index of a sample: its json's integer "label"."""
    return int(meta["label"])


class FiniteClips(Dataset):
    """Batch b of this rank's epoch plan -> {"video", "label", "valid", "index", "key", "source"}."""

    def __init__(self, index: ShardIndex, sources: list[Source], counters: Counters, *, videos_per_batch: int,
                 num_frames: int, stride_override: int | None, input_size: int, num_sample: int, seed: int, rank: int,
                 world_size: int, train: bool, label_fn: Callable[[dict], int], rand_aug: str | None,
                 scale, ratio, flip: bool, reprob: float, test_clips: int, test_crops: int,
                 sampling: str = "stride"):  # fmt: skip
        self.index, self.sources, self.counters = index, sources, counters
        self.B, self.T, self.S = videos_per_batch, num_frames, input_size
        self.stride_override = stride_override
        if sampling not in ("stride", "segments"):
            raise ValueError(f"sampling must be 'stride' or 'segments', got {sampling!r}")
        self.sampling = sampling
        self.seed, self.rank, self.world_size, self.train = seed, rank, world_size, train
        self.label_fn = label_fn
        self.views = num_sample if train else test_clips * test_crops
        self.test_clips, self.test_crops = test_clips, test_crops
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip
        self.rand_aug = ClipRandAugment(rand_aug, input_size) if train and rand_aug else None
        self.erase = ClipRandomErasing(reprob, mode="pixel") if train and reprob > 0 else None
        self.num_batches = math.ceil(len(index) / (world_size * videos_per_batch))
        self.set_epoch(0)
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        """This rank's slots: a list of nb * B global slot numbers m (sample order[m % N])."""
        n = len(self.index)
        self.epoch = epoch
        self.order = np.arange(n)
        if self.train:
            self.order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(n)
        total = self.world_size * self.num_batches * self.B
        self.slots = list(range(self.rank, total, self.world_size))

    def __len__(self) -> int:
        return self.num_batches

    def _views_into(self, i: int, m: int, out: torch.Tensor) -> int:
        """Decode one video into out (views, 3, T, S, S); returns its label (-1 if none)."""
        try:
            label = self.label_fn(json.loads(self.index.read(i, "json")))
        except (KeyError, ValueError, TypeError) as exn:
            if self.train:
                raise NoLabelError(f"no usable label: {exn!r}") from exn
            label = -1
        vr = open_video(self.index.read(i, "mp4"))
        source = self.sources[self.index.source(i)]
        stride = self.stride_override or source.stride
        if self.train:  # num_sample clips from one decode, each with its own frames and augmentation
            rng = _rng("finetune", self.seed, self.epoch, m)
            starts = [self._train_indices(len(vr), stride, rng) for _ in range(self.views)]
            for c, frames in enumerate(read_clips(vr, starts)):  # (T, H, W, 3) uint8
                small = min(frames.shape[1:3]) < self.S  # upscaled by the crop's resize
                finetune_clip(frames, self.S, rng, out[c], rand_aug=self.rand_aug, erase=self.erase, scale=self.scale,
                              ratio=self.ratio, flip=self.flip and source.flip)  # fmt: skip
        else:  # clips x crops, in that order: view = clip * test_crops + crop
            for c, frames in enumerate(read_clips(vr, self._test_indices(len(vr), stride))):
                small = min(frames.shape[1:3]) < self.S
                frames = resize_short_side(frames, self.S)  # (T, S, L, 3) or (T, L, S, 3), L >= S
                for k, crop in enumerate(long_side_crops(frames, self.S, self.test_crops)):
                    to_normalized_tensor(crop, out=out[c * self.test_crops + k])
        # Handled, not bad: counted so that users see how much of their data loops or upscales.
        if len(vr) < (self.T if self.sampling == "segments" else self.T * stride):
            self.counters.add("short_videos")
        if small:
            self.counters.add("small_videos")
        if vr.fallback:
            self.counters.add("pyav_fallback")
        self.counters.add(f"source/{source.name}/clips", self.views)
        return label

    def _train_indices(self, length: int, stride: int, rng) -> list[int]:
        """One training clip's frames: `stride` apart from a random start, or one random frame per segment."""
        if self.sampling == "segments":
            return segment_indices(length, self.T, rng)
        return clip_indices(length, self.T, stride, rng)

    def _test_indices(self, length: int, stride: int) -> list[list[int]]:
        """The `test_clips` temporal views: evenly spaced starts, or segment offsets shifted per view."""
        if self.sampling == "segments":
            return segment_test_indices(length, self.T, self.test_clips)
        return uniform_clip_indices(length, self.T, stride, self.test_clips)

    def __getitem__(self, b: int) -> dict:
        slots = self.slots[b * self.B : (b + 1) * self.B]
        n = len(self.index)
        video = shared_empty((self.B, self.views, 3, self.T, self.S, self.S))  # (B, V, 3, T, S, S)
        label = torch.zeros(self.B, dtype=torch.long)
        valid = torch.zeros(self.B, dtype=torch.bool)
        index = torch.tensor([int(self.order[m % n]) for m in slots], dtype=torch.long)  # (B,) sample numbers
        good = []
        for p, m in enumerate(slots):
            i = int(index[p])
            if m >= n:  # padding: a repeat, never valid; counted once as padding whatever happens
                self.counters.add("padded")
            try:
                label[p] = self._views_into(i, m, video[p])
                good.append(p)
                valid[p] = m < n
                if m < n:
                    self.counters.add("samples")
                    self.counters.add(f"source/{self.sources[self.index.source(i)].name}/samples")
            except (VideoDecodeError, KeyError, NoLabelError) as exn:
                reason = "no_label" if isinstance(exn, NoLabelError) else bad_reason(exn)
                if m < n:  # a padding repeat of a bad sample is not counted twice
                    self.counters.add("bad_samples")
                    self.counters.add(f"bad/{reason}")
                name = self.index.name(i)
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("cannot use sample %s: %r (marked invalid; counted, not logged again)", name, exn)
                video[p] = 0.0
        for p in range(self.B):  # stand-ins for bad samples: a good clip of this batch (valid stays False)
            if p not in good and good:
                q = good[p % len(good)]
                video[p].copy_(video[q])
                label[p] = label[q]
        self.counters.add("batches")
        self.counters.add("videos", len(good))
        self.counters.add("clips", len(good) * self.views)
        v = self.views  # per clip: views of one video adjacent, [v0c0, v0c1, ..., v1c0, ...]
        return {
            "video": video.flatten(0, 1),  # (B * V, 3, T, S, S) float32
            "label": label.repeat_interleave(v),  # (B * V,) long
            "valid": valid.repeat_interleave(v),  # (B * V,) bool
            "index": index.repeat_interleave(v),  # (B * V,) sample number in the index
            "key": [self.index.keys[i] for i in index.tolist() for _ in range(v)],
            "source": [self.sources[self.index.source(i)].name for i in index.tolist() for _ in range(v)],
        }


class FinetuneLoader:
    """len() batches per epoch on every rank; iter() yields them from `skip_batches` on.

    `set_epoch(e)` picks epoch e's shuffle (training); `stats` are the counters summed over
    workers (keys as the pre-training loader's, plus samples, padded, bad/no_label,
    index_samples)."""

    def __init__(self, dataset: FiniteClips, *, num_workers: int, prefetch_factor: int, skip_batches: int):
        self.dataset = dataset
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.skip_batches = skip_batches

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.skip_batches = 0  # a resume skips into its own epoch only

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_samples(self) -> int:
        return len(self.dataset.index)

    def __iter__(self) -> Iterator[dict]:
        # A fresh DataLoader per pass: forked workers see the current epoch's plan. Its own
        # generator: a DataLoader draws its workers' base seed from the global torch RNG
        # otherwise, so opening the next epoch's pass would shift the training step's drop-path
        # draws, and a resumed run (which opens it at another step) would diverge.
        d = self.dataset
        loader = DataLoader(
            d,
            batch_size=None,
            sampler=range(self.skip_batches, len(d)),
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            generator=torch.Generator().manual_seed(_seed_int("finetune-workers", d.seed, d.rank, d.epoch)),
            worker_init_fn=outlive_stop_signals,
        )
        return iter(loader)

    @property
    def stats(self) -> dict[str, int]:
        return self.dataset.counters.as_dict()


def build_finetune_loader(
    shards=None,
    *,
    sources: Sequence[Source] | None = None,
    videos_per_batch: int,
    num_frames: int = 16,
    stride: int | None = None,
    input_size: int = 224,
    num_sample: int = 2,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    train: bool = True,
    rand_aug: str | None = "rand-m7-n4-mstd0.5-inc1",
    scale=(0.08, 1.0),
    ratio=(0.75, 1.3333),
    flip: bool = True,
    reprob: float = 0.25,
    test_clips: int = 5,
    test_crops: int = 3,
    label_fn: Callable[[dict], int] = default_label,
    skip_batches: int = 0,
    prefetch_factor: int = 2,
    sampling: str = "stride",
) -> FinetuneLoader:
    """Finite batches {"video": (B * V, 3, T, S, S), "label", "valid", "index": (B * V,),
    "key", "source": lists of B * V}, V = num_sample (train) or test_clips * test_crops (eval).

    `shards` (pattern, glob or list; one source) or `sources` (their union; weights are
    ignored here, each source's stride and flip apply). `stride` given: overrides every
    source's stride; None: each source's own (4 for plain shards). Every sample exactly once
    per epoch over all ranks; every rank gets `len(loader)` batches (see the module
    docstring). `flip=False` disables flipping for all sources; `rand_aug=None` and
    `reprob=0` disable those. Labels: `label_fn(json dict)`, default json["label"]; in
    evaluation a sample without a label gets -1 (and stays valid). `sampling="segments"`: each
    clip takes one frame from each of `num_frames` equal segments of the video (random within
    the segment in training; `test_clips` views at shifted offsets in evaluation), strides unused.
    """
    check_positive_ints(
        videos_per_batch=(videos_per_batch, 1), num_frames=(num_frames, 1), input_size=(input_size, 1),
        num_sample=(num_sample, 1), num_workers=(num_workers, 0), world_size=(world_size, 1), epoch=(epoch, 0),
        test_clips=(test_clips, 1), test_crops=(test_crops, 1), skip_batches=(skip_batches, 0),
        stride=(stride or 1, 1),
    )  # fmt: skip
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    srcs = as_sources(shards, sources, stride=stride or 4)
    counters = Counters(FINETUNE_STAT_NAMES + tuple(source_stat_names(srcs)))
    index = ShardIndex()
    for k, s in enumerate(srcs):
        for url in expand_shards(s.shards):
            index.add_shard(url, k, counters)
    if not len(index):
        raise ValueError(f"the shards of {[s.name for s in srcs]} hold no samples; check the shard paths")
    counters.add("index_samples", len(index))
    dataset = FiniteClips(
        index, srcs, counters, videos_per_batch=videos_per_batch, num_frames=num_frames, stride_override=stride,
        input_size=input_size, num_sample=num_sample, seed=seed, rank=rank, world_size=world_size, train=train,
        label_fn=label_fn, rand_aug=rand_aug, scale=scale, ratio=ratio, flip=flip, reprob=reprob,
        test_clips=test_clips, test_crops=test_crops, sampling=sampling,
    )  # fmt: skip
    if skip_batches > len(dataset):
        raise ValueError(f"skip_batches={skip_batches} is past the epoch's {len(dataset)} batches")
    dataset.set_epoch(epoch)
    return FinetuneLoader(dataset, num_workers=num_workers, prefetch_factor=prefetch_factor, skip_batches=skip_batches)


__all__ = ["build_finetune_loader", "FinetuneLoader", "FiniteClips", "ShardIndex", "default_label", "FINETUNE_STAT_NAMES"]
