"""Synthetic video shards: moving coloured shapes, for tests and smoke runs.

Real datasets are not available on every machine; these shards have the same layout as the
ones `scaling shard` writes (one `mp4` + one `json` per sample), so the whole data path
(webdataset -> decord -> crop -> batch) is exercised without downloads.
Rendering is hand-written numpy (no drawing library is a dependency); encoding is PyAV.
"""

from __future__ import annotations

import io
import os

import av
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

# label = index in these tuples: every shape in a video has the class's form, hue and direction
# of motion. Measured (debug model, 2 threads, plain AdamW 2e-3, 16 clips/step, 64 videos):
# form + direction alone stayed near chance after 8 epochs (mean pooling hides where a shape
# is and which way it moves from a 2-block, width-64 model); with a class hue on a grey
# background held-out accuracy passed 55 % within 2 epochs. The hue is what makes the smoke
# pipeline's "fine-tuned beats chance clearly" reachable in minutes; motion stays for the
# masked-video pre-training to model.
SHAPE_CLASSES = ("rectangle", "circle", "ring", "cross")
CLASS_DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx) per class: right, left, down, up
CLASS_COLOURS = np.array([(230, 60, 60), (60, 200, 60), (70, 90, 240), (230, 220, 60)], np.float32)  # red green blue yellow


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean (H, W) mask of one shape of half-size `r` centred at (cy, cx)."""
    dy, dx = yy - cy, xx - cx
    if kind == "rectangle":
        return (np.abs(dy) <= r * 0.7) & (np.abs(dx) <= r)
    if kind == "circle":
        return dy * dy + dx * dx <= r * r
    if kind == "ring":
        d2 = dy * dy + dx * dx
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        arm = r * 0.3
        inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
        return inside & ((np.abs(dy) <= arm) | (np.abs(dx) <= arm))
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPE_CLASSES}")


def _smooth_texture(rng: np.random.Generator, height: int, width: int, cell: int, amplitude: float) -> np.ndarray:
    """Random values on a coarse grid every `cell` pixels, bilinearly upsampled: (H, W, 3)."""
    coarse = torch.from_numpy(rng.normal(0, amplitude, size=(3, height // cell + 2, width // cell + 2)).astype(np.float32))
    fine = F.interpolate(coarse[None], scale_factor=cell, mode="bilinear", align_corners=False)[0]
    return fine[:, :height, :width].permute(1, 2, 0).numpy()


def render_video(rng: np.random.Generator, label: int, num_frames: int, height: int, width: int) -> np.ndarray:
    """Render one clip of 1-3 shapes of class `label`, all moving in the class's direction
    (right, left, down, up) and wrapping around the frame. Returns uint8 (T, H, W, 3).

    Form, hue and motion all tell the class (see CLASS_COLOURS for why the hue is there)."""
    kind = SHAPE_CLASSES[label]
    # Background: grey (so that only the shapes carry hue) smooth gradient + a smooth
    # (low-frequency) texture that scrolls slowly, so the model has texture and global motion
    # to reconstruct, not only flat colour. Per-pixel noise would be unpredictable and pin the
    # normalized-pixel loss near 1.0.
    base = np.full(3, rng.uniform(20, 140))  # the same level in R, G and B
    grad = np.linspace(0, 60, width, dtype=np.float32)[None, :, None] * rng.uniform(-1, 1)  # (1, W, 1)
    # The texture scrolls 2 px/frame in the class's direction too: a motion cue every token sees.
    bg_speed = 2
    margin = bg_speed * num_frames
    # (H', W', 1) grey; x1.7 keeps the contrast of the 3-channel texture it is the mean of.
    noise = _smooth_texture(rng, height + 2 * margin, width + 2 * margin, cell=8, amplitude=30.0).mean(-1, keepdims=True) * 1.7
    dy, dx = CLASS_DIRECTIONS[label]

    n_shapes = int(rng.integers(1, 4))
    lo = min(height, width)
    r = rng.uniform(0.08, 0.2, size=n_shapes) * lo  # half-size in pixels
    pos = np.stack([rng.uniform(r, height - r), rng.uniform(r, width - r)], axis=1)  # (n, 2) y, x
    direction = np.array(CLASS_DIRECTIONS[label], dtype=np.float64)  # (dy, dx)
    vel = rng.uniform(0.03, 0.06, size=(n_shapes, 1)) * lo * direction  # (n, 2) pixels/frame
    colours = (CLASS_COLOURS[label] + rng.uniform(-40, 40, size=(n_shapes, 3))).clip(0, 255)  # class hue, jittered

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        y0, x0 = margin - dy * bg_speed * t, margin - dx * bg_speed * t  # window moves against the content
        frame = base + grad + noise[y0 : y0 + height, x0 : x0 + width]  # (H, W, 3)
        for i in range(n_shapes):
            mask = _shape_mask(kind, yy, xx, pos[i, 0], pos[i, 1], r[i])
            frame[mask] = colours[i]
            # Wrap around instead of bouncing, so the direction of motion never changes.
            pos[i] = (pos[i] + vel[i]) % (height, width)
        np.clip(frame, 0, 255, out=frame)
        out[t] = frame.astype(np.uint8)
    return out


# The motion task: the class is the direction in which every shape of the clip moves, and
# nothing else differs between classes. Forms, colours, textures, sizes, speeds, positions and
# the background are drawn first, from one distribution for every class, and the direction
# last, so a clip's first frame is the same whatever its label (tests/unit/test_synth_motion.py):
# no single frame tells the class, only how frames change does. Horizontal flips swap classes
# 0 and 1: train on it with flipping off (a data.sources entry with flip: false).
MOTION_CLASSES = ("right", "left", "down", "up")
MOTION_DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx) per class


def render_motion_video(rng: np.random.Generator, label: int, num_frames: int, height: int, width: int) -> np.ndarray:
    """2-4 textured shapes of random form, colour and size gliding over a static textured
    background in the direction of class `label` (MOTION_CLASSES), wrapping around the frame.
    Returns uint8 (T, H, W, 3)."""
    lo = min(height, width)
    # Background: a colour with a linear ramp in a random direction, the same ramp in every
    # patch, so a model can tell background from shape anywhere after seeing a few patches; a
    # random texture here would be unpredictable under tube masking and drown the motion signal
    # in the reconstruction loss.
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / lo * rng.uniform(40, 90)  # (H, W)
    background = rng.uniform(40, 200, size=3) + ramp[..., None]  # (H, W, 3)
    n_shapes = int(rng.integers(2, 5))
    kinds = [SHAPE_CLASSES[i] for i in rng.integers(0, len(SHAPE_CLASSES), size=n_shapes)]
    r = rng.uniform(0.12, 0.22, size=n_shapes) * lo  # half-size in pixels
    size = int(2 * r.max()) + 2
    # Each shape carries its own colour and texture, which move with it (the texture makes the
    # motion visible inside the shape too, not only at its edges).
    colours = rng.uniform(0, 255, size=(n_shapes, 3))
    textures = [_smooth_texture(rng, size, size, cell=4, amplitude=40.0) for _ in range(n_shapes)]  # (S, S, 3)
    start = rng.uniform(0, 1, size=(n_shapes, 2)) * (height, width)  # (n, 2) y, x
    speed = rng.uniform(0.02, 0.04, size=(n_shapes, 1)) * lo  # pixels/frame
    velocity = speed * np.array(MOTION_DIRECTIONS[label], dtype=np.float64)  # (n, 2): the only use of the label

    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frame = background.copy()
        for i in range(n_shapes):
            cy, cx = (start[i] + velocity[i] * t) % (height, width)
            # The nearest copy of the centre on the torus, so a shape leaving one edge enters at the other.
            dy = (yy - cy + height / 2) % height - height / 2
            dx = (xx - cx + width / 2) % width - width / 2
            mask = _shape_mask(kinds[i], dy, dx, 0.0, 0.0, r[i])
            ty = np.clip((dy[mask] + size / 2).astype(int), 0, size - 1)
            tx = np.clip((dx[mask] + size / 2).astype(int), 0, size - 1)
            frame[mask] = colours[i] + textures[i][ty, tx]
        out[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


TASKS = {"shapes": (SHAPE_CLASSES, render_video), "motion": (MOTION_CLASSES, render_motion_video)}


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """Encode uint8 (T, H, W, 3) RGB frames as H.264/yuv420p mp4 bytes, in memory."""
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even height and width, got {height}x{width}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # ultrafast keeps synthesis well under 0.1 s/video; crf 23 is the x264 default quality.
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed frames
            container.mux(packet)
    return buf.getvalue()


def write_synthetic_shards(out_dir, num_videos, videos_per_shard=8, num_frames=40, height=96, width=128, fps=10,
                           seed=0, task: str = "shapes") -> list[str]:
    """Write `num_videos` synthetic clips into webdataset shards `{out_dir}/synth-%06d.tar`.

    `task`: shapes (class = form, hue and direction together; easy) or motion (class = direction
    of motion only; see MOTION_CLASSES).

    Each sample is `{"__key__": "%08d", "mp4": bytes, "json": {"label", "source", "num_frames",
    "fps", "height", "width"}}`. Output is a pure function of the arguments (seeded per video).
    Returns the shard paths written, in order. Tars are byte-identical across runs.
    """
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    classes, render = TASKS[task]
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(str(out_dir), "synth-%06d.tar")
    written: list[str] = []
    # mtime fixed so that the tar files themselves (not only the samples) are reproducible.
    with wds.ShardWriter(pattern, maxcount=videos_per_shard, verbose=0, mtime=0.0) as sink:
        for idx in range(num_videos):
            # One generator per video, so video i does not depend on how many came before.
            rng = np.random.default_rng([seed, idx])
            label = int(rng.integers(0, len(classes)))
            frames = render(rng, label, num_frames, height, width)
            sink.write(
                {
                    "__key__": f"{idx:08d}",
                    "mp4": encode_mp4(frames, fps),
                    "json": {
                        "label": label,
                        "source": "synth" if task == "shapes" else f"synth-{task}",
                        "num_frames": num_frames,
                        "fps": fps,
                        "height": height,
                        "width": width,
                    },
                }
            )
            if not written or written[-1] != sink.fname:  # ShardWriter opened a new shard
                written.append(sink.fname)
    return written


__all__ = ["MOTION_CLASSES", "SHAPE_CLASSES", "TASKS", "encode_mp4", "render_motion_video", "render_video",
           "write_synthetic_shards"]
