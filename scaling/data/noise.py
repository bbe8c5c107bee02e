"""I/O-free clips for benchmarks and equivalence tests.

Clip `i` of global micro-batch (step, micro) is a pure function of (seed, step, micro, i), and
rank r of w takes clips [r*B, (r+1)*B): a 1-rank and a 2-rank run with the same global batch
see the very same clips, which a per-rank streaming loader cannot promise.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


def noise_batches(*, seed: int, rank: int, clips_per_rank: int, grad_accum: int, num_frames: int,
                  input_size: int, start_step: int = 0) -> Iterator[dict]:
    step = start_step
    while True:
        for micro in range(grad_accum):
            clips = []
            for i in range(rank * clips_per_rank, (rank + 1) * clips_per_rank):
                g = torch.Generator().manual_seed(hash((seed, step, micro, i)) & 0x7FFF_FFFF)
                # Smooth-ish noise: a low-resolution field upsampled, so patches have structure.
                low = torch.randn(3, num_frames // 2, input_size // 8, input_size // 8, generator=g)
                clips.append(torch.nn.functional.interpolate(low[None], size=(num_frames, input_size, input_size), mode="trilinear")[0])
            yield {"video": torch.stack(clips)}  # (B, 3, T, S, S)
        step += 1
