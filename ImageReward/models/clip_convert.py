"""OpenAI CLIP checkpoints (``ViT-L-14.pt``) -> ``transformers.CLIPModel`` weights.

OpenAI publishes CLIP as TorchScript archives. They are read here **without** ``torch.jit.load`` and
without a general unpickler: a TorchScript archive is a zip whose ``data.pkl`` describes the module tree
(``__torch__.*`` objects whose attribute dicts hold the tensors) and whose ``data/<key>`` entries hold the
raw tensor bytes. :func:`read_torchscript_tensors` unpickles ``data.pkl`` with an allow-list of exactly
four kinds of global (``__torch__.*`` classes, replaced by an inert attribute holder; the tensor rebuild
function, replaced by our own ``as_strided`` view; ``torch.*Storage`` names, replaced by dtypes;
``collections.OrderedDict``), so no code in the archive -- neither Python nor TorchScript -- is compiled or
run. ``torch.jit.load`` would compile the archive's TorchScript and run its ``__setstate__`` methods,
which is more than reading weights needs. Plain ``torch.save`` state dicts go through the project's
``weights_only`` reader.

:func:`openai_to_hf` renames and reshapes (fused ``in_proj`` -> q/k/v, ``proj`` -> transposed Linear) as
transformers' own conversion script does; :func:`openai_hparams` reads the architecture off the shapes
as OpenAI's ``build_model`` does (heads = width / 64).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checkpoint import read_state_dict, strip_prefix
from ..errors import CheckpointError

__all__ = ["read_openai_clip", "read_torchscript_tensors", "is_torchscript_archive", "openai_hparams", "openai_to_hf"]

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
# Scalar buffers OpenAI's archives carry beside the weights (``build_model`` deletes them too).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class _ScriptObject:
    """Inert stand-in for a ``__torch__.*`` module: it only keeps the attribute dict it is given."""

    def __init__(self, *args: Any) -> None:
        self.state: dict = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str, source: str) -> None:
        super().__init__(archive.open(f"{prefix}data.pkl"))
        self.archive, self.prefix, self.source = archive, prefix, source

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise CheckpointError(f"{self.source}: TorchScript archive refers to {module}.{name}, which a weights-only "
                              "reader does not accept")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise CheckpointError(f"{self.source}: unexpected storage reference {pid!r:.100}")
        _, dtype, key, _location, numel = pid
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise CheckpointError(f"{self.source}: storage {key} holds {len(raw)} bytes, expected {numel * itemsize}")
        return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _archive_prefix(archive: zipfile.ZipFile) -> str | None:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pickles:
        return None
    prefix = pickles[0][: -len("data.pkl")]
    return prefix if any(n.startswith(f"{prefix}code/") for n in names) else None


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a ``torch.jit.save`` zip (has ``code/``), False for ``torch.save`` files and others."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return _archive_prefix(archive) is not None


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor attribute (parameters and buffers) of a TorchScript archive, by dotted name, as its
    ``state_dict()`` would name them, without compiling or running anything from the archive."""
    source = str(path)
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive)
        if prefix is None:
            raise CheckpointError(f"{source} is not a TorchScript archive")
        if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise CheckpointError(f"{source}: big-endian archives are not supported")
        try:
            root = _ArchiveUnpickler(archive, prefix, source).load()
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"cannot read TorchScript archive {source}: {err}") from err
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            tensors[name] = obj
        elif isinstance(obj, _ScriptObject):
            for key, value in obj.state.items():
                if isinstance(key, str):
                    walk(value, f"{name}.{key}" if name else key)

    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"{source}: the archive's root is a {type(root).__name__}, not a module")
    walk(root, "")
    return tensors


def read_openai_clip(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """OpenAI CLIP weights from a TorchScript archive (the published ``ViT-L-14.pt``) or a plain
    ``torch.save`` state dict, in OpenAI's key names (fp16 tensors stay fp16)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    state = read_torchscript_tensors(path) if is_torchscript_archive(path) else read_state_dict(path)
    state = strip_prefix(state, "module.")
    if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
        raise CheckpointError(f"{str(path)!r} is not an OpenAI CLIP ViT checkpoint (no visual.conv1.weight / "
                              "token_embedding.weight; ResNet CLIPs are not supported)")
    return state


def _count_layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state for m in [pattern.match(k)] if m})


def openai_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Architecture of an OpenAI ViT CLIP read off its tensor shapes (as ``clip.model.build_model``)."""
    vision_width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    width = state["ln_final.weight"].shape[0]
    return {
        "embed_dim": state["text_projection"].shape[1],
        "image_resolution": patch * grid,
        "vision_layers": _count_layers(state, "visual.transformer.resblocks."),
        "vision_width": vision_width,
        "vision_patch_size": patch,
        "context_length": state["positional_embedding"].shape[0],
        "vocab_size": state["token_embedding.weight"].shape[0],
        "transformer_width": width,
        "transformer_heads": width // 64,
        "transformer_layers": _count_layers(state, "transformer.resblocks."),
    }


_LAYER_RENAMES = (
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)


def _convert_block(state: Mapping[str, torch.Tensor], src: str, dst: str, out: dict[str, torch.Tensor],
                   used: set[str]) -> None:
    for kind in ("weight", "bias"):
        fused = state[f"{src}attn.in_proj_{kind}"]
        used.add(f"{src}attn.in_proj_{kind}")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
            out[f"{dst}self_attn.{name}.{kind}"] = part
    for old, new in _LAYER_RENAMES:
        for kind in ("weight", "bias"):
            out[f"{dst}{new}{kind}"] = state[f"{src}{old}{kind}"]
            used.add(f"{src}{old}{kind}")


def openai_to_hf(state: Mapping[str, torch.Tensor], *, vision_only: bool = False) -> dict[str, torch.Tensor]:
    """OpenAI key names -> ``transformers.CLIPModel`` key names (``vision_only``: the keys of
    ``CLIPVisionModelWithProjection``). Every source key must be used or be one of OpenAI's three scalar
    buffers (or a block's ``attn_mask``); anything else raises :class:`CheckpointError`."""
    hp = openai_hparams(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set(OPENAI_EXTRA_KEYS)

    def take(src: str, dst: str, transpose: bool = False) -> None:
        if src not in state:
            raise CheckpointError(f"OpenAI CLIP checkpoint lacks {src!r}")
        value = state[src]
        out[dst] = value.t().contiguous() if transpose else value
        used.add(src)

    take("visual.class_embedding", "vision_model.embeddings.class_embedding")
    take("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    take("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    for kind in ("weight", "bias"):
        take(f"visual.ln_pre.{kind}", f"vision_model.pre_layrnorm.{kind}")
        take(f"visual.ln_post.{kind}", f"vision_model.post_layernorm.{kind}")
    for layer in range(hp["vision_layers"]):
        _convert_block(state, f"visual.transformer.resblocks.{layer}.", f"vision_model.encoder.layers.{layer}.", out, used)
    take("visual.proj", "visual_projection.weight", transpose=True)
    if vision_only:
        used.update(k for k in state if not k.startswith("visual."))
    else:
        take("token_embedding.weight", "text_model.embeddings.token_embedding.weight")
        take("positional_embedding", "text_model.embeddings.position_embedding.weight")
        for kind in ("weight", "bias"):
            take(f"ln_final.{kind}", f"text_model.final_layer_norm.{kind}")
        for layer in range(hp["transformer_layers"]):
            _convert_block(state, f"transformer.resblocks.{layer}.", f"text_model.encoder.layers.{layer}.", out, used)
        take("text_projection", "text_projection.weight", transpose=True)
        take("logit_scale", "logit_scale")
    # OpenAI's blocks keep their causal mask as a plain attribute; a scripted copy would carry it as a tensor
    unused = sorted(k for k in set(state) - used if not k.endswith(".attn_mask"))
    if unused:
        shown = ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else "")
        raise CheckpointError(f"OpenAI CLIP checkpoint has {len(unused)} keys the converter does not know: {shown}")
    return out
