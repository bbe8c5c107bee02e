"""The progress line `scaling pipeline run` prints while a stage's ranks run: "starting (N s)"
before the stage's first metrics row, then its step, loss and ETA from the rows it appends."""
import json
import time

from scaling.pipeline.progress import StageProgress


def test_progress_line_follows_the_rows_written_after_the_stage_started(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 3, "loss": 9.0}) + "\n")  # an earlier run's row: not this stage's progress
    lines = []
    with StageProgress("2/3 postpretrain", metrics, every_s=0.2, out=lines.append):
        assert StageProgress.running == 1
        time.sleep(0.5)
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": 4, "steps_total": 32, "loss": 0.8123, "eta_s": 15.0}) + "\n")
            f.write('{"step": 5, "lo')  # a row being written: skipped
        time.sleep(0.5)
    assert StageProgress.running == 0
    assert lines[0].startswith("[pipeline] stage 2/3 postpretrain: starting (0 s)")
    assert lines[-1].startswith("[pipeline] stage 2/3 postpretrain: step 4/32, loss 0.8123, ETA 0:00:15 (elapsed ")
    assert not any("step 3" in line for line in lines)
