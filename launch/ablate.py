"""The ablation study on the synthetic ego-exo task: every variant through the launch scripts, matched budgets,
several seeds, scored on held-out questions with paired confidence intervals, and linear probes of where the
action is present after every stage.

  python launch/ablate.py --workdir W [--variants full,baseline,...] [--seeds 0,1,2,3,4,5]
                          [--secondary_seeds 0,1,2] [--items test|val] [--quick] [--parallel 2]

Variants (exo2ego_jax/study/runs.py): full, baseline (VideoLLaMA2 on the same data), wo_kl, fwd_cycle, wo_cycle,
fc_mapper, wo_lora, kl_pooled (the KL on pooled features), exo_oracle (the exo camera at test time); and, not run
by default, cyclegan_mapper and instance_norm_mapper (the mapper choices compared on --items val). The
primary variants (full, baseline, wo_kl, exo_oracle) run --seeds, the others --secondary_seeds.
The data (seed 0, the `demo` size: 40 training takes; 300 four-option questions from 50 held-out takes) is
built once in W/data; the runs go to W/runs/seed<S>/..., their logs to W/runs/logs. Each variant's stage-3
export answers W/data/raw/mcq_test.json by option log-likelihood (launch/evaluate.py). Writes W/results.json
  {"n_items", "variants": {name: {"accuracy": [per seed], "mean", "std", "ci95", "seeds"}},
   "comparisons": {"full-baseline": {"diff", "ci95", "seeds"}, ...},
   "probes": {variant: {stage: {feature: {"accuracy", "ci95", "n"}}}},
   "setup": {"init_views", "shared_tower", "mapper_residual", "mapper_norm", "learning_rates"}, ...}
(accuracies in %; intervals from a bootstrap over seeds and items), W/results.md and W/results.png.
The held-out questions are never used to choose anything; --items val scores W/data/raw/mcq_val.json, the
validation set, into W/results_val.*. A rerun resumes: finished stage runs and evaluations are kept.
--quick: seed 0, the `tests` data size (a handful of questions) and a few steps per stage: the path in minutes.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exo2ego_jax.errors import run_cli
from exo2ego_jax.study import ablation
from exo2ego_jax.paths import absolute


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=absolute, required=True)
    p.add_argument("--variants", default=",".join(ablation.STUDY_VARIANTS),
                   help=f"comma-separated, from {','.join(ablation.VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2,3,4,5", help="seeds of the primary variants")
    p.add_argument("--secondary_seeds", default="", help="seeds of the other variants (default: the first 3 of --seeds)")
    p.add_argument("--quick", action="store_true", help="seed 0, tiny data and budgets: the path in minutes")
    p.add_argument("--parallel", type=int, default=2, help="stage runs at a time")
    p.add_argument("--budget", default="", help="steps of stage0,stage1,stage2,stage3 instead of the study's")
    p.add_argument("--items", choices=("test", "val"), default="test",
                   help="test: the held-out questions (reporting); val: the validation questions (choosing settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every stage run of the study (a setting compared on --items val)")
    p.add_argument("--echo", action="store_true", help="show every stage's output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    ablation.run(ablation.Options(
        workdir=a.workdir, variants=tuple(v for v in a.variants.split(",") if v),
        seeds=ablation.parse_seeds(a.seeds), secondary_seeds=ablation.parse_seeds(a.secondary_seeds),
        quick=a.quick, parallel=a.parallel, budget=a.budget, items=a.items,
        overrides=ablation.parse_overrides(a.set), echo=a.echo))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
