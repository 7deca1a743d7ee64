"""A minimal stand-in for the AUTOMATIC1111 WebUI (``modules.*``), its gradio, and ComfyUI's ``folder_paths``,
so plugins can be imported and run end to end in tests without either host.

It follows ../shared/spec/diffusers-webui.md section 8: the same module and function names and signatures,
the same infotext format and PNG ``parameters`` chunk, the hook order of ``process_images`` and a fake
sampler (deterministic ``torch.rand`` per seed). Install with :func:`install_webui` / :func:`install_comfyui`
from a test using ``monkeypatch``, so every fake module is removed again afterwards.
``install_webui(..., host="forge")`` adds what SD WebUI Forge f2.0.1 does differently to a script: its default
*Stealth infotext = Alpha* changes the image handed to ``images.save_image`` in place (``putalpha`` + the infotext
in the alpha channel's lowest bit, ``modules/stealth_infotext.py``), and its ``images.image_grid`` makes RGBA grids.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ImageReward.preprocess import PreprocessConfig
from ImageReward.scorer import Scorer

SHIM_VERSION = "v1.10.1-shim"


# --------------------------------------------------------------------------------------------- gradio
class _Component:
    """Any gradio component: keeps its constructor arguments, event methods record their handlers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.value = kwargs.get("value", args[0] if args else None)
        for name in ("label", "elem_id", "choices", "minimum", "maximum", "step"):
            setattr(self, name, kwargs.get(name))
        self.visible = kwargs.get("visible", True)
        self.handlers: dict[str, list[dict[str, Any]]] = {}
        self._registry.append(self)

    _registry: list = []

    def _event(self, event: str) -> Callable[..., "_Component"]:
        def register(fn: Callable[..., Any] | None = None, inputs: Any = None, outputs: Any = None, **kw: Any):
            self.handlers.setdefault(event, []).append({"fn": fn, "inputs": inputs, "outputs": outputs, **kw})
            return self
        return register

    def __getattr__(self, name: str) -> Any:
        if name in ("click", "change", "input", "submit", "select", "blur", "release", "upload"):
            return self._event(name)
        raise AttributeError(name)

    def __enter__(self) -> "_Component":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _make_gradio() -> types.ModuleType:
    gr = types.ModuleType("gradio")
    gr.__version__ = "3.41.2"
    gr.created = []  # every component built, in order (tests find buttons and their handlers here)
    for name in ("Checkbox", "Slider", "Dropdown", "Textbox", "Number", "Radio", "Markdown", "HTML", "Button",
                 "Image", "Gallery", "Row", "Column", "Group", "Accordion", "Tab", "Tabs", "Blocks", "Box"):
        setattr(gr, name, type(name, (_Component,), {"_registry": gr.created}))
    gr.update = lambda **kw: {"__type__": "update", **kw}

    class Error(Exception):
        pass

    gr.Error = Error
    return gr


# --------------------------------------------------------------------------------------------- modules.*
class Options:
    """``shared.opts``: attribute access over ``.data``, ``add_option``, ``onchange``."""

    def __init__(self, data: dict[str, Any]) -> None:
        object.__setattr__(self, "data", dict(data))
        object.__setattr__(self, "data_labels", {})

    def __getattr__(self, key: str) -> Any:
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def add_option(self, key: str, info: Any) -> None:
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def onchange(self, key: str, func: Callable[[], None], call: bool = True) -> None:
        if call:
            func()


class OptionInfo:
    def __init__(self, default: Any = None, label: str = "", component: Any = None, component_args: Any = None,
                 onchange: Any = None, section: Any = None, **kw: Any) -> None:
        self.default, self.label, self.component, self.section = default, label, component, section

    def info(self, _text: str) -> "OptionInfo":
        return self

    def needs_reload_ui(self) -> "OptionInfo":
        return self


RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(text: Any) -> Any:
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(text: str) -> dict[str, Any]:
    """The WebUI's parser: prompt lines, ``Negative prompt:`` lines, then one ``key: value, ...`` line."""
    res: dict[str, Any] = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for key, value in RE_PARAM.findall(lastline):
        if value and value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        match = RE_IMAGESIZE.match(value)
        if match is not None:
            res[f"{key}-1"], res[f"{key}-2"] = match.group(1), match.group(2)
        else:
            res[key] = value
    return res


class Script:
    """``modules.scripts.Script`` with every hook a no-op."""

    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    name = None
    section = None
    controls = None
    infotext_fields = None
    paste_field_names = None

    def title(self) -> str:
        raise NotImplementedError

    def show(self, is_img2img: bool) -> Any:
        return True

    def ui(self, is_img2img: bool) -> Any:
        return None

    def run(self, p: Any, *args: Any) -> Any:
        return None

    def elem_id(self, item_id: str) -> str:
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{self.tabname or 'txt2img'}_{title}_{item_id}"

    def __getattr__(self, name: str) -> Any:  # setup, before_process, process, postprocess_image, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class ScriptRunner:
    """``initialize_scripts`` + ``create_script_ui`` + ``run``, for the selectable and always-on scripts given."""

    def __init__(self, classes: list[type], is_img2img: bool = False, always_visible: Any = None) -> None:
        self.scripts, self.selectable_scripts, self.alwayson_scripts = [], [], []
        self.inputs: list[Any] = [None]  # slot 0: the "Script" dropdown
        for cls in classes:
            script = cls()
            script.is_img2img, script.is_txt2img = is_img2img, not is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(is_img2img)
            if visibility is always_visible:
                script.alwayson = True
                self.alwayson_scripts.append(script)
            elif visibility:
                self.selectable_scripts.append(script)
            self.scripts.append(script)
        self.ui_errors: list[str] = []  # the "Error calling: <file>/ui" reports the WebUI prints
        for script in self.alwayson_scripts + self.selectable_scripts:
            script.name = script.title().lower()
            script.args_from = script.args_to = len(self.inputs)  # as create_script_ui, before calling ui()
            try:  # modules.scripts.wrap_call: a failing ui() is reported and leaves the script without controls
                controls = script.ui(is_img2img)
            except Exception as err:
                self.ui_errors.append(f"Error calling: {script.filename or type(script).__name__}/ui: {err!r}")
                controls = None
            script.controls = controls
            if controls is None:
                continue
            self.inputs.extend(controls)
            script.args_to = len(self.inputs)

    def default_args(self) -> list[Any]:
        return [0] + [component.value for component in self.inputs[1:]]

    def args_for(self, title: str, *values: Any) -> list[Any]:
        """Script args selecting the script ``title`` with its first controls set to ``values``."""
        args = self.default_args()
        index = [s.title() for s in self.selectable_scripts].index(title)
        script = self.selectable_scripts[index]
        args[0] = index + 1
        for offset, value in enumerate(values):
            args[script.args_from + offset] = value
        return args

    def api_args(self, title: str, request_script_args: list[Any], *, api_ready: bool = True) -> list[Any]:
        """What ``POST /sdapi/v1/txt2img`` passes to ``run`` for ``script_name=title``: the API's
        ``init_script_args``, which puts the request's ``script_args`` in place of the script's slice of the
        default args (``args[args_from:args_to] = script_args``, so a list of another length shifts the scripts
        after it, and a script without controls gets none of them). ``api_ready=False``: a request answered
        while ``Api.__init__`` was still building its default args (the routes are live before), which start
        from ``[]``."""
        args = self.default_args() if api_ready else []
        index = [s.title().lower() for s in self.selectable_scripts].index(title.lower())
        script = self.selectable_scripts[index]
        args[script.args_from:script.args_to] = list(request_script_args)
        args[0] = index + 1
        return args

    def _each(self, hook: str, p: Any, *extra: Any, **kw: Any) -> None:
        for script in self.alwayson_scripts:
            getattr(script, hook)(p, *extra, *p.script_args[script.args_from:script.args_to], **kw)

    def setup_scrips(self, p: Any, *, is_ui: bool = True) -> None:
        self._each("setup", p)

    def run(self, p: Any, *args: Any) -> Any:
        index = args[0]
        if index == 0:
            return None
        script = self.selectable_scripts[index - 1]
        processed = script.run(p, *args[script.args_from:script.args_to])
        _modules["modules.shared"].total_tqdm.clear()
        return processed


@dataclass
class StableDiffusionProcessing:
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str = "Euler a"
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 32
    height: int = 32
    styles: list | None = None
    outpath_samples: str | None = None
    outpath_grids: str | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = field(default_factory=dict)
    override_settings: dict = field(default_factory=dict)
    denoising_strength: float | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None

    def __post_init__(self) -> None:
        self.all_prompts = self.all_negative_prompts = self.all_seeds = self.all_subseeds = None
        self.prompts = self.negative_prompts = self.seeds = self.subseeds = None
        self.iteration = 0
        self.batch_index = 0
        self.sd_model_name = "tiny-sd"
        self.sd_model_hash = "0123abcd"
        self.scripts = None
        self.script_args: list[Any] = []
        self.comments: dict[str, int] = {}

    def comment(self, text: str) -> None:
        self.comments[text] = 1

    @property
    def sd_model(self) -> Any:
        return _modules["modules.shared"].sd_model


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr = False
    hr_scale = 2.0


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_images: list = []
    mask = None
    inpainting_fill = 0


def create_infotext(p: Any, all_prompts: list[str], all_seeds: list[int], all_subseeds: list[int],
                    comments: Any = None, iteration: int = 0, position_in_batch: int = 0,
                    use_main_prompt: bool = False, index: int | None = None,
                    all_negative_prompts: list[str] | None = None) -> str:
    if index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts
    params = {
        "Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": all_seeds[index],
        "Size": f"{p.width}x{p.height}", "Model hash": p.sd_model_hash, "Model": p.sd_model_name,
        **p.extra_generation_params, "Version": SHIM_VERSION,
    }
    params_text = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    prompt_text = p.prompt if use_main_prompt else all_prompts[index]
    negative = all_negative_prompts[index] if all_negative_prompts else ""
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt_text}{negative_text}\n{params_text}".strip()


class Processed:
    """v1.10.1's signature exactly: no ``extra_images_list``, and ``comments=`` is accepted but **ignored** (the
    real class reads ``p.comments``, filled by ``p.comment(text)``)."""

    def __init__(self, p: Any, images_list: list, seed: int = -1, info: str = "", subseed: Any = None,
                 all_prompts: Any = None, all_negative_prompts: Any = None, all_seeds: Any = None,
                 all_subseeds: Any = None, index_of_first_image: int = 0, infotexts: Any = None,
                 comments: str = "") -> None:
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.subseed = subseed
        self.info = info
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.width, self.height = p.width, p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale, self.steps, self.batch_size = p.cfg_scale, p.steps, p.batch_size
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_negative_prompts = all_negative_prompts or p.all_negative_prompts or [self.negative_prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.all_subseeds = all_subseeds or p.all_subseeds or [self.subseed]
        self.infotexts = infotexts or [info] * len(images_list)

    def js(self) -> str:
        return json.dumps({
            "prompt": self.all_prompts[0], "all_prompts": self.all_prompts, "seed": self.seed,
            "all_seeds": self.all_seeds, "index_of_first_image": self.index_of_first_image,
            "infotexts": self.infotexts, "info": self.info,
        })

    def infotext(self, p: Any, index: int) -> str:
        return create_infotext(p, self.all_prompts, self.all_seeds, self.all_subseeds, comments=[],
                               position_in_batch=index % self.batch_size, iteration=index // self.batch_size)


def fix_seed(p: Any) -> None:
    p.seed = get_fixed_seed(p.seed)
    p.subseed = get_fixed_seed(p.subseed)


def get_fixed_seed(seed: Any) -> int:
    if seed in ("", None) or int(seed) == -1:
        return int(np.random.randint(0, 2**31 - 1))
    return int(seed)


def fake_sample(seed: int, width: int, height: int) -> torch.Tensor:
    """The fake sampler + VAE: a deterministic ``[3, H, W]`` image in 0..1 per seed."""
    generator = torch.Generator().manual_seed(int(seed))
    colour = torch.rand(3, 1, 1, generator=generator)  # per-seed tint, so images (and scores) differ clearly
    return 0.6 * colour + 0.4 * torch.rand(3, height, width, generator=generator)


def process_images(p: Any) -> Processed:
    """``process_images_inner`` with a fake sampler, in the WebUI's hook order; saves as the WebUI does."""
    shared, images = _modules["modules.shared"], _modules["modules.images"]
    opts = shared.opts
    fix_seed(p)
    n = p.batch_size * p.n_iter
    p.all_prompts = [p.prompt] * n
    p.all_negative_prompts = [p.negative_prompt] * n
    p.all_seeds = [p.seed + i for i in range(n)]
    p.all_subseeds = [p.subseed + i for i in range(n)]
    runner = p.scripts
    if runner is not None:
        runner._each("process", p)
    output_images, infotexts = [], []

    def infotext(index: int = 0, use_main_prompt: bool = False) -> str:
        return create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, use_main_prompt=use_main_prompt,
                               index=index)

    for iteration in range(p.n_iter):
        p.iteration = iteration
        window = slice(iteration * p.batch_size, (iteration + 1) * p.batch_size)
        p.prompts, p.seeds = p.all_prompts[window], p.all_seeds[window]
        p.negative_prompts, p.subseeds = p.all_negative_prompts[window], p.all_subseeds[window]
        if shared.state.interrupted:
            break
        batch = torch.stack([fake_sample(seed, p.width, p.height) for seed in p.seeds])
        if runner is not None:
            runner._each("postprocess_batch", p, images=batch, batch_number=iteration)
        for i, x_sample in enumerate(batch):
            p.batch_index = i
            array = (255.0 * x_sample.permute(1, 2, 0).numpy()).astype(np.uint8)
            image = Image.fromarray(array)
            index = iteration * p.batch_size + i
            text = infotext(index)
            infotexts.append(text)
            if opts.samples_save and not p.do_not_save_samples:
                images.save_image(image, p.outpath_samples, "", p.seeds[i], p.prompts[i], opts.samples_format,
                                  info=text, p=p)
            if opts.enable_pnginfo:
                image.info["parameters"] = text
            output_images.append(image)

    if not infotexts:  # v1.10.1: an interrupted run still returns one infotext
        infotexts.append(infotext(0))
    index_of_first_image = 0
    unwanted_grid_because_of_img_count = len(output_images) < 2 and opts.grid_only_if_multiple
    if (opts.return_grid or opts.grid_save) and not p.do_not_save_grid and not unwanted_grid_because_of_img_count:
        grid = images.image_grid(output_images, p.batch_size)
        text = infotext(use_main_prompt=True)
        if opts.return_grid:
            infotexts.insert(0, text)
            if opts.enable_pnginfo:
                grid.info["parameters"] = text
            output_images.insert(0, grid)
            index_of_first_image = 1
        if opts.grid_save:
            images.save_image(grid, p.outpath_grids, "grid", p.all_seeds[0], p.all_prompts[0], opts.grid_format,
                              info=text, p=p, grid=True)
    return Processed(p, images_list=output_images, seed=p.all_seeds[0], info=infotexts[0] if infotexts else "",
                     subseed=p.all_subseeds[0], index_of_first_image=index_of_first_image, infotexts=infotexts)


class ImageSaveParams:
    def __init__(self, image: Any, p: Any, filename: str, pnginfo: dict) -> None:
        self.image, self.p, self.filename, self.pnginfo = image, p, filename, pnginfo


def save_image(image: Any, path: str, basename: str, seed: Any = None, prompt: Any = None, extension: str = "png",
               info: Any = None, short_filename: bool = False, no_prompt: bool = False, grid: bool = False,
               pnginfo_section_name: str = "parameters", p: Any = None, existing_info: Any = None,
               forced_filename: Any = None, suffix: str = "", save_to_dirs: Any = None) -> tuple[str, None]:
    """Write ``image`` with its infotext in the PNG ``parameters`` chunk; records every save in ``SAVED``."""
    shared, callbacks = _modules["modules.shared"], _modules["modules.script_callbacks"]
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    counter = len(list(folder.iterdir()))
    stem = forced_filename or f"{counter:05}-{seed}" + (f"-{basename}" if basename else "") + suffix
    fullfn = str(folder / f"{stem}.{extension}")
    pnginfo = dict(existing_info or {})
    pnginfo[pnginfo_section_name] = info
    params = ImageSaveParams(image, p, fullfn, pnginfo)
    if shared.opts.enable_pnginfo:  # Forge only: A1111's opts have no stealth_pnginfo_option
        add_stealth_pnginfo(params, shared.opts.data.get("stealth_pnginfo_option", "None"))
    callbacks.fire("before_image_saved", params)
    chunk = PngImagePlugin.PngInfo()
    if shared.opts.enable_pnginfo:
        for key, value in params.pnginfo.items():
            if value is not None:
                chunk.add_text(key, str(value))
    params.image.save(params.filename, pnginfo=chunk)
    params.image.already_saved_as = params.filename  # what the UI's gallery serves (ui_tempdir.save_pil_to_file)
    SAVED.append({"filename": params.filename, "info": info, "grid": grid, "seed": seed})
    callbacks.fire("image_saved", params)
    return params.filename, None


_STEALTH_SIGNATURE = b"stealth_pngcomp"  # Forge: Alpha mode, gzip-compressed


def add_stealth_pnginfo(params: ImageSaveParams, option: str) -> None:
    """Forge's ``stealth_infotext.add_stealth_pnginfo`` for its default option ``"Alpha"`` (``"None"``: nothing):
    ``params.image.putalpha(255)`` **in place**, then the signature, the 32-bit bit count and the gzip-compressed
    ``parameters`` in the lowest bit of the alpha channel, pixels taken column by column."""
    if option in (None, "None", ""):
        return
    if option != "Alpha":
        raise NotImplementedError(f"stealth infotext mode {option!r}: the shim has Forge's default, Alpha")
    if not params.filename.endswith(".png") or params.pnginfo is None or "parameters" not in params.pnginfo:
        return
    payload = gzip.compress(str(params.pnginfo["parameters"]).encode("utf-8"))
    length = np.array([int(b) for b in format(len(payload) * 8, "032b")], dtype=np.uint8)
    bits = np.concatenate([np.unpackbits(np.frombuffer(_STEALTH_SIGNATURE, np.uint8)), length,
                           np.unpackbits(np.frombuffer(payload, np.uint8))])
    image = params.image
    image.putalpha(255)
    width, height = image.size
    alpha = np.full(width * height, 255, dtype=np.uint8)  # column by column: x outer, y inner
    used = min(len(bits), alpha.size)
    alpha[:used] = 254 | bits[:used]
    image.putalpha(Image.fromarray(np.ascontiguousarray(alpha.reshape(width, height).T)))


def read_stealth_infotext(image: Image.Image) -> str | None:
    """The infotext Forge hid with :func:`add_stealth_pnginfo` (``stealth_infotext.read_info_from_image_stealth``,
    Alpha mode), or None when the image carries none."""
    if image.mode != "RGBA":
        return None
    bits = (np.asarray(image.getchannel("A")).T.reshape(-1) & 1).astype(np.uint8)
    head = len(_STEALTH_SIGNATURE) * 8
    if np.packbits(bits[:head]).tobytes() != _STEALTH_SIGNATURE:
        return None
    length = int("".join(str(b) for b in bits[head:head + 32]), 2)
    return gzip.decompress(np.packbits(bits[head + 32:head + 32 + length]).tobytes()).decode("utf-8")


SAVED: list[dict[str, Any]] = []


def read_info_from_image(image: Image.Image) -> tuple[str | None, dict]:
    items = dict(image.info or {})
    geninfo = items.pop("parameters", None)
    return geninfo, items


def image_grid(imgs: list[Image.Image], batch_size: int = 1, rows: int | None = None, *, mode: str = "RGB"
               ) -> Image.Image:
    """``images.image_grid``: an ``RGB`` grid in A1111, ``RGBA`` in Forge (``host="forge"`` installs
    ``mode="RGBA"``: its grids take ``grid_background_color`` with alpha)."""
    if rows is None:
        rows = max(1, round(math.sqrt(len(imgs))))
    cols = math.ceil(len(imgs) / rows)
    width, height = imgs[0].size
    grid = Image.new(mode, (cols * width, rows * height), color="black")
    for i, img in enumerate(imgs):
        grid.paste(img, box=(i % cols * width, i // cols * height))
    return grid


# ``modules/safe.py``: at import the WebUI replaces ``torch.load`` by a checker that refuses any zip member name
# outside this pattern (current torch writes ``.format_version`` and ``.storage_alignment``) and then, instead of
# raising, prints a report and returns None.
_SAFE_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")


def _make_safe_load(unsafe_torch_load: Callable[..., Any]) -> Callable[..., Any]:
    import zipfile

    def load(filename: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with zipfile.ZipFile(filename) as archive:
                bad = [n for n in archive.namelist() if not _SAFE_ZIP_NAMES.match(n)]
        except zipfile.BadZipFile:
            bad = []
        if bad:
            print(f"Error verifying pickled file from {filename}: bad file inside {filename}: {bad[0]}")
            return None
        return unsafe_torch_load(filename, *args, **kwargs)

    return load


_modules: dict[str, types.ModuleType] = {}
CALLBACK_NAMES = ("ui_settings", "ui_tabs", "app_started", "before_image_saved", "image_saved", "script_unloaded",
                  "model_loaded", "infotext_pasted")


def _build_modules(outdir: Path) -> dict[str, types.ModuleType]:
    def module(name: str, **attrs: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    package = module("modules", __path__=[])
    shared = module(
        "modules.shared",
        opts=Options({"enable_pnginfo": True, "samples_format": "png", "grid_format": "png", "samples_save": True,
                      "save_txt": False, "outdir_samples": str(outdir / "samples"), "return_grid": False,
                      "grid_save": False, "grid_only_if_multiple": True, "grid_extended_filename": False,
                      "CLIP_stop_at_last_layers": 1}),
        OptionInfo=OptionInfo,
        state=types.SimpleNamespace(interrupted=False, skipped=False, job="", job_count=0, nextjob=lambda: None),
        cmd_opts=types.SimpleNamespace(),
        sd_model=types.SimpleNamespace(
            sd_model_hash="0123abcd", is_sdxl=False,
            sd_checkpoint_info=types.SimpleNamespace(name_for_extra="tiny-sd",
                                                     filename=str(outdir / "tiny-sd.safetensors"))),
        device=torch.device("cpu"),
        total_tqdm=types.SimpleNamespace(clear=lambda: None),
    )
    gc_calls: list[int] = []
    devices = module("modules.devices", device=torch.device("cpu"), cpu=torch.device("cpu"),
                     torch_gc=lambda: gc_calls.append(1), gc_calls=gc_calls)
    registry: dict[str, list[Callable[..., Any]]] = {name: [] for name in CALLBACK_NAMES}

    def fire(name: str, *args: Any) -> None:
        for fn in registry[name]:
            fn(*args)

    callbacks = module("modules.script_callbacks", callbacks=registry, fire=fire, ImageSaveParams=ImageSaveParams,
                       **{f"on_{name}": (lambda n: lambda fn: registry[n].append(fn))(name)
                          for name in CALLBACK_NAMES})
    scripts = module("modules.scripts", Script=Script, AlwaysVisible=object(), ScriptRunner=ScriptRunner,
                     basedir=lambda: str(outdir),
                     PostprocessImageArgs=type("PostprocessImageArgs", (), {"__init__": lambda s, image: setattr(
                         s, "image", image)}),
                     PostprocessBatchListArgs=type("PostprocessBatchListArgs", (), {"__init__": lambda s, images:
                                                   setattr(s, "images", images)}),
                     PostSampleArgs=type("PostSampleArgs", (), {"__init__": lambda s, samples: setattr(
                         s, "samples", samples)}))
    processing = module(
        "modules.processing", StableDiffusionProcessing=StableDiffusionProcessing,
        StableDiffusionProcessingTxt2Img=StableDiffusionProcessingTxt2Img,
        StableDiffusionProcessingImg2Img=StableDiffusionProcessingImg2Img, Processed=Processed,
        create_infotext=create_infotext, process_images=process_images, fix_seed=fix_seed,
        get_fixed_seed=get_fixed_seed)
    images = module("modules.images", save_image=save_image, read_info_from_image=read_info_from_image,
                    image_grid=image_grid, SAVED=SAVED)
    safe = module("modules.safe", unsafe_torch_load=torch.load, load=_make_safe_load(torch.load))
    infotext_utils = module("modules.infotext_utils", quote=quote, unquote=unquote,
                            parse_generation_parameters=parse_generation_parameters,
                            PasteField=lambda component, target, api=None: (component, target))
    mods = {"modules": package, "modules.shared": shared, "modules.devices": devices,
            "modules.script_callbacks": callbacks, "modules.scripts": scripts, "modules.processing": processing,
            "modules.images": images, "modules.infotext_utils": infotext_utils, "modules.safe": safe,
            "modules.generation_parameters_copypaste": infotext_utils}
    for name, mod in mods.items():
        if name != "modules":
            setattr(package, name.split(".", 1)[1], mod)
    return mods


def install_webui(monkeypatch: Any, outdir: str | os.PathLike, host: str = "a1111") -> types.SimpleNamespace:
    """Put fake ``gradio`` and ``modules.*`` into ``sys.modules`` and the WebUI's ``torch.load`` patch into
    ``torch`` (all undone by ``monkeypatch``). ``host="forge"``: SD WebUI Forge's defaults where they differ for a
    script (``opts.stealth_pnginfo_option = "Alpha"``, see :func:`add_stealth_pnginfo`).
    Returns a namespace of the fake modules: ``shim.shared``, ``shim.processing``, ..."""
    import sys

    if host not in ("a1111", "forge"):
        raise ValueError(f"host must be 'a1111' or 'forge', got {host!r}")
    SAVED.clear()
    mods = _build_modules(Path(outdir))
    if host == "forge":
        mods["modules.shared"].opts.stealth_pnginfo_option = "Alpha"
        mods["modules.images"].image_grid = lambda *args, **kwargs: image_grid(*args, **kwargs, mode="RGBA")
    mods["gradio"] = _make_gradio()
    _modules.clear()
    _modules.update(mods)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch, "load", mods["modules.safe"].load)  # as the real WebUI does at start-up
    return types.SimpleNamespace(**{name.rsplit(".", 1)[-1]: mod for name, mod in mods.items()}, saved=SAVED,
                                 AlwaysVisible=mods["modules.scripts"].AlwaysVisible)


def install_comfyui(monkeypatch: Any, root: str | os.PathLike) -> types.ModuleType:
    """A fake ComfyUI ``folder_paths`` rooted at ``root`` (output/, temp/, input/, models/)."""
    import sys

    root = Path(root)
    dirs = {name: root / name for name in ("output", "temp", "input", "models")}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(dirs["models"])
    folder_paths.folder_names_and_paths = {"checkpoints": ([str(dirs["models"] / "checkpoints")], {".safetensors"})}
    folder_paths.get_output_directory = lambda: str(dirs["output"])
    folder_paths.get_temp_directory = lambda: str(dirs["temp"])
    folder_paths.get_input_directory = lambda: str(dirs["input"])

    def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
        paths, _ = folder_paths.folder_names_and_paths.setdefault(folder_name, ([], set()))
        if full_folder_path in paths:
            paths.remove(full_folder_path)
        paths.insert(0 if is_default else len(paths), full_folder_path)

    def get_folder_paths(folder_name: str) -> list[str]:
        return folder_paths.folder_names_and_paths[folder_name][0][:]  # KeyError when unknown, as ComfyUI

    def get_filename_list(folder_name: str) -> list[str]:
        """Files under every registered folder, recursively, as relative paths with '/' (ComfyUI's listing)."""
        paths, extensions = folder_paths.folder_names_and_paths[folder_name]
        found = set()
        for base in paths:
            for dirpath, _, files in os.walk(base):
                for name in files:
                    rel = os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/")
                    if not extensions or os.path.splitext(name)[1].lower() in extensions:
                        found.add(rel)
        return sorted(found)

    def get_full_path(folder_name: str, filename: str) -> str | None:
        for base in folder_paths.folder_names_and_paths[folder_name][0]:
            if os.path.isfile(os.path.join(base, filename)):
                return os.path.join(base, filename)
        return None

    folder_paths.add_model_folder_path = add_model_folder_path
    folder_paths.get_folder_paths = get_folder_paths
    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = get_full_path

    def get_save_image_path(prefix: str, output_dir: str, w: int = 0, h: int = 0):
        subfolder, filename = os.path.split(prefix)
        folder = os.path.join(output_dir, subfolder)
        os.makedirs(folder, exist_ok=True)
        return folder, filename, len(os.listdir(folder)) + 1, subfolder, prefix

    folder_paths.get_save_image_path = get_save_image_path
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    return folder_paths


def save_tiny_image_reward(directory: str | os.PathLike) -> Path:
    """A tiny ImageReward saved with ``save_pretrained``; its head is re-initialised with unit-gain weights so
    that different images get clearly different scores (the original's head init makes them all equal)."""
    from ImageReward import ImageReward
    from ImageReward.models.blip import BLIPConfig

    torch.manual_seed(0)
    model = ImageReward(BLIPConfig.tiny()).eval()
    with torch.no_grad():
        for param in model.mlp.parameters():
            if param.ndim == 2:
                torch.nn.init.normal_(param, std=param.shape[1] ** -0.5)
    return model.save_pretrained(directory)


# --------------------------------------------------------------------------------------------- ComfyUI
def install_comfy(monkeypatch: Any, device: str = "cpu") -> types.SimpleNamespace:
    """Fake ``comfy.utils.ProgressBar``, ``comfy.model_management`` (device, interrupt flag, loading and
    unloading of ``comfy.model_patcher.ModelPatcher``s) and ``comfy_execution.graph.ExecutionBlocker``."""
    import sys

    state = types.SimpleNamespace(interrupted=False, progress=[])

    class InterruptProcessingException(Exception):
        pass

    def throw_exception_if_processing_interrupted() -> None:
        if state.interrupted:
            state.interrupted = False
            raise InterruptProcessingException()

    class ProgressBar:
        def __init__(self, total: int) -> None:
            self.total, self.current = total, 0
            state.progress.append(self)

        def update(self, value: int) -> None:
            self.current += value

    state.loaded = []  # comfy.model_management.current_loaded_models: the patchers loaded on the device

    class ModelPatcher:
        """``comfy.model_patcher.ModelPatcher``: holds ``model``; moved by the model management below."""

        def __init__(self, model: Any, load_device: Any, offload_device: Any, size: int = 0,
                     weight_inplace_update: bool = False) -> None:
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            if getattr(model, "device", None) is None:
                model.device = offload_device  # as ComfyUI: the patcher writes ``model.device``

    def load_models_gpu(models: list, memory_required: int = 0, **kw: Any) -> None:
        for patcher in models:
            patcher.model.to(patcher.load_device)
            patcher.model.device = patcher.load_device  # ComfyUI sets it after moving (model_patcher.load)
            if patcher not in state.loaded:
                state.loaded.append(patcher)

    def unload_all_models() -> None:  # "Unload models": every loaded model back to its offload device
        for patcher in state.loaded:
            patcher.model.to(patcher.offload_device)
            patcher.model.device = patcher.offload_device
        state.loaded.clear()

    class ExecutionBlocker:
        def __init__(self, message: Any) -> None:
            self.message = message

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    management = types.ModuleType("comfy.model_management")
    management.get_torch_device = lambda: torch.device(device)
    management.text_encoder_offload_device = lambda: torch.device("cpu")
    management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    management.InterruptProcessingException = InterruptProcessingException
    management.load_models_gpu = load_models_gpu
    management.load_model_gpu = lambda model: load_models_gpu([model])
    management.unload_all_models = unload_all_models
    management.current_loaded_models = state.loaded
    patcher_module = types.ModuleType("comfy.model_patcher")
    patcher_module.ModelPatcher = ModelPatcher
    execution = types.ModuleType("comfy_execution")
    execution.__path__ = []
    graph = types.ModuleType("comfy_execution.graph")
    graph.ExecutionBlocker = ExecutionBlocker
    comfy.utils, comfy.model_management, comfy.model_patcher = utils, management, patcher_module
    execution.graph = graph
    for name, mod in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", management),
                      ("comfy.model_patcher", patcher_module), ("comfy_execution", execution),
                      ("comfy_execution.graph", graph)):
        monkeypatch.setitem(sys.modules, name, mod)
    state.ExecutionBlocker = ExecutionBlocker
    state.InterruptProcessingException = InterruptProcessingException
    return state


class NodeRegistry:
    """ComfyUI's custom-node loading (``nodes.load_custom_node``) and a one-node executor."""

    SOCKET_TYPES = {"IMAGE", "MASK", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING", "INT", "FLOAT", "STRING",
                    "BOOLEAN"}

    def __init__(self) -> None:
        self.NODE_CLASS_MAPPINGS: dict[str, type] = {}
        self.NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
        self.EXTENSION_WEB_DIRS: dict[str, str] = {}  # served as /extensions/<folder name>/

    def load_custom_node(self, module_path: str | os.PathLike) -> types.ModuleType:
        import importlib.util
        import sys

        module_path = os.fspath(module_path)
        sys_module_name = module_path.replace(".", "_x_")
        spec = importlib.util.spec_from_file_location(sys_module_name, os.path.join(module_path, "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[sys_module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[sys_module_name]
            raise
        for name, cls in module.NODE_CLASS_MAPPINGS.items():
            self.check_node_class(cls)
            self.NODE_CLASS_MAPPINGS[name] = cls
        self.NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
        if getattr(module, "WEB_DIRECTORY", None) is not None:  # as nodes.load_custom_node: an existing folder only
            web_dir = os.path.abspath(os.path.join(module_path, module.WEB_DIRECTORY))
            if os.path.isdir(web_dir):
                self.EXTENSION_WEB_DIRS[os.path.basename(module_path)] = web_dir
        return module

    def check_node_class(self, cls: type) -> None:
        """What ComfyUI relies on: INPUT_TYPES() layout, RETURN_TYPES, FUNCTION, CATEGORY."""
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec, spec
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (name, entry)
                kind = entry[0]
                assert isinstance(kind, list) or isinstance(kind, str), (name, kind)
                if isinstance(kind, list):
                    assert kind and entry[1].get("default", kind[0]) in kind, (name, entry)
        assert isinstance(cls.RETURN_TYPES, tuple)
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION)) and isinstance(cls.CATEGORY, str)

    def run(self, node_id: str, **inputs: Any) -> tuple:
        """Validate widget inputs as ComfyUI does, call the node, check the output arity."""
        cls = self.NODE_CLASS_MAPPINGS[node_id]
        spec = cls.INPUT_TYPES()
        for name, entry in spec["required"].items():
            assert name in inputs, f"{node_id}: required input {name!r} missing"
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                if name not in inputs:
                    continue
                kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
                value = inputs[name]
                if isinstance(kind, list) and value not in kind:
                    raise ValueError(f"{node_id}: value not in list: {name}: {value!r} not in {kind}")
                if kind in ("INT", "FLOAT") and ("min" in opts and value < opts["min"]
                                                 or "max" in opts and value > opts["max"]):
                    raise ValueError(f"{node_id}: {name} = {value} outside [{opts.get('min')}, {opts.get('max')}]")
        result = getattr(cls(), cls.FUNCTION)(**inputs)
        if isinstance(result, dict):
            assert getattr(cls, "OUTPUT_NODE", False) or "ui" not in result, "only output nodes return 'ui'"
            self.ui = result.get("ui")
            result = result["result"]
        assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES)
        return result


class Brightness(Scorer):
    """The mean pixel value: a scorer whose right answers are known without a model."""

    name = "Brightness"
    uses_prompt = False
    preprocess_config = PreprocessConfig(image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def __init__(self, higher_is_better: bool = True) -> None:
        super().__init__()
        self.higher_is_better = higher_is_better
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_images(self, pixel_values):
        return pixel_values.mean(dim=(1, 2, 3))

    def score_encoded(self, prompts, image_features):
        return image_features.float()
