"""A ZeRO-3 run whose optimizer lives in NVMe swap files resumes exactly, and its checkpoint is
consolidated by export from its swap files.

One rank (ViT-S, 4 frames at 64 px: its weight-decayed sub-group is big enough for DeepSpeed's
async I/O and goes to swap files, its biases and norms stay in RAM, so both restore paths run),
built by `scaling.train.engine` as `scaling pretrain` builds it. An uninterrupted process takes
steps 1-3 and saves after step 1; a second process, with an empty swap folder of its own, resumes
that save through `scaling.train.checkpoint.resume` and takes steps 2-3. Step 2's loss needs the
fp32 weights back, step 3's also Adam's moments and step count (bias correction) used by step 2's
update. Each engine runs in its own process, as a real resume does (DeepSpeed numbers parameters
per process, and the swap files are named by those numbers)."""
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, SMOKE, env_for


def run(ds_config: str, ckpt: str, resume: bool) -> dict:
    import deepspeed

    from scaling.config import load_config
    from scaling.masking import make_masks
    from scaling.models.pretrain import build_pretrain_model
    from scaling.train import checkpoint
    from scaling.train.engine import build_model, initialize
    from scaling.train.run import build_ds_config, init_ranks, local_env_for_single_process

    local_env_for_single_process()
    init_ranks()
    cfg = load_config(SMOKE, ["model.name=vit_s", "model.num_frames=4", "model.input_size=64", "data.source=noise",
                              "train.ranks=1", "train.global_batch=2", "optim.warmup_steps=0", "train.steps=3",
                              "train.precision=bf16", f"train.ds_config={ds_config}"])
    ds = build_ds_config(cfg, 1)
    torch.manual_seed(0)
    m, k = cfg.model, cfg.mask
    model = build_model(lambda: build_pretrain_model(m.name, m.num_frames, m.input_size), ds)
    engine, _ = initialize(model, cfg, ds)
    zero = engine.optimizer
    swappable = [zero._swappable_optimizer_subgroup(i) for i in range(len(zero.fp16_groups))]
    enc, dec = make_masks(2, model.grid, k.encoder, k.encoder_ratio, k.decoder, k.decoder_ratio, torch.Generator().manual_seed(0))
    losses = {}
    if resume:
        checkpoint.resume(engine, ckpt, "step00000001")
    for i in range(1 if resume else 0, 3):
        video = torch.randn(2, 3, m.num_frames, m.input_size, m.input_size, generator=torch.Generator().manual_seed(i))
        loss = engine(video.bfloat16(), enc, dec).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses[i] = float(loss)
        if i == 0:
            checkpoint.save(engine, ckpt, 1, {"step": 1}, keep=0)
            with deepspeed.zero.GatheredParameters(list(model.parameters())):  # the saved weights, as bf16
                torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{ckpt}/bf16_weights.pt")
    steps = sorted({int(s["step"]) for s in zero.optimizer.state.values() if "step" in s})
    return {"losses": losses, "adam_steps": steps, "swappable": swappable}


def nvme_config(tmp_path, name: str) -> str:
    ds = json.loads((REPO / "ds_configs" / "zero3_nvme_offload.json").read_text())
    ds["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(tmp_path / f"swap_{name}")
    path = tmp_path / f"nvme_{name}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def launch(tmp_path, name: str, resume: bool) -> dict:
    done = subprocess.run([sys.executable, __file__, "run", nvme_config(tmp_path, name), str(tmp_path / "ckpt"), str(resume)],
                          env=env_for(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nvme_resume")
    return tmp, launch(tmp, "uninterrupted", False), launch(tmp, "resumed", True)


def test_nvme_offloaded_run_resumes_with_adam_state(runs):
    _, straight, resumed = runs
    assert True in straight["swappable"] and False in straight["swappable"], straight["swappable"]
    assert straight["adam_steps"] == resumed["adam_steps"] == [3]
    assert resumed["losses"]["1"] == straight["losses"]["1"]  # the weights came back
    assert resumed["losses"]["2"] == straight["losses"]["2"]  # and the moments that step 2's update used


def test_export_consolidates_nvme_checkpoint_from_its_swap_files(runs, tmp_path):
    from scaling.train.checkpoint import export_fp32

    ckpt = runs[0] / "ckpt"
    exported = torch.load(export_fp32(ckpt, tmp_path / "model.pt", tag="step00000001"), weights_only=False)["model"]
    live = torch.load(ckpt / "bf16_weights.pt")
    assert exported.keys() == live.keys()
    # The run's bf16 weights are its fp32 master weights rounded: the export must round to them.
    for name, weight in live.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name].bfloat16(), weight), name


if __name__ == "__main__" and sys.argv[1] == "run":
    print(json.dumps(run(sys.argv[2], sys.argv[3], sys.argv[4] == "True")))
