"""The fine-tuning model: video ViT encoder on all tokens, mean pool, LayerNorm, linear head.

This is VideoMAE V2's fine-tune model with mean pooling, and its state dict has the public
fine-tune key layout: `patch_embed.proj.*`, `blocks.i.*`, `fc_norm.*`, `head.*`. There is no
final `norm`: with mean pooling the public model makes it an Identity and normalizes the
pooled vector instead (`fc_norm`). Positions are the same fixed sine-cosine table as in
pre-training, a non-persistent buffer, so no checkpoint carries them.

Loading pre-trained or K710 weights into it lives in `scaling.models.convert`.
"""
from __future__ import annotations

import torch
from torch import nn

from scaling.models.vit import ViTSize, add_video_trunk, get_size, layer_id_for, run_blocks


class VideoClassifier(nn.Module):
    """`forward(video (B, 3, T, H, W)) -> logits (B, num_classes)`."""

    def __init__(
        self,
        size: ViTSize,
        num_classes: int,
        num_frames: int = 16,
        image_size: int = 224,
        drop_path: float = 0.0,
        head_drop: float = 0.0,
        init_scale: float = 0.001,
        in_chans: int = 3,
    ):
        super().__init__()
        self.size = size
        self.num_classes = num_classes
        add_video_trunk(self, size, num_frames, image_size, drop_path, in_chans)
        self.fc_norm = nn.LayerNorm(size.width, eps=1e-6)
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(size.width, num_classes)
        self._init_scale = init_scale
        # Module.apply only: under deepspeed.zero.Init each call sees one module with its own
        # parameters gathered, so the init never reaches into a child's (partitioned) tensors.
        self.apply(self._init_module)

    def _init_module(self, module: nn.Module) -> None:
        """VideoMAE V2 fine-tune init: trunc-normal(0.02) linears, unit norms, and the head
        shrunk by `init_scale` so the first logits are ~0 and the loss starts at log(classes)."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if module is self.head:
                with torch.no_grad():
                    module.weight.mul_(self._init_scale)
                    module.bias.mul_(self._init_scale)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        # The Conv3d tubelet embedding keeps PyTorch's default init, as in the public model.

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        # The only position table is a buffer and there is no cls token: nothing to exempt
        # beyond what the 1-D/bias rule already covers.
        return set()

    def layer_id(self, name: str) -> int:
        """patch_embed 0, block i -> i + 1, fc_norm and head depth + 1."""
        return layer_id_for(name, self.size.depth)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """Mean of the last block's tokens, before `fc_norm`: (B, D)."""
        x = self.patch_embed(video)  # (B, N, D)
        x = x + self.pos_embed.to(x.dtype)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)  # (B, N, D)
        return x.mean(dim=1)  # (B, D)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.fc_norm(self.forward_features(video))  # (B, D)
        return self.head(self.head_drop(x))  # (B, num_classes)


def build_classifier(
    name: str,
    num_classes: int,
    num_frames: int = 16,
    image_size: int = 224,
    drop_path: float = 0.0,
    **kwargs,
) -> VideoClassifier:
    """Registry entry point: `build_classifier("vit_g", 710, drop_path=0.3)`; `kwargs` go to
    VideoClassifier (`head_drop`, `init_scale`)."""
    return VideoClassifier(get_size(name), num_classes, num_frames, image_size, drop_path, **kwargs)
