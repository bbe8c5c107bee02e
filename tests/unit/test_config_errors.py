"""Every config mistake ends before launch in one sentence (rc 2 from the CLI), never a traceback
from inside a rank: YAML syntax, numbers in exponent form, counts, DeepSpeed JSON clashes,
`init_from: previous` outside a pipeline, noise data in a fine-tune."""
import json

import pytest
from helpers import REPO, SMOKE

from scaling.cli import main
from scaling.config import ConfigError, load_config, validate
from scaling.pipeline import load_pipeline

NOISE = ["data.source=noise", "tracking.enabled=false"]


def refused(capsys, *argv: str) -> str:
    """The CLI's one-sentence refusal (rc 2, one line on stderr, no traceback)."""
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_yaml_syntax_error_in_a_file_names_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: debug\ntrain:\n  steps: [4\n  ranks: 1\n")
    err = refused(capsys, "pretrain", "--config", str(bad))
    assert str(bad) in err and "line 5, column 8" in err
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text("name: p\nstages:\n  pretrain: {stage: pretrain\n")
    with pytest.raises(ConfigError, match=r"pipe.yaml' is not valid YAML at line 4, column 1"):
        load_pipeline(str(pipe))


def test_yaml_syntax_error_in_an_override_names_the_override_and_column(tmp_path, capsys):
    err = refused(capsys, "pretrain", "--config", str(SMOKE), "train.steps=[1", f"train.output_dir={tmp_path / 'r'}")
    assert "override 'train.steps=[1'" in err and "column 3" in err
    assert not (tmp_path / "r").exists()


def test_numbers_in_exponent_form_are_numbers_in_files_and_overrides(tmp_path):
    cfg = load_config(SMOKE, ["optim.base_lr=1e-3", "train.steps=1e6", "optim.min_lr=5E-6", "optim.betas=[0.9, 9.5e-1]"])
    assert cfg.optim.base_lr == 1e-3 and cfg.optim.min_lr == 5e-6 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.steps == 1_000_000 and isinstance(cfg.train.steps, int)
    f = tmp_path / "exp.yaml"
    f.write_text("optim:\n  base_lr: 1e-3\n  min_lr: '1e-5'\ntrain:\n  global_batch: 8e0\n")
    cfg = load_config(f)
    assert (cfg.optim.base_lr, cfg.optim.min_lr, cfg.train.global_batch) == (1e-3, 1e-5, 8)
    with pytest.raises(ConfigError, match="'train.steps' must be an integer, got 1.5"):
        load_config(SMOKE, ["train.steps=1.5e0"])
    assert load_config(SMOKE, ["tracking.run_name=1e3x"]).tracking.run_name == "1e3x"  # strings stay strings


@pytest.mark.parametrize("override, expected", [
    ("train.ranks=0", "train.ranks must be at least 1, got 0"),
    ("train.ranks=-1", "train.ranks must be at least 1, got -1"),
    ("train.save_every=0", "train.save_every must be at least 1"),
    ("train.log_every=0", "train.log_every must be at least 1"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be 0"),
])
def test_counts_below_one_are_refused_before_launch(tmp_path, capsys, override, expected):
    out = tmp_path / "run"
    err = refused(capsys, "pretrain", "--config", str(SMOKE), *NOISE, f"train.output_dir={out}", override)
    assert expected in err
    assert not out.exists()


def test_pipeline_ranks_below_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'ranks' must be a whole number of at least 1, got 0"):
        load_pipeline(str(REPO / "pipelines" / "smoke.yaml"), [f"output_dir={tmp_path}", "ranks=0"])


def test_deepspeed_json_that_sets_what_the_run_config_computes_is_refused(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 64, "gradient_clipping": 1.0}))
    err = refused(capsys, "pretrain", "--config", str(SMOKE), *NOISE, f"train.ds_config={ds}",
                  f"train.output_dir={tmp_path / 'r'}")
    assert "train_batch_size (set by train.global_batch)" in err and "gradient_clipping (set by optim.clip_grad)" in err
    ds.write_text('{"zero_optimization": {"stage": 3},\n "steps_per_print": }')
    err = refused(capsys, "pretrain", "--config", str(SMOKE), *NOISE, f"train.ds_config={ds}")
    assert "not valid JSON at line 2, column 21" in err
    validate(load_config(SMOKE, NOISE), 2)  # the shipped JSON is fine
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "cpu_ranks": {"train_batch_size": 8}}))
    err = refused(capsys, "pretrain", "--config", str(SMOKE), *NOISE, f"train.ds_config={ds}")
    assert "train_batch_size (set by train.global_batch)" in err
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "cpu_ranks": 6250000}))
    err = refused(capsys, "pretrain", "--config", str(SMOKE), *NOISE, f"train.ds_config={ds}")
    assert "cpu_ranks must be a JSON object" in err


def test_cpu_ranks_block_applies_on_cpu_ranks_only(tmp_path):
    """`cpu_ranks` in a DeepSpeed JSON updates its sections for CPU ranks (gloo) and is dropped on
    GPUs; DeepSpeed never sees the key."""
    from scaling.config import ds_json_for

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"_comment": "x", "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e7,
                                                                     "overlap_comm": True},
                              "cpu_ranks": {"zero_optimization": {"reduce_bucket_size": 6250000}, "steps_per_print": 7}}))
    assert ds_json_for(str(ds), "gpu") == {"zero_optimization": {"stage": 1, "reduce_bucket_size": 5e7, "overlap_comm": True}}
    assert ds_json_for(str(ds), "cpu") == {"zero_optimization": {"stage": 1, "reduce_bucket_size": 6250000,
                                                                 "overlap_comm": True}, "steps_per_print": 7}


def test_init_from_previous_outside_a_pipeline_is_refused(tmp_path, capsys):
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(b"")  # validation checks that shards exist
    err = refused(capsys, "finetune", "--config", str(SMOKE), "tracking.enabled=false", f"data.shards={shard}",
                  "finetune.num_classes=4", "finetune.init_from=previous", f"train.output_dir={tmp_path / 'r'}")
    assert "init_from=previous" in err and "scaling pipeline run" in err
    assert not (tmp_path / "r").exists()


def test_noise_data_in_a_finetune_is_refused(tmp_path, capsys):
    err = refused(capsys, "finetune", "--config", str(SMOKE), *NOISE, "finetune.num_classes=4",
                  f"train.output_dir={tmp_path / 'r'}")
    assert "data.source=noise has no labels" in err
    with pytest.raises(ConfigError, match="stage 'postpretrain': data.source=noise"):
        load_pipeline(str(REPO / "pipelines" / "smoke.yaml"), [f"output_dir={tmp_path}", "defaults.data.source=noise"])
