"""`scaling eval`: the multi-view test of any weights on labelled shards, on one or N ranks.

The fine-tune stage's own test (scaling/evaluate.py) with a plain model per rank instead of a
DeepSpeed engine: the same loader, views, MAR test mask, precision and per-video averaging,
so an export, the DeepSpeed checkpoint it came from and the stage's test give the same
numbers. Every rank holds the whole model (inference needs no ZeRO partitioning to fit
anything up to ViT-g on a GPU) and takes its share of the videos; rank 0 gathers them and writes

    <out>/eval.json          top-1, top-5, videos, views, per-class accuracy (by name), settings
    <out>/per_class.csv      class, name, videos, top-1
    <out>/confusion.png      the confusion matrix (rows: true class, normalized per row)

and logs the metrics and these files to an MLflow run (experiment `eval` by default).
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from scaling.data.finite import build_finetune_loader
from scaling.evaluate import accuracy, gather_videos, video_probabilities
from scaling.precision import DTYPES
from scaling.use.weights import WeightsError, classifier_from, device_for_rank, load_weights, target_classes


@dataclass
class EvalOptions:
    weights: str
    shards: str
    clips: int | None = None  # None: the run's finetune.test_clips, else 5
    crops: int | None = None  # None: the run's finetune.test_crops, else 3
    classes: str | None = None  # k400/k600/k700/k710 or a file of names
    batch: int = 1  # videos per forward pass and rank (x views clips)
    out: str | None = None
    precision: str | None = None  # None: the run's train.precision, else fp32
    stride: int | None = None
    sampling: str | None = None
    num_workers: int = 1
    experiment: str = "eval"
    tracking: bool = True
    trust: bool = False


def default_out(weights: str) -> Path:
    """An `eval/` folder beside the weights (inside a run folder for a folder)."""
    p = Path(weights)
    return p / "eval" if p.is_dir() else p.parent / "eval"


def class_names(spec: str | None, num_classes: int) -> list[str]:
    """Names for the classes: `spec` (k400/k600/k700/k710 or a file of one name per line), else
    the Kinetics list matching the head's size, else class_<i>."""
    from scaling.label_space import load_class_list, load_k710_classes

    spec = spec or (f"k{num_classes}" if num_classes in (400, 600, 700, 710) else None)
    if spec is None:
        return [f"class_{i}" for i in range(num_classes)]
    if spec in ("k400", "k600", "k700"):
        return load_class_list(int(spec[1:]))
    if spec == "k710":
        return load_k710_classes()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--classes {spec}: not k400/k600/k700/k710 and no such file; give one of those "
                                "or a text file with one class name per line")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ranks() -> tuple[int, int]:
    """(rank, world) of this process; a process group when started by a launcher."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_eval(o: EvalOptions) -> dict:
    """Evaluate; rank 0 returns the metrics (with `per_class_accuracy`) and writes the files."""
    rank, world = ranks()
    w = load_weights(o.weights, o.trust)
    given = None if o.classes is None else class_names(o.classes, 0)
    num_classes = target_classes(w, given)
    names = given or class_names(None, num_classes)
    model = classifier_from(w, num_classes)
    device = device_for_rank()
    precision = o.precision or w.setting("train", "precision", "fp32")
    dtype = DTYPES[precision]
    model.to(device=device, dtype=dtype)
    clips = o.clips or w.setting("finetune", "test_clips", 5)
    crops = o.crops or w.setting("finetune", "test_crops", 3)
    loader = build_finetune_loader(
        o.shards, videos_per_batch=o.batch, num_frames=w.num_frames, input_size=w.input_size,
        stride=o.stride or w.setting("data", "stride", 4), sampling=o.sampling or w.setting("data", "sampling", "stride"),
        num_workers=o.num_workers, rank=rank, world_size=world, train=False, test_clips=clips, test_crops=crops,
    )
    if rank == 0:
        print(f"[scaling] eval: {w.size_name} {w.head} head, {num_classes} classes, from {w.source}; "
              f"{loader.num_samples} videos x {clips} clips x {crops} crops on {world} rank(s), {precision}", flush=True)
    t0 = time.perf_counter()
    local = video_probabilities(model, loader, dtype, w.setting("mask", "finetune", "none"),
                                w.setting("mask", "finetune_ratio", 0.5), device=device)
    per_video = gather_videos(local, world)
    seconds = time.perf_counter() - t0
    if rank != 0:
        return {}
    bad = sorted({label for _, label in per_video.values() if not 0 <= label < num_classes})
    if bad:
        raise WeightsError(f"the shards hold labels {bad[:5]} outside the model's {num_classes} classes; evaluate on "
                           "shards of the label space the model was trained on, or pass --classes")
    results = accuracy(per_video, num_classes)
    results.update({"videos_per_s": results["videos"] / seconds, "seconds": seconds})
    out = Path(o.out) if o.out else default_out(o.weights)
    write_results(out, results, per_video, names, {
        "weights": str(o.weights), "source": w.source, "shards": o.shards, "clips": clips, "crops": crops,
        "precision": precision, "ranks": world, "classes": num_classes})
    print(f"[scaling] eval: top1 {results['top1']:.2f} top5 {results['top5']:.2f} on {results['videos']} videos "
          f"({clips} clips x {crops} crops, {seconds:.1f} s); wrote {out / 'eval.json'}", flush=True)
    if o.tracking:
        log_to_mlflow(out, results, o, {"weights": str(o.weights), "source": w.source, "shards": o.shards, "clips": clips,
                                        "crops": crops, "classes": o.classes or num_classes, "precision": precision})
    return results


def confusion(per_video: dict, num_classes: int) -> torch.Tensor:
    """(classes, classes) counts: row = true class, column = top-1 prediction."""
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for probs, label in per_video.values():
        matrix[label, int(probs.argmax())] += 1
    return matrix


def write_results(out: Path, results: dict, per_video: dict, names: list[str], settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    per_class = results["per_class_accuracy"]
    matrix = confusion(per_video, len(names))
    counts = matrix.sum(dim=1).tolist()
    report = {**{k: v for k, v in results.items() if k != "per_class_accuracy"}, **settings,
              "per_class_accuracy": {names[c]: acc for c, acc in sorted(per_class.items())}}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "per_class.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["class", "name", "videos", "top1"])
        for c, acc in sorted(per_class.items()):
            rows.writerow([c, names[c], counts[c], f"{acc:.2f}"])
    plot_confusion(matrix, names, out / "confusion.png")


def plot_confusion(matrix: torch.Tensor, names: list[str], path: Path) -> None:
    """Row-normalized confusion matrix; class names on the axes up to 40 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.float() / matrix.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(names)
    side = min(4 + n * 0.25, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion (row-normalized), {int(matrix.sum())} videos")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_to_mlflow(out: Path, results: dict, o: EvalOptions, params: dict) -> None:
    from scaling.tracking import MLflowTracker

    tracker = MLflowTracker("", o.experiment, run_name=f"eval {Path(o.weights).name}")
    tracker.log_params(params)
    tracker.log_metrics({f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}, step=0)
    for name in ("eval.json", "per_class.csv", "confusion.png"):
        tracker.log_artifact(str(out / name))
    tracker.close("FINISHED")
