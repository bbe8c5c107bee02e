"""ViT-g pre-training on this one box through the product: `scaling pretrain`, save, kill -9, resume.

    .venv/bin/python bench/vitg_one_box.py                       # ViT-g (needs ~20 GB available)
    .venv/bin/python bench/vitg_one_box.py --model vit_b --out /tmp/one_box_vit_b.json   # the set-up, quickly

In one bench run, on the same machine, one after the other:
1. the yardstick: one plain fp32 forward + backward of the same pre-training model (batch 1,
   dual masking, one process on every core, no ZeRO, no checkpointing): bench/step.py;
2. `scaling pretrain --config pipelines/vitg_one_box.yaml` (2 CPU ranks, ZeRO-3, optimizer on
   NVMe, checkpointing, precision auto) for `--steps` steps, saving after every step, on
   `scaling synth` shards; as soon as its last step's loss is logged, every process of the run
   (launcher, torchrun, ranks) gets SIGKILL at once, in the middle of the last save;
3. the same command again: it resumes from the last complete checkpoint and runs the last step
   again, whose loss must equal the uninterrupted one.

Beside the runs this process samples, once a second, the available memory and each process's
peak RSS (VmHWM), and stops everything if available memory falls under --kill-below-gb. The
DeepSpeed config is a copy of ds_configs/zero3_nvme_offload.json with a fresh swap folder and
DeepSpeed's own wall-clock timers on (`wall_clock_breakdown`, read from rank 0's log: the NVMe
swap-in/out of the optimizer states). bench/zero_timers/sitecustomize.py times, in the unmodified
ranks, the engine's forward, backward (with its recompute) and optimizer step, and inside them
ZeRO-3's parameter gathers and gradient reduce-scatter.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from one_box import Watcher, cpu_facts, kill_tree, planner_prediction, wait_for_memory  # noqa: E402

GiB = 2**30
TIMER_LINE = re.compile(r"time \(ms\) \| (.*)$")


def baseline(model: str, work: Path) -> dict:
    """bench/step.py: plain fp32 forward + backward, batch 1, dual masking, one process, all cores."""
    out = work / "plain_step.json"
    cmd = [sys.executable, str(ROOT / "bench" / "step.py"), "--model", model, "--batch", "1", "--precision", "fp32",
           "--masking", "dual", "--attention", "sdpa", "--threads", str(os.cpu_count()), "--steps", "1",
           "--warmup", "1", "--device", "cpu", "--out", str(out)]
    print("[vitg_one_box] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(out.read_text())


def run_pretrain(args, work: Path, overrides: list[str], kill_after_step: int | None) -> dict:
    """One `scaling pretrain` launch; with kill_after_step, SIGKILL everything once that step is logged."""
    cmd = [str(ROOT / ".venv" / "bin" / "scaling"), "pretrain", "--config", str(ROOT / "pipelines" / "vitg_one_box.yaml"),
           *overrides]
    log_path = work / f"launch_{'kill' if kill_after_step else 'resume'}.log"
    print("[vitg_one_box] " + " ".join(cmd) + f"  > {log_path}", flush=True)
    metrics = work / "run" / "metrics.jsonl"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        timers = work / f"zero_timers_{'kill' if kill_after_step else 'resume'}"
        timers.mkdir()
        env = dict(os.environ, PYTHONUNBUFFERED="1", SCALING_BENCH_ZERO_TIMERS=str(timers),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "bench" / "zero_timers"), os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        watcher = Watcher(proc, work, args.kill_below_gb)  # work holds the swap files and checkpoints
        watcher.start()
        killed_at = None
        while proc.poll() is None:
            time.sleep(0.2)
            if kill_after_step and metrics.exists():
                steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
                if steps and steps[-1] >= kill_after_step:
                    time.sleep(args.kill_delay_s)
                    killed_at = time.perf_counter() - start
                    kill_tree(proc.pid)
                    proc.wait()
        watcher.done.set()
        watcher.join()
    text = log_path.read_text(errors="replace")
    if watcher.low_memory:
        raise SystemExit(f"stopped: available memory fell under {args.kill_below_gb} GiB (log: {log_path})")
    if killed_at is None and proc.returncode != 0:
        raise SystemExit(f"scaling pretrain failed with exit code {proc.returncode}; the end of {log_path}:\n{text[-3000:]}")
    return {"exit_code": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "killed_after_s": None if killed_at is None else round(killed_at, 1),
            "peak_rss_gib_per_rank": watcher.ranks_peak_gib(), "min_available_gib": round(watcher.min_available / GiB, 2),
            "swap_and_checkpoint_folder_max_gib": round(watcher.max_disk / GiB, 2),
            "breakdown_s_per_step": breakdown(text, timers),
            "idle_rank_rss_gib": [round(json.loads(f.read_text())["rss"] / GiB, 3) for f in sorted(timers.glob("rank*_idle.json"))],
            "log_lines": [line for line in text.splitlines() if line.startswith("[scaling]")][-40:]}


def breakdown(log_text: str, timers: Path) -> list[dict]:
    """Per optimizer step, rank 0: the engine's phases and ZeRO-3 internals (bench/zero_timers),
    and from DeepSpeed's own timers the NVMe traffic of the optimizer step (swap-in and swap-out
    of the fp32 states). Recompute is not timed apart: it runs inside backward, and costs about
    the forward's time without its gathers (the same blocks, forward again)."""
    ds = [dict((k.strip(), float(v) / 1000) for k, v in (part.rsplit(":", 1) for part in m.group(1).split("|")))
          for m in map(TIMER_LINE.search, log_text.splitlines()) if m]
    optimizer_ds = [d for d in ds if "optimizer_step" in d]
    rank0 = timers / "rank0.jsonl"
    ours = [json.loads(line) for line in rank0.read_text().splitlines() if line.strip()] if rank0.exists() else []
    steps = []
    for mine, theirs in zip(ours, optimizer_ds):
        fetch_fwd = mine.get("forward/param_fetch", 0.0) + mine.get("forward/param_release", 0.0)
        steps.append({**mine, "optimizer/nvme_swap_in_states": theirs.get("optimizer_swap_in_state"),
                      "optimizer/nvme_swap_out_states": theirs.get("optimizer_swap_out_state"),
                      "recompute_estimate": round(mine["forward"] - fetch_fwd, 3)})
    return steps


def metrics_by_step(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_g")
    p.add_argument("--out", default="bench/results/vitg_one_box_pretrain.json")
    p.add_argument("--steps", type=int, default=2, help="steps of the first launch (a save after each)")
    p.add_argument("--need-gb", type=float, default=20.0, help="available memory to wait for before starting")
    p.add_argument("--wait-s", type=int, default=1200)
    p.add_argument("--kill-below-gb", type=float, default=0.8)
    p.add_argument("--kill-delay-s", type=float, default=0.0, help="wait after the last step's log line (0: inside its save)")
    p.add_argument("--work-root", default="/tmp", help="folder for the run, its swap files and checkpoints (local disk)")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()

    wait_for_memory(args.need_gb, args.wait_s)
    work = Path(tempfile.mkdtemp(prefix="vitg_one_box_", dir=args.work_root))
    swap = work / "nvme"
    swap.mkdir()
    result: dict = {"model": args.model, "cpu": cpu_facts(), "load_average_before": os.getloadavg()}
    try:
        if not args.skip_baseline:
            plain = baseline(args.model, work)
            result["plain_fp32_forward_backward"] = {"seconds": plain["results"]["sdpa"]["median_s"], "detail": plain}
        subprocess.run([str(ROOT / ".venv" / "bin" / "scaling"), "synth", "--out", str(work / "synth"),
                        "--num-videos", "8", "--per-shard", "2"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        ds = json.loads((ROOT / "ds_configs" / "zero3_nvme_offload.json").read_text())
        ds["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(swap)
        ds.update(wall_clock_breakdown=True, steps_per_print=1)  # DeepSpeed's timers, printed every step
        (work / "ds_config.json").write_text(json.dumps(ds, indent=1))
        overrides = [f"model.name={args.model}", f"train.steps={args.steps}", "train.save_every=1",
                     f"train.output_dir={work / 'run'}",
                     f"train.ds_config={work / 'ds_config.json'}", f"data.shards={work / 'synth'}/synth-{{000000..000003}}.tar",
                     f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}"]
        first = run_pretrain(args, work, overrides, kill_after_step=args.steps)
        uninterrupted = metrics_by_step(work / "run" / "metrics.jsonl")
        checkpoints_after_kill = sorted(p.name for p in (work / "run" / "checkpoints").iterdir())
        resumed_run = run_pretrain(args, work, overrides, kill_after_step=None)
        after = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
        resumed = after[len(uninterrupted):]
        result.update(
            recipe="pipelines/vitg_one_box.yaml", overrides=overrides, ds_config=ds,
            first_launch=first, checkpoints_after_kill=checkpoints_after_kill, resumed_launch=resumed_run,
            uninterrupted_steps=[uninterrupted[s] for s in sorted(uninterrupted)], resumed_steps=resumed,
            resumed_loss_equals_uninterrupted=all(r["loss"] == uninterrupted[r["step"]]["loss"] for r in resumed) and bool(resumed),
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    later = [r for r in result["uninterrupted_steps"] if r["step"] > 1] + result["resumed_steps"]
    step_s = sorted(r["step_time_s"] for r in later)
    clips = 2  # global_batch 2 x num_sample 1
    result["seconds_per_step_after_the_first"] = step_s
    result["seconds_per_clip"] = round(step_s[len(step_s) // 2] / clips, 1)
    if "plain_fp32_forward_backward" in result:
        result["per_clip_over_plain_fp32"] = round(result["seconds_per_clip"] / result["plain_fp32_forward_backward"]["seconds"], 2)
    result["peak_rss_gib_per_rank"] = [max(a, b) for a, b in zip(result["first_launch"]["peak_rss_gib_per_rank"],
                                                                  result["resumed_launch"]["peak_rss_gib_per_rank"])]
    result["min_available_gib"] = min(result["first_launch"]["min_available_gib"], result["resumed_launch"]["min_available_gib"])
    result["load_average_after"] = os.getloadavg()
    # The planner predicts a CPU rank's peak above an idle one (torch, DeepSpeed and the process
    # group up, no model): as bench/plan_validate.py measured debug, S and B.
    chosen = re.search(r"train\.precision auto -> (\w+)", "\n".join(result["first_launch"]["log_lines"]))
    result["precision"] = chosen.group(1) if chosen else "bf16"
    result["planner"] = planner_prediction(args.model, "ds_configs/zero3_nvme_offload.json", result["precision"])
    idle = max(result["first_launch"]["idle_rank_rss_gib"] or [0.0])
    predicted = result["planner"]["per_rank_bytes"]["peak"] / GiB
    result["planner_vs_measured"] = {
        "predicted_above_idle_gib": round(predicted, 3), "idle_rank_rss_gib": idle,
        "measured_above_idle_gib": [round(p - idle, 3) for p in result["peak_rss_gib_per_rank"]],
        "error": round(predicted / (max(result["peak_rss_gib_per_rank"]) - idle) - 1, 3)}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("first_launch", "resumed_launch", "ds_config")}, indent=1))


if __name__ == "__main__":
    main()
