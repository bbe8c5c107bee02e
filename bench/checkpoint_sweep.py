"""Selective activation checkpointing on 2 CPU ranks: step time and peak memory per number of
checkpointed encoder blocks N, with the planner's prediction beside each.

    .venv/bin/python bench/checkpoint_sweep.py --model vit_b --blocks 0 3 6 9 12 --frames 8
    .venv/bin/python bench/checkpoint_sweep.py --repredict          # new predictions, same measurements
    .venv/bin/python bench/checkpoint_sweep.py --check-budget       # run the planner's pick for a budget between the extremes
    .venv/bin/python bench/checkpoint_sweep.py --placement --blocks 0 6 12 --clips 2   # first-N vs spread, one process

Each N is one run of bench/zero_steps.py under torchrun (ZeRO-3, bf16, dual masking, noise
clips; `model.activation_checkpointing=N`: the first N encoder blocks and the same share of the
decoder's, rounded up). Measured: each rank's peak RSS above its idle baseline (as
bench/plan_validate.py) and the seconds of each step after the first. The runs are sequential,
so drift between them is not cancelled: the load average before and after each run is kept.
Writes bench/results/checkpoint_sweep_<model>.json.

`--placement` compares where the N blocks sit (first N, as InternVideo2, or spread evenly) in
one process on a bf16-cast model (as DeepSpeed's bf16 runs it): peak RSS above the step's start
and seconds per forward + backward, the arms interleaved. Both placements save the same bytes
and recompute the same blocks; what can differ is the peak (a checkpointed last block is
recomputed while everything before it is still held) and so the bytes saved per second of
recompute. Writes bench/results/checkpoint_placement_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from plan_validate import run_case  # noqa: E402

MiB, GiB = 2**20, 2**30


def plan_for(model: str, blocks: int, frames: int, budget_gb: float = 0.0, clips: int = 1) -> dict:
    from scaling.memory.plan import PlanSpec, plan

    return plan(PlanSpec(model=model, masking="dual", checkpointing=blocks, precision="bf16", zero_stage=3,
                         gpus_per_node=2, nodes=1, gpu_memory_gb=20, reserve_gb=0, device="cpu", frames=frames,
                         micro_batch=clips, budget_gb=budget_gb))


def predicted(model: str, blocks: int, frames: int, clips: int) -> dict:
    from scaling.memory.plan import peak

    result = plan_for(model, blocks, frames, clips=clips)
    p = peak(result, clips)
    return {"peak_mib": round(p["peak"] / MiB, 1), "forward_backward_mib": round(p["forward_backward"] / MiB, 1),
            "optimizer_step_mib": round(p["optimizer_step"] / MiB, 1), "fixed_mib": round(result["fixed_per_gpu"] / MiB, 1),
            "terms_mib": {e["name"]: round(e["bytes"] / MiB, 1) for e in result["extras"]}}


def measure(model: str, blocks: int, frames: int, clips: int, steps: int, ds_config: str) -> dict:
    load_before = os.getloadavg()
    start = time.perf_counter()
    ranks = run_case(model, blocks, clips, steps, ds_config, frames=frames)
    above = [r["phases"][f"step_{steps}"]["peak_rss"] - r["phases"]["baseline"]["peak_rss"] for r in ranks]
    seconds = [s["seconds"] for s in ranks[0]["steps"]]
    return {"blocks": blocks, "measured_peak_mib": [round(a / MiB, 1) for a in above],
            "measured_by_phase_mib": {f"rank{r['rank']}": {k: round((v["peak_rss"] - r["phases"]["baseline"]["peak_rss"]) / MiB, 1)
                                                        for k, v in r["phases"].items()} for r in ranks},
            "step_seconds": [round(s, 2) for s in seconds],
            "median_step_s_after_first": round(statistics.median(seconds[1:] or seconds), 2),
            "wall_s": round(time.perf_counter() - start, 1),
            "load_avg_before_after": [list(load_before), list(os.getloadavg())]}


def with_predictions(result: dict) -> dict:
    s = result["settings"]
    result["rows"].sort(key=lambda r: r["blocks"])
    for row in result["rows"]:
        row["predicted"] = predicted(s["model"], row["blocks"], s["frames"], s["clips"])
        worst = max(row["measured_peak_mib"])
        row["error"] = round((row["predicted"]["peak_mib"] - worst) / worst, 3)
    return result


def check_budget(result: dict, ds_config: str) -> dict:
    """A budget halfway between the measured extremes: the planner's pick must fit it when run."""
    s = result["settings"]
    peaks = [max(r["measured_peak_mib"]) for r in result["rows"]]
    budget_gb = (min(peaks) + max(peaks)) / 2 * MiB / GiB
    pick = plan_for(s["model"], True, s["frames"], budget_gb, s["clips"])["budget"]["by_masking"]["dual"]
    out = {"budget_gb": round(budget_gb, 3), "pick": {k: v for k, v in pick.items() if k != "sweep"}}
    if pick["fits"]:
        run = measure(s["model"], pick["checkpoint_blocks"], s["frames"], s["clips"], s["steps"], ds_config)
        out["run"] = run
        out["fits_when_run"] = max(run["measured_peak_mib"]) <= budget_gb * GiB / MiB
    return out


def placement(model_name: str, blocks: list[int], frames: int, clips: int, steps: int, threads: int) -> dict:
    import torch
    from step import PeakRSS

    from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
    from scaling.masking import make_masks
    from scaling.models.pretrain import build_pretrain_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_pretrain_model(model_name, frames, 224).to(torch.bfloat16).train()
    g = torch.Generator().manual_seed(0)
    enc, dec = make_masks(clips, model.grid, "tube", 0.9, "running_cell", 0.5, g)
    video = torch.randn(clips, 3, frames, 224, 224, generator=g)
    target = normalized_pixel_target(video, model.size.patch, model.size.tubelet)

    def step(n: int, where: str) -> float:
        model.set_grad_checkpointing(n, where)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        masked_reconstruction_loss(model(video.to(torch.bfloat16), enc, dec), target, enc, dec).backward()
        return time.perf_counter() - t0

    arms = [(0, "first")] + [(n, w) for n in blocks if n for w in ("first", "spread")]
    load_before = os.getloadavg()
    for arm in arms:
        step(*arm)  # warm-up
    seconds = {arm: [] for arm in arms}
    for _ in range(steps):
        for arm in arms:
            seconds[arm].append(step(*arm))
    peaks = {}
    for arm in arms:
        model.zero_grad(set_to_none=True)
        with PeakRSS() as mem:
            step(*arm)
        peaks[arm] = mem.delta
    base_s, base_peak = min(seconds[(0, "first")]), peaks[(0, "first")]
    rows = []
    for (n, where) in arms:
        extra_s = min(seconds[(n, where)]) - base_s
        saved = base_peak - peaks[(n, where)]
        rows.append({"blocks": n, "placement": where, "min_s": round(min(seconds[(n, where)]), 3),
                     "seconds": [round(x, 3) for x in seconds[(n, where)]], "peak_mib": round(peaks[(n, where)] / MiB, 1),
                     "saved_mib_vs_none": round(saved / MiB, 1), "recompute_s": round(extra_s, 3),
                     "saved_mib_per_recompute_s": round(saved / MiB / extra_s, 1) if n and extra_s > 0 else None})
    return {"what": "one process, bf16-cast model, forward + backward of the pre-training loss; peak RSS above the step's "
                    "start (1 ms sampling after malloc_trim); arms interleaved, min of the timed steps",
            "settings": {"model": model_name, "frames": frames, "clips": clips, "steps": steps, "threads": threads},
            "load_avg_before_after": [list(load_before), list(os.getloadavg())], "rows": rows}


def table(result: dict) -> str:
    lines = [f"{'N':>3s} {'s/step':>8s} {'measured MiB (rank 0/1)':>24s} {'predicted MiB':>14s} {'error':>7s}  load 1m"]
    for r in result["rows"]:
        pred = r.get("predicted", {}).get("peak_mib", float("nan"))
        lines.append(f"{r['blocks']:>3d} {r['median_step_s_after_first']:8.1f} {'/'.join(f'{m:.0f}' for m in r['measured_peak_mib']):>24s} "
                     f"{pred:14.0f} {r.get('error', float('nan')):+7.1%}  {r['load_avg_before_after'][0][0]:.1f}->"
                     f"{r['load_avg_before_after'][1][0]:.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 3, 6, 9, 12])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--clips", type=int, default=1, help="clips per rank")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ds-config", default="ds_configs/zero3_bf16.json")
    p.add_argument("--out", default=None, help="default: bench/results/checkpoint_sweep_<model>.json")
    p.add_argument("--repredict", action="store_true", help="only recompute the planner's predictions in --out")
    p.add_argument("--check-budget", action="store_true", help="only run the planner's pick for a budget between the extremes")
    p.add_argument("--placement", action="store_true", help="first-N vs spread in one process (see the module text)")
    p.add_argument("--threads", type=int, default=2, help="--placement: torch threads")
    args = p.parse_args()
    if args.placement:
        result = placement(args.model, args.blocks, args.frames, args.clips, args.steps, args.threads)
        path = Path(args.out or ROOT / "bench" / "results" / f"checkpoint_placement_{args.model}.json")
        path.write_text(json.dumps(result, indent=1) + "\n")
        for r in result["rows"]:
            print(r)
        print(f"wrote {path}")
        return
    out = Path(args.out or ROOT / "bench" / "results" / f"checkpoint_sweep_{args.model}.json")

    if args.repredict or args.check_budget:
        result = with_predictions(json.loads(out.read_text()))
        if args.check_budget:
            result["budget_check"] = check_budget(result, args.ds_config)
    else:
        rows = []
        for n in args.blocks:
            rows.append(measure(args.model, n, args.frames, args.clips, args.steps, args.ds_config))
            print(f"[checkpoint_sweep] N={n}: {rows[-1]['median_step_s_after_first']} s/step, "
                  f"peak {rows[-1]['measured_peak_mib']} MiB above idle", flush=True)
        result = with_predictions({
            "what": "2-rank ZeRO-3 bf16 pre-training on CPU (dual masking, noise clips) with the first N encoder blocks "
                    "(and the same share of decoder blocks, rounded up) checkpointed: per-rank peak RSS above an idle rank "
                    "and seconds per step after the first, vs the planner's --device cpu peak without reserve",
            "settings": {"model": args.model, "frames": args.frames, "input_size": 224, "clips": args.clips,
                         "steps": args.steps, "ds_config": args.ds_config, "cpus": os.cpu_count(),
                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")},
            "rows": rows,
        })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    if "budget_check" in result:
        print(json.dumps({k: v for k, v in result["budget_check"].items() if k != "run"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
