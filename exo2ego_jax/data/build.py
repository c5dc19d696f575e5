"""Build clip records: `python -m exo2ego_jax.data.build {ego_exo_clip,ego_it,convert,synthetic} ...`.

The builders live in `exo2ego_jax.data.builders`; this module is the command line.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from exo2ego_jax.data import ego_exo4d, egoit, synthetic
from exo2ego_jax.data.builders import build_ego_exo_clip, build_ego_it, format_summary
from exo2ego_jax.data.skips import SkipLog
from exo2ego_jax.errors import run_cli
from exo2ego_jax.paths import absolute


# -------------------------------------------------------------------------------------------------- CLI

def _engine_args(p):
    p.add_argument("--out", type=absolute, required=True, help="records folder (one sub-folder per dataset name)")
    p.add_argument("--num_frames", type=int, default=16)
    p.add_argument("--store_size", type=int, default=336, help="short side of stored frames (pixels)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="decoding processes (0: decode in this process)")
    p.add_argument("--chunk_size", type=int, default=16, help="items per resumable chunk")
    p.add_argument("--restart", action="store_true", help="discard a partial build of a different plan")
    p.add_argument("--keep_work", action="store_true", help="keep the decoded-chunk cache after writing")
    p.add_argument("--no_progress", action="store_true")


def _engine(a) -> dict:
    return dict(workers=a.workers, chunk_size=a.chunk_size, restart=a.restart, keep_work=a.keep_work,
                show_progress=not a.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exo2ego_jax.data.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ego_exo_clip", help="Ego-ExoClip records from an Ego-Exo4D download")
    p.add_argument("--src", type=absolute, required=True, help="Ego-Exo4D root (takes.json, annotations/, takes/)")
    p.add_argument("--alpha", type=float, default=ego_exo4d.EGOCLIP_ALPHA, help="EgoClip window scale (s)")
    p.add_argument("--downscaled", action="store_true", help="read frame_aligned_videos/downscaled/448/")
    p.add_argument("--keep_unsure", action="store_true")
    p.add_argument("--subject", default="", help="'C': camera-wearer narrations only")
    p.add_argument("--require_ego_visible", action="store_true")
    p.add_argument("--best_exo_only", action="store_true")
    p.add_argument("--splits", default="train,val")
    _engine_args(p)
    p = sub.add_parser("ego_it", help="EgoIT records from conversation JSON files")
    p.add_argument("--src", type=absolute, required=True, help="video root the JSON 'video' paths are relative to")
    p.add_argument("--json", type=absolute, required=True, nargs="+", help="conversation JSON file(s)")
    p.add_argument("--split", default="train")
    p.add_argument("--name", default="ego_it")
    _engine_args(p)
    p = sub.add_parser("convert", help="one EgoIT source's annotations -> conversation JSON")
    p.add_argument("source", choices=egoit.SOURCES)
    p.add_argument("--src", type=absolute, required=True, help="the source's annotation folder")
    p.add_argument("--out", type=absolute, required=True, help="output JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video_prefix", default="")
    p = sub.add_parser("synthetic", help="the synthetic ego-exo dataset (raw files and records)")
    p.add_argument("--out", type=absolute, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="demo", help="size preset of exo2ego_jax.data.synthetic")
    a = parser.parse_args(argv)

    if a.command == "convert":
        skips = SkipLog()
        n = egoit.convert_source(a.source, a.src, a.out, seed=a.seed, skips=skips, video_prefix=a.video_prefix)
        print(f"{a.source}: wrote {n} samples to {a.out}; skipped {skips.total}")
        for reason, v in skips.as_dict().items():
            print(f"  {reason}: {v['count']}")
        return 0
    if a.command == "synthetic":
        summaries = synthetic.build(a.out, seed=a.seed, preset=a.preset)
        for s in summaries:
            print(format_summary(s))
        return 0
    if a.command == "ego_exo_clip":
        filters = ego_exo4d.Filters(drop_unsure=not a.keep_unsure, subject=a.subject,
                                    require_ego_visible=a.require_ego_visible, best_exo_only=a.best_exo_only)
        summary = build_ego_exo_clip(a.src, a.out, num_frames=a.num_frames, store_size=a.store_size, alpha=a.alpha,
                                     filters=filters, video_subdir="downscaled/448" if a.downscaled else "",
                                     splits=tuple(a.splits.split(",")), **_engine(a))
    else:
        summary = build_ego_it(a.json, a.src, a.out, split=a.split, num_frames=a.num_frames,
                               store_size=a.store_size, name=a.name, **_engine(a))
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
