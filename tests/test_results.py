"""Results you can trust: the stage's fusion travels with its export, config overrides a checkpoint cannot
satisfy are errors (or re-initialise the modules), the KL variants, the synthetic task hides in the ego view what
the exo view shows, the intervals, and the ablation study end to end."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from exo2ego_jax.errors import ConfigError
from exo2ego_jax.eval.stats import bootstrap_mean, paired_bootstrap, wilson_interval
from exo2ego_jax.losses import feature_kl
from exo2ego_jax.models.params import flatten
from exo2ego_jax.study import runs as study
from tests.helpers import ROOT, stage_config
from tests.xla_flags import cpu_devices


def train_tiny(stage_file, workdir, **overrides):
    from exo2ego_jax.train.loop import train
    base = {"num_train_steps": 2, "batch_size": 2, "checkpoint_every": 100, "data.num_examples": 2,
            "mesh.shape": (1, 1, 1), "mesh.num_devices": 1}
    return train(stage_config(stage_file, **{**base, **overrides}), str(workdir), show_progress=False)


@pytest.fixture(scope="module")
def baseline_export(tmp_path_factory):
    """A stage-3 run with fusion none (the VideoLLaMA2 baseline's recipe)."""
    return train_tiny("stage3", tmp_path_factory.mktemp("baseline"), fusion="none").export_dir


def option_scores(module, params, fusion=None):
    from exo2ego_jax.serve.scoring import option_losses
    cfg = module.config
    pixels = np.random.default_rng(0).normal(size=(2, cfg.num_frames, cfg.clip.image_size, cfg.clip.image_size, 3))
    prompts = [[1, -201, 9, 10], [1, -201, 11]]
    options = [[[12, 13], [14]], [[15], [16, 17]]]
    return np.concatenate(option_losses(module, params, prompts, options, pixels=pixels.astype(np.float32),
                                        fusion=fusion, chunk=4))


@pytest.mark.slow
def test_fusion_none_stage_exports_none_and_is_served_without_f(baseline_export):
    from exo2ego_jax.checkpoints import load_pretrained, read_model_config
    assert read_model_config(baseline_export)["config"]["fusion"] == "none"
    module, params = load_pretrained(baseline_export)
    assert module.config.fusion == "none"
    before = option_scores(module, params)
    # F is not on the path: scrambling its params changes nothing; asking for F(x) tokens changes the scores
    noisy = dict(params, mapper_f=jax.tree.map(lambda p: p + 1.0, params["mapper_f"]))
    np.testing.assert_array_equal(option_scores(module, noisy), before)
    assert not np.allclose(option_scores(module, params, fusion="tokens"), before)


@pytest.mark.slow
def test_override_the_checkpoint_cannot_satisfy_is_an_error_or_a_reinit(baseline_export, tmp_path):
    from exo2ego_jax.train.config import resolve
    c = stage_config("stage3", **{"init.checkpoint": baseline_export, "model.mapper.kind": "mlp"})
    with pytest.raises(ConfigError, match=r"model\.mapper\.kind='mlp' but the checkpoint has 'resnet'.*"
                                          r"init\.reinit"):
        resolve(c)
    result = train_tiny("stage3", tmp_path, **{"init.checkpoint": baseline_export, "model.mapper.kind": "mlp",
                                               "init.reinit": ("mapper_f", "mapper_g")})
    from exo2ego_jax.checkpoints import load_pretrained
    module, params = load_pretrained(result.export_dir)
    assert module.config.mapper.kind == "mlp" and "in_proj" in params["mapper_f"]
    # everything else comes from the checkpoint: the frozen exo encoder is unchanged
    _, before = load_pretrained(baseline_export)
    np.testing.assert_array_equal(np.asarray(flatten(params["exo_encoder"])["pre_layrnorm/scale"]),
                                  np.asarray(flatten(before["exo_encoder"])["pre_layrnorm/scale"]))


def test_pooled_kl_does_not_assume_aligned_views():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 3, 16, 8)).astype(np.float32)
    fx = rng.normal(size=(2, 3, 16, 8)).astype(np.float32)
    shuffled = y[:, :, rng.permutation(16)]  # the same content at other grid positions (another camera)
    pooled = lambda a: float(feature_kl(a, fx, mode="pooled"))
    tokens = lambda a: float(feature_kl(a, fx, mode="tokens"))
    assert pooled(shuffled) == pytest.approx(pooled(y), rel=1e-6)
    assert tokens(shuffled) != pytest.approx(tokens(y), rel=1e-3)
    p, q = jax.nn.softmax(y.mean(2), -1), jax.nn.softmax(fx.mean(2), -1)  # by hand: KL(p || q), mean over frames
    assert pooled(y) == pytest.approx(float(np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))), rel=1e-5)


def test_synthetic_ego_view_hides_what_the_exo_view_shows():
    from exo2ego_jax.data import synthetic as S
    objects = [dict(colour="red", shape="cube", x=0.5, y=0.62)]
    for action in S.ACTIONS:
        event = S.Event(action, "red", "cube", 0.0, 1.0, "")
        pos0, _, gaze0 = S._state(objects, [event], 0.0, ego_cue=0.3)
        pos1, _, gaze1 = S._state(objects, [event], 0.75, ego_cue=0.3)
        world = np.subtract(pos1[0], pos0[0])          # what a fixed (exo) camera sees the object do
        in_ego = world - np.subtract(gaze1, gaze0)       # what is left once the gaze has followed it
        np.testing.assert_allclose(in_ego, 0.3 * world, atol=1e-9)
    options, answer = S._options(S.Event("pushes left", "red", "cube", 0, 1, ""), __import__("random").Random(0))
    assert sorted(options) == sorted(S.canonical(a, "red", "cube") for a in S.ACTIONS)
    assert options[answer] == "C pushes the red cube to the left"


def test_intervals_on_hand_made_cases():
    assert wilson_interval(0, 10)[0] == 0.0 and 0 < wilson_interval(0, 10)[1] < 0.35
    lo, hi = wilson_interval(75, 100)
    assert lo == pytest.approx(0.6566, abs=1e-3) and hi == pytest.approx(0.8245, abs=1e-3)
    ones, zeros = np.ones((3, 50)), np.zeros((3, 50))
    assert paired_bootstrap(ones, zeros) == {"diff": 1.0, "ci95": [1.0, 1.0]}
    assert paired_bootstrap(ones, ones) == {"diff": 0.0, "ci95": [0.0, 0.0]}
    # one seed, the first model right on 60 of 100 items where the second is wrong and wrong on 20 where it is
    # right: diff 0.4, and its standard error is sqrt((0.6 + 0.2 - 0.4^2) / 100) = 0.08
    a = np.zeros(100)
    b = np.zeros(100)
    a[:60] = 1
    b[60:80] = 1
    d = paired_bootstrap(a, b, draws=20000)
    assert d["diff"] == pytest.approx(0.4)
    assert d["ci95"][0] == pytest.approx(0.4 - 1.96 * 0.08, abs=0.02)
    assert d["ci95"][1] == pytest.approx(0.4 + 1.96 * 0.08, abs=0.02)
    m = bootstrap_mean(np.stack([a, a]))
    assert m["mean"] == pytest.approx(0.6) and m["ci95"][0] < 0.6 < m["ci95"][1]
    with pytest.raises(ValueError, match="same seeds and items"):
        paired_bootstrap(np.ones((2, 5)), np.ones((1, 5)))


def test_study_plan_shares_prefixes_and_gives_every_variant_its_recipe():
    budget = study.Budget(stage0=5, stage1=6, stage2=7, stage3=8)
    jobs = study.plan(study.VARIANTS, 1, budget, {"log_every": 1}, caption_lr=1e-3)
    # one init and one stage 1 per seed; wo_lora reuses the full stage 2; the baselines caption instead
    assert sum(j.stage_file == "stage0" and j.after is None for j in jobs.values()) == 1
    assert [n for n, j in jobs.items() if j.stage_file == "stage1"] == ["seed1/stage1"]
    assert jobs["seed1/stage3_wo_lora"].after == "seed1/stage2_full"
    assert jobs["seed1/stage3_wo_lora"].overrides["lora.enabled"] is False
    assert jobs["seed1/stage2_wo_kl"].overrides["loss.use_kl"] is False
    assert jobs["seed1/stage2_fc_mapper"].overrides["init.reinit"] == ("mapper_f", "mapper_g")
    assert jobs["seed1/stage3_fc_mapper"].overrides["model.mapper.kind"] == "mlp"
    for v in ("baseline", "exo_oracle"):
        caption, final = jobs[f"seed1/caption_{v}"], jobs[study.final_job(1, v)]
        assert caption.after == "seed1/init" and final.after == f"seed1/caption_{v}"
        assert caption.overrides["num_train_steps"] == budget.stage1 + budget.stage2  # the same budget
        assert final.overrides["fusion"] == "none" and "mapper_f/.*" not in final.overrides["trainable"]
        assert final.overrides.get("data.swap_views", False) is (v == "exo_oracle")
    for v in study.VARIANTS:  # every variant trains stage 3 for the same number of steps from the same seed
        assert jobs[study.final_job(1, v)].overrides["num_train_steps"] == 8
        assert jobs[study.final_job(1, v)].overrides["seed"] == 1
    # every job comes after one that exists
    assert all(j.after is None or j.after in jobs for j in jobs.values())


@pytest.mark.slow
def test_ablation_quick_end_to_end(tmp_path):
    """Exo2Ego and the baseline (its own chain) through the launch scripts; the other variants differ from `full`
    only in their overrides, checked above."""
    variants = ("full", "baseline")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "ablate.py"), "--workdir", str(tmp_path),
                           "--quick", "--variants", ",".join(variants), "--parallel", "1"],
                          capture_output=True, text=True, timeout=1500, env={**os.environ, "XLA_FLAGS": cpu_devices(1)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert set(r["variants"]) == set(variants) and r["n_items"] == 3
    for v in r["variants"].values():
        assert len(v["accuracy"]) == 1 and 0 <= v["mean"] <= 100 and v["std"] == 0.0
    assert set(r["comparisons"]) == {"full-baseline"}
    for c in r["comparisons"].values():
        assert c["ci95"][0] <= c["diff"] <= c["ci95"][1]
    assert (tmp_path / "results.md").read_text().startswith("# Ablation study")
    # the premise it was run under, and the probes of every stage of every variant
    assert r["setup"]["init_views"]["exo"] > 0.9 and r["setup"]["shared_tower"] is True
    assert r["setup"]["mapper_residual"] is True
    lr = r["setup"]["learning_rates"]
    assert lr["stage1"] == lr["stage2"] > lr["stage3"]
    assert set(r["probes"]["full"]) == {"init", "stage1", "stage2", "stage3"}
    assert set(r["probes"]["baseline"]) == {"init", "stage2", "stage3"}  # its captioning run stands at stage 2
    for stages in r["probes"].values():
        for feats in stages.values():
            assert set(feats) == {"x", "y", "Fx", "stc_x", "stc_Fx"}
            for f in feats.values():
                assert f["n"] == 3 and f["ci95"][0] <= f["accuracy"] <= f["ci95"][1]
    # stage 2 logs how peaked the KL's target is, whatever the variant
    rows = [json.loads(x) for x in (tmp_path / "runs" / "seed0" / "stage2_full" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl_target_entropy" in m and "kl_target_top_mass" in m for m in rows if "loss" in m)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for variant in variants:  # every variant went through the launch scripts and was scored on the same items
        assert (tmp_path / "runs" / "seed0" / f"stage3_{variant}" / "export" / "model_config.json").exists()
    baseline = json.loads((tmp_path / "runs" / "seed0" / "stage3_baseline" / "config.json").read_text())
    assert baseline["fusion"] == "none"
    # scored with the prompt the synthetic conversations ask in, and the results say so
    assert r["prompt"] == "base"
    for variant in variants:
        scored = json.loads((tmp_path / "eval_test" / "seed0" / variant / "results.json").read_text())
        assert scored["settings"]["prompt"] == "base" and scored["settings"]["mode"] == "loglik"
