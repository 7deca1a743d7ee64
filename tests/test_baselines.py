"""Baseline scorers on tiny models: loading (OpenAI TorchScript / state dict, Hub safetensors, Salesforce
and LAION files), the CLIP tokenizer, the score formulas, dtypes, gradients and bad input. Offline."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn.functional as F

import ImageReward as RM
from ImageReward import baselines
from ImageReward.clip_tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID, clip_tokenize
from ImageReward.models.clip import tiny_clip_hparams
from ImageReward.models.clip_convert import (is_torchscript_archive, openai_hparams, openai_to_hf,
                                             read_torchscript_tensors)
from openai_clip_layout import OpenAICLIP
from parity_weights import FIXTURES

IMAGES = sorted(str(p) for p in (FIXTURES / "parity" / "images").glob("*.png"))[:3]
PROMPTS = ["a photo of a cat", "", "A DOG, running!"]
FP16_KEYS = ("in_proj_weight", "in_proj_bias")
pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")]


def _is_fp16_in_openai_files(name: str) -> bool:
    return name.endswith(FP16_KEYS) or any(s in name for s in ("out_proj.", "c_fc.", "c_proj.")) or name in (
        "visual.conv1.weight", "visual.proj", "text_projection")


@pytest.fixture(scope="module")
def openai_clip():
    torch.manual_seed(1234)
    return OpenAICLIP(tiny_clip_hparams()).eval()


@pytest.fixture(scope="module")
def openai_archive(openai_clip, tmp_path_factory):
    """A download_root holding a TorchScript ``ViT-L-14.pt`` with OpenAI's fp16/fp32 split, as OpenAI ships."""
    root = tmp_path_factory.mktemp("openai_root")
    pixels = torch.randn(1, 3, 32, 32)
    traced = torch.jit.trace_module(openai_clip, {"encode_image": (pixels,), "encode_text": (clip_tokenize(["a"]),)})
    for name, param in traced.named_parameters():
        if _is_fp16_in_openai_files(name):
            param.data = param.data.half()
    torch.jit.save(traced, str(root / "ViT-L-14.pt"))
    torch.manual_seed(7)
    from ImageReward.models.image_reward import RewardHead

    mlp = RewardHead(tiny_clip_hparams()["embed_dim"])
    for param in mlp.parameters():
        torch.nn.init.normal_(param, std=0.2)
    torch.save(mlp.state_dict(), root / "sac%2Blogos%2Bava1-l14-linearMSE.pth")
    return root


def _effective_openai_weights(openai_clip):
    """The fp16-rounded weights a loader of the archive sees, back in fp32, in an OpenAI-layout model."""
    model = OpenAICLIP(tiny_clip_hparams()).eval()
    state = {k: (v.half().float() if _is_fp16_in_openai_files(k) else v) for k, v in openai_clip.state_dict().items()}
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def clip(openai_archive):
    return RM.load_score("CLIP", device="cpu", download_root=openai_archive)


# ------------------------------------------------------------------------------------------ tokenizer
def test_clip_token_ids_match_the_original_fixtures():
    reference = json.loads((FIXTURES / "baselines" / "baseline_outputs.json").read_text())
    for item in reference["clip_tokenization"]:
        assert clip_tokenize(item["prompt"])[0].tolist() == item["input_ids"]


def test_clip_tokenizer_truncates_to_77_with_eot_last_and_pads_with_zero():
    ids = clip_tokenize(["word " * 200, "a cat"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, 0] == SOT_TOKEN_ID and ids[0, -1] == EOT_TOKEN_ID and (ids[0, 1:-1] != EOT_TOKEN_ID).all()
    assert ids[1, :4].tolist() == [SOT_TOKEN_ID, 320, 2368, EOT_TOKEN_ID] and (ids[1, 4:] == 0).all()


def test_clip_tokenizer_cleans_text_like_openai():
    # html entities, curly quotes (ftfy), whitespace runs and case all normalise away
    assert torch.equal(clip_tokenize("A  &amp;  \u201cB\u201d\n"), clip_tokenize('a & "b"'))


def test_clip_tokenizer_rejects_non_strings():
    with pytest.raises(RM.UnsupportedInputError):
        clip_tokenize(["ok", 3])


# ------------------------------------------------------------------------------- OpenAI checkpoints
@pytest.mark.integration
def test_torchscript_reader_matches_jit_load(openai_archive):
    path = openai_archive / "ViT-L-14.pt"
    assert is_torchscript_archive(path)
    ours = read_torchscript_tensors(path)
    theirs = torch.jit.load(str(path)).state_dict()  # our own trusted file: fine to compare against
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    assert ours["visual.conv1.weight"].dtype == torch.float16 and ours["input_resolution"].item() == 32


def test_torchscript_reader_refuses_foreign_globals_without_running_them(tmp_path):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(os.system))  # a GLOBAL that would be callable
        archive.writestr("evil/code/__torch__.py", "")
    assert is_torchscript_archive(path)
    with pytest.raises(RM.CheckpointError, match="system"):
        read_torchscript_tensors(path)


def test_plain_torch_save_is_not_taken_for_an_archive(openai_clip, tmp_path):
    torch.save(openai_clip.state_dict(), tmp_path / "sd.pt")
    assert not is_torchscript_archive(tmp_path / "sd.pt")


def test_converter_reads_architecture_and_refuses_unknown_or_missing_keys(openai_clip):
    state = openai_clip.state_dict()
    assert openai_hparams(state) == tiny_clip_hparams()
    masked = {**state, "transformer.resblocks.0.attn_mask": torch.zeros(77, 77)}
    assert openai_to_hf(masked).keys() == openai_to_hf(state).keys()
    with pytest.raises(RM.CheckpointError, match="does not know"):
        openai_to_hf({**state, "visual.extra": torch.zeros(1)})
    broken = dict(state)
    del broken["ln_final.bias"]
    with pytest.raises((RM.CheckpointError, KeyError)):
        openai_to_hf(broken)


def test_clip_from_torchscript_matches_the_openai_layout_model(openai_clip, clip):
    reference = _effective_openai_weights(openai_clip)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        image = F.normalize(reference.encode_image(pixels), dim=-1)
        text = F.normalize(reference.encode_text(clip_tokenize(PROMPTS)), dim=-1)
        ours_image = clip.encode_images(pixels)
        assert (ours_image - image).abs().max() < 1e-5
        assert (clip.text_features(PROMPTS) - text).abs().max() < 1e-5
        scores = clip.score_encoded(PROMPTS, ours_image)
    assert torch.allclose(scores, (image * text).sum(-1), atol=1e-5)  # raw cosine: no x100, no clamp
    assert scores.dtype == torch.float32 and {p.dtype for p in clip.parameters()} == {torch.float32}


def test_clip_from_plain_state_dict_and_from_hub_safetensors(openai_clip, clip, tmp_path):
    from safetensors.torch import save_file

    pixels = torch.randn(2, 3, 32, 32)
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save(openai_clip.state_dict(), plain / "ViT-L-14.pt")
    from_plain = RM.load_score("CLIP", device="cpu", download_root=plain)
    hub = tmp_path / "hub"
    hub.mkdir()
    state = {k: v.contiguous() for k, v in from_plain.model.state_dict().items()}
    save_file(state, str(hub / baselines.CLIP_HUB.filename))
    from_hub = RM.load_score("CLIP", device="cpu", download_root=hub)
    with torch.inference_mode():
        a, b = from_plain.encode_images(pixels), from_hub.encode_images(pixels)
        assert torch.equal(a, b)
        assert torch.equal(from_plain.score_encoded(PROMPTS[:2], a), from_hub.score_encoded(PROMPTS[:2], b))
        # fp16 rounding of the archive is the only difference from the fp32 state dict
        assert (a - clip.encode_images(pixels)).abs().max() < 1e-2


# ------------------------------------------------------------------------------------ Scorer API
def test_clip_public_methods(clip):
    single = clip.score(PROMPTS[0], IMAGES[0])
    many = clip.score(PROMPTS[0], IMAGES)
    ranks, rewards = clip.inference_rank(PROMPTS[0], IMAGES)
    assert isinstance(single, float) and abs(single - many[0]) < 1e-6
    assert rewards == pytest.approx(many, abs=1e-6)
    assert sorted(ranks) == [1, 2, 3] and ranks[max(range(3), key=lambda i: rewards[i])] == 1
    batch = clip.score_batch(PROMPTS, IMAGES)
    assert batch.shape == (3,) and batch.dtype == torch.float32
    assert all(-1.0 <= value <= 1.0 for value in batch.tolist())


def test_repeated_prompts_are_encoded_once(clip):
    calls = []
    text_model = clip.model.text_model
    handle = text_model.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    try:
        clip.score_batch("a cat", IMAGES * 2, batch_size=8)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_bad_input_raises_typed_errors(clip, tmp_path):
    with pytest.raises(RM.ImageLoadError):
        clip.score("a cat", str(tmp_path / "missing.png"))
    with pytest.raises(RM.InvalidInputError):
        clip.score_batch("a cat", [])
    with pytest.raises(RM.UnsupportedInputError):
        clip.score(42, IMAGES[0])
    with pytest.raises(RM.InvalidInputError):
        clip.score_batch(["a", "b"], IMAGES)
    with pytest.raises(RM.UnknownModelError, match="available scores"):
        RM.load_score("CLIPPY")
    with pytest.raises(TypeError):
        RM.load_score("CLIP", download_root=tmp_path, bogus=1)


def test_clip_score_grad_flows_to_pixels(clip):
    pixels = torch.rand(2, 3, 40, 48, requires_grad=True)
    rewards = clip.score_grad(pixels, "a cat")
    rewards.sum().backward()
    assert rewards.shape == (2,) and pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_half_precision_on_request(openai_archive, clip):
    for dtype in (torch.bfloat16, torch.float16):
        half = RM.load_score("CLIP", device="cpu", download_root=openai_archive, dtype=dtype)
        assert half.input_dtype == dtype
        assert half.score_batch(PROMPTS, IMAGES) == pytest.approx(clip.score_batch(PROMPTS, IMAGES).tolist(), abs=3e-2)


# -------------------------------------------------------------------------------- downloads, files
def test_nothing_local_and_offline_raises_download_error_naming_the_files(tmp_path):
    for name, expected in (("CLIP", "ViT-L-14.pt"), ("BLIP", "model_large.pth"),
                           ("Aesthetic", "sac+logos+ava1-l14-linearMSE.pth")):
        with pytest.raises(RM.DownloadError, match=expected.replace("+", r"\+")):
            RM.load_score(name, download_root=tmp_path / name)


def test_registry_entries_use_the_original_sources():
    assert baselines.CLIP_OPENAI.url.endswith(f"/{baselines.CLIP_OPENAI.sha256}/ViT-L-14.pt")
    assert baselines.CLIP_HUB.hf_repo == "openai/clip-vit-large-patch14"
    assert len(baselines.CLIP_HUB.revision) == 40 and int(baselines.CLIP_HUB.revision, 16) >= 0
    assert baselines.BLIP_LARGE.url.endswith("/BLIP/models/model_large.pth")
    assert "sac%2Blogos%2Bava1-l14-linearMSE.pth" in baselines.AESTHETIC_HEAD.alt_filenames
    assert RM.available_scores() == ["CLIP", "BLIP", "Aesthetic", "HPSv2", "HPSv2.1", "PickScore"]


@pytest.mark.integration
def test_importing_baselines_stays_cheap():
    code = ("import sys, ImageReward as RM; RM.available_scores(); "
            "print(sorted(m for m in ('transformers', 'diffusers', 'accelerate', 'ImageReward.models.clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ Aesthetic
def test_aesthetic_loads_either_file_name_and_ignores_the_prompt(openai_archive, clip, tmp_path):
    aesthetic = RM.load_score("Aesthetic", device="cpu", download_root=openai_archive)
    assert aesthetic.uses_prompt is False and "text_model" not in str(list(aesthetic.state_dict()))
    pixels = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        features = aesthetic.encode_images(pixels)
        assert (features - clip.encode_images(pixels)).abs().max() < 1e-6  # the image tower alone, same weights
        expected = aesthetic.mlp(features).squeeze(-1)
        assert torch.equal(aesthetic.score_encoded(PROMPTS, features), expected)
    scores = aesthetic.score_batch(PROMPTS, [IMAGES[0]] * 3)
    assert scores[0] == scores[1] == scores[2]
    # the decoded file name works too, and a shared tower gives the same numbers
    plain = tmp_path / "decoded"
    plain.mkdir()
    (plain / "sac+logos+ava1-l14-linearMSE.pth").write_bytes((openai_archive / "sac%2Blogos%2Bava1-l14-linearMSE.pth").read_bytes())
    shared = RM.load_score("Aesthetic", device="cpu", download_root=plain, clip=clip)
    assert shared.vision_model is clip.model.vision_model
    assert torch.allclose(shared.score_batch(PROMPTS, IMAGES), aesthetic.score_batch(PROMPTS, IMAGES), atol=1e-6)


def test_aesthetic_half_keeps_the_head_float32_and_differentiates(openai_archive):
    aesthetic = RM.load_score("Aesthetic", device="cpu", download_root=openai_archive, dtype=torch.bfloat16)
    assert aesthetic.input_dtype == torch.bfloat16 and aesthetic.mlp.layers[0].weight.dtype == torch.float32
    pixels = torch.rand(1, 3, 32, 32, requires_grad=True)
    aesthetic.score_grad(pixels, "").sum().backward()
    assert pixels.grad.abs().sum() > 0


def test_aesthetic_head_with_wrong_keys_is_refused(openai_archive, tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "ViT-L-14.pt").symlink_to(openai_archive / "ViT-L-14.pt")
    torch.save({"weight": torch.zeros(1, 32)}, root / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(RM.CheckpointError, match="missing keys"):
        RM.load_score("Aesthetic", download_root=root)


# ----------------------------------------------------------------------------------------- BLIP
def _tiny_blip_state():
    from ImageReward.models.blip import BLIP, BLIPConfig

    torch.manual_seed(3)
    blip = BLIP(BLIPConfig.tiny())
    with torch.no_grad():
        for name, param in blip.named_parameters():
            if "norm" in name.lower() and name.endswith("bias"):
                param.normal_(std=0.1)
    state = dict(blip.state_dict())
    # what else Salesforce's BLIP_Pretrain file holds: ignored by name
    state.update({"itm_head.weight": torch.zeros(2, 32), "visual_encoder_m.cls_token": torch.zeros(1, 1, 32),
                  "image_queue": torch.zeros(16, 8), "temp": torch.tensor(0.07)})
    return state


def test_blip_itc_is_the_cosine_of_unimodal_projections():
    from ImageReward.models.blip import BLIPConfig
    from ImageReward.models.blip_itc import BLIPITCScorer
    from ImageReward.tokenizer import tokenize

    blip = BLIPITCScorer.from_state_dict(_tiny_blip_state(), BLIPConfig.tiny())
    pixels = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        image = blip.encode_images(pixels)
        vit = blip.blip.visual_encoder(pixels)
        assert torch.allclose(image, F.normalize(blip.blip.vision_proj(vit[:, 0]), dim=-1), atol=1e-6)
        ids, mask = tokenize(PROMPTS)
        hidden = blip.blip.text_encoder(ids, mask, mode="text")[:, 0]
        text = F.normalize(blip.blip.text_proj(hidden), dim=-1)
        assert torch.allclose(blip.text_features(PROMPTS), text, atol=1e-6)
        cross = blip.blip.text_encoder(ids, mask, vit, mode="multimodal")[:, 0]
        assert not torch.allclose(hidden, cross)  # ITC text runs without cross-attention
        assert torch.allclose(blip.score_encoded(PROMPTS, image), (image * text).sum(-1), atol=1e-6)
    scores = blip.score_batch(PROMPTS, IMAGES)
    assert scores.shape == (3,) and all(-1.0 <= s <= 1.0 for s in scores.tolist())
    pixels = torch.rand(1, 3, 50, 40, requires_grad=True)
    blip.score_grad(pixels, "a cat").sum().backward()
    assert pixels.grad.abs().sum() > 0


def test_blip_checkpoint_problems_are_named():
    from ImageReward.models.blip import BLIPConfig
    from ImageReward.models.blip_itc import BLIPITCScorer

    state = _tiny_blip_state()
    with pytest.raises(RM.CheckpointError, match="text_proj.weight"):
        BLIPITCScorer.from_state_dict({k: v for k, v in state.items() if k != "text_proj.weight"}, BLIPConfig.tiny())
    with pytest.raises(RM.CheckpointError, match="surprise"):
        BLIPITCScorer.from_state_dict({**state, "surprise.weight": torch.zeros(1)}, BLIPConfig.tiny())


def test_blip_file_without_model_entry_or_wrong_size_is_refused(tmp_path):
    torch.save(_tiny_blip_state(), tmp_path / "model_large.pth")  # not wrapped in {'model': ...}
    with pytest.raises(RM.CheckpointError, match="'model'"):
        RM.load_score("BLIP", download_root=tmp_path)
    torch.save({"model": _tiny_blip_state()}, tmp_path / "model_large.pth")  # tiny weights, full-size model
    with pytest.raises(RM.CheckpointError, match="shape mismatches"):
        RM.load_score("BLIP", download_root=tmp_path)


def test_blip_tokenization_matches_the_original_fixtures():
    from ImageReward.tokenizer import tokenize

    reference = json.loads((FIXTURES / "baselines" / "baseline_outputs.json").read_text())
    ids, mask = tokenize([item["prompt"] for item in reference["blip_tokenization"]])
    assert ids.tolist() == [item["input_ids"] for item in reference["blip_tokenization"]]
    assert mask.tolist() == [item["attention_mask"] for item in reference["blip_tokenization"]]



def test_cli_scores_with_a_baseline(openai_archive, clip, capsys):
    from ImageReward.cli import main

    code = main(["rank", "--model", "CLIP", "--device", "cpu", "--download-root", str(openai_archive),
                 "--prompt", PROMPTS[0], "--json", *IMAGES])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    expected = clip.score(PROMPTS[0], IMAGES)
    assert {row["image"]: row["score"] for row in result["results"]} == pytest.approx(dict(zip(IMAGES, expected)), abs=1e-6)
    assert [row["rank"] for row in result["results"]] == [1, 2, 3]


def test_clip_weights_come_from_local_files_then_the_hub_then_openai(monkeypatch, tmp_path):
    calls = []

    def fake_fetch(cfg, root, revision=None):
        calls.append(cfg.name)
        if cfg is baselines.CLIP_HUB:
            raise RM.DownloadError("no route to the Hub")
        return root / cfg.filename

    monkeypatch.setattr(baselines, "fetch", fake_fetch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert baselines.clip_weights_path(tmp_path) == tmp_path / "ViT-L-14.pt"
    assert calls == [baselines.CLIP_HUB.name, baselines.CLIP_OPENAI.name]
    calls.clear()
    (tmp_path / "clip-vit-large-patch14.safetensors").write_bytes(b"")
    assert baselines.clip_weights_path(tmp_path) == tmp_path / "clip-vit-large-patch14.safetensors" and calls == []
    (tmp_path / "ViT-L-14.pt").write_bytes(b"")
    assert baselines.clip_weights_path(tmp_path) == tmp_path / "ViT-L-14.pt" and calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RM.DownloadError, match="ViT-L-14.pt"):
        baselines.clip_weights_path(tmp_path / "empty")
    assert calls == [baselines.CLIP_HUB.name]  # offline: no attempt at OpenAI's URL
