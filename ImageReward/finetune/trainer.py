"""``ReFLTrainer``: reward feedback learning for SD1.x, SDXL, SD3 / SD3.5 and FLUX.1, full fine-tune or LoRA,
on accelerate.

>>> from ImageReward.finetune import ReFLConfig, ReFLTrainer
>>> cfg = ReFLConfig(pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4",
...                  train_data="data/example_prompts.json", output_dir="out/refl")   # doctest: +SKIP
>>> ReFLTrainer(cfg).train()                                                          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..disk import atomic_write_text, disk_errors, ensure_free_space, replace_dir
from ..errors import DiskSpaceError, ResumeSettingsError
from ..run_settings import append_history, check_resume, resume_policies
from ..scorer import Scorer
from ..trainable_state import TRAINABLE_NAME, load_trainable, save_trainable
from .compat import dtype_kwargs, make_pipeline_portable, quiet_torchvision_fallback
from .config import ReFLConfig, ReFLConfigError
from .data import BatchOrder, load_image_text, load_prompts
from .families import Conditioning, get_family
from .lora import add_lora, save_lora
from .losses import refl_loss
from .preflight import check_models
from .rewards import WeightedReward, as_reward
from .rollout import (decode, draw_backprop_steps, draw_stop_index, initial_latents, rollout,
                      training_scheduler)

__all__ = ["ReFLTrainer", "find_checkpoint", "hub_model_id"]

logger = logging.getLogger(__name__)

STATE_NAME = "refl_state.json"
ARGS_NAME = "refl_args.json"  # in each checkpoint: the settings it was made with (checked on resume)
HISTORY_NAME = "refl_args.history.jsonl"  # in output_dir: one line per start or resume, never rewritten
_RESUME_HINT = "free space (or lower --checkpoints_total_limit), then resume with --resume_from_checkpoint latest"
_TINY_UPDATE_PATIENCE = 10


def find_checkpoint(output_dir: str | os.PathLike, name: str) -> Path | None:
    """``"latest"`` -> the highest ``checkpoint-N`` in ``output_dir`` (None if none); else the named folder."""
    output_dir = Path(output_dir)
    if name != "latest":
        path = Path(name) if Path(name).is_dir() else output_dir / name
        return path if path.is_dir() else None
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def hub_model_id(name_or_path: str) -> str | None:
    """The Hub repo id of a base model: ``name_or_path`` itself when it is one (``org/name``, not a folder here),
    the id a Hugging Face cache folder stands for (``.../models--org--name/snapshots/<sha>``), else None."""
    path = Path(name_or_path)
    for part in reversed(path.parts):
        if part.startswith("models--") and len(part.split("--")) >= 3:
            return "/".join(part.split("--")[1:])
    if not path.exists() and len(path.parts) in (1, 2) and not path.is_absolute() and "\\" not in name_or_path:
        return name_or_path
    return None


def _portable_arguments(args: dict[str, Any]) -> dict[str, Any]:
    """The run's options for the model card, with absolute local paths shortened to their last component."""
    return {key: Path(value).name if isinstance(value, str) and os.path.isabs(value) else value
            for key, value in args.items()}


def _flat(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class ReFLTrainer:
    """Train a diffusion model's UNet (or a LoRA on it) to raise a reward.

    Data and options are checked in ``__init__`` (before any model loads); :meth:`train` loads the models,
    runs, checkpoints atomically, resumes exactly, validates, and writes the final pipeline or LoRA.
    ``reward``/``monitor`` may be given as scorer objects instead of ``config.reward``/``monitor_reward``.
    """

    def __init__(self, config: ReFLConfig, *, reward: Scorer | str | None = None,
                 monitor: Scorer | str | None = None) -> None:
        self.config = config.validate()
        self.family = get_family(config.model_family, config)
        self.prompts = load_prompts(config.train_data, caption_column=config.caption_column,
                                    dataset_name=config.dataset_name, dataset_config_name=config.dataset_config_name,
                                    cache_dir=config.cache_dir, max_samples=config.max_train_samples, seed=config.seed,
                                    encoding=config.encoding)
        self.pretrain_examples = None
        if config.pretrain_data and config.pretrain_loss_weight > 0:
            self.pretrain_examples = load_image_text(config.pretrain_data, caption_column=config.caption_column,
                                                     image_column=config.image_column,
                                                     image_base_dir=config.image_base_dir, encoding=config.encoding)
        self._reward_arg = reward if reward is not None else config.reward
        self._monitor_arg = monitor if monitor is not None else config.monitor_reward
        self.model_files: list[str] = []
        self.prompts_sha256 = hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()
        self.resume_changes: list = []
        self._checked_resume: Path | None = None
        if config.resume_from_checkpoint:
            path = find_checkpoint(config.output_dir, config.resume_from_checkpoint)
            if path is not None:
                self.check_resume_settings(path)
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.validations: list[dict[str, Any]] = []
        self._set_up = False

    # ================================================================== setup
    def setup(self) -> None:
        """Build accelerator, models, optimizer, EMA and trackers; resume if asked. Called by :meth:`train`."""
        if self._set_up:
            return
        self.check_model_files()
        quiet_torchvision_fallback()  # before diffusers imports its pipeline modules
        import diffusers
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        output_dir = Path(cfg.output_dir)
        project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir))
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to, project_config=project)
        if acc.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
        self.seed = seed
        from accelerate.utils import set_seed
        set_seed(seed)  # torch, numpy, random: LoRA init (and anything else drawn globally) follows --seed
        self.generator = torch.Generator().manual_seed(seed + acc.process_index)  # rollouts, per process
        self.order = BatchOrder(len(self.prompts), cfg.train_batch_size, seed, process_index=acc.process_index,
                                num_processes=acc.num_processes)

        # models ---------------------------------------------------------------------------------
        # every module in an explicit dtype (an fp16 base trains in fp32 without --mixed_precision): frozen ones
        # in the training precision (the family keeps a force_upcast VAE in fp32 under fp16), the trained UNet
        # in fp32 (full fine-tune) or in the training precision under a float32 LoRA
        comps = self.family.load_components(
            cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant,
            vae=cfg.pretrained_vae_model_name_or_path, cache_dir=cfg.cache_dir, weight_dtype=self.weight_dtype,
            trainable_dtype=self.weight_dtype if cfg.lora_rank else torch.float32)
        self.family.check_unet(comps.unet)
        self.components = comps
        self.scheduler = training_scheduler(comps.scheduler_config)
        offloaded = [e for e in comps.text_encoders if e is not None] if cfg.offload_text_encoders else []
        for module in comps.frozen_modules():
            module.requires_grad_(False).eval().to("cpu" if any(module is e for e in offloaded) else acc.device)
        reward_dtype = None if self.weight_dtype == torch.float32 else self.weight_dtype
        self.reward = as_reward(self._reward_arg, device=acc.device, download_root=cfg.reward_download_root,
                                dtype=reward_dtype).to(acc.device)
        self.reward.requires_grad_(False).eval()
        if not self.reward.is_differentiable:
            raise ReFLConfigError(f"reward {self.reward.name!r} is not differentiable")
        self.monitor: WeightedReward | None = None
        if self._monitor_arg:
            self.monitor = as_reward(self._monitor_arg, device=acc.device, download_root=cfg.reward_download_root,
                                     differentiable=False).to(acc.device)
            self.monitor.requires_grad_(False).eval()

        unet = comps.unet
        if cfg.lora_rank:
            params = add_lora(unet, cfg.lora_rank, cfg.lora_alpha, targets=self.family.lora_targets)
        else:
            unet.requires_grad_(True)
            params = list(unet.parameters())
        unet.to(acc.device).train()
        if cfg.gradient_checkpointing:
            # the decode with gradients costs as much memory as the UNet step (SD1.5 at 512 px: 6.3 GB in fp32)
            unet.enable_gradient_checkpointing()
            comps.vae.enable_gradient_checkpointing()
        if cfg.enable_xformers_memory_efficient_attention:  # installed: checked in config.validate()
            unet.enable_xformers_memory_efficient_attention()
        self.trainable = params
        self.n_trainable = sum(p.numel() for p in params)

        self.ema = None
        if cfg.use_ema:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel([p.detach().clone() for p in unet.parameters()],
                                model_cls=type(unet), model_config=unet.config)
            self.ema.to(acc.device)

        # optimisation ---------------------------------------------------------------------------
        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * acc.num_processes
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ReFLConfigError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from err
            optimizer_cls = bnb.optim.AdamW8bit
        else:
            optimizer_cls = torch.optim.AdamW
        optimizer = optimizer_cls(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        updates_per_epoch = math.ceil(self.order.batches_per_epoch / cfg.gradient_accumulation_steps)
        self.max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
        # accelerate steps a wrapped scheduler once per process per update: scale the horizon to match
        lr_scheduler = diffusers.optimization.get_scheduler(
            cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
            num_training_steps=self.max_train_steps * acc.num_processes)
        self.fsdp = acc.distributed_type.name == "FSDP"
        if self.fsdp and (cfg.lora_rank or cfg.use_ema):
            raise ReFLConfigError("the FSDP launch config is for full fine-tuning without --use_ema (a LoRA fits "
                                  "one GPU: launch it without FSDP)")
        self.unet, self.optimizer, self.lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
        if cfg.lora_rank:  # checkpoints hold the LoRA (trainable) weights, not the frozen UNet
            acc.register_save_state_pre_hook(self._checkpoint_trainable_only)
            acc.register_load_state_pre_hook(self._resume_trainable_only)

        self.pretrain = None
        if self.pretrain_examples is not None:
            from .pretrain import PretrainBranch
            self.pretrain = PretrainBranch(self.pretrain_examples, self.family, comps, self.scheduler,
                                           resolution=cfg.resolution, center_crop=cfg.center_crop,
                                           random_flip=cfg.random_flip, snr_gamma=cfg.snr_gamma)
            self.pretrain_order = BatchOrder(len(self.pretrain_examples), cfg.train_batch_size, seed + 1,
                                             process_index=acc.process_index, num_processes=acc.num_processes)

        if acc.is_main_process and cfg.report_to != "none":
            acc.init_trackers(cfg.tracker_project_name, config={k: _flat(v) for k, v in cfg.to_dict().items()})
        if cfg.grad_scale * cfg.learning_rate < 1e-9 and cfg.grad_scale <= 1e-3:
            logger.info("grad_scale=%g: on small models gradients may fall below adam_epsilon=%g; the trainer "
                        "warns if updates vanish", cfg.grad_scale, cfg.adam_epsilon)
        self._tiny_updates = 0
        self._set_up = True
        if cfg.resume_from_checkpoint:
            self.resume(cfg.resume_from_checkpoint)
        if acc.is_main_process:
            append_history(output_dir / HISTORY_NAME, "resume" if self.global_step else "start", cfg.to_dict(),
                           changes=self.resume_changes, step=self.global_step, seed=self.seed)

    # ================================================================== one step
    def latent_size(self) -> tuple[int, int]:
        factor = 2 ** (len(self.components.vae.config.block_out_channels) - 1)
        return self.config.resolution // factor, self.config.resolution // factor

    @contextmanager
    def text_encoders_ready(self) -> Iterator[None]:
        """With ``--offload_text_encoders``: the text encoders on the accelerator inside, back on the CPU after."""
        encoders = [e for e in self.components.text_encoders if e is not None]
        if not self.config.offload_text_encoders:
            yield
            return
        for encoder in encoders:
            encoder.to(self.accelerator.device)
        try:
            yield
        finally:
            for encoder in encoders:
                encoder.to("cpu")

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Prompt conditioning, computed once per micro-batch under ``no_grad`` (the family's encoders)."""
        with self.text_encoders_ready():
            return self.family.encode_prompts(self.components, prompts).to(self.accelerator.device, self.weight_dtype)

    def encode_unconditional(self, batch: int) -> Conditioning:
        with self.text_encoders_ready():
            return self.family.unconditional(self.components, batch).to(self.accelerator.device, self.weight_dtype)

    def generate_x0(self, prompts: Sequence[str], stop_index: int | None, generator: torch.Generator,
                    backprop_steps: int = 1) -> torch.Tensor:
        """Rollout for ``prompts`` from fresh noise; x0 at ``stop_index`` (with grad through the last
        ``backprop_steps`` denoiser calls) or the final sample."""
        cfg = self.config
        cond = self.encode(prompts)
        uncond = self.encode_unconditional(len(prompts)) if cfg.guidance_scale > 1.0 else None
        h, w = self.latent_size()
        latents = initial_latents(len(prompts), self.components.vae.config.latent_channels, h, w, generator,
                                  self.accelerator.device)
        time_ids = self.family.time_ids(cfg.resolution, cfg.resolution)
        return rollout(self.unet, self.scheduler, self.family, cond, latents,
                       num_inference_steps=cfg.num_inference_steps, stop_index=stop_index, uncond=uncond,
                       guidance_scale=cfg.guidance_scale, generator=generator, time_ids=time_ids,
                       backprop_steps=backprop_steps,
                       checkpoint_steps=cfg.gradient_checkpointing and backprop_steps > 1)

    def compute_loss(self, prompts: Sequence[str], micro_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The ReFL loss of one micro-batch (plus the weighted pre-training loss when enabled)."""
        cfg = self.config
        stop = draw_stop_index(cfg.stop_step_min, cfg.stop_step_max, self.generator)
        k = draw_backprop_steps(cfg.backprop_steps, cfg.random_backprop_steps, self.generator)
        x0 = self.generate_x0(prompts, stop, self.generator, backprop_steps=k)
        images = decode(self.components.vae, x0)
        rewards, parts = self.reward.score_grad_parts(images, list(prompts))
        loss = refl_loss(rewards, cfg.grad_scale, cfg.reward_margin)
        stats = {"reward_loss": loss.detach(), "reward_mean": rewards.detach().mean(),
                 "reward_std": rewards.detach().std(unbiased=False), "stop_index": torch.tensor(float(stop))}
        if cfg.backprop_steps > 1:
            stats["backprop_steps"] = torch.tensor(float(k))
        if len(parts) > 1:
            stats.update({f"reward/{name}": value.detach().mean() for name, value in parts.items()})
        if self.pretrain is not None:
            indices = self.pretrain_order.batch(micro_step)
            pre = self.pretrain.loss(self.unet, indices, self.generator, self.weight_dtype)
            stats["pretrain_loss"] = pre.detach()
            loss = loss + cfg.pretrain_loss_weight * pre
        stats["train_loss"] = loss.detach()
        return loss, stats

    def train_step(self) -> dict[str, float]:
        """One optimizer update (``gradient_accumulation_steps`` micro-batches); returns its logged values."""
        cfg, acc = self.config, self.accelerator
        sums: dict[str, float] = {}
        grad_norm = None
        for k in range(cfg.gradient_accumulation_steps):
            micro_step = self.global_step * cfg.gradient_accumulation_steps + k
            prompts = self.order.take(self.prompts, micro_step)
            with acc.accumulate(self.unet):
                loss, stats = self.compute_loss(prompts, micro_step)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(acc.gather(value.reshape(1).float()).mean())
        if not acc.sync_gradients:  # cannot happen with the step counter at a boundary; guard anyway
            raise RuntimeError("gradient accumulation out of step with the optimizer")
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        self.global_step += 1
        logs = {k: v / cfg.gradient_accumulation_steps for k, v in sums.items()}
        logs["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        self._watch_tiny_updates(logs["grad_norm"])
        return logs

    def _watch_tiny_updates(self, grad_norm: float) -> None:
        """Warn when gradients stay far below AdamW's eps (updates then vanish: lr * g / eps ~ 0)."""
        rms = grad_norm / math.sqrt(max(self.n_trainable, 1))
        self._tiny_updates = self._tiny_updates + 1 if rms < self.config.adam_epsilon else 0
        if self._tiny_updates == _TINY_UPDATE_PATIENCE:
            logger.warning(
                "for %d updates the RMS gradient (%.2e) stayed below adam_epsilon (%.0e): AdamW updates are "
                "~lr*g/eps and training barely moves. Raise --grad_scale or lower --adam_epsilon.",
                _TINY_UPDATE_PATIENCE, rms, self.config.adam_epsilon)

    # ================================================================== the loop
    def train(self) -> dict[str, Any]:
        """Run to ``max_train_steps``; returns ``{"global_step", "history", "validation"}``."""
        from tqdm.auto import tqdm

        self.setup()
        cfg, acc = self.config, self.accelerator
        logger.info("ReFL: %d prompts, %d updates, %d trainable parameters (%s)", len(self.prompts),
                    self.max_train_steps, self.n_trainable,
                    "LoRA" if cfg.lora_rank else f"full {self.family.denoiser_name}")
        bar = tqdm(total=self.max_train_steps, initial=self.global_step, disable=not acc.is_local_main_process,
                   desc="ReFL")
        while self.global_step < self.max_train_steps:
            logs = self.train_step()
            self.history.append(logs)
            acc.log(logs, step=self.global_step)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['train_loss']:.4g}", reward=f"{logs['reward_mean']:.3f}")
            if self.global_step % cfg.checkpointing_steps == 0:
                self.save_checkpoint()
            if cfg.validation_prompts and self.global_step % cfg.validation_steps == 0:
                self._validate_safely()
        bar.close()
        out = self.save_final()  # the trained weights first: a failing validation cannot cost them
        if cfg.validation_prompts and (not self.validations or self.validations[-1]["step"] != self.global_step):
            if self._validate_safely() is not None and acc.is_main_process:
                self._write_model_card(out)  # now with the final validation rewards
        acc.end_training()
        return {"global_step": self.global_step, "history": self.history, "validation": self.validations}

    def _validate_safely(self) -> dict[str, Any] | None:
        """:meth:`validate`, but a failure is logged (with its traceback) and recorded instead of ending the run:
        validation only reports, it must never lose training."""
        try:
            return self.validate()
        except DiskSpaceError as err:  # one clear line; the next checkpoint will say it again if still full
            logger.error("validation at step %d: %s; training continues", self.global_step, err)
            self.validations.append({"step": self.global_step, "error": f"DiskSpaceError: {err}"})
            return None
        except Exception as err:  # noqa: BLE001 - any failure of the report; training goes on
            logger.exception("validation at step %d failed; training continues and weights are saved",
                             self.global_step)
            self.validations.append({"step": self.global_step, "error": f"{type(err).__name__}: {err}"})
            return None

    # ================================================================== checkpoints
    def save_checkpoint(self) -> Path:
        """``accelerate.save_state`` into ``checkpoint-N.tmp``, then an atomic rename to ``checkpoint-N``. A disk
        too full for it raises :class:`~ImageReward.errors.DiskSpaceError` (before writing when the free space is
        visibly short, else when a write fails); the partial folder is removed, earlier checkpoints stay."""
        from safetensors.torch import save_file

        acc = self.accelerator
        out = Path(self.config.output_dir)
        final, tmp = out / f"checkpoint-{self.global_step}", out / f"checkpoint-{self.global_step}.tmp"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            # fp32 weights + AdamW's two moments (+ the EMA copy)
            needed = self.n_trainable * 4 * (3 + (self.ema is not None))
            ensure_free_space(out, needed, f"checkpoint {final.name}", hint=_RESUME_HINT)
        acc.wait_for_everyone()
        try:
            with disk_errors(f"checkpoint {final.name}", out, hint=_RESUME_HINT):
                tmp.mkdir(parents=True, exist_ok=True)
                acc.save_state(str(tmp))
                save_file({"generator": self.generator.get_state()},
                          str(tmp / f"refl_rng_{acc.process_index}.safetensors"))
                if acc.is_main_process:
                    state = {"global_step": self.global_step, "seed": self.seed, "tiny_updates": self._tiny_updates,
                             "prompts_sha256": self.prompts_sha256}
                    if self.ema is not None:
                        save_file({f"p{i}": p.detach().cpu().contiguous()
                                   for i, p in enumerate(self.ema.shadow_params)}, str(tmp / "ema.safetensors"))
                        state["ema_optimization_step"] = self.ema.optimization_step
                    if self.config.lora_rank:
                        unet = acc.unwrap_model(self.unet)
                        save_trainable(unet, tmp)  # what resume reads (exact, by parameter name)
                        save_lora(self.family, unet, tmp / "lora", kohya=False)  # the diffusers file, for users
                    self.config.save(tmp / ARGS_NAME)  # the settings resume compares against
                    (tmp / STATE_NAME).write_text(json.dumps(state))  # last: marks the checkpoint complete
        except DiskSpaceError:
            shutil.rmtree(tmp, ignore_errors=True)  # give back what the partial save took
            raise
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints()
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    def _checkpoint_trainable_only(self, models: list[Any], weights: list[dict], output_dir: str) -> None:
        """accelerate save-state hook of LoRA runs: drop the UNet's full state dict from what accelerate writes
        (``save_checkpoint`` writes the trainable weights itself), as diffusers' LoRA training scripts do."""
        unet = self.accelerator.unwrap_model(self.unet)
        for i in reversed(range(len(weights))):
            if self.accelerator.unwrap_model(models[i]) is unet:
                weights.pop(i)

    def _resume_trainable_only(self, models: list[Any], input_dir: str) -> None:
        """accelerate load-state hook of LoRA runs: take the UNet out of what accelerate loads and copy the
        trainable weights back from ``trainable.safetensors``. A checkpoint without it (written before
        checkpoints held the LoRA only) still loads through accelerate's full ``model.safetensors``."""
        path = Path(input_dir) / TRAINABLE_NAME
        if not path.is_file():
            return
        unet = self.accelerator.unwrap_model(self.unet)
        for i in reversed(range(len(models))):
            if self.accelerator.unwrap_model(models[i]) is unet:
                models.pop(i)
        load_trainable(unet, input_dir)

    def _prune_checkpoints(self) -> None:
        limit = self.config.checkpoints_total_limit
        if not limit:  # 0 (or None): keep every checkpoint
            return
        found = sorted((p for p in Path(self.config.output_dir).glob("checkpoint-*")
                        if p.is_dir() and p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))
        for old in found[: max(len(found) - limit, 0)]:
            shutil.rmtree(old)
            logger.info("removed %s (--checkpoints_total_limit %d)", old, limit)

    def resume(self, name: str) -> None:
        """Restore weights, optimizer, LR schedule, RNGs (accelerate's and the rollout generator), EMA and the
        data position from a checkpoint; ``"latest"`` with no checkpoint starts fresh."""
        from safetensors.torch import load_file

        path = find_checkpoint(self.config.output_dir, name)
        if path is None:
            if name == "latest":
                logger.info("no checkpoint in %s: starting a fresh run", self.config.output_dir)
                return
            raise ReFLConfigError(f"--resume_from_checkpoint {name!r}: not found")
        state_file = path / STATE_NAME
        if not state_file.is_file():
            raise ReFLConfigError(f"{str(path)!r} is not a complete ReFL checkpoint (no {STATE_NAME})")
        if self._checked_resume != path:
            self.check_resume_settings(path)
        acc = self.accelerator
        acc.load_state(str(path))
        state = json.loads(state_file.read_text())
        self.global_step = int(state["global_step"])
        if state.get("seed") != self.seed:  # --seed left out: the run keeps the seed it drew at its start
            logger.info("resuming with the checkpoint's seed %s", state.get("seed"))
        self.seed = state.get("seed", self.seed)
        self.order.seed = self.seed
        self._tiny_updates = int(state.get("tiny_updates", 0))
        rng_file = path / f"refl_rng_{acc.process_index}.safetensors"
        if rng_file.is_file():
            self.generator.set_state(load_file(str(rng_file))["generator"])
        if self.ema is not None:
            shadow = load_file(str(path / "ema.safetensors"))
            for i, param in enumerate(self.ema.shadow_params):
                param.data.copy_(shadow[f"p{i}"].to(param.device))
            self.ema.optimization_step = int(state["ema_optimization_step"])
        logger.info("resumed from %s at step %d", path, self.global_step)

    def check_model_files(self) -> list[str]:
        """Every model file of the run (base model, VAE, reward models given by name) is there or can be
        downloaded now, checked before anything loads (:func:`~ImageReward.finetune.preflight.check_models`:
        one :class:`ReFLConfigError` naming each option and every missing file); returns one line per model."""
        self.model_files = check_models(self.config, self.family, reward=isinstance(self._reward_arg, str),
                                        monitor=isinstance(self._monitor_arg, str))
        return self.model_files

    def check_resume_settings(self, path: Path) -> list:
        """Compare this run's settings and prompts with those checkpoint ``path`` was made with: a setting that
        changes the run raises :class:`~ImageReward.errors.ResumeSettingsError` naming it (the rule of each
        option is its ``resume`` metadata in :class:`ReFLConfig`); harmless changes are logged and returned."""
        args_file, state_file = path / ARGS_NAME, path / STATE_NAME
        if not args_file.is_file():
            logger.warning("%s holds no %s (made by an older version): its settings cannot be checked", path, ARGS_NAME)
            self._checked_resume = path
            return []
        saved = json.loads(args_file.read_text(encoding="utf-8"))
        self.resume_changes = check_resume(saved, self.config.to_dict(), resume_policies(ReFLConfig), source=path,
                                           defaults=ReFLConfig().to_dict())
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if state.get("prompts_sha256") not in (None, self.prompts_sha256):
            raise ResumeSettingsError(f"cannot resume from {path}: the prompts differ from those it was trained on "
                                      f"(--train_data {self.config.train_data!r}); resume with the same prompts, or "
                                      "start a new run in another output folder", changed=["prompts"])
        self._checked_resume = path
        return self.resume_changes

    # ================================================================== validation
    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Images for ``--validation_prompts`` at a fixed seed, at the training setting (this trainer's
        rollout, every step) and at the pipeline's default setting; their rewards and held-out rewards."""
        cfg, acc = self.config, self.accelerator
        prompts = list(cfg.validation_prompts or [])
        seed = self.seed
        ema_swapped = False
        if self.ema is not None:
            self.ema.store(self.unet.parameters())
            self.ema.copy_to(self.unet.parameters())
            ema_swapped = True
        self.unet.eval()
        try:
            images = {"train_setting": decode(self.components.vae, self.generate_x0(
                prompts, None, torch.Generator().manual_seed(seed))).cpu()}
            if not self.fsdp:  # under FSDP the pipeline would call the bare, sharded module
                pipe = self.family.build_pipeline(self.components, acc.unwrap_model(self.unet))
                pipe.set_progress_bar_config(disable=True)
                with torch.autocast(acc.device.type, dtype=self.weight_dtype,
                                    enabled=self.weight_dtype != torch.float32), self.text_encoders_ready():
                    out = pipe(prompts, height=cfg.resolution, width=cfg.resolution, output_type="pt",
                               generator=torch.Generator().manual_seed(seed))
                images["default_setting"] = out.images.float().cpu()
        finally:
            self.unet.train()
            if ema_swapped:
                self.ema.restore(self.unet.parameters())
        result: dict[str, Any] = {"step": self.global_step}
        logs = {}
        for setting, batch in images.items():
            items = list(batch)
            rewards = self.reward.score_batch(prompts, items)
            logs[f"validation/{setting}/reward"] = float(rewards.mean())
            result[setting] = {"reward": rewards.tolist()}
            if self.monitor is not None:
                held_out = self.monitor.score_batch(prompts, items)
                logs[f"validation/{setting}/heldout_reward"] = float(held_out.mean())
                result[setting]["heldout_reward"] = held_out.tolist()
        self.validations.append(result)
        acc.log(logs, step=self.global_step)
        if acc.is_main_process:
            self._log_images(images, prompts)
        return result

    def _log_images(self, images: dict[str, torch.Tensor], prompts: list[str]) -> None:
        from PIL import Image

        folder = Path(self.config.output_dir) / "validation" / f"step-{self.global_step}"
        with disk_errors("validation images", folder):
            folder.mkdir(parents=True, exist_ok=True)
            for setting, batch in images.items():
                arrays = (batch.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
                for i, array in enumerate(arrays):
                    Image.fromarray(array).save(folder / f"{setting}_{i:02d}.png")
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images(f"validation/{setting}", arrays, self.global_step, dataformats="NHWC")
                elif tracker.name == "wandb":
                    import wandb
                    tracker.log({f"validation/{setting}": [wandb.Image(a, caption=p) for a, p in zip(arrays, prompts)]},
                                step=self.global_step)
        atomic_write_text(folder / "prompts.json", json.dumps(prompts, indent=1))

    # ================================================================== final artefacts
    def save_final(self) -> Path:
        """Full fine-tune: a ``from_pretrained``-loadable pipeline folder (EMA weights if ``--use_ema``).
        LoRA: ``pytorch_lora_weights.safetensors`` (+ kohya file). Both with a model card. Written into
        ``output_dir/final.tmp`` and moved into ``output_dir`` when complete (a full disk raises
        :class:`~ImageReward.errors.DiskSpaceError` and leaves the checkpoints and any earlier export as they were)."""
        acc, cfg = self.accelerator, self.config
        acc.wait_for_everyone()
        out = Path(cfg.output_dir)
        # under FSDP every process takes part in gathering the full state; the main process gets it (on the CPU)
        full_state = acc.get_state_dict(self.unet) if self.fsdp else None
        if acc.is_main_process:
            unet = acc.unwrap_model(self.unet)
            if full_state is not None:
                with torch.device("meta"):
                    unet = type(self.components.unet).from_config(self.components.unet.config)
                unet.load_state_dict(full_state, assign=True)
            staging = out / "final.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            hint = "free space, then resume with --resume_from_checkpoint latest to write the final weights"
            try:
                with disk_errors("the final weights", out, hint=hint):
                    if cfg.lora_rank:
                        ensure_free_space(out, 2 * 4 * self.n_trainable, "the final LoRA", hint=hint)
                        save_lora(self.family, unet, staging)
                    else:
                        if self.ema is not None:
                            self.ema.copy_to(unet.parameters())
                        self._save_pipeline(unet, staging)
                    self._write_model_card(staging)
                    for entry in sorted(staging.iterdir()):  # each file or folder replaced whole
                        if entry.is_dir():
                            replace_dir(entry, out / entry.name)
                        else:
                            os.replace(entry, out / entry.name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if cfg.push_to_hub:
                from huggingface_hub import create_repo, upload_folder
                repo_id = create_repo(cfg.hub_model_id or out.name, exist_ok=True).repo_id
                upload_folder(repo_id=repo_id, folder_path=str(out), ignore_patterns=["checkpoint-*", "*.tmp"])
        acc.wait_for_everyone()
        return out

    def _save_pipeline(self, unet: Any, out: Path) -> None:
        """The base pipeline with the trained UNet, every component in float32 (the UNet's master precision; a
        base stored in fp16 would otherwise give a pipeline of mixed dtypes), with standard class names."""
        cfg = self.config
        fp32 = dtype_kwargs("diffusers", torch.float32)
        kwargs: dict[str, Any] = {self.family.denoiser_name: unet if unet.dtype == torch.float32 else unet.float(),
                                  "revision": cfg.revision, "variant": cfg.variant, "cache_dir": cfg.cache_dir, **fp32}
        if cfg.pretrained_vae_model_name_or_path:
            from diffusers import AutoencoderKL
            kwargs["vae"] = AutoencoderKL.from_pretrained(cfg.pretrained_vae_model_name_or_path, cache_dir=cfg.cache_dir,
                                                          **fp32)
        pipe = self.family.pipeline_class().from_pretrained(cfg.pretrained_model_name_or_path, **kwargs)
        full = sum(p.numel() for module in pipe.components.values() if isinstance(module, torch.nn.Module)
                   for p in module.parameters())
        ensure_free_space(out.parent, 4 * full, "the final pipeline",
                          hint="free space, then resume with --resume_from_checkpoint latest")
        pipe.save_pretrained(out)
        make_pipeline_portable(out)

    def _write_model_card(self, out: Path) -> None:
        cfg = self.config
        last = self.history[-1] if self.history else {}
        final_val = self.validations[-1] if self.validations else None
        base_id = hub_model_id(cfg.pretrained_model_name_or_path)
        base_name = base_id or Path(cfg.pretrained_model_name_or_path).name
        lines = ["---", "library_name: diffusers"]
        if base_id:  # the Hub's base_model must be a repo id; a local folder's path would not be portable
            lines.append(f"base_model: {base_id}")
        lines += [
            "tags: [image-reward, refl, text-to-image]", "---", "",
            f"# ReFL fine-tune of {base_name}", "",
            f"Trained with ImageReward ReFL ("
            f"{'LoRA r=%d' % cfg.lora_rank if cfg.lora_rank else 'full ' + self.family.denoiser_name}, "
            f"family {cfg.model_family}) for {self.global_step} updates on reward `{cfg.reward}`.", "",
            "## Final training values", "", "```json", json.dumps(last, indent=1), "```", "",
        ]
        if final_val is not None:
            lines += ["## Final validation rewards", "", "```json", json.dumps(final_val, indent=1), "```", ""]
        lines += ["## Arguments", "", "```json", json.dumps(_portable_arguments(cfg.to_dict()), indent=1), "```", ""]
        atomic_write_text(out / "README.md", "\n".join(lines))
        atomic_write_text(out / ARGS_NAME, json.dumps(cfg.to_dict(), indent=2))  # earlier runs: HISTORY_NAME
