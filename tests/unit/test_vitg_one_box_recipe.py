"""pipelines/vitg_one_box.yaml is the ViT-g pre-training recipe (VideoMAE V2's vit_g_hybrid_pt:
dual masking 0.9 / 0.5, lr 6e-4 per 256 videos, betas (0.9, 0.95), wd 0.05, clip 0.02,
checkpointing) shrunk to one CPU box: 2 ranks, one clip each, optimizer states on NVMe; and the
memory planner says it fits that box (bench/vitg_one_box.py measured 7.9 GiB per rank)."""
import json

import pytest
import torch

from scaling.config import load_config, resolve_ds_config, validate
from scaling.memory.plan import GiB, PlanSpec, peak, plan
from scaling.models.pretrain import build_pretrain_model

RECIPE = "pipelines/vitg_one_box.yaml"


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_the_recipe_is_vit_g_pretraining_on_two_cpu_ranks_with_nvme_offload():
    cfg = load_config(RECIPE, [])
    validate(cfg, world_size=2, check_files=False)
    m, mask, o, t = cfg.model, cfg.mask, cfg.optim, cfg.train
    assert (m.name, m.num_frames, m.input_size, m.activation_checkpointing) == ("vit_g", 16, 224, True)
    assert (mask.encoder, mask.encoder_ratio, mask.decoder, mask.decoder_ratio) == ("tube", 0.9, "running_cell", 0.5)
    assert (o.base_lr, o.min_lr, tuple(o.betas), o.weight_decay, o.clip_grad) == (6e-4, 1e-5, (0.9, 0.95), 0.05, 0.02)
    assert (t.ranks, t.global_batch, cfg.data.num_sample, t.zero_stage, t.precision) == (2, 2, 1, 3, "auto")
    offload = json.loads(resolve_ds_config(t.ds_config).read_text())["zero_optimization"]["offload_optimizer"]
    assert offload["device"] == "nvme"
    with torch.device("meta"):
        params = sum(p.numel() for p in build_pretrain_model("vit_g", 16, 224).parameters())
    assert round(params / 1e6, 1) == 1026.3  # the ViT-g pre-training model (encoder 1011.6 M + decoder 14.0 M)


def test_the_planner_says_it_fits_a_24_gb_box():
    spec = PlanSpec(model="vit_g", masking="dual", checkpointing=True, precision="bf16", zero_stage=3,
                    offload_optimizer="nvme", gpus_per_node=2, nodes=1, gpu_memory_gb=11, reserve_gb=0,
                    device="cpu", ds_config="ds_configs/zero3_nvme_offload.json")
    per_rank = peak(plan(spec), 1)
    assert per_rank["fits"]
    # 2 ranks x (prediction + an idle rank's ~0.8 GiB of framework) inside 24 GB with room to spare
    assert 2 * (per_rank["peak"] / GiB + 0.8) < 20
