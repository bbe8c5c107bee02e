"""train.compile=true through the real DeepSpeed engine, at the ZeRO stage `auto` picks here."""
import subprocess

import torch
from helpers import SCALING, SMOKE, env_for
from test_distributed import NOISE, losses, metrics

COMPILED = [*NOISE, "train.ranks=1", "train.precision=fp32", "train.compile=true", "train.zero_stage=auto"]


def pretrain(out, *overrides, tmp):
    proc = subprocess.run([*SCALING, "pretrain", "--config", str(SMOKE), f"train.output_dir={out}", *COMPILED, *overrides],
                          env=env_for(tmp), cwd=tmp, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_compiled_run_resumes_exactly_with_its_compile_cache(tmp_path):
    """A compiled run stopped after 2 of 4 steps and resumed logs the uninterrupted run's losses;
    the resumed process finds Inductor's cache beside the checkpoints."""
    said = pretrain(tmp_path / "whole", tmp=tmp_path)
    assert "[scaling] train.zero_stage=auto chose ZeRO-1: debug at 4 clips per rank" in said
    assert "[scaling] first forward with compilation: " in said
    cut = tmp_path / "cut"
    pretrain(cut, "train.max_steps_this_run=2", tmp=tmp_path)
    cache = cut / "compile_cache"
    assert any(cache.rglob("*.py")), "Inductor wrote its generated kernels beside the run"
    pretrain(cut, tmp=tmp_path)
    whole, resumed = metrics(tmp_path / "whole"), metrics(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(whole)), rtol=1e-6, atol=0)
