"""Fit the planner's CPU terms (scaling/memory/plan.py CPU_TERMS) to measured per-rank peaks.

    .venv/bin/python bench/plan_calibrate.py          # reads plan_validate.json (+ checkpoint_sweep_vit_b.json)

Each measured case (a 2-rank ZeRO-3 bf16 run on this box: model, checkpointing, clips per
rank, frames; its worst rank's peak RSS above an idle rank after 3 steps) is split by the
uncalibrated planner into fixed F (model states + named extras), activations A (clips x counted
bytes per clip), optimizer scratch S and parameters per rank P. The model fitted is

    measured = F + framework + flat x P + max(A x (1 + share), S)

with framework >= 0 bytes, flat >= 0 bytes/param and share >= 0, chosen to minimise the
worst relative error over the cases (the criterion the planner is judged by), on a grid.
Only bench/results/plan_validate.json's cases are fitted; the runs of checkpoint_sweep_vit_b.json
(ViT-B at N checkpointed blocks) are predicted out of sample, and each fitted case is also
predicted by a fit without it (leave one out). Writes bench/results/plan_calibration.json: the
terms, and per case every term and the error before and after. The terms are then copied into CPU_TERMS by hand (a reviewed change).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MiB = 2**20


def split(model: str, checkpointing, clips: int, frames: int, ds_config: str) -> dict:
    """The uncalibrated planner's parts for one case, in bytes."""
    from scaling.memory.plan import PlanSpec, plan

    spec = PlanSpec(model=model, masking="dual", checkpointing=checkpointing, precision="bf16", zero_stage=3,
                    gpus_per_node=2, nodes=1, gpu_memory_gb=20, reserve_gb=0, device="cpu", ds_config=ds_config,
                    frames=frames, calibrated=False)
    r = plan(spec)
    row = next(x for x in r["fits"] if x["selected"])
    return {"F": r["fixed_per_gpu"], "A": clips * row["activation_per_clip"], "S": r["optimizer_temporaries"],
            "P": r["params"]["total"] / 2}


def cases(results: Path) -> list[dict]:
    out = []
    validate = json.loads((results / "plan_validate.json").read_text())
    for c in validate["cases"]:
        out.append({"case": f"plan_validate {c['case']}", "model": c["model"], "checkpointing": c["checkpointing"],
                    "clips": c["clips_per_rank"], "frames": 16, "ds_config": validate["ds_config"],
                    "measured": max(c["measured_peak_above_baseline_mib"]) * MiB})
    sweep_file = results / "checkpoint_sweep_vit_b.json"
    if sweep_file.is_file():
        sweep = json.loads(sweep_file.read_text())
        s = sweep["settings"]
        for r in sweep["rows"]:
            out.append({"case": f"checkpoint_sweep vit_b N={r['blocks']}", "model": s["model"], "checkpointing": r["blocks"],
                        "clips": s["clips"], "frames": s["frames"], "ds_config": s["ds_config"],
                        "measured": max(r["measured_peak_mib"]) * MiB})
    for c in out:
        c.update(split(c["model"], c["checkpointing"], c["clips"], c["frames"], c["ds_config"]))
    return out


def fit(rows: list[dict]) -> dict:
    F, A, S, P, M = (np.array([r[k] for r in rows], dtype=float) for k in ("F", "A", "S", "P", "measured"))
    best = None
    for share in np.arange(0.0, 3.0001, 0.02):
        act = np.maximum(A * (1 + share), S)
        for flat in np.arange(0.0, 12.0001, 0.1):
            rest = M - F - act - flat * P  # what the constant must cover, per case
            for c in np.linspace(max(0.0, rest.min()), max(0.0, rest.max()), 41):  # the constant, on a grid
                err = np.abs((F + c + flat * P + act - M) / M).max()
                if best is None or err < best[0]:
                    best = (err, c, flat, share)
    err, framework, flat, share = best
    return {"framework_bytes": int(round(framework / MiB)) * MiB, "flat_buffer_bytes_per_param": round(float(flat), 2),
            "allocator_share_of_activations": round(float(share), 2), "worst_relative_error": round(float(err), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--exclude", nargs="*", default=[], help="case names to leave out of the fit (kept in the report)")
    args = p.parse_args()
    results = Path(args.results)
    rows = cases(results)
    # The checkpoint sweep's runs (ViT-B, N blocks) are never fitted: they check the terms out of sample.
    held = set(args.exclude) | {r["case"] for r in rows if r["case"].startswith("checkpoint_sweep")}
    terms = fit([r for r in rows if r["case"] not in held])
    report = []
    for r in rows:
        act = max(r["A"] * (1 + terms["allocator_share_of_activations"]), r["S"])
        parts = {"model_states_and_named_extras": r["F"], "framework_buffers": terms["framework_bytes"],
                 "deepspeed_flat_buffers": terms["flat_buffer_bytes_per_param"] * r["P"],
                 "activations_counted": r["A"], "allocator_retention": r["A"] * terms["allocator_share_of_activations"],
                 "optimizer_scratch": r["S"],
                 "peak_phase": "backward" if r["A"] * (1 + terms["allocator_share_of_activations"]) >= r["S"] else "optimizer step"}
        predicted = r["F"] + terms["framework_bytes"] + terms["flat_buffer_bytes_per_param"] * r["P"] + act
        before = r["F"] + max(r["A"], r["S"])
        report.append({"case": r["case"], "in_fit": r["case"] not in held, "measured_mib": round(r["measured"] / MiB, 1),
                       "predicted_mib": round(predicted / MiB, 1), "error": round((predicted - r["measured"]) / r["measured"], 3),
                       "uncalibrated_mib": round(before / MiB, 1), "uncalibrated_error": round((before - r["measured"]) / r["measured"], 3),
                       "terms_mib": {k: (round(v / MiB, 1) if not isinstance(v, str) else v) for k, v in parts.items()}})
    # How well the form generalizes: each fitted case predicted by a fit without it.
    held_out = {}
    fitted = [r for r in rows if r["case"] not in held]
    for r in fitted:
        t = fit([x for x in fitted if x is not r])
        pred = (r["F"] + t["framework_bytes"] + t["flat_buffer_bytes_per_param"] * r["P"]
                + max(r["A"] * (1 + t["allocator_share_of_activations"]), r["S"]))
        held_out[r["case"]] = {"terms": t, "predicted_mib": round(pred / MiB, 1), "error": round((pred - r["measured"]) / r["measured"], 3)}
    out = results / "plan_calibration.json"
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[1].strip(), "terms": terms, "cases": report,
                               "leave_one_out": held_out}, indent=1) + "\n")
    print(json.dumps(terms))
    print(f"{'case':<36s}{'measured':>9s}{'before':>9s}{'err':>7s}{'after':>9s}{'err':>7s}")
    for r in report:
        print(f"{r['case'] + ('' if r['in_fit'] else ' (held out)'):<36s}{r['measured_mib']:9.0f}{r['uncalibrated_mib']:9.0f}"
              f"{r['uncalibrated_error']:+7.1%}{r['predicted_mib']:9.0f}{r['error']:+7.1%}")
    print("leave one out: " + ", ".join(f"{k.split()[-1]} {v['error']:+.1%}" for k, v in held_out.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
