"""Bad configs are refused with one clear sentence, before any rank is launched."""
import pytest

from scaling.cli import main
from scaling.config import ConfigError, load_config, validate

SMOKE = "pipelines/pretrain_smoke.yaml"


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def run_cli(capsys, *args):
    code = main(["pretrain", "--config", SMOKE, "data.source=noise", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("override, fragment", [
    ("model.widht=3", "unknown config key 'model.widht'"),
    ("trian.steps=3", "unknown config key 'trian'"),
    ("model.name=vit_z", "unknown model.name 'vit_z'; choose one of: debug, vit_s"),
    ("train.global_batch=5", "train.global_batch=5 is not divisible by ranks x grad_accum = 2 x 1; use a multiple of 2"),
    ("train.steps=ten", "config key 'train.steps' must be an integer"),
    ("mask.encoder=block", "mask.encoder 'block' is unknown"),
    ("model.input_size=72", "not divisible by the patch size 16"),
    ("train.ds_config=nope.json", "train.ds_config 'nope.json' not found"),
    ("optim.warmup_steps=100", "optim.warmup_steps=100 must be below train.steps=40"),
])
def test_bad_values_give_one_clear_sentence(capsys, override, fragment):
    code, err = run_cli(capsys, override)
    assert code == 2
    assert fragment in err
    assert len(err.splitlines()) == 1


def test_missing_shards_name_the_fix(capsys):
    code = main(["pretrain", "--config", SMOKE, "data.shards=/nonexistent/shard-{000..003}.tar"])
    err = capsys.readouterr().err
    assert code == 2 and "matches no files" in err and "scaling synth" in err


def test_missing_config_file(capsys):
    assert main(["pretrain", "--config", "nope.yaml"]) == 2
    assert "config file 'nope.yaml' does not exist" in capsys.readouterr().err


def test_batch_split_uses_launcher_world_size(monkeypatch):
    cfg = load_config(SMOKE, ["data.source=noise", "train.global_batch=6", "train.grad_accum=3"])
    validate(cfg, 1)
    validate(cfg, 2)
    with pytest.raises(ConfigError, match="ranks x grad_accum = 4 x 3"):
        validate(cfg, 4)


def test_overrides_are_typed_and_nested():
    cfg = load_config(SMOKE, ["train.steps=7", "optim.betas=[0.9, 0.99]", "model.activation_checkpointing=false"])
    assert cfg.train.steps == 7 and cfg.optim.betas == (0.9, 0.99) and cfg.model.activation_checkpointing is False


def test_hybrid_sources_are_typed_and_checked(tmp_path):
    shard = tmp_path / "a-000000.tar"
    shard.write_bytes(b"")
    cfg = load_config(SMOKE, ["data.shards=''", f"data.sources=[{{name: k710, shards: '{shard}', weight: 0.7}}, "
                                                 f"{{name: ssv2, shards: ['{shard}'], weight: 0.3, stride: 2, flip: false}}]"])
    validate(cfg, 2)
    assert [(s.name, s.weight, s.stride, s.flip) for s in cfg.data.sources] == [("k710", 0.7, 4, True), ("ssv2", 0.3, 2, False)]
    with pytest.raises(ConfigError, match=r"unknown config key 'data.sources\[0\].wieght'"):
        load_config(SMOKE, ["data.sources=[{name: a, shards: x.tar, wieght: 0.5}]"])
    with pytest.raises(ConfigError, match="either data.shards or data.sources"):
        validate(load_config(SMOKE, [f"data.sources=[{{name: a, shards: '{shard}'}}]"]), 2)
    with pytest.raises(ConfigError, match="data source 'b' matches no files"):
        validate(load_config(SMOKE, ["data.shards=''", f"data.sources=[{{name: a, shards: '{shard}'}}, {{name: b, shards: nope.tar}}]"]), 2)
