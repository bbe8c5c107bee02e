"""Using trained weights: `scaling eval`, `predict`, `features` and validation during fine-tuning.

One fine-tune run (1 rank, ZeRO-3, bf16, debug model on synthetic shards) with validation
every 3 epochs and the final test on the best weights serves every test of this file.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tarfile

import mlflow
import numpy as np
import pytest
import torch
from helpers import SCALING, SMOKE, env_for

from scaling.cli import main
from scaling.models.convert import load_checkpoint_file

VIEWS = ["finetune.test_clips=2", "finetune.test_crops=2"]


@pytest.fixture(scope="module")
def trained(synth_shards, tmp_path_factory):
    """(run folder, train shards, val shards, tmp) of a finished fine-tune with eval_every."""
    tmp = tmp_path_factory.mktemp("use")
    train = f"{synth_shards(24, 6)}/synth-{{000000..000003}}.tar"
    val = f"{synth_shards(12, 6, seed=1)}/synth-{{000000..000001}}.tar"
    run = tmp / "ft"
    cmd = [*SCALING, "finetune", "--config", str(SMOKE), f"train.output_dir={run}", f"data.shards={train}",
           "finetune.num_classes=4", "finetune.mixup=0", "finetune.cutmix=0", "finetune.rand_aug=''", "finetune.reprob=0",
           "train.ranks=1", "train.global_batch=8", "train.epochs=12", "train.save_every=100", "optim.warmup_epochs=1",
           "optim.base_lr=1.0", "optim.min_lr=0.01", "data.num_workers=0", f"finetune.val_shards={val}", *VIEWS,
           "finetune.eval_every=3", "finetune.test_with=best", "tracking.enabled=false"]
    proc = subprocess.run(cmd, env=env_for(tmp), cwd=tmp, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run, train, val, tmp


@pytest.fixture()
def mlflow_here(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.search_runs below reads the process-wide URI, which an earlier test may have set.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


def eval_json(args: list[str]) -> dict:
    out = args[args.index("--out") + 1]
    assert main(["eval", *args]) == 0
    with open(f"{out}/eval.json") as f:
        return json.load(f)


def test_eval_of_the_export_and_of_the_deepspeed_checkpoint_repeat_the_stage_test(trained, tmp_path, mlflow_here):
    run, _, val, _ = trained
    stage = json.loads((run / "eval.json").read_text())  # the stage tested its best weights (test_with=best)
    best = json.loads((run / "best" / "best.json").read_text())
    assert (run / "export" / "model_best_fp32.pt").is_file()
    same_batches = ["--shards", val, "--batch", "8"]  # the stage's test: 8 videos x 2 x 2 views per forward
    export = eval_json(["--weights", str(run / "export" / "model_best_fp32.pt"), *same_batches, "--out", str(tmp_path / "e")])
    deepspeed = eval_json(["--weights", str(run / "best"), *same_batches, "--out", str(tmp_path / "d"), "--no-tracking"])
    for result in (export, deepspeed):
        assert (result["top1"], result["top5"], result["videos"]) == (stage["top1"], stage["top5"], stage["videos"])
        assert list(result["per_class_accuracy"].values()) == list(stage["per_class_accuracy"].values())
        assert (result["clips"], result["crops"], result["precision"]) == (2, 2, "bf16")  # the run's own settings
    assert export["top1"] == pytest.approx(stage["top1"]) and stage["top1"] >= 50, "learned: 2x chance"
    # The last weights (the run's latest DeepSpeed checkpoint) at one view per video, on 2 ranks:
    # the last validation's numbers.
    last = json.loads((run / "val.jsonl").read_text().splitlines()[-1])
    two = eval_json(["--weights", str(run), "--shards", val, "--clips", "1", "--crops", "1", "--ranks", "2",
                     "--batch", "4", "--out", str(tmp_path / "two"), "--no-tracking"])
    assert (two["top1"], two["ranks"]) == (last["val/top1"], 2)
    assert max(json.loads(r)["val/top1"] for r in (run / "val.jsonl").read_text().splitlines()) == best["top1"]
    # The MLflow run of the export's eval holds the metrics and the files.
    (logged,) = mlflow.search_runs(experiment_names=["eval"], output_format="list")
    assert logged.data.metrics["eval/top1"] == export["top1"]
    files = {a.path for a in mlflow.MlflowClient(mlflow_here).list_artifacts(logged.info.run_id)}
    assert {"eval.json", "per_class.csv", "confusion.png"} <= files


def test_public_layout_checkpoint_with_a_710_way_head_evaluates_on_400_classes(trained, tmp_path, capsys):
    """A checkpoint as the public fine-tuning code saves it: {"module": ...}, its args, a K710
    head. Rows of our 4 classes hold the trained head, the other 706 can never win."""
    run, _, val, _ = trained
    export = load_checkpoint_file(run / "export" / "model_best_fp32.pt")
    state = dict(export["model"])
    w, b = state["head.weight"], state["head.bias"]  # (4, D), (4,)
    state["head.weight"] = torch.cat([w, w[:1].expand(706, -1)])
    state["head.bias"] = torch.cat([b, torch.full((706,), -1e4)])
    args = argparse.Namespace(model="vit_debug", num_frames=16, input_size=64)
    torch.save({"module": state, "args": args}, tmp_path / "public.pth")
    common = ["--shards", val, "--batch", "8", "--clips", "2", "--crops", "2", "--stride", "2", "--precision", "bf16",
              "--no-tracking"]
    wide = eval_json(["--weights", str(tmp_path / "public.pth"), "--classes", "k400", *common, "--out", str(tmp_path / "k400")])
    ours = eval_json(["--weights", str(run / "export" / "model_best_fp32.pt"), *common, "--out", str(tmp_path / "ours")])
    assert wide["classes"] == 400 and wide["top1"] == ours["top1"] and wide["videos"] == 12
    assert set(wide["per_class_accuracy"]) <= {"abseiling", "air drumming", "answering questions", "applauding"}
    # Without a class list the 710-way head is kept; a list that fits neither is refused in one sentence.
    assert main(["eval", "--weights", str(tmp_path / "public.pth"), "--classes", "k400", "--shards", val,
                 "--no-tracking", "--out", str(tmp_path / "x"), "--clips", "1", "--crops", "1"]) == 0
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    capsys.readouterr()
    assert main(["eval", "--weights", str(tmp_path / "public.pth"), "--classes", str(names), "--shards", val]) == 2
    assert "3 class names were given for a 710-way head" in capsys.readouterr().err


def mp4_files(shard: str, folder) -> list:
    """The mp4 members of a shard as plain files <key>.mp4, with their labels."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            data = tar.extractfile(info).read()
            if ext == "mp4":
                (folder / f"{key}.mp4").write_bytes(data)
            else:
                labels[key] = json.loads(data)["label"]
    return [(folder / f"{k}.mp4", labels[k]) for k in sorted(labels)]


def test_predict_names_the_class_of_videos_the_model_was_trained_on(trained, tmp_path, capsys):
    run, train, _, _ = trained
    videos = mp4_files(train.replace("{000000..000003}", "000000"), tmp_path / "videos")
    capsys.readouterr()
    assert main(["predict", *[str(p) for p, _ in videos], "--weights", str(run / "export" / "model_best_fp32.pt"),
                 "--json", "--top", "3"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["video"] for r in results] == [str(p) for p, _ in videos]
    for r, (_, label) in zip(results, videos):
        assert len(r["top5"]) == 3 and r["top5"][0]["probability"] >= r["top5"][1]["probability"]
        assert r["top5"][0]["index"] == label and r["top5"][0]["class"] == f"class_{label}"
    assert main(["predict", str(videos[0][0]), "--weights", str(run / "export" / "model_best_fp32.pt")]) == 0
    assert "class_" in capsys.readouterr().out.splitlines()[1]


def test_features_from_shards_equal_features_from_mp4_files_and_a_rerun_skips_finished_videos(trained, tmp_path, mlflow_here):
    run, train, _, _ = trained
    weights = str(run / "export" / "model_best_fp32.pt")
    first = train.replace("{000000..000003}", "000000")
    videos = mp4_files(first, tmp_path / "videos")
    assert main(["features", "--weights", weights, "--input", first, "--out", str(tmp_path / "shard"),
                 "--window", "16", "--stride", "8"]) == 0
    assert main(["features", "--weights", weights, "--input", str(tmp_path / "videos"), "--out", str(tmp_path / "mp4"),
                 "--window", "16", "--stride", "8", "--no-tracking"]) == 0
    from_shard = [json.loads(line) for line in (tmp_path / "shard" / "index.jsonl").read_text().splitlines()]
    from_mp4 = [json.loads(line) for line in (tmp_path / "mp4" / "index.jsonl").read_text().splitlines()]
    assert from_shard == from_mp4 and [r["key"] for r in from_shard] == [p.stem for p, _ in videos]
    assert from_shard[0]["starts"] == [0, 8, 16, 24] and from_shard[0]["fps"] == 10.0  # 40 frames at 10 fps
    for r in from_shard:
        a, b = np.load(tmp_path / "shard" / r["file"]), np.load(tmp_path / "mp4" / r["file"])
        assert a.shape == (4, 64) and np.allclose(a, b, atol=1e-5, rtol=0)
    (logged,) = mlflow.search_runs(experiment_names=["features"], output_format="list")
    assert logged.data.metrics["features/windows_per_s"] > 0 and logged.data.metrics["features/videos"] == 6
    # All shards into the folder that holds the first shard's videos: only the other 18 are computed.
    from scaling.use.features import FeatureOptions, extract

    stats = extract(FeatureOptions(weights=weights, inputs=[train], out=str(tmp_path / "shard"), window=16, stride=8,
                                   tracking=False))
    assert (stats["skipped"], stats["videos"]) == (6, 18)
    keys = [json.loads(line)["key"] for line in (tmp_path / "shard" / "index.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 24
    # Tokens instead of pooled vectors; other settings in the same folder are refused.
    assert main(["features", "--weights", weights, "--input", str(videos[0][0]), "--out", str(tmp_path / "tokens"),
                 "--pool", "none", "--no-tracking"]) == 0
    assert np.load(tmp_path / "tokens" / f"{videos[0][0].stem}.npy").shape == (2, 8 * 4 * 4, 64)  # 40 frames: 2 windows
    assert main(["features", "--weights", weights, "--input", first, "--out", str(tmp_path / "shard"), "--no-tracking"]) == 2


def test_pretraining_logs_a_reconstruction_figure_that_visualize_redraws_from_the_export(synth_shards, tmp_path):
    """The stage's figure (ZeRO-3, bf16) and `scaling visualize` on its fp32 export show the same
    clip and masks (first video of the first shard, seed 0): the same loss up to bf16 rounding."""
    train = f"{synth_shards(24, 6)}/synth-{{000000..000003}}.tar"
    run = tmp_path / "pre"
    cmd = [*SCALING, "pretrain", "--config", str(SMOKE), f"train.output_dir={run}", f"data.shards={train}",
           "train.ranks=1", "train.steps=3", "train.save_every=100", "optim.warmup_steps=1", "data.num_workers=0"]
    proc = subprocess.run(cmd, env=env_for(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("pretrain_smoke").experiment_id])
    assert "reconstruction.png" in {a.path for a in client.list_artifacts(logged.info.run_id)}
    stage_loss = logged.data.metrics["reconstruction/loss"]
    assert main(["export", str(run)]) == 0
    first = mp4_files(train.replace("{000000..000003}", "000000"), tmp_path / "v")[0][0]  # the stage's clip
    assert main(["visualize", "--weights", str(run / "export" / "model_fp32.pt"), "--video", str(first),
                 "--out", str(tmp_path / "rec.png")]) == 0
    redrawn = json.loads((tmp_path / "rec.json").read_text())
    assert redrawn["reconstruction_error"] == pytest.approx(redrawn["loss"], rel=1e-4)
    assert redrawn["loss"] == pytest.approx(stage_loss, rel=5e-2)
