"""Helpers of the reward-server tests: a tiny ImageReward folder and a real ``imagereward serve`` process on
127.0.0.1, stopped by its PID."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOKEN = "test-token"


def tiny_folder(root: Path) -> Path:
    """A saved tiny ImageReward whose scores differ visibly between images and prompts."""
    import ImageReward as RM
    from ImageReward.models.blip import BLIPConfig

    torch.manual_seed(0)
    model = RM.ImageReward(BLIPConfig.tiny()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() and name.endswith("bias"):
                param.normal_(std=0.5)
            if name.startswith("mlp."):  # the reward head: scores of order 1 that differ by ~1e-2
                param.normal_(std=0.1)
    folder = root / "tiny"
    model.save_pretrained(folder)
    return folder


def jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``imagereward serve ARGS`` on a free port of 127.0.0.1; :meth:`stop` ends it by its PID."""

    def __init__(self, args: list[str], log: Path, timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "IR_TEST_THREADS": "2", "OMP_NUM_THREADS": "2"}
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ImageReward.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--device", "cpu", *args], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not get ready in {timeout} s: {log.read_text()[-2000:]}")

    def terminate(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)

    def stop(self) -> int:
        self.terminate()
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            return self.process.wait(10)
