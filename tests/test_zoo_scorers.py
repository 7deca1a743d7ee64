"""HPSv2 / HPSv2.1 and PickScore on tiny models, offline: loading from a ``download_root`` laid out like the
originals' files, the tokenizers and pixel pipelines against the ``fixtures/zoo`` references (no weights
needed), the score formulas against independent models (open_clip's layout; transformers' ``CLIPModel``
as the model card uses it), batching, gradients, dtypes and typed errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ImageReward as RM
from ImageReward.clip_tokenizer import EOT_TOKEN_ID, clip_tokenize
from ImageReward.errors import CheckpointError, DownloadError, InvalidInputError
from ImageReward.models.hps import tiny_hps_hparams
from ImageReward.models.pickscore import processor_preprocess_config
from ImageReward.preprocess import PreprocessConfig, preprocess_pil, preprocess_tensor
from openai_clip_layout import OpenAICLIP
from parity_weights import FIXTURES, write_pickscore_processor

ZOO = FIXTURES / "zoo"
REFERENCE = json.loads((ZOO / "zoo_outputs.json").read_text())
FEATURES = np.load(ZOO / "zoo_features.npz")
PROMPTS = REFERENCE["prompts"]
IMAGES = [str(ZOO / "images" / item["file"]) for item in REFERENCE["images"]]
HPS_PIPELINE = PreprocessConfig(geometry="longest_edge_pad")


# ------------------------------------------------------------------------------- tokenizers and pixels
def test_hps_token_ids_equal_open_clip():
    assert clip_tokenize(PROMPTS).tolist() == FEATURES["hps_input_ids"].tolist()
    assert [row["input_ids"] for row in REFERENCE["HPSv2"]["tokenization"]] == FEATURES["hps_input_ids"].tolist()


def test_pickscore_token_ids_equal_the_fast_tokenizer_without_ftfy():
    ids = clip_tokenize(PROMPTS, clean=False).tolist()
    for row, expected in zip(ids, FEATURES["pick_input_ids_padded_minus1"].tolist()):
        assert row[: row.index(EOT_TOKEN_ID) + 1] == [x for x in expected if x >= 0]
        assert set(row[row.index(EOT_TOKEN_ID) + 1 :]) <= {0}
    # prompt 5 ("Tom &amp; Jerry’s “ﬁnal” ...") is where the two tokenizers part: 33 ids here, 13 cleaned
    assert ids[5].index(EOT_TOKEN_ID) + 1 == 33 and clip_tokenize(PROMPTS[5])[0].tolist().index(EOT_TOKEN_ID) + 1 == 13


def test_hps_pixels_equal_resize_max_size():
    for row, index in enumerate(FEATURES["hps_image_indices"]):
        pixels = preprocess_pil(Image.open(IMAGES[index]), HPS_PIPELINE)
        assert np.abs(pixels.numpy() - FEATURES["hps_pixel_values"][row]).max() <= 1e-6, IMAGES[index]


def test_hps_pixels_where_the_original_crashes():
    """RGBA: alpha dropped (convert('RGB')), 3 channels; long side 224: padded to 224x224 like the rest."""
    rgba = Image.open(IMAGES[2])
    assert rgba.mode == "RGBA"
    assert torch.equal(preprocess_pil(rgba, HPS_PIPELINE), preprocess_pil(rgba.convert("RGB"), HPS_PIPELINE))
    long224 = preprocess_pil(Image.open(IMAGES[6]), HPS_PIPELINE)  # 224 wide, 160 high: 32 rows of padding
    pad_value = (torch.zeros(3) - torch.tensor(HPS_PIPELINE.mean)) / torch.tensor(HPS_PIPELINE.std)
    assert long224.shape == (3, 224, 224)
    assert torch.equal(long224[:, :32], pad_value.view(3, 1, 1).expand(3, 32, 224))
    assert torch.equal(long224[:, -32:], pad_value.view(3, 1, 1).expand(3, 32, 224))
    assert not torch.equal(long224[:, 32], pad_value.view(3, 1).expand(3, 224))


def test_hps_pil_and_differentiable_paths_are_the_same_operations():
    for path in (IMAGES[0], IMAGES[1], IMAGES[6], IMAGES[7]):
        image = Image.open(path).convert("RGB")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        assert torch.allclose(preprocess_tensor(pixels, HPS_PIPELINE)[0], preprocess_pil(image, HPS_PIPELINE),
                              atol=1e-6, rtol=0)


def test_pickscore_pixels_equal_the_image_processor():
    config = processor_preprocess_config(ZOO / "processor" / "preprocessor_config.json")
    assert (config.crop_offset, config.convert_rgb_first, config.image_size) == ("floor", True, 224)
    for index, path in enumerate(IMAGES):
        pixels = preprocess_pil(Image.open(path), config)
        assert np.abs(pixels.numpy() - FEATURES["pick_pixel_values"][index]).max() <= 1e-6, path


def test_unsupported_image_processor_settings_are_refused(tmp_path):
    spec = json.loads((ZOO / "processor" / "preprocessor_config.json").read_text())
    spec["do_center_crop"] = False
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="do_center_crop"):
        processor_preprocess_config(tmp_path / "preprocessor_config.json")


# ------------------------------------------------------------------------------------------------ HPSv2
@pytest.fixture(scope="module")
def open_clip_model():
    torch.manual_seed(2024)
    return OpenAICLIP(tiny_hps_hparams()).eval()


@pytest.fixture(scope="module")
def hps_root(open_clip_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hps_root")
    torch.save({"state_dict": open_clip_model.state_dict()}, root / "HPS_v2.1_compressed.pt")
    scaled = {k: v * 1.01 if k == "visual.proj" else v for k, v in open_clip_model.state_dict().items()}
    torch.save({"state_dict": scaled}, root / "HPS_v2_compressed.pt")
    return root


@pytest.fixture(scope="module")
def hps(hps_root):
    return RM.load_score("HPSv2.1", device="cpu", download_root=hps_root, hparams=tiny_hps_hparams())


def _reference_hps(model, pixels, prompts):
    """``hpsv2.score``'s formula on the open_clip-layout model: diag(normalised image @ normalised text.T)."""
    image = F.normalize(model.encode_image(pixels), dim=-1)
    text = F.normalize(model.encode_text(clip_tokenize(prompts)), dim=-1)
    return (image * text).sum(-1)


def test_hps_scores_are_the_open_clip_cosine(hps, open_clip_model):
    images = IMAGES[:3]
    pixels = torch.stack([hps.preprocess(path) for path in images])
    with torch.no_grad():
        expected = _reference_hps(open_clip_model, pixels, PROMPTS[:3])
    assert hps.name == "HPSv2.1" and {p.dtype for p in hps.parameters()} == {torch.float32}
    assert torch.allclose(hps.score_batch(PROMPTS[:3], images), expected, atol=1e-6, rtol=0)
    assert hps.score(PROMPTS[0], images[0]) == pytest.approx(float(expected[0]), abs=1e-6)


def test_each_version_reads_its_own_file(hps, hps_root):
    v20 = RM.load_score("HPSv2", device="cpu", download_root=hps_root, hparams=tiny_hps_hparams())
    assert v20.name == "HPSv2"
    assert torch.allclose(v20.model.visual_projection.weight, hps.model.visual_projection.weight * 1.01)


def test_hps_score_batch_encodes_each_image_once_across_prompts(hps):
    rows = []
    encode = hps.encode_images
    hps.encode_images = lambda pixels: rows.append(pixels.shape[0]) or encode(pixels)
    try:
        table = hps.score_batch([p for p in PROMPTS for _ in IMAGES], IMAGES * len(PROMPTS), batch_size=64)
    finally:
        del hps.encode_images
    assert sum(rows) == len(IMAGES)
    singles = torch.tensor([hps.score(PROMPTS[3], path) for path in IMAGES])
    assert torch.allclose(table.view(len(PROMPTS), len(IMAGES))[3], singles, atol=1e-6, rtol=0)


def test_hps_gradients_match_the_open_clip_layout_model(hps, open_clip_model):
    raw = torch.rand(2, 3, 40, 27, generator=torch.Generator().manual_seed(3))
    prompts = [PROMPTS[0], PROMPTS[3]]
    ours = raw.clone().requires_grad_(True)
    hps.score_grad(ours, prompts).sum().backward()
    theirs = raw.clone().requires_grad_(True)
    _reference_hps(open_clip_model, preprocess_tensor(theirs, hps.preprocess_config), prompts).sum().backward()
    assert ours.grad.abs().max() > 0
    assert ((ours.grad - theirs.grad).abs().max() / theirs.grad.abs().max()) < 1e-4


def test_hps_bfloat16_on_request(hps_root, hps):
    low = RM.load_score("HPSv2.1", device="cpu", download_root=hps_root, dtype=torch.bfloat16,
                        hparams=tiny_hps_hparams())
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert torch.allclose(low.score_batch(PROMPTS[0], IMAGES[:2]), hps.score_batch(PROMPTS[0], IMAGES[:2]), atol=3e-2)


def test_hps_checkpoint_problems_are_named(open_clip_model, tmp_path):
    state = open_clip_model.state_dict()
    torch.save({"state_dict": state}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(CheckpointError, match="vision_layers 2 \\(expected 32\\)"):
        RM.load_score("HPSv2.1", device="cpu", download_root=tmp_path)  # tiny weights, ViT-H-14 expected
    torch.save({"state_dict": {**state, "visual.extra": torch.zeros(1)}}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(CheckpointError, match="visual.extra"):
        RM.load_score("HPSv2.1", device="cpu", download_root=tmp_path, hparams=tiny_hps_hparams())
    torch.save({"model": state}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(CheckpointError, match="'state_dict'"):
        RM.load_score("HPSv2.1", device="cpu", download_root=tmp_path, hparams=tiny_hps_hparams())


def test_nothing_local_and_offline_raises_download_error_naming_the_file(tmp_path):
    with pytest.raises(DownloadError, match="HPS_v2_compressed.pt"):
        RM.load_score("HPSv2", device="cpu", download_root=tmp_path)
    with pytest.raises(DownloadError, match="PickScore_v1"):
        RM.load_score("PickScore", device="cpu", download_root=tmp_path)


def test_hub_downloads_use_the_pinned_revisions(tmp_path, monkeypatch):
    """Each zoo file comes from its repo at a pinned 40-hex commit, unless ``revision=`` overrides it."""
    import huggingface_hub

    from ImageReward import baselines, pretrained

    calls = []

    def fake_download(repo_id, filename, revision=None, local_dir=None, **_):
        calls.append((repo_id, filename, revision))
        raise OSError("no network in tests")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(pretrained, "hub_unreachable", lambda: None)  # as if online
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HPSv2", "HPSv2.1", "PickScore"):
        with pytest.raises(DownloadError):
            RM.load_score(name, device="cpu", download_root=tmp_path)
    with pytest.raises(DownloadError):
        RM.load_score("HPSv2", device="cpu", download_root=tmp_path, revision="main")
    pins = {cfg.hf_repo: cfg.revision for cfg in (baselines.HPS_V2, baselines.HPS_V2_1, baselines.PICKSCORE_V1,
                                                  baselines.PICKSCORE_PROCESSOR)}
    assert all(len(rev) == 40 and int(rev, 16) >= 0 for rev in pins.values())
    assert calls[:3] == [("xswu/HPSv2", "HPS_v2_compressed.pt", pins["xswu/HPSv2"]),
                         ("xswu/HPSv2", "HPS_v2.1_compressed.pt", pins["xswu/HPSv2"]),
                         ("yuvalkirstain/PickScore_v1", "config.json", pins["yuvalkirstain/PickScore_v1"])]
    assert calls[3] == ("xswu/HPSv2", "HPS_v2_compressed.pt", "main")


# -------------------------------------------------------------------------------------------- PickScore
def _tiny_pickscore_config():
    from transformers import CLIPConfig

    text = {"hidden_act": "gelu", "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2,
            "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5,
            "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # PickScore's old ids
    vision = {"hidden_act": "gelu", "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2,
              "num_hidden_layers": 2, "patch_size": 16, "image_size": 32, "layer_norm_eps": 1e-5, "projection_dim": 32}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


@pytest.fixture(scope="module")
def hf_clip():
    from transformers import CLIPModel

    torch.manual_seed(99)
    model = CLIPModel(_tiny_pickscore_config()).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        for name, param in model.named_parameters():
            if param.ndim == 1 and "embedding" not in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def pick_root(hf_clip, tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("pick_root")
    (root / "PickScore_v1").mkdir()
    hf_clip.config.to_json_file(str(root / "PickScore_v1" / "config.json"))
    state = {k: v.contiguous() for k, v in hf_clip.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as older PickScore files carry it
    save_file(state, str(root / "PickScore_v1" / "model.safetensors"))
    write_pickscore_processor(root / "CLIP-ViT-H-14-laion2B-s32B-b79K", size=32)
    return root


@pytest.fixture(scope="module")
def pick(pick_root):
    return RM.load_score("PickScore", device="cpu", download_root=pick_root)


def _model_card_scores(model, pixel_values, prompt):
    """PickScore's model-card ``calc_probs`` on ``CLIPModel`` with the unpadded fast-tokenizer ids."""
    ids = clip_tokenize(prompt, clean=False)[0]
    ids = ids[: ids.tolist().index(EOT_TOKEN_ID) + 1][None]
    image_embs = model.get_image_features(pixel_values=pixel_values)
    text_embs = model.get_text_features(input_ids=ids)
    image_embs = getattr(image_embs, "pooler_output", image_embs)  # transformers 5 returns an output object
    text_embs = getattr(text_embs, "pooler_output", text_embs)
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
    return scores, scores.softmax(dim=-1)


def test_pickscore_scores_and_probs_are_the_model_card_formula(pick, hf_clip):
    with torch.no_grad():
        pixels = torch.stack([pick.preprocess(path) for path in IMAGES])
        for prompt in (PROMPTS[0], PROMPTS[5], PROMPTS[1]):
            scores, probs = _model_card_scores(hf_clip, pixels, prompt)
            assert torch.allclose(pick.score_batch(prompt, IMAGES), scores, atol=1e-5, rtol=0)
            assert np.allclose(pick.probs(prompt, IMAGES), probs.numpy(), atol=1e-6, rtol=0)
            ranks, rewards = pick.inference_rank(prompt, IMAGES)
            assert ranks == (torch.argsort(torch.argsort(-scores)) + 1).tolist()
    assert pick.logit_scale_exp == pytest.approx(float(torch.tensor(2.3).exp()))


def test_pickscore_gradients_flow_from_pixels(pick, hf_clip):
    raw = torch.rand(2, 3, 45, 32, generator=torch.Generator().manual_seed(5))
    ours = raw.clone().requires_grad_(True)
    pick.score_grad(ours, [PROMPTS[0], PROMPTS[2]]).sum().backward()
    theirs = raw.clone().requires_grad_(True)
    normalised = preprocess_tensor(theirs, pick.preprocess_config)
    total = sum(_model_card_scores(hf_clip, normalised[i : i + 1], p)[0].sum()
                for i, p in enumerate([PROMPTS[0], PROMPTS[2]]))
    total.backward()
    assert ((ours.grad - theirs.grad).abs().max() / theirs.grad.abs().max()) < 1e-4


def test_pickscore_bfloat16_keeps_the_scale_exact(pick_root, pick):
    low = RM.load_score("PickScore", device="cpu", download_root=pick_root, dtype=torch.bfloat16)
    assert low.logit_scale_exp == pick.logit_scale_exp and low.input_dtype == torch.bfloat16
    assert torch.allclose(low.score_batch(PROMPTS[0], IMAGES[:2]), pick.score_batch(PROMPTS[0], IMAGES[:2]), atol=0.5)


def test_pickscore_without_its_processor_folder_uses_the_packaged_equivalents(pick_root, pick, tmp_path, caplog):
    shutil.copytree(pick_root / "PickScore_v1", tmp_path / "PickScore_v1")
    bare = RM.load_score("PickScore", device="cpu", download_root=tmp_path)  # offline, no processor folder
    assert "packaged equivalents" in caplog.text
    tiny = processor_preprocess_config(pick_root / "CLIP-ViT-H-14-laion2B-s32B-b79K" / "preprocessor_config.json")
    assert bare.preprocess_config == processor_preprocess_config(ZOO / "processor" / "preprocessor_config.json")
    assert bare.preprocess_config.image_size == 224 and tiny.image_size == 32
    bare._preprocess_config = tiny  # the tiny model's 32 px; everything else equal
    assert torch.equal(bare.score_batch(PROMPTS[5], IMAGES[:2]), pick.score_batch(PROMPTS[5], IMAGES[:2]))


def test_pickscore_folder_problems_are_named(pick_root, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "PickScore_v1"
    shutil.copytree(pick_root / "PickScore_v1", model_dir)
    shutil.copytree(pick_root / "CLIP-ViT-H-14-laion2B-s32B-b79K", tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    state = load_file(str(model_dir / "model.safetensors"))
    save_file({**state, "text_model.extra.weight": torch.zeros(1)}, str(model_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="text_model.extra.weight"):
        RM.load_score("PickScore", device="cpu", download_root=tmp_path)
    save_file(state, str(model_dir / "model.safetensors"))
    (tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K" / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(CheckpointError, match="merges.txt"):
        RM.load_score("PickScore", device="cpu", download_root=tmp_path)


def test_bad_input_raises_typed_errors(pick):
    with pytest.raises(InvalidInputError):
        pick.score_batch(["a", "b"], IMAGES[:3])
    with pytest.raises(InvalidInputError):
        pick.score_grad(torch.rand(1, 4, 32, 32), "a")


def test_names_are_listed_and_reach_every_entry_point(pick_root, capsys):
    from ImageReward.cli import main

    assert {"HPSv2", "HPSv2.1", "PickScore"} <= set(RM.available_scores())
    assert main(["score", "--model", "PickScore", "--download-root", str(pick_root), "--device", "cpu", "--json",
                 "--prompt", PROMPTS[0], IMAGES[0], IMAGES[5]]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = RM.load_score("PickScore", device="cpu", download_root=pick_root).score(PROMPTS[0], [IMAGES[0], IMAGES[5]])
    assert [row["image"] for row in printed["results"]] == [IMAGES[0], IMAGES[5]]
    assert np.allclose([row["score"] for row in printed["results"]], expected, atol=1e-6)


def test_reward_mixes_name_and_differentiate_through_both(hps, pick, pick_root):
    from ImageReward.models.mix import WeightedReward
    from ImageReward.resolve import resolve

    mix = resolve("ImageReward-v1.0:1,HPSv2.1:1,PickScore:0.5")
    assert [(part.kind, part.target, weight) for part, weight in mix.parts] == [
        ("checkpoint", "ImageReward-v1.0", 1.0), ("scorer", "HPSv2.1", 1.0), ("scorer", "PickScore", 0.5)]
    assert resolve("HPSv2.1").kind == "scorer"
    half = RM.load_scorer("PickScore:0.5", device="cpu", download_root=pick_root)
    assert torch.allclose(half.score_batch(PROMPTS[0], IMAGES[:3]), 0.5 * pick.score_batch(PROMPTS[0], IMAGES[:3]))
    both = WeightedReward([hps, pick], [1.0, 0.5], ["HPSv2.1", "PickScore"])
    table = both.score_batch(PROMPTS[0], IMAGES[:3])  # the two preprocess differently: scored one after the other
    assert torch.allclose(table, hps.score_batch(PROMPTS[0], IMAGES[:3]) + 0.5 * pick.score_batch(PROMPTS[0], IMAGES[:3]))
    pixels = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    total, parts = both.score_grad_parts(pixels, PROMPTS[:2])
    assert torch.allclose(total, parts["HPSv2.1"] + 0.5 * parts["PickScore"])
    total.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().max() > 0
