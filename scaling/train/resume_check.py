"""A resumed run keeps its meaning: refuse to resume a folder whose run had another config.

The config a run started with is `<output_dir>/config.yaml` (rank 0 writes it at every start).
When checkpoints exist and a key that changes the experiment differs (model, masking, data,
optimizer, schedule, ...), the run stops before any rank starts, naming the keys; `--fresh`
moves the old folder aside to `<dir>.replaced-<time>` and starts afresh, `--allow-changed`
resumes anyway (the old config is kept as `config.before-<time>.yaml`). Keys that only say how
long, how often, where or on how many ranks (MAY_CHANGE) change freely. Pipelines do this per
stage themselves (scaling/pipeline/), so their stage runs do not come through here.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from scaling.config import ConfigError, RunConfig, to_dict
from scaling.tracking import flatten

MAY_CHANGE = ("train.steps", "train.epochs", "train.max_steps_this_run", "train.log_every", "train.save_every",
              "train.keep_checkpoints", "train.ranks", "train.output_dir", "train.ds_config",
              "train.max_nonfinite_steps", "data.num_workers", "tracking.")


def changed_keys(cfg: RunConfig, saved: Path) -> list[tuple[str, object, object]]:
    """(key, old, new) for every experiment key that differs from the saved config; a key the
    saved file lacks (written by an older version) counts as its default."""
    plain = lambda d: flatten(json.loads(json.dumps(d)))  # tuples as lists, like YAML reads them back
    old = {**plain(to_dict(RunConfig())), **flatten(yaml.safe_load(saved.read_text()) or {})}
    new = plain(to_dict(cfg))
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys
            if old.get(k) != new.get(k) and not k.startswith(MAY_CHANGE)]


def has_checkpoints(out: Path) -> bool:
    return any((out / "checkpoints").glob("step*"))


def move_aside(out: Path) -> Path:
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    while aside.exists():
        aside = aside.with_name(aside.name + "+")
    out.rename(aside)
    return aside


def check_resume(cfg: RunConfig, fresh: bool, allow_changed: bool, quiet: bool = False) -> None:
    """Before launch: refuse a resume that would change the experiment (see the module text)."""
    from scaling.train.run_lock import lock_run_folder, unlock_run_folder

    out = Path(cfg.train.output_dir)
    if fresh:
        if out.is_dir() and any(p.name != ".run.lock" for p in out.iterdir()):
            lock_run_folder(out)  # never move a folder a live run is writing into
            aside = move_aside(out)
            unlock_run_folder(out)
            print(f"[scaling] --fresh: the previous run's folder is now {aside}", flush=True)
        return
    saved = out / "config.yaml"
    if not saved.is_file() or not has_checkpoints(out):
        return
    changed = changed_keys(cfg, saved)
    if not changed:
        return
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed[:8]) + (" ..." if len(changed) > 8 else "")
    if allow_changed and quiet:
        return
    if allow_changed:
        shutil.copy(saved, out / f"config.before-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        print(f"[scaling] --allow-changed: resuming {out} with a changed config ({listed})", flush=True)
        return
    raise ConfigError(f"{out} holds a run started with another config ({listed}); resuming would mix two experiments: "
                      "add --fresh to start afresh (the old folder is moved aside) or --allow-changed to resume anyway")
