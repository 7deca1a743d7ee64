"""``--algorithm grpo`` end to end on tiny SD3, FLUX.1, SD1 and SDXL pipelines (no downloads), with a
non-differentiable reward: learning on held-out prompts, gradient isolation, the KL penalty, exact resume after a
kill, the LoRA reloading in diffusers, and the reward's failures (NaN, an unreachable scorer)."""

from __future__ import annotations

import math
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from grpo_tiny import Brightness, grpo_config, write_prompts  # noqa: E402
from refl_tiny import (HELD_OUT, PROMPTS, _one_thread, save_tiny,  # noqa: E402,F401 (autouse)
                       train_and_check_held_out_gain)

from ImageReward.errors import ResumeSettingsError  # noqa: E402
from ImageReward.finetune import (ReFLConfigError, ReFLTrainer, RewardUnavailableError, RewardValueError,  # noqa: E402
                                  get_family)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_grpo")
    return {family: save_tiny(family, root / family) for family in ("sd1", "sdxl", "sd3", "flux")}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", PROMPTS)


# ---------------------------------------------------------------------------------------------- learning
LEARNING = {"sd3": dict(lora_rank=0, learning_rate=1e-2), "flux": dict(lora_rank=0, learning_rate=1e-2),
            "sd1": dict(lora_rank=0, learning_rate=1e-2)}


@pytest.mark.parametrize("family_name", ["sd3", "flux", "sd1"])
def test_thirty_updates_raise_a_non_differentiable_held_out_reward(bases, prompt_file, tmp_path, family_name):
    """30 updates on brightness (no gradient: ReFL refuses it) raise it on every held-out prompt, rendered with
    the deterministic sampler at fixed seeds before and after; each update logs flow_grpo's diagnostics."""
    reward = Brightness()
    cfg = grpo_config(bases[family_name], family_name, prompt_file, tmp_path / "out", max_train_steps=30,
                      validation_prompts=HELD_OUT, **LEARNING[family_name])
    # brightness moves by ~1e-2 on the tiny VAE's images: every held-out prompt must gain (no fixed margin)
    result = train_and_check_held_out_gain(ReFLTrainer(cfg, reward=reward), margin=False)
    sampled = [h["reward_mean"] for h in result["history"]]
    assert sum(sampled[-5:]) > sum(sampled[:5]), sampled  # the training samples got brighter too
    first = result["history"][0]
    for key in ("reward_mean", "reward_std", "reward/brightness/mean", "reward/brightness/std", "zero_std_ratio",
                "kl", "clipfrac", "approx_kl", "policy_loss", "train_loss", "grad_norm", "lr"):
        assert key in first and torch.isfinite(torch.tensor(first[key])), key
    assert max(h["approx_kl"] for h in result["history"]) > 0  # the second batch of an update moved
    assert reward.calls > 0


def test_refl_refuses_the_non_differentiable_reward_grpo_takes(bases, prompt_file, tmp_path):
    cfg = grpo_config(bases["sd1"], "sd1", prompt_file, tmp_path, algorithm="refl", stop_step_min=3, stop_step_max=5)
    with pytest.raises(ReFLConfigError, match="not differentiable"):
        ReFLTrainer(cfg, reward=Brightness()).setup()


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("family_name, lora_rank", [("sd3", 4), ("sdxl", 4), ("sd1", 0)])
def test_one_update_changes_only_the_lora_or_the_denoiser(bases, prompt_file, tmp_path, family_name, lora_rank):
    guidance = 3.0 if family_name == "sd3" else 1.0  # sd3: sampling and training with classifier-free guidance
    trainer = ReFLTrainer(grpo_config(bases[family_name], family_name, prompt_file, tmp_path, lora_rank=lora_rank,
                                      max_train_steps=1, guidance_scale=guidance), reward=Brightness())
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.unet)
    frozen = [trainer.components.vae, *[e for e in trainer.components.text_encoders if e is not None]]
    before = {id(m): {k: v.clone() for k, v in m.state_dict().items()} for m in [model, *frozen]}
    trainer.train_step()
    for module in frozen:
        assert all(torch.equal(v, before[id(module)][k]) for k, v in module.state_dict().items())
        assert all(not p.requires_grad for p in module.parameters())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[id(model)][k])}
    if lora_rank:
        assert changed and all("lora_" in k for k in changed)
    else:
        assert len(changed) > 0.5 * len(before[id(model)])


# ---------------------------------------------------------------------------------------------- KL penalty
@pytest.mark.parametrize("family_name, lora_rank", [("sd3", 4), ("sd1", 0)])
def test_beta_adds_the_kl_to_the_base_model(bases, prompt_file, tmp_path, family_name, lora_rank):
    """beta = 0 logs no KL; beta > 0 adds beta x the KL of the step means to the reference, which is the base model
    (LoRA: the adapter disabled; full fine-tune: the frozen copy): 0 while the policy is the base, > 0 after. The
    same seed gives the same first samples, and the two runs train to different weights."""
    runs = {}
    for beta in (0.0, 0.5):
        trainer = ReFLTrainer(grpo_config(bases[family_name], family_name, prompt_file, tmp_path / str(beta),
                                          lora_rank=lora_rank, beta=beta, max_train_steps=3, learning_rate=1e-2,
                                          num_inference_steps=4), reward=Brightness())
        torch.manual_seed(0)  # the same LoRA init in both runs (peft draws it from the global RNG)
        result = trainer.train()
        runs[beta] = (trainer, result["history"])
    (plain_trainer, plain), (trainer, penalised) = runs[0.0], runs[0.5]
    assert all(h["kl"] == 0.0 and h["train_loss"] == h["policy_loss"] for h in plain)
    assert plain[0]["reward_mean"] == penalised[0]["reward_mean"]  # the same first samples
    assert all(h["kl"] > 0 for h in penalised)
    for h in penalised:  # loss = policy + beta * KL (averaged over the update's micro-steps: linear)
        assert h["train_loss"] == pytest.approx(h["policy_loss"] + 0.5 * h["kl"], rel=1e-3, abs=1e-9)
    final = {k: v for k, v in trainer.accelerator.unwrap_model(trainer.unet).state_dict().items()}
    plain_final = plain_trainer.accelerator.unwrap_model(plain_trainer.unet).state_dict()
    assert any(not torch.equal(v, plain_final[k]) for k, v in final.items())

    # the reference is the base model: the same step means as the freshly loaded base denoiser
    grpo = trainer.grpo
    prompts = PROMPTS[:2]
    samples = grpo.sample(prompts)
    cond, uncond = grpo._conditioning(prompts)
    fresh = get_family(family_name).load_components(str(bases[family_name])).unet.eval()
    with torch.no_grad():
        with grpo.reference_model() as reference:
            _, mean_ref, _ = grpo.step_log_prob(reference, prompts, cond, uncond, samples["trajectory"],
                                                samples["timesteps"], 1)
        _, mean_base, _ = grpo.step_log_prob(fresh, prompts, cond, uncond, samples["trajectory"],
                                             samples["timesteps"], 1)
        _, mean_policy, _ = grpo.step_log_prob(trainer.unet, prompts, cond, uncond, samples["trajectory"],
                                               samples["timesteps"], 1)
    torch.testing.assert_close(mean_ref, mean_base, rtol=1e-5, atol=1e-6)
    assert (mean_policy - mean_base).abs().max() > 1e-5
    if lora_rank:  # the adapter is back on after the reference forward
        model = trainer.accelerator.unwrap_model(trainer.unet)
        assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


@pytest.mark.parametrize("family_name, lora_rank", [("flux", 4), ("sd1", 0)])
def test_kill_and_resume_matches_uninterrupted_run(bases, prompt_file, tmp_path, family_name, lora_rank):
    """Killed right after checkpoint 2, resumed: the same prompts, samples, rewards, and bit-identical weights
    (the rollout generator, the optimizer and the data position come back; two inner epochs draw permutations)."""
    common = dict(lora_rank=lora_rank, max_train_steps=4, checkpointing_steps=2, num_inner_epochs=2, beta=0.1,
                  num_inference_steps=3)
    base = bases[family_name]
    straight = ReFLTrainer(grpo_config(base, family_name, prompt_file, tmp_path / "a", **common), reward=Brightness())
    # the trainer seeds every generator itself (--seed): the global RNG is left in another state before each run
    torch.manual_seed(1234)
    straight.train()
    first = ReFLTrainer(grpo_config(base, family_name, prompt_file, tmp_path / "b", **common), reward=Brightness())
    real_save = first.save_checkpoint
    first.save_checkpoint = lambda: (_ for _ in ()).throw(_Killed(real_save()))
    torch.manual_seed(99)
    with pytest.raises(_Killed):
        first.train()
    resumed = ReFLTrainer(grpo_config(base, family_name, prompt_file, tmp_path / "b", resume_from_checkpoint="latest",
                                      **common), reward=Brightness())
    result = resumed.train()
    assert result["global_step"] == 4 and len(result["history"]) == 2
    for a, b in zip(straight.history[2:], result["history"]):
        assert a == b
    state_a = straight.accelerator.unwrap_model(straight.unet).state_dict()
    state_b = resumed.accelerator.unwrap_model(resumed.unet).state_dict()
    assert all(torch.equal(v, state_b[k]) for k, v in state_a.items())


# ---------------------------------------------------------------------------------------------- artefacts
@pytest.mark.parametrize("family_name", ["sd3", "sd1"])
def test_saved_lora_loads_with_load_lora_weights(bases, prompt_file, tmp_path, family_name):
    out = tmp_path / "out"
    trainer = ReFLTrainer(grpo_config(bases[family_name], family_name, prompt_file, out, max_train_steps=2,
                                      learning_rate=5e-2), reward=Brightness())
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.unet).eval()
    family = get_family(family_name)
    pipe = family.pipeline_class().from_pretrained(bases[family_name])
    pipe.load_lora_weights(out, adapter_name="grpo")
    denoiser = getattr(pipe, family.denoiser_name)
    g = torch.Generator().manual_seed(0)
    if family_name == "sd3":
        inputs = dict(hidden_states=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([600.0]),
                      encoder_hidden_states=torch.randn(1, 20, 64, generator=g),
                      pooled_projections=torch.randn(1, 64, generator=g), return_dict=False)
    else:
        inputs = dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([600]),
                      encoder_hidden_states=torch.randn(1, 77, 32, generator=g), return_dict=False)
    with torch.no_grad():
        reloaded = denoiser(**inputs)[0]
        torch.testing.assert_close(reloaded, trained(**inputs)[0], rtol=1e-5, atol=1e-6)
        pipe.unload_lora_weights()
        assert (denoiser(**inputs)[0] - reloaded).abs().max() > 1e-6  # the LoRA changed the model
    card = (out / "README.md").read_text()
    assert "GRPO" in card and "grpo" in card


# ---------------------------------------------------------------------------------------------- bad rewards
class _NaNOn(Brightness):
    """Brightness, but NaN for one prompt."""

    name = "nan_scorer"

    def score_encoded(self, prompts, image_features):
        values = super().score_encoded(prompts, image_features).clone()
        values[[i for i, p in enumerate(prompts) if p == PROMPTS[3]]] = float("nan")
        return values


class _GoesDown(Brightness):
    """A served reward whose server goes away after ``working`` calls (its client gave up after its retries)."""

    name = "served"

    def __init__(self, working: int) -> None:
        super().__init__()
        self.working = working

    def score_batch(self, prompts, images, **kwargs):
        if self.working <= 0:
            raise ConnectionError("http://127.0.0.1:9/score: connection refused after 3 retries")
        self.working -= 1
        return super().score_batch(prompts, images, **kwargs)


def test_nan_reward_names_the_scorer_and_the_prompts(bases, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:4])
    cfg = grpo_config(bases["sd1"], "sd1", prompts, tmp_path / "out", train_batch_size=4, sample_batches_per_update=2,
                      group_size=4, num_inference_steps=2, max_train_steps=4)
    with pytest.raises(RewardValueError, match=r"'nan_scorer' returned 4 non-finite.*'a photo of thing number 3'"):
        ReFLTrainer(cfg, reward=_NaNOn()).train()


def test_unreachable_reward_stops_cleanly_keeping_the_last_checkpoint(bases, prompt_file, tmp_path):
    out = tmp_path / "out"
    cfg = grpo_config(bases["sd1"], "sd1", prompt_file, out, num_inference_steps=2, max_train_steps=5,
                      checkpointing_steps=1)
    trainer = ReFLTrainer(cfg, reward=_GoesDown(working=2))
    with pytest.raises(RewardUnavailableError, match=r"'served' failed at update 3 .*ConnectionError.*checkpoint-2"):
        trainer.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # resuming with other online-RL settings is refused, naming each one, before any model loads
    for name, value in (("group_size", 2), ("clip_range", 0.5), ("beta", 0.04), ("noise_level", 0.5),
                        ("timestep_fraction", 0.5)):
        changed = grpo_config(bases["sd1"], "sd1", prompt_file, out, num_inference_steps=2, max_train_steps=3,
                              resume_from_checkpoint="latest", **{name: value})
        with pytest.raises(ResumeSettingsError, match=rf"--{name} .* -> {value!r}") as err:
            ReFLTrainer(changed, reward=Brightness())
        assert err.value.changed == [name]
    resumed = ReFLTrainer(grpo_config(bases["sd1"], "sd1", prompt_file, out, num_inference_steps=2, max_train_steps=3,
                                      resume_from_checkpoint="latest"), reward=Brightness())
    assert resumed.train()["global_step"] == 3


def test_a_served_reward_trains_through_a_real_server_process(bases, prompt_file, tmp_path):
    """``--reward http://...``: GRPO takes a reward served by ``imagereward serve`` (a real process on 127.0.0.1,
    not differentiable, batched across the group's requests), weighted in a mix whose URL has a port."""
    pytest.importorskip("fastapi")
    from serving_helpers import ServerProcess, tiny_folder

    import ImageReward as RM

    folder = tiny_folder(tmp_path)
    server = ServerProcess(["--model", f"tiny={folder}"], tmp_path / "server.log")
    try:
        cfg = grpo_config(bases["sd1"], "sd1", prompt_file, tmp_path / "out", num_inference_steps=2, max_train_steps=2,
                          reward=f"{server.url}/score/tiny:1.0", monitor_reward=f"{server.url}/score/tiny")
        trainer = ReFLTrainer(cfg)
        result = trainer.train()
        served = RM.load_scorer(f"{server.url}/score/tiny")
        assert not served.is_differentiable
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
    finally:
        server.stop()
    assert result["global_step"] == 2 and len(result["history"]) == 2
    rewards = [entry["reward_mean"] for entry in result["history"]]
    assert all(math.isfinite(r) and r != 0.0 for r in rewards), rewards
    requests_served = [line for line in metrics.splitlines() if line.startswith("imagereward_requests_total")]
    assert requests_served and sum(float(line.rsplit(" ", 1)[1]) for line in requests_served) >= 2, metrics
