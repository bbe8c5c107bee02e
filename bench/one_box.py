"""Run real pre-training steps of one model size on 2 CPU ranks of this box, optimizer on NVMe.

    .venv/bin/python bench/one_box.py --model vit_g --out bench/results/vitg_one_box.json

What runs is bench/zero_steps.py under torchrun: the project's own model, DeepSpeed set-up
(scaling.train.engine) and pre-training step, with ds_configs/zero3_nvme_offload.json whose
nvme_path is pointed at a fresh folder under /tmp (deleted afterwards); no checkpoint is saved. Beside it this process
samples, once a second, the machine's available memory and the swap folder's size; if
available memory falls under --kill-below-gb it stops the run rather than let the machine
(shared with other jobs) run out. Before starting it waits until --need-gb are available.

The JSON holds step times, the peak RSS of each rank (its own `ru_maxrss`, by phase), the
lowest available memory seen, the swap files' size and the planner's prediction.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def folder_bytes(path: Path) -> int:
    # Allocated blocks, not apparent size: swap files may be sparse until written.
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def cpu_facts() -> dict:
    """The CPU's name and whether it has bf16 matmul hardware (AMX or AVX512-BF16): without it
    bf16 GEMMs are emulated, several times slower than fp32, and bf16 step times say little."""
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"model": name, "cores": os.cpu_count(), "bf16_matmul_hardware": [f for f in flags if f in ("amx_bf16", "avx512_bf16")]}


def wait_for_memory(need: float, patience_s: int) -> None:
    deadline = time.time() + patience_s
    while available_bytes() < need * GiB:
        if time.time() > deadline:
            raise SystemExit(f"only {available_bytes() / GiB:.1f} GiB available after waiting {patience_s} s; "
                             f"this run needs {need:g} GiB, try again when other jobs are done")
        print(f"[one_box] {available_bytes() / GiB:.1f} GiB available, waiting for {need:g} GiB ...", flush=True)
        time.sleep(60)


def status_kib(pid: int, field: str) -> int:
    """A /proc/<pid>/status figure in KiB (VmHWM: the process's peak RSS); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(root: int) -> list[psutil.Process]:
    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(root: int) -> None:
    """SIGKILL to `root` and everything below it at once (launcher, torchrun, ranks): no handler
    runs, nothing saves."""
    for proc in reversed(process_tree(root)):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


class Watcher(threading.Thread):
    """Once a second: the lowest available memory, the largest size of `folder` on disk (swap
    files, checkpoints), each process's peak RSS; stops the run when memory runs low."""

    def __init__(self, proc: subprocess.Popen, folder: Path, kill_below_gb: float):
        super().__init__(daemon=True)
        self.proc, self.folder, self.kill_below = proc, folder, kill_below_gb * GiB
        self.min_available, self.max_disk, self.low_memory = available_bytes(), 0, False
        self.peak_kib: dict[int, int] = {}
        self.parent: dict[int, int] = {}
        self.cmdline: dict[int, str] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.min_available = min(self.min_available, available_bytes())
            self.max_disk = max(self.max_disk, folder_bytes(self.folder))
            for proc in process_tree(self.proc.pid):
                self.peak_kib[proc.pid] = max(self.peak_kib.get(proc.pid, 0), status_kib(proc.pid, "VmHWM"))
                if proc.pid not in self.cmdline:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        self.parent[proc.pid], self.cmdline[proc.pid] = proc.ppid(), " ".join(proc.cmdline())
            if self.min_available < self.kill_below and not self.low_memory:
                print(f"[one_box] only {self.min_available / GiB:.2f} GiB available: stopping the run", flush=True)
                self.low_memory = True
                kill_tree(self.proc.pid)

    def ranks_peak_gib(self) -> list[float]:
        """The peak RSS of each rank (a child of torchrun), largest first."""
        ranks = [pid for pid, ppid in self.parent.items() if "torch.distributed.run" in self.cmdline.get(ppid, "")]
        return sorted((round(self.peak_kib[pid] / 2**20, 3) for pid in ranks), reverse=True)


def planner_prediction(model: str, ds_config: str, precision: str = "bf16") -> dict:
    """What `scaling memory plan --device cpu` predicts for this run, per rank."""
    from scaling.memory.plan import PlanSpec, peak, plan

    spec = PlanSpec(model=model, masking="dual", checkpointing=True, precision=precision, zero_stage=3,
                    offload_optimizer="nvme", gpus_per_node=2, nodes=1, gpu_memory_gb=12, reserve_gb=0,
                    device="cpu", ds_config=ds_config)
    result = plan(spec)
    return {"per_rank_bytes": peak(result, 1), "model_states": result["model_states"]["planner"],
            "extras": result["extras"], "activation_per_clip": next(r for r in result["fits"] if r["selected"])["activation_per_clip"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_g")
    p.add_argument("--out", default="bench/results/vitg_one_box.json")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ds-config", default="ds_configs/zero3_nvme_offload.json")
    p.add_argument("--need-gb", type=float, default=19.0, help="available memory to wait for before starting")
    p.add_argument("--wait-s", type=int, default=1200, help="how long to wait for it")
    p.add_argument("--kill-below-gb", type=float, default=1.0, help="stop the run when available memory falls below")
    p.add_argument("--swap-root", default="/tmp", help="folder for the NVMe swap files (a fast local disk)")
    args = p.parse_args()

    from scaling.launch import free_port

    wait_for_memory(args.need_gb, args.wait_s)
    work = Path(tempfile.mkdtemp(prefix="one_box_", dir="/tmp"))
    swap = Path(tempfile.mkdtemp(prefix="scaling_nvme_", dir=args.swap_root))
    try:
        ds = json.loads((ROOT / args.ds_config).read_text())
        ds["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(swap)
        ds_path = work / "ds_config.json"
        ds_path.write_text(json.dumps(ds, indent=1))
        overrides = [f"model.name={args.model}", "model.num_frames=16", "model.input_size=224",
                     "model.activation_checkpointing=true", "mask.encoder=tube", "mask.decoder=running_cell",
                     "data.source=noise", "data.num_sample=1", "train.global_batch=2", "train.grad_accum=1",
                     f"train.steps={args.steps}", "optim.warmup_steps=0", "train.precision=bf16", "train.zero_stage=3",
                     f"train.ds_config={ds_path}", f"train.output_dir={work}", "tracking.enabled=false"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(ROOT / "bench" / "zero_steps.py"),
               "--out", str(work), "--config", str(ROOT / "pipelines" / "pretrain_smoke.yaml"), *overrides]
        print("[one_box] " + " ".join(cmd), flush=True)
        start = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        watcher = Watcher(subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True), swap, args.kill_below_gb)
        watcher.start()
        code = watcher.proc.wait()
        wall = time.perf_counter() - start
        watcher.done.set()
        watcher.join()
        if code != 0:
            raise SystemExit(f"the run failed with exit code {code}" + (" (stopped: memory ran low)" if watcher.low_memory else ""))
        ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]
    finally:
        shutil.rmtree(swap, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "model": args.model,
        "setup": "2 CPU ranks (gloo), ZeRO-3, bf16, optimizer states on NVMe (async I/O), dual masking (tube 0.9 + "
                 "running cell 0.5), 16x224, 1 clip per rank, activation checkpointing, torch AdamW; "
                 "bench/zero_steps.py (the project's engine and step, no checkpoint save)",
        "ds_config": args.ds_config,
        "zero_settings": {k: v for k, v in ds["zero_optimization"].items() if k != "offload_optimizer"},
        "cpu": cpu_facts(),
        "steps": [{"step": s["step"], "seconds": s["seconds"], "loss": s["loss"]} for s in ranks[0]["steps"]],
        "peak_rss_gib_per_rank": [round(r["phases"][f"step_{args.steps}"]["peak_rss"] / GiB, 3) for r in ranks],
        "peak_rss_gib_by_phase": {f"rank{r['rank']}": {k: round(v["peak_rss"] / GiB, 3) for k, v in r["phases"].items()} for r in ranks},
        "seconds_since_start_by_phase": {k: v["s"] for k, v in ranks[0]["phases"].items()},
        "min_available_gib": round(watcher.min_available / GiB, 2),
        "swap_files_gib": round(watcher.max_disk / GiB, 2),
        "wall_s": round(wall, 1),
        "omp_num_threads": env["OMP_NUM_THREADS"],
        "load_average_after": os.getloadavg(),
        "planner": planner_prediction(args.model, args.ds_config),
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
