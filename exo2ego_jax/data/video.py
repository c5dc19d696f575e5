"""Video decoding for clips: VideoLLaMA2's uniform frame rule, take-relative windows, safe paths (PyAV).

`read_clip(path, num_frames, start, end)` returns `num_frames` uint8 frames [T, H, W, 3] sampled from the
window [start, end] (seconds from the file's first frame) with VideoLLaMA2's `frame_sample(mode='uniform')`
rule; every failure is a `VideoError` naming the file and what to do about it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from exo2ego_jax.errors import DataError


class VideoError(DataError):
    """A video that cannot be used: missing, empty, corrupt, or the window lies outside it."""

    def __init__(self, message: str, reason: str = "corrupt video"):
        super().__init__(message, reason)


def safe_join(root: str, relative: str) -> str:
    """`root/relative`, refusing absolute paths and `..` that leave `root` (annotation files are untrusted)."""
    if not relative:
        raise DataError(f"empty video path under {root!r}", "empty video path")
    if os.path.isabs(relative):
        raise DataError(f"video path {relative!r} is absolute; annotation paths must be relative to the data "
                        f"root {root!r}", "video path outside the data root")
    # Lexical containment: `..` may not leave the root, but a symlinked folder inside it (takes/ on another disk)
    # is inside it, wherever it points.
    root_abs = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root_abs, relative))
    if os.path.commonpath([root_abs, path]) != root_abs:
        raise DataError(f"video path {relative!r} escapes the data root {root!r}; fix the annotation file",
                        "video path outside the data root")
    return path


def uniform_indices(num_available: int, num_frames: int) -> list[int]:
    """VideoLLaMA2 `frame_sample(duration, mode='uniform')`: the midpoints of `num_frames` equal segments of
    [0, duration - 1], rounded (+1e-6 so .5 rounds up). Short windows repeat frames, as the reference does."""
    seg = float(num_available - 1) / num_frames
    mids = [(seg * i + seg * (i + 1)) / 2 for i in range(num_frames)]
    return np.round(np.asarray(mids) + 1e-6).astype(int).tolist()


def window_frames(start: float | None, end: float | None, fps: float, num_total: int) -> tuple[int, int]:
    """VideoLLaMA2's frame range of [start, end] s: max(int(s*fps) - 1, 0) ... min(int(e*fps) - 1, n - 1)."""
    first = 0 if start is None else max(int(start * fps) - 1, 0)
    last = num_total - 1 if end is None else min(int(end * fps) - 1, num_total - 1)
    return first, max(first, last)


def sample_frame_indices(num_total: int, fps: float, num_frames: int, start: float | None = None,
                         end: float | None = None) -> list[int]:
    first, last = window_frames(start, end, fps, num_total)
    return [first + i for i in uniform_indices(last - first + 1, num_frames)]


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    num_frames: int    # frames in the stream (from the container, or duration x fps)
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def _open(path: str):
    import av
    if not os.path.exists(path):
        raise VideoError(f"video {path!r} does not exist; check the data root and the annotation's path",
                         "missing video")
    if os.path.getsize(path) == 0:
        raise VideoError(f"video {path!r} is an empty (0-byte) file; re-download it", "empty video file")
    try:
        container = av.open(path)
    except Exception as e:  # PyAV raises several InvalidDataError subclasses
        raise VideoError(f"video {path!r} cannot be opened ({type(e).__name__}: {e}); the file is corrupt or "
                         "truncated, re-download it") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path!r} has no video stream")
    return container


def _info(container, path: str) -> VideoInfo:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise VideoError(f"video {path!r} has no frame rate in its header")
    fps = float(rate)
    count = int(stream.frames or 0)
    if count <= 0:  # webm and some muxers do not store the count
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1e6
        else:
            raise VideoError(f"video {path!r} stores neither a frame count nor a duration")
        count = int(round(seconds * fps))
    return VideoInfo(count, fps, stream.codec_context.width, stream.codec_context.height)


def read_clip(path: str, num_frames: int, start: float | None = None, end: float | None = None, *,
              short_side: int | None = None, strict_window: bool = False) -> tuple[np.ndarray, dict]:
    """`num_frames` uint8 frames [T, H, W, 3] of [start, end] s, plus facts about the read.

    The returned dict has `padded` (frames missing from a truncated stream, filled with black as VideoLLaMA2
    pads short reads), `indices` and `info`. `short_side` resizes while decoding (bicubic), saving memory.
    `strict_window` refuses a window that is empty or ends after the video (a user's window; annotation windows
    are clamped instead).
    """
    container = _open(path)
    try:
        info = _info(container, path)
        if strict_window and start is not None and end is not None and end <= start:
            raise VideoError(f"window [{start}, {end}] s of {path!r} is empty: the end must be after the start",
                             "empty window")
        if strict_window and end is not None and end > info.duration + 1.0 / info.fps:
            raise VideoError(f"window [{start}, {end}] s ends after the end of {path!r} ({info.duration:.3f} s); "
                             "choose an end inside the video", "window outside the video")
        if start is not None and start >= info.duration:
            raise VideoError(f"window [{start:.3f}, {end}] s starts after the end of {path!r} "
                             f"({info.duration:.3f} s); the timestamps do not belong to this video",
                             "window outside the video")
        wanted = sample_frame_indices(info.num_frames, info.fps, num_frames, start, end)
        frames = _decode(container, path, info, sorted(set(wanted)), short_side)
    finally:
        container.close()
    if not frames:
        raise VideoError(f"no frame of {path!r} could be decoded in [{start}, {end}] s; the file is corrupt")
    shape = next(iter(frames.values())).shape
    black = np.zeros(shape, np.uint8)
    out = np.stack([frames.get(i, black) for i in wanted])
    padded = sum(i not in frames for i in wanted)
    return out, {"padded": padded, "indices": wanted, "info": info}


def read_frames_at(path: str, indices: Sequence[int]) -> np.ndarray:
    """Frames by index [T, H, W, 3] (indices clamped to the stream; EgoPlan's explicit frame lists), or from a
    folder of `frame_{:010d}.jpg` files (the EPIC-KITCHENS rgb_frames layout)."""
    if os.path.isdir(path):
        return read_frame_files([os.path.join(path, f"frame_{int(i):010d}.jpg") for i in indices])
    container = _open(path)
    try:
        info = _info(container, path)
        clamped = [min(max(int(i), 0), info.num_frames - 1) for i in indices]
        got = _decode(container, path, info, sorted(set(clamped)), None)
    finally:
        container.close()
    if not got:
        raise VideoError(f"no frame of {path!r} could be decoded at indices {list(indices)[:4]}...")
    black = np.zeros_like(next(iter(got.values())))
    return np.stack([got.get(i, black) for i in clamped])


def read_frame_files(paths: Sequence[str]) -> np.ndarray:
    """Still frames as uint8 [T, H, W, 3]."""
    from PIL import Image
    out = []
    for p in paths:
        if not os.path.exists(p):
            raise VideoError(f"frame {p!r} does not exist; check the benchmark's frame folder", "missing video")
        out.append(np.asarray(Image.open(p).convert("RGB"), np.uint8))
    return np.stack(out)


def _decode(container, path: str, info: VideoInfo, wanted: Sequence[int], short_side: int | None) -> dict:
    """Decode the frames whose index is in `wanted` (seeking near the first one); missing ones are left out."""
    import av
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    time_base = float(stream.time_base)
    first, last = wanted[0], wanted[-1]
    if first > 0:
        # Seek to the keyframe before the first wanted frame (PyAV seeks in stream time_base units).
        container.seek(int(max(first - 1, 0) / info.fps / time_base), stream=stream, backward=True)
    wanted_set = set(wanted)
    out: dict[int, np.ndarray] = {}
    start_pts = stream.start_time or 0
    try:
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            index = int(math.floor((frame.pts - start_pts) * time_base * info.fps + 0.5))
            if index in wanted_set:
                out[index] = _to_rgb(frame, short_side)
            if index >= last:
                break
    except (av.error.InvalidDataError, av.error.EOFError, ValueError) as e:
        if not out:
            raise VideoError(f"video {path!r} is corrupt ({type(e).__name__}: {e}); re-download it") from e
        # A truncated tail: keep what decoded; the caller pads and counts the missing frames.
    return out


def _to_rgb(frame, short_side: int | None) -> np.ndarray:
    if short_side:
        w, h = frame.width, frame.height
        scale = short_side / min(w, h)
        if scale != 1:
            image = frame.to_image()  # PIL, for the same bicubic filter as the CLIP processor
            from PIL import Image
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
            return np.asarray(image, np.uint8)
    return frame.to_ndarray(format="rgb24")


def write_video(path: str, frames: np.ndarray, fps: int = 30, *, codec: str = "libx264") -> None:
    """Write uint8 frames [T, H, W, 3] as an mp4 (synthetic data and test fixtures). H and W must be even."""
    import av
    t, h, w, _ = frames.shape
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast", "g": "8"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
