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

__all__ = ["LORA_TARGETS", "add_lora", "lora_state_dict", "save_lora", "save_kohya_lora", "KOHYA_NAME"]

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
