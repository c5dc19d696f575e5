"""Ask a checkpoint a question about a video.

  python launch/infer.py --checkpoint DIR --video clip.mp4 --question "What am I doing?" [--start 3.2 --end 5.0]
                         [--fusion none|mapped|tokens|frames] [--prompt base|first_person|task|task_first_person]

The same as `exo2ego_jax.serve.inference.answer_question(load_model(DIR), video, question)` in Python. The model
reads the clip with the fusion it was trained with (recorded in the checkpoint) unless --fusion says otherwise.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from exo2ego_jax.data.prompts import PROMPTS, with_prompt
from exo2ego_jax.errors import ConfigError, run_cli
from exo2ego_jax.models.exo2ego import FUSIONS
from exo2ego_jax.serve.inference import answer_question, load_model
from exo2ego_jax.paths import absolute


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=absolute, required=True, help="converted checkpoint or a stage's export/ folder")
    p.add_argument("--video", type=absolute, required=True, help="a video file")
    p.add_argument("--question", required=True)
    p.add_argument("--start", type=float, default=None, help="window start (s)")
    p.add_argument("--end", type=float, default=None, help="window end (s)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--fusion", choices=FUSIONS, default=None, help="override the checkpoint's fusion")
    p.add_argument("--prompt", choices=PROMPTS, default="base",
                   help="what goes before the question (the paper's Table 10 rows; the texts are ours)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.start is not None and a.end is not None and a.end <= a.start:
        raise ConfigError(f"--end {a.end} must be after --start {a.start}")
    model = load_model(a.checkpoint, fusion=a.fusion)
    print(answer_question(model, a.video, with_prompt(a.question, a.prompt), start=a.start, end=a.end,
                          max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
