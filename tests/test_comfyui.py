"""The ComfyUI custom-node package (comfyui/), loaded the way ComfyUI loads custom_nodes/, on a tiny model."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ImageReward as RM
from ImageReward import factory
from webui_shim import Brightness, NodeRegistry, fake_sample, install_comfy, install_comfyui, save_tiny_image_reward

UNPATCHED_LOAD = factory.load

PACKAGE = Path(__file__).resolve().parents[1] / "comfyui"
PROMPT = "a red fox in the snow"
NODES = ("ImageRewardLoader", "ImageRewardScore", "ImageRewardRankFilter", "ImageRewardScoreToText",
         "ImageRewardShowScores")
# ComfyUI 0.3.64 core nodes the shipped example workflows use, with their required inputs; each is also a current,
# not deprecated node upstream (core "ImageBatch" is deprecated there, so it is not allowed here)
CORE_NODES = {"LoadImage": {"image"}, "RepeatImageBatch": {"image", "amount"},
              "ImageAddNoise": {"image", "seed", "strength"}, "SaveImage": {"images", "filename_prefix"},
              "CheckpointLoaderSimple": {"ckpt_name"}, "CLIPTextEncode": {"text", "clip"},
              "EmptyLatentImage": {"width", "height", "batch_size"}, "VAEDecode": {"samples", "vae"},
              "KSampler": {"model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                           "latent_image", "denoise"}}
CORE_OUTPUT_NODES = {"SaveImage", "PreviewImage"}


def saveimage_pixels(images: torch.Tensor) -> list[np.ndarray]:
    """What ComfyUI's SaveImage writes: ``np.clip(255. * i.cpu().numpy(), 0, 255).astype(np.uint8)``."""
    return [np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8) for image in images]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_image_reward(tmp_path_factory.mktemp("tiny") / "ir")


def _unload_modules(prefix: str) -> None:
    for name in [n for n in sys.modules if n.startswith(prefix)]:
        del sys.modules[name]


def install_package(tmp_path: Path, how: str = "copy", folder: str = "ImageReward-nodes") -> Path:
    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    target = custom_nodes / folder
    if how == "copy":
        shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        target.symlink_to(PACKAGE, target_is_directory=True)
    return target


@pytest.fixture
def comfy(monkeypatch, tmp_path, tiny_dir):
    """(registry, state, loads): the package copied into a fake ComfyUI and loaded; ``ImageReward-v1.0``
    resolves to a tiny model; ``loads`` lists the names the library was asked to load."""
    install_comfyui(monkeypatch, tmp_path / "ComfyUI")
    state = install_comfy(monkeypatch)
    real_load, loads = RM.load, []

    def fake_load(name="ImageReward-v1.0", device=None, *args, **kwargs):
        loads.append((name, kwargs.get("dtype")))
        return real_load(tiny_dir if name == "ImageReward-v1.0" else name, device=device)

    monkeypatch.setattr(RM, "load", fake_load)
    monkeypatch.setattr(factory, "load", fake_load)  # what RM.load_scorer (the plugins' resolver) calls
    monkeypatch.setitem(factory._SCORERS, "Brightness", lambda **kw: Brightness())
    monkeypatch.setitem(factory._SCORERS, "Darkness", lambda **kw: Brightness(higher_is_better=False))
    registry = NodeRegistry()
    path = install_package(tmp_path)
    registry.module = registry.load_custom_node(path)
    official = tmp_path / "ComfyUI" / "models" / "image_reward" / "ImageReward.pt"
    official.parent.mkdir(parents=True, exist_ok=True)
    official.write_bytes(b"")  # "present" for the offline check; fake_load maps the name to the tiny model
    yield registry, state, loads
    _unload_modules(str(path).replace(".", "_x_"))


def make_images(seeds=(1, 2, 3, 4), size=32) -> torch.Tensor:
    """A ComfyUI IMAGE batch: float32 [B, H, W, 3] in 0..1."""
    return torch.stack([fake_sample(seed, size, size).permute(1, 2, 0) for seed in seeds])


@pytest.mark.parametrize("how", ["copy", "symlink"])
def test_loads_from_custom_nodes_copied_or_symlinked(monkeypatch, tmp_path, how):
    install_comfyui(monkeypatch, tmp_path / "ComfyUI")
    registry = NodeRegistry()
    path = install_package(tmp_path, how, folder="comfyui-imagereward.v2")
    try:
        module = registry.load_custom_node(path)
        assert set(registry.NODE_CLASS_MAPPINGS) == set(NODES)
        assert registry.NODE_DISPLAY_NAME_MAPPINGS["ImageRewardScore"] == "ImageReward: score images"
        assert module.image_reward_nodes.RM is sys.modules["ImageReward"]  # the installed library
        loader_spec = registry.NODE_CLASS_MAPPINGS["ImageRewardLoader"].INPUT_TYPES()["required"]
        assert loader_spec["scorer"][0][0] == "ImageReward-v1.0" and "Brightness" not in loader_spec["scorer"][0]
    finally:
        _unload_modules(str(path).replace(".", "_x_"))
    for source in PACKAGE.glob("*.py"):  # no project-relative path tricks: only the installed package
        assert "sys.path" not in source.read_text() and "__file__" not in source.read_text()


def test_score_rank_and_text_end_to_end(comfy, tiny_dir):
    registry, state, loads = comfy
    (scorer,) = registry.run("ImageRewardLoader", scorer="ImageReward-v1.0", device="auto", dtype="float32")
    images = make_images()
    scores, best = registry.run("ImageRewardScore", scorer=scorer, images=images, prompt=PROMPT, batch_size=3)
    values = scores["scores"]
    reference = UNPATCHED_LOAD(str(tiny_dir), device="cpu")
    # the pixels SaveImage writes: a score here equals the CLI's score of the saved PNG
    assert values == pytest.approx(reference.score_batch(PROMPT, saveimage_pixels(images)).tolist(), abs=1e-5)
    assert best == max(values) and len(set(np.round(values, 4))) == 4
    assert scores["label"] == "ImageReward Score" and scores["higher_is_better"] is True
    assert [bar.current for bar in state.progress] == [4]  # progress reported to ComfyUI

    top, top_scores, count = registry.run("ImageRewardRankFilter", images=images, scores=scores, top_k=2,
                                          use_min_score=False, min_score=0.0, sort=True)
    best_two = sorted(range(4), key=lambda i: values[i], reverse=True)[:2]
    assert count == 2 and top.shape == (2, 32, 32, 3) and top.dtype == torch.float32
    assert torch.equal(top, images[best_two]) and top_scores["scores"] == [values[i] for i in best_two]

    (text,) = registry.run("ImageRewardScoreToText", scores=top_scores, precision=4, separator="newline")
    assert text.splitlines() == [f"ImageReward Score: {values[i]:.4f}" for i in best_two]
    (text,) = registry.run("ImageRewardScoreToText", scores=top_scores, precision=2, separator="comma", label="IR")
    assert text == ", ".join(f"IR: {values[i]:.2f}" for i in best_two)
    assert loads == [("ImageReward-v1.0", None)]


def test_rank_filter_edge_cases(comfy):
    registry, state, _ = comfy
    (scorer,) = registry.run("ImageRewardLoader", scorer="Brightness", device="cpu", dtype="float32")
    images = make_images(seeds=(5, 6, 7, 8, 9))
    scores, best = registry.run("ImageRewardScore", scorer=scorer, images=images, prompt="")
    values = scores["scores"]
    truth = images.mean(dim=(1, 2, 3))  # brightness, up to the uint8 rounding of the scorer's input
    assert values == pytest.approx(truth.tolist(), abs=3e-3)
    order = sorted(range(5), key=lambda i: values[i], reverse=True)

    def rank(**kw):
        args = dict(images=images, scores=scores, top_k=0, use_min_score=False, min_score=0.0, sort=True) | kw
        return registry.run("ImageRewardRankFilter", **args)

    out, kept, count = rank()
    assert count == 5 and torch.equal(out, images[order]) and kept["scores"] == sorted(values, reverse=True)
    out, kept, count = rank(sort=False)  # no sorting, no filtering: unchanged
    assert torch.equal(out, images) and kept["scores"] == values
    out, kept, count = rank(top_k=2, sort=False)  # the best two, in batch order
    assert kept["scores"] == [values[i] for i in sorted(order[:2])]
    out, kept, count = rank(top_k=99)
    assert count == 5
    limit = values[order[2]]  # exactly the third-best score: it is kept
    out, kept, count = rank(use_min_score=True, min_score=limit)
    assert count == 3 and kept["scores"] == [values[i] for i in order[:3]]
    out, kept, count = rank(use_min_score=True, min_score=1.0 + max(values))  # everything filtered
    # ComfyUI's "no output": SaveImage / PreviewImage downstream are skipped silently instead of crashing
    assert isinstance(out, state.ExecutionBlocker) and out.message is None
    assert count == 0 and kept["scores"] == []
    assert registry.run("ImageRewardScoreToText", scores=kept, precision=4, separator="newline") == ("",)
    assert registry.run("ImageRewardShowScores", scores=kept, precision=4) == ("Brightness Score: no image",)

    with pytest.raises(ValueError, match="2 scores for 5 images"):
        rank(scores={"scores": values[:2]})
    with pytest.raises(ValueError, match="outside"):
        rank(top_k=-1)


def test_lower_is_better_scorer(comfy):
    registry, _, _ = comfy
    (scorer,) = registry.run("ImageRewardLoader", scorer="Darkness", device="cpu", dtype="float32")
    images = make_images(seeds=(5, 6, 7))
    scores, best = registry.run("ImageRewardScore", scorer=scorer, images=images, prompt="x")
    assert scores["higher_is_better"] is False and best == min(scores["scores"])
    _, kept, _ = registry.run("ImageRewardRankFilter", images=images, scores=scores, top_k=2, use_min_score=False,
                              min_score=0.0, sort=True)
    assert kept["scores"] == sorted(scores["scores"])[:2]


def test_loader_checkpoint_path_and_errors(comfy, tiny_dir):
    registry, _, loads = comfy
    half = registry.run("ImageRewardLoader", scorer="ImageReward-v1.0", device="cpu", dtype="bfloat16")[0]
    scorer_of = registry.module.image_reward_nodes.scorer_of
    assert loads[-1] == ("ImageReward-v1.0", torch.bfloat16) and isinstance(scorer_of(half), RM.ImageReward)
    local = registry.run("ImageRewardLoader", scorer="ImageReward-v1.0", device="cpu", dtype="float32",
                         checkpoint_path=f"  {tiny_dir}  ")[0]
    assert isinstance(scorer_of(local), RM.ImageReward) and loads[-1][0] == str(tiny_dir)
    with pytest.raises(ValueError, match="does not exist"):
        registry.run("ImageRewardLoader", scorer="ImageReward-v1.0", device="cpu", dtype="float32",
                     checkpoint_path="/no/such/ImageReward.pt")
    with pytest.raises(ValueError, match="value not in list"):
        registry.run("ImageRewardLoader", scorer="nope", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        registry.module.image_reward_nodes.load_scorer("nope", "cpu")


def test_scorer_takes_part_in_model_management_and_is_freed_with_the_node_cache(comfy):
    """"Unload models" moves the scorer to its offload device; once ComfyUI drops the loader's cached output
    ("Free model and node cache") nothing else holds it: no module-level cache keeps ~1.5 GB alive."""
    import gc
    import weakref

    registry, state, _ = comfy
    (patcher,) = registry.run("ImageRewardLoader", scorer="ImageReward-v1.0", device="auto", dtype="float32")
    assert patcher.offload_device == torch.device("cpu") and patcher.load_device == torch.device("cpu")
    registry.run("ImageRewardScore", scorer=patcher, images=make_images(seeds=(1,)), prompt=PROMPT)
    assert state.loaded == [patcher]  # loaded through comfy.model_management, so ComfyUI can unload it
    sys.modules["comfy.model_management"].unload_all_models()
    assert state.loaded == []
    model = weakref.ref(registry.module.image_reward_nodes.scorer_of(patcher))
    del patcher
    gc.collect()
    assert model() is None


def test_weights_live_in_comfyui_models_folder(comfy, tiny_dir, monkeypatch):
    registry, _, loads = comfy
    folder_paths = sys.modules["folder_paths"]
    root = Path(folder_paths.models_dir) / "image_reward"
    assert folder_paths.get_folder_paths("image_reward")[0] == str(root)  # registered at import
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_dir, root / "my-tuned")
    (root / "ViT-L-14.pt").write_bytes(b"")  # an official weight file is not offered as a checkpoint
    names = registry.NODE_CLASS_MAPPINGS["ImageRewardLoader"].INPUT_TYPES()["required"]["scorer"][0]
    assert names[-1] == "my-tuned/" and "ViT-L-14.pt" not in names and "my-tuned/config.json" not in names
    (patcher,) = registry.run("ImageRewardLoader", scorer="my-tuned/", device="cpu", dtype="float32")
    scorer = registry.module.image_reward_nodes.scorer_of(patcher)
    assert isinstance(scorer, RM.ImageReward) and loads[-1][0] == str(root / "my-tuned")

    # official weights are read from (and downloaded into) models/image_reward
    seen = {}
    monkeypatch.setitem(factory._SCORERS, "Brightness",
                        lambda download_root=None, **kw: seen.setdefault("root", download_root) and Brightness())
    registry.run("ImageRewardLoader", scorer="Brightness", device="cpu", dtype="float32")
    assert seen["root"] == str(root)


def test_missing_weights_offline_are_all_named_at_once(comfy, monkeypatch):
    registry, _, loads = comfy
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = Path(sys.modules["folder_paths"].models_dir) / "image_reward"
    (root / "ImageReward.pt").unlink()
    with pytest.raises(RuntimeError) as err:
        registry.run("ImageRewardLoader", scorer="Aesthetic", device="cpu", dtype="float32")
    message = str(err.value)
    assert "ViT-L-14.pt" in message and "sac+logos+ava1-l14-linearMSE.pth" in message and str(root) in message
    assert "download_root" not in message  # no such node input
    with pytest.raises(RuntimeError, match=r"ImageReward\.pt  \(from https://huggingface.co/THUDM/ImageReward"):
        registry.run("ImageRewardLoader", scorer="ImageReward-v1.0", device="cpu", dtype="float32")
    for name in ("HPSv2.1", "PickScore"):  # the zoo's files come from the library's registry too
        with pytest.raises(RuntimeError, match="HPS_v2.1_compressed.pt" if name == "HPSv2.1" else "PickScore_v1/"):
            registry.run("ImageRewardLoader", scorer=name, device="cpu", dtype="float32")
    with pytest.raises(RuntimeError) as err:  # a mix: every part's files in one message
        registry.module.image_reward_nodes.load_scorer("ImageReward-v1.0:1,HPSv2.1:1,PickScore:0.5", "cpu")
    assert all(name in str(err.value) for name in ("ImageReward.pt", "HPS_v2.1_compressed.pt", "PickScore_v1/"))
    assert loads == []  # refused before any loading or network attempt

    # the official files and folders in models/image_reward are not offered as user checkpoints
    (root / "PickScore_v1").mkdir()
    (root / "PickScore_v1" / "config.json").write_text("{}")
    (root / "HPS_v2.1_compressed.pt").write_bytes(b"")
    (root / "mine").mkdir()
    (root / "mine" / "config.json").write_text("{}")
    assert registry.module.image_reward_nodes.local_checkpoints() == ["mine/"]


def test_scores_to_text_for_file_names_and_show_scores(comfy):
    registry, _, _ = comfy
    scores = {"scores": [0.12345, -1.5], "label": "ImageReward Score", "higher_is_better": True}
    (text,) = registry.run("ImageRewardScoreToText", scores=scores, precision=3, separator="newline",
                           filename_safe=True)
    assert text == "ImageReward_Score_0.123_ImageReward_Score_-1.500"
    (text,) = registry.run("ImageRewardScoreToText", scores=scores, precision=2, separator="space", label="IR",
                           filename_safe=True)
    assert text == "IR_0.12_IR_-1.50"
    shown = registry.run("ImageRewardShowScores", scores=scores, precision=2)
    assert shown == ("ImageReward Score: 0.12\nImageReward Score: -1.50",)
    assert registry.ui == {"text": [shown[0]], "scores": [0.12345, -1.5]}
    assert registry.NODE_CLASS_MAPPINGS["ImageRewardShowScores"].OUTPUT_NODE is True


@pytest.mark.parametrize("how", ["copy", "symlink"])
def test_web_directory_serves_the_show_scores_extension(monkeypatch, tmp_path, how):
    """ComfyUI's frontend draws ``ui.text`` only for nodes it knows: js/show_scores.js (WEB_DIRECTORY) puts it in
    the show-scores node, through the frontend's legacy ``scripts/app.js`` / ``scripts/widgets.js`` shims."""
    install_comfyui(monkeypatch, tmp_path / "ComfyUI")
    registry = NodeRegistry()
    path = install_package(tmp_path, how)
    try:
        module = registry.load_custom_node(path)
    finally:
        _unload_modules(str(path).replace(".", "_x_"))
    assert module.WEB_DIRECTORY == "./js"
    web_dir = Path(registry.EXTENSION_WEB_DIRS[path.name])
    assert sorted(p.name for p in web_dir.glob("**/*.js")) == ["show_scores.js"]
    js = (web_dir / "show_scores.js").read_text()
    assert '"ImageRewardShowScores"' in js and "app.registerExtension(" in js and "onExecuted" in js
    assert 'from "../../scripts/app.js"' in js and 'from "../../scripts/widgets.js"' in js
    assert "readOnly = true" in js and "serialize = false" in js  # display only, not a saved widget value


def test_images_become_the_uint8_pixels_saveimage_writes(comfy):
    registry, _, _ = comfy
    nodes = registry.module.image_reward_nodes
    images = make_images(seeds=(1, 2, 3)) * 1.02 - 0.01  # a little outside 0..1, as VAE output can be
    arrays = nodes.images_to_arrays(images, 1, 3)
    assert [a.dtype for a in arrays] == [np.uint8, np.uint8] and arrays[0].shape == (32, 32, 3)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, saveimage_pixels(images)[1:]))


def test_example_workflows_are_valid_api_prompts(comfy):
    """Every shipped workflow: API format, known node types, our nodes' inputs valid, and an output node."""
    import json

    registry, _, _ = comfy
    workflows = sorted((PACKAGE / "example_workflows").glob("*.json"))
    assert [w.name for w in workflows] == ["score_filter_save.json", "txt2img_score_filter.json"]
    for path in workflows:
        prompt = json.loads(path.read_text())
        outputs = 0
        for node_id, node in prompt.items():
            kind, inputs = node["class_type"], node["inputs"]
            for value in inputs.values():  # links point at existing nodes
                if isinstance(value, list):
                    assert value[0] in prompt, (path.name, node_id, value)
            if kind in registry.NODE_CLASS_MAPPINGS:
                cls = registry.NODE_CLASS_MAPPINGS[kind]
                spec = cls.INPUT_TYPES()
                assert set(spec["required"]) <= set(inputs), (path.name, kind)
                assert set(inputs) <= set(spec["required"]) | set(spec.get("optional", {})), (path.name, kind)
                for name, value in inputs.items():
                    entry = {**spec["required"], **spec.get("optional", {})}[name]
                    if isinstance(entry[0], list) and not isinstance(value, list):
                        assert value in entry[0], (path.name, kind, name, value)
                outputs += bool(getattr(cls, "OUTPUT_NODE", False))
            else:
                assert set(CORE_NODES[kind]) <= set(inputs), (path.name, kind)
                outputs += kind in CORE_OUTPUT_NODES
        assert outputs >= 2, path.name  # an image output and the scores


def test_score_node_rejects_bad_inputs_and_honours_interrupt(comfy):
    registry, state, _ = comfy
    (scorer,) = registry.run("ImageRewardLoader", scorer="Brightness", device="cpu", dtype="float32")
    images = make_images(seeds=(1, 2))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        registry.run("ImageRewardScore", scorer=scorer, images=images.permute(0, 3, 1, 2), prompt="x")
    with pytest.raises(ValueError, match="empty"):
        registry.run("ImageRewardScore", scorer=scorer, images=images[:0], prompt="x")
    with pytest.raises(ValueError, match="load scorer"):
        registry.run("ImageRewardScore", scorer="ImageReward-v1.0", images=images, prompt="x")
    # slightly out-of-range pixels (e.g. from a VAE) are clamped the way SaveImage does, not rejected
    scores, _ = registry.run("ImageRewardScore", scorer=scorer, images=images * 1.01, prompt="x")
    assert len(scores["scores"]) == 2
    state.interrupted = True
    with pytest.raises(state.InterruptProcessingException):
        registry.run("ImageRewardScore", scorer=scorer, images=images, prompt="x")


def test_missing_library_names_the_install_command(monkeypatch, tmp_path):
    install_comfyui(monkeypatch, tmp_path / "ComfyUI")
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    path = install_package(tmp_path, "copy")
    try:
        with pytest.raises(ImportError, match="pip install --no-deps") as err:
            NodeRegistry().load_custom_node(path)
        assert "image-reward>=" not in str(err.value)  # PyPI's image-reward is the original 1.x
    finally:
        _unload_modules(str(path).replace(".", "_x_"))
