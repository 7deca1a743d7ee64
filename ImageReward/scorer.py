"""The one interface every scorer implements; its batch path is the shared engine (``ImageReward/engine.py``).

A scorer subclasses :class:`Scorer` and provides four small pieces:

* ``preprocess_config``: the crop size and mean/std it wants;
* ``encode_images(pixel_values)``: normalised ``[B, 3, S, S]`` pixels -> per-image features;
* ``score_encoded(prompts, image_features)``: ``len(prompts) == B`` pairs -> ``[B]`` float32 rewards;
* flags: ``higher_is_better``, ``is_differentiable``, ``uses_prompt``.

Everything users call (``score``, ``inference_rank``, ``score_batch``, ``score_grad``) is written once,
here: argument checks, image loading with typed errors, PIL-exact preprocessing, stable ranking. Batches go
through :func:`ImageReward.engine.score_images` (read-ahead, each distinct image encoded once however many
prompts it is paired with, ``torch.inference_mode``). Trainers, evaluation, the CLI and the plugins take *any*
scorer.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from .engine import score_images
from .errors import InvalidInputError, UnsupportedInputError
from .image_io import ImageLike, load_image
from .preprocess import PreprocessConfig, preprocess_pil, preprocess_tensor
from .tokenizer import check_prompts
from .validation import check_optional_int, check_pixels

__all__ = ["Scorer", "rank_descending"]

logger = logging.getLogger(__name__)


def rank_descending(rewards: torch.Tensor) -> list[int]:
    """1-based rank of each entry (1 = highest). Ties keep input order (stable), unlike the original."""
    order = torch.sort(rewards, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1, device=order.device)
    return ranks.tolist()


def _as_image_list(images: Any, what: str = "images") -> list:
    if isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise UnsupportedInputError(f"{what} must be a list or tuple of images, got {type(images).__name__}")
    if not items:
        raise InvalidInputError(f"{what} is empty: pass at least one image")
    return items


class Scorer(nn.Module):
    """Base class of every reward model and baseline: ``score``, ``inference_rank``, ``score_batch``,
    ``score_grad``. Subclasses implement :meth:`encode_images` and :meth:`score_encoded`."""

    name: str = "scorer"
    higher_is_better: bool = True
    is_differentiable: bool = True
    uses_prompt: bool = True
    preprocess_config: PreprocessConfig = PreprocessConfig()
    default_batch_size: int = 8
    #: apply the EXIF orientation of image files (as transformers/diffusers ``load_image``); ``False`` scores
    #: the pixels as stored, as the original did (see docs/differences.md)
    exif_transpose: bool = True

    # ------------------------------------------------------------------ what a subclass provides
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, S, S]`` pixels -> per-image features ``[B, ...]`` (first dim is the batch)."""
        raise NotImplementedError

    def score_encoded(self, prompts: Sequence[str], image_features: torch.Tensor) -> torch.Tensor:
        """One prompt per row of ``image_features`` -> float32 rewards ``[B]``."""
        raise NotImplementedError

    def score_pairs(self, prompts: Sequence[str], image_features: torch.Tensor, image_index: torch.Tensor
                    ) -> torch.Tensor:
        """Rewards of pairs ``(prompts[i], image_features[image_index[i]])``. Override to reuse per-image
        work across prompts; the default gathers the rows and calls :meth:`score_encoded`."""
        return self.score_encoded(prompts, image_features[image_index])

    # ------------------------------------------------------------------ shared machinery
    @property
    def device(self) -> torch.device:
        """Where the parameters live (read each time: never stale after ``.to()``); the CPU for a scorer
        without parameters (a mix of remote scorers)."""
        parameter = next(self.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype image pixels are cast to before encoding (that of the image encoder's weights)."""
        return next(self.parameters()).dtype

    def preprocess(self, image: ImageLike, *, index: int | None = None) -> torch.Tensor:
        """One image (path, PIL, array, tensor) -> normalised ``[3, S, S]`` float32, PIL-exact."""
        return preprocess_pil(load_image(image, index=index, exif_transpose=self.exif_transpose),
                              self.preprocess_config)

    def score_batch(
        self,
        prompts: str | Sequence[str],
        images: Sequence[ImageLike],
        *,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Score pairs: ``prompts[i]`` with ``images[i]`` (a single prompt is broadcast). Returns float32
        ``[N]`` on the CPU, in input order. Each distinct image is encoded once, in batches. ``prompts=None``:
        no prompt, for a scorer that uses none (``uses_prompt = False``, e.g. Aesthetic); a scorer that uses
        prompts raises :class:`InvalidInputError`.

        >>> model.score_batch(["a cat", "a dog"], ["cat.png", "cat.png"])  # doctest: +SKIP
        tensor([ 0.71, -1.32])
        """
        batch_size = check_optional_int("batch_size", batch_size)
        items = _as_image_list(images)
        prompts = self._no_prompt_allowed(prompts)
        prompt_list = check_prompts(prompts)
        if isinstance(prompts, str):
            prompt_list = prompt_list * len(items)
        elif len(prompt_list) != len(items):
            raise InvalidInputError(
                f"got {len(prompt_list)} prompts for {len(items)} images: pass one prompt, or one per image"
            )
        return score_images(self, prompt_list, items, batch_size=batch_size or self.default_batch_size,
                            progress=progress)

    def _no_prompt_allowed(self, prompts: str | Sequence[str] | None) -> str | Sequence[str]:
        """``prompts``, or ``""`` for ``None`` when this scorer uses no prompt (else :class:`InvalidInputError`)."""
        if prompts is not None:
            return prompts
        if self.uses_prompt:
            raise InvalidInputError(f"{self.name} scores images against a prompt: pass one (prompt=None is only "
                                    "for prompt-free scorers such as Aesthetic)")
        return ""

    def score(self, prompt: str | None, image: ImageLike | Sequence[ImageLike], *, batch_size: int | None = None
              ) -> float | list[float]:
        """Reward of one image (``float``) or of a list/tuple of images (``list[float]``, input order).
        ``prompt=None`` for a prompt-free scorer (see :meth:`score_batch`).

        >>> model.score("a cat", "cat.png")  # doctest: +SKIP
        0.58
        """
        check_optional_int("batch_size", batch_size)
        prompt = self._no_prompt_allowed(prompt)
        check_prompts(prompt if isinstance(prompt, str) else [prompt])
        if isinstance(image, (list, tuple)):
            return self.score_batch(prompt, image, batch_size=batch_size).tolist()
        return float(self.score_batch(prompt, [image])[0])

    def inference_rank(self, prompt: str | None, images: Sequence[ImageLike], *, batch_size: int | None = None,
                       progress: bool = False) -> tuple[list[int], list[float]]:
        """``(ranking, rewards)``: ``ranking[i]`` is the 1-based rank of image ``i`` (1 = best for
        ``higher_is_better``); ``rewards`` in input order. Ties keep input order. ``prompt=None`` as in
        :meth:`score_batch`; ``progress``: a progress bar."""
        check_optional_int("batch_size", batch_size)
        prompt = self._no_prompt_allowed(prompt)
        check_prompts(prompt if isinstance(prompt, str) else [prompt])
        rewards = self.score_batch(prompt, images, batch_size=batch_size, progress=progress)
        ranks = rank_descending(rewards if self.higher_is_better else -rewards)
        return ranks, rewards.tolist()

    def score_grad(self, pixels: torch.Tensor, prompts: str | Sequence[str], *,
                   value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Differentiable rewards ``[B]`` from floating ``[B, 3, H, W]`` pixels in ``[0, 1]`` (any size: resized
        with antialiasing and centre-cropped inside). Gradients flow to ``pixels``. ``value_range=(-1, 1)``
        accepts a VAE decode as is (mapped with ``(x + 1) / 2``). Pixels that are not finite or lie outside
        ``value_range`` raise :class:`InvalidInputError`, as :meth:`score` does.

        >>> rewards = model.score_grad(images_0_1.requires_grad_(), "a cat")  # doctest: +SKIP
        """
        if not self.is_differentiable:
            raise NotImplementedError(f"{self.name} is not differentiable")
        if not isinstance(value_range, (tuple, list)) or tuple(value_range) not in ((0.0, 1.0), (-1.0, 1.0)):
            raise InvalidInputError(f"value_range must be (0, 1) or (-1, 1), got {value_range!r}")
        check_pixels(pixels, value_range=value_range)
        if value_range[0] == -1.0:
            pixels = (pixels + 1) / 2
        prompts = self._no_prompt_allowed(prompts)
        prompt_list = check_prompts(prompts)
        if isinstance(prompts, str):
            prompt_list = prompt_list * pixels.shape[0]
        if len(prompt_list) != pixels.shape[0]:
            raise InvalidInputError(f"got {len(prompt_list)} prompts for {pixels.shape[0]} images")
        normalised = preprocess_tensor(pixels.to(self.device), self.preprocess_config)
        return self.score_encoded(prompt_list, self.encode_images(normalised.to(self.input_dtype)))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, higher_is_better={self.higher_is_better}, differentiable={self.is_differentiable}"
