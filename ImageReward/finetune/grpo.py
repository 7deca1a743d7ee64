"""Online RL beside ReFL: Flow-GRPO (Liu et al. 2025, ``yifan123/flow_grpo``) for the flow-matching families
(sd3, flux) and DDPO (Black et al. 2024, ``kvablack/ddpo-pytorch``) for the UNet families (sd1, sdxl), as the
trainer's second algorithm (``--algorithm grpo``).

One update (one call of :meth:`GRPO.train_step`):

1. sample ``--group_size`` images for each of ``train_batch_size * sample_batches_per_update / group_size``
   prompts with a stochastic sampler that records every step's latents and log-probabilities
   (:func:`sample_with_logprob`: the SDE step for flow matching, DDIM with ``eta`` for UNets);
2. score them with any scorer (``score_batch`` only: nothing is differentiated; a remote reward works);
3. group-relative advantages :func:`group_advantages` (flow_grpo's ``PerPromptStatTracker.update``);
4. ``--num_inner_epochs`` passes over the samples in ``train_batch_size`` batches, on the first
   ``--timestep_fraction`` of the steps: the clipped-ratio loss :func:`grpo_loss` (flow_grpo's
   ``scripts/train_sd3.py``), optionally plus ``--beta`` times the KL of the step means to the reference model
   (the base: the LoRA adapter disabled, or a frozen copy for a full fine-tune); an optimizer step every
   ``gradient_accumulation_steps`` batches (times the trained steps, as flow_grpo's accumulation).

Every random draw comes from the trainer's rollout generator, which its checkpoints hold, so resume is exact.

>>> advantages = group_advantages(["a", "a", "b", "b"], [1.0, 3.0, 2.0, 2.0])
>>> advantages.tolist()
[-0.9999000099990001, 0.9999000099990001, 0.0, 0.0]
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import DownloadError, ImageRewardError
from .config import ReFLConfigError
from .families import Conditioning, ModelFamily
from .logprob import ddim_step_with_logprob, sde_step_with_logprob
from .rollout import decode, initial_latents, is_flow_matching

if TYPE_CHECKING:  # the trainer imports this module
    from .trainer import ReFLTrainer

__all__ = ["GRPO", "group_advantages", "grpo_loss", "policy_stats", "sample_with_logprob", "policy_scheduler",
           "combine_rewards", "zero_std_ratio", "RewardValueError", "RewardUnavailableError"]

logger = logging.getLogger(__name__)

#: added to the group's standard deviation (flow_grpo ``stat_tracking.py``)
STD_EPS = 1e-4


class RewardValueError(ImageRewardError, ValueError):
    """A reward came back NaN or infinite (names the scorer and the prompts)."""


class RewardUnavailableError(DownloadError):
    """A scorer could not be reached (connection or download error after its own retries); training stopped and
    the checkpoints written so far are kept."""


# ================================================================== the three functions with an original
def group_advantages(prompts: Sequence[Any], rewards: Any, global_std: bool = False) -> torch.Tensor:
    """Group-relative advantages: ``(r - mean_g) / (std + 1e-4)`` for the group ``g`` of images sharing a prompt
    (any hashable key: a prompt, or a group id when prompts repeat across groups).

    Args:
        prompts: ``N`` group keys.
        rewards: ``[N]`` or ``[N, T]`` numbers (a sequence, array or tensor).
        global_std: divide by the standard deviation of all ``N`` rewards instead of the group's (both
            population std, as numpy's default).

    Returns:
        float64 ``[N]`` (or ``[N, T]``) tensor on the CPU. Equal to flow_grpo's
        ``PerPromptStatTracker(global_std).update(prompts, rewards)`` on a fresh tracker (flow_grpo clears it
        every epoch).
    """
    keys = np.array([str(p) if not isinstance(p, (int, np.integer)) else int(p) for p in prompts])
    values = torch.as_tensor(rewards).detach().cpu().double().numpy() if isinstance(rewards, torch.Tensor) \
        else np.asarray(rewards, dtype=np.float64)
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} group keys for {len(values)} rewards")
    advantages = np.zeros_like(values)
    all_std = np.std(values, axis=0, keepdims=True) + STD_EPS
    for key in np.unique(keys):
        members = keys == key
        group = values[members]
        mean = np.mean(group, axis=0, keepdims=True)
        std = all_std if global_std else np.std(group, axis=0, keepdims=True) + STD_EPS
        advantages[members] = (group - mean) / std
    return torch.from_numpy(advantages)


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              adv_clip_max: float, beta: float = 0.0, prev_sample_mean: torch.Tensor | None = None,
              prev_sample_mean_ref: torch.Tensor | None = None, std_dev_t: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PPO-style clipped policy loss of one denoising step, plus ``beta`` times the KL to the reference.

    Args:
        log_prob: ``[B]`` log-probabilities of the recorded next samples under the current model (with grad).
        old_log_prob: ``[B]`` the same under the sampling model (recorded during the rollout).
        advantages: ``[B]``, clamped to ``[-adv_clip_max, adv_clip_max]``.
        clip_range: ``epsilon`` of the ratio clip ``[1 - eps, 1 + eps]`` (flow_grpo: 1e-4).
        beta: KL weight; the KL of two Gaussians with the same ``std_dev_t`` is
            ``mean((mu - mu_ref)^2) / (2 std_dev_t^2)`` per sample (needs the three tensors below when > 0).
        prev_sample_mean, prev_sample_mean_ref: ``[B, C, h, w]`` step means of the model and the reference.
        std_dev_t: ``[B, 1, 1, 1]`` (or broadcastable) step noise scale.

    Returns:
        ``(loss, policy_loss, kl_loss)`` scalars; ``kl_loss`` is 0 when ``beta == 0``. As flow_grpo's
        ``scripts/train_sd3.py``.
    """
    advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped, clipped))
    if beta > 0:
        if prev_sample_mean is None or prev_sample_mean_ref is None or std_dev_t is None:
            raise ValueError("beta > 0 needs prev_sample_mean, prev_sample_mean_ref and std_dev_t")
        dims = tuple(range(1, prev_sample_mean.ndim))
        kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=dims, keepdim=True) / (2 * std_dev_t ** 2)
        kl_loss = torch.mean(kl_loss)
        return policy_loss + beta * kl_loss, policy_loss, kl_loss
    return policy_loss, policy_loss, torch.zeros((), device=policy_loss.device)


def policy_stats(log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float) -> dict[str, torch.Tensor]:
    """flow_grpo's logged diagnostics of one step: ``approx_kl = 0.5 mean((log_prob - old)^2)`` and the clip
    fraction ``mean(|ratio - 1| > clip_range)``."""
    with torch.no_grad():
        ratio = torch.exp(log_prob - old_log_prob)
        return {"approx_kl": 0.5 * torch.mean((log_prob - old_log_prob) ** 2),
                "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float())}


def zero_std_ratio(groups: Sequence[Any], rewards: torch.Tensor) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    keys = np.array([str(g) for g in groups])
    values = rewards.detach().cpu().double().numpy()
    stds = [np.std(values[keys == key]) for key in np.unique(keys)]
    return float(np.mean([s == 0 for s in stds]))


def combine_rewards(parts: dict[str, torch.Tensor], weights: Sequence[float], groups: Sequence[Any],
                    aggregation: str = "weighted_sum") -> torch.Tensor:
    """One reward per image from several: ``sum w_i r_i`` (``weighted_sum``), or ``sum w_i z_i`` where ``z_i`` is
    reward ``i`` z-scored within each group (``group_zscore``: ``(r - mean_g) / (std_g + 1e-4)``, so rewards of
    different scales weigh as their weights say). ``weights`` carry the sign of lower-is-better scorers."""
    total = torch.zeros(len(groups), dtype=torch.float64)
    for (name, values), weight in zip(parts.items(), weights):
        if aggregation == "group_zscore":
            values = group_advantages(groups, values, global_std=False)
        total += weight * values.double()
    return total


# ================================================================== sampling with log-probabilities
def policy_scheduler(base_config: dict[str, Any]) -> Any:
    """The sampler of the policy: a ``FlowMatchEulerDiscreteScheduler`` from the base's config (its sigmas; the
    SDE step replaces its ``step``) for flow-matching bases, else ``DDIMScheduler`` from the base's config, as
    DDPO sets it."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if is_flow_matching(base_config):
        return FlowMatchEulerDiscreteScheduler.from_config(dict(base_config), stochastic_sampling=False)
    return DDIMScheduler.from_config(dict(base_config))


def _guided(unet: Any, scheduler: Any, family: ModelFamily, latents: torch.Tensor, t: torch.Tensor,
            cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
            time_ids: torch.Tensor | None) -> torch.Tensor:
    """Denoiser output with classifier-free guidance; the unconditional branch is detached (flow_grpo's
    ``compute_log_prob``: the policy gradient goes through the conditional branch)."""
    if uncond is None or guidance_scale <= 1.0:
        return family.predict(unet, scheduler, latents, t, cond, time_ids).float()
    both = Conditioning.cat([uncond, cond])
    ids = None if time_ids is None else torch.cat([time_ids, time_ids]) if time_ids.ndim == 2 else time_ids
    out_uncond, out_cond = family.predict(unet, scheduler, torch.cat([latents, latents]), t, both, ids).float().chunk(2)
    out_uncond = out_uncond.detach()
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def step_with_logprob(scheduler: Any, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
                      noise: float, prev_sample: torch.Tensor | None = None,
                      generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sde_step_with_logprob` (flow matching, ``noise`` = noise level) or :func:`ddim_step_with_logprob`
    (``noise`` = eta) for a batch at one ``timestep`` (scalar tensor)."""
    batch_t = timestep.reshape(1).expand(sample.shape[0])
    if is_flow_matching(scheduler):
        return sde_step_with_logprob(scheduler, model_output, batch_t, sample, noise_level=noise,
                                     prev_sample=prev_sample, generator=generator)
    return ddim_step_with_logprob(scheduler, model_output, batch_t, sample, eta=noise,
                                  generator=None if prev_sample is not None else generator, prev_sample=prev_sample)


@torch.no_grad()
def sample_with_logprob(unet: Any, scheduler: Any, family: ModelFamily, cond: Conditioning, latents: torch.Tensor, *,
                        num_inference_steps: int, noise: float, uncond: Conditioning | None = None,
                        guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                        time_ids: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the stochastic sampler from ``latents`` ``[B, C, h, w]`` (flow_grpo's ``pipeline_with_logprob``,
    DDPO's for UNets).

    Returns:
        ``(trajectory [B, N + 1, C, h, w], log_probs [B, N], timesteps [N])``, float32; ``trajectory[:, -1]``
        is the final latent.
    """
    timesteps = family.set_timesteps(scheduler, num_inference_steps, latents)
    latents = latents.float() * getattr(scheduler, "init_noise_sigma", 1.0)
    trajectory, log_probs = [latents], []
    for t in timesteps:
        out = _guided(unet, scheduler, family, latents, t, cond, uncond, guidance_scale, time_ids)
        latents, log_prob, _, _ = step_with_logprob(scheduler, out, t, latents, noise, generator=generator)
        latents = latents.float()
        trajectory.append(latents)
        log_probs.append(log_prob)
    return torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1), timesteps


# ================================================================== the algorithm in the trainer
class GRPO:
    """The ``--algorithm grpo`` update of a :class:`~ImageReward.finetune.trainer.ReFLTrainer` (built by its
    ``setup``; uses its accelerator, models, optimizer, generator, data order and reward)."""

    def __init__(self, trainer: "ReFLTrainer") -> None:
        self.trainer = trainer
        cfg, acc = trainer.config, trainer.accelerator
        self.scheduler = policy_scheduler(trainer.components.scheduler_config)
        self.flow = is_flow_matching(self.scheduler)
        self.noise = cfg.noise_level if self.flow else cfg.eta
        self.num_train_timesteps = train_timestep_count(cfg)
        self.prompts_per_update = prompts_per_update(cfg)
        self.reference = None
        if cfg.beta > 0 and trainer.fsdp:
            raise ReFLConfigError("--beta > 0 under FSDP would need a sharded reference copy; it is not supported "
                                  "(use --beta 0, or a LoRA without FSDP)")
        if cfg.beta > 0 and not cfg.lora_rank:  # full fine-tune: a frozen copy of the base is the reference
            self.reference = copy.deepcopy(acc.unwrap_model(trainer.unet)).requires_grad_(False).eval()

    # ---------------------------------------------------------------- rewards
    def score(self, prompts: list[str], images: torch.Tensor, groups: list[int]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards ``[N]`` (float64) of ``images`` ``[N, 3, H, W]`` in [0, 1], and each scorer's ``[N]``."""
        reward = self.trainer.reward
        items = list(images.float().cpu())
        parts: dict[str, torch.Tensor] = {}
        for name, scorer in zip(reward.names, reward.scorers):
            try:
                values = scorer.score_batch(prompts, items)
            except (OSError, ConnectionError, TimeoutError) as err:  # DownloadError is an OSError
                from .trainer import find_checkpoint

                latest = find_checkpoint(self.trainer.config.output_dir, "latest")
                raise RewardUnavailableError(
                    f"reward {name!r} failed at update {self.trainer.global_step + 1} ({type(err).__name__}: {err}); "
                    f"training stopped, the last checkpoint ({latest or 'none yet'}) is "
                    "kept: resume with --resume_from_checkpoint latest") from err
            values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
            bad = ~torch.isfinite(values)
            if bool(bad.any()):
                named = sorted({prompts[i] for i in bad.nonzero().flatten().tolist()})
                raise RewardValueError(f"reward {name!r} returned {int(bad.sum())} non-finite value(s) "
                                       f"(NaN/inf) for the prompts {named}")
            parts[name] = values
        total = combine_rewards(parts, reward.weights, groups, self.trainer.config.reward_aggregation)
        return total, parts

    # ---------------------------------------------------------------- reference model
    @contextmanager
    def reference_model(self) -> Iterator[Any]:
        """The base model: the LoRA adapter disabled inside (LoRA runs), or the frozen copy (full fine-tune)."""
        unet = self.trainer.unet
        if self.reference is not None:
            yield self.reference
            return
        model = self.trainer.accelerator.unwrap_model(unet)
        model.disable_adapters()
        try:
            yield unet
        finally:
            model.enable_adapters()

    # ---------------------------------------------------------------- one update
    def _conditioning(self, prompts: list[str]) -> tuple[Conditioning, Conditioning | None]:
        trainer, cfg = self.trainer, self.trainer.config
        cond = trainer.encode(prompts)
        uncond = trainer.encode_unconditional(len(prompts)) if cfg.guidance_scale > 1.0 else None
        return cond, uncond

    def sample(self, prompts: list[str]) -> dict[str, Any]:
        """Images, trajectories and log-probabilities for ``prompts`` (one per image), in sample batches."""
        trainer, cfg = self.trainer, self.trainer.config
        h, w = trainer.latent_size()
        time_ids = trainer.family.time_ids(cfg.resolution, cfg.resolution)
        trajectories, log_probs, images = [], [], []
        trainer.unet.eval()
        for start in range(0, len(prompts), cfg.train_batch_size):
            chunk = prompts[start:start + cfg.train_batch_size]
            cond, uncond = self._conditioning(chunk)
            noise = initial_latents(len(chunk), trainer.components.vae.config.latent_channels, h, w,
                                    trainer.generator, trainer.accelerator.device)
            trajectory, log_prob, timesteps = sample_with_logprob(
                trainer.unet, self.scheduler, trainer.family, cond, noise, num_inference_steps=cfg.num_inference_steps,
                noise=self.noise, uncond=uncond, guidance_scale=cfg.guidance_scale, generator=trainer.generator,
                time_ids=time_ids)
            with torch.no_grad():
                images.append(decode(trainer.components.vae, trajectory[:, -1]).cpu())
            trajectories.append(trajectory)
            log_probs.append(log_prob)
        trainer.unet.train()
        return {"trajectory": torch.cat(trajectories), "log_probs": torch.cat(log_probs),
                "timesteps": timesteps, "images": torch.cat(images)}

    def step_log_prob(self, model: Any, prompts: list[str], cond: Conditioning, uncond: Conditioning | None,
                      trajectory: torch.Tensor, timesteps: torch.Tensor, j: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_prob [B], prev_sample_mean, std_dev_t)`` of the recorded step ``j`` under ``model``."""
        cfg = self.trainer.config
        time_ids = self.trainer.family.time_ids(cfg.resolution, cfg.resolution)
        out = _guided(model, self.scheduler, self.trainer.family, trajectory[:, j], timesteps[j], cond, uncond,
                      cfg.guidance_scale, time_ids)
        _, log_prob, mean, std = step_with_logprob(self.scheduler, out, timesteps[j], trajectory[:, j], self.noise,
                                                   prev_sample=trajectory[:, j + 1])
        return log_prob, mean, std

    def train_step(self) -> dict[str, float]:
        """One update: sample, score, advantages, ``num_inner_epochs`` passes of the clipped loss."""
        trainer = self.trainer
        cfg, acc = trainer.config, trainer.accelerator
        prompts = trainer.order.take(trainer.prompts, trainer.global_step)  # batches of prompts_per_update
        images_prompts = [p for p in prompts for _ in range(cfg.group_size)]
        groups = [acc.process_index * self.prompts_per_update + i // cfg.group_size
                  for i in range(len(images_prompts))]
        samples = self.sample(images_prompts)
        rewards, parts = self.score(images_prompts, samples["images"], groups)

        # advantages over every process's groups (global std over all of them), then this process's rows
        device = acc.device
        all_rewards = acc.gather(rewards.to(device)).cpu()
        all_groups = acc.gather(torch.tensor(groups, device=device)).cpu().tolist()
        advantages = group_advantages(all_groups, all_rewards, global_std=cfg.global_std)
        n = len(images_prompts)
        advantages = advantages[acc.process_index * n:(acc.process_index + 1) * n].float().to(device)

        logs: dict[str, float] = {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(
            unbiased=False)), "zero_std_ratio": zero_std_ratio(all_groups, all_rewards),
            "advantage_abs_mean": float(advantages.abs().mean())}
        for name, values in parts.items():
            gathered = acc.gather(values.to(device)).cpu()
            logs[f"reward/{name}/mean"] = float(gathered.mean())
            logs[f"reward/{name}/std"] = float(gathered.std(unbiased=False))

        sums: dict[str, float] = {}
        count = 0
        grad_norm = None
        timesteps = samples["timesteps"]
        for _ in range(cfg.num_inner_epochs):
            perm = torch.randperm(n, generator=trainer.generator).tolist()
            for start in range(0, n, cfg.train_batch_size):
                rows = perm[start:start + cfg.train_batch_size]
                batch_prompts = [images_prompts[i] for i in rows]
                cond, uncond = self._conditioning(batch_prompts)
                trajectory = samples["trajectory"][rows]
                old_log_probs = samples["log_probs"][rows]
                for j in range(self.num_train_timesteps):
                    with acc.accumulate(trainer.unet):
                        log_prob, mean, std = self.step_log_prob(trainer.unet, batch_prompts, cond, uncond,
                                                                 trajectory, timesteps, j)
                        mean_ref = None
                        if cfg.beta > 0:
                            with torch.no_grad(), self.reference_model() as reference:
                                _, mean_ref, _ = self.step_log_prob(reference, batch_prompts, cond, uncond,
                                                                    trajectory, timesteps, j)
                        loss, policy_loss, kl_loss = grpo_loss(
                            log_prob, old_log_probs[:, j], advantages[rows], cfg.clip_range, cfg.adv_clip_max,
                            cfg.beta, mean, mean_ref, std)
                        grad_norm = trainer.backward_and_step(loss, grad_norm)
                    stats = {"train_loss": loss.detach(), "policy_loss": policy_loss.detach(), "kl": kl_loss.detach(),
                             **policy_stats(log_prob.detach(), old_log_probs[:, j], cfg.clip_range)}
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + float(acc.gather(value.reshape(1).float()).mean())
                    count += 1
        if not acc.sync_gradients:
            raise RuntimeError("gradient accumulation out of step with the optimizer")
        if trainer.ema is not None:
            trainer.ema.step(trainer.unet.parameters())
        trainer.global_step += 1
        logs.update({key: value / count for key, value in sums.items()})
        logs["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        logs["lr"] = trainer.lr_scheduler.get_last_lr()[0]
        return logs


def train_timestep_count(config: Any) -> int:
    """Denoising steps trained on per sample: ``int(num_inference_steps * timestep_fraction)`` (flow_grpo), the
    first ones of the chain."""
    return int(config.num_inference_steps * config.timestep_fraction)


def prompts_per_update(config: Any) -> int:
    """Prompts per update and process: ``train_batch_size * sample_batches_per_update / group_size``."""
    return config.train_batch_size * config.sample_batches_per_update // config.group_size


def optimizer_steps_per_update(config: Any) -> int:
    """Optimizer steps in one GRPO update: inner epochs x sample batches / accumulation."""
    return config.num_inner_epochs * config.sample_batches_per_update // config.gradient_accumulation_steps
