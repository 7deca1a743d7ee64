"""Where a batch becomes scores: the one batch engine behind ``Scorer.score_batch`` (and so the CLI, eval, the
plugins, ReFL validation), ``score-dataset`` (:mod:`ImageReward.scoring.runner`) and reward-model export
(:mod:`ImageReward.rm_training.export`).

Three steps, each written once, here:

1. **dedupe** (:func:`dedupe`): pairs ``(prompt_i, image_i)`` -> the distinct images and, for each pair, the
   index of its image, so that an image paired with many prompts is read and encoded once;
2. **read-ahead** (:class:`ReadAhead`): a small thread pool decodes and preprocesses the next chunk of images
   while the model runs on this one (Pillow releases the GIL). Callers that already read images in DataLoader
   workers (``score-dataset``, export) skip this step and hand over the pixels;
3. **encode and score** (:func:`score_pixels`): move the pixels to the scorer's device and input dtype, encode
   each distinct image once (``Scorer.encode_images``), score the pairs (``Scorer.score_pairs``) in
   sub-batches of similar prompt length (so that text padding can be trimmed), under ``torch.inference_mode``;
   rewards come back as float32 on the CPU, in input order.

:func:`score_images` chains the three for a list of image inputs (paths, PIL images, arrays, tensors).
A :class:`~ImageReward.models.mix.WeightedReward` goes through the same steps (its features are one tensor
per component), so a mix works wherever a scorer does.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Hashable, Sequence, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from .preprocess import PreprocessConfig, preprocess_pil

if TYPE_CHECKING:  # the engine is called by Scorer; only type hints need the class
    from .scorer import Scorer

__all__ = ["image_key", "dedupe", "ReadAhead", "preprocess_configs", "preprocess_image", "stack_pixels",
           "move_pixels", "score_pixels", "score_images"]

# The pixels of a batch: one normalised [B, 3, S, S] tensor, or a list of [3, H_i, W_i] tensors when the images
# have different sizes (HPSv3's smart_resize keeps each image's aspect), or, for a mix whose scorers preprocess
# differently, a tuple with one of those per distinct PreprocessConfig (see preprocess_configs).
Pixels = Union[torch.Tensor, list[torch.Tensor], tuple[Union[torch.Tensor, list[torch.Tensor]], ...]]


def preprocess_configs(scorer: "Scorer") -> tuple[PreprocessConfig, ...]:
    """The distinct preprocessings ``scorer`` wants: its ``preprocess_config``, or for a mix
    (``scorer.preprocess_configs``) one per distinct config of its components."""
    configs = getattr(scorer, "preprocess_configs", None)
    return tuple(configs) if configs else (scorer.preprocess_config,)


def preprocess_image(image: Image.Image, configs: Sequence[PreprocessConfig]) -> Pixels:
    """One decoded image -> ``[3, S, S]`` float32 (one config) or a tuple of them (one per config)."""
    if len(configs) == 1:
        return preprocess_pil(image, configs[0])
    return tuple(preprocess_pil(image, config) for config in configs)


def stack_pixels(items: Sequence[Pixels]) -> Pixels:
    """Stack per-image pixels (tensors, or tuples of tensors) into a batch: ``[B, 3, H, W]`` when all have one
    size, else the list of them (a scorer whose preprocessing keeps each image's size takes either)."""
    if isinstance(items[0], tuple):
        return tuple(_stack(group) for group in zip(*items))
    return _stack(items)


def _stack(group: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    if all(item.shape == group[0].shape for item in group):
        return torch.stack(list(group))
    return list(group)


def move_pixels(pixels: Pixels, device: torch.device, dtype: torch.dtype, non_blocking: bool = False) -> Pixels:
    """``pixels`` (a tensor, a list of per-image tensors, or a tuple of those) on ``device`` in ``dtype``."""
    if isinstance(pixels, (tuple, list)):
        return type(pixels)(move_pixels(p, device, dtype, non_blocking) for p in pixels)
    return pixels.to(device, dtype, non_blocking=non_blocking)


def image_key(item: Any) -> tuple:
    """Identity of an image for de-duplication: the resolved path, or the Python object."""
    if isinstance(item, (str, os.PathLike)):
        return ("path", os.path.abspath(os.fspath(item)))
    return ("object", id(item))


def dedupe(keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """``(first, image_index)``: ``first[u]`` is the position of the first pair with distinct image ``u``
    (first-appearance order), ``image_index[p]`` the distinct image of pair ``p``.

    >>> dedupe(["a", "b", "a"])
    ([0, 1], [0, 1, 0])
    """
    seen: dict[Hashable, int] = {}
    first: list[int] = []
    image_index = []
    for position, key in enumerate(keys):
        if key not in seen:
            seen[key] = len(first)
            first.append(position)
        image_index.append(seen[key])
    return first, image_index


class ReadAhead:
    """Decodes and preprocesses images (``scorer.preprocess``) in a small thread pool, so that the next chunk
    is read while the model runs on this one, and the images of one chunk are read in parallel. A bad image
    raises its typed error when its chunk is collected, as if read in the caller's thread.

    >>> with ReadAhead(scorer, n_items=len(chunk)) as reader:   # doctest: +SKIP
    ...     reader.request(chunk); pixels = reader.collect(chunk)
    """

    def __init__(self, scorer: "Scorer", n_items: int) -> None:
        self.scorer = scorer
        self.workers = max(1, min(n_items, os.cpu_count() or 1, 8))
        self.pool: ThreadPoolExecutor | None = None
        self.pending: dict[int, Future] = {}

    def __enter__(self) -> "ReadAhead":
        if self.workers > 1:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="imagereward-decode")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def request(self, chunk: Sequence[tuple[int, Any]]) -> None:
        """Start reading ``(position, image)`` items (``position`` names the image in errors)."""
        if self.pool is not None:
            for position, item in chunk:
                self.pending[position] = self.pool.submit(self.scorer.preprocess, item, index=position)

    def collect(self, chunk: Sequence[tuple[int, Any]]) -> Pixels:
        """The preprocessed pixels ``[len(chunk), 3, S, S]`` float32 of requested items, in chunk order."""
        if self.pool is None:
            return stack_pixels([self.scorer.preprocess(item, index=position) for position, item in chunk])
        return stack_pixels([self.pending.pop(position).result() for position, _ in chunk])


def score_pixels(scorer: "Scorer", prompts: Sequence[str], pixels: Pixels, image_index: Sequence[int], *,
                 sub_batch: int | None = None) -> torch.Tensor:
    """Rewards of pairs ``(prompts[p], pixels[image_index[p]])``: each of the ``U`` images of ``pixels``
    (normalised ``[U, 3, S, S]``, any device; a tuple of those for a mix, see :func:`preprocess_configs`) is
    encoded once, then the pairs are scored in sub-batches of at most ``sub_batch`` (default: all at once),
    shortest prompts first. Returns float32 ``[P]`` on the CPU in input order."""
    with torch.inference_mode():
        features = scorer.encode_images(move_pixels(pixels, scorer.device, scorer.input_dtype, non_blocking=True))
        return _score_features(scorer, prompts, features, image_index, sub_batch)


def _score_features(scorer: "Scorer", prompts: Sequence[str], features: Any, image_index: Sequence[int],
                    sub_batch: int | None) -> torch.Tensor:
    rewards = None  # [P], or [P, K] for a scorer whose score_pairs gives K numbers per pair (HPSv3's mu, sigma)
    order = sorted(range(len(prompts)), key=lambda pair: len(prompts[pair]))  # stable: input order within a length
    step = sub_batch or max(1, len(order))
    for start in range(0, len(order), step):
        part = order[start : start + step]
        index = torch.tensor([image_index[pair] for pair in part], device=scorer.device)
        scores = scorer.score_pairs([prompts[pair] for pair in part], features, index).float().cpu()
        rewards = _allocate(rewards, len(prompts), scores)
        rewards[part] = scores
    return rewards if rewards is not None else torch.empty(0, dtype=torch.float32)


def _allocate(rewards: torch.Tensor | None, n: int, scores: torch.Tensor) -> torch.Tensor:
    """``rewards``, or, at the first sub-batch, a float32 ``[n, *scores.shape[1:]]`` to fill."""
    return rewards if rewards is not None else torch.empty((n, *scores.shape[1:]), dtype=torch.float32)


def score_images(scorer: "Scorer", prompts: Sequence[str], images: Sequence[Any], *, batch_size: int,
                 progress: bool = False) -> torch.Tensor:
    """Rewards of pairs ``(prompts[i], images[i])`` (already checked: one prompt per image): distinct images
    are read ahead ``batch_size`` at a time and encoded once; pairs are scored ``batch_size`` at a time.
    Returns float32 ``[N]`` on the CPU, in input order. A bad image raises its typed error."""
    first, pair_image = dedupe([image_key(item) for item in images])
    unique_items = [(position, images[position]) for position in first]  # (first position in input, item)
    pairs_of_image: list[list[int]] = [[] for _ in unique_items]
    for pair, image_id in enumerate(pair_image):
        pairs_of_image[image_id].append(pair)

    rewards = None
    bar = tqdm(total=len(images), desc=f"scoring ({scorer.name})", unit="pair", disable=not progress)
    with ReadAhead(scorer, len(unique_items)) as reader, torch.inference_mode():
        reader.request(unique_items[:batch_size])
        for start in range(0, len(unique_items), batch_size):
            chunk = unique_items[start : start + batch_size]
            pixels = reader.collect(chunk)
            reader.request(unique_items[start + batch_size : start + 2 * batch_size])  # decoded meanwhile
            features = scorer.encode_images(move_pixels(pixels, scorer.device, scorer.input_dtype))
            # every pair whose image is in this chunk, with its row in `features`
            rows = [(pair, row) for row in range(len(chunk)) for pair in pairs_of_image[start + row]]
            scores = _score_features(
                scorer, [prompts[pair] for pair, _ in rows], features, [row for _, row in rows], batch_size)
            rewards = _allocate(rewards, len(images), scores)
            rewards[[pair for pair, _ in rows]] = scores
            bar.update(len(rows))
    bar.close()
    return rewards
