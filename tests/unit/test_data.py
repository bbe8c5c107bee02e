"""Data path: synthetic shards -> decord -> multi-scale crop -> deterministic, resumable batches."""

import io
import json
import random
import tarfile

import decord
import numpy as np
import pytest
import torch
import webdataset as wds

from scaling.data.stream import build_pretrain_loader
from scaling.data.synth import write_synthetic_shards
from scaling.data.transforms import IMAGENET_MEAN, IMAGENET_STD, multi_scale_crop, sample_crop_box, to_normalized_tensor
from scaling.data.video import VideoDecodeError, clip_indices, decode_frames

# Small everything, so the file runs in seconds on 2 cores.
SMALL = dict(num_frames=8, stride=2, input_size=32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return write_synthetic_shards(out, num_videos=12, videos_per_shard=4, num_frames=24, height=48, width=64, seed=0)


def take(loader, n):
    it = iter(loader)
    return [next(it)["video"] for _ in range(n)]


def test_synth_shards_decode(shards):
    assert len(shards) == 3
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(12)]
    for s in samples[:4]:
        meta = json.loads(s["json"])
        assert meta["source"] == "synth" and 0 <= meta["label"] < 4
        assert (meta["num_frames"], meta["height"], meta["width"]) == (24, 48, 64)
        vr = decord.VideoReader(io.BytesIO(s["mp4"]), num_threads=1)
        assert len(vr) == 24
        assert vr[0].shape == (48, 64, 3)
    # Moving shapes: frames differ over time.
    frames = decode_frames(samples[0]["mp4"], 2, 10, random.Random(0))
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).mean() > 0.5


def test_synth_is_deterministic(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", 3, num_frames=8, height=32, width=32, seed=5)
    b = write_synthetic_shards(tmp_path / "b", 3, num_frames=8, height=32, width=32, seed=5)
    assert [open(x, "rb").read() for x in a] == [open(x, "rb").read() for x in b]


def test_clip_indices_loop_short_videos():
    assert clip_indices(5, 4, 2, random.Random(0)) == [0, 2, 4, 1]  # span 8 > 5 frames: wraps
    idx = clip_indices(100, 4, 3, random.Random(0))
    assert np.all(np.diff(idx) == 3) and idx[-1] < 100


def test_decode_garbage_raises():
    with pytest.raises(VideoDecodeError):
        decode_frames(b"not a video at all" * 100, 4, 1, random.Random(0))
    with pytest.raises(VideoDecodeError):
        decode_frames(b"", 4, 1, random.Random(0))


def test_multi_scale_crop_and_normalize():
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 60, 80, 3), dtype=np.uint8)
    out = multi_scale_crop(frames, 32, rng=random.Random(0))
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
    allowed = {int(60 * s) for s in (1, 0.875, 0.75, 0.66)}
    for k in range(50):
        x, y, w, h = sample_crop_box(60, 80, 32, rng=random.Random(k))
        assert w in allowed and h in allowed and x + w <= 80 and y + h <= 60
    t = to_normalized_tensor(out)
    assert t.shape == (3, 4, 32, 32) and t.dtype == torch.float32
    ref = (out[..., 1].astype(np.float32) / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    torch.testing.assert_close(t[1], torch.from_numpy(ref))


def test_loader_shapes_and_range(shards):
    loader = build_pretrain_loader(shards, videos_per_batch=3, **SMALL)
    (video,) = take(loader, 1)
    assert video.shape == (3, 3, 8, 32, 32) and video.dtype == torch.float32
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert lo - 1e-5 <= video.min() and video.max() <= hi + 1e-5
    assert video.std() > 0.1


def test_same_seed_same_batches_and_ranks_differ(shards):
    a = take(build_pretrain_loader(shards, videos_per_batch=2, seed=3, **SMALL), 4)
    b = take(build_pretrain_loader(shards, videos_per_batch=2, seed=3, **SMALL), 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    r1 = take(build_pretrain_loader(shards, videos_per_batch=2, seed=3, rank=1, world_size=2, **SMALL), 4)
    assert not any(torch.equal(x, y) for x, y in zip(a, r1))
    s4 = take(build_pretrain_loader(shards, videos_per_batch=2, seed=4, **SMALL), 4)
    assert not any(torch.equal(x, y) for x, y in zip(a, s4))


@pytest.mark.parametrize("num_workers,skip", [(0, 3), (2, 3), (2, 4)])
def test_skip_batches_resumes_exactly(shards, num_workers, skip):
    kw = dict(videos_per_batch=2, seed=7, num_workers=num_workers, **SMALL)
    full = take(build_pretrain_loader(shards, **kw), skip + 3)
    resumed_loader = build_pretrain_loader(shards, skip_batches=skip, **kw)
    resumed = take(resumed_loader, 3)
    for k, batch in enumerate(resumed):
        assert torch.equal(batch, full[skip + k]), f"batch {skip + k} differs after resume"
    if num_workers == 0:  # counters are exact in-process: skipped videos were not decoded
        st = resumed_loader.stats
        assert st["skipped_raw"] == skip * 2 and st["videos"] == 3 * 2


def test_repeated_augmentation(shards):
    (video,) = take(build_pretrain_loader(shards, videos_per_batch=2, num_sample=2, **SMALL), 1)
    assert video.shape == (4, 3, 8, 32, 32)
    assert not torch.equal(video[0], video[1]) and not torch.equal(video[2], video[3])


def _write_shard_with_corrupt_sample(path, good_shard):
    """Copy a good shard's members and add one sample whose mp4 is garbage."""
    with tarfile.open(good_shard) as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        for name, data in (("bad00000.mp4", b"\x00garbage" * 500), ("bad00000.json", b'{"label": 0}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return str(path)


def test_corrupt_sample_is_skipped_and_counted(shards, tmp_path, caplog):
    shard = _write_shard_with_corrupt_sample(tmp_path / "mixed-000000.tar", shards[0])  # 4 good + 1 bad
    kw = dict(videos_per_batch=5, seed=0, **SMALL)
    loader = build_pretrain_loader([shard], **kw)
    batches = take(loader, 3)  # 15 raw samples resampled from a 5-sample shard
    assert all(b.shape == (5, 3, 8, 32, 32) for b in batches)
    assert loader.stats["bad_samples"] >= 1 and loader.stats["videos"] == 15
    assert sum("bad00000" in r.getMessage() for r in caplog.records) == 1  # warned once per key
    # Bad samples are replaced inside their own batch, so resume stays exact past them
    # (with seed 0 the bad sample falls in batches 0 and 1, both skipped here).
    resumed = take(build_pretrain_loader([shard], skip_batches=2, **kw), 1)
    assert torch.equal(resumed[0], batches[2])


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        build_pretrain_loader([str(tmp_path / "nope.tar")], videos_per_batch=1)
    with pytest.raises(ValueError, match="videos_per_batch"):
        build_pretrain_loader([str(tmp_path)], videos_per_batch=0)


def test_shards_without_any_video_fail_clearly(tmp_path, monkeypatch):
    import scaling.data.stream as loader_mod

    monkeypatch.setattr(loader_mod, "MAX_CONSECUTIVE_BAD", 6)  # instead of 1000 bad decodes
    path = str(tmp_path / "junk-000000.tar")
    with wds.TarWriter(path) as sink:
        for k in range(3):
            sink.write({"__key__": f"{k:08d}", "mp4": b"junk" * 100})
    loader = build_pretrain_loader([path], videos_per_batch=2, **SMALL)
    with pytest.raises(RuntimeError, match="could not be decoded"):
        take(loader, 1)
    assert loader.stats["bad_groups"] >= 3 and loader.stats["batches"] == 0


# ---- hybrid mix -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("mix")
    a = write_synthetic_shards(out / "a", 8, videos_per_shard=4, num_frames=16, height=48, width=64, seed=1)
    b = write_synthetic_shards(out / "b", 8, videos_per_shard=4, num_frames=16, height=48, width=64, seed=2)
    return a, b


def test_mix_realizes_the_weights_over_2000_samples(two_sources):
    from scaling.data.sources import Source

    a, b = two_sources
    sources = [Source("k", a, weight=0.7), Source("ssv2", b, weight=0.3, stride=1, flip=False)]
    loader = build_pretrain_loader(sources=sources, videos_per_batch=50, num_frames=4, input_size=16, num_workers=0)
    it = iter(loader)
    for _ in range(40):  # 2,000 videos
        next(it)
    st = loader.stats
    drawn = st["source/k/samples"] + st["source/ssv2/samples"]
    assert drawn == st["raw_samples"] == 2000 and st["clips"] == 2000
    share = st["source/k/samples"] / drawn
    assert abs(share - 0.7) < 0.03, st
    assert abs(share - 0.7) < 0.005, "the quasi-random mix tracks the weights within a few samples"
    assert st["source/k/clips"] + st["source/ssv2/clips"] == 2000


def test_mix_is_deterministic_resumable_and_uses_each_sources_stride(two_sources, monkeypatch):
    import scaling.data.stream as loader_mod
    from scaling.data.sources import Source

    a, b = two_sources
    sources = [Source("a", a, weight=0.5, stride=3), Source("b", b, weight=0.5, stride=1)]
    kw = dict(sources=sources, videos_per_batch=2, seed=5, **{**SMALL, "num_frames": 4})
    full = take(build_pretrain_loader(**kw), 5)
    resumed = take(build_pretrain_loader(skip_batches=3, **kw), 2)
    assert all(torch.equal(x, y) for x, y in zip(resumed, full[3:]))
    strides = []
    real = loader_mod.clip_indices
    monkeypatch.setattr(loader_mod, "clip_indices", lambda n, t, stride, rng: strides.append(stride) or real(n, t, stride, rng))
    loader = build_pretrain_loader(**kw)
    take(loader, 4)
    st = loader.stats
    assert strides.count(3) == st["source/a/clips"] > 0 and strides.count(1) == st["source/b/clips"] > 0


def test_plain_shards_equal_one_source(shards):
    from scaling.data.sources import Source

    plain = take(build_pretrain_loader(shards, videos_per_batch=2, seed=1, **SMALL), 2)
    single = take(build_pretrain_loader(sources=[Source("x", shards, stride=SMALL["stride"])], videos_per_batch=2, seed=1,
                                        **{k: v for k, v in SMALL.items() if k != "stride"}), 2)
    assert all(torch.equal(x, y) for x, y in zip(plain, single))


def test_source_errors_are_clear(shards):
    from scaling.data.sources import Source

    with pytest.raises(ValueError, match="exactly one of shards"):
        build_pretrain_loader(shards, sources=[Source("a", shards)], videos_per_batch=1)
    with pytest.raises(ValueError, match="unique"):
        build_pretrain_loader(sources=[Source("a", shards), Source("a", shards)], videos_per_batch=1)
    with pytest.raises(ValueError, match="weight"):
        build_pretrain_loader(sources=[Source("a", shards, weight=0)], videos_per_batch=1)


def test_uint8_output_normalizes_to_the_float_output(shards):
    from scaling.data.transforms import normalize_video

    kw = dict(videos_per_batch=2, num_sample=2, seed=2, **SMALL)
    (f32,) = take(build_pretrain_loader(shards, **kw), 1)
    (u8,) = take(build_pretrain_loader(shards, normalize=False, **kw), 1)
    assert u8.dtype == torch.uint8 and u8.shape == f32.shape
    assert torch.equal(normalize_video(u8), f32)


def test_read_clips_decodes_once_and_matches_single_clips(shards):
    from scaling.data.video import open_video, read_clips, read_frames

    mp4 = next(iter(wds.WebDataset(shards[:1], shardshuffle=False, empty_check=False)))["mp4"]
    vr = open_video(mp4)  # 24 frames
    index_lists = [[3, 5, 7, 9], [4, 6, 8, 10], [20, 22, 0, 2], [3, 5, 7, 9]]  # overlapping, looping, repeated
    clips = read_clips(vr, index_lists)
    for idx, clip in zip(index_lists, clips):
        assert np.array_equal(clip, read_frames(open_video(mp4), idx))


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_loader_workers_outlive_a_stop_signal_to_the_process_group(shards, kind):
    """torchrun (killpg), a terminal's Ctrl-C and Slurm signal a rank's whole process group. The
    rank answers by saving at the end of its step; a worker killed by the signal would make its
    DataLoader raise first ("worker ... killed by signal: Terminated"), so workers ignore it."""
    import os
    import signal

    from scaling.data.finite import build_finetune_loader

    if kind == "pretrain":
        loader = build_pretrain_loader(shards, videos_per_batch=2, num_workers=2, **SMALL)
    else:
        loader = build_finetune_loader(shards, videos_per_batch=2, num_workers=2, rand_aug=None, reprob=0, **SMALL)
    it = iter(loader)
    next(it)
    for worker in it._workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    batches = [next(it) for _ in range(4 if kind == "pretrain" else 3)]  # 12 videos: 6 finetune batches, 1 taken
    assert all(b["video"].shape[0] >= 2 for b in batches)
    assert all(w.is_alive() for w in it._workers)
