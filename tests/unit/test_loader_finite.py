"""Finite fine-tune/eval loader: exactly once per epoch over ranks x workers, equal batch counts,
per-epoch shuffles, test views; and the fine-tune clip transforms."""

import json
import random

import numpy as np
import pytest
import torch
import webdataset as wds

from scaling.data.finite import build_finetune_loader
from scaling.data.sources import Source
from scaling.data.synth import write_synthetic_shards
from scaling.data.transforms import (
    ClipRandAugment,
    ClipRandomErasing,
    finetune_clip,
    long_side_crops,
    random_resized_crop_box,
    resize_short_side,
)
from scaling.data.video import uniform_clip_indices

SMALL = dict(num_frames=8, stride=2, input_size=32)
N = 15  # 4 shards of 4, 4, 4, 3: uneven on purpose


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    return write_synthetic_shards(out, N, videos_per_shard=4, num_frames=24, height=48, width=64, seed=3)


@pytest.fixture(scope="module")
def labels(shards):
    return {s["__key__"]: json.loads(s["json"])["label"] for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)}


def per_video(batch, views):
    """(index, valid, label, key) per video of a batch whose views are adjacent."""
    idx, valid, label = (batch[k][::views].tolist() for k in ("index", "valid", "label"))
    return list(zip(idx, valid, label, batch["key"][::views]))


def epoch_videos(shards, *, rank, epoch, train=True, num_workers=2, **kw):
    loader = build_finetune_loader(shards, videos_per_batch=2, rank=rank, world_size=2, epoch=epoch, train=train,
                                   num_workers=num_workers, **{**SMALL, **kw})
    views = kw.get("num_sample", 2) if train else kw.get("test_clips", 5) * kw.get("test_crops", 3)
    batches = list(loader)
    assert len(batches) == len(loader)
    return [v for b in batches for v in per_video(b, views)], loader


def test_two_ranks_two_workers_read_every_sample_exactly_once_per_epoch(shards, labels):
    orders = []
    for epoch in (0, 1):
        per_rank = [epoch_videos(shards, rank=r, epoch=epoch, num_sample=1, rand_aug=None, reprob=0) for r in (0, 1)]
        counts = [len(loader) for _, loader in per_rank]
        assert counts[0] == counts[1] == 4  # ceil(15 / (2 ranks * 2 videos)); ranks step together
        valid = [v for videos, _ in per_rank for v in videos if v[1]]
        assert sorted(i for i, *_ in valid) == list(range(N)), "union is every sample, none twice"
        assert len({k for *_, k in valid}) == N
        assert all(labels[k] == lab for _, _, lab, k in valid), "labels come from each sample's json"
        padded = [v for videos, _ in per_rank for v in videos if not v[1]]
        assert len(padded) == 2 * 4 * 2 - N  # the tail pad is marked invalid
        for _, loader in per_rank:
            assert loader.stats["samples"] + loader.stats["padded"] == 8 and loader.stats["bad_samples"] == 0
        orders.append([i for videos, _ in per_rank for i, *_ in videos])
    assert orders[0] != orders[1], "each epoch has its own shuffle"


def test_output_does_not_depend_on_workers_and_resume_skips_batches(shards):
    kw = dict(videos_per_batch=2, seed=1, epoch=2, num_sample=2, **SMALL)
    a = list(build_finetune_loader(shards, num_workers=0, **kw))
    b = list(build_finetune_loader(shards, num_workers=2, **kw))
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["index"], y["index"])
    resumed = list(build_finetune_loader(shards, num_workers=0, skip_batches=5, **kw))
    assert len(resumed) == 3 and all(torch.equal(x["video"], y["video"]) for x, y in zip(resumed, a[5:]))
    x = a[0]
    assert x["video"].shape == (4, 3, 8, 32, 32) and x["label"].dtype == torch.long and x["valid"].dtype == torch.bool
    assert torch.equal(x["index"][0::2], x["index"][1::2]) and not torch.equal(x["video"][0], x["video"][1])


def test_set_epoch_reshuffles(shards):
    loader = build_finetune_loader(shards, videos_per_batch=4, num_sample=1, rand_aug=None, reprob=0, **SMALL)
    first = [i for b in loader for i in b["index"].tolist()]
    loader.set_epoch(1)
    second = [i for b in loader for i in b["index"].tolist()]
    assert first != second and sorted(first[:N]) == sorted(second[:N]) == list(range(N))


def test_eval_views_are_adjacent_in_order_and_deterministic(shards, labels):
    kw = dict(train=False, test_clips=2, test_crops=3)
    videos = []
    for r in (0, 1):
        got, loader = epoch_videos(shards, rank=r, epoch=0, num_workers=0, **kw)
        assert len(loader) == 4
        videos.append(got)
    valid = sorted(v for got in videos for v in got if v[1])
    assert [i for i, *_ in valid] == list(range(N)) and all(labels[k] == lab for _, _, lab, k in valid)
    assert [i for i, *_ in videos[0]][:4] == [0, 2, 4, 6], "evaluation reads in index order, ranks interleaved"
    one = build_finetune_loader(shards, videos_per_batch=2, **SMALL, **kw)
    b1, b2 = next(iter(one)), next(iter(one))
    assert torch.equal(b1["video"], b2["video"]) and b1["video"].shape == (12, 3, 8, 32, 32)
    assert b1["key"][:6] == [b1["key"][0]] * 6 and b1["key"][6] != b1["key"][0]
    # 3 crops of one clip differ (different places along the long side), as do the 2 clips.
    v = b1["video"]
    assert not torch.equal(v[0], v[1]) and not torch.equal(v[0], v[3])


def test_sources_union_with_per_source_flip_and_stride(shards, tmp_path):
    other = write_synthetic_shards(tmp_path, 5, videos_per_shard=5, num_frames=24, height=48, width=64, seed=9)
    sources = [Source("k400", shards, stride=2), Source("ssv2", other, weight=5.0, stride=1, flip=False)]
    loader = build_finetune_loader(sources=sources, videos_per_batch=4, num_frames=8, input_size=32, num_sample=1)
    batches = list(loader)
    names = [s for b in batches for s, ok in zip(b["source"], b["valid"].tolist()) if ok]
    assert names.count("k400") == N and names.count("ssv2") == 5, "weights do not apply to finite reading"
    st = loader.stats
    assert st["source/k400/samples"] == N and st["source/ssv2/samples"] == 5 and st["index_samples"] == N + 5


# ---- transforms ---------------------------------------------------------------------------------


def test_rand_augment_applies_the_same_ops_to_every_frame():
    img = np.random.default_rng(0).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    frames = np.stack([img] * 4)
    aug = ClipRandAugment("rand-m7-n4-mstd0.5-inc1", 40)
    state = random.getstate()
    outs = [aug(frames, seed) for seed in range(6)]
    assert random.getstate() == state, "global random state is restored"
    for out in outs:
        assert out.shape == frames.shape and out.dtype == np.uint8
        assert all(np.array_equal(out[0], out[t]) for t in range(4)), "same ops and magnitudes on every frame"
    assert sum(not np.array_equal(o, frames) for o in outs) >= 4 and not np.array_equal(outs[0], outs[1])


def test_random_erasing_is_one_box_through_all_frames():
    clip = torch.zeros(3, 4, 32, 32)
    ClipRandomErasing(probability=1.0)(clip, seed=3)
    changed = clip != 0  # (3, T, H, W)
    assert changed.any()
    assert all(torch.equal(changed[0, 0], changed[c, t]) for c in range(3) for t in range(4))
    assert not torch.equal(clip[0, 0], clip[0, 1]), "fresh per-pixel noise per frame"
    untouched = torch.zeros(3, 4, 32, 32)
    ClipRandomErasing(probability=0.0)(untouched, seed=3)
    assert not untouched.any()


def test_random_resized_crop_box_and_flip():
    for k in range(200):
        x, y, w, h = random_resized_crop_box(60, 80, (0.08, 1.0), (0.75, 1.3333), random.Random(k))
        assert 0 <= x and x + w <= 80 and 0 <= y and y + h <= 60 and w > 0 and h > 0
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    outs = {flip: [finetune_clip(frames, 32, random.Random(s), torch.empty(3, 2, 32, 32), rand_aug=None, erase=None,
                                 scale=(1, 1), ratio=(1, 1), flip=flip) for s in range(8)] for flip in (False, True)}
    plain = outs[False][0]
    assert all(torch.equal(o, plain) for o in outs[False]), "full-frame crop, no flip: identity"
    flipped = [o for o in outs[True] if not torch.equal(o, plain)]
    assert flipped and all(torch.equal(o, plain.flip(-1)) for o in flipped), "one flip for all frames"


def test_test_views_geometry():
    assert uniform_clip_indices(100, 4, 2, 3) == [[0, 2, 4, 6], [46, 48, 50, 52], [92, 94, 96, 98]]
    assert uniform_clip_indices(100, 4, 2, 1) == [[46, 48, 50, 52]]
    assert uniform_clip_indices(5, 4, 2, 2) == [[0, 2, 4, 1], [0, 2, 4, 1]]  # short: loop
    landscape = resize_short_side(np.zeros((2, 48, 64, 3), np.uint8), 32)
    portrait = resize_short_side(np.zeros((2, 131, 97, 3), np.uint8), 32)
    assert landscape.shape == (2, 32, 43, 3) and portrait.shape == (2, 43, 32, 3)
    frames = np.arange(43)[None, None, :, None].repeat(32, 1).repeat(3, 3)  # (1, 32, 43, 3): x coordinate
    crops = long_side_crops(frames, 32, 3)
    assert [c[0, 0, 0, 0] for c in crops] == [0, 6, 11] and all(c.shape == (1, 32, 32, 3) for c in crops)


def test_missing_labels_are_invalid_in_training_and_minus_one_in_evaluation(tmp_path, shards):
    path = str(tmp_path / "nolabel-000000.tar")
    samples = list(wds.WebDataset(shards[:1], shardshuffle=False, empty_check=False))
    with wds.TarWriter(path) as sink:
        for k, s in enumerate(samples):
            sink.write({"__key__": s["__key__"], "mp4": s["mp4"], "json": b'{"label": null}' if k == 0 else s["json"]})
    train = build_finetune_loader([path], videos_per_batch=4, num_sample=1, rand_aug=None, reprob=0, **SMALL)
    (batch,) = list(train)
    invalid = [k for k, ok in zip(batch["key"], batch["valid"].tolist()) if not ok]
    assert invalid == [samples[0]["__key__"]] and train.stats["bad/no_label"] == 1
    evaluate = build_finetune_loader([path], videos_per_batch=4, train=False, test_clips=1, test_crops=1, **SMALL)
    (batch,) = list(evaluate)
    assert batch["valid"].all() and batch["label"][0] == -1 and evaluate.stats["bad_samples"] == 0
