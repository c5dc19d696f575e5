"""EgoIT: VideoLLaMA2/LLaVA conversation JSON, and converters from the five public sources into it.

Conversation JSON (DATA_AND_BENCHMARKS §6): a list of `{"id", "video", "conversations": [{"from", "value"}],
"start"?, "end"?}`; `video` is relative to the data root (EgoExoLearn's QA files nest it as `image.video`).
Optional `start`/`end` (seconds) cut the clip at read time. Every converter picks one of ten instruction
templates per source (`resources/egoit_templates.json`) with a seeded generator, so the output is reproducible.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
from collections.abc import Callable

from exo2ego_jax.data.files import read_json, read_text
from exo2ego_jax.errors import DataError
from exo2ego_jax.data.skips import SkipLog
from exo2ego_jax.data.template import normalize_turns

TEMPLATES_PATH = os.path.join(os.path.dirname(__file__), "resources", "egoit_templates.json")
SOURCES = ("egtea", "ssv2", "egotimeqa", "openeqa", "egoexolearn")


@dataclasses.dataclass(frozen=True)
class Sample:
    uid: str
    video: str                  # relative to the data root
    conversations: tuple        # ((from, value), ...) as given
    start: float | None
    end: float | None
    source: str
    exo_video: str | None = None  # a synchronised exocentric clip of the same moment, when there is one

    def conversation_json(self) -> str:
        return json.dumps([{"from": f, "value": v} for f, v in self.conversations], ensure_ascii=False)


def load_conversations(path: str, *, skips: SkipLog | None = None, source: str = "") -> list[Sample]:
    """Validated samples of one conversation JSON file; malformed items are counted skips with the reason."""
    skips = skips if skips is not None else SkipLog()
    data = read_json(path, "conversation JSON")
    if not isinstance(data, list):
        raise DataError(f"conversation JSON {path!r} must be a list of samples, got {type(data).__name__}")
    tag = source or os.path.splitext(os.path.basename(path))[0]
    out = []
    for i, item in enumerate(data):
        where = f"{os.path.basename(path)}[{i}]"
        if not isinstance(item, dict):
            skips.skip("sample is not an object", where)
            continue
        video = item.get("video")
        if video is None and isinstance(item.get("image"), dict):
            video = item["image"].get("video")
        if video is None:
            skips.skip("missing key 'video'" if "image" not in item else "image sample (not a video)", where)
            continue
        if "conversations" not in item:
            skips.skip("missing key 'conversations'", where)
            continue
        try:
            normalize_turns(item["conversations"], source=where)
        except ValueError as e:
            skips.skip("malformed conversations", str(e))
            continue
        start, end = item.get("start"), item.get("end")
        try:
            start = None if start is None else float(start)
            end = None if end is None else float(end)
        except (TypeError, ValueError):
            skips.skip("start/end not numbers", f"{where}: {start!r}, {end!r}")
            continue
        if start is not None and end is not None and end <= start:
            skips.skip("end <= start", f"{where}: [{start}, {end}]")
            continue
        turns = tuple((str(t["from"]), str(t["value"])) for t in item["conversations"])
        exo = item.get("exo_video")
        out.append(Sample(uid=str(item.get("id", f"{tag}_{i}")), video=str(video), conversations=turns,
                          start=start, end=end, source=str(item.get("source", tag)),
                          exo_video=None if exo is None else str(exo)))
    return out


def templates() -> dict[str, list[str]]:
    data = read_json(TEMPLATES_PATH, "EgoIT templates")
    for source in SOURCES:
        if len(data.get(source, [])) != 10:
            raise DataError(f"{TEMPLATES_PATH}: source {source!r} needs exactly ten templates")
    return data


def _sample(uid, video, question, answer, source, start=None, end=None) -> dict:
    item = {"id": uid, "video": video, "source": source,
            "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]}
    if start is not None:
        item["start"], item["end"] = float(start), float(end)
    return item


def _sentence(text: str) -> str:
    text = " ".join(text.strip().split())
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


def convert_egtea(src: str, rng: random.Random, tpl: list[str], skips: SkipLog, split: str = "train") -> list[dict]:
    """`action_idx.txt` (`<name> <idx>`, 1-based) + `{split}_split1.txt` -> whole cropped clips."""
    actions = {}
    for line in read_text(os.path.join(src, "action_idx.txt"), "EGTEA action_idx.txt").splitlines():
        if line.strip():
            name, idx = line.rsplit(maxsplit=1)
            actions[int(idx)] = name.replace("_", " ").lower()
    out = []
    for line in read_text(os.path.join(src, f"{split}_split1.txt"), f"EGTEA {split}_split1.txt").splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or int(parts[1]) not in actions:
            skips.skip("EGTEA line without a known action index", line[:80])
            continue
        clip = parts[0]
        folder = "-".join(clip.split("-")[:3])
        out.append(_sample(f"egtea_{clip}", f"cropped_clips/{folder}/{clip}.mp4", rng.choice(tpl),
                           _sentence(actions[int(parts[1])]), "egtea"))
    return out


def convert_ssv2(src: str, rng: random.Random, tpl: list[str], skips: SkipLog, split: str = "train") -> list[dict]:
    """`something-something-v2-{split}.json` -> `<id>.webm` with the filled-in label as the answer."""
    name = {"train": "train", "val": "validation", "validation": "validation"}.get(split, split)
    data = read_json(os.path.join(src, f"something-something-v2-{name}.json"), f"SSv2 {name} json")
    out = []
    for item in data:
        if not isinstance(item, dict) or "id" not in item or "label" not in item:
            skips.skip("SSv2 item without id/label", repr(item)[:80])
            continue
        out.append(_sample(f"ssv2_{item['id']}", f"{item['id']}.webm", rng.choice(tpl), _sentence(item["label"]),
                           "ssv2"))
    return out


def convert_egotimeqa(src: str, rng: random.Random, tpl: list[str], skips: SkipLog, window: str = "clip"
                      ) -> list[dict]:
    """GroundVQA `annotations.EgoTimeQA.json` -> QA over the NLQ clip (`window='moment'` cuts the moment)."""
    data = read_json(os.path.join(src, "annotations.EgoTimeQA.json"), "EgoTimeQA annotations")
    out = []
    for i, item in enumerate(data):
        if not all(k in item for k in ("video_id", "question", "answer")):
            skips.skip("EgoTimeQA item missing video_id/question/answer", repr(item)[:80])
            continue
        start = end = None
        if window == "moment" and "start_sec" in item and "end_sec" in item:
            start, end = item["start_sec"], item["end_sec"]
        question = rng.choice(tpl).format(question=item["question"].strip())
        out.append(_sample(f"egotimeqa_{item.get('sample_id') or i}", f"{item['video_id']}.mp4", question,
                           _sentence(item["answer"]), "egotimeqa", start, end))
    return out


def convert_openeqa(src: str, rng: random.Random, tpl: list[str], skips: SkipLog) -> list[dict]:
    """`open-eqa-v0.json` -> `<episode_history>.mp4` (made by OpenEQA's frames2videos.py)."""
    data = read_json(os.path.join(src, "open-eqa-v0.json"), "OpenEQA json")
    out = []
    for item in data:
        if not all(k in item for k in ("question", "answer", "episode_history")):
            skips.skip("OpenEQA item missing question/answer/episode_history", repr(item)[:80])
            continue
        question = rng.choice(tpl).format(question=item["question"].strip())
        out.append(_sample(f"openeqa_{item.get('question_id', len(out))}", f"{item['episode_history']}.mp4",
                           question, _sentence(item["answer"]), "openeqa"))
    return out


def convert_egoexolearn(src: str, rng: random.Random, tpl: list[str], skips: SkipLog, split: str = "train"
                        ) -> list[dict]:
    """`fine_annotation_trainval_en.csv` ego rows -> descriptions of [start_sec, end_sec]."""
    text = read_text(os.path.join(src, "fine_annotation_trainval_en.csv"), "EgoExoLearn annotation csv")
    out = []
    for row in csv.DictReader(text.splitlines()):
        if row.get("view", "ego") != "ego" or row.get("subset", split) != split:
            continue
        narration = (row.get("narration_en_no_hand_prompt") or row.get("narration_en") or "").strip()
        try:
            start, end = float(row["start_sec"]), float(row["end_sec"])
        except (KeyError, TypeError, ValueError):
            skips.skip("EgoExoLearn row without start_sec/end_sec", repr(row)[:80])
            continue
        if not narration or end <= start:
            skips.skip("EgoExoLearn row without narration or with end <= start", repr(row)[:80])
            continue
        uid = row.get("annotation_id") or row.get("annotation_uid") or str(len(out))
        out.append(_sample(f"egoexolearn_{uid}", f"{row['video_uid']}.mp4", rng.choice(tpl), _sentence(narration),
                           "egoexolearn", start, end))
    return out


CONVERTERS: dict[str, Callable] = {"egtea": convert_egtea, "ssv2": convert_ssv2, "egotimeqa": convert_egotimeqa,
                                   "openeqa": convert_openeqa, "egoexolearn": convert_egoexolearn}


def convert_source(source: str, src: str, out_path: str, *, seed: int = 0, skips: SkipLog | None = None,
                   **kwargs) -> int:
    """Convert one source's annotations into conversation JSON at `out_path`; returns the sample count.

    Video paths in the output are relative to that source's video folder: build EgoIT with one `--src`
    root per source folder, or prefix them (`video_prefix=`) to share one data root.
    """
    if source not in CONVERTERS:
        raise ValueError(f"unknown EgoIT source {source!r}; choose one of {SOURCES}")
    skips = skips if skips is not None else SkipLog()
    prefix = kwargs.pop("video_prefix", "")
    rng = random.Random(f"{source}:{seed}")
    items = CONVERTERS[source](src, rng, templates()[source], skips, **kwargs)
    for item in items:
        item["video"] = os.path.join(prefix, item["video"]) if prefix else item["video"]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(items, f, ensure_ascii=False, indent=1)
    return len(items)
