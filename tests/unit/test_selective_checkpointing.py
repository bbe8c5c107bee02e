"""Selective activation checkpointing (`model.activation_checkpointing: true | false | N`) and the
planner's `--budget-gb` pick: which blocks, exact losses and gradients, the config check, and a
recommendation that is monotone in the budget. Debug sizes and meta tensors: seconds."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_models import _loss_and_grads

from scaling.config import ConfigError, load_config, validate
from scaling.masking import make_masks
from scaling.memory import plan as P
from scaling.memory.counting import saved_tensor_bytes
from scaling.models.classify import build_classifier
from scaling.models.pretrain import build_pretrain_model
from scaling.models.vit import ViTSize, checkpoint_count, checkpointed_blocks, get_size

SMOKE = "pipelines/pretrain_smoke.yaml"
# 4 encoder and 2 decoder blocks: deep enough that N = 1..3 differ from both ends.
FOUR = ViTSize(width=32, depth=4, heads=2, mlp_hidden=64, patch=16, decoder_width=16, decoder_heads=2, decoder_depth=2)


def test_first_n_and_spread_pick_these_blocks():
    assert checkpointed_blocks(12, 3, "first") == {0, 1, 2}
    assert checkpointed_blocks(12, 3, "spread") == {0, 4, 8}
    assert checkpointed_blocks(12, 0, "spread") == set() and checkpointed_blocks(12, 12, "spread") == set(range(12))
    # The decoder (4 blocks) and the bridging head (2) take the encoder's share, rounded up.
    assert [checkpoint_count(n, 4, 12) for n in (0, 1, 3, 6, 9, 12)] == [0, 1, 1, 2, 3, 4]
    assert [checkpoint_count(n, 2, 12) for n in (0, 1, 6, 7, 12)] == [0, 1, 1, 2, 2]
    assert checkpoint_count(True, 4, 12) == 4 and checkpoint_count(False, 4, 12) == 0


def test_models_give_each_stack_its_share():
    pre = build_pretrain_model("debug", 16, 64)
    pre.set_grad_checkpointing(1)  # 1 of the encoder's 2 blocks, the decoder's only block
    assert pre.encoder.grad_checkpointing == {0} and pre.decoder.grad_checkpointing == {0}
    cls = build_classifier("debug", 4, 16, 64, head="bridging", reconstruction=True)
    cls.set_grad_checkpointing(1)
    assert cls.grad_checkpointing == {0} and cls.bridge.grad_checkpointing == {0}
    assert cls.reconstruction.decoder.grad_checkpointing == {0}
    cls.set_grad_checkpointing(False)
    assert not cls.grad_checkpointing and not cls.bridge.grad_checkpointing


@pytest.mark.parametrize("checkpointing, placement", [(1, "first"), (1, "spread"), (2, "first")])
def test_n_blocks_give_identical_loss_and_gradients(checkpointing, placement):
    loss_a, grads_a = _loss_and_grads(False)
    loss_b, grads_b = _loss_and_grads(checkpointing, placement)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0, msg=name)


def test_more_blocks_save_less_and_the_planner_counts_each_n():
    """Saved bytes fall with every extra checkpointed block, and the planner's per-block
    arithmetic for N equals a full count of the model run with N."""
    profile = P.activation_profile(FOUR, "dual", "bf16", "gpu", frames=4, input_size=32)
    counted = [P._step_saved_bytes(FOUR, 4, 32, "dual", "bf16", n, "meta", 1, 0.9, 0.5) for n in range(5)]
    assert counted == sorted(counted, reverse=True) and len(set(counted)) == 5
    assert [P.saved_bytes(profile, n) for n in range(5)] == counted
    assert P.saved_bytes(profile, 0) == profile["plain"] and P.saved_bytes(profile, 4) == profile["checkpointing"]
    model = build_pretrain_model("debug", 16, 64).train()
    video = torch.randn(1, 3, 16, 64, 64)
    enc, dec = make_masks(1, model.grid, "tube", 0.9, "running_cell", 0.5, torch.Generator().manual_seed(0))
    real = []
    for n in (0, 1, 2):
        model.set_grad_checkpointing(n)
        real.append(saved_tensor_bytes(lambda: model(video, enc, dec)))
    assert real[0] > real[1] > real[2]


@pytest.mark.parametrize("value, ok", [("true", True), ("false", True), ("0", True), ("2", True), ("3", False), ("-1", False)])
def test_config_takes_a_bool_or_a_block_count(value, ok):
    cfg = load_config(SMOKE, [f"model.activation_checkpointing={value}"])  # debug: 2 blocks
    if ok:
        validate(cfg, 2, check_files=False)
    else:
        with pytest.raises(ConfigError, match=r"model.activation_checkpointing=-?\d+ is not a block count of debug \(2 blocks\)"):
            validate(cfg, 2, check_files=False)


def _pick(budget_gb: float, clips: int = 1) -> dict:
    spec = P.PlanSpec(model="vit_s", gpus_per_node=2, reserve_gb=0, device="gpu", frames=8, micro_batch=clips, budget_gb=budget_gb)
    return P.plan(spec)["budget"]["by_masking"]


def test_budget_pick_is_monotone_and_says_when_nothing_fits(capsys):
    plain, full = (P.plan(P.PlanSpec(model="vit_s", gpus_per_node=2, reserve_gb=0, frames=8, micro_batch=4,
                                     checkpointing=c, gpu_memory_gb=80))["at_micro_batch"]["peak"] for c in (False, True))
    budgets = [full / 2**30 * f for f in (0.9, 1.0, 1.02, 1.05, 1.1, 1.2)] + [plain / 2**30 * 1.01]
    picks = [_pick(b, clips=4)["dual"] for b in budgets]
    assert not picks[0]["fits"] and picks[0]["least_needed"] == pytest.approx(full, rel=1e-6)
    blocks = [p["checkpoint_blocks"] for p in picks[1:]]
    assert blocks == sorted(blocks, reverse=True) and blocks[0] == 12 and blocks[-1] == 0 and len(set(blocks)) > 2
    for budget, p in zip(budgets[1:], picks[1:]):
        assert p["peak"] <= budget * 2**30 and p["largest_micro_batch"] >= 4
        fewer = next(r for r in p["sweep"] if r["blocks"] == p["checkpoint_blocks"] - 1) if p["checkpoint_blocks"] else None
        assert fewer is None or fewer["largest_micro_batch"] < 4  # the smallest N that fits
    from scaling.cli import main

    assert main(["memory", "plan", "--model", "vit_s", "--frames", "8", "--gpus-per-node", "2", "--reserve-gb", "0",
                 "--micro-batch", "4", "--budget-gb", f"{budgets[0]:.4f}"]) == 0
    assert "nothing fits: even with every block checkpointed 4 clip(s) need" in capsys.readouterr().out


def test_plan_marks_a_row_for_n_blocks_not_for_true():
    result = P.plan(P.PlanSpec(model="debug", gpus_per_node=2, checkpointing=1))
    chosen = [r for r in result["fits"] if r["selected"]]
    assert len(chosen) == 1 and chosen[0]["checkpointing"] == 1 and chosen[0]["checkpointing"] is not True
    with pytest.raises(P.PlanError, match="--checkpoint-blocks 3 is not a block count of debug"):
        P.plan(dataclasses.replace(P.PlanSpec(model="debug"), checkpointing=3))
    assert get_size("debug").depth == 2


def test_cpu_plan_names_its_measured_terms():
    """CPU ranks: framework and flat-buffer terms in the fixed part, malloc arenas on the
    activations; none of them on a GPU or with calibrated=False (what bench/plan_calibrate.py fits)."""
    spec = P.PlanSpec(model="debug", gpus_per_node=2, reserve_gb=0, device="cpu", micro_batch=1)
    cpu, raw, gpu = P.plan(spec), P.plan(dataclasses.replace(spec, calibrated=False)), P.plan(dataclasses.replace(spec, device="gpu"))
    names = {e["name"]: e["bytes"] for e in cpu["extras"]}
    assert names["framework buffers (measured)"] == P.CPU_TERMS["framework_bytes"]
    assert names["DeepSpeed flat buffers (measured)"] == int(P.CPU_TERMS["flat_buffer_bytes_per_param"] * cpu["params"]["total"] / 2)
    assert not any("measured" in e["name"] for e in raw["extras"] + gpu["extras"])
    row, raw_row = (next(r for r in p["fits"] if r["selected"]) for p in (cpu, raw))
    assert row["allocator_retention_per_clip"] == row["activation_per_clip"] - raw_row["activation_per_clip"] > 0
    assert cpu["fixed_per_gpu"] - raw["fixed_per_gpu"] == sum(v for k, v in names.items() if "measured" in k)
    assert "malloc arenas keep" in P.table(cpu) and "malloc arenas keep" not in P.table(gpu)
