"""Files from elsewhere are loaded without running code: a real malicious pickle, whose
unpickling would create a marker file, is refused in one sentence naming --trust-checkpoint,
and the marker never appears; public-style checkpoints (argparse.Namespace inside) still load."""
import argparse
import contextlib
import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import REPO

from scaling.cli import main
from scaling.config import load_config, validate
from scaling.models.convert import UntrustedCheckpointError, load_checkpoint_file
from scaling.train.checkpoint_trust import check_checkpoint_folder


class CreatesMarker:
    """Unpickling this calls os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(path: Path, marker: Path, raw: bool = False) -> Path:
    payload = {"model": {"patch_embed.proj.weight": torch.zeros(2, 2)}, "args": CreatesMarker(marker)}
    if raw:  # a bare pickle, not torch.save's zip: the format torch.load reads with the legacy path
        path.write_bytes(pickle.dumps(CreatesMarker(marker)))
    else:
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("raw", [False, True], ids=["torch.save", "bare pickle"])
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, raw):
    marker = tmp_path / "MARKER"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker, raw)
    with pytest.raises(UntrustedCheckpointError) as refused:
        load_checkpoint_file(evil)
    message = str(refused.value)
    assert "--trust-checkpoint" in message and "finetune.trust_checkpoint" in message and "\n" not in message
    if not raw:
        assert "posix.system" in message  # names what it would have run
    assert not marker.exists()
    with contextlib.suppress(Exception):  # a bare pickle is no checkpoint: it runs, then fails
        load_checkpoint_file(evil, trust=True)  # the override really unpickles: the payload was live
    assert marker.exists()


def test_public_videomae_style_checkpoint_loads_without_trust(tmp_path):
    """VideoMAE V2's save_model stores model, optimizer state, epoch, scaler state and the
    argparse namespace of the run."""
    path = tmp_path / "checkpoint-1199.pth"
    model = {"blocks.0.attn.qkv.weight": torch.randn(6, 2)}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                "epoch": 1199, "scaler": {"scale": 65536.0, "growth_factor": 2.0},
                "args": argparse.Namespace(model="vit_giant_patch14_224", lr=1e-3, opt_betas=[0.9, 0.95], resume="")}, path)
    ckpt = load_checkpoint_file(path)
    assert ckpt["args"].model == "vit_giant_patch14_224" and torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"],
                                                                        model["blocks.0.attn.qkv.weight"])


def test_finetune_init_from_malicious_file_is_refused_before_launch(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(b"")  # validation only checks that the shards exist
    out = tmp_path / "run"
    rc = main(["finetune", "--config", str(REPO / "pipelines" / "pretrain_smoke.yaml"), f"train.output_dir={out}",
               f"data.shards={shard}", "train.ranks=2", f"finetune.init_from={evil}", "finetune.num_classes=4",
               "tracking.enabled=false"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert "finetune.init_from" in err and "--trust-checkpoint" in err
    assert not marker.exists() and not out.exists()
    # With the override the check is skipped (the ranks will unpickle it in full); validation itself loads nothing.
    trusted = load_config(REPO / "pipelines" / "pretrain_smoke.yaml", [
        "stage=finetune", f"data.shards={shard}", f"finetune.init_from={evil}", "finetune.num_classes=4",
        "finetune.trust_checkpoint=true"])
    validate(trusted, 2)
    assert not marker.exists()


def crafted_run(tmp_path: Path, marker: Path, raw: bool = False) -> Path:
    """A run folder as `scaling export` expects it, its checkpoint files crafted."""
    tag = tmp_path / "crafted" / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text("step00000001")
    evil_checkpoint(tag / "mp_rank_00_model_states.pt", marker, raw)
    evil_checkpoint(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker, raw)
    return tag.parent.parent


@pytest.mark.parametrize("raw", [False, True], ids=["torch.save", "bare pickle"])
def test_export_of_crafted_checkpoint_folder_is_refused_and_runs_nothing(tmp_path, capsys, raw):
    """DeepSpeed's consolidation unpickles with weights_only=False: the folder is checked first."""
    marker = tmp_path / "MARKER"
    run = crafted_run(tmp_path, marker, raw)
    rc = main(["export", str(run)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert "--trust-checkpoint" in err and "mp_rank_00_model_states.pt" in err
    assert not marker.exists() and not (run / "export").exists()


def test_deepspeed_checkpoint_classes_are_allowed(tmp_path):
    """What DeepSpeed pickles into its optimizer states (ZeRO stage enum, loss scaler) passes;
    a run's real checkpoint passes in tests/integration/test_tracking_guard.py (`scaling export`)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    tag = tmp_path / "step00000001"
    tag.mkdir()
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
                                         "dynamic": DynamicLossScaler(2**16, 1000, 1.0, 2, False)},
                "ds_version": "0.19.8"}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_checkpoint_folder(tag)
    with pytest.raises(FileNotFoundError, match="no checkpoint files"):
        check_checkpoint_folder(tmp_path / "empty")
