"""Stage 2, demonstrator-learner guidance: cycle L1 + KL(y || F(x)) + VTG on synchronized ego-exo clips;
ego encoder, F and G trained (exo encoder and LLM frozen).

python launch/stage2.py --config configs/stage2.py:<tiny|demo|7b> --workdir DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base

from exo2ego_jax.train.stages import STAGES


def get_config(preset: str = "tiny"):
    c = base.get_base_config("stage2", preset)
    c.trainable = STAGES["stage2"].trainable  # regexes over '/'-joined param paths (exo2ego_jax/train/stages.py)
    # the paper's rate for 7b, equal to stage 1's; the tiny presets follow the same pattern (stage 1 = stage 2 >
    # stage 3, configs/stage1.py and stage3.py)
    c.optim.learning_rate = 1e-4 if preset == "7b" else 1e-2
    c.optim.warmup_ratio = 0.03
    c.num_epochs = 2.0
    if preset == "7b":
        c.batch_size = 256
        c.per_device_batch = 2
        c.init.from_workdir = "/workdirs/stage1"
    if preset != "tiny":  # records from exo2ego_jax.data.build (demo: the synthetic ego-exo set)
        c.data.source = "ego_exo_clip"
    return c
