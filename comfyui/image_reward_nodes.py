"""ComfyUI nodes for ImageReward: load a scorer, score an IMAGE batch, rank/filter it, turn scores into text.

Adapters only: every score comes from the installed ``ImageReward`` library (``score_batch``); these nodes
convert ComfyUI's ``IMAGE`` tensors (``[B, H, W, C]`` float in 0..1) and wire results between nodes.
Two custom socket types flow between them: ``IMAGE_REWARD_SCORER`` (a loaded ``ImageReward.Scorer``) and
``IMAGE_REWARD_SCORES`` (a dict ``{"scores": [float, ...], "label": str, "higher_is_better": bool}``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)

INSTALL_COMMAND = f'"{sys.executable}" -m pip install "image-reward>=2.0.0.dev0"'
try:
    import ImageReward as RM
except ImportError as err:  # ComfyUI shows this message under "IMPORT FAILED"
    raise ImportError(f"ImageReward nodes: the ImageReward library is not installed in ComfyUI's Python ({err}). "
                      f"Install it with: {INSTALL_COMMAND}  -- then restart ComfyUI.") from err
if not hasattr(RM, "Scorer"):
    raise ImportError(f"ImageReward nodes: ImageReward {getattr(RM, '__version__', '1.x')} is too old. "
                      f"Upgrade it with: {INSTALL_COMMAND}")

SCORER = "IMAGE_REWARD_SCORER"
SCORES = "IMAGE_REWARD_SCORES"
CATEGORY = "ImageReward"
DEFAULT_SCORER = "ImageReward-v1.0"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SEPARATORS = {"newline": "\n", "comma": ", ", "space": " "}
_CACHE: dict[tuple[str, str, str], Any] = {}  # the last loaded scorer, reused when the loader runs again


def scorer_names() -> list[str]:
    """ImageReward checkpoints first, then the baseline scores (CLIP, BLIP, Aesthetic, ...)."""
    models = list(RM.available_models())
    try:
        scores = [name for name in RM.available_scores() if name not in models]
    except Exception as err:  # a broken optional baseline must not hide the loader
        logger.warning("ImageReward nodes: could not list baseline scores (%s)", err)
        scores = []
    return models + scores


def _device(choice: str) -> Any:
    if choice != "auto":
        return torch.device(choice)
    try:
        import comfy.model_management as model_management

        return model_management.get_torch_device()
    except ImportError:
        return None  # the library's default: cuda when available


def load_scorer(name: str, device: str = "auto", dtype: str = "float32") -> Any:
    """Anything ``RM.load_scorer`` accepts: a registered model or score, a weighted mix ``NAME[:WEIGHT],...``,
    a local checkpoint (file or ``save_pretrained`` folder), a Hub id. Unknown: ``RM.UnknownModelError``."""
    key = (name, device, dtype)
    if key in _CACHE:
        return _CACHE[key]
    _CACHE.clear()  # keep at most one scorer in memory
    if dtype not in _DTYPES:
        raise RM.InvalidInputError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    torch_dtype = None if dtype == "float32" else _DTYPES[dtype]
    model = RM.load_scorer(name, device=_device(device), dtype=torch_dtype)  # the library's one resolver
    _CACHE[key] = model
    return model


def unload_scorers() -> None:
    """Forget the cached scorer (ComfyUI may still hold it in its own output cache)."""
    _CACHE.clear()


def images_to_arrays(images: Any) -> list[Any]:
    """ComfyUI ``IMAGE`` ``[B, H, W, C]`` float 0..1 -> one ``H x W x C`` float32 numpy array per image."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a ComfyUI IMAGE batch [B, H, W, C] with C = 1, 3 or 4; got {shape}")
    if images.shape[0] == 0:
        raise ValueError("the IMAGE batch is empty: nothing to score")
    pixels = images.detach().to("cpu", torch.float32).clamp(0.0, 1.0)  # as SaveImage does
    return [image.numpy() for image in pixels]


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


class ImageRewardLoader:
    """Load (once) a scorer: ImageReward-v1.0, a baseline, or a local ImageReward checkpoint."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "scorer": (scorer_names(), {"default": DEFAULT_SCORER,
                                            "tooltip": "Downloaded on first use into ~/.cache/ImageReward"}),
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
    DESCRIPTION = "Loads a human-preference scorer; the loaded model is reused until the inputs change."

    def load(self, scorer: str, device: str = "auto", dtype: str = "float32",
             checkpoint_path: str = "") -> tuple[Any]:
        path = (checkpoint_path or "").strip()
        if path and not os.path.exists(path):
            raise ValueError(f"checkpoint_path {path!r} does not exist")
        return (load_scorer(path or scorer, device, dtype),)


class ImageRewardScore:
    """Score every image of an IMAGE batch against one prompt."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "scorer": (SCORER,),
                "images": ("IMAGE",),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The prompt the images were generated from"}),
            },
            "optional": {"batch_size": ("INT", {"default": 8, "min": 1, "max": 256})},
        }

    RETURN_TYPES = (SCORES, "FLOAT")
    RETURN_NAMES = ("scores", "best_score")
    FUNCTION = "score"
    CATEGORY = CATEGORY
    DESCRIPTION = "One score per image (higher is better for ImageReward), plus the best one."

    def score(self, scorer: Any, images: Any, prompt: str, batch_size: int = 8) -> tuple[dict[str, Any], float]:
        if not isinstance(scorer, RM.Scorer):
            raise ValueError("scorer must come from the 'ImageReward: load scorer' node")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
        from ImageReward.validation import check_positive_int

        batch_size = check_positive_int("batch_size", batch_size)
        arrays = images_to_arrays(images)
        progress = _progress_bar(len(arrays))
        values: list[float] = []
        for start in range(0, len(arrays), batch_size):
            _check_interrupted()
            chunk = arrays[start:start + batch_size]
            values += scorer.score_batch(prompt, chunk, batch_size=batch_size).tolist()
            if progress is not None:
                progress.update(len(chunk))
        higher = bool(getattr(scorer, "higher_is_better", True))
        label = f"{getattr(scorer, 'name', 'ImageReward')} Score"
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
    DESCRIPTION = "Best-first ranking and filtering; an empty result is an empty IMAGE batch (count 0)."

    def rank(self, images: Any, scores: Any, top_k: int = 0, use_min_score: bool = False, min_score: float = 0.0,
             sort: bool = True) -> tuple[Any, dict[str, Any], int]:
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
        if not order:
            logger.warning("ImageReward rank/filter: no image passed the filter; returning an empty batch")
        index = torch.tensor(order, dtype=torch.long, device=images.device)
        return images.index_select(0, index), _pack([values[i] for i in order], label, higher), len(order)


class ImageRewardScoreToText:
    """Scores as text (e.g. ``ImageReward Score: 0.1234``), for filenames, captions or text files."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "scores": (SCORES,),
                "precision": ("INT", {"default": 4, "min": 0, "max": 10}),
                "separator": (list(_SEPARATORS), {"default": "newline"}),
            },
            "optional": {"label": ("STRING", {"default": "", "tooltip": "Empty: the scorer's, e.g. "
                                                                        "'ImageReward Score'"})},
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    FUNCTION = "to_text"
    CATEGORY = CATEGORY

    def to_text(self, scores: Any, precision: int = 4, separator: str = "newline", label: str = "") -> tuple[str]:
        values, default_label, _ = as_scores(scores)
        if separator not in _SEPARATORS:
            raise ValueError(f"separator must be one of {list(_SEPARATORS)}, got {separator!r}")
        if not 0 <= int(precision) <= 10:
            raise ValueError(f"precision must be between 0 and 10, got {precision}")
        prefix = f"{(label or default_label).strip()}: " if (label or default_label).strip() else ""
        return (_SEPARATORS[separator].join(f"{prefix}{value:.{int(precision)}f}" for value in values),)


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
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageRewardLoader": "ImageReward: load scorer",
    "ImageRewardScore": "ImageReward: score images",
    "ImageRewardRankFilter": "ImageReward: rank / filter top-k",
    "ImageRewardScoreToText": "ImageReward: scores to text",
}
