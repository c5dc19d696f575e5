"""Zero-shot evaluation on the egocentric benchmarks.

  python launch/evaluate.py --config configs/eval.py:all --checkpoint DIR --data_root DIR [--out DIR]
                            [--fusion none|mapped|tokens|frames] [--strict] [--config.prompt=base ...]

Writes, per benchmark, OUT/<benchmark>/predictions.jsonl (one line per item, appended as it goes: an
interrupted run resumes where it stopped) and metrics.json; then OUT/results.json and OUT/results.md (our
numbers next to the paper's, with the Avg of the ten sub-metrics). OUT defaults to CHECKPOINT/eval. The model
reads its clips with the fusion it was trained with (recorded in the checkpoint) unless --fusion says otherwise.
Predictions are reused only for the same model (checkpoint and its version), fusion, prompt, scoring settings
and benchmark options (OUT/<benchmark>/predictions_source.json); anything else is refused, naming what differs,
unless --overwrite. OUT is locked while an evaluation writes it.
"""
import importlib
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import argparse

from exo2ego_jax.configfile import load_config_file, split_config_args
from exo2ego_jax.errors import ConfigError, run_config_cli
from exo2ego_jax.eval.benchmarks import BENCHMARKS
from exo2ego_jax.eval.runner import EvalSettings, results_table, run_suite
from exo2ego_jax.models.exo2ego import FUSIONS
from exo2ego_jax.serve.inference import load_model
from exo2ego_jax.paths import absolute

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "eval.py") + ":all"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="config overrides: --config.FIELD=VALUE for any field of configs/eval.py, e.g. "
                                       "--config.mode=loglik --config.prompt=base --config.max_items=100")
    p.add_argument("--config", metavar="FILE:PRESET", help="configs/eval.py:<benchmark[,benchmark...]|all>")
    p.add_argument("--checkpoint", type=absolute, required=True, help="converted checkpoint or a stage's export/ folder")
    p.add_argument("--data_root", type=absolute, required=True, help="benchmark data root")
    p.add_argument("--out", type=absolute, help="output folder (default: CHECKPOINT/eval)")
    p.add_argument("--fusion", choices=FUSIONS, help="override the checkpoint's fusion of x and F(x)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard predictions in --out that came from another model or other settings (default: "
                        "refuse them, naming the difference)")
    p.add_argument("--strict", action="store_true",
                   help="a malformed benchmark item is an error instead of a counted, logged skip")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.add_argument("--noprogress", dest="progress", action="store_false", help=argparse.SUPPRESS)
    return p


def load_judge(spec: str):
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config field 'judge': cannot import {spec!r} ({e}); give 'module:function'") from e


def main(argv) -> int:
    path, preset, overrides, rest = split_config_args(argv, default=DEFAULT_CONFIG)
    a = parser().parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    c = load_config_file(path, preset, overrides)
    unknown = [b for b in c.benchmarks if b not in BENCHMARKS]
    if unknown:  # before the (slow) model load
        raise ConfigError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)} (or 'all')")
    settings = EvalSettings(mode=c.mode, fallback=c.fallback, prompt=c.prompt, max_new_tokens=c.max_new_tokens,
                            open_max_new_tokens=c.open_max_new_tokens, batch_size=c.batch_size,
                            option_chunk=c.option_chunk, aspect=c.aspect, strict=a.strict)
    options = {name: {"max_items": c.max_items} for name in c.benchmarks}
    options.get("qaego4d_closed", {}).update(seeds=tuple(c.qaego4d_seeds))
    options.get("egoschema", {}).update(subset_only=c.egoschema_subset_only)
    options.get("ek100_mir", {}).update(max_sentences=c.ek100_max_sentences)
    options.get("mcq_json", {}).update(file=c.mcq_file, video_key=c.mcq_video_key)
    judge = load_judge(c.judge)
    model = load_model(a.checkpoint, fusion=a.fusion)
    out = a.out or os.path.join(a.checkpoint, "eval")
    metrics = run_suite(tuple(c.benchmarks), a.data_root, model, out, settings=settings, load_options=options,
                        judge=judge, show_progress=a.progress, overwrite=a.overwrite)
    print(results_table(metrics))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    run_config_cli(parser, main)
