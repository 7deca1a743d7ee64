"""Checkpoint loading: strict, safe, round-trips; downloads honour the cache and offline mode."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import ImageReward as RM
from ImageReward.errors import CheckpointError, DownloadError, UnknownModelError
from ImageReward.models.blip import BLIPConfig
from ImageReward.models.image_reward import ImageReward
from ImageReward.pretrained import IMAGE_REWARD_MODELS, fetch


def _load_tiny(path):
    """The code path of ``RM.load`` for a checkpoint file (read -> from_state_dict), with the tiny config."""
    from ImageReward.checkpoint import read_state_dict

    return ImageReward.from_state_dict(read_state_dict(path), BLIPConfig.tiny(), source=str(path))


def test_save_pretrained_round_trip(tiny_model, tmp_path):
    tiny_model.mean, tiny_model.std = 0.5, 2.0
    folder = tiny_model.save_pretrained(tmp_path / "saved")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    loaded = RM.load(str(folder), device="cpu")
    assert loaded.mean == 0.5 and loaded.std == 2.0
    pixels = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.score_grad(pixels, "a cat"), tiny_model.score_grad(pixels, "a cat"))


def test_pt_and_safetensors_and_module_prefix(tiny_model, tmp_path):
    state = {k: v for k, v in tiny_model.state_dict().items()}
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    pixels = torch.rand(1, 3, 32, 32)
    expected = tiny_model.score_grad(pixels, "x").detach()
    for name in ("plain.pt", "ddp.pt", "w.safetensors"):
        model = _load_tiny(tmp_path / name).eval()
        assert torch.equal(model.score_grad(pixels, "x").detach(), expected), name


def test_optional_keys_may_be_missing(tiny_model, tmp_path):
    state = {k: v for k, v in tiny_model.state_dict().items()
             if not k.startswith(("blip.vision_proj", "blip.text_proj")) and "position_ids" not in k}
    torch.save(state, tmp_path / "lean.pt")
    model = _load_tiny(tmp_path / "lean.pt")
    assert torch.equal(model.blip.text_encoder.embeddings.position_ids[0, :5], torch.arange(5))


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny_model, tmp_path):
    state = dict(tiny_model.state_dict())
    del state["mlp.layers.0.weight"]
    state["blip.extra.weight"] = torch.zeros(1)
    state["mlp.layers.7.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        _load_tiny(tmp_path / "bad.pt")
    message = str(info.value)
    assert "mlp.layers.0.weight" in message and "blip.extra.weight" in message and "mlp.layers.7.bias" in message


def test_full_size_checkpoint_with_wrong_keys_is_refused(tmp_path):
    torch.save({"not.a.key": torch.zeros(2)}, tmp_path / "ImageReward.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        RM.load(str(tmp_path / "ImageReward.pt"), device="cpu")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_that_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"x": _Evil()}, handle)
    with pytest.raises(CheckpointError, match="refusing"):
        RM.load(str(path), device="cpu")


def test_unknown_name(tmp_path):
    with pytest.raises(UnknownModelError, match="ImageReward-v1.0"):
        RM.load("ImageReward-v9", device="cpu")
    assert RM.available_models() == ["ImageReward-v1.0"]


def test_cached_file_is_used_without_network(tmp_path):
    cfg = IMAGE_REWARD_MODELS["ImageReward-v1.0"]
    (tmp_path / "ImageReward.pt").write_bytes(b"stub")
    assert fetch(cfg, tmp_path) == tmp_path / "ImageReward.pt"


def test_offline_missing_file_says_what_to_download(tmp_path):
    cfg = IMAGE_REWARD_MODELS["ImageReward-v1.0"]
    with pytest.raises(DownloadError) as info:
        fetch(cfg, tmp_path / "cache")
    message = str(info.value)
    assert "THUDM/ImageReward" in message and "ImageReward.pt" in message and str(tmp_path / "cache") in message


def test_download_url_is_atomic_and_checks_sha(tmp_path, monkeypatch):
    import hashlib
    import io

    from ImageReward import pretrained

    payload = b"x" * 1000

    class FakeResponse(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda url, timeout: FakeResponse(payload))
    good = hashlib.sha256(payload).hexdigest()
    out = pretrained.download_url("https://example.invalid/f.bin", tmp_path / "f.bin", sha256=good)
    assert out.read_bytes() == payload
    with pytest.raises(DownloadError, match="SHA-256"):
        pretrained.download_url("https://example.invalid/g.bin", tmp_path / "g.bin", sha256="0" * 64)
    assert not (tmp_path / "g.bin").exists()
    assert not list(tmp_path.glob("*.part"))


def test_bf16_load_keeps_head_in_fp32(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "m")
    model = RM.load(str(folder), device="cpu", dtype=torch.bfloat16)
    assert model.input_dtype == torch.bfloat16
    assert model.mlp.layers[0].weight.dtype == torch.float32
    assert model.blip.text_encoder.embeddings.word_embeddings.weight.dtype == torch.float32
    fp32 = RM.load(str(folder), device="cpu")
    images = [torch.rand(3, 32, 32) for _ in range(3)]
    assert torch.allclose(model.score_batch("a cat", images), fp32.score_batch("a cat", images), atol=2e-2)


def test_cli_score_and_rank(tiny_model, tmp_path, capsys):
    from PIL import Image

    from ImageReward.cli import main

    folder = tiny_model.save_pretrained(tmp_path / "m")
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 32), (i * 80, 10, 200 - i * 50)).save(path)
        paths.append(str(path))
    assert main(["rank", "--prompt", "a cat", "--model", str(folder), "--device", "cpu", "--json", *paths]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["rank"] for row in result["results"]] == [1, 2, 3]
    expected = tiny_model.score("a cat", paths)
    got = {row["image"]: row["score"] for row in result["results"]}
    assert [got[p] for p in paths] == pytest.approx(expected, abs=1e-5)
    assert main(["score", "--prompt", "a cat", "--model", str(folder), "--device", "cpu", paths[0]]) == 0
    assert "score" in capsys.readouterr().out
    assert main(["score", "--prompt", "a cat", "--model", str(folder), "--device", "cpu", str(tmp_path / "nope.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
