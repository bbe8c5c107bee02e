"""`scaling predict`: top-5 classes with probabilities for video files.

Each file is decoded with the loaders' decoder (decord, PyAV where decord fails: mp4, webm,
avi, ...) and cut into the test views of `scaling eval` (clips x crops, scaling/use/views.py);
the softmax is averaged over the views, as in the multi-view test.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scaling.masking import finetune_drop_mask
from scaling.precision import DTYPES
from scaling.use.eval_run import class_names
from scaling.use.views import multi_views, read_video
from scaling.use.weights import classifier_from, device_for_rank, load_weights, target_classes


@dataclass
class PredictOptions:
    videos: list[str]
    weights: str
    classes: str | None = None
    clips: int | None = None
    crops: int | None = None
    top: int = 5
    precision: str | None = None
    trust: bool = False


@torch.no_grad()
def predict(o: PredictOptions) -> list[dict]:
    """[{"video": path, "top5": [{"class", "index", "probability"}, ...]}, ...] in input order."""
    w = load_weights(o.weights, o.trust)
    given = None if o.classes is None else class_names(o.classes, 0)
    num_classes = target_classes(w, given)
    names = given or class_names(None, num_classes)
    device = device_for_rank()
    dtype = DTYPES[o.precision or w.setting("train", "precision", "fp32")]
    model = classifier_from(w, num_classes).to(device=device, dtype=dtype)
    clips = o.clips or w.setting("finetune", "test_clips", 5)
    crops = o.crops or w.setting("finetune", "test_crops", 3)
    stride, sampling = w.setting("data", "stride", 4), w.setting("data", "sampling", "stride")
    mask, ratio = w.setting("mask", "finetune", "none"), w.setting("mask", "finetune_ratio", 0.5)
    results = []
    for path in o.videos:
        views = multi_views(read_video(path), w.num_frames, stride, w.input_size, clips, crops, sampling)
        drop = finetune_drop_mask(mask, views.shape[0], model.grid, ratio, train=False)  # MAR's fixed test pattern
        logits = model(views.to(device=device, dtype=dtype), None if drop is None else drop.to(device))
        probs = logits.float().softmax(dim=-1).mean(dim=0).cpu()  # (classes,), averaged over the views
        top = probs.topk(min(o.top, num_classes))
        results.append({"video": str(path), "top5": [
            {"class": names[i], "index": i, "probability": round(float(p), 6)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    return results


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(r["video"])
        lines += [f"  {p['probability']:.3f}  {p['class']}" for p in r["top5"]]
    return "\n".join(lines)
