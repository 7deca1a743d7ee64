"""The reward-model trainer on accelerate (one GPU, several GPUs or nodes, mixed precision, accumulation).

Loss ``mean(-log sigmoid(r_better - r_worse))``; Adam (no weight decay); the original's ``AnnealingLR``
(cosine to 0, optional warmup) per optimizer step; validation pair loss/accuracy ``valid_per_epoch`` times per
epoch (and at step 0), reduced over all ranks and pooled over pairs; the trainable weights with the lowest
validation loss are kept in ``<run>/best``; state folders ``<run>/states/checkpoint-<step>`` (trainable weights,
optimizer, RNG, progress; the frozen weights are rebuilt from the initial checkpoint) resume exactly; at the end
the best weights are tested (original pair accuracy) and exported with mean/std from a reference set.
:func:`export_from_state` does the same from any saved state or ``best/`` (a run stopped early or killed).
A progress bar shows loss, accuracy, lr and the step rate; ``train.std_log`` also writes ``log/<run>.txt``.

>>> from ImageReward.rm_training.config import load_config
>>> result = train_reward_model(load_config("src/config/config.yaml"))  # doctest: +SKIP
>>> result.test_accuracy                                                 # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..disk import atomic_write_text, disk_errors
from ..errors import CheckpointError, DiskSpaceError, InvalidInputError, ResumeSettingsError
from ..models.blip import BLIPConfig
from ..preprocess import PreprocessConfig
from ..run_settings import append_history, check_resume, flatten, resume_policies
from .config import RMTrainConfig, TrainOptions
from .data import PairDataset, ShardedEpochSampler, collate_pairs, drop_missing_images, expand_pairs, read_groups
from .export import export_model, reference_stats, test_accuracy
from .model import PairRewardModel, blip_config_for, build_model
from .preflight import check_model_files
from .states import (PROGRESS_NAME, TRAINABLE_NAME, ensure_free_space, find_latest_state, format_bytes,
                     free_bytes, frozen_fingerprint, load_trainable, replace_dir, save_trainable, trainable_bytes)

__all__ = ["TrainResult", "lr_at", "pair_loss", "train_reward_model", "export_from_state", "find_latest_state"]

logger = logging.getLogger(__name__)

BEST_INFO = "best.json"
CONFIG_NAME = "train_config.json"  # in each state: the settings it was made with (checked on resume)
HISTORY_NAME = "train_config.history.jsonl"  # in the run folder: one line per start or resume
_RESUME_HINT = "free space (or lower train.checkpoints_total_limit), then resume with resume_from_checkpoint=latest"


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


def _load_split(cfg: RMTrainConfig, split: str, run_dir: Path | None, is_main: bool) -> list[dict[str, Any]]:
    path = Path(cfg.data_base) / f"{split}.json"
    groups, missing = drop_missing_images(read_groups(path, encoding=cfg.data_encoding or None), cfg.image_base,
                                           source=str(path))
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


def _skip_model_if_trainable_only(models: list, input_dir: str) -> None:
    """accelerate load hook: states written by this trainer hold no full model (see :meth:`_Run.load_state`)."""
    if (Path(input_dir) / TRAINABLE_NAME).is_file():
        models.clear()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _initial_model(cfg: RMTrainConfig, blip_config: BLIPConfig | None) -> tuple[BLIPConfig, Any]:
    """The model as training starts: seeded head, ``blip_path``/``preload_path`` weights, ``fix_rate`` frozen.
    A resumed run and :func:`export_from_state` rebuild the frozen weights with this same call."""
    from accelerate.utils import set_seed

    t = cfg.train
    set_seed(t.seed)  # the same on every rank: identical head init everywhere (the original: rank 0 only)
    blip_config = blip_config or blip_config_for(cfg.BLIP.vit, cfg.BLIP.image_size, cfg.BLIP.patch_size,
                                                 _med_config(cfg))
    if cfg.ImageReward.mlp_dim != blip_config.text.hidden_size:
        raise InvalidInputError(f"ImageReward.mlp_dim {cfg.ImageReward.mlp_dim} must equal the text hidden size "
                                f"{blip_config.text.hidden_size}")
    model = build_model(blip_config, blip_path=cfg.blip_path, preload_path=t.preload_path, fix_rate=t.fix_rate,
                        fix_base=t.fix_base, download_root=t.download_root or None)
    return blip_config, model


class _LogFile:
    """``train.std_log``: INFO and above of the ``ImageReward`` loggers also go to ``log_base/<run>.txt`` (with
    timestamps), whatever the console level; :meth:`close` restores the logger."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.logger = logging.getLogger("ImageReward")
        self.level = self.logger.level
        self.handler = logging.FileHandler(path)
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.logger.addHandler(self.handler)
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
            # keep the console (the root's handlers) at its own level: only the file gets the INFO records
            console_level = logging.getLogger().getEffectiveLevel()
            self.filters = [(h, _AtLeast(console_level)) for h in logging.getLogger().handlers]
            for handler, level_filter in self.filters:
                handler.addFilter(level_filter)
        else:
            self.filters = []

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
        self.logger.setLevel(self.level)
        for handler, level_filter in self.filters:
            handler.removeFilter(level_filter)


class _AtLeast(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class _AboveBar:
    """A console stream whose lines print above the progress bar (``tqdm.write``) instead of through it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


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
        self.log_file = (_LogFile(Path(cfg.log_base) / f"{self.run_name}.txt")
                         if t.std_log and self.acc.is_main_process else None)
        self.hooks: list = []
        try:
            self._setup(blip_config, use_tb)
        except BaseException:
            self.close()
            raise

    def _setup(self, blip_config: BLIPConfig | None, use_tb: bool) -> None:
        cfg, t = self.cfg, self.opts
        visual_dir = Path(cfg.visual_base) / self.run_name
        resume = self._resume_path()
        if t.clear_visualizer and resume is None and self.acc.is_main_process and visual_dir.exists():
            shutil.rmtree(visual_dir)
        self.acc.wait_for_everyone()
        if use_tb:
            self.acc.init_trackers(self.run_name, config=flatten(cfg.to_dict()))
        self.resume_from = resume
        self.resume_changes = check_resume_settings(cfg, resume) if resume is not None else []

        from accelerate.utils import set_seed

        self.blip_config, self.model = _initial_model(cfg, blip_config)
        self.fingerprint = frozen_fingerprint(self.model)  # states and best/ hold only the trainable part
        set_seed(t.seed, device_specific=True)  # dropout / drop-path streams differ per rank (seed + rank)
        if t.gradient_checkpointing:
            self.model.blip.set_gradient_checkpointing(True)
        self.preprocess = PreprocessConfig(image_size=self.blip_config.vision.image_size)
        self._build_data()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                     weight_decay=0.0)
        self.net, self.optimizer = self.acc.prepare(PairRewardModel(self.model), optimizer)
        # accelerate saves/loads the optimizer, RNG and scaler; the weights are ours (trainable part only)
        self.hooks = [self.acc.register_save_state_pre_hook(lambda models, weights, out: weights.clear()),
                      self.acc.register_load_state_pre_hook(_skip_model_if_trainable_only)]
        self.progress: dict[str, Any] = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0,
                                         "best_val_loss": math.inf, "best_val_accuracy": math.nan, "history": []}
        self.weight_bytes = trainable_bytes(self.model)
        self.state_bytes = 3 * self.weight_bytes  # weights + Adam's exp_avg and exp_avg_sq (fp32)
        full = sum(p.numel() * p.element_size() for p in self.model.parameters())
        export = full * (2 if t.export_format == "both" else 1)
        kept = t.checkpoints_total_limit  # one more exists while the newest is written; the export comes last
        peak = self.weight_bytes + max((kept + 1) * self.state_bytes, kept * self.state_bytes + export)
        logger.info("%d of %d parameters trainable; each state needs %s, best/ %s, the export %s: about %s "
                    "of disk at peak", sum(p.numel() for p in self.params),
                    sum(p.numel() for p in self.model.parameters()), format_bytes(self.state_bytes),
                    format_bytes(self.weight_bytes), format_bytes(full), format_bytes(peak))
        if self.acc.is_main_process and free_bytes(self.run_dir) < peak:
            logger.warning("only %s free under %s: the run may stop with a DiskSpaceError before it ends",
                           format_bytes(free_bytes(self.run_dir)), self.run_dir)
        if self.acc.is_main_process:
            append_history(self.run_dir / HISTORY_NAME, "resume" if resume else "start", cfg.to_dict(),
                           changes=self.resume_changes, state=str(resume) if resume else None)

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
        self.data_sha256 = hashlib.sha256(json.dumps(self.groups, sort_keys=True, default=str).encode()).hexdigest()
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
        batches = tqdm(self.valid_loader, desc="validation", unit="batch", leave=False,
                       disable=not self.acc.is_main_process)
        for batch in batches:
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
                self._save_best(record)
            self.acc.wait_for_everyone()

    def _save_best(self, record: dict[str, Any]) -> None:
        """``best/``: the trainable weights + ``best.json``, written beside it and then swapped in."""
        best = self.run_dir / "best"
        ensure_free_space(self.run_dir, self.weight_bytes, "best/")
        temp = best.with_name("best.tmp")
        shutil.rmtree(temp, ignore_errors=True)
        try:
            with disk_errors("best/", self.run_dir, hint=_RESUME_HINT):
                save_trainable(self.acc.unwrap_model(self.net).model, temp, self.fingerprint)
                (temp / BEST_INFO).write_text(json.dumps(record, indent=1))
                replace_dir(temp, best)
        except DiskSpaceError:
            shutil.rmtree(temp, ignore_errors=True)  # the previous best/ stays
            raise

    # ---------------------------------------------------------------------------------------- states
    def save_state(self) -> Path:
        """Write ``states/checkpoint-<step>`` via ``checkpoint-<step>.tmp`` (renamed when complete), then drop
        the oldest states beyond ``checkpoints_total_limit``. Raises :class:`~ImageReward.errors.DiskSpaceError`
        before writing anything when the disk lacks room for one state."""
        path = self.states_dir / f"checkpoint-{self.progress['global_step']}"
        temp = path.with_name(path.name + ".tmp")
        ensure_free_space(self.states_dir, self.state_bytes, f"training state {path.name}")
        if self.acc.is_main_process:
            for stale in self.states_dir.glob("checkpoint-*.tmp"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
        self.acc.wait_for_everyone()
        try:
            with disk_errors(f"training state {path.name}", self.states_dir, hint=_RESUME_HINT):
                self.acc.save_state(str(temp))  # optimizer, RNG per rank, scaler (the save hook drops the weights)
                self.acc.wait_for_everyone()
                if self.acc.is_main_process:
                    save_trainable(self.acc.unwrap_model(self.net).model, temp, self.fingerprint)
                    (temp / CONFIG_NAME).write_text(json.dumps(self.cfg.to_dict(), indent=1))
                    progress = {**self.progress, "data_sha256": self.data_sha256}
                    (temp / PROGRESS_NAME).write_text(json.dumps(progress, indent=1))  # marks it complete
                    replace_dir(temp, path)
        except DiskSpaceError:
            shutil.rmtree(temp, ignore_errors=True)  # earlier states stay; free what the partial one took
            raise
        if self.acc.is_main_process:
            states = sorted((int(p.name.split("-")[-1]), p) for p in self.states_dir.glob("checkpoint-*")
                            if p.name.split("-")[-1].isdigit())
            for _, old in states[: max(0, len(states) - self.opts.checkpoints_total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return path

    def load_state(self, path: Path) -> None:
        progress = json.loads((path / PROGRESS_NAME).read_text())
        saved_data = progress.pop("data_sha256", None)
        if saved_data not in (None, self.data_sha256):
            raise ResumeSettingsError(f"cannot resume from {path}: the training or validation data under "
                                      f"{self.cfg.data_base!r} differ from those it was trained on; resume with the "
                                      "same data, or start a new run (another savepath)", changed=["data"])
        self.acc.load_state(str(path))  # optimizer, RNG, scaler
        if (path / TRAINABLE_NAME).is_file():  # (a state of an older version holds the full model instead)
            load_trainable(self.acc.unwrap_model(self.net).model, path, self.fingerprint)
        self.progress = progress
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
        end = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        bar = tqdm(total=end, initial=min(self.progress["global_step"], end), desc="train", unit="step",
                   dynamic_ncols=True, disable=not self.acc.is_main_process)
        consoles = [(h, h.setStream(_AboveBar(h.stream))) for h in logging.getLogger().handlers
                    if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)]
        try:
            return self._loop(bar)
        finally:
            bar.close()
            for handler, stream in consoles:
                handler.setStream(stream)

    def _loop(self, bar: Any) -> bool:
        t = self.opts
        p = self.progress
        self.net.train()
        sampler: ShardedEpochSampler = self.train_loader.sampler  # type: ignore[assignment]
        accum = t.accumulation_steps
        window = [0.0, 0.0, 0.0]  # loss sum, correct, pairs since the last log line
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
                    bar.set_postfix_str(f"micro-batch {micro - (micro - 1) // accum * accum}/{group_size}")
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
                    bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.3f}", lr=f"{lr:.3g}",
                                    epoch=p["epoch"], refresh=False)
                bar.update(1)
                window = [w + v for w, v in zip(window, (loss_sum, correct, count))]
                if (step % t.log_every == 0 or step == self.total_steps) and window[2]:
                    rate = bar.format_dict.get("rate")
                    logger.info("step %d/%d epoch %d: train loss %.4f accuracy %.4f (%d pairs) lr %.4g%s", step,
                                self.total_steps, p["epoch"], window[0] / window[2], window[1] / window[2],
                                window[2], lr, f", {1 / rate:.2f} s/step" if rate else "")
                    window = [0.0, 0.0, 0.0]
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
                    logger.info("stopping at max_steps=%d: resume with resume_from_checkpoint=latest, or export "
                                "with --export-from %s", t.max_steps, self.run_dir / "best")
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
            return result
        model = self.acc.unwrap_model(self.net).model
        best = self.run_dir / "best"
        if (best / TRAINABLE_NAME).is_file():
            load_trainable(model, best, self.fingerprint)
        if self.acc.is_main_process:
            _test_and_export(model, self.cfg, self.run_dir, result, log=self.acc.log,
                             reference_groups=self.groups.get(self.opts.reference_split))
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items() if k != "history"}
            atomic_write_text(self.run_dir / "result.json", json.dumps(summary, indent=1))
        self.acc.wait_for_everyone()
        return result

    def close(self) -> None:
        """End the trackers, remove the state hooks and the log file handler."""
        if hasattr(self, "progress"):  # set up completely (trackers may have started)
            self.acc.end_training()
        for hook in self.hooks:
            hook.remove()
        if self.log_file is not None:
            self.log_file.close()


def _test_and_export(model: Any, cfg: RMTrainConfig, run_dir: Path, result: TrainResult, *,
                     reference_groups: list | None = None, log: Any = None, out_dir: Path | None = None,
                     folder_name: str = "ImageReward") -> None:
    """Test accuracy (``train.test_at_end`` and a ``test.json``), mean/std of the raw rewards over
    ``train.reference_split``, and the export as ``train.export_format``; fills ``result``."""
    opts = cfg.train
    model.mean, model.std = 0.0, 1.0
    workers, batch_size = opts.num_workers, opts.batch_size * 2
    if opts.test_at_end and (Path(cfg.data_base) / "test.json").is_file():
        test_groups = _load_split(cfg, "test", run_dir, True)
        result.test_accuracy, result.test_pairs = test_accuracy(model, test_groups, cfg.image_base,
                                                                batch_size=batch_size, num_workers=workers)
        logger.info("test accuracy %.4f over %d pairs", result.test_accuracy, result.test_pairs)
        if log is not None:
            log({"Test-Acc": result.test_accuracy}, step=result.global_step)
    split = opts.reference_split
    groups = reference_groups or _load_split(cfg, split, run_dir, True)
    result.mean, result.std = reference_stats(model, groups, cfg.image_base, batch_size=batch_size,
                                              num_workers=workers)
    result.export_dir, result.pt_path = export_model(model, out_dir or run_dir, mean=result.mean, std=result.std,
                                                     formats=opts.export_format, folder_name=folder_name,
                                                     pt_name=f"{folder_name}.pt")


def check_resume_settings(cfg: RMTrainConfig, state: Path) -> list:
    """Compare ``cfg`` with the settings the saved ``state`` was made with: a key that changes the run raises
    :class:`~ImageReward.errors.ResumeSettingsError` naming it (each key's rule is its ``resume`` metadata in
    :mod:`.config`; unmarked keys are refused); harmless changes are logged and returned."""
    saved_file = state / CONFIG_NAME
    if not saved_file.is_file():
        logger.warning("%s holds no %s (made by an older version): its settings cannot be checked", state,
                       CONFIG_NAME)
        return []
    return check_resume(json.loads(saved_file.read_text(encoding="utf-8")), cfg.to_dict(),
                        resume_policies(RMTrainConfig), source=state, option=lambda name: f"config key {name!r}",
                        defaults=RMTrainConfig().to_dict())


def train_reward_model(cfg: RMTrainConfig, *, blip_config: BLIPConfig | None = None,
                       accelerator: Any | None = None) -> TrainResult:
    """Train (or resume) a reward model as configured; returns a :class:`TrainResult`. Paths in ``cfg`` are
    relative to the working directory. ``blip_config`` overrides the model size from ``cfg.BLIP``."""
    check_model_files(cfg)  # a missing checkpoint fails here, in one line, before anything loads
    run = _Run(cfg, blip_config, accelerator)
    try:
        return run.finish(run.fit())
    finally:
        run.close()


def export_from_state(cfg: RMTrainConfig, source: str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
                      blip_config: BLIPConfig | None = None, device: str | torch.device | None = None
                      ) -> TrainResult:
    """Export a saved state (``states/checkpoint-<step>``) or ``best/`` of a run configured by ``cfg``: rebuild
    the frozen weights as the run did, load the trainable ones, test (``train.test_at_end``), compute mean/std on
    ``train.reference_split`` and write the same strict-loading export as the end of training.

    Output goes to ``out_dir`` (default: the run folder) as ``ImageReward/`` (+ ``ImageReward.pt``) from
    ``best/``, ``ImageReward-step<N>/`` from a state. Raises :class:`~ImageReward.errors.CheckpointError` when
    ``source`` is no such folder or was trained on other frozen weights (another ``blip_path``, seed,
    ``fix_rate``...)."""
    source = Path(source)
    if not source.is_dir() or not (source / TRAINABLE_NAME).is_file():
        raise CheckpointError(f"--export-from {str(source)!r}: expected a state folder (states/checkpoint-<step>) "
                              f"or best/ holding {TRAINABLE_NAME}")
    check_model_files(cfg)
    is_state = (source / PROGRESS_NAME).is_file()
    info = json.loads((source / (PROGRESS_NAME if is_state else BEST_INFO)).read_text()) \
        if (source / (PROGRESS_NAME if is_state else BEST_INFO)).is_file() else {}
    step = int(info.get("global_step" if is_state else "step", 0))
    run_dir = source.parent.parent if is_state and source.parent.name == "states" else source.parent
    _, model = _initial_model(cfg, blip_config)
    load_trainable(model, source, frozen_fingerprint(model))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    result = TrainResult(run_dir=run_dir, global_step=step, total_steps=0,
                         finished=int(info.get("epoch", 0)) >= cfg.train.epochs,
                         best_val_loss=info.get("val_loss", info.get("best_val_loss", math.nan)),
                         best_val_accuracy=info.get("val_accuracy", info.get("best_val_accuracy", math.nan)))
    _test_and_export(model, cfg, run_dir, result, out_dir=Path(out_dir) if out_dir else None,
                     folder_name=f"ImageReward-step{step}" if is_state else "ImageReward")
    return result
