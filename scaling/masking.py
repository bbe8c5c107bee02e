"""Token masks for video MAEs, batched in torch and deterministic under a `torch.Generator`.

Every mask is a bool tensor of shape (B, N) over the flattened (T', H', W') token grid, and
every sample in a batch keeps the same number of True entries, so gathers stay rectangular.

Conventions:
- encoder masks: True = hidden from the encoder (VideoMAE's `bool_masked_pos`);
- decoder masks: True = reconstructed by the decoder (the complement of VideoMAE V2's
  running-cell "masked from the decoder" map);
- fine-tune (MAR) masks: True = dropped, the encoder and classifier never see the token.
"""
from __future__ import annotations

import torch

ENCODER_MASKS = ("tube", "random")
DECODER_MASKS = ("running_cell", "none")
FINETUNE_MASKS = ("none", "running_cell")


def _choose(batch: int, population: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, population) bool with exactly `count` True per row, uniformly at random."""
    noise = torch.rand(batch, population, generator=generator)
    chosen = noise.argsort(dim=1)[:, :count]
    out = torch.zeros(batch, population, dtype=torch.bool)
    return out.scatter_(1, chosen, True)


def tube_mask(batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """VideoMAE tube masking: one spatial mask of int(ratio * H'W') tokens, repeated over T'."""
    t, h, w = grid
    spatial = _choose(batch, h * w, int(ratio * h * w), generator)  # (B, H'W')
    return spatial[:, None, :].expand(batch, t, h * w).reshape(batch, t * h * w)


def random_mask(batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """MAE-ST spacetime-agnostic masking: int(ratio * N) tokens anywhere in the clip."""
    n = grid[0] * grid[1] * grid[2]
    return _choose(batch, n, int(ratio * n), generator)


def running_cell_maps(grid: tuple[int, int, int], ratio: float = 0.5) -> torch.Tensor:
    """The distinct running-cell maps, (4, N) bool, True = dropped.

    A 2x2 cell holds int(4 * ratio) ones then zeros ([1,1,0,0] at 0.5). Slot t reads the cell
    from offset start + t + 1 (VideoMAE V2 advances its pointer before each slot), and
    the cell is tiled over H'/2 x W'/2. One map per start offset.
    """
    t, h, w = grid
    if h % 2 or w % 2:
        raise ValueError(f"running-cell masking needs an even token grid, got {h}x{w}; "
                         "pick an input size giving an even number of patches per side")
    dropped = int(4 * ratio)
    if not 0 < dropped < 4:
        raise ValueError(f"running-cell ratio {ratio} leaves no cell pattern; use 0.25, 0.5 or 0.75")
    cell = torch.tensor([True] * dropped + [False] * (4 - dropped))
    maps = []
    for start in range(4):
        slots = [cell.roll(-(start + s + 1)).view(2, 2).repeat(h // 2, w // 2).flatten() for s in range(t)]
        maps.append(torch.stack(slots).flatten())
    return torch.stack(maps)


def running_cell_mask(batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """VideoMAE V2 decoder mask: True = decoded; one of the 4 maps picked per sample."""
    maps = running_cell_maps(grid, ratio)  # (4, N), True = dropped
    pick = torch.randint(0, maps.shape[0], (batch,), generator=generator)
    return ~maps[pick]


def mar_drop_mask(batch: int, grid: tuple[int, int, int], ratio: float = 0.5, train: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """MAR fine-tune masking: (B, N) bool, True = dropped before the encoder.

    The per-slot maps are the running cell's (2x2 cells, `int(4 * ratio)` dropped, the cell
    shifted by one position per temporal slot), so every slot keeps the same number of tokens
    in every cell and four consecutive slots see every position. In training each video gets
    a random start offset and a random temporal order of its slot maps (MAR's augmentation);
    at test time (`train=False`) every video gets the one fixed pattern: start 0, slots in order.
    """
    t, h, w = grid
    slots = running_cell_maps(grid, ratio)[:, : h * w]  # (4, H'W'): slot 0 of start s is cell offset s + 1
    offset = torch.arange(t)  # slot t of start s reads cell offset s + t + 1: map (s + t) % 4
    if not train:
        return slots[offset % 4].flatten().expand(batch, -1).clone()
    start = torch.randint(0, 4, (batch, 1), generator=generator)  # (B, 1)
    order = torch.rand(batch, t, generator=generator).argsort(dim=1)  # (B, T'): a permutation per video
    return slots[(start + order) % 4].reshape(batch, t * h * w)  # (B, T', H'W') -> (B, N)


def make_masks(
    batch: int,
    grid: tuple[int, int, int],
    encoder: str,
    encoder_ratio: float,
    decoder: str,
    decoder_ratio: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder mask and decoder mask for one batch.

    `decoder="none"` is encoder-only masking (plain VideoMAE / MAE-ST): the decoder
    reconstructs exactly the tokens the encoder did not see.
    """
    if encoder == "tube":
        enc = tube_mask(batch, grid, encoder_ratio, generator)
    elif encoder == "random":
        enc = random_mask(batch, grid, encoder_ratio, generator)
    else:
        raise ValueError(f"unknown encoder mask '{encoder}': choose one of {ENCODER_MASKS}")
    if decoder == "running_cell":
        dec = running_cell_mask(batch, grid, decoder_ratio, generator)
    elif decoder == "none":
        dec = enc.clone()
    else:
        raise ValueError(f"unknown decoder mask '{decoder}': choose one of {DECODER_MASKS}")
    return enc, dec


def finetune_drop_mask(kind: str, batch: int, grid: tuple[int, int, int], ratio: float, train: bool,
                       generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The fine-tune encoder mask of `mask.finetune` (True = dropped), or None for `none`
    (every token seen, plain VideoMAE V2 fine-tuning)."""
    if kind == "none":
        return None
    if kind == "running_cell":
        return mar_drop_mask(batch, grid, ratio, train, generator)
    raise ValueError(f"unknown fine-tune mask '{kind}': choose one of {FINETUNE_MASKS}")
