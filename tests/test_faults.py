"""Nothing lost, nothing silently wrong: one case per kind of bad input and fault a user meets, each checked for
its one-line message and that nothing was lost; and SIGKILLs at random steps resume bit-identically."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from exo2ego_jax.errors import CheckpointError, ConfigError, DataError
from tests.helpers import ROOT, read_metrics, stage_config
from tests.xla_flags import cpu_devices

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_fixtures as fx


def launch(stage, workdir, *flags, wait=True):
    """`python launch/<stage>.py` on the tiny preset (one CPU device)."""
    cmd = [sys.executable, os.path.join(ROOT, "launch", f"{stage}.py"), f"--config={ROOT}/configs/{stage}.py:tiny",
           f"--workdir={workdir}", "--noprogress", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "XLA_FLAGS": cpu_devices(1), "JAX_PLATFORMS": "cpu"})
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def one_error_line(err: str) -> str:
    """The CLI's message: exactly one `error:` line and no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


SHORT = ("--config.num_train_steps=6", "--config.checkpoint_every=2", "--config.batch_size=4",
         "--config.data.num_examples=6")


# ------------------------------------------------------------------------------------------ workdir lock

def launch_and_hold(workdir, step: int):
    """A stage-3 launch that waits, after its checkpoint `step` is written, to be killed or stopped."""
    proc = launch("stage3", workdir, *SHORT, f"--config.hold_after_step={step}", wait=False)
    for line in proc.stdout:
        if f"HOLDING after checkpoint {step}" in line:
            break
    return proc


@pytest.mark.slow
def test_a_busy_workdir_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    first = launch_and_hold(tmp_path, 2)
    code, _, err = launch("stage3", tmp_path, *SHORT)
    line = one_error_line(err)
    assert code == 2 and f"pid {first.pid}" in line and "is in use" in line
    assert read_metrics(tmp_path)[-1]["step"] == 2  # the second launch wrote nothing
    first.send_signal(signal.SIGKILL)
    first.wait()
    code, out, err = launch("stage3", tmp_path, *SHORT)
    assert code == 0, err[-3000:]
    assert "taking over the stale lock" in out and "resumed from" in out
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]  # each step logged once
    assert not (tmp_path / ".lock").exists()


def test_a_relaunch_with_another_config_is_refused(tmp_path):
    from exo2ego_jax.train.workdir import record_config
    record_config(str(tmp_path), {"optim": {"learning_rate": 1e-3}, "num_train_steps": 5}, force=False)
    record_config(str(tmp_path), {"optim": {"learning_rate": 1e-3}, "num_train_steps": 9}, force=False)  # resumable
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: 0\.001 -> 0\.01.*force_new_config"):
        record_config(str(tmp_path), {"optim": {"learning_rate": 1e-2}, "num_train_steps": 9}, force=False)
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 1e-3  # unchanged
    record_config(str(tmp_path), {"optim": {"learning_rate": 1e-2}, "num_train_steps": 9}, force=True)
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 1e-2
    assert len(list(tmp_path.glob("config.*.json"))) == 1  # the old one kept


# ------------------------------------------------------------------------------------- where a stage starts

def fake_export(workdir, stage, step):
    from exo2ego_jax.checkpoints import write_model_config
    os.makedirs(os.path.join(workdir, "export"), exist_ok=True)
    write_model_config(os.path.join(workdir, "export"), kind="exo2ego", config={}, dtype="float32", stage=stage,
                       step=step)


def test_from_workdir_refuses_a_live_run_and_a_later_stage_and_says_what_it_starts_from(tmp_path):
    from exo2ego_jax.locks import FolderLock
    from exo2ego_jax.train.config import describe_init, resolve_init
    earlier, later = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    fake_export(earlier, "stage1", 40)
    fake_export(later, "stage2", 70)
    c = lambda wd, **kw: stage_config("stage2", **{"init.from_workdir": wd, **kw})
    path = resolve_init(c(earlier))
    assert describe_init(path) == f"init: {path}, the export of stage1 at step 40"
    # a live run holds it: its export is stale or half written
    with FolderLock(earlier), pytest.raises(ConfigError, match=r"is in use by a live run .*pid"):
        resolve_init(c(earlier))
    c1 = lambda **kw: stage_config("stage1", **{"init.from_workdir": later, **kw})
    with pytest.raises(ConfigError, match=r"export of stage2, which comes after stage1.*allow_later_stage"):
        resolve_init(c1())
    assert resolve_init(c1(**{"init.allow_later_stage": True})) == os.path.join(later, "export")


@pytest.mark.slow
def test_relative_paths_work_from_another_directory(tmp_path):
    """The workdir and init path relative to the current directory: trains, exports, and the next stage starts
    from it; the recorded config holds absolute paths."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    run = lambda stage, *flags: subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", f"{stage}.py"), f"--config={ROOT}/configs/{stage}.py:tiny",
         "--noprogress", "--config.num_train_steps=2", "--config.batch_size=2", "--config.data.num_examples=2",
         *flags], capture_output=True, text=True, timeout=600, cwd=cwd,
        env={**os.environ, "XLA_FLAGS": cpu_devices(1), "JAX_PLATFORMS": "cpu"})
    first = run("stage1", "--workdir", "rel_wd")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (cwd / "rel_wd" / "export" / "model_config.json").exists()
    second = run("stage2", "--workdir", "rel_wd2", "--config.init.from_workdir=rel_wd")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "the export of stage1 at step 2" in second.stdout
    recorded = json.loads((cwd / "rel_wd2" / "config.json").read_text())
    assert recorded["init"]["from_workdir"] == str(cwd / "rel_wd")


# ------------------------------------------------------------------------------------ checkpoint fallback

@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    code, _, err = launch("stage3", tmp_path, *SHORT, "--config.async_checkpointing=False",
                          "--config.export.enabled=False")
    assert code == 0, err[-3000:]
    full = {m["step"]: m["loss"] for m in read_metrics(tmp_path)}
    newest = tmp_path / "checkpoints" / "6"
    for path in newest.rglob("*"):  # truncate every data file of the newest checkpoint
        if path.is_file() and path.stat().st_size > 16 and "state" in str(path):
            path.write_bytes(path.read_bytes()[:8])
    code, out, err = launch("stage3", tmp_path, *SHORT, "--config.async_checkpointing=False",
                            "--config.export.enabled=False")
    assert code == 0, err[-3000:]
    assert "checkpoint step 6" in out and "cannot be restored" in out and "resumed from" in out and "step 4" in out
    assert any((tmp_path / "checkpoints" / "corrupt").iterdir())  # moved aside, not deleted
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 7))  # steps 5-6 redone and logged once
    for m in metrics:
        assert m["loss"] == pytest.approx(full[m["step"]], abs=1e-6)


@pytest.mark.slow
def test_nan_before_the_first_checkpoint_says_so(tmp_path):
    from exo2ego_jax.train.loop import TrainingDiverged, train
    c = stage_config("stage1", num_train_steps=3, checkpoint_every=10, **{
        "optim.learning_rate": 1e30, "optim.warmup_ratio": 0.0, "optim.grad_clip": 0.0, "mesh.shape": (1, 1, 1),
        "mesh.num_devices": 1})
    with pytest.raises(TrainingDiverged, match="No checkpoint was written yet") as info:
        train(c, str(tmp_path), show_progress=False)
    assert "None" not in str(info.value)


# ------------------------------------------------------------------------------------- evaluation items

def test_malformed_evaluation_items_are_counted_skips_or_strict_errors(tmp_path):
    from exo2ego_jax.eval.benchmarks import BENCHMARKS, item_problem
    root = tmp_path / "bench"
    (root / "v").mkdir(parents=True)
    good = {"uid": "ok", "video": "v/a.mp4", "question": "q", "options": ["a", "b", "c", "d"], "answer": 2}
    bad = [dict(good, uid="range", answer=4), dict(good, uid="negative", answer=-1), dict(good, uid="letter",
           answer="B"), {k: v for k, v in good.items() if k != "options"} | {"uid": "no_options"},
           dict(good, uid="escape", video="../outside.mp4"), dict(good, uid="bool", answer=True)]
    (root / "items.json").write_text(json.dumps([good] + bad))
    items = BENCHMARKS["mcq_json"].load(str(root), file="items.json")
    problems = {i.uid: item_problem(i, "mcq", str(root)) for i in items}
    assert problems["ok"] is None
    assert "outside the 4 options" in problems["range"] and "outside the 4 options" in problems["negative"]
    assert "not an option index" in problems["letter"] and "not an option index" in problems["bool"]
    assert "no options" in problems["no_options"] and "outside the data root" in problems["escape"]


@pytest.mark.slow
def test_evaluation_skips_bad_items_and_strict_stops(tmp_path, eval_checkpoint):
    root = tmp_path / "bench"
    (root / "v").mkdir(parents=True)
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    from exo2ego_jax.data.video import write_video
    write_video(str(root / "v" / "a.mp4"), frames, fps=8)
    good = {"uid": "ok", "video": "v/a.mp4", "question": "q", "options": ["yes", "no"], "answer": 1}
    (root / "items.json").write_text(json.dumps([good, dict(good, uid="letter", answer="B")]))
    base = [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--config",
            f"{ROOT}/configs/eval.py:mcq_json", "--checkpoint", eval_checkpoint, "--data_root", str(root),
            "--noprogress", "--config.mcq_file=items.json"]
    env = {**os.environ, "XLA_FLAGS": cpu_devices(1)}
    proc = subprocess.run(base + ["--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "mcq_json" / "metrics.json").read_text())
    assert metrics["mcq_json_skipped"] == 1 and metrics["mcq_json_n"] == 1
    proc = subprocess.run(base + ["--out", str(tmp_path / "strict"), "--strict"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 2 and "item letter" in one_error_line(proc.stderr)
    proc = subprocess.run(base[:2] + ["--config", f"{ROOT}/configs/eval.py:no_such_bench"] + base[4:]
                          + ["--out", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2 and "unknown benchmark" in one_error_line(proc.stderr)


@pytest.fixture(scope="module")
def eval_checkpoint(tmp_path_factory):
    import eval_fixtures as efx
    from exo2ego_jax.data import template
    from exo2ego_jax.data.tokenizer import train_tokenizer
    tok_dir = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(["yes no q", template.SYSTEM_PROMPT] * 5, tok_dir, vocab_size=300)
    return efx.tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), tok_dir)


@pytest.mark.slow
def test_infer_refuses_bad_windows(tmp_path, eval_checkpoint):
    from exo2ego_jax.data.video import write_video
    write_video(str(tmp_path / "a.mp4"), np.zeros((16, 16, 16, 3), np.uint8), fps=8)  # 2 s
    base = [sys.executable, os.path.join(ROOT, "launch", "infer.py"), "--checkpoint", eval_checkpoint, "--video",
            str(tmp_path / "a.mp4"), "--question", "what?"]
    for window, expected in ((["--start", "5", "--end", "2"], "must be after --start"),
                             (["--start", "0.5", "--end", "9"], "ends after the end")):
        proc = subprocess.run(base + window, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "XLA_FLAGS": cpu_devices(1)})
        assert proc.returncode == 2 and expected in one_error_line(proc.stderr)


# ------------------------------------------------------------------------------------------- data builds

def test_beta_ignores_times_outside_the_take(tmp_path):
    from exo2ego_jax.data import ego_exo4d
    timestamps = [1.0, 1.25, 1.5, 1.75, 2.0]
    plain = fx.write_egoexo4d(str(tmp_path / "a"), timestamps=timestamps)
    with_bad = fx.write_egoexo4d(str(tmp_path / "b"), timestamps=timestamps + [99.0])  # past the end of the take
    windows = lambda root: {n.t: (n.start, n.end) for n in ego_exo4d.plan_narrations(root, splits=("train",))}
    assert windows(with_bad) == windows(plain)


def test_empty_splits_and_lost_records_are_reported(tmp_path):
    from exo2ego_jax.data.builders import build_ego_exo_clip
    root = fx.write_egoexo4d(str(tmp_path / "src"), timestamps=[0.5, 1.0], empty_val=True)
    os.remove(os.path.join(root, fx.EGO_VIDEO))  # every record needs the ego clip: both exo cameras' are lost
    with pytest.raises(DataError, match="every item was skipped") as info:
        build_ego_exo_clip(root, str(tmp_path / "out"), num_frames=4, store_size=16, show_progress=False)
    assert "'count': 4" in str(info.value)  # 2 narrations x 2 exo cameras: 4 records lost, counted as 4
    fx.write_egoexo4d(root, timestamps=[0.5, 1.0], empty_val=True)
    os.remove(os.path.join(root, fx.EXO_VIDEOS[0]))  # one exo camera missing: 1 record per narration lost
    summary = build_ego_exo_clip(root, str(tmp_path / "out2"), num_frames=4, store_size=16, show_progress=False)
    assert summary["empty_splits"] == ["val"]
    assert summary["skipped_total"] == 2 and summary["written"] == {"train": 2}


@pytest.mark.slow
def test_the_records_folder_is_protected(tmp_path):
    root = fx.write_egoexo4d(str(tmp_path / "src"), timestamps=[0.5, 1.0])
    build = [sys.executable, "-m", "exo2ego_jax.data.build", "ego_exo_clip", "--src", root, "--out",
             str(tmp_path / "out"), "--workers", "0", "--no_progress", "--store_size", "16"]
    proc = subprocess.run(build + ["--num_frames", "4"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = tmp_path / "out" / "ego_exo_clip" / "build_summary.json"
    before = info.read_text()
    proc = subprocess.run(build + ["--num_frames", "8"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2 and "another plan" in one_error_line(proc.stderr) and "num_frames" in proc.stderr
    assert info.read_text() == before  # the finished records are intact
    from exo2ego_jax.locks import FolderLock
    with FolderLock(str(tmp_path / "out" / ".locks" / "ego_exo_clip")):  # a build in progress
        proc = subprocess.run(build + ["--num_frames", "8", "--restart"], capture_output=True, text=True,
                              timeout=600, cwd=ROOT)
    assert proc.returncode == 2 and "is in use" in one_error_line(proc.stderr)
    proc = subprocess.run(build + ["--num_frames", "8", "--restart"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0 and info.read_text() != before


# ------------------------------------------------------------------------------ checkpoints and configs

def test_damaged_checkpoints_name_the_file(tmp_path, hf_clip):
    import exo2ego_jax
    from exo2ego_jax.convert import convert_clip
    out = tmp_path / "ckpt"
    convert_clip(hf_clip[1], str(out), dtype="float32", show_progress=False)
    meta = json.loads((out / "model_config.json").read_text())
    (out / "model_config.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(CheckpointError, match="format_version 99"):
        exo2ego_jax.load_pretrained(str(out))
    edited = dict(meta, config=dict(meta["config"], intermediate_size=meta["config"]["intermediate_size"] * 2))
    (out / "model_config.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=r"fc1/(kernel|bias).*model_config\.json"):
        exo2ego_jax.load_pretrained(str(out))
    (out / "model_config.json").write_text(json.dumps(meta)[:40])
    with pytest.raises(CheckpointError, match=r"model_config\.json is not valid JSON"):
        exo2ego_jax.load_pretrained(str(out))
    (out / "model_config.json").write_text(json.dumps(meta))
    for path in (out / "params").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="params"):
        exo2ego_jax.load_pretrained(str(out))


def test_a_truncated_safetensors_file_is_named_and_leaves_no_output(tmp_path, hf_clip):
    shutil.copytree(hf_clip[1], tmp_path / "hf")
    weights = next((tmp_path / "hf").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1000])
    proc = subprocess.run([sys.executable, "-m", "exo2ego_jax.convert", "clip", "--hf_dir", str(tmp_path / "hf"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and weights.name in line and "truncated" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_config_mistakes_are_one_line_errors(tmp_path):
    stage = [sys.executable, os.path.join(ROOT, "launch", "stage3.py"), "--workdir", str(tmp_path / "w")]
    cases = {"did you mean 'optim.learning_rate'": [f"--config={ROOT}/configs/stage3.py:tiny",
                                                    "--config.optim.learnin_rate=1"],
             "unknown preset 'huge'": [f"--config={ROOT}/configs/stage3.py:huge"],
             "does not exist": [f"--config={ROOT}/configs/nope.py:tiny"],
             "takes a number": [f"--config={ROOT}/configs/stage3.py:tiny", "--config.batch_size=many"]}
    for expected, args in cases.items():
        proc = subprocess.run(stage + args, capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                                             "XLA_FLAGS": cpu_devices(1)})
        assert proc.returncode == 2 and expected in one_error_line(proc.stderr), (args, proc.stderr[-2000:])
    assert not (tmp_path / "w").exists()  # nothing was started
    proc = subprocess.run(stage[:2] + ["--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--config" in proc.stdout and "--workdir" in proc.stdout
    assert "--distributed" in proc.stdout and "--config.per_device_batch" in proc.stdout


def test_more_config_mistakes_are_one_line_errors(tmp_path):
    """Non-finite weights, non-integer buckets, a config file that raises, a hand-edited model_config.json."""
    from exo2ego_jax.checkpoints import stored_model_config, write_model_config
    from exo2ego_jax.configfile import load_config_file
    from exo2ego_jax.train.config import validate
    for override, field in (({"loss.kl_weight": float("nan")}, "loss.kl_weight"),
                            ({"optim.learning_rate": float("inf")}, "optim.learning_rate"),
                            ({"data.text_buckets": (16, "x")}, "data.text_buckets")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            validate(stage_config("stage3", **override))
    broken = tmp_path / "broken.py"
    broken.write_text("import ml_collections\n\ndef get_config(preset):\n    return 1 / 0\n")
    with pytest.raises(ConfigError, match=r"broken\.py.*ZeroDivisionError.*line 4.*fix the file"):
        load_config_file(str(broken), "tiny")
    broken.write_text("def get_config(preset)\n    return None\n")
    with pytest.raises(ConfigError, match=r"broken\.py.*SyntaxError.*line 1"):
        load_config_file(str(broken), "tiny")
    from exo2ego_jax.models.exo2ego import Exo2EgoConfig
    from exo2ego_jax.models.clip import CLIPVisionConfig
    from exo2ego_jax.models.mistral import MistralConfig
    from exo2ego_jax.models.mapper import MapperConfig
    from exo2ego_jax.models.stc import STCConfig
    cfg = Exo2EgoConfig(clip=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                              patch_size=2, image_size=8),
                        llm=MistralConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1,
                                          num_heads=2, num_kv_heads=1, head_dim=4),
                        stc=STCConfig(encoder_hidden_size=16, hidden_size=8, depth=1),
                        mapper=MapperConfig(channels=16, width=4, num_blocks=1)).to_dict()
    cfg["stc"]["hidden_size"] = 48  # what a hand edit does
    write_model_config(str(tmp_path), kind="exo2ego", config=cfg, dtype="float32")
    with pytest.raises(CheckpointError, match=r"model_config\.json does not describe a valid exo2ego model.*"
                                              r"stc\.hidden_size.*convert/export"):
        stored_model_config(str(tmp_path))


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_one_line_and_a_relaunch_recovers(tmp_path):
    """A file-size limit (`ulimit -f`) makes the checkpoint or export writes fail as a full disk does."""
    import resource
    limit = 200_000  # the config and metrics fit; the export's params do not
    cmd = [sys.executable, os.path.join(ROOT, "launch", "stage1.py"), f"--config={ROOT}/configs/stage1.py:tiny",
           f"--workdir={tmp_path}", "--noprogress", *SHORT]
    env = {**os.environ, "XLA_FLAGS": cpu_devices(1), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": ""}
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    # The last line is ours, whole: TensorStore's late "Event loop is closed" reports (which used to print from
    # its own thread, even in the middle of this line) are dropped; Orbax's and asyncio's logged ones filtered.
    lines = [x for x in full.stderr.splitlines() if x.strip()]
    assert sum(x.startswith("error:") for x in lines) == 1 and lines[-1].startswith("error:"), full.stderr[-3000:]
    assert "ERROR:absl" not in full.stderr and "ERROR:asyncio" not in full.stderr
    assert "Event loop is closed" not in full.stderr and "Traceback" not in full.stderr, full.stderr[-3000:]
    line = lines[-1]
    assert full.returncode == 2 and "file size limit" in line and str(tmp_path) in line and "relaunch" in line
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "export" / "model_config.json").exists()
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 7))  # each step logged once


def test_writes_finishing_after_orbax_closed_its_loop_print_nothing(capfd, monkeypatch):
    """What a full disk leaves behind: TensorStore futures resolving after the asyncio loop awaiting them closed."""
    import asyncio
    import tensorstore as ts
    from exo2ego_jax.train.checkpointing import drop_closed_loop_callbacks
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    drop_closed_loop_callbacks()
    pairs = [ts.Promise.new() for _ in range(2)]

    async def wait(future):
        await future
    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(wait(future)) for _, future in pairs]
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    pairs[0][0].set_result(1)  # the closed loop's report: dropped
    writer = threading.Thread(target=lambda: pairs[1][0].set_exception(OSError("disk full")))
    writer.start()
    writer.join()
    sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("other")))  # anything else: the default hook
    assert "Event loop is closed" not in capfd.readouterr().err
    assert [repr(x) for x in seen] == ["ValueError('other')"]
    for task in tasks:  # never run again: the garbage collector need not say so
        task._log_destroy_pending = False


def test_a_read_only_workdir_is_one_line(tmp_path, monkeypatch):
    import errno
    from exo2ego_jax.errors import StorageError, storage_problem
    from exo2ego_jax.train import loop
    assert storage_problem(OSError(errno.EROFS, "x")) == "the folder is on a read-only filesystem"
    assert storage_problem(RuntimeError("outer")) is None
    wrapped = ValueError('OUT_OF_RANGE: Failed writing: "/w/x": No space left on device')
    try:
        raise RuntimeError("outer") from wrapped
    except RuntimeError as e:
        assert storage_problem(e) == "no space left on the device"
    # root may write into any folder, so the filesystem's refusal is injected where train() creates the workdir
    def refuse(path, exist_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", path)
    monkeypatch.setattr(loop.os, "makedirs", refuse)
    workdir = str(tmp_path / "w")
    with pytest.raises(StorageError, match=rf"workdir '{workdir}' failed: the folder is on a read-only filesystem"):
        loop.train(stage_config("stage1", num_train_steps=1), workdir, show_progress=False)


@pytest.mark.slow
def test_sigterm_says_what_was_saved_and_a_relaunch_resumes(tmp_path):
    first = launch_and_hold(tmp_path, 4)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143
    line = [x for x in err.splitlines() if x.strip()][-1]
    assert "Traceback" not in err and "stopped by SIGTERM" in line and "step 4" in line
    code, out, err = launch("stage3", tmp_path, *SHORT)
    assert code == 0 and "resumed from" in out, err[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 7))


# ---------------------------------------------------------------------------------------- fault injection

@pytest.mark.slow
def test_sigkill_at_random_steps_resumes_bit_identically(tmp_path):
    """A run killed at random moments (checkpoints every step and written asynchronously, so some kills land
    during a write) and relaunched until done equals an uninterrupted run, step by step and in its export."""
    flags = ("--config.num_train_steps=12", "--config.checkpoint_every=1", "--config.batch_size=4",
             "--config.data.num_examples=6", "--config.keep_checkpoints=2")
    code, _, err = launch("stage3", tmp_path / "full", *flags)
    assert code == 0, err[-3000:]
    rng = random.Random(0)
    killed = tmp_path / "killed"

    def last_step():
        try:
            return max((m["step"] for m in read_metrics(killed)), default=0)
        except (FileNotFoundError, json.JSONDecodeError):  # a line half-written when we look
            return 0

    kills = 0
    while True:
        before = last_step()
        proc = launch("stage3", killed, *flags, wait=False)
        if kills == 4:  # enough faults: let it finish
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            break
        # kill at a random moment after the relaunch has made progress (start-up time varies with load)
        while proc.poll() is None and last_step() <= before:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 2
    ref = {m["step"]: m for m in read_metrics(tmp_path / "full")}
    got = read_metrics(tmp_path / "killed")
    assert [m["step"] for m in got] == list(range(1, 13))  # nothing repeated, nothing skipped
    for m in got:
        assert m["batch_hash"] == ref[m["step"]]["batch_hash"] and m["loss"] == ref[m["step"]]["loss"]
    from exo2ego_jax.checkpoints import load_pretrained
    from exo2ego_jax.models.params import flatten
    _, a = load_pretrained(str(tmp_path / "full" / "export"))
    _, b = load_pretrained(str(tmp_path / "killed" / "export"))
    for (path, x), y in zip(sorted(flatten(a).items()), [v for _, v in sorted(flatten(b).items())]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
