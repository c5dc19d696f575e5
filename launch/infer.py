"""Ask a checkpoint a question about a video.

  python launch/infer.py --checkpoint DIR --video clip.mp4 --question "What am I doing?" [--start 3.2 --end 5.0]

The same as `exo2ego_jax.serve.inference.answer_question(load_model(DIR), video, question)` in Python.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from exo2ego_jax.data.prompts import with_cue
from exo2ego_jax.errors import Exo2EgoError
from exo2ego_jax.serve.inference import answer_question, load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--video", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--start", type=float, default=None)
    p.add_argument("--end", type=float, default=None)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--first_person", action="store_true", help="prefix the paper's first-person cue")
    a = p.parse_args(argv)
    question = with_cue(a.question, a.first_person)
    try:
        model = load_model(a.checkpoint)
        print(answer_question(model, a.video, question, start=a.start, end=a.end, max_new_tokens=a.max_new_tokens,
                              temperature=a.temperature, top_p=a.top_p))
    except Exo2EgoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
