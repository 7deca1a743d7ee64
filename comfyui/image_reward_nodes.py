"""ComfyUI nodes for ImageReward: load a scorer, score an IMAGE batch, rank/filter it, show scores as text.

Adapters only: every score comes from the installed ``ImageReward`` library (``score_batch``); these nodes
convert ComfyUI's ``IMAGE`` tensors (``[B, H, W, C]`` float in 0..1) and wire results between nodes.
Two custom socket types flow between them: ``IMAGE_REWARD_SCORER`` (a loaded ``ImageReward.Scorer``, inside
ComfyUI wrapped in a ``comfy.model_patcher.ModelPatcher`` so that "Unload models" moves it off the GPU like any
ComfyUI model) and ``IMAGE_REWARD_SCORES`` (a dict ``{"scores": [float, ...], "label": str,
"higher_is_better": bool}``).

Weights live in ComfyUI's ``models/image_reward/`` (registered with ``folder_paths``): the official files are
downloaded there on first use under their original names, and any ``.pt``/``.pth``/``.safetensors`` checkpoint
(or ``save_pretrained`` folder) put there appears in the loader's list.

What is scored is exactly what ``SaveImage`` writes (``clip(255 * x)`` truncated to uint8), so a score here
equals ``imagereward score`` on the saved PNG. ComfyUI's ``LoadImage`` drops the alpha channel and palette
of an input file: an RGBA or palette PNG scored via ``LoadImage`` can therefore differ from the CLI's score of
the same file (the library converts those modes itself).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# PyPI's "image-reward" is the original 1.x release, which these nodes cannot use: install from the source tree.
INSTALL_COMMAND = (f'"{sys.executable}" -m pip install --no-deps /path/to/ImageReward  (the folder of this '
                   "project's pyproject.toml; --no-deps keeps ComfyUI's own package versions)")
try:
    import ImageReward as RM
except ImportError as err:  # ComfyUI shows this message under "IMPORT FAILED"
    raise ImportError(f"ImageReward nodes: the ImageReward library is not installed in ComfyUI's Python ({err}). "
                      f"Install it with: {INSTALL_COMMAND}  -- then restart ComfyUI.") from err
if not hasattr(RM, "Scorer"):
    raise ImportError(f"ImageReward nodes: ImageReward {getattr(RM, '__version__', '1.x')} is too old (PyPI's "
                      f"image-reward is the original 1.x). Replace it with: {INSTALL_COMMAND}")

SCORER = "IMAGE_REWARD_SCORER"
SCORES = "IMAGE_REWARD_SCORES"
CATEGORY = "ImageReward"
DEFAULT_SCORER = "ImageReward-v1.0"
MODEL_FOLDER = "image_reward"  # ComfyUI/models/image_reward
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SEPARATORS = {"newline": "\n", "comma": ", ", "space": " "}
_CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".safetensors", ".bin")


# ------------------------------------------------------------------------------------------- weights
def register_model_folder() -> str | None:
    """Register ``models/image_reward`` with ComfyUI's ``folder_paths``; its path, or None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    path = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    folder_paths.add_model_folder_path(MODEL_FOLDER, path, is_default=True)
    return path


def model_folder() -> str | None:
    """Where weights are read from and downloaded to: the first ``image_reward`` folder ComfyUI knows."""
    try:
        import folder_paths
    except ImportError:
        return None
    try:
        paths = folder_paths.get_folder_paths(MODEL_FOLDER)
    except KeyError:
        paths = [register_model_folder()]
    return paths[0] if paths else None


def local_checkpoints() -> list[str]:
    """User checkpoints in ``models/image_reward`` (files, or ``save_pretrained`` folders as ``name/``),
    without the official weight files the registered scorers use."""
    try:
        import folder_paths

        names = folder_paths.get_filename_list(MODEL_FOLDER)
    except (ImportError, KeyError):
        return []
    from ImageReward.image_io import is_hidden
    from ImageReward.resolve import weight_files

    official = {name for cfg in weight_files() for name in (cfg.filename, *cfg.alt_filenames)}
    found: list[str] = []
    for name in names:
        if any(is_hidden(part) for part in name.replace("\\", "/").split("/")):
            continue  # .ipynb_checkpoints/, ._model.pt, __MACOSX/ ...: never a checkpoint of the user's
        folder, _, leaf = name.replace("\\", "/").rpartition("/")
        if folder and leaf == "config.json" and folder not in official:
            found.append(folder + "/")
        elif not folder and leaf.endswith(_CHECKPOINT_EXTENSIONS) and leaf not in official:
            found.append(leaf)
    return sorted(set(found))


def scorer_names() -> list[str]:
    """ImageReward checkpoints first, then the baseline scores (CLIP, BLIP, Aesthetic), then local files."""
    models = list(RM.available_models())
    try:
        scores = [name for name in RM.available_scores() if name not in models]
    except Exception as err:  # a broken optional baseline must not hide the loader
        logger.warning("ImageReward nodes: could not list baseline scores (%s)", err)
        scores = []
    return models + scores + local_checkpoints()


def _missing_error(name: str, root: str | None, err: Exception) -> RuntimeError:
    """One message naming every file the library found missing (``DownloadError.missing``), all at once."""
    reason = getattr(err, "reason", None) or str(err).splitlines()[0]
    missing = getattr(err, "missing", None)
    if not missing:
        return RuntimeError(f"ImageReward: cannot load {name!r}: {reason}")
    listing = "".join(f"\n  - {cfg.describe()}" for cfg in missing)
    return RuntimeError(f"ImageReward: cannot load {name!r} ({reason}). Put these files into {root}:{listing}\n"
                        "then run the workflow again")


def load_scorer(name: str, device: str = "auto", dtype: str = "float32") -> Any:
    """Anything ``RM.load_scorer`` accepts (a registered model or score, a weighted mix ``NAME[:WEIGHT],...``,
    a local checkpoint file or ``save_pretrained`` folder, a Hub id), or a name listed from
    ``models/image_reward``. Weights come from ``models/image_reward`` and are downloaded there when missing.
    Raises ``RM.UnknownModelError`` (a ``ValueError``) for an unknown name, ``RuntimeError`` naming every
    missing weight file when they cannot be had (at once offline: the library checks before it waits)."""
    if dtype not in _DTYPES:
        raise RM.InvalidInputError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    torch_dtype = None if dtype == "float32" else _DTYPES[dtype]
    root = model_folder()
    local = os.path.join(root, name.rstrip("/")) if root and name in local_checkpoints() else None
    logger.info("ImageReward: loading %s", local or name)
    try:  # the library's one resolver (names, mixes, paths, Hub ids)
        return RM.load_scorer(local or name, device=_device(device), download_root=root, dtype=torch_dtype)
    except RM.DownloadError as err:
        raise _missing_error(name, root, err) from err


def _device(choice: str) -> Any:
    if choice != "auto":
        return torch.device(choice)
    try:
        import comfy.model_management as model_management

        return model_management.text_encoder_offload_device()  # loaded off the GPU; moved there to score
    except ImportError:
        return None  # the library's default: cuda when available


class ManagedScorer(torch.nn.Module):
    """A scorer as ComfyUI's ``ModelPatcher`` expects a model: a module with a plain, settable ``device``
    attribute (the patcher writes it when it moves the weights; ``Scorer.device`` is read-only)."""

    def __init__(self, scorer: Any) -> None:
        super().__init__()
        self.scorer = scorer
        self.device = scorer.device


def managed(scorer: Any, device: str) -> Any:
    """Inside ComfyUI: ``scorer`` in a ``ModelPatcher``, so ComfyUI's model management ("Unload models", memory
    pressure) can move it between the GPU and its offload device. Outside ComfyUI: ``scorer`` itself."""
    try:
        import comfy.model_management as model_management
        import comfy.model_patcher
    except ImportError:
        return scorer
    load_device = model_management.get_torch_device() if device == "auto" else torch.device(device)
    return comfy.model_patcher.ModelPatcher(ManagedScorer(scorer), load_device=load_device,
                                            offload_device=scorer.device)


def scorer_of(output: Any) -> Any:
    """The ``Scorer`` behind a loader output (a ``ModelPatcher`` inside ComfyUI, else the scorer itself)."""
    holder = getattr(output, "model", None)
    model = holder.scorer if isinstance(holder, ManagedScorer) else output
    if not isinstance(model, RM.Scorer):
        raise ValueError("scorer must come from the 'ImageReward: load scorer' node")
    return model


def activate(output: Any) -> Any:
    """The ``Scorer`` behind a loader output, moved onto its device through ComfyUI's model management."""
    model = scorer_of(output)
    if model is not output:
        import comfy.model_management as model_management

        model_management.load_model_gpu(output)
    return model


# ------------------------------------------------------------------------------------------- images
def check_images(images: Any) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a ComfyUI IMAGE batch [B, H, W, C] with C = 1, 3 or 4; got {shape}")
    if images.shape[0] == 0:
        raise ValueError("the IMAGE batch is empty: nothing to score")


def images_to_arrays(images: Any, start: int = 0, stop: int | None = None) -> list[np.ndarray]:
    """Images ``start:stop`` of a ComfyUI ``IMAGE`` ``[B, H, W, C]`` float 0..1 as ``H x W x C`` uint8 arrays,
    exactly the pixels ``SaveImage`` writes (``clip(255 * x)`` truncated). One image at a time, so memory
    beyond the result is one float32 copy of one image (an 8192 x 8192 image: 0.8 GB, then 0.2 GB kept)."""
    check_images(images)
    out = []
    for image in images[start:stop]:
        pixels = image.detach().to("cpu", torch.float32).mul(255.0).clamp_(0.0, 255.0)
        out.append(pixels.to(torch.uint8).numpy())
        del pixels
    return out


def as_scores(scores: Any) -> tuple[list[float], str, bool]:
    """Accept our ``IMAGE_REWARD_SCORES`` dict, or a plain list/tensor of floats."""
    if isinstance(scores, dict):
        return ([float(s) for s in scores["scores"]], str(scores.get("label", "ImageReward Score")),
                bool(scores.get("higher_is_better", True)))
    if isinstance(scores, torch.Tensor):
        scores = scores.flatten().tolist()
    if isinstance(scores, (list, tuple)):
        return [float(s) for s in scores], "ImageReward Score", True
    raise ValueError(f"scores must come from an ImageReward 'score images' node, got {type(scores).__name__}")


def _pack(values: Sequence[float], label: str, higher_is_better: bool) -> dict[str, Any]:
    return {"scores": list(values), "label": label, "higher_is_better": higher_is_better}


def scores_text(values: Sequence[float], label: str, precision: int, separator: str,
                filename_safe: bool = False) -> str:
    """``label: value`` joined by ``separator``; ``filename_safe`` keeps only letters, digits, ``. _ + -``
    (e.g. ``ImageReward_Score_0.1234_ImageReward_Score_-0.5000``), for a SaveImage ``filename_prefix``."""
    prefix = f"{label.strip()}: " if label.strip() else ""
    text = _SEPARATORS[separator].join(f"{prefix}{value:.{int(precision)}f}" for value in values)
    if filename_safe:
        text = re.sub(r"_+", "_", re.sub(r"[^\w.+-]", "_", text, flags=re.ASCII)).strip("_")
    return text


def _blocked() -> Any:
    """ComfyUI's "no output": nodes downstream (SaveImage, PreviewImage, ...) are skipped, not crashed."""
    from comfy_execution.graph import ExecutionBlocker

    return ExecutionBlocker(None)


# ------------------------------------------------------------------------------------------- nodes
class ImageRewardLoader:
    """Load a scorer: ImageReward-v1.0, a baseline, or a local ImageReward checkpoint."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "scorer": (scorer_names(), {"default": DEFAULT_SCORER,
                                            "tooltip": "Weights are read from (and downloaded into) "
                                                       "ComfyUI/models/image_reward"}),
                "device": (["auto", "cpu", "cuda"], {"default": "auto"}),
                "dtype": (list(_DTYPES), {"default": "float32"}),
            },
            "optional": {
                "checkpoint_path": ("STRING", {"default": "", "tooltip": "Local ImageReward checkpoint (.pt/"
                                               ".safetensors or save_pretrained folder); overrides 'scorer'"}),
            },
        }

    RETURN_TYPES = (SCORER,)
    RETURN_NAMES = ("scorer",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a human-preference scorer. ComfyUI keeps it until the inputs change or "
                   "'Free model and node cache'; 'Unload models' moves it off the GPU.")

    def load(self, scorer: str, device: str = "auto", dtype: str = "float32",
             checkpoint_path: str = "") -> tuple[Any]:
        path = (checkpoint_path or "").strip()
        if path and not os.path.exists(path):
            raise ValueError(f"checkpoint_path {path!r} does not exist")
        return (managed(load_scorer(path or scorer, device, dtype), device),)


class ImageRewardScore:
    """Score every image of an IMAGE batch against one prompt."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "scorer": (SCORER,),
                "images": ("IMAGE",),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The prompt the images were generated from (may stay empty for "
                                                 "prompt-free scorers such as Aesthetic)"}),
            },
            "optional": {"batch_size": ("INT", {"default": 8, "min": 1, "max": 256})},
        }

    RETURN_TYPES = (SCORES, "FLOAT")
    RETURN_NAMES = ("scores", "best_score")
    FUNCTION = "score"
    CATEGORY = CATEGORY
    DESCRIPTION = "One score per image (higher is better for ImageReward), plus the best one."

    def score(self, scorer: Any, images: Any, prompt: str, batch_size: int = 8) -> tuple[dict[str, Any], float]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
        from ImageReward.validation import check_positive_int

        batch_size = check_positive_int("batch_size", batch_size)
        check_images(images)
        model = activate(scorer)
        if not prompt.strip() and getattr(model, "uses_prompt", True):
            raise ValueError(f"prompt is empty: {getattr(model, 'name', 'this scorer')} scores images against the "
                             "prompt they were generated from (only prompt-free scorers such as Aesthetic need none)")
        total = images.shape[0]
        progress = _progress_bar(total)
        values: list[float] = []
        for start in range(0, total, batch_size):
            _check_interrupted()
            # PIL images: the layout is ComfyUI's [H, W, C], never re-guessed by the library (a 3-pixel-high image)
            chunk = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
                     for a in images_to_arrays(images, start, start + batch_size)]
            values += model.score_batch(prompt, chunk, batch_size=batch_size).tolist()
            if progress is not None:
                progress.update(len(chunk))
        higher = bool(getattr(model, "higher_is_better", True))
        label = f"{getattr(model, 'name', 'ImageReward')} Score"
        return _pack(values, label, higher), float(max(values) if higher else min(values))


class ImageRewardRankFilter:
    """Sort an IMAGE batch by score, drop images below a limit, keep the best k."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE",),
                "scores": (SCORES,),
                "top_k": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "0 keeps every image"}),
                "use_min_score": ("BOOLEAN", {"default": False}),
                "min_score": ("FLOAT", {"default": 0.0, "min": -1e4, "max": 1e4, "step": 0.01,
                                        "tooltip": "With use_min_score: keep images scoring at least this"}),
                "sort": ("BOOLEAN", {"default": True, "tooltip": "Best first; off keeps the batch order"}),
            },
        }

    RETURN_TYPES = ("IMAGE", SCORES, "INT")
    RETURN_NAMES = ("images", "scores", "count")
    FUNCTION = "rank"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Best-first ranking and filtering. When no image passes, 'images' is blocked: Save Image / "
                   "Preview Image downstream are skipped (count is 0).")

    def rank(self, images: Any, scores: Any, top_k: int = 0, use_min_score: bool = False, min_score: float = 0.0,
             sort: bool = True) -> tuple[Any, Any, int]:
        values, label, higher = as_scores(scores)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("images must be a ComfyUI IMAGE batch [B, H, W, C]")
        if len(values) != images.shape[0]:
            raise ValueError(f"got {len(values)} scores for {images.shape[0]} images: score this same batch")
        if top_k < 0:
            raise ValueError(f"top_k must be 0 (keep all) or positive, got {top_k}")
        sign = 1.0 if higher else -1.0
        order = list(range(len(values)))
        if use_min_score:
            order = [i for i in order if sign * values[i] >= sign * min_score]
        best_first = sorted(order, key=lambda i: sign * values[i], reverse=True)  # stable: ties keep batch order
        if top_k:
            keep = set(best_first[:top_k])
            order = [i for i in order if i in keep]
        if sort:
            kept = set(order)
            order = [i for i in best_first if i in kept]
        kept_scores = _pack([values[i] for i in order], label, higher)
        if not order:
            logger.warning("ImageReward rank/filter: none of %d images passed the filter; nodes using its images "
                           "are skipped", len(values))
            return _blocked(), kept_scores, 0
        index = torch.tensor(order, dtype=torch.long, device=images.device)
        return images.index_select(0, index), kept_scores, len(order)


class ImageRewardScoreToText:
    """Scores as text (e.g. ``ImageReward Score: 0.1234``), for captions, text files or file names."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "scores": (SCORES,),
                "precision": ("INT", {"default": 4, "min": 0, "max": 10}),
                "separator": (list(_SEPARATORS), {"default": "newline"}),
            },
            "optional": {
                "label": ("STRING", {"default": "", "tooltip": "Empty: the scorer's, e.g. 'ImageReward Score'"}),
                "filename_safe": ("BOOLEAN", {"default": False, "tooltip": "Only letters, digits and . _ + - "
                                              "(no ':' or newlines): usable as a Save Image filename_prefix"}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    FUNCTION = "to_text"
    CATEGORY = CATEGORY

    def to_text(self, scores: Any, precision: int = 4, separator: str = "newline", label: str = "",
                filename_safe: bool = False) -> tuple[str]:
        values, default_label, _ = as_scores(scores)
        if separator not in _SEPARATORS:
            raise ValueError(f"separator must be one of {list(_SEPARATORS)}, got {separator!r}")
        if not 0 <= int(precision) <= 10:
            raise ValueError(f"precision must be between 0 and 10, got {precision}")
        return (scores_text(values, label or default_label, precision, separator, filename_safe),)


class ImageRewardShowScores:
    """Output node: shows the scores in the node (drawn by ``js/show_scores.js``) and in the prompt's history
    (``ui.text``)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"scores": (SCORES,), "precision": ("INT", {"default": 4, "min": 0, "max": 10})}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    FUNCTION = "show"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Displays one line per score; a workflow ending here runs without saving images."

    def show(self, scores: Any, precision: int = 4) -> dict[str, Any]:
        values, label, _ = as_scores(scores)
        if not 0 <= int(precision) <= 10:
            raise ValueError(f"precision must be between 0 and 10, got {precision}")
        text = scores_text(values, label, precision, "newline") if values else f"{label}: no image"
        return {"ui": {"text": [text], "scores": values}, "result": (text,)}


def _progress_bar(total: int) -> Any:
    try:
        from comfy.utils import ProgressBar

        return ProgressBar(total)
    except ImportError:
        return None


def _check_interrupted() -> None:
    try:
        import comfy.model_management as model_management
    except ImportError:
        return
    model_management.throw_exception_if_processing_interrupted()


NODE_CLASS_MAPPINGS = {
    "ImageRewardLoader": ImageRewardLoader,
    "ImageRewardScore": ImageRewardScore,
    "ImageRewardRankFilter": ImageRewardRankFilter,
    "ImageRewardScoreToText": ImageRewardScoreToText,
    "ImageRewardShowScores": ImageRewardShowScores,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageRewardLoader": "ImageReward: load scorer",
    "ImageRewardScore": "ImageReward: score images",
    "ImageRewardRankFilter": "ImageReward: rank / filter top-k",
    "ImageRewardScoreToText": "ImageReward: scores to text",
    "ImageRewardShowScores": "ImageReward: show scores",
}
