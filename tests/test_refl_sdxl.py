"""ReFL on a tiny SDXL pipeline built from configs (no downloads): conditioning and time ids, gradient
isolation (full and LoRA), learning, LoRA resume / save / reload in diffusers, kohya export, pre-training
branch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from PIL import Image  # noqa: E402
from refl_tiny import (HELD_OUT, PROMPTS, _one_thread, save_tiny, tiny_reward,  # noqa: E402,F401 (autouse)
                       train_and_check_held_out_gain)

from ImageReward.finetune import ReFLConfig, ReFLConfigError, ReFLTrainer, get_family  # noqa: E402
from ImageReward.finetune.pretrain import augment  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return save_tiny("sdxl", tmp_path_factory.mktemp("tiny_sdxl") / "pipe")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in PROMPTS))
    return path


def sdxl_config(base: Path, prompts: Path, out: Path, **overrides) -> ReFLConfig:
    values = dict(pretrained_model_name_or_path=str(base), model_family="sdxl", train_data=str(prompts),
                  output_dir=str(out), resolution=32, train_batch_size=2, gradient_accumulation_steps=1,
                  max_train_steps=2, num_inference_steps=10, stop_step_min=6, stop_step_max=9, grad_scale=1.0,
                  learning_rate=5e-2, checkpointing_steps=1000, validation_steps=1000, seed=0, report_to="none")
    values.update(overrides)
    return ReFLConfig(**values)


def record_unet_calls(trainer: ReFLTrainer) -> list[dict]:
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    calls: list[dict] = []
    real = unet.forward

    def forward(sample, timestep, *args, **kwargs):
        calls.append({"shape": tuple(sample.shape), **kwargs})
        return real(sample, timestep, *args, **kwargs)

    unet.forward = forward
    return calls


@pytest.mark.integration
def test_conditioning_time_ids_and_resolution(sdxl_dir, prompt_file, tmp_path):
    trainer = ReFLTrainer(sdxl_config(sdxl_dir, prompt_file, tmp_path, resolution=48), reward=tiny_reward())
    trainer.setup()
    cond = trainer.encode(["a cat", "a dog"])
    assert cond.hidden.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)  # 32 + 32 penultimate; projection
    calls = record_unet_calls(trainer)
    trainer.compute_loss(PROMPTS[:2], 0)
    assert {c["shape"] for c in calls} == {(2, 4, 24, 24)}  # 48 px requested -> 24x24 latents (VAE factor 2)
    for call in calls:
        ids = call["added_cond_kwargs"]["time_ids"]
        assert ids.tolist() == [[48, 48, 0, 0, 48, 48]] * 2  # original size, crop, target: the real ones
        assert call["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert trainer.components.vae.dtype == torch.float32


def test_family_mismatch_is_a_clear_error(sdxl_dir, prompt_file, tmp_path):
    trainer = ReFLTrainer(sdxl_config(sdxl_dir, prompt_file, tmp_path, model_family="sd1"), reward=tiny_reward())
    with pytest.raises(ReFLConfigError, match="--model_family sdxl"):
        trainer.setup()


@pytest.mark.integration
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradients_reach_only_trained_parameters(sdxl_dir, prompt_file, tmp_path, lora_rank):
    trainer = ReFLTrainer(sdxl_config(sdxl_dir, prompt_file, tmp_path, lora_rank=lora_rank), reward=tiny_reward())
    trainer.setup()
    loss, _ = trainer.compute_loss(PROMPTS[:2], 0)
    trainer.accelerator.backward(loss)
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    named = dict(unet.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    if lora_rank:
        lora = {n for n in named if "lora_" in n}
        has_grad = {n for n, p in named.items() if p.grad is not None}
        assert lora and has_grad == lora and with_grad <= lora
        # B starts at zero, so at the first step only the B matrices receive a non-zero gradient
        assert with_grad == {n for n in lora if "lora_B" in n}
        assert all(not p.requires_grad for n, p in named.items() if n not in lora)
        assert trainer.n_trainable == sum(named[n].numel() for n in lora)
    else:
        assert len(with_grad) > 0.9 * len(named)
    for module in [trainer.components.vae, *trainer.components.text_encoders, trainer.reward]:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


@pytest.mark.integration
def test_thirty_lora_steps_raise_held_out_reward(sdxl_dir, prompt_file, tmp_path):
    cfg = sdxl_config(sdxl_dir, prompt_file, tmp_path / "out", lora_rank=4, max_train_steps=30,
                      validation_prompts=HELD_OUT)
    train_and_check_held_out_gain(ReFLTrainer(cfg, reward=tiny_reward()))


class _Killed(Exception):
    pass


@pytest.mark.integration
def test_lora_resume_save_and_reload_in_diffusers(sdxl_dir, prompt_file, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    common = dict(lora_rank=4, lora_alpha=8.0, max_train_steps=4, checkpointing_steps=2)
    straight = ReFLTrainer(sdxl_config(sdxl_dir, prompt_file, tmp_path / "a", **common), reward=tiny_reward())
    straight.train()
    first = ReFLTrainer(sdxl_config(sdxl_dir, prompt_file, tmp_path / "b", **common), reward=tiny_reward())
    real_save = first.save_checkpoint
    first.save_checkpoint = lambda: (_ for _ in ()).throw(_Killed(real_save()))
    with pytest.raises(_Killed):
        first.train()
    resumed = ReFLTrainer(sdxl_config(sdxl_dir, prompt_file, tmp_path / "b", resume_from_checkpoint="latest",
                                      **common), reward=tiny_reward())
    resumed.train()
    unet_a = straight.accelerator.unwrap_model(straight.unet)
    unet_b = resumed.accelerator.unwrap_model(resumed.unet)
    lora_a = {k: v for k, v in unet_a.state_dict().items() if "lora_" in k}
    assert lora_a and all(torch.equal(v, unet_b.state_dict()[k]) for k, v in lora_a.items())

    # the saved LoRA loads into a fresh pipeline through diffusers and reproduces the trained UNet exactly
    out = tmp_path / "a"
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as handle:
        assert "lora_adapter_metadata" in handle.metadata()
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.load_lora_weights(out, adapter_name="refl")
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    kwargs = dict(encoder_hidden_states=torch.randn(1, 77, 64, generator=generator),
                  added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=generator),
                                     "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])})
    with torch.no_grad():
        reloaded = pipe.unet(sample, 500, **kwargs).sample
        trained = unet_a.eval()(sample, 500, **kwargs).sample
        pipe.unload_lora_weights()
        base = pipe.unet(sample, 500, **kwargs).sample
    assert (trained - base).abs().max() > 1e-3  # training changed the output ...
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)  # ... and the file carries it all

    kohya = load_file(str(out / "refl_lora_kohya.safetensors"))
    alphas = [v for k, v in kohya.items() if k.endswith(".alpha")]
    assert alphas and all(float(a) == 8.0 for a in alphas)
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {p.name for p in (out / "checkpoint-4" / "lora").iterdir()} >= {"pytorch_lora_weights.safetensors"}


def test_pretrain_branch_same_step_and_consistent_time_ids(sdxl_dir, prompt_file, tmp_path):
    rows = []
    for i, (w, h) in enumerate([(64, 40), (40, 72), (32, 32)]):
        pixels = (np.random.default_rng(i).random((h, w, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
        rows.append({"text": f"picture {i}", "image": f"img{i}.png"})
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    cfg = sdxl_config(sdxl_dir, prompt_file, tmp_path / "out", pretrain_data=str(tmp_path / "pairs.json"),
                      image_base_dir=str(tmp_path), pretrain_loss_weight=0.5, snr_gamma=5.0, center_crop=True)
    trainer = ReFLTrainer(cfg, reward=tiny_reward())
    trainer.setup()
    calls = record_unet_calls(trainer)
    loss, stats = trainer.compute_loss(PROMPTS[:2], 0)
    assert loss.item() == pytest.approx(stats["reward_loss"].item() + 0.5 * stats["pretrain_loss"].item(), rel=1e-5)
    pre_ids = calls[-1]["added_cond_kwargs"]["time_ids"].tolist()
    indices = trainer.pretrain_order.batch(0)
    for row, index in zip(pre_ids, indices):
        w, h = [(64, 40), (40, 72), (32, 32)][index]
        _, original, crop, _ = augment(str(tmp_path / f"img{index}.png"), 32, center_crop=True, random_flip=False,
                                       generator=torch.Generator())
        assert row == [h, w, crop[0], crop[1], 32, 32] and original == (h, w)
    assert set(trainer.pretrain.cache) == set(indices)  # deterministic augmentation -> cached latents
    trainer.accelerator.backward(loss)  # one backward for both losses (one optimizer step)

    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"text": "x", "image": "nope.png"}]))
    from ImageReward.finetune import PromptDataError
    with pytest.raises(PromptDataError, match="nope.png"):
        ReFLTrainer(sdxl_config(sdxl_dir, prompt_file, tmp_path / "o2", pretrain_data=str(missing),
                                pretrain_loss_weight=1.0))


def test_random_crop_time_ids_follow_the_crop(tmp_path):
    Image.fromarray(np.arange(40 * 64 * 3, dtype=np.uint8).reshape(40, 64, 3)).save(tmp_path / "wide.png")
    generator = torch.Generator().manual_seed(0)
    crops = {augment(str(tmp_path / "wide.png"), 32, center_crop=False, random_flip=True, generator=generator)[2]
             for _ in range(20)}
    assert len(crops) > 3 and all(top == 0 and 0 <= left <= 51 - 32 for top, left in crops)
    ids = get_family("sdxl").time_ids(32, 32, original=(40, 64), crop=(0, 7))
    assert ids.tolist() == [40, 64, 0, 7, 32, 32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_sdxl_step_has_no_nan(sdxl_dir, prompt_file, tmp_path):
    cfg = sdxl_config(sdxl_dir, prompt_file, tmp_path, mixed_precision="fp16", lora_rank=4)
    result = ReFLTrainer(cfg, reward=tiny_reward()).train()
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["grad_norm"]) for h in result["history"])


@pytest.mark.integration
def test_bf16_lora_step_keeps_the_lora_in_fp32(sdxl_dir, prompt_file, tmp_path):
    """Mixed precision on the CPU (bf16 autocast): the half-precision path, short of a GPU's fp16."""
    cfg = sdxl_config(sdxl_dir, prompt_file, tmp_path, mixed_precision="bf16", lora_rank=4, max_train_steps=1,
                      gradient_checkpointing=True)
    trainer = ReFLTrainer(cfg, reward=tiny_reward())
    result = trainer.train()
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert trainer.components.vae.dtype == torch.bfloat16  # bf16 has fp32's range: no fp32 copy of the VAE
    assert trainer.components.text_encoders[1].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.trainable)
    assert unet.conv_in.weight.dtype == torch.bfloat16  # frozen LoRA base in half precision
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["grad_norm"]) for h in result["history"])
