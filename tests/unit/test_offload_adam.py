"""`optim.offload_adam`: which AdamW steps the optimizer states ZeRO offloads. Mistakes end before
launch in one sentence; `auto` is resolved (and said) for offloaded runs only; DeepSpeed is told
that torch's AdamW is a deliberate choice. That the choice reaches a real engine and both
optimizers train alike: tests/integration/test_offload_optimizer.py."""
from __future__ import annotations

import json

import pytest
from helpers import REPO, SMOKE

from scaling.cli import main
from scaling.config import load_config
from scaling.train import offload_optimizer as O

NVME = REPO / "ds_configs" / "zero3_nvme_offload.json"
NO_OFFLOAD = "ds_configs/zero3_bf16.json"
RUN = ["data.source=noise", "tracking.enabled=false", "train.ranks=1"]


def offload_json(tmp_path, device="cpu", **keys) -> str:
    ds = json.loads(NVME.read_text())
    ds.pop("zero_force_ds_cpu_optimizer")  # DeepSpeed's default (true) unless a test sets it
    ds["zero_optimization"]["offload_optimizer"]["device"] = device
    ds.update(keys)
    path = tmp_path / f"offload_{device}.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.parametrize("overrides, message", [
    (["optim.offload_adam=adam"], "optim.offload_adam 'adam' is unknown; choose auto, torch, deepspeed"),
    ([f"train.ds_config={NO_OFFLOAD}", "optim.offload_adam=deepspeed"],
     "optim.offload_adam=deepspeed steps optimizer states that ZeRO offloads, and train.ds_config"),
    (["FORCED", "optim.offload_adam=torch"], "sets zero_force_ds_cpu_optimizer=true, which refuses torch's AdamW"),
])
def test_offload_adam_mistakes_are_one_sentence_before_launch(tmp_path, capsys, overrides, message):
    if "FORCED" in overrides:
        overrides = [f"train.ds_config={offload_json(tmp_path, zero_force_ds_cpu_optimizer=True)}", *overrides[1:]]
    rc = main(["pretrain", "--config", str(SMOKE), *RUN, *overrides, f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert message in err
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_auto_is_resolved_and_said_for_offloaded_runs_only(tmp_path):
    said = []
    cfg = load_config(SMOKE, [*RUN, f"train.ds_config={offload_json(tmp_path, 'nvme')}"])
    O.resolve_offload_adam(cfg, say=said.append)
    assert cfg.optim.offload_adam == O.AUTO_OFFLOADED
    assert said == [said[0]] and said[0].startswith(f"[scaling] optim.offload_adam auto -> {O.AUTO_OFFLOADED}: "
                                                    "the optimizer is offloaded to nvme")
    plain = load_config(SMOKE, [*RUN, f"train.ds_config={NO_OFFLOAD}"])
    O.resolve_offload_adam(plain, say=said.append)
    assert plain.optim.offload_adam == "auto" and len(said) == 1  # nothing offloaded: torch's fused AdamW, unsaid


def test_deepspeed_is_told_when_torch_steps_offloaded_states(tmp_path):
    """DeepSpeed's default refuses any client optimizer but its CPU Adam for offloaded states."""
    from scaling.train.engine import build_ds_config

    for choice, told in (("torch", True), ("deepspeed", False), ("auto", O.AUTO_OFFLOADED == "torch")):
        cfg = load_config(SMOKE, [*RUN, f"train.ds_config={offload_json(tmp_path)}", f"optim.offload_adam={choice}"])
        ds = build_ds_config(cfg, 1)
        assert ds.get("zero_force_ds_cpu_optimizer", "unset") == (False if told else "unset"), choice
    plain = build_ds_config(load_config(SMOKE, [*RUN, f"train.ds_config={NO_OFFLOAD}"]), 1)
    assert "zero_force_ds_cpu_optimizer" not in plain and O.resolved_choice("auto", plain) == "torch"
