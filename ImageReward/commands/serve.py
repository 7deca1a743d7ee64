"""``imagereward serve``: any scorer or mix over HTTP (flow_grpo / verl-omni pickle protocol, JSON, metrics),
batched across requests. See ``ImageReward/serving/`` and the README's "Reward server" section."""

from __future__ import annotations

import argparse
import logging
import os

from ..validation import arg_dtype, arg_non_negative_float, arg_positive_float, arg_positive_int

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve scorers over HTTP for online-RL trainers (flow_grpo / verl-omni protocol)",
        description="Serve one or more scorers over HTTP, batched across concurrent requests. POST / and "
                    "/score/NAME: the flow_grpo / verl-omni pickle protocol; POST /v1/score: JSON; GET /health, "
                    "/v1/models, /metrics.")
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]SPEC",
                        help="a scorer as RM.load_scorer takes it (name, mix NAME[:WEIGHT],..., checkpoint); "
                             "repeat for several models, each at /score/NAME (the first also at POST /)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=18081)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", type=arg_dtype, default="float32", help="float32, bfloat16 or float16 (image side)")
    parser.add_argument("--download-root", default=None, help="where checkpoints are cached (default ~/.cache/ImageReward)")
    parser.add_argument("--max-batch-size", type=arg_positive_int, default=32, help="most pairs per model call")
    parser.add_argument("--max-wait-ms", type=arg_non_negative_float, default=5.0,
                        help="longest wait for more requests before a batch starts")
    parser.add_argument("--decode-workers", type=arg_positive_int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding images")
    parser.add_argument("--max-images-per-request", type=arg_positive_int, default=256)
    parser.add_argument("--max-body-mb", type=arg_positive_float, default=64.0)
    parser.add_argument("--max-pixels", type=arg_positive_int, default=40_000_000,
                        help="pixels of one image (larger ones are refused before decoding)")
    parser.add_argument("--request-timeout", type=arg_positive_float, default=120.0, help="seconds per request")
    parser.add_argument("--token", default=os.environ.get("IMAGEREWARD_SERVE_TOKEN"),
                        help="shared token, sent as 'Authorization: Bearer TOKEN' or '?token=TOKEN' "
                             "(default: $IMAGEREWARD_SERVE_TOKEN; none: no check)")
    parser.add_argument("--ray-replicas", type=arg_positive_int, default=None,
                        help="serve through Ray Serve with this many replicas (one GPU each when there are "
                             "GPUs; needs the serve-ray extra); default: one process, no cluster")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..serving.protocol import Limits

    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_images=args.max_images_per_request,
                    max_pixels=args.max_pixels, timeout_s=args.request_timeout)
    settings = dict(device=args.device, dtype=args.dtype, download_root=args.download_root,
                    max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                    decode_workers=args.decode_workers, limits=limits)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        logger.warning("serving on %s without --token: anyone who reaches this address can use the models",
                       args.host)
    if args.ray_replicas:
        from ..serving.ray_serve import run_ray_serve

        return run_ray_serve(args.model, replicas=args.ray_replicas, host=args.host, port=args.port,
                             token=args.token, **settings)
    try:
        import uvicorn
    except ImportError as err:
        from ..errors import InvalidInputError

        raise InvalidInputError('imagereward serve needs FastAPI and uvicorn: pip install fastapi uvicorn (in '
                                'this project\'s checkout, pip install -e ".[serve]")') from err
    from ..serving import load_models
    from ..serving.app import create_app
    from ..serving.metrics import Metrics

    metrics = Metrics()
    models = load_models(args.model, metrics=metrics, **settings)
    app = create_app(models, limits=limits, token=args.token, metrics=metrics)
    logger.warning("serving %s on http://%s:%d", ", ".join(m.name for m in models), args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=int(args.request_timeout) + 5)
    uvicorn.Server(config).run()
    return 0
