"""ReFL for SD1.x on a tiny pipeline built from configs (no downloads): the algorithm, learning, resume,
artefacts, and errors before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from refl_tiny import HELD_OUT, PROMPTS, _one_thread, save_tiny, tiny_reward  # noqa: E402,F401 (autouse fixture)

from ImageReward.finetune import (  # noqa: E402
    BatchOrder, PromptDataError, ReFLConfig, ReFLConfigError, ReFLTrainer, WeightedReward, get_family,
    load_prompts, parse_args, parse_reward_spec, refl_loss)
from ImageReward.finetune.rollout import draw_stop_index, rollout, training_scheduler  # noqa: E402


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory) -> Path:
    return save_tiny("sd1", tmp_path_factory.mktemp("tiny_sd1") / "pipe")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps([{"text": p, "image": f"{i:06d}-0000"} for i, p in enumerate(PROMPTS)]))
    return path


def tiny_config(base: Path, prompts: Path, out: Path, **overrides) -> ReFLConfig:
    """Fast settings: 32 px, 10 rollout steps (stop index in [6, 9]); grad_scale 1 (1e-3 is below AdamW eps)."""
    values = dict(pretrained_model_name_or_path=str(base), train_data=str(prompts), output_dir=str(out),
                  resolution=32, train_batch_size=2, gradient_accumulation_steps=1, max_train_steps=2,
                  num_inference_steps=10, stop_step_min=6, stop_step_max=9, grad_scale=1.0, learning_rate=5e-3,
                  checkpointing_steps=1000, validation_steps=1000, seed=0, report_to="none")
    values.update(overrides)
    return ReFLConfig(**values)


# ---------------------------------------------------------------------------------------------- algorithm
def test_loss_is_the_scaled_hinge():
    rewards = torch.tensor([1.5, 2.5, -0.3, 2.0])
    expected = 1e-3 * ((2 - 1.5) + 0.0 + (2 + 0.3) + 0.0) / 4
    assert refl_loss(rewards, grad_scale=1e-3).item() == pytest.approx(expected, rel=1e-6)
    assert refl_loss(rewards, grad_scale=1.0, margin=3.0).item() == pytest.approx((1.5 + 0.5 + 3.3 + 1.0) / 4)


def test_stop_index_is_uniform_on_30_39():
    cfg = ReFLConfig()
    assert (cfg.num_inference_steps, cfg.stop_step_min, cfg.stop_step_max, cfg.grad_scale) == (40, 30, 39, 1e-3)
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([draw_stop_index(30, 39, generator) for _ in range(5000)])
    counts = torch.bincount(draws, minlength=40)
    assert counts[:30].sum() == 0 and counts[30:].sum() == 5000
    assert counts[30:].min() > 400 and counts[30:].max() < 600  # 500 expected each


def test_training_scheduler_from_base_config_never_clips(sd1_dir):
    config = json.loads((sd1_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler = training_scheduler({**config, "clip_sample": True})
    assert type(scheduler).__name__ == "DDPMScheduler" and scheduler.config.clip_sample is False
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    scheduler.set_timesteps(40)
    assert scheduler.timesteps[30:].tolist() == [226, 201, 176, 151, 126, 101, 76, 51, 26, 1]


def test_rollout_no_grad_prefix_and_x0_formula(sd1_dir):
    family = get_family("sd1")
    comps = family.load_components(str(sd1_dir))
    calls = []
    real_forward = comps.unet.forward

    def recording_forward(sample, timestep, *args, **kwargs):
        calls.append((torch.is_grad_enabled(), int(timestep), sample.detach().clone()))
        out = real_forward(sample, timestep, *args, **kwargs)
        calls[-1] += (out.sample.detach().clone(),)
        return out

    comps.unet.forward = recording_forward
    scheduler = training_scheduler(comps.scheduler_config)
    cond = family.encode_prompts(comps, ["a cat", "a dog"])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x0 = rollout(comps.unet, scheduler, family, cond, latents, num_inference_steps=10, stop_index=7,
                 generator=torch.Generator().manual_seed(1))
    assert [c[0] for c in calls] == [False] * 7 + [True]  # 7 no-grad calls, then one with grad
    assert x0.requires_grad and x0.grad_fn is not None
    grad_in, t, x_t, eps = calls[-1]
    assert t == scheduler.timesteps[7].item() and not x_t.requires_grad
    alpha_bar = scheduler.alphas_cumprod[t]
    expected = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    torch.testing.assert_close(x0.detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_gradients_reach_only_the_unet(sd1_dir, prompt_file, tmp_path):
    trainer = ReFLTrainer(tiny_config(sd1_dir, prompt_file, tmp_path / "out"), reward=tiny_reward())
    trainer.setup()
    loss, stats = trainer.compute_loss(PROMPTS[:2], 0)
    trainer.accelerator.backward(loss)
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None for g in grads) and sum(int(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)
    frozen = [trainer.components.vae, *trainer.components.text_encoders, trainer.reward]
    for module in frozen:
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    # grad_scale 1 and every reward below the hinge at 2: the loss is exactly 2 - mean reward
    assert stats["reward_mean"].item() + 2 * stats["reward_std"].item() < 2
    assert stats["reward_loss"].item() == pytest.approx(2 - stats["reward_mean"].item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.integration
def test_thirty_steps_raise_held_out_reward(sd1_dir, prompt_file, tmp_path):
    cfg = tiny_config(sd1_dir, prompt_file, tmp_path / "out", max_train_steps=30, validation_prompts=HELD_OUT,
                      validation_steps=1000, report_to="tensorboard")
    trainer = ReFLTrainer(cfg, reward=tiny_reward(), monitor=tiny_reward(seed=1))
    trainer.setup()
    before = torch.tensor(trainer.validate()["train_setting"]["reward"])
    result = trainer.train()
    after = torch.tensor(result["validation"][-1]["train_setting"]["reward"])
    assert result["global_step"] == 30 and len(result["history"]) == 30
    # every held-out prompt improves (same seeds before and after), by much more than the gains vary
    gain = after - before
    assert bool((gain > 0).all()), (before, after)
    assert gain.mean().item() > 3 * gain.std().item() and gain.mean().item() > 0.02
    assert "heldout_reward" in result["validation"][-1]["train_setting"]
    logged = result["history"][-1]
    assert {"train_loss", "reward_mean", "reward_std", "grad_norm", "lr"} <= set(logged)
    assert list((tmp_path / "out" / "validation" / "step-30").glob("default_setting_*.png"))
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


@pytest.mark.integration
def test_kill_and_resume_matches_uninterrupted_run(sd1_dir, prompt_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    common = dict(max_train_steps=4, gradient_accumulation_steps=2, checkpointing_steps=2, use_ema=True)
    straight = ReFLTrainer(tiny_config(sd1_dir, prompt_file, tmp_path / "a", checkpoints_total_limit=1, **common),
                           reward=tiny_reward())
    straight.train()

    first = ReFLTrainer(tiny_config(sd1_dir, prompt_file, tmp_path / "b", **common), reward=tiny_reward())
    real_save = first.save_checkpoint

    def save_then_die():
        path = real_save()
        raise _Killed(path)

    first.save_checkpoint = save_then_die
    with pytest.raises(_Killed):
        first.train()
    (tmp_path / "b" / "checkpoint-9.tmp").mkdir()  # a half-written save from the "crash" is ignored
    resumed = ReFLTrainer(tiny_config(sd1_dir, prompt_file, tmp_path / "b", resume_from_checkpoint="latest",
                                      **common), reward=tiny_reward())
    result = resumed.train()
    assert result["global_step"] == 4 and len(result["history"]) == 2
    for a, b in zip(straight.history[2:], result["history"]):
        assert a["reward_mean"] == b["reward_mean"] and a["stop_index"] == b["stop_index"]
    unet_a = straight.accelerator.unwrap_model(straight.unet).state_dict()
    unet_b = resumed.accelerator.unwrap_model(resumed.unet).state_dict()
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    # checkpoints_total_limit honoured; the final folder is a loadable pipeline with the (EMA) weights
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-4"]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    saved = pipe.unet.state_dict()
    assert all(torch.equal(saved[k], unet_a[k]) for k in saved)  # EMA copied in before saving
    card = (tmp_path / "a" / "README.md").read_text()
    assert "reward_mean" in card and '"grad_scale": 1.0' in card


# ---------------------------------------------------------------------------------------------- inputs
def test_prompt_formats(tmp_path):
    prompts = ["a cat", "a dog, sitting", "the sea"]
    (tmp_path / "p.json").write_text(json.dumps([{"text": p} for p in prompts]))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"caption": p}) for p in prompts))
    (tmp_path / "p.csv").write_text("text,other\n" + "\n".join(f'"{p}",1' for p in prompts))
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    assert load_prompts(tmp_path / "p.json") == prompts
    assert load_prompts(tmp_path / "p.jsonl", caption_column="caption") == prompts
    assert load_prompts(tmp_path / "p.csv") == prompts
    assert load_prompts(tmp_path / "p.txt") == prompts
    assert sorted(load_prompts(tmp_path / "p.json", max_samples=2, seed=3)) != [] and \
        len(load_prompts(tmp_path / "p.json", max_samples=2, seed=3)) == 2


@pytest.mark.parametrize("content, match", [
    ('[{"text": "ok"}, {"prompt": "x"}]', "row 1: no 'text' field"),
    ('[{"text": "ok"}, {"text": ""}]', "row 1: expected a non-empty string"),
    ('[{"text": "ok"}', "invalid JSON"),
    ("[]", "no prompts"),
    ('{"text": "one"}', "expected a JSON list"),
])
def test_bad_prompt_files_fail_before_models_load(tmp_path, content, match, monkeypatch):
    path = tmp_path / "bad.json"
    path.write_text(content)
    monkeypatch.setattr("ImageReward.finetune.families.ModelFamily.load_components",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(PromptDataError, match=match):
        ReFLTrainer(ReFLConfig(train_data=str(path), output_dir=str(tmp_path / "o")))


@pytest.mark.parametrize("argv, match", [
    (["--grad_scale", "-1"], "grad_scale"),
    (["--stop_step_min", "35", "--stop_step_max", "40"], "stop_step_max=40"),
    (["--resolution", "500"], "multiple of 8"),
    (["--pretrain_loss_weight", "0.5"], "needs --pretrain_data"),
    (["--train_data", "missing.json"], "file not found"),
    (["--reward", "ImageReward-v1.0:abc,:2"], "empty scorer name"),
    (["--lora_rank", "4", "--use_ema"], "cannot be combined"),
    (["--resume_from_checkpoint", "checkpoint-77"], "no such checkpoint"),
    (["--guidance_scale", "0.5"], "guidance_scale"),
])
def test_bad_arguments_are_typed_errors(tmp_path, prompt_file, argv, match):
    base = ["--train_data", str(prompt_file), "--output_dir", str(tmp_path)]
    with pytest.raises(ReFLConfigError, match=match):
        parse_args(base + argv)


def test_parser_covers_the_original_options(prompt_file):
    cfg = parse_args(["--train_data", str(prompt_file), "--use_ema", "--resolution=512", "--center_crop",
                      "--random_flip", "--train_batch_size=2", "--gradient_accumulation_steps=4",
                      "--gradient_checkpointing", "--max_train_steps=100", "--learning_rate=1e-05",
                      "--max_grad_norm=1", "--lr_scheduler=constant", "--lr_warmup_steps=0",
                      "--output_dir=checkpoint/refl", "--grad_scale", "0.001", "--checkpointing_steps", "100",
                      "--validation_prompts", "a cat", "a dog"])
    assert cfg.use_ema and cfg.gradient_checkpointing and cfg.validation_prompts == ["a cat", "a dog"]
    assert (cfg.learning_rate, cfg.adam_weight_decay, cfg.adam_epsilon, cfg.max_grad_norm) == (1e-5, 1e-2, 1e-8, 1.0)


def test_reward_spec_and_weighted_mix():
    assert parse_reward_spec("ImageReward-v1.0:1.0, Aesthetic:0.1") == [("ImageReward-v1.0", 1.0), ("Aesthetic", 0.1)]
    assert parse_reward_spec("/models/my rm") == [("/models/my rm", 1.0)]
    a, b = tiny_reward(0), tiny_reward(1)
    b.higher_is_better = False
    mix = WeightedReward([a, b], [1.0, 0.5], ["a", "b"])
    pixels = torch.rand(2, 3, 32, 32, requires_grad=True)
    total, parts = mix.score_grad_parts(pixels, ["a cat", "a dog"])
    expected = a.score_grad(pixels, ["a cat", "a dog"]) - 0.5 * b.score_grad(pixels, ["a cat", "a dog"])
    torch.testing.assert_close(total, expected)
    total.sum().backward()
    assert pixels.grad is not None and all(not p.requires_grad for p in mix.parameters())


def test_batch_order_is_resumable_and_sharded():
    one = BatchOrder(20, 2, seed=5)
    again = BatchOrder(20, 2, seed=5)
    assert [one.batch(k) for k in range(25)] == [again.batch(k) for k in range(25)]
    epoch0 = sum((one.batch(k) for k in range(10)), [])
    assert sorted(epoch0) == list(range(20))
    shards = [BatchOrder(20, 2, seed=5, process_index=r, num_processes=2) for r in range(2)]
    seen = [i for k in range(5) for s in shards for i in s.batch(k)]
    assert sorted(seen) == list(range(20))
    with pytest.raises(PromptDataError, match="fewer than one batch"):
        BatchOrder(3, 2, num_processes=2)


def test_warns_when_updates_vanish_below_adam_eps(caplog):
    trainer = ReFLTrainer.__new__(ReFLTrainer)  # the watchdog needs only the config and the parameter count
    trainer.config, trainer.n_trainable, trainer._tiny_updates = ReFLConfig(), 10**6, 0
    with caplog.at_level("WARNING", logger="ImageReward.finetune.trainer"):
        for _ in range(9):
            trainer._watch_tiny_updates(1e-6)  # RMS 1e-9 < eps 1e-8
        assert not caplog.records
        trainer._watch_tiny_updates(1e-6)
    assert len(caplog.records) == 1 and "adam_epsilon" in caplog.records[0].getMessage()
    trainer._watch_tiny_updates(1.0)
    assert trainer._tiny_updates == 0


def test_launcher_reports_bad_options_without_traceback(tmp_path, capsys):
    from ImageReward.finetune.cli import main

    assert main(["--train_data", str(tmp_path / "none.json"), "--output_dir", str(tmp_path)]) == 2
    assert "--train_data" in capsys.readouterr().err


@pytest.mark.integration
def test_sd1_lora_reloads_in_diffusers(sd1_dir, prompt_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = tiny_config(sd1_dir, prompt_file, tmp_path / "out", lora_rank=4, lora_alpha=2.0, max_train_steps=2)
    trainer = ReFLTrainer(cfg, reward=tiny_reward())
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.unet).eval()
    assert trainer.n_trainable == 9984 and not (tmp_path / "out" / "unet").exists()
    pipe = StableDiffusionPipeline.from_pretrained(sd1_dir)
    pipe.load_lora_weights(tmp_path / "out")
    generator = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        reloaded = pipe.unet(sample, 300, hidden).sample
        torch.testing.assert_close(reloaded, trained(sample, 300, hidden).sample, rtol=1e-5, atol=1e-6)
        pipe.unload_lora_weights()
        assert (pipe.unet(sample, 300, hidden).sample - reloaded).abs().max() > 1e-4  # the LoRA did change it


def test_old_package_name_is_the_same_modules():
    """``ImageReward.refl`` (the package's name before online RL joined ReFL) still imports, as the very same
    module objects as ``ImageReward.finetune``: one class, so ``isinstance`` and patches agree."""
    import importlib

    import ImageReward.finetune as finetune
    import ImageReward.finetune.trainer as new_trainer
    import ImageReward.refl as refl
    from ImageReward.refl.trainer import ReFLTrainer

    assert refl is finetune
    assert ReFLTrainer is new_trainer.ReFLTrainer
    assert importlib.import_module("ImageReward.refl.rollout") is importlib.import_module("ImageReward.finetune.rollout")
