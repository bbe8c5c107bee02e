"""Which AdamW steps the optimizer states ZeRO offloads to CPU or NVMe (`optim.offload_adam`).

  torch      torch.optim.AdamW with its fused kernel: one vectorized pass over each flat fp32
             partition, nothing to build.
  deepspeed  DeepSpeed's DeepSpeedCPUAdam (C++ with AVX-512/AVX2 intrinsics and OpenMP). Its
             cpu_adam op builds with the machine's C++ compiler on first use, into the venv's
             own torch_extensions folder (scaling/__init__.py): 93 s on 2 idle cores, once.
  auto       the default: DeepSpeed's for a DeepSpeed JSON that offloads the optimizer (torch's
             where its op does not build, said at start); a run without offload always takes
             torch's fused AdamW.

Measured with bench/offload_optimizer.py (bench/results/offload_optimizer.json; ViT-B
pre-training model, 2 CPU ranks, ZeRO-3 + bf16, arms interleaved on a busy machine): Adam alone
on a rank's 47 M-parameter partition takes the same time in both (0.13 vs 0.14 s, bound by
memory traffic), yet a whole engine.step() with the optimizer offloaded to CPU took 0.31 s with
DeepSpeed's against 0.50 s with torch's (median of 4), and with NVMe swap files 1.51 vs 1.68 s.
Both give the same update to float rounding.
"""
from __future__ import annotations

OFFLOAD_ADAMS = ("auto", "torch", "deepspeed")
AUTO_OFFLOADED = "deepspeed"  # the faster engine step for offloaded states (module docstring)


def offload_device(ds: dict) -> str:
    """none, cpu or nvme: where a DeepSpeed JSON puts the optimizer states."""
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    device = offload.get("device", "none")
    return device if device in ("cpu", "nvme") else "none"


def resolved_choice(choice: str, ds: dict) -> str:
    """torch or deepspeed for `optim.offload_adam=choice` under this DeepSpeed JSON."""
    if choice != "auto":
        return choice
    return AUTO_OFFLOADED if offload_device(ds) != "none" else "torch"


def problem_with(choice: str, ds: dict, path) -> str | None:
    """Why `optim.offload_adam=choice` cannot run with the DeepSpeed JSON at `path`, or None."""
    if choice not in OFFLOAD_ADAMS:
        return f"optim.offload_adam '{choice}' is unknown; choose {', '.join(OFFLOAD_ADAMS)}"
    if choice == "deepspeed" and offload_device(ds) == "none":
        return (f"optim.offload_adam=deepspeed steps optimizer states that ZeRO offloads, and train.ds_config {path} "
                "offloads none; set zero_optimization.offload_optimizer.device to cpu or nvme there, or "
                "optim.offload_adam=auto")
    if resolved_choice(choice, ds) == "torch" and offload_device(ds) != "none" and ds.get("zero_force_ds_cpu_optimizer"):
        return (f"train.ds_config {path} sets zero_force_ds_cpu_optimizer=true, which refuses torch's AdamW that "
                f"optim.offload_adam={choice} picks; remove that key or set optim.offload_adam=deepspeed")
    return None


def with_offload_adam(ds: dict, choice: str) -> dict:
    """DeepSpeed refuses a client optimizer other than its CPU Adam for offloaded states unless
    told otherwise (`zero_force_ds_cpu_optimizer`, default true); torch's is a deliberate choice here."""
    if offload_device(ds) != "none" and resolved_choice(choice, ds) == "torch":
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float], choice: str, ds: dict):
    """The AdamW that DeepSpeed wraps: DeepSpeedCPUAdam, or torch's fused AdamW (which on 2 CPU
    ranks took 1.1 s less per ViT-B step than its single-tensor default, bench/engine_step.py)."""
    import torch

    if resolved_choice(choice, ds) == "deepspeed":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def load_cpu_adam_op() -> str | None:
    """Build (first time) and load DeepSpeed's cpu_adam op; the first line of the error, or None."""
    import os
    from pathlib import Path

    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "")) / "cpu_adam" / "cpu_adam.so"
    if not built.is_file():  # the compiler prints nothing for minutes
        print(f"[scaling] building DeepSpeed's cpu_adam op into {built.parent} (once per venv, ~1.5 min on 2 cores)",
              flush=True)
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load()
    except Exception as e:  # noqa: BLE001 - a compiler error, a missing header: reported in one line
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return None


def resolve_offload_adam(cfg, say=print) -> None:
    """Before the ranks start: `auto` -> its choice for an offloaded run (said with the reason, and
    written into the config saved beside the checkpoints), and DeepSpeed's op built here once,
    so that ranks do not race to build it and a build failure is one sentence."""
    import json

    from scaling.config import ConfigError, resolve_ds_config

    ds = json.loads(resolve_ds_config(cfg.train.ds_config).read_text())
    device = offload_device(ds)
    if device == "none":
        return
    choice = resolved_choice(cfg.optim.offload_adam, ds)
    error = load_cpu_adam_op() if choice == "deepspeed" else None
    if error and cfg.optim.offload_adam == "deepspeed":
        raise ConfigError(f"optim.offload_adam=deepspeed needs DeepSpeed's cpu_adam op, which did not build here "
                          f"({error}); install a C++ compiler (apt-get install g++) or set optim.offload_adam=torch")
    if cfg.optim.offload_adam == "auto":
        cfg.optim.offload_adam = "torch" if error else choice
        why = (f"DeepSpeed's CPU Adam needs its cpu_adam op, which did not build here ({error}); torch's fused AdamW "
               "steps instead") if error else ("its engine step took 0.31 s against 0.50 s for torch's fused AdamW "
                                               "(ViT-B, 2 CPU ranks, bench/results/offload_optimizer.json)")
        say(f"[scaling] optim.offload_adam auto -> {cfg.optim.offload_adam}: the optimizer is offloaded to {device}; {why}")
