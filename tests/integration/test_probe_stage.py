"""The probe stage on 2 local ranks (ZeRO-3, bf16): pipelines/smoke_probe.yaml, shortened."""
import json
import subprocess

import torch
from helpers import REPO, SCALING, env_for


def test_probes_train_only_their_heads_on_the_frozen_pretrained_encoder(synth_shards, tmp_path):
    train, val = synth_shards(16, 8), synth_shards(8, 8, seed=1)
    out = tmp_path / "run"
    cmd = [*SCALING, "pipeline", "run", str(REPO / "pipelines" / "smoke_probe.yaml"), f"output_dir={out}",
           f"defaults.data.shards={train}/synth-{{000000..000001}}.tar", "stages.pretrain.train.steps=4",
           "stages.probe_linear.train.epochs=2", "stages.probe_attentive.train.epochs=2",
           f"stages.probe_linear.finetune.val_shards={val}/synth-000000.tar",
           f"stages.probe_attentive.finetune.val_shards={val}/synth-000000.tar"]
    run = subprocess.run(cmd, env=env_for(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for stage in ("probe_linear", "probe_attentive"):
        result = json.loads((out / stage / "eval.json").read_text())
        assert result["videos"] == 8 and 0 <= result["top1"] <= 100

    def weights(stage):
        return torch.load(out / stage / "export" / "model_fp32.pt", map_location="cpu", weights_only=True)["model"]

    pretrain, linear, attentive = weights("pretrain"), weights("probe_linear"), weights("probe_attentive")
    trunk = [k for k in linear if k.startswith(("patch_embed.", "blocks."))]
    assert trunk and any(k.startswith("probe_head.") for k in linear)
    for k in trunk:
        # The ranks hold the encoder in bf16 and never update it: the pre-trained weights, rounded.
        assert torch.equal(linear[k], pretrain[f"encoder.{k}"].to(torch.bfloat16).float()), k
        assert torch.equal(attentive[k], linear[k]), k
    assert {k for k in attentive if k.startswith("probe_head.pool.")}, "the attentive probe has its query pooling"
