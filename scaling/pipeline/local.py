"""Run a progressive pipeline (pre-train -> post-pre-train -> fine-tune) from one YAML.

The YAML's shape: scaling/pipeline/spec.py.

Each stage trains in `<output_dir>/<stage>/`, exports consolidated fp32 weights to
`<stage>/export/model_fp32.pt` and records `<stage>/DONE.json`; the next stage starts from
that export (`init_from: previous`). A re-run skips stages whose DONE.json matches their
config and starting weights, and resumes an interrupted stage from its last checkpoint. A
stage whose config or starting weights changed since it was started (a re-run upstream stage
counts) is moved aside to `<stage>.replaced-<time>/` and starts afresh: resuming would mix
two runs. MLflow: one parent run per
pipeline, one nested run per stage; the parent ends FINISHED, KILLED or FAILED as the pipeline
did. A stage that fails ends the pipeline with one sentence naming the stage, the error its
ranks raised and its log (`<stage>/logs/`, where torchrun keeps every rank's output).
One torchrun and its ranks run every stage of a run in turn (warm ranks: scaling/pipeline/warm.py).
While a stage runs, a progress line every 8 s; at the end, a summary table (scaling/pipeline/progress.py).
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from scaling.pipeline.lineage import Lineage
from scaling.pipeline.progress import StageProgress, stage_result, summary_table
from scaling.pipeline.spec import Pipeline, Stage, load_pipeline, select
from scaling.pipeline.state import complete_stage, finished, resolve, start_stage

if TYPE_CHECKING:  # imported where used: the ranks run it as a module (`-m`), which must not be imported before
    from scaling.pipeline.warm import WarmRanks


class StageStoppedEarly(RuntimeError):
    """A stage saved a checkpoint and stopped before its end (preemption notice, wall-time guard)."""


class StageFailed(RuntimeError):
    """A stage's ranks exited with an error; the message names the stage, the cause and its log."""


def run_pipeline(path: str, overrides: list[str] = (), start: str | None = None, until: str | None = None) -> dict:
    """Run the stages; the parent MLflow run ends FINISHED, KILLED (a stage stopped early,
    Ctrl-C) or FAILED (a stage failed, anything raised). The ranks start first, once for every
    stage that runs (scaling/pipeline/warm.py), and import while this process opens MLflow."""
    from scaling.pipeline.warm import WarmRanks
    from scaling.tracking import probe_store

    pipe = load_pipeline(path, overrides)
    todo = select(pipe.stages, start, until)
    with WarmRanks(pipe.ranks, pipe.output_dir, [s.dir for s in to_run(pipe, todo)]) as ranks:
        first = pipe.stages[0].config.tracking
        if first.enabled:
            probe_store(first.tracking_uri)
        lineage = Lineage(pipe)
        try:
            summary = run_stages(pipe, todo, lineage, ranks)
        except (StageStoppedEarly, KeyboardInterrupt):
            lineage.close("KILLED")
            raise
        except BaseException:
            lineage.close("FAILED")
            raise
    lineage.close("FINISHED")
    return summary


def to_run(pipe: Pipeline, todo: list[Stage]) -> list[Stage]:
    """The stages from the first one not finished with its current config and starting weights
    on (none: every stage is skipped and no rank starts). A stage that starts from an unfinished
    one is refused here, before any rank starts."""
    for i, stage in enumerate(todo):
        if not finished(stage, resolve(pipe, stage, "")[1]):
            return todo[i:]
    return []


def run_stages(pipe: Pipeline, todo: list[Stage], lineage: Lineage, ranks: WarmRanks) -> dict:
    summary, table = {}, {}
    for stage in todo:
        cfg, fp = resolve(pipe, stage, lineage.parent_id)
        label = f"{pipe.stages.index(stage) + 1}/{len(pipe.stages)} {stage.name}"  # "2/3 postpretrain"
        seconds = None
        if finished(stage, fp):
            print(f"[pipeline] {stage.name}: finished earlier, weights {stage.export}", flush=True)
        else:  # its folder is locked (WarmRanks) until the ranks are gone
            seconds = run_stage(pipe, stage, cfg, fp, label, lineage, ranks)
        summary[stage.name] = lineage.record(stage, pipe.previous(stage))
        table[stage.name] = {**stage_result(stage.dir, seconds), "weights": stage.export}
    print("[pipeline] summary:\n" + summary_table(table), flush=True)
    return summary


def run_stage(pipe: Pipeline, stage: Stage, cfg, fp: dict, label: str, lineage: Lineage, ranks: WarmRanks) -> float:
    """Hand the stage to the ranks (a start or a resume), then export and record it; returns its seconds."""
    from scaling.train.signals import stopped_early

    config = start_stage(stage, cfg, fp)
    print(f"[pipeline] stage {label}: running ({cfg.stage}, {pipe.ranks} ranks) in {stage.dir}", flush=True)
    began = time.monotonic()
    with StageProgress(label, stage.dir / "metrics.jsonl"):
        code = ranks.run(stage.dir, config, label)
    seconds = time.monotonic() - began
    if code != 0:
        lineage.fail_stage_run(stage)
        raise stage_failed(stage, code)
    early = stopped_early(stage.dir)
    if early:
        raise StageStoppedEarly(f"stage '{stage.name}' stopped early at step {early['step']} ({early['reason']}) "
                                "with its checkpoint saved; re-run the same command to resume it")
    complete_stage(stage, cfg, fp)
    return seconds


LOGS = "logs"  # <stage>/logs: torchrun's output of every rank, per launch
ERROR_LINE = re.compile(r"^(?:\[[^\]]*\]:?\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)$")


def stage_failed(stage: Stage, code: int) -> StageFailed:
    """One sentence: the stage, its exit code, the error its ranks raised and the log holding it."""
    log, cause = failure_log(stage.dir / LOGS)
    where = f"; its log is {log}" if log else f"; its ranks' output is above (no log under {stage.dir / LOGS})"
    because = f" with {cause}" if cause else ""
    return StageFailed(f"stage '{stage.name}' failed (exit {code}){because}{where}; fix the cause and re-run the same "
                       "command: finished stages are skipped and this one resumes from its last checkpoint")


def failure_log(logs: Path) -> tuple[Path | None, str]:
    """The newest launch's rank log that holds an error, and that error's last line."""
    launches = sorted((d for d in logs.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime)
    if not launches:
        return None, ""
    # <launch>/attempt_<n>/<rank>/, or <warm launch link>/<torchrun run>/attempt_<n>/<rank>/
    files = sorted(launches[-1].glob("attempt_*/*/stderr.log")) or sorted(launches[-1].glob("*/attempt_*/*/stderr.log"))
    for f in files:
        errors = [m.group(1) for line in f.read_text(errors="replace").splitlines() if (m := ERROR_LINE.match(line.strip()))]
        if errors:
            return f, errors[-1][:300]
    return (files[0] if files else launches[-1]), ""


