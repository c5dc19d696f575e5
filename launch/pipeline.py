"""All training stages end to end on the tiny preset: init -> stage 1 -> stage 2 -> stage 3, each starting
from the previous stage's export, with the same configs and training loop as `launch/stageN.py`.

  python launch/pipeline.py --workdir /tmp/exo2ego_tiny [--steps 20] [--preset tiny]

Prints one line per stage (first/last loss, time) and checks that the stage-3 export loads with
`exo2ego_jax.load_pretrained` and answers through the composite's entry point.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import exo2ego_jax
from exo2ego_jax.constants import IGNORE_INDEX
from exo2ego_jax.train.batches import to_model_batch
from exo2ego_jax.configfile import apply_overrides, load_config_file
from exo2ego_jax.study import chain
from exo2ego_jax.train.loop import train
from exo2ego_jax.train.toy_data import toy_examples
from exo2ego_jax.paths import absolute


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=absolute, default="/tmp/exo2ego_tiny")
    p.add_argument("--preset", default="tiny", choices=["tiny"])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per stage")
    args = p.parse_args(argv)

    rows, previous = [], None
    for stage in chain.STAGE_FILES:
        c = load_config_file(chain.config_path(stage), args.preset)
        apply_overrides(c, {"num_train_steps": args.steps, "checkpoint_every": args.steps, "mesh.shape": (1, 1, 1),
                            "mesh.num_devices": 1, **chain.after(previous)})
        workdir = os.path.join(args.workdir, stage)
        t = time.time()
        result = train(c, workdir, show_progress=True)
        losses = [m["loss"] for m in result.metrics if "loss" in m]
        rows.append((stage, losses[0], losses[-1], time.time() - t))
        previous = workdir

    print("\n| stage | first loss | last loss | seconds |\n|---|---|---|---|")
    for stage, first, last, seconds in rows:
        print(f"| {stage} | {first:.4f} | {last:.4f} | {seconds:.0f} |")

    module, params = exo2ego_jax.load_pretrained(os.path.join(previous, "export"))
    cfg = module.config
    example = toy_examples(1, frames=cfg.num_frames, image_size=cfg.clip.image_size,
                           vocab_size=cfg.llm.vocab_size, seq_len=16, seed=123)[0]
    batch = to_model_batch({k: v[None] for k, v in example.items()}, np.float32)
    prompt_len = int(np.nonzero(example["labels"] != IGNORE_INDEX)[0][0])  # the answer starts here
    ids = batch["input_ids"][:, :prompt_len]
    logits = module.apply({"params": params}, ids, batch["ego_pixels"])
    print(f"stage-3 export: {cfg.num_visual_tokens()} visual tokens per clip (fusion {cfg.fusion!r}); "
          f"next-token prediction {int(np.argmax(logits[0, -1]))}, expected {int(example['input_ids'][prompt_len])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
