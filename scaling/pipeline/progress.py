"""What `scaling pipeline run` tells the user while stages run and when they are done.

While a stage's ranks run (a subprocess), a thread of the pipeline process prints one line every
`every_s` seconds (8) from the rows the stage appends to its metrics.jsonl: "stage 1/3 pretrain:
step 12/40, loss 0.8123, ETA 0:00:15", or "stage 1/3 pretrain: starting (8 s)" before its first
step, so that the terminal is never silent for 10 s; the pipeline's "... working" heartbeat
stays quiet meanwhile (`StageProgress.running`). At the end, a table: stage, steps (the last
saved step, from the checkpoints), time, final loss or top-1, weights.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from scaling.train.step_metrics import hms


def last_row(path: Path, offset: int = 0) -> dict | None:
    """The last complete JSON line of `path` from byte `offset` on (a line being written is skipped)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    for line in reversed(text.split("\n")[:-1]):  # the piece after the last newline is unfinished
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def progress_line(label: str, row: dict | None, elapsed_s: float) -> str:
    if row is None:
        return f"[pipeline] stage {label}: starting ({elapsed_s:.0f} s)"
    total = f"/{row['steps_total']}" if "steps_total" in row else ""
    eta = f", ETA {hms(row['eta_s'])}" if "eta_s" in row else ""
    return f"[pipeline] stage {label}: step {row['step']}{total}, loss {row['loss']:.4f}{eta} (elapsed {hms(elapsed_s)})"


class StageProgress:
    """Context manager around a stage's launch: prints `progress_line` every `every_s` seconds,
    from the metrics.jsonl rows written after it was entered (a resumed stage's file already
    holds the rows of its earlier run). `running` counts the reporters now active."""

    running = 0

    def __init__(self, label: str, metrics: Path, every_s: float = 8.0, out=lambda text: print(text, flush=True)):
        self.label, self.metrics, self.every_s, self.out = label, metrics, every_s, out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="pipeline-progress", daemon=True)

    def __enter__(self) -> StageProgress:
        self.offset = self.metrics.stat().st_size if self.metrics.is_file() else 0
        self.started = time.monotonic()
        StageProgress.running += 1
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        StageProgress.running -= 1

    def _report(self) -> None:
        while not self._stop.wait(self.every_s):
            self.out(progress_line(self.label, last_row(self.metrics, self.offset), time.monotonic() - self.started))


def last_saved_step(stage_dir: Path) -> int | None:
    """The step of the stage's newest checkpoint: its last step, where metrics.jsonl holds only
    every log_every-th (190 of 192 with log_every 5)."""
    from scaling.train.checkpoint import latest_tag, step_of

    tag = latest_tag(stage_dir / "checkpoints")
    return step_of(tag) if tag else None


def stage_result(stage_dir: Path, seconds: float | None) -> dict:
    """One row of the summary: steps, time (None: finished in an earlier run), final loss, top-1."""
    row = last_row(stage_dir / "metrics.jsonl") or {}
    step = last_saved_step(stage_dir) or row.get("step", "?")
    result = {"steps": f"{step}/{row.get('steps_total', '?')}" if row else "-",
              "time": hms(seconds) if seconds is not None else "earlier", "loss": row.get("loss")}
    eval_file = stage_dir / "eval.json"
    if eval_file.is_file():
        result["top1"] = json.loads(eval_file.read_text()).get("top1")
    return result


def summary_table(rows: dict[str, dict]) -> str:
    """{stage: stage_result + "weights"} -> an aligned text table."""
    header = ("stage", "steps", "time", "final loss", "top-1", "weights")
    lines = [header] + [
        (name, r["steps"], r["time"], f"{r['loss']:.4f}" if r.get("loss") is not None else "-",
         f"{r['top1']:.2f}" if r.get("top1") is not None else "-", str(r["weights"]))
        for name, r in rows.items()
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines)
