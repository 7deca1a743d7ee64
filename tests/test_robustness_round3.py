"""Faults users hit, round 3 (issue 28, kinds 6-14 and 16), each tested as a kind across its entry points.

6 hidden and system files in folders, 7 prompt-free scorers, 8 ambiguous array layouts, 9 output encoding,
10 prompts embedded by generators (A1111/Forge infotext, ComfyUI graph), 11 score-dataset resume identity,
12 evaluation labels that collide, 13 failures that look like success, 14 progress bars, 16 install lines in docs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import ImageReward as RM
from ImageReward import factory
from ImageReward.errors import InvalidInputError, UnsupportedInputError
from ImageReward.image_io import is_hidden, list_images, list_subfolders, load_image
from ImageReward.scoring import score_dataset
from ImageReward.scoring.embedded import comfyui_positive_prompt, embedded_prompt, split_infotext
from ImageReward.scoring.writers import encode_row, read_journal, read_output
from webui_shim import Brightness, save_tiny_image_reward

from test_robustness import _cli  # imagereward ARGV in-process: (exit status, stdout, stderr)
from test_comfyui import comfy, make_images, tiny_dir  # noqa: F401 - fixtures of the ComfyUI package tests
from test_sdwebui import make_p, run_script, webui  # noqa: F401 - fixtures of the WebUI script tests

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red fox in the snow"
NEGATIVE = "blurry, lowres, watermark"
SETTINGS = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 32x32, Model hash: 45dee52b"
CAT = "猫"


def _noise(seed: int, height: int = 40, width: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_image_reward(tmp_path_factory.mktemp("round3") / "tiny")


@pytest.fixture
def prompt_free(monkeypatch, tiny):
    """``Bright`` (prompt-free: the mean pixel value) and ``TinyIR`` (a tiny ImageReward) as registered names."""
    monkeypatch.setitem(factory._SCORERS, "Bright", lambda **kw: Brightness())
    monkeypatch.setitem(factory._SCORERS, "TinyIR", lambda **kw: RM.load(str(tiny), device="cpu"))
    return tiny


# ---------------------------------------------------------------------------------------------- 6 hidden files
def _folder_with_clutter(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        _noise(len(name)).save(root / name)
    for junk in (".ipynb_checkpoints/a-checkpoint.png", "__MACOSX/sub/._b.png", ".hidden/c.png"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        _noise(9).save(root / junk)
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork, not a PNG")
    (root / "Thumbs.db").write_bytes(b"junk")
    (root / ".DS_Store").write_bytes(b"junk")
    return root


def test_folder_listing_skips_hidden_and_system_entries_with_a_count(tmp_path, caplog):
    root = _folder_with_clutter(tmp_path / "gen")
    with caplog.at_level(logging.INFO, logger="ImageReward.image_io"):
        found = list_images(root)
    assert [p.relative_to(root).as_posix() for p in found] == ["a.png", "sub/b.png"]
    assert "skipped 6 hidden or system entries" in caplog.text
    assert [p.name for p in list_images(root, recursive=False)] == ["a.png"]
    assert all(is_hidden(n) for n in (".ipynb_checkpoints", "__MACOSX", "Thumbs.db", "desktop.ini", "._x.png"))
    assert not any(is_hidden(n) for n in ("a.png", "_x.png", "MACOSX"))


def test_score_dataset_does_not_score_hidden_copies(tmp_path, tiny_model):
    root = _folder_with_clutter(tmp_path / "gen")
    summary = score_dataset(tiny_model, root, tmp_path / "out.jsonl", prompt=PROMPT, progress=False)
    rows = read_output(tmp_path / "out.jsonl")
    assert [row["image"] for row in rows] == ["a.png", "sub/b.png"] and summary["errors"] == 0


def _benchmark_tree(root: Path, models=("genA", "genB")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.json").write_text(json.dumps([{"id": "p1", "prompt": PROMPT}, {"id": "p2", "prompt": "a cat"}]))
    for m, model in enumerate(models):
        for pid in ("p1", "p2"):
            for k in range(2):
                (root / "gens" / model).mkdir(parents=True, exist_ok=True)
                _noise(10 * m + k + len(pid), 32, 32).save(root / "gens" / model / f"{pid}_{k}.png")
    # what Jupyter and macOS leave behind: a model-like folder and resource forks that match <id>_<k>.png
    (root / "gens" / ".ipynb_checkpoints").mkdir()
    (root / "gens" / "__MACOSX").mkdir()
    (root / "gens" / "genA" / "._p1_0.png").write_bytes(b"\x00\x05\x16\x07")
    return root


def test_eval_benchmark_model_all_ignores_hidden_folders_and_files(tmp_path, tiny, capsys):
    root = _benchmark_tree(tmp_path)
    assert list_subfolders(root / "gens") == ["genA", "genB"]
    code, out, err = _cli(["eval-benchmark", "--img_dir", root / "gens", "--model", "all", "--benchmark", tiny,
                           "--prompts_path", root / "prompts.json", "--result_dir", root / "res", "--no-download",
                           "--no-cache", "--human-ranking", "genA=1,genB=2"], capsys)
    assert code == 0, err
    scores = json.loads((root / "res" / "tiny-benchmark-results.json").read_text())
    assert sorted(scores) == ["genA", "genB"]
    items = json.loads((root / "res" / "tiny" / "tiny-benchmark-genA-result.json").read_text())
    assert [len(item["rewards"]) for item in items] == [2, 2]  # ._p1_0.png was not taken for a generation
    (root / "gens" / "sd1-4" / ".ipynb_checkpoints").mkdir(parents=True)  # holds no generations: not "present"
    code, _, err = _cli(["eval-benchmark", "--img_dir", root / "gens", "--model", "sd1-4", "--benchmark", tiny,
                         "--prompts_path", root / "prompts.json", "--no-download"], capsys)
    assert code == 1 and "generations of 'sd1-4' not found" in err, err


def test_comfyui_checkpoint_list_skips_hidden_entries(comfy, tmp_path):
    registry, _, _ = comfy
    folder = tmp_path / "ComfyUI" / "models" / "image_reward"
    for name in ("mine.safetensors", "._mine.safetensors", ".ipynb_checkpoints/config.json", "run/config.json",
                 "__MACOSX/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"{}")
    assert registry.module.image_reward_nodes.local_checkpoints() == ["mine.safetensors", "run/"]


# ---------------------------------------------------------------------------------------------- 7 prompt-free
def test_library_takes_no_prompt_only_for_prompt_free_scorers(tiny_model):
    image = _noise(1)
    bright = Brightness()
    assert bright.score(None, image) == pytest.approx(bright.score("anything", image))
    ranks, rewards = bright.inference_rank(None, [image, _noise(2)])
    assert sorted(ranks) == [1, 2] and len(rewards) == 2
    assert bright.score_batch(None, [image]).shape == (1,)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bright.score_grad(pixels, None), bright.score_grad(pixels, ["a", "b"]))
    with pytest.raises(InvalidInputError, match="against a prompt"):
        tiny_model.score_grad(pixels, None)
    for call in (lambda: tiny_model.score(None, image), lambda: tiny_model.score_batch(None, [image]),
                 lambda: tiny_model.inference_rank(None, [image])):
        with pytest.raises(InvalidInputError, match="scores images against a prompt"):
            call()
    from ImageReward.models.mix import WeightedReward

    assert WeightedReward([bright, Brightness()], [1.0, 0.5]).score(None, image) == pytest.approx(
        1.5 * bright.score(None, image))
    with pytest.raises(InvalidInputError, match="against a prompt"):  # a member uses prompts: the mix does
        WeightedReward([bright, tiny_model], [1.0, 1.0]).score(None, image)


def test_cli_score_and_rank_need_no_prompt_for_prompt_free_scorers(prompt_free, tmp_path, capsys):
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"img{k}.png")
        _noise(k).save(paths[-1])
    for command in ("score", "rank"):
        for extra in ([], ["--prompt", ""]):
            code, out, err = _cli([command, "--model", "Bright", *extra, *paths, "--json"], capsys)
            assert code == 0, err
            assert [round(r["score"], 5) for r in json.loads(out)["results"]] != []
    # a scorer that uses prompts: refused before its weights are read (a path), or once loaded (a registered name)
    for model in (str(prompt_free), "TinyIR", "Bright:1,TinyIR:0.5"):
        for extra in ([], ["--prompt", " "]):
            code, _, err = _cli(["score", "--model", model, *extra, paths[0]], capsys)
            assert code == 2 and "--prompt is" in err and "Traceback" not in err, err


def test_score_dataset_prompt_free_needs_no_prompt_column_or_sidecar(prompt_free, tmp_path, capsys):
    folder = tmp_path / "gen"
    folder.mkdir()
    for k in range(3):
        _noise(k).save(folder / f"{k}.png")
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps({"image": f"gen/{k}.png"}) + "\n" for k in range(3)))
    bright = Brightness()
    for source in (folder, table):
        out = tmp_path / f"scores_{source.stem}.jsonl"
        code, _, err = _cli(["score-dataset", source, "-o", out, "--model", "Bright", "--num-workers", "0"], capsys)
        assert code == 0, err
        rows = read_output(out)
        assert [row["error"] for row in rows] == [None] * 3
        assert [row["score"] for row in rows] == pytest.approx([bright.score(None, folder / f"{k}.png")
                                                               for k in range(3)], abs=1e-6)
    # the same inputs with a scorer that uses prompts stop before any row
    code, _, err = _cli(["score-dataset", table, "-o", tmp_path / "x.jsonl", "--model", "TinyIR"], capsys)
    assert code == 2 and "prompt column" in err


def test_eval_prompt_free_scorers_take_empty_prompts(prompt_free, tmp_path, capsys):
    data = _preference_set(tmp_path / "pref")
    groups = json.loads((data / "test.json").read_text())
    groups[0]["prompt"] = ""
    (data / "test.json").write_text(json.dumps(groups))
    argv = ["eval-preference", "--source_path", data / "test.json", "--img_prefix", data / "images", "--target_dir",
            tmp_path / "res", "--no-download", "--bootstrap", "0", "--no-report", "--no-cache"]
    code, _, err = _cli([*argv, "--model_type", "Bright"], capsys)
    assert code == 0, err
    rewards = json.loads((tmp_path / "res" / "test_Bright.json").read_text())[0]["rewards"]
    assert rewards == pytest.approx(Brightness().score(None, [str(data / "images" / f"{k}.png") for k in range(3)]))
    for model in ("TinyIR", "Bright:1,TinyIR:1"):
        code, _, err = _cli([*argv, "--model_type", model], capsys)
        assert code == 2 and "1 prompt(s) are empty (id 1)" in err, err


def test_comfyui_prompt_free_and_prompt_using(comfy):
    registry, _, _ = comfy
    images = make_images(seeds=(1, 2))
    (bright,) = registry.run("ImageRewardLoader", scorer="Brightness", device="cpu", dtype="float32")
    scores, _ = registry.run("ImageRewardScore", scorer=bright, images=images, prompt="")
    assert len(scores["scores"]) == 2
    (ir,) = registry.run("ImageRewardLoader", scorer="ImageReward-v1.0", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="prompt is empty"):
        registry.run("ImageRewardScore", scorer=ir, images=images, prompt="  ")


def test_webui_prompt_free_and_prompt_using(webui, tmp_path):
    shim, plugin, _ = webui
    p = make_p(shim, tmp_path)
    p.prompt = ""
    processed = run_script(shim, plugin, p, False, "0", True, "Brightness")
    assert len(processed.images) == 4 and "Brightness Score" in processed.infotexts[0]
    p = make_p(shim, tmp_path)
    p.prompt = ""
    with pytest.raises(plugin.ImageRewardScriptError, match="prompt is empty"):
        run_script(shim, plugin, p, False, "0", True, "ImageReward-v1.0")


# ---------------------------------------------------------------------------------------------- 8 layouts
@pytest.mark.parametrize("shape", [(3, 64, 3), (4, 32, 4), (1, 16, 3), (3, 8, 1)])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_ambiguous_layouts_are_refused_naming_the_shape(shape, kind):
    array = np.random.default_rng(0).random(shape, dtype=np.float32)
    item = array if kind == "numpy" else torch.from_numpy(array)
    with pytest.raises(UnsupportedInputError, match=re.escape(f"ambiguous layout {shape}")):
        load_image(item)
    with pytest.raises(UnsupportedInputError, match=r"image #1 .*ambiguous layout"):
        Brightness().score_batch("x", [np.zeros((8, 8, 3), np.float32), item])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_batched_four_d_input_is_refused_naming_the_batch(kind):
    batch = np.zeros((2, 3, 16, 16), np.float32)
    with pytest.raises(UnsupportedInputError, match=r"4-D batch of 2 images.*list\(batch\)"):
        Brightness().score("x", batch if kind == "numpy" else torch.from_numpy(batch))


def test_unambiguous_layouts_still_read_as_the_same_picture(tiny_model):
    hwc = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    reference = tiny_model.score(PROMPT, Image.fromarray(hwc))
    for item in (hwc, torch.from_numpy(hwc), chw, chw.float() / 255, list(chw[None])[0]):
        assert tiny_model.score(PROMPT, item) == pytest.approx(reference, abs=1e-6)


def test_comfyui_images_only_three_pixels_high_are_scored_as_comfyui_lays_them_out(comfy):
    registry, _, _ = comfy
    (bright,) = registry.run("ImageRewardLoader", scorer="Brightness", device="cpu", dtype="float32")
    images = torch.rand(2, 3, 40, 3, generator=torch.Generator().manual_seed(0))  # [B, H=3, W=40, C=3]
    scores, _ = registry.run("ImageRewardScore", scorer=bright, images=images, prompt="")
    pictures = [Image.fromarray(a.numpy()) for a in (images * 255).clamp(0, 255).to(torch.uint8)]  # 40 wide, 3 high
    assert scores["scores"] == pytest.approx(Brightness().score_batch("", pictures).tolist(), abs=1e-6)


# ---------------------------------------------------------------------------------------------- 9 encoding
def test_cli_output_survives_an_encoding_that_cannot_hold_the_names(prompt_free, tmp_path, monkeypatch):
    """A cp1252 stdout (Windows console or pipe), strict as Python opens it: nothing raises, names are escaped."""
    from ImageReward.cli import main

    image = tmp_path / f"{CAT}.png"
    _noise(3).save(image)
    for argv in (["rank", "--model", "Bright", str(image)], ["score", "--model", "TinyIR", "--prompt", CAT,
                                                              str(image)]):
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="cp1252", errors="strict")
        monkeypatch.setattr(sys, "stdout", stream)
        assert main(argv) == 0
        stream.flush()
        assert "\\u732b.png" in raw.getvalue().decode("cp1252")


def test_journal_rows_with_undecodable_names_round_trip(tmp_path):
    name = "caf\udce9.png"  # a Latin-1 file name on a UTF-8 file system, as os.listdir returns it
    path = tmp_path / "rows.jsonl"
    path.write_bytes(encode_row({"id": name, "image": name, "prompt": CAT}))
    assert read_journal(path) == [{"id": name, "image": name, "prompt": CAT}]


@pytest.mark.skipif(sys.platform != "linux", reason="file names that are not UTF-8 need a byte-name file system")
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_score_dataset_writes_undecodable_file_names(tmp_path, suffix):
    folder = tmp_path / "gen"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: "caf\udce9.png" in Python
    _noise(0).save(folder / name)
    out = tmp_path / f"out{suffix}"
    summary = score_dataset(Brightness(), folder, out, prompt="x", html=tmp_path / "g.html", progress=False)
    rows = read_output(out)
    assert summary["total_errors"] == 0 and (tmp_path / "g.html").is_file()
    assert rows[0]["image"] == (name if suffix == ".jsonl" else "caf\\udce9.png")
    assert rows[0]["score"] == pytest.approx(Brightness().score("x", folder / name), abs=1e-6)


@pytest.mark.integration
def test_every_command_prints_under_cp1252(tmp_path, tiny):
    """score, rank, score-dataset, eval-preference and eval-benchmark in a process whose stdout and stderr are
    cp1252, with Chinese file names, prompts and folders; a partly failing score-dataset warns on stderr."""
    folder = tmp_path / f"生成{CAT}"
    folder.mkdir()
    for k in range(2):
        _noise(k).save(folder / f"{CAT}{k}.png")
    (folder / f"{CAT}0.txt").write_text(f"一只{CAT}", encoding="utf-8")
    (folder / f"{CAT}1.txt").write_bytes(b"\xff\xfe\x00")  # undecodable sidecar: that row fails
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps([{"id": "1", "prompt": f"一只{CAT}", "generations": [f"{CAT}0.png", f"{CAT}1.png"],
                                      "ranking": [1, 2]}], ensure_ascii=False), encoding="utf-8")
    bench = _benchmark_tree(tmp_path / "bench")
    commands = [
        ["score", "--model", str(tiny), "--prompt", CAT, str(folder / f"{CAT}0.png")],
        ["rank", "--model", str(tiny), "--prompt", CAT, str(folder / f"{CAT}0.png"), str(folder / f"{CAT}1.png")],
        ["score-dataset", str(folder), "-o", str(tmp_path / f"{CAT}.jsonl"), "--model", str(tiny),
         "--num-workers", "0"],
        ["eval-preference", "--model_type", str(tiny), "--source_path", str(test_json), "--img_prefix", str(folder),
         "--target_dir", str(tmp_path / f"结果{CAT}"), "--no-download", "--bootstrap", "10"],
        ["eval-benchmark", "--img_dir", str(bench / "gens"), "--model", "all", "--benchmark", str(tiny),
         "--prompts_path", str(bench / "prompts.json"), "--result_dir", str(tmp_path / f"基准{CAT}"),
         "--no-download"],
    ]
    script = ("import json, sys\nfrom ImageReward.cli import main\n"
              "codes = [main(argv) for argv in json.loads(sys.argv[1])]\n"
              "print('CODES', codes, file=sys.stderr)\n")
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, env=env,
                          timeout=300, cwd=tmp_path)
    err = done.stderr.decode("cp1252")
    out = done.stdout.decode("cp1252")
    assert done.returncode == 0 and "CODES [0, 0, 0, 0, 0]" in err, err[-3000:]
    assert "UnicodeEncodeError" not in err and "Traceback" not in err
    assert "\\u732b0.png" in out  # score/rank tables: the name, escaped
    assert "1 of 2 rows" in err and "failed" in err  # the score-dataset warning reached stderr
    assert (tmp_path / f"结果{CAT}" / "report.html").is_file()


# ---------------------------------------------------------------------------------------------- 10 embedded
def _infotext(prompt: str = PROMPT, negative: str | None = NEGATIVE) -> str:
    """As the WebUI's ``create_infotext``: prompt, ``Negative prompt: ...`` when there is one, settings line."""
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_text}\n{SETTINGS}".strip()


def _a1111_png(path: Path, text: str, seed: int = 0) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)  # modules/images.py save_image_with_geninfo
    _noise(seed).save(path, pnginfo=info)
    return path


def _comfy_graph(positive: str | list, negative: str = NEGATIVE, *, combine: bool = False) -> dict:
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "10": {"class_type": "PrimitiveString", "inputs": {"value": PROMPT}},
        "11": {"class_type": "ControlNetApplyAdvanced",
               "inputs": {"positive": ["6", 0], "negative": ["7", 0], "strength": 1.0}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 7.0, "model": ["4", 0],
                                                   "positive": ["11", 0], "negative": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }
    if combine:
        graph["12"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                         "conditioning_2": ["7", 0]}}
        graph["3"]["inputs"]["positive"] = ["12", 0]
    return graph


def _comfy_png(path: Path, graph: dict | None, *, workflow: bool = True) -> Path:
    info = PngImagePlugin.PngInfo()  # nodes_images.SaveImage: "prompt" and "workflow" text chunks
    if graph is not None:
        info.add_text("prompt", json.dumps(graph))
    if workflow:
        info.add_text("workflow", json.dumps({"nodes": [], "links": []}))
    _noise(7).save(path, pnginfo=info)
    return path


def test_infotext_gives_the_positive_prompt_only():
    assert split_infotext(_infotext()) == (PROMPT, NEGATIVE, {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "1234", "Size": "32x32",
        "Model hash": "45dee52b"})
    multi = "a red fox,\nin the snow\nNegative prompt: blurry\nlowres\n" + SETTINGS
    assert split_infotext(multi)[:2] == ("a red fox,\nin the snow", "blurry\nlowres")
    assert split_infotext(_infotext(negative=None))[:2] == (PROMPT, "")
    assert split_infotext("a cat\nStyle: oil, Mood: calm, Light: soft") is None  # a caption, not settings
    assert split_infotext("just a caption") is None


def test_comfyui_graph_positive_prompt_or_a_clear_error():
    assert comfyui_positive_prompt(json.dumps(_comfy_graph(PROMPT))) == (PROMPT, None)
    assert comfyui_positive_prompt(json.dumps(_comfy_graph(["10", 0]))) == (PROMPT, None)  # text from a string node
    for graph, why in ((_comfy_graph(PROMPT, combine=True), "ConditioningCombine"),
                       (_comfy_graph(["4", 0]), "comes from another node"),
                       ({"1": {"class_type": "SaveImage", "inputs": {}}}, "no sampler")):
        prompt, error = comfyui_positive_prompt(json.dumps(graph))
        assert prompt is None and why in error and "--prompt" in error
    two = _comfy_graph(PROMPT)
    two["20"] = {"class_type": "KSampler", "inputs": {"positive": ["7", 0], "negative": ["6", 0]}}
    assert "2 different positive prompts" in comfyui_positive_prompt(json.dumps(two))[1]


def test_score_dataset_reads_prompts_the_way_generators_write_them(tmp_path, tiny_model):
    folder = tmp_path / "outputs"
    folder.mkdir()
    _a1111_png(folder / "00001-1234.png", _infotext())
    _noise(2).save(folder / "00002-1235.png")
    (folder / "00002-1235.txt").write_text(_infotext("a cat on a sofa"), encoding="utf-8")  # save_txt sidecar
    _noise(3).save(folder / "00003.png")
    (folder / "00003.txt").write_text("a plain caption\n", encoding="utf-8")
    jpeg = _noise(4)
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + _infotext("a jpeg fox").encode("utf-16-be")
    jpeg.save(folder / "00004.jpg", exif=exif)
    _comfy_png(folder / "ComfyUI_00001_.png", _comfy_graph(PROMPT))
    _comfy_png(folder / "ComfyUI_00002_.png", _comfy_graph(PROMPT, combine=True))
    _comfy_png(folder / "ComfyUI_00003_.png", None)
    score_dataset(tiny_model, folder, tmp_path / "out.jsonl", progress=False)
    rows = {row["image"]: row for row in read_output(tmp_path / "out.jsonl")}
    assert {name: rows[name]["prompt"] for name in rows if rows[name]["error"] is None} == {
        "00001-1234.png": PROMPT, "00002-1235.png": "a cat on a sofa", "00003.png": "a plain caption",
        "00004.jpg": "a jpeg fox", "ComfyUI_00001_.png": PROMPT}
    assert "ConditioningCombine" in rows["ComfyUI_00002_.png"]["error"]
    assert "'prompt' graph" in rows["ComfyUI_00003_.png"]["error"]
    assert rows["00001-1234.png"]["score"] == pytest.approx(tiny_model.score(PROMPT, folder / "00001-1234.png"),
                                                            abs=1e-5)
    assert not any(NEGATIVE in (row["prompt"] or "") or "Steps" in (row["prompt"] or "") for row in rows.values())
    assert embedded_prompt(folder / "00003.png") is None  # no metadata at all


def test_webui_saved_images_rescore_with_their_own_prompt(webui, tmp_path, tiny_dir):
    """The fake WebUI saves PNGs with their infotext as the real one does; score-dataset on that folder scores each
    against its positive prompt (not "Negative prompt: blurry", not the settings)."""
    shim, plugin, _ = webui
    run_script(shim, plugin, make_p(shim, tmp_path, batch_size=2, n_iter=1), False, "0", True)
    samples = tmp_path / "out" / "samples"
    model = RM.load(str(tiny_dir), device="cpu")
    score_dataset(model, samples, tmp_path / "s.jsonl", progress=False)
    rows = read_output(tmp_path / "s.jsonl")
    assert len(rows) == 2 and all(row["error"] is None and row["prompt"] == PROMPT for row in rows)
    for row in rows:
        assert row["score"] == pytest.approx(model.score(PROMPT, samples / row["image"]), abs=1e-5)


# ---------------------------------------------------------------------------------------------- 11 resume
def test_score_dataset_resumes_iff_weights_and_settings_are_the_same(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_tiny_image_reward(tmp_path / "tiny")
    folder = tmp_path / "gen"
    folder.mkdir()
    for k in range(3):
        _noise(k).save(folder / f"{k}.png")
    base = ["score-dataset", "gen", "-o", "out.jsonl", "--prompt", PROMPT, "--num-workers", "0"]
    code, out, err = _cli([*base, "--model", "tiny"], capsys)
    assert code == 0 and json.loads(out)["scored"] == 3, err
    code, out, err = _cli([*base, "--model", "./tiny"], capsys)  # the same folder, spelled differently
    assert code == 0 and json.loads(out)["resumed"] == 3, err
    code, out, err = _cli([*base, "--model", str(tmp_path / "tiny") + "/"], capsys)
    assert code == 0 and json.loads(out)["resumed"] == 3, err
    for changed, needle in ((["--prompt", "a cat"], "prompt: "), (["--no-exif-transpose"], "exif_transpose"),
                            (["--dtype", "bf16"], "another scorer or precision")):
        code, _, err = _cli([*base, "--model", "tiny", *changed], capsys)  # the last --prompt wins
        assert code == 2 and needle in err and "cannot be resumed" in err, err
    # new weights written over the old ones, at the same path
    model = RM.load(str(tmp_path / "tiny"), device="cpu")
    with torch.no_grad():
        next(model.mlp.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "tiny")
    weights = tmp_path / "tiny" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    code, _, err = _cli([*base, "--model", "./tiny"], capsys)
    assert code == 2 and "new weights at the same path" in err and "model.safetensors" in err, err
    assert len(read_output(tmp_path / "out.jsonl")) == 3  # nothing mixed in
    code, out, err = _cli([*base, "--model", "./tiny", "--overwrite"], capsys)
    assert code == 0 and json.loads(out)["scored"] == 3, err


def test_scorer_identity_is_shared_by_the_eval_cache_and_score_dataset():
    from ImageReward.eval import cache
    from ImageReward.identity import scorer_identity

    assert cache.scorer_identity is scorer_identity
    assert scorer_identity("CLIP") == "CLIP|float32"


# ---------------------------------------------------------------------------------------------- 12 labels
def _preference_set(root: Path) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    for k in range(3):
        _noise(k).save(images / f"{k}.png")
    (root / "test.json").write_text(json.dumps([{"id": "1", "prompt": PROMPT, "generations": ["0.png", "1.png", "2.png"],
                                                 "ranking": [1, 2, 3]}]))
    return root


def test_scorer_labels_are_unique_or_refused(tmp_path, monkeypatch):
    from ImageReward.commands.eval import scorer_labels

    monkeypatch.chdir(tmp_path)
    for run in ("run1", "run2", "a/run1"):
        save_tiny_image_reward(tmp_path / run / "ImageReward")
    save_tiny_image_reward(tmp_path / "CLIP")
    assert scorer_labels(["run1/ImageReward", "run2/ImageReward"]) == ["run1_ImageReward", "run2_ImageReward"]
    assert scorer_labels(["run1/ImageReward", "a/run1/ImageReward"]) == [f"{tmp_path.name}_run1_ImageReward",
                                                                         "a_run1_ImageReward"]
    assert scorer_labels(["CLIP", "./CLIP"]) == ["CLIP", f"{tmp_path.name}_CLIP"]  # a folder named like a scorer
    assert scorer_labels(["run1/ImageReward", "CLIP"]) == ["ImageReward", "CLIP"]  # no clash: unchanged
    with pytest.raises(InvalidInputError, match="listed twice"):
        scorer_labels(["run1/ImageReward", "./run1/ImageReward/"])
    with pytest.raises(InvalidInputError, match="listed twice"):
        scorer_labels(["CLIP", "CLIP"])


def test_eval_commands_never_overwrite_one_scorers_results_with_anothers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = save_tiny_image_reward(tmp_path / "run1" / "ImageReward")
    second = RM.load(str(first), device="cpu")
    with torch.no_grad():
        for param in second.mlp.parameters():
            param.mul_(-1.0)
    second.save_pretrained(tmp_path / "run2" / "ImageReward")
    data = _preference_set(tmp_path / "pref")
    code, out, err = _cli(["eval-preference", "--model_type", "run1/ImageReward,run2/ImageReward", "--source_path",
                           data / "test.json", "--img_prefix", data / "images", "--target_dir", tmp_path / "res",
                           "--no-download", "--bootstrap", "0", "--no-report"], capsys)
    assert code == 0, err
    one = json.loads((tmp_path / "res" / "test_run1_ImageReward.json").read_text())
    two = json.loads((tmp_path / "res" / "test_run2_ImageReward.json").read_text())
    images = [str(data / "images" / f"{k}.png") for k in range(3)]
    assert one[0]["rewards"] == pytest.approx(RM.load(str(first)).score(PROMPT, images), abs=1e-5)
    assert two[0]["rewards"] == pytest.approx(second.score(PROMPT, images), abs=1e-5)
    assert one[0]["rewards"] != pytest.approx(two[0]["rewards"], abs=1e-3)
    bench = _benchmark_tree(tmp_path / "bench")
    code, _, err = _cli(["eval-benchmark", "--img_dir", bench / "gens", "--model", "genA,genA", "--benchmark",
                         "run1/ImageReward", "--prompts_path", bench / "prompts.json", "--no-download"], capsys)
    assert code == 2 and "more than once" in err
    code, _, err = _cli(["eval-benchmark", "--img_dir", bench / "gens", "--model", "genA", "--benchmark",
                         "run1/ImageReward;./run1/ImageReward", "--prompts_path", bench / "prompts.json",
                         "--no-download"], capsys)
    assert code == 2 and "listed twice" in err


# ---------------------------------------------------------------------------------------------- 13 failures
def test_score_dataset_reports_failed_rows_and_fails_when_all_did(tiny, tmp_path, capsys, caplog):
    table = tmp_path / "pairs.jsonl"
    _noise(0).save(tmp_path / "ok.png")
    rows = [{"prompt": PROMPT, "image": "ok.png"}] + [{"prompt": PROMPT, "image": f"missing{k}.png"} for k in range(4)]
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="ImageReward.scoring.runner"):
        code, out, err = _cli(["score-dataset", table, "-o", tmp_path / "part.jsonl", "--model", tiny,
                               "--num-workers", "0"], capsys)
    assert code == 0 and json.loads(out)["total_errors"] == 4
    assert "4 of 5 rows" in caplog.text and "missing0.png" in caplog.text
    table.write_text("".join(json.dumps(row) + "\n" for row in rows[1:]))
    code, out, err = _cli(["score-dataset", table, "-o", tmp_path / "all.jsonl", "--model", tiny,
                           "--num-workers", "0"], capsys)
    assert code == 1 and "every row failed (4 of 4" in err and "file does not exist" in err
    assert json.loads(out)["total_errors"] == 4  # the summary still reaches stdout
    summary = score_dataset(RM.load(str(tiny), device="cpu"), table, tmp_path / "lib.jsonl", progress=False)
    assert summary["total_errors"] == 4 and len(summary["error_examples"]) == 3


# ---------------------------------------------------------------------------------------------- 14 progress
@pytest.mark.parametrize("argv", [["score", "a.png"], ["rank", "a.png"], ["score-dataset", "in", "-o", "o.jsonl"],
                                  ["eval-preference"], ["eval-benchmark"]])
def test_progress_is_on_for_a_terminal_and_off_otherwise(argv, monkeypatch):
    from ImageReward.cli import build_parser
    from ImageReward.commands.score import show_progress

    parser = build_parser()
    args = parser.parse_args(argv)
    assert args.progress is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert show_progress(args) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert show_progress(args) is True
    assert show_progress(parser.parse_args([*argv, "--no-progress"])) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert show_progress(parser.parse_args([*argv, "--progress"])) is True


def test_rank_draws_a_bar_on_a_terminal(prompt_free, tmp_path, capsys, monkeypatch):
    image = tmp_path / "a.png"
    _noise(0).save(image)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, err = _cli(["rank", "--model", "Bright", image, image], capsys)
    assert code == 0 and "scoring (Brightness)" in err
    code, _, err = _cli(["rank", "--model", "Bright", "--no-progress", image], capsys)
    assert code == 0 and "scoring" not in err


# ---------------------------------------------------------------------------------------------- 16 docs
_PACKAGE = re.compile(r"^image[-_.]?reward(\[[^\]]*\])?([<>=!~;@].*)?$", re.IGNORECASE)


def _install_targets(line: str) -> list[str]:
    """The requirement arguments of each ``pip install`` on a line (options and their values dropped)."""
    targets = []
    for match in re.finditer(r"pip3?\s+install\s+([^`|&;#)]*)", line):
        words = [w.strip("\"'") for w in match.group(1).split()]
        skip = False
        for word in words:
            if skip:
                skip = False
            elif word in ("-r", "-c", "--requirement", "--constraint", "-i", "--index-url", "--target", "-t"):
                skip = True
            elif not word.startswith("-"):
                targets.append(word)
    return targets


def test_no_install_line_in_the_docs_installs_pypis_original():
    files = [*REPO.glob("*.md"), *REPO.glob("docs/**/*.md"), *REPO.glob("scripts/*.sh"), *REPO.glob("train/**/*.md"),
             *REPO.glob("ImageReward/**/*.py"), *REPO.glob("sdwebui/*.py"), *REPO.glob("comfyui/*.py"),
             *REPO.glob("data/*.md")]
    assert len(files) > 20
    wrong = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in files for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             for target in _install_targets(line) if _PACKAGE.match(target)]
    assert wrong == []
    assert _install_targets('pip install "image-reward[scoring]"') == ["image-reward[scoring]"]  # the checker works
    assert _PACKAGE.match("image-reward[scoring]") and not _PACKAGE.match("/path/to/ImageReward")


def test_score_gard_replacement_for_the_tokenizer_route_is_documented_and_true(tiny_model):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "model.blip.tokenizer" in readme and "ImageReward.tokenizer.tokenize(prompts)" in readme
    from ImageReward.tokenizer import load_bert_tokenizer, tokenize

    prompts = [PROMPT, "a cat"]
    ids, mask = tokenize(prompts)
    original_route = load_bert_tokenizer()(prompts, padding="max_length", truncation=True, max_length=35,
                                           return_tensors="pt")
    assert torch.equal(ids, original_route.input_ids) and torch.equal(mask, original_route.attention_mask)
    image = torch.stack([tiny_model.preprocess(_noise(k)) for k in range(2)])
    rewards = tiny_model.score_gard(ids, mask, image)
    assert rewards.shape == (2, 1)
    assert rewards[:, 0].tolist() == pytest.approx(tiny_model.score_batch(prompts, [_noise(0), _noise(1)]).tolist(),
                                                   abs=1e-4)
