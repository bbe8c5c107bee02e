"""The video MAE pre-training model: encoder on visible tokens + light decoder (VideoMAE V2).

The encoder sees only the tokens its mask leaves visible; the decoder gets the projected
visible tokens plus one shared mask token at every position the decoder mask selects, and
predicts pixels for exactly those positions. With dual masking that is ~half the clip
(running cell), with encoder-only masking it is every token the encoder did not see.
"""
from __future__ import annotations

import torch
from torch import nn

from scaling.models.vit import (
    Block,
    ViTSize,
    add_video_trunk,
    get_size,
    init_vit_weights,
    layer_id_for,
    run_blocks,
    set_stack_checkpointing,
    sincos_position_table,
)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), index (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a (B, N) bool mask, in token order: (B, K).

    Every row must hold the same number of True entries (the masks guarantee it)."""
    count = int(mask[0].sum())
    # Stable sort of ~mask puts True entries first, each group in ascending token order.
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :count]


class VideoMAEEncoder(nn.Module):
    def __init__(self, size: ViTSize, num_frames: int, image_size: int, drop_path: float = 0.0, in_chans: int = 3):
        super().__init__()
        self.size = size
        add_video_trunk(self, size, num_frames, image_size, drop_path, in_chans)
        self.norm = nn.LayerNorm(size.width, eps=1e-6)

    def forward(self, video: torch.Tensor, visible_index: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(video)  # (B, N, D)
        x = x + self.pos_embed.to(x.dtype)
        x = gather_tokens(x, visible_index)  # (B, N_vis, D)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)


class VideoMAEDecoder(nn.Module):
    def __init__(self, size: ViTSize):
        super().__init__()
        out = size.tubelet * size.patch * size.patch * 3
        self.blocks = nn.ModuleList(
            Block(size.decoder_width, size.decoder_heads, size.mlp_ratio) for _ in range(size.decoder_depth)
        )
        self.norm = nn.LayerNorm(size.decoder_width, eps=1e-6)
        self.head = nn.Linear(size.decoder_width, out)
        self.grad_checkpointing = frozenset()

    def forward(self, x: torch.Tensor, num_predicted: int) -> torch.Tensor:
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        # Only the trailing mask-token positions are predicted.
        return self.head(self.norm(x[:, -num_predicted:]))  # (B, N_dec, 2*p*p*3)


class VideoMAEPretrain(nn.Module):
    """Encoder + decoder. `forward(video, encoder_mask, decoder_mask) -> (B, N_dec, 2*p*p*3)`,
    predictions in token order of the decoder mask's True positions."""

    def __init__(self, size: ViTSize, num_frames: int = 16, image_size: int = 224, drop_path: float = 0.0):
        super().__init__()
        self.size = size
        self.encoder = VideoMAEEncoder(size, num_frames, image_size, drop_path)
        self.encoder_to_decoder = nn.Linear(size.width, size.decoder_width, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, size.decoder_width))
        n = self.encoder.pos_embed.shape[1]
        self.register_buffer("decoder_pos_embed", sincos_position_table(n, size.decoder_width), persistent=False)
        self.decoder = VideoMAEDecoder(size)
        self.apply(init_vit_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.encoder.grid

    def set_grad_checkpointing(self, setting: bool | int = True, placement: str = "first") -> None:
        """true / false, or N: N encoder blocks and the same share of the decoder's (vit.checkpoint_count)."""
        for stack in (self.encoder, self.decoder):
            set_stack_checkpointing(stack, setting, self.size.depth, placement)

    def forward(self, video: torch.Tensor, encoder_mask: torch.Tensor, decoder_mask: torch.Tensor) -> torch.Tensor:
        visible_index = positions_of(~encoder_mask)  # (B, N_vis)
        decoded_index = positions_of(decoder_mask)  # (B, N_dec)
        x = self.encoder(video, visible_index)  # (B, N_vis, D)
        x = self.encoder_to_decoder(x)  # (B, N_vis, Dd)
        B, _, Dd = x.shape
        pos = self.decoder_pos_embed.to(x.dtype).expand(B, -1, -1)  # (B, N, Dd)
        visible = x + gather_tokens(pos, visible_index)
        masked = self.mask_token.to(x.dtype) + gather_tokens(pos, decoded_index)  # (B, N_dec, Dd)
        return self.decoder(torch.cat([visible, masked], dim=1), decoded_index.shape[1])

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def layer_id(self, name: str) -> int:
        depth = self.size.depth
        if name.startswith("encoder."):
            return layer_id_for(name[len("encoder."):], depth)
        return depth + 1


def build_pretrain_model(name: str, num_frames: int = 16, image_size: int = 224, drop_path: float = 0.0) -> VideoMAEPretrain:
    return VideoMAEPretrain(get_size(name), num_frames, image_size, drop_path)
