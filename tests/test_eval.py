"""Evaluation: each benchmark's loader on its official format, end to end on a tiny checkpoint (predictions,
metrics that agree with the predictions, resumption), the prompts, the CLIs, ROUGE-L against rouge-score."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_fixtures as fx
import eval_fixtures as efx
from exo2ego_jax.eval import benchmarks as B
from exo2ego_jax.data import prompts
from exo2ego_jax.errors import ConfigError
from exo2ego_jax.eval.runner import EvalSettings, results_table, run_benchmark
from tests.helpers import composite_logits_and_loss
from tests.xla_flags import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("benchmarks"))
    return root, efx.write_all(root)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from exo2ego_jax.data import template
    from exo2ego_jax.data.tokenizer import train_tokenizer
    from exo2ego_jax.serve.inference import load_model
    tok_dir = str(tmp_path_factory.mktemp("tok"))
    texts = efx.OPTIONS5 + [template.SYSTEM_PROMPT, prompts.ANSWER_INSTRUCTION, "Question: Options: (A) (B) (C)"] * 5
    train_tokenizer(texts, tok_dir, vocab_size=300)
    path = efx.tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), tok_dir)
    return load_model(path)


def test_loaders_read_the_official_formats(bench_root):
    root, facts = bench_root
    es = B.load_egoschema(os.path.join(root, "egoschema"))
    assert [i.answer for i in es] == facts["egoschema"]["answers"] and len(es[0].options) == 5
    assert len(B.load_egoschema(os.path.join(root, "egoschema"), subset_only=False)) == 3
    closed = B.load_qaego4d_closed(os.path.join(root, "qaego4d"))
    assert len(closed) == 10 and {i.meta["seed"] for i in closed} == set(B.QAEGO4D_SEEDS)
    for i in closed:  # the right answer is tracked through each seeded permutation
        assert i.options[i.answer] in ("on the table", "an onion")
    assert len({tuple(i.options) for i in closed if i.uid.startswith("s1_0")}) > 1  # permutations differ by seed
    assert [i.options for i in closed] == [i.options for i in B.load_qaego4d_closed(os.path.join(root, "qaego4d"))]
    direct = B.BENCHMARKS["egotaskqa_direct"].load(os.path.join(root, "egotaskqa"))
    assert direct[0].answer == 2 and direct[0].options[2] == "closed" and direct[0].video.endswith("27k|P1|1|40.mp4")
    ch = B.load_charades_ego(os.path.join(root, "charades_ego"))
    assert {i.uid: i.answer for i in ch} == facts["charades_ego"]["labels"]
    assert ch[0].options == ["Holding some clothes", "Putting clothes somewhere", "Taking some clothes from somewhere"]
    mir = B.load_ek100_mir(os.path.join(root, "ek100_mir"))
    assert (mir[1].start, mir[1].end) == (0.7, 1.2) and mir[2].meta["relevancy"] == [0.5, 0.0]
    plan = B.load_egoplan(os.path.join(root, "egoplan"), num_frames=4)
    assert plan[0].frame_indices == [2, 11, 21, 30]  # round(linspace(2, 30, 3, endpoint=False)), then frame 30
    assert plan[1].frame_indices == [12] * 4 and os.path.isdir(plan[1].video) and plan[1].answer == 3
    vln = B.load_vln_qa(os.path.join(root, "vln_qa"))
    assert vln[0].answer == 1 and vln[0].video.endswith("video/vlnqa/left/4504_frame52.mp4")
    mcq = B.load_egomcq(os.path.join(root, "egomcq"))
    assert [i.meta["type"] for i in mcq] == [2, 1] and mcq[0].options[0] == "Cuts the onion"
    assert mcq[1].video.endswith("cd34/1.mp4") and mcq[1].start == pytest.approx(0.2)  # chunk-relative time


def test_egoplan_frames_are_read_from_videos_and_frame_folders(bench_root, model):
    from exo2ego_jax.data.video import read_frames_at
    root, _ = bench_root
    plan = B.load_egoplan(os.path.join(root, "egoplan"), num_frames=4)
    assert [fx.read_code(f) for f in read_frames_at(plan[0].video, plan[0].frame_indices)] == [2, 11, 21, 30]
    assert [fx.read_code(f) for f in read_frames_at(plan[1].video, plan[1].frame_indices)] == [12] * 4


def test_prompts_follow_videollama2():
    text = prompts.mcq_prompt("What?", ["a", "b"], style="egoschema")
    assert text == ("Select the best answer to the following multiple-choice question based on the video.\nWhat?\n"
                    "Options:\n(A) a\n(B) b\nAnswer with the option's letter from the given choices directly and only "
                    "give the best option. The best answer is: ")
    cued = prompts.mcq_prompt("What?", ["a", "b"], prompt="first_person")
    assert cued.startswith("This video is recorded from a first-person perspective. Question: What?\nOptions:")


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("the red bowl in the sink", "a red bowl"), ("on the desk near the lamp", "on the desk"),
             ("scissors", "the drawer"), ("put it on the table then left", "left it on the kitchen table")]
    for pred, ref in pairs:
        expected = scorer.score(B.normalize_answer(ref), B.normalize_answer(pred))["rougeL"].fmeasure
        assert B.rouge_l(pred, ref) == pytest.approx(expected, abs=1e-9)


def _accuracy_from(path, items):
    preds = [json.loads(line) for line in open(path)]
    by = {i.uid: i for i in items}
    return 100.0 * np.mean([p["pred"] == by[p["uid"]].answer for p in preds])


@pytest.mark.parametrize("mode", ["generate", "loglik"])
def test_mcq_benchmark_end_to_end(bench_root, model, tmp_path, mode):
    root, _ = bench_root
    items = B.load_vln_qa(os.path.join(root, "vln_qa"))
    metrics = run_benchmark("vln_qa", os.path.join(root, "vln_qa"), model, str(tmp_path),
                            settings=EvalSettings(mode=mode), show_progress=False)
    assert metrics["vln_qa_mode"] == mode and metrics["vln_qa_n"] == 1 and metrics["vln_qa_skipped"] == 0
    path = os.path.join(str(tmp_path), "vln_qa", "predictions.jsonl")
    assert metrics["vln_qa"] == pytest.approx(_accuracy_from(path, items))
    rec = json.loads(open(path).readline())
    if mode == "generate":
        assert "text" in rec and (rec["parsed"] or rec["pred"] == 2)  # fallback: option C
        assert metrics["vln_qa_unparsed"] == int(not rec["parsed"])
    else:
        assert len(rec["scores"]) == 4 and rec["pred"] == int(np.argmax(rec["scores"]))


def test_loglik_scores_equal_the_models_own_loss(bench_root, model):
    """The option scores are minus the mean answer-token loss of "[INST] q [/INST] option </s>"."""
    from exo2ego_jax.data import template
    from exo2ego_jax.data.prompts import with_prompt
    from exo2ego_jax.eval.runner import predict_batch
    from exo2ego_jax.serve.inference import clip_pixels
    root, _ = bench_root
    item = B.load_vln_qa(os.path.join(root, "vln_qa"))[0]
    pixels = clip_pixels(item.video, model.num_frames, model.image_size)
    settings = EvalSettings(mode="loglik")
    rec = predict_batch(B.BENCHMARKS["vln_qa"], [item], pixels[None], model, settings)[0]
    question = with_prompt(item.question, settings.prompt)  # the default row: task details + first-person cue
    assert question != item.question
    for k, option in enumerate(item.options):
        tok = template.tokenize_conversation(model.tokenizer, [{"from": "human", "value": question},
                                                               {"from": "gpt", "value": option}])
        _, loss = composite_logits_and_loss(model.module, model.params, tok.input_ids[None], pixels[None],
                                            labels=tok.labels[None])
        assert -rec["scores"][k] == pytest.approx(float(loss), rel=1e-4, abs=1e-5)


def test_unparsable_answers_use_the_configured_fallback(bench_root, model, monkeypatch):
    from exo2ego_jax.eval import runner
    root, _ = bench_root
    items = B.load_vln_qa(os.path.join(root, "vln_qa"))
    monkeypatch.setattr("exo2ego_jax.eval.runner.generate_answers", lambda *a, **k: ["I am not sure"])
    pixels = np.zeros((1, model.num_frames, model.image_size, model.image_size, 3), np.float32)
    c = runner.predict_batch(B.BENCHMARKS["vln_qa"], items, pixels, model, EvalSettings(mode="generate"))[0]
    w = runner.predict_batch(B.BENCHMARKS["vln_qa"], items, pixels, model,
                             EvalSettings(mode="generate", fallback="wrong"))[0]
    assert (c["pred"], c["parsed"]) == (2, False) and w["pred"] == -1
    monkeypatch.setattr("exo2ego_jax.eval.runner.generate_answers", lambda *a, **k: ["(B) Stop"])
    assert runner.predict_batch(B.BENCHMARKS["vln_qa"], items, pixels, model, EvalSettings())[0]["pred"] == 1
    with pytest.raises(ValueError, match="fallback"):
        EvalSettings(fallback="random")


def test_evaluation_resumes_and_counts_missing_videos(bench_root, model, tmp_path):
    import shutil
    root, _ = bench_root
    src = str(tmp_path / "qaego4d")
    shutil.copytree(os.path.join(root, "qaego4d"), src)
    os.remove(os.path.join(src, "videos", "v2.mp4"))
    out = str(tmp_path / "out")
    full = run_benchmark("qaego4d_closed", src, model, out, settings=EvalSettings(batch_size=2), show_progress=False)
    assert full["qaego4d_closed_n"] == 5 and full["qaego4d_closed_skipped"] == 5
    path = os.path.join(out, "qaego4d_closed", "predictions.jsonl")
    lines = open(path).read().splitlines()
    with open(path, "w") as f:  # an interruption: three lines kept, the fourth cut mid-write
        f.write("\n".join(lines[:3]) + "\n" + lines[3][:10])
    again = run_benchmark("qaego4d_closed", src, model, out, settings=EvalSettings(batch_size=2), show_progress=False)
    assert again == full
    uids = [json.loads(line)["uid"] for line in open(path) if line.strip().endswith("}")]
    assert sorted(set(uids)) == sorted(i.uid for i in B.load_qaego4d_closed(src))


def test_predictions_of_another_model_or_setting_are_never_reused(bench_root, model, tmp_path):
    """A rerun into the same output with another fusion or prompt is refused with the difference named; with
    overwrite it scores again; the same evaluation resumes."""
    import dataclasses
    from exo2ego_jax.models.exo2ego import Exo2Ego
    root, _ = bench_root
    src, out = os.path.join(root, "vln_qa"), str(tmp_path / "out")
    run = lambda m, **kw: run_benchmark("vln_qa", src, m, out, show_progress=False, **kw)
    first = run(model, settings=EvalSettings(mode="loglik"))
    other_fusion = "none" if model.config.fusion != "none" else "tokens"
    refitted = dataclasses.replace(model, module=Exo2Ego(dataclasses.replace(model.config, fusion=other_fusion)))
    with pytest.raises(ConfigError, match="fusion"):
        run(refitted, settings=EvalSettings(mode="loglik"))
    with pytest.raises(ConfigError, match="prompt"):
        run(model, settings=EvalSettings(mode="loglik", prompt="base"))
    assert run(model, settings=EvalSettings(mode="loglik")) == first  # the same evaluation: reused
    rescored = run(model, settings=EvalSettings(mode="loglik", prompt="base"), overwrite=True)
    path = os.path.join(out, "vln_qa", "predictions.jsonl")
    assert len(open(path).read().splitlines()) == rescored["vln_qa_n"]  # every uid once
    assert json.load(open(os.path.join(out, "vln_qa", "predictions_source.json")))["prompt"] == "base"


def test_an_evaluation_output_folder_is_locked(tmp_path):
    from exo2ego_jax.locks import FolderBusy, FolderLock
    from exo2ego_jax.eval.runner import run_suite
    with FolderLock(str(tmp_path), what="evaluation output folder"), \
            pytest.raises(FolderBusy, match="evaluation output folder"):
        run_suite(("vln_qa",), str(tmp_path), None, str(tmp_path), settings=EvalSettings())


@pytest.mark.slow
def test_suite_cli_writes_predictions_metrics_and_the_table(bench_root, model, tmp_path):
    root, facts = bench_root
    out = str(tmp_path / "eval")
    env = {**os.environ, "XLA_FLAGS": cpu_devices(1), "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "evaluate.py"), "--config",
                           os.path.join(REPO, "configs", "eval.py") + ":all", "--checkpoint", model.path,
                           "--data_root", root, "--out", out, "--noprogress", "--config.batch_size=4"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(os.path.join(out, "results.json")))
    m = results["metrics"]
    for key in B.AVG_METRICS + ("qaego4d_open_em", "qaego4d_open_rougeL", "ek100_mir_ndcg"):
        assert key in m and 0.0 <= m[key] <= 100.0, key
    assert results["avg"] == pytest.approx(np.mean([m[k] for k in B.AVG_METRICS]))
    assert m["egoplan_mode"] == "loglik" and m["egoschema_mode"] == "generate"
    table = open(os.path.join(out, "results.md")).read()
    assert "| egoschema |" in table and f"| **Avg (10)** | {results['avg']:.1f} | 55.6 |" in table
    sub = json.load(open(os.path.join(out, "egoschema", "egoschema_submission.json")))
    assert sorted(sub) == ["q0", "q2"]
    # the metric files agree with the predictions
    ch = [json.loads(line) for line in open(os.path.join(out, "charades_ego", "predictions.jsonl"))]
    labels = np.zeros((2, 3))
    for r, p in enumerate(ch):
        labels[r, facts["charades_ego"]["labels"][p["uid"]]] = 1
    from exo2ego_jax.eval.metrics import multilabel_map
    assert m["charades_ego_map"] == pytest.approx(100 * multilabel_map(np.array([p["scores"] for p in ch]), labels))
    mcq = {json.loads(line)["uid"]: json.loads(line) for line in open(os.path.join(out, "egomcq", "predictions.jsonl"))}
    items = {i.uid: i for i in B.load_egomcq(os.path.join(root, "egomcq"))}
    assert m["egomcq_inter"] == 100.0 * (mcq["egomcq_0"]["pred"] == items["egomcq_0"].answer)
    assert m["egomcq_intra"] == 100.0 * (mcq["egomcq_1"]["pred"] == items["egomcq_1"].answer)


def test_results_table_marks_missing_avg_parts():
    table = results_table({"egoschema": 50.0, "vln_qa": 25.0})
    assert "| egoschema | 50.0 | 61.3 |" in table and "n/a (missing qaego4d_closed" in table


@pytest.mark.slow
def test_infer_cli_answers_a_question(model, tmp_path):
    video = fx.write_coded(str(tmp_path / "clip.mp4"), 40)
    env = {**os.environ, "XLA_FLAGS": cpu_devices(1), "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "infer.py"), "--checkpoint", model.path,
                           "--video", video, "--question", "What am I doing?", "--max_new_tokens", "5"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from exo2ego_jax.serve.inference import answer_question
    assert proc.stdout.strip() == answer_question(model, video, "What am I doing?", max_new_tokens=5)
    bad = subprocess.run([sys.executable, os.path.join(REPO, "launch", "infer.py"), "--checkpoint", model.path,
                          "--video", str(tmp_path / "none.mp4"), "--question", "?"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode == 2 and "none.mp4" in bad.stderr and "Traceback" not in bad.stderr
