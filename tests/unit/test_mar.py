"""MAR fine-tuning: running-cell drop masks, the bridging classifier, the reconstruction branch
(VideoMAE V2 and MAR, as their public code builds them), their config keys, and the pipeline recipe that uses them."""
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO

from scaling.config import ConfigError, RunConfig, from_dict, load_config, validate
from scaling.evaluate import video_probabilities
from scaling.losses import finetune_loss, masked_reconstruction_loss, normalized_pixel_target
from scaling.masking import finetune_drop_mask, mar_drop_mask
from scaling.models.classify import BRIDGING, BRIDGING_FOR_SIZE, build_classifier
from scaling.models.convert import load_pretrained
from scaling.models.pretrain import build_pretrain_model
from scaling.models.vit import count_params
from scaling.train.finetune import classifier_for, drop_mask_for_rank
from scaling.train.param_groups import layer_decay_groups

B_GRID = (8, 14, 14)  # ViT-B, 16x224
FRAMES, SIZE = 16, 64  # debug clips: grid (8, 4, 4), 128 tokens
DEBUG_GRID = (8, 4, 4)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def cells(mask, grid):
    """(B, N) -> (B, T', cells, 4): each 2x2 cell of each slot as 4 entries."""
    t, h, w = grid
    return mask.view(-1, t, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(mask.shape[0], t, -1, 4)


# ---------------------------------------------------------------- masks


def test_test_pattern_is_fixed_and_keeps_two_tokens_of_every_cell_per_slot():
    a = mar_drop_mask(3, B_GRID, 0.5, train=False)
    b = mar_drop_mask(5, B_GRID, 0.5, train=False, generator=gen(9))  # a generator changes nothing
    assert a.shape == (3, 1568)
    assert (a == a[:1]).all() and torch.equal(a[0], b[0]), "one pattern for every video and call"
    kept = ~cells(a, B_GRID)  # (B, 8, 49, 4)
    assert (kept.sum(-1) == 2).all(), "every 2x2 cell keeps exactly two tokens in every slot"
    assert (~a).sum(1).eq(784).all()
    # The cell shifts by one position per slot, so 4 consecutive slots keep every position twice.
    assert (kept[:, :4].sum(1) == 2).all()
    for t in range(1, 8):
        assert torch.equal(kept[0, t, 0], kept[0, t - 1, 0].roll(-1))


def test_training_patterns_vary_across_videos_and_are_shuffled_cell_shifts():
    m = mar_drop_mask(64, B_GRID, 0.5, train=True, generator=gen(0))
    assert (m.sum(1) == 784).all(), "the same count per video keeps gathers rectangular"
    kept = ~cells(m, B_GRID)
    assert (kept.sum(-1) == 2).all() and (kept == kept[:, :, :1]).all(), "tiled: every cell of a slot alike"
    shifts = [tuple(c.tolist()) for c in cells(~mar_drop_mask(1, (4, 2, 2), 0.5, train=False), (4, 2, 2))[0, :, 0]]
    assert len(set(shifts)) == 4
    patterns = {tuple(row.tolist()) for row in m}
    assert len(patterns) > 32, "random start offset and slot order per video"
    slots = [tuple(tuple(kept[b, t, 0].tolist()) for t in range(8)) for b in range(64)]
    assert any(s[1] != s[0] and list(s[1]) != list(torch.tensor(s[0]).roll(-1).tolist()) for s in slots), \
        "the temporal order is shuffled, not just offset"
    for s in slots:  # each slot map is one of the four shifts, each used twice over 8 slots
        assert sorted(s) == sorted(shifts * 2)
    again = mar_drop_mask(64, B_GRID, 0.5, train=True, generator=gen(0))
    assert torch.equal(m, again), "deterministic under a seed"


def test_other_ratios_and_none():
    m = mar_drop_mask(2, B_GRID, 0.75, train=False)
    assert ((~cells(m, B_GRID)).sum(-1) == 1).all()
    assert finetune_drop_mask("none", 2, B_GRID, 0.5, train=True) is None
    with pytest.raises(ValueError, match="unknown fine-tune mask 'tube'"):
        finetune_drop_mask("tube", 2, B_GRID, 0.5, train=True)


def test_rank_slices_are_the_global_masks():
    cfg = load_config(None, ["stage=finetune", "mask.finetune=running_cell", "train.seed=3"])
    whole = drop_mask_for_rank(cfg, DEBUG_GRID, step=5, micro=1, rank=0, rows=4, world=1)
    halves = [drop_mask_for_rank(cfg, DEBUG_GRID, step=5, micro=1, rank=r, rows=2, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole), "a clip's mask does not depend on the number of ranks"
    assert not torch.equal(whole, drop_mask_for_rank(cfg, DEBUG_GRID, step=6, micro=1, rank=0, rows=4, world=1))
    assert drop_mask_for_rank(load_config(None, ["stage=finetune"]), DEBUG_GRID, 0, 0, 0, 4, 1) is None


# ---------------------------------------------------------------- model


def classifier(num_classes=4, seed=0, **kw):
    torch.manual_seed(seed)
    return build_classifier("debug", num_classes, FRAMES, SIZE, **kw)


def video(batch=2, seed=0):
    return torch.randn(batch, 3, FRAMES, SIZE, SIZE, generator=gen(seed))


@pytest.mark.parametrize("name,classes", [("vit_b", 400), ("vit_g", 710)])
def test_bridging_head_parameter_count_matches_its_definition(name, classes):
    with torch.device("meta"):
        linear = build_classifier(name, classes)
        bridging = build_classifier(name, classes, head="bridging")
    d, w = linear.size.width, 512
    block = (2 * w  # norm1
             + w * 3 * w + 2 * w  # qkv without bias, q_bias and v_bias
             + w * w + w  # attention output projection
             + 2 * w  # norm2
             + w * 4 * w + 4 * w + 4 * w * w + w)  # MLP 512 -> 2048 -> 512
    head = d * w + 2 * block + 2 * w + w * classes + classes  # Linear (no bias), 2 blocks, LayerNorm, Linear
    encoder = count_params(linear) - (2 * d + d * classes + classes)  # without fc_norm and head
    assert (BRIDGING.width, BRIDGING.depth, BRIDGING.heads, BRIDGING.drop) == (512, 2, 4, 0.1)
    assert count_params(bridging) - encoder == head
    if name == "vit_b":
        assert head == 6_903_184


def test_masked_forward_shapes_and_the_encoder_sees_only_kept_tokens():
    model = classifier(head="bridging", reconstruction=True).train()
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    model.bridge.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    mask = mar_drop_mask(2, model.grid, 0.5, train=True, generator=gen())
    logits, pred = model(video(), mask, reconstruct=True)
    assert logits.shape == (2, 4)
    assert pred.shape == (2, 64, 2 * 16 * 16 * 3), "the decoder predicts the 64 dropped tokens"
    assert seen == [(2, 64, 64), (2, 64, 64)], "encoder and bridging blocks get the 64 kept tokens"
    assert model(video(), mask).shape == (2, 4)
    assert model.head_drop.p == 0.1 and model.fc_norm.normalized_shape == (BRIDGING_FOR_SIZE["debug"].width,)
    unmasked = classifier(head="linear")
    assert unmasked(video()).shape == (2, 4) and unmasked(video(), mask).shape == (2, 4)
    with pytest.raises(ValueError, match="reconstruct=True needs"):
        unmasked(video(), mask, reconstruct=True)


def test_evaluation_applies_the_fixed_mask():
    model = classifier(head="bridging").eval()
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    batch = {"video": video(3), "index": torch.tensor([0, 0, 1]), "label": torch.tensor([1, 1, 2]),
             "valid": torch.tensor([True, True, True])}
    probs = video_probabilities(model, [batch], torch.float32, "running_cell", 0.5)
    assert seen == [64] and sorted(probs) == [0, 1]
    fixed = mar_drop_mask(3, model.grid, 0.5, train=False)
    with torch.no_grad():
        expected = model(batch["video"], fixed).softmax(-1)
    torch.testing.assert_close(probs[1][0], expected[2])
    video_probabilities(model, [batch], torch.float32)  # mask none: every token
    assert seen[-1] == 128


def test_bridging_and_reconstruction_train_at_the_heads_lr():
    model = classifier(head="bridging", reconstruction=True)
    top = model.size.depth + 1
    for name in ("bridge.proj.weight", "bridge.blocks.1.mlp.fc2.weight", "reconstruction.decoder.blocks.0.attn.qkv.weight",
                 "reconstruction.mask_token", "head.weight", "fc_norm.bias"):
        assert model.layer_id(name) == top, name
    groups = layer_decay_groups(model, 0.05, 0.75, base_lr=1e-3)
    by_param = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert by_param[id(params["bridge.proj.weight"])]["lr"] == pytest.approx(1e-3)
    assert by_param[id(params["reconstruction.mask_token"])]["weight_decay"] == 0.0
    assert by_param[id(params["bridge.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05


# ---------------------------------------------------------------- reconstruction branch


def test_reconstruction_branch_is_the_pretraining_decoder_on_the_dropped_tokens():
    """Loaded from a pre-training checkpoint, the branch predicts exactly what the pre-training
    model predicts with encoder mask = decoder mask = the fine-tune drop mask."""
    torch.manual_seed(0)
    pre = build_pretrain_model("debug", FRAMES, SIZE).eval()
    with torch.no_grad():  # non-trivial norms, so a wrongly mapped norm shows
        for _n, p in pre.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model = classifier(head="bridging", reconstruction=True, seed=1).eval()
    fresh = load_pretrained(model, {"model": {"_orig_mod." + k: v for k, v in pre.state_dict().items()}})
    assert not any(k.startswith("reconstruction.") for k in fresh)
    assert all(k.startswith(("bridge.", "fc_norm.", "head.")) for k in fresh)
    mask = mar_drop_mask(2, model.grid, 0.5, train=True, generator=gen(4))
    x = video()
    with torch.no_grad():
        _, pred = model(x, mask, reconstruct=True)
        torch.testing.assert_close(pred, pre(x, mask, mask), rtol=1e-5, atol=1e-5)


def test_finetune_loss_adds_the_weighted_reconstruction():
    model = classifier(head="bridging", reconstruction=True).train()
    x, target = video(), torch.tensor([1, 3])
    mask = mar_drop_mask(2, model.grid, 0.5, train=True, generator=gen())
    criterion = torch.nn.CrossEntropyLoss()
    torch.manual_seed(7)
    loss, parts = finetune_loss(model, x, target, criterion, mask, reconstruction_weight=0.1)
    torch.manual_seed(7)  # the same dropout draws
    logits, pred = model(x, mask, reconstruct=True)
    rec = masked_reconstruction_loss(pred, normalized_pixel_target(x, 16, 2), mask, mask)
    torch.testing.assert_close(parts["loss_rec"], rec.detach())
    torch.testing.assert_close(loss, criterion(logits, target) + 0.1 * rec)
    loss.backward()
    assert model.reconstruction.decoder.head.weight.grad is not None
    plain, parts = finetune_loss(model.eval(), x, target, criterion, mask)
    assert set(parts) == {"loss_cls"} and plain.shape == ()


def test_reconstruction_is_dropped_at_inference():
    trained = classifier(head="bridging", reconstruction=True, seed=2).eval()
    calls = []
    trained.reconstruction.register_forward_hook(lambda *a: calls.append(1))
    mask = mar_drop_mask(2, trained.grid, 0.5, train=False)
    x = video()
    with torch.no_grad():
        expected = trained(x, mask)
    assert calls == [], "classification never runs the decoder"
    # An exported state (it carries reconstruction.*) loads into a decoder-free inference model.
    inference = classifier(head="bridging", seed=3).eval()
    assert load_pretrained(inference, {"model": trained.state_dict()}) == []
    assert not any("reconstruction" in k or "decoder" in k for k in inference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(inference(x, mask), expected, rtol=0, atol=0)


def test_head_type_changes_start_the_head_fresh():
    linear = classifier(seed=4)
    bridging = classifier(head="bridging", seed=5)
    assert sorted(load_pretrained(bridging, {"model": linear.state_dict()})) == sorted(
        k for k in bridging.state_dict() if k.startswith(("bridge.", "fc_norm.", "head.")))
    assert sorted(load_pretrained(classifier(), {"model": bridging.state_dict()})) == [
        "fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert load_pretrained(classifier(head="bridging", seed=6), {"model": bridging.state_dict()}) == []


# ---------------------------------------------------------------- config and recipe


def finetune_cfg(*overrides, shards: Path):
    """Fine-tunes read labelled shards (noise has no labels); validation only checks they exist."""
    return load_config(None, ["stage=finetune", f"data.shards={shards}", "model.name=debug", "model.input_size=64",
                              "finetune.num_classes=4", *overrides])


@pytest.mark.parametrize("override, fragment", [
    ("model.head=mlp", "model.head 'mlp' is unknown; choose one of linear, bridging"),
    ("mask.finetune=tube", "mask.finetune 'tube' is unknown; choose one of none, running_cell"),
    ("mask.finetune_ratio=0.3", "mask.finetune_ratio 0.3 gives no running-cell pattern; use 0.25, 0.5 or 0.75"),
    ("finetune.reconstruction_weight=0.1", "mask.finetune is none; set mask.finetune=running_cell or finetune.reconstruction_weight=0"),
    ("finetune.reconstruction_weight=-1", "finetune.reconstruction_weight must be 0 (no decoder) or positive"),
    ("finetune.head_drop=1.5", "finetune.head_drop must be in [0, 1)"),
])
def test_bad_mar_values_are_refused_in_one_sentence(monkeypatch, request, tmp_path, override, fragment):
    monkeypatch.chdir(request.config.rootpath)  # the default ds_config path
    shards = tmp_path / "shard-000000.tar"
    shards.write_bytes(b"")
    cfg = finetune_cfg("mask.finetune=running_cell", override, shards=shards) if "ratio" in override \
        else finetune_cfg(override, shards=shards)
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="even number of patches"):
        validate(finetune_cfg("mask.finetune=running_cell", "model.input_size=48", shards=shards), 1)
    validate(finetune_cfg("model.head=bridging", "mask.finetune=running_cell", "finetune.reconstruction_weight=0.01",
                          shards=shards), 1)


def test_smoke_mar_recipe_builds_the_mar_finetune_model():
    from scaling.pipeline import merge

    raw = yaml.safe_load((REPO / "pipelines" / "smoke_mar.yaml").read_text())
    stages = {name: from_dict(RunConfig, merge(raw["defaults"], body)) for name, body in raw["stages"].items()}
    mar = stages["finetune"]
    assert (mar.model.head, mar.mask.finetune, mar.mask.finetune_ratio) == ("bridging", "running_cell", 0.5)
    assert mar.finetune.reconstruction_weight > 0
    assert stages["postpretrain"].model.head == "linear" and stages["postpretrain"].mask.finetune == "none"
    model = classifier_for(mar)
    assert model.bridge is not None and model.reconstruction is not None and model.head_drop.p == 0.1


def test_activation_checkpointing_covers_the_bridging_blocks():
    from scaling.memory.counting import saved_tensor_bytes

    model = build_classifier("debug", 4, 16, 64, head="bridging").train()
    video = torch.randn(2, 3, 16, 64, 64)
    model.set_grad_checkpointing(True)
    assert model.bridge.grad_checkpointing
    everything = saved_tensor_bytes(lambda: model(video))
    model.bridge.grad_checkpointing = False  # encoder checkpointed, bridge not
    assert saved_tensor_bytes(lambda: model(video)) > everything
