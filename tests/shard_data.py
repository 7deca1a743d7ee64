"""Test helper: WebDataset shards written by webdataset's own ``TarWriter``, with broken samples on request."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, *, broken: bool = False) -> dict[str, str]:
    """``folder/shard-0000S.tar``; returns ``{row id: prompt}`` of the whole samples. With ``broken``: shard 0
    holds a truncated JPEG, shard 1 a sample without caption and one without image, and the last shard is cut
    short in the middle of its last image."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    prompts: dict[str, str] = {}
    for s in range(shards):
        name = f"shard-{s:05d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                sample = {"__key__": key, "jpg": jpeg_bytes(s * 1000 + i, (40 + i % 5, 48))}
                prompt = f"prompt {i % 4} of shard {s}"
                if i % 3 == 1:
                    sample["json"] = json.dumps({"caption": prompt, "url": "x"}).encode()
                else:
                    sample["txt"] = prompt.encode()
                if broken and s == 0 and i == 2:
                    sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]  # truncated JPEG
                if broken and s == 1 and i == 1:
                    sample.pop("json")  # no caption at all
                if broken and s == 1 and i == 3:
                    sample.pop("jpg")  # no image
                    sample["cls"] = b"7"
                writer.write(sample)
                prompts[f"{name}/{key}"] = prompt
        if broken and s == shards - 1:
            path = folder / name
            with tarfile.open(path) as tar:
                last_jpg = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
            path.write_bytes(path.read_bytes()[: last_jpg.offset_data + last_jpg.size // 2])  # cut inside it
    return prompts
