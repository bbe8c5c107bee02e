"""Checkpoints through DeepSpeed: save with run state, resume from the newest good one, prune, export fp32 weights.

A save is complete when every rank has written its files into `<dir>/<tag>/` and rank 0 has
then written `<tag>/manifest.json` (each file and its size, the number of ranks that wrote
them, the step's loss); only after that is `<dir>/latest` rewritten. Resume does not trust
`latest` alone: it scans the tags newest first and takes the first one whose manifest matches
the files on disk and whose files pass their zip checksums (torch.save writes a CRC-32 per
entry), saying in one sentence why it passed over any newer one. Tags newer than the one
resumed from are moved into `<dir>/set_aside-<time>/`, so the resumed run never writes over
them. A tag without a manifest (written before manifests existed) counts only when `latest`
names it, which DeepSpeed wrote after every rank had finished.

A checkpoint written by a different number of ranks (a requeued job that came back on fewer
or more nodes; the manifest says how many) is converted once, on rank 0, to DeepSpeed's
universal format (`<tag>_universal/`, named by `latest_universal`) and loaded from there.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from scaling.errors import UserError

LATEST = "latest"
MANIFEST = "manifest.json"
TAG = re.compile(r"step\d{8}")
UNIVERSAL = "_universal"
FAILED_FILE = "FAILED"  # one sentence: why the last run of this folder ended with an error


class RunFailed(RuntimeError):
    """The run cannot go on (a save that failed, a divergence); the message is one sentence."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(tag[4:])


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag `latest` names when that is a readable tag name of an existing folder, else the
    newest tag with a manifest (a `latest` lost or overwritten with garbage does not hide them)."""
    f = Path(ckpt_dir) / LATEST
    try:
        name = f.read_text().strip() if f.is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    if TAG.fullmatch(name) and (Path(ckpt_dir) / name).is_dir():
        return name
    with_manifest = [t for t in tags_in(ckpt_dir) if read_manifest(Path(ckpt_dir) / t)]
    return with_manifest[-1] if with_manifest else None


def tags_in(ckpt_dir: str | Path) -> list[str]:
    """Tag folders, oldest first."""
    d = Path(ckpt_dir)
    return sorted(p.name for p in d.iterdir() if p.is_dir() and TAG.fullmatch(p.name)) if d.is_dir() else []


def read_manifest(tag_dir: Path) -> dict | None:
    try:
        return json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_manifest(tag_dir: Path, world: int, step: int, loss: float | None) -> None:
    """Rank 0, once every rank has written: what a complete copy of this tag looks like."""
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    manifest = {"step": step, "world": world, "loss": loss, "files": files}
    write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep: int, loss: float | None = None) -> str:
    """Every rank writes its files, then rank 0 the manifest, then `latest`; then old tags go.

    An OS error on any rank (disk full, read-only folder) ends the run with one sentence; the
    half-written tag is removed and the previous checkpoint stays what `latest` names."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    previous = latest_tag(ckpt_dir)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except Exception as e:  # noqa: BLE001 - every failure of a save is reported the same way
        save_failed(ckpt_dir, tag, step, previous, e, world=dist.get_world_size() if dist.is_initialized() else 1)
    # DeepSpeed's save ends with a barrier: every rank's files are on disk here.
    if engine.global_rank == 0:
        write_manifest(ckpt_dir / tag, dist.get_world_size() if dist.is_initialized() else 1, step, loss)
        write_atomic(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep)
    if dist.is_initialized():
        dist.barrier()
    return tag


def save_failed(ckpt_dir: Path, tag: str, step: int, previous: str | None, error: BaseException, world: int):
    """Say what went wrong in one sentence and end this rank. With several ranks the rank ends
    at once (os._exit): the others wait in DeepSpeed's collectives, and the launcher stops
    them when this one is gone."""
    shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # frees the space a full disk needs for what follows
    intact = f"the previous checkpoint step {step_of(previous)} is intact" if previous else "there is no earlier checkpoint"
    message = f"{describe_os_error(error, ckpt_dir)} while saving step {step}; {intact}"
    out_dir = ckpt_dir.parent
    record_failure(out_dir, message)
    if world > 1:
        print(f"[scaling] error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_FAILED)
    raise RunFailed(message) from error


EXIT_FAILED = 3  # the run ended with an error it explained in <output_dir>/FAILED


def record_failure(out_dir: Path, message: str) -> None:
    try:
        write_atomic(Path(out_dir) / FAILED_FILE, message)
    except OSError:
        pass  # the sentence is on stderr too


def describe_os_error(error: BaseException, path: Path) -> str:
    """"no space left on <mount> (<device>)" and the like, from the errno anywhere on the
    exception chain; torch.save's C++ writer loses the errno ("unexpected pos ... basic_ios"),
    so a full file system is also recognised by its free space."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            if e.errno == errno.ENOSPC:
                return f"no space left on {device_of(path)}"
            return f"{os.strerror(e.errno).lower()} ({e.filename or path})"
        e = e.__cause__ or e.__context__
    try:
        st = os.statvfs(path)
        if st.f_bavail * st.f_frsize < 1 << 20:
            return f"no space left on {device_of(path)}"
    except OSError:
        pass
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else 'unknown error'}"


def device_of(path: Path) -> str:
    """The mount point holding `path`, with its device as /proc/mounts names it."""
    p = Path(path).resolve()
    while not os.path.ismount(p):
        p = p.parent
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount = line.split()[:2]
            if mount == str(p):
                return f"{p} ({dev})"
    except OSError:
        pass
    return str(p)


def prune(ckpt_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` tags, never the one `latest` names, and never the newest
    one saved at a finite loss (the one to go back to after a divergence)."""
    if keep <= 0:
        return
    keep_too = {latest_tag(ckpt_dir), last_finite(ckpt_dir)}
    for name in tags_in(ckpt_dir)[:-keep]:
        if name not in keep_too:
            shutil.rmtree(Path(ckpt_dir) / name, ignore_errors=True)
            shutil.rmtree(Path(ckpt_dir) / (name + UNIVERSAL), ignore_errors=True)


def last_finite(ckpt_dir: str | Path) -> str | None:
    for name in reversed(tags_in(ckpt_dir)):
        m = read_manifest(Path(ckpt_dir) / name)
        if m and m.get("loss") is not None and math.isfinite(m["loss"]):
            return name
    return None


def ranks_that_wrote(ckpt_dir: str | Path, tag: str) -> int:
    """How many ranks wrote a checkpoint: its manifest says; an older tag without one is
    counted by its optimizer shard files (one per data-parallel rank)."""
    manifest = read_manifest(Path(ckpt_dir) / tag)
    if manifest:
        return int(manifest["world"])
    return len(list((Path(ckpt_dir) / tag).glob("*zero_pp_rank_*_optim_states.pt")))


def incomplete(ckpt_dir: Path, tag: str, named_by_latest: bool) -> str | None:
    """Why a tag cannot be resumed from, as a phrase naming the file; None when its files are
    all there at the sizes written. Cheap: a stat per file."""
    tag_dir = ckpt_dir / tag
    manifest = read_manifest(tag_dir)
    if manifest is None:
        if named_by_latest and any(tag_dir.glob("*model_states.pt")):
            return None  # written before manifests existed
        return f"{tag_dir / MANIFEST} is missing (the save did not finish)"
    for name, size in manifest["files"].items():
        f = tag_dir / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes where {size} were written"
    return None


def unreadable(path: Path) -> str | None:
    """Why a file of a checkpoint would not load (torch.save writes a zip with a CRC-32 per
    entry, so overwritten bytes show without unpickling anything), else None."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return f"{path} is corrupt (entry {bad} fails its checksum)" if bad else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"{path} is not a readable checkpoint file ({e})"


def first_unreadable(ckpt_dir: Path, tag: str, rank: int, world: int) -> str | None:
    """The ranks share the reading: rank r checks every world-th file; all get the first problem."""
    files = sorted(p for p in (ckpt_dir / tag).rglob("*.pt") if p.is_file())
    mine = [problem for f in files[rank::world] if (problem := unreadable(f))]
    if not (dist.is_initialized() and world > 1):
        return mine[0] if mine else None
    everyone = [None] * world
    dist.all_gather_object(everyone, mine[0] if mine else None)
    return next((p for p in everyone if p), None)


def choose_resume_tag(ckpt_dir: str | Path, rank: int, world: int) -> str | None:
    """The newest tag every rank can load (call on every rank, after the process group is up).

    Rank 0 says why it passed over any newer tag, moves those aside, and points `latest` at
    the chosen one."""
    ckpt_dir = Path(ckpt_dir)
    tags = tags_in(ckpt_dir)
    if not tags:
        return None
    latest_file = ckpt_dir / LATEST
    try:
        named = latest_file.read_text().strip() if latest_file.is_file() else ""
    except (OSError, UnicodeDecodeError):
        named = ""
    chosen, passed_over = None, []
    for tag in reversed(tags):
        problem = incomplete(ckpt_dir, tag, named_by_latest=tag == named) or first_unreadable(ckpt_dir, tag, rank, world)
        if problem is None:
            chosen = tag
            break
        passed_over.append(tag)
        if rank == 0:
            print(f"[scaling] checkpoint {tag} cannot be resumed from: {problem}; trying the one before it", flush=True)
    if rank == 0:
        if named != chosen and chosen is not None and not passed_over:
            what = (f"names {named}" if TAG.fullmatch(named) else "is unreadable") if latest_file.exists() else "is missing"
            print(f"[scaling] {latest_file} {what}; resuming from the newest complete checkpoint, {chosen}", flush=True)
        if passed_over:
            set_aside(ckpt_dir, passed_over)
        if chosen is None:
            latest_file.unlink(missing_ok=True)
        elif named != chosen:
            write_atomic(latest_file, chosen)
    if dist.is_initialized():
        dist.barrier()
    return chosen


def set_aside(ckpt_dir: Path, tags: list[str]) -> Path:
    """Move tags (and their universal copies) into set_aside-<time>/: kept for a look, never overwritten."""
    aside = ckpt_dir / f"set_aside-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for tag in tags:
        for name in (tag, tag + UNIVERSAL):
            if (ckpt_dir / name).exists():
                (ckpt_dir / name).rename(aside / name)
    print(f"[scaling] moved {', '.join(tags)} to {aside}; this run continues from an earlier step and never writes over them", flush=True)
    return aside


def prepare_universal(ckpt_dir: str | Path, tag: str | None, world: int, rank: int) -> bool:
    """True if checkpoint `tag` was written by another rank count and must be loaded as a
    universal checkpoint (set `checkpoint.load_universal` in the DeepSpeed config before
    `deepspeed.initialize`). Rank 0 converts it once with DeepSpeed's `ds_to_universal`."""
    if tag is None:
        return False
    wrote = ranks_that_wrote(ckpt_dir, tag)
    if wrote in (0, world):
        return False
    refuse_nvme_reshard(Path(ckpt_dir) / tag, wrote, world)
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
    # --inject_missing_state: ZeRO-1/2 checkpoints of a plain module carry no `universal_checkpoint_info`
    # (only ZeRO-3's conversion does without it); DeepSpeed's converter then adds the default one.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed; resume with the rank count that "
                           f"wrote it ({ranks_that_wrote(tag_dir.parent, tag_dir.name)}). DeepSpeed said:\n{done.stderr[-2000:]}")


def resume(engine, ckpt_dir: str | Path, tag: str | None) -> dict | None:
    """Load checkpoint `tag` (from `choose_resume_tag`) into the engine; returns its client state or None."""
    if tag is None:
        return None
    # DeepSpeed's universal load gives every param group the checkpoint's first group's
    # hyperparameters (weight decay, betas, ...); the groups as built for this run are kept.
    built = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    universal = engine.load_universal_checkpoint()
    # A universal load finds its folder through `latest_universal`; a plain one is named.
    if not universal:
        refuse_nvme_placement_change(Path(ckpt_dir) / tag, engine.zero_nvme_offload_optimizer())
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=None if universal else tag)
    if path is None:
        raise RunFailed(f"checkpoint {Path(ckpt_dir) / tag} could not be loaded; move it aside to resume from an earlier one")
    if universal:
        for group, hyper in zip(engine.optimizer.param_groups, built):
            group.update(hyper)
    elif engine.zero_nvme_offload_optimizer():
        restore_nvme_adam_state(engine, ckpt_dir, tag)
    return client_state


def refuse_nvme_reshard(tag_dir: Path, wrote: int, world: int) -> None:
    """A checkpoint whose optimizer state is in per-rank NVMe swap files cannot be converted to
    a universal one (DeepSpeed's converter reads the ZeRO files, where those tensors are empty)."""
    if (tag_dir / "offloaded_tensors").is_dir():
        raise RunFailed(f"checkpoint {tag_dir} keeps its optimizer state in NVMe swap files written by {wrote} ranks, "
                        f"which cannot be re-split for {world}; resume it with {wrote} ranks")


def refuse_nvme_placement_change(tag_dir: Path, nvme_now: bool) -> None:
    """An optimizer saved to NVMe swap files loads only into an NVMe-offloaded one, and back
    (DeepSpeed's load would copy missing swap files, or empty fp32 tensors, and stop with a traceback)."""
    saved_nvme = (tag_dir / "offloaded_tensors").is_dir()
    if saved_nvme != nvme_now:
        was, now = ("nvme", "not nvme") if saved_nvme else ("not nvme", "nvme")
        raise RunFailed(f"checkpoint {tag_dir} was saved with offload_optimizer.device {was} and this run's is {now}; "
                        f"resume it with the DeepSpeed config it was saved with (train.ds_config)")


def restore_nvme_adam_state(engine, ckpt_dir: str | Path, tag: str) -> None:
    """Give a ZeRO-3 optimizer whose states live on NVMe back its Adam step count and moments.

    DeepSpeed's load copies the checkpoint's swap files (fp32 weights, `exp_avg-<id>`,
    `exp_avg_sq-<id>`) into the swap folder but skips the ZeRO optimizer file, so the fresh
    optimizer has no state entries: its swapper reads only the weights back, Adam starts again
    at step 1 with zero moments, and the sub-groups kept in RAM keep their initial weights.
    Loading that file's optimizer state dict restores `step` (and the RAM sub-groups' moments
    and fp32 weights, which it holds in full); the swapped sub-groups' moments were saved
    swapped out (empty), so each gets a placeholder of the partition's size, which the swapper
    registers on the next swap-in and fills from the copied `exp_avg*` files (it re-points them
    at its pinned buffers, so the placeholders are never written).
    """
    zero_optimizer = engine.optimizer
    # As DeepSpeed's own load does: partition every parameter first, and gather the persistent
    # (small, never partitioned at run time) ones again at the end, so they see the restored weights.
    zero_optimizer.checkpoint_event_prologue()
    # The file holds {"optimizer_state_dict": the ZeRO optimizer's state dict, ...}; Adam's own
    # state dict sits under the same key inside that.
    saved = torch.load(engine._get_zero_ckpt_name(str(ckpt_dir), tag), map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]
    # The flat fp32 partitions are the base optimizer's params only while they sit in its groups.
    zero_optimizer._set_fp32_optimizer_param_groups()
    try:
        zero_optimizer.optimizer.load_state_dict(saved["optimizer_state_dict"])
    finally:
        zero_optimizer._clear_fp32_optimizer_param_groups()
    swapper = zero_optimizer.optimizer_swapper
    for i, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat):
        if not zero_optimizer._swappable_optimizer_subgroup(i):
            # Sub-groups too small for async I/O stay in RAM and have no swap file: their fp32
            # weights are in the ZeRO file, and the 16-bit partition is refreshed from them.
            flat.data.copy_(saved["fp32_flat_groups"][i].data)
            zero_optimizer._reassign_or_swap_out_partitioned_parameters(i)
            continue
        info = swapper.swap_params_info[swapper.parameter_id(flat)]
        state = zero_optimizer.optimizer.state.get(flat, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.numel() == 0:
                state[key] = torch.empty(info.numel(), dtype=info.dtype())
    zero_optimizer.checkpoint_event_epilogue()


def export_fp32(ckpt_dir: str | Path, out_path: str | Path, tag: str | None = None, extra: dict | None = None) -> Path:
    """Consolidate a ZeRO checkpoint into one fp32 state dict with DeepSpeed's own tool.

    Saved as `{"model": state_dict, **extra}` like the public VideoMAE checkpoints, so
    `model.load_state_dict(torch.load(out)["model"], strict=True)` works on a plain model.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no '{LATEST}' file); train first or pass --tag")
    if (Path(ckpt_dir) / tag / "offloaded_tensors").is_dir():
        state = nvme_fp32_state_dict(Path(ckpt_dir) / tag)
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save({"model": state, "tag": tag, **(extra or {})}, tmp)
    tmp.replace(out)  # atomic: a kill never leaves a half-written export under the final name
    return out



class NvmeExportError(UserError, RuntimeError):
    """A checkpoint whose NVMe swap files do not match the layout its ZeRO files describe."""


def nvme_fp32_state_dict(tag_dir: Path) -> dict:
    """Consolidate a ZeRO-3 checkpoint saved with the optimizer offloaded to NVMe.

    DeepSpeed keeps such a run's fp32 master weights only in swap files,
    `<tag>/offloaded_tensors/rank<NN>/<ds_id>.tensor.swp`, one per optimizer sub-group that
    was big enough to swap; in the ZeRO file that sub-group's `fp32_flat_groups` entry is
    empty but keeps its `ds_id`, and DeepSpeed's consolidation stops with a numel traceback.
    Each empty entry is filled from its file (raw fp32, padded to the async-I/O alignment, so
    cut to the sub-group's size), then DeepSpeed's own ZeRO-3 merge runs unchanged.
    """
    from deepspeed.utils import zero_to_fp32 as z

    models = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
    stage, world, groups, _ = z.parse_optim_states(z.get_optim_files(str(tag_dir)), str(tag_dir))
    if stage != 3:
        raise NvmeExportError(f"{tag_dir} holds NVMe swap files but a ZeRO stage {stage} optimizer; export needs stage 3")
    numels = sub_group_numels(models[0].param_shapes, world, sub_group_size_of(tag_dir))
    for rank, flats in enumerate(groups):
        if len(flats) != len(numels):
            raise NvmeExportError(f"{tag_dir}: rank {rank} saved {len(flats)} optimizer sub-groups where its parameters "
                                  f"make {len(numels)}; export the checkpoint with the DeepSpeed version that wrote it")
        for i, (flat, numel) in enumerate(zip(flats, numels)):
            if flat.numel() == 0 and numel:
                flats[i] = read_swap_file(tag_dir / "offloaded_tensors" / f"rank{rank:02d}" / f"{flat.ds_id}.tensor.swp", numel)
    return z.to_torch_tensor(z._get_fp32_state_dict_from_zero3_checkpoint(world, groups, models, False))


def sub_group_size_of(tag_dir: Path) -> int:
    """The run's zero_optimization.sub_group_size (DeepSpeed's default 1e9), from its model-states file."""
    first = sorted(tag_dir.glob("*_model_states.pt"))[0]
    ds_config = torch.load(first, map_location="cpu", weights_only=False).get("ds_config") or {}
    return int(float(ds_config.get("zero_optimization", {}).get("sub_group_size", 1e9)))


def sub_group_numels(param_shapes: list[dict], world: int, sub_group_size: int) -> list[int]:
    """Each optimizer sub-group's numel on one rank, split as DeepSpeed's stage 3 splits them:
    per param group, in order, a sub-group closes once its partitions reach `sub_group_size`."""
    numels = []
    for group in param_shapes:
        total = 0
        for j, shape in enumerate(group.values()):
            total += math.ceil(shape.numel() / world)
            if total >= sub_group_size or j == len(group) - 1:
                numels.append(total)
                total = 0
    return numels


def read_swap_file(path: Path, numel: int) -> torch.Tensor:
    """The first `numel` fp32 values of a swap file (what follows is alignment padding)."""
    size = path.stat().st_size if path.is_file() else 0
    if size < numel * 4:
        raise NvmeExportError(f"{path} is missing or holds {size // 4} values where its optimizer sub-group needs {numel}; "
                              f"the checkpoint is incomplete, so export an earlier one")
    return torch.from_file(str(path), shared=False, size=size // 4, dtype=torch.float32)[:numel]
