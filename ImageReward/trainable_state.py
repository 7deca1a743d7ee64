"""A checkpoint that holds the trainable parameters only: the frozen ones are rebuilt (reward-model training:
from the run's initial checkpoint) or reloaded (ReFL LoRA: the base pipeline) on resume, so a state costs the
trainable weights and their optimizer moments, not the whole model.

Both trainers write ``<checkpoint folder>/trainable.safetensors`` with this module (accelerate's own
``save_state`` hooks leave the full model out). Reward-model training adds a SHA-256 of the frozen weights so a
resume on top of other frozen weights is refused; resuming is bit-identical.

>>> from torch import nn
>>> layer = nn.Linear(2, 2)
>>> _ = layer.bias.requires_grad_(False)
>>> sorted(trainable_state(layer))
['weight']
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["TRAINABLE_NAME", "frozen_fingerprint", "trainable_state", "trainable_bytes", "save_trainable",
           "load_trainable"]

TRAINABLE_NAME = "trainable.safetensors"
_FORMAT = "ImageReward-trainable-v1"


def frozen_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex, 64 characters) over the names, shapes, dtypes and bytes of the parameters that do not
    require grad, in order. A resumed or exported state is only correct on top of the same frozen weights."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        tensor = param.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer, not a copy
    return digest.hexdigest()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters that require grad, on the CPU (no copy for a CPU model)."""
    return {name: param.detach().to("cpu").contiguous()
            for name, param in model.named_parameters() if param.requires_grad}


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters (Adam keeps two more tensors of this size)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def save_trainable(model: nn.Module, directory: str | os.PathLike, fingerprint: str | None = None) -> Path:
    """Write ``directory/trainable.safetensors``: the parameters that require grad, by name, in their own dtype,
    with the frozen-weight ``fingerprint`` (:func:`frozen_fingerprint`, or ``None`` where the frozen part is
    loaded from a fixed base, as in a ReFL LoRA run) in its metadata."""
    from safetensors.torch import save_file

    path = Path(directory) / TRAINABLE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(path), metadata={"format": _FORMAT, "frozen_sha256": fingerprint or ""})
    return path


def load_trainable(model: nn.Module, directory: str | os.PathLike, fingerprint: str | None = None) -> None:
    """Copy ``directory/trainable.safetensors`` into ``model``'s trainable parameters.

    Raises :class:`~ImageReward.errors.CheckpointError` (naming the folder) when the file is missing, when its
    names or shapes differ from the model's trainable parameters (reward-model training: another
    ``fix_rate``/``fix_base`` or model size; ReFL: another LoRA rank or targets), or, when ``fingerprint`` is
    given, when it was trained on top of other frozen weights (another ``blip_path``/``preload_path``/seed)."""
    from safetensors import safe_open

    path = Path(directory) / TRAINABLE_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {TRAINABLE_NAME} (expected a checkpoint folder written by "
                              f"the reward-model or ReFL trainer)")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    if meta.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a trainable-parameter file of this trainer (format {meta.get('format')!r})")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    shapes = sorted(k for k in set(params) & set(state) if params[k].shape != state[k].shape)
    if missing or extra or shapes:
        raise CheckpointError(
            f"{path} does not fit the model's trainable parameters (another fix_rate, LoRA rank or model size?): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)}), shape mismatch {shapes[:5]}")
    if fingerprint is not None and meta.get("frozen_sha256") != fingerprint:
        raise CheckpointError(
            f"{path} was trained on top of other frozen weights than the ones this config builds (frozen "
            f"fingerprint {meta.get('frozen_sha256', '?')[:12]} != {fingerprint[:12]}): use the run's blip_path, "
            f"preload_path, seed and fix_rate")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])
