"""Video ViT building blocks and the size registry.

Parameter names follow the public VideoMAE V2 checkpoints (`patch_embed.proj`, `blocks.i.attn.qkv`
with separate `q_bias`/`v_bias`, `mlp.fc1`/`mlp.fc2`, `norm`, `fc_norm`, `head`), so their
weights load with `load_state_dict(strict=True)` after prefix clean-up.

This module knows nothing of DeepSpeed, MLflow or Slurm (DESIGN rule 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ViTSize:
    """One registry entry: the shape of a video ViT and its pre-training decoder."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    patch: int
    decoder_width: int
    decoder_heads: int
    decoder_depth: int = 4
    tubelet: int = 2

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden / self.width


# Sizes from the VideoMAE V2 paper and its public code. The decoder reuses the encoder's MLP ratio, as the public ViT-g
# pre-training model does (48/11 -> 2234 hidden at width 512); that is what makes its decoder
# 13.97 M parameters.
VIT_SIZES: dict[str, ViTSize] = {
    "debug": ViTSize(width=64, depth=2, heads=2, mlp_hidden=128, patch=16, decoder_width=32, decoder_heads=2, decoder_depth=1),
    "vit_s": ViTSize(width=384, depth=12, heads=6, mlp_hidden=1536, patch=16, decoder_width=192, decoder_heads=3),
    "vit_b": ViTSize(width=768, depth=12, heads=12, mlp_hidden=3072, patch=16, decoder_width=384, decoder_heads=6),
    "vit_l": ViTSize(width=1024, depth=24, heads=16, mlp_hidden=4096, patch=16, decoder_width=512, decoder_heads=8),
    "vit_h": ViTSize(width=1280, depth=32, heads=16, mlp_hidden=5120, patch=16, decoder_width=512, decoder_heads=8),
    "vit_g": ViTSize(width=1408, depth=40, heads=16, mlp_hidden=6144, patch=14, decoder_width=512, decoder_heads=8),
}


def get_size(name: str) -> ViTSize:
    if name not in VIT_SIZES:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(VIT_SIZES)}")
    return VIT_SIZES[name]


def sincos_position_table(num_tokens: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sine-cosine table of VideoMAE over the flattened (t, h, w) token index.

    Kept identical to the public code so that its checkpoints see the positions they were
    trained with. Returns (1, num_tokens, dim), float32.
    """
    position = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2) / dim
    angles = position / torch.pow(10000.0, exponent.to(torch.float64))[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float().unsqueeze(0)


class PatchEmbed3D(nn.Module):
    """Tubelet embedding: Conv3d with kernel = stride = (tubelet, patch, patch)."""

    def __init__(self, patch: int, tubelet: int, in_chans: int, width: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, width, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # (B, C, T, H, W) -> (B, D, T', H', W') -> (B, N, D)
        return self.proj(video).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA, with VideoMAE V2's bias layout.

    The qkv projection has no bias of its own; `q_bias` and `v_bias` are separate parameters
    and the key bias is fixed at zero (it would cancel in the softmax anyway).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3C)
        if qkv.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float16):
            # PyTorch's CPU flash kernel is ~2x slower in bf16 than in fp32, forward and
            # backward, and slower than the explicit softmax (bench/README.md). Feed it fp32:
            # the casts are O(N), the memory stays linear, and the result is more precise.
            # Autocast would cast SDPA's inputs straight back to bf16, hence the local off.
            with torch.autocast("cpu", enabled=False):
                x = self._attend(qkv.float(), B, N, C).to(qkv.dtype)
        else:
            x = self._attend(qkv, B, N, C)
        return self.proj(x)

    def _attend(self, qkv: torch.Tensor, B: int, N: int, C: int) -> torch.Tensor:
        q, k, v = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, c)
        # SDPA picks a fused kernel and never keeps the N x N matrix for backward.
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, c)
        return x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def add_video_trunk(module: nn.Module, size: ViTSize, num_frames: int, image_size: int, drop_path: float,
                    in_chans: int = 3) -> None:
    """Give `module` the shared ViT trunk under the public checkpoints' flat names:
    `grid` (T', H', W'), `patch_embed`, the fixed `pos_embed` table and `blocks`."""
    module.grid = num_tokens(size, num_frames, image_size)
    module.patch_embed = PatchEmbed3D(size.patch, size.tubelet, in_chans, size.width)
    n = module.grid[0] * module.grid[1] * module.grid[2]
    # Fixed, so a buffer: never trained and never saved (the public checkpoints hold none).
    module.register_buffer("pos_embed", sincos_position_table(n, size.width), persistent=False)
    module.blocks = nn.ModuleList(Block(size.width, size.heads, size.mlp_ratio, r) for r in drop_path_rates(drop_path, size.depth))
    module.grad_checkpointing = frozenset()  # indices of the blocks run under checkpointing


PLACEMENTS = ("first", "spread")


def checkpoint_count(setting: bool | int, depth: int, encoder_depth: int) -> int:
    """How many blocks of a `depth`-block stack to checkpoint for `model.activation_checkpointing`
    (true: all, false: none, N: N of the encoder's `encoder_depth` blocks). Other stacks (the
    decoder, the bridging head) take the same share, rounded up, so any N > 0 reaches them too."""
    if setting is True or setting is False:
        return depth if setting else 0
    if not 0 <= setting <= encoder_depth:
        raise ValueError(f"activation checkpointing of {setting} blocks: choose true, false or 0..{encoder_depth}")
    return math.ceil(setting * depth / encoder_depth)


def checkpointed_blocks(depth: int, count: int, placement: str = "first") -> frozenset[int]:
    """Indices of the `count` blocks (of `depth`) to run under checkpointing.

    first: blocks 0..count-1, as InternVideo2's `checkpoint_num`. Backward reaches them last,
    when the later blocks' saved tensors are already freed, so their recompute does not add to
    the peak. spread: evenly spaced (0, depth/count, ...), the same bytes saved and the same
    recompute, but the last block may be recomputed while everything else is still held
    (bench/checkpoint_sweep.py measures both)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown checkpoint placement '{placement}': choose first or spread")
    if placement == "first":
        return frozenset(range(count))
    return frozenset(i * depth // count for i in range(count))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool | frozenset[int]) -> torch.Tensor:
    """Run blocks in order; those selected (all for True, the given indices for a set) run under
    activation checkpointing when training."""
    for i, block in enumerate(blocks):
        selected = grad_checkpointing if isinstance(grad_checkpointing, bool) else i in grad_checkpointing
        if selected and block.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing recomputes the block in backward; it works with
            # ZeRO-3's parameter hooks and with inputs that need no grad.
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def set_stack_checkpointing(stack: nn.Module, setting: bool | int, encoder_depth: int, placement: str = "first") -> None:
    """Give a module with `blocks` its share of checkpointed blocks (see `checkpoint_count`)."""
    depth = len(stack.blocks)
    stack.grad_checkpointing = checkpointed_blocks(depth, checkpoint_count(setting, depth, encoder_depth), placement)


def init_vit_weights(module: nn.Module) -> None:
    """Xavier-uniform linears, zero biases, unit norms (MAE/VideoMAE init).

    Applied per module with `Module.apply`, which keeps working under `deepspeed.zero.Init`
    (a parent never touches a child's tensors directly).
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv3d):
        # The tubelet embedding, initialised like a Linear on the flattened patch (MAE).
        w = module.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth grows linearly with block index (VideoMAE)."""
    return [drop_path * i / max(depth - 1, 1) for i in range(depth)]


def num_tokens(size: ViTSize, num_frames: int, image_size: int) -> tuple[int, int, int]:
    """Token grid (T', H', W') for a clip; raises with the fix when shapes do not divide."""
    if num_frames % size.tubelet:
        raise ValueError(f"num_frames={num_frames} is not divisible by the tubelet size {size.tubelet}; use an even frame count")
    if image_size % size.patch:
        raise ValueError(f"input_size={image_size} is not divisible by the patch size {size.patch}; use a multiple of {size.patch}")
    return num_frames // size.tubelet, image_size // size.patch, image_size // size.patch


def count_params(module: nn.Module) -> int:
    """Parameter count that also works under ZeRO-3, where `numel()` of a partitioned
    parameter is 0 and DeepSpeed keeps the true count in `ds_numel`."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def layer_id_for(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: embeddings 0, block i -> i + 1, rest depth + 1."""
    if name.startswith(("patch_embed", "pos_embed", "cls_token", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


