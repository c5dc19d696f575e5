"""Linear probes: where in the model the synthetic action is present, stage by stage.

For one export, five features of every probe clip: x (ego encoder on the clip the variant reads), y (exo encoder
on the synchronised exo clip), F(x), STC(x) and STC(F(x)). Each is mean-pooled over space (the patch grid, or
the STC's spatial tokens) with the frames kept in order and concatenated, so a probe sees where things are and
how that changes over the clip, as an action needs. A multinomial logistic regression on standardised features
is fit on the training takes' clips and scored on held-out takes' clips; accuracy comes with n and a Wilson 95%
interval (one run) or a bootstrap over seeds and items (several).

A probe reads what a linear readout *could* take from a feature; the LLM reads it through the connector and
attention, so a probe's accuracy is an upper bound on what the LLM gets from that feature, not what it uses.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from exo2ego_jax.checkpoints import load_pretrained
from exo2ego_jax.data import synthetic
from exo2ego_jax.eval.stats import bootstrap_mean, wilson_interval
from exo2ego_jax.serve.inference import clip_pixels

FEATURES = ("x", "y", "Fx", "stc_x", "stc_Fx")
STAGES = ("init", "stage1", "stage2", "stage3")


@dataclasses.dataclass
class Clips:
    """Probe clips: normalised pixels of the ego and exo views [N, T, S, S, 3] and action labels [N]."""
    ego: np.ndarray
    exo: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def synthetic_items(raw_root: str, heldout_file: str) -> tuple[list[dict], list[dict]]:
    """(training clips, held-out clips) of the synthetic set as {video, exo_video, start, end, label}: the
    training takes' captioning conversations and the held-out questions (`mcq_test.json` or `mcq_val.json`)."""
    with open(os.path.join(raw_root, "egoit_synthetic.json")) as f:
        train = [dict(video=it["video"], exo_video=it["exo_video"], start=it["start"], end=it["end"],
                      label=synthetic.action_of(it["conversations"][1]["value"]))
                 for it in json.load(f) if it["id"].endswith("_describe")]
    with open(os.path.join(raw_root, heldout_file)) as f:
        heldout = [dict(video=it["video"], exo_video=it["exo_video"], start=it["start"], end=it["end"],
                        label=synthetic.action_of(it["options"][it["answer"]])) for it in json.load(f)]
    return train, heldout


def load_clips(raw_root: str, items: Sequence[dict], *, num_frames: int, image_size: int, cache: str | None = None
               ) -> Clips:
    """Decode every item's two clips the way evaluation does (uniform frames over [start, end], CLIP
    preprocessing); cached in `cache` (.npz) when given, since every export of a study probes the same clips."""
    if cache and os.path.exists(cache):
        with np.load(cache) as z:
            return Clips(z["ego"], z["exo"], z["labels"])
    read = lambda it, key: clip_pixels(os.path.join(raw_root, it[key]), num_frames, image_size,
                                       start=it["start"], end=it["end"])
    clips = Clips(np.stack([read(it, "video") for it in items]), np.stack([read(it, "exo_video") for it in items]),
                  np.asarray([it["label"] for it in items], np.int32))
    if cache:
        tmp = cache + ".tmp.npz"
        np.savez(tmp, ego=clips.ego, exo=clips.exo, labels=clips.labels)
        os.replace(tmp, cache)
    return clips


def _pool_grid(feats: jax.Array) -> jax.Array:
    """[B, T, P, C] -> [B, T * C]: the mean over the patch grid of each frame, frames in order."""
    return jnp.mean(feats.astype(jnp.float32), axis=2).reshape(feats.shape[0], -1)


def _pool_tokens(tokens: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """STC tokens [B, t*h*w, D] -> [B, t * D]: the mean over each temporal window's spatial tokens."""
    t, h, w = grid
    b, _, d = tokens.shape
    return jnp.mean(tokens.astype(jnp.float32).reshape(b, t, h * w, d), axis=2).reshape(b, -1)


def feature_fn(module):
    """A jitted (params, ego, exo) -> {feature: [B, D]} for the module's config."""
    cfg = module.config
    grid = cfg.stc.output_grid(cfg.num_frames, cfg.grid)

    def run(m, ego, exo):
        x = m.encode(ego, "ego")
        y = m.encode(exo, "exo")
        fx = m.map_f(x)
        return {"x": _pool_grid(x), "y": _pool_grid(y), "Fx": _pool_grid(fx),
                "stc_x": _pool_tokens(m.connect(x, fusion="none"), grid),
                "stc_Fx": _pool_tokens(m.connect(fx, fusion="none"), grid)}

    return jax.jit(lambda params, ego, exo: module.apply({"params": params}, ego, exo, method=run))


def features(module, params, clips: Clips, *, batch: int = 32, fn=None) -> dict[str, np.ndarray]:
    fn = fn or feature_fn(module)
    parts = [fn(params, clips.ego[i:i + batch], clips.exo[i:i + batch]) for i in range(0, len(clips), batch)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in FEATURES}


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
                 ) -> np.ndarray:
    """Fit on (train_x, train_y), return 1/0 correctness per test row. Standardised features (fit on the
    training rows), L2-regularised multinomial logistic regression (C = 1)."""
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=1.0, max_iter=5000)
    clf.fit(scaler.transform(train_x), train_y)
    return (clf.predict(scaler.transform(test_x)) == test_y).astype(np.int8)


def summarize(correct: np.ndarray) -> dict:
    """Accuracy (%) with a 95% interval from a [seeds, items] or [items] 0/1 array: Wilson for one run, the
    bootstrap over seeds and items for several."""
    m = np.atleast_2d(correct)
    if m.shape[0] == 1:
        lo, hi = wilson_interval(int(m.sum()), m.shape[1])
    else:
        lo, hi = bootstrap_mean(m)["ci95"]
    out = {"accuracy": 100.0 * float(m.mean()), "ci95": [100.0 * lo, 100.0 * hi], "n": int(m.shape[1])}
    if m.shape[0] > 1:
        out["per_seed"] = [100.0 * float(r.mean()) for r in m]
    return out


class Prober:
    """Probes exports against one pair of clip sets, caching per export (a study's variants share prefixes)."""

    def __init__(self, train: dict[str, Clips], heldout: dict[str, Clips]):
        # {video_key: Clips}: the clips a variant's ego input reads ("video", or "exo_video" for the oracle)
        self.train, self.heldout = train, heldout
        self._fns: dict = {}
        self._cache: dict = {}

    def correctness(self, export: str, video_key: str = "video") -> dict[str, np.ndarray]:
        """{feature: 1/0 per held-out clip} for the export at `export`."""
        key = (os.path.realpath(export), video_key)
        if key not in self._cache:
            module, params = load_pretrained(export)
            fn = self._fns.setdefault(module.config, feature_fn(module))
            train = features(module, params, self.train[video_key], fn=fn)
            test = features(module, params, self.heldout[video_key], fn=fn)
            self._cache[key] = {k: linear_probe(train[k], self.train[video_key].labels, test[k],
                                                self.heldout[video_key].labels) for k in FEATURES}
        return self._cache[key]


def exo_as_ego(clips: Clips) -> Clips:
    """The exo-view oracle's inputs: the exo clip in the ego slot (its exo encoder still reads the exo clip)."""
    return Clips(clips.exo, clips.exo, clips.labels)


def prober_for(raw_root: str, heldout_file: str, *, num_frames: int, image_size: int, cache_dir: str) -> Prober:
    train_items, heldout_items = synthetic_items(raw_root, heldout_file)
    os.makedirs(cache_dir, exist_ok=True)
    stem = os.path.join(cache_dir, f"probe_clips_{num_frames}x{image_size}")
    train = load_clips(raw_root, train_items, num_frames=num_frames, image_size=image_size, cache=stem + "_train.npz")
    heldout = load_clips(raw_root, heldout_items, num_frames=num_frames, image_size=image_size,
                         cache=stem + "_" + os.path.splitext(heldout_file)[0] + ".npz")
    return Prober({"video": train, "exo_video": exo_as_ego(train)},
                  {"video": heldout, "exo_video": exo_as_ego(heldout)})


def study_probes(prober: Prober, runs_dir: str, variants: Sequence[str], seeds_of: dict, stage_jobs,
                 video_key) -> dict:
    """{variant: {stage: {feature: {accuracy, ci95, n[, per_seed]}}}} over the variant's seeds
    (`seeds_of[variant]`), for every stage whose exports exist under `runs_dir` for all of them
    (`stage_jobs(seed, variant)` -> {stage: job name})."""
    out: dict = {}
    for v in variants:
        seeds = seeds_of[v]
        per_stage: dict = {}
        for stage in STAGES:
            rows = []
            for seed in seeds:
                job = stage_jobs(seed, v).get(stage)
                export = os.path.join(runs_dir, job, "export") if job else ""
                if job and os.path.exists(os.path.join(export, "model_config.json")):
                    rows.append(prober.correctness(export, video_key(v)))
            if len(rows) == len(seeds):
                per_stage[stage] = {k: summarize(np.stack([r[k] for r in rows])) for k in FEATURES}
        out[v] = per_stage
    return out
