"""The reward server's HTTP app (FastAPI): any scorer or mix, each behind its own dynamic batcher.

Endpoints (``{name}`` is a model's route name, see :func:`route_name`):

* ``POST /`` (the first model) and ``POST /score/{name}``: the flow_grpo / verl-omni pickle protocol
  (:mod:`ImageReward.serving.protocol`); errors are pickled ``{"error": ...}`` with a 4xx/5xx status;
* ``POST /v1/score`` (JSON: ``prompts``, ``images`` as base64 PNG/JPEG, optional ``model``) -> ``{"scores":
  [...], "model": name}``, described in the OpenAPI schema at ``/openapi.json`` (``/docs`` renders it);
* ``POST /v1/score_pixels/{name}``: preprocessed pixels in a safetensors body (lossless; what
  :class:`~ImageReward.serving.client.RemoteScorer` sends);
* ``GET /health`` (200 once every model is loaded and warmed up, else 503), ``GET /v1/models``,
  ``GET /metrics`` (Prometheus text).

With a token (``token=``) every endpoint but ``/health`` wants ``Authorization: Bearer TOKEN`` or
``?token=TOKEN`` (the RL clients take only a URL). Requests beyond the :class:`~ImageReward.serving.protocol.Limits`
get a clear error and the server goes on serving.
"""

# no "from __future__ import annotations": FastAPI reads the endpoints' annotations at definition time
import asyncio
import dataclasses
import hmac
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..engine import preprocess_configs
from ..errors import ImageRewardError
from .batcher import DynamicBatcher
from .metrics import Metrics
from .protocol import (Limits, ProtocolError, parse_json_request, parse_pickle_request, parse_pixel_request,
                       pickle_response)

__all__ = ["ServedModel", "route_name", "model_info", "create_app"]

logger = logging.getLogger(__name__)

_SIMPLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ServedModel:
    """A loaded scorer behind a route: ``name`` (``/score/{name}``), the ``spec`` it was loaded from, and its
    :class:`~ImageReward.serving.batcher.DynamicBatcher`."""

    name: str
    spec: str
    batcher: DynamicBatcher

    @property
    def scorer(self) -> Any:
        return self.batcher.scorer


def route_name(spec: str, taken: Sequence[str] = ()) -> str:
    """The route name of ``--model SPEC``: ``NAME=SPEC`` gives ``NAME``; a plain name (``ImageReward-v1.0``,
    ``CLIP``) is its own name; a path gives its last part; anything else (a mix) ``model<N>``; a name already
    ``taken`` gets ``-2``, ``-3``, ...

    >>> route_name("CLIP"), route_name("./runs/best/"), route_name("ImageReward-v1.0:1,Aesthetic:0.1")
    ('CLIP', 'best', 'model0')
    """
    text = spec.strip().rstrip("/\\")
    candidate = text.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    if "," in text or ":" in candidate or not _SIMPLE_NAME.match(candidate):
        candidate = f"model{len(taken)}"
    base, number = candidate, 2
    while candidate in taken:  # two folders of the same name: tiny, tiny-2
        candidate, number = f"{base}-{number}", number + 1
    return candidate


def split_model_option(option: str) -> tuple[str | None, str]:
    """``"NAME=SPEC"`` -> ``(NAME, SPEC)``; a plain SPEC -> ``(None, SPEC)``."""
    name, sep, spec = option.partition("=")
    if sep and _SIMPLE_NAME.match(name.strip()) and spec.strip():
        return name.strip(), spec.strip()
    return None, option.strip()


def model_info(model: ServedModel) -> dict[str, Any]:
    """What ``GET /v1/models`` says of a model (and what a remote scorer needs to preprocess for it)."""
    scorer = model.scorer
    return {
        "name": model.name, "spec": model.spec, "scorer": getattr(scorer, "name", type(scorer).__name__),
        "uses_prompt": bool(scorer.uses_prompt), "higher_is_better": bool(scorer.higher_is_better),
        "dtype": str(scorer.input_dtype).replace("torch.", ""), "device": str(scorer.device),
        "exif_transpose": bool(getattr(scorer, "exif_transpose", True)),
        "preprocess": [dataclasses.asdict(config) for config in preprocess_configs(scorer)],
        "max_batch_size": model.batcher.max_batch_size,
    }


def create_app(models: Sequence[ServedModel], *, limits: Limits | None = None, token: str | None = None,
               metrics: Metrics | None = None):
    """The FastAPI app serving ``models`` (already loaded and warmed up; their batchers are started with the
    app and stopped, after finishing what is queued, when it shuts down). ``/health`` is ready while every
    batcher runs."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from pydantic import BaseModel, Field

    if not models:
        raise ValueError("create_app needs at least one model")
    limits = limits or Limits()
    metrics = metrics or Metrics()
    by_name = {model.name: model for model in models}

    def started() -> bool:  # the batchers run (started by the lifespan below, or by whoever built the app)
        return all(model.batcher.running for model in models)

    @asynccontextmanager
    async def lifespan(app):
        for model in models:
            model.batcher.start()
        try:
            yield
        finally:
            for model in models:
                await asyncio.to_thread(model.batcher.stop)

    app = FastAPI(title="ImageReward reward server", version="1", lifespan=lifespan,
                  description="Any ImageReward scorer or mix over HTTP, batched across requests. "
                              "POST / and /score/{name} speak the flow_grpo / verl-omni pickle protocol.")

    class ScoreBody(BaseModel):
        images: list[str] = Field(..., description="base64-encoded PNG or JPEG files (a data: URL works too)")
        prompts: Optional[list[str]] = Field(None, description="one prompt per image (optional for a model "
                                                               "that uses no prompt)")
        model: Optional[str] = Field(None, description="route name of the model (default: the first)")

    class ScoreReply(BaseModel):
        scores: list[float]
        model: str

    def pickled(payload: dict, status: int = 200) -> Response:
        return Response(pickle_response(payload), status_code=status, media_type="application/octet-stream")

    def json_error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def authorised(request: Request) -> bool:
        if not token:
            return True
        offered = request.query_params.get("token", "")
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            offered = header[7:].strip()
        return hmac.compare_digest(offered.encode(), token.encode())

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if request.url.path != "/health" and not authorised(request):
            message = "missing or wrong token: send 'Authorization: Bearer TOKEN' or '?token=TOKEN'"
            pickle_route = request.method == "POST" and (request.url.path == "/" or request.url.path.startswith("/score/"))
            return pickled({"error": message}, 401) if pickle_route else json_error(message, 401)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:  # refused before the body is read
            message = f"the body is {declared} bytes; the limit is {limits.max_body_bytes} (--max-body-mb)"
            pickle_route = request.method == "POST" and (request.url.path == "/" or request.url.path.startswith("/score/"))
            return pickled({"error": message}, 413) if pickle_route else json_error(message, 413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_json(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
                             for err in exc.errors())
        return json_error(f"the JSON body does not match the schema ({problems})", 400)

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ProtocolError(f"the body exceeds {limits.max_body_bytes} bytes (--max-body-mb)", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    def find(name: str | None) -> ServedModel:
        if name is None:
            return models[0]
        if name not in by_name:
            raise ProtocolError(f"no model {name!r} here; served: {sorted(by_name)}", status=404)
        return by_name[name]

    async def score(model: ServedModel, parse: Callable[[], Any]) -> list[float]:
        if not started():
            raise ProtocolError("the server is starting: models are not ready yet", status=503)
        request = await asyncio.to_thread(parse)
        job = await asyncio.to_thread(model.batcher.prepare, request)
        future = model.batcher.submit(job)
        try:
            scores = await asyncio.wait_for(asyncio.wrap_future(future), timeout=limits.timeout_s)
        except asyncio.TimeoutError as err:
            future.cancel()
            raise ProtocolError(f"no scores within {limits.timeout_s:g} s (--request-timeout)", status=504) from err
        metrics.inc("pairs_total", len(scores), model=model.name)
        return scores

    async def answer(route: str, name: str | None, request: Request, parse: Callable[[bytes, ServedModel], Any],
                     reply: Callable[[dict, int], Response], success: Callable[[ServedModel, list], dict]
                     ) -> Response:
        started = time.perf_counter()
        label = name or models[0].name
        try:
            model = find(name)
            body = await read_body(request)
            scores = await score(model, lambda: parse(body, model))
            status, response = 200, reply(success(model, scores), 200)
        except ProtocolError as err:
            status, response = err.status, reply({"error": str(err)}, err.status)
        except (ImageRewardError, FloatingPointError) as err:
            status, response = 422, reply({"error": f"{type(err).__name__}: {err}"}, 422)
        except Exception as err:  # noqa: BLE001 - one request's failure never stops the server
            logger.exception("request to %s failed", route)
            status, response = 500, reply({"error": f"{type(err).__name__}: {err}"}, 500)
        metrics.inc("requests_total", model=label, route=route, status=str(status))
        if status >= 400:
            metrics.inc("request_errors_total", model=label, route=route)
        metrics.observe("request_seconds", time.perf_counter() - started, model=label, route=route)
        return response

    def pickle_parse(body: bytes, model: ServedModel):
        return parse_pickle_request(body, uses_prompt=model.scorer.uses_prompt, limits=limits)

    def json_parse(body: bytes, model: ServedModel):
        return parse_json_request(body, uses_prompt=model.scorer.uses_prompt, limits=limits)

    def pixel_parse(body: bytes, model: ServedModel):
        sizes = [config.image_size for config in preprocess_configs(model.scorer)]
        return parse_pixel_request(body, image_sizes=sizes, limits=limits)

    def pickled_scores(model: ServedModel, scores: list) -> dict:
        return {"scores": scores}

    def json_scores(model: ServedModel, scores: list) -> dict:
        return {"scores": scores, "model": model.name}

    def json_reply(payload: dict, status: int) -> Response:
        return JSONResponse(payload, status_code=status)

    @app.post("/", include_in_schema=False)
    async def score_default(request: Request) -> Response:
        return await answer("pickle", None, request, pickle_parse, pickled, pickled_scores)

    @app.post("/score/{name}", include_in_schema=False)
    async def score_named(name: str, request: Request) -> Response:
        return await answer("pickle", name, request, pickle_parse, pickled, pickled_scores)

    @app.post("/v1/score", response_model=ScoreReply,
              responses={400: {"description": "bad request ({\"error\": ...})"},
                         404: {"description": "unknown model"}, 413: {"description": "over a limit"},
                         422: {"description": "an image that cannot be read"}})
    async def score_json(body: ScoreBody, request: Request) -> Response:
        """Score images (base64 PNG/JPEG) against prompts with one model; see the server's limits."""
        raw = json.dumps(body.model_dump(exclude={"model"})).encode()
        return await answer("json", body.model, request, lambda _b, m: json_parse(raw, m), json_reply, json_scores)

    @app.post("/v1/score_pixels/{name}", include_in_schema=False)
    async def score_pixels_route(name: str, request: Request) -> Response:
        return await answer("pixels", name, request, pixel_parse, json_reply, json_scores)

    @app.get("/health")
    async def health() -> Response:
        ok = started()
        return JSONResponse({"status": "ok" if ok else "loading", "models": [m.name for m in models]},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({"models": [model_info(model) for model in models]})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
