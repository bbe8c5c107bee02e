"""Pre-training loader: endless, resampled webdataset stream(s) -> decoded, cropped clip batches.

Sources and mixing
------------------
Either one shard set (`shards`, with one `stride`) or a hybrid mix (`sources`, a list of
`scaling.data.sources.Source`: shard pattern, weight, stride, flip). Each (rank, worker) draws
shards of every source with replacement (webdataset's `ResampledShards`, so there is no node
or worker splitting to get wrong: ranks and workers differ by seed), reads them as one endless
sample stream per source, and `weighted_mix` picks the source of each sample from a seeded
quasi-random sequence (share = weight / total, realized within ~3 samples over any run of
samples; see `scaling.data.sources`). One shuffle buffer follows the mix. Every sample carries its
source, which sets its frame stride; pre-training never flips (VideoMAE), so `Source.flip`
is a fine-tuning option. Realized per-source counts are in `stats` (see `PretrainLoader.stats`).

Determinism (what exact resume relies on)
-----------------------------------------
The batches a rank sees are a pure function of (seed, rank, num_workers, sources):

* Every random choice comes from a `random.Random` seeded by a string of its coordinates
  (string seeds go through SHA-512, so they do not depend on PYTHONHASHSEED or the process):
  shard choice, source mix and shuffle buffer from (seed, rank, num_workers, worker); frame
  start and crop of a video from those and i, the index of the raw sample in that worker's
  mixed, shuffled stream. Nothing reads the clock or global random state. (num_workers=0 is
  one worker 0.) A single source draws no mix numbers: its stream is the unmixed one.
* A batch is made from a fixed *group* of raw samples: batch n of a worker is built from its
  raw samples [n*B, (n+1)*B), B = videos_per_batch. A video that cannot be decoded is replaced
  by another video of the same group (re-cropped with the bad sample's own rng, the way
  VideoMAE retries another video), so one bad file never shifts the later batches.
* DataLoader returns batch j from worker j % W (W workers, in-order). So `skip_batches=k`
  rotates the workers (physical worker p plays logical worker (p + k) % W, which produced
  batch k + p of the uninterrupted run) and each logical worker w drops the
  len(range(w, k, W)) * B raw samples it had consumed, *before* decoding: skipping costs tar
  reads, not video decodes. The skipped samples still pass through the mix and the shuffle
  buffer, so both are in the same state as in the uninterrupted run.

Changing num_workers, the sources (shards, weights, order), seed or shuffle_buffer changes the
stream, so a resume must use the same values. Limitation: a group in which *no* video decodes
yields no batch (logged as an error); from there on `skip_batches` arithmetic is off by one
for that worker.

Robustness: corrupt, truncated or zero-length videos are replaced as above and counted
(`bad_samples` and `bad/<reason>`); unreadable or truncated tars are counted (`tar_errors`)
and the stream goes on with the next shard; short videos loop (`short_videos`), frames smaller
than the crop are upscaled (`small_videos`), videos decord cannot decode but PyAV can are
decoded by PyAV (`pyav_fallback`). Nothing decodable at all ends in one clear error
instead of spinning forever.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import multiprocessing
import random
import signal
from collections.abc import Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from scaling.data.sources import Source, as_sources, expand_shards, weighted_mix
from scaling.data.transforms import PRETRAIN_SCALES, multi_scale_crop, to_normalized_tensor
from scaling.data.video import VideoDecodeError, clip_indices, open_video, read_clips

log = logging.getLogger(__name__)

# Shared counters (all workers add into them), in this order; per-source ones follow.
STAT_NAMES = (
    "raw_samples", "skipped_raw", "videos", "clips", "batches", "bad_samples", "bad_groups", "tar_errors",
    "bad/empty", "bad/missing_video", "bad/decode", "short_videos", "small_videos", "pyav_fallback",
)  # fmt: skip
# Consecutive undecodable samples after which the data is declared unusable (rather than
# spinning forever on a shard set with nothing decodable in it).
MAX_CONSECUTIVE_BAD = 1000
# Consecutive tar errors without one sample read in between, per shard of a source, after
# which its shards are declared unreadable (resampling would otherwise retry them forever).
MAX_CONSECUTIVE_TAR_ERRORS_PER_SHARD = 20


def _rng(*parts) -> random.Random:
    """A Random seeded from its coordinates, e.g. _rng("clip", seed, rank, worker, i)."""
    return random.Random("/".join(map(str, parts)))


def _seed_int(*parts) -> int:
    """A 63-bit int seed from coordinates (for APIs that want ints)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def source_stat_names(sources: Sequence[Source]) -> list[str]:
    """Per source: raw samples drawn (`source/<name>/samples`) and clips produced (`.../clips`)."""
    return [f"source/{s.name}/{kind}" for s in sources for kind in ("samples", "clips")]


class Counters:
    """Named int64 counters in shared memory: DataLoader workers (forked, or spawned with the
    dataset pickled) add into them and the parent reads the sums. Best effort while running:
    workers run ahead of the consumer by the prefetch depth."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._array = multiprocessing.Array("q", len(self.names))

    def add(self, name: str, n: int = 1) -> None:
        with self._array.get_lock():
            self._array[self._index[name]] += n

    def as_dict(self) -> dict[str, int]:
        with self._array.get_lock():
            return dict(zip(self.names, self._array[:]))


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uninitialized tensor. In a DataLoader worker it lives in shared memory from the start
    (as torch's default_collate does), so handing it to the main process is not one more copy
    of the whole batch."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize, device="cpu")
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def bad_reason(exn: Exception) -> str:
    """Counter suffix for a sample that cannot be used: empty, missing_video or decode."""
    return "missing_video" if isinstance(exn, KeyError) else getattr(exn, "reason", "decode")


class PretrainClips(IterableDataset):
    """Endless stream of batches {"video": (B * num_sample, 3, T, S, S) float32} for one rank.

    An IterableDataset that batches itself (use with DataLoader(batch_size=None)); see the
    module docstring for how its randomness is seeded and how skip_batches works.
    """

    def __init__(
        self,
        sources: list[Source],
        urls: list[list[str]],
        *,
        videos_per_batch: int,
        num_frames: int,
        input_size: int,
        num_sample: int,
        seed: int,
        rank: int,
        skip_batches: int,
        shuffle_buffer: int,
        normalize: bool = True,
        scales=PRETRAIN_SCALES,
    ):
        super().__init__()
        self.sources, self.urls = sources, urls  # urls[k]: the shards of source k
        self.videos_per_batch = videos_per_batch
        self.num_frames, self.input_size = num_frames, input_size
        self.num_sample = num_sample
        self.seed, self.rank = seed, rank
        self.skip_batches = skip_batches
        self.shuffle_buffer = shuffle_buffer
        self.scales = tuple(scales)
        self.normalize = normalize
        self.counters = Counters(STAT_NAMES + tuple(source_stat_names(sources)))
        self._warned: set[str] = set()  # per process: warn once per bad key
        self._tar_errors_in_a_row = [0] * len(sources)  # per process (worker)

    # ---- bookkeeping -------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        return self.counters.as_dict()

    def _count(self, name: str, n: int = 1) -> None:
        self.counters.add(name, n)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s (skipped; further failures of this key are counted, not logged)", msg)

    def _tar_handler(self, k: int):
        """webdataset handler for unreadable tars/members of source k: count, warn, go on."""

        def handle(exn: Exception) -> bool:
            self._count("tar_errors")
            self._warn_once(f"tar:{exn!r}", f"tar read error in source {self.sources[k].name!r}: {exn!r}")
            self._tar_errors_in_a_row[k] += 1
            if self._tar_errors_in_a_row[k] >= MAX_CONSECUTIVE_TAR_ERRORS_PER_SHARD * len(self.urls[k]):
                raise RuntimeError(
                    f"{self._tar_errors_in_a_row[k]} tar read errors in a row and no sample from the "
                    f"{len(self.urls[k])} shards of source {self.sources[k].name!r} (e.g. {self.urls[k][0]!r}); "
                    "check that they are readable webdataset tars"
                )
            return True

        return handle

    def _source_stream(self, k: int, coords: tuple) -> Iterator[dict]:
        """Endless samples {"__key__", "mp4", ..., "__source__": k} of source k."""
        # A lone source keeps the seeds of the unmixed loader (same stream as before sources).
        tag = () if len(self.sources) == 1 else (self.sources[k].name,)
        # webdataset's resampler with an explicit seed (deterministic=True and a constant
        # worker_seed, so neither pid/time nor RANK/WORKER env vars enter the seed).
        shards = wds.ResampledShards(
            self.urls[k], seed=_seed_int("shards", *tag, *coords), worker_seed=lambda: 0, deterministic=True
        )
        for sample in wds.tarfile_to_samples(handler=self._tar_handler(k))(iter(shards)):
            self._tar_errors_in_a_row[k] = 0
            sample["__source__"] = k
            yield sample

    # ---- stream --------------------------------------------------------------------------
    def raw_samples(self, coords: tuple) -> Iterator[dict]:
        """The endless undecoded sample stream of one logical worker: sources mixed by weight,
        then shuffled. coords = (seed, rank, num_workers, logical worker)."""
        streams = [self._source_stream(k, coords) for k in range(len(self.sources))]
        mixed = weighted_mix(streams, [s.weight for s in self.sources], _rng("mix", *coords))
        samples = (sample for _, sample in mixed)
        return wds.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=_rng("shuffle", *coords))(samples)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Logical worker: the one whose batches this process must produce after the skip.
        lw = (worker + self.skip_batches) % num_workers
        skip_raw = len(range(lw, self.skip_batches, num_workers)) * self.videos_per_batch
        coords = (self.seed, self.rank, num_workers, lw)
        indexed = enumerate(self.raw_samples(coords))  # (i, sample): i = raw index in this worker's stream
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
                    f"{consecutive_bad} consecutive samples could not be decoded as video from the shards of "
                    f"{[s.name for s in self.sources]} (e.g. {self.urls[0][0]!r}); check that the shards hold 'mp4' videos"
                )
            if batch is not None:
                self._count("batches")
                yield batch

    def _clips_into(self, sample: dict, rng: random.Random, out: torch.Tensor) -> None:
        """Open a video once and cut num_sample clips from it into out (num_sample, 3, T, S, S)."""
        vr = open_video(sample["mp4"])
        stride = self.sources[sample["__source__"]].stride
        # All frame starts first, then one decoding pass for all clips (see read_clips).
        starts = [clip_indices(len(vr), self.num_frames, stride, rng) for _ in range(self.num_sample)]
        for c, frames in enumerate(read_clips(vr, starts)):  # (T, H, W, 3) uint8
            small = min(frames.shape[1:3]) < self.input_size
            frames = multi_scale_crop(frames, self.input_size, self.scales, rng)  # (T, S, S, 3) uint8
            if self.normalize:
                to_normalized_tensor(frames, out=out[c])  # (3, T, S, S) float32
            else:
                out[c].copy_(torch.from_numpy(frames).permute(3, 0, 1, 2))  # (3, T, S, S) uint8
        # Handled, not bad: counted so that users see how much of their data loops or upscales.
        if len(vr) < self.num_frames * stride:
            self._count("short_videos")
        if small:
            self._count("small_videos")
        if vr.fallback:  # decord could not, PyAV did (see scaling.data.video.Video)
            self._count("pyav_fallback")
        self._count(f"source/{self.sources[sample['__source__']].name}/clips", self.num_sample)

    def _substitute(self, group: list, good: list[int], rng: random.Random, out: torch.Tensor) -> bool:
        """Clips for a bad sample: another video of the same group, cut with the bad sample's
        own rng. Deterministic, and the batch keeps its size without reading further samples
        (so later groups do not shift). False if no other video decodes."""
        for p in rng.sample(good, len(good)):
            try:
                self._clips_into(group[p][1], rng, out)
                return True
            except VideoDecodeError:  # e.g. a broken frame only reached with this start
                continue
        return False

    def _make_batch(self, group: list, coords: tuple) -> tuple[dict[str, torch.Tensor] | None, int]:
        """Decode a group of B raw samples into one batch; returns (batch or None, #bad)."""
        self._count("raw_samples", len(group))
        shape = (len(group), self.num_sample, 3, self.num_frames, self.input_size, self.input_size)
        video = shared_empty(shape, torch.float32 if self.normalize else torch.uint8)  # (B, num_sample, 3, T, S, S)
        bad = []
        for p, (i, sample) in enumerate(group):
            self._count(f"source/{self.sources[sample['__source__']].name}/samples")
            try:
                self._clips_into(sample, _rng("clip", *coords, i), video[p])
            except (VideoDecodeError, KeyError) as exn:
                bad.append(p)
                key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
                self._count("bad_samples")
                self._count(f"bad/{bad_reason(exn)}")
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
        """Counts summed over workers (same keys on every rank, so they can be all-reduced):
        raw_samples, skipped_raw, videos, clips, batches, bad_samples (undecodable videos
        replaced) split into bad/empty, bad/missing_video, bad/decode; bad_groups (batches
        dropped), tar_errors, short_videos (looped), small_videos (upscaled), pyav_fallback
        (decoded by PyAV where decord failed), and per source
        `source/<name>/samples` (raw samples drawn) and `source/<name>/clips` (clips cut).
        Raw samples include the bad ones; a substitute's clips count for its own source."""
        return self.dataset.stats


def check_positive_ints(**values_and_minimums) -> None:
    """Raise one clear ValueError for the first (value, minimum) that is not an int >= minimum."""
    for name, (value, low) in values_and_minimums.items():
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def outlive_stop_signals(worker_id: int) -> None:
    """A loader worker's `worker_init_fn`: ignore SIGTERM and SIGINT. A stop is the rank's to
    answer (it saves at the end of its step, scaling/train/signals.py), but these signals often
    reach the whole process group: torchrun ends its ranks with killpg, a terminal's Ctrl-C and
    Slurm's job-step signal go to every process. A worker killed by one makes the rank's
    DataLoader raise at once ("worker ... killed by signal: Terminated"), before it can save.
    Workers still end with their rank: PyTorch's worker loop exits when its parent is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_pretrain_loader(
    shards=None,
    *,
    sources: Sequence[Source] | None = None,
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
    normalize=True,
) -> PretrainLoader:
    """Endless pre-training batches {"video": (videos_per_batch * num_sample, 3, T, S, S)}.

    Pass either `shards` (a brace pattern, glob or list: one source named "shards", frame
    stride `stride`) or `sources` (a hybrid mix; each source's own stride applies and `stride`
    is ignored). Shards are resampled with replacement, independently per (rank, worker), so
    no node or worker splitting of the shard list is needed (world_size only validates rank).
    The stream is a pure function of (seed, rank, num_workers, sources); `skip_batches=k`
    starts at batch k of it without decoding the skipped videos (see the module docstring).

    `normalize=False` keeps clips uint8 until the consumer: batches hold uint8
    (B * num_sample, 3, T, S, S) pixels, a quarter of the bytes to write and hand over; apply
    `scaling.data.transforms.normalize_video` where the model runs (on an accelerator it is
    free). Measured in bench/data.py.
    """
    check_positive_ints(
        videos_per_batch=(videos_per_batch, 1), num_frames=(num_frames, 1), stride=(stride, 1),
        input_size=(input_size, 1), num_sample=(num_sample, 1), num_workers=(num_workers, 0),
        skip_batches=(skip_batches, 0), shuffle_buffer=(shuffle_buffer, 1), world_size=(world_size, 1),
    )  # fmt: skip
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    srcs = as_sources(shards, sources, stride=stride)
    dataset = PretrainClips(
        srcs,
        [expand_shards(s.shards) for s in srcs],
        videos_per_batch=videos_per_batch,
        num_frames=num_frames,
        input_size=input_size,
        num_sample=num_sample,
        seed=seed,
        rank=rank,
        skip_batches=skip_batches,
        shuffle_buffer=shuffle_buffer,
        normalize=normalize,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset batches itself
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        # in_order (the default) is what makes batch j come from worker j % num_workers.
        in_order=True,
        worker_init_fn=outlive_stop_signals,
    )
    return PretrainLoader(dataset, loader)


__all__ = [
    "build_pretrain_loader",
    "outlive_stop_signals",
    "PretrainLoader",
    "PretrainClips",
    "Counters",
    "expand_shards",
    "shared_empty",
    "STAT_NAMES",
    "Source",
]
