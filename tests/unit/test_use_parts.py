"""Pieces of `scaling eval|predict|features|visualize` that need no ranks: the weights loader,
the single-video test views, feature windows, and the reconstruction figure."""
from __future__ import annotations

import argparse
import json
import subprocess

import pytest
import torch

from scaling.cli import main
from scaling.data.finite import build_finetune_loader
from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
from scaling.masking import make_masks
from scaling.models.classify import build_classifier
from scaling.models.pretrain import build_pretrain_model
from scaling.use.features import window_indices, window_starts
from scaling.use.views import multi_views
from scaling.use.visualize import VisualizeOptions, centre_clip, visualize
from scaling.use.weights import WeightsError, classifier_from, load_weights


def test_a_public_checkpoint_without_config_gets_its_size_from_the_weights_and_its_clip_from_args(tmp_path):
    model = build_classifier("debug", 7, 8, 64)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # a DDP/DeepSpeed wrapper prefix
    torch.save({"model": state, "args": argparse.Namespace(num_frames=8, input_size=64)}, tmp_path / "ckpt.pth")
    w = load_weights(tmp_path / "ckpt.pth")
    assert (w.kind, w.size_name, w.num_frames, w.input_size, w.num_classes, w.config) == ("classifier", "debug", 8, 64, 7, {})
    loaded = classifier_from(w)
    video = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), model.eval()(video))


def test_weights_that_cannot_serve_the_use_are_refused_in_one_sentence(tmp_path, capsys):
    torch.save({"model": build_pretrain_model("debug", 4, 64).state_dict()}, tmp_path / "pre.pt")
    with pytest.raises(WeightsError, match="without a classifier head"):
        classifier_from(load_weights(tmp_path / "pre.pt"))
    odd = build_classifier("debug", 3, 4, 64).state_dict()
    odd["patch_embed.proj.weight"] = torch.zeros(48, 3, 2, 16, 16)  # a width no registered size has
    torch.save({"model": odd}, tmp_path / "odd.pt")
    assert main(["predict", "x.mp4", "--weights", str(tmp_path / "odd.pt")]) == 2
    assert "no registered size has width 48" in capsys.readouterr().err
    assert main(["eval", "--weights", str(tmp_path / "missing.pt"), "--shards", "x.tar"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_single_video_views_are_the_eval_loaders_views(synth_shards):
    """predict and features cut a file exactly as `scaling eval` cuts the same video in a shard."""
    import tarfile

    from scaling.data.video import open_video

    shard = synth_shards(4, 4) / "synth-000000.tar"
    loader = build_finetune_loader(str(shard), videos_per_batch=1, num_frames=8, stride=3, input_size=48, train=False,
                                   test_clips=2, test_crops=3)
    first = next(iter(loader))["video"]  # (1 x 6 views, 3, 8, 48, 48)
    with tarfile.open(shard) as tar:
        data = tar.extractfile(next(m for m in tar if m.name.endswith(".mp4"))).read()
    torch.testing.assert_close(multi_views(open_video(data), 8, 3, 48, clips=2, crops=3), first, rtol=0, atol=0)


def test_windows_cover_the_video_and_loop_when_it_is_short():
    assert window_starts(40, 16, 16) == [0, 16]
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert window_starts(10, 16, 16) == [0]  # shorter than a window: one window that loops
    assert window_indices(8, 40, 32, 16) == list(range(8, 40, 2))  # a 32-frame window, 16 frames: every 2nd
    assert window_indices(0, 10, 16, 16) == [i % 10 for i in range(16)]


@pytest.mark.parametrize("mask,decoder", [("tube", "running_cell"), ("random", "none")])
def test_visualize_error_equals_the_pretraining_loss_on_the_same_clip_and_masks(synth_shards, tmp_path, mask, decoder):
    import tarfile

    torch.manual_seed(0)
    model = build_pretrain_model("debug", 8, 64).eval()
    config = {"model": {"name": "debug", "num_frames": 8, "input_size": 64}, "data": {"stride": 2}}
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "pre.pt")
    with tarfile.open(synth_shards(4, 4) / "synth-000000.tar") as tar:
        video_file = tmp_path / "v.mp4"
        video_file.write_bytes(tar.extractfile(next(m for m in tar if m.name.endswith(".mp4"))).read())
    summary = visualize(VisualizeOptions(weights=str(tmp_path / "pre.pt"), video=str(video_file), mask=mask,
                                         decoder=decoder, seed=3, out=str(tmp_path / "rec.png")))
    # The pre-training loss, computed as the training loop does, on the same clip and masks.
    from scaling.use.views import read_video

    clip = centre_clip(read_video(video_file), 8, 2, 64)
    enc, dec = make_masks(1, model.grid, mask, 0.9, decoder, 0.5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = masked_reconstruction_loss(model(clip, enc, dec), normalized_pixel_target(clip, 16, 2), enc, dec)
    assert summary["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert summary["reconstruction_error"] == pytest.approx(float(loss), rel=1e-4)
    assert (tmp_path / "rec.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "rec.json").read_text())["mask"] == mask


def test_features_of_a_pretraining_export_are_its_encoder_tokens_over_each_window(synth_shards, tmp_path):
    import tarfile

    import numpy as np

    from scaling.data.video import open_video, read_clips
    from scaling.use.features import FeatureOptions, extract
    from scaling.use.views import centre_view

    torch.manual_seed(0)
    model = build_pretrain_model("debug", 8, 64).eval()
    torch.save({"model": model.state_dict(), "config": {"model": {"name": "debug", "num_frames": 8, "input_size": 64}}},
               tmp_path / "pre.pt")
    shard = synth_shards(4, 4) / "synth-000000.tar"
    stats = extract(FeatureOptions(weights=str(tmp_path / "pre.pt"), inputs=[str(shard)], out=str(tmp_path / "f"),
                                   window=16, stride=12, pool="none", batch=2, tracking=False))
    assert (stats["videos"], stats["windows"]) == (4, 4 * 3)  # 40 frames: windows at 0, 12, 24
    with tarfile.open(shard) as tar:
        data = tar.extractfile(next(m for m in tar if m.name.endswith(".mp4"))).read()
    (frames,) = read_clips(open_video(data), [list(range(12, 28, 2))])  # window 2 of 16 frames, 8 taken
    with torch.no_grad():
        tokens = model.encoder(centre_view(frames, 64)[None], torch.arange(4 * 4 * 4)[None])  # (1, N, D)
    saved = np.load(tmp_path / "f" / "00000000.npy")  # (windows, N, D)
    assert saved.shape == (3, 64, 64)
    np.testing.assert_allclose(saved[1], tokens[0].numpy(), atol=1e-5, rtol=0)


def test_a_bridging_classifier_with_mar_loads_with_its_head(tmp_path):
    model = build_classifier("debug", 5, 8, 64, head="bridging").eval()
    config = {"model": {"name": "debug", "num_frames": 8, "input_size": 64, "head": "bridging"},
              "mask": {"finetune": "running_cell", "finetune_ratio": 0.5}}
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "mar.pt")
    w = load_weights(tmp_path / "mar.pt")
    assert (w.head, w.setting("mask", "finetune", "none")) == ("bridging", "running_cell")
    video = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(classifier_from(w)(video), model(video))


@pytest.mark.parametrize("suffix,codec", [(".webm", "libvpx"), (".avi", "mpeg4")])
def test_predict_reads_webm_and_avi_files(tmp_path, suffix, codec, capsys):
    # The ffmpeg CLI writes the file: PyAV's libvpx encoder failed to open (EINVAL) in a process
    # where other tests had encoded video before, while the CLI is a fresh process every time.
    path = tmp_path / f"clip{suffix}"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1.2",
                    "-c:v", codec, "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60)
    torch.save({"model": build_classifier("debug", 3, 8, 32).state_dict(),
                "config": {"model": {"name": "debug", "num_frames": 8, "input_size": 32}}}, tmp_path / "c.pt")
    assert main(["predict", str(path), "--weights", str(tmp_path / "c.pt"), "--json", "--clips", "2", "--crops", "1"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert len(result["top5"]) == 3 and sum(p["probability"] for p in result["top5"]) == pytest.approx(1, abs=1e-4)


def test_a_safetensors_export_loads_with_the_run_config_beside_it(tmp_path):
    from scaling.models.export_hf import write_safetensors

    model = build_classifier("debug", 4, 8, 64).eval()
    config = {"model": {"name": "debug", "num_frames": 8, "input_size": 64}, "data": {"stride": 2}}
    write_safetensors({"model": model.state_dict(), "config": config}, tmp_path / "model.safetensors")
    w = load_weights(tmp_path / "model.safetensors")
    assert (w.num_frames, w.setting("data", "stride", 4), w.source) == (8, 2, f"safetensors export {tmp_path / 'model.safetensors'}")
    video = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(classifier_from(w)(video), model(video))
