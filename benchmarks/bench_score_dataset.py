"""Overhead of ``score-dataset`` over the bare engine: images/s of ``model.score_batch`` vs ``score_dataset``
(journaled, DataLoader workers) on the same images, plus the cost of a resume pass that has nothing to do.

    python benchmarks/bench_score_dataset.py --images 16 --size full      # ViT-L/16 ImageReward, random weights
    python benchmarks/bench_score_dataset.py --images 200 --size tiny     # the I/O path alone
    python benchmarks/bench_score_dataset.py --images 1024 --batch-size 64 --workers 8 --device cuda --dtype bf16

``--ray`` instead compares, on the same WebDataset shards and in one run, rows/s of (1) ``score_dataset`` (one
process, DataLoader workers), (2) ``score_dataset_ray`` on one node, and (3) on a local cluster of two raylets
(``ray.cluster_utils.Cluster``, 127.0.0.1), with the peak resident memory of each (this process and every process
under it, sampled every 0.2 s). The Ray runs include starting the actors (each loads the scorer) and the
driver's one check load, not starting Ray itself:

    python benchmarks/bench_score_dataset.py --ray --images 64 --shards 8 --size tiny

Weights are random (the architecture decides the speed); no network is used.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the image side in bf16, as RM.load(dtype=torch.bfloat16)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--ray", action="store_true", help="single process vs --engine ray (one node, two raylets)")
    parser.add_argument("--shards", type=int, default=8, help="--ray: tar shards the images are split into")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ray:
        return ray_comparison(args)

    import ImageReward as RM
    from ImageReward.models.blip import BLIPConfig
    from ImageReward.scoring.runner import DistributedContext, score_dataset

    torch.manual_seed(0)
    model = RM.ImageReward(BLIPConfig.tiny() if args.size == "tiny" else BLIPConfig()).eval().to(args.device)
    if args.dtype == "bf16":
        model.set_image_dtype(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.images):
            path = folder / f"{i:04d}.jpg"
            Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(str(path))
        prompt = "a photograph of an astronaut riding a horse"
        model.score_batch(prompt, paths[:2], batch_size=2)  # warm-up
        results = {}
        start = time.perf_counter()
        model.score_batch(prompt, paths, batch_size=args.batch_size)
        results["engine score_batch"] = args.images / (time.perf_counter() - start)
        for workers in args.workers:
            out = Path(tmp) / f"scores-{workers}.jsonl"
            start = time.perf_counter()
            score_dataset(model, folder, out, prompt=prompt, batch_size=args.batch_size, num_workers=workers,
                          progress=False, context=DistributedContext())
            results[f"score_dataset workers={workers}"] = args.images / (time.perf_counter() - start)
            start = time.perf_counter()
            score_dataset(model, folder, out, prompt=prompt, progress=False, context=DistributedContext())
            results[f"resume pass, nothing left (s) workers={workers}"] = time.perf_counter() - start
    summary = {"size": args.size, "images": args.images, "batch_size": args.batch_size, "device": args.device,
               "dtype": args.dtype, "threads": torch.get_num_threads(), "images_per_s": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=2))


class PeakMemory:
    """Peak summed RSS of this process and all its descendants (Ray's raylets and workers included)."""

    def __enter__(self) -> "PeakMemory":
        import psutil

        self.peak = 0
        self._stop = threading.Event()

        def sample() -> None:
            me = psutil.Process()
            while not self._stop.is_set():
                total = 0
                for process in [me, *me.children(recursive=True)]:
                    try:
                        total += process.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                time.sleep(0.2)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_shards(folder: Path, images: int, shards: int) -> None:
    rng = np.random.default_rng(0)
    per_shard = -(-images // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
                for extension, data in (("jpg", buffer.getvalue()), ("txt", b"a photograph of an astronaut riding a horse")):
                    info = tarfile.TarInfo(f"{i:08d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def ray_comparison(args: argparse.Namespace) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported: 127.0.0.1 only
    import ray
    from ray.cluster_utils import Cluster

    import ImageReward as RM
    from ImageReward.models.blip import BLIPConfig
    from ImageReward.scoring.ray_engine import score_dataset_ray
    from ImageReward.scoring.runner import DistributedContext, score_dataset

    cpus = os.cpu_count() or 1
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "shards").mkdir()
        write_shards(tmp / "shards", args.images, args.shards)
        torch.manual_seed(0)
        model = RM.ImageReward(BLIPConfig.tiny() if args.size == "tiny" else BLIPConfig()).eval()
        model.save_pretrained(tmp / "model")
        model = model.to(args.device)
        dtype = "bfloat16" if args.dtype == "bf16" else "float32"
        if args.dtype == "bf16":
            model.set_image_dtype(torch.bfloat16)
        gpu = args.device.startswith("cuda")

        def single_process(name: str, output: str) -> None:
            with PeakMemory() as memory:
                start = time.perf_counter()
                score_dataset(model, tmp / "shards", tmp / output, batch_size=args.batch_size,
                              num_workers=max(args.workers), progress=False, context=DistributedContext())
                seconds = time.perf_counter() - start
            results[name] = {"rows_per_s": args.images / seconds, "seconds": seconds,
                             "peak_rss_gib": memory.peak / 2**30}

        single_process("single process", "single.parquet")

        # the same machine's CPUs, split as the engine's defaults would: 1 decode CPU, the rest for actors
        ray_args = dict(batch_size=args.batch_size, actors=1, actor_cpus=max(1.0, cpus - 1.0), decode_cpus=1.0,
                        actor_gpus=1.0 if gpu else 0.0, device=args.device, dtype=dtype, progress=False)
        ray.init(num_cpus=cpus, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
        try:
            with PeakMemory() as memory:
                start = time.perf_counter()
                score_dataset_ray(str(tmp / "model"), tmp / "shards", tmp / "ray-1", **ray_args)
                seconds = time.perf_counter() - start
            results["ray, one node"] = {"rows_per_s": args.images / seconds, "seconds": seconds,
                                        "peak_rss_gib": memory.peak / 2**30}
        finally:
            ray.shutdown()

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": max(1, cpus // 2),
                                                                "num_gpus": 1 if gpu else 0,
                                                                "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=max(1, cpus // 2))
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            with PeakMemory() as memory:
                start = time.perf_counter()
                score_dataset_ray(str(tmp / "model"), tmp / "shards", tmp / "ray-2", batch_size=args.batch_size,
                                  actors=1 if gpu else 2, actor_cpus=0.5, decode_cpus=0.5,
                                  actor_gpus=1.0 if gpu else 0.0, device=args.device, dtype=dtype, progress=False)
                seconds = time.perf_counter() - start
            results["ray, two raylets"] = {"rows_per_s": args.images / seconds, "seconds": seconds,
                                           "peak_rss_gib": memory.peak / 2**30}
        finally:
            ray.shutdown()
            cluster.shutdown()
        # once more at the end: on a shared machine the spread of the two single-process runs is the noise
        single_process("single process again", "single-again.parquet")

    base = results["single process"]["rows_per_s"]
    print(f"{'path':<22} {'rows/s':>8} {'vs single':>10} {'seconds':>8} {'peak RSS GiB':>13}")
    for name, row in results.items():
        print(f"{name:<22} {row['rows_per_s']:>8.2f} {row['rows_per_s'] / base:>10.2f} {row['seconds']:>8.1f} "
              f"{row['peak_rss_gib']:>13.2f}")
    summary = {"size": args.size, "images": args.images, "shards": args.shards, "batch_size": args.batch_size,
               "device": args.device, "dtype": args.dtype, "cpus": cpus, "results": results,
               "images_per_s": {name: row["rows_per_s"] for name, row in results.items()}}  # as the default mode
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
