"""`optim.offload_adam` reaches a real DeepSpeed engine: one ZeRO-3 rank in a subprocess, the
optimizer offloaded to the CPU, built by `scaling.train.engine` as `scaling pretrain` builds it,
once with torch's fused AdamW and once with DeepSpeed's CPU Adam, each taking two steps from the
same weights on the same clips. The first run of DeepSpeed's CPU Adam builds its cpu_adam op
into the venv (93 s on 2 idle cores, once per venv)."""
import json
import subprocess
import sys

import torch
from helpers import REPO, SMOKE, env_for


def two_steps(choice: str, ds_config: str) -> dict:
    """Two steps of one engine; the basic optimizer's class, losses and the fp32 master weights."""
    from scaling.config import load_config
    from scaling.masking import make_masks
    from scaling.models.pretrain import build_pretrain_model
    from scaling.train.engine import build_model, initialize
    from scaling.train.run import build_ds_config

    cfg = load_config(SMOKE, ["data.source=noise", "train.ranks=1", "train.global_batch=2", "optim.warmup_steps=0",
                              "train.precision=bf16", f"train.ds_config={ds_config}", f"optim.offload_adam={choice}"])
    ds = build_ds_config(cfg, 1)
    torch.manual_seed(0)
    m, k = cfg.model, cfg.mask
    model = build_model(lambda: build_pretrain_model(m.name, m.num_frames, m.input_size), ds)
    engine, _ = initialize(model, cfg, ds)
    before = fp32_master(engine).clone()
    enc, dec = make_masks(2, model.grid, k.encoder, k.encoder_ratio, k.decoder, k.decoder_ratio, torch.Generator().manual_seed(0))
    losses = []
    for i in range(2):
        video = torch.randn(2, 3, m.num_frames, m.input_size, m.input_size, generator=torch.Generator().manual_seed(i))
        loss = engine(video.bfloat16(), enc, dec).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    master = fp32_master(engine)
    return {"optimizer": type(engine.basic_optimizer).__name__, "losses": losses, "master": master.tolist(),
            "moved": float((master - before).abs().max())}


def fp32_master(engine) -> torch.Tensor:
    return torch.cat([g.flatten() for g in engine.optimizer.fp32_partitioned_groups_flat])


def probe(ds_config: str) -> None:
    from scaling.train.run import init_ranks, local_env_for_single_process

    local_env_for_single_process()
    init_ranks()
    runs = {choice: two_steps(choice, ds_config) for choice in ("torch", "deepspeed")}
    a, b = (torch.tensor(runs[c].pop("master")) for c in ("torch", "deepspeed"))
    print(json.dumps({**runs, "max_master_diff": float((a - b).abs().max()), "master_numel": a.numel()}))


def test_offload_adam_choice_reaches_the_engine_and_both_train_alike(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero3_nvme_offload.json").read_text())
    ds["zero_optimization"]["offload_optimizer"]["device"] = "cpu"
    del ds["zero_force_ds_cpu_optimizer"]  # DeepSpeed's default (refuse torch's): the engine must say otherwise itself
    (tmp_path / "cpu_offload.json").write_text(json.dumps(ds))
    done = subprocess.run([sys.executable, __file__, "probe", str(tmp_path / "cpu_offload.json")], env=env_for(tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    assert verdict["torch"]["optimizer"] == "AdamW" and verdict["deepspeed"]["optimizer"] == "DeepSpeedCPUAdam"
    assert verdict["torch"]["losses"][0] == verdict["deepspeed"]["losses"][0]  # same weights, same clip
    # Both AdamW with the same hyper-parameters: the same update to float rounding, and a real one.
    assert verdict["max_master_diff"] < 1e-6 and verdict["torch"]["moved"] > 1e-4, verdict
    assert abs(verdict["torch"]["losses"][1] - verdict["deepspeed"]["losses"][1]) < 1e-3


if __name__ == "__main__" and sys.argv[1] == "probe":
    probe(sys.argv[2])
