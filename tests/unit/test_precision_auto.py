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


def _rank_agrees(rank: int, store: str, caches: list[str], results) -> None:
    """One rank of a 2-process gloo group whose own precision cache (its 'machine') says otherwise."""
    import os

    import torch.distributed as dist

    os.environ[P.CACHE_ENV] = caches[rank]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cfg = load_config(SMOKE, ["train.precision=auto"])
    said = []
    precision = P.agree_on_precision(cfg, say=said.append)
    results.put((rank, precision, cfg.train.precision, said))
    dist.destroy_process_group()


def test_ranks_take_rank_0s_precision(tmp_path, monkeypatch):
    """Multi-node: each node's cache (or timing) may differ; every rank trains in rank 0's choice,
    and ranks other than 0 of an external launcher do not decide before the group exists."""
    from scaling.cli.train import resolve_precision

    cfg = load_config(SMOKE, ["train.precision=auto"])
    key = P.machine_key(P.run_block_shape(cfg), torch.get_num_threads())
    caches = []
    for rank, answer in enumerate(("fp32", "bf16")):  # rank 1 alone would pick bf16
        caches.append(str(tmp_path / f"node{rank}.json"))
        entry = {"fp32_s": 1.0, "bf16_s": 0.5 if answer == "bf16" else 2.0, "precision": answer, "measured_at": "then"}
        (tmp_path / f"node{rank}.json").write_text(json.dumps({key: entry}))
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_agrees, args=(rank, str(tmp_path / "store"), caches, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    rows = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [(rank, precision, resolved) for rank, precision, resolved, _ in rows] == [(0, "fp32", "fp32"), (1, "fp32", "fp32")]
    assert rows[0][3][0].startswith("[scaling] train.precision auto -> fp32:") and not rows[1][3]

    monkeypatch.setenv(P.CACHE_ENV, caches[1])
    monkeypatch.setenv("RANK", "1")
    resolve_precision(cfg, under_launcher=True)
    assert cfg.train.precision == "auto"  # decided after the process group exists, by rank 0
    monkeypatch.setenv("RANK", "0")
    resolve_precision(cfg, under_launcher=True)
    assert cfg.train.precision == "bf16"  # this 'node's cache
