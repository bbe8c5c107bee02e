"""The shipped recipes train as the VideoMAE V2 reference's launch scripts do.

The table below is typed from the reference's effective values (its scripts/pretrain/*.sh and
scripts/finetune/*.sh with its lr rule `lr_arg x videos / 256`), NOT read from our YAML. Every
number on our side is derived by `scaling pipeline show`, which calls the functions training
calls (peak_lr / min_lr / run_steps in scaling.train.engine, steps_per_epoch in
scaling.train.schedule, layer_lr_scale in scaling.train.param_groups).
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO

from scaling.cli import main
from scaling.config import ConfigError, load_config, save_config, validate
from scaling.pipeline.show import show_pipeline
from scaling.train.schedule import lr_of_step, run_steps, warmup_cosine

HYBRID = 1_350_000  # clips in the unlabeled hybrid: an epoch of pre-training is HYBRID // videos steps
K710, SSV2 = 658_340, 168_913  # train videos

# (pipeline, stage): reference values. "from": the stage or file the weights come from.
REFERENCE = {
    ("vitb_k400", "pretrain"): dict(script="vit_b_hybrid_pt", frm="scratch", videos=1024, peak=4.0e-3, min=4.0e-5,
                                    warmup_epochs=20, epochs=200, epoch_videos=HYBRID, num_sample=4,
                                    betas=(0.9, 0.95), wd=0.05, clip=0.0, sampling="stride"),
    ("vitg_k400", "pretrain"): dict(script="vit_g_hybrid_pt", frm="scratch", videos=2048, peak=4.8e-3, min=8.0e-5,
                                    warmup_epochs=30, epochs=300, epoch_videos=HYBRID, num_sample=4,
                                    betas=(0.9, 0.95), wd=0.05, clip=0.02, sampling="stride"),
    ("vitb_k400", "finetune"): dict(script="vit_b_k400_ft", frm="stage pretrain", videos=512, peak=1.4e-3, min=2.0e-6,
                                    warmup_epochs=5, epochs=90, layer_decay=0.75, num_sample=2, views="5 clips x 3 crops",
                                    betas=(0.9, 0.999), wd=0.05, clip=0.0, sampling="stride"),
    ("vitb_ssv2", "finetune"): dict(script="vit_b_ssv2_ft", frm="file runs/vitb_k400/pretrain/", videos=256, peak=2.0e-3,
                                    min=1.0e-6, warmup_epochs=5, epochs=25, epoch_videos=SSV2, layer_decay=0.65,
                                    num_sample=2, views="2 clips x 3 crops", betas=(0.9, 0.999), wd=0.05, clip=0.0,
                                    sampling="segments"),
    ("vitg_k400", "postpretrain"): dict(script="vit_g_k710_ft", frm="stage pretrain", videos=96, peak=3.75e-4,
                                        min=3.75e-7, warmup_epochs=5, epochs=35, epoch_videos=K710, layer_decay=0.9,
                                        drop_path=0.3, wd=0.1, clip=5.0, num_sample=2, views="5 clips x 3 crops",
                                        betas=(0.9, 0.999), sampling="stride"),
    ("vitg_k400", "finetune"): dict(script="vit_g_k710_it_k400_ft", frm="stage postpretrain", videos=96, peak=3.75e-6,
                                    min=3.75e-7, warmup_epochs=1, epochs=3, layer_decay=0.9, drop_path=0.25, wd=0.1,
                                    clip=0.0, num_sample=2, views="5 clips x 3 crops", betas=(0.9, 0.999),
                                    sampling="stride"),
    ("vitg_ssv2", "finetune"): dict(script="vit_g_ssv2_ft", frm="file runs/vitg_k400/pretrain/", videos=96,
                                    peak=1.125e-4, min=3.75e-7, warmup_epochs=5, epochs=20, epoch_videos=SSV2,
                                    layer_decay=0.9, drop_path=0.25, wd=0.05, clip=0.0, num_sample=2,
                                    views="2 clips x 3 crops", betas=(0.9, 0.999), sampling="segments"),
}
PIPELINES = sorted({p for p, _ in REFERENCE})


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture(scope="module")
def shown():
    return {(p, row["stage"]): row for p in PIPELINES for row in show_pipeline(f"{REPO}/pipelines/{p}.yaml")}


def test_every_shipped_recipe_stage_is_in_the_reference_table(shown):
    assert set(shown) == set(REFERENCE), "a recipe stage with no reference row (or the reverse)"


@pytest.mark.parametrize("key", sorted(REFERENCE), ids=lambda k: f"{k[0]}.{k[1]}")
def test_recipe_stage_equals_the_reference(shown, key):
    ref, got = REFERENCE[key], shown[key]
    assert got["videos_per_step"] == ref["videos"]
    assert got["clips_per_step"] == ref["videos"] * ref["num_sample"]
    assert math.isclose(got["peak_lr"], ref["peak"], rel_tol=1e-12), (got["peak_lr"], ref["peak"])
    assert math.isclose(got["min_lr"], ref["min"], rel_tol=1e-12), (got["min_lr"], ref["min"])
    assert got["warmup_lr"] == 0.0, "the reference's warmup starts at 0 (its --warmup_lr never reaches the scheduler)"
    # Epochs: the reference's epoch is len(dataset) // videos per step.
    epoch = ref.get("epoch_videos", got["videos_per_epoch"]) // ref["videos"]
    assert got["steps_per_epoch"] == epoch
    assert got["total_steps"] == ref["epochs"] * epoch and got["warmup_steps"] == ref["warmup_epochs"] * epoch
    assert tuple(got["betas"]) == ref["betas"] and got["weight_decay"] == ref["wd"] and got["clip_grad"] == ref["clip"]
    assert got["starts_from"].startswith(ref["frm"]), got["starts_from"]
    assert got["sampling"].startswith(ref["sampling"])
    if got["kind"] == "finetune":
        assert got["layer_decay"] == ref["layer_decay"] and got["test_views"] == ref["views"]
        assert got["drop_path"] == ref.get("drop_path", 0.1), "0.1: the reference's fine-tune default"
    else:
        assert "encoder tube 0.9, decoder running_cell 0.5" == got["masking"]


def test_ssv2_starts_from_the_pretraining_export_not_k710(shown):
    for pipeline in ("vitb_ssv2", "vitg_ssv2"):
        assert shown[(pipeline, "finetune")]["starts_from"].endswith("/pretrain/export/model_fp32.pt")


def test_layer_decay_lr_of_first_and_last_block(shown):
    row = shown[("vitg_k400", "postpretrain")]  # ViT-g: 40 blocks, block i is layer i + 1, head 41
    assert math.isclose(row["lr_first_block"], 3.75e-4 * 0.9 ** 40, rel_tol=1e-12)
    assert math.isclose(row["lr_last_block"], 3.75e-4 * 0.9, rel_tol=1e-12)


def reference_schedule(peak, floor, start, warmup, total):
    """The reference's utils.cosine_scheduler, per iteration, written out with numpy."""
    head = np.linspace(start, peak, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    tail = np.array([floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * i / len(iters))) for i in iters])
    return np.concatenate((head, tail))


def test_schedule_matches_the_reference_per_step_in_every_layer_group():
    cfg = load_config("pipelines/pretrain_smoke.yaml", [
        "stage=finetune", "data.source=noise", "train.global_batch=96", "optim.base_lr=1.0e-3", "optim.min_lr=1.0e-6",
        "optim.warmup_lr=1.0e-6", "optim.warmup_steps=0", "train.epochs=7", "optim.warmup_epochs=2", "finetune.layer_decay=0.8"])
    total, warmup = run_steps(cfg, epoch_steps=5)
    assert (total, warmup) == (35, 10)
    scales = [0.8 ** k for k in range(4)]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in scales]
    peak = 1.0e-3 * 96 / 256
    opt = torch.optim.AdamW([{"params": [p], "lr": peak * s} for p, s in zip(params, scales)], lr=peak)
    sched = warmup_cosine(opt, peak, 1.0e-6 * 96 / 256, 1.0e-6 * 96 / 256, warmup, total)
    expected = reference_schedule(peak, 1.0e-6 * 96 / 256, 1.0e-6 * 96 / 256, warmup, total)
    for step in range(total):
        assert math.isclose(lr_of_step(cfg, step, total, warmup), expected[step], rel_tol=1e-9)
        for group, scale in zip(opt.param_groups, scales):
            assert math.isclose(group["lr"], expected[step] * scale, rel_tol=1e-9), (step, group["lr"])
        opt.step()
        sched.step()
    assert expected[0] == 1.0e-6 * 96 / 256 and expected[warmup - 1] == peak == expected[warmup]


def test_supervised_stages_get_the_reference_finetune_defaults(tmp_path):
    ft = load_config(None, ["stage=finetune"])
    assert ft.optim.betas == (0.9, 0.999) and ft.optim.min_lr == 1e-6 and ft.optim.warmup_epochs == 5
    assert ft.data.num_sample == 2 and (ft.finetune.mixup, ft.finetune.cutmix, ft.finetune.label_smoothing) == (0.8, 1.0, 0.1)
    assert ft.finetune.layer_decay == 0.75 and ft.optim.clip_grad == 0.0 and ft.optim.weight_decay == 0.05
    pt = load_config(None, [])
    assert pt.optim.betas == (0.9, 0.95) and pt.optim.min_lr == 1e-5 and pt.data.num_sample == 4
    mine = load_config(None, ["stage=finetune", "optim.betas=[0.8, 0.9]", "data.num_sample=3"])
    assert mine.optim.betas == (0.8, 0.9) and mine.data.num_sample == 3, "what the user sets wins"
    # The config saved beside the checkpoints holds the effective values, not the YAML's silence.
    save_config(ft, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optim"]["betas"] == [0.9, 0.999] and saved["optim"]["min_lr"] == 1e-6


def test_a_decoder_ratio_that_cannot_be_honoured_is_refused(capsys):
    code = main(["pretrain", "--config", "pipelines/pretrain_smoke.yaml", "data.source=noise", "mask.decoder_ratio=0.3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "mask.decoder_ratio 0.3 cannot be honoured exactly" in err and "0.25, 0.5 or 0.75" in err
    cfg = load_config("pipelines/pretrain_smoke.yaml", ["data.source=noise", "mask.decoder_ratio=0.75"])
    validate(cfg, 2)


def test_pipeline_show_runs_without_data_and_prints_the_effective_values(tmp_path):
    """As on a fresh clone: no shards, no weights, no ranks, run from another folder."""
    cmd = [sys.executable, "-m", "scaling.cli", "pipeline", "show", str(REPO / "pipelines" / "vitg_k400.yaml")]
    table = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "2048 videos x 4 clips = 8192 clips" in table.stdout
    assert "peak 0.0048 (base_lr 0.0006 x 2048 / 256), min 8e-05" in table.stdout
    assert "64 ranks x 32 videos x 1 accumulation" in table.stdout, "the pre-training Slurm job's split"
    rows = json.loads(subprocess.run([*cmd, "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120).stdout)
    assert [r["stage"] for r in rows] == ["pretrain", "postpretrain", "finetune"]
    assert rows[1]["slurm"] == {"ranks": 32, "micro_batch": 3, "grad_accum": 1}


def test_pipeline_show_counts_the_shards_when_they_exist(tmp_path):
    shards = tmp_path / "synth"
    subprocess.run([sys.executable, "-m", "scaling.cli", "synth", "--out", str(shards), "--num-videos", "12",
                    "--per-shard", "6"], check=True, timeout=300)
    rows = show_pipeline("pipelines/smoke.yaml", [f"defaults.data.shards={shards}/synth-{{000000..000001}}.tar"])
    post = rows[1]
    assert post["videos_per_epoch"] == 12 and post["videos_per_epoch_from"] == "counted in the shards"
    assert post["steps_per_epoch"] == 12 // 8 and post["total_steps"] == 4 and post["warmup_steps"] == 1


def test_pipeline_show_refuses_a_bad_stage_in_one_sentence(capsys):
    code = main(["pipeline", "show", "pipelines/vitg_k400.yaml", "stages.pretrain.mask.decoder_ratio=0.4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("scaling pipeline show: error: stage 'pretrain': mask.decoder_ratio 0.4")
    with pytest.raises(ConfigError, match="unknown"):
        show_pipeline("pipelines/vitg_k400.yaml", ["stages.finetune.data.sampling=tsn"])
