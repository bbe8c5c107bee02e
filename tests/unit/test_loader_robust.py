"""Broken and awkward data: every case is skipped or handled, counted in `.stats`, and the run goes
on, for the pre-training (endless) and the fine-tune/eval (finite) loader alike."""

import io
import random
import tarfile

import av
import numpy as np
import pytest
import torch

from scaling.data.finite import build_finetune_loader
from scaling.data.stream import build_pretrain_loader
from scaling.data.synth import encode_mp4, render_video, write_synthetic_shards
from scaling.data.video import VideoDecodeError, decode_frames

SMALL = dict(num_frames=8, stride=2, input_size=32)


def encode_any(frames: np.ndarray, faststart_path=None) -> bytes:
    """H.264 in yuv444p, which (unlike yuv420p) allows odd widths and heights."""
    _, h, w, _ = frames.shape
    target = faststart_path or io.BytesIO()
    opts = {"movflags": "faststart"} if faststart_path else {}
    with av.open(target, mode="w", format="mp4", options=opts) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv444p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return open(faststart_path, "rb").read() if faststart_path else target.getvalue()


def video(h, w, t=24, seed=0):
    return render_video(np.random.default_rng(seed), seed % 4, t, h, w)


# name -> (mp4 bytes or None for "no mp4 member", what the loaders should do with it)
def awkward_samples(tmp_path):
    good = encode_mp4(video(48, 64), 10)
    return {
        "good0": (good, "ok"),
        "good1": (encode_mp4(video(48, 64, seed=1), 10), "ok"),
        "corrupt": (b"\x00\x01garbage" * 300, "decode"),
        "truncated": (good[: len(good) // 2], "decode"),  # moov atom (at the end) cut off
        "cutstream": (encode_any(video(48, 64, seed=2), tmp_path / "fs.mp4")[:-300], "fallback"),  # faststart, tail cut
        "empty": (b"", "empty"),
        "nomp4": (None, "missing_video"),
        "short": (encode_mp4(video(48, 64, t=5, seed=3), 10), "short"),  # 5 frames < 8 x 2
        "odd": (encode_any(video(97, 131, seed=4)), "ok"),
        "portrait": (encode_any(video(131, 97, seed=5)), "ok"),
        "tiny": (encode_mp4(video(20, 28, seed=6), 10), "small"),  # smaller than the 32 px crop: upscaled
        "decordbug": (encode_mp4(video(32, 48, seed=7), 10), "fallback"),  # decord's get_batch fails on 48x32
    }


def write_tar(path, samples: dict) -> str:
    with tarfile.open(path, "w") as tar:
        for key, (mp4, _) in samples.items():
            members = [("json", b'{"label": 1}')] + ([("mp4", mp4)] if mp4 is not None else [])
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    samples = awkward_samples(tmp)
    awkward = write_tar(tmp / "awkward-000000.tar", samples)
    good = write_synthetic_shards(tmp / "good", 6, videos_per_shard=6, num_frames=24, height=48, width=64, seed=1)[0]
    raw = open(good, "rb").read()
    with tarfile.open(good) as tar:
        members = tar.getmembers()
    cut_member = members[7]  # the 4th sample's mp4: samples 0-2 complete, 3 loses its video, 4-5 gone
    truncated = str(tmp / "truncated-000000.tar")
    with open(truncated, "wb") as f:
        f.write(raw[: cut_member.offset_data + cut_member.size // 2])
    return samples, awkward, truncated


def test_video_level_cases(data):
    samples, _, _ = data
    for name, (mp4, expect) in samples.items():
        if mp4 is None:
            continue
        if expect in ("decode", "empty"):
            with pytest.raises(VideoDecodeError):
                decode_frames(mp4, 8, 2, random.Random(0))
        else:
            frames = decode_frames(mp4, 8, 2, random.Random(0))
            assert frames.shape[0] == 8 and frames.dtype == np.uint8, name


def test_pretrain_loader_skips_counts_and_continues(data):
    samples, awkward, truncated = data
    loader = build_pretrain_loader([awkward, truncated], videos_per_batch=4, shuffle_buffer=8, num_workers=0, **SMALL)
    it = iter(loader)
    batches = [next(it)["video"] for _ in range(30)]  # 120 raw samples drawn from both shards
    assert all(b.shape == (4, 3, 8, 32, 32) and torch.isfinite(b).all() for b in batches)
    st = loader.stats
    assert st["videos"] == 120 and st["bad_groups"] == 0
    for key in ("bad/decode", "bad/empty", "bad/missing_video", "tar_errors", "short_videos", "small_videos", "pyav_fallback"):
        assert st[key] > 0, (key, st)
    assert st["bad_samples"] == st["bad/decode"] + st["bad/empty"] + st["bad/missing_video"]


def test_pretrain_loader_with_workers_survives_the_same(data):
    _, awkward, truncated = data
    loader = build_pretrain_loader([awkward, truncated], videos_per_batch=4, shuffle_buffer=8, num_workers=2, **SMALL)
    it = iter(loader)
    assert all(next(it)["video"].shape == (4, 3, 8, 32, 32) for _ in range(6))
    assert loader.stats["bad_samples"] > 0


@pytest.mark.parametrize("train", [True, False])
def test_finite_loader_accounts_for_every_sample(data, train):
    samples, awkward, truncated = data
    loader = build_finetune_loader([awkward, truncated], videos_per_batch=3, rank=0, world_size=1, train=train,
                                   num_sample=2, test_clips=2, test_crops=2, num_workers=0, **SMALL)
    batches = list(loader)
    st = loader.stats
    views = 2 if train else 4
    # 12 awkward samples + 4 from the cut tar (3 complete, the 4th without its mp4); 2 lost, 1 tar error.
    assert st["index_samples"] == 16 and st["tar_errors"] == 1
    bad = {k for k, (_, e) in samples.items() if e in ("decode", "empty", "missing_video")} | {"00000003"}
    invalid_keys = {k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if not ok}
    valid_keys = [k for b in batches for k, ok in zip(b["key"][::views], b["valid"][::views].tolist()) if ok]
    # Invalid: the bad samples, plus the 2 padding slots (18 = 6 batches x 3), repeats of valid ones.
    assert invalid_keys - set(valid_keys) == bad and len(valid_keys) == 16 - len(bad) == len(set(valid_keys))
    assert st["padded"] + st["samples"] + st["bad_samples"] == 18
    assert st["bad_samples"] == len(bad) == st["bad/decode"] + st["bad/empty"] + st["bad/missing_video"]
    assert st["samples"] == 16 - len(bad) and st["bad/missing_video"] == 2
    assert st["short_videos"] >= 1 and st["small_videos"] >= 1 and st["pyav_fallback"] >= 2
    assert all(torch.isfinite(b["video"]).all() for b in batches)


def test_unreadable_shards_fail_clearly_instead_of_spinning(tmp_path, monkeypatch):
    import scaling.data.stream as loader_mod

    junk = tmp_path / "junk-000000.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    empty = tmp_path / "empty-000000.tar"
    empty.write_bytes(b"")
    monkeypatch.setattr(loader_mod, "MAX_CONSECUTIVE_TAR_ERRORS_PER_SHARD", 3)
    loader = build_pretrain_loader([str(junk), str(empty)], videos_per_batch=2, **SMALL)
    with pytest.raises(RuntimeError, match="tar read errors in a row"):
        next(iter(loader))
    assert loader.stats["tar_errors"] >= 6
    with pytest.raises(ValueError, match="hold no samples"):
        build_finetune_loader([str(junk), str(empty)], videos_per_batch=2, **SMALL)


def test_pyav_fallback_matches_decord_and_wraps_past_its_end():
    from scaling.data.video import Video

    mp4 = encode_mp4(video(48, 64, t=12, seed=8), 10)
    indices = [1, 4, 7, 10]
    ref = Video(mp4).get_batch(indices).astype(int)
    forced = Video(mp4)
    forced._vr, forced.fallback, forced._error = None, True, "forced"  # as after a decord failure
    got = forced.get_batch(indices).astype(int)
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 2.0
    forced._len = 20  # decord over-counted: indices past PyAV's 12 frames wrap around
    assert np.array_equal(forced.get_batch([11, 13]), forced.get_batch([11, 1]))
