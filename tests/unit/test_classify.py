"""Fine-tune classifier, layer-decay groups, and checkpoint hand-off/import (debug size, CPU)."""
import pytest
import torch

from scaling.data.kinetics import index_map
from scaling.models.classify import VideoClassifier, build_classifier
from scaling.models.convert import (
    CheckpointMismatchError,
    adapt_head,
    clean_state_dict,
    encoder_weights_for_classifier,
    interpolate_positions,
    load_checkpoint_file,
    load_into,
    load_pretrained,
    position_table_for,
)
from scaling.models.pretrain import build_pretrain_model
from scaling.models.vit import VIT_SIZES, count_params, sincos_position_table
from scaling.train.engine import param_groups
from scaling.train.param_groups import layer_decay_groups

# Millions of parameters with a 710-class head (the VideoMAE V2 paper and its public code).
PARAMS_M = {"vit_s": 22.15, "vit_b": 86.77, "vit_l": 304.6, "vit_h": 632.5, "vit_g": 1012.6}
FRAMES, SIZE = 16, 64  # debug clips: grid (8, 4, 4), 128 tokens


def video(batch=2, seed=0, frames=FRAMES, size=SIZE):
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def classifier(num_classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    return build_classifier("debug", num_classes, FRAMES, SIZE, **kw).eval()


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_param_counts_match_reference(name):
    with torch.device("meta"):  # ViT-g is never allocated
        model = build_classifier(name, 710)
    n = count_params(model)
    assert round(n / 1e6, 2 if n < 1e8 else 1) == PARAMS_M[name]


def test_key_layout_is_public_finetune_layout():
    keys = set(classifier().state_dict())
    for key in ["patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.q_bias", "blocks.1.attn.v_bias",
                "fc_norm.weight", "head.weight", "head.bias"]:
        assert key in keys, key
    assert not any(k.startswith("norm.") or "pos_embed" in k for k in keys)


def test_head_init_is_scaled():
    full = classifier(init_scale=1.0).head
    small = classifier(init_scale=0.001).head
    torch.testing.assert_close(small.weight, full.weight * 0.001)
    assert small.bias.abs().max() == 0
    assert 0.01 < full.weight.std() < 0.03  # trunc-normal(0.02) before scaling


def test_forward_shapes_and_grad_checkpointing():
    model = classifier(num_classes=7, drop_path=0.1).train()
    x = video()
    torch.manual_seed(1)
    out = model(x)
    assert out.shape == (2, 7)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)  # drop path draws from the global RNG; checkpointing replays it
    torch.testing.assert_close(model(x), out)
    assert model.layer_id("patch_embed.proj.weight") == 0
    assert model.layer_id("blocks.1.mlp.fc1.weight") == 2
    assert model.layer_id("head.weight") == model.layer_id("fc_norm.bias") == 3


# ---------------------------------------------------------------- layer decay


def test_layer_decay_scales_follow_the_formula():
    model, ld = classifier(), 0.75
    groups = layer_decay_groups(model, 0.05, ld, base_lr=1e-3)
    top = VIT_SIZES["debug"].depth + 1  # L + 1 = head's layer
    seen = set()
    for g in groups:
        layer = int(g["group_name"].split("_")[1])
        assert g["lr_scale"] == pytest.approx(ld ** (top - layer))
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            assert model.layer_id(name) == layer
            no_decay = p.ndim <= 1 or name.endswith(".bias")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05)
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}
    names = [g["group_name"] for g in groups]
    assert names[0] == "layer_0_decay" and names[-1] == f"layer_{top}_no_decay"
    assert groups[-1]["lr_scale"] == 1.0 and groups[0]["lr_scale"] == pytest.approx(ld ** top)


def test_layer_decay_one_reproduces_plain_groups():
    model = classifier()
    plain = param_groups(model, 0.05)
    groups = layer_decay_groups(model, 0.05, 1.0)
    assert len(groups) == 2
    for g, p in zip(groups, plain):
        assert g["weight_decay"] == p["weight_decay"] and g["lr_scale"] == 1.0
        assert [id(t) for t in g["params"]] == [id(t) for t in p["params"]]


def test_lambda_lr_keeps_the_layer_ratio():
    from scaling.train.schedule import warmup_cosine

    groups = layer_decay_groups(classifier(), 0.05, 0.5, base_lr=1e-3)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = warmup_cosine(opt, 1e-3, 1e-5, 0.0, 2, 10)
    for _ in range(5):
        opt.step()
        sched.step()
        ref = opt.param_groups[-1]["lr"]
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(ref * g["lr_scale"])


# ---------------------------------------------------------------- checkpoint import


def pretrain_model(seed=0):
    torch.manual_seed(seed)
    model = build_pretrain_model("debug", FRAMES, SIZE)
    with torch.no_grad():  # non-trivial norms and biases, so a wrongly mapped key shows
        for _n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def public_checkpoint(model, compiled=True, combined_qkv_bias=False):
    """A VideoMAE V2 pre-training checkpoint as the public code writes it."""
    sd = {}
    for k, v in model.state_dict().items():
        if combined_qkv_bias and k.endswith("q_bias"):
            base = k[: -len("q_bias")]
            k_bias = torch.randn_like(v)  # any key bias: it cancels in the softmax
            sd[base + "qkv.bias"] = torch.cat([v, k_bias, model.state_dict()[base + "v_bias"]])
            continue
        if combined_qkv_bias and k.endswith("v_bias"):
            continue
        sd[("_orig_mod." if compiled else "") + k] = v.clone()
    return {"model": sd, "epoch": 799}


def encoder_reference(pre, x):
    """Mean of the pre-training encoder's last-block tokens with every token visible."""
    enc = pre.encoder
    all_index = torch.arange(enc.pos_embed.shape[1]).expand(x.shape[0], -1)  # (B, N)
    norm, enc.norm = enc.norm, torch.nn.Identity()  # the classifier pools before its own norm
    try:
        return enc(x, all_index).mean(dim=1)  # (B, D)
    finally:
        enc.norm = norm


def test_pretraining_export_lands_in_classifier():
    pre = pretrain_model()
    model = classifier(num_classes=710)
    sd = encoder_weights_for_classifier(pre.state_dict(), model)
    assert not any(k.startswith(("decoder", "encoder_to_decoder", "mask_token", "norm.")) for k in sd)
    fresh = load_into(model, sd, allow_missing=("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"))
    assert sorted(fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    ours = model.state_dict()
    for k, v in pre.encoder.state_dict().items():
        if not k.startswith("norm."):
            torch.testing.assert_close(ours[k], v, rtol=0, atol=0)
    # fc_norm starts fresh (public behaviour), not from the encoder's norm
    assert torch.all(ours["fc_norm.weight"] == 1) and torch.all(ours["fc_norm.bias"] == 0)


@pytest.mark.parametrize("compiled,combined", [(True, False), (False, True)])
def test_public_pretraining_checkpoint_gives_identical_encoder_outputs(tmp_path, compiled, combined):
    pre = pretrain_model()
    path = tmp_path / "checkpoint-799.pth"
    torch.save(public_checkpoint(pre, compiled, combined), path)
    model = classifier(num_classes=710)
    fresh = load_pretrained(model, load_checkpoint_file(path))
    assert set(fresh) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    x = video()
    with torch.no_grad():
        expected = encoder_reference(pre, x)
        torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), model.head(model.fc_norm(expected)), rtol=1e-5, atol=1e-5)


def test_finetune_checkpoint_with_module_key_loads_strictly(tmp_path):
    src = classifier(num_classes=710, seed=3)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"module." + k: v for k, v in src.state_dict().items()}, "ds_config": {"zero": 3}}, path)
    model = classifier(num_classes=710, seed=4)
    assert load_pretrained(model, load_checkpoint_file(path)) == []
    x = video()
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
    assert load_into(classifier(num_classes=710), clean_state_dict(torch.load(path, weights_only=False))) == []


@pytest.mark.parametrize("target", [400, 600, 700])
def test_710_head_to_kinetics_keeps_the_right_rows(target):
    src = classifier(num_classes=710, init_scale=1.0, seed=5)
    model = classifier(num_classes=target, seed=6)
    assert load_pretrained(model, {"module": src.state_dict()}) == []
    rows = index_map(target)
    # The rows themselves are copied exactly; the logits only up to float rounding, since a
    # 700-row and a 710-row matrix product may be blocked differently by the BLAS.
    assert torch.equal(model.head.weight, src.head.weight[rows]) and torch.equal(model.head.bias, src.head.bias[rows])
    x = video()
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x)[:, rows], rtol=0, atol=1e-6)
    narrowed = adapt_head(src.state_dict(), 710, target)
    assert narrowed["head.weight"].shape == (target, 64)


def test_new_label_space_drops_the_head():
    src = classifier(num_classes=710, seed=5)
    model = classifier(num_classes=174)
    assert sorted(load_pretrained(model, {"model": src.state_dict()})) == ["head.bias", "head.weight"]


def test_positions():
    grid = (8, 4, 4)
    learned = torch.randn(1, 8 * 4 * 4, 32)
    assert interpolate_positions(learned, grid, (4, 4, 4)).shape == (1, 64, 32)
    assert interpolate_positions(learned, grid, (8, 6, 6)).shape == (1, 288, 32)
    torch.testing.assert_close(interpolate_positions(learned, grid, grid), learned)
    # A table constant along time keeps every slot when only the frame count changes.
    slot = torch.randn(1, 1, 16, 32)
    flat = slot.expand(1, 8, 16, 32).reshape(1, 128, 32)
    halved = slot.expand(1, 4, 16, 32).reshape(1, 64, 32)
    torch.testing.assert_close(interpolate_positions(flat, grid, (4, 4, 4)), halved)
    size = VIT_SIZES["debug"]
    assert torch.equal(position_table_for(16, 64, size), sincos_position_table(128, 64))
    assert position_table_for(16, 96, size, source=(16, 64)).shape == (1, 8 * 6 * 6, 64)


def test_checkpoint_pos_embed_fixed_is_dropped_learned_raises():
    src = classifier(num_classes=10)
    model = classifier(num_classes=10)
    sd = dict(src.state_dict(), pos_embed=sincos_position_table(128, 64))
    assert load_pretrained(model, sd) == []
    sd["pos_embed"] = torch.randn(1, 128, 64)
    with pytest.raises(CheckpointMismatchError, match="learned positions"):
        load_pretrained(model, sd)
    assert load_pretrained(model, sd, learned_pos="drop") == []


def test_mismatch_names_missing_unexpected_and_shapes():
    sd = classifier(num_classes=10).state_dict()
    sd.pop("blocks.0.attn.q_bias")
    sd["blocks.0.attn.extra"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(10, 65)
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(classifier(num_classes=10), sd)
    msg = str(err.value)
    assert "1 missing keys (blocks.0.attn.q_bias)" in msg
    assert "1 unexpected keys (blocks.0.attn.extra)" in msg
    assert "head.weight (10, 65) vs (10, 64)" in msg
    # a pre-training model is not a classifier: the decoder keys are unexpected
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        load_into(classifier(num_classes=10), clean_state_dict(public_checkpoint(pretrain_model())))


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint_file(tmp_path / "nope.pth")


def test_vit_g_classifier_builds_on_meta_with_layer_groups():
    with torch.device("meta"):
        model = build_classifier("vit_g", 710, drop_path=0.3)
    assert isinstance(model, VideoClassifier)
    groups = layer_decay_groups(model, 0.1, 0.9)
    assert len(groups) == 2 * 42  # layers 0..41, each with decay and no-decay params
