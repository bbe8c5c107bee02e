"""`scaling pretrain|finetune|train|export`: validate a run config, claim its folder, run it
here or on local ranks; consolidate a run's checkpoint into exports."""
from __future__ import annotations

import os
import sys
from pathlib import Path

TRUST_HELP = ("load checkpoints from elsewhere (finetune.init_from, export folders) with full unpickling, which "
              "can run code stored in the file; only for files whose origin you trust")


def cmd_train(args, stage: str | None = None) -> int:
    """Validate, then run the config's stage here (under a launcher / 1 rank) or on local ranks."""
    from scaling import launch
    from scaling.config import load_config, save_config, validate

    trust = ["finetune.trust_checkpoint=true"] if getattr(args, "trust_checkpoint", False) else []
    cfg = load_config(args.config, ([f"stage={stage}"] if stage else []) + args.overrides + trust)
    world = int(os.environ["WORLD_SIZE"]) if launch.under_launcher() else cfg.train.ranks
    validate(cfg, world)
    resolve_precision(cfg, launch.under_launcher())
    resolve_offload_adam(cfg, launch.under_launcher())
    check_before_launch(cfg, probe_tracking=not launch.under_launcher())
    claim_run_folder(cfg, args, launch.under_launcher())
    if not launch.under_launcher() and cfg.train.ranks > 1:
        resolved = Path(cfg.train.output_dir) / "config.launch.yaml"
        save_config(cfg, resolved)
        code = launch.launch_local("train", resolved, cfg.train.ranks)
        return explain_failure(args, cfg, code) if code else exit_code_of_run(cfg)
    from scaling.train.checkpoint import EXIT_FAILED, RunFailed
    from scaling.train.run import local_env_for_single_process
    from scaling.train.signals import EXIT_INTERRUPTED

    # Ranks under an external launcher exit 0 when they stop early (a non-zero exit would read
    # as a crash to torchrun); the batch script reads <output_dir>/STOPPED instead.
    ranks_of_a_launcher = launch.under_launcher()
    local_env_for_single_process()
    try:
        if cfg.stage == "pretrain":
            from scaling.train.pretrain import run_pretrain

            run_pretrain(cfg)
        elif cfg.stage == "probe":
            from scaling.train.probe import run_probe

            run_probe(cfg)
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


def resolve_precision(cfg, under_launcher: bool) -> None:
    """`train.precision: auto` -> bf16/fp16/fp32 here, before the ranks start, so the config saved
    beside the checkpoints says what was trained; rank 0 says why. Under an external launcher
    only rank 0 decides: the others keep `auto` and take rank 0's choice once the process group
    exists (scaling.precision.agree_on_precision), so nodes cannot decide differently."""
    from scaling.precision import resolve_run_precision

    if under_launcher and os.environ.get("RANK", "0") != "0":
        return
    threads = torch_threads() if under_launcher or cfg.train.ranks == 1 else max(1, (os.cpu_count() or 1) // cfg.train.ranks)
    resolve_run_precision(cfg, threads, say=lambda line: print(line, flush=True))


def resolve_offload_adam(cfg, under_launcher: bool) -> None:
    """`optim.offload_adam: auto` -> its choice for an offloaded run, said once (rank 0)."""
    from scaling.train.offload_optimizer import resolve_offload_adam as resolve

    quiet = under_launcher and os.environ.get("RANK") != "0"
    resolve(cfg, say=(lambda _: None) if quiet else lambda line: print(line, flush=True))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def check_before_launch(cfg, probe_tracking: bool) -> None:
    """What a single run can check beyond `validate`: no pipeline around it (a pipeline hands
    its ranks a resolved path, never 'previous'), and, in the launching process only, an MLflow
    store the ranks can write (an unwritable or corrupt store would fail them after start-up)."""
    from scaling.config import ConfigError  # here: the parser is built without importing torch
    if cfg.stage in ("finetune", "probe") and cfg.finetune.init_from == "previous":
        raise ConfigError("finetune.init_from=previous means the previous stage of a pipeline, and this is a single "
                          "run; give a checkpoint file (e.g. <pretrain run>/export/model_fp32.pt) or run the stages "
                          "with `scaling pipeline run`")
    if probe_tracking and cfg.tracking.enabled:
        from scaling.tracking import probe_store

        probe_store(cfg.tracking.tracking_uri)


def claim_run_folder(cfg, args, under_launcher: bool) -> None:
    """One run per output folder, and a resume keeps the experiment's config (or says so),
    before any rank starts. Ranks started by `scaling` itself were checked by it."""
    from scaling.config import ConfigError  # here: the parser is built without importing torch
    from scaling.train.resume_check import check_resume
    from scaling.train.run_lock import LOCK_ENV, lock_run_folder

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
    if cfg.tracking.enabled:  # ranks that ended abruptly could not close their run
        from scaling.tracking import end_if_still_running

        end_if_still_running(cfg.tracking.tracking_uri, cfg.train.output_dir,
                             "KILLED" if code == EXIT_INTERRUPTED else "FAILED")
    if code == EXIT_INTERRUPTED:
        print(f"scaling {args.command}: stopped without saving", file=sys.stderr)
    elif failed.is_file():
        from scaling.train.checkpoint import EXIT_FAILED

        print(f"scaling {args.command}: error: {failed.read_text().strip()}", file=sys.stderr)
        return EXIT_FAILED  # torchrun says 1 whatever the ranks said
    return code


def exit_code_of_run(cfg) -> int:
    """0, or EXIT_STOPPED when the run saved a checkpoint and stopped early (run it again to resume)."""
    from scaling.train.signals import EXIT_STOPPED, stopped_early

    return EXIT_STOPPED if stopped_early(cfg.train.output_dir) else 0


def cmd_export(args) -> int:
    """A run folder's checkpoint -> fp32 `.pt` (always), then the asked format beside it; or an
    existing `.pt` export -> safetensors / a transformers folder."""
    from scaling.config import ConfigError  # here: the parser is built without importing torch
    src = Path(args.run)
    if src.is_file():
        if args.format == "pt":
            raise ConfigError(f"{src} is already a .pt export; pass --format safetensors or --format hf to convert it")
        return export_formats(src, args)
    from scaling.config import read_yaml
    from scaling.train.checkpoint import export_fp32, latest_tag

    cfg_file = src / "config.yaml"
    extra = {"config": read_yaml(cfg_file)} if cfg_file.is_file() else {}
    tag = args.tag or latest_tag(src / "checkpoints")
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {src / 'checkpoints'} (no 'latest' file); train first or pass --tag")
    if not args.trust_checkpoint:  # DeepSpeed's consolidation unpickles every file in full
        from scaling.train.checkpoint_trust import check_checkpoint_folder

        check_checkpoint_folder(src / "checkpoints" / tag)
    pt_out = args.out if args.format == "pt" and args.out else src / "export" / "model_fp32.pt"
    out = export_fp32(src / "checkpoints", pt_out, tag=tag, extra=extra)
    print(f"wrote consolidated fp32 weights to {out}")
    return 0 if args.format == "pt" else export_formats(out, args)


def export_formats(pt_file: Path, args) -> int:
    """Our `.pt` export as safetensors (+ JSON of its run config) or a transformers VideoMAE folder."""
    from scaling.config import ConfigError  # here: the parser is built without importing torch
    from scaling.models.convert import load_checkpoint_file
    from scaling.models.export_hf import ExportFormatError, write_hf_folder, write_safetensors

    export = load_checkpoint_file(pt_file, trust=args.trust_checkpoint)
    try:
        if args.format == "safetensors":
            out = write_safetensors(export, args.out or pt_file.with_name("model.safetensors"))
            print(f"wrote safetensors weights to {out} (run config in {out.with_suffix('.json')})")
        else:
            out = write_hf_folder(export, args.out or pt_file.parent / "hf", class_names_for(args.classes))
            print(f"wrote a transformers VideoMAE folder to {out} (config.json, model.safetensors)")
    except ExportFormatError as e:
        raise ConfigError(str(e)) from None
    return 0


def class_names_for(classes: str | None) -> list[str] | None:
    """`k400`/`k600`/`k700`/`k710` (the shipped Kinetics lists) or a file of one name per line."""
    if not classes:
        return None
    from scaling.data.kinetics import load_class_list, load_k710_classes

    if classes in ("k400", "k600", "k700"):
        return load_class_list(int(classes[1:]))
    if classes == "k710":
        return load_k710_classes()
    path = Path(classes)
    if not path.is_file():
        raise FileNotFoundError(f"--classes {classes}: not k400/k600/k700/k710 and no such file; give one of those "
                                "or a text file with one class name per line")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def add_train_parsers(sub) -> None:
    for name, stage, text in (("pretrain", "pretrain", "masked-video pre-training (dual masking by default)"),
                              ("finetune", "finetune", "supervised training + multi-view evaluation"),
                              ("train", None, "run a config's own `stage`")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--config", required=True, help="YAML run config, e.g. pipelines/pretrain_smoke.yaml")
        s.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=40")
        s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
        s.add_argument("--fresh", action="store_true", help="start afresh: move a previous run in output_dir aside")
        s.add_argument("--allow-changed", action="store_true",
                       help="resume a run whose config changed (model, masking, data, optimizer, schedule)")
        s.set_defaults(func=lambda a, stage=stage: cmd_train(a, stage))

    s = sub.add_parser("export", help="consolidate a run's latest ZeRO checkpoint into fp32 weights "
                                      "(.pt, safetensors, or a Hugging Face transformers folder)")
    s.add_argument("run", help="the run's output_dir (holds checkpoints/ and config.yaml), or a .pt export to convert")
    s.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    s.add_argument("--format", choices=("pt", "safetensors", "hf"), default="pt",
                   help="pt: our fp32 state dict (always written for a run folder); safetensors: the same keys "
                        "without pickle, plus a JSON of the run config; hf: a folder transformers' VideoMAEModel / "
                        "VideoMAEForVideoClassification loads with from_pretrained")
    s.add_argument("--classes", default=None,
                   help="--format hf: class names for id2label: k400, k600, k700, k710, or a file of one name per line")
    s.add_argument("--out", default=None, help="output path (default: <run>/export/model_fp32.pt, "
                                               "model.safetensors beside it, or the folder hf/ beside it)")
    s.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    s.set_defaults(func=cmd_export)
