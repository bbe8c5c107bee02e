"""Probing a frozen encoder: the video ViT trunk with its weights fixed, and a small trained head.

    build_probe("vit_b", 400, head="linear")      # MAE's linear probe
    build_probe("vit_b", 400, head="attentive")   # V-JEPA / InternVideo2's attentive probe

The trunk is the classifier's (`patch_embed.*`, `blocks.*` under the public fine-tune names),
so every checkpoint a fine-tune stage starts from loads into it the same way; the head lives
under `probe_head.*`. The trunk never trains: its parameters have `requires_grad=False`, it
stays in eval mode whatever `train()` is called with (no drop path), and its forward runs
without autograd, so the optimizer and the backward pass only ever see the head.

- linear: mean of the last block's tokens -> BatchNorm1d without affine (eps 1e-6) -> Linear,
  head weights trunc-normal(0.01), as MAE's `main_linprobe.py`. The affine-free BatchNorm
  whitens each feature, so one lr suits encoders whose features have very different scales
  (a random encoder's and a pre-trained one's).
- attentive: LayerNorm on the tokens, then one learnable query cross-attending to all of them
  plus an MLP (timm's `AttentionPoolLatent`, the pooling of V-JEPA's attentive classifier),
  then LayerNorm -> Linear.
"""
from __future__ import annotations

import torch
from timm.layers import AttentionPoolLatent
from torch import nn

from scaling.models import vit

PROBE_HEADS = ("linear", "attentive")
HEAD_PREFIX = "probe_head."


def init_linear(module: nn.Module, std: float) -> None:
    """Trunc-normal weights and zero biases for Linear layers. Applied with `Module.apply`, which
    DeepSpeed's `zero.Init` gathers per module: a parent must not reach into a child's
    (already partitioned) weights itself."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class LinearProbeHead(nn.Module):
    """(B, N, D) tokens -> (B, classes): mean pool, affine-free BatchNorm, Linear."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(width, affine=False, eps=1e-6)
        self.fc = nn.Linear(width, num_classes)
        self.fc.apply(lambda m: init_linear(m, std=0.01))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens.mean(dim=1)  # (B, D)
        # In the dtype of the running statistics: DeepSpeed casts buffers with the model (bf16),
        # and CPU BatchNorm refuses an input of another dtype.
        return self.fc(self.bn(pooled.to(self.bn.running_mean.dtype)).to(tokens.dtype))


class AttentiveProbeHead(nn.Module):
    """(B, N, D) tokens -> (B, classes): one learned query attends over every token."""

    def __init__(self, width: int, num_classes: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pool = AttentionPoolLatent(width, num_heads=heads, mlp_ratio=mlp_ratio, norm_layer=nn.LayerNorm)
        self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        self.fc = nn.Linear(width, num_classes)
        self.apply(lambda m: init_linear(m, std=0.02))  # V-JEPA's init; the query keeps timm's

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.norm(tokens))  # (B, D): the query's attention-weighted summary
        return self.fc(self.fc_norm(pooled))


class ProbeClassifier(nn.Module):
    """Frozen video ViT trunk + a probe head. `forward(video (B, 3, T, H, W), drop_mask=None)
    -> logits (B, classes)`; the signature of VideoClassifier, so the same evaluation runs it."""

    def __init__(self, size: vit.ViTSize, num_classes: int, num_frames: int = 16, image_size: int = 224,
                 head: str = "linear"):
        super().__init__()
        if head not in PROBE_HEADS:
            raise ValueError(f"unknown probe head '{head}': choose one of {', '.join(PROBE_HEADS)}")
        self.size = size
        self.num_classes = num_classes
        self.head_kind = head
        vit.add_video_trunk(self, size, num_frames, image_size, drop_path=0.0)
        # The pre-training model's init, so that a probe without init_from measures the encoder
        # a pre-training run starts from.
        self.patch_embed.apply(vit.init_vit_weights)
        self.blocks.apply(vit.init_vit_weights)
        for p in [*self.patch_embed.parameters(), *self.blocks.parameters()]:
            p.requires_grad_(False)
        self.probe_head = (LinearProbeHead(size.width, num_classes) if head == "linear"
                           else AttentiveProbeHead(size.width, num_classes, size.heads))

    def train(self, mode: bool = True) -> ProbeClassifier:
        """Only the head switches; the frozen trunk always runs as in evaluation."""
        super().train(mode)
        self.patch_embed.eval()
        self.blocks.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Nothing to checkpoint: the trunk keeps no activations for a backward pass."""

    def no_weight_decay(self) -> set[str]:
        return {f"{HEAD_PREFIX}pool.latent"}  # the learned query (3-D, so the 1-D rule would miss it)

    def layer_id(self, name: str) -> int:
        return vit.layer_id_for(name, self.size.depth)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """The last block's tokens, (B, N, D), without autograd."""
        x = self.patch_embed(video)  # (B, N, D)
        x = x + self.pos_embed.to(x.dtype)
        return vit.run_blocks(self.blocks, x, grad_checkpointing=False)

    def forward(self, video: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if drop_mask is not None:
            raise ValueError("a probe sees every token; set mask.finetune=none")
        return self.probe_head(self.encode(video))


def build_probe(name: str, num_classes: int, num_frames: int = 16, image_size: int = 224,
                head: str = "linear") -> ProbeClassifier:
    """Registry entry point: `build_probe("debug", 4, 16, 64, head="attentive")`."""
    return ProbeClassifier(vit.get_size(name), num_classes, num_frames, image_size, head)
