"""The public scoring API on a tiny model: types, batching, ranking, gradients, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ImageReward as RM
from ImageReward.errors import ImageLoadError, InvalidInputError, UnsupportedInputError


def _image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.fixture
def images(tmp_path):
    paths = []
    for seed in range(4):
        path = tmp_path / f"img{seed}.png"
        _image(seed, size=(40 + 8 * seed, 30)).save(path)
        paths.append(str(path))
    return paths


def test_score_types_and_order(tiny_model, images):
    one = tiny_model.score("a cat", images[0])
    many = tiny_model.score("a cat", images)
    assert isinstance(one, float)
    assert isinstance(many, list) and len(many) == 4
    assert many[0] == pytest.approx(one, abs=1e-6)
    assert tiny_model.score("a cat", images[::-1]) == pytest.approx(many[::-1], abs=1e-6)
    assert tiny_model.score("a cat", [images[0]]) == pytest.approx([one], abs=1e-6)  # a list stays a list
    assert tiny_model.score("a cat", tuple(images)) == pytest.approx(many, abs=1e-6)


def test_all_input_kinds_give_the_same_score(tiny_model, images):
    from pathlib import Path

    pil = Image.open(images[1])
    array = np.array(pil)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    scores = tiny_model.score("a dog", [images[1], Path(images[1]), pil, array, tensor])
    assert np.allclose(scores, scores[0], atol=1e-6)


def test_batched_equals_one_at_a_time(tiny_model, images):
    batched = tiny_model.score_batch("a cat", images, batch_size=3)
    single = torch.tensor([tiny_model.score("a cat", path) for path in images])
    assert torch.allclose(batched, single, atol=1e-5)


def test_score_batch_pairs_and_broadcast(tiny_model, images):
    prompts = ["a cat", "a dog", "a red car", "a cat"]
    pairs = tiny_model.score_batch(prompts, [images[0]] * 4)
    assert pairs.dtype == torch.float32 and pairs.shape == (4,)
    assert pairs[0] == pytest.approx(pairs[3].item(), abs=1e-6)
    assert pairs[0] != pytest.approx(pairs[1].item(), abs=1e-9)
    expected = [tiny_model.score(p, images[0]) for p in prompts]
    assert np.allclose(pairs.numpy(), expected, atol=1e-5)


def test_each_distinct_image_is_encoded_once(tiny_model, images, monkeypatch):
    seen = []
    original = tiny_model.encode_images
    monkeypatch.setattr(tiny_model, "encode_images", lambda px: seen.append(px.shape[0]) or original(px))
    tiny_model.score_batch(["a", "b", "c", "d", "e", "f"], [images[0], images[1]] * 3, batch_size=8)
    assert sum(seen) == 2


def test_inference_rank(tiny_model, images):
    ranks, rewards = tiny_model.inference_rank("a cat", images)
    assert sorted(ranks) == [1, 2, 3, 4]
    order = np.argsort(-np.asarray(rewards), kind="stable")
    assert [ranks[i] for i in order] == [1, 2, 3, 4]


def test_ties_keep_input_order(tiny_model, images):
    ranks, rewards = tiny_model.inference_rank("a cat", [images[0], images[1], images[0]])
    assert rewards[0] == rewards[2]
    assert ranks[0] < ranks[2]


def test_score_grad_matches_score_and_flows(tiny_model, images):
    pixels = torch.from_numpy(np.asarray(Image.open(images[0]).resize((32, 32)))).permute(2, 0, 1)[None].float() / 255
    pixels.requires_grad_(True)
    rewards = tiny_model.score_grad(pixels, "a cat")
    assert rewards.shape == (1,) and rewards.requires_grad
    rewards.sum().backward()
    assert pixels.grad.abs().sum() > 0
    # a 32x32 image needs no resize at image_size=32: the tensor path equals the PIL path
    pil = Image.fromarray((pixels.detach()[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert rewards.item() == pytest.approx(tiny_model.score("a cat", pil), abs=1e-5)


def test_score_gard_contract(tiny_model):
    from ImageReward.tokenizer import tokenize

    ids, mask = tokenize(["a cat", "a dog"])
    image = torch.randn(2, 3, 32, 32, requires_grad=True)
    rewards = tiny_model.score_gard(ids, mask, image)
    assert rewards.shape == (2, 1)
    rewards.sum().backward()
    assert image.grad is not None


def test_non_grad_paths_build_no_graph(tiny_model, images):
    out = tiny_model.score_batch("a cat", images)
    assert not out.requires_grad


def test_device_is_read_from_parameters(tiny_model):
    assert tiny_model.device == torch.device("cpu")
    tiny_model.to(torch.float64)
    assert tiny_model.input_dtype == torch.float64


@pytest.mark.parametrize("bad, error, words", [
    ("does/not/exist.png", ImageLoadError, "does not exist"),
    (42, UnsupportedInputError, "unsupported type"),
    (np.zeros((3, 4, 5, 6)), UnsupportedInputError, "shape"),
    (np.full((8, 8, 3), 2.0), ImageLoadError, "[0, 1]"),
])
def test_bad_images_raise_typed_errors_naming_the_item(tiny_model, images, bad, error, words):
    with pytest.raises(error) as info:
        tiny_model.score("a cat", [images[0], bad])
    assert "image #1" in str(info.value) and words in str(info.value)
    assert isinstance(info.value, RM.ImageRewardError)


def test_directory_and_corrupt_files(tiny_model, tmp_path, images):
    with pytest.raises(ImageLoadError, match="directory"):
        tiny_model.score("a cat", str(tmp_path))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        tiny_model.score("a cat", str(corrupt))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(images[3], "rb").read()[:200])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        tiny_model.score("a cat", [images[0], str(truncated)])


def test_a_missing_path_never_scores_another_image(tiny_model, images):
    with pytest.raises(ImageLoadError):
        tiny_model.inference_rank("a cat", [images[0], images[1] + ".missing", images[2]])


def test_bad_prompts_and_counts(tiny_model, images):
    with pytest.raises(UnsupportedInputError, match="prompt"):
        tiny_model.score(123, images[0])
    with pytest.raises(UnsupportedInputError, match="prompt #1"):
        tiny_model.score_batch(["ok", None], images[:2])
    with pytest.raises(InvalidInputError, match="empty"):
        tiny_model.score("a cat", [])
    with pytest.raises(InvalidInputError, match="3 prompts for 2 images"):
        tiny_model.score_batch(["a", "b", "c"], images[:2])
    with pytest.raises(InvalidInputError, match="2 prompts for 1 images"):
        tiny_model.score_grad(torch.rand(1, 3, 32, 32), ["a", "b"])


def test_modes_rgba_palette_grayscale(tiny_model):
    rgba = _image(1, mode="RGBA")
    palette = _image(2).convert("P")
    gray = _image(3).convert("L")
    scores = tiny_model.score("x", [rgba, palette, gray])
    assert all(np.isfinite(scores))


@pytest.mark.integration
def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, ImageReward; heavy = [m for m in ('diffusers', 'accelerate', 'datasets', 'peft', 'pyarrow') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_fast_path_equals_the_plain_model(tiny_model, images):
    """Cached cross-attention K/V and trimmed padding give the same rewards as the original computation."""
    from ImageReward.tokenizer import tokenize

    prompts = ["a cat", "a much longer prompt about a red sports car at night", "x"]
    fast = tiny_model.score_batch(prompts, [images[0], images[0], images[1]])
    with torch.inference_mode():
        pixels = torch.stack([tiny_model.preprocess(images[i]) for i in (0, 0, 1)])
        ids, mask = tokenize(prompts)  # padded to 35, as the original
        cls = tiny_model.text_features(ids, mask, tiny_model.encode_images(pixels))
        plain = (tiny_model.mlp(cls) - tiny_model.mean) / tiny_model.std
    assert torch.allclose(fast, plain.squeeze(-1), atol=1e-5)


def test_encoded_bytes_are_images_too(tiny_model, images):
    data = open(images[2], "rb").read()
    assert tiny_model.score("a cat", data) == pytest.approx(tiny_model.score("a cat", images[2]), abs=1e-6)
    with pytest.raises(ImageLoadError, match="bytes"):
        tiny_model.score("a cat", [images[0], b"garbage"])


@pytest.mark.parametrize("image_index", [[0, 1, 2, 3], [2, 2, 2, 2], [1, 0, 1, 0], [0, 0, 1, 2], [3, 1, 3, 3]],
                         ids=["one-pair-per-image", "one-image", "two-each-interleaved", "uneven", "uneven-interleaved"])
def test_score_pairs_grouping_equals_the_plain_model(tiny_model, images, image_index):
    """However pairs share images (grouped cross-attention, or one K/V row per pair when uneven), the rewards
    are the plain model's, in input order, and equal to running with reference (non-fused) kernels."""
    from ImageReward.models.kernels import reference_kernels
    from ImageReward.tokenizer import tokenize

    prompts = ["a cat", "a much longer prompt about a red sports car at night", "x", "two dogs"]
    with torch.inference_mode():
        features = tiny_model.encode_images(torch.stack([tiny_model.preprocess(path) for path in images]))
        index = torch.tensor(image_index)
        fast = tiny_model.score_pairs(prompts, features, index)
        with reference_kernels():
            ids, mask = tokenize(prompts)
            cls = tiny_model.text_features(ids, mask, features[index])
            plain = tiny_model.reward_from_features(cls)
    assert torch.allclose(fast, plain, atol=1e-5)


def test_fused_kernels_only_without_autograd():
    """The oneDNN linear has no backward: with grad enabled the plain F.linear runs (and gradients flow)."""
    from ImageReward.models import kernels

    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    kernels.linear(x, layer, gelu=True).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.inference_mode():
        fused = kernels.linear(x.detach(), layer, gelu=True)
        with kernels.reference_kernels():
            plain = kernels.linear(x.detach(), layer, gelu=True)
    assert torch.allclose(fused, plain, atol=1e-6)
    assert torch.allclose(plain, torch.nn.functional.gelu(layer(x.detach())))


def test_images_read_ahead_keep_order_and_errors(tiny_model, images):
    """Images are decoded in a thread pool, a batch ahead: results stay in input order across batches, and a bad
    image in a later batch raises its own typed error, naming it."""
    paths = images * 3  # 4 distinct images over 6 batches of 2 pairs
    prompts = [f"prompt {i}" for i in range(len(paths))]
    batched = tiny_model.score_batch(prompts, paths, batch_size=2)
    one_by_one = torch.tensor([tiny_model.score(p, path) for p, path in zip(prompts, paths)])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    with pytest.raises(ImageLoadError) as info:
        tiny_model.score_batch("a cat", images[:3] + [images[3] + ".missing"], batch_size=1)
    assert "image #3" in str(info.value) and ".missing" in str(info.value)


def test_attention_through_weights_equals_projected_keys_and_values(monkeypatch):
    """Cross-attention for few queries skips projecting the image tokens; same result as projecting them."""
    from ImageReward.models.blip import BertSelfAttention, TextConfig
    from ImageReward.models.kernels import reference_kernels

    torch.manual_seed(0)
    attention = BertSelfAttention(TextConfig(hidden_size=64, num_attention_heads=4, encoder_width=96),
                                  kv_width=96).eval()
    hidden, image_tokens = torch.randn(2, 3, 64), torch.randn(2, 50, 96)
    assert attention.attention_through_weights_is_cheaper(3, 50)
    assert not attention.attention_through_weights_is_cheaper(200, 50)
    with torch.inference_mode():
        with reference_kernels():
            projected = attention(hidden, image_tokens)
        monkeypatch.setattr(attention, "key_value", lambda source: pytest.fail("image tokens were projected"))
        shortcut = attention(hidden, image_tokens)
    monkeypatch.undo()
    assert torch.allclose(shortcut, projected, atol=1e-5)
    with torch.enable_grad():  # training never takes the shortcut
        assert attention(hidden, image_tokens).requires_grad
