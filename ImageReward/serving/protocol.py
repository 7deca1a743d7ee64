"""The wire formats of the reward server, read safely: the flow_grpo / verl-omni pickle protocol, the JSON
protocol of ``POST /v1/score`` and the lossless pixel protocol of ``POST /v1/score_pixels`` (used by
:class:`~ImageReward.serving.client.RemoteScorer`), with the server's limits.

The pickle protocol (flow_grpo's reward-server convention, documented by verl-omni as its external-scorer
contract, ``docs/start/http_scorer.md``)::

    request  = pickle.dumps({"images": [JPEG bytes, ...], "prompts": [str, ...], "metadata": {}})
    response = pickle.dumps({"scores": [float, ...]})    # HTTP 200
             | pickle.dumps({"error": "..."})             # HTTP 4xx / 5xx

Request bodies come from the network, so they are never read by the standard unpickler: :func:`safe_loads`
accepts only plain data (dict, list, tuple, str, bytes, int, float, bool, None; pickle protocol 3 or later,
as Python 3 writes by default) and refuses every global (a class, a function, a numpy array) with
:class:`ProtocolError` naming it, before anything of it runs.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["ProtocolError", "Limits", "ScoreRequest", "safe_loads", "parse_pickle_request", "parse_json_request",
           "parse_pixel_request", "encode_pixel_request", "pickle_response", "finite_scores"]


class ProtocolError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with (400 bad request, 413 too
    large, 422 unprocessable item)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may hold. ``max_body_bytes``: the raw body; ``max_images``: pairs per request;
    ``max_pixels``: pixels of one decoded image (larger ones are refused before decoding: decompression
    bombs); ``max_prompt_chars``: characters of one prompt; ``timeout_s``: seconds a request may wait for
    its scores."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_images: int = 256
    max_pixels: int = 40_000_000
    max_prompt_chars: int = 4096
    timeout_s: float = 120.0


@dataclass
class ScoreRequest:
    """A parsed request: ``images`` (encoded bytes each) and one prompt per image (``""`` when the model
    takes none). ``pixels`` instead of ``images`` for the pixel protocol (already preprocessed tensors)."""

    prompts: list[str]
    images: list[bytes] | None = None
    pixels: Any = None
    image_index: list[int] | None = None


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data: every ``GLOBAL``/``STACK_GLOBAL`` opcode (the way a pickle
    names a class or a callable to run, ``__reduce__`` included) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise ProtocolError(f"the pickle refers to {module}.{name}: only plain data (dict, list, tuple, str, "
                            "bytes, int, float, bool, None) is accepted")

    def persistent_load(self, pid: Any) -> Any:
        raise ProtocolError("the pickle holds a persistent id: only plain data is accepted")


def safe_loads(body: bytes) -> Any:
    """Unpickle ``body`` accepting plain data only. Raises :class:`ProtocolError` (400) for a global, a
    truncated or malformed pickle, naming what went wrong."""
    try:
        return _PlainDataUnpickler(io.BytesIO(body)).load()
    except ProtocolError:
        raise
    except RecursionError as err:
        raise ProtocolError("the pickle is nested too deeply") from err
    except Exception as err:  # noqa: BLE001 - every malformed pickle is the client's mistake
        raise ProtocolError(f"the body is not a valid pickle ({type(err).__name__}: {err})") from err


def pickle_response(payload: dict[str, Any]) -> bytes:
    """A response body of the pickle protocol (protocol 4: readable by every Python 3 client)."""
    return pickle.dumps(payload, protocol=4)


def _check_count(what: str, count: int, limits: Limits) -> None:
    if count == 0:
        raise ProtocolError(f"{what} is empty: send at least one image")
    if count > limits.max_images:
        raise ProtocolError(f"{count} images in one request; the limit is {limits.max_images} "
                            "(--max-images-per-request)", status=413)


def _check_prompts(prompts: Any, n_images: int, uses_prompt: bool, limits: Limits) -> list[str]:
    if prompts is None:
        if uses_prompt:
            raise ProtocolError("'prompts' is missing: this model scores an image against its prompt; "
                                "send one prompt per image")
        return [""] * n_images
    if isinstance(prompts, str):
        raise ProtocolError("'prompts' must be a list of strings, one per image, got one string")
    if not isinstance(prompts, (list, tuple)):
        raise ProtocolError(f"'prompts' must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) != n_images:
        raise ProtocolError(f"got {len(prompts)} prompts for {n_images} images: send one prompt per image")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ProtocolError(f"prompt #{index} is a {type(prompt).__name__}, expected str")
        if len(prompt) > limits.max_prompt_chars:
            raise ProtocolError(f"prompt #{index} has {len(prompt)} characters; the limit is "
                                f"{limits.max_prompt_chars}", status=413)
    return list(prompts)


def parse_pickle_request(body: bytes, *, uses_prompt: bool, limits: Limits) -> ScoreRequest:
    """The flow_grpo / verl-omni request (see the module docstring) -> :class:`ScoreRequest`. Raises
    :class:`ProtocolError` for anything else."""
    payload = safe_loads(body)
    if not isinstance(payload, dict):
        raise ProtocolError(f"the pickle must hold a dict with 'images' and 'prompts', got {type(payload).__name__}")
    images = payload.get("images")
    if not isinstance(images, (list, tuple)):
        raise ProtocolError("'images' must be a list of encoded images (JPEG/PNG bytes), got "
                            f"{type(images).__name__}")
    _check_count("'images'", len(images), limits)
    for index, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray)):
            raise ProtocolError(f"image #{index} is a {type(image).__name__}, expected encoded image bytes "
                                "(JPEG/PNG)")
    prompts = _check_prompts(payload.get("prompts"), len(images), uses_prompt, limits)
    return ScoreRequest(prompts=prompts, images=[bytes(image) for image in images])


def parse_json_request(body: bytes, *, uses_prompt: bool, limits: Limits) -> ScoreRequest:
    """``{"prompts": [str, ...], "images": [base64 PNG/JPEG, ...]}`` -> :class:`ScoreRequest`."""
    import base64
    import binascii

    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"the body is not valid JSON ({err})") from err
    if not isinstance(payload, dict):
        raise ProtocolError(f"the JSON body must be an object with 'images' and 'prompts', got {type(payload).__name__}")
    images = payload.get("images")
    if not isinstance(images, list):
        raise ProtocolError(f"'images' must be a list of base64-encoded PNG/JPEG files, got {type(images).__name__}")
    _check_count("'images'", len(images), limits)
    decoded = []
    for index, image in enumerate(images):
        if not isinstance(image, str):
            raise ProtocolError(f"image #{index} is a {type(image).__name__}, expected a base64 string")
        text = image.split(",", 1)[1] if image.startswith("data:") else image  # a data: URL works too
        try:
            decoded.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as err:
            raise ProtocolError(f"image #{index} is not valid base64 ({err})") from err
    prompts = _check_prompts(payload.get("prompts"), len(images), uses_prompt, limits)
    return ScoreRequest(prompts=prompts, images=decoded)


def encode_pixel_request(prompts: Sequence[str], pixels: Any, image_index: Sequence[int]) -> bytes:
    """The body of ``POST /v1/score_pixels``: a safetensors file holding ``pixels`` (one ``[U, 3, S, S]``
    float32 tensor, or a tuple of them for a mix that preprocesses images in several ways) and
    ``image_index`` (int64 ``[P]``), with the ``P`` prompts in its metadata. Lossless, and read without
    pickle."""
    import torch
    from safetensors.torch import save

    groups = pixels if isinstance(pixels, tuple) else (pixels,)
    tensors = {f"pixels.{k}": group.detach().to("cpu", torch.float32).contiguous() for k, group in enumerate(groups)}
    tensors["image_index"] = torch.as_tensor(list(image_index), dtype=torch.int64)
    return save(tensors, metadata={"prompts": json.dumps(list(prompts))})


def parse_pixel_request(body: bytes, *, image_sizes: Sequence[int], limits: Limits) -> ScoreRequest:
    """Read a body made by :func:`encode_pixel_request` for a model whose preprocessings give images of
    ``image_sizes`` (one per preprocessing). Shapes, dtype, finiteness and indices are checked."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(body)
        header_len = int.from_bytes(body[:8], "little")
        metadata = json.loads(body[8 : 8 + header_len]).get("__metadata__") or {}
        prompts = json.loads(metadata.get("prompts", "null"))
    except (SafetensorError, ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ProtocolError(f"the body is not a valid pixel request (safetensors) ({err})") from err
    groups = []
    for k, size in enumerate(image_sizes):
        group = tensors.get(f"pixels.{k}")
        if group is None or group.dtype != torch.float32 or group.ndim != 4 or tuple(group.shape[1:]) != (3, size, size):
            raise ProtocolError(f"pixels.{k} must be float32 [U, 3, {size}, {size}] (the model's preprocessing), "
                                f"got {None if group is None else (group.dtype, tuple(group.shape))}")
        if not torch.isfinite(group).all():
            raise ProtocolError(f"pixels.{k} holds values that are not finite")
        groups.append(group)
    if len({group.shape[0] for group in groups}) != 1:
        raise ProtocolError("every pixels.K tensor must hold the same number of images")
    index = tensors.get("image_index")
    if index is None or index.dtype != torch.int64 or index.ndim != 1:
        raise ProtocolError("image_index must be an int64 vector")
    n_images = groups[0].shape[0]
    _check_count("image_index", len(index), limits)
    if n_images > limits.max_images:
        _check_count("pixels", n_images, limits)
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= n_images):
        raise ProtocolError(f"image_index must lie in [0, {n_images})")
    prompts = _check_prompts(prompts, len(index), True, limits)
    pixels = tuple(groups) if len(groups) > 1 else groups[0]
    return ScoreRequest(prompts=prompts, pixels=pixels, image_index=index.tolist())


def finite_scores(scores: Sequence[float]) -> list[float]:
    """``scores`` as Python floats; raises ``FloatingPointError`` naming the first one that is NaN or
    infinite (never sent to a trainer)."""
    values = [float(score) for score in scores]
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise FloatingPointError(f"the model returned {value} for image #{index}")
    return values
