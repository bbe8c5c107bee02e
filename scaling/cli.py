"""`scaling` command line: parse, load config, call one function."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scaling.config import ConfigError
from scaling.models.convert import CheckpointMismatchError, UntrustedCheckpointError

TRUST_HELP = ("load checkpoints from elsewhere (finetune.init_from, export folders) with full unpickling, which "
              "can run code stored in the file; only for files whose origin you trust")


def cmd_synth(args) -> int:
    from scaling.data.synth import write_synthetic_shards

    shards = write_synthetic_shards(args.out, args.num_videos, videos_per_shard=args.per_shard, seed=args.seed)
    print(f"wrote {args.num_videos} videos into {len(shards)} shards under {args.out}")
    return 0


def cmd_train(args, stage: str | None = None) -> int:
    """Validate, then run the config's stage here (under a launcher / 1 rank) or on local ranks."""
    from scaling import launch
    from scaling.config import load_config, save_config, validate

    trust = ["finetune.trust_checkpoint=true"] if getattr(args, "trust_checkpoint", False) else []
    cfg = load_config(args.config, ([f"stage={stage}"] if stage else []) + args.overrides + trust)
    world = int(os.environ["WORLD_SIZE"]) if launch.under_launcher() else cfg.train.ranks
    validate(cfg, world)
    check_before_launch(cfg, probe_tracking=not launch.under_launcher())
    if not launch.under_launcher() and cfg.train.ranks > 1:
        resolved = Path(cfg.train.output_dir) / "config.launch.yaml"
        save_config(cfg, resolved)
        code = launch.launch_local("train", resolved, cfg.train.ranks)
        if code and cfg.tracking.enabled:  # a rank killed or stuck behind a dead one could not close its run
            from scaling.tracking import fail_if_still_running

            fail_if_still_running(cfg.tracking.tracking_uri, cfg.train.output_dir)
        return code or exit_code_of_run(cfg)
    from scaling.train.pretrain import local_env_for_single_process

    # Ranks under an external launcher exit 0 when they stop early (a non-zero exit would read
    # as a crash to torchrun); the batch script reads <output_dir>/STOPPED instead.
    ranks_of_a_launcher = launch.under_launcher()
    local_env_for_single_process()
    if cfg.stage == "pretrain":
        from scaling.train.pretrain import run_pretrain

        run_pretrain(cfg)
    else:
        from scaling.train.finetune import run_finetune

        run_finetune(cfg)
    return 0 if ranks_of_a_launcher else exit_code_of_run(cfg)


def check_before_launch(cfg, probe_tracking: bool) -> None:
    """What a single run can check beyond `validate`: no pipeline around it (a pipeline hands
    its ranks a resolved path, never 'previous'), and, in the launching process only, an MLflow
    store the ranks can write (an unwritable or corrupt store would fail them after start-up)."""
    if cfg.stage == "finetune" and cfg.finetune.init_from == "previous":
        raise ConfigError("finetune.init_from=previous means the previous stage of a pipeline, and this is a single "
                          "run; give a checkpoint file (e.g. <pretrain run>/export/model_fp32.pt) or run the stages "
                          "with `scaling pipeline run`")
    if probe_tracking and cfg.tracking.enabled:
        from scaling.tracking import probe_store

        probe_store(cfg.tracking.tracking_uri)


def exit_code_of_run(cfg) -> int:
    """0, or EXIT_STOPPED when the run saved a checkpoint and stopped early (run it again to resume)."""
    from scaling.train.signals import EXIT_STOPPED, stopped_early

    return EXIT_STOPPED if stopped_early(cfg.train.output_dir) else 0


def cmd_export(args) -> int:
    from scaling.config import read_yaml
    from scaling.train.checkpoint import export_fp32, latest_tag

    run = Path(args.run)
    cfg_file = run / "config.yaml"
    extra = {"config": read_yaml(cfg_file)} if cfg_file.is_file() else {}
    tag = args.tag or latest_tag(run / "checkpoints")
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {run / 'checkpoints'} (no 'latest' file); train first or pass --tag")
    if not args.trust_checkpoint:  # DeepSpeed's consolidation unpickles every file in full
        from scaling.train.checkpoint_trust import check_checkpoint_folder

        check_checkpoint_folder(run / "checkpoints" / tag)
    out = export_fp32(run / "checkpoints", args.out or run / "export" / "model_fp32.pt", tag=tag, extra=extra)
    print(f"wrote consolidated fp32 weights to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaling", description="Video foundation models the VideoMAE V2 way, on DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write synthetic mp4 videos into webdataset shards")
    s.add_argument("--out", required=True, help="output folder for synth-NNNNNN.tar shards")
    s.add_argument("--num-videos", type=int, default=64)
    s.add_argument("--per-shard", type=int, default=16, help="videos per shard")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    for name, stage, text in (("pretrain", "pretrain", "masked-video pre-training (dual masking by default)"),
                              ("finetune", "finetune", "supervised training + multi-view evaluation"),
                              ("train", None, "run a config's own `stage`")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--config", required=True, help="YAML run config, e.g. pipelines/pretrain_smoke.yaml")
        s.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=40")
        s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
        s.set_defaults(func=lambda a, stage=stage: cmd_train(a, stage))

    s = sub.add_parser("export", help="consolidate a run's latest ZeRO checkpoint into fp32 weights")
    s.add_argument("run", help="the run's output_dir (holds checkpoints/ and config.yaml)")
    s.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    s.add_argument("--out", default=None, help="output .pt (default: <run>/export/model_fp32.pt)")
    s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    s.set_defaults(func=cmd_export)
    from scaling.cli_labels import add_labels_parser
    from scaling.cli_pipeline import add_pipeline_parser
    from scaling.cli_memory import add_memory_parser
    from scaling.cli_shard import add_shard_parser

    add_labels_parser(sub)
    add_pipeline_parser(sub)
    add_memory_parser(sub)
    add_shard_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, CheckpointMismatchError, UntrustedCheckpointError) as e:
        print(f"scaling {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
