"""Seconds per ReFL / GRPO update, peak memory and trainable parameters, printed as a Markdown table.

Each configuration runs in its own subprocess (its own peak memory). Weights are random: timing does not
depend on their values. ``tiny`` pipelines are the tests' (32 px, ~1M-parameter UNets, ~0.1M-parameter SD3 /
FLUX transformers); ``real`` pipelines have the SD1.x / SDXL / SD3.5-medium / FLUX.1-dev architectures at full size
(random weights, no download) with a full-size ImageReward. The real SD3.5 and FLUX pipelines' T5 is a 2-layer
stand-in of T5-XXL's width (it runs once per update under no_grad; the real T5-XXL adds 9.5 GB of bf16 weights
unless offloaded). On CUDA a real base is built on the GPU and saved in the config's precision (bf16 / fp16), once
per ``--workdir`` (``benchmarks/gpu_check.sh`` shares one across its cases).

    python benchmarks/bench_refl.py                                  # tiny, CPU: sd1/sdxl/sd3/flux, full/LoRA/K=4
    python benchmarks/bench_refl.py --size real --device cuda        # one real-size update per config (GPU)
    python benchmarks/bench_refl.py --configs sdxl:lora4:bf16:ckpt --size real --device cuda
    python benchmarks/bench_refl.py --size real --device cuda \
        --configs flux:lora16:bf16:ckpt flux:lora16:bf16:ckpt:k4       # FLUX.1-dev-size LoRA, 512 px, K = 1 / 4
    python benchmarks/bench_refl.py --size real --device cuda --configs sd3:lora16:bf16:ckpt   # SD3.5-medium, 512 px
    python benchmarks/bench_refl.py --real-size                      # the real-size check (CPU, see below)
    python benchmarks/bench_refl.py --vae-memory                     # decode + backward memory of the SD VAE

``--real-size`` is the check users and CI can run offline: for SD1.5 and SDXL architectures (random weights,
built in code from the released models' configs, saved as an ``fp16`` variant) it runs one LoRA update at
128 px with a full-size ImageReward reward, saves a checkpoint and the final LoRA, resumes from the checkpoint
for a second update and saves again, and prints s/update, peak memory and file sizes. It fails (exit 1) if a
step does not finish, a loss is not finite, or a LoRA checkpoint holds more than the LoRA state.

A config is FAMILY:TRAIN:PRECISION[:ckpt][:kK]: FAMILY sd1|sdxl|sd3|flux, TRAIN full|loraR, PRECISION
fp32|fp16|bf16, ckpt = denoiser gradient checkpointing, kK = --backprop_steps K. One update = one micro-batch
(batch 1 real / 2 tiny) of a 40-step rollout stopping at a step in [30, 39]. A trailing ``:grpo`` runs
``--algorithm grpo`` instead with flow_grpo's 10 sampling steps: one update = one group of 2 images (batch 2 tiny,
group 2 real), 10 SDE/DDIM steps with log-probabilities, the reward, and 10 policy-gradient forward/backward steps
per image (``--beta 0``; ``:grpo:kl`` adds the reference forward of ``--beta 0.01``; ``:g8`` makes the group 8 images,
flow_grpo's recipe).

    python benchmarks/bench_refl.py --configs sd3:lora4:fp32 sd3:lora4:fp32:grpo sd1:lora4:fp32 sd1:lora4:fp32:grpo
    BENCH_RESOLUTION=256 flock /tmp/ir-bigmem.lock python benchmarks/bench_refl.py --size real --steps 1 \
        --configs sd1:lora4:fp32 sd1:lora4:fp32:grpo                # SD1.5-size LoRA at 256 px on the CPU

``BENCH_RESOLUTION`` overrides the image size (default 32 tiny; real: 512, SDXL 1024).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIGS = ["sd1:full:fp32", "sd1:full:fp32:ckpt", "sd1:lora4:fp32", "sdxl:full:fp32", "sdxl:lora4:fp32",
                "sd3:full:fp32", "sd3:lora4:fp32", "sd3:lora4:fp32:ckpt:k4", "flux:full:fp32", "flux:lora4:fp32",
                "flux:lora4:fp32:k4", "flux:lora4:fp32:ckpt:k4", "sd1:lora4:fp32:grpo", "sdxl:lora4:fp32:grpo",
                "sd3:lora4:fp32:grpo", "sd3:lora4:fp32:grpo:kl", "flux:lora4:fp32:grpo"]
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


def real_sd3_pipeline():
    """SD3.5-medium-shaped pipeline with random weights: the MMDiT of stabilityai/stable-diffusion-3.5-medium's
    transformer/config.json (24 blocks of 24 x 64 heads, dual attention in blocks 0-12, QK RMS-norm, 2.5B
    parameters), the SD3 VAE (16 latent channels, scaling 1.5305, shift 0.0609), CLIP-L and OpenCLIP bigG/14 with
    projections, a 2-layer T5 stand-in of T5-XXL's width, and the SD3 scheduler (shift 3)."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    sys.path.insert(0, str(ROOT / "tests"))
    from refl_tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    torch.manual_seed(0)
    tok, tok_2, t5_tok = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!"), tiny_t5_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               max_position_embeddings=77, vocab_size=49408)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                        num_attention_heads=12, projection_dim=768, **ids))
    big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                       num_attention_heads=20, projection_dim=1280,
                                                       hidden_act="gelu", **ids))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=2,
                                 num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=tok, text_encoder_2=big_g, tokenizer_2=tok_2, text_encoder_3=t5,
        tokenizer_3=t5_tok)


def real_pipeline(family: str):
    """SD1.5-, SDXL-, SD3.5-medium- or FLUX.1-dev-shaped pipeline with random weights: the configs of
    runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0 (UNet, VAE, CLIP ViT-L/14 and
    OpenCLIP bigG/14 text encoders with the 49,408-token embedding), written here so no download is needed, or
    :func:`real_sd3_pipeline` / :func:`real_flux_pipeline`. The tokenizer is the tests' byte-level one (ids < 514):
    the weights are random anyway."""
    if family == "flux":
        return real_flux_pipeline()
    if family == "sd3":
        return real_sd3_pipeline()
    if family not in ("sd1", "sdxl"):
        raise SystemExit(f"no real-size builder for {family!r} (real sizes: sd1, sdxl, sd3, flux)")
    import torch
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(ROOT / "tests"))
    from refl_tiny import tiny_clip_tokenizer

    torch.manual_seed(0)
    tok = tiny_clip_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               max_position_embeddings=77, vocab_size=49408)
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


PRECISIONS = {"fp16": "float16", "bf16": "bfloat16"}


def save_real(family: str, directory: Path, device: str, dtype=None) -> None:
    """Build :func:`real_pipeline` (on the GPU when ``device`` is CUDA: random init there takes seconds, not
    minutes), cast it to ``dtype`` if given (the trainer casts every module to its own dtype on loading anyway)
    and save it to ``directory``."""
    import torch

    with torch.device("cuda" if device.startswith("cuda") else "cpu"):
        pipe = real_pipeline(family)
    if dtype is not None:
        pipe = pipe.to(dtype)
    pipe.save_pretrained(directory)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_one(spec: str, size: str, device: str, steps: int, workdir: Path) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    sys.path.insert(0, str(ROOT / "tests"))
    from refl_tiny import save_tiny, tiny_reward

    from ImageReward.finetune import ReFLConfig, ReFLTrainer

    family, train, precision, *rest = spec.split(":")
    backprop_steps = next((int(r[1:]) for r in rest if r.startswith("k") and r[1:].isdigit()), 1)
    group = next((int(r[1:]) for r in rest if r.startswith("g") and r[1:].isdigit()), 2)  # ":g8": a group of 8
    grpo = dict(algorithm="grpo", num_inference_steps=10, group_size=group,  # one group (batches of 2 tiny, 1 real)
                sample_batches_per_update=max(1, group // 2) if size == "tiny" else group,
                beta=0.01 if "kl" in rest else 0.0) if "grpo" in rest else {}
    base = workdir / f"{family}-{size}"
    if not (base / "model_index.json").is_file():  # built whole into a temporary folder, then renamed
        building = workdir / f"{family}-{size}.building"
        shutil.rmtree(building, ignore_errors=True)
        if size == "tiny":
            save_tiny(family, building)
        else:
            save_real(family, building, device, None if precision == "fp32" else getattr(torch, PRECISIONS[precision]))
        shutil.rmtree(base, ignore_errors=True)
        building.rename(base)
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
        resolution=int(os.environ.get("BENCH_RESOLUTION", 0)) or (32 if size == "tiny" else
                                                                  (1024 if family == "sdxl" else 512)),
        backprop_steps=backprop_steps, max_sequence_length=32 if size == "tiny" else None,
        train_batch_size=2 if size == "tiny" else 1, gradient_accumulation_steps=1, max_train_steps=steps + 1,
        lora_rank=int(train[4:]) if train.startswith("lora") else 0, gradient_checkpointing="ckpt" in rest,
        mixed_precision=None if precision == "fp32" else precision, checkpointing_steps=10**6, grad_scale=1e-3,
        **grpo)
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


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def real_size_phase(family: str, phase: str, workdir: Path, resolution: int, inference_steps: int,
                    checkpointing: bool) -> dict:
    """One phase of the real-size check in this process: ``build`` the fp16-variant base, ``train`` one LoRA
    update + checkpoint + final save, or ``resume`` from that checkpoint for a second update + saves."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base = workdir / f"{family}-real"
    if phase == "build":
        if not (base / "model_index.json").is_file():
            real_pipeline(family).to(torch.float16).save_pretrained(base, variant="fp16")
        return {"base_gib": _mib(base) / 1024, "peak_rss_gib": _rss_gib()}
    import ImageReward as RM
    from ImageReward.models.blip import BLIPConfig
    from ImageReward.finetune import ReFLConfig, ReFLTrainer

    prompts = workdir / "prompts.json"
    prompts.write_text(json.dumps([{"text": f"a photo of object {i}, detailed"} for i in range(8)]))
    out = workdir / f"out-{family}"
    cfg = ReFLConfig(
        pretrained_model_name_or_path=str(base), variant="fp16", model_family=family, train_data=str(prompts),
        output_dir=str(out), report_to="none", seed=0, resolution=resolution, train_batch_size=1,
        gradient_accumulation_steps=1, max_train_steps=1 if phase == "train" else 2, checkpointing_steps=1,
        num_inference_steps=inference_steps, stop_step_min=inference_steps - 2, stop_step_max=inference_steps - 1,
        lora_rank=4, gradient_checkpointing=checkpointing, grad_scale=1e-3,
        resume_from_checkpoint="latest" if phase == "resume" else None)
    torch.manual_seed(0)
    reward = RM.ImageReward(BLIPConfig()).eval()  # full size, random weights
    trainer = ReFLTrainer(cfg, reward=reward)
    start = time.perf_counter()
    trainer.setup()
    times = {"s_setup": time.perf_counter() - start, "rss_after_setup_gib": _rss_gib()}
    timed = {}
    for name in ("train_step", "save_checkpoint", "save_final"):
        real = getattr(trainer, name)

        def wrapper(real=real, name=name):
            begin = time.perf_counter()
            value = real()
            timed[name] = time.perf_counter() - begin
            return value

        setattr(trainer, name, wrapper)
    result = trainer.train()
    checkpoint = out / f"checkpoint-{result['global_step']}"
    dtypes = {str(m.dtype) for m in trainer.components.frozen_modules()}
    return {**times, "s_update": timed["train_step"], "s_checkpoint": timed["save_checkpoint"],
            "s_final_save": timed["save_final"], "peak_rss_gib": _rss_gib(), "global_step": result["global_step"],
            "loss": result["history"][-1]["train_loss"], "trainable": trainer.n_trainable,
            "checkpoint_mib": _mib(checkpoint), "lora_mib": _mib(out / "pytorch_lora_weights.safetensors"),
            "full_unet_in_checkpoint": any(checkpoint.glob("model*.safetensors")), "frozen_dtypes": sorted(dtypes)}


def vae_memory_phase(resolution: int, checkpointing: bool) -> dict:
    """Peak RSS of one SD/SDXL-architecture VAE decode + backward at ``resolution`` px (fp32, CPU), above the
    RSS after building the VAE and its input."""
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4).eval()
    vae.requires_grad_(False)
    if checkpointing:
        vae.enable_gradient_checkpointing()
    latents = torch.randn(1, 4, resolution // 8, resolution // 8, requires_grad=True)
    before = _rss_gib()
    start = time.perf_counter()
    vae.decode(latents).sample.float().mean().backward()
    return {"resolution": resolution, "checkpointing": checkpointing, "s": time.perf_counter() - start,
            "decode_backward_gib": _rss_gib() - before, "peak_rss_gib": _rss_gib()}


def _subprocess(args: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(line[0][7:])


def real_size_check(families: list[str], resolution: int, inference_steps: int, checkpointing: bool,
                    workdir: str | None) -> int:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    failures = 0
    print(f"| family | phase | s/update | s checkpoint | s final save | peak RSS GiB | checkpoint MiB | "
          f"LoRA MiB | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)  # --workdir may name a folder that does not exist yet
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for family in families:
            common = ["--family", family, "--workdir", tmp, "--resolution", str(resolution),
                      "--inference-steps", str(inference_steps)] + (["--checkpointing"] if checkpointing else [])
            for phase in ("build", "train", "resume"):
                start = time.perf_counter()
                r = _subprocess(["--phase", phase, *common], env)
                wall = time.perf_counter() - start
                problem = r.get("error")
                if not problem and phase != "build":
                    if r["full_unet_in_checkpoint"]:
                        problem = "the LoRA checkpoint holds the full UNet"
                    elif not r["loss"] == r["loss"]:
                        problem = "loss is not finite"
                    elif r["global_step"] != (1 if phase == "train" else 2):
                        problem = f"stopped at step {r['global_step']}"
                failures += bool(problem)
                status = f"FAIL: {problem}" if problem else f"ok ({wall:.0f} s wall)"
                if phase == "build":
                    print(f"| {family} | build fp16 base ({r.get('base_gib', 0):.1f} GiB) | | | | "
                          f"{r.get('peak_rss_gib', 0):.1f} | | | {status} |", flush=True)
                elif problem and "s_update" not in r:
                    print(f"| {family} | {phase} | | | | | | | {status} |", flush=True)
                else:
                    print(f"| {family} | {phase} | {r['s_update']:.1f} | {r['s_checkpoint']:.1f} | "
                          f"{r['s_final_save']:.1f} | {r['peak_rss_gib']:.1f} | {r['checkpoint_mib']:.1f} | "
                          f"{r['lora_mib']:.1f} | {status} |", flush=True)
                if problem:
                    break
    return 1 if failures else 0


def vae_memory(resolutions: list[int]) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    print("| VAE decode + backward | gradient checkpointing | extra peak RSS GiB | s |")
    print("|---|---|---|---|")
    for resolution in resolutions:
        for checkpointing in (False, True):
            r = _subprocess(["--vae-phase", str(resolution)] + (["--checkpointing"] if checkpointing else []), env)
            if "error" in r:
                print(f"| {resolution} px | {checkpointing} | error: {r['error']} | |", flush=True)
            else:
                print(f"| {resolution} px | {checkpointing} | {r['decode_backward_gib']:.2f} | {r['s']:.1f} |",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (accelerate picks cuda when visible)")
    parser.add_argument("--configs", nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed updates per config (median reported)")
    parser.add_argument("--real-size", action="store_true",
                        help="the real-size check: SD1.5/SDXL architectures, one LoRA update + checkpoint + resume")
    parser.add_argument("--families", nargs="+", default=["sd1", "sdxl"], choices=("sd1", "sdxl"))
    parser.add_argument("--resolution", type=int, default=128, help="--real-size image size")
    parser.add_argument("--inference-steps", type=int, default=40, help="--real-size rollout steps")
    parser.add_argument("--checkpointing", action="store_true", help="--real-size: --gradient_checkpointing")
    parser.add_argument("--vae-memory", nargs="*", type=int, default=None, metavar="PX",
                        help="VAE decode + backward memory at these resolutions (default 128 256 512)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--family", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vae-phase", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help="--real-size: where the temporary bases go (default TMPDIR); "
                        "--configs: the folder where the bases are built once and kept for later runs (default: a "
                        "temporary folder)")
    parser.add_argument("--json", default=None, help="--configs: also write the rows to this JSON file (after each)")
    args = parser.parse_args()
    if args.phase:
        print("RESULT " + json.dumps(real_size_phase(args.family, args.phase, Path(args.workdir), args.resolution,
                                                     args.inference_steps, args.checkpointing)))
        return
    if args.vae_phase:
        print("RESULT " + json.dumps(vae_memory_phase(args.vae_phase, args.checkpointing)))
        return
    if args.real_size:
        sys.exit(real_size_check(args.families, args.resolution, args.inference_steps, args.checkpointing,
                                 args.workdir))
    if args.vae_memory is not None:
        vae_memory(args.vae_memory or [128, 256, 512])
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.size, args.device, args.steps, Path(args.workdir))))
        return
    configs = args.configs or (TINY_CONFIGS if args.size == "tiny" else REAL_CONFIGS)
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    rows = []
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory() as workdir:
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
            if args.json:
                Path(args.json).write_text(json.dumps({"size": args.size, "device": args.device, "steps": args.steps,
                                                       "rows": rows}, indent=1))
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
