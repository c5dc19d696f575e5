"""Loader throughput: clips/s per worker for 16 x 336 x 336 clips, from records and straight from MP4.

  python launch/bench_data.py [--clips 48] [--frames 16] [--size 336] [--source_size 448x800] [--workers 0,2]

Writes one synthetic MP4 (a 448-px-high, downscaled-Ego-Exo4D-sized take, 30 fps), builds clip records from it
with the real builder (two views per record, like Ego-ExoClip), then times:
  mp4      read_clip (16 frames of a 1 s window, decode + resize to short side 336) + CLIP crop, one process;
  records  the Grain pipeline's per-example work (record read, zlib inflate, crop, chat-template tokenisation)
           and the whole Grain loader with each --workers value (0 = in the main process).
Prints clips/s and the host cores one GPU needs at the stage-3 step rate (--target_clips_per_s).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np

from exo2ego_jax.data import template
from exo2ego_jax.data.builders import build_ego_it
from exo2ego_jax.data.loader import GrainBatchIterator, ToExample
from exo2ego_jax.data.preprocess import clip_frames
from exo2ego_jax.data.records import open_records
from exo2ego_jax.data.tokenizer import train_tokenizer
from exo2ego_jax.data.video import read_clip, write_video


def synthetic_take(path: str, height: int, width: int, seconds: float, fps: int = 30) -> None:
    """A textured moving scene (compresses like real video, unlike noise or flat colour)."""
    n = int(seconds * fps)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        phase = t / fps
        frames[t, ..., 0] = 127 + 100 * np.sin(xx / 23 + 2 * phase)
        frames[t, ..., 1] = 127 + 100 * np.sin(yy / 17 - 1.5 * phase)
        frames[t, ..., 2] = 127 + 100 * np.sin((xx + yy) / 31 + phase)
        cx, cy = int((0.5 + 0.3 * np.sin(phase)) * width), int(0.5 * height)
        frames[t, max(cy - 40, 0):cy + 40, max(cx - 40, 0):cx + 40] = (230, 40, 40)
    write_video(path, frames, fps=fps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=336)
    p.add_argument("--source_size", default="448x800", help="HxW of the source video")
    p.add_argument("--workers", default="0,2", help="Grain worker counts to time")
    p.add_argument("--target_clips_per_s", type=float, default=2.94,
                   help="stage-3 clips/s one GPU consumes (2x the H200 PyTorch anchor, the performance target)")
    p.add_argument("--workdir", default="")
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    work = a.workdir or tempfile.mkdtemp(prefix="bench_data_")
    h, w = (int(x) for x in a.source_size.split("x"))
    seconds = max(4.0, a.clips * 0.25 + 2)
    video = os.path.join(work, "take.mp4")
    if not os.path.exists(video):
        synthetic_take(video, h, w, seconds)
    windows = [(0.2 + 0.25 * k, 1.2 + 0.25 * k) for k in range(a.clips)]

    t = time.perf_counter()
    for s, e in windows:
        frames, _ = read_clip(video, a.frames, s, e, short_side=a.size)
        clip_frames(frames, a.size)
    mp4_rate = a.clips / (time.perf_counter() - t)

    conv = [{"from": "human", "value": "<video>\nWhat is happening in this clip?"},
            {"from": "gpt", "value": "A red square moves across a patterned wall."}]
    items = [{"id": f"c{k}", "video": "take.mp4", "start": s, "end": e, "conversations": conv}
             for k, (s, e) in enumerate(windows)]
    with open(os.path.join(work, "items.json"), "w") as f:
        json.dump(items, f)
    records_root = os.path.join(work, "records")
    if not os.path.exists(os.path.join(records_root, "ego_it")):
        build_ego_it([os.path.join(work, "items.json")], work, records_root, num_frames=a.frames,
                     store_size=a.size, show_progress=False)
    tok_dir = os.path.join(work, "tokenizer")
    train_tokenizer([template.SYSTEM_PROMPT, conv[0]["value"], conv[1]["value"]] * 20, tok_dir, vocab_size=256)
    source = open_records(os.path.join(records_root, "ego_it"), "train")
    to_example = ToExample(tok_dir, seq_len=2048, image_size=a.size, num_frames=a.frames, aspect="crop",
                           views=("ego",))
    to_example(source[0])  # load the tokenizer outside the timing
    t = time.perf_counter()
    for i in range(len(source)):
        to_example(source[i])
    record_rate = len(source) / (time.perf_counter() - t)

    rows = [("mp4 -> clip (decode 16 frames, resize, crop)", 1, mp4_rate),
            ("records -> example (read, inflate, crop, tokenise)", 1, record_rate)]
    for workers in (int(x) for x in a.workers.split(",")):
        it = GrainBatchIterator(source, to_example, global_batch=4, seed=0, shuffle=True, process_index=0,
                                process_count=1, worker_count=workers, buckets=(), pad_id=0)
        next(it)  # start-up (worker processes) outside the timing
        batches = max(2, a.clips // 4)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = batches * 4 / (time.perf_counter() - t)
        rows.append((f"Grain loader, batches of 4, worker_count={workers}", max(workers, 1), rate))
        del it

    print(f"\n{a.frames} frames x {a.size}x{a.size}, source {h}x{w} H.264, {os.cpu_count()} host cores\n")
    print("| path | processes | clips/s | clips/s per process |")
    print("|---|---|---|---|")
    for name, procs, rate in rows:
        print(f"| {name} | {procs} | {rate:.1f} | {rate / procs:.1f} |")
    cores = a.target_clips_per_s / record_rate
    cores_mp4 = a.target_clips_per_s / mp4_rate
    print(f"\nstage-3 target {a.target_clips_per_s} clips/s per GPU: {cores:.2f} host cores from records, "
          f"{cores_mp4:.2f} decoding MP4s on the fly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
