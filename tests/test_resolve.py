"""The one resolver (ImageReward/resolve.py): one precedence in every entry point, and a weighted mix scored
as sum_i w_i * s_i by `imagereward score`, `score-dataset`, eval, the ReFL reward and both plugins.

Offline and tiny: "ImageReward-v1.0" is redirected to a tiny saved model (as the plugin tests do), the stand-in
for Aesthetic is a second tiny ImageReward registered as a scorer, the stand-in for CLIP is the Brightness scorer
of webui_shim (mean pixel value).
"""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import ImageReward as RM
from ImageReward import factory
from ImageReward.cli import main
from ImageReward.commands.eval import _load as eval_load
from ImageReward.commands.eval import scorer_label, scorer_specs
from ImageReward.errors import InvalidInputError, UnknownModelError, UnsupportedInputError
from ImageReward.eval.cache import scorer_identity
from ImageReward.finetune.rewards import load_reward
from ImageReward.resolve import checkpoint_path, parse_mix, resolve
from ImageReward.scoring.runner import DistributedContext, score_dataset
from webui_shim import Brightness, NodeRegistry, install_comfy, install_comfyui, install_webui, save_tiny_image_reward

UNPATCHED_LOAD = factory.load
PROMPT = "a red fox in the snow"
MIX = "ImageReward-v1.0:1,TinyAesthetic:0.1"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two tiny ImageRewards with different heads (same preprocessing, as ImageReward and Aesthetic)."""
    root = tmp_path_factory.mktemp("resolve")
    first = save_tiny_image_reward(root / "ir")
    model = UNPATCHED_LOAD(str(first), device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.mlp.parameters():
            if param.ndim == 2:
                torch.nn.init.normal_(param, std=param.shape[1] ** -0.5)
    return first, model.save_pretrained(root / "aesthetic")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for k in range(4):
        path = folder / f"img_{k}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 8 * k, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def names(monkeypatch, tiny_dirs, cached_checkpoint):
    """``ImageReward-v1.0`` -> the first tiny model, ``TinyAesthetic`` registered as a scorer, ``CLIP`` ->
    Brightness; returns the reference scorers."""
    first, second = tiny_dirs

    def fake_load(name="ImageReward-v1.0", device=None, *args, **kwargs):
        return UNPATCHED_LOAD(str(first) if name == "ImageReward-v1.0" else name, device=device)

    monkeypatch.setattr(factory, "load", fake_load)
    monkeypatch.setattr(RM, "load", fake_load)
    monkeypatch.setitem(factory._SCORERS, "TinyAesthetic",
                        lambda device=None, download_root=None, dtype=None: UNPATCHED_LOAD(str(second), device=device))
    monkeypatch.setitem(factory._SCORERS, "CLIP", lambda **kw: Brightness())
    return UNPATCHED_LOAD(str(first), device="cpu"), UNPATCHED_LOAD(str(second), device="cpu")


def expected_mix(names, images):
    image_reward, aesthetic = names
    return (image_reward.score_batch(PROMPT, images) + 0.1 * aesthetic.score_batch(PROMPT, images)).tolist()


# ------------------------------------------------------------------------------------------ the order
def test_parse_mix_and_the_documented_order(tmp_path, monkeypatch):
    assert parse_mix("ImageReward-v1.0:1, Aesthetic:0.1") == [("ImageReward-v1.0", 1.0), ("Aesthetic", 0.1)]
    assert parse_mix("CLIP") is None and parse_mix(r"C:\models\rm") is None and parse_mix("/a/b") is None
    with pytest.raises(InvalidInputError, match="non-zero"):
        parse_mix("CLIP:0,BLIP")
    with pytest.raises(InvalidInputError, match="empty scorer name"):
        parse_mix("CLIP,,BLIP")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ImageReward-v1.0").mkdir()
    (tmp_path / "CLIP").mkdir()
    assert [resolve(s).kind for s in ("ImageReward-v1.0", "CLIP", "CLIP:1,BLIP:2", "./CLIP", "owner/repo")] == [
        "checkpoint", "scorer", "mix", "path", "hub"]
    assert [(p.kind, w) for p, w in resolve("ImageReward-v1.0, ./CLIP:0.5").parts] == [("checkpoint", 1.0),
                                                                                      ("path", 0.5)]
    with pytest.raises(UnknownModelError, match="unknown scorer 'missing/model.pt'"):
        resolve("missing/model.pt")  # a file name is never taken for a Hub id
    with pytest.raises(UnknownModelError, match="unknown scorer 'nope'"):
        resolve("nope,CLIP")
    assert RM.available_scorers() == RM.available_models() + RM.available_scores()


def test_a_hub_id_is_fetched_offline_as_a_typed_error(tmp_path):
    with pytest.raises(RM.DownloadError, match="owner/repo"):
        RM.load_scorer("owner/repo", device="cpu", download_root=tmp_path)


def test_a_folder_named_CLIP_means_the_CLIP_scorer_in_every_entry_point(tmp_path, monkeypatch, names, images,
                                                                        tiny_dirs, capsys):
    """One precedence: a registered scorer name wins over a folder of that name, in every command."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dirs[0], tmp_path / "CLIP")
    brightness = Brightness().score_batch(PROMPT, images).tolist()

    assert main(["score", "--prompt", PROMPT, *images, "--model", "CLIP", "--device", "cpu", "--json"]) == 0
    assert [row["score"] for row in json.loads(capsys.readouterr().out)["results"]] == pytest.approx(brightness)
    assert main(["score", "--prompt", PROMPT, *images, "--model", "./CLIP", "--device", "cpu", "--json"]) == 0
    folder_scores = [row["score"] for row in json.loads(capsys.readouterr().out)["results"]]
    assert folder_scores == pytest.approx(names[0].score_batch(PROMPT, images).tolist(), abs=1e-5)

    args = argparse.Namespace(rm_path=None, device="cpu", gpu_id=None, dtype="float32")
    assert isinstance(eval_load("CLIP", args), Brightness) and isinstance(eval_load("./CLIP", args), RM.ImageReward)
    assert scorer_label("CLIP") == "CLIP" and scorer_identity("CLIP") == "CLIP|float32"
    assert scorer_identity("./CLIP").startswith("path:")
    assert isinstance(load_reward("CLIP", device="cpu", differentiable=False).scorers[0], Brightness)
    with pytest.raises(InvalidInputError, match="'CLIP' is a scorer"):
        checkpoint_path("CLIP")  # reward-model training's preload_path
    assert checkpoint_path("./CLIP").resolve() == (tmp_path / "CLIP").resolve()

    webui, comfy = plugins(monkeypatch, tmp_path)
    assert isinstance(webui.load_scorer("CLIP"), Brightness)
    assert isinstance(comfy.load_scorer("CLIP", "cpu"), Brightness)
    webui.unload_model()


def plugins(monkeypatch, tmp_path):
    """The WebUI script and the ComfyUI node module, loaded as their hosts load them (tests/webui_shim.py)."""
    from test_comfyui import install_package
    from test_sdwebui import load_plugin

    install_webui(monkeypatch, tmp_path / "webui")
    webui = load_plugin("image_reward_webui_resolve_test")
    install_comfyui(monkeypatch, tmp_path / "ComfyUI")
    install_comfy(monkeypatch)
    official = tmp_path / "ComfyUI" / "models" / "image_reward" / "ImageReward.pt"
    official.parent.mkdir(parents=True, exist_ok=True)
    official.write_bytes(b"")  # "present" for the offline check; the stand-in factory.load never reads it
    registry = NodeRegistry()
    comfy = registry.load_custom_node(install_package(tmp_path / "comfy"))
    return webui, comfy.image_reward_nodes


# ------------------------------------------------------------------------------------------ the mix
def test_mix_is_the_weighted_sum_in_score_and_score_dataset(tmp_path, names, images, capsys):
    expected = expected_mix(names, images)
    assert main(["score", "--prompt", PROMPT, *images, "--model", MIX, "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [row["score"] for row in rows] == pytest.approx(expected, abs=1e-5)

    folder = tmp_path / "gen"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder)
    out = tmp_path / "scores.jsonl"
    assert main(["score-dataset", str(folder), "--prompt", PROMPT, "-o", str(out), "--model", MIX, "--device", "cpu",
                 "--num-workers", "0", "--no-progress", "--batch-size", "3"]) == 0
    by_name = {row["image"].rsplit("/", 1)[-1]: row for row in map(json.loads, out.read_text().splitlines())}
    assert all(row["error"] is None and row["model"] == MIX for row in by_name.values())
    assert [by_name[p.rsplit("/", 1)[-1]]["score"] for p in images] == pytest.approx(expected, abs=1e-5)


def test_mix_is_the_weighted_sum_in_eval_and_refl(tmp_path, names, images):
    expected = expected_mix(names, images)
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps([{"id": "p", "prompt": PROMPT, "generations": [p.rsplit("/", 1)[-1] for p in images],
                                      "ranking": [1, 2, 3, 4]}]))
    out = tmp_path / "eval"
    assert main(["eval-preference", "--model_type", MIX, "--source_path", str(test_json), "--no-download",
                 "--img_prefix", images[0].rsplit("/", 1)[0], "--target_dir", str(out), "--device", "cpu",
                 "--bootstrap", "0", "--no-report", "--no-cache"]) == 0
    [record] = json.loads((out / f"test_{scorer_label(MIX)}.json").read_text())
    assert record["rewards"] == pytest.approx(expected, abs=1e-5)
    assert scorer_specs(MIX) == [MIX] and scorer_specs("ImageReward-v1.0, CLIP") == ["ImageReward-v1.0", "CLIP"]

    reward = load_reward(MIX, device="cpu")
    assert reward.score_batch(PROMPT, images).tolist() == pytest.approx(expected, abs=1e-5)
    pixels = torch.rand(2, 3, 40, 48)
    total, parts = reward.score_grad_parts(pixels, PROMPT)
    torch.testing.assert_close(total, parts["ImageReward-v1.0"] + 0.1 * parts["TinyAesthetic"])
    torch.testing.assert_close(parts["TinyAesthetic"], names[1].score_grad(pixels, PROMPT).float())


def test_mix_is_the_weighted_sum_in_both_plugins(tmp_path, monkeypatch, names, images):
    expected = expected_mix(names, images)
    webui, comfy = plugins(monkeypatch, tmp_path)
    for scorer in (webui.load_scorer(MIX), comfy.load_scorer(MIX, "cpu")):
        assert isinstance(scorer, RM.WeightedReward)
        assert scorer.score_batch(PROMPT, images).tolist() == pytest.approx(expected, abs=1e-5)
    webui.unload_model()


def test_mix_of_scorers_that_preprocess_differently(tmp_path, names, images):
    """Components with different preprocessing (Brightness: 32 px, no normalisation) get their own pixels from
    the same decoded image, in score_batch and in score-dataset (pixels made in DataLoader workers)."""
    mix = RM.load_scorer("ImageReward-v1.0:1,CLIP:2", device="cpu")
    assert len(mix.preprocess_configs) == 2
    with pytest.raises(UnsupportedInputError, match="preprocess images differently"):
        mix.preprocess_config
    expected = names[0].score_batch(PROMPT, images) + 2 * Brightness().score_batch(PROMPT, images)
    torch.testing.assert_close(mix.score_batch(PROMPT, images, batch_size=3), expected)
    out = tmp_path / "s.jsonl"
    score_dataset(mix, images[0].rsplit("/", 1)[0], out, prompt=PROMPT, progress=False, batch_size=3,
                  num_workers=1, context=DistributedContext())
    by_name = {row["image"].rsplit("/", 1)[-1]: row["score"] for row in map(json.loads, out.read_text().splitlines())}
    assert [by_name[p.rsplit("/", 1)[-1]] for p in images] == pytest.approx(expected.tolist(), abs=1e-5)
