"""Tokenizer and PIL preprocessing match the original exactly (fast: no model needed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ImageReward.preprocess import PreprocessConfig, preprocess_pil, preprocess_tensor, resized_size
from ImageReward.tokenizer import load_bert_tokenizer, tokenize
from parity_weights import FIXTURES

PARITY = FIXTURES / "parity"
REFERENCE = json.loads((PARITY / "reference_outputs.json").read_text())


def test_packaged_vocabulary_is_complete():
    tokenizer = load_bert_tokenizer()
    assert len(tokenizer) == 30524
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]) == [
        0, 100, 101, 102, 103, 30522, 30523]


@pytest.mark.parametrize("entry", REFERENCE["tokenization"], ids=lambda e: e["prompt"][:20])
def test_token_ids_equal_the_original(entry):
    ids, mask = tokenize(entry["prompt"])
    assert ids[0].tolist() == entry["input_ids"]
    assert mask[0].tolist() == entry["attention_mask"]


def test_truncation_logs_one_warning(caplog):
    prompt = "truncate me " * 40 + "uniquely"
    with caplog.at_level(logging.WARNING, logger="ImageReward.tokenizer"):
        tokenize([prompt, prompt])
    assert sum("truncated" in r.message for r in caplog.records) == 1


def test_pil_preprocessing_is_bit_exact():
    expected = np.load(PARITY / "intermediates.npz")["pixel_values"]
    for index, item in enumerate(REFERENCE["images"]):
        pixels = preprocess_pil(Image.open(PARITY / "images" / item["file"]))
        assert torch.equal(pixels, torch.from_numpy(expected[index])), item["file"]


def test_resize_rule_truncates_the_long_side():
    assert resized_size(640, 360, 224) == (398, 224)
    assert resized_size(300, 800, 224) == (224, 597)
    assert resized_size(16, 12, 224) == (298, 224)


def test_tensor_path_is_close_to_pil_path_and_differentiable():
    rng = np.random.default_rng(0)
    # a smooth image so that resampling differences between PIL and torch stay small
    base = rng.random((3, 8, 12)).astype(np.float32)
    pixels = torch.nn.functional.interpolate(torch.from_numpy(base)[None], size=(300, 450), mode="bilinear")
    pixels = pixels.clamp(0, 1)
    as_uint8 = (pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = preprocess_pil(Image.fromarray(as_uint8))
    tensor_in = torch.from_numpy(as_uint8).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    out = preprocess_tensor(tensor_in)
    assert out.shape == (1, 3, 224, 224)
    assert (out[0] - pil).abs().mean().item() < 0.02
    out.sum().backward()
    assert tensor_in.grad is not None and tensor_in.grad.abs().sum() > 0


def test_custom_crop_size():
    out = preprocess_pil(Image.new("RGB", (50, 40)), PreprocessConfig(image_size=32))
    assert out.shape == (3, 32, 32)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads through /proc")
def test_preprocessing_in_decode_threads_starts_no_thread_teams():
    """score_batch decodes in a thread pool; preprocessing must not start an OpenMP team in each of its threads
    (on a 16-core host that was 16 extra threads per decoding thread, spinning beside the model)."""
    from concurrent.futures import ThreadPoolExecutor

    def thread_count() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("Threads:")).split()[1])

    torch.ones(512, 512) @ torch.ones(512, 512)  # the main thread's own team already exists
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    before = thread_count()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: preprocess_pil(image), range(8)))
        during = thread_count()
    assert during - before <= 2
