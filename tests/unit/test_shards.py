"""`scaling shard` on real videos: PyAV- and ffmpeg-made inputs of several codecs, containers,
sizes and frame rates, plus corrupt files; shards read back with webdataset and decord.

Needs the `ffmpeg` command (the Makefile installs it; the tests fail without it). Videos are tiny (<= 160 px, <= 50
frames) so the whole file runs in seconds on 2 cores.
"""

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import webdataset as wds

from scaling.cli import main
from scaling.data.shards import Item, plan_shards, target_size, write_shards

SHORT, MAX_S = 64, 3.0  # options of the main run: short side 64 px, at most 3 s



def pyav_video(path, codec, width, height, fps, frames, fmt=None):
    """Moving gradient frames encoded with PyAV (codec in the container given by the suffix)."""
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            img = np.stack([(xx * 4 + t * 8) % 256, (yy * 4) % 256, np.full_like(xx, (t * 20) % 256)], -1)
            for p in s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def cut(src, dst, keep=0.5):
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Folder `root/{cat,dog}/...`; returns (root, good names -> copied?, bad names -> reason part)."""
    # Fail, not skip: a CI without ffmpeg would otherwise pass without testing real files.
    assert shutil.which("ffmpeg"), "these tests make input videos with the ffmpeg command: apt-get install -y ffmpeg"
    root = tmp_path_factory.mktemp("videos")
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(), dog.mkdir()
    pyav_video(cat / "small_h264.mp4", "libx264", 96, 64, 16, 32)  # fits: copied
    pyav_video(cat / "big_h264.mp4", "libx264", 160, 120, 25, 50)  # too big: scaled down
    pyav_video(cat / "long_h264.mp4", "libx264", 64, 48, 10, 40)  # 4 s: cut at 3 s
    pyav_video(dog / "mpeg4.avi", "mpeg4", 128, 96, 12, 36)
    lavfi = ["-f", "lavfi", "-i"]
    h264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
    ffmpeg(*lavfi, "testsrc=size=160x90:rate=30000/1001", "-t", "1.5", *h264, str(cat / "ff_ntsc.mp4"))
    ffmpeg(*lavfi, "testsrc=size=64x48:rate=20", "-t", "2.5", *h264, "-movflags", "+faststart",
           str(cat / "ff_fast.mp4"))  # fits: copied
    ffmpeg(*lavfi, "testsrc=size=128x72:rate=24", "-t", "1", "-c:v", "libx265", "-x265-params", "log-level=error",
           str(dog / "ff_hevc.mkv"))
    # vp8/vp9 through the CLI: PyAV's bundled libvpx encoders refuse to open (EINVAL) inside the
    # full pytest process (after the DeepSpeed tests), for reasons not found; the CLI is a separate process.
    ffmpeg(*lavfi, "testsrc=size=96x96:rate=15", "-t", "2", "-c:v", "libvpx-vp9", "-deadline", "realtime",
           str(dog / "vp9.webm"))
    ffmpeg(*lavfi, "testsrc=size=80x60:rate=20", "-t", "2", "-c:v", "libvpx", "-deadline", "realtime",
           str(dog / "vp8.mkv"))  # fits in size, but not an mp4
    ffmpeg(*lavfi, "testsrc=size=64x64:rate=25", "-t", "1", "-c:v", "libx264", "-pix_fmt", "yuv444p",
           str(dog / "ff_yuv444.mp4"))  # h264 mp4, but 4:4:4: transcoded
    good = {"cat/small_h264.mp4": True, "cat/ff_fast.mp4": True, "cat/big_h264.mp4": False, "cat/long_h264.mp4": False,
            "cat/ff_ntsc.mp4": False, "dog/mpeg4.avi": False, "dog/vp9.webm": False, "dog/vp8.mkv": False,
            "dog/ff_hevc.mkv": False, "dog/ff_yuv444.mp4": False}

    (cat / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    (cat / "empty.mp4").write_bytes(b"")
    cut(cat / "big_h264.mp4", dog / "truncated.mp4")  # PyAV puts the index at the end: cut away
    cut(cat / "ff_fast.mp4", dog / "truncated_fast.mp4", 0.7)  # index first: the last frames cut away
    cut(dog / "mpeg4.avi", cat / "truncated.avi")  # avi decodes silently short
    ffmpeg(*lavfi, "sine=duration=1", "-c:a", "aac", str(dog / "audio_only.mp4"))
    bad = {"cat/random.mp4": "cannot open", "cat/empty.mp4": "empty", "dog/truncated.mp4": "cannot open",
           "dog/truncated_fast.mp4": "truncated",
           "cat/truncated.avi": "truncated", "dog/audio_only.mp4": "no video stream"}
    return root, good, bad


@pytest.fixture(scope="module")
def sharded(videos, tmp_path_factory):
    root, _, _ = videos
    out = tmp_path_factory.mktemp("shards")
    manifest = write_shards(root, out, short_side=SHORT, max_duration=MAX_S, samples_per_shard=3, workers=2)
    return out, manifest


def read_samples_of(tars):
    urls = [str(t) for t in tars] if isinstance(tars, list) else str(tars)
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def read_samples(out):
    return read_samples_of(sorted(Path(out).glob("*.tar")))


def expected_frames(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = s.frames or sum(1 for _ in c.decode(s))  # mkv/webm headers carry no frame count
        return min(n, int(MAX_S * s.average_rate + 1e-6)), s.width, s.height


def test_shards_hold_every_good_video_once(videos, sharded):
    root, good, bad = videos
    out, manifest = sharded
    samples = read_samples(out)
    assert manifest["inputs"] == 16 and manifest["count"] == len(samples) == len(good) and manifest["failures"] == len(bad)
    assert [s["samples"] for s in manifest["shards"]] == [
        int(sum(1 for _ in wds.WebDataset(str(out / s["name"]), shardshuffle=False))) for s in manifest["shards"]]
    assert manifest["bytes"] == sum((out / s["name"]).stat().st_size for s in manifest["shards"])
    assert len(manifest["shards"]) == 6 and manifest["classes"] == {"cat": 0, "dog": 1}
    assert (manifest["copied"], manifest["transcoded"]) == (2, 8)
    metas = [json.loads(s["json"]) for s in samples]
    names = [os.path.relpath(m["original_path"], root) for m in metas]
    assert sorted(names) == sorted(good)  # each good video exactly once, no bad one
    assert manifest["label_counts"] == {"0": sum(n.startswith("cat") for n in good), "1": sum(n.startswith("dog") for n in good)}

    for s, meta, name in zip(samples, metas, names):
        assert meta["label_name"] == name.split("/")[0] and meta["label"] == manifest["classes"][meta["label_name"]]
        assert meta["source"] == root.name and meta["transcoded"] is not good[name]
        vr = decord.VideoReader(io.BytesIO(s["mp4"]), num_threads=1)
        frames, w, h = expected_frames(root / name)
        if good[name]:  # copied byte for byte
            assert s["mp4"] == (root / name).read_bytes()
        else:
            w, h = target_size(w, h, SHORT)
        assert (len(vr), meta["num_frames"]) == (frames, frames), name
        assert vr[0].shape == (h, w, 3) and (meta["width"], meta["height"]) == (w, h), name
        assert min(w, h) <= SHORT and len(vr) / meta["fps"] <= MAX_S + 1e-6, name
        assert abs(meta["duration"] - len(vr) / meta["fps"]) < 0.1, name
        vr.get_batch(list(range(len(vr))))  # every frame decodes


def test_corrupt_inputs_are_listed_with_reasons(videos, sharded):
    root, good, bad = videos
    out, _ = sharded
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    reasons = {os.path.relpath(f["path"], root): f["reason"] for f in failures}
    assert set(reasons) == set(bad)
    for name, part in bad.items():
        assert reasons[name] and part in reasons[name], (name, reasons[name])


def test_rerun_rewrites_only_missing_shards(videos, sharded, tmp_path):
    root, _, _ = videos
    out = tmp_path / "out"
    shutil.copytree(sharded[0], out)  # copy2 keeps mtimes
    tars = sorted(out.glob("*.tar"))
    before = {p.name: p.stat().st_mtime_ns for p in tars}
    tars[1].unlink()  # shard lost
    tars[2].unlink()  # shard interrupted mid-write: only its .tmp is left
    (out / (tars[2].name + ".tmp")).write_bytes(b"half a tar")
    manifest = write_shards(root, out, short_side=SHORT, max_duration=MAX_S, samples_per_shard=3, workers=2)
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("*.tar"))}
    assert set(after) == set(before) and not list(out.glob("*.tmp"))
    assert [n for n in after if after[n] != before[n]] == [tars[1].name, tars[2].name]
    for t in tars[1:3]:  # the same samples as before (transcoded bytes may differ: see shards.py)
        old, new = read_samples_of(sharded[0] / t.name), read_samples_of(t)
        def meta(s):
            return s["__key__"], {k: v for k, v in json.loads(s["json"]).items() if k != "bytes"}
        assert [meta(s) for s in new] == [meta(s) for s in old]
    same = ("inputs", "count", "copied", "transcoded", "failures", "classes", "label_counts")
    assert {k: manifest[k] for k in same} == {k: sharded[1][k] for k in same}
    assert [s["samples"] for s in manifest["shards"]] == [s["samples"] for s in sharded[1]["shards"]]
    assert len(read_samples(out)) == manifest["count"]

    # Other options make other shards: everything is rewritten, none is mistaken for done.
    manifest = write_shards(root, out, short_side=48, max_duration=MAX_S, samples_per_shard=3, workers=2)
    assert all(p.stat().st_mtime_ns != after[p.name] for p in out.glob("*.tar"))
    assert manifest["copied"] == 1  # only ff_fast (64x48) still fits a 48 px short side


def run_cli(*argv):
    return main(["shard", *argv])  # user errors become exit 2 in one place: scaling.cli.main


def test_csv_labels_and_class_map(videos, tmp_path, capsys):
    root, _, _ = videos
    lst = root / "list.csv"  # relative paths resolve against the list's folder
    lst.write_text("path,label\ncat/small_h264.mp4,walking\ndog/vp8.mkv,running\ncat/missing.mp4,walking\n"
                   "dog/mpeg4.avi,\n")
    assert run_cli("--input", str(lst), "--out", str(tmp_path / "a"), "--short-side", "64", "--workers", "1") == 0
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["classes"] == {"running": 0, "walking": 1} and m["source"] == m["prefix"] == "list"
    assert (m["count"], m["failures"]) == (3, 1) and m["shards"][0]["name"] == "list-000000.tar"
    metas = {Path(json.loads(s["json"])["original_path"]).name: json.loads(s["json"]) for s in read_samples(tmp_path / "a")}
    assert [(metas[n]["label"], metas[n]["label_name"]) for n in ("small_h264.mp4", "vp8.mkv", "mpeg4.avi")] == [
        (1, "walking"), (0, "running"), (None, None)]
    failure = json.loads((tmp_path / "a" / "failures.jsonl").read_text())
    assert failure["path"].endswith("missing.mp4") and failure["reason"] == "file not found"
    assert "skipped 1 unreadable" in capsys.readouterr().out

    # A given class map (e.g. the train split's manifest) fixes the indices.
    (tmp_path / "classes.txt").write_text("walking\nrunning\n")
    assert run_cli("--input", str(lst), "--out", str(tmp_path / "b"), "--classes", str(tmp_path / "classes.txt"),
                   "--short-side", "64", "--workers", "1") == 0
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["classes"] == {"walking": 0, "running": 1}

    # TSV, no header, integer labels: used as given.
    tsv = tmp_path / "ints.tsv"
    tsv.write_text(f"{root / 'cat/ff_fast.mp4'}\t7\n{root / 'dog/ff_hevc.mkv'}\t3\n")
    assert run_cli("--input", str(tsv), "--out", str(tmp_path / "c"), "--source", "k", "--workers", "1") == 0
    metas = [json.loads(s["json"]) for s in read_samples(tmp_path / "c")]
    assert [(m["label"], m["source"]) for m in metas] == [(7, "k"), (3, "k")]
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["classes"] is None


def test_user_errors_are_one_line(tmp_path, capsys):
    assert run_cli("--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "l.csv").write_text("a.mp4,cat\n")
    (tmp_path / "c.txt").write_text("dog\n")
    assert run_cli("--input", str(tmp_path / "l.csv"), "--out", str(tmp_path / "o"), "--classes", str(tmp_path / "c.txt")) == 2
    assert "not in the class map" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("--input", "x", "--out", "y", "--max-shard-bytes", "lots")


def test_plan_shards_by_count_and_input_bytes():
    items = [Item(i, f"v{i}") for i in range(7)]
    assert [len(s) for s in plan_shards(items, 3)] == [3, 3, 1]
    sizes = {"v0": 40, "v1": 40, "v2": 40, "v3": 200, "v4": 10, "v5": 10, "v6": 10}
    plan = plan_shards(items, 3, max_shard_bytes=100, size_of=sizes.__getitem__)
    assert [[i.index for i in s] for s in plan] == [[0, 1], [2], [3], [4, 5, 6]]  # an oversized video gets its own shard


def test_target_size_never_upscales_and_keeps_even():
    assert target_size(1280, 720, 320) == (568, 320)
    assert target_size(720, 1280, 320) == (320, 568)
    assert target_size(100, 60, 320) == (100, 60)
    assert target_size(101, 61, 0) == (100, 60)  # odd input: down to even for yuv420p
