"""Reward-model training pieces: config, pairs, freezing, BLIP init, data errors, ImageRewardDB converter."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ImageReward.errors import CheckpointError, InvalidInputError
from ImageReward.models.blip import BLIP, BLIPConfig, TextConfig, VisionConfig
from ImageReward.preprocess import PreprocessConfig
from ImageReward.rm_training.config import RMTrainConfig, config_from_dict, load_config
from ImageReward.eval.metrics import pooled_pair_accuracy
from ImageReward.rm_training.data import (PairDataset, ShardedEpochSampler, drop_missing_images, expand_pairs,
                                          validate_groups)
from ImageReward.rm_training.model import build_model, freeze_layers, trainable_parameter_names
from ImageReward.rm_training.trainer import lr_at

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- pairs
def test_pairs_skip_ties_and_put_lower_rank_first():
    groups = [{"id": "a", "prompt": "p", "generations": ["0", "1", "2", "3"], "ranking": [3, 1, 3, 2]},
              {"id": "b", "prompt": "q", "generations": ["x", "y"], "ranking": [1, 1]}]
    pairs = expand_pairs(groups)
    assert [(p.group, p.better, p.worse) for p in pairs] == [(0, 1, 0), (0, 3, 0), (0, 1, 2), (0, 1, 3), (0, 3, 2)]
    acc, n = pooled_pair_accuracy([g["ranking"] for g in groups], [[0.0, 1.0, 0.0, 0.0], [1.0, 2.0]])
    assert n == 5 and acc == pytest.approx(3 / 5)  # human ties are not pairs; model ties (0,3), (2,3) are wrong


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "p", "generations": ["a"]}, "missing field"),
    ({"prompt": 3, "generations": ["a"], "ranking": [1]}, "'prompt' must be a string"),
    ({"prompt": "p", "generations": ["a", "b"], "ranking": [1]}, "2 generations but 1 ranking"),
    ({"prompt": "p", "generations": ["a"], "ranking": ["1"]}, "list of numbers"),
    ({"prompt": "p", "generations": [], "ranking": []}, "non-empty list"),
])
def test_group_validation_names_the_item(bad, message):
    with pytest.raises(InvalidInputError, match=message) as info:
        validate_groups([{"prompt": "ok", "generations": ["a"], "ranking": [1.5]}, bad], "train.json")
    assert "train.json[1]" in str(info.value)


def test_sampler_shards_pads_and_resumes():
    shards = [list(ShardedEpochSampler(10, num_replicas=3, rank=r, seed=1)) for r in range(3)]
    assert all(len(s) == 4 for s in shards) and set(sum(shards, [])) == set(range(10))
    sampler = ShardedEpochSampler(10, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_start(4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(3), sampler.set_start(0)
    assert list(sampler) != full  # a new order every epoch (the original never called set_epoch)


def test_lr_schedule_matches_annealing_lr():
    opts = RMTrainConfig().train
    assert lr_at(0, 100, opts) == pytest.approx(1e-5)
    assert lr_at(50, 100, opts) == pytest.approx(5e-6)
    assert lr_at(100, 100, opts) == pytest.approx(0.0, abs=1e-15)
    warm = dataclasses.replace(opts, warmup=0.1)
    assert lr_at(0, 100, warm) == 0.0 and lr_at(5, 100, warm) == pytest.approx(5e-6)
    assert lr_at(10, 100, warm) == pytest.approx(1e-5)


# ---------------------------------------------------------------------------------------------- config
def test_shipped_config_has_the_original_values():
    cfg = load_config(REPO / "train" / "src" / "config" / "config.yaml")
    assert cfg.blip_path.endswith("/BLIP/models/model_large.pth")
    assert (cfg.BLIP.vit, cfg.BLIP.image_size, cfg.ImageReward.mlp_dim) == ("large", 224, 768)
    t = cfg.train
    assert (t.batch_size, t.accumulation_steps, t.epochs, t.fix_rate, t.lr, t.lr_decay_style, t.warmup,
            t.valid_per_epoch) == (4, 4, 10, 0.7, 1e-5, "cosine", 0.0, 4)
    assert cfg.run_name(4) == "blip_uni_cross_mul_bs64_fix=0.7_lr=1e-05cosine"
    assert (REPO / "train" / "src" / "config" / "med_config.json").is_file()


@pytest.mark.parametrize("data, message", [
    ({"blip_pth": "x"}, "unknown config key.*blip_pth"),
    ({"train": {"learning_rate": 1e-4}}, r"unknown config key.*train\.learning_rate"),
    ({"BLIP": {"vit": "huge"}}, "not one of"),
    ({"train": {"epochs": "ten"}}, "expected an integer"),
    ({"train": {"fix_rate": 1.5}}, r"\[0, 1\]"),
    ({"train": {"fix_base": "yes"}}, "true/false"),
])
def test_config_rejects_unknown_keys_and_bad_values(data, message):
    with pytest.raises(InvalidInputError, match=message):
        config_from_dict(data)


def test_cli_flags_and_overrides(tmp_path):
    import argparse

    from ImageReward.cli import build_parser
    from ImageReward.commands.train_rm import add_arguments, config_from_args

    assert "train-rm" in build_parser().format_help()
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--lr", "1e-4", "--fix_base", "--savepath", "123",
                              "--set", "train.batch_size=2", "--rank_pair"])
    cfg = config_from_args(args)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.fix_base, cfg.train.savepath, cfg.train.batch_size) == \
        (3, 1e-4, True, "123", 2)


# --------------------------------------------------------------------------------------------- freezing
def _deep_config() -> BLIPConfig:
    vision = VisionConfig(image_size=16, patch_size=8, width=8, depth=24, num_heads=1)
    text = TextConfig(hidden_size=8, num_hidden_layers=12, num_attention_heads=1, intermediate_size=8,
                      max_position_embeddings=40, vocab_size=30524, encoder_width=8)
    return BLIPConfig(vision=vision, text=text, embed_dim=4)


def _expected_trainable(names: list[str], text_k: int, vit_k: int, frozen_base: bool) -> set[str]:
    keep = set()
    for name in names:
        if name.startswith("mlp."):
            keep.add(name)
        elif frozen_base or "_proj" in name:
            continue
        elif name.startswith("blip.text_encoder.embeddings"):
            if text_k == 0:
                keep.add(name)
        elif name.startswith("blip.text_encoder.encoder.layer."):
            if int(name.split(".")[4]) >= text_k:
                keep.add(name)
        elif name.startswith("blip.visual_encoder.blocks."):
            if int(name.split(".")[3]) >= vit_k:
                keep.add(name)
        elif name.startswith(("blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
                              "blip.visual_encoder.patch_embed")):
            if vit_k == 0:
                keep.add(name)
        elif vit_k < 24:
            keep.add(name)  # ViT final norm (frozen only with the whole encoder at fix_rate 1)
    return keep


@pytest.mark.parametrize("fix_rate, text_k, vit_k", [(0.0, 0, 0), (0.25, 3, 6), (0.5, 6, 12), (0.7, 8, 16),
                                                     (0.9, 10, 21), (1.0, 12, 24)])
def test_fix_rate_freezes_exactly_the_first_layers(fix_rate, text_k, vit_k):
    torch.manual_seed(0)
    model = build_model(_deep_config(), fix_rate=fix_rate)
    names = [n for n, _ in model.named_parameters()]
    trainable = set(trainable_parameter_names(model))
    assert trainable == _expected_trainable(names, text_k, vit_k, frozen_base=False)
    if fix_rate == 0.7:  # the spec's description of the shipped setting
        assert "blip.text_encoder.encoder.layer.8.attention.self.query.weight" in trainable  # original froze it
        assert "blip.visual_encoder.blocks.16.norm1.weight" in trainable                   # original froze it
        assert "blip.text_encoder.encoder.layer.7.output.LayerNorm.bias" not in trainable
        assert "blip.visual_encoder.norm.weight" in trainable and "blip.vision_proj.weight" not in trainable
    if fix_rate == 1.0:  # as the original's walk that never finds its stop layer: both encoders frozen
        assert trainable == {n for n in names if n.startswith("mlp.")}
    freeze_layers(model, 0.3, fix_base=True)
    assert set(trainable_parameter_names(model)) == {n for n in names if n.startswith("mlp.")}


# ------------------------------------------------------------------------------------------ BLIP init
def _fake_blip_pretrain(tmp_path: Path, extra: dict | None = None) -> tuple[Path, dict]:
    """A Salesforce-shaped {'model': state_dict} from a tiny BLIP at 16 px (2x2 grid) plus pre-training extras."""
    torch.manual_seed(1)
    source = BLIP(BLIPConfig.tiny(image_size=16, patch_size=8))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state.update({"visual_encoder_m.pos_embed": torch.zeros(1, 5, 32), "text_encoder_m.x.weight": torch.zeros(2),
                  "temp": torch.tensor(0.07), "itm_head.weight": torch.zeros(2, 32), "image_queue": torch.zeros(4, 3),
                  "text_decoder.cls.bias": torch.zeros(3), "ptr_queue": torch.zeros(1, dtype=torch.long)})
    state.update(extra or {})
    path = tmp_path / "model_large.pth"
    torch.save({"model": state, "epoch": 19}, path)
    return path, state


def test_blip_pretrain_init_interpolates_and_ignores_extras_by_name(tmp_path):
    path, state = _fake_blip_pretrain(tmp_path)
    model = build_model(BLIPConfig.tiny(image_size=32, patch_size=8), blip_path=str(path), fix_rate=0.5)
    sd = model.blip.state_dict()
    assert torch.equal(sd["text_encoder.encoder.layer.1.crossattention.self.key.weight"],
                       state["text_encoder.encoder.layer.1.crossattention.self.key.weight"])
    assert torch.equal(sd["visual_encoder.blocks.0.attn.qkv.weight"], state["visual_encoder.blocks.0.attn.qkv.weight"])
    assert sd["visual_encoder.pos_embed"].shape == (1, 17, 32)  # 2x2 grid -> 4x4 grid, cls kept
    assert torch.equal(sd["visual_encoder.pos_embed"][:, 0], state["visual_encoder.pos_embed"][:, 0])
    assert (model.mean, model.std) == (0.0, 1.0)


def test_blip_pretrain_init_refuses_unknown_keys(tmp_path):
    path, _ = _fake_blip_pretrain(tmp_path, {"surprise.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="surprise.weight"):
        build_model(BLIPConfig.tiny(image_size=32, patch_size=8), blip_path=str(path))


def test_preload_image_reward_checkpoint(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "ir")
    model = build_model(tiny_model.config, preload_path=str(tmp_path / "ir"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_model.state_dict().values()))


# ------------------------------------------------------------------------------------------ bad images
def test_missing_and_corrupt_images_are_reported_with_paths(tmp_path, caplog):
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    groups = [{"id": "g", "prompt": "red", "generations": ["good.png", "broken.png", "gone.png"], "ranking": [1, 2, 3]}]
    with caplog.at_level(logging.WARNING):
        kept, missing = drop_missing_images(groups, tmp_path)
    assert missing == [str(tmp_path / "gone.png")] and "gone.png" in caplog.text
    dataset = PairDataset(kept, expand_pairs(kept), tmp_path, PreprocessConfig(image_size=16))
    with caplog.at_level(logging.WARNING):
        item = dataset[0]
    assert not bool(item["valid"]) and "broken.png" in caplog.text
    assert item["better"].shape == (3, 16, 16) and item["input_ids"].shape == (35,)


# ---------------------------------------------------------------------------------------- ImageRewardDB
def _webp_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def _make_mirror(root: Path) -> None:
    """A miniature THUDM/ImageRewardDB: metadata parquet + zip parts for train (2 parts) and test (1 part)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout = {"train": {"train_1": [("000001-0001", [1, 2, 2]), ("000002-0002", [2, 1, 3])],
                        "train_2": [("000003-0003", [1, 2])]},
              "test": {"test_1": [("000009-0009", [1, 3, 2, 2])]}}
    for split, parts in layout.items():
        rows = []
        for part, prompts in parts.items():
            archive = root / "images" / split / f"{part}.zip"
            archive.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(archive, "w") as handle:
                for prompt_id, ranks in prompts:
                    for k, rank in enumerate(ranks):
                        name = f"{prompt_id}-{k}.webp"
                        image_path = f"images/{split}/{part}/{name}"
                        if prompt_id == "000002-0002" and k == 2:
                            handle.writestr(f"{part}/{name}", b"RIFF corrupt webp")  # a known-bad image
                        elif not (prompt_id == "000001-0001" and k == 1):            # one missing image
                            handle.writestr(f"{part}/{name}", _webp_bytes((40 * k, 100, 200)))
                        rows.append({"image_path": image_path, "prompt_id": prompt_id, "prompt": f"prompt {prompt_id}",
                                     "classification": "Other", "image_amount_in_total": len(ranks), "rank": rank,
                                     "overall_rating": 4, "image_text_alignment_rating": 3, "fidelity_rating": 4})
        pq.write_table(pa.Table.from_pylist(rows), root / f"metadata-{split}.parquet")


def test_imagerewarddb_fixture_through_the_converter(tmp_path, monkeypatch):
    from ImageReward.preference import imagerewarddb as db
    from ImageReward.rm_training.data import read_groups

    mirror, root = tmp_path / "hub", tmp_path / "train"
    _make_mirror(mirror)
    monkeypatch.setitem(db.SCALES, "1k", 2)  # "1k" = the first parts covering 2 prompts = train_1 only
    summary = db.make_dataset(root, root / "dataset", scale="1k", splits=("train", "test"),
                              fetch=db.local_fetcher(mirror))
    train = read_groups(root / "dataset" / "train.json")
    assert [g["id"] for g in train] == ["000001-0001", "000002-0002"]
    assert train[0] == {"id": "000001-0001", "prompt": "prompt 000001-0001",
                        "generations": ["train/train_1/000001-0001-0.webp", "train/train_1/000001-0001-2.webp"],
                        "ranking": [1, 2]}
    assert train[1]["ranking"] == [2, 1]
    assert summary["train"] == {"prompts": 2, "images": 4, "pairs": 2, "skipped_images": 2}
    bad = (root / "dataset" / "bad_images.txt").read_text()
    assert "000001-0001-1.webp" in bad and "000002-0002-2.webp" in bad
    assert not (root / "images" / "train" / "train_2").exists()  # not part of the chosen scale
    test = read_groups(root / "dataset" / "test.json")
    assert test[0]["ranking"] == [1, 3, 2, 2] and len(expand_pairs(test)) == 5
    for g in train + test:  # every listed image opens from image_base
        assert all((root / "images" / p).is_file() for p in g["generations"])
    # re-running keeps the finished files and does not re-extract
    assert db.make_dataset(root, root / "dataset", scale="1k", splits=("train",), fetch=db.local_fetcher(mirror))["train"]["prompts"] == 2


def test_blip_url_uses_the_cached_registry_file_offline(tmp_path):
    from ImageReward.rm_training.config import BLIP_LARGE_URL

    cache = tmp_path / "cache"
    cache.mkdir()
    path, state = _fake_blip_pretrain(cache)  # saved as cache/model_large.pth, the registry's file name
    model = build_model(BLIPConfig.tiny(image_size=16, patch_size=8), blip_path=BLIP_LARGE_URL, download_root=cache)
    assert torch.equal(model.blip.state_dict()["visual_encoder.pos_embed"], state["visual_encoder.pos_embed"])
