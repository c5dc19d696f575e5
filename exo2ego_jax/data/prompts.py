"""Question prompts: VideoLLaMA2's multiple-choice layouts (letters) and the prompt rows of the paper's Table 10.

Shared by the instruction data we generate and by evaluation. The paper reports three prompts (Table 10): a
base prompt, "+ task details" and "+ first-person perspective cue" (the best); it does not publish their text,
so TASK_DETAILS and FIRST_PERSON_CUE below are ours.
"""
from __future__ import annotations

from collections.abc import Sequence

from exo2ego_jax.errors import ConfigError

FIRST_PERSON_CUE = "This video is recorded from a first-person perspective."
TASK_DETAILS = "The video shows a person's activity; answer the question about what happens in it."
# base: the question alone; first_person: the cue; task: the task details; task_first_person: both (Table 10's
# best row, the evaluation default).
PROMPTS = ("base", "first_person", "task", "task_first_person")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly and only give the best option."


def options_block(options: Sequence[str]) -> str:
    return "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def with_prompt(text: str, prompt: str = "base") -> str:
    """`text` preceded by the prompt row's cue and task details."""
    if prompt not in PROMPTS:
        raise ConfigError(f"config field 'prompt' is {prompt!r}; allowed values: {list(PROMPTS)}")
    parts = ([FIRST_PERSON_CUE] if "first_person" in prompt else []) + ([TASK_DETAILS] if "task" in prompt else [])
    return " ".join(parts + [text])


def mcq_prompt(question: str, options: Sequence[str], *, style: str = "mvbench", prompt: str = "base") -> str:
    """Letter-answer prompt: `egoschema` (inference_video_mcqa_egoschema.py) or `mvbench` (the MVBench script)."""
    if style == "egoschema":
        text = ("Select the best answer to the following multiple-choice question based on the video.\n"
                f"{question}\nOptions:\n{options_block(options)}\n{ANSWER_INSTRUCTION} The best answer is: ")
    elif style == "mvbench":
        text = f"Question: {question}\nOptions:\n{options_block(options)}\n{ANSWER_INSTRUCTION}"
    else:
        raise ValueError(f"unknown prompt style {style!r}; use 'egoschema' or 'mvbench'")
    return with_prompt(text, prompt)
