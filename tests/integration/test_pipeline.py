"""The three-stage pipeline on 2 local ranks (ZeRO-3, bf16): hand-off, kill + re-run, MLflow lineage."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from helpers import REPO, SCALING, env_for

from scaling.cli import main
from scaling.train.run_lock import FolderInUse, lock_run_folder

SMOKE = REPO / "pipelines" / "smoke.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory, synth_shards):
    root = tmp_path_factory.mktemp("pipeline_data")  # train/ and val/ as the pipeline overrides name them
    (root / "train").symlink_to(synth_shards(16, 8))
    (root / "val").symlink_to(synth_shards(8, 8, seed=1))
    return root


def overrides(data: Path, out: Path) -> list[str]:
    """The smoke pipeline, shortened: 4 pre-training steps, 2 epochs per supervised stage; the
    fine-tune stage uses MAR (running-cell drop mask, bridging head, reconstruction branch) so
    that path runs under ZeRO-3 on 2 ranks too (tests/integration/test_slurm.py runs the plain one)."""
    return [f"output_dir={out}", f"defaults.data.shards={data}/train/synth-{{000000..000001}}.tar",
            "stages.pretrain.train.steps=4", "stages.postpretrain.train.epochs=2", "stages.finetune.train.epochs=2",
            "stages.postpretrain.train.save_every=1",
            f"stages.finetune.finetune.val_shards={data}/val/synth-000000.tar",
            "stages.finetune.model.head=bridging", "stages.finetune.mask.finetune=running_cell",
            "stages.finetune.finetune.reconstruction_weight=0.1"]


def test_pipeline_killed_mid_stage_resumes_without_redoing_finished_stages(data, tmp_path):
    out = tmp_path / "run"
    cmd = [*SCALING, "pipeline", "run", str(SMOKE), *overrides(data, out)]
    proc = subprocess.Popen(cmd, env=env_for(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "postpretrain" / "checkpoints" / "latest"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not latest.is_file():
        time.sleep(0.2)
    assert proc.poll() is None and latest.is_file(), "the pipeline should be inside stage 2"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # torchrun (a session of its own, told by the kernel) shares the stage's lock: while its
    # ranks save, the folder is theirs, and the re-run below waits for them.
    with pytest.raises(FolderInUse, match=r"its ranks under pid \d+"):
        lock_run_folder(out / "postpretrain", wait_s=0)
    assert (out / "pretrain" / "DONE.json").is_file() and not (out / "postpretrain" / "DONE.json").exists()
    pretrain_done = (out / "pretrain" / "DONE.json").stat().st_mtime_ns

    rerun = subprocess.run(cmd, env=env_for(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "[pipeline] pretrain: finished earlier" in rerun.stdout
    assert "finetune resuming at step" in rerun.stdout, "stage 2 resumed from its checkpoint"
    assert (out / "pretrain" / "DONE.json").stat().st_mtime_ns == pretrain_done
    for stage in ("pretrain", "postpretrain", "finetune"):
        assert (out / stage / "export" / "model_fp32.pt").is_file()
    # Layer decay reaches the optimizer at every step: patch embedding lr = ld^(depth + 1) x head lr.
    rows = [json.loads(line) for line in (out / "postpretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 4 and rows[0]["lr"] == 0.0, "the reference's warmup starts at lr 0"
    for row in rows:
        assert abs(row["lr_lowest_layer"] - row["lr"] * 0.9 ** 3) <= 1e-9 * row["lr"], row
    result = json.loads((out / "finetune" / "eval.json").read_text())
    assert result["videos"] == 8 and 0 <= result["top1"] <= 100 and result["per_class_accuracy"]
    assert "bridging head, MAR running_cell 0.5 + reconstruction x 0.1" in rerun.stdout
    mar_rows = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert mar_rows and all(row["loss_rec"] > 0 and "loss_cls" in row for row in mar_rows)

    # Progress: the stage in the ranks' step lines, and the summary table at the end (the line
    # every 8 s while a stage runs: tests/unit/test_pipeline_progress.py; these stages, on warm
    # ranks, are through in less).
    assert re.search(r"\[scaling\] step \d+/\d+ \(stage 3/3 finetune\) loss .* MFU .* ETA ", rerun.stdout)
    table = rerun.stdout[rerun.stdout.index("[pipeline] summary:"):].splitlines()[1:5]
    assert table[0].split() == ["stage", "steps", "time", "final", "loss", "top-1", "weights"]
    pretrain_row, post_row, fine_row = (line.split() for line in table[1:])
    assert pretrain_row[:3] == ["pretrain", "4/4", "earlier"] and pretrain_row[-1] == str(out / "pretrain" / "export" / "model_fp32.pt")
    steps = mar_rows[-1]["step"]
    assert fine_row[:2] == ["finetune", f"{steps}/{steps}"] and re.fullmatch(r"\d+:\d\d:\d\d", fine_row[2])
    assert fine_row[3:5] == [f"{mar_rows[-1]['loss']:.4f}", f"{result['top1']:.2f}"]
    assert post_row[0] == "postpretrain" and post_row[4] == "-", "no evaluation in post-pre-training"

    # MLflow: one parent run, three nested stage runs reused across the kill, lineage tags.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["smoke"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags.get("stage"): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and len(runs) == 4
    assert set(children) == {"pretrain", "postpretrain", "finetune"}
    parent_id = parents[0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in children.values())
    assert children["finetune"].data.tags["weights_from_run"] == children["postpretrain"].info.run_id
    assert children["finetune"].data.tags["weights_path"].endswith("finetune/export/model_fp32.pt")
    assert "eval/top1" in children["finetune"].data.metrics and "finetune.top1" in parents[0].data.metrics
    assert children["postpretrain"].data.params["finetune.init_from"].endswith("pretrain/export/model_fp32.pt")

    # A second re-run finds everything finished and launches nothing.
    again = subprocess.run(cmd, env=env_for(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 3

    # A changed stage starts afresh (its old folder kept aside, not resumed), and the stage after
    # it runs again too: the weights it starts from changed, though their path did not.
    changed = subprocess.run([*cmd, "stages.postpretrain.optim.min_lr=0.0002"], env=env_for(tmp_path), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "[pipeline] pretrain: finished earlier" in changed.stdout
    assert "[pipeline] postpretrain: changed since it was started (optim.min_lr)" in changed.stdout
    assert "[pipeline] finetune: changed since it was started (the weights it starts from)" in changed.stdout
    assert "resuming at step" not in changed.stdout
    assert sorted(p.name.split(".")[0] for p in out.glob("*.replaced-*")) == ["finetune", "postpretrain"]


def test_bad_init_from_and_stage_names_are_refused(capsys, data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    base = ["pipeline", "run", str(SMOKE), *overrides(data, tmp_path / "run")]
    assert main([*base, "stages.postpretrain.finetune.init_from=/nope/model.pt"]) == 2
    err = capsys.readouterr().err
    assert "stage 'postpretrain': finetune.init_from '/nope/model.pt' is not a file" in err
    assert main([*base, "--from", "pretrian"]) == 2
    assert "--from pretrian: no such stage" in capsys.readouterr().err
    assert main([*base, "--from", "finetune"]) == 2
    assert "run that stage first" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["vitb_k400", "vitb_ssv2", "vitg_k400", "vitg_ssv2", "smoke"])
def test_recipes_parse_into_typed_stage_configs(recipe):
    """The cluster recipes cannot run here (no Kinetics), but every key and type is checked."""
    import yaml

    from scaling.config import RunConfig, from_dict
    from scaling.pipeline import merge

    raw = yaml.safe_load((REPO / "pipelines" / f"{recipe}.yaml").read_text())
    for name, body in raw["stages"].items():
        cfg = from_dict(RunConfig, merge(raw.get("defaults", {}), body))
        assert cfg.stage in ("pretrain", "finetune"), name
