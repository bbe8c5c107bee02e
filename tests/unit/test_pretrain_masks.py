"""Pre-training masks per rank: each rank takes its own rows of one global draw.

A mask bug here does not stop pre-training from learning (every clip still gets a valid random
mask; bench/results/proof_of_value_ci_seeds.json: the same mask for every clip reconstructs as
well as main), so tests/integration/test_proof_of_value.py cannot see it; this check does.
"""
import torch

from scaling.config import load_config
from scaling.train.pretrain import masks_for_rank

GRID = (8, 4, 4)  # the debug model's token grid at 16 frames of 64 px


def test_rank_slices_are_the_global_masks_and_differ_per_clip_and_step():
    cfg = load_config(None, ["train.seed=3"])  # tube 0.9 encoder, running cell 0.5 decoder
    whole = masks_for_rank(cfg, GRID, step=5, micro=1, rank=0, clips_per_rank=4, world=1)
    halves = [masks_for_rank(cfg, GRID, step=5, micro=1, rank=r, clips_per_rank=2, world=2) for r in (0, 1)]
    for i, name in enumerate(("encoder", "decoder")):
        assert torch.equal(torch.cat([h[i] for h in halves]), whole[i]), f"a clip's {name} mask depends on the ranks"
    enc = whole[0]
    assert enc.shape == (4, 8 * 4 * 4) and all(not torch.equal(enc[0], enc[j]) for j in (1, 2, 3)), "one mask per clip"
    later = masks_for_rank(cfg, GRID, step=6, micro=1, rank=0, clips_per_rank=4, world=1)
    assert not torch.equal(enc, later[0]), "a new mask every step"
