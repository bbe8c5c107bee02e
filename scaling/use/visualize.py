"""`scaling visualize`: original / masked input / reconstruction of a few frames, as a PNG.

The pre-training model predicts per-patch *normalized* pixels (scaling/losses.py), so a
prediction is turned back into pixels with each patch's own mean and standard deviation from
the original clip, as VideoMAE's visualization does:

    pixels = prediction x (unbiased std of the patch + 1e-6) + mean of the patch

Panels: visible tokens show the original; tokens hidden from the encoder and reconstructed by
the decoder show the prediction; with dual masking, hidden tokens outside the decoder's
running-cell subset have no prediction and stay grey. `reconstruction_error` re-normalizes the
reconstructed pixels and compares them with the target over the tokens the loss counts, so it
equals the pre-training loss on the same clip and masks (a check that the picture shows what
was trained).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange

from scaling.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from scaling.data.video import read_clips, uniform_clip_indices
from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
from scaling.masking import make_masks
from scaling.models.convert import load_into
from scaling.models.pretrain import VideoMAEPretrain
from scaling.models.vit import VIT_SIZES
from scaling.use.views import centre_view, read_video
from scaling.use.weights import WeightsError, load_weights

GREY = 0.5


@dataclass
class VisualizeOptions:
    weights: str
    video: str
    out: str | None = None  # default: <video stem>_reconstruction.png in the current folder
    mask: str | None = None  # None: the run's mask.encoder, else tube
    mask_ratio: float | None = None
    decoder: str | None = None  # None: the run's mask.decoder, else running_cell
    frames: int = 4
    seed: int = 0
    trust: bool = False


def _pixel_tokens(video: torch.Tensor, patch: int, tubelet: int) -> torch.Tensor:
    """(B, 3, T, H, W) normalized clip -> [0, 1] pixels as tokens (B, N, tubelet*p*p, 3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    pixels = video.float().cpu() * std + mean
    return rearrange(pixels, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=tubelet, p1=patch, p2=patch)


@torch.no_grad()
def reconstruct(model, video: torch.Tensor, encoder_mask: torch.Tensor, decoder_mask: torch.Tensor) -> dict:
    """Forward one clip (1, 3, T, H, W); the three panels as (T, H, W, 3) pixels, the loss and the
    error recomputed from the reconstructed pixels. `model` may be a DeepSpeed engine (every
    rank must call this then)."""
    inner = getattr(model, "module", model)
    size, (t, h, w) = inner.size, inner.grid
    param = next(inner.parameters())  # a ZeRO-3 partition still has the model's dtype and device
    prediction = model(video.to(device=param.device, dtype=param.dtype), encoder_mask.to(param.device),
                       decoder_mask.to(param.device)).float().cpu()  # (1, N_dec, 2*p*p*3)
    target = normalized_pixel_target(video.cpu(), size.patch, size.tubelet)  # (1, N, 2*p*p*3)
    enc, dec = encoder_mask.cpu(), decoder_mask.cpu()
    loss = float(masked_reconstruction_loss(prediction, target, enc, dec))

    tokens = _pixel_tokens(video, size.patch, size.tubelet)[0]  # (N, P, 3)
    mean = tokens.mean(dim=-2, keepdim=True)
    std = tokens.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6
    decoded = dec[0].nonzero().squeeze(1)  # token order of the predictions
    predicted = rearrange(prediction[0], "n (p c) -> n p c", c=3)  # (N_dec, P, 3) normalized
    rebuilt = tokens.clone()
    rebuilt[decoded] = predicted * std[decoded] + mean[decoded]  # each patch's own mean and std
    counted = enc[0][decoded]  # decoded tokens the encoder did not see: what the loss counts
    renormalized = (rebuilt[decoded] - mean[decoded]) / std[decoded]
    per_token = (renormalized - rearrange(target[0, decoded], "n (p c) -> n p c", c=3)).pow(2).mean(dim=(1, 2))
    error = float(per_token[counted].mean())

    hidden = enc[0][:, None, None]  # (N, 1, 1)
    masked_input = torch.where(hidden, torch.full_like(tokens, GREY), tokens)
    shown = torch.zeros_like(enc[0])
    shown[decoded] = True
    reconstruction = torch.where(hidden & ~shown[:, None, None], torch.full_like(tokens, GREY),
                                 torch.where(hidden, rebuilt, tokens))

    def frames(x: torch.Tensor) -> torch.Tensor:  # (N, P, 3) -> (T, H, W, 3)
        return rearrange(x, "(t h w) (p0 p1 p2) c -> (t p0) (h p1) (w p2) c", t=t, h=h, w=w,
                         p0=size.tubelet, p1=size.patch, p2=size.patch).clamp(0, 1)

    return {"original": frames(tokens), "masked": frames(masked_input), "reconstruction": frames(reconstruction),
            "loss": loss, "reconstruction_error": error}


def draw(panels: dict, path: Path, num_frames: int, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = panels["original"].shape[0]
    picks = torch.linspace(0, total - 1, min(num_frames, total)).round().long().tolist()
    rows = ("original", "masked", "reconstruction")
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(2.2 * len(picks), 2.3 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        for c, f in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(panels[name][f].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pretrain_model_from(weights) -> VideoMAEPretrain:
    if weights.kind != "pretrain":
        raise WeightsError(f"{weights.source} is a classifier without a decoder; visualize needs pre-training weights "
                           "(the pre-training stage's export/model_fp32.pt)")
    model = VideoMAEPretrain(VIT_SIZES[weights.size_name], weights.num_frames, weights.input_size)
    load_into(model, weights.state, strict=True)
    return model.eval()


def centre_clip(vr, num_frames: int, stride: int, input_size: int) -> torch.Tensor:
    """The middle test clip's centre crop: (1, 3, T, S, S) normalized."""
    (frames,) = read_clips(vr, uniform_clip_indices(len(vr), num_frames, stride, 1))
    return centre_view(frames, input_size)[None]


def visualize(o: VisualizeOptions) -> dict:
    w = load_weights(o.weights, o.trust)
    model = pretrain_model_from(w)
    video = centre_clip(read_video(o.video), w.num_frames, w.setting("data", "stride", 4), w.input_size)
    mask = o.mask or w.setting("mask", "encoder", "tube")
    ratio = o.mask_ratio if o.mask_ratio is not None else w.setting("mask", "encoder_ratio", 0.9)
    decoder = o.decoder or w.setting("mask", "decoder", "running_cell")
    g = torch.Generator().manual_seed(o.seed)
    try:
        enc, dec = make_masks(1, model.grid, mask, ratio, decoder, w.setting("mask", "decoder_ratio", 0.5), g)
    except ValueError as e:
        raise WeightsError(f"{e}; pass --mask tube|random and --decoder running_cell|none") from None
    panels = reconstruct(model, video, enc, dec)
    out = Path(o.out or f"{Path(o.video).stem}_reconstruction.png")
    title = (f"{Path(o.video).name}: {mask} mask {ratio:g}, decoder {decoder}; "
             f"loss {panels['loss']:.4f} (normalized-pixel MSE on reconstructed hidden tokens)")
    draw(panels, out, o.frames, title)
    summary = {"png": str(out), "loss": panels["loss"], "reconstruction_error": panels["reconstruction_error"],
               "mask": mask, "mask_ratio": ratio, "decoder": decoder, "seed": o.seed, "weights": str(o.weights)}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[scaling] visualize: wrote {out} (loss {panels['loss']:.4f})", flush=True)
    return summary


def log_reconstruction_figure(engine, cfg, tracker, rank: int, step: int) -> None:
    """End of pre-training: every rank forwards the same clip (ZeRO-3 gathers weights
    collectively), rank 0 draws it to <output_dir>/reconstruction.png and logs it to MLflow.
    The clip is the first video of the first shard, masked as in training (seeded by
    train.seed). Noise data has no video to show; a figure that fails only warns."""
    from scaling.config import data_sources
    from scaling.data.sources import expand_shards
    from scaling.data.video import open_video
    from scaling.tracking import first_line, warn
    from scaling.use.features import shard_videos

    if cfg.data.source != "shards":
        return
    m, k = cfg.model, cfg.mask
    try:
        source = data_sources(cfg)[0]
        key, data = next(shard_videos(expand_shards(source.shards)[0]))
        video = centre_clip(open_video(data), m.num_frames, source.stride, m.input_size)
        g = torch.Generator().manual_seed(cfg.train.seed)
        enc, dec = make_masks(1, engine.module.grid, k.encoder, k.encoder_ratio, k.decoder, k.decoder_ratio, g)
    except Exception as e:  # noqa: BLE001 - the same on every rank, before any collective: skip the figure
        if rank == 0:
            warn(f"no reconstruction figure ({first_line(e)})")
        return
    was_training = engine.module.training
    engine.module.eval()
    panels = reconstruct(engine, video, enc, dec)
    engine.module.train(was_training)
    if rank == 0:
        path = draw(panels, Path(cfg.train.output_dir) / "reconstruction.png", 4,
                    f"sample {key} at step {step}: {k.encoder} {k.encoder_ratio:g}, decoder {k.decoder}; "
                    f"loss {panels['loss']:.4f}")
        tracker.log_metrics({"reconstruction/loss": panels["loss"]}, step=step)
        tracker.log_artifact(str(path))
