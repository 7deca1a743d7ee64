"""ImageReward script for the AUTOMATIC1111 Stable Diffusion WebUI.

Install: put the ``ImageReward`` library into the WebUI's Python (``<webui>/venv/bin/python -m pip install
--no-deps <path to this project>``: the WebUI's pinned packages stay as they are), then copy this file into
``stable-diffusion-webui/scripts/`` and restart.
Pick "ImageReward - generate human preference scores" in the *Script* dropdown of txt2img or img2img.

After the WebUI generates, every sample (never the grid) is scored in batches by the chosen scorer, the
score is written into the image's infotext (``..., ImageReward Score: 0.1234``) and so into the PNG info of
the saved file, images below the limit are optionally filtered out, and the rest are sorted best first; the
grid (when the WebUI makes one) is rebuilt from the images shown, in their order. The summary goes to
``p.comment`` (v1.10.1 ignores ``Processed(comments=...)``); when every image is filtered out, the reason is the
run's info text, which the API returns as ``info.infotexts[0]``.
The same file runs in SD WebUI Forge (f2.0.1): there the host's default *Stealth infotext = Alpha* also hides the
infotext in the saved PNG's alpha channel, changing the image it is given in place, so the script hands the host a
copy (``save_copy``): the gallery and the API show the RGB pixels that were scored, as in A1111.
The model stays loaded between runs until "Unload Model From Memory" is pressed. This file is an adapter:
all scoring is done by the installed ``ImageReward`` package, and nothing is ever pip-installed here.
"""

from __future__ import annotations

import gc
import logging
import math
import re
import sys
from typing import Any, Sequence

import gradio as gr
from modules import images, scripts, shared
from modules.processing import Processed, StableDiffusionProcessing, create_infotext, process_images

logger = logging.getLogger(__name__)

TITLE = "ImageReward - generate human preference scores"
DEFAULT_SCORER = "ImageReward-v1.0"
BUILTIN_SCORES = ("CLIP", "BLIP", "Aesthetic", "HPSv2", "HPSv2.1", "PickScore")
# PyPI's "image-reward" is the original 1.x, which this script cannot use: install from the source tree, with
# --no-deps so that the WebUI's pinned packages (transformers 4.30.2, pydantic 1, Pillow 9.5.0) stay as they are.
INSTALL_COMMAND = (f'"{sys.executable}" -m pip install --no-deps /path/to/ImageReward  (the folder of this '
                   "project's pyproject.toml)")
SCRIPT_ARGS = ("filter_out_low_scores", "lower_score_limit", "sort_by_score", "scorer_name")  # ui()'s controls
SCRIPT_DEFAULTS = (False, "0", True, DEFAULT_SCORER)  # their initial values
_SHARED_MODEL = "image_reward_model"  # attribute of modules.shared: survives script reloads, as in the original
_SHARED_NAME = "image_reward_model_name"
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # the WebUI's key: value

try:
    import ImageReward as RM

    if not hasattr(RM, "Scorer"):  # the 1.x package (PyPI image-reward<=1.5) lacks the scorer interface
        raise ImportError(f"ImageReward {getattr(RM, '__version__', '1.x')} is too old for this script")
    _IMPORT_ERROR: str | None = None
except ImportError as err:  # reported in the UI and at run time; never auto-installed
    RM = None  # type: ignore[assignment]
    _IMPORT_ERROR = (f"The ImageReward library is not usable in the WebUI's Python ({err}). "
                     f"Install it with: {INSTALL_COMMAND}  -- then restart the WebUI.")
    logger.error(_IMPORT_ERROR)


class ImageRewardScriptError(ValueError):
    """A problem the user can fix in the UI (bad limit, missing library); shown as the run's error."""


# ------------------------------------------------------------------------------------------- model cache
def scorer_choices() -> list[str]:
    """Names offered in the scorer dropdown: the ImageReward checkpoints, then the baseline scores."""
    if RM is None:
        return [DEFAULT_SCORER]
    try:
        return list(RM.available_models()) + [s for s in RM.available_scores() if s not in RM.available_models()]
    except Exception as err:  # a broken optional baseline must not hide the script
        logger.warning("ImageReward: could not list scorers (%s)", err)
        return list(RM.available_models()) + list(BUILTIN_SCORES)


def _device() -> Any:
    try:
        from modules import devices

        return devices.device
    except (ImportError, AttributeError):
        return getattr(shared, "device", None)


def load_scorer(name: str) -> Any:
    """The loaded scorer for ``name`` (anything ``RM.load_scorer`` accepts: a registered model or score, a
    weighted mix ``NAME[:WEIGHT],...``, a local checkpoint path, a Hub id), reused from the previous run when
    the name is unchanged. An unknown name raises ``RM.UnknownModelError`` (a ``ValueError``)."""
    if RM is None:
        raise ImageRewardScriptError(_IMPORT_ERROR)
    name = (name or DEFAULT_SCORER).strip()
    cached = getattr(shared, _SHARED_MODEL, None)
    if cached is not None and getattr(shared, _SHARED_NAME, None) == name:
        return cached
    unload_model()
    logger.info("ImageReward: loading %s", name)
    model = RM.load_scorer(name, device=_device())  # the library's one resolver (names, mixes, paths, Hub ids)
    setattr(shared, _SHARED_MODEL, model)
    setattr(shared, _SHARED_NAME, name)
    return model


def unload_model() -> str:
    """Free the loaded scorer (and the CUDA cache). Safe to call when nothing is loaded."""
    model = getattr(shared, _SHARED_MODEL, None)
    setattr(shared, _SHARED_MODEL, None)
    setattr(shared, _SHARED_NAME, None)
    if model is None:
        return "No ImageReward model was loaded."
    del model
    gc.collect()
    try:
        from modules import devices

        devices.torch_gc()
    except (ImportError, AttributeError):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    logger.info("ImageReward: model unloaded")
    return "ImageReward model unloaded."


# ------------------------------------------------------------------------------------------- helpers
def parse_limit(text: Any) -> float:
    """The "Lower score limit" textbox value as a finite float, or a clear error."""
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ImageRewardScriptError(f"Lower score limit must be a number, e.g. 0 or -0.5; got {text!r}")
    return value


def add_to_infotext(infotext: str | None, key: str, value: str) -> str:
    """Append ``key: value`` to the parameters line of a WebUI infotext, so the WebUI parses it back."""
    if not infotext:
        return f"{key}: {value}"
    last_line = infotext.rsplit("\n", 1)[-1]
    if len(_PARAM_RE.findall(last_line)) >= 3:
        return f"{infotext}, {key}: {value}"
    return f"{infotext}\n{key}: {value}"


def _score_key(model: Any) -> str:
    label = re.sub(r"[^\w ]+", " ", str(getattr(model, "name", "") or "ImageReward")).strip() or "ImageReward"
    return f"{label} Score"


def keep_order(scores: Sequence[float], limit: float | None, sort_by_score: bool, higher_is_better: bool = True
               ) -> list[int]:
    """Indices of the samples to show: those at least as good as ``limit`` (all when None), best first when
    ``sort_by_score`` (stable: ties keep generation order), else in generation order."""
    sign = 1.0 if higher_is_better else -1.0
    order = [i for i in range(len(scores)) if limit is None or sign * scores[i] >= sign * limit]
    if sort_by_score:
        order.sort(key=lambda i: sign * scores[i], reverse=True)
    return order


def script_arguments(args: Sequence[Any], why_missing: str | None = None) -> tuple[bool, Any, bool, str]:
    """``(filter_out_low_scores, lower_score_limit, sort_by_score, scorer_name)`` from the values the WebUI passes
    to ``run``: those of the 4 controls ``Script.ui`` returns, in order. The original plugin's 2 arguments
    (filter, limit) are accepted, with a warning, and the defaults for the rest (sort on, ImageReward-v1.0).

    Fewer than 2 values means the WebUI did not register the script's controls (``ui`` failed in the host, see its
    log for "Error calling: .../image_reward.py/ui"), so the choices made in the UI or sent as the API's
    ``script_args`` cannot reach the script: that raises ``ImageRewardScriptError`` rather than running with
    defaults the user did not choose, as does a value of the wrong type (the API's ``script_args`` too short,
    so that the WebUI filled the rest from the next script's controls). ``why_missing``, when the caller knows
    why values are missing (an API request sent while the WebUI was still starting), replaces that guess."""
    names = ", ".join(SCRIPT_ARGS)
    if why_missing or len(args) < 2 or len(args) > len(SCRIPT_ARGS):
        message = (f"ImageReward script: the WebUI passed {len(args)} values to run(), expected {len(SCRIPT_ARGS)} "
                   f"({names}). ")
        if why_missing:
            message += why_missing
        elif len(args) < 2:
            message += ("Its UI controls were not registered, so the settings chosen cannot reach the script: "
                        "look for 'Error calling' or 'Error creating UI' with image_reward.py in the WebUI's log.")
        logger.error(message)
        raise ImageRewardScriptError(message)
    if len(args) < len(SCRIPT_ARGS):
        logger.warning("ImageReward script: %d of its %d arguments given (%s); the rest take their defaults "
                       "(sort by score, scorer %s)", len(args), len(SCRIPT_ARGS), names, DEFAULT_SCORER)
    filter_out, limit, sort, scorer = (*args, *SCRIPT_DEFAULTS[len(args):])
    checks = ((0, filter_out, (bool,), "true or false"), (2, sort, (bool,), "true or false"),
              (3, scorer, (str, type(None)), "scorer name or checkpoint path"))
    for position, value, kinds, expected in checks:
        if not isinstance(value, kinds):
            raise ImageRewardScriptError(
                f"ImageReward script argument {position} ({SCRIPT_ARGS[position]}) must be a {expected}, got "
                f"{value!r}: the API's script_args are [{names}], e.g. [false, \"0\", true, \"{DEFAULT_SCORER}\"]")
    return filter_out, limit, sort, scorer or DEFAULT_SCORER


def save_copy(image: Any, *args: Any, **kwargs: Any) -> None:
    """``images.save_image(image, ...)`` on a copy of ``image``: a host may change the image it saves in place
    (Forge's default *Stealth infotext = Alpha* ``putalpha``s it and hides the infotext in the alpha channel, see
    its ``modules/stealth_infotext.py``), and the gallery, the grid and the API must keep the pixels that were
    scored. The file the host wrote (``already_saved_as``, which the UI's gallery serves) is carried back."""
    saved = image.copy()
    images.save_image(saved, *args, **kwargs)
    path = getattr(saved, "already_saved_as", None)
    if path:
        image.already_saved_as = path


def _pick(values: Sequence[Any] | None, order: Sequence[int]) -> list[Any] | None:
    if values is None or len(values) < (max(order) + 1 if order else 0):
        return None
    return [values[i] for i in order]


# ------------------------------------------------------------------------------------------- the script
class Script(scripts.Script):
    """Selectable script: generate, then score, annotate, filter and sort the samples."""

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> bool:
        return True

    def ui(self, is_img2img: bool) -> list[Any]:
        with gr.Blocks():
            if _IMPORT_ERROR:
                gr.Markdown(f"**ImageReward is not installed.** {_IMPORT_ERROR}")
            gr.Markdown("Tip: the scorer is loaded on the first run, which takes a while; later runs reuse it.")
            with gr.Row():
                with gr.Column():
                    filter_out = gr.Checkbox(value=SCRIPT_DEFAULTS[0], label="Filter out images with low scores",
                                             elem_id=self.elem_id("filter"))
                    limit = gr.Textbox(value=SCRIPT_DEFAULTS[1], label="Lower score limit",
                                       elem_id=self.elem_id("limit"))
                with gr.Column():
                    sort = gr.Checkbox(value=SCRIPT_DEFAULTS[2], label="Sort images by score (best first)",
                                       elem_id=self.elem_id("sort"))
                    scorer = gr.Dropdown(choices=scorer_choices(), value=SCRIPT_DEFAULTS[3],
                                         allow_custom_value=True, label="Scorer (or path of a local ImageReward checkpoint)",
                                         elem_id=self.elem_id("scorer"))
            gr.Markdown("ImageReward-v1.0 takes about 1,600 MB of (GPU) memory while loaded.")
            status = gr.Markdown("")
            unload = gr.Button("Unload Model From Memory", elem_id=self.elem_id("unload"))
            unload.click(fn=unload_model, inputs=[], outputs=[status])
        return [filter_out, limit, sort, scorer]

    def run(self, p: StableDiffusionProcessing, *args: Any) -> Processed:
        """Generate with ``p``, then score every sample and return the annotated, filtered, sorted gallery.

        ``args`` are the values of the controls ``ui`` returned (see ``script_arguments``)."""
        if RM is None:
            raise ImageRewardScriptError(_IMPORT_ERROR)
        all_args, slots = len(getattr(p, "script_args", None) or ()), getattr(self, "args_to", None)
        early = None
        if isinstance(slots, int) and all_args < slots:  # the API's default script args were not built yet
            early = (f"The WebUI's script args hold {all_args} values, fewer than this script's slots "
                     f"{self.args_from}..{slots}: an API request sent before the WebUI finished starting gets none "
                     "of its script_args (wait for 'Startup time' in the WebUI's output, then retry).")
        filter_out_low_scores, lower_score_limit, sort_by_score, scorer_name = script_arguments(args, early)
        limit = parse_limit(lower_score_limit) if filter_out_low_scores else None
        model = load_scorer(scorer_name)  # before generating: a bad name fails fast
        if isinstance(p.prompt, str) and not p.prompt.strip() and not getattr(p, "styles", None) \
                and getattr(model, "uses_prompt", True):
            raise ImageRewardScriptError(
                f"The prompt is empty: {scorer_name} scores images against the prompt they were generated from "
                "(only prompt-free scorers such as Aesthetic need none)")

        do_not_save, do_not_save_grid = p.do_not_save_samples, p.do_not_save_grid
        save_samples = bool(getattr(shared.opts, "samples_save", True)) and not do_not_save
        p.do_not_save_samples = True  # saved below, once the score is in the infotext
        p.do_not_save_grid = True  # made below from the kept samples, in their final order
        try:
            proc = process_images(p)
        finally:
            p.do_not_save_samples, p.do_not_save_grid = do_not_save, do_not_save_grid
        return self._score(p, proc, model, limit, sort_by_score, save_samples)

    # the part after generation, split out for readability
    def _score(self, p: StableDiffusionProcessing, proc: Processed, model: Any, limit: float | None,
               sort_by_score: bool, save_samples: bool) -> Processed:
        first = int(getattr(proc, "index_of_first_image", 0) or 0)  # 0 unless another script added a grid
        all_images = list(proc.images)
        n_samples = len(all_images) - first
        prompts_all = list(getattr(proc, "all_prompts", None) or [])
        if prompts_all and len(prompts_all) < n_samples:  # images appended after the samples (e.g. by
            n_samples = len(prompts_all)                 # extensions) are passed through unscored
        samples = all_images[first:first + n_samples]
        infotexts = list(getattr(proc, "infotexts", None) or [])
        aligned = len(infotexts) == len(all_images)
        sample_texts = [(infotexts[first + i] if aligned else samples[i].info.get("parameters", "")) or ""
                        for i in range(n_samples)]
        if not samples:
            return proc
        prompts = prompts_all[:n_samples] if len(prompts_all) >= n_samples else [p.prompt] * n_samples

        try:
            scores = [float(s) for s in model.score_batch(prompts, samples)]
        except Exception:
            if save_samples:  # generation is never lost: save the samples unscored, then report the error
                self._save(p, proc, samples, sample_texts)
            raise
        key = _score_key(model)
        for index, (image, score) in enumerate(zip(samples, scores)):
            sample_texts[index] = add_to_infotext(sample_texts[index], key, f"{score:.4f}")
            image.info["score"] = score
            image.info["parameters"] = sample_texts[index]
        if save_samples:
            self._save(p, proc, samples, sample_texts)

        order = keep_order(scores, limit, sort_by_score, getattr(model, "higher_is_better", True))
        message = f"{key}s: " + ", ".join(f"{scores[i]:.4f}" for i in order)
        if limit is not None:
            dropped = n_samples - len(order)
            message = f"{message} ({dropped} of {n_samples} images below the limit {limit:g} filtered out)"
        if not order:
            message = (f"{key}: all {n_samples} images scored below the limit {limit:g}, so none is shown "
                       f"(scores: {', '.join(f'{s:.4f}' for s in scores)}; the samples were saved as usual)")
        logger.info("ImageReward: %s", message)
        p.comment(message)  # the WebUI shows p.comments under the gallery; Processed(comments=...) is ignored

        kept = [samples[i] for i in order]
        kept_texts = [sample_texts[i] for i in order]
        seeds = _pick(getattr(proc, "all_seeds", None), order)
        prompts_kept = _pick(prompts_all, order)
        negatives_kept = _pick(getattr(proc, "all_negative_prompts", None), order)
        grid, grid_text = self._grid(p, kept, seeds, prompts_kept)
        extras = all_images[first + n_samples:]
        extra_texts = infotexts[first + n_samples:] if aligned else [x.info.get("parameters", "") for x in extras]
        out_images = grid + kept + (extras if kept else [])
        out_texts = grid_text + kept_texts + (extra_texts if kept else [])
        if not out_images:  # the API and the UI show infotexts[0] / info: say why there is nothing
            out_texts = [message]
        return Processed(
            p,
            images_list=out_images,
            seed=seeds[0] if seeds else proc.seed,
            info=out_texts[0],
            subseed=getattr(proc, "subseed", None),
            all_prompts=prompts_kept or None,
            all_negative_prompts=negatives_kept or None,
            all_seeds=seeds or None,
            all_subseeds=_pick(getattr(proc, "all_subseeds", None), order) or None,
            index_of_first_image=len(grid),
            infotexts=out_texts,
        )

    @staticmethod
    def _grid(p: StableDiffusionProcessing, kept: list[Any], seeds: list[Any] | None,
              prompts: list[str] | None) -> tuple[list[Any], list[str]]:
        """The grid of the kept samples in their final order, made and saved as ``process_images`` would have
        (``return_grid`` / ``grid_save`` / ``grid_only_if_multiple``); ``([], [])`` when there is none."""
        opts = shared.opts
        wanted = getattr(opts, "return_grid", False) or getattr(opts, "grid_save", False)
        too_few = len(kept) < 2 and getattr(opts, "grid_only_if_multiple", True)
        if p.do_not_save_grid or not wanted or too_few or not kept:
            return [], []
        grid = images.image_grid(kept, p.batch_size)
        seeds = seeds or [getattr(p, "seed", -1)] * len(kept)
        prompts = prompts or [p.prompt] * len(kept)
        text = create_infotext(p, prompts, seeds, seeds, use_main_prompt=True)
        if getattr(opts, "grid_save", False):
            save_copy(grid, p.outpath_grids, "grid", seeds[0], prompts[0], opts.grid_format, info=text,
                      short_filename=not getattr(opts, "grid_extended_filename", False), p=p, grid=True)
        if not getattr(opts, "return_grid", False):
            return [], []
        if getattr(opts, "enable_pnginfo", True):
            grid.info["parameters"] = text
        return [grid], [text]

    @staticmethod
    def _save(p: StableDiffusionProcessing, proc: Processed, samples: list[Any], texts: list[str]) -> None:
        """Save each sample as the WebUI would have, with the score in its PNG info."""
        seeds = list(getattr(proc, "all_seeds", None) or [])
        prompts = list(getattr(proc, "all_prompts", None) or [])
        for index, (image, text) in enumerate(zip(samples, texts)):
            save_copy(image, p.outpath_samples, "",
                      seeds[index] if index < len(seeds) else proc.seed,
                      prompts[index] if index < len(prompts) else p.prompt,
                      shared.opts.samples_format, info=text, p=p)
