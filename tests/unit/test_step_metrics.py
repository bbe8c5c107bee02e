"""Per-step figures (scaling/train/step_metrics.py) and the pipeline's progress lines and summary
(scaling/pipeline/progress.py), without launching ranks."""
import json
import threading
import time

import pytest
import torch
import torch.distributed as dist
from helpers import SMOKE

from scaling.config import load_config
from scaling.memory.compare import count_variant
from scaling.pipeline.progress import StageProgress, last_row, progress_line, stage_result, summary_table
from scaling.train.step_metrics import (
    StepMetrics,
    compare_spec_for,
    count_step,
    eta_seconds,
    gpu_peak_tflops,
    gpu_row,
    measure_cpu_peak_tflops,
    mfu,
)


@pytest.mark.parametrize("name, row", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA A10", "A10"),
    ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"), ("Tesla V100-SXM2-32GB", "V100"),
    ("Tesla V100-PCIE-16GB", "V100 PCIe"), ("Tesla V100S-PCIE-32GB", "V100S"), ("Tesla T4", "T4"),
    ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 3090", None), ("AMD Instinct MI300X", "MI300X"),
])
def test_gpu_names_find_their_row_and_no_other(name, row):
    assert gpu_row(name) == row


def test_peak_follows_precision():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 66.9
    assert gpu_peak_tflops("NVIDIA A100-SXM4-40GB", "fp16") == 312.0
    assert gpu_peak_tflops("Tesla V100-SXM2-16GB", "bf16") == 125.0, "no bf16 on V100: its fp16 peak"
    assert gpu_peak_tflops("NVIDIA GeForce RTX 3090", "bf16") is None


def test_mfu_counts_every_rank():
    # 4 ranks of 1000 TFLOP/s peak doing 2 PFLOP in a 1 s step: half of 4 PFLOP/s.
    assert mfu(2e15, 1.0, 1000.0, 4) == pytest.approx(0.5)
    assert mfu(2e15, 2.0, 1000.0, 4) == pytest.approx(0.25)


def test_eta_leaves_the_first_step_out():
    # First step ended at t=100 after 90 s of warm-up; 3 more steps ended by t=130: 10 s each.
    assert eta_seconds(100.0, 130.0, steps_done=4, steps_left=6, first_step_seconds=90.0) == pytest.approx(60.0)
    assert eta_seconds(100.0, 100.0, steps_done=1, steps_left=6, first_step_seconds=90.0) == pytest.approx(540.0)


def test_cpu_gemm_peak_is_a_plausible_rate():
    # A rate, not a speed target: on a busy machine any single timing can be far off, so only its
    # order of magnitude is checked (a 2-core CPU does 10 GFLOP/s to 1 TFLOP/s in fp32).
    peak = measure_cpu_peak_tflops(torch.float32, size=256, seconds=0.05)
    assert 1e-4 < peak < 50, peak


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_figures_of_a_step(one_rank_group):
    cfg = load_config(SMOKE, ["data.source=noise", "train.global_batch=4", "data.num_sample=2", "train.precision=fp32"])
    logged = []
    perf = StepMetrics(cfg, rank=0, world=1, log=logged.append)
    perf.set_range(0, 10, 40)
    assert "MFU vs measured CPU GEMM peak" in logged[0]
    for _ in range(3):
        perf.step_started()
        with perf.waiting_for_data():
            time.sleep(0.05)
        time.sleep(0.05)
        perf.step_ended()
    got = perf.collect(3)
    s = got["step_time_s"]
    assert 0.1 <= s < 1 and 0.3 < got["data_wait_fraction"] <= 0.6
    assert got["clips_per_s"] == pytest.approx(8 / s)  # 4 videos x 2 clips
    variant, spec = compare_spec_for(cfg, 8)
    counted = count_variant(variant, spec)
    assert got["flops_per_step"] == counted["forward_flops"]["total"] + counted["backward_flops"]["plain"]["total"]
    assert got["encoder_tokens_per_s"] == pytest.approx(counted["tokens"]["encoder"] * 8 / s)
    assert got["mfu"] == pytest.approx(got["flops_per_step"] / (s * perf.peak_tflops * 1e12))
    assert got["eta_s"] == pytest.approx(7 * (perf._last_end - perf._first_end) / 2)
    assert got["memory/peak_rss_gib"] >= got["memory/rss_gib"] > 0.05
    line = perf.line(3, {"loss": 1.0, "lr": 1e-3, **got})
    assert line.startswith("[scaling] step 3/40 loss 1.0000") and "MFU" in line and "ETA 0:00:0" in line


def test_finetune_counts_its_own_head_and_mask():
    base = ["stage=finetune", "data.source=noise", "train.global_batch=4", "data.num_sample=1", "finetune.num_classes=10"]
    linear = count_step(load_config(SMOKE, base), world=2)
    bridging = count_step(load_config(SMOKE, [*base, "model.head=bridging"]), world=2)
    mar = count_step(load_config(SMOKE, [*base, "model.head=bridging", "mask.finetune=running_cell"]), world=2)
    assert (linear["variant"], bridging["variant"], mar["variant"]) == ("unmasked", "unmasked", "mar50_bridging")
    assert bridging["flops_per_step"] > linear["flops_per_step"], "the bridging head's blocks are counted"
    assert mar["flops_per_step"] < bridging["flops_per_step"] and mar["encoder_tokens"] == linear["encoder_tokens"] // 2


def test_last_row_skips_a_line_being_written_and_rows_before_the_offset(tmp_path):
    f = tmp_path / "metrics.jsonl"
    assert last_row(f) is None
    f.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    offset = f.stat().st_size
    assert last_row(f, offset) is None
    with open(f, "a") as out:
        out.write(json.dumps({"step": 2, "loss": 1.5, "steps_total": 4, "eta_s": 75}) + "\n" + '{"step": 3, "lo')
    assert last_row(f, offset)["step"] == 2
    assert progress_line("1/3 pretrain", last_row(f, offset), 12.4) == \
        "[pipeline] stage 1/3 pretrain: step 2/4, loss 1.5000, ETA 0:01:15 (elapsed 0:00:12)"
    assert progress_line("1/3 pretrain", None, 12.4) == "[pipeline] stage 1/3 pretrain: starting (12 s)"


def test_stage_progress_prints_while_the_stage_runs(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(json.dumps({"step": 9, "loss": 9.0}) + "\n")  # an earlier run's row: not this launch's
    printed = []
    with StageProgress("2/3 postpretrain", f, every_s=0.1, out=printed.append):
        time.sleep(0.35)
        with open(f, "a") as out:
            out.write(json.dumps({"step": 1, "loss": 0.5, "steps_total": 8, "eta_s": 3}) + "\n")
        time.sleep(0.35)
    assert printed[0].startswith("[pipeline] stage 2/3 postpretrain: starting (")
    assert printed[-1].startswith("[pipeline] stage 2/3 postpretrain: step 1/8, loss 0.5000, ETA 0:00:03")
    assert not any("step 9" in line for line in printed)
    assert not [t for t in threading.enumerate() if t.name == "pipeline-progress"], "the thread ended with the stage"


def test_heartbeat_yields_to_a_running_stages_progress_line(tmp_path, capsys):
    """One line per quiet stretch: the stage's progress line while it runs, the heartbeat outside."""
    from scaling.cli.pipeline import heartbeat

    with heartbeat(every=0.5):
        # Its line every 0.9 s: without yielding, the heartbeat would speak at 0.5 s.
        with StageProgress("1/3 pretrain", tmp_path / "metrics.jsonl", every_s=0.9):
            time.sleep(2.0)
        during = capsys.readouterr().out
        time.sleep(1.2)
    after = capsys.readouterr().out
    assert during.count("stage 1/3 pretrain: starting") >= 2 and "... working" not in during, during
    assert "... working" in after and "stage 1/3" not in after, after


def test_summary_table(tmp_path):
    (tmp_path / "pre" / "checkpoints" / "step00000005").mkdir(parents=True)  # saved after its last logged step
    (tmp_path / "pre" / "checkpoints" / "latest").write_text("step00000005")
    (tmp_path / "pre" / "metrics.jsonl").write_text(json.dumps({"step": 4, "steps_total": 5, "loss": 0.81234}) + "\n")
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "metrics.jsonl").write_text(json.dumps({"step": 6, "steps_total": 6, "loss": 2.5}) + "\n")
    (tmp_path / "ft" / "eval.json").write_text(json.dumps({"top1": 37.5, "videos": 8}))
    table = summary_table({"pretrain": {**stage_result(tmp_path / "pre", None), "weights": "pre/export/model_fp32.pt"},
                           "finetune": {**stage_result(tmp_path / "ft", 83.2), "weights": "ft/export/model_fp32.pt"}})
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "steps", "time", "final", "loss", "top-1", "weights"]
    assert lines[1].split() == ["pretrain", "5/5", "earlier", "0.8123", "-", "pre/export/model_fp32.pt"]
    assert lines[2].split() == ["finetune", "6/6", "0:01:23", "2.5000", "37.50", "ft/export/model_fp32.pt"]
    assert len({line.rindex(line.split()[-1]) for line in lines}) == 1, "the weights column is aligned"


def test_a_step_memory_compare_cannot_count_logs_without_flops(one_rank_group):
    """A decoder mask registered by a user has no `memory compare` variant: the run says so once
    and logs every other figure (training must not stop over a metric)."""
    from scaling.masking import register_mask, unregister_mask

    register_mask("decoder", "everything")(lambda batch, grid, ratio, generator, encoder_mask: encoder_mask)
    try:
        cfg = load_config(SMOKE, ["data.source=noise", "mask.decoder=everything"])
        logged = []
        perf = StepMetrics(cfg, rank=0, world=1, log=logged.append)
    finally:
        unregister_mask("decoder", "everything")
    assert logged[0].startswith("[scaling] FLOPs per step not counted (KeyError")
    perf.set_range(0, 2, 2)
    perf.step_started()
    perf.step_ended()
    got = perf.collect(1)
    assert "clips_per_s" in got and "eta_s" in got and not {"flops_per_step", "mfu", "encoder_tokens_per_s"} & set(got)
    assert "MFU" not in perf.line(1, {"loss": 1.0, "lr": 0.0, **got})
    assert "flops_per_step" not in perf.params()
