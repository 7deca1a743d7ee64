"""The AUTOMATIC1111 WebUI script (sdwebui/image_reward.py), end to end on the WebUI shim and a tiny model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch
from PIL import Image

import ImageReward as RM
from ImageReward import factory
from webui_shim import (Brightness, fake_sample, install_webui, parse_generation_parameters, read_stealth_infotext,
                        save_tiny_image_reward)

UNPATCHED_LOAD = factory.load

PLUGIN = Path(__file__).resolve().parents[1] / "sdwebui" / "image_reward.py"
TITLE = "ImageReward - generate human preference scores"
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_image_reward(tmp_path_factory.mktemp("tiny") / "ir")


def load_plugin(name: str = "image_reward_webui_script"):
    spec = importlib.util.spec_from_file_location(name, PLUGIN)  # how the WebUI loads scripts/*.py
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _install(monkeypatch, tmp_path, tiny_dir, host):
    shim = install_webui(monkeypatch, tmp_path, host=host)
    real_load, loads = RM.load, []

    def fake_load(name="ImageReward-v1.0", device=None, *args, **kwargs):
        loads.append(name)
        return real_load(tiny_dir if name == "ImageReward-v1.0" else name, device=device)

    monkeypatch.setattr(RM, "load", fake_load)
    monkeypatch.setattr(factory, "load", fake_load)  # what RM.load_scorer (the plugins' resolver) calls
    monkeypatch.setitem(factory._SCORERS, "Brightness", lambda **kw: Brightness())
    monkeypatch.setitem(factory._SCORERS, "Darkness", lambda **kw: Brightness(higher_is_better=False))
    return shim, load_plugin(), loads


@pytest.fixture
def webui(monkeypatch, tmp_path, tiny_dir, cached_checkpoint):
    """(shim, plugin, loads): the fake WebUI (A1111 v1.10.1) installed, the plugin imported, ``ImageReward-v1.0``
    resolving to a tiny model; ``loads`` lists every name the library was asked to load."""
    shim, plugin, loads = _install(monkeypatch, tmp_path, tiny_dir, "a1111")
    yield shim, plugin, loads
    plugin.unload_model()


@pytest.fixture
def forge(monkeypatch, tmp_path, tiny_dir, cached_checkpoint):
    """As ``webui``, in SD WebUI Forge f2.0.1 (its default *Stealth infotext = Alpha*)."""
    shim, plugin, loads = _install(monkeypatch, tmp_path, tiny_dir, "forge")
    yield shim, plugin, loads
    plugin.unload_model()


def make_p(shim, tmp_path, *, batch_size=2, n_iter=2, seed=1234, size=32, **kwargs):
    return shim.processing.StableDiffusionProcessingTxt2Img(
        prompt=PROMPT, negative_prompt="blurry", seed=seed, batch_size=batch_size, n_iter=n_iter, width=size,
        height=size,
        outpath_samples=str(tmp_path / "out" / "samples"), outpath_grids=str(tmp_path / "out" / "grids"), **kwargs)


def run_script(shim, plugin, p, *values):
    runner = shim.scripts.ScriptRunner([plugin.Script], is_img2img=False, always_visible=shim.AlwaysVisible)
    p.scripts, p.script_args = runner, runner.args_for(TITLE, *values)
    return runner.run(p, *p.script_args)


def score_of(text: str, key: str = "ImageReward Score") -> float:
    return float(parse_generation_parameters(text)[key])


def test_script_registration_and_ui(webui):
    shim, plugin, _ = webui
    runner = shim.scripts.ScriptRunner([plugin.Script], is_img2img=True, always_visible=shim.AlwaysVisible)
    assert [s.title() for s in runner.selectable_scripts] == [TITLE] and not runner.alwayson_scripts
    script = runner.selectable_scripts[0]
    assert script.show(False) is True and script.show(True) is True
    filter_box, limit, sort, scorer = script.controls
    assert (filter_box.value, limit.value, sort.value, scorer.value) == (False, "0", True, "ImageReward-v1.0")
    assert filter_box.label == "Filter out images with low scores" and limit.label == "Lower score limit"
    assert {"ImageReward-v1.0", "Brightness"} <= set(scorer.choices)
    # the unload button is wired to the plugin's unload, which needs no arguments
    assert script.elem_id("limit").startswith("script_img2img_")
    assert runner.default_args() == [0, False, "0", True, "ImageReward-v1.0"]


def test_end_to_end_scores_infotexts_png_and_grid(webui, tmp_path, tiny_dir):
    shim, plugin, _ = webui
    shim.shared.opts.return_grid = True
    shim.shared.opts.grid_save = True
    p = make_p(shim, tmp_path)
    processed = run_script(shim, plugin, p, False, "0", True, "ImageReward-v1.0")

    assert processed.index_of_first_image == 1 and len(processed.images) == 5
    assert len(processed.infotexts) == len(processed.images)
    grid, samples = processed.images[0], processed.images[1:]
    assert grid.size == (64, 64) and "score" not in grid.info and "ImageReward Score" not in processed.infotexts[0]

    # every sample's score equals the library's own score for that image and prompt
    reference = UNPATCHED_LOAD(str(tiny_dir), device="cpu")
    expected = [reference.score(PROMPT, image) for image in samples]
    got = [score_of(text) for text in processed.infotexts[1:]]
    assert got == pytest.approx(expected, abs=6e-5)  # written with 4 decimals
    assert [image.info["score"] for image in samples] == pytest.approx(expected, abs=1e-5)
    assert got == sorted(got, reverse=True) and len(set(got)) == 4

    for image, text, seed in zip(samples, processed.infotexts[1:], processed.all_seeds):
        assert image.info["parameters"] == text
        fields = parse_generation_parameters(text)  # the score did not break the WebUI's infotext parser
        assert fields["Prompt"] == PROMPT and fields["Negative prompt"] == "blurry"
        assert fields["Steps"] == "20" and fields["Seed"] == str(seed) and fields["Size-1"] == "32"
    assert sorted(processed.all_seeds) == [1234, 1235, 1236, 1237]
    assert processed.seed == processed.all_seeds[0]
    assert processed.info == processed.infotexts[0]
    assert "ImageReward Scores:" in processed.comments

    # saved files: every sample once, with the score in its PNG info; the grid once, without a score
    saved_samples = [s for s in shim.saved if not s["grid"]]
    assert len(saved_samples) == 4 and sum(s["grid"] for s in shim.saved) == 1
    by_seed = {seed: text for seed, text in zip(processed.all_seeds, processed.infotexts[1:])}
    for record in saved_samples:
        with Image.open(record["filename"]) as png:
            assert png.mode == "RGB" and png.info["parameters"] == by_seed[record["seed"]]
            assert "ImageReward Score: " in png.info["parameters"]
        # the saved file re-scores (as the CLI reads it) to the score written into it
        assert reference.score(PROMPT, record["filename"]) == pytest.approx(score_of(by_seed[record["seed"]]),
                                                                          abs=6e-5)
    # the UI's gallery serves the file the host saved (ui_tempdir reads already_saved_as)
    saved_by_seed = {s["seed"]: s["filename"] for s in saved_samples}
    assert [im.already_saved_as for im in samples] == [saved_by_seed[seed] for seed in processed.all_seeds]
    grid_file = next(s["filename"] for s in shim.saved if s["grid"])
    with Image.open(grid_file) as png:
        assert "ImageReward Score" not in png.info["parameters"]
    assert p.do_not_save_samples is False  # restored after the run


def test_sort_off_keeps_generation_order(webui, tmp_path):
    shim, plugin, _ = webui
    processed = run_script(shim, plugin, make_p(shim, tmp_path), False, "0", False)
    assert processed.index_of_first_image == 0
    assert processed.all_seeds == [1234, 1235, 1236, 1237]
    assert [score_of(t, "Seed") for t in processed.infotexts] == [1234, 1235, 1236, 1237]


def test_filter_keeps_scores_equal_to_the_limit(webui, tmp_path):
    shim, plugin, _ = webui
    baseline = run_script(shim, plugin, make_p(shim, tmp_path), False, "0", True)
    exact = [image.info["score"] for image in baseline.images]  # sorted, best first
    limit = exact[2]
    shim.shared.opts.return_grid = True
    processed = run_script(shim, plugin, make_p(shim, tmp_path), True, repr(limit), True)
    kept = [image.info["score"] for image in processed.images[processed.index_of_first_image:]]
    assert kept == exact[:3]  # the image scoring exactly the limit is kept, the one below is dropped
    assert processed.index_of_first_image == 1 and len(processed.infotexts) == 4
    assert "1 of 4 images below the limit" in processed.comments
    assert all(score_of(t) >= float(f"{limit:.4f}") for t in processed.infotexts[1:])


def test_filter_everything_gives_an_empty_gallery(webui, tmp_path):
    shim, plugin, _ = webui
    shim.shared.opts.return_grid = True
    processed = run_script(shim, plugin, make_p(shim, tmp_path), True, "1e9", True)
    # the reason reaches the UI (info, comments) and the API (infotexts[0] of Processed.js())
    assert processed.images == [] and processed.index_of_first_image == 0
    assert processed.infotexts == [processed.info] and "all 4 images scored below the limit" in processed.info
    assert "none is shown" in processed.comments
    assert json.loads(processed.js())["infotexts"][0] == processed.info
    assert len([s for s in shim.saved if not s["grid"]]) == 4  # generated samples are still saved, with scores
    assert all("ImageReward Score: " in s["info"] for s in shim.saved)
    processed.js()  # the WebUI serialises the result for the gallery: must not fail when empty


@pytest.mark.parametrize("limit", ["abc", "", "nan", "inf"])
def test_bad_limit_is_a_clear_error_before_generating(webui, tmp_path, limit):
    shim, plugin, _ = webui
    with pytest.raises(ValueError, match="Lower score limit must be a number"):
        run_script(shim, plugin, make_p(shim, tmp_path), True, limit, True)
    assert shim.saved == []  # nothing generated


def test_bad_limit_ignored_when_not_filtering_and_old_two_argument_api(webui, tmp_path):
    shim, plugin, _ = webui
    assert len(run_script(shim, plugin, make_p(shim, tmp_path), False, "abc").images) == 4
    processed = plugin.Script().run(make_p(shim, tmp_path), True, "-1e9")  # the original's 2 script args
    assert len(processed.images) == 4


def api_run(shim, plugin, p, request_script_args, *, ui_fails=False, api_ready=True):
    """``POST /sdapi/v1/txt2img`` with ``script_name=TITLE``: the script, then another selectable script after it
    (as Prompt matrix follows image_reward.py in the WebUI), args built by the API's ``init_script_args``."""
    class Following(shim.scripts.Script):
        def title(self):
            return "Prompt matrix"

        def ui(self, is_img2img):
            return [shim.gradio.Checkbox(value=False), shim.gradio.Checkbox(value=False)]

    class Broken(plugin.Script):
        def ui(self, is_img2img):
            raise TypeError("unexpected keyword argument")  # what an older gradio would say

    class AlwaysOn(shim.scripts.Script):  # the WebUI's always-on scripts (seed, refiner...) come first
        def title(self):
            return "Refiner"

        def show(self, is_img2img):
            return shim.AlwaysVisible

        def ui(self, is_img2img):
            return [shim.gradio.Checkbox(value=False), shim.gradio.Dropdown(value=""), shim.gradio.Slider(value=0.8)]

    classes = [AlwaysOn, Broken if ui_fails else plugin.Script, Following]
    runner = shim.scripts.ScriptRunner(classes, always_visible=shim.AlwaysVisible)
    p.scripts, p.script_args = runner, runner.api_args(TITLE, request_script_args, api_ready=api_ready)
    return runner, runner.run(p, *p.script_args)


def test_api_script_args_reach_run(webui, tmp_path):
    shim, plugin, loads = webui
    _, processed = api_run(shim, plugin, make_p(shim, tmp_path), [True, "0.5", False, "Brightness"])
    brightness = [score_of(t, "Brightness Score") for t in processed.infotexts]
    assert len(brightness) >= 1 and all(b >= 0.5 for b in brightness) and loads == []


def test_script_without_controls_fails_instead_of_running_with_defaults(webui, tmp_path):
    """A ui() that fails in the host leaves the script no controls: the API's script_args never reach run(), which
    must say so rather than load the default ImageReward-v1.0 (a 1.7 GB download the user did not ask for)."""
    shim, plugin, loads = webui
    with pytest.raises(plugin.ImageRewardScriptError, match="passed 0 values.*not registered.*Error calling"):
        api_run(shim, plugin, make_p(shim, tmp_path), [False, "0", True, "Brightness"], ui_fails=True)
    assert loads == [] and shim.saved == []  # nothing loaded, nothing generated


def test_api_request_before_the_webui_is_ready_is_an_error(webui, tmp_path):
    """The API's routes answer before its default script args exist: such a request's script_args are lost."""
    shim, plugin, loads = webui
    with pytest.raises(plugin.ImageRewardScriptError, match="passed 0 values.*before the WebUI finished starting"):
        api_run(shim, plugin, make_p(shim, tmp_path), [False, "0", True, "Brightness"], api_ready=False)
    assert loads == [] and shim.saved == []


def test_ui_failure_is_reported_like_the_webui(webui):
    shim, plugin, _ = webui

    class Broken(plugin.Script):
        def ui(self, is_img2img):
            raise TypeError("unexpected keyword argument")

    runner = shim.scripts.ScriptRunner([Broken])
    [script] = runner.selectable_scripts
    assert script.args_from == script.args_to == 1 and script.controls is None
    assert len(runner.ui_errors) == 1 and "Error calling" in runner.ui_errors[0]


def test_short_api_script_args_are_an_error_naming_the_argument(webui, tmp_path):
    """The original plugin's 2 script_args through the API: the WebUI fills the rest from the next script's
    controls (False, False), which must not become "sort off, default scorer"."""
    shim, plugin, loads = webui
    with pytest.raises(plugin.ImageRewardScriptError, match=r"argument 3 \(scorer_name\).*got False"):
        api_run(shim, plugin, make_p(shim, tmp_path), [True, "-1e9"])
    assert loads == [] and shim.saved == []


@pytest.mark.parametrize("args", [(), (True,), (True, "0", True, "Brightness", "extra")])
def test_wrong_number_of_run_arguments(webui, tmp_path, args):
    shim, plugin, loads = webui
    with pytest.raises(plugin.ImageRewardScriptError, match=f"passed {len(args)} values to run\\(\\), expected 4"):
        plugin.Script().run(make_p(shim, tmp_path), *args)
    assert loads == []


@pytest.mark.integration
def test_model_reuse_unload_twice_and_reload(webui, tmp_path):
    shim, plugin, loads = webui
    run_script(shim, plugin, make_p(shim, tmp_path, n_iter=1), False, "0", True)
    model = shim.shared.image_reward_model
    run_script(shim, plugin, make_p(shim, tmp_path, n_iter=1), False, "0", True)
    assert loads == ["ImageReward-v1.0"] and shim.shared.image_reward_model is model  # loaded once, reused

    shim.gradio.created.clear()
    shim.scripts.ScriptRunner([plugin.Script])
    [button] = [c for c in shim.gradio.created if isinstance(c, shim.gradio.Button)]
    assert button.args == ("Unload Model From Memory",)
    [unload_fn] = [h["fn"] for h in button.handlers["click"]]
    assert "unloaded" in unload_fn()
    assert shim.shared.image_reward_model is None and shim.devices.gc_calls == [1]
    assert "No ImageReward model was loaded" in unload_fn()  # second unload: harmless
    assert shim.devices.gc_calls == [1]
    run_script(shim, plugin, make_p(shim, tmp_path, n_iter=1), False, "0", True)
    assert loads == ["ImageReward-v1.0", "ImageReward-v1.0"]


@pytest.mark.integration
def test_other_scorers_and_switching(webui, tmp_path):
    shim, plugin, loads = webui
    processed = run_script(shim, plugin, make_p(shim, tmp_path), True, "0.5", True, "Brightness")
    brightness = [score_of(t, "Brightness Score") for t in processed.infotexts]
    assert brightness == sorted(brightness, reverse=True) and all(b >= 0.5 for b in brightness)
    assert shim.shared.image_reward_model_name == "Brightness" and loads == []

    # lower-is-better scorers: best (lowest) first, and the limit keeps what is at least as good
    processed = run_script(shim, plugin, make_p(shim, tmp_path), True, "0.5", True, "Darkness")
    darkness = [image.info["score"] for image in processed.images]
    assert darkness == sorted(darkness) and all(d <= 0.5 for d in darkness)
    assert isinstance(shim.shared.image_reward_model, Brightness)

    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        run_script(shim, plugin, make_p(shim, tmp_path), False, "0", True, "nope")


def test_local_checkpoint_path_and_unsaved_settings(webui, tmp_path, tiny_dir):
    shim, plugin, loads = webui
    shim.shared.opts.samples_save = False
    processed = run_script(shim, plugin, make_p(shim, tmp_path, n_iter=1), False, "0", True, str(tiny_dir))
    assert loads == [str(tiny_dir)] and len(processed.images) == 2 and shim.saved == []
    p = make_p(shim, tmp_path, n_iter=1, do_not_save_samples=True)
    shim.shared.opts.samples_save = True
    run_script(shim, plugin, p, False, "0", True, str(tiny_dir))
    assert shim.saved == [] and p.do_not_save_samples is True


def test_missing_library_gives_the_install_command(monkeypatch, tmp_path):
    shim = install_webui(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # `import ImageReward` -> ImportError

    def no_pip(*args, **kwargs):
        raise AssertionError("the plugin must never run pip")

    monkeypatch.setattr(subprocess, "check_call", no_pip)
    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.setattr(subprocess, "Popen", no_pip)
    plugin = load_plugin("image_reward_webui_script_missing")
    assert plugin.RM is None and "-m pip install" in plugin.INSTALL_COMMAND
    runner = shim.scripts.ScriptRunner([plugin.Script])
    assert runner.selectable_scripts[0].title() == TITLE  # the script still shows up
    with pytest.raises(ValueError, match="pip install"):
        run_script(shim, plugin, make_p(shim, tmp_path), False, "0", True)
    assert "No ImageReward model was loaded" in plugin.unload_model()


def test_infotext_and_limit_helpers(webui):
    _, plugin, _ = webui
    webui_text = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Seed: 1, Version: v1"
    text = plugin.add_to_infotext(webui_text, "ImageReward Score", "-0.1234")
    assert text.endswith("Version: v1, ImageReward Score: -0.1234")
    assert parse_generation_parameters(text)["ImageReward Score"] == "-0.1234"
    assert plugin.add_to_infotext("", "K", "1") == "K: 1"
    assert plugin.add_to_infotext("just a prompt", "K", "1") == "just a prompt\nK: 1"
    assert plugin.parse_limit(" -0.5 ") == -0.5 and plugin.parse_limit(2) == 2.0
    assert "subprocess" not in PLUGIN.read_text()  # never installs anything at run time


def test_extra_images_pass_through_and_interrupted_run(webui, tmp_path, monkeypatch):
    shim, plugin, _ = webui
    real = plugin.process_images

    def with_extra(p):  # an extension appending e.g. a detection map after the samples
        processed = real(p)
        extra = Image.new("RGB", (32, 32), "white")
        processed.images.append(extra)
        processed.infotexts.append("extra image")
        return processed

    monkeypatch.setattr(plugin, "process_images", with_extra)
    processed = run_script(shim, plugin, make_p(shim, tmp_path, n_iter=1), False, "0", True)
    assert len(processed.images) == 3 and processed.infotexts[-1] == "extra image"
    assert "score" not in processed.images[-1].info and all("score" in im.info for im in processed.images[:2])
    monkeypatch.setattr(plugin, "process_images", real)

    shim.shared.state.interrupted = True  # interrupted before any sample: nothing to score, no error
    processed = run_script(shim, plugin, make_p(shim, tmp_path), True, "0", True)
    assert processed.images == []


def test_grid_shows_only_the_kept_samples_best_first(webui, tmp_path):
    shim, plugin, _ = webui
    shim.shared.opts.return_grid = True
    shim.shared.opts.grid_save = True
    baseline = run_script(shim, plugin, make_p(shim, tmp_path), False, "0", True)
    best_first = [image.info["score"] for image in baseline.images[1:]]
    shim.saved.clear()
    processed = run_script(shim, plugin, make_p(shim, tmp_path), True, repr(best_first[1]), True)
    grid, kept = processed.images[0], processed.images[1:]
    assert processed.index_of_first_image == 1 and [im.info["score"] for im in kept] == best_first[:2]
    expected = shim.images.image_grid(kept, 2)  # the WebUI's grid of exactly the kept samples, in order
    assert grid.size == expected.size == (64, 32)
    assert np.array_equal(np.asarray(grid), np.asarray(expected))
    [grid_file] = [s["filename"] for s in shim.saved if s["grid"]]  # the saved grid is that grid too
    with Image.open(grid_file) as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(expected))
        assert "ImageReward Score" not in png.info["parameters"]
    # one kept sample: no grid (grid_only_if_multiple), as the WebUI itself does for a single image
    processed = run_script(shim, plugin, make_p(shim, tmp_path), True, repr(best_first[0]), True)
    assert processed.index_of_first_image == 0 and len(processed.images) == 1


def test_summary_goes_through_p_comment_as_the_real_host_needs(webui, tmp_path):
    shim, plugin, _ = webui
    p = make_p(shim, tmp_path)
    processed = run_script(shim, plugin, p, True, "-1e9", True)
    assert "0 of 4 images below the limit -1e+09 filtered out" in processed.comments
    assert any("ImageReward Scores:" in c for c in p.comments)  # v1.10.1 ignores Processed(comments=...)


def test_pt_written_by_current_torch_loads_under_the_webui_torch_load_patch(webui, tmp_path):
    """The WebUI's modules/safe.py replaces torch.load; it refuses current torch's zip layout and returns None."""
    from ImageReward.checkpoint import read_state_dict

    path = tmp_path / "head.pt"
    state = {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.zeros(2)}
    torch.save(state, path)
    assert torch.load(path) is None  # the shim is as strict as the host here
    loaded = read_state_dict(path)
    assert set(loaded) == {"weight", "bias"} and torch.equal(loaded["weight"], state["weight"])


# ------------------------------------------------------------------------------------------- SD WebUI Forge
def test_forge_changes_the_images_it_saves_in_place(forge, tmp_path):
    """The host behaviour the script must counter (Forge's own txt2img, no script): saved and shown images become
    RGBA, the infotext hidden in the alpha channel's lowest bit (Forge's stealth reader gets it back)."""
    shim, _, _ = forge
    processed = shim.processing.process_images(make_p(shim, tmp_path, n_iter=1, size=64))  # 64x64: room for it
    assert [image.mode for image in processed.images] == ["RGBA", "RGBA"]
    assert read_stealth_infotext(processed.images[0]) == processed.infotexts[0]
    assert processed.images[0].getchannel("A").getextrema() == (254, 255)


def test_forge_gallery_stays_rgb_and_saved_pngs_rescore_to_their_infotext(forge, tmp_path, tiny_dir):
    shim, plugin, _ = forge
    shim.shared.opts.return_grid = True
    shim.shared.opts.grid_save = True
    processed = run_script(shim, plugin, make_p(shim, tmp_path, size=64), True, "-1e9", True)
    grid, samples = processed.images[0], processed.images[1:]

    # the gallery / API: what A1111 gives, the RGB pixels the sampler made and the scorer scored; the grid as
    # Forge's own image_grid makes it (RGBA, opaque), nothing hidden in it
    assert [image.mode for image in processed.images] == ["RGBA"] + ["RGB"] * 4
    assert grid.getchannel("A").getextrema() == (255, 255)
    for image, seed in zip(samples, processed.all_seeds):
        made = (255.0 * fake_sample(seed, 64, 64).permute(1, 2, 0).numpy()).astype(np.uint8)
        assert np.array_equal(np.asarray(image), made)
    assert np.array_equal(np.asarray(grid), np.asarray(shim.images.image_grid(samples, 2)))

    # the saved files: Forge's RGBA with the infotext (score included) twice, and each re-scores to its score
    reference = UNPATCHED_LOAD(str(tiny_dir), device="cpu")
    by_seed = {seed: text for seed, text in zip(processed.all_seeds, processed.infotexts[1:])}
    saved_samples = [s for s in shim.saved if not s["grid"]]
    assert len(saved_samples) == 4
    for record in saved_samples:
        with Image.open(record["filename"]) as png:
            png.load()
            assert png.mode == "RGBA" and png.info["parameters"] == by_seed[record["seed"]]
            assert read_stealth_infotext(png) == by_seed[record["seed"]]
        written = score_of(by_seed[record["seed"]])
        assert reference.score(PROMPT, record["filename"]) == pytest.approx(written, abs=6e-5)
    scores = [image.info["score"] for image in samples]
    files = [next(s["filename"] for s in saved_samples if s["seed"] == seed) for seed in processed.all_seeds]
    assert reference.score_batch(PROMPT, files).tolist() == pytest.approx(scores, abs=1e-5)
    assert [image.already_saved_as for image in samples] == files  # the gallery serves the saved files
    [grid_file] = [s["filename"] for s in shim.saved if s["grid"]]
    with Image.open(grid_file) as png:
        assert png.mode == "RGBA" and read_stealth_infotext(png) == png.info["parameters"]


def test_forge_scoring_failure_saves_the_samples_unscored_and_unchanged(forge, tmp_path, monkeypatch):
    shim, plugin, _ = forge
    model = plugin.load_scorer("Brightness")

    def broken(prompts, images):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "score_batch", broken)
    p = make_p(shim, tmp_path, n_iter=1, size=64)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_script(shim, plugin, p, False, "0", True, "Brightness")
    saved = [s for s in shim.saved if not s["grid"]]
    assert len(saved) == 2 and all("Score" not in s["info"] for s in saved)  # generation is never lost
    for record in saved:
        with Image.open(record["filename"]) as png:
            png.load()
            assert png.mode == "RGBA" and read_stealth_infotext(png) == record["info"]
