"""ReFL on tiny SD3 and FLUX.1 pipelines built from configs (no downloads): the flow-matching rollout against
the diffusers pipelines, the loss by hand, gradient isolation (full and LoRA), learning, exact resume, LoRA
reload in diffusers and the ComfyUI export, and ``--backprop_steps`` K > 1 (also on SD1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from refl_tiny import (HELD_OUT, PROMPTS, _one_thread, build_tiny_flux, save_tiny,  # noqa: E402,F401 (autouse)
                       tiny_reward, train_and_check_held_out_gain)

from ImageReward.finetune import ReFLConfig, ReFLConfigError, ReFLTrainer, get_family, parse_args  # noqa: E402
from ImageReward.finetune.rollout import rollout, training_scheduler  # noqa: E402

FLOW = ["sd3", "flux"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_flow")
    bases = {family: save_tiny(family, root / family) for family in FLOW}
    build_tiny_flux(guidance_embeds=False).save_pretrained(root / "schnell")  # FLUX.1-schnell: no guidance embedding
    return {**bases, "schnell": root / "schnell"}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in PROMPTS))
    return path


def flow_config(base: Path, family: str, prompts: Path, out: Path, **overrides) -> ReFLConfig:
    """32 px, 10 Euler steps (stop index in [6, 9]), 32 T5 tokens; grad_scale 1 (1e-3 is below AdamW eps)."""
    values = dict(pretrained_model_name_or_path=str(base), model_family=family, train_data=str(prompts),
                  output_dir=str(out), resolution=32, train_batch_size=2, gradient_accumulation_steps=1,
                  max_train_steps=2, num_inference_steps=10, stop_step_min=6, stop_step_max=9, grad_scale=1.0,
                  learning_rate=5e-3, checkpointing_steps=1000, validation_steps=1000, seed=0, report_to="none",
                  max_sequence_length=32)
    values.update(overrides)
    return ReFLConfig(**values)


def record_calls(model) -> list[tuple[bool, float]]:
    """Wrap ``model.forward``: (grad enabled?, timestep) of every call."""
    calls: list[tuple[bool, float]] = []
    real = model.forward

    def forward(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), float(kwargs["timestep"].flatten()[0])))
        return real(*args, **kwargs)

    model.forward = forward
    return calls


# ---------------------------------------------------------------------------------------------- the rollout
@pytest.mark.integration
@pytest.mark.parametrize("base_name, guidance", [("sd3", 1.0), ("sd3", 3.0), ("flux", 1.0), ("schnell", 1.0)])
def test_inference_rollout_equals_the_diffusers_pipeline(bases, base_name, guidance):
    """stop_index=None runs the whole chain: the same latents as StableDiffusion3Pipeline / FluxPipeline given the
    same start noise (schedule with shift / dynamic-shift mu, timestep scaling, FLUX packing and guidance
    embedding, SD3 classifier-free guidance on the empty prompt)."""
    family_name = "flux" if base_name == "schnell" else base_name
    family = get_family(family_name)
    comps = family.load_components(str(bases[base_name]))
    pipe = family.build_pipeline(comps, comps.unet)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cube", "a blue dog"]
    seen: list[float] = []

    def on_step(_pipe, _i, t, kwargs):
        seen.append(float(t))
        return kwargs

    if family_name == "flux":
        packed = pipe._pack_latents(noise, 2, 4, 16, 16)
        expected = pipe(prompts, height=32, width=32, num_inference_steps=8, latents=packed, output_type="latent",
                        max_sequence_length=32, callback_on_step_end=on_step).images
        expected = pipe._unpack_latents(expected, 32, 32, pipe.vae_scale_factor)
    else:
        expected = pipe(prompts, height=32, width=32, num_inference_steps=8, latents=noise, output_type="latent",
                        guidance_scale=guidance, max_sequence_length=32, callback_on_step_end=on_step).images
    family.max_sequence_length = 32
    cond = family.encode_prompts(comps, prompts)
    uncond = family.unconditional(comps, 2) if guidance > 1 else None
    scheduler = training_scheduler(comps.scheduler_config)
    calls = record_calls(comps.unet)
    with torch.no_grad():
        final = rollout(comps.unet, scheduler, family, cond, noise, num_inference_steps=8, uncond=uncond,
                        guidance_scale=guidance)
    assert seen == pytest.approx(scheduler.timesteps.tolist())
    if base_name == "flux":  # the dynamic shift: mu from the 8x8 = 64 image tokens, as FluxPipeline
        mu = 64 * (1.15 - 0.5) / (4096 - 256) + 0.5 - (1.15 - 0.5) / (4096 - 256) * 256
        s = np.linspace(1.0, 1 / 8, 8)
        assert scheduler.sigmas[:-1].tolist() == pytest.approx((math.exp(mu) / (math.exp(mu) + 1 / s - 1)).tolist(),
                                                               rel=1e-5)
        assert [t for _, t in calls] == pytest.approx([t / 1000 for t in seen], rel=1e-5)  # FLUX takes t / 1000
    elif base_name == "schnell":  # shift 1, sigmas linspace(1, 1/N, N); no guidance embedding
        assert scheduler.sigmas[:-1].tolist() == pytest.approx(np.linspace(1.0, 1 / 8, 8).tolist(), rel=1e-5)
    else:  # shift 3
        sigma = scheduler.sigmas[3].item()
        assert seen[3] / 1000 == pytest.approx(sigma, rel=1e-5)
    torch.testing.assert_close(final, expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("family_name", FLOW)
@pytest.mark.parametrize("backprop_steps", [1, 3])
def test_rollout_no_grad_prefix_last_k_steps_and_x0(bases, family_name, backprop_steps):
    family = get_family(family_name)
    comps = family.load_components(str(bases[family_name]))
    family.max_sequence_length = 32
    cond = family.encode_prompts(comps, ["a cat", "a dog"])
    scheduler = training_scheduler(comps.scheduler_config)
    outputs = []
    real = comps.unet.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append((torch.is_grad_enabled(), kwargs["hidden_states"].detach().clone(), out[0].detach().clone()))
        return out

    comps.unet.forward = forward
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x0 = rollout(comps.unet, scheduler, family, cond, latents, num_inference_steps=10, stop_index=7,
                 backprop_steps=backprop_steps, checkpoint_steps=backprop_steps > 1)
    grad_flags = [g for g, _, _ in outputs]
    if backprop_steps > 1:  # checkpointed steps run again in the backward pass; the forward pass is as below
        grad_flags = grad_flags[:8]
    assert grad_flags == [False] * (8 - backprop_steps) + [True] * backprop_steps
    assert x0.requires_grad and x0.dtype == torch.float32
    _, x_t, v = outputs[7]
    if family_name == "flux":  # the transformer sees packed latents [B, 64, 16]; unpack both
        x_t, v = (family_unpack(a) for a in (x_t, v))
    sigma = scheduler.sigmas[7]
    torch.testing.assert_close(x0.detach(), x_t - sigma * v, rtol=1e-5, atol=1e-5)  # x0 = x_t - sigma_t * v
    x0.sum().backward()
    trained = [p for p in comps.unet.parameters() if p.grad is not None]
    assert trained and all(p.grad is None for e in comps.text_encoders for p in e.parameters())


def family_unpack(packed: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, 32, 32, 2)


def test_backprop_steps_on_sd1_uses_k_unet_calls(tmp_path):
    sd1 = save_tiny("sd1", tmp_path / "sd1")
    family = get_family("sd1")
    comps = family.load_components(str(sd1))
    calls = []
    real = comps.unet.forward

    def forward(sample, timestep, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(sample, timestep, *args, **kwargs)

    comps.unet.forward = forward
    cond = family.encode_prompts(comps, ["a cat"])
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = {}
    for k in (1, 2):
        calls.clear()
        comps.unet.zero_grad(set_to_none=True)
        x0 = rollout(comps.unet, training_scheduler(comps.scheduler_config), family, cond, latents,
                     num_inference_steps=10, stop_index=7, generator=torch.Generator().manual_seed(1),
                     backprop_steps=k)
        assert calls == [False] * (8 - k) + [True] * k
        x0.square().mean().backward()
        grads[k] = comps.unet.conv_in.weight.grad.clone()
    assert not torch.allclose(grads[1], grads[2])


# ---------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("family_name", FLOW)
def test_loss_equals_a_hand_computation(bases, prompt_file, tmp_path, family_name):
    """compute_loss == grad_scale * mean(relu(margin - reward(decode(x0)))) with the Euler steps, x0, the VAE's
    scaling and shift factors written out here."""
    cfg = flow_config(bases[family_name], family_name, prompt_file, tmp_path, grad_scale=0.5, reward_margin=3.0)
    trainer = ReFLTrainer(cfg, reward=tiny_reward())
    trainer.setup()
    state = trainer.generator.get_state()
    prompts = PROMPTS[:2]
    loss, stats = trainer.compute_loss(prompts, 0)

    generator = torch.Generator().set_state(state)
    stop = int(torch.randint(6, 10, (1,), generator=generator))
    x = torch.randn(2, 4, 16, 16, generator=generator)
    family, comps = trainer.family, trainer.components
    cond = family.encode_prompts(comps, prompts)
    scheduler = training_scheduler(comps.scheduler_config)
    family.set_timesteps(scheduler, 10, x)
    sigmas, model = scheduler.sigmas, trainer.accelerator.unwrap_model(trainer.unet)
    with torch.no_grad():
        for i in range(stop):
            x = x + (sigmas[i + 1] - sigmas[i]) * family.predict(model, scheduler, x, scheduler.timesteps[i], cond)
        x0 = x - sigmas[stop] * family.predict(model, scheduler, x, scheduler.timesteps[stop], cond)
        vae = comps.vae
        image = vae.decode(x0 / vae.config.scaling_factor + vae.config.shift_factor).sample
        rewards = trainer.reward.score_grad((image / 2 + 0.5).clamp(0, 1), prompts)
    expected = 0.5 * torch.relu(3.0 - rewards).mean()
    assert stats["stop_index"].item() == stop
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["reward_mean"].item() == pytest.approx(rewards.mean().item(), rel=1e-5, abs=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("family_name", FLOW)
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradients_reach_only_the_transformer_or_its_lora(bases, prompt_file, tmp_path, family_name, lora_rank):
    cfg = flow_config(bases[family_name], family_name, prompt_file, tmp_path, lora_rank=lora_rank)
    trainer = ReFLTrainer(cfg, reward=tiny_reward())
    trainer.setup()
    loss, _ = trainer.compute_loss(PROMPTS[:2], 0)
    trainer.accelerator.backward(loss)
    model = trainer.accelerator.unwrap_model(trainer.unet)
    named = dict(model.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    if lora_rank:
        lora = {n for n in named if "lora_" in n}
        assert lora and {n for n, p in named.items() if p.grad is not None} == lora
        lora_b = {n for n in lora if "lora_B" in n}
        # B starts at zero: only B gets a gradient at step one; SD3's last block discards the text stream's
        # output, so the text queries there (add_q_proj) rightly get none
        unused = {"transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"} if family_name == "sd3" else set()
        assert with_grad == lora_b - unused
        wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
        assert wrapped == {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
        assert trainer.n_trainable == sum(named[n].numel() for n in lora)
        if family_name == "sd3":  # SD3.5's second attention (dual-attention block) gets LoRA too
            assert any(".attn2.to_q.lora_A" in n for n in lora)
    else:
        assert len(with_grad) > 0.8 * len(named)
    for module in [trainer.components.vae, *trainer.components.text_encoders, trainer.reward]:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.integration
@pytest.mark.parametrize("family_name, backprop_steps", [("sd3", 1), ("flux", 1), ("flux", 3)])
def test_thirty_lora_updates_raise_held_out_reward(bases, prompt_file, tmp_path, family_name, backprop_steps):
    cfg = flow_config(bases[family_name], family_name, prompt_file, tmp_path / "out", lora_rank=4,
                      learning_rate=1e-1 if family_name == "flux" else 5e-2, max_train_steps=30,
                      validation_prompts=HELD_OUT,
                      backprop_steps=backprop_steps, gradient_checkpointing=backprop_steps > 1)
    result = train_and_check_held_out_gain(ReFLTrainer(cfg, reward=tiny_reward()))
    if backprop_steps > 1:
        assert {h["backprop_steps"] for h in result["history"]} == {3.0}


def test_backprop_steps_three_differs_from_one(bases, prompt_file, tmp_path):
    grads = {}
    for k in (1, 3):
        cfg = flow_config(bases["flux"], "flux", prompt_file, tmp_path / f"k{k}", backprop_steps=k,
                          gradient_checkpointing=True)
        trainer = ReFLTrainer(cfg, reward=tiny_reward())
        trainer.setup()
        loss, stats = trainer.compute_loss(PROMPTS[:2], 0)
        trainer.accelerator.backward(loss)
        model = trainer.accelerator.unwrap_model(trainer.unet)
        grads[k] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[1][0] == pytest.approx(grads[3][0], rel=1e-5)  # same forward value (same draws) ...
    cos = torch.nn.functional.cosine_similarity(grads[1][1], grads[3][1], dim=0).item()
    assert cos < 0.999 and not torch.allclose(grads[1][1], grads[3][1])  # ... a different gradient


@pytest.mark.integration
def test_random_backprop_steps_are_drawn_per_update(bases, prompt_file, tmp_path):
    cfg = flow_config(bases["sd3"], "sd3", prompt_file, tmp_path, lora_rank=4, backprop_steps=4,
                      random_backprop_steps=True, max_train_steps=6)
    result = ReFLTrainer(cfg, reward=tiny_reward()).train()
    drawn = [h["backprop_steps"] for h in result["history"]]
    assert set(drawn) <= {1.0, 2.0, 3.0, 4.0} and len(set(drawn)) > 1


# ---------------------------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


@pytest.mark.integration
@pytest.mark.parametrize("family_name, lora_rank", [("flux", 4), ("sd3", 0)])
def test_kill_and_resume_matches_uninterrupted_run(bases, prompt_file, tmp_path, family_name, lora_rank):
    common = dict(lora_rank=lora_rank, max_train_steps=4, checkpointing_steps=2, backprop_steps=2)
    base = bases[family_name]
    straight = ReFLTrainer(flow_config(base, family_name, prompt_file, tmp_path / "a", **common), reward=tiny_reward())
    straight.train()
    first = ReFLTrainer(flow_config(base, family_name, prompt_file, tmp_path / "b", **common), reward=tiny_reward())
    real_save = first.save_checkpoint
    first.save_checkpoint = lambda: (_ for _ in ()).throw(_Killed(real_save()))
    with pytest.raises(_Killed):
        first.train()
    resumed = ReFLTrainer(flow_config(base, family_name, prompt_file, tmp_path / "b", resume_from_checkpoint="latest",
                                      **common), reward=tiny_reward())
    result = resumed.train()
    assert result["global_step"] == 4 and len(result["history"]) == 2
    for a, b in zip(straight.history[2:], result["history"]):
        assert a["reward_mean"] == b["reward_mean"] and a["stop_index"] == b["stop_index"]
    state_a = straight.accelerator.unwrap_model(straight.unet).state_dict()
    state_b = resumed.accelerator.unwrap_model(resumed.unet).state_dict()
    assert all(torch.equal(v, state_b[k]) for k, v in state_a.items())


# ---------------------------------------------------------------------------------------------- artefacts
def _transformer_inputs(family_name: str, generator: torch.Generator) -> dict:
    if family_name == "flux":
        return dict(hidden_states=torch.randn(1, 64, 16, generator=generator), timestep=torch.tensor([0.6]),
                    guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32, generator=generator),
                    encoder_hidden_states=torch.randn(1, 12, 64, generator=generator), txt_ids=torch.zeros(12, 3),
                    img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0),
                                                       indexing="ij"), -1).reshape(64, 3))
    return dict(hidden_states=torch.randn(1, 4, 16, 16, generator=generator), timestep=torch.tensor([600.0]),
                encoder_hidden_states=torch.randn(1, 20, 64, generator=generator),
                pooled_projections=torch.randn(1, 64, generator=generator))


@pytest.mark.parametrize("family_name", FLOW)
def test_saved_lora_reloads_with_load_lora_weights_and_comfyui_export(bases, prompt_file, tmp_path, family_name):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    cfg = flow_config(bases[family_name], family_name, prompt_file, out, lora_rank=4, lora_alpha=8.0,
                      learning_rate=5e-2, max_train_steps=3)
    trainer = ReFLTrainer(cfg, reward=tiny_reward())
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.unet).eval()
    assert not (out / "transformer").exists()
    pipe = get_family(family_name).pipeline_class().from_pretrained(bases[family_name])
    pipe.load_lora_weights(out, adapter_name="refl")
    inputs = _transformer_inputs(family_name, torch.Generator().manual_seed(0))
    with torch.no_grad():
        reloaded = pipe.transformer(**inputs, return_dict=False)[0]
        torch.testing.assert_close(reloaded, trained(**inputs, return_dict=False)[0], rtol=1e-5, atol=1e-6)
        pipe.unload_lora_weights()
        assert (pipe.transformer(**inputs, return_dict=False)[0] - reloaded).abs().max() > 1e-4  # LoRA changed it

    diffusers_file = load_file(str(out / "pytorch_lora_weights.safetensors"))
    comfy = load_file(str(out / "refl_lora_comfyui.safetensors"))
    weights = {k: v for k, v in comfy.items() if not k.endswith(".alpha")}
    assert weights.keys() == diffusers_file.keys() and all(k.startswith("transformer.") for k in weights)
    assert all(torch.equal(weights[k], diffusers_file[k]) for k in weights)
    alphas = {k[: -len(".alpha")]: float(v) for k, v in comfy.items() if k.endswith(".alpha")}
    assert set(alphas) == {k[: -len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")}
    assert set(alphas.values()) == {8.0}


def test_sd3_without_t5_and_offloaded_text_encoders(bases, prompt_file, tmp_path):
    cfg = flow_config(bases["sd3"], "sd3", prompt_file, tmp_path, drop_t5=True, offload_text_encoders=True,
                      lora_rank=4, max_train_steps=1)
    trainer = ReFLTrainer(cfg, reward=tiny_reward())
    trainer.setup()
    assert trainer.components.text_encoders[2] is None and trainer.components.tokenizers[2] is None
    cond = trainer.encode(["a cat"])
    assert cond.hidden.shape == (1, 77 + 32, 64) and cond.pooled.shape == (1, 64)
    assert cond.hidden[:, 77:].abs().max() == 0  # no T5: zeros, as StableDiffusion3Pipeline(text_encoder_3=None)
    assert all(p.device.type == "cpu" for e in trainer.components.text_encoders if e is not None
               for p in e.parameters())
    result = trainer.train()
    assert np.isfinite(result["history"][0]["train_loss"])


@pytest.mark.parametrize("argv, match", [
    (["--model_family", "flux", "--guidance_scale", "3"], "guidance-distilled"),
    (["--model_family", "sd3", "--resolution", "520"], "multiple of 16"),
    (["--backprop_steps", "32"], "stop_step_min \\+ 1 = 31"),
    (["--backprop_steps", "0"], "backprop_steps"),
    (["--model_family", "flux", "--drop_t5"], "drop_t5"),
    (["--model_family", "sd3", "--pretrain_data", "x", "--pretrain_loss_weight", "1"], "not implemented"),
    (["--model_family", "sd3", "--max_sequence_length", "1000"], "max_sequence_length"),
])
def test_bad_flow_arguments_are_typed_errors(tmp_path, prompt_file, argv, match):
    base = ["--train_data", str(prompt_file), "--output_dir", str(tmp_path)]
    with pytest.raises(ReFLConfigError, match=match):
        parse_args(base + argv)


def test_wrong_family_is_named_before_weights_load(bases, prompt_file, tmp_path):
    trainer = ReFLTrainer(flow_config(bases["flux"], "sd3", prompt_file, tmp_path), reward=tiny_reward())
    with pytest.raises(ReFLConfigError, match="is a FluxPipeline \\(pass --model_family flux\\)"):
        trainer.setup()
