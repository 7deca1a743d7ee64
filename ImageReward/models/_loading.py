"""Build a large module straight from a checkpoint, without first filling it with random numbers.

The module is created on the ``meta`` device (no memory, no init), given uninitialised CPU storage, its
``position_ids`` buffers are set to ``arange``, and every weight is then loaded strictly by name through
:func:`ImageReward.checkpoint.load_state_dict_strict`. A key that would be left uninitialised is an error.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, TypeVar

import torch
from torch import nn

from ..checkpoint import load_state_dict_strict
from ..errors import CheckpointError

__all__ = ["materialize"]

M = TypeVar("M", bound=nn.Module)


def _fill_position_ids(module: nn.Module) -> set[str]:
    filled = set()
    for name, buffer in module.named_buffers():
        if name.split(".")[-1] == "position_ids":
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            with torch.no_grad():
                owner._buffers["position_ids"] = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
            filled.add(name)
    return filled


def materialize(factory: Callable[[], M], state_dict: Mapping[str, torch.Tensor], *,
                allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
                source: str = "checkpoint") -> M:
    """``factory()`` built on ``meta`` and loaded from ``state_dict`` (strict; see ``load_state_dict_strict``).

    >>> head = materialize(lambda: nn.Linear(2, 1), {"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
    >>> head.weight.tolist()
    [[1.0, 1.0]]
    """
    with torch.device("meta"):
        module = factory()
    module.to_empty(device="cpu")
    filled = _fill_position_ids(module)
    report = load_state_dict_strict(module, state_dict, allow_missing=allow_missing,
                                    allow_unexpected=allow_unexpected, source=source)
    uninitialised = [k for k in report.allowed_missing if k not in filled]
    if uninitialised:
        raise CheckpointError(f"{source}: {uninitialised[:5]} would be left uninitialised")
    return module.eval()
