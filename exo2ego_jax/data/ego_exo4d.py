"""Ego-ExoClip from an Ego-Exo4D download: atomic-description timestamps -> synchronised ego/exo clip windows.

Rule (DATA_AND_BENCHMARKS §2.4, EgoClip's window): every non-rejected annotation pass is one narration stream;
beta = the mean gap between its consecutive timestamps, and each timestamp t becomes
[t - beta / (2 alpha), t + beta / (2 alpha)] clamped to [0, duration_sec], alpha = 4.9 s by default (EgoClip).
A pass with a single description uses the mean beta of all passes. The same take-relative window is cut from
the Aria rgb stream and from every exo camera (frame-aligned MP4s share one time axis): one record per
(narration, exo camera), `is_best_exo` kept.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from exo2ego_jax.data.files import read_json
from exo2ego_jax.errors import DataError
from exo2ego_jax.data.skips import SkipLog

EGOCLIP_ALPHA = 4.9
PSEUDO_CAMERAS = ("collage", "best_exo")


@dataclasses.dataclass(frozen=True)
class Narration:
    """One narration with its window and the videos to cut (paths relative to the Ego-Exo4D root)."""
    uid: str
    take_uid: str
    text: str
    t: float
    start: float
    end: float
    ego_video: str
    exo_videos: tuple[tuple[str, str], ...]   # (cam_id, relative path)
    best_exo: str
    split: str


@dataclasses.dataclass(frozen=True)
class Filters:
    drop_unsure: bool = True          # descriptions flagged unsure
    subject: str = ""                 # "C" keeps camera-wearer narrations only; "" keeps all
    require_ego_visible: bool = False
    best_exo_only: bool = False       # one record per narration (the best exo view) instead of every view


DEFAULT_FILTERS = Filters()


def to_bool(value, *, field: str) -> bool:
    """Ego-Exo4D stores flags as booleans and as "0"/"1" strings."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false", ""):
        return value.strip().lower() in ("1", "true")
    raise DataError(f"flag {field!r} has value {value!r}; expected a boolean or '0'/'1'")


def egoclip_window(t: float, beta: float, alpha: float = EGOCLIP_ALPHA) -> tuple[float, float]:
    half = beta / (2.0 * alpha)
    return t - half, t + half


def mean_gap(timestamps: Sequence[float]) -> float | None:
    ts = sorted(timestamps)
    if len(ts) < 2:
        return None
    return (ts[-1] - ts[0]) / (len(ts) - 1)   # the mean of consecutive gaps telescopes


def take_videos(take: dict, video_subdir: str = "") -> tuple[str | None, list[tuple[str, str]]]:
    """(ego rgb path, [(exo cam, path), ...]) relative to the root; `video_subdir` e.g. 'downscaled/448'."""
    videos = take.get("frame_aligned_videos") or {}
    cameras = (take.get("capture") or {}).get("cameras") or []
    ego_ids = {c.get("cam_id") for c in cameras if c.get("is_ego")}
    if not ego_ids:  # older metadata: the Aria glasses are the ego camera
        ego_ids = {k for k in videos if "aria" in k.lower()}
    ego_keys = sorted((k for k in videos if k in ego_ids), key=lambda k: ("aria" not in k.lower(), k))

    def path_of(stream: dict) -> str:
        rel = stream["relative_path"]
        if video_subdir:
            rel = os.path.join(os.path.dirname(rel), video_subdir, os.path.basename(rel))
        return os.path.join(take["root_dir"], rel)

    ego = None
    if ego_keys and "rgb" in videos[ego_keys[0]]:
        ego = path_of(videos[ego_keys[0]]["rgb"])
    exo = []
    for cam in sorted(videos):
        if cam in ego_ids or cam in PSEUDO_CAMERAS:
            continue
        stream = videos[cam].get("0") or next(iter(videos[cam].values()), None)
        if stream and "relative_path" in stream:
            exo.append((cam, path_of(stream)))
    return ego, exo


def plan_narrations(root: str, *, splits: Sequence[str] = ("train", "val"), alpha: float = EGOCLIP_ALPHA,
                    filters: Filters = Filters(), video_subdir: str = "", skips: SkipLog | None = None
                    ) -> list[Narration]:
    """Every usable narration of the download, in a deterministic order; skips are counted in `skips`."""
    skips = skips if skips is not None else SkipLog()
    takes_data = read_json(os.path.join(root, "takes.json"), "takes.json")
    takes = {t["take_uid"]: t for t in (takes_data if isinstance(takes_data, list) else takes_data.get("takes", []))}
    passes = []  # (split, take_uid, annotation_uid, descriptions)
    for split in splits:
        path = os.path.join(root, "annotations", f"atomic_descriptions_{split}.json")
        data = read_json(path, f"atomic descriptions ({split})")
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), dict):
            raise DataError(f"{path!r} has no 'annotations' mapping of take_uid -> passes")
        for take_uid, passes_of_take in sorted(data["annotations"].items()):
            for a, ann in enumerate(passes_of_take):
                if to_bool(ann.get("rejected", False), field="rejected"):
                    skips.skip("rejected annotation pass", f"{take_uid}/{ann.get('annotation_uid', a)}")
                    continue
                passes.append((split, take_uid, str(ann.get("annotation_uid", a)), ann.get("descriptions") or []))
    # Filter the narrations first: a pass's mean gap beta comes from its valid timestamps only (one past the end
    # of the take must not widen the other windows).
    kept_passes = []  # (split, take_uid, ann_uid, take, ego, exo, [(k, description)], [valid times])
    for split, take_uid, ann_uid, descriptions in passes:
        take = takes.get(take_uid)
        if take is None:
            skips.skip("take not in takes.json", take_uid)
            continue
        ego, exo = take_videos(take, video_subdir)
        if ego is None or not exo:
            skips.skip("take without an ego rgb stream or exo cameras", take_uid)
            continue
        duration = float(take.get("duration_sec") or 0.0)
        kept, times = [], []
        for k, d in enumerate(sorted(descriptions, key=lambda d: d.get("timestamp", -1.0))):
            reason = _drop_reason(d, filters, duration)
            if reason:
                skips.skip(reason[0], f"{take_uid}/{ann_uid}/{k}{reason[1]}")
            else:
                kept.append((k, d))
            # β is the pass's narration density: every description with a valid time marks it, also those the
            # content filters drop (an unsure one); a missing or out-of-take time does not
            if reason is None or not reason[0].startswith(("description without", "timestamp outside")):
                times.append(float(d["timestamp"]))
        kept_passes.append((split, take_uid, ann_uid, take, ego, exo, kept, times))
    gaps = [g for *_, times in kept_passes if (g := mean_gap(times)) is not None]
    default_beta = sum(gaps) / len(gaps) if gaps else alpha  # single-narration passes: the mean beta
    out = []
    for split, take_uid, ann_uid, take, ego, exo, kept, times in kept_passes:
        duration = float(take.get("duration_sec") or 0.0)
        beta = mean_gap(times) or default_beta
        best = str(take.get("best_exo") or "")
        for k, d in kept:
            t = float(d["timestamp"])
            start, end = egoclip_window(t, beta, alpha)
            start, end = (max(0.0, start), min(duration, end)) if duration > 0 else (max(0.0, start), end)
            desc_best = (d.get("best_exo") or {}).get("cam_id") or best
            views = tuple((cam, path) for cam, path in exo if not filters.best_exo_only or cam == desc_best)
            if not views:
                skips.skip("best exo camera has no video", f"{take_uid}/{ann_uid}/{k}")
                continue
            out.append(Narration(uid=f"{take_uid}_{ann_uid}_{k}", take_uid=take_uid, text=str(d["text"]).strip(),
                                 t=t, start=start, end=end, ego_video=ego, exo_videos=views, best_exo=desc_best,
                                 split=split))
    return out


def _drop_reason(d: dict, filters: Filters, duration: float) -> tuple[str, str] | None:
    """(skip reason, detail) when a description is not used, else None."""
    if "timestamp" not in d or "text" not in d:
        return "description without timestamp or text", ""
    if filters.drop_unsure and to_bool(d.get("unsure", False), field="unsure"):
        return "unsure description", ""
    subject = d.get("narration_subject", d.get("subject", ""))
    if filters.subject and subject != filters.subject:
        return f"narration subject is not {filters.subject}", ""
    if filters.require_ego_visible and not to_bool(d.get("ego_visible", True), field="ego_visible"):
        return "ego not visible", ""
    t = float(d["timestamp"])
    if duration > 0 and (t < 0 or t > duration):
        return "timestamp outside the take", f": t={t:.2f} s, duration {duration:.2f} s"
    return None
