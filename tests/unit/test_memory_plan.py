"""`scaling memory plan`: DeepSpeed's estimator reproduced exactly, activations counted per clip,
the largest micro-batch, and one-sentence errors. All on debug sizes or meta tensors: seconds."""
from __future__ import annotations

import contextlib
import io
import itertools

import pytest
from deepspeed.runtime.zero import stage3, stage_1_and_2

from scaling.memory import plan as P
from scaling.models.vit import ViTSize, get_size

# A tiny stack with 3 encoder and 2 decoder blocks, so that per-block extrapolation is tested
# against a model deeper than the 1- and 2-block ones it is built from.
TINY = ViTSize(width=32, depth=3, heads=2, mlp_hidden=64, patch=16, decoder_width=16, decoder_heads=2, decoder_depth=2)
CLIP = dict(frames=4, input_size=32)  # a 2 x 2 x 2 token grid: tube 0.9 leaves 1 of 4 visible per slot


@pytest.mark.parametrize("stage, optimizer, params", [
    (1, "none", "none"), (1, "cpu", "none"), (2, "none", "none"), (2, "cpu", "none"),
    (3, "none", "none"), (3, "cpu", "none"), (3, "nvme", "none"), (3, "cpu", "cpu"), (3, "nvme", "nvme")])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_model_states_agree_with_deepspeed_estimator(stage, optimizer, params, precision):
    sizes = [(P.param_counts(m)["total"], P.param_counts(m)["largest_layer"]) for m in ("debug", "vit_b", "vit_g")]
    for (total, largest), gpn, nodes in itertools.product(sizes + [(7, 3), (123_456_789, 1_000_001)], (1, 2, 8), (1, 3, 64)):
        mine = P.model_states(total, largest, precision, stage, optimizer, params, gpn, nodes)
        theirs = P.deepspeed_estimate(total, largest, stage, optimizer, params, gpn, nodes)
        assert mine == theirs, (total, largest, gpn, nodes)


def test_deepspeed_printed_tables_show_the_planner_numbers():
    """The `..._all_cold` helpers print what the planner reports (GB there means GiB)."""
    c = P.param_counts("vit_g")
    for stage, fn, args in ((3, stage3.estimate_zero3_model_states_mem_needs_all_cold, (c["total"], c["largest_layer"])),
                            (2, stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold, (c["total"],))):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            fn(*args, num_gpus_per_node=8, num_nodes=4)
        mine = P.model_states(c["total"], c["largest_layer"], "bf16", stage, "none", "none", 8, 4)
        row = next(line for line in out.getvalue().splitlines() if "offload_optimizer=none" in line
                   and ("zero_init=1" in line or stage == 2))
        assert f"{mine['gpu'] / 2**30:6.2f}GB" in row and f"{mine['host_per_node'] / 2**30:7.2f}GB" in row


def test_param_counts_match_deepspeed_model_to_params():
    """`..._all_live` counts a real model with `model_to_params`; the meta count must agree."""
    from scaling.models.pretrain import build_pretrain_model

    total, largest = stage3.model_to_params(build_pretrain_model("debug", 16, 224))
    assert P.param_counts("debug") == {"total": total, "largest_layer": largest}


def test_stage1_keeps_unpartitioned_gradients():
    spec = P.PlanSpec(model="debug", zero_stage=1, gpus_per_node=4, device="gpu")
    total = P.param_counts("debug")["total"]
    (extra,) = [e for e in P.extras(spec, total, 0, P.zero_settings(spec.ds_config)) if "gradients" in e["name"]]
    assert extra["bytes"] == 2 * total - 2 * total // 4


@pytest.mark.parametrize("device", ["meta", "cpu"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("masking", ["dual", "encoder_only"])
def test_activation_bytes_are_per_clip(device, checkpointing, masking):
    size = get_size("debug")
    one, two = (P._step_saved_bytes(size, 16, 64, masking, "bf16", checkpointing, device, batch, 0.9, 0.5) for batch in (1, 2))
    assert one > 0 and two == 2 * one


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_per_block_extrapolation_equals_the_full_count(device):
    """Exact on meta. The CPU figure is meta's plus what fp32 attention adds per real block; a
    real full CPU count differs by a few bytes outside the blocks (24 of 63692 here)."""
    profile = P.activation_profile(TINY, "dual", "bf16", device, **CLIP)
    where = "meta" if device == "gpu" else "cpu"
    for checkpointing, key in ((False, "plain"), (True, "checkpointing")):
        full = P._step_saved_bytes(TINY, CLIP["frames"], CLIP["input_size"], "dual", "bf16", checkpointing, where, 1, 0.9, 0.5)
        assert profile[key] == full if device == "gpu" else abs(profile[key] - full) <= 1e-3 * full


def test_cpu_attention_saves_more_than_gpu():
    """On the CPU the model runs bf16 attention in fp32 (models/vit.py): more bytes per block."""
    gpu, cpu = (P.activation_profile("debug", "dual", "bf16", d) for d in ("gpu", "cpu"))
    assert cpu["encoder_block"] > gpu["encoder_block"] and cpu["checkpointing"] == gpu["checkpointing"]


def test_dual_masking_saves_less_than_encoder_only():
    dual, enc = (P.activation_profile("debug", m, "bf16", "gpu") for m in ("dual", "encoder_only"))
    assert dual["plain"] < enc["plain"] and dual["tokens"]["predicted"] < enc["tokens"]["predicted"]


def test_largest_micro_batch_grows_with_gpu_memory():
    previous = -1
    for gib in (0.05, 0.1, 0.5, 1, 2, 8, 40, 80):
        result = P.plan(P.PlanSpec(model="debug", gpus_per_node=2, gpu_memory_gb=gib, reserve_gb=0))
        for row in result["fits"]:
            b = row["largest_micro_batch"]
            if b:  # it fits at b clips and not at b + 1
                assert P.peak(result, b, row["masking"], row["checkpointing"])["fits"]
                assert not P.peak(result, b + 1, row["masking"], row["checkpointing"])["fits"]
        assert result["largest_micro_batch"] >= previous
        previous = result["largest_micro_batch"]
    assert previous > 0


def test_checkpointing_fits_more_clips():
    result = P.plan(P.PlanSpec(model="debug", gpus_per_node=2, gpu_memory_gb=4, reserve_gb=0))
    rows = {(r["masking"], r["checkpointing"]): r["largest_micro_batch"] for r in result["fits"]}
    assert rows[("dual", True)] > rows[("dual", False)] and rows[("dual", False)] > rows[("encoder_only", False)]


@pytest.mark.parametrize("argv, words", [
    (["--model", "vit_zz"], "unknown model 'vit_zz'"),
    (["--zero-stage", "4"], "ZeRO stage 4 does not exist"),
    (["--zero-stage", "1", "--offload-optimizer", "nvme"], "NVMe offload needs ZeRO stage 3"),
    (["--offload-params", "cpu"], "parameter offload without optimizer offload"),
    (["--masking", "both"], "unknown masking 'both'"),
])
def test_bad_input_is_one_sentence_and_exit_2(argv, words, capsys):
    from scaling.cli import main

    assert main(["memory", "plan", "--model", "debug", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.count("\n") == 0 and "Traceback" not in err


def test_cli_table_and_json(capsys):
    import json

    from scaling.cli import main

    assert main(["memory", "plan", "--model", "debug", "--gpus-per-node", "2", "--gpu-memory-gb", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_states"]["agree"] and result["largest_micro_batch"] > 0
    assert main(["memory", "plan", "--model", "debug", "--micro-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed estimator says" in out and "encoder_only" in out and "at 4 clips per GPU" in out
