"""Full-size parity of the CLIP, BLIP and Aesthetic baselines with the original ``load_score`` (1.5).

Checkpoints are rebuilt from ``fixtures/baselines/recipes`` (the deterministic random weights the original
ran on), written under the original's file names into a temporary ``download_root`` and loaded through
the public ``RM.load_score(name, download_root=...)`` path, offline. Each scorer is built once per class
and freed before the next; all 56 (prompt, image) pairs go through one ``score_batch`` call, which encodes
every image once. Expected: CLIP token ids equal, scores within 1e-5, features within 1e-4, ranks equal.
"""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

import ImageReward as RM
from parity_weights import FIXTURES, build_state_dict

BASE = FIXTURES / "baselines"
REFERENCE = json.loads((BASE / "baseline_outputs.json").read_text())
IMAGES = [str(FIXTURES / "parity" / "images" / item["file"]) for item in REFERENCE["images"]]
PROMPTS = REFERENCE["prompts"]
FEATURES = np.load(BASE / "baseline_features.npz")

pytestmark = pytest.mark.slow


def _score_all(scorer):
    """All 56 pairs in one call, capturing the image features it computes (each image encoded once)."""
    captured = []
    encode = scorer.encode_images
    scorer.encode_images = lambda pixels: captured.append(encode(pixels)) or captured[-1]
    try:
        prompts = [p for p in PROMPTS for _ in IMAGES]
        scores = scorer.score_batch(prompts, IMAGES * len(PROMPTS), batch_size=len(prompts))
    finally:
        del scorer.encode_images
    assert len(captured) == 1 and captured[0].shape[0] == len(IMAGES)
    return scores.view(len(PROMPTS), len(IMAGES)), captured[0]


def _check_scores_and_ranks(name, scorer, scores, features):
    expected = torch.tensor(REFERENCE["scores"][name]["score_single"]["values"])
    assert scores.shape == expected.shape == (7, 8)
    assert (scores - expected).abs().max().item() < 1e-5
    # inference_rank per prompt, replaying the image features already computed (no second ViT pass)
    scorer.encode_images = lambda pixels: features
    try:
        for index, reference in enumerate(REFERENCE["scores"][name]["inference_rank"]):
            ranks, rewards = scorer.inference_rank(PROMPTS[index], IMAGES)
            assert ranks == reference["ranks"]
            assert np.allclose(rewards, reference["rewards"], atol=1e-5, rtol=0)
    finally:
        del scorer.encode_images


def _free(path):
    path.unlink()
    gc.collect()


@pytest.fixture(scope="class")
def clip_root(tmp_path_factory):
    """ViT-L-14.pt (OpenAI key names, fp16 where OpenAI stores fp16) and the Aesthetic head, under the
    original's file names (the head under its literal URL-encoded name)."""
    root = tmp_path_factory.mktemp("download_root")
    torch.save(build_state_dict(BASE / "recipes" / "clip_vit_l14_weights_recipe.json"), root / "ViT-L-14.pt")
    gc.collect()
    torch.save(build_state_dict(BASE / "recipes" / "aesthetic_mlp_weights_recipe.json"),
               root / "sac%2Blogos%2Bava1-l14-linearMSE.pth")
    yield root
    _free(root / "ViT-L-14.pt")


@pytest.fixture(scope="class")
def clip(clip_root):
    scorer = RM.load_score("CLIP", device="cpu", download_root=clip_root)
    yield scorer
    del scorer
    gc.collect()


@pytest.fixture(scope="class")
def clip_results(clip):
    return _score_all(clip)


@pytest.fixture(scope="class")
def blip(tmp_path_factory):
    root = tmp_path_factory.mktemp("download_root")
    torch.save({"model": build_state_dict(BASE / "recipes" / "blip_large_weights_recipe.json")},
               root / "model_large.pth")
    gc.collect()
    scorer = RM.load_score("BLIP", device="cpu", download_root=root)
    _free(root / "model_large.pth")
    yield scorer
    del scorer
    gc.collect()


class TestCLIPAndAesthetic:
    def test_token_ids_equal_openai(self):
        from ImageReward.clip_tokenizer import clip_tokenize

        ids = clip_tokenize(PROMPTS)
        assert ids.tolist() == FEATURES["clip_input_ids"].tolist()
        assert ids.tolist() == [item["input_ids"] for item in REFERENCE["clip_tokenization"]]

    def test_loaded_float32_in_eval_mode(self, clip):
        assert {p.dtype for p in clip.parameters()} == {torch.float32}
        assert not clip.training and clip.device.type == "cpu"

    def test_clip_scores_and_ranks(self, clip, clip_results):
        _check_scores_and_ranks("CLIP", clip, *clip_results)

    def test_clip_features(self, clip, clip_results):
        assert np.abs(clip_results[1].numpy() - FEATURES["clip_image_features"]).max() < 1e-4
        with torch.inference_mode():
            text = clip.text_features(PROMPTS)
        assert np.abs(text.numpy() - FEATURES["clip_text_features"]).max() < 1e-4

    def test_aesthetic_scores_ranks_and_features(self, clip, clip_root, clip_results):
        """The head from download_root (URL-encoded file name) on CLIP's shared image tower; the tower's
        features were computed once above (the unshared build is checked on a tiny model)."""
        aesthetic = RM.load_score("Aesthetic", device="cpu", download_root=clip_root, clip=clip)
        assert aesthetic.vision_model is clip.model.vision_model
        assert {p.dtype for p in aesthetic.parameters()} == {torch.float32}
        features = clip_results[1]
        assert np.abs(features.numpy() - FEATURES["aesthetic_image_features"]).max() < 1e-4
        aesthetic.encode_images = lambda pixels: features
        try:
            scores = aesthetic.score_batch([p for p in PROMPTS for _ in IMAGES], IMAGES * len(PROMPTS),
                                           batch_size=64).view(len(PROMPTS), len(IMAGES))
        finally:
            del aesthetic.encode_images
        _check_scores_and_ranks("Aesthetic", aesthetic, scores, features)
        assert np.abs(scores[0].numpy() - FEATURES["aesthetic_mlp_scores"]).max() < 1e-5
        assert torch.equal(scores, scores[:1].expand_as(scores))  # the prompt is ignored


class TestBLIP:
    def test_scores_ranks_and_features(self, blip):
        from ImageReward.tokenizer import tokenize

        ids, mask = tokenize(PROMPTS)
        assert ids.tolist() == FEATURES["blip_input_ids"].tolist()
        assert mask.tolist() == FEATURES["blip_attention_mask"].tolist()
        scores, features = _score_all(blip)
        _check_scores_and_ranks("BLIP", blip, scores, features)
        assert np.abs(features.numpy() - FEATURES["blip_image_features"]).max() < 1e-4
        with torch.inference_mode():
            text = blip.text_features(PROMPTS)
        assert np.abs(text.numpy() - FEATURES["blip_text_features"]).max() < 1e-4
