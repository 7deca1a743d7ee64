"""ReFL failures that showed only at real model size, reproduced on tiny pipelines: fp16 bases (explicit dtypes,
saves that survive a failing validation), LoRA checkpoints that hold only the LoRA, gradient checkpointing of the
VAE decode, and outputs that load elsewhere (standard class names, portable model card, early xformers check,
no torchvision warnings)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from refl_tiny import PROMPTS, _one_thread, build_tiny_sd1, build_tiny_sdxl, tiny_reward  # noqa: E402,F401

from ImageReward.finetune import ReFLConfig, ReFLConfigError, ReFLTrainer, parse_args  # noqa: E402
from ImageReward.finetune.compat import dtype_kwargs  # noqa: E402
from ImageReward.finetune.trainer import TRAINABLE_NAME, hub_model_id  # noqa: E402


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps([{"text": p} for p in PROMPTS]))
    return path


def fp16_base(family: str, directory: Path, *, variant: str | None) -> Path:
    """A tiny base whose files hold fp16 weights (``variant="fp16"``, or fp16-only files with no variant); the
    SD1 one also has a feature extractor, as the released SD1.x pipelines do."""
    if family == "sd1":
        from transformers import CLIPImageProcessor

        pipe = build_tiny_sd1()
        pipe.register_modules(feature_extractor=CLIPImageProcessor())
    else:
        pipe = build_tiny_sdxl()
    pipe.to(torch.float16).save_pretrained(directory, variant=variant)
    return directory


def config(base: Path, prompts: Path, out: Path, family: str = "sd1", **overrides) -> ReFLConfig:
    values = dict(pretrained_model_name_or_path=str(base), model_family=family, train_data=str(prompts),
                  output_dir=str(out), resolution=32, train_batch_size=2, gradient_accumulation_steps=1,
                  max_train_steps=1, num_inference_steps=10, stop_step_min=6, stop_step_max=9, grad_scale=1.0,
                  learning_rate=5e-3, checkpointing_steps=1000, validation_steps=1000, seed=0, report_to="none")
    values.update(overrides)
    return ReFLConfig(**values)


# ---------------------------------------------------------------------------------------------- fp16 bases
@pytest.mark.integration
@pytest.mark.parametrize("family, variant, lora_rank", [("sd1", "fp16", 0), ("sd1", None, 0), ("sdxl", "fp16", 4)])
def test_fp16_base_trains_in_fp32_validates_and_saves_a_loadable_model(prompt_file, tmp_path, family, variant,
                                                                       lora_rank):
    """Without --mixed_precision every module runs in fp32 whatever the files hold (the text encoder stayed
    fp16 before and validation died with "mat1 and mat2 must have the same dtype"; nothing was saved)."""
    import diffusers

    base = fp16_base(family, tmp_path / "base", variant=variant)
    out = tmp_path / "out"
    trainer = ReFLTrainer(config(base, prompt_file, out, family, variant=variant, lora_rank=lora_rank,
                                 validation_prompts=["a red cube"]), reward=tiny_reward())
    result = trainer.train()
    comps = trainer.components
    assert {m.dtype for m in comps.frozen_modules()} == {torch.float32}
    assert trainer.accelerator.unwrap_model(trainer.unet).conv_in.weight.dtype == torch.float32
    assert "error" not in result["validation"][-1] and len(result["validation"][-1]["train_setting"]["reward"]) == 1

    pipe_class = getattr(diffusers, "StableDiffusionPipeline" if family == "sd1" else "StableDiffusionXLPipeline")
    if lora_rank:
        pipe = pipe_class.from_pretrained(base, variant=variant, **dtype_kwargs("diffusers", torch.float32))
        pipe.load_lora_weights(out)
    else:  # the saved pipeline is all float32 and generates without a dtype clash
        pipe = pipe_class.from_pretrained(out)
        modules = [pipe.unet, pipe.vae, pipe.text_encoder]
        assert {m.dtype for m in modules} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_bf16_loads_frozen_modules_in_bf16_and_the_lora_in_fp32(prompt_file, tmp_path):
    base = fp16_base("sdxl", tmp_path / "base", variant="fp16")
    trainer = ReFLTrainer(config(base, prompt_file, tmp_path / "out", "sdxl", variant="fp16", lora_rank=4,
                                 mixed_precision="bf16"), reward=tiny_reward())
    trainer.setup()
    comps = trainer.components
    # bf16 has fp32's range, so the force_upcast VAE needs no fp32 copy (it does under fp16, where it overflows)
    assert {m.dtype for m in comps.frozen_modules()} == {torch.bfloat16}
    assert trainer.family.vae_dtype(comps.vae.config, torch.float16) == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.trainable)
    assert trainer.accelerator.unwrap_model(trainer.unet).conv_in.weight.dtype == torch.bfloat16


def test_a_failing_validation_never_costs_the_trained_weights(prompt_file, tmp_path, caplog):
    from refl_tiny import save_tiny

    base = save_tiny("sd1", tmp_path / "base")
    trainer = ReFLTrainer(config(base, prompt_file, tmp_path / "out", lora_rank=4, max_train_steps=2,
                                 validation_prompts=["a red cube"], validation_steps=1), reward=tiny_reward())

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 must have the same dtype")

    trainer.family.build_pipeline = broken
    with caplog.at_level(logging.ERROR, logger="ImageReward.finetune.trainer"):
        result = trainer.train()
    assert result["global_step"] == 2
    assert [v["step"] for v in result["validation"]] == [1, 2]
    assert all("mat1 and mat2" in v["error"] for v in result["validation"])
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert any("validation at step 2 failed" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- checkpoints
class _Killed(Exception):
    pass


@pytest.mark.integration
def test_lora_checkpoint_holds_only_the_lora_and_resumes_exactly(prompt_file, tmp_path):
    from refl_tiny import save_tiny

    base = save_tiny("sd1", tmp_path / "base")
    common = dict(lora_rank=4, max_train_steps=4, gradient_accumulation_steps=2, checkpointing_steps=1)
    assert ReFLConfig().checkpoints_total_limit == 3  # a default: a full SDXL checkpoint is ~30 GB
    straight = ReFLTrainer(config(base, prompt_file, tmp_path / "a", **common), reward=tiny_reward())
    straight.train()
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (2, 3, 4)]

    checkpoint = tmp_path / "a" / "checkpoint-2"
    unet = straight.accelerator.unwrap_model(straight.unet)
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    from safetensors.torch import load_file

    assert set(load_file(str(checkpoint / TRAINABLE_NAME))) == names and all("lora_" in n for n in names)
    assert not list(checkpoint.glob("model*.safetensors"))
    lora_bytes = 4 * straight.n_trainable
    total = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    # trainable weights, AdamW's two moments and the diffusers LoRA file (4 x the LoRA) plus headers and RNG /
    # scheduler state (~70 kB here); the whole tiny UNet alone (3.3 MB) is ten times more
    assert total < 6 * lora_bytes + 64 * 1024, total
    assert sum(p.numel() for p in unet.parameters()) * 4 > 10 * total

    first = ReFLTrainer(config(base, prompt_file, tmp_path / "b", **common), reward=tiny_reward())
    real_save = first.save_checkpoint

    def save_then_die():
        path = real_save()
        if first.global_step == 2:
            raise _Killed(path)
        return path

    first.save_checkpoint = save_then_die
    with pytest.raises(_Killed):
        first.train()
    resumed = ReFLTrainer(config(base, prompt_file, tmp_path / "b", resume_from_checkpoint="latest", **common),
                          reward=tiny_reward())
    result = resumed.train()
    assert result["global_step"] == 4
    for a, b in zip(straight.history[2:], result["history"]):
        assert a["reward_mean"] == b["reward_mean"] and a["grad_norm"] == b["grad_norm"]
    state_a = straight.accelerator.unwrap_model(straight.unet).state_dict()
    state_b = resumed.accelerator.unwrap_model(resumed.unet).state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)  # LoRA and frozen base: bit-identical


def test_gradient_checkpointing_covers_the_vae_decode(prompt_file, tmp_path):
    """With --gradient_checkpointing the VAE decoder's blocks run again in backward (activations not kept),
    and the gradients are the same."""
    from refl_tiny import save_tiny

    base = save_tiny("sd1", tmp_path / "base")
    grads, calls = {}, {}
    for checkpointing in (False, True):
        trainer = ReFLTrainer(config(base, prompt_file, tmp_path / str(checkpointing),
                                     gradient_checkpointing=checkpointing), reward=tiny_reward())
        trainer.setup()
        block = trainer.components.vae.decoder.up_blocks[0]
        count = []
        real_forward = block.forward
        block.forward = lambda *a, **k: count.append(1) or real_forward(*a, **k)
        loss, _ = trainer.compute_loss(PROMPTS[:2], 0)
        trainer.accelerator.backward(loss)
        calls[checkpointing] = len(count)
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        grads[checkpointing] = torch.cat([p.grad.flatten() for p in unet.parameters()])
    assert calls == {False: 1, True: 2}
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- portable outputs
def test_saved_pipeline_is_in_the_layout_transformers_4_and_5_load(prompt_file, tmp_path):
    """Saved by transformers 5 without torchvision, a pipeline named ``CLIPImageProcessorPil`` (absent from
    transformers 4), had a tokenizer without ``vocab.json``/``merges.txt`` (transformers 4's CLIPTokenizer needs
    them) and text-encoder weights without ``text_model.`` (transformers 4 then loads a random text encoder).
    The saved pipeline has the standard layout, and loads here with the base's text encoder and tokenizer.
    (Checked by hand to load and generate on transformers 4.57 + diffusers 0.35 too.) The card names no path."""
    import diffusers
    from safetensors import safe_open
    from transformers import CLIPTokenizer

    base = fp16_base("sd1", tmp_path / "base", variant=None)
    out = tmp_path / "out"
    ReFLTrainer(config(base, prompt_file, out), reward=tiny_reward()).train()
    index = json.loads((out / "model_index.json").read_text())
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    vocab = json.loads((out / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 514 and vocab["<|endoftext|>"] == 513
    assert (out / "tokenizer" / "merges.txt").read_text().startswith("#version: 0.2")
    for path in (out / "text_encoder").glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            assert all(key.startswith("text_model.") for key in handle.keys())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out)
    assert pipe.feature_extractor.crop_size == {"height": 224, "width": 224}
    reference = diffusers.StableDiffusionPipeline.from_pretrained(base, **dtype_kwargs("diffusers", torch.float32))
    ids = torch.tensor([[512, 70, 80, 513]])
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], reference.text_encoder(ids)[0], rtol=0, atol=0)
    assert CLIPTokenizer.from_pretrained(out / "tokenizer")("a cat").input_ids == \
        reference.tokenizer("a cat").input_ids
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "base_model:" not in card and "# ReFL fine-tune of base" in card


def test_hub_model_id_of_base_models(tmp_path):
    assert hub_model_id("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    cached = "/home/me/.cache/huggingface/hub/models--CompVis--stable-diffusion-v1-4/snapshots/133a221b8aa7"
    assert hub_model_id(cached) == "CompVis/stable-diffusion-v1-4"
    assert hub_model_id(str(tmp_path)) is None
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert hub_model_id(str(tmp_path / "org" / "model")) is None


@pytest.mark.skipif(__import__("importlib").util.find_spec("xformers") is not None, reason="xformers installed")
def test_xformers_flag_is_checked_before_any_model_loads(prompt_file, tmp_path, monkeypatch):
    monkeypatch.setattr("ImageReward.finetune.families.ModelFamily.load_components",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ReFLConfigError, match="needs xformers"):
        parse_args(["--train_data", str(prompt_file), "--output_dir", str(tmp_path),
                    "--enable_xformers_memory_efficient_attention"])


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchvision") is not None,
                    reason="the warnings exist only without torchvision")
@pytest.mark.integration
def test_no_torchvision_fallback_warnings(tmp_path):
    """Importing the pipelines the trainer uses printed two transformers warnings per run; they are gone, and
    the same imports without the filter still print them (so this test sees the real thing)."""
    code = ("import sys; from ImageReward.finetune.families import get_family\n"
            "if sys.argv[1] == 'quiet':\n"
            "    get_family('sd1').pipeline_class(); get_family('sdxl').pipeline_class()\n"
            "else:\n"
            "    import diffusers; diffusers.StableDiffusionPipeline; diffusers.StableDiffusionXLPipeline\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    runs = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env)
            for mode in ("quiet", "plain")}
    assert runs["quiet"].returncode == 0 and runs["plain"].returncode == 0
    assert "requires torchvision" in runs["plain"].stderr
    assert "requires torchvision" not in runs["quiet"].stderr, runs["quiet"].stderr
