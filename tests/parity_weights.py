"""Rebuild the deterministic random checkpoints of ``tests/fixtures`` from their recipes.

Format ``ir-fixtures-weights-recipe/1``: a fresh ``torch.Generator`` seeded with the recipe's seed, one
``torch.randn(shape)`` per parameter in list order, then ``* mul``, ``/ div``, ``+ add`` (in that order,
Python floats), cast to ``op["dtype"]``; buffers follow their ``rule``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"


def build_state_dict(recipe_path: str | Path, seed: int | None = None) -> dict[str, torch.Tensor]:
    recipe = json.loads(Path(recipe_path).read_text())
    if seed is None:
        seeds = recipe.get("seeds") or {}
        seed = recipe.get("seed", next(iter(seeds.values())) if seeds else None)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    state: dict[str, torch.Tensor] = {}
    for name, shape, _kind, _scale, op in recipe["parameters"]:
        value = torch.randn(shape, generator=generator)
        if "mul" in op:
            value = value * op["mul"]
        if "div" in op:
            value = value / op["div"]
        if "add" in op:
            value = value + op["add"]
        state[name] = value.to(getattr(torch, op["dtype"]))
    for name, shape, dtype, rule in recipe.get("buffers", []):
        if rule["type"] == "arange_expand":
            state[name] = torch.arange(rule["n"]).expand((1, -1)).to(getattr(torch, dtype))
        elif rule["type"] == "constant":  # e.g. OpenAI CLIP's input_resolution / context_length / vocab_size
            state[name] = torch.full(shape, rule["value"], dtype=getattr(torch, dtype))
        else:
            raise ValueError(f"unknown buffer rule {rule}")
    order = recipe.get("state_dict_order")
    return {k: state[k] for k in order} if order else state


def write_pickscore_processor(folder: str | Path, size: int = 224) -> None:
    """The PickScore processor folder of ``fixtures/zoo``: its config files (``size`` / ``crop_size`` set to
    ``size``) plus ``vocab.json`` / ``merges.txt`` derived from the packaged OpenAI BPE file, by the recipe of
    ``fixtures/zoo/README.md`` (the files the reference run used)."""
    import shutil

    from ImageReward.clip_tokenizer import _vocab_and_merges

    folder = Path(folder)
    folder.mkdir(parents=True)
    for item in (FIXTURES / "zoo" / "processor").iterdir():
        shutil.copy(item, folder / item.name)
    spec = json.loads((folder / "preprocessor_config.json").read_text())
    spec["size"], spec["crop_size"] = {"shortest_edge": size}, {"height": size, "width": size}
    (folder / "preprocessor_config.json").write_text(json.dumps(spec, indent=2))
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2"] + [" ".join(m) for m in merges]) + "\n",
                                       encoding="utf-8")
