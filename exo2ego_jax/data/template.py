"""VideoLLaMA2 v1 `mistral_instruct` chat template, tokenisation with the `<video>` placeholder, and masking.

The 16F checkpoint was fine-tuned with the v1 codebase's LLAMA_2-style template (MODEL_REFERENCE §10):

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n<video>\\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST] {a2} </s>

BOS and every `[INST] ... [/INST]` span are masked to -100; answers and their `</s>` are trained. Masks are
computed from the fast tokenizer's character offsets of one tokenisation of the rendered text, so the ids are
exactly what the tokenizer gives for the whole string (no per-piece re-tokenisation drift). `<video>` becomes
the single id -201; the text is truncated to `max_len` ids before the visual tokens are spliced in.
Captions (clip-text pretraining, `--version plain`) are `<video>` + " " + caption with only -201 masked.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from exo2ego_jax.constants import IGNORE_INDEX, VIDEO_TOKEN, VIDEO_TOKEN_INDEX

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


@dataclasses.dataclass(frozen=True)
class Tokenized:
    input_ids: np.ndarray   # int32 [L], with one VIDEO_TOKEN_INDEX
    labels: np.ndarray      # int32 [L], IGNORE_INDEX outside trained spans
    truncated: bool


def normalize_turns(conversations: Sequence[dict], *, source: str = "conversation") -> list[tuple[str, str]]:
    """LLaVA `[{from, value}, ...]` -> [(question, answer), ...], `<video>` moved to the head of turn one."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError(f"{source}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{source}: turn {i} lacks 'from'/'value' (got {turn!r:.80})")
        turns.append((str(turn["from"]).lower(), str(turn["value"])))
    while turns and turns[0][0] not in ("human", "user"):  # LLaVA drops a leading assistant turn
        turns = turns[1:]
    pairs = []
    for i in range(0, len(turns) - 1, 2):
        (role_q, q), (role_a, a) = turns[i], turns[i + 1]
        if role_q not in ("human", "user") or role_a not in ("gpt", "assistant"):
            raise ValueError(f"{source}: turns {i}/{i + 1} are {role_q!r}/{role_a!r}, expected human then gpt")
        pairs.append((q, a))
    if not pairs:
        raise ValueError(f"{source}: no (human, gpt) turn pair")
    pairs = [(q.replace(VIDEO_TOKEN, "").strip(), a.strip()) for q, a in pairs]
    pairs[0] = (f"{VIDEO_TOKEN}\n{pairs[0][0]}", pairs[0][1])
    return pairs


def render(pairs: Sequence[tuple[str, str]], system: str | None = SYSTEM_PROMPT, *,
           generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The template text without BOS, and the character spans that are trained (answers + `</s>`).

    With `generation_prompt`, the last pair's answer is left open (the text ends in `[/INST]`).
    """
    text, spans = "", []
    for i, (q, a) in enumerate(pairs):
        if i == 0 and system:
            q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}"
        text += f"[INST] {q} [/INST]"
        if generation_prompt and i == len(pairs) - 1:
            break
        start = len(text)
        text += f" {a} </s>"
        spans.append((start, len(text)))
    return text, spans


def _tokenize_with_placeholder(tokenizer, text: str):
    """ids and (start, end) character offsets; `<video>` -> one -201 with an empty span."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the data pipeline needs a fast tokenizer (tokenizer.json); load it with use_fast=True")
    ids, offsets, base = [], [], 0
    for k, chunk in enumerate(text.split(VIDEO_TOKEN)):
        if k:
            ids.append(VIDEO_TOKEN_INDEX)
            offsets.append((base - len(VIDEO_TOKEN), base - len(VIDEO_TOKEN)))
        if chunk:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids.extend(enc["input_ids"])
            offsets.extend((base + s, base + e) for s, e in enc["offset_mapping"])
        base += len(chunk) + len(VIDEO_TOKEN)
    return ids, offsets


def _finish(ids: list[int], labels: list[int], max_len: int | None) -> Tokenized:
    truncated = max_len is not None and len(ids) > max_len
    if truncated:  # VideoLLaMA2 truncates input_ids[:, :max_len] before expanding the visual tokens
        ids, labels = ids[:max_len], labels[:max_len]
    return Tokenized(np.asarray(ids, np.int32), np.asarray(labels, np.int32), truncated)


def tokenize_conversation(tokenizer, conversations: Sequence[dict], *, system: str | None = SYSTEM_PROMPT,
                          max_len: int | None = None, source: str = "conversation") -> Tokenized:
    text, spans = render(normalize_turns(conversations, source=source), system)
    ids, offsets = _tokenize_with_placeholder(tokenizer, text)
    labels = [i if any(s >= a and e <= b and e > s for a, b in spans) else IGNORE_INDEX
              for i, (s, e) in zip(ids, offsets)]
    return _finish([tokenizer.bos_token_id] + ids, [IGNORE_INDEX] + labels, max_len)


def tokenize_caption(tokenizer, caption: str, *, max_len: int | None = None) -> Tokenized:
    """Clip-text pretraining sample: `<video>` + " " + caption, everything but -201 trained (no BOS/EOS)."""
    ids, _ = _tokenize_with_placeholder(tokenizer, f"{VIDEO_TOKEN} {caption.strip()}")
    labels = [IGNORE_INDEX if i == VIDEO_TOKEN_INDEX else i for i in ids]
    return _finish(ids, labels, max_len)


def prompt_ids(tokenizer, question: str, *, system: str | None = SYSTEM_PROMPT, with_video: bool = True) -> list[int]:
    """Inference prompt ids ending in `[/INST]` (VideoLLaMA2 `mm_infer`, add_generation_prompt)."""
    question = question.replace(VIDEO_TOKEN, "").strip()
    if with_video:
        question = f"{VIDEO_TOKEN}\n{question}"
    text, _ = render([(question, "")], system, generation_prompt=True)
    ids, _ = _tokenize_with_placeholder(tokenizer, text)
    return [tokenizer.bos_token_id] + ids



# The same template as Jinja, for `tokenizer.apply_chat_template` (transformers reads `chat_template.jinja` from
# the tokenizer folder). A leading system message replaces SYSTEM_PROMPT; an empty one drops the <<SYS>> block.
# Training tokenises the text on its own and puts BOS in front, so the text gets SentencePiece's prefix space
# ("▁[INST]"); apply_chat_template tokenises one string, where text right after "<s>" gets none. The explicit
# space after BOS gives the same ids.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = \"" + SYSTEM_PROMPT + "\" -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token + ' ' -}}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '[INST] ' -}}"
    "{%- if loop.first and system -%}{{- '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}"
    "{{- m['content'] | trim -}}{{- ' [/INST]' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- ' ' + (m['content'] | trim) + ' </s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def write_chat_template(directory: str) -> str:
    path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    with open(path, "w") as f:
        f.write(CHAT_TEMPLATE)
    return path
