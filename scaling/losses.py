"""The objectives, in one place for training, bench/ and memory/: pre-training (per-patch
normalized pixels, MSE on decoded tokens the encoder did not see) and fine-tuning (the
criterion on the logits, plus MAR's reconstruction of the dropped tokens)."""
from __future__ import annotations

import torch
from einops import rearrange

from scaling.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def normalized_pixel_target(video: torch.Tensor, patch: int, tubelet: int) -> torch.Tensor:
    """(B, 3, T, H, W) ImageNet-normalized clip -> (B, N, tubelet*patch*patch*3) float32.

    Un-normalizes to [0, 1] pixels, then normalizes each channel of each token over its
    tubelet x patch x patch pixels with the unbiased std (VideoMAE's `normlize_target`).
    The flattening order (p0 p1 p2 c) matches the public decoder head.
    """
    mean = video.new_tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1, 1)
    std = video.new_tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1, 1)
    pixels = video.float() * std + mean
    tokens = rearrange(pixels, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=tubelet, p1=patch, p2=patch)
    tokens = (tokens - tokens.mean(dim=-2, keepdim=True)) / (tokens.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return rearrange(tokens, "b n p c -> b n (p c)")


def masked_reconstruction_loss(
    prediction: torch.Tensor, target: torch.Tensor, encoder_mask: torch.Tensor, decoder_mask: torch.Tensor
) -> torch.Tensor:
    """MSE over decoded tokens that the encoder did not see.

    prediction (B, N_dec, P) in token order of decoder_mask's True entries; target (B, N, P).
    Averaged per sample, then over the batch, so the value does not depend on how a global
    batch is split across ranks.
    """
    decoded = decoder_mask.nonzero(as_tuple=True)  # row-major: token order within each sample
    target = target[decoded].view_as(prediction)  # (B, N_dec, P)
    counted = encoder_mask[decoded].view(prediction.shape[:2]).to(torch.float32)  # (B, N_dec)
    per_token = (prediction.float() - target).pow(2).mean(dim=-1)  # (B, N_dec)
    per_sample = (per_token * counted).sum(dim=1) / counted.sum(dim=1).clamp_min(1.0)
    return per_sample.mean()


def finetune_loss(model, video: torch.Tensor, target: torch.Tensor, criterion, drop_mask: torch.Tensor | None = None,
                  reconstruction_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss and its parts: the criterion on the logits, plus MAR's weighted
    MSE on the normalized pixels of the dropped tokens. `model` is a VideoClassifier or the
    DeepSpeed engine around one; `video` (B, 3, T, H, W) already in the model's dtype."""
    if reconstruction_weight <= 0:
        loss = criterion(model(video, drop_mask).float(), target)
        return loss, {"loss_cls": loss.detach()}
    logits, pred = model(video, drop_mask, reconstruct=True)  # pred (B, N_drop, 2*p*p*3)
    size = getattr(model, "module", model).size
    # The target is the clip the encoder was given (after mixup/cutmix and erasing), as in MAR.
    pixels = normalized_pixel_target(video, size.patch, size.tubelet)  # (B, N, 2*p*p*3)
    rec = masked_reconstruction_loss(pred, pixels, drop_mask, drop_mask)  # every dropped token counts
    cls = criterion(logits.float(), target)
    return cls + reconstruction_weight * rec, {"loss_cls": cls.detach(), "loss_rec": rec.detach()}
