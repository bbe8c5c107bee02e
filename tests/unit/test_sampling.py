"""Segment sampling (VideoMAE V2 on SSv2): which frames a clip takes, in training and per test view.

The pinned indices follow the reference's SSv2 dataset: training cuts the L frames into
num_segments segments of L // num_segments frames and takes a random frame in each (a video
shorter than num_segments repeats frame 0 in front); test view k takes frame
int(k * tick / views + tick * x) of segment x, tick = L / num_segments.
"""
import random

import numpy as np
import pytest
import webdataset as wds

from scaling.config import ConfigError, load_config, validate
from scaling.data.finite import build_finetune_loader
from scaling.data.synth import encode_mp4
from scaling.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from scaling.data.video import segment_indices, segment_test_indices


def test_training_takes_one_random_frame_inside_each_segment():
    idx = segment_indices(50, 16, random.Random(0))  # segments of 50 // 16 = 3 frames
    assert idx == [1, 4, 6, 10, 14, 16, 19, 22, 25, 28, 32, 33, 38, 39, 43, 45]
    assert all(3 * s <= i < 3 * s + 3 for s, i in enumerate(idx))
    # Every frame of a segment is drawn sometimes, and nothing outside it.
    seen = {i for seed in range(200) for i in segment_indices(50, 16, random.Random(seed))[:1]}
    assert seen == {0, 1, 2}


def test_a_video_shorter_than_the_segments_repeats_its_first_frame():
    assert segment_indices(10, 16, random.Random(0)) == [0] * 6 + list(range(10))


def test_test_views_are_shifted_inside_the_segments():
    views = segment_test_indices(50, 16, 2)  # tick 3.125: view 1 is shifted by 1.5625 frames
    assert views == [[0, 3, 6, 9, 12, 15, 18, 21, 25, 28, 31, 34, 37, 40, 43, 46],
                     [1, 4, 7, 10, 14, 17, 20, 23, 26, 29, 32, 35, 39, 42, 45, 48]]
    assert segment_test_indices(10, 16, 2)[1] == [0, 0, 1, 2, 2, 3, 4, 4, 5, 5, 6, 7, 7, 8, 9, 9]


@pytest.mark.parametrize("num_frames", [10, 16, 31, 50, 97, 300])
def test_two_test_views_are_the_reference_procedure(num_frames):
    """VideoMAE V2's SSv2 test loader decodes the frames int(tick * x) and int(tick / 2 + tick * x)
    of every segment in one sorted list and gives view k the slice [k::2]."""
    tick = num_frames / 16
    decoded = sorted([int(tick / 2.0 + tick * x) for x in range(16)] + [int(tick * x) for x in range(16)])
    assert segment_test_indices(num_frames, 16, 2) == [decoded[0::2], decoded[1::2]]


@pytest.fixture(scope="module")
def counting_video(tmp_path_factory):
    """One 50-frame mp4 whose frame i is a flat grey of 4 * i + 20: a decoded clip tells which
    frames it holds."""
    frames = np.stack([np.full((48, 64, 3), 4 * i + 20, np.uint8) for i in range(50)])
    out = tmp_path_factory.mktemp("counting") / "count-000000.tar"
    with wds.TarWriter(str(out)) as sink:
        sink.write({"__key__": "clip", "mp4": encode_mp4(frames, fps=10), "json": {"label": 0}})
    return str(out)


def frame_numbers(clip) -> list[int]:
    """(3, T, S, S) normalized clip -> the frame number of each of its T flat frames."""
    mean = np.asarray(IMAGENET_MEAN).reshape(3, 1)
    std = np.asarray(IMAGENET_STD).reshape(3, 1)
    grey = (clip.flatten(2).mean(-1).numpy() * std + mean).mean(0) * 255  # (T,)
    return [int(round((g - 20) / 4)) for g in grey]


def test_the_loader_decodes_the_segment_frames(counting_video):
    common = dict(videos_per_batch=1, num_frames=16, input_size=32, num_workers=0, sampling="segments")
    test = build_finetune_loader(counting_video, train=False, test_clips=2, test_crops=1, **common)
    views = next(iter(test))["video"]  # (2 views, 3, T, S, S)
    assert [frame_numbers(v) for v in views] == segment_test_indices(50, 16, 2)

    train = build_finetune_loader(counting_video, train=True, num_sample=2, rand_aug=None, reprob=0.0, **common)
    for clip in next(iter(train))["video"]:  # 2 clips, each its own draw
        got = frame_numbers(clip)
        assert all(3 * s <= i < 3 * s + 3 for s, i in enumerate(got)), got

    stride = build_finetune_loader(counting_video, train=False, test_clips=1, test_crops=1, videos_per_batch=1,
                                   num_frames=16, input_size=32, stride=2)
    assert frame_numbers(next(iter(stride))["video"][0]) == list(range(9, 41, 2)), "stride 2 from the middle start"


def test_pretraining_keeps_stride_sampling(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)
    cfg = load_config("pipelines/pretrain_smoke.yaml", ["data.source=noise", "data.sampling=segments"])
    with pytest.raises(ConfigError, match="data.sampling=segments is for fine-tuning and testing"):
        validate(cfg, 2)
    with pytest.raises(ConfigError, match="data.sampling 'tsn' is unknown"):
        validate(load_config("pipelines/pretrain_smoke.yaml", ["data.source=noise", "data.sampling=tsn"]), 2)
