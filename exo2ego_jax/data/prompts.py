"""Question prompts as VideoLLaMA2's evaluation scripts write them (multiple choice with letters), shared by the
instruction data we generate and by evaluation, with an optional first-person cue."""
from __future__ import annotations

from collections.abc import Sequence

FIRST_PERSON_CUE = "This video is recorded from a first-person perspective."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly and only give the best option."


def options_block(options: Sequence[str]) -> str:
    return "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def mcq_prompt(question: str, options: Sequence[str], *, style: str = "mvbench", first_person: bool = False) -> str:
    """Letter-answer prompt: `egoschema` (inference_video_mcqa_egoschema.py) or `mvbench` (the MVBench script)."""
    if style == "egoschema":
        text = ("Select the best answer to the following multiple-choice question based on the video.\n"
                f"{question}\nOptions:\n{options_block(options)}\n{ANSWER_INSTRUCTION} The best answer is: ")
    elif style == "mvbench":
        text = f"Question: {question}\nOptions:\n{options_block(options)}\n{ANSWER_INSTRUCTION}"
    else:
        raise ValueError(f"unknown prompt style {style!r}; use 'egoschema' or 'mvbench'")
    return with_cue(text, first_person)


def with_cue(text: str, first_person: bool) -> str:
    return f"{FIRST_PERSON_CUE} {text}" if first_person else text
