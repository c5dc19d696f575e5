"""Stage 2: python launch/stage2.py --config configs/stage2.py:<tiny|demo|7b> --workdir DIR [--config.field=value]"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from exo2ego_jax.train.cli import run

if __name__ == "__main__":
    run(os.path.join(ROOT, "configs", "stage2.py") + ":tiny")
