"""LoRA on the UNet attention projections (SD1.x and SDXL), saved so diffusers and other UIs load it.

>>> add_lora(unet, rank=4)                                       # doctest: +SKIP
>>> save_lora(get_family("sdxl"), unet, "out/")                  # doctest: +SKIP
>>> pipe.load_lora_weights("out/")                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["LORA_TARGETS", "add_lora", "lora_state_dict", "save_lora", "save_kohya_lora", "KOHYA_NAME",
           "trainable_state_dict", "save_trainable_state", "load_trainable_state"]

logger = logging.getLogger(__name__)

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
KOHYA_NAME = "refl_lora_kohya.safetensors"


def add_lora(unet: Any, rank: int, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Freeze the UNet and add a Gaussian-initialised LoRA (adapter "default"); returns the LoRA parameters.

    The B matrices start at zero, so the UNet's outputs are unchanged until training moves them."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:  # LoRA weights train in float32 even on a half-precision base
        param.data = param.data.float()
    return params


def lora_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    """The LoRA weights with diffusers key names (``...to_k.lora.down.weight``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(family: Any, unet: Any, directory: str | os.PathLike, *, kohya: bool = True) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (with ``unet_lora_adapter_metadata``, so the loader gets
    ``lora_alpha`` right) via the family's pipeline ``save_lora_weights``; also a kohya-style file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
    config = unet.peft_config["default"]
    family.pipeline_class().save_lora_weights(
        save_directory=str(directory), unet_lora_layers=weights,
        unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    if kohya:
        save_kohya_lora(unet, directory / KOHYA_NAME)
    return directory / "pytorch_lora_weights.safetensors"


def save_kohya_lora(unet: Any, path: str | os.PathLike) -> Path:
    """A kohya-style LoRA file (``lora_unet_..._to_k.lora_down.weight`` + ``.alpha``) for A1111 / ComfyUI,
    with ``alpha`` set to the real ``lora_alpha`` (diffusers' converter always writes the rank)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = unet.peft_config["default"]
    peft_sd = {"unet." + k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    kohya = convert_state_dict_to_kohya(peft_sd)
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(float(config.lora_alpha))
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    save_file(kohya, str(path), metadata={"ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha)})
    return Path(path)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (``requires_grad``), by module name, as contiguous CPU tensors in their own
    dtype (float32 LoRA weights): what a LoRA run's checkpoint holds instead of the whole UNet."""
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters() if param.requires_grad}


def save_trainable_state(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write :func:`trainable_state_dict` of ``model`` to a safetensors file."""
    from safetensors.torch import save_file

    save_file(trainable_state_dict(model), str(path))
    return Path(path)


def load_trainable_state(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy a :func:`save_trainable_state` file back into ``model``'s trainable parameters, bit for bit.

    Raises ``CheckpointError`` naming the file and the missing, unexpected or mis-shaped keys (e.g. a
    checkpoint of another LoRA rank)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    misshaped = sorted(k for k in set(params) & set(state) if params[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        raise CheckpointError(f"{str(path)!r} does not match the trainable parameters: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, mis-shaped {misshaped[:3]} "
                              f"({len(missing)}/{len(unexpected)}/{len(misshaped)} in all)")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))
