"""Exports that the ecosystem loads: transformers' VideoMAE reads our weights and computes what
our models compute (random weights: the mapping, not training, is under test)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from scaling.models.classify import build_classifier
from scaling.models.export_hf import ExportFormatError, write_hf_folder, write_safetensors
from scaling.models.pretrain import build_pretrain_model
from scaling.models.vit import VIT_SIZES, ViTSize

transformers = pytest.importorskip("transformers")


def export_of(model, name: str, frames: int = 16, size: int = 224) -> dict:
    """What `scaling export` writes: weights plus the run config."""
    return {"model": model.state_dict(), "tag": "step00000001",
            "config": {"model": {"name": name, "num_frames": frames, "input_size": size}}}


def load_hf(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    # Every weight of theirs comes from ours and every weight of ours is used.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def classifier_matches(name: str, frames: int, size: int, tmp_path) -> None:
    torch.manual_seed(0)
    ours = build_classifier(name, 7, frames, size).eval()
    with torch.no_grad():
        ours.head.weight.normal_(0, 0.02)  # the 0.001-scaled init would make every logit ~0
    folder = write_hf_folder(export_of(ours, name, frames, size), tmp_path / "hf", [f"c{i}" for i in range(7)])
    theirs = load_hf(transformers.VideoMAEForVideoClassification, folder)
    video = torch.randn(2, 3, frames, size, size)
    with torch.no_grad():
        logits, pooled = ours(video), ours.forward_features(video)
        out = theirs(video.transpose(1, 2), output_hidden_states=True)  # transformers: (B, T, C, H, W)
    assert torch.allclose(out.logits, logits, atol=1e-4), (out.logits - logits).abs().max()
    assert torch.allclose(out.hidden_states[-1].mean(1), pooled, atol=1e-4)
    assert theirs.config.id2label[3] == "c3"


def test_vit_b_classifier_loads_in_transformers_with_the_same_features_and_logits(tmp_path):
    classifier_matches("vit_b", 16, 224, tmp_path)


def test_vit_g_shape_patch14_mlp6144_round_trips(tmp_path, monkeypatch):
    # ViT-g's width, heads, patch 14 and MLP 6144 at reduced depth (2 of 40 blocks) and 8 frames.
    g = VIT_SIZES["vit_g"]
    monkeypatch.setitem(VIT_SIZES, "vit_g_depth2", ViTSize(g.width, 2, g.heads, g.mlp_hidden, g.patch,
                                                           g.decoder_width, g.decoder_heads))
    classifier_matches("vit_g_depth2", 8, 112, tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["patch_size"], config["intermediate_size"], config["hidden_size"]) == (14, 6144, 1408)


def test_pretrained_encoder_becomes_videomae_model(tmp_path):
    torch.manual_seed(0)
    ours = build_pretrain_model("debug", 4, 64).eval()
    folder = write_hf_folder(export_of(ours, "debug", 4, 64), tmp_path / "hf")
    theirs = load_hf(transformers.VideoMAEModel, folder)
    video = torch.randn(2, 3, 4, 64, 64)
    every_token = torch.arange(2 * 4 * 4).expand(2, -1)
    with torch.no_grad():
        tokens = ours.encoder(video, every_token)  # (B, N, D) after the encoder's final norm
        hidden = theirs(video.transpose(1, 2)).last_hidden_state
    assert torch.allclose(hidden, tokens, atol=1e-5)


def test_bridging_head_is_refused_with_the_reason(tmp_path):
    model = build_classifier("debug", 4, 4, 64, head="bridging")
    with pytest.raises(ExportFormatError, match="bridging head"):
        write_hf_folder(export_of(model, "debug", 4, 64), tmp_path / "hf")


def test_safetensors_export_keeps_our_keys_and_config(tmp_path):
    model = build_classifier("debug", 4, 4, 64)
    path = write_safetensors(export_of(model, "debug", 4, 64), tmp_path / "model.safetensors")
    loaded = load_file(str(path))
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert json.loads(path.with_suffix(".json").read_text())["config"]["model"]["name"] == "debug"


def test_cli_converts_a_pt_export_to_safetensors_and_a_transformers_folder(tmp_path, capsys):
    from scaling.cli import main

    model = build_classifier("debug", 3, 4, 64)
    torch.save(export_of(model, "debug", 4, 64), tmp_path / "model_fp32.pt")
    (tmp_path / "classes.txt").write_text("run\nwalk\njump\n")
    assert main(["export", str(tmp_path / "model_fp32.pt"), "--format", "hf", "--classes", str(tmp_path / "classes.txt")]) == 0
    theirs = load_hf(transformers.VideoMAEForVideoClassification, tmp_path / "hf")
    assert theirs.config.id2label == {0: "run", 1: "walk", 2: "jump"}
    assert main(["export", str(tmp_path / "model_fp32.pt"), "--format", "safetensors"]) == 0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model.json").is_file()
    # A .pt is already a .pt; and a class list that does not fit the head is refused in one sentence.
    assert main(["export", str(tmp_path / "model_fp32.pt")]) == 2
    assert main(["export", str(tmp_path / "model_fp32.pt"), "--format", "hf", "--classes", "k400"]) == 2
    assert "400 class names were given for a 3-way head" in capsys.readouterr().err
