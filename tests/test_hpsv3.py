"""HPSv3 on a tiny Qwen2-VL with deterministic random weights, offline, against the original's outputs
(``fixtures/hpsv3``: hpsv3 1.0.0 on transformers 4.45.2, fp32, CPU; see its README): pixels, grids, token ids,
all 36 (mu, sigma), batching, ranks; then gradients, bf16, loading, typed errors, mixes and score-dataset."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from packaging.version import Version  # noqa: E402

if Version(transformers.__version__) < Version("4.45.0"):  # the WebUI pins: tests/test_hpsv3_dependency.py
    pytest.skip("HPSv3 needs transformers >= 4.45", allow_module_level=True)

import ImageReward as RM  # noqa: E402
from ImageReward import factory  # noqa: E402
from ImageReward.errors import CheckpointError, DownloadError, InvalidInputError  # noqa: E402
from ImageReward.models.clip import CLIPScorer, build_clip_model, clip_config, tiny_clip_hparams  # noqa: E402
from ImageReward.models.hpsv3 import INSTRUCTION, PROMPT_SUFFIX, HPSv3Scorer, patchify  # noqa: E402
from ImageReward.scorer import rank_descending  # noqa: E402
from ImageReward.scoring import score_dataset  # noqa: E402
from ImageReward.scoring.runner import DistributedContext  # noqa: E402
from parity_weights import FIXTURES, build_state_dict  # noqa: E402

HERE = FIXTURES / "hpsv3"
REF = json.loads((HERE / "hpsv3_reference.json").read_text(encoding="utf-8"))
PROMPTS = REF["prompts"]
IMAGES = [str(HERE / "images" / name) for name in REF["images"]]
MU, SIGMA = np.array(REF["mu"]), np.array(REF["sigma"])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A download_root laid out as the original's files: HPSv3.safetensors + Qwen2-VL-7B-Instruct/."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("hpsv3_root")
    save_file(build_state_dict(HERE / "hpsv3_tiny_weights_recipe.json"), str(folder / "HPSv3.safetensors"),
              metadata={"format": "pt"})
    shutil.copytree(HERE / "processor", folder / "Qwen2-VL-7B-Instruct")
    return folder


@pytest.fixture(scope="module")
def hps3(root) -> HPSv3Scorer:
    return RM.load_score("HPSv3", device="cpu", download_root=root, dtype=torch.float32)


# ------------------------------------------------------------------------------ inputs, no model needed
def test_pixels_and_grids_equal_the_original(hps3):
    """fetch_image + the slow Qwen2VLImageProcessor, bit for bit (sha256 of the float32 patch rows)."""
    for path, ref in zip(IMAGES, REF["preprocess"]):
        pixels = hps3.preprocess(path)
        rows, grid = patchify(pixels)
        assert list(pixels.shape[1:][::-1]) == ref["fetch_image_size_wh"], path
        assert [list(grid)] == ref["image_grid_thw"] and list(rows.shape) == ref["pixel_values_shape"], path
        digest = hashlib.sha256(rows.contiguous().numpy().astype(np.float32).tobytes()).hexdigest()
        assert digest == ref["pixel_values_sha256"], path
        assert rows.shape[0] // 4 == ref["n_image_pad_tokens"]


def test_token_ids_and_chat_text_equal_the_original(hps3):
    assert INSTRUCTION == REF["instruction_template"]["INSTRUCTION"]
    assert PROMPT_SUFFIX == REF["instruction_template"]["prompt_with_special_token"]
    assert hps3.reward_token_id == REF["reward_token"][1] and len(hps3.tokenizer) == REF["len_tokenizer"]
    n_image = REF["preprocess"][0]["n_image_pad_tokens"]
    for prompt, ref in zip(PROMPTS, REF["tokenization"]):
        ids = hps3.input_ids(prompt, n_image)
        # the original's ids go on after <|Reward|> ("\n\nEND\n<|im_end|>..."), which cannot change the score
        assert ids == ref["input_ids"][: len(ids)]
        assert len(ids) - 1 == ref["reward_token_positions"][0] and ids.count(hps3.reward_token_id) == 1
        assert hps3.tokenizer(prompt)["input_ids"] == ref["prompt_only_ids"]
    assert ref["input_ids"].count(REF["special_ids"]["<|im_end|>"]) >= 2  # prompt 4: "<|im_end|>" is that token


# ------------------------------------------------------------------------------------------- parity
def test_mu_and_sigma_of_six_images_of_different_sizes_equal_the_original(hps3):
    mu, sigma = hps3.score_with_uncertainty(PROMPTS[0], IMAGES)  # one batch: six sizes, pixels as a list
    assert np.abs(mu.numpy() - MU[0]).max() < 1e-5 and np.abs(sigma.numpy() - SIGMA[0]).max() < 1e-5


@pytest.mark.integration
def test_all_36_pairs_batched_and_one_by_one_and_ranks_equal_the_original(hps3):
    prompts = [prompt for prompt in PROMPTS for _ in IMAGES]
    mu, sigma = hps3.score_with_uncertainty(prompts, IMAGES * len(PROMPTS), batch_size=8)  # each image once
    assert np.abs(mu.numpy().reshape(MU.shape) - MU).max() < 1e-5
    assert np.abs(sigma.numpy().reshape(SIGMA.shape) - SIGMA).max() < 1e-5
    for p in range(len(PROMPTS)):
        assert rank_descending(mu.reshape(MU.shape)[p]) == REF["ranks_by_mu"][p]["ranks"]
    ranks, rewards = hps3.inference_rank(PROMPTS[3], IMAGES, batch_size=4)  # sub-batches of 4 and 2
    assert ranks == REF["ranks_by_mu"][3]["ranks"] and np.abs(np.array(rewards) - MU[3]).max() < 1e-5
    single = [hps3.score(PROMPTS[2], path) for path in IMAGES]  # the longest prompt, one pair at a time
    assert np.abs(np.array(single) - MU[2]).max() < 1e-5
    pairs = REF["mixed_batch"]["pairs_prompt_image"]  # prompt j with image j: six lengths, right-padded
    mixed = hps3.score_batch([PROMPTS[p] for p, _ in pairs], [IMAGES[i] for _, i in pairs])
    assert np.abs(mixed.numpy() - np.array(REF["mixed_batch"]["mu"])).max() < 1e-5


def test_pathlib_pil_and_str_paths_give_the_same_score(hps3):
    """The original crashes on a pathlib.Path (AttributeError); a PIL image equals the path there."""
    path_score, pil_score = hps3.score(PROMPTS[0], [Path(IMAGES[1]), Image.open(IMAGES[1])])
    assert abs(path_score - pil_score) < 1e-6 and abs(path_score - MU[0][1]) < 1e-5  # rows of one batch: fp32 noise


# ------------------------------------------------------------------------------------ typed errors
def test_reserved_special_tokens_in_a_prompt_are_typed_errors_before_reading_images(hps3):
    for prompt in ("a <|Reward|> cat", "two <|image_pad|> dogs"):
        with pytest.raises(InvalidInputError, match="special token"):
            hps3.score_batch(prompt, ["/nonexistent.png"])
        with pytest.raises(InvalidInputError, match="special token"):
            hps3.score_grad(torch.rand(1, 3, 28, 28), prompt)
    with pytest.raises(InvalidInputError, match="against a prompt"):
        hps3.score_batch(None, ["/nonexistent.png"])
    # a string the original's processor would turn into image tokens is text here
    assert np.isfinite(hps3.score("a <|placeholder|> sign", IMAGES[5]))


def test_extreme_aspect_ratio_is_a_typed_error_naming_the_image(hps3):
    strip = Image.new("RGB", (402, 2), "white")  # aspect ratio 201: the original raises ValueError
    with pytest.raises(InvalidInputError, match=r"image #1 .*aspect ratio 201"):
        hps3.score_batch("a", [IMAGES[5], strip])
    assert np.isfinite(hps3.score("a", Image.new("RGB", (400, 2), "white")))  # 200 is accepted


def test_sixteen_bit_images_are_scaled_not_clipped(hps3):
    values = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    sixteen = Image.fromarray(values)  # I;16
    eight = Image.fromarray(((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    scores = hps3.score("a", [sixteen, eight])  # two rows of one batch: equal up to fp32 noise
    assert torch.equal(hps3.preprocess(sixteen), hps3.preprocess(eight)) and abs(scores[0] - scores[1]) < 1e-6


# --------------------------------------------------------------------------- gradients and dtypes
@pytest.mark.integration
def test_score_grad_is_the_score_of_the_same_pixels(hps3):
    image = np.asarray(Image.open(IMAGES[1]).convert("RGB"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].clone().requires_grad_()
    reward = hps3.score_grad(pixels, PROMPTS[0])
    reward.sum().backward()
    assert abs(reward.item() - MU[0][1]) < 2e-2  # tensor resize of float pixels vs PIL resize of uint8 pixels
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


@pytest.mark.integration
def test_score_grad_gradients_check_by_finite_differences(monkeypatch):
    """float64 end to end (resize, patching, vision tower, language model, head). transformers' RMSNorm computes
    in float32 whatever the input, which would make the differences noisy: it runs in the input's dtype here.
    The vision rotary embedding still rounds q/k to float32 (and the head's ReLUs have kinks), hence the step
    1e-3 and a 1e-4 relative tolerance; a wrong gradient is off by far more."""
    model = HPSv3Scorer.from_state_dict(build_state_dict(HERE / "hpsv3_tiny_weights_recipe.json"),
                                        HERE / "processor").double()

    def rms_norm_in_input_dtype(self, hidden):
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(type(model.model.model.norm), "forward", rms_norm_in_input_dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 30, 20, dtype=torch.float64, generator=generator) * 0.8 + 0.1  # upscaled to 560x392
    direction = torch.randn(x.shape, dtype=torch.float64, generator=generator) * 0.1
    prompts = ["a red fox", "a"]
    x.requires_grad_()
    model.score_grad(x, prompts).sum().backward()
    step = 1e-3
    with torch.no_grad():
        difference = model.score_grad(x + step * direction, prompts) - model.score_grad(x - step * direction, prompts)
    numeric = difference.sum().item() / (2 * step)
    analytic = (x.grad * direction).sum().item()
    assert abs(numeric - analytic) <= 1e-4 * abs(analytic), (numeric, analytic)


def test_bf16_runs_on_cpu_with_the_head_in_fp32(root):
    """The original's shipped bf16 config raises on CPU (mat1 and mat2 must have the same dtype)."""
    bf16 = RM.load_score("HPSv3", device="cpu", download_root=root)  # bf16 is the default
    assert bf16.model.visual.patch_embed.proj.weight.dtype == torch.bfloat16
    assert bf16.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.model.rm_head.parameters()} == {torch.float32}
    head = build_state_dict(HERE / "hpsv3_tiny_weights_recipe.json")["rm_head.0.weight"]
    assert torch.equal(bf16.model.rm_head[0].weight, head)  # the file's values, never rounded through bf16
    mu = bf16.score_batch(PROMPTS[0], IMAGES).numpy()
    emulated = np.array([row["mu"] for row in REF["bf16_emulated_original"]])  # the original's bf16 ops, on CPU
    assert np.abs(mu - MU[0]).max() < 1e-2 and np.abs(mu - emulated).max() < 1e-2


# --------------------------------------------------------------------------- registry and loading
def test_registry_missing_files_and_offline_errors(tmp_path):
    assert "HPSv3" in RM.available_scorers()
    missing = RM.missing_files("HPSv3", tmp_path)
    assert [cfg.filename for cfg in missing] == ["HPSv3.safetensors", "Qwen2-VL-7B-Instruct"]
    assert "MizzenAI/HPSv3" in missing[0].describe() and "Qwen/Qwen2-VL-7B-Instruct" in missing[1].describe()
    with pytest.raises(DownloadError, match="HPSv3.safetensors.*Qwen2-VL-7B-Instruct") as err:
        RM.load_scorer("HPSv3", device="cpu", download_root=tmp_path)
    assert [cfg.filename for cfg in err.value.missing] == ["HPSv3.safetensors", "Qwen2-VL-7B-Instruct"]
    (tmp_path / "Qwen2-VL-7B-Instruct").mkdir()  # an incomplete folder is still missing
    (tmp_path / "Qwen2-VL-7B-Instruct" / "config.json").write_text("{}")
    assert len(RM.missing_files("HPSv3", tmp_path)) == 2


@pytest.mark.integration
def test_mix_through_load_scorer_and_score_dataset(root, hps3, tmp_path, monkeypatch):
    """HPSv3 (images of their own sizes, a list of pixels) beside a CLIP (224 px) in one mix: score_batch and
    score-dataset, whose DataLoader workers run both preprocessings."""
    torch.manual_seed(0)
    clip = CLIPScorer(build_clip_model(clip_config(tiny_clip_hparams()))).eval()
    monkeypatch.setitem(factory._SCORERS, "CLIP", lambda **kw: clip)
    mix = RM.load_scorer("HPSv3:1,CLIP:0.5", device="cpu", download_root=root, dtype=torch.float32)
    assert len(mix.preprocess_configs) == 2
    images = IMAGES[:3]
    expected = torch.tensor(MU[0][:3], dtype=torch.float32) + 0.5 * clip.score_batch(PROMPTS[0], images)
    torch.testing.assert_close(mix.score_batch(PROMPTS[0], images, batch_size=2), expected, atol=1e-5, rtol=0)

    folder = tmp_path / "images"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder)
    for scorer, want, out, workers in ((mix, expected, tmp_path / "mix.jsonl", 1),
                                       (hps3, MU[0][:3], tmp_path / "hps3.jsonl", 0)):
        score_dataset(scorer, folder, out, prompt=PROMPTS[0], progress=False, batch_size=2, num_workers=workers,
                      context=DistributedContext())
        by_name = {Path(row["image"]).name: row["score"] for row in map(json.loads, out.read_text().splitlines())}
        assert [by_name[Path(p).name] for p in images] == pytest.approx(list(map(float, want)), abs=1e-5)


def test_loading_adopts_the_checkpoint_tensors_without_a_copy():
    """One copy of the weights: the model's parameters are the tensors read from the file; lm_head is dropped."""
    state = build_state_dict(HERE / "hpsv3_tiny_weights_recipe.json")
    patch, head = state["visual.patch_embed.proj.weight"], state["rm_head.0.weight"]
    scorer = HPSv3Scorer.from_state_dict(state, HERE / "processor")
    assert state == {}  # emptied: no second reference keeps the tensors alive
    assert scorer.model.visual.patch_embed.proj.weight.data_ptr() == patch.data_ptr()
    assert scorer.model.rm_head[0].weight.data_ptr() == head.data_ptr()
    assert not any(name.startswith("lm_head") for name in scorer.state_dict())


def test_a_broken_processor_folder_or_checkpoint_is_a_checkpoint_error(root, tmp_path):
    broken = tmp_path / "Qwen2-VL-7B-Instruct"
    shutil.copytree(HERE / "processor", broken)
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer"):
        RM.load_score("HPSv3", device="cpu", download_root=root, processor=broken)
    shutil.copy(HERE / "processor" / "tokenizer.json", broken / "tokenizer.json")
    (broken / "config.json").write_text("not json")
    with pytest.raises(CheckpointError, match="config.json"):
        RM.load_score("HPSv3", device="cpu", download_root=root, processor=broken)
    (tmp_path / "HPSv3.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        RM.load_score("HPSv3", device="cpu", checkpoint=tmp_path / "HPSv3.safetensors", processor=HERE / "processor")
