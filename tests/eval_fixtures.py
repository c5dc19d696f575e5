"""A few hand-made items per benchmark in the official file formats, with tiny coded videos; and a tiny
Exo2Ego checkpoint (random weights, a trained BPE tokenizer) to run them on."""
from __future__ import annotations

import csv
import json
import os
import pickle

import numpy as np

from data_fixtures import coded_frames
from exo2ego_jax.data.video import write_video

OPTIONS5 = ["cuts the onion", "opens the tap", "washes a cup", "closes the door", "reads a book"]


def _video(path: str, frames: int = 40, offset: int = 0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_video(path, coded_frames(frames, 32, 32, offset=offset), fps=30)


def _dump(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def _csv(path: str, header: list, rows: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_all(root: str) -> dict:
    """Every benchmark's folder under `root`; returns expected facts per benchmark."""
    facts = {}
    # EgoSchema: 3 questions, 2 with subset answers
    d = os.path.join(root, "egoschema")
    qs = [{"q_uid": f"q{k}", "google_drive_id": "x", "question": f"What does c do first ({k})?",
           **{f"option {i}": o for i, o in enumerate(OPTIONS5)}} for k in range(3)]
    _dump(os.path.join(d, "questions.json"), qs)
    _dump(os.path.join(d, "subset_answers.json"), {"q0": 1, "q2": 4})
    for k in range(3):
        _video(os.path.join(d, "videos", f"q{k}.mp4"))
    facts["egoschema"] = {"items": 2, "answers": [1, 4]}
    # QAEgo4D closed and open
    d = os.path.join(root, "qaego4d")
    recs = [{"video_id": "v1", "sample_id": "s1_0", "question": "Where did I put the cup?", "answer": "on the table",
             "wrong_answers": ["in the sink", "on the shelf", "in the bag"], "moment_start_frame": 3,
             "moment_end_frame": 9},
            {"video_id": "v2", "sample_id": "s2_0", "question": "What did I cut?", "answer": "an onion",
             "wrong_answers": ["a carrot", "bread", "a tomato"], "moment_start_frame": 1, "moment_end_frame": 5}]
    _dump(os.path.join(d, "annotations.QaEgo4D_test_close.json"), recs)
    _dump(os.path.join(d, "annotations.QaEgo4D_test.json"),
          [{k: v for k, v in r.items() if k != "wrong_answers"} for r in recs])
    _video(os.path.join(d, "videos", "v1.mp4"))
    _video(os.path.join(d, "videos", "v2.mp4"))
    facts["qaego4d_closed"] = {"items": 10}
    # EgoTaskQA (5-option format), direct and indirect
    d = os.path.join(root, "egotaskqa")
    for split, answer in (("direct", "C"), ("indirect", "A")):
        _dump(os.path.join(d, f"egotaskqa_{split}.json"), [
            {"q": "What is the status of the fridge before the person opens it?", "video_path": "27k|P1|1|40.mp4",
             "a": answer, "option": {"A": "open", "B": "broken", "C": "closed", "D": "empty", "E": "moving"}}])
    _video(os.path.join(d, "qa_videos", "27k|P1|1|40.mp4"))
    # Charades-Ego: 3 classes, 2 videos
    d = os.path.join(root, "charades_ego")
    os.makedirs(os.path.join(d, "CharadesEgo"), exist_ok=True)
    with open(os.path.join(d, "CharadesEgo", "Charades_v1_classes.txt"), "w") as f:
        f.write("c000 Holding some clothes\nc001 Putting clothes somewhere\nc002 Taking some clothes from somewhere\n")
    header = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects", "descriptions",
              "actions", "length"]
    _csv(os.path.join(d, "CharadesEgo", "CharadesEgo_v1_test_only1st.csv"), header, [
        ["005BUEGO", "P12", "Kitchen", 6, 7, "Yes", "A person...", "cup", "...", "c000 0.00 1.00;c002 0.2 0.9", 1.3],
        ["006XYEGO", "P13", "Bedroom", 6, 7, "Yes", "A person...", "cup", "...", "c001 0.00 1.00", 1.3]])
    _video(os.path.join(d, "CharadesEgo_v1_480", "005BUEGO.mp4"))
    _video(os.path.join(d, "CharadesEgo_v1_480", "006XYEGO.mp4"))
    facts["charades_ego"] = {"labels": {"005BUEGO": [0, 2], "006XYEGO": [1]}}
    # EK-100 MIR: 3 clips x 2 sentences, a JPoSE-style relevancy
    d = os.path.join(root, "ek100_mir")
    header = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
              "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun", "noun_class",
              "all_nouns", "all_noun_classes"]
    _csv(os.path.join(d, "EPIC_100_retrieval_test.csv"), header, [
        ["P01_11_5", "P01", "P01_11", "00:00:00.50", "00:00:00.20", "00:00:00.90", 6, 27, "open drawer", "open", 3,
         "drawer", 8, "['drawer']", "[8]"],
        ["P01_11_6", "P01", "P01_11", "00:00:01.00", "00:00:00.70", "00:00:01.20", 21, 36, "close drawer", "close",
         4, "drawer", 8, "['drawer']", "[8]"],
        ["P01_11_7", "P01", "P01_11", "00:00:01.10", "00:00:00.90", "00:00:01.30", 27, 39, "open tap", "open", 3,
         "tap", 9, "['tap']", "[9]"]])
    _csv(os.path.join(d, "EPIC_100_retrieval_test_sentence.csv"), ["narration_id", "narration"],
         [["P01_11_5", "open drawer"], ["P01_11_6", "close drawer"]])
    relevancy = np.array([[1.0, 0.5], [0.5, 1.0], [0.5, 0.0]])
    with open(os.path.join(d, "caption_relevancy_EPIC_100_retrieval_test.pkl"), "wb") as f:
        pickle.dump(relevancy, f)
    _video(os.path.join(d, "videos", "P01", "P01_11.MP4"))
    facts["ek100_mir"] = {"relevancy": relevancy}
    # EgoPlan-Val: one Ego4D mp4, one EPIC frame folder
    d = os.path.join(root, "egoplan")
    base = {"task_goal": "make tea", "question": "Considering the progress shown in the video and my current "
            "observation in the last frame, what action should I take next in order to make tea?",
            "choice_a": "pour water into the mug", "choice_b": "open the fridge", "choice_c": "wash the knife",
            "choice_d": "close the tap"}
    _dump(os.path.join(d, "EgoPlan_validation.json"), [
        {"sample_id": 1024, "video_source": "Ego4D", "video_id": "e4d", "golden_choice_idx": "A",
         "answer": "pour water into the mug", "current_observation_frame": 30,
         "task_progress_metadata": [{"narration_text": "fill kettle", "start_frame": 2, "stop_frame": 20}], **base},
        {"sample_id": 1025, "video_source": "EpicKitchens", "video_id": "P03_04", "golden_choice_idx": "D",
         "answer": "close the tap", "current_observation_frame": 12, "task_progress_metadata": [], **base}])
    _video(os.path.join(d, "videos", "e4d.mp4"))
    from PIL import Image
    os.makedirs(os.path.join(d, "rgb_frames", "P03_04"), exist_ok=True)
    for i, frame in enumerate(coded_frames(20, 32, 32)):
        Image.fromarray(frame).save(os.path.join(d, "rgb_frames", "P03_04", f"frame_{i:010d}.jpg"))
    # VLN-QA (MVBench egocentric navigation)
    d = os.path.join(root, "vln_qa")
    cands = ["Turn left and move forward", "Stop", "Move forward", "Turn right and move forward"]
    _dump(os.path.join(d, "egocentric_navigation.json"), [
        {"video": "left/4504_frame52.mp4", "question": "This is a navigation video of an agent following "
         "instruction: \"Walk past the sofa.\" What is the next action it should take?", "candidates": cands,
         "answer": "Stop"}])
    _video(os.path.join(d, "video", "vlnqa", "left", "4504_frame52.mp4"))
    # EgoMCQ: one inter (types 2), one intra (types 1) whose video is in 600 s chunks
    d = os.path.join(root, "egomcq")
    clip = lambda uid, s, e, text: {"video_uid": uid, "clip_start": s, "clip_end": e, "clip_text": text}
    _dump(os.path.join(d, "egomcq.json"), {
        "0": {"answer": 2, "types": 2, "query": clip("ab12", 0.2, 0.8, "#C C opens the tap"),
              "choices": {str(k): clip("ab12" if k == 2 else f"other{k}", 0.2, 0.8, f"#C C {o}")
                          for k, o in enumerate(OPTIONS5)}},
        "1": {"answer": 0, "types": 1, "query": clip("cd34", 600.2, 600.9, "#C C cuts the onion"),
              "choices": {str(k): clip("cd34", 600.2 + 0.1 * k, 600.9, f"#C C {o}") for k, o in enumerate(OPTIONS5)}}})
    _video(os.path.join(d, "videos", "ab12.mp4"))
    _video(os.path.join(d, "videos", "cd34", "1.mp4"))
    facts["egomcq"] = {"types": {"egomcq_0": 2, "egomcq_1": 1}}
    return facts


def tiny_checkpoint(path: str, tokenizer_dir: str, *, vocab_size: int = 512, seed: int = 0) -> str:
    """A random tiny Exo2Ego (the demo preset's shapes) exported with its tokenizer, as stage exports are."""
    import flax.linen as nn
    import jax
    from exo2ego_jax.checkpoints import copy_tokenizer_files, write_checkpoint
    from exo2ego_jax.models.exo2ego import Exo2Ego, example_inputs
    from exo2ego_jax.train.config import model_config
    from tests.helpers import stage_config
    cfg = model_config(stage_config("stage3", "demo", **{"lora.enabled": False}))
    module = Exo2Ego(cfg)
    ids, pixels = example_inputs(cfg)
    params = nn.meta.unbox(jax.jit(lambda k: module.init(k, ids, pixels, method="init_all"))(jax.random.key(seed)))
    write_checkpoint(path, params["params"], kind="exo2ego", config=cfg.to_dict(), dtype="float32")
    copy_tokenizer_files(tokenizer_dir, path)
    return path
