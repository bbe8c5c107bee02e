"""Outputs of `scaling memory compare`: terminal table, JSON, PNG chart, MLflow run.

Columns are variants; "decoder" is the pre-training decoder or, for the fine-tune variants,
MAR's reconstruction branch; "other" is the encoder-to-decoder projection or the
classifier head (linear, or bridging blocks + linear)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from scaling.tracking import MLflowTracker, flatten

MiB = 2**20


def _g(x: float) -> str:
    return f"{x / 1e9:.4g}"


def table(result: dict) -> str:
    """Variants as columns, measures as rows."""
    variants = result["variants"]
    names = list(variants)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn) -> None:
        rows.append((label, [fn(v) for v in variants.values()]))

    row("tokens encoder / decoder", lambda v: f"{v['tokens']['encoder']} / {v['tokens']['decoder']}")
    row("params total (M)", lambda v: f"{v['params']['total'] / 1e6:.2f}")
    row("  encoder / decoder (M)", lambda v: f"{v['params']['encoder'] / 1e6:.2f} / {v['params']['decoder'] / 1e6:.2f}")
    row("  other: head, enc->dec (M)", lambda v: f"{v['params']['other'] / 1e6:.2f}")
    row("forward GMACs total", lambda v: _g(v["forward_macs"]["total"]))
    row("  encoder / decoder", lambda v: f"{_g(v['forward_macs']['encoder'])} / {_g(v['forward_macs']['decoder'])}")
    row("  other: head, enc->dec", lambda v: _g(v["forward_macs"]["other"]))
    row("  attention matmuls", lambda v: _g(v["forward_macs"]["attention"]))
    row("forward GFLOPs", lambda v: _g(v["forward_flops"]["total"]))
    row("backward GFLOPs", lambda v: _g(v["backward_flops"]["plain"]["total"]))
    row("  with checkpointing", lambda v: _g(v["backward_flops"]["checkpointing"]["total"]))
    row("saved for backward (MiB)", lambda v: f"{v['saved_bytes']['plain'] / MiB:.1f}")
    row("  with checkpointing", lambda v: f"{v['saved_bytes']['checkpointing'] / MiB:.1f}")
    row("step time (s)", lambda v: _time(v, "plain"))
    if any("checkpointing" in v["step_time"] for v in variants.values()):
        row("  with checkpointing", lambda v: _time(v, "checkpointing"))
    row("peak CUDA allocated (MiB)", _peak)
    ref = result.get("reference") or {}
    for part in ("total", "decoder"):
        if ref:
            rows.append((f"reference GMACs {part} (err)", [
                f"{_g(ref[n][part]['reference'])} ({ref[n][part]['error_pct']:+.2f}%)" if n in ref else "-" for n in names]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    lines = [" " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols))]
    lines += [label.ljust(width) + "  " + "  ".join(x.rjust(c) for x, c in zip(vals, cols)) for label, vals in rows]
    for name, r in (result.get("mar_over_unmasked") or {}).items():
        lines.append(f"{name} / unmasked: forward FLOPs encoder x{r['forward_flops_encoder']:.3f}, "
                     f"total x{r['forward_flops_total']:.3f}; saved bytes "
                     f"x{r['saved_bytes_plain']:.3f} (x{r['saved_bytes_checkpointing']:.3f} with checkpointing)")
    skipped = {v["step_time"].get("skipped") for v in variants.values()} - {None}
    lines += [f"step time: {s}" for s in skipped]
    host = result["host"]
    timed = any(isinstance(t, dict) and "median_s" in t for v in variants.values() for t in v["step_time"].values())
    if timed and result["device"] == "cpu" and max(host["load_avg_1m_before"], host["load_avg_1m_after"]) > host["cpus"]:
        lines.append(f"note: load average {host['load_avg_1m_before']:.1f} -> {host['load_avg_1m_after']:.1f} on "
                     f"{host['cpus']} CPUs while timing: other work shared the cores, so step times are inflated")
    return "\n".join(lines)


def _time(v: dict, key: str) -> str:
    t = v["step_time"].get(key)
    return f"{t['median_s']:.2f}" if t else "-"


def _peak(v: dict) -> str:
    t = v["step_time"].get("plain")
    return f"{t['peak_cuda_bytes'] / MiB:.0f}" if t and t["peak_cuda_bytes"] is not None else "n/a"


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def chart(result: dict, path: Path) -> Path:
    """Three panels per variant: forward+backward GFLOPs by part, saved MiB, step time."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the training machines
    import matplotlib.pyplot as plt

    variants = result["variants"]
    names = list(variants)
    x = range(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))

    ax = axes[0]
    bottom = [0.0] * len(names)
    for part, color in (("encoder", "tab:blue"), ("decoder", "tab:orange"), ("other", "tab:gray")):  # other: head
        for phase, hatch in (("forward", ""), ("backward", "//")):
            vals = [(v["forward_flops"] if phase == "forward" else v["backward_flops"]["plain"])[part] / 1e9 for v in variants.values()]
            label = f"{'other (head)' if part == 'other' else part} {phase}"
            ax.bar(x, vals, bottom=bottom, color=color, hatch=hatch, edgecolor="white", label=label)
            bottom = [b + y for b, y in zip(bottom, vals)]
    for i, top in enumerate(bottom):
        ax.annotate(f"{top:.0f}" if top >= 10 else f"{top:.3g}", (i, top), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(top=max(bottom) * 1.12 or 1)
    ax.set_title("GFLOPs per step (no checkpointing)")
    ax.legend(fontsize=7)

    ax = axes[1]
    w = 0.38
    for off, key in ((-w / 2, "plain"), (w / 2, "checkpointing")):
        bars = ax.bar([i + off for i in x], [v["saved_bytes"][key] / MiB for v in variants.values()], w, label=key)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_title("bytes saved for backward (MiB)")
    ax.legend(fontsize=8)

    ax = axes[2]
    times = [(v["step_time"].get("plain") or {}).get("median_s", 0.0) for v in variants.values()]
    rotation = 25 if len(names) > 3 else 0  # longer rows of names (fine-tune variants) would overlap
    for ax in axes[:2]:
        ax.set_xticks(list(x), names, rotation=rotation, ha="right" if rotation else "center")
    ax = axes[2]
    if any(times):
        ax.bar_label(ax.bar(x, times, color="tab:green"), fmt="%.2f", fontsize=8)
        ax.set_xticks(list(x), names, rotation=rotation, ha="right" if rotation else "center")
        ax.set_title(f"step time (s), {result['device']}, load {result['host']['load_avg_1m_before']:.1f}")
    else:
        reason = next((v["step_time"].get("skipped") for v in variants.values() if v["step_time"].get("skipped")), "")
        ax.axis("off")
        ax.text(0.5, 0.5, "step time not measured:\n" + textwrap.fill(reason, 45), ha="center", va="center", wrap=True)
    s = result["spec"]
    finetune = ""
    if s.get("finetune"):
        rec = f", reconstruction x{s['finetune_reconstruction']}" if s["finetune_reconstruction"] > 0 else ""
        finetune = f"  |  fine-tune: MAR drops {s['finetune_ratio']:.0%}{rec}"
    fig.suptitle(f"{s['model']}  {s['frames']}x{s['input_size']}  batch {s['batch']}  "
                 f"{s['encoder_mask']} {s['encoder_ratio']} / running cell {s['decoder_ratio']}{finetune}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metrics(result: dict) -> dict:
    """Flat per-variant numbers for MLflow, e.g. 'dual.forward_macs.total'."""
    out = {}
    for name, v in result["variants"].items():
        out.update({f"{name}.params.{k}": n for k, n in v["params"].items()})
        out.update({f"{name}.forward_macs.{k}": n for k, n in v["forward_macs"].items()})
        out.update({f"{name}.forward_flops.{k}": n for k, n in v["forward_flops"].items()})
        for key, split in v["backward_flops"].items():
            out.update({f"{name}.backward_flops_{key}.{k}": n for k, n in split.items()})
        out.update({f"{name}.saved_bytes.{k}": n for k, n in v["saved_bytes"].items()})
        for key, t in v["step_time"].items():
            if isinstance(t, dict):
                out[f"{name}.step_s.{key}"] = t["median_s"]
                if t["peak_cuda_bytes"] is not None:
                    out[f"{name}.peak_cuda_bytes.{key}"] = t["peak_cuda_bytes"]
    for name, parts in (result.get("reference") or {}).items():
        out.update({f"{name}.reference_error_pct.{part}": p["error_pct"] for part, p in parts.items()})
    for name, ratios in (result.get("mar_over_unmasked") or {}).items():
        out.update({f"{name}.over_unmasked.{k}": r for k, r in ratios.items()})
    return out


def log_mlflow(result: dict, files: list[Path], tracking_uri: str, experiment: str) -> str:
    """One MLflow run with the spec as params, the numbers as metrics, the files as artifacts."""
    suffix = "-finetune" if result["spec"].get("finetune") else ""
    tracker = MLflowTracker(tracking_uri, experiment, run_name=f"memory-compare-{result['spec']['model']}{suffix}",
                            tags={"scaling.command": "memory compare"})
    try:
        tracker.log_params({**flatten(result["spec"]), "device": result["device"], "torch": result["torch"]})
        tracker.log_metrics(metrics(result), step=0)
        for f in files:
            tracker.log_artifact(str(f))
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
    return tracker.run_id
