"""Proof of value: does our pre-training make a better encoder than random weights?

On the motion task (`scaling synth --task motion`: the class is only the direction in which
the shapes of a clip move; forms, colours, sizes and backgrounds come from one distribution
for every class, and a clip's first frame is the same whatever its label), one pipeline runs,
every stage on 2 local ranks with ZeRO-3 through the real loaders and stage hand-off:

    probe_linear_random, probe_attentive_random, finetune_scratch   (random weights, init_from "")
    pretrain                                                         (dual masking; labels unused)
    probe_linear, probe_attentive, finetune                          (init_from: previous, chained)

The chained stages all start from the pre-trained encoder: a probe leaves its frozen encoder
as it was given (its export holds it unchanged, its head is dropped by the next stage), so the
attentive probe and the fine-tune start from exactly the weights the linear probe saw.
Fine-tuning from scratch and from pre-training get the same step budget and recipe: MAR's
bridging head and a layer decay of 0.01 (bench/pov_finetune_diagnose.py: with the reference's
linear head and decay 0.75, calibrated for 12 or more blocks, the 2-block encoder loses its
motion cues before a mean-pool head could read them, and neither arm leaves chance).

    python bench/proof_of_value.py                 # the full comparison (17 min at load 2.5-6)
    python bench/proof_of_value.py --size small    # a quicker check of the attentive probe only
    python bench/proof_of_value.py --size ci --in-process   # pre-training only, one rank, one process

Writes bench/results/proof_of_value[_<size>].json and .png (pre-training loss curve; top-1 of
every arm against chance; the held-out reconstruction below), and logs the pipeline as one
MLflow parent run with a nested run per stage; the JSON and PNG are attached to the parent run
(not with --in-process).

Every size also measures what pre-training learned on the held-out clips without any label
(`heldout_reconstruction`): the export's masked reconstruction loss, the same model at its
initial weights, predicting zeros, and the trained decoder behind the initial encoder. The ci
size (tests/integration/test_proof_of_value.py) asserts on it: a working pre-training ends
well below both untrained references, and its encoder carries the gain.

Measured (top-1 on 256 held-out clips, 2 clips x 1 crop; chance 25 %; one clip is 0.4 points
and a difference between two arms has a std of ~4 points):

- first setting (peak pre-training lr 4.7e-3, 1200 steps, 256/128 videos): every arm near
  chance (bench/results/proof_of_value_peak_lr_4.7e-3.json); bench/pov_diagnose.py traced it
  to the lr (1e-3 or more erases the motion cues random weights carry).
- peak 1.6e-4, tube 0.75, 1500 steps, fine-tune peak 3.1e-3 (proof_of_value_ft_lr3e-3.json):
  linear 26.2 -> 35.5 (+9.4), fine-tune 22.7 -> 24.2 (both at chance).
- tube 0.9, fine-tune peak 6.3e-4, linear head, layer decay 0.75, 8 epochs
  (proof_of_value_ft_lr6e-4_ld0.75.json, 1844 s at load 8-17): linear 26.2 -> 36.7 (+10.5), attentive 69.5 -> 85.2 (+15.6),
  fine-tune 25.4 from scratch -> 28.5 from pre-training (+3.1; neither learns much in 256 steps).
  Held-out masked reconstruction of that export (computed afterwards): 0.709, against 0.997
  for predicting zeros, 1.038 at the initial weights, 1.016 with the initial encoder behind
  the trained decoder.
- the current full size (as above; fine-tune with the bridging head, layer decay 0.01, peak
  3.1e-3, drop path 0, 12 epochs = 384 steps; proof_of_value.json, 1010 s at load 2.5-6):
  fine-tune 25.8 from scratch -> 90.2 from pre-training (+64.5); the probes as above (same
  seeds, same numbers): linear 26.2 -> 36.7 (+10.5), attentive 69.5 -> 85.2 (+15.6);
  held-out reconstruction 0.709 / zeros 0.997 / initial 1.038 / initial encoder 1.016.
- ci size with probes, in one process (400 steps, tube 0.75; proof_of_value_ci_tube75.json):
  linear 24.2 -> 28.1, attentive 32.0 -> 25.0: no margin to assert on at a CI budget.
- ci size as it is now (200 steps at peak lr 1e-3, 128 / 64 videos, one rank; 55-80 s of
  pipeline at load 5-8; proof_of_value_ci_seeds.json): held-out reconstruction 0.89-0.91 at
  5 seeds against zeros 0.998 and initial weights 1.04; the initial encoder behind the trained
  decoder 0.95-1.02. On 2 ranks through `scaling pipeline run` (proof_of_value_ci_2ranks.json,
  135 s): 0.901, 1.038, 0.993, as in one process. Sabotaged (proof_of_value_sabotage/*.diff
  applied to pre-training): zeroed target 0.998, another video's target 1.012, encoder left
  out of the optimizer 0.912 with the initial encoder giving the same 0.911; all three fail
  the test. The same mask for
  every clip still learns (0.897), as would masks not sliced per rank: tests/unit/
  test_pretrain_masks.py catches both; a probe that keeps its random trunk fails
  tests/integration/test_probe_stage.py (proof_of_value_ci_seeds.json, "sabotage_tests").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHANCE = 25.0  # 4 directions
STRIDE = 2  # frame stride of every clip: 16 frames span 32 of the 40 rendered
# Each size: videos (train, val), local ranks, model, pre-training steps and base lr (peak =
# base_lr x 8 videos / 256), supervised epochs (probe, fine-tune), and the comparisons it runs
# (a probe head or "finetune"; each gets a random-weights arm).
SIZES = {
    # bench/pov_diagnose.py: a peak lr of 1e-3 or more (this file's first setting, 4.7e-3) wipes out
    # the motion cues random weights carry; 1e-4 to 3e-4 keeps them and adds to them.
    "full": {"train": 512, "val": 256, "ranks": 2, "model": "debug", "pretrain_steps": 1500, "pretrain_base_lr": 0.005,
             "probe_epochs": 20, "finetune_epochs": 12, "compare": ("linear", "attentive", "finetune")},
    "small": {"train": 128, "val": 64, "ranks": 2, "model": "debug", "pretrain_steps": 400, "pretrain_base_lr": 0.005,
              "probe_epochs": 20, "finetune_epochs": 2, "compare": ("attentive",)},
    # tests/integration/test_proof_of_value.py: pre-training only, judged by its held-out
    # reconstruction (see heldout_reconstruction); the probes need ~1000 steps on this task
    # (400 steps gave linear 24.2 -> 28.1, attentive 32.0 -> 25.0). Peak lr 1e-3: the
    # reconstruction learns fastest there, whatever it does to the motion cues of the probes.
    "ci": {"train": 128, "val": 64, "ranks": 2, "model": "debug", "pretrain_steps": 200, "pretrain_base_lr": 0.032,
           "probe_epochs": 0, "finetune_epochs": 0, "compare": ()},
}
ARMS = {"linear": ("probe_linear_random", "probe_linear"), "attentive": ("probe_attentive_random", "probe_attentive"),
        "finetune": ("finetune_scratch", "finetune")}


def pipeline_for(size: dict, data: Path, out: Path, experiment: str, tracking_uri: str) -> dict:
    """The comparison as one pipeline YAML (a dict): random arms, pre-training, chained arms."""
    train = f"{data}/train/synth-{{000000..{size['train'] // 64 - 1:06d}}}.tar"
    val = val_pattern(data, size)
    # Horizontal flips would swap the classes 'right' and 'left': off, as for SSv2.
    source = [{"name": "motion", "shards": train, "weight": 1.0, "stride": STRIDE, "flip": False}]
    supervised = {"num_classes": 4, "val_shards": val, "test_clips": 2, "test_crops": 1}
    probe = lambda head, init: {  # noqa: E731
        "stage": "probe", "probe": {"head": head}, "finetune": {**supervised, "init_from": init},
        # peak lr 1.25e-2 (linear: its BatchNorm whitens the features) and 3.1e-3 (attentive) at 16 videos per step
        "optim": {"base_lr": 0.2 if head == "linear" else 0.05, "warmup_epochs": 1},
        "train": {"epochs": size["probe_epochs"], "global_batch": 16}}
    finetune = lambda init: {  # noqa: E731
        # bench/pov_finetune_diagnose.py: with layer decay 0.75 (calibrated for 12+ blocks) a 2-block
        # encoder trains at 0.4-0.75 x the peak lr and loses its motion cues before a mean-pool head
        # reads them; a strong decay keeps the encoder's tokens and MAR's bridging head reads them
        # (in that diagnosis 0.3, i.e. 0.75 matched to depth, did best; 0.01 is what this run measured).
        "stage": "finetune", "model": {"head": "bridging", "drop_path": 0.0},
        "finetune": {**supervised, "init_from": init, "layer_decay": 0.01, "mixup": 0.0,
                     "cutmix": 0.0, "rand_aug": "", "reprob": 0.0, "label_smoothing": 0.1},
        # peak 3.1e-3 at 16 videos per step, the attentive probe's
        "optim": {"base_lr": 0.05, "min_lr": 0.0001, "warmup_epochs": 1, "clip_grad": 5.0},
        "train": {"epochs": size["finetune_epochs"], "global_batch": 16}}
    return {
        "name": "proof_of_value", "output_dir": str(out), "ranks": size["ranks"],
        "tracking": {"experiment": experiment, "tracking_uri": tracking_uri},
        "defaults": {"model": {"name": size["model"], "num_frames": 16, "input_size": 64},
                     "data": {"sources": source, "num_workers": 1},
                     "train": {"precision": "bf16", "zero_stage": 3, "save_every": 1000, "log_every": 5}},
        "stages": {name: body for name, body in {
            "probe_linear_random": probe("linear", ""),
            "probe_attentive_random": probe("attentive", ""),
            "finetune_scratch": finetune(""),
            "pretrain": {"stage": "pretrain",
                         "mask": {"encoder": "tube", "encoder_ratio": 0.9, "decoder": "running_cell", "decoder_ratio": 0.5},
                         "data": {"num_sample": 2},
                         # peak = base_lr x 8 / 256: 1.6e-4 at 0.005
                         "optim": {"base_lr": size["pretrain_base_lr"], "min_lr": 0.0001,
                                   "warmup_steps": min(40, size["pretrain_steps"] // 10),
                                   "clip_grad": 1.0},
                         "train": {"steps": size["pretrain_steps"], "global_batch": 8, "log_every": 1}},
            "probe_linear": probe("linear", "previous"),
            "probe_attentive": probe("attentive", "previous"),
            "finetune": finetune("previous"),
        }.items() if name == "pretrain" or any(name in ARMS[c] for c in size["compare"])},
    }


def make_data(data: Path, size: dict) -> None:
    """Train and validation motion shards (seed 0 and 1), unless already there."""
    from scaling.data.synth import write_synthetic_shards

    for split, videos, per_shard, seed in (("train", size["train"], 64, 0), ("val", size["val"], 16, 1)):
        if not (data / split / f"synth-{videos // per_shard - 1:06d}.tar").is_file():
            write_synthetic_shards(data / split, videos, videos_per_shard=per_shard, seed=seed, task="motion")


def run_in_process(spec: Path, overrides: list[str]) -> dict:
    """The pipeline's stages, run here on one rank: the same spec, `init_from: previous`
    resolution and fp32 export between stages as `scaling pipeline run`, and the product's
    run_pretrain / run_probe / run_finetune, without a torchrun start per stage (a minute each
    on 2 busy cores). Returns {stage: {"top1": ...}} as run_pipeline does."""
    from scaling.pipeline.spec import load_pipeline
    from scaling.pipeline.state import complete_stage, resolve, start_stage
    from scaling.train.finetune import run_finetune
    from scaling.train.pretrain import run_pretrain
    from scaling.train.probe import run_probe
    from scaling.train.run import local_env_for_single_process

    pipe = load_pipeline(str(spec), overrides)
    local_env_for_single_process()
    runners = {"pretrain": run_pretrain, "probe": run_probe, "finetune": run_finetune}
    summary = {}
    for stage in pipe.stages:
        cfg, fingerprint = resolve(pipe, stage, parent_run_id="")
        start_stage(stage, cfg, fingerprint)
        print(f"[proof_of_value] {stage.name} ({cfg.stage}, from {cfg.finetune.init_from or 'random weights'})", flush=True)
        result = runners[cfg.stage](cfg)
        complete_stage(stage, cfg, fingerprint)
        summary[stage.name] = {"top1": result["top1"]} if isinstance(result, dict) and "top1" in result else {}
    return summary


def heldout_clips(val_pattern: str, num_frames: int, stride: int, input_size: int) -> torch.Tensor:
    """Every held-out video's middle clip, centre crop: (V, 3, T, S, S) normalized, as `scaling
    visualize` and the test views read them."""
    from scaling.data.video import open_video
    from scaling.use.features import videos_in
    from scaling.use.visualize import centre_clip

    return torch.cat([centre_clip(open_video(data), num_frames, stride, input_size)
                      for _, data in videos_in([val_pattern])])


@torch.no_grad()
def heldout_reconstruction(export: Path, val_pattern: str, stride: int, seed: int = 0) -> dict:
    """What pre-training learned, on clips it never saw: the masked reconstruction loss of the
    stage's export on every held-out clip, beside the same model at its initial weights and
    beside predicting zeros (the per-patch mean: the best a model can do that learned nothing
    about the clip it is given, e.g. one trained on a zeroed or another clip's target).
    The same masks (tube / running cell at the export's ratios, drawn from `seed`) for all three."""
    from scaling.losses import masked_reconstruction_loss, normalized_pixel_target
    from scaling.masking import make_masks
    from scaling.models.pretrain import build_pretrain_model
    from scaling.use.visualize import pretrain_model_from
    from scaling.use.weights import load_weights

    weights = load_weights(export)
    trained = pretrain_model_from(weights)
    torch.manual_seed(weights.setting("train", "seed", 0))  # the initial weights run_pretrain starts from
    initial = build_pretrain_model(weights.size_name, weights.num_frames, weights.input_size).eval()
    clips = heldout_clips(val_pattern, weights.num_frames, stride, weights.input_size)
    enc, dec = make_masks(len(clips), trained.grid, "tube", weights.setting("mask", "encoder_ratio", 0.9),
                          "running_cell", weights.setting("mask", "decoder_ratio", 0.5),
                          torch.Generator().manual_seed(seed))
    target = normalized_pixel_target(clips, trained.size.patch, trained.size.tubelet)  # (V, N, 2*p*p*3)

    def loss(model) -> float:
        batches = range(0, len(clips), 32)
        prediction = torch.cat([model(clips[i:i + 32], enc[i:i + 32], dec[i:i + 32]) for i in batches])
        return float(masked_reconstruction_loss(prediction, target, enc, dec))

    zeros = masked_reconstruction_loss(torch.zeros(*dec.shape[:1], int(dec[0].sum()), target.shape[-1]),
                                       target, enc, dec)
    result = {"clips": len(clips), "pretrained": loss(trained), "initial_weights": loss(initial),
              "zero_prediction": float(zeros)}
    # The trained decoder behind the initial encoder: how much of the above the encoder's
    # training carries (nothing if the optimizer never updated the encoder).
    trained.encoder.load_state_dict(initial.encoder.state_dict())
    result["initial_encoder_trained_decoder"] = loss(trained)
    return result


def losses(stage_dir: Path) -> list[tuple[int, float]]:
    path = stage_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [(r["step"], r["loss"]) for r in rows]


def val_pattern(data: Path, size: dict) -> str:
    return f"{data}/val/synth-{{000000..{size['val'] // 16 - 1:06d}}}.tar"


def summarize(out: Path, summary: dict, size: dict, seconds: float, command: str, loadavg_start,
              reconstruction: dict) -> dict:
    top1 = {arm: summary[arm].get("top1") for c in size["compare"] for arm in ARMS[c]}
    return {
        "task": "synth motion: 4 directions of motion, chance 25 %", "chance_top1": CHANCE, "size": size,
        "top1": top1,
        # top-1 from the pre-trained encoder minus top-1 from random weights, per comparison
        "gain": {c: top1[ARMS[c][1]] - top1[ARMS[c][0]] for c in size["compare"]},
        "pretrain_loss": losses(out / "pretrain"),
        # masked reconstruction loss on the held-out clips: pre-trained, initial weights, zeros
        "heldout_reconstruction": reconstruction,
        "finetune_loss": {arm: losses(out / arm) for arm in ARMS["finetune"] if arm in summary},
        "seconds": round(seconds, 1), "command": command, "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg(),
        "mlflow_parent_run": json.loads((out / "pipeline_run.json").read_text())["run_id"]
        if (out / "pipeline_run.json").is_file() else None,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ft, ax_top1) = plt.subplots(1, 3, figsize=(15, 4.2))
    steps, values = zip(*result["pretrain_loss"]) if result["pretrain_loss"] else ((), ())
    ax_loss.plot(steps, values)
    ax_loss.set(title="pre-training (dual masking): reconstruction loss", xlabel="step", ylabel="normalized-pixel MSE")
    for arm, curve in result["finetune_loss"].items():
        if curve:
            ax_ft.plot(*zip(*curve), label=arm)
    ax_ft.set(title="fine-tuning loss, same budget", xlabel="step", ylabel="cross-entropy")
    ax_ft.legend()
    arms = list(result["top1"])
    ax_top1.bar(range(len(arms)), [result["top1"][a] or 0 for a in arms],
                color=["#999999" if a.endswith(("_random", "_scratch")) else "#1f77b4" for a in arms])
    ax_top1.axhline(result["chance_top1"], color="red", linestyle="--", label="chance")
    ax_top1.set_xticks(range(len(arms)), [a.replace("_", "\n") for a in arms], fontsize=7)
    ax_top1.set(title="top-1 on held-out motion clips (grey: random weights)", ylabel="top-1 %", ylim=(0, 100))
    ax_top1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "proof_of_value", help="data and stage folders")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="where the JSON and PNG go")
    p.add_argument("--experiment", default="proof_of_value")
    p.add_argument("--tracking-uri", default="", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--in-process", action="store_true",
                   help="run the stages in this process on one rank, without MLflow (the CI test's way)")
    p.add_argument("overrides", nargs="*", help="pipeline overrides, e.g. stages.pretrain.train.steps=100")
    args = p.parse_args(argv)

    from scaling.pipeline.local import run_pipeline

    size = {**SIZES[args.size], **({"ranks": 1} if args.in_process else {})}
    work = args.work / args.size
    make_data(work / "data", size)
    spec = work / "pipeline.yaml"
    pipeline = pipeline_for(size, work / "data", work / "runs", args.experiment, args.tracking_uri)
    if args.in_process:
        pipeline["tracking"] = {"enabled": False}
    spec.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    t0, loadavg_start = time.time(), os.getloadavg()  # the machine is shared: how busy it was
    summary = run_in_process(spec, args.overrides) if args.in_process else run_pipeline(str(spec), args.overrides)
    command = "python bench/proof_of_value.py " + " ".join(argv if argv is not None else sys.argv[1:])
    reconstruction = heldout_reconstruction(work / "runs" / "pretrain" / "export" / "model_fp32.pt",
                                            val_pattern(work / "data", size), STRIDE)
    result = summarize(work / "runs", summary, size, time.time() - t0, command.strip(), loadavg_start, reconstruction)
    args.results.mkdir(parents=True, exist_ok=True)
    name = "proof_of_value" if args.size == "full" else f"proof_of_value_{args.size}"
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.results / f"{name}.png")
    log_to_parent(result, args.results / f"{name}.json", args.results / f"{name}.png", args.tracking_uri)
    print(json.dumps({k: result[k] for k in ("top1", "gain", "heldout_reconstruction", "seconds")}, indent=2))
    return result


def log_to_parent(result: dict, json_path: Path, png_path: Path, tracking_uri: str) -> None:
    """The comparison's numbers and figure on the pipeline's MLflow parent run."""
    if not result["mlflow_parent_run"]:
        return
    from mlflow import MlflowClient

    from scaling.tracking import tracking_uri_or_default

    client = MlflowClient(tracking_uri_or_default(tracking_uri))
    run_id = result["mlflow_parent_run"]
    for arm, top1 in result["top1"].items():
        if top1 is not None:
            client.log_metric(run_id, f"top1/{arm}", top1)
    for comparison, gain in result["gain"].items():
        client.log_metric(run_id, f"gain/{comparison}", gain)
    client.log_artifact(run_id, str(json_path))
    client.log_artifact(run_id, str(png_path))


if __name__ == "__main__":
    main()
