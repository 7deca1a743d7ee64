"""``train/src/config/config.yaml``: the original's keys with their meaning, plus a ``train`` section holding
the original ``options.py`` options. Unknown keys are errors; so are values of the wrong type.

Paths are relative to the working directory (the original ran from ``train/``).

>>> cfg = load_config("train/src/config/config.yaml", overrides=["train.lr=1e-4"])  # doctest: +SKIP
>>> cfg.train.lr                                                                   # doctest: +SKIP
0.0001
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InvalidInputError
from ..run_settings import ACCEPT, IGNORE
from ..textio import check_encoding

__all__ = ["BLIPSection", "ImageRewardSection", "TrainOptions", "RMTrainConfig", "load_config", "config_from_dict",
           "apply_overrides", "BLIP_LARGE_URL"]

BLIP_LARGE_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth"

# what a resumed run may change (ImageReward.run_settings): keys marked _ACCEPT are harmless (logged and kept in
# <run>/train_config.history.jsonl); every other key, including new ones, is refused when it differs
_ACCEPT, _IGNORE = {"resume": ACCEPT}, {"resume": IGNORE}


@dataclass
class BLIPSection:
    """``BLIP:`` — ``vit`` ``large`` (24 blocks, width 1024) or ``base`` (12, 768); ``tiny`` builds the few-KB
    test model. ``patch_size`` is new (default 16, as BLIP)."""

    vit: str = "large"
    image_size: int = 224
    patch_size: int = 16


@dataclass
class ImageRewardSection:
    """``ImageReward:`` — ``mlp_dim``: input width of the reward head (the BERT hidden size)."""

    mlp_dim: int = 768


@dataclass
class TrainOptions:
    """The original ``options.py`` / ``train_one_node.sh`` options (same names, ``-`` spelled ``_``), plus
    accelerate-era ones. Defaults are the shipped script's values."""

    savepath: str = field(default="blip_uni_cross_mul", metadata=_ACCEPT)
    seed: int = 1234
    batch_size: int = 4               # pairs per process per micro-batch
    accumulation_steps: int = 4       # effective batch = batch_size * accumulation_steps * processes (64 on 4 GPUs)
    epochs: int = 10
    fix_base: bool = False            # freeze all of BLIP
    fix_rate: float = 0.7             # freeze the first int(n * fix_rate) BERT layers and ViT blocks (+ embeddings)
    lr: float = 1e-5
    lr_decay_style: str = "cosine"    # constant | linear | cosine | inverse_square_root
    lr_decay_ratio: float = 0.0
    warmup: float = 0.0               # fraction of the optimizer steps
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    valid_per_epoch: int = 4
    validate_at_start: bool = field(default=True, metadata=_ACCEPT)  # the original validated at iteration 0
    preload_path: str = ""            # ImageReward checkpoint (file, folder or registry name) to start from
    std_log: bool = field(default=False, metadata=_ACCEPT)  # also write the log to log_base/<run>.txt
    # delete an existing TensorBoard folder of the run (fresh runs only)
    clear_visualizer: bool = field(default=False, metadata=_ACCEPT)
    # accelerate-era options
    # DataLoader workers that decode and preprocess images
    num_workers: int = field(default=4, metadata=_ACCEPT)
    mixed_precision: str = "no"       # no | fp16 | bf16
    gradient_checkpointing: bool = field(default=False, metadata=_ACCEPT)
    max_grad_norm: float = 0.0        # 0 = no clipping (as the original)
    # save_state every N optimizer steps (and at each epoch end)
    checkpointing_steps: int = field(default=500, metadata=_ACCEPT)
    # states kept; one more exists while the newest is written
    checkpoints_total_limit: int = field(default=2, metadata=_ACCEPT)
    resume_from_checkpoint: str = field(default="", metadata=_IGNORE)  # "", "latest" or a state folder
    # stop after N optimizer steps (0 = run all epochs); the state is saved
    max_steps: int = field(default=0, metadata=_ACCEPT)
    # generations whose raw rewards give the exported mean/std
    reference_split: str = field(default="valid", metadata=_ACCEPT)
    test_at_end: bool = field(default=True, metadata=_ACCEPT)
    report_to: str = field(default="tensorboard", metadata=_ACCEPT)  # tensorboard | none
    # log the mean train loss/accuracy every N optimizer steps (the bar shows each)
    log_every: int = field(default=10, metadata=_ACCEPT)
    # folder (ImageReward/: config.json + model.safetensors) | pt | both
    export_format: str = field(default="folder", metadata=_ACCEPT)
    # where model_large.pth / checkpoints are cached ("" = ~/.cache/ImageReward)
    download_root: str = field(default="", metadata=_ACCEPT)


@dataclass
class RMTrainConfig:
    """The whole ``config.yaml``."""

    blip_path: str = BLIP_LARGE_URL   # BLIP pre-training checkpoint (URL or file); "" = random init
    med_config: str = "src/config/med_config.json"
    checkpoint_base: str = field(default="checkpoint", metadata=_ACCEPT)
    visual_base: str = field(default="visualization", metadata=_ACCEPT)
    log_base: str = field(default="log", metadata=_ACCEPT)
    data_base: str = field(default="dataset", metadata=_ACCEPT)  # {train,valid,test}.json in the grouped format
    # text encoding of those files when not UTF-8, e.g. gbk ("" = UTF-8, BOM accepted)
    data_encoding: str = field(default="", metadata=_ACCEPT)
    image_base: str = "images"        # root the `generations` paths are relative to
    # accepted for compatibility; pairs are built on the fly
    pair_store_base: str = field(default="pair_store_clip", metadata=_IGNORE)
    BLIP: BLIPSection = field(default_factory=BLIPSection)
    ImageReward: ImageRewardSection = field(default_factory=ImageRewardSection)
    train: TrainOptions = field(default_factory=TrainOptions)

    @property
    def effective_batch_per_process(self) -> int:
        return self.train.batch_size * self.train.accumulation_steps

    def run_name(self, num_processes: int = 1) -> str:
        """The original's ``make_path``: ``{savepath}_bs{BatchSize}_fix={fix_rate}_lr={lr}{lr_decay_style}``."""
        t = self.train
        return f"{t.savepath}_bs{t.batch_size * t.accumulation_steps * num_processes}_fix={t.fix_rate}_lr={t.lr}{t.lr_decay_style}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"BLIP": BLIPSection, "ImageReward": ImageRewardSection, "train": TrainOptions}
_CHOICES = {
    ("BLIP", "vit"): ("large", "base", "tiny"),
    ("train", "lr_decay_style"): ("constant", "linear", "cosine", "inverse_square_root"),
    ("train", "mixed_precision"): ("no", "fp16", "bf16"),
    ("train", "report_to"): ("tensorboard", "none"),
    ("train", "export_format"): ("folder", "pt", "both"),
    ("train", "reference_split"): ("train", "valid", "test"),
}


_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce(where: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the field's default (ints accepted for floats)."""
    expected = type(default)
    if expected is bool:
        if not isinstance(value, bool):
            raise InvalidInputError(f"config key {where!r}: expected true/false, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string; --lr 1e-05 arrives so too
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInputError(f"config key {where!r}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise InvalidInputError(f"config key {where!r}: expected a finite number, got {value!r}")
        return float(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"config key {where!r}: expected an integer, got {value!r}")
        return value
    if expected is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise InvalidInputError(f"config key {where!r}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"config section {prefix.rstrip('.') or '<top>'!r} must be a mapping, got {data!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidInputError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; known keys in this section: {sorted(known)}")
    defaults = cls()
    values = {}
    for key, value in data.items():
        where = prefix + key
        if key in _SECTIONS and cls is RMTrainConfig:
            values[key] = _build(_SECTIONS[key], value or {}, where + ".")
            continue
        values[key] = _coerce(where, value, getattr(defaults, key))
        section = prefix.rstrip(".")
        choices = _CHOICES.get((section, key))
        if choices and values[key] not in choices:
            raise InvalidInputError(f"config key {where!r}: {values[key]!r} is not one of {list(choices)}")
    return cls(**values)


def _validate(cfg: RMTrainConfig) -> RMTrainConfig:
    t = cfg.train
    for name in ("batch_size", "accumulation_steps", "epochs", "valid_per_epoch", "checkpointing_steps",
                 "checkpoints_total_limit", "log_every", "BLIP.image_size", "BLIP.patch_size"):
        obj, key = (cfg.BLIP, name[5:]) if name.startswith("BLIP.") else (t, name)
        if getattr(obj, key) < 1:
            raise InvalidInputError(f"config key {name!r} must be >= 1, got {getattr(obj, key)}")
    if not 0.0 <= t.fix_rate <= 1.0:
        raise InvalidInputError(f"config key 'train.fix_rate' must lie in [0, 1], got {t.fix_rate}")
    if not 0.0 <= t.warmup < 1.0:
        raise InvalidInputError(f"config key 'train.warmup' must lie in [0, 1), got {t.warmup}")
    if t.lr <= 0:
        raise InvalidInputError(f"config key 'train.lr' must be > 0, got {t.lr}")
    if t.num_workers < 0 or t.max_steps < 0:
        raise InvalidInputError("config keys 'train.num_workers' and 'train.max_steps' must be >= 0")
    check_encoding(cfg.data_encoding or None, "config key 'data_encoding'")
    if cfg.BLIP.image_size % cfg.BLIP.patch_size:
        raise InvalidInputError(f"BLIP.image_size {cfg.BLIP.image_size} is not a multiple of BLIP.patch_size {cfg.BLIP.patch_size}")
    return cfg


def config_from_dict(data: Mapping[str, Any]) -> RMTrainConfig:
    """Build and validate a config from a mapping (unknown keys raise :class:`InvalidInputError`)."""
    return _validate(_build(RMTrainConfig, data or {}, ""))


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``"section.key=value"`` strings (values parsed as YAML) to a raw config mapping, in place."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise InvalidInputError(f"override {item!r} must look like key=value or section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise InvalidInputError(f"override {item!r}: the value is not valid YAML ({err})") from None
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InvalidInputError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
                encoding: str | None = None) -> RMTrainConfig:
    """Read ``config.yaml`` (``None`` = all defaults) and apply ``overrides`` (``"train.lr=1e-4"``). The file
    is read by :func:`ImageReward.textio.read_text` (UTF-8, BOM accepted; ``encoding`` for another)."""
    import yaml

    from ..textio import read_text

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(read_text(path, encoding=encoding, what="config file")) or {}
        except yaml.YAMLError as err:
            raise InvalidInputError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise InvalidInputError(f"config file {str(path)!r} must hold a mapping at the top level")
    return config_from_dict(apply_overrides(data, overrides))
