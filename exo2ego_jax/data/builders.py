"""The record builders behind `python -m exo2ego_jax.data.build`: Ego-ExoClip and EgoIT clips -> records.

Two phases, so an interrupted build resumes instead of starting over:
  1. decode: the plan (narrations or samples, deterministic) is cut into chunks; each chunk's clips are decoded
     in parallel worker processes and saved atomically to `OUT/.work/NAME/chunk_*.pkl`. A rerun with the same
     plan skips finished chunks (a different plan is refused: pass --restart).
  2. write: the TFDS array_record builder streams the chunks into `OUT/NAME/1.0.0/`; then the cache is removed.
Every skipped item is counted by reason; the summary is printed and saved as `OUT/NAME/build_summary.json`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import time
from collections.abc import Callable, Sequence

from exo2ego_jax.data import ego_exo4d, egoit
from exo2ego_jax.data.records import make_record, write_records
from exo2ego_jax.data.skips import SkipLog
from exo2ego_jax.data.video import read_clip, safe_join
from exo2ego_jax.errors import DataError
from exo2ego_jax.locks import FolderLock


@dataclasses.dataclass
class Decoded:
    """What one unit of work produced: records (with their split) and skips."""
    records: list
    skips: list          # (reason, detail)
    padded_frames: int = 0


# ----------------------------------------------------------------------------------------------- decoders

def _read(root: str, rel: str, num_frames: int, start, end, store_size: int):
    return read_clip(safe_join(root, rel), num_frames, start, end, short_side=store_size)


def decode_narration(item: ego_exo4d.Narration, *, root: str, num_frames: int, store_size: int) -> Decoded:
    """One narration -> one record per exo camera (the ego clip is decoded once and shared)."""
    try:
        ego, meta = _read(root, item.ego_video, num_frames, item.start, item.end, store_size)
    except DataError as e:  # every record of this narration (one per exo camera) is lost: count each
        return Decoded([], [(e.reason, f"{item.uid}_{cam} (ego): {e}") for cam, _ in item.exo_videos])
    out = Decoded([], [], meta["padded"])
    for cam, path in item.exo_videos:
        try:
            exo, exo_meta = _read(root, path, num_frames, item.start, item.end, store_size)
        except DataError as e:
            out.skips.append((e.reason, f"{item.uid} {cam}: {e}"))
            continue
        out.padded_frames += exo_meta["padded"]
        out.records.append((item.split, make_record(
            ego_frames=ego, exo_frames=exo, text=item.text, source="ego_exo_clip", take_uid=item.take_uid,
            exo_cam=cam, uid=f"{item.uid}_{cam}", start=item.start, end=item.end, is_best_exo=cam == item.best_exo)))
    return out


def decode_sample(item: egoit.Sample, *, root: str, num_frames: int, store_size: int, split: str) -> Decoded:
    """One conversation -> one record (with the synchronised exo clip when the item names one)."""
    try:
        ego, meta = _read(root, item.video, num_frames, item.start, item.end, store_size)
        exo, exo_meta = (None, {"padded": 0}) if item.exo_video is None else _read(
            root, item.exo_video, num_frames, item.start, item.end, store_size)
    except DataError as e:
        return Decoded([], [(e.reason, f"{item.uid}: {e}")])
    record = make_record(ego_frames=ego, exo_frames=exo, conversations=item.conversation_json(), source=item.source,
                         uid=item.uid, start=item.start or 0.0, end=item.end or 0.0)
    return Decoded([(split, record)], [], meta["padded"] + exo_meta["padded"])


# ------------------------------------------------------------------------------------------------- engine

def _plan_hash(units: Sequence, settings: dict) -> str:
    h = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
    for u in units:
        h.update(repr(u).encode())
    return h.hexdigest()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="clip", disable=not enabled, dynamic_ncols=True)


def build_dataset(name: str, units: Sequence, decode: Callable[..., Decoded], out: str, *, settings: dict,
                  planning_skips: SkipLog | None = None, workers: int = 0, chunk_size: int = 16,
                  show_progress: bool = True, restart: bool = False, keep_work: bool = False,
                  description: str = "", splits_expected: Sequence[str] = ()) -> dict:
    """Decode `units` in resumable chunks, write the records, and return the summary dict. Expected splits that
    end up without a record are reported in the summary (`empty_splits`) and printed."""
    if not units:
        raise DataError(f"{name}: nothing to build (0 usable items); the summary of skips: "
                        f"{(planning_skips or SkipLog()).as_dict()}")
    with FolderLock(os.path.join(out, ".locks", name), what=f"records build of {name!r}"):
        return _build_locked(name, units, decode, out, settings=settings, planning_skips=planning_skips,
                             workers=workers, chunk_size=chunk_size, show_progress=show_progress, restart=restart,
                             keep_work=keep_work, description=description, splits_expected=splits_expected)


def _finished_build(final: str, plan: str, settings: dict, restart: bool) -> dict | None:
    """The summary of a finished build of the same plan (nothing to do), or None; a finished build of another
    plan is refused unless `restart` (it would be deleted)."""
    summary_path = os.path.join(final, "build_summary.json")
    if restart or not os.path.exists(summary_path):
        return None
    with open(summary_path) as f:
        previous = json.load(f)
    if previous.get("plan") == plan:
        return previous
    changed = sorted(k for k in set(settings) | set(previous.get("settings", {}))
                     if json.dumps(settings.get(k), default=str) != json.dumps(previous.get("settings", {}).get(k),
                                                                            default=str))
    raise DataError(f"{final} holds a finished build of another plan (differs in: {', '.join(changed) or 'the items'}); "
                    "pass --restart to replace it, or choose another --out")


def _build_locked(name, units, decode, out, *, settings, planning_skips, workers, chunk_size, show_progress, restart,
                  keep_work, description, splits_expected) -> dict:
    work = os.path.join(out, ".work", name)
    plan = _plan_hash(units, settings)
    final = os.path.join(out, name)
    done = _finished_build(final, plan, settings, restart)
    if done is not None:
        print(f"{name}: {final} is already built from this plan; nothing to do (--restart rebuilds it)", flush=True)
        return done
    plan_file = os.path.join(work, "plan.json")
    if os.path.exists(plan_file) and not restart:
        with open(plan_file) as f:
            previous = json.load(f)["plan"]
        if previous != plan:
            raise DataError(f"{work} holds a partial build of a different plan (other sources or settings); "
                            "rerun with --restart to discard it, or use another --out")
    elif os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    with open(plan_file, "w") as f:
        json.dump({"plan": plan, "settings": settings, "units": len(units)}, f)

    chunks = [list(range(i, min(i + chunk_size, len(units)))) for i in range(0, len(units), chunk_size)]
    chunk_path = lambda c: os.path.join(work, f"chunk_{c:06d}.pkl")
    todo = [c for c in range(len(chunks)) if not os.path.exists(chunk_path(c))]
    started = time.time()
    bar = _progress(len(units), f"decode {name}", show_progress)
    bar.update(sum(len(chunks[c]) for c in range(len(chunks)) if c not in set(todo)))
    pool = (concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 0 else None)
    try:
        for c in todo:
            items = [units[i] for i in chunks[c]]
            results = list(pool.map(decode, items)) if pool else [decode(u) for u in items]
            tmp = chunk_path(c) + ".tmp"
            with open(tmp, "wb") as f:
                pickle.dump(results, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, chunk_path(c))  # a chunk exists only when complete
            bar.update(len(items))
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    decode_seconds = time.time() - started

    skips = SkipLog()
    if planning_skips:
        skips.merge(planning_skips)
    written, padded = {}, 0
    for c in range(len(chunks)):
        with open(chunk_path(c), "rb") as f:
            for result in pickle.load(f):
                padded += result.padded_frames
                for reason, detail in result.skips:
                    skips.skip(reason, detail)
                for split, _ in result.records:
                    written[split] = written.get(split, 0) + 1
    if not written:
        raise DataError(f"{name}: every item was skipped; see the reasons: {skips.as_dict()}")

    def records_of(split):
        def gen():
            for c in range(len(chunks)):
                with open(chunk_path(c), "rb") as f:
                    for result in pickle.load(f):
                        yield from (r for s, r in result.records if s == split)
        return gen

    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    if os.path.exists(final):
        shutil.rmtree(final)  # --restart, or a build that never finished: replaced
    path = write_records(out, name, {s: records_of(s) for s in sorted(written)}, description=description)
    empty = sorted(set(splits_expected) - set(written))
    summary = {"name": name, "path": path, "plan": plan, "written": written, "empty_splits": empty, "units": len(units),
               "skipped": skips.as_dict(), "skipped_total": skips.total, "padded_frames": padded,
               "decode_seconds": round(decode_seconds, 2), "settings": settings}
    with open(os.path.join(final, "build_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    if not keep_work:
        shutil.rmtree(work)
        if not os.listdir(os.path.join(out, ".work")):
            os.rmdir(os.path.join(out, ".work"))
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['name']}: wrote {sum(summary['written'].values())} records to {summary['path']}"]
    lines += [f"  {split}: {n}" for split, n in sorted(summary["written"].items())]
    lines += [f"  {split}: 0 records (its annotations are empty or every item was skipped)"
              for split in summary.get("empty_splits", [])]
    lines.append(f"  skipped (planned items and decoded records): {summary['skipped_total']}")
    lines += [f"    {reason}: {v['count']}  (e.g. {v['examples'][0] if v['examples'] else ''})"
              for reason, v in summary["skipped"].items()]
    if summary["padded_frames"]:
        lines.append(f"  black frames padded into truncated clips: {summary['padded_frames']}")
    lines.append(f"  decode time: {summary['decode_seconds']} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- builders

def build_ego_exo_clip(src: str, out: str, *, num_frames: int = 16, store_size: int = 336,
                       alpha: float = ego_exo4d.EGOCLIP_ALPHA, filters: ego_exo4d.Filters = ego_exo4d.DEFAULT_FILTERS,
                       video_subdir: str = "", splits: Sequence[str] = ("train", "val"), **engine) -> dict:
    skips = SkipLog()
    units = ego_exo4d.plan_narrations(src, splits=splits, alpha=alpha, filters=filters, video_subdir=video_subdir,
                                      skips=skips)
    settings = dict(src=os.path.abspath(src), num_frames=num_frames, store_size=store_size, alpha=alpha,
                    filters=dataclasses.asdict(filters), video_subdir=video_subdir, splits=list(splits))
    decode = functools.partial(decode_narration, root=src, num_frames=num_frames, store_size=store_size)
    return build_dataset("ego_exo_clip", units, decode, out, settings=settings, planning_skips=skips,
                         splits_expected=splits,
                         description="Ego-ExoClip: synchronised ego/exo clips of Ego-Exo4D atomic descriptions",
                         **engine)


def build_ego_it(json_paths: Sequence[str], video_root: str, out: str, *, split: str = "train",
                 num_frames: int = 16, store_size: int = 336, name: str = "ego_it", **engine) -> dict:
    skips = SkipLog()
    units = []
    for path in json_paths:
        units.extend(egoit.load_conversations(path, skips=skips))
    settings = dict(json=[os.path.abspath(p) for p in json_paths], video_root=os.path.abspath(video_root),
                    split=split, num_frames=num_frames, store_size=store_size)
    decode = functools.partial(decode_sample, root=video_root, num_frames=num_frames, store_size=store_size,
                               split=split)
    return build_dataset(name, units, decode, out, settings=settings, planning_skips=skips,
                         splits_expected=(split,), description="EgoIT: egocentric instruction-tuning conversations",
                         **engine)
