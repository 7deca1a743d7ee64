"""The reward-model trainer on accelerate (one GPU, several GPUs or nodes, mixed precision, accumulation).

Loss ``mean(-log sigmoid(r_better - r_worse))``; Adam (no weight decay); the original's ``AnnealingLR``
(cosine to 0, optional warmup) per optimizer step; validation pair loss/accuracy ``valid_per_epoch`` times per
epoch (and at step 0), reduced over all ranks and pooled over pairs; the lowest validation loss is kept in
``<run>/best``; ``save_state`` folders ``<run>/states/checkpoint-<step>`` resume exactly; at the end the best
weights are tested (original pair accuracy) and exported with mean/std from a reference set.

>>> from ImageReward.rm_training.config import load_config
>>> result = train_reward_model(load_config("src/config/config.yaml"))  # doctest: +SKIP
>>> result.test_accuracy                                                 # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..errors import InvalidInputError
from ..models.blip import BLIPConfig
from ..preprocess import PreprocessConfig
from .config import RMTrainConfig, TrainOptions
from .data import PairDataset, ShardedEpochSampler, collate_pairs, drop_missing_images, expand_pairs, read_groups
from .export import export_model, reference_stats, test_accuracy
from .model import PairRewardModel, blip_config_for, build_model

__all__ = ["TrainResult", "lr_at", "pair_loss", "train_reward_model", "find_latest_state"]

logger = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"


@dataclass
class TrainResult:
    """What a run produced. ``finished`` is False when it stopped at ``max_steps`` (resume to continue)."""

    run_dir: Path
    global_step: int
    total_steps: int
    finished: bool
    best_val_loss: float = math.inf
    best_val_accuracy: float = math.nan
    test_accuracy: float = math.nan
    test_pairs: int = 0
    export_dir: Path | None = None
    pt_path: Path | None = None
    mean: float = math.nan
    std: float = math.nan
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_at(step: int, total_steps: int, opts: TrainOptions) -> float:
    """The original ``AnnealingLR`` (THUDM/GLM) learning rate for optimizer step ``step`` (0-based)."""
    start, ratio = opts.lr, opts.lr_decay_ratio
    warmup = opts.warmup * total_steps
    if warmup > 0 and step <= warmup:
        return start * step / warmup
    end = max(total_steps - warmup, 1)
    progress = min(1.0, (step - warmup) / end)
    style = opts.lr_decay_style
    if style == "constant":
        return start
    if style == "linear":
        return start * (1 - (1 - ratio) * progress)
    if style == "cosine":
        return start * ((math.cos(math.pi * progress) + 1) / 2 * (1 - ratio) + ratio)
    if style == "inverse_square_root":
        return start * math.sqrt(max(warmup, 1)) / math.sqrt(max(step, warmup, 1))
    raise InvalidInputError(f"unknown lr_decay_style {style!r}")


def pair_loss(r_better: torch.Tensor, r_worse: torch.Tensor) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_better - r_worse)`` (the original's 2-way cross-entropy with target 0)."""
    return -F.logsigmoid(r_better - r_worse)


def find_latest_state(states_dir: Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step that holds a complete progress file."""
    if not states_dir.is_dir():
        return None
    found = [(int(p.name.split("-")[-1]), p) for p in states_dir.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / PROGRESS_NAME).is_file()]
    return max(found)[1] if found else None


def _load_split(cfg: RMTrainConfig, split: str, run_dir: Path | None, is_main: bool) -> list[dict[str, Any]]:
    path = Path(cfg.data_base) / f"{split}.json"
    groups, missing = drop_missing_images(read_groups(path), cfg.image_base, source=str(path))
    if missing and is_main and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "missing_images.txt", "a") as handle:
            handle.write("".join(f"{split}\t{m}\n" for m in missing))
    return groups


def _med_config(cfg: RMTrainConfig) -> dict | None:
    if cfg.BLIP.vit == "tiny" or not cfg.med_config:
        return None
    path = Path(cfg.med_config)
    if not path.is_file():
        raise InvalidInputError(f"med_config {str(path)!r} does not exist (paths are relative to the working directory)")
    return json.loads(path.read_text())


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _Run:
    """State of one training run (kept small; the loop is in :meth:`fit`)."""

    def __init__(self, cfg: RMTrainConfig, blip_config: BLIPConfig | None, accelerator: Any | None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg, t = cfg, cfg.train
        self.opts = t
        use_tb = t.report_to == "tensorboard"
        if use_tb:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                logger.warning("tensorboard is not installed: metrics are only logged")
                use_tb = False
        # the Accelerator first: it (not a bare PartialState) honours ACCELERATE_USE_CPU for multi-CPU runs
        self.acc = accelerator or Accelerator(
            mixed_precision=t.mixed_precision, log_with="tensorboard" if use_tb else None,
            project_config=ProjectConfiguration(project_dir=str(cfg.checkpoint_base), logging_dir=str(cfg.visual_base)))
        self.run_name = cfg.run_name(self.acc.num_processes)
        self.run_dir = Path(cfg.checkpoint_base) / self.run_name
        self.states_dir = self.run_dir / "states"
        visual_dir = Path(cfg.visual_base) / self.run_name
        resume = self._resume_path()
        if t.clear_visualizer and resume is None and self.acc.is_main_process and visual_dir.exists():
            shutil.rmtree(visual_dir)
        self.acc.wait_for_everyone()
        if use_tb:
            self.acc.init_trackers(self.run_name, config={k: v for k, v in _flat(cfg.to_dict()).items()})
        if t.std_log and self.acc.is_main_process:
            Path(cfg.log_base).mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(Path(cfg.log_base) / f"{self.run_name}.txt")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger("ImageReward").addHandler(handler)
        self.resume_from = resume

        from accelerate.utils import set_seed

        set_seed(t.seed)  # the same on every rank: identical head init everywhere (the original: rank 0 only)
        self.blip_config = blip_config or blip_config_for(cfg.BLIP.vit, cfg.BLIP.image_size, cfg.BLIP.patch_size,
                                                          _med_config(cfg))
        if cfg.ImageReward.mlp_dim != self.blip_config.text.hidden_size:
            raise InvalidInputError(f"ImageReward.mlp_dim {cfg.ImageReward.mlp_dim} must equal the text hidden size "
                                    f"{self.blip_config.text.hidden_size}")
        self.model = build_model(self.blip_config, blip_path=cfg.blip_path, preload_path=t.preload_path,
                                 fix_rate=t.fix_rate, fix_base=t.fix_base, download_root=t.download_root or None)
        set_seed(t.seed, device_specific=True)  # dropout / drop-path streams differ per rank (seed + rank)
        if t.gradient_checkpointing:
            self.model.blip.set_gradient_checkpointing(True)
        self.preprocess = PreprocessConfig(image_size=self.blip_config.vision.image_size)
        self._build_data()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                     weight_decay=0.0)
        self.net, self.optimizer = self.acc.prepare(PairRewardModel(self.model), optimizer)
        self.progress: dict[str, Any] = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0,
                                         "best_val_loss": math.inf, "best_val_accuracy": math.nan, "history": []}

    # ------------------------------------------------------------------------------------------ setup
    def _resume_path(self) -> Path | None:
        value = self.opts.resume_from_checkpoint
        if not value:
            return None
        if value == "latest":
            latest = find_latest_state(self.states_dir)
            if latest is None:
                logger.warning("resume_from_checkpoint=latest: no state in %s, starting fresh", self.states_dir)
            return latest
        path = Path(value)
        if not path.is_dir() and (self.states_dir / value).is_dir():
            path = self.states_dir / value
        if not (path / PROGRESS_NAME).is_file():
            raise InvalidInputError(f"resume_from_checkpoint {value!r}: {path} is not a saved training state")
        return path

    def _loader(self, groups: list, shuffle: bool, pad: bool) -> DataLoader:
        t = self.opts
        dataset = PairDataset(groups, expand_pairs(groups), self.cfg.image_base, self.preprocess)
        sampler = ShardedEpochSampler(len(dataset), num_replicas=self.acc.num_processes, rank=self.acc.process_index,
                                      shuffle=shuffle, seed=t.seed, pad=pad)
        return DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
                          collate_fn=collate_pairs, pin_memory=self.acc.device.type == "cuda",
                          generator=torch.Generator().manual_seed(t.seed))  # never draws from the global RNG

    def _build_data(self) -> None:
        is_main = self.acc.is_main_process
        self.groups = {split: _load_split(self.cfg, split, self.run_dir, is_main) for split in ("train", "valid")}
        self.train_loader = self._loader(self.groups["train"], shuffle=True, pad=True)
        self.valid_loader = self._loader(self.groups["valid"], shuffle=False, pad=False)
        if len(self.train_loader.dataset) == 0:
            raise InvalidInputError(f"{Path(self.cfg.data_base) / 'train.json'} yields no non-tie pairs with readable images")
        sampler: ShardedEpochSampler = self.train_loader.sampler  # type: ignore[assignment]
        self.batches_per_epoch = math.ceil(len(sampler._indices()) / self.opts.batch_size)
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / self.opts.accumulation_steps)
        self.total_steps = self.opts.epochs * self.updates_per_epoch
        self.valid_every = max(1, self.updates_per_epoch // self.opts.valid_per_epoch)
        logger.info("%d train pairs, %d valid pairs; %d optimizer steps (%d per epoch), effective batch %d pairs",
                    len(self.train_loader.dataset), len(self.valid_loader.dataset), self.total_steps,
                    self.updates_per_epoch, self.opts.batch_size * self.opts.accumulation_steps * self.acc.num_processes)

    # --------------------------------------------------------------------------------------- metrics
    def _reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(tensor, reduction="sum").tolist() if self.acc.num_processes > 1 else values

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Pooled validation ``(loss, accuracy)`` over all ranks (predicted ties count as wrong)."""
        net = self.acc.unwrap_model(self.net)  # no DDP collectives inside the (uneven) loop
        net.eval()
        loss_sum = correct = count = 0.0
        for batch in self.valid_loader:
            batch = _to_device(batch, self.acc.device)
            with self.acc.autocast():
                r_b, r_w = net(batch["input_ids"], batch["attention_mask"], batch["better"], batch["worse"])
            valid = batch["valid"].float()
            loss_sum += float((pair_loss(r_b, r_w) * valid).sum())
            correct += float(((r_b > r_w).float() * valid).sum())
            count += float(valid.sum())
        net.train()
        loss_sum, correct, count = self._reduce([loss_sum, correct, count])
        return (loss_sum / count, correct / count) if count else (math.nan, math.nan)

    def _after_validation(self, step: int) -> None:
        loss, acc = self.validate()
        record = {"step": step, "epoch": self.progress["epoch"], "val_loss": loss, "val_accuracy": acc}
        self.progress["history"].append(record)
        logger.info("step %d: validation loss %.4f accuracy %.4f", step, loss, acc)
        self.acc.log({"Validation-Loss": loss, "Validation-Acc": acc}, step=step)
        if loss < self.progress["best_val_loss"]:
            self.progress["best_val_loss"], self.progress["best_val_accuracy"] = loss, acc
            if self.acc.is_main_process:
                self.acc.unwrap_model(self.net).model.save_pretrained(self.run_dir / "best")
            self.acc.wait_for_everyone()

    # ---------------------------------------------------------------------------------------- states
    def save_state(self) -> Path:
        path = self.states_dir / f"checkpoint-{self.progress['global_step']}"
        self.acc.save_state(str(path))
        if self.acc.is_main_process:
            (path / PROGRESS_NAME).write_text(json.dumps(self.progress, indent=1))  # written last: marks complete
            states = sorted((int(p.name.split("-")[-1]), p) for p in self.states_dir.glob("checkpoint-*")
                            if p.name.split("-")[-1].isdigit())
            for _, old in states[: max(0, len(states) - self.opts.checkpoints_total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return path

    def load_state(self, path: Path) -> None:
        self.acc.load_state(str(path))
        self.progress = json.loads((path / PROGRESS_NAME).read_text())
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.progress["global_step"],
                    self.progress["epoch"], self.progress["batch_in_epoch"])

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> bool:
        """Train until the end or ``max_steps``; returns True when all epochs are done."""
        t = self.opts
        if self.resume_from is not None:
            self.load_state(self.resume_from)  # replaces self.progress
        elif t.validate_at_start:
            self._after_validation(0)
        p = self.progress
        self.net.train()
        sampler: ShardedEpochSampler = self.train_loader.sampler  # type: ignore[assignment]
        accum = t.accumulation_steps
        while p["epoch"] < t.epochs:
            sampler.set_epoch(p["epoch"])
            sampler.set_start(p["batch_in_epoch"] * t.batch_size)
            micro = p["batch_in_epoch"]
            stats = [0.0, 0.0, 0.0]
            for batch in self.train_loader:
                group_end = min((micro // accum + 1) * accum, self.batches_per_epoch)
                group_size = group_end - (micro // accum) * accum
                sync = micro + 1 == group_end
                batch = _to_device(batch, self.acc.device)
                with nullcontext() if sync else self.acc.no_sync(self.net):
                    with self.acc.autocast():
                        r_b, r_w = self.net(batch["input_ids"], batch["attention_mask"], batch["better"], batch["worse"])
                    valid = batch["valid"].float()
                    losses = pair_loss(r_b, r_w) * valid
                    loss = losses.sum() / valid.sum().clamp(min=1.0)
                    self.acc.backward(loss / group_size)
                stats[0] += float(losses.detach().sum())
                stats[1] += float(((r_b > r_w).float() * valid).sum())
                stats[2] += float(valid.sum())
                micro += 1
                if not sync:
                    continue
                lr = lr_at(p["global_step"], self.total_steps, t)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if t.max_grad_norm > 0:
                    self.acc.clip_grad_norm_(self.params, t.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                p["global_step"] += 1
                step = p["global_step"]
                loss_sum, correct, count = self._reduce(stats)
                stats = [0.0, 0.0, 0.0]
                if count:
                    self.acc.log({"Train-Loss": loss_sum / count, "Train-Acc": correct / count, "lr": lr}, step=step)
                p["batch_in_epoch"] = micro
                epoch_done = micro >= self.batches_per_epoch
                if epoch_done:
                    p["epoch"], p["batch_in_epoch"] = p["epoch"] + 1, 0
                if step % self.valid_every == 0 or step == self.total_steps:
                    self._after_validation(step)
                stop = bool(t.max_steps) and step >= t.max_steps
                if step % t.checkpointing_steps == 0 or epoch_done or stop:
                    self.save_state()
                if stop:
                    logger.info("stopping at max_steps=%d (resume with resume_from_checkpoint=latest)", t.max_steps)
                    return p["epoch"] >= t.epochs
                if epoch_done:
                    break
        return True

    # ---------------------------------------------------------------------------------------- finish
    def finish(self, finished: bool) -> TrainResult:
        p = self.progress
        result = TrainResult(run_dir=self.run_dir, global_step=p["global_step"], total_steps=self.total_steps,
                             finished=finished, best_val_loss=p["best_val_loss"],
                             best_val_accuracy=p["best_val_accuracy"], history=list(p["history"]))
        self.acc.wait_for_everyone()
        if not finished:
            self.acc.end_training()
            return result
        model = self.acc.unwrap_model(self.net).model
        best = self.run_dir / "best"
        if (best / "model.safetensors").is_file():
            from ..checkpoint import read_state_dict

            model.load_checkpoint_state(read_state_dict(best / "model.safetensors"), source=str(best))
        model.mean, model.std = 0.0, 1.0
        if self.acc.is_main_process:
            workers = self.opts.num_workers
            if self.opts.test_at_end and (Path(self.cfg.data_base) / "test.json").is_file():
                test_groups = _load_split(self.cfg, "test", self.run_dir, True)
                result.test_accuracy, result.test_pairs = test_accuracy(
                    model, test_groups, self.cfg.image_base, batch_size=self.opts.batch_size * 2, num_workers=workers)
                logger.info("test accuracy %.4f over %d pairs", result.test_accuracy, result.test_pairs)
                self.acc.log({"Test-Acc": result.test_accuracy}, step=p["global_step"])
            split = self.opts.reference_split
            ref_groups = self.groups.get(split) or _load_split(self.cfg, split, self.run_dir, True)
            result.mean, result.std = reference_stats(model, ref_groups, self.cfg.image_base,
                                                      batch_size=self.opts.batch_size * 2, num_workers=workers)
            result.export_dir, result.pt_path = export_model(model, self.run_dir, mean=result.mean, std=result.std)
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items() if k != "history"}
            (self.run_dir / "result.json").write_text(json.dumps(summary, indent=1))
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return result


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def train_reward_model(cfg: RMTrainConfig, *, blip_config: BLIPConfig | None = None,
                       accelerator: Any | None = None) -> TrainResult:
    """Train (or resume) a reward model as configured; returns a :class:`TrainResult`. Paths in ``cfg`` are
    relative to the working directory. ``blip_config`` overrides the model size from ``cfg.BLIP``."""
    run = _Run(cfg, blip_config, accelerator)
    finished = run.fit()
    return run.finish(finished)
