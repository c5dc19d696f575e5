"""Hand-made data fixtures in the official formats: tiny MP4s whose pixels encode the frame index, an
Ego-Exo4D download (two takes: one with gp01 exo cameras, one with an aria02 ego camera), EgoIT sources."""
from __future__ import annotations

import json
import os

import numpy as np

from exo2ego_jax.data.video import write_video

BITS = 8
FPS = 30


def coded_frames(num: int, height: int = 32, width: int = 64, offset: int = 0) -> np.ndarray:
    """Frame i shows i + offset in binary: BITS vertical stripes, white = 1 (robust to H.264 loss)."""
    frames = np.zeros((num, height, width, 3), np.uint8)
    stripe = width // BITS
    for i in range(num):
        value = i + offset
        for b in range(BITS):
            if (value >> b) & 1:
                frames[i, :, b * stripe:(b + 1) * stripe] = 255
    return frames


def read_code(frame: np.ndarray) -> int:
    """Inverse of coded_frames for one frame (any width that keeps the stripe layout); -1 for a black pad frame."""
    width = frame.shape[1]
    stripe = width // BITS
    bits = [frame[:, b * stripe + stripe // 4:(b + 1) * stripe - stripe // 4].mean() > 127 for b in range(BITS)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def write_coded(path: str, num: int, **kwargs) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_video(path, coded_frames(num, **kwargs), fps=FPS)
    return path


def _dump(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def ego_exo4d(root: str) -> dict:
    """Two takes of 4 s (120 frames) with frame-aligned videos; returns facts the tests assert against."""
    takes = [
        {"take_uid": "take-a", "take_name": "lab_a_1", "root_dir": "takes/lab_a_1", "duration_sec": 4.0,
         "best_exo": "gp02",
         "capture": {"cameras": [{"cam_id": "aria01", "is_ego": True}, {"cam_id": "gp01", "is_ego": False},
                                 {"cam_id": "gp02", "is_ego": False}]},
         "frame_aligned_videos": {
             "aria01": {"rgb": {"relative_path": "frame_aligned_videos/aria01_214-1.mp4"},
                        "slam-left": {"relative_path": "frame_aligned_videos/aria01_1201-1.mp4"}},
             "gp01": {"0": {"relative_path": "frame_aligned_videos/gp01.mp4"}},
             "gp02": {"0": {"relative_path": "frame_aligned_videos/gp02.mp4"}},
             "collage": {"0": {"relative_path": "frame_aligned_videos/collage.mp4"}},
             "best_exo": {"0": {"relative_path": "frame_aligned_videos/gp02.mp4"}}}},
        {"take_uid": "take-b", "take_name": "kitchen_b_2", "root_dir": "takes/kitchen_b_2", "duration_sec": 4.0,
         "best_exo": "cam01",
         "capture": {"cameras": [{"cam_id": "aria02", "is_ego": True}, {"cam_id": "cam01", "is_ego": False}]},
         "frame_aligned_videos": {
             "aria02": {"rgb": {"relative_path": "frame_aligned_videos/aria02_214-1.mp4"}},
             "cam01": {"0": {"relative_path": "frame_aligned_videos/cam01.mp4"}}}},
    ]
    # Ego videos code the frame index, exo videos code index + 128 (so a record's views tell which file fed them).
    write_coded(os.path.join(root, "takes/lab_a_1/frame_aligned_videos/aria01_214-1.mp4"), 120)
    write_coded(os.path.join(root, "takes/lab_a_1/frame_aligned_videos/gp01.mp4"), 120, offset=128)
    write_coded(os.path.join(root, "takes/lab_a_1/frame_aligned_videos/gp02.mp4"), 120, offset=128)
    write_coded(os.path.join(root, "takes/kitchen_b_2/frame_aligned_videos/aria02_214-1.mp4"), 120)
    write_coded(os.path.join(root, "takes/kitchen_b_2/frame_aligned_videos/cam01.mp4"), 120, offset=128)
    _dump(os.path.join(root, "takes.json"), takes)
    desc = lambda text, t, **kw: {"text": text, "timestamp": t, "narration_subject": "C", "ego_visible": True,
                                  "unsure": False, "best_exo": {"raw_cam_id": "2", "cam_id": "gp02"}, **kw}
    train = {"annotations": {
        "take-a": [
            {"annotation_uid": "a1", "annotator_id": "7", "rejected": False, "reject_reason": None, "descriptions": [
                desc("C picks up the wrench.", 1.0), desc("C turns the bolt.", 2.0, unsure="1"),
                desc("C puts the wrench down.", 3.0, ego_visible="0"),
                desc("O watches.", 3.5, narration_subject="O", unsure="0")]},
            {"annotation_uid": "a2", "annotator_id": "8", "rejected": True, "reject_reason": "bad",
             "descriptions": [desc("rejected text", 1.5)]}],
        "take-b": [
            {"annotation_uid": "b1", "annotator_id": "9", "rejected": "0", "reject_reason": None, "descriptions": [
                desc("C opens the fridge.", 0.05, best_exo={"raw_cam_id": "1", "cam_id": "cam01"}),
                desc("C closes the fridge.", 3.98, best_exo={"raw_cam_id": "1", "cam_id": "cam01"}),
                desc("C leaves.", 9.0)]}]}}
    val = {"annotations": {"take-b": [
        {"annotation_uid": "b2", "annotator_id": "9", "rejected": False, "reject_reason": None, "descriptions": [
            desc("C washes a cup.", 2.0, best_exo={"raw_cam_id": "1", "cam_id": "cam01"})]}]}}
    _dump(os.path.join(root, "annotations/atomic_descriptions_train.json"), train)
    _dump(os.path.join(root, "annotations/atomic_descriptions_val.json"), val)
    return {"root": root}


def egoit_sources(root: str) -> dict:
    """One tiny annotation folder per EgoIT source, in each official format."""
    paths = {}
    d = os.path.join(root, "egtea")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "action_idx.txt"), "w") as f:
        f.write("Open_fridge 1\nCut_tomato 2\n")
    with open(os.path.join(d, "train_split1.txt"), "w") as f:
        f.write("OP01-R01-PastaSalad-1002316-1004005-F024051-F024101 2 5 7\nOP01-R01-PastaSalad-1-2-F1-F2 9 1 1\n")
    paths["egtea"] = d
    d = os.path.join(root, "ssv2")
    _dump(os.path.join(d, "something-something-v2-train.json"), [
        {"id": "78687", "label": "holding potato next to bottle", "template": "Holding [something] next to "
         "[something]", "placeholders": ["potato", "bottle"]}, {"id": "5"}])
    paths["ssv2"] = d
    d = os.path.join(root, "egotimeqa")
    _dump(os.path.join(d, "annotations.EgoTimeQA.json"), [
        {"video_id": "0a1b", "sample_id": None, "question": "What did I put in the sink?", "answer": "a red bowl",
         "start_sec": 101.2, "end_sec": 109.0, "moment_start_frame": 3036, "moment_end_frame": 3270}])
    paths["egotimeqa"] = d
    d = os.path.join(root, "openeqa")
    _dump(os.path.join(d, "open-eqa-v0.json"), [
        {"question": "What colour is the sofa?", "answer": "Grey", "category": "attribute recognition",
         "question_id": "1b2c", "episode_history": "scannet-v0/012-scannet-scene0011_00"}])
    paths["openeqa"] = d
    d = os.path.join(root, "egoexolearn")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "fine_annotation_trainval_en.csv"), "w") as f:
        f.write("video_uid,annotation_id,subset,view,scene,start_sec,end_sec,narration_en,narration_en_hand_prompt,"
                "narration_en_no_hand_prompt\n"
                "bee9,Xy12,train,ego,kitchen,84.9,87.2,Right hand picks up the knife.,right hand picks up the knife,"
                "Pick up the knife.\n"
                "bee9,Xy13,train,exo,kitchen,84.9,87.2,exo row,exo row,exo row\n"
                "bee9,Xy14,val,ego,kitchen,90.0,91.0,val row,val row,val row\n")
    paths["egoexolearn"] = d
    return paths


EGO_VIDEO = "takes/t1/frame_aligned_videos/aria01_214-1.mp4"
EXO_VIDEOS = ("takes/t1/frame_aligned_videos/cam01.mp4", "takes/t1/frame_aligned_videos/cam02.mp4")


def write_egoexo4d(root: str, *, timestamps, empty_val: bool = False, duration: float = 4.0) -> str:
    """One take (an ego camera and two exo cameras, `duration` s) narrated at `timestamps` in one pass."""
    frames = int(duration * FPS)
    write_coded(os.path.join(root, EGO_VIDEO), frames)
    for path in EXO_VIDEOS:
        write_coded(os.path.join(root, path), frames, offset=128)
    rel = lambda p: p.split("/", 2)[2]
    _dump(os.path.join(root, "takes.json"), [{
        "take_uid": "t1", "take_name": "t1", "root_dir": "takes/t1", "duration_sec": duration, "best_exo": "cam01",
        "capture": {"cameras": [{"cam_id": "aria01", "is_ego": True}, {"cam_id": "cam01", "is_ego": False},
                                {"cam_id": "cam02", "is_ego": False}]},
        "frame_aligned_videos": {"aria01": {"rgb": {"relative_path": rel(EGO_VIDEO)}},
                                 "cam01": {"0": {"relative_path": rel(EXO_VIDEOS[0])}},
                                 "cam02": {"0": {"relative_path": rel(EXO_VIDEOS[1])}}}}])
    descriptions = [{"text": f"C does thing {k}.", "timestamp": t, "narration_subject": "C", "unsure": False}
                    for k, t in enumerate(timestamps)]
    passes = {"t1": [{"annotation_uid": "p1", "rejected": False, "descriptions": descriptions}]}
    _dump(os.path.join(root, "annotations/atomic_descriptions_train.json"), {"annotations": passes})
    _dump(os.path.join(root, "annotations/atomic_descriptions_val.json"),
          {"annotations": {} if empty_val else passes})
    return root


def truncate_video(path: str, keep: float = 0.3) -> None:
    """Cut a video file to its first `keep` fraction of bytes (a broken download)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])
