"""Test-wide guards: no network, pinned threads, offline Hugging Face."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))  # for tests' own helper modules (parity_weights, ...)

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("IR_TEST_THREADS", "2")))

SHARED = Path(__file__).resolve().parents[2] / "shared"


class NetworkAccessError(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a non-loopback connection fails the test loudly."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
            return real_connect(self, address)
        raise NetworkAccessError(f"test tried to reach the network: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield


@pytest.fixture
def tiny_model():
    """A tiny ImageReward (random weights, eval mode) built from a config: no files, no network."""
    import ImageReward as RM
    from ImageReward.models.blip import BLIPConfig

    torch.manual_seed(0)
    return RM.ImageReward(BLIPConfig.tiny()).eval()


@pytest.fixture
def cached_checkpoint(monkeypatch, tmp_path_factory):
    """A default cache (``$IMAGEREWARD_CACHE``) holding an empty ``ImageReward.pt``: for tests that stand in
    ``factory.load`` for ``ImageReward-v1.0``, so the resolver's offline check for missing files passes."""
    cache = tmp_path_factory.mktemp("cache")
    (cache / "ImageReward.pt").write_bytes(b"")
    monkeypatch.setenv("IMAGEREWARD_CACHE", str(cache))
    return cache
