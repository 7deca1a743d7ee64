"""The reward server: any scorer or mix over HTTP, in the protocol online-RL trainers speak (flow_grpo,
verl-omni, DeepGen), batched across requests; and :class:`RemoteScorer`, the client that makes a served
model a scorer again (``RM.load_scorer("http://host:port/score/NAME")``).

One concept per module: :mod:`.protocol` (wire formats, the restricted unpickler, limits), :mod:`.batcher`
(dynamic batching), :mod:`.metrics` (Prometheus text), :mod:`.app` (the HTTP app), :mod:`.client`
(:class:`RemoteScorer`), :mod:`.ray_serve` (replicas on several GPUs or machines). FastAPI and uvicorn come
with the ``serve`` extra (``pip install fastapi uvicorn``, or in this project's checkout ``pip install -e ".[serve]"``) and are imported only here.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["load_models", "RemoteScorer"]


def load_models(options: Sequence[str], *, device: Any = None, dtype: Any = None, download_root: Any = None,
                max_batch_size: int = 32, max_wait_ms: float = 5.0, decode_workers: int = 4,
                limits: Any = None, metrics: Any = None, warm_up: bool = True) -> list:
    """Load each ``--model`` option (``SPEC`` or ``NAME=SPEC``; SPEC is anything ``RM.load_scorer`` takes)
    through the one resolver, give it a :class:`~.batcher.DynamicBatcher` and warm it up. Returns
    :class:`~.app.ServedModel` objects. Raises what the resolver raises (``UnknownModelError``,
    ``DownloadError``, ...) and :class:`~ImageReward.errors.InvalidInputError` for a repeated route name."""
    from ..errors import InvalidInputError
    from ..resolve import load_scorer
    from .app import ServedModel, route_name, split_model_option
    from .batcher import DynamicBatcher

    served: list = []
    for option in options:
        name, spec = split_model_option(option)
        name = name or route_name(spec, [model.name for model in served])
        if any(model.name == name for model in served):
            raise InvalidInputError(f"two models are served as {name!r}: name them with --model NAME=SPEC")
        scorer = load_scorer(spec, device=device, download_root=download_root, dtype=dtype)
        batcher = DynamicBatcher(scorer, name=name, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                 decode_workers=decode_workers, limits=limits, metrics=metrics)
        if warm_up:
            batcher.warm_up()
        served.append(ServedModel(name, spec, batcher))
    return served


def __getattr__(name: str) -> Any:  # RemoteScorer without importing the HTTP client libraries up front
    if name == "RemoteScorer":
        from .client import RemoteScorer

        return RemoteScorer
    raise AttributeError(name)
