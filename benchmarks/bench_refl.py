"""Seconds per ReFL update, peak memory and trainable parameters, printed as a Markdown table.

Each configuration runs in its own subprocess (its own peak memory). Weights are random: timing does not
depend on their values. ``tiny`` pipelines are the tests' (32 px, ~1M-parameter UNets, ~0.1M-parameter SD3 /
FLUX transformers); ``real`` pipelines have the SD1.x / SDXL / FLUX.1-dev architectures at full size (random
weights, no download) with a full-size ImageReward. The real FLUX pipeline's T5 is a 2-layer stand-in of T5-XXL's
width (it runs once per update under no_grad; the real T5-XXL adds 9.5 GB of bf16 weights unless offloaded).

    python benchmarks/bench_refl.py                                  # tiny, CPU: sd1/sdxl x full/LoRA
    python benchmarks/bench_refl.py --size real --device cuda        # one real-size update per config (GPU)
    python benchmarks/bench_refl.py --configs sdxl:lora4:bf16:ckpt --size real --device cuda
    python benchmarks/bench_refl.py --size real --device cuda \
        --configs flux:lora16:bf16:ckpt flux:lora16:bf16:ckpt:k4       # FLUX.1-dev-size LoRA, 512 px, K = 1 / 4

A config is FAMILY:TRAIN:PRECISION[:ckpt][:kK]: FAMILY sd1|sdxl|sd3|flux, TRAIN full|loraR, PRECISION
fp32|fp16|bf16, ckpt = denoiser gradient checkpointing, kK = --backprop_steps K. One update = one micro-batch
(batch 1 real / 2 tiny) of a 40-step rollout stopping at a step in [30, 39].
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIGS = ["sd1:full:fp32", "sd1:full:fp32:ckpt", "sd1:lora4:fp32", "sdxl:full:fp32", "sdxl:lora4:fp32",
                "sd3:full:fp32", "sd3:lora4:fp32", "sd3:lora4:fp32:ckpt:k4", "flux:full:fp32", "flux:lora4:fp32",
                "flux:lora4:fp32:k4", "flux:lora4:fp32:ckpt:k4"]
REAL_CONFIGS = ["sd1:full:fp16", "sd1:full:fp16:ckpt", "sd1:full:bf16:ckpt", "sd1:lora4:bf16",
                "sdxl:full:bf16:ckpt", "sdxl:lora4:fp16:ckpt", "sdxl:lora4:bf16:ckpt"]


def real_flux_pipeline():
    """FLUX.1-dev-shaped pipeline with random bf16 weights: the 11.9B-parameter transformer (diffusers' default
    FluxTransformer2DModel config with the guidance embedding), the FLUX VAE, CLIP-L, a 2-layer T5 stand-in."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    sys.path.insert(0, str(ROOT / "tests"))
    from refl_tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, projection_dim=768, max_position_embeddings=77,
                                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                              pad_token_id=tok.pad_token_id))
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=2,
                                     num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16,
                            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                            use_post_quant_conv=False)
        transformer = FluxTransformer2DModel(guidance_embeds=True)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    finally:
        torch.set_default_dtype(torch.float32)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_l, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)


def real_pipeline(family: str):
    """SD1.x-, SDXL- or FLUX.1-dev-shaped pipeline with random weights (architecture of the released models)."""
    if family == "flux":
        return real_flux_pipeline()
    if family not in ("sd1", "sdxl"):
        raise SystemExit(f"no real-size builder for {family!r} (real sizes: sd1, sdxl, flux)")
    import torch
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(ROOT / "tests"))
    from refl_tiny import tiny_clip_tokenizer

    torch.manual_seed(0)
    tok = tiny_clip_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               max_position_embeddings=77)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, projection_dim=768, **ids))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        scaling_factor=0.18215 if family == "sd1" else 0.13025, force_upcast=family == "sdxl")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              clip_sample=False)
    if family == "sd1":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2)
        return StableDiffusionPipeline(vae=vae, text_encoder=clip_l, tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                       num_attention_heads=20, projection_dim=1280,
                                                       hidden_act="gelu", **ids))
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        cross_attention_dim=2048)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tok,
                                     tokenizer_2=tiny_clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def run_one(spec: str, size: str, device: str, steps: int, workdir: Path) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    sys.path.insert(0, str(ROOT / "tests"))
    from refl_tiny import save_tiny, tiny_reward

    from ImageReward.refl import ReFLConfig, ReFLTrainer

    family, train, precision, *rest = spec.split(":")
    backprop_steps = next((int(r[1:]) for r in rest if r.startswith("k")), 1)
    base = workdir / f"{family}-{size}"
    if not base.exists():
        save_tiny(family, base) if size == "tiny" else real_pipeline(family).save_pretrained(base)
    if size == "tiny":
        reward = tiny_reward()
    else:
        import ImageReward as RM
        from ImageReward.models.blip import BLIPConfig
        reward = RM.ImageReward(BLIPConfig()).eval()
    prompts = workdir / "prompts.json"
    prompts.write_text(json.dumps([{"text": f"a photo of object {i}, detailed"} for i in range(64)]))
    cfg = ReFLConfig(
        pretrained_model_name_or_path=str(base), model_family=family, train_data=str(prompts),
        output_dir=str(workdir / f"out-{spec.replace(':', '_')}"), report_to="none", seed=0,
        resolution=32 if size == "tiny" else (1024 if family == "sdxl" else 512),
        backprop_steps=backprop_steps, max_sequence_length=32 if size == "tiny" else None,
        train_batch_size=2 if size == "tiny" else 1, gradient_accumulation_steps=1, max_train_steps=steps + 1,
        lora_rank=int(train[4:]) if train.startswith("lora") else 0, gradient_checkpointing="ckpt" in rest,
        mixed_precision=None if precision == "fp32" else precision, checkpointing_steps=10**6, grad_scale=1e-3)
    trainer = ReFLTrainer(cfg, reward=reward)
    trainer.setup()
    cuda = trainer.accelerator.device.type == "cuda"
    trainer.train_step()  # warm-up (allocations, kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logs = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"config": spec, "size": size, "device": str(trainer.accelerator.device),
            "s_per_update": times[len(times) // 2], "trainable": trainer.n_trainable,
            "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss_finite": bool(logs["train_loss"] == logs["train_loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (accelerate picks cuda when visible)")
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed updates per config (median reported)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.size, args.device, args.steps, Path(args.workdir))))
        return
    configs = args.configs or (TINY_CONFIGS if args.size == "tiny" else REAL_CONFIGS)
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for spec in configs:
            cmd = [sys.executable, __file__, "--one", spec, "--size", args.size, "--device", args.device,
                   "--steps", str(args.steps), "--workdir", workdir]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                rows.append({"config": spec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]})
            else:
                rows.append(json.loads(line[0][7:]))
            print(f"done {spec}", file=sys.stderr)
    print(f"| config | size | device | s/update | trainable params | peak CUDA GiB | peak RSS MiB | finite |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {args.size} | - | error: {r['error']} | | | | |")
            continue
        cuda = f"{r['peak_cuda_gib']:.2f}" if r["peak_cuda_gib"] is not None else "-"
        print(f"| {r['config']} | {r['size']} | {r['device']} | {r['s_per_update']:.3f} | {r['trainable']:,} | "
              f"{cuda} | {r['peak_rss_mib']:.0f} | {r['loss_finite']} |")


if __name__ == "__main__":
    main()
