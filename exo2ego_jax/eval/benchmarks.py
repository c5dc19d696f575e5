"""The eight egocentric benchmarks: loaders of the official files, and their metrics.

Every loader reads the benchmark's own files under its data root (layouts below, DATA_AND_BENCHMARKS §7) and
returns `Item`s; the runner (`eval/runner.py`) turns items into predictions; `metrics(predictions, items)`
gives the numbers in percent. Items whose video is missing are counted and reported, never scored as wrong
silently. Layouts (relative to the benchmark's data root):

  egoschema        questions.json, subset_answers.json, videos/<q_uid>.mp4
  qaego4d          annotations.QaEgo4D_test_close.json, annotations.QaEgo4D_test.json, videos/<video_id>.mp4
  egotaskqa        egotaskqa_direct.json, egotaskqa_indirect.json (5-option format), qa_videos/<video_path>
  charades_ego     CharadesEgo/CharadesEgo_v1_test_only1st.csv, CharadesEgo/Charades_v1_classes.txt,
                   CharadesEgo_v1_480/<id>.mp4
  ek100_mir        EPIC_100_retrieval_test.csv, EPIC_100_retrieval_test_sentence.csv,
                   caption_relevancy_EPIC_100_retrieval_test.pkl, videos/<participant>/<video_id>.MP4
  egoplan          EgoPlan_validation.json, videos/<video_id>.mp4 or rgb_frames/<video_id>/frame_%010d.jpg
  vln_qa           egocentric_navigation.json, video/vlnqa/<video>
  egomcq           egomcq.json, videos/<video_uid>.mp4 (or 600 s chunks videos/<video_uid>/<chunk>.mp4)
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
import random
import re
import string
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np

from exo2ego_jax.data.files import read_json, read_text
from exo2ego_jax.errors import DataError
from exo2ego_jax.eval.metrics import mir_metrics, multilabel_map

# The paper's numbers (DATA_AND_BENCHMARKS §7; Avg = mean of the ten AVG_METRICS).
PAPER = {"egoschema": 61.3, "qaego4d_closed": 62.1, "qaego4d_open_acc": 28.3, "qaego4d_open_score": 2.7,
         "egotaskqa_direct": 44.7, "egotaskqa_indirect": 50.3, "charades_ego_map": 70.9, "ek100_mir_map": 49.7,
         "ek100_mir_ndcg": 63.6, "egoplan": 42.7, "vln_qa": 44.5, "egomcq_inter": 88.4, "egomcq_intra": 41.2}
AVG_METRICS = ("egoschema", "qaego4d_closed", "egotaskqa_direct", "egotaskqa_indirect", "charades_ego_map",
               "ek100_mir_map", "egoplan", "vln_qa", "egomcq_inter", "egomcq_intra")
PAPER_AVG = 55.6
QAEGO4D_SEEDS = (0, 1111, 2222, 3333, 4444)


@dataclasses.dataclass
class Item:
    uid: str
    video: str                                  # absolute path of a video file or a frame folder
    question: str
    options: Sequence[str] = ()
    answer: Any = None                          # option index, answer text, or label indices
    start: float | None = None
    end: float | None = None
    frame_indices: list[int] | None = None   # explicit frames (EgoPlan)
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str              # mcq | open | multilabel | retrieval
    mode: str              # default scoring: generate | loglik
    style: str             # prompt style for generate mode
    load: Callable[..., list]
    metrics: Callable[..., dict]


def _limit(items: list, max_items: int) -> list:
    return items[:max_items] if max_items and max_items > 0 else items


def accuracy(predictions: Sequence[dict], items_by_uid: dict, *, name: str) -> dict:
    scored = [p for p in predictions if items_by_uid[p["uid"]].answer is not None]
    if not scored:
        return {name: float("nan"), f"{name}_n": 0}
    correct = sum(int(p["pred"] == items_by_uid[p["uid"]].answer) for p in scored)
    return {name: 100.0 * correct / len(scored), f"{name}_n": len(scored)}


def _accuracy_metric(name):
    return lambda preds, items, **_: accuracy(preds, {i.uid: i for i in items}, name=name)


# -------------------------------------------------------------------------------------------- EgoSchema

def load_egoschema(root: str, *, max_items: int = 0, subset_only: bool = True, **_) -> list[Item]:
    questions = read_json(os.path.join(root, "questions.json"), "EgoSchema questions.json")
    answers_path = os.path.join(root, "subset_answers.json")
    answers = read_json(answers_path, "EgoSchema subset_answers.json") if os.path.exists(answers_path) else {}
    items = []
    for q in questions:
        if subset_only and q["q_uid"] not in answers:
            continue
        options = [q[f"option {k}"] for k in range(5)]
        items.append(Item(q["q_uid"], os.path.join(root, "videos", f"{q['q_uid']}.mp4"), q.get("question", ""),
                          options, answers.get(q["q_uid"])))
    return _limit(items, max_items)


def egoschema_metrics(preds, items, *, out_dir: str = "", **_) -> dict:
    if out_dir:  # the full-set submission (q_uid -> option), for Kaggle / the validation server
        with open(os.path.join(out_dir, "egoschema_submission.json"), "w") as f:
            json.dump({p["uid"]: int(p["pred"]) for p in preds}, f)
        with open(os.path.join(out_dir, "egoschema_submission.csv"), "w") as f:
            f.write("q_uid,answer\n" + "".join(f"{p['uid']},{int(p['pred'])}\n" for p in preds))
    return accuracy(preds, {i.uid: i for i in items}, name="egoschema")


# --------------------------------------------------------------------------------------------- QAEgo4D

def load_qaego4d_closed(root: str, *, max_items: int = 0, seeds: Sequence[int] = QAEGO4D_SEEDS, **_) -> list[Item]:
    data = read_json(os.path.join(root, "annotations.QaEgo4D_test_close.json"), "QAEgo4D closed annotations")
    items = []
    for rec in _limit(data, max_items):
        for seed in seeds:  # GroundVQA: shuffle([answer] + wrong_answers) per seed, accuracy averaged over seeds
            options = [rec["answer"]] + list(rec["wrong_answers"])
            order = list(range(len(options)))
            random.Random(f"{seed}:{rec['sample_id']}").shuffle(order)
            items.append(Item(f"{rec['sample_id']}#{seed}", os.path.join(root, "videos", f"{rec['video_id']}.mp4"),
                              rec["question"], [options[k] for k in order], order.index(0), meta={"seed": seed}))
    return items


def load_qaego4d_open(root: str, *, max_items: int = 0, **_) -> list[Item]:
    data = read_json(os.path.join(root, "annotations.QaEgo4D_test.json"), "QAEgo4D open annotations")
    return [Item(rec["sample_id"], os.path.join(root, "videos", f"{rec['video_id']}.mp4"), rec["question"],
                 answer=rec["answer"]) for rec in _limit(data, max_items)]


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens of the normalised strings (longest common subsequence)."""
    a, b = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not a or not b:
        return 0.0
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def qaego4d_open_metrics(preds, items, *, judge: Callable | None = None, **_) -> dict:
    """EM and ROUGE-L; with a judge (question, answer, prediction) -> {'pred': 'yes'|'no', 'score': 0-5}, the
    Video-ChatGPT-style Acc / Score the paper reports."""
    by_uid = {i.uid: i for i in items}
    em = [normalize_answer(p["pred"]) == normalize_answer(by_uid[p["uid"]].answer) for p in preds]
    rl = [rouge_l(p["pred"], by_uid[p["uid"]].answer) for p in preds]
    out = {"qaego4d_open_em": 100.0 * float(np.mean(em)) if em else float("nan"),
           "qaego4d_open_rougeL": 100.0 * float(np.mean(rl)) if rl else float("nan"), "qaego4d_open_n": len(preds)}
    if judge is not None and preds:
        verdicts = [judge(by_uid[p["uid"]].question, by_uid[p["uid"]].answer, p["pred"]) for p in preds]
        out["qaego4d_open_acc"] = 100.0 * float(np.mean([v["pred"] == "yes" for v in verdicts]))
        out["qaego4d_open_score"] = float(np.mean([float(v["score"]) for v in verdicts]))
    return out


# -------------------------------------------------------------------------------------------- EgoTaskQA

def _load_egotaskqa(root: str, split: str, *, max_items: int = 0, **_) -> list[Item]:
    data = read_json(os.path.join(root, f"egotaskqa_{split}.json"), f"EgoTaskQA {split} file")
    items = []
    for k, rec in enumerate(_limit(data, max_items)):
        letters = sorted(rec["option"])
        items.append(Item(str(rec.get("question_id", f"{split}_{k}")), os.path.join(root, "qa_videos",
                          rec["video_path"]), rec["q"], [rec["option"][x] for x in letters], letters.index(rec["a"])))
    return items


# ----------------------------------------------------------------------------------------- Charades-Ego

CHARADES_QUESTION = "Which activity is the person doing in this video?"


def load_charades_ego(root: str, *, max_items: int = 0, **_) -> list[Item]:
    base = os.path.join(root, "CharadesEgo")
    classes = []
    for line in read_text(os.path.join(base, "Charades_v1_classes.txt"), "Charades classes").splitlines():
        if line.strip():
            classes.append((line[:4], line[5:].strip()))
    index = {cid: k for k, (cid, _) in enumerate(classes)}
    rows = csv.DictReader(read_text(os.path.join(base, "CharadesEgo_v1_test_only1st.csv"), "Charades-Ego csv")
                          .splitlines())
    items = []
    for row in rows:
        labels = sorted({index[a.split()[0]] for a in (row.get("actions") or "").split(";") if a.strip()})
        items.append(Item(row["id"], os.path.join(root, "CharadesEgo_v1_480", f"{row['id']}.mp4"), CHARADES_QUESTION,
                          [name for _, name in classes], labels))
    return _limit(items, max_items)


def charades_metrics(preds, items, **_) -> dict:
    """Video-level mAP over classes with at least one positive (per-class scores = option log-likelihoods)."""
    by_uid = {i.uid: i for i in items}
    scores = np.asarray([p["scores"] for p in preds], np.float64)
    labels = np.zeros_like(scores)
    for r, p in enumerate(preds):
        labels[r, by_uid[p["uid"]].answer] = 1
    return {"charades_ego_map": 100.0 * multilabel_map(scores, labels), "charades_ego_n": len(preds)}


# --------------------------------------------------------------------------------------------- EK-100 MIR

def _seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def load_ek100_mir(root: str, *, max_items: int = 0, max_sentences: int = 0, **_) -> list[Item]:
    """Clips x sentences; each item's options are the sentences (similarity = option log-likelihood)."""
    clips = list(csv.DictReader(read_text(os.path.join(root, "EPIC_100_retrieval_test.csv"), "EK-100 MIR csv")
                                .splitlines()))
    sentences = list(csv.DictReader(read_text(os.path.join(root, "EPIC_100_retrieval_test_sentence.csv"),
                                              "EK-100 MIR sentence csv").splitlines()))
    with open(os.path.join(root, "caption_relevancy_EPIC_100_retrieval_test.pkl"), "rb") as f:
        relevancy = np.asarray(pickle.load(f))
    if relevancy.shape != (len(clips), len(sentences)):
        raise ValueError(f"EK-100 relevancy is {relevancy.shape}, expected ({len(clips)}, {len(sentences)}) from the "
                         "two csv files; use the matching pkl")
    rows = list(range(len(clips)))[:max_items or None]
    cols = list(range(len(sentences)))[:max_sentences or None]
    texts = [sentences[j]["narration"] for j in cols]
    return [Item(clips[i]["narration_id"], os.path.join(root, "videos", clips[i]["participant_id"],
                                                        f"{clips[i]['video_id']}.MP4"),
                 "Describe what the camera wearer is doing.", texts, None, _seconds(clips[i]["start_timestamp"]),
                 _seconds(clips[i]["stop_timestamp"]), meta={"relevancy": relevancy[i, cols].tolist()})
            for i in rows]


def ek100_metrics(preds, items, **_) -> dict:
    by_uid = {i.uid: i for i in items}
    sim = np.asarray([p["scores"] for p in preds], np.float64)
    rel = np.asarray([by_uid[p["uid"]].meta["relevancy"] for p in preds], np.float64)
    m = mir_metrics(sim, rel)
    return {"ek100_mir_map": 100.0 * m["map_avg"], "ek100_mir_ndcg": 100.0 * m["ndcg_avg"],
            **{f"ek100_mir_{k}": 100.0 * v for k, v in m.items() if k not in ("map_avg", "ndcg_avg")},
            "ek100_mir_n": len(preds)}


# ----------------------------------------------------------------------------------------------- EgoPlan

def egoplan_frames(rec: dict, num_frames: int) -> list[int]:
    """EgoPlan's rule: num_frames - 1 frames evenly from the first progress start to the observation frame,
    then the observation frame (repeated when there is no progress metadata)."""
    obs = int(rec["current_observation_frame"])
    progress = rec.get("task_progress_metadata") or []
    if not progress:
        return [obs] * num_frames
    first = int(progress[0]["start_frame"])
    return [int(round(x)) for x in np.linspace(first, obs, num_frames - 1, endpoint=False)] + [obs]


def load_egoplan(root: str, *, max_items: int = 0, num_frames: int = 16, **_) -> list[Item]:
    data = read_json(os.path.join(root, "EgoPlan_validation.json"), "EgoPlan_validation.json")
    items = []
    for rec in _limit(data, max_items):
        frames_dir = os.path.join(root, "rgb_frames", rec["video_id"])
        video = frames_dir if os.path.isdir(frames_dir) else os.path.join(root, "videos", f"{rec['video_id']}.mp4")
        options = [rec[f"choice_{x}"] for x in "abcd"]
        items.append(Item(str(rec["sample_id"]), video, rec["question"], options,
                          "ABCD".index(rec["golden_choice_idx"]), frame_indices=egoplan_frames(rec, num_frames)))
    return items


# ------------------------------------------------------------------------------------------------ VLN-QA

def load_vln_qa(root: str, *, max_items: int = 0, **_) -> list[Item]:
    data = read_json(os.path.join(root, "egocentric_navigation.json"), "MVBench egocentric_navigation.json")
    items = []
    for k, rec in enumerate(_limit(data, max_items)):
        if rec["answer"] not in rec["candidates"]:
            raise ValueError(f"VLN-QA item {k}: answer {rec['answer']!r} is not one of its candidates")
        items.append(Item(f"vlnqa_{k}", os.path.join(root, "video", "vlnqa", rec["video"]), rec["question"],
                          list(rec["candidates"]), rec["candidates"].index(rec["answer"])))
    return items


# ------------------------------------------------------------------------------------------------ EgoMCQ

EGOMCQ_QUESTION = "Which of the following best describes what the camera wearer does in this video?"


def clean_narration(text: str) -> str:
    """EgoClip narrations: strip the '#C C' / '#O' tags (LaViLa-style)."""
    text = text.replace("#C C ", "").replace("#C ", "").replace("#O ", "").replace("#Unsure", "").strip()
    return text[:1].upper() + text[1:]


def _egomcq_video(root: str, clip: dict) -> tuple[str, float, float]:
    whole = os.path.join(root, "videos", f"{clip['video_uid']}.mp4")
    start, end = float(clip["clip_start"]), float(clip["clip_end"])
    if os.path.exists(whole):
        return whole, start, end
    chunk = int(start // 600)  # EgoVLP's 600 s chunks
    return os.path.join(root, "videos", clip["video_uid"], f"{chunk}.mp4"), start - 600 * chunk, end - 600 * chunk


def load_egomcq(root: str, *, max_items: int = 0, **_) -> list[Item]:
    """One clip (the answer's) with the five candidate texts; types: 2 = inter, 1 = intra (the official metric)."""
    data = read_json(os.path.join(root, "egomcq.json"), "egomcq.json")
    items = []
    for key in sorted(data, key=lambda k: int(k)):
        rec = data[key]
        choices = [rec["choices"][str(k)] for k in range(len(rec["choices"]))]
        answer = int(rec["answer"])
        video, start, end = _egomcq_video(root, choices[answer])
        items.append(Item(f"egomcq_{key}", video, EGOMCQ_QUESTION, [clean_narration(c["clip_text"]) for c in choices],
                          answer, start, end, meta={"type": int(rec["types"])}))
    return _limit(items, max_items)


def egomcq_metrics(preds, items, **_) -> dict:
    by_uid = {i.uid: i for i in items}
    out = {}
    for name, code in (("egomcq_inter", 2), ("egomcq_intra", 1)):
        subset = [p for p in preds if by_uid[p["uid"]].meta["type"] == code]
        out.update(accuracy(subset, by_uid, name=name) if subset else {name: float("nan"), f"{name}_n": 0})
    return out


# ------------------------------------------------------------------------------- generic MCQ (the demo's)

def load_mcq_json(root: str, *, max_items: int = 0, file: str = "mcq_val.json", video_key: str = "video",
                  **_) -> list[Item]:
    """`[{"uid", "video", "start", "end", "question", "options", "answer"}]` with videos relative to root;
    `video_key` picks another clip field (the synthetic items' `exo_video`). Missing fields are left empty for
    `item_problem` to report."""
    data = read_json(os.path.join(root, file), "MCQ json")
    if not isinstance(data, list):
        raise DataError(f"MCQ json {os.path.join(root, file)!r} must be a list of items, got {type(data).__name__}")
    items = []
    for k, r in enumerate(data):
        r = r if isinstance(r, dict) else {}
        video = r.get(video_key)
        items.append(Item(str(r.get("uid", f"item_{k}")), os.path.join(root, video) if isinstance(video, str) else "",
                          str(r.get("question", "")), r.get("options"), r.get("answer"), r.get("start"), r.get("end")))
    return _limit(items, max_items)


def item_problem(item: Item, kind: str, root: str) -> str | None:
    """Why an item cannot be scored (a malformed annotation), or None."""
    if not item.video:
        return "no video path"
    # lexical, like data.video.safe_join: `..` may not leave the root, a symlinked folder inside it is inside it
    root_abs = os.path.abspath(root)
    if os.path.commonpath([root_abs, os.path.normpath(os.path.abspath(item.video))]) != root_abs:
        return f"video path {item.video!r} is outside the data root {root!r}"
    if kind in ("mcq", "multilabel", "retrieval"):
        options = item.options
        if not isinstance(options, (list, tuple)) or not options or not all(isinstance(o, str) for o in options):
            return "no options (a non-empty list of texts)"
    if kind == "mcq" and item.answer is not None:
        if isinstance(item.answer, bool) or not isinstance(item.answer, (int, np.integer)):
            return f"answer {item.answer!r} is not an option index (a 0-based integer)"
        if not 0 <= int(item.answer) < len(item.options):
            return f"answer index {item.answer} is outside the {len(item.options)} options"
    return None


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("egoschema", "mcq", "generate", "egoschema", load_egoschema, egoschema_metrics),
    Benchmark("qaego4d_closed", "mcq", "generate", "mvbench", load_qaego4d_closed, _accuracy_metric("qaego4d_closed")),
    Benchmark("qaego4d_open", "open", "generate", "open", load_qaego4d_open, qaego4d_open_metrics),
    Benchmark("egotaskqa_direct", "mcq", "generate", "mvbench", lambda r, **k: _load_egotaskqa(r, "direct", **k),
              _accuracy_metric("egotaskqa_direct")),
    Benchmark("egotaskqa_indirect", "mcq", "generate", "mvbench", lambda r, **k: _load_egotaskqa(r, "indirect", **k),
              _accuracy_metric("egotaskqa_indirect")),
    Benchmark("charades_ego", "multilabel", "loglik", "open", load_charades_ego, charades_metrics),
    Benchmark("ek100_mir", "retrieval", "loglik", "open", load_ek100_mir, ek100_metrics),
    Benchmark("egoplan", "mcq", "loglik", "mvbench", load_egoplan, _accuracy_metric("egoplan")),
    Benchmark("vln_qa", "mcq", "generate", "mvbench", load_vln_qa, _accuracy_metric("vln_qa")),
    Benchmark("egomcq", "mcq", "generate", "mvbench", load_egomcq, egomcq_metrics),
    Benchmark("mcq_json", "mcq", "loglik", "mvbench", load_mcq_json, _accuracy_metric("mcq_json")),
)}
# Data-root folder of each benchmark under --data_root (egotaskqa's two splits share one folder).
DATA_DIRS = {"egotaskqa_direct": "egotaskqa", "egotaskqa_indirect": "egotaskqa", "qaego4d_closed": "qaego4d",
             "qaego4d_open": "qaego4d"}
PAPER_SUITE = ("egoschema", "qaego4d_closed", "qaego4d_open", "egotaskqa_direct", "egotaskqa_indirect",
               "charades_ego", "ek100_mir", "egoplan", "vln_qa", "egomcq")


def average(metrics: dict) -> float | None:
    """The paper's Avg (mean of the ten sub-metrics); None until all ten are present."""
    values = [metrics.get(k) for k in AVG_METRICS]
    if any(v is None or v != v for v in values):
        return None
    return float(np.mean(values))
