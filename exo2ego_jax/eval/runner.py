"""Run benchmarks on a checkpoint: predictions (resumable JSONL), metrics JSON, a Markdown table with the paper.

Scoring modes (DATA_AND_BENCHMARKS §9), logged with every result:
  generate  greedy decoding of a letter prompt, VideoLLaMA2-style letter parsing (`metrics.parse_choice`);
            an unparsable answer becomes `fallback`: 'c' (option C, what VideoLLaMA2's scripts do) or 'wrong'.
  loglik    every option is scored as the answer turn; the lowest mean token loss wins (EgoPlan's official
            protocol: the prompt does not list the options). Charades-Ego and EK-100 MIR always use the
            per-option log-likelihoods as their score / similarity matrices.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from exo2ego_jax.data import prompts
from exo2ego_jax.eval.benchmarks import (AVG_METRICS, BENCHMARKS, DATA_DIRS, PAPER, PAPER_AVG, Benchmark, Item,
                                         average, item_problem)
from exo2ego_jax.errors import ConfigError, DataError
from exo2ego_jax.eval.metrics import parse_choice
from exo2ego_jax.locks import FolderLock
from exo2ego_jax.serve.inference import clip_pixels, generate_answers
from exo2ego_jax.serve.scoring import option_losses, option_rows

log = logging.getLogger(__name__)
FALLBACKS = ("c", "wrong")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    mode: str = ""                 # '' = the benchmark's default
    fallback: str = "c"
    prompt: str = "task_first_person"  # a row of the paper's Table 10 (data/prompts.py: PROMPTS)
    max_new_tokens: int = 16       # letters (open QA uses open_max_new_tokens)
    open_max_new_tokens: int = 64
    batch_size: int = 8            # clips per generation batch / questions per scoring batch
    option_chunk: int = 16         # (question, option) rows per scoring call
    aspect: str = "crop"
    strict: bool = False           # a malformed item is an error instead of a counted, logged skip

    def __post_init__(self):
        if self.mode not in ("", "generate", "loglik"):
            raise ConfigError(f"config field 'mode': {self.mode!r} is not '', 'generate' or 'loglik'")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"config field 'fallback': {self.fallback!r} is not one of {FALLBACKS}")
        if self.prompt not in prompts.PROMPTS:
            raise ConfigError(f"config field 'prompt': {self.prompt!r} is not one of {prompts.PROMPTS}")


def _pixels(model, item: Item, aspect: str) -> np.ndarray:
    return clip_pixels(item.video, model.num_frames, model.image_size, start=item.start, end=item.end,
                       frame_indices=item.frame_indices, aspect=aspect)


def _mode(bench: Benchmark, settings: EvalSettings) -> str:
    if bench.kind in ("multilabel", "retrieval"):
        return "loglik"
    if bench.kind == "open":
        return "generate"
    return settings.mode or bench.mode


def predict_batch(bench: Benchmark, items: Sequence[Item], pixels: np.ndarray, model, settings: EvalSettings
                  ) -> list[dict]:
    mode = _mode(bench, settings)
    if mode == "generate":
        if bench.kind == "open":
            texts = [prompts.with_prompt(i.question, settings.prompt) for i in items]
            answers = generate_answers(model, list(pixels), texts, max_new_tokens=settings.open_max_new_tokens)
            return [{"uid": i.uid, "pred": a, "mode": mode} for i, a in zip(items, answers)]
        texts = [prompts.mcq_prompt(i.question, i.options, style=bench.style, prompt=settings.prompt)
                 for i in items]
        answers = generate_answers(model, list(pixels), texts, max_new_tokens=settings.max_new_tokens)
        out = []
        for i, a in zip(items, answers):
            idx = parse_choice(a, len(i.options))
            parsed = idx is not None
            if not parsed:
                idx = 2 if settings.fallback == "c" and len(i.options) > 2 else -1
            out.append({"uid": i.uid, "pred": idx, "text": a, "parsed": parsed, "mode": mode})
        return out
    prompt_rows, option_ids = [], []
    for i in items:
        p, o = option_rows(model.tokenizer, prompts.with_prompt(i.question, settings.prompt), i.options)
        prompt_rows.append(p)
        option_ids.append(o)
    losses = option_losses(model.module, model.params, prompt_rows, option_ids, pixels=pixels,
                           pad_id=model.tokenizer.pad_token_id, chunk=settings.option_chunk)
    out = []
    for i, l in zip(items, losses):
        rec = {"uid": i.uid, "mode": mode, "scores": (-l).tolist()}
        if bench.kind == "mcq":
            rec["pred"] = int(np.argmin(l))
        out.append(rec)
    return out


def _read_predictions(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by an interruption: dropped and redone
                    log.warning("dropping a truncated line of %s", path)
    return out


SOURCE_FILE = "predictions_source.json"  # what the predictions beside it came from


def checkpoint_identity(path: str) -> dict:
    """Where a checkpoint is and which version of it: its real path and the newest change to its files (an
    export written again into the same folder is another model)."""
    if not path:
        return {"checkpoint": "", "modified": 0.0}
    newest = 0.0
    for dirpath, _, files in os.walk(path):
        for f in files:
            newest = max(newest, os.path.getmtime(os.path.join(dirpath, f)))
    return {"checkpoint": os.path.realpath(path), "modified": round(newest, 3)}


def prediction_source(model, name: str, data_root: str, settings: EvalSettings, load_options: dict | None) -> dict:
    """Everything a benchmark's predictions depend on: the model (checkpoint, its version, the fusion it reads
    with), the prompt and scoring settings, and the benchmark's data and options."""
    fields = ("mode", "fallback", "prompt", "max_new_tokens", "open_max_new_tokens", "aspect")
    return {**checkpoint_identity(getattr(model, "path", "")), "fusion": getattr(model.config, "fusion", None),
            "benchmark": name, "data_root": os.path.realpath(data_root),
            **{k: getattr(settings, k) for k in fields},
            "load_options": json.loads(json.dumps(load_options or {}, default=str))}


def check_prediction_source(bench_dir: str, source: dict, *, overwrite: bool) -> None:
    """Predictions in `bench_dir` are reused only when they came from the same source; otherwise refused with
    the differences named, or discarded when `overwrite`."""
    pred_path = os.path.join(bench_dir, "predictions.jsonl")
    path = os.path.join(bench_dir, SOURCE_FILE)
    if os.path.exists(pred_path):
        try:
            with open(path) as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = {}
        changed = [f"{k}: {recorded.get(k, '(not recorded)')!r} -> {v!r}" for k, v in source.items()
                   if recorded.get(k) != v]
        if changed and not overwrite:
            raise ConfigError(f"{bench_dir} holds predictions of another evaluation ({'; '.join(changed)}); give "
                              "another --out, or --overwrite to discard them and score again")
        if changed:
            log.warning("%s: discarding predictions of another evaluation (%s)", bench_dir, "; ".join(changed))
            os.remove(pred_path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(source, f, indent=1)
    os.replace(tmp, path)


def run_benchmark(name: str, data_root: str, model, out_dir: str, *, settings: EvalSettings = EvalSettings(),
                  load_options: dict | None = None, judge: Callable | None = None,
                  show_progress: bool = True, items: list | None = None, overwrite: bool = False) -> dict:
    """Predict every item not yet in `out_dir/name/predictions.jsonl` (kept only if they came from the same
    model and settings, `check_prediction_source`), then compute the metrics."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    if items is None:
        opts = dict(load_options or {})
        opts.setdefault("num_frames", model.num_frames)
        items = bench.load(data_root, **opts)
    if not items:
        raise DataError(f"{name}: no items under {data_root!r}")
    bench_dir = os.path.join(out_dir, name)
    os.makedirs(bench_dir, exist_ok=True)
    check_prediction_source(bench_dir, prediction_source(model, name, data_root, settings, load_options),
                            overwrite=overwrite)
    pred_path = os.path.join(bench_dir, "predictions.jsonl")
    records = {r["uid"]: r for r in _read_predictions(pred_path)}
    with open(pred_path, "w") as f:  # rewrite without a line an interruption cut short, then append
        f.writelines(json.dumps(r) + "\n" for r in records.values())
    todo = [i for i in items if i.uid not in records]
    bad = {i.uid: p for i in todo if (p := item_problem(i, bench.kind, data_root))}
    if bad and settings.strict:
        uid, problem = next(iter(bad.items()))
        raise DataError(f"{name} item {uid}: {problem} ({len(bad)} malformed item(s)); fix the annotations or run "
                        "without --strict to skip them")
    for uid, problem in bad.items():
        records[uid] = {"uid": uid, "skipped": f"malformed item: {problem}"}
        log.warning("%s: skipped %s: %s", name, uid, problem)
    if bad:
        with open(pred_path, "a") as f:
            f.writelines(json.dumps(records[uid]) + "\n" for uid in bad)
        todo = [i for i in todo if i.uid not in bad]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=name, unit="item", disable=not show_progress)
    with open(pred_path, "a") as f:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start:start + settings.batch_size]
            ready, pixels = [], []
            for item in batch:
                try:
                    pixels.append(_pixels(model, item, settings.aspect))
                    ready.append(item)
                except DataError as e:  # a missing / corrupt video: counted, reported, never scored as wrong
                    rec = {"uid": item.uid, "skipped": str(e)}
                    records[item.uid] = rec
                    f.write(json.dumps(rec) + "\n")
                    log.warning("%s: skipped %s: %s", name, item.uid, e)
            if ready:
                for rec in predict_batch(bench, ready, np.stack(pixels), model, settings):
                    records[rec["uid"]] = rec
                    f.write(json.dumps(rec) + "\n")
            f.flush()
            bar.update(len(batch))
    bar.close()
    preds = [records[i.uid] for i in items if "skipped" not in records[i.uid]]
    skipped = sum("skipped" in records[i.uid] for i in items)
    metrics = bench.metrics(preds, items, out_dir=bench_dir, judge=judge) if preds else {}
    metrics.update({f"{name}_skipped": skipped, f"{name}_mode": _mode(bench, settings)})
    if bench.kind == "mcq" and _mode(bench, settings) == "generate":
        metrics[f"{name}_unparsed"] = sum(not p.get("parsed", True) for p in preds)
    with open(os.path.join(bench_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def results_table(metrics: dict) -> str:
    """Markdown: every paper metric we have, ours next to the paper's, then the Avg of the ten."""
    rows = ["| metric | ours | paper (Exo2Ego) |", "|---|---|---|"]
    for key, paper in PAPER.items():
        if key in metrics:
            rows.append(f"| {key} | {metrics[key]:.1f} | {paper} |")
    for key, value in sorted(metrics.items()):
        if key not in PAPER and isinstance(value, float) and not key.endswith(("_n", "_skipped", "_unparsed")):
            rows.append(f"| {key} | {value:.1f} | - |")
    avg = average(metrics)
    missing = [k for k in AVG_METRICS if k not in metrics]
    shown = f"{avg:.1f}" if avg is not None else f"n/a (missing {', '.join(missing)})"
    rows.append(f"| **Avg (10)** | {shown} | {PAPER_AVG} |")
    return "\n".join(rows)


def run_suite(names: Sequence[str], data_root: str, model, out_dir: str, *, settings: EvalSettings,
              load_options: dict | None = None, judge=None, show_progress: bool = True,
              overwrite: bool = False) -> dict:
    """Each benchmark from `data_root/<its folder>`; writes results.json and results.md in `out_dir`, which is
    locked while the evaluation writes it (a second evaluation into it is refused)."""
    os.makedirs(out_dir, exist_ok=True)
    with FolderLock(out_dir, what="evaluation output folder"):
        return _run_suite(names, data_root, model, out_dir, settings=settings, load_options=load_options,
                          judge=judge, show_progress=show_progress, overwrite=overwrite)


def _run_suite(names, data_root, model, out_dir, *, settings, load_options, judge, show_progress, overwrite):
    metrics = {}
    for name in names:
        root = os.path.join(data_root, DATA_DIRS.get(name, name))
        if len(names) == 1 and not os.path.isdir(root):
            root = data_root  # a single benchmark may be pointed at its own folder directly
        metrics.update(run_benchmark(name, root, model, out_dir, settings=settings,
                                     load_options=(load_options or {}).get(name), judge=judge,
                                     show_progress=show_progress, overwrite=overwrite))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"metrics": metrics, "avg": average(metrics), "settings": dataclasses.asdict(settings),
                   "checkpoint": getattr(model, "path", "")}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_table(metrics) + "\n")
    return metrics
