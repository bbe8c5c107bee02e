"""`scaling shard` reads the list formats people bring: the reference's space-separated lists,
raw-frame folders, and the K710 lists `scaling labels k710` writes. Real files: PyAV-made mp4s
and PIL-written JPEG frames, read back from the shards with decord."""
from __future__ import annotations

import io
import json
import tarfile

import decord
import numpy as np
import pytest
from PIL import Image
from test_shards import pyav_video

from scaling.data.kinetics import load_k710_classes
from scaling.data.shard_inputs import ShardInputError, list_inputs
from scaling.data.shards import write_shards


def samples(out):
    """{key: (meta, decord frame count, fps)} of every shard under `out`."""
    found = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                vr = decord.VideoReader(io.BytesIO(members[key + ".mp4"]), num_threads=1)
                found[key] = (json.loads(data), len(vr), vr.get_avg_fps())
    return found


def frame_folder(folder, count, first=1, size=(80, 48)):
    folder.mkdir(parents=True)
    for i in range(first, first + count):
        img = np.full((size[1], size[0], 3), (i * 20) % 256, np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:05d}.jpg")


def test_videomae_lists_with_videos_and_raw_frames(tmp_path):
    pyav_video(tmp_path / "a.mp4", "libx264", 64, 48, 10, 20)
    pyav_video(tmp_path / "b.mp4", "libx264", 64, 48, 10, 12)
    frame_folder(tmp_path / "frames" / "v1", 10)  # fine-tune layout: numbered from 1
    frame_folder(tmp_path / "frames" / "v2", 8, first=5)  # pre-training layout: start index given
    (tmp_path / "train.txt").write_text("a.mp4 3\nb.mp4 0 -1\nframes/v1 10 7\nframes/v2 5 8 -1\n")
    m = write_shards(tmp_path / "train.txt", tmp_path / "out", workers=1, frames_fps=12, samples_per_shard=2)
    assert (m["count"], m["failures"]) == (4, 0)
    got = samples(tmp_path / "out")
    assert [got[k][0]["label"] for k in sorted(got)] == [3, None, 7, None]
    assert [got[k][1] for k in sorted(got)] == [20, 12, 10, 8]  # every listed frame, nothing more
    assert got["00000002"][2] == pytest.approx(12)  # raw frames at the rate they were extracted at
    assert got["00000002"][0]["codec"] == "frames"


def test_missing_frames_are_skipped_with_the_reason(tmp_path):
    frame_folder(tmp_path / "v1", 4)
    (tmp_path / "list.txt").write_text("v1 6 1\n")  # says 6 frames, 4 exist
    m = write_shards(tmp_path / "list.txt", tmp_path / "out", workers=1)
    assert m["count"] == 0
    reason = json.loads((tmp_path / "out" / "failures.jsonl").read_text().splitlines()[0])["reason"]
    assert "2 of 6 frames missing" in reason and "img_00005.jpg" in reason


def test_k710_list_from_scaling_labels_finds_the_downloaded_files(tmp_path):
    classes = load_k710_classes()
    videos = tmp_path / "videos" / "abseiling"  # downloaders often keep class folders
    videos.mkdir(parents=True)
    pyav_video(videos / "AbC-123_000010_000020.mp4", "libx264", 64, 48, 10, 10)
    pyav_video(videos.parent / "xyz_000001_000011.mkv", "libx264", 64, 48, 10, 10)
    k = classes.index("zumba")
    (tmp_path / "k710_train.csv").write_text(
        "youtube_id,time_start,time_end,label,label_index,source\n"
        f"AbC-123,10,20,abseiling,{classes.index('abseiling')},k400\n"
        f"xyz,1,11,zumba,{k},k700\n"
        "notdownloaded,0,10,zumba,{k},k700\n".replace("{k}", str(k)))
    items, class_map = list_inputs(tmp_path / "k710_train.csv", video_root=tmp_path / "videos")
    assert [i.label for i in items] == [classes.index("abseiling"), k, k]
    assert [i.label_name for i in items][:2] == ["abseiling", "zumba"]
    assert len(class_map) == 710
    m = write_shards(tmp_path / "k710_train.csv", tmp_path / "out", workers=1, video_root=tmp_path / "videos")
    assert (m["count"], m["failures"]) == (2, 1)  # the missing download is listed, not fatal
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["classes"]["zumba"] == k


def test_a_line_in_no_known_format_is_refused_with_its_number(tmp_path):
    (tmp_path / "bad.txt").write_text("a.mp4 1\nb.mp4 x y z w\n")
    with pytest.raises(ShardInputError, match="line 2"):
        list_inputs(tmp_path / "bad.txt")
    (tmp_path / "video_with_frames.txt").write_text("a.mp4 0 16\n")
    with pytest.raises(ShardInputError, match="is not a folder"):
        list_inputs(tmp_path / "video_with_frames.txt")
