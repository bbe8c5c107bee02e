"""Model shapes, parameter counts against the published sizes, checkpoint key layout, activation checkpointing."""
import pytest
import torch

from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
from scaling.masking import make_masks
from scaling.models.pretrain import build_pretrain_model
from scaling.models.vit import VIT_SIZES, count_params

# Millions of parameters with a 710-class head (the VideoMAE V2 paper and its public code).
CLASSIFIER_PARAMS_M = {"vit_s": 22.15, "vit_b": 86.77, "vit_l": 304.6, "vit_h": 632.5, "vit_g": 1012.6}
TOKENS = {"vit_s": 1568, "vit_b": 1568, "vit_l": 1568, "vit_h": 1568, "vit_g": 2048}


def meta_model(name):
    with torch.device("meta"):  # ViT-g is never allocated
        return build_pretrain_model(name, 16, 224)


@pytest.mark.parametrize("name", sorted(CLASSIFIER_PARAMS_M))
def test_classifier_param_counts_match_reference(name):
    model = meta_model(name)
    width = VIT_SIZES[name].width
    # Fine-tune model = encoder with its final norm moved to fc_norm (same size) + a Linear head.
    classifier = count_params(model.encoder) + width * 710 + 710
    digits = 2 if classifier < 1e8 else 1
    assert round(classifier / 1e6, digits) == CLASSIFIER_PARAMS_M[name]
    grid = model.grid
    assert grid[0] * grid[1] * grid[2] == TOKENS[name]


def test_vit_g_pretraining_model_counts():
    model = meta_model("vit_g")
    assert round(count_params(model) / 1e6, 1) == 1026.3
    assert round(count_params(model.encoder) / 1e6, 1) == 1011.6
    assert round(count_params(model.decoder) / 1e6, 2) == 13.97
    assert model.decoder.head.out_features == 1176


@pytest.mark.parametrize("name", sorted(VIT_SIZES))
def test_decoder_width_and_output(name):
    size = VIT_SIZES[name]
    model = meta_model(name)
    assert len(model.decoder.blocks) == size.decoder_depth
    assert model.decoder.head.out_features == 2 * size.patch * size.patch * 3
    assert model.encoder_to_decoder.bias is None


def test_state_dict_keys_follow_public_videomae_v2_layout():
    keys = set(build_pretrain_model("debug", 16, 64).state_dict())
    for key in ["encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.attn.q_bias",
                "encoder.blocks.0.attn.v_bias", "encoder.blocks.0.mlp.fc1.weight", "encoder.norm.weight",
                "encoder_to_decoder.weight", "mask_token", "decoder.blocks.0.norm1.weight", "decoder.norm.weight",
                "decoder.head.weight"]:
        assert key in keys, key
    assert not any("pos_embed" in k for k in keys), "fixed sine-cosine tables are not saved"
    assert not any(k.endswith("attn.qkv.bias") for k in keys)


@pytest.mark.parametrize("decoder", ["running_cell", "none"])
def test_forward_predicts_exactly_the_decoded_tokens(decoder):
    torch.manual_seed(0)
    model = build_pretrain_model("debug", 16, 64)
    enc, dec = make_masks(3, model.grid, "tube", 0.9, decoder, 0.5, torch.Generator().manual_seed(0))
    out = model(torch.randn(3, 3, 16, 64, 64), enc, dec)
    assert out.shape == (3, int(dec[0].sum()), 2 * 16 * 16 * 3)


def _loss_and_grads(checkpointing: bool | int, placement: str = "first"):
    """Loss and gradients of one debug pre-training step (drop path on); shared with
    test_selective_checkpointing."""
    torch.manual_seed(0)
    model = build_pretrain_model("debug", 16, 64, drop_path=0.2)
    model.set_grad_checkpointing(checkpointing, placement)
    video = torch.randn(2, 3, 16, 64, 64, generator=torch.Generator().manual_seed(1))
    enc, dec = make_masks(2, model.grid, "tube", 0.9, "running_cell", 0.5, torch.Generator().manual_seed(2))
    torch.manual_seed(3)  # drop path draws from the global RNG; checkpointing must replay it
    loss = masked_reconstruction_loss(model(video, enc, dec), normalized_pixel_target(video, 16, 2), enc, dec)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_identical_loss_and_gradients():
    loss_a, grads_a = _loss_and_grads(False)
    loss_b, grads_b = _loss_and_grads(True)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0, msg=name)
