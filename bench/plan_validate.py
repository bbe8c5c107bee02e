"""Check `scaling memory plan` against the peak memory of real 2-rank ZeRO-3 runs on this box.

    .venv/bin/python bench/plan_validate.py                  # debug, vit_s, vit_b: ~30-60 min here
    .venv/bin/python bench/plan_validate.py --cases debug:ckpt:1

Each case runs bench/zero_steps.py under torchrun on 2 CPU ranks with ds_configs/zero3_bf16.json:
the project's engine and pre-training step (dual masking, bf16, noise clips), 3 steps.

What is compared, honestly: on the CPU there is no GPU memory apart from the rest, so a rank's
resident set holds the model states, activations and everything the framework allocates. The
measured figure is a rank's peak RSS (`ru_maxrss`, over the whole run) minus its own RSS as an
idle rank — torch, DeepSpeed and the process group up, no model yet (bench/zero_steps.py marks
it). The prediction is the planner's per-rank peak for `--device cpu` (attention counted on
the CPU path, offload targets in the same RAM) with no reserve: the residual is what neither
DeepSpeed's estimator nor the planner's named extras hold (gloo and shared-memory comm
buffers, the autograd engine, allocator fragmentation). Writes bench/results/plan_validate.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
DEFAULT_CASES = ["debug:ckpt:1", "vit_s:ckpt:1", "vit_s:plain:1", "vit_s:plain:4", "vit_b:ckpt:1", "vit_b:plain:2"]


def run_case(model: str, checkpointing: bool | int, clips: int, steps: int, ds_config: str, frames: int = 16,
             precision: str = "bf16") -> list[dict]:
    """One 2-rank run of bench/zero_steps.py; each rank's phases (RSS high-water marks) and step times."""
    from scaling.launch import free_port

    with tempfile.TemporaryDirectory(prefix="plan_validate_") as work:
        overrides = [f"model.name={model}", f"model.num_frames={frames}", "model.input_size=224",
                     f"model.activation_checkpointing={str(checkpointing).lower()}", "mask.decoder=running_cell",
                     "data.source=noise", f"data.num_sample={clips}", "train.global_batch=2", "train.grad_accum=1",
                     f"train.steps={steps}", "optim.warmup_steps=0", f"train.precision={precision}", "train.zero_stage=3",
                     f"train.ds_config={ds_config}", f"train.output_dir={work}", "tracking.enabled=false"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(ROOT / "bench" / "zero_steps.py"), "--out", work,
               "--config", str(ROOT / "pipelines" / "pretrain_smoke.yaml"), *overrides]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        return [json.loads((Path(work) / f"rank{r}.json").read_text()) for r in (0, 1)]


def predict(model: str, checkpointing: bool, clips: int, ds_config: str) -> dict:
    from scaling.memory.plan import PlanSpec, peak, plan

    result = plan(PlanSpec(model=model, masking="dual", checkpointing=checkpointing, precision="bf16", zero_stage=3,
                           gpus_per_node=2, nodes=1, gpu_memory_gb=20, reserve_gb=0, device="cpu", ds_config=ds_config))
    row = next(r for r in result["fits"] if r["selected"])
    return {"peak": peak(result, clips), "model_states_planner": result["model_states"]["planner"]["gpu"],
            "model_states_deepspeed": result["model_states"]["deepspeed_estimator"]["gpu"],
            "extras": {e["name"]: e["bytes"] for e in result["extras"]},
            "optimizer_temporaries": result["optimizer_temporaries"],
            "activation_per_clip": row["activation_per_clip"], "saved_per_clip": row["saved_per_clip"],
            "params": result["params"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="model:ckpt|plain:clips per rank")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ds-config", default="ds_configs/zero3_bf16.json")
    p.add_argument("--out", default="bench/results/plan_validate.json")
    p.add_argument("--append", action="store_true", help="keep the other cases already in --out")
    args = p.parse_args()

    rows = []
    for case in args.cases:
        model, mode, clips = case.split(":")
        ckpt, clips = mode == "ckpt", int(clips)
        start = time.perf_counter()
        ranks = run_case(model, ckpt, clips, args.steps, args.ds_config)
        pred = predict(model, ckpt, clips, args.ds_config)
        last = f"step_{args.steps}"
        measured = [r["phases"][last]["peak_rss"] - r["phases"]["baseline"]["peak_rss"] for r in ranks]
        after_first = [r["phases"]["step_1"]["peak_rss"] - r["phases"]["baseline"]["peak_rss"] for r in ranks]
        worst = max(measured)
        row = {
            "case": case, "model": model, "checkpointing": ckpt, "clips_per_rank": clips,
            "baseline_rss_mib": [round(r["phases"]["baseline"]["peak_rss"] / MiB, 1) for r in ranks],
            "measured_peak_above_baseline_mib": [round(m / MiB, 1) for m in measured],
            "measured_after_step_1_mib": [round(m / MiB, 1) for m in after_first],
            "measured_by_phase_mib": {f"rank{r['rank']}": {k: round((v["peak_rss"] - r["phases"]["baseline"]["peak_rss"]) / MiB, 1)
                                                        for k, v in r["phases"].items()} for r in ranks},
            "predicted_peak_mib": round(pred["peak"]["peak"] / MiB, 1),
            "predicted_phases_mib": {k: round(pred["peak"][k] / MiB, 1) for k in ("forward_backward", "optimizer_step")},
            "error": round((pred["peak"]["peak"] - worst) / worst, 3),
            "residual_mib": round((worst - pred["peak"]["peak"]) / MiB, 1),
            "model_states_mib": {"planner": round(pred["model_states_planner"] / MiB, 1),
                                 "deepspeed_estimator": round(pred["model_states_deepspeed"] / MiB, 1)},
            "extras_mib": {k: round(v / MiB, 1) for k, v in pred["extras"].items()},
            "optimizer_temporaries_mib": round(pred["optimizer_temporaries"] / MiB, 1),
            "activation_per_clip_mib": round(pred["activation_per_clip"] / MiB, 2),
            "saved_per_clip_mib": round(pred["saved_per_clip"] / MiB, 2),
            "params": pred["params"],
            "step_seconds": [round(s["seconds"], 1) for s in ranks[0]["steps"]],
            "wall_s": round(time.perf_counter() - start, 1),
            "load_average_after": os.getloadavg(),
        }
        rows.append(row)
        print(f"[plan_validate] {case}: predicted {row['predicted_peak_mib']:.0f} MiB, measured {worst / MiB:.0f} MiB "
              f"above an idle rank ({row['error']:+.1%})", flush=True)
    out = ROOT / args.out
    if args.append and out.is_file():
        ran = {r["case"] for r in rows}
        rows = [r for r in json.loads(out.read_text())["cases"] if r["case"] not in ran] + rows
    result = {
        "what": "per-rank peak RSS of 2-rank ZeRO-3 bf16 pre-training on CPU (3 steps, dual masking, noise clips) minus "
                "the same rank's RSS when idle with torch/DeepSpeed imported and the process group up, vs the planner's "
                "per-rank peak for --device cpu without reserve; error = (predicted - measured) / measured, worst rank",
        "ds_config": args.ds_config, "steps": args.steps, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
        "cases": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'case':<16s}{'predicted MiB':>14s}{'measured MiB':>14s}{'error':>8s}")
    for r in rows:
        print(f"{r['case']:<16s}{r['predicted_peak_mib']:>14.0f}{max(r['measured_peak_above_baseline_mib']):>14.0f}{r['error']:>+8.1%}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
