"""Data: frame sampling and timing, bad inputs, Ego-ExoClip windows and sync, EgoIT, template masking, records,
the resumable build, and the Grain loader (order, resume, sharding, buckets)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tests.xla_flags import cpu_devices

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_fixtures as fx
from exo2ego_jax.data import ego_exo4d, egoit, template
from exo2ego_jax.data.builders import build_dataset, build_ego_exo_clip, build_ego_it, decode_narration
from exo2ego_jax.data.records import open_records, split_sizes
from exo2ego_jax.data.skips import SkipLog
from exo2ego_jax.data.video import (DataError, VideoError, read_clip, safe_join, sample_frame_indices,
                                    uniform_indices)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def codes(frames):
    return [fx.read_code(f) for f in frames]


# ------------------------------------------------------------------------------------------ frame sampling

def test_uniform_indices_are_videollama2_segment_midpoints():
    # duration 100, 16 frames: seg = 99/16; midpoints (2i+1) * seg / 2 rounded
    assert uniform_indices(100, 16) == [3, 9, 15, 22, 28, 34, 40, 46, 53, 59, 65, 71, 77, 84, 90, 96]
    assert uniform_indices(5, 8) == [0, 1, 1, 2, 2, 3, 3, 4]  # short windows repeat frames, as the reference
    # window [1.0, 2.0] s at 30 fps: frames max(int(30) - 1, 0) = 29 ... int(60) - 1 = 59
    assert sample_frame_indices(300, 30.0, 4, 1.0, 2.0) == [29 + i for i in uniform_indices(31, 4)]


def test_read_clip_returns_the_frames_of_the_window(tmp_path):
    path = fx.write_coded(str(tmp_path / "v.mp4"), 90)
    frames, meta = read_clip(path, 8, 1.0, 2.0)
    assert frames.shape == (8, 32, 64, 3) and frames.dtype == np.uint8 and meta["padded"] == 0
    assert meta["indices"] == [31, 35, 38, 42, 46, 50, 53, 57]  # 29 + round(3.75 i + 1.875)
    assert codes(frames) == meta["indices"]
    whole, meta = read_clip(path, 4)
    assert codes(whole) == meta["indices"] == [11, 33, 56, 78]


def test_short_window_repeats_and_truncated_stream_pads_black(tmp_path):
    path = fx.write_coded(str(tmp_path / "v.mp4"), 90)
    frames, meta = read_clip(path, 8, 1.0, 1.1)  # frames 29..32: fewer than 8
    assert codes(frames) == meta["indices"] == [29, 30, 30, 30, 31, 31, 31, 32]
    assert meta["padded"] == 0
    # A stream cut short (moov atom first, media data truncated): the missing tail is padded with black frames.
    import av
    fs = str(tmp_path / "faststart.mp4")
    with av.open(fs, mode="w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.options = {"crf": "12", "preset": "ultrafast", "g": "8"}
        for f in fx.coded_frames(90):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = open(fs, "rb").read()
    cut = str(tmp_path / "cut.mp4")
    open(cut, "wb").write(data[:int(len(data) * 0.6)])
    frames, meta = read_clip(cut, 16)
    assert meta["padded"] > 0
    got = codes(frames)
    assert got[:16 - meta["padded"]] == meta["indices"][:16 - meta["padded"]]
    assert not frames[16 - meta["padded"]:].any()  # black


def test_bad_videos_raise_errors_naming_the_file(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        read_clip(str(tmp_path / "missing.mp4"), 4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="0-byte"):
        read_clip(str(empty), 4)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(VideoError, match="garbage.mp4.*corrupt"):
        read_clip(str(garbage), 4)
    path = fx.write_coded(str(tmp_path / "v.mp4"), 30)
    truncated = tmp_path / "truncated.mp4"  # moov atom at the end is gone: cannot be opened
    truncated.write_bytes(open(path, "rb").read()[:2000])
    with pytest.raises(VideoError, match="truncated.mp4"):
        read_clip(str(truncated), 4)
    with pytest.raises(VideoError, match="starts after the end"):
        read_clip(path, 4, 5.0, 6.0)


def test_paths_that_escape_the_data_root_are_rejected(tmp_path):
    assert safe_join(str(tmp_path), "a/b.mp4") == os.path.join(os.path.abspath(tmp_path), "a/b.mp4")
    # a symlinked folder inside the root is inside it, wherever it points
    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "elsewhere", root / "takes")
    assert safe_join(str(root), "takes/x.mp4") == os.path.join(str(root), "takes", "x.mp4")
    # and evaluation items under it are inside the data root too
    from exo2ego_jax.eval.benchmarks import Item, item_problem
    inside = Item("u", os.path.join(str(root), "takes", "x.mp4"), "q?", ["a", "b"], 0, None, None)
    outside = Item("u", os.path.join(str(root), "..", "x.mp4"), "q?", ["a", "b"], 0, None, None)
    assert item_problem(inside, "mcq", str(root)) is None
    assert "outside the data root" in item_problem(outside, "mcq", str(root))
    for bad in ("../secret.mp4", "a/../../x.mp4", "/etc/passwd"):
        with pytest.raises(DataError, match="data root|absolute"):
            safe_join(str(tmp_path), bad)


def test_clip_preprocessing_matches_the_clip_image_processor():
    from transformers import CLIPImageProcessorPil
    from exo2ego_jax.data.preprocess import CLIP_MEAN_RGB, clip_frames, expand_to_square
    rng = np.random.default_rng(0)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    mean, std = np.asarray(proc.image_mean), np.asarray(proc.image_std)
    for shape in ((3, 45, 70, 3), (2, 70, 45, 3), (1, 24, 24, 3)):
        frames = rng.integers(0, 256, shape, dtype=np.uint8)
        ref = proc(list(frames), return_tensors="np")["pixel_values"]
        ours = ((clip_frames(frames, 24).astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(ours, ref, atol=1e-5)
        # pad mode = VideoLLaMA2's expand2square (mean colour) followed by the same processor
        ref_pad = proc([expand_to_square(f) for f in frames], return_tensors="np")["pixel_values"]
        ours_pad = ((clip_frames(frames, 24, "pad").astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(ours_pad, ref_pad, atol=1e-5)
    square = expand_to_square(np.zeros((2, 4, 3), np.uint8))
    assert square.shape == (4, 4, 3) and tuple(square[0, 0]) == CLIP_MEAN_RGB and not square[1:3].any()


# ------------------------------------------------------------------------------------------- Ego-ExoClip

def test_flags_are_normalised_and_bad_ones_named():
    assert [ego_exo4d.to_bool(v, field="f") for v in (True, False, "1", "0", 1, 0, None, "true")] == \
        [True, False, True, False, True, False, False, True]
    with pytest.raises(DataError, match="'unsure'.*maybe"):
        ego_exo4d.to_bool("maybe", field="unsure")


def test_egoclip_window_matches_the_egovlp_worked_row():
    # EgoVLP's worked row: narration 3.3445 -> clip 2.9677-3.7213 with beta/(2 alpha) = 0.3768
    start, end = ego_exo4d.egoclip_window(3.3445, beta=0.3768 * 2 * 4.9)
    assert (round(start, 4), round(end, 4)) == (2.9677, 3.7213)


@pytest.fixture(scope="module")
def egoexo(tmp_path_factory):
    return fx.ego_exo4d(str(tmp_path_factory.mktemp("egoexo4d")))


def test_plan_windows_filters_and_skips(egoexo):
    skips = SkipLog()
    plan = ego_exo4d.plan_narrations(egoexo["root"], skips=skips)
    by_text = {n.text: n for n in plan}
    assert sorted(by_text) == ["C closes the fridge.", "C opens the fridge.", "C picks up the wrench.",
                               "C puts the wrench down.", "C washes a cup.", "O watches."]
    beta_a = (3.5 - 1.0) / 3  # mean gap of pass a1 (the unsure description still marks time)
    n = by_text["C picks up the wrench."]
    assert n.start == pytest.approx(1.0 - beta_a / 9.8) and n.end == pytest.approx(1.0 + beta_a / 9.8)
    assert [c for c, _ in n.exo_videos] == ["gp01", "gp02"] and n.best_exo == "gp02"
    assert n.ego_video == "takes/lab_a_1/frame_aligned_videos/aria01_214-1.mp4"
    beta_b = 3.98 - 0.05  # "C leaves." at 9.0 s lies past the 4 s take: skipped, and no part of beta
    assert by_text["C opens the fridge."].start == 0.0  # clamped at the take start
    assert by_text["C opens the fridge."].end == pytest.approx(0.05 + beta_b / 9.8)
    assert by_text["C closes the fridge."].end == 4.0  # clamped at duration_sec
    assert by_text["C closes the fridge."].ego_video.endswith("aria02_214-1.mp4")
    # single-description pass: the mean beta over passes
    cup = by_text["C washes a cup."]
    assert cup.split == "val" and cup.end - cup.start == pytest.approx((beta_a + beta_b) / 2 / 4.9)
    assert skips.counts == {"rejected annotation pass": 1, "unsure description": 1, "timestamp outside the take": 1}
    strict = ego_exo4d.plan_narrations(egoexo["root"], filters=ego_exo4d.Filters(
        subject="C", require_ego_visible=True, best_exo_only=True))
    assert sorted(n.text for n in strict) == ["C closes the fridge.", "C opens the fridge.", "C picks up the wrench.",
                                              "C washes a cup."]
    assert all(len(n.exo_videos) == 1 for n in strict)
    assert ego_exo4d.plan_narrations(egoexo["root"], video_subdir="downscaled/448")[0].ego_video.endswith(
        "frame_aligned_videos/downscaled/448/aria01_214-1.mp4")


def test_a_corrupt_record_file_is_named_with_the_fix(egoexo, tmp_path):
    from exo2ego_jax.data.records import records_dir
    summary = build_ego_exo_clip(egoexo["root"], str(tmp_path), num_frames=4, store_size=32, show_progress=False)
    folder = records_dir(summary["path"])
    shards = [os.path.join(folder, f) for f in os.listdir(folder) if "array_record" in f and "train" in f]
    for shard in shards:  # a copy cut short, or bytes flipped by a bad disk
        data = open(shard, "rb").read()
        with open(shard, "wb") as f:
            f.write(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"records at .*(cannot be opened|cannot be read).*corrupt or truncated.*--restart"):
        source = open_records(summary["path"], "train")
        for i in range(len(source)):
            source[i]


def test_ego_exo_clip_records_are_synchronised(egoexo, tmp_path):
    summary = build_ego_exo_clip(egoexo["root"], str(tmp_path), num_frames=4, store_size=32, show_progress=False)
    assert summary["written"] == {"train": 8, "val": 1}  # (3 narrations x 2 cams) + (2 x 1); val 1
    assert summary["skipped"]["rejected annotation pass"]["count"] == 1
    train = open_records(os.path.join(str(tmp_path), "ego_exo_clip"), "train")
    seen = set()
    for i in range(len(train)):
        r = train[i]
        ego, exo = codes(r["ego_frames"]), codes(r["exo_frames"])
        start, end = float(r["start"]), float(r["end"])
        expected = sample_frame_indices(120, 30.0, 4, start, end)
        assert ego == expected, r["uid"]               # the window's frames of the ego video
        assert exo == [c + 128 for c in ego]            # the same instants in the exo video
        seen.add((r["text"].decode(), r["exo_cam"].decode(), bool(r["is_best_exo"])))
    assert ("C picks up the wrench.", "gp02", True) in seen and ("C picks up the wrench.", "gp01", False) in seen
    wrench = [train[i] for i in range(len(train)) if train[i]["text"] == b"C picks up the wrench."][0]
    assert codes(wrench["ego_frames"]) == [27, 28, 29, 30]  # frames 26..31 of [0.915, 1.085] s, 4 midpoints


def test_missing_and_corrupt_videos_are_counted_skips(egoexo, tmp_path):
    import shutil
    root = str(tmp_path / "copy")
    shutil.copytree(egoexo["root"], root)
    os.remove(os.path.join(root, "takes/lab_a_1/frame_aligned_videos/gp01.mp4"))
    open(os.path.join(root, "takes/kitchen_b_2/frame_aligned_videos/cam01.mp4"), "wb").close()
    summary = build_ego_exo_clip(root, str(tmp_path / "out"), num_frames=4, store_size=32, show_progress=False)
    assert summary["written"] == {"train": 3}
    assert summary["skipped"]["missing video"]["count"] == 3
    assert summary["skipped"]["empty video file"]["count"] == 3
    assert "gp01.mp4" in summary["skipped"]["missing video"]["examples"][0]


def test_build_resumes_after_an_interruption(egoexo, tmp_path):
    units = ego_exo4d.plan_narrations(egoexo["root"])
    settings = {"test": 1}
    calls = []

    def decode(item, fail_at=None):
        calls.append(item.uid)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return decode_narration(item, root=egoexo["root"], num_frames=4, store_size=32)

    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        build_dataset("ego_exo_clip", units, lambda u: decode(u, fail_at=5), out, settings=settings, chunk_size=2,
                      show_progress=False)
    assert sorted(os.listdir(os.path.join(out, ".work", "ego_exo_clip"))) == [
        "chunk_000000.pkl", "chunk_000001.pkl", "plan.json"]
    calls.clear()
    summary = build_dataset("ego_exo_clip", units, decode, out, settings=settings, chunk_size=2, show_progress=False)
    assert calls == [u.uid for u in units[4:]]  # finished chunks were not decoded again
    assert summary["written"] == {"train": 8, "val": 1} and not os.path.exists(os.path.join(out, ".work"))
    clean = build_dataset("ego_exo_clip", units, decode, str(tmp_path / "clean"), settings=settings,
                          show_progress=False)
    a, b = open_records(summary["path"], "train"), open_records(clean["path"], "train")
    for i in range(len(a)):
        assert a[i]["uid"] == b[i]["uid"] and np.array_equal(a[i]["ego_frames"], b[i]["ego_frames"])
    stale = str(tmp_path / "stale")  # a partial build of another plan is refused, not mixed in
    os.makedirs(os.path.join(stale, ".work", "ego_exo_clip"))
    with open(os.path.join(stale, ".work", "ego_exo_clip", "plan.json"), "w") as f:
        json.dump({"plan": "other"}, f)
    with pytest.raises(DataError, match="different plan"):
        build_dataset("ego_exo_clip", units, decode, stale, settings=settings, show_progress=False)


def test_build_cli_decodes_in_parallel_and_prints_a_summary(egoexo, tmp_path):
    env = {**os.environ, "XLA_FLAGS": cpu_devices(1), "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "exo2ego_jax.data.build", "ego_exo_clip", "--src", egoexo["root"],
                          "--out", str(tmp_path), "--num_frames", "4", "--store_size", "32", "--workers", "2",
                          "--no_progress"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote 9 records" in out.stdout and "rejected annotation pass: 1" in out.stdout
    assert split_sizes(os.path.join(str(tmp_path), "ego_exo_clip")) == {"train": 8, "val": 1}
    bad = subprocess.run([sys.executable, "-m", "exo2ego_jax.data.build", "ego_exo_clip", "--src",
                          str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "takes.json" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------------- EgoIT

def test_conversation_json_validation(tmp_path):
    items = [
        {"id": "ok", "video": "a.mp4", "conversations": [{"from": "human", "value": "<video>\nQ?"},
                                                         {"from": "gpt", "value": "A."}], "start": 1, "end": 2},
        {"id": "nested", "image": {"video": "b.mp4"}, "conversations": [{"from": "human", "value": "Q?"},
                                                                        {"from": "gpt", "value": "A."}]},
        {"id": "novideo", "conversations": []},
        {"id": "noconv", "video": "c.mp4"},
        {"id": "badturns", "video": "d.mp4", "conversations": [{"from": "human"}]},
        {"id": "badtime", "video": "e.mp4", "conversations": [{"from": "human", "value": "Q"},
                                                             {"from": "gpt", "value": "A"}], "start": 3, "end": 2},
    ]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(items))
    skips = SkipLog()
    samples = egoit.load_conversations(str(path), skips=skips)
    assert [s.uid for s in samples] == ["ok", "nested"] and samples[1].video == "b.mp4"
    assert (samples[0].start, samples[0].end) == (1.0, 2.0)
    assert skips.counts == {"missing key 'video'": 1, "missing key 'conversations'": 1,
                            "malformed conversations": 1, "end <= start": 1}
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="latin.json.*not UTF-8.*line 1"):
        egoit.load_conversations(str(latin))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,}')
    with pytest.raises(DataError, match="broken.json.*not valid JSON"):
        egoit.load_conversations(str(broken))


def test_source_converters_write_conversation_json(tmp_path):
    sources = fx.egoit_sources(str(tmp_path / "src"))
    templates = egoit.templates()
    assert all(len(templates[s]) == 10 for s in egoit.SOURCES)
    expected = {  # source -> (count, video of the first sample, answer of the first sample)
        "egtea": (1, "cropped_clips/OP01-R01-PastaSalad/OP01-R01-PastaSalad-1002316-1004005-F024051-F024101.mp4",
                  "Cut tomato."),
        "ssv2": (1, "78687.webm", "Holding potato next to bottle."),
        "egotimeqa": (1, "0a1b.mp4", "A red bowl."),
        "openeqa": (1, "scannet-v0/012-scannet-scene0011_00.mp4", "Grey."),
        "egoexolearn": (1, "bee9.mp4", "Pick up the knife."),
    }
    for source, (count, video, answer) in expected.items():
        out = str(tmp_path / f"{source}.json")
        skips = SkipLog()
        assert egoit.convert_source(source, sources[source], out, seed=0, skips=skips) == count
        samples = egoit.load_conversations(out)
        assert samples[0].video == video and samples[0].conversations[1][1] == answer
        question = samples[0].conversations[0][1]
        assert question.startswith("<video>\n")
        original = {"egotimeqa": "What did I put in the sink?", "openeqa": "What colour is the sofa?"}.get(source, "")
        assert question[len("<video>\n"):] in {t.format(question=original) for t in templates[source]}
        if source == "egtea":
            assert skips.counts == {"EGTEA line without a known action index": 1}
    again = str(tmp_path / "again.json")
    egoit.convert_source("egtea", sources["egtea"], again, seed=0)
    assert json.load(open(again)) == json.load(open(str(tmp_path / "egtea.json")))  # seeded, reproducible
    moment = str(tmp_path / "moment.json")
    egoit.convert_source("egotimeqa", sources["egotimeqa"], moment, window="moment")
    assert egoit.load_conversations(moment)[0].start == pytest.approx(101.2)
    eel = egoit.load_conversations(str(tmp_path / "egoexolearn.json"))[0]
    assert (eel.start, eel.end) == (84.9, 87.2)


def test_ego_it_build_skips_escaping_paths(tmp_path):
    root = tmp_path / "videos"
    fx.write_coded(str(root / "clip.mp4"), 60)
    conv = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "That."}]
    items = [{"id": "a", "video": "clip.mp4", "conversations": conv, "start": 0.5, "end": 1.5},
             {"id": "b", "video": "../outside.mp4", "conversations": conv},
             {"id": "c", "video": "clip.mp4", "conversations": conv}]
    (tmp_path / "it.json").write_text(json.dumps(items))
    summary = build_ego_it([str(tmp_path / "it.json")], str(root), str(tmp_path / "out"), num_frames=4,
                           store_size=32, show_progress=False)
    assert summary["written"] == {"train": 2}
    assert summary["skipped"]["video path outside the data root"]["count"] == 1
    records = open_records(summary["path"], "train")
    by_uid = {records[i]["uid"]: records[i] for i in range(len(records))}
    assert codes(by_uid[b"a"]["ego_frames"]) == sample_frame_indices(60, 30.0, 4, 0.5, 1.5)
    assert by_uid[b"a"]["exo_frames"].shape == (0, 0, 0, 3)
    assert json.loads(by_uid[b"a"]["conversations"]) == conv


# ----------------------------------------------------------------------------------- template and masking

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from exo2ego_jax.data.tokenizer import train_tokenizer
    texts = ["C picks up the red cube", "What does the person do?", "the blue ball rolls away", "and then?",
             template.SYSTEM_PROMPT] * 20
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=200)


def test_tokenizer_has_mistral_conventions(tokenizer, tmp_path):
    from transformers import AutoTokenizer
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == \
        (0, 1, 2, 0)
    assert tokenizer.is_fast and tokenizer.padding_side == "right"
    tokenizer.save_pretrained(str(tmp_path))
    assert AutoTokenizer.from_pretrained(str(tmp_path))("the red cube")["input_ids"] == \
        tokenizer("the red cube")["input_ids"]


def test_conversation_template_rendering_and_masking(tokenizer):
    conv = [{"from": "human", "value": "What does the person do?\n<video>"},
            {"from": "gpt", "value": "C picks up the red cube"},
            {"from": "human", "value": "and then?"}, {"from": "gpt", "value": "the blue ball rolls away"}]
    text, spans = template.render(template.normalize_turns(conv))
    assert text == ("[INST] <<SYS>>\n" + template.SYSTEM_PROMPT + "\n<</SYS>>\n\n<video>\nWhat does the person do? "
                    "[/INST] C picks up the red cube </s>[INST] and then? [/INST] the blue ball rolls away </s>")
    tok = template.tokenize_conversation(tokenizer, conv)
    ids, labels = tok.input_ids.tolist(), tok.labels.tolist()
    assert ids[0] == tokenizer.bos_token_id and ids.count(template.VIDEO_TOKEN_INDEX) == 1
    # ids are the tokenizer's own ids for the text on each side of <video>
    before, after = text.split("<video>")
    assert ids[1:] == (tokenizer(before, add_special_tokens=False)["input_ids"] + [template.VIDEO_TOKEN_INDEX]
                       + tokenizer(after, add_special_tokens=False)["input_ids"])
    # exactly the answers and their </s> are trained
    trained = [i for i, l in zip(ids, labels) if l != template.IGNORE_INDEX]
    assert trained == [i for i, l in zip(ids, labels) if l == i and l >= 0]
    assert tokenizer.decode(trained) .replace(" ", "") == "Cpicksuptheredcube</s>theblueballrollsaway</s>"
    assert trained.count(tokenizer.eos_token_id) == 2
    first_answer = labels.index(next(l for l in labels if l != -100))
    assert tokenizer.decode([i for i in ids[:first_answer] if i >= 0]).rstrip().endswith("[/INST]")
    # truncation happens on text ids, before visual expansion
    short = template.tokenize_conversation(tokenizer, conv, max_len=20)
    assert short.truncated and short.input_ids.tolist() == ids[:20] and short.labels.tolist() == labels[:20]
    cap = template.tokenize_caption(tokenizer, "C picks up the red cube")
    assert cap.input_ids[0] == template.VIDEO_TOKEN_INDEX and cap.labels[0] == template.IGNORE_INDEX
    assert (cap.labels[1:] == cap.input_ids[1:]).all()
    prompt = template.prompt_ids(tokenizer, "What does the person do?")
    assert prompt == ids[:first_answer]
    with pytest.raises(ValueError, match="human then gpt"):
        template.tokenize_conversation(tokenizer, [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])


# --------------------------------------------------------------------------------------------- the loader

@pytest.fixture(scope="module")
def synthetic_records(tmp_path_factory):
    from exo2ego_jax.data import synthetic
    from exo2ego_jax.data.tokenizer import train_tokenizer
    out = str(tmp_path_factory.mktemp("synthetic"))
    summaries = synthetic.build(out, seed=3, preset="tests", show_progress=False)
    train_tokenizer(synthetic.corpus(os.path.join(out, "raw")) + [template.SYSTEM_PROMPT] * 20,
                    os.path.join(out, "tokenizer"), vocab_size=300)
    return {"out": out, "summaries": summaries}


def loader(c, process_index=0, process_count=1):
    """The training loop's batch iterator for config `c` (its Grain pipeline over the records)."""
    from exo2ego_jax.train.config import resolve
    from exo2ego_jax.train.loop import make_data
    return make_data(resolve(c), process_index=process_index, process_count=process_count)


def loader_config(stage, synthetic_records, **overrides):
    from exo2ego_jax.configfile import load_config_file
    base = {"data.root": os.path.join(synthetic_records["out"], "records"),
            "data.tokenizer": os.path.join(synthetic_records["out"], "tokenizer"), "batch_size": 4,
            "model.clip.image_size": 16}
    return load_config_file(os.path.join(REPO, "configs", f"{stage}.py"), "demo", {**base, **overrides})


def test_synthetic_dataset_is_deterministic_and_synchronised(synthetic_records, tmp_path):
    from exo2ego_jax.data import synthetic
    clip, ego_it = synthetic_records["summaries"]
    p = synthetic.PRESETS["tests"]
    narrations = (p.train_takes + p.val_takes) * p.actions_per_take
    assert sum(clip["written"].values()) == narrations * 2 and clip["skipped_total"] == 0  # two exo cameras
    assert ego_it["written"] == {"train": p.train_takes * p.actions_per_take * 2}
    again = synthetic.write_raw(str(tmp_path), seed=3, preset="tests")
    raw = os.path.join(synthetic_records["out"], "raw")
    for name in ("takes.json", "egoit_synthetic.json", "mcq_val.json", "annotations/atomic_descriptions_val.json"):
        assert open(os.path.join(raw, name)).read() == open(os.path.join(str(tmp_path), name)).read()
    a, _ = read_clip(os.path.join(raw, "takes/synthetic_kitchen_0000/frame_aligned_videos/aria01_214-1.mp4"), 4)
    b, _ = read_clip(os.path.join(str(tmp_path), "takes/synthetic_kitchen_0000/frame_aligned_videos/aria01_214-1.mp4"), 4)
    assert np.array_equal(a, b)
    other = synthetic.write_raw(str(tmp_path / "other"), seed=4, preset="tests")
    assert open(other["takes"]).read() != open(again["takes"]).read()
    mcq = json.load(open(os.path.join(raw, "mcq_val.json")))
    assert len(mcq) == p.val_takes * p.actions_per_take
    assert all(len(set(m["options"])) == 4 and 0 <= m["answer"] < 4 for m in mcq)


def test_loader_batches_views_and_buckets(synthetic_records):
    c = loader_config("stage2", synthetic_records)
    batch = next(loader(c))
    assert batch["ego_frames"].shape == (4, 4, 16, 16, 3) and batch["exo_frames"].shape == (4, 4, 16, 16, 3)
    assert batch["input_ids"].shape[1] == 32  # the smallest text bucket (32, 64, 128) that fits
    assert (batch["input_ids"] == template.VIDEO_TOKEN_INDEX).sum(1).tolist() == [1, 1, 1, 1]
    assert not np.array_equal(batch["ego_frames"], batch["exo_frames"])
    c3 = loader_config("stage3", synthetic_records)
    batch3 = next(loader(c3))
    assert "exo_frames" not in batch3 and batch3["input_ids"].shape[1] in (64, 128)
    assert (batch3["labels"] != template.IGNORE_INDEX).any(1).all()  # the answers survive truncation


def test_a_stage_needing_exo_frames_refuses_records_without_them(synthetic_records, tmp_path):
    root = tmp_path / "videos"
    fx.write_coded(str(root / "clip.mp4"), 60)
    conv = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "That."}]
    (tmp_path / "it.json").write_text(json.dumps([{"id": str(i), "video": "clip.mp4", "conversations": conv}
                                                  for i in range(3)]))
    build_ego_it([str(tmp_path / "it.json")], str(root), str(tmp_path / "out"), num_frames=4, store_size=16,
                 show_progress=False)
    c = loader_config("stage2", synthetic_records, **{"data.source": "ego_it", "data.root": str(tmp_path / "out"),
                                                       "batch_size": 2})
    with pytest.raises(DataError, match="no exo frames"):
        next(loader(c))


def test_loader_order_is_deterministic_and_resumes(synthetic_records):
    c = loader_config("stage2", synthetic_records)
    a, b = loader(c), loader(c)
    first = [next(a) for _ in range(5)]  # crosses an epoch boundary (12 train records / 4)
    assert all(np.array_equal(x["input_ids"], y["input_ids"]) and np.array_equal(x["ego_frames"], y["ego_frames"])
               for x, y in zip(first, [next(b) for _ in range(5)]))
    a.reset()
    state = None
    for k in range(5):
        if k == 2:
            state = json.loads(json.dumps(a.get_state()))  # the checkpoint stores it as JSON
        next(a)
    resumed = loader(c)
    resumed.set_state(state)
    for x in first[2:]:
        y = next(resumed)
        assert np.array_equal(x["ego_frames"], y["ego_frames"]) and np.array_equal(x["labels"], y["labels"])
    other = loader(loader_config("stage2", synthetic_records, seed=7))
    assert not np.array_equal(next(other)["ego_frames"], first[0]["ego_frames"])
    with pytest.raises(ValueError, match="global_batch"):
        loader(loader_config("stage2", synthetic_records, batch_size=2)).set_state(state)


def test_loader_shards_records_across_processes(synthetic_records):
    c = loader_config("stage1", synthetic_records, **{"data.shuffle": False})
    whole = next(loader(c))
    halves = [next(loader(c, process_index=i, process_count=2)) for i in range(2)]
    assert all(h["exo_frames"].shape[0] == 2 for h in halves)
    frames = lambda b: {x.tobytes() for x in b["exo_frames"]}
    assert not frames(halves[0]) & frames(halves[1])  # disjoint shards
    assert len(frames(whole)) == 4


@pytest.mark.slow
def test_training_on_records_resumes_with_the_loader_state(synthetic_records, tmp_path):
    """Stage 2 through the training loop on Grain batches; a run stopped at step 2 and restarted reproduces
    steps 3-4 of an uninterrupted run (the Grain iterator state is saved with the train state)."""
    from exo2ego_jax.train.loop import train
    common = {"mesh.shape": (1, 1, 1), "mesh.num_devices": 1, "optim.schedule": "constant",
              "optim.warmup_ratio": 0.0, "checkpoint_every": 2, "async_checkpointing": False}
    full = train(loader_config("stage2", synthetic_records, num_train_steps=4, **common), str(tmp_path / "full"),
                 show_progress=False)
    train(loader_config("stage2", synthetic_records, num_train_steps=2, **common), str(tmp_path / "split"),
          show_progress=False)
    resumed = train(loader_config("stage2", synthetic_records, num_train_steps=4, **common), str(tmp_path / "split"),
                    show_progress=False)
    tail = {m["step"]: m for m in full.metrics}
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    for m in resumed.metrics:
        assert m["batch_hash"] == tail[m["step"]]["batch_hash"]
        assert m["loss"] == pytest.approx(tail[m["step"]]["loss"], rel=1e-5)
    assert os.path.exists(str(tmp_path / "full" / "export" / "tokenizer.json"))  # exports carry the tokenizer
