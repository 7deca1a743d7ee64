"""Inference-only kernels, and the switch back to the original's computation.

``linear``: linear layers for CPU inference through oneDNN, with the GELU fused in.

On CPU, ``torch.ops.mkldnn._linear_pointwise`` (the kernel ``torch.compile`` itself emits for a Linear,
optionally followed by an activation) is faster than ``F.linear``: measured on 2 Zen 4 cores, 7-10% in fp32
for every ViT-L and BERT-base shape, and in bf16 the fused ``Linear -> GELU`` of the MLPs takes 32 ms instead
of 39 ms (8 images). The bias is added and the GELU (exact, erf) applied on the fp32 accumulator; outputs
agree with ``F.linear`` to float rounding (parity-set rewards move by < 1e-6).

It is used only where it is safe: CPU tensors, float32 or bfloat16, and autograd off (``inference_mode`` or
``no_grad``; the kernel has no backward), outside ``torch.compile`` (which makes its own fusions).
Everything else, training included, runs ``F.linear``.
``inference_shortcuts_allowed()`` is the condition every exact inference-only shortcut checks (this one, and
the cross-attention in ``blip.BertSelfAttention.attend_through_weights``); ``reference_kernels()`` turns them
all off, e.g. to time the original implementation:

>>> from ImageReward.models.kernels import reference_kernels
>>> with reference_kernels():                            # doctest: +SKIP
...     model.score("a cat", "cat.png")                  # plain F.linear + F.gelu, projected K/V, as the original
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear", "reference_kernels", "inference_shortcuts_allowed", "fused_kernels_available"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_state = threading.local()


def fused_kernels_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused linear (CPU builds with mkldnn do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.lru_cache(maxsize=None)
def _fused_dtype_supported(dtype: torch.dtype) -> bool:
    """oneDNN builds a bf16 inner product only on CPUs with native bf16 (avx512_bf16 / AMX / Arm bf16); on an
    AVX2-only CPU it refuses to create the primitive, so bf16 falls back to ``F.linear`` there."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Within the block (this thread), the original's computation: every linear layer runs plain ``F.linear``
    (+ ``F.gelu``) and cross-attention projects the image tokens to keys and values (no shortcut)."""
    previous = getattr(_state, "reference", False)
    _state.reference = True
    try:
        yield
    finally:
        _state.reference = previous


def inference_shortcuts_allowed() -> bool:
    """Autograd is off and no ``reference_kernels()`` block is active: exact inference-only shortcuts may run."""
    return not torch.is_grad_enabled() and not getattr(_state, "reference", False)


def _use_fused(x: torch.Tensor, layer: nn.Linear) -> bool:
    return (x.device.type == "cpu" and x.dtype in _FUSED_DTYPES and layer.weight.dtype == x.dtype
            and inference_shortcuts_allowed()
            and not torch.compiler.is_compiling()  # inductor makes its own fusions from F.linear + F.gelu
            and fused_kernels_available() and _fused_dtype_supported(x.dtype))


def linear(x: torch.Tensor, layer: nn.Linear, *, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, or ``F.gelu(layer(x))`` with ``gelu=True``; oneDNN-fused on CPU inference."""
    if _use_fused(x, layer):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu" if gelu else "none",
                                                  [], "none" if gelu else "")
    out = layer(x)
    return F.gelu(out) if gelu else out
