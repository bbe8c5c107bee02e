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

from collections.abc import Callable
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------- the registry of mask modes
# A mode is a name under one role (encoder: what the encoder does not see; decoder: what the
# decoder reconstructs; finetune: what MAR drops before the encoder), a function that makes the
# batch's mask and a check of the settings it can honour. Config validation, `memory plan` and
# `memory compare` read this registry; a new mode is one `register_mask` call (see
# tests/unit/test_masking.py, which registers a toy mode and removes it).
ROLES = ("encoder", "decoder", "finetune")


@dataclass(frozen=True)
class MaskMode:
    name: str
    role: str
    make: Callable[..., torch.Tensor | None]
    # (grid, ratio, mode_key, ratio_key, input_size) -> one sentence naming what to change, or None
    check: Callable[..., str | None] | None = None


MASK_MODES: dict[str, dict[str, MaskMode]] = {role: {} for role in ROLES}


def register_mask(role: str, name: str, check: Callable[..., str | None] | None = None):
    """Decorator: `make` under `role`. Encoder: make(batch, grid, ratio, generator); decoder:
    make(batch, grid, ratio, generator, encoder_mask); finetune: make(batch, grid, ratio, train,
    generator) -> mask or None (no drop)."""
    if role not in ROLES:
        raise ValueError(f"unknown mask role '{role}': choose one of {ROLES}")

    def add(make):
        MASK_MODES[role][name] = MaskMode(name, role, make, check)
        return make

    return add


def unregister_mask(role: str, name: str) -> None:
    MASK_MODES[role].pop(name, None)


def mask_names(role: str) -> tuple[str, ...]:
    return tuple(MASK_MODES[role])


def check_mask(role: str, name: str, grid, ratio: float, mode_key: str, ratio_key: str, input_size: int) -> str | None:
    """None when mode `name` of `role` exists and honours `ratio` on `grid`, else one sentence."""
    mode = MASK_MODES[role].get(name)
    if mode is None:
        return f"{mode_key} '{name}' is unknown; choose one of {', '.join(mask_names(role))}"
    return mode.check(grid, ratio, mode_key, ratio_key, input_size) if mode.check else None


def _running_cell_check(ratio_words: str):
    def check(grid, ratio, mode_key, ratio_key, input_size):
        if grid[1] % 2 or grid[2] % 2:
            return (f"{mode_key}=running_cell needs an even number of patches per side, but input_size "
                    f"{input_size} gives {grid[1]}; pick another model.input_size")
        if ratio not in (0.25, 0.5, 0.75):
            return f"{ratio_key} {ratio} {ratio_words}; use 0.25, 0.5 or 0.75"
        return None

    return check


# Pre-training maskings by their paper names (`memory plan --masking`, `memory compare` variants).
MASKINGS = {"dual": "running_cell", "encoder_only": "none"}


def _choose(batch: int, population: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, population) bool with exactly `count` True per row, uniformly at random."""
    noise = torch.rand(batch, population, generator=generator)
    chosen = noise.argsort(dim=1)[:, :count]
    out = torch.zeros(batch, population, dtype=torch.bool)
    return out.scatter_(1, chosen, True)


@register_mask("encoder", "tube")
def tube_mask(batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """VideoMAE tube masking: one spatial mask of int(ratio * H'W') tokens, repeated over T'."""
    t, h, w = grid
    spatial = _choose(batch, h * w, int(ratio * h * w), generator)  # (B, H'W')
    return spatial[:, None, :].expand(batch, t, h * w).reshape(batch, t * h * w)


@register_mask("encoder", "random")
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
    if encoder not in MASK_MODES["encoder"]:
        raise ValueError(f"unknown encoder mask '{encoder}': choose one of {mask_names('encoder')}")
    if decoder not in MASK_MODES["decoder"]:
        raise ValueError(f"unknown decoder mask '{decoder}': choose one of {mask_names('decoder')}")
    enc = MASK_MODES["encoder"][encoder].make(batch, grid, encoder_ratio, generator)
    return enc, MASK_MODES["decoder"][decoder].make(batch, grid, decoder_ratio, generator, enc)


@register_mask("decoder", "running_cell",
               _running_cell_check("cannot be honoured exactly: a running cell of 4 tokens drops 1, 2 or 3 of them"))
def _decoder_running_cell(batch, grid, ratio, generator, encoder_mask):
    return running_cell_mask(batch, grid, ratio, generator)


@register_mask("decoder", "none")
def _decoder_none(batch, grid, ratio, generator, encoder_mask):
    return encoder_mask.clone()  # encoder-only masking: reconstruct exactly what the encoder did not see


@register_mask("finetune", "none")
def _finetune_none(batch, grid, ratio, train, generator):
    return None


register_mask("finetune", "running_cell", _running_cell_check("gives no running-cell pattern"))(mar_drop_mask)


def finetune_drop_mask(kind: str, batch: int, grid: tuple[int, int, int], ratio: float, train: bool,
                       generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The fine-tune encoder mask of `mask.finetune` (True = dropped), or None for `none`
    (every token seen, plain VideoMAE V2 fine-tuning)."""
    if kind not in MASK_MODES["finetune"]:
        raise ValueError(f"unknown fine-tune mask '{kind}': choose one of {mask_names('finetune')}")
    return MASK_MODES["finetune"][kind].make(batch, grid, ratio, train, generator)
