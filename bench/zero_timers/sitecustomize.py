"""Per-step wall time of ZeRO's internals in the ranks of an unmodified `scaling pretrain` run.

bench/vitg_one_box.py puts this folder first on PYTHONPATH with SCALING_BENCH_ZERO_TIMERS=<dir>;
Python imports `sitecustomize` at start-up, so each rank (a process torchrun started: RANK is
set) wraps, before the run imports them, the DeepSpeed engine's forward / backward / step and the
ZeRO-3 internals bench/engine_step.py times (param_fetch: gather the weights a module needs and
wait for them; param_release; grad_reduce: the bucketed gradient reduce-scatter). After each
optimizer step the rank appends one line to <dir>/rank<r>.jsonl: seconds per phase, and the
seconds of each internal inside each phase. Appending per step keeps them through a kill -9.
Once the process group is up (deepspeed.init_distributed, before the model exists) it writes
<dir>/rank<r>_idle.json: the idle rank's RSS. Every other process (the launcher, torchrun) is
left alone.
"""
import os

if os.environ.get("SCALING_BENCH_ZERO_TIMERS") and os.environ.get("RANK") is not None:
    import functools
    import json
    import resource
    import sys
    from pathlib import Path

    import deepspeed

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
    from engine_step import PhaseTimer, time_zero_internals  # noqa: E402

    # Out of the environment: processes the rank starts (py-cpuinfo runs Python to read the CPU)
    # must not import DeepSpeed at start-up too.
    _out = Path(os.environ.pop("SCALING_BENCH_ZERO_TIMERS")) / f"rank{os.environ['RANK']}.jsonl"
    time_zero_internals(3)

    _timer = PhaseTimer()

    def _phase(name, fn):
        """`fn` timed as phase `name` of the step; after the optimizer step, one line per step."""
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            global _timer
            try:
                with _timer(name):
                    return fn(*args, **kwargs)
            finally:
                if name == "optimizer":
                    record = {**_timer.seconds, **{f"{phase}/{part}": s for phase, parts in _timer.parts.items()
                                                   for part, s in parts.items()}}
                    with open(_out, "a") as f:
                        f.write(json.dumps({k: round(v, 3) for k, v in record.items()}) + "\n")
                    _timer = PhaseTimer()  # the next step starts from zero
        return wrapped

    def _rss_when_idle(init):
        """The rank's RSS with torch, DeepSpeed and the process group up and no model yet: what
        `scaling memory plan --device cpu` predicts memory above (bench/plan_validate.py)."""
        @functools.wraps(init)
        def wrapped(*args, **kwargs):
            out = init(*args, **kwargs)
            idle = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "rss": int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
            _out.with_name(_out.stem + "_idle.json").write_text(json.dumps(idle))
            return out
        return wrapped

    deepspeed.init_distributed = _rss_when_idle(deepspeed.init_distributed)
    DeepSpeedEngine.forward = _phase("forward", DeepSpeedEngine.forward)
    DeepSpeedEngine.backward = _phase("backward", DeepSpeedEngine.backward)
    DeepSpeedEngine.step = _phase("optimizer", DeepSpeedEngine.step)
