"""Checkpoints through DeepSpeed: save with run state, auto-resume, prune, export fp32 weights.

Crash safety comes from DeepSpeed's own order of writes: every rank writes its shard into
`<dir>/<tag>/`, and only then is `<dir>/latest` rewritten to name the new tag. A kill during
a save leaves `latest` pointing at the previous complete checkpoint.

A checkpoint written by a different number of ranks (a requeued job that came back on fewer
or more nodes) is converted once, on rank 0, to DeepSpeed's universal format
(`<tag>_universal/`, named by `latest_universal`) and loaded from there.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LATEST = "latest"
TAG = re.compile(r"step\d{8}")
UNIVERSAL = "_universal"


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
    tags = sorted(p.name for p in Path(ckpt_dir).iterdir() if p.is_dir() and TAG.fullmatch(p.name))
    for name in tags[:-keep]:
        if name != current:
            shutil.rmtree(Path(ckpt_dir) / name, ignore_errors=True)
            shutil.rmtree(Path(ckpt_dir) / (name + UNIVERSAL), ignore_errors=True)


def ranks_that_wrote(ckpt_dir: str | Path, tag: str) -> int:
    """How many data-parallel ranks wrote a ZeRO checkpoint: one optimizer shard file each."""
    return len(list((Path(ckpt_dir) / tag).glob("*zero_pp_rank_*_optim_states.pt")))


def prepare_universal(ckpt_dir: str | Path, world: int, rank: int) -> bool:
    """True if the latest checkpoint was written by another rank count and must be loaded as a
    universal checkpoint (set `checkpoint.load_universal` in the DeepSpeed config before
    `deepspeed.initialize`). Rank 0 converts it once with DeepSpeed's `ds_to_universal`."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return False
    wrote = ranks_that_wrote(ckpt_dir, tag)
    if wrote in (0, world):
        return False
    universal = Path(ckpt_dir) / (tag + UNIVERSAL)
    if rank == 0:
        print(f"[scaling] checkpoint {tag} was written by {wrote} ranks, this run has {world}: "
              f"resuming through a universal checkpoint ({universal})", flush=True)
        if not (universal / "zero" / "optimizer_state.pt").is_file():
            convert_to_universal(Path(ckpt_dir) / tag, universal)
        (Path(ckpt_dir) / "latest_universal").write_text(universal.name)  # what load_checkpoint reads
    if dist.is_initialized():
        dist.barrier()
    return True


def convert_to_universal(tag_dir: Path, out: Path) -> None:
    """DeepSpeed's converter in a child process (it starts worker pools of its own); a partial
    output from an interrupted conversion is removed first."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed; resume with the rank count that "
                           f"wrote it ({ranks_that_wrote(tag_dir.parent, tag_dir.name)}). DeepSpeed said:\n{done.stderr[-2000:]}")


def resume(engine, ckpt_dir: str | Path) -> dict | None:
    """Load the checkpoint `latest` names into the engine; returns its client state or None."""
    if latest_tag(ckpt_dir) is None:
        return None
    # DeepSpeed's universal load gives every param group the checkpoint's first group's
    # hyperparameters (weight decay, betas, ...); the groups as built for this run are kept.
    built = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(f"checkpoint in {ckpt_dir} could not be loaded; move the directory away to start fresh")
    if engine.load_universal_checkpoint():
        for group, hyper in zip(engine.optimizer.param_groups, built):
            group.update(hyper)
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
