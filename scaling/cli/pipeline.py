"""`scaling pipeline run|submit|show|prepare|complete`: a progressive pipeline here or on Slurm."""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from contextlib import contextmanager

QUIET_S = 8  # a pipeline run is never silent for 10 s: 8 s plus a busy machine's scheduling delays


@contextmanager
def heartbeat(every: float = QUIET_S):
    """While the block runs, print "[pipeline] ... working (N s)" whenever this process has
    written nothing for `every` seconds (QUIET_S): start-up (imports, the MLflow store), the export and
    bookkeeping between stages say nothing for tens of seconds on a busy machine. The ranks
    write to the terminal directly, unseen here: while a stage runs, its progress line (every 8 s,
    scaling/pipeline/progress.py) speaks instead, and this one stays quiet."""
    start = last = time.monotonic()
    done = threading.Event()

    class Stamped:
        def __init__(self, stream):
            self.stream = stream

        def write(self, text):
            nonlocal last
            last = time.monotonic()
            return self.stream.write(text)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    def stage_speaks() -> bool:
        # Not imported: no stage runs yet (importing it here would cost the seconds of torch's import).
        progress = sys.modules.get("scaling.pipeline.progress")
        return bool(progress and progress.StageProgress.running)

    def beat():
        while not done.wait(0.5):
            now = time.monotonic()
            if now - last >= every and not stage_speaks():  # a running stage has its own line
                print(f"[pipeline] ... working ({now - start:.0f} s)", flush=True)  # through Stamped: resets `last`

    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Stamped(sys.stdout), Stamped(sys.stderr)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        sys.stdout, sys.stderr = saved


def exit_now(code: int) -> int:
    """End the process as soon as its last line is out. The interpreter's teardown after it
    (torch's and DeepSpeed's libraries unloading) takes seconds with nothing left to say: 2 s on
    a quiet machine, 6 s at load 7 here. By then the stages are saved, exported and recorded
    (MLflow calls here are synchronous). Only when `scaling` is the program: a test calling
    main() in-process lives on and gets the code back."""
    if os.path.basename(sys.argv[0]) not in ("scaling", "__main__.py"):
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_run(args) -> int:
    start = getattr(args, "from")
    with heartbeat():
        print(f"[pipeline] {args.pipeline}: checking every stage and the MLflow store", flush=True)
        from scaling.pipeline import StageFailed, StageStoppedEarly, run_pipeline
        from scaling.train.signals import EXIT_STOPPED

        try:
            if start:
                note_from(args.pipeline, args.overrides, start)
            summary = run_pipeline(args.pipeline, args.overrides, start=start, until=args.until)
        except StageStoppedEarly as e:
            print(f"[pipeline] {e}", flush=True)
            return exit_now(EXIT_STOPPED)
        except StageFailed as e:  # the ranks' traceback is in the log the sentence names
            print(f"scaling pipeline run: error: {e}", file=sys.stderr, flush=True)
            return exit_now(1)
    for name, info in summary.items():
        print(f"[pipeline] {name}: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    return exit_now(0)


def note_from(path: str, overrides: list[str], start: str) -> None:
    """`--from X` runs no stage before X and, like a plain run, skips a stage that finished with
    its current config and starting weights: say which stages that leaves out, and why."""
    from scaling.pipeline.slurm import done_already
    from scaling.pipeline.spec import load_pipeline

    pipe = load_pipeline(path, overrides, only="")
    names = [s.name for s in pipe.stages]
    if start not in names:
        return  # the run itself refuses it in one sentence
    for stage in pipe.stages:
        done = done_already(pipe, stage)
        if names.index(stage.name) < names.index(start):
            state = f"finished, weights {stage.export}" if done else "not finished with its current config"
            print(f"[pipeline] {stage.name}: not run (before --from {start}); {state}", flush=True)
        elif done:
            print(f"[pipeline] {stage.name}: will be skipped: it finished with this config and these starting weights "
                  f"({stage.dir / 'DONE.json'}); --from picks where to start, it does not force a re-run: change "
                  f"one of its keys or move {stage.dir} aside to train it again", flush=True)


def cmd_submit(args) -> int:
    from scaling.pipeline.slurm import submit_pipeline

    # no Slurm here (SlurmMissing), or sbatch refused a job (SbatchRefused): one sentence, exit 2
    plan = submit_pipeline(args.pipeline, args.overrides, args.sbatch, dry_run=args.dry_run)
    for step in plan:
        for line in step.get("missing", []):
            print(f"[pipeline] warning: stage '{step['stage']}': {line}; make it before the job starts, "
                  "or fix the path", flush=True)
    for step in plan:
        if "finished" in step:
            print(f"[pipeline] {step['stage']}: finished earlier, not submitted (weights {step['finished']})")
        elif "job_id" in step:
            print(f"[pipeline] {step['stage']}: submitted as Slurm job {step['job_id']}")
        else:
            print(f"[pipeline] {step['stage']}: would run: " + " ".join(step["sbatch"]))
    if not any("job_id" in s or "sbatch" in s for s in plan):
        print("[pipeline] every stage finished earlier; nothing to submit")
    return 0


def cmd_prepare(args) -> int:
    """For slurm/launch.sh: prints 'run <stage dir>' or 'done <stage dir>'."""
    from scaling.pipeline.slurm import prepare_for_job

    state, folder = prepare_for_job(args.pipeline, args.stage, args.overrides)
    print(state, folder)
    return 0


def cmd_complete(args) -> int:
    from scaling.pipeline.slurm import complete_for_job

    info = complete_for_job(args.pipeline, args.stage, args.exit_code, args.overrides)
    if info:
        print(f"[pipeline] {args.stage}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return 0


def cmd_show(args) -> int:
    from scaling.pipeline.show import cmd_show as show

    return show(args)


def add_pipeline_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pipeline", help="progressive pipeline: run its stages here, or submit them to Slurm")
    sub = p.add_subparsers(dest="pipeline_command", required=True)

    def common(s):
        s.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/smoke.yaml")
        s.add_argument("overrides", nargs="*", help="overrides such as stages.finetune.train.epochs=2 or ranks=1 "
                                                     "(anywhere on the line)")

    s = sub.add_parser("run", help="run the stages on local ranks, in order (finished stages are skipped, "
                                   "an interrupted one resumes)")
    common(s)
    s.add_argument("--from", default=None, help="first stage to run (earlier ones must have finished); a stage "
                                                "that finished with its current config is skipped all the same")
    s.add_argument("--until", default=None, help="last stage to run")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("submit", help="one Slurm job per unfinished stage, chained with --dependency=afterok",
                       description="Job shapes come from the pipeline's 'slurm:' section (override with e.g. "
                                   "slurm.nodes=2 slurm.gpus_per_node=8); see scaling/pipeline/slurm.py.")
    common(s)
    s.add_argument("--sbatch", action="append", default=[], metavar="ARG",
                   help="extra sbatch argument for every job, e.g. --sbatch=--account=vid (repeatable)")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch commands instead of submitting; "
                   "needs neither Slurm nor the data (missing shards are warned about, one line each)")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("show", help="each stage's effective values (lr, steps, batch split, sampling, ...); "
                                    "needs no data on disk and starts no rank")
    common(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of the table")
    s.set_defaults(func=cmd_show)

    for name, func, text in (("prepare", cmd_prepare, "inside a stage's job, before the ranks: write its run config"),
                             ("complete", cmd_complete, "inside a stage's job, after the ranks: export and record it")):
        s = sub.add_parser(name, help=f"(used by slurm/launch.sh) {text}")
        s.add_argument("pipeline")
        s.add_argument("stage")
        s.add_argument("overrides", nargs="*")
        if name == "complete":
            s.add_argument("--exit-code", type=int, required=True, help="how the ranks ended")
        s.set_defaults(func=func)
    return p
