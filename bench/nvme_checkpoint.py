"""What saving a ZeRO-3 run whose optimizer lives on NVMe costs in RAM, and whether it resumes.

    .venv/bin/python bench/nvme_checkpoint.py --out bench/results/nvme_checkpoint.json

The ViT-B pre-training model (94.2 M params; 4-frame 128 px clips, which leave the parameter
count unchanged) on 2 CPU ranks, ZeRO-3 + bf16, optimizer states in NVMe swap files
(ds_configs/zero3_nvme_offload.json with a fresh swap folder). Each arm is one launch:

  save_<writer>  step 1, save through scaling.train.checkpoint.save (engine.save_checkpoint, as
                 `scaling pretrain` saves), steps 2 and 3. writer: `torch` (DeepSpeed's default
                 checkpoint engine, torch.save) or `fast` (DeepSpeed's FastCheckpointEngine:
                 `"checkpoint": {"writer": {"type": "fast"}}`, torch.save through pinned
                 buffers and async I/O; its writer pins a buffer with `Tensor.pin_memory()`,
                 which needs an NVIDIA driver: on a CPU-only machine it fails at
                 deepspeed.initialize, so it is not a default arm). A thread samples each rank's RSS every 20 ms during
                 the save; the step's peak RSS is the high-water mark before it.
  resume         a fresh engine loads the save_torch checkpoint (scaling.train.checkpoint.resume)
                 and takes steps 2 and 3 on the same clips: step 2's loss shows the weights came
                 back, step 3's that Adam's moments and step count did (its update is in it);
                 both should equal save_torch's, and Adam's step count should be 3.

DeepSpeed 0.19 saves NVMe-held optimizer state by copying the swap files into
<tag>/offloaded_tensors/rank<N>/ (shutil.copytree, engine.save_checkpoint) and copies them
back on load, but skips the ZeRO optimizer file then: alone that resumed Adam at step 1 with
zero moments (and the sub-groups too small for swap files at their initial weights), which
scaling.train.checkpoint.restore_nvme_adam_state now puts back. The JSON records the files' sizes
next to the zero_pp_rank_* files, and
whether `scaling export` consolidates the save (fp32 weights read from the swap files) to weights
that round to the run's bf16 ones.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """The highest RSS seen while the `with` block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = current_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def sizes(folder: Path) -> dict:
    """Bytes per file kind in a checkpoint tag folder."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            kind = "offloaded_tensors" if "offloaded_tensors" in p.parts else p.name.split("_rank")[0].split("-")[0]
            out[kind] = out.get(kind, 0) + p.stat().st_size
    return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from scaling.config import load_config, micro_batch, validate
    from scaling.data.noise import noise_batches
    from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
    from scaling.models.pretrain import build_pretrain_model
    from scaling.precision import input_dtype
    from scaling.train import checkpoint
    from scaling.train.engine import build_ds_config, build_model, initialize
    from scaling.train.pretrain import masks_for_rank
    from scaling.train.run import init_ranks

    rank, world = init_ranks()
    cfg = load_config(None, [
        "model.name=vit_b", "model.num_frames=4", "model.input_size=128", "data.source=noise", "data.num_sample=1",
        f"train.global_batch={world}", "train.precision=bf16", "train.steps=3", "optim.warmup_steps=0",
        "tracking.enabled=false", f"train.ds_config={args.ds_config}"])
    validate(cfg, world)
    ds_config = build_ds_config(cfg, world)
    m = cfg.model
    torch.manual_seed(0)
    model = build_model(lambda: build_pretrain_model(m.name, m.num_frames, m.input_size), ds_config)
    engine, _ = initialize(model, cfg, ds_config)
    clips = micro_batch(cfg, world)

    def step(i: int) -> float:
        video = next(noise_batches(seed=0, rank=rank, clips_per_rank=clips, grad_accum=1, num_frames=m.num_frames,
                                   input_size=m.input_size, start_step=i))["video"]
        enc, dec = masks_for_rank(cfg, model.grid, i, 0, rank, clips, world)
        target = normalized_pixel_target(video, model.size.patch, model.size.tubelet)
        loss = masked_reconstruction_loss(engine(video.to(input_dtype(cfg.train.precision)), enc, dec), target, enc, dec)
        engine.backward(loss)
        engine.step()
        return float(loss)

    ckpt = Path(args.ckpt_dir)
    row = {"rank": rank, "optimizer": type(engine.basic_optimizer).__name__}  # optim.offload_adam's default
    if args.arm == "resume":
        checkpoint.resume(engine, ckpt, "step00000001")
        row["losses"] = [None, step(1), step(2)]
    else:
        row["losses"] = [step(0)]
        row["peak_rss_before_save_gib"] = peak_rss() / GiB
        row["rss_before_save_gib"] = current_rss() / GiB
        dist.barrier()
        t0 = time.perf_counter()
        with RssSampler() as sampled:
            checkpoint.save(engine, ckpt, 1, {"step": 1}, keep=0)
        row["save_s"] = time.perf_counter() - t0
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters())):  # what `export` must round to
            if rank == 0:
                torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, ckpt / "bf16_weights.pt")
        row["peak_rss_during_save_gib"] = sampled.peak / GiB
        row["losses"] += [step(1), step(2)]
    row["peak_rss_gib"] = peak_rss() / GiB
    # Adam's step count after the last step: 3 when the optimizer state came through the save.
    row["adam_step_counts"] = sorted({int(st["step"]) for st in engine.optimizer.optimizer.state.values() if "step" in st})
    Path(args.worker_out).with_suffix(f".rank{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def ds_config_for(tmp: Path, arm: str, writer: str) -> Path:
    """The NVMe JSON with an empty swap folder of the arm's own (a resume must not find the saving
    run's swap files), and the checkpoint writer."""
    ds = json.loads((REPO / "ds_configs" / "zero3_nvme_offload.json").read_text())
    ds["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(tmp / f"swap_{arm}")
    if writer == "fast":
        ds["checkpoint"] = {"writer": {"type": "fast", "decoupled": False}}
    path = tmp / f"nvme_{arm}.json"
    path.write_text(json.dumps(ds))
    return path


def export_check(ckpt: Path) -> dict:
    """`scaling export`'s consolidation of the save (fp32 weights from the NVMe swap files): each
    weight rounded to bf16 must equal the run's bf16 weight gathered right after the save."""
    import torch

    from scaling.train.checkpoint import export_fp32

    t0 = time.perf_counter()
    exported = torch.load(export_fp32(ckpt, ckpt / "model_fp32.pt", tag="step00000001"), weights_only=False)["model"]
    seconds = time.perf_counter() - t0
    live = torch.load(ckpt / "bf16_weights.pt")
    return {"s": round(seconds, 1), "numel": sum(t.numel() for t in exported.values()),
            "same_names": exported.keys() == live.keys(),
            "rounds_to_run_bf16": all(torch.equal(exported[n].bfloat16(), w) for n, w in live.items())}


def launch(arm: str, ds_config: Path, ckpt: Path, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29300 + os.getpid() % 300), __file__, "--worker", "--arm", arm, "--ds-config", str(ds_config),
           "--ckpt-dir", str(ckpt), "--worker-out", str(out)]
    # The fast writer groups ranks by machine from CROSS_SIZE/CROSS_RANK, which only the
    # `deepspeed` launcher sets (torchrun does not): one machine here.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // 2)),
               CROSS_SIZE="1", CROSS_RANK="0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{arm} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--arm", default="save_torch")
    ap.add_argument("--ds-config")
    ap.add_argument("--ckpt-dir")
    ap.add_argument("--worker-out")
    ap.add_argument("--arms", default="save_torch,resume")  # save_fast: GPU machines only (module docstring)
    ap.add_argument("--out", default="bench/results/nvme_checkpoint.json")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    started = time.perf_counter()
    result = {"command": " ".join([".venv/bin/python", "bench/nvme_checkpoint.py", *sys.argv[1:]]),
              "loadavg_before": os.getloadavg(), "arms": {}}
    with tempfile.TemporaryDirectory(prefix="nvme_checkpoint_", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        tmp = Path(tmp)
        for arm in args.arms.split(","):
            writer = "torch" if arm == "resume" else arm.split("_")[1]
            ckpt = tmp / f"ckpt_{writer}"
            rows = launch(arm, ds_config_for(tmp, arm, writer), ckpt, tmp / f"{arm}.json")
            entry = {"ranks": rows, "loadavg_after": os.getloadavg()}
            if arm != "resume":
                entry["export"] = export_check(ckpt)
                entry["files_bytes"] = sizes(ckpt / "step00000001")
                entry["swap_files_bytes"] = sum(p.stat().st_size for p in (tmp / f"swap_{arm}").rglob("*") if p.is_file())
            result["arms"][arm] = entry
            print(f"[nvme_checkpoint] {arm}: {json.dumps(entry)[:600]}", flush=True)
            shutil.rmtree(tmp / f"swap_{arm}", ignore_errors=True)
        if "resume" in result["arms"] and "save_torch" in result["arms"]:
            pairs = list(zip(result["arms"]["save_torch"]["ranks"], result["arms"]["resume"]["ranks"]))
            result["resumed_losses_equal_uninterrupted"] = [a["losses"][1:] == b["losses"][1:] for a, b in pairs]
            result["resumed_adam_steps_equal_uninterrupted"] = [
                a["adam_step_counts"] == b["adam_step_counts"] for a, b in pairs]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
