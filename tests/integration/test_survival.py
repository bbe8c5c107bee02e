"""A long run survives what goes wrong: divergence, damaged checkpoints, a full disk, two runs
in one folder, a changed config on resume, a kill, a preemption notice, fewer ranks on resume.

The rank tests launch `scaling pretrain` on 2 real DeepSpeed ranks (ZeRO-3 unless a test names
its stage; noise clips, the debug model), break something the way it breaks in life, and check
the exit code, the message, what is on disk and the MLflow run. Unit tests cover what needs no
ranks.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import SCALING, SMOKE, env_for

NOISE = ["data.source=noise", "data.num_sample=1", "train.global_batch=4", "optim.warmup_steps=1", "train.ranks=2"]


def pretrain(out: Path, *overrides: str, tmp: Path, env: dict | None = None, flags: tuple = ()) -> subprocess.CompletedProcess:
    cmd = [*SCALING, "pretrain", *flags, "--config", str(SMOKE), f"train.output_dir={out}", *NOISE, *overrides]
    return subprocess.run(cmd, env=env or env_for(tmp), cwd=tmp, capture_output=True, text=True, timeout=600)


def metrics(out: Path) -> dict[int, dict]:
    """Step -> metrics; a step logged twice (before a fall-back and after) keeps the last."""
    return {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def mlflow_runs(tmp: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["pretrain_smoke"], output_format="list")


def tags(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step*") if p.is_dir())


# --- divergence ---------------------------------------------------------------------------

def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_before_a_bad_checkpoint(tmp_path):
    """NaN at step 4 (skipped, training goes on), then at 7, 8, 9: the third in a row stops the run."""
    out = tmp_path / "run"
    common = ("train.steps=10", "train.save_every=2", "train.keep_checkpoints=3", "train.max_nonfinite_steps=3")
    nan = pretrain(out, *common, tmp=tmp_path, env=env_for(tmp_path, SCALING_TEST_NAN_AT_STEP="4,7,8,9"))
    assert nan.returncode == 3, nan.stdout[-3000:] + nan.stderr[-3000:]
    sentence = ("scaling pretrain: error: training diverged: 3 steps in a row up to step 9 had a non-finite loss or "
                "gradient norm and were skipped; the newest checkpoint is from step 6 or before")
    assert sentence in nan.stderr
    assert "Traceback" not in nan.stderr.split(sentence)[1]  # the sentence comes last
    rows = metrics(out)
    assert [rows[s]["train/skipped_steps"] for s in range(1, 10)] == [0, 0, 0, 1, 1, 1, 2, 3, 4]
    assert math.isnan(rows[4]["loss"]) and math.isfinite(rows[5]["loss"])
    # No checkpoint at a non-finite step (4, 8), none after the divergence began.
    assert tags(out) == ["step00000002", "step00000006"]
    assert (out / "checkpoints" / "latest").read_text() == "step00000006"
    assert "training diverged" in (out / "FAILED").read_text()
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"

    resumed = pretrain(out, *common, tmp=tmp_path)  # the cause is gone: it resumes from the last good checkpoint
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming at step 6" in resumed.stdout
    rows = metrics(out)
    assert all(math.isfinite(rows[s]["loss"]) and rows[s]["train/skipped_steps"] == 0 for s in range(7, 11))
    (run,) = mlflow_runs(tmp_path)  # the same MLflow run, now finished
    assert run.info.status == "FINISHED"
    assert not (out / "FAILED").exists()


def skipped_step_probe() -> None:
    """One real ZeRO-3 rank in this process: a NaN step leaves weights, Adam moments and the lr
    schedule exactly as they were; the next finite step changes them. Prints a JSON verdict."""
    import deepspeed

    from scaling.config import load_config
    from scaling.masking import make_masks
    from scaling.models.pretrain import build_pretrain_model
    from scaling.train.engine import build_model, initialize
    from scaling.train.guard import DivergenceGuard
    from scaling.train.run import build_ds_config, init_ranks, local_env_for_single_process

    cfg = load_config(SMOKE, [*NOISE, "train.ranks=1", "model.activation_checkpointing=false", "optim.warmup_steps=0",
                              "train.global_batch=2"])
    local_env_for_single_process()
    init_ranks()
    ds_config = build_ds_config(cfg, 1)
    torch.manual_seed(0)
    m = cfg.model
    model = build_model(lambda: build_pretrain_model(m.name, m.num_frames, m.input_size), ds_config)
    engine, scheduler = initialize(model, cfg, ds_config)
    guard = DivergenceGuard(3, "bf16", 0)
    k = cfg.mask
    enc, dec = make_masks(2, model.grid, k.encoder, k.encoder_ratio, k.decoder, k.decoder_ratio, torch.Generator().manual_seed(0))

    def state():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
        opt = engine.optimizer
        moments = torch.cat([s["exp_avg"].flatten() for s in opt.optimizer.state.values()]) if opt.optimizer.state else torch.zeros(1)
        fp32 = torch.cat([g.flatten() for g in opt.fp32_partitioned_groups_flat])
        return weights, moments, fp32, scheduler.get_last_lr()[0]

    def step(i):
        video = torch.randn(2, 3, m.num_frames, m.input_size, m.input_size, generator=torch.Generator().manual_seed(i))
        loss = engine(video.bfloat16(), enc, dec).float().pow(2).mean()
        loss = guard.inject(loss, i)
        engine.backward(loss)
        guard.optimizer_step(engine, i)
        return guard.check(engine, i, float(loss))

    step(0)
    before = state()
    guard.nan_steps = {2}  # step index 1 is reported as step 2
    finite = step(1)
    after_nan = state()
    finite_next = step(2)
    after_good = state()
    same = [bool(torch.equal(a, b)) for a, b in zip(before[:3], after_nan[:3])]
    print(json.dumps({"finite": finite, "finite_next": finite_next, "unchanged": same, "lr_same": before[3] == after_nan[3],
                      "changed_after_good": not torch.equal(before[0], after_good[0]), "skipped": guard.skipped,
                      "ds_skipped": engine.skipped_steps}))


def test_a_skipped_step_leaves_weights_moments_and_schedule_untouched(tmp_path):
    done = subprocess.run([sys.executable, __file__, "probe"], env=env_for(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    assert verdict == {"finite": False, "finite_next": True, "unchanged": [True, True, True], "lr_same": True,
                       "changed_after_good": True, "skipped": 1, "ds_skipped": 1}


# --- checkpoints ----------------------------------------------------------------------------

def test_damaged_checkpoints_fall_back_to_the_newest_good_one(tmp_path):
    """Garbage in `latest`, step 8 overwritten in place, step 6 truncated, step 4 missing a rank's
    file: the run says so for each, resumes from step 2 in the same MLflow run, moves the newer
    tags aside and reproduces the first run's losses."""
    out = tmp_path / "run"
    common = ("train.steps=8", "train.save_every=2", "train.keep_checkpoints=4")
    first = pretrain(out, *common, tmp=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    reference = {s: r["loss"] for s, r in metrics(out).items()}
    ckpt = out / "checkpoints"
    assert tags(out) == ["step00000002", "step00000004", "step00000006", "step00000008"]
    assert json.loads((ckpt / "step00000004" / "manifest.json").read_text())["world"] == 2

    (ckpt / "latest").write_bytes(b"\xff\xfe\x00 not a tag")
    overwritten = ckpt / "step00000008" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(overwritten, "r+b") as f:  # same size, other bytes: only the checksums see it
        f.seek(overwritten.stat().st_size // 2)
        f.write(b"\x00" * 4096)
    truncated = ckpt / "step00000006" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(truncated, 1000)
    missing = ckpt / "step00000004" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    missing.unlink()

    resumed = pretrain(out, *common, tmp=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    said = resumed.stdout
    assert f"checkpoint step00000008 cannot be resumed from: {overwritten} is corrupt" in said
    assert f"checkpoint step00000006 cannot be resumed from: {truncated} has 1000 bytes where" in said
    assert f"checkpoint step00000004 cannot be resumed from: {missing} is missing" in said
    assert "written by" not in said  # a missing file is not another rank count
    assert "resuming at step 2" in said
    assert "Traceback" not in resumed.stderr
    (aside,) = ckpt.glob("set_aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step00000004", "step00000006", "step00000008"]
    assert (aside / "step00000006" / truncated.name).stat().st_size == 1000  # kept as found, never overwritten
    again = {s: r["loss"] for s, r in metrics(out).items()}
    assert again == reference  # steps 3-8 again, exactly
    assert tags(out) == ["step00000002", "step00000004", "step00000006", "step00000008"]
    assert (ckpt / "latest").read_text() == "step00000008"
    assert len(mlflow_runs(tmp_path)) == 1


def tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    # Fail, not skip: a CI that cannot mount would otherwise pass without testing a full disk.
    assert done.returncode == 0, f"this test mounts a 4 MiB tmpfs and needs root to: {done.stderr.strip()}"


def test_disk_full_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    """A 4 MiB file system holds one checkpoint of the debug model (2.8 MB) but not two."""
    disk = tmp_path / "disk"
    tmpfs(disk, "4m")
    try:
        out = disk / "run"
        done = pretrain(out, "train.steps=6", "train.save_every=2", "train.keep_checkpoints=1", tmp=tmp_path)
        assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
        sentence = (f"scaling pretrain: error: no space left on {disk} (tmpfs) while saving step 4; "
                    "the previous checkpoint step 2 is intact")
        assert sentence in done.stderr
        assert done.stderr.rstrip().endswith(sentence)
        assert tags(out) == ["step00000002"]  # the half-written step 4 is gone
        assert (out / "checkpoints" / "latest").read_text() == "step00000002"
        from scaling.train.checkpoint import incomplete, unreadable

        assert incomplete(out / "checkpoints", "step00000002", named_by_latest=True) is None
        assert all(unreadable(f) is None for f in (out / "checkpoints" / "step00000002").glob("*.pt"))
        (run,) = mlflow_runs(tmp_path)
        assert run.info.status == "FAILED"
    finally:
        subprocess.run(["umount", str(disk)])


def test_other_os_errors_during_a_save_are_named(tmp_path):
    from scaling.train.checkpoint import describe_os_error

    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder must be")
    with pytest.raises(OSError) as caught:
        open(blocker / "step00000004", "w")
    wrapped = RuntimeError("unexpected pos 64 vs 0")  # what torch.save's writer raises
    wrapped.__context__ = caught.value
    assert describe_os_error(wrapped, tmp_path) == f"not a directory ({blocker / 'step00000004'})"


def fake_tag(ckpt: Path, step: int, loss: float | None, world: int = 2, manifest: bool = True) -> Path:
    from scaling.train.checkpoint import tag_for, write_manifest

    d = ckpt / tag_for(step)
    d.mkdir(parents=True)
    for r in range(world):
        torch.save({"x": torch.arange(10)}, d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    if manifest:
        write_manifest(d, world, step, loss)
    return d


def test_latest_missing_or_naming_an_unfinished_save_resumes_the_newest_complete_tag(tmp_path, capsys):
    from scaling.train.checkpoint import choose_resume_tag, latest_tag

    ckpt = tmp_path / "checkpoints"
    fake_tag(ckpt, 2, 1.0)
    fake_tag(ckpt, 4, 0.9)
    fake_tag(ckpt, 6, None, manifest=False)  # killed during its save
    assert latest_tag(ckpt) == "step00000004"  # no `latest` file at all
    assert choose_resume_tag(ckpt, rank=0, world=1) == "step00000004"
    said = capsys.readouterr().out
    assert f"{ckpt / 'step00000006' / 'manifest.json'} is missing (the save did not finish)" in said
    assert (ckpt / "latest").read_text() == "step00000004"
    assert not (ckpt / "step00000006").exists()  # moved aside, never overwritten by the resumed run
    (ckpt / "latest").unlink()
    assert choose_resume_tag(ckpt, rank=0, world=1) == "step00000004"
    assert f"{ckpt / 'latest'} is missing; resuming from the newest complete checkpoint, step00000004" in capsys.readouterr().out
    assert (ckpt / "latest").read_text() == "step00000004"


def test_pruning_keeps_the_last_checkpoint_taken_at_a_finite_loss(tmp_path):
    from scaling.train.checkpoint import LATEST, prune

    ckpt = tmp_path / "checkpoints"
    fake_tag(ckpt, 2, 1.0)
    fake_tag(ckpt, 4, 0.8)
    fake_tag(ckpt, 6, float("nan"))
    fake_tag(ckpt, 8, float("inf"))
    (ckpt / LATEST).write_text("step00000008")
    prune(ckpt, keep=1)
    assert tags(tmp_path) == ["step00000004", "step00000008"]


def test_ranks_that_wrote_comes_from_the_manifest(tmp_path):
    from scaling.train.checkpoint import prepare_universal, ranks_that_wrote

    ckpt = tmp_path / "checkpoints"
    d = fake_tag(ckpt, 2, 1.0, world=2)
    next(d.glob("zero_pp_rank_1_*")).unlink()
    assert ranks_that_wrote(ckpt, "step00000002") == 2
    assert not prepare_universal(ckpt, "step00000002", world=2, rank=0)


# --- one run per folder, a changed config, signals -------------------------------------------

def process_tree(pid: int) -> list[int]:
    from scaling.launch import descendants

    return descendants(pid)


def alive(pids: list[int]) -> list[int]:
    from scaling.launch import _zombie

    return [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (out / "metrics.jsonl").is_file() and max(metrics(out), default=0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def wait_until(condition, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)


@contextmanager
def started(cmd: list[str], tmp_path: Path):
    """`cmd` running in the background; killed if the test fails before it ends."""
    proc = subprocess.Popen(cmd, env=env_for(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


def test_one_run_per_folder_changed_config_and_stop_signals(tmp_path):
    out = tmp_path / "run"
    cmd = [*SCALING, "pretrain", "--config", str(SMOKE), f"train.output_dir={out}", *NOISE, "train.steps=100000",
           "train.save_every=100000", "train.keep_checkpoints=1"]
    with started(cmd, tmp_path) as first:
        wait_for_step(out, 2, first)
        # A second run on the same folder refuses, naming the first, before any rank starts.
        second = subprocess.run(cmd, env=env_for(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is in use by another run (pid {first.pid} on " in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        # `kill <pid>`: every rank saves the same step, everything ends, exit 75.
        tree = process_tree(first.pid)
        assert len(tree) >= 3  # torchrun and two ranks
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 75, err[-3000:]
    stopped = json.loads((out / "STOPPED").read_text())
    assert tags(out) == [f"step{stopped['step']:08d}"]
    assert not alive(tree)
    assert mlflow_runs(tmp_path)[0].info.status == "KILLED"

    # The experiment changed: refused with the keys and both ways out, before any rank starts.
    changed = subprocess.run([*cmd, "mask.decoder=none", "optim.base_lr=0.01"], env=env_for(tmp_path), cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2
    from scaling.config import load_config

    base_lr = load_config(SMOKE).optim.base_lr  # the value the run started with
    assert "mask.decoder 'running_cell' -> 'none'" in changed.stderr and f"optim.base_lr {base_lr} -> 0.01" in changed.stderr
    assert "--fresh" in changed.stderr and "--allow-changed" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1

    # Resumed, then Ctrl-C twice: stops at once without saving, nothing left running.
    with started(cmd, tmp_path) as again:
        wait_for_step(out, stopped["step"] + 2, again)
        tree = process_tree(again.pid)
        again.send_signal(signal.SIGINT)
        # The second once the first has been answered (STOP written): Python runs one handler for
        # signals that arrive together, and a person is slower than that.
        wait_until(lambda: (out / "STOP").exists(), again)
        again.send_signal(signal.SIGINT)
        _, err = again.communicate(timeout=120)
    assert again.returncode == 130, err[-3000:]
    assert "stopped without saving" in err
    assert not alive(tree)
    assert mlflow_runs(tmp_path)[0].info.status == "KILLED"


# --- every stage `train.zero_stage=auto` can pick, compiled where compile applies -------------

# ZeRO-3 (eager: torch.compile cannot trace its partitioned weights) is the stage of the kill,
# preemption and universal-checkpoint tests in test_distributed.py; this chain covers 1 and 2.
BELOW_ZERO3 = {
    "zero1_compiled": ("train.zero_stage=auto", "train.compile=true", "train.precision=fp32"),  # auto: ZeRO-1 here
    "zero2": ("train.zero_stage=2",),
}
CHAIN = ("train.steps=10", "train.save_every=1", "train.keep_checkpoints=2")


def start_killed_at(out: Path, tmp: Path, tag: str, overrides) -> None:
    """Start a run and SIGKILL it (launcher and ranks, no clean-up) once `latest` names `tag` or later."""
    proc = subprocess.Popen([*SCALING, "pretrain", "--config", str(SMOKE), f"train.output_dir={out}", *NOISE, *overrides],
                            env=env_for(tmp), cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= tag:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("arm", BELOW_ZERO3)
def test_each_stage_auto_picks_survives_preemption_kill_and_resharding(tmp_path, arm):
    """One run, three starts: a preemption notice sent to ONE rank stops both at one step (exit
    75); resumed, it logs the uninterrupted run's losses exactly until it is SIGKILLed after a
    later save; resumed on 1 rank (DeepSpeed's universal checkpoint) it starts from the same
    weights and Adam moments. The compiled arm keeps Inductor's cache beside the run."""
    from test_distributed import rank_process, start_and_stop_at

    args = (*NOISE, *BELOW_ZERO3[arm], *CHAIN)
    out = tmp_path / "run"
    first = start_and_stop_at(out, tmp_path, 2, lambda pid: rank_process(pid, 1).send_signal(signal.SIGUSR1), args)
    assert first["reason"] == "another rank's request" and 2 <= first["step"] <= 6, first
    # The reference after the first start, so that the compiled arm finds the kernels in the cache.
    cache = out / "compile_cache"
    reference = pretrain(tmp_path / "reference", *BELOW_ZERO3[arm], *CHAIN, tmp=tmp_path,
                         env=env_for(tmp_path, TORCHINDUCTOR_CACHE_DIR=str(cache)))
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    expected = [r["loss"] for _, r in sorted(metrics(tmp_path / "reference").items())]

    start_killed_at(out, tmp_path, f"step{first['step'] + 2:08d}", BELOW_ZERO3[arm] + CHAIN)
    logged = metrics(out)  # steps 1..first from the first start, the rest from the killed one
    assert sorted(logged) == list(range(1, len(logged) + 1)) and len(logged) >= first["step"] + 2
    assert [logged[s]["loss"] for s in sorted(logged)] == expected[:len(logged)], "resumed exactly after the preemption"

    killed_at = int((out / "checkpoints" / "latest").read_text().strip()[4:])
    assert killed_at <= 8, "two steps left to compare after the last resume"
    resharded = pretrain(out, *BELOW_ZERO3[arm], *CHAIN, "train.ranks=1", tmp=tmp_path)
    assert resharded.returncode == 0, resharded.stdout[-3000:] + resharded.stderr[-3000:]
    assert "written by 2 ranks, this run has 1" in resharded.stdout
    rows = metrics(out)
    assert sorted(rows) == list(range(1, 11))
    assert [rows[s]["lr"] for s in range(1, 11)] == [r["lr"] for _, r in sorted(metrics(tmp_path / "reference").items())]
    # Same weights: the first step agrees to 1- vs 2-rank rounding; the next only if the Adam
    # moments came back too (see test_checkpoint_written_by_two_ranks_resumes_on_one_rank).
    torch.testing.assert_close(rows[killed_at + 1]["loss"], expected[killed_at], rtol=1e-6, atol=0)
    torch.testing.assert_close(rows[killed_at + 2]["loss"], expected[killed_at + 1], rtol=4e-5, atol=0)
    assert len(mlflow_runs(tmp_path)) == 2, "the reference, and one run across the three starts"
    if "compile" in arm:
        assert "[scaling] train.zero_stage=auto chose ZeRO-1: debug at 2 clips per rank" in reference.stdout
        assert "[scaling] first forward with compilation: " in resharded.stdout
        assert any(cache.rglob("*.py")), "Inductor wrote its generated kernels beside the run"


def test_config_change_check_lets_lengths_and_ranks_change_and_fresh_moves_the_folder(tmp_path, capsys):
    from scaling.config import ConfigError, load_config, save_config
    from scaling.train.resume_check import check_resume

    out = tmp_path / "run"
    base = [f"train.output_dir={out}", "data.source=noise"]
    save_config(load_config(SMOKE, base), out / "config.yaml")
    (out / "checkpoints" / "step00000002").mkdir(parents=True)
    check_resume(load_config(SMOKE, [*base, "train.steps=400", "train.ranks=1", "train.save_every=5",
                                     "train.max_steps_this_run=3", "tracking.experiment=x"]), False, False)
    with pytest.raises(ConfigError, match=r"model.drop_path 0.0 -> 0.1"):
        check_resume(load_config(SMOKE, [*base, "model.drop_path=0.1"]), False, False)
    check_resume(load_config(SMOKE, [*base, "model.drop_path=0.1"]), False, True)
    assert list(out.glob("config.before-*.yaml"))
    check_resume(load_config(SMOKE, [*base, "model.drop_path=0.1"]), True, False)
    assert not out.exists()
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / "checkpoints" / "step00000002").is_dir()


def test_lock_is_released_when_its_process_dies(tmp_path):
    from scaling.train.run_lock import FolderInUse, lock_run_folder, unlock_run_folder

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from scaling.train.run_lock import lock_run_folder; "
                               f"lock_run_folder({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)"],
                              env=env_for(tmp_path), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(FolderInUse, match=f"pid {holder.pid} on "):
        lock_run_folder(tmp_path)
    holder.kill()
    holder.wait()
    lock_run_folder(tmp_path)  # the kernel released it with the process
    unlock_run_folder(tmp_path)


if __name__ == "__main__" and sys.argv[1:] == ["probe"]:
    skipped_step_probe()
