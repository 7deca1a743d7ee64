"""A served model as a scorer again: ``RM.load_scorer("http://host:port[/score/NAME]")`` returns a
:class:`RemoteScorer`, so a reward served by ``imagereward serve`` works wherever a scorer name does
(``score``, ``score-dataset``, evaluation, ReFL's ``--monitor_reward``, mixes, online RL).

The client preprocesses images itself, with the served model's own preprocessing (read from
``GET /v1/models``), and sends the normalised pixels losslessly (``POST /v1/score_pixels/NAME``, a
safetensors body): remote scores equal local ones. It is not differentiable (``score_grad`` raises), so ReFL
can monitor it but not train on it. Requests are retried on 408, 429, 5xx and connection errors, with a timeout
each; other errors raise at once (:class:`~ImageReward.errors.InvalidInputError` with the server's message).
Only the standard library speaks HTTP here; a token comes from the URL (``?token=``) or
``$IMAGEREWARD_SERVE_TOKEN`` and is sent as ``Authorization: Bearer``.

>>> remote = RM.load_scorer("http://127.0.0.1:18081/score/ImageReward-v1.0")   # doctest: +SKIP
>>> remote.score_batch(["a cat"], ["cat.png"])                                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

import torch

from ..errors import InvalidInputError, RemoteScorerError, UnsupportedInputError
from ..image_io import ImageLike
from ..preprocess import PreprocessConfig
from ..scorer import Scorer

__all__ = ["RemoteScorer", "is_remote_spec", "RETRY_STATUSES"]

logger = logging.getLogger(__name__)

#: statuses retried (as verl-omni's client does): request timeout, too many requests, server errors
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def is_remote_spec(spec: str) -> bool:
    """Whether a model string names a served model (``http://`` or ``https://``)."""
    return spec.strip().lower().startswith(("http://", "https://"))


class RemoteScorer(Scorer):
    """A model served by ``imagereward serve`` at ``url`` (``http[s]://host:port`` for the first model,
    ``.../score/NAME`` for another). ``timeout``: seconds per HTTP request; ``retries``: further tries on a
    retryable failure (exponential back-off from ``backoff`` seconds); ``chunk_size``: most pairs per request.

    Raises :class:`RemoteScorerError` when the server cannot be reached (after the retries) and
    :class:`InvalidInputError` for a URL that is not a served model."""

    is_differentiable = False

    def __init__(self, url: str, *, timeout: float = 120.0, retries: int = 4, backoff: float = 0.5,
                 chunk_size: int = 64, token: str | None = None) -> None:
        super().__init__()
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise InvalidInputError(f"{url!r} is not an http(s) URL of a reward server")
        query = dict(urllib.parse.parse_qsl(parts.query))
        self.token = token or query.pop("token", None) or os.environ.get("IMAGEREWARD_SERVE_TOKEN")
        path = parts.path.rstrip("/")
        if path and not path.startswith("/score/"):
            raise InvalidInputError(f"{_redact(url)!r}: expected http://HOST:PORT or http://HOST:PORT/score/NAME")
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.chunk_size = max(1, int(chunk_size))
        info = self._request("GET", "/v1/models")
        served = info.get("models") or []
        wanted = urllib.parse.unquote(path[len("/score/"):]) if path else None
        model = next((m for m in served if wanted is None or m.get("name") == wanted), None)
        if model is None:
            raise InvalidInputError(f"{self.base_url} serves {[m.get('name') for m in served]}, not {wanted!r}")
        self.model_name = model["name"]
        self.name = f"{self.base_url}/score/{self.model_name}"
        self.uses_prompt = bool(model["uses_prompt"])
        self.higher_is_better = bool(model["higher_is_better"])
        self.exif_transpose = bool(model.get("exif_transpose", True))
        self.default_batch_size = int(model.get("max_batch_size", 32))
        self._configs = tuple(PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
                              for c in model["preprocess"])

    # ------------------------------------------------------------------ preprocessing: the served model's own
    @property
    def preprocess_configs(self) -> tuple[PreprocessConfig, ...]:
        """The served model's preprocessings (several for a mix whose scorers preprocess differently)."""
        return self._configs

    @property
    def preprocess_config(self) -> PreprocessConfig:  # type: ignore[override]
        if len(self._configs) > 1:
            raise UnsupportedInputError(f"the served model {self.name!r} preprocesses images in several ways; "
                                        "read preprocess_configs")
        return self._configs[0]

    def preprocess(self, image: ImageLike, *, index: int | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        from ..engine import preprocess_image
        from ..image_io import load_image

        return preprocess_image(load_image(image, index=index, exif_transpose=self.exif_transpose), self._configs)

    @property
    def device(self) -> torch.device:
        """Pixels stay on the CPU here: the model runs on the server."""
        return torch.device("cpu")

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float32

    # ------------------------------------------------------------------ the batch-engine interface
    def encode_images(self, pixel_values: torch.Tensor | tuple[torch.Tensor, ...]) -> Any:  # type: ignore[override]
        """The "features" of a remote model are the preprocessed pixels themselves (sent when scored)."""
        return pixel_values

    def score_encoded(self, prompts: Sequence[str], image_features: Any) -> torch.Tensor:
        return self.score_pairs(prompts, image_features, torch.arange(len(prompts)))

    def score_pairs(self, prompts: Sequence[str], image_features: Any, image_index: torch.Tensor) -> torch.Tensor:
        """Rewards of ``(prompts[i], image_features[image_index[i]])``, ``chunk_size`` pairs per request;
        float32 ``[P]`` on the CPU."""
        from .protocol import encode_pixel_request

        groups = image_features if isinstance(image_features, tuple) else (image_features,)
        index = [int(i) for i in torch.as_tensor(image_index).tolist()]
        scores: list[float] = []
        for start in range(0, len(index), self.chunk_size):
            part = index[start : start + self.chunk_size]
            used = sorted(set(part))  # send each image of this chunk once
            where = {image: row for row, image in enumerate(used)}
            pixels = tuple(group[used] for group in groups)
            body = encode_pixel_request(prompts[start : start + len(part)],
                                        pixels if len(pixels) > 1 else pixels[0], [where[i] for i in part])
            reply = self._request("POST", f"/v1/score_pixels/{urllib.parse.quote(self.model_name, safe='')}",
                                  body, content_type="application/octet-stream")
            scores.extend(float(s) for s in reply["scores"])
        return torch.tensor(scores, dtype=torch.float32)

    # ------------------------------------------------------------------ HTTP with retries
    def _request(self, method: str, path: str, body: bytes | None = None, *, content_type: str | None = None
                 ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.base_url + path
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method=method)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - http(s) only
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code not in RETRY_STATUSES:
                    raise InvalidInputError(f"{self.base_url} answered {err.code}: {message}") from err
                last = f"HTTP {err.code}: {message}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except json.JSONDecodeError as err:
                raise RemoteScorerError(f"{url} did not answer JSON; is it an ImageReward server?") from err
            logger.warning("%s %s failed (%s); try %d of %d", method, url, last, attempt + 1, self.retries + 1)
        raise RemoteScorerError(f"cannot reach the reward server at {self.base_url} ({last}) after "
                                f"{self.retries + 1} tries; is `imagereward serve` running there?")

    def extra_repr(self) -> str:
        return f"url={self.name!r}, uses_prompt={self.uses_prompt}, differentiable=False"


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read()).get("error", err.reason))
    except Exception:  # noqa: BLE001 - a proxy's HTML page, an empty body
        return str(err.reason)


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode([(k, "***" if k == "token" else v) for k, v in urllib.parse.parse_qsl(parts.query)])
    return urllib.parse.urlunsplit(parts._replace(query=query))
