"""BLIP's BERT tokenizer, built from the vocabulary shipped inside the package (never from the Hub).

``bert-base-uncased`` WordPiece (30522 entries) plus the two tokens BLIP adds: ``[DEC]`` (id 30522, the
BOS token) and ``[ENC]`` (id 30523). ImageReward pads and truncates prompts to 35 tokens and keeps
``[CLS]`` as the first token.
"""

from __future__ import annotations

import functools
import logging
import threading
from importlib import resources
from typing import Sequence

import torch

from .errors import UnsupportedInputError

__all__ = ["BLIP_MAX_LENGTH", "load_bert_tokenizer", "tokenize", "check_prompts"]

logger = logging.getLogger(__name__)

BLIP_MAX_LENGTH = 35
DEC_TOKEN_ID = 30522
ENC_TOKEN_ID = 30523

# Building the tokenizer (the first ``from transformers import ...`` resolves transformers' lazy module, which
# is not thread-safe) and calling it (transformers 5's tokenizers-backed class switches its truncation and
# padding state per call) happen under this lock, so a loaded scorer can be called from many threads at once,
# first call included (Gradio, ComfyUI, the reward server).
_LOCK = threading.RLock()


def load_bert_tokenizer():
    """The BLIP tokenizer (``transformers.BertTokenizer``), cached for the process.

    Built with ``from_pretrained(<packaged folder>)``: in transformers 5, ``BertTokenizer(vocab_file=...)``
    silently builds an empty vocabulary. Thread-safe (built once, under a lock).
    """
    with _LOCK:
        return _build_bert_tokenizer()


@functools.lru_cache(maxsize=1)
def _build_bert_tokenizer():
    from transformers import BertTokenizer

    folder = resources.files("ImageReward") / "assets" / "bert-base-uncased"
    with resources.as_file(folder) as path:
        tokenizer = BertTokenizer.from_pretrained(str(path), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    if len(tokenizer) != 30524 or tokenizer.enc_token_id != ENC_TOKEN_ID:
        raise RuntimeError(f"packaged BERT vocabulary is broken: {len(tokenizer)} tokens")
    return tokenizer


def check_prompts(prompts: Sequence[str] | str) -> list[str]:
    """Validate prompts: each must be a ``str``. Returns them as a list."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    for index, prompt in enumerate(items):
        if not isinstance(prompt, str):
            raise UnsupportedInputError(f"prompt #{index} is a {type(prompt).__name__}, expected str: {prompt!r:.80}")
    return items


@functools.lru_cache(maxsize=4096)
def _tokenize_one(prompt: str, max_length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    tokenizer = load_bert_tokenizer()
    with _LOCK:
        full_length = len(tokenizer(prompt, truncation=False)["input_ids"])
        encoded = tokenizer(prompt, padding="max_length", truncation=True, max_length=max_length)
    if full_length > max_length:
        logger.warning(
            "prompt is %d tokens long and was truncated to %d (the model only sees the first %d word pieces): %.60r",
            full_length, max_length, max_length - 2, prompt,
        )
    return tuple(encoded["input_ids"]), tuple(encoded["attention_mask"])


def tokenize(prompts: Sequence[str] | str, max_length: int = BLIP_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``(input_ids, attention_mask)``, both ``[N, max_length]`` int64. Cached per prompt.

    >>> ids, mask = tokenize("a cat")
    >>> ids[0, :4].tolist(), int(mask.sum())
    ([101, 1037, 4937, 102], 4)
    """
    items = check_prompts(prompts)
    pairs = [_tokenize_one(prompt, max_length) for prompt in items]
    input_ids = torch.tensor([ids for ids, _ in pairs], dtype=torch.long).reshape(len(items), max_length)
    attention_mask = torch.tensor([mask for _, mask in pairs], dtype=torch.long).reshape(len(items), max_length)
    return input_ids, attention_mask
