"""Linear probes of the synthetic action on every stage's features, for a study's workdir (launch/ablate.py or
launch/demo.py): where the action is present after each stage, and where it is lost.

  python launch/probe.py --workdir W [--items test|val]

For every variant and seed found under W/runs, every stage export (init, stage 1, stage 2, stage 3; the
baseline's captioning run stands at stage 2) is probed on x, y, F(x), STC(x) and STC(F(x)) (mean-pooled over
space, frames in order): a logistic regression fit on the training takes' clips, scored on the held-out takes'
(W/data/raw/mcq_test.json, or mcq_val.json with --items val), with n and a 95% interval. Writes
W/probes_<items>.json ({variant: {stage: {feature: {accuracy, ci95, n}}}}) and prints the table.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exo2ego_jax.errors import run_cli
from exo2ego_jax.study import probe_workdir
from exo2ego_jax.paths import absolute


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=absolute, required=True, help="a study's workdir (launch/ablate.py or launch/demo.py)")
    p.add_argument("--items", choices=("test", "val"), default="test")
    a = p.parse_args(argv)
    probe_workdir.run(a.workdir, a.items)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
