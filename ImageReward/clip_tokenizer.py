"""OpenAI CLIP's byte-level BPE tokenizer, built offline from the vocabulary shipped in the package.

The vocabulary is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT, ``ImageReward/assets/clip/``). It is
turned into the ``vocab``/``merges`` of ``transformers.CLIPTokenizer`` exactly the way OpenAI's
``SimpleTokenizer`` builds its encoder (256 byte symbols, the same with ``</w>``, the first 48,894
merges, then ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407), so no file is ever fetched.

The text is cleaned as OpenAI's ``clip.tokenize`` does before BPE: ``ftfy.fix_text`` (when ftfy is
installed), ``html.unescape`` twice, whitespace runs collapsed, stripped, lower-cased. Ids are laid out as
``clip.tokenize(texts, truncate=True)``: ``[SOT] + bpe + [EOT]``, zero-padded to 77, and on overflow cut
to 77 with the last kept token replaced by EOT. open_clip's tokenizer (HPSv2) does exactly the same.

``clean=False`` gives the ids of transformers' fast ``CLIPTokenizer`` as PickScore's processor uses it:
no ftfy and no HTML unescaping, only the tokenizer's own normaliser (NFC, whitespace runs -> one space,
lower case); the same truncation (start token, the first 75 BPE tokens, end token).
"""

from __future__ import annotations

import functools
import gzip
import html
import logging
import re
from importlib import resources
from typing import Sequence

import torch

from .tokenizer import _LOCK, check_prompts

__all__ = ["CONTEXT_LENGTH", "SOT_TOKEN_ID", "EOT_TOKEN_ID", "clean_text", "load_clip_tokenizer", "clip_tokenize"]

logger = logging.getLogger(__name__)

CONTEXT_LENGTH = 77
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
_NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps lines 1 .. 48894 of the merges file


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = (resources.files("ImageReward") / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(_bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    if len(vocab) != 49408 or vocab["<|endoftext|>"] != EOT_TOKEN_ID:
        raise RuntimeError(f"packaged CLIP vocabulary is broken: {len(vocab)} entries")
    return vocab, merges  # type: ignore[return-value]


def load_clip_tokenizer():
    """``transformers.CLIPTokenizer`` with OpenAI's vocabulary (cached for the process; no download). Built
    once under a lock: the first import from transformers is not thread-safe (see ``tokenizer._LOCK``)."""
    with _LOCK:
        return _build_clip_tokenizer()


@functools.lru_cache(maxsize=1)
def _build_clip_tokenizer():
    import transformers
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    else:  # transformers 4: the fast tokenizer reads vocab.json / merges.txt files
        import json
        import tempfile
        from pathlib import Path

        from transformers import CLIPTokenizerFast

        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
            lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
            (Path(folder) / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            tokenizer = CLIPTokenizerFast(vocab_file=str(Path(folder) / "vocab.json"),
                                          merges_file=str(Path(folder) / "merges.txt"))
    if len(tokenizer) != 49408:
        raise RuntimeError(f"CLIP tokenizer built with {len(tokenizer)} tokens, expected 49408")
    return tokenizer


@functools.lru_cache(maxsize=1)
def _fix_text():
    try:
        import ftfy
    except ImportError:
        logger.warning("ftfy is not installed: CLIP prompts are not cleaned with ftfy.fix_text as OpenAI's "
                       "tokenizer does (token ids may differ for mojibake, curly quotes, ligatures); "
                       "pip install ftfy")
        return None
    return ftfy.fix_text


_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """OpenAI's ``whitespace_clean(basic_clean(text)).lower()``.

    >>> clean_text("  A &amp;  B\\n")
    'a & b'
    """
    fix = _fix_text()
    if fix is not None:
        text = fix(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


@functools.lru_cache(maxsize=4096)
def _encode_one(prompt: str, context_length: int, clean: bool = True) -> tuple[int, ...]:
    text = clean_text(prompt) if clean else prompt
    tokenizer = load_clip_tokenizer()
    with _LOCK:
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = [SOT_TOKEN_ID, *pieces, EOT_TOKEN_ID]
    if len(tokens) > context_length:
        logger.warning("prompt is %d CLIP tokens long and was truncated to %d: %.60r", len(tokens), context_length, prompt)
        tokens = tokens[:context_length]
        tokens[-1] = EOT_TOKEN_ID
    return tuple(tokens + [0] * (context_length - len(tokens)))


def clip_tokenize(prompts: Sequence[str] | str, context_length: int = CONTEXT_LENGTH, *, clean: bool = True
                  ) -> torch.Tensor:
    """Prompts -> int64 ids ``[N, context_length]``, equal to ``clip.tokenize(prompts, truncate=True)``
    and to open_clip's ``tokenize``; ``clean=False``: the ids of transformers' fast tokenizer (no ftfy, no
    HTML unescaping), zero-padded. Pad id 0 comes after the end token, which is where CLIP pools.

    >>> clip_tokenize("a cat")[0, :4].tolist()
    [49406, 320, 2368, 49407]
    >>> clip_tokenize("Tom &amp; Jerry", clean=False)[0, :8].tolist()
    [49406, 2435, 261, 6259, 282, 9164, 49407, 0]
    """
    items = check_prompts(prompts)
    rows = [_encode_one(prompt, context_length, clean) for prompt in items]
    return torch.tensor(rows, dtype=torch.long).reshape(len(items), context_length)
