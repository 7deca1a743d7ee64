"""Checkpoint loading: strict, safe, round-trips; downloads honour the cache and offline mode."""

from __future__ import annotations

import json
import pickle

import socket

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


def test_an_unreachable_hub_fails_at_once_without_huggingface_hub_retries(tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE, a machine with no network used to wait ~25 s in huggingface_hub's back-off for
    every missing file; one short TCP probe now answers first (files, folders and Hub repositories alike)."""
    import huggingface_hub

    from ImageReward import baselines, pretrained
    from ImageReward.pretrained import fetch_folder, fetch_hub_repo

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    probes = []

    def refused(address, timeout=None):
        probes.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(pretrained.socket, "create_connection", refused)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("retried the Hub"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("retried the Hub"))
    pretrained._probe.cache_clear()
    for attempt in (lambda: fetch(IMAGE_REWARD_MODELS["ImageReward-v1.0"], tmp_path),
                    lambda: fetch_folder(baselines.PICKSCORE_V1, tmp_path),
                    lambda: fetch_hub_repo("someone/some-model", tmp_path)):
        with pytest.raises(DownloadError, match="cannot reach huggingface.co:443 .Name or service not known"):
            attempt()
    assert probes == [(("huggingface.co", 443), 5)]  # asked once, remembered
    pretrained._probe.cache_clear()
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    with pytest.raises(DownloadError, match="mirror.example:8080"):
        fetch(IMAGE_REWARD_MODELS["ImageReward-v1.0"], tmp_path)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # cannot see through a proxy: no verdict
    assert pretrained.hub_unreachable() is None
    pretrained._probe.cache_clear()


def test_every_missing_file_of_a_name_or_mix_is_listed_at_once(tmp_path):
    from ImageReward.resolve import missing_files, weight_files

    assert [cfg.filename for cfg in missing_files("ImageReward-v1.0:1,Aesthetic:0.5,PickScore", tmp_path)] == [
        "ImageReward.pt", "sac+logos+ava1-l14-linearMSE.pth", "ViT-L-14.pt", "PickScore_v1"]
    (tmp_path / "clip-vit-large-patch14.safetensors").write_bytes(b"")  # CLIP's alternative file will do
    (tmp_path / "sac%2Blogos%2Bava1-l14-linearMSE.pth").write_bytes(b"")  # the original's literal name
    (tmp_path / "PickScore_v1").mkdir()
    (tmp_path / "PickScore_v1" / "config.json").write_text("{}")
    assert [cfg.filename for cfg in missing_files("Aesthetic,PickScore", tmp_path)] == ["PickScore_v1"]
    (tmp_path / "PickScore_v1" / "pytorch_model.bin").write_bytes(b"")  # either weights file completes it
    assert missing_files("Aesthetic,PickScore,CLIP", tmp_path) == []
    assert missing_files(str(tmp_path), tmp_path) == []  # a path is there or not
    assert {"ViT-L-14.pt", "clip-vit-large-patch14.safetensors", "PickScore_v1", "HPS_v2.1_compressed.pt",
            "ImageReward.pt"} <= {cfg.filename for cfg in weight_files()}
    with pytest.raises(DownloadError) as info:  # offline: refused before any weights are read, all named
        RM.load_scorer("ImageReward-v1.0:1,HPSv2.1:1,BLIP:0.5", device="cpu", download_root=tmp_path / "empty")
    message = str(info.value)
    for expected in ("ImageReward.pt  (from https://huggingface.co/THUDM/ImageReward",
                     "HPS_v2.1_compressed.pt  (from https://huggingface.co/xswu/HPSv2/resolve/697403c7",
                     "model_large.pth  (from https://storage.googleapis.com/", str(tmp_path / "empty")):
        assert expected in message


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
