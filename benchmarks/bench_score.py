"""Throughput and peak memory of ImageReward scoring, printed as a Markdown table.

Each configuration runs in its own subprocess so that peak RSS is its own. Weights are random (timing does
not depend on their values); images are random 512x512 RGB PNGs.

    python benchmarks/bench_score.py                      # full size, the issue's configurations
    python benchmarks/bench_score.py --quick              # tiny model, to check the script works
    python benchmarks/bench_score.py --configs original:1x8 batched-fp32:1x8 batched-bf16:1x8

    python benchmarks/bench_score.py --baselines          # the CLIP, BLIP and Aesthetic baselines too
    python benchmarks/bench_score.py --zoo                # HPSv2 and PickScore (ViT-H-14, ~4 GB each in fp32)
    python benchmarks/bench_score.py --device cuda --peak-tflops 989 --configs original:1x64 batched-bf16:1x64
    python benchmarks/bench_score.py --quick --configs batched-bf16:1x8 --json rows.json   # rows as JSON too

Modes:
  original       the original's algorithm and kernels: one image at a time through the ViT and the text encoder,
                 prompts padded to 35 tokens, plain F.linear, fp32
  batched-fp32   our engine (batched ViT, each distinct image once, cached cross-attention K/V), fp32
  batched-bf16   our engine with the image side in bf16 (text encoder and head fp32), as RM.load(dtype=torch.bfloat16)
  compiled-fp32 / compiled-bf16   the same with the ViT compiled (torch.compile; compile time excluded)
  CLIP-fp32, CLIP-bf16, BLIP-fp32, BLIP-bf16, Aesthetic-fp32, Aesthetic-bf16   the baseline scorers
  HPSv2-fp32, HPSv2-bf16, PickScore-fp32, PickScore-bf16   HPSv2(.1) and PickScore on our engine
  HPSv2-original   hpsv2.score's algorithm (hpsv2 1.2.0 does not import as shipped, so it is re-run here on the
                 same transformers model and kernels): every call re-reads the whole checkpoint (torch.load +
                 load_state_dict of a file written by the worker), then one image at a time, the prompt encoded
                 again for each image at 77 tokens
  PickScore-original   PickScore's model-card snippet: per prompt, every image through the ViT as one batch,
                 the prompt unpadded, softmax; images preprocessed one by one (the processor's PIL work)
Shapes are PROMPTSxIMAGES: 1x32 is one prompt and 32 images, 32x1 is 32 prompts for one image.

Every mode but the originals also times the ViT alone on a batch of its distinct images (random pixels in the
model's input dtype) and reports its rate from the FLOPs its config implies (``vit_flops``): "ViT TFLOP/s", and
with ``--peak-tflops`` the share of that peak. ``--json`` writes the rows (rewritten after each configuration, so
a run stopped part-way keeps what finished), with peak GPU memory on CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIGS = [  # the matrix (1 prompt x 32 images, 32 x 1, with and without compile) and 1 x 8
    f"{mode}:{shape}" for shape in ("1x8", "1x32", "32x1")
    for mode in ("original", "batched-fp32", "batched-bf16") + (("compiled-fp32", "compiled-bf16") if shape != "1x8" else ())
]
BASELINE_CONFIGS = [f"{name}-{dtype}:1x8" for name in ("CLIP", "BLIP", "Aesthetic") for dtype in ("fp32", "bf16")]
# 1 prompt x 8 images, and 8 prompts x 1 image, where the originals re-encode the image for every prompt
# (PickScore's model card) or every pair (hpsv2, which also re-reads its checkpoint on every call)
ZOO_CONFIGS = [f"{name}-{mode}:{shape}" for name in ("HPSv2", "PickScore") for shape in ("1x8", "8x1")
               for mode in ("original", "fp32", "bf16")]
SCORER_NAMES = ("CLIP", "BLIP", "Aesthetic", "HPSv2", "PickScore")


def _randomise(module) -> None:
    """Fill a meta-built module with random weights (timing does not depend on their values)."""
    import torch

    module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for name, buffer in module.named_buffers():
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand(buffer.shape))


def build_baseline(name: str, quick: bool):
    """CLIP / BLIP / Aesthetic / HPSv2 / PickScore with random weights, built on meta and filled (no slow
    init, no files)."""
    import torch

    from ImageReward.models.aesthetic import AestheticScorer
    from ImageReward.models.blip import BLIPConfig
    from ImageReward.models.blip_itc import BLIPITCScorer
    from ImageReward.models.clip import (VIT_H_14, VIT_L_14, CLIPScorer, build_clip_model, clip_config,
                                         tiny_clip_hparams)
    from ImageReward.models.hps import HPSv2Scorer, tiny_hps_hparams
    from ImageReward.models.pickscore import PICKSCORE_PREPROCESS, PickScoreScorer

    if name in ("HPSv2", "PickScore"):
        with torch.device("meta"):
            model = build_clip_model(clip_config(tiny_hps_hparams() if quick else VIT_H_14))
        _randomise(model)
        if name == "PickScore":
            config = PICKSCORE_PREPROCESS if not quick else dataclasses.replace(PICKSCORE_PREPROCESS, image_size=32)
            return PickScoreScorer(model, config).eval()
        return HPSv2Scorer(model).eval()
    hparams = tiny_clip_hparams() if quick else VIT_L_14
    with torch.device("meta"):
        if name == "CLIP":
            scorer = CLIPScorer(build_clip_model(clip_config(hparams)))
        elif name == "BLIP":
            scorer = BLIPITCScorer(BLIPConfig.tiny() if quick else BLIPConfig())
        elif name == "Aesthetic":
            scorer = AestheticScorer.build(hparams)
        else:
            raise SystemExit(f"unknown scorer {name}")
    _randomise(scorer)
    return scorer.eval()


def build_model(quick: bool, dtype_name: str):
    import torch

    from ImageReward.models.blip import BLIPConfig
    from ImageReward.models.image_reward import ImageReward

    config = BLIPConfig.tiny() if quick else BLIPConfig()
    with torch.device("meta"):
        model = ImageReward(config)
    _randomise(model)
    model.eval()
    if dtype_name == "bf16":  # as RM.load(dtype=torch.bfloat16): image side bf16, text encoder and head fp32
        model.set_image_dtype(torch.bfloat16)
    return model


def original_algorithm(model, prompt_list, images):
    """What ImageReward 1.5 does: per (prompt, image), ViT at batch 1 and text encoder at batch 1."""
    import torch

    from ImageReward.models.kernels import reference_kernels
    from ImageReward.tokenizer import tokenize

    rewards = []
    with reference_kernels():  # the original's kernels: plain F.linear + F.gelu
        for prompt, image in zip(prompt_list, images):
            ids, mask = (t.to(model.device) for t in tokenize(prompt))
            pixels = model.preprocess(image)[None].to(model.device)
            embeds = model.encode_images(pixels)
            rewards.append(model.reward_from_features(model.text_features(ids, mask, embeds).float()))
    return torch.cat(rewards)


def hps_original(model, prompt_list, images, checkpoint):
    """What ``hpsv2.score(image, prompt)`` does per call: re-read the whole checkpoint into the model, then
    score one image at a time, the prompt tokenised to 77 and encoded again for every image."""
    import torch
    import torch.nn.functional as F

    from ImageReward.clip_tokenizer import clip_tokenize

    rewards = []
    for prompt, image in zip(prompt_list, images):  # one hpsv2.score call per pair
        model.model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
        image_features = model.encode_images(model.preprocess(image)[None].to(model.device, model.input_dtype))
        pooled = model.model.text_model(input_ids=clip_tokenize(prompt).to(model.device)).pooler_output
        text_features = F.normalize(model.model.text_projection(pooled).float(), dim=-1)
        rewards.append((image_features * text_features).sum(-1))
    return torch.cat(rewards)


def pickscore_original(model, prompt_list, images):
    """PickScore's model-card ``calc_probs(prompt, images)``, once per distinct prompt with all of its images."""
    import torch

    groups: dict[str, list] = {}
    for prompt, image in zip(prompt_list, images):
        groups.setdefault(prompt, []).append(image)
    probs = []
    for prompt, group in groups.items():
        pixels = torch.stack([model.preprocess(image) for image in group]).to(model.device, model.input_dtype)
        image_embs = model.encode_images(pixels)
        scores = model.logit_scale_exp * (model.text_features([prompt]) @ image_embs.T)[0]
        probs.append(torch.softmax(scores, dim=-1))
    return torch.cat(probs)


def vision_tower(model) -> tuple:
    """The ViT of a scorer and its shape ``(image_size, patch_size, width, depth, mlp_width)``: BLIP's
    ``visual_encoder`` (ImageReward, BLIP) or the transformers ``CLIPVisionTransformer`` (CLIP, Aesthetic, HPSv2,
    PickScore). Its forward takes pixels ``[B, 3, image_size, image_size]``."""
    if hasattr(model, "blip"):
        vision = model.blip.config.vision
        return model.blip.visual_encoder, (vision.image_size, vision.patch_size, vision.width, vision.depth,
                                           int(vision.width * vision.mlp_ratio))
    tower = model.model.vision_model if hasattr(model, "model") else model.vision_model
    config = tower.config
    return tower, (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers,
                   config.intermediate_size)


def vit_flops(image_size: int, patch_size: int, width: int, depth: int, mlp_width: int) -> int:
    """FLOPs of one image through a ViT (a multiply-add counts 2; matrix products and the patch convolution,
    as PyTorch's FlopCounterMode counts them; norms, softmax and GELU are left out). T = patches + [CLS]:
    patch embedding 2 * patches * 3 * p^2 * d, and per block the qkv, output and MLP products 2T(4d^2 + 2dm)
    plus attention scores and values 4T^2 d (Dosovitskiy et al. 2021, the standard transformer count)."""
    patches = (image_size // patch_size) ** 2
    tokens = patches + 1
    per_block = 2 * tokens * (4 * width * width + 2 * width * mlp_width) + 4 * tokens * tokens * width
    return 2 * patches * 3 * patch_size * patch_size * width + depth * per_block


def time_vit(model, batch: int, device: str, repeats: int) -> float:
    """Best seconds of the scorer's ViT alone on ``batch`` random images in its input dtype (after a warm-up)."""
    import torch

    tower, (image_size, *_) = vision_tower(model)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device, model.input_dtype)
    best = float("inf")
    with torch.inference_mode():
        for attempt in range(1 + max(repeats, 3)):
            start = time.perf_counter()
            tower(pixels)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if attempt:  # the first run is the warm-up
                best = min(best, time.perf_counter() - start)
    return best


def count_flops(once, prompt_list: list[str], images: list[str]) -> float:
    """FLOPs that ``once`` executes (matrix products, convolutions, attention), counted by PyTorch's
    FlopCounterMode, taught the oneDNN fused linear and run with math attention, which it can see. 1 x N shapes
    are counted on one image and scaled: the work per image does not depend on the batch."""
    import math

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

    from ImageReward.models.kernels import fused_kernels_available

    if fused_kernels_available() and torch.ops.mkldnn._linear_pointwise not in flop_registry:  # once per process
        def fused_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]

        register_flop_formula(torch.ops.mkldnn._linear_pointwise)(fused_linear_flops)
    scale = 1
    if len(set(prompt_list)) == 1 and len(images) > 1:
        scale, prompt_list, images = len(images), prompt_list[:1], images[:1]
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        once(prompt_list, images)
    return float(counter.get_total_flops() * scale)


def run_one(config: str, quick: bool, image_dir: Path, repeats: int, device: str) -> dict:
    import torch

    mode, shape = config.split(":")
    n_prompts, n_images = (int(x) for x in shape.split("x"))
    dtype_name = "bf16" if mode.endswith("bf16") else "fp32"
    checkpoint = None
    if mode.split("-")[0] in SCORER_NAMES:
        from ImageReward.factory import place_model

        name = mode.split("-")[0]
        model = place_model(build_baseline(name, quick), device, getattr(torch, "bfloat16" if dtype_name == "bf16" else "float32"),
                            keep_fp32=("mlp",) if name == "Aesthetic" else ())
        if mode == "HPSv2-original":  # the file hpsv2 re-reads on every call
            checkpoint = image_dir / "HPS_v2.1_compressed.pt"
            torch.save({"state_dict": model.model.state_dict()}, checkpoint)
    else:
        model = build_model(quick, dtype_name).to(device)
    all_images = sorted(str(p) for p in image_dir.glob("*.png"))
    if n_prompts == 1:
        prompts, images = "a photo of a cat on a sofa", all_images[:n_images]
    else:
        prompts = [f"prompt number {i}: a photo of a cat on a sofa" for i in range(n_prompts)]
        images = [all_images[0]] * n_prompts
    pairs = n_prompts * n_images
    prompt_list = [prompts] * len(images) if isinstance(prompts, str) else prompts

    def once(prompt_list=prompt_list, images=images):
        with torch.inference_mode():
            if mode == "original":
                original_algorithm(model, prompt_list, images)
            elif mode == "HPSv2-original":
                hps_original(model, prompt_list, images, checkpoint)
            elif mode == "PickScore-original":
                pickscore_original(model, prompt_list, images)
            else:
                model.score_batch(prompt_list, images, batch_size=64)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    flops = count_flops(once, prompt_list, images)
    if mode.startswith("compiled"):
        model.blip.visual_encoder.compile(dynamic=False)  # in place: state-dict keys unchanged

    once()  # warm-up (tokenizer, kernels, compilation)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        timings.append(time.perf_counter() - start)
    best = min(timings)
    row = {"config": config, "pairs": pairs, "images": len(set(images)), "seconds": best, "pairs_per_s": pairs / best,
           "gflop_per_s": flops / best / 1e9,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
           "threads": torch.get_num_threads(), "device": device}
    if not mode.endswith("original"):  # the ViT alone, at the batch the engine gives it (each distinct image once)
        shape = vision_tower(model)[1]
        row["vit_batch"], row["vit_shape"] = len(set(images)), shape
        row["vit_seconds"] = time_vit(model, row["vit_batch"], device, repeats)
        row["vit_tflop_per_s"] = vit_flops(*shape) * row["vit_batch"] / row["vit_seconds"] / 1e12
    return row


def vs_original(rows: list[dict]) -> dict[str, tuple[float, str]]:
    """Per config, pairs/s over its original algorithm's, and the original's config: ImageReward's
    batched/compiled modes against ``original``, HPSv2 and PickScore modes against ``HPSv2-original`` /
    ``PickScore-original``; at the same shape, or per pair against the original at another shape when it ran at
    none other (``HPSv2-original`` re-reads its checkpoint for every pair, so it is run on fewer)."""
    ratios = {}
    for row in rows:
        mode, shape = row["config"].split(":")
        family = mode.split("-")[0]
        original = "original" if family in ("batched", "compiled") else f"{family}-original"
        bases = [r for r in rows if r["config"].split(":")[0] == original]
        base = next((r for r in bases if r["config"] == f"{original}:{shape}"), bases[0] if bases else None)
        if base is not None and not mode.endswith("original"):
            ratios[row["config"]] = (row["pairs_per_s"] / base["pairs_per_s"], base["config"])
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument("--quick", action="store_true", help="tiny model: checks the script, not the speed")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per process (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, in turn, "
                        "each in a fresh process, and keep its best (evens out a machine whose speed drifts)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak rate (e.g. 989 for H100 SXM bf16 dense): "
                        "adds a '%% of peak' column")
    parser.add_argument("--baselines", action="store_true", help="also run CLIP, BLIP and Aesthetic (1 prompt x 8)")
    parser.add_argument("--zoo", action="store_true", help="also run HPSv2 and PickScore against their original "
                        "algorithms (ViT-H-14: ~4 GB each in fp32, ~9 GB for HPSv2-original)")
    parser.add_argument("--json", help="also write the rows to this JSON file (after each configuration)")
    parser.add_argument("--in-process", action="store_true", help="run every configuration in this process instead "
                        "of a fresh one each (faster to start; peak memory is then the whole run's): for checks")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--image-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_one(args.worker, args.quick, Path(args.image_dir), args.repeats, args.device)))
        return 0

    import numpy as np
    from PIL import Image

    configs = list(args.configs) + (BASELINE_CONFIGS if args.baselines else []) + (ZOO_CONFIGS if args.zoo else [])
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for index in range(max(int(config.split("x")[-1]) for config in configs)):
            Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(f"{folder}/{index:02d}.png")
        best: dict[str, dict] = {}  # per config, the fastest of its rounds
        for round_index in range(args.rounds):  # whole rounds, so that a slow spell of the machine hits every mode
            for config in configs:
                if args.in_process:
                    row = run_one(config, args.quick, Path(folder), args.repeats, args.device)
                else:
                    command = [sys.executable, __file__, "--worker", config, "--image-dir", folder,
                               "--repeats", str(args.repeats), "--device", args.device]
                    if args.quick:
                        command.append("--quick")
                    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
                    if result.returncode != 0:
                        print(f"{config}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
                        continue
                    row = json.loads(result.stdout.strip().splitlines()[-1])
                print(f"round {round_index + 1}, {config}: {row['pairs_per_s']:.2f} pairs/s", file=sys.stderr)
                if config not in best or row["seconds"] < best[config]["seconds"]:
                    best[config] = row
                if args.json:
                    write_json(args.json, [best[c] for c in configs if c in best], args)
        rows = [best[config] for config in configs if config in best]

    ratios = vs_original(rows)
    print(f"\nScoring throughput ({'tiny models' if args.quick else 'full size'}; {args.device}; "
          f"{rows[0]['threads'] if rows else '?'} threads; best of {args.repeats} x {args.rounds} rounds; 'vs original' compares the same shape)\n")
    peak = f" | % of {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else ""
    print(f"| mode | prompts x images | seconds | images/s | pairs/s | vs original | GFLOP/s{peak} | ViT TFLOP/s{peak} "
          f"| peak RSS (MB) | peak GPU (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|" if peak else "") + "---:|" + ("---:|" if peak else "") + "---:|---:|")
    for row in rows:
        mode, shape = row["config"].split(":")
        ratio, base = ratios.get(row["config"], (None, None))
        ratio = "–" if ratio is None else f"{ratio:.2f}x" + ("" if base.endswith(f":{shape}") else f" (per pair, vs {base})")
        fraction = f" | {100 * row['gflop_per_s'] / (args.peak_tflops * 1000):.0f}%" if peak else ""
        vit = f"{row['vit_tflop_per_s']:.3g}" if "vit_tflop_per_s" in row else "–"
        if peak:
            vit += f" | {100 * row['vit_tflop_per_s'] / args.peak_tflops:.0f}%" if "vit_tflop_per_s" in row else " | –"
        gpu = f"{row['peak_cuda_mib']:.0f}" if row.get("peak_cuda_mib") is not None else "–"
        print(f"| {mode} | {shape} | {row['seconds']:.2f} | {row['images'] / row['seconds']:.2f} | {row['pairs_per_s']:.2f} | "
              f"{ratio} | {row['gflop_per_s']:.0f}{fraction} | {vit} | {row['peak_rss_mb']:.0f} | {gpu} |")
    return 0


def write_json(path: str, rows: list[dict], args: argparse.Namespace) -> None:
    """The rows so far, each with ``vs_original`` (and ``vs_original_config``) where its original ran, and the
    run's settings."""
    ratios = vs_original(rows)
    rows = [dict(row, vs_original=ratios.get(row["config"], (None,))[0],
                 vs_original_config=ratios.get(row["config"], (None, None))[1]) for row in rows]
    Path(path).write_text(json.dumps({"quick": args.quick, "device": args.device, "repeats": args.repeats,
                                      "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
