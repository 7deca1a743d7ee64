"""Online RL's three functions and DDPO's DDIM step against the originals' outputs (``tests/fixtures/grpo/``,
made by ``make_fixtures.py`` from yifan123/flow_grpo and kvablack/ddpo-pytorch), and the GRPO options' checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from ImageReward.finetune import (ReFLConfig, ReFLConfigError, ddim_step_with_logprob, group_advantages,  # noqa: E402
                                  grpo_loss, sde_step_with_logprob)
from ImageReward.finetune.grpo import combine_rewards, zero_std_ratio  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "grpo"


@pytest.fixture(scope="module")
def fixtures():
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "grpo_fixtures.safetensors")), json.loads((FIXTURES / "grpo_fixtures.json").read_text())


def _flow_scheduler(name: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if name == "sd3":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(10)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15)
        scheduler.set_timesteps(None, sigmas=np.linspace(1.0, 1 / 10, 10), mu=0.7)
    return scheduler


def test_sde_step_with_logprob_equals_flow_grpo_at_every_step(fixtures):
    """Every step index (first with sigma = 1 and last with sigma_prev = 0 included), SD3's shifted and FLUX's
    dynamic-shift schedules, two noise levels, scoring a given sample and drawing one from a seeded generator."""
    tensors, meta = fixtures
    checked = 0
    for case in meta["sde"]:
        scheduler = _flow_scheduler(case["scheduler"])
        torch.testing.assert_close(scheduler.sigmas, tensors[f"sde/{case['scheduler']}/sigmas"], rtol=0, atol=0)
        key = case["key"]
        inputs = {name: tensors[f"{key}/{name}"] for name in ("model_output", "sample", "prev_sample", "timestep")}
        for noise_level in (0.7, 1.0):
            scored = sde_step_with_logprob(scheduler, inputs["model_output"], inputs["timestep"], inputs["sample"],
                                           noise_level=noise_level, prev_sample=inputs["prev_sample"])
            drawn = sde_step_with_logprob(scheduler, inputs["model_output"], inputs["timestep"], inputs["sample"],
                                          noise_level=noise_level, generator=torch.Generator().manual_seed(case["seed"]))
            for tag, result in (("scored", scored), ("drawn", drawn)):
                for field, value in zip(("prev_sample", "log_prob", "prev_sample_mean", "std_dev_t"), result):
                    expected = tensors[f"{key}/{noise_level}/{tag}/{field}"]
                    assert value.shape == expected.shape and value.dtype == torch.float32
                    assert (value - expected).abs().max().item() <= 1e-6, (key, noise_level, tag, field)
                    checked += 1
    assert checked == 2 * 11 * 2 * 2 * 4


def test_ddim_step_with_logprob_equals_ddpo(fixtures):
    from diffusers import DDIMScheduler

    tensors, meta = fixtures
    for case in meta["ddim"]:
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1, prediction_type=case["prediction_type"])
        scheduler.set_timesteps(10)
        key = case["key"]
        eps, sample, prev, t = (tensors[f"{key}/{n}"] for n in ("model_output", "sample", "prev_sample", "timestep"))
        for eta in (1.0, 0.5):
            scored = ddim_step_with_logprob(scheduler, eps, t, sample, eta=eta, prev_sample=prev)
            drawn = ddim_step_with_logprob(scheduler, eps, t, sample, eta=eta,
                                           generator=torch.Generator().manual_seed(case["seed"]))
            for tag, result in (("scored", scored), ("drawn", drawn)):
                for i, field in enumerate(("prev_sample", "log_prob")):
                    expected = tensors[f"{key}/{eta}/{tag}/{field}"]
                    assert (result[i] - expected).abs().max().item() <= 1e-6, (key, eta, tag, field)
            # the mean and std returned besides: prev_sample = mean + std * noise
            prev_sample, _, mean, std = drawn
            noise = torch.randn(eps.shape, generator=torch.Generator().manual_seed(case["seed"]))
            torch.testing.assert_close(prev_sample, mean + std * noise)
    with pytest.raises(ValueError, match="either generator or prev_sample"):
        ddim_step_with_logprob(scheduler, eps, t, sample, generator=torch.Generator(), prev_sample=prev)


def test_group_advantages_equal_the_per_prompt_stat_tracker(fixtures):
    tensors, meta = fixtures
    for case in meta["advantages"]:
        rewards = tensors[f"{case['key']}/rewards"]
        for global_std in (False, True):
            ours = group_advantages(case["prompts"], rewards, global_std=global_std)
            assert ours.dtype == torch.float64 and ours.shape == rewards.shape
            torch.testing.assert_close(ours, tensors[f"{case['key']}/{global_std}"], rtol=0, atol=1e-12)
            # the same from a list, and the zero-std group gets advantage 0
            listed = group_advantages(case["prompts"], rewards.tolist(), global_std=global_std)
            torch.testing.assert_close(listed, ours, rtol=0, atol=0)
        zero = np.array(case["prompts"]) == "prompt 3"
        assert bool((ours[torch.from_numpy(zero)] == 0).all())


def test_grpo_loss_equals_flow_grpo_train_sd3(fixtures):
    tensors, meta = fixtures
    for case in meta["loss"]:
        key = case["key"]
        get = lambda name: tensors[f"{key}/{name}"]  # noqa: E731
        loss, policy, kl = grpo_loss(get("log_prob"), get("old_log_prob"), get("advantages"), case["clip_range"],
                                     case["adv_clip_max"], case["beta"], get("prev_sample_mean"),
                                     get("prev_sample_mean_ref"), get("std_dev_t"))
        torch.testing.assert_close(loss, get("loss"), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(policy, get("policy_loss"), rtol=1e-6, atol=1e-7)
        if case["beta"] > 0:
            torch.testing.assert_close(kl, get("kl_loss"), rtol=1e-6, atol=1e-7)
        else:
            assert kl.item() == 0.0


def test_grpo_loss_gradient_and_errors():
    """The gradient reaches log_prob through the unclipped ratio only; beta > 0 needs the KL inputs."""
    log_prob = torch.zeros(4, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 10.0, 0.0])
    loss, _, _ = grpo_loss(log_prob, torch.zeros(4), advantages, clip_range=0.2, adv_clip_max=5.0)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -torch.tensor([1.0, -1.0, 5.0, 0.0]) / 4)  # clamped at 5
    with pytest.raises(ValueError, match="beta > 0 needs"):
        grpo_loss(log_prob, torch.zeros(4), advantages, 0.2, 5.0, beta=0.1)


def test_reward_combination_and_zero_std_ratio():
    groups = [0, 0, 1, 1]
    a = torch.tensor([1.0, 3.0, 5.0, 5.0])
    b = torch.tensor([100.0, 300.0, 0.0, 200.0])
    torch.testing.assert_close(combine_rewards({"a": a, "b": b}, [1.0, 0.5], groups),
                               (a + 0.5 * b).double())
    z = combine_rewards({"a": a, "b": b}, [1.0, 0.5], groups, "group_zscore")
    expected = group_advantages(groups, a) + 0.5 * group_advantages(groups, b)
    torch.testing.assert_close(z, expected)
    assert z[0].item() == pytest.approx(-1.5, rel=1e-3)  # both rewards weigh by their weights, whatever the scale
    assert zero_std_ratio(groups, a) == 0.5


@pytest.mark.parametrize("overrides, message", [
    ({"group_size": 1}, "--group_size=1: expected an integer >= 2"),
    ({"group_size": 3}, "do not divide into groups of --group_size 3"),
    ({"gradient_accumulation_steps": 3}, "not a multiple of --gradient_accumulation_steps"),
    ({"timestep_fraction": 0.0}, "--timestep_fraction=0.0"),
    ({"timestep_fraction": 0.05}, "trains on no step"),
    ({"clip_range": 0.0}, "--clip_range=0.0"),
    ({"beta": -0.1}, "--beta=-0.1"),
    ({"eta": 0.0}, "--eta=0.0"),
    ({"noise_level": float("nan")}, "--noise_level=nan"),
    ({"pretrain_loss_weight": 1.0, "pretrain_data": "x"}, "--pretrain_loss_weight is for --algorithm refl"),
    ({"algorithm": "ppo"}, "--algorithm='ppo'"),
])
def test_grpo_options_are_checked_before_any_model_loads(tmp_path, overrides, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    values = dict(algorithm="grpo", train_data=str(prompts), train_batch_size=2, sample_batches_per_update=4,
                  gradient_accumulation_steps=2, group_size=4, num_inference_steps=10,
                  pretrained_model_name_or_path=str(tmp_path / "missing"))
    values.update(overrides)
    with pytest.raises(ReFLConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ReFLConfig(**values).validate()


def test_grpo_config_ignores_refl_only_stop_steps(tmp_path):
    """--num_inference_steps 10 with the ReFL stop-step defaults (30..39) is fine for grpo, not for refl."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    ReFLConfig(algorithm="grpo", train_data=str(prompts), num_inference_steps=10).validate()
    with pytest.raises(ReFLConfigError, match="stop_step_min"):
        ReFLConfig(train_data=str(prompts), num_inference_steps=10).validate()
