"""Stage 3, learner self-practice: EgoIT instruction tuning on x together with F(x); LoRA (r=128, alpha=256,
dropout 0.1) + ego encoder + F (+ connector).

python launch/stage3.py --config configs/stage3.py:<tiny|demo|7b> --workdir DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base

from exo2ego_jax.train.stages import DEMO_STAGE3_EXTRA, STAGES


def get_config(preset: str = "tiny"):
    c = base.get_base_config("stage3", preset)
    c.lora.enabled = True
    c.trainable = STAGES["stage3"].trainable  # regexes over '/'-joined param paths (exo2ego_jax/train/stages.py)
    # the paper's rate for 7b; a larger one lets the tiny CPU presets move within a few dozen steps
    c.optim.learning_rate = 2e-5 if preset == "7b" else 3e-3
    c.optim.warmup_ratio = 0.03
    c.num_epochs = 1.0
    if preset == "7b":
        c.batch_size = 64
        c.per_device_batch = 1
        c.init.from_workdir = "/workdirs/stage2"
    if preset == "demo":  # see DEMO_STAGE3_EXTRA: the demo LLM was never instruction-tuned
        c.trainable = STAGES["stage3"].trainable + DEMO_STAGE3_EXTRA
    if preset != "tiny":  # records from exo2ego_jax.data.build (demo: the synthetic ego-exo set)
        c.data.source = "ego_it"
    return c
