"""Bad input a user can give, kind by kind (issue 13): each gets the right value or a typed error naming it.

1 numeric arguments, 2 device and dtype, 3 the differentiable paths' pixels, 4 image files (EXIF orientation,
high bit depth, closed / empty images, FIFOs), 5 text encodings in every reader, 6 score-dataset configuration
mistakes and resume, 7 loading, 8 the command line (one line on stderr, exit 2 / 1, never a traceback).
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import ImageReward as RM
from ImageReward.errors import (CheckpointError, ImageLoadError, ImageRewardError, InvalidInputError,
                                UnknownModelError, UnsupportedInputError)
from ImageReward.image_io import load_image
from ImageReward.textio import TextDecodeError, read_json, read_text
from ImageReward.validation import ArgumentTypeError, resolve_device, resolve_dtype

torch.set_num_threads(1)

CHINESE = "一只猫坐在窗台上"  # "a cat sitting on the window sill"


def _noise(height: int = 40, width: int = 56, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    return tiny_model.save_pretrained(tmp_path / "model")


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(_noise()).save(path)
    return path


def _cli(argv, capsys) -> tuple[int, str, str]:
    """Run ``imagereward argv`` in-process: (exit status, stdout, stderr)."""
    from ImageReward.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


# =============================================================================================== 1. numbers
@pytest.mark.parametrize("value", [-1, 0, True, 2.5, "8"])
@pytest.mark.parametrize("method", ["score", "score_batch", "inference_rank"])
def test_batch_size_is_checked_on_every_scoring_method(tiny_model, photo, method, value):
    with pytest.raises(InvalidInputError, match="batch_size"):
        if method == "score_batch":
            tiny_model.score_batch("a cat", [photo, photo], batch_size=value)
        else:
            getattr(tiny_model, method)("a cat", [photo, photo], batch_size=value)


def test_batch_size_one_gives_the_default_scores(tiny_model, photo, tmp_path):
    other = tmp_path / "other.png"
    Image.fromarray(_noise(seed=1)).save(other)
    assert tiny_model.score("a cat", [photo, other], batch_size=1) == pytest.approx(
        tiny_model.score("a cat", [photo, other]), abs=1e-6)


def test_wrong_type_is_both_invalid_and_unsupported(tiny_model, photo):
    with pytest.raises(ArgumentTypeError) as info:
        tiny_model.score("a cat", [photo], batch_size="8")
    assert isinstance(info.value, InvalidInputError) and isinstance(info.value, UnsupportedInputError)


@pytest.mark.parametrize("argument,value", [("batch_size", 0), ("num_workers", -1), ("timeout", 0.0),
                                            ("timeout", float("nan")), ("limit", 0), ("html_per_prompt", 0),
                                            ("batch_size", -3), ("limit", -1)])
def test_score_dataset_numbers_fail_before_any_row(tiny_model, photo, tmp_path, argument, value):
    from ImageReward.scoring.runner import score_dataset

    out = tmp_path / "out.jsonl"
    with pytest.raises(InvalidInputError, match=argument):
        score_dataset(tiny_model, photo.parent, out, prompt="a cat", progress=False, **{argument: value})
    assert not out.exists()


def test_eval_and_helpers_check_their_numbers(tiny_model, tmp_path):
    from ImageReward.eval.metrics import bootstrap_intervals, pair_counts
    from ImageReward.eval.preference import evaluate_preference
    from ImageReward.finetune.config import ReFLConfig
    from ImageReward.finetune.data import BatchOrder, load_prompts
    from ImageReward.scoring.calibration import ReferenceStats
    from ImageReward.scoring.gallery import write_gallery

    with pytest.raises(InvalidInputError, match="batch_size"):
        evaluate_preference(tiny_model, [], batch_size=0)
    with pytest.raises(InvalidInputError, match="tie_threshold"):
        evaluate_preference(tiny_model, [], tie_threshold=-1.0)
    with pytest.raises(InvalidInputError, match="n_boot"):
        evaluate_preference(tiny_model, [], n_boot=-5)
    with pytest.raises(InvalidInputError, match="n_boot"):
        bootstrap_intervals([pair_counts([1, 2], [0.5, 0.1])], n_boot=-1)
    with pytest.raises(InvalidInputError, match="seed"):
        bootstrap_intervals([pair_counts([1, 2], [0.5, 0.1])], seed=-1)
    with pytest.raises(InvalidInputError, match="per_prompt"):
        write_gallery([], tmp_path / "g.html", per_prompt=0)
    with pytest.raises(InvalidInputError, match="batch_size"):
        BatchOrder(10, batch_size=0)
    with pytest.raises(InvalidInputError, match="process_index"):
        BatchOrder(10, batch_size=2, process_index=2, num_processes=2)
    with pytest.raises(InvalidInputError, match="max_quantiles"):
        ReferenceStats.from_scores([1.0, 2.0], max_quantiles=0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    with pytest.raises(InvalidInputError, match="max_samples"):
        load_prompts(prompts, max_samples=0)
    for field, value in (("train_batch_size", "2"), ("learning_rate", float("nan")), ("lr_warmup_steps", -1),
                         ("adam_beta1", 1.5), ("seed", -1), ("max_train_samples", 0)):
        with pytest.raises(InvalidInputError, match=field):
            ReFLConfig(train_data=str(prompts), **{field: value}).validate()


def test_comfyui_score_node_checks_batch_size(tiny_model):
    from comfyui.image_reward_nodes import ImageRewardScore

    with pytest.raises(InvalidInputError, match="batch_size"):
        ImageRewardScore().score(tiny_model, torch.rand(2, 32, 32, 3), "a cat", batch_size=0)


# ======================================================================================== 2. device, dtype
@pytest.mark.parametrize("name,expected", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                           ("fp16", torch.float16), ("float16", torch.float16),
                                           ("half", torch.float16), ("fp32", torch.float32),
                                           ("float32", torch.float32), ("torch.bfloat16", torch.bfloat16),
                                           (" BF16 ", torch.bfloat16), (torch.float16, torch.float16),
                                           (None, None)])
def test_dtype_names_are_accepted(name, expected):
    assert resolve_dtype(name) == expected


@pytest.mark.parametrize("name", ["float64", "int8", "auto", "cuda", torch.float64, torch.int8, 16])
def test_other_dtypes_are_refused(name):
    with pytest.raises(InvalidInputError, match="dtype"):
        resolve_dtype(name)


def test_load_accepts_a_dtype_string(model_dir):
    model = RM.load(str(model_dir), device="cpu", dtype="bf16")
    assert model.input_dtype == torch.bfloat16 and model.mlp.layers[0].weight.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7", 0, torch.device("cuda")])
def test_unavailable_device_fails_before_any_weight_is_read(model_dir, monkeypatch, device):
    import ImageReward.checkpoint as checkpoint

    def no_read(*args, **kwargs):
        raise AssertionError("weights were read before the device was checked")

    monkeypatch.setattr(checkpoint, "read_state_dict", no_read)
    with pytest.raises(InvalidInputError, match="device") as info:
        RM.load(str(model_dir), device=device)
    assert "available" in str(info.value) and "cpu" in str(info.value)


@pytest.mark.parametrize("device,message", [("bfloat16", "dtype"), ("gpu", "not a device"), ("", "not a device"),
                                            ("cuda:x", "not a device")])
def test_a_device_that_is_not_one_is_named(model_dir, device, message):
    with pytest.raises(InvalidInputError, match=message):
        RM.load(str(model_dir), device=device)


def test_device_of_the_wrong_type(model_dir):
    with pytest.raises(UnsupportedInputError, match="device"):
        RM.load(str(model_dir), device=["cpu"])
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_score_checks_device_before_reading_files(tmp_path):
    with pytest.raises(InvalidInputError, match="device"):
        RM.load_score("CLIP", device="cuda", download_root=tmp_path)
    with pytest.raises(InvalidInputError, match="dtype"):
        RM.load_score("Aesthetic", device="cpu", dtype="float64", download_root=tmp_path)


# ============================================================================ 3. the differentiable paths
def test_score_grad_refuses_minus_one_to_one_pixels_like_score(tiny_model):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1  # a VAE decode not mapped to [0, 1]
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]") as info:
        tiny_model.score_grad(pixels, "a cat")
    assert "value_range" in str(info.value)
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        tiny_model.score("a cat", pixels[0])


def test_score_grad_opt_in_for_minus_one_to_one(tiny_model):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = tiny_model.score_grad((pixels + 1) / 2, ["a cat", "a dog"])
    got = tiny_model.score_grad(pixels, ["a cat", "a dog"], value_range=(-1, 1))
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(InvalidInputError, match="value_range"):
        tiny_model.score_grad(pixels, "a cat", value_range=(0, 255))


@pytest.mark.parametrize("make,error,message", [
    (lambda: torch.full((1, 3, 32, 32), float("nan")), InvalidInputError, "NaN"),
    (lambda: torch.full((1, 3, 32, 32), float("inf")), InvalidInputError, "NaN or inf"),
    (lambda: torch.rand(1, 3, 32, 32) * 255, InvalidInputError, r"\[0, 1\]"),
    (lambda: (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), UnsupportedInputError, "uint8"),
    (lambda: torch.rand(3, 32, 32), InvalidInputError, "shape"),
    (lambda: torch.rand(0, 3, 32, 32), InvalidInputError, "shape"),
    (lambda: torch.rand(1, 3, 0, 32), InvalidInputError, "shape"),
    (lambda: np.zeros((1, 3, 32, 32), np.float32), UnsupportedInputError, "torch.Tensor"),
])
def test_score_grad_checks_dtype_shape_finiteness(tiny_model, make, error, message):
    with pytest.raises(error, match=message):
        tiny_model.score_grad(make(), "a cat")


def test_refl_reward_call_checks_pixels(tiny_model):
    from ImageReward.finetune.rewards import WeightedReward

    reward = WeightedReward([tiny_model], [1.0])
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        reward.score_grad_parts(torch.rand(1, 3, 32, 32) * 2 - 1, ["a cat"])
    pixels = torch.rand(1, 3, 32, 32)
    total, _ = reward.score_grad_parts(pixels * 2 - 1, ["a cat"], value_range=(-1, 1))
    assert torch.allclose(total, tiny_model.score_grad(pixels, "a cat"), atol=1e-5)


def test_score_gard_checks_its_inputs(tiny_model):
    from ImageReward.preprocess import preprocess_tensor
    from ImageReward.tokenizer import tokenize

    ids, mask = tokenize(["a cat"])
    good = preprocess_tensor(torch.rand(1, 3, 32, 32), tiny_model.preprocess_config)
    assert tiny_model.score_gard(ids, mask, good).shape == (1, 1)
    with pytest.raises(InvalidInputError, match="score_gard"):
        tiny_model.score_gard(ids, mask, torch.rand(1, 3, 32, 32) * 255)  # not normalised
    with pytest.raises(InvalidInputError, match="NaN"):
        tiny_model.score_gard(ids, mask, torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(InvalidInputError, match="prompt_ids"):
        tiny_model.score_gard(ids.float(), mask, good)
    with pytest.raises(InvalidInputError, match="2 images for 1 prompts"):
        tiny_model.score_gard(ids, mask, good.repeat(2, 1, 1, 1))
    with pytest.raises(InvalidInputError, match=r"\[B, 3, 32, 32\]"):
        tiny_model.score_gard(ids, mask, torch.rand(1, 3, 64, 64))


# ============================================================================================ 4. images
_INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}


def _with_orientation(path: Path, upright: Image.Image, orientation: int, fmt: str = "PNG") -> Path:
    """Store ``upright`` as a camera would with EXIF ``Orientation=orientation``."""
    stored = upright.transpose(_INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return path


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_is_applied(tmp_path, orientation):
    upright = Image.fromarray(_noise(30, 50))
    path = _with_orientation(tmp_path / f"o{orientation}.png", upright, orientation)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(upright))
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(upright))
    assert np.array_equal(np.asarray(load_image(Image.open(path))), np.asarray(upright))
    # the original's behaviour stays reachable: pixels as stored
    assert np.array_equal(np.asarray(load_image(path, exif_transpose=False)),
                          np.asarray(upright.transpose(_INVERSE[orientation])))


def test_phone_jpeg_scores_as_seen_and_original_behaviour_is_reachable(tiny_model, tmp_path):
    path = _with_orientation(tmp_path / "phone.jpg", Image.fromarray(_noise(40, 64)), 6, fmt="JPEG")
    seen = ImageOps.exif_transpose(Image.open(path))  # what ComfyUI / the WebUI / transformers score
    stored = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))  # pixels as stored, no EXIF
    assert seen.size == (64, 40) and stored.size == (40, 64)
    assert tiny_model.score("a cat", path) == pytest.approx(tiny_model.score("a cat", seen), abs=1e-6)
    assert torch.equal(tiny_model.preprocess(path), tiny_model.preprocess(seen))
    assert not torch.allclose(tiny_model.preprocess(path), tiny_model.preprocess(stored), atol=0.1)
    tiny_model.exif_transpose = False
    try:
        assert torch.equal(tiny_model.preprocess(path), tiny_model.preprocess(stored))
        assert tiny_model.score("a cat", path) == pytest.approx(tiny_model.score("a cat", stored), abs=1e-6)
    finally:
        tiny_model.exif_transpose = True


def test_score_dataset_applies_the_orientation_like_score(tiny_model, tmp_path):
    from ImageReward.scoring.runner import score_dataset
    from ImageReward.scoring.writers import read_output

    folder = tmp_path / "imgs"
    folder.mkdir()
    path = _with_orientation(folder / "phone.png", Image.fromarray(_noise(30, 50)), 8)
    score_dataset(tiny_model, folder, tmp_path / "s.jsonl", prompt="a cat", progress=False)
    assert read_output(tmp_path / "s.jsonl")[0]["score"] == pytest.approx(tiny_model.score("a cat", path), abs=1e-5)


def _gray16(values: np.ndarray, mode: str = "I;16") -> Image.Image:
    if mode == "I;16B":
        return Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
    return Image.fromarray(values.astype(np.uint16))


def _scaled16(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grayscale_is_scaled_not_clipped(tiny_model, tmp_path, mode):
    values = np.random.default_rng(0).integers(0, 65536, (40, 56)).astype(np.uint16)
    image = _gray16(values, mode)
    assert image.mode == mode
    loaded = load_image(image)
    assert loaded.mode == "L" and np.array_equal(np.asarray(loaded), _scaled16(values))
    for fmt in ("PNG", "TIFF"):
        path = tmp_path / f"gray16.{fmt.lower()}"
        image.save(path, format=fmt)
        assert np.array_equal(np.asarray(load_image(path)), _scaled16(values)), fmt
        expected = tiny_model.score("a cat", Image.fromarray(_scaled16(values)))
        assert tiny_model.score("a cat", path) == pytest.approx(expected, abs=1e-6), fmt


def test_32_bit_integer_and_float_grayscale(tmp_path):
    sixteen = np.random.default_rng(1).integers(0, 65536, (20, 30))
    eight = np.random.default_rng(2).integers(0, 256, (20, 30))
    assert np.array_equal(np.asarray(load_image(Image.fromarray(sixteen.astype(np.int32), mode="I"))),
                          _scaled16(sixteen))
    assert np.array_equal(np.asarray(load_image(Image.fromarray(eight.astype(np.int32), mode="I"))), eight)
    unit = np.random.default_rng(3).random((20, 30)).astype(np.float32)
    assert np.array_equal(np.asarray(load_image(Image.fromarray(unit, mode="F"))),
                          np.round(unit.astype(np.float64) * 255).astype(np.uint8))
    assert np.array_equal(np.asarray(load_image(Image.fromarray(eight.astype(np.float32), mode="F"))), eight)
    with pytest.raises(ImageLoadError, match="32-bit integer"):
        load_image(Image.fromarray(np.full((4, 4), -5, np.int32), mode="I"))
    with pytest.raises(ImageLoadError, match="float pixels"):
        load_image(Image.fromarray(np.full((4, 4), np.nan, np.float32), mode="F"))
    with pytest.raises(ImageLoadError, match="float pixels"):
        load_image(Image.fromarray(np.full((4, 4), 1000.0, np.float32), mode="F"))


def _png_rgb16(path: Path, pixels: np.ndarray) -> Path:
    """A 48-bit RGB PNG (Pillow cannot write one)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _tiff_rgb16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB TIFF, uncompressed, one strip."""
    height, width, _ = pixels.shape
    body = pixels.astype("<u2").tobytes()
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, None), (277, 3, 1, 3), (278, 3, 1, height), (279, 4, 1, len(body)), (284, 3, 1, 1)]
    bits_at = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        value = bits_at if tag == 258 else bits_at + 6 if tag == 273 else value
        out += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1 else \
            struct.pack("<HHII", tag, kind, count, value)
    path.write_bytes(bytes(out + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + body))
    return path


@pytest.mark.parametrize("writer", [_png_rgb16, _tiff_rgb16])
def test_48_bit_rgb_files_are_reduced_to_8_bits(tmp_path, writer):
    values = np.random.default_rng(4).integers(0, 65536, (12, 16, 3)).astype(np.uint16)
    loaded = load_image(writer(tmp_path / f"rgb16{'.png' if writer is _png_rgb16 else '.tif'}", values))
    assert loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded).astype(int) - _scaled16(values).astype(int)).max() <= 1


def test_uint16_arrays_are_scaled(tiny_model):
    values = np.random.default_rng(5).integers(0, 65536, (24, 24, 3)).astype(np.uint16)
    assert np.array_equal(np.asarray(load_image(values)), _scaled16(values))
    assert tiny_model.score("a cat", values) == pytest.approx(tiny_model.score("a cat", _scaled16(values)), abs=1e-6)


@pytest.mark.parametrize("mode", ["LA", "PA", "CMYK", "La", "1", "P", "RGBa", "RGBX", "YCbCr", "HSV", "LAB",
                                  "RGBA", "L"])
def test_every_pil_mode_scores(tiny_model, mode):
    image = Image.fromarray(_noise(), "RGB").convert("RGBA")
    image = image.convert(mode) if mode not in ("PA", "La", "HSV", "LAB") else Image.new(mode, (40, 30))
    score = tiny_model.score("a cat", image)
    assert np.isfinite(score)


def _forge_png(rgb: Image.Image) -> Image.Image:
    """``rgb`` as SD WebUI Forge saves it by default (*Stealth infotext = Alpha*): an alpha channel of 254/255
    holding the infotext in its lowest bit (tests/webui_shim.py has Forge's encoder)."""
    from webui_shim import ImageSaveParams, add_stealth_pnginfo

    image = rgb.copy()
    text = "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, ImageReward Score: 0.1"
    add_stealth_pnginfo(ImageSaveParams(image, None, "out.png", {"parameters": text}), "Alpha")
    assert image.mode == "RGBA" and image.getchannel("A").getextrema() == (254, 255)
    return image


def test_alpha_that_hides_nothing_is_dropped_everywhere(tiny_model, tmp_path):
    """A Forge PNG (alpha 254/255) scores as its RGB pixels, as a PIL image, a file, bytes and in a batch (the
    command line: below); fully opaque RGBA and LA too; real transparency keeps its alpha (the original's path)."""
    rgb = Image.fromarray(_noise(64, 64, seed=7))
    forge = _forge_png(rgb)
    path = tmp_path / "00001-1.png"
    forge.save(path)
    expected = tiny_model.score("a cat", rgb)
    items = (forge, path, path.read_bytes(), rgb.convert("RGBA"))
    for item in items:
        loaded = load_image(item)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(rgb))
    assert tiny_model.score_batch("a cat", list(items)).tolist() == pytest.approx([expected] * 4, abs=1e-6)
    gray = rgb.convert("L")
    la = Image.merge("LA", (gray, _forge_png(rgb).getchannel("A")))
    assert load_image(la).mode == "L" and np.array_equal(np.asarray(load_image(la)), np.asarray(gray))
    transparent = forge.copy()
    transparent.putpixel((0, 0), (0, 0, 0, 253))
    assert load_image(transparent).mode == "RGBA"


@pytest.mark.integration
def test_cli_scores_a_forge_png_as_its_rgb_pixels(tiny_model, tmp_path, capsys):
    rgb = Image.fromarray(_noise(64, 64, seed=7))
    path = tmp_path / "00001-1.png"
    _forge_png(rgb).save(path)
    expected = tiny_model.score("a cat", rgb)
    model_dir = tiny_model.save_pretrained(tmp_path / "m")
    rgb.save(tmp_path / "rgb.png")
    code, out, err = _cli(["score", "--prompt", "a cat", "--model", model_dir, "--device", "cpu", path,
                           tmp_path / "rgb.png"], capsys)
    assert code == 0, err
    shown = {Path(line.split()[-1]).name: line.split()[1] for line in out.strip().splitlines()[1:]}
    assert shown == {path.name: f"{expected:.4f}", "rgb.png": f"{expected:.4f}"}, out


def test_closed_and_empty_pil_images_are_typed_errors(tiny_model):
    closed = Image.fromarray(_noise())
    closed.close()
    with pytest.raises(ImageLoadError, match="closed"):
        tiny_model.score("a cat", closed)
    for size in ((0, 0), (0, 5), (5, 0)):
        with pytest.raises(ImageLoadError, match="empty"):
            tiny_model.score("a cat", Image.new("RGB", size))
    with pytest.raises(ImageLoadError, match="image #1"):
        tiny_model.score("a cat", [Image.new("RGB", (8, 8)), Image.new("RGB", (0, 0))])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_at_once_everywhere(tiny_model, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list = []

    def attempt() -> None:
        for call in (lambda: tiny_model.score("a cat", fifo), lambda: read_text(fifo),
                     lambda: RM.load(str(fifo)), lambda: __import__("ImageReward.scoring.datasets",
                                                                     fromlist=["x"]).read_records(fifo)):
            try:
                call()
                outcome.append(None)
            except ImageRewardError as err:
                outcome.append(err)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "reading a FIFO hung"
    assert len(outcome) == 4 and all(isinstance(err, ImageRewardError) for err in outcome), outcome
    assert all("pipe" in str(err) or "regular file" in str(err) for err in outcome), outcome


# ====================================================================================== 5. text encodings
def test_text_reader_bom_utf16_and_named_encodings(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfprompt\n")
    assert read_text(path) == "prompt\n"
    path.write_bytes("prompt\n".encode("utf-16"))
    assert read_text(path) == "prompt\n"
    path.write_bytes("prompt\n".encode("utf-32"))
    assert read_text(path) == "prompt\n"
    data = ("ok\n" + CHINESE).encode("gbk")
    path.write_bytes(data)
    with pytest.raises(UnicodeDecodeError) as python_error:
        data.decode("utf-8")
    with pytest.raises(TextDecodeError, match=rf"byte offset {python_error.value.start}\b") as info:
        read_text(path)
    assert str(path) in str(info.value) and "--encoding" in str(info.value)
    assert isinstance(info.value, InvalidInputError)
    assert read_text(path, encoding="gbk") == "ok\n" + CHINESE
    with pytest.raises(InvalidInputError, match="not a known text encoding"):
        read_text(path, encoding="no-such-codec")
    path.write_bytes(b"\xef\xbb\xbf[1, 2]")
    assert read_json(path) == [1, 2]
    path.write_bytes(b"[1, 2")
    with pytest.raises(InvalidInputError, match="line 1"):
        read_json(path)


def _write_table(path: Path, rows: list[dict], encoding: str) -> Path:
    if path.suffix == ".csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    elif path.suffix == ".jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_score_dataset_tables_with_bom_and_other_encodings(tiny_model, photo, tmp_path, suffix):
    from ImageReward.scoring.datasets import read_records
    from ImageReward.scoring.runner import score_dataset
    from ImageReward.scoring.writers import read_output

    rows = [{"prompt": CHINESE, "image": photo.name}, {"prompt": "a cat", "image": photo.name}]
    excel = _write_table(tmp_path / f"excel{suffix}", rows, "utf-8-sig")
    assert [r.prompt for r in read_records(excel)] == [CHINESE, "a cat"]
    summary = score_dataset(tiny_model, excel, tmp_path / "out.jsonl", progress=False)
    assert summary["errors"] == 0
    assert [r["score"] for r in read_output(tmp_path / "out.jsonl")] == pytest.approx(
        tiny_model.score_batch([CHINESE, "a cat"], [photo, photo]).tolist(), abs=1e-5)
    gbk = _write_table(tmp_path / f"gbk{suffix}", rows, "gbk")
    with pytest.raises(TextDecodeError, match="byte offset") as info:
        score_dataset(tiny_model, gbk, tmp_path / "gbk-out.jsonl", progress=False)
    assert str(gbk) in str(info.value) and not (tmp_path / "gbk-out.jsonl").exists()
    assert [r.prompt for r in read_records(gbk, encoding="gbk")] == [CHINESE, "a cat"]


def test_prompt_sidecars_with_bom_and_encoding(tmp_path):
    from ImageReward.scoring.datasets import read_records

    folder = tmp_path / "gen"
    folder.mkdir()
    Image.fromarray(_noise()).save(folder / "a.png")
    Image.fromarray(_noise(seed=1)).save(folder / "b.png")
    (folder / "a.txt").write_bytes(b"\xef\xbb\xbf" + CHINESE.encode())
    (folder / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "a dog"}).encode())
    assert [r.prompt for r in read_records(folder)] == [CHINESE, "a dog"]
    (folder / "a.txt").write_bytes(CHINESE.encode("gbk"))
    first = read_records(folder)[0]
    assert first.prompt is None and "byte offset" in first.error and "a.txt" in first.error
    assert read_records(folder, encoding="gbk")[0].prompt == CHINESE


def test_eval_readers_accept_bom_and_encoding(tmp_path):
    from ImageReward.eval.data import load_benchmark_prompts, load_test_json

    items = [{"id": "1", "prompt": CHINESE, "generations": ["a.png", "b.png"], "ranking": [1, 2]}]
    path = tmp_path / "test.json"
    path.write_bytes(json.dumps(items, ensure_ascii=False).encode("utf-8-sig"))
    assert load_test_json(path)[0].prompt == CHINESE
    path.write_bytes(json.dumps(items, ensure_ascii=False).encode("gbk"))
    with pytest.raises(TextDecodeError, match="test.json"):
        load_test_json(path)
    assert load_test_json(path, encoding="gbk")[0].prompt == CHINESE
    prompts = tmp_path / "benchmark-prompts.json"
    prompts.write_bytes(json.dumps([{"id": "1", "prompt": CHINESE}], ensure_ascii=False).encode("utf-8-sig"))
    assert load_benchmark_prompts(prompts)[0]["prompt"] == CHINESE


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".txt", ".tsv"])
def test_refl_prompt_files_accept_bom_and_encoding(tmp_path, suffix):
    from ImageReward.finetune.data import PromptDataError, load_prompts

    texts = [CHINESE, "a dog"]
    if suffix == ".json":
        body = json.dumps([{"text": t} for t in texts], ensure_ascii=False)
    elif suffix == ".jsonl":
        body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    elif suffix in (".csv", ".tsv"):
        body = "text\n" + "\n".join(texts) + "\n"
    else:
        body = "\n".join(texts) + "\n"
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(body.encode("utf-8-sig"))
    assert load_prompts(path) == texts
    path.write_bytes(body.encode("gbk"))
    with pytest.raises(PromptDataError, match="byte offset") as info:
        load_prompts(path)
    assert str(path) in str(info.value)
    assert load_prompts(path, encoding="gbk") == texts



def test_refl_encoding_option_reaches_the_prompt_reader(tmp_path):
    """``refl.py --encoding gbk`` (users bring their own prompt files): the trainer reads them with it, before
    any model loads; an unknown codec is a config error naming the option."""
    pytest.importorskip("diffusers")
    from ImageReward.finetune.config import ReFLConfigError, parse_args
    from ImageReward.finetune.trainer import ReFLTrainer

    path = tmp_path / "prompts.txt"
    path.write_bytes((CHINESE + "\na dog\n").encode("gbk"))
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data", str(path), "--grad_scale", "1"]
    assert ReFLTrainer(parse_args(base + ["--encoding", "gbk"])).prompts == [CHINESE, "a dog"]
    with pytest.raises(InvalidInputError, match="byte offset") as info:
        ReFLTrainer(parse_args(base))
    assert str(path) in str(info.value)
    with pytest.raises(ReFLConfigError, match="--encoding"):
        ReFLTrainer(parse_args(base + ["--encoding", "no-such-codec"]))

def test_rm_training_readers_accept_bom_and_encoding(tmp_path):
    from ImageReward.rm_training.config import load_config
    from ImageReward.rm_training.data import read_groups

    config = tmp_path / "config.yaml"
    config.write_bytes(b"\xef\xbb\xbf" + b"train:\n  lr: 0.0001\n")
    assert load_config(config).train.lr == pytest.approx(1e-4)
    config.write_bytes("# 中文注释\ntrain:\n  lr: 0.0002\n".encode("gbk"))
    with pytest.raises(TextDecodeError, match="config.yaml"):
        load_config(config)
    assert load_config(config, encoding="gbk").train.lr == pytest.approx(2e-4)
    config.write_text("train: [unclosed\n")
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        load_config(config)
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        load_config(None, ["train.lr=[1"])
    groups = tmp_path / "train.json"
    data = [{"id": "1", "prompt": CHINESE, "generations": ["a.png", "b.png"], "ranking": [1, 2]}]
    groups.write_bytes(json.dumps(data, ensure_ascii=False).encode("utf-8-sig"))
    assert read_groups(groups)[0]["prompt"] == CHINESE
    groups.write_bytes(json.dumps(data, ensure_ascii=False).encode("gbk"))
    with pytest.raises(TextDecodeError, match="train.json"):
        read_groups(groups)
    assert read_groups(groups, encoding="gbk")[0]["prompt"] == CHINESE



def test_rm_training_config_data_encoding_reaches_the_dataset_reader(tmp_path):
    """``data_encoding: gbk`` in the training config: the trainer reads {train,valid,test}.json with it; an
    unknown codec is refused when the config is read, naming the key."""
    from ImageReward.rm_training.config import config_from_dict
    from ImageReward.rm_training.trainer import _load_split

    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    data = [{"id": "1", "prompt": CHINESE, "generations": ["a.png", "b.png"], "ranking": [1, 2]}]
    (tmp_path / "train.json").write_bytes(json.dumps(data, ensure_ascii=False).encode("gbk"))
    paths = {"data_base": str(tmp_path), "image_base": str(tmp_path / "images")}
    cfg = config_from_dict({**paths, "data_encoding": "gbk"})
    assert _load_split(cfg, "train", None, False)[0]["prompt"] == CHINESE
    with pytest.raises(TextDecodeError, match="train.json"):
        _load_split(config_from_dict(paths), "train", None, False)
    with pytest.raises(InvalidInputError, match="data_encoding"):
        config_from_dict({**paths, "data_encoding": "no-such-codec"})

def test_model_configs_and_stats_accept_bom(tiny_model, model_dir, tmp_path):
    from ImageReward.scoring.calibration import ReferenceStats

    config = model_dir / "config.json"
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    assert RM.load(str(model_dir), device="cpu").std == tiny_model.std
    stats = ReferenceStats.from_scores([1.0, 2.0, 4.0]).to_json(tmp_path / "stats.json")
    stats.write_bytes(b"\xef\xbb\xbf" + stats.read_bytes())
    assert ReferenceStats.from_json(stats).count == 3


# ============================================================================ 6. score-dataset mistakes
def test_a_table_without_its_prompt_column_stops_before_any_row(tiny_model, photo, tmp_path, capsys):
    from ImageReward.scoring.runner import score_dataset

    table = _write_table(tmp_path / "pairs.csv", [{"caption_en": "a cat", "image": photo.name}], "utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(InvalidInputError, match="prompt column") as info:
        score_dataset(tiny_model, table, out, progress=False)
    assert "caption_en" in str(info.value) and not out.exists()
    with pytest.raises(InvalidInputError, match="'wrong'.*caption_en"):
        score_dataset(tiny_model, table, out, prompt_column="wrong", progress=False)
    summary = score_dataset(tiny_model, table, out, prompt_column="caption_en", progress=False)
    assert summary["errors"] == 0 and summary["total_rows"] == 1


def test_a_folder_without_any_prompt_stops(tiny_model, photo, tmp_path):
    from ImageReward.scoring.runner import score_dataset

    with pytest.raises(InvalidInputError, match="--prompt"):
        score_dataset(tiny_model, photo.parent, tmp_path / "out" / "s.jsonl", progress=False)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_rerun_retries_error_rows_once_each(tiny_model, tmp_path, suffix):
    pytest.importorskip("pyarrow")
    from ImageReward.scoring.runner import score_dataset
    from ImageReward.scoring.writers import read_output

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_noise()).save(folder / "a.png")
    rows = [{"id": "a", "prompt": "a cat", "image": "imgs/a.png"}, {"id": "b", "prompt": "a dog", "image": "imgs/b.png"}]
    table = _write_table(tmp_path / "pairs.jsonl", rows, "utf-8")
    out = tmp_path / f"scores{suffix}"
    first = score_dataset(tiny_model, table, out, progress=False)
    assert first["errors"] == 1
    Image.fromarray(_noise(seed=1)).save(folder / "b.png")  # the user fixes the input
    second = score_dataset(tiny_model, table, out, progress=False)
    assert second["resumed"] == 1 and second["scored"] == 1 and second["errors"] == 0
    final = read_output(out)
    assert [r["id"] for r in final] == ["a", "b"] and all(r["error"] is None for r in final)
    assert final[1]["score"] == pytest.approx(tiny_model.score("a dog", folder / "b.png"), abs=1e-5)


def test_a_malformed_jsonl_line_gets_an_id_that_cannot_collide(tiny_model, photo, tmp_path):
    from ImageReward.scoring.runner import score_dataset
    from ImageReward.scoring.writers import read_output

    lines = [json.dumps({"id": 1, "prompt": "a cat", "image": photo.name}), "{not json",
             json.dumps({"id": 2, "prompt": "a dog", "image": photo.name}), json.dumps({"id": 0, "prompt": "x"})[:-1],
             json.dumps({"prompt": "no id", "image": photo.name})]
    table = tmp_path / "pairs.jsonl"
    table.write_text("\n".join(lines) + "\n")
    summary = score_dataset(tiny_model, table, tmp_path / "s.jsonl", progress=False)
    rows = read_output(tmp_path / "s.jsonl")
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 5 and summary["errors"] == 2
    assert {"1", "2"} <= set(ids)
    bad = [r for r in rows if r["error"]]
    assert all("is not a JSON object" in r["error"] for r in bad)
    again = score_dataset(tiny_model, table, tmp_path / "s.jsonl", progress=False)  # ids are stable on rerun
    assert [r["id"] for r in read_output(tmp_path / "s.jsonl")] == ids and again["resumed"] == 3


def test_output_path_mistakes_are_one_line_errors(tiny_model, photo, tmp_path, model_dir, capsys):
    from ImageReward.scoring.runner import score_dataset

    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "dir.jsonl", "is a folder"), (tmp_path / "file" / "s.jsonl", "is a file")):
        with pytest.raises(InvalidInputError, match=message):
            score_dataset(tiny_model, photo.parent, out, prompt="a cat", progress=False)
        code, _, err = _cli(["score-dataset", photo.parent, "-o", out, "--prompt", "a cat", "--model", model_dir,
                             "--device", "cpu"], capsys)
        assert code == 2
        _assert_one_line(err, message)
    with pytest.raises(InvalidInputError, match="html"):
        score_dataset(tiny_model, photo.parent, tmp_path / "s.jsonl", prompt="a cat", html=tmp_path / "dir.jsonl",
                      progress=False)


# ============================================================================================ 7. loading
@pytest.mark.parametrize("name,error", [(None, UnsupportedInputError), (123, UnsupportedInputError),
                                        ("", UnknownModelError), ("no/such/model", UnknownModelError)])
def test_load_names(name, error):
    with pytest.raises(error, match="name|not found|empty"):
        RM.load(name)
    if error is UnsupportedInputError:  # a wrong type is also an InvalidInputError naming the argument
        with pytest.raises(InvalidInputError, match="name"):
            RM.load(name)
    with pytest.raises((UnsupportedInputError, UnknownModelError)):
        RM.load_score(name)


@pytest.mark.parametrize("content,message", [("{not json", "not valid JSON"), ('["a list"]', "expected an object"),
                                             ('{"mean": 0, "std": 1}', "blip"),
                                             ('{"blip": {"vision": {}}, "mean": 0, "std": 1}', "config"),
                                             ('{"blip": 1, "mean": 0, "std": 1}', "config"),
                                             ('{"blip": {}, "mean": "x", "std": 1}', "config")])
def test_a_corrupt_or_incomplete_config_json_is_a_checkpoint_error(model_dir, content, message):
    (model_dir / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message) as info:
        RM.load(str(model_dir), device="cpu")
    assert "config.json" in str(info.value)


def test_download_root_that_is_a_file(tmp_path, model_dir):
    file = tmp_path / "cache"
    file.write_text("x")
    for root in (file, file / "sub"):
        with pytest.raises(InvalidInputError, match="download_root"):
            RM.load("ImageReward-v1.0", download_root=root)
        with pytest.raises(InvalidInputError, match="download_root"):
            RM.load_score("CLIP", device="cpu", download_root=root)
    with pytest.raises(InvalidInputError, match="download_root"):
        RM.load(str(model_dir), download_root=123)


def test_med_config_mistakes(tmp_path):
    ckpt = tmp_path / "m.pt"
    torch.save({}, ckpt)
    with pytest.raises(InvalidInputError, match="med_config"):
        RM.load(str(ckpt), device="cpu", med_config=tmp_path / "missing.json")
    (tmp_path / "med.json").write_text("{oops")
    with pytest.raises(InvalidInputError, match="med_config"):
        RM.load(str(ckpt), device="cpu", med_config=tmp_path / "med.json")
    with pytest.raises(UnsupportedInputError, match="med_config"):
        RM.load(str(ckpt), device="cpu", med_config=42)
    with pytest.raises(InvalidInputError, match="hidden_size"):
        RM.load(str(ckpt), device="cpu", med_config={"hidden_size": "768"})


def test_a_config_json_with_impossible_sizes(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["blip"]["text"]["num_hidden_layers"] = -1
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        RM.load(str(model_dir), device="cpu")


# ======================================================================================== 8. command line
@pytest.mark.parametrize("argv,needle", [
    (["score", "--prompt", "a cat", "--batch-size", "-1", "IMG"], "--batch-size"),
    (["score", "--prompt", "a cat", "--batch-size", "0", "IMG"], "--batch-size"),
    (["score", "--prompt", "a cat", "--batch-size", "x", "IMG"], "--batch-size"),
    (["rank", "--prompt", "a cat", "--dtype", "float64", "IMG"], "--dtype"),
    (["score", "IMG"], "--prompt"),
    (["score-dataset", "DIR", "-o", "OUT", "--num-workers", "-1"], "--num-workers"),
    (["score-dataset", "DIR", "-o", "OUT", "--limit", "0"], "--limit"),
    (["score-dataset", "DIR", "-o", "OUT", "--timeout", "0"], "--timeout"),
    (["score-dataset", "DIR", "-o", "OUT", "--timeout", "nan"], "--timeout"),
    (["score-dataset", "DIR", "-o", "OUT", "--html-per-prompt", "0"], "--html-per-prompt"),
    (["eval-preference", "--bootstrap", "-1"], "--bootstrap"),
    (["eval-preference", "--seed", "-1"], "--seed"),
    (["eval-preference", "--tie-threshold", "-0.5"], "--tie-threshold"),
    (["eval-preference", "--report-max-prompts", "0"], "--report-max-prompts"),
    (["eval-benchmark", "--batch-size", "0"], "--batch-size"),
    (["eval-benchmark", "--gpu-id", "-1"], "--gpu"),
    (["no-such-command"], "invalid choice"),
])
def test_usage_errors_are_one_line_exit_2(argv, needle, photo, tmp_path, capsys):
    argv = [str(photo) if a == "IMG" else str(photo.parent) if a == "DIR" else str(tmp_path / "o.jsonl")
            if a == "OUT" else a for a in argv]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    _assert_one_line(err, needle)


@pytest.mark.parametrize("extra,needle", [
    (["--device", "bfloat16"], "dtype"),
    (["--device", "gpu"], "--device" if False else "device"),
    (["IMG_MISSING"], "does not exist"),
    (["IMG_CLOSED_FIFO"], "regular file"),
])
def test_cli_input_mistakes_are_one_line_exit_2(model_dir, photo, tmp_path, capsys, extra, needle):
    images = [str(photo)]
    if extra == ["IMG_MISSING"]:
        images, extra = [str(tmp_path / "missing.png")], []
    elif extra == ["IMG_CLOSED_FIFO"]:
        if not hasattr(os, "mkfifo"):
            pytest.skip("needs FIFOs")
        os.mkfifo(tmp_path / "fifo.png")
        images, extra = [str(tmp_path / "fifo.png")], []
    code, _, err = _cli(["score", "--prompt", "a cat", "--model", model_dir, *extra, *images], capsys)
    assert code == 2
    _assert_one_line(err, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_unavailable_device_names_what_is_available(model_dir, photo, capsys):
    code, _, err = _cli(["score", "--prompt", "a cat", "--model", model_dir, "--device", "cuda", photo], capsys)
    assert code == 2
    _assert_one_line(err, "device", "available", "cpu")


def test_cli_accepts_dtype_aliases_and_encoding(model_dir, tmp_path, photo, capsys):
    table = _write_table(tmp_path / "gbk.csv", [{"prompt": CHINESE, "image": photo.name}], "gbk")
    out = tmp_path / "s.jsonl"
    code, _, err = _cli(["score-dataset", table, "-o", out, "--model", model_dir, "--device", "cpu",
                         "--num-workers", "0", "--no-progress"], capsys)
    assert code == 2
    _assert_one_line(err, "gbk.csv", "byte offset", "--encoding")
    code, out_text, err = _cli(["score-dataset", table, "-o", out, "--model", model_dir, "--device", "cpu",
                                "--num-workers", "0", "--no-progress", "--encoding", "gbk", "--dtype", "fp32"],
                               capsys)
    assert code == 0, err
    assert json.loads(out_text)["errors"] == 0
    code, _, err = _cli(["score-dataset", table, "-o", out, "--model", model_dir, "--encoding", "klingon"], capsys)
    assert code == 2
    _assert_one_line(err, "klingon")


def test_cli_corrupt_checkpoint_and_missing_column(model_dir, tmp_path, photo, capsys):
    (model_dir / "config.json").write_text("{broken")
    code, _, err = _cli(["score", "--prompt", "a cat", "--model", model_dir, "--device", "cpu", photo], capsys)
    assert code == 2
    _assert_one_line(err, "config.json")


def test_cli_missing_prompt_column_exits_non_zero_before_any_row(tiny_model, tmp_path, photo, capsys):
    model_dir = tiny_model.save_pretrained(tmp_path / "m")
    table = _write_table(tmp_path / "t.csv", [{"text_en": "a cat", "image": photo.name}], "utf-8")
    code, _, err = _cli(["score-dataset", table, "-o", tmp_path / "s.jsonl", "--model", model_dir, "--device", "cpu",
                         "--num-workers", "0"], capsys)
    assert code == 2 and not (tmp_path / "s.jsonl").exists()
    _assert_one_line(err, "text_en", "--prompt-column")


def test_cli_unexpected_failure_is_one_line_exit_1(monkeypatch, model_dir, photo, capsys):
    import ImageReward.commands.score as score_command

    def boom(args):
        raise RuntimeError("CUDA out of memory\nsecond line")

    monkeypatch.setattr(score_command, "_run", boom)
    code, _, err = _cli(["score", "--prompt", "a cat", photo], capsys)
    assert code == 1
    _assert_one_line(err, "RuntimeError", "CUDA out of memory")


def test_cli_download_failure_is_exit_1(photo, tmp_path, capsys):
    code, _, err = _cli(["score", "--prompt", "a cat", "--model", "ImageReward-v1.0", "--download-root",
                         tmp_path / "cache", "--device", "cpu", photo], capsys)
    assert code == 1
    _assert_one_line(err, "ImageReward.pt")


def test_refl_and_train_rm_entry_points_are_one_line(tmp_path, capsys):
    from ImageReward.finetune.cli import main as refl_main

    with pytest.raises(SystemExit) as info:
        refl_main(["--train_batch_size", "zero"])
    assert info.value.code == 2
    _assert_one_line(capsys.readouterr().err, "--train_batch_size")
    assert refl_main(["--train_data", str(tmp_path / "none.json"), "--output_dir", str(tmp_path)]) == 2
    _assert_one_line(capsys.readouterr().err, "--train_data")
    config = tmp_path / "c.yaml"
    config.write_bytes("train:\n  lr: 中文\n".encode("gbk"))
    code, _, err = _cli(["train-rm", "--config", config], capsys)
    assert code == 2
    _assert_one_line(err, "c.yaml", "byte offset")


def test_an_extreme_aspect_ratio_is_scored_without_gigabytes(tiny_model):
    strip = Image.new("RGB", (1, 400_000), (200, 30, 90))  # the original would resize to 224 x 89.6M pixels
    square = Image.new("RGB", (224, 224), (200, 30, 90))
    assert torch.equal(tiny_model.preprocess(strip), tiny_model.preprocess(square))


@pytest.mark.parametrize("script,args,needle,code", [
    ("example.py", ["--checkpoint", "no-such.pt", "--images", "a.png", "b.png", "c.png", "d.png"], "no-such.pt", 2),
    ("refl.py", ["--train_batch_size", "0", "--train_data", "data/example_prompts.json"], "--train_batch_size", 2),
    ("train/src/train.py", ["--config", "no-such.yaml"], "no-such.yaml", 2),
    ("scripts/test.py", ["--source_path", "no-such.json", "--no-download", "--model_type", "CLIP"],
     "no-such.json", 1),  # data that cannot be fetched: a failure (DownloadError)
    ("scripts/test-benchmark.py", ["--batch-size", "-2"], "--batch-size", 2),
])
@pytest.mark.integration
def test_every_script_entry_point_is_one_line(script, args, needle, code, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(root / script), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == code, done.stderr
    _assert_one_line(done.stderr, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_scorer_checks_device_before_fetching_a_hub_id(monkeypatch, tmp_path):
    import ImageReward.resolve as resolve_module

    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched before the device was checked")

    monkeypatch.setattr(resolve_module, "fetch_hub_repo", no_fetch)
    with pytest.raises(InvalidInputError, match="device"):
        RM.load_scorer("someone/some-reward-model", device="cuda")
    with pytest.raises(InvalidInputError, match="dtype"):
        RM.load_scorer("someone/some-reward-model", device="cpu", dtype="int8")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="download_root"):
        RM.load_scorer("someone/some-reward-model", device="cpu", download_root=tmp_path / "file")
