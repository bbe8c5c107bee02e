"""Mask counts and patterns (VideoMAE V2 and MAR, as their public code builds them) and the loss's choice of tokens."""
import pytest
import torch

from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
from scaling.masking import make_masks, random_mask, running_cell_maps, running_cell_mask, tube_mask

B_GRID = (8, 14, 14)  # ViT-B, 16x224
G_GRID = (8, 16, 16)  # ViT-g, 16x224, patch 14


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_tube_mask_counts_and_is_identical_across_slots():
    mask = tube_mask(4, B_GRID, 0.9, gen())
    assert mask.shape == (4, 1568)
    assert (mask.sum(1) == 1408).all() and ((~mask).sum(1) == 160).all()
    slots = mask.view(4, 8, 196)
    assert (slots == slots[:, :1]).all()
    assert not (mask[0] == mask[1]).all(), "samples get different masks"
    g = tube_mask(2, G_GRID, 0.9, gen()).view(2, 8, 256)
    assert (g.sum(-1) == 230).all() and ((~g).flatten(1).sum(1) == 208).all()


def test_random_mask_counts_and_varies_across_slots():
    mask = random_mask(4, B_GRID, 0.9, gen())
    assert (mask.sum(1) == int(0.9 * 1568)).all()
    slots = mask.view(4, 8, 196)
    assert not (slots == slots[:, :1]).all()


def test_masks_are_deterministic_under_a_seed():
    a = make_masks(4, B_GRID, "tube", 0.9, "running_cell", 0.5, gen(7))
    b = make_masks(4, B_GRID, "tube", 0.9, "running_cell", 0.5, gen(7))
    c = make_masks(4, B_GRID, "tube", 0.9, "running_cell", 0.5, gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_running_cell_shifts_by_one_per_slot_and_has_four_maps():
    maps = running_cell_maps(B_GRID, 0.5)  # True = dropped
    assert maps.shape == (4, 1568)
    assert len({tuple(m.tolist()) for m in maps}) == 4
    assert (maps.sum(1) == 784).all()
    cells = maps.view(4, 8, 7, 2, 7, 2)[:, :, 0, :, 0, :].reshape(4, 8, 4)  # the first 2x2 cell per slot
    for m in range(4):
        for t in range(8):
            # VideoMAE V2's Cell: pattern [1,1,0,0] read from offset start + t + 1.
            assert cells[m, t].tolist() == torch.tensor([True, True, False, False]).roll(-(m + t + 1)).tolist()
            if t:
                assert torch.equal(cells[m, t], cells[m, t - 1].roll(-1)), "cell moves by one position per slot"
    # Tiled: every 2x2 cell of a slot holds the same pattern.
    tiles = maps.view(4, 8, 7, 2, 7, 2)
    assert (tiles == tiles[:, :, :1, :, :1, :]).all()


def test_running_cell_decoder_mask_picks_one_map_per_sample():
    dec = running_cell_mask(64, B_GRID, 0.5, gen())
    assert (dec.sum(1) == 784).all()  # ViT-B decodes 784 of 1568 tokens
    maps = {tuple((~m).tolist()) for m in running_cell_maps(B_GRID, 0.5)}
    assert {tuple(d.tolist()) for d in dec} <= maps
    assert len({tuple(d.tolist()) for d in dec}) == 4


def test_encoder_only_decodes_exactly_the_masked_set():
    enc, dec = make_masks(4, B_GRID, "tube", 0.9, "none", 0.5, gen())
    assert torch.equal(enc, dec)
    enc, dec = make_masks(4, B_GRID, "random", 0.9, "none", 0.5, gen())
    assert torch.equal(enc, dec)


def test_dual_masking_decoder_sequence_length():
    enc, dec = make_masks(2, B_GRID, "tube", 0.9, "running_cell", 0.5, gen())
    assert int((~enc[0]).sum() + dec[0].sum()) == 944  # VideoMAE V2: the ViT-B decoder sees 944 tokens
    enc, dec = make_masks(2, G_GRID, "tube", 0.9, "running_cell", 0.5, gen())
    assert int((~enc[0]).sum() + dec[0].sum()) == 1232


def test_unknown_mask_names_are_refused():
    with pytest.raises(ValueError, match="unknown encoder mask"):
        make_masks(1, B_GRID, "blocks", 0.9, "none", 0.5, gen())
    with pytest.raises(ValueError, match="even token grid"):
        running_cell_maps((8, 7, 7))


def test_pixel_target_is_normalized_per_token_and_channel():
    video = torch.randn(2, 3, 4, 32, 32)
    target = normalized_pixel_target(video, 16, 2).view(2, 8, 2 * 16 * 16, 3)
    torch.testing.assert_close(target.mean(2), torch.zeros(2, 8, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(2), torch.ones(2, 8, 3), atol=1e-4, rtol=0)


def test_loss_counts_only_decoded_tokens_the_encoder_did_not_see():
    enc, dec = make_masks(2, (2, 4, 4), "tube", 0.5, "running_cell", 0.5, gen())
    target = torch.randn(2, 32, 12)
    pred = target[dec].view(2, -1, 12).clone()
    visible_decoded = (~enc)[dec].view(2, -1)
    assert visible_decoded.any(), "the test needs decoded tokens that the encoder saw"
    pred[visible_decoded] += 100.0  # wrong only where the encoder saw the token
    assert masked_reconstruction_loss(pred, target, enc, dec).item() == 0.0
    pred[~visible_decoded] += 1.0
    assert masked_reconstruction_loss(pred, target, enc, dec).item() == pytest.approx(1.0)


@pytest.mark.parametrize("decoder", ["none", "running_cell"])
def test_random_encoder_mask_runs_through_the_pretraining_model(decoder):
    """MAE-ST masking (`mask.encoder: random`) is a pre-training choice like tube masking."""
    from scaling.config import load_config
    from scaling.models.pretrain import build_pretrain_model

    cfg = load_config(None, ["mask.encoder=random", f"mask.decoder={decoder}"])
    assert cfg.mask.encoder == "random"
    torch.manual_seed(0)
    model = build_pretrain_model("debug", 16, 64)  # grid (8, 4, 4): 128 tokens
    enc, dec = make_masks(2, model.grid, "random", 0.9, decoder, 0.5, gen())
    pred = model(torch.randn(2, 3, 16, 64, 64), enc, dec)
    assert pred.shape == (2, 115 if decoder == "none" else 64, 2 * 16 * 16 * 3)
    assert not (enc.view(2, 8, 16) == enc.view(2, 8, 16)[:, :1]).all(), "not a tube"


def test_a_new_mask_mode_is_one_registration():
    """A toy encoder mode (hide the first tokens) registered in one call: config validation and
    make_masks accept it, and it is gone again after unregistering."""
    from scaling.config import ConfigError, load_config, validate
    from scaling.masking import mask_names, register_mask, unregister_mask

    def needs_half(grid, ratio, mode_key, ratio_key, input_size):
        return None if ratio == 0.5 else f"{ratio_key} {ratio}: first_half hides exactly 0.5"

    @register_mask("encoder", "first_half", needs_half)
    def first_half(batch, grid, ratio, generator):
        n = grid[0] * grid[1] * grid[2]
        return (torch.arange(n) < int(n * ratio)).expand(batch, -1).clone()

    try:
        assert "first_half" in mask_names("encoder")
        enc, dec = make_masks(2, (2, 4, 4), "first_half", 0.5, "none", 0.5, torch.Generator().manual_seed(0))
        assert enc[:, :16].all() and not enc[:, 16:].any() and torch.equal(enc, dec)
        toy = ["mask.encoder=first_half", "data.source=noise"]
        validate(load_config("pipelines/pretrain_smoke.yaml", [*toy, "mask.encoder_ratio=0.5"]), 2)
        with pytest.raises(ConfigError, match="first_half hides exactly 0.5"):
            validate(load_config("pipelines/pretrain_smoke.yaml", [*toy, "mask.encoder_ratio=0.9"]), 2)
    finally:
        unregister_mask("encoder", "first_half")
    assert "first_half" not in mask_names("encoder")
    with pytest.raises(ValueError, match="unknown encoder mask"):
        make_masks(2, (2, 4, 4), "first_half", 0.5, "none", 0.5, torch.Generator().manual_seed(0))
