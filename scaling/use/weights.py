"""One loader of "any weights" for eval, predict, features and visualize.

    w = load_weights("runs/smoke/finetune/export/model_fp32.pt")   # our .pt export
    w = load_weights("runs/smoke/finetune")                         # a run folder: its latest DeepSpeed checkpoint
    w = load_weights("vit_g_hybrid_pt_1200e_k710_ft.pth")           # a public VideoMAE V2 checkpoint
    model = classifier_from(w, num_classes=400)                     # eval / predict
    encoder = encoder_from(w)                                       # features

What each source gives:
- our `.pt` export (`scaling export`, a pipeline stage's `export/model_fp32.pt`): weights and
  the run config, hence the model size, clip shape, head, MAR mask, frame stride and precision;
- our safetensors export: the same, the config read from `<stem>.json` beside it;
- a DeepSpeed checkpoint (a run folder with `checkpoints/`, a `checkpoints/` folder or one tag
  folder): consolidated to fp32 in memory with DeepSpeed's `zero_to_fp32`, after every file
  passed the weights-only check (scaling/train/checkpoint_trust.py); the run's `config.yaml`;
- a public checkpoint (`{"model": ...}` / `{"module": ...}`): no run config, so the size is
  read from the weights (width, depth and patch of `patch_embed`, matched against the size
  registry) and the clip shape from its stored `args` (`num_frames`, `input_size`), else
  16 x 224. Loading goes through `scaling.models.convert` (qkv bias split, prefixes, the
  710 -> 400/600/700 head maps).
Files are read with PyTorch's weights-only unpickler unless `trust` is given.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scaling.errors import UserError
from scaling.label_space import NUM_K710
from scaling.models.classify import BRIDGING, BRIDGING_FOR_SIZE, VideoClassifier
from scaling.models.convert import clean_state_dict, encoder_weights_for_classifier, load_checkpoint_file, load_into
from scaling.models.pretrain import VideoMAEPretrain
from scaling.models.vit import VIT_SIZES

DEFAULT_FRAMES, DEFAULT_SIZE = 16, 224  # the public checkpoints' clip shape when they do not say


class WeightsError(UserError, ValueError):
    """Weights that cannot serve the asked use (no head for eval, an unknown size, ...)."""


@dataclass
class Weights:
    """A cleaned state dict and what is known about the model it belongs to."""

    state: dict[str, torch.Tensor]
    kind: str  # classifier | pretrain
    size_name: str
    num_frames: int
    input_size: int
    source: str  # one phrase for messages and eval.json
    config: dict = field(default_factory=dict)  # the run config, {} for public checkpoints

    @property
    def num_classes(self) -> int:
        return int(self.state["head.weight"].shape[0]) if self.kind == "classifier" else 0

    @property
    def head(self) -> str:
        return "bridging" if any(k.startswith("bridge.") for k in self.state) else "linear"

    def setting(self, section: str, key: str, default):
        """A run-config value (e.g. ("data", "stride")), or `default` for public checkpoints."""
        return (self.config.get(section) or {}).get(key, default)


def load_weights(path: str | Path, trust: bool = False) -> Weights:
    path = Path(path)
    if path.is_dir():
        return _from_deepspeed(path, trust)
    if not path.exists():
        raise FileNotFoundError(f"--weights {path} does not exist; pass an export (.pt/.safetensors), a run folder "
                                "with checkpoints/, or a public VideoMAE V2 checkpoint (.pth)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta = path.with_suffix(".json")
        config = _read_json(meta).get("config") or {} if meta.is_file() else {}
        return _describe(load_file(str(path)), config, None, f"safetensors export {path}")
    ckpt = load_checkpoint_file(path, trust)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    what = "export" if config else "checkpoint"
    return _describe(clean_state_dict(ckpt), config, ckpt.get("args"), f"{what} {path}")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _from_deepspeed(folder: Path, trust: bool) -> Weights:
    """A run folder, its checkpoints/ folder or one tag folder -> fp32 weights + the run's config."""
    from scaling.config import read_yaml
    from scaling.train.checkpoint import TAG, latest_tag

    if (folder / "checkpoints").is_dir():
        run, ckpt_dir, tag = folder, folder / "checkpoints", None
    elif TAG.fullmatch(folder.name):
        run, ckpt_dir, tag = folder.parent.parent, folder.parent, folder.name
    else:
        run, ckpt_dir, tag = folder.parent, folder, None
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"--weights {folder}: no DeepSpeed checkpoint there (no checkpoints/ with a 'latest' "
                                "tag); pass a run folder, its checkpoints/ folder, a step folder or an export file")
    if not trust:  # DeepSpeed's consolidation unpickles every file in full
        from scaling.train.checkpoint_trust import check_checkpoint_folder

        check_checkpoint_folder(ckpt_dir / tag)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    config = read_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    return _describe(clean_state_dict(state), config, None, f"DeepSpeed checkpoint {ckpt_dir / tag}")


def _describe(state: dict, config: dict, args, source: str) -> Weights:
    if any(k.startswith("encoder.blocks.") for k in state):
        kind, prefix = "pretrain", "encoder."
    elif "head.weight" in state:
        kind, prefix = "classifier", ""
    else:
        raise WeightsError(f"{source} holds neither a classifier (head.weight) nor a pre-training model "
                           "(encoder.blocks.*); pass a fine-tuned or pre-trained export")
    model = config.get("model") or {}
    name = model.get("name") or _size_from_state(state, prefix, source)
    frames = model.get("num_frames") or getattr(args, "num_frames", None) or DEFAULT_FRAMES
    size = model.get("input_size") or getattr(args, "input_size", None) or DEFAULT_SIZE
    return Weights(state, kind, name, int(frames), int(size), source, config)


def _size_from_state(state: dict, prefix: str, source: str) -> str:
    """The registry size whose width, depth, patch and tubelet the weights have."""
    proj = state.get(prefix + "patch_embed.proj.weight")  # (width, 3, tubelet, p, p)
    if proj is None:
        raise WeightsError(f"{source} has no {prefix}patch_embed.proj.weight, so its model size is unknown")
    depth = 1 + max(int(k[len(prefix):].split(".")[1]) for k in state if k.startswith(prefix + "blocks."))
    width, _, tubelet, patch, _ = proj.shape
    for name, s in VIT_SIZES.items():
        if (s.width, s.depth, s.patch, s.tubelet) == (width, depth, patch, tubelet):
            return name
    raise WeightsError(f"{source}: no registered size has width {width}, depth {depth}, patch {patch} and tubelet "
                       f"{tubelet}; register it in scaling/models/vit.py (VIT_SIZES)")


def target_classes(w: Weights, names: list[str] | None) -> int:
    """The class count of the model to build: the head's own, or 400/600/700 from a 710-way head."""
    n = w.num_classes
    if names is None or len(names) == n:
        return n
    if n == NUM_K710 and len(names) in (400, 600, 700):
        return len(names)  # the K710 head's rows of that dataset (convert.adapt_head)
    raise WeightsError(f"{len(names)} class names were given for a {n}-way head; pass the class list the model was "
                       f"trained on (or k400/k600/k700 for a {NUM_K710}-way Kinetics-710 head)")


def classifier_from(w: Weights, num_classes: int | None = None) -> VideoClassifier:
    """The classifier of `w` in eval mode, every weight loaded (strict), head mapped if asked."""
    if w.kind != "classifier":
        raise WeightsError(f"{w.source} is a pre-training model without a classifier head; evaluate and predict need "
                           "fine-tuned weights (use `scaling features` or `scaling visualize` for this one)")
    n = num_classes or w.num_classes
    model = VideoClassifier(VIT_SIZES[w.size_name], n, w.num_frames, w.input_size, head=w.head,
                            bridging=BRIDGING_FOR_SIZE.get(w.size_name, BRIDGING))
    sd = encoder_weights_for_classifier({"model": w.state}, model, learned_pos="error")
    if "head.weight" not in sd:
        raise WeightsError(f"the {w.num_classes}-way head of {w.source} does not fit a {n}-class model; pass the "
                           "class list it was trained on")
    load_into(model, sd, strict=True)
    return model.eval()


def encoder_from(w: Weights) -> torch.nn.Module:
    """A module with `tokens(video) -> (B, N, D)` and `pooled(video) -> (B, D)` (see FeatureEncoder)."""
    if w.kind == "classifier":
        return FeatureEncoder(classifier_from(w))
    model = VideoMAEPretrain(VIT_SIZES[w.size_name], w.num_frames, w.input_size)
    load_into(model, w.state, strict=True)
    return FeatureEncoder(model.eval())


class FeatureEncoder(torch.nn.Module):
    """The frozen encoder's features.

    Classifier: tokens of the last block; pooled = `fc_norm(mean of tokens)` (through the
    bridging blocks for MAR), what VideoMAE V2's `forward_features` gives and its feature
    extraction for temporal action detection stores. Pre-training model: the encoder's tokens
    after its final LayerNorm (what the decoder reads); pooled = their mean."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.grid = model.grid

    def tokens(self, video: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, VideoClassifier):
            return self.model.encode(video)  # (B, N, D)
        n = self.grid[0] * self.grid[1] * self.grid[2]
        every = torch.arange(n, device=video.device).expand(video.shape[0], -1)  # (B, N)
        return self.model.encoder(video, every)  # (B, N, D), normed

    def pooled(self, video: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(video)
        if isinstance(self.model, VideoClassifier):
            return self.model.fc_norm(self.model.pool(tokens))  # (B, D)
        return tokens.mean(dim=1)  # (B, D)


def device_for_rank() -> torch.device:
    """This process's accelerator (cuda:LOCAL_RANK) or the CPU."""
    import os

    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
