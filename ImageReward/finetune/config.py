"""``ReFLConfig``: every ReFL option in one dataclass, and the argparse parser built from it.

The option names are the original ``ReFL.py`` ones; options that did nothing in the original either work
here or are gone (see docs/differences.md). Validation happens before any model is loaded.

>>> cfg = parse_args(["--train_data", "data/example_prompts.json", "--grad_scale", "1"])  # doctest: +SKIP
>>> cfg.grad_scale
1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import InvalidInputError
from ..run_settings import ACCEPT, IGNORE
from ..textio import check_encoding
from ..resolve import parse_mix

__all__ = ["ReFLConfig", "ReFLConfigError", "add_arguments", "build_parser", "config_from_namespace", "parse_args",
           "parse_reward_spec"]


class ReFLConfigError(InvalidInputError):
    """A ReFL option, or a combination of options, that cannot work."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field carrying its argparse help (and optional ``choices``/``nargs``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ReFLConfig:
    """All options of a ReFL run. Defaults reproduce the original SD1.x recipe (``scripts/train_refl.sh``
    adds the multi-GPU launch, EMA, fp16 and gradient checkpointing).

    ``resume=`` in a field's metadata (:mod:`ImageReward.run_settings`): ``ACCEPT`` marks a setting that may
    change when a run resumes (with a warning and a line in ``refl_args.history.jsonl``); every other field,
    including new ones, is refused on resume when it differs from the checkpoint's value."""

    # model
    pretrained_model_name_or_path: str = _opt("CompVis/stable-diffusion-v1-4", "base diffusers model (Hub id or folder)")
    model_family: str = _opt("sd1", "model family of the base model: sd1 (SD 1.x/2.x), sdxl, sd3 (SD3 / SD3.5), "
                             "flux (FLUX.1-dev / schnell)", choices=("sd1", "sdxl", "sd3", "flux"))
    pretrained_vae_model_name_or_path: str | None = _opt(None, "other VAE (e.g. madebyollin/sdxl-vae-fp16-fix)")
    revision: str | None = _opt(None, "Hub revision of the base model")
    variant: str | None = _opt(None, "weight variant of the base model files, e.g. fp16")
    # reward
    reward: str = _opt("ImageReward-v1.0", "scorer or weighted mix: 'ImageReward-v1.0:1.0,Aesthetic:0.1' "
                       "(registered names, load_score names, or saved ImageReward folders)")
    monitor_reward: str | None = _opt(None, "held-out scorer(s), logged only, never trained on (shows reward hacking)",
                                      resume=ACCEPT)
    reward_download_root: str | None = _opt(None, "where reward-model weights are cached", resume=ACCEPT)
    grad_scale: float = _opt(1e-3, "lambda: loss = grad_scale * mean(relu(reward_margin - reward))")
    reward_margin: float = _opt(2.0, "hinge of the ReFL loss (the original's unexplained 2)")
    # rollout
    num_inference_steps: int = _opt(40, "steps of the training rollout (DDPM for sd1/sdxl, flow-matching Euler for "
                                    "sd3/flux)")
    stop_step_min: int = _opt(30, "smallest index of the differentiable step (inclusive)")
    stop_step_max: int = _opt(39, "largest index of the differentiable step (inclusive)")
    guidance_scale: float = _opt(1.0, "classifier-free guidance in rollouts (1 = none, as the original); not for flux")
    backprop_steps: int = _opt(1, "K: reward gradients flow through the last K denoiser calls up to the stop step "
                               "(1 = ReFL; K > 1 = DRaFT-K; needs --stop_step_min >= K - 1)")
    random_backprop_steps: bool = _opt(False, "draw K uniformly from 1..--backprop_steps each update (AlignProp)")
    flux_guidance: float = _opt(3.5, "flux: FLUX.1-dev's distilled guidance embedding (FluxPipeline's default 3.5; "
                                "schnell has none and ignores it)")
    max_sequence_length: int | None = _opt(None, "sd3/flux: T5 tokens per prompt (default: sd3 256, flux 512; "
                                           "FLUX.1-schnell was trained with 256)")
    drop_t5: bool = _opt(False, "sd3: do not load the T5 encoder (its embedding becomes zeros, as "
                         "StableDiffusion3Pipeline with text_encoder_3=None); saves ~9.5 GB in bf16")
    offload_text_encoders: bool = _opt(False, "keep text encoders on the CPU and move them to the accelerator "
                                       "only while a batch of prompts is encoded", resume=ACCEPT)
    resolution: int = _opt(512, "image size of rollouts and of pre-training images (multiple of 8)")
    center_crop: bool = _opt(False, "pre-training images: centre crop (default random crop)")
    random_flip: bool = _opt(False, "pre-training images: random horizontal flip")
    # data
    train_data: str | None = _opt("data/refl_data.json", "prompt file: JSON [{'text': ...}], JSONL, CSV or TXT",
                                  resume=ACCEPT)  # the prompts themselves are compared on resume
    dataset_name: str | None = _opt(None, "Hub dataset of prompts (instead of --train_data)", resume=ACCEPT)
    dataset_config_name: str | None = _opt(None, "configuration of --dataset_name", resume=ACCEPT)
    caption_column: str = _opt("text", "prompt column", resume=ACCEPT)
    image_column: str = _opt("image", "image column of --pretrain_data")
    max_train_samples: int | None = _opt(None, "use only the first N prompts after a seeded shuffle")
    cache_dir: str | None = _opt(None, "cache for Hub datasets and models", resume=ACCEPT)
    encoding: str | None = _opt(None, "text encoding of --train_data / --pretrain_data when not UTF-8, e.g. gbk "
                                      "(a byte-order mark is always honoured)", resume=ACCEPT)
    # pre-training regularisation (the paper's; absent from the original code)
    pretrain_data: str | None = _opt(None, "image-text file (JSON/JSONL/CSV with image paths) for the pre-training loss")
    pretrain_loss_weight: float = _opt(0.0, "weight of the noise-prediction loss (0 = off, the original)")
    image_base_dir: str = _opt("", "folder that relative image paths of --pretrain_data are joined to")
    snr_gamma: float | None = _opt(None, "Min-SNR weighting gamma for the pre-training loss")
    # LoRA
    lora_rank: int = _opt(0, "LoRA rank on the denoiser's attention projections (0 = full fine-tune)")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: the rank)")
    # optimisation
    train_batch_size: int = _opt(2, "prompts per device per micro-step")
    max_train_steps: int | None = _opt(100, "optimizer updates (overrides --num_train_epochs)", resume=ACCEPT)
    num_train_epochs: int = _opt(100, "epochs over the prompts when --max_train_steps is not given", resume=ACCEPT)
    gradient_accumulation_steps: int = _opt(4, "micro-steps per optimizer update")
    gradient_checkpointing: bool = _opt(False, "gradient checkpointing of the denoiser and the VAE decoder (with "
                                        "--backprop_steps > 1 each differentiable step is also recomputed whole)",
                                        resume=ACCEPT)
    learning_rate: float = _opt(1e-5, "AdamW learning rate")
    scale_lr: bool = _opt(False, "lr *= accumulation * batch * processes")
    lr_scheduler: str = _opt("constant", "diffusers get_scheduler name")
    lr_warmup_steps: int = _opt(0, "warm-up optimizer updates")
    use_8bit_adam: bool = _opt(False, "bitsandbytes AdamW8bit")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm")
    use_ema: bool = _opt(False, "keep an EMA of the UNet; it is what gets saved")
    allow_tf32: bool = _opt(False, "allow TF32 matmuls on Ampere+", resume=ACCEPT)
    enable_xformers_memory_efficient_attention: bool = _opt(False, "xformers attention (default: torch SDPA)",
                                                            resume=ACCEPT)
    mixed_precision: str | None = _opt(None, "overrides accelerate config", choices=("no", "fp16", "bf16"))
    seed: int | None = _opt(None, "seed (each process adds its index)")
    # outputs
    output_dir: str = _opt("checkpoint/refl", "checkpoints, logs and the final model", resume=ACCEPT)
    logging_dir: str = _opt("logs", "log folder, relative to output_dir", resume=ACCEPT)
    report_to: str = _opt("tensorboard", "tensorboard, wandb, all or none", resume=ACCEPT)
    tracker_project_name: str = _opt("text2image-refl", "tracker project", resume=ACCEPT)
    checkpointing_steps: int = _opt(100, "save state every N optimizer updates", resume=ACCEPT)
    checkpoints_total_limit: int | None = _opt(3, "keep at most N checkpoints (0 = keep all)", resume=ACCEPT)
    resume_from_checkpoint: str | None = _opt(None, "checkpoint folder, its name in output_dir, or 'latest'",
                                              resume=IGNORE)
    validation_prompts: list[str] | None = _opt(None, "prompts rendered at every validation", nargs="+", resume=ACCEPT)
    validation_steps: int = _opt(100, "validate every N optimizer updates (and at the end)", resume=ACCEPT)
    push_to_hub: bool = _opt(False, "upload output_dir to the Hub at the end", resume=ACCEPT)
    hub_model_id: str | None = _opt(None, "Hub repository for --push_to_hub", resume=ACCEPT)

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> "ReFLConfig":
        """Raise :class:`ReFLConfigError` naming the first bad option. Cheap: reads no model."""
        def bad(name: str, expected: str) -> None:
            raise ReFLConfigError(f"--{name}={getattr(self, name)!r}: expected {expected}")

        self._check_types()
        try:
            check_encoding(self.encoding, "--encoding")
        except InvalidInputError as err:
            raise ReFLConfigError(str(err)) from None
        if self.lr_warmup_steps < 0:
            bad("lr_warmup_steps", "an integer >= 0")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            bad("max_train_samples", "an integer >= 1 (or leave it out)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "a number in [0, 1)")
        if self.adam_weight_decay < 0:
            bad("adam_weight_decay", "a number >= 0")
        if self.seed is not None and self.seed < 0:
            bad("seed", "an integer >= 0")
        positive = ("train_batch_size", "gradient_accumulation_steps", "num_inference_steps", "resolution",
                    "checkpointing_steps", "validation_steps", "num_train_epochs")
        for name in positive:
            if getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            bad("max_train_steps", "an integer >= 1 (or leave it out)")
        if self.resolution % 8:
            bad("resolution", "a multiple of 8")
        if not 0 <= self.stop_step_min <= self.stop_step_max < self.num_inference_steps:
            raise ReFLConfigError(
                f"--stop_step_min={self.stop_step_min} / --stop_step_max={self.stop_step_max}: expected "
                f"0 <= min <= max < --num_inference_steps ({self.num_inference_steps})")
        for name in ("learning_rate", "grad_scale", "max_grad_norm", "adam_epsilon"):
            if not getattr(self, name) > 0:
                bad(name, "a number > 0")
        if self.guidance_scale < 1.0:
            bad("guidance_scale", "a number >= 1 (1 = no guidance)")
        flow = self.model_family in ("sd3", "flux")
        if self.model_family == "flux" and self.guidance_scale != 1.0:
            raise ReFLConfigError(f"--guidance_scale={self.guidance_scale!r}: FLUX.1 is guidance-distilled; leave it "
                                  "at 1 and set --flux_guidance (the guidance embedding)")
        if flow and self.resolution % 16:
            bad("resolution", f"a multiple of 16 for --model_family {self.model_family} (VAE factor 8, 2x2 patches)")
        if self.backprop_steps < 1:
            bad("backprop_steps", "an integer >= 1 (1 = ReFL)")
        if self.backprop_steps > self.stop_step_min + 1:
            raise ReFLConfigError(f"--backprop_steps={self.backprop_steps}: the last K steps must fit before the "
                                  f"earliest stop step; expected K <= --stop_step_min + 1 = {self.stop_step_min + 1}")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            bad("max_sequence_length", "an integer in [1, 512] (or leave it out)")
        if self.drop_t5 and self.model_family != "sd3":
            raise ReFLConfigError("--drop_t5 is for --model_family sd3 (FLUX needs its T5)")
        if flow and self.pretrain_loss_weight > 0:
            raise ReFLConfigError(f"--pretrain_loss_weight: the pre-training loss is noise prediction for sd1/sdxl; "
                                  f"it is not implemented for --model_family {self.model_family}")
        if self.pretrain_loss_weight < 0:
            bad("pretrain_loss_weight", "a number >= 0")
        if self.pretrain_loss_weight > 0 and not self.pretrain_data:
            raise ReFLConfigError("--pretrain_loss_weight > 0 needs --pretrain_data (an image-text file)")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            bad("snr_gamma", "a number > 0")
        if self.lora_rank < 0:
            bad("lora_rank", "an integer >= 0 (0 = full fine-tune)")
        if self.lora_alpha is not None and self.lora_rank == 0:
            raise ReFLConfigError("--lora_alpha needs --lora_rank > 0")
        if self.use_ema and self.lora_rank:
            raise ReFLConfigError("--use_ema is for full fine-tuning; it cannot be combined with --lora_rank")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 0:
            bad("checkpoints_total_limit", "an integer >= 0 (0 = keep all)")
        if self.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
            raise ReFLConfigError("--enable_xformers_memory_efficient_attention needs xformers (pip install xformers); "
                                  "without it the trainer uses torch's scaled_dot_product_attention")
        if self.report_to not in ("tensorboard", "wandb", "all", "none"):
            bad("report_to", "one of tensorboard, wandb, all, none")
        if self.train_data is None and self.dataset_name is None:
            raise ReFLConfigError("give prompts with --train_data FILE or --dataset_name NAME")
        if self.dataset_name is None and self.train_data and not os.path.isfile(self.train_data):
            raise ReFLConfigError(f"--train_data {self.train_data!r}: file not found "
                                  "(run `python data/download_refl_data.py` for the original prompts)")
        if self.pretrain_data and not os.path.isfile(self.pretrain_data):
            raise ReFLConfigError(f"--pretrain_data {self.pretrain_data!r}: file not found")
        if self.validation_prompts is not None and not all(p.strip() for p in self.validation_prompts):
            raise ReFLConfigError("--validation_prompts: empty prompt")
        parse_reward_spec(self.reward, option="reward")
        if self.monitor_reward:
            parse_reward_spec(self.monitor_reward, option="monitor_reward")
        if self.resume_from_checkpoint not in (None, "latest"):
            path = self.resume_from_checkpoint
            if not os.path.isdir(path) and not os.path.isdir(os.path.join(self.output_dir, path)):
                raise ReFLConfigError(f"--resume_from_checkpoint {path!r}: no such checkpoint folder "
                                      f"(nor in {self.output_dir!r}); use 'latest' or a checkpoint-N folder")
        return self

    def _check_types(self) -> None:
        """Every int / float option holds a (finite) number of its kind: a config built in Python with
        ``train_batch_size="2"`` or ``learning_rate=float("nan")`` fails here, naming the option."""
        import math
        import numbers

        hints = typing.get_type_hints(ReFLConfig)
        for item in dataclasses.fields(self):
            value, hint = getattr(self, item.name), hints[item.name]
            kinds = set(typing.get_args(hint)) or {hint}
            if value is None and type(None) in kinds:
                continue
            if int in kinds and float not in kinds and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ReFLConfigError(f"--{item.name}={value!r}: expected an integer")
            if float in kinds and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                   or not math.isfinite(value)):
                raise ReFLConfigError(f"--{item.name}={value!r}: expected a finite number")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of every option."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the options as JSON."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)


def parse_reward_spec(spec: str, *, option: str = "reward") -> list[tuple[str, float]]:
    """``"ImageReward-v1.0:1.0,Aesthetic:0.1"`` -> ``[("ImageReward-v1.0", 1.0), ("Aesthetic", 0.1)]``: the
    resolver's mix syntax (:func:`ImageReward.resolve.parse_mix`); a single name is a mix of one, weight 1.

    >>> parse_reward_spec("ImageReward-v1.0,Aesthetic:0.1")
    [('ImageReward-v1.0', 1.0), ('Aesthetic', 0.1)]
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ReFLConfigError(f"--{option}: expected 'NAME[:WEIGHT],...', got {spec!r}")
    try:
        parts = parse_mix(spec)
    except InvalidInputError as err:
        raise ReFLConfigError(f"--{option}: {err}") from err
    return parts if parts is not None else [(spec.strip(), 1.0)]


def _arg_type(hint: Any) -> tuple[Any, bool]:
    """argparse type for a field annotation, and whether it is a bool flag."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return bool, True
    if typing.get_origin(base) is list:
        return typing.get_args(base)[0], False
    return base, False


def build_parser(defaults: ReFLConfig | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per :class:`ReFLConfig` field (defaults from ``defaults``)."""
    from ..cli import OneLineParser  # usage errors: one line, exit 2

    parser = OneLineParser(description="ReFL: fine-tune a diffusion model on a reward model.")
    add_arguments(parser, defaults)
    return parser


def add_arguments(parser: argparse.ArgumentParser, defaults: ReFLConfig | None = None) -> None:
    """Add one ``--option`` per :class:`ReFLConfig` field to ``parser``."""
    defaults = defaults or ReFLConfig()
    hints = typing.get_type_hints(ReFLConfig)
    for item in dataclasses.fields(ReFLConfig):
        kind, is_flag = _arg_type(hints[item.name])
        kwargs: dict[str, Any] = {"help": item.metadata.get("help", ""), "default": getattr(defaults, item.name)}
        if is_flag:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            for key in ("choices", "nargs"):
                if key in item.metadata:
                    kwargs[key] = item.metadata[key]
        parser.add_argument(f"--{item.name}", **kwargs)


def parse_args(argv: Sequence[str] | None = None, defaults: ReFLConfig | None = None) -> ReFLConfig:
    """Parse command-line options into a validated :class:`ReFLConfig`."""
    return config_from_namespace(build_parser(defaults).parse_args(argv))


def config_from_namespace(namespace: argparse.Namespace) -> ReFLConfig:
    """The validated :class:`ReFLConfig` of parsed options (other attributes of ``namespace`` ignored)."""
    names = {f.name for f in dataclasses.fields(ReFLConfig)}
    return ReFLConfig(**{k: v for k, v in vars(namespace).items() if k in names}).validate()
