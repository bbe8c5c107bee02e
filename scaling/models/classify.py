"""The fine-tuning model: video ViT encoder, then a linear head or MAR's bridging classifier.

    build_classifier("vit_b", 400)                                   # VideoMAE V2 fine-tuning
    build_classifier("vit_b", 400, head="bridging", reconstruction=True)  # MAR

With the linear head this is VideoMAE V2's fine-tune model with mean pooling, and its state
dict has the public fine-tune key layout: `patch_embed.proj.*`, `blocks.i.*`, `fc_norm.*`,
`head.*`. There is no final `norm`: with mean pooling the public model makes it an Identity
and normalizes the pooled vector instead (`fc_norm`). Positions are the same fixed
sine-cosine table as in pre-training, a non-persistent buffer, so no checkpoint carries them.

MAR (Masked Action Recognition) drops half of the tokens with a running-cell mask before the
encoder, in training and at test time (`forward(video, drop_mask)`, masks from
`scaling.masking.finetune_drop_mask`), and classifies the kept tokens with a bridging
classifier (`bridge.*`, then `fc_norm`/`head` at the bridge's width). It may keep the
pre-training decoder as an auxiliary reconstruction branch (`reconstruction.*`), used only
when asked (`reconstruct=True`): inference never runs it.

Loading pre-trained or K710 weights into it lives in `scaling.models.convert`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scaling.models import vit
from scaling.models.pretrain import VideoMAEDecoder, gather_tokens, positions_of

HEADS = ("linear", "bridging")


@dataclass(frozen=True)
class BridgingShape:
    """MAR's bridging classifier: Linear (no bias) to `width`, `depth` Blocks, mean pool,
    LayerNorm, dropout `drop`, Linear to the classes."""

    width: int = 512
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    drop: float = 0.1


BRIDGING = BridgingShape()
# The debug model (width 64) gets a bridge at its own scale, as it gets a smaller decoder: a
# 512-wide bridge would hold ~40x the debug encoder's parameters and dominate every test and
# smoke step (in bf16 on CPUs without AVX-512 bf16 GEMMs it made a smoke step 40x slower).
BRIDGING_FOR_SIZE = {"debug": BridgingShape(width=64, heads=2)}


class BridgingBlocks(nn.Module):
    """The bridging classifier's token part: (B, N, D) -> (B, N, 512). Pooling, `fc_norm`,
    dropout and `head` are the classifier's own, shared with the linear head."""

    def __init__(self, in_width: int, shape: BridgingShape = BRIDGING):
        super().__init__()
        self.proj = nn.Linear(in_width, shape.width, bias=False)
        self.blocks = nn.ModuleList(vit.Block(shape.width, shape.heads, shape.mlp_ratio) for _ in range(shape.depth))
        self.grad_checkpointing = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, N, 512)
        return vit.run_blocks(self.blocks, x, self.grad_checkpointing)


class ReconstructionBranch(nn.Module):
    """MAR's auxiliary reconstruction during fine-tuning: the pre-training decoder rebuilds
    the normalized pixels of the tokens the fine-tune mask dropped, from the encoder's kept
    tokens. This is encoder-only masking in VideoMAE terms (decoder mask = dropped set), at
    the fine-tune ratio (50 %) instead of pre-training's 90 %.

    Names mirror the pre-training model so its weights carry over (`convert`): `norm` is the
    pre-training encoder's final LayerNorm (the classifier pools before its own `fc_norm`
    and never uses it, but the decoder was trained on normalized tokens), then
    `encoder_to_decoder`, `mask_token` and `decoder`."""

    def __init__(self, size: vit.ViTSize, num_tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(size.width, eps=1e-6)
        self.encoder_to_decoder = nn.Linear(size.width, size.decoder_width, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, size.decoder_width))
        self.register_buffer("decoder_pos_embed", vit.sincos_position_table(num_tokens, size.decoder_width), persistent=False)
        self.decoder = VideoMAEDecoder(size)
        self.apply(vit.init_vit_weights)  # as a fresh pre-training model, for when no decoder is loaded
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, kept_index: torch.Tensor, dropped_index: torch.Tensor) -> torch.Tensor:
        """tokens (B, N_keep, D) from the encoder -> (B, N_drop, 2*p*p*3) in token order of the dropped set."""
        x = self.encoder_to_decoder(self.norm(tokens))  # (B, N_keep, Dd)
        pos = self.decoder_pos_embed.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, N, Dd)
        kept = x + gather_tokens(pos, kept_index)  # (B, N_keep, Dd)
        dropped = self.mask_token.to(x.dtype) + gather_tokens(pos, dropped_index)  # (B, N_drop, Dd)
        return self.decoder(torch.cat([kept, dropped], dim=1), dropped_index.shape[1])


class VideoClassifier(nn.Module):
    """`forward(video (B, 3, T, H, W), drop_mask (B, N) | None) -> logits (B, num_classes)`;
    with `reconstruct=True` also the reconstruction branch's pixel predictions."""

    def __init__(
        self,
        size: vit.ViTSize,
        num_classes: int,
        num_frames: int = 16,
        image_size: int = 224,
        drop_path: float = 0.0,
        head_drop: float | None = None,
        init_scale: float = 0.001,
        in_chans: int = 3,
        head: str = "linear",
        reconstruction: bool = False,
        bridging: BridgingShape = BRIDGING,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown classifier head '{head}': choose one of {', '.join(HEADS)}")
        self.size = size
        self.num_classes = num_classes
        self.head_kind = head
        vit.add_video_trunk(self, size, num_frames, image_size, drop_path, in_chans)
        self.bridge = BridgingBlocks(size.width, bridging) if head == "bridging" else None
        head_width = bridging.width if head == "bridging" else size.width
        if head_drop is None:  # each head's published default
            head_drop = bridging.drop if head == "bridging" else 0.0
        self.fc_norm = nn.LayerNorm(head_width, eps=1e-6)
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(head_width, num_classes)
        self._init_scale = init_scale
        # Module.apply only: under deepspeed.zero.Init each call sees one module with its own
        # parameters gathered, so the init never reaches into a child's (partitioned) tensors.
        self.apply(self._init_module)
        # Built after the init above so that it keeps the pre-training model's own init.
        n = self.grid[0] * self.grid[1] * self.grid[2]
        self.reconstruction = ReconstructionBranch(size, n) if reconstruction else None

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

    def set_grad_checkpointing(self, setting: bool | int = True, placement: str = "first") -> None:
        """true / false, or N: N encoder blocks and the same share of the bridging head's and the
        reconstruction decoder's blocks (vit.checkpoint_count)."""
        for stack in (self, self.bridge, getattr(self.reconstruction, "decoder", None)):
            if stack is not None:
                vit.set_stack_checkpointing(stack, setting, self.size.depth, placement)

    def no_weight_decay(self) -> set[str]:
        # The only position table is a buffer and there is no cls token; the decoder's mask
        # token is 3-D, so the 1-D/bias rule would miss it.
        return {"reconstruction.mask_token"} if self.reconstruction is not None else set()

    def layer_id(self, name: str) -> int:
        """patch_embed 0, block i -> i + 1; everything after the encoder (fc_norm, head, the
        bridging blocks, the reconstruction branch) depth + 1, the head's full lr."""
        return vit.layer_id_for(name, self.size.depth)

    def encode(self, video: torch.Tensor, kept_index: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's tokens, (B, N_keep, D); all N tokens when `kept_index` is None."""
        x = self.patch_embed(video)  # (B, N, D)
        x = x + self.pos_embed.to(x.dtype)
        if kept_index is not None:
            x = gather_tokens(x, kept_index)  # (B, N_keep, D): the encoder never sees dropped tokens
        return vit.run_blocks(self.blocks, x, self.grad_checkpointing)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, N_keep, D) -> pooled features before `fc_norm`: (B, D) or (B, 512)."""
        if self.bridge is not None:
            tokens = self.bridge(tokens)  # (B, N_keep, 512)
        return tokens.mean(dim=1)

    def forward_features(self, video: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        kept = None if drop_mask is None else positions_of(~drop_mask)
        return self.pool(self.encode(video, kept))

    def forward(self, video: torch.Tensor, drop_mask: torch.Tensor | None = None, reconstruct: bool = False):
        """`drop_mask` (B, N) bool, True = dropped (the same count per row); `reconstruct`
        returns `(logits, predictions of the dropped tokens' pixels)` and needs both a mask
        and the reconstruction branch."""
        kept = None if drop_mask is None else positions_of(~drop_mask)  # (B, N_keep)
        tokens = self.encode(video, kept)  # (B, N_keep, D)
        logits = self.head(self.head_drop(self.fc_norm(self.pool(tokens))))  # (B, num_classes)
        if not reconstruct:
            return logits
        if self.reconstruction is None or drop_mask is None:
            raise ValueError("reconstruct=True needs a model built with reconstruction=True and a drop_mask")
        return logits, self.reconstruction(tokens, kept, positions_of(drop_mask))


def build_classifier(
    name: str,
    num_classes: int,
    num_frames: int = 16,
    image_size: int = 224,
    drop_path: float = 0.0,
    **kwargs,
) -> VideoClassifier:
    """Registry entry point: `build_classifier("vit_g", 710, drop_path=0.3)`; `kwargs` go to
    VideoClassifier (`head`, `reconstruction`, `head_drop`, `init_scale`, `bridging`)."""
    kwargs.setdefault("bridging", BRIDGING_FOR_SIZE.get(name, BRIDGING))
    return VideoClassifier(vit.get_size(name), num_classes, num_frames, image_size, drop_path, **kwargs)
