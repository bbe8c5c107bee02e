"""The one way the CPU-rank ZeRO-1/2 changes (overlap_reduce, grad_partition_buffer) are put on
an engine: only for ZeRO-1/2, only where their `problem` check finds nothing against it, and
rank 0 says in the start log which way it went."""
from __future__ import annotations

import os
from collections.abc import Callable


def install_where_possible(engine, problem: Callable, install: Callable, on: str, off: str) -> None:
    """`install(engine.optimizer)` when `problem(engine.optimizer)` is None; rank 0 prints `on`,
    or `off` followed by the problem."""
    if engine.zero_optimization_stage() not in (1, 2):
        return
    why_not = problem(engine.optimizer)
    if why_not is None:
        install(engine.optimizer)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[scaling] {on}" if why_not is None else f"[scaling] {off}: {why_not}", flush=True)
