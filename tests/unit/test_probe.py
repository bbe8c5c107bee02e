"""Probing a frozen encoder (stage: probe) and the motion task it is measured on, without ranks."""
import json
import tarfile

import numpy as np
import pytest
import torch

from scaling.config import ConfigError, build_run_config, validate
from scaling.data.synth import MOTION_DIRECTIONS, render_motion_video, write_synthetic_shards
from scaling.models.classify import build_classifier
from scaling.models.pretrain import build_pretrain_model
from scaling.models.probe_heads import PROBE_HEADS, build_probe
from scaling.train.engine import param_groups
from scaling.train.probe import load_frozen_encoder


def test_motion_clip_first_frame_is_the_same_for_every_label_and_shapes_move_the_labels_way():
    clips = [render_motion_video(np.random.default_rng([3, 7]), label, 12, 48, 64) for label in range(4)]
    for clip in clips[1:]:
        assert np.array_equal(clip[0], clips[0][0]), "a single frame must not tell the class"
        assert not np.array_equal(clip[-1], clips[0][-1])
    # Direction: a whole-frame shift along the class's direction matches the next frame best.
    for label, clip in enumerate(clips):
        a, b = clip[0].astype(float), clip[4].astype(float)
        errors = {d: np.abs(np.roll(a, (2 * d[0], 2 * d[1]), axis=(0, 1)) - b).mean() for d in MOTION_DIRECTIONS}
        assert min(errors, key=errors.get) == MOTION_DIRECTIONS[label]


def test_motion_shards_are_deterministic_and_labelled(tmp_path):
    first = write_synthetic_shards(tmp_path / "a", 6, videos_per_shard=3, num_frames=8, height=32, width=32, task="motion")
    again = write_synthetic_shards(tmp_path / "b", 6, videos_per_shard=3, num_frames=8, height=32, width=32, task="motion")
    assert [open(p, "rb").read() for p in first] == [open(p, "rb").read() for p in again]
    with tarfile.open(first[0]) as tar:
        meta = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert {m["source"] for m in meta} == {"synth-motion"} and all(0 <= m["label"] < 4 for m in meta)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        write_synthetic_shards(tmp_path / "c", 1, task="colour")


@pytest.mark.parametrize("head", PROBE_HEADS)
def test_probe_trains_only_its_head_and_keeps_the_encoder_in_eval_mode(head):
    torch.manual_seed(0)
    model = build_probe("debug", 4, num_frames=4, image_size=32, head=head).train()
    assert not model.blocks.training and not model.patch_embed.training and model.probe_head.training
    trunk = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("probe_head.")}
    head_before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2)
    video, label = torch.randn(6, 3, 4, 32, 32), torch.randint(0, 4, (6,))
    torch.nn.functional.cross_entropy(model(video), label).backward()
    optimizer.step()
    assert all(k.startswith("probe_head.") for k in head_before)
    assert all(p.grad is None for p in [*model.blocks.parameters(), *model.patch_embed.parameters()])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trunk.items()), "the encoder must not change"
    assert any(not torch.equal(v, dict(model.named_parameters())[k]) for k, v in head_before.items())
    with pytest.raises(ValueError, match="every token"):
        model(video, torch.zeros(6, model.grid[0] * model.grid[1] * model.grid[2], dtype=torch.bool))


def test_probe_takes_the_encoder_of_a_pretraining_or_finetune_export_and_a_fresh_head(tmp_path):
    torch.manual_seed(0)
    pretrain = build_pretrain_model("debug", 4, 32)
    torch.save({"model": pretrain.state_dict()}, tmp_path / "pretrain.pt")
    classifier = build_classifier("debug", 4, 4, 32)
    torch.save({"module": classifier.state_dict()}, tmp_path / "finetune.pt")
    for path, encoder in ((tmp_path / "pretrain.pt", pretrain.encoder), (tmp_path / "finetune.pt", classifier)):
        cfg = build_run_config({"stage": "probe", "finetune": {"init_from": str(path), "num_classes": 4}})
        probe = build_probe("debug", 4, 4, 32, head="attentive")
        fresh = load_frozen_encoder(probe, cfg)
        assert fresh and all(k.startswith("probe_head.") for k in fresh)
        for name, p in encoder.named_parameters():
            if name.startswith(("patch_embed.", "blocks.")):
                assert torch.equal(probe.state_dict()[name], p), name
    # A probe's export carries its head; the next probe and a fine-tune stage leave it out.
    torch.save({"module": probe.state_dict()}, tmp_path / "probe.pt")
    cfg = build_run_config({"stage": "finetune", "finetune": {"init_from": str(tmp_path / "probe.pt"), "num_classes": 4}})
    from scaling.train.finetune import load_classifier

    load_classifier(build_classifier("debug", 4, 4, 32), cfg)


def test_probe_stage_config_defaults_and_errors(tmp_path):
    cfg = build_run_config({"stage": "probe"})
    f = cfg.finetune
    assert cfg.probe.head == "linear" and cfg.optim.weight_decay == 0.0
    assert (f.mixup, f.cutmix, f.label_smoothing, f.rand_aug, f.reprob) == (0.0, 0.0, 0.0, "", 0.0)
    shards = write_synthetic_shards(tmp_path, 1, num_frames=4, height=32, width=32)[0]
    base = {"stage": "probe", "model": {"name": "debug", "num_frames": 4, "input_size": 32},
            "data": {"shards": shards}, "finetune": {"num_classes": 4}, "train": {"steps": 4, "global_batch": 2}}
    validate(build_run_config(base), 1)
    for change, message in (({"probe": {"head": "mlp"}}, "probe.head 'mlp' is unknown"),
                            ({"mask": {"finetune": "running_cell"}}, "set mask.finetune=none")):
        with pytest.raises(ConfigError, match=message):
            validate(build_run_config({**base, **change}), 1)
