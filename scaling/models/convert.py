"""Checkpoint hand-off between stages and import of public VideoMAE V2 checkpoints.

    ckpt = load_checkpoint_file(path)                 # {"model": ...} / {"module": ...} / bare
    fresh = load_pretrained(model, ckpt)              # returns the keys left at their init

which is `clean_state_dict` -> `encoder_weights_for_classifier` -> `load_into`. Decisions, each
following the public VideoMAE V2 fine-tuning code unless said otherwise:

- Encoder `norm.*` is dropped and `fc_norm` starts fresh (ones/zeros). The public fine-tune
  model with mean pooling has `norm = Identity` and loads non-strictly, so the pre-trained
  `norm` is never used; its published results come from a fresh `fc_norm`. (Copying it into
  `fc_norm` would not even be the same function: it normalizes tokens, `fc_norm` their mean.)
- A combined `attn.qkv.bias` (older checkpoints) becomes `q_bias` = first third and `v_bias` =
  last third; the key third is dropped. That is exact whatever its value: a key bias adds
  `q . b_k` to every logit of one query's row, which the softmax cancels.
- `pos_embed` in a checkpoint: ours is the fixed sine-cosine table rebuilt for any clip shape,
  so a stored copy of that table is dropped with nothing lost. A learned table cannot live in
  this model; dropping it would silently change the network, so it raises unless asked to
  (`learned_pos="drop"`). `interpolate_positions` resizes such tables, and
  `position_table_for(..., source=)` reproduces the public code's positions for clips whose
  shape differs from pre-training (it interpolates the pre-training table).
- A 710-way head going to a 400/600/700-class model keeps its K400/K600/K700 rows
  (`adapt_head`); a head of any other mismatched size is dropped and starts fresh, as public.
- A linear head going to a bridging classifier, or back, is dropped and starts fresh (its
  `fc_norm`/`head` have another width, and the bridging blocks are new).
- MAR's reconstruction branch (`reconstruction.*`) is kept only for a model that has one:
  from a pre-training checkpoint it takes `encoder.norm`, `encoder_to_decoder`, `mask_token`
  and `decoder.*`; from a fine-tune export that had the branch, its `reconstruction.*` keys.
  A model without the branch (inference) drops them.

Under ZeRO-3 the parameters are partitioned: call `load_into`/`load_pretrained` inside
`deepspeed.zero.GatheredParameters(model.parameters(), modifier_rank=0)` (this module stays
DeepSpeed-free); shape checks already read `ds_shape`.
"""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scaling.errors import UserError
from scaling.label_space import NUM_K710, head_710_to
from scaling.models.vit import ViTSize, num_tokens, sincos_position_table

WRAPPER_PREFIXES = ("_orig_mod.", "module.", "backbone.")  # torch.compile, DDP/DeepSpeed, mmaction
PRETRAIN_ONLY = ("decoder.", "encoder_to_decoder.", "mask_token", "decoder_pos_embed")
HEAD_PREFIXES = ("fc_norm.", "head.", "bridge.")  # the classifier's head, linear or bridging; never in pre-training
RECONSTRUCTION = "reconstruction."
# What a classifier may start from its init: the head (new label space or head type, or
# from pre-training) and the reconstruction branch (a checkpoint without a decoder).
FRESH_PREFIXES = (*HEAD_PREFIXES, RECONSTRUCTION)
# Pre-training keys -> the classifier's reconstruction branch (after wrapper prefixes go).
DECODER_RENAMES = {"encoder.norm.": "norm.", "encoder_to_decoder.": "encoder_to_decoder.",
                   "mask_token": "mask_token", "decoder.": "decoder."}
LISTED = 10  # keys named per kind in a mismatch message


class CheckpointMismatchError(UserError, RuntimeError):
    """The checkpoint's keys or shapes do not fit the model."""


# ---------------------------------------------------------------- files and key clean-up


class UntrustedCheckpointError(UserError, ValueError):
    """A checkpoint holds Python objects that unpickling would run; refused unless trusted."""


# Objects besides tensors and plain containers that public VideoMAE (V2) checkpoints pickle:
# its `save_model` stores the run's argparse arguments under "args".
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace]
TRUST_FLAG = "--trust-checkpoint (or finetune.trust_checkpoint: true in the config)"


def load_checkpoint_file(path: str | Path, trust: bool = False) -> dict:
    """`torch.load` on the CPU with PyTorch's weights-only unpickler: tensors, containers,
    numbers, strings and `CHECKPOINT_SAFE_GLOBALS`, nothing that can run code. Anything else is
    refused in one sentence, unless `trust` (the user vouches for the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the exported weights of the previous stage "
            f"(e.g. <output_dir>/export.pth, checkpoint-N.pth or mp_rank_00_model_states.pt)")
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    return safe_load(path)


def safe_load(path: Path, extra_globals: list = (), mmap: bool = False):
    """`torch.load(weights_only=True)` with the allow-list; `mmap` maps tensors instead of reading
    them (a cheap check of a zip-format file before any rank starts)."""
    try:
        with torch.serialization.safe_globals([*CHECKPOINT_SAFE_GLOBALS, *extra_globals]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        objects = ", ".join(sorted(set(re.findall(r"(?:GLOBAL|global) ([\w.]+)", str(e))))) or "unknown objects"
        raise UntrustedCheckpointError(
            f"{path} holds Python objects that loading would execute ({objects}), not only weights; it was "
            f"refused because such a file can run code on this machine; if you trust where it came from, "
            f"pass {TRUST_FLAG}") from None


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    stripped = True
    while stripped:  # prefixes stack: "module._orig_mod.encoder..."
        stripped = False
        for p in prefixes:
            if key.startswith(p):
                key, stripped = key[len(p):], True
    return key


def clean_state_dict(ckpt: Mapping, for_classifier: bool = False) -> dict[str, torch.Tensor]:
    """The state dict inside `ckpt` (under `model` or `module`, or `ckpt` itself) with
    `_orig_mod.`, `module.` and `backbone.` prefixes stripped. With `for_classifier`, a
    pre-training checkpoint's `encoder.` prefix goes too and its decoder-side keys are dropped."""
    sd = ckpt
    for key in ("model", "module"):
        if isinstance(ckpt.get(key), Mapping):
            sd = ckpt[key]
            break
    if not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"no state dict in this checkpoint (top-level keys: {', '.join(list(ckpt)[:LISTED])}); "
                         f"expected one under 'model' or 'module', or a bare name -> tensor mapping")
    out = {}
    for k, v in sd.items():
        k = _strip(k, WRAPPER_PREFIXES)
        if for_classifier:
            if k.startswith(PRETRAIN_ONLY):
                continue
            k = _strip(k, ("encoder.",))
        out[k] = v
    return out


# ---------------------------------------------------------------- positions


def infer_grid(n: int, like: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid of an n-token table, for a model whose grid is `like` = (T', H', W').

    Assumes a square frame. Tries the same number of temporal slots first (what the public
    code assumes), then the same frame size."""
    t, h, w = like
    if n % t == 0:
        s = round((n // t) ** 0.5)
        if s * s * t == n:
            return t, s, s
    if n % (h * w) == 0:
        return n // (h * w), h, w
    raise CheckpointMismatchError(f"cannot tell the token grid of a {n}-token position table for a model with grid "
                                  f"{like}; pass source_grid=(T', H', W') explicitly")


def interpolate_positions(pos_embed: torch.Tensor, src_grid: tuple[int, int, int],
                          dst_grid: tuple[int, int, int]) -> torch.Tensor:
    """Resize a (1, T*H*W, C) table in (t, h, w) token order to another grid.

    As the public VideoMAE V2 code: bicubic over each temporal slot's H x W map, then linear
    along time (align_corners=False both), so an unchanged frame count is exactly its
    bicubic-only path. Computed in float32, returned in the input's dtype."""
    (t, h, w), (t2, h2, w2) = src_grid, dst_grid
    _, n, c = pos_embed.shape
    if n != t * h * w:
        raise CheckpointMismatchError(f"position table has {n} tokens, not {t}x{h}x{w} = {t * h * w}")
    x = pos_embed.float().reshape(t, h, w, c)
    if (h, w) != (h2, w2):
        x = x.permute(0, 3, 1, 2)  # (T, C, H, W)
        x = F.interpolate(x, size=(h2, w2), mode="bicubic", align_corners=False)
        x = x.permute(0, 2, 3, 1)  # (T, H2, W2, C)
    if t != t2:
        x = x.permute(1, 2, 3, 0).reshape(1, h2 * w2 * c, t)  # (1, H2*W2*C, T)
        x = F.interpolate(x, size=t2, mode="linear", align_corners=False)
        x = x.reshape(h2, w2, c, t2).permute(3, 0, 1, 2)  # (T2, H2, W2, C)
    return x.reshape(1, t2 * h2 * w2, c).to(pos_embed.dtype)


def position_table_for(num_frames: int, image_size: int, size: ViTSize,
                       source: tuple[int, int] | None = None) -> torch.Tensor:
    """Our fixed table for a clip shape: (1, N, width).

    `source=(frames, image_size)` of pre-training reproduces the public fine-tuning code,
    which does not rebuild the table for a new shape but interpolates the pre-training one;
    install it with `model.pos_embed = position_table_for(...)` (a buffer, so not saved)."""
    grid = num_tokens(size, num_frames, image_size)
    if source is None:
        return sincos_position_table(grid[0] * grid[1] * grid[2], size.width)
    src = num_tokens(size, *source)
    return interpolate_positions(sincos_position_table(src[0] * src[1] * src[2], size.width), src, grid)


def _is_fixed_table(pos: torch.Tensor) -> bool:
    table = sincos_position_table(pos.shape[1], pos.shape[2])
    atol = 1e-5 if pos.dtype in (torch.float32, torch.float64) else 1e-2  # half types round
    return torch.allclose(pos.float(), table, atol=atol)


# ---------------------------------------------------------------- classifier weights


def adapt_head(sd: dict, from_classes: int = NUM_K710, to_classes: int = 400) -> dict:
    """Keep the rows of a K710 head that are the K400/K600/K700 classes, in that dataset's order."""
    if from_classes != NUM_K710:
        raise ValueError(f"only a {NUM_K710}-way Kinetics head can be narrowed, got from_classes={from_classes}")
    if "head.weight" not in sd:
        raise CheckpointMismatchError("the checkpoint has no head.weight to adapt; load it as an encoder instead")
    out = dict(sd)
    out["head.weight"], bias = head_710_to(to_classes, sd["head.weight"], sd.get("head.bias"))
    if bias is not None:
        out["head.bias"] = bias
    return out


def _split_qkv_bias(sd: dict) -> dict:
    out = dict(sd)
    for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
        base = k[: -len("qkv.bias")]
        if base + "q_bias" in sd or base + "v_bias" in sd:
            raise CheckpointMismatchError(f"{k} and {base}q_bias/v_bias both present; the checkpoint is inconsistent")
        q, _, v = out.pop(k).chunk(3)  # the key bias cancels in the softmax: dropped, exactly
        out[base + "q_bias"], out[base + "v_bias"] = q.clone(), v.clone()
    return out


def reconstruction_weights(ckpt: Mapping) -> dict[str, torch.Tensor]:
    """The `reconstruction.*` state of a classifier from a checkpoint: a pre-training model's
    final encoder norm and decoder (renamed), or a fine-tune export's own branch; {} if none."""
    sd = clean_state_dict(ckpt)
    own = {k: v for k, v in sd.items() if k.startswith(RECONSTRUCTION)}
    if own:
        return own
    out = {}
    for k, v in sd.items():
        for old, new in DECODER_RENAMES.items():
            if k.startswith(old):
                out[RECONSTRUCTION + new + k[len(old):]] = v
    return out if any(".decoder." in k for k in out) else {}  # an encoder norm alone is no branch


def _head_fits(sd: dict, model) -> bool:
    """Same head type and width as `model` (the class count is handled separately)."""
    expected = {k: _shape(v) for k, v in model.state_dict(keep_vars=True).items() if k.startswith(HEAD_PREFIXES)}
    given = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(HEAD_PREFIXES)}
    if set(given) != set(expected):
        return False
    return all(given[k][-1] == expected[k][-1] for k in given if k != "head.bias")


def encoder_weights_for_classifier(ckpt: Mapping, model, learned_pos: str = "error",
                                   source_grid: tuple[int, int, int] | None = None) -> dict:
    """A state dict for `model` (a VideoClassifier) from a pre-training, post-pre-training or
    fine-tune checkpoint, raw or cleaned. See the module docstring for each rule."""
    sd = clean_state_dict(ckpt, for_classifier=True)
    sd = {k: v for k, v in sd.items() if not k.startswith(RECONSTRUCTION)}
    if getattr(model, "reconstruction", None) is not None:
        sd.update(reconstruction_weights(ckpt))
    # fc_norm starts fresh; a probe's head (scaling/models/probe_heads.py) fits no classifier.
    sd = {k: v for k, v in sd.items() if not k.startswith(("norm.", "probe_head."))}
    sd = _split_qkv_bias(sd)
    pos = sd.pop("pos_embed", None)
    if pos is not None and not _is_fixed_table(pos):
        if learned_pos != "drop":
            grid = source_grid or infer_grid(pos.shape[1], model.grid)
            raise CheckpointMismatchError(
                f"the checkpoint holds learned positions (pos_embed {tuple(pos.shape)}, grid {grid}) but this model "
                f"uses the fixed sine-cosine table; pass learned_pos='drop' to fine-tune without them, or convert the "
                f"table with interpolate_positions(pos, {grid}, {model.grid}) for a model that learns positions")
    if any(k.startswith(HEAD_PREFIXES) for k in sd) and not _head_fits(sd, model):
        sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}  # another head type: fresh
    w = sd.get("head.weight")
    if w is not None and w.shape[0] != model.num_classes:
        if w.shape[0] == NUM_K710 and model.num_classes in (400, 600, 700):
            sd = adapt_head(sd, NUM_K710, model.num_classes)
        else:  # a new label space: the head starts from its init, as in the public code
            sd.pop("head.weight")
            sd.pop("head.bias", None)
    return sd


# ---------------------------------------------------------------- loading


def _shape(t) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))  # ZeRO-3 partitioned params keep it in ds_shape


def _listing(keys: list[str]) -> str:
    more = f", ... (+{len(keys) - LISTED})" if len(keys) > LISTED else ""
    return ", ".join(keys[:LISTED]) + more


def check_fit(model: nn.Module, sd: Mapping, strict: bool = True, allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Raise CheckpointMismatchError unless `sd` fits `model`; returns the model keys `sd` lacks.

    Shape mismatches always fail; with `strict`, so do unexpected keys and missing keys that do
    not start with one of `allow_missing`. Reads shapes through `ds_shape`, so it also works on a
    ZeRO-3 partitioned model."""
    expected = {k: _shape(v) for k, v in model.state_dict(keep_vars=True).items()}
    missing = [k for k in expected if k not in sd]
    bad_missing = [k for k in missing if not k.startswith(allow_missing)] if strict else []
    unexpected = [k for k in sd if k not in expected] if strict else []
    shapes = [f"{k} {tuple(sd[k].shape)} vs {expected[k]}" for k in sd
              if k in expected and tuple(sd[k].shape) != expected[k]]
    if bad_missing or unexpected or shapes:
        parts = []
        if bad_missing:
            parts.append(f"{len(bad_missing)} missing keys ({_listing(bad_missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, checkpoint vs model ({_listing(shapes)})")
        raise CheckpointMismatchError(
            f"the checkpoint does not fit {type(model).__name__}: {'; '.join(parts)}. Check that the model size "
            f"(vit_b vs vit_g ...), number of classes and clip shape match the checkpoint's, and load pre-training "
            f"checkpoints with load_pretrained(), which drops the decoder and renames keys; strict=False loads a "
            f"partial state on purpose.")
    return missing


def load_into(model: nn.Module, sd: Mapping, strict: bool = True, allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Load `sd` into `model` after `check_fit`; returns the model's keys the checkpoint did not set."""
    missing = check_fit(model, sd, strict, allow_missing)
    expected = set(model.state_dict().keys())
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    return missing


def load_pretrained(model: nn.Module, ckpt: Mapping, learned_pos: str = "error") -> list[str]:
    """Stage hand-off into a VideoClassifier: pre-training (encoder), K710 post-pre-training or
    fine-tune checkpoints. Only the head (`fc_norm`, `head`, `bridge`) and the reconstruction
    branch may be absent (a pre-training checkpoint has no head, a new label space or head
    type drops it, a classifier export has no decoder); returns the keys left at their init."""
    sd = encoder_weights_for_classifier(ckpt, model, learned_pos=learned_pos)
    return load_into(model, sd, strict=True, allow_missing=FRESH_PREFIXES)
