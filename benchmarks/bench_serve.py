"""Reward-server throughput and latency: ``imagereward serve`` (dynamic batching across requests) against the
field's pattern (Flask + gunicorn sync workers calling the original package's ``score(prompt, image)`` pair by
pair), printed as a Markdown table.

Both servers answer the flow_grpo / verl-omni pickle protocol on 127.0.0.1 and load the same full-size
ImageReward (random weights, saved once to a temporary folder; timing does not depend on the values). The
baseline runs the original algorithm (``bench_score.original_algorithm``: ViT and text encoder at batch 1 per
pair, the original's kernels) in each sync worker, as the ImageReward services of flow_grpo-style projects
do; it is built here from that description. Clients are asyncio + aiohttp, ``C`` concurrent clients each
sending requests of ``K`` JPEG images back to back (verl-omni sends ``K = 1``, all of a batch at once). Both
servers run side by side and each configuration runs on one, then the other, so that a shared machine's
drift hits both alike.

    flock /tmp/ir-bigmem.lock python benchmarks/bench_serve.py                  # full size (~1.8 GB a process)
    python benchmarks/bench_serve.py --quick                                     # tiny model: checks the script
    python benchmarks/bench_serve.py --configs 1x1 8x1 32x1 1x8 8x8 --images 32  # CLIENTSxIMAGES, shorter on CPU
    python benchmarks/bench_serve.py --device cuda --workers 1                   # on a GPU

Needs the ``serve`` extra plus flask, gunicorn and aiohttp (``pip install flask gunicorn aiohttp``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FLASK_APP = textwrap.dedent('''
    """The field's reward service, from its description: Flask, gunicorn sync workers, one pair at a time."""
    import io, os, sys
    import torch
    from flask import Flask, request
    from PIL import Image
    sys.path.insert(0, os.environ["BENCH_DIR"])
    import ImageReward as RM
    from bench_score import original_algorithm
    from ImageReward.serving.protocol import pickle_response, safe_loads

    torch.set_num_threads(int(os.environ.get("WORKER_THREADS", "1")))
    model = RM.load(os.environ["MODEL_DIR"], device=os.environ.get("DEVICE", "cpu"))
    app = Flask(__name__)

    @app.post("/")
    def score():
        payload = safe_loads(request.get_data())
        scores = []
        with torch.no_grad():
            for prompt, data in zip(payload["prompts"], payload["images"]):
                image = Image.open(io.BytesIO(data)).convert("RGB")
                scores.append(float(original_algorithm(model, [prompt], [image])[0]))
        return pickle_response({"scores": scores})

    @app.get("/health")
    def health():
        return "ok"
''')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 900.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"{url} not ready after {timeout} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def jpegs(n: int, size: int = 512) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


async def load_test(url: str, images: list[bytes], clients: int, per_request: int, requests_per_client: int
                    ) -> dict:
    import aiohttp

    latencies: list[float] = []

    async def client(session, c):
        for r in range(requests_per_client):
            batch = [images[(c * requests_per_client + r + k) % len(images)] for k in range(per_request)]
            body = pickle.dumps({"images": batch, "prompts": [f"a photo, client {c}"] * per_request, "metadata": {}})
            started = time.perf_counter()
            async with session.post(url + "/", data=body) as response:
                payload = pickle.loads(await response.read())  # our own benchmark servers' answers
                assert response.status == 200 and len(payload["scores"]) == per_request, payload
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, c) for c in range(clients)))
        seconds = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    n_images = clients * requests_per_client * per_request
    return {"images_per_s": n_images / seconds, "p50": pick(0.5), "p99": pick(0.99), "requests": len(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model (checks the script)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn sync workers of the baseline")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per server in all")
    parser.add_argument("--configs", nargs="+", default=["1x1", "8x1", "32x1", "1x8", "8x8", "32x8"],
                        help="CLIENTSxIMAGES_PER_REQUEST")
    parser.add_argument("--images", type=int, default=32, help="images sent per configuration (about)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--only", choices=("ours", "field"), default=None)
    parser.add_argument("--dtype", default="float32", help="our server's image-side dtype (bf16: see bench_score)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    from bench_score import build_model

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = build_model(args.quick, "fp32")
    model.save_pretrained(work / "model")
    del model
    images = jpegs(16, 64 if args.quick else 512)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENCH_DIR": str(HERE), "MODEL_DIR": str(work / "model"),
           "DEVICE": args.device, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    (work / "field_app.py").write_text(FLASK_APP)
    servers = {
        "ours": lambda port: [sys.executable, "-m", "ImageReward.cli", "serve", "--model", str(work / "model"),
                              "--port", str(port), "--device", args.device, "--max-batch-size",
                              str(args.max_batch_size), "--max-wait-ms", "10", "--request-timeout", "3600",
                              "--dtype", args.dtype],
        "field": lambda port: [sys.executable, "-m", "gunicorn", "-w", str(args.workers), "-k", "sync",
                               "--timeout", "3600", "-b", f"127.0.0.1:{port}", "--chdir", str(work), "field_app:app"],
    }
    threads = {"ours": args.threads, "field": max(1, args.threads // args.workers)}
    rows: list[dict] = []
    try:
        run_servers(args, servers, threads, env, work, images, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the saved model: ~1.8 GB at full size
    print_table(args, threads, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "dtype": args.dtype, "quick": args.quick,
                                               "rows": rows}, indent=1))
    return 0


def run_servers(args, servers, threads, env, work, images, rows) -> None:
    """Start every server, then run each configuration on each server in turn (interleaved, so that the
    drift of a shared machine hits both alike)."""
    processes, urls = {}, {}
    try:
        for name, command in servers.items():
            if args.only and name != args.only:
                continue
            port = free_port()
            server_env = {**env, "OMP_NUM_THREADS": str(threads[name]), "WORKER_THREADS": str(threads[name])}
            processes[name] = subprocess.Popen(command(port), env=server_env, start_new_session=True,
                                               stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "wb"))
            urls[name] = f"http://127.0.0.1:{port}"
        for name, url in urls.items():
            wait_ready(url, processes[name])
            for _ in range(args.workers if name == "field" else 1):  # warm up every worker
                asyncio.run(load_test(url, images, 1, 1, 1))
        for config in args.configs:
            clients, size = (int(part) for part in config.split("x"))
            per_client = max(1, round(args.images / (clients * size)))
            for name, url in urls.items():
                result = asyncio.run(load_test(url, images, clients, size, per_client))
                label = name if name == "field" or args.dtype in ("float32", "fp32") else f"{name} ({args.dtype})"
                rows.append({"server": label, "config": f"{clients}x{size}", "clients": clients, "size": size,
                             **result})
                print(f"{label:6s} clients={clients:3d} images/request={size}: {result['images_per_s']:.2f} img/s, "
                      f"p50 {result['p50']:.2f} s, p99 {result['p99']:.2f} s", file=sys.stderr, flush=True)
    finally:
        for process in processes.values():
            stop(process)


def print_table(args, threads, rows) -> None:
    import torch

    print(f"\n{'tiny' if args.quick else 'full-size'} ImageReward, random weights, device {args.device}, "
          f"torch {torch.__version__}, {args.threads} CPU threads per server; field = Flask + gunicorn "
          f"{args.workers} sync workers x {threads['field']} threads, original algorithm pair by pair; "
          f"ours = imagereward serve, max batch {args.max_batch_size}; 512x512 JPEGs; one run\n")
    print("| server | clients | images / request | images/s | p50 latency (s) | p99 latency (s) | vs field |")
    print("|---|---|---|---|---|---|---|")
    field = {(r["clients"], r["size"]): r["images_per_s"] for r in rows if r["server"] == "field"}
    for r in sorted(rows, key=lambda r: (r["server"] == "field", r["size"], r["clients"])):
        ratio = r["images_per_s"] / field[(r["clients"], r["size"])] if (r["clients"], r["size"]) in field else None
        print(f"| {r['server']} | {r['clients']} | {r['size']} | {r['images_per_s']:.2f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} | {'' if ratio is None or r['server'] == 'field' else f'{ratio:.2f}x'} |")


if __name__ == "__main__":
    raise SystemExit(main())
