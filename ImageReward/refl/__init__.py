"""Old name of :mod:`ImageReward.finetune` (reward fine-tuning: ReFL / DRaFT-K and online RL).

``import ImageReward.refl`` and ``from ImageReward.refl.trainer import ReFLTrainer`` keep working: each
``ImageReward.refl.X`` is the *same module object* as ``ImageReward.finetune.X`` (never a second copy, so classes
and ``isinstance`` checks agree).
"""

import importlib
import importlib.abc
import importlib.util
import sys

_OLD, _NEW = __name__, "ImageReward.finetune"


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve ``ImageReward.refl.X`` to the already-importable ``ImageReward.finetune.X``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(_OLD + "."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(_NEW + spec.name[len(_OLD):])

    def exec_module(self, module):
        pass


if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
sys.modules[_OLD] = importlib.import_module(_NEW)
