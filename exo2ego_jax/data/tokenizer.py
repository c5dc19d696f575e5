"""A small Mistral-style BPE tokenizer trained on a text corpus (the demo's and the tests' stand-in for the
32K SentencePiece tokenizer, which cannot be downloaded here).

Same conventions as Mistral's fast tokenizer: `<unk>` 0, `<s>` 1, `</s>` 2, Metaspace pre-tokenisation
("▁" marks word starts, prepended to the first word), byte fallback off, pad := unk, right padding. Saved with
`save_pretrained`, it loads through `transformers.AutoTokenizer.from_pretrained(folder)` like the real one.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from exo2ego_jax.errors import DataError

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def train_tokenizer(texts: Iterable[str], out_dir: str, *, vocab_size: int = 512, model_max_length: int = 2048):
    """Train on `texts`, save to `out_dir`, and return the loaded `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    # Template punctuation is always in the alphabet, so "[INST]" never maps to <unk>.
    alphabet = sorted(set("[]<>/\\n\n.,;:?!'\"()-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ▁"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", padding_side="right", model_max_length=model_max_length)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def load_tokenizer(path: str):
    """`AutoTokenizer.from_pretrained(path)` with a clear error when the folder has no tokenizer."""
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise DataError(f"tokenizer folder {path!r} does not exist; point the config's data.tokenizer (or "
                        "--checkpoint) at a converted checkpoint folder, which holds the tokenizer files",
                        "missing tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise DataError(f"no usable tokenizer in {path!r} ({type(e).__name__}: {e}); convert the checkpoint again "
                         "(the converters copy tokenizer.json / tokenizer_config.json)") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token  # VideoLLaMA2: pad := unk
    return tok
