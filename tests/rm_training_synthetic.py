"""A learnable synthetic preference task for the reward-model trainer tests.

Each prompt is "a <colour> <shape>". Its generations are four 32x32 pictures: the one that matches both
words (rank 1), one with the right colour and the wrong shape and one with the right shape and the wrong
colour (rank 2, a tie), and one matching neither, also spoiled by pixel noise (rank 3). Positions, sizes and
backgrounds vary. The noise is a prompt-independent quality cue: it gets the randomly initialised model off
the ln 2 plateau quickly, but a prompt-blind model can order at most 3 of the 5 pairs of a prompt (+ chance
on the other 2 = 80%), so >= 90% needs the colour and shape words matched to the picture.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220)}
SHAPES = ("square", "cross")


def draw(colour: str, shape: str, rng: random.Random, size: int = 32, noisy: bool = False) -> Image.Image:
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    extent = rng.randint(18, 26)
    x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
    if shape == "square":
        pen.rectangle((x, y, x + extent, y + extent), fill=COLOURS[colour])
    else:  # a thin plus sign: mostly background inside its box
        mid, arm = extent // 2, 3
        pen.rectangle((x + mid - arm, y, x + mid + arm, y + extent), fill=COLOURS[colour])
        pen.rectangle((x, y + mid - arm, x + extent, y + mid + arm), fill=COLOURS[colour])
    if noisy:
        noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-60, 61, (size, size, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
    return image


def make_groups(count: int, image_dir: Path, prefix: str, seed: int) -> list[dict]:
    """``count`` prompt groups, their images written under ``image_dir/prefix``."""
    rng = random.Random(seed)
    folder = image_dir / prefix
    folder.mkdir(parents=True, exist_ok=True)
    groups = []
    for g in range(count):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        other_colour = rng.choice([c for c in COLOURS if c != colour])
        other_shape = next(s for s in SHAPES if s != shape)
        variants = [((colour, shape), 1), ((colour, other_shape), 2), ((other_colour, shape), 2),
                    ((other_colour, other_shape), 3)]
        rng.shuffle(variants)
        generations, ranking = [], []
        for k, ((c, s), rank) in enumerate(variants):
            name = f"{prefix}/{g:04d}_{k}.png"
            draw(c, s, rng, noisy=rank == 3).save(image_dir / name)
            generations.append(name)
            ranking.append(rank)
        groups.append({"id": f"{prefix}-{g}", "prompt": f"a {colour} {shape}", "generations": generations,
                       "ranking": ranking})
    return groups


def write_task(root: Path, *, train: int = 96, valid: int = 24, test: int = 32) -> tuple[Path, Path]:
    """Write ``root/dataset/{train,valid,test}.json`` and ``root/images``; return ``(data_base, image_base)``."""
    data, images = root / "dataset", root / "images"
    data.mkdir(parents=True, exist_ok=True)
    for split, count, seed in (("train", train, 1), ("valid", valid, 2), ("test", test, 3)):
        (data / f"{split}.json").write_text(json.dumps(make_groups(count, images, split, seed)))
    return data, images


def tiny_config_dict(root: Path, **train: object) -> dict:
    """A config mapping for the tiny model on the task under ``root`` (paths absolute)."""
    options = {"batch_size": 16, "accumulation_steps": 1, "epochs": 4, "fix_rate": 0.0, "lr": 1e-3,
               "lr_decay_style": "cosine", "valid_per_epoch": 2, "num_workers": 0, "report_to": "none",
               "checkpointing_steps": 1000, "seed": 7}
    options.update(train)
    return {
        "blip_path": "", "med_config": "",
        "checkpoint_base": str(root / "checkpoint"), "visual_base": str(root / "visualization"),
        "log_base": str(root / "log"), "data_base": str(root / "dataset"), "image_base": str(root / "images"),
        "BLIP": {"vit": "tiny", "image_size": 32, "patch_size": 8},
        "ImageReward": {"mlp_dim": 32},
        "train": options,
    }
