"""Full-size parity with the original ImageReward 1.5 on deterministic random weights.

The checkpoint is rebuilt from ``fixtures/parity/recipe.json`` (byte-identical to the one the original ran
on), saved as a ``.pt`` and loaded through the public ``RM.load`` path. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ImageReward as RM
from parity_weights import FIXTURES, build_state_dict

PARITY = FIXTURES / "parity"
REFERENCE = json.loads((PARITY / "reference_outputs.json").read_text())
IMAGES = [str(PARITY / "images" / item["file"]) for item in REFERENCE["images"]]
PROMPTS = REFERENCE["prompts"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ImageReward.pt"
    torch.save(build_state_dict(PARITY / "recipe.json"), path)
    loaded = RM.load(str(path), device="cpu")
    path.unlink()  # 1.8 GB: do not keep it around
    return loaded


@pytest.fixture(scope="module")
def intermediates():
    return np.load(PARITY / "intermediates.npz")


@pytest.fixture(scope="module")
def all_scores(model):
    """Every (prompt, image) pair in one call: each image is encoded once."""
    prompts = [p for p in PROMPTS for _ in IMAGES]
    return model.score_batch(prompts, IMAGES * len(PROMPTS), batch_size=8).view(len(PROMPTS), len(IMAGES))


@pytest.mark.slow
def test_checkpoint_keys_and_shapes_match_the_original(model):
    shapes = json.loads((PARITY / "state_dict_shapes.json").read_text())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes


@pytest.mark.slow
def test_all_56_scores_within_1e5(all_scores):
    single = torch.tensor(REFERENCE["score_single"]["values"])
    assert all_scores.shape == (7, 8)
    assert (all_scores - single).abs().max().item() < 1e-5


@pytest.mark.slow
def test_vit_outputs_and_text_features_within_1e4(model, intermediates):
    pixels = torch.from_numpy(intermediates["pixel_values"])
    with torch.inference_mode():
        embeds = model.encode_images(pixels)
        assert (embeds - torch.from_numpy(intermediates["image_embeds"])).abs().max().item() < 1e-4
        from ImageReward.tokenizer import tokenize

        ids, mask = tokenize(PROMPTS)
        cls = torch.stack([
            model.text_features(ids[p : p + 1].expand(len(IMAGES), -1), mask[p : p + 1].expand(len(IMAGES), -1), embeds)
            for p in range(len(PROMPTS))
        ])
    assert (cls - torch.from_numpy(intermediates["text_cls"])).abs().max().item() < 1e-4


@pytest.mark.slow
def test_ranks_equal_for_every_prompt(all_scores):
    from ImageReward.scorer import rank_descending

    for index, expected in enumerate(REFERENCE["inference_rank"]):
        assert rank_descending(all_scores[index]) == expected["ranks"]
        assert np.allclose(all_scores[index].numpy(), expected["rewards"], atol=1e-5)


@pytest.mark.slow
def test_public_methods_on_the_full_model(model):
    ranks, rewards = model.inference_rank(PROMPTS[0], IMAGES)
    assert ranks == REFERENCE["inference_rank"][0]["ranks"]
    assert np.allclose(rewards, REFERENCE["score_list"]["prompt0"], atol=1e-5)
    single = model.score(PROMPTS[0], IMAGES[0])
    assert isinstance(single, float) and abs(single - REFERENCE["one_element_list"]["score"]) < 1e-5


@pytest.mark.slow
def test_score_gard_rewards_and_input_gradient(model):
    io = np.load(PARITY / "score_gard_io.npz")
    image = torch.from_numpy(io["image"]).clone().requires_grad_(True)
    rewards = model.score_gard(torch.from_numpy(io["input_ids"]), torch.from_numpy(io["attention_mask"]), image)
    assert rewards.shape == (2, 1)
    assert (rewards.detach() - torch.from_numpy(io["rewards"])).abs().max().item() < 1e-5
    rewards.sum().backward()
    expected = torch.from_numpy(io["grad_image"])
    relative = (image.grad - expected).norm() / expected.norm()
    assert relative.item() < 1e-4


@pytest.mark.slow
def test_bf16_scores_within_2e2_of_the_original(model):
    import copy

    bf16 = copy.deepcopy(model)
    bf16.set_image_dtype(torch.bfloat16)  # what RM.load(..., dtype=torch.bfloat16) does
    prompts = [p for p in PROMPTS for _ in IMAGES]
    scores = bf16.score_batch(prompts, IMAGES * len(PROMPTS), batch_size=8).view(len(PROMPTS), len(IMAGES))
    single = torch.tensor(REFERENCE["score_single"]["values"])
    assert (scores - single).abs().max().item() < 2e-2
