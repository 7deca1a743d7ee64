"""The grouped preference format, its one validator, and the pairs it defines.

Format (the original ``data/test.json``, and the ``train/valid/test.json`` of reward-model training): a JSON
list of ``{"id": str, "prompt": str, "generations": [image paths, relative to an image folder],
"ranking": [one number per generation]}``; lower rank = better, ties share a value, values need not be dense.
Evaluation (:mod:`ImageReward.eval.data`) and reward-model training (:mod:`ImageReward.rm_training.data`) both
read it through :func:`validate_groups`.

>>> groups = [{"id": "p", "prompt": "a cat", "generations": ["a.png", "b.png", "c.png"], "ranking": [2, 1, 2]}]
>>> [(p.better, p.worse) for p in expand_pairs(validate_groups(groups))]
[(1, 0), (1, 2)]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InvalidInputError

__all__ = ["Pair", "validate_groups", "read_json", "read_groups", "write_groups", "expand_pairs"]

_FIELDS = ("prompt", "generations", "ranking")


@dataclass(frozen=True)
class Pair:
    """One non-tie comparison: indices into ``group.generations``; ``better`` has the lower rank value."""

    group: int
    better: int
    worse: int


def validate_groups(groups: Any, source: str = "groups") -> list[dict[str, Any]]:
    """Check the grouped format and return ``groups``. Raises :class:`InvalidInputError` naming the item
    (``source[index]`` and its id) and what was expected: an object with ``prompt`` (str), ``generations``
    (a non-empty list of str) and ``ranking`` (one number per generation, not bool)."""
    if not isinstance(groups, list):
        raise InvalidInputError(f"{source}: expected a JSON list of prompt groups, got {type(groups).__name__}")
    for index, group in enumerate(groups):
        where = f"{source}[{index}]"
        if not isinstance(group, Mapping):
            raise InvalidInputError(f"{where}: expected an object with id, prompt, generations, ranking")
        if "id" in group:
            where += f" (id {group['id']!r})"
        missing = [key for key in _FIELDS if key not in group]
        if missing:
            raise InvalidInputError(f"{where}: missing field(s) {missing}")
        if not isinstance(group["prompt"], str):
            raise InvalidInputError(f"{where}: 'prompt' must be a string")
        gens, ranks = group["generations"], group["ranking"]
        if not isinstance(gens, list) or not gens or not all(isinstance(g, str) for g in gens):
            raise InvalidInputError(f"{where}: 'generations' must be a non-empty list of image paths")
        if not isinstance(ranks, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                                  for r in ranks):
            raise InvalidInputError(f"{where}: 'ranking' must be a list of numbers (lower = better), got {ranks!r}")
        if len(gens) != len(ranks):
            raise InvalidInputError(f"{where}: {len(gens)} generations but {len(ranks)} ranking entries "
                                    "(one rank per generation)")
    return groups


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; a missing or malformed file is an :class:`InvalidInputError` naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{what} {str(path)!r} is not valid JSON: {err}") from err


def read_groups(path: str | os.PathLike, what: str = "dataset file") -> list[dict[str, Any]]:
    """Read and validate a grouped JSON file."""
    return validate_groups(read_json(path, what), str(path))


def write_groups(groups: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write groups as JSON atomically (a partial file never appears under the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(path.suffix + ".part")
    temp.write_text(json.dumps(list(groups), indent=1, ensure_ascii=False))
    os.replace(temp, path)
    return path


def expand_pairs(groups: Sequence[Mapping[str, Any]]) -> list[Pair]:
    """Every pair ``i < j`` of a prompt with different ranks; ``better`` = the lower rank value. Ties skipped."""
    pairs = []
    for g, group in enumerate(groups):
        ranks = group["ranking"]
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                if ranks[i] < ranks[j]:
                    pairs.append(Pair(g, i, j))
                elif ranks[j] < ranks[i]:
                    pairs.append(Pair(g, j, i))
    return pairs
