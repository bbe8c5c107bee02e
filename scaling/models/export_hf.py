"""Our exported weights in the formats the ecosystem reads: safetensors, and a Hugging Face
`transformers` VideoMAE folder (`config.json` + `model.safetensors`).

    write_safetensors(export, "out/model.safetensors")      # + out/model.json (model config)
    write_hf_folder(export, "out/hf")                       # VideoMAEModel / ...ForVideoClassification

`export` is what `scaling export` writes: `{"model": state_dict, "config": run config, ...}`.
A classifier with the linear head becomes `VideoMAEForVideoClassification` (mean pooling,
`fc_norm`, `classifier`); a pre-training model's encoder becomes `VideoMAEModel` with its final
LayerNorm as `layernorm` (the decoder is not exported: transformers' pre-training model is not
what people load for features). MAR's bridging head has no transformers counterpart and is refused.

Layout facts the mapping relies on (transformers' `modeling_videomae`):
- attention: separate `query`/`key`/`value` Linears without bias plus `q_bias`/`v_bias`
  parameters (transformers 4.x names; 5.x renames them to `query.bias`/`value.bias` on load,
  so one folder loads in both), `config.qkv_bias: true`;
- the position table is the same fixed sine-cosine table, built by transformers itself, so no
  checkpoint carries it (as ours);
- `layer_norm_eps` applies to every block's norms and `layernorm`; `fc_norm` is built with
  PyTorch's default eps 1e-5 whatever the config says (ours: 1e-6). That is the one
  difference between the two models' outputs (tests/integration/test_export_hf.py measures it).
This module knows nothing of DeepSpeed or MLflow (DESIGN rule 1).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from scaling.errors import UserError
from scaling.models.vit import ViTSize, get_size

# Our block-relative module names -> transformers' under `encoder.layer.<i>.` (each with
# .weight and .bias); qkv is split apart and the two bias vectors are mapped on their own.
BLOCK_MODULES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


class ExportFormatError(UserError, ValueError):
    """A model that the asked format cannot represent; the message says why and what to do."""


def model_kind(state: dict[str, torch.Tensor]) -> str:
    """'classifier' (linear head), 'pretrain' (encoder + decoder); refuses what cannot map."""
    if any(k.startswith("bridge.") for k in state):
        raise ExportFormatError("this classifier has MAR's bridging head, which transformers' VideoMAE has no "
                                "counterpart for; export it as .pt or safetensors instead (--format pt|safetensors)")
    if "head.weight" in state:
        return "classifier"
    if any(k.startswith("encoder.blocks.") for k in state):
        return "pretrain"
    raise ExportFormatError("the weights are neither a classifier (head.weight) nor a pre-training model "
                            "(encoder.blocks.*); pass an export written by `scaling export`")


def model_shape(export: dict) -> tuple[str, ViTSize, int, int]:
    """(size name, size, frames, input size) from the run config an export carries."""
    model = (export.get("config") or {}).get("model")
    if not model:
        raise ExportFormatError("the export carries no run config (key 'config'), so its model size is unknown; "
                                "re-export it with `scaling export <run folder>`, which stores the run's config.yaml")
    return model["name"], get_size(model["name"]), model["num_frames"], model["input_size"]


def hf_config(size: ViTSize, num_frames: int, input_size: int, kind: str, num_classes: int = 0,
              class_names: list[str] | None = None) -> dict:
    """transformers' VideoMAEConfig for our size, as a plain dict (config.json)."""
    config = {
        "model_type": "videomae",
        "architectures": ["VideoMAEForVideoClassification" if kind == "classifier" else "VideoMAEModel"],
        "image_size": input_size, "patch_size": size.patch, "num_channels": 3, "num_frames": num_frames,
        "tubelet_size": size.tubelet, "hidden_size": size.width, "num_hidden_layers": size.depth,
        "num_attention_heads": size.heads, "intermediate_size": size.mlp_hidden, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": 1e-6, "qkv_bias": True,
        # Classifier: mean pool -> fc_norm -> classifier. Encoder: the final LayerNorm on every token.
        "use_mean_pooling": kind == "classifier", "torch_dtype": "float32",
    }
    if kind == "classifier":
        names = class_names or [f"class_{i}" for i in range(num_classes)]
        config["id2label"] = {str(i): n for i, n in enumerate(names)}
        config["label2id"] = {n: i for i, n in enumerate(names)}
    return config


def to_hf_state_dict(state: dict[str, torch.Tensor], size: ViTSize, kind: str) -> dict[str, torch.Tensor]:
    """Our keys -> transformers' keys. Classifier keys carry the `videomae.` base-model prefix
    (VideoMAEForVideoClassification); an encoder's are the base model's own (VideoMAEModel)."""
    src = "encoder." if kind == "pretrain" else ""
    dst = "videomae." if kind == "classifier" else ""
    out: dict[str, torch.Tensor] = {}
    for suffix in ("weight", "bias"):
        out[f"{dst}embeddings.patch_embeddings.projection.{suffix}"] = state[f"{src}patch_embed.proj.{suffix}"]
    for i in range(size.depth):
        ours, theirs = f"{src}blocks.{i}.", f"{dst}encoder.layer.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].chunk(3, dim=0)  # (3C, C) -> 3 x (C, C)
        for name, w in zip(("query", "key", "value"), (q, k, v)):
            out[f"{theirs}attention.attention.{name}.weight"] = w
        for bias in ("q_bias", "v_bias"):
            out[f"{theirs}attention.attention.{bias}"] = state[f"{ours}attn.{bias}"]
        for a, b in BLOCK_MODULES.items():
            for suffix in ("weight", "bias"):
                out[f"{theirs}{b}.{suffix}"] = state[f"{ours}{a}.{suffix}"]
    if kind == "classifier":
        for suffix in ("weight", "bias"):
            out[f"fc_norm.{suffix}"] = state[f"fc_norm.{suffix}"]
            out[f"classifier.{suffix}"] = state[f"head.{suffix}"]
    else:
        for suffix in ("weight", "bias"):
            out[f"layernorm.{suffix}"] = state[f"encoder.norm.{suffix}"]
    # safetensors refuses tensors that share storage (the qkv chunks are views of one weight).
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def write_hf_folder(export: dict, out_dir: str | Path, class_names: list[str] | None = None) -> Path:
    """A folder `transformers.VideoMAE*.from_pretrained(out_dir)` loads: config.json + model.safetensors."""
    from safetensors.torch import save_file

    state = export["model"]
    kind = model_kind(state)
    name, size, frames, input_size = model_shape(export)
    num_classes = state["head.weight"].shape[0] if kind == "classifier" else 0
    if class_names is not None and len(class_names) != num_classes:
        raise ExportFormatError(f"{len(class_names)} class names were given for a {num_classes}-way head; "
                                "pass the class list the model was trained on")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(size, frames, input_size, kind, num_classes, class_names)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(to_hf_state_dict(state, size, kind), str(out / "model.safetensors"), metadata={"format": "pt", "scaling_model": name})
    return out


def write_safetensors(export: dict, path: str | Path) -> Path:
    """Our own key layout as safetensors (no pickle: safe to load from anywhere), with the
    run config beside it as `<stem>.json` so the model can be rebuilt."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in export["model"].items()}
    save_file(state, str(path), metadata={"format": "pt", "tag": str(export.get("tag", ""))})
    meta = {"config": export.get("config"), "tag": export.get("tag"), "stage": export.get("stage")}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path
