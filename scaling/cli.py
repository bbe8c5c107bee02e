"""`scaling` command line: parse, load config, call one function."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scaling.config import ConfigError
from scaling.models.convert import CheckpointMismatchError


def cmd_synth(args) -> int:
    from scaling.data.synth import write_synthetic_shards

    shards = write_synthetic_shards(args.out, args.num_videos, videos_per_shard=args.per_shard, seed=args.seed)
    print(f"wrote {args.num_videos} videos into {len(shards)} shards under {args.out}")
    return 0


def cmd_train(args, stage: str | None = None) -> int:
    """Validate, then run the config's stage here (under a launcher / 1 rank) or on local ranks."""
    from scaling import launch
    from scaling.config import load_config, save_config, validate

    cfg = load_config(args.config, ([f"stage={stage}"] if stage else []) + args.overrides)
    world = int(os.environ["WORLD_SIZE"]) if launch.under_launcher() else cfg.train.ranks
    validate(cfg, world)
    claim_run_folder(cfg, args, launch.under_launcher())
    if not launch.under_launcher() and cfg.train.ranks > 1:
        resolved = Path(cfg.train.output_dir) / "config.launch.yaml"
        save_config(cfg, resolved)
        code = launch.launch_local("train", resolved, cfg.train.ranks)
        return explain_failure(args, cfg, code) if code else exit_code_of_run(cfg)
    from scaling.train.checkpoint import EXIT_FAILED, RunFailed
    from scaling.train.pretrain import local_env_for_single_process
    from scaling.train.signals import EXIT_INTERRUPTED

    # Ranks under an external launcher exit 0 when they stop early (a non-zero exit would read
    # as a crash to torchrun); the batch script reads <output_dir>/STOPPED instead.
    ranks_of_a_launcher = launch.under_launcher()
    local_env_for_single_process()
    try:
        if cfg.stage == "pretrain":
            from scaling.train.pretrain import run_pretrain

            run_pretrain(cfg)
        else:
            from scaling.train.finetune import run_finetune

            run_finetune(cfg)
    except RunFailed as e:  # divergence, a failed save: said in one sentence, recorded in <output_dir>/FAILED
        print(f"scaling {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # a second Ctrl-C on a 1-rank run
        print(f"scaling {args.command}: stopped without saving", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if ranks_of_a_launcher else exit_code_of_run(cfg)


def claim_run_folder(cfg, args, under_launcher: bool) -> None:
    """One run per output folder, and a resume keeps the experiment's config (or says so),
    before any rank starts. Ranks started by `scaling` itself were checked by it."""
    from scaling.resume_check import check_resume
    from scaling.run_lock import LOCK_ENV, lock_run_folder

    if os.environ.get(LOCK_ENV) == str(Path(cfg.train.output_dir).resolve()):
        return
    if under_launcher and args.fresh:
        raise ConfigError(f"--fresh moves {cfg.train.output_dir} aside, which ranks under an external launcher "
                          "cannot do together; move the folder aside yourself, or run without the launcher")
    if under_launcher and os.environ.get("RANK") != "0":
        check_resume(cfg, fresh=False, allow_changed=True, quiet=True)  # rank 0 speaks for the run
        return
    lock_run_folder(cfg.train.output_dir)  # before --fresh: never move a folder a live run writes into
    check_resume(cfg, args.fresh, args.allow_changed)
    lock_run_folder(cfg.train.output_dir)  # the new folder, after --fresh moved the old one (and its lock) aside


def explain_failure(args, cfg, code: int) -> int:
    """The ranks failed: repeat the one sentence they left in <output_dir>/FAILED, if any, last."""
    from scaling.train.checkpoint import FAILED_FILE
    from scaling.train.signals import EXIT_INTERRUPTED

    failed = Path(cfg.train.output_dir) / FAILED_FILE
    close_mlflow_run(cfg, "KILLED" if code == EXIT_INTERRUPTED else "FAILED")
    if code == EXIT_INTERRUPTED:
        print(f"scaling {args.command}: stopped without saving", file=sys.stderr)
    elif failed.is_file():
        from scaling.train.checkpoint import EXIT_FAILED

        print(f"scaling {args.command}: error: {failed.read_text().strip()}", file=sys.stderr)
        return EXIT_FAILED  # torchrun says 1 whatever the ranks said
    return code


def close_mlflow_run(cfg, status: str) -> None:
    """Ranks that ended abruptly (a failed save, a second Ctrl-C) leave their MLflow run
    RUNNING; the launching process closes it with how it really ended. The folder's lock means
    no other live run can own it."""
    run_file = Path(cfg.train.output_dir) / "mlflow_run_id"
    if not cfg.tracking.enabled or not run_file.is_file():
        return
    try:
        from mlflow import MlflowClient

        from scaling.tracking import tracking_uri_or_default

        client = MlflowClient(tracking_uri_or_default(cfg.tracking.tracking_uri))
        run_id = run_file.read_text().strip()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001 - tracking never turns a failure into a crash
        print(f"[scaling] warning: could not mark MLflow run {status} ({e})", file=sys.stderr)


def exit_code_of_run(cfg) -> int:
    """0, or EXIT_STOPPED when the run saved a checkpoint and stopped early (run it again to resume)."""
    from scaling.train.signals import EXIT_STOPPED, stopped_early

    return EXIT_STOPPED if stopped_early(cfg.train.output_dir) else 0


def cmd_export(args) -> int:
    import yaml

    from scaling.train.checkpoint import export_fp32

    run = Path(args.run)
    cfg_file = run / "config.yaml"
    extra = {"config": yaml.safe_load(cfg_file.read_text())} if cfg_file.is_file() else {}
    out = export_fp32(run / "checkpoints", args.out or run / "export" / "model_fp32.pt", tag=args.tag, extra=extra)
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
        s.add_argument("--fresh", action="store_true", help="start afresh: move a previous run in output_dir aside")
        s.add_argument("--allow-changed", action="store_true",
                       help="resume a run whose config changed (model, masking, data, optimizer, schedule)")
        s.set_defaults(func=lambda a, stage=stage: cmd_train(a, stage))

    s = sub.add_parser("export", help="consolidate a run's latest ZeRO checkpoint into fp32 weights")
    s.add_argument("run", help="the run's output_dir (holds checkpoints/ and config.yaml)")
    s.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    s.add_argument("--out", default=None, help="output .pt (default: <run>/export/model_fp32.pt)")
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
    except (ConfigError, FileNotFoundError, CheckpointMismatchError) as e:
        print(f"scaling {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
