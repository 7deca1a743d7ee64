"""Several GPUs or machines: the same app (:func:`~ImageReward.serving.app.create_app`), one replica per GPU,
through Ray Serve, which routes requests to replicas, restarts failed ones and spans a Ray cluster.

Each replica loads the models itself (on the GPU Ray gives it) and batches its requests with its own
:class:`~ImageReward.serving.batcher.DynamicBatcher`: one batching mechanism, whether there is one replica or
many. ``GET /metrics`` and ``GET /health`` answer for the replica that got the request.

    imagereward serve --model ImageReward-v1.0 --ray-replicas 8 --host 0.0.0.0 --port 18081
    RAY_ADDRESS=auto imagereward serve ... --ray-replicas 32      # on a running Ray cluster (ray start --head ...)

Needs Ray Serve: ``pip install "ray[serve]" fastapi uvicorn`` (in this project's checkout,
``pip install -e ".[serve-ray]"``).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Sequence

__all__ = ["build_deployment", "run_ray_serve"]

logger = logging.getLogger(__name__)


def build_deployment(options: Sequence[str], *, replicas: int, token: str | None = None, limits: Any = None,
                     gpus_per_replica: float | None = None, **load_settings: Any):
    """A bound Ray Serve application: ``replicas`` copies of the reward-server app, each loading ``options``
    (``--model`` values) with ``load_settings`` (see :func:`~ImageReward.serving.load_models`).
    ``gpus_per_replica`` defaults to 1 when this machine has a GPU, else 0."""
    import torch
    from ray import serve

    options = list(options)

    def build_app():  # runs on each replica
        from . import load_models
        from .app import create_app
        from .metrics import Metrics

        metrics = Metrics()
        models = load_models(options, metrics=metrics, limits=limits, **load_settings)
        for model in models:
            model.batcher.start()
        return create_app(models, limits=limits, token=token, metrics=metrics)

    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if torch.cuda.is_available() else 0.0
    deployment = serve.deployment(
        serve.ingress(build_app)(), name="imagereward", num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": 1},
        max_ongoing_requests=1024,  # a replica takes many requests at once: its batcher groups them
    )
    return deployment.bind()


def run_ray_serve(options: Sequence[str], *, replicas: int, host: str, port: int, token: str | None = None,
                  **settings: Any) -> int:
    """Start (or join, with ``$RAY_ADDRESS``) a Ray cluster, serve ``replicas`` replicas on ``host:port``, and
    block until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError as err:
        from ..errors import InvalidInputError

        raise InvalidInputError('--ray-replicas needs Ray Serve: pip install "ray[serve]" (in this project\'s '
                                'checkout, pip install -e ".[serve-ray]")') from err
    address = os.environ.get("RAY_ADDRESS")
    local = {} if address else {"include_dashboard": False}
    if not address and host in ("127.0.0.1", "localhost"):
        local["_node_ip_address"] = "127.0.0.1"  # a local cluster that listens on this machine only
    # "local": always a new cluster of this process's own, never one another program left running here
    ray.init(address=address or "local", ignore_reinit_error=True, **local)
    serve.start(http_options={"host": host, "port": port})
    limits = settings.pop("limits", None)
    app = build_deployment(options, replicas=replicas, token=token, limits=limits, **settings)
    logger.warning("serving %s with %d Ray Serve replica(s) on http://%s:%d", ", ".join(options), replicas, host, port)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM also shuts the replicas and the cluster down
    try:
        serve.run(app, name="imagereward", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        logger.warning("shutting down the Ray Serve replicas")
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        ray.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
