"""LoRA on the denoiser's attention projections (SD1.x / SDXL UNets, SD3 / FLUX transformers), saved so
diffusers (``pipe.load_lora_weights``) and the UIs load it: a kohya file for UNets (A1111, ComfyUI), a
diffusers-keyed file with ``.alpha`` entries for transformers (ComfyUI's SD3 / FLUX LoRA loader).

>>> add_lora(unet, rank=4)                                       # doctest: +SKIP
>>> save_lora(get_family("sdxl"), unet, "out/")                  # doctest: +SKIP
>>> pipe.load_lora_weights("out/")                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["LORA_TARGETS", "add_lora", "lora_state_dict", "save_lora", "save_kohya_lora", "save_comfyui_lora",
           "KOHYA_NAME", "COMFYUI_NAME"]

logger = logging.getLogger(__name__)

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the UNet attention projections (the families' default)
KOHYA_NAME = "refl_lora_kohya.safetensors"
COMFYUI_NAME = "refl_lora_comfyui.safetensors"


def add_lora(unet: Any, rank: int, alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS
             ) -> list[torch.nn.Parameter]:
    """Freeze the denoiser and add a Gaussian-initialised LoRA (adapter "default") on the modules named by
    ``targets`` (name suffixes; the family's ``lora_targets``); returns the LoRA parameters.

    The B matrices start at zero, so the denoiser's outputs are unchanged until training moves them."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                init_lora_weights="gaussian", target_modules=list(targets)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:  # LoRA weights train in float32 even on a half-precision base
        param.data = param.data.float()
    return params


def lora_state_dict(unet: Any, family: Any | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights as the family's diffusers pipeline saves them: UNet keys converted to the diffusers
    names (``...to_k.lora.down.weight``), transformer keys in peft names (``...to_q.lora_A.weight``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    if family is not None and family.denoiser_name != "unet":
        return state
    return convert_state_dict_to_diffusers(state)


def save_lora(family: Any, unet: Any, directory: str | os.PathLike, *, kohya: bool = True) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (with the adapter metadata, so the loader gets ``lora_alpha``
    right) via the family's pipeline ``save_lora_weights``; with ``kohya`` also the UIs' file (a kohya file for
    UNets, :data:`COMFYUI_NAME` for transformers)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet, family).items()}
    config = unet.peft_config["default"]
    name = family.denoiser_name
    family.pipeline_class().save_lora_weights(
        save_directory=str(directory), safe_serialization=True,
        **{f"{name}_lora_layers": weights, f"{name}_lora_adapter_metadata": config.to_dict()})
    if kohya:
        if name == "unet":
            save_kohya_lora(unet, directory / KOHYA_NAME)
        else:
            save_comfyui_lora(unet, directory / COMFYUI_NAME)
    return directory / "pytorch_lora_weights.safetensors"


def save_comfyui_lora(transformer: Any, path: str | os.PathLike) -> Path:
    """A LoRA file ComfyUI's loader maps onto its SD3 / FLUX models: keys ``transformer.<module>.lora_A.weight`` /
    ``.lora_B.weight`` (its "diffusers" format, ``comfy/lora.py`` model_lora_keys_unet) plus one ``.alpha`` per
    module holding ``lora_alpha`` (ComfyUI scales by alpha / rank, and by 1 when alpha is absent)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = transformer.peft_config["default"]
    state = {f"transformer.{k}": v.detach().float().cpu().contiguous()
             for k, v in get_peft_model_state_dict(transformer).items()}
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        state[key[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(float(config.lora_alpha))
    save_file(state, str(path), metadata={"ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha)})
    return Path(path)


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
