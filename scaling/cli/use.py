"""`scaling eval|predict|features|visualize`: use trained weights (any export, a DeepSpeed
checkpoint folder, or a public VideoMAE V2 checkpoint). The work is in scaling/use/."""
from __future__ import annotations

import json
import os
import subprocess

WEIGHTS_HELP = ("an export (.pt or .safetensors from `scaling export` or a pipeline stage), a run folder (its latest "
                "DeepSpeed checkpoint), a checkpoints/ or step folder, or a public VideoMAE V2 checkpoint (.pth)")
CLASSES_HELP = ("class names: k400, k600, k700, k710 (a 710-way head is narrowed to that dataset's rows) or a file of "
                "one name per line (default: the Kinetics list matching the head, else class_<i>)")
TRUST_HELP = "unpickle the weights in full (can run code stored in the file); only for files whose origin you trust"
PRECISIONS = ("bf16", "fp16", "fp32")


def cmd_eval(args) -> int:
    from scaling import launch
    from scaling.config import ConfigError  # here: building the parser must not import torch (seconds)
    from scaling.use.eval_run import EvalOptions, run_eval

    if args.ranks < 1:
        raise ConfigError(f"--ranks must be 1 or more, got {args.ranks}")
    if args.ranks > 1 and not launch.under_launcher():
        return launch_eval_ranks(args)
    run_eval(EvalOptions(
        weights=args.weights, shards=args.shards, clips=args.clips, crops=args.crops, classes=args.classes,
        batch=args.batch, out=args.out, precision=args.precision, stride=args.stride, sampling=args.sampling,
        num_workers=args.workers, experiment=args.experiment, tracking=not args.no_tracking, trust=args.trust_checkpoint))
    return 0


def launch_eval_ranks(args) -> int:
    """`args.ranks` local processes with torch's launcher, each running this same command."""
    from scaling.launch import torchrun_command

    argv = ["--weights", args.weights, "--shards", args.shards, "--batch", str(args.batch),
            "--workers", str(args.workers), "--experiment", args.experiment]
    for flag, value in (("--clips", args.clips), ("--crops", args.crops), ("--classes", args.classes),
                        ("--out", args.out), ("--precision", args.precision), ("--stride", args.stride),
                        ("--sampling", args.sampling)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [flag for flag, on in (("--no-tracking", args.no_tracking), ("--trust-checkpoint", args.trust_checkpoint)) if on]
    cmd = [*torchrun_command(args.ranks), "-m", "scaling.cli", "eval", *argv]
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.ranks)))
    return subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS=threads))


def cmd_predict(args) -> int:
    from scaling.use.predict import PredictOptions, format_predictions, predict

    results = predict(PredictOptions(videos=args.videos, weights=args.weights, classes=args.classes, clips=args.clips,
                                     crops=args.crops, top=args.top, precision=args.precision,
                                     trust=args.trust_checkpoint))
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def add_use_parsers(sub) -> None:
    s = sub.add_parser("eval", help="multi-view test (clips x crops, softmax averaged) of any weights on labelled shards",
                       description="Top-1/top-5 of a classifier on webdataset shards; writes eval.json, per_class.csv "
                                   "and confusion.png and logs them to an MLflow run.")
    s.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    s.add_argument("--shards", required=True, help="labelled shards: a brace pattern or glob, e.g. 'data/val-{000000..000009}.tar'")
    s.add_argument("--clips", type=_positive, default=None, help="temporal views (default: the run's finetune.test_clips, else 5)")
    s.add_argument("--crops", type=_positive, default=None, help="spatial views (default: the run's finetune.test_crops, else 3)")
    s.add_argument("--classes", default=None, help=CLASSES_HELP)
    s.add_argument("--ranks", type=int, default=1, help="local processes, each evaluating its share of the videos (default 1)")
    s.add_argument("--batch", type=_positive, default=1, help="videos per forward pass and rank (x clips x crops); default 1")
    s.add_argument("--out", default=None, help="output folder (default: eval/ beside the weights)")
    s.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the run's train.precision, else fp32")
    s.add_argument("--stride", type=_positive, default=None, help="frame stride of a clip (default: the run's data.stride, else 4)")
    s.add_argument("--sampling", choices=("stride", "segments"), default=None,
                   help="frame choice (default: the run's data.sampling, else stride); segments for SSv2")
    s.add_argument("--workers", type=int, default=1, help="data loader workers per rank (default 1)")
    s.add_argument("--experiment", default="eval", help="MLflow experiment (default: eval)")
    s.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("predict", help="top-5 classes with probabilities for video files (mp4, webm, avi, ...)")
    s.add_argument("videos", nargs="+", help="video files")
    s.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    s.add_argument("--classes", default=None, help=CLASSES_HELP)
    s.add_argument("--clips", type=_positive, default=None, help="temporal views (default: the run's, else 5)")
    s.add_argument("--crops", type=_positive, default=None, help="spatial views (default: the run's, else 3)")
    s.add_argument("--top", type=_positive, default=5, help="classes listed per video (default 5)")
    s.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the run's train.precision, else fp32")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    s.set_defaults(func=cmd_predict)
    add_features_parser(sub)
    add_visualize_parser(sub)


def cmd_features(args) -> int:
    from scaling.use.features import FeatureOptions, extract

    extract(FeatureOptions(weights=args.weights, inputs=args.input, out=args.out, window=args.window, stride=args.stride,
                           pool=args.pool, batch=args.batch, precision=args.precision, trust=args.trust_checkpoint,
                           tracking=not args.no_tracking, experiment=args.experiment))
    return 0


def add_features_parser(sub) -> None:
    s = sub.add_parser("features", help="the frozen encoder over sliding windows of each video: one .npy per video + index",
                       description="Features of every video (files, folders or shards) into OUT/<key>.npy with "
                                   "OUT/index.jsonl; re-running the same command skips finished videos.")
    s.add_argument("--weights", required=True, help=WEIGHTS_HELP + "; a pre-training model gives its encoder's tokens")
    s.add_argument("--input", required=True, nargs="+", help="video files, folders of videos, or shards (.tar, brace pattern, glob)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--window", type=_positive, default=None,
                   help="frames a window spans; the model's num_frames are taken evenly from them (default: num_frames)")
    s.add_argument("--stride", type=_positive, default=None, help="frames between window starts (default: the window)")
    s.add_argument("--pool", choices=("mean", "none"), default="mean",
                   help="mean: one vector per window (windows x D); none: every token (windows x tokens x D)")
    s.add_argument("--batch", type=_positive, default=8, help="windows per forward pass (default 8)")
    s.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the run's train.precision, else fp32")
    s.add_argument("--experiment", default="features", help="MLflow experiment for the throughput (default: features)")
    s.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    s.set_defaults(func=cmd_features)


def cmd_visualize(args) -> int:
    from scaling.use.visualize import VisualizeOptions, visualize

    visualize(VisualizeOptions(weights=args.weights, video=args.video, out=args.out, mask=args.mask,
                               mask_ratio=args.mask_ratio, decoder=args.decoder, frames=args.frames, seed=args.seed,
                               trust=args.trust_checkpoint))
    return 0


def add_visualize_parser(sub) -> None:
    s = sub.add_parser("visualize", help="PNG of original / masked input / reconstruction of a pre-trained model",
                       description="Reconstruct one clip (the video's middle clip, centre crop) with a pre-training "
                                   "model; predictions are un-normalized with each patch's own mean and std. Writes "
                                   "the PNG and a JSON beside it with the loss.")
    s.add_argument("--weights", required=True, help="a pre-training export (encoder + decoder) or run folder")
    s.add_argument("--video", required=True, help="a video file (mp4, webm, avi, ...)")
    s.add_argument("--out", default=None, help="PNG path (default: <video stem>_reconstruction.png here)")
    s.add_argument("--mask", choices=("tube", "random"), default=None, help="encoder mask (default: the run's mask.encoder)")
    s.add_argument("--mask-ratio", type=float, default=None, help="encoder mask ratio (default: the run's, else 0.9)")
    s.add_argument("--decoder", choices=("running_cell", "none"), default=None,
                   help="decoder mask: running_cell (dual masking) or none (every hidden token); default: the run's")
    s.add_argument("--frames", type=_positive, default=4, help="frames shown (default 4)")
    s.add_argument("--seed", type=int, default=0, help="seed of the masks (default 0)")
    s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    s.set_defaults(func=cmd_visualize)
