"""Data sources (one shard set each, with its own weight, frame stride and flip rule), shard
list expansion, and the seeded weighted mix the pre-training loader draws sources from.

A hybrid pre-training mix is a list of sources, e.g. (VideoMAE V2's unlabeled hybrid)::

    [Source("k710", "k710/k710-{000000..000657}.tar", weight=0.488),
     Source("ssv2", "ssv2/ssv2-{000000..000168}.tar", weight=0.125, stride=2, flip=False), ...]

Weights are relative (normalized over the list). Why not webdataset's `RandomMix`: it draws
from the *global* `random` module (`random_samples` calls `random.random()`), whose state
depends on whatever else ran in the process (and on DataLoader's per-worker seeding), so the
mix could not be reproduced from (seed, rank, worker) nor replayed by `skip_batches`.
`weighted_mix` keeps its algorithm (a number in [0, 1) per sample, looked up in the
cumulative weights) but takes the numbers from a seeded quasi-random (golden-ratio Weyl)
sequence instead of independent draws: over ANY run of n consecutive samples, source i's
count stays within about 3 of n * w_i (measured up to n = 20,000), where independent draws
would stray by ~sqrt(n * w_i): so 2,000 samples of a 0.7/0.3 mix are 1400 +- 3, not +- 20,
and every batch already holds the configured mix.
"""

from __future__ import annotations

import bisect
import glob
import itertools
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import webdataset as wds


@dataclass
class Source:
    """One shard set. `stride`: frames between sampled frames (4 for Kinetics-like, 2 for
    SSv2-like). `flip`: horizontal flip allowed (fine-tuning only: pre-training never flips,
    as in VideoMAE; SSv2 has left/right classes, so its flip must be off). `weight`: relative
    share of the pre-training mix (ignored by the finite fine-tune/eval loader, which reads
    every sample of every source exactly once per epoch)."""

    name: str
    shards: str | list[str]
    weight: float = 1.0
    stride: int = 4
    flip: bool = True


def check_sources(sources: Sequence[Source]) -> list[Source]:
    """Validate a source list (one clear sentence per mistake); returns it as a list."""
    sources = list(sources)
    if not sources:
        raise ValueError("sources is empty; list at least one Source(name, shards)")
    names = [s.name for s in sources]
    for s in sources:
        if not isinstance(s, Source):
            raise TypeError(f"sources must be Source objects, got {type(s).__name__}; build them with Source(name, shards, ...)")
        if not s.name or "/" in s.name or names.count(s.name) > 1:
            raise ValueError(f"source name {s.name!r} must be non-empty, unique and without '/' (it names metrics)")
        if not s.weight > 0:
            raise ValueError(f"source {s.name!r} has weight {s.weight!r}; weights must be > 0 (drop the source instead)")
        if int(s.stride) != s.stride or s.stride < 1:
            raise ValueError(f"source {s.name!r} has stride {s.stride!r}; it must be an integer >= 1")
    return sources


def as_sources(shards=None, sources: Sequence[Source] | None = None, *, stride: int = 4, flip: bool = True) -> list[Source]:
    """Either a plain shard pattern/list (one source named 'shards') or a source list."""
    if (shards is None) == (sources is None):
        raise ValueError("pass exactly one of shards (a pattern or list of tars) or sources (a list of Source)")
    if sources is None:
        return [Source("shards", shards, 1.0, stride, flip)]
    return check_sources(sources)


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Brace pattern, glob or list -> list of urls; local paths must exist (clear error if not)."""
    urls = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else [str(s) for s in shards]
    expanded = []
    for u in urls:  # a glob ('data/*.tar') that is not itself a file expands to its matches
        is_glob = any(c in u for c in "*?[") and "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)
        expanded.extend(sorted(glob.glob(u)) if is_glob else [u])
    if not expanded:
        raise ValueError(f"no shards in {shards!r}; pass a brace pattern like 'data/k400-{{000000..000099}}.tar' or a list of paths")
    missing = [u for u in expanded if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(expanded)} shards do not exist, e.g. {missing[0]!r}; "
                                "check the shard path or pattern")
    return expanded


GOLDEN = (5**0.5 - 1) / 2  # Weyl step: the most evenly spread sequence frac(u + n * GOLDEN)


def weighted_mix(streams: Sequence[Iterable], weights: Sequence[float], rng: random.Random) -> Iterator[tuple[int, object]]:
    """Endless (source index, item): item n comes from stream i when frac(u + n * GOLDEN)
    falls in source i's share [c_{i-1}, c_i) of the cumulative normalized weights; u is the
    one draw from `rng`. So the choices are a pure function of the rng's seed and n (skipping
    n items replays exactly), and realized proportions track the weights tightly (module
    docstring). Streams must be endless (resampled). A single stream is passed through.
    """
    its = [iter(s) for s in streams]
    if len(its) == 1:
        yield from zip(itertools.repeat(0), its[0])
        return
    total = float(sum(weights))
    cum = list(itertools.accumulate(w / total for w in weights))
    last = len(its) - 1
    u = rng.random()
    for n in itertools.count():
        i = min(bisect.bisect_right(cum, (u + n * GOLDEN) % 1.0), last)  # min: cum[-1] may round below 1
        yield i, next(its[i])


__all__ = ["Source", "check_sources", "as_sources", "expand_shards", "weighted_mix"]
