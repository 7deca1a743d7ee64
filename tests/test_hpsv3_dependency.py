"""HPSv3 needs transformers >= 4.45 (the first release with the Qwen2-VL classes). Runs in both CI venvs: under
the WebUI's pinned transformers 4.30.2 the error is real; under a current transformers it is simulated."""

from __future__ import annotations

import importlib

import pytest
from packaging.version import Version

import ImageReward as RM
from ImageReward.errors import DependencyError


def test_old_transformers_gives_a_typed_error_naming_the_version(tmp_path, monkeypatch):
    transformers = importlib.import_module("transformers")  # the module object the loader imports now
    if Version(transformers.__version__) >= Version("4.45.0"):
        monkeypatch.setattr(transformers, "__version__", "4.30.2")
    # files present (empty): the version is checked before anything is read
    (tmp_path / "HPSv3.safetensors").write_bytes(b"")
    (tmp_path / "Qwen2-VL-7B-Instruct").mkdir()
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                 "merges.txt", "chat_template.json"):
        (tmp_path / "Qwen2-VL-7B-Instruct" / name).write_text("{}")
    assert RM.missing_files("HPSv3", tmp_path) == []
    with pytest.raises(DependencyError, match=r"transformers >= 4\.45.*4\.30\.2"):
        RM.load_score("HPSv3", device="cpu", download_root=tmp_path)
    with pytest.raises(DependencyError, match=r"transformers >= 4\.45"):
        RM.load_scorer("HPSv3", device="cpu", download_root=tmp_path, dtype="fp32").score("a", "x.png")
    assert issubclass(DependencyError, ImportError) and "HPSv3" in RM.available_scorers()
