"""Every command in README.md's ```bash blocks is run: here, or by the test this file names for
it, so the README cannot drift from the code.

How to add a command to the README: write it in a ```bash block (one command a line, a
trailing `# comment` is fine), then give it exactly one entry below:
- RUN, when it costs seconds: the README line -> the line this test runs instead ("" = the
  line itself; a smaller size where the README shows a real one). A `.venv/bin/scaling`
  line runs as `scaling.cli.main` in this process, in a folder holding the README's example
  inputs (`readme_inputs`: videos/, k400/*.csv, k400_videos/, ssv2_train.txt with its frame
  folders, and the checkout's pipelines/, ds_configs/ and slurm/; add what a new command
  reads there); any other line runs with bash in the checkout. Its exit code must be 0 and, where
  CHECKS names a text, its output must hold it.
- ELSEWHERE, when it trains or needs Slurm: the README line -> "tests/<path>.py::<function>"
  of the test that runs it (the function must exist), or ".ci/run" for what CI runs itself.
`test_every_readme_command_is_run_somewhere` fails on a README command with no entry and on
an entry whose command is no longer in the README.
"""
from __future__ import annotations

import ast
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import REPO

from scaling.cli import main

README = REPO / "README.md"

RUN = {
    # `make -n`: the target exists and what it runs (synth, run below; the smoke pipeline,
    # which tests/integration/test_pipeline.py runs shortened; bench/ measured the whole demo)
    "make demo": "make -n demo",
    "make test-fast": "make -n test-fast",
    ".venv/bin/scaling shard --input videos/ --out shards/mine --short-side 320 --workers 8": "",
    ".venv/bin/scaling labels k710 --k400-train k400/train.csv --k400-val k400/validate.csv --out labels/": "",
    ".venv/bin/scaling shard --input labels/k710_train.csv --video-root k400_videos/ --out shards/k710_train": "",
    ".venv/bin/scaling shard --input ssv2_train.txt --frames-fps 12 --out shards/ssv2": "",
    ".venv/bin/scaling synth --out data/synth --num-videos 64": ".venv/bin/scaling synth --out data/synth --num-videos 4",
    ".venv/bin/scaling pipeline show pipelines/vitg_k400.yaml": "",
    ".venv/bin/scaling pipeline show pipelines/vitg_k400.yaml stages.pretrain.train.global_batch=1024 --json": "",
    ".venv/bin/scaling pipeline submit pipelines/vitg_k400.yaml --dry-run": "",
    ".venv/bin/scaling memory plan --model vit_g --nodes 8 --gpus-per-node 8 --gpu-memory-gb 80": "",
    ".venv/bin/scaling memory plan --model vit_b --device cpu --gpus-per-node 2 --reserve-gb 0 --micro-batch 4 "
    "--budget-gb 2.3": "",
    ".venv/bin/scaling memory compare --model vit_b --no-time":
        ".venv/bin/scaling memory compare --model debug --frames 4 --input-size 32 --no-time",
}

CHECKS = {  # README line -> a text its output must hold
    "make demo": "scaling pipeline run pipelines/smoke.yaml",
    ".venv/bin/scaling shard --input videos/ --out shards/mine --short-side 320 --workers 8": "wrote 2 of 2 videos",
    ".venv/bin/scaling shard --input labels/k710_train.csv --video-root k400_videos/ --out shards/k710_train":
        "wrote 2 of 2 videos",
    ".venv/bin/scaling shard --input ssv2_train.txt --frames-fps 12 --out shards/ssv2": "wrote 1 of 1 videos",
    ".venv/bin/scaling labels k710 --k400-train k400/train.csv --k400-val k400/validate.csv --out labels/":
        "wrote 2 train / 1 val videos over 710 classes",
    ".venv/bin/scaling pipeline submit pipelines/vitg_k400.yaml --dry-run":  # no shards, no Slurm here
        "[pipeline] warning: stage 'pretrain': data source 'k710' has no files yet",
    ".venv/bin/scaling memory plan --model vit_g --nodes 8 --gpus-per-node 8 --gpu-memory-gb 80": "largest micro-batch",
    ".venv/bin/scaling memory plan --model vit_b --device cpu --gpus-per-node 2 --reserve-gb 0 --micro-batch 4 "
    "--budget-gb 2.3": "model.activation_checkpointing=",
}

ELSEWHERE = {
    "make test": ".ci/run",
    ".venv/bin/scaling pretrain --config pipelines/pretrain_smoke.yaml train.steps=100":
        "tests/integration/test_distributed.py::test_loss_falls_on_synthetic_shards",
    ".venv/bin/scaling export runs/pretrain_smoke":
        "tests/integration/test_distributed.py::test_export_loads_strictly_into_a_plain_model",
    ".venv/bin/scaling finetune --config pipelines/finetune_example.yaml "
    "finetune.init_from=runs/pretrain_smoke/export/model_fp32.pt":
        "tests/integration/test_readme_commands.py::test_finetune_example_is_a_valid_run_config",
    ".venv/bin/scaling pipeline run pipelines/smoke.yaml --from postpretrain stages.finetune.train.epochs=5":
        "tests/integration/test_pipeline.py::test_pipeline_killed_mid_stage_resumes_without_redoing_finished_stages",
    ".venv/bin/scaling export runs/smoke/finetune/export/model_fp32.pt --format hf --out hf/":
        "tests/integration/test_export_hf.py::test_cli_converts_a_pt_export_to_safetensors_and_a_transformers_folder",
    ".venv/bin/scaling pipeline submit pipelines/vitg_k400.yaml":
        "tests/integration/test_slurm.py::test_pipeline_submit_chains_the_stages_and_a_failed_stage_stops_the_rest",
    "sbatch slurm/pretrain_vitg.sh": "tests/integration/test_slurm.py::test_every_template_is_accepted_with_its_default_directives",
    'SCALING_OVERRIDES="stages.pretrain.train.steps=1000" sbatch --nodes=2 slurm/pretrain_vitg.sh':
        "tests/integration/test_slurm.py::test_pretrain_vitg_runs_is_preempted_requeues_and_resumes",
    ".venv/bin/scaling eval --weights runs/smoke/finetune/export/model_fp32.pt "
    "--shards 'data/synth_val/synth-{000000..000001}.tar' --ranks 2":
        "tests/integration/test_use_commands.py::test_eval_of_the_export_and_of_the_deepspeed_checkpoint_repeat_the_stage_test",
    ".venv/bin/scaling predict clip.mp4 --weights runs/smoke/finetune/export/model_fp32.pt":
        "tests/integration/test_use_commands.py::test_predict_names_the_class_of_videos_the_model_was_trained_on",
    ".venv/bin/scaling features --weights runs/smoke/finetune/export/model_fp32.pt "
    "--input 'data/synth_val/synth-{000000..000001}.tar' --out runs/smoke/features --window 16 --stride 8 --pool mean":
        "tests/integration/test_use_commands.py::test_features_from_shards_equal_features_from_mp4_files_and_a_rerun_skips_finished_videos",
    ".venv/bin/scaling visualize --weights runs/smoke/pretrain/export/model_fp32.pt --video clip.mp4 --mask tube "
    "--decoder running_cell":
        "tests/integration/test_use_commands.py::test_pretraining_logs_a_reconstruction_figure_that_visualize_redraws_from_the_export",
    ".venv/bin/scaling pipeline run pipelines/smoke_probe.yaml":
        "tests/integration/test_probe_stage.py::test_probes_train_only_their_heads_on_the_frozen_pretrained_encoder",
    "sbatch slurm/postpretrain_vitg.sh":
        "tests/integration/test_slurm.py::test_every_template_is_accepted_with_its_default_directives",
}


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a # at the start or after a blank, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block, comments removed, blanks collapsed, `\\` lines joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(strip_comment(line).split())
            if command:
                commands.append(command)
    return commands


def names_a_test(where: str) -> bool:
    """'tests/x.py::name' names a test function defined in that file; '.ci/run' holds `make test`."""
    if where == ".ci/run":
        return "make test" in (REPO / ".ci" / "run").read_text()
    path, _, name = where.partition("::")
    tree = ast.parse((REPO / path).read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


def test_every_readme_command_is_run_somewhere():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 15, "the README's ```bash blocks were not found"
    unknown = [c for c in commands if c not in RUN and c not in ELSEWHERE]
    assert not unknown, ("README commands that no test runs; add each to RUN or ELSEWHERE in "
                         f"{Path(__file__).relative_to(REPO)}: {unknown}")
    stale = [c for c in [*RUN, *ELSEWHERE, *CHECKS] if c not in commands]
    assert not stale, f"entries for commands the README no longer has: {stale}"
    assert not set(RUN) & set(ELSEWHERE)
    missing = {c: w for c, w in ELSEWHERE.items() if not names_a_test(w)}
    assert not missing, f"ELSEWHERE names tests that do not exist: {missing}"


def tiny_video(path: Path, seconds: int = 1) -> None:
    """A 64x48 mp4 from ffmpeg's test pattern."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc=size=64x48:rate=10:duration={seconds}",
                    "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60)


@pytest.fixture(scope="module")
def readme_inputs(tmp_path_factory) -> Path:
    """A folder with the example inputs the README's commands name."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("pipelines", "ds_configs", "slurm"):
        (root / name).symlink_to(REPO / name)
    tiny_video(root / "videos" / "abseiling" / "a.mp4")  # a folder of class subfolders
    tiny_video(root / "videos" / "zumba" / "b.mp4")
    (root / "k400").mkdir()  # Kinetics-400's annotation CSVs, as published
    header = "label,youtube_id,time_start,time_end,split,is_cc\n"
    (root / "k400" / "train.csv").write_text(header + "abseiling,AbC-123,10,20,train,0\nzumba,xyz,1,11,train,0\n")
    (root / "k400" / "validate.csv").write_text(header + "zumba,val-1,0,10,validate,0\n")
    tiny_video(root / "k400_videos" / "AbC-123_000010_000020.mp4")  # the downloaders' naming
    tiny_video(root / "k400_videos" / "xyz_000001_000011.mp4")
    frames = root / "ssv2_frames" / "12"  # a VideoMAE list of frame folders: `folder total_frames label`
    frames.mkdir(parents=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=12:duration=1",
                    str(frames / "img_%05d.jpg")], check=True, timeout=60)
    (root / "ssv2_train.txt").write_text(f"ssv2_frames/12 {len(list(frames.glob('*.jpg')))} 3\n")
    return root


def short_id(line: str) -> str:
    return " ".join(line.replace(".venv/bin/scaling ", "").split()[:3])


@pytest.mark.parametrize("readme_line", list(RUN), ids=[short_id(c) for c in RUN])
def test_readme_command_runs(readme_line, readme_inputs, monkeypatch, capsys):
    """`scaling` lines run in this process (`scaling.cli.main`, what `.venv/bin/scaling` calls,
    without a new interpreter importing torch each time); anything else runs with bash."""
    line = RUN[readme_line] or readme_line
    monkeypatch.chdir(readme_inputs)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{readme_inputs / 'mlflow.db'}")
    if line.startswith(".venv/bin/scaling "):
        code = main(shlex.split(line)[1:])
        out = capsys.readouterr()
        stdout, stderr = out.out, out.err
    else:
        proc = subprocess.run(["bash", "-c", line], cwd=REPO, capture_output=True, text=True, timeout=600)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    assert code == 0, f"{line}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert CHECKS.get(readme_line, "") in stdout, stdout[-3000:]


def test_labels_then_shard_gives_k710_indices(readme_inputs):
    """The README's Kinetics flow end to end: the list `labels k710` wrote is sharded as it is,
    each video found under --video-root by its downloader name and labelled with its K710 index
    (this runs after the parametrized commands above, which wrote labels/ and shards/)."""
    import json

    from scaling.label_space import load_k710_classes

    manifest = json.loads((readme_inputs / "shards" / "k710_train" / "manifest.json").read_text())
    classes = load_k710_classes()
    assert manifest["count"] == 2
    assert manifest["classes"]["abseiling"] == classes.index("abseiling")
    assert manifest["classes"]["zumba"] == classes.index("zumba")
    assert sorted(p.name for p in (readme_inputs / "shards" / "k710_train").glob("*.tar"))


def test_finetune_example_is_a_valid_run_config(tmp_path):
    """pipelines/finetune_example.yaml, with the README's overrides, passes every check a launch
    makes (files included) on the inputs the README's commands before it write: the demo's
    shards and a pre-training export (here a small real one)."""
    import torch

    from scaling.config import load_config, validate

    for name, n, seed in (("synth", 8, 0), ("synth_val", 4, 1)):
        assert main(["synth", "--out", str(tmp_path / "data" / name), "--num-videos", str(n), "--per-shard", "2",
                     "--seed", str(seed)]) == 0
    export = tmp_path / "runs" / "pretrain_smoke" / "export" / "model_fp32.pt"
    export.parent.mkdir(parents=True)
    torch.save({"model": {}}, export)
    cfg = load_config(REPO / "pipelines" / "finetune_example.yaml", [
        f"finetune.init_from={export}", f"data.shards={tmp_path}/data/synth/synth-{{000000..000003}}.tar",
        f"finetune.val_shards={tmp_path}/data/synth_val/synth-{{000000..000001}}.tar"])
    validate(cfg, cfg.train.ranks)
    assert cfg.stage == "finetune" and cfg.train.output_dir == "runs/finetune_example"


def finish(pipe, stage) -> None:
    """Record a stage as finished the way the runner does (DONE.json with its fingerprint, an
    export file), without training it."""
    import json

    from scaling.pipeline.state import DONE, digest, resolve

    _, fp = resolve(pipe, stage, "")
    stage.export.parent.mkdir(parents=True)
    stage.export.write_bytes(b"weights")
    (stage.dir / DONE).write_text(json.dumps({"fingerprint": fp, "digest": digest(fp), "weights": str(stage.export)}))


def test_pipeline_run_takes_overrides_after_from_and_says_what_from_leaves_out(tmp_path, capsys):
    """The README's `pipeline run ... --from postpretrain stages.finetune.train.epochs=5`: the
    override after the option is parsed as one, and --from names the stages it will not train."""
    from scaling.cli import parse_args
    from scaling.cli.pipeline import note_from
    from scaling.pipeline.spec import load_pipeline

    args = parse_args(["pipeline", "run", "pipelines/smoke.yaml", "ranks=1", "--from", "postpretrain",
                       "stages.finetune.train.epochs=5"])
    assert (args.overrides, getattr(args, "from")) == (["ranks=1", "stages.finetune.train.epochs=5"], "postpretrain")
    with pytest.raises(SystemExit):  # only key=value words join the overrides
        parse_args(["pipeline", "show", "pipelines/smoke.yaml", "--from", "x"])
    assert "unrecognized arguments: --from x" in capsys.readouterr().err

    overrides = [f"output_dir={tmp_path}", "tracking.enabled=false"]
    pipe = load_pipeline(str(REPO / "pipelines" / "smoke.yaml"), overrides, only="")
    finish(pipe, pipe.stages[0])
    finish(pipe, pipe.stages[1])
    note_from(str(REPO / "pipelines" / "smoke.yaml"), overrides, "postpretrain")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"[pipeline] pretrain: not run (before --from postpretrain); finished, weights {pipe.stages[0].export}"
    assert lines[1].startswith("[pipeline] postpretrain: will be skipped: it finished with this config") and \
        "does not force a re-run" in lines[1]
    assert len(lines) == 2  # finetune has not finished: it runs, nothing to say
    note_from(str(REPO / "pipelines" / "smoke.yaml"), [*overrides, "stages.postpretrain.optim.min_lr=0.0002"], "postpretrain")
    assert len(capsys.readouterr().out.splitlines()) == 1, "a changed stage is not skipped"


def test_heartbeat_speaks_only_when_the_run_is_quiet(capsys):
    import time

    from scaling.cli.pipeline import heartbeat

    with heartbeat(every=2):
        for _ in range(12):  # talking every 0.25 s
            print("step", flush=True)
            time.sleep(0.25)
        time.sleep(3.5)  # then silent
    out = capsys.readouterr().out
    assert out.count("[pipeline] ... working") == 1, out


def test_submit_without_the_data_refuses_before_sbatch_and_dry_run_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here
    smoke = str(REPO / "pipelines" / "smoke.yaml")
    assert main(["pipeline", "submit", smoke]) == 2
    err = capsys.readouterr().err
    assert "stage 'pretrain': data source 'shards' matches no files" in err and not (tmp_path / "runs").exists()
    assert main(["pipeline", "submit", smoke, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    warnings = [line for line in out if line.startswith("[pipeline] warning:")]
    assert len(warnings) == 4, out  # the shards of 3 stages, the finetune stage's val_shards
    assert "stage 'finetune': finetune.val_shards has no files yet (2 of 2 shards do not exist" in warnings[-1]
    assert sum("would run: sbatch" in line for line in out) == 3
