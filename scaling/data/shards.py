"""`scaling shard`: real videos -> webdataset tar shards of `mp4` + `json`, resumable.

Plan first, then work: inputs are listed and split into shards up front (shard i holds a fixed
run of consecutive inputs), so which videos a shard holds follows from (input list, options).
A shard is written to `NAME.tar.tmp` and renamed when complete, after its record (samples,
bytes, failures) is saved under `.records/`; a re-run skips every shard whose tar exists and
whose record was made from the same plan, so an interrupted run finishes only what is missing,
and changing the inputs or options rewrites the shards they change.

Each video is probed with PyAV. An H.264/yuv420p `.mp4` that already fits (short side and
duration within the limits) is copied byte for byte; anything else is transcoded to H.264 mp4
(yuv420p, short side scaled down to the target, same frame rate, cut at the maximum duration),
the fix the VideoMAE maintainers recommend for loader speed. Unreadable inputs are recorded in
`failures.jsonl` with the reason and skipped. A raw-frame folder (the reference's SSv2 and AVA
lists) is encoded the same way, at the frame rate given for its frames.

Tars are written with the standard library's `tarfile` rather than webdataset's `TarWriter`
(same tar layout): importing webdataset imports torch, ~5 s in every worker process.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av

from scaling.data.shard_inputs import Item, ShardInputError, list_inputs, load_class_map

RECORDS_DIR = ".records"


class VideoError(ValueError):
    """One input video cannot be used; the message is the reason listed in failures.jsonl."""


@dataclass(frozen=True)
class Options:
    short_side: int = 0  # 0 = keep the size (still transcoded if codec/container do not fit)
    max_duration: float = 0.0  # seconds, 0 = keep the whole video
    source: str = ""
    crf: int = 23
    preset: str = "fast"
    frame_pattern: str = "img_{:05d}.jpg"  # raw-frame folders: file name of frame i (the reference's)
    frames_fps: float = 30.0  # raw-frame folders carry no rate: the one their frames were extracted at


# ----------------------------------------------------------------------------- planning


def plan_shards(items: list[Item], samples_per_shard: int, max_shard_bytes: int = 0,
                size_of=os.path.getsize) -> list[list[Item]]:
    """Split items into runs of consecutive inputs, at most `samples_per_shard` each and, when
    `max_shard_bytes` > 0, at most that many *input* bytes (a shard gets at least one video).

    Input bytes, not output bytes: output sizes are known only after transcoding, and a plan
    that depended on them could not be made up front, so a re-run could not tell which shard
    holds which video. Transcoding down usually shrinks videos, so outputs stay below the cap."""
    if samples_per_shard < 1:
        raise ShardInputError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    shards: list[list[Item]] = [[]]
    used = 0
    for item in items:
        size = 0
        if max_shard_bytes:
            try:
                size = size_of(item.path)
            except OSError:  # a missing file fails later, in its shard, with a reason
                pass
        full = len(shards[-1]) >= samples_per_shard or (max_shard_bytes and used + size > max_shard_bytes)
        if shards[-1] and full:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += size
    return shards


# ----------------------------------------------------------------------------- one video


def _even(x: float) -> int:
    return max(2, int(x + 1e-6) // 2 * 2)  # down to even: never larger than the source


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Output (width, height): short side scaled *down* to `short_side` (never up), aspect
    kept, both even (yuv420p halves the chroma planes; odd sizes lose one pixel)."""
    scale = short_side / min(width, height) if short_side and min(width, height) > short_side else 1.0
    return _even(width * scale), _even(height * scale)


def _rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate
    if not rate or not 0 < rate <= 1000:  # a missing or absurd rate: 30 is the common default
        return Fraction(30)
    return Fraction(rate)


def _duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else None


def _copy(path: str, container, stream, rate: Fraction, duration: float | None) -> tuple[bytes, dict]:
    """The file's bytes, after demuxing every packet (catches files cut short behind an intact
    index) and decoding up to the first frame (catches a broken stream start), without the
    cost of decoding everything."""
    packets, decoded = 0, False
    for packet in container.demux(stream):
        if packet.size:
            packets += 1
            # Decoders may hold a few packets back (B-frames) before the first frame comes out.
            decoded = decoded or bool(stream.codec_context.decode(packet))
    if stream.frames and packets < stream.frames:
        raise VideoError(f"truncated: {packets} of {stream.frames} packets present")
    if not (decoded or stream.codec_context.decode(None)):  # None flushes the held-back frames
        raise VideoError("no decodable frames")
    data = Path(path).read_bytes()
    return data, dict(duration=duration if duration is not None else packets / float(rate), num_frames=packets,
                      width=stream.width, height=stream.height, transcoded=False)


def _encode(frames, size: tuple[int, int], rate: Fraction, opts: Options, threads: int) -> tuple[bytes, int]:
    """H.264 mp4 bytes of `frames` (av.VideoFrame) scaled to `size`, at most opts.max_duration
    seconds at `rate`; returns (bytes, frames written).

    Frames are renumbered at `rate` (constant frame rate output): a variable-rate input keeps
    its frames but not their exact timing, which clip sampling ignores anyway."""
    width, height = size
    max_frames = int(opts.max_duration * rate + 1e-6) if opts.max_duration else None
    buf = io.BytesIO()
    n = 0
    with av.open(buf, mode="w", format="mp4") as out:
        enc = out.add_stream("libx264", rate=rate)
        enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
        # x264 defaults otherwise. Note: PyAV's bundled x264 with mbtree (a default) gave a few
        # bytes' difference for the same frames from run to run in one process; mbtree=0 made
        # it reproducible but doubled the size of some videos, and small files are the point.
        enc.options = {"preset": opts.preset, "crf": str(opts.crf)}
        enc.codec_context.thread_count = threads
        for frame in frames:
            if max_frames is not None and n >= max_frames:
                break
            frame = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            frame.pts, frame.time_base = n, 1 / rate
            for packet in enc.encode(frame):
                out.mux(packet)
            n += 1
        if n == 0:
            raise VideoError("no decodable frames")
        for packet in enc.encode():  # flush delayed frames
            out.mux(packet)
    return buf.getvalue(), n


def _transcode(container, stream, rate: Fraction, opts: Options, threads: int) -> tuple[bytes, dict]:
    """H.264 mp4 bytes: short side <= opts.short_side, at most opts.max_duration seconds."""
    width, height = target_size(stream.width, stream.height, opts.short_side)
    data, n = _encode(container.decode(stream), (width, height), rate, opts, threads)
    # A silently short decode (no error, frames missing) means a truncated file.
    max_frames = int(opts.max_duration * rate + 1e-6) if opts.max_duration else None
    expected = stream.frames if max_frames is None else min(stream.frames, max_frames)
    if stream.frames and n < expected * 0.98 - 1:
        raise VideoError(f"truncated: decoded {n} of {stream.frames} frames")
    return data, dict(duration=n / float(rate), num_frames=n, width=width, height=height, transcoded=True)


def convert_frames(folder: str, start: int, count: int, opts: Options, threads: int = 1) -> tuple[bytes, dict]:
    """(mp4 bytes, metadata) of a raw-frame folder: frames `start` .. `start + count - 1`
    named by `opts.frame_pattern`, encoded at `opts.frames_fps`."""
    from PIL import Image

    if not os.path.isdir(folder):
        raise VideoError("frame folder not found")
    if count < 1:
        raise VideoError(f"the list gives {count} frames")
    paths = [os.path.join(folder, opts.frame_pattern.format(i)) for i in range(start, start + count)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise VideoError(f"{len(missing)} of {count} frames missing, e.g. {os.path.basename(missing[0])} "
                         f"(frame names follow --frame-pattern {opts.frame_pattern})")
    try:
        with Image.open(paths[0]) as first:
            size = target_size(*first.size, opts.short_side)

        def frames():
            for p in paths:
                with Image.open(p) as image:
                    yield av.VideoFrame.from_image(image.convert("RGB"))

        rate = Fraction(opts.frames_fps).limit_denominator(1001)
        data, n = _encode(frames(), size, rate, opts, threads)
    except VideoError:
        raise
    except Exception as exn:  # PIL/FFmpeg errors: a broken image file
        raise VideoError(f"decode error: {_reason(exn)}") from exn
    return data, dict(duration=n / float(rate), num_frames=n, width=size[0], height=size[1], transcoded=True,
                      fps=float(rate), codec="frames", bytes=len(data))


def _reason(exn: Exception) -> str:
    # FFmpeg errors carry a clean message in strerror; str() repeats the path or C function.
    return getattr(exn, "strerror", None) or f"{type(exn).__name__}: {exn}"


def convert_video(path: str, opts: Options, threads: int = 1) -> tuple[bytes, dict]:
    """(mp4 bytes, metadata) for one input, copied when it already fits, else transcoded.
    Raises VideoError with a one-line reason for any unusable input."""
    if not os.path.isfile(path):
        raise VideoError("file not found")
    if os.path.getsize(path) == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        container = av.open(path)
    except Exception as exn:  # not a container FFmpeg knows, or its index is missing/cut
        raise VideoError(f"cannot open: {_reason(exn)}") from exn
    try:
        with container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            if not stream.width or not stream.height:
                raise VideoError("video stream has no frame size")
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            rate, duration = _rate(stream), _duration(container, stream)
            fits = (
                path.lower().endswith((".mp4", ".m4v"))
                and "mp4" in container.format.name
                and stream.codec_context.name == "h264"
                and stream.codec_context.pix_fmt == "yuv420p"
                and (not opts.short_side or min(stream.width, stream.height) <= opts.short_side)
                # half a frame of slack: a 64-frame 16 fps clip is 4.0 s whatever the rounding
                and (not opts.max_duration or (duration is not None and duration <= opts.max_duration + 0.5 / float(rate)))
            )
            codec = stream.codec_context.name
            if fits:
                data, meta = _copy(path, container, stream, rate, duration)
            else:
                data, meta = _transcode(container, stream, rate, opts, threads)
    except VideoError:
        raise
    except Exception as exn:  # PyAV/FFmpeg errors: the message is the useful part
        raise VideoError(f"decode error: {_reason(exn)}") from exn
    meta.update(fps=float(rate), codec=codec, bytes=len(data))
    return data, meta


# ----------------------------------------------------------------------------- one shard

_progress = None  # worker-side queue: one put per finished video, read by the parent's bar
_stop = None  # worker-side event: set by the parent on Ctrl-C or error, checked per video


def _init_worker(queue, stop) -> None:
    global _progress, _stop
    _progress, _stop = queue, stop


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # mtime 0: the tar depends on the samples only
    tf.addfile(info, io.BytesIO(data))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_shard(task: dict) -> dict:
    """Write one shard (runs in a worker). Returns its record; the tar appears only complete."""
    out, name, opts = Path(task["out"]), task["name"], Options(**task["opts"])
    final, tmp = out / f"{name}.tar", out / f"{name}.tar.tmp"
    record = dict(name=name, plan=task["plan"], samples=0, bytes=0, copied=0, transcoded=0, label_counts={}, failures=[])
    with tarfile.open(tmp, "w") as tf:  # "w" truncates a .tmp left by an interrupted run
        for item in (Item(**it) for it in task["items"]):
            if _stop is not None and _stop.is_set():  # the tar stays .tmp: a re-run redoes it
                raise RuntimeError(f"shard {name} stopped: the run was interrupted")
            try:
                if item.num_frames >= 0:
                    data, meta = convert_frames(item.path, item.start_frame, item.num_frames, opts, task["threads"])
                else:
                    data, meta = convert_video(item.path, opts, task["threads"])
            except VideoError as exn:
                record["failures"].append(dict(index=item.index, path=item.path, reason=str(exn)))
            else:
                meta = dict(label=item.label, label_name=item.label_name, source=opts.source, original_path=item.path, **meta)
                key = f"{item.index:08d}"
                _add(tf, f"{key}.mp4", data)
                _add(tf, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                record["samples"] += 1
                record["transcoded" if meta["transcoded"] else "copied"] += 1
                counts = record["label_counts"]
                counts[str(item.label)] = counts.get(str(item.label), 0) + 1
            if _progress is not None:
                _progress.put(1)
    record["bytes"] = tmp.stat().st_size
    # Record before tar: a tar on disk always has its record, so "tar exists" means "done".
    _write_atomic(out / RECORDS_DIR / f"{name}.json", json.dumps(record))
    os.replace(tmp, final)
    return record


# ----------------------------------------------------------------------------- whole run


def usable_cores() -> int:
    # sched_getaffinity: the cores this process may use (a container or Slurm job may get fewer
    # than os.cpu_count() reports).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _plan_hash(items: list[Item], opts: Options) -> str:
    return hashlib.sha1(json.dumps([[asdict(i) for i in items], asdict(opts)]).encode()).hexdigest()


def _done_record(out: Path, name: str, plan: str) -> dict | None:
    rec_path = out / RECORDS_DIR / f"{name}.json"
    if not (out / f"{name}.tar").is_file() or not rec_path.is_file():
        return None
    record = json.loads(rec_path.read_text(encoding="utf-8"))
    return record if record.get("plan") == plan else None


def _run(tasks: list[dict], workers: int, bar) -> list[dict]:
    """Run write_shard over tasks (in this process when workers <= 1), ticking `bar` per video."""
    if workers <= 1:
        records = []
        for task in tasks:
            records.append(write_shard(task))
            bar.update(len(task["items"]))
        return records
    # spawn, not fork: the parent may hold torch/OpenMP threads, which fork does not copy safely.
    ctx = multiprocessing.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    records = []
    # ProcessPoolExecutor (not Pool): a worker killed by a native crash raises BrokenProcessPool
    # here instead of hanging the run forever.
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue, stop)) as pool:
        pending = {pool.submit(write_shard, t) for t in tasks}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                records += [f.result() for f in done]  # re-raises shard-level errors (disk full, ...)
                while not queue.empty():
                    bar.update(queue.get())
        except BaseException:  # Ctrl-C or a failed shard: stop now, not after every queued shard
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    while not queue.empty():  # ticks that arrived after the last shard finished
        bar.update(queue.get())
    return records


def write_shards(
    input_path,
    out_dir,
    *,
    prefix: str | None = None,
    source: str | None = None,
    short_side: int = 0,
    max_duration: float = 0.0,
    crf: int = 23,
    preset: str = "fast",
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 0,
    workers: int = 1,
    classes=None,
    progress: bool | None = None,
    video_root=None,
    frame_pattern: str = "img_{:05d}.jpg",
    frames_fps: float = 30.0,
) -> dict:
    """Shard the videos of a folder or a list (every format `shard_inputs` reads) into
    `out_dir`; returns the manifest.

    Writes `{prefix}-%06d.tar`, `manifest.json` and `failures.jsonl`. `classes`: a class map
    (dict) or a path for `load_class_map`. `progress`: None shows a bar only on a terminal.
    Workers are spawned processes, so a script calling this needs `if __name__ == "__main__":`."""
    src = Path(input_path)
    source = source or (src.name if src.is_dir() else src.stem)
    prefix = prefix or source
    class_map = load_class_map(classes) if isinstance(classes, (str, os.PathLike)) else classes
    items, class_map = list_inputs(src, class_map, video_root)
    if short_side < 0 or max_duration < 0:
        raise ShardInputError("--short-side and --max-duration must be >= 0 (0 keeps the original)")
    if frames_fps <= 0:
        raise ShardInputError(f"--frames-fps must be positive, got {frames_fps}")
    try:
        frame_pattern.format(1)
    except (IndexError, KeyError, ValueError):
        raise ShardInputError(f"--frame-pattern '{frame_pattern}' must hold one {{}} field for the frame number, "
                              "e.g. img_{:05d}.jpg") from None
    opts = Options(short_side=short_side, max_duration=max_duration, source=source, crf=crf, preset=preset,
                   frame_pattern=frame_pattern, frames_fps=frames_fps)
    out = Path(out_dir)
    (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    workers = max(1, workers)
    threads = max(1, usable_cores() // workers)  # codec threads: fill the cores, no more

    from tqdm import tqdm  # imported here so the module itself stays cheap for workers

    plan = plan_shards(items, samples_per_shard, max_shard_bytes)
    records: dict[str, dict] = {}
    tasks = []
    for i, shard_items in enumerate(plan):
        name, h = f"{prefix}-{i:06d}", _plan_hash(shard_items, opts)
        rec = _done_record(out, name, h)
        if rec is not None:
            records[name] = rec
        else:
            tasks.append(dict(out=str(out), name=name, plan=h, opts=asdict(opts), threads=threads,
                              items=[asdict(it) for it in shard_items]))
    with tqdm(total=len(items), initial=len(items) - sum(len(t["items"]) for t in tasks), unit="video",
              desc=f"shard {prefix}", disable=None if progress is None else not progress, file=sys.stderr) as bar:
        for rec in _run(tasks, min(workers, len(tasks)), bar):
            records[rec["name"]] = rec
    ordered = [records[f"{prefix}-{i:06d}"] for i in range(len(plan))]
    return _write_manifest(out, prefix, source, opts, class_map, ordered, len(items))


def _write_manifest(out: Path, prefix: str, source: str, opts: Options, class_map, records: list[dict], num_inputs: int) -> dict:
    failures = [f for r in records for f in r["failures"]]
    label_counts: dict[str, int] = {}
    for r in records:
        for k, v in r["label_counts"].items():
            label_counts[k] = label_counts.get(k, 0) + v
    names = {r["name"] for r in records}
    stale = sorted(p.name for p in out.glob(f"{prefix}-*.tar") if p.stem not in names)
    if stale:  # left from a run with more inputs; not deleted (they may be wanted), but said
        print(f"scaling shard: note: {len(stale)} tar(s) not in this plan left in {out}, e.g. {stale[0]}", file=sys.stderr)
    manifest = dict(
        prefix=prefix,
        source=source,
        options=asdict(opts),
        inputs=num_inputs,
        count=sum(r["samples"] for r in records),
        bytes=sum(r["bytes"] for r in records),
        copied=sum(r["copied"] for r in records),
        transcoded=sum(r["transcoded"] for r in records),
        failures=len(failures),
        classes=class_map,
        label_counts=dict(sorted(label_counts.items())),
        shards=[dict(name=f"{r['name']}.tar", samples=r["samples"], bytes=r["bytes"]) for r in records],
    )
    _write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    _write_atomic(out / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
    return manifest


__all__ = ["Item", "Options", "ShardInputError", "VideoError", "convert_frames", "convert_video", "list_inputs", "load_class_map",
           "plan_shards", "target_size", "write_shard", "write_shards"]
