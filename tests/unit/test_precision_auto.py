"""`train.precision: auto`: explicit choices stay, CUDA by capability, CPUs by a timed block whose
answer is cached per machine (CPU model, cores, torch, threads, block shape) and measured once
when ranks start together. The measurement is real, on a tiny block: a second or two."""
from __future__ import annotations

import json
import multiprocessing
import time

import pytest
import torch

from scaling import precision as P
from scaling.config import ConfigError, load_config, validate

TINY = P.BlockShape(width=32, heads=2, mlp_ratio=2.0, tokens=16)
SMOKE = "pipelines/pretrain_smoke.yaml"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "precision.json"
    monkeypatch.setenv(P.CACHE_ENV, str(path))
    return path


def never(*_):
    raise AssertionError("measured although the answer was cached")


def test_explicit_choices_stay_without_measuring(cache):
    for name in ("bf16", "fp16", "fp32"):
        assert P.choose_precision(name, TINY, 1, device="cpu") == P.Choice(name, "set in the config")
    assert not cache.exists()


def test_bf16_only_when_clearly_faster():
    assert P.decide_cpu({"fp32_s": 1.0, "bf16_s": 0.5}) == "bf16"
    assert P.decide_cpu({"fp32_s": 1.0, "bf16_s": 0.9}) == "bf16"
    assert P.decide_cpu({"fp32_s": 1.0, "bf16_s": 0.95}) == "fp32"
    assert P.decide_cpu({"fp32_s": 1.0, "bf16_s": 3.0}) == "fp32"


def test_cpu_decision_is_measured_once_per_machine_and_cached(cache):
    first = P.choose_precision("auto", TINY, 1, device="cpu")
    assert first.precision in ("bf16", "fp32") and "measured now" in first.reason
    entries = json.loads(cache.read_text())
    (key, entry), = entries.items()
    assert P.cpu_model() in key and f"torch {torch.__version__}" in key and "1 threads" in key
    assert entry["fp32_s"] > 0 and entry["bf16_s"] > 0 and entry["precision"] == first.precision
    again = P.cpu_choice(TINY, 1, measure=never)  # the cache answers
    assert again.precision == first.precision and f"cached in {cache}" in again.reason
    # Another machine's (or torch's) entry is never reused: same shape, other key.
    cache.write_text(json.dumps({key.replace(P.cpu_model(), "Other CPU"): {**entry, "precision": "fp16"}}))
    assert P.cpu_choice(TINY, 1).precision in ("bf16", "fp32")
    assert len(json.loads(cache.read_text())) == 2


def _slow_measure(shape, threads):
    with open(f"{P.cache_path()}.calls", "a") as f:
        f.write("x")
    time.sleep(0.5)
    return {"fp32_s": 1.0, "bf16_s": 0.5}


def _choose(_):
    return P.cpu_choice(TINY, 1, measure=_slow_measure).precision


def test_ranks_starting_together_measure_once(cache):
    with multiprocessing.get_context("fork").Pool(3) as pool:
        assert pool.map(_choose, range(3)) == ["bf16"] * 3
    assert (cache.parent / "precision.json.calls").read_text() == "x"


def test_run_config_auto_is_resolved_and_said(cache):
    cfg = load_config(SMOKE, ["train.precision=auto"])
    validate(cfg, 2, check_files=False)
    said = []
    choice = P.resolve_run_precision(cfg, threads=1, say=said.append)
    assert cfg.train.precision == choice.precision != "auto"
    assert said and said[0].startswith(f"[scaling] train.precision auto -> {choice.precision}: one 64-wide block")
    assert P.run_block_shape(cfg).tokens == 13  # debug 16x64: 8 x 4 x 4 tokens, 10 % of them visible
    assert load_config(None, []).train.precision == "auto"  # the default


def test_unknown_precision_is_one_sentence():
    cfg = load_config(SMOKE, ["train.precision=bf32"])
    with pytest.raises(ConfigError, match="train.precision 'bf32' is unknown; choose auto, bf16, fp16 or fp32"):
        validate(cfg, 2, check_files=False)
