"""Zero-shot evaluation on the egocentric benchmarks.

  python launch/evaluate.py --config configs/eval.py:all --checkpoint DIR --data_root DIR [--out DIR]

Writes, per benchmark, OUT/<benchmark>/predictions.jsonl (one line per item, appended as it goes: an
interrupted run resumes where it stopped) and metrics.json; then OUT/results.json and OUT/results.md (our
numbers next to the paper's, with the Avg of the ten sub-metrics). OUT defaults to CHECKPOINT/eval.
"""
import importlib
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags
from ml_collections import config_flags

from exo2ego_jax.errors import Exo2EgoError
from exo2ego_jax.eval.runner import EvalSettings, results_table, run_suite
from exo2ego_jax.serve.inference import load_model

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "eval.py") + ":all", "eval config")
flags.DEFINE_string("checkpoint", None, "converted checkpoint or a stage's export/ folder", required=True)
flags.DEFINE_string("data_root", None, "benchmark data root", required=True)
flags.DEFINE_string("out", None, "output folder (default: CHECKPOINT/eval)")
flags.DEFINE_bool("progress", True, "progress bars")
FLAGS = flags.FLAGS


def load_judge(spec: str):
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    c = FLAGS.config
    try:
        settings = EvalSettings(mode=c.mode, fallback=c.fallback, first_person=c.first_person,
                                max_new_tokens=c.max_new_tokens, open_max_new_tokens=c.open_max_new_tokens,
                                batch_size=c.batch_size, option_chunk=c.option_chunk, aspect=c.aspect)
        options = {name: {"max_items": c.max_items} for name in c.benchmarks}
        options.get("qaego4d_closed", {}).update(seeds=tuple(c.qaego4d_seeds))
        options.get("egoschema", {}).update(subset_only=c.egoschema_subset_only)
        options.get("ek100_mir", {}).update(max_sentences=c.ek100_max_sentences)
        model = load_model(FLAGS.checkpoint)
        out = FLAGS.out or os.path.join(FLAGS.checkpoint, "eval")
        metrics = run_suite(tuple(c.benchmarks), FLAGS.data_root, model, out, settings=settings,
                            load_options=options, judge=load_judge(c.judge), show_progress=FLAGS.progress)
    except Exo2EgoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(results_table(metrics))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
