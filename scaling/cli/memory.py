"""`scaling memory ...`: compute and memory accounting. One function per subcommand."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_memory_compare(args) -> int:
    from scaling.memory.compare import CompareSpec, run_compare
    from scaling.memory.report import chart, log_mlflow, table, write_json

    spec = CompareSpec(
        model=args.model, frames=args.frames, input_size=args.input_size, batch=args.batch,
        encoder_mask=args.encoder_mask, encoder_ratio=args.encoder_ratio, decoder_ratio=args.decoder_ratio,
        with_unmasked=args.with_unmasked, num_classes=args.num_classes, finetune=args.finetune,
        finetune_heads=tuple(h for h in args.finetune_heads.split(",") if h), finetune_ratio=args.finetune_ratio,
        finetune_reconstruction=args.finetune_reconstruction, time=not args.no_time,
        repeats=args.repeats, warmup=args.warmup, time_checkpointing=args.time_checkpointing,
        time_max_params=args.time_max_params * 1e6, seed=args.seed,
    )
    result = run_compare(spec, device=args.device)  # CompareError: one sentence, exit 2
    print(table(result))
    stem = Path(args.out_dir) / f"memory_compare_{args.model}{'_finetune' if args.finetune else ''}"
    files = [write_json(result, stem.with_suffix(".json")), chart(result, stem.with_suffix(".png"))]
    print("wrote " + " and ".join(str(f) for f in files))
    if not args.no_mlflow:
        run_id = log_mlflow(result, files, args.tracking_uri, args.experiment)
        print(f"logged MLflow run {run_id} (experiment '{args.experiment}')")
    return 0


def add_compare_parser(sub) -> None:
    s = sub.add_parser(
        "compare",
        help="dual vs encoder-only masking (optionally unmasked and MAR fine-tuning): params, FLOPs, saved bytes, step time",
        description="Count parameters, forward/backward FLOPs (FlopCounterMode, split encoder/decoder) and the bytes "
        "autograd saves for backward (with and without activation checkpointing) for each masking variant, on meta "
        "tensors so that any size can be counted; time real steps where the model is small enough for the device. "
        "With --finetune, also the fine-tune step on every token next to MAR's masked one (linear and bridging heads). "
        "Writes a table, <out-dir>/memory_compare_<model>[_finetune].json and .png, and an MLflow run.",
    )
    s.add_argument("--model", default="vit_b", help="registry size: debug, vit_s, vit_b, vit_l, vit_h, vit_g")
    s.add_argument("--frames", type=int, default=16)
    s.add_argument("--input-size", type=int, default=224, help="frame height and width in pixels")
    s.add_argument("--batch", type=int, default=1, help="clips per step")
    s.add_argument("--encoder-mask", default="tube", help="tube or random")
    s.add_argument("--encoder-ratio", type=float, default=0.9, help="share of tokens hidden from the encoder")
    s.add_argument("--decoder-ratio", type=float, default=0.5, help="running-cell share the decoder does not reconstruct (dual only)")
    s.add_argument("--with-unmasked", action="store_true",
                   help="also the unmasked case: the fine-tune model (encoder on every token + linear head, cross-entropy), "
                   "since the pre-training model at ratio 0 would have nothing to reconstruct")
    s.add_argument("--num-classes", type=int, default=710, help="head size of the unmasked and MAR (fine-tune) variants")
    s.add_argument("--finetune", action="store_true",
                   help="also the fine-tune steps: unmasked (as --with-unmasked) and MAR's running-cell drop mask "
                   "with each head of --finetune-heads (variants mar<ratio%%>_<head>); files get a _finetune suffix")
    s.add_argument("--finetune-heads", default="linear,bridging", help="with --finetune: comma-separated heads of the MAR variants")
    s.add_argument("--finetune-ratio", type=float, default=0.5, help="with --finetune: share of tokens MAR's mask drops")
    s.add_argument("--finetune-reconstruction", type=float, default=0.0, metavar="WEIGHT",
                   help="with --finetune: MAR variants keep the reconstruction branch with this loss weight "
                   "(MAR: 0.01 K400, 0.1 SSv2; 0: no branch)")
    s.add_argument("--no-time", action="store_true", help="count only; do not time real steps")
    s.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    s.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    s.add_argument("--time-checkpointing", action="store_true", help="also time steps with activation checkpointing")
    s.add_argument("--time-max-params", type=float, default=400, metavar="MILLIONS",
                   help="on the CPU, do not time models with more parameters than this (0: no limit); "
                   "a CPU ViT-g step needs ~10 GB and minutes")
    s.add_argument("--device", default=None, help="device for timing (default: cuda when present, else cpu)")
    s.add_argument("--seed", type=int, default=0, help="seed of the masks and weights")
    s.add_argument("--out-dir", default="runs/memory", help="folder for the JSON and PNG")
    s.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    s.add_argument("--experiment", default="memory", help="MLflow experiment name")
    s.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    s.set_defaults(func=cmd_memory_compare)


def cmd_memory_plan(args) -> int:
    from scaling.memory.plan import PlanSpec, plan, table

    checkpointing = not args.no_checkpointing if args.checkpoint_blocks is None else args.checkpoint_blocks
    spec = PlanSpec(
        model=args.model, masking=args.masking, checkpointing=checkpointing, precision=args.precision,
        zero_stage=args.zero_stage, offload_optimizer=args.offload_optimizer, offload_params=args.offload_params,
        gpus_per_node=args.gpus_per_node, nodes=args.nodes, gpu_memory_gb=args.gpu_memory_gb, frames=args.frames,
        input_size=args.input_size, encoder_ratio=args.encoder_ratio, decoder_ratio=args.decoder_ratio,
        reserve_gb=args.reserve_gb, device=args.device, ds_config=args.ds_config, micro_batch=args.micro_batch,
        budget_gb=args.budget_gb,
    )
    result = plan(spec)  # PlanError: one sentence, exit 2
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


def add_plan_parser(sub) -> None:
    s = sub.add_parser(
        "plan", help="will a size fit: model states per GPU (vs DeepSpeed's estimator), activations, largest micro-batch",
        description="Per-GPU memory of ZeRO pre-training: model states with DeepSpeed's estimator assumptions (and its "
        "own number beside), what that estimate leaves out, activation bytes per clip counted on the real model, and "
        "the largest micro-batch (clips per GPU) that fits, for dual and encoder-only masking with and without "
        "activation checkpointing.")
    s.add_argument("--model", default="vit_g", help="registry size: debug, vit_s, vit_b, vit_l, vit_h, vit_g")
    s.add_argument("--masking", default="dual", help="dual (VideoMAE V2) or encoder_only (VideoMAE); marks a row")
    s.add_argument("--no-checkpointing", action="store_true", help="mark the row without activation checkpointing")
    s.add_argument("--checkpoint-blocks", type=int, default=None, metavar="N",
                   help="mark a row with N encoder blocks checkpointed (model.activation_checkpointing=N)")
    s.add_argument("--budget-gb", type=float, default=0.0, metavar="GIB",
                   help="memory per rank: recommend, per masking mode, the fewest checkpointed blocks with which "
                   "--micro-batch clips (at least 1) fit, and the largest micro-batch there")
    s.add_argument("--precision", default="bf16", help="bf16, fp16 or fp32")
    s.add_argument("--zero-stage", type=int, default=3, help="1, 2 or 3")
    s.add_argument("--offload-optimizer", default="none", help="none, cpu or nvme (nvme: stage 3)")
    s.add_argument("--offload-params", default="none", help="none, cpu or nvme (stage 3, with optimizer offload)")
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GiB")
    s.add_argument("--frames", type=int, default=16)
    s.add_argument("--input-size", type=int, default=224)
    s.add_argument("--encoder-ratio", type=float, default=0.9)
    s.add_argument("--decoder-ratio", type=float, default=0.5)
    s.add_argument("--reserve-gb", type=float, default=2.0, help="per-GPU slack for the CUDA context and allocator (a guess)")
    s.add_argument("--device", default="gpu", help="gpu, or cpu: plan for CPU ranks like this box's (attention in fp32, RAM)")
    s.add_argument("--ds-config", default="ds_configs/zero3_bf16.json", help="DeepSpeed JSON whose bucket and reuse settings apply")
    s.add_argument("--micro-batch", type=int, default=0, help="also show the peak at this many clips per GPU")
    s.add_argument("--json", action="store_true", help="print the whole plan as JSON instead of the table")
    s.set_defaults(func=cmd_memory_plan)


def add_memory_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("memory", help="compute and memory accounting: what dual masking saves")
    sub = p.add_subparsers(dest="memory_command", required=True)
    add_compare_parser(sub)
    add_plan_parser(sub)
    return p
