"""Checkpoints through DeepSpeed: save with run state, auto-resume, prune, export fp32 weights.

Crash safety comes from DeepSpeed's own order of writes: every rank writes its shard into
`<dir>/<tag>/`, and only then is `<dir>/latest` rewritten to name the new tag. A kill during
a save leaves `latest` pointing at the previous complete checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    f = Path(ckpt_dir) / LATEST
    return f.read_text().strip() if f.is_file() else None


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep: int) -> str:
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    if dist.is_initialized():
        dist.barrier()  # every rank has written its shard before old tags go
    if engine.global_rank == 0:
        prune(ckpt_dir, keep)
    return tag


def prune(ckpt_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` tags, never the one `latest` names."""
    if keep <= 0:
        return
    current = latest_tag(ckpt_dir)
    tags = sorted(p.name for p in Path(ckpt_dir).glob("step*") if p.is_dir())
    for name in tags[:-keep]:
        if name != current:
            shutil.rmtree(Path(ckpt_dir) / name, ignore_errors=True)


def resume(engine, ckpt_dir: str | Path) -> dict | None:
    """Load the checkpoint `latest` names into the engine; returns its client state or None."""
    if latest_tag(ckpt_dir) is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(f"checkpoint in {ckpt_dir} could not be loaded; move the directory away to start fresh")
    return client_state


def export_fp32(ckpt_dir: str | Path, out_path: str | Path, tag: str | None = None, extra: dict | None = None) -> Path:
    """Consolidate a ZeRO checkpoint into one fp32 state dict with DeepSpeed's own tool.

    Saved as `{"model": state_dict, **extra}` like the public VideoMAE checkpoints, so
    `model.load_state_dict(torch.load(out)["model"], strict=True)` works on a plain model.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no '{LATEST}' file); train first or pass --tag")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save({"model": state, "tag": tag, **(extra or {})}, tmp)
    tmp.replace(out)  # atomic: a kill never leaves a half-written export under the final name
    return out
