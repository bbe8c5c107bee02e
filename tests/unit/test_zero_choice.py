"""`train.zero_stage: auto`: the lowest ZeRO stage that fits, decided by the memory planner."""
import pytest
from helpers import REPO

from scaling.config import ConfigError, load_config, validate
from scaling.memory.zero_choice import choose_zero_stage, resolve_zero_stage
from scaling.pipeline.show import show_pipeline


def vit_g(*overrides):
    return load_config(None, ["model.name=vit_g", "model.activation_checkpointing=true", "train.global_batch=16",
                              "data.num_sample=4", "data.source=noise", "train.zero_stage=auto", *overrides])


def test_recipes_on_80gb_gpus_choose_a_stage_below_3_for_vit_b():
    """The recipes say `auto`; on their Slurm shapes (80 GiB GPUs) ViT-B's states are tiny, so
    ZeRO-1 (the least communication) fits, and `scaling pipeline show` says so with the numbers."""
    rows = show_pipeline(f"{REPO}/pipelines/vitb_k400.yaml")
    pretrain = next(r for r in rows if r["stage"] == "pretrain")
    assert pretrain["zero"]["setting"] == "auto" and pretrain["zero"]["stage"] in (1, 2)
    assert pretrain["zero"]["reason"].startswith("train.zero_stage=auto chose ZeRO-1: vit_b at 128 clips per rank needs ")
    assert "on 32 GPUs of 80 GiB" in pretrain["zero"]["reason"]


def test_vit_g_takes_zero3_only_where_lower_stages_do_not_fit():
    """ViT-g (1 B params: 2 bytes of bf16 weights + 16/G of optimizer states per param under
    ZeRO-1) fits ZeRO-1 on 80 GiB GPUs; on 6.5 GiB GPUs only ZeRO-3's partitioned weights fit."""
    assert choose_zero_stage(vit_g(), gpus_per_node=8, gpu_memory_gb=80).stage == 1
    choice = choose_zero_stage(vit_g(), gpus_per_node=8, gpu_memory_gb=6.5)
    assert choice.stage == 3
    assert "ZeRO-1 would need 6.4, ZeRO-2 would need 4.8" in choice.reason


def test_nothing_fits_keeps_zero3_and_names_the_fix():
    choice = choose_zero_stage(vit_g(), gpus_per_node=8, gpu_memory_gb=4)
    assert choice.stage == 3 and choice.reason.endswith("even there; use more GPUs or fewer videos per step")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_an_explicit_stage_is_kept(stage):
    assert resolve_zero_stage(vit_g(f"train.zero_stage={stage}"), world=8).stage == stage


def test_auto_is_accepted_and_other_words_refused():
    validate(vit_g(), 2, check_files=False)
    with pytest.raises(ConfigError, match=r"train.zero_stage must be 0, 1, 2, 3 or auto, got 'automatic'"):
        validate(vit_g("train.zero_stage=automatic"), 2, check_files=False)


def test_the_run_prints_its_choice_at_start(capsys, monkeypatch):
    """What `scaling pretrain` prints on rank 0 when it builds the DeepSpeed config."""
    from scaling.train.engine import build_ds_config

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = load_config(f"{REPO}/pipelines/pretrain_smoke.yaml", ["train.zero_stage=auto", "model.name=debug"])
    ds = build_ds_config(cfg, 2)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"[scaling] train.zero_stage=auto chose ZeRO-{ds['zero_optimization']['stage']}: debug at ")
    assert "CPU ranks of" in line


def test_compile_with_an_explicit_zero3_is_refused_before_launch():
    validate(vit_g("train.compile=true"), 2, check_files=False)  # auto: compiles unless it picks ZeRO-3
    with pytest.raises(ConfigError, match=r"^train.compile=true does not work with train.zero_stage=3 .* use "
                                          r"train.zero_stage=auto, 1 or 2, or train.compile=false$"):
        validate(vit_g("train.compile=true", "train.zero_stage=3"), 2, check_files=False)
